//! The live service graph behind pilot's dashboard, read from the proxies
//! themselves: no Prometheus needed.
//!
//! While someone looks at the dashboard (an API request in the last
//! minute), pilot reads every connected proxy's `/stats/prometheus` every
//! two seconds, at the address the proxy gave with its node (an
//! unspecified host standing for the address its xDS connection comes
//! from), and sums Istio's standard series per edge:
//!
//! - requests and 5xx of `istio_requests_total` and the buckets of
//!   `istio_request_duration_milliseconds` as the calling sidecar reports
//!   them (`reporter="source"`), or as the called sidecar does when the
//!   caller has none (`source_workload="unknown"`);
//! - mTLS from the called sidecar's `connection_security_policy`;
//! - TCP connections opened, from `istio_tcp_connections_opened_total`.
//!
//! Rates are the difference between the newest sample and the oldest one
//! within the window (10 s), so the numbers settle a few seconds after
//! traffic changes. Nothing is kept beyond the window.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::xds::SyncRegistry;

/// How far back rates look.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often proxies are read while the dashboard is open.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// How long after the last API request reading goes on.
const WATCHED_FOR: Duration = Duration::from_secs(60);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// The most pilot reads of one proxy's metrics.
const MAX_EXPOSITION: usize = 8 << 20;

/// A workload as the graph names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRef {
    pub namespace: String,
    pub workload: String,
    pub app: String,
    pub version: String,
}

impl NodeRef {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.workload)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EdgeKey {
    source: NodeRef,
    target: NodeRef,
    service: String,
    protocol: String,
}

/// Cumulative counts of one edge, summed over proxies.
#[derive(Clone, Debug, Default)]
struct Totals {
    requests: f64,
    errors: f64,
    /// Duration histogram: `le` (ms) → cumulative count.
    buckets: BTreeMap<OrderedLe, f64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct OrderedLe(f64);
impl Eq for OrderedLe {}
impl Ord for OrderedLe {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl PartialOrd for OrderedLe {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One proxy's reading.
#[derive(Clone, Debug, Default)]
struct Sample {
    edges: HashMap<EdgeKey, Totals>,
    /// (source workload id, target workload id) → whether mTLS was seen.
    mtls: HashMap<(String, String), bool>,
}

/// A reading of every proxy that answered, by proxy id: rates are taken
/// per proxy, so one appearing, vanishing or restarting does not skew the
/// others.
type Reading = HashMap<String, Sample>;

struct State {
    samples: VecDeque<(Instant, Reading)>,
    /// Whether each proxy's metrics answered at the last reading.
    reachable: BTreeMap<String, bool>,
}

pub struct Graph {
    state: Mutex<State>,
    /// Milliseconds since `epoch` of the last API request.
    last_watched: AtomicU64,
    epoch: Instant,
    wake: tokio::sync::Notify,
}

impl Default for Graph {
    fn default() -> Graph {
        Graph {
            state: Mutex::new(State {
                samples: VecDeque::new(),
                reachable: BTreeMap::new(),
            }),
            last_watched: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            wake: tokio::sync::Notify::new(),
        }
    }
}

/// One edge of the graph as the dashboard draws it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub source: String,
    pub target: String,
    pub service: String,
    pub protocol: String,
    pub rps: f64,
    pub error_rate: f64,
    pub p99_ms: Option<f64>,
    pub mtls: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub id: String,
    #[serde(flatten)]
    pub node: NodeRef,
    /// `workload`, `gateway` or `external`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    pub generated_at: u64,
    pub window_seconds: u64,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

impl Graph {
    /// Notes that someone is looking; starts reading at once if it was
    /// idle.
    pub fn watched(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let before = self.last_watched.swap(now, Ordering::Relaxed);
        if before == u64::MAX || now.saturating_sub(before) > WATCHED_FOR.as_millis() as u64 {
            self.wake.notify_one();
        }
    }

    fn is_watched(&self) -> bool {
        let last = self.last_watched.load(Ordering::Relaxed);
        last != u64::MAX
            && (self.epoch.elapsed().as_millis() as u64).saturating_sub(last)
                <= WATCHED_FOR.as_millis() as u64
    }

    /// Reads the proxies every [`INTERVAL`] while watched.
    pub async fn run(self: std::sync::Arc<Self>, sync: std::sync::Arc<SyncRegistry>) {
        loop {
            if !self.is_watched() {
                self.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .samples
                    .clear();
                self.wake.notified().await;
                continue;
            }
            let started = Instant::now();
            self.scrape(&sync).await;
            tokio::time::sleep(INTERVAL.saturating_sub(started.elapsed())).await;
        }
    }

    async fn scrape(&self, sync: &SyncRegistry) {
        let proxies = sync.snapshot();
        let reads = proxies.iter().map(|p| async move {
            let text = match p.metrics_addr.parse() {
                Ok(addr) => tokio::time::timeout(SCRAPE_TIMEOUT, fetch(addr))
                    .await
                    .ok()
                    .flatten(),
                Err(_) => None,
            };
            (p.proxy.clone(), text)
        });
        let texts = futures_util::future::join_all(reads).await;
        let mut reading = Reading::new();
        let mut reachable = BTreeMap::new();
        for (proxy, text) in texts {
            reachable.insert(proxy.clone(), text.is_some());
            if let Some(t) = text {
                let mut sample = Sample::default();
                add_exposition(&mut sample, &t);
                reading.insert(proxy, sample);
            }
        }
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.samples.push_back((now, reading));
        while state
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW + INTERVAL)
        {
            state.samples.pop_front();
        }
        state.reachable = reachable;
    }

    /// Whether each proxy's metrics answered at the last reading.
    pub fn reachable(&self) -> BTreeMap<String, bool> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reachable
            .clone()
    }

    /// The graph over the window, with `gateways` (workload ids of gateway
    /// proxies) marked and `known` workloads shown even without traffic.
    pub fn view(&self, known: &[NodeRef], gateways: &BTreeSet<String>) -> View {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let edges = match (state.samples.front(), state.samples.back()) {
            (Some((t0, old)), Some((t1, new))) if t1 > t0 => {
                rates(old, new, t1.duration_since(*t0).as_secs_f64())
            }
            (_, Some((_, new))) => rates(new, new, 0.0),
            _ => Vec::new(),
        };
        drop(state);
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        let mut add = |n: &NodeRef| {
            let id = n.id();
            let kind = if gateways.contains(&id) {
                "gateway"
            } else if n.workload == "unknown" {
                "external"
            } else {
                "workload"
            };
            nodes.entry(id.clone()).or_insert_with(|| Node {
                id,
                node: n.clone(),
                kind,
            });
        };
        for (k, _) in &edges {
            add(&k.source);
            add(&k.target);
        }
        for n in known {
            add(n);
        }
        View {
            generated_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            window_seconds: WINDOW.as_secs(),
            nodes: nodes.into_values().collect(),
            edges: edges.into_iter().map(|(_, e)| e).collect(),
        }
    }
}

/// Rates between two readings `dt` seconds apart (zero rates when `dt` is
/// zero: the first reading). Each proxy's counters are differenced on
/// their own, only for proxies in both readings; a counter that went
/// down (the proxy restarted) counts from zero, as Prometheus's rate does.
fn rates(old: &Reading, new: &Reading, dt: f64) -> Vec<(EdgeKey, Edge)> {
    let delta = |n: f64, b: f64| if n >= b { n - b } else { n };
    let mut sums: BTreeMap<EdgeKey, Totals> = BTreeMap::new();
    let mut mtls: HashMap<(String, String), bool> = HashMap::new();
    for (proxy, now) in new {
        for (pair, m) in &now.mtls {
            let seen = mtls.entry(pair.clone()).or_insert(*m);
            *seen = *seen && *m;
        }
        let before = old.get(proxy).filter(|_| dt > 0.0);
        for (k, n) in &now.edges {
            let sum = sums.entry(k.clone()).or_default();
            let Some(b) = before.map(|b| b.edges.get(k).cloned().unwrap_or_default()) else {
                continue;
            };
            sum.requests += delta(n.requests, b.requests);
            sum.errors += delta(n.errors, b.errors);
            for (le, c) in &n.buckets {
                let was = b.buckets.get(le).copied().unwrap_or(0.0);
                *sum.buckets.entry(*le).or_default() += delta(*c, was);
            }
        }
    }
    sums.into_iter()
        .map(|(k, t)| {
            let buckets: Vec<(f64, f64)> = t.buckets.iter().map(|(le, c)| (le.0, *c)).collect();
            let edge = Edge {
                source: k.source.id(),
                target: k.target.id(),
                service: k.service.clone(),
                protocol: k.protocol.clone(),
                rps: if dt > 0.0 { t.requests / dt } else { 0.0 },
                error_rate: if t.requests > 0.0 {
                    t.errors / t.requests
                } else {
                    0.0
                },
                p99_ms: quantile(0.99, &buckets),
                mtls: mtls.get(&(k.source.id(), k.target.id())).copied(),
            };
            (k, edge)
        })
        .collect()
}

/// Prometheus's histogram_quantile over cumulative `(le, count)` buckets;
/// `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.iter().find(|(le, _)| le.is_infinite())?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            let frac = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                0.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    None
}

/// Adds one proxy's exposition to a sample.
fn add_exposition(sample: &mut Sample, text: &str) {
    for line in text.lines() {
        let Some((name, labels, value)) = parse_line(line) else {
            continue;
        };
        let get = |k: &str| {
            labels
                .iter()
                .find(|(n, _)| *n == k)
                .map_or("", |(_, v)| v.as_str())
        };
        let reporter = get("reporter");
        // The caller's view; the callee's only when the caller has no
        // sidecar (no mesh identity) to report it.
        let no_sidecar = get("source_principal") == "unknown";
        let counts = reporter == "source" || (reporter == "destination" && no_sidecar);
        let node = |side: &str| NodeRef {
            namespace: get(&format!("{side}_workload_namespace")).to_string(),
            workload: get(&format!("{side}_workload")).to_string(),
            app: get(&format!("{side}_app")).to_string(),
            version: get(&format!("{side}_version")).to_string(),
        };
        let key = || EdgeKey {
            source: node("source"),
            target: node("destination"),
            service: get("destination_service").to_string(),
            protocol: match name {
                "istio_tcp_connections_opened_total" => "tcp".to_string(),
                _ => get("request_protocol").to_string(),
            },
        };
        match name {
            "istio_requests_total" => {
                if reporter == "destination" {
                    let pair = (node("source").id(), node("destination").id());
                    let mtls = get("connection_security_policy") == "mutual_tls";
                    let seen = sample.mtls.entry(pair).or_insert(mtls);
                    *seen = *seen && mtls;
                }
                if counts {
                    let t = sample.edges.entry(key()).or_default();
                    t.requests += value;
                    if get("response_code").starts_with('5') {
                        t.errors += value;
                    }
                }
            }
            "istio_request_duration_milliseconds_bucket" if counts => {
                let le = match get("le") {
                    "+Inf" => f64::INFINITY,
                    v => match v.parse() {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                };
                *sample
                    .edges
                    .entry(key())
                    .or_default()
                    .buckets
                    .entry(OrderedLe(le))
                    .or_default() += value;
            }
            "istio_tcp_connections_opened_total" if counts => {
                sample.edges.entry(key()).or_default().requests += value;
            }
            _ => {}
        }
    }
}

/// A series' labels, in order.
type Labels<'a> = Vec<(&'a str, String)>;

/// `name{k="v",…} value` (the subset of the text format proxies write).
fn parse_line(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (n, v) = line.split_once(' ')?;
            return Some((n, Vec::new(), v.trim().parse().ok()?));
        }
    };
    let mut labels = Vec::new();
    let mut rest = rest;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            let value = after.trim().split(' ').next()?.parse().ok()?;
            return Some((name, labels, value));
        }
        let eq = rest.find("=\"")?;
        let key = &rest[..eq];
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key, value));
        rest = &rest[eq + 2 + end + 1..];
    }
}

/// GET `/stats/prometheus` from a proxy.
async fn fetch(addr: std::net::SocketAddr) -> Option<String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get("/stats/prometheus")
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    let resp = send.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_EXPOSITION)
        .collect()
        .await
        .ok()?
        .to_bytes();
    String::from_utf8(body.into()).ok()
}

#[cfg(test)]
mod tests;

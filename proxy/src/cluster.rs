//! Upstream clusters: their endpoints, load balancing, outlier detection and
//! connection-pool limits.
//!
//! A cluster is rebuilt on every config change, but what it has learnt
//! lives in [`ClusterState`] and [`EndpointState`], kept in a registry by
//! cluster name and endpoint address: a config swap keeps ejections,
//! in-flight counts and pooled connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mesh_api::model::{self, Protocol};
use mesh_api::networking::{ClientTlsMode, ConsistentHashLb, OutlierDetection, SimpleLb};
use rustls::pki_types::ServerName;
use tokio::sync::Notify;

use crate::hashring::{DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_MIN_RING_SIZE, Maglev, RingHash};
use crate::pool::EndpointPool;
use crate::tls::{Origination, Upstream};

/// What a cluster has learnt, kept across config changes.
#[derive(Default)]
pub struct ClusterState {
    rr: AtomicUsize,
    pub active_requests: AtomicU32,
    pub pending: AtomicU32,
    pub active_retries: AtomicU32,
    pub connections: AtomicU32,
    /// Woken when a connection is freed, for requests waiting on one.
    pub conn_freed: Notify,
}

/// One endpoint and what the proxy knows of it.
pub struct EndpointState {
    pub addr: SocketAddr,
    /// Plaintext, mesh mTLS or TLS origination. Part of the registry key:
    /// when it changes, pooled connections are not reused.
    pub tls: Upstream,
    /// In-flight requests, for least-request balancing.
    pub active: AtomicU32,
    outlier: Mutex<OutlierState>,
    pub pool: EndpointPool,
}

#[derive(Default)]
struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    ejected_until: Option<Instant>,
    /// Ejections so far: each ejection lasts `baseEjectionTime × ejections`.
    ejections: u32,
    /// When the host came back; healthy for a while → the multiplier shrinks.
    returned_at: Option<Instant>,
}

impl EndpointState {
    fn new(addr: SocketAddr, tls: Upstream) -> EndpointState {
        EndpointState {
            addr,
            tls,
            active: AtomicU32::new(0),
            outlier: Mutex::new(OutlierState::default()),
            pool: EndpointPool::default(),
        }
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let o = self.outlier.lock().unwrap_or_else(|e| e.into_inner());
        o.ejected_until.is_some_and(|t| now < t)
    }
}

/// Cluster, address and a fingerprint of the TLS settings.
type EndpointKey = (Arc<str>, SocketAddr, u64);

/// Registry of learnt state, weakly held: state disappears with the last
/// cluster that uses it.
#[derive(Default)]
pub struct Registry {
    clusters: Mutex<HashMap<Arc<str>, Weak<ClusterState>>>,
    endpoints: Mutex<HashMap<EndpointKey, Weak<EndpointState>>>,
    jwks: crate::jwt::JwksRegistry,
}

impl Registry {
    /// The key set fetched from a RequestAuthentication's `jwksUri`.
    pub fn jwks(&self, uri: &str) -> Arc<crate::jwt::RemoteJwks> {
        self.jwks.get(uri)
    }

    fn cluster(&self, name: &Arc<str>) -> Arc<ClusterState> {
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(ClusterState::default());
        map.insert(name.clone(), Arc::downgrade(&s));
        s
    }

    fn endpoint(
        &self,
        cluster: &Arc<str>,
        addr: SocketAddr,
        tls: Upstream,
        tls_key: u64,
    ) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let key = (cluster.clone(), addr, tls_key);
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(EndpointState::new(addr, tls));
        map.insert(key, Arc::downgrade(&s));
        s
    }

    /// Forgets entries nobody uses any more.
    pub fn prune(&self) {
        self.clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, w| w.strong_count() > 0);
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, w| w.strong_count() > 0);
    }
}

/// Connection-pool limits (Istio's connectionPool, Envoy's circuit
/// breakers). Unset limits are unlimited, as in Istio.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests: u32,
    pub max_retries: Option<u32>,
    pub max_requests_per_connection: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    pub fn from_model(cp: Option<&mesh_api::networking::ConnectionPoolSettings>) -> Limits {
        let pos = |v: Option<i32>| v.filter(|n| *n > 0).map(|n| n as u32);
        let tcp = cp.and_then(|c| c.tcp.as_ref());
        let http = cp.and_then(|c| c.http.as_ref());
        Limits {
            max_connections: pos(tcp.and_then(|t| t.max_connections)).unwrap_or(u32::MAX),
            max_pending: pos(http.and_then(|h| h.http1_max_pending_requests)).unwrap_or(u32::MAX),
            max_requests: pos(http.and_then(|h| h.http2_max_requests)).unwrap_or(u32::MAX),
            max_retries: pos(http.and_then(|h| h.max_retries)),
            max_requests_per_connection: pos(http.and_then(|h| h.max_requests_per_connection))
                .unwrap_or(u32::MAX),
            connect_timeout: tcp
                .and_then(|t| t.connect_timeout)
                .map_or(Duration::from_secs(10), |d| d.as_std()),
            idle_timeout: http
                .and_then(|h| h.idle_timeout)
                .map_or(Duration::from_secs(60), |d| d.as_std()),
        }
    }
}

/// Outlier detection settings, with Istio's defaults.
#[derive(Clone, Debug)]
pub struct Outlier {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub consecutive_local: Option<u32>,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl Outlier {
    fn from(od: &OutlierDetection) -> Outlier {
        let c5 = od
            .consecutive_5xx_errors
            .or(od.consecutive_errors.and_then(|n| u32::try_from(n).ok()))
            .unwrap_or(5);
        Outlier {
            consecutive_5xx: (c5 > 0).then_some(c5),
            consecutive_gateway: od.consecutive_gateway_errors.filter(|n| *n > 0),
            consecutive_local: if od.split_external_local_origin_errors == Some(true) {
                Some(od.consecutive_local_origin_failures.unwrap_or(5))
            } else {
                None
            },
            interval: od.interval.map_or(Duration::from_secs(10), |d| d.as_std()),
            base_ejection: od
                .base_ejection_time
                .map_or(Duration::from_secs(30), |d| d.as_std()),
            max_ejection_percent: od
                .max_ejection_percent
                .map_or(10, |p| p.clamp(0, 100) as u32),
            min_health_percent: od.min_health_percent.map_or(0, |p| p.clamp(0, 100) as u32),
        }
    }
}

/// How a request's hash key is found for consistent hashing.
#[derive(Clone, Debug)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: Option<String>,
    },
    SourceIp,
    Query(String),
}

pub enum Balancer {
    RoundRobin,
    Random,
    LeastRequest,
    Ring(RingHash, HashKey),
    Maglev(Maglev, HashKey),
}

/// An upstream cluster as one config snapshot sees it.
pub struct Cluster {
    pub name: Arc<str>,
    pub service: Arc<str>,
    pub endpoints: Vec<Arc<EndpointState>>,
    /// Per endpoint (same index): metrics labels.
    pub endpoint_meta: Vec<EndpointMeta>,
    pub weights: Vec<u32>,
    pub protocol: Protocol,
    pub balancer: Balancer,
    pub limits: Limits,
    pub outlier: Option<Outlier>,
    pub state: Arc<ClusterState>,
}

#[derive(Clone, Debug, Default)]
pub struct EndpointMeta {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
}

/// The outcome of one upstream attempt, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// Connect failure, reset or timeout: an error before a response.
    LocalFailure,
}

impl Cluster {
    pub fn build(c: &model::Cluster, registry: &Registry) -> Result<Cluster, String> {
        let name: Arc<str> = c.name.as_str().into();
        let originate = match &c.tls {
            Some(t) if matches!(t.mode, ClientTlsMode::Simple | ClientTlsMode::Mutual) => {
                Some(match Origination::new(t, &c.service) {
                    Ok(o) => Upstream::Originate(Arc::new(o)),
                    Err(e) => {
                        tracing::error!(cluster = %c.name, error = %e, "TLS origination unusable; its connections will fail");
                        Upstream::Broken(format!("cluster {}: tls: {e}", c.name).into())
                    }
                })
            }
            _ => None,
        };
        let sni = || {
            ServerName::try_from(c.service.clone())
                .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("a DNS name"))
        };
        let endpoints: Vec<_> = c
            .endpoints
            .iter()
            .map(|e| {
                let tls = match (&c.tls, &originate) {
                    (_, Some(o)) => o.clone(),
                    (Some(t), None) if t.mode == ClientTlsMode::Disable => Upstream::Plain,
                    (Some(t), None) => Upstream::Mesh {
                        sni: sni(),
                        expect: if t.subject_alt_names.is_empty() {
                            e.identity.iter().map(|i| i.as_str().into()).collect()
                        } else {
                            t.subject_alt_names
                                .iter()
                                .map(|n| n.as_str().into())
                                .collect()
                        },
                    },
                    (None, None) => match &e.identity {
                        Some(id) => Upstream::Mesh {
                            sni: sni(),
                            expect: Arc::new([id.as_str().into()]),
                        },
                        None => Upstream::Plain,
                    },
                };
                let key =
                    crate::hashring::xxh64(format!("{:?}|{:?}", c.tls, e.identity).as_bytes(), 0);
                registry.endpoint(&name, e.address, tls, key)
            })
            .collect();
        let endpoint_meta = c
            .endpoints
            .iter()
            .map(|e| EndpointMeta {
                workload: e.workload.as_deref().unwrap_or("unknown").into(),
                namespace: e.namespace.as_deref().unwrap_or("unknown").into(),
                app: e.labels.get("app").map_or("unknown", String::as_str).into(),
                version: e
                    .labels
                    .get("version")
                    .map_or("unknown", String::as_str)
                    .into(),
            })
            .collect();
        let weights: Vec<u32> = c.endpoints.iter().map(|e| e.weight.max(1)).collect();
        let keys: Vec<(String, u32)> = c
            .endpoints
            .iter()
            .zip(&weights)
            .map(|(e, w)| (e.address.to_string(), *w))
            .collect();
        let lb = c.load_balancer.as_ref();
        let balancer = match (
            lb.and_then(|l| l.simple),
            lb.and_then(|l| l.consistent_hash.as_ref()),
        ) {
            (_, Some(ch)) => {
                let key = hash_key(ch)?;
                match &ch.maglev {
                    Some(m) => Balancer::Maglev(
                        Maglev::new(&keys, m.table_size.unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE))
                            .map_err(|e| format!("cluster {}: {e}", c.name))?,
                        key,
                    ),
                    None => {
                        let min = ch
                            .ring_hash
                            .as_ref()
                            .and_then(|r| r.minimum_ring_size)
                            .or(ch.minimum_ring_size)
                            .unwrap_or(DEFAULT_MIN_RING_SIZE);
                        Balancer::Ring(RingHash::new(&keys, min), key)
                    }
                }
            }
            (Some(SimpleLb::Random), None) => Balancer::Random,
            (Some(SimpleLb::RoundRobin), None) => Balancer::RoundRobin,
            // Istio's default is LEAST_REQUEST; LEAST_CONN is its old name.
            _ => Balancer::LeastRequest,
        };
        Ok(Cluster {
            state: registry.cluster(&name),
            name,
            service: c.service.as_str().into(),
            endpoints,
            endpoint_meta,
            weights,
            protocol: c.protocol,
            balancer,
            limits: Limits::from_model(c.connection_pool.as_ref()),
            outlier: c.outlier_detection.as_ref().map(Outlier::from),
        })
    }

    /// A cluster for one address (passthrough to an original destination).
    pub fn passthrough(addr: SocketAddr, registry: &Registry) -> Cluster {
        let name: Arc<str> = format!("PassthroughCluster|{addr}").into();
        Cluster {
            state: registry.cluster(&name),
            endpoints: vec![registry.endpoint(&name, addr, Upstream::Plain, 0)],
            endpoint_meta: vec![EndpointMeta::default()],
            weights: vec![1],
            name,
            service: addr.to_string().into(),
            protocol: Protocol::Auto,
            balancer: Balancer::RoundRobin,
            limits: Limits::from_model(None),
            outlier: None,
        }
    }

    pub fn hash_key(&self) -> Option<&HashKey> {
        match &self.balancer {
            Balancer::Ring(_, k) | Balancer::Maglev(_, k) => Some(k),
            _ => None,
        }
    }

    /// Picks an endpoint: skips ejected endpoints (all are used when none
    /// is healthy, Envoy's panic mode) and those in `avoid` (hosts already
    /// tried, for retries) when others exist.
    pub fn pick(&self, hash: Option<u64>, avoid: &[usize], now: Instant) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let ejected: Vec<bool> = if self.outlier.is_some() {
            self.endpoints.iter().map(|e| e.is_ejected(now)).collect()
        } else {
            Vec::new()
        };
        let healthy = |i: usize| ejected.get(i).is_none_or(|e| !e);
        let healthy_count = (0..n).filter(|i| healthy(*i)).count();
        let min_health = self.outlier.as_ref().map_or(0, |o| o.min_health_percent);
        let panic = healthy_count == 0 || (healthy_count * 100) < (min_health as usize * n);
        let usable = |i: usize| (panic || healthy(i)) && !avoid.contains(&i);
        let any_usable = (0..n).any(usable);
        let usable = |i: usize| {
            if any_usable {
                usable(i)
            } else {
                panic || healthy(i)
            }
        };
        match &self.balancer {
            Balancer::Ring(ring, _) => {
                ring.pick_with(hash.unwrap_or_else(|| fastrand::u64(..)), usable)
            }
            Balancer::Maglev(m, _) => {
                m.pick_with(hash.unwrap_or_else(|| fastrand::u64(..)), usable)
            }
            Balancer::RoundRobin => {
                let start = self.state.rr.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|i| usable(*i))
            }
            Balancer::Random => self.weighted_random(usable),
            Balancer::LeastRequest => {
                // Power of two choices among usable endpoints: two random
                // picks (retrying a few times past unusable ones), the one
                // with fewer requests per unit of weight wins.
                let load = |i: usize| {
                    u64::from(self.endpoints[i].active.load(Ordering::Relaxed)) * 1000
                        / u64::from(self.weights[i])
                };
                let draw = |exclude: Option<usize>| {
                    (0..8)
                        .map(|_| fastrand::usize(..n))
                        .find(|i| usable(*i) && Some(*i) != exclude)
                        .or_else(|| (0..n).find(|i| usable(*i) && Some(*i) != exclude))
                };
                let a = draw(None)?;
                match draw(Some(a)) {
                    Some(b) if load(b) < load(a) => Some(b),
                    _ => Some(a),
                }
            }
        }
    }

    fn weighted_random(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let total: u64 = (0..self.endpoints.len())
            .filter(|i| usable(*i))
            .map(|i| u64::from(self.weights[i]))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(..total);
        for i in (0..self.endpoints.len()).filter(|i| usable(*i)) {
            let w = u64::from(self.weights[i]);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }

    /// Feeds one attempt's outcome to outlier detection.
    pub fn record(&self, idx: usize, outcome: Outcome, now: Instant) {
        let Some(cfg) = &self.outlier else { return };
        let Some(ep) = self.endpoints.get(idx) else {
            return;
        };
        let mut o = ep.outlier.lock().unwrap_or_else(|e| e.into_inner());
        // Back from an ejection and healthy for a while: shrink the multiplier.
        if let Some(back) = o.returned_at
            && now.duration_since(back) >= cfg.interval.max(cfg.base_ejection)
        {
            o.ejections = o.ejections.saturating_sub(1);
            o.returned_at = if o.ejections > 0 { Some(now) } else { None };
        }
        if let Some(until) = o.ejected_until
            && now >= until
        {
            o.ejected_until = None;
            o.returned_at = Some(now);
        }
        let (is_5xx, is_gateway, is_local) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504), false),
            Outcome::LocalFailure => (
                cfg.consecutive_local.is_none(),
                cfg.consecutive_local.is_none(),
                true,
            ),
        };
        let mut trip = false;
        if is_local {
            o.consecutive_local += 1;
            trip |= cfg
                .consecutive_local
                .is_some_and(|n| o.consecutive_local >= n);
        } else {
            o.consecutive_local = 0;
        }
        if is_5xx {
            o.consecutive_5xx += 1;
            trip |= cfg.consecutive_5xx.is_some_and(|n| o.consecutive_5xx >= n);
        } else if !is_local {
            o.consecutive_5xx = 0;
        }
        if is_gateway {
            o.consecutive_gateway += 1;
            trip |= cfg
                .consecutive_gateway
                .is_some_and(|n| o.consecutive_gateway >= n);
        } else if !is_local {
            o.consecutive_gateway = 0;
        }
        if trip && o.ejected_until.is_none() {
            drop(o);
            self.try_eject(idx, cfg, now);
        }
    }

    fn try_eject(&self, idx: usize, cfg: &Outlier, now: Instant) {
        let n = self.endpoints.len();
        let ejected = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        // Envoy ejects at least one host whatever maxEjectionPercent says.
        let allowed = ejected == 0 || (ejected + 1) * 100 <= cfg.max_ejection_percent as usize * n;
        if !allowed {
            return;
        }
        let ep = &self.endpoints[idx];
        let mut o = ep.outlier.lock().unwrap_or_else(|e| e.into_inner());
        o.ejections = o.ejections.saturating_add(1);
        o.ejected_until = Some(now + cfg.base_ejection * o.ejections);
        o.consecutive_5xx = 0;
        o.consecutive_gateway = 0;
        o.consecutive_local = 0;
        o.returned_at = None;
        tracing::info!(cluster = %self.name, endpoint = %ep.addr, ejections = o.ejections, "outlier ejected");
    }
}

fn hash_key(ch: &ConsistentHashLb) -> Result<HashKey, String> {
    if let Some(h) = &ch.http_header_name {
        return http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
            .map(HashKey::Header)
            .map_err(|_| format!("invalid httpHeaderName {h:?}"));
    }
    if let Some(c) = &ch.http_cookie {
        return Ok(HashKey::Cookie {
            name: c.name.clone(),
            ttl: c.ttl.map(|d| d.as_std()),
            path: c.path.clone(),
        });
    }
    if ch.use_source_ip == Some(true) {
        return Ok(HashKey::SourceIp);
    }
    if let Some(q) = &ch.http_query_parameter_name {
        return Ok(HashKey::Query(q.clone()));
    }
    Err("consistentHash needs a key".into())
}

//! Test support: origins with scripted behaviour, in-process proxies, and a
//! small client. Everything listens on 127.0.0.1 with ephemeral ports.

#![allow(dead_code)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_api::model::ProxyConfig;
use mesh_proxy::{Addrs, ConnSettings, Proxy, Running};
use tokio::net::TcpListener;

/// What an origin saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: SocketAddr,
    pub version: http::Version,
}

/// How an origin answers: given the request and its index (0-based).
pub type Behaviour = Arc<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
    pub headers: Vec<(&'static str, String)>,
    pub trailers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn ok(body: impl Into<String>) -> Reply {
        Reply {
            status: 200,
            body: body.into(),
            delay: Duration::ZERO,
            headers: Vec::new(),
            trailers: Vec::new(),
        }
    }

    pub fn status(mut self, s: u16) -> Reply {
        self.status = s;
        self
    }

    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    count: Arc<AtomicUsize>,
}

impl Origin {
    pub fn hits(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Distinct client connections (by peer port) seen so far.
    pub fn connections(&self) -> usize {
        self.seen()
            .iter()
            .map(|s| s.peer)
            .collect::<HashSet<_>>()
            .len()
    }
}

/// An origin answering `name` with 200.
pub async fn origin(name: &str) -> Origin {
    let name = name.to_string();
    origin_with(Arc::new(move |_, _| Reply::ok(name.clone()))).await
}

/// An origin with scripted behaviour (HTTP/1.1 and h2c).
pub async fn origin_with(behaviour: Behaviour) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let (s, c) = (seen.clone(), count.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let (seen, count, behaviour) = (s.clone(), c.clone(), behaviour.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (seen, count, behaviour) = (seen.clone(), count.clone(), behaviour.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let s = Seen {
                            method: parts.method.to_string(),
                            path: parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            headers: parts.headers,
                            body,
                            peer,
                            version: parts.version,
                        };
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let reply = behaviour(&s, n);
                        seen.lock().unwrap().push(s);
                        if !reply.delay.is_zero() {
                            tokio::time::sleep(reply.delay).await;
                        }
                        Ok::<_, Infallible>(build(reply))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Origin { addr, seen, count }
}

fn build(reply: Reply) -> Response<ReplyBody> {
    let trailers = (!reply.trailers.is_empty()).then(|| {
        let mut t = HeaderMap::new();
        for (k, v) in &reply.trailers {
            t.insert(*k, v.parse().unwrap());
        }
        t
    });
    let data = Bytes::from(reply.body);
    let mut resp = Response::new(ReplyBody {
        data: (!data.is_empty()).then_some(data),
        trailers,
    });
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

/// A body of one data frame and optional trailers.
pub struct ReplyBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let frame = match self.data.take() {
            Some(d) => Some(Ok(http_body::Frame::data(d))),
            None => self
                .trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        };
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// A proxy running in-process, explicit mode (plus inbound on a free
/// port), with `cfg` applied.
pub async fn proxy(cfg: &str) -> Running {
    proxy_with(cfg, ConnSettings::default(), vec![]).await
}

pub async fn proxy_with(cfg: &str, settings: ConnSettings, gateway_names: Vec<String>) -> Running {
    let proxy = Arc::new(Proxy::new(gateway_names));
    let cfg: ProxyConfig = serde_yaml::from_str(cfg).expect("test config parses");
    proxy.apply(cfg).expect("test config compiles");
    let addrs = Addrs {
        outbound: None,
        inbound: None,
        explicit: Some("127.0.0.1:0".parse().unwrap()),
        gateway_bind: Some("127.0.0.1".parse().unwrap()),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        ready: Some("127.0.0.1:0".parse().unwrap()),
    };
    mesh_proxy::start(proxy, addrs, settings, None)
        .await
        .unwrap()
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

pub fn h2_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    pub trailers: Option<HeaderMap>,
    pub elapsed: Duration,
}

impl Got {
    pub fn reason(&self) -> &str {
        self.headers
            .get("x-mesh-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Sends a request to `to` (a proxy listener) for `host` and `path`.
pub async fn send(
    c: &Client,
    to: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    send_req(c, to, "GET", host, path, headers, Bytes::new()).await
}

pub async fn send_req(
    c: &Client,
    to: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Got {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{to}{path}"))
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let start = Instant::now();
    let resp = c
        .request(req.body(Full::new(body)).unwrap())
        .await
        .expect("request reaches the proxy");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("response body");
    let trailers = collected.trailers().cloned();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        trailers,
        elapsed: start.elapsed(),
    }
}

/// Polls `f` until it is true or `deadline` passes.
pub async fn eventually(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// Raw bytes to a listener; returns what came back before the peer closed
/// or `wait` passed.
pub async fn raw(to: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A config with one destination `svc` (port 9080) routed by `routes_yaml`
/// (YAML list items under `http:`), and `clusters_yaml` (list items).
pub fn config(routes_yaml: &str, clusters_yaml: &str) -> String {
    let clusters = if clusters_yaml.trim().is_empty() {
        "clusters: []\n".to_string()
    } else {
        format!("clusters:\n{}", indent(clusters_yaml, 0))
    };
    format!(
        "version: t1\nworkload: {{name: productpage-v1, namespace: default, labels: {{app: productpage, version: v1}}, serviceAccount: productpage}}\ndestinations:\n- host: svc.default.svc.cluster.local\n  port: 9080\n  aliases: [svc]\n  http:\n{}{clusters}",
        indent(routes_yaml, 2)
    )
}

pub fn indent(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    s.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// A cluster named `name` with the given origins as endpoints, plus extra
/// YAML lines (e.g. `loadBalancer: ...`).
pub fn cluster(name: &str, origins: &[&Origin], extra: &str) -> String {
    let eps: Vec<String> = origins
        .iter()
        .map(|o| format!("  - {{address: \"{}\", workload: {name}, namespace: default, labels: {{app: svc, version: {name}}}}}", o.addr))
        .collect();
    format!(
        "- name: {name}\n  service: svc.default.svc.cluster.local\n  endpoints:\n{}\n{}",
        eps.join("\n"),
        indent(extra, 2)
    )
}

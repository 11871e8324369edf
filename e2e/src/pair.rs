//! Two sidecars with certificates from pilot's CA (bootstrap tokens):
//! `productpage` calls `reviews` through its sidecar over automatic mTLS,
//! and the app behind `reviews` echoes what reached it. Each test changes
//! the two proxies' configs directly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_pilot::ca::{BootstrapTokens, Ca};
use mesh_proxy::{Addrs, ConnSettings, Proxy, Running};
use tokio::net::{TcpListener, TcpStream};

use crate::get;

pub const TD: &str = "cluster.local";
pub const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
pub const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
pub const HOST: &str = "reviews.default.svc.cluster.local";

pub struct Pair {
    pub dir: PathBuf,
    pub ca: Arc<Ca>,
    pub pilot: Option<mesh_pilot::Running>,
    pub ca_addr: String,
    pub root: PathBuf,
    /// The app behind `reviews`: echoes the HTTP version and XFCC.
    pub app: SocketAddr,
    pub reviews: Arc<Running>,
    pub productpage: Arc<Running>,
}

/// An app answering `<version> <x-forwarded-client-cert>`, and echoing
/// what reached it in headers: `x-echo-method`, `x-echo-path` (with the
/// query) and, when present, `x-echo-authorization` and
/// `x-echo-jwt-payload`.
pub async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let xfcc = header("x-forwarded-client-cert").unwrap_or_else(|| "-".into());
                    let mut resp = Response::new(Full::new(Bytes::from(format!(
                        "{:?} {xfcc}",
                        req.version()
                    ))));
                    let h = resp.headers_mut();
                    let set = |h: &mut hyper::HeaderMap, name: &'static str, v: &str| {
                        if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                            h.insert(name, v);
                        }
                    };
                    set(h, "x-echo-method", req.method().as_str());
                    set(
                        h,
                        "x-echo-path",
                        req.uri().path_and_query().map_or("", |p| p.as_str()),
                    );
                    if let Some(v) = header("authorization") {
                        set(h, "x-echo-authorization", &v);
                    }
                    if let Some(v) = header("x-jwt-payload") {
                        set(h, "x-echo-jwt-payload", &v);
                    }
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn start_proxy(tls12: bool) -> Arc<Running> {
    let local = Some("127.0.0.1:0".parse().unwrap());
    let mut proxy = Proxy::new(Vec::new());
    proxy.tls = Arc::new(mesh_proxy::tls::MeshTls::with_tls12(
        proxy.tls.certs.clone(),
        tls12,
    ));
    Arc::new(
        mesh_proxy::start(
            Arc::new(proxy),
            Addrs {
                outbound: None,
                inbound: local,
                explicit: local,
                gateway_bind: None,
                admin: local,
                metrics: local,
                ready: local,
            },
            ConnSettings::default(),
            None,
        )
        .await
        .unwrap(),
    )
}

impl Pair {
    pub async fn start(name: &str, ttl: Option<Duration>) -> Pair {
        Pair::start_with(name, ttl, false).await
    }

    /// With `tls12`, both sidecars also accept and offer TLS 1.2.
    pub async fn start_with(name: &str, ttl: Option<Duration>, tls12: bool) -> Pair {
        let dir = std::env::temp_dir().join(format!("mesh-mtls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut tokens = BootstrapTokens::default();
        tokens.insert("reviews-token-0123456789".into(), "default", "reviews");
        tokens.insert(
            "productpage-token-0123456789".into(),
            "default",
            "productpage",
        );
        let secure = crate::secure_pilot(&dir, tokens).await;
        let mesh = Pair {
            ca_addr: secure.ca_addr,
            ca: secure.ca,
            pilot: secure.pilot,
            root: secure.root,
            app: echo_app().await,
            reviews: start_proxy(tls12).await,
            productpage: start_proxy(tls12).await,
            dir,
        };
        for (p, sa) in [
            (&mesh.reviews, "reviews"),
            (&mesh.productpage, "productpage"),
        ] {
            let token = mesh.dir.join(format!("{sa}.token"));
            std::fs::write(&token, format!("{sa}-token-0123456789")).unwrap();
            tokio::spawn(mesh_proxy::identity::run(
                p.proxy.tls.certs.clone(),
                mesh_proxy::identity::Settings {
                    ca_addr: mesh.ca_addr.clone(),
                    ca_root: mesh.root.clone(),
                    ca_name: Some("localhost".into()),
                    token_file: token,
                    trust_domain: TD.into(),
                    namespace: "default".into(),
                    service_account: sa.into(),
                    ttl,
                },
            ));
        }
        mesh.reviews_config("STRICT").await;
        mesh.productpage_config(Some(REVIEWS), "", "HTTP").await;
        for p in [&mesh.reviews, &mesh.productpage] {
            assert!(crate::ready(p).await, "proxies get certificates and config");
        }
        mesh
    }

    /// `reviews`: the app on its inbound port (protocol detected: HTTP/2
    /// from the client stays HTTP/2 to the app), under `mode`.
    pub async fn reviews_config(&self, mode: &str) {
        self.reviews_config_with(mode, "").await
    }

    /// `reviews` under `mode`, with more of its `inbound` block (indented
    /// two spaces), e.g. its authorization policies.
    pub async fn reviews_config_with(&self, mode: &str, inbound: &str) {
        let port = self.reviews.inbound.unwrap().port();
        let cfg = format!(
            "workload: {{name: reviews, namespace: default, serviceAccount: reviews, trustDomain: {TD}}}\n\
             inbound:\n  mtls: {mode}\n  ports:\n  - {{port: {port}, targetPort: {}, service: {HOST}}}\n{inbound}",
            self.app.port()
        );
        self.reviews
            .apply(serde_yaml::from_str(&cfg).unwrap())
            .await
            .unwrap();
    }

    /// `productpage`: routes to `reviews`, whose sidecar is expected to be
    /// `identity`; `tls` is the DestinationRule's tls block, if any. Every
    /// request opens a new connection, so each meets the policy in force.
    pub async fn productpage_config(&self, identity: Option<&str>, tls: &str, protocol: &str) {
        let ep = self.reviews.inbound.unwrap();
        let identity = identity.map_or(String::new(), |i| format!(", identity: \"{i}\""));
        let cfg = format!(
            "workload: {{name: productpage, namespace: default, serviceAccount: productpage, trustDomain: {TD}}}\n\
             destinations:\n\
             - host: {HOST}\n  port: 9080\n  protocol: {protocol}\n  http:\n  - action: {{forward: [{{cluster: c}}]}}\n  tcp:\n  - clusters: [{{cluster: c}}]\n\
             clusters:\n\
             - name: c\n  service: {HOST}\n  protocol: {protocol}\n  endpoints:\n  - {{address: \"{ep}\"{identity}}}\n  connectionPool: {{http: {{maxRequestsPerConnection: 1}}}}\n{tls}"
        );
        self.productpage
            .apply(serde_yaml::from_str(&cfg).unwrap())
            .await
            .unwrap();
    }

    pub async fn call(&self) -> crate::Got {
        let c = crate::client();
        get(
            &c,
            self.productpage.explicit.unwrap(),
            &format!("{HOST}:9080"),
            "/",
        )
        .await
        .unwrap()
    }

    pub fn refused(&self) -> f64 {
        metric(&self.reviews, "mesh_proxy_mtls_refused_total")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn metric(p: &Running, name: &str) -> f64 {
    p.proxy
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A plaintext GET straight to `addr`.
pub async fn plain_get(addr: SocketAddr) -> Result<String, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    request_over(stream).await
}

pub async fn request_over<S>(io: S) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/")
        .header("host", HOST)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

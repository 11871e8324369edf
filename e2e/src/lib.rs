//! Shared pieces of the end-to-end tests: apps that answer with their
//! name, a client that goes through a proxy, pilot as a child process, and
//! polling with a deadline.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::{Addrs, ConnSettings, Proxy, Running};
use tokio::net::TcpListener;

pub mod cluster;
pub mod mesh;
pub mod netns;
pub mod pair;

/// An app answering every request with 200 and its name.
pub struct App {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl App {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Starts an app on `ip:port` (port 0: any).
pub async fn app(name: &str, ip: IpAddr, port: u16) -> App {
    app_answering(name, ip, port, 200).await
}

/// Starts an app answering every request with `status` and its name: a
/// broken instance when `status` is 5xx.
pub async fn app_answering(name: &str, ip: IpAddr, port: u16, status: u16) -> App {
    let listener = TcpListener::bind(SocketAddr::new(ip, port))
        .await
        .unwrap_or_else(|e| panic!("app {name} cannot listen on {ip}:{port}: {e}"));
    serve_app(name, listener, status)
}

/// Serves an app (as [`app_answering`]) on a bound listener.
pub fn serve_app(name: &str, listener: TcpListener, status: u16) -> App {
    let addr = listener.local_addr().expect("bound address");
    let hits = Arc::new(AtomicUsize::new(0));
    let (name, h) = (Bytes::from(name.to_string()), hits.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (name, h) = (name.clone(), h.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let mut resp = Response::new(Full::new(name.clone()));
                    *resp.status_mut() =
                        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    App { addr, hits }
}

/// A port free on every address given, a moment ago.
pub fn free_port_on(ips: &[IpAddr]) -> u16 {
    for _ in 0..100 {
        let probe = std::net::TcpListener::bind((ips[0], 0)).expect("bind a probe");
        let port = probe.local_addr().expect("probe address").port();
        drop(probe);
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// A sidecar in explicit mode (no root needed), configured by pilot.
pub async fn sidecar(xds: SocketAddr, workload: &str, labels: &[(&str, &str)]) -> Arc<Running> {
    let proxy = Arc::new(Proxy::new(Vec::new()));
    let local = Some("127.0.0.1:0".parse().expect("address"));
    let addrs = Addrs {
        outbound: None,
        inbound: None,
        explicit: local,
        gateway_bind: None,
        admin: local,
        metrics: local,
        ready: local,
    };
    let running = Arc::new(
        mesh_proxy::start(proxy, addrs, ConnSettings::default(), None)
            .await
            .expect("proxy starts"),
    );
    mesh_proxy::follow_pilot(
        &running,
        mesh_proxy::xds::Settings {
            addr: format!("http://{xds}"),
            node: mesh_api::discovery::Node {
                id: format!("{workload}-test.default"),
                workload: workload.to_string(),
                namespace: "default".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                service_account: workload.to_string(),
                version: "test".into(),
                mode: "explicit".into(),
                metrics_addr: String::new(),
                gateways: Vec::new(),
            },
            demand_timeout: Duration::from_secs(5),
            backoff: (Duration::from_millis(50), Duration::from_millis(400)),
        },
    );
    running
}

/// Waits until a proxy reports ready (it has its config from pilot).
pub async fn ready(proxy: &Running) -> bool {
    let addr = proxy.ready.expect("readiness port");
    eventually(Duration::from_secs(10), || async {
        http_get(addr, "/healthz/ready").await.is_some()
    })
    .await
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// One response: status, `x-mesh-reason` and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub status: u16,
    pub reason: String,
    pub body: String,
}

/// GET `path` for `host` through the proxy listening on `proxy`.
pub async fn get(c: &Client, proxy: SocketAddr, host: &str, path: &str) -> Result<Got, String> {
    let req = Request::builder()
        .uri(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = c.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let reason = resp
        .headers()
        .get("x-mesh-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Got {
        status,
        reason,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Polls `f` every 10 ms until it is true or `deadline` passes.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    deadline: Duration,
    mut f: impl FnMut() -> F,
) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f().await
}

/// A built binary of the workspace (`mesh-pilot`, `meshctl`, …).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// `mesh-pilot` as a child process, killed when dropped.
pub struct PilotProcess {
    pub child: Child,
    pub xds: SocketAddr,
    pub http: SocketAddr,
}

impl PilotProcess {
    pub fn start(config_dir: &Path, xds: SocketAddr, http: SocketAddr) -> PilotProcess {
        PilotProcess::start_in(None, config_dir, xds, http, &[])
    }

    /// Starts pilot inside a network namespace (`None`: this one).
    pub fn start_in(
        netns: Option<&netns::Netns>,
        config_dir: &Path,
        xds: SocketAddr,
        http: SocketAddr,
        extra: &[String],
    ) -> PilotProcess {
        let program = binary("mesh-pilot");
        let program = program.to_str().expect("a UTF-8 path");
        let mut cmd = match netns {
            Some(ns) => ns.exec(program),
            None => Command::new(program),
        };
        let child = cmd
            .arg("--config-dir")
            .arg(config_dir)
            .args(["--xds-addr", &xds.to_string()])
            .args(["--http-addr", &http.to_string()])
            .args(["--reload-interval", "20ms"])
            .args(extra)
            .env("MESH_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("mesh-pilot starts");
        PilotProcess { child, xds, http }
    }

    /// SIGKILL: no goodbye to the proxies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PilotProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET a path of pilot's (or a proxy's) HTTP port; the body, if 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let got = get(&client(), addr, &addr.to_string(), path).await.ok()?;
    (got.status == 200).then_some(got.body)
}

/// pilot in-process with its CA: the files source on `dir/config`, the CA
/// in `dir/ca` (trust domain `cluster.local`), the CA and secure xDS on a
/// loopback port, its root written to `dir/root-cert.pem`.
pub struct SecurePilot {
    /// Dropping it stops pilot, CA included.
    pub pilot: Option<mesh_pilot::Running>,
    pub ca: Arc<mesh_pilot::ca::Ca>,
    /// `https://127.0.0.1:<port>`; the certificate names `localhost` and
    /// `127.0.0.1`.
    pub ca_addr: String,
    pub root: PathBuf,
}

pub async fn secure_pilot(dir: &Path, tokens: mesh_pilot::ca::BootstrapTokens) -> SecurePilot {
    std::fs::create_dir_all(dir.join("config")).expect("config dir");
    let ca = Arc::new(
        mesh_pilot::ca::Ca::load_or_create(
            &dir.join("ca"),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .expect("the CA"),
    );
    let mut pilot = mesh_pilot::start(
        mesh_pilot::Config {
            xds_addr: "127.0.0.1:0".parse().expect("address"),
            http_addr: "127.0.0.1:0".parse().expect("address"),
            mesh: mesh_pilot::MeshSettings::default(),
            debounce: mesh_pilot::Debounce::default(),
        },
        mesh_pilot::source::Files {
            path: dir.join("config"),
            interval: Duration::from_millis(50),
        },
    )
    .await
    .expect("pilot starts");
    let addr = pilot
        .serve_secure(
            "127.0.0.1:0".parse().expect("address"),
            ca.clone(),
            tokens,
            &["localhost".to_string(), "127.0.0.1".to_string()],
        )
        .await
        .expect("the CA serves");
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.roots().concat()).expect("root file");
    SecurePilot {
        pilot: Some(pilot),
        ca,
        ca_addr: format!("https://{addr}"),
        root,
    }
}

//! A mesh of real binaries: `mesh-pilot` reading a config directory, each
//! workload a `mesh-sample` app with a `mesh-proxy` sidecar, and a
//! `mesh-proxy` ingress gateway, each a separate process.
//!
//! Two variants, chosen by what the machine allows:
//! - **Namespaces** (root, `ip`, iptables, `setpriv`): each workload is a
//!   pod, its own network namespace routed through a hub namespace where
//!   pilot runs. Services have cluster IPs that the pods' `/etc/hosts`
//!   name; `mesh-proxy init` installs the capture rules and the sidecar
//!   runs as UID 1337, so apps make plain connections and the sidecars
//!   intercept them, outbound and inbound, as in Kubernetes.
//! - **Explicit** (anywhere): everything on loopback; each app sends its
//!   calls to its sidecar as an HTTP proxy.
//!
//! The test's own requests and apps live where the gateway and pods can
//! be reached: the hub, or this namespace.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::netns::{HUB, Network};
use crate::{App, PilotProcess, binary, client, free_port_on, http_get, serve_app};

/// One workload: a sample app and its version, behind a service.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `callme-v1`: the WorkloadEntry and proxy name.
    pub name: String,
    /// The `mesh-sample` app (`callme`, `caller`, `reviews`, …).
    pub app: &'static str,
    pub version: &'static str,
    /// The service selecting it (`app` label).
    pub service: &'static str,
}

pub fn workload(
    name: &str,
    app: &'static str,
    version: &'static str,
    service: &'static str,
) -> Workload {
    Workload {
        name: name.into(),
        app,
        version,
        service,
    }
}

/// Bookinfo's services, each on 9080.
pub const BOOKINFO_SERVICES: [(&str, u16); 4] = [
    ("productpage", 9080),
    ("details", 9080),
    ("ratings", 9080),
    ("reviews", 9080),
];

/// Bookinfo's workloads with the reviews versions named (`"v2"`, …).
pub fn bookinfo_workloads(reviews: &[&'static str]) -> Vec<Workload> {
    let mut w = vec![
        workload("productpage-v1", "productpage", "v1", "productpage"),
        workload("details-v1", "details", "v1", "details"),
        workload("ratings-v1", "ratings", "v1", "ratings"),
    ];
    for v in reviews {
        w.push(workload(&format!("reviews-{v}"), "reviews", v, "reviews"));
    }
    w
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The answer to one request.
#[derive(Debug)]
pub struct Outcome {
    pub status: u16,
    pub body: String,
    pub took: Duration,
}

pub struct LocalMesh {
    pub dir: PathBuf,
    /// The CA's directory and each proxy's bootstrap token (beside `dir`,
    /// which pilot reads as config).
    pki: PathBuf,
    /// pilot's CA and secure xDS address.
    ca_addr: SocketAddr,
    pilot: std::sync::Mutex<PilotProcess>,
    /// The ingress gateway's listener.
    pub gateway: SocketAddr,
    gateway_route: (String, String, u16),
    procs: BTreeMap<String, Vec<Proc>>,
    /// Each workload's app address.
    pub apps: BTreeMap<String, SocketAddr>,
    /// Each workload's readiness probe as injected (`/app-health/…`).
    app_probes: BTreeMap<String, String>,
    /// The pods, in the namespace variant (dropped last: after the
    /// processes in them).
    net: Option<Network>,
    /// Extra environment of every proxy (explicit variant).
    proxy_env: Vec<(String, String)>,
}

/// How a [`LocalMesh`] runs, beyond its workloads.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Loopback and explicit proxies even where namespaces are available
    /// (for a test that listens on loopback itself, say a collector).
    pub explicit: bool,
    /// Extra environment of every proxy.
    pub proxy_env: Vec<(String, String)>,
}

fn free_port() -> u16 {
    free_port_on(&[IpAddr::from([127, 0, 0, 1])])
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Writes a file so that a reader never sees half of it.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// Whether a [`LocalMesh`] started now runs pods in network namespaces.
pub fn namespaces_available() -> bool {
    use_namespaces().is_ok()
}

/// The namespace variant runs unless `MESH_E2E_EXPLICIT` is set or the
/// machine cannot. With `MESH_E2E_NAMESPACES` set (the test script sets it
/// as root), a machine that cannot is an error rather than a fallback.
fn use_namespaces() -> Result<(), String> {
    if std::env::var_os("MESH_E2E_EXPLICIT").is_some() {
        return Err("MESH_E2E_EXPLICIT is set".into());
    }
    match crate::netns::unavailable() {
        Some(why) if std::env::var_os("MESH_E2E_NAMESPACES").is_some() => {
            panic!("MESH_E2E_NAMESPACES is set but network namespaces cannot be used: {why}")
        }
        Some(why) => Err(why),
        None => Ok(()),
    }
}

impl LocalMesh {
    /// Starts pilot, the workloads with their sidecars, and a gateway
    /// sending paths under `prefix` to `host:port` (`gateway_route`).
    /// `services` are `(name, port)`; workloads select by `app: <service>`
    /// and listen on their service's port.
    pub async fn start(
        name: &str,
        services: &[(&'static str, u16)],
        workloads: &[Workload],
        gateway_route: (&str, &str, u16),
    ) -> LocalMesh {
        LocalMesh::start_with(name, services, workloads, gateway_route, Options::default()).await
    }

    /// [`LocalMesh::start`] with options.
    pub async fn start_with(
        name: &str,
        services: &[(&'static str, u16)],
        workloads: &[Workload],
        gateway_route: (&str, &str, u16),
        options: Options,
    ) -> LocalMesh {
        let dir = std::env::temp_dir().join(format!("mesh-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("config dir");
        let choice = if options.explicit {
            Err("this test asked for it".to_string())
        } else {
            use_namespaces()
        };
        let mut net = match choice {
            Ok(()) => {
                println!("e2e {name}: pods in network namespaces, transparent capture");
                let prefix = format!(
                    "m{}{}",
                    std::process::id() % 100_000,
                    &name[..name.len().min(4)]
                );
                Some(Network::new(&prefix))
            }
            Err(why) => {
                println!("e2e {name}: explicit mode on loopback ({why})");
                None
            }
        };
        let port_of = |svc: &str| services.iter().find(|(s, _)| *s == svc).map(|(_, p)| *p);
        let mut platform = String::new();
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for (i, (svc, port)) in services.iter().enumerate() {
            let cluster_ip = format!("10.96.0.{}", i + 10);
            platform.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}}}\n\
                 spec: {{clusterIP: {cluster_ip}, selector: {{app: {svc}}}, ports: [{{name: http, port: {port}, targetPort: http}}]}}\n---\n"
            ));
            hosts.push_str(&format!(
                "{cluster_ip} {svc} {svc}.default {svc}.default.svc.cluster.local\n"
            ));
        }
        let mut apps = BTreeMap::new();
        let pki = dir.with_extension("pki");
        let _ = std::fs::remove_dir_all(&pki);
        std::fs::create_dir_all(&pki).expect("pki dir");
        // Every proxy proves who it is to the CA with a bootstrap token.
        let mut tokens = String::new();
        let accounts = workloads
            .iter()
            .map(|w| (w.name.as_str(), service_account(w)))
            .chain([("ingressgateway", "ingressgateway".to_string())]);
        for (name, sa) in accounts {
            let token = format!("{name}-token-{}", std::process::id());
            std::fs::write(pki.join(format!("{name}.token")), &token).expect("token");
            tokens.push_str(&format!(
                "- {{namespace: default, serviceAccount: {sa}, token: {token}}}\n"
            ));
        }
        std::fs::write(pki.join("tokens.yaml"), tokens).expect("tokens");
        for w in workloads {
            let addr = match &mut net {
                Some(n) => SocketAddr::new(
                    n.pod(&w.name),
                    port_of(w.service).expect("the workload's service"),
                ),
                None => local(free_port()),
            };
            apps.insert(w.name.clone(), addr);
            platform.push_str(&match &net {
                // A sidecar stands in front of the app: other sidecars
                // talk mTLS to it.
                Some(_) => sidecar_entry(&w.name, w.service, w.version, &service_account(w), addr),
                // The endpoint is the app itself.
                None => entry(&w.name, w.service, w.version, addr),
            });
        }
        let gateway = match &mut net {
            Some(n) => SocketAddr::new(n.pod("gateway"), 8080),
            None => local(free_port()),
        };
        if let Some(n) = &net {
            for p in &n.pods {
                p.hosts(&hosts);
            }
        }
        write_atomic(&dir.join("platform.yaml"), &platform);
        write_atomic(
            &dir.join("gateway.yaml"),
            &gateway_yaml(gateway.port(), gateway_route, ""),
        );
        let (xds, http, ca_addr) = match &net {
            Some(_) => (
                SocketAddr::new(HUB.into(), 15010),
                SocketAddr::new(HUB.into(), 15014),
                SocketAddr::new(HUB.into(), 15012),
            ),
            None => (local(free_port()), local(free_port()), local(free_port())),
        };
        let pilot = PilotProcess::start_in(
            net.as_ref().map(|n| &n.hub),
            &dir,
            xds,
            http,
            &pilot_ca_args(&pki, ca_addr),
        );
        let mut mesh = LocalMesh {
            dir,
            pki,
            ca_addr,
            pilot: std::sync::Mutex::new(pilot),
            gateway,
            gateway_route: (
                gateway_route.0.to_string(),
                gateway_route.1.to_string(),
                gateway_route.2,
            ),
            procs: BTreeMap::new(),
            apps,
            app_probes: BTreeMap::new(),
            net,
            proxy_env: options.proxy_env,
        };
        mesh.wait_ready(http, "/ready", "pilot").await;
        let mut ready = Vec::new();
        for w in workloads {
            ready.push((w.name.clone(), mesh.run(w)));
        }
        ready.push((
            "ingressgateway".into(),
            mesh.proxy(
                "ingressgateway",
                "gateway",
                &[("mesh", "ingressgateway")],
                None,
            ),
        ));
        for (name, r) in ready {
            mesh.wait_ready(r, "/healthz/ready", &name).await;
        }
        if mesh.net.is_some() {
            // The app's readiness probe, rewritten by the injector, answers
            // through the sidecar's status port as the kubelet would see it.
            for w in workloads {
                let addr = SocketAddr::new(mesh.apps[&w.name].ip(), 15020);
                let path = mesh.app_probes[&w.name].clone();
                mesh.wait_ready(addr, &path, &w.name).await;
            }
        }
        mesh
    }

    async fn wait_ready(&self, addr: SocketAddr, path: &str, what: &str) {
        let p = path.to_string();
        let ok = self
            .within(move || async move {
                crate::eventually(Duration::from_secs(15), || async {
                    http_get(addr, &p).await.is_some()
                })
                .await
            })
            .await;
        assert!(ok, "{what} became ready ({addr}{path})");
    }

    /// Runs `f` where the mesh can be reached: on a thread in the hub
    /// namespace, or here.
    pub async fn within<T, Fut>(&self, f: impl FnOnce() -> Fut + Send + 'static) -> T
    where
        T: Send + 'static,
        Fut: Future<Output = T>,
    {
        match &self.net {
            None => f().await,
            Some(n) => n
                .hub
                .spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(f())
                })
                .await
                .expect("the hub thread"),
        }
    }

    /// Starts a workload's app and sidecar; returns the sidecar's
    /// readiness address.
    fn run(&mut self, w: &Workload) -> SocketAddr {
        let app_addr = self.apps[&w.name];
        let labels = [("app", w.service), ("version", w.version)];
        let (ready, explicit) = match &self.net {
            Some(_) => (self.proxy(&w.name, "sidecar", &labels, None), None),
            None => {
                let explicit = local(free_port());
                (
                    self.proxy(&w.name, "explicit", &labels, Some(explicit)),
                    Some(explicit),
                )
            }
        };
        let program = binary("mesh-sample");
        let program = program.to_str().expect("a UTF-8 path");
        let mut cmd = match &self.net {
            Some(n) => n.ns(&w.name).exec(program),
            None => Command::new(program),
        };
        cmd.arg(w.app)
            .args(["--version", w.version])
            .args(["--callme-url", "http://callme-service:8091"])
            .args(["--name", &w.name])
            .env_remove("HTTP_PROXY")
            .stdin(Stdio::null());
        match explicit {
            Some(p) => cmd
                .args(["--listen", &app_addr.to_string()])
                .args(["--proxy", &p.to_string()]),
            None => cmd.args(["--listen", &format!("0.0.0.0:{}", app_addr.port())]),
        };
        let app = cmd.spawn().expect("mesh-sample starts");
        self.procs
            .entry(w.name.clone())
            .or_default()
            .push(Proc(app));
        ready
    }

    /// Starts a `mesh-proxy` process in `mode` (`sidecar`, `explicit` on
    /// `explicit`, or `gateway`); returns its readiness address.
    fn proxy(
        &mut self,
        name: &str,
        mode: &str,
        labels: &[(&str, &str)],
        explicit: Option<SocketAddr>,
    ) -> SocketAddr {
        let program = binary("mesh-proxy");
        let program = program.to_str().expect("a UTF-8 path").to_string();
        let mut cmd;
        let ready;
        match &self.net {
            Some(n) => {
                // In its pod: defaults for every port, and for a sidecar
                // the capture rules first, as the init container does.
                let ns = n.ns(if mode == "gateway" { "gateway" } else { name });
                let pod_ip = if mode == "gateway" {
                    self.gateway.ip()
                } else {
                    self.apps[name].ip()
                };
                ready = SocketAddr::new(pod_ip, 15021);
                if mode == "sidecar" {
                    let pki = Pki {
                        root: self.root_cert(),
                        token: self.pki.join(format!("{name}.token")),
                    };
                    let (child, probe) = injected_sidecar(
                        ns,
                        &program,
                        name,
                        labels,
                        self.apps[name].port(),
                        &pki,
                        &self.proxy_env,
                    );
                    self.procs
                        .entry(name.to_string())
                        .or_default()
                        .push(Proc(child));
                    if let Some(p) = probe {
                        self.app_probes.insert(name.to_string(), p);
                    }
                    return ready;
                }
                cmd = ns.exec(&program);
                cmd.args(["--gateway-bind", "0.0.0.0"]);
            }
            None => {
                ready = local(free_port());
                cmd = Command::new(&program);
                cmd.args(["--admin-addr", &local(free_port()).to_string()])
                    .args(["--metrics-addr", &local(free_port()).to_string()])
                    .args(["--ready-addr", &ready.to_string()])
                    .args(["--inbound-addr", &local(free_port()).to_string()]);
                match explicit {
                    Some(addr) => cmd.args(["--explicit-addr", &addr.to_string()]),
                    None => cmd.args(["--gateway-bind", "127.0.0.1"]),
                };
            }
        }
        let account = match mode {
            "gateway" => "ingressgateway".to_string(),
            _ => labels
                .iter()
                .find(|(k, _)| *k == "app")
                .map(|(_, v)| v.to_string())
                .unwrap_or_else(|| name.to_string()),
        };
        let account = sample_account(name).unwrap_or(account);
        cmd.args(["--mode", mode])
            .args(["--service-account", &account])
            .args(["--ca-addr", &format!("https://{}", self.ca_addr)])
            .args(["--ca-root", &self.root_cert().display().to_string()])
            .args([
                "--token-file",
                &self.pki.join(format!("{name}.token")).display().to_string(),
            ])
            .args(["--xds", &self.pilot().xds.to_string()])
            .args(["--workload", name])
            .args(["--proxy-id", &format!("{name}.default")])
            .args(["--drain-timeout", "1s"])
            .env("MESH_LOG", "error")
            .envs(self.proxy_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        for (k, v) in labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        let child = cmd.spawn().expect("mesh-proxy starts");
        self.procs
            .entry(name.to_string())
            .or_default()
            .push(Proc(child));
        ready
    }

    /// An app of the test's own (answering `status` and its name) that the
    /// mesh's workloads can reach.
    pub async fn app(&self, name: &str, status: u16) -> App {
        serve_app(name, self.listener(0).await, status)
    }

    /// A listener of the test's own the mesh's workloads can reach: in the
    /// hub namespace (at [`HUB`]) or on loopback; `port` 0 for any.
    pub async fn listener(&self, port: u16) -> tokio::net::TcpListener {
        let listener = match &self.net {
            None => std::net::TcpListener::bind(("127.0.0.1", port)),
            Some(n) => n
                .hub
                .spawn(move || std::net::TcpListener::bind(SocketAddr::new(HUB.into(), port)))
                .await
                .expect("the hub thread"),
        }
        .expect("bind a listener");
        listener.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpListener::from_std(listener).expect("a tokio listener")
    }

    /// `n` GETs of `path` through the gateway, `concurrency` at a time.
    pub async fn requests(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        n: usize,
        concurrency: usize,
    ) -> Vec<Outcome> {
        let gateway = self.gateway;
        let path = path.to_string();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let done = Arc::new(AtomicUsize::new(0));
        self.within(move || requests(gateway, path, headers, n, concurrency, done))
            .await
    }

    /// As [`LocalMesh::requests`], counting answered requests in `done` as
    /// they come, so that a test can act once the load is under way.
    pub async fn requests_counted(
        &self,
        path: &str,
        n: usize,
        concurrency: usize,
        done: Arc<AtomicUsize>,
    ) -> Vec<Outcome> {
        let gateway = self.gateway;
        let path = path.to_string();
        self.within(move || requests(gateway, path, Vec::new(), n, concurrency, done))
            .await
    }

    /// Rewrites the gateway's route with more fields (`timeout: 300ms`).
    pub fn gateway_route(&self, extra: &str) {
        let (p, h, port) = &self.gateway_route;
        self.write(
            "gateway.yaml",
            &gateway_yaml(self.gateway.port(), (p, h, *port), extra),
        );
    }

    /// Writes (or replaces) a config file pilot reads.
    pub fn write(&self, file: &str, yaml: &str) {
        write_atomic(&self.dir.join(file), yaml);
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.dir.join(file));
    }

    /// SIGKILLs a workload's app and sidecar.
    pub fn kill(&mut self, workload: &str) {
        self.procs.remove(workload);
    }

    fn pilot(&self) -> std::sync::MutexGuard<'_, PilotProcess> {
        self.pilot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether workloads are pods in network namespaces (with transparent
    /// capture and a sidecar in front of every app).
    pub fn namespaced(&self) -> bool {
        self.net.is_some()
    }

    /// A plaintext GET of `path` straight to a workload's address, from
    /// outside the mesh: `None` unless it is answered with 200.
    pub async fn direct_get(&self, workload: &str, path: &str) -> Option<String> {
        let addr = self.apps[workload];
        let path = path.to_string();
        self.within(move || async move { http_get(addr, &path).await })
            .await
    }

    /// A pod's sidecar metrics (namespace variant: its port 15020).
    pub async fn sidecar_metrics(&self, workload: &str) -> Option<String> {
        let addr = SocketAddr::new(self.apps[workload].ip(), 15020);
        self.within(move || async move { http_get(addr, "/stats/prometheus").await })
            .await
    }

    /// GET a path of pilot's HTTP port (15014); the body, if 200.
    pub async fn pilot_get(&self, path: &str) -> Option<String> {
        let addr = self.pilot().http;
        let path = path.to_string();
        self.within(move || async move { http_get(addr, &path).await })
            .await
    }

    /// The mesh's root certificate (the CA writes it at start).
    fn root_cert(&self) -> PathBuf {
        self.pki.join("ca").join("root-cert.pem")
    }

    /// SIGKILLs pilot.
    pub fn kill_pilot(&self) {
        self.pilot().kill();
    }

    /// Starts pilot again on the same addresses; waits until it is ready.
    pub async fn restart_pilot(&self) {
        let (xds, http) = {
            let p = self.pilot();
            (p.xds, p.http)
        };
        let started = PilotProcess::start_in(
            self.net.as_ref().map(|n| &n.hub),
            &self.dir,
            xds,
            http,
            &pilot_ca_args(&self.pki, self.ca_addr),
        );
        *self.pilot() = started;
        self.wait_ready(http, "/ready", "pilot").await;
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        self.procs.clear();
        self.pilot().kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.pki);
    }
}

/// pilot's CA: its directory (a root is made there at first start), the
/// secure port and the proxies' bootstrap tokens.
fn pilot_ca_args(pki: &Path, addr: SocketAddr) -> Vec<String> {
    vec![
        "--ca-dir".into(),
        pki.join("ca").display().to_string(),
        "--secure-addr".into(),
        addr.to_string(),
        "--bootstrap-tokens".into(),
        pki.join("tokens.yaml").display().to_string(),
        "--tls-name".into(),
        addr.ip().to_string(),
    ]
}

/// A workload's service account: its sample Deployment's, else its
/// service's name.
fn service_account(w: &Workload) -> String {
    sample_account(&w.name).unwrap_or_else(|| w.service.to_string())
}

/// The service account of the bookinfo sample's Deployment `name`.
fn sample_account(name: &str) -> Option<String> {
    sample_template(name)?["spec"]["serviceAccountName"]
        .as_str()
        .map(str::to_string)
}

async fn requests(
    gateway: SocketAddr,
    path: String,
    headers: Vec<(String, String)>,
    n: usize,
    concurrency: usize,
    done: Arc<AtomicUsize>,
) -> Vec<Outcome> {
    let c = client();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, headers, next, path, done) = (
            c.clone(),
            headers.clone(),
            next.clone(),
            path.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let mut req = hyper::Request::get(format!("http://{gateway}{path}"));
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                let start = Instant::now();
                let resp = c
                    .request(req.body(Full::new(Bytes::new())).expect("request"))
                    .await;
                out.push(match resp {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.into_body().collect().await.map(|b| b.to_bytes());
                        Outcome {
                            status,
                            body: String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
                            took: start.elapsed(),
                        }
                    }
                    Err(e) => Outcome {
                        status: 0,
                        body: e.to_string(),
                        took: start.elapsed(),
                    },
                });
                done.fetch_add(1, Ordering::Relaxed);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("request task"));
    }
    all
}

/// Runs a pod's sidecar from its injected spec, as the kubelet would: the
/// injector's init container (`mesh-proxy init …`, the capture rules), then
/// the sidecar with the injected args, env and user. What is injected is
/// what runs.
/// Where a pod's mounted root certificate and CA token are, on this
/// machine.
struct Pki {
    root: PathBuf,
    token: PathBuf,
}

fn injected_sidecar(
    ns: &crate::netns::Netns,
    program: &str,
    name: &str,
    labels: &[(&str, &str)],
    port: u16,
    pki: &Pki,
    extra_env: &[(String, String)],
) -> (Child, Option<String>) {
    use k8s_openapi::api::core::v1::Pod;
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let service = labels.get("app").copied().unwrap_or(name);
    // The sample's own pod template when it has a Deployment of this name
    // (bookinfo), else a pod like it.
    let template = sample_template(name);
    let pod: Pod = match template {
        Some(mut t) => {
            t["metadata"]["name"] = name.into();
            t["metadata"]["namespace"] = "default".into();
            serde_json::from_value(t).expect("the sample's pod template")
        }
        None => serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {
                "serviceAccountName": service,
                "containers": [{
                    "name": "app",
                    "image": "mesh/examples",
                    "ports": [{"name": "http", "containerPort": port}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
                }],
            },
        }))
        .expect("a pod"),
    };
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let settings = mesh_injector::Settings {
        pilot_address: format!("https://{HUB}:15012"),
        ca_address: format!("{HUB}:15012"),
        log_level: "error".into(),
        ..Default::default()
    };
    let (_, spec) = mesh_injector::inject(
        &pod.metadata,
        pod.spec.as_ref().expect("spec"),
        &settings,
        mesh_injector::Cluster { minor: 29 },
    )
    .expect("injection");
    let inits = spec.init_containers.unwrap_or_default();
    let container = |n: &str| {
        inits
            .iter()
            .find(|c| c.name == n)
            .unwrap_or_else(|| panic!("no {n} injected"))
            .clone()
    };
    let argv = |c: &k8s_openapi::api::core::v1::Container| -> Vec<String> {
        let mut v: Vec<String> = c.command.clone().unwrap_or_default();
        v.extend(c.args.clone().unwrap_or_default());
        assert_eq!(v.first().map(String::as_str), Some("mesh-proxy"), "{v:?}");
        v.remove(0);
        v
    };
    let init = container(mesh_injector::INIT_NAME);
    let out = ns
        .exec(program)
        .args(argv(&init))
        .output()
        .expect("the init container runs");
    assert!(
        out.status.success(),
        "{}: {}",
        argv(&init).join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy = container(mesh_injector::PROXY_NAME);
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let sc = proxy.security_context.clone().expect("a security context");
    let mut cmd = ns.exec("setpriv");
    cmd.arg(format!("--reuid={}", sc.run_as_user.expect("runAsUser")))
        .arg(format!("--regid={}", sc.run_as_group.expect("runAsGroup")))
        .args(["--clear-groups", program])
        .args(argv(&proxy))
        .stdin(Stdio::null());
    for e in proxy.env.iter().flatten() {
        let value = match (
            &e.value,
            e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()),
        ) {
            (Some(v), _) => v.clone(),
            (None, Some(f)) => match f.field_path.as_str() {
                "metadata.name" => name.to_string(),
                "metadata.namespace" => "default".to_string(),
                "spec.serviceAccountName" => account.clone(),
                other => panic!("the test does not know the field {other}"),
            },
            (None, None) => panic!("env {} has no value", e.name),
        };
        cmd.env(&e.name, value);
    }
    // The kubelet's mounts: the root ConfigMap and the projected token.
    cmd.env("MESH_CA_ROOT", &pki.root)
        .env("MESH_TOKEN_FILE", &pki.token)
        .envs(extra_env.iter().map(|(k, v)| (k, v)));
    let probe = spec
        .containers
        .first()
        .and_then(|c| c.readiness_probe.as_ref())
        .and_then(|p| p.http_get.as_ref())
        .and_then(|g| g.path.clone())
        .filter(|p| p.starts_with("/app-health/"));
    (cmd.spawn().expect("the sidecar starts"), probe)
}

/// The pod template of the bookinfo sample's Deployment `name`, if any.
fn sample_template(name: &str) -> Option<serde_json::Value> {
    let text = include_str!("../../samples/bookinfo/platform/bookinfo.yaml");
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).ok())
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == name)
        .map(|d| d["spec"]["template"].clone())
}

/// The Gateway on `port` and its VirtualService sending `prefix` to
/// `host:host_port`, with `extra` fields on the route.
fn gateway_yaml(port: u16, (prefix, host, host_port): (&str, &str, u16), extra: &str) -> String {
    format!(
        "apiVersion: networking.mesh.dev/v1\nkind: Gateway\nmetadata: {{name: gw}}\n\
         spec:\n  selector: {{mesh: ingressgateway}}\n  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ['*']}}]\n---\n\
         apiVersion: networking.mesh.dev/v1\nkind: VirtualService\nmetadata: {{name: gw}}\n\
         spec:\n  hosts: ['*']\n  gateways: [gw]\n  http: [{{match: [{{uri: {{prefix: {prefix}}}}}], route: [{{destination: {{host: {host}, port: {{number: {host_port}}}}}}}]{extra}}}]\n"
    )
}

/// A WorkloadEntry for an app (without a sidecar) listening on `addr`,
/// selected by `service`.
pub fn entry(name: &str, service: &str, version: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.mesh.dev/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\n\
         spec: {{address: '{}', ports: {{http: {}}}, labels: {{app: {service}, version: {version}}}, serviceAccount: {service}}}\n---\n",
        addr.ip(),
        addr.port()
    )
}

/// A WorkloadEntry for a pod whose sidecar runs as `account`.
fn sidecar_entry(
    name: &str,
    service: &str,
    version: &str,
    account: &str,
    addr: SocketAddr,
) -> String {
    format!(
        "apiVersion: networking.mesh.dev/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\n\
         spec: {{address: '{}', ports: {{http: {}}}, labels: {{app: {service}, version: {version}, security.mesh.dev/tlsMode: mesh}}, serviceAccount: {account}}}\n---\n",
        addr.ip(),
        addr.port()
    )
}

//! A mesh of real binaries on loopback: `mesh-pilot` reading a config
//! directory, each workload a `mesh-sample` process with a `mesh-proxy`
//! sidecar process in explicit mode (the app sends its calls to the
//! sidecar as an HTTP proxy), and a `mesh-proxy` ingress gateway.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{PilotProcess, binary, eventually, free_port_on, http_get};

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

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct LocalMesh {
    pub dir: PathBuf,
    pub pilot: PilotProcess,
    /// The ingress gateway's listener (its Gateway's port on 127.0.0.1).
    pub gateway: SocketAddr,
    gateway_route: (String, String, u16),
    procs: BTreeMap<String, Vec<Proc>>,
    /// Each workload's app address.
    pub apps: BTreeMap<String, SocketAddr>,
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

impl LocalMesh {
    /// Starts pilot, the workloads with their sidecars, and a gateway
    /// exposing `gateway_host_port` (`caller-service:8090`) on every path
    /// under `prefix`. `services` are `(name, port)`; workloads select
    /// by `app: <service>`.
    pub async fn start(
        name: &str,
        services: &[(&str, u16)],
        workloads: &[Workload],
        gateway_route: (&str, &str, u16),
    ) -> LocalMesh {
        let dir = std::env::temp_dir().join(format!("mesh-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("config dir");
        let gateway = local(free_port());
        let mut platform = String::new();
        for (svc, port) in services {
            platform.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}}}\n\
                 spec: {{selector: {{app: {svc}}}, ports: [{{name: http, port: {port}, targetPort: http}}]}}\n---\n"
            ));
        }
        let mut apps = BTreeMap::new();
        for w in workloads {
            let addr = local(free_port());
            apps.insert(w.name.clone(), addr);
            platform.push_str(&entry(&w.name, w.service, w.version, addr));
        }
        write_atomic(&dir.join("platform.yaml"), &platform);
        write_atomic(
            &dir.join("gateway.yaml"),
            &gateway_yaml(gateway.port(), gateway_route, ""),
        );
        let (xds, http) = (local(free_port()), local(free_port()));
        let pilot = PilotProcess::start(&dir, xds, http);
        assert!(
            eventually(Duration::from_secs(10), || async {
                http_get(http, "/ready").await.is_some()
            })
            .await,
            "pilot became ready"
        );
        let mut mesh = LocalMesh {
            dir,
            pilot,
            gateway,
            gateway_route: (
                gateway_route.0.to_string(),
                gateway_route.1.to_string(),
                gateway_route.2,
            ),
            procs: BTreeMap::new(),
            apps,
        };
        let mut ready = Vec::new();
        for w in workloads {
            ready.push(mesh.run(w));
        }
        ready.push(mesh.proxy("ingressgateway", &[("mesh", "ingressgateway")], None));
        for r in ready {
            assert!(
                eventually(Duration::from_secs(15), || async {
                    http_get(r, "/healthz/ready").await.is_some()
                })
                .await,
                "a proxy became ready ({r})"
            );
        }
        let gw = mesh.gateway;
        assert!(
            eventually(Duration::from_secs(10), || async {
                tokio::net::TcpStream::connect(gw).await.is_ok()
            })
            .await,
            "the gateway listens on {gw}"
        );
        mesh
    }

    /// Starts a workload's app and sidecar; returns the sidecar's
    /// readiness address.
    fn run(&mut self, w: &Workload) -> SocketAddr {
        let explicit = local(free_port());
        let ready = self.proxy(
            &w.name,
            &[("app", w.service), ("version", w.version)],
            Some(explicit),
        );
        let app = Command::new(binary("mesh-sample"))
            .arg(w.app)
            .args(["--version", w.version])
            .args(["--listen", &self.apps[&w.name].to_string()])
            .args(["--proxy", &explicit.to_string()])
            .args(["--callme-url", "http://callme-service:8091"])
            .args(["--name", &w.name])
            .stdin(Stdio::null())
            .spawn()
            .expect("mesh-sample starts");
        self.procs
            .entry(w.name.clone())
            .or_default()
            .push(Proc(app));
        ready
    }

    /// Starts a `mesh-proxy` process: a sidecar in explicit mode listening
    /// on `explicit`, or without it the ingress gateway.
    fn proxy(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        explicit: Option<SocketAddr>,
    ) -> SocketAddr {
        let ready = local(free_port());
        let mut cmd = Command::new(binary("mesh-proxy"));
        cmd.args(["--xds", &self.pilot.xds.to_string()])
            .args(["--workload", name])
            .args(["--proxy-id", &format!("{name}.default")])
            .args(["--admin-addr", &local(free_port()).to_string()])
            .args(["--metrics-addr", &local(free_port()).to_string()])
            .args(["--ready-addr", &ready.to_string()])
            .args(["--drain-timeout", "1s"])
            .env("MESH_LOG", "warn")
            .stdin(Stdio::null());
        for (k, v) in labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        match explicit {
            Some(addr) => cmd
                .args(["--mode", "explicit"])
                .args(["--explicit-addr", &addr.to_string()])
                .args(["--inbound-addr", &local(free_port()).to_string()]),
            None => cmd.args(["--mode", "gateway", "--gateway-bind", "127.0.0.1"]),
        };
        let child = cmd.spawn().expect("mesh-proxy starts");
        self.procs
            .entry(name.to_string())
            .or_default()
            .push(Proc(child));
        ready
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
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        self.procs.clear();
        self.pilot.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

/// A WorkloadEntry for an app listening on `addr`, selected by `service`.
pub fn entry(name: &str, service: &str, version: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.mesh.dev/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\n\
         spec: {{address: '{}', ports: {{http: {}}}, labels: {{app: {service}, version: {version}}}, serviceAccount: {service}}}\n---\n",
        addr.ip(),
        addr.port()
    )
}

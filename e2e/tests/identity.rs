//! Workload identity over real sockets: pilot's CA on its TLS port, a
//! proxy's identity client with a bootstrap token. Certificates name only
//! the caller's SPIFFE ID; another account's CSR or a bad token is refused;
//! certificates renew before expiry; with the CA gone the current one keeps
//! serving until it expires, and then there is none. The same TLS port
//! serves config: a proxy takes it from there after checking pilot's
//! certificate, and a proxy that cannot verify pilot gets none (and never
//! tries plaintext).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mesh_e2e::eventually;
use mesh_pilot::ca::{BootstrapTokens, Ca};
use mesh_proxy::identity::{self, Certs, Settings};

const REVIEWS_TOKEN: &str = "reviews-0123456789abcdef";
const RATINGS_TOKEN: &str = "ratings-0123456789abcdef";

struct Fixture {
    dir: PathBuf,
    pilot: Option<mesh_pilot::Running>,
    ca_addr: String,
    root: PathBuf,
}

async fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("mesh-identity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut tokens = BootstrapTokens::default();
    tokens.insert(REVIEWS_TOKEN.into(), "default", "reviews");
    tokens.insert(RATINGS_TOKEN.into(), "default", "ratings");
    let secure = mesh_e2e::secure_pilot(&dir, tokens).await;
    for (n, t) in [
        ("reviews", REVIEWS_TOKEN),
        ("ratings", RATINGS_TOKEN),
        ("bad", "not-a-known-token-at-all"),
    ] {
        std::fs::write(dir.join(format!("{n}.token")), t).unwrap();
    }
    Fixture {
        ca_addr: secure.ca_addr,
        root: secure.root,
        pilot: secure.pilot,
        dir,
    }
}

impl Fixture {
    fn settings(&self, sa: &str, token: &str, ttl: Option<Duration>) -> Settings {
        Settings {
            ca_addr: self.ca_addr.clone(),
            ca_root: self.root.clone(),
            ca_name: None,
            token_file: self.dir.join(format!("{token}.token")),
            trust_domain: "cluster.local".into(),
            namespace: "default".into(),
            service_account: sa.into(),
            ttl,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_name_only_the_callers_identity() {
    let f = fixture("issue").await;
    let id = identity::fetch(&f.settings("reviews", "reviews", None))
        .await
        .unwrap();
    assert_eq!(id.spiffe_id, "spiffe://cluster.local/ns/default/sa/reviews");
    assert_eq!(id.roots.concat(), std::fs::read_to_string(&f.root).unwrap());
    // The chain verifies against the root.
    let (_, leaf) = x509_parser::pem::parse_x509_pem(id.cert_chain[0].as_bytes()).unwrap();
    let (_, root) = x509_parser::pem::parse_x509_pem(id.roots[0].as_bytes()).unwrap();
    let root = root.parse_x509().unwrap();
    leaf.parse_x509()
        .unwrap()
        .verify_signature(Some(root.public_key()))
        .unwrap();
    assert!(id.not_after - id.not_before >= 3600);

    // The reviews token asking for ratings' identity.
    let e = identity::fetch(&f.settings("ratings", "reviews", None))
        .await
        .unwrap_err();
    assert!(e.starts_with("PermissionDenied"), "{e}");
    assert!(
        e.contains("spiffe://cluster.local/ns/default/sa/ratings"),
        "{e}"
    );
    // An unknown token.
    let e = identity::fetch(&f.settings("reviews", "bad", None))
        .await
        .unwrap_err();
    assert!(e.starts_with("Unauthenticated"), "{e}");
    // A CA whose certificate the proxy does not trust.
    let other = Ca::load_or_create(
        &f.dir.join("other-ca"),
        "cluster.local",
        Duration::from_secs(60),
    )
    .unwrap();
    let untrusted = f.dir.join("other-root.pem");
    std::fs::write(&untrusted, other.roots().concat()).unwrap();
    let mut s = f.settings("reviews", "reviews", None);
    s.ca_root = untrusted;
    assert!(identity::fetch(&s).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_and_outlive_the_ca_until_expiry() {
    let mut f = fixture("renew").await;
    let certs = Arc::new(Certs::default());
    let task = tokio::spawn(identity::run(
        certs.clone(),
        f.settings("reviews", "reviews", Some(Duration::from_secs(3))),
    ));
    assert!(
        eventually(Duration::from_secs(10), || async {
            certs.issued.load(Ordering::Relaxed) >= 3
        })
        .await,
        "renewed at half-life"
    );
    let serial = certs.current().unwrap().serial.clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            certs.current().is_some_and(|c| c.serial != serial)
        })
        .await
    );
    // The CA goes away: the current certificate keeps serving…
    f.pilot.take();
    let last = certs.current().expect("a certificate while the CA is gone");
    let failures = certs.failures.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(5), || async {
            certs.failures.load(Ordering::Relaxed) > failures
        })
        .await,
        "renewal tried and failed"
    );
    assert_eq!(
        certs.current().map(|c| c.serial.clone()),
        Some(last.serial.clone())
    );
    // …until it expires: then there is none.
    assert!(
        eventually(Duration::from_secs(5), || async {
            certs.current().is_none()
        })
        .await,
        "no identity after expiry"
    );
    task.abort();
}

/// A Service `callme` whose one endpoint is `app` (on 127.0.0.1).
fn callme(f: &Fixture, app: SocketAddr) {
    let yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: callme}}
spec:
  selector: {{app: callme}}
  ports: [{{name: http, port: 8080, targetPort: {}}}]
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {{name: callme}}
spec: {{address: 127.0.0.1, labels: {{app: callme}}, serviceAccount: callme}}
"#,
        app.port()
    );
    let path = f.dir.join("config").join("callme.yaml");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

fn local_port() -> SocketAddr {
    let ip = "127.0.0.1".parse().unwrap();
    SocketAddr::new(ip, mesh_e2e::free_port_on(&[ip]))
}

/// `mesh-proxy` in explicit mode as the `reviews` workload, taking its
/// config from `xds` with `root` as the mesh's roots; with `ca`, also its
/// certificate from the fixture's CA. Killed when dropped.
struct ProxyProcess {
    child: tokio::process::Child,
    explicit: SocketAddr,
    admin: SocketAddr,
    ready: SocketAddr,
}

fn mesh_proxy(f: &Fixture, xds: &str, root: &Path, ca: bool) -> ProxyProcess {
    let (explicit, admin, ready) = (local_port(), local_port(), local_port());
    let mut cmd = tokio::process::Command::new(mesh_e2e::binary("mesh-proxy"));
    cmd.args(["--mode", "explicit", "--xds", xds])
        .args(["--workload", "reviews", "--service-account", "reviews"])
        .args(["--label", "app=reviews"])
        .arg("--ca-root")
        .arg(root)
        .args(["--explicit-addr", &explicit.to_string()])
        .args(["--inbound-addr", &local_port().to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--metrics-addr", &local_port().to_string()])
        .args(["--ready-addr", &ready.to_string()])
        .env("MESH_LOG", "warn")
        .env("NO_COLOR", "1")
        .env_remove("MESH_XDS_ADDR")
        .env_remove("MESH_CA_ADDR")
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if ca {
        cmd.args(["--ca-addr", &f.ca_addr])
            .arg("--token-file")
            .arg(f.dir.join("reviews.token"));
    }
    ProxyProcess {
        child: cmd.spawn().expect("mesh-proxy starts"),
        explicit,
        admin,
        ready,
    }
}

impl ProxyProcess {
    /// The proxy's answer to `GET http://callme:8080/`, once it listens.
    async fn call(&self) -> mesh_e2e::Got {
        let c = mesh_e2e::client();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match mesh_e2e::get(&c, self.explicit, "callme:8080", "/").await {
                Ok(got) => return got,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("the proxy does not listen on {}: {e}", self.explicit)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Reads the proxy's log until a line containing `needle` (bounded).
    async fn log_line(&mut self, needle: &str) -> Option<String> {
        use tokio::io::AsyncBufReadExt;
        let out = self.child.stdout.take()?;
        let mut lines = tokio::io::BufReader::new(out).lines();
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_takes_its_certificate_and_config_from_pilots_tls_port_and_serves() {
    let f = fixture("xds-tls").await;
    let app = mesh_e2e::app("callme", "127.0.0.1".parse().unwrap(), 0).await;
    callme(&f, app.addr);
    // The proxy knows only pilot's TLS port, for the CA and for config.
    assert!(f.ca_addr.starts_with("https://"), "{}", f.ca_addr);
    let proxy = mesh_proxy(&f, &f.ca_addr, &f.root, true);
    assert!(
        eventually(Duration::from_secs(10), || async {
            mesh_e2e::http_get(proxy.ready, "/healthz/ready")
                .await
                .is_some()
        })
        .await,
        "the proxy has a certificate and config"
    );
    let got = proxy.call().await;
    assert_eq!((got.status, got.body.as_str()), (200, "callme"), "{got:?}");
    assert_eq!(app.hits(), 1);
    // A change made later is pushed over the same TLS stream.
    let moved = mesh_e2e::app("callme", "127.0.0.1".parse().unwrap(), 0).await;
    callme(&f, moved.addr);
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.call().await;
            moved.hits() > 0
        })
        .await,
        "the endpoint change reached the proxy"
    );
    let certs = mesh_e2e::http_get(proxy.admin, "/certs").await;
    assert!(
        certs
            .as_deref()
            .is_some_and(|c| c.contains("spiffe://cluster.local/ns/default/sa/reviews")),
        "{certs:?}"
    );
    // Pilot counts the proxy in sync.
    let status = f.pilot.as_ref().unwrap().http_addr;
    assert!(
        eventually(Duration::from_secs(5), || async {
            mesh_e2e::http_get(status, "/debug/syncz")
                .await
                .is_some_and(|b| {
                    b.contains("default/reviews")
                        && b.contains("callme:8080")
                        && b.contains("\"state\":\"SYNCED\"")
                })
        })
        .await,
        "{:?}",
        mesh_e2e::http_get(status, "/debug/syncz").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_cannot_verify_pilot_takes_no_config_and_answers_503() {
    let f = fixture("xds-untrusted").await;
    let app = mesh_e2e::app("callme", "127.0.0.1".parse().unwrap(), 0).await;
    callme(&f, app.addr);
    let other = Ca::load_or_create(
        &f.dir.join("other-ca"),
        "cluster.local",
        Duration::from_secs(60),
    )
    .unwrap();
    let untrusted = f.dir.join("other-root.pem");
    std::fs::write(&untrusted, other.roots().concat()).unwrap();
    let mut proxy = mesh_proxy(&f, &f.ca_addr, &untrusted, false);
    let refused = proxy.log_line("pilot unreachable").await;
    assert!(
        refused
            .as_deref()
            .is_some_and(|l| l.contains("invalid peer certificate")),
        "{refused:?}"
    );
    let got = proxy.call().await;
    assert_eq!(
        (got.status, got.reason.as_str()),
        (503, "no config from control plane"),
        "{got:?}"
    );
    assert_eq!(app.hits(), 0);
    let status = f.pilot.as_ref().unwrap().http_addr;
    let sync = mesh_e2e::http_get(status, "/debug/syncz").await;
    assert!(
        sync.as_deref()
            .is_some_and(|b| !b.contains("default/reviews")),
        "pilot never served it: {sync:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_pilot_never_falls_back_to_plaintext() {
    let f = fixture("xds-no-downgrade").await;
    let app = mesh_e2e::app("callme", "127.0.0.1".parse().unwrap(), 0).await;
    callme(&f, app.addr);
    let plaintext = f.pilot.as_ref().unwrap().xds_addr;
    // Pilot's plaintext port serves a plaintext client…
    let plain = mesh_e2e::sidecar(plaintext, "caller", &[("app", "caller")]).await;
    assert!(mesh_e2e::ready(&plain).await, "the plaintext port serves");
    // …but a proxy told to use TLS there gets nothing, and says so.
    let proxy = Arc::new(
        mesh_proxy::start(
            Arc::new(mesh_proxy::Proxy::new(Vec::new())),
            mesh_proxy::Addrs {
                outbound: None,
                inbound: None,
                explicit: Some("127.0.0.1:0".parse().unwrap()),
                gateway_bind: None,
                admin: None,
                metrics: None,
                ready: None,
            },
            mesh_proxy::ConnSettings::default(),
            None,
        )
        .await
        .unwrap(),
    );
    let client = mesh_proxy::follow_pilot_tls(
        &proxy,
        mesh_proxy::xds::Settings {
            addr: format!("https://{plaintext}"),
            node: mesh_api::discovery::Node {
                id: "reviews-tls.default".into(),
                workload: "reviews".into(),
                namespace: "default".into(),
                service_account: "reviews".into(),
                mode: "explicit".into(),
                ..Default::default()
            },
            demand_timeout: Duration::from_secs(1),
            backoff: (Duration::from_millis(20), Duration::from_millis(100)),
        },
        identity::PilotTls {
            root: f.root.clone(),
            name: None,
        },
    );
    assert!(
        eventually(Duration::from_secs(10), || async { client.failures() >= 3 }).await,
        "the proxy kept trying TLS"
    );
    assert!(!client.connected());
    println!("TLS to the plaintext port: {:?}", client.last_error());
    let got = mesh_e2e::get(
        &mesh_e2e::client(),
        proxy.explicit.unwrap(),
        "callme:8080",
        "/",
    )
    .await
    .unwrap();
    assert_eq!(
        (got.status, got.reason.as_str()),
        (503, "no config from control plane"),
        "{got:?}"
    );
    assert_eq!(app.hits(), 0);
    let status = f.pilot.as_ref().unwrap().http_addr;
    let sync = mesh_e2e::http_get(status, "/debug/syncz").await;
    assert!(
        sync.as_deref()
            .is_some_and(|b| b.contains("default/caller") && !b.contains("default/reviews")),
        "{sync:?}"
    );
}

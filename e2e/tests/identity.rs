//! Workload identity over real sockets: pilot's CA on its TLS port, a
//! proxy's identity client with a bootstrap token. Certificates name only
//! the caller's SPIFFE ID; another account's CSR or a bad token is refused;
//! certificates renew before expiry; with the CA gone the current one keeps
//! serving until it expires, and then there is none.

use std::path::PathBuf;
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

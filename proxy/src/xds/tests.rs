use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::*;
use crate::identity::Identity;

fn node() -> wire::Node {
    wire::Node {
        id: "caller-0.default".into(),
        workload: "caller".into(),
        namespace: "default".into(),
        ..Default::default()
    }
}

fn settings(addr: &str) -> Settings {
    Settings {
        addr: addr.into(),
        node: node(),
        demand_timeout: Duration::from_secs(1),
        backoff: (Duration::from_millis(10), Duration::from_millis(20)),
    }
}

#[test]
fn a_reconnect_declares_the_clusters_held_before_the_destinations_that_route_to_them() {
    let mut have = Held {
        workload: Some(("w1".into(), WorkloadResource::default())),
        ..Default::default()
    };
    have.destinations.insert(
        "callme:8080".into(),
        ("d1".into(), DestinationConfig::default()),
    );
    have.clusters.insert(
        "outbound|8080|v1|callme.default.svc.cluster.local".into(),
        ("c1".into(), Cluster::default()),
    );
    let reqs = hello(&node(), &have, vec!["callme:8080".into()]);
    let types: Vec<&str> = reqs.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, [WORKLOAD, CLUSTER, DESTINATION]);
    // Only the first carries the node; it subscribes to the workload.
    assert_eq!(reqs[0].node, Some(node()));
    assert!(reqs[1].node.is_none() && reqs[2].node.is_none());
    assert_eq!(reqs[0].resource_names_subscribe, ["default/caller"]);
    assert_eq!(
        reqs[0].initial_resource_versions,
        HashMap::from([("default/caller".to_string(), "w1".to_string())])
    );
    // The clusters: versions only (clusters are not subscribed by name).
    assert!(reqs[1].resource_names_subscribe.is_empty());
    assert_eq!(
        reqs[1].initial_resource_versions,
        HashMap::from([(
            "outbound|8080|v1|callme.default.svc.cluster.local".to_string(),
            "c1".to_string()
        )])
    );
    assert_eq!(reqs[2].resource_names_subscribe, ["callme:8080"]);
    assert_eq!(
        reqs[2].initial_resource_versions,
        HashMap::from([("callme:8080".to_string(), "d1".to_string())])
    );
}

#[test]
fn a_first_connection_declares_nothing_held() {
    let reqs = hello(&node(), &Held::default(), Vec::new());
    assert!(reqs.iter().all(|r| r.initial_resource_versions.is_empty()));
    assert_eq!(reqs[0].resource_names_subscribe, ["default/caller"]);
}

#[test]
fn the_scheme_of_the_address_decides_tls() {
    assert_eq!(
        parse_addr("https://mesh-pilot.mesh-system.svc:15012"),
        Ok(("https://mesh-pilot.mesh-system.svc:15012".into(), true))
    );
    assert_eq!(
        parse_addr("http://127.0.0.1:15010"),
        Ok(("http://127.0.0.1:15010".into(), false))
    );
    // A bare address is the plaintext port, as before.
    assert_eq!(
        parse_addr("127.0.0.1:15010"),
        Ok(("http://127.0.0.1:15010".into(), false))
    );
    for bad in [
        "grpc://pilot:15012",
        "https://pilot",
        "pilot",
        "https://:15012",
        "",
    ] {
        assert!(parse_addr(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn an_https_address_without_roots_is_refused_rather_than_sent_in_plaintext() {
    let client = Client::new(settings("https://127.0.0.1:15012"));
    let e = client.endpoint(&Certs::default()).unwrap_err();
    assert!(e.contains("TLS needs the mesh's roots"), "{e}");
    // And TLS settings never make a plaintext address work.
    let dir = temp_dir("http-with-tls");
    let pki = Pki::new();
    let tls = PilotTls {
        root: pki.write_root(&dir),
        name: None,
    };
    let client = Client::with_tls(settings("http://127.0.0.1:15010"), tls);
    let e = client.endpoint(&Certs::default()).unwrap_err();
    assert!(e.contains("https://"), "{e}");
}

#[test]
fn the_roots_file_must_hold_a_certificate() {
    let dir = temp_dir("roots");
    let missing = PilotTls {
        root: dir.join("missing.pem"),
        name: None,
    };
    assert!(missing.read_roots().unwrap_err().contains("missing.pem"));
    std::fs::write(dir.join("empty.pem"), "not a certificate\n").unwrap();
    let empty = PilotTls {
        root: dir.join("empty.pem"),
        name: None,
    };
    assert!(
        empty.read_roots().unwrap_err().contains("no certificate"),
        "{:?}",
        empty.read_roots()
    );
}

/// A CA, a serving certificate for `localhost` and a workload
/// certificate, all from it.
struct Pki {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        Pki {
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn write_root(&self, dir: &std::path::Path) -> PathBuf {
        let path = dir.join("root-cert.pem");
        std::fs::write(&path, &self.root_pem).unwrap();
        path
    }

    /// (chain PEM, key PEM) for `sans`.
    fn issue(&self, sans: Vec<SanType>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn workload(&self, spiffe_id: &str) -> Identity {
        let (chain, key) = self.issue(vec![SanType::URI(spiffe_id.try_into().unwrap())]);
        let roots = vec![self.root_pem.clone()];
        let material =
            crate::tls::Material::new(std::slice::from_ref(&chain), &key, &roots).unwrap();
        Identity {
            spiffe_id: spiffe_id.into(),
            cert_chain: vec![chain],
            key_pem: key,
            roots,
            serial: "01".into(),
            not_before: 0,
            not_after: u64::MAX,
            material: Arc::new(material),
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-proxy-xds-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TLS server standing in for pilot's 15012 (its certificate names
/// `localhost` and 127.0.0.1), asking for (not requiring) a client
/// certificate from `pki`. Answers with the client certificate
/// seen on each handshake (`None`: none offered), or the handshake error.
async fn pilot_port(pki: &Pki) -> (String, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let (chain, key) = pki.issue(vec![
        SanType::DnsName("localhost".try_into().unwrap()),
        SanType::IpAddress([127, 0, 0, 1].into()),
    ]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.root_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = match acceptor.accept(tcp).await {
                Ok(tls) => Ok(tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(crate::tls::spiffe_id)),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(seen);
        }
    });
    (format!("https://127.0.0.1:{port}"), rx)
}

type Seen = Result<Option<String>, String>;

#[tokio::test]
async fn pilot_is_verified_and_offered_the_workload_certificate_once_there_is_one() {
    let dir = temp_dir("client-cert");
    let pki = Pki::new();
    let (addr, mut seen) = pilot_port(&pki).await;
    let client = Client::with_tls(
        settings(&addr),
        PilotTls {
            root: pki.write_root(&dir),
            name: None,
        },
    );
    let certs = Certs::default();
    // No certificate yet: the handshake goes ahead without one.
    let _ = client.endpoint(&certs).unwrap().connect().await;
    assert_eq!(seen.recv().await, Some(Ok(None)));
    // With one, pilot sees the workload's SPIFFE ID.
    let id = "spiffe://cluster.local/ns/default/sa/caller";
    certs.install(pki.workload(id));
    let _ = client.endpoint(&certs).unwrap().connect().await;
    assert_eq!(seen.recv().await, Some(Ok(Some(id.to_string()))));
}

#[tokio::test]
async fn a_pilot_certificate_from_other_roots_or_for_another_name_is_refused() {
    let dir = temp_dir("refused");
    let pki = Pki::new();
    let (addr, mut seen) = pilot_port(&pki).await;
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let cases = [
        ("other roots", Pki::new().write_root(&other_dir), None),
        (
            "another name",
            pki.write_root(&dir),
            Some("mesh-pilot.mesh-system.svc".to_string()),
        ),
    ];
    for (what, root, name) in cases {
        let client = Client::with_tls(settings(&addr), PilotTls { root, name });
        let e = client
            .endpoint(&Certs::default())
            .unwrap()
            .connect()
            .await
            .map(|_| ())
            .map_err(|e| error_chain(&e));
        let e = e.expect_err(what);
        assert!(e.contains("certificate"), "{what}: {e}");
        assert!(matches!(seen.recv().await, Some(Err(_))), "{what}");
    }
}

#[test]
fn without_its_workload_resource_a_proxy_declares_nothing_held() {
    // Clusters and destinations arrived, the workload never did (or was
    // rejected): nothing of it runs, so nothing is declared.
    let mut have = Held::default();
    have.destinations.insert(
        "callme:8080".into(),
        ("d1".into(), DestinationConfig::default()),
    );
    have.clusters.insert(
        "outbound|8080||callme".into(),
        ("c1".into(), Cluster::default()),
    );
    have.forget_unless_running();
    let reqs = hello(&node(), &have, vec!["callme:8080".into()]);
    assert!(reqs.iter().all(|r| r.initial_resource_versions.is_empty()));
    assert_eq!(reqs[2].resource_names_subscribe, ["callme:8080"]);
    // With it, everything held is declared.
    have.workload = Some(("w1".into(), WorkloadResource::default()));
    have.clusters.insert(
        "outbound|8080||callme".into(),
        ("c1".into(), Cluster::default()),
    );
    have.forget_unless_running();
    let reqs = hello(&node(), &have, Vec::new());
    assert_eq!(reqs[1].initial_resource_versions.len(), 1);
}

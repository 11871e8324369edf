//! Mutual TLS between sidecars over real sockets. Two sidecars get their
//! certificates from pilot's CA (bootstrap tokens): `productpage` calls
//! `reviews` through its sidecar, mTLS is automatic, and the app behind
//! `reviews` sees the verified caller in `x-forwarded-client-cert`.
//! PeerAuthentication STRICT refuses plaintext, PERMISSIVE takes both,
//! DISABLE leaves TLS to the app. Clients that are not the mesh's — no
//! certificate, another root, another trust domain, an expired
//! certificate — are refused, as is a server with the wrong identity.
//! Certificates rotate under load without a failed request, and the mesh
//! keeps serving with the CA down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use mesh_e2e::pair::{HOST, PRODUCTPAGE, Pair as Mesh, REVIEWS, TD, plain_get, request_over};
use mesh_e2e::{eventually, get};
use mesh_pilot::ca::Ca;
use mesh_proxy::Running;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_talk_mtls_and_peer_authentication_decides_plaintext() {
    let mut mesh = Mesh::start("modes", None).await;

    // Automatic mTLS: the app sees who called, as the sidecar verified it.
    let got = mesh.call().await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, format!("HTTP/1.1 By={REVIEWS};URI={PRODUCTPAGE}"));

    // A forged identity header from the caller does not survive.
    let c = mesh_e2e::client();
    let req = Request::builder()
        .uri(format!("http://{}/", mesh.productpage.explicit.unwrap()))
        .header("host", format!("{HOST}:9080"))
        .header(
            "x-forwarded-client-cert",
            "By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = c
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&body.to_bytes()),
        format!("HTTP/1.1 By={REVIEWS};URI={PRODUCTPAGE}")
    );

    // HTTP/2 stays HTTP/2 inside the tunnel (ALPN mesh-h2).
    mesh.productpage_config(Some(REVIEWS), "", "HTTP2").await;
    let got = mesh.call().await;
    assert_eq!(got.body, format!("HTTP/2.0 By={REVIEWS};URI={PRODUCTPAGE}"));
    mesh.productpage_config(Some(REVIEWS), "", "HTTP").await;

    // STRICT: plaintext straight to the sidecar is refused.
    let before = mesh.refused();
    let inbound = mesh.reviews.inbound.unwrap();
    assert!(
        plain_get(inbound).await.is_err(),
        "STRICT takes no plaintext"
    );
    assert!(mesh.refused() > before);

    // PERMISSIVE: both, and plaintext callers carry no identity.
    mesh.reviews_config("PERMISSIVE").await;
    assert_eq!(plain_get(inbound).await.unwrap(), "HTTP/1.1 -");
    assert_eq!(
        mesh.call().await.body,
        format!("HTTP/1.1 By={REVIEWS};URI={PRODUCTPAGE}")
    );

    // DISABLE: the sidecar does not terminate TLS, so a client must not
    // send mTLS either (DestinationRule tls DISABLE) …
    mesh.reviews_config("DISABLE").await;
    assert_eq!(
        mesh.call().await.status,
        503,
        "mTLS to a DISABLE server fails"
    );
    mesh.productpage_config(Some(REVIEWS), "  tls: {mode: DISABLE}\n", "HTTP")
        .await;
    assert_eq!(mesh.call().await.body, "HTTP/1.1 -");

    mesh.reviews_config("STRICT").await;
    mesh.productpage_config(Some(REVIEWS), "", "HTTP").await;
    assert_eq!(mesh.call().await.status, 200);

    // The CA goes away: certificates in hand keep serving new connections.
    drop(mesh.pilot.take());
    for _ in 0..5 {
        assert_eq!(mesh.call().await.status, 200, "serving with the CA down");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_identity_is_refused() {
    let mesh = Mesh::start("server-id", None).await;
    // The endpoint should be ratings; reviews answers.
    mesh.productpage_config(
        Some("spiffe://cluster.local/ns/default/sa/ratings"),
        "",
        "HTTP",
    )
    .await;
    let got = mesh.call().await;
    assert_eq!(
        (got.status, got.reason.as_str()),
        (503, "upstream connect failure")
    );
    // ISTIO_MUTUAL with subjectAltNames names whom to expect.
    mesh.productpage_config(
        None,
        &format!("  tls: {{mode: ISTIO_MUTUAL, subjectAltNames: [\"{REVIEWS}\"]}}\n"),
        "HTTP",
    )
    .await;
    assert_eq!(mesh.call().await.status, 200);
    mesh.productpage_config(
        None,
        "  tls: {mode: ISTIO_MUTUAL, subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/details\"]}\n",
        "HTTP",
    )
    .await;
    assert_eq!(mesh.call().await.status, 503);
}

/// Accepts any server certificate: the clients below test the server.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate for `spiffe_id` signed by `ca`, valid for `ttl`.
fn issue(ca: &Ca, ns: &str, sa: &str, ttl: Duration) -> (Vec<String>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    let id = mesh_api::ca::spiffe_id(&ca.trust_domain, ns, sa);
    params.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (
        ca.sign(&csr, ns, sa, Some(ttl)).unwrap(),
        key.serialize_pem(),
    )
}

/// An HTTP/1 request over mesh mTLS from a client presenting `cert`.
async fn raw_mtls_get(
    addr: SocketAddr,
    cert: Option<(Vec<String>, String)>,
) -> Result<String, String> {
    raw_mtls_get_versions(addr, cert, rustls::DEFAULT_VERSIONS).await
}

async fn raw_mtls_get_versions(
    addr: SocketAddr,
    cert: Option<(Vec<String>, String)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some((chain, key)) => {
            let certs = chain
                .iter()
                .flat_map(|p| CertificateDer::pem_slice_iter(p.as_bytes()))
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            builder
                .with_client_auth_cert(
                    certs,
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![mesh_proxy::tls::Inner::Http1.alpn().to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("reviews").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    request_over(tls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_between_sidecars_only_when_configured() {
    let tls12_only: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let hour = Duration::from_secs(3600);
    let strict = Mesh::start("tls13", None).await;
    let good = issue(&strict.ca, "default", "productpage", hour);
    let got = raw_mtls_get_versions(strict.reviews.inbound.unwrap(), Some(good), tls12_only).await;
    assert!(got.is_err(), "TLS 1.3 only by default: {got:?}");
    drop(strict);

    let mesh = Mesh::start_with("tls12", None, true).await;
    let good = issue(&mesh.ca, "default", "productpage", hour);
    assert_eq!(
        raw_mtls_get_versions(mesh.reviews.inbound.unwrap(), Some(good), tls12_only)
            .await
            .unwrap(),
        format!("HTTP/1.1 By={REVIEWS};URI={PRODUCTPAGE}")
    );
    // Sidecars that can both do 1.3 still talk mTLS.
    assert_eq!(mesh.call().await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_the_mesh_are_refused() {
    let mesh = Mesh::start("clients", None).await;
    let inbound = mesh.reviews.inbound.unwrap();
    let hour = Duration::from_secs(3600);

    // The control: a certificate from the mesh's CA works.
    let good = issue(&mesh.ca, "default", "productpage", hour);
    assert_eq!(
        raw_mtls_get(inbound, Some(good)).await.unwrap(),
        format!("HTTP/1.1 By={REVIEWS};URI={PRODUCTPAGE}")
    );

    let other_root = Ca::load_or_create(&mesh.dir.join("other-ca"), TD, hour).unwrap();
    // Same root, but a CA for another trust domain.
    let other_domain = Ca::load_or_create(&mesh.dir.join("ca"), "evil.example", hour).unwrap();
    let expired = issue(&mesh.ca, "default", "productpage", Duration::from_secs(1));
    let not_after = {
        let (_, pem) = x509_parser::pem::parse_x509_pem(expired.0[0].as_bytes()).unwrap();
        pem.parse_x509().unwrap().validity().not_after.timestamp()
    };
    let past = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            > not_after
    };
    assert!(
        eventually(Duration::from_secs(5), || async { past() }).await,
        "the one-second certificate expires"
    );
    let cases = [
        ("no certificate", None),
        (
            "another root",
            Some(issue(&other_root, "default", "productpage", hour)),
        ),
        (
            "another trust domain",
            Some(issue(&other_domain, "default", "productpage", hour)),
        ),
        ("an expired certificate", Some(expired)),
    ];
    for (what, cert) in cases {
        let before = mesh.refused();
        let got = raw_mtls_get(inbound, cert).await;
        assert!(got.is_err(), "{what}: refused, got {got:?}");
        assert!(
            eventually(Duration::from_secs(2), || async { mesh.refused() > before }).await,
            "{what}: counted"
        );
    }
}

/// Requests from 4 clients through `productpage` until stopped: counts of
/// successes and failures.
struct Load {
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(mesh: &Mesh) -> Load {
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let explicit = mesh.productpage.explicit.unwrap();
        let tasks = (0..4)
            .map(|_| {
                let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
                tokio::spawn(async move {
                    let c = mesh_e2e::client();
                    while !stop.load(Ordering::Relaxed) {
                        match get(&c, explicit, &format!("{HOST}:9080"), "/").await {
                            Ok(g) if g.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            other => {
                                eprintln!("failed: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            ok,
            failed,
            stop,
            tasks,
        }
    }

    /// Stops it: (succeeded, failed).
    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn issued(p: &Running) -> u64 {
    p.proxy.tls.certs.issued.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    // Two-second certificates (X.509 times are whole seconds) renew about
    // every second; every request opens a new connection, so every
    // rotation meets handshakes.
    let mesh = Mesh::start("rotation", Some(Duration::from_secs(2))).await;
    let start = issued(&mesh.reviews) + issued(&mesh.productpage);
    let load = Load::start(&mesh);
    let rotated = eventually(Duration::from_secs(60), || async {
        issued(&mesh.reviews) + issued(&mesh.productpage) >= start + 50
    })
    .await;
    let (ok, failed) = load.stop().await;
    let rotations = issued(&mesh.reviews) + issued(&mesh.productpage) - start;
    eprintln!("{rotations} rotations, {ok} requests, {failed} failed");
    assert!(rotated, "50 rotations within a minute, got {rotations}");
    assert!(ok > 100, "load ran: {ok}");
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_under_load_without_a_failed_request() {
    use mesh_pilot::ca::{RotateStep, rotate_root};
    let mesh = Mesh::start("root-rotation", Some(Duration::from_secs(2))).await;
    let ca_dir = mesh.dir.join("ca");
    let load = Load::start(&mesh);
    // Each step, then two renewals of both proxies so each holds a
    // certificate and roots from after the step.
    for step in [
        RotateStep::Prepare,
        RotateStep::Activate,
        RotateStep::Finish,
    ] {
        let before = (issued(&mesh.reviews), issued(&mesh.productpage));
        eprintln!("{}", rotate_root(&ca_dir, TD, step).unwrap());
        let renewed = eventually(Duration::from_secs(20), || async {
            issued(&mesh.reviews) >= before.0 + 2 && issued(&mesh.productpage) >= before.1 + 2
        })
        .await;
        assert!(renewed, "{step:?}: proxies renewed");
        if step == RotateStep::Prepare {
            assert_eq!(mesh.ca.roots().len(), 2, "both roots trusted");
        }
    }
    let (ok, failed) = load.stop().await;
    eprintln!("root rotated under {ok} requests, {failed} failed");
    assert_eq!(mesh.ca.roots().len(), 1);
    assert!(ok > 50, "load ran: {ok}");
    assert_eq!(failed, 0);
    // New connections after the rotation.
    assert_eq!(mesh.call().await.status, 200);
}

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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_e2e::{eventually, get};
use mesh_pilot::ca::{BootstrapTokens, Ca};
use mesh_proxy::{Addrs, ConnSettings, Proxy, Running};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "cluster.local";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const HOST: &str = "reviews.default.svc.cluster.local";

struct Mesh {
    dir: PathBuf,
    ca: Arc<Ca>,
    pilot: Option<mesh_pilot::Running>,
    ca_addr: String,
    root: PathBuf,
    /// The app behind `reviews`: echoes the HTTP version and XFCC.
    app: SocketAddr,
    reviews: Arc<Running>,
    productpage: Arc<Running>,
}

/// An app answering `<version> <x-forwarded-client-cert>`.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| {
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    let body = format!("{:?} {xfcc}", req.version());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn start_proxy() -> Arc<Running> {
    let local = Some("127.0.0.1:0".parse().unwrap());
    Arc::new(
        mesh_proxy::start(
            Arc::new(Proxy::new(Vec::new())),
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

impl Mesh {
    async fn start(name: &str, ttl: Option<Duration>) -> Mesh {
        let dir = std::env::temp_dir().join(format!("mesh-mtls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut tokens = BootstrapTokens::default();
        tokens.insert("reviews-token-0123456789".into(), "default", "reviews");
        tokens.insert(
            "productpage-token-0123456789".into(),
            "default",
            "productpage",
        );
        let secure = mesh_e2e::secure_pilot(&dir, tokens).await;
        let mesh = Mesh {
            ca_addr: secure.ca_addr,
            ca: secure.ca,
            pilot: secure.pilot,
            root: secure.root,
            app: echo_app().await,
            reviews: start_proxy().await,
            productpage: start_proxy().await,
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
            assert!(
                mesh_e2e::ready(p).await,
                "proxies get certificates and config"
            );
        }
        mesh
    }

    /// `reviews`: the app on its inbound port (protocol detected: HTTP/2
    /// from the client stays HTTP/2 to the app), under `mode`.
    async fn reviews_config(&self, mode: &str) {
        let inbound = self.reviews.inbound.unwrap().port();
        let cfg = format!(
            "workload: {{name: reviews, namespace: default, serviceAccount: reviews, trustDomain: {TD}}}\n\
             inbound:\n  mtls: {mode}\n  ports:\n  - {{port: {inbound}, targetPort: {}, service: {HOST}}}\n",
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
    async fn productpage_config(&self, identity: Option<&str>, tls: &str, protocol: &str) {
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

    async fn call(&self) -> mesh_e2e::Got {
        let c = mesh_e2e::client();
        get(
            &c,
            self.productpage.explicit.unwrap(),
            &format!("{HOST}:9080"),
            "/",
        )
        .await
        .unwrap()
    }

    fn refused(&self) -> f64 {
        metric(&self.reviews, "mesh_proxy_mtls_refused_total")
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn metric(p: &Running, name: &str) -> f64 {
    p.proxy
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A plaintext GET straight to `addr`.
async fn plain_get(addr: SocketAddr) -> Result<String, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    request_over(stream).await
}

async fn request_over<S>(io: S) -> Result<String, String>
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    // Two-second certificates (X.509 times are whole seconds) renew about
    // every second; every request opens a new connection, so every
    // rotation meets handshakes.
    let mesh = Mesh::start("rotation", Some(Duration::from_secs(2))).await;
    let issued = |p: &Running| p.proxy.tls.certs.issued.load(Ordering::Relaxed);
    let start = issued(&mesh.reviews) + issued(&mesh.productpage);
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let explicit = mesh.productpage.explicit.unwrap();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        load.push(tokio::spawn(async move {
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
        }));
    }
    let rotated = eventually(Duration::from_secs(60), || async {
        issued(&mesh.reviews) + issued(&mesh.productpage) >= start + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let rotations = issued(&mesh.reviews) + issued(&mesh.productpage) - start;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{rotations} rotations, {ok} requests, {failed} failed");
    assert!(rotated, "50 rotations within a minute, got {rotations}");
    assert!(ok > 100, "load ran: {ok}");
    assert_eq!(failed, 0);
}

//! Mutual TLS between sidecars, and TLS origination to the endpoints a
//! DestinationRule names.
//!
//! A sidecar calling an endpoint that has a sidecar (its `identity` is
//! known) opens TLS 1.3 with its workload certificate and checks that the
//! server's certificate chains to the mesh's roots and names that SPIFFE
//! ID. ALPN carries the inner protocol (`mesh-h2`, `mesh-http/1.1`,
//! `mesh-tcp`), so the receiving sidecar serves it without sniffing, and
//! tells mesh mTLS apart from an app's own TLS, which passes through.
//!
//! Certificates and roots are read at every handshake from [`Certs`], so a
//! renewal or a root change applies to the next connection.

use std::fmt;
use std::io::Cursor;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    Acceptor, ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::identity::Certs;

/// What a mesh connection carries, named by its ALPN protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inner {
    Http1,
    Http2,
    Tcp,
}

impl Inner {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Inner::Http1 => b"mesh-http/1.1",
            Inner::Http2 => b"mesh-h2",
            Inner::Tcp => b"mesh-tcp",
        }
    }

    pub fn from_alpn(p: &[u8]) -> Option<Inner> {
        [Inner::Http1, Inner::Http2, Inner::Tcp]
            .into_iter()
            .find(|i| i.alpn() == p)
    }

    /// The ALPN an app-level TLS upstream expects for the same protocol.
    fn plain_alpn(self) -> Option<&'static [u8]> {
        match self {
            Inner::Http1 => Some(b"http/1.1"),
            Inner::Http2 => Some(b"h2"),
            Inner::Tcp => None,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One workload certificate ready for rustls: the key to present and the
/// roots to check peers against.
pub struct Material {
    pub key: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Material {
    /// From PEM: the chain (leaf first), its PKCS#8 key and the roots.
    pub fn new(chain: &[String], key: &str, roots: &[String]) -> Result<Material, String> {
        let certs = chain
            .iter()
            .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate chain: {e}"))?;
        if certs.is_empty() {
            return Err("certificate chain: no certificate".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| format!("private key: {e}"))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("private key: {e}"))?;
        let mut store = RootCertStore::empty();
        for pem in roots {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let der = der.map_err(|e| format!("roots: {e}"))?;
                store.add(der).map_err(|e| format!("roots: {e}"))?;
            }
        }
        if store.is_empty() {
            return Err("roots: no certificate".into());
        }
        let roots = Arc::new(store);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("roots: {e}"))?;
        Ok(Material {
            key: Arc::new(CertifiedKey::new(certs, signer)),
            roots,
            client_verifier,
        })
    }
}

/// The SPIFFE ID a certificate names: its only URI SAN, `spiffe://…`.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next()?;
    (uris.next().is_none() && uri.starts_with("spiffe://")).then(|| uri.to_string())
}

/// `cluster.local` of `spiffe://cluster.local/ns/a/sa/b`.
pub fn trust_domain(spiffe_id: &str) -> Option<&str> {
    spiffe_id
        .strip_prefix("spiffe://")?
        .split('/')
        .next()
        .filter(|d| !d.is_empty())
}

/// The handshake-signature methods of a rustls verifier, checked with the
/// provider's algorithms in field `$algs`.
macro_rules! signature_checks {
    ($algs:tt) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.$algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.$algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.$algs.supported_schemes()
        }
    };
}

/// The current certificate for handshakes, and chain checks against the
/// current roots.
struct Current {
    certs: Arc<Certs>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Current").finish_non_exhaustive()
    }
}

impl Current {
    fn material(&self) -> Result<Arc<crate::identity::Identity>, Error> {
        self.certs
            .current()
            .ok_or_else(|| Error::General("no workload certificate".into()))
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.current().map(|i| i.material.key.clone())
    }
}

impl ResolvesClientCert for Current {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certs.current().map(|i| i.material.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ServerCertVerifier for Current {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The name is checked after the handshake, against the SPIFFE ID
        // the endpoint must have.
        let id = self.material()?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &id.material.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!(algs);
}

impl ClientCertVerifier for Current {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.material()?
            .material
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    signature_checks!(algs);
}

/// The proxy's mesh TLS: its certificates and the rustls configs built on
/// them once.
pub struct MeshTls {
    pub certs: Arc<Certs>,
    server: Arc<ServerConfig>,
    /// By [`Inner`]: HTTP/1, HTTP/2, TCP.
    clients: [Arc<ClientConfig>; 3],
}

impl Default for MeshTls {
    fn default() -> Self {
        MeshTls::new(Arc::new(Certs::default()))
    }
}

fn index(inner: Inner) -> usize {
    match inner {
        Inner::Http1 => 0,
        Inner::Http2 => 1,
        Inner::Tcp => 2,
    }
}

impl MeshTls {
    /// TLS 1.3 only.
    pub fn new(certs: Arc<Certs>) -> MeshTls {
        MeshTls::with_tls12(certs, false)
    }

    /// With `tls12`, TLS 1.2 is accepted and offered too (for peers that
    /// cannot do 1.3); 1.3 is still chosen whenever both sides can.
    pub fn with_tls12(certs: Arc<Certs>, tls12: bool) -> MeshTls {
        let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let provider = provider();
        let current = Arc::new(Current {
            certs: certs.clone(),
            algs: provider.signature_verification_algorithms,
        });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .expect("TLS 1.3 and 1.2 with the ring provider")
            .with_client_cert_verifier(current.clone())
            .with_cert_resolver(current.clone());
        server.alpn_protocols = [Inner::Http1, Inner::Http2, Inner::Tcp]
            .iter()
            .map(|i| i.alpn().to_vec())
            .collect();
        let client = |inner: Inner| {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(versions)
                .expect("TLS 1.3 and 1.2 with the ring provider")
                .dangerous()
                .with_custom_certificate_verifier(current.clone())
                .with_client_cert_resolver(current.clone());
            c.alpn_protocols = vec![inner.alpn().to_vec()];
            Arc::new(c)
        };
        MeshTls {
            certs,
            server: Arc::new(server),
            clients: [
                client(Inner::Http1),
                client(Inner::Http2),
                client(Inner::Tcp),
            ],
        }
    }

    /// Whether this proxy has a workload identity at all (a CA is
    /// configured). Without one it cannot take part in mTLS.
    pub fn enabled(&self) -> bool {
        self.certs.enabled()
    }

    fn local_trust_domain(&self) -> Option<String> {
        let id = self.certs.current()?;
        trust_domain(&id.spiffe_id).map(str::to_string)
    }

    /// Opens mesh mTLS over `tcp` and checks the server's identity: one of
    /// `expect`, or when that is empty any identity of this trust domain.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        inner: Inner,
        sni: ServerName<'static>,
        expect: &[Arc<str>],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        if self.certs.current().is_none() {
            return Err("no workload certificate".into());
        }
        let connector = tokio_rustls::TlsConnector::from(self.clients[index(inner)].clone());
        let tls = connector
            .connect(sni, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(inner.alpn()) {
            return Err("the peer does not speak mesh mTLS".into());
        }
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(spiffe_id)
            .ok_or("the peer's certificate names no SPIFFE ID")?;
        let ok = if expect.is_empty() {
            trust_domain(&peer).is_some()
                && trust_domain(&peer) == self.local_trust_domain().as_deref()
        } else {
            expect.iter().any(|e| **e == *peer)
        };
        if !ok {
            return Err(format!("the peer is {peer}, expected {expect:?}"));
        }
        Ok(tls)
    }

    /// Terminates mesh mTLS: the stream, what it carries and the client's
    /// verified SPIFFE ID (of this trust domain).
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Inner, Arc<str>), String> {
        let tls = tokio_rustls::TlsAcceptor::from(self.server.clone())
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let inner = conn
            .alpn_protocol()
            .and_then(Inner::from_alpn)
            .ok_or("no mesh ALPN protocol")?;
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(spiffe_id)
            .ok_or("the client's certificate names no SPIFFE ID")?;
        if trust_domain(&peer) != self.local_trust_domain().as_deref() {
            return Err(format!("the client {peer} is not of this trust domain"));
        }
        Ok((tls, inner, peer.into()))
    }
}

/// Whether a TLS ClientHello (peeked, not consumed) offers mesh mTLS, or
/// is another TLS client's (an app's own TLS). `None`: not a complete
/// ClientHello within `timeout`.
pub async fn offers_mesh(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let mut buf = vec![0u8; 16 * 1024 + 5];
    crate::detect::peek_until(stream, timeout, &mut buf, |bytes| {
        let mut acceptor = Acceptor::default();
        let mut rd = Cursor::new(bytes);
        while (rd.position() as usize) < bytes.len() {
            match acceptor.read_tls(&mut rd) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => Some(
                accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut protos| protos.any(|p| Inner::from_alpn(p).is_some())),
            ),
            // More bytes needed.
            Ok(None) => None,
            // Not a ClientHello rustls can read: not the mesh's.
            Err(_) => Some(false),
        }
    })
    .await
}

/// TLS to a DestinationRule's SIMPLE or MUTUAL upstream: configs by inner
/// protocol (for ALPN) and the name to send and check.
pub struct Origination {
    clients: [Arc<ClientConfig>; 3],
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for Origination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origination")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Where the system's CA bundle is, for SIMPLE without `caCertificates`.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Origination {
    /// From a DestinationRule's `tls` (SIMPLE or MUTUAL, files on the
    /// proxy's filesystem); `host` is the default SNI.
    pub fn new(
        tls: &mesh_api::networking::ClientTlsSettings,
        host: &str,
    ) -> Result<Origination, String> {
        use mesh_api::networking::ClientTlsMode;
        if tls.credential_name.is_some() {
            return Err("credentialName: Secrets are not read by sidecars; use clientCertificate, privateKey and caCertificates files".into());
        }
        let read = |field: &str, path: &str| {
            std::fs::read(Path::new(path)).map_err(|e| format!("{field} {path}: {e}"))
        };
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if tls.insecure_skip_verify == Some(true) {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(
                    provider.signature_verification_algorithms,
                )))
        } else {
            let (field, path) = match &tls.ca_certificates {
                Some(p) => ("caCertificates", p.as_str()),
                None => ("system roots", SYSTEM_ROOTS),
            };
            let pem = read(field, path)?;
            let mut roots = RootCertStore::empty();
            for der in CertificateDer::pem_slice_iter(&pem) {
                roots
                    .add(der.map_err(|e| format!("{field} {path}: {e}"))?)
                    .map_err(|e| format!("{field} {path}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("{field} {path}: no certificate"));
            }
            let verifier: Arc<dyn ServerCertVerifier> = if tls.subject_alt_names.is_empty() {
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| e.to_string())?
            } else {
                // subjectAltNames replace the SNI as the names to check.
                Arc::new(SanVerifier {
                    inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| e.to_string())?,
                    names: tls
                        .subject_alt_names
                        .iter()
                        .map(|n| {
                            ServerName::try_from(n.clone()).map_err(|_| {
                                format!("subjectAltNames: {n:?} is not a DNS name or IP")
                            })
                        })
                        .collect::<Result<_, _>>()?,
                })
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
        };
        let config = if tls.mode == ClientTlsMode::Mutual {
            let cert_path = tls
                .client_certificate
                .as_deref()
                .ok_or("MUTUAL needs clientCertificate")?;
            let key_path = tls
                .private_key
                .as_deref()
                .ok_or("MUTUAL needs privateKey")?;
            let certs = CertificateDer::pem_slice_iter(&read("clientCertificate", cert_path)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("clientCertificate {cert_path}: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(&read("privateKey", key_path)?)
                .map_err(|e| format!("privateKey {key_path}: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("clientCertificate/privateKey: {e}"))?
        } else {
            builder.with_no_client_auth()
        };
        let sni = tls.sni.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(sni.to_string())
            .map_err(|_| format!("sni: {sni:?} is not a DNS name"))?;
        let with_alpn = |inner: Inner| {
            let mut c = config.clone();
            c.alpn_protocols = inner
                .plain_alpn()
                .map(|p| vec![p.to_vec()])
                .unwrap_or_default();
            Arc::new(c)
        };
        Ok(Origination {
            clients: [
                with_alpn(Inner::Http1),
                with_alpn(Inner::Http2),
                with_alpn(Inner::Tcp),
            ],
            server_name,
        })
    }

    pub async fn connect(
        &self,
        tcp: TcpStream,
        inner: Inner,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        tokio_rustls::TlsConnector::from(self.clients[index(inner)].clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| e.to_string())
    }
}

/// `insecureSkipVerify: true`: any certificate (signatures still checked).
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!(0);
}

/// Checks the chain as usual, and the certificate against any of the
/// DestinationRule's `subjectAltNames` instead of the SNI.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let mut last = Error::General("no subjectAltNames".into());
        for n in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, n, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An upstream connection: plain TCP or TLS over it.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How a proxy talks to one endpoint.
#[derive(Clone, Debug)]
pub enum Upstream {
    Plain,
    /// Mesh mTLS; the server must be one of these identities (any of the
    /// trust domain when empty). A proxy without a workload identity of its
    /// own talks plaintext, and a STRICT server refuses it.
    Mesh {
        sni: ServerName<'static>,
        expect: Arc<[Arc<str>]>,
    },
    /// DestinationRule SIMPLE or MUTUAL.
    Originate(Arc<Origination>),
    /// The DestinationRule's TLS settings cannot be used here (a file is
    /// missing): connections fail rather than go out in plaintext.
    Broken(Arc<str>),
}

impl Upstream {
    /// Opens the connection on `tcp` for `inner`.
    pub async fn wrap(&self, mesh: &MeshTls, tcp: TcpStream, inner: Inner) -> Result<Io, String> {
        match self {
            Upstream::Plain => Ok(Io::Plain(tcp)),
            Upstream::Mesh { .. } if !mesh.enabled() => Ok(Io::Plain(tcp)),
            Upstream::Mesh { sni, expect } => mesh
                .connect(tcp, inner, sni.clone(), expect)
                .await
                .map(|s| Io::Tls(Box::new(s))),
            Upstream::Originate(o) => o.connect(tcp, inner).await.map(|s| Io::Tls(Box::new(s))),
            Upstream::Broken(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_names_the_inner_protocol() {
        for i in [Inner::Http1, Inner::Http2, Inner::Tcp] {
            assert_eq!(Inner::from_alpn(i.alpn()), Some(i));
        }
        assert_eq!(Inner::from_alpn(b"h2"), None);
    }

    #[test]
    fn trust_domain_of_a_spiffe_id() {
        assert_eq!(
            trust_domain("spiffe://cluster.local/ns/a/sa/b"),
            Some("cluster.local")
        );
        assert_eq!(trust_domain("spiffe:///ns/a"), None);
        assert_eq!(trust_domain("https://x"), None);
    }
}

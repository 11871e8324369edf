//! The proxy's workload identity: it makes its own key (which never leaves
//! the process) and a CSR for its SPIFFE ID, sends it to the mesh's CA with
//! its service-account token, and keeps the certificate it gets. It renews
//! at half-life (with jitter), keeps the current certificate while the CA
//! is unreachable, and drops it at expiry: then it has no identity rather
//! than an expired one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use mesh_api::ca::certificate_service_client::CertificateServiceClient;
use serde::Serialize;

/// Where and as whom to ask.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `https://host:15012`.
    pub ca_addr: String,
    /// PEM roots to trust for the CA's own certificate.
    pub ca_root: PathBuf,
    /// The name to expect in the CA's certificate (default: the host).
    pub ca_name: Option<String>,
    /// The bearer token (re-read at every request: projected tokens rotate).
    pub token_file: PathBuf,
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    /// Requested validity (the CA's default when `None`).
    pub ttl: Option<Duration>,
}

/// A certificate and its key.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub spiffe_id: String,
    /// PEM, the workload's certificate first.
    pub cert_chain: Vec<String>,
    #[serde(skip)]
    pub key_pem: String,
    /// PEM roots to trust for peers.
    pub roots: Vec<String>,
    pub serial: String,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
    /// The same, ready for handshakes.
    #[serde(skip)]
    pub material: Arc<crate::tls::Material>,
}

impl Identity {
    fn expired(&self, now: SystemTime) -> bool {
        unix(now) >= self.not_after
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The current identity, shared with the listeners.
#[derive(Default)]
pub struct Certs {
    current: ArcSwapOption<Identity>,
    /// Set once a CA is configured: from then on the proxy takes part in
    /// mTLS, and has no identity (rather than none needed) without a
    /// certificate.
    enabled: std::sync::atomic::AtomicBool,
    /// How many certificates were obtained.
    pub issued: std::sync::atomic::AtomicU64,
    /// How many requests to the CA failed.
    pub failures: std::sync::atomic::AtomicU64,
}

impl Certs {
    pub fn enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn enable(&self) {
        self.enabled
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Puts a certificate in force (the next handshakes use it).
    pub fn install(&self, id: Identity) {
        self.current.store(Some(Arc::new(id)));
    }

    /// The certificate in force; `None` before the first one and after
    /// expiry.
    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current
            .load_full()
            .filter(|i| !i.expired(SystemTime::now()))
    }
}

/// How the proxy checks pilot on its TLS port (15012), where pilot serves
/// the CA and xDS: pilot's certificate must chain to the mesh's roots (the
/// mounted root file) and name the host dialled, or `name`. Pilot's
/// serving certificate carries DNS names and IPs (its `--tls-name`s,
/// `mesh-pilot.mesh-system.svc` by default), no SPIFFE ID.
#[derive(Clone, Debug)]
pub struct PilotTls {
    /// PEM roots to trust (re-read at every connection: the mounted
    /// `mesh-ca-root-cert` changes during a root rotation).
    pub root: PathBuf,
    /// The name to expect in pilot's certificate (default: the host).
    pub name: Option<String>,
}

/// How long a TLS handshake with pilot may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl PilotTls {
    /// The roots file's PEM; an error when it holds no certificate.
    pub fn read_roots(&self) -> Result<String, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read_to_string(&self.root)
            .map_err(|e| format!("mesh root {}: {e}", self.root.display()))?;
        let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
        match certs.next() {
            Some(Ok(_)) => Ok(pem),
            Some(Err(e)) => Err(format!("mesh root {}: {e}", self.root.display())),
            None => Err(format!("mesh root {}: no certificate", self.root.display())),
        }
    }

    /// An endpoint for `addr` (`https://host:port`) that speaks TLS and
    /// nothing else, trusting only `roots`. `client`, when given, is
    /// presented if pilot asks for a client certificate.
    pub fn endpoint(
        &self,
        addr: &str,
        roots: &str,
        client: Option<&Identity>,
    ) -> Result<tonic::transport::Endpoint, String> {
        let uri: http::Uri = addr
            .parse()
            .map_err(|e| format!("pilot address {addr:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "pilot address {addr:?}: TLS needs an https:// address"
            ));
        }
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(roots))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(name) = &self.name {
            tls = tls.domain_name(name.clone());
        }
        if let Some(id) = client {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                id.cert_chain.join("\n"),
                &id.key_pem,
            ));
        }
        tonic::transport::Endpoint::from_shared(addr.to_string())
            .map_err(|e| format!("pilot address {addr:?}: {e}"))?
            .tls_config(tls)
            .map_err(|e| format!("pilot address {addr:?}: {}", error_chain(&e)))
    }
}

/// An error with its causes (`transport error: … : invalid peer
/// certificate: UnknownIssuer`), for logs that say why.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Asks the CA once.
pub async fn fetch(s: &Settings) -> Result<Identity, String> {
    let spiffe_id = mesh_api::ca::spiffe_id(&s.trust_domain, &s.namespace, &s.service_account);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id
            .as_str()
            .try_into()
            .map_err(|e| format!("SPIFFE ID {spiffe_id:?}: {e}"))?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| e.to_string())?;
    let token = std::fs::read_to_string(&s.token_file)
        .map_err(|e| format!("token {}: {e}", s.token_file.display()))?;
    let tls = PilotTls {
        root: s.ca_root.clone(),
        name: s.ca_name.clone(),
    };
    let root = tls.read_roots()?;
    let channel = tls
        .endpoint(&s.ca_addr, &root, None)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("CA {}: {}", s.ca_addr, error_chain(&e)))?;
    let mut req = tonic::Request::new(mesh_api::ca::CertificateRequest {
        csr,
        validity_seconds: s.ttl.map_or(0, |d| d.as_secs() as i64),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| "the token is not a valid header value".to_string())?,
    );
    let resp = CertificateServiceClient::new(channel)
        .create_certificate(req)
        .await
        .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
        .into_inner();
    let leaf = resp
        .cert_chain
        .first()
        .ok_or_else(|| "the CA sent no certificate".to_string())?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.as_bytes())
        .map_err(|e| format!("the CA's certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("the CA's certificate: {e}"))?;
    // Only what was asked for: the certificate must carry our identity.
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if sans != [spiffe_id.clone()] {
        return Err(format!(
            "the CA's certificate names {sans:?}, not {spiffe_id}"
        ));
    }
    // Peers are checked against the CA's roots and the mounted root file
    // (the namespace's mesh-ca-root-cert): during a root rotation either
    // may list the new root first.
    let mut roots = resp.roots.clone();
    if !roots.iter().any(|r| r.trim() == root.trim()) {
        roots.push(root);
    }
    let key_pem = key.serialize_pem();
    let material = crate::tls::Material::new(&resp.cert_chain, &key_pem, &roots)
        .map_err(|e| format!("the CA's answer: {e}"))?;
    Ok(Identity {
        material: Arc::new(material),
        spiffe_id,
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp().max(0) as u64,
        not_after: cert.validity().not_after.timestamp().max(0) as u64,
        cert_chain: resp.cert_chain,
        key_pem,
        roots,
    })
}

/// Keeps `certs` current until the task is dropped: the first certificate
/// as soon as the CA answers, then a new one at half of the remaining
/// validity (±10%), retrying
/// with backoff while the CA is unreachable.
pub async fn run(certs: Arc<Certs>, s: Settings) {
    certs.enable();
    let mut backoff = Duration::from_millis(200);
    loop {
        match fetch(&s).await {
            Ok(id) => {
                backoff = Duration::from_millis(200);
                // Half of what is left (the CA back-dates not-before a
                // little for clock skew), give or take 10%.
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                let left = Duration::from_secs(id.not_after).saturating_sub(now);
                let wait = (left / 2)
                    .mul_f64(0.9 + 0.2 * fastrand::f64())
                    .max(Duration::from_millis(200));
                tracing::info!(spiffe_id = %id.spiffe_id, serial = %id.serial, renew_in = ?wait, "certificate issued");
                certs.install(id);
                certs
                    .issued
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                certs
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let has = certs.current().is_some();
                tracing::warn!(error = %e, retry_in = ?backoff, keeping_current = has, "no certificate from the CA");
                if !has {
                    // Expired: no identity rather than a stale one.
                    certs.current.store(None);
                }
                tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

//! The mesh's certificate authority. It signs workload CSRs whose only SAN
//! is the caller's SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<sa>`), the caller
//! proven by its bearer token; the key never leaves the workload.
//!
//! The signing certificate and key live in a directory, with Istio's file
//! names so a user's CA plugs in the same way: `ca-cert.pem` and
//! `ca-key.pem` (the signing CA: a root, or an intermediate), `root-cert.pem`
//! (the roots workloads trust; may hold two during a rotation) and
//! `cert-chain.pem` (intermediates up to the root, appended to every
//! certificate). Without them pilot generates a root at first start and
//! writes it there, so a restart keeps it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::Deserialize;
use tonic::{Request, Response, Status};

/// Files of the CA directory.
const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const ROOT_CERT: &str = "root-cert.pem";
const CERT_CHAIN: &str = "cert-chain.pem";

/// The longest validity a workload may ask for.
const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

pub struct Ca {
    dir: PathBuf,
    state: std::sync::RwLock<Arc<State>>,
    /// The directory's file stamps when `state` was read.
    stamp: std::sync::Mutex<Stamp>,
    pub trust_domain: String,
    pub ttl: Duration,
}

struct State {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the CA certificate and the chain above it.
    chain: Vec<String>,
    /// PEM roots workloads trust.
    roots: Vec<String>,
}

/// Inode, length and modification time of each CA file: a file replaced
/// by a rename (as rotation does) has another inode even when it was
/// written within the same clock tick and is as long.
type Stamp = Vec<Option<(u64, u64, std::time::SystemTime)>>;

fn stamp(dir: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.ino(), m.len(), m.modified().ok()?))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid CSR: {0}")]
    Csr(String),
    #[error("the CSR asks for {asked}, but the caller is {allowed}")]
    Identity { asked: String, allowed: String },
    #[error("cannot sign: {0}")]
    Sign(String),
    #[error("cannot rotate the root: {0}")]
    Rotate(String),
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn split_pem(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

impl Ca {
    /// Loads the CA from `dir`, or creates a root there when it holds none.
    /// The directory is read again whenever its files change, so a root
    /// rotation ([`rotate_root`]) applies without a restart.
    pub fn load_or_create(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<Ca, CaError> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if !cert_path.exists() && !key_path.exists() {
            create_root(dir, trust_domain)?;
        }
        let stamped = stamp(dir);
        let state = load_state(dir)?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            state: std::sync::RwLock::new(Arc::new(state)),
            stamp: std::sync::Mutex::new(stamped),
            trust_domain: trust_domain.to_string(),
            ttl,
        })
    }

    /// The roots workloads trust (two during a rotation).
    pub fn roots(&self) -> Vec<String> {
        self.current().roots.clone()
    }

    /// The state, read again first if the directory changed. A directory
    /// that does not load (a half-written rotation, a key that does not
    /// match its certificate) leaves the last good state in force.
    fn current(&self) -> Arc<State> {
        let now = stamp(&self.dir);
        let changed = {
            let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *last == now {
                false
            } else {
                *last = now;
                true
            }
        };
        if changed {
            match load_state(&self.dir) {
                Ok(state) => {
                    tracing::info!(
                        dir = %self.dir.display(),
                        roots = state.roots.len(),
                        "CA files changed: reloaded"
                    );
                    *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CA files changed but do not load; keeping the last good CA")
                }
            }
        }
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Signs `csr_pem` for `namespace/service_account`: the CSR must be
    /// validly signed and name exactly that SPIFFE ID. Returns the chain,
    /// the workload's certificate first.
    pub fn sign(
        &self,
        csr_pem: &str,
        namespace: &str,
        service_account: &str,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let state = self.current();
        let allowed = mesh_api::ca::spiffe_id(&self.trust_domain, namespace, service_account);
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP:{ip}"),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [allowed.clone()] {
            return Err(CaError::Identity {
                asked: if asked.is_empty() {
                    "no identity".into()
                } else {
                    asked.join(", ")
                },
                allowed,
            });
        }
        let ttl = ttl
            .unwrap_or(self.ttl)
            .min(MAX_TTL)
            .max(Duration::from_secs(1));
        let mut params = CertificateParams::default();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        params.distinguished_name = DistinguishedName::new();
        let now = time::OffsetDateTime::now_utc();
        // A little back-dating tolerates clock skew between nodes.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after =
            now + time::Duration::try_from(ttl).map_err(|e| CaError::Sign(e.to_string()))?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial()));
        let cert = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&state.issuer)
        .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut out = vec![cert.pem()];
        out.extend(state.chain.iter().cloned());
        Ok(out)
    }

    /// A certificate for pilot's own TLS port, with DNS names and IPs.
    pub fn serving_cert(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|e| CaError::Sign(e.to_string()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "mesh-pilot");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial()));
        let state = self.current();
        let cert = params
            .signed_by(&key, &state.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = cert.pem();
        for c in &state.chain {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }
}

/// When the first certificate in `pem` expires (Unix seconds), and its
/// DNS names.
pub fn cert_validity(pem: &str) -> Result<(i64, Vec<String>), String> {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let cert = der.parse_x509().map_err(|e| e.to_string())?;
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok((cert.validity().not_after.timestamp(), names))
}

/// Reads the signing CA, its chain and the roots from `dir`.
fn load_state(dir: &Path) -> Result<State, CaError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| file_error(&cert_path, e))?;
    let key_pem = std::fs::read_to_string(&key_path).map_err(|e| file_error(&key_path, e))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| file_error(&key_path, e))?;
    let (_, der) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| file_error(&cert_path, e))?;
    let cert = der.parse_x509().map_err(|e| file_error(&cert_path, e))?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(file_error(
            &key_path,
            format!("the key does not belong to {CA_CERT}"),
        ));
    }
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| file_error(&cert_path, e))?;
    let read_opt = |name: &str| -> Result<Vec<String>, CaError> {
        let p = dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(split_pem(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(file_error(&p, e)),
        }
    };
    let mut roots = read_opt(ROOT_CERT)?;
    if roots.is_empty() {
        roots = split_pem(&cert_pem);
    }
    let mut chain = split_pem(&cert_pem);
    for c in read_opt(CERT_CHAIN)? {
        if !chain.contains(&c) {
            chain.push(c);
        }
    }
    // A self-signed root is not sent as part of the chain.
    if chain.len() == 1 && roots.contains(&chain[0]) {
        chain.clear();
    }
    Ok(State {
        issuer,
        chain,
        roots,
    })
}

/// A step of a root rotation, in order. Between steps, wait until every
/// proxy has renewed its certificate (one certificate lifetime is always
/// enough): proxies take the roots from each renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotateStep {
    /// A new root is generated (in `next/`) and trusted next to the
    /// current one; certificates are still signed by the current one.
    Prepare,
    /// The new root signs; the old one (kept in `previous/`) is still
    /// trusted, so certificates it signed keep working until they renew.
    Activate,
    /// Only the new root is trusted.
    Finish,
}

const NEXT: &str = "next";
const PREVIOUS: &str = "previous";

/// Writes `text` to `path` through a temporary file and a rename.
fn replace_file(path: &Path, text: &str) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| file_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

/// Performs one step of rotating a root the mesh generated (a user's
/// intermediate, with `cert-chain.pem`, is rotated by replacing its
/// files). A running pilot picks each step up by itself. Returns what was
/// done, for the operator.
pub fn rotate_root(dir: &Path, trust_domain: &str, step: RotateStep) -> Result<String, CaError> {
    let (next, previous) = (dir.join(NEXT), dir.join(PREVIOUS));
    let refuse = |why: String| Err(CaError::Rotate(why));
    if dir.join(CERT_CHAIN).exists() {
        return refuse(format!(
            "{} holds {CERT_CHAIN}: an intermediate from your own PKI is rotated by replacing its files",
            dir.display()
        ));
    }
    let current = load_state(dir)?;
    match step {
        RotateStep::Prepare => {
            if next.exists() {
                return refuse(format!(
                    "{} exists: a rotation is already prepared (activate it)",
                    next.display()
                ));
            }
            create_root(&next, trust_domain)?;
            let new_root = std::fs::read_to_string(next.join(CA_CERT))
                .map_err(|e| file_error(&next.join(CA_CERT), e))?;
            let mut roots = current.roots.clone();
            roots.push(new_root);
            replace_file(&dir.join(ROOT_CERT), &roots.concat())?;
            Ok(format!(
                "prepared: a new root in {} is trusted next to the current one; once every proxy has renewed, activate it",
                next.display()
            ))
        }
        RotateStep::Activate => {
            if !next.exists() {
                return refuse("no prepared rotation: run the prepare step first".into());
            }
            let _ = std::fs::remove_dir_all(&previous);
            std::fs::create_dir_all(&previous).map_err(|e| file_error(&previous, e))?;
            for f in [CA_CERT, CA_KEY] {
                std::fs::copy(dir.join(f), previous.join(f))
                    .map_err(|e| file_error(&previous.join(f), e))?;
            }
            // The key first: until the certificate follows, the pair does
            // not match and a running pilot keeps signing with the old one.
            for f in [CA_KEY, CA_CERT] {
                std::fs::rename(next.join(f), dir.join(f))
                    .map_err(|e| file_error(&dir.join(f), e))?;
            }
            let _ = std::fs::remove_dir_all(&next);
            Ok(
                "activated: the new root signs workload certificates and both roots are trusted; restart pilot so its own serving certificate comes from the new root, and once every proxy has renewed, finish"
                    .into(),
            )
        }
        RotateStep::Finish => {
            if next.exists() {
                return refuse("a prepared rotation is not active yet: activate it first".into());
            }
            let cert = std::fs::read_to_string(dir.join(CA_CERT))
                .map_err(|e| file_error(&dir.join(CA_CERT), e))?;
            replace_file(&dir.join(ROOT_CERT), &cert)?;
            let _ = std::fs::remove_dir_all(&previous);
            Ok("finished: only the new root is trusted".into())
        }
    }
}

fn serial() -> [u8; 16] {
    let mut s = [0u8; 16];
    for b in &mut s {
        *b = fastrand::u8(..);
    }
    s[0] &= 0x7f; // positive
    s
}

/// Generates a root (ECDSA P-256, 10 years) and writes it (key 0600).
fn create_root(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let root = generate_root(trust_domain)?;
    let key_path = dir.join(CA_KEY);
    write_private(&key_path, &root.key_pem)?;
    let cert_path = dir.join(CA_CERT);
    std::fs::write(&cert_path, &root.cert_pem).map_err(|e| file_error(&cert_path, e))?;
    let root_path = dir.join(ROOT_CERT);
    std::fs::write(&root_path, &root.cert_pem).map_err(|e| file_error(&root_path, e))?;
    tracing::info!(dir = %dir.display(), "generated the mesh's root CA");
    Ok(())
}

/// A self-signed root CA, as PEM.
pub struct GeneratedRoot {
    pub cert_pem: String,
    pub key_pem: String,
}

impl GeneratedRoot {
    /// The files of a CA directory (`--ca-dir`) holding this root, by
    /// file name: what a Secret mounted there carries.
    pub fn files(&self) -> [(&'static str, &str); 3] {
        [
            (CA_CERT, &self.cert_pem),
            (CA_KEY, &self.key_pem),
            (ROOT_CERT, &self.cert_pem),
        ]
    }
}

/// Generates a root CA for `trust_domain`: ECDSA P-256, valid 10 years.
pub fn generate_root(trust_domain: &str) -> Result<GeneratedRoot, CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "mesh root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(3650);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial()));
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok(GeneratedRoot {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_error(path, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| file_error(path, e))
}

/// Who a bearer token belongs to.
pub trait Authenticate: Send + Sync + 'static {
    /// `(namespace, service account)`, or why not.
    fn authenticate(
        &self,
        token: &str,
    ) -> impl std::future::Future<Output = Result<(String, String), String>> + Send;
}

/// Bootstrap tokens for the files source and local mode: a YAML list of
/// `{namespace, serviceAccount, token}`.
#[derive(Clone, Debug, Default)]
pub struct BootstrapTokens {
    by_token: BTreeMap<String, (String, String)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenEntry {
    namespace: String,
    service_account: String,
    token: String,
}

impl BootstrapTokens {
    pub fn load(path: &Path) -> Result<BootstrapTokens, CaError> {
        let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
        let entries: Vec<TokenEntry> =
            serde_yaml::from_str(&text).map_err(|e| file_error(path, e))?;
        let mut by_token = BTreeMap::new();
        for (i, e) in entries.into_iter().enumerate() {
            if e.token.len() < 16 {
                return Err(file_error(
                    path,
                    format!("[{i}].token: at least 16 characters"),
                ));
            }
            by_token.insert(e.token, (e.namespace, e.service_account));
        }
        Ok(BootstrapTokens { by_token })
    }

    pub fn insert(&mut self, token: String, namespace: &str, service_account: &str) {
        self.by_token
            .insert(token, (namespace.to_string(), service_account.to_string()));
    }
}

impl Authenticate for BootstrapTokens {
    async fn authenticate(&self, token: &str) -> Result<(String, String), String> {
        // Compare every entry in full, so timing says nothing about which
        // prefix matched.
        let mut found = None;
        for (t, who) in &self.by_token {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(who.clone());
            }
        }
        found.ok_or_else(|| "unknown token".to_string())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The gRPC service.
pub struct Service<A> {
    pub ca: std::sync::Arc<Ca>,
    pub auth: A,
}

#[tonic::async_trait]
impl<A: Authenticate> mesh_api::ca::certificate_service_server::CertificateService for Service<A> {
    async fn create_certificate(
        &self,
        request: Request<mesh_api::ca::CertificateRequest>,
    ) -> Result<Response<mesh_api::ca::CertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("a bearer token is required"))?
            .to_string();
        let (ns, sa) = self
            .auth
            .authenticate(&token)
            .await
            .map_err(|e| Status::unauthenticated(format!("token refused: {e}")))?;
        let req = request.into_inner();
        let ttl =
            (req.validity_seconds > 0).then(|| Duration::from_secs(req.validity_seconds as u64));
        match self.ca.sign(&req.csr, &ns, &sa, ttl) {
            Ok(chain) => {
                tracing::debug!(namespace = %ns, service_account = %sa, "certificate issued");
                Ok(Response::new(mesh_api::ca::CertificateResponse {
                    cert_chain: chain,
                    roots: self.ca.roots(),
                }))
            }
            Err(e @ CaError::Identity { .. }) => {
                tracing::warn!(namespace = %ns, service_account = %sa, error = %e, "CSR refused");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;

/// Kubernetes service-account tokens, checked by a TokenReview with the
/// mesh's audience: a token minted for anything else is refused.
#[derive(Clone)]
pub struct KubeTokens {
    pub client: kube::Client,
    pub audience: String,
}

impl Authenticate for KubeTokens {
    async fn authenticate(&self, token: &str) -> Result<(String, String), String> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let done = api
            .create(&Default::default(), &review)
            .await
            .map_err(|e| format!("TokenReview: {e}"))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(status.error.unwrap_or_else(|| "not authenticated".into()));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience))
        {
            return Err(format!("the token is not for audience {}", self.audience));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let mut parts = username.split(':');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("system"), Some("serviceaccount"), Some(ns), Some(sa), None)
                if !ns.is_empty() && !sa.is_empty() =>
            {
                Ok((ns.to_string(), sa.to_string()))
            }
            _ => Err(format!("{username:?} is not a service account")),
        }
    }
}

/// The ConfigMap every namespace gets with the mesh's roots (key
/// `root-cert.pem`), for workloads to mount.
pub const ROOT_CONFIGMAP: &str = "mesh-ca-root-cert";

/// Keeps `mesh-ca-root-cert` in every namespace, by server-side apply
/// (field manager `mesh-pilot`): for each namespace that appears in
/// `namespaces` (the Kubernetes source's watch, shared), and in all of them
/// again after a relist; when `roots()` changes (a root rotation), in every
/// namespace, checked every `recheck`. Terminating namespaces are left
/// alone.
pub async fn distribute_roots(
    client: kube::Client,
    mut namespaces: tokio::sync::watch::Receiver<crate::source::Namespaces>,
    roots: impl Fn() -> Vec<String> + Send + 'static,
    recheck: Duration,
) {
    let mut pem = roots().concat();
    let mut seen: std::collections::BTreeSet<String> = Default::default();
    // Lists already published for; `None` before the first.
    let mut lists = None;
    let mut tick = tokio::time::interval(recheck);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let targets: Vec<String> = tokio::select! {
            changed = namespaces.changed() => {
                if changed.is_err() {
                    return;
                }
                let view = namespaces.borrow_and_update().clone();
                if view.lists == 0 {
                    continue;
                }
                let relisted = lists != Some(view.lists);
                lists = Some(view.lists);
                let live: std::collections::BTreeSet<String> = view.live.into_keys().collect();
                let targets = live
                    .iter()
                    .filter(|n| relisted || !seen.contains(*n))
                    .cloned()
                    .collect();
                seen = live;
                targets
            }
            _ = tick.tick() => {
                let now = roots().concat();
                if now == pem {
                    continue;
                }
                tracing::info!("the mesh's roots changed: republishing");
                pem = now;
                seen.iter().cloned().collect()
            }
        };
        for name in targets {
            publish_root(&client, &name, &pem).await;
        }
    }
}

async fn publish_root(client: &kube::Client, name: &str, pem: &str) {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CONFIGMAP,
            "namespace": name,
            "labels": {"app.kubernetes.io/managed-by": "mesh-pilot"},
        },
        "data": {"root-cert.pem": pem},
    });
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), name);
    let params = kube::api::PatchParams::apply("mesh-pilot").force();
    match api
        .patch(ROOT_CONFIGMAP, &params, &kube::api::Patch::Apply(&cm))
        .await
    {
        Ok(_) => tracing::debug!(namespace = %name, "root certificate published"),
        Err(e) => {
            tracing::warn!(namespace = %name, error = %e, "cannot publish the root certificate")
        }
    }
}

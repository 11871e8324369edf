//! RequestAuthentication: JWTs checked per issuer.
//!
//! A request carrying a token (by default `Authorization: Bearer …` or
//! the `access_token` query parameter; `fromHeaders`, `fromParams` and
//! `fromCookies` replace the defaults) must carry a valid one from an
//! issuer the workload trusts, or it gets 401. A request without a token
//! passes unauthenticated; an AuthorizationPolicy decides whether that is
//! enough (`requestPrincipals`). Signatures are checked by `jsonwebtoken`
//! with the algorithm the token names, which must match the key's family
//! and the key's own `alg` when it has one, so `alg: none` and algorithm
//! confusion are refused.
//!
//! Keys come inline (`jwks`) or from `jwksUri`, fetched in the background
//! and refreshed every [`REFRESH`] (retried sooner after a failure); a
//! request waits for a first fetch at most the rule's `timeout` (5 s by
//! default), and fails closed after it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mesh_api::security::JwtRule;
use serde_json::{Map, Value};
use tokio::sync::watch;

/// How often a `jwksUri` is fetched again (Istio's default).
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `iss/sub`, what `requestPrincipals` match.
    pub principal: String,
    pub payload: Map<String, Value>,
}

impl Claims {
    /// `azp`.
    pub fn presenter(&self) -> Option<&str> {
        self.payload.get("azp")?.as_str()
    }

    /// `aud`, a string or a list of strings.
    pub fn audiences(&self) -> impl Iterator<Item = &str> {
        strings(self.payload.get("aud"))
    }

    /// A claim (nested by `path`) as strings: a string (and, when it holds
    /// spaces, each word, as OAuth `scope` lists are written), each string
    /// of a list, a number or boolean as written.
    pub fn claim_strings<'a>(
        &'a self,
        path: &[Box<str>],
    ) -> impl Iterator<Item = std::borrow::Cow<'a, str>> {
        let mut v = self.payload.get(path.first().map_or("", |p| &**p));
        for p in path.iter().skip(1) {
            v = v.and_then(|v| v.get(&**p));
        }
        let mut out: Vec<std::borrow::Cow<'a, str>> = Vec::new();
        let mut push = |v: &'a Value| match v {
            Value::String(s) => {
                out.push(s.as_str().into());
                if s.contains(' ') {
                    out.extend(s.split(' ').filter(|w| !w.is_empty()).map(Into::into));
                }
            }
            Value::Number(n) => out.push(n.to_string().into()),
            Value::Bool(b) => out.push(b.to_string().into()),
            _ => {}
        };
        match v {
            Some(Value::Array(items)) => items.iter().for_each(&mut push),
            Some(v) => push(v),
            None => {}
        }
        out.into_iter()
    }
}

fn strings(v: Option<&Value>) -> impl Iterator<Item = &str> {
    let (one, many) = match v {
        Some(Value::String(s)) => (Some(s.as_str()), None),
        Some(Value::Array(a)) => (None, Some(a.iter().filter_map(Value::as_str))),
        _ => (None, None),
    };
    one.into_iter().chain(many.into_iter().flatten())
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The token's issuer is not trusted here (or not where it was found).
    UnknownIssuer,
    /// Malformed, bad signature, expired, not yet valid, wrong audience.
    Invalid,
    /// The issuer's keys could not be fetched in time.
    NoKeys,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::UnknownIssuer => "Jwt issuer is not configured",
            Rejected::Invalid => "Jwt verification fails",
            Rejected::NoKeys => "Jwks remote fetch failed",
        }
    }
}

/// Where a rule looks for its token.
#[derive(Debug, Clone, PartialEq)]
enum Location {
    Header(HeaderName, String),
    Param(String),
    Cookie(String),
}

#[derive(Debug)]
enum Keys {
    Inline(Arc<JwkSet>),
    Remote(Arc<RemoteJwks>),
}

#[derive(Debug)]
struct Rule {
    issuer: String,
    audiences: Vec<String>,
    keys: Keys,
    locations: Vec<Location>,
    forward: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, Vec<Box<str>>)>,
    timeout: Duration,
}

/// A workload's compiled RequestAuthentication rules.
#[derive(Debug, Default)]
pub struct Authn {
    rules: Vec<Rule>,
    /// Every header a rule writes: removed from every request first, so a
    /// client cannot pass its own.
    output_headers: Vec<HeaderName>,
}

fn header(field: &str, name: &str) -> Result<HeaderName, String> {
    HeaderName::try_from(name).map_err(|_| format!("{field}: {name:?} is not a header name"))
}

impl Authn {
    pub fn new(rules: &[JwtRule], registry: &crate::cluster::Registry) -> Result<Authn, String> {
        let mut out = Authn::default();
        for (i, r) in rules.iter().enumerate() {
            let at = |e: String| format!("jwtRules[{i}] ({}): {e}", r.issuer);
            let keys = match (&r.jwks, &r.jwks_uri) {
                (Some(inline), _) => Keys::Inline(Arc::new(
                    serde_json::from_str::<JwkSet>(inline).map_err(|e| at(format!("jwks: {e}")))?,
                )),
                (None, Some(uri)) => {
                    let parsed: Uri = uri
                        .parse()
                        .map_err(|e| at(format!("jwksUri {uri:?}: {e}")))?;
                    if !matches!(parsed.scheme_str(), Some("http" | "https"))
                        || parsed.host().is_none()
                    {
                        return Err(at(format!("jwksUri {uri:?}: not an http(s) URL")));
                    }
                    Keys::Remote(registry.jwks(uri))
                }
                (None, None) => return Err(at("one of jwks or jwksUri is required".into())),
            };
            let mut locations = Vec::new();
            for h in &r.from_headers {
                locations.push(Location::Header(
                    header("fromHeaders", &h.name)?,
                    h.prefix.clone().unwrap_or_default(),
                ));
            }
            locations.extend(r.from_params.iter().cloned().map(Location::Param));
            locations.extend(r.from_cookies.iter().cloned().map(Location::Cookie));
            if locations.is_empty() {
                locations.push(Location::Header(
                    http::header::AUTHORIZATION,
                    "Bearer ".into(),
                ));
                locations.push(Location::Param("access_token".into()));
            }
            let payload_header = r
                .output_payload_to_header
                .as_deref()
                .map(|h| header("outputPayloadToHeader", h))
                .transpose()
                .map_err(at)?;
            let claim_headers = r
                .output_claim_to_headers
                .iter()
                .map(|c| {
                    Ok((
                        header("outputClaimToHeaders", &c.header)?,
                        c.claim.split('.').map(Into::into).collect(),
                    ))
                })
                .collect::<Result<Vec<_>, String>>()
                .map_err(at)?;
            out.output_headers.extend(payload_header.iter().cloned());
            out.output_headers
                .extend(claim_headers.iter().map(|(h, _)| h.clone()));
            out.rules.push(Rule {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                keys,
                locations,
                forward: r.forward_original_token,
                payload_header,
                claim_headers,
                timeout: r.timeout.as_ref().map_or(DEFAULT_TIMEOUT, |t| t.as_std()),
            });
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Starts fetching the remote key sets (called when the config is
    /// applied, so the first request rarely waits).
    pub fn prefetch(&self) {
        for r in &self.rules {
            if let Keys::Remote(k) = &r.keys {
                k.start();
            }
        }
    }

    /// Checks the request's token, if it has one, and applies the rule's
    /// header outputs. `Ok(None)`: no token.
    pub async fn authenticate(
        &self,
        headers: &mut HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<Claims>, Rejected> {
        for h in &self.output_headers {
            headers.remove(h);
        }
        let Some((token, location)) = self.find_token(headers, query) else {
            return Ok(None);
        };
        let issuer = unverified_issuer(&token).ok_or(Rejected::Invalid)?;
        let rule = self
            .rules
            .iter()
            .find(|r| r.issuer == issuer && r.locations.contains(&location))
            .ok_or(Rejected::UnknownIssuer)?;
        let keys = match &rule.keys {
            Keys::Inline(k) => k.clone(),
            Keys::Remote(r) => r.keys(rule.timeout).await.ok_or(Rejected::NoKeys)?,
        };
        let claims = verify(&token, rule, &keys).ok_or(Rejected::Invalid)?;
        if !rule.forward
            && let Location::Header(name, _) = &location
        {
            headers.remove(name);
        }
        if let Some(h) = &rule.payload_header
            && let Some(payload) = token.split('.').nth(1)
            && let Ok(v) = HeaderValue::from_str(payload)
        {
            headers.insert(h.clone(), v);
        }
        for (h, path) in &rule.claim_headers {
            let value = claims.claim_strings(path).next();
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(h.clone(), v);
            }
        }
        Ok(Some(claims))
    }

    fn find_token(&self, headers: &HeaderMap, query: Option<&str>) -> Option<(String, Location)> {
        for r in &self.rules {
            for l in &r.locations {
                let found = match l {
                    Location::Header(name, prefix) => headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| strip_prefix_ignore_case(v.trim(), prefix))
                        .map(|t| t.trim().to_string()),
                    Location::Param(p) => query.and_then(|q| {
                        q.split('&').find_map(|kv| {
                            let (k, v) = kv.split_once('=')?;
                            (k == p).then(|| v.to_string())
                        })
                    }),
                    Location::Cookie(c) => headers
                        .get_all(http::header::COOKIE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(|v| v.split(';'))
                        .find_map(|kv| {
                            let (k, v) = kv.trim().split_once('=')?;
                            (k == c).then(|| v.to_string())
                        }),
                };
                if let Some(t) = found.filter(|t| !t.is_empty()) {
                    return Some((t, l.clone()));
                }
            }
        }
        None
    }
}

fn strip_prefix_ignore_case<'a>(v: &'a str, prefix: &str) -> Option<&'a str> {
    let head = v.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &v[prefix.len()..])
}

/// The `iss` a token claims, read before its signature is checked only to
/// pick the rule (and keys) to check it with.
fn unverified_issuer(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: String,
    }
    let mut v = Validation::default();
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Iss>(token, &DecodingKey::from_secret(&[]), &v)
        .ok()
        .map(|d| d.claims.iss)
}

fn verify(token: &str, rule: &Rule, keys: &JwkSet) -> Option<Claims> {
    let header = jsonwebtoken::decode_header(token).ok()?;
    let alg = header.alg;
    let candidates: Vec<&Jwk> = match &header.kid {
        Some(kid) => keys
            .keys
            .iter()
            .filter(|k| k.common.key_id.as_deref() == Some(kid))
            .collect(),
        None => keys.keys.iter().collect(),
    };
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[&rule.issuer]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    // As Envoy: `exp` and `nbf` are checked when present, not required.
    validation.required_spec_claims.clear();
    validation.validate_nbf = true;
    for jwk in candidates {
        if jwk
            .common
            .key_algorithm
            .is_some_and(|ka| ka.to_string().parse::<Algorithm>().ok() != Some(alg))
        {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        if let Ok(data) = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation) {
            let sub = data.claims.get("sub").and_then(Value::as_str).unwrap_or("");
            return Some(Claims {
                principal: format!("{}/{sub}", rule.issuer),
                payload: data.claims,
            });
        }
    }
    None
}

/// A `jwksUri`'s keys, shared by every rule and config that names it.
#[derive(Debug)]
pub struct RemoteJwks {
    uri: String,
    current: watch::Sender<Option<Arc<JwkSet>>>,
    started: std::sync::atomic::AtomicBool,
}

impl RemoteJwks {
    pub fn new(uri: &str) -> Arc<RemoteJwks> {
        Arc::new(RemoteJwks {
            uri: uri.to_string(),
            current: watch::channel(None).0,
            started: Default::default(),
        })
    }

    /// Starts the background fetcher once, when a runtime is there to run
    /// it; it stops when the last config using the URI is gone.
    fn start(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        rt.spawn(refresh_loop(weak, self.uri.clone()));
    }

    async fn keys(self: &Arc<Self>, wait: Duration) -> Option<Arc<JwkSet>> {
        self.start();
        let mut rx = self.current.subscribe();
        let got = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        match got {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    }
}

async fn refresh_loop(jwks: Weak<RemoteJwks>, uri: String) {
    let mut retry = Duration::from_millis(500);
    loop {
        let result = fetch(&uri).await;
        let Some(strong) = jwks.upgrade() else { return };
        let wait = match result {
            Ok(set) => {
                strong.current.send_replace(Some(Arc::new(set)));
                retry = Duration::from_millis(500);
                REFRESH
            }
            Err(e) => {
                tracing::warn!(%uri, error = %e, "fetching JWKS failed");
                retry = (retry * 2).min(Duration::from_secs(60));
                retry
            }
        };
        drop(strong);
        tokio::time::sleep(wait).await;
    }
}

/// GETs a JWKS document (HTTP/1.1, plain or TLS with the system roots).
async fn fetch(uri: &str) -> Result<JwkSet, String> {
    tokio::time::timeout(DEFAULT_TIMEOUT, fetch_inner(uri))
        .await
        .map_err(|_| format!("no answer within {DEFAULT_TIMEOUT:?}"))?
}

async fn fetch_inner(uri: &str) -> Result<JwkSet, String> {
    let parsed: Uri = uri.parse().map_err(|e| format!("{e}"))?;
    let host = parsed.host().ok_or("no host")?.to_string();
    let https = parsed.scheme_str() == Some("https");
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(
            http::header::HOST,
            parsed.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let body = if https {
        let tls = crate::tls::Origination::new(
            &mesh_api::networking::ClientTlsSettings {
                mode: mesh_api::networking::ClientTlsMode::Simple,
                ..Default::default()
            },
            &host,
        )?;
        let stream = tls.connect(tcp, crate::tls::Inner::Http1).await?;
        send(stream, req).await?
    } else {
        send(tcp, req).await?
    };
    serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))
}

async fn send<S>(io: S, req: http::Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string())
}

/// `jwksUri` key sets, weakly held by URI.
#[derive(Default)]
pub struct JwksRegistry(Mutex<HashMap<String, Weak<RemoteJwks>>>);

impl JwksRegistry {
    pub fn get(&self, uri: &str) -> Arc<RemoteJwks> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get(uri).and_then(Weak::upgrade) {
            return k;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let k = RemoteJwks::new(uri);
        map.insert(uri.to_string(), Arc::downgrade(&k));
        k
    }
}

#[cfg(test)]
mod tests;

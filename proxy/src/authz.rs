//! AuthorizationPolicy enforcement with Istio's semantics.
//!
//! A workload's policies are compiled once per config into matchers; a
//! request or TCP connection is then decided without allocating: DENY
//! policies first (any match denies), AUDIT policies only mark, and when
//! at least one ALLOW policy applies, a request must match one of them.
//! A policy matches when any of its rules does; a rule when every part
//! that is set does (`from` entries OR-ed, `to` entries OR-ed, `when`
//! conditions AND-ed); a field when any of its values matches and none of
//! its not-values does.
//!
//! TCP connections have no HTTP attributes. As in Istio, a rule that
//! needs one (hosts, methods, paths, requestPrincipals, `request.*` keys)
//! never matches in an ALLOW policy, and in a DENY or AUDIT policy the
//! HTTP-only parts are left out, so the rule matches more: both fail
//! closed.
//!
//! Paths are normalized by [`normalize_path`] before anything looks at
//! them, and the normalized path is the one forwarded, so what is decided
//! is what the app receives.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderMap;
use ipnet::IpNet;
use mesh_api::model::AuthorizationRules;
use mesh_api::security::{AuthorizationAction, Condition, Operation, Source};
use mesh_api::validate::{claim_path, parse_cidr};

use crate::jwt::Claims;

/// What a decision is made on.
pub struct Attrs<'a> {
    /// The connection's peer.
    pub source: SocketAddr,
    /// The original client: for a sidecar the last address of
    /// `x-forwarded-for` when present, else the peer.
    pub remote_ip: IpAddr,
    /// Where the client connected to (the original destination).
    pub destination: SocketAddr,
    /// The verified mTLS peer (`spiffe://td/ns/x/sa/y`).
    pub principal: Option<&'a str>,
    /// The SNI of the mTLS connection.
    pub sni: Option<&'a str>,
    /// `None` for TCP.
    pub http: Option<HttpAttrs<'a>>,
}

pub struct HttpAttrs<'a> {
    /// Without the port.
    pub host: &'a str,
    pub method: &'a str,
    /// Normalized, without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The verified JWT, when the request carried one.
    pub auth: Option<&'a Claims>,
}

impl Attrs<'_> {
    /// The principal as Istio's policies write it: without `spiffe://`.
    fn principal(&self) -> Option<&str> {
        self.principal
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
    }

    fn source_namespace(&self) -> Option<&str> {
        let p = self.principal?;
        let rest = &p[p.find("/ns/")? + 4..];
        Some(rest.split('/').next().unwrap_or(rest))
    }
}

/// A string match: exact, `prefix*`, `*suffix` or `*` (present).
#[derive(Debug)]
enum Str {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Any,
}

impl Str {
    fn parse(v: &str) -> Str {
        if v == "*" {
            Str::Any
        } else if let Some(p) = v.strip_suffix('*') {
            Str::Prefix(p.into())
        } else if let Some(s) = v.strip_prefix('*') {
            Str::Suffix(s.into())
        } else {
            Str::Exact(v.into())
        }
    }

    fn is(&self, s: &str) -> bool {
        match self {
            Str::Exact(e) => s == &**e,
            Str::Prefix(p) => s.starts_with(&**p),
            Str::Suffix(x) => s.ends_with(&**x),
            Str::Any => !s.is_empty(),
        }
    }

    /// For hosts: ASCII case-insensitive.
    fn is_ignoring_case(&self, s: &str) -> bool {
        let s = s.as_bytes();
        match self {
            Str::Exact(e) => s.eq_ignore_ascii_case(e.as_bytes()),
            Str::Prefix(p) => s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p.as_bytes()),
            Str::Suffix(x) => {
                s.len() >= x.len() && s[s.len() - x.len()..].eq_ignore_ascii_case(x.as_bytes())
            }
            Str::Any => !s.is_empty(),
        }
    }
}

/// Values and not-values of one field.
#[derive(Debug)]
struct Field<M> {
    is: Vec<M>,
    not: Vec<M>,
}

impl<M> Default for Field<M> {
    fn default() -> Self {
        Field {
            is: Vec::new(),
            not: Vec::new(),
        }
    }
}

impl<M> Field<M> {
    fn build<E>(
        is: &[String],
        not: &[String],
        f: impl Fn(&str) -> Result<M, E>,
    ) -> Result<Field<M>, E> {
        Ok(Field {
            is: is.iter().map(|v| f(v)).collect::<Result<_, _>>()?,
            not: not.iter().map(|v| f(v)).collect::<Result<_, _>>()?,
        })
    }

    fn is_set(&self) -> bool {
        !self.is.is_empty() || !self.not.is_empty()
    }

    /// Any value matches (or there are none) and no not-value does.
    fn check(&self, f: impl Fn(&M) -> bool) -> bool {
        (self.is.is_empty() || self.is.iter().any(&f)) && !self.not.iter().any(&f)
    }
}

fn str_field(is: &[String], not: &[String]) -> Field<Str> {
    Field {
        is: is.iter().map(|v| Str::parse(v)).collect(),
        not: not.iter().map(|v| Str::parse(v)).collect(),
    }
}

fn net(v: &str) -> Result<IpNet, String> {
    let (ip, len) = parse_cidr(v).map_err(|e| format!("{v:?}: {e}"))?;
    IpNet::new(ip, len)
        .map(|n| n.trunc())
        .map_err(|e| format!("{v:?}: {e}"))
}

fn port(v: &str) -> Result<u16, String> {
    v.parse().map_err(|_| format!("{v:?} is not a port number"))
}

#[derive(Debug, Default)]
struct SourceM {
    principals: Field<Str>,
    request_principals: Field<Str>,
    namespaces: Field<Str>,
    ip_blocks: Field<IpNet>,
    remote_ip_blocks: Field<IpNet>,
}

impl SourceM {
    fn build(s: &Source, policy_ns: &str) -> Result<SourceM, String> {
        // serviceAccounts `ns/name` (or `name` in the policy's namespace)
        // are principals of any trust domain ending in `/ns/ns/sa/name`.
        let sa = |v: &String| {
            let (ns, name) = v.split_once('/').unwrap_or((policy_ns, v));
            format!("*/ns/{ns}/sa/{name}")
        };
        let mut principals = s.principals.clone();
        principals.extend(s.service_accounts.iter().map(sa));
        let mut not_principals = s.not_principals.clone();
        not_principals.extend(s.not_service_accounts.iter().map(sa));
        Ok(SourceM {
            principals: str_field(&principals, &not_principals),
            request_principals: str_field(&s.request_principals, &s.not_request_principals),
            namespaces: str_field(&s.namespaces, &s.not_namespaces),
            ip_blocks: Field::build(&s.ip_blocks, &s.not_ip_blocks, net)?,
            remote_ip_blocks: Field::build(&s.remote_ip_blocks, &s.not_remote_ip_blocks, net)?,
        })
    }

    fn matches(&self, a: &Attrs<'_>, lenient: bool) -> bool {
        let principal = a.principal();
        let namespace = a.source_namespace();
        self.principals
            .check(|m| principal.is_some_and(|p| m.is(p)))
            && self
                .namespaces
                .check(|m| namespace.is_some_and(|n| m.is(n)))
            && self.ip_blocks.check(|n| n.contains(&a.source.ip()))
            && self.remote_ip_blocks.check(|n| n.contains(&a.remote_ip))
            && (!self.request_principals.is_set()
                || match &a.http {
                    None => lenient,
                    Some(h) => {
                        let rp = h.auth.map(|c| c.principal.as_str());
                        self.request_principals
                            .check(|m| rp.is_some_and(|p| m.is(p)))
                    }
                })
    }
}

#[derive(Debug, Default)]
struct OperationM {
    hosts: Field<Str>,
    ports: Field<u16>,
    methods: Field<Str>,
    paths: Field<Str>,
}

impl OperationM {
    fn build(o: &Operation) -> Result<OperationM, String> {
        Ok(OperationM {
            hosts: str_field(&o.hosts, &o.not_hosts),
            ports: Field::build(&o.ports, &o.not_ports, port)?,
            methods: str_field(&o.methods, &o.not_methods),
            paths: str_field(&o.paths, &o.not_paths),
        })
    }

    fn matches(&self, a: &Attrs<'_>, lenient: bool) -> bool {
        if !self.ports.check(|p| *p == a.destination.port()) {
            return false;
        }
        if !(self.hosts.is_set() || self.methods.is_set() || self.paths.is_set()) {
            return true;
        }
        match &a.http {
            None => lenient,
            Some(h) => {
                self.hosts.check(|m| m.is_ignoring_case(h.host))
                    && self.methods.check(|m| m.is(h.method))
                    && self.paths.check(|m| m.is(h.path))
            }
        }
    }
}

#[derive(Debug)]
enum Key {
    Header(http::HeaderName),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    Claim(Vec<Box<str>>),
    DestinationIp,
    DestinationPort,
    Sni,
}

impl Key {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Key::Header(_)
                | Key::AuthPrincipal
                | Key::AuthAudiences
                | Key::AuthPresenter
                | Key::Claim(_)
        )
    }
}

#[derive(Debug)]
enum Values {
    Str(Field<Str>),
    Net(Field<IpNet>),
    Port(Field<u16>),
}

#[derive(Debug)]
struct ConditionM {
    key: Key,
    values: Values,
}

impl ConditionM {
    fn build(c: &Condition) -> Result<ConditionM, String> {
        let key = match c.key.as_str() {
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "source.namespace" => Key::SourceNamespace,
            "source.principal" => Key::SourcePrincipal,
            "request.auth.principal" => Key::AuthPrincipal,
            "request.auth.audiences" => Key::AuthAudiences,
            "request.auth.presenter" => Key::AuthPresenter,
            "destination.ip" => Key::DestinationIp,
            "destination.port" => Key::DestinationPort,
            "connection.sni" => Key::Sni,
            k => {
                if let Some(name) = k
                    .strip_prefix("request.headers[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    Key::Header(
                        http::HeaderName::try_from(name)
                            .map_err(|_| format!("{k:?}: {name:?} is not a header name"))?,
                    )
                } else if let Some(path) = claim_path(k) {
                    Key::Claim(path.into_iter().map(Into::into).collect())
                } else {
                    return Err(format!("unknown condition key {k:?}"));
                }
            }
        };
        let values = match key {
            Key::SourceIp | Key::RemoteIp | Key::DestinationIp => {
                Values::Net(Field::build(&c.values, &c.not_values, net)?)
            }
            Key::DestinationPort => Values::Port(Field::build(&c.values, &c.not_values, port)?),
            _ => Values::Str(str_field(&c.values, &c.not_values)),
        };
        Ok(ConditionM { key, values })
    }

    fn matches(&self, a: &Attrs<'_>, lenient: bool) -> bool {
        if self.key.http_only() && a.http.is_none() {
            return lenient;
        }
        let auth = a.http.as_ref().and_then(|h| h.auth);
        match (&self.key, &self.values) {
            (Key::SourceIp, Values::Net(f)) => f.check(|n| n.contains(&a.source.ip())),
            (Key::RemoteIp, Values::Net(f)) => f.check(|n| n.contains(&a.remote_ip)),
            (Key::DestinationIp, Values::Net(f)) => f.check(|n| n.contains(&a.destination.ip())),
            (Key::DestinationPort, Values::Port(f)) => f.check(|p| *p == a.destination.port()),
            (key, Values::Str(f)) => match key {
                Key::SourceNamespace => one(f, a.source_namespace()),
                Key::SourcePrincipal => one(f, a.principal()),
                Key::Sni => one(f, a.sni),
                Key::AuthPrincipal => one(f, auth.map(|c| c.principal.as_str())),
                Key::AuthPresenter => one(f, auth.and_then(|c| c.presenter())),
                Key::AuthAudiences => {
                    f.check(|m| auth.is_some_and(|c| c.audiences().any(|v| m.is(v))))
                }
                Key::Claim(path) => {
                    f.check(|m| auth.is_some_and(|c| c.claim_strings(path).any(|v| m.is(&v))))
                }
                Key::Header(name) => f.check(|m| {
                    a.http.as_ref().is_some_and(|h| {
                        h.headers
                            .get_all(name)
                            .iter()
                            .any(|v| v.to_str().is_ok_and(|v| m.is(v)))
                    })
                }),
                _ => false,
            },
            _ => false,
        }
    }
}

fn one(f: &Field<Str>, v: Option<&str>) -> bool {
    f.check(|m| v.is_some_and(|v| m.is(v)))
}

#[derive(Debug, Default)]
struct RuleM {
    from: Vec<SourceM>,
    to: Vec<OperationM>,
    when: Vec<ConditionM>,
}

impl RuleM {
    fn matches(&self, a: &Attrs<'_>, lenient: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a, lenient)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, lenient)))
            && self.when.iter().all(|c| c.matches(a, lenient))
    }
}

#[derive(Debug)]
struct Policy {
    name: Arc<str>,
    rules: Vec<RuleM>,
}

impl Policy {
    fn build(p: &AuthorizationRules) -> Result<Policy, String> {
        let ns = p.name.split('/').next().unwrap_or("");
        let rules = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = |what: &str, j: usize, e: String| format!("rules[{i}].{what}[{j}]: {e}");
                Ok(RuleM {
                    from: r
                        .from
                        .iter()
                        .enumerate()
                        .map(|(j, f)| SourceM::build(&f.source, ns).map_err(|e| at("from", j, e)))
                        .collect::<Result<_, String>>()?,
                    to: r
                        .to
                        .iter()
                        .enumerate()
                        .map(|(j, t)| OperationM::build(&t.operation).map_err(|e| at("to", j, e)))
                        .collect::<Result<_, String>>()?,
                    when: r
                        .when
                        .iter()
                        .enumerate()
                        .map(|(j, c)| ConditionM::build(c).map_err(|e| at("when", j, e)))
                        .collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<_, String>>()
            .map_err(|e| format!("authorization policy {}: {e}", p.name))?;
        Ok(Policy {
            name: p.name.as_str().into(),
            rules,
        })
    }

    fn matches(&self, a: &Attrs<'_>, lenient: bool) -> bool {
        self.rules.iter().any(|r| r.matches(a, lenient))
    }
}

/// A workload's compiled policies.
#[derive(Debug, Default)]
pub struct Authz {
    deny: Vec<Policy>,
    audit: Vec<Policy>,
    allow: Vec<Policy>,
}

/// The outcome for one request or connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    /// The policy that denied it; for a request no ALLOW policy matched,
    /// `allow-policies`.
    pub denied_by: Option<Arc<str>>,
    /// The AUDIT policy that marked it.
    pub audited_by: Option<Arc<str>>,
}

/// What [`Decision::denied_by`] names when ALLOW policies exist and none
/// matched.
pub const NO_ALLOW_MATCH: &str = "no ALLOW policy matched";

impl Authz {
    pub fn new(policies: &[AuthorizationRules]) -> Result<Authz, String> {
        let mut a = Authz::default();
        for p in policies {
            let compiled = Policy::build(p)?;
            match p.action {
                AuthorizationAction::Deny => a.deny.push(compiled),
                AuthorizationAction::Audit => a.audit.push(compiled),
                AuthorizationAction::Allow => a.allow.push(compiled),
                AuthorizationAction::Custom => {
                    return Err(format!(
                        "authorization policy {}: action CUSTOM is not supported",
                        p.name
                    ));
                }
            }
        }
        Ok(a)
    }

    /// No policy applies: every request is allowed without looking.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.audit.is_empty() && self.allow.is_empty()
    }

    pub fn decide(&self, a: &Attrs<'_>) -> Decision {
        let audited_by = self
            .audit
            .iter()
            .find(|p| p.matches(a, true))
            .map(|p| p.name.clone());
        if let Some(p) = self.deny.iter().find(|p| p.matches(a, true)) {
            return Decision {
                denied_by: Some(p.name.clone()),
                audited_by,
            };
        }
        let denied_by = (!self.allow.is_empty() && !self.allow.iter().any(|p| p.matches(a, false)))
            .then(|| NO_ALLOW_MATCH.into());
        Decision {
            denied_by,
            audited_by,
        }
    }
}

/// Why a request path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C`: an encoded `/` or `\` would let a path mean one
    /// thing to the policy and another to the app.
    EncodedSlash,
    /// A raw `\`.
    Backslash,
    /// `%` not followed by two hex digits.
    BadEscape,
}

impl PathError {
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::EncodedSlash => "encoded '/' or '\\' in the path",
            PathError::Backslash => "'\\' in the path",
            PathError::BadEscape => "invalid percent-encoding in the path",
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes a request path (without its query): percent-encoded
/// unreserved characters are decoded and other escapes upper-cased,
/// repeated slashes merged, and `.` and `..` segments resolved (never
/// above the root). Encoded slashes and backslashes are refused. Returns
/// the input unchanged, without allocating, when it is already normal.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if b.contains(&b'\\') {
        return Err(PathError::Backslash);
    }
    let needs_work = b.contains(&b'%')
        || b.windows(2).any(|w| w == b"//" || w == b"/.")
        || !b.starts_with(b"/")
        || b == b"*";
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    if path == "*" {
        // `OPTIONS *`: no path to normalize.
        return Ok(Cow::Borrowed(path));
    }
    // Percent-decoding of unreserved characters.
    let mut decoded = Vec::with_capacity(b.len() + 1);
    if !b.starts_with(b"/") {
        decoded.push(b'/');
    }
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let c = h * 16 + l;
            if c == b'/' || c == b'\\' {
                return Err(PathError::EncodedSlash);
            }
            if unreserved(c) {
                decoded.push(c);
            } else {
                decoded.push(b'%');
                decoded.extend_from_slice(&[b[i + 1], b[i + 2]].map(|x| x.to_ascii_uppercase()));
            }
            i += 3;
        } else {
            decoded.push(b[i]);
            i += 1;
        }
    }
    // Segments, with `//` merged and dot segments resolved (RFC 3986
    // §5.2.4). A trailing slash or a final dot segment keeps the result a
    // directory.
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = decoded[1..].split(|c| *c == b'/').collect();
    let last = segments.len() - 1;
    let mut trailing = false;
    for (n, seg) in segments.into_iter().enumerate() {
        match seg {
            b"" => trailing = n == last && !out.is_empty(),
            b"." => trailing = n == last && !out.is_empty(),
            b".." => {
                out.pop();
                trailing = n == last && !out.is_empty();
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut result = Vec::with_capacity(decoded.len());
    for s in &out {
        result.push(b'/');
        result.extend_from_slice(s);
    }
    if out.is_empty() || trailing {
        result.push(b'/');
    }
    // Only ASCII bytes were replaced by ASCII bytes: still UTF-8.
    match String::from_utf8(result) {
        Ok(s) if s == path => Ok(Cow::Borrowed(path)),
        Ok(s) => Ok(Cow::Owned(s)),
        Err(_) => Err(PathError::BadEscape),
    }
}

#[cfg(test)]
mod tests;

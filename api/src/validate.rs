//! Validation: every problem of a resource with its field path, and the
//! problems only a set of resources shows (a subset no DestinationRule
//! defines, a gateway that does not exist, two VirtualServices for one host,
//! conflicting PeerAuthentications).
//!
//! The rules are Istio's (what its API server and `istioctl analyze`
//! reject), plus the mesh's own kind RateLimitPolicy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::duration::Duration;
use crate::networking::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, CorsPolicy, Destination,
    DestinationRuleSpec, GatewaySpec, Headers, HttpMatchRequest, HttpRoute, LoadBalancerSettings,
    OutlierDetection, Percent, RateLimit, RateLimitPolicySpec, ServerTlsMode, ServerTlsSettings,
    ServiceEntryResolution, ServiceEntrySpec, SidecarSpec, StringMatch, TrafficPolicy,
    VirtualServiceSpec, WorkloadEntrySpec,
};
use crate::resource::{ROOT_NAMESPACE, Resource, ResourceKey};
use crate::security::{
    AuthorizationAction, AuthorizationPolicySpec, PeerAuthenticationSpec, PolicyTargetReference,
    RequestAuthenticationSpec,
};
use crate::selector::WorkloadSelector;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem of one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub resource: ResourceKey,
    /// Field path, e.g. `spec.http[1].route`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    /// `spec.http[1].route: weights must add up to 100, got 90`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The gRPC status names in code order (`UNAVAILABLE` is 14).
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Conditions `retries.retryOn` accepts besides status codes.
pub const RETRY_ON: [&str; 16] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

const PROTOCOLS: [&str; 9] = [
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "UDP",
];

/// Largest compiled size of a user regex: bounds the memory and time one
/// resource can cost the proxies.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

struct Checker<'a> {
    key: &'a ResourceKey,
    out: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn err(&mut self, path: impl fmt::Display, message: impl Into<String>) {
        self.push(Severity::Error, path, message);
    }

    fn warn(&mut self, path: impl fmt::Display, message: impl Into<String>) {
        self.push(Severity::Warning, path, message);
    }

    fn push(&mut self, severity: Severity, path: impl fmt::Display, message: impl Into<String>) {
        self.out.push(Problem {
            severity,
            resource: self.key.clone(),
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn regex(&mut self, path: impl fmt::Display, re: &str) {
        if let Err(e) = compile_regex(re) {
            self.err(
                path,
                format!("invalid regex {re:?}: {}", one_line(&e.to_string())),
            );
        }
    }

    fn string_match(&mut self, path: &str, m: &StringMatch, allow_empty: bool) {
        match m.forms_set() {
            0 if allow_empty => {}
            0 => self.err(path, "one of exact, prefix or regex must be set"),
            1 => {}
            _ => self.err(path, "only one of exact, prefix or regex may be set"),
        }
        if let Some(re) = &m.regex {
            self.regex(format!("{path}.regex"), re);
        }
    }

    /// Istio's rule for timeouts and intervals: at least 1ms, whole
    /// milliseconds.
    fn duration(&mut self, path: impl fmt::Display, d: &Duration) {
        let nanos = d.0.as_nanos();
        if nanos < 1_000_000 {
            self.err(
                path,
                format!("duration {d} is out of range: must be at least 1ms"),
            );
        } else if !nanos.is_multiple_of(1_000_000) {
            self.err(
                path,
                format!("duration {d} is out of range: only whole milliseconds are supported"),
            );
        }
    }

    fn percent(&mut self, path: impl fmt::Display, p: f64) {
        if !(0.0..=100.0).contains(&p) || p.is_nan() {
            self.err(
                path,
                format!("percentage must be between 0 and 100, got {p}"),
            );
        }
    }

    fn port(&mut self, path: impl fmt::Display, p: u32) {
        if p == 0 || p > 65535 {
            self.err(path, format!("port number {p} is out of range 1-65535"));
        }
    }

    fn host(&mut self, path: impl fmt::Display, h: &str) {
        if let Err(why) = check_host(h) {
            self.err(path, format!("invalid host {h:?}: {why}"));
        }
    }

    fn header_name(&mut self, path: impl fmt::Display, name: &str) {
        if !is_token(name) {
            self.err(path, format!("invalid header name {name:?}"));
        }
    }

    fn cidr(&mut self, path: impl fmt::Display, s: &str) {
        if let Err(why) = parse_cidr(s) {
            self.err(path, format!("invalid IP address or CIDR {s:?}: {why}"));
        }
    }

    fn export_to(&mut self, list: &[String]) {
        for (i, e) in list.iter().enumerate() {
            if e != "." && e != "*" && e != "~" && check_dns_label(e).is_err() {
                self.err(
                    format!("spec.exportTo[{i}]"),
                    format!("{e:?} is not \".\", \"*\", \"~\" or a namespace name"),
                );
            }
        }
        if list.len() > 1 && list.iter().any(|e| e == "*" || e == "~") {
            self.err(
                "spec.exportTo",
                "\"*\" and \"~\" cannot be combined with other entries",
            );
        }
    }

    fn selector(&mut self, path: &str, s: &WorkloadSelector) {
        for (k, v) in &s.match_labels {
            if k.is_empty() {
                self.err(format!("{path}.matchLabels"), "label key must not be empty");
            }
            if v.contains('*') {
                self.err(
                    format!("{path}.matchLabels[{k}]"),
                    "wildcards are not allowed in label values",
                );
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Compiles a user regex the way the proxy will: RE2 syntax, whole-string
/// match, bounded size. Errors quote the user's pattern, not the anchors.
pub fn compile_regex(re: &str) -> Result<regex::Regex, regex::Error> {
    let build = |pattern: &str| {
        regex::RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
    };
    build(&format!("^(?:{re})$")).map_err(|e| build(re).err().unwrap_or(e))
}

/// RFC 7230 token (header names, methods).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || s.starts_with('-') || s.ends_with('-') {
        return Err(
            "must be lower-case letters, digits and '-', starting and ending with a letter or digit"
                .into(),
        );
    }
    Ok(())
}

/// A Kubernetes object name (DNS-1123 subdomain).
pub fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err("must be at most 253 characters".into());
    }
    for part in s.split('.') {
        check_dns_label(part)?;
    }
    Ok(())
}

/// A host as VirtualService and DestinationRule write it: a DNS name,
/// optionally with a leading `*.` (or just `*`), no port.
pub fn check_host(h: &str) -> Result<(), String> {
    if h.is_empty() {
        return Err("must not be empty".into());
    }
    if h == "*" {
        return Ok(());
    }
    if h.contains(':') {
        return Err("must not contain a port".into());
    }
    if h.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if h.starts_with('*') && rest.len() == h.len() {
        return Err("a wildcard must be the whole first label (\"*.example.com\")".into());
    }
    if rest.len() > 253 {
        return Err("must be at most 253 characters".into());
    }
    for label in rest.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("label {label:?} is not a valid DNS label"));
        }
    }
    Ok(())
}

/// An IP address or a CIDR block.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| "not an IP address".to_string())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length must be 0-{max}"))?,
        None => max,
    };
    Ok((ip, len))
}

/// The fully qualified name of a host written in `namespace`: a short name
/// (no dot) is `name.namespace.svc.cluster.local`, anything else as written.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') || host.parse::<IpAddr>().is_ok() {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// Validates one resource alone.
pub fn validate(resource: &Resource) -> Vec<Problem> {
    let key = resource.key();
    let mut c = Checker {
        key: &key,
        out: Vec::new(),
    };
    match resource.metadata().name.as_deref() {
        None | Some("") => c.err("metadata.name", "required"),
        Some(n) => {
            if let Err(why) = check_name(n) {
                c.err("metadata.name", format!("invalid name {n:?}: {why}"));
            }
        }
    }
    if let Some(ns) = resource.metadata().namespace.as_deref()
        && let Err(why) = check_dns_label(ns)
    {
        c.err(
            "metadata.namespace",
            format!("invalid namespace {ns:?}: {why}"),
        );
    }
    match resource {
        Resource::VirtualService(r) => virtual_service(&mut c, &r.spec),
        Resource::DestinationRule(r) => destination_rule(&mut c, &r.spec),
        Resource::Gateway(r) => gateway(&mut c, &r.spec),
        Resource::ServiceEntry(r) => service_entry(&mut c, &r.spec),
        Resource::Sidecar(r) => sidecar(&mut c, &r.spec),
        Resource::WorkloadEntry(r) => workload_entry(&mut c, &r.spec),
        Resource::RateLimitPolicy(r) => rate_limit_policy(&mut c, &r.spec),
        Resource::PeerAuthentication(r) => peer_authentication(&mut c, &r.spec),
        Resource::AuthorizationPolicy(r) => authorization_policy(&mut c, &r.spec),
        Resource::RequestAuthentication(r) => request_authentication(&mut c, &r.spec),
    }
    c.out
}

// ---------------------------------------------------------------------------
// VirtualService
// ---------------------------------------------------------------------------

fn virtual_service(c: &mut Checker, s: &VirtualServiceSpec) {
    let mesh_bound = s.gateways.is_empty() || s.gateways.iter().any(|g| g == "mesh");
    for (i, h) in s.hosts.iter().enumerate() {
        c.host(format!("spec.hosts[{i}]"), h);
        if h == "*" && mesh_bound {
            c.err(
                format!("spec.hosts[{i}]"),
                "wildcard host \"*\" is not allowed for VirtualServices bound to the mesh",
            );
        }
    }
    for (i, g) in s.gateways.iter().enumerate() {
        check_gateway_ref(c, &format!("spec.gateways[{i}]"), g);
    }
    if s.http.is_empty() && s.tcp.is_empty() && s.tls.is_empty() {
        c.err(
            "spec",
            "at least one of http, tcp or tls routes is required",
        );
    }
    let delegate_vs = s.hosts.is_empty();
    for (i, route) in s.http.iter().enumerate() {
        http_route(c, &format!("spec.http[{i}]"), route, delegate_vs);
    }
    for (i, r) in s.tls.iter().enumerate() {
        let p = format!("spec.tls[{i}]");
        if r.match_.is_empty() {
            c.err(format!("{p}.match"), "TLS routes need at least one match");
        }
        for (j, m) in r.match_.iter().enumerate() {
            let mp = format!("{p}.match[{j}]");
            if m.sni_hosts.is_empty() {
                c.err(
                    format!("{mp}.sniHosts"),
                    "at least one SNI host is required",
                );
            }
            for (k, sni) in m.sni_hosts.iter().enumerate() {
                c.host(format!("{mp}.sniHosts[{k}]"), sni);
                if !s
                    .hosts
                    .iter()
                    .any(|h| host_covers(h, sni) || host_covers(sni, h))
                {
                    c.err(
                        format!("{mp}.sniHosts[{k}]"),
                        format!("SNI host {sni:?} does not match any host of the VirtualService"),
                    );
                }
            }
            for (k, sn) in m.destination_subnets.iter().enumerate() {
                c.cidr(format!("{mp}.destinationSubnets[{k}]"), sn);
            }
            if let Some(port) = m.port {
                c.port(format!("{mp}.port"), port);
            }
            for (k, g) in m.gateways.iter().enumerate() {
                check_gateway_ref(c, &format!("{mp}.gateways[{k}]"), g);
            }
        }
        l4_route_destinations(c, &p, &r.route);
    }
    for (i, r) in s.tcp.iter().enumerate() {
        let p = format!("spec.tcp[{i}]");
        for (j, m) in r.match_.iter().enumerate() {
            let mp = format!("{p}.match[{j}]");
            for (k, sn) in m.destination_subnets.iter().enumerate() {
                c.cidr(format!("{mp}.destinationSubnets[{k}]"), sn);
            }
            if let Some(port) = m.port {
                c.port(format!("{mp}.port"), port);
            }
            for (k, g) in m.gateways.iter().enumerate() {
                check_gateway_ref(c, &format!("{mp}.gateways[{k}]"), g);
            }
        }
        l4_route_destinations(c, &p, &r.route);
    }
    c.export_to(&s.export_to);
}

/// True when host pattern `pattern` covers `host` (`*.a.com` covers `b.a.com`).
pub fn host_covers(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern.eq_ignore_ascii_case(host) {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => false,
    }
}

fn check_gateway_ref(c: &mut Checker, path: &str, g: &str) {
    if g == "mesh" {
        return;
    }
    let (ns, name) = g.split_once('/').unwrap_or(("", g));
    if !ns.is_empty() && check_dns_label(ns).is_err() {
        c.err(path, format!("invalid gateway namespace in {g:?}"));
    }
    if let Err(why) = check_name(name) {
        c.err(path, format!("invalid gateway name {g:?}: {why}"));
    }
}

fn destination(c: &mut Checker, path: &str, d: &Destination) {
    if d.host.is_empty() {
        c.err(format!("{path}.host"), "required");
    } else {
        c.host(format!("{path}.host"), &d.host);
        if d.host == "*" {
            c.err(
                format!("{path}.host"),
                "a destination cannot be the wildcard \"*\"",
            );
        }
    }
    if let Some(s) = &d.subset
        && let Err(why) = check_dns_label(s)
    {
        c.err(
            format!("{path}.subset"),
            format!("invalid subset name {s:?}: {why}"),
        );
    }
    if let Some(p) = d.port {
        c.port(format!("{path}.port.number"), p.number);
    }
}

fn weights(c: &mut Checker, path: &str, ws: &[Option<i32>]) {
    let mut sum: i64 = 0;
    for (i, w) in ws.iter().enumerate() {
        if let Some(w) = *w {
            if !(0..=100).contains(&w) {
                c.err(
                    format!("{path}[{i}].weight"),
                    format!("weight must be between 0 and 100, got {w}"),
                );
            }
            sum += i64::from(w);
        }
    }
    let any_set = ws.iter().any(Option::is_some);
    if (ws.len() > 1 || any_set) && sum != 100 {
        if ws.len() == 1 && ws[0] == Some(0) {
            c.err(path, "weights must add up to 100, got 0");
        } else if ws.len() > 1 || any_set {
            c.err(path, format!("weights must add up to 100, got {sum}"));
        }
    }
}

fn l4_route_destinations(c: &mut Checker, p: &str, route: &[crate::networking::RouteDestination]) {
    if route.is_empty() {
        c.err(format!("{p}.route"), "at least one destination is required");
    }
    for (j, d) in route.iter().enumerate() {
        destination(c, &format!("{p}.route[{j}].destination"), &d.destination);
    }
    weights(
        c,
        &format!("{p}.route"),
        &route.iter().map(|d| d.weight).collect::<Vec<_>>(),
    );
}

fn http_route(c: &mut Checker, p: &str, r: &HttpRoute, in_delegate: bool) {
    let actions = usize::from(!r.route.is_empty())
        + usize::from(r.redirect.is_some())
        + usize::from(r.direct_response.is_some())
        + usize::from(r.delegate.is_some());
    match actions {
        0 => c.err(
            p,
            "one of route, redirect, directResponse or delegate is required",
        ),
        1 => {}
        _ => c.err(
            p,
            "only one of route, redirect, directResponse or delegate may be set",
        ),
    }
    if r.delegate.is_some() && in_delegate {
        c.err(
            format!("{p}.delegate"),
            "a delegate VirtualService (one without hosts) cannot delegate again",
        );
    }
    if let Some(d) = &r.delegate
        && let Err(why) = check_name(&d.name)
    {
        c.err(
            format!("{p}.delegate.name"),
            format!("invalid name {:?}: {why}", d.name),
        );
    }
    for (j, m) in r.match_.iter().enumerate() {
        http_match(c, &format!("{p}.match[{j}]"), m);
    }
    for (j, d) in r.route.iter().enumerate() {
        let dp = format!("{p}.route[{j}]");
        destination(c, &format!("{dp}.destination"), &d.destination);
        if let Some(h) = &d.headers {
            headers(c, &format!("{dp}.headers"), h);
        }
    }
    weights(
        c,
        &format!("{p}.route"),
        &r.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
    );
    if let Some(rd) = &r.redirect {
        let rp = format!("{p}.redirect");
        if rd.uri.is_none()
            && rd.authority.is_none()
            && rd.port.is_none()
            && rd.derive_port.is_none()
            && rd.scheme.is_none()
        {
            c.err(
                &rp,
                "at least one of uri, authority, port, derivePort or scheme is required",
            );
        }
        if rd.port.is_some() && rd.derive_port.is_some() {
            c.err(&rp, "only one of port or derivePort may be set");
        }
        if let Some(port) = rd.port {
            c.port(format!("{rp}.port"), port);
        }
        if let Some(code) = rd.redirect_code
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            c.err(
                format!("{rp}.redirectCode"),
                format!("{code} is not a redirect status (301, 302, 303, 307 or 308)"),
            );
        }
        if let Some(u) = &rd.uri
            && !u.starts_with('/')
        {
            c.err(format!("{rp}.uri"), "must start with '/'");
        }
        if r.rewrite.is_some() {
            c.err(format!("{p}.rewrite"), "cannot be combined with redirect");
        }
    }
    if let Some(dr) = &r.direct_response {
        let dp = format!("{p}.directResponse");
        if !(200..=599).contains(&dr.status) {
            c.err(
                format!("{dp}.status"),
                format!("status must be between 200 and 599, got {}", dr.status),
            );
        }
        if let Some(b) = &dr.body {
            if b.string.is_some() && b.bytes.is_some() {
                c.err(
                    format!("{dp}.body"),
                    "only one of string or bytes may be set",
                );
            }
            if let Some(bytes) = &b.bytes
                && !is_base64(bytes)
            {
                c.err(format!("{dp}.body.bytes"), "must be base64");
            }
        }
    }
    if let Some(rw) = &r.rewrite {
        let wp = format!("{p}.rewrite");
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            c.err(&wp, "only one of uri or uriRegexRewrite may be set");
        }
        if rw.uri.is_none() && rw.authority.is_none() && rw.uri_regex_rewrite.is_none() {
            c.err(
                &wp,
                "at least one of uri, authority or uriRegexRewrite is required",
            );
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            c.regex(format!("{wp}.uriRegexRewrite.match"), &rr.match_);
        }
    }
    if let Some(t) = &r.timeout {
        c.duration(format!("{p}.timeout"), t);
    }
    if let Some(rt) = &r.retries {
        let rp = format!("{p}.retries");
        if rt.attempts < 0 {
            c.err(
                format!("{rp}.attempts"),
                format!("must not be negative, got {}", rt.attempts),
            );
        }
        if let Some(d) = &rt.per_try_timeout {
            c.duration(format!("{rp}.perTryTimeout"), d);
        }
        if let Some(d) = &rt.backoff {
            c.duration(format!("{rp}.backoff"), d);
        }
        if let Some(on) = &rt.retry_on {
            for cond in on.split(',').map(str::trim) {
                let numeric = cond.parse::<u16>().is_ok_and(|n| (100..=599).contains(&n));
                if !numeric && !RETRY_ON.contains(&cond) {
                    c.err(
                        format!("{rp}.retryOn"),
                        format!("unknown retry condition {cond:?}"),
                    );
                }
            }
        }
    }
    if let Some(f) = &r.fault {
        let fp = format!("{p}.fault");
        if f.delay.is_none() && f.abort.is_none() {
            c.err(&fp, "at least one of delay or abort is required");
        }
        if let Some(d) = &f.delay {
            let dp = format!("{fp}.delay");
            match (&d.fixed_delay, &d.exponential_delay) {
                (Some(fd), None) => c.duration(format!("{dp}.fixedDelay"), fd),
                (None, Some(ed)) => c.duration(format!("{dp}.exponentialDelay"), ed),
                (None, None) => c.err(&dp, "one of fixedDelay or exponentialDelay is required"),
                (Some(_), Some(_)) => {
                    c.err(&dp, "only one of fixedDelay or exponentialDelay may be set")
                }
            }
            fault_percent(c, &dp, d.percentage, d.percent);
        }
        if let Some(a) = &f.abort {
            let ap = format!("{fp}.abort");
            let kinds = usize::from(a.http_status.is_some())
                + usize::from(a.grpc_status.is_some())
                + usize::from(a.http2_error.is_some());
            if kinds != 1 {
                c.err(
                    &ap,
                    "exactly one of httpStatus, grpcStatus or http2Error is required",
                );
            }
            if let Some(s) = a.http_status
                && !(200..=599).contains(&s)
            {
                c.err(
                    format!("{ap}.httpStatus"),
                    format!("status must be between 200 and 599, got {s}"),
                );
            }
            if let Some(g) = &a.grpc_status
                && !GRPC_STATUS_NAMES.contains(&g.as_str())
            {
                c.err(
                    format!("{ap}.grpcStatus"),
                    format!("unknown gRPC status {g:?} (e.g. UNAVAILABLE)"),
                );
            }
            fault_percent(c, &ap, a.percentage, None);
        }
    }
    if r.mirror.is_some() && !r.mirrors.is_empty() {
        c.err(p, "only one of mirror or mirrors may be set");
    }
    if let Some(m) = &r.mirror {
        destination(c, &format!("{p}.mirror"), m);
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        destination(c, &format!("{p}.mirrors[{j}].destination"), &m.destination);
        if let Some(pc) = m.percentage {
            c.percent(format!("{p}.mirrors[{j}].percentage.value"), pc.value);
        }
    }
    if let Some(pc) = r.mirror_percentage {
        c.percent(format!("{p}.mirrorPercentage.value"), pc.value);
    }
    if let Some(pc) = r.mirror_percent {
        c.percent(format!("{p}.mirrorPercent"), f64::from(pc));
        if r.mirror_percentage.is_some() {
            c.err(
                p,
                "only one of mirrorPercent or mirrorPercentage may be set",
            );
        }
    }
    if (r.mirror_percentage.is_some() || r.mirror_percent.is_some()) && r.mirror.is_none() {
        c.err(
            p,
            "mirrorPercentage needs mirror (mirrors carry their own percentage)",
        );
    }
    if let Some(cors) = &r.cors_policy {
        cors_policy(c, &format!("{p}.corsPolicy"), cors);
    }
    if let Some(h) = &r.headers {
        headers(c, &format!("{p}.headers"), h);
    }
}

fn fault_percent(c: &mut Checker, p: &str, percentage: Option<Percent>, percent: Option<i32>) {
    if let Some(pc) = percentage {
        c.percent(format!("{p}.percentage.value"), pc.value);
    }
    if let Some(pc) = percent {
        c.percent(format!("{p}.percent"), f64::from(pc));
        if percentage.is_some() {
            c.err(p, "only one of percent or percentage may be set");
        }
    }
}

fn http_match(c: &mut Checker, p: &str, m: &HttpMatchRequest) {
    for (field, sm) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            c.string_match(&format!("{p}.{field}"), sm, false);
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, sm) in map {
            let hp = format!("{p}.{field}[{name}]");
            c.header_name(&hp, name);
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                c.err(&hp, format!("header name {name:?} must be lower-case"));
            }
            c.string_match(&hp, sm, true);
        }
    }
    for (name, sm) in &m.query_params {
        c.string_match(&format!("{p}.queryParams[{name}]"), sm, true);
    }
    if let Some(port) = m.port {
        c.port(format!("{p}.port"), port);
    }
    for (i, g) in m.gateways.iter().enumerate() {
        check_gateway_ref(c, &format!("{p}.gateways[{i}]"), g);
    }
    if let Some(ns) = &m.source_namespace
        && let Err(why) = check_dns_label(ns)
    {
        c.err(
            format!("{p}.sourceNamespace"),
            format!("invalid namespace {ns:?}: {why}"),
        );
    }
}

fn headers(c: &mut Checker, p: &str, h: &Headers) {
    for (which, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        let op = format!("{p}.{which}");
        for (name, _) in ops.set.iter().chain(ops.add.iter()) {
            c.header_name(format!("{op}[{name}]"), name);
            if name.eq_ignore_ascii_case("host") || name.starts_with(':') {
                c.err(
                    format!("{op}[{name}]"),
                    "the host and pseudo-headers cannot be set this way; use rewrite.authority",
                );
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            c.header_name(format!("{op}.remove[{i}]"), name);
        }
    }
}

fn cors_policy(c: &mut Checker, p: &str, cors: &CorsPolicy) {
    for (i, o) in cors.allow_origins.iter().enumerate() {
        c.string_match(&format!("{p}.allowOrigins[{i}]"), o, false);
    }
    for (i, m) in cors.allow_methods.iter().enumerate() {
        if !is_token(m) {
            c.err(
                format!("{p}.allowMethods[{i}]"),
                format!("invalid method {m:?}"),
            );
        }
    }
    for (field, list) in [
        ("allowHeaders", &cors.allow_headers),
        ("exposeHeaders", &cors.expose_headers),
    ] {
        for (i, h) in list.iter().enumerate() {
            if h != "*" {
                c.header_name(format!("{p}.{field}[{i}]"), h);
            }
        }
    }
    if let Some(ma) = &cors.max_age
        && ma.0.subsec_nanos() != 0
    {
        c.err(
            format!("{p}.maxAge"),
            format!("duration {ma} is out of range: maxAge is in whole seconds"),
        );
    }
}

fn is_base64(s: &str) -> bool {
    let s = s.trim_end_matches('=');
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'-' || b == b'_')
}

// ---------------------------------------------------------------------------
// DestinationRule
// ---------------------------------------------------------------------------

fn destination_rule(c: &mut Checker, s: &DestinationRuleSpec) {
    c.host("spec.host", &s.host);
    if let Some(tp) = &s.traffic_policy {
        traffic_policy(c, "spec.trafficPolicy", tp);
    }
    let mut names = HashSet::new();
    for (i, sub) in s.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if let Err(why) = check_dns_label(&sub.name) {
            c.err(
                format!("{p}.name"),
                format!("invalid subset name {:?}: {why}", sub.name),
            );
        }
        if !names.insert(sub.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate subset name {:?}", sub.name),
            );
        }
        if sub.labels.is_empty() {
            c.warn(
                format!("{p}.labels"),
                "a subset without labels selects every instance",
            );
        }
        if let Some(tp) = &sub.traffic_policy {
            traffic_policy(c, &format!("{p}.trafficPolicy"), tp);
        }
    }
    c.export_to(&s.export_to);
    if let Some(ws) = &s.workload_selector {
        c.selector("spec.workloadSelector", ws);
    }
}

fn traffic_policy(c: &mut Checker, p: &str, tp: &TrafficPolicy) {
    if let Some(lb) = &tp.load_balancer {
        load_balancer(c, &format!("{p}.loadBalancer"), lb);
    }
    if let Some(cp) = &tp.connection_pool {
        connection_pool(c, &format!("{p}.connectionPool"), cp);
    }
    if let Some(od) = &tp.outlier_detection {
        outlier_detection(c, &format!("{p}.outlierDetection"), od);
    }
    if let Some(tls) = &tp.tls {
        client_tls(c, &format!("{p}.tls"), tls);
    }
    let mut ports = HashSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{p}.portLevelSettings[{i}]");
        match pl.port {
            None => c.err(format!("{pp}.port"), "required"),
            Some(port) => {
                c.port(format!("{pp}.port.number"), port.number);
                if !ports.insert(port.number) {
                    c.err(
                        format!("{pp}.port"),
                        format!("duplicate settings for port {}", port.number),
                    );
                }
            }
        }
        if let Some(lb) = &pl.load_balancer {
            load_balancer(c, &format!("{pp}.loadBalancer"), lb);
        }
        if let Some(cp) = &pl.connection_pool {
            connection_pool(c, &format!("{pp}.connectionPool"), cp);
        }
        if let Some(od) = &pl.outlier_detection {
            outlier_detection(c, &format!("{pp}.outlierDetection"), od);
        }
        if let Some(tls) = &pl.tls {
            client_tls(c, &format!("{pp}.tls"), tls);
        }
    }
    if let Some(t) = &tp.tunnel {
        if let Some(proto) = &t.protocol
            && proto != "CONNECT"
            && proto != "POST"
        {
            c.err(
                format!("{p}.tunnel.protocol"),
                format!("must be CONNECT or POST, got {proto:?}"),
            );
        }
        c.host(format!("{p}.tunnel.targetHost"), &t.target_host);
        c.port(format!("{p}.tunnel.targetPort"), t.target_port);
    }
}

fn load_balancer(c: &mut Checker, p: &str, lb: &LoadBalancerSettings) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        c.err(p, "only one of simple or consistentHash may be set");
    }
    if let Some(ch) = &lb.consistent_hash {
        let cp = format!("{p}.consistentHash");
        let keys = usize::from(ch.http_header_name.is_some())
            + usize::from(ch.http_cookie.is_some())
            + usize::from(ch.use_source_ip == Some(true))
            + usize::from(ch.http_query_parameter_name.is_some());
        if keys != 1 {
            c.err(&cp, "exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required");
        }
        if let Some(h) = &ch.http_header_name {
            c.header_name(format!("{cp}.httpHeaderName"), h);
        }
        if let Some(cookie) = &ch.http_cookie {
            if cookie.name.is_empty() {
                c.err(format!("{cp}.httpCookie.name"), "required");
            }
            if let Some(ttl) = &cookie.ttl
                && ttl.0.is_zero()
            {
                c.warn(
                    format!("{cp}.httpCookie.ttl"),
                    "a zero ttl makes a session cookie",
                );
            }
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            c.err(&cp, "only one of ringHash or maglev may be set");
        }
        if ch.minimum_ring_size.is_some() && (ch.ring_hash.is_some() || ch.maglev.is_some()) {
            c.err(
                format!("{cp}.minimumRingSize"),
                "deprecated; cannot be combined with ringHash or maglev",
            );
        }
        if let Some(size) = ch.maglev.as_ref().and_then(|m| m.table_size)
            && !is_prime(size)
        {
            c.err(
                format!("{cp}.maglev.tableSize"),
                format!("must be a prime number, got {size}"),
            );
        }
    }
    if let Some(loc) = &lb.locality_lb_setting {
        let lp = format!("{p}.localityLbSetting");
        if !loc.distribute.is_empty() && !loc.failover.is_empty() {
            c.err(&lp, "only one of distribute or failover may be set");
        }
        for (i, d) in loc.distribute.iter().enumerate() {
            let sum: u64 = d.to.values().map(|v| u64::from(*v)).sum();
            if sum != 100 {
                c.err(
                    format!("{lp}.distribute[{i}].to"),
                    format!("weights must add up to 100, got {sum}"),
                );
            }
        }
        for (i, f) in loc.failover.iter().enumerate() {
            if f.from == f.to {
                c.err(format!("{lp}.failover[{i}]"), "from and to must differ");
            }
        }
    }
    if let Some(d) = &lb.warmup_duration_secs {
        c.duration(format!("{p}.warmupDurationSecs"), d);
    }
    if let Some(w) = &lb.warmup {
        c.duration(format!("{p}.warmup.duration"), &w.duration);
        if let Some(mp) = w.minimum_percent {
            c.percent(format!("{p}.warmup.minimumPercent"), mp);
        }
        if let Some(a) = w.aggression
            && (a < 1.0 || a.is_nan())
        {
            c.err(
                format!("{p}.warmup.aggression"),
                format!("must be at least 1, got {a}"),
            );
        }
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn connection_pool(c: &mut Checker, p: &str, cp: &ConnectionPoolSettings) {
    if let Some(t) = &cp.tcp {
        let tp = format!("{p}.tcp");
        if let Some(n) = t.max_connections.filter(|n| *n < 0) {
            c.err(
                format!("{tp}.maxConnections"),
                format!("must not be negative, got {n}"),
            );
        }
        for (field, d) in [
            ("connectTimeout", &t.connect_timeout),
            ("maxConnectionDuration", &t.max_connection_duration),
            ("idleTimeout", &t.idle_timeout),
        ] {
            if let Some(d) = d {
                c.duration(format!("{tp}.{field}"), d);
            }
        }
        if let Some(ka) = &t.tcp_keepalive {
            for (field, d) in [("time", &ka.time), ("interval", &ka.interval)] {
                if let Some(d) = d {
                    c.duration(format!("{tp}.tcpKeepalive.{field}"), d);
                }
            }
        }
    }
    if let Some(h) = &cp.http {
        let hp = format!("{p}.http");
        for (field, v) in [
            ("http1MaxPendingRequests", h.http1_max_pending_requests),
            ("http2MaxRequests", h.http2_max_requests),
            ("maxRequestsPerConnection", h.max_requests_per_connection),
            ("maxRetries", h.max_retries),
            ("maxConcurrentStreams", h.max_concurrent_streams),
        ] {
            if let Some(n) = v.filter(|n| *n < 0) {
                c.err(
                    format!("{hp}.{field}"),
                    format!("must not be negative, got {n}"),
                );
            }
        }
        if let Some(d) = &h.idle_timeout {
            c.duration(format!("{hp}.idleTimeout"), d);
        }
    }
}

fn outlier_detection(c: &mut Checker, p: &str, od: &OutlierDetection) {
    if od.consecutive_errors.is_some() && od.consecutive_5xx_errors.is_some() {
        c.err(
            p,
            "consecutiveErrors is deprecated; set only consecutive5xxErrors",
        );
    }
    if let Some(n) = od.consecutive_errors.filter(|n| *n < 0) {
        c.err(
            format!("{p}.consecutiveErrors"),
            format!("must not be negative, got {n}"),
        );
    }
    for (field, d) in [
        ("interval", &od.interval),
        ("baseEjectionTime", &od.base_ejection_time),
    ] {
        if let Some(d) = d {
            c.duration(format!("{p}.{field}"), d);
        }
    }
    for (field, v) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(v) = v
            && !(0..=100).contains(&v)
        {
            c.err(
                format!("{p}.{field}"),
                format!("percentage must be between 0 and 100, got {v}"),
            );
        }
    }
    if od.consecutive_local_origin_failures.is_some()
        && od.split_external_local_origin_errors != Some(true)
    {
        c.err(
            format!("{p}.consecutiveLocalOriginFailures"),
            "needs splitExternalLocalOriginErrors: true",
        );
    }
}

fn client_tls(c: &mut Checker, p: &str, tls: &ClientTlsSettings) {
    let has_files = tls.client_certificate.is_some()
        || tls.private_key.is_some()
        || tls.ca_certificates.is_some();
    match tls.mode {
        ClientTlsMode::Disable => {}
        ClientTlsMode::IstioMutual => {
            if has_files || tls.credential_name.is_some() {
                c.err(p, "ISTIO_MUTUAL uses the mesh's certificates; clientCertificate, privateKey, caCertificates and credentialName must not be set");
            }
        }
        ClientTlsMode::Simple => {
            if tls.client_certificate.is_some() || tls.private_key.is_some() {
                c.warn(p, "SIMPLE ignores clientCertificate and privateKey; use MUTUAL to present a certificate");
            }
        }
        ClientTlsMode::Mutual => {
            if tls.credential_name.is_none()
                && (tls.client_certificate.is_none() || tls.private_key.is_none())
            {
                c.err(
                    p,
                    "MUTUAL needs credentialName, or clientCertificate and privateKey",
                );
            }
        }
    }
    if tls.credential_name.is_some() && has_files {
        c.err(p, "credentialName cannot be combined with clientCertificate, privateKey or caCertificates");
    }
    if let Some(sni) = &tls.sni {
        c.host(format!("{p}.sni"), sni);
    }
}

// ---------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------

fn gateway(c: &mut Checker, s: &GatewaySpec) {
    if s.servers.is_empty() {
        c.err("spec.servers", "at least one server is required");
    }
    let mut ports: HashMap<(u32, Option<&str>), (usize, String)> = HashMap::new();
    let mut names = HashSet::new();
    for (i, srv) in s.servers.iter().enumerate() {
        let p = format!("spec.servers[{i}]");
        c.port(format!("{p}.port.number"), srv.port.number);
        let proto = srv.port.protocol.to_ascii_uppercase();
        if !PROTOCOLS.contains(&proto.as_str()) {
            c.err(
                format!("{p}.port.protocol"),
                format!(
                    "unknown protocol {:?} (HTTP, HTTPS, GRPC, HTTP2, TCP, TLS, MONGO)",
                    srv.port.protocol
                ),
            );
        }
        if srv.port.name.is_empty() {
            c.err(format!("{p}.port.name"), "required");
        }
        if let Some(tp) = srv.port.target_port {
            c.port(format!("{p}.port.targetPort"), tp);
        }
        if let Some(n) = &srv.name
            && !names.insert(n.as_str())
        {
            c.err(format!("{p}.name"), format!("duplicate server name {n:?}"));
        }
        match ports.get(&(srv.port.number, srv.bind.as_deref())) {
            Some((j, other)) if *other != proto => c.err(
                format!("{p}.port"),
                format!(
                    "port {} is also used by spec.servers[{j}] with protocol {other}",
                    srv.port.number
                ),
            ),
            Some(_) => {}
            None => {
                ports.insert((srv.port.number, srv.bind.as_deref()), (i, proto.clone()));
            }
        }
        if srv.hosts.is_empty() {
            c.err(format!("{p}.hosts"), "at least one host is required");
        }
        for (j, h) in srv.hosts.iter().enumerate() {
            let hp = format!("{p}.hosts[{j}]");
            let (ns, host) = h.split_once('/').unwrap_or(("", h));
            if !ns.is_empty() && ns != "." && ns != "*" && ns != "~" && check_dns_label(ns).is_err()
            {
                c.err(&hp, format!("invalid namespace in {h:?}"));
            }
            c.host(&hp, host);
        }
        let is_tls_proto = proto == "HTTPS" || proto == "TLS";
        match &srv.tls {
            Some(tls) => server_tls(c, &format!("{p}.tls"), &proto, tls),
            None if is_tls_proto => {
                c.err(format!("{p}.tls"), format!("required for protocol {proto}"))
            }
            None => {}
        }
    }
    c.selector_map("spec.selector", &s.selector);
}

impl Checker<'_> {
    fn selector_map(&mut self, path: &str, labels: &BTreeMap<String, String>) {
        self.selector(
            path,
            &WorkloadSelector {
                match_labels: labels.clone(),
            },
        );
    }
}

fn server_tls(c: &mut Checker, p: &str, proto: &str, tls: &ServerTlsSettings) {
    if tls.https_redirect && proto != "HTTP" {
        c.err(format!("{p}.httpsRedirect"), "only applies to HTTP servers");
    }
    let Some(mode) = tls.mode else {
        if proto == "HTTPS" || proto == "TLS" {
            c.err(
                format!("{p}.mode"),
                format!("required for protocol {proto}"),
            );
        }
        return;
    };
    let has_cert = tls.credential_name.is_some()
        || !tls.credential_names.is_empty()
        || (tls.server_certificate.is_some() && tls.private_key.is_some());
    match mode {
        ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => {
            if !has_cert {
                c.err(
                    p,
                    "needs credentialName, or serverCertificate and privateKey",
                );
            }
            if mode != ServerTlsMode::Simple
                && tls.credential_name.is_none()
                && tls.credential_names.is_empty()
                && tls.ca_certificates.is_none()
            {
                c.err(
                    p,
                    "MUTUAL needs caCertificates or credentialName to verify clients",
                );
            }
        }
        ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough => {
            if tls.credential_name.is_some() || tls.server_certificate.is_some() {
                c.warn(p, "certificates are not used in passthrough mode");
            }
        }
        ServerTlsMode::IstioMutual => {
            if tls.credential_name.is_some() || tls.server_certificate.is_some() {
                c.err(
                    p,
                    "ISTIO_MUTUAL uses the mesh's certificates; no certificate may be set",
                );
            }
        }
    }
    if let (Some(min), Some(max)) = (tls.min_protocol_version, tls.max_protocol_version)
        && min > max
    {
        c.err(p, "minProtocolVersion is above maxProtocolVersion");
    }
}

// ---------------------------------------------------------------------------
// ServiceEntry
// ---------------------------------------------------------------------------

fn service_entry(c: &mut Checker, s: &ServiceEntrySpec) {
    if s.hosts.is_empty() {
        c.err("spec.hosts", "at least one host is required");
    }
    for (i, h) in s.hosts.iter().enumerate() {
        c.host(format!("spec.hosts[{i}]"), h);
        if h == "*" {
            c.err(format!("spec.hosts[{i}]"), "\"*\" is not allowed");
        }
    }
    for (i, a) in s.addresses.iter().enumerate() {
        c.cidr(format!("spec.addresses[{i}]"), a);
    }
    let mut numbers = HashSet::new();
    let mut port_names = HashSet::new();
    for (i, port) in s.ports.iter().enumerate() {
        let p = format!("spec.ports[{i}]");
        c.port(format!("{p}.number"), port.number);
        if !numbers.insert(port.number) {
            c.err(
                format!("{p}.number"),
                format!("duplicate port {}", port.number),
            );
        }
        if port.name.is_empty() {
            c.err(format!("{p}.name"), "required");
        } else if !port_names.insert(port.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate port name {:?}", port.name),
            );
        }
        if let Some(proto) = &port.protocol
            && !PROTOCOLS.contains(&proto.to_ascii_uppercase().as_str())
        {
            c.err(
                format!("{p}.protocol"),
                format!("unknown protocol {proto:?}"),
            );
        }
    }
    if !s.endpoints.is_empty() && s.workload_selector.is_some() {
        c.err(
            "spec",
            "only one of endpoints or workloadSelector may be set",
        );
    }
    let resolution = s.resolution.unwrap_or(ServiceEntryResolution::None);
    if resolution == ServiceEntryResolution::Static
        && s.endpoints.is_empty()
        && s.workload_selector.is_none()
    {
        c.err(
            "spec.endpoints",
            "STATIC resolution needs endpoints or a workloadSelector",
        );
    }
    if resolution != ServiceEntryResolution::None && s.hosts.iter().any(|h| h.starts_with('*')) {
        c.err("spec.hosts", "wildcard hosts need resolution NONE");
    }
    for (i, ep) in s.endpoints.iter().enumerate() {
        let p = format!("spec.endpoints[{i}]");
        match ep.address.as_deref() {
            None | Some("") if ep.network.is_none() => c.err(format!("{p}.address"), "required"),
            None | Some("") => {}
            Some(addr) if addr.starts_with("unix://") => {}
            Some(addr) => {
                let is_ip = addr.parse::<IpAddr>().is_ok();
                if resolution == ServiceEntryResolution::Static && !is_ip {
                    c.err(
                        format!("{p}.address"),
                        format!("STATIC resolution needs IP addresses, got {addr:?}"),
                    );
                } else if !is_ip {
                    c.host(format!("{p}.address"), addr);
                }
            }
        }
        for (name, port) in &ep.ports {
            c.port(format!("{p}.ports[{name}]"), *port);
            if !port_names.contains(name.as_str()) {
                c.err(
                    format!("{p}.ports[{name}]"),
                    format!("no port named {name:?} in spec.ports"),
                );
            }
        }
        if ep.weight == Some(0) {
            c.warn(
                format!("{p}.weight"),
                "weight 0 sends no traffic to this endpoint",
            );
        }
    }
    if let Some(ws) = &s.workload_selector {
        c.selector("spec.workloadSelector", ws);
    }
    c.export_to(&s.export_to);
}

// ---------------------------------------------------------------------------
// WorkloadEntry
// ---------------------------------------------------------------------------

fn workload_entry(c: &mut Checker, w: &WorkloadEntrySpec) {
    match w.address.as_deref() {
        None | Some("") => c.err("spec.address", "required"),
        Some(addr) if addr.parse::<IpAddr>().is_err() => c.err(
            "spec.address",
            format!("must be an IP address, got {addr:?}"),
        ),
        Some(_) => {}
    }
    for (name, port) in &w.ports {
        c.port(format!("spec.ports[{name}]"), *port);
    }
    c.selector_map("spec.labels", &w.labels);
    if let Some(sa) = &w.service_account
        && let Err(why) = check_dns_label(sa)
    {
        c.err("spec.serviceAccount", why);
    }
    if w.weight == Some(0) {
        c.warn("spec.weight", "weight 0 sends no traffic to this workload");
    }
}

// ---------------------------------------------------------------------------
// Sidecar
// ---------------------------------------------------------------------------

fn sidecar(c: &mut Checker, s: &SidecarSpec) {
    if let Some(ws) = &s.workload_selector {
        c.selector("spec.workloadSelector", ws);
    }
    let mut ports = HashSet::new();
    for (i, ing) in s.ingress.iter().enumerate() {
        let p = format!("spec.ingress[{i}]");
        c.port(format!("{p}.port.number"), ing.port.number);
        if !ports.insert(ing.port.number) {
            c.err(
                format!("{p}.port"),
                format!("duplicate ingress port {}", ing.port.number),
            );
        }
        if let Some(ep) = &ing.default_endpoint {
            let ok = ep.starts_with("unix://")
                || ["127.0.0.1:", "0.0.0.0:", "[::1]:", "[::]:"]
                    .iter()
                    .any(|pre| {
                        ep.strip_prefix(pre)
                            .and_then(|port| port.parse::<u16>().ok())
                            .is_some_and(|n| n > 0)
                    });
            if !ok {
                c.err(
                    format!("{p}.defaultEndpoint"),
                    format!("{ep:?} must be 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT or unix://"),
                );
            }
        }
    }
    let mut catch_all = 0;
    for (i, eg) in s.egress.iter().enumerate() {
        let p = format!("spec.egress[{i}]");
        if eg.port.is_none() {
            catch_all += 1;
            if catch_all > 1 {
                c.err(&p, "only one egress listener may omit its port");
            }
        }
        if let Some(port) = &eg.port {
            c.port(format!("{p}.port.number"), port.number);
        }
        if eg.hosts.is_empty() {
            c.err(format!("{p}.hosts"), "at least one host is required");
        }
        for (j, h) in eg.hosts.iter().enumerate() {
            match h.split_once('/') {
                Some((ns, host)) => {
                    if ns != "." && ns != "*" && ns != "~" && check_dns_label(ns).is_err() {
                        c.err(
                            format!("{p}.hosts[{j}]"),
                            format!("invalid namespace in {h:?}"),
                        );
                    }
                    c.host(format!("{p}.hosts[{j}]"), host);
                }
                None => c.err(
                    format!("{p}.hosts[{j}]"),
                    format!("{h:?} must be namespace/host, e.g. \"./*\" or \"istio-system/*\""),
                ),
            }
        }
    }
    if let Some(cp) = &s.inbound_connection_pool {
        connection_pool(c, "spec.inboundConnectionPool", cp);
    }
}

// ---------------------------------------------------------------------------
// RateLimitPolicy
// ---------------------------------------------------------------------------

fn rate_limit(c: &mut Checker, p: &str, l: &RateLimit) {
    if l.requests_per_second == 0 {
        c.err(format!("{p}.requestsPerSecond"), "must be at least 1");
    }
    if l.burst == Some(0) {
        c.err(format!("{p}.burst"), "must be at least 1");
    }
}

fn rate_limit_policy(c: &mut Checker, s: &RateLimitPolicySpec) {
    if s.total.is_none() && s.per_identity.is_none() && s.overrides.is_empty() {
        c.err(
            "spec",
            "at least one of total, perIdentity or overrides is required",
        );
    }
    if let Some(sel) = &s.selector {
        c.selector("spec.selector", sel);
    }
    for (i, port) in s.ports.iter().enumerate() {
        c.port(format!("spec.ports[{i}]"), *port);
    }
    if let Some(t) = &s.total {
        rate_limit(c, "spec.total", t);
    }
    if let Some(t) = &s.per_identity {
        rate_limit(c, "spec.perIdentity", t);
    }
    for (i, o) in s.overrides.iter().enumerate() {
        let p = format!("spec.overrides[{i}]");
        rate_limit(c, &format!("{p}.limit"), &o.limit);
        if o.clients.is_empty() && o.routes.is_empty() {
            c.err(&p, "an override needs clients or routes");
        }
        for (j, client) in o.clients.iter().enumerate() {
            if !client.starts_with("spiffe://") {
                c.err(
                    format!("{p}.clients[{j}]"),
                    format!(
                        "{client:?} is not a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)"
                    ),
                );
            }
        }
        for (j, r) in o.routes.iter().enumerate() {
            let rp = format!("{p}.routes[{j}]");
            if let Some(path) = &r.path {
                c.string_match(&format!("{rp}.path"), path, false);
            }
            for (k, m) in r.methods.iter().enumerate() {
                if !is_token(m) {
                    c.err(
                        format!("{rp}.methods[{k}]"),
                        format!("invalid method {m:?}"),
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Security
// ---------------------------------------------------------------------------

fn peer_authentication(c: &mut Checker, s: &PeerAuthenticationSpec) {
    if let Some(sel) = &s.selector {
        c.selector("spec.selector", sel);
    }
    if !s.port_level_mtls.is_empty()
        && s.selector
            .as_ref()
            .is_none_or(|sel| sel.match_labels.is_empty())
    {
        c.err("spec.portLevelMtls", "needs a workload selector");
    }
    for port in s.port_level_mtls.keys() {
        c.port(format!("spec.portLevelMtls[{port}]"), port.0);
    }
}

fn principal_like(c: &mut Checker, path: String, v: &str) {
    if v.is_empty() {
        c.err(path, "must not be empty");
    } else if v != "*"
        && v.trim_start_matches('*')
            .trim_end_matches('*')
            .contains('*')
    {
        c.err(
            path,
            format!("{v:?}: '*' is only allowed at the start or end"),
        );
    }
}

fn authorization_policy(c: &mut Checker, s: &AuthorizationPolicySpec) {
    policy_targets(
        c,
        s.selector.is_some(),
        s.target_ref.as_ref(),
        &s.target_refs,
    );
    if let Some(sel) = &s.selector {
        c.selector("spec.selector", sel);
    }
    match s.action {
        AuthorizationAction::Custom => c.err(
            "spec.action",
            "CUSTOM (external authorization) is not supported by the mesh",
        ),
        _ => {
            if s.provider.is_some() {
                c.err("spec.provider", "only applies to action CUSTOM");
            }
        }
    }
    if s.action == AuthorizationAction::Allow && s.rules.as_ref().is_some_and(Vec::is_empty) {
        // Valid: "allow nothing". Worth a note since it denies everything.
        c.warn(
            "spec.rules",
            "an ALLOW policy with an empty rule list denies every request",
        );
    }
    for (i, rule) in s.rules.iter().flatten().enumerate() {
        let p = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let fp = format!("{p}.from[{j}].source");
            let src = &from.source;
            let lists: [(&str, &Vec<String>); 12] = [
                ("principals", &src.principals),
                ("notPrincipals", &src.not_principals),
                ("requestPrincipals", &src.request_principals),
                ("notRequestPrincipals", &src.not_request_principals),
                ("namespaces", &src.namespaces),
                ("notNamespaces", &src.not_namespaces),
                ("serviceAccounts", &src.service_accounts),
                ("notServiceAccounts", &src.not_service_accounts),
                ("ipBlocks", &src.ip_blocks),
                ("notIpBlocks", &src.not_ip_blocks),
                ("remoteIpBlocks", &src.remote_ip_blocks),
                ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                c.err(&fp, "must set at least one field");
            }
            for (field, list) in lists {
                for (k, v) in list.iter().enumerate() {
                    let vp = format!("{fp}.{field}[{k}]");
                    if field.to_ascii_lowercase().contains("ipblocks") {
                        c.cidr(vp, v);
                    } else {
                        principal_like(c, vp, v);
                    }
                }
            }
            if (!src.service_accounts.is_empty() || !src.not_service_accounts.is_empty())
                && (!src.principals.is_empty() || !src.not_principals.is_empty())
            {
                c.err(&fp, "serviceAccounts cannot be combined with principals");
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let tp = format!("{p}.to[{j}].operation");
            let op = &to.operation;
            let lists: [(&str, &Vec<String>); 8] = [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("ports", &op.ports),
                ("notPorts", &op.not_ports),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                c.err(&tp, "must set at least one field");
            }
            for (field, list) in lists {
                for (k, v) in list.iter().enumerate() {
                    let vp = format!("{tp}.{field}[{k}]");
                    match field {
                        "ports" | "notPorts" => match v.parse::<u32>() {
                            Ok(n) => c.port(vp, n),
                            Err(_) => c.err(vp, format!("{v:?} is not a port number")),
                        },
                        "methods" | "notMethods" => {
                            if !is_token(v) {
                                c.err(vp, format!("invalid method {v:?}"));
                            } else if v.bytes().any(|b| b.is_ascii_lowercase()) {
                                c.warn(vp, format!("method {v:?} is lower-case; HTTP methods are case-sensitive and requests use upper case"));
                            }
                        }
                        "paths" | "notPaths" => {
                            principal_like(c, vp.clone(), v);
                            if v != "*" && !v.starts_with('/') && !v.starts_with('*') {
                                c.err(vp, format!("{v:?} must start with '/'"));
                            }
                        }
                        _ => principal_like(c, vp, v),
                    }
                }
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            let cp = format!("{p}.when[{j}]");
            if let Err(why) = check_condition_key(&cond.key) {
                c.err(format!("{cp}.key"), why);
            }
            if cond.values.is_empty() && cond.not_values.is_empty() {
                c.err(&cp, "at least one of values or notValues is required");
            }
            let ip_key = matches!(
                cond.key.as_str(),
                "source.ip" | "remote.ip" | "destination.ip"
            );
            for (k, v) in cond
                .values
                .iter()
                .enumerate()
                .map(|(k, v)| (format!("values[{k}]"), v))
                .chain(
                    cond.not_values
                        .iter()
                        .enumerate()
                        .map(|(k, v)| (format!("notValues[{k}]"), v)),
                )
            {
                if ip_key {
                    c.cidr(format!("{cp}.{k}"), v);
                } else if cond.key == "destination.port" && v.parse::<u16>().is_err() {
                    c.err(format!("{cp}.{k}"), format!("{v:?} is not a port number"));
                }
            }
        }
    }
}

/// The claim names of `request.auth.claims[a][b]…`: `["a", "b"]`.
pub fn claim_path(key: &str) -> Option<Vec<&str>> {
    let rest = key
        .strip_prefix("request.auth.claims[")?
        .strip_suffix(']')?;
    let parts: Vec<&str> = rest.split("][").collect();
    parts
        .iter()
        .all(|p| !p.is_empty() && !p.contains(['[', ']']))
        .then_some(parts)
}

/// The condition keys of Istio's AuthorizationPolicy `when`.
pub fn check_condition_key(key: &str) -> Result<(), String> {
    const PLAIN: [&str; 10] = [
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    ];
    if PLAIN.contains(&key) {
        return Ok(());
    }
    if let Some(rest) = key.strip_prefix("request.headers[") {
        return match rest.strip_suffix(']') {
            Some(inner) if !inner.is_empty() && !inner.contains(['[', ']']) => Ok(()),
            _ => Err(format!("{key:?}: expected request.headers[NAME]")),
        };
    }
    if key.starts_with("request.auth.claims[") {
        return claim_path(key).map(|_| ()).ok_or_else(|| {
            format!("{key:?}: expected request.auth.claims[NAME] or [NAME][NESTED]…")
        });
    }
    Err(format!("unknown condition key {key:?}"))
}

/// A security policy's selector, targetRef and targetRefs: at most one
/// of them, and only the kinds the mesh can attach to.
fn policy_targets(
    c: &mut Checker,
    selector: bool,
    one: Option<&PolicyTargetReference>,
    many: &[PolicyTargetReference],
) {
    if selector && (one.is_some() || !many.is_empty()) {
        c.err("spec", "only one of selector or targetRef(s) may be set");
    }
    if one.is_some() && !many.is_empty() {
        c.err("spec", "only one of targetRef or targetRefs may be set");
    }
    let all = one
        .map(|t| ("spec.targetRef".to_string(), t))
        .into_iter()
        .chain(
            many.iter()
                .enumerate()
                .map(|(i, t)| (format!("spec.targetRefs[{i}]"), t)),
        );
    for (p, t) in all {
        match (t.kind.as_str(), t.group.as_deref().unwrap_or("")) {
            ("Service", "" | "core") | ("Gateway", "gateway.networking.k8s.io") => {}
            (kind, group) => c.err(
                format!("{p}.kind"),
                format!(
                    "{group:?}/{kind:?} cannot be targeted: only Service (group \"\") and Gateway (group gateway.networking.k8s.io)"
                ),
            ),
        }
        if t.name.is_empty() {
            c.err(format!("{p}.name"), "required");
        }
    }
}

fn request_authentication(c: &mut Checker, s: &RequestAuthenticationSpec) {
    policy_targets(
        c,
        s.selector.is_some(),
        s.target_ref.as_ref(),
        &s.target_refs,
    );
    if let Some(sel) = &s.selector {
        c.selector("spec.selector", sel);
    }
    let mut issuers = HashSet::new();
    for (i, rule) in s.jwt_rules.iter().enumerate() {
        let p = format!("spec.jwtRules[{i}]");
        if rule.issuer.is_empty() {
            c.err(format!("{p}.issuer"), "required");
        } else if !issuers.insert(rule.issuer.as_str()) {
            c.err(
                format!("{p}.issuer"),
                format!("duplicate issuer {:?}", rule.issuer),
            );
        }
        if let Some(uri) = &rule.jwks_uri {
            let rest = uri
                .strip_prefix("https://")
                .or_else(|| uri.strip_prefix("http://"));
            match rest {
                Some(r) if !r.is_empty() && !r.starts_with('/') => {}
                _ => c.err(
                    format!("{p}.jwksUri"),
                    format!("{uri:?} is not an http(s) URL"),
                ),
            }
        }
        if let Some(jwks) = &rule.jwks {
            match serde_json::from_str::<serde_json::Value>(jwks) {
                Ok(v) if v.get("keys").is_some_and(serde_json::Value::is_array) => {}
                Ok(_) => c.err(
                    format!("{p}.jwks"),
                    "must be a JSON Web Key Set: an object with a \"keys\" array",
                ),
                Err(e) => c.err(format!("{p}.jwks"), format!("invalid JSON: {e}")),
            }
        }
        for (j, h) in rule.from_headers.iter().enumerate() {
            c.header_name(format!("{p}.fromHeaders[{j}].name"), &h.name);
        }
        for (j, q) in rule.from_params.iter().enumerate() {
            if q.is_empty() {
                c.err(format!("{p}.fromParams[{j}]"), "must not be empty");
            }
        }
        if let Some(h) = &rule.output_payload_to_header {
            c.header_name(format!("{p}.outputPayloadToHeader"), h);
        }
        for (j, oc) in rule.output_claim_to_headers.iter().enumerate() {
            c.header_name(format!("{p}.outputClaimToHeaders[{j}].header"), &oc.header);
            if oc.claim.is_empty() {
                c.err(format!("{p}.outputClaimToHeaders[{j}].claim"), "required");
            }
        }
        if let Some(t) = &rule.timeout {
            c.duration(format!("{p}.timeout"), t);
        }
    }
}

// ---------------------------------------------------------------------------
// Across resources
// ---------------------------------------------------------------------------

/// Validates every resource and the set as a whole. Problems come in the
/// order of `resources`.
pub fn validate_all(resources: &[Resource]) -> Vec<Problem> {
    let mut out: Vec<Problem> = resources.iter().flat_map(validate).collect();
    out.extend(validate_set(resources));
    out
}

/// Checks only a set of resources shows.
pub fn validate_set(resources: &[Resource]) -> Vec<Problem> {
    let mut out = Vec::new();
    // Subsets by fully-qualified host.
    let mut subsets: HashMap<String, HashSet<&str>> = HashMap::new();
    let mut gateways: HashSet<(&str, &str)> = HashSet::new();
    let mut virtual_services: HashMap<(&str, &str), &VirtualServiceSpec> = HashMap::new();
    for r in resources {
        match r {
            Resource::DestinationRule(dr) => {
                subsets
                    .entry(fqdn(&dr.spec.host, r.namespace()))
                    .or_default()
                    .extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
            }
            Resource::Gateway(_) => {
                gateways.insert((r.namespace(), r.name()));
            }
            Resource::VirtualService(vs) => {
                virtual_services.insert((r.namespace(), r.name()), &vs.spec);
            }
            _ => {}
        }
    }
    let mut mesh_hosts: HashMap<String, ResourceKey> = HashMap::new();
    let mut peer_auth_scopes: HashMap<(String, BTreeMap<String, String>), ResourceKey> =
        HashMap::new();
    let mut sidecar_defaults: HashMap<&str, ResourceKey> = HashMap::new();
    for r in resources {
        let key = r.key();
        let mut c = Checker {
            key: &key,
            out: Vec::new(),
        };
        let ns = r.namespace();
        match r {
            Resource::VirtualService(vs) => {
                let s = &vs.spec;
                let check_dest = |c: &mut Checker, path: String, d: &Destination| {
                    if let Some(subset) = &d.subset {
                        let host = fqdn(&d.host, ns);
                        let defined = subsets.get(&host).is_some_and(|set| set.contains(subset.as_str()));
                        if !defined {
                            c.err(path, format!("subset {subset:?} of host {:?} is not defined by any DestinationRule", d.host));
                        }
                    }
                };
                for (i, route) in s.http.iter().enumerate() {
                    for (j, d) in route.route.iter().enumerate() {
                        check_dest(&mut c, format!("spec.http[{i}].route[{j}].destination"), &d.destination);
                    }
                    if let Some(m) = &route.mirror {
                        check_dest(&mut c, format!("spec.http[{i}].mirror"), m);
                    }
                    for (j, m) in route.mirrors.iter().enumerate() {
                        check_dest(&mut c, format!("spec.http[{i}].mirrors[{j}].destination"), &m.destination);
                    }
                    if let Some(d) = &route.delegate {
                        let dns = d.namespace.as_deref().unwrap_or(ns);
                        match virtual_services.get(&(dns, d.name.as_str())) {
                            None => c.err(format!("spec.http[{i}].delegate"), format!("VirtualService {dns}/{} does not exist", d.name)),
                            Some(target) if !target.hosts.is_empty() => c.err(
                                format!("spec.http[{i}].delegate"),
                                format!("VirtualService {dns}/{} has hosts; a delegate must have none", d.name),
                            ),
                            Some(_) => {}
                        }
                    }
                    for (j, m) in route.match_.iter().enumerate() {
                        for (k, g) in m.gateways.iter().enumerate() {
                            check_gateway_exists(&mut c, &gateways, ns, format!("spec.http[{i}].match[{j}].gateways[{k}]"), g);
                        }
                    }
                }
                for (kind, routes) in [("tcp", s.tcp.iter().map(|r| &r.route).collect::<Vec<_>>()), ("tls", s.tls.iter().map(|r| &r.route).collect())] {
                    for (i, route) in routes.iter().enumerate() {
                        for (j, d) in route.iter().enumerate() {
                            check_dest(&mut c, format!("spec.{kind}[{i}].route[{j}].destination"), &d.destination);
                        }
                    }
                }
                for (i, g) in s.gateways.iter().enumerate() {
                    check_gateway_exists(&mut c, &gateways, ns, format!("spec.gateways[{i}]"), g);
                }
                let mesh_bound = s.gateways.is_empty() || s.gateways.iter().any(|g| g == "mesh");
                if mesh_bound {
                    for (i, h) in s.hosts.iter().enumerate() {
                        let host = fqdn(h, ns);
                        match mesh_hosts.get(&host) {
                            Some(first) => c.err(
                                format!("spec.hosts[{i}]"),
                                format!("host {h:?} is also routed by {first}; only one VirtualService per host applies to sidecars (merge their routes)"),
                            ),
                            None => {
                                mesh_hosts.insert(host, key.clone());
                            }
                        }
                    }
                }
            }
            Resource::PeerAuthentication(pa) => {
                let labels = pa.spec.selector.as_ref().map(|s| s.match_labels.clone()).unwrap_or_default();
                let scope = if labels.is_empty() {
                    if ns == ROOT_NAMESPACE { "mesh-wide".to_string() } else { format!("namespace-wide in {ns}") }
                } else {
                    format!("for workloads {}", pa.spec.selector.as_ref().map(WorkloadSelector::describe).unwrap_or_default())
                };
                match peer_auth_scopes.get(&(ns.to_string(), labels.clone())) {
                    Some(first) => c.err(
                        if labels.is_empty() { "spec" } else { "spec.selector" },
                        format!("conflicts with {first}: both set the {scope} mTLS mode; only the oldest applies"),
                    ),
                    None => {
                        peer_auth_scopes.insert((ns.to_string(), labels), key.clone());
                    }
                }
            }
            Resource::Sidecar(sc) if sc.spec.workload_selector.is_none() => match sidecar_defaults.get(ns) {
                Some(first) => c.err("spec", format!("conflicts with {first}: a namespace may have one Sidecar without a workloadSelector")),
                None => {
                    sidecar_defaults.insert(ns, key.clone());
                }
            },
            _ => {}
        }
        out.extend(c.out);
    }
    out
}

fn check_gateway_exists(
    c: &mut Checker,
    gateways: &HashSet<(&str, &str)>,
    ns: &str,
    path: String,
    g: &str,
) {
    if g == "mesh" {
        return;
    }
    let (gns, name) = g.split_once('/').unwrap_or((ns, g));
    if !gateways.contains(&(gns, name)) {
        c.err(path, format!("gateway {gns}/{name} does not exist"));
    }
}

//! The running config: a [`ProxyConfig`] compiled into lookup tables and
//! routes, swapped atomically. A config that does not compile is rejected
//! with the path of the problem and the previous one keeps serving.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use mesh_api::model::{
    self, GatewayListener, OutboundPolicy, Protocol, ProxyConfig, RouteAction, WeightedCluster,
};
use mesh_api::networking::{CorsPolicy, HeaderOperations, Headers, HttpRedirect, Percent};
use regex::Regex;

use crate::cluster::{Cluster, Registry};
use crate::ratelimit::RateLimiter;
use crate::routing::{Here, Matcher, RouteMatch};

/// Header operations, parsed once.
#[derive(Debug, Default, Clone)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    fn compile(ops: Option<&HeaderOperations>, path: &str) -> Result<HeaderOps, String> {
        let Some(ops) = ops else {
            return Ok(HeaderOps::default());
        };
        let pair = |(k, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("{path}: invalid header name {k:?}"))?,
                HeaderValue::from_str(v).map_err(|_| format!("{path}: invalid value for {k:?}"))?,
            ))
        };
        Ok(HeaderOps {
            set: ops.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: ops.add.iter().map(pair).collect::<Result<_, _>>()?,
            remove: ops
                .remove
                .iter()
                .map(|k| {
                    HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("{path}: invalid header name {k:?}"))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
    }

    fn pair(h: Option<&Headers>, path: &str) -> Result<(HeaderOps, HeaderOps), String> {
        Ok((
            HeaderOps::compile(
                h.and_then(|h| h.request.as_ref()),
                &format!("{path}.request"),
            )?,
            HeaderOps::compile(
                h.and_then(|h| h.response.as_ref()),
                &format!("{path}.response"),
            )?,
        ))
    }
}

/// Which failures a retry policy retries.
#[derive(Debug, Clone, Default)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub retriable_4xx: bool,
    pub status_codes: Vec<u16>,
    pub grpc: Vec<u32>,
}

impl RetryOn {
    pub fn parse(s: &str) -> RetryOn {
        let mut r = RetryOn::default();
        for cond in s.split(',').map(str::trim) {
            match cond {
                "5xx" => r.five_xx = true,
                "gateway-error" => r.gateway_error = true,
                "reset" | "reset-before-request" => r.reset = true,
                "connect-failure" => r.connect_failure = true,
                "refused-stream" => r.refused_stream = true,
                "retriable-4xx" => r.retriable_4xx = true,
                // Its codes are the plain numbers in the same list.
                "retriable-status-codes" => {}
                "cancelled" => r.grpc.push(1),
                "deadline-exceeded" => r.grpc.push(4),
                "resource-exhausted" => r.grpc.push(8),
                "internal" => r.grpc.push(13),
                "unavailable" => r.grpc.push(14),
                other => {
                    if let Ok(code) = other.parse::<u16>() {
                        r.status_codes.push(code);
                    }
                }
            }
        }
        r
    }

    pub fn status(&self, status: u16) -> bool {
        (self.five_xx && status >= 500)
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || self.status_codes.contains(&status)
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub backoff: Duration,
    pub ignore_previous_hosts: bool,
}

impl RetryPolicy {
    /// Istio's default when a route sets no retries.
    pub fn istio_default() -> RetryPolicy {
        let mut on = RetryOn::parse(
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        );
        on.status_codes.push(503);
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on,
            backoff: Duration::from_millis(25),
            ignore_previous_hosts: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

#[derive(Debug, Clone, Default)]
pub struct Fault {
    /// Delay and the fraction (0–1) of requests delayed.
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(Abort, f64)>,
}

#[derive(Debug)]
pub struct Cors {
    pub origins: Vec<Matcher>,
    pub methods: Option<HeaderValue>,
    pub headers: Option<HeaderValue>,
    pub expose: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub credentials: bool,
}

pub enum Action {
    Forward {
        clusters: Vec<Backend>,
        total_weight: u32,
    },
    Redirect(HttpRedirect),
    Direct {
        status: http::StatusCode,
        body: Bytes,
    },
}

/// A weighted cluster of a route.
pub struct Backend {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    pub request_ops: HeaderOps,
    pub response_ops: HeaderOps,
}

pub enum UriRewrite {
    /// Replace the matched prefix (or the whole path for exact and regex
    /// matches) with this.
    Prefix(Box<str>),
    Regex(Regex, String),
}

pub struct Route {
    pub name: Arc<str>,
    pub matches: Vec<RouteMatch>,
    /// Per match (same index): the uri prefix it matched on, for rewrites.
    pub match_prefixes: Vec<Option<Box<str>>>,
    pub action: Action,
    pub uri_rewrite: Option<UriRewrite>,
    pub authority_rewrite: Option<HeaderValue>,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<(Arc<Cluster>, f64)>,
    pub cors: Option<Cors>,
    pub request_ops: HeaderOps,
    pub response_ops: HeaderOps,
}

/// TCP routes: an optional port and weighted clusters; the first match wins.
pub type TcpRoutes = Vec<(Option<u16>, Vec<(Arc<Cluster>, u32)>)>;

pub struct Destination {
    pub host: Arc<str>,
    pub port: u16,
    pub protocol: Protocol,
    pub routes: Vec<Route>,
    pub tcp: TcpRoutes,
}

pub struct InboundPort {
    pub target: SocketAddr,
    pub protocol: Protocol,
    pub service: Arc<str>,
    pub cluster: Arc<Cluster>,
}

/// A gateway virtual host: the hosts it serves (lower case) and its routes.
pub struct VirtualHost {
    pub hosts: Vec<String>,
    /// Its first host, the `destination_service` of its traffic.
    pub name: Arc<str>,
    pub routes: Vec<Route>,
}

pub struct Gateway {
    pub protocol: Protocol,
    pub vhosts: Vec<VirtualHost>,
    pub tcp: TcpRoutes,
}

/// Labels describing this workload, for metrics.
#[derive(Clone, Default)]
pub struct WorkloadMeta {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub principal: Arc<str>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// `<app>.<namespace>`: the service name of this proxy's spans.
    pub service_name: Arc<str>,
    /// What this proxy tells server sidecars about its workload
    /// (`x-mesh-peer`).
    pub peer_header: Option<http::HeaderValue>,
}

/// One compiled config.
pub struct Snapshot {
    pub version: Arc<str>,
    pub config: Arc<ProxyConfig>,
    pub workload: WorkloadMeta,
    /// Destinations by port, then lower-case host name (or IP).
    pub by_authority: HashMap<u16, HashMap<Box<str>, Arc<Destination>>>,
    pub by_addr: HashMap<SocketAddr, Arc<Destination>>,
    pub clusters: HashMap<Arc<str>, Arc<Cluster>>,
    pub inbound: HashMap<u16, InboundPort>,
    pub app_ip: IpAddr,
    pub inbound_limits: crate::cluster::Limits,
    pub rate_limiters: Vec<(Vec<u16>, Arc<RateLimiter>)>,
    pub gateways: HashMap<u16, Arc<Gateway>>,
    pub outbound_policy: OutboundPolicy,
    /// AuthorizationPolicies of the workload (inbound and gateway traffic).
    pub authz: crate::authz::Authz,
    /// RequestAuthentication JWT rules of the workload.
    pub authn: crate::jwt::Authn,
}

impl Snapshot {
    /// Finds the destination for a request authority (`host[:port]`),
    /// `default_port` applying when it names none.
    pub fn destination(&self, authority: &str, default_port: u16) -> Option<&Arc<Destination>> {
        let (host, port) = split_authority(authority, default_port);
        let hosts = self.by_authority.get(&port)?;
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            hosts.get(host.to_ascii_lowercase().as_str())
        } else {
            hosts.get(host)
        }
    }
}

/// `host:port` → (host, port); IPv6 in brackets.
pub fn split_authority(authority: &str, default_port: u16) -> (&str, u16) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            let port = after
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(default_port);
            return (host, port);
        }
        return (authority, default_port);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().unwrap_or(default_port)),
        _ => (authority, default_port),
    }
}

fn fraction(p: Option<Percent>, legacy: Option<i32>) -> f64 {
    match (p, legacy) {
        (Some(p), _) => (p.value / 100.0).clamp(0.0, 1.0),
        (None, Some(n)) => (f64::from(n) / 100.0).clamp(0.0, 1.0),
        (None, None) => 1.0,
    }
}

struct Compiler<'a> {
    clusters: &'a HashMap<Arc<str>, Arc<Cluster>>,
    here: Here<'a>,
}

impl Compiler<'_> {
    fn cluster(&self, name: &str, path: &str) -> Result<Arc<Cluster>, String> {
        self.clusters
            .get(name)
            .cloned()
            .ok_or_else(|| format!("{path}: unknown cluster {name:?}"))
    }

    fn weighted(
        &self,
        list: &[WeightedCluster],
        path: &str,
    ) -> Result<Vec<(Arc<Cluster>, u32)>, String> {
        list.iter()
            .enumerate()
            .map(|(i, w)| Ok((self.cluster(&w.cluster, &format!("{path}[{i}]"))?, w.weight)))
            .collect()
    }

    fn tcp_routes(&self, routes: &[model::TcpRoute], path: &str) -> Result<TcpRoutes, String> {
        routes
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Ok((
                    t.port,
                    self.weighted(&t.clusters, &format!("{path}.tcp[{i}].clusters"))?,
                ))
            })
            .collect()
    }

    fn route(&self, r: &model::Route, path: &str) -> Result<Route, String> {
        let matches = r
            .match_
            .iter()
            .enumerate()
            .map(|(i, m)| {
                RouteMatch::compile(m, &self.here).map_err(|e| format!("{path}.match[{i}]: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let match_prefixes = r
            .match_
            .iter()
            .map(|m| {
                m.uri
                    .as_ref()
                    .and_then(|u| u.prefix.as_deref())
                    .map(Into::into)
            })
            .collect();
        let action = match &r.action {
            RouteAction::Forward(list) => {
                if list.is_empty() {
                    return Err(format!("{path}.action.forward: no clusters"));
                }
                let clusters = list
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let p = format!("{path}.action.forward[{i}]");
                        let (request_ops, response_ops) =
                            HeaderOps::pair(w.headers.as_ref(), &format!("{p}.headers"))?;
                        Ok(Backend {
                            cluster: self.cluster(&w.cluster, &p)?,
                            weight: w.weight,
                            request_ops,
                            response_ops,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                let total_weight = clusters.iter().map(|b| b.weight).sum();
                Action::Forward {
                    clusters,
                    total_weight,
                }
            }
            RouteAction::Redirect(rd) => Action::Redirect(rd.clone()),
            RouteAction::DirectResponse(d) => {
                let status = u16::try_from(d.status)
                    .ok()
                    .and_then(|s| http::StatusCode::from_u16(s).ok())
                    .ok_or_else(|| {
                        format!(
                            "{path}.action.directResponse.status: invalid status {}",
                            d.status
                        )
                    })?;
                let body = match &d.body {
                    Some(b) => match (&b.string, &b.bytes) {
                        (Some(s), _) => Bytes::from(s.clone()),
                        (None, Some(b64)) => Bytes::from(decode_base64(b64).ok_or_else(|| {
                            format!("{path}.action.directResponse.body.bytes: invalid base64")
                        })?),
                        (None, None) => Bytes::new(),
                    },
                    None => Bytes::new(),
                };
                Action::Direct { status, body }
            }
        };
        let uri_rewrite = match &r.rewrite {
            Some(rw) => match (&rw.uri, &rw.uri_regex_rewrite) {
                (Some(u), _) => Some(UriRewrite::Prefix(u.as_str().into())),
                (None, Some(rr)) => Some(UriRewrite::Regex(
                    Regex::new(&rr.match_)
                        .map_err(|e| format!("{path}.rewrite.uriRegexRewrite.match: {e}"))?,
                    envoy_to_rust_replacement(&rr.rewrite),
                )),
                (None, None) => None,
            },
            None => None,
        };
        let authority_rewrite = r
            .rewrite
            .as_ref()
            .and_then(|rw| rw.authority.as_deref())
            .map(|a| {
                HeaderValue::from_str(a)
                    .map_err(|_| format!("{path}.rewrite.authority: invalid value {a:?}"))
            })
            .transpose()?;
        let retry = match &r.retries {
            None => RetryPolicy::istio_default(),
            Some(rt) => RetryPolicy {
                attempts: rt.attempts.max(0) as u32,
                per_try_timeout: rt.per_try_timeout.map(|d| d.as_std()),
                on: RetryOn::parse(
                    rt.retry_on
                        .as_deref()
                        .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,503"),
                ),
                backoff: rt.backoff.map_or(Duration::from_millis(25), |d| d.as_std()),
                ignore_previous_hosts: rt.retry_ignore_previous_hosts.unwrap_or(false),
            },
        };
        let fault = r.fault.as_ref().map(|f| {
            let delay = f.delay.as_ref().and_then(|d| {
                let dur = d.fixed_delay.or(d.exponential_delay)?;
                Some((dur.as_std(), fraction(d.percentage, d.percent)))
            });
            let abort = f.abort.as_ref().and_then(|a| {
                let kind = match (&a.http_status, &a.grpc_status) {
                    (Some(s), _) => Abort::Http(u16::try_from(*s).ok()?),
                    (None, Some(g)) => Abort::Grpc(
                        mesh_api::validate::GRPC_STATUS_NAMES
                            .iter()
                            .position(|n| n == g)? as u32,
                    ),
                    _ => return None,
                };
                Some((kind, fraction(a.percentage, None)))
            });
            Fault { delay, abort }
        });
        let mirrors = r
            .mirrors
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok((
                    self.cluster(&m.cluster, &format!("{path}.mirrors[{i}]"))?,
                    fraction(m.percentage, None),
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let cors = r
            .cors_policy
            .as_ref()
            .map(|c| compile_cors(c, &format!("{path}.corsPolicy")))
            .transpose()?;
        let (request_ops, response_ops) =
            HeaderOps::pair(r.headers.as_ref(), &format!("{path}.headers"))?;
        Ok(Route {
            name: r.name.as_deref().unwrap_or("default").into(),
            matches,
            match_prefixes,
            action,
            uri_rewrite,
            authority_rewrite,
            timeout: r.timeout.map(|d| d.as_std()).filter(|d| !d.is_zero()),
            retry,
            fault,
            mirrors,
            cors,
            request_ops,
            response_ops,
        })
    }
}

fn compile_cors(c: &CorsPolicy, path: &str) -> Result<Cors, String> {
    let mut origins = c
        .allow_origins
        .iter()
        .map(|o| Matcher::compile(o, false))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}.allowOrigins: {e}"))?;
    origins.extend(
        c.allow_origin
            .iter()
            .map(|o| Matcher::Exact(o.as_str().into())),
    );
    let join = |v: &[String]| {
        if v.is_empty() {
            Ok(None)
        } else {
            HeaderValue::from_str(&v.join(","))
                .map(Some)
                .map_err(|_| format!("{path}: invalid header value"))
        }
    };
    Ok(Cors {
        origins,
        methods: join(&c.allow_methods)?,
        headers: join(&c.allow_headers)?,
        expose: join(&c.expose_headers)?,
        max_age: c.max_age.map(|d| HeaderValue::from(d.as_std().as_secs())),
        credentials: c.allow_credentials == Some(true),
    })
}

/// Envoy's regex rewrite substitutions (`\1`) in the regex crate's syntax.
fn envoy_to_rust_replacement(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, b) in chunk.iter().enumerate() {
            acc |= val(*b)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

fn compile_gateway(g: &GatewayListener, c: &Compiler, path: &str) -> Result<Gateway, String> {
    let vhosts = g
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(i, vh)| {
            let routes = vh
                .routes
                .iter()
                .enumerate()
                .map(|(j, r)| c.route(r, &format!("{path}.virtualHosts[{i}].routes[{j}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let hosts: Vec<String> = vh.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
            Ok(VirtualHost {
                name: hosts.first().map_or("unknown", String::as_str).into(),
                hosts,
                routes,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let tcp = c.tcp_routes(&g.tcp, path)?;
    Ok(Gateway {
        protocol: g.protocol,
        vhosts,
        tcp,
    })
}

/// Compiles a config, or says what is wrong with it.
pub fn compile(
    cfg: ProxyConfig,
    registry: &Registry,
    gateway_names: &[String],
) -> Result<Snapshot, String> {
    let mut clusters = HashMap::new();
    for (i, c) in cfg.clusters.iter().enumerate() {
        let cluster = Cluster::build(c, registry).map_err(|e| format!("clusters[{i}]: {e}"))?;
        if clusters
            .insert(cluster.name.clone(), Arc::new(cluster))
            .is_some()
        {
            return Err(format!("clusters[{i}]: duplicate cluster {:?}", c.name));
        }
    }
    let mesh = ["mesh".to_string()];
    let compiler = Compiler {
        clusters: &clusters,
        here: Here {
            labels: &cfg.workload.labels,
            namespace: &cfg.workload.namespace,
            gateways: if gateway_names.is_empty() {
                &mesh
            } else {
                gateway_names
            },
        },
    };
    let mut by_authority = HashMap::new();
    let mut by_addr = HashMap::new();
    for (i, d) in cfg.destinations.iter().enumerate() {
        let path = format!("destinations[{i}]");
        let routes = d
            .http
            .iter()
            .enumerate()
            .map(|(j, r)| compiler.route(r, &format!("{path}.http[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let tcp = compiler.tcp_routes(&d.tcp, &path)?;
        let dest = Arc::new(Destination {
            host: d.host.as_str().into(),
            port: d.port,
            protocol: d.protocol,
            routes,
            tcp,
        });
        for name in std::iter::once(&d.host).chain(&d.aliases) {
            by_authority
                .entry(d.port)
                .or_insert_with(HashMap::new)
                .insert(name.to_ascii_lowercase().into_boxed_str(), dest.clone());
        }
        for ip in &d.addresses {
            by_addr.insert(SocketAddr::new(*ip, d.port), dest.clone());
            by_authority
                .entry(d.port)
                .or_insert_with(HashMap::new)
                .insert(ip.to_string().into_boxed_str(), dest.clone());
        }
    }
    let app_ip = cfg
        .inbound
        .app_address
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let inbound_limits_model = cfg.inbound.connection_pool.clone();
    let mut inbound = HashMap::new();
    for p in &cfg.inbound.ports {
        let target = SocketAddr::new(app_ip, p.target_port.unwrap_or(p.port));
        let mut cluster = Cluster::build(
            &model::Cluster {
                name: format!("inbound|{}||", p.port),
                service: p.service.clone().unwrap_or_default(),
                endpoints: vec![model::Endpoint {
                    address: target,
                    weight: 1,
                    labels: Default::default(),
                    workload: Some(cfg.workload.name.clone()),
                    namespace: Some(cfg.workload.namespace.clone()),
                    locality: None,
                    identity: None,
                }],
                protocol: p.protocol,
                connection_pool: inbound_limits_model.clone(),
                ..Default::default()
            },
            registry,
        )?;
        cluster.protocol = p.protocol;
        inbound.insert(
            p.port,
            InboundPort {
                target,
                protocol: p.protocol,
                service: p.service.as_deref().unwrap_or("").into(),
                cluster: Arc::new(cluster),
            },
        );
    }
    let rate_limiters = cfg
        .inbound
        .rate_limits
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let limiter =
                RateLimiter::new(spec).map_err(|e| format!("inbound.rateLimits[{i}]: {e}"))?;
            let ports = spec
                .ports
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .collect();
            Ok((ports, Arc::new(limiter)))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let gateways = cfg
        .gateway_listeners
        .iter()
        .enumerate()
        .map(|(i, g)| {
            Ok((
                g.port,
                Arc::new(compile_gateway(
                    g,
                    &compiler,
                    &format!("gatewayListeners[{i}]"),
                )?),
            ))
        })
        .collect::<Result<HashMap<_, _>, String>>()?;
    let w = &cfg.workload;
    let label = |k: &str, fallback: &str| -> Arc<str> {
        w.labels.get(k).map_or(fallback, String::as_str).into()
    };
    let workload = WorkloadMeta {
        name: if w.name.is_empty() {
            "unknown".into()
        } else {
            w.name.as_str().into()
        },
        namespace: if w.namespace.is_empty() {
            "unknown".into()
        } else {
            w.namespace.as_str().into()
        },
        app: if w.canonical_service.is_empty() {
            label("app", "unknown")
        } else {
            w.canonical_service.as_str().into()
        },
        version: if w.canonical_revision.is_empty() {
            label("version", "latest")
        } else {
            w.canonical_revision.as_str().into()
        },
        principal: if w.service_account.is_empty() {
            "unknown".into()
        } else {
            let td = if w.trust_domain.is_empty() {
                mesh_api::resource::DEFAULT_TRUST_DOMAIN
            } else {
                &w.trust_domain
            };
            format!("spiffe://{td}/ns/{}/sa/{}", w.namespace, w.service_account).into()
        },
        labels: w.labels.clone(),
        service_name: Arc::from(""),
        peer_header: None,
    };
    let workload = WorkloadMeta {
        service_name: format!("{}.{}", workload.app, workload.namespace).into(),
        peer_header: Some(crate::metrics::Peer::header_value(&workload)),
        ..workload
    };
    let inbound_limits = crate::cluster::Limits::from_model(cfg.inbound.connection_pool.as_ref());
    let authz = crate::authz::Authz::new(&cfg.inbound.authorization)
        .map_err(|e| format!("inbound.authorization: {e}"))?;
    let authn = crate::jwt::Authn::new(&cfg.inbound.jwt_rules, registry)
        .map_err(|e| format!("inbound.{e}"))?;
    Ok(Snapshot {
        authz,
        authn,
        version: cfg.version.as_str().into(),
        workload,
        by_authority,
        by_addr,
        clusters,
        inbound,
        app_ip,
        inbound_limits,
        rate_limiters,
        gateways,
        outbound_policy: cfg.outbound_policy,
        config: Arc::new(cfg),
    })
}

/// The current config, swapped atomically; `None` until one is loaded.
#[derive(Default)]
pub struct ConfigCell {
    current: ArcSwapOption<Snapshot>,
}

impl ConfigCell {
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    pub fn store(&self, s: Snapshot) {
        self.current.store(Some(Arc::new(s)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms() {
        assert_eq!(split_authority("reviews:9080", 80), ("reviews", 9080));
        assert_eq!(split_authority("reviews", 80), ("reviews", 80));
        assert_eq!(split_authority("[::1]:8080", 80), ("::1", 8080));
        assert_eq!(split_authority("[::1]", 80), ("::1", 80));
    }

    #[test]
    fn envoy_substitutions() {
        assert_eq!(envoy_to_rust_replacement("/\\1/x"), "/${1}/x");
        assert_eq!(envoy_to_rust_replacement("$a"), "$$a");
    }

    #[test]
    fn base64() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGk").unwrap(), b"hi");
        assert!(decode_base64("a$").is_none());
    }

    #[test]
    fn retry_on() {
        let r = RetryOn::parse("5xx,retriable-status-codes,409,unavailable");
        assert!(r.status(503) && r.status(409) && !r.status(404));
        assert_eq!(r.grpc, [14]);
        let d = RetryPolicy::istio_default();
        assert!(d.on.status(503) && !d.on.status(500) && d.on.connect_failure);
    }
}

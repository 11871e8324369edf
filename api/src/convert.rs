//! Turning what users write into the mesh's resources.
//!
//! - Istio's `networking.istio.io/{v1alpha3,v1beta1,v1}` and
//!   `security.istio.io/{v1beta1,v1}` resources have the mesh's schema: they
//!   were read as mesh resources already and come out with the mesh's
//!   apiVersion.
//! - Legacy `config.istio.io/v1alpha2` RouteRules become a VirtualService per
//!   destination (one HTTP route per rule, ordered by precedence) plus a
//!   DestinationRule per service whose instances they select by label.
//! - Everything else passes through unchanged, with a warning.
//!
//! Document order is kept: the resources made from a group of RouteRules
//! stand where the group's first rule stood.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::legacy::{IstioService, RouteRule};
use crate::load::{Disposition, Document, Item, LoadError, Origin, disposition};
use crate::networking::{
    CorsPolicy, Destination, DestinationRule, DestinationRuleSpec, FaultAbort, FaultDelay,
    HeaderOperations, Headers, HttpFaultInjection, HttpMatchRequest, HttpRedirect, HttpRetry,
    HttpRewrite, HttpRoute, HttpRouteDestination, Percent, StringMatch, Subset, VirtualService,
    VirtualServiceSpec,
};
use crate::resource::{DEFAULT_NAMESPACE, Resource};

/// A document after conversion.
#[derive(Clone, Debug)]
pub struct Converted {
    pub origin: Origin,
    pub item: Output,
}

#[derive(Clone, Debug)]
pub enum Output {
    Resource(Box<Resource>),
    /// Passed through unchanged.
    Other(serde_yaml::Value),
    Invalid(LoadError),
}

/// Something a user should know about a conversion; nothing is dropped
/// without one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Converts a stream of documents (possibly from several files).
pub fn convert(docs: Vec<Document>) -> (Vec<Converted>, Vec<Warning>) {
    let mut warnings = Vec::new();
    // Group RouteRules by (namespace, destination host).
    let mut groups: BTreeMap<(String, String), Vec<(Origin, RouteRule)>> = BTreeMap::new();
    let mut order: Vec<Slot> = Vec::new();
    for doc in docs {
        match doc.item {
            Item::Resource { resource, .. } => order.push(Slot::Done(Converted {
                origin: doc.origin,
                item: Output::Resource(resource),
            })),
            Item::Invalid(e) => order.push(Slot::Done(Converted {
                origin: doc.origin,
                item: Output::Invalid(e),
            })),
            Item::Other {
                api_version,
                kind,
                value,
            } => {
                let what = describe(&api_version, &kind, &value);
                let message = match disposition(&api_version, &kind) {
                    Disposition::Unsupported => {
                        format!("{what}: not supported by the mesh; passed through unchanged")
                    }
                    _ => format!("{what}: not a mesh resource; passed through unchanged"),
                };
                warnings.push(Warning {
                    origin: doc.origin.clone(),
                    message,
                });
                order.push(Slot::Done(Converted {
                    origin: doc.origin,
                    item: Output::Other(value),
                }));
            }
            Item::RouteRule(rr) => {
                let ns = rr
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
                let host = service_host(&rr.spec.destination);
                let key = (ns, host);
                if !groups.contains_key(&key) {
                    order.push(Slot::RouteRules(key.clone()));
                }
                groups.entry(key).or_default().push((doc.origin, *rr));
            }
        }
    }
    let mut out = Vec::with_capacity(order.len());
    for slot in order {
        match slot {
            Slot::Done(c) => out.push(c),
            Slot::RouteRules(key) => {
                let rules = groups.remove(&key).unwrap_or_default();
                out.extend(convert_route_rules(&key.0, &key.1, rules, &mut warnings));
            }
        }
    }
    (out, warnings)
}

enum Slot {
    Done(Converted),
    RouteRules((String, String)),
}

fn describe(api_version: &str, kind: &str, value: &serde_yaml::Value) -> String {
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str());
    match ns {
        Some(ns) => format!("{api_version} {kind} {ns}/{name}"),
        None => format!("{api_version} {kind} {name}"),
    }
}

/// The host a legacy service reference names: `name`, or
/// `name.namespace.svc.<domain>` when a namespace is given.
fn service_host(s: &IstioService) -> String {
    if let Some(fqdn) = s.service.as_deref().filter(|f| !f.is_empty()) {
        return fqdn.to_string();
    }
    match s.namespace.as_deref().filter(|n| !n.is_empty()) {
        Some(ns) => format!(
            "{}.{}.svc.{}",
            s.name,
            ns,
            s.domain.as_deref().unwrap_or("cluster.local")
        ),
        None => s.name.clone(),
    }
}

/// The subset name for a set of labels: `v1` for `{version: v1}`, the
/// values joined by `-` otherwise, made a valid DNS label.
fn subset_name(labels: &BTreeMap<String, String>) -> String {
    let raw = match labels.get("version") {
        Some(v) if labels.len() == 1 => v.clone(),
        _ => labels.values().cloned().collect::<Vec<_>>().join("-"),
    };
    let mut name: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name = name.trim_matches('-').to_string();
    if name.is_empty() {
        name = "subset".to_string();
    }
    name.truncate(63);
    name
}

/// Subsets needed per host, named once per distinct label set.
type Labels = BTreeMap<String, String>;

#[derive(Default)]
struct Subsets {
    by_host: BTreeMap<String, Vec<(String, Labels)>>,
}

impl Subsets {
    fn name_for(&mut self, host: &str, labels: &BTreeMap<String, String>) -> Option<String> {
        if labels.is_empty() {
            return None;
        }
        let list = self.by_host.entry(host.to_string()).or_default();
        if let Some((name, _)) = list.iter().find(|(_, l)| l == labels) {
            return Some(name.clone());
        }
        let base = subset_name(labels);
        let mut name = base.clone();
        let mut n = 2;
        while list.iter().any(|(existing, _)| *existing == name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        list.push((name.clone(), labels.clone()));
        Some(name)
    }
}

fn short_name(host: &str) -> String {
    host.split('.').next().unwrap_or(host).to_string()
}

fn convert_route_rules(
    namespace: &str,
    host: &str,
    mut rules: Vec<(Origin, RouteRule)>,
    warnings: &mut Vec<Warning>,
) -> Vec<Converted> {
    // Highest precedence first; equal precedence by name, for a stable order.
    rules.sort_by(|(_, a), (_, b)| {
        b.spec
            .precedence
            .cmp(&a.spec.precedence)
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    let first_origin = rules[0].0.clone();
    let mut subsets = Subsets::default();
    let mut http = Vec::new();
    let mut saw_catch_all: Option<String> = None;
    for (origin, rule) in &rules {
        let rule_name = rule.metadata.name.clone().unwrap_or_default();
        let mut warn = |message: String| {
            warnings.push(Warning {
                origin: origin.clone(),
                message: format!("RouteRule {namespace}/{rule_name}: {message}"),
            })
        };
        let route = convert_rule(host, rule, &mut subsets, &mut warn);
        if let Some(prev) = &saw_catch_all {
            warn(format!(
                "unreachable: RouteRule {prev} has higher precedence and matches every request"
            ));
        }
        if route.match_.is_empty() && saw_catch_all.is_none() {
            saw_catch_all = Some(rule_name.clone());
        }
        http.push(route);
    }
    let mut out = Vec::new();
    for (dr_host, list) in std::mem::take(&mut subsets.by_host) {
        let spec = DestinationRuleSpec {
            host: dr_host.clone(),
            subsets: list
                .into_iter()
                .map(|(name, labels)| Subset {
                    name,
                    labels,
                    traffic_policy: None,
                })
                .collect(),
            ..Default::default()
        };
        out.push(Converted {
            origin: first_origin.clone(),
            item: Output::Resource(Box::new(Resource::DestinationRule(DestinationRule {
                metadata: meta(&short_name(&dr_host), namespace),
                spec,
            }))),
        });
    }
    let vs = VirtualService {
        metadata: meta(&short_name(host), namespace),
        spec: VirtualServiceSpec {
            hosts: vec![host.to_string()],
            http,
            ..Default::default()
        },
    };
    out.push(Converted {
        origin: first_origin,
        item: Output::Resource(Box::new(Resource::VirtualService(vs))),
    });
    out
}

fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        ..Default::default()
    }
}

fn percent(p: Option<f64>) -> Option<Percent> {
    Some(Percent {
        value: p.unwrap_or(100.0),
    })
}

fn convert_rule(
    host: &str,
    rule: &RouteRule,
    subsets: &mut Subsets,
    warn: &mut dyn FnMut(String),
) -> HttpRoute {
    let spec = &rule.spec;
    let mut route = HttpRoute {
        name: rule.metadata.name.clone(),
        ..Default::default()
    };
    if let Some(m) = &spec.match_ {
        let mut req = HttpMatchRequest::default();
        if let Some(src) = &m.source {
            req.source_labels = src.labels.clone();
            if !src.name.is_empty() {
                req.source_labels
                    .insert("app".to_string(), short_name(&service_host(src)));
                warn(format!(
                    "match.source.name {:?} became sourceLabels app={}",
                    src.name,
                    short_name(&service_host(src))
                ));
            }
        }
        if m.tcp.is_some() || m.udp.is_some() {
            warn(
                "match.tcp/match.udp (L4 matches) have no HTTP equivalent and were left out".into(),
            );
        }
        if let Some(r) = &m.request {
            for (name, sm) in &r.headers {
                match name.as_str() {
                    "uri" => req.uri = Some(sm.clone()),
                    "scheme" => req.scheme = Some(sm.clone()),
                    "method" => req.method = Some(sm.clone()),
                    "authority" => req.authority = Some(sm.clone()),
                    _ => {
                        req.headers.insert(name.to_ascii_lowercase(), sm.clone());
                    }
                }
            }
        }
        if req != HttpMatchRequest::default() {
            route.match_.push(req);
        }
    }
    let single = spec.route.len() == 1;
    for dw in &spec.route {
        let dest_host = dw
            .destination
            .as_ref()
            .map_or_else(|| host.to_string(), service_host);
        let labels = if dw.labels.is_empty() {
            dw.destination
                .as_ref()
                .map(|d| d.labels.clone())
                .unwrap_or_default()
        } else {
            dw.labels.clone()
        };
        let subset = subsets.name_for(&dest_host, &labels);
        route.route.push(HttpRouteDestination {
            destination: Destination {
                host: dest_host,
                subset,
                port: None,
            },
            weight: if single && dw.weight.is_none_or(|w| w == 100) {
                None
            } else {
                dw.weight
            },
            headers: None,
        });
    }
    if spec.route.is_empty() && spec.redirect.is_none() {
        route.route.push(HttpRouteDestination {
            destination: Destination {
                host: host.to_string(),
                subset: None,
                port: None,
            },
            weight: None,
            headers: None,
        });
    }
    if let Some(r) = &spec.redirect {
        route.route.clear();
        route.redirect = Some(HttpRedirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            ..Default::default()
        });
    }
    if let Some(r) = &spec.rewrite {
        route.rewrite = Some(HttpRewrite {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            uri_regex_rewrite: None,
        });
    }
    if spec.websocket_upgrade.is_some() {
        warn("websocketUpgrade is not needed: WebSocket upgrades are always allowed".into());
    }
    if let Some(t) = &spec.http_req_timeout {
        route.timeout = Some(t.simple_timeout.timeout);
        if t.simple_timeout.override_header_name.is_some() {
            warn("httpReqTimeout.simpleTimeout.overrideHeaderName has no equivalent and was left out".into());
        }
    }
    if let Some(r) = &spec.http_req_retries {
        route.retries = Some(HttpRetry {
            attempts: r.simple_retry.attempts,
            per_try_timeout: r.simple_retry.per_try_timeout,
            ..Default::default()
        });
        if r.simple_retry.override_header_name.is_some() {
            warn(
                "httpReqRetries.simpleRetry.overrideHeaderName has no equivalent and was left out"
                    .into(),
            );
        }
    }
    if let Some(f) = &spec.http_fault {
        let mut fault = HttpFaultInjection::default();
        if let Some(d) = &f.delay {
            fault.delay = Some(FaultDelay {
                fixed_delay: d.fixed_delay,
                exponential_delay: d.exponential_delay,
                percentage: percent(d.percent),
                percent: None,
            });
            if d.override_header_name.is_some() {
                warn(
                    "httpFault.delay.overrideHeaderName has no equivalent and was left out".into(),
                );
            }
        }
        if let Some(a) = &f.abort {
            fault.abort = Some(FaultAbort {
                http_status: a.http_status,
                grpc_status: a.grpc_status.clone(),
                http2_error: a.http2_error.clone(),
                percentage: percent(a.percent),
            });
            if a.override_header_name.is_some() {
                warn(
                    "httpFault.abort.overrideHeaderName has no equivalent and was left out".into(),
                );
            }
        }
        route.fault = Some(fault);
    }
    if spec.l4_fault.is_some() {
        warn("l4Fault has no equivalent in VirtualService and was left out".into());
    }
    if let Some(m) = &spec.mirror {
        let mhost = service_host(m);
        let subset = subsets.name_for(&mhost, &m.labels);
        route.mirror = Some(Destination {
            host: mhost,
            subset,
            port: None,
        });
    }
    if let Some(c) = &spec.cors_policy {
        route.cors_policy = Some(CorsPolicy {
            allow_origins: c.allow_origin.iter().map(StringMatch::exact).collect(),
            allow_methods: c.allow_methods.clone(),
            allow_headers: c.allow_headers.clone(),
            expose_headers: c.expose_headers.clone(),
            max_age: c.max_age,
            allow_credentials: c.allow_credentials,
            ..Default::default()
        });
    }
    if !spec.append_headers.is_empty() {
        route.headers = Some(Headers {
            request: Some(HeaderOperations {
                add: spec.append_headers.clone(),
                ..Default::default()
            }),
            response: None,
        });
    }
    route
}

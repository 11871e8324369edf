//! From services, workloads and routing resources to what proxies run:
//! per destination (service host and port) its route table, per cluster
//! (`outbound|port|subset|host`) its endpoints and policies, per workload
//! its inbound policy and gateway listeners.
//!
//! Everything here is a pure function of [`Inputs`]; [`crate::store`] keeps
//! the results and decides what to recompute.

use std::collections::BTreeMap;

use mesh_api::ca::spiffe_id;
use mesh_api::model::{
    self, AuthorizationRules, Cluster, DestinationConfig, Endpoint, GatewayListener, Inbound,
    InboundPort, Mirror, OutboundPolicy, Protocol, Route, RouteAction, TcpRoute, VirtualHost,
    WeightedCluster, WorkloadResource,
};
use mesh_api::networking::{
    self as net, DestinationRule, HttpRoute, OutboundTrafficMode, TrafficPolicy, VirtualService,
};
use mesh_api::resource::ROOT_NAMESPACE;
use mesh_api::security::{
    MtlsMode, PeerAuthentication, PolicyTargetReference, TLS_MODE_LABEL, TLS_MODE_MESH,
};
use mesh_api::selector::WorkloadSelector;
use mesh_api::validate::{fqdn, host_covers};
use mesh_api::{Kind, Resource};

use crate::registry::{Inputs, Service, ServicePort};

/// Who a proxy is, as it said when it connected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeInfo {
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub gateway: bool,
    /// Gateways named on the proxy's command line (`namespace/name`).
    pub gateways: Vec<String>,
}

/// Mesh-wide settings.
#[derive(Clone, Debug, Default)]
pub struct MeshSettings {
    pub outbound_policy: OutboundPolicy,
    pub trust_domain: String,
}

impl MeshSettings {
    /// The trust domain, `cluster.local` when unset.
    pub fn trust_domain(&self) -> &str {
        if self.trust_domain.is_empty() {
            mesh_api::resource::DEFAULT_TRUST_DOMAIN
        } else {
            &self.trust_domain
        }
    }
}

/// `outbound|port|subset|host`.
pub fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Splits a cluster name into port, subset and host.
pub fn parse_cluster_name(name: &str) -> Option<(u16, &str, &str)> {
    let mut parts = name.splitn(4, '|');
    if parts.next()? != "outbound" {
        return None;
    }
    let port = parts.next()?.parse().ok()?;
    Some((port, parts.next()?, parts.next()?))
}

/// The destination of one service port, and the clusters it routes to.
pub fn destination(inputs: &Inputs, svc: &Service, sp: &ServicePort) -> DestinationConfig {
    let vs = virtual_service_for(inputs, &svc.host, "mesh");
    let mut d = DestinationConfig {
        host: svc.host.clone(),
        port: sp.port,
        aliases: Vec::new(),
        addresses: svc.addresses.clone(),
        protocol: sp.protocol,
        http: Vec::new(),
        tcp: Vec::new(),
    };
    let default_cluster = || WeightedCluster {
        cluster: cluster_name(sp.port, "", &svc.host),
        weight: 100,
        headers: None,
    };
    if let Some(vs) = vs {
        let ctx = RouteContext {
            inputs,
            namespace: vs.metadata.namespace.as_deref().unwrap_or("default"),
            gateway: "mesh",
            this_host: &svc.host,
            this_port: sp.port,
        };
        d.http = ctx.http_routes(&vs.spec.http, 0);
        for r in &vs.spec.tcp {
            let clusters = r
                .route
                .iter()
                .map(|rd| ctx.weighted(&rd.destination, rd.weight, r.route.len(), None))
                .collect::<Vec<_>>();
            let ports: Vec<Option<u16>> = if r.match_.is_empty() {
                vec![None]
            } else {
                r.match_
                    .iter()
                    .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
                    .map(|m| m.port.and_then(|p| u16::try_from(p).ok()))
                    .collect()
            };
            for port in ports {
                d.tcp.push(TcpRoute {
                    port,
                    clusters: clusters.clone(),
                });
            }
        }
    }
    if d.http.is_empty() {
        d.http.push(Route {
            action: RouteAction::Forward(vec![default_cluster()]),
            ..Default::default()
        });
    }
    if d.tcp.is_empty() {
        d.tcp.push(TcpRoute {
            port: None,
            clusters: vec![default_cluster()],
        });
    }
    d
}

/// The clusters a destination, listener or workload routes to.
pub fn referenced_clusters(http: &[Route], tcp: &[TcpRoute], out: &mut Vec<String>) {
    for r in http {
        if let RouteAction::Forward(list) = &r.action {
            out.extend(list.iter().map(|w| w.cluster.clone()));
        }
        out.extend(r.mirrors.iter().map(|m| m.cluster.clone()));
    }
    for t in tcp {
        out.extend(t.clusters.iter().map(|w| w.cluster.clone()));
    }
}

/// The VirtualService that routes `host` for `gateway` (`mesh` for
/// sidecars): an exact host before a wildcard, then the oldest by name.
pub(crate) fn virtual_service_for<'a>(
    inputs: &'a Inputs,
    host: &str,
    gateway: &str,
) -> Option<&'a VirtualService> {
    let mut best: Option<(&VirtualService, bool)> = None;
    for r in inputs.config_of(Kind::VirtualService) {
        let Resource::VirtualService(vs) = &**r else {
            continue;
        };
        let ns = vs.metadata.namespace.as_deref().unwrap_or("default");
        if !binds(&vs.spec.gateways, gateway, ns) {
            continue;
        }
        for h in &vs.spec.hosts {
            let h = fqdn(h, ns);
            if !host_covers(&h, host) {
                continue;
            }
            let exact = h.eq_ignore_ascii_case(host);
            if best.is_none_or(|(_, e)| exact && !e) {
                best = Some((vs, exact));
            }
        }
    }
    best.map(|(vs, _)| vs)
}

/// True when a VirtualService's `gateways` list binds it to `gateway`.
fn binds(gateways: &[String], gateway: &str, vs_namespace: &str) -> bool {
    if gateways.is_empty() {
        return gateway == "mesh";
    }
    gateways
        .iter()
        .any(|g| gateway_ref_is(g, gateway, vs_namespace))
}

fn gateway_ref_is(reference: &str, gateway: &str, vs_namespace: &str) -> bool {
    if reference == "mesh" || gateway == "mesh" {
        return reference == gateway;
    }
    match reference.split_once('/') {
        Some(_) => reference == gateway,
        None => gateway
            .split_once('/')
            .is_some_and(|(ns, name)| ns == vs_namespace && name == reference),
    }
}

struct RouteContext<'a> {
    inputs: &'a Inputs,
    /// The VirtualService's namespace (short hosts resolve there).
    namespace: &'a str,
    /// `mesh` or the gateway's `namespace/name`.
    gateway: &'a str,
    /// The destination being compiled (sidecars), for default ports.
    this_host: &'a str,
    this_port: u16,
}

impl RouteContext<'_> {
    fn http_routes(&self, routes: &[HttpRoute], depth: usize) -> Vec<Route> {
        let mut out = Vec::new();
        for r in routes {
            // Keep the matches that apply to this gateway; the proxy
            // decides the rest (ports, source labels, headers).
            let matches: Vec<net::HttpMatchRequest> = r
                .match_
                .iter()
                .filter(|m| {
                    m.gateways.is_empty()
                        || m.gateways
                            .iter()
                            .any(|g| gateway_ref_is(g, self.gateway, self.namespace))
                })
                .map(|m| net::HttpMatchRequest {
                    gateways: Vec::new(),
                    ..m.clone()
                })
                .collect();
            if !r.match_.is_empty() && matches.is_empty() {
                continue;
            }
            if let Some(d) = &r.delegate {
                // A delegate's routes apply under this route's matches: a
                // delegate route without matches of its own takes them.
                if depth > 0 {
                    continue; // Delegation is one level deep, as in Istio.
                }
                let ns = d.namespace.as_deref().unwrap_or(self.namespace);
                let key = mesh_api::ResourceKey {
                    kind: Kind::VirtualService,
                    namespace: ns.to_string(),
                    name: d.name.clone(),
                };
                if let Some(child) = self.inputs.config.get(&key)
                    && let Resource::VirtualService(child) = &**child
                {
                    let sub = RouteContext {
                        namespace: ns,
                        ..*self
                    };
                    for mut cr in sub.http_routes(&child.spec.http, depth + 1) {
                        if cr.match_.is_empty() {
                            cr.match_ = matches.clone();
                        }
                        out.push(cr);
                    }
                }
                continue;
            }
            let action = if let Some(rd) = &r.redirect {
                RouteAction::Redirect(rd.clone())
            } else if let Some(dr) = &r.direct_response {
                RouteAction::DirectResponse(dr.clone())
            } else {
                RouteAction::Forward(
                    r.route
                        .iter()
                        .map(|rd| {
                            self.weighted(
                                &rd.destination,
                                rd.weight,
                                r.route.len(),
                                rd.headers.clone(),
                            )
                        })
                        .collect(),
                )
            };
            let mut mirrors = Vec::new();
            if let Some(m) = &r.mirror {
                let percentage = r
                    .mirror_percentage
                    .or(r.mirror_percent.map(|p| net::Percent { value: p as f64 }));
                mirrors.push(Mirror {
                    cluster: self.cluster(m),
                    percentage,
                });
            }
            for m in &r.mirrors {
                mirrors.push(Mirror {
                    cluster: self.cluster(&m.destination),
                    percentage: m.percentage,
                });
            }
            out.push(Route {
                name: r.name.clone(),
                match_: matches,
                action,
                rewrite: r.rewrite.clone(),
                timeout: r.timeout,
                retries: r.retries.clone(),
                fault: r.fault.clone(),
                mirrors,
                cors_policy: r.cors_policy.clone(),
                headers: r.headers.clone(),
            });
        }
        out
    }

    fn weighted(
        &self,
        d: &net::Destination,
        weight: Option<i32>,
        of: usize,
        headers: Option<net::Headers>,
    ) -> WeightedCluster {
        let default = if of == 1 { 100 } else { 0 };
        WeightedCluster {
            cluster: self.cluster(d),
            weight: weight
                .map_or(default, |w| u32::try_from(w).unwrap_or(0))
                .max(u32::from(of == 1)),
            headers,
        }
    }

    /// The cluster a route destination names: its port when given, else
    /// the port being routed (same host) or the service's only port.
    fn cluster(&self, d: &net::Destination) -> String {
        let host = fqdn(&d.host, self.namespace).to_ascii_lowercase();
        let port = match d.port.and_then(|p| u16::try_from(p.number).ok()) {
            Some(p) => p,
            None if host == self.this_host => self.this_port,
            None => match self.inputs.service_by_host(&host) {
                Some(svc) if svc.ports.len() == 1 => svc.ports[0].port,
                _ => self.this_port,
            },
        };
        cluster_name(port, d.subset.as_deref().unwrap_or(""), &host)
    }
}

/// A cluster by name: the endpoints of its host and subset, with the
/// DestinationRule's policies for that port and subset. Endpoints with a
/// sidecar carry its SPIFFE ID, for automatic mTLS.
pub fn cluster(inputs: &Inputs, name: &str, mesh: &MeshSettings) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        ..Default::default()
    };
    let Some((port, subset, host)) = parse_cluster_name(name) else {
        return c;
    };
    c.service = host.to_string();
    let dr = destination_rule_for(inputs, host);
    let subset_spec = dr.and_then(|dr| dr.spec.subsets.iter().find(|s| s.name == subset));
    let svc = inputs.service_by_host(host);
    let sp = svc.and_then(|s| s.port(port));
    if let (Some(svc), Some(sp)) = (svc, sp) {
        c.protocol = sp.protocol;
        if subset.is_empty() || subset_spec.is_some() {
            let want = subset_spec.map(|s| &s.labels);
            for w in inputs.endpoints_of(svc) {
                if want.is_some_and(|l| l.iter().any(|(k, v)| w.labels.get(k) != Some(v))) {
                    continue;
                }
                let Some(tp) = w.target_port(sp) else {
                    continue;
                };
                c.endpoints.push(Endpoint {
                    address: std::net::SocketAddr::new(w.address, tp),
                    weight: w.weight.max(1),
                    labels: w.labels.clone(),
                    // The name the workload's own proxy reports as
                    // source_workload, so both ends of a call agree.
                    workload: Some(w.key.name.clone()),
                    namespace: Some(w.key.namespace.clone()),
                    locality: w.locality.clone(),
                    identity: (w.labels.get(TLS_MODE_LABEL).map(String::as_str)
                        == Some(TLS_MODE_MESH))
                    .then(|| spiffe_id(mesh.trust_domain(), &w.key.namespace, &w.service_account)),
                });
            }
        }
    }
    if let Some(dr) = dr {
        apply_policy(&mut c, dr.spec.traffic_policy.as_ref(), port);
        if let Some(s) = subset_spec {
            apply_policy(&mut c, s.traffic_policy.as_ref(), port);
        }
    }
    c
}

fn apply_policy(c: &mut Cluster, tp: Option<&TrafficPolicy>, port: u16) {
    let Some(tp) = tp else {
        return;
    };
    if tp.load_balancer.is_some() {
        c.load_balancer = tp.load_balancer.clone();
    }
    if tp.connection_pool.is_some() {
        c.connection_pool = tp.connection_pool.clone();
    }
    if tp.outlier_detection.is_some() {
        c.outlier_detection = tp.outlier_detection.clone();
    }
    if tp.tls.is_some() {
        c.tls = tp.tls.clone();
    }
    for pl in &tp.port_level_settings {
        if pl.port.is_some_and(|p| p.number == u32::from(port)) {
            if pl.load_balancer.is_some() {
                c.load_balancer = pl.load_balancer.clone();
            }
            if pl.connection_pool.is_some() {
                c.connection_pool = pl.connection_pool.clone();
            }
            if pl.outlier_detection.is_some() {
                c.outlier_detection = pl.outlier_detection.clone();
            }
            if pl.tls.is_some() {
                c.tls = pl.tls.clone();
            }
        }
    }
}

/// The DestinationRule for a host: an exact host before a wildcard.
pub(crate) fn destination_rule_for<'a>(
    inputs: &'a Inputs,
    host: &str,
) -> Option<&'a DestinationRule> {
    let mut best: Option<(&DestinationRule, bool)> = None;
    for r in inputs.config_of(Kind::DestinationRule) {
        let Resource::DestinationRule(dr) = &**r else {
            continue;
        };
        if dr.spec.workload_selector.is_some() {
            continue;
        }
        let h = fqdn(
            &dr.spec.host,
            dr.metadata.namespace.as_deref().unwrap_or("default"),
        );
        if host_covers(&h, host) {
            let exact = h.eq_ignore_ascii_case(host);
            if best.is_none_or(|(_, e)| exact && !e) {
                best = Some((dr, exact));
            }
        }
    }
    best.map(|(dr, _)| dr)
}

/// A proxy's own resource: inbound ports of the services that select it,
/// its rate limits and outbound policy, and for gateways their listeners.
pub fn workload(inputs: &Inputs, node: &NodeInfo, mesh: &MeshSettings) -> WorkloadResource {
    let labels = &node.labels;
    let selects =
        |sel: &BTreeMap<String, String>| sel.iter().all(|(k, v)| labels.get(k) == Some(v));
    let entry = inputs.workloads.get(&crate::registry::ObjectKey::new(
        &node.namespace,
        &node.workload,
    ));
    let mut inbound = Inbound::default();
    for svc in inputs.services_in(&node.namespace) {
        if !svc.selector.as_ref().is_some_and(selects) {
            continue;
        }
        for sp in &svc.ports {
            let port = match (entry, &sp.target) {
                (Some(w), _) => w.target_port(sp),
                (None, crate::registry::TargetPort::Number(n)) => Some(*n),
                (None, crate::registry::TargetPort::Name(_)) => None,
            };
            let Some(port) = port else { continue };
            if inbound.ports.iter().any(|p| p.port == port) {
                continue;
            }
            inbound.ports.push(InboundPort {
                port,
                target_port: None,
                protocol: sp.protocol,
                service: Some(svc.host.clone()),
            });
        }
    }
    inbound.ports.sort_by_key(|p| p.port);
    let mut outbound_policy = mesh.outbound_policy;
    let mut sidecar_found = false;
    for r in inputs.config_of(Kind::RateLimitPolicy) {
        if let Resource::RateLimitPolicy(p) = &**r
            && p.metadata.namespace.as_deref().unwrap_or("default") == node.namespace
            && p.spec.selector.as_ref().is_none_or(|s| s.matches(labels))
        {
            inbound.rate_limits.push(p.spec.clone());
        }
    }
    // A Sidecar selecting the workload wins over the namespace's default.
    for with_selector in [true, false] {
        for r in inputs.config_of(Kind::Sidecar) {
            let Resource::Sidecar(s) = &**r else { continue };
            if sidecar_found
                || s.metadata.namespace.as_deref().unwrap_or("default") != node.namespace
                || s.spec.workload_selector.is_some() != with_selector
                || s.spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|ws| !ws.matches(labels))
            {
                continue;
            }
            sidecar_found = true;
            inbound.connection_pool = s.spec.inbound_connection_pool.clone();
            if let Some(mode) = s.spec.outbound_traffic_policy.as_ref().and_then(|o| o.mode) {
                outbound_policy = match mode {
                    OutboundTrafficMode::AllowAny => OutboundPolicy::AllowAny,
                    OutboundTrafficMode::RegistryOnly => OutboundPolicy::RegistryOnly,
                };
            }
        }
    }
    (inbound.mtls, inbound.port_mtls) = peer_authentication(inputs, &node.namespace, labels);
    for r in inputs.config_of(Kind::AuthorizationPolicy) {
        if let Resource::AuthorizationPolicy(p) = &**r
            && security_policy_applies(
                inputs,
                node,
                p.metadata.namespace.as_deref().unwrap_or("default"),
                p.spec.selector.as_ref(),
                p.spec.target_ref.iter().chain(&p.spec.target_refs),
            )
        {
            inbound.authorization.push(AuthorizationRules {
                name: format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    p.metadata.name.as_deref().unwrap_or("")
                ),
                action: p.spec.action,
                rules: p.spec.rules.clone().unwrap_or_default(),
            });
        }
    }
    for r in inputs.config_of(Kind::RequestAuthentication) {
        if let Resource::RequestAuthentication(ra) = &**r
            && security_policy_applies(
                inputs,
                node,
                ra.metadata.namespace.as_deref().unwrap_or("default"),
                ra.spec.selector.as_ref(),
                ra.spec.target_ref.iter().chain(&ra.spec.target_refs),
            )
        {
            inbound.jwt_rules.extend(ra.spec.jwt_rules.iter().cloned());
        }
    }
    WorkloadResource {
        workload: model::Workload {
            name: node.workload.clone(),
            namespace: node.namespace.clone(),
            labels: labels.clone(),
            service_account: node.service_account.clone(),
            canonical_service: labels
                .get("app")
                .cloned()
                .unwrap_or_else(|| node.workload.clone()),
            canonical_revision: labels
                .get("version")
                .cloned()
                .unwrap_or_else(|| "latest".into()),
            trust_domain: mesh.trust_domain().to_string(),
        },
        inbound,
        gateway_listeners: if node.gateway {
            gateway_listeners(inputs, node)
        } else {
            Vec::new()
        },
        outbound_policy,
    }
}

/// Whether an AuthorizationPolicy or RequestAuthentication in
/// `policy_ns` applies to a workload.
fn security_policy_applies<'a>(
    inputs: &Inputs,
    node: &NodeInfo,
    policy_ns: &str,
    selector: Option<&WorkloadSelector>,
    target_refs: impl Iterator<Item = &'a PolicyTargetReference>,
) -> bool {
    let target = PolicyTarget {
        namespace: &node.namespace,
        labels: &node.labels,
        gateway: node.gateway,
        gateways: &node.gateways,
    };
    security_policy_scope(
        |ns| inputs.services_in(ns).map(|s| &**s).collect(),
        &target,
        policy_ns,
        selector,
        target_refs,
    )
    .is_some()
}

/// The proxy a security policy may apply to.
pub struct PolicyTarget<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// A gateway, serving `gateways` (`namespace/name`).
    pub gateway: bool,
    pub gateways: &'a [String],
}

/// Why a security policy applies to a proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyScope {
    /// One of its targetRefs: a Service selecting the workload, or a
    /// Gateway the proxy serves.
    TargetRef {
        kind: String,
        namespace: String,
        name: String,
    },
    /// It is in the root namespace (and its selector, if any, matches).
    Mesh,
    /// It is in the workload's namespace (and its selector, if any,
    /// matches).
    Namespace,
}

/// Whether an AuthorizationPolicy or RequestAuthentication in
/// `policy_ns` applies to a proxy, with Istio's scopes: its targetRefs
/// when it has any; else the root namespace covers every namespace and any
/// other namespace itself, narrowed by the selector when there is one.
/// `services_in(ns)` lists a namespace's Services.
pub fn security_policy_scope<'a, 's>(
    services_in: impl Fn(&str) -> Vec<&'s Service>,
    target: &PolicyTarget<'_>,
    policy_ns: &str,
    selector: Option<&WorkloadSelector>,
    target_refs: impl Iterator<Item = &'a PolicyTargetReference>,
) -> Option<PolicyScope> {
    let mut targeted = false;
    for t in target_refs {
        targeted = true;
        let ns = t.namespace.as_deref().unwrap_or(policy_ns);
        let hit = match t.kind.as_str() {
            "Service" => {
                ns == target.namespace
                    && services_in(ns).iter().any(|s| {
                        s.key.name == t.name
                            && s.selector.as_ref().is_some_and(|sel| {
                                !sel.is_empty()
                                    && sel.iter().all(|(k, v)| target.labels.get(k) == Some(v))
                            })
                    })
            }
            "Gateway" => {
                target.gateway
                    && target
                        .gateways
                        .iter()
                        .any(|g| *g == format!("{ns}/{}", t.name))
            }
            _ => false,
        };
        if hit {
            return Some(PolicyScope::TargetRef {
                kind: t.kind.clone(),
                namespace: ns.to_string(),
                name: t.name.clone(),
            });
        }
    }
    if targeted || !selector.is_none_or(|s| s.matches(target.labels)) {
        return None;
    }
    if policy_ns == target.namespace {
        Some(PolicyScope::Namespace)
    } else if policy_ns == ROOT_NAMESPACE {
        Some(PolicyScope::Mesh)
    } else {
        None
    }
}

/// The PeerAuthentication mode of a workload and its port-level modes.
fn peer_authentication(
    inputs: &Inputs,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
    let policies = inputs
        .config_of(Kind::PeerAuthentication)
        .filter_map(|r| match &**r {
            Resource::PeerAuthentication(pa) => Some(pa),
            _ => None,
        });
    let e = effective_peer_authentication(policies, namespace, labels);
    (e.mode, e.ports)
}

/// Where the PeerAuthentication that decides a workload's mode applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerAuthScope {
    /// Its selector matches the workload.
    Workload,
    /// Its namespace's, without a selector.
    Namespace,
    /// The root namespace's, without a selector.
    Mesh,
}

/// A workload's mTLS mode, per port, and the policy that decided it.
pub struct EffectivePeerAuth<'a> {
    pub mode: MtlsMode,
    pub ports: BTreeMap<u16, MtlsMode>,
    pub decided_by: Option<(&'a PeerAuthentication, PeerAuthScope)>,
    /// The policy selecting the workload, if any (its port-level modes
    /// apply even when the mode comes from further out).
    pub workload_policy: Option<&'a PeerAuthentication>,
}

/// A policy selecting the workload, else its namespace's, else the
/// mesh's (root namespace, no selector); an UNSET mode inherits from the
/// next scope out. When several apply at one scope the first in
/// `policies` wins (pilot passes them by name).
pub fn effective_peer_authentication<'a>(
    policies: impl Iterator<Item = &'a PeerAuthentication>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> EffectivePeerAuth<'a> {
    let mut workload: Option<&PeerAuthentication> = None;
    let mut ns_wide: Option<&PeerAuthentication> = None;
    let mut mesh_wide: Option<&PeerAuthentication> = None;
    for pa in policies {
        let ns = pa.metadata.namespace.as_deref().unwrap_or("default");
        let slot = match &pa.spec.selector {
            Some(sel) if ns == namespace && sel.matches(labels) => &mut workload,
            Some(_) => continue,
            None if ns == namespace => &mut ns_wide,
            None if ns == ROOT_NAMESPACE => &mut mesh_wide,
            None => continue,
        };
        slot.get_or_insert(pa);
    }
    if namespace == ROOT_NAMESPACE {
        mesh_wide = ns_wide;
    }
    let mode_of = |pa: Option<&PeerAuthentication>| {
        pa.and_then(|p| p.spec.mtls.as_ref())
            .map_or(MtlsMode::Unset, |m| m.mode)
    };
    let decided_by = [
        (workload, PeerAuthScope::Workload),
        (ns_wide, PeerAuthScope::Namespace),
        (mesh_wide, PeerAuthScope::Mesh),
    ]
    .into_iter()
    .find_map(|(pa, scope)| {
        let pa = pa?;
        (mode_of(Some(pa)) != MtlsMode::Unset).then_some((pa, scope))
    });
    let mode = decided_by.map_or(MtlsMode::Unset, |(pa, _)| mode_of(Some(pa)));
    let ports = workload
        .map(|pa| {
            pa.spec
                .port_level_mtls
                .iter()
                .filter_map(|(port, m)| {
                    let port = u16::try_from(port.0).ok()?;
                    let m = if m.mode == MtlsMode::Unset {
                        mode
                    } else {
                        m.mode
                    };
                    Some((port, m))
                })
                .collect()
        })
        .unwrap_or_default();
    EffectivePeerAuth {
        mode,
        ports,
        decided_by,
        workload_policy: workload,
    }
}

/// The listeners of the Gateways that select a gateway proxy (or that it
/// names), with the VirtualServices bound to them.
fn gateway_listeners(inputs: &Inputs, node: &NodeInfo) -> Vec<GatewayListener> {
    let mut listeners: BTreeMap<u16, GatewayListener> = BTreeMap::new();
    for r in inputs.config_of(Kind::Gateway) {
        let Resource::Gateway(gw) = &**r else {
            continue;
        };
        let ns = gw.metadata.namespace.as_deref().unwrap_or("default");
        let name = format!("{ns}/{}", gw.metadata.name.as_deref().unwrap_or_default());
        let selected = !gw.spec.selector.is_empty()
            && gw
                .spec
                .selector
                .iter()
                .all(|(k, v)| node.labels.get(k) == Some(v));
        if !selected && !node.gateways.contains(&name) {
            continue;
        }
        for server in &gw.spec.servers {
            let Ok(port) = u16::try_from(server.port.number) else {
                continue;
            };
            let protocol = match server.port.protocol.to_ascii_uppercase().as_str() {
                "HTTP" => Protocol::Http,
                "HTTP2" => Protocol::Http2,
                "GRPC" => Protocol::Grpc,
                "TCP" => Protocol::Tcp,
                "TLS" | "HTTPS" => Protocol::Tls,
                _ => Protocol::Auto,
            };
            let listener = listeners.entry(port).or_insert_with(|| GatewayListener {
                port,
                protocol,
                ..Default::default()
            });
            for vr in inputs.config_of(Kind::VirtualService) {
                let Resource::VirtualService(vs) = &**vr else {
                    continue;
                };
                let vs_ns = vs.metadata.namespace.as_deref().unwrap_or("default");
                if !binds(&vs.spec.gateways, &name, vs_ns) {
                    continue;
                }
                // The VirtualService's hosts that this server serves.
                let hosts: Vec<String> = vs
                    .spec
                    .hosts
                    .iter()
                    .filter(|h| {
                        server.hosts.iter().any(|sh| {
                            let sh = sh.split_once('/').map_or(sh.as_str(), |(_, h)| h);
                            host_covers(sh, h) || host_covers(h, sh)
                        })
                    })
                    .map(|h| h.to_ascii_lowercase())
                    .collect();
                if hosts.is_empty() {
                    continue;
                }
                let first = hosts[0].clone();
                let ctx = RouteContext {
                    inputs,
                    namespace: vs_ns,
                    gateway: &name,
                    this_host: &first,
                    this_port: 80,
                };
                if protocol.is_http() || protocol == Protocol::Auto {
                    let routes = ctx.http_routes(&vs.spec.http, 0);
                    if listener.virtual_hosts.iter().any(|v| v.hosts == hosts) {
                        continue;
                    }
                    listener.virtual_hosts.push(VirtualHost { hosts, routes });
                } else {
                    for t in &vs.spec.tcp {
                        listener.tcp.push(TcpRoute {
                            port: None,
                            clusters: t
                                .route
                                .iter()
                                .map(|rd| {
                                    ctx.weighted(&rd.destination, rd.weight, t.route.len(), None)
                                })
                                .collect(),
                        });
                    }
                }
            }
        }
    }
    listeners.into_values().collect()
}

#[cfg(test)]
pub(crate) mod tests;

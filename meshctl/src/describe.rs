//! `meshctl x describe pod`: one pod's place in the mesh, decided the way
//! pilot decides it: whether it has a sidecar, its identity, the Services
//! that select it and, per Service port, the VirtualService routing it and
//! the DestinationRule subsets it belongs to, its effective mTLS mode and
//! the PeerAuthentication that sets it, and the AuthorizationPolicies that
//! apply to it.
//!
//! [`describe`] is pure (pod, Services and config in, a [`Description`]
//! out) and [`render`] prints it; [`pod`] only reads the cluster.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, Pod, Service as KubeService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::{Api, DynamicObject, ListParams};
use mesh_api::Kind;
use mesh_api::model::{Inbound, Protocol};
use mesh_api::networking::{
    Destination, DestinationRule, HttpMatchRequest, HttpRoute, VirtualService,
};
use mesh_api::resource::{DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN};
use mesh_api::security::{
    AuthorizationAction, AuthorizationPolicy, MtlsMode, PeerAuthentication, PolicyTargetReference,
};
use mesh_api::selector::WorkloadSelector;
use mesh_api::validate::{fqdn, host_covers};
use mesh_pilot::registry::{Service, TargetPort};

use crate::proxy_config::{
    direct_summary, fault_summary, has_proxy, labels as show_labels, match_summary,
    redirect_summary, retry_summary, split_target, traffic_policy_summary, wire,
};

/// What `meshctl x describe` describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DescribeKind {
    /// A pod: `meshctl x describe pod NAME`.
    #[value(alias = "pods", alias = "po")]
    Pod,
}

/// The mesh config that decides a pod's routing and security.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

/// Everything `describe` found out about one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Description {
    pub pod: String,
    pub namespace: String,
    pub phase: String,
    pub sidecar: Sidecar,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: String,
    /// The labels pilot selects by (what the proxy declares).
    pub labels: BTreeMap<String, String>,
    pub services: Vec<ServiceView>,
    pub mtls: MtlsView,
    pub authorization: Vec<PolicyView>,
    /// Problems and hints, printed last.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Sidecar {
    /// Injected; what the status annotation records.
    Injected(String),
    /// A mesh-proxy container without the injection status (a gateway, or
    /// a hand-written proxy).
    Proxy,
    None,
}

/// A Service selecting the pod.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    pub name: String,
    pub host: String,
    /// `namespace/name` of the VirtualService pilot routes the host with.
    pub virtual_service: Option<String>,
    /// Other VirtualServices for the host, which pilot does not use.
    pub shadowed: Vec<String>,
    pub destination_rule: Option<RuleView>,
    pub ports: Vec<PortView>,
}

/// The DestinationRule for a Service's host.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleView {
    pub name: String,
    pub host: String,
    /// Subsets whose labels the pod has.
    pub matching: Vec<String>,
    pub other: Vec<String>,
    pub policy: String,
    /// The matching subsets' own traffic policies.
    pub subset_policies: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PortView {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The pod's port the Service port targets; `None` when a named
    /// target port is not one of the pod's.
    pub target: Option<u16>,
    pub target_name: Option<String>,
    /// Effective inbound mode (never UNSET).
    pub mtls: MtlsMode,
    /// The VirtualService's routes for this port, summarized.
    pub routes: Vec<String>,
    /// Whether some route sends traffic to this pod.
    pub reaches_pod: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MtlsView {
    /// Effective workload-wide mode (never UNSET).
    pub mode: MtlsMode,
    /// The PeerAuthentication that sets it, and at which scope; `None`
    /// when none sets a mode (PERMISSIVE by default).
    pub source: Option<String>,
    /// Port-level modes of the PeerAuthentication selecting the pod.
    pub ports: Vec<(u16, MtlsMode)>,
    pub port_source: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PolicyView {
    /// `namespace/name`.
    pub name: String,
    pub action: AuthorizationAction,
    pub rules: usize,
    /// Why it applies: mesh-wide, namespace-wide, selector, targetRef.
    pub why: String,
}

/// What the pod's proxy tells pilot about itself.
struct Node<'a> {
    namespace: &'a str,
    labels: &'a BTreeMap<String, String>,
    gateway: bool,
    gateways: &'a [String],
}

/// Describes a pod from the Services of its namespace and the mesh config.
pub fn describe(pod: &Pod, services: &[KubeService], config: &Config) -> Description {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = namespace_of(&pod.metadata).to_string();
    let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
    let proxy = proxy_container(pod);
    let mut notes = Vec::new();

    let sidecar = match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(mesh_injector::STATUS_ANNOTATION))
    {
        Some(status) => Sidecar::Injected(
            match serde_json::from_str::<mesh_injector::Status>(status) {
                Ok(s) => format!(
                    "version {}{}",
                    s.version,
                    if s.native_sidecar {
                        ", native sidecar"
                    } else {
                        ""
                    }
                ),
                Err(_) => format!("{} unreadable", mesh_injector::STATUS_ANNOTATION),
            },
        ),
        None if has_proxy(pod) => Sidecar::Proxy,
        None => Sidecar::None,
    };
    if sidecar == Sidecar::None {
        notes.push(format!(
            "the pod has no sidecar, so it is outside the mesh: label its namespace {}=enabled (or the pod {}: \"true\") and recreate it, or inject it with `meshctl kube-inject`; what follows is what would apply",
            mesh_injector::NAMESPACE_LABEL,
            mesh_injector::INJECT_KEY
        ));
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    if phase != "Running" {
        notes.push(format!("the pod is {phase}, not Running"));
    }

    // The proxy declares its labels (set at injection); pilot selects by them.
    let labels = proxy
        .and_then(|c| env(c, "MESH_LABELS"))
        .map(parse_labels)
        .unwrap_or_else(|| pod_labels.clone());
    if labels != pod_labels {
        notes.push(format!(
            "the proxy declares the labels {} (set at injection), not the pod's current {}; pilot selects by the proxy's",
            show_labels(&labels),
            show_labels(&pod_labels)
        ));
    }
    let trust_domain = proxy
        .and_then(|c| env(c, "MESH_TRUST_DOMAIN"))
        .unwrap_or(DEFAULT_TRUST_DOMAIN);
    let spec = pod.spec.as_ref();
    let service_account = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let identity = mesh_api::ca::spiffe_id(trust_domain, &namespace, service_account);
    let (gateway, gateways) = proxy.map(gateway_args).unwrap_or_default();
    let node = Node {
        namespace: &namespace,
        labels: &labels,
        gateway,
        gateways: &gateways,
    };

    // The namespace's Services, as pilot reads them.
    let mut registry = Vec::new();
    for s in services {
        if namespace_of(&s.metadata) != namespace {
            continue;
        }
        match Service::from_k8s(s) {
            Ok(s) => registry.push(s),
            Err(e) => notes.push(format!(
                "Service {}: {e}; pilot ignores it",
                s.metadata.name.as_deref().unwrap_or_default()
            )),
        }
    }
    registry.sort_by(|a, b| a.key.name.cmp(&b.key.name));

    let (mtls, inbound) = peer_authentication(config, &namespace, &labels);
    let named_ports: BTreeMap<String, u16> = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
        .collect();
    let mut views = Vec::new();
    for svc in registry
        .iter()
        .filter(|s| s.selector.as_ref().is_some_and(|sel| selects(sel, &labels)))
    {
        let view = service_view(svc, config, &labels, &named_ports, &inbound);
        for p in &view.ports {
            if let (None, Some(n)) = (p.target, &p.target_name) {
                notes.push(format!(
                    "Service {} port {} targets the port named {n:?}, which no container of the pod declares: the proxy gets no inbound port for it",
                    view.name, p.port
                ));
            }
            if !p.reaches_pod {
                notes.push(format!(
                    "no route of VirtualService {} sends traffic on port {} to this pod",
                    view.virtual_service.as_deref().unwrap_or("-"),
                    p.port
                ));
            }
        }
        views.push(view);
    }
    if views.is_empty() {
        notes.push(
            "no Service selects this pod: other workloads cannot reach it by a service name".into(),
        );
    }

    let mut authorization = Vec::new();
    for p in sorted(&config.authorization_policies) {
        if let Some(why) = policy_applies(
            &node,
            &registry,
            namespace_of(&p.metadata),
            p.spec.selector.as_ref(),
            p.spec.target_ref.iter().chain(&p.spec.target_refs),
        ) {
            authorization.push(PolicyView {
                name: key(&p.metadata),
                action: p.spec.action,
                rules: p.spec.rules.as_ref().map_or(0, Vec::len),
                why,
            });
        }
    }

    Description {
        pod: name,
        namespace,
        phase,
        sidecar,
        identity,
        labels,
        services: views,
        mtls,
        authorization,
        notes,
    }
}

fn service_view(
    svc: &Service,
    config: &Config,
    labels: &BTreeMap<String, String>,
    named_ports: &BTreeMap<String, u16>,
    inbound: &Inbound,
) -> ServiceView {
    let (vs, shadowed) = virtual_service_for(config, &svc.host);
    let dr = destination_rule_for(config, &svc.host);
    let mut pod_subsets = Vec::new();
    let rule = dr.map(|dr| {
        let mut other = Vec::new();
        let mut subset_policies = Vec::new();
        for s in &dr.spec.subsets {
            if selects(&s.labels, labels) {
                pod_subsets.push(s.name.clone());
                if let Some(tp) = &s.traffic_policy {
                    subset_policies.push((s.name.clone(), traffic_policy_summary(tp)));
                }
            } else {
                other.push(s.name.clone());
            }
        }
        RuleView {
            name: key(&dr.metadata),
            host: dr.spec.host.clone(),
            matching: pod_subsets.clone(),
            other,
            policy: dr
                .spec
                .traffic_policy
                .as_ref()
                .map_or_else(|| "-".to_string(), traffic_policy_summary),
            subset_policies,
        }
    });
    let ports = svc
        .ports
        .iter()
        .map(|sp| {
            let (target, target_name) = match &sp.target {
                TargetPort::Number(n) => (Some(*n), None),
                TargetPort::Name(n) => (named_ports.get(n).copied(), Some(n.clone())),
            };
            let (routes, reaches_pod) = match vs {
                Some(vs) => port_routes(vs, sp.port, sp.protocol, &svc.host, &pod_subsets),
                None => (Vec::new(), true),
            };
            PortView {
                name: sp.name.clone(),
                port: sp.port,
                protocol: sp.protocol,
                target,
                target_name,
                mtls: inbound.mtls_for(target.unwrap_or(sp.port)),
                routes,
                reaches_pod,
            }
        })
        .collect();
    ServiceView {
        name: svc.key.name.clone(),
        host: svc.host.clone(),
        virtual_service: vs.map(|vs| key(&vs.metadata)),
        shadowed,
        destination_rule: rule,
        ports,
    }
}

/// The VirtualService pilot routes `host` with for sidecars (bound to
/// `mesh`): an exact host before a wildcard, else the first by namespace
/// and name. Also the others that name the host.
fn virtual_service_for<'a>(
    config: &'a Config,
    host: &str,
) -> (Option<&'a VirtualService>, Vec<String>) {
    let mut best: Option<(&VirtualService, bool)> = None;
    let mut matching = Vec::new();
    for vs in sorted(&config.virtual_services) {
        let ns = namespace_of(&vs.metadata);
        if !binds_mesh(&vs.spec.gateways) {
            continue;
        }
        let mut names_host = false;
        for h in &vs.spec.hosts {
            let h = fqdn(h, ns);
            if !host_covers(&h, host) {
                continue;
            }
            names_host = true;
            let exact = h.eq_ignore_ascii_case(host);
            if best.is_none_or(|(_, e)| exact && !e) {
                best = Some((vs, exact));
            }
        }
        if names_host {
            matching.push(vs);
        }
    }
    let chosen = best.map(|(vs, _)| vs);
    let shadowed = matching
        .into_iter()
        .filter(|vs| chosen.is_none_or(|c| !std::ptr::eq(*vs, c)))
        .map(|vs| key(&vs.metadata))
        .collect();
    (chosen, shadowed)
}

/// The DestinationRule pilot applies to `host`: one without a workload
/// selector, an exact host before a wildcard, else the first.
fn destination_rule_for<'a>(config: &'a Config, host: &str) -> Option<&'a DestinationRule> {
    let mut best: Option<(&DestinationRule, bool)> = None;
    for dr in sorted(&config.destination_rules) {
        if dr.spec.workload_selector.is_some() {
            continue;
        }
        let h = fqdn(&dr.spec.host, namespace_of(&dr.metadata));
        if host_covers(&h, host) {
            let exact = h.eq_ignore_ascii_case(host);
            if best.is_none_or(|(_, e)| exact && !e) {
                best = Some((dr, exact));
            }
        }
    }
    best.map(|(dr, _)| dr)
}

/// True for a `gateways` list that includes sidecars (`mesh`; empty
/// means `mesh`).
fn binds_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

/// A VirtualService's routes for one Service port, summarized; and whether
/// any of them sends traffic to this pod (with no route at all, traffic
/// goes to every endpoint).
fn port_routes(
    vs: &VirtualService,
    port: u16,
    protocol: Protocol,
    host: &str,
    pod_subsets: &[String],
) -> (Vec<String>, bool) {
    let ns = namespace_of(&vs.metadata);
    let on_port = |gateways: &[String], p: Option<u32>| {
        binds_mesh(gateways) && p.is_none_or(|p| p == u32::from(port))
    };
    let mut lines = Vec::new();
    let mut reaches = false;
    if protocol.is_http() || protocol == Protocol::Auto {
        for r in &vs.spec.http {
            let matches: Vec<HttpMatchRequest> = r
                .match_
                .iter()
                .filter(|m| on_port(&m.gateways, m.port))
                .map(|m| HttpMatchRequest {
                    port: None,
                    gateways: Vec::new(),
                    ..m.clone()
                })
                .collect();
            if !r.match_.is_empty() && matches.is_empty() {
                continue;
            }
            let (line, hit) = http_route(r, &matches, ns, host, pod_subsets);
            reaches |= hit;
            lines.push(line);
        }
    }
    if !protocol.is_http() {
        for r in &vs.spec.tcp {
            if !r.match_.is_empty() && !r.match_.iter().any(|m| on_port(&m.gateways, m.port)) {
                continue;
            }
            let n = r.route.len();
            let to: Vec<String> = r
                .route
                .iter()
                .map(|rd| {
                    let (text, hit) =
                        destination(&rd.destination, rd.weight, n, ns, host, pod_subsets);
                    reaches |= hit;
                    text
                })
                .collect();
            lines.push(format!("TCP -> {}", to.join(", ")));
        }
    }
    let reaches_pod = reaches || lines.is_empty();
    (lines, reaches_pod)
}

/// `[name: ]MATCH -> TARGET[; fault …][; timeout …]`.
fn http_route(
    r: &HttpRoute,
    matches: &[HttpMatchRequest],
    ns: &str,
    host: &str,
    pod_subsets: &[String],
) -> (String, bool) {
    let mut hit = false;
    let target = if let Some(d) = &r.delegate {
        format!(
            "delegate to {}/{}",
            d.namespace.as_deref().unwrap_or(ns),
            d.name
        )
    } else if let Some(rd) = &r.redirect {
        redirect_summary(rd)
    } else if let Some(dr) = &r.direct_response {
        direct_summary(dr)
    } else {
        let n = r.route.len();
        r.route
            .iter()
            .map(|rd| {
                let (text, h) = destination(&rd.destination, rd.weight, n, ns, host, pod_subsets);
                hit |= h;
                text
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = vec![target];
    if let Some(f) = &r.fault {
        parts.extend(fault_summary(f));
    }
    if let Some(m) = &r.mirror {
        parts.push(format!("mirror {}", dest_text(m)));
    }
    for m in &r.mirrors {
        parts.push(format!("mirror {}", dest_text(&m.destination)));
    }
    if let Some(t) = r.timeout {
        parts.push(format!("timeout {t}"));
    }
    if let Some(rt) = &r.retries {
        parts.push(retry_summary(rt));
    }
    let name = r
        .name
        .as_deref()
        .map(|n| format!("{n}: "))
        .unwrap_or_default();
    (
        format!("{name}{} -> {}", match_summary(matches), parts.join("; ")),
        hit,
    )
}

/// `host[:port][ subset][ weight%][ (reaches this pod)]`, and whether it
/// reaches the pod: the Service's host, a subset the pod is in (or none),
/// and a share of the traffic.
fn destination(
    d: &Destination,
    weight: Option<i32>,
    of: usize,
    vs_namespace: &str,
    host: &str,
    pod_subsets: &[String],
) -> (String, bool) {
    let mut text = dest_text(d);
    // As pilot compiles it: a lone destination takes all the traffic.
    let weight = if of == 1 { 100 } else { weight.unwrap_or(0) };
    if of > 1 {
        text.push_str(&format!(" {weight}%"));
    }
    let hit = weight > 0
        && fqdn(&d.host, vs_namespace).eq_ignore_ascii_case(host)
        && d.subset.as_ref().is_none_or(|s| pod_subsets.contains(s));
    if hit {
        text.push_str(" (reaches this pod)");
    }
    (text, hit)
}

fn dest_text(d: &Destination) -> String {
    let mut text = d.host.clone();
    if let Some(p) = d.port {
        text.push_str(&format!(":{}", p.number));
    }
    if let Some(s) = &d.subset {
        text.push(' ');
        text.push_str(s);
    }
    text
}

/// The effective PeerAuthentication mode, computed by pilot's own
/// function (policies by name, as pilot orders them).
fn peer_authentication(
    config: &Config,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> (MtlsView, Inbound) {
    use mesh_pilot::compile::{PeerAuthScope, effective_peer_authentication};
    let e = effective_peer_authentication(
        sorted(&config.peer_authentications).into_iter(),
        namespace,
        labels,
    );
    let (mode, port_mtls, workload) = (e.mode, e.ports, e.workload_policy);
    let source = e.decided_by.map(|(p, scope)| {
        let scope = match scope {
            PeerAuthScope::Workload => format!(
                "selects this pod: {}",
                p.spec
                    .selector
                    .as_ref()
                    .map(WorkloadSelector::describe)
                    .unwrap_or_default()
            ),
            PeerAuthScope::Namespace => "namespace-wide".into(),
            PeerAuthScope::Mesh => "mesh-wide, root namespace".into(),
        };
        format!("PeerAuthentication {} ({scope})", key(&p.metadata))
    });
    let inbound = Inbound {
        mtls: mode,
        port_mtls,
        ..Default::default()
    };
    let view = MtlsView {
        mode: match mode {
            MtlsMode::Unset => MtlsMode::Permissive,
            m => m,
        },
        source,
        ports: inbound
            .port_mtls
            .keys()
            .map(|p| (*p, inbound.mtls_for(*p)))
            .collect(),
        port_source: workload
            .filter(|pa| !pa.spec.port_level_mtls.is_empty())
            .map(|pa| key(&pa.metadata)),
    };
    (view, inbound)
}

/// Whether an AuthorizationPolicy in `policy_ns` applies to the pod's
/// proxy, and why, decided by pilot's own function.
fn policy_applies<'a>(
    node: &Node,
    services: &[Service],
    policy_ns: &str,
    selector: Option<&WorkloadSelector>,
    target_refs: impl Iterator<Item = &'a PolicyTargetReference>,
) -> Option<String> {
    use mesh_pilot::compile::{PolicyScope, PolicyTarget, security_policy_scope};
    let target = PolicyTarget {
        namespace: node.namespace,
        labels: node.labels,
        gateway: node.gateway,
        gateways: node.gateways,
    };
    let scope = security_policy_scope(
        |ns| services.iter().filter(|s| s.key.namespace == ns).collect(),
        &target,
        policy_ns,
        selector,
        target_refs,
    )?;
    let scope = match scope {
        PolicyScope::TargetRef {
            kind,
            namespace,
            name,
        } => return Some(format!("targetRef {kind} {namespace}/{name}")),
        PolicyScope::Mesh => "mesh-wide (root namespace)",
        PolicyScope::Namespace => "namespace-wide",
    };
    Some(match selector {
        Some(s) if !s.match_labels.is_empty() => format!("selector {}, {scope}", s.describe()),
        _ => scope.to_string(),
    })
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn namespace_of(m: &ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

/// `namespace/name`.
fn key(m: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        namespace_of(m),
        m.name.as_deref().unwrap_or_default()
    )
}

/// Resources in pilot's order: by namespace, then name.
fn sorted<K: Resource>(items: &[K]) -> Vec<&K> {
    let mut v: Vec<&K> = items.iter().collect();
    v.sort_by(|a, b| {
        let (a, b) = (a.meta(), b.meta());
        (namespace_of(a), a.name.as_deref()).cmp(&(namespace_of(b), b.name.as_deref()))
    });
    v
}

fn proxy_container(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == mesh_injector::PROXY_NAME)
}

/// A literal environment value of a container.
fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
        .filter(|v| !v.is_empty())
}

/// `k=v,k2=v2` as the proxy reads `MESH_LABELS`.
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether the proxy runs as a gateway (`--mode gateway`), and the
/// Gateways it names (`--gateway-name`).
fn gateway_args(c: &Container) -> (bool, Vec<String>) {
    let args: Vec<&str> = c.args.iter().flatten().map(String::as_str).collect();
    let mut gateway = false;
    let mut names = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (*arg, args.get(i + 1).copied()),
        };
        match (flag, value) {
            ("--mode", Some(v)) => gateway = v == "gateway",
            ("--gateway-name", Some(v)) => names.push(v.to_string()),
            _ => {}
        }
    }
    (gateway, names)
}

// ---------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------

const RULE: &str = "--------------------";

pub fn render(d: &Description, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "Pod: {}", d.pod)?;
    writeln!(out, "   Namespace: {} ({})", d.namespace, d.phase)?;
    writeln!(
        out,
        "   Sidecar: {}",
        match &d.sidecar {
            Sidecar::Injected(s) => format!("injected ({s})"),
            Sidecar::Proxy => format!(
                "{} container, not injected (a gateway or a hand-written proxy)",
                mesh_injector::PROXY_NAME
            ),
            Sidecar::None => "none".into(),
        }
    )?;
    writeln!(out, "   Identity: {}", d.identity)?;
    writeln!(out, "   Labels: {}", show_labels(&d.labels))?;
    for s in &d.services {
        writeln!(out, "{RULE}")?;
        writeln!(out, "Service: {} ({})", s.name, s.host)?;
        match &s.virtual_service {
            Some(vs) => writeln!(out, "   VirtualService: {vs}")?,
            None => writeln!(
                out,
                "   VirtualService: none (requests go to every endpoint of the service)"
            )?,
        }
        if !s.shadowed.is_empty() {
            writeln!(
                out,
                "      Also for this host, not used: {}",
                s.shadowed.join(", ")
            )?;
        }
        match &s.destination_rule {
            Some(r) => {
                writeln!(out, "   DestinationRule: {} for {:?}", r.name, r.host)?;
                if !r.matching.is_empty() || !r.other.is_empty() {
                    writeln!(
                        out,
                        "      Matching subsets: {}",
                        if r.matching.is_empty() {
                            "none".to_string()
                        } else {
                            r.matching.join(", ")
                        }
                    )?;
                }
                if !r.other.is_empty() {
                    writeln!(out, "      Other subsets: {}", r.other.join(", "))?;
                }
                writeln!(out, "      Traffic policy: {}", r.policy)?;
                for (subset, policy) in &r.subset_policies {
                    writeln!(out, "      Subset {subset} policy: {policy}")?;
                }
            }
            None => writeln!(out, "   DestinationRule: none")?,
        }
        for p in &s.ports {
            let target = match (p.target, &p.target_name) {
                (Some(t), _) => format!("pod port {t}"),
                (None, Some(n)) => format!("pod port {n:?} (not found)"),
                (None, None) => "-".into(),
            };
            writeln!(
                out,
                "   Port: {} {}/{} -> {target}, mTLS {}",
                if p.name.is_empty() {
                    "-"
                } else {
                    p.name.as_str()
                },
                p.port,
                wire(&p.protocol),
                wire(&p.mtls)
            )?;
            for r in &p.routes {
                writeln!(out, "      {r}")?;
            }
        }
    }
    writeln!(out, "{RULE}")?;
    match &d.mtls.source {
        Some(src) => writeln!(out, "mTLS: {}, set by {src}", wire(&d.mtls.mode))?,
        None => writeln!(
            out,
            "mTLS: {} (no PeerAuthentication sets a mode; the default)",
            wire(&d.mtls.mode)
        )?,
    }
    for (port, mode) in &d.mtls.ports {
        writeln!(
            out,
            "   Port {port}: {} (portLevelMtls of {})",
            wire(mode),
            d.mtls.port_source.as_deref().unwrap_or("-")
        )?;
    }
    if d.authorization.is_empty() {
        writeln!(
            out,
            "Authorization policies: none apply (every request is allowed)"
        )?;
    } else {
        writeln!(out, "Authorization policies:")?;
        for p in &d.authorization {
            writeln!(
                out,
                "   {}: {}, {} rule{} ({})",
                p.name,
                wire(&p.action),
                p.rules,
                if p.rules == 1 { "" } else { "s" },
                p.why
            )?;
        }
    }
    for n in &d.notes {
        writeln!(out, "Note: {n}")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Reading the cluster
// ---------------------------------------------------------------------------

/// `meshctl x describe pod NAME [-n NS]`.
pub fn pod(target: &str, namespace: Option<&str>, out: &mut dyn Write) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (pod, services, config, warnings) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), fetch(target, namespace))
            .await
            .map_err(|_| anyhow!("the cluster did not answer within 30 s"))?
    })?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    render(&describe(&pod, &services, &config), out)
}

async fn fetch(
    target: &str,
    namespace: Option<&str>,
) -> Result<(Pod, Vec<KubeService>, Config, Vec<String>)> {
    let client = kube::Client::try_default()
        .await
        .context("no cluster to talk to (set KUBECONFIG or a kubeconfig context)")?;
    let (name, ns) = split_target(target, namespace, client.default_namespace());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods
        .get_opt(&name)
        .await
        .with_context(|| format!("reading pod {ns}/{name}"))?
        .ok_or_else(|| anyhow!("no pod {name:?} in namespace {ns:?}"))?;
    let services = Api::<KubeService>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing the Services of namespace {ns}"))?
        .items;
    let mut warnings = Vec::new();
    let config = Config {
        virtual_services: list(&client, Kind::VirtualService, &mut warnings).await?,
        destination_rules: list(&client, Kind::DestinationRule, &mut warnings).await?,
        peer_authentications: list(&client, Kind::PeerAuthentication, &mut warnings).await?,
        authorization_policies: list(&client, Kind::AuthorizationPolicy, &mut warnings).await?,
    };
    Ok((pod, services, config, warnings))
}

/// Every resource of a mesh kind, in all namespaces; one that does not
/// read as the kind is skipped with a warning (pilot keeps it out too).
async fn list<K>(client: &kube::Client, kind: Kind, warnings: &mut Vec<String>) -> Result<Vec<K>>
where
    K: Resource + for<'de> serde::Deserialize<'de>,
{
    let ar = kind.api_resource();
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let objects = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(s)) if s.code == 404 => bail!(
            "the cluster does not know {} ({}): is the mesh installed? (`meshctl install`)",
            kind.plural(),
            kind.api_version()
        ),
        Err(e) => return Err(e).with_context(|| format!("listing {}", kind.plural())),
    };
    let mut out = Vec::new();
    for obj in objects {
        let name = key(&obj.metadata);
        match obj.try_parse::<K>() {
            Ok(k) => out.push(k),
            Err(e) => warnings.push(format!("{} {name}: {e}; left out", kind.name())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use mesh_api::networking::{
        ClientTlsMode, ClientTlsSettings, DestinationRuleSpec, HttpRouteDestination, StringMatch,
        Subset, TrafficPolicy, VirtualServiceSpec,
    };
    use mesh_api::resource::ROOT_NAMESPACE;
    use mesh_api::security::{AuthorizationPolicySpec, PeerAuthenticationSpec, PeerMtls, Rule};
    use mesh_api::selector::PortKey;

    use super::*;

    const HOST: &str = "reviews.default.svc.cluster.local";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// An injected reviews-v1 pod, as the API server returns it.
    fn reviews_pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "reviews-v1-abc",
                "namespace": "default",
                "labels": {"app": "reviews", "version": "v1"},
                "annotations": {
                    "sidecar.mesh.dev/status": serde_json::to_string(&mesh_injector::Status {
                        init_containers: vec!["mesh-init".into(), "mesh-proxy".into()],
                        containers: vec![],
                        volumes: vec![],
                        native_sidecar: true,
                        version: "0.1.0".into(),
                    }).unwrap(),
                },
            },
            "spec": {
                "serviceAccountName": "bookinfo-reviews",
                "containers": [{
                    "name": "reviews",
                    "ports": [{"name": "http", "containerPort": 9080}],
                }],
                "initContainers": [
                    {"name": "mesh-init"},
                    {
                        "name": "mesh-proxy",
                        "restartPolicy": "Always",
                        "args": ["--mode", "sidecar"],
                        "env": [
                            {"name": "MESH_TRUST_DOMAIN", "value": "example.org"},
                            {"name": "MESH_LABELS", "value": "app=reviews,version=v1"},
                        ],
                    },
                ],
            },
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn service(name: &str, selector: &[(&str, &str)], target: serde_json::Value) -> KubeService {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "selector": labels(selector),
                "ports": [{"name": "http", "port": 9080, "targetPort": target}],
            },
        }))
        .unwrap()
    }

    fn dest(subset: &str, weight: Option<i32>) -> HttpRouteDestination {
        HttpRouteDestination {
            destination: Destination {
                host: "reviews".into(),
                subset: Some(subset.into()),
                port: None,
            },
            weight,
            headers: None,
        }
    }

    fn reviews_vs(ns: &str, name: &str, host: &str) -> VirtualService {
        let mut vs = VirtualService::new(
            name,
            VirtualServiceSpec {
                hosts: vec![host.into()],
                http: vec![
                    HttpRoute {
                        name: Some("jason".into()),
                        match_: vec![HttpMatchRequest {
                            headers: BTreeMap::from([(
                                "end-user".to_string(),
                                StringMatch::exact("jason"),
                            )]),
                            ..Default::default()
                        }],
                        route: vec![dest("v2", None)],
                        ..Default::default()
                    },
                    HttpRoute {
                        route: vec![dest("v1", Some(80)), dest("v3", Some(20))],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        );
        vs.metadata.namespace = Some(ns.into());
        vs
    }

    fn reviews_dr() -> DestinationRule {
        let subset = |name: &str| Subset {
            name: name.into(),
            labels: labels(&[("version", name)]),
            traffic_policy: None,
        };
        let mut dr = DestinationRule::new(
            "reviews",
            DestinationRuleSpec {
                host: "reviews".into(),
                traffic_policy: Some(TrafficPolicy {
                    tls: Some(ClientTlsSettings {
                        mode: ClientTlsMode::IstioMutual,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                subsets: vec![subset("v1"), subset("v2"), subset("v3")],
                ..Default::default()
            },
        );
        dr.metadata.namespace = Some("default".into());
        dr
    }

    fn pa(
        ns: &str,
        name: &str,
        selector: Option<&[(&str, &str)]>,
        mode: MtlsMode,
    ) -> PeerAuthentication {
        let mut pa = PeerAuthentication::new(
            name,
            PeerAuthenticationSpec {
                selector: selector.map(|s| WorkloadSelector {
                    match_labels: labels(s),
                }),
                mtls: Some(PeerMtls { mode }),
                ..Default::default()
            },
        );
        pa.metadata.namespace = Some(ns.into());
        pa
    }

    fn ap(ns: &str, name: &str, spec: AuthorizationPolicySpec) -> AuthorizationPolicy {
        let mut ap = AuthorizationPolicy::new(name, spec);
        ap.metadata.namespace = Some(ns.into());
        ap
    }

    fn text(d: &Description) -> String {
        let mut out = Vec::new();
        render(d, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn an_injected_pod_shows_its_sidecar_identity_routes_and_subsets() {
        let config = Config {
            virtual_services: vec![reviews_vs("default", "reviews", "reviews")],
            destination_rules: vec![reviews_dr()],
            ..Default::default()
        };
        let services = [
            service("reviews", &[("app", "reviews")], serde_json::json!("http")),
            service("ratings", &[("app", "ratings")], serde_json::json!(9080)),
        ];
        let d = describe(&reviews_pod(), &services, &config);
        assert_eq!(
            d.sidecar,
            Sidecar::Injected("version 0.1.0, native sidecar".into())
        );
        assert_eq!(
            d.identity,
            "spiffe://example.org/ns/default/sa/bookinfo-reviews"
        );
        assert_eq!(d.services.len(), 1, "only reviews selects the pod");
        let s = &d.services[0];
        assert_eq!(s.host, HOST);
        assert_eq!(s.virtual_service.as_deref(), Some("default/reviews"));
        let r = s.destination_rule.as_ref().unwrap();
        assert_eq!(r.matching, ["v1"]);
        assert_eq!(r.other, ["v2", "v3"]);
        assert_eq!(r.policy, "TLS ISTIO_MUTUAL");
        let p = &s.ports[0];
        assert_eq!(p.target, Some(9080), "the named port resolves");
        assert_eq!(p.mtls, MtlsMode::Permissive);
        assert_eq!(p.routes.len(), 2);
        assert_eq!(p.routes[0], "jason: header end-user=jason -> reviews v2");
        assert_eq!(
            p.routes[1],
            "/* -> reviews v1 80% (reaches this pod), reviews v3 20%"
        );
        assert!(p.reaches_pod);
        assert!(d.notes.is_empty(), "{:?}", d.notes);
        let t = text(&d);
        for want in [
            "Pod: reviews-v1-abc",
            "Sidecar: injected (version 0.1.0, native sidecar)",
            "Identity: spiffe://example.org/ns/default/sa/bookinfo-reviews",
            "Service: reviews (reviews.default.svc.cluster.local)",
            "VirtualService: default/reviews",
            "DestinationRule: default/reviews for \"reviews\"",
            "Matching subsets: v1",
            "Port: http 9080/HTTP -> pod port 9080, mTLS PERMISSIVE",
            "mTLS: PERMISSIVE (no PeerAuthentication sets a mode; the default)",
            "Authorization policies: none apply",
        ] {
            assert!(t.contains(want), "{want:?} missing in:\n{t}");
        }
    }

    #[test]
    fn an_exact_host_wins_and_a_pod_no_route_reaches_is_flagged() {
        let mut only_v2 = reviews_vs("default", "b-reviews", HOST);
        only_v2.spec.http.truncate(1);
        only_v2.spec.http[0].match_.clear();
        let config = Config {
            virtual_services: vec![
                reviews_vs("default", "a-wildcard", "*.default.svc.cluster.local"),
                only_v2,
                // Bound to a gateway only: not for sidecars.
                {
                    let mut gw = reviews_vs("default", "c-gateway", "reviews");
                    gw.spec.gateways = vec!["bookinfo-gateway".into()];
                    gw
                },
            ],
            destination_rules: vec![reviews_dr()],
            ..Default::default()
        };
        let services = [service(
            "reviews",
            &[("app", "reviews")],
            serde_json::json!(9080),
        )];
        let d = describe(&reviews_pod(), &services, &config);
        let s = &d.services[0];
        assert_eq!(s.virtual_service.as_deref(), Some("default/b-reviews"));
        assert_eq!(s.shadowed, ["default/a-wildcard"]);
        assert!(!s.ports[0].reaches_pod);
        assert!(
            d.notes
                .iter()
                .any(|n| n.contains("no route of VirtualService default/b-reviews")),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn mtls_follows_pilots_precedence() {
        let pod = reviews_pod();
        let mut config = Config {
            peer_authentications: vec![
                pa(ROOT_NAMESPACE, "mesh", None, MtlsMode::Strict),
                pa("default", "ns", None, MtlsMode::Permissive),
            ],
            ..Default::default()
        };
        let d = describe(&pod, &[], &config);
        assert_eq!(d.mtls.mode, MtlsMode::Permissive);
        assert_eq!(
            d.mtls.source.as_deref(),
            Some("PeerAuthentication default/ns (namespace-wide)")
        );

        // A policy selecting the pod wins; UNSET inherits from further out.
        let mut workload = pa(
            "default",
            "reviews",
            Some(&[("app", "reviews")]),
            MtlsMode::Unset,
        );
        workload.spec.port_level_mtls = BTreeMap::from([(
            PortKey(9080),
            PeerMtls {
                mode: MtlsMode::Disable,
            },
        )]);
        config.peer_authentications.push(workload);
        config.peer_authentications[1].spec.mtls = Some(PeerMtls {
            mode: MtlsMode::Unset,
        });
        let services = [service(
            "reviews",
            &[("app", "reviews")],
            serde_json::json!(9080),
        )];
        let d = describe(&pod, &services, &config);
        assert_eq!(d.mtls.mode, MtlsMode::Strict);
        assert_eq!(
            d.mtls.source.as_deref(),
            Some("PeerAuthentication mesh-system/mesh (mesh-wide, root namespace)")
        );
        assert_eq!(d.mtls.ports, [(9080, MtlsMode::Disable)]);
        assert_eq!(d.mtls.port_source.as_deref(), Some("default/reviews"));
        assert_eq!(d.services[0].ports[0].mtls, MtlsMode::Disable);

        // A selector in another namespace does not apply.
        let other = Config {
            peer_authentications: vec![pa(
                "shop",
                "strict",
                Some(&[("app", "reviews")]),
                MtlsMode::Strict,
            )],
            ..Default::default()
        };
        let d = describe(&pod, &[], &other);
        assert_eq!(d.mtls.mode, MtlsMode::Permissive);
        assert_eq!(d.mtls.source, None);
    }

    #[test]
    fn authorization_policies_apply_by_scope_selector_and_target() {
        let selector = |pairs: &[(&str, &str)]| {
            Some(WorkloadSelector {
                match_labels: labels(pairs),
            })
        };
        let target = |kind: &str, name: &str| PolicyTargetReference {
            kind: kind.into(),
            name: name.into(),
            ..Default::default()
        };
        let config = Config {
            authorization_policies: vec![
                ap(
                    ROOT_NAMESPACE,
                    "deny-all",
                    AuthorizationPolicySpec {
                        action: AuthorizationAction::Deny,
                        ..Default::default()
                    },
                ),
                ap(
                    "default",
                    "allow-reviews",
                    AuthorizationPolicySpec {
                        selector: selector(&[("app", "reviews")]),
                        rules: Some(vec![Rule::default()]),
                        ..Default::default()
                    },
                ),
                ap(
                    "default",
                    "for-ratings",
                    AuthorizationPolicySpec {
                        selector: selector(&[("app", "ratings")]),
                        ..Default::default()
                    },
                ),
                ap(
                    "default",
                    "via-service",
                    AuthorizationPolicySpec {
                        target_refs: vec![target("Service", "reviews")],
                        ..Default::default()
                    },
                ),
                ap(
                    "default",
                    "via-other-service",
                    AuthorizationPolicySpec {
                        // A targetRef decides alone, even with a matching namespace.
                        target_refs: vec![target("Service", "ratings")],
                        ..Default::default()
                    },
                ),
                ap("shop", "elsewhere", AuthorizationPolicySpec::default()),
            ],
            ..Default::default()
        };
        let services = [
            service("reviews", &[("app", "reviews")], serde_json::json!(9080)),
            service("ratings", &[("app", "ratings")], serde_json::json!(9080)),
        ];
        let d = describe(&reviews_pod(), &services, &config);
        let got: Vec<(&str, &str)> = d
            .authorization
            .iter()
            .map(|p| (p.name.as_str(), p.why.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "default/allow-reviews",
                    "selector app=reviews, namespace-wide"
                ),
                ("default/via-service", "targetRef Service default/reviews"),
                ("mesh-system/deny-all", "mesh-wide (root namespace)"),
            ]
        );
        let t = text(&d);
        assert!(
            t.contains("mesh-system/deny-all: DENY, 0 rules (mesh-wide (root namespace))"),
            "{t}"
        );
        assert!(t.contains("default/allow-reviews: ALLOW, 1 rule"), "{t}");
    }

    #[test]
    fn a_pod_without_sidecar_or_service_says_so() {
        let mut pod = reviews_pod();
        pod.metadata.annotations = None;
        if let Some(spec) = pod.spec.as_mut() {
            spec.init_containers = None;
        }
        let d = describe(&pod, &[], &Config::default());
        assert_eq!(d.sidecar, Sidecar::None);
        assert_eq!(
            d.identity,
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        );
        assert!(
            d.notes.iter().any(|n| n.contains("outside the mesh")),
            "{:?}",
            d.notes
        );
        assert!(
            d.notes.iter().any(|n| n.contains("no Service selects")),
            "{:?}",
            d.notes
        );
        assert!(text(&d).contains("Sidecar: none"));
    }

    #[test]
    fn gateway_proxies_are_recognized_from_their_arguments() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "mesh-proxy",
            "args": ["--mode=gateway", "--gateway-name", "mesh-system/ingress"],
        }))
        .unwrap();
        assert_eq!(
            gateway_args(&c),
            (true, vec!["mesh-system/ingress".to_string()])
        );
        assert_eq!(
            parse_labels("app=x,version=v1"),
            labels(&[("app", "x"), ("version", "v1")])
        );
    }
}

//! Pilot's web dashboard on its HTTP port: `/dashboard` (one page) and the
//! JSON it polls: `/api/graph` (the live service graph), `/api/services`
//! (services with their routing rules and traffic) and `/api/proxies`
//! (each proxy's sync state).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{Html, IntoResponse};
use mesh_api::networking::{HttpRoute, StringMatch};
use mesh_api::sync::SyncState;
use serde::Serialize;

use crate::Pilot;
use crate::compile::{destination_rule_for, virtual_service_for};
use crate::graph::{Edge, NodeRef};

const PAGE: &str = include_str!("dashboard/index.html");

pub async fn page() -> impl IntoResponse {
    Html(PAGE)
}

/// The workloads of every connected proxy (shown even without traffic)
/// and which of them are gateways.
fn known(p: &Pilot) -> (Vec<NodeRef>, BTreeSet<String>) {
    let inputs = p.store.inputs();
    let mut nodes = Vec::new();
    let mut gateways = BTreeSet::new();
    for s in p.sync.snapshot() {
        let Some((ns, name)) = s.workload.split_once('/') else {
            continue;
        };
        let labels = inputs
            .workloads
            .get(&crate::registry::ObjectKey::new(ns, name))
            .map(|w| w.labels.clone())
            .unwrap_or_default();
        let app = labels
            .get("app")
            .cloned()
            .unwrap_or_else(|| name.to_string());
        if s.mode == "gateway" {
            gateways.insert(s.workload.clone());
        }
        nodes.push(NodeRef {
            namespace: ns.to_string(),
            workload: name.to_string(),
            app,
            version: labels.get("version").cloned().unwrap_or_default(),
        });
    }
    (nodes, gateways)
}

pub async fn graph(State(p): State<Arc<Pilot>>) -> impl IntoResponse {
    p.graph.watched();
    let (nodes, gateways) = known(&p);
    Json(p.graph.view(&nodes, &gateways))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceView {
    host: String,
    name: String,
    namespace: String,
    workloads: Vec<String>,
    rps: f64,
    error_rate: f64,
    p99_ms: Option<f64>,
    virtual_services: Vec<Rules>,
    destination_rules: Vec<Subsets>,
}

#[derive(Serialize)]
struct Rules {
    name: String,
    rules: Vec<String>,
}

#[derive(Serialize)]
struct Subsets {
    name: String,
    subsets: Vec<String>,
    policy: Option<String>,
}

pub async fn services(State(p): State<Arc<Pilot>>) -> impl IntoResponse {
    p.graph.watched();
    let (nodes, gateways) = known(&p);
    let view = p.graph.view(&nodes, &gateways);
    let inputs = p.store.inputs();
    let mut out = Vec::new();
    for svc in inputs.services.values() {
        let incoming: Vec<&Edge> = view
            .edges
            .iter()
            .filter(|e| e.service == svc.host)
            .collect();
        let rps: f64 = incoming.iter().map(|e| e.rps).sum();
        let errors: f64 = incoming.iter().map(|e| e.rps * e.error_rate).sum();
        let p99 = incoming
            .iter()
            .filter_map(|e| e.p99_ms)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let vs = virtual_service_for(&inputs, &svc.host, "mesh").map(|vs| Rules {
            name: key(&vs.metadata),
            rules: vs.spec.http.iter().map(route_summary).collect(),
        });
        let dr = destination_rule_for(&inputs, &svc.host).map(|dr| Subsets {
            name: key(&dr.metadata),
            subsets: dr.spec.subsets.iter().map(|s| s.name.clone()).collect(),
            policy: dr
                .spec
                .traffic_policy
                .as_ref()
                .and_then(|t| t.load_balancer.as_ref())
                .and_then(|lb| lb.simple)
                .and_then(|s| serde_json::to_value(s).ok())
                .and_then(|v| v.as_str().map(str::to_string)),
        });
        out.push(ServiceView {
            host: svc.host.clone(),
            name: svc.key.name.clone(),
            namespace: svc.key.namespace.clone(),
            workloads: inputs
                .endpoints_of(svc)
                .map(|w| format!("{}/{}", w.key.namespace, w.key.name))
                .collect(),
            rps,
            error_rate: if rps > 0.0 { errors / rps } else { 0.0 },
            p99_ms: p99,
            virtual_services: vs.into_iter().collect(),
            destination_rules: dr.into_iter().collect(),
        });
    }
    Json(out)
}

#[derive(Serialize)]
struct ProxyView {
    proxy: String,
    workload: String,
    mode: String,
    state: SyncState,
    error: Option<String>,
    metrics: bool,
}

pub async fn proxies(State(p): State<Arc<Pilot>>) -> impl IntoResponse {
    p.graph.watched();
    let reachable = p.graph.reachable();
    let out: Vec<ProxyView> = p
        .sync
        .snapshot()
        .into_iter()
        .map(|s| ProxyView {
            metrics: reachable.get(&s.proxy).copied().unwrap_or(false),
            error: s.resources.values().find_map(|r| r.nack.clone()),
            proxy: s.proxy,
            workload: s.workload,
            mode: s.mode,
            state: s.state,
        })
        .collect();
    Json(out)
}

fn key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or_default()
    )
}

fn string_match(m: &StringMatch) -> String {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), _, _) => format!("= {e}"),
        (_, Some(p), _) => format!("{p}*"),
        (_, _, Some(r)) => format!("~ {r}"),
        _ => "present".into(),
    }
}

/// One HTTP route in a line: `uri /api* · end-user = jason → v2 (reviews)`.
pub fn route_summary(r: &HttpRoute) -> String {
    let mut conditions = Vec::new();
    for m in &r.match_ {
        let mut parts = Vec::new();
        if let Some(u) = &m.uri {
            parts.push(format!("uri {}", string_match(u)));
        }
        if let Some(me) = &m.method {
            parts.push(format!("method {}", string_match(me)));
        }
        for (h, v) in &m.headers {
            parts.push(format!("{h} {}", string_match(v)));
        }
        if !m.source_labels.is_empty() {
            let labels: Vec<String> = m
                .source_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            parts.push(format!("from {}", labels.join(",")));
        }
        conditions.push(parts.join(" · "));
    }
    let when = if conditions.is_empty() {
        String::new()
    } else {
        format!("{} ", conditions.join(" or "))
    };
    let to = if let Some(rd) = &r.redirect {
        format!(
            "redirect {}{}",
            rd.authority.as_deref().unwrap_or(""),
            rd.uri.as_deref().unwrap_or("")
        )
    } else if let Some(d) = &r.direct_response {
        format!("respond {}", d.status)
    } else {
        let single = r.route.len() == 1;
        r.route
            .iter()
            .map(|d| {
                let target = match &d.destination.subset {
                    Some(s) => s.clone(),
                    None => d
                        .destination
                        .host
                        .split('.')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                };
                match d.weight {
                    Some(w) if !single => format!("{target} {w}%"),
                    _ => target,
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut extras = Vec::new();
    if let Some(f) = &r.fault {
        if f.delay.is_some() {
            extras.push("delay");
        }
        if f.abort.is_some() {
            extras.push("abort");
        }
    }
    if r.retries.is_some() {
        extras.push("retries");
    }
    if r.timeout.is_some() {
        extras.push("timeout");
    }
    if r.mirror.is_some() || !r.mirrors.is_empty() {
        extras.push("mirror");
    }
    let extras = if extras.is_empty() {
        String::new()
    } else {
        format!(" ({})", extras.join(", "))
    };
    format!("{when}→ {to}{extras}")
}

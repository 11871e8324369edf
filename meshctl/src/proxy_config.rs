//! `meshctl proxy-config`: what one proxy runs, read from its admin port
//! (15000): `/config_dump` (the compiled [`ProxyConfig`]) and `/certs`
//! (the workload certificate), printed as tables or as the raw JSON.
//!
//! The admin port listens on the pod's loopback only, so in a cluster it is
//! reached through a port-forward to the pod (the API server's
//! `pods/portforward`); `--admin HOST:PORT` reads any proxy directly.
//!
//! Matches are written compactly: `uri /api*` is a prefix, `uri /login`
//! exact, `uri ~/v[0-9]+/.*` a regex; `header end-user=jason`,
//! `header x-canary present`; several matches of one route are joined by
//! `OR`, and `/*` matches every request.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use mesh_api::model::{
    Cluster, GatewayListener, Inbound, Protocol, ProxyConfig, Route, RouteAction, WeightedCluster,
};
use mesh_api::networking::{
    ClientTlsSettings, ConnectionPoolSettings, HttpDirectResponse, HttpFaultInjection,
    HttpMatchRequest, HttpRedirect, HttpRetry, HttpRewrite, LoadBalancerSettings, OutlierDetection,
    StringMatch, TrafficPolicy,
};
use mesh_api::security::MtlsMode;
use mesh_api::sync::ProxyStatus;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::local::GetFormat;
use crate::pilot::get_all;
use crate::status::write_rows;

/// The proxy's admin port (loopback only).
pub const ADMIN_PORT: u16 = 15000;
/// How long reading a proxy may take, port-forward included.
const TIMEOUT: Duration = Duration::from_secs(20);
const CONFIG_PATH: &str = "/config_dump";
const CERTS_PATH: &str = "/certs";

/// Which part of a proxy's config to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Per destination (service host and port) its routes, in order.
    #[value(alias = "route")]
    Routes,
    /// Upstream clusters with their policies.
    #[value(alias = "cluster")]
    Clusters,
    /// Every endpoint of every cluster.
    #[value(alias = "endpoint")]
    Endpoints,
    /// Inbound ports and gateway listeners.
    #[value(alias = "listener")]
    Listeners,
    /// The workload certificate.
    #[value(alias = "secrets")]
    Secret,
    /// Everything above, titled.
    All,
}

/// What `meshctl proxy-config` was asked.
pub struct Request<'a> {
    pub section: Section,
    /// `pod`, `pod.namespace` or `namespace/pod`.
    pub target: Option<&'a str>,
    pub namespace: Option<&'a str>,
    /// The admin address, HOST:PORT: wins over the target.
    pub admin: Option<&'a str>,
    pub output: GetFormat,
}

/// The workload certificate as `/certs` reports it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certs {
    #[serde(default)]
    pub spiffe_id: String,
    /// PEM, the workload's certificate first.
    #[serde(default)]
    pub cert_chain: Vec<String>,
    /// PEM roots trusted for peers.
    #[serde(default)]
    pub roots: Vec<String>,
    #[serde(default)]
    pub serial: String,
    /// Unix seconds.
    #[serde(default)]
    pub not_before: u64,
    #[serde(default)]
    pub not_after: u64,
}

/// Reads the proxy the request names and prints the section.
pub fn run(req: &Request, out: &mut dyn Write) -> Result<()> {
    let paths: &[&str] = match req.section {
        Section::Secret => &[CERTS_PATH],
        Section::All => &[CONFIG_PATH, CERTS_PATH],
        _ => &[CONFIG_PATH],
    };
    let (who, answers) = fetch(req, paths)?;
    let mut config = None;
    let mut certs = None;
    for (path, (status, body)) in paths.iter().zip(answers) {
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if *path == CONFIG_PATH {
            if !status.is_success() {
                bail!("the proxy at {who} has no config to show ({status}: {text})");
            }
            config = Some(
                serde_json::from_slice::<Value>(&body)
                    .with_context(|| format!("the proxy at {who} sent an unreadable {path}"))?,
            );
        } else if status.is_success() {
            certs = Some(
                serde_json::from_slice::<Value>(&body)
                    .map_err(|e| format!("unreadable {path}: {e}")),
            );
        } else if status == StatusCode::NOT_FOUND {
            certs = Some(Err(format!(
                "this proxy's admin port has no {path} ({status})"
            )));
        } else {
            certs = Some(Err(format!("no workload certificate ({text})")));
        }
    }
    if req.section == Section::Secret
        && let Some(Err(e)) = &certs
    {
        bail!(
            "the proxy at {who}: {e}; without a certificate authority (or before it answers) a proxy runs without mTLS"
        );
    }
    print(
        req.section,
        req.output,
        config.as_ref(),
        certs.as_ref(),
        out,
    )
}

/// Prints a section from the admin answers: `config` is the raw
/// `/config_dump`, `certs` the raw `/certs` or why there is none.
pub fn print(
    section: Section,
    format: GetFormat,
    config: Option<&Value>,
    certs: Option<&Result<Value, String>>,
    out: &mut dyn Write,
) -> Result<()> {
    match format {
        GetFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &select_json(section, config, certs))?;
            writeln!(out)?;
            Ok(())
        }
        GetFormat::Yaml => {
            out.write_all(serde_yaml::to_string(&select_json(section, config, certs))?.as_bytes())?;
            Ok(())
        }
        GetFormat::Table => {
            let cfg = match config {
                Some(v) => Some(serde_json::from_value::<ProxyConfig>(v.clone()).context(
                    "the proxy's config dump is not one this meshctl reads (do their versions differ?); `-o json` prints it as it is",
                )?),
                None => None,
            };
            let certs = certs.map(|c| {
                c.as_ref().map_err(|e| e.clone()).and_then(|v| {
                    serde_json::from_value::<Certs>(v.clone())
                        .map_err(|e| format!("unreadable {CERTS_PATH}: {e}"))
                })
            });
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            render(section, cfg.as_ref(), certs.as_ref(), now, out)
        }
    }
}

/// The part of the raw JSON a section shows, keyed by the config's own
/// field names (`all`: the whole dump and the certificate).
pub fn select_json(
    section: Section,
    config: Option<&Value>,
    certs: Option<&Result<Value, String>>,
) -> Value {
    let field = |k: &str| {
        config
            .and_then(|c| c.get(k))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let secret = match certs {
        Some(Ok(v)) => v.clone(),
        _ => Value::Null,
    };
    match section {
        Section::Routes => json!({
            "destinations": field("destinations"),
            "gatewayListeners": field("gatewayListeners"),
        }),
        Section::Clusters => json!({ "clusters": field("clusters") }),
        Section::Endpoints => {
            let clusters: Vec<Value> = field("clusters")
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    json!({
                        "name": c.get("name").cloned().unwrap_or(Value::Null),
                        "endpoints": c.get("endpoints").cloned().unwrap_or_else(|| json!([])),
                    })
                })
                .collect();
            json!({ "clusters": clusters })
        }
        Section::Listeners => json!({
            "inbound": field("inbound"),
            "gatewayListeners": field("gatewayListeners"),
            "outboundPolicy": field("outboundPolicy"),
        }),
        Section::Secret => json!({ "secret": secret }),
        Section::All => json!({
            "config": config.cloned().unwrap_or(Value::Null),
            "secret": secret,
        }),
    }
}

/// The tables of a section. `now` (Unix seconds) decides whether the
/// certificate is valid.
pub fn render(
    section: Section,
    cfg: Option<&ProxyConfig>,
    certs: Option<&Result<Certs, String>>,
    now: u64,
    out: &mut dyn Write,
) -> Result<()> {
    let empty = ProxyConfig::default();
    let cfg = cfg.unwrap_or(&empty);
    match section {
        Section::Routes => routes(cfg, out),
        Section::Clusters => clusters(cfg, out),
        Section::Endpoints => endpoints(cfg, out),
        Section::Listeners => listeners(cfg, out),
        Section::Secret => secret(certs, now, out),
        Section::All => {
            let w = &cfg.workload;
            writeln!(
                out,
                "Proxy of {}/{} (service account {}), config version {}",
                w.namespace,
                w.name,
                if w.service_account.is_empty() {
                    "-"
                } else {
                    w.service_account.as_str()
                },
                if cfg.version.is_empty() {
                    "-"
                } else {
                    cfg.version.as_str()
                },
            )?;
            for (title, s) in [
                ("Listeners", Section::Listeners),
                ("Routes", Section::Routes),
                ("Clusters", Section::Clusters),
                ("Endpoints", Section::Endpoints),
                ("Secret", Section::Secret),
            ] {
                writeln!(out, "\n== {title} ==")?;
                render(s, Some(cfg), certs, now, out)?;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

/// DESTINATION, NAME, MATCH, ROUTE TO: one row per route of every
/// destination (HTTP routes for HTTP and sniffed ports, TCP routes for
/// the others) and of every gateway virtual host.
fn routes(cfg: &ProxyConfig, out: &mut dyn Write) -> Result<()> {
    let mut rows = vec![vec![
        "DESTINATION".to_string(),
        "NAME".into(),
        "MATCH".into(),
        "ROUTE TO".into(),
    ]];
    let mut dests: Vec<_> = cfg.destinations.iter().collect();
    dests.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    for d in dests {
        let label = format!("{}:{}", d.host, d.port);
        if d.protocol.is_http() || d.protocol == Protocol::Auto {
            for r in &d.http {
                rows.push(route_row(&label, r));
            }
        }
        if !d.protocol.is_http() {
            for t in &d.tcp {
                rows.push(vec![
                    label.clone(),
                    "-".into(),
                    match t.port {
                        Some(p) => format!("TCP port {p}"),
                        None => "TCP".into(),
                    },
                    weighted(&t.clusters),
                ]);
            }
        }
    }
    for l in &cfg.gateway_listeners {
        for vh in &l.virtual_hosts {
            let label = format!("{}:{} (gateway)", vh.hosts.join(","), l.port);
            for r in &vh.routes {
                rows.push(route_row(&label, r));
            }
        }
        for t in &l.tcp {
            rows.push(vec![
                format!("*:{} (gateway)", l.port),
                "-".into(),
                "TCP".into(),
                weighted(&t.clusters),
            ]);
        }
    }
    if rows.len() == 1 {
        writeln!(
            out,
            "(no routes: this proxy has not needed any destination yet)"
        )?;
        return Ok(());
    }
    write_rows(&rows, out)
}

fn route_row(label: &str, r: &Route) -> Vec<String> {
    vec![
        label.to_string(),
        r.name.clone().unwrap_or_else(|| "-".into()),
        match_summary(&r.match_),
        route_to(r),
    ]
}

/// Where a compiled route sends a request, and what else it does to it.
fn route_to(r: &Route) -> String {
    let mut parts = vec![match &r.action {
        RouteAction::Forward(list) => weighted(list),
        RouteAction::Redirect(rd) => redirect_summary(rd),
        RouteAction::DirectResponse(dr) => direct_summary(dr),
    }];
    if let Some(f) = &r.fault {
        parts.extend(fault_summary(f));
    }
    for m in &r.mirrors {
        parts.push(format!(
            "mirror {}{}",
            m.cluster,
            percent_suffix(m.percentage.map(|p| p.value))
        ));
    }
    if let Some(rw) = &r.rewrite {
        parts.extend(rewrite_summary(rw));
    }
    if let Some(t) = r.timeout {
        parts.push(format!("timeout {t}"));
    }
    if let Some(rt) = &r.retries {
        parts.push(retry_summary(rt));
    }
    parts.join("; ")
}

/// `cluster` alone, or `a 80%, b 20%` (weights are relative).
fn weighted(list: &[WeightedCluster]) -> String {
    match list {
        [] => "(no backends)".into(),
        [one] => one.cluster.clone(),
        many => {
            let total: u64 = many.iter().map(|w| u64::from(w.weight)).sum();
            many.iter()
                .map(|w| {
                    let pct = if total == 0 {
                        0.0
                    } else {
                        (f64::from(w.weight) * 1000.0 / total as f64).round() / 10.0
                    };
                    format!("{} {}%", w.cluster, number(pct))
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// NAME, SERVICE, SUBSET, PROTOCOL, LB POLICY, TLS, ENDPOINTS, CIRCUIT
/// BREAKER.
fn clusters(cfg: &ProxyConfig, out: &mut dyn Write) -> Result<()> {
    let mut rows = vec![vec![
        "NAME".to_string(),
        "SERVICE".into(),
        "SUBSET".into(),
        "PROTOCOL".into(),
        "LB POLICY".into(),
        "TLS".into(),
        "ENDPOINTS".into(),
        "CIRCUIT BREAKER".into(),
    ]];
    let mut list: Vec<&Cluster> = cfg.clusters.iter().collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    for c in list {
        let subset = mesh_pilot::compile::parse_cluster_name(&c.name)
            .map(|(_, s, _)| s)
            .filter(|s| !s.is_empty())
            .unwrap_or("-");
        rows.push(vec![
            c.name.clone(),
            if c.service.is_empty() {
                "-".into()
            } else {
                c.service.clone()
            },
            subset.to_string(),
            wire(&c.protocol),
            lb_policy(c.load_balancer.as_ref()),
            cluster_tls(c),
            c.endpoints.len().to_string(),
            circuit_breaker(c.connection_pool.as_ref(), c.outlier_detection.as_ref()),
        ]);
    }
    if rows.len() == 1 {
        writeln!(out, "(no clusters)")?;
        return Ok(());
    }
    write_rows(&rows, out)
}

/// TLS towards a cluster: the DestinationRule's mode, or automatic mTLS
/// to the endpoints that have a sidecar (an identity).
fn cluster_tls(c: &Cluster) -> String {
    if let Some(t) = &c.tls {
        return tls_mode(t);
    }
    let n = c.endpoints.len();
    let m = c.endpoints.iter().filter(|e| e.identity.is_some()).count();
    match (n, m) {
        (0, _) => "AUTO".into(),
        (n, m) if n == m => "AUTO (mTLS)".into(),
        (_, 0) => "AUTO (plaintext)".into(),
        (n, m) => format!("AUTO (mTLS to {m}/{n})"),
    }
}

fn tls_mode(t: &ClientTlsSettings) -> String {
    wire(&t.mode)
}

/// ENDPOINT, CLUSTER, WORKLOAD, WEIGHT, LOCALITY, IDENTITY, LABELS: the
/// endpoints pilot sent (only ready ones are sent).
fn endpoints(cfg: &ProxyConfig, out: &mut dyn Write) -> Result<()> {
    let mut rows = vec![vec![
        "ENDPOINT".to_string(),
        "CLUSTER".into(),
        "WORKLOAD".into(),
        "WEIGHT".into(),
        "LOCALITY".into(),
        "IDENTITY".into(),
        "LABELS".into(),
    ]];
    let mut list: Vec<&Cluster> = cfg.clusters.iter().collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    for c in list {
        for e in &c.endpoints {
            rows.push(vec![
                e.address.to_string(),
                c.name.clone(),
                match (&e.namespace, &e.workload) {
                    (Some(ns), Some(w)) => format!("{ns}/{w}"),
                    (None, Some(w)) => w.clone(),
                    _ => "-".into(),
                },
                e.weight.to_string(),
                e.locality.clone().unwrap_or_else(|| "-".into()),
                e.identity.clone().unwrap_or_else(|| "- (plaintext)".into()),
                labels(&e.labels),
            ]);
        }
    }
    if rows.len() == 1 {
        writeln!(out, "(no endpoints)")?;
        return Ok(());
    }
    write_rows(&rows, out)
}

/// Inbound ports (PORT, PROTOCOL, SERVICE, TARGET, MTLS) with the inbound
/// policy below them; gateway listeners (PORT, PROTOCOL, HOSTS, ROUTES).
fn listeners(cfg: &ProxyConfig, out: &mut dyn Write) -> Result<()> {
    let inbound = &cfg.inbound;
    if !inbound.ports.is_empty() {
        let mut rows = vec![vec![
            "INBOUND PORT".to_string(),
            "PROTOCOL".into(),
            "SERVICE".into(),
            "TARGET".into(),
            "MTLS".into(),
        ]];
        let app = inbound
            .app_address
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for p in &inbound.ports {
            rows.push(vec![
                p.port.to_string(),
                wire(&p.protocol),
                p.service.clone().unwrap_or_else(|| "-".into()),
                SocketAddr::new(app, p.target_port.unwrap_or(p.port)).to_string(),
                wire(&inbound.mtls_for(p.port)),
            ]);
        }
        write_rows(&rows, out)?;
    } else if cfg.gateway_listeners.is_empty() {
        writeln!(out, "(no inbound ports)")?;
    }
    inbound_policy(inbound, out)?;
    writeln!(
        out,
        "Outbound: {} destination(s); traffic to others: {}",
        cfg.destinations.len(),
        wire(&cfg.outbound_policy)
    )?;
    if !cfg.gateway_listeners.is_empty() {
        writeln!(out)?;
        write_rows(&gateway_rows(&cfg.gateway_listeners), out)?;
    }
    Ok(())
}

fn gateway_rows(listeners: &[GatewayListener]) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "GATEWAY PORT".to_string(),
        "PROTOCOL".into(),
        "HOSTS".into(),
        "ROUTES".into(),
    ]];
    for l in listeners {
        let hosts: Vec<&str> = l
            .virtual_hosts
            .iter()
            .flat_map(|v| v.hosts.iter().map(String::as_str))
            .collect();
        let http: usize = l.virtual_hosts.iter().map(|v| v.routes.len()).sum();
        let mut routes = Vec::new();
        if http > 0 || l.tcp.is_empty() {
            routes.push(format!("{http} HTTP"));
        }
        if !l.tcp.is_empty() {
            routes.push(format!("{} TCP", l.tcp.len()));
        }
        rows.push(vec![
            l.port.to_string(),
            wire(&l.protocol),
            if hosts.is_empty() {
                "*".into()
            } else {
                hosts.join(",")
            },
            routes.join(", "),
        ]);
    }
    rows
}

/// The inbound mTLS mode, authorization policies, JWT issuers and rate
/// limits, one line each.
fn inbound_policy(inbound: &Inbound, out: &mut dyn Write) -> Result<()> {
    let mut mtls = wire(&match inbound.mtls {
        MtlsMode::Unset => MtlsMode::Permissive,
        m => m,
    });
    let ports: Vec<String> = inbound
        .port_mtls
        .keys()
        .map(|p| format!("port {p}: {}", wire(&inbound.mtls_for(*p))))
        .collect();
    if !ports.is_empty() {
        mtls.push_str(&format!(" ({})", ports.join(", ")));
    }
    writeln!(out, "Inbound mTLS: {mtls}")?;
    if inbound.authorization.is_empty() {
        writeln!(
            out,
            "Authorization policies: none (every request is allowed)"
        )?;
    } else {
        let list: Vec<String> = inbound
            .authorization
            .iter()
            .map(|a| {
                format!(
                    "{} ({}, {} rule{})",
                    a.name,
                    wire(&a.action),
                    a.rules.len(),
                    if a.rules.len() == 1 { "" } else { "s" }
                )
            })
            .collect();
        writeln!(out, "Authorization policies: {}", list.join(", "))?;
    }
    if !inbound.jwt_rules.is_empty() {
        let issuers: Vec<&str> = inbound
            .jwt_rules
            .iter()
            .map(|j| j.issuer.as_str())
            .collect();
        writeln!(out, "JWT issuers: {}", issuers.join(", "))?;
    }
    if !inbound.rate_limits.is_empty() {
        writeln!(out, "Rate limit policies: {}", inbound.rate_limits.len())?;
    }
    Ok(())
}

/// IDENTITY, SERIAL, NOT BEFORE, NOT AFTER, STATE, CHAIN, ROOTS.
fn secret(certs: Option<&Result<Certs, String>>, now: u64, out: &mut dyn Write) -> Result<()> {
    let c = match certs {
        None => {
            writeln!(out, "(not read)")?;
            return Ok(());
        }
        Some(Err(e)) => {
            writeln!(out, "{e}")?;
            return Ok(());
        }
        Some(Ok(c)) => c,
    };
    let state = if now < c.not_before {
        "NOT YET VALID".to_string()
    } else if now >= c.not_after {
        "EXPIRED".to_string()
    } else {
        format!("VALID ({} left)", span(c.not_after - now))
    };
    let rows = vec![
        vec![
            "IDENTITY".to_string(),
            "SERIAL".into(),
            "NOT BEFORE".into(),
            "NOT AFTER".into(),
            "STATE".into(),
            "CHAIN".into(),
            "ROOTS".into(),
        ],
        vec![
            c.spiffe_id.clone(),
            c.serial.clone(),
            utc(c.not_before),
            utc(c.not_after),
            state,
            c.cert_chain.len().to_string(),
            c.roots.len().to_string(),
        ],
    ];
    write_rows(&rows, out)
}

// ---------------------------------------------------------------------------
// Summaries (shared with `meshctl x describe`)
// ---------------------------------------------------------------------------

/// A route's matches: `/*` for all requests, else each match's conditions,
/// the matches joined by `OR`.
pub(crate) fn match_summary(matches: &[HttpMatchRequest]) -> String {
    let each: Vec<String> = matches.iter().map(one_match).collect();
    if each.is_empty() || each.iter().any(String::is_empty) {
        return "/*".into();
    }
    each.join(" OR ")
}

fn one_match(m: &HttpMatchRequest) -> String {
    let mut parts = Vec::new();
    if let Some(u) = &m.uri {
        parts.push(format!(
            "uri {}{}",
            string_match(u),
            if m.ignore_uri_case { " (any case)" } else { "" }
        ));
    }
    if let Some(x) = &m.method {
        parts.push(format!("method {}", string_match(x)));
    }
    if let Some(x) = &m.authority {
        parts.push(format!("authority {}", string_match(x)));
    }
    if let Some(x) = &m.scheme {
        parts.push(format!("scheme {}", string_match(x)));
    }
    for (k, v) in &m.headers {
        parts.push(format!("header {k}{}", compare(v)));
    }
    for (k, v) in &m.query_params {
        parts.push(format!("query {k}{}", compare(v)));
    }
    for (k, v) in &m.without_headers {
        parts.push(format!("without header {k}{}", compare(v)));
    }
    if let Some(p) = m.port {
        parts.push(format!("port {p}"));
    }
    if !m.source_labels.is_empty() {
        parts.push(format!("from {}", labels(&m.source_labels)));
    }
    if let Some(ns) = &m.source_namespace {
        parts.push(format!("from namespace {ns}"));
    }
    if !m.gateways.is_empty() {
        parts.push(format!("via {}", m.gateways.join(",")));
    }
    parts.join(", ")
}

/// `v` exact, `v*` prefix, `~v` regex, `*` anything.
fn string_match(s: &StringMatch) -> String {
    if let Some(v) = &s.exact {
        v.clone()
    } else if let Some(v) = &s.prefix {
        format!("{v}*")
    } else if let Some(v) = &s.regex {
        format!("~{v}")
    } else {
        "*".into()
    }
}

/// After a header or parameter name: `=v`, `=v*`, `~v`, or ` present`.
fn compare(s: &StringMatch) -> String {
    if let Some(v) = &s.exact {
        format!("={v}")
    } else if let Some(v) = &s.prefix {
        format!("={v}*")
    } else if let Some(v) = &s.regex {
        format!("~{v}")
    } else {
        " present".into()
    }
}

pub(crate) fn redirect_summary(r: &HttpRedirect) -> String {
    let mut target = String::new();
    if let Some(s) = &r.scheme {
        target.push_str(&format!("{s}://"));
    }
    if let Some(a) = &r.authority {
        target.push_str(a);
    }
    if let Some(p) = r.port {
        target.push_str(&format!(":{p}"));
    }
    if let Some(u) = &r.uri {
        target.push_str(u);
    }
    let code = r.redirect_code.unwrap_or(301);
    if target.is_empty() {
        format!("redirect {code}")
    } else {
        format!("redirect {code} {target}")
    }
}

pub(crate) fn direct_summary(d: &HttpDirectResponse) -> String {
    match d.body.as_ref().and_then(|b| b.string.as_deref()) {
        Some(body) => {
            let short: String = body.chars().take(30).collect();
            let more = if body.chars().count() > 30 { "…" } else { "" };
            format!("direct response {} {short:?}{more}", d.status)
        }
        None => format!("direct response {}", d.status),
    }
}

pub(crate) fn fault_summary(f: &HttpFaultInjection) -> Vec<String> {
    let mut parts = Vec::new();
    if let Some(d) = &f.delay {
        let by = d
            .fixed_delay
            .or(d.exponential_delay)
            .map_or_else(|| "?".to_string(), |d| d.to_string());
        let pct = d.percentage.map(|p| p.value).or(d.percent.map(f64::from));
        parts.push(format!("fault: delay {by}{}", percent_suffix(pct)));
    }
    if let Some(a) = &f.abort {
        let code = match (&a.http_status, &a.grpc_status, &a.http2_error) {
            (Some(s), _, _) => s.to_string(),
            (None, Some(g), _) => format!("grpc {g}"),
            (None, None, Some(e)) => format!("http2 {e}"),
            _ => "?".into(),
        };
        parts.push(format!(
            "fault: abort {code}{}",
            percent_suffix(a.percentage.map(|p| p.value))
        ));
    }
    parts
}

pub(crate) fn rewrite_summary(r: &HttpRewrite) -> Vec<String> {
    let mut parts = Vec::new();
    if let Some(u) = &r.uri {
        parts.push(format!("rewrite uri {u}"));
    }
    if let Some(rr) = &r.uri_regex_rewrite {
        parts.push(format!("rewrite uri ~{} -> {}", rr.match_, rr.rewrite));
    }
    if let Some(a) = &r.authority {
        parts.push(format!("rewrite authority {a}"));
    }
    parts
}

pub(crate) fn retry_summary(r: &HttpRetry) -> String {
    let mut s = format!("retries {}", r.attempts);
    let mut more = Vec::new();
    if let Some(t) = r.per_try_timeout {
        more.push(format!("per try {t}"));
    }
    if let Some(on) = &r.retry_on {
        more.push(format!("on {on}"));
    }
    if !more.is_empty() {
        s.push_str(&format!(" ({})", more.join(", ")));
    }
    s
}

/// The balancing policy; the proxy's default is LEAST_REQUEST.
pub(crate) fn lb_policy(lb: Option<&LoadBalancerSettings>) -> String {
    let Some(lb) = lb else {
        return "LEAST_REQUEST (default)".into();
    };
    if let Some(ch) = &lb.consistent_hash {
        let key = if let Some(h) = &ch.http_header_name {
            format!("header {h}")
        } else if let Some(c) = &ch.http_cookie {
            format!("cookie {}", c.name)
        } else if ch.use_source_ip == Some(true) {
            "source IP".into()
        } else if let Some(q) = &ch.http_query_parameter_name {
            format!("query {q}")
        } else {
            "no key".into()
        };
        let algo = if ch.maglev.is_some() { ", maglev" } else { "" };
        return format!("CONSISTENT_HASH ({key}{algo})");
    }
    match lb.simple {
        Some(s) => wire(&s),
        None => "LEAST_REQUEST (default)".into(),
    }
}

/// Connection-pool limits and outlier detection, with the YAML's field
/// names; `-` when there are none.
pub(crate) fn circuit_breaker(
    pool: Option<&ConnectionPoolSettings>,
    outlier: Option<&OutlierDetection>,
) -> String {
    let mut parts = Vec::new();
    if let Some(p) = pool {
        if let Some(t) = &p.tcp {
            if let Some(n) = t.max_connections {
                parts.push(format!("maxConnections={n}"));
            }
            if let Some(d) = t.connect_timeout {
                parts.push(format!("connectTimeout={d}"));
            }
        }
        if let Some(h) = &p.http {
            for (name, v) in [
                ("http1MaxPendingRequests", h.http1_max_pending_requests),
                ("http2MaxRequests", h.http2_max_requests),
                ("maxRequestsPerConnection", h.max_requests_per_connection),
                ("maxRetries", h.max_retries),
            ] {
                if let Some(v) = v {
                    parts.push(format!("{name}={v}"));
                }
            }
        }
    }
    if let Some(o) = outlier {
        let mut od = Vec::new();
        if let Some(n) = o.consecutive_5xx_errors {
            od.push(format!("consecutive5xxErrors={n}"));
        } else if let Some(n) = o.consecutive_errors {
            od.push(format!("consecutiveErrors={n}"));
        }
        if let Some(n) = o.consecutive_gateway_errors {
            od.push(format!("consecutiveGatewayErrors={n}"));
        }
        if let Some(d) = o.interval {
            od.push(format!("interval={d}"));
        }
        if let Some(d) = o.base_ejection_time {
            od.push(format!("baseEjectionTime={d}"));
        }
        if let Some(n) = o.max_ejection_percent {
            od.push(format!("maxEjectionPercent={n}"));
        }
        parts.push(if od.is_empty() {
            "outlier detection".to_string()
        } else {
            format!("outlier: {}", od.join(" "))
        });
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// A DestinationRule traffic policy in one line (`-` when empty).
pub(crate) fn traffic_policy_summary(tp: &TrafficPolicy) -> String {
    let mut parts = Vec::new();
    if tp.load_balancer.is_some() {
        parts.push(format!("LB {}", lb_policy(tp.load_balancer.as_ref())));
    }
    if let Some(t) = &tp.tls {
        parts.push(format!("TLS {}", tls_mode(t)));
    }
    if tp.connection_pool.is_some() || tp.outlier_detection.is_some() {
        parts.push(circuit_breaker(
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
        ));
    }
    if !tp.port_level_settings.is_empty() {
        parts.push(format!(
            "{} port-level setting(s)",
            tp.port_level_settings.len()
        ));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

/// ` (25%)`, or nothing when unset (every request).
fn percent_suffix(p: Option<f64>) -> String {
    match p {
        Some(v) => format!(" ({}%)", number(v)),
        None => String::new(),
    }
}

/// `80` rather than `80.0`.
fn number(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// `k=v,k2=v2`, or `-`.
pub(crate) fn labels(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// An enum as the config writes it (`ROUND_ROBIN`, `STRICT`, `HTTP`).
pub(crate) fn wire<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// Unix seconds as `2024-05-01T12:00:00Z`.
fn utc(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let text = mesh_proxy::telemetry::rfc3339(t);
    // Whole seconds: drop the milliseconds.
    format!("{}Z", text.trim_end_matches('Z').trim_end_matches(".000"))
}

/// `3d4h`, `5h12m`, `42m`, `30s`.
fn span(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{secs}s")
    }
}

// ---------------------------------------------------------------------------
// Finding and reading the proxy
// ---------------------------------------------------------------------------

/// `pod`, `pod.namespace` or `namespace/pod` as pod and namespace: `-n`
/// wins, then the name's own namespace, then `default_ns`. Namespaces
/// hold no dots, so the last dot separates them.
pub fn split_target(target: &str, namespace: Option<&str>, default_ns: &str) -> (String, String) {
    if let Some(ns) = namespace {
        return (target.to_string(), ns.to_string());
    }
    if let Some((ns, pod)) = target.split_once('/') {
        return (pod.to_string(), ns.to_string());
    }
    match target.rsplit_once('.') {
        Some((pod, ns)) if !pod.is_empty() && !ns.is_empty() => (pod.to_string(), ns.to_string()),
        _ => (target.to_string(), default_ns.to_string()),
    }
}

/// The local mesh's proxy a target names: its id (`workload.namespace`),
/// `namespace/workload` or the workload's name.
pub fn local_proxy<'a>(proxies: &'a [ProxyStatus], target: &str) -> Option<&'a ProxyStatus> {
    proxies.iter().find(|p| {
        p.proxy == target
            || p.workload == target
            || p.workload.split_once('/').map(|(_, w)| w) == Some(target)
            || p.proxy.split_once('.').map(|(w, _)| w) == Some(target)
    })
}

/// The answers to `paths`, and who gave them (for messages).
fn fetch(req: &Request, paths: &[&str]) -> Result<(String, Vec<(StatusCode, Bytes)>)> {
    if let Some(addr) = req.admin {
        return Ok((addr.to_string(), admin_get(addr, paths, "the proxy")?));
    }
    let Some(target) = req.target else {
        bail!(
            "name the proxy's pod (`meshctl proxy-config {} POD[.NAMESPACE]`) or pass --admin HOST:PORT",
            wire_section(req.section)
        );
    };
    // In the local mesh, the proxies' admin ports are ephemeral and
    // published nowhere: say so when the target is one of its proxies.
    let mut not_local = None;
    if req.namespace.is_none()
        && let Some(state) = crate::local::find()
    {
        let proxies = crate::pilot::get(&state.status, "/debug/syncz")
            .ok()
            .and_then(|body| serde_json::from_slice::<Vec<ProxyStatus>>(&body).ok());
        match proxies {
            Some(list) => {
                if let Some(p) = local_proxy(&list, target) {
                    let workload = p
                        .workload
                        .split_once('/')
                        .map_or(p.workload.as_str(), |(_, w)| w);
                    if let Some(addr) = state.admin.get(workload) {
                        let got = admin_get(addr, paths, &p.proxy)?;
                        return Ok((format!("{} ({addr})", p.proxy), got));
                    }
                    bail!(
                        "{} ({}) runs in the local mesh (`meshctl demo`), which did not record its admin address (a demo started by an older meshctl?): pass it with --admin 127.0.0.1:PORT",
                        p.proxy,
                        p.workload
                    );
                }
                let names: Vec<&str> = list.iter().map(|p| p.proxy.as_str()).collect();
                not_local = Some(format!(
                    "no proxy named {target:?} in the local mesh (it has {}); looking in the cluster",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ));
            }
            None => {
                not_local = Some(format!(
                    "the local mesh's pilot at {} did not list its proxies; looking in the cluster",
                    state.status
                ));
            }
        }
    }
    let result = block_on(from_pod(target, req.namespace, paths));
    match (result, not_local) {
        (Ok(r), _) => Ok(r),
        (Err(e), Some(note)) => Err(e.context(note)),
        (Err(e), None) => Err(e),
    }
}

fn wire_section(s: Section) -> &'static str {
    match s {
        Section::Routes => "routes",
        Section::Clusters => "clusters",
        Section::Endpoints => "endpoints",
        Section::Listeners => "listeners",
        Section::Secret => "secret",
        Section::All => "all",
    }
}

/// Runs a future on a fresh runtime, within [`TIMEOUT`].
fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        tokio::time::timeout(TIMEOUT, f)
            .await
            .map_err(|_| anyhow!("the proxy did not answer within {TIMEOUT:?}"))?
    })
}

/// Reads a pod's proxy through a port-forward to its admin port.
async fn from_pod(
    target: &str,
    namespace: Option<&str>,
    paths: &[&str],
) -> Result<(String, Vec<(StatusCode, Bytes)>)> {
    let client = kube::Client::try_default().await.context(
        "no cluster to talk to (set KUBECONFIG or a kubeconfig context), and no --admin address given",
    )?;
    let (pod, ns) = split_target(target, namespace, client.default_namespace());
    let who = format!("pod {ns}/{pod}");
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let found = pods
        .get_opt(&pod)
        .await
        .with_context(|| format!("reading {who}"))?
        .ok_or_else(|| anyhow!("no pod {pod:?} in namespace {ns:?}"))?;
    if !has_proxy(&found) {
        bail!(
            "{who} has no {} container: it is not in the mesh (`meshctl x describe pod {pod} -n {ns}` says why)",
            mesh_injector::PROXY_NAME
        );
    }
    let phase = found
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown");
    if phase != "Running" {
        bail!("{who} is {phase}, not Running: its proxy cannot answer");
    }
    let mut pf = pods
        .portforward(&pod, &[ADMIN_PORT])
        .await
        .with_context(|| format!("port-forward to {who} port {ADMIN_PORT}"))?;
    let stream = pf
        .take_stream(ADMIN_PORT)
        .ok_or_else(|| anyhow!("the port-forward to {who} gave no stream for port {ADMIN_PORT}"))?;
    let forward_error = pf.take_error(ADMIN_PORT);
    let got = get_all(stream, &format!("localhost:{ADMIN_PORT}"), paths).await;
    let got = match got {
        Ok(got) => got,
        Err(e) => {
            // The API server's reason (connection refused, …) when it gave one.
            let reason = match forward_error {
                Some(f) => tokio::time::timeout(Duration::from_secs(1), f)
                    .await
                    .ok()
                    .flatten(),
                None => None,
            };
            pf.abort();
            return Err(match reason {
                Some(r) => {
                    anyhow!("the proxy's admin port {ADMIN_PORT} in {who} did not answer: {r}")
                }
                None => e.context(format!(
                    "the proxy's admin port {ADMIN_PORT} in {who} did not answer"
                )),
            });
        }
    };
    pf.abort();
    Ok((who, got))
}

/// Whether a pod runs the mesh's proxy (as a sidecar, a native sidecar
/// or a gateway).
pub(crate) fn has_proxy(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == mesh_injector::PROXY_NAME)
    })
}

/// The answers to `paths` from the admin port at `addr` (`who` for
/// messages).
fn admin_get(addr: &str, paths: &[&str], who: &str) -> Result<Vec<(StatusCode, Bytes)>> {
    block_on(async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot reach {who}'s admin port at {addr}"))?;
        get_all(stream, addr, paths)
            .await
            .with_context(|| format!("{who}'s admin port at {addr} did not answer"))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::Duration as MeshDuration;
    use mesh_api::model::{
        AuthorizationRules, DestinationConfig, Endpoint, InboundPort, Mirror, OutboundPolicy,
        TcpRoute, VirtualHost, Workload,
    };
    use mesh_api::networking::{
        ClientTlsMode, FaultAbort, HttpSettings, Percent, SimpleLb, TcpSettings,
    };
    use mesh_api::security::AuthorizationAction;

    use super::*;

    const REVIEWS: &str = "reviews.default.svc.cluster.local";

    fn cluster_name(port: u16, subset: &str) -> String {
        format!("outbound|{port}|{subset}|{REVIEWS}")
    }

    fn endpoint(addr: &str, version: &str, identity: bool) -> Endpoint {
        Endpoint {
            address: addr.parse().unwrap(),
            weight: 1,
            labels: BTreeMap::from([
                ("app".to_string(), "reviews".to_string()),
                ("version".to_string(), version.to_string()),
            ]),
            workload: Some("reviews".into()),
            namespace: Some("default".into()),
            locality: Some("us-east1/b".into()),
            identity: identity
                .then(|| "spiffe://cluster.local/ns/default/sa/bookinfo-reviews".to_string()),
        }
    }

    /// A reviews sidecar's config: weighted routes, a header match with a
    /// fault, a TCP destination, clusters with policies, an inbound port.
    fn config() -> ProxyConfig {
        let wc = |subset: &str, weight: u32| WeightedCluster {
            cluster: cluster_name(9080, subset),
            weight,
            headers: None,
        };
        ProxyConfig {
            version: "42".into(),
            workload: Workload {
                name: "productpage-v1".into(),
                namespace: "default".into(),
                service_account: "bookinfo-productpage".into(),
                ..Default::default()
            },
            destinations: vec![
                DestinationConfig {
                    host: REVIEWS.into(),
                    port: 9080,
                    protocol: Protocol::Http,
                    http: vec![
                        Route {
                            name: Some("jason".into()),
                            match_: vec![HttpMatchRequest {
                                headers: BTreeMap::from([(
                                    "end-user".to_string(),
                                    StringMatch::exact("jason"),
                                )]),
                                uri: Some(StringMatch::prefix("/api")),
                                ..Default::default()
                            }],
                            action: RouteAction::Forward(vec![wc("v2", 100)]),
                            fault: Some(HttpFaultInjection {
                                delay: None,
                                abort: Some(FaultAbort {
                                    http_status: Some(500),
                                    percentage: Some(Percent { value: 10.0 }),
                                    ..Default::default()
                                }),
                            }),
                            timeout: Some(MeshDuration::from_secs(2)),
                            ..Default::default()
                        },
                        Route {
                            action: RouteAction::Forward(vec![wc("v1", 80), wc("v3", 20)]),
                            mirrors: vec![Mirror {
                                cluster: cluster_name(9080, "v2"),
                                percentage: Some(Percent { value: 50.0 }),
                            }],
                            ..Default::default()
                        },
                    ],
                    // Not shown for an HTTP port.
                    tcp: vec![TcpRoute {
                        port: None,
                        clusters: vec![wc("", 100)],
                    }],
                    ..Default::default()
                },
                DestinationConfig {
                    host: "mongo.default.svc.cluster.local".into(),
                    port: 27017,
                    protocol: Protocol::Tcp,
                    tcp: vec![TcpRoute {
                        port: None,
                        clusters: vec![WeightedCluster {
                            cluster: "outbound|27017||mongo.default.svc.cluster.local".into(),
                            weight: 100,
                            headers: None,
                        }],
                    }],
                    ..Default::default()
                },
            ],
            clusters: vec![
                Cluster {
                    name: cluster_name(9080, "v1"),
                    service: REVIEWS.into(),
                    endpoints: vec![
                        endpoint("10.0.0.1:9080", "v1", true),
                        endpoint("10.0.0.2:9080", "v1", false),
                    ],
                    protocol: Protocol::Http,
                    load_balancer: Some(LoadBalancerSettings {
                        simple: Some(SimpleLb::RoundRobin),
                        ..Default::default()
                    }),
                    connection_pool: Some(ConnectionPoolSettings {
                        tcp: Some(TcpSettings {
                            max_connections: Some(1),
                            ..Default::default()
                        }),
                        http: Some(HttpSettings {
                            http1_max_pending_requests: Some(1),
                            ..Default::default()
                        }),
                    }),
                    outlier_detection: Some(OutlierDetection {
                        consecutive_5xx_errors: Some(1),
                        interval: Some(MeshDuration::from_secs(1)),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Cluster {
                    name: cluster_name(9080, "v3"),
                    service: REVIEWS.into(),
                    endpoints: vec![endpoint("10.0.0.3:9080", "v3", true)],
                    tls: Some(ClientTlsSettings {
                        mode: ClientTlsMode::IstioMutual,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            inbound: Inbound {
                ports: vec![InboundPort {
                    port: 9080,
                    target_port: Some(8080),
                    protocol: Protocol::Http,
                    service: Some("productpage.default.svc.cluster.local".into()),
                }],
                mtls: MtlsMode::Permissive,
                port_mtls: BTreeMap::from([(9080, MtlsMode::Strict)]),
                authorization: vec![AuthorizationRules {
                    name: "mesh-system/deny-all".into(),
                    action: AuthorizationAction::Deny,
                    rules: Vec::new(),
                }],
                ..Default::default()
            },
            gateway_listeners: Vec::new(),
            outbound_policy: OutboundPolicy::RegistryOnly,
        }
    }

    /// The config as the admin port sends it, rendered as the table user
    /// sees: the JSON field names are checked on the way.
    fn table(section: Section, cfg: &ProxyConfig) -> String {
        let raw = serde_json::to_value(cfg).unwrap();
        let mut out = Vec::new();
        print(section, GetFormat::Table, Some(&raw), None, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn row<'a>(text: &'a str, needle: &str) -> &'a str {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
    }

    #[test]
    fn routes_show_matches_weights_and_faults() {
        let t = table(Section::Routes, &config());
        assert!(t.starts_with("DESTINATION"), "{t}");
        let jason = row(&t, "jason");
        assert!(
            jason.contains("reviews.default.svc.cluster.local:9080"),
            "{jason}"
        );
        assert!(
            jason.contains("uri /api*, header end-user=jason"),
            "{jason}"
        );
        assert!(jason.contains(&cluster_name(9080, "v2")), "{jason}");
        assert!(jason.contains("fault: abort 500 (10%)"), "{jason}");
        assert!(jason.contains("timeout 2s"), "{jason}");
        let default = row(&t, "/*");
        assert!(
            default.contains(&format!(
                "{} 80%, {} 20%",
                cluster_name(9080, "v1"),
                cluster_name(9080, "v3")
            )),
            "{default}"
        );
        assert!(default.contains("mirror"), "{default}");
        // An HTTP port shows its HTTP routes only; a TCP port its TCP route.
        assert_eq!(t.lines().filter(|l| l.contains(":9080")).count(), 2, "{t}");
        let mongo = row(&t, "mongo");
        assert!(mongo.contains("TCP"), "{mongo}");
        assert!(mongo.contains("outbound|27017||mongo"), "{mongo}");
    }

    #[test]
    fn gateway_routes_are_listed_under_their_hosts() {
        let mut cfg = ProxyConfig::default();
        cfg.gateway_listeners.push(GatewayListener {
            port: 8080,
            protocol: Protocol::Http,
            virtual_hosts: vec![VirtualHost {
                hosts: vec!["bookinfo.example.com".into()],
                routes: vec![Route {
                    match_: vec![HttpMatchRequest {
                        uri: Some(StringMatch::exact("/productpage")),
                        ..Default::default()
                    }],
                    action: RouteAction::Redirect(HttpRedirect {
                        uri: Some("/new".into()),
                        redirect_code: Some(302),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            }],
            tcp: Vec::new(),
        });
        let t = table(Section::Routes, &cfg);
        let r = row(&t, "bookinfo.example.com:8080 (gateway)");
        assert!(r.contains("uri /productpage"), "{r}");
        assert!(r.contains("redirect 302 /new"), "{r}");
        let l = table(Section::Listeners, &cfg);
        let g = row(&l, "8080");
        assert!(g.contains("HTTP") && g.contains("bookinfo.example.com") && g.contains("1 HTTP"));
    }

    #[test]
    fn clusters_show_policies_tls_and_endpoint_counts() {
        let t = table(Section::Clusters, &config());
        let v1 = row(&t, "|v1|");
        for want in [
            "v1",
            "ROUND_ROBIN",
            "AUTO (mTLS to 1/2)",
            " 2 ",
            "maxConnections=1",
            "http1MaxPendingRequests=1",
            "outlier: consecutive5xxErrors=1 interval=1s",
        ] {
            assert!(v1.contains(want), "{want:?} missing in {v1}");
        }
        let v3 = row(&t, "|v3|");
        assert!(v3.contains("ISTIO_MUTUAL"), "{v3}");
        assert!(v3.contains("LEAST_REQUEST (default)"), "{v3}");
    }

    #[test]
    fn endpoints_show_address_cluster_workload_and_identity() {
        let t = table(Section::Endpoints, &config());
        let e = row(&t, "10.0.0.1:9080");
        assert!(e.contains(&cluster_name(9080, "v1")), "{e}");
        assert!(e.contains("default/reviews"), "{e}");
        assert!(e.contains("us-east1/b"), "{e}");
        assert!(
            e.contains("spiffe://cluster.local/ns/default/sa/bookinfo-reviews"),
            "{e}"
        );
        assert!(e.contains("app=reviews,version=v1"), "{e}");
        assert!(row(&t, "10.0.0.2:9080").contains("- (plaintext)"));
    }

    #[test]
    fn listeners_show_inbound_ports_with_their_mtls_mode() {
        let t = table(Section::Listeners, &config());
        let p = row(&t, "9080");
        assert!(p.contains("HTTP"), "{p}");
        assert!(p.contains("productpage.default.svc.cluster.local"), "{p}");
        assert!(p.contains("127.0.0.1:8080"), "{p}");
        assert!(p.contains("STRICT"), "{p}");
        assert!(
            t.contains("Inbound mTLS: PERMISSIVE (port 9080: STRICT)"),
            "{t}"
        );
        assert!(t.contains("mesh-system/deny-all (DENY, 0 rules)"), "{t}");
        assert!(t.contains("traffic to others: REGISTRY_ONLY"), "{t}");
    }

    #[test]
    fn secret_shows_the_certificate_and_its_validity() {
        let raw = json!({
            "spiffeId": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            "certChain": ["-----BEGIN CERTIFICATE-----", "-----BEGIN CERTIFICATE-----"],
            "roots": ["-----BEGIN CERTIFICATE-----"],
            "serial": "0a1b2c",
            "notBefore": 1_700_000_000u64,
            "notAfter": 1_700_086_400u64,
        });
        let certs: Certs = serde_json::from_value(raw).unwrap();
        let mut out = Vec::new();
        render(
            Section::Secret,
            None,
            Some(&Ok(certs)),
            1_700_000_000 + 3600,
            &mut out,
        )
        .unwrap();
        let t = String::from_utf8(out).unwrap();
        let r = row(&t, "spiffe://");
        for want in [
            "0a1b2c",
            "2023-11-14T22:13:20Z",
            "2023-11-15T22:13:20Z",
            "VALID (23h0m left)",
            "  2  ",
        ] {
            assert!(r.contains(want), "{want:?} missing in {r}");
        }
        let mut out = Vec::new();
        render(
            Section::Secret,
            None,
            Some(&Err("no workload certificate (no certificate)".into())),
            0,
            &mut out,
        )
        .unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("no workload certificate")
        );
    }

    #[test]
    fn all_titles_every_section() {
        let raw = serde_json::to_value(config()).unwrap();
        let mut out = Vec::new();
        let certs = Err("no workload certificate (no certificate)".to_string());
        print(
            Section::All,
            GetFormat::Table,
            Some(&raw),
            Some(&certs),
            &mut out,
        )
        .unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.starts_with("Proxy of default/productpage-v1"), "{t}");
        assert!(t.contains("config version 42"), "{t}");
        let mut at = 0;
        for title in ["Listeners", "Routes", "Clusters", "Endpoints", "Secret"] {
            let i = t.find(&format!("== {title} ==")).expect(title);
            assert!(i > at, "{title} out of order");
            at = i;
        }
    }

    #[test]
    fn json_output_is_the_raw_part_of_the_dump() {
        let raw = serde_json::to_value(config()).unwrap();
        let routes = select_json(Section::Routes, Some(&raw), None);
        assert_eq!(routes["destinations"], raw["destinations"]);
        let clusters = select_json(Section::Clusters, Some(&raw), None);
        assert_eq!(clusters["clusters"], raw["clusters"]);
        let eps = select_json(Section::Endpoints, Some(&raw), None);
        assert_eq!(eps["clusters"][0]["name"], raw["clusters"][0]["name"]);
        assert_eq!(
            eps["clusters"][0]["endpoints"],
            raw["clusters"][0]["endpoints"]
        );
        assert!(eps["clusters"][0].get("loadBalancer").is_none());
        let l = select_json(Section::Listeners, Some(&raw), None);
        assert_eq!(l["inbound"], raw["inbound"]);
        let certs = Ok(json!({"serial": "1"}));
        let all = select_json(Section::All, Some(&raw), Some(&certs));
        assert_eq!(all["config"], raw);
        assert_eq!(all["secret"]["serial"], "1");
        // YAML carries the same.
        let mut out = Vec::new();
        print(
            Section::Clusters,
            GetFormat::Yaml,
            Some(&raw),
            None,
            &mut out,
        )
        .unwrap();
        let back: Value = serde_yaml::from_slice(&out).unwrap();
        assert_eq!(back["clusters"], raw["clusters"]);
    }

    #[test]
    fn a_dump_this_meshctl_cannot_read_says_to_use_json() {
        let raw = json!({"destinations": "not a list"});
        let err = print(
            Section::Routes,
            GetFormat::Table,
            Some(&raw),
            None,
            &mut Vec::<u8>::new(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("-o json"), "{err:#}");
    }

    #[test]
    fn targets_name_pod_and_namespace() {
        let t = |s: &str, ns: Option<&str>| split_target(s, ns, "default");
        assert_eq!(
            t("reviews-v1-abc", None),
            ("reviews-v1-abc".into(), "default".into())
        );
        assert_eq!(
            t("reviews-v1-abc.shop", None),
            ("reviews-v1-abc".into(), "shop".into())
        );
        assert_eq!(
            t("shop/reviews-v1-abc", None),
            ("reviews-v1-abc".into(), "shop".into())
        );
        assert_eq!(t("web.0.shop", None), ("web.0".into(), "shop".into()));
        assert_eq!(
            t("reviews.x", Some("shop")),
            ("reviews.x".into(), "shop".into())
        );
    }

    #[test]
    fn local_proxies_are_found_by_id_or_workload() {
        let p = ProxyStatus {
            proxy: "reviews-v1.default".into(),
            workload: "default/reviews-v1".into(),
            ..Default::default()
        };
        let list = [p];
        for name in ["reviews-v1.default", "default/reviews-v1", "reviews-v1"] {
            assert!(local_proxy(&list, name).is_some(), "{name}");
        }
        assert!(local_proxy(&list, "reviews-v2").is_none());
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}

//! The compiled proxy config: what pilot computes from services, endpoints
//! and routing resources, and what `mesh-proxy` runs (from a file with
//! `--config`, or pushed over xDS).
//!
//! It reuses the resource types for everything the proxy interprets as
//! written (matches, retries, faults, CORS, header operations), and replaces
//! what pilot resolves: hosts and subsets become clusters with endpoints,
//! DestinationRule policies are merged per cluster.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::networking::ClientTlsSettings;
use crate::networking::{
    ConnectionPoolSettings, CorsPolicy, Headers, HttpDirectResponse, HttpFaultInjection,
    HttpMatchRequest, HttpRedirect, HttpRetry, HttpRewrite, LoadBalancerSettings, OutlierDetection,
    Percent, RateLimitPolicySpec,
};
use crate::security::{AuthorizationAction, JwtRule, MtlsMode, Rule};

/// Everything one proxy runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Changes whenever the content changes; shown in the admin dump and
    /// metrics.
    #[serde(default)]
    pub version: String,
    /// The workload this proxy serves (source labels, metrics labels).
    #[serde(default)]
    pub workload: Workload,
    /// Outbound destinations: one per service host and port.
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
    /// Upstream clusters the destinations and listeners route to.
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// Inbound traffic to the workload (sidecar mode).
    #[serde(default)]
    pub inbound: Inbound,
    /// Ports a gateway listens on, with their virtual hosts (gateway mode).
    #[serde(default)]
    pub gateway_listeners: Vec<GatewayListener>,
    /// Where to send outbound traffic that matches no destination.
    #[serde(default)]
    pub outbound_policy: OutboundPolicy,
}

/// What pilot sends a proxy about itself (the discovery protocol's
/// `Workload` resource): everything in [`ProxyConfig`] but the outbound
/// destinations and clusters, which arrive one by one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadResource {
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub inbound: Inbound,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_listeners: Vec<GatewayListener>,
    #[serde(default)]
    pub outbound_policy: OutboundPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub service_account: String,
    /// The canonical service (`app` label) and revision (`version` label).
    #[serde(default)]
    pub canonical_service: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub trust_domain: String,
}

/// Outbound traffic without a matching destination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    /// Pass it to its original destination untouched.
    #[default]
    AllowAny,
    /// Refuse it (502 with reason "no route" for HTTP, closed for TCP).
    RegistryOnly,
}

/// Application protocol of a port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protocol {
    /// Sniff the first bytes (HTTP/1, HTTP/2 preface, TLS, else TCP).
    #[default]
    Auto,
    Http,
    Http2,
    Grpc,
    Tcp,
    /// Opaque TLS (passed through; SNI may route).
    Tls,
}

impl Protocol {
    /// Istio's rule: a Service port's name prefix or appProtocol.
    pub fn from_port_name(name: &str) -> Protocol {
        let prefix = name.split('-').next().unwrap_or(name).to_ascii_lowercase();
        match prefix.as_str() {
            "http" | "http1" => Protocol::Http,
            "http2" | "h2c" => Protocol::Http2,
            "grpc" | "grpc-web" => Protocol::Grpc,
            "tcp" | "mongo" | "mysql" | "redis" | "postgres" | "postgresql" => Protocol::Tcp,
            "tls" | "https" => Protocol::Tls,
            _ => Protocol::Auto,
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// Server-first protocols send nothing before the server speaks: the
    /// proxy must not wait to sniff them.
    pub fn server_first_port(port: u16) -> bool {
        matches!(port, 21 | 22 | 25 | 110 | 143 | 3306 | 5432 | 27017)
    }
}

/// One service host and port, and how traffic to it is routed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationConfig {
    /// Fully qualified host, e.g. `reviews.default.svc.cluster.local`.
    pub host: String,
    pub port: u16,
    /// Other names clients use for it (`reviews`, `reviews.default`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Service addresses (ClusterIPs) a captured connection may target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    /// HTTP routes, in order; the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<Route>,
    /// TCP routes (also used for HTTP-less traffic); the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
}

/// A compiled HTTP route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// OR-ed; empty matches everything.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub match_: Vec<HttpMatchRequest>,
    /// `{forward: [...]}`, `{redirect: {...}}` or `{directResponse: {...}}`.
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub action: RouteAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors_policy: Option<CorsPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RouteAction {
    /// Weighted clusters; weights need not add to 100 (they are relative).
    Forward(Vec<WeightedCluster>),
    Redirect(HttpRedirect),
    DirectResponse(HttpDirectResponse),
}

impl Default for RouteAction {
    fn default() -> Self {
        RouteAction::Forward(Vec::new())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedCluster {
    pub cluster: String,
    #[serde(default = "hundred")]
    pub weight: u32,
    /// Header operations for requests sent to this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

fn hundred() -> u32 {
    100
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub cluster: String,
    /// Share of requests mirrored; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    /// Only connections to this port (of the destination) when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub clusters: Vec<WeightedCluster>,
}

/// A set of endpoints and how to talk to them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    /// E.g. `outbound|9080|v1|reviews.default.svc.cluster.local`.
    pub name: String,
    /// The service host, for metrics (`destination_service`).
    #[serde(default)]
    pub service: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Protocol spoken to the endpoints; AUTO keeps the client's.
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS origination from the DestinationRule. Unset: automatic mTLS,
    /// to the endpoints that have an `identity` (a sidecar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub address: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The endpoint's workload, for metrics (`destination_workload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// The SPIFFE ID of the endpoint's sidecar, when it has one: traffic
    /// to it uses mTLS and the certificate must name this identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

fn one() -> u32 {
    1
}

/// Inbound traffic to the workload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inbound {
    /// The workload's ports; traffic to other ports passes as TCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<InboundPort>,
    /// Where the app listens (127.0.0.1 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_address: Option<IpAddr>,
    /// Local rate limits (the mesh's RateLimitPolicy), first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitPolicySpec>,
    /// Connection limits for traffic to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// The PeerAuthentication mode in force (UNSET is PERMISSIVE).
    #[serde(default, skip_serializing_if = "is_unset")]
    pub mtls: MtlsMode,
    /// Port-level modes (by the workload's port), overriding `mtls`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_mtls: BTreeMap<u16, MtlsMode>,
    /// The AuthorizationPolicies that apply to the workload (mesh-wide,
    /// its namespace's and those selecting it), in name order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization: Vec<AuthorizationRules>,
    /// The JWT rules of the RequestAuthentications that apply to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// One AuthorizationPolicy as the proxy enforces it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRules {
    /// `namespace/name`, for metrics and logs.
    pub name: String,
    #[serde(default)]
    pub action: AuthorizationAction,
    /// OR-ed; with none the policy matches no request (so an ALLOW
    /// policy without rules denies everything, as in Istio).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

fn is_unset(m: &MtlsMode) -> bool {
    *m == MtlsMode::Unset
}

impl Inbound {
    /// The mode for traffic to `port`: STRICT, PERMISSIVE or DISABLE.
    pub fn mtls_for(&self, port: u16) -> MtlsMode {
        match self.port_mtls.get(&port).copied().unwrap_or(self.mtls) {
            MtlsMode::Unset => MtlsMode::Permissive,
            m => m,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPort {
    pub port: u16,
    /// The app's port, when different (Service targetPort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
    /// The service names this port serves, for metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// A gateway port and the hosts it serves.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayListener {
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Virtual hosts, matched on the request's host (`*.example.com`
    /// wildcards, `*` for all); the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_hosts: Vec<VirtualHost>,
    /// For TCP servers: where connections go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualHost {
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

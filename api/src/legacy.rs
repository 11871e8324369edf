//! Istio 0.x's `config.istio.io/v1alpha2` RouteRule, read only to be
//! converted (see [`crate::convert`]).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::networking::StringMatch;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: RouteRuleSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRuleSpec {
    pub destination: IstioService,
    /// Higher precedence rules are evaluated first.
    #[serde(default)]
    pub precedence: i32,
    #[serde(default, rename = "match")]
    pub match_: Option<MatchCondition>,
    #[serde(default)]
    pub route: Vec<DestinationWeight>,
    #[serde(default)]
    pub redirect: Option<LegacyRedirect>,
    #[serde(default)]
    pub rewrite: Option<LegacyRewrite>,
    #[serde(default)]
    pub websocket_upgrade: Option<bool>,
    #[serde(default)]
    pub http_req_timeout: Option<HttpTimeout>,
    #[serde(default)]
    pub http_req_retries: Option<HttpRetryLegacy>,
    #[serde(default)]
    pub http_fault: Option<HttpFault>,
    #[serde(default)]
    pub l4_fault: Option<serde_yaml::Value>,
    #[serde(default)]
    pub mirror: Option<IstioService>,
    #[serde(default)]
    pub cors_policy: Option<LegacyCors>,
    #[serde(default)]
    pub append_headers: BTreeMap<String, String>,
}

/// A service, optionally narrowed to the instances with `labels`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioService {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
    /// The fully qualified name, alternative to name/namespace/domain.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchCondition {
    #[serde(default)]
    pub source: Option<IstioService>,
    #[serde(default)]
    pub tcp: Option<serde_yaml::Value>,
    #[serde(default)]
    pub udp: Option<serde_yaml::Value>,
    #[serde(default)]
    pub request: Option<MatchRequest>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchRequest {
    /// `uri`, `scheme`, `method` and `authority` are the request's
    /// attributes; any other key is a header.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationWeight {
    #[serde(default)]
    pub destination: Option<IstioService>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub weight: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LegacyRedirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LegacyRewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpTimeout {
    pub simple_timeout: SimpleTimeout,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimpleTimeout {
    pub timeout: Duration,
    #[serde(default)]
    pub override_header_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetryLegacy {
    pub simple_retry: SimpleRetry,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimpleRetry {
    pub attempts: i32,
    #[serde(default)]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub override_header_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFault {
    #[serde(default)]
    pub delay: Option<LegacyDelay>,
    #[serde(default)]
    pub abort: Option<LegacyAbort>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LegacyDelay {
    #[serde(default)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub fixed_delay: Option<Duration>,
    #[serde(default)]
    pub exponential_delay: Option<Duration>,
    #[serde(default)]
    pub override_header_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LegacyAbort {
    #[serde(default)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub http_status: Option<i32>,
    #[serde(default)]
    pub grpc_status: Option<String>,
    #[serde(default)]
    pub http2_error: Option<String>,
    #[serde(default)]
    pub override_header_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LegacyCors {
    #[serde(default)]
    pub allow_origin: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub max_age: Option<Duration>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
}

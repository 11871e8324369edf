//! Why the proxy answered a request itself. Every response the proxy
//! generates carries its reason in `x-mesh-reason` and in the access log,
//! and maps to Envoy's response flags for the `response_flags` metric label.

use http::{HeaderValue, StatusCode};

/// The header naming why the proxy generated a response.
pub const REASON_HEADER: &str = "x-mesh-reason";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No destination or route matches the request.
    NoRoute,
    /// The route's cluster has no endpoint, or none is healthy.
    NoHealthyUpstream,
    /// The upstream did not answer within the route or per-try timeout.
    UpstreamTimeout,
    /// The upstream connection failed or was reset mid-request.
    UpstreamReset,
    /// Connecting to the upstream failed.
    ConnectFailure,
    /// A connection-pool limit (circuit breaker) is full.
    CircuitOpen,
    /// Local rate limit exceeded.
    RateLimited,
    /// Fault injection aborted the request.
    FaultInjected,
    /// The request was malformed.
    BadRequest,
    /// An authorization policy denied the request.
    Denied,
    /// The request's JWT is invalid (RequestAuthentication).
    Unauthenticated,
    /// The proxy has no configuration yet.
    NoConfig,
    /// The proxy is shutting down.
    Draining,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRoute => "no route",
            Reason::NoHealthyUpstream => "no healthy upstream",
            Reason::UpstreamTimeout => "upstream timeout",
            Reason::UpstreamReset => "upstream reset",
            Reason::ConnectFailure => "upstream connect failure",
            Reason::CircuitOpen => "circuit open",
            Reason::RateLimited => "rate limited",
            Reason::FaultInjected => "fault injected",
            Reason::BadRequest => "bad request",
            Reason::Denied => "denied by policy",
            Reason::Unauthenticated => "invalid token",
            Reason::NoConfig => "no config from control plane",
            Reason::Draining => "proxy draining",
        }
    }

    /// Envoy's response flag, as Istio's metrics report it.
    pub fn response_flag(self) -> &'static str {
        match self {
            Reason::NoRoute => "NR",
            Reason::NoHealthyUpstream => "UH",
            Reason::UpstreamTimeout => "UT",
            Reason::UpstreamReset => "UR",
            Reason::ConnectFailure => "UF",
            Reason::CircuitOpen => "UO",
            Reason::RateLimited => "RL",
            Reason::FaultInjected => "FI",
            Reason::BadRequest => "DPE",
            Reason::Denied => "RBAC",
            Reason::Unauthenticated => "-",
            Reason::NoConfig => "NC",
            Reason::Draining => "DC",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::NoHealthyUpstream
            | Reason::CircuitOpen
            | Reason::NoConfig
            | Reason::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Reason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::UpstreamReset | Reason::ConnectFailure => StatusCode::SERVICE_UNAVAILABLE,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::FaultInjected => StatusCode::INTERNAL_SERVER_ERROR,
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::Denied => StatusCode::FORBIDDEN,
            Reason::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }

    /// Whether a retry may help (retryOn decides whether one is made).
    pub fn is_retriable_failure(self) -> bool {
        matches!(
            self,
            Reason::UpstreamReset | Reason::ConnectFailure | Reason::UpstreamTimeout
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

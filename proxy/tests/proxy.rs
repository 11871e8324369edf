//! mesh-proxy on real sockets: every traffic feature, resilience, limits,
//! malformed input, config changes and draining.

#[path = "proxy/support.rs"]
mod support;

#[path = "proxy/routing.rs"]
mod routing;

#[path = "proxy/resilience.rs"]
mod resilience;

#[path = "proxy/limits.rs"]
mod limits;

#[path = "proxy/malformed.rs"]
mod malformed;

#[path = "proxy/lifecycle.rs"]
mod lifecycle;

#[path = "proxy/protocols.rs"]
mod protocols;

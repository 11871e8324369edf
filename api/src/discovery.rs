//! The discovery protocol's messages (`proto/mesh/discovery/v1`) and the
//! names both ends agree on. With the `grpc` feature this also holds the
//! generated client and server.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/mesh.discovery.v1.rs"));

/// The proxy's own resource: inbound policy and gateway listeners
/// ([`crate::model::WorkloadResource`]), named `namespace/workload`.
pub const WORKLOAD: &str = "type.mesh.dev/mesh.v1.Workload";
/// One outbound destination ([`crate::model::DestinationConfig`]), named
/// `host:port` as the proxy saw it.
pub const DESTINATION: &str = "type.mesh.dev/mesh.v1.Destination";
/// One upstream cluster ([`crate::model::Cluster`]), named by its cluster
/// name; sent for what the other resources route to.
pub const CLUSTER: &str = "type.mesh.dev/mesh.v1.Cluster";

/// The type URLs in the order pilot sends them, so that what a resource
/// routes to is known before it arrives.
pub const TYPES: [&str; 3] = [CLUSTER, WORKLOAD, DESTINATION];

/// The short name of a type URL, for metrics and status (`Cluster`).
pub fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

//! The certificate authority's protocol (`proto/mesh/ca/v1`) and the
//! workload identities it certifies. With the `grpc` feature this also
//! holds the generated client and server.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/mesh.ca.v1.rs"));

/// The SPIFFE ID of a service account: `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

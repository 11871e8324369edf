//! The CustomResourceDefinitions of every mesh kind, generated from the
//! types; `manifests/crds/` holds them as YAML, and a test keeps the two
//! equal (`MESH_UPDATE_GOLDEN=1 cargo test -p mesh-api --test crds`
//! rewrites them).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

use crate::networking::{
    DestinationRule, Gateway, RateLimitPolicy, ServiceEntry, Sidecar, VirtualService, WorkloadEntry,
};
use crate::resource::Kind;
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

/// The CRD of one kind, with a structural schema the API server accepts.
pub fn crd(kind: Kind) -> CustomResourceDefinition {
    let raw = match kind {
        Kind::VirtualService => VirtualService::crd(),
        Kind::DestinationRule => DestinationRule::crd(),
        Kind::Gateway => Gateway::crd(),
        Kind::ServiceEntry => ServiceEntry::crd(),
        Kind::Sidecar => Sidecar::crd(),
        Kind::WorkloadEntry => WorkloadEntry::crd(),
        Kind::RateLimitPolicy => RateLimitPolicy::crd(),
        Kind::PeerAuthentication => PeerAuthentication::crd(),
        Kind::AuthorizationPolicy => AuthorizationPolicy::crd(),
        Kind::RequestAuthentication => RequestAuthentication::crd(),
    };
    let mut value = serde_json::to_value(&raw).unwrap_or(Value::Null);
    if let Some(versions) = value
        .pointer_mut("/spec/versions")
        .and_then(Value::as_array_mut)
    {
        for v in versions {
            if let Some(schema) = v.pointer_mut("/schema/openAPIV3Schema") {
                make_structural(schema);
                // The root's description is the spec's: what the kind is for.
                let spec_doc = schema.pointer("/properties/spec/description").cloned();
                if let (Some(doc), Some(obj)) = (spec_doc, schema.as_object_mut()) {
                    obj.insert("description".into(), doc);
                }
            }
        }
    }
    serde_json::from_value(value).unwrap_or(raw)
}

/// Rewrites what JSON Schema allows but a Kubernetes structural schema does
/// not: `patternProperties` (maps keyed by port) become
/// `additionalProperties`, and integer formats Kubernetes does not know
/// (`uint32`, `uint64`) are dropped; their `minimum: 0` stays.
fn make_structural(v: &mut Value) {
    match v {
        Value::Object(obj) => {
            if let Some(Value::Object(pp)) = obj.remove("patternProperties")
                && let Some((_, item)) = pp.into_iter().next()
            {
                obj.insert("additionalProperties".into(), item);
            }
            let drop_format = matches!(
                obj.get("format").and_then(Value::as_str),
                Some("uint" | "uint8" | "uint16" | "uint32" | "uint64")
            );
            if drop_format {
                obj.remove("format");
            }
            for child in obj.values_mut() {
                make_structural(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(make_structural),
        _ => {}
    }
}

/// Every CRD, in [`Kind::ALL`] order.
pub fn all() -> Vec<CustomResourceDefinition> {
    Kind::ALL.into_iter().map(crd).collect()
}

/// The YAML file name a kind's CRD is kept in under `manifests/crds/`.
pub fn file_name(kind: Kind) -> String {
    format!("{}.{}.yaml", kind.plural(), kind.group())
}

/// A CRD as the YAML kept in `manifests/crds/`.
pub fn to_yaml(kind: Kind) -> String {
    let header = "# Generated from the mesh-api types; do not edit.\n# MESH_UPDATE_GOLDEN=1 cargo test -p mesh-api --test crds rewrites it.\n";
    let body = serde_yaml::to_string(&crd(kind)).unwrap_or_default();
    format!("{header}{body}")
}

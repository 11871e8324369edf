//! The CustomResourceDefinitions of every mesh kind, generated from the
//! types; `manifests/crds/` holds them as YAML (a test keeps them equal).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::networking::{
    DestinationRule, Gateway, RateLimitPolicy, ServiceEntry, Sidecar, VirtualService,
};
use crate::resource::Kind;
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

/// The CRD of one kind.
pub fn crd(kind: Kind) -> CustomResourceDefinition {
    match kind {
        Kind::VirtualService => VirtualService::crd(),
        Kind::DestinationRule => DestinationRule::crd(),
        Kind::Gateway => Gateway::crd(),
        Kind::ServiceEntry => ServiceEntry::crd(),
        Kind::Sidecar => Sidecar::crd(),
        Kind::RateLimitPolicy => RateLimitPolicy::crd(),
        Kind::PeerAuthentication => PeerAuthentication::crd(),
        Kind::AuthorizationPolicy => AuthorizationPolicy::crd(),
        Kind::RequestAuthentication => RequestAuthentication::crd(),
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
    let header = "# Generated from the mesh-api types: `meshctl manifest crds` writes it.\n";
    let body = serde_yaml::to_string(&crd(kind)).unwrap_or_default();
    format!("{header}{body}")
}

//! One enum over every config kind the mesh reads, with the identity
//! (kind, namespace, name) that problems and the config store key on.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::networking::{
    DestinationRule, Gateway, RateLimitPolicy, ServiceEntry, Sidecar, VirtualService, WorkloadEntry,
};
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

/// Namespace of resources read without one (files, `meshctl apply`).
pub const DEFAULT_NAMESPACE: &str = "default";
/// The control-plane namespace; policies there apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "mesh-system";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Every kind of mesh config resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    Gateway,
    ServiceEntry,
    Sidecar,
    WorkloadEntry,
    RateLimitPolicy,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Gateway,
        Kind::ServiceEntry,
        Kind::Sidecar,
        Kind::WorkloadEntry,
        Kind::RateLimitPolicy,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::Sidecar => "Sidecar",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::RateLimitPolicy => "RateLimitPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            Kind::PeerAuthentication | Kind::AuthorizationPolicy | Kind::RequestAuthentication => {
                crate::security::GROUP
            }
            _ => crate::networking::GROUP,
        }
    }

    pub fn api_version(self) -> &'static str {
        match self.group() {
            crate::security::GROUP => "security.mesh.dev/v1",
            _ => "networking.mesh.dev/v1",
        }
    }

    /// The API resource, for kube's dynamic API.
    pub fn api_resource(self) -> kube::core::ApiResource {
        let (group, version) = self.api_version().split_once('/').unwrap_or_default();
        kube::core::ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: self.api_version().into(),
            kind: self.name().into(),
            plural: self.plural().into(),
        }
    }

    /// Lower-case plural, as in the CRD and `meshctl get`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::VirtualService => "virtualservices",
            Kind::DestinationRule => "destinationrules",
            Kind::Gateway => "gateways",
            Kind::ServiceEntry => "serviceentries",
            Kind::Sidecar => "sidecars",
            Kind::WorkloadEntry => "workloadentries",
            Kind::RateLimitPolicy => "ratelimitpolicies",
            Kind::PeerAuthentication => "peerauthentications",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::RequestAuthentication => "requestauthentications",
        }
    }

    pub fn short_name(self) -> Option<&'static str> {
        match self {
            Kind::VirtualService => Some("vs"),
            Kind::DestinationRule => Some("dr"),
            Kind::Gateway => Some("gw"),
            Kind::ServiceEntry => Some("se"),
            Kind::Sidecar => None,
            Kind::WorkloadEntry => Some("we"),
            Kind::RateLimitPolicy => Some("rlp"),
            Kind::PeerAuthentication => Some("pa"),
            Kind::AuthorizationPolicy => Some("ap"),
            Kind::RequestAuthentication => Some("ra"),
        }
    }

    /// Finds a kind by its name, plural, singular or short name, any case
    /// (`VirtualService`, `virtualservices`, `vs`).
    pub fn lookup(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            k.name().eq_ignore_ascii_case(&s) || k.plural() == s || k.short_name() == Some(&s)
        })
    }

    /// The kind named by `kind:` in a document of a mesh or Istio group.
    pub fn from_kind_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mesh config resource of any kind.
#[allow(clippy::large_enum_variant)] // config objects, not on a data path
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    Gateway(Gateway),
    ServiceEntry(ServiceEntry),
    Sidecar(Sidecar),
    WorkloadEntry(WorkloadEntry),
    RateLimitPolicy(RateLimitPolicy),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    RequestAuthentication(RequestAuthentication),
}

macro_rules! each_resource {
    ($self:expr, $r:ident => $e:expr) => {
        match $self {
            Resource::VirtualService($r) => $e,
            Resource::DestinationRule($r) => $e,
            Resource::Gateway($r) => $e,
            Resource::ServiceEntry($r) => $e,
            Resource::Sidecar($r) => $e,
            Resource::WorkloadEntry($r) => $e,
            Resource::RateLimitPolicy($r) => $e,
            Resource::PeerAuthentication($r) => $e,
            Resource::AuthorizationPolicy($r) => $e,
            Resource::RequestAuthentication($r) => $e,
        }
    };
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::VirtualService(_) => Kind::VirtualService,
            Resource::DestinationRule(_) => Kind::DestinationRule,
            Resource::Gateway(_) => Kind::Gateway,
            Resource::ServiceEntry(_) => Kind::ServiceEntry,
            Resource::Sidecar(_) => Kind::Sidecar,
            Resource::WorkloadEntry(_) => Kind::WorkloadEntry,
            Resource::RateLimitPolicy(_) => Kind::RateLimitPolicy,
            Resource::PeerAuthentication(_) => Kind::PeerAuthentication,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::RequestAuthentication(_) => Kind::RequestAuthentication,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        each_resource!(self, r => &r.metadata)
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        each_resource!(self, r => &mut r.metadata)
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    /// The namespace, `default` when the resource names none.
    pub fn namespace(&self) -> &str {
        self.metadata()
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind(),
            namespace: self.namespace().to_string(),
            name: self.name().to_string(),
        }
    }

    /// The resource as a JSON value (with apiVersion and kind).
    pub fn to_json(&self) -> serde_json::Value {
        // Serializing these plain data types cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Identifies one resource: kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

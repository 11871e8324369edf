//! The mesh's config API: resource types (`networking.mesh.dev/v1`,
//! `security.mesh.dev/v1`), reading them from YAML, conversion from Istio's
//! apiVersions and legacy RouteRules, validation, the CRDs, the compiled
//! proxy-config model and the discovery protocol that carries it.

pub mod analysis;
pub mod ca;
pub mod capture;
pub mod convert;
pub mod crd;
pub mod discovery;
pub mod duration;
pub mod legacy;
pub mod load;
pub mod model;
pub mod networking;
pub mod resource;
pub mod security;
pub mod selector;
pub mod sync;
pub mod validate;

pub use duration::Duration;
pub use resource::{Kind, Resource, ResourceKey};

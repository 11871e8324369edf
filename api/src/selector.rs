//! Selectors shared by networking and security resources.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Selects workloads (pods) by label; every label must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// True when every label of the selector is on the workload.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }

    /// `app=reviews,version=v2`
    pub fn describe(&self) -> String {
        self.match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A port number used as a map key (`portLevelMtls: {8080: …}`). YAML
/// writes it as an integer, JSON as a string: both are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey(pub u32);

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for PortKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // JSON object keys are strings; YAML accepts either.
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortKey, E> {
                u32::try_from(v)
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("port {v} is out of range")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortKey, E> {
                u32::try_from(v)
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("port {v} is out of range")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortKey, E> {
                v.parse()
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("{v:?} is not a port number")))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for PortKey {
    fn schema_name() -> Cow<'static, str> {
        "PortKey".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string" })
    }
}

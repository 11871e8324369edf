//! What pilot reports about each connected proxy (`/debug/syncz`), and
//! what `meshctl proxy-status` reads.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether a proxy runs what pilot sent it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncState {
    /// Every resource sent was acknowledged.
    Synced,
    /// Something sent is not acknowledged yet.
    #[default]
    Stale,
    /// The proxy rejected something and runs its previous version.
    Nacked,
}

impl fmt::Display for SyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::Nacked => "NACKED",
        })
    }
}

/// One connected proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// The proxy's id (`pod.namespace`).
    pub proxy: String,
    /// `namespace/workload`.
    pub workload: String,
    pub mode: String,
    pub proxy_version: String,
    /// Unix seconds.
    pub connected_at: u64,
    pub state: SyncState,
    /// Where pilot reads the proxy's metrics (host:port), if it said.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metrics_addr: String,
    /// Destinations it subscribed to.
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Per `Type/name`: what was sent, acknowledged or rejected.
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceStatus>,
}

/// One resource of one proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// Empty when pilot told the proxy it does not exist.
    pub sent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<String>,
    /// The proxy's error for the version it rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nack: Option<String>,
}

impl ResourceStatus {
    pub fn state(&self) -> SyncState {
        if self.nack.is_some() {
            SyncState::Nacked
        } else if self.acked.as_deref() == Some(self.sent.as_str()) {
            SyncState::Synced
        } else {
            SyncState::Stale
        }
    }
}

impl ProxyStatus {
    /// The worst state of its resources (or of those of one type, named by
    /// the `Type/` prefix of their keys).
    pub fn state_of(&self, type_prefix: Option<&str>) -> Option<SyncState> {
        self.resources
            .iter()
            .filter(|(k, _)| {
                type_prefix.is_none_or(|t| k.strip_prefix(t).is_some_and(|r| r.starts_with('/')))
            })
            .map(|(_, r)| r.state())
            .max_by_key(|s| match s {
                SyncState::Synced => 0,
                SyncState::Stale => 1,
                SyncState::Nacked => 2,
            })
    }

    /// Recomputes [`ProxyStatus::state`] from the resources.
    pub fn refresh_state(&mut self) {
        self.state = self.state_of(None).unwrap_or(SyncState::Synced);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_resource_decides() {
        let mut p = ProxyStatus::default();
        let r = |sent: &str, acked: Option<&str>, nack: Option<&str>| ResourceStatus {
            sent: sent.into(),
            acked: acked.map(Into::into),
            nack: nack.map(Into::into),
        };
        p.resources
            .insert("Cluster/a".into(), r("1", Some("1"), None));
        p.refresh_state();
        assert_eq!(p.state, SyncState::Synced);
        p.resources
            .insert("Destination/b:80".into(), r("2", Some("1"), None));
        p.refresh_state();
        assert_eq!(p.state, SyncState::Stale);
        assert_eq!(p.state_of(Some("Cluster")), Some(SyncState::Synced));
        assert_eq!(p.state_of(Some("Workload")), None);
        p.resources
            .insert("Cluster/c".into(), r("3", Some("1"), Some("bad")));
        p.refresh_state();
        assert_eq!(p.state, SyncState::Nacked);
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"state\":\"NACKED\""), "{json}");
        assert_eq!(serde_json::from_str::<ProxyStatus>(&json).unwrap(), p);
    }
}

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::compile::tests::inputs;
use crate::registry::{ObjectKey, Workload};

const TWO_SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {selector: {app: a}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {selector: {app: b}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: a-1}
spec: {address: 10.1.0.1, labels: {app: a}}
"#;

fn store() -> Store {
    let s = Store::new(
        MeshSettings::default(),
        Debounce::default(),
        crate::metrics::Metrics::new(),
    );
    let i = inputs(TWO_SERVICES);
    s.update(|x| *x = i);
    std::mem::take(&mut *s.pending.lock().unwrap());
    s.recompute(
        &Change {
            kinds: [mesh_api::Kind::VirtualService].into(),
            ..Default::default()
        },
        None,
    );
    s
}

fn versions(s: &Store) -> Vec<(String, Arc<str>)> {
    let c = s.read();
    let mut v: Vec<_> = c
        .destinations
        .iter()
        .chain(c.clusters.iter())
        .map(|(k, b)| (k.clone(), b.version.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn an_endpoint_change_rebuilds_only_that_service() {
    let s = store();
    let before = versions(&s);
    assert_eq!(before.len(), 4, "{before:?}");
    let w = Workload {
        key: ObjectKey::new("default", "b-1"),
        address: "10.1.0.2".parse().unwrap(),
        labels: [("app".to_string(), "b".to_string())].into(),
        service_account: "b".into(),
        ports: Default::default(),
        weight: 1,
        locality: None,
        ready: true,
    };
    let mut generation = s.subscribe();
    s.update(|i| {
        i.workloads.insert(w.key.clone(), Arc::new(w));
    });
    let change = {
        let mut p = s.pending.lock().unwrap();
        std::mem::take(&mut p.0)
    };
    assert_eq!(
        change.hosts.iter().collect::<Vec<_>>(),
        vec!["b.default.svc.cluster.local"]
    );
    s.recompute(&change, Some(Instant::now()));
    assert!(generation.has_changed().unwrap());
    generation.borrow_and_update();
    let after = versions(&s);
    let changed: Vec<&str> = before
        .iter()
        .zip(&after)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0.as_str())
        .collect();
    // b's cluster has a new endpoint; its route table and all of a's are
    // untouched (same version, nothing to push).
    assert_eq!(changed, vec!["outbound|80||b.default.svc.cluster.local"]);
}

#[test]
fn names_resolve_in_the_proxy_namespace_and_by_address() {
    let s = store();
    let c = s.read();
    assert_eq!(
        c.resolve("a", "default"),
        Some("a.default.svc.cluster.local:80")
    );
    assert_eq!(
        c.resolve("a:80", "default"),
        Some("a.default.svc.cluster.local:80")
    );
    assert_eq!(
        c.resolve("a.default", "other"),
        Some("a.default.svc.cluster.local:80")
    );
    assert_eq!(
        c.resolve("A.default.svc.cluster.local:80", "x"),
        Some("a.default.svc.cluster.local:80")
    );
    assert_eq!(c.resolve("a", "other"), None);
    assert_eq!(c.resolve("a:81", "default"), None);
}

/// A new ready endpoint `n` of service `a`.
fn endpoint_of_a(n: u8) -> Workload {
    Workload {
        key: ObjectKey::new("default", format!("a-extra-{n}")),
        address: std::net::IpAddr::from([10, 2, 0, n]),
        labels: [("app".to_string(), "a".to_string())].into(),
        service_account: "a".into(),
        ports: Default::default(),
        weight: 1,
        locality: None,
        ready: true,
    }
}

fn endpoints_of_a(s: &Store) -> usize {
    let c = s.read();
    let a = &c.clusters["outbound|80||a.default.svc.cluster.local"];
    let cluster: mesh_api::model::Cluster = serde_json::from_slice(&a.body).unwrap();
    cluster.endpoints.len()
}

/// Recomputes published since a starting point.
struct Published {
    generation: watch::Receiver<u64>,
    base: u64,
}

impl Published {
    fn count(&self) -> u64 {
        *self.generation.borrow() - self.base
    }

    async fn at_least(&mut self, n: u64) {
        let want = self.base + n;
        self.generation.wait_for(|g| *g >= want).await.unwrap();
    }
}

/// The store's loop running, and the recomputes it publishes from now.
fn running_store() -> (Arc<Store>, Published) {
    let s = Arc::new(store());
    let generation = s.subscribe();
    let base = *generation.borrow();
    tokio::spawn(s.clone().run());
    (s, Published { generation, base })
}

// Tokio's paused clock: time moves only when every task waits, straight to
// the next timer, so the debounce is checked to the millisecond without
// depending on how fast this machine is.

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_becomes_one_recompute() {
    let (s, mut published) = running_store();
    let debounce = Debounce::default();
    // Eight changes 1 ms apart, arriving while the loop runs: each comes
    // within the quiet time of the one before, all within the maximum.
    let start = tokio::time::Instant::now();
    for n in 0..8u8 {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(published.count(), 0, "published mid-burst at change {n}");
        let w = endpoint_of_a(n);
        s.update(|i| {
            i.workloads.insert(w.key.clone(), Arc::new(w));
        });
    }
    let last = tokio::time::Instant::now();
    assert_eq!(last - start, Duration::from_millis(7));
    published.at_least(1).await;
    // Published once the burst went quiet.
    assert_eq!(tokio::time::Instant::now() - last, debounce.quiet);
    // Long after, still one recompute, with every change in it.
    tokio::time::sleep(debounce.max * 10).await;
    assert_eq!(published.count(), 1);
    assert_eq!(endpoints_of_a(&s), 9);
}

#[tokio::test(start_paused = true)]
async fn a_single_change_is_published_after_the_quiet_time() {
    let (s, mut published) = running_store();
    let debounce = Debounce::default();
    let start = tokio::time::Instant::now();
    let w = endpoint_of_a(1);
    s.update(|i| {
        i.workloads.insert(w.key.clone(), Arc::new(w));
    });
    published.at_least(1).await;
    let took = tokio::time::Instant::now() - start;
    assert_eq!(took, debounce.quiet);
    assert!(took <= debounce.max);
    assert_eq!(endpoints_of_a(&s), 2);
    tokio::time::sleep(debounce.max * 10).await;
    assert_eq!(published.count(), 1, "one change, one recompute");
}

#[tokio::test(start_paused = true)]
async fn changes_that_never_pause_are_published_at_the_debounce_maximum() {
    let (s, mut published) = running_store();
    let debounce = Debounce::default();
    let start = tokio::time::Instant::now();
    let mut published_at = Vec::new();
    let mut seen = 0;
    // A change every millisecond for 30 ms: never quiet, so each burst
    // ends at the maximum.
    for n in 0..30u8 {
        let w = endpoint_of_a(n);
        s.update(|i| {
            i.workloads.insert(w.key.clone(), Arc::new(w));
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let g = published.count();
        if g != seen {
            seen = g;
            published_at.push(tokio::time::Instant::now() - start);
        }
    }
    assert!(!published_at.is_empty());
    assert!(
        published_at[0] <= debounce.max + Duration::from_millis(1),
        "first publish after {:?}",
        published_at[0]
    );
    // Every change is in: after the last burst settles, all 31 endpoints.
    let before = published.count();
    if endpoints_of_a(&s) != 31 {
        published.at_least(before + 1).await;
    }
    assert_eq!(endpoints_of_a(&s), 31);
    // About one recompute per debounce maximum, not one per change.
    let recomputes = published.count();
    assert!(
        (3..=5).contains(&recomputes),
        "{recomputes} recomputes for 30 changes"
    );
}

/// Applies `f` to the inputs and recomputes what it changed, as the
/// store's loop would; returns what the recompute changed.
fn step(s: &Store, f: impl FnOnce(&mut Inputs)) -> Arc<Changed> {
    let generation = *s.subscribe().borrow();
    s.update(f);
    let (change, since) = std::mem::take(&mut *s.pending.lock().unwrap());
    s.recompute(&change, since);
    let (changes, _) = s.changes_since(generation).unwrap();
    assert_eq!(changes.len(), 1);
    changes[0].clone()
}

/// Every compiled resource with its version, and the address map.
type Snapshot = (Vec<(String, Arc<str>)>, Vec<(SocketAddr, String)>);

fn snapshot(s: &Store) -> Snapshot {
    let mut by_ip: Vec<_> = s
        .read()
        .by_ip
        .iter()
        .map(|(a, k)| (*a, k.clone()))
        .collect();
    by_ip.sort();
    (versions(s), by_ip)
}

#[test]
fn incremental_recomputes_end_where_a_full_one_does() {
    let s = store();
    let more = inputs(
        r#"
apiVersion: v1
kind: Service
metadata: {name: c}
spec: {clusterIP: 10.96.0.3, selector: {app: c}, ports: [{name: http, port: 80}, {name: grpc, port: 90}]}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: c-1}
spec: {address: 10.1.0.3, labels: {app: c, version: v1}}
---
apiVersion: networking.mesh.dev/v1
kind: DestinationRule
metadata: {name: b}
spec: {host: b, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.mesh.dev/v1
kind: VirtualService
metadata: {name: b}
spec: {hosts: [b], http: [{route: [{destination: {host: b, subset: v1}}]}]}
"#,
    );
    let svc_c = more.services.values().next().unwrap().clone();
    // A new service: its destinations, cluster and addresses, by name.
    let changed = step(&s, |i| {
        i.services.insert(svc_c.key.clone(), svc_c.clone());
    });
    assert!(changed.names);
    assert_eq!(changed.destinations.len(), 2);
    assert_eq!(
        s.read().resolve("10.96.0.3:90", "default"),
        Some("c.default.svc.cluster.local:90")
    );
    // Its endpoint: only its clusters change.
    let changed = step(&s, |i| i.workloads.extend(more.workloads.clone()));
    assert!(!changed.names);
    assert!(changed.destinations.is_empty());
    let mut clusters = changed.clusters.clone();
    clusters.sort();
    assert_eq!(
        clusters,
        [
            "outbound|80||c.default.svc.cluster.local",
            "outbound|90||c.default.svc.cluster.local"
        ]
    );
    // A subset routed to: its cluster appears; service a goes with its
    // cluster and address.
    step(&s, |i| i.config.extend(more.config.clone()));
    assert!(
        s.read()
            .clusters
            .contains_key("outbound|80|v1|b.default.svc.cluster.local")
    );
    let changed = step(&s, |i| {
        i.services.remove(&ObjectKey::new("default", "a"));
    });
    assert!(changed.names);
    assert!(
        !s.read()
            .clusters
            .contains_key("outbound|80||a.default.svc.cluster.local")
    );
    // The route to the subset goes: so does its cluster.
    step(&s, |i| {
        i.config
            .retain(|k, _| k.kind != mesh_api::Kind::VirtualService);
    });
    assert!(
        !s.read()
            .clusters
            .contains_key("outbound|80|v1|b.default.svc.cluster.local")
    );

    // The same inputs compiled from scratch.
    let fresh = Store::new(
        MeshSettings::default(),
        Debounce::default(),
        crate::metrics::Metrics::new(),
    );
    let all = s.inputs();
    fresh.update(|i| *i = (*all).clone());
    std::mem::take(&mut *fresh.pending.lock().unwrap());
    fresh.recompute(
        &Change {
            kinds: [mesh_api::Kind::VirtualService].into(),
            ..Default::default()
        },
        None,
    );
    assert_eq!(snapshot(&s), snapshot(&fresh));
}

use std::sync::Arc;

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

#[tokio::test]
async fn a_burst_of_changes_becomes_one_recompute() {
    let s = Arc::new(store());
    let mut generation = s.subscribe();
    generation.borrow_and_update();
    tokio::spawn(s.clone().run());
    for n in 0..20u8 {
        s.update(|i| {
            let w = Workload {
                key: ObjectKey::new("default", format!("a-burst-{n}")),
                address: std::net::IpAddr::from([10, 2, 0, n]),
                labels: [("app".to_string(), "a".to_string())].into(),
                service_account: "a".into(),
                ports: Default::default(),
                weight: 1,
                locality: None,
                ready: true,
            };
            i.workloads.insert(w.key.clone(), Arc::new(w));
        });
    }
    generation.changed().await.unwrap();
    let first = *generation.borrow_and_update();
    // No second recompute follows: all 20 were in the first.
    let more =
        tokio::time::timeout(std::time::Duration::from_millis(50), generation.changed()).await;
    assert!(more.is_err(), "a second push after generation {first}");
    let c = s.read();
    let a = &c.clusters["outbound|80||a.default.svc.cluster.local"];
    let cluster: mesh_api::model::Cluster = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(cluster.endpoints.len(), 21);
}

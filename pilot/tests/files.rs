//! The files source: what it reads, what it rejects, that a bad edit
//! never replaces the last valid version, and its watch loop picking up
//! edits. And the binary's refusals.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_api::{Kind, ResourceKey};
use mesh_pilot::registry::{Inputs, ObjectKey};
use mesh_pilot::source::{Files, Rejected, merge_last_good};
use mesh_pilot::{Config, Debounce, MeshSettings};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-pilot-files-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files(d: &std::path::Path) -> Files {
    Files {
        path: d.to_path_buf(),
        interval: Duration::from_millis(10),
    }
}

const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: reviews-v1}
spec: {address: 10.1.0.1, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}]}]
---
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: ratings-default}
spec:
  destination: {name: ratings}
  route: [{labels: {version: v1}}]
"#;

#[test]
fn services_workloads_mesh_istio_and_legacy_resources_are_read() {
    let d = dir("read");
    std::fs::write(d.join("all.yaml"), GOOD).unwrap();
    let loaded = files(&d).load().unwrap();
    assert_eq!(loaded.errors, Vec::<String>::new());
    let i = &loaded.inputs;
    assert!(
        i.services
            .contains_key(&ObjectKey::new("default", "reviews"))
    );
    assert!(
        i.workloads
            .contains_key(&ObjectKey::new("default", "reviews-v1"))
    );
    let kinds: Vec<String> = i.config.keys().map(|k| k.to_string()).collect();
    assert!(
        kinds.contains(&"VirtualService default/reviews".to_string()),
        "{kinds:?}"
    );
    // The RouteRule became a VirtualService and a DestinationRule.
    assert!(
        kinds
            .iter()
            .any(|k| k.starts_with("DestinationRule default/")),
        "{kinds:?}"
    );
}

#[test]
fn an_invalid_edit_is_rejected_with_the_analyzer_message_and_the_last_valid_version_stays() {
    let d = dir("invalid");
    std::fs::write(d.join("all.yaml"), GOOD).unwrap();
    let good = merge_last_good(&Inputs::default(), files(&d).load().unwrap());
    // Weights that do not add up: the analyzer's error, the old VS kept.
    std::fs::write(
        d.join("all.yaml"),
        GOOD.replace(
            "http: [{route: [{destination: {host: reviews}}]}]",
            "http: [{route: [{destination: {host: reviews}, weight: 90}]}]",
        ),
    )
    .unwrap();
    let loaded = files(&d).load().unwrap();
    assert!(
        loaded
            .errors
            .iter()
            .any(|e| e.contains("VirtualService default/reviews") && e.contains("weight")),
        "{:?}",
        loaded.errors
    );
    let next = merge_last_good(&good, loaded);
    assert_eq!(next.config, good.config);

    // A file that is not YAML at all: everything it held stays.
    std::fs::write(d.join("all.yaml"), "kind: [unclosed\n").unwrap();
    let loaded = files(&d).load().unwrap();
    assert!(!loaded.errors.is_empty());
    let next = merge_last_good(&good, loaded);
    assert_eq!(next.config, good.config);
    assert_eq!(next.services, good.services);
    assert_eq!(next.workloads, good.workloads);

    // A bad Service names its field and keeps the old one.
    std::fs::write(
        d.join("all.yaml"),
        GOOD.replace("port: 9080", "port: 90800"),
    )
    .unwrap();
    let loaded = files(&d).load().unwrap();
    assert!(
        loaded
            .errors
            .iter()
            .any(|e| e.contains("spec.ports[0].port")),
        "{:?}",
        loaded.errors
    );
    let next = merge_last_good(&good, loaded);
    assert_eq!(next.services, good.services);

    // A Service that is not even a Service (a port that is not a number)
    // is rejected by name and keeps its last valid version.
    std::fs::write(d.join("all.yaml"), GOOD.replace("port: 9080", "port: abc")).unwrap();
    let loaded = files(&d).load().unwrap();
    assert!(
        loaded
            .errors
            .iter()
            .any(|e| e.contains("Service default/reviews") && e.contains("invalid")),
        "{:?}",
        loaded.errors
    );
    assert_eq!(
        loaded
            .rejected
            .iter()
            .map(|r| &r.object)
            .collect::<Vec<_>>(),
        [&Rejected::Service(ObjectKey::new("default", "reviews"))]
    );
    let next = merge_last_good(&good, loaded);
    assert_eq!(next.services, good.services);
    assert_eq!(next.config, good.config);

    // A mesh resource of the wrong shape is rejected by name too: it keeps
    // its last valid version, while a WorkloadEntry deleted in the same
    // edit goes.
    let edited = GOOD
        .replace(
            "http: [{route: [{destination: {host: reviews}}]}]",
            "http: 5",
        )
        .replace(
            "kind: WorkloadEntry\nmetadata: {name: reviews-v1}",
            "kind: WorkloadEntry\nmetadata: {name: reviews-v2}",
        );
    std::fs::write(d.join("all.yaml"), edited).unwrap();
    let loaded = files(&d).load().unwrap();
    assert_eq!(
        loaded
            .rejected
            .iter()
            .map(|r| &r.object)
            .collect::<Vec<_>>(),
        [&Rejected::Config(ResourceKey {
            kind: Kind::VirtualService,
            namespace: "default".into(),
            name: "reviews".into(),
        })],
        "{:?}",
        loaded.errors
    );
    let next = merge_last_good(&good, loaded);
    assert_eq!(next.config, good.config);
    let workloads: Vec<String> = next.workloads.keys().map(|k| k.to_string()).collect();
    assert_eq!(workloads, ["default/reviews-v2"]);
}

/// A counter or gauge of pilot's metrics, 0 when absent.
fn metric(running: &mesh_pilot::Running, series: &str) -> f64 {
    let text = running.pilot.metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Polls `check` until it holds, or fails saying what it waited for.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn port_of(running: &mesh_pilot::Running, name: &str) -> Option<u16> {
    let inputs = running.pilot.store.inputs();
    Some(inputs.services.get(&ObjectKey::new("default", name))?.ports[0].port)
}

const REJECTED: &str = "pilot_config_rejected_total{kind=\"Service\"}";
const REJECTED_NOW: &str = "pilot_config_rejected_objects{kind=\"Service\"}";

#[tokio::test]
async fn the_watch_loop_applies_edits_and_keeps_the_last_good_version_of_invalid_ones() {
    let d = dir("watch");
    std::fs::write(d.join("all.yaml"), GOOD).unwrap();
    let cfg = Config {
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        mesh: MeshSettings::default(),
        debounce: Debounce::default(),
    };
    let running = mesh_pilot::start(cfg, files(&d)).await.unwrap();
    let r = &running;
    eventually("the first load", || port_of(r, "reviews") == Some(9080)).await;
    assert!(*running.pilot.ready.borrow());

    // A valid change in a new file is seen.
    let ratings = |port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: ratings}}\nspec: {{selector: {{app: ratings}}, ports: [{{name: http, port: {port}}}]}}\n"
        )
    };
    std::fs::write(d.join("ratings.yaml"), ratings("9080")).unwrap();
    eventually("ratings added", || port_of(r, "ratings") == Some(9080)).await;
    assert_eq!(metric(r, REJECTED), 0.0);

    // An invalid edit: rejected and counted, the last good version stays.
    std::fs::write(d.join("all.yaml"), GOOD.replace("port: 9080", "port: abc")).unwrap();
    eventually("the bad Service counted", || metric(r, REJECTED) == 1.0).await;
    assert_eq!(metric(r, REJECTED_NOW), 1.0);
    assert_eq!(port_of(r, "reviews"), Some(9080));
    assert!(
        running
            .pilot
            .store
            .inputs()
            .workloads
            .contains_key(&ObjectKey::new("default", "reviews-v1"))
    );

    // Another file changes: the still invalid Service is read again but
    // is the same rejection, not a new one.
    std::fs::write(d.join("ratings.yaml"), ratings("19080")).unwrap();
    eventually("ratings changed", || port_of(r, "ratings") == Some(19080)).await;
    assert_eq!(metric(r, REJECTED), 1.0);
    assert_eq!(metric(r, REJECTED_NOW), 1.0);
    assert_eq!(port_of(r, "reviews"), Some(9080));

    // Invalid in a different way: a new rejection.
    std::fs::write(d.join("all.yaml"), GOOD.replace("port: 9080", "port: wxyz")).unwrap();
    eventually("the second bad version counted", || {
        metric(r, REJECTED) == 2.0
    })
    .await;
    assert_eq!(port_of(r, "reviews"), Some(9080));

    // Fixed: applied, and nothing is rejected any more. (Each edit of a
    // file changes its size, so the reload does not depend on the file
    // system's time resolution.)
    std::fs::write(
        d.join("all.yaml"),
        GOOD.replace("port: 9080", "port: 19090"),
    )
    .unwrap();
    eventually("the fix applied", || port_of(r, "reviews") == Some(19090)).await;
    assert_eq!(metric(r, REJECTED_NOW), 0.0);
    assert_eq!(metric(r, REJECTED), 2.0);
    drop(running);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_binary_refuses_to_start_without_a_source() {
    // No directory and no cluster: neither in-cluster nor a kubeconfig.
    let home = std::env::temp_dir().join(format!("mesh-pilot-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-pilot"))
        .args(["--xds-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env_remove("MESH_CONFIG_DIR")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", &home)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&home);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config-dir"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-pilot"))
        .args(["--config-dir", "/nonexistent/mesh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/mesh"));
}

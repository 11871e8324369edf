//! The files source: what it reads, what it rejects, and that a bad edit
//! never replaces the last valid version. And the binary's refusals.

use std::path::PathBuf;
use std::time::Duration;

use mesh_pilot::registry::{Inputs, ObjectKey};
use mesh_pilot::source::{Files, merge_last_good};

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

//! `meshctl` as a user runs it: exit codes, output formats, stdin.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn meshctl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn analyze_clean_config_exits_zero() {
    let o = meshctl(
        &[
            "analyze",
            "-f",
            "samples/bookinfo/networking/destination-rule-all.yaml",
            "-f",
            "samples/bookinfo/networking/virtual-service-reviews-80-20.yaml",
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o), "");
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("no problems found in 5 resource(s) from 2 file(s)")
    );
}

#[test]
fn analyze_reports_one_line_per_problem_and_fails() {
    let o = meshctl(
        &[
            "analyze",
            "-f",
            "api/tests/corpus/invalid/virtual-service-routes.yaml",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 12, "{out}");
    assert!(out.contains(
        "api/tests/corpus/invalid/virtual-service-routes.yaml:26: error: VirtualService default/reviews: spec.http[0].route: weights must add up to 100, got 90\n"
    ));
}

#[test]
fn analyze_json_output() {
    let o = meshctl(
        &["analyze", "-o", "json", "-f", "-"],
        Some(
            "apiVersion: networking.mesh.dev/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {host: r}\n      weight: 50\n",
        ),
    );
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{
            "severity": "error",
            "file": "-",
            "line": 1,
            "resource": "VirtualService default/r",
            "path": "spec.http[0].route",
            "message": "weights must add up to 100, got 50"
        }])
    );
}

#[test]
fn analyze_reads_a_directory_recursively() {
    let o = meshctl(&["analyze", "-f", "api/tests/corpus/valid"], None);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn analyze_missing_file_is_a_clear_error() {
    let o = meshctl(&["analyze", "-f", "no/such/file.yaml"], None);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no/such/file.yaml"), "{err}");
}

#[test]
fn convert_keeps_order_and_rewrites_istio() {
    let input = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {name: a}\nspec:\n  host: a\n  subsets: [{name: v1, labels: {version: v1}}]\n---\napiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nmetadata: {name: a}\nspec:\n  destination: {name: a}\n  route: [{labels: {version: v1}}]\n";
    let o = meshctl(&["convert", "-f", "-"], Some(input));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    let kinds: Vec<&str> = out.lines().filter(|l| l.starts_with("kind: ")).collect();
    assert_eq!(
        kinds,
        [
            "kind: Service",
            "kind: DestinationRule",
            "kind: DestinationRule",
            "kind: VirtualService"
        ]
    );
    assert!(!out.contains("istio.io"), "{out}");
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("v1 Service a: not a mesh resource; passed through unchanged")
    );
    // What convert prints passes analyze, once the duplicate DestinationRule
    // (the Istio one and the one made from the RouteRule share a name) is
    // accounted for.
    let again = meshctl(&["analyze", "-f", "-"], Some(&out));
    let findings = stdout(&again);
    assert_eq!(findings.lines().count(), 1, "{findings}");
    assert!(
        findings.contains("DestinationRule default/a: defined again"),
        "{findings}"
    );
}

#[test]
fn version_and_completion() {
    let o = meshctl(&["version", "--short"], None);
    assert_eq!(stdout(&o).trim(), env!("CARGO_PKG_VERSION"));
    let o = meshctl(&["completion", "bash"], None);
    assert!(o.status.success());
    assert!(stdout(&o).contains("meshctl"));
}

#[test]
fn kube_inject_injects_workloads_and_keeps_everything_else_in_order() {
    let o = meshctl(
        &[
            "kube-inject",
            "--offline",
            "-f",
            "samples/bookinfo/platform/bookinfo.yaml",
            "-f",
            "samples/callme/platform/callme.yaml",
        ],
        None,
    );
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"ServiceAccount"));
    let deployments: Vec<&serde_yaml::Value> =
        docs.iter().filter(|d| d["kind"] == "Deployment").collect();
    assert_eq!(deployments.len(), 9, "{kinds:?}");
    for d in deployments {
        let inits = d["spec"]["template"]["spec"]["initContainers"]
            .as_sequence()
            .unwrap();
        let names: Vec<&str> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names[..2], ["mesh-init", "mesh-proxy"], "{d:?}");
        assert!(
            d["spec"]["template"]["metadata"]["annotations"]["sidecar.mesh.dev/status"]
                .as_str()
                .is_some()
        );
    }
    // Injecting again changes nothing.
    let again = meshctl(&["kube-inject", "--offline", "-f", "-"], Some(&out));
    assert_eq!(stdout(&again), out);
    // Classic sidecars for older clusters (offline: the developer's
    // kubeconfig must not decide the settings).
    let o = meshctl(
        &[
            "kube-inject",
            "--offline",
            "--kubernetes-minor",
            "28",
            "-f",
            "samples/callme/platform/callme.yaml",
        ],
        None,
    );
    assert!(o.status.success(), "{o:?}");
    assert!(
        stdout(&o).contains("- wait"),
        "holds the app until the proxy is ready"
    );
}

#[test]
fn kube_inject_names_the_field_at_fault() {
    let o = meshctl(
        &["kube-inject", "--offline", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x, annotations: {traffic.sidecar.mesh.dev/excludeOutboundPorts: '80,web'}}\nspec: {containers: [{name: a, image: b}]}\n",
        ),
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("document 1 (Pod x): metadata.annotations[traffic.sidecar.mesh.dev/excludeOutboundPorts]: not a port: \"web\""),
        "{err}"
    );
}

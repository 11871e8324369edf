//! The webhook over HTTPS as the API server calls it: real AdmissionReview
//! JSON in, a JSONPatch out that, applied with a JSON-patch library, gives
//! exactly what `meshctl kube-inject` gives, for native and classic
//! sidecars, and keeps fields it does not know. Pods it cannot inject are
//! allowed with a warning; malformed reviews get a 400; a reinvoked review
//! gets the probes of containers added since rewritten; `/ready` and
//! `/metrics` answer; the serving certificate is reloaded when its files
//! change.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_injector::webhook::{self, CertFiles, Webhook};
use mesh_injector::{Cluster, Settings};
use serde_json::{Value, json};

fn self_signed(dir: &Path) -> rcgen::Certificate {
    let ck = rcgen::generate_simple_self_signed(vec!["mesh-injector.mesh-system.svc".to_string()])
        .unwrap();
    let tmp = dir.join("new.crt");
    std::fs::write(&tmp, ck.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::rename(tmp, dir.join("tls.crt")).unwrap();
    ck.cert
}

struct Server {
    addr: std::net::SocketAddr,
    certs: Arc<CertFiles>,
}

async fn start(dir: &Path) -> Server {
    start_for(dir, Cluster { minor: 30 }).await
}

async fn start_for(dir: &Path, cluster: Cluster) -> Server {
    let certs = CertFiles::load(dir.join("tls.crt"), dir.join("tls.key")).unwrap();
    let hook = Arc::new(Webhook {
        settings: Settings::default(),
        cluster,
        metrics: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(webhook::serve_tls(
        listener,
        webhook::tls_config(certs.clone()),
        webhook::router(hook),
    ));
    Server { addr, certs }
}

/// POSTs `body` to `path` over TLS, trusting only `ca`; status and body.
async fn post(
    addr: std::net::SocketAddr,
    ca: &rcgen::Certificate,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    call(addr, ca, hyper::Method::POST, path, body).await
}

/// GETs `path` over TLS; status and body as text.
async fn get(addr: std::net::SocketAddr, ca: &rcgen::Certificate, path: &str) -> (u16, String) {
    let (status, body) = call(addr, ca, hyper::Method::GET, path, Vec::new())
        .await
        .unwrap();
    (status, String::from_utf8(body).unwrap())
}

async fn call(
    addr: std::net::SocketAddr,
    ca: &rcgen::Certificate,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("mesh-injector.mesh-system.svc").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "mesh-injector.mesh-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Ok((status, body))
}

fn review(pod: &Value, namespace: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    }))
    .unwrap()
}

/// The pods of a manifest file (Pods as they are, workloads' templates
/// as their controllers create them), by name.
fn pods_of(file: &str) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join(file)).unwrap();
    let mut pods = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        let template = match v["kind"].as_str() {
            Some("Pod") => v.clone(),
            Some("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job") => {
                v["spec"]["template"].clone()
            }
            Some("CronJob") => v["spec"]["jobTemplate"]["spec"]["template"].clone(),
            _ => continue,
        };
        let mut pod = template;
        pod["apiVersion"] = "v1".into();
        pod["kind"] = "Pod".into();
        pod["metadata"]["name"] = v["metadata"]["name"].clone();
        pods.push(pod);
    }
    pods
}

/// The pods of the samples, as the ReplicaSet controller creates them.
fn sample_pods() -> Vec<Value> {
    let mut pods = pods_of("samples/bookinfo/platform/bookinfo.yaml");
    pods.extend(pods_of("samples/callme/platform/callme.yaml"));
    pods
}

/// Posts `pod` and applies the answer's patch (if any) with a JSON-patch
/// library: the pod as the API server would store it, and the answer.
async fn admit(server: &Server, ca: &rcgen::Certificate, pod: &Value) -> (Value, Value) {
    let (status, body) = post(server.addr, ca, "/inject", review(pod, "default"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = answer["response"].clone();
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    let mut patched = pod.clone();
    if let Some(patch) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        json_patch::patch(&mut patched, &patch).unwrap();
    }
    (patched, response)
}

/// What `meshctl kube-inject` makes of `pod`.
fn kube_inject(pod: &Value, cluster: Cluster) -> Value {
    let manifest = serde_yaml::to_string(pod).unwrap();
    let injected =
        mesh_injector::inject_documents(&manifest, &Settings::default(), cluster).unwrap();
    serde_yaml::from_str(&injected).unwrap()
}

#[tokio::test]
async fn the_patch_gives_what_kube_inject_gives() {
    let dir = std::env::temp_dir().join(format!("mesh-webhook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = self_signed(&dir);
    let pods = sample_pods();
    assert_eq!(pods.len(), 9);
    let tricky = pods_of("injector/tests/golden/tricky.yaml");
    assert!(tricky.len() >= 6, "{}", tricky.len());
    for minor in [30, 28] {
        let cluster = Cluster { minor };
        let server = start_for(&dir, cluster).await;
        let mut injected = 0;
        for pod in pods.iter().chain(&tricky) {
            let name = &pod["metadata"]["name"];
            let (patched, response) = admit(&server, &ca, pod).await;
            injected += usize::from(response["patch"].is_string());
            assert_eq!(patched, kube_inject(pod, cluster), "{name} (1.{minor})");
            let inits = patched["spec"]["initContainers"].as_array();
            let proxy_at = |list: Option<&Vec<Value>>| {
                list.into_iter()
                    .flatten()
                    .position(|c| c["name"] == "mesh-proxy")
            };
            if response["patch"].is_string() && minor >= 29 {
                assert_eq!(proxy_at(inits), Some(1), "{name}");
            } else if response["patch"].is_string() {
                assert_eq!(
                    proxy_at(patched["spec"]["containers"].as_array()),
                    Some(0),
                    "{name}"
                );
            }
        }
        // Samples, probes, nightly, db; not host-net, opted-out, already-injected.
        assert_eq!(injected, 9 + 3, "1.{minor}");
    }
}

#[tokio::test]
async fn fields_unknown_to_the_injector_survive_the_patch() {
    let dir = std::env::temp_dir().join(format!("mesh-webhook-unknown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = self_signed(&dir);
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "future", "labels": {"app": "f"}, "futureMeta": {"k": "v"}},
        "spec": {
            "futureSpecField": {"mode": "fast", "list": [1, 2]},
            "initContainers": [{"name": "setup", "image": "s", "futureContainerField": "keep"}],
            "containers": [{
                "name": "app", "image": "a", "futureContainerField": 42,
                "ports": [{"name": "http", "containerPort": 8080, "futurePortField": true}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "futureProbeField": 1},
            }],
            "volumes": [{"name": "data", "emptyDir": {}, "futureVolumeField": "v"}],
        },
    });
    for minor in [30, 28] {
        let server = start_for(&dir, Cluster { minor }).await;
        let (patched, response) = admit(&server, &ca, &pod).await;
        assert!(response["patch"].is_string());
        let spec = &patched["spec"];
        assert_eq!(patched["metadata"]["futureMeta"], json!({"k": "v"}));
        assert_eq!(spec["futureSpecField"], pod["spec"]["futureSpecField"]);
        let named = |list: &str, name: &str| {
            spec[list]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            named("initContainers", "setup")["futureContainerField"],
            "keep"
        );
        let app = named("containers", "app");
        assert_eq!(app["futureContainerField"], 42);
        assert_eq!(app["ports"][0]["futurePortField"], true);
        assert_eq!(app["readinessProbe"]["futureProbeField"], 1);
        assert_eq!(app["readinessProbe"]["httpGet"]["port"], 15020);
        assert_eq!(named("volumes", "data")["futureVolumeField"], "v");
        // The injected containers carry none of them.
        for c in spec["initContainers"].as_array().unwrap() {
            if c["name"] != "setup" {
                assert!(c.get("futureContainerField").is_none(), "{c}");
            }
        }
        // kube-inject keeps them too.
        assert_eq!(patched, kube_inject(&pod, Cluster { minor }));
    }
}

#[tokio::test]
async fn a_reinvoked_review_rewrites_probes_of_containers_added_since() {
    let dir = std::env::temp_dir().join(format!("mesh-webhook-again-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = self_signed(&dir);
    let server = start(&dir).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "r"},
                     "spec": {"containers": [{"name": "a", "image": "b"}]}});
    let (injected, _) = admit(&server, &ca, &pod).await;
    // Reinvoked with nothing new: no patch.
    let (same, response) = admit(&server, &ca, &injected).await;
    assert!(
        response["patch"].is_null() && response["warnings"].is_null(),
        "{response}"
    );
    assert_eq!(same, injected);
    // A later webhook added a container with an HTTP probe.
    let mut later = injected.clone();
    later["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "agent", "image": "x",
                     "livenessProbe": {"httpGet": {"path": "/alive", "port": 9000}}}));
    let (patched, response) = admit(&server, &ca, &later).await;
    assert!(response["patch"].is_string(), "{response}");
    let agent = &patched["spec"]["containers"][1];
    assert_eq!(
        agent["livenessProbe"]["httpGet"]["path"],
        "/app-health/agent/livez"
    );
    let proxy = &patched["spec"]["initContainers"][1];
    assert_eq!(proxy["name"], "mesh-proxy");
    let probers = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MESH_APP_PROBERS")
        .unwrap();
    let probers: Value = serde_json::from_str(probers["value"].as_str().unwrap()).unwrap();
    assert_eq!(probers["/app-health/agent/livez"]["port"], 9000);
    assert_eq!(patched["metadata"], later["metadata"]);
    // And once more: nothing left to do.
    let (again, response) = admit(&server, &ca, &patched).await;
    assert!(response["patch"].is_null());
    assert_eq!(again, patched);
}

/// The value of the series `series` (name and labels, as rendered) in
/// Prometheus text; 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn ready_and_metrics_follow_what_the_webhook_did() {
    let dir = std::env::temp_dir().join(format!("mesh-webhook-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = self_signed(&dir);
    let server = start(&dir).await;
    assert_eq!(
        get(server.addr, &ca, "/ready").await,
        (200, "ready\n".to_string())
    );
    let (status, before) = get(server.addr, &ca, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&before, "mesh_injector_injections_total"), 0.0);
    assert_eq!(sample(&before, "mesh_injector_errors_total"), 0.0);

    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "m"},
                     "spec": {"containers": [{"name": "a", "image": "b"}]}});
    admit(&server, &ca, &pod).await;
    admit(&server, &ca, &pod).await;
    let host = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "h"},
                      "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "b"}]}});
    admit(&server, &ca, &host).await;
    let bad = json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "b", "annotations": {"sidecar.mesh.dev/proxyCPU": "1.5.5"}},
                     "spec": {"containers": [{"name": "a", "image": "b"}]}});
    admit(&server, &ca, &bad).await;
    let (status, _) = post(server.addr, &ca, "/inject", b"{".to_vec())
        .await
        .unwrap();
    assert_eq!(status, 400);
    let (status, _) = post(
        server.addr,
        &ca,
        "/inject",
        vec![b' '; webhook::BODY_LIMIT + 1],
    )
    .await
    .unwrap();
    assert_eq!(status, 413);

    let (_, after) = get(server.addr, &ca, "/metrics").await;
    assert_eq!(
        sample(&after, "mesh_injector_injections_total"),
        2.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "mesh_injector_skips_total{reason=\"host_network\"}"),
        1.0,
        "{after}"
    );
    // The refused annotation, the 400 and the 413.
    assert_eq!(sample(&after, "mesh_injector_errors_total"), 3.0, "{after}");
    assert_eq!(
        sample(&after, "mesh_injector_review_seconds_count"),
        4.0,
        "{after}"
    );
}

#[tokio::test]
async fn what_cannot_be_injected_is_allowed_with_a_warning_and_bad_reviews_get_400() {
    let dir = std::env::temp_dir().join(format!("mesh-webhook-skip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = self_signed(&dir);
    let server = start(&dir).await;
    let allowed = |body: &[u8]| -> Value {
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["response"]["allowed"], true, "{v}");
        assert!(v["response"]["patch"].is_null(), "{v}");
        v["response"]["warnings"].clone()
    };
    let host = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "h"},
                      "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "b"}]}});
    let (_, body) = post(server.addr, &ca, "/inject", review(&host, "default"))
        .await
        .unwrap();
    assert!(
        allowed(&body)[0]
            .as_str()
            .unwrap()
            .contains("host's network")
    );
    let bad = json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "b", "annotations": {"sidecar.mesh.dev/proxyCPU": "lots"}},
                     "spec": {"containers": [{"name": "a", "image": "b"}]}});
    let (_, body) = post(server.addr, &ca, "/inject", review(&bad, "default"))
        .await
        .unwrap();
    let w = allowed(&body);
    assert!(
        w[0].as_str().unwrap().contains("sidecar.mesh.dev/proxyCPU"),
        "{w}"
    );
    // Every annotation value that would break the pod: allowed as it
    // is, with a warning naming the annotation and the value.
    for (key, value) in [
        ("traffic.sidecar.mesh.dev/excludeInboundPorts", "*"),
        ("traffic.sidecar.mesh.dev/includeInboundPorts", "*,80"),
        ("traffic.sidecar.mesh.dev/excludeOutboundPorts", "+80"),
        (
            "traffic.sidecar.mesh.dev/excludeOutboundIPRanges",
            "10.0.0.1/",
        ),
        (
            "traffic.sidecar.mesh.dev/includeOutboundIPRanges",
            "*,10.0.0.0/8",
        ),
        ("sidecar.mesh.dev/proxyCPU", "1.5.5"),
        ("sidecar.mesh.dev/proxyMemoryLimit", "lots"),
        ("sidecar.mesh.dev/holdApplicationUntilProxyStarts", "yes"),
        ("sidecar.mesh.dev/rewriteAppHTTPProbers", "TRUE"),
        ("sidecar.mesh.dev/logLevel", "loud"),
    ] {
        let bad = json!({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": "b", "annotations": {key: value}},
                         "spec": {"containers": [{"name": "a", "image": "b"}]}});
        let (_, body) = post(server.addr, &ca, "/inject", review(&bad, "default"))
            .await
            .unwrap();
        let w = allowed(&body);
        let w = w[0].as_str().unwrap();
        assert!(
            w.starts_with("mesh sidecar not injected: ")
                && w.contains(key)
                && w.contains(&format!("{value:?}")),
            "{key}={value}: {w}"
        );
    }
    let over = json!({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": "o", "annotations": {
                          "sidecar.mesh.dev/proxyMemory": "2Gi",
                          "sidecar.mesh.dev/proxyMemoryLimit": "1Gi"}},
                      "spec": {"containers": [{"name": "a", "image": "b"}]}});
    let (_, body) = post(server.addr, &ca, "/inject", review(&over, "default"))
        .await
        .unwrap();
    let w = allowed(&body);
    let w = w[0].as_str().unwrap();
    assert!(
        w.contains("sidecar.mesh.dev/proxyMemory]")
            && w.contains("\"2Gi\"")
            && w.contains("sidecar.mesh.dev/proxyMemoryLimit"),
        "{w}"
    );
    let probe = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                       "spec": {"containers": [{"name": "a", "image": "b",
                           "livenessProbe": {"httpGet": {"port": "missing"}}}]}});
    let (_, body) = post(server.addr, &ca, "/inject", review(&probe, "default"))
        .await
        .unwrap();
    let w = allowed(&body);
    assert!(
        w[0].as_str()
            .unwrap()
            .contains("spec.containers[0].livenessProbe.httpGet.port"),
        "{w}"
    );
    // A value the selectors would not match is not a choice either.
    let odd = json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "y", "labels": {"sidecar.mesh.dev/inject": "yes"}},
                     "spec": {"containers": [{"name": "a", "image": "b"}]}});
    let (_, body) = post(server.addr, &ca, "/inject", review(&odd, "default"))
        .await
        .unwrap();
    let w = allowed(&body);
    assert!(
        w[0].as_str().unwrap().contains("sidecar.mesh.dev/inject"),
        "{w}"
    );

    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "k"},
                     "spec": {"containers": [{"name": "a", "image": "b"}]}});
    let (_, body) = post(server.addr, &ca, "/inject", review(&pod, "kube-system"))
        .await
        .unwrap();
    assert!(allowed(&body)[0].as_str().unwrap().contains("kube-system"));

    let (status, body) = post(server.addr, &ca, "/inject", b"{\"kind\": 7".to_vec())
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview"));
    let (status, _) = post(
        server.addr,
        &ca,
        "/inject",
        br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    let huge = vec![b' '; webhook::BODY_LIMIT + 1];
    let (status, _) = post(server.addr, &ca, "/inject", huge).await.unwrap();
    assert_eq!(status, 413);
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("mesh-webhook-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let old = self_signed(&dir);
    let server = start(&dir).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                     "spec": {"containers": [{"name": "a", "image": "b"}]}});
    assert!(
        post(server.addr, &old, "/inject", review(&pod, "default"))
            .await
            .is_ok()
    );
    let new = self_signed(&dir);
    server.certs.refresh();
    let err = post(server.addr, &old, "/inject", review(&pod, "default"))
        .await
        .unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    assert!(
        post(server.addr, &new, "/inject", review(&pod, "default"))
            .await
            .is_ok()
    );
    // A broken pair is refused and the current certificate stays.
    std::fs::write(dir.join("tls.crt"), "not a certificate").unwrap();
    server.certs.refresh();
    assert!(
        post(server.addr, &new, "/inject", review(&pod, "default"))
            .await
            .is_ok()
    );
}

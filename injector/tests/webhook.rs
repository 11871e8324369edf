//! The webhook over HTTPS as the API server calls it: real AdmissionReview
//! JSON in, a JSONPatch out that, applied with a JSON-patch library, gives
//! exactly what `meshctl kube-inject` gives. Pods it cannot inject are
//! allowed with a warning; malformed reviews get a 400; the serving
//! certificate is reloaded when its files change.

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
    let certs = CertFiles::load(dir.join("tls.crt"), dir.join("tls.key")).unwrap();
    let hook = Arc::new(Webhook {
        settings: Settings::default(),
        cluster: Cluster { minor: 30 },
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
    let req = hyper::Request::post(path)
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

/// The pods of the samples, as the ReplicaSet controller creates them.
fn sample_pods() -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut pods = Vec::new();
    for file in [
        "samples/bookinfo/platform/bookinfo.yaml",
        "samples/callme/platform/callme.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] == "Deployment" {
                let mut pod = v["spec"]["template"].clone();
                pod["apiVersion"] = "v1".into();
                pod["kind"] = "Pod".into();
                pod["metadata"]["name"] = v["metadata"]["name"].clone();
                pods.push(pod);
            }
        }
    }
    pods
}

#[tokio::test]
async fn the_patch_gives_what_kube_inject_gives() {
    let dir = std::env::temp_dir().join(format!("mesh-webhook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = self_signed(&dir);
    let server = start(&dir).await;
    let pods = sample_pods();
    assert_eq!(pods.len(), 9);
    for pod in pods {
        let (status, body) = post(server.addr, &ca, "/inject", review(&pod, "default"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();

        let manifest = serde_yaml::to_string(&pod).unwrap();
        let injected =
            mesh_injector::inject_documents(&manifest, &Settings::default(), Cluster { minor: 30 })
                .unwrap();
        let want: Value = serde_yaml::from_str(&injected).unwrap();
        assert_eq!(patched, want, "{}", pod["metadata"]["name"]);
    }
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

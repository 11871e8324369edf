//! Install, reconcile, diagnose and uninstall against an in-memory API
//! server behind kube's client (tower-test).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::ops::{self, Timing};
use super::render::{self, Stage};
use super::values::{Profile, Values};

/// An object's place: API prefix, plural, namespace, name.
type Key = (String, String, Option<String>, String);

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    /// `METHOD path?query`, in order.
    log: Vec<String>,
    /// Apply bodies, in order.
    applied: Vec<Value>,
    version: u64,
    /// A Deployment that never becomes available; its pod crash-loops.
    broken: Option<String>,
}

struct Parsed {
    prefix: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    /// What follows the name (`log`, `proxy/…`).
    sub: Vec<String>,
}

fn parse(path: &str) -> Parsed {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (prefix, rest) = if segs[0] == "api" {
        (format!("/api/{}", segs[1]), &segs[2..])
    } else {
        (format!("/apis/{}/{}", segs[1], segs[2]), &segs[3..])
    };
    let owned = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    if rest.len() >= 3 && rest[0] == "namespaces" {
        Parsed {
            prefix,
            plural: rest[2].into(),
            namespace: Some(rest[1].into()),
            name: rest.get(3).map(|s| s.to_string()),
            sub: owned(rest.get(4..).unwrap_or_default()),
        }
    } else {
        Parsed {
            prefix,
            plural: rest[0].into(),
            namespace: None,
            name: rest.get(1).map(|s| s.to_string()),
            sub: owned(rest.get(2..).unwrap_or_default()),
        }
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
                .replace("+", " ")
        })
    })
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

/// The object as the caller sent it, without what the server adds.
fn content(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        for k in ["resourceVersion", "generation", "uid"] {
            m.remove(k);
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    v
}

/// What the API server does with a Secret's stringData.
fn string_data_to_data(mut v: Value) -> Value {
    use base64::Engine;
    if let Some(Value::Object(sd)) = v.as_object_mut().and_then(|o| o.remove("stringData")) {
        let data: serde_json::Map<String, Value> = sd
            .into_iter()
            .map(|(k, t)| {
                let b = base64::engine::general_purpose::STANDARD
                    .encode(t.as_str().unwrap_or_default());
                (k, Value::String(b))
            })
            .collect();
        v["data"] = Value::Object(data);
    }
    v
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "not found", "reason": "NotFound", "code": 404}),
    )
}

impl State {
    fn handle(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> (StatusCode, Value) {
        self.log.push(format!("{method} {path}?{query}"));
        if path == "/version" {
            return (
                StatusCode::OK,
                json!({"major": "1", "minor": "30", "gitVersion": "v1.30.0", "gitCommit": "",
                       "gitTreeState": "clean", "buildDate": "", "goVersion": "", "compiler": "gc",
                       "platform": "linux/amd64"}),
            );
        }
        let p = parse(path);
        let key = |name: &str| -> Key {
            (
                p.prefix.clone(),
                p.plural.clone(),
                p.namespace.clone(),
                name.to_string(),
            )
        };
        match (method, p.name.as_deref()) {
            ("PATCH", Some(name)) => {
                let obj: Value = serde_json::from_slice(body).expect("an apply body is JSON");
                self.applied.push(obj.clone());
                let mut obj = string_data_to_data(obj);
                let k = key(name);
                let previous = self.objects.get(&k).cloned();
                let (rv, generation) = match &previous {
                    Some(prev) if content(prev) == content(&obj) => {
                        return (StatusCode::OK, prev.clone());
                    }
                    Some(prev) => (
                        self.next(),
                        prev["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
                    ),
                    None => (self.next(), 1),
                };
                obj["metadata"]["resourceVersion"] = rv.to_string().into();
                obj["metadata"]["generation"] = generation.into();
                match obj["kind"].as_str() {
                    Some("CustomResourceDefinition") => {
                        obj["status"] = json!({"conditions": [
                            {"type": "Established", "status": "True"}]});
                    }
                    Some("Deployment") if self.broken.as_deref() != Some(name) => {
                        let n = obj["spec"]["replicas"].as_i64().unwrap_or(1);
                        obj["status"] = json!({"observedGeneration": generation, "replicas": n,
                            "updatedReplicas": n, "availableReplicas": n, "readyReplicas": n});
                    }
                    _ => {}
                }
                self.objects.insert(k, obj.clone());
                (StatusCode::OK, obj)
            }
            ("GET", Some(name)) if p.sub.first().map(String::as_str) == Some("log") => {
                let _ = name;
                (
                    StatusCode::OK,
                    Value::String(
                        "error: cannot read /etc/mesh/webhook/tls.crt: permission denied".into(),
                    ),
                )
            }
            ("GET", Some(name)) if p.sub.first().map(String::as_str) == Some("proxy") => {
                assert_eq!(name, "mesh-pilot:http-monitoring");
                (
                    StatusCode::OK,
                    json!([{"proxy": "productpage-1.default", "workload": "default/productpage",
                        "mode": "sidecar", "proxyVersion": "0.1.0", "connectedAt": 1, "state": "SYNCED"}]),
                )
            }
            ("GET", Some(name)) => match self.objects.get(&key(name)) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => not_found(),
            },
            ("GET", None) => {
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let mut items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((prefix, plural, ns, _), o)| {
                        *prefix == p.prefix
                            && *plural == p.plural
                            && (p.namespace.is_none() || *ns == p.namespace)
                            && labels_match(o, &selector)
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                if p.plural == "pods" {
                    items.extend(self.broken_pods(&selector));
                }
                (
                    StatusCode::OK,
                    json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                           "items": items}),
                )
            }
            ("DELETE", Some(name)) => match self.objects.remove(&key(name)) {
                Some(o) => (StatusCode::OK, o),
                None => not_found(),
            },
            ("POST", None) if p.plural == "selfsubjectaccessreviews" => {
                let mut review: Value = serde_json::from_slice(body).unwrap();
                review["status"] = json!({"allowed": true});
                (StatusCode::CREATED, review)
            }
            ("POST", None) if p.plural == "pods" => {
                assert_eq!(query_param(query, "dryRun").as_deref(), Some("All"));
                let mut pod: Value = serde_json::from_slice(body).unwrap();
                let injected = self.objects.keys().any(|(_, plural, _, name)| {
                    plural == "mutatingwebhookconfigurations" && name == render::WEBHOOK_NAME
                });
                if injected {
                    pod["metadata"]["annotations"] =
                        json!({mesh_injector::STATUS_ANNOTATION: "{}"});
                }
                pod["metadata"]["name"] = "mesh-check-x".into();
                (StatusCode::CREATED, pod)
            }
            other => panic!("the fake API server does not handle {other:?} {path}"),
        }
    }

    fn next(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn broken_pods(&self, selector: &str) -> Vec<Value> {
        let Some(name) = &self.broken else {
            return Vec::new();
        };
        if selector != format!("app={name}") {
            return Vec::new();
        }
        vec![json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-7d4b9-x2x"), "namespace": "mesh-system",
                         "labels": {"app": name}},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "injector", "ready": false, "restartCount": 4, "image": "", "imageID": "",
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                    "message": "back-off 40s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 1}}
            }]}
        })]
    }
}

/// A kube client talking to `state`.
fn client(state: Arc<Mutex<State>>) -> kube::Client {
    let (svc, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
    tokio::spawn(async move {
        while let Some((req, respond)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let ct = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if method == "PATCH" {
                assert_eq!(
                    ct.as_deref(),
                    Some("application/apply-patch+yaml"),
                    "{path}"
                );
                assert_eq!(
                    query_param(&query, "fieldManager").as_deref(),
                    Some("meshctl")
                );
                assert_eq!(query_param(&query, "force").as_deref(), Some("true"));
            }
            let (status, value) = state.lock().unwrap().handle(&method, &path, &query, &body);
            let text = match value {
                Value::String(s) => s,
                v => v.to_string(),
            };
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            *resp.status_mut() = status;
            respond.send_response(resp);
        }
    });
    kube::Client::new(svc, "default")
}

const FAST: Timing = Timing {
    timeout: Duration::from_millis(300),
    poll: Duration::from_millis(20),
};

fn values(profile: Profile, sets: &[&str]) -> Values {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Values::with_sets(profile, &sets).unwrap()
}

async fn install(state: &Arc<Mutex<State>>, v: &Values) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let r = ops::install(&client(state.clone()), v, FAST, false, &mut out).await;
    let text = String::from_utf8(out).unwrap();
    r.map(|_| text)
}

fn position(log: &[String], needle: &str) -> usize {
    log.iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no request {needle:?} in {log:#?}"))
}

fn last_position(log: &[String], needle: &str) -> usize {
    log.iter()
        .rposition(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no request {needle:?}"))
}

#[tokio::test]
async fn install_applies_in_dependency_order() {
    let state = Arc::new(Mutex::new(State::default()));
    let out = match install(&state, &values(Profile::Demo, &["mtls.mode=STRICT"])).await {
        Ok(o) => o,
        Err(e) => panic!("{e:?}"),
    };
    let s = state.lock().unwrap();
    let log = &s.log;
    let patch_ns = position(log, "PATCH /api/v1/namespaces/mesh-system?");
    let last_crd_patch = last_position(
        log,
        "PATCH /apis/apiextensions.k8s.io/v1/customresourcedefinitions/",
    );
    let last_crd_wait = last_position(
        log,
        "GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions/",
    );
    let pilot_patch = position(
        log,
        "PATCH /apis/apps/v1/namespaces/mesh-system/deployments/mesh-pilot",
    );
    let pilot_wait = last_position(
        log,
        "GET /apis/apps/v1/namespaces/mesh-system/deployments/mesh-pilot",
    );
    let peer_auth = position(
        log,
        "PATCH /apis/security.mesh.dev/v1/namespaces/mesh-system/peerauthentications/default",
    );
    let injector_wait = last_position(
        log,
        "GET /apis/apps/v1/namespaces/mesh-system/deployments/mesh-injector",
    );
    let webhook = position(
        log,
        "PATCH /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mesh-sidecar-injector",
    );
    let gateway = position(
        log,
        "PATCH /apis/apps/v1/namespaces/mesh-system/deployments/mesh-ingressgateway",
    );
    let grafana = position(
        log,
        "PATCH /apis/apps/v1/namespaces/mesh-system/deployments/grafana",
    );
    assert!(patch_ns < last_crd_patch, "the namespace comes first");
    assert!(last_crd_patch < last_crd_wait, "CRDs are waited for");
    assert!(
        last_crd_wait < pilot_patch,
        "CRDs are established before pilot"
    );
    assert!(
        pilot_wait < peer_auth,
        "config after pilot, with the CRDs established"
    );
    assert!(
        injector_wait < webhook,
        "the webhook only once the injector is ready"
    );
    assert!(
        webhook < gateway && gateway < grafana,
        "then gateways, then addons"
    );

    // Every object carries install's labels; the bodies are what render made.
    assert!(s.applied.iter().all(|o| {
        o["metadata"]["labels"][render::MANAGED_BY] == "meshctl"
            && o["metadata"]["labels"][render::COMPONENT_LABEL].is_string()
    }));
    let pilot = s
        .applied
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "mesh-pilot")
        .unwrap();
    let c = &pilot["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["image"],
        format!("mesh/pilot:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        c["resources"]["requests"]["cpu"], "10m",
        "demo: small requests"
    );
    let hook = s
        .applied
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let bundle = hook["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .unwrap();
    assert!(!bundle.is_empty(), "the caBundle is filled in");
    assert!(out.contains("✔ Pilot (config and CA) ready"), "{out}");
    assert!(out.contains("Installation complete"), "{out}");
}

#[tokio::test]
async fn installing_twice_changes_nothing_and_keeps_the_keys() {
    let state = Arc::new(Mutex::new(State::default()));
    let v = values(Profile::Demo, &[]);
    install(&state, &v).await.unwrap();
    let before = state.lock().unwrap().objects.clone();
    let requests = state.lock().unwrap().log.len();
    install(&state, &v).await.unwrap();
    let s = state.lock().unwrap();
    assert_eq!(
        s.objects, before,
        "nothing changed, not even a resourceVersion"
    );
    assert!(
        !s.log[requests..].iter().any(|l| l.starts_with("DELETE")),
        "nothing deleted"
    );
}

#[tokio::test]
async fn another_profile_reconciles_and_removes_what_it_lacks() {
    let state = Arc::new(Mutex::new(State::default()));
    install(&state, &values(Profile::Demo, &[])).await.unwrap();
    let pilot_key = (
        "/apis/apps/v1".to_string(),
        "deployments".to_string(),
        Some("mesh-system".to_string()),
        "mesh-pilot".to_string(),
    );
    let pilot_before = state.lock().unwrap().objects[&pilot_key].clone();
    install(&state, &values(Profile::Minimal, &["pilot.replicas=2"]))
        .await
        .unwrap();
    let s = state.lock().unwrap();
    let names: Vec<&str> = s.objects.keys().map(|(_, _, _, n)| n.as_str()).collect();
    for gone in [
        "mesh-injector",
        "mesh-sidecar-injector",
        "mesh-ingressgateway",
        "mesh-egressgateway",
        "grafana",
        "prometheus",
        "jaeger",
    ] {
        assert!(!names.contains(&gone), "{gone} was removed: {names:?}");
    }
    let pilot = &s.objects[&pilot_key];
    assert_eq!(pilot["spec"]["replicas"], 2);
    assert_ne!(pilot, &pilot_before);
    let pdb = s
        .objects
        .values()
        .find(|o| o["kind"] == "PodDisruptionBudget")
        .unwrap();
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(pdb["spec"].get("maxUnavailable").is_none());
}

#[tokio::test]
async fn a_component_that_does_not_come_up_is_named_with_its_pod_and_logs() {
    let state = Arc::new(Mutex::new(State {
        broken: Some("mesh-injector".into()),
        ..Default::default()
    }));
    let err = install(&state, &values(Profile::Default, &[]))
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("Sidecar injector did not become ready"),
        "{msg}"
    );
    assert!(
        msg.contains("Deployment mesh-system/mesh-injector is not ready"),
        "{msg}"
    );
    assert!(
        msg.contains("pod mesh-system/mesh-injector-7d4b9-x2x"),
        "{msg}"
    );
    assert!(
        msg.contains("container injector: CrashLoopBackOff"),
        "{msg}"
    );
    assert!(
        msg.contains("cannot read /etc/mesh/webhook/tls.crt: permission denied"),
        "the last log lines: {msg}"
    );
    let s = state.lock().unwrap();
    assert!(
        !s.log
            .iter()
            .any(|l| l.starts_with("PATCH") && l.contains("mutatingwebhookconfigurations")),
        "the webhook is not registered while the injector is down"
    );
    assert!(s.log.iter().any(|l| l.contains("previous=true")));
}

#[tokio::test]
async fn uninstall_removes_exactly_what_install_created() {
    let state = Arc::new(Mutex::new(State::default()));
    {
        // Someone else's objects, and a root certificate pilot published.
        let mut s = state.lock().unwrap();
        for (ns, name, labels) in [
            ("mesh-system", "notes", json!({})),
            (
                "shop",
                "settings",
                json!({"app.kubernetes.io/managed-by": "helm"}),
            ),
            (
                "shop",
                "mesh-ca-root-cert",
                json!({"app.kubernetes.io/managed-by": "mesh-pilot"}),
            ),
        ] {
            s.objects.insert(
                (
                    "/api/v1".into(),
                    "configmaps".into(),
                    Some(ns.into()),
                    name.into(),
                ),
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "namespace": ns, "labels": labels}}),
            );
        }
    }
    install(&state, &values(Profile::Demo, &[])).await.unwrap();
    let created: Vec<Key> = {
        let s = state.lock().unwrap();
        s.objects
            .iter()
            .filter(|(_, o)| o["metadata"]["labels"][render::MANAGED_BY] == "meshctl")
            .map(|(k, _)| k.clone())
            .collect()
    };
    let mut out = Vec::new();
    ops::uninstall(&client(state.clone()), false, FAST, &mut out)
        .await
        .unwrap();
    {
        let s = state.lock().unwrap();
        let left: Vec<&Key> = s.objects.keys().collect();
        let ours_left: Vec<&Key> = created
            .iter()
            .filter(|k| s.objects.contains_key(k))
            .collect();
        assert!(
            ours_left
                .iter()
                .all(|(_, plural, _, name)| plural == "namespaces"
                    || plural == "customresourcedefinitions"
                    || name == render::CA_SECRET),
            "without --purge only the namespace, CRDs and CA stay: {ours_left:?}"
        );
        assert!(ours_left.len() > 10);
        assert!(left.iter().any(|(_, _, _, n)| n == "notes"));
        assert!(left.iter().any(|(_, _, _, n)| n == "mesh-ca-root-cert"));
        let webhook = position(
            &s.log,
            "DELETE /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/",
        );
        let injector = position(
            &s.log,
            "DELETE /apis/apps/v1/namespaces/mesh-system/deployments/mesh-injector",
        );
        assert!(webhook < injector, "the webhook goes before the injector");
    }
    ops::uninstall(&client(state.clone()), true, FAST, &mut out)
        .await
        .unwrap();
    let s = state.lock().unwrap();
    let names: Vec<(&str, &str)> = s
        .objects
        .keys()
        .map(|(_, _, ns, n)| (ns.as_deref().unwrap_or(""), n.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![("mesh-system", "notes"), ("shop", "settings")],
        "--purge removes everything install and pilot created, nothing else"
    );
    let deletes = s.log.iter().filter(|l| l.starts_with("DELETE")).count();
    assert_eq!(deletes, created.len() + 1, "one DELETE per object, no more");
    assert!(last_position(&s.log, "DELETE /api/v1/namespaces/mesh-system?") == s.log.len() - 1);
}

#[tokio::test]
async fn check_reports_a_healthy_installation() {
    let state = Arc::new(Mutex::new(State::default()));
    install(&state, &values(Profile::Default, &[]))
        .await
        .unwrap();
    let findings = ops::check(&client(state.clone())).await.unwrap();
    let text: Vec<&str> = findings.iter().map(|f| f.text.as_str()).collect();
    assert!(findings.iter().all(|f| f.ok && !f.warning), "{text:#?}");
    assert!(
        text.iter()
            .any(|t| t.contains("webhook answers the API server"))
    );
    assert!(text.iter().any(|t| t.contains("1 proxies are in sync")));
    assert!(
        text.iter()
            .any(|t| t.contains("root certificate is valid for 36"))
    );

    // Without the webhook, the dry-run pod comes back uninjected.
    state
        .lock()
        .unwrap()
        .objects
        .retain(|(_, plural, _, _), _| plural != "mutatingwebhookconfigurations");
    let findings = ops::check(&client(state.clone())).await.unwrap();
    assert!(
        findings
            .iter()
            .any(|f| !f.ok && f.text.contains("is missing"))
    );
    let pre = ops::check_pre(&client(state)).await.unwrap();
    assert!(pre.iter().all(|f| f.ok), "{pre:?}");
    assert!(
        pre.iter()
            .any(|f| f.warning && f.text.contains("already installed"))
    );
}

#[test]
fn set_errors_name_the_key_and_what_is_allowed() {
    let err = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Values::with_sets(Profile::Default, &sets).unwrap_err()
    };
    assert_eq!(
        err(&["pilot.replcas=2"]),
        "--set pilot.replcas: unknown key \"replcas\" (at pilot: enabled, image, replicas, resources)"
    );
    assert_eq!(
        err(&["pilot.replicas=two"]),
        "--set pilot.replicas: expected a whole number, got \"two\""
    );
    assert_eq!(
        err(&["mtls.mode=strict"]),
        "mtls.mode: \"strict\" is not one of , STRICT, PERMISSIVE, DISABLE"
    );
    assert_eq!(
        err(&["proxy.resources.limits.memory=lots"]),
        "proxy.resources.limits.memory: \"lots\" is not a memory quantity (for example 128Mi)"
    );
    assert_eq!(err(&["tag"]), "--set \"tag\": expected key=value");
    assert_eq!(
        err(&["egressGateway.nodePorts.http=30080"]),
        "egressGateway.nodePorts.http: a ClusterIP Service has no node ports"
    );
    assert_eq!(
        err(&["telemetry.tracing.sampling=150"]),
        "telemetry.tracing.sampling: 150 is not a percentage (0 to 100)"
    );
    assert_eq!(
        err(&["telemetry.accessLog=yaml"]),
        "telemetry.accessLog: access-log format \"yaml\": json, text, or a template with %field%s"
    );
    assert!(
        err(&["telemetry.accessLog=%method% %bogus%"])
            .starts_with("telemetry.accessLog: unknown access-log field %bogus%")
    );
    assert_eq!(
        err(&["telemetry.tracing.zipkinAddress=https://zipkin:9411"]),
        "telemetry.tracing.zipkinAddress: https://zipkin:9411: collectors are reached over plain HTTP"
    );
    assert_eq!(
        Values::with_sets(
            Profile::Default,
            &["telemetry.tracing.sampling=0.5".to_string()]
        )
        .unwrap()
        .telemetry
        .tracing
        .sampling,
        0.5
    );
    assert_eq!(
        err(&["pilot=1"]),
        "--set pilot: is a group of keys; name one of its keys"
    );
}

#[test]
fn profiles_render_what_they_promise() {
    let material = render::Material::generate("cluster.local").unwrap();
    let kinds = |p: Profile, sets: &[&str]| -> Vec<String> {
        render::render(&values(p, sets), &material, 30)
            .iter()
            .map(|o| o.describe())
            .collect()
    };
    let minimal = kinds(Profile::Minimal, &[]);
    assert!(minimal.contains(&"Deployment mesh-system/mesh-pilot".to_string()));
    assert!(
        !minimal
            .iter()
            .any(|k| k.contains("mesh-injector") || k.contains("mesh-ingressgateway"))
    );
    assert_eq!(
        minimal
            .iter()
            .filter(|k| k.starts_with("CustomResourceDefinition"))
            .count(),
        mesh_api::Kind::ALL.len()
    );
    let default = kinds(Profile::Default, &[]);
    assert!(default.contains(&"Deployment mesh-system/mesh-injector".to_string()));
    assert!(default.contains(&"MutatingWebhookConfiguration mesh-sidecar-injector".to_string()));
    assert!(default.contains(&"Service mesh-system/mesh-ingressgateway".to_string()));
    assert!(
        !default
            .iter()
            .any(|k| k.contains("egress") || k.contains("grafana"))
    );
    let demo = kinds(Profile::Demo, &[]);
    for k in [
        "Deployment mesh-system/mesh-egressgateway",
        "Deployment mesh-system/prometheus",
        "Deployment mesh-system/grafana",
        "ConfigMap mesh-system/mesh-grafana-dashboards",
        "Deployment mesh-system/jaeger",
    ] {
        assert!(demo.contains(&k.to_string()), "{k} in {demo:#?}");
    }
    // The demo's sidecars and gateways trace everything to Jaeger and log
    // every request.
    let demo_objects = render::render(&values(Profile::Demo, &[]), &material, 30);
    let settings = demo_objects
        .iter()
        .find(|o| o.kind() == "ConfigMap" && o.name() == "mesh-injector")
        .unwrap();
    let s: mesh_injector::Settings =
        serde_yaml::from_str(settings.value["data"]["settings.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(s.zipkin_address, "zipkin.mesh-system:9411");
    assert_eq!(s.trace_sampling, 100.0);
    assert_eq!(s.access_log, "json");
    let gw = demo_objects
        .iter()
        .find(|o| o.kind() == "Deployment" && o.name() == "mesh-ingressgateway")
        .unwrap();
    let env = gw.value["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "MESH_ACCESS_LOG" && e["value"] == "json")
    );
    assert!(
        env.iter()
            .any(|e| e["name"] == "MESH_TRACE_SAMPLING" && e["value"] == "100")
    );
    let default_settings = render::render(&values(Profile::Default, &[]), &material, 30);
    let gw = default_settings
        .iter()
        .find(|o| o.kind() == "Deployment" && o.name() == "mesh-ingressgateway")
        .unwrap();
    assert!(
        !gw.value.to_string().contains("MESH_ACCESS_LOG"),
        "off by default"
    );
    let no_grafana = kinds(Profile::Demo, &["addons.grafana.enabled=false"]);
    assert!(!no_grafana.iter().any(|k| k.contains("grafana")));

    // Stages are in apply order, and the webhook comes after the injector.
    let objects = render::render(&values(Profile::Demo, &[]), &material, 30);
    assert!(objects.windows(2).all(|w| w[0].stage <= w[1].stage));
    assert_eq!(objects[0].describe(), "Namespace mesh-system");
    assert!(objects.iter().any(|o| o.stage == Stage::Webhook));
}

#[test]
fn gateways_take_their_config_from_pilots_tls_port() {
    let material = render::Material::generate("cluster.local").unwrap();
    let objects = render::render(&values(Profile::Demo, &[]), &material, 30);
    for name in ["mesh-ingressgateway", "mesh-egressgateway"] {
        let gw = objects
            .iter()
            .find(|o| o.kind() == "Deployment" && o.name() == name)
            .unwrap_or_else(|| panic!("{name} rendered"));
        let env = gw.value["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        let value = |key: &str| {
            env.iter()
                .find(|e| e["name"] == key)
                .and_then(|e| e["value"].as_str())
                .unwrap_or_else(|| panic!("{name} sets {key}"))
                .to_string()
        };
        // TLS, checked against the mesh root the pod mounts; never 15010.
        assert_eq!(
            value("MESH_XDS_ADDR"),
            "https://mesh-pilot.mesh-system.svc:15012",
            "{name}"
        );
        assert!(!gw.value.to_string().contains(":15010"), "{name}");
        let mounts = gw.value["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        assert!(
            mounts.iter().any(|m| m["mountPath"] == "/etc/mesh/root"),
            "{name} mounts the mesh root"
        );
    }
}

#[test]
fn values_reach_the_objects() {
    let material = render::Material::generate("example.org").unwrap();
    let v = values(
        Profile::Default,
        &[
            "hub=registry.example.com/mesh",
            "tag=1.2.3",
            "trustDomain=example.org",
            "outboundTrafficPolicy.mode=REGISTRY_ONLY",
            "proxy.resources.limits.memory=300Mi",
            "ingressGateway.serviceType=NodePort",
            "ingressGateway.nodePorts.http=30080",
            "imagePullPolicy=Never",
        ],
    );
    let objects = render::render(&v, &material, 28);
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o.kind() == kind && o.name() == name)
            .unwrap_or_else(|| panic!("{kind} {name}"))
            .value
            .clone()
    };
    let pilot = find("Deployment", "mesh-pilot");
    let c = &pilot["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example.com/mesh/pilot:1.2.3");
    assert_eq!(c["imagePullPolicy"], "Never");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.contains(&"--trust-domain=example.org"));
    assert!(args.contains(&"--outbound-policy=registry-only"));

    let settings = find("ConfigMap", "mesh-injector");
    let s: mesh_injector::Settings =
        serde_yaml::from_str(settings["data"]["settings.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(s.proxy_image, "registry.example.com/mesh/proxy:1.2.3");
    assert_eq!(s.trust_domain, "example.org");
    assert_eq!(s.proxy_memory_limit, "300Mi");

    let injector = find("Deployment", "mesh-injector");
    let env = &injector["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "MESH_KUBERNETES_MINOR" && e["value"] == "28")
    );

    let svc = find("Service", "mesh-ingressgateway");
    assert_eq!(svc["spec"]["type"], "NodePort");
    let http = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http2")
        .unwrap();
    assert_eq!(http["nodePort"], 30080);

    // The caBundle is the CA that signed the serving certificate, which
    // names the Service the API server calls.
    use base64::Engine;
    let hook = find("MutatingWebhookConfiguration", render::WEBHOOK_NAME);
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(
            hook["webhooks"][1]["clientConfig"]["caBundle"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(String::from_utf8(bundle).unwrap(), material.webhook.ca_pem);
    let (_, names) = mesh_pilot::ca::cert_validity(&material.webhook.cert_pem).unwrap();
    assert!(names.contains(&render::WEBHOOK_DNS.to_string()));
}

#[test]
fn pod_problems_say_what_is_wrong() {
    let pod = |status: Value| -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    };
    let pull = pod(
        json!({"containerStatuses": [{"name": "discovery", "ready": false,
        "restartCount": 0, "image": "", "imageID": "",
        "state": {"waiting": {"reason": "ImagePullBackOff",
            "message": "Back-off pulling image \"mesh/pilot:9.9\""}}}]}),
    );
    assert_eq!(
        ops::pod_problem(&pull).unwrap().text,
        "container discovery: ImagePullBackOff: Back-off pulling image \"mesh/pilot:9.9\""
    );
    let pending = pod(
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
        "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient memory."}]}),
    );
    assert_eq!(
        ops::pod_problem(&pending).unwrap().text,
        "not scheduled: 0/1 nodes are available: 1 Insufficient memory."
    );
    let creating = pod(
        json!({"containerStatuses": [{"name": "discovery", "ready": false,
        "restartCount": 0, "image": "", "imageID": "",
        "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
    );
    assert!(ops::pod_problem(&creating).is_none());
}

#[tokio::test]
async fn what_existed_before_install_is_used_but_never_removed() {
    use base64::Engine;
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let plug_in = render::Material::generate("cluster.local").unwrap();
    let state = Arc::new(Mutex::new(State::default()));
    {
        // The platform team made the namespace and brought its own CA.
        let mut s = state.lock().unwrap();
        s.objects.insert(
            (
                "/api/v1".into(),
                "namespaces".into(),
                None,
                "mesh-system".into(),
            ),
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "mesh-system", "labels": {"team": "platform"}}}),
        );
        let data: serde_json::Map<String, Value> = plug_in
            .ca
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(b64(v))))
            .collect();
        s.objects.insert(
            (
                "/api/v1".into(),
                "secrets".into(),
                Some("mesh-system".into()),
                render::CA_SECRET.into(),
            ),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": render::CA_SECRET, "namespace": "mesh-system"},
                   "data": data}),
        );
    }
    let out = install(&state, &values(Profile::Minimal, &[]))
        .await
        .unwrap();
    assert!(
        out.contains("Namespace mesh-system exists and was not created by meshctl"),
        "{out}"
    );
    {
        let s = state.lock().unwrap();
        let ca = s
            .applied
            .iter()
            .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == render::CA_SECRET)
            .unwrap();
        assert_eq!(
            ca["stringData"]["ca-cert.pem"], plug_in.ca["ca-cert.pem"],
            "the plug-in CA is what pilot gets"
        );
        assert!(ca["metadata"]["labels"].get(render::MANAGED_BY).is_none());
    }
    ops::uninstall(&client(state.clone()), true, FAST, &mut Vec::new())
        .await
        .unwrap();
    let s = state.lock().unwrap();
    let left: Vec<&str> = s.objects.keys().map(|(_, _, _, n)| n.as_str()).collect();
    assert_eq!(left, vec!["mesh-system", render::CA_SECRET], "{left:?}");
}

#[tokio::test]
async fn a_renewed_webhook_certificate_is_trusted_alongside_the_old_one() {
    use base64::Engine;
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let old = render::WebhookTls::generate().unwrap();
    let state = Arc::new(Mutex::new(State::default()));
    // The serving certificate is no longer usable (here: unreadable).
    state.lock().unwrap().objects.insert(
        (
            "/api/v1".into(),
            "secrets".into(),
            Some("mesh-system".into()),
            render::WEBHOOK_SECRET.into(),
        ),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": render::WEBHOOK_SECRET, "namespace": "mesh-system",
                            "labels": {render::MANAGED_BY: "meshctl"}},
               "data": {"ca.crt": b64(&old.ca_pem), "tls.crt": b64("not a certificate"),
                        "tls.key": b64(&old.key_pem)}}),
    );
    install(&state, &values(Profile::Default, &[]))
        .await
        .unwrap();
    let s = state.lock().unwrap();
    let hook = s
        .applied
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(
            hook["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let bundle = String::from_utf8(bundle).unwrap();
    assert!(bundle.contains(&old.ca_pem), "the old CA is still trusted");
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        2,
        "and the new one"
    );
}

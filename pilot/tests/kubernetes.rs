//! The Kubernetes source against a mocked API server (tower-test): the
//! initial list, watch events, a relist after 410 Gone, deletes, an
//! invalid CRD object rejected while the rest applies, a CRD that is not
//! installed, and namespaces that are deleted or missing.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use mesh_api::{Kind, Resource, ResourceKey};
use mesh_pilot::registry::{Inputs, ObjectKey};
use mesh_pilot::{Config, Debounce, MeshSettings, source};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_test::mock::{self, SendResponse};

type Handle = mock::Handle<Request<kube::client::Body>, Response<Full<Bytes>>>;

/// What the test tells the fake API server.
enum Command {
    /// Replace what a list of `plural` returns.
    List(&'static str, Vec<Value>),
    /// Deliver watch events (`{"type": …, "object": …}`) to `plural`'s watch.
    Watch(&'static str, Vec<Value>),
    /// Answer 404 for `plural` (its CRD is not installed) until a `List`
    /// for it.
    Absent(&'static str),
}

/// Every resource the source lists and watches, by plural.
fn resources() -> Vec<&'static str> {
    let mut r = vec!["services", "pods", "endpointslices", "namespaces"];
    r.extend(Kind::ALL.iter().map(|k| k.plural()));
    r
}

/// Serves lists from its state and answers each watch with the events the
/// test queued for it, holding the watch open while there are none.
async fn api_server(mut handle: Handle, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut lists: HashMap<&str, Vec<Value>> =
        resources().into_iter().map(|r| (r, vec![])).collect();
    let mut queued: HashMap<&str, VecDeque<Vec<Value>>> = HashMap::new();
    let mut parked: HashMap<&str, SendResponse<Response<Full<Bytes>>>> = HashMap::new();
    let mut version = 1u64;
    loop {
        tokio::select! {
            req = handle.next_request() => {
                let Some((req, respond)) = req else { return };
                let plural = req.uri().path().rsplit('/').next().unwrap_or_default().to_string();
                let Some(&plural) = lists.keys().find(|p| **p == plural) else {
                    respond.send_response(status(404, "NotFound"));
                    continue;
                };
                let watching = req.uri().query().is_some_and(|q| q.contains("watch=true"));
                if !watching {
                    let body = json!({
                        "apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": version.to_string()},
                        "items": lists[plural],
                    });
                    respond.send_response(ok(body.to_string()));
                } else if let Some(events) = queued.get_mut(plural).and_then(|q| q.pop_front()) {
                    respond.send_response(ok(lines(&events)));
                } else {
                    parked.insert(plural, respond);
                }
            }
            cmd = commands.recv() => {
                version += 1;
                match cmd {
                    None => return,
                    Some(Command::List(plural, items)) => { lists.insert(plural, items); }
                    Some(Command::Absent(plural)) => { lists.remove(plural); }
                    Some(Command::Watch(plural, events)) => match parked.remove(plural) {
                        Some(respond) => respond.send_response(ok(lines(&events))),
                        None => queued.entry(plural).or_default().push_back(events),
                    },
                }
            }
        }
    }
}

fn ok(body: String) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from(body)))
}

fn status(code: u16, reason: &str) -> Response<Full<Bytes>> {
    let body = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason, "code": code});
    let mut r = ok(body.to_string());
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

fn lines(events: &[Value]) -> String {
    events.iter().map(|e| format!("{e}\n")).collect()
}

fn event(ty: &str, object: Value) -> Value {
    json!({"type": ty, "object": object})
}

/// The watch error the API server sends when a resourceVersion is too old.
fn gone() -> Value {
    event(
        "ERROR",
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Expired",
               "message": "too old resource version", "code": 410}),
    )
}

fn namespace(name: &str, labels: Value, terminating: bool, rv: u32) -> Value {
    let mut ns = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": rv.to_string(), "labels": labels},
        "status": {"phase": "Active"},
    });
    if terminating {
        ns["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        ns["status"]["phase"] = json!("Terminating");
    }
    ns
}

fn meta(ns: &str, name: &str, rv: u32) -> Value {
    json!({"name": name, "namespace": ns, "resourceVersion": rv.to_string(), "uid": format!("{ns}-{name}")})
}

fn service(name: &str, selector: Option<&str>, port: (&str, u16)) -> Value {
    let mut spec = json!({"clusterIP": "10.96.0.10", "ports": [{"name": port.0, "port": port.1}]});
    if let Some(app) = selector {
        spec["selector"] = json!({"app": app});
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("shop", name, 1), "spec": spec})
}

fn pod(name: &str, version: &str, ip: &str, ready: bool, rv: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv.to_string(),
                     "labels": {"app": "reviews", "version": version}},
        "spec": {"serviceAccountName": "reviews", "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 9080}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

fn slice(name: &str, service: &str, managed_by: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": managed_by}},
        "addressType": "IPv4",
        "ports": [{"name": "sql", "port": 5432}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
    })
}

/// A VirtualService named after its host, splitting v1/v2 by these weights.
fn virtual_service(name: &str, weights: (u32, u32), rv: u32) -> Value {
    json!({
        "apiVersion": "networking.mesh.dev/v1", "kind": "VirtualService",
        "metadata": meta("shop", name, rv),
        "spec": {"hosts": [name], "http": [{"route": [
            {"destination": {"host": name, "subset": "v1"}, "weight": weights.0},
            {"destination": {"host": name, "subset": "v2"}, "weight": weights.1},
        ]}]},
        "status": {"observedGeneration": 1},
    })
}

fn destination_rule() -> Value {
    json!({
        "apiVersion": "networking.mesh.dev/v1", "kind": "DestinationRule",
        "metadata": meta("shop", "reviews", 1),
        "spec": {"host": "reviews", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]},
    })
}

fn key(kind: Kind, name: &str) -> ResourceKey {
    ResourceKey {
        kind,
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// Polls `check` on pilot's inputs until it holds, or fails saying what.
async fn eventually(running: &mesh_pilot::Running, what: &str, check: impl Fn(&Inputs) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let inputs = running.pilot.store.inputs();
        if check(&inputs) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n{inputs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn endpoints(inputs: &Inputs, service: &str) -> Vec<String> {
    let Some(svc) = inputs.services.get(&ObjectKey::new("shop", service)) else {
        return vec![];
    };
    let mut eps: Vec<String> = inputs
        .endpoints_of(svc)
        .map(|w| {
            let port = w.target_port(&svc.ports[0]).unwrap_or(0);
            format!("{}:{port}", w.address)
        })
        .collect();
    eps.sort();
    eps
}

fn first_weight(inputs: &Inputs) -> Option<i32> {
    match inputs
        .config
        .get(&key(Kind::VirtualService, "reviews"))?
        .as_ref()
    {
        Resource::VirtualService(vs) => vs.spec.http[0].route[0].weight,
        _ => None,
    }
}

fn rejected(running: &mesh_pilot::Running, kind: &str) -> u64 {
    series(
        running,
        &format!("pilot_config_rejected_total{{kind=\"{kind}\"}}"),
    )
}

fn rejected_now(running: &mesh_pilot::Running, kind: &str) -> u64 {
    series(
        running,
        &format!("pilot_config_rejected_objects{{kind=\"{kind}\"}}"),
    )
}

fn series(running: &mesh_pilot::Running, name: &str) -> u64 {
    let text = running.pilot.metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A mocked API server, pilot started on it, and the way to talk to the
/// server.
async fn start_on_mock() -> (mesh_pilot::Running, mpsc::UnboundedSender<Command>) {
    let (svc, handle) = mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(api_server(handle, rx));
    let client = kube::Client::new(svc, "default");
    let cfg = Config {
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        mesh: MeshSettings::default(),
        debounce: Debounce::default(),
    };
    let running = mesh_pilot::start(cfg, source::Kubernetes::new(client))
        .await
        .unwrap();
    (running, tx)
}

async fn wait_ready(running: &mesh_pilot::Running) {
    let mut ready = running.pilot.ready.clone();
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .expect("pilot became ready")
        .unwrap();
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("mesh_pilot=info")
        .try_init();
}

#[tokio::test]
async fn kubernetes_source_follows_the_api_server() {
    init_tracing();
    let (svc, handle) = mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(api_server(handle, rx));
    let send = |c: Command| tx.send(c).unwrap();

    // The cluster before pilot starts.
    send(Command::List(
        "namespaces",
        vec![namespace("shop", json!({}), false, 1)],
    ));
    send(Command::List(
        "services",
        vec![
            service("reviews", Some("reviews"), ("http", 9080)),
            service("db", None, ("sql", 5432)),
        ],
    ));
    send(Command::List(
        "pods",
        vec![
            pod("reviews-v1", "v1", "10.1.0.1", true, 1),
            pod("reviews-v2", "v2", "10.1.0.2", true, 1),
        ],
    ));
    send(Command::List(
        "endpointslices",
        vec![
            slice(
                "db-m1",
                "db",
                "endpointslicemirroring-controller.k8s.io",
                "10.9.0.1",
            ),
            slice(
                "reviews-x",
                "reviews",
                "endpointslice-controller.k8s.io",
                "10.1.0.1",
            ),
        ],
    ));
    send(Command::List(
        "virtualservices",
        vec![
            virtual_service("reviews", (100, 0), 1),
            virtual_service("ratings", (90, 0), 1),
        ],
    ));
    send(Command::List("destinationrules", vec![destination_rule()]));

    let client = kube::Client::new(svc, "default");
    let cfg = Config {
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        mesh: MeshSettings::default(),
        debounce: Debounce::default(),
    };
    let running = mesh_pilot::start(cfg, source::Kubernetes::new(client))
        .await
        .unwrap();

    // Initial list: every watcher lists before anything is applied.
    let mut ready = running.pilot.ready.clone();
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .expect("pilot became ready")
        .unwrap();
    let inputs = running.pilot.store.inputs();
    assert_eq!(
        endpoints(&inputs, "reviews"),
        ["10.1.0.1:9080", "10.1.0.2:9080"]
    );
    // A selectorless service gets its endpoints from its mirrored slice;
    // the slice the EndpointSlice controller manages mirrors pods and is
    // not read twice.
    assert_eq!(endpoints(&inputs, "db"), ["10.9.0.1:5432"]);
    assert_eq!(inputs.workloads.len(), 3);
    assert!(
        inputs
            .config
            .contains_key(&key(Kind::DestinationRule, "reviews"))
    );
    assert_eq!(first_weight(&inputs), Some(100));
    // The invalid VirtualService is rejected; the rest applies.
    assert!(
        !inputs
            .config
            .contains_key(&key(Kind::VirtualService, "ratings"))
    );
    assert!(rejected(&running, "VirtualService") >= 1);

    // Watch events: v2 stops being ready (it stays a workload, with its
    // own config), v3 arrives, v1 is deleted.
    send(Command::Watch(
        "pods",
        vec![
            event("MODIFIED", pod("reviews-v2", "v2", "10.1.0.2", false, 2)),
            event("ADDED", pod("reviews-v3", "v3", "10.1.0.3", true, 3)),
        ],
    ));
    eventually(&running, "v2 unready, v3 an endpoint", |i| {
        endpoints(i, "reviews") == ["10.1.0.1:9080", "10.1.0.3:9080"]
            && i.workloads
                .contains_key(&ObjectKey::new("shop", "reviews-v2"))
    })
    .await;
    send(Command::Watch(
        "pods",
        vec![event(
            "DELETED",
            pod("reviews-v1", "v1", "10.1.0.1", true, 4),
        )],
    ));
    eventually(&running, "v1 deleted", |i| {
        endpoints(i, "reviews") == ["10.1.0.3:9080"]
            && !i
                .workloads
                .contains_key(&ObjectKey::new("shop", "reviews-v1"))
    })
    .await;

    // An edit that makes the VirtualService invalid is rejected and its
    // last valid version keeps applying; a valid edit then applies.
    let before = rejected(&running, "VirtualService");
    send(Command::Watch(
        "virtualservices",
        vec![event("MODIFIED", virtual_service("reviews", (50, 40), 2))],
    ));
    eventually(&running, "the bad edit counted", |_| {
        rejected(&running, "VirtualService") > before
    })
    .await;
    assert_eq!(first_weight(&running.pilot.store.inputs()), Some(100));
    // An object that is not a VirtualService at all (a list where a list
    // of routes belongs) is rejected by name, and also keeps the last
    // valid version.
    let mut misshapen = virtual_service("reviews", (100, 0), 3);
    misshapen["spec"]["http"] = json!("all of it");
    send(Command::Watch(
        "virtualservices",
        vec![event("MODIFIED", misshapen)],
    ));
    eventually(&running, "the misshapen edit counted", |_| {
        rejected(&running, "VirtualService") == before + 2
    })
    .await;
    assert_eq!(first_weight(&running.pilot.store.inputs()), Some(100));
    send(Command::Watch(
        "virtualservices",
        vec![event("MODIFIED", virtual_service("reviews", (20, 80), 4))],
    ));
    eventually(&running, "the good edit applied", |i| {
        first_weight(i) == Some(20)
    })
    .await;
    // Revalidating the set read the invalid `ratings` again: the same
    // rejection, not counted twice. It is the one rejected object left.
    assert_eq!(rejected(&running, "VirtualService"), before + 2);
    assert_eq!(rejected_now(&running, "VirtualService"), 1);

    // The services watch expires (410 Gone) while reviews was deleted and
    // details created: the relist brings both.
    send(Command::List(
        "services",
        vec![
            service("db", None, ("sql", 5432)),
            service("details", Some("details"), ("http", 9080)),
        ],
    ));
    send(Command::Watch("services", vec![gone()]));
    eventually(&running, "the relist after 410 Gone", |i| {
        let names: Vec<&str> = i.services.keys().map(|k| k.name.as_str()).collect();
        names == ["db", "details"]
    })
    .await;

    // A deleted DestinationRule goes away.
    send(Command::Watch(
        "destinationrules",
        vec![event("DELETED", destination_rule())],
    ));
    eventually(&running, "the DestinationRule deleted", |i| {
        !i.config
            .contains_key(&key(Kind::DestinationRule, "reviews"))
    })
    .await;
    // Everything else stayed.
    let inputs = running.pilot.store.inputs();
    assert_eq!(first_weight(&inputs), Some(20));
    assert_eq!(endpoints(&inputs, "db"), ["10.9.0.1:5432"]);
}

#[tokio::test]
async fn a_crd_that_is_not_installed_is_a_kind_without_objects_until_it_is() {
    init_tracing();
    let (running, tx) = start_on_mock().await;
    let send = |c: Command| tx.send(c).unwrap();
    send(Command::List(
        "namespaces",
        vec![namespace("shop", json!({}), false, 1)],
    ));
    send(Command::List("destinationrules", vec![destination_rule()]));
    // The cluster has no VirtualService CRD: its list answers 404.
    send(Command::Absent("virtualservices"));

    // Pilot does not wait for it: ready with what the cluster has.
    wait_ready(&running).await;
    let inputs = running.pilot.store.inputs();
    assert!(
        inputs
            .config
            .contains_key(&key(Kind::DestinationRule, "reviews"))
    );
    assert_eq!(first_weight(&inputs), None);

    // The CRD is installed and a VirtualService created: the watcher,
    // still retrying, lists it.
    send(Command::List(
        "virtualservices",
        vec![virtual_service("reviews", (70, 30), 1)],
    ));
    eventually(&running, "the VirtualService applied", |i| {
        first_weight(i) == Some(70)
    })
    .await;
    assert!(
        running
            .pilot
            .store
            .inputs()
            .config
            .contains_key(&key(Kind::DestinationRule, "reviews"))
    );
}

fn shop_service(ns: &str, name: &str) -> Value {
    let mut s = service(name, Some(name), ("http", 9080));
    s["metadata"]["namespace"] = json!(ns);
    s["metadata"]["uid"] = json!(format!("{ns}-{name}"));
    s
}

fn services_by_namespace(inputs: &Inputs) -> Vec<String> {
    inputs.services.keys().map(|k| k.to_string()).collect()
}

#[tokio::test]
async fn objects_of_namespaces_being_deleted_or_missing_are_left_out() {
    init_tracing();
    let (running, tx) = start_on_mock().await;
    let send = |c: Command| tx.send(c).unwrap();
    send(Command::List(
        "namespaces",
        vec![
            namespace("shop", json!({"team": "a"}), false, 1),
            namespace("other", json!({}), false, 1),
        ],
    ));
    // `ghost` does not exist (yet).
    send(Command::List(
        "services",
        vec![
            shop_service("shop", "reviews"),
            shop_service("other", "ratings"),
            shop_service("ghost", "details"),
        ],
    ));
    send(Command::List(
        "pods",
        vec![pod("reviews-v1", "v1", "10.1.0.1", true, 1)],
    ));
    send(Command::List("destinationrules", vec![destination_rule()]));
    wait_ready(&running).await;
    let inputs = running.pilot.store.inputs();
    assert_eq!(
        services_by_namespace(&inputs),
        ["other/ratings", "shop/reviews"]
    );
    assert_eq!(
        inputs.namespace_labels("shop"),
        Some(&[("team".to_string(), "a".to_string())].into())
    );
    assert_eq!(endpoints(&inputs, "reviews"), ["10.1.0.1:9080"]);

    // `ghost` is created: its service appears. `shop`'s labels change.
    send(Command::Watch(
        "namespaces",
        vec![
            event("ADDED", namespace("ghost", json!({}), false, 2)),
            event(
                "MODIFIED",
                namespace("shop", json!({"team": "b"}), false, 3),
            ),
        ],
    ));
    eventually(&running, "ghost's service and shop's new labels", |i| {
        services_by_namespace(i) == ["ghost/details", "other/ratings", "shop/reviews"]
            && i.namespace_labels("shop").and_then(|l| l.get("team")) == Some(&"b".to_string())
    })
    .await;

    // `shop` is being deleted: its service, pods and config go at once,
    // before the API server deletes them one by one.
    send(Command::Watch(
        "namespaces",
        vec![event(
            "MODIFIED",
            namespace("shop", json!({"team": "b"}), true, 4),
        )],
    ));
    eventually(&running, "shop's objects dropped", |i| {
        services_by_namespace(i) == ["ghost/details", "other/ratings"]
            && !i.workloads.keys().any(|k| k.namespace == "shop")
            && !i.config.keys().any(|k| k.namespace == "shop")
            && i.namespace_labels("shop").is_none()
    })
    .await;

    // `other` is gone.
    send(Command::Watch(
        "namespaces",
        vec![event("DELETED", namespace("other", json!({}), false, 5))],
    ));
    eventually(&running, "other's service dropped", |i| {
        services_by_namespace(i) == ["ghost/details"]
    })
    .await;
}

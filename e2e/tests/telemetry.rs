//! Tracing through the mesh: one bookinfo request through the ingress
//! gateway, productpage, details, reviews and ratings arrives at a Zipkin
//! collector of the test's own as one trace of linked spans.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_e2e::mesh::{BOOKINFO_SERVICES, LocalMesh, Options, bookinfo_workloads};
use serde_json::Value;

/// A Zipkin v2 collector: keeps every span posted to /api/v2/spans.
fn collector(listener: tokio::net::TcpListener) -> Arc<Mutex<Vec<Value>>> {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let kept = kept.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let kept = kept.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        let status = match serde_json::from_slice::<Vec<Value>>(&body) {
                            Ok(batch) if path == "/api/v2/spans" => {
                                kept.lock().unwrap().extend(batch);
                                202
                            }
                            _ => 400,
                        };
                        let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, hyper::Error>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    spans
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_every_service() {
    // The collector listens where the proxies can reach it: in the hub
    // namespace once the mesh is up (proxies export only after requests),
    // or on loopback.
    let namespaced = mesh_e2e::mesh::namespaces_available();
    let (zipkin, early) = if namespaced {
        (SocketAddr::new(mesh_e2e::netns::HUB.into(), 9411), None)
    } else {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (l.local_addr().unwrap(), Some(l))
    };
    let m = LocalMesh::start_with(
        "traces",
        &BOOKINFO_SERVICES,
        &bookinfo_workloads(&["v2"]),
        ("/", "productpage", 9080),
        Options {
            explicit: false,
            proxy_env: vec![
                ("MESH_ZIPKIN_ADDR".into(), zipkin.to_string()),
                ("MESH_TRACE_SAMPLING".into(), "100".into()),
            ],
        },
    )
    .await;
    let listener = match early {
        Some(l) => l,
        None => m.listener(9411).await,
    };
    let spans = collector(listener);
    let request_id = "e2e-trace-0001";
    let page = m
        .requests("/productpage", &[("x-request-id", request_id)], 1, 1)
        .await
        .remove(0);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("★"), "reviews v2 called ratings");

    // Every proxy flushes its batch within a second. With pods, each hop
    // is a client span at the caller's sidecar and a server span at the
    // callee's: gateway, productpage, details, reviews, ratings. In the
    // explicit variant apps are reached directly: client spans only.
    let expected = if namespaced { 8 } else { 4 };
    let ours = |all: &[Value]| -> Vec<Value> {
        all.iter()
            .filter(|s| s["tags"]["guid:x-request-id"] == request_id)
            .cloned()
            .collect()
    };
    let complete = mesh_e2e::eventually(Duration::from_secs(10), || {
        let spans = spans.clone();
        async move { ours(&spans.lock().unwrap()).len() >= expected }
    })
    .await;
    let trace = ours(&spans.lock().unwrap());
    assert!(complete, "{expected} spans arrive: {trace:#?}");
    assert_eq!(trace.len(), expected, "{trace:#?}");

    let trace_ids: BTreeSet<&str> = trace.iter().filter_map(|s| s["traceId"].as_str()).collect();
    assert_eq!(trace_ids.len(), 1, "one trace: {trace_ids:?}");
    let ids: BTreeSet<&str> = trace.iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids.len(), trace.len(), "span ids are unique");
    let roots: Vec<&Value> = trace
        .iter()
        .filter(|s| s.get("parentId").is_none())
        .collect();
    assert_eq!(roots.len(), 1, "one root, the gateway's: {roots:#?}");
    assert_eq!(roots[0]["kind"], "CLIENT");
    assert_eq!(
        roots[0]["localEndpoint"]["serviceName"],
        "ingressgateway.default"
    );
    let by_id: BTreeMap<&str, &Value> = trace
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s))
        .collect();
    let parent_of = |s: &Value| -> &Value {
        let p = s["parentId"].as_str().expect("a parent");
        by_id
            .get(p)
            .unwrap_or_else(|| panic!("the parent of {s} is in the trace"))
    };
    let client = |from: &str, to: &str| -> &Value {
        trace
            .iter()
            .find(|s| {
                s["kind"] == "CLIENT"
                    && s["localEndpoint"]["serviceName"] == from
                    && s["name"].as_str().unwrap().starts_with(to)
            })
            .unwrap_or_else(|| panic!("{from}'s call to {to}: {trace:#?}"))
    };
    for s in &trace {
        assert_eq!(s["tags"]["http.status_code"], "200", "{s}");
    }
    if namespaced {
        // Each service serves under its caller's client span, and calls
        // out under its own server span.
        let mut served = BTreeSet::new();
        for s in trace.iter().filter(|s| s["kind"] == "SERVER") {
            served.insert(
                s["localEndpoint"]["serviceName"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            assert_eq!(parent_of(s)["kind"], "CLIENT", "{s}");
        }
        assert_eq!(
            served,
            [
                "details.default",
                "productpage.default",
                "ratings.default",
                "reviews.default"
            ]
            .map(String::from)
            .into(),
        );
        let reviews_server = parent_of(client("reviews.default", "ratings"));
        assert_eq!(reviews_server["kind"], "SERVER");
        assert_eq!(
            reviews_server["localEndpoint"]["serviceName"],
            "reviews.default"
        );
        assert_eq!(
            parent_of(reviews_server)["id"],
            client("productpage.default", "reviews")["id"]
        );
    } else {
        let to_reviews = client("productpage.default", "reviews");
        assert_eq!(parent_of(to_reviews)["id"], roots[0]["id"]);
        assert_eq!(
            parent_of(client("productpage.default", "details"))["id"],
            roots[0]["id"]
        );
        assert_eq!(
            parent_of(client("reviews.default", "ratings"))["id"],
            to_reviews["id"]
        );
    }
    // The proxy's own account of its spans, and its certificate's expiry
    // (sidecar metrics ports are published in the namespace variant).
    if namespaced {
        let metrics = m.sidecar_metrics("productpage-v1").await.expect("metrics");
        let value = |name: &str| -> f64 {
            metrics
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
        };
        assert!(value("mesh_proxy_spans_total{outcome=\"exported\"}") >= 2.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(value("mesh_proxy_certificate_expiry_timestamp_seconds") > now);
    }
    drop(m);
}

/// A gateway's access log: one JSON line per request with its status, the
/// reason for a response the proxy made itself, and the policy that
/// denied a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_json_line_per_request() {
    use tokio::io::AsyncBufReadExt;
    let dir = std::env::temp_dir().join(format!("mesh-access-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = mesh_e2e::free_port_on(&[[127, 0, 0, 1].into()]);
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "version: \"1\"\n\
             workload: {{name: ingressgateway, namespace: mesh-system, labels: {{mesh: ingressgateway}}}}\n\
             inbound:\n  authorization:\n  - name: mesh-system/no-admin\n    action: DENY\n    rules: [{{to: [{{operation: {{paths: [/admin]}}}}]}}]\n\
             gatewayListeners:\n- port: {port}\n  protocol: HTTP\n  virtualHosts:\n  - hosts: [shop.example.com]\n    routes:\n    - action: {{directResponse: {{status: 200, body: {{string: \"shop\\n\"}}}}}}\n"
        ),
    )
    .unwrap();
    let free = || {
        format!(
            "127.0.0.1:{}",
            mesh_e2e::free_port_on(&[[127, 0, 0, 1].into()])
        )
    };
    let mut child = tokio::process::Command::new(mesh_e2e::binary("mesh-proxy"))
        .args(["--mode", "gateway", "--gateway-bind", "127.0.0.1"])
        .arg("--config")
        .arg(&config)
        .args([
            "--admin-addr",
            &free(),
            "--metrics-addr",
            &free(),
            "--ready-addr",
            &free(),
        ])
        .args(["--access-log", "json"])
        .env("MESH_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mesh-proxy starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let client = mesh_e2e::client();
    let get = |host: &'static str, path: &'static str| {
        let client = client.clone();
        async move { mesh_e2e::get(&client, addr, host, path).await.ok() }
    };
    let up = mesh_e2e::eventually(Duration::from_secs(10), || async {
        get("shop.example.com", "/")
            .await
            .is_some_and(|g| g.status == 200)
    })
    .await;
    assert!(up, "the gateway answers");
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("a line within 5 s")
            .unwrap()
            .expect("stdout open");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is JSON: {e}"))
    };
    // The readiness polls above left their lines; the last one is a 200.
    let mut first = next().await;
    while first["status"] != 200 {
        first = next().await;
    }
    assert_eq!(first["authority"], "shop.example.com");
    assert_eq!(first["path"], "/");
    assert_eq!(first["response_flags"], "-");
    assert_eq!(first["bytes_sent"], 5);
    assert_eq!(first["direction"], "outbound");

    assert_eq!(get("shop.example.com", "/admin").await.unwrap().status, 403);
    let denied = next().await;
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["path"], "/admin");
    assert_eq!(denied["reason"], "denied by policy");
    assert_eq!(denied["response_flags"], "RBAC");
    assert_eq!(denied["denied_by"], "mesh-system/no-admin");

    assert_eq!(get("other.example.com", "/").await.unwrap().status, 404);
    let unrouted = next().await;
    assert_eq!(unrouted["status"], 404);
    assert_eq!(unrouted["response_flags"], "NR");
    assert_eq!(unrouted["reason"], "no route");
    assert_eq!(unrouted["denied_by"], Value::Null);
    assert_ne!(unrouted["request_id"], denied["request_id"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pilot's dashboard draws the service graph from the proxies' own
/// metrics: bookinfo's calls appear as edges with their rates, and with
/// mTLS where the callee saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_draws_the_live_service_graph() {
    let m = LocalMesh::start(
        "graph",
        &BOOKINFO_SERVICES,
        &bookinfo_workloads(&["v2"]),
        ("/", "productpage", 9080),
    )
    .await;
    let page = m.pilot_get("/dashboard").await.expect("the dashboard page");
    assert!(page.contains("id=\"graph\""), "the page has its graph");
    // Looking starts the readings; traffic flows while they go on.
    assert!(m.pilot_get("/api/graph").await.is_some());
    let edge_of = |graph: &Value, from: &str, to: &str| -> Option<Value> {
        graph["edges"]
            .as_array()?
            .iter()
            .find(|e| e["source"] == from && e["target"] == to)
            .cloned()
    };
    let last = Arc::new(Mutex::new(Value::Null));
    let drawn = mesh_e2e::eventually(Duration::from_secs(30), || {
        let m = &m;
        let last = last.clone();
        async move {
            m.requests("/productpage", &[], 10, 2).await;
            let Some(text) = m.pilot_get("/api/graph").await else {
                return false;
            };
            let graph: Value = serde_json::from_str(&text).unwrap();
            *last.lock().unwrap() = graph.clone();
            [
                ("default/ingressgateway", "default/productpage-v1"),
                ("default/productpage-v1", "default/details-v1"),
                ("default/productpage-v1", "default/reviews-v2"),
                ("default/reviews-v2", "default/ratings-v1"),
            ]
            .iter()
            .all(|(a, b)| edge_of(&graph, a, b).is_some_and(|e| e["rps"].as_f64() > Some(0.0)))
        }
    })
    .await;
    let graph = last.lock().unwrap().clone();
    assert!(drawn, "every call is an edge with traffic: {graph:#}");
    let to_reviews = edge_of(&graph, "default/productpage-v1", "default/reviews-v2").unwrap();
    assert_eq!(to_reviews["service"], "reviews.default.svc.cluster.local");
    assert_eq!(to_reviews["errorRate"], 0.0);
    assert!(
        to_reviews["p99Ms"].as_f64().is_some_and(|p| p > 0.0),
        "{to_reviews}"
    );
    let gateway = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "default/ingressgateway")
        .unwrap();
    assert_eq!(gateway["kind"], "gateway");
    if m.namespaced() {
        assert_eq!(to_reviews["mtls"], true, "the callee saw mTLS");
    }
    let services: Value =
        serde_json::from_str(&m.pilot_get("/api/services").await.unwrap()).unwrap();
    let reviews = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == "reviews.default.svc.cluster.local")
        .unwrap();
    assert!(reviews["rps"].as_f64() > Some(0.0), "{reviews}");
    assert_eq!(
        reviews["workloads"],
        serde_json::json!(["default/reviews-v2"])
    );
    let proxies: Value = serde_json::from_str(&m.pilot_get("/api/proxies").await.unwrap()).unwrap();
    assert_eq!(proxies.as_array().unwrap().len(), 5, "{proxies}");
    assert!(
        proxies
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["metrics"] == true && p["state"] == "SYNCED"),
        "{proxies:#}"
    );
}

//! Pilot and real proxies on loopback: config pushed over xDS, changed
//! live under load, pilot killed and restarted, a reconnect that resends
//! nothing the proxy still holds, a rejected resource seen in `meshctl
//! proxy-status`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mesh_e2e::*;
use mesh_pilot::source::Files;
use mesh_pilot::{Config, Debounce, MeshSettings};
use tokio::sync::Mutex;

const V1: &str = "127.0.0.2";
const V2: &str = "127.0.0.3";

fn platform(port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: callme}}
spec:
  selector: {{app: callme}}
  ports: [{{name: http, port: 8080, targetPort: {port}}}]
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {{name: callme-v1}}
spec: {{address: {V1}, labels: {{app: callme, version: v1}}, serviceAccount: callme}}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {{name: callme-v2}}
spec: {{address: {V2}, labels: {{app: callme, version: v2}}, serviceAccount: callme}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: callme}}
spec:
  host: callme
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"#
    )
}

fn route_to(subset: &str) -> String {
    format!(
        r#"apiVersion: networking.mesh.dev/v1
kind: VirtualService
metadata: {{name: callme}}
spec:
  hosts: [callme]
  http:
  - route: [{{destination: {{host: callme, subset: {subset}}}}}]
"#
    )
}

/// Writes a file so that a reader never sees half of it.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

struct Mesh {
    dir: std::path::PathBuf,
    v1: App,
    v2: App,
}

async fn mesh(name: &str) -> Mesh {
    let ips: [IpAddr; 2] = [V1.parse().unwrap(), V2.parse().unwrap()];
    let port = free_port_on(&ips);
    let v1 = app("callme-v1", ips[0], port).await;
    let v2 = app("callme-v2", ips[1], port).await;
    let dir = std::env::temp_dir().join(format!("mesh-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir.join("platform.yaml"), &platform(port));
    write(&dir.join("route.yaml"), &route_to("v1"));
    Mesh { dir, v1, v2 }
}

/// Each request's completion time and outcome.
type Results = Vec<(Instant, Result<Got, String>)>;

/// A steady stream of requests through `proxy`, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Results>>,
    task: tokio::task::JoinHandle<()>,
}

fn load(proxy: SocketAddr) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    let (s, r) = (stop.clone(), results.clone());
    let task = tokio::spawn(async move {
        let c = client();
        while !s.load(Ordering::Relaxed) {
            let got = get(&c, proxy, "callme:8080", "/").await;
            r.lock().await.push((Instant::now(), got));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    Load {
        stop,
        results,
        task,
    }
}

impl Load {
    async fn finish(self) -> Results {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        std::mem::take(&mut *self.results.lock().await)
    }

    /// Waits until `n` requests have completed (the load is under way).
    async fn wait_for(&self, n: usize) {
        let results = self.results.clone();
        let ok = eventually(Duration::from_secs(10), || {
            let results = results.clone();
            async move { results.lock().await.len() >= n }
        })
        .await;
        assert!(ok, "the load made {n} requests");
    }

    /// Waits (bounded) until the latest response body is `body`.
    async fn wait_for_body(&self, body: &str, deadline: Duration) -> bool {
        let results = self.results.clone();
        eventually(deadline, || {
            let results = results.clone();
            async move {
                let r = results.lock().await;
                r.last()
                    .and_then(|(_, g)| g.as_ref().ok())
                    .is_some_and(|g| g.body == body)
            }
        })
        .await
    }
}

fn failures(results: &Results) -> Vec<String> {
    results
        .iter()
        .filter_map(|(_, r)| match r {
            Ok(g) if g.status == 200 => None,
            Ok(g) => Some(format!("{} {} {}", g.status, g.reason, g.body)),
            Err(e) => Some(e.clone()),
        })
        .collect()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Pilot in this process, on loopback ports, reading `dir` every 10 ms.
async fn start_pilot(dir: &Path) -> mesh_pilot::Running {
    mesh_pilot::start(
        Config {
            xds_addr: local(0),
            http_addr: local(0),
            mesh: MeshSettings::default(),
            debounce: Debounce::default(),
        },
        Files {
            path: dir.to_path_buf(),
            interval: Duration::from_millis(10),
        },
    )
    .await
    .expect("pilot starts")
}

fn free_port() -> u16 {
    free_port_on(&["127.0.0.1".parse().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_change_flips_traffic_under_load_without_errors() {
    let m = mesh("flip").await;
    let pilot = start_pilot(&m.dir).await;
    let caller = sidecar(pilot.xds_addr, "caller", &[("app", "caller")]).await;
    let proxy = caller.explicit.unwrap();
    assert!(ready(&caller).await, "the proxy got its config");

    // The first request to a destination waits for pilot's answer.
    let c = client();
    let first = get(&c, proxy, "callme:8080", "/").await.unwrap();
    assert_eq!(
        (first.status, first.body.as_str()),
        (200, "callme-v1"),
        "{first:?}"
    );

    let load = load(proxy);
    load.wait_for(20).await;
    let changed = Instant::now();
    write(&m.dir.join("route.yaml"), &route_to("v2"));
    let flipped = load
        .wait_for_body("callme-v2", Duration::from_secs(2))
        .await
        .then(|| changed.elapsed());
    // Some requests after the flip, all answered by v2.
    let settled = load.results.lock().await.len();
    load.wait_for(settled + 20).await;
    let results = load.finish().await;
    let flipped = flipped.expect("traffic moved to v2");
    println!(
        "route change to traffic moved: {flipped:?} (files polled every 10ms), {} requests",
        results.len()
    );
    assert_eq!(failures(&results), Vec::<String>::new());
    assert!(flipped < Duration::from_secs(2), "took {flipped:?}");
    // After the flip, nothing goes to v1.
    let v1_before = m.v1.hits();
    for _ in 0..20 {
        assert_eq!(
            get(&c, proxy, "callme:8080", "/").await.unwrap().body,
            "callme-v2"
        );
    }
    assert_eq!(m.v1.hits(), v1_before);
    assert!(m.v2.hits() >= 20);

    // pilot's status shows the proxy in sync.
    let status = pilot.http_addr;
    synced_on_callme(status).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_killed_and_restarted_under_load_fails_no_request() {
    let m = mesh("restart").await;
    let (xds, http) = (local(free_port()), local(free_port()));
    let mut pilot = PilotProcess::start(&m.dir, xds, http);
    assert!(
        eventually(Duration::from_secs(10), || async {
            http_get(http, "/ready").await.is_some()
        })
        .await,
        "pilot became ready"
    );
    let caller = sidecar(xds, "caller", &[("app", "caller")]).await;
    let proxy = caller.explicit.unwrap();
    assert!(ready(&caller).await, "the proxy got its config");
    let c = client();
    let first = get(&c, proxy, "callme:8080", "/").await.unwrap();
    assert_eq!(first.body, "callme-v1", "{first:?}");

    let load = load(proxy);
    load.wait_for(20).await;
    pilot.kill();
    // The proxy notices pilot is gone and keeps serving its last config…
    let xds_client = caller.proxy.xds.get().unwrap().clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = xds_client.clone();
            async move { !c.connected() }
        })
        .await
    );
    write(&m.dir.join("route.yaml"), &route_to("v2"));
    let _pilot = PilotProcess::start(&m.dir, xds, http);
    // …reconnects, and picks up what changed meanwhile.
    let moved = load
        .wait_for_body("callme-v2", Duration::from_secs(10))
        .await;
    let results = load.finish().await;
    assert!(moved, "the change made while pilot was down arrived");
    assert_eq!(
        failures(&results),
        Vec::<String>::new(),
        "of {}",
        results.len()
    );
    println!("{} requests, none failed", results.len());
}

#[tokio::test]
async fn a_proxy_that_never_reached_pilot_answers_503_saying_why() {
    let nobody = local(free_port());
    let caller = sidecar(nobody, "caller", &[]).await;
    let got = get(&client(), caller.explicit.unwrap(), "callme:8080", "/")
        .await
        .unwrap();
    assert_eq!(got.status, 503);
    assert_eq!(got.reason, "no config from control plane");
}

/// Stands between proxies and pilot, passing everything through, except
/// that while `corrupt` is set it replaces the bodies of Destination
/// resources with one no proxy can read. Records the NACKs proxies send.
#[derive(Clone)]
struct Relay {
    upstream: SocketAddr,
    corrupt: Arc<AtomicBool>,
    nacks: Arc<std::sync::Mutex<Vec<String>>>,
}

type RelayStream = tokio_stream::wrappers::ReceiverStream<
    Result<mesh_api::discovery::DeltaDiscoveryResponse, tonic::Status>,
>;

#[tonic::async_trait]
impl mesh_api::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService
    for Relay
{
    type DeltaAggregatedResourcesStream = RelayStream;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<mesh_api::discovery::DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<RelayStream>, tonic::Status> {
        use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
        let mut from_proxy = request.into_inner();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.upstream))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (up, up_rx) = tokio::sync::mpsc::channel(64);
        let nacks = self.nacks.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = from_proxy.message().await {
                if let Some(e) = &req.error_detail {
                    nacks.lock().unwrap().push(e.message.clone());
                }
                if up.send(req).await.is_err() {
                    return;
                }
            }
        });
        let mut from_pilot = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(up_rx))
            .await?
            .into_inner();
        let (down, down_rx) = tokio::sync::mpsc::channel(64);
        let corrupt = self.corrupt.clone();
        tokio::spawn(async move {
            while let Ok(Some(mut resp)) = from_pilot.message().await {
                if resp.type_url == mesh_api::discovery::DESTINATION
                    && corrupt.load(Ordering::Relaxed)
                {
                    for r in &mut resp.resources {
                        r.body = br#"{"host": 7}"#.as_slice().into();
                    }
                }
                if down.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(down_rx),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_resource_is_nacked_shown_and_the_previous_version_keeps_serving() {
    let m = mesh("nack").await;
    let pilot = start_pilot(&m.dir).await;
    let relay = Relay {
        upstream: pilot.xds_addr,
        corrupt: Arc::new(AtomicBool::new(false)),
        nacks: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind(local(0)).await.unwrap();
    let relay_addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(
            mesh_api::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer::new(
                relay.clone(),
            ),
        )
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);
    let caller = sidecar(relay_addr, "caller", &[("app", "caller")]).await;
    let proxy = caller.explicit.unwrap();
    assert!(ready(&caller).await, "the proxy got its config");
    let c = client();
    assert_eq!(
        get(&c, proxy, "callme:8080", "/").await.unwrap().body,
        "callme-v1"
    );

    // The next version of the destination arrives unreadable.
    relay.corrupt.store(true, Ordering::Relaxed);
    write(&m.dir.join("route.yaml"), &route_to("v2"));
    let nacks = relay.nacks.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let n = nacks.clone();
            async move { !n.lock().unwrap().is_empty() }
        })
        .await,
        "the proxy NACKed"
    );
    let nack = relay.nacks.lock().unwrap()[0].clone();
    assert!(nack.starts_with("callme:8080: "), "{nack}");
    // The proxy keeps routing with the version it had.
    for _ in 0..20 {
        let got = get(&c, proxy, "callme:8080", "/").await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, "callme-v1"));
    }
    // Pilot knows, and `meshctl proxy-status` says which resource and why.
    let status = pilot.http_addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary("meshctl"))
            .args(["proxy-status", "--pilot", &status])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let row = table
        .lines()
        .find(|l| l.contains(" default/caller "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("NACKED"), "{table}");
    assert!(
        table.contains("rejected Destination/callme:8080 version") && table.contains(&nack),
        "{table}"
    );

    // A readable next version is taken, and the proxy is in sync again.
    relay.corrupt.store(false, Ordering::Relaxed);
    write(
        &m.dir.join("route.yaml"),
        &route_to("v2").replace("- route:", "- timeout: 5s\n    route:"),
    );
    let moved = eventually(Duration::from_secs(5), || {
        let c = c.clone();
        async move {
            get(&c, proxy, "callme:8080", "/")
                .await
                .is_ok_and(|g| g.body == "callme-v2")
        }
    })
    .await;
    assert!(moved, "the next valid version applied");
    let status = pilot.http_addr;
    assert!(
        eventually(Duration::from_secs(5), || async {
            http_get(status, "/debug/syncz")
                .await
                .is_some_and(|b| b.contains("\"state\":\"SYNCED\"") && !b.contains("\"nack\""))
        })
        .await,
        "{:?}",
        http_get(status, "/debug/syncz").await
    );
    server.abort();
}

/// A TCP relay in front of pilot that can be cut: while down, it drops the
/// connections it carries and every new one.
struct Cable {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cable {
    async fn to(upstream: SocketAddr) -> Cable {
        let listener = tokio::net::TcpListener::bind(local(0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (u, c) = (up.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    continue;
                }
                let conn = tokio::spawn(async move {
                    if let Ok(mut to_pilot) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut to_pilot).await;
                    }
                });
                c.lock().unwrap().push(conn.abort_handle());
            }
        });
        Cable {
            addr,
            up,
            conns,
            task,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn mend(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Cable {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// `pilot_xds_pushes_total` of one type, and the connected proxies.
fn pushes(pilot: &mesh_pilot::Running, ty: &str) -> f64 {
    let text = pilot.pilot.metrics.render();
    let prefix = format!("pilot_xds_pushes_total{{type=\"{ty}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn connected_proxies(pilot: &mesh_pilot::Running) -> f64 {
    pilot
        .pilot
        .metrics
        .render()
        .lines()
        .find_map(|l| {
            l.strip_prefix("pilot_xds_connected_proxies ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_proxy_is_sent_what_changed_and_not_the_clusters_it_holds() {
    let m = mesh("resume").await;
    let pilot = start_pilot(&m.dir).await;
    let cable = Cable::to(pilot.xds_addr).await;
    let caller = sidecar(cable.addr, "caller", &[("app", "caller")]).await;
    let proxy = caller.explicit.unwrap();
    assert!(ready(&caller).await, "the proxy got its config");
    let c = client();
    assert_eq!(
        get(&c, proxy, "callme:8080", "/").await.unwrap().body,
        "callme-v1"
    );
    let status = pilot.http_addr;
    synced_on_callme(status).await;
    let clusters = pushes(&pilot, "Cluster");
    let destinations = pushes(&pilot, "Destination");
    assert!(clusters >= 1.0, "the clusters of callme were sent once");

    // The link to pilot breaks; meanwhile the route changes (its clusters
    // do not).
    cable.cut();
    let xds_client = caller.proxy.xds.get().unwrap().clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let x = xds_client.clone();
            let p = &pilot;
            async move { !x.connected() && connected_proxies(p) == 0.0 }
        })
        .await,
        "both ends saw the stream go"
    );
    write(
        &m.dir.join("route.yaml"),
        &route_to("v1").replace("- route:", "- timeout: 5s\n    route:"),
    );
    cable.mend();
    // Back: pilot sends the changed destination (after whatever else the
    // reconnect made it send)…
    assert!(
        eventually(Duration::from_secs(10), || async {
            pushes(&pilot, "Destination") > destinations
        })
        .await,
        "the change made while away arrived"
    );
    // …and not one cluster: the proxy told it which it holds before
    // asking for the destinations that route to them.
    assert_eq!(pushes(&pilot, "Cluster"), clusters);
    assert!(
        eventually(Duration::from_secs(5), || {
            let x = xds_client.clone();
            async move { x.connected() }
        })
        .await
    );
    for _ in 0..5 {
        let got = get(&c, proxy, "callme:8080", "/").await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, "callme-v1"));
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            http_get(status, "/debug/syncz")
                .await
                .is_some_and(|b| b.contains("\"state\":\"SYNCED\"") && !b.contains("\"nack\""))
        })
        .await,
        "{:?}",
        http_get(status, "/debug/syncz").await
    );
}

/// Pilot's status shows a proxy SYNCED with callme:8080 among its resources.
async fn synced_on_callme(status: std::net::SocketAddr) {
    assert!(
        eventually(Duration::from_secs(5), || async {
            http_get(status, "/debug/syncz")
                .await
                .is_some_and(|b| b.contains("\"state\":\"SYNCED\"") && b.contains("callme:8080"))
        })
        .await,
        "{:?}",
        http_get(status, "/debug/syncz").await
    );
}

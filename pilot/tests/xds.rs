//! Pilot's Delta xDS server against raw gRPC clients on loopback: what a
//! reconnecting proxy is sent, how its sync status reads, and the metrics
//! pilot exposes about it all.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::discovery::{
    CLUSTER, DESTINATION, DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status, WORKLOAD,
};
use mesh_api::sync::{ProxyStatus, SyncState};
use mesh_pilot::{Config, Debounce, MeshSettings, Running, source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CONFIG: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings}
spec: {selector: {app: ratings}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: details}
spec: {selector: {app: details}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: reviews-v1}
spec: {address: 10.1.0.1, labels: {app: reviews}}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: ratings-v1}
spec: {address: 10.1.0.2, labels: {app: ratings}}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: details-v1}
spec: {address: 10.1.0.3, labels: {app: details}}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: productpage}
spec: {address: 10.1.0.9, labels: {app: productpage}}
"#;

/// A second ratings endpoint, in a file of its own.
const RATINGS_V2: &str = r#"
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: ratings-v2}
spec: {address: 10.1.0.12, labels: {app: ratings}}
"#;

const RATINGS: &str = "outbound|9080||ratings.default.svc.cluster.local";
const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";
const DETAILS: &str = "outbound|9080||details.default.svc.cluster.local";

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-pilot-xds-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn start(d: &Path) -> Running {
    std::fs::write(d.join("mesh.yaml"), CONFIG).unwrap();
    let cfg = Config {
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        mesh: MeshSettings::default(),
        debounce: Debounce::default(),
    };
    let files = source::Files {
        path: d.to_path_buf(),
        interval: Duration::from_millis(10),
    };
    let running = mesh_pilot::start(cfg, files).await.unwrap();
    let mut ready = running.pilot.ready.clone();
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .expect("pilot ready")
        .unwrap();
    running
}

/// Polls `check` until it gives a value, or fails saying what it waited
/// for.
async fn eventually<T>(what: &str, check: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Resource versions a proxy holds, per type URL.
type Held = BTreeMap<&'static str, BTreeMap<String, String>>;

/// A proxy speaking Delta xDS, driven by the test.
struct RawProxy {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    inbound: tonic::Streaming<DeltaDiscoveryResponse>,
}

fn node(workload: &str) -> Node {
    Node {
        id: format!("{workload}.default"),
        workload: workload.into(),
        namespace: "default".into(),
        labels: [("app".to_string(), workload.to_string())].into(),
        service_account: "default".into(),
        version: "test".into(),
        mode: "sidecar".into(),
        metrics_addr: String::new(),
        gateways: vec![],
    }
}

/// The first request of one type: what to subscribe to, and what the
/// proxy holds of it.
fn declare(
    ty: &str,
    subscribe: &[&str],
    held: Option<&BTreeMap<String, String>>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: ty.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        initial_resource_versions: held.cloned().map(HashMap::from_iter).unwrap_or_default(),
        ..Default::default()
    }
}

impl RawProxy {
    /// Opens a stream whose first requests are `first` (the first one gets
    /// the node of `workload`), all queued before pilot reads any.
    async fn connect(
        xds: SocketAddr,
        workload: &str,
        first: Vec<DeltaDiscoveryRequest>,
    ) -> RawProxy {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(64);
        for (i, mut req) in first.into_iter().enumerate() {
            if i == 0 {
                req.node = Some(node(workload));
            }
            tx.send(req).await.unwrap();
        }
        let inbound = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        RawProxy { tx, inbound }
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(20), self.inbound.message())
            .await
            .expect("a response from pilot")
            .unwrap()
            .expect("the stream open")
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// Acknowledges `resp`, or rejects it with `error`.
    async fn answer(&self, resp: &DeltaDiscoveryResponse, error: Option<&str>) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: error.map(|e| Status {
                code: 3,
                message: e.into(),
            }),
            ..Default::default()
        })
        .await;
    }

    /// Receives, records and acknowledges responses until `done` holds
    /// for what is held.
    async fn take_until(&mut self, held: &mut Held, done: impl Fn(&Held) -> bool) -> Vec<String> {
        let mut got = Vec::new();
        while !done(held) {
            let resp = self.recv().await;
            let ty = type_url(&resp.type_url);
            for r in &resp.resources {
                held.entry(ty)
                    .or_default()
                    .insert(r.name.clone(), r.version.clone());
                got.push(format!("{}/{}", short(ty), r.name));
            }
            for name in &resp.removed_resources {
                held.entry(ty).or_default().remove(name);
                got.push(format!("-{}/{name}", short(ty)));
            }
            self.answer(&resp, None).await;
        }
        got
    }
}

fn type_url(t: &str) -> &'static str {
    [WORKLOAD, DESTINATION, CLUSTER]
        .into_iter()
        .find(|u| *u == t)
        .expect("a known type")
}

fn short(t: &str) -> &'static str {
    match t {
        WORKLOAD => "Workload",
        DESTINATION => "Destination",
        _ => "Cluster",
    }
}

fn holds(held: &Held, ty: &str, names: &[&str]) -> bool {
    names
        .iter()
        .all(|n| held.get(ty).is_some_and(|m| m.contains_key(*n)))
}

/// Everything productpage subscribes to, and the clusters they route to.
fn holds_all(held: &Held) -> bool {
    holds(held, WORKLOAD, &["default/productpage"])
        && holds(held, DESTINATION, &["reviews:9080", "ratings:9080"])
        && holds(held, CLUSTER, &[REVIEWS, RATINGS])
}

/// A fresh proxy that subscribes to reviews and ratings and takes
/// everything; returns what it holds once it is synced.
async fn first_connection(running: &Running) -> Held {
    let mut proxy = RawProxy::connect(
        running.xds_addr,
        "productpage",
        vec![
            declare(WORKLOAD, &["default/productpage"], None),
            declare(DESTINATION, &["reviews:9080", "ratings:9080"], None),
            declare(CLUSTER, &[], None),
        ],
    )
    .await;
    let mut held = Held::new();
    proxy.take_until(&mut held, holds_all).await;
    synced(running, "productpage.default").await;
    held
}

fn status_of(running: &Running, proxy: &str) -> Option<ProxyStatus> {
    running
        .pilot
        .sync
        .snapshot()
        .into_iter()
        .find(|p| p.proxy == proxy)
}

async fn synced(running: &Running, proxy: &str) -> ProxyStatus {
    eventually(&format!("{proxy} SYNCED"), || {
        status_of(running, proxy)
            .filter(|p| p.state == SyncState::Synced && !p.resources.is_empty())
    })
    .await
}

/// Changes ratings' endpoints; returns its new cluster version once
/// compiled.
async fn change_ratings(running: &Running, d: &Path, old: &str) -> String {
    std::fs::write(d.join("ratings-v2.yaml"), RATINGS_V2).unwrap();
    eventually("ratings recompiled", || {
        let c = running.pilot.store.read();
        let v = c.clusters.get(RATINGS)?.version.to_string();
        (v != old).then_some(v)
    })
    .await
}

/// The connection the first proxy had is gone from pilot's view.
async fn disconnected(running: &Running, proxy: &str) {
    eventually(&format!("{proxy} gone"), || {
        status_of(running, proxy).is_none().then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_proxy_is_sent_only_what_changed_while_it_was_away() {
    // Declaring what it holds: Workload, then Destination, then Cluster.
    reconnect_gets_only_changes("wdc", [WORKLOAD, DESTINATION, CLUSTER]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_declaring_clusters_before_destinations_is_sent_only_what_changed() {
    reconnect_gets_only_changes("wcd", [WORKLOAD, CLUSTER, DESTINATION]).await;
}

async fn reconnect_gets_only_changes(name: &str, order: [&str; 3]) {
    let d = dir(name);
    let running = start(&d).await;
    let mut held = first_connection(&running).await;
    disconnected(&running, "productpage.default").await;
    let before = held.clone();
    let ratings = change_ratings(&running, &d, &before[CLUSTER][RATINGS]).await;

    // Back, declaring what it holds, one request per type in `order`, all
    // before pilot answers.
    let first = order
        .iter()
        .map(|ty| match *ty {
            WORKLOAD => declare(WORKLOAD, &["default/productpage"], before.get(WORKLOAD)),
            DESTINATION => declare(
                DESTINATION,
                &["reviews:9080", "ratings:9080"],
                before.get(DESTINATION),
            ),
            _ => declare(CLUSTER, &[], before.get(CLUSTER)),
        })
        .collect();
    let mut proxy = RawProxy::connect(running.xds_addr, "productpage", first).await;
    let got = proxy
        .take_until(&mut held, |h| h[CLUSTER][RATINGS] == ratings)
        .await;
    // Then a new subscription: its answer comes after anything else pilot
    // had to send, so `got` is all that was re-sent.
    proxy
        .send(declare(DESTINATION, &["details:9080"], None))
        .await;
    let mut got2 = proxy
        .take_until(&mut held, |h| holds(h, DESTINATION, &["details:9080"]))
        .await;
    let mut all = got;
    all.append(&mut got2);
    assert_eq!(
        all,
        [
            format!("Cluster/{RATINGS}"),
            format!("Cluster/{DETAILS}"),
            "Destination/details:9080".to_string(),
        ],
        "only what changed or is new is sent"
    );
    // SYNCED, on the versions it runs.
    let status = eventually("SYNCED on the new versions", || {
        let s = status_of(&running, "productpage.default")?;
        let r = &s.resources;
        let ok = s.state == SyncState::Synced
            && r[&format!("Cluster/{RATINGS}")].acked.as_deref() == Some(ratings.as_str())
            && r.contains_key(&format!("Cluster/{DETAILS}"));
        ok.then_some(s)
    })
    .await;
    assert_eq!(
        status.resources[&format!("Cluster/{REVIEWS}")]
            .acked
            .as_deref(),
        Some(before[CLUSTER][REVIEWS].as_str())
    );
    drop(proxy);
    drop(running);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_declared_after_a_push_do_not_replace_what_pilot_sent() {
    let d = dir("late");
    let running = start(&d).await;
    let held = first_connection(&running).await;
    disconnected(&running, "productpage.default").await;
    let ratings = change_ratings(&running, &d, &held[CLUSTER][RATINGS]).await;

    // Back, declaring Workload and Destination versions but not (yet)
    // the clusters it holds: pilot pushes clusters without knowing.
    let mut proxy = RawProxy::connect(
        running.xds_addr,
        "productpage",
        vec![
            declare(WORKLOAD, &["default/productpage"], held.get(WORKLOAD)),
            declare(
                DESTINATION,
                &["reviews:9080", "ratings:9080"],
                held.get(DESTINATION),
            ),
        ],
    )
    .await;
    let resp = proxy.recv().await;
    assert_eq!(resp.type_url, CLUSTER);
    let sent: BTreeMap<&str, &str> = resp
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    assert_eq!(sent.get(RATINGS), Some(&ratings.as_str()));
    // Only now the proxy's declaration of its (older) clusters arrives,
    // then its ACK of the push.
    proxy.send(declare(CLUSTER, &[], held.get(CLUSTER))).await;
    proxy.answer(&resp, None).await;
    // Pilot keeps what it sent, and the ACK counts: SYNCED on the new
    // ratings version, not on the old one the proxy declared.
    let status = eventually("the ACK of the new ratings recorded", || {
        let s = status_of(&running, "productpage.default")?;
        let r = s.resources.get(&format!("Cluster/{RATINGS}"))?;
        (r.acked.as_deref() == Some(ratings.as_str())).then_some(s)
    })
    .await;
    assert_eq!(
        status.resources[&format!("Cluster/{RATINGS}")].sent,
        ratings
    );
    assert_eq!(status.state, SyncState::Synced, "{status:#?}");
    drop(proxy);
    drop(running);
    let _ = std::fs::remove_dir_all(&d);
}

/// GETs a path of pilot's HTTP port; returns the body.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: pilot\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of a series in Prometheus text, when present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_proxies_pushes_push_latency_nacks_and_rejected_config() {
    let d = dir("metrics");
    let running = start(&d).await;
    // One proxy takes everything; another rejects its destinations.
    let mut good = RawProxy::connect(
        running.xds_addr,
        "productpage",
        vec![
            declare(WORKLOAD, &["default/productpage"], None),
            declare(DESTINATION, &["reviews:9080", "ratings:9080"], None),
        ],
    )
    .await;
    let mut held = Held::new();
    good.take_until(&mut held, holds_all).await;
    let mut bad = RawProxy::connect(
        running.xds_addr,
        "reviews-v1",
        vec![
            declare(WORKLOAD, &["default/reviews-v1"], None),
            declare(DESTINATION, &["ratings:9080"], None),
        ],
    )
    .await;
    tokio::spawn(async move {
        loop {
            let resp = bad.recv().await;
            let error = (resp.type_url == DESTINATION).then_some("no route to unknown cluster");
            bad.answer(&resp, error).await;
        }
    });
    // A change pushed to the proxy that subscribed to it.
    let ratings = change_ratings(&running, &d, &held[CLUSTER][RATINGS]).await;
    good.take_until(&mut held, |h| h[CLUSTER][RATINGS] == ratings)
        .await;
    // And an invalid resource.
    std::fs::write(
        d.join("bad.yaml"),
        "apiVersion: networking.mesh.dev/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews}, weight: 90}]}]\n",
    )
    .unwrap();

    let http = running.http_addr;
    let text = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = http_get(http, "/metrics").await;
            let done = value(&text, "pilot_xds_nacks_total{type=\"Destination\"}").is_some()
                && value(
                    &text,
                    "pilot_config_rejected_total{kind=\"VirtualService\"}",
                )
                .is_some()
                && value(&text, "pilot_push_latency_seconds_count").is_some_and(|n| n >= 1.0);
            if done {
                break text;
            }
            assert!(Instant::now() < deadline, "metrics incomplete:\n{text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert_eq!(
        value(&text, "pilot_xds_connected_proxies"),
        Some(2.0),
        "{text}"
    );
    for ty in ["Workload", "Destination", "Cluster"] {
        let pushes = value(&text, &format!("pilot_xds_pushes_total{{type=\"{ty}\"}}"));
        assert!(pushes.is_some_and(|n| n >= 1.0), "{ty} pushes:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("pilot_push_latency_seconds_bucket{le=")),
        "{text}"
    );
    assert!(value(&text, "pilot_xds_nacks_total{type=\"Destination\"}").is_some_and(|n| n >= 1.0));
    assert_eq!(
        value(
            &text,
            "pilot_config_rejected_total{kind=\"VirtualService\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "pilot_config_rejected_objects{kind=\"VirtualService\"}"
        ),
        Some(1.0)
    );
    drop(good);
    drop(running);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_reaches_the_proxies_that_use_it_and_names_resolve_late() {
    let d = dir("wake");
    let running = start(&d).await;
    // One proxy uses ratings, one uses reviews and a service that does
    // not exist yet.
    let mut ratings_user = RawProxy::connect(
        running.xds_addr,
        "productpage",
        vec![declare(DESTINATION, &["ratings:9080"], None)],
    )
    .await;
    let mut held_a = Held::new();
    ratings_user
        .take_until(&mut held_a, |h| holds(h, CLUSTER, &[RATINGS]))
        .await;
    let mut other = RawProxy::connect(
        running.xds_addr,
        "reviews-v1",
        vec![declare(DESTINATION, &["reviews:9080", "later:9080"], None)],
    )
    .await;
    let mut held_b = Held::new();
    let got = other
        .take_until(&mut held_b, |h| holds(h, DESTINATION, &["reviews:9080"]))
        .await;
    assert!(
        got.contains(&"-Destination/later:9080".to_string()),
        "{got:?}"
    );

    // A ratings change reaches the proxy that uses ratings.
    let ratings = change_ratings(&running, &d, &held_a[CLUSTER][RATINGS]).await;
    ratings_user
        .take_until(&mut held_a, |h| h[CLUSTER][RATINGS] == ratings)
        .await;

    // The service `later` is created: the proxy that asked for it by name
    // gets it.
    std::fs::write(
        d.join("later.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: later}\nspec: {selector: {app: later}, ports: [{name: http, port: 9080}]}\n",
    )
    .unwrap();
    let got = other
        .take_until(&mut held_b, |h| holds(h, DESTINATION, &["later:9080"]))
        .await;
    // Nothing about ratings came to it first.
    assert!(got.iter().all(|r| !r.contains("ratings")), "{got:?}");
    drop(running);
    let _ = std::fs::remove_dir_all(&d);
}

/// A Delta xDS stream to pilot's TLS port with `identity` (cert chain, key)
/// as client certificate, the first request naming `node`: what pilot
/// answers.
async fn tls_stream(
    addr: SocketAddr,
    roots: &str,
    identity: Option<(String, String)>,
    node: Node,
) -> Result<DeltaDiscoveryResponse, tonic::Status> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(roots))
        .domain_name("localhost");
    if let Some((chain, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let subscribe = format!("{}/{}", node.namespace, node.workload);
    let mut first = declare(WORKLOAD, &[subscribe.as_str()], None);
    first.node = Some(node);
    tx.send(first).await.unwrap();
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(20), inbound.message())
        .await
        .expect("an answer from pilot")?;
    Ok(resp.expect("the stream open"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_tls_port_a_proxy_is_served_only_the_identity_its_certificate_proves() {
    let d = dir("identity");
    let mut running = start(&d).await;
    let ca = std::sync::Arc::new(
        mesh_pilot::ca::Ca::load_or_create(
            &d.join("ca"),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap(),
    );
    let addr = running
        .serve_secure(
            "127.0.0.1:0".parse().unwrap(),
            ca.clone(),
            mesh_pilot::ca::BootstrapTokens::default(),
            &["localhost".to_string()],
        )
        .await
        .unwrap();
    let roots = ca.roots().join("\n");
    // A workload certificate for default/default, as the CA issues it.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/default/sa/default"
            .try_into()
            .unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = ca
        .sign(&csr, "default", "default", None)
        .unwrap()
        .join("\n");
    let identity = Some((chain, key.serialize_pem()));

    // The identity it proves: served.
    let resp = tls_stream(addr, &roots, identity.clone(), node("reviews"))
        .await
        .unwrap();
    assert_eq!(type_url(&resp.type_url), WORKLOAD, "{resp:?}");
    // Another service account than the certificate's: refused.
    let mut other = node("reviews");
    other.service_account = "bookinfo-ratings".into();
    let refused = tls_stream(addr, &roots, identity, other).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("ns/default/sa/default"),
        "{refused:?}"
    );
    // No certificate at all: refused too.
    let refused = tls_stream(addr, &roots, None, node("reviews"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}

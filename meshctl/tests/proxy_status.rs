//! `meshctl proxy-status` against a real pilot with two proxies connected
//! over xDS: one acknowledges everything, one rejects its destination.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::discovery::{DESTINATION, DeltaDiscoveryRequest, Node, Status, WORKLOAD};
use mesh_api::sync::{ProxyStatus, SyncState};
use mesh_pilot::{Config, Debounce, MeshSettings, source};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CONFIG: &str = r#"
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
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: productpage}
spec: {address: 10.1.0.9, labels: {app: productpage}}
"#;

/// A proxy speaking Delta xDS to pilot: subscribes to its workload and to
/// reviews:9080, acknowledges every response except those of `reject`,
/// which it refuses with `error`.
async fn proxy(xds: SocketAddr, workload: &str, reject: Option<(&'static str, &'static str)>) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: format!("{workload}.default"),
            workload: workload.into(),
            namespace: "default".into(),
            labels: [("app".to_string(), workload.to_string())].into(),
            service_account: "default".into(),
            version: "test".into(),
            mode: "sidecar".into(),
            metrics_addr: String::new(),
            gateways: vec![],
        }),
        type_url: WORKLOAD.into(),
        resource_names_subscribe: vec![format!("default/{workload}")],
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: DESTINATION.into(),
        resource_names_subscribe: vec!["reviews:9080".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = inbound.message().await {
            let error_detail = reject
                .filter(|(ty, _)| *ty == resp.type_url)
                .map(|(_, message)| Status {
                    code: 3,
                    message: message.into(),
                });
            let ack = DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail,
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                return;
            }
        }
    });
}

fn meshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env_remove("MESH_PILOT")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_shows_synced_and_nacked_proxies() {
    let dir = std::env::temp_dir().join(format!("meshctl-proxy-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), CONFIG).unwrap();
    let cfg = Config {
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        mesh: MeshSettings::default(),
        debounce: Debounce::default(),
    };
    let files = source::Files {
        path: dir.clone(),
        interval: Duration::from_millis(50),
    };
    let pilot = mesh_pilot::start(cfg, files).await.unwrap();
    let status = pilot.http_addr.to_string();
    proxy(pilot.xds_addr, "productpage", None).await;
    proxy(
        pilot.xds_addr,
        "reviews-v1",
        Some((
            DESTINATION,
            "route 0: unknown cluster outbound|9080||reviews",
        )),
    )
    .await;

    // Wait for both to answer what they were sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    let proxies = loop {
        let s = status.clone();
        let out = tokio::task::spawn_blocking(move || {
            meshctl(&["proxy-status", "--pilot", &s, "-o", "json"])
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{out:?}");
        let proxies: Vec<ProxyStatus> = serde_json::from_slice(&out.stdout).unwrap();
        let state = |id: &str| proxies.iter().find(|p| p.proxy == id).map(|p| p.state);
        if state("productpage.default") == Some(SyncState::Synced)
            && state("reviews-v1.default") == Some(SyncState::Nacked)
        {
            break proxies;
        }
        assert!(Instant::now() < deadline, "never settled: {proxies:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(proxies.len(), 2);

    let s = status.clone();
    let (table, detail) = tokio::task::spawn_blocking(move || {
        (
            meshctl(&["proxy-status", "--pilot", &s]),
            meshctl(&["proxy-status", "--pilot", &s, "default/reviews-v1"]),
        )
    })
    .await
    .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("PROXY"), "{table}");
    let row = |id: &str| {
        *lines
            .iter()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{table}"))
    };
    let pp = row("productpage.default");
    assert!(pp.contains("SYNCED") && !pp.contains("NACKED"), "{table}");
    let rv = row("reviews-v1.default");
    assert!(rv.contains("NACKED"), "{table}");
    // The workload resource was acknowledged; the destination was not.
    assert!(rv.contains("SYNCED (1)"), "{table}");
    assert!(
        table.contains("reviews-v1.default rejected Destination/reviews:9080 version")
            && table.contains("unknown cluster outbound|9080||reviews"),
        "{table}"
    );
    let detail = String::from_utf8(detail.stdout).unwrap();
    assert!(
        detail.starts_with(
            "Proxy reviews-v1.default (default/reviews-v1 sidecar, version test): NACKED"
        ),
        "{detail}"
    );
    assert!(
        detail
            .lines()
            .any(|l| l.starts_with("Destination/reviews:9080") && l.contains("NACKED: route 0")),
        "{detail}"
    );
    assert!(
        detail
            .lines()
            .any(|l| l.starts_with("Workload/default/reviews-v1") && l.ends_with("SYNCED")),
        "{detail}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn proxy_status_says_where_it_looked() {
    // A port nothing listens on: bind one and close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = meshctl(&["proxy-status", "--pilot", &addr.to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach pilot at {addr}")),
        "{err}"
    );
    assert!(err.contains("--pilot"), "{err}");
}

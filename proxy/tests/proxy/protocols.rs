//! HTTP/2, gRPC, WebSocket upgrades, CONNECT tunnels, gateway mode and
//! metrics.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_reach_http1_upstreams() {
    let o = origin("o").await;
    let p = proxy(&config(
        "- action: {forward: [{cluster: o}]}",
        &cluster("o", &[&o], "protocol: HTTP"),
    ))
    .await;
    let r = send(&h2_client(), p.explicit.unwrap(), "svc:9080", "/h2", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "o"));
    assert_eq!(o.seen()[0].version, http::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_pass_through_and_statuses_drive_retries() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let k = calls.clone();
    let grpc = origin_with(Arc::new(move |_, _| {
        let n = k.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let status = if n == 0 { "14" } else { "0" };
        Reply {
            headers: vec![("content-type", "application/grpc".into())],
            trailers: vec![("grpc-status", status.into())],
            ..Reply::ok("\0\0\0\0\0")
        }
    }))
    .await;
    let routes =
        "- retries: {attempts: 2, retryOn: unavailable}\n  action: {forward: [{cluster: g}]}";
    let p = proxy(&config(routes, &cluster("g", &[&grpc], "protocol: GRPC"))).await;
    let r = send(
        &h2_client(),
        p.explicit.unwrap(),
        "svc:9080",
        "/pkg.Svc/Call",
        &[("content-type", "application/grpc"), ("te", "trailers")],
    )
    .await;
    assert_eq!(r.status, 200);
    // The first answer carried grpc-status 14 in its trailers; only a
    // trailers-only answer (status in the headers) can be retried before
    // streaming, so this one passes through unchanged.
    assert_eq!(r.trailers.unwrap()["grpc-status"], "14");
    assert_eq!(grpc.seen()[0].version, http::Version::HTTP_2);
    let trailers_only = origin_with(Arc::new(|_, n| Reply {
        headers: vec![
            ("content-type", "application/grpc".into()),
            ("grpc-status", if n == 0 { "14".into() } else { "0".into() }),
        ],
        ..Reply::ok("")
    }))
    .await;
    let p = proxy(&config(
        routes,
        &cluster("g", &[&trailers_only], "protocol: GRPC"),
    ))
    .await;
    let r = send(
        &h2_client(),
        p.explicit.unwrap(),
        "svc:9080",
        "/pkg.Svc/Call",
        &[("content-type", "application/grpc")],
    )
    .await;
    assert_eq!(r.headers["grpc-status"], "0", "UNAVAILABLE was retried");
    assert_eq!(trailers_only.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_spliced() {
    // An upstream that accepts the upgrade and echoes bytes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(head.contains("upgrade: websocket"), "{head}");
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await.unwrap();
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
    });
    let clusters = format!(
        "- name: ws\n  service: svc.default.svc.cluster.local\n  endpoints: [{{address: \"{addr}\"}}]\n"
    );
    let p = proxy(&config("- action: {forward: [{cluster: ws}]}", &clusters)).await;
    let mut s = tokio::net::TcpStream::connect(p.explicit.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: svc:9080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping-frame").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"ping-frame");
}

async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_carry_raw_tcp() {
    let echo = echo_server().await;
    let p = proxy(&config("- action: {directResponse: {status: 204}}", "")).await;
    let mut s = tokio::net::TcpStream::connect(p.explicit.unwrap())
        .await
        .unwrap();
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.write_all(b"\x00binary\xff").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"\x00binary\xff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_by_host_and_forwards_tcp_ports() {
    let shop = origin("shop").await;
    let api = origin("api").await;
    let echo = echo_server().await;
    let (http_port, tcp_port) = (free_port(), free_port());
    let cfg = format!(
        r#"version: gw
gatewayListeners:
- port: {http_port}
  protocol: HTTP
  virtualHosts:
  - hosts: ["api.example.com"]
    routes:
    - match: [{{gateways: [default/public]}}]
      action: {{forward: [{{cluster: api}}]}}
  - hosts: ["*.example.com"]
    routes:
    - action: {{forward: [{{cluster: shop}}]}}
- port: {tcp_port}
  protocol: TCP
  tcp: [{{clusters: [{{cluster: echo}}]}}]
clusters:
- {{name: shop, endpoints: [{{address: "{}"}}]}}
- {{name: api, endpoints: [{{address: "{}"}}]}}
- {{name: echo, endpoints: [{{address: "{echo}"}}]}}
"#,
        shop.addr, api.addr
    );
    let p = proxy_with(&cfg, Default::default(), vec!["default/public".into()]).await;
    let to: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let c = client();
    assert_eq!(send(&c, to, "api.example.com", "/", &[]).await.body, "api");
    assert_eq!(
        send(&c, to, "WWW.Example.com:8080", "/", &[]).await.body,
        "shop"
    );
    assert_eq!(send(&c, to, "other.org", "/", &[]).await.status, 404);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port))
        .await
        .unwrap();
    s.write_all(b"tcp through the gateway").await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"tcp through the gateway");
    assert_eq!(p.gateway_addrs().len(), 2);
    // TCP traffic has TCP series, with every label; counters move when the
    // connection closes.
    drop(s);
    let metrics_addr = p.metrics.unwrap();
    // Polled until the closed connection is counted (2 s at most).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut metrics = String::new();
    while std::time::Instant::now() < deadline {
        metrics = send(&c, metrics_addr, "x", "/stats/prometheus", &[])
            .await
            .body;
        let received = metrics
            .lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if metrics.contains("istio_tcp_connections_closed_total{") && received == Some(23.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for series in [
        "istio_tcp_connections_opened_total{",
        "istio_tcp_connections_closed_total{",
        "istio_tcp_sent_bytes_total{",
        "istio_tcp_received_bytes_total{",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("{series} in\n{metrics}"));
        for label in [
            "reporter=",
            "source_workload=",
            "destination_workload=",
            "destination_service=",
            "request_protocol=\"tcp\"",
            "connection_security_policy=",
        ] {
            assert!(line.contains(label), "{label} in {line}");
        }
    }
    let received = metrics
        .lines()
        .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert_eq!(received, 23.0, "the bytes the client sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_standard_metrics_carry_their_labels() {
    let o = origin_with(Arc::new(|_, n| {
        if n == 0 {
            Reply::ok("x").status(500)
        } else {
            Reply::ok("o")
        }
    }))
    .await;
    let routes = "- retries: {attempts: 0}\n  action: {forward: [{cluster: reviews-v2}]}";
    let p = proxy(&config(routes, &cluster("reviews-v2", &[&o], ""))).await;
    let c = client();
    for _ in 0..3 {
        send(&c, p.explicit.unwrap(), "svc:9080", "/", &[]).await;
    }
    let metrics = send(&c, p.metrics.unwrap(), "x", "/stats/prometheus", &[])
        .await
        .body;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("no istio_requests_total: {metrics}"));
    for label in [
        "reporter=\"source\"",
        "source_workload=\"productpage-v1\"",
        "source_workload_namespace=\"default\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/productpage\"",
        "source_app=\"productpage\"",
        "source_version=\"v1\"",
        "destination_workload=\"reviews-v2\"",
        "destination_service=\"svc.default.svc.cluster.local\"",
        "destination_service_name=\"svc\"",
        "destination_service_namespace=\"default\"",
        "request_protocol=\"http\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"none\"",
    ] {
        assert!(line.contains(label), "{label} missing from {line}");
    }
    assert!(line.ends_with(" 2"), "{line}");
    assert!(metrics.contains("istio_requests_total{") && metrics.contains("response_code=\"500\""));
    assert!(metrics.contains("istio_request_duration_milliseconds_bucket{"));
    assert!(metrics.contains("le=\"0.5\"") && metrics.contains("le=\"3600000\""));
    assert!(metrics.contains("istio_response_bytes_bucket{"));
}

//! Connection-pool limits (circuit breakers) and local rate limits, each
//! tripping with its reason.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

async fn concurrent(p: &mesh_proxy::Running, n: usize, path: &'static str) -> Vec<Got> {
    let c = client();
    let to = p.explicit.unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { send(&c, to, "svc:9080", path, &[]).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_and_pending_requests_trip_with_circuit_open() {
    let slow = origin_with(Arc::new(|_, _| {
        Reply::ok("ok").delay(Duration::from_millis(400))
    }))
    .await;
    let extra = "connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}";
    let p = proxy(&config(
        "- action: {forward: [{cluster: slow}]}",
        &cluster("slow", &[&slow], extra),
    ))
    .await;
    let results = concurrent(&p, 6, "/").await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    let open = results
        .iter()
        .filter(|r| r.status == 503 && r.reason() == "circuit open")
        .count();
    assert_eq!(
        (ok, open),
        (2, 4),
        "one active and one pending: {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(slow.connections(), 1, "never more than one connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_requests_trip_with_circuit_open() {
    let slow = origin_with(Arc::new(|_, _| {
        Reply::ok("ok").delay(Duration::from_millis(400))
    }))
    .await;
    let extra = "connectionPool: {http: {http2MaxRequests: 2}}";
    let p = proxy(&config(
        "- action: {forward: [{cluster: slow}]}",
        &cluster("slow", &[&slow], extra),
    ))
    .await;
    let results = concurrent(&p, 5, "/").await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    let open = results
        .iter()
        .filter(|r| r.reason() == "circuit open")
        .count();
    assert_eq!((ok, open), (2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_opens_new_connections() {
    let o = origin("o").await;
    let extra = "connectionPool: {http: {maxRequestsPerConnection: 2}}";
    let p = proxy(&config(
        "- action: {forward: [{cluster: o}]}",
        &cluster("o", &[&o], extra),
    ))
    .await;
    let c = client();
    for _ in 0..6 {
        assert_eq!(
            send(&c, p.explicit.unwrap(), "svc:9080", "/", &[])
                .await
                .status,
            200
        );
    }
    assert_eq!(o.connections(), 3, "6 requests, 2 per connection");
    let o2 = origin("o2").await;
    let p2 = proxy(&config(
        "- action: {forward: [{cluster: o}]}",
        &cluster("o", &[&o2], ""),
    ))
    .await;
    for _ in 0..6 {
        send(&c, p2.explicit.unwrap(), "svc:9080", "/", &[]).await;
    }
    assert_eq!(o2.connections(), 1, "unlimited: one keep-alive connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_retries() {
    let failing = origin_with(Arc::new(|_, _| {
        Reply::ok("no")
            .status(503)
            .delay(Duration::from_millis(100))
    }))
    .await;
    let extra = "connectionPool: {http: {maxRetries: 1}}";
    let routes =
        "- retries: {attempts: 5, retryOn: 5xx, backoff: 1ms}\n  action: {forward: [{cluster: f}]}";
    let p = proxy(&config(routes, &cluster("f", &[&failing], extra))).await;
    let results = concurrent(&p, 10, "/").await;
    assert!(results.iter().all(|r| r.status == 503));
    // Unbounded, 10 requests × 6 attempts = 60 hits.
    assert!(
        failing.hits() < 40,
        "retries multiplied load: {} hits",
        failing.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_rate_limit_answers_429_with_retry_after() {
    let app = origin("app").await;
    let port = free_port();
    // Inbound traffic reaches the app at its port; here the "app port" is
    // the inbound listener's own (no redirect in this test).
    let cfg = format!(
        "version: rl\nworkload: {{name: ratings-v1, namespace: default}}\ninbound:\n  appAddress: 127.0.0.1\n  ports: [{{port: {port}, targetPort: {}, protocol: HTTP}}]\n  rateLimits:\n  - total: {{requestsPerSecond: 5, burst: 5}}\n",
        app.addr.port()
    );
    let proxy = Arc::new(mesh_proxy::Proxy::new(vec![]));
    proxy.apply(serde_yaml::from_str(&cfg).unwrap()).unwrap();
    let addrs = mesh_proxy::Addrs {
        outbound: None,
        inbound: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        explicit: None,
        gateway_bind: None,
        admin: None,
        metrics: None,
        ready: None,
    };
    let running = mesh_proxy::start(proxy, addrs, Default::default(), None)
        .await
        .unwrap();
    let c = client();
    let to = running.inbound.unwrap();
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(send(&c, to, "ratings:9080", "/ratings/1", &[]).await.status);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    let r = send(&c, to, "ratings:9080", "/ratings/1", &[]).await;
    assert_eq!((r.status, r.reason()), (429, "rate limited"));
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(app.hits(), 5);
}

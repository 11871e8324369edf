//! Faults, retries, timeouts, outlier detection and mirroring.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_abort_and_delay_rates_are_within_tolerance() {
    let o = origin("o").await;
    let routes = r#"- match: [{uri: {prefix: /abort}}]
  fault: {abort: {httpStatus: 503, percentage: {value: 10}}}
  action: {forward: [{cluster: o}]}
- match: [{uri: {prefix: /delay}}]
  fault: {delay: {fixedDelay: 100ms, percentage: {value: 20}}}
  action: {forward: [{cluster: o}]}
- match: [{uri: {prefix: /grpc}}]
  fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
  action: {forward: [{cluster: o}]}"#;
    let p = proxy(&config(routes, &cluster("o", &[&o], ""))).await;
    let to = p.explicit.unwrap();
    let c = client();
    let mut aborted = 0;
    for _ in 0..1000 {
        let r = send(&c, to, "svc:9080", "/abort", &[]).await;
        if r.status == 503 {
            assert_eq!(r.reason(), "fault injected");
            aborted += 1;
        }
    }
    assert!(
        (70..=130).contains(&aborted),
        "10% of 1000 aborted, got {aborted}"
    );
    // Delays: 200 requests in parallel batches; about 20% take ≥ 100ms.
    let mut delayed = 0;
    for _ in 0..5 {
        let batch: Vec<_> = (0..40)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { send(&c, to, "svc:9080", "/delay", &[]).await })
            })
            .collect();
        for t in batch {
            let r = t.await.unwrap();
            assert_eq!(r.status, 200);
            if r.elapsed >= Duration::from_millis(100) {
                delayed += 1;
            }
        }
    }
    assert!(
        (20..=62).contains(&delayed),
        "20% of 200 delayed, got {delayed}"
    );
    let r = send(
        &c,
        to,
        "svc:9080",
        "/grpc",
        &[("content-type", "application/grpc")],
    )
    .await;
    assert_eq!(
        (r.status, &r.headers["grpc-status"]),
        (200, &"14".parse::<http::HeaderValue>().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_an_upstream_failing_every_other_request() {
    let flaky = origin_with(Arc::new(|_, n| {
        if n % 2 == 0 {
            Reply::ok("boom").status(503)
        } else {
            Reply::ok("ok")
        }
    }))
    .await;
    let routes = r#"- match: [{uri: {prefix: /retry}}]
  retries: {attempts: 3, retryOn: "5xx", perTryTimeout: 1s}
  action: {forward: [{cluster: flaky}]}
- retries: {attempts: 0}
  action: {forward: [{cluster: flaky}]}"#;
    let p = proxy(&config(routes, &cluster("flaky", &[&flaky], ""))).await;
    let c = client();
    let to = p.explicit.unwrap();
    for i in 0..50 {
        let r = send(&c, to, "svc:9080", "/retry", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok"), "request {i}");
    }
    assert_eq!(flaky.hits(), 100, "each request needed exactly one retry");
    // Without retries half the requests fail: the test above can fail.
    let mut failed = 0;
    for _ in 0..20 {
        if send(&c, to, "svc:9080", "/", &[]).await.status == 503 {
            failed += 1;
        }
    }
    assert_eq!(failed, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_move_to_another_host_on_connect_failure() {
    let good = origin("good").await;
    let dead = free_port();
    let clusters = format!(
        "- name: mixed\n  service: svc.default.svc.cluster.local\n  loadBalancer: {{simple: ROUND_ROBIN}}\n  endpoints:\n  - {{address: \"127.0.0.1:{dead}\"}}\n  - {{address: \"{}\"}}\n",
        good.addr
    );
    let p = proxy(&config(
        "- action: {forward: [{cluster: mixed}]}",
        &clusters,
    ))
    .await;
    let c = client();
    for _ in 0..10 {
        // Istio's default policy retries connect failures.
        assert_eq!(
            send(&c, p.explicit.unwrap(), "svc:9080", "/", &[])
                .await
                .status,
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_fires_with_504() {
    let slow = origin_with(Arc::new(|_, _| {
        Reply::ok("late").delay(Duration::from_secs(3))
    }))
    .await;
    let routes = "- timeout: 200ms\n  action: {forward: [{cluster: slow}]}";
    let p = proxy(&config(routes, &cluster("slow", &[&slow], ""))).await;
    let r = send(&client(), p.explicit.unwrap(), "svc:9080", "/", &[]).await;
    assert_eq!((r.status, r.reason()), (504, "upstream timeout"));
    assert!(
        r.elapsed < Duration::from_millis(1500),
        "took {:?}",
        r.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_host_and_lets_it_return() {
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let bad = origin_with(Arc::new(move |_, _| {
        if b.load(Ordering::SeqCst) {
            Reply::ok("bad").status(500)
        } else {
            Reply::ok("bad-recovered")
        }
    }))
    .await;
    let good = origin("good").await;
    let extra = "loadBalancer: {simple: ROUND_ROBIN}\noutlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}";
    let routes = "- retries: {attempts: 0}\n  action: {forward: [{cluster: pair}]}";
    let p = proxy(&config(routes, &cluster("pair", &[&bad, &good], extra))).await;
    let c = client();
    let to = p.explicit.unwrap();
    let mut errors = 0;
    for _ in 0..40 {
        if send(&c, to, "svc:9080", "/", &[]).await.status == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "after 3 consecutive 5xx the host is ejected");
    let hits_while_ejected = bad.hits();
    for _ in 0..20 {
        assert_eq!(send(&c, to, "svc:9080", "/", &[]).await.body, "good");
    }
    assert_eq!(
        bad.hits(),
        hits_while_ejected,
        "no traffic to the ejected host"
    );
    broken.store(false, Ordering::SeqCst);
    // The ejection lasts 1s: poll until the host is back, within 3s.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut back = false;
    while !back && std::time::Instant::now() < deadline {
        back = send(&c, to, "svc:9080", "/", &[]).await.body == "bad-recovered";
    }
    assert!(back, "the host returns after its ejection time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_traffic_arrives_without_slowing_the_main_request() {
    let main = origin("main").await;
    let shadow = origin_with(Arc::new(|_, _| {
        Reply::ok("shadow")
            .status(500)
            .delay(Duration::from_millis(500))
    }))
    .await;
    let routes = "- mirrors: [{cluster: shadow, percentage: {value: 100}}]\n  action: {forward: [{cluster: main}]}";
    let clusters = format!(
        "{}\n{}",
        cluster("main", &[&main], ""),
        cluster("shadow", &[&shadow], "")
    );
    let p = proxy(&config(routes, &clusters)).await;
    let c = client();
    for _ in 0..10 {
        let r = send_req(
            &c,
            p.explicit.unwrap(),
            "POST",
            "svc:9080",
            "/order",
            &[],
            bytes::Bytes::from_static(b"{\"id\":1}"),
        )
        .await;
        assert_eq!((r.status, r.body.as_str()), (200, "main"));
        assert!(
            r.elapsed < Duration::from_millis(300),
            "main request slowed: {:?}",
            r.elapsed
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || shadow.hits() == 10).await,
        "mirror got {}",
        shadow.hits()
    );
    let s = &shadow.seen()[0];
    assert_eq!(s.headers["host"], "svc-shadow:9080");
    assert_eq!(&s.body[..], b"{\"id\":1}");
}

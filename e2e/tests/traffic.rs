//! Traffic management through real binaries: `mesh-pilot`, `mesh-proxy`
//! sidecars (explicit mode) and gateway, and `mesh-sample` apps, as
//! separate processes on loopback. Requests enter at the ingress gateway,
//! reach caller-service, which calls callme-service through its sidecar.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_e2e::mesh::{LocalMesh, Outcome, entry, workload};
use mesh_e2e::*;

const SUBSETS: &str = include_str!("../../samples/callme/networking/destination-rule.yaml");
const SEED_RULE: &str =
    include_str!("../../samples/callme/networking/virtual-service-split-faults.yaml");
/// The same rule as the seed article wrote it: an Istio 0.x RouteRule, with
/// the subsets coming from its version labels.
const SEED_ROUTE_RULE: &str = include_str!("../../samples/callme/networking/routerule-legacy.yaml");

async fn callme_mesh(name: &str) -> LocalMesh {
    let m = LocalMesh::start(
        name,
        &[("caller-service", 8090), ("callme-service", 8091)],
        &[
            workload("caller-v1", "caller", "v1", "caller-service"),
            workload("callme-v1", "callme", "v1", "callme-service"),
            workload("callme-v2", "callme", "v2", "callme-service"),
        ],
        ("/caller", "caller-service", 8090),
    )
    .await;
    m.write("subsets.yaml", SUBSETS);
    m
}

/// A VirtualService for callme-service with these `http` routes (YAML).
fn callme_vs(http: &str) -> String {
    format!(
        "apiVersion: networking.mesh.dev/v1\nkind: VirtualService\nmetadata: {{name: callme-service}}\n\
         spec:\n  hosts: [callme-service]\n  http:\n{http}"
    )
}

/// Which callme answered, by body.
fn tally(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for o in outcomes {
        let key = if o.status == 200 {
            o.body.rsplit(' ').next().unwrap_or_default().to_string()
        } else {
            format!("status {}", o.status)
        };
        *t.entry(key).or_default() += 1;
    }
    t
}

/// Waits until `n` requests in a row answer with a body ending in `want`:
/// a change has applied when the old config could not do that.
async fn settle(m: &LocalMesh, headers: &[(&str, &str)], want: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = m.requests("/caller/ping", headers, n, 1).await;
        if o.iter().all(|o| o.status == 200 && o.body.ends_with(want)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} in a row from {want}: {:?}",
            tally(&o)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until the load has `n` answers.
async fn until_answered(done: &AtomicUsize, n: usize) {
    let ok = eventually(Duration::from_secs(10), || async {
        done.load(Ordering::Relaxed) >= n
    })
    .await;
    assert!(ok, "the load reached {n} requests");
}

/// Waits until a request answers with a body ending in `want`.
async fn until_body(m: &LocalMesh, headers: &[(&str, &str)], want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = m.requests("/caller/ping", headers, 1, 1).await;
        if o[0].status == 200 && o[0].body.ends_with(want) {
            return;
        }
        assert!(Instant::now() < deadline, "never answered {want}: {o:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_headers_retries_timeouts_and_mirroring() {
    let mut m = callme_mesh("traffic").await;

    // 80/20 within ±3% over 2,000 requests. All on v1 first, so that the
    // first v2 answer shows the split applied.
    m.write(
        "callme.yaml",
        &callme_vs("  - route: [{destination: {host: callme-service, subset: v1}}]\n"),
    );
    settle(&m, &[], "callme-service:v1", 30).await;
    m.write(
        "callme.yaml",
        &callme_vs(
            "  - route:\n    - {destination: {host: callme-service, subset: v1}, weight: 80}\n    - {destination: {host: callme-service, subset: v2}, weight: 20}\n",
        ),
    );
    until_body(&m, &[], "callme-service:v2").await;
    let out = m.requests("/caller/ping", &[], 2000, 16).await;
    let t = tally(&out);
    println!("80/20 split over 2,000 requests: {t:?}");
    let v2 = t.get("callme-service:v2").copied().unwrap_or(0) as f64 / 2000.0;
    assert_eq!(t.len(), 2, "only v1 and v2 answered, nothing failed: {t:?}");
    assert!((0.17..=0.23).contains(&v2), "v2 share {v2}: {t:?}");

    // Header routing: end-user jason goes to v2 (caller passes it on).
    m.write(
        "callme.yaml",
        &callme_vs(
            "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: callme-service, subset: v2}}]\n  - route: [{destination: {host: callme-service, subset: v1}}]\n",
        ),
    );
    settle(&m, &[("end-user", "jason")], "callme-service:v2", 30).await;
    settle(&m, &[], "callme-service:v1", 30).await;
    let jason = tally(
        &m.requests("/caller/ping", &[("end-user", "jason")], 100, 8)
            .await,
    );
    let others = tally(
        &m.requests("/caller/ping", &[("end-user", "mary")], 100, 8)
            .await,
    );
    assert_eq!(
        jason,
        BTreeMap::from([("callme-service:v2".to_string(), 100)])
    );
    assert_eq!(
        others,
        BTreeMap::from([("callme-service:v1".to_string(), 100)])
    );

    // Retries mask a failing instance: a broken v1 instance answers 500
    // (which the default policy, like Istio's, does not retry).
    let broken = m.app("broken", 500).await;
    m.write(
        "broken.yaml",
        &entry("callme-v1-broken", "callme-service", "v1", broken.addr),
    );
    m.write(
        "callme.yaml",
        &callme_vs("  - route: [{destination: {host: callme-service, subset: v1}}]\n"),
    );
    let reached = eventually(Duration::from_secs(10), || async {
        broken.hits() > 0 || {
            m.requests("/caller/ping", &[], 10, 2).await;
            false
        }
    })
    .await;
    assert!(reached, "the broken instance is in the rotation");
    let without = tally(&m.requests("/caller/ping", &[], 100, 4).await);
    assert!(
        without.keys().any(|k| k.starts_with("status 5")),
        "without retries the broken instance shows: {without:?}"
    );
    m.write(
        "callme.yaml",
        &callme_vs(
            "  - route: [{destination: {host: callme-service, subset: v1}}]\n    retries: {attempts: 3, retryOn: 5xx}\n",
        ),
    );
    // Half the requests failed before: 30 in a row succeeding shows it.
    settle(&m, &[], "callme-service:v1", 30).await;
    let hits_before = broken.hits();
    let with = tally(&m.requests("/caller/ping", &[], 200, 4).await);
    println!("retries: without {without:?}, with {with:?}");
    assert_eq!(
        with,
        BTreeMap::from([("callme-service:v1".to_string(), 200)])
    );
    assert!(
        broken.hits() > hits_before,
        "the broken instance was still tried"
    );
    m.remove("broken.yaml");

    // Timeouts: callme delayed 2 s (at caller's sidecar); the gateway's
    // route times out at 300 ms and answers 504 after about that.
    m.write(
        "callme.yaml",
        &callme_vs(
            "  - fault: {delay: {percentage: {value: 100}, fixedDelay: 2s}}\n    route: [{destination: {host: callme-service, subset: v1}}]\n",
        ),
    );
    m.gateway_route(", timeout: 300ms");
    let timed_out = eventually(Duration::from_secs(10), || async {
        let o = m.requests("/caller/ping", &[], 1, 1).await;
        o[0].status == 504 && o[0].took < Duration::from_millis(1500)
    })
    .await;
    assert!(timed_out, "the route timeout answered 504");
    let o = m.requests("/caller/ping", &[], 10, 10).await;
    for x in &o {
        assert_eq!(x.status, 504, "{o:?}");
        assert!(
            x.took >= Duration::from_millis(290) && x.took < Duration::from_millis(1500),
            "{o:?}"
        );
    }
    m.gateway_route("");

    // Mirroring: every request answered by v1, and a copy sent to the
    // mirror, whose answers are dropped.
    let mirror = m.app("mirror", 200).await;
    m.write(
        "mirror.yaml",
        &entry("callme-mirror", "callme-service", "mirror", mirror.addr),
    );
    m.write(
        "subsets.yaml",
        &format!("{SUBSETS}  - name: mirror\n    labels:\n      version: mirror\n"),
    );
    m.write(
        "callme.yaml",
        &callme_vs(
            "  - route: [{destination: {host: callme-service, subset: v1}}]\n    mirror: {host: callme-service, subset: mirror}\n    mirrorPercentage: {value: 100}\n",
        ),
    );
    let mirrored = eventually(Duration::from_secs(10), || async {
        m.requests("/caller/ping", &[], 1, 1).await;
        mirror.hits() > 0
    })
    .await;
    assert!(mirrored, "the mirror got copies");
    let before = mirror.hits();
    let out = tally(&m.requests("/caller/ping", &[], 100, 4).await);
    assert_eq!(
        out,
        BTreeMap::from([("callme-service:v1".to_string(), 100)])
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            mirror.hits() >= before + 100
        })
        .await,
        "every request mirrored: {} of 100",
        mirror.hits() - before
    );
    m.kill("caller-v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_articles_callme_rule_behaves_as_written() {
    let m = callme_mesh("seed").await;
    m.write("callme.yaml", SEED_RULE);
    seed_rule_holds(&m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_articles_legacy_route_rule_behaves_as_written() {
    // The RouteRule file alone: pilot converts it on read, its version
    // labels becoming the subsets.
    let m = callme_mesh("legacy").await;
    m.remove("subsets.yaml");
    m.write("routerule.yaml", SEED_ROUTE_RULE);
    seed_rule_holds(&m).await;
}

/// 20/80 between v1 and v2, 10% delayed 5 s, 10% aborted with 500.
async fn seed_rule_holds(m: &LocalMesh) {
    let applied = eventually(Duration::from_secs(10), || async {
        m.requests("/caller/ping", &[], 20, 10)
            .await
            .iter()
            .any(|o| o.status == 500)
    })
    .await;
    assert!(applied, "the rule's aborts show");
    let n = 600;
    let out = m.requests("/caller/ping", &[], n, 64).await;
    let t = tally(&out);
    let share = |k: &str| t.get(k).copied().unwrap_or(0) as f64 / n as f64;
    let delayed = out
        .iter()
        .filter(|o| o.took >= Duration::from_millis(4900))
        .count() as f64
        / n as f64;
    println!("seed rule over {n} requests: {t:?}, delayed {delayed:.3}");
    // Aborts and delays: 10% ± 5% each (over 4 standard deviations).
    assert!((0.05..=0.15).contains(&share("status 500")), "{t:?}");
    assert!((0.05..=0.15).contains(&delayed), "delayed {delayed}");
    // Of what was not aborted, 20/80 ± 6%.
    let served = share("callme-service:v1") + share("callme-service:v2");
    let v1 = share("callme-service:v1") / served;
    assert!((0.14..=0.26).contains(&v1), "v1 share {v1}: {t:?}");
    assert!(
        t.keys()
            .all(|k| k.starts_with("callme-service:") || k == "status 500"),
        "{t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_ejected_and_changes_under_load_fail_nothing() {
    let mut m = LocalMesh::start(
        "eject",
        &[("caller-service", 8090), ("callme-service", 8091)],
        &[
            workload("caller-v1", "caller", "v1", "caller-service"),
            workload("callme-v1", "callme", "v1", "callme-service"),
            workload("callme-v1b", "callme", "v1", "callme-service"),
            workload("callme-v2", "callme", "v2", "callme-service"),
        ],
        ("/caller", "caller-service", 8090),
    )
    .await;
    m.write(
        "subsets.yaml",
        &SUBSETS.replace(
            "  subsets:",
            "  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}\n  subsets:",
        ),
    );
    // No retries here, so that what reaches the dead instance shows.
    m.write(
        "callme.yaml",
        &callme_vs(
            "  - route: [{destination: {host: callme-service, subset: v1}}]\n    retries: {attempts: 0}\n",
        ),
    );
    until_body(&m, &[], "callme-service:v1").await;
    let out = m.requests("/caller/ping", &[], 20, 1).await;
    assert!(
        out.iter().all(|o| o.status == 200),
        "both instances up: {:?}",
        tally(&out)
    );

    // Outlier ejection: one of the two v1 instances is killed; after two
    // failures it is ejected and nothing fails any more.
    m.kill("callme-v1b");
    let out = m.requests("/caller/ping", &[], 200, 1).await;
    let failures: Vec<usize> = out
        .iter()
        .enumerate()
        .filter(|(_, o)| o.status != 200)
        .map(|(i, _)| i)
        .collect();
    println!("after killing an instance: failed requests {failures:?} of 200");
    assert!(
        !failures.is_empty() && failures.len() <= 2,
        "ejected after 2 errors: {failures:?}"
    );
    // The balancer picks the dead instance about every other request, so
    // its second failure comes early (50 misses in a row: 2^-50).
    assert!(
        failures.iter().all(|i| *i < 50),
        "no failure once ejected: {failures:?}"
    );

    // A route change under steady load fails nothing.
    let done = Arc::new(AtomicUsize::new(0));
    let (out, ()) = tokio::join!(
        m.requests_counted("/caller/ping", 600, 4, done.clone()),
        async {
            until_answered(&done, 100).await;
            m.write(
                "callme.yaml",
                &callme_vs("  - route: [{destination: {host: callme-service, subset: v2}}]\n"),
            );
        }
    );
    let t = tally(&out);
    println!("route change under load: {t:?}");
    assert_eq!(out.iter().filter(|o| o.status != 200).count(), 0, "{t:?}");
    assert!(
        t.contains_key("callme-service:v2"),
        "the change applied: {t:?}"
    );
    assert!(
        out.last().unwrap().body.ends_with("callme-service:v2"),
        "{t:?}"
    );

    // Pilot killed and restarted under load fails nothing either.
    let done = Arc::new(AtomicUsize::new(0));
    let (out, ()) = tokio::join!(
        m.requests_counted("/caller/ping", 600, 4, done.clone()),
        async {
            until_answered(&done, 100).await;
            m.kill_pilot();
            // Requests keep being served while pilot is gone.
            let before = done.load(Ordering::Relaxed);
            until_answered(&done, before + 150).await;
            m.restart_pilot().await;
            // And after it is back.
            let back = done.load(Ordering::Relaxed);
            until_answered(&done, back + 100).await;
        }
    );
    let failed: Vec<&str> = out
        .iter()
        .filter(|o| o.status != 200)
        .map(|o| o.body.as_str())
        .collect();
    assert_eq!(failed, Vec::<&str>::new(), "{:?}", tally(&out));
    // The proxies reconnected to the new pilot: a change made now reaches
    // them.
    m.write(
        "callme.yaml",
        &callme_vs("  - route: [{destination: {host: callme-service, subset: v1}}]\n"),
    );
    until_body(&m, &[], "callme-service:v1").await;
}

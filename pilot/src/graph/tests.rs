use super::*;

const CALLER: &str = r#"# TYPE istio_requests_total counter
istio_requests_total{reporter="source",source_workload="productpage-v1",source_workload_namespace="default",source_app="productpage",source_version="v1",destination_workload="reviews-v2",destination_workload_namespace="default",destination_app="reviews",destination_version="v2",destination_service="reviews.default.svc.cluster.local",request_protocol="http",response_code="200",connection_security_policy="unknown"} 90
istio_requests_total{reporter="source",source_workload="productpage-v1",source_workload_namespace="default",source_app="productpage",source_version="v1",destination_workload="reviews-v2",destination_workload_namespace="default",destination_app="reviews",destination_version="v2",destination_service="reviews.default.svc.cluster.local",request_protocol="http",response_code="503",connection_security_policy="unknown"} 10
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="productpage-v1",source_workload_namespace="default",source_app="productpage",source_version="v1",destination_workload="reviews-v2",destination_workload_namespace="default",destination_app="reviews",destination_version="v2",destination_service="reviews.default.svc.cluster.local",request_protocol="http",response_code="200",le="10"} 50
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="productpage-v1",source_workload_namespace="default",source_app="productpage",source_version="v1",destination_workload="reviews-v2",destination_workload_namespace="default",destination_app="reviews",destination_version="v2",destination_service="reviews.default.svc.cluster.local",request_protocol="http",response_code="200",le="100"} 100
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="productpage-v1",source_workload_namespace="default",source_app="productpage",source_version="v1",destination_workload="reviews-v2",destination_workload_namespace="default",destination_app="reviews",destination_version="v2",destination_service="reviews.default.svc.cluster.local",request_protocol="http",response_code="200",le="+Inf"} 100
mesh_proxy_downstream_connections 3
"#;

const CALLEE: &str = r#"istio_requests_total{reporter="destination",source_workload="productpage-v1",source_workload_namespace="default",source_app="productpage",source_version="v1",destination_workload="reviews-v2",destination_workload_namespace="default",destination_app="reviews",destination_version="v2",destination_service="reviews.default.svc.cluster.local",request_protocol="http",response_code="200",connection_security_policy="mutual_tls"} 95
istio_requests_total{reporter="destination",source_workload="unknown",source_workload_namespace="unknown",source_principal="unknown",source_app="unknown",source_version="unknown",destination_workload="reviews-v2",destination_workload_namespace="default",destination_app="reviews",destination_version="v2",destination_service="reviews.default.svc.cluster.local",request_protocol="http",response_code="200",connection_security_policy="none"} 4
"#;

#[test]
fn lines_parse_with_escapes() {
    let (name, labels, value) =
        parse_line(r#"m{a="x",b="q\"uote\\d",c="line\nbreak"} 12.5"#).unwrap();
    assert_eq!(name, "m");
    assert_eq!(value, 12.5);
    assert_eq!(
        labels,
        vec![
            ("a", "x".to_string()),
            ("b", "q\"uote\\d".to_string()),
            ("c", "line\nbreak".to_string())
        ]
    );
    assert_eq!(parse_line("plain 3").unwrap().2, 3.0);
    assert!(parse_line("# HELP x").is_none());
    assert!(parse_line(r#"m{a="unterminated} 1"#).is_none());
    assert!(parse_line("m{} notanumber").is_none());
}

#[test]
fn quantiles_interpolate_within_a_bucket() {
    let b = [(10.0, 50.0), (100.0, 100.0), (f64::INFINITY, 100.0)];
    assert_eq!(quantile(0.5, &b), Some(10.0));
    assert_eq!(quantile(0.99, &b), Some(10.0 + 90.0 * (49.0 / 50.0)));
    assert_eq!(quantile(0.99, &[(10.0, 0.0), (f64::INFINITY, 0.0)]), None);
    assert_eq!(quantile(0.99, &[]), None);
}

/// A reading of proxies by id, each with its exposition.
fn reading(proxies: &[(&str, &str)]) -> Reading {
    proxies
        .iter()
        .map(|(id, text)| {
            let mut s = Sample::default();
            add_exposition(&mut s, text);
            (id.to_string(), s)
        })
        .collect()
}

#[test]
fn edges_come_from_callers_with_mtls_from_callees() {
    // Both proxies answered before, with nothing counted yet.
    let old = reading(&[("caller", ""), ("callee", "")]);
    let new = reading(&[("caller", CALLER), ("callee", CALLEE)]);
    let edges = rates(&old, &new, 10.0);
    assert_eq!(edges.len(), 2, "{edges:#?}");
    let main = edges
        .iter()
        .map(|(_, e)| e)
        .find(|e| e.source == "default/productpage-v1")
        .unwrap();
    assert_eq!(main.target, "default/reviews-v2");
    assert_eq!(main.service, "reviews.default.svc.cluster.local");
    assert_eq!(
        main.rps, 10.0,
        "100 requests in 10 s, the callee's 95 not counted twice"
    );
    assert!((main.error_rate - 0.1).abs() < 1e-9);
    assert_eq!(main.mtls, Some(true));
    assert!(main.p99_ms.unwrap() > 90.0);
    // A caller without a sidecar is seen by the callee.
    let outside = edges
        .iter()
        .map(|(_, e)| e)
        .find(|e| e.source == "unknown/unknown")
        .unwrap();
    assert_eq!(outside.rps, 0.4);
    assert_eq!(outside.mtls, Some(false));
}

#[test]
fn rates_are_differences_and_the_first_reading_has_none() {
    let first = reading(&[("caller", CALLER)]);
    assert!(rates(&first, &first, 0.0).iter().all(|(_, e)| e.rps == 0.0));
    let later = reading(&[("caller", &CALLER.replace("} 90\n", "} 130\n"))]);
    let edges = rates(&first, &later, 4.0);
    let e = &edges[0].1;
    assert_eq!(e.rps, 10.0, "40 more requests in 4 s");
    assert_eq!(e.error_rate, 0.0, "no new errors");
    assert_eq!(e.p99_ms, None, "no new observations in the histogram");

    // A proxy seen for the first time has no baseline: its lifetime
    // counters are not this window's traffic.
    let newcomer = reading(&[
        ("caller", &CALLER.replace("} 90\n", "} 130\n")),
        ("other", CALLER),
    ]);
    assert_eq!(rates(&first, &newcomer, 4.0)[0].1.rps, 10.0);
    // One that vanished does not hide the others'; one that restarted
    // counts from zero.
    let restarted = reading(&[("caller", &CALLER.replace("} 90\n", "} 20\n"))]);
    assert_eq!(rates(&first, &restarted, 4.0)[0].1.rps, 30.0 / 4.0);
}

#[test]
fn tcp_callees_do_not_count_a_caller_twice() {
    let tcp = r#"istio_tcp_connections_opened_total{reporter="destination",source_workload="unknown",source_workload_namespace="default",source_principal="spiffe://cluster.local/ns/default/sa/db-client",source_app="unknown",source_version="unknown",destination_workload="db-v1",destination_workload_namespace="default",destination_app="db",destination_version="v1",destination_service="db.default.svc.cluster.local",request_protocol="tcp",connection_security_policy="mutual_tls"} 7
"#;
    let edges = rates(&reading(&[("db", "")]), &reading(&[("db", tcp)]), 1.0);
    assert!(
        edges.is_empty(),
        "the caller's sidecar reports it: {edges:?}"
    );
}

#[test]
fn the_view_marks_gateways_and_keeps_idle_workloads() {
    let g = Graph::default();
    g.state
        .lock()
        .unwrap()
        .samples
        .push_back((Instant::now(), reading(&[("caller", CALLER)])));
    let idle = NodeRef {
        namespace: "default".into(),
        workload: "ratings-v1".into(),
        app: "ratings".into(),
        version: "v1".into(),
    };
    let view = g.view(
        &[idle],
        &BTreeSet::from(["default/productpage-v1".to_string()]),
    );
    let kinds: BTreeMap<&str, &str> = view.nodes.iter().map(|n| (n.id.as_str(), n.kind)).collect();
    assert_eq!(kinds["default/productpage-v1"], "gateway");
    assert_eq!(kinds["default/reviews-v2"], "workload");
    assert_eq!(kinds["default/ratings-v1"], "workload");
    let json = serde_json::to_value(&view).unwrap();
    assert_eq!(json["windowSeconds"], 10);
    assert_eq!(json["nodes"][0]["app"], json["nodes"][0]["app"]);
    assert!(json["edges"][0].get("errorRate").is_some());
    assert!(json["edges"][0].get("p99Ms").is_some());
}

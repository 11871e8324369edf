//! Micro-benchmarks of the request hot path's pure pieces: route matching,
//! header operations, protocol detection, path normalization and
//! authorization decisions.
//!
//! `cargo bench -p mesh-proxy --bench routing` (add `-- --quick` for a fast
//! pass). The end-to-end numbers come from `bench/run.sh`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use mesh_api::networking::HttpMatchRequest;
use mesh_proxy::detect::classify;
use mesh_proxy::routing::{Here, RequestView, RouteMatch};
use mesh_proxy::state::HeaderOps;

/// A realistic VirtualService: ten routes mixing uri prefix, exact and
/// regex matches with header, query and method conditions. The request
/// benchmarked matches only the last one.
const ROUTES: [&str; 10] = [
    "{uri: {prefix: /api/v1/users}, headers: {x-tenant: {exact: acme}}}",
    "{uri: {regex: '/api/v1/orders/[0-9]+'}}",
    "{uri: {exact: /healthz}, method: {exact: GET}}",
    "{headers: {end-user: {exact: jason}}}",
    "{uri: {prefix: /static/}, withoutHeaders: {x-debug: {}}}",
    "{uri: {regex: '/reviews/[a-z]+/v[0-9]+'}, headers: {x-canary: {regex: '(true|yes)'}}}",
    "{uri: {prefix: /productpage}, queryParams: {v: {exact: '2'}}}",
    "{authority: {prefix: admin.}, uri: {prefix: /}}",
    "{uri: {prefix: /PRODUCTPAGE/beta}, ignoreUriCase: true}",
    "{uri: {prefix: /productpage}, method: {exact: GET}, headers: {user-agent: {regex: '.*Mobile.*'}, cookie: {regex: '.*session=[a-f0-9]+.*'}}}",
];

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "bookinfo.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148",
        ),
        ("accept", "text/html,application/xhtml+xml"),
        ("accept-encoding", "gzip, deflate, br"),
        ("cookie", "theme=dark; session=9f86d081884c7d65"),
        ("x-request-id", "0f8fad5b-d9cb-469f-a165-70867728950e"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn route_matching(c: &mut Criterion) {
    let labels = BTreeMap::new();
    let gateways = ["mesh".to_string()];
    let here = Here {
        labels: &labels,
        namespace: "default",
        gateways: &gateways,
    };
    let table: Vec<RouteMatch> = ROUTES
        .iter()
        .map(|y| {
            let m: HttpMatchRequest = serde_yaml::from_str(y).expect("route match YAML");
            RouteMatch::compile(&m, &here).expect("route match compiles")
        })
        .collect();
    let headers = request_headers();
    let view = |path| RequestView {
        method: "GET",
        path,
        query: Some("u=normal&lang=en"),
        scheme: "http",
        authority: "bookinfo.example.com",
        port: 80,
        headers: &headers,
    };
    let hit = view("/productpage");
    let miss = view("/nowhere/at/all");
    assert_eq!(table.iter().position(|m| m.matches(&hit)), Some(9));
    assert_eq!(table.iter().position(|m| m.matches(&miss)), None);

    let mut g = c.benchmark_group("route_match");
    g.bench_function("10_routes_last_matches", |b| {
        b.iter(|| table.iter().position(|m| m.matches(black_box(&hit))))
    });
    g.bench_function("10_routes_none_matches", |b| {
        b.iter(|| table.iter().position(|m| m.matches(black_box(&miss))))
    });
    g.finish();
}

fn header_ops(c: &mut Criterion) {
    let name = HeaderName::from_static;
    let value = HeaderValue::from_static;
    let ops = HeaderOps {
        set: vec![
            (name("x-mesh-route"), value("productpage-v2")),
            (name("x-forwarded-proto"), value("http")),
        ],
        add: vec![(name("x-mesh-hop"), value("gateway"))],
        remove: vec![name("cookie"), name("x-b3-traceid")],
    };
    let headers = request_headers();
    c.bench_function("header_ops_apply", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                ops.apply(&mut h);
                h
            },
            BatchSize::SmallInput,
        )
    });
}

fn protocol_detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("detect_classify");
    for (what, first) in [
        (
            "http1",
            &b"GET /productpage HTTP/1.1\r\nHost: bookinfo\r\n"[..24],
        ),
        ("http2", &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
        ("tls", &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01][..]),
        ("tcp", &b"\x00\x00\x00\x1c\x7f\x00binary protocol"[..]),
    ] {
        assert!(classify(first).is_some(), "{what}");
        g.bench_function(what, |b| b.iter(|| classify(black_box(first))));
    }
    g.finish();
}

fn authorization(c: &mut Criterion) {
    use mesh_proxy::authz::{Attrs, Authz, HttpAttrs, normalize_path};
    let mut g = c.benchmark_group("authz");
    for (what, path) in [
        ("normalize/already normal", "/api/v1/products/0/reviews"),
        (
            "normalize/dot segments",
            "/api/v1//products/./0/../0/reviews",
        ),
    ] {
        g.bench_function(what, |b| b.iter(|| normalize_path(black_box(path))));
    }
    // Bookinfo-sized policies: a mesh-wide DENY of plaintext, a namespace
    // DENY on admin paths, an ALLOW list by principal and method; the
    // request is allowed by the last rule of the last policy.
    let policies: Vec<mesh_api::model::AuthorizationRules> = serde_yaml::from_str(
        r#"
- name: mesh-system/require-mtls
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
- name: default/no-admin
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"], methods: ["POST", "DELETE"]}}]}]
- name: default/reviews-viewer
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/ratings"]}}]
  - from: [{source: {namespaces: ["monitoring"]}}]
    to: [{operation: {paths: ["/metrics"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]
    to: [{operation: {methods: ["GET", "HEAD"], paths: ["/reviews/*"]}}]
"#,
    )
    .unwrap();
    let authz = Authz::new(&policies).unwrap();
    let headers = request_headers();
    let attrs = Attrs {
        source: "10.1.0.7:43210".parse().unwrap(),
        remote_ip: "10.1.0.7".parse().unwrap(),
        destination: "10.1.0.9:9080".parse().unwrap(),
        principal: Some("spiffe://cluster.local/ns/default/sa/bookinfo-productpage"),
        sni: None,
        http: Some(HttpAttrs {
            host: "reviews.default.svc.cluster.local",
            method: "GET",
            path: "/reviews/0",
            headers: &headers,
            auth: None,
        }),
    };
    g.bench_function("decide/3 policies, allowed by the last rule", |b| {
        b.iter(|| authz.decide(black_box(&attrs)))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = route_matching, header_ops, protocol_detection, authorization
}
criterion_main!(benches);

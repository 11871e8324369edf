//! Routing: weights, matches, rewrites, redirects, direct responses, CORS,
//! load balancing.

use std::collections::HashMap;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_20_80_within_3_percent() {
    let v1 = origin("v1").await;
    let v2 = origin("v2").await;
    let cfg = config(
        "- action: {forward: [{cluster: v1, weight: 20}, {cluster: v2, weight: 80}]}",
        &format!(
            "{}\n{}",
            cluster("v1", &[&v1], ""),
            cluster("v2", &[&v2], "")
        ),
    );
    let p = proxy(&cfg).await;
    let to = p.explicit.unwrap();
    let c = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..2000 {
        let r = send(&c, to, "svc:9080", "/", &[]).await;
        assert_eq!(r.status, 200);
        *counts.entry(r.body).or_default() += 1;
    }
    let share = counts["v1"] as f64 / 2000.0;
    assert!((share - 0.20).abs() <= 0.03, "v1 share {share}: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_uri_and_query_matches_pick_routes_in_order() {
    let v1 = origin("v1").await;
    let v2 = origin("v2").await;
    let v3 = origin("v3").await;
    let routes = r#"- match: [{headers: {end-user: {exact: jason}}}]
  action: {forward: [{cluster: v2}]}
- match: [{uri: {prefix: /api/v3}}, {uri: {regex: "/legacy/[0-9]+"}}]
  action: {forward: [{cluster: v3}]}
- match: [{queryParams: {canary: {exact: "1"}}}]
  action: {forward: [{cluster: v2}]}
- match: [{withoutHeaders: {x-anything: {}}}, {method: {exact: POST}}]
  action: {forward: [{cluster: v1}]}"#;
    let clusters = format!(
        "{}\n{}\n{}",
        cluster("v1", &[&v1], ""),
        cluster("v2", &[&v2], ""),
        cluster("v3", &[&v3], "")
    );
    let p = proxy(&config(routes, &clusters)).await;
    let to = p.explicit.unwrap();
    let c = client();
    assert_eq!(
        send(&c, to, "svc:9080", "/", &[("end-user", "jason")])
            .await
            .body,
        "v2"
    );
    assert_eq!(
        send(&c, to, "svc:9080", "/", &[("end-user", "bob")])
            .await
            .body,
        "v1"
    );
    // Without a port the request is for port 80, where svc has no destination.
    assert_eq!(send(&c, to, "svc", "/api/v3/items", &[]).await.status, 404);
    assert_eq!(
        send(
            &c,
            to,
            "svc.default.svc.cluster.local:9080",
            "/api/v3/items",
            &[]
        )
        .await
        .body,
        "v3"
    );
    assert_eq!(send(&c, to, "svc:9080", "/legacy/42", &[]).await.body, "v3");
    assert_eq!(
        send(&c, to, "svc:9080", "/legacy/42/x", &[]).await.body,
        "v1",
        "regexes match the whole path"
    );
    assert_eq!(
        send(&c, to, "svc:9080", "/p?a=b&canary=1", &[]).await.body,
        "v2"
    );
    // No route matches: 404 with the reason.
    let r = send(&c, to, "svc:9080", "/", &[("x-anything", "1")]).await;
    assert_eq!((r.status, r.reason()), (404, "no route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_passed_through_or_refused_by_policy() {
    let o = origin("direct").await;
    let cfg = config(
        "- action: {forward: [{cluster: v1}]}",
        &cluster("v1", &[&o], ""),
    );
    let p = proxy(&cfg).await;
    let c = client();
    let r = send(&c, p.explicit.unwrap(), &o.addr.to_string(), "/", &[]).await;
    assert_eq!(
        r.body, "direct",
        "ALLOW_ANY passes unknown destinations through"
    );
    let strict = cfg.replace(
        "version: t1\n",
        "version: t1\noutboundPolicy: REGISTRY_ONLY\n",
    );
    p.apply(serde_yaml::from_str(&strict).unwrap())
        .await
        .unwrap();
    let r = send(&c, p.explicit.unwrap(), &o.addr.to_string(), "/", &[]).await;
    assert_eq!((r.status, r.reason()), (404, "no route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_header_operations() {
    let o = origin("o").await;
    let routes = r#"- match: [{uri: {prefix: /old}}]
  rewrite: {uri: /new, authority: backend.internal}
  headers:
    request: {set: {x-set: "1"}, add: {x-added: a}, remove: [x-secret]}
    response: {set: {x-resp: "yes"}}
  action: {forward: [{cluster: o, headers: {request: {set: {x-backend: o}}}}]}
- match: [{uri: {regex: "/v[0-9]+/(.*)"}}]
  rewrite: {uriRegexRewrite: {match: "^/v[0-9]+/(.*)$", rewrite: "/\\1"}}
  action: {forward: [{cluster: o}]}"#;
    let p = proxy(&config(routes, &cluster("o", &[&o], ""))).await;
    let c = client();
    let r = send(
        &c,
        p.explicit.unwrap(),
        "svc:9080",
        "/old/path?q=1",
        &[("x-secret", "s")],
    )
    .await;
    assert_eq!(r.headers["x-resp"], "yes");
    let r2 = send(&c, p.explicit.unwrap(), "svc:9080", "/v2/items/7", &[]).await;
    assert_eq!(r2.status, 200);
    let seen = o.seen();
    assert_eq!(seen[0].path, "/new/path?q=1");
    assert_eq!(seen[0].headers["host"], "backend.internal");
    assert_eq!(seen[0].headers["x-set"], "1");
    assert_eq!(seen[0].headers["x-added"], "a");
    assert_eq!(seen[0].headers["x-backend"], "o");
    assert!(!seen[0].headers.contains_key("x-secret"));
    assert!(
        seen[0].headers.contains_key("x-request-id"),
        "a request id is added"
    );
    assert_eq!(seen[1].path, "/items/7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_and_direct_response() {
    let routes = r#"- match: [{uri: {exact: /moved}}]
  action: {redirect: {uri: /new-home, authority: example.com, redirectCode: 308}}
- match: [{uri: {exact: /teapot}}]
  action: {directResponse: {status: 418, body: {string: "short and stout"}}}"#;
    let p = proxy(&config(routes, "")).await;
    let c = client();
    let r = send(&c, p.explicit.unwrap(), "svc:9080", "/moved", &[]).await;
    assert_eq!(r.status, 308);
    assert_eq!(r.headers["location"], "http://example.com/new-home");
    let r = send(&c, p.explicit.unwrap(), "svc:9080", "/teapot", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (418, "short and stout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_is_answered_by_the_proxy() {
    let o = origin("o").await;
    let routes = r#"- corsPolicy:
    allowOrigins: [{exact: "https://shop.example.com"}, {regex: "https://.*\\.trusted\\.dev"}]
    allowMethods: [GET, POST]
    allowHeaders: [content-type]
    exposeHeaders: [x-trace]
    maxAge: 24h
    allowCredentials: true
  action: {forward: [{cluster: o}]}"#;
    let p = proxy(&config(routes, &cluster("o", &[&o], ""))).await;
    let c = client();
    let to = p.explicit.unwrap();
    let pre = [
        ("origin", "https://a.trusted.dev"),
        ("access-control-request-method", "POST"),
    ];
    let r = send_req(
        &c,
        to,
        "OPTIONS",
        "svc:9080",
        "/cart",
        &pre,
        Default::default(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://a.trusted.dev"
    );
    assert_eq!(r.headers["access-control-allow-methods"], "GET,POST");
    assert_eq!(r.headers["access-control-max-age"], "86400");
    assert_eq!(r.headers["access-control-allow-credentials"], "true");
    assert_eq!(o.hits(), 0, "the preflight never reached the upstream");
    let r = send(
        &c,
        to,
        "svc:9080",
        "/cart",
        &[("origin", "https://shop.example.com")],
    )
    .await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert_eq!(r.headers["access-control-expose-headers"], "x-trace");
    let r = send(
        &c,
        to,
        "svc:9080",
        "/cart",
        &[("origin", "https://evil.example")],
    )
    .await;
    assert!(!r.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancers_spread_and_stick() {
    let a = origin("a").await;
    let b = origin("b").await;
    let cc = origin("c").await;
    let routes = r#"- match: [{uri: {prefix: /rr}}]
  action: {forward: [{cluster: rr}]}
- match: [{uri: {prefix: /ring}}]
  action: {forward: [{cluster: ring}]}
- match: [{uri: {prefix: /maglev}}]
  action: {forward: [{cluster: maglev}]}
- action: {forward: [{cluster: lr}]}"#;
    let all = [&a, &b, &cc];
    let clusters = [
        cluster("rr", &all, "loadBalancer: {simple: ROUND_ROBIN}"),
        cluster("ring", &all, "loadBalancer: {consistentHash: {httpHeaderName: x-user}}"),
        cluster("maglev", &all, "loadBalancer: {consistentHash: {httpCookie: {name: session}, maglev: {tableSize: 65537}}}"),
        cluster("lr", &all, ""),
    ]
    .join("\n");
    let p = proxy(&config(routes, &clusters)).await;
    let c = client();
    let to = p.explicit.unwrap();
    let mut rr = HashMap::new();
    for _ in 0..30 {
        *rr.entry(send(&c, to, "svc:9080", "/rr", &[]).await.body)
            .or_insert(0) += 1;
    }
    assert_eq!(
        rr.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "round robin is even: {rr:?}"
    );
    for user in ["alice", "bob", "carol", "dave"] {
        let first = send(&c, to, "svc:9080", "/ring", &[("x-user", user)])
            .await
            .body;
        for _ in 0..10 {
            assert_eq!(
                send(&c, to, "svc:9080", "/ring", &[("x-user", user)])
                    .await
                    .body,
                first,
                "{user} sticks"
            );
        }
    }
    let mut cookies = std::collections::HashSet::new();
    for s in 0..20 {
        let cookie = format!("session=s{s}");
        let first = send(&c, to, "svc:9080", "/maglev", &[("cookie", &cookie)])
            .await
            .body;
        assert_eq!(
            send(&c, to, "svc:9080", "/maglev", &[("cookie", &cookie)])
                .await
                .body,
            first
        );
        cookies.insert(first);
    }
    assert!(cookies.len() > 1, "different sessions spread over hosts");
    let mut lr = HashMap::new();
    for _ in 0..60 {
        *lr.entry(send(&c, to, "svc:9080", "/", &[]).await.body)
            .or_insert(0) += 1;
    }
    assert_eq!(lr.len(), 3, "least request uses every host: {lr:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_cookie_with_ttl_is_generated_and_sticks() {
    let a = origin("a").await;
    let b = origin("b").await;
    let extra = "loadBalancer: {consistentHash: {httpCookie: {name: sticky, ttl: 1h, path: /}}}";
    let p = proxy(&config(
        "- action: {forward: [{cluster: s}]}",
        &cluster("s", &[&a, &b], extra),
    ))
    .await;
    let c = client();
    let to = p.explicit.unwrap();
    let first = send(&c, to, "svc:9080", "/", &[]).await;
    let set = first.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.starts_with("sticky=\"") && set.contains("Max-Age=3600") && set.contains("Path=/"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    for _ in 0..10 {
        let r = send(&c, to, "svc:9080", "/", &[("cookie", &cookie)]).await;
        assert_eq!(r.body, first.body, "the generated cookie pins the host");
        assert!(!r.headers.contains_key("set-cookie"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_and_the_config_dump() {
    let o = origin("o").await;
    let p = proxy(&config(
        "- action: {forward: [{cluster: o}]}",
        &cluster("o", &[&o], ""),
    ))
    .await;
    let got = raw(
        p.explicit.unwrap(),
        b"GET http://svc:9080/abs?x=1 HTTP/1.1\r\nHost: ignored.example\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(o.seen()[0].path, "/abs?x=1", "origin-form upstream");
    let dump = send(&client(), p.admin.unwrap(), "x", "/config_dump", &[]).await;
    let v: serde_json::Value = serde_json::from_str(&dump.body).unwrap();
    assert_eq!(v["version"], "t1");
    assert_eq!(
        v["destinations"][0]["host"],
        "svc.default.svc.cluster.local"
    );
}

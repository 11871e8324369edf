use super::*;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn trace_context_is_read_from_w3c_and_b3() {
    let read = |pairs: &[(&'static str, &str)]| TraceContext::incoming(&headers(pairs));
    let t = read(&[(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )])
    .unwrap();
    assert_eq!(
        t.ids,
        Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7))
    );
    assert_eq!(t.sampled, Some(true));
    assert!(t.w3c);
    let unsampled = read(&[(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    )]);
    assert_eq!(unsampled.unwrap().sampled, Some(false));

    let b3 = read(&[
        ("x-b3-traceid", "463ac35c9f6413ad"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ("x-b3-sampled", "1"),
    ])
    .unwrap();
    assert_eq!(b3.ids, Some((0x463ac35c9f6413ad, 0xa2fb4a1d1a96d312)));
    assert_eq!(b3.sampled, Some(true));
    assert!(!b3.w3c);
    // No sampling header: the caller deferred the decision.
    let deferred = read(&[
        ("x-b3-traceid", "463ac35c9f6413ad"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
    ]);
    assert_eq!(deferred.unwrap().sampled, None);

    let single = read(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]).unwrap();
    assert_eq!(single.ids.unwrap().1, 0xe457b5a2e4d86bd1);
    assert_eq!(single.sampled, Some(false));
    let with_parent = read(&[(
        "b3",
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d-05e3ac9a4f6e3b90",
    )]);
    assert_eq!(with_parent.unwrap().sampled, Some(true));
    let two_fields = read(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1")]);
    assert_eq!(two_fields.unwrap().sampled, None);
    // A decision alone.
    let deny = read(&[("b3", "0")]).unwrap();
    assert_eq!((deny.ids, deny.sampled), (None, Some(false)));
    assert_eq!(read(&[("x-b3-sampled", "1")]).unwrap().sampled, Some(true));

    // Malformed or all-zero ids are no context at all.
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-xyz",
    ] {
        assert_eq!(read(&[("traceparent", bad)]), None, "{bad}");
    }
    for bad in [
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-x",
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-zz",
        "2",
    ] {
        assert_eq!(read(&[("b3", bad)]), None, "{bad}");
    }
}

#[test]
fn a_request_gets_its_span_under_the_callers_and_its_decision() {
    let caller = headers(&[(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    )]);
    let t = TraceContext::for_request(&caller, 100.0);
    assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert_eq!(t.parent, Some(0x00f067aa0ba902b7));
    assert!(!t.sampled, "the caller's decision stands");
    // Deferred: this proxy's rate decides.
    let deferred = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1")]);
    assert!(!TraceContext::for_request(&deferred, 0.0).sampled);
    assert!(TraceContext::for_request(&deferred, 100.0).sampled);
    // A decision alone starts a trace with it.
    let deny = TraceContext::for_request(&headers(&[("b3", "0")]), 100.0);
    assert_eq!(deny.parent, None);
    assert!(!deny.sampled);
}

#[test]
fn a_child_span_is_written_in_both_formats() {
    let parent = TraceContext {
        trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
        span_id: 0x00f067aa0ba902b7,
        parent: None,
        sampled: true,
        w3c: true,
    };
    let child = parent.child();
    assert_eq!(child.trace_id, parent.trace_id);
    assert_eq!(child.parent, Some(parent.span_id));
    assert_ne!(child.span_id, parent.span_id);
    let mut h = headers(&[
        ("tracestate", "vendor=1"),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
    ]);
    child.write(&mut h);
    assert_eq!(
        h["traceparent"],
        format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01",
            child.span_id
        )
    );
    assert_eq!(h["tracestate"], "vendor=1", "tracestate is passed on");
    assert_eq!(h["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(h["x-b3-spanid"], format!("{:016x}", child.span_id));
    assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
    assert_eq!(h["x-b3-sampled"], "1");
    assert!(
        h.get("b3").is_none(),
        "one B3 format, not two that disagree"
    );
    // What was written reads back as the same context.
    let again = TraceContext::incoming(&h).unwrap();
    assert_eq!(again.ids, Some((child.trace_id, child.span_id)));
    // Without a valid traceparent from the caller, its tracestate goes.
    let mut h = headers(&[("tracestate", "vendor=1")]);
    TraceContext {
        w3c: false,
        ..child
    }
    .write(&mut h);
    assert!(h.get("tracestate").is_none());
}

#[test]
fn sampling_follows_the_percentage() {
    assert!((0..1000).all(|_| TraceContext::root(100.0).sampled));
    assert!((0..1000).all(|_| !TraceContext::root(0.0).sampled));
    let n = (0..20_000)
        .filter(|_| TraceContext::root(10.0).sampled)
        .count();
    assert!((1500..2500).contains(&n), "{n} of 20000 at 10%");
}

#[test]
fn collectors_and_formats_parse_with_clear_errors() {
    assert_eq!(
        Collector::parse_zipkin("zipkin.mesh-system:9411").unwrap(),
        Collector::Zipkin(Endpoint {
            authority: "zipkin.mesh-system:9411".into(),
            path: "/api/v2/spans".into()
        })
    );
    assert_eq!(
        Collector::parse_otlp("http://otel:4318/custom").unwrap(),
        Collector::Otlp(Endpoint {
            authority: "otel:4318".into(),
            path: "/custom".into()
        })
    );
    assert!(
        Collector::parse_zipkin("https://z:9411")
            .unwrap_err()
            .contains("plain HTTP")
    );
    assert!(
        Collector::parse_zipkin("zipkin")
            .unwrap_err()
            .contains("host:port")
    );
    assert_eq!(LogFormat::parse("json").unwrap(), LogFormat::Json);
    assert!(
        LogFormat::parse("%method% %bogus%")
            .unwrap_err()
            .starts_with("unknown access-log field %bogus%")
    );
    assert!(LogFormat::parse("yaml").is_err());
}

fn pending(kind: Kind, format: LogFormat) -> (Box<Pending>, std::sync::mpsc::Receiver<String>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(8);
    let sinks = Arc::new(Sinks {
        sampling: 100.0,
        spans: None,
        logs: Some((tx, format)),
        drops: Arc::new(Drops::registered(&crate::metrics::Metrics::new())),
    });
    let t = Telemetry { sinks: Some(sinks) };
    let mut req = Request::get("/reviews/1?x=1")
        .header("host", "reviews:9080")
        .header("user-agent", "curl/8")
        .body(())
        .unwrap();
    let p = t
        .begin(
            &mut req,
            kind,
            "reviews.default",
            "10.0.0.7:40000".parse().unwrap(),
            Some(&Arc::from(
                "spiffe://cluster.local/ns/default/sa/productpage",
            )),
        )
        .unwrap();
    assert!(
        req.headers().contains_key("x-request-id"),
        "one is made when absent"
    );
    (p, rx)
}

#[test]
fn a_denied_request_is_logged_as_json_with_its_policy() {
    let (p, rx) = pending(Kind::Server, LogFormat::Json);
    let mut resp = Response::new(Body::full("denied by policy\n"));
    *resp.status_mut() = http::StatusCode::FORBIDDEN;
    resp.extensions_mut().insert(crate::reason::Reason::Denied);
    resp.extensions_mut()
        .insert(DeniedBy(Arc::from("default/deny-reviews")));
    finish_with(p, &mut resp);
    let line = rx
        .try_recv()
        .expect("logged at once: the body is in memory");
    assert!(line.ends_with('\n'));
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["authority"], "reviews:9080");
    assert_eq!(v["path"], "/reviews/1?x=1");
    assert_eq!(v["status"], 403);
    assert_eq!(v["reason"], "denied by policy");
    assert_eq!(v["response_flags"], "RBAC");
    assert_eq!(v["denied_by"], "default/deny-reviews");
    assert_eq!(v["bytes_sent"], 17);
    assert_eq!(v["upstream_host"], Value::Null);
    assert_eq!(
        v["downstream_principal"],
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(v["direction"], "inbound");
    assert_eq!(v["user_agent"], "curl/8");
    assert_eq!(v["request_id"].as_str().unwrap().len(), 36);
    assert!(v["start_time"].as_str().unwrap().ends_with('Z'));
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut fields = FIELDS.to_vec();
    fields.sort_unstable();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    assert_eq!(keys_sorted, fields, "every field, always");
}

#[test]
fn a_template_names_the_upstream() {
    let (p, rx) = pending(
        Kind::Client,
        LogFormat::parse("%method% %path% %status% %upstream_host% %reason% %trace_id%").unwrap(),
    );
    let mut resp = Response::new(Body::full("ok"));
    resp.extensions_mut().insert(Upstream {
        host: Some("10.0.0.9:9080".parse().unwrap()),
        cluster: Some(Arc::from(
            "outbound|9080||reviews.default.svc.cluster.local",
        )),
    });
    finish_with(p, &mut resp);
    assert_eq!(
        rx.try_recv().unwrap(),
        "GET /reviews/1?x=1 200 10.0.0.9:9080 - -\n"
    );
    assert!(
        resp.extensions().get::<Upstream>().is_none(),
        "extensions are not sent on"
    );
}

#[test]
fn spans_export_as_zipkin_and_otlp() {
    let span = Span {
        trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
        id: 0x00f067aa0ba902b7,
        parent: Some(0x1111111111111111),
        kind: Kind::Server,
        name: "reviews:9080/reviews/1".into(),
        service: "reviews.default".into(),
        start_us: 1_700_000_000_000_000,
        duration_us: 1500,
        tags: vec![("http.status_code", "503".into())],
        error: true,
    };
    let z = zipkin_json(std::slice::from_ref(&span));
    assert_eq!(z[0]["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(z[0]["id"], "00f067aa0ba902b7");
    assert_eq!(z[0]["parentId"], "1111111111111111");
    assert_eq!(z[0]["kind"], "SERVER");
    assert_eq!(z[0]["localEndpoint"]["serviceName"], "reviews.default");
    assert_eq!(z[0]["tags"]["error"], "true");
    assert_eq!(z[0]["duration"], 1500);
    let o = otlp_json(&[span]);
    let s = &o["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(
        o["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
        "reviews.default"
    );
    assert_eq!(s["kind"], 2);
    assert_eq!(s["parentSpanId"], "1111111111111111");
    assert_eq!(s["startTimeUnixNano"], "1700000000000000000");
    assert_eq!(s["endTimeUnixNano"], "1700000000001500000");
    assert_eq!(s["status"]["code"], 2);
}

#[test]
fn times_are_rfc3339() {
    let t = UNIX_EPOCH + Duration::from_millis(1_709_251_200_123); // 2024-03-01
    assert_eq!(rfc3339(t), "2024-03-01T00:00:00.123Z");
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
}

#[test]
fn a_request_the_client_abandons_is_still_logged() {
    let (p, rx) = pending(Kind::Client, LogFormat::Json);
    // The serving future is dropped before any response: so is the record.
    drop(p);
    let v: Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
    assert_eq!(v["status"], 0);
    assert_eq!(v["response_flags"], "DC");
    assert_eq!(v["reason"], "client disconnected");
    // A finished record is logged once, not again when dropped.
    let (p, rx) = pending(Kind::Client, LogFormat::Json);
    let mut resp = Response::new(Body::full("ok"));
    finish_with(p, &mut resp);
    drop(resp);
    assert!(rx.try_recv().is_ok());
    assert!(rx.try_recv().is_err(), "one line per request");
}

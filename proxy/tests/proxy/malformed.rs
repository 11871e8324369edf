//! Malformed requests get 400 or 431 and never reach the upstream; slow
//! clients time out; HTTP/2 reset floods stay bounded.

use std::time::Duration;

use mesh_proxy::ConnSettings;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_rejected_before_the_upstream() {
    let o = origin("o").await;
    let p = proxy(&config(
        "- action: {forward: [{cluster: o}]}",
        &cluster("o", &[&o], ""),
    ))
    .await;
    let to = p.explicit.unwrap();
    let big = "a".repeat(61 * 1024);
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, String, &str)> = vec![
        ("space in header name", "GET / HTTP/1.1\r\nHost: svc:9080\r\nBad Header: x\r\n\r\n".into(), "400"),
        ("control byte in value", "GET / HTTP/1.1\r\nHost: svc:9080\r\nX-A: a\x01b\r\n\r\n".into(), "400"),
        (
            "conflicting content-lengths",
            "POST / HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into(),
            "400",
        ),
        ("head over 60 KiB", format!("GET / HTTP/1.1\r\nHost: svc:9080\r\nX-Big: {big}\r\n\r\n"), "431"),
        ("over 100 headers", format!("GET / HTTP/1.1\r\nHost: svc:9080\r\n{many}\r\n"), "431"),
        (
            "bad chunk size",
            "POST / HTTP/1.1\r\nHost: svc:9080\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(),
            "400",
        ),
        ("obs-fold", "GET / HTTP/1.1\r\nHost: svc:9080\r\nX-A: a\r\n  folded\r\n\r\n".into(), "400"),
        ("invalid method", "G(T / HTTP/1.1\r\nHost: svc:9080\r\n\r\n".into(), "400"),
    ];
    for (what, req, want) in &cases {
        let got = raw(to, req.as_bytes(), Duration::from_secs(2)).await;
        let status = got.split(' ').nth(1).unwrap_or("none");
        assert_eq!(status, *want, "{what}: got {:?}", got.lines().next());
    }
    assert_eq!(o.hits(), 0, "nothing malformed reached the upstream");
    // The same connection path still works for a good request.
    let ok = raw(
        to,
        b"GET / HTTP/1.1\r\nHost: svc:9080\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused_in_either_order() {
    let o = origin("o").await;
    let p = proxy(&config(
        "- action: {forward: [{cluster: o}]}",
        &cluster("o", &[&o], ""),
    ))
    .await;
    for req in [
        "POST / HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: svc:9080\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: svc:9080\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: svc:9080\r\n\r\n",
    ] {
        let got = raw(p.explicit.unwrap(), req.as_bytes(), Duration::from_secs(2)).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        assert_eq!(
            got.matches("HTTP/1.1 ").count(),
            1,
            "one response, then the connection closes: {got}"
        );
    }
    // After a good keep-alive request, the next ambiguous one is refused too.
    let got = raw(
        p.explicit.unwrap(),
        b"POST /ok HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: 2\r\n\r\nhiPOST / HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    let statuses: Vec<&str> = got
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &got[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "400"], "{got}");
    let paths: Vec<String> = o.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        paths,
        ["/ok"],
        "only the well-framed request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_time_out() {
    let o = origin("o").await;
    let settings = ConnSettings {
        header_read_timeout: Duration::from_millis(300),
        ..ConnSettings::default()
    };
    let p = proxy_with(
        &config(
            "- action: {forward: [{cluster: o}]}",
            &cluster("o", &[&o], ""),
        ),
        settings,
        vec![],
    )
    .await;
    let start = std::time::Instant::now();
    let got = raw(
        p.explicit.unwrap(),
        b"GET / HTTP/1.1\r\nHost: svc:9",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "connection held {:?}",
        start.elapsed()
    );
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
    assert_eq!(o.hits(), 0);
}

/// Minimal HTTP/2 frames for the reset-flood test.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_flood_is_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let o = origin_with(std::sync::Arc::new(|_, _| {
        Reply::ok("slow").delay(Duration::from_millis(200))
    }))
    .await;
    let p = proxy(&config(
        "- action: {forward: [{cluster: o}]}",
        &cluster("o", &[&o], ""),
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(p.explicit.unwrap())
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    // HPACK: :method GET, :scheme http, :path /, :authority "svc:9080".
    let mut block = vec![0x82, 0x86, 0x84, 0x41, 8];
    block.extend_from_slice(b"svc:9080");
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        out.extend(frame(0x1, 0x5, id, &block)); // HEADERS, END_STREAM|END_HEADERS
        out.extend(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let _ = s.write_all(&out).await;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    // GOAWAY (type 7) ends the abusive connection.
    let mut goaway = false;
    let mut rest = &got[..];
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        goaway |= rest[3] == 0x7;
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert!(goaway, "no GOAWAY after 5000 rapid resets");
    // Once the connection is gone, every stream it started has finished.
    drop(s);
    assert!(eventually(Duration::from_secs(5), || p.connections() == 0).await);
    assert!(
        o.hits() < 500,
        "{} reset streams reached the upstream",
        o.hits()
    );
    // The proxy still serves others.
    let r = send(&client(), p.explicit.unwrap(), "svc:9080", "/", &[]).await;
    assert_eq!(r.status, 200);
}

//! AuthorizationPolicy and RequestAuthentication on real sockets, at the
//! `reviews` sidecar of a CA-backed pair (see `mesh_e2e::pair`).
//!
//! The table sends raw requests — the path-confusion and case tricks
//! people use to slip past a rule — and checks for each both the decision
//! and exactly what the app received: a request is decided on what is
//! forwarded. Then identities (mTLS principals), TCP, and JWTs: valid,
//! expired, wrong issuer, wrong audience, `alg: none`, tampered.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh_e2e::pair::{HOST, Pair, metric};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Status, and the path the app received (`-` when nothing arrived).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    path: String,
}

/// Sends `head` (a raw HTTP/1.1 request head) and reads the answer.
async fn raw_http1(addr: SocketAddr, head: &str) -> Seen {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                // Every answer here has a short body with a length.
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "an answer to {head:?}");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let path = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("x-echo-path:")
                .then(|| l["x-echo-path:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "-".into());
    Seen { status, path }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request over HTTP/2 with prior knowledge.
async fn h2(addr: SocketAddr, method: &str, path: &str) -> Seen {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(hyper::Method::from_bytes(method.as_bytes()).unwrap())
        .uri(format!("http://{HOST}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let path = resp
        .headers()
        .get("x-echo-path")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    Seen {
        status: resp.status().as_u16(),
        path,
    }
}

const DENY_ADMIN: &str = r#"  authorization:
  - name: default/deny-admin
    action: DENY
    rules:
    - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
    - to: [{operation: {hosts: ["example.com"], paths: ["/private"]}}]
    - to: [{operation: {methods: ["DELETE"]}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_decided_on_exactly_what_is_forwarded() {
    let pair = Pair::start("authz-table", None).await;
    pair.reviews_config_with("PERMISSIVE", DENY_ADMIN).await;
    let inbound = pair.reviews.inbound.unwrap();
    let get = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let seen = |status: u16, path: &str| Seen {
        status,
        path: path.into(),
    };
    let table: Vec<(&str, String, Seen)> = vec![
        ("allowed", get("/public", HOST), seen(200, "/public")),
        ("denied", get("/admin", HOST), seen(403, "-")),
        ("merged slashes", get("//admin", HOST), seen(403, "-")),
        ("encoded dots", get("/%2e%2e/admin", HOST), seen(403, "-")),
        (
            "dot segments",
            get("/public/../admin/x", HOST),
            seen(403, "-"),
        ),
        ("encoded unreserved", get("/%61dmin", HOST), seen(403, "-")),
        ("encoded slash", get("/admin%2F", HOST), seen(400, "-")),
        ("encoded backslash", get("/admin%5cx", HOST), seen(400, "-")),
        ("fragment", get("/admin#x", HOST), seen(400, "-")),
        (
            "rules are case-sensitive; the app gets exactly /ADMIN",
            get("/ADMIN", HOST),
            seen(200, "/ADMIN"),
        ),
        (
            "host without case or port",
            get("/private", "EXAMPLE.com:80"),
            seen(403, "-"),
        ),
        (
            "another host",
            get("/private", "other.example"),
            seen(200, "/private"),
        ),
        (
            "normalized path forwarded, query untouched",
            get("/a//b/./c?next=%2Fadmin", HOST),
            seen(200, "/a/b/c?next=%2Fadmin"),
        ),
        (
            "denied method",
            format!("DELETE /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
            seen(403, "-"),
        ),
        // Not HTTP to protocol detection, so TCP: a DENY policy's
        // HTTP-only rules match all TCP, and the connection is closed
        // (status 0) with nothing forwarded.
        (
            "lower-case method",
            format!("delete /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
            seen(0, "-"),
        ),
    ];
    for (what, head, want) in &table {
        assert_eq!(&raw_http1(inbound, head).await, want, "{what}");
    }
    // HTTP/2: the same rules, and no lower-case method either.
    assert_eq!(h2(inbound, "GET", "//admin").await, seen(403, "-"));
    assert_eq!(h2(inbound, "GET", "/ADMIN").await, seen(200, "/ADMIN"));
    assert_eq!(h2(inbound, "delete", "/x").await, seen(400, "-"));
    assert_eq!(h2(inbound, "get", "/public").await, seen(400, "-"));
    assert_eq!(h2(inbound, "GET", "/public").await, seen(200, "/public"));
    let denied = |p: &mesh_proxy::Running| {
        metric(
            p,
            "mesh_proxy_authz_total{decision=\"denied\",policy=\"default/deny-admin\"}",
        )
    };
    // Seven HTTP/1 requests, one TCP connection, one HTTP/2 request.
    assert_eq!(denied(&pair.reviews), 9.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policies_admit_principals_and_tcp_is_closed_when_denied() {
    let pair = Pair::start("authz-principals", None).await;
    let inbound = pair.reviews.inbound.unwrap();
    let head = format!("GET /reviews/1 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    // Only productpage, over mTLS; anyone for /health.
    pair.reviews_config_with(
        "PERMISSIVE",
        r#"  authorization:
  - name: default/reviews-viewer
    rules:
    - from: [{source: {principals: ["cluster.local/ns/default/sa/productpage"]}}]
    - to: [{operation: {paths: ["/health"]}}]
"#,
    )
    .await;
    assert_eq!(pair.call().await.status, 200, "productpage over mTLS");
    assert_eq!(raw_http1(inbound, &head).await.status, 403, "plaintext");
    let health = format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_http1(inbound, &health).await.status, 200);

    // Another principal is not productpage.
    pair.reviews_config_with(
        "PERMISSIVE",
        r#"  authorization:
  - name: default/reviews-viewer
    rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/ratings"]}}]}]
"#,
    )
    .await;
    let got = pair.call().await;
    assert_eq!((got.status, got.reason.as_str()), (403, "denied by policy"));

    // An ALLOW policy without rules: nothing is allowed, not even TCP.
    let tcp_port = |policies: &str| {
        format!(
            "workload: {{name: reviews, namespace: default, serviceAccount: reviews}}\n\
             inbound:\n  mtls: PERMISSIVE\n  ports:\n  - {{port: {}, targetPort: {}, protocol: TCP}}\n{policies}",
            inbound.port(),
            pair.app.port()
        )
    };
    pair.reviews
        .apply(serde_yaml::from_str(&tcp_port("")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        raw_http1(inbound, &head).await.status,
        200,
        "TCP passes through"
    );
    pair.reviews
        .apply(
            serde_yaml::from_str(&tcp_port(
                "  authorization:\n  - {name: default/allow-nothing, action: ALLOW}\n",
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let mut s = TcpStream::connect(inbound).await.unwrap();
    let _ = s.write_all(head.as_bytes()).await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed, not left hanging");
    assert!(
        n.is_err() || buf.is_empty(),
        "a denied connection gets nothing: {:?}",
        String::from_utf8_lossy(&buf)
    );
}

const ISS: &str = "https://issuer.example";

struct Signer {
    key: EncodingKey,
    jwks: String,
}

fn signer() -> Signer {
    let kp = rcgen::KeyPair::generate().unwrap();
    let raw = kp.public_key_raw();
    Signer {
        key: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwks: json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
        }]})
        .to_string(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Signer {
    fn token(&self, claims: Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
    }
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "jason", "aud": "bookinfo", "exp": now() + 600})
}

/// Status, the reason header, and whether the app saw an Authorization
/// header and the payload header.
async fn with_token(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, bool, bool) {
    let c = mesh_e2e::client();
    let mut req = Request::builder()
        .uri(format!("http://{addr}{path}"))
        .header("host", HOST);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = c
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let auth = resp.headers().contains_key("x-echo-authorization");
    let payload = resp.headers().contains_key("x-echo-jwt-payload");
    let _ = resp.into_body().collect().await;
    (status, auth, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_checked_and_a_policy_can_require_one() {
    let pair = Pair::start("authz-jwt", None).await;
    let inbound = pair.reviews.inbound.unwrap();
    let s = signer();
    let jwks = s.jwks.replace('\'', "''");
    pair.reviews_config_with(
        "PERMISSIVE",
        &format!(
            r#"  jwtRules:
  - issuer: {ISS}
    audiences: [bookinfo]
    jwks: '{jwks}'
    outputPayloadToHeader: x-jwt-payload
  authorization:
  - name: default/require-jwt
    action: DENY
    rules:
    - from: [{{source: {{notRequestPrincipals: ["{ISS}/*"]}}}}]
      to: [{{operation: {{paths: ["/secure/*"]}}}}]
"#
        ),
    )
    .await;
    let valid = s.token(claims());
    // Valid: through, the token consumed and its payload passed on.
    assert_eq!(
        with_token(inbound, "/secure/x", Some(&valid)).await,
        (200, false, true)
    );
    // No token: fine where no policy asks for one, 403 where one does.
    assert_eq!(
        with_token(inbound, "/open", None).await,
        (200, false, false)
    );
    assert_eq!(with_token(inbound, "/secure/x", None).await.0, 403);

    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    let mut wrong_iss = claims();
    wrong_iss["iss"] = json!("https://other.example");
    let mut wrong_aud = claims();
    wrong_aud["aud"] = json!("someone-else");
    let parts: Vec<&str> = valid.split('.').collect();
    let mut admin = claims();
    admin["sub"] = json!("admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(admin.to_string()),
        parts[2]
    );
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    for (what, token) in [
        ("expired", s.token(expired)),
        ("wrong issuer", s.token(wrong_iss)),
        ("wrong audience", s.token(wrong_aud)),
        ("tampered", tampered),
        ("alg none", none),
    ] {
        // Invalid tokens are refused everywhere, not only where required.
        assert_eq!(
            with_token(inbound, "/open", Some(&token)).await.0,
            401,
            "{what}"
        );
    }
}

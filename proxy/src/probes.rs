//! The app's HTTP probes, rewritten by injection to the status port
//! (`/app-health/<container>/<livez|readyz|startupz>` on 15020): the
//! kubelet asks the proxy, the proxy asks the app over the pod's loopback.
//! The kubelet's plaintext probe then works even when the app's port only
//! takes mTLS. The targets come from `MESH_APP_PROBERS`, written by the
//! injector.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// Where one rewritten probe really goes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Prober {
    pub port: u16,
    #[serde(default = "root")]
    pub path: String,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub http_headers: Vec<Header>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

fn root() -> String {
    "/".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

pub type Probers = BTreeMap<String, Prober>;

/// Reads `MESH_APP_PROBERS`; names what is wrong.
pub fn parse(json: &str) -> Result<Probers, String> {
    let probers: Probers =
        serde_json::from_str(json).map_err(|e| format!("MESH_APP_PROBERS: {e}"))?;
    for (path, p) in &probers {
        if !path.starts_with("/app-health/") {
            return Err(format!(
                "MESH_APP_PROBERS: {path:?} is not under /app-health/"
            ));
        }
        if p.scheme
            .as_deref()
            .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
        {
            return Err(format!(
                "MESH_APP_PROBERS: {path}: only HTTP probes are forwarded"
            ));
        }
        if !p.path.starts_with('/') {
            return Err(format!("MESH_APP_PROBERS: {path}: path must start with /"));
        }
    }
    Ok(probers)
}

/// Asks the app; its status is the probe's answer (a 5xx-free 200–399 is
/// healthy to the kubelet). Unreachable or slow apps answer 503.
pub async fn probe(p: &Prober) -> StatusCode {
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1));
    match tokio::time::timeout(timeout, ask(p)).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            tracing::debug!(port = p.port, path = %p.path, error = %e, "app probe failed");
            StatusCode::SERVICE_UNAVAILABLE
        }
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn ask(p: &Prober) -> Result<StatusCode, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(p.path.as_str())
        .header(
            http::header::HOST,
            p.host
                .clone()
                .unwrap_or_else(|| format!("127.0.0.1:{}", p.port)),
        )
        .header(http::header::USER_AGENT, "kube-probe (via mesh-proxy)");
    for h in &p.http_headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// `mesh-proxy wait`: polls the readiness port until the proxy is ready,
/// for a classic sidecar's postStart hook (the app starts after).
pub async fn wait_ready(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let p = Prober {
        port,
        path: "/healthz/ready".into(),
        scheme: None,
        http_headers: Vec::new(),
        host: None,
        timeout_seconds: Some(1),
    };
    loop {
        if probe(&p).await == StatusCode::OK {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("the proxy was not ready within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probers_are_read_and_checked() {
        let p = parse(r#"{"/app-health/web/livez":{"port":9901,"path":"/live","scheme":"HTTP","httpHeaders":[{"name":"X-Probe","value":"1"}]}}"#).unwrap();
        assert_eq!(p["/app-health/web/livez"].port, 9901);
        assert!(parse("{").unwrap_err().starts_with("MESH_APP_PROBERS:"));
        assert!(
            parse(r#"{"/x":{"port":1}}"#)
                .unwrap_err()
                .contains("/app-health/")
        );
        assert!(
            parse(r#"{"/app-health/a/livez":{"port":1,"scheme":"HTTPS"}}"#)
                .unwrap_err()
                .contains("only HTTP")
        );
    }

    #[tokio::test]
    async fn a_probe_answers_with_the_apps_status() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let ok = req.uri().path() == "/live"
                                && req.headers().get("x-probe").is_some_and(|v| v == "1");
                            let mut r =
                                hyper::Response::new(http_body_util::Full::new(Bytes::new()));
                            if !ok {
                                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            Ok::<_, std::convert::Infallible>(r)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let good = Prober {
            port,
            path: "/live".into(),
            scheme: None,
            http_headers: vec![Header {
                name: "X-Probe".into(),
                value: "1".into(),
            }],
            host: None,
            timeout_seconds: None,
        };
        assert_eq!(probe(&good).await, StatusCode::OK);
        let bad = Prober {
            http_headers: vec![],
            ..good.clone()
        };
        assert_eq!(probe(&bad).await, StatusCode::INTERNAL_SERVER_ERROR);
        let gone = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(
            probe(&Prober { port: gone, ..good }).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}

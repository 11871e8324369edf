//! The proxy's own endpoints: admin on 127.0.0.1:15000 (config dump, log
//! level), Prometheus metrics on 15020, readiness on 15021.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Proxy;
use crate::body::Body;

/// Changes the log filter at run time (`POST /logging?level=debug`).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(body: String) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Routes of the admin, metrics and readiness ports (all served by one
/// handler; each port only exposes what it is for).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Admin,
    Metrics,
    Ready,
}

pub async fn handle(
    proxy: &Proxy,
    port: Port,
    log: Option<&LogControl>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path();
    match (port, req.method(), path) {
        (Port::Metrics, &Method::GET, "/stats/prometheus" | "/metrics") => {
            let expiry = proxy.tls.certs.current().map_or(0, |c| c.not_after);
            proxy.metrics.cert_expiry.set(expiry as f64);
            let mut r = text(StatusCode::OK, proxy.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (Port::Metrics, &Method::GET, p) if p.starts_with("/app-health/") => {
            match proxy.app_probers.get(p) {
                Some(prober) => {
                    let status = crate::probes::probe(prober).await;
                    text(status, format!("{}\n", status.as_u16()))
                }
                None => text(StatusCode::NOT_FOUND, "no such app probe\n"),
            }
        }
        (Port::Ready | Port::Admin, &Method::GET, "/healthz/ready" | "/ready") => {
            if proxy.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if proxy.config.load().is_none() {
                text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n")
            } else if proxy.tls.enabled() && proxy.tls.certs.current().is_none() {
                text(StatusCode::SERVICE_UNAVAILABLE, "no workload certificate\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (Port::Admin, &Method::GET, "/certs") => match proxy.tls.certs.current() {
            Some(id) => json(serde_json::to_string_pretty(&*id).unwrap_or_default()),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no certificate\n"),
        },
        (Port::Admin, &Method::GET, "/config_dump") => match proxy.config.load() {
            Some(s) => json(serde_json::to_string_pretty(&*s.config).unwrap_or_default()),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n"),
        },
        (Port::Admin, &Method::GET, "/stats/prometheus") => {
            text(StatusCode::OK, proxy.metrics.render())
        }
        (Port::Admin, &Method::POST, "/logging") => {
            let level = req
                .uri()
                .query()
                .and_then(|q| crate::routing::query_param(Some(q), "level"))
                .unwrap_or("");
            match log {
                Some(set) => match set(level) {
                    Ok(()) => text(StatusCode::OK, format!("log level: {level}\n")),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                None => text(
                    StatusCode::NOT_IMPLEMENTED,
                    "log level cannot be changed here\n",
                ),
            }
        }
        (Port::Admin, &Method::GET, "/") => text(
            StatusCode::OK,
            "GET /config_dump\nGET /stats/prometheus\nGET /ready\nPOST /logging?level=<filter>\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves one of the proxy's own ports until shutdown.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    port: Port,
    log: Option<LogControl>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let proxy = proxy.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                let log = log.clone();
                async move { Ok::<_, Infallible>(handle(&proxy, port, log.as_ref(), req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

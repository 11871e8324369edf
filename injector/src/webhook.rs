//! The admission webhook (`mesh-injector`, HTTPS on 15017): `POST /inject`
//! takes an AdmissionReview v1 for a pod and answers with a JSONPatch
//! (RFC 6902) from [`crate::inject_pod`]: it touches only what injection
//! changes, so fields unknown to the Kubernetes types here survive. The
//! API server only sends candidates (the MutatingWebhookConfiguration's
//! namespace and object selectors); a pod that cannot be injected is
//! allowed unchanged with a warning saying why, never refused. A review
//! that cannot be read gets a 400, one over [`BODY_LIMIT`] a 413. When the
//! API server reinvokes the webhook for an injected pod (a later webhook
//! changed it), the HTTP probes of containers added since are rewritten.
//! `/ready` and `/metrics` are served too.
//!
//! The serving certificate is read from disk and read again when the files
//! change, so a rotated Secret takes effect without a restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use metrics::{Counter, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};

use crate::{Cluster, Settings, Skip};

/// Reviews larger than this are refused (the API server's own limit on a
/// pod is 1.5 MB of etcd value; reviews carry more than the pod).
pub const BODY_LIMIT: usize = 4 << 20;

const META: Metadata<'static> = Metadata::new("mesh_injector", Level::INFO, None);

/// The webhook's metrics: injections, skips by reason, errors (pods
/// allowed uninjected because injection failed, and reviews answered 400
/// or 413), probe updates of reinvoked reviews, latency.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    injected: Counter,
    probe_updates: Counter,
    errors: Counter,
    latency: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        Metrics {
            injected: recorder
                .register_counter(&Key::from_name("mesh_injector_injections_total"), &META),
            probe_updates: recorder
                .register_counter(&Key::from_name("mesh_injector_probe_updates_total"), &META),
            errors: recorder.register_counter(&Key::from_name("mesh_injector_errors_total"), &META),
            latency: recorder
                .register_histogram(&Key::from_name("mesh_injector_review_seconds"), &META),
            recorder,
            handle,
        }
    }

    fn skipped(&self, reason: &'static str) {
        let key = Key::from_parts(
            "mesh_injector_skips_total",
            vec![Label::new("reason", reason)],
        );
        self.recorder.register_counter(&key, &META).increment(1);
    }

    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

pub struct Webhook {
    pub settings: Settings,
    pub cluster: Cluster,
    pub metrics: Metrics,
}

pub fn router(hook: Arc<Webhook>) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route("/ready", get(|| async { "ready\n" }))
        .route(
            "/metrics",
            get(|State(h): State<Arc<Webhook>>| async move { h.metrics.render() }),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(hook)
}

async fn inject(State(hook): State<Arc<Webhook>>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let bad_request = |message: String| {
        hook.metrics.errors.increment(1);
        (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
    };
    let body = match body {
        Ok(b) => b,
        // Too large (413) or unreadable: counted like a malformed review.
        Err(rejection) => {
            hook.metrics.errors.increment(1);
            return rejection.into_response();
        }
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("not an AdmissionReview: {e}")),
    };
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return bad_request(format!(
            "expected admission.k8s.io/v1 AdmissionReview, got {} {}",
            review["apiVersion"], review["kind"]
        ));
    }
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str() else {
        return bad_request("request.uid: required".into());
    };
    let mut response = review_response(&hook, request);
    hook.metrics.latency.record(start.elapsed().as_secs_f64());
    response["uid"] = uid.into();
    axum::Json(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
    .into_response()
}

/// The review's response, without its uid: a patch, or allowed unchanged
/// (with a warning saying why, unless the pod opted out or is already
/// complete).
fn review_response(hook: &Webhook, request: &Value) -> Value {
    let allow = |warning: Option<String>| match warning {
        Some(w) => json!({"allowed": true, "warnings": [w]}),
        None => json!({"allowed": true}),
    };
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return allow(None);
    }
    let not_injected = |why: String| {
        hook.metrics.errors.increment(1);
        allow(Some(format!("mesh sidecar not injected: {why}")))
    };
    let pod = &request["object"];
    let (meta, spec) = match crate::parse_pod(pod) {
        Ok(p) => p,
        Err(e) => return not_injected(e.to_string()),
    };
    // The API server sends only what the selectors chose: the namespace
    // asked for injection, or the pod did.
    let namespace = request["namespace"]
        .as_str()
        .or(meta.namespace.as_deref())
        .unwrap_or("default");
    let selected = BTreeMap::from([(crate::NAMESPACE_LABEL.to_string(), "enabled".to_string())]);
    let reinvoked = match crate::decide(namespace, &selected, &meta, &spec, &hook.settings) {
        Ok(()) => false,
        // Reinvoked after a later webhook: probes of containers it added.
        Err(Skip::AlreadyInjected) => true,
        Err(skip) => {
            hook.metrics.skipped(skip.as_str());
            let quiet = matches!(skip, Skip::PodDisabled);
            return allow((!quiet).then(|| format!("mesh sidecar not injected: {skip}")));
        }
    };
    match crate::inject_pod(pod, &meta, &spec, &hook.settings, hook.cluster) {
        Ok(patched) if patched.patch.is_empty() => {
            hook.metrics.skipped(Skip::AlreadyInjected.as_str());
            allow(None)
        }
        Ok(patched) => {
            if reinvoked {
                hook.metrics.probe_updates.increment(1);
            } else {
                hook.metrics.injected.increment(1);
            }
            let patch = serde_json::to_vec(&patched.patch).unwrap_or_default();
            json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            })
        }
        Err(e) => not_injected(e.to_string()),
    }
}

/// The serving certificate, read again when its files change.
#[derive(Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    current: arc_swap::ArcSwap<CertifiedKey>,
    /// The bytes last loaded: a change of content, not of time, reloads
    /// (Secret volumes swap symlinks; writes can share a timestamp).
    loaded: std::sync::Mutex<Option<(Vec<u8>, Vec<u8>)>>,
}

impl CertFiles {
    /// Reads the PEM files; an error names the file.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Arc<CertFiles>, String> {
        let ck = read_pair(&cert, &key)?;
        let files = CertFiles {
            loaded: std::sync::Mutex::new(contents(&cert, &key)),
            cert,
            key,
            current: arc_swap::ArcSwap::from_pointee(ck),
        };
        Ok(Arc::new(files))
    }

    /// Reads the files again if they changed; a broken pair is logged and
    /// the current certificate kept.
    pub fn refresh(&self) {
        let now = contents(&self.cert, &self.key);
        let mut last = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_none() || now == *last {
            return;
        }
        match read_pair(&self.cert, &self.key) {
            Ok(ck) => {
                self.current.store(Arc::new(ck));
                *last = now;
                tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "serving certificate not reloaded; keeping the current one")
            }
        }
    }

    /// Checks the files every `every` until dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.refresh();
        }
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn contents(cert: &std::path::Path, key: &std::path::Path) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((std::fs::read(cert).ok()?, std::fs::read(key).ok()?))
}

fn read_pair(cert: &std::path::Path, key: &std::path::Path) -> Result<CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(CertifiedKey::new(certs, signing))
}

/// The TLS settings: TLS 1.2 and 1.3 (the API server speaks both), the
/// certificate from `certs`.
pub fn tls_config(certs: Arc<CertFiles>) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the ring provider supports the default versions")
    .with_no_client_auth()
    .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Serves `router` over TLS on `listener` until the task is dropped.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    async move {
                        use tower_service::Service;
                        let mut router = router;
                        router.call(req.map(axum::body::Body::new)).await
                    }
                });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
        });
    }
}

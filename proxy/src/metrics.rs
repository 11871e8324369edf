//! Istio's standard metrics, with their exact names, labels and buckets, so
//! existing Prometheus, Grafana and Kiali setups work unchanged.
//!
//! Each proxy has its own recorder (not the process-global one) and caches
//! the metric handles per label set: after the first request of a kind, a
//! request costs one map lookup and a few atomic adds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::cluster::EndpointMeta;
use crate::state::WorkloadMeta;

/// Istio's buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`.
pub const BYTES_BUCKETS: [f64; 9] = [
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
];

const META: Metadata<'static> = Metadata::new("mesh_proxy", Level::INFO, None);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// Outbound: this proxy sends the request.
    Source,
    /// Inbound: this proxy receives it for its workload.
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The peer of a request or connection, as metrics describe it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub principal: Arc<str>,
}

impl Peer {
    /// A caller known only by its verified mTLS identity: the principal
    /// and the namespace it names.
    pub fn from_identity(identity: Option<&Arc<str>>) -> Peer {
        let mut p = Peer::unknown();
        if let Some(id) = identity {
            if let Some(ns) = id.split("/ns/").nth(1).and_then(|r| r.split('/').next()) {
                p.namespace = ns.into();
            }
            p.principal = id.clone();
        }
        p
    }

    pub fn unknown() -> Peer {
        static UNKNOWN: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| "unknown".into());
        let u = UNKNOWN.clone();
        Peer {
            workload: u.clone(),
            namespace: u.clone(),
            app: u.clone(),
            version: u.clone(),
            principal: u,
        }
    }

    pub fn from_endpoint(m: &EndpointMeta) -> Peer {
        let u = Peer::unknown();
        let pick = |v: &Arc<str>, d: &Arc<str>| if v.is_empty() { d.clone() } else { v.clone() };
        Peer {
            workload: pick(&m.workload, &u.workload),
            namespace: pick(&m.namespace, &u.namespace),
            app: pick(&m.app, &u.app),
            version: pick(&m.version, &u.version),
            principal: u.principal,
        }
    }

    /// The `x-mesh-peer` value announcing `w`.
    pub fn header_value(w: &WorkloadMeta) -> http::HeaderValue {
        http::HeaderValue::from_str(&format!(
            "{},{},{},{}",
            w.name, w.namespace, w.app, w.version
        ))
        .unwrap_or_else(|_| http::HeaderValue::from_static("unknown,unknown,unknown,unknown"))
    }

    pub fn from_workload(w: &WorkloadMeta) -> Peer {
        Peer {
            workload: w.name.clone(),
            namespace: w.namespace.clone(),
            app: w.app.clone(),
            version: w.version.clone(),
            principal: w.principal.clone(),
        }
    }
}

/// The labels of one request series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    pub destination_service: Arc<str>,
    pub protocol: &'static str,
    pub response_code: u16,
    pub grpc_status: Option<u32>,
    pub response_flags: &'static str,
    pub mtls: bool,
}

struct RequestHandles {
    total: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    pub destination_service: Arc<str>,
    pub response_flags: &'static str,
    pub mtls: bool,
}

pub struct TcpHandles {
    pub opened: Counter,
    pub closed: Counter,
    pub sent: Counter,
    pub received: Counter,
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    requests: Mutex<HashMap<RequestLabels, Arc<RequestHandles>>>,
    tcp: Mutex<HashMap<TcpLabels, Arc<TcpHandles>>>,
    pub config_version: Gauge,
    pub config_applied: Counter,
    pub config_rejected: Counter,
    pub downstream_connections: Gauge,
    /// 1 while the xDS stream to pilot is up.
    pub xds_connected: Gauge,
    /// Inbound connections refused by mTLS: plaintext under STRICT, failed
    /// handshakes, peers of another trust domain.
    pub mtls_refused: Counter,
    /// When the workload certificate expires (Unix seconds; 0 without
    /// one), set at each scrape.
    pub cert_expiry: Gauge,
    /// Callers' workload metadata by `x-mesh-peer` value (bounded).
    peers: std::sync::RwLock<HashMap<Box<[u8]>, Peer>>,
}

/// The request header a client sidecar tells the server sidecar its
/// workload with: `name,namespace,app,version`. The server trusts it only
/// over mTLS and when its namespace is the peer certificate's, and removes
/// it before the app sees the request.
pub const PEER_HEADER: &str = "x-mesh-peer";

/// How many distinct callers' metadata are remembered.
const PEER_CACHE: usize = 4096;

/// `name,namespace,app,version`: Kubernetes names and label values
/// (letters, digits, `-`, `_`, `.`; at most 253 bytes); an empty app or
/// version stands for `unknown`.
fn parse_peer(raw: &[u8]) -> Option<Peer> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut parts = text.split(',');
    let unknown = Peer::unknown();
    let mut next = |required: bool, fallback: &Arc<str>| -> Option<Arc<str>> {
        let v = parts.next()?;
        let ok = v.len() <= 253
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        match (ok, v.is_empty()) {
            (false, _) => None,
            (true, true) if required => None,
            (true, true) => Some(fallback.clone()),
            (true, false) => Some(Arc::from(v)),
        }
    };
    let p = Peer {
        workload: next(true, &unknown.workload)?,
        namespace: next(true, &unknown.namespace)?,
        app: next(false, &unknown.app)?,
        version: next(false, &unknown.version)?,
        principal: unknown.principal.clone(),
    };
    parts.next().is_none().then_some(p)
}

fn peer_labels(prefix: &'static str, p: &Peer, out: &mut Vec<Label>) {
    let (w, ns, pr, app, ver, cs, cr, cl) = match prefix {
        "source" => (
            "source_workload",
            "source_workload_namespace",
            "source_principal",
            "source_app",
            "source_version",
            "source_canonical_service",
            "source_canonical_revision",
            "source_cluster",
        ),
        _ => (
            "destination_workload",
            "destination_workload_namespace",
            "destination_principal",
            "destination_app",
            "destination_version",
            "destination_canonical_service",
            "destination_canonical_revision",
            "destination_cluster",
        ),
    };
    out.push(Label::new(w, p.workload.clone()));
    out.push(Label::new(ns, p.namespace.clone()));
    out.push(Label::new(pr, p.principal.clone()));
    out.push(Label::new(app, p.app.clone()));
    out.push(Label::new(ver, p.version.clone()));
    out.push(Label::new(cs, p.app.clone()));
    out.push(Label::new(cr, p.version.clone()));
    out.push(Label::new(cl, "Kubernetes"));
}

fn service_labels(service: &Arc<str>, out: &mut Vec<Label>) {
    let mut parts = service.split('.');
    let name = parts.next().unwrap_or("unknown").to_string();
    let ns = parts.next().unwrap_or("unknown").to_string();
    out.push(Label::new("destination_service", service.clone()));
    out.push(Label::new("destination_service_name", name));
    out.push(Label::new("destination_service_namespace", ns));
}

/// One series' labels, in Istio's names: request series carry a response
/// code and gRPC status, TCP series do not.
fn istio_labels(
    reporter: Reporter,
    (source, destination): (&Peer, &Peer),
    service: &Arc<str>,
    protocol: &'static str,
    response: Option<(u16, Option<u32>)>,
    flags: &'static str,
    mtls: bool,
) -> Vec<Label> {
    let mut labels = Vec::with_capacity(28);
    labels.push(Label::new("reporter", reporter.as_str()));
    peer_labels("source", source, &mut labels);
    peer_labels("destination", destination, &mut labels);
    service_labels(service, &mut labels);
    labels.push(Label::new("request_protocol", protocol));
    if let Some((code, grpc)) = response {
        labels.push(Label::new("response_code", code.to_string()));
        labels.push(Label::new(
            "grpc_response_status",
            grpc.map(|s| s.to_string()).unwrap_or_default(),
        ));
    }
    labels.push(Label::new("response_flags", flags));
    labels.push(Label::new(
        "connection_security_policy",
        if mtls { "mutual_tls" } else { "none" },
    ));
    labels
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("istio_request_duration_milliseconds".into()),
                &DURATION_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("istio_request_bytes".into()),
                    &BYTES_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("istio_response_bytes".into()),
                    &BYTES_BUCKETS,
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_name(name), &META);
        let counter = |name: &'static str| recorder.register_counter(&Key::from_name(name), &META);
        Metrics {
            config_version: gauge("mesh_proxy_config_last_applied_timestamp_seconds"),
            config_applied: counter("mesh_proxy_config_applied_total"),
            config_rejected: counter("mesh_proxy_config_rejected_total"),
            downstream_connections: gauge("mesh_proxy_downstream_connections"),
            xds_connected: gauge("mesh_proxy_xds_connected"),
            mtls_refused: counter("mesh_proxy_mtls_refused_total"),
            cert_expiry: gauge("mesh_proxy_certificate_expiry_timestamp_seconds"),
            recorder,
            handle,
            requests: Mutex::new(HashMap::new()),
            tcp: Mutex::new(HashMap::new()),
            peers: std::sync::RwLock::new(HashMap::new()),
        }
    }

    /// The caller of an inbound request: its verified identity, and the
    /// workload metadata it announced in `x-mesh-peer` when that agrees
    /// with the identity (same namespace). Parsed once per distinct value.
    pub fn caller(
        &self,
        announced: Option<&http::HeaderValue>,
        identity: Option<&Arc<str>>,
    ) -> Peer {
        let verified = Peer::from_identity(identity);
        let (Some(raw), Some(_)) = (announced, identity) else {
            return verified;
        };
        // Known callers only take the read lock.
        let cached = self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(raw.as_bytes())
            .cloned();
        let announced = match cached {
            Some(p) => p,
            None => {
                let Some(p) = parse_peer(raw.as_bytes()) else {
                    return verified;
                };
                let mut cache = self.peers.write().unwrap_or_else(|e| e.into_inner());
                // Full: new callers count by identity only, so announced
                // values cannot grow the series without bound.
                if cache.len() >= PEER_CACHE {
                    return verified;
                }
                cache.insert(raw.as_bytes().into(), p.clone());
                p
            }
        };
        if announced.namespace != verified.namespace {
            return verified;
        }
        Peer {
            principal: verified.principal,
            ..announced
        }
    }

    /// An authorization outcome other than a plain allow: `denied` or
    /// `audited` by a policy (`namespace/name`), or `unauthenticated`
    /// with the JWT failure.
    pub fn authz(&self, decision: &'static str, policy: &str) {
        let key = Key::from_parts(
            "mesh_proxy_authz_total",
            vec![
                Label::new("decision", decision),
                Label::new("policy", policy.to_string()),
            ],
        );
        self.recorder.register_counter(&key, &META).increment(1);
    }

    /// A counter of the proxy's own, with labels.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, *v)).collect();
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &META)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets. Runs every few
    /// seconds whether or not anyone scrapes, so memory stays flat.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn request_handles(&self, l: &RequestLabels) -> Arc<RequestHandles> {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get(l) {
            return h.clone();
        }
        let labels = istio_labels(
            l.reporter,
            (&l.source, &l.destination),
            &l.destination_service,
            l.protocol,
            Some((l.response_code, l.grpc_status)),
            l.response_flags,
            l.mtls,
        );
        let key = |name: &'static str| Key::from_parts(name, labels.clone());
        let h = Arc::new(RequestHandles {
            total: self
                .recorder
                .register_counter(&key("istio_requests_total"), &META),
            duration: self
                .recorder
                .register_histogram(&key("istio_request_duration_milliseconds"), &META),
            request_bytes: self
                .recorder
                .register_histogram(&key("istio_request_bytes"), &META),
            response_bytes: self
                .recorder
                .register_histogram(&key("istio_response_bytes"), &META),
        });
        map.insert(l.clone(), h.clone());
        h
    }

    /// Records one finished request.
    pub fn request(
        &self,
        l: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let h = self.request_handles(l);
        h.total.increment(1);
        h.duration.record(duration.as_secs_f64() * 1000.0);
        h.request_bytes.record(request_bytes as f64);
        h.response_bytes.record(response_bytes as f64);
    }

    pub fn tcp(&self, l: &TcpLabels) -> Arc<TcpHandles> {
        let mut map = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get(l) {
            return h.clone();
        }
        let labels = istio_labels(
            l.reporter,
            (&l.source, &l.destination),
            &l.destination_service,
            "tcp",
            None,
            l.response_flags,
            l.mtls,
        );
        let key = |name: &'static str| Key::from_parts(name, labels.clone());
        let h = Arc::new(TcpHandles {
            opened: self
                .recorder
                .register_counter(&key("istio_tcp_connections_opened_total"), &META),
            closed: self
                .recorder
                .register_counter(&key("istio_tcp_connections_closed_total"), &META),
            sent: self
                .recorder
                .register_counter(&key("istio_tcp_sent_bytes_total"), &META),
            received: self
                .recorder
                .register_counter(&key("istio_tcp_received_bytes_total"), &META),
        });
        map.insert(l.clone(), h.clone());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_is_known_by_what_it_announces_over_mtls_in_its_own_namespace() {
        let m = Metrics::default();
        let id: Arc<str> = "spiffe://cluster.local/ns/shop/sa/cart".into();
        let v = http::HeaderValue::from_static("cart-v2-7f9c,shop,cart,v2");
        let p = m.caller(Some(&v), Some(&id));
        assert_eq!(&*p.workload, "cart-v2-7f9c");
        assert_eq!(&*p.namespace, "shop");
        assert_eq!(&*p.app, "cart");
        assert_eq!(&*p.version, "v2");
        assert_eq!(p.principal, id);
        // Again, from the cache.
        assert_eq!(m.caller(Some(&v), Some(&id)), p);

        // Without mTLS, or claiming another namespace, only the identity counts.
        let plain = m.caller(Some(&v), None);
        assert_eq!(&*plain.workload, "unknown");
        let other: Arc<str> = "spiffe://cluster.local/ns/payments/sa/cart".into();
        let spoofed = m.caller(Some(&v), Some(&other));
        assert_eq!(&*spoofed.workload, "unknown");
        assert_eq!(&*spoofed.namespace, "payments");
        // Malformed values are ignored.
        for bad in [
            "cart,shop,cart",
            "cart,shop,cart,v2,extra",
            ",shop,cart,v2",
            "cart,shop,cart,v2 ",
            "cart\"},shop,cart,v2",
        ] {
            let v = http::HeaderValue::from_str(bad).unwrap();
            assert_eq!(&*m.caller(Some(&v), Some(&id)).workload, "unknown", "{bad}");
        }
    }
}

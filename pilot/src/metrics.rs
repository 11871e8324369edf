//! Pilot's own metrics (on 15014 `/metrics`). Each pilot has its own
//! recorder, so several can run in one test process; label values come
//! from bounded sets (resource types, kinds).

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

const META: Metadata<'static> = Metadata::new("mesh_pilot", Level::INFO, None);

/// Push and compile latencies, in seconds: from 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub connected: Gauge,
    pub compile_seconds: Histogram,
    pub resources_changed: Counter,
    pub push_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        let key = Key::from_name;
        Metrics(Arc::new(Inner {
            connected: recorder.register_gauge(&key("pilot_xds_connected_proxies"), &META),
            compile_seconds: recorder.register_histogram(&key("pilot_compile_seconds"), &META),
            resources_changed: recorder
                .register_counter(&key("pilot_resources_changed_total"), &META),
            push_latency: recorder.register_histogram(&key("pilot_push_latency_seconds"), &META),
            recorder,
            handle,
        }))
    }

    pub fn render(&self) -> String {
        self.0.handle.run_upkeep();
        self.0.handle.render()
    }

    pub fn upkeep(&self) {
        self.0.handle.run_upkeep();
    }

    pub fn connected(&self) -> &Gauge {
        &self.0.connected
    }

    pub fn compile(&self, took: Duration, changed: usize) {
        self.0.compile_seconds.record(took.as_secs_f64());
        self.0.resources_changed.increment(changed as u64);
    }

    /// From the first change of a burst to a proxy's response being sent.
    pub fn push_latency(&self, d: Duration) {
        self.0.push_latency.record(d.as_secs_f64());
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.0
            .recorder
            .register_counter(&Key::from_parts(name, labels), &META)
    }

    /// One response sent, per type.
    pub fn pushed(&self, ty: &'static str) {
        self.counter("pilot_xds_pushes_total", vec![Label::new("type", ty)])
            .increment(1);
    }

    /// A proxy rejected a resource.
    pub fn nack(&self, ty: &'static str) {
        self.counter("pilot_xds_nacks_total", vec![Label::new("type", ty)])
            .increment(1);
    }

    /// An object (config resource, Service, or a document that names no
    /// object: kind `unknown`) was rejected with content not rejected
    /// before: the same invalid content read again is not counted again.
    pub fn rejected(&self, kind: &'static str) {
        self.counter(
            "pilot_config_rejected_total",
            vec![Label::new("kind", kind)],
        )
        .increment(1);
    }

    /// How many objects of `kind` are rejected right now (each keeps its
    /// last valid version).
    pub fn rejected_now(&self, kind: &'static str, n: usize) {
        self.0
            .recorder
            .register_gauge(
                &Key::from_parts(
                    "pilot_config_rejected_objects",
                    vec![Label::new("kind", kind)],
                ),
                &META,
            )
            .set(n as f64);
    }
}

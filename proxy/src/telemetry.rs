//! Per-request telemetry beyond metrics: distributed tracing and access
//! logs.
//!
//! - **Trace context.** W3C `traceparent` (with `tracestate` passed on)
//!   and B3 (`x-b3-*` or the single `b3` header) are read; without either,
//!   a trace starts here, sampled at the configured percentage. Every
//!   request this proxy forwards carries a new span id in both formats, so
//!   an app that copies the headers onto its own calls (as bookinfo's do)
//!   links their spans under this one.
//! - **Spans.** A sidecar's inbound request is a SERVER span; outbound and
//!   gateway requests are CLIENT spans. Sampled spans go through a bounded
//!   queue to a task that posts them in batches to a Zipkin v2 or
//!   OTLP/HTTP (JSON) collector; when the queue is full the span is
//!   dropped and counted. A request never waits for the exporter.
//! - **Access logs.** Off unless configured: one line per request, JSON or
//!   a `%FIELD%` template, written to stdout by a thread of their own
//!   through a bounded queue (a full queue drops and counts the line).
//!
//! Off (no collector, no access log), nothing here runs on the data path.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Version};
use metrics::Counter;
use serde_json::{Map, Value, json};

use crate::body::{Body, OnEnd};

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collector {
    /// Zipkin v2 JSON (`POST /api/v2/spans`): Zipkin, Jaeger's Zipkin port.
    Zipkin(Endpoint),
    /// OTLP over HTTP with JSON bodies (`POST /v1/traces`).
    Otlp(Endpoint),
}

/// A plain-HTTP collector address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub authority: String,
    pub path: String,
}

impl Collector {
    /// `host:port` or `http://host:port[/path]`; the path defaults to the
    /// protocol's.
    pub fn parse_zipkin(s: &str) -> Result<Collector, String> {
        Endpoint::parse(s, "/api/v2/spans").map(Collector::Zipkin)
    }

    pub fn parse_otlp(s: &str) -> Result<Collector, String> {
        Endpoint::parse(s, "/v1/traces").map(Collector::Otlp)
    }
}

impl Endpoint {
    fn parse(s: &str, default_path: &str) -> Result<Endpoint, String> {
        if s.starts_with("https://") {
            return Err(format!("{s}: collectors are reached over plain HTTP"));
        }
        let rest = s.strip_prefix("http://").unwrap_or(s);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, default_path),
        };
        let valid = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid {
            return Err(format!("{s}: expected host:port or http://host:port/path"));
        }
        Ok(Endpoint {
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

/// An access-log line's shape.
#[derive(Clone, Debug, PartialEq)]
pub enum LogFormat {
    /// One JSON object per line, every field.
    Json,
    /// Text with `%FIELD%` replaced by the field (`-` when absent), e.g.
    /// `[%start_time%] "%method% %path% %protocol%" %status% %reason%`.
    Template(String),
}

impl LogFormat {
    /// `json`, `text` (a default template) or a template with `%field%`s.
    pub fn parse(s: &str) -> Result<LogFormat, String> {
        match s {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Template(TEXT_FORMAT.into())),
            t if t.contains('%') => {
                for name in t.split('%').skip(1).step_by(2) {
                    if !FIELDS.contains(&name) {
                        return Err(format!(
                            "unknown access-log field %{name}% (fields: {})",
                            FIELDS.join(", ")
                        ));
                    }
                }
                Ok(LogFormat::Template(t.to_string()))
            }
            other => Err(format!(
                "access-log format {other:?}: json, text, or a template with %field%s"
            )),
        }
    }
}

const TEXT_FORMAT: &str = "[%start_time%] \"%method% %path% %protocol%\" %status% %reason% \
%bytes_received% %bytes_sent% %duration_ms% %upstream_service_time_ms% \"%user_agent%\" \
\"%request_id%\" \"%authority%\" \"%upstream_host%\" %trace_id% %denied_by%";

/// Every access-log field, in JSON order.
pub const FIELDS: [&str; 21] = [
    "start_time",
    "method",
    "authority",
    "path",
    "protocol",
    "status",
    "reason",
    "response_flags",
    "denied_by",
    "duration_ms",
    "upstream_service_time_ms",
    "bytes_received",
    "bytes_sent",
    "upstream_host",
    "upstream_cluster",
    "downstream_peer",
    "downstream_principal",
    "request_id",
    "trace_id",
    "user_agent",
    "direction",
];

#[derive(Clone, Debug)]
pub struct Settings {
    /// Percentage of new traces sampled (0–100).
    pub sampling: f64,
    pub collector: Option<Collector>,
    pub access_log: Option<LogFormat>,
    /// The longest a span waits before its batch is sent.
    pub flush: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            sampling: 1.0,
            collector: None,
            access_log: None,
            flush: Duration::from_secs(1),
        }
    }
}

/// What happened to spans and log lines: `mesh_proxy_spans_total{outcome}`
/// (exported, dropped: the queue was full, failed: the collector did not
/// take them) and `mesh_proxy_access_log_dropped_total`.
pub struct Drops {
    pub spans: Counter,
    pub logs: Counter,
    pub exported: Counter,
    pub export_failures: Counter,
}

impl Drops {
    pub fn registered(m: &crate::metrics::Metrics) -> Drops {
        let spans = |outcome| m.counter("mesh_proxy_spans_total", &[("outcome", outcome)]);
        Drops {
            spans: spans("dropped"),
            exported: spans("exported"),
            export_failures: spans("failed"),
            logs: m.counter("mesh_proxy_access_log_dropped_total", &[]),
        }
    }
}

struct Sinks {
    sampling: f64,
    spans: Option<tokio::sync::mpsc::Sender<Span>>,
    logs: Option<(std::sync::mpsc::SyncSender<String>, LogFormat)>,
    drops: Arc<Drops>,
}

/// The proxy's tracing and access logging; `Default` is off.
#[derive(Default)]
pub struct Telemetry {
    sinks: Option<Arc<Sinks>>,
}

const QUEUE: usize = 4096;
const BATCH: usize = 256;

impl Telemetry {
    /// Starts the exporter (on the current tokio runtime) and the log
    /// writer as configured; their counters go to `metrics`.
    pub fn start(settings: Settings, metrics: &crate::metrics::Metrics) -> Telemetry {
        let drops = Arc::new(Drops::registered(metrics));
        let spans = settings.collector.clone().map(|c| {
            let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
            tokio::spawn(export(c, rx, settings.flush, drops.clone()));
            tx
        });
        let logs = settings.access_log.clone().map(|format| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || {
                    use std::io::Write;
                    let stdout = std::io::stdout();
                    while let Ok(line) = rx.recv() {
                        let mut out = stdout.lock();
                        let _ = out.write_all(line.as_bytes());
                        // Whatever else queued meanwhile, then one flush.
                        while let Ok(more) = rx.try_recv() {
                            let _ = out.write_all(more.as_bytes());
                        }
                        let _ = out.flush();
                    }
                })
                .ok();
            (tx, format)
        });
        let sinks = (spans.is_some() || logs.is_some()).then(|| {
            Arc::new(Sinks {
                sampling: settings.sampling.clamp(0.0, 100.0),
                spans,
                logs,
                drops: drops.clone(),
            })
        });
        Telemetry { sinks }
    }

    /// Whether tracing or access logging is on.
    pub fn is_on(&self) -> bool {
        self.sinks.is_some()
    }

    /// Reads and rewrites the request's trace headers, makes sure it has an
    /// `x-request-id`, and notes what the access log and span need.
    /// `None` when telemetry is off.
    pub fn begin<B>(
        &self,
        req: &mut Request<B>,
        kind: Kind,
        service: &str,
        downstream: SocketAddr,
        principal: Option<&Arc<str>>,
    ) -> Option<Box<Pending>> {
        let sinks = self.sinks.as_ref()?;
        let headers = req.headers_mut();
        let request_id = match headers.get("x-request-id") {
            Some(v) => v.clone(),
            None => {
                let id = request_id();
                headers.insert("x-request-id", id.clone());
                id
            }
        };
        let trace = sinks.spans.as_ref().map(|_| {
            let t = TraceContext::for_request(headers, sinks.sampling);
            t.write(headers);
            t
        });
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Some(Box::new(Pending {
            sinks: sinks.clone(),
            kind,
            service: service.to_string(),
            started: Instant::now(),
            start_time: SystemTime::now(),
            method: req.method().clone(),
            authority: req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| header("host"))
                .unwrap_or_default(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            version: req.version(),
            user_agent: header("user-agent"),
            bytes_received: header("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0),
            request_id,
            trace,
            downstream,
            principal: principal.cloned(),
            done: false,
        }))
    }
}

/// Which side of the call a proxy records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A sidecar's inbound request.
    Server,
    /// A sidecar's outbound request, or a gateway's.
    Client,
}

/// What the proxy learned while forwarding, for the log and span
/// (response extensions, removed before the response is sent).
#[derive(Clone, Debug, Default)]
pub struct Upstream {
    pub host: Option<SocketAddr>,
    pub cluster: Option<Arc<str>>,
}

/// The policy that denied a request (`namespace/name`).
#[derive(Clone, Debug)]
pub struct DeniedBy(pub Arc<str>);

/// A request in flight, finished when its response body ends.
pub struct Pending {
    sinks: Arc<Sinks>,
    kind: Kind,
    service: String,
    started: Instant,
    start_time: SystemTime,
    method: Method,
    authority: String,
    path: String,
    version: Version,
    user_agent: Option<String>,
    bytes_received: u64,
    request_id: HeaderValue,
    trace: Option<TraceContext>,
    downstream: SocketAddr,
    principal: Option<Arc<str>>,
    /// Set once logged and traced; a request dropped before that (the
    /// client went away) is recorded when the record is dropped.
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let head = Head {
            status: 0,
            reason: None,
            client_gone: true,
            denied_by: None,
            upstream: Upstream::default(),
            headers_at: self.started.elapsed(),
        };
        self.emit(&head, 0, false);
    }
}

/// `pending`, completed by `resp`: finished when its body ends.
pub fn finish_with(pending: Box<Pending>, resp: &mut Response<Body>) {
    let ext = resp.extensions_mut();
    let upstream = ext.remove::<Upstream>().unwrap_or_default();
    let generated = ext.remove::<crate::reason::Reason>();
    let denied_by = ext.remove::<DeniedBy>();
    let head = Head {
        status: resp.status().as_u16(),
        reason: generated,
        client_gone: false,
        denied_by: denied_by.map(|d| d.0),
        upstream,
        headers_at: pending.started.elapsed(),
    };
    let end = End {
        pending: Some(pending),
        head,
    };
    let body = std::mem::replace(resp.body_mut(), Body::empty());
    *resp.body_mut() = body.on_end(Box::new(end));
}

struct Head {
    status: u16,
    reason: Option<crate::reason::Reason>,
    /// The client went away before the response head (Envoy's `DC`).
    client_gone: bool,
    denied_by: Option<Arc<str>>,
    upstream: Upstream,
    /// When the response head was ready (upstream service time).
    headers_at: Duration,
}

impl Head {
    fn flag(&self) -> &'static str {
        match (self.client_gone, self.reason) {
            (true, _) => "DC",
            (false, r) => r.map_or("-", |r| r.response_flag()),
        }
    }
}

struct End {
    pending: Option<Box<Pending>>,
    head: Head,
}

impl OnEnd for End {
    fn on_end(&mut self, bytes: u64, completed: bool) {
        if let Some(p) = self.pending.take() {
            p.finish(&self.head, bytes, completed);
        }
    }
}

impl Pending {
    fn finish(mut self, head: &Head, bytes_sent: u64, completed: bool) {
        self.done = true;
        self.emit(head, bytes_sent, completed);
    }

    fn emit(&self, head: &Head, bytes_sent: u64, completed: bool) {
        let duration = self.started.elapsed();
        if let Some((tx, format)) = &self.sinks.logs {
            let line = self.log_line(format, head, bytes_sent, duration);
            if tx.try_send(line).is_err() {
                self.sinks.drops.logs.increment(1);
            }
        }
        if let (Some(tx), Some(trace)) = (&self.sinks.spans, &self.trace)
            && trace.sampled
        {
            let span = Span {
                trace_id: trace.trace_id,
                id: trace.span_id,
                parent: trace.parent,
                kind: self.kind,
                name: format!("{}{}", self.authority, path_only(&self.path)),
                service: self.service.clone(),
                start_us: micros(self.start_time),
                duration_us: duration.as_micros().max(1) as u64,
                tags: self.span_tags(head, bytes_sent, completed),
                error: head.status >= 500 || !completed,
            };
            if tx.try_send(span).is_err() {
                self.sinks.drops.spans.increment(1);
            }
        }
    }

    fn fields(
        &self,
        head: &Head,
        bytes_sent: u64,
        duration: Duration,
    ) -> Vec<(&'static str, Value)> {
        let ms = |d: Duration| Value::from((d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0);
        let opt = |s: Option<String>| s.map_or(Value::Null, Value::String);
        vec![
            ("start_time", Value::String(rfc3339(self.start_time))),
            ("method", self.method.as_str().into()),
            ("authority", self.authority.clone().into()),
            ("path", self.path.clone().into()),
            ("protocol", protocol(self.version).into()),
            ("status", head.status.into()),
            (
                "reason",
                match (head.client_gone, head.reason) {
                    (true, _) => "client disconnected".into(),
                    (false, r) => opt(r.map(|r| r.as_str().to_string())),
                },
            ),
            ("response_flags", head.flag().into()),
            (
                "denied_by",
                opt(head.denied_by.as_deref().map(str::to_string)),
            ),
            ("duration_ms", ms(duration)),
            (
                "upstream_service_time_ms",
                if head.upstream.host.is_some() {
                    ms(head.headers_at)
                } else {
                    Value::Null
                },
            ),
            ("bytes_received", self.bytes_received.into()),
            ("bytes_sent", bytes_sent.into()),
            (
                "upstream_host",
                opt(head.upstream.host.map(|h| h.to_string())),
            ),
            (
                "upstream_cluster",
                opt(head.upstream.cluster.as_deref().map(str::to_string)),
            ),
            ("downstream_peer", self.downstream.to_string().into()),
            (
                "downstream_principal",
                opt(self.principal.as_deref().map(str::to_string)),
            ),
            (
                "request_id",
                self.request_id.to_str().unwrap_or_default().into(),
            ),
            (
                "trace_id",
                opt(self.trace.as_ref().map(|t| format!("{:032x}", t.trace_id))),
            ),
            ("user_agent", opt(self.user_agent.clone())),
            (
                "direction",
                match self.kind {
                    Kind::Server => "inbound",
                    Kind::Client => "outbound",
                }
                .into(),
            ),
        ]
    }

    fn log_line(
        &self,
        format: &LogFormat,
        head: &Head,
        bytes_sent: u64,
        duration: Duration,
    ) -> String {
        let fields = self.fields(head, bytes_sent, duration);
        let mut line = match format {
            LogFormat::Json => {
                let map: Map<String, Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                Value::Object(map).to_string()
            }
            LogFormat::Template(t) => {
                let mut out = String::with_capacity(t.len() + 64);
                for (i, piece) in t.split('%').enumerate() {
                    if i % 2 == 0 {
                        out.push_str(piece);
                        continue;
                    }
                    match fields.iter().find(|(k, _)| *k == piece).map(|(_, v)| v) {
                        Some(Value::String(s)) => out.push_str(s),
                        Some(Value::Null) | None => out.push('-'),
                        Some(v) => {
                            let _ = write!(out, "{v}");
                        }
                    }
                }
                out
            }
        };
        line.push('\n');
        line
    }

    fn span_tags(
        &self,
        head: &Head,
        bytes_sent: u64,
        completed: bool,
    ) -> Vec<(&'static str, String)> {
        let mut tags = vec![
            ("http.method", self.method.as_str().to_string()),
            (
                "http.url",
                format!("http://{}{}", self.authority, self.path),
            ),
            ("http.status_code", head.status.to_string()),
            ("http.protocol", protocol(self.version).to_string()),
            ("request_size", self.bytes_received.to_string()),
            ("response_size", bytes_sent.to_string()),
            (
                "guid:x-request-id",
                self.request_id.to_str().unwrap_or_default().to_string(),
            ),
            ("peer.address", self.downstream.ip().to_string()),
            ("response_flags", head.flag().to_string()),
        ];
        if let Some(h) = head.upstream.host {
            tags.push(("upstream_host", h.to_string()));
        }
        if let Some(c) = &head.upstream.cluster {
            tags.push(("upstream_cluster", c.to_string()));
        }
        if let Some(p) = &self.principal {
            tags.push(("peer.principal", p.to_string()));
        }
        if let Some(d) = &head.denied_by {
            tags.push(("denied_by", d.to_string()));
        }
        if !completed {
            tags.push(("error.message", "response not completed".into()));
        }
        tags
    }
}

fn path_only(p: &str) -> &str {
    p.split('?').next().unwrap_or(p)
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `2006-01-02T15:04:05.000Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// A random x-request-id (UUID v4 form).
pub fn request_id() -> HeaderValue {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let s = format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    );
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Where a request sits in its trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// This proxy's span.
    pub span_id: u64,
    /// The caller's span, if any.
    pub parent: Option<u64>,
    pub sampled: bool,
    /// Whether the context came from a valid `traceparent`: only then is
    /// the caller's `tracestate` passed on.
    pub w3c: bool,
}

/// What a request says about its trace: the caller's trace and span, and
/// its sampling decision (`None`: deferred to this proxy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub ids: Option<(u128, u64)>,
    pub sampled: Option<bool>,
    pub w3c: bool,
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

impl TraceContext {
    /// A new trace, sampled with probability `percent`/100.
    pub fn root(percent: f64) -> TraceContext {
        TraceContext {
            trace_id: (u128::from(nonzero_u64()) << 64) | u128::from(fastrand::u64(..)),
            span_id: nonzero_u64(),
            parent: None,
            sampled: sample(percent),
            w3c: false,
        }
    }

    /// This proxy's span for a request: under the caller's when it sent
    /// one, else a new trace; sampled as the caller decided, or at
    /// `percent` when it did not.
    pub fn for_request(h: &HeaderMap, percent: f64) -> TraceContext {
        let Some(incoming) = TraceContext::incoming(h) else {
            return TraceContext::root(percent);
        };
        let sampled = incoming.sampled.unwrap_or_else(|| sample(percent));
        match incoming.ids {
            Some((trace_id, parent)) => TraceContext {
                trace_id,
                span_id: nonzero_u64(),
                parent: Some(parent),
                sampled,
                w3c: incoming.w3c,
            },
            None => TraceContext {
                sampled,
                ..TraceContext::root(percent)
            },
        }
    }

    /// A span of this proxy's under this one.
    pub fn child(self) -> TraceContext {
        TraceContext {
            span_id: nonzero_u64(),
            parent: Some(self.span_id),
            ..self
        }
    }

    /// The caller's context: `traceparent` first, then B3 (single header,
    /// then multiple headers). Malformed or all-zero ids count as absent;
    /// a B3 sampling decision alone (`b3: 0`, `x-b3-sampled: 1`) still
    /// counts.
    pub fn incoming(h: &HeaderMap) -> Option<Incoming> {
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        if let Some(tp) = get("traceparent")
            && let Some(t) = parse_traceparent(tp)
        {
            return Some(t);
        }
        if let Some(b3) = get("b3")
            && let Some(t) = parse_b3_single(b3)
        {
            return Some(t);
        }
        let sampled = match (get("x-b3-flags"), get("x-b3-sampled")) {
            (Some("1"), _) => Some(true),
            (_, Some("1" | "true")) => Some(true),
            (_, Some("0" | "false")) => Some(false),
            _ => None,
        };
        let ids = get("x-b3-traceid")
            .and_then(parse_trace_id)
            .zip(get("x-b3-spanid").and_then(parse_span_id));
        (ids.is_some() || sampled.is_some()).then_some(Incoming {
            ids,
            sampled,
            w3c: false,
        })
    }

    /// Puts this context on a request going on: `traceparent` (and the
    /// caller's `tracestate` when it came with a valid `traceparent`) and
    /// the B3 headers.
    pub fn write(&self, h: &mut HeaderMap) {
        let flags = if self.sampled { "01" } else { "00" };
        let put = |h: &mut HeaderMap, name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(name, v);
            }
        };
        put(
            h,
            "traceparent",
            format!("00-{:032x}-{:016x}-{flags}", self.trace_id, self.span_id),
        );
        if !self.w3c {
            h.remove("tracestate");
        }
        h.remove("b3");
        h.remove("x-b3-flags");
        put(h, "x-b3-traceid", format!("{:032x}", self.trace_id));
        put(h, "x-b3-spanid", format!("{:016x}", self.span_id));
        match self.parent {
            Some(p) => put(h, "x-b3-parentspanid", format!("{p:016x}")),
            None => {
                h.remove("x-b3-parentspanid");
            }
        }
        put(
            h,
            "x-b3-sampled",
            (if self.sampled { "1" } else { "0" }).into(),
        );
    }
}

fn sample(percent: f64) -> bool {
    fastrand::f64() * 100.0 < percent
}

fn lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_trace_id(s: &str) -> Option<u128> {
    if !(s.len() == 32 || s.len() == 16) || !lower_hex(s) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|&v| v != 0)
}

fn parse_span_id(s: &str) -> Option<u64> {
    if s.len() != 16 || !lower_hex(s) {
        return None;
    }
    u64::from_str_radix(s, 16).ok().filter(|&v| v != 0)
}

/// W3C Trace Context: `version-traceid-parentid-flags`, lower-case hex.
fn parse_traceparent(s: &str) -> Option<Incoming> {
    let mut parts = s.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || !lower_hex(version) || version == "ff" || trace.len() != 32 {
        return None;
    }
    if flags.len() != 2 || !lower_hex(flags) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Incoming {
        ids: Some((parse_trace_id(trace)?, parse_span_id(span)?)),
        sampled: Some(flags & 1 == 1),
        w3c: true,
    })
}

/// B3 single header: `{trace}-{span}[-{sampled}[-{parent}]]`, or a
/// decision alone (`0`, `1`, `d`).
fn parse_b3_single(s: &str) -> Option<Incoming> {
    let decision = |v: &str| match v {
        "0" => Some(Some(false)),
        "1" | "d" => Some(Some(true)),
        _ => None,
    };
    let s = s.trim();
    if let Some(sampled) = decision(s) {
        return Some(Incoming {
            ids: None,
            sampled,
            w3c: false,
        });
    }
    let mut parts = s.split('-');
    let trace_id = parse_trace_id(parts.next()?)?;
    let span_id = parse_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some(v) => decision(v)?,
    };
    if let Some(parent) = parts.next() {
        parse_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming {
        ids: Some((trace_id, span_id)),
        sampled,
        w3c: false,
    })
}

/// A finished span.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: u128,
    pub id: u64,
    pub parent: Option<u64>,
    pub kind: Kind,
    pub name: String,
    pub service: String,
    pub start_us: u64,
    pub duration_us: u64,
    pub tags: Vec<(&'static str, String)>,
    pub error: bool,
}

/// Zipkin v2 JSON for a batch.
pub fn zipkin_json(spans: &[Span]) -> Value {
    Value::Array(
        spans
            .iter()
            .map(|s| {
                let mut tags: Map<String, Value> = s
                    .tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
                    .collect();
                if s.error {
                    tags.insert("error".into(), "true".into());
                }
                let mut o = json!({
                    "traceId": format!("{:032x}", s.trace_id),
                    "id": format!("{:016x}", s.id),
                    "name": s.name,
                    "kind": match s.kind { Kind::Server => "SERVER", Kind::Client => "CLIENT" },
                    "timestamp": s.start_us,
                    "duration": s.duration_us,
                    "localEndpoint": {"serviceName": s.service},
                    "tags": tags,
                });
                if let Some(p) = s.parent {
                    o["parentId"] = format!("{p:016x}").into();
                }
                o
            })
            .collect(),
    )
}

/// OTLP/HTTP JSON (`ExportTraceServiceRequest`) for a batch, one resource
/// per service name.
pub fn otlp_json(spans: &[Span]) -> Value {
    let mut by_service: std::collections::BTreeMap<&str, Vec<Value>> = Default::default();
    for s in spans {
        let attr = |k: &str, v: &str| json!({"key": k, "value": {"stringValue": v}});
        let mut o = json!({
            "traceId": format!("{:032x}", s.trace_id),
            "spanId": format!("{:016x}", s.id),
            "name": s.name,
            "kind": match s.kind { Kind::Server => 2, Kind::Client => 3 },
            "startTimeUnixNano": (s.start_us * 1000).to_string(),
            "endTimeUnixNano": ((s.start_us + s.duration_us) * 1000).to_string(),
            "attributes": s.tags.iter().map(|(k, v)| attr(k, v)).collect::<Vec<_>>(),
            "status": {"code": if s.error { 2 } else { 0 }},
        });
        if let Some(p) = s.parent {
            o["parentSpanId"] = format!("{p:016x}").into();
        }
        by_service.entry(s.service.as_str()).or_default().push(o);
    }
    json!({"resourceSpans": by_service.into_iter().map(|(service, spans)| json!({
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "mesh-proxy"}, "spans": spans}],
    })).collect::<Vec<_>>()})
}

/// Sends spans in batches: when `BATCH` are queued or `flush` after the
/// first of a batch.
async fn export(
    collector: Collector,
    mut rx: tokio::sync::mpsc::Receiver<Span>,
    flush: Duration,
    drops: Arc<Drops>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + flush;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let (endpoint, body) = match &collector {
            Collector::Zipkin(e) => (e, zipkin_json(&batch)),
            Collector::Otlp(e) => (e, otlp_json(&batch)),
        };
        let n = batch.len() as u64;
        batch.clear();
        match tokio::time::timeout(Duration::from_secs(5), post(endpoint, body.to_string())).await {
            Ok(Ok(())) => {
                drops.exported.increment(n);
            }
            Ok(Err(e)) => {
                drops.export_failures.increment(n);
                tracing::debug!(collector = %endpoint.authority, error = %e, "span export failed");
            }
            Err(_) => {
                drops.export_failures.increment(n);
                tracing::debug!(collector = %endpoint.authority, "span export timed out");
            }
        }
    }
}

async fn post(endpoint: &Endpoint, body: String) -> Result<(), String> {
    use http_body_util::Full;
    let stream = tokio::net::TcpStream::connect(&endpoint.authority)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(endpoint.path.as_str())
        .header(http::header::HOST, endpoint.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {}", resp.status()))
    }
}

#[cfg(test)]
mod tests;

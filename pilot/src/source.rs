//! Where pilot's inputs come from. A source reads services, workloads and
//! config, validates them, and writes what is valid into the [`Store`];
//! what is invalid is logged with the analyzer's message and counted, and
//! the last valid version of it keeps applying.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as core;
use mesh_api::analysis::{self, Analysis};
use mesh_api::load::{Disposition, Document, Item};
use mesh_api::validate::Severity;
use mesh_api::{Resource, ResourceKey};

use crate::metrics::Metrics;
use crate::registry::{Inputs, ObjectKey, Service, Workload};
use crate::store::Store;

mod kubernetes;
pub use kubernetes::{Kubernetes, Namespaces, endpoints_of_slice, workload_of_pod};

/// Where a source writes: the store, the metrics, and the readiness flag it
/// raises once its first complete view is in.
#[derive(Clone)]
pub struct Sink {
    pub store: Arc<Store>,
    pub metrics: Metrics,
    pub ready: tokio::sync::watch::Sender<bool>,
}

/// A source of services, workloads and config, run until pilot stops.
pub trait Source: Send + 'static {
    fn run(self, sink: Sink) -> impl std::future::Future<Output = ()> + Send;
}

/// A directory (or file) of multi-document YAML: mesh and Istio resources,
/// Kubernetes Services and WorkloadEntries. Re-read when any file changes.
pub struct Files {
    pub path: PathBuf,
    pub interval: Duration,
}

/// An object a source could not accept.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejected {
    /// A mesh resource (WorkloadEntries included).
    Config(ResourceKey),
    /// A Kubernetes Service.
    Service(ObjectKey),
    /// A document that names no object pilot can tell (not YAML, no
    /// apiVersion, kind or name): nothing known disappears because of it.
    Document { file: String, line: usize },
}

impl Rejected {
    /// The `kind` label of the rejection metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejected::Config(k) => k.kind.name(),
            Rejected::Service(_) => "Service",
            Rejected::Document { .. } => "unknown",
        }
    }
}

/// One rejection: what, a fingerprint of the invalid content (the same
/// content read again is the same rejection), and the error.
#[derive(Clone, Debug)]
pub struct Rejection {
    pub object: Rejected,
    pub fingerprint: u64,
    pub message: String,
}

/// The outcome of reading the files once.
#[derive(Default)]
pub struct Loaded {
    pub inputs: Inputs,
    /// Error findings, as `file:line: error: …` lines.
    pub errors: Vec<String>,
    /// Objects that were present but invalid: each keeps its last valid
    /// version.
    pub rejected: Vec<Rejection>,
}

impl Loaded {
    fn reject(&mut self, object: Rejected, content: &impl Hash, message: String) {
        self.errors.push(message.clone());
        self.rejected.push(Rejection {
            object,
            fingerprint: fingerprint(content),
            message,
        });
    }
}

fn fingerprint(content: &impl Hash) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    content.hash(&mut h);
    h.finish()
}

impl Files {
    /// Reads everything once.
    pub fn load(&self) -> std::io::Result<Loaded> {
        let sources = analysis::read_path(&self.path)?;
        let mut out = Loaded::default();
        let mut docs: Vec<Document> = Vec::new();
        let mut services: Vec<(String, usize, core::Service)> = Vec::new();
        for s in &sources {
            for d in mesh_api::load::parse_stream(&s.name, &s.text) {
                match &d.item {
                    Item::Other {
                        api_version,
                        kind,
                        value,
                    } if api_version == "v1" && kind == "Service" => {
                        match serde_yaml::from_value::<core::Service>(value.clone()) {
                            Ok(svc) => services.push((d.origin.file.clone(), d.origin.line, svc)),
                            Err(e) => {
                                let object = match identity(value) {
                                    Some((_, _, namespace, name)) => {
                                        Rejected::Service(ObjectKey::new(namespace, name))
                                    }
                                    None => Rejected::Document {
                                        file: d.origin.file.clone(),
                                        line: d.origin.line,
                                    },
                                };
                                let what = match &object {
                                    Rejected::Service(key) => format!("Service {key}"),
                                    _ => "Service".to_string(),
                                };
                                out.reject(
                                    object,
                                    value,
                                    format!("{}: error: {what}: {e}", d.origin),
                                );
                            }
                        }
                    }
                    Item::Invalid(e) => {
                        let text = document_text(&s.text, d.origin.line);
                        let object = serde_yaml::from_str::<serde_yaml::Value>(&text)
                            .ok()
                            .and_then(|v| object_of(&v))
                            .unwrap_or(Rejected::Document {
                                file: d.origin.file.clone(),
                                line: d.origin.line,
                            });
                        let message = match &object {
                            Rejected::Config(k) => format!(
                                "{}:{}:{}: error: {k}: {}",
                                e.file, e.line, e.column, e.message
                            ),
                            Rejected::Service(k) => format!(
                                "{}:{}:{}: error: Service {k}: {}",
                                e.file, e.line, e.column, e.message
                            ),
                            Rejected::Document { .. } => {
                                format!("{}:{}:{}: error: {}", e.file, e.line, e.column, e.message)
                            }
                        };
                        out.reject(object, &text, message);
                    }
                    _ => docs.push(d),
                }
            }
        }
        for (file, line, svc) in services {
            match Service::from_k8s(&svc) {
                Ok(s) => {
                    out.inputs.services.insert(s.key.clone(), Arc::new(s));
                }
                Err(e) => {
                    let key = ObjectKey::new(
                        svc.metadata
                            .namespace
                            .clone()
                            .unwrap_or_else(|| "default".into()),
                        svc.metadata.name.clone().unwrap_or_default(),
                    );
                    let content = serde_json::to_string(&svc).unwrap_or_default();
                    let message = format!("{file}:{line}: error: Service {key}: {e}");
                    out.reject(Rejected::Service(key), &content, message);
                }
            }
        }
        load_config(docs, &mut out);
        Ok(out)
    }
}

/// The text of the document starting at `line` (1-based) of a file: up to
/// the next document marker.
fn document_text(file: &str, line: usize) -> String {
    let mut out = String::new();
    for l in file.lines().skip(line.saturating_sub(1)) {
        if l.starts_with("---") || l.starts_with("...") {
            break;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// apiVersion, kind, namespace (`default` when absent) and name of a
/// document, when it says them.
fn identity(value: &serde_yaml::Value) -> Option<(&str, &str, &str, &str)> {
    let meta = value.get("metadata");
    let name = meta?.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or(mesh_api::resource::DEFAULT_NAMESPACE);
    Some((
        value.get("apiVersion")?.as_str()?,
        value.get("kind")?.as_str()?,
        namespace,
        name,
    ))
}

/// The object a document that failed to read stands for, when it can be
/// told: a mesh (or Istio) resource or a Kubernetes Service.
fn object_of(value: &serde_yaml::Value) -> Option<Rejected> {
    let (api_version, kind, namespace, name) = identity(value)?;
    match mesh_api::load::disposition(api_version, kind) {
        Disposition::Mesh(kind) | Disposition::Istio(kind) => Some(Rejected::Config(ResourceKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        })),
        _ if api_version == "v1" && kind == "Service" => {
            Some(Rejected::Service(ObjectKey::new(namespace, name)))
        }
        _ => None,
    }
}

impl Source for Files {
    /// Loads, then reloads whenever a file's size or time changes. Invalid
    /// objects keep their last valid version.
    async fn run(self, sink: Sink) {
        let Sink {
            store,
            metrics,
            ready,
        } = sink;
        let mut last_stamp = None;
        let mut good = Inputs::default();
        let mut rejections = Rejections::default();
        loop {
            let stamp = stamp(&self.path);
            if stamp != last_stamp {
                last_stamp = stamp;
                match self.load() {
                    Ok(loaded) => {
                        rejections.observe(&loaded.rejected, "files", &metrics);
                        good = merge_last_good(&good, loaded);
                        store.replace(good.clone());
                        ready.send_replace(true);
                    }
                    Err(e) => {
                        tracing::error!(path = %self.path.display(), error = %e, "cannot read config files; keeping the last ones");
                    }
                }
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}

/// The objects a source rejects right now. A rejection is logged and
/// counted (`pilot_config_rejected_total`) once per distinct invalid
/// content: reading the same invalid object again changes nothing, a new
/// invalid version of it counts again. `pilot_config_rejected_objects`
/// says how many are rejected now.
#[derive(Default)]
pub(crate) struct Rejections {
    current: BTreeMap<Rejected, u64>,
}

impl Rejections {
    /// Takes the complete set of current rejections.
    pub(crate) fn observe(&mut self, now: &[Rejection], source: &'static str, metrics: &Metrics) {
        let mut next: BTreeMap<Rejected, u64> = BTreeMap::new();
        for r in now {
            let known = self.current.get(&r.object) == Some(&r.fingerprint)
                || next.get(&r.object) == Some(&r.fingerprint);
            if !known {
                tracing::error!(source, "rejected: {}", r.message);
                metrics.rejected(r.object.kind());
            }
            next.insert(r.object.clone(), r.fingerprint);
        }
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for k in self.current.keys() {
            counts.entry(k.kind()).or_insert(0);
        }
        for k in next.keys() {
            *counts.entry(k.kind()).or_insert(0) += 1;
        }
        for (kind, n) in counts {
            metrics.rejected_now(kind, n);
        }
        self.current = next;
    }
}

/// Converts and analyzes config documents (mesh and Istio resources,
/// RouteRules) as one set, and adds the valid ones to `out`: the analyzer's
/// errors go to `out.errors`, resources that are present but invalid to
/// `out.rejected`.
pub(crate) fn load_config(docs: Vec<Document>, out: &mut Loaded) {
    // Every resource the documents name, valid or not, and a fingerprint
    // of its content (of all its definitions, when defined twice).
    let mut present: BTreeMap<ResourceKey, u64> = BTreeMap::new();
    let (converted, _) = mesh_api::convert::convert(docs.clone());
    for c in converted {
        if let mesh_api::convert::Output::Resource(r) = c.item {
            let fp = fingerprint(&r.to_json().to_string());
            present
                .entry(r.key())
                .and_modify(|f| *f = fingerprint(&(*f, fp)))
                .or_insert(fp);
        }
    }
    let Analysis {
        findings,
        resources,
    } = analysis::analyze(docs);
    // Error messages per resource (`Kind namespace/name`).
    let mut messages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in &findings {
        if f.severity != Severity::Error {
            continue;
        }
        let line = f.to_string();
        out.errors.push(line.clone());
        match &f.resource {
            Some(r) => messages.entry(r.clone()).or_default().push(line),
            None => out.rejected.push(Rejection {
                object: Rejected::Document {
                    file: f.file.clone(),
                    line: f.line,
                },
                fingerprint: fingerprint(&line),
                message: line,
            }),
        }
    }
    for r in resources {
        let key = r.key().to_string();
        if messages.contains_key(&key) {
            continue;
        }
        if let Err(e) = add_resource(&mut out.inputs, r) {
            let line = format!("{ORIGIN_UNKNOWN}: error: {key}: {e}");
            out.errors.push(line.clone());
            messages.entry(key).or_default().push(line);
        }
    }
    for (key, fp) in present {
        let applied = out.inputs.config.contains_key(&key)
            || (key.kind == mesh_api::Kind::WorkloadEntry
                && out
                    .inputs
                    .workloads
                    .contains_key(&ObjectKey::new(&key.namespace, &key.name)));
        if !applied {
            let message = messages
                .get(&key.to_string())
                .map(|m| m.join("; "))
                .unwrap_or_else(|| format!("{key}: not applied"));
            out.rejected.push(Rejection {
                object: Rejected::Config(key),
                fingerprint: fp,
                message,
            });
        }
    }
}

/// Where an error found after analysis says it came from.
const ORIGIN_UNKNOWN: &str = "-";

/// The new inputs, except that a rejected object keeps its previous valid
/// version, and a document that names no object keeps every object the
/// new inputs lack.
pub fn merge_last_good(previous: &Inputs, loaded: Loaded) -> Inputs {
    let mut next = loaded.inputs;
    let mut keep_all = false;
    for r in &loaded.rejected {
        match &r.object {
            Rejected::Config(key) if key.kind == mesh_api::Kind::WorkloadEntry => {
                let ok = ObjectKey::new(&key.namespace, &key.name);
                if let Some(w) = previous.workloads.get(&ok) {
                    next.workloads.insert(ok, w.clone());
                }
            }
            Rejected::Config(key) => {
                if let Some(r) = previous.config.get(key) {
                    next.config.insert(key.clone(), r.clone());
                }
            }
            Rejected::Service(key) => {
                if let Some(s) = previous.services.get(key) {
                    next.services.insert(key.clone(), s.clone());
                }
            }
            Rejected::Document { .. } => keep_all = true,
        }
    }
    if keep_all {
        // A document pilot cannot read names nothing: keep what the
        // previous version had that the new one lacks.
        for (k, r) in &previous.config {
            next.config.entry(k.clone()).or_insert_with(|| r.clone());
        }
        for (k, s) in &previous.services {
            next.services.entry(k.clone()).or_insert_with(|| s.clone());
        }
        for (k, w) in &previous.workloads {
            next.workloads.entry(k.clone()).or_insert_with(|| w.clone());
        }
    }
    next
}

fn add_resource(inputs: &mut Inputs, r: Resource) -> Result<(), String> {
    match r {
        Resource::WorkloadEntry(we) => {
            let w = Workload::from_entry(&we)?;
            inputs.workloads.insert(w.key.clone(), Arc::new(w));
        }
        r => {
            inputs.config.insert(r.key(), Arc::new(r));
        }
    }
    Ok(())
}

/// Sizes and modification times of every file below `path`.
fn stamp(path: &std::path::Path) -> Option<BTreeMap<PathBuf, (u64, SystemTime)>> {
    let mut out = BTreeMap::new();
    fn walk(p: &std::path::Path, out: &mut BTreeMap<PathBuf, (u64, SystemTime)>) {
        let Ok(meta) = std::fs::metadata(p) else {
            return;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path(), out);
                }
            }
        } else {
            out.insert(
                p.to_path_buf(),
                (
                    meta.len(),
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ),
            );
        }
    }
    walk(path, &mut out);
    Some(out)
}

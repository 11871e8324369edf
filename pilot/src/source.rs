//! Where pilot's inputs come from. A source reads services, workloads and
//! config, validates them, and writes what is valid into the [`Store`];
//! what is invalid is logged with the analyzer's message and counted, and
//! the last valid version of it keeps applying.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as core;
use mesh_api::analysis::{self, Analysis};
use mesh_api::load::{Document, Item};
use mesh_api::validate::Severity;
use mesh_api::{Resource, ResourceKey};

use crate::metrics::Metrics;
use crate::registry::{Inputs, ObjectKey, Service, Workload};
use crate::store::Store;

mod kubernetes;
pub use kubernetes::{Kubernetes, endpoints_of_slice, workload_of_pod};

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

/// The outcome of reading the files once.
#[derive(Default)]
pub struct Loaded {
    pub inputs: Inputs,
    /// Error findings, as `file:line: error: …` lines.
    pub errors: Vec<String>,
    /// Resources that were present but invalid.
    pub rejected: Vec<ResourceKey>,
    pub rejected_services: Vec<ObjectKey>,
    /// Whole files that could not be read as YAML.
    pub unreadable: Vec<String>,
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
                            Err(e) => out
                                .errors
                                .push(format!("{}: error: Service: {e}", d.origin)),
                        }
                    }
                    Item::Invalid(_) => {
                        if !out.unreadable.contains(&d.origin.file) {
                            out.unreadable.push(d.origin.file.clone());
                        }
                        docs.push(d);
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
                    out.errors
                        .push(format!("{file}:{line}: error: Service {key}: {e}"));
                    out.rejected_services.push(key);
                }
            }
        }
        load_config(docs, &mut out);
        Ok(out)
    }
}

impl Source for Files {
    /// Loads, then reloads whenever a file's size or time changes. Invalid
    /// resources keep their last valid version.
    async fn run(self, sink: Sink) {
        let Sink {
            store,
            metrics,
            ready,
        } = sink;
        let mut last_stamp = None;
        let mut good = Inputs::default();
        loop {
            let stamp = stamp(&self.path);
            if stamp != last_stamp {
                last_stamp = stamp;
                match self.load() {
                    Ok(loaded) => {
                        report(&loaded, "files", &metrics);
                        good = merge_last_good(&good, loaded);
                        let next = good.clone();
                        store.update(|i| *i = next);
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

/// Logs what a load rejected and counts it.
fn report(loaded: &Loaded, source: &'static str, metrics: &Metrics) {
    for e in &loaded.errors {
        tracing::error!(source, "rejected: {e}");
    }
    for k in &loaded.rejected {
        metrics.rejected(k.kind.name());
    }
    for _ in &loaded.rejected_services {
        metrics.rejected("Service");
    }
}

/// Converts and analyzes config documents (mesh and Istio resources,
/// RouteRules) as one set, and adds the valid ones to `out`: the analyzer's
/// errors go to `out.errors`, resources that are present but invalid to
/// `out.rejected`.
pub(crate) fn load_config(docs: Vec<Document>, out: &mut Loaded) {
    let present: Vec<ResourceKey> = {
        // Every resource the documents name, valid or not.
        let (converted, _) = mesh_api::convert::convert(docs.clone());
        converted
            .into_iter()
            .filter_map(|c| match c.item {
                mesh_api::convert::Output::Resource(r) => Some(r.key()),
                _ => None,
            })
            .collect()
    };
    let Analysis {
        findings,
        resources,
    } = analysis::analyze(docs);
    let mut bad: Vec<String> = Vec::new();
    for f in &findings {
        if f.severity == Severity::Error {
            out.errors.push(f.to_string());
            if let Some(r) = &f.resource {
                bad.push(r.clone());
            }
        }
    }
    for r in resources {
        let key = r.key();
        if bad.contains(&key.to_string()) {
            continue;
        }
        add_resource(&mut out.inputs, r, &mut out.errors);
    }
    for key in present {
        let applied = out.inputs.config.contains_key(&key)
            || (key.kind == mesh_api::Kind::WorkloadEntry
                && out
                    .inputs
                    .workloads
                    .contains_key(&ObjectKey::new(&key.namespace, &key.name)));
        if !applied && !out.rejected.contains(&key) {
            out.rejected.push(key);
        }
    }
}

/// The new inputs, except that a rejected resource (or every resource of
/// an unreadable file) keeps its previous valid version.
pub fn merge_last_good(previous: &Inputs, loaded: Loaded) -> Inputs {
    let mut next = loaded.inputs;
    for key in &loaded.rejected {
        if key.kind == mesh_api::Kind::WorkloadEntry {
            let ok = ObjectKey::new(&key.namespace, &key.name);
            if let Some(w) = previous.workloads.get(&ok) {
                next.workloads.insert(ok, w.clone());
            }
        } else if let Some(r) = previous.config.get(key) {
            next.config.insert(key.clone(), r.clone());
        }
    }
    for key in &loaded.rejected_services {
        if let Some(s) = previous.services.get(key) {
            next.services.insert(key.clone(), s.clone());
        }
    }
    if !loaded.unreadable.is_empty() {
        // A file that is not YAML at all names no resources: keep what the
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

fn add_resource(inputs: &mut Inputs, r: Resource, errors: &mut Vec<String>) {
    match r {
        Resource::WorkloadEntry(we) => match Workload::from_entry(&we) {
            Ok(w) => {
                inputs.workloads.insert(w.key.clone(), Arc::new(w));
            }
            Err(e) => errors.push(format!("WorkloadEntry: {e}")),
        },
        r => {
            inputs.config.insert(r.key(), Arc::new(r));
        }
    }
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

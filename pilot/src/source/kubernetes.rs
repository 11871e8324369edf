//! The Kubernetes source: kube-runtime watchers over Services, Pods,
//! EndpointSlices and the mesh's CRDs, each folded into a local copy of
//! what the API server holds (a reflector), and the copies turned into
//! pilot's [`Inputs`].
//!
//! - A watch that expires (410 Gone) relists; objects missing from the new
//!   list are deleted. Errors back off and retry (kube-runtime's default).
//! - Pods are the workloads: every running pod with an address gets its own
//!   config; only ready ones are endpoints. EndpointSlices matter only for
//!   services without a selector (slices the EndpointSlice controller
//!   manages mirror pods pilot already sees).
//! - Config objects are validated together, as the files source does: an
//!   invalid one is logged with the analyzer's message, counted, and its
//!   last valid version keeps applying.
//! - Nothing reaches the store until every watcher has listed once, so
//!   proxies never see a half-read cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use mesh_api::Kind;
use mesh_api::load::{Document, Item, LoadError, Origin};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Loaded, Sink, Source, load_config, merge_last_good, report};
use crate::registry::{Inputs, ObjectKey, SERVICE_NAME_LABEL, Service, Workload};

/// Watches the cluster `client` talks to.
pub struct Kubernetes {
    client: kube::Client,
}

impl Kubernetes {
    pub fn new(client: kube::Client) -> Kubernetes {
        Kubernetes { client }
    }
}

/// The kinds the source watches as CRDs: every mesh kind.
const CONFIG_KINDS: [Kind; 10] = Kind::ALL;
/// The label the EndpointSlice controller puts on the slices it manages.
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// Where config read from the API server says it came from in errors.
const ORIGIN: &str = "apiserver";

/// One watcher's event, tagged with what it watches.
enum Update {
    Service(Box<Event<core::Service>>),
    Pod(Box<Event<core::Pod>>),
    Slice(Box<Event<EndpointSlice>>),
    Config(Kind, Box<Event<DynamicObject>>),
}

impl Source for Kubernetes {
    async fn run(self, sink: Sink) {
        let (tx, mut rx) = mpsc::channel(1024);
        // Dropping the set (pilot stopping) stops the watchers.
        let mut watchers = JoinSet::new();
        let c = &self.client;
        watch(&mut watchers, Api::all(c.clone()), &tx, |e| {
            Update::Service(Box::new(e))
        });
        watch(&mut watchers, Api::all(c.clone()), &tx, |e| {
            Update::Pod(Box::new(e))
        });
        watch(&mut watchers, Api::all(c.clone()), &tx, |e| {
            Update::Slice(Box::new(e))
        });
        for kind in CONFIG_KINDS {
            let ar = kind.api_resource();
            watch(
                &mut watchers,
                Api::<DynamicObject>::all_with(c.clone(), &ar),
                &tx,
                move |e| Update::Config(kind, Box::new(e)),
            );
        }
        drop(tx);
        let mut state = State::default();
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 4096).await > 0 {
            let mut config_changed = false;
            for u in batch.drain(..) {
                config_changed |= state.apply(u, &sink);
            }
            if !state.synced() {
                continue;
            }
            if config_changed || !state.config_loaded {
                state.reload_config(&sink);
            }
            let next = state.inputs();
            sink.store.update(|i| *i = next);
            sink.ready.send_replace(true);
        }
    }
}

/// Runs a watcher for `api` with kube-runtime's backoff, sending its events.
fn watch<K>(
    set: &mut JoinSet<()>,
    api: Api<K>,
    tx: &mpsc::Sender<Update>,
    tag: impl Fn(Event<K>) -> Update + Send + 'static,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let tx = tx.clone();
    let what = api.resource_url().to_string();
    set.spawn(async move {
        let mut events =
            std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    if tx.send(tag(ev)).await.is_err() {
                        return;
                    }
                }
                Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                    tracing::info!(resource = %what, "watch expired (410 Gone); relisting");
                }
                Err(e) => tracing::warn!(resource = %what, error = %e, "watch failed; retrying"),
            }
        }
    });
}

/// A reflector's copy of one resource type: the objects by key, and during
/// a (re)list the objects listed so far.
struct Reflected<K, V> {
    items: BTreeMap<K, V>,
    listing: Option<BTreeMap<K, V>>,
    synced: bool,
}

impl<K, V> Default for Reflected<K, V> {
    fn default() -> Self {
        Reflected {
            items: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }
}

impl<K: Ord + Clone, V: Clone> Reflected<K, V> {
    /// Applies an event; `read` turns an object into its key and value
    /// (`None` for an object that is absent for the mesh) or an error.
    /// An object that cannot be read keeps its previous value.
    fn apply<T>(
        &mut self,
        ev: Event<T>,
        read: impl Fn(&T) -> (K, Result<Option<V>, String>),
        rejected: &mut dyn FnMut(String),
    ) {
        match ev {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(obj) => {
                let (k, v) = read(&obj);
                let previous = self.items.get(&k).cloned();
                let listing = self.listing.get_or_insert_with(BTreeMap::new);
                match v {
                    Ok(Some(v)) => {
                        listing.insert(k, v);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        rejected(e);
                        if let Some(p) = previous {
                            listing.insert(k, p);
                        }
                    }
                }
            }
            Event::InitDone => {
                // What the new list lacks was deleted while unwatched.
                self.items = self.listing.take().unwrap_or_default();
                self.synced = true;
            }
            Event::Apply(obj) => {
                let (k, v) = read(&obj);
                match v {
                    Ok(Some(v)) => {
                        self.items.insert(k, v);
                    }
                    Ok(None) => {
                        self.items.remove(&k);
                    }
                    Err(e) => rejected(e),
                }
            }
            Event::Delete(obj) => {
                let (k, _) = read(&obj);
                self.items.remove(&k);
            }
        }
    }
}

#[derive(Default)]
struct State {
    services: Reflected<ObjectKey, Arc<Service>>,
    pods: Reflected<ObjectKey, Arc<Workload>>,
    slices: Reflected<ObjectKey, Arc<Vec<Arc<Workload>>>>,
    config: BTreeMap<Kind, Reflected<(String, String), Document>>,
    /// The last valid config resources and WorkloadEntries.
    good: Inputs,
    config_loaded: bool,
}

impl State {
    /// Applies one update; says whether config objects changed.
    fn apply(&mut self, u: Update, sink: &Sink) -> bool {
        match u {
            Update::Service(ev) => {
                let ev = *ev;
                let mut rejected = |e: String| {
                    tracing::error!(source = "kubernetes", "rejected: {e}");
                    sink.metrics.rejected("Service");
                };
                self.services.apply(
                    ev,
                    |s| {
                        let key = object_key(&s.metadata);
                        let read = Service::from_k8s(s)
                            .map(|s| Some(Arc::new(s)))
                            .map_err(|e| format!("Service {key}: {e}"));
                        (key, read)
                    },
                    &mut rejected,
                );
                false
            }
            Update::Pod(ev) => {
                let ev = *ev;
                self.pods.apply(
                    ev,
                    |p| {
                        (
                            object_key(&p.metadata),
                            Ok(workload_of_pod(p).map(Arc::new)),
                        )
                    },
                    &mut |_| {},
                );
                false
            }
            Update::Slice(ev) => {
                let ev = *ev;
                self.slices.apply(
                    ev,
                    |s| {
                        let eps = endpoints_of_slice(s);
                        let v = (!eps.is_empty()).then(|| Arc::new(eps));
                        (object_key(&s.metadata), Ok(v))
                    },
                    &mut |_| {},
                );
                false
            }
            Update::Config(kind, ev) => {
                let ev = *ev;
                self.config.entry(kind).or_default().apply(
                    ev,
                    |o| {
                        let key = object_key(&o.metadata);
                        let doc = document(kind, o);
                        ((key.namespace, key.name), Ok(Some(doc)))
                    },
                    &mut |_| {},
                );
                true
            }
        }
    }

    /// Whether every watcher has listed at least once.
    fn synced(&self) -> bool {
        self.services.synced
            && self.pods.synced
            && self.slices.synced
            && CONFIG_KINDS
                .iter()
                .all(|k| self.config.get(k).is_some_and(|r| r.synced))
    }

    /// Validates every config object as one set; invalid ones keep their
    /// last valid version.
    fn reload_config(&mut self, sink: &Sink) {
        let docs: Vec<Document> = self
            .config
            .values()
            .flat_map(|r| r.items.values().cloned())
            .collect();
        let mut loaded = Loaded::default();
        load_config(docs, &mut loaded);
        report(&loaded, "kubernetes", &sink.metrics);
        self.good = merge_last_good(&self.good, loaded);
        self.config_loaded = true;
    }

    fn inputs(&self) -> Inputs {
        let mut workloads = self.good.workloads.clone();
        workloads.extend(self.pods.items.iter().map(|(k, w)| (k.clone(), w.clone())));
        for eps in self.slices.items.values() {
            for w in eps.iter() {
                workloads.insert(w.key.clone(), w.clone());
            }
        }
        Inputs {
            services: self.services.items.clone(),
            workloads,
            config: self.good.config.clone(),
        }
    }
}

fn object_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        m.namespace
            .clone()
            .unwrap_or_else(|| mesh_api::resource::DEFAULT_NAMESPACE.into()),
        m.name.clone().unwrap_or_default(),
    )
}

/// A config object as the document the analyzer reads. The API server may
/// leave out apiVersion and kind in lists; status and managedFields are not
/// the mesh's.
fn document(kind: Kind, obj: &DynamicObject) -> Document {
    let origin = Origin {
        file: ORIGIN.into(),
        line: 1,
    };
    let mut value = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => {
            return Document {
                item: Item::Invalid(LoadError {
                    file: origin.file.clone(),
                    line: 1,
                    column: 1,
                    message: e.to_string(),
                }),
                origin,
            };
        }
    };
    if let Some(o) = value.as_object_mut() {
        o.insert("apiVersion".into(), kind.api_version().into());
        o.insert("kind".into(), kind.name().into());
        o.remove("status");
        if let Some(m) = o.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.remove("managedFields");
        }
    }
    let text = value.to_string();
    mesh_api::load::parse_stream(ORIGIN, &text)
        .pop()
        .unwrap_or(Document {
            item: Item::Invalid(LoadError {
                file: ORIGIN.into(),
                line: 1,
                column: 1,
                message: format!("{} {}: empty object", kind, object_key(&obj.metadata)),
            }),
            origin,
        })
}

/// A pod as a workload: `None` until it has an address, and once it has
/// finished. It is an endpoint only while ready and not terminating.
pub fn workload_of_pod(pod: &core::Pod) -> Option<Workload> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let address: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let spec = pod.spec.as_ref()?;
    let ready = pod.metadata.deletion_timestamp.is_none()
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
        .collect();
    Some(Workload {
        key: object_key(&pod.metadata),
        address,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        ports,
        weight: 1,
        locality: None,
        ready,
    })
}

/// The endpoints of a slice that does not mirror pods: each address a
/// workload labelled with the slice's service, its ports named as the
/// service's.
pub fn endpoints_of_slice(slice: &EndpointSlice) -> Vec<Arc<Workload>> {
    let labels = slice.metadata.labels.as_ref();
    if labels.and_then(|l| l.get(MANAGED_BY)).map(String::as_str) == Some(SLICE_CONTROLLER) {
        return Vec::new();
    }
    let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Vec::new();
    };
    let key = object_key(&slice.metadata);
    let ports: BTreeMap<String, u16> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        for a in &ep.addresses {
            let Ok(address) = a.parse::<IpAddr>() else {
                // FQDN slices name hosts, not addresses.
                continue;
            };
            if !seen.insert(address) {
                continue;
            }
            out.push(Arc::new(Workload {
                key: ObjectKey::new(&key.namespace, format!("{}/{address}", key.name)),
                address,
                labels: [(SERVICE_NAME_LABEL.to_string(), service.clone())].into(),
                service_account: String::new(),
                ports: ports.clone(),
                weight: 1,
                locality: None,
                ready,
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_workloads_and_endpoints_only_when_ready() {
        let pod: core::Pod = serde_yaml::from_str(
            r#"
metadata: {name: reviews-v1-abc, namespace: shop, labels: {app: reviews, version: v1}}
spec:
  serviceAccountName: reviews
  containers: [{name: app, ports: [{name: http, containerPort: 9080}, {containerPort: 9090}]}]
status:
  phase: Running
  podIP: 10.1.0.4
  conditions: [{type: Ready, status: "False"}]
"#,
        )
        .unwrap();
        let w = workload_of_pod(&pod).unwrap();
        assert_eq!(w.key, ObjectKey::new("shop", "reviews-v1-abc"));
        assert_eq!(w.service_account, "reviews");
        assert_eq!(w.ports, [("http".to_string(), 9080)].into());
        assert!(!w.ready);
        let mut ready = pod.clone();
        ready.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "True".into();
        assert!(workload_of_pod(&ready).unwrap().ready);
        let mut done = ready.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(workload_of_pod(&done).is_none());
        let mut pending = ready;
        pending.status.as_mut().unwrap().pod_ip = None;
        assert!(workload_of_pod(&pending).is_none());
    }

    #[test]
    fn only_slices_not_mirroring_pods_give_endpoints() {
        let slice = |managed_by: &str| -> EndpointSlice {
            serde_yaml::from_str(&format!(
                r#"
metadata:
  name: db-x1
  namespace: shop
  labels: {{kubernetes.io/service-name: db, endpointslice.kubernetes.io/managed-by: {managed_by}}}
addressType: IPv4
ports: [{{name: sql, port: 5432}}]
endpoints:
- addresses: [10.9.0.1]
- addresses: [10.9.0.2]
  conditions: {{ready: false}}
"#
            ))
            .unwrap()
        };
        assert!(endpoints_of_slice(&slice(SLICE_CONTROLLER)).is_empty());
        let eps = endpoints_of_slice(&slice("endpointslicemirroring-controller.k8s.io"));
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].key, ObjectKey::new("shop", "db-x1/10.9.0.1"));
        assert_eq!(eps[0].ports, [("sql".to_string(), 5432)].into());
        assert!(eps[0].ready && !eps[1].ready);
        let svc: core::Service = serde_yaml::from_str(
            "metadata: {name: db, namespace: shop}\nspec: {ports: [{name: sql, port: 5432, targetPort: 15432}]}",
        )
        .unwrap();
        let svc = Service::from_k8s(&svc).unwrap();
        assert!(svc.selects(&eps[0]));
        // Without a selector the slice's port applies, not targetPort.
        assert_eq!(eps[0].target_port(&svc.ports[0]), Some(5432));
    }
}

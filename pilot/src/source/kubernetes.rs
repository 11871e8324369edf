//! The Kubernetes source: kube-runtime watchers over Services, Pods,
//! EndpointSlices, Namespaces and the mesh's CRDs, each folded into a
//! local copy of what the API server holds (a reflector), and the copies
//! turned into pilot's [`Inputs`].
//!
//! - A watch that expires (410 Gone) relists; objects missing from the new
//!   list are deleted. Errors back off and retry (kube-runtime's default).
//! - A mesh CRD that is not installed (its list answers 404) is a kind
//!   with no objects: a warning names it once, and its watcher keeps
//!   retrying, so a CRD installed later is picked up.
//! - Pods are the workloads: every running pod with an address gets its own
//!   config; only ready ones are endpoints. EndpointSlices matter only for
//!   services without a selector (slices the EndpointSlice controller
//!   manages mirror pods pilot already sees).
//! - Namespaces: objects of a namespace that is being deleted
//!   (Terminating) or that does not exist are left out; namespace labels
//!   are in [`Inputs::namespaces`]. The same copy feeds the CA's root
//!   distribution ([`Kubernetes::namespaces`]).
//! - Config objects are validated together, as the files source does: an
//!   invalid one is logged with the analyzer's message, counted once per
//!   distinct invalid content, and its last valid version keeps applying.
//! - Nothing reaches the store until every watcher has listed once, so
//!   proxies never see a half-read cluster. Then a batch of Service, Pod
//!   and EndpointSlice events edits only the objects it touched; a relist,
//!   a namespace or a config change writes the whole view.

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
use mesh_api::load::{Document, Item, LoadError, Origin};
use mesh_api::{Kind, ResourceKey};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::{
    Loaded, Rejected, Rejection, Rejections, Sink, Source, fingerprint, load_config,
    merge_last_good,
};
use crate::registry::{Inputs, Namespace, ObjectKey, SERVICE_NAME_LABEL, Service, Workload};

/// Watches the cluster `client` talks to.
pub struct Kubernetes {
    client: kube::Client,
    namespaces: watch::Sender<Namespaces>,
}

/// The cluster's namespaces as the source last saw them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Namespaces {
    /// Namespaces that exist and are not being deleted.
    pub live: BTreeMap<String, Arc<Namespace>>,
    /// Complete lists read so far (bumped by every relist).
    pub lists: u64,
}

impl Kubernetes {
    pub fn new(client: kube::Client) -> Kubernetes {
        Kubernetes {
            client,
            namespaces: watch::channel(Namespaces::default()).0,
        }
    }

    /// The namespaces this source watches, as they change; for the CA's
    /// root distribution, which shares this watch.
    pub fn namespaces(&self) -> watch::Receiver<Namespaces> {
        self.namespaces.subscribe()
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
    Namespace(Box<Event<core::Namespace>>),
    Config(Kind, Box<Event<DynamicObject>>),
}

impl Source for Kubernetes {
    async fn run(self, sink: Sink) {
        let (tx, mut rx) = mpsc::channel(1024);
        // Dropping the set (pilot stopping) stops the watchers.
        let mut watchers = JoinSet::new();
        let c = &self.client;
        watch(&mut watchers, Api::all(c.clone()), &tx, None, |e| {
            Update::Service(Box::new(e))
        });
        watch(&mut watchers, Api::all(c.clone()), &tx, None, |e| {
            Update::Pod(Box::new(e))
        });
        watch(&mut watchers, Api::all(c.clone()), &tx, None, |e| {
            Update::Slice(Box::new(e))
        });
        watch(&mut watchers, Api::all(c.clone()), &tx, None, |e| {
            Update::Namespace(Box::new(e))
        });
        for kind in CONFIG_KINDS {
            let ar = kind.api_resource();
            let crd = format!("{}.{}", kind.plural(), kind.group());
            watch(
                &mut watchers,
                Api::<DynamicObject>::all_with(c.clone(), &ar),
                &tx,
                Some(crd),
                move |e| Update::Config(kind, Box::new(e)),
            );
        }
        drop(tx);
        let mut state = State::default();
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 4096).await > 0 {
            let mut config_changed = false;
            let mut namespaces_changed = false;
            for u in batch.drain(..) {
                match u {
                    Update::Config(..) => config_changed = true,
                    Update::Namespace(_) => namespaces_changed = true,
                    _ => {}
                }
                state.apply(u);
            }
            if namespaces_changed && state.namespaces.synced {
                let view = state.namespace_view();
                self.namespaces.send_if_modified(|n| {
                    let changed = *n != view;
                    *n = view;
                    changed
                });
            }
            if !state.synced() {
                continue;
            }
            if config_changed || namespaces_changed || !state.config_loaded {
                state.reload_config();
                state.dirty.full = true;
            }
            state.report(&sink);
            state.publish(&sink);
            sink.ready.send_replace(true);
        }
    }
}

/// Runs a watcher for `api` with kube-runtime's backoff, sending its
/// events. For a CRD (`crd` names it), a list answered 404 means the CRD
/// is not installed: an empty list is sent instead, and the watcher keeps
/// retrying so that a CRD installed later is picked up.
fn watch<K>(
    set: &mut JoinSet<()>,
    api: Api<K>,
    tx: &mpsc::Sender<Update>,
    crd: Option<String>,
    tag: impl Fn(Event<K>) -> Update + Send + 'static,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let tx = tx.clone();
    let what = api.resource_url().to_string();
    set.spawn(async move {
        let mut events =
            std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
        // Whether the CRD was found missing (and said so) since it last
        // listed.
        let mut absent = false;
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    if absent && matches!(ev, Event::InitDone) {
                        absent = false;
                        tracing::info!(
                            crd = crd.as_deref().unwrap_or_default(),
                            "CRD installed; its objects apply"
                        );
                    }
                    if tx.send(tag(ev)).await.is_err() {
                        return;
                    }
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
                    if s.is_not_found() && crd.is_some() =>
                {
                    if !absent {
                        absent = true;
                        tracing::warn!(
                            crd = crd.as_deref().unwrap_or_default(),
                            "CRD not installed (404): no objects of this kind until it is"
                        );
                        // Listed: there are none.
                        for ev in [Event::Init, Event::InitDone] {
                            if tx.send(tag(ev)).await.is_err() {
                                return;
                            }
                        }
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

/// A reflector's copy of one resource type: the objects by key, during a
/// (re)list the objects listed so far, and the objects whose current
/// version was rejected (their previous value stays in `items`).
struct Reflected<K, V> {
    items: BTreeMap<K, V>,
    listing: Option<(BTreeMap<K, V>, BTreeMap<K, Rejection>)>,
    rejected: BTreeMap<K, Rejection>,
    synced: bool,
    /// Complete lists so far.
    lists: u64,
}

impl<K, V> Default for Reflected<K, V> {
    fn default() -> Self {
        Reflected {
            items: BTreeMap::new(),
            listing: None,
            rejected: BTreeMap::new(),
            synced: false,
            lists: 0,
        }
    }
}

/// How an object reads: its value, absent for the mesh (`None`), or
/// rejected.
type Read<V> = Result<Option<V>, Rejection>;

impl<K: Ord + Clone, V: Clone> Reflected<K, V> {
    /// Applies an event; `read` turns an object into its key and value.
    /// An object that is rejected keeps its previous value.
    fn apply<T>(&mut self, ev: Event<T>, read: impl Fn(&T) -> (K, Read<V>)) {
        match ev {
            Event::Init => self.listing = Some(Default::default()),
            Event::InitApply(obj) => {
                let (k, v) = read(&obj);
                let previous = self.items.get(&k).cloned();
                let (listing, rejected) = self.listing.get_or_insert_with(Default::default);
                match v {
                    Ok(Some(v)) => {
                        listing.insert(k, v);
                    }
                    Ok(None) => {}
                    Err(r) => {
                        if let Some(p) = previous {
                            listing.insert(k.clone(), p);
                        }
                        rejected.insert(k, r);
                    }
                }
            }
            Event::InitDone => {
                // What the new list lacks was deleted while unwatched.
                let (items, rejected) = self.listing.take().unwrap_or_default();
                self.items = items;
                self.rejected = rejected;
                self.synced = true;
                self.lists += 1;
            }
            Event::Apply(obj) => {
                let (k, v) = read(&obj);
                match v {
                    Ok(Some(v)) => {
                        self.rejected.remove(&k);
                        self.items.insert(k, v);
                    }
                    Ok(None) => {
                        self.rejected.remove(&k);
                        self.items.remove(&k);
                    }
                    Err(r) => {
                        self.rejected.insert(k, r);
                    }
                }
            }
            Event::Delete(obj) => {
                let (k, _) = read(&obj);
                self.rejected.remove(&k);
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
    /// Every namespace, with whether it is being deleted.
    namespaces: Reflected<String, (Arc<Namespace>, bool)>,
    config: BTreeMap<Kind, Reflected<(String, String), Document>>,
    /// The last valid config resources and WorkloadEntries.
    good: Inputs,
    /// What the last validation of the config rejected.
    config_rejected: Vec<Rejection>,
    rejections: Rejections,
    config_loaded: bool,
    /// What changed since the store was last written.
    dirty: Dirty,
    /// Whether the store has had a whole view.
    published: bool,
}

/// Objects touched since the store was last written, or `full` when the
/// whole view must be compared.
#[derive(Default)]
struct Dirty {
    services: BTreeSet<ObjectKey>,
    workloads: BTreeSet<ObjectKey>,
    full: bool,
}

impl State {
    /// Applies one update, noting what it touched.
    fn apply(&mut self, u: Update) {
        match &u {
            Update::Service(ev) => match &**ev {
                Event::Apply(o) | Event::Delete(o) => {
                    self.dirty.services.insert(object_key(&o.metadata));
                }
                _ => self.dirty.full = true,
            },
            Update::Pod(ev) => match &**ev {
                Event::Apply(o) | Event::Delete(o) => {
                    self.dirty.workloads.insert(object_key(&o.metadata));
                }
                _ => self.dirty.full = true,
            },
            Update::Slice(ev) => match &**ev {
                Event::Apply(o) | Event::Delete(o) => {
                    // The endpoints it had and those it will have.
                    let key = object_key(&o.metadata);
                    let before = self.slices.items.get(&key).cloned();
                    self.dirty.workloads.extend(
                        before
                            .iter()
                            .flat_map(|eps| eps.iter())
                            .chain(endpoints_of_slice(o).iter())
                            .map(|w| w.key.clone()),
                    );
                }
                _ => self.dirty.full = true,
            },
            Update::Namespace(_) | Update::Config(..) => self.dirty.full = true,
        }
        match u {
            Update::Service(ev) => self.services.apply(*ev, |s| {
                let key = object_key(&s.metadata);
                let read = Service::from_k8s(s)
                    .map(|s| Some(Arc::new(s)))
                    .map_err(|e| Rejection {
                        object: Rejected::Service(key.clone()),
                        fingerprint: fingerprint(
                            &serde_json::to_string(&s.spec).unwrap_or_default(),
                        ),
                        message: format!("{ORIGIN}: error: Service {key}: {e}"),
                    });
                (key, read)
            }),
            Update::Pod(ev) => self.pods.apply(*ev, |p| {
                (
                    object_key(&p.metadata),
                    Ok(workload_of_pod(p).map(Arc::new)),
                )
            }),
            Update::Slice(ev) => self.slices.apply(*ev, |s| {
                let eps = endpoints_of_slice(s);
                let v = (!eps.is_empty()).then(|| Arc::new(eps));
                (object_key(&s.metadata), Ok(v))
            }),
            Update::Namespace(ev) => self.namespaces.apply(*ev, |n| {
                let name = n.metadata.name.clone().unwrap_or_default();
                let terminating = n.metadata.deletion_timestamp.is_some()
                    || n.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
                let ns = Namespace {
                    name: name.clone(),
                    labels: n.metadata.labels.clone().unwrap_or_default(),
                };
                (name, Ok(Some((Arc::new(ns), terminating))))
            }),
            Update::Config(kind, ev) => self.config.entry(kind).or_default().apply(*ev, |o| {
                let key = object_key(&o.metadata);
                let doc = document(kind, o);
                let read = match &doc.item {
                    Item::Invalid(e) => Err(Rejection {
                        object: Rejected::Config(ResourceKey {
                            kind,
                            namespace: key.namespace.clone(),
                            name: key.name.clone(),
                        }),
                        fingerprint: fingerprint(&o.data.to_string()),
                        message: format!("{ORIGIN}: error: {kind} {key}: {}", e.message),
                    }),
                    _ => Ok(Some(doc)),
                };
                ((key.namespace, key.name), read)
            }),
        }
    }

    /// Whether every watcher has listed at least once (a CRD that is not
    /// installed lists as empty).
    fn synced(&self) -> bool {
        self.services.synced
            && self.pods.synced
            && self.slices.synced
            && self.namespaces.synced
            && CONFIG_KINDS
                .iter()
                .all(|k| self.config.get(k).is_some_and(|r| r.synced))
    }

    /// Whether objects of `namespace` count: it exists and is not being
    /// deleted.
    fn live(&self, namespace: &str) -> bool {
        self.namespaces
            .items
            .get(namespace)
            .is_some_and(|(_, terminating)| !terminating)
    }

    fn namespace_view(&self) -> Namespaces {
        Namespaces {
            live: self
                .namespaces
                .items
                .values()
                .filter(|(_, terminating)| !terminating)
                .map(|(n, _)| (n.name.clone(), n.clone()))
                .collect(),
            lists: self.namespaces.lists,
        }
    }

    /// Validates every config object of a live namespace as one set;
    /// invalid ones keep their last valid version.
    fn reload_config(&mut self) {
        let docs: Vec<Document> = self
            .config
            .values()
            .flat_map(|r| r.items.iter())
            .filter(|((ns, _), _)| self.live(ns))
            .map(|(_, d)| d.clone())
            .collect();
        let mut loaded = Loaded::default();
        load_config(docs, &mut loaded);
        self.config_rejected = loaded.rejected.clone();
        self.good = merge_last_good(&self.good, loaded);
        self.config_loaded = true;
    }

    /// Logs and counts what is rejected now.
    fn report(&mut self, sink: &Sink) {
        let mut now: Vec<Rejection> = self.services.rejected.values().cloned().collect();
        for r in self.config.values() {
            now.extend(r.rejected.values().cloned());
        }
        now.extend(self.config_rejected.iter().cloned());
        self.rejections.observe(&now, "kubernetes", &sink.metrics);
    }

    /// Writes what changed to the store: after a relist, a namespace or
    /// config change, the whole view (compared with the store's); else
    /// only the objects the batch touched, edited in place.
    fn publish(&mut self, sink: &Sink) {
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.full || !self.published {
            sink.store.replace(self.inputs());
            self.published = true;
            return;
        }
        if dirty.services.is_empty() && dirty.workloads.is_empty() {
            return;
        }
        sink.store.edit(|e| {
            for k in &dirty.services {
                match self
                    .services
                    .items
                    .get(k)
                    .filter(|_| self.live(&k.namespace))
                {
                    Some(s) => e.put_service(s.clone()),
                    None => e.remove_service(k),
                }
            }
            for k in &dirty.workloads {
                match self.workload(k) {
                    Some(w) => e.put_workload(w),
                    None => e.remove_workload(k),
                }
            }
        });
    }

    /// The workload under `key`, as [`State::inputs`] has it.
    fn workload(&self, key: &ObjectKey) -> Option<Arc<Workload>> {
        if !self.live(&key.namespace) {
            return None;
        }
        // An endpoint of a slice is `slice/address` (object names have no
        // `/`).
        if let Some((slice, _)) = key.name.split_once('/') {
            let eps = self
                .slices
                .items
                .get(&ObjectKey::new(&key.namespace, slice))?;
            return eps.iter().find(|w| w.key == *key).cloned();
        }
        self.pods
            .items
            .get(key)
            .or_else(|| self.good.workloads.get(key))
            .cloned()
    }

    fn inputs(&self) -> Inputs {
        let live = |k: &ObjectKey| self.live(&k.namespace);
        let mut workloads = self.good.workloads.clone();
        workloads.extend(self.pods.items.iter().map(|(k, w)| (k.clone(), w.clone())));
        for eps in self.slices.items.values() {
            for w in eps.iter() {
                workloads.insert(w.key.clone(), w.clone());
            }
        }
        workloads.retain(|k, _| live(k));
        let mut services = self.services.items.clone();
        services.retain(|k, _| live(k));
        let mut config = self.good.config.clone();
        config.retain(|k, _| self.live(&k.namespace));
        Inputs {
            services,
            workloads,
            config,
            namespaces: self.namespace_view().live,
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

    fn obj<T: DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn pod(name: &str, ip: &str, ready: bool) -> core::Pod {
        obj(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "reviews"}},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
    }

    fn svc(name: &str, selector: bool) -> core::Service {
        let mut spec = serde_json::json!({"ports": [{"name": "http", "port": 9080}]});
        if selector {
            spec["selector"] = serde_json::json!({"app": name});
        }
        obj(serde_json::json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec}))
    }

    fn slice(ips: &[&str]) -> EndpointSlice {
        obj(serde_json::json!({
            "metadata": {"name": "db-m1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9080}],
            "endpoints": ips.iter().map(|ip| serde_json::json!({"addresses": [ip]})).collect::<Vec<_>>(),
        }))
    }

    /// A complete list of `items`, as a watcher delivers it.
    fn list<T>(items: Vec<T>, tag: impl Fn(Event<T>) -> Update) -> Vec<Update> {
        let mut out = vec![tag(Event::Init)];
        out.extend(items.into_iter().map(|i| tag(Event::InitApply(i))));
        out.push(tag(Event::InitDone));
        out
    }

    #[test]
    fn edits_after_events_end_where_the_whole_view_does() {
        let sink = Sink {
            store: Arc::new(crate::store::Store::new(
                Default::default(),
                Default::default(),
                crate::metrics::Metrics::new(),
            )),
            metrics: crate::metrics::Metrics::new(),
            ready: watch::channel(false).0,
        };
        let mut state = State::default();
        let shop: core::Namespace = obj(serde_json::json!({"metadata": {"name": "shop"}}));
        let mut first = Vec::new();
        first.extend(list(vec![shop], |e| Update::Namespace(Box::new(e))));
        first.extend(list(vec![svc("reviews", true), svc("db", false)], |e| {
            Update::Service(Box::new(e))
        }));
        first.extend(list(
            vec![pod("r1", "10.1.0.1", true), pod("r2", "10.1.0.2", true)],
            |e| Update::Pod(Box::new(e)),
        ));
        first.extend(list(vec![slice(&["10.9.0.1", "10.9.0.2"])], |e| {
            Update::Slice(Box::new(e))
        }));
        for kind in CONFIG_KINDS {
            first.extend(list(vec![], move |e| Update::Config(kind, Box::new(e))));
        }
        for u in first {
            state.apply(u);
        }
        assert!(state.synced());
        state.reload_config();
        state.publish(&sink);
        assert!(state.published);

        // Single-object events: edited in place, not a whole view.
        let events = vec![
            Update::Pod(Box::new(Event::Apply(pod("r3", "10.1.0.3", true)))),
            Update::Pod(Box::new(Event::Apply(pod("r2", "10.1.0.2", false)))),
            Update::Pod(Box::new(Event::Delete(pod("r1", "10.1.0.1", true)))),
            Update::Slice(Box::new(Event::Apply(slice(&["10.9.0.2", "10.9.0.3"])))),
            Update::Service(Box::new(Event::Apply(svc("details", true)))),
            Update::Service(Box::new(Event::Delete(svc("reviews", true)))),
        ];
        for u in events {
            state.apply(u);
        }
        assert!(!state.dirty.full);
        state.publish(&sink);
        let edited = sink.store.inputs();
        let whole = state.inputs();
        assert_eq!(edited.services, whole.services);
        assert_eq!(edited.workloads, whole.workloads);
        let mut workloads: Vec<String> = edited.workloads.keys().map(|k| k.to_string()).collect();
        workloads.sort();
        assert_eq!(
            workloads,
            [
                "shop/db-m1/10.9.0.2",
                "shop/db-m1/10.9.0.3",
                "shop/r2",
                "shop/r3"
            ]
        );
        let services: Vec<String> = edited.services.keys().map(|k| k.to_string()).collect();
        assert_eq!(services, ["shop/db", "shop/details"]);
    }

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

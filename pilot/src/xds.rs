//! The Delta xDS server: one stream per proxy. The proxy says who it is,
//! subscribes to its workload resource and, on demand, to destinations;
//! pilot sends what changed of what it subscribed to (and the clusters
//! those route to), with versions and nonces, and records what each proxy
//! acknowledged or rejected.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use mesh_api::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_api::discovery::{
    self as wire, CLUSTER, DESTINATION, DeltaDiscoveryRequest, DeltaDiscoveryResponse, WORKLOAD,
};
use mesh_api::sync::{ProxyStatus, SyncState};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::compile::NodeInfo;
use crate::metrics::Metrics;
use crate::store::{Built, Store};

/// What pilot knows of each connected proxy, for `/debug/syncz` and
/// `meshctl proxy-status`.
#[derive(Default)]
pub struct SyncRegistry {
    conns: Mutex<BTreeMap<u64, Arc<Mutex<ProxyStatus>>>>,
}

impl SyncRegistry {
    pub fn snapshot(&self) -> Vec<ProxyStatus> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .values()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

/// Where to read a proxy's metrics: the port it said, at the address its
/// xDS connection comes from, so a proxy cannot point pilot at anyone
/// else. (A proxy on loopback names its loopback address.)
fn metrics_addr(said: &str, remote: Option<std::net::SocketAddr>) -> String {
    let (Ok(addr), Some(remote)) = (said.parse::<std::net::SocketAddr>(), remote) else {
        return String::new();
    };
    std::net::SocketAddr::new(remote.ip(), addr.port()).to_string()
}

/// The gRPC service.
pub struct Xds {
    store: Arc<Store>,
    metrics: Metrics,
    sync: Arc<SyncRegistry>,
    next_id: AtomicU64,
}

impl Xds {
    pub fn new(
        store: Arc<Store>,
        metrics: Metrics,
        sync: Arc<SyncRegistry>,
    ) -> AggregatedDiscoveryServiceServer<Xds> {
        AggregatedDiscoveryServiceServer::new(Xds {
            store,
            metrics,
            sync,
            next_id: AtomicU64::new(1),
        })
        .max_decoding_message_size(4 << 20)
    }
}

type Out = Result<DeltaDiscoveryResponse, Status>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Xds {
    type DeltaAggregatedResourcesStream = ReceiverStream<Out>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let remote = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Status::cancelled("stream closed before the first request")),
            Err(e) => return Err(e),
        };
        let Some(node) = first.node.clone() else {
            return Err(Status::invalid_argument(
                "the first request must carry node (who the proxy is)",
            ));
        };
        if node.workload.is_empty() || node.namespace.is_empty() {
            return Err(Status::invalid_argument(
                "node.workload and node.namespace are required",
            ));
        }
        let (tx, rx) = mpsc::channel(32);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let status = Arc::new(Mutex::new(ProxyStatus {
            proxy: if node.id.is_empty() {
                format!("{}.{}", node.workload, node.namespace)
            } else {
                node.id.clone()
            },
            workload: format!("{}/{}", node.namespace, node.workload),
            mode: node.mode.clone(),
            proxy_version: node.version.clone(),
            connected_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            state: SyncState::Stale,
            metrics_addr: metrics_addr(&node.metrics_addr, remote),
            ..Default::default()
        }));
        self.sync
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, status.clone());
        let info = NodeInfo {
            workload: node.workload.clone(),
            namespace: node.namespace.clone(),
            labels: node.labels.clone().into_iter().collect(),
            service_account: node.service_account.clone(),
            gateway: node.mode == "gateway",
            gateways: node.gateways.clone(),
        };
        let mut conn = Conn {
            id,
            node: info,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            status,
            subs: [BTreeSet::new(), BTreeSet::new()],
            sent: Default::default(),
            inflight: HashMap::new(),
            seq: 0,
        };
        let sync = self.sync.clone();
        tokio::spawn(async move {
            conn.store.attach(&conn.node);
            conn.metrics.connected().increment(1.0);
            tracing::info!(proxy = %conn.status().proxy, "proxy connected");
            conn.run(first, &mut inbound, &tx).await;
            tracing::info!(proxy = %conn.status().proxy, "proxy disconnected");
            conn.metrics.connected().decrement(1.0);
            conn.store.detach(&conn.node);
            sync.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&conn.id);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

const W: usize = 0;
const D: usize = 1;
const C: usize = 2;
const TYPE_URLS: [&str; 3] = [WORKLOAD, DESTINATION, CLUSTER];
const SHORT: [&str; 3] = ["Workload", "Destination", "Cluster"];

fn type_index(url: &str) -> Option<usize> {
    TYPE_URLS.iter().position(|t| *t == url)
}

/// A response awaiting its ACK: its type and the (name, version) pairs.
type Inflight = (usize, Vec<(String, Arc<str>)>);

/// Responses a proxy may leave unanswered before pilot forgets the oldest
/// (their resources then show as STALE).
const MAX_INFLIGHT: usize = 1024;

struct Conn {
    id: u64,
    node: NodeInfo,
    store: Arc<Store>,
    metrics: Metrics,
    status: Arc<Mutex<ProxyStatus>>,
    /// Subscribed Workload and Destination names.
    subs: [BTreeSet<String>; 2],
    /// Per type: name → version sent (empty: sent as removed).
    sent: [HashMap<String, Arc<str>>; 3],
    /// Nonce → (type, resources it carried).
    inflight: HashMap<String, Inflight>,
    seq: u64,
}

impl Conn {
    fn status(&self) -> std::sync::MutexGuard<'_, ProxyStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(
        &mut self,
        first: DeltaDiscoveryRequest,
        inbound: &mut Streaming<DeltaDiscoveryRequest>,
        tx: &mpsc::Sender<Out>,
    ) {
        let mut generation = self.store.subscribe();
        generation.borrow_and_update();
        self.handle(first);
        if self.push(tx, false).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if self.handle(req) && self.push(tx, false).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "xds stream error");
                        return;
                    }
                },
                changed = generation.changed() => {
                    if changed.is_err() || self.push(tx, true).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Applies a request; true when subscriptions changed.
    fn handle(&mut self, req: DeltaDiscoveryRequest) -> bool {
        let Some(ty) = type_index(&req.type_url) else {
            tracing::warn!(type_url = %req.type_url, "request for an unknown type");
            return false;
        };
        if !req.response_nonce.is_empty()
            && let Some((rty, carried)) = self.inflight.remove(&req.response_nonce)
        {
            let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
            let nack = req.error_detail.as_ref().map(|e| e.message.clone());
            if let Some(err) = &nack {
                self.metrics.nack(SHORT[rty]);
                tracing::warn!(proxy = %st.proxy, r#type = SHORT[rty], error = %err, "proxy rejected config");
            }
            for (name, version) in carried {
                let e = st
                    .resources
                    .entry(format!("{}/{name}", SHORT[rty]))
                    .or_default();
                // A late answer about an older version changes nothing.
                if e.sent != *version {
                    continue;
                }
                match &nack {
                    Some(err) => e.nack = Some(err.clone()),
                    None => {
                        e.acked = Some(version.to_string());
                        e.nack = None;
                    }
                }
            }
            st.refresh_state();
        }
        for (name, version) in req.initial_resource_versions {
            // The proxy already has these (a reconnect): no need to resend
            // unless they changed.
            self.sent[ty].insert(name.clone(), version.clone().into());
            let mut st = self.status();
            let e = st
                .resources
                .entry(format!("{}/{name}", SHORT[ty]))
                .or_default();
            e.sent = version.clone();
            e.acked = Some(version);
        }
        if ty == C {
            return false;
        }
        let mut changed = false;
        for name in req.resource_names_subscribe {
            changed |= self.subs[ty].insert(name);
        }
        for name in req.resource_names_unsubscribe {
            if self.subs[ty].remove(&name) {
                changed = true;
                self.sent[ty].remove(&name);
                self.status()
                    .resources
                    .remove(&format!("{}/{name}", SHORT[ty]));
            }
        }
        if changed && ty == D {
            self.status().subscriptions = self.subs[D].iter().cloned().collect();
        }
        changed
    }

    /// Sends what differs between the compiled state and what this proxy
    /// was sent: clusters first (so routes never point at unknown ones),
    /// then its workload and destinations, then cluster removals.
    async fn push(&mut self, tx: &mpsc::Sender<Out>, on_change: bool) -> Result<(), ()> {
        let (responses, changed_at) = {
            let c = self.store.read();
            let mut updates: [Vec<(String, Arc<Built>)>; 3] = Default::default();
            let mut removed: [Vec<String>; 3] = Default::default();
            let mut want_clusters: BTreeSet<Arc<str>> = BTreeSet::new();
            for name in &self.subs[W] {
                if let Some(b) = c.workloads.get(&self.node) {
                    want_clusters.extend(b.refs.iter().cloned());
                    if self.sent[W].get(name) != Some(&b.version) {
                        updates[W].push((name.clone(), b.clone()));
                    }
                }
            }
            for name in &self.subs[D] {
                match c
                    .resolve(name, &self.node.namespace)
                    .and_then(|k| c.destinations.get(k))
                {
                    Some(b) => {
                        want_clusters.extend(b.refs.iter().cloned());
                        if self.sent[D].get(name) != Some(&b.version) {
                            updates[D].push((name.clone(), b.clone()));
                        }
                    }
                    None => {
                        if self.sent[D].get(name).is_none_or(|v| !v.is_empty()) {
                            removed[D].push(name.clone());
                        }
                    }
                }
            }
            for name in &want_clusters {
                if let Some(b) = c.clusters.get(&**name)
                    && self.sent[C].get(&**name) != Some(&b.version)
                {
                    updates[C].push((name.to_string(), b.clone()));
                }
            }
            for name in self.sent[C].keys() {
                if !want_clusters.contains(name.as_str()) {
                    removed[C].push(name.clone());
                }
            }
            let mut out = Vec::new();
            if !updates[C].is_empty() {
                out.push((C, std::mem::take(&mut updates[C]), Vec::new()));
            }
            for ty in [W, D] {
                if !updates[ty].is_empty() || !removed[ty].is_empty() {
                    out.push((
                        ty,
                        std::mem::take(&mut updates[ty]),
                        std::mem::take(&mut removed[ty]),
                    ));
                }
            }
            if !removed[C].is_empty() {
                out.push((C, Vec::new(), std::mem::take(&mut removed[C])));
            }
            (out, c.changed_at)
        };
        if responses.is_empty() {
            return Ok(());
        }
        for (ty, updates, removed) in responses {
            self.seq += 1;
            let nonce = format!("{}-{}", self.id, self.seq);
            let mut carried = Vec::with_capacity(updates.len());
            let mut resources = Vec::with_capacity(updates.len());
            {
                let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
                for (name, b) in updates {
                    self.sent[ty].insert(name.clone(), b.version.clone());
                    let e = st
                        .resources
                        .entry(format!("{}/{name}", SHORT[ty]))
                        .or_default();
                    e.sent = b.version.to_string();
                    resources.push(wire::Resource {
                        name: name.clone(),
                        version: b.version.to_string(),
                        body: b.body.clone(),
                    });
                    carried.push((name, b.version.clone()));
                }
                for name in &removed {
                    if ty == D {
                        self.sent[ty].insert(name.clone(), "".into());
                        let e = st
                            .resources
                            .entry(format!("{}/{name}", SHORT[ty]))
                            .or_default();
                        e.sent = String::new();
                        carried.push((name.clone(), "".into()));
                    } else {
                        self.sent[ty].remove(name);
                        st.resources.remove(&format!("{}/{name}", SHORT[ty]));
                    }
                }
                st.refresh_state();
            }
            if self.inflight.len() >= MAX_INFLIGHT {
                self.inflight.clear();
            }
            self.inflight.insert(nonce.clone(), (ty, carried));
            let resp = DeltaDiscoveryResponse {
                system_version_info: String::new(),
                resources,
                type_url: TYPE_URLS[ty].to_string(),
                removed_resources: removed,
                nonce,
            };
            tx.send(Ok(resp)).await.map_err(|_| ())?;
            self.metrics.pushed(SHORT[ty]);
        }
        if on_change && let Some(t) = changed_at {
            self.metrics
                .push_latency(Instant::now().saturating_duration_since(t));
        }
        Ok(())
    }
}

//! The Delta xDS server: one stream per proxy. The proxy says who it is,
//! subscribes to its workload resource and, on demand, to destinations;
//! pilot sends what changed of what it subscribed to (and the clusters
//! those route to), with versions and nonces, and records what each proxy
//! acknowledged or rejected.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::compile::NodeInfo;
use crate::metrics::Metrics;
use crate::store::{Built, Changed, Store};

/// What pilot knows of each connected proxy, for `/debug/syncz` and
/// `meshctl proxy-status`.
pub struct SyncRegistry {
    conns: Mutex<BTreeMap<u64, Arc<Mutex<ProxyStatus>>>>,
    /// Resources acknowledged so far, per type (Workload, Destination,
    /// Cluster).
    acknowledged: watch::Sender<[u64; 3]>,
    /// Which connections use which resources.
    index: Mutex<Index>,
    /// Connection ids, unique across every xDS server of this pilot (the
    /// plaintext and the TLS port share this registry).
    next_id: AtomicU64,
}

impl Default for SyncRegistry {
    fn default() -> Self {
        SyncRegistry {
            conns: Default::default(),
            acknowledged: watch::channel([0; 3]).0,
            index: Default::default(),
            next_id: AtomicU64::new(1),
        }
    }
}

/// What one connection's proxy uses: the destinations its subscriptions
/// resolve to, the clusters they route to, its workload resource.
#[derive(Clone, Debug, Default, PartialEq)]
struct Interests {
    destinations: BTreeSet<String>,
    clusters: BTreeSet<Arc<str>>,
    node: Option<NodeInfo>,
    /// It subscribed to destinations by name: a name may resolve
    /// differently when destinations come or go.
    resolving: bool,
}

/// The reverse index: resource → the connections that use it, so a
/// recompute wakes only the connections it concerns.
#[derive(Default)]
struct Index {
    wake: HashMap<u64, Arc<Notify>>,
    destinations: HashMap<String, HashSet<u64>>,
    clusters: HashMap<Arc<str>, HashSet<u64>>,
    nodes: HashMap<NodeInfo, HashSet<u64>>,
    resolving: HashSet<u64>,
}

fn index_set<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, HashSet<u64>>,
    old: impl Iterator<Item = K>,
    new: impl Iterator<Item = K>,
    id: u64,
) {
    for k in old {
        if let Some(ids) = map.get_mut(&k) {
            ids.remove(&id);
            if ids.is_empty() {
                map.remove(&k);
            }
        }
    }
    for k in new {
        map.entry(k).or_default().insert(id);
    }
}

impl Index {
    /// Replaces what connection `id` uses.
    fn set(&mut self, id: u64, old: &Interests, new: &Interests) {
        index_set(
            &mut self.destinations,
            old.destinations.difference(&new.destinations).cloned(),
            new.destinations.difference(&old.destinations).cloned(),
            id,
        );
        index_set(
            &mut self.clusters,
            old.clusters.difference(&new.clusters).cloned(),
            new.clusters.difference(&old.clusters).cloned(),
            id,
        );
        if old.node != new.node {
            index_set(
                &mut self.nodes,
                old.node.iter().cloned(),
                new.node.iter().cloned(),
                id,
            );
        }
        if new.resolving {
            self.resolving.insert(id);
        } else {
            self.resolving.remove(&id);
        }
    }

    /// Wakes the connections that use what changed.
    fn wake(&self, changes: &[Arc<Changed>]) {
        let mut ids: HashSet<u64> = HashSet::new();
        for c in changes {
            for k in &c.destinations {
                ids.extend(self.destinations.get(k).into_iter().flatten());
            }
            for k in &c.clusters {
                ids.extend(self.clusters.get(k.as_str()).into_iter().flatten());
            }
            for n in &c.workloads {
                ids.extend(self.nodes.get(n).into_iter().flatten());
            }
            if c.names {
                ids.extend(&self.resolving);
            }
        }
        for id in ids {
            if let Some(w) = self.wake.get(&id) {
                w.notify_one();
            }
        }
    }

    fn wake_all(&self) {
        for w in self.wake.values() {
            w.notify_one();
        }
    }
}

/// Wakes the connections each recompute concerns, for as long as the
/// store publishes: a push reaches only a changed resource's users, not
/// every connection. Runs once per pilot, for every xDS server it has.
pub async fn dispatch(store: Arc<Store>, sync: Arc<SyncRegistry>) {
    let mut generation = store.subscribe();
    let mut seen = *generation.borrow_and_update();
    while generation.changed().await.is_ok() {
        let now = *generation.borrow_and_update();
        let index = sync.index.lock().unwrap_or_else(|e| e.into_inner());
        match store.changes_since(seen) {
            Some((changes, latest)) => {
                index.wake(&changes);
                seen = latest;
            }
            None => {
                index.wake_all();
                seen = now;
            }
        }
    }
}

impl SyncRegistry {
    /// Resources acknowledged so far by every proxy, per type (Workload,
    /// Destination, Cluster): a proxy's ACK is counted once pilot has
    /// recorded it.
    pub fn acknowledged(&self) -> watch::Receiver<[u64; 3]> {
        self.acknowledged.subscribe()
    }

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
    /// On the TLS port: the trust domain whose workload certificate a proxy
    /// must present, naming the namespace and service account it claims.
    identity: Option<String>,
}

impl Xds {
    pub fn new(
        store: Arc<Store>,
        metrics: Metrics,
        sync: Arc<SyncRegistry>,
    ) -> AggregatedDiscoveryServiceServer<Xds> {
        Self::serve(store, metrics, sync, None)
    }

    /// The service on the TLS port: a proxy is served only the config of
    /// the identity its certificate proves.
    pub fn with_identity(
        store: Arc<Store>,
        metrics: Metrics,
        sync: Arc<SyncRegistry>,
        trust_domain: &str,
    ) -> AggregatedDiscoveryServiceServer<Xds> {
        Self::serve(store, metrics, sync, Some(trust_domain.to_string()))
    }

    fn serve(
        store: Arc<Store>,
        metrics: Metrics,
        sync: Arc<SyncRegistry>,
        identity: Option<String>,
    ) -> AggregatedDiscoveryServiceServer<Xds> {
        AggregatedDiscoveryServiceServer::new(Xds {
            store,
            metrics,
            sync,
            identity,
        })
        .max_decoding_message_size(4 << 20)
    }
}

/// The SPIFFE ID (`spiffe://…` URI SAN) of a DER certificate.
fn spiffe_id_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some((*u).to_string())
        }
        _ => None,
    })
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
        // The chain was verified against the mesh roots by the TLS layer.
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|leaf| spiffe_id_of(leaf)));
        if self.identity.is_some() && peer.is_none() {
            return Err(Status::unauthenticated(
                "xDS on the TLS port needs the workload's mesh certificate",
            ));
        }
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
        if let (Some(td), Some(peer)) = (&self.identity, &peer) {
            let claimed = mesh_api::ca::spiffe_id(td, &node.namespace, &node.service_account);
            if *peer != claimed {
                return Err(Status::permission_denied(format!(
                    "the certificate is {peer}, the node claims {claimed}"
                )));
            }
        }
        let (tx, rx) = mpsc::channel(32);
        let id = self.sync.next_id.fetch_add(1, Ordering::Relaxed);
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
            declared: [false; 3],
            sync: self.sync.clone(),
            wake: Arc::new(Notify::new()),
            interests: Interests::default(),
            inflight: HashMap::new(),
            seq: 0,
        };
        let sync = self.sync.clone();
        tokio::spawn(async move {
            sync.index
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .wake
                .insert(conn.id, conn.wake.clone());
            conn.store.attach(&conn.node);
            conn.metrics.connected().increment(1.0);
            tracing::info!(proxy = %conn.status().proxy, "proxy connected");
            conn.run(first, &mut inbound, &tx).await;
            tracing::info!(proxy = %conn.status().proxy, "proxy disconnected");
            conn.metrics.connected().decrement(1.0);
            conn.store.detach(&conn.node);
            {
                let mut index = sync.index.lock().unwrap_or_else(|e| e.into_inner());
                index.set(conn.id, &conn.interests, &Interests::default());
                index.wake.remove(&conn.id);
            }
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

/// How long pilot waits, before its first push to a proxy that says it
/// holds resources from before (a reconnect), for the proxy to declare
/// what it holds of every type. A proxy declares them in its first
/// requests, so this bound only matters for one that never does.
const DECLARE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

struct Conn {
    id: u64,
    node: NodeInfo,
    store: Arc<Store>,
    metrics: Metrics,
    status: Arc<Mutex<ProxyStatus>>,
    /// Subscribed Workload and Destination names.
    subs: [BTreeSet<String>; 2],
    /// Per type: name → version sent (empty: sent as removed), or
    /// declared by the proxy as held when it connected.
    sent: [HashMap<String, Arc<str>>; 3],
    /// Types the proxy has sent its first request for.
    declared: [bool; 3],
    sync: Arc<SyncRegistry>,
    /// Notified when a recompute changed something this proxy uses.
    wake: Arc<Notify>,
    /// What this proxy uses, as in the index.
    interests: Interests,
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
        let reconnect = !first.initial_resource_versions.is_empty();
        self.handle(first);
        if reconnect {
            // The proxy holds resources from an earlier stream and
            // declares them per type in its first requests: push once they
            // are all in, so nothing it holds is sent again.
            let deadline = tokio::time::Instant::now() + DECLARE_WAIT;
            while !self.declared.iter().all(|d| *d) {
                match tokio::time::timeout_at(deadline, inbound.message()).await {
                    Err(_) => break,
                    Ok(Ok(Some(req))) => {
                        self.handle(req);
                    }
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "xds stream error");
                        return;
                    }
                }
            }
        }
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
                () = self.wake.notified() => {
                    if self.push(tx, true).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Applies a request; true when a push may be due (subscriptions
    /// changed, or the proxy declared resources it holds).
    fn handle(&mut self, req: DeltaDiscoveryRequest) -> bool {
        let Some(ty) = type_index(&req.type_url) else {
            tracing::warn!(type_url = %req.type_url, "request for an unknown type");
            return false;
        };
        self.declared[ty] = true;
        if !req.response_nonce.is_empty()
            && let Some((rty, carried)) = self.inflight.remove(&req.response_nonce)
        {
            let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
            let nack = req.error_detail.as_ref().map(|e| e.message.clone());
            if let Some(err) = &nack {
                self.metrics.nack(SHORT[rty]);
                tracing::warn!(proxy = %st.proxy, r#type = SHORT[rty], error = %err, "proxy rejected config");
            }
            let mut acked = 0;
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
                        acked += 1;
                    }
                }
            }
            st.refresh_state();
            drop(st);
            if acked > 0 {
                self.sync.acknowledged.send_modify(|a| a[rty] += acked);
            }
        }
        let mut declared = false;
        if !req.initial_resource_versions.is_empty() {
            let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
            for (name, version) in req.initial_resource_versions {
                // The proxy held these when it connected. What pilot sent
                // on this stream since is newer: that record stays, and
                // the proxy's answer to it decides.
                if self.sent[ty].contains_key(&name) {
                    continue;
                }
                self.sent[ty].insert(name.clone(), version.clone().into());
                let e = st
                    .resources
                    .entry(format!("{}/{name}", SHORT[ty]))
                    .or_default();
                e.sent = version.clone();
                e.acked = Some(version);
                e.nack = None;
                declared = true;
            }
            st.refresh_state();
        }
        if ty == C {
            // Clusters it holds that nothing routes to any more go; but
            // only once its destinations are known, or it would lose the
            // clusters they route to until they are.
            return declared && self.declared[D];
        }
        let mut changed = declared;
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
        // The generation before reading: if it moved by the time the
        // index knows what this proxy uses, a change may have slipped
        // between the two, so look again.
        let generation = self.store.subscribe();
        let seen = *generation.borrow();
        let (responses, changed_at, interests) = {
            let c = self.store.read();
            let mut resolved: BTreeSet<String> = BTreeSet::new();
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
                let key = c.resolve(name, &self.node.namespace);
                if let Some(k) = key {
                    resolved.insert(k.to_string());
                }
                match key.and_then(|k| c.destinations.get(k)) {
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
            let interests = Interests {
                destinations: resolved,
                clusters: want_clusters,
                node: (!self.subs[W].is_empty()).then(|| self.node.clone()),
                resolving: !self.subs[D].is_empty(),
            };
            (out, c.changed_at, interests)
        };
        if interests != self.interests {
            self.sync
                .index
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set(self.id, &self.interests, &interests);
            self.interests = interests;
        }
        if *generation.borrow() != seen {
            self.wake.notify_one();
        }
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

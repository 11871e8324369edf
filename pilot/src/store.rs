//! The compiled resources every proxy connection reads, and the loop that
//! keeps them current: sources report changes, a short debounce merges a
//! burst into one recompute, and only what depends on a change is rebuilt.
//! A resource whose content did not change keeps its version and is not
//! pushed again.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::compile::{self, MeshSettings, NodeInfo, parse_cluster_name};
use crate::registry::{Change, Edit, Inputs};

/// One compiled resource: its body as sent, a version that changes with
/// the content, and the clusters it routes to.
#[derive(Debug)]
pub struct Built {
    pub version: Arc<str>,
    pub body: Bytes,
    pub refs: Vec<Arc<str>>,
}

impl Built {
    fn new<T: Serialize>(value: &T, refs: Vec<String>) -> Built {
        // Serializing plain data into memory cannot fail.
        let body = serde_json::to_vec(value).unwrap_or_default();
        let mut h = std::hash::DefaultHasher::new();
        body.hash(&mut h);
        Built {
            version: format!("{:016x}", h.finish()).into(),
            body: body.into(),
            refs: refs.into_iter().map(Into::into).collect(),
        }
    }
}

/// Every compiled resource.
#[derive(Default)]
pub struct Compiled {
    /// Destinations by `host:port`.
    pub destinations: HashMap<String, Arc<Built>>,
    /// Service addresses (`ip:port`) to their destination's `host:port`.
    pub by_ip: HashMap<SocketAddr, String>,
    pub clusters: HashMap<String, Arc<Built>>,
    /// Per kind of proxy (workload, labels, gateway): its own resource.
    pub workloads: HashMap<NodeInfo, Arc<Built>>,
    /// When the change that this state answers was first reported.
    pub changed_at: Option<Instant>,
    /// What is compiled per host.
    hosts: HashMap<String, HostIndex>,
    /// How many destinations and workloads route to each cluster.
    refs: HashMap<Arc<str>, usize>,
    /// Clusters whose count reached or left zero since the last close.
    unsettled: HashSet<Arc<str>>,
}

impl Compiled {
    /// Resolves a name a proxy asked for (`reviews:9080`, `reviews.shop`,
    /// `10.0.0.7:9080`, a full host) to the `host:port` of a destination,
    /// short names resolving in the proxy's namespace.
    pub fn resolve(&self, name: &str, namespace: &str) -> Option<&str> {
        let (host, port) = split_name(name);
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return self
                .by_ip
                .get(&SocketAddr::new(ip, port))
                .map(String::as_str);
        }
        let host = host.to_ascii_lowercase();
        let dots = host.matches('.').count();
        let candidates = [
            match dots {
                0 => format!("{host}.{namespace}.svc.cluster.local:{port}"),
                1 => format!("{host}.svc.cluster.local:{port}"),
                2 if host.ends_with(".svc") => format!("{host}.cluster.local:{port}"),
                _ => format!("{host}:{port}"),
            },
            format!("{host}:{port}"),
        ];
        candidates
            .iter()
            .find_map(|c| self.destinations.get_key_value(c.as_str()))
            .map(|(k, _)| k.as_str())
    }
}

/// `host[:port]` (port 80 when absent; IPv6 in brackets).
pub fn split_name(name: &str) -> (&str, u16) {
    if let Some(rest) = name.strip_prefix('[')
        && let Some((h, after)) = rest.split_once(']')
    {
        return (
            h,
            after
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(80),
        );
    }
    match name.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().unwrap_or(80)),
        _ => (name, 80),
    }
}

/// How long a burst of changes may take to settle before pushing.
#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    /// Push once no change came for this long…
    pub quiet: Duration,
    /// …or this long after the first change, whichever is first.
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(2),
            max: Duration::from_millis(10),
        }
    }
}

/// Inputs in, compiled resources out.
pub struct Store {
    inputs: RwLock<Arc<Inputs>>,
    pending: Mutex<(Change, Option<Instant>)>,
    kick: Notify,
    compiled: RwLock<Compiled>,
    /// Bumped after every recompute; connections wait on it.
    generation: watch::Sender<u64>,
    /// What the last recomputes changed, by generation.
    log: Mutex<VecDeque<(u64, Arc<Changed>)>>,
    /// Connected proxies per node kind, so unused workload resources go.
    nodes: Mutex<HashMap<NodeInfo, usize>>,
    mesh: MeshSettings,
    debounce: Debounce,
    metrics: crate::metrics::Metrics,
}

impl Store {
    pub fn new(mesh: MeshSettings, debounce: Debounce, metrics: crate::metrics::Metrics) -> Store {
        Store {
            inputs: Default::default(),
            pending: Default::default(),
            kick: Notify::new(),
            compiled: Default::default(),
            generation: watch::channel(0).0,
            log: Default::default(),
            nodes: Default::default(),
            mesh,
            debounce,
            metrics,
        }
    }

    pub fn inputs(&self) -> Arc<Inputs> {
        self.inputs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the compiled resources.
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Compiled> {
        self.compiled.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Changes the inputs (anything, found by comparing before and
    /// after); the recompute follows after the debounce.
    pub fn update(&self, f: impl FnOnce(&mut Inputs)) {
        let mut next = (*self.inputs()).clone();
        f(&mut next);
        self.replace(next);
    }

    /// Replaces the inputs (a source's whole new view); what changed is
    /// found by comparing the two.
    pub fn replace(&self, next: Inputs) {
        let change = {
            let mut guard = self.inputs.write().unwrap_or_else(|e| e.into_inner());
            let change = guard.diff(&next);
            *guard = Arc::new(next);
            change
        };
        self.pend(change);
    }

    /// Changes single objects in place: the cheap way for a source that
    /// knows what changed (no copy, no comparison of everything).
    pub fn edit(&self, f: impl FnOnce(&mut Edit<'_>)) {
        let mut change = Change::default();
        {
            let mut guard = self.inputs.write().unwrap_or_else(|e| e.into_inner());
            // Copied only while a recompute still reads the previous.
            let inputs = Arc::make_mut(&mut *guard);
            f(&mut Edit::new(inputs, &mut change));
        }
        self.pend(change);
    }

    fn pend(&self, change: Change) {
        if change.is_empty() {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.0.merge(change);
        p.1.get_or_insert_with(Instant::now);
        drop(p);
        self.kick.notify_one();
    }

    /// Recomputes after changes, forever: once changes have been quiet for
    /// `debounce.quiet`, or `debounce.max` after the first of a burst.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.kick.notified().await;
            // Tokio's clock, so tests can check the timing on a paused one.
            let first = tokio::time::Instant::now();
            loop {
                let left = self.debounce.max.saturating_sub(first.elapsed());
                if left.is_zero() {
                    break;
                }
                let wait = self.debounce.quiet.min(left);
                if tokio::time::timeout(wait, self.kick.notified())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let (change, since) =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            if change.is_empty() {
                continue;
            }
            self.recompute(&change, since);
        }
    }

    /// Rebuilds what depends on `change` and publishes the result. An
    /// endpoint or service change costs what that service's resources
    /// cost, not what the mesh has: the compiled state is indexed by host,
    /// and clusters are kept by counting what routes to them.
    pub fn recompute(&self, change: &Change, since: Option<Instant>) {
        let started = Instant::now();
        let inputs = self.inputs();
        let full = !change.kinds.is_empty();
        // Compute outside the write lock; readers keep going meanwhile.
        let (hosts, old_clusters, nodes): (Vec<String>, Vec<String>, Vec<NodeInfo>) = {
            let c = self.read();
            let hosts: Vec<String> = if full {
                let mut all: HashSet<&str> = c.hosts.keys().map(String::as_str).collect();
                all.extend(inputs.services.values().map(|s| s.host.as_str()));
                all.into_iter().map(str::to_string).collect()
            } else {
                change.hosts.iter().cloned().collect()
            };
            let old_clusters = hosts
                .iter()
                .filter_map(|h| c.hosts.get(h))
                .flat_map(|i| i.clusters.iter().cloned())
                .collect();
            let nodes = c
                .workloads
                .keys()
                .filter(|n| full || change.namespaces.contains(&n.namespace) || n.gateway)
                .cloned()
                .collect();
            (hosts, old_clusters, nodes)
        };
        let mut new_hosts: Vec<HostBuilt> = Vec::new();
        for host in &hosts {
            let mut dests = Vec::new();
            let mut ips = Vec::new();
            if let Some(svc) = inputs.service_by_host(host) {
                for sp in &svc.ports {
                    let d = compile::destination(&inputs, svc, sp);
                    let mut refs = Vec::new();
                    compile::referenced_clusters(&d.http, &d.tcp, &mut refs);
                    for ip in &svc.addresses {
                        ips.push(SocketAddr::new(*ip, sp.port));
                    }
                    dests.push((format!("{}:{}", svc.host, sp.port), Built::new(&d, refs)));
                }
            }
            new_hosts.push((host.clone(), dests, ips));
        }
        // Workload resources of affected namespaces.
        let new_workloads: Vec<(NodeInfo, Built)> = nodes
            .into_iter()
            .map(|n| {
                let b = self.build_workload(&inputs, &n);
                (n, b)
            })
            .collect();
        // Clusters of changed hosts.
        let new_clusters: Vec<(String, Built)> = old_clusters
            .into_iter()
            .map(|name| {
                let b = Built::new(&compile::cluster(&inputs, &name, &self.mesh), vec![]);
                (name, b)
            })
            .collect();

        let mut c = self.compiled.write().unwrap_or_else(|e| e.into_inner());
        let mut out = Changed::default();
        for (host, dests, ips) in new_hosts {
            let index = c.hosts.remove(&host).unwrap_or_default();
            for ip in &index.ips {
                c.by_ip.remove(ip);
            }
            let keys: Vec<String> = dests.iter().map(|(k, _)| k.clone()).collect();
            for k in index.destinations.iter().filter(|k| !keys.contains(k)) {
                if c.remove_destination(k) {
                    out.destinations.push(k.clone());
                    out.names = true;
                }
            }
            let port_of = |k: &str| split_name(k).1;
            for ip in &ips {
                if let Some(k) = keys.iter().find(|k| port_of(k) == ip.port()) {
                    c.by_ip.insert(*ip, k.clone());
                }
            }
            if ips != index.ips {
                out.names = true;
            }
            for (k, b) in dests {
                if !index.destinations.contains(&k) {
                    out.names = true;
                }
                if c.put_destination(k.clone(), b) {
                    out.destinations.push(k);
                }
            }
            let entry = c.hosts.entry(host).or_default();
            entry.destinations = keys;
            entry.ips = ips;
            entry.clusters.extend(index.clusters);
        }
        for (n, b) in new_workloads {
            if c.put_workload(n.clone(), b) {
                out.workloads.push(n);
            }
        }
        for (name, b) in new_clusters {
            if c.clusters.contains_key(&name) && c.put_cluster(name.clone(), b) {
                out.clusters.push(name);
            }
        }
        c.close(&inputs, &self.mesh, &mut out);
        c.changed_at = since;
        for h in &hosts {
            if c.hosts.get(h).is_some_and(HostIndex::is_empty) {
                c.hosts.remove(h);
            }
        }
        let changed = out.destinations.len() + out.clusters.len() + out.workloads.len();
        drop(c);
        self.metrics.compile(started.elapsed(), changed);
        self.publish(out);
    }

    /// Records what a recompute changed and bumps the generation.
    fn publish(&self, out: Changed) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let generation = *self.generation.borrow() + 1;
        log.push_back((generation, Arc::new(out)));
        while log.len() > CHANGE_LOG {
            log.pop_front();
        }
        // Bumped under the log's lock: a reader that sees a generation
        // finds its entry.
        self.generation.send_replace(generation);
    }

    /// What the recomputes after `generation` changed, oldest first, and
    /// the generation they lead to; `None` when the log no longer goes
    /// back that far (everything may have changed).
    pub fn changes_since(&self, generation: u64) -> Option<(Vec<Arc<Changed>>, u64)> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let latest = log.back().map_or(generation, |(g, _)| *g);
        if latest <= generation {
            return Some((Vec::new(), generation));
        }
        let oldest = log.front().map_or(0, |(g, _)| *g);
        if oldest > generation + 1 {
            return None;
        }
        let out = log
            .iter()
            .filter(|(g, _)| *g > generation)
            .map(|(_, c)| c.clone())
            .collect();
        Some((out, latest))
    }

    fn build_workload(&self, inputs: &Inputs, node: &NodeInfo) -> Built {
        let w = compile::workload(inputs, node, &self.mesh);
        let mut refs = Vec::new();
        for l in &w.gateway_listeners {
            for vh in &l.virtual_hosts {
                compile::referenced_clusters(&vh.routes, &[], &mut refs);
            }
            compile::referenced_clusters(&[], &l.tcp, &mut refs);
        }
        Built::new(&w, refs)
    }

    /// A proxy of this kind connected: its workload resource, built now if
    /// it is the first.
    pub fn attach(&self, node: &NodeInfo) {
        let first = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            let n = nodes.entry(node.clone()).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first || !self.read().workloads.contains_key(node) {
            let inputs = self.inputs();
            let b = self.build_workload(&inputs, node);
            let mut c = self.compiled.write().unwrap_or_else(|e| e.into_inner());
            c.put_workload(node.clone(), b);
            c.close(&inputs, &self.mesh, &mut Changed::default());
        }
    }

    /// A proxy went away; the last of its kind takes its resource along.
    pub fn detach(&self, node: &NodeInfo) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = nodes.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                nodes.remove(node);
                let inputs = self.inputs();
                let mut c = self.compiled.write().unwrap_or_else(|e| e.into_inner());
                c.remove_workload(node);
                c.close(&inputs, &self.mesh, &mut Changed::default());
            }
        }
    }
}

/// One host's new destinations (by key) and service addresses.
type HostBuilt = (String, Vec<(String, Built)>, Vec<SocketAddr>);

/// How many recomputes' changes the store remembers.
const CHANGE_LOG: usize = 256;

/// What one recompute changed: resources whose version changed, came or
/// went. Connections use it to know whether a push may concern them.
#[derive(Debug, Default)]
pub struct Changed {
    /// Destination keys (`host:port`).
    pub destinations: Vec<String>,
    pub clusters: Vec<String>,
    pub workloads: Vec<NodeInfo>,
    /// Destinations appeared or went, or service addresses changed: a
    /// name a proxy subscribed with may resolve differently.
    pub names: bool,
}

/// What the compiled state holds for one host.
#[derive(Debug, Default)]
struct HostIndex {
    /// Its destinations' keys.
    destinations: Vec<String>,
    /// Its service addresses (`ip:port`).
    ips: Vec<SocketAddr>,
    /// Its clusters' names.
    clusters: BTreeSet<String>,
}

impl HostIndex {
    fn is_empty(&self) -> bool {
        self.destinations.is_empty() && self.ips.is_empty() && self.clusters.is_empty()
    }
}

impl Compiled {
    /// Counts `refs` up (or down): clusters reaching zero, or leaving it,
    /// are noted for [`Compiled::close`].
    fn reference(&mut self, refs: &[Arc<str>], up: bool) {
        for r in refs {
            let n = self.refs.entry(r.clone()).or_insert(0);
            if up {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
            if *n <= 1 {
                self.unsettled.insert(r.clone());
            }
        }
    }

    /// Puts a destination; true when its version changed.
    fn put_destination(&mut self, k: String, b: Built) -> bool {
        let old = self.destinations.remove(&k);
        if let Some(o) = &old
            && o.version == b.version
        {
            self.destinations
                .insert(k, old.unwrap_or_else(|| Arc::new(b)));
            return false;
        }
        if let Some(o) = &old {
            self.reference(&o.refs, false);
        }
        self.reference(&b.refs, true);
        self.destinations.insert(k, Arc::new(b));
        true
    }

    fn remove_destination(&mut self, k: &str) -> bool {
        match self.destinations.remove(k) {
            Some(o) => {
                self.reference(&o.refs, false);
                true
            }
            None => false,
        }
    }

    /// Puts a workload resource; true when its version changed.
    fn put_workload(&mut self, n: NodeInfo, b: Built) -> bool {
        let old = self.workloads.remove(&n);
        if let Some(o) = &old
            && o.version == b.version
        {
            self.workloads.insert(n, old.unwrap_or_else(|| Arc::new(b)));
            return false;
        }
        if let Some(o) = &old {
            self.reference(&o.refs, false);
        }
        self.reference(&b.refs, true);
        self.workloads.insert(n, Arc::new(b));
        true
    }

    fn remove_workload(&mut self, n: &NodeInfo) {
        if let Some(o) = self.workloads.remove(n) {
            self.reference(&o.refs, false);
        }
    }

    /// Puts a cluster; true when its version changed.
    fn put_cluster(&mut self, name: String, b: Built) -> bool {
        let old = self.clusters.remove(&name);
        if let Some((_, _, host)) = parse_cluster_name(&name) {
            self.hosts
                .entry(host.to_string())
                .or_default()
                .clusters
                .insert(name.clone());
        }
        match old {
            Some(o) if o.version == b.version => {
                self.clusters.insert(name, o);
                false
            }
            _ => {
                self.clusters.insert(name, Arc::new(b));
                true
            }
        }
    }

    /// Makes the cluster set exactly what destinations and workloads route
    /// to: computes the newly referenced, drops the unreferenced.
    fn close(&mut self, inputs: &Inputs, mesh: &MeshSettings, out: &mut Changed) {
        for name in std::mem::take(&mut self.unsettled) {
            let referenced = self.refs.get(&name).is_some_and(|n| *n > 0);
            if !referenced {
                self.refs.remove(&name);
                if self.clusters.remove(&*name).is_some() {
                    if let Some((_, _, host)) = parse_cluster_name(&name)
                        && let Some(i) = self.hosts.get_mut(host)
                    {
                        i.clusters.remove(&*name);
                    }
                    out.clusters.push(name.to_string());
                }
            } else if !self.clusters.contains_key(&*name) {
                let b = Built::new(&compile::cluster(inputs, &name, mesh), vec![]);
                self.put_cluster(name.to_string(), b);
                out.clusters.push(name.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! The compiled resources every proxy connection reads, and the loop that
//! keeps them current: sources report changes, a short debounce merges a
//! burst into one recompute, and only what depends on a change is rebuilt.
//! A resource whose content did not change keeps its version and is not
//! pushed again.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::compile::{self, MeshSettings, NodeInfo, parse_cluster_name};
use crate::registry::{Change, Inputs};

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

    /// Changes the inputs; the recompute follows after the debounce.
    pub fn update(&self, f: impl FnOnce(&mut Inputs)) {
        let change = {
            let mut guard = self.inputs.write().unwrap_or_else(|e| e.into_inner());
            let mut next = (**guard).clone();
            f(&mut next);
            let change = guard.diff(&next);
            *guard = Arc::new(next);
            change
        };
        if change.is_empty() {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.0.merge(change);
        p.1.get_or_insert_with(Instant::now);
        drop(p);
        self.kick.notify_one();
    }

    /// Recomputes after changes, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.kick.notified().await;
            let first = Instant::now();
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

    /// Rebuilds what depends on `change` and publishes the result.
    pub fn recompute(&self, change: &Change, since: Option<Instant>) {
        let started = Instant::now();
        let inputs = self.inputs();
        let full = !change.kinds.is_empty();
        let host_of = |k: &str| split_name(k).0.to_string();
        let dirty_host = |h: &str| full || change.hosts.contains(h);
        // Compute outside the write lock; readers keep going meanwhile.
        let (gone, old_clusters, nodes): (Vec<String>, Vec<String>, Vec<NodeInfo>) = {
            let c = self.read();
            (
                c.destinations
                    .keys()
                    .filter(|k| dirty_host(split_name(k).0))
                    .cloned()
                    .collect(),
                c.clusters
                    .keys()
                    .filter(|name| parse_cluster_name(name).is_some_and(|(_, _, h)| dirty_host(h)))
                    .cloned()
                    .collect(),
                c.workloads
                    .keys()
                    .filter(|n| full || change.namespaces.contains(&n.namespace) || n.gateway)
                    .cloned()
                    .collect(),
            )
        };
        let mut new_dest: HashMap<String, Built> = HashMap::new();
        let mut new_ips = Vec::new();
        let services: Vec<_> = if full {
            inputs.services.values().cloned().collect()
        } else {
            change
                .hosts
                .iter()
                .filter_map(|h| inputs.service_by_host(h).cloned())
                .collect()
        };
        for svc in &services {
            for sp in &svc.ports {
                let d = compile::destination(&inputs, svc, sp);
                let mut refs = Vec::new();
                compile::referenced_clusters(&d.http, &d.tcp, &mut refs);
                let key = format!("{}:{}", svc.host, sp.port);
                for ip in &svc.addresses {
                    new_ips.push((SocketAddr::new(*ip, sp.port), key.clone()));
                }
                new_dest.insert(key, Built::new(&d, refs));
            }
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
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    Built::new(&compile::cluster(&inputs, name, &self.mesh), vec![]),
                )
            })
            .collect();

        let mut c = self.compiled.write().unwrap_or_else(|e| e.into_inner());
        let mut changed = 0usize;
        for k in gone {
            if !new_dest.contains_key(&k) && c.destinations.remove(&k).is_some() {
                changed += 1;
            }
        }
        for (k, b) in new_dest {
            let old = c.destinations.remove(&k);
            changed += usize::from(swap_in(&mut c.destinations, k, b, old));
        }
        if full {
            c.by_ip.clear();
        } else {
            let hosts = &change.hosts;
            c.by_ip.retain(|_, k| !hosts.contains(&host_of(k)));
        }
        c.by_ip.extend(new_ips);
        for (n, b) in new_workloads {
            let old = c.workloads.remove(&n);
            changed += usize::from(swap_in(&mut c.workloads, n, b, old));
        }
        for (name, b) in new_clusters {
            let old = c.clusters.remove(&name);
            changed += usize::from(swap_in(&mut c.clusters, name, b, old));
        }
        self.close_clusters(&mut c, &inputs);
        c.changed_at = since;
        drop(c);
        self.metrics.compile(started.elapsed(), changed);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Makes the cluster set exactly what destinations and workloads route
    /// to: computes the missing, drops the unreferenced.
    fn close_clusters(&self, c: &mut Compiled, inputs: &Inputs) {
        let mut referenced: HashSet<Arc<str>> = HashSet::new();
        for b in c.destinations.values().chain(c.workloads.values()) {
            referenced.extend(b.refs.iter().cloned());
        }
        c.clusters.retain(|k, _| referenced.contains(k.as_str()));
        for name in referenced {
            if !c.clusters.contains_key(&*name) {
                let b = Built::new(&compile::cluster(inputs, &name, &self.mesh), vec![]);
                c.clusters.insert(name.to_string(), Arc::new(b));
            }
        }
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
            c.workloads.insert(node.clone(), Arc::new(b));
            self.close_clusters(&mut c, &inputs);
        }
    }

    /// A proxy went away; the last of its kind takes its resource along.
    pub fn detach(&self, node: &NodeInfo) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = nodes.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                nodes.remove(node);
                let mut c = self.compiled.write().unwrap_or_else(|e| e.into_inner());
                c.workloads.remove(node);
            }
        }
    }
}

/// Inserts `b` under `k`, keeping `old` (same version) when the content
/// did not change. True when it changed.
fn swap_in<K: Hash + Eq>(
    map: &mut HashMap<K, Arc<Built>>,
    k: K,
    b: Built,
    old: Option<Arc<Built>>,
) -> bool {
    match old {
        Some(old) if old.version == b.version => {
            map.insert(k, old);
            false
        }
        _ => {
            map.insert(k, Arc::new(b));
            true
        }
    }
}

#[cfg(test)]
mod tests;

//! The proxy's side of the discovery protocol (`mesh-proxy --xds ADDR`).
//!
//! One stream to pilot. The proxy subscribes to its own workload resource
//! and, the first time it sees traffic for a destination, to that
//! destination (the request waits for the answer, bounded). Every response
//! is applied atomically: the resources it carries are decoded and the
//! whole config recompiled; if that fails, the proxy NACKs with the error
//! and keeps what it had. While pilot is away the proxy keeps serving its
//! last config, and reconnects with jittered exponential backoff,
//! resubscribing to what it had and telling pilot which versions it holds.
//!
//! Pilot listens in plaintext on 15010 (local mode and tests) and over
//! TLS on 15012. Over TLS ([`Client::with_tls`], an `https://` address) the
//! proxy checks pilot's certificate against the mesh's roots exactly as it
//! does for the CA ([`PilotTls`]), presents its workload certificate when
//! it has one and pilot asks, and retries a failed handshake with the same
//! backoff: it never falls back to plaintext.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::discovery::{
    self as wire, CLUSTER, DESTINATION, DeltaDiscoveryRequest, DeltaDiscoveryResponse, WORKLOAD,
};
use mesh_api::model::{Cluster, DestinationConfig, ProxyConfig, WorkloadResource};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::Running;
use crate::identity::{Certs, PilotTls, error_chain};

/// How the proxy talks to pilot.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pilot's xDS port: `http://host:port` (plaintext, 15010) or
    /// `https://host:port` (TLS, 15012; see [`Client::with_tls`]).
    pub addr: String,
    pub node: wire::Node,
    /// How long a request for a destination the proxy has not seen waits
    /// for pilot's answer.
    pub demand_timeout: Duration,
    /// Reconnect backoff: first delay and cap (jittered).
    pub backoff: (Duration, Duration),
}

/// Shared between the stream task and the data path.
pub struct Client {
    settings: Settings,
    /// How pilot's certificate is checked; `None`: plaintext.
    tls: Option<PilotTls>,
    /// Destination names asked for: true once pilot answered.
    names: Mutex<HashMap<String, bool>>,
    subscribe: mpsc::UnboundedSender<Vec<String>>,
    subscribe_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<String>>>>,
    /// Bumped after every response.
    answered: watch::Sender<u64>,
    connected: AtomicBool,
    /// Streams that ended in an error, and the last error.
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Client {
    /// A client of pilot's plaintext port (`http://` address).
    pub fn new(settings: Settings) -> Arc<Client> {
        Client::build(settings, None)
    }

    /// A client of pilot's TLS port (`https://` address): pilot must prove
    /// itself with a certificate from the mesh's roots.
    pub fn with_tls(settings: Settings, tls: PilotTls) -> Arc<Client> {
        Client::build(settings, Some(tls))
    }

    fn build(settings: Settings, tls: Option<PilotTls>) -> Arc<Client> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Client {
            settings,
            tls,
            names: Mutex::new(HashMap::new()),
            subscribe: tx,
            subscribe_rx: Mutex::new(Some(rx)),
            answered: watch::channel(0).0,
            connected: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// How many connections to pilot failed or broke.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Why the last one did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes sure pilot was asked for these destinations (`host:port`),
    /// and waits (bounded) for its answer. Returns at once for names it
    /// answered before, and when pilot is unreachable.
    pub async fn demand(&self, names: &[String]) {
        let mut new = Vec::new();
        {
            let mut known = self.names.lock().unwrap_or_else(|e| e.into_inner());
            for n in names {
                if !known.contains_key(n) {
                    known.insert(n.clone(), false);
                    new.push(n.clone());
                }
            }
            if names.iter().all(|n| known.get(n) == Some(&true)) {
                return;
            }
        }
        if !new.is_empty() {
            let _ = self.subscribe.send(new);
        }
        if !self.connected() {
            return;
        }
        let mut rx = self.answered.subscribe();
        let done = || {
            let known = self.names.lock().unwrap_or_else(|e| e.into_inner());
            names.iter().all(|n| known.get(n) == Some(&true))
        };
        let _ = tokio::time::timeout(self.settings.demand_timeout, async {
            while !done() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// True when pilot has answered for this name (it may not exist).
    pub fn answered(&self, name: &str) -> bool {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
            .unwrap_or(false)
    }

    /// Runs the stream forever, reconnecting.
    pub async fn run(self: Arc<Self>, running: Arc<Running>) {
        let Some(mut subscribe_rx) = self
            .subscribe_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut have = Held::default();
        let (first, cap) = self.settings.backoff;
        let mut delay = first;
        loop {
            let mut got_response = false;
            let result = self
                .session(&running, &mut have, &mut subscribe_rx, &mut got_response)
                .await;
            self.connected.store(false, Ordering::Relaxed);
            running.proxy.metrics.xds_connected.set(0.0);
            match result {
                Ok(()) => tracing::warn!(addr = %self.settings.addr, "pilot closed the stream"),
                Err(e) => {
                    tracing::warn!(addr = %self.settings.addr, error = %e, "pilot unreachable");
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            }
            if got_response {
                delay = first;
            }
            // Full jitter between half the delay and the delay.
            let ms = delay.as_millis() as u64;
            let sleep = Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2));
            tokio::time::sleep(sleep).await;
            delay = (delay * 2).min(cap);
        }
    }

    async fn session(
        &self,
        running: &Arc<Running>,
        have: &mut Held,
        subscribe_rx: &mut mpsc::UnboundedReceiver<Vec<String>>,
        got_response: &mut bool,
    ) -> Result<(), String> {
        let endpoint = self
            .endpoint(&running.proxy.tls.certs)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        // Say who we are, and what we already have: pilot sends only what
        // changed while we were away.
        let destinations: Vec<String> = {
            let known = self.names.lock().unwrap_or_else(|e| e.into_inner());
            known.keys().cloned().collect()
        };
        have.forget_unless_running();
        for req in hello(&self.settings.node, have, destinations) {
            tx.send(req).await.map_err(|e| e.to_string())?;
        }
        let mut inbound = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner();
        self.connected.store(true, Ordering::Relaxed);
        running.proxy.metrics.xds_connected.set(1.0);
        tracing::info!(addr = %self.settings.addr, "connected to pilot");
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(resp)) => {
                        *got_response = true;
                        let ack = self.apply(running, have, resp).await;
                        tx.send(ack).await.map_err(|e| e.to_string())?;
                        self.answered.send_modify(|n| *n += 1);
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.message().to_string()),
                },
                Some(names) = subscribe_rx.recv() => {
                    let req = DeltaDiscoveryRequest {
                        type_url: DESTINATION.to_string(),
                        resource_names_subscribe: names,
                        ..Default::default()
                    };
                    tx.send(req).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }

    /// The endpoint of pilot's xDS port: over TLS when the client was built
    /// with it (the workload certificate of the moment offered as client
    /// certificate); an `https://` address without TLS settings is an
    /// error, never a plaintext connection.
    fn endpoint(&self, certs: &Certs) -> Result<tonic::transport::Endpoint, String> {
        let addr = &self.settings.addr;
        match &self.tls {
            Some(tls) => {
                let roots = tls.read_roots()?;
                tls.endpoint(addr, &roots, certs.current().as_deref())
            }
            None if addr.starts_with("https://") => Err(format!(
                "pilot address {addr:?}: TLS needs the mesh's roots"
            )),
            None => tonic::transport::Endpoint::from_shared(addr.clone())
                .map_err(|e| format!("invalid pilot address {addr:?}: {e}")),
        }
    }

    /// Applies one response; returns its ACK or NACK.
    async fn apply(
        &self,
        running: &Running,
        have: &mut Held,
        resp: DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let mut next = have.clone();
        let mut errors = Vec::new();
        let mut names = Vec::new();
        for r in &resp.resources {
            let decoded = match resp.type_url.as_str() {
                WORKLOAD => serde_json::from_slice::<WorkloadResource>(&r.body)
                    .map(|w| next.workload = Some((r.version.clone(), w))),
                DESTINATION => serde_json::from_slice::<DestinationConfig>(&r.body).map(|d| {
                    next.destinations
                        .insert(r.name.clone(), (r.version.clone(), d));
                }),
                CLUSTER => serde_json::from_slice::<Cluster>(&r.body).map(|c| {
                    next.clusters.insert(r.name.clone(), (r.version.clone(), c));
                }),
                other => {
                    errors.push(format!("unknown type {other:?}"));
                    continue;
                }
            };
            if let Err(e) = decoded {
                errors.push(format!("{}: {e}", r.name));
            }
            names.push(r.name.clone());
        }
        for name in &resp.removed_resources {
            match resp.type_url.as_str() {
                DESTINATION => {
                    next.destinations.remove(name);
                }
                CLUSTER => {
                    next.clusters.remove(name);
                }
                _ => {}
            }
            names.push(name.clone());
        }
        let result = if errors.is_empty() {
            match next.assemble() {
                Some(cfg) => running.apply(cfg).await,
                None => Ok(()), // Nothing to run until the workload arrives.
            }
        } else {
            Err(errors.join("; "))
        };
        if resp.type_url == DESTINATION {
            let mut known = self.names.lock().unwrap_or_else(|e| e.into_inner());
            for n in names {
                known.insert(n, true);
            }
        }
        let error_detail = match result {
            Ok(()) => {
                *have = next;
                None
            }
            Err(e) => {
                tracing::warn!(r#type = %resp.type_url, error = %e, "rejected config from pilot; keeping the previous");
                running.proxy.metrics.config_rejected.increment(1);
                Some(wire::Status {
                    code: 3, // INVALID_ARGUMENT
                    message: e,
                })
            }
        };
        DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        }
    }
}

/// The requests that open a stream: who the proxy is and what it holds.
///
/// Pilot may push after each of them; a push sends the clusters that the
/// subscriptions known so far route to and that the proxy is not known to
/// hold, and removes held clusters they do not route to. So: the workload
/// first (it carries the node, and its held version tells pilot this is a
/// reconnect; no cluster is known held yet, so none is removed), then the
/// clusters held, then the destinations, whose push routes to most
/// clusters and then sends only those that changed. The protocol carries
/// one type URL per request, hence three.
fn hello(node: &wire::Node, have: &Held, destinations: Vec<String>) -> [DeltaDiscoveryRequest; 3] {
    let workload_name = format!("{}/{}", node.namespace, node.workload);
    let workload_versions = versions(have.workload.iter().map(|(v, _)| (&workload_name, v)));
    [
        DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: WORKLOAD.to_string(),
            resource_names_subscribe: vec![workload_name],
            initial_resource_versions: workload_versions,
            ..Default::default()
        },
        DeltaDiscoveryRequest {
            type_url: CLUSTER.to_string(),
            initial_resource_versions: versions(have.clusters.iter().map(|(k, (v, _))| (k, v))),
            ..Default::default()
        },
        DeltaDiscoveryRequest {
            type_url: DESTINATION.to_string(),
            resource_names_subscribe: destinations,
            initial_resource_versions: versions(have.destinations.iter().map(|(k, (v, _))| (k, v))),
            ..Default::default()
        },
    ]
}

/// `--xds ADDR`: `https://host:port` is pilot's TLS port; `http://host:port`
/// or a bare `host:port` its plaintext port. Returns the address with its
/// scheme, and whether it is TLS.
pub fn parse_addr(addr: &str) -> Result<(String, bool), String> {
    let full = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let uri: http::Uri = full
        .parse()
        .map_err(|e| format!("pilot address {addr:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "pilot address {addr:?}: expected https://host:port or host:port"
            ));
        }
    };
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(format!("pilot address {addr:?}: expected host:port"));
    }
    Ok((full, tls))
}

fn versions<'a>(it: impl Iterator<Item = (&'a String, &'a String)>) -> HashMap<String, String> {
    it.map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The resources the proxy holds, with their versions.
#[derive(Clone, Default)]
struct Held {
    workload: Option<(String, WorkloadResource)>,
    /// By the name the proxy subscribed with.
    destinations: BTreeMap<String, (String, DestinationConfig)>,
    clusters: BTreeMap<String, (String, Cluster)>,
    /// How many configs were applied (the config's version).
    applied: u64,
}

impl Held {
    /// Before a new stream: without the workload resource nothing was
    /// assembled from the rest, so nothing of it runs; it is dropped, and
    /// the proxy declares nothing, like a new one.
    fn forget_unless_running(&mut self) {
        if self.workload.is_none() {
            self.destinations.clear();
            self.clusters.clear();
        }
    }

    /// The config these resources make, once the workload resource is in.
    fn assemble(&mut self) -> Option<ProxyConfig> {
        let (_, w) = self.workload.as_ref()?;
        // Several names may resolve to one destination: one entry, with
        // every name the proxy used as an alias.
        let mut merged: BTreeMap<(String, u16), DestinationConfig> = BTreeMap::new();
        for (name, (_, d)) in &self.destinations {
            let entry = merged
                .entry((d.host.clone(), d.port))
                .or_insert_with(|| d.clone());
            let (host, _) = crate::state::split_authority(name, d.port);
            let host = host.to_ascii_lowercase();
            if host != entry.host
                && host.parse::<std::net::IpAddr>().is_err()
                && !entry.aliases.contains(&host)
            {
                entry.aliases.push(host);
            }
        }
        self.applied += 1;
        let applied = self.applied;
        Some(ProxyConfig {
            version: format!("xds-{applied}"),
            workload: w.workload.clone(),
            destinations: merged.into_values().collect(),
            clusters: self.clusters.values().map(|(_, c)| c.clone()).collect(),
            inbound: w.inbound.clone(),
            gateway_listeners: w.gateway_listeners.clone(),
            outbound_policy: w.outbound_policy,
        })
    }
}

#[cfg(test)]
mod tests;

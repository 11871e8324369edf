//! `mesh-proxy`: the mesh's data plane.
//!
//! One [`Proxy`] holds the running config, the state learnt about
//! upstreams and the metrics; [`start`] binds its listeners. The binary
//! (`main.rs`) is a thin shell over this, and tests run proxies in-process.

pub mod admin;
pub mod authz;
pub mod body;
pub mod cluster;
pub mod cors;
pub mod detect;
pub mod framing;
pub mod hashring;
pub mod http;
pub mod identity;
pub mod init;
pub mod jwt;
pub mod metrics;
pub mod pool;
pub mod probes;
pub mod ratelimit;
pub mod reason;
pub mod routing;
pub mod server;
pub mod state;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod xds;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use mesh_api::model::ProxyConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use server::ConnSettings;

/// The proxy's shared state.
#[derive(Default)]
pub struct Proxy {
    pub config: state::ConfigCell,
    pub registry: cluster::Registry,
    pub metrics: metrics::Metrics,
    pub draining: AtomicBool,
    /// `namespace/name` of the Gateways this proxy serves (gateway mode).
    pub gateway_names: Vec<String>,
    /// Pilot, when the config comes over xDS: asked on demand for
    /// destinations the proxy has not seen yet.
    pub xds: std::sync::OnceLock<Arc<xds::Client>>,
    /// The app's rewritten HTTP probes, served on the metrics port.
    pub app_probers: probes::Probers,
    /// The workload certificate from the mesh's CA, when one is configured,
    /// and the mTLS built on it.
    pub tls: Arc<tls::MeshTls>,
    /// Tracing and access logs (off by default).
    pub telemetry: telemetry::Telemetry,
}

impl Proxy {
    pub fn new(gateway_names: Vec<String>) -> Proxy {
        Proxy {
            gateway_names,
            ..Default::default()
        }
    }

    /// Compiles and swaps in a config; on error the current one stays.
    pub fn apply(&self, cfg: ProxyConfig) -> Result<(), String> {
        let version = cfg.version.clone();
        match state::compile(cfg, &self.registry, &self.gateway_names) {
            Ok(snap) => {
                snap.authn.prefetch();
                self.config.store(snap);
                self.registry.prune();
                self.metrics.config_applied.increment(1);
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.metrics.config_version.set(now);
                tracing::info!(%version, "config applied");
                Ok(())
            }
            Err(e) => {
                self.metrics.config_rejected.increment(1);
                tracing::error!(%version, error = %e, "config rejected; keeping the previous one");
                Err(e)
            }
        }
    }
}

/// Reads a config file (YAML or JSON).
pub fn read_config(path: &Path) -> Result<ProxyConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where each listener binds; `None` leaves it off.
#[derive(Clone, Debug)]
pub struct Addrs {
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub explicit: Option<SocketAddr>,
    /// Address gateway ports bind on, when gateway mode is on.
    pub gateway_bind: Option<IpAddr>,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub ready: Option<SocketAddr>,
}

/// A started proxy: its bound addresses and its shutdown.
pub struct Running {
    pub proxy: Arc<Proxy>,
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub explicit: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub ready: Option<SocketAddr>,
    gateways: Option<Arc<server::GatewayPorts>>,
    shutdown: watch::Sender<bool>,
    tracker: Arc<server::Tracker>,
}

impl Running {
    /// Gateway listener addresses, by port.
    pub fn gateway_addrs(&self) -> Vec<SocketAddr> {
        self.gateways
            .as_ref()
            .map(|g| g.addrs())
            .unwrap_or_default()
    }

    /// Applies a config and binds any new gateway ports.
    pub async fn apply(&self, cfg: ProxyConfig) -> Result<(), String> {
        self.proxy.apply(cfg)?;
        if let Some(g) = &self.gateways {
            g.reconcile().await;
        }
        Ok(())
    }

    /// Live downstream connections.
    pub fn connections(&self) -> usize {
        self.tracker.live()
    }

    /// Drains: readiness fails, listeners close, HTTP/1 responses carry
    /// `Connection: close` and HTTP/2 connections get GOAWAY; waits for
    /// in-flight requests up to `deadline`.
    pub async fn drain(&self, deadline: Duration) {
        self.proxy
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        if tokio::time::timeout(deadline, self.tracker.drained())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tracker.live(),
                "drain deadline passed with connections open"
            );
        }
    }
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .map_err(|e| anyhow::anyhow!("cannot listen on {a} ({what}): {e}")),
    }
}

/// Binds every listener and starts serving.
pub async fn start(
    proxy: Arc<Proxy>,
    addrs: Addrs,
    settings: ConnSettings,
    log: Option<admin::LogControl>,
) -> anyhow::Result<Running> {
    let (shutdown, rx) = watch::channel(false);
    let tracker = Arc::new(server::Tracker::default());
    let ctx = server::Ctx {
        proxy: proxy.clone(),
        settings: Arc::new(settings),
        shutdown: rx.clone(),
        tracker: tracker.clone(),
    };
    let outbound = bind(addrs.outbound, "outbound").await?;
    let inbound = bind(addrs.inbound, "inbound").await?;
    let explicit = bind(addrs.explicit, "explicit proxy").await?;
    let admin = bind(addrs.admin, "admin").await?;
    let metrics = bind(addrs.metrics, "metrics").await?;
    let ready = bind(addrs.ready, "readiness").await?;
    let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let mut running = Running {
        proxy: proxy.clone(),
        outbound: local(&outbound),
        inbound: local(&inbound),
        explicit: local(&explicit),
        admin: local(&admin),
        metrics: local(&metrics),
        ready: local(&ready),
        gateways: None,
        shutdown,
        tracker,
    };
    for (l, kind) in [
        (outbound, server::Kind::Outbound),
        (inbound, server::Kind::Inbound),
        (explicit, server::Kind::Explicit),
    ] {
        if let Some(l) = l {
            tokio::spawn(server::accept_loop(ctx.clone(), l, kind));
        }
    }
    for (l, port) in [
        (admin, admin::Port::Admin),
        (metrics, admin::Port::Metrics),
        (ready, admin::Port::Ready),
    ] {
        if let Some(l) = l {
            let log = if port == admin::Port::Admin {
                log.clone()
            } else {
                None
            };
            tokio::spawn(admin::serve(proxy.clone(), l, port, log, rx.clone()));
        }
    }
    // Histogram samples are buffered until folded into buckets.
    let upkeep = proxy.clone();
    let mut stop = rx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => upkeep.metrics.upkeep(),
                _ = stop.changed() => return,
            }
        }
    });
    if let Some(bind) = addrs.gateway_bind {
        let g = Arc::new(server::GatewayPorts::new(bind, ctx.clone()));
        g.reconcile().await;
        running.gateways = Some(g);
    }
    Ok(running)
}

/// Takes config from pilot from now on: connects (and reconnects) in the
/// background, and asks pilot on demand for destinations not seen yet.
/// The proxy's metrics address goes to pilot with the node, for its
/// service graph. Plaintext (pilot's 15010); see [`follow_pilot_tls`].
pub fn follow_pilot(running: &Arc<Running>, settings: xds::Settings) -> Arc<xds::Client> {
    follow(running, settings, None)
}

/// As [`follow_pilot`], over TLS to pilot's 15012 (`https://` address):
/// pilot's certificate is checked as `tls` says, the workload certificate
/// is offered once the proxy has one.
pub fn follow_pilot_tls(
    running: &Arc<Running>,
    settings: xds::Settings,
    tls: identity::PilotTls,
) -> Arc<xds::Client> {
    follow(running, settings, Some(tls))
}

fn follow(
    running: &Arc<Running>,
    mut settings: xds::Settings,
    tls: Option<identity::PilotTls>,
) -> Arc<xds::Client> {
    if settings.node.metrics_addr.is_empty()
        && let Some(m) = running.metrics
    {
        settings.node.metrics_addr = m.to_string();
    }
    let client = match tls {
        Some(tls) => xds::Client::with_tls(settings, tls),
        None => xds::Client::new(settings),
    };
    let _ = running.proxy.xds.set(client.clone());
    tokio::spawn(client.clone().run(running.clone()));
    client
}

/// Reloads `path` whenever it changes (checked every `every`); a config
/// that fails to read or compile is logged and the current one stays.
pub async fn watch_file(running: Arc<Running>, path: PathBuf, every: Duration) {
    let stamp = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            (
                m.modified().ok(),
                m.len(),
                std::fs::read(p).ok().map(|b| crate::hashring::xxh64(&b, 0)),
            )
        })
    };
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(every).await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match read_config(&path) {
            Ok(cfg) => {
                let _ = running.apply(cfg).await;
            }
            Err(e) => {
                running.proxy.metrics.config_rejected.increment(1);
                tracing::error!(error = %e, "config file unreadable; keeping the previous config");
            }
        }
    }
}

//! `mesh-pilot`: the mesh's control plane. Sources (a directory of YAML,
//! Kubernetes) feed the [`store::Store`]; the [`compile`] functions turn
//! services, workloads and routing resources into what proxies run; the
//! [`xds`] server pushes it over the Delta xDS protocol; [`status`] serves
//! metrics and debug views on 15014.

pub mod ca;
pub mod compile;
pub mod dashboard;
pub mod graph;
pub mod metrics;
pub mod registry;
pub mod source;
pub mod status;
pub mod store;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use compile::MeshSettings;
pub use store::Debounce;

/// How pilot runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Plaintext xDS (15010).
    pub xds_addr: SocketAddr,
    /// Metrics, debug and readiness (15014).
    pub http_addr: SocketAddr,
    pub mesh: MeshSettings,
    pub debounce: Debounce,
}

/// Pilot's shared state.
pub struct Pilot {
    pub store: Arc<store::Store>,
    pub metrics: metrics::Metrics,
    pub sync: Arc<xds::SyncRegistry>,
    pub ready: watch::Receiver<bool>,
    /// The live service graph of the dashboard.
    pub graph: Arc<graph::Graph>,
}

/// A started pilot: its bound addresses. Dropping it stops the listeners.
pub struct Running {
    pub xds_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub pilot: Arc<Pilot>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Serves the certificate authority and xDS over TLS on `addr` (15012),
    /// with a serving certificate the CA issues for `names`. Returns the
    /// bound address.
    pub async fn serve_secure<A: ca::Authenticate>(
        &mut self,
        addr: SocketAddr,
        authority: Arc<ca::Ca>,
        auth: A,
        names: &[String],
    ) -> std::io::Result<SocketAddr> {
        let (cert, key) = authority
            .serving_cert(names)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} (CA and secure xDS): {e}"),
            )
        })?;
        let bound = listener.local_addr()?;
        // Client certificates are asked for but optional: the CA serves
        // proxies that have none yet; xDS requires one (`Xds::with_identity`).
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .client_ca_root(tonic::transport::Certificate::from_pem(
                authority.roots().join(
                    "
",
                ),
            ))
            .client_auth_optional(true);
        let trust_domain = authority.trust_domain.clone();
        let ca_svc =
            mesh_api::ca::certificate_service_server::CertificateServiceServer::new(ca::Service {
                ca: authority,
                auth,
            });
        let xds = xds::Xds::with_identity(
            self.pilot.store.clone(),
            self.pilot.metrics.clone(),
            self.pilot.sync.clone(),
            &trust_domain,
        );
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .tcp_nodelay(true)
            .add_service(ca_svc)
            .add_service(xds);
        self.tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = server.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "secure server stopped");
            }
        }));
        tracing::info!(addr = %bound, "CA and secure xDS listening");
        Ok(bound)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds pilot's ports (a taken port is an error naming it) and starts the
/// source, the compile loop and the servers.
pub async fn start<S: source::Source>(cfg: Config, source: S) -> std::io::Result<Running> {
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
        })
    };
    let xds_listener = bind(cfg.xds_addr, "xDS").await?;
    let http_listener = bind(cfg.http_addr, "status").await?;
    let xds_addr = xds_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let metrics = metrics::Metrics::new();
    let store = Arc::new(store::Store::new(cfg.mesh, cfg.debounce, metrics.clone()));
    let (ready_tx, ready) = watch::channel(false);
    let sync = Arc::new(xds::SyncRegistry::default());
    let graph = Arc::new(graph::Graph::default());
    let pilot = Arc::new(Pilot {
        store: store.clone(),
        metrics: metrics.clone(),
        sync: sync.clone(),
        ready,
        graph: graph.clone(),
    });
    let mut tasks = vec![
        tokio::spawn(graph.run(sync.clone())),
        tokio::spawn(store.clone().run()),
        // Wakes the connections each recompute concerns.
        tokio::spawn(xds::dispatch(store.clone(), sync.clone())),
        tokio::spawn(source.run(source::Sink {
            store: store.clone(),
            metrics: metrics.clone(),
            ready: ready_tx,
        })),
    ];
    let svc = xds::Xds::new(store, metrics.clone(), sync);
    tasks.push(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(xds_listener);
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "xDS server stopped");
        }
    }));
    let app = status::router(pilot.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, app).await {
            tracing::error!(error = %e, "status server stopped");
        }
    }));
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            metrics.upkeep();
        }
    }));
    tracing::info!(%xds_addr, %http_addr, "pilot started");
    Ok(Running {
        xds_addr,
        http_addr,
        pilot,
        tasks,
    })
}

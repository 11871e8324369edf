//! Listeners: accept loops for each mode, per-connection protocol handling,
//! and draining on shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::model::Protocol;
use mesh_api::security::MtlsMode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::Proxy;
use crate::detect::{Detected, detect};
use crate::http::{ConnInfo, Entry};
use crate::metrics::Reporter;
use crate::tls::Inner;

/// Largest request head accepted (larger: 431).
pub const MAX_HEAD_BYTES: usize = 60 * 1024;
/// Most request headers accepted (more: 431).
pub const MAX_HEADERS: usize = 100;

/// Connection-level settings.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    pub detect_timeout: Duration,
    /// A client must send a complete request head within this.
    pub header_read_timeout: Duration,
    /// HTTP/2 concurrent streams per client connection.
    pub max_concurrent_streams: u32,
}

impl Default for ConnSettings {
    fn default() -> Self {
        ConnSettings {
            detect_timeout: Duration::from_millis(100),
            header_read_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1000,
        }
    }
}

/// Tracks live connections so shutdown can wait for them.
#[derive(Default)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

impl Tracker {
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Waits until no connection is live.
    pub async fn drained(&self) {
        loop {
            let n = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            n.await;
        }
    }
}

struct Live(Arc<Tracker>);

impl Live {
    fn new(t: &Arc<Tracker>) -> Live {
        t.live.fetch_add(1, Ordering::AcqRel);
        Live(t.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What accept loops share.
#[derive(Clone)]
pub struct Ctx {
    pub proxy: Arc<Proxy>,
    pub settings: Arc<ConnSettings>,
    pub shutdown: watch::Receiver<bool>,
    pub tracker: Arc<Tracker>,
}

/// Which listener accepted a connection.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Outbound,
    Inbound,
    Explicit,
    Gateway(u16),
}

/// The original destination of a redirected connection (SO_ORIGINAL_DST),
/// or the local address when it was not redirected.
fn original_dst(stream: &TcpStream) -> SocketAddr {
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    if local.is_ipv4() {
        if let Ok(addr) =
            nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)
        {
            let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            return SocketAddr::new(IpAddr::V4(ip), u16::from_be(addr.sin_port));
        }
    } else if let Ok(addr) =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::Ip6tOriginalDst)
    {
        let ip = std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr);
        return SocketAddr::new(IpAddr::V6(ip), u16::from_be(addr.sin6_port));
    }
    local
}

/// Accepts connections until shutdown.
pub async fn accept_loop(ctx: Ctx, listener: TcpListener, kind: Kind) {
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let live = Live::new(&ctx.tracker);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            ctx.proxy.metrics.downstream_connections.increment(1.0);
            handle_conn(&ctx, stream, peer, kind).await;
            ctx.proxy.metrics.downstream_connections.decrement(1.0);
            drop(live);
        });
    }
}

async fn handle_conn(ctx: &Ctx, stream: TcpStream, peer: SocketAddr, kind: Kind) {
    let snap = ctx.proxy.config.load();
    let (entry, hint) = match kind {
        Kind::Outbound => {
            let orig = original_dst(&stream);
            let hint = snap
                .as_ref()
                .and_then(|s| s.by_addr.get(&orig).map(|d| d.protocol));
            (Entry::Outbound(orig), hint.unwrap_or(Protocol::Auto))
        }
        Kind::Inbound => {
            let orig = original_dst(&stream);
            let mode = snap.as_ref().map_or(MtlsMode::Permissive, |s| {
                s.config.inbound.mtls_for(orig.port())
            });
            let hint = snap
                .as_ref()
                .and_then(|s| s.inbound.get(&orig.port()).map(|p| p.protocol))
                .unwrap_or(Protocol::Auto);
            if mode != MtlsMode::Disable {
                return inbound_mtls(ctx, stream, peer, orig, mode, hint).await;
            }
            (Entry::Inbound(orig), hint)
        }
        Kind::Explicit => (Entry::Explicit, Protocol::Http),
        Kind::Gateway(port) => {
            let hint = snap
                .as_ref()
                .and_then(|s| s.gateways.get(&port).map(|g| g.protocol));
            (Entry::Gateway(port), hint.unwrap_or(Protocol::Http))
        }
    };
    let detected = if entry_skips_detection(entry, hint) {
        Detected::Tcp
    } else {
        match hint {
            Protocol::Http2 | Protocol::Grpc => Detected::Http2,
            _ => detect(&stream, ctx.settings.detect_timeout).await,
        }
    };
    serve_detected(ctx, stream, entry, peer, hint, detected).await
}

/// Declared TCP and TLS ports, and the well-known server-first ports of
/// undeclared protocol, are forwarded without waiting for bytes.
fn entry_skips_detection(entry: Entry, hint: Protocol) -> bool {
    let port = match entry {
        Entry::Outbound(a) | Entry::Inbound(a) => a.port(),
        _ => 0,
    };
    matches!(hint, Protocol::Tcp | Protocol::Tls)
        || (hint == Protocol::Auto && port != 0 && Protocol::server_first_port(port))
}

async fn serve_detected(
    ctx: &Ctx,
    stream: TcpStream,
    entry: Entry,
    peer: SocketAddr,
    hint: Protocol,
    detected: Detected,
) {
    let detected = match (hint, detected) {
        (Protocol::Http2 | Protocol::Grpc, _) => Detected::Http2,
        // A declared HTTP port is HTTP whatever arrives: garbage gets 400.
        (Protocol::Http, Detected::Http2) => Detected::Http2,
        (Protocol::Http, _) => Detected::Http1,
        (Protocol::Tcp | Protocol::Tls, _) => Detected::Tcp,
        (Protocol::Auto, d) => d,
    };
    match detected {
        Detected::Http1 | Detected::Http2 => {
            serve_http(
                ctx,
                stream,
                entry,
                peer,
                detected == Detected::Http2,
                None,
                None,
            )
            .await
        }
        Detected::Tcp | Detected::Tls => serve_tcp(ctx, stream, peer, entry, None, None).await,
    }
}

/// Inbound with PeerAuthentication STRICT or PERMISSIVE: mesh mTLS (TLS
/// whose ClientHello offers a mesh ALPN protocol) is terminated and its
/// inner protocol served with the client's verified identity. Anything
/// else is refused under STRICT, and handled as plaintext under
/// PERMISSIVE (an app's own TLS passes through untouched).
async fn inbound_mtls(
    ctx: &Ctx,
    stream: TcpStream,
    peer: SocketAddr,
    orig: SocketAddr,
    mode: MtlsMode,
    hint: Protocol,
) {
    let proxy = &ctx.proxy;
    let entry = Entry::Inbound(orig);
    let first = detect(&stream, ctx.settings.detect_timeout).await;
    let mesh = first == Detected::Tls
        && crate::tls::offers_mesh(&stream, ctx.settings.header_read_timeout).await == Some(true);
    if mesh {
        let accepted =
            tokio::time::timeout(ctx.settings.header_read_timeout, proxy.tls.accept(stream)).await;
        let (tls, inner, identity) = match accepted {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                proxy.metrics.mtls_refused.increment(1);
                tracing::info!(%peer, error = %e, "mTLS handshake refused");
                return;
            }
            Err(_) => {
                proxy.metrics.mtls_refused.increment(1);
                tracing::info!(%peer, "mTLS handshake timed out");
                return;
            }
        };
        let sni: Option<Arc<str>> = tls.get_ref().1.server_name().map(Into::into);
        match inner {
            Inner::Http1 | Inner::Http2 => {
                let h2 = inner == Inner::Http2;
                serve_http(ctx, tls, entry, peer, h2, Some(identity), sni).await
            }
            Inner::Tcp => serve_tcp(ctx, tls, peer, entry, Some(identity), sni).await,
        }
        return;
    }
    if mode == MtlsMode::Strict {
        proxy.metrics.mtls_refused.increment(1);
        tracing::info!(%peer, port = orig.port(), "plaintext refused: mTLS is STRICT");
        return;
    }
    serve_detected(ctx, stream, entry, peer, hint, first).await
}

async fn serve_tcp<S>(
    ctx: &Ctx,
    stream: S,
    peer: SocketAddr,
    entry: Entry,
    identity: Option<Arc<str>>,
    sni: Option<Arc<str>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(snap) = ctx.proxy.config.load() else {
        return;
    };
    let proxy = &ctx.proxy;
    let destination = match entry {
        Entry::Inbound(orig) => Some(orig),
        Entry::Gateway(port) => Some(SocketAddr::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            port,
        )),
        Entry::Outbound(_) | Entry::Explicit => None,
    };
    if let Some(destination) = destination
        && !snap.authz.is_empty()
    {
        let decision = snap.authz.decide(&crate::authz::Attrs {
            source: peer,
            remote_ip: peer.ip(),
            destination,
            principal: identity.as_deref(),
            sni: sni.as_deref(),
            http: None,
        });
        if let Some(p) = &decision.audited_by {
            proxy.metrics.authz("audited", p);
        }
        if let Some(p) = &decision.denied_by {
            // A denied connection is closed before anything is forwarded.
            proxy.metrics.authz("denied", p);
            tracing::debug!(%peer, policy = %p, "connection denied");
            return;
        }
    }
    let (cluster, reporter) = match entry {
        Entry::Outbound(orig) => {
            let routed = snap
                .by_addr
                .get(&orig)
                .and_then(|d| crate::tcp::pick_tcp(&d.tcp, orig.port()));
            match (routed, snap.outbound_policy) {
                (Some(c), _) => (c, Reporter::Source),
                (None, mesh_api::model::OutboundPolicy::AllowAny) => (
                    Arc::new(crate::cluster::Cluster::passthrough(orig, &proxy.registry)),
                    Reporter::Source,
                ),
                (None, mesh_api::model::OutboundPolicy::RegistryOnly) => return,
            }
        }
        Entry::Inbound(orig) => match snap.inbound.get(&orig.port()) {
            Some(p) => (p.cluster.clone(), Reporter::Destination),
            None => (
                Arc::new(crate::cluster::Cluster::passthrough(
                    SocketAddr::new(snap.app_ip, orig.port()),
                    &proxy.registry,
                )),
                Reporter::Destination,
            ),
        },
        Entry::Gateway(port) => match snap
            .gateways
            .get(&port)
            .and_then(|g| crate::tcp::pick_tcp(&g.tcp, port))
        {
            Some(c) => (c, Reporter::Source),
            None => return,
        },
        Entry::Explicit => return,
    };
    // TCP has no graceful close: a drain waits for these connections up to
    // its deadline, then the process exits.
    crate::tcp::forward(proxy, &snap, stream, peer, cluster, reporter, identity).await;
}

/// Serves a hyper connection until it ends, or until shutdown, when it is
/// asked to finish gracefully (GOAWAY, or close after the response).
macro_rules! serve_until_shutdown {
    ($conn:expr, $shutdown:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = $shutdown.wait_for(|s| *s) => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }};
}

async fn serve_http<S>(
    ctx: &Ctx,
    stream: S,
    entry: Entry,
    peer: SocketAddr,
    h2: bool,
    peer_identity: Option<Arc<str>>,
    sni: Option<Arc<str>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let framing = (!h2).then(|| Arc::new(crate::framing::Verdicts::default()));
    let info = Arc::new(ConnInfo {
        entry,
        peer,
        framing: framing.clone(),
        peer_identity,
        sni,
    });
    let proxy = ctx.proxy.clone();
    let svc = service_fn(move |req| crate::http::serve(proxy.clone(), info.clone(), req));
    let mut shutdown = ctx.shutdown.clone();
    if h2 {
        let io = TokioIo::new(stream);
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(ctx.settings.max_concurrent_streams)
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .max_pending_accept_reset_streams(50)
            .max_local_error_reset_streams(1024)
            .keep_alive_interval(Duration::from_secs(60))
            .serve_connection(io, svc);
        serve_until_shutdown!(conn, shutdown);
    } else {
        let io = TokioIo::new(crate::framing::Inspector::new(
            stream,
            framing.unwrap_or_default(),
        ));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(ctx.settings.header_read_timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .serve_connection(io, svc)
            .with_upgrades();
        serve_until_shutdown!(conn, shutdown);
    }
}

/// Gateway ports come and go with the config: binds new ones, closes
/// removed ones (their open connections finish).
pub struct GatewayPorts {
    bind: IpAddr,
    ctx: Ctx,
    bound: std::sync::Mutex<HashMap<u16, (SocketAddr, JoinHandle<()>)>>,
}

impl GatewayPorts {
    pub fn new(bind: IpAddr, ctx: Ctx) -> GatewayPorts {
        GatewayPorts {
            bind,
            ctx,
            bound: Default::default(),
        }
    }

    /// Brings the bound ports in line with the current config.
    pub async fn reconcile(&self) {
        let Some(snap) = self.ctx.proxy.config.load() else {
            return;
        };
        let wanted: Vec<u16> = snap.gateways.keys().copied().collect();
        let missing: Vec<u16> = {
            let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
            bound.retain(|port, (_, task)| {
                let keep = wanted.contains(port);
                if !keep {
                    task.abort();
                }
                keep
            });
            wanted
                .iter()
                .copied()
                .filter(|p| !bound.contains_key(p))
                .collect()
        };
        for port in missing {
            match TcpListener::bind(SocketAddr::new(self.bind, port)).await {
                Ok(l) => {
                    let addr = l
                        .local_addr()
                        .unwrap_or_else(|_| SocketAddr::new(self.bind, port));
                    tracing::info!(%addr, "gateway listening");
                    let task = tokio::spawn(accept_loop(self.ctx.clone(), l, Kind::Gateway(port)));
                    self.bound
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(port, (addr, task));
                }
                Err(e) => tracing::error!(port, error = %e, "cannot listen on gateway port"),
            }
        }
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(a, _)| *a)
            .collect()
    }
}

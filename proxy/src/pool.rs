//! Upstream connections, pooled per endpoint.
//!
//! HTTP/1.1: idle connections are reused; a cluster opens at most
//! `maxConnections`, and requests that find none free wait as pending, at
//! most `http1MaxPendingRequests` of them (beyond that: 503, circuit open).
//! A connection serves at most `maxRequestsPerConnection` requests.
//! HTTP/2: one multiplexed connection per endpoint, replaced when it closes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::body::Body;
use crate::cluster::{Cluster, ClusterState, EndpointState};
use crate::reason::Reason;
use crate::tls::{Inner, Io, MeshTls};

#[derive(Default)]
pub struct EndpointPool {
    idle: std::sync::Mutex<Vec<IdleConn>>,
    h2: tokio::sync::Mutex<Option<H2Conn>>,
}

struct IdleConn {
    sender: http1::SendRequest<Body>,
    uses: u32,
    since: Instant,
}

struct H2Conn {
    sender: http2::SendRequest<Body>,
    uses: u32,
}

/// A connection checked out for one request.
pub enum Conn {
    H1(H1Conn),
    H2(http2::SendRequest<Body>),
}

/// An HTTP/1 connection in use; goes back to its endpoint's pool with
/// [`H1Conn::release`] once the response has been read to the end.
pub struct H1Conn {
    pub sender: http1::SendRequest<Body>,
    uses: u32,
    endpoint: Arc<EndpointState>,
    cluster: Arc<ClusterState>,
    max_uses: u32,
}

impl H1Conn {
    /// Returns the connection to the pool (if it may serve more requests).
    pub fn release(self) {
        if self.uses < self.max_uses && !self.sender.is_closed() {
            let mut idle = self
                .endpoint
                .pool
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            idle.push(IdleConn {
                sender: self.sender,
                uses: self.uses,
                since: Instant::now(),
            });
        }
        // Either way a waiting request may now proceed.
        self.cluster.conn_freed.notify_one();
    }
}

/// Checks out a connection to endpoint `idx` of `cluster`, waiting until
/// `deadline` for one to free up when the cluster is at its limit.
pub async fn checkout(
    mesh: &MeshTls,
    cluster: &Cluster,
    idx: usize,
    h2: bool,
    deadline: Instant,
) -> Result<Conn, Reason> {
    let ep = &cluster.endpoints[idx];
    if h2 {
        return checkout_h2(mesh, cluster, ep, deadline).await;
    }
    let state = &cluster.state;
    let limits = &cluster.limits;
    let reuse = |c: IdleConn| {
        Conn::H1(H1Conn {
            sender: c.sender,
            uses: c.uses + 1,
            endpoint: ep.clone(),
            cluster: state.clone(),
            max_uses: limits.max_requests_per_connection,
        })
    };
    let mut pending = false;
    let result = loop {
        if let Some(c) = take_idle(ep, limits.idle_timeout) {
            break Ok(reuse(c));
        }
        if state.connections.fetch_add(1, Ordering::AcqRel) < limits.max_connections {
            break connect_h1(mesh, cluster, ep, deadline).await.map(|sender| {
                Conn::H1(H1Conn {
                    sender,
                    uses: 1,
                    endpoint: ep.clone(),
                    cluster: state.clone(),
                    max_uses: limits.max_requests_per_connection,
                })
            });
        }
        state.connections.fetch_sub(1, Ordering::AcqRel);
        // At the connection limit: wait as a pending request, if there is room.
        if !pending {
            if state.pending.fetch_add(1, Ordering::AcqRel) >= limits.max_pending {
                state.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(Reason::CircuitOpen);
            }
            pending = true;
        }
        let notified = state.conn_freed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Closing an idle connection to another endpoint makes room; its
        // task ends and notifies.
        close_idle_elsewhere(cluster, idx);
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, notified).await.is_err() {
            break Err(Reason::CircuitOpen);
        }
    };
    if pending {
        state.pending.fetch_sub(1, Ordering::AcqRel);
    }
    result
}

fn take_idle(ep: &EndpointState, idle_timeout: Duration) -> Option<IdleConn> {
    let mut idle = ep.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
    while let Some(c) = idle.pop() {
        if c.sender.is_closed() || c.since.elapsed() > idle_timeout {
            continue; // dropped: the connection task ends
        }
        if c.sender.is_ready() {
            return Some(c);
        }
    }
    None
}

fn close_idle_elsewhere(cluster: &Cluster, except: usize) -> bool {
    for (i, ep) in cluster.endpoints.iter().enumerate() {
        if i == except {
            continue;
        }
        let mut idle = ep.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.pop().is_some() {
            return true;
        }
    }
    false
}

/// Connects to `ep` within the connect timeout (and the request's
/// deadline), with TLS when the endpoint needs it.
pub async fn connect(
    mesh: &MeshTls,
    cluster: &Cluster,
    ep: &EndpointState,
    inner: Inner,
    deadline: Instant,
) -> Result<Io, Reason> {
    let timeout = cluster
        .limits
        .connect_timeout
        .min(deadline.saturating_duration_since(Instant::now()));
    let connect = async {
        let s = TcpStream::connect(ep.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        ep.tls.wrap(mesh, s, inner).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(io)) => Ok(io),
        Ok(Err(e)) => {
            tracing::debug!(endpoint = %ep.addr, error = %e, "connect failed");
            Err(Reason::ConnectFailure)
        }
        Err(_) => Err(Reason::ConnectFailure),
    }
}

/// Opens an HTTP/1 connection; `connections` was already counted and is
/// released when the connection ends.
async fn connect_h1(
    mesh: &MeshTls,
    cluster: &Cluster,
    ep: &EndpointState,
    deadline: Instant,
) -> Result<http1::SendRequest<Body>, Reason> {
    let state = cluster.state.clone();
    let release = move || {
        state.connections.fetch_sub(1, Ordering::AcqRel);
        state.conn_freed.notify_one();
    };
    let stream = match connect(mesh, cluster, ep, Inner::Http1, deadline).await {
        Ok(s) => s,
        Err(r) => {
            release();
            return Err(r);
        }
    };
    let handshake = http1::Builder::new()
        .max_buf_size(64 * 1024)
        .handshake::<_, Body>(TokioIo::new(stream))
        .await;
    match handshake {
        Ok((sender, conn)) => {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
                release();
            });
            Ok(sender)
        }
        Err(_) => {
            release();
            Err(Reason::ConnectFailure)
        }
    }
}

async fn checkout_h2(
    mesh: &MeshTls,
    cluster: &Cluster,
    ep: &Arc<EndpointState>,
    deadline: Instant,
) -> Result<Conn, Reason> {
    let mut slot = ep.pool.h2.lock().await;
    if let Some(c) = slot.as_mut()
        && !c.sender.is_closed()
        && c.uses < cluster.limits.max_requests_per_connection
    {
        c.uses += 1;
        return Ok(Conn::H2(c.sender.clone()));
    }
    *slot = None;
    let state = &cluster.state;
    if state.connections.fetch_add(1, Ordering::AcqRel) >= cluster.limits.max_connections {
        state.connections.fetch_sub(1, Ordering::AcqRel);
        return Err(Reason::CircuitOpen);
    }
    let stream = match connect(mesh, cluster, ep, Inner::Http2, deadline).await {
        Ok(s) => s,
        Err(r) => {
            state.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(r);
        }
    };
    let state = state.clone();
    match http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Body>(TokioIo::new(stream))
        .await
    {
        Ok((sender, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
                state.connections.fetch_sub(1, Ordering::AcqRel);
                state.conn_freed.notify_one();
            });
            *slot = Some(H2Conn {
                sender: sender.clone(),
                uses: 1,
            });
            Ok(Conn::H2(sender))
        }
        Err(_) => {
            state.connections.fetch_sub(1, Ordering::AcqRel);
            Err(Reason::ConnectFailure)
        }
    }
}

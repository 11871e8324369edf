//! Raw TCP forwarding (and explicit-mode CONNECT tunnels), with Istio's TCP
//! metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::Proxy;
use crate::body::Body;
use crate::cluster::{Cluster, Outcome};
use crate::http::ConnInfo;
use crate::metrics::{Peer, Reporter, TcpLabels};
use crate::reason::{REASON_HEADER, Reason};
use crate::state::{Snapshot, split_authority};
use crate::tls::Inner;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Picks a cluster from weighted TCP routes for `port`.
pub fn pick_tcp(routes: &crate::state::TcpRoutes, port: u16) -> Option<Arc<Cluster>> {
    let (_, clusters) = routes.iter().find(|(p, _)| p.is_none_or(|p| p == port))?;
    let total: u32 = clusters.iter().map(|(_, w)| *w).sum();
    if clusters.len() > 1 && total > 0 {
        let mut r = fastrand::u32(..total);
        for (c, w) in clusters {
            if r < *w {
                return Some(c.clone());
            }
            r -= *w;
        }
    }
    clusters.first().map(|(c, _)| c.clone())
}

/// Proxies `client` to an endpoint of `cluster` until either side closes.
pub async fn forward<S>(
    proxy: &Arc<Proxy>,
    snap: &Snapshot,
    mut client: S,
    peer: SocketAddr,
    cluster: Arc<Cluster>,
    reporter: Reporter,
    peer_identity: Option<Arc<str>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hash = Some(crate::hashring::xxh64(peer.ip().to_string().as_bytes(), 0));
    let (source, destination) = match reporter {
        Reporter::Source => (Peer::from_workload(&snap.workload), Peer::unknown()),
        Reporter::Destination => (
            Peer::from_identity(peer_identity.as_ref()),
            Peer::from_workload(&snap.workload),
        ),
    };
    let mut labels = TcpLabels {
        reporter,
        source,
        destination,
        destination_service: cluster.service.clone(),
        response_flags: "-",
        mtls: peer_identity.is_some(),
    };
    let mut tried = Vec::new();
    // One retry on connect failure, to another endpoint when there is one.
    for _ in 0..2 {
        let now = Instant::now();
        let Some(idx) = cluster.pick(hash, &tried, now) else {
            labels.response_flags = Reason::NoHealthyUpstream.response_flag();
            let h = proxy.metrics.tcp(&labels);
            h.opened.increment(1);
            h.closed.increment(1);
            return;
        };
        tried.push(idx);
        if reporter == Reporter::Source
            && let Some(m) = cluster.endpoint_meta.get(idx)
        {
            labels.destination = Peer::from_endpoint(m);
        }
        let state = &cluster.state;
        if state.connections.fetch_add(1, Ordering::AcqRel) >= cluster.limits.max_connections {
            state.connections.fetch_sub(1, Ordering::AcqRel);
            labels.response_flags = Reason::CircuitOpen.response_flag();
            let h = proxy.metrics.tcp(&labels);
            h.opened.increment(1);
            h.closed.increment(1);
            return;
        }
        let deadline = Instant::now() + cluster.limits.connect_timeout;
        let ep = &cluster.endpoints[idx];
        let mut upstream =
            match crate::pool::connect(&proxy.tls, &cluster, ep, Inner::Tcp, deadline).await {
                Ok(s) => s,
                Err(_) => {
                    state.connections.fetch_sub(1, Ordering::AcqRel);
                    cluster.record(idx, Outcome::LocalFailure, Instant::now());
                    continue;
                }
            };
        labels.mtls |= matches!(upstream, crate::tls::Io::Tls(_));
        let h = proxy.metrics.tcp(&labels);
        h.opened.increment(1);
        let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        state.connections.fetch_sub(1, Ordering::AcqRel);
        if let Ok((sent_up, sent_down)) = result {
            // Istio's names are from the proxy's view: received from the
            // client, sent to it.
            h.received.increment(sent_up);
            h.sent.increment(sent_down);
        }
        h.closed.increment(1);
        return;
    }
    labels.response_flags = Reason::ConnectFailure.response_flag();
    let h = proxy.metrics.tcp(&labels);
    h.opened.increment(1);
    h.closed.increment(1);
}

/// Explicit mode: `CONNECT host:port` opens a tunnel, routed like TCP to
/// that destination when the mesh knows it, else straight to it.
pub async fn connect_tunnel(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let refuse = |reason: Reason| {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = if reason == Reason::NoRoute {
            StatusCode::BAD_GATEWAY
        } else {
            reason.status()
        };
        r.headers_mut().insert(REASON_HEADER, reason.header_value());
        r
    };
    let Some(snap) = proxy.config.load() else {
        return refuse(Reason::NoConfig);
    };
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_string()) else {
        return refuse(Reason::BadRequest);
    };
    let (host, port) = split_authority(&authority, 443);
    let cluster = match snap
        .destination(&authority, 443)
        .and_then(|d| pick_tcp(&d.tcp, port))
    {
        Some(c) => c,
        None => {
            let lookup = tokio::net::lookup_host((host, port));
            let addr = match tokio::time::timeout(std::time::Duration::from_secs(5), lookup).await {
                Ok(Ok(mut addrs)) => addrs.next(),
                _ => None,
            };
            match (addr, snap.outbound_policy) {
                (Some(a), mesh_api::model::OutboundPolicy::AllowAny) => {
                    Arc::new(Cluster::passthrough(a, &proxy.registry))
                }
                _ => return refuse(Reason::NoRoute),
            }
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let peer = conn.peer;
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            forward(
                &proxy,
                &snap,
                TokioIo::new(upgraded),
                peer,
                cluster,
                Reporter::Source,
                None,
            )
            .await;
        }
    });
    Response::new(Body::empty())
}

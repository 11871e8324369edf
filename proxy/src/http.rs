//! The HTTP request path.
//!
//! ```text
//! request ─▶ find destination ─▶ match route ─▶ CORS preflight? ─▶ fault? ─▶ redirect / direct response?
//!                                                     └─▶ forward: pick cluster (weights) ─▶ pick endpoint (LB, outliers)
//!                                                          ─▶ pool limits ─▶ send (per-try timeout) ─▶ retry? ─▶ response
//! ```
//!
//! Failures are classified once into a [`Reason`], which becomes the
//! response's status and `x-mesh-reason` header.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::{Body, OnEnd};
use crate::cluster::{Cluster, ClusterState, EndpointState, HashKey, Outcome};
use crate::framing::Verdict;
use crate::metrics::{PEER_HEADER, Peer, Reporter, RequestLabels};
use crate::pool::{self, Conn};
use crate::reason::{REASON_HEADER, Reason};
use crate::routing::RequestView;
use crate::state::{
    Abort, Action, Backend, Destination, Route, Snapshot, UriRewrite, split_authority,
};
use crate::telemetry;
use crate::{Proxy, ratelimit};
use mesh_api::model::OutboundPolicy;

/// Bodies up to this size are buffered so a request can be retried or
/// mirrored; larger ones stream and get one attempt.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// How a connection reached the proxy.
#[derive(Clone, Copy, Debug)]
pub enum Entry {
    /// Captured outbound traffic; the original destination.
    Outbound(SocketAddr),
    /// An application using the proxy as its HTTP proxy.
    Explicit,
    /// Captured inbound traffic for the workload; the original destination.
    Inbound(SocketAddr),
    /// A gateway listener port.
    Gateway(u16),
}

pub struct ConnInfo {
    pub entry: Entry,
    pub peer: SocketAddr,
    /// HTTP/1: framing verdicts on the client's request heads, in order.
    pub framing: Option<Arc<crate::framing::Verdicts>>,
    /// Set for mTLS connections (the peer's SPIFFE ID).
    pub peer_identity: Option<Arc<str>>,
    /// The server name an mTLS client asked for.
    pub sni: Option<Arc<str>>,
}

/// What a request targets once its destination is known.
enum Target<'a> {
    Routes {
        routes: &'a [Route],
        service: Arc<str>,
        port: u16,
    },
    /// A single cluster, no routes (inbound, passthrough).
    Cluster(Arc<Cluster>, Arc<str>),
}

fn generated(reason: Reason) -> Response<Body> {
    let mut resp = Response::new(Body::full(format!("{}\n", reason.as_str())));
    *resp.status_mut() = reason.status();
    let h = resp.headers_mut();
    h.insert(REASON_HEADER, reason.header_value());
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp.extensions_mut().insert(reason);
    resp
}

fn grpc_generated(reason: Reason, code: u32) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(reason.as_str()));
    h.insert(REASON_HEADER, reason.header_value());
    resp.extensions_mut().insert(reason);
    resp
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Rejects what must never reach an upstream (RFC 9112 §6.3: a message with
/// both Content-Length and Transfer-Encoding, or conflicting lengths).
fn malformed(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return true;
    }
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        if lengths.any(|v| v != first) {
            return true;
        }
        if first
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_none()
        {
            return true;
        }
    }
    false
}

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Serves one request; never fails (errors become responses).
pub async fn serve(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Taken for every request, so verdicts stay in step with requests.
    match conn.framing.as_ref().map(|v| v.next()) {
        Some(Verdict::Ambiguous) => {
            let mut resp = generated(Reason::BadRequest);
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        Some(Verdict::Fragment) => {
            return Ok(bad_request("fragment in the request target"));
        }
        Some(Verdict::Fine) | None => {}
    }
    if req.method() == Method::CONNECT {
        return Ok(crate::tcp::connect_tunnel(proxy, conn, req).await);
    }
    if malformed(&req) {
        return Ok(generated(Reason::BadRequest));
    }
    let Some(snap) = proxy.config.load() else {
        return Ok(generated(Reason::NoConfig));
    };
    let mut req = req;
    if !matches!(conn.entry, Entry::Outbound(_)) {
        client_cert_header(&snap, &conn, req.headers_mut());
    }
    let pending = proxy.telemetry.begin(
        &mut req,
        match conn.entry {
            Entry::Inbound(_) => telemetry::Kind::Server,
            _ => telemetry::Kind::Client,
        },
        &snap.workload.service_name,
        conn.peer,
        conn.peer_identity.as_ref(),
    );
    if let Err(mut refused) = admit(&proxy, &snap, &conn, &mut req).await {
        if let Some(p) = pending {
            telemetry::finish_with(p, &mut refused);
        }
        return Ok(refused);
    }
    let start = Instant::now();
    let mut resp = handle(&proxy, &snap, &conn, req, start, true).await;
    if let Some(p) = pending {
        telemetry::finish_with(p, &mut resp);
    }
    if proxy.draining.load(Ordering::Relaxed) && resp.version() != Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

fn bad_request(why: &str) -> Response<Body> {
    let mut resp = generated(Reason::BadRequest);
    *resp.body_mut() = Body::full(format!("{}: {why}\n", Reason::BadRequest.as_str()));
    resp
}

/// Requests for the workload (inbound) or entering at a gateway: the
/// method and path checks, then RequestAuthentication, then the
/// AuthorizationPolicies. The request goes on with its normalized path,
/// so what was decided is what the app receives.
async fn admit(
    proxy: &Proxy,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: &mut Request<Incoming>,
) -> Result<(), Response<Body>> {
    let destination = match conn.entry {
        Entry::Inbound(orig) => orig,
        Entry::Gateway(port) => SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
        Entry::Outbound(_) | Entry::Explicit => return Ok(()),
    };
    // Methods are case-sensitive and the standard ones upper-case: `get`
    // would slip past a policy on GET yet be GET to many apps.
    if req
        .method()
        .as_str()
        .bytes()
        .any(|b| b.is_ascii_lowercase())
    {
        return Err(bad_request("the method must be upper-case"));
    }
    match crate::authz::normalize_path(req.uri().path()) {
        Err(e) => return Err(bad_request(e.as_str())),
        Ok(std::borrow::Cow::Owned(path)) => {
            let pq = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(
                pq.parse()
                    .map_err(|_| bad_request("invalid normalized path"))?,
            );
            *req.uri_mut() =
                Uri::from_parts(parts).map_err(|_| bad_request("invalid normalized path"))?;
        }
        Ok(std::borrow::Cow::Borrowed(_)) => {}
    }
    let claims = if snap.authn.is_empty() {
        None
    } else {
        let query = req.uri().query().map(str::to_owned);
        match snap
            .authn
            .authenticate(req.headers_mut(), query.as_deref())
            .await
        {
            Ok(c) => c,
            Err(why) => {
                proxy.metrics.authz("unauthenticated", why.as_str());
                let mut resp = if is_grpc(req.headers()) {
                    grpc_generated(Reason::Unauthenticated, 16)
                } else {
                    let mut r = generated(Reason::Unauthenticated);
                    *r.body_mut() = Body::full(format!("{}\n", why.as_str()));
                    r
                };
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                return Err(resp);
            }
        }
    };
    if snap.authz.is_empty() {
        return Ok(());
    }
    let (host, _) = split_authority(authority_of(req).unwrap_or(""), destination.port());
    let remote_ip = match conn.entry {
        Entry::Inbound(_) => last_forwarded_for(req.headers()).unwrap_or(conn.peer.ip()),
        _ => conn.peer.ip(),
    };
    let decision = snap.authz.decide(&crate::authz::Attrs {
        source: conn.peer,
        remote_ip,
        destination,
        principal: conn.peer_identity.as_deref(),
        sni: conn.sni.as_deref(),
        http: Some(crate::authz::HttpAttrs {
            host,
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
            auth: claims.as_ref(),
        }),
    });
    if let Some(p) = &decision.audited_by {
        proxy.metrics.authz("audited", p);
    }
    if let Some(p) = &decision.denied_by {
        proxy.metrics.authz("denied", p);
        tracing::debug!(policy = %p, path = req.uri().path(), "request denied");
        let mut resp = if is_grpc(req.headers()) {
            grpc_generated(Reason::Denied, 7)
        } else {
            generated(Reason::Denied)
        };
        resp.extensions_mut().insert(telemetry::DeniedBy(p.clone()));
        return Err(resp);
    }
    Ok(())
}

/// The last address in `x-forwarded-for`: the client as the hop before
/// this sidecar saw it.
fn last_forwarded_for(headers: &HeaderMap) -> Option<std::net::IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    last.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
}

/// `x-forwarded-client-cert` (Envoy's format) from the verified mTLS peer:
/// `By=<this workload>;URI=<the client>`. What a client sent in it is
/// dropped: only the sidecar vouches for an identity.
pub const XFCC: &str = "x-forwarded-client-cert";

fn client_cert_header(snap: &Snapshot, conn: &ConnInfo, headers: &mut http::HeaderMap) {
    headers.remove(XFCC);
    if let (Some(peer), Entry::Inbound(_)) = (&conn.peer_identity, conn.entry)
        && let Ok(v) = HeaderValue::from_str(&format!("By={};URI={peer}", snap.workload.principal))
    {
        headers.insert(XFCC, v);
    }
}

/// On a destination miss with pilot configured: asks pilot for it (once per
/// name; the request waits, bounded, for the answer) and returns the new
/// snapshot to route with. `None` when there is nothing new to try.
async fn demand(
    proxy: &Arc<Proxy>,
    authority: &str,
    default_port: u16,
    orig: Option<SocketAddr>,
) -> Option<Arc<Snapshot>> {
    let xds = proxy.xds.get()?;
    let mut names = Vec::with_capacity(2);
    if !authority.is_empty() {
        let (host, port) = split_authority(authority, default_port);
        names.push(format!("{}:{port}", host.to_ascii_lowercase()));
    }
    if let Some(o) = orig {
        names.push(o.to_string());
    }
    if names.is_empty() || names.iter().all(|n| xds.answered(n)) {
        return None;
    }
    xds.demand(&names).await;
    if !names.iter().any(|n| xds.answered(n)) {
        return None;
    }
    proxy.config.load()
}

fn authority_of(req: &Request<Incoming>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

async fn handle(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    conn: &Arc<ConnInfo>,
    req: Request<Incoming>,
    start: Instant,
    may_demand: bool,
) -> Response<Body> {
    // Owned only when needed after `req` moves on (gateway host matching).
    let authority: &str = authority_of(&req).unwrap_or("");
    let (reporter, target) = match conn.entry {
        Entry::Outbound(orig) => {
            let dest = snap
                .destination(authority, orig.port())
                .or_else(|| snap.by_addr.get(&orig));
            if dest.is_none()
                && may_demand
                && let Some(fresh) = demand(proxy, authority, orig.port(), Some(orig)).await
            {
                return Box::pin(handle(proxy, &fresh, conn, req, start, false)).await;
            }
            match (dest, snap.outbound_policy) {
                (Some(d), _) => routes_of(d),
                (None, OutboundPolicy::AllowAny) => passthrough(proxy, orig),
                (None, OutboundPolicy::RegistryOnly) => return generated(Reason::NoRoute),
            }
        }
        Entry::Explicit => {
            let default_port = if req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
                443
            } else {
                80
            };
            let dest = snap.destination(authority, default_port);
            if dest.is_none()
                && may_demand
                && let Some(fresh) = demand(proxy, authority, default_port, None).await
            {
                return Box::pin(handle(proxy, &fresh, conn, req, start, false)).await;
            }
            match dest {
                Some(d) => routes_of(d),
                None => match (snap.outbound_policy, resolve(authority, default_port).await) {
                    (OutboundPolicy::AllowAny, Some(addr)) => passthrough(proxy, addr),
                    _ => return generated(Reason::NoRoute),
                },
            }
        }
        Entry::Inbound(orig) => match snap.inbound.get(&orig.port()) {
            Some(p) => {
                if let Some(limited) = rate_limit(snap, conn, orig.port(), &req) {
                    return limited;
                }
                (
                    Reporter::Destination,
                    Target::Cluster(p.cluster.clone(), p.service.clone()),
                )
            }
            None => {
                let addr = SocketAddr::new(snap.app_ip, orig.port());
                (
                    Reporter::Destination,
                    Target::Cluster(
                        Arc::new(Cluster::passthrough(addr, &proxy.registry)),
                        "InboundPassthroughCluster".into(),
                    ),
                )
            }
        },
        Entry::Gateway(port) => {
            let Some(gw) = snap.gateways.get(&port) else {
                return generated(Reason::NoRoute);
            };
            let (host, _) = split_authority(authority, port);
            // host_covers compares without regard to case.
            match gw.vhosts.iter().find(|vh| {
                vh.hosts
                    .iter()
                    .any(|h| mesh_api::validate::host_covers(h, host))
            }) {
                Some(vh) => (
                    Reporter::Source,
                    Target::Routes {
                        routes: &vh.routes,
                        service: vh.name.clone(),
                        port,
                    },
                ),
                None => return generated(Reason::NoRoute),
            }
        }
    };
    match target {
        Target::Cluster(cluster, service) => {
            let plan = Plan {
                route: None,
                service,
            };
            forward(proxy, snap, conn, req, cluster, plan, reporter, start).await
        }
        Target::Routes {
            routes,
            service,
            port,
        } => {
            let (route, match_idx) = {
                let view = RequestView {
                    method: req.method().as_str(),
                    path: req.uri().path(),
                    query: req.uri().query(),
                    scheme: req.uri().scheme_str().unwrap_or("http"),
                    authority,
                    port,
                    headers: req.headers(),
                };
                let found = routes.iter().find_map(|r| {
                    if r.matches.is_empty() {
                        Some((r, None))
                    } else {
                        r.matches
                            .iter()
                            .position(|m| m.matches(&view))
                            .map(|i| (r, Some(i)))
                    }
                });
                match found {
                    Some(f) => f,
                    None => return generated(Reason::NoRoute),
                }
            };
            routed(
                proxy, snap, conn, req, route, match_idx, service, reporter, start,
            )
            .await
        }
    }
}

fn routes_of(d: &Arc<Destination>) -> (Reporter, Target<'_>) {
    (
        Reporter::Source,
        Target::Routes {
            routes: &d.routes,
            service: d.host.clone(),
            port: d.port,
        },
    )
}

/// Outbound traffic to a destination the mesh does not know: straight to
/// the address it was for.
fn passthrough(proxy: &Proxy, addr: SocketAddr) -> (Reporter, Target<'static>) {
    (
        Reporter::Source,
        Target::Cluster(
            Arc::new(Cluster::passthrough(addr, &proxy.registry)),
            "PassthroughCluster".into(),
        ),
    )
}

async fn resolve(authority: &str, default_port: u16) -> Option<SocketAddr> {
    let (host, port) = split_authority(authority, default_port);
    if host.is_empty() {
        return None;
    }
    let lookup = tokio::net::lookup_host((host, port));
    tokio::time::timeout(Duration::from_secs(5), lookup)
        .await
        .ok()?
        .ok()?
        .next()
}

fn rate_limit(
    snap: &Snapshot,
    conn: &ConnInfo,
    port: u16,
    req: &Request<Incoming>,
) -> Option<Response<Body>> {
    if snap.rate_limiters.is_empty() {
        return None;
    }
    let ip;
    let identity: &str = match &conn.peer_identity {
        Some(id) => id,
        None => {
            ip = conn.peer.ip().to_string();
            &ip
        }
    };
    let now = Instant::now();
    for (ports, limiter) in &snap.rate_limiters {
        if !ports.is_empty() && !ports.contains(&port) {
            continue;
        }
        if let ratelimit::Decision::Limited { retry_after, .. } =
            limiter.check(identity, req.method().as_str(), req.uri().path(), now)
        {
            let mut resp = generated(Reason::RateLimited);
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            return Some(resp);
        }
        return None;
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn routed(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    conn: &Arc<ConnInfo>,
    mut req: Request<Incoming>,
    route: &Route,
    match_idx: Option<usize>,
    service: Arc<str>,
    reporter: Reporter,
    start: Instant,
) -> Response<Body> {
    if let Some(cors) = &route.cors
        && let Some(resp) = crate::cors::preflight(cors, &req)
    {
        return resp;
    }
    let origin = route
        .cors
        .as_ref()
        .and_then(|_| req.headers().get(header::ORIGIN).cloned());
    if let Some(fault) = &route.fault {
        if let Some((delay, frac)) = fault.delay
            && hit(frac)
        {
            tokio::time::sleep(delay).await;
        }
        if let Some((abort, frac)) = fault.abort
            && hit(frac)
        {
            return match abort {
                Abort::Http(status) => {
                    let mut resp = generated(Reason::FaultInjected);
                    *resp.status_mut() =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    resp
                }
                Abort::Grpc(code) => grpc_generated(Reason::FaultInjected, code),
            };
        }
    }
    match &route.action {
        Action::Redirect(rd) => redirect(rd, &req),
        Action::Direct { status, body } => {
            let mut resp = Response::new(Body::full(body.clone()));
            *resp.status_mut() = *status;
            route.response_ops.apply(resp.headers_mut());
            resp
        }
        Action::Forward {
            clusters,
            total_weight,
        } => {
            let backend = pick_backend(clusters, *total_weight);
            rewrite(route, match_idx, &mut req);
            route.request_ops.apply(req.headers_mut());
            backend.request_ops.apply(req.headers_mut());
            let plan = Plan {
                route: Some(route),
                service,
            };
            let mut resp = forward(
                proxy,
                snap,
                conn,
                req,
                backend.cluster.clone(),
                plan,
                reporter,
                start,
            )
            .await;
            if !resp.headers().contains_key(REASON_HEADER) {
                backend.response_ops.apply(resp.headers_mut());
                route.response_ops.apply(resp.headers_mut());
            }
            if let Some(cors) = &route.cors {
                crate::cors::decorate(cors, origin.as_ref(), resp.headers_mut());
            }
            resp
        }
    }
}

fn hit(fraction: f64) -> bool {
    fraction >= 1.0 || (fraction > 0.0 && fastrand::f64() < fraction)
}

fn pick_backend(clusters: &[Backend], total: u32) -> &Backend {
    if clusters.len() > 1 && total > 0 {
        let mut r = fastrand::u32(..total);
        for b in clusters {
            if r < b.weight {
                return b;
            }
            r -= b.weight;
        }
    }
    &clusters[0]
}

fn redirect(rd: &mesh_api::networking::HttpRedirect, req: &Request<Incoming>) -> Response<Body> {
    let scheme = rd
        .scheme
        .clone()
        .unwrap_or_else(|| req.uri().scheme_str().unwrap_or("http").to_string());
    let current = authority_of(req).unwrap_or("");
    let (cur_host, cur_port) = split_authority(current, 0);
    let host = rd.authority.clone().unwrap_or_else(|| cur_host.to_string());
    let port = match (rd.port, rd.derive_port) {
        (Some(p), _) => Some(p as u16),
        (None, Some(mesh_api::networking::RedirectPortSelection::FromRequestPort)) => {
            (cur_port != 0).then_some(cur_port)
        }
        _ => None,
    };
    let path = rd.uri.clone().unwrap_or_else(|| {
        req.uri()
            .path_and_query()
            .map_or("/".to_string(), |pq| pq.as_str().to_string())
    });
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}"),
        None => format!("{scheme}://{host}{path}"),
    };
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = rd
        .redirect_code
        .and_then(|c| StatusCode::from_u16(c as u16).ok())
        .unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn rewrite(route: &Route, match_idx: Option<usize>, req: &mut Request<Incoming>) {
    if let Some(rw) = &route.uri_rewrite {
        let path = req.uri().path();
        let query = req.uri().query();
        let new_path = match rw {
            UriRewrite::Prefix(to) => {
                let prefix = match_idx
                    .and_then(|i| route.match_prefixes.get(i))
                    .and_then(|p| p.as_deref());
                match prefix {
                    Some(p) if path.starts_with(p) => format!("{to}{}", &path[p.len()..]),
                    _ => to.to_string(),
                }
            }
            UriRewrite::Regex(re, with) => re.replace_all(path, with.as_str()).into_owned(),
        };
        let pq = match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    if let Some(a) = &route.authority_rewrite {
        req.headers_mut().insert(header::HOST, a.clone());
        if req.uri().authority().is_some() {
            let mut parts = req.uri().clone().into_parts();
            if let Ok(auth) = a.to_str().unwrap_or("").parse() {
                parts.authority = Some(auth);
                if let Ok(uri) = Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
}

struct Plan<'a> {
    route: Option<&'a Route>,
    service: Arc<str>,
}

/// Decrements in-flight counts when a request's response is done.
struct InFlight {
    endpoint: Arc<EndpointState>,
    cluster: Arc<ClusterState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        self.cluster.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What happens when a forwarded response body ends.
struct ResponseEnd {
    pooled: Option<pool::H1Conn>,
    _in_flight: InFlight,
    metrics: Option<MetricsRecord>,
}

struct MetricsRecord {
    proxy: Arc<Proxy>,
    labels: RequestLabels,
    start: Instant,
    request_bytes: u64,
}

impl OnEnd for ResponseEnd {
    fn on_end(&mut self, bytes: u64, completed: bool) {
        if let Some(c) = self.pooled.take()
            && completed
        {
            c.release();
        }
        if let Some(m) = self.metrics.take() {
            m.proxy
                .metrics
                .request(&m.labels, m.start.elapsed(), m.request_bytes, bytes);
        }
    }
}

/// The request as sent upstream: a template each attempt copies.
struct Outgoing {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// `Some` when the body is buffered and can be sent again.
    replay: Option<Bytes>,
    replay_trailers: Option<HeaderMap>,
    /// A body too large to buffer: what was read of it, and the rest.
    streamed: Option<(Option<Bytes>, Incoming)>,
}

enum Read {
    Whole(Bytes, Option<HeaderMap>),
    Stream(Option<Bytes>, Incoming),
}

/// Reads a body of unknown length up to [`REPLAY_LIMIT`]: all of it, or
/// what was read and the rest. `Err` when the body is malformed.
async fn read_prefix(mut body: Incoming) -> Result<Read, ()> {
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(Read::Whole(buf.freeze(), None)),
            Some(Err(_)) => return Err(()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    buf.extend_from_slice(&d);
                    if buf.len() as u64 > REPLAY_LIMIT {
                        return Ok(Read::Stream(Some(buf.freeze()), body));
                    }
                }
                Err(frame) => {
                    // Trailers end the body.
                    return Ok(Read::Whole(buf.freeze(), frame.into_trailers().ok()));
                }
            },
        }
    }
}

impl Outgoing {
    fn build(&mut self, h2: bool, endpoint: SocketAddr) -> Request<Body> {
        let body = match (&self.replay, self.streamed.take()) {
            (Some(b), _) => Body::with_trailers(b.clone(), self.replay_trailers.clone()),
            (None, Some((Some(prefix), rest))) => Body::prefixed(prefix, rest),
            (None, Some((None, rest))) => Body::stream(rest),
            (None, None) => Body::empty(),
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.headers_mut() = self.headers.clone();
        if h2 {
            // HTTP/2 needs the scheme and authority in the URI.
            let authority = self
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| endpoint.to_string());
            let pq = self.uri.path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = format!("http://{authority}{pq}")
                .parse()
                .unwrap_or_else(|_| self.uri.clone());
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        } else {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = self.uri.path_and_query().cloned();
            *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
            *req.version_mut() = Version::HTTP_11;
        }
        req
    }
}

fn hash_of(key: &HashKey, headers: &HeaderMap, uri: &Uri, peer: SocketAddr) -> Option<u64> {
    let h = |b: &[u8]| crate::hashring::xxh64(b, 0);
    match key {
        HashKey::Header(name) => headers.get(name).map(|v| h(v.as_bytes())),
        HashKey::SourceIp => Some(h(peer.ip().to_string().as_bytes())),
        HashKey::Query(q) => crate::routing::query_param(uri.query(), q).map(|v| h(v.as_bytes())),
        HashKey::Cookie { name, .. } => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| h(v.as_bytes()))
            }),
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    conn: &Arc<ConnInfo>,
    mut req: Request<Incoming>,
    cluster: Arc<Cluster>,
    plan: Plan<'_>,
    reporter: Reporter,
    start: Instant,
) -> Response<Body> {
    let default_retry;
    let (timeout, retry) = match plan.route {
        Some(r) => (r.timeout, &r.retry),
        None => {
            default_retry = crate::state::RetryPolicy::istio_default();
            (None, &default_retry)
        }
    };
    let deadline = timeout.map(|t| start + t);
    let grpc = is_grpc(req.headers());
    let upgrade = wants_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let mirrors = plan.route.map_or(&[][..], |r| &r.mirrors[..]);
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, upgrade);
    if !headers.contains_key("x-request-id") {
        headers.insert("x-request-id", telemetry::request_id());
    }
    // Who is calling, for the server sidecar's metrics: announced to mesh
    // workloads only, taken (and removed) from mTLS callers.
    // (announced per attempt in `send`, to mTLS peers only).
    let caller = match reporter {
        Reporter::Source => {
            headers.remove(PEER_HEADER);
            None
        }
        Reporter::Destination => {
            let announced = headers.remove(PEER_HEADER);
            Some(
                proxy
                    .metrics
                    .caller(announced.as_ref(), conn.peer_identity.as_ref()),
            )
        }
    };
    if !headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        headers.insert(header::HOST, v);
    }
    let want_replay = !upgrade && (retry.attempts > 0 || !mirrors.is_empty());
    let len = body.size_hint().exact();
    let read = if body.is_end_stream() {
        Read::Whole(Bytes::new(), None)
    } else if len.is_some_and(|l| l > REPLAY_LIMIT) || (len.is_some() && !want_replay) || upgrade {
        // Known length, checked by the server already: stream it.
        Read::Stream(None, body)
    } else {
        // Unknown length (chunked, HTTP/2): read up to the limit before
        // connecting, so a malformed body never reaches the upstream.
        match read_prefix(body).await {
            Ok(r) => r,
            Err(()) => return generated(Reason::BadRequest),
        }
    };
    let (replay, replay_trailers, streamed, request_bytes) = match read {
        Read::Whole(b, t) => {
            let n = b.len() as u64;
            (Some(b), t, None, n)
        }
        Read::Stream(prefix, rest) => {
            let n = len.unwrap_or(0);
            (None, None, Some((prefix, rest)), n)
        }
    };
    let mut out = Outgoing {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers,
        replay,
        replay_trailers,
        streamed,
    };
    if let Some(body) = &out.replay {
        for (mcluster, frac) in mirrors {
            if hit(*frac) {
                mirror(proxy.tls.clone(), mcluster.clone(), &out, body.clone());
            }
        }
    }
    let h2 = match cluster.protocol {
        mesh_api::model::Protocol::Http2 | mesh_api::model::Protocol::Grpc => true,
        mesh_api::model::Protocol::Http => false,
        _ => out.version == Version::HTTP_2,
    };
    let mut set_cookie = None;
    let hash = match cluster.hash_key() {
        Some(k) => hash_of(k, &out.headers, &out.uri, conn.peer).or_else(|| {
            // Envoy's rule: a missing hash cookie with a ttl is generated,
            // and set on the response so the client sticks from now on.
            let HashKey::Cookie {
                name,
                ttl: Some(ttl),
                path,
            } = k
            else {
                return None;
            };
            let value = format!("{:016x}", fastrand::u64(..));
            let mut cookie = format!("{name}=\"{value}\"; Max-Age={}; HttpOnly", ttl.as_secs());
            if let Some(p) = path {
                cookie.push_str("; Path=");
                cookie.push_str(p);
            }
            set_cookie = HeaderValue::from_str(&cookie).ok();
            Some(crate::hashring::xxh64(format!("\"{value}\"").as_bytes(), 0))
        }),
        None => None,
    };
    let max_attempts = if out.replay.is_some() {
        retry.attempts + 1
    } else {
        1
    };
    // Endpoints tried so far (the first few; enough to steer retries).
    let mut tried = [usize::MAX; 4];
    let mut tried_len = 0usize;
    let mut attempt = 0u32;
    let mut retrying: Option<RetryGuard> = None;
    let labels_for =
        |idx: Option<usize>, code: u16, flag: &'static str, grpc_status: Option<u32>| {
            let (source, destination) = match reporter {
                Reporter::Source => (
                    Peer::from_workload(&snap.workload),
                    idx.and_then(|i| cluster.endpoint_meta.get(i))
                        .map_or_else(Peer::unknown, Peer::from_endpoint),
                ),
                Reporter::Destination => (
                    caller
                        .clone()
                        .unwrap_or_else(|| Peer::from_identity(conn.peer_identity.as_ref())),
                    Peer::from_workload(&snap.workload),
                ),
            };
            RequestLabels {
                reporter,
                source,
                destination,
                destination_service: if cluster.service.is_empty() {
                    plan.service.clone()
                } else {
                    cluster.service.clone()
                },
                protocol: if grpc { "grpc" } else { "http" },
                response_code: code,
                grpc_status,
                response_flags: flag,
                mtls: conn.peer_identity.is_some(),
            }
        };
    let fail = |idx: Option<usize>, reason: Reason| {
        let resp = if grpc {
            grpc_generated(reason, 14)
        } else {
            generated(reason)
        };
        proxy.metrics.request(
            &labels_for(
                idx,
                resp.status().as_u16(),
                reason.response_flag(),
                grpc.then_some(14),
            ),
            start.elapsed(),
            request_bytes,
            0,
        );
        resp
    };
    loop {
        attempt += 1;
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return fail(None, Reason::UpstreamTimeout);
        }
        let avoid: &[usize] = if retry.ignore_previous_hosts || cluster.endpoints.len() > 1 {
            &tried[..tried_len]
        } else {
            &[]
        };
        let Some(idx) = cluster.pick(hash, avoid, now) else {
            return fail(None, Reason::NoHealthyUpstream);
        };
        if tried_len < tried.len() {
            tried[tried_len] = idx;
            tried_len += 1;
        }
        let ep = cluster.endpoints[idx].clone();
        // Circuit breakers: concurrent requests, then retries.
        if cluster.state.active_requests.fetch_add(1, Ordering::AcqRel)
            >= cluster.limits.max_requests
        {
            cluster.state.active_requests.fetch_sub(1, Ordering::AcqRel);
            return fail(Some(idx), Reason::CircuitOpen);
        }
        ep.active.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight {
            endpoint: ep.clone(),
            cluster: cluster.state.clone(),
        };
        let try_deadline = match (retry.per_try_timeout, deadline) {
            (Some(p), Some(d)) => Some((now + p).min(d)),
            (Some(p), None) => Some(now + p),
            (None, d) => d,
        };
        let announce = match reporter {
            Reporter::Source => snap.workload.peer_header.as_ref(),
            Reporter::Destination => None,
        };
        let result = send(
            &proxy.tls,
            &cluster,
            idx,
            h2,
            &mut out,
            try_deadline,
            announce,
        )
        .await;
        let failure = match result {
            Ok((mut resp, pooled)) => {
                let status = resp.status().as_u16();
                let grpc_status = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u32>().ok());
                cluster.record(idx, Outcome::Status(status), Instant::now());
                let retriable = retry.on.status(status)
                    || grpc_status.is_some_and(|g| retry.on.grpc.contains(&g));
                if retriable && attempt < max_attempts {
                    drop(retrying.take());
                    if let Some(g) = RetryGuard::acquire(&cluster) {
                        retrying = Some(g);
                        drop(resp);
                        drop(in_flight);
                        backoff(retry, attempt, deadline).await;
                        continue;
                    }
                }
                let upgraded = status == 101 && upgrade;
                if upgraded {
                    splice_upgrade(downstream_upgrade, &mut resp);
                }
                let labels = labels_for(Some(idx), status, "-", grpc_status.or(grpc.then_some(0)));
                let (rparts, rbody) = resp.into_parts();
                let mut headers = rparts.headers;
                strip_hop_by_hop(&mut headers, upgraded);
                let end = ResponseEnd {
                    pooled,
                    _in_flight: in_flight,
                    metrics: Some(MetricsRecord {
                        proxy: proxy.clone(),
                        labels,
                        start,
                        request_bytes,
                    }),
                };
                if let Some(c) = set_cookie.take() {
                    headers.append(header::SET_COOKIE, c);
                }
                let mut resp = Response::new(Body::stream_with(rbody, Box::new(end)));
                *resp.status_mut() = rparts.status;
                *resp.headers_mut() = headers;
                if proxy.telemetry.is_on() {
                    resp.extensions_mut().insert(telemetry::Upstream {
                        host: Some(ep.addr),
                        cluster: Some(cluster.name.clone()),
                    });
                }
                return resp;
            }
            Err(reason) => reason,
        };
        drop(in_flight);
        cluster.record(idx, Outcome::LocalFailure, Instant::now());
        let retriable = match failure {
            Reason::ConnectFailure => {
                retry.on.connect_failure || retry.on.five_xx || retry.on.gateway_error
            }
            Reason::UpstreamReset => {
                retry.on.reset
                    || retry.on.five_xx
                    || retry.on.gateway_error
                    || retry.on.refused_stream
            }
            // A per-try timeout is retried as a gateway error; the route's
            // own deadline is not.
            Reason::UpstreamTimeout => {
                (retry.on.five_xx || retry.on.gateway_error)
                    && deadline.is_none_or(|d| Instant::now() < d)
            }
            // Circuit open is never retried: retries would defeat it.
            _ => false,
        };
        if retriable && attempt < max_attempts {
            drop(retrying.take());
            if let Some(g) = RetryGuard::acquire(&cluster) {
                retrying = Some(g);
                backoff(retry, attempt, deadline).await;
                continue;
            }
        }
        return fail(Some(idx), failure);
    }
}

/// A retry in progress, counted against the cluster's retry budget from
/// the decision to retry until the retried attempt has its answer.
struct RetryGuard(Arc<ClusterState>);

impl RetryGuard {
    /// Concurrent retries per cluster are capped at the DestinationRule's
    /// `maxRetries`; without one they are not capped, as in Istio (whose
    /// default is 2^32-1): under load, a cap would let a failing instance's
    /// errors through exactly when retries are needed.
    fn acquire(cluster: &Cluster) -> Option<RetryGuard> {
        let state = &cluster.state;
        let cap = cluster.limits.max_retries.unwrap_or(u32::MAX);
        if state.active_retries.fetch_add(1, Ordering::AcqRel) >= cap {
            state.active_retries.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(cluster = %cluster.name, cap, "maxRetries reached; not retrying");
            return None;
        }
        Some(RetryGuard(state.clone()))
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn backoff(retry: &crate::state::RetryPolicy, attempt: u32, deadline: Option<Instant>) {
    // Exponential with full jitter, capped at 10× the base (Envoy's rule).
    let base = retry.backoff.as_millis().max(1) as u64;
    let cap = base * 10;
    let exp = base.saturating_mul(1 << (attempt - 1).min(10)).min(cap);
    let mut wait = Duration::from_millis(fastrand::u64(0..=exp));
    if let Some(d) = deadline {
        wait = wait.min(d.saturating_duration_since(Instant::now()));
    }
    tokio::time::sleep(wait).await;
}

/// One attempt at `idx`. `announce` (this workload's `x-mesh-peer`) goes
/// only to an endpoint reached over mesh mTLS.
async fn send(
    mesh: &crate::tls::MeshTls,
    cluster: &Cluster,
    idx: usize,
    h2: bool,
    out: &mut Outgoing,
    deadline: Option<Instant>,
    announce: Option<&HeaderValue>,
) -> Result<(Response<Incoming>, Option<pool::H1Conn>), Reason> {
    let endpoint = cluster.endpoints[idx].addr;
    let announce = announce.filter(|_| {
        mesh.enabled()
            && matches!(
                cluster.endpoints[idx].tls,
                crate::tls::Upstream::Mesh { .. }
            )
    });
    // Waiting for a pooled connection is bounded even without a deadline.
    let pool_deadline = deadline.unwrap_or_else(|| Instant::now() + cluster.limits.connect_timeout);
    let attempt = async {
        let conn = pool::checkout(mesh, cluster, idx, h2, pool_deadline).await?;
        let mut req = out.build(h2, endpoint);
        if let Some(v) = announce {
            req.headers_mut().insert(PEER_HEADER, v.clone());
        }
        match conn {
            Conn::H1(mut c) => {
                if c.sender.ready().await.is_err() {
                    return Err(Reason::UpstreamReset);
                }
                let resp = c.sender.send_request(req).await.map_err(classify)?;
                Ok((resp, Some(c)))
            }
            Conn::H2(mut s) => {
                let resp = s.send_request(req).await.map_err(classify)?;
                Ok((resp, None))
            }
        }
    };
    match deadline {
        // No timer at all when the route sets no timeout.
        None => attempt.await,
        Some(d) => {
            match tokio::time::timeout(d.saturating_duration_since(Instant::now()), attempt).await {
                Ok(r) => r,
                Err(_) => Err(Reason::UpstreamTimeout),
            }
        }
    }
}

fn classify(e: hyper::Error) -> Reason {
    tracing::debug!(error = %e, "upstream request failed");
    Reason::UpstreamReset
}

fn mirror(mesh: Arc<crate::tls::MeshTls>, cluster: Arc<Cluster>, out: &Outgoing, body: Bytes) {
    let mut headers = out.headers.clone();
    // Istio/Envoy mark mirrored traffic with a "-shadow" host suffix.
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        let (h, p) = split_authority(host, 0);
        let shadow = if p == 0 {
            format!("{h}-shadow")
        } else {
            format!("{h}-shadow:{p}")
        };
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            headers.insert(header::HOST, v);
        }
    }
    let mut copy = Outgoing {
        method: out.method.clone(),
        uri: out.uri.clone(),
        version: out.version,
        headers,
        replay: Some(body),
        replay_trailers: out.replay_trailers.clone(),
        streamed: None,
    };
    tokio::spawn(async move {
        let deadline = Some(Instant::now() + Duration::from_secs(30));
        let Some(idx) = cluster.pick(None, &[], Instant::now()) else {
            return;
        };
        let h2 = matches!(
            cluster.protocol,
            mesh_api::model::Protocol::Http2 | mesh_api::model::Protocol::Grpc
        );
        if let Ok((resp, pooled)) = send(&mesh, &cluster, idx, h2, &mut copy, deadline, None).await
        {
            // Read the body so the connection can be reused.
            if resp.into_body().collect().await.is_ok()
                && let Some(c) = pooled
            {
                c.release();
            }
        }
    });
}

fn splice_upgrade(downstream: Option<hyper::upgrade::OnUpgrade>, resp: &mut Response<Incoming>) {
    let Some(downstream) = downstream else { return };
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
            return;
        };
        let mut down = hyper_util::rt::TokioIo::new(down);
        let mut up = hyper_util::rt::TokioIo::new(up);
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    });
}

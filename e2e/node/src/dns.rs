//! The cluster DNS for pods: a small authoritative DNS server over UDP that answers names in
//! the cluster domain from the watched Services and EndpointSlices, following the Kubernetes
//! DNS-based service discovery specification (the records CoreDNS's `kubernetes` plugin serves).
//!
//! Records served, with `<domain>` the cluster domain (e.g. `cluster.local`) and a TTL of 5 s:
//!
//! - `<svc>.<ns>.svc.<domain>`: A/AAAA with the Service's cluster IPs; for a headless Service
//!   (`clusterIP: None`) the addresses of its ready endpoints; for a Service of type
//!   `ExternalName` a CNAME to `spec.externalName` (followed inside the cluster domain only).
//! - `<host>.<svc>.<ns>.svc.<domain>`: A/AAAA for each ready endpoint of a headless Service,
//!   where `<host>` is the endpoint's `hostname`, or its address with `.`/`:` replaced by `-`
//!   when it has none.
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>`: SRV for each named port; the target is the
//!   Service name (port = Service port) for a normal Service, and each ready endpoint's
//!   `<host>` name (port = endpoint port) for a headless one.
//! - `<a-b-c-d>.<ns>.pod.<domain>`: A with the address `a.b.c.d`, for any namespace label.
//! - `<domain>`: SOA, which is also put in the authority section of negative answers.
//!
//! Answers are authoritative. A name that exists with no data of the asked type gets NOERROR
//! with no answers; a name that does not exist gets NXDOMAIN. The cluster has no upstream
//! resolver, so names outside the cluster domain get NXDOMAIN as well, and reverse (PTR)
//! lookups are not served. Only UDP is served; a response that would exceed the client's
//! size limit (512 bytes, or its EDNS payload size) carries as many answers as fit.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::domain::Label;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// TTL of every record served.
pub const TTL: u32 = 5;

/// Label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// EDNS payload size advertised: the largest datagram received.
const EDNS_PAYLOAD: u16 = 4096;

/// Largest datagram received or sent.
const MAX_DATAGRAM: usize = EDNS_PAYLOAD as usize;

/// Size limit of a UDP response to a client without EDNS.
const CLASSIC_UDP_LIMIT: usize = 512;

/// How many CNAMEs are followed inside the zone for one question.
const MAX_CNAME_HOPS: usize = 8;

/// Pause after a failed receive, so a persistent socket error cannot spin the loop.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// What the cluster DNS answers from: built from the watched Services and EndpointSlices.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Zone {
    /// The cluster domain; `None` (an unusable domain, or the default zone) answers nothing.
    domain: Option<Name>,
    /// Every existing name of the zone with its data; names that only have children (such as
    /// `<ns>.svc.<domain>`) are present with no data.
    names: BTreeMap<Name, Vec<RData>>,
}

impl Zone {
    /// `domain` is the cluster domain, e.g. "cluster.local".
    pub fn build(domain: &str, services: &[Service], slices: &[EndpointSlice]) -> Zone {
        let Some(domain) = parse_domain(domain) else {
            tracing::warn!(
                domain,
                "cluster domain is not a usable DNS name; DNS answers nothing"
            );
            return Zone::default();
        };
        let mut zone = Zone {
            domain: Some(domain.clone()),
            names: BTreeMap::new(),
        };
        zone.insert(domain.clone(), Some(soa_data(&domain)));
        for subtree in ["svc", "pod"] {
            if let Some(name) = name_under(&domain, &[subtree]) {
                zone.insert(name, None);
            }
        }
        for service in services {
            zone.add_service(&domain, service, slices);
        }
        zone
    }

    /// Records `name` as existing, with `data` when given, and its ancestors inside the
    /// domain as existing.
    fn insert(&mut self, name: Name, data: Option<RData>) {
        let Some(domain) = &self.domain else {
            return;
        };
        let mut ancestor = name.base_name();
        while ancestor.num_labels() > domain.num_labels() && domain.zone_of(&ancestor) {
            let parent = ancestor.base_name();
            self.names.entry(ancestor).or_default();
            ancestor = parent;
        }
        let entry = self.names.entry(name).or_default();
        if let Some(data) = data
            && !entry.contains(&data)
        {
            entry.push(data);
        }
    }

    fn add_service(&mut self, domain: &Name, service: &Service, slices: &[EndpointSlice]) {
        let Some(key) = ServiceKey::of(service) else {
            return;
        };
        let Some(spec) = &service.spec else {
            return;
        };
        let Some(name) = name_under(domain, &[&key.name, &key.namespace, "svc"]) else {
            tracing::debug!(service = %key, "service name is not a DNS label; not served");
            return;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            let target = spec.external_name.as_deref().and_then(parse_fqdn);
            self.insert(name, target.map(|target| RData::CNAME(CNAME(target))));
        } else if is_headless(service) {
            self.add_headless(&name, &key, slices);
        } else {
            for ip in cluster_ips(service) {
                self.insert(name.clone(), Some(address_data(ip)));
            }
            self.insert(name.clone(), None);
            for port in spec.ports.iter().flatten() {
                self.add_service_port(&name, port);
            }
        }
    }

    fn add_service_port(&mut self, service_name: &Name, port: &ServicePort) {
        let Some(srv_name) =
            srv_owner(service_name, port.name.as_deref(), port.protocol.as_deref())
        else {
            return;
        };
        let Ok(number) = u16::try_from(port.port) else {
            return;
        };
        self.insert(srv_name, Some(srv_data(number, service_name.clone())));
    }

    fn add_headless(&mut self, service_name: &Name, key: &ServiceKey, slices: &[EndpointSlice]) {
        self.insert(service_name.clone(), None);
        for slice in slices.iter().filter(|slice| key.owns(slice)) {
            for endpoint in slice.endpoints.iter().flatten().filter(|e| is_ready(e)) {
                self.add_endpoint(service_name, slice, endpoint);
            }
        }
    }

    fn add_endpoint(&mut self, service_name: &Name, slice: &EndpointSlice, endpoint: &Endpoint) {
        for ip in endpoint_ips(endpoint) {
            self.insert(service_name.clone(), Some(address_data(ip)));
            let host = endpoint_host_label(endpoint, ip);
            let Some(host_name) = name_under(service_name, &[&host]) else {
                tracing::debug!(host, "endpoint host is not a DNS label; not served");
                continue;
            };
            self.insert(host_name.clone(), Some(address_data(ip)));
            for port in slice.ports.iter().flatten() {
                let owner = srv_owner(service_name, port.name.as_deref(), port.protocol.as_deref());
                let number = port.port.and_then(|p| u16::try_from(p).ok());
                if let (Some(owner), Some(number)) = (owner, number) {
                    self.insert(owner, Some(srv_data(number, host_name.clone())));
                }
            }
        }
    }

    /// The data of `name` when it exists in the zone; `None` when it does not.
    fn lookup(&self, domain: &Name, name: &Name) -> Option<Vec<RData>> {
        if let Some(data) = self.names.get(name) {
            return Some(data.clone());
        }
        pod_lookup(domain, name)
    }

    /// Resolves one question against the zone.
    fn resolve(&self, qname: &Name, qtype: RecordType) -> Resolution {
        let Some(domain) = &self.domain else {
            return Resolution::nxdomain(Vec::new(), false);
        };
        if !domain.zone_of(qname) {
            return Resolution::nxdomain(Vec::new(), false);
        }
        let follow_cname = !matches!(qtype, RecordType::CNAME | RecordType::ANY);
        let mut owner = qname.clone();
        let mut answers = Vec::new();
        for _ in 0..MAX_CNAME_HOPS {
            let Some(data) = self.lookup(domain, &owner) else {
                return Resolution::nxdomain(answers, true);
            };
            if follow_cname && let Some(target) = cname_target(&data) {
                answers.push(record(&owner, RData::CNAME(CNAME(target.clone()))));
                if !domain.zone_of(target) {
                    break;
                }
                owner = target.clone();
                continue;
            }
            answers.extend(
                data.into_iter()
                    .filter(|d| qtype == RecordType::ANY || d.record_type() == qtype)
                    .map(|d| record(&owner, d)),
            );
            break;
        }
        let negative = answers.is_empty();
        Resolution {
            code: ResponseCode::NoError,
            answers,
            with_soa: negative,
        }
    }

    /// The SOA record of the zone, for the authority section of negative answers.
    fn soa_record(&self) -> Option<Record> {
        self.domain
            .as_ref()
            .map(|domain| record(domain, soa_data(domain)))
    }
}

/// The outcome of one question.
#[derive(Debug)]
struct Resolution {
    code: ResponseCode,
    answers: Vec<Record>,
    /// Whether the zone's SOA goes in the authority section (negative answers in the zone).
    with_soa: bool,
}

impl Resolution {
    fn nxdomain(answers: Vec<Record>, with_soa: bool) -> Self {
        Self {
            code: ResponseCode::NXDomain,
            answers,
            with_soa,
        }
    }
}

/// Namespace and name of a Service.
#[derive(Debug)]
struct ServiceKey {
    namespace: String,
    name: String,
}

impl ServiceKey {
    fn of(service: &Service) -> Option<Self> {
        let name = service.metadata.name.clone()?;
        let namespace = service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        Some(Self { namespace, name })
    }

    /// Whether `slice` belongs to this Service (same namespace, service-name label).
    fn owns(&self, slice: &EndpointSlice) -> bool {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL));
        namespace == self.namespace && service.map(String::as_str) == Some(self.name.as_str())
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Answers one query datagram; None when the bytes are not a DNS query worth answering (garbage is dropped, never a panic).
pub fn answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.message_type() != MessageType::Query {
        return None;
    }
    let response = respond(zone, &request);
    encode(response, size_limit(&request))
}

/// Builds the response message to a decoded query.
fn respond(zone: &Zone, request: &Message) -> Message {
    let mut response = Message::new();
    response.set_header(Header::response_from_request(request.header()));
    response.add_queries(request.queries().iter().cloned());
    if request.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    if request.op_code() != OpCode::Query {
        response.set_response_code(ResponseCode::NotImp);
        return response;
    }
    let [question] = request.queries() else {
        response.set_response_code(ResponseCode::FormErr);
        return response;
    };
    if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY) {
        response.set_response_code(ResponseCode::NotImp);
        return response;
    }
    let resolution = resolve_question(zone, question);
    response
        .set_authoritative(true)
        .set_response_code(resolution.code)
        .insert_answers(resolution.answers);
    if resolution.with_soa
        && let Some(soa) = zone.soa_record()
    {
        response.add_name_server(soa);
    }
    response
}

fn resolve_question(zone: &Zone, question: &Query) -> Resolution {
    let mut qname = question.name().clone();
    qname.set_fqdn(true);
    zone.resolve(&qname, question.query_type())
}

/// The largest response the client accepts over UDP.
fn size_limit(request: &Message) -> usize {
    request
        .extensions()
        .as_ref()
        .map_or(CLASSIC_UDP_LIMIT, |edns| {
            usize::from(edns.max_payload()).clamp(CLASSIC_UDP_LIMIT, MAX_DATAGRAM)
        })
}

/// Encodes `response`, dropping the authority section and then trailing answers until it fits
/// in `limit` bytes (there is no TCP to retry on, so the client gets what fits).
fn encode(mut response: Message, limit: usize) -> Option<Vec<u8>> {
    loop {
        let bytes = match response.to_vec() {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::debug!(%error, "cannot encode DNS response");
                return None;
            }
        };
        if bytes.len() <= limit {
            return Some(bytes);
        }
        if !response.name_servers().is_empty() {
            response.name_servers_mut().clear();
        } else if response.answers_mut().pop().is_none() {
            return Some(bytes);
        }
    }
}

/// Serves DNS over UDP on `socket` until the task is dropped, answering from the latest zone.
pub async fn serve(socket: UdpSocket, zone: watch::Receiver<Arc<Zone>>) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, peer) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "DNS receive failed");
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        let current = Arc::clone(&zone.borrow());
        let Some(reply) = buffer.get(..len).and_then(|query| answer(&current, query)) else {
            tracing::debug!(%peer, len, "dropped a datagram that is not a DNS query");
            continue;
        };
        if let Err(error) = socket.send_to(&reply, peer).await {
            tracing::debug!(%peer, %error, "DNS send failed");
        }
    }
}

/// Parses the cluster domain as a fully qualified name; the root is not a usable domain.
fn parse_domain(domain: &str) -> Option<Name> {
    parse_fqdn(domain).filter(|name| !name.is_root())
}

/// Parses a textual DNS name (trailing dot optional) as a fully qualified name.
fn parse_fqdn(text: &str) -> Option<Name> {
    let mut name = Name::from_ascii(text.trim()).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// `labels` (leftmost first) prepended to `parent`, each checked to be a plain DNS label.
fn name_under(parent: &Name, labels: &[&str]) -> Option<Name> {
    labels.iter().rev().try_fold(parent.clone(), |name, label| {
        name.prepend_label(dns_label(label)?).ok()
    })
}

/// A label of letters, digits, `-` and `_` (no dots), at most 63 bytes.
fn dns_label(text: &str) -> Option<Label> {
    let plain = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        Label::from_ascii(text).ok()
    } else {
        None
    }
}

fn soa_data(domain: &Name) -> RData {
    let mname = name_under(domain, &["ns", "dns"]).unwrap_or_else(|| domain.clone());
    let rname = name_under(domain, &["hostmaster"]).unwrap_or_else(|| domain.clone());
    RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, TTL))
}

fn srv_data(port: u16, target: Name) -> RData {
    RData::SRV(SRV::new(0, 100, port, target))
}

fn address_data(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

fn record(owner: &Name, data: RData) -> Record {
    Record::from_rdata(owner.clone(), TTL, data)
}

/// `_<port>._<proto>.<service name>` for a named port.
fn srv_owner(service_name: &Name, port: Option<&str>, protocol: Option<&str>) -> Option<Name> {
    let port = port.filter(|p| !p.is_empty())?;
    let protocol = protocol.unwrap_or("TCP").to_ascii_lowercase();
    name_under(
        service_name,
        &[&format!("_{port}"), &format!("_{protocol}")],
    )
}

fn cname_target(data: &[RData]) -> Option<&Name> {
    data.iter().find_map(|d| match d {
        RData::CNAME(CNAME(target)) => Some(target),
        _ => None,
    })
}

/// Whether the Service is headless (`clusterIP: None`).
fn is_headless(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.cluster_ip.as_deref())
        .is_some_and(|ip| ip.eq_ignore_ascii_case("None"))
}

/// The Service's cluster IPs (`clusterIPs`, else `clusterIP`) that parse as addresses.
fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let listed = spec.cluster_ips.iter().flatten();
    let ips: Vec<IpAddr> = listed.filter_map(|ip| ip.parse().ok()).collect();
    if !ips.is_empty() {
        return ips;
    }
    spec.cluster_ip
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// An endpoint is served when it is not known to be unready and is not terminating.
fn is_ready(endpoint: &Endpoint) -> bool {
    endpoint.conditions.as_ref().is_none_or(|conditions| {
        conditions.ready != Some(false) && conditions.terminating != Some(true)
    })
}

fn endpoint_ips(endpoint: &Endpoint) -> Vec<IpAddr> {
    endpoint
        .addresses
        .iter()
        .filter_map(|address| address.parse().ok())
        .collect()
}

/// The endpoint's `hostname`, else its address with `.`/`:` replaced by `-`.
fn endpoint_host_label(endpoint: &Endpoint, ip: IpAddr) -> String {
    match endpoint.hostname.as_deref().filter(|h| !h.is_empty()) {
        Some(hostname) => hostname.to_ascii_lowercase(),
        None => ip.to_string().replace(['.', ':'], "-"),
    }
}

/// Synthesized pod names: `<a-b-c-d>.<ns>.pod.<domain>` (A) and `<ns>.pod.<domain>` (no data).
fn pod_lookup(domain: &Name, name: &Name) -> Option<Vec<RData>> {
    let depth = usize::from(name.num_labels()).checked_sub(usize::from(domain.num_labels()))?;
    let labels: Vec<&[u8]> = name.iter().take(depth).collect();
    match labels.as_slice() {
        [ip, _namespace, pod] if pod.eq_ignore_ascii_case(b"pod") => {
            parse_dashed_ipv4(ip).map(|ip| vec![RData::A(A(ip))])
        }
        [_namespace, pod] if pod.eq_ignore_ascii_case(b"pod") => Some(Vec::new()),
        _ => None,
    }
}

/// Parses `a-b-c-d` as the IPv4 address `a.b.c.d`.
fn parse_dashed_ipv4(label: &[u8]) -> Option<Ipv4Addr> {
    let text = std::str::from_utf8(label).ok()?;
    let mut octets = [0u8; 4];
    let mut parts = text.split('-');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).expect("valid Service")
    }

    fn slice(value: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(value).expect("valid EndpointSlice")
    }

    fn zone() -> Zone {
        let services = vec![
            service(json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "clusterIP": "10.96.0.10",
                    "clusterIPs": ["10.96.0.10"],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"port": 9090}]
                }
            })),
            service(json!({
                "metadata": {"name": "db", "namespace": "data"},
                "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
            })),
            service(json!({
                "metadata": {"name": "ext", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "example.com"}
            })),
            service(json!({
                "metadata": {"name": "alias", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "web.default.svc.cluster.local."}
            })),
        ];
        let slices = vec![
            slice(json!({
                "metadata": {
                    "name": "db-abc", "namespace": "data",
                    "labels": {"kubernetes.io/service-name": "db"}
                },
                "addressType": "IPv4",
                "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.0.0.1"], "hostname": "db-0", "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.2"], "conditions": {}},
                    {"addresses": ["10.0.0.3"], "hostname": "db-2", "conditions": {"ready": false}},
                    {"addresses": ["10.0.0.4"], "conditions": {"ready": true, "terminating": true}}
                ]
            })),
            // Same service name, other namespace: not part of data/db.
            slice(json!({
                "metadata": {
                    "name": "db-other", "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "db"}
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.9.9"]}]
            })),
        ];
        Zone::build("cluster.local", &services, &slices)
    }

    fn query_bytes(names: &[&str], qtype: RecordType) -> Vec<u8> {
        let mut message = Message::new();
        message
            .set_id(0x1234)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true);
        for name in names {
            let name = Name::from_ascii(name).expect("valid name");
            message.add_query(Query::query(name, qtype));
        }
        message.to_vec().expect("encodable query")
    }

    fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Message {
        let reply = answer(zone, &query_bytes(&[name], qtype)).expect("an answer");
        Message::from_vec(&reply).expect("decodable answer")
    }

    fn addresses(message: &Message) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = message
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect();
        ips.sort();
        ips
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("valid address")
    }

    #[test]
    fn cluster_ip_a_answer() {
        let reply = ask(&zone(), "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(reply.id(), 0x1234);
        assert_eq!(reply.message_type(), MessageType::Response);
        assert!(reply.authoritative());
        assert!(reply.recursion_desired());
        assert!(!reply.recursion_available());
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert_eq!(reply.queries().len(), 1);
        assert_eq!(addresses(&reply), vec![ip("10.96.0.10")]);
        assert!(reply.answers().iter().all(|r| r.ttl() == TTL));
    }

    #[test]
    fn headless_answers_ready_endpoints_only() {
        let reply = ask(&zone(), "db.data.svc.cluster.local", RecordType::A);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert_eq!(addresses(&reply), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    }

    #[test]
    fn hostname_record() {
        let zone = zone();
        let reply = ask(&zone, "db-0.db.data.svc.cluster.local", RecordType::A);
        assert_eq!(addresses(&reply), vec![ip("10.0.0.1")]);
        let unready = ask(&zone, "db-2.db.data.svc.cluster.local", RecordType::A);
        assert_eq!(unready.response_code(), ResponseCode::NXDomain);
        let dashed = ask(&zone, "10-0-0-2.db.data.svc.cluster.local", RecordType::A);
        assert_eq!(addresses(&dashed), vec![ip("10.0.0.2")]);
    }

    #[test]
    fn pod_record() {
        let zone = zone();
        let reply = ask(&zone, "10-244-1-7.any-ns.pod.cluster.local", RecordType::A);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert_eq!(addresses(&reply), vec![ip("10.244.1.7")]);
        for bad in [
            "10-244-1.ns.pod.cluster.local",
            "10-244-1-999.ns.pod.cluster.local",
        ] {
            assert_eq!(
                ask(&zone, bad, RecordType::A).response_code(),
                ResponseCode::NXDomain
            );
        }
    }

    #[test]
    fn aaaa_for_known_name_is_noerror_empty() {
        let reply = ask(&zone(), "web.default.svc.cluster.local", RecordType::AAAA);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert!(reply.authoritative());
        assert!(reply.answers().is_empty());
        assert_eq!(reply.name_servers().len(), 1, "SOA for negative caching");
    }

    #[test]
    fn empty_non_terminal_is_noerror() {
        let reply = ask(&zone(), "default.svc.cluster.local", RecordType::A);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert!(reply.answers().is_empty());
    }

    #[test]
    fn unknown_name_is_nxdomain() {
        let zone = zone();
        let reply = ask(&zone, "nope.default.svc.cluster.local", RecordType::A);
        assert_eq!(reply.response_code(), ResponseCode::NXDomain);
        assert!(reply.authoritative());
        assert!(reply.answers().is_empty());
        let outside = ask(&zone, "example.com", RecordType::A);
        assert_eq!(outside.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn names_are_case_insensitive() {
        let reply = ask(&zone(), "WEB.Default.SVC.Cluster.Local", RecordType::A);
        assert_eq!(addresses(&reply), vec![ip("10.96.0.10")]);
    }

    #[test]
    fn external_name_is_cname() {
        let zone = zone();
        let reply = ask(&zone, "ext.default.svc.cluster.local", RecordType::A);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        let targets: Vec<&RData> = reply.answers().iter().map(Record::data).collect();
        let expected = RData::CNAME(CNAME(parse_fqdn("example.com").expect("name")));
        assert_eq!(targets, vec![&expected]);
        let alias = ask(&zone, "alias.default.svc.cluster.local", RecordType::A);
        assert_eq!(alias.answers().len(), 2, "CNAME followed inside the zone");
        assert_eq!(addresses(&alias), vec![ip("10.96.0.10")]);
    }

    #[test]
    fn srv_records() {
        let zone = zone();
        let reply = ask(
            &zone,
            "_http._tcp.web.default.svc.cluster.local",
            RecordType::SRV,
        );
        let srv: Vec<(u16, String)> = reply
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::SRV(srv) => Some((srv.port(), srv.target().to_ascii())),
                _ => None,
            })
            .collect();
        assert_eq!(srv, vec![(80, "web.default.svc.cluster.local.".to_owned())]);
        let headless = ask(&zone, "_pg._tcp.db.data.svc.cluster.local", RecordType::SRV);
        assert_eq!(headless.answers().len(), 2);
    }

    #[test]
    fn garbage_is_dropped() {
        let zone = zone();
        assert_eq!(answer(&zone, b""), None);
        assert_eq!(answer(&zone, b"\x01\x02\x03"), None);
        assert_eq!(answer(&zone, &[0xff; 64]), None);
        let query = query_bytes(&["web.default.svc.cluster.local"], RecordType::A);
        for len in 0..query.len() {
            let _ = answer(&zone, &query[..len]);
        }
        let mut response = Message::from_vec(&query).expect("query");
        response.set_message_type(MessageType::Response);
        let response = response.to_vec().expect("encodable");
        assert_eq!(answer(&zone, &response), None, "responses are not answered");
    }

    #[test]
    fn two_questions_is_formerr() {
        let query = query_bytes(
            &["web.default.svc.cluster.local", "db.data.svc.cluster.local"],
            RecordType::A,
        );
        let reply = Message::from_vec(&answer(&zone(), &query).expect("an answer")).expect("msg");
        assert_eq!(reply.id(), 0x1234);
        assert_eq!(reply.response_code(), ResponseCode::FormErr);
        assert!(reply.answers().is_empty());
    }

    #[test]
    fn other_opcode_is_notimp() {
        let mut message = Message::from_vec(&query_bytes(
            &["web.default.svc.cluster.local"],
            RecordType::A,
        ))
        .expect("query");
        message.set_op_code(OpCode::Status);
        let query = message.to_vec().expect("encodable");
        let reply = Message::from_vec(&answer(&zone(), &query).expect("an answer")).expect("msg");
        assert_eq!(reply.response_code(), ResponseCode::NotImp);
    }

    #[test]
    fn default_zone_answers_nxdomain() {
        let reply = ask(
            &Zone::default(),
            "web.default.svc.cluster.local",
            RecordType::A,
        );
        assert_eq!(reply.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn oversized_answer_is_cut_to_fit() {
        let endpoints: Vec<serde_json::Value> = (0..100)
            .map(|i| json!({"addresses": [format!("10.1.0.{i}")]}))
            .collect();
        let services = vec![service(json!({
            "metadata": {"name": "big", "namespace": "default"},
            "spec": {"clusterIP": "None"}
        }))];
        let slices = vec![slice(json!({
            "metadata": {"name": "big-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "big"}},
            "addressType": "IPv4",
            "endpoints": endpoints
        }))];
        let zone = Zone::build("cluster.local", &services, &slices);
        let reply = answer(
            &zone,
            &query_bytes(&["big.default.svc.cluster.local"], RecordType::A),
        )
        .expect("an answer");
        assert!(reply.len() <= CLASSIC_UDP_LIMIT);
        let reply = Message::from_vec(&reply).expect("msg");
        assert!(!reply.answers().is_empty());
    }

    #[tokio::test]
    async fn serves_over_udp() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let (_tx, rx) = watch::channel(Arc::new(zone()));
        let task = tokio::spawn(serve(server, rx));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.send_to(b"junk", addr).await.expect("send");
        let query = query_bytes(&["web.default.svc.cluster.local"], RecordType::A);
        client.send_to(&query, addr).await.expect("send");
        let mut buffer = [0u8; 1024];
        let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buffer))
            .await
            .expect("reply in time")
            .expect("recv");
        let reply = Message::from_vec(&buffer[..len]).expect("msg");
        assert_eq!(addresses(&reply), vec![ip("10.96.0.10")]);
        task.abort();
    }
}

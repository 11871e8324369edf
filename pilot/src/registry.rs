//! What pilot knows, before compiling: services, the workloads behind them
//! and the mesh's config resources. Sources (files, Kubernetes) write it;
//! the compiler reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_api::model::Protocol;
use mesh_api::networking::WorkloadEntry;
use mesh_api::{Kind, Resource, ResourceKey};
use serde::Serialize;

/// The DNS suffix of service hosts.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// The label naming the service of an EndpointSlice; the endpoints of a
/// service without a selector carry it.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ObjectKey {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service: a host, its ports and how it selects its workloads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    pub key: ObjectKey,
    /// `name.namespace.svc.cluster.local`.
    pub host: String,
    /// Cluster IPs (none for headless services).
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Workloads of the namespace whose labels include these; `None` when
    /// the service has no selector (its endpoints are managed elsewhere).
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A named port of the workload.
    Name(String),
}

impl Service {
    /// Reads a Kubernetes Service, or says which field is wrong.
    pub fn from_k8s(svc: &core::Service) -> Result<Service, String> {
        let name = svc.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err("metadata.name: required".into());
        }
        let namespace = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| mesh_api::resource::DEFAULT_NAMESPACE.to_string());
        let spec = svc.spec.clone().unwrap_or_default();
        let mut addresses = Vec::new();
        for (i, ip) in spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .enumerate()
        {
            if ip == "None" || ip.is_empty() {
                continue;
            }
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("spec.clusterIPs[{i}]: not an IP address: {ip:?}"))?;
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        let selectorless = spec.selector.as_ref().is_none_or(|s| s.is_empty());
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("spec.ports[{i}].port: out of range: {}", p.port))?;
            if p.protocol.as_deref().is_some_and(|p| p != "TCP") {
                // UDP and SCTP are not proxied.
                continue;
            }
            let pname = p.name.clone().unwrap_or_default();
            let target = match &p.target_port {
                // Without a selector the endpoints are listed elsewhere
                // (EndpointSlices), with their ports named after the
                // service's: targetPort does not apply.
                _ if selectorless => TargetPort::Name(pname.clone()),
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(
                    u16::try_from(*n)
                        .ok()
                        .filter(|n| *n != 0)
                        .ok_or_else(|| format!("spec.ports[{i}].targetPort: out of range: {n}"))?,
                ),
                Some(IntOrString::String(s)) => match s.parse::<u16>() {
                    Ok(n) if n != 0 => TargetPort::Number(n),
                    _ => TargetPort::Name(s.clone()),
                },
            };
            let protocol = match p.app_protocol.as_deref() {
                Some(ap) => Protocol::from_port_name(ap),
                None => Protocol::from_port_name(&pname),
            };
            ports.push(ServicePort {
                name: pname,
                port,
                target,
                protocol,
            });
        }
        Ok(Service {
            host: format!("{name}.{namespace}.{CLUSTER_DOMAIN}"),
            key: ObjectKey::new(namespace, name),
            addresses,
            ports,
            selector: spec.selector.filter(|s| !s.is_empty()),
        })
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Whether a workload of the service's namespace is one of its
    /// endpoints (ready or not): by selector, or for a service without
    /// one, by the EndpointSlice label naming it.
    pub fn selects(&self, w: &Workload) -> bool {
        match &self.selector {
            Some(s) => s.iter().all(|(k, v)| w.labels.get(k) == Some(v)),
            None => w.labels.get(SERVICE_NAME_LABEL) == Some(&self.key.name),
        }
    }
}

/// A workload instance: a pod or a WorkloadEntry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    pub key: ObjectKey,
    pub address: IpAddr,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Named ports (`http: 9080`).
    pub ports: BTreeMap<String, u16>,
    pub weight: u32,
    pub locality: Option<String>,
    /// Whether it takes traffic. A pod that is not ready still gets its own
    /// config (its proxy needs it to become ready) but is no endpoint.
    pub ready: bool,
}

impl Workload {
    /// Reads a WorkloadEntry (already validated).
    pub fn from_entry(we: &WorkloadEntry) -> Result<Workload, String> {
        let spec = &we.spec;
        let address = spec
            .address
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|_| format!("spec.address: not an IP address: {:?}", spec.address))?;
        let mut ports = BTreeMap::new();
        for (name, p) in &spec.ports {
            let p =
                u16::try_from(*p).map_err(|_| format!("spec.ports[{name}]: out of range: {p}"))?;
            ports.insert(name.clone(), p);
        }
        Ok(Workload {
            key: ObjectKey::new(
                we.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| mesh_api::resource::DEFAULT_NAMESPACE.into()),
                we.metadata.name.clone().unwrap_or_default(),
            ),
            address,
            labels: spec.labels.clone(),
            service_account: spec
                .service_account
                .clone()
                .unwrap_or_else(|| "default".to_string()),
            ports,
            weight: spec.weight.unwrap_or(1),
            locality: spec.locality.clone(),
            ready: true,
        })
    }

    /// The workload's port for a service port.
    pub fn target_port(&self, sp: &ServicePort) -> Option<u16> {
        match &sp.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => self.ports.get(name).copied(),
        }
    }
}

/// A namespace: its name and labels.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Everything the compiler reads. Cheap to clone: sources replace whole
/// entries.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub workloads: BTreeMap<ObjectKey, Arc<Workload>>,
    /// Config resources other than WorkloadEntries (which become workloads).
    pub config: BTreeMap<ResourceKey, Arc<Resource>>,
    /// Namespaces with their labels, where the source knows them
    /// (Kubernetes); empty for the files source.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
}

/// What changed between two [`Inputs`]: the compiler recomputes only what
/// depends on it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Change {
    /// Hosts whose service or endpoints changed.
    pub hosts: BTreeSet<String>,
    /// Namespaces whose workloads or services changed (inbound policy).
    pub namespaces: BTreeSet<String>,
    /// Kinds of config resources that changed.
    pub kinds: BTreeSet<Kind>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.namespaces.is_empty() && self.kinds.is_empty()
    }

    pub fn merge(&mut self, other: Change) {
        self.hosts.extend(other.hosts);
        self.namespaces.extend(other.namespaces);
        self.kinds.extend(other.kinds);
    }
}

impl Inputs {
    /// The service of a fully qualified host.
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        let (name, rest) = host.split_once('.')?;
        let (ns, domain) = rest.split_once('.')?;
        if !domain.eq_ignore_ascii_case(CLUSTER_DOMAIN) {
            return None;
        }
        self.services.get(&ObjectKey::new(ns, name))
    }

    /// Services of one namespace.
    pub fn services_in<'a, 'n>(
        &'a self,
        ns: &'n str,
    ) -> impl Iterator<Item = &'a Arc<Service>> + Clone + use<'a, 'n> {
        self.services
            .range(ObjectKey::new(ns, "")..)
            .take_while(move |(k, _)| k.namespace == ns)
            .map(|(_, s)| s)
    }

    /// The ready workloads a service selects.
    pub fn endpoints_of<'a>(&'a self, svc: &'a Service) -> impl Iterator<Item = &'a Arc<Workload>> {
        let ns = svc.key.namespace.as_str();
        self.workloads
            .range(ObjectKey::new(ns, "")..)
            .take_while(move |(k, _)| k.namespace == ns)
            .map(|(_, w)| w)
            .filter(move |w| w.ready && svc.selects(w))
    }

    /// Config resources of one kind.
    pub fn config_of(&self, kind: Kind) -> impl Iterator<Item = &Arc<Resource>> {
        let start = ResourceKey {
            kind,
            namespace: String::new(),
            name: String::new(),
        };
        self.config
            .range(start..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, r)| r)
    }

    /// The labels of a namespace, when the source knows it.
    pub fn namespace_labels(&self, namespace: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(namespace).map(|n| &n.labels)
    }

    /// What differs between `self` and `next`.
    pub fn diff(&self, next: &Inputs) -> Change {
        let mut change = Change::default();
        for (k, _, _) in changed(&self.namespaces, &next.namespaces) {
            change.namespace(k);
        }
        for (_, old, new) in changed(&self.services, &next.services) {
            change.service(old.map(|s| &**s), new.map(|s| &**s));
        }
        for (k, old, new) in changed(&self.workloads, &next.workloads) {
            // Services selecting it before or after.
            let services = next
                .services_in(&k.namespace)
                .chain(self.services_in(&k.namespace));
            change.workload(services, old.map(|w| &**w), new.map(|w| &**w));
        }
        for (k, _, _) in changed(&self.config, &next.config) {
            change.kinds.insert(k.kind);
        }
        change
    }
}

impl Change {
    /// A namespace's labels changed: its workloads' inbound resources are
    /// rebuilt.
    pub fn namespace(&mut self, name: &str) {
        self.namespaces.insert(name.to_string());
    }

    /// A service changed, came or went.
    pub fn service(&mut self, old: Option<&Service>, new: Option<&Service>) {
        for s in old.into_iter().chain(new) {
            self.hosts.insert(s.host.clone());
            self.namespaces.insert(s.key.namespace.clone());
        }
    }

    /// A workload changed, came or went: every service of its namespace
    /// (of `services`) that selects its old or new labels has new
    /// endpoints.
    pub fn workload<'a>(
        &mut self,
        services: impl Iterator<Item = &'a Arc<Service>> + Clone,
        old: Option<&Workload>,
        new: Option<&Workload>,
    ) {
        for w in old.into_iter().chain(new) {
            self.namespaces.insert(w.key.namespace.clone());
            for svc in services.clone() {
                if svc.selects(w) && !self.hosts.contains(&svc.host) {
                    self.hosts.insert(svc.host.clone());
                }
            }
        }
    }
}

/// Changes to single objects of the inputs, made in place: what changed
/// is known from each edit, without comparing everything.
pub struct Edit<'a> {
    inputs: &'a mut Inputs,
    change: &'a mut Change,
}

impl<'a> Edit<'a> {
    pub fn new(inputs: &'a mut Inputs, change: &'a mut Change) -> Edit<'a> {
        Edit { inputs, change }
    }

    pub fn inputs(&self) -> &Inputs {
        self.inputs
    }

    pub fn put_service(&mut self, s: Arc<Service>) {
        let old = self.inputs.services.insert(s.key.clone(), s.clone());
        if old.as_ref().is_none_or(|o| **o != *s) {
            self.change.service(old.as_deref(), Some(&s));
        }
    }

    pub fn remove_service(&mut self, key: &ObjectKey) {
        if let Some(old) = self.inputs.services.remove(key) {
            self.change.service(Some(&old), None);
        }
    }

    pub fn put_workload(&mut self, w: Arc<Workload>) {
        let old = self.inputs.workloads.insert(w.key.clone(), w.clone());
        if old.as_ref().is_none_or(|o| **o != *w) {
            let services = self.inputs.services_in(&w.key.namespace);
            self.change.workload(services, old.as_deref(), Some(&w));
        }
    }

    pub fn remove_workload(&mut self, key: &ObjectKey) {
        if let Some(old) = self.inputs.workloads.remove(key) {
            let services = self.inputs.services_in(&key.namespace);
            self.change.workload(services, Some(&old), None);
        }
    }

    pub fn put_config(&mut self, r: Arc<Resource>) {
        let key = r.key();
        let old = self.inputs.config.insert(key.clone(), r.clone());
        if old.as_ref().is_none_or(|o| **o != *r) {
            self.change.kinds.insert(key.kind);
        }
    }

    pub fn remove_config(&mut self, key: &ResourceKey) {
        if self.inputs.config.remove(key).is_some() {
            self.change.kinds.insert(key.kind);
        }
    }
}

type Changed<'a, K, V> = Vec<(&'a K, Option<&'a V>, Option<&'a V>)>;

/// Entries that differ, by walking both maps in key order; the same `Arc`
/// (the common case after a clone) is equal without looking inside.
fn changed<'a, K: Ord, T: PartialEq>(
    a: &'a BTreeMap<K, Arc<T>>,
    b: &'a BTreeMap<K, Arc<T>>,
) -> Changed<'a, K, Arc<T>> {
    use std::cmp::Ordering;
    let mut out = Vec::new();
    let (mut ia, mut ib) = (a.iter().peekable(), b.iter().peekable());
    loop {
        let order = match (ia.peek(), ib.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        match order {
            Ordering::Less => {
                if let Some((k, v)) = ia.next() {
                    out.push((k, Some(v), None));
                }
            }
            Ordering::Greater => {
                if let Some((k, v)) = ib.next() {
                    out.push((k, None, Some(v)));
                }
            }
            Ordering::Equal => {
                if let (Some((k, v)), Some((_, w))) = (ia.next(), ib.next())
                    && !(Arc::ptr_eq(v, w) || v == w)
                {
                    out.push((k, Some(v), Some(w)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Result<Service, String> {
        Service::from_k8s(&serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn kubernetes_services_are_read_with_protocols_and_named_targets() {
        let s = svc(r#"
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.0.0.7
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: web}
  - {name: grpc-api, port: 9090, targetPort: 19090}
  - {name: dns, port: 53, protocol: UDP}
"#)
        .unwrap();
        assert_eq!(s.host, "reviews.shop.svc.cluster.local");
        assert_eq!(s.addresses, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[0].target, TargetPort::Name("web".into()));
        assert_eq!(s.ports[0].protocol, Protocol::Http);
        assert_eq!(s.ports[1].target, TargetPort::Number(19090));
        assert_eq!(s.ports[1].protocol, Protocol::Grpc);
    }

    #[test]
    fn bad_services_name_the_field() {
        let e = svc("metadata: {name: a}\nspec: {ports: [{port: 70000}]}").unwrap_err();
        assert!(e.starts_with("spec.ports[0].port"), "{e}");
        let e = svc("metadata: {name: a}\nspec: {clusterIP: nope}").unwrap_err();
        assert!(e.contains("clusterIP"), "{e}");
    }

    #[test]
    fn a_workload_change_names_the_hosts_that_select_it() {
        let mut a = Inputs::default();
        let s = svc("metadata: {name: r, namespace: d}\nspec: {selector: {app: r}, ports: [{name: http, port: 80}]}").unwrap();
        a.services.insert(s.key.clone(), Arc::new(s));
        let other = svc("metadata: {name: o, namespace: d}\nspec: {selector: {app: o}, ports: [{name: http, port: 80}]}").unwrap();
        a.services.insert(other.key.clone(), Arc::new(other));
        let mut b = a.clone();
        let w = Workload {
            key: ObjectKey::new("d", "r-1"),
            address: "10.1.0.1".parse().unwrap(),
            labels: [("app".to_string(), "r".to_string())].into(),
            service_account: "r".into(),
            ports: Default::default(),
            weight: 1,
            locality: None,
            ready: true,
        };
        b.workloads.insert(w.key.clone(), Arc::new(w));
        let c = a.diff(&b);
        assert_eq!(
            c.hosts.into_iter().collect::<Vec<_>>(),
            vec!["r.d.svc.cluster.local"]
        );
        assert!(c.kinds.is_empty());
        assert_eq!(
            b.endpoints_of(&b.services[&ObjectKey::new("d", "r")])
                .count(),
            1
        );
        assert_eq!(
            b.endpoints_of(&b.services[&ObjectKey::new("d", "o")])
                .count(),
            0
        );
    }
}

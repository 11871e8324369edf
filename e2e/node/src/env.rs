//! A container's environment as the kubelet builds it: service links
//! (`KUBERNETES_SERVICE_HOST` and the namespace's Services), `envFrom`,
//! `env` with `value` (with `$(VAR)` references), `fieldRef`,
//! `resourceFieldRef`, `configMapKeyRef` and `secretKeyRef`.

use k8s_openapi::api::core::v1::{Container, Pod, ResourceFieldSelector, Service};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::volumes;

/// What a pod may learn of its node.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    pub ip: std::net::Ipv4Addr,
    /// Allocatable CPU in millicores and memory in bytes: the limits of a
    /// container that sets none.
    pub cpu_millis: u64,
    pub memory: u64,
}

pub fn field(pod: &Pod, node: &NodeFacts, path: &str) -> Result<String, String> {
    let m = &pod.metadata;
    let st = pod.status.as_ref();
    let map_key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['").and_then(|r| r.strip_suffix("']")))
    };
    let map_text = |m: Option<&std::collections::BTreeMap<String, String>>| {
        m.map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => map_text(m.labels.as_ref()),
        "metadata.annotations" => map_text(m.annotations.as_ref()),
        "spec.nodeName" => node.name.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.hostIP" | "status.hostIPs" => node.ip.to_string(),
        "status.podIP" | "status.podIPs" => st.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        _ => {
            if let Some(k) = map_key("metadata.labels") {
                m.labels
                    .as_ref()
                    .and_then(|l| l.get(k))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(k) = map_key("metadata.annotations") {
                m.annotations
                    .as_ref()
                    .and_then(|l| l.get(k))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(format!("fieldRef {path:?} is not supported"));
            }
        }
    })
}

/// A quantity in base units (millicores for CPU when `millis`).
pub fn quantity(q: &str, millis: bool) -> Result<f64, String> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("quantity {q:?}"))?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        _ => return Err(format!("quantity {q:?}: unknown suffix {suffix:?}")),
    };
    Ok(n * mult * if millis { 1000.0 } else { 1.0 })
}

pub fn resource(pod: &Pod, node: &NodeFacts, r: &ResourceFieldSelector) -> Result<String, String> {
    let spec = pod.spec.as_ref().ok_or("pod has no spec")?;
    let name = r.container_name.as_deref();
    let c = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| name.is_none_or(|n| n == c.name))
        .ok_or_else(|| format!("resourceFieldRef: no container {name:?}"))?;
    container_resource(c, node, &r.resource, r.divisor.as_ref())
}

pub fn container_resource(
    c: &Container,
    node: &NodeFacts,
    resource: &str,
    divisor: Option<&Quantity>,
) -> Result<String, String> {
    let (kind, what) = resource
        .split_once('.')
        .ok_or_else(|| format!("resourceFieldRef {resource:?}"))?;
    let res = c.resources.as_ref();
    let set = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(format!("resourceFieldRef {resource:?}")),
    }
    .and_then(|m| m.get(what));
    let cpu = what == "cpu";
    if !cpu && what != "memory" && what != "ephemeral-storage" {
        return Err(format!("resourceFieldRef {resource:?} is not supported"));
    }
    let value = match set {
        Some(q) => quantity(&q.0, cpu)?,
        None if kind == "limits" && cpu => node.cpu_millis as f64,
        None if kind == "limits" => node.memory as f64,
        None => 0.0,
    };
    let div = match divisor {
        Some(d) => quantity(&d.0, cpu)?,
        None if cpu => 1000.0,
        None => 1.0,
    };
    if div <= 0.0 {
        return Err(format!(
            "resourceFieldRef {resource:?}: divisor must be positive"
        ));
    }
    Ok(format!("{}", (value / div).ceil() as i64))
}

/// `$(NAME)` references replaced from `vars`; `$$` escapes; unknown ones kept.
pub fn expand(s: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$(")
            && let Some(end) = t.find(')')
            && let Some((_, v)) = vars.iter().rev().find(|(k, _)| k == &t[..end])
        {
            out.push_str(v);
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The Docker-link style variables of the Services a pod sees.
pub fn service_links(services: &[Service], ns: &str, all: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in services {
        let sns = s.metadata.namespace.as_deref().unwrap_or("default");
        let name = s.metadata.name.as_deref().unwrap_or_default();
        let is_api = sns == "default" && name == "kubernetes";
        if !(is_api || (all && sns == ns)) {
            continue;
        }
        let Some(spec) = &s.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| *ip != "None" && !ip.is_empty())
        else {
            continue;
        };
        let Some(first) = spec.ports.as_ref().and_then(|p| p.first()) else {
            continue;
        };
        let prefix = name.to_uppercase().replace('-', "_");
        out.push((format!("{prefix}_SERVICE_HOST"), ip.to_string()));
        out.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for p in spec.ports.iter().flatten() {
            if let Some(pn) = &p.name {
                let pn = pn.to_uppercase().replace('-', "_");
                out.push((format!("{prefix}_SERVICE_PORT_{pn}"), p.port.to_string()));
            }
        }
    }
    out
}

/// One key of a ConfigMap's or Secret's data: None when the object or the
/// key is absent and that is allowed.
fn key(
    data: Option<std::collections::BTreeMap<String, Vec<u8>>>,
    key: &str,
    optional: bool,
    missing: impl FnOnce() -> String,
) -> Result<Option<String>, String> {
    let Some(data) = data else { return Ok(None) };
    match data.get(key) {
        Some(v) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
        None if optional => Ok(None),
        None => Err(missing()),
    }
}

pub async fn container_env(
    client: &kube::Client,
    pod: &Pod,
    node: &NodeFacts,
    c: &Container,
    services: &[Service],
) -> Result<Vec<(String, String)>, String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref().ok_or("pod has no spec")?;
    let mut vars: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        (
            "HOSTNAME".into(),
            spec.hostname
                .clone()
                .or_else(|| pod.metadata.name.clone())
                .unwrap_or_default(),
        ),
    ];
    vars.extend(service_links(
        services,
        ns,
        spec.enable_service_links.unwrap_or(true),
    ));
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            volumes::config_map(client, ns, &r.name, r.optional.unwrap_or(false)).await?
        } else if let Some(r) = &from.secret_ref {
            volumes::secret(client, ns, &r.name, r.optional.unwrap_or(false)).await?
        } else {
            None
        };
        for (k, v) in data.unwrap_or_default() {
            vars.push((
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => expand(v, &vars),
            (None, None) => String::new(),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    field(pod, node, &f.field_path)?
                } else if let Some(r) = &from.resource_field_ref {
                    let target = match &r.container_name {
                        Some(n) if n != &c.name => spec
                            .containers
                            .iter()
                            .find(|x| &x.name == n)
                            .ok_or_else(|| format!("env {}: no container {n:?}", e.name))?,
                        _ => c,
                    };
                    container_resource(target, node, &r.resource, r.divisor.as_ref())?
                } else if let Some(k) = &from.config_map_key_ref {
                    let optional = k.optional.unwrap_or(false);
                    let data = volumes::config_map(client, ns, &k.name, optional).await?;
                    match key(data, &k.key, optional, || {
                        format!(
                            "env {}: key {:?} not in configmap {}",
                            e.name, k.key, k.name
                        )
                    })? {
                        Some(v) => v,
                        None => continue,
                    }
                } else if let Some(k) = &from.secret_key_ref {
                    let optional = k.optional.unwrap_or(false);
                    let data = volumes::secret(client, ns, &k.name, optional).await?;
                    match key(data, &k.key, optional, || {
                        format!("env {}: key {:?} not in secret {}", e.name, k.key, k.name)
                    })? {
                        Some(v) => v,
                        None => continue,
                    }
                } else {
                    return Err(format!("env {}: valueFrom names no source", e.name));
                }
            }
        };
        vars.retain(|(k, _)| k != &e.name);
        vars.push((e.name.clone(), value));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_like_the_kubelet() {
        let vars = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)/$(B)/$$(A)/$", &vars), "x/$(B)/$(A)/$");
    }

    #[test]
    fn quantities_and_divisors() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "resources": {"limits": {"cpu": "1500m", "memory": "64Mi"}}
        }))
        .unwrap();
        let node = NodeFacts {
            name: "n".into(),
            ip: [10, 0, 0, 1].into(),
            cpu_millis: 8000,
            memory: 1 << 34,
        };
        assert_eq!(
            container_resource(&c, &node, "limits.cpu", None).unwrap(),
            "2"
        );
        assert_eq!(
            container_resource(&c, &node, "limits.memory", Some(&Quantity("1Mi".into()))).unwrap(),
            "64"
        );
        assert_eq!(
            container_resource(&c, &node, "requests.cpu", None).unwrap(),
            "0"
        );
        assert!(quantity("1.5.5", false).is_err());
    }
}

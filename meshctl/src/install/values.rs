//! What an installation is made of: a profile's defaults and the user's
//! `--set key=value` overrides, checked before anything is rendered.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The named starting points of an installation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// The CRDs and pilot.
    Minimal,
    /// Minimal, the sidecar injector and the ingress gateway.
    Default,
    /// Default, the egress gateway, small resource requests, and the
    /// Prometheus, Grafana and Jaeger addons.
    Demo,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Minimal => "minimal",
            Profile::Default => "default",
            Profile::Demo => "demo",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Values {
    /// Image registry and repository prefix: images are `HUB/NAME:TAG`.
    pub hub: String,
    pub tag: String,
    pub image_pull_policy: String,
    pub trust_domain: String,
    pub mtls: Mtls,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// The cluster's Kubernetes minor version, for the injector (native
    /// sidecars from 29); 0: ask the cluster, else 29.
    pub kubernetes_minor: u32,
    pub pilot: Component,
    pub injector: Component,
    pub ingress_gateway: Gateway,
    pub egress_gateway: Gateway,
    /// The sidecars the injector adds.
    pub proxy: Proxy,
    /// Tracing and access logs of sidecars and gateways.
    pub telemetry: Telemetry,
    pub addons: Addons,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    /// The mesh-wide PeerAuthentication's mode (STRICT, PERMISSIVE or
    /// DISABLE); empty for none (sidecars then accept both).
    pub mode: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    /// ALLOW_ANY or REGISTRY_ONLY.
    pub mode: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Component {
    pub enabled: bool,
    pub replicas: i64,
    /// The whole image reference; empty for `HUB/NAME:TAG`.
    pub image: String,
    pub resources: Resources,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gateway {
    pub enabled: bool,
    pub replicas: i64,
    pub image: String,
    pub resources: Resources,
    /// LoadBalancer, NodePort or ClusterIP.
    pub service_type: String,
    /// Fixed node ports (0: the cluster picks).
    pub node_ports: NodePorts,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePorts {
    pub http: i64,
    pub https: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Proxy {
    pub image: String,
    pub resources: Resources,
    pub log_level: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Telemetry {
    /// `off`, `json`, `text`, or a `%field%` template.
    pub access_log: String,
    pub tracing: Tracing,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// Percentage of new traces sampled.
    pub sampling: f64,
    /// A Zipkin collector (`host:port`); empty: the Jaeger addon's when it
    /// is enabled, else no tracing.
    pub zipkin_address: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    pub requests: Quantities,
    pub limits: Quantities,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quantities {
    pub cpu: String,
    pub memory: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Addons {
    pub prometheus: Addon,
    pub grafana: Addon,
    pub jaeger: Addon,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Addon {
    pub enabled: bool,
}

fn resources(cpu: &str, memory: &str, cpu_limit: &str, memory_limit: &str) -> Resources {
    Resources {
        requests: Quantities {
            cpu: cpu.into(),
            memory: memory.into(),
        },
        limits: Quantities {
            cpu: cpu_limit.into(),
            memory: memory_limit.into(),
        },
    }
}

fn gateway(enabled: bool, service_type: &str, r: Resources) -> Gateway {
    Gateway {
        enabled,
        replicas: 1,
        image: String::new(),
        resources: r,
        service_type: service_type.into(),
        node_ports: NodePorts { http: 0, https: 0 },
    }
}

impl Values {
    /// A profile's defaults.
    pub fn profile(profile: Profile) -> Values {
        let demo = profile == Profile::Demo;
        let small = |cpu: &str, memory: &str, cpu_limit: &str, memory_limit: &str| {
            if demo {
                resources("10m", "32Mi", cpu_limit, memory_limit)
            } else {
                resources(cpu, memory, cpu_limit, memory_limit)
            }
        };
        let beyond_minimal = profile != Profile::Minimal;
        Values {
            hub: "mesh".into(),
            tag: env!("CARGO_PKG_VERSION").into(),
            image_pull_policy: "IfNotPresent".into(),
            trust_domain: mesh_api::resource::DEFAULT_TRUST_DOMAIN.into(),
            mtls: Mtls {
                mode: String::new(),
            },
            outbound_traffic_policy: OutboundTrafficPolicy {
                mode: "ALLOW_ANY".into(),
            },
            kubernetes_minor: 0,
            pilot: Component {
                enabled: true,
                replicas: 1,
                image: String::new(),
                resources: small("100m", "128Mi", "2", "1Gi"),
            },
            injector: Component {
                enabled: beyond_minimal,
                replicas: 1,
                image: String::new(),
                resources: small("10m", "32Mi", "500m", "128Mi"),
            },
            ingress_gateway: gateway(
                beyond_minimal,
                "LoadBalancer",
                small("100m", "64Mi", "2", "512Mi"),
            ),
            egress_gateway: gateway(demo, "ClusterIP", small("100m", "64Mi", "2", "512Mi")),
            proxy: Proxy {
                image: String::new(),
                resources: small("10m", "32Mi", "2", "256Mi"),
                log_level: "info".into(),
            },
            telemetry: Telemetry {
                access_log: if demo { "json" } else { "off" }.into(),
                tracing: Tracing {
                    sampling: if demo { 100.0 } else { 1.0 },
                    zipkin_address: String::new(),
                },
            },
            addons: Addons {
                prometheus: Addon { enabled: demo },
                grafana: Addon { enabled: demo },
                jaeger: Addon { enabled: demo },
            },
        }
    }

    /// A profile's defaults with `sets` (`key=value`) applied in order.
    pub fn with_sets(profile: Profile, sets: &[String]) -> Result<Values, String> {
        let mut tree = serde_json::to_value(Values::profile(profile)).map_err(|e| e.to_string())?;
        for set in sets {
            let (key, raw) = set
                .split_once('=')
                .ok_or_else(|| format!("--set {set:?}: expected key=value"))?;
            set_path(&mut tree, key.trim(), raw.trim())
                .map_err(|e| format!("--set {}: {e}", key.trim()))?;
        }
        let values: Values = serde_json::from_value(tree).map_err(|e| e.to_string())?;
        values.check()?;
        Ok(values)
    }

    /// Where spans go: the set address, else the Jaeger addon's.
    pub fn zipkin_address(&self) -> String {
        match (
            &self.telemetry.tracing.zipkin_address,
            self.addons.jaeger.enabled,
        ) {
            (a, _) if !a.is_empty() => a.clone(),
            (_, true) => "zipkin.mesh-system:9411".into(),
            _ => String::new(),
        }
    }

    /// The image of `name` (pilot, injector, proxy, …).
    pub fn image(&self, name: &str, explicit: &str) -> String {
        if explicit.is_empty() {
            format!("{}/{name}:{}", self.hub, self.tag)
        } else {
            explicit.to_string()
        }
    }

    fn check(&self) -> Result<(), String> {
        let one_of = |key: &str, value: &str, allowed: &[&str]| {
            if allowed.contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "{key}: {value:?} is not one of {}",
                    allowed.join(", ")
                ))
            }
        };
        one_of(
            "imagePullPolicy",
            &self.image_pull_policy,
            &["Always", "IfNotPresent", "Never"],
        )?;
        one_of(
            "mtls.mode",
            &self.mtls.mode,
            &["", "STRICT", "PERMISSIVE", "DISABLE"],
        )?;
        one_of(
            "outboundTrafficPolicy.mode",
            &self.outbound_traffic_policy.mode,
            &["ALLOW_ANY", "REGISTRY_ONLY"],
        )?;
        one_of(
            "proxy.logLevel",
            &self.proxy.log_level,
            &["trace", "debug", "info", "warn", "error", "off"],
        )?;
        let sampling = self.telemetry.tracing.sampling;
        if !(0.0..=100.0).contains(&sampling) {
            return Err(format!(
                "telemetry.tracing.sampling: {sampling} is not a percentage (0 to 100)"
            ));
        }
        // What the proxies would refuse to start with is refused here.
        let log = &self.telemetry.access_log;
        if log != "off" {
            mesh_proxy::telemetry::LogFormat::parse(log)
                .map_err(|e| format!("telemetry.accessLog: {e}"))?;
        }
        let zipkin = &self.telemetry.tracing.zipkin_address;
        if !zipkin.is_empty() {
            mesh_proxy::telemetry::Collector::parse_zipkin(zipkin)
                .map_err(|e| format!("telemetry.tracing.zipkinAddress: {e}"))?;
        }
        if self.hub.is_empty() || self.tag.is_empty() {
            return Err("hub and tag must not be empty".into());
        }
        if self.trust_domain.is_empty()
            || !self
                .trust_domain
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        {
            return Err(format!(
                "trustDomain: {:?} is not a trust domain (letters, digits, '.', '-', '_')",
                self.trust_domain
            ));
        }
        let components = [
            ("pilot", self.pilot.replicas, &self.pilot.resources),
            ("injector", self.injector.replicas, &self.injector.resources),
            (
                "ingressGateway",
                self.ingress_gateway.replicas,
                &self.ingress_gateway.resources,
            ),
            (
                "egressGateway",
                self.egress_gateway.replicas,
                &self.egress_gateway.resources,
            ),
            ("proxy", 1, &self.proxy.resources),
        ];
        for (name, replicas, r) in components {
            if !(1..=100).contains(&replicas) {
                return Err(format!("{name}.replicas: {replicas} is not in 1..=100"));
            }
            for (field, q, memory) in [
                ("requests.cpu", &r.requests.cpu, false),
                ("requests.memory", &r.requests.memory, true),
                ("limits.cpu", &r.limits.cpu, false),
                ("limits.memory", &r.limits.memory, true),
            ] {
                quantity(q, memory).map_err(|e| format!("{name}.resources.{field}: {q:?} {e}"))?;
            }
        }
        for (name, gw) in [
            ("ingressGateway", &self.ingress_gateway),
            ("egressGateway", &self.egress_gateway),
        ] {
            one_of(
                &format!("{name}.serviceType"),
                &gw.service_type,
                &["LoadBalancer", "NodePort", "ClusterIP"],
            )?;
            for (port, p) in [("http", gw.node_ports.http), ("https", gw.node_ports.https)] {
                if p != 0 && !(30000..=32767).contains(&p) {
                    return Err(format!(
                        "{name}.nodePorts.{port}: {p} is outside the node port range 30000-32767"
                    ));
                }
                if p != 0 && gw.service_type == "ClusterIP" {
                    return Err(format!(
                        "{name}.nodePorts.{port}: a ClusterIP Service has no node ports"
                    ));
                }
            }
        }
        if self.kubernetes_minor != 0 && !(20..1000).contains(&self.kubernetes_minor) {
            return Err(format!(
                "kubernetesMinor: {} is not a Kubernetes minor version",
                self.kubernetes_minor
            ));
        }
        Ok(())
    }
}

/// A Kubernetes quantity the way resources are written: digits with an
/// optional fraction, then a unit (`m` for CPU; `Ki`…`Ei`, `k`…`E` for
/// memory).
fn quantity(q: &str, memory: bool) -> Result<(), &'static str> {
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &q[digits.len()..];
    let number_ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.chars().filter(|&c| c == '.').count() <= 1
        && digits.chars().any(|c| c.is_ascii_digit());
    let units: &[&str] = if memory {
        &[
            "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
        ]
    } else {
        &["", "m"]
    };
    if number_ok && units.contains(&unit) {
        Ok(())
    } else if memory {
        Err("is not a memory quantity (for example 128Mi)")
    } else {
        Err("is not a CPU quantity (for example 100m or 2)")
    }
}

/// Sets `key` (dotted, camelCase) in `tree` to `raw`, typed like the value
/// already there.
fn set_path(tree: &mut Value, key: &str, raw: &str) -> Result<(), String> {
    let mut node = tree;
    let mut walked = String::new();
    for part in key.split('.') {
        let Value::Object(map) = node else {
            return Err(format!("{walked} is a value, not a group of keys"));
        };
        if !map.contains_key(part) {
            let mut known: Vec<&str> = map.keys().map(String::as_str).collect();
            known.sort_unstable();
            let place = if walked.is_empty() {
                "top level".to_string()
            } else {
                walked.clone()
            };
            return Err(format!(
                "unknown key {part:?} (at {place}: {})",
                known.join(", ")
            ));
        }
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
        node = map.get_mut(part).expect("checked above");
    }
    *node = match node {
        Value::Bool(_) => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(format!("expected true or false, got {raw:?}")),
        },
        Value::Number(n) if n.is_f64() => raw
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Value::from)
            .ok_or_else(|| format!("expected a number, got {raw:?}"))?,
        Value::Number(_) => raw
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("expected a whole number, got {raw:?}"))?,
        Value::String(_) => Value::String(raw.to_string()),
        _ => return Err("is a group of keys; name one of its keys".into()),
    };
    Ok(())
}

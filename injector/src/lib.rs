//! Sidecar injection as one pure function: [`inject`] turns a pod (its
//! metadata and spec) into a meshed one. The admission webhook and
//! `meshctl kube-inject` both call it, so what a cluster injects and what
//! a manifest shows are the same. [`decide`] says whether a pod is a
//! candidate at all.
//!
//! What it adds:
//! - `mesh-init`: an init container running `mesh-proxy init` with the
//!   capture rules (the only container with NET_ADMIN and NET_RAW);
//! - `mesh-proxy`: the sidecar (UID 1337, read-only root filesystem, no
//!   privilege escalation, requests and limits, readiness on 15021), a
//!   native sidecar (an init container with `restartPolicy: Always`) where
//!   the cluster supports it, else the first container, optionally holding
//!   the app until the proxy is ready;
//! - a projected service-account token for the mesh's CA and a memory
//!   volume for certificates;
//! - `sidecar.mesh.dev/status` recording what was added, and Prometheus
//!   scrape annotations for 15020;
//! - the app's HTTP probes rewritten to the sidecar's status port
//!   (`/app-health/<container>/<kind>` on 15020), which forwards them to
//!   the app, so they keep working when plaintext is refused.
//!
//! Injecting an injected pod returns it unchanged.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

pub const INIT_NAME: &str = "mesh-init";
pub const PROXY_NAME: &str = "mesh-proxy";
pub const STATUS_ANNOTATION: &str = "sidecar.mesh.dev/status";
pub const INJECT_KEY: &str = "sidecar.mesh.dev/inject";
pub const NAMESPACE_LABEL: &str = "mesh-injection";
pub const PROXY_UID: i64 = 1337;
/// The sidecar's status port: Prometheus metrics and app probes.
pub const STATUS_PORT: i32 = 15020;
pub const READY_PORT: i32 = 15021;
const TOKEN_VOLUME: &str = "mesh-token";
const CERTS_VOLUME: &str = "mesh-certs";
const ROOT_VOLUME: &str = "mesh-root";
/// The ConfigMap pilot keeps in every namespace with the mesh's roots.
const ROOT_CONFIGMAP: &str = "mesh-ca-root-cert";
const ROOT_PATH: &str = "/etc/mesh/root";
const TOKEN_PATH: &str = "/var/run/secrets/mesh";
const CERTS_PATH: &str = "/etc/mesh/certs";

/// Annotations a pod may set to change what is injected.
pub mod annotation {
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.mesh.dev/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.mesh.dev/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.mesh.dev/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.mesh.dev/excludeOutboundIPRanges";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.mesh.dev/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.mesh.dev/excludeOutboundPorts";
    pub const PROXY_CPU: &str = "sidecar.mesh.dev/proxyCPU";
    pub const PROXY_MEMORY: &str = "sidecar.mesh.dev/proxyMemory";
    pub const PROXY_CPU_LIMIT: &str = "sidecar.mesh.dev/proxyCPULimit";
    pub const PROXY_MEMORY_LIMIT: &str = "sidecar.mesh.dev/proxyMemoryLimit";
    pub const LOG_LEVEL: &str = "sidecar.mesh.dev/logLevel";
    pub const HOLD_APPLICATION: &str = "sidecar.mesh.dev/holdApplicationUntilProxyStarts";
    pub const REWRITE_PROBES: &str = "sidecar.mesh.dev/rewriteAppHTTPProbers";
}

/// What the mesh injects with: from the injector's mounted settings file,
/// or `meshctl kube-inject`'s flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Settings {
    /// The mesh-proxy image (init container and sidecar).
    pub proxy_image: String,
    pub image_pull_policy: Option<String>,
    /// Where sidecars reach pilot's xDS.
    pub pilot_address: String,
    /// Where sidecars get their certificates (pilot's TLS port); empty
    /// for none.
    pub ca_address: String,
    pub trust_domain: String,
    /// Audience of the projected token the proxy presents to the CA.
    pub ca_audience: String,
    pub proxy_cpu: String,
    pub proxy_memory: String,
    pub proxy_cpu_limit: String,
    pub proxy_memory_limit: String,
    pub log_level: String,
    /// Classic sidecars only: keep the app from starting until the proxy
    /// is ready.
    pub hold_application_until_proxy_starts: bool,
    pub rewrite_app_http_probes: bool,
    /// The namespace the control plane runs in: never injected.
    pub control_plane_namespace: String,
    /// A Zipkin collector (`host:port`) for the sidecars' spans; empty:
    /// no tracing.
    pub zipkin_address: String,
    /// Percentage of new traces sampled.
    pub trace_sampling: f64,
    /// Sidecar access logs: empty or `off`, `json`, `text`, or a template.
    pub access_log: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            proxy_image: format!("mesh/proxy:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            pilot_address: "mesh-pilot.mesh-system.svc:15010".into(),
            ca_address: "mesh-pilot.mesh-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            ca_audience: "mesh-ca".into(),
            proxy_cpu: "10m".into(),
            proxy_memory: "32Mi".into(),
            proxy_cpu_limit: "2".into(),
            proxy_memory_limit: "256Mi".into(),
            log_level: "info".into(),
            hold_application_until_proxy_starts: true,
            rewrite_app_http_probes: true,
            control_plane_namespace: "mesh-system".into(),
            zipkin_address: String::new(),
            trace_sampling: 1.0,
            access_log: String::new(),
        }
    }
}

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The pod says `sidecar.mesh.dev/inject: "false"`.
    PodDisabled,
    /// Neither the namespace nor the pod asks for injection.
    NotEnabled,
    /// The namespace says `mesh-injection=disabled` and the pod does not
    /// override it.
    NamespaceDisabled,
    ControlPlaneNamespace,
    KubeSystem,
    HostNetwork,
    AlreadyInjected,
}

impl Skip {
    /// For metrics and warnings.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::PodDisabled => "pod_disabled",
            Skip::NotEnabled => "not_enabled",
            Skip::NamespaceDisabled => "namespace_disabled",
            Skip::ControlPlaneNamespace => "control_plane_namespace",
            Skip::KubeSystem => "kube_system",
            Skip::HostNetwork => "host_network",
            Skip::AlreadyInjected => "already_injected",
        }
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::PodDisabled => "the pod sets sidecar.mesh.dev/inject=false",
            Skip::NotEnabled => "neither the namespace (mesh-injection=enabled) nor the pod (sidecar.mesh.dev/inject=true) asks for injection",
            Skip::NamespaceDisabled => "the namespace sets mesh-injection=disabled",
            Skip::ControlPlaneNamespace => "the control-plane namespace is never injected",
            Skip::KubeSystem => "kube-system is never injected",
            Skip::HostNetwork => "the pod uses the host's network",
            Skip::AlreadyInjected => "the pod is already injected",
        })
    }
}

fn flag(meta: &ObjectMeta, key: &str) -> Option<bool> {
    // The label wins over the annotation, as in Istio.
    let v = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .or_else(|| meta.annotations.as_ref().and_then(|a| a.get(key)))?;
    match v.to_ascii_lowercase().as_str() {
        "true" | "enabled" | "yes" | "y" => Some(true),
        "false" | "disabled" | "no" | "n" => Some(false),
        _ => None,
    }
}

/// Whether the webhook injects a pod of `namespace` (with its labels):
/// the pod's `sidecar.mesh.dev/inject` wins over the namespace's
/// `mesh-injection`; the control plane and kube-system never are.
pub fn decide(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    meta: &ObjectMeta,
    spec: &PodSpec,
    settings: &Settings,
) -> Result<(), Skip> {
    if namespace == "kube-system" {
        return Err(Skip::KubeSystem);
    }
    if namespace == settings.control_plane_namespace {
        return Err(Skip::ControlPlaneNamespace);
    }
    candidate(meta, spec)?;
    match (
        flag(meta, INJECT_KEY),
        namespace_labels.get(NAMESPACE_LABEL).map(String::as_str),
    ) {
        (Some(true), _) => Ok(()),
        (Some(false), _) => Err(Skip::PodDisabled),
        (None, Some("enabled")) => Ok(()),
        (None, Some("disabled")) => Err(Skip::NamespaceDisabled),
        (None, _) => Err(Skip::NotEnabled),
    }
}

/// Whether a pod can be injected at all (manual injection asks no
/// namespace, but still honours the pod's own opt-out).
pub fn candidate(meta: &ObjectMeta, spec: &PodSpec) -> Result<(), Skip> {
    if is_injected(meta, spec) {
        return Err(Skip::AlreadyInjected);
    }
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    if flag(meta, INJECT_KEY) == Some(false) {
        return Err(Skip::PodDisabled);
    }
    Ok(())
}

fn is_injected(meta: &ObjectMeta, spec: &PodSpec) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STATUS_ANNOTATION))
        || spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_NAME)
}

/// Where the pod will run: decides native or classic sidecars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Kubernetes minor version (1.x); native sidecars from 1.29.
    pub minor: u32,
}

impl Cluster {
    pub fn native_sidecars(self) -> bool {
        self.minor >= 29
    }
}

/// A value that cannot be used, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct InjectError {
    pub field: String,
    pub message: String,
}

/// What injection recorded on the pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub init_containers: Vec<String>,
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
    pub native_sidecar: bool,
    pub version: String,
}

/// Injects a pod: returns the new metadata and spec. A pod that is not a
/// candidate ([`candidate`]) comes back unchanged.
pub fn inject(
    meta: &ObjectMeta,
    spec: &PodSpec,
    settings: &Settings,
    cluster: Cluster,
) -> Result<(ObjectMeta, PodSpec), InjectError> {
    if candidate(meta, spec).is_err() {
        return Ok((meta.clone(), spec.clone()));
    }
    let ann = meta.annotations.clone().unwrap_or_default();
    let get = |k: &str| ann.get(k).map(String::as_str);
    let mut meta = meta.clone();
    let mut spec = spec.clone();
    let native = cluster.native_sidecars();

    // Probes first: the sidecar's env carries where they really go.
    let rewrite = match get(annotation::REWRITE_PROBES) {
        Some(v) => v == "true",
        None => settings.rewrite_app_http_probes,
    };
    let probers = if rewrite {
        rewrite_probes(&mut spec.containers)?
    } else {
        BTreeMap::new()
    };

    let init = init_container(settings, &ann)?;
    let mut proxy = proxy_container(settings, &ann, &meta, &probers)?;
    let hold = get(annotation::HOLD_APPLICATION)
        .map(|v| v == "true")
        .unwrap_or(settings.hold_application_until_proxy_starts);
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    // Capture rules before anything else runs: other init containers'
    // traffic is then the proxy's to carry (native) or passes (classic:
    // the proxy is not up yet, so they run before capture).
    if native {
        proxy.restart_policy = Some("Always".into());
        inits.insert(0, init);
        inits.insert(1, proxy);
    } else {
        inits.push(init);
        if hold {
            proxy.lifecycle = Some(Lifecycle {
                post_start: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(vec![
                            "mesh-proxy".into(),
                            "wait".into(),
                            "--timeout".into(),
                            "60s".into(),
                        ]),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        spec.containers.insert(0, proxy);
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(settings.ca_audience.clone()),
                    expiration_seconds: Some(43200),
                    path: "token".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: CERTS_VOLUME.into(),
        empty_dir: Some(k8s_openapi::api::core::v1::EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            ..Default::default()
        }),
        ..Default::default()
    });

    volumes.push(Volume {
        name: ROOT_VOLUME.into(),
        config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
            name: ROOT_CONFIGMAP.into(),
            // Pods may start before pilot has written it.
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    });

    let status = Status {
        init_containers: if native {
            vec![INIT_NAME.into(), PROXY_NAME.into()]
        } else {
            vec![INIT_NAME.into()]
        },
        containers: if native {
            vec![]
        } else {
            vec![PROXY_NAME.into()]
        },
        volumes: vec![TOKEN_VOLUME.into(), CERTS_VOLUME.into(), ROOT_VOLUME.into()],
        native_sidecar: native,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    // Other sidecars talk mTLS to pods with this label.
    meta.labels.get_or_insert_with(BTreeMap::new).insert(
        mesh_api::security::TLS_MODE_LABEL.into(),
        mesh_api::security::TLS_MODE_MESH.into(),
    );
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(
        STATUS_ANNOTATION.into(),
        serde_json::to_string(&status).unwrap_or_default(),
    );
    annotations
        .entry("prometheus.io/scrape".into())
        .or_insert_with(|| "true".into());
    annotations
        .entry("prometheus.io/port".into())
        .or_insert_with(|| STATUS_PORT.to_string());
    annotations
        .entry("prometheus.io/path".into())
        .or_insert_with(|| "/stats/prometheus".into());
    Ok((meta, spec))
}

fn quantity(
    ann: &BTreeMap<String, String>,
    key: &str,
    default: &str,
) -> Result<Quantity, InjectError> {
    let v = ann.get(key).map(String::as_str).unwrap_or(default);
    // A Kubernetes quantity: digits with an optional decimal part and suffix.
    let ok = !v.is_empty()
        && v.chars().next().is_some_and(|c| c.is_ascii_digit())
        && v.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
            .chars()
            .all(|c| c.is_ascii_alphabetic())
        && matches!(
            v.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.'),
            "" | "m" | "k" | "M" | "G" | "T" | "Ki" | "Mi" | "Gi" | "Ti"
        );
    if !ok {
        return Err(InjectError {
            field: format!("metadata.annotations[{key}]"),
            message: format!("not a quantity: {v:?}"),
        });
    }
    Ok(Quantity(v.to_string()))
}

/// A comma-separated list of ports (or `*`), checked.
fn port_list(ann: &BTreeMap<String, String>, key: &str) -> Result<Option<String>, InjectError> {
    let Some(v) = ann.get(key) else {
        return Ok(None);
    };
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item != "*" && item.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(InjectError {
                field: format!("metadata.annotations[{key}]"),
                message: format!("not a port: {item:?}"),
            });
        }
    }
    Ok(Some(v.replace(' ', "")))
}

/// A comma-separated list of CIDRs (or `*`), checked.
fn cidr_list(ann: &BTreeMap<String, String>, key: &str) -> Result<Option<String>, InjectError> {
    let Some(v) = ann.get(key) else {
        return Ok(None);
    };
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (ip, len) = item.split_once('/').unwrap_or((item, ""));
        let max = match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => Some(32),
            Ok(std::net::IpAddr::V6(_)) => Some(128),
            Err(_) => None,
        };
        let ok = item == "*"
            || max.is_some_and(|max| len.is_empty() || len.parse::<u8>().is_ok_and(|l| l <= max));
        if !ok {
            return Err(InjectError {
                field: format!("metadata.annotations[{key}]"),
                message: format!("not a CIDR: {item:?}"),
            });
        }
    }
    Ok(Some(v.replace(' ', "")))
}

fn image_pull_policy(settings: &Settings) -> Option<String> {
    settings.image_pull_policy.clone()
}

fn init_container(
    settings: &Settings,
    ann: &BTreeMap<String, String>,
) -> Result<Container, InjectError> {
    let mut args: Vec<String> = vec![
        "init".into(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--proxy-gid".into(),
        PROXY_UID.to_string(),
    ];
    for (key, flag) in [
        (annotation::INCLUDE_INBOUND_PORTS, "--inbound-ports"),
        (annotation::EXCLUDE_INBOUND_PORTS, "--exclude-inbound-ports"),
        (
            annotation::INCLUDE_OUTBOUND_PORTS,
            "--include-outbound-ports",
        ),
        (
            annotation::EXCLUDE_OUTBOUND_PORTS,
            "--exclude-outbound-ports",
        ),
    ] {
        if let Some(v) = port_list(ann, key)? {
            args.push(flag.into());
            args.push(v);
        }
    }
    for (key, flag) in [
        (annotation::INCLUDE_OUTBOUND_IP_RANGES, "--outbound-ips"),
        (
            annotation::EXCLUDE_OUTBOUND_IP_RANGES,
            "--exclude-outbound-ips",
        ),
    ] {
        if let Some(v) = cidr_list(ann, key)? {
            args.push(flag.into());
            args.push(v);
        }
    }
    Ok(Container {
        name: INIT_NAME.into(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: image_pull_policy(settings),
        command: Some(vec!["mesh-proxy".into()]),
        args: Some(args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".into(), Quantity("100m".into())),
                ("memory".into(), Quantity("64Mi".into())),
            ])),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
        value: None,
    }
}

fn value_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn proxy_container(
    settings: &Settings,
    ann: &BTreeMap<String, String>,
    meta: &ObjectMeta,
    probers: &BTreeMap<String, serde_json::Value>,
) -> Result<Container, InjectError> {
    let log_level = ann
        .get(annotation::LOG_LEVEL)
        .cloned()
        .unwrap_or_else(|| settings.log_level.clone());
    if !matches!(
        log_level.as_str(),
        "trace" | "debug" | "info" | "warn" | "error" | "off"
    ) {
        return Err(InjectError {
            field: format!("metadata.annotations[{}]", annotation::LOG_LEVEL),
            message: format!("one of trace, debug, info, warn, error, off; got {log_level:?}"),
        });
    }
    let labels = meta
        .labels
        .iter()
        .flatten()
        .filter(|(k, v)| !k.contains(',') && !v.contains(','))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("MESH_WORKLOAD", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        value_env("MESH_XDS_ADDR", settings.pilot_address.clone()),
        value_env("MESH_TRUST_DOMAIN", settings.trust_domain.clone()),
        value_env("MESH_LABELS", labels),
        value_env("MESH_LOG", log_level),
    ];
    if !settings.ca_address.is_empty() {
        env.push(value_env("MESH_CA_ADDR", settings.ca_address.clone()));
    }
    if !settings.zipkin_address.is_empty() {
        env.push(value_env(
            "MESH_ZIPKIN_ADDR",
            settings.zipkin_address.clone(),
        ));
        env.push(value_env(
            "MESH_TRACE_SAMPLING",
            settings.trace_sampling.to_string(),
        ));
    }
    if !settings.access_log.is_empty() && settings.access_log != "off" {
        env.push(value_env("MESH_ACCESS_LOG", settings.access_log.clone()));
    }
    if !probers.is_empty() {
        env.push(value_env(
            "MESH_APP_PROBERS",
            serde_json::to_string(probers).unwrap_or_default(),
        ));
    }
    Ok(Container {
        name: PROXY_NAME.into(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: image_pull_policy(settings),
        command: Some(vec!["mesh-proxy".into()]),
        args: Some(vec!["--mode".into(), "sidecar".into()]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http-mesh-prom".into()),
            container_port: STATUS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(READY_PORT),
                ..Default::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(30),
            timeout_seconds: Some(3),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                (
                    "cpu".into(),
                    quantity(ann, annotation::PROXY_CPU, &settings.proxy_cpu)?,
                ),
                (
                    "memory".into(),
                    quantity(ann, annotation::PROXY_MEMORY, &settings.proxy_memory)?,
                ),
            ])),
            limits: Some(BTreeMap::from([
                (
                    "cpu".into(),
                    quantity(ann, annotation::PROXY_CPU_LIMIT, &settings.proxy_cpu_limit)?,
                ),
                (
                    "memory".into(),
                    quantity(
                        ann,
                        annotation::PROXY_MEMORY_LIMIT,
                        &settings.proxy_memory_limit,
                    )?,
                ),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: CERTS_VOLUME.into(),
                mount_path: CERTS_PATH.into(),
                ..Default::default()
            },
            VolumeMount {
                name: ROOT_VOLUME.into(),
                mount_path: ROOT_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    })
}

/// Rewrites every container's HTTP probes to the sidecar's status port;
/// returns, by new path, where each really goes (for `MESH_APP_PROBERS`).
fn rewrite_probes(
    containers: &mut [Container],
) -> Result<BTreeMap<String, serde_json::Value>, InjectError> {
    let mut probers = BTreeMap::new();
    for (ci, c) in containers.iter_mut().enumerate() {
        let named: BTreeMap<String, i32> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        let name = c.name.clone();
        for (kind, field, probe) in [
            ("livez", "livenessProbe", c.liveness_probe.as_mut()),
            ("readyz", "readinessProbe", c.readiness_probe.as_mut()),
            ("startupz", "startupProbe", c.startup_probe.as_mut()),
        ] {
            let Some(probe) = probe else { continue };
            let Some(get) = probe.http_get.as_mut() else {
                continue;
            };
            // HTTPS probes are left alone: the proxy forwards plain HTTP.
            if get
                .scheme
                .as_deref()
                .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
            {
                continue;
            }
            let port = match &get.port {
                IntOrString::Int(p) => *p,
                IntOrString::String(s) => match named.get(s) {
                    Some(p) => *p,
                    None => {
                        return Err(InjectError {
                            field: format!("spec.containers[{ci}].{field}.httpGet.port"),
                            message: format!("no container port named {s:?}"),
                        });
                    }
                },
            };
            let path = format!("/app-health/{name}/{kind}");
            let mut target = serde_json::json!({
                "port": port,
                "path": get.path.clone().unwrap_or_else(|| "/".into()),
                "scheme": get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
            });
            if let Some(h) = &get.http_headers {
                target["httpHeaders"] = serde_json::to_value(h).unwrap_or_default();
            }
            if let Some(host) = &get.host {
                target["host"] = host.clone().into();
            }
            if let Some(t) = probe.timeout_seconds {
                target["timeoutSeconds"] = t.into();
            }
            probers.insert(path.clone(), target);
            *get = HTTPGetAction {
                path: Some(path),
                port: IntOrString::Int(STATUS_PORT),
                scheme: Some("HTTP".into()),
                ..Default::default()
            };
        }
    }
    Ok(probers)
}

pub mod webhook;

#[cfg(test)]
mod tests;

/// Where a kind keeps its pod template, as a path of keys.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// A document that could not be injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("document {index} ({kind} {name}): {message}")]
pub struct DocumentError {
    /// 1-based.
    pub index: usize,
    pub kind: String,
    pub name: String,
    pub message: String,
}

/// `meshctl kube-inject`: injects every workload of a multi-document YAML
/// stream (Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs,
/// CronJobs, ReplicationControllers); every other document comes out
/// unchanged, in the same order.
pub fn inject_documents(
    text: &str,
    settings: &Settings,
    cluster: Cluster,
) -> Result<String, DocumentError> {
    let mut out = String::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |kind: &str, name: &str, message: String| DocumentError {
            index: i + 1,
            kind: kind.to_string(),
            name: name.to_string(),
            message,
        };
        let mut value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| fail("?", "?", format!("not YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(path) = template_path(&kind) {
            let mut at = &mut value;
            for key in path {
                at = &mut at[*key];
            }
            let where_ = path.join(".");
            let prefix = if where_.is_empty() {
                String::new()
            } else {
                format!("{where_}.")
            };
            let meta: ObjectMeta = serde_yaml::from_value(at["metadata"].clone())
                .map_err(|e| fail(&kind, &name, format!("{prefix}metadata: {e}")))?;
            let spec: PodSpec = serde_yaml::from_value(at["spec"].clone())
                .map_err(|e| fail(&kind, &name, format!("{prefix}spec: {e}")))?;
            let (meta, spec) = inject(&meta, &spec, settings, cluster)
                .map_err(|e| fail(&kind, &name, format!("{prefix}{e}")))?;
            let to_value = |v: serde_json::Value| {
                serde_yaml::to_value(v).map_err(|e| fail(&kind, &name, e.to_string()))
            };
            at["metadata"] = to_value(serde_json::to_value(&meta).unwrap_or_default())?;
            at["spec"] = to_value(serde_json::to_value(&spec).unwrap_or_default())?;
        }
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_yaml::to_string(&value).map_err(|e| fail(&kind, &name, e.to_string()))?,
        );
    }
    Ok(out)
}

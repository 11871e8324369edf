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
//!   native sidecar (an init container with `restartPolicy: Always` and a
//!   startup probe, so later init containers and the app start once the
//!   proxy is ready) where the cluster supports it, else the first
//!   container, optionally holding the app until the proxy is ready;
//! - a projected service-account token for the mesh's CA and a memory
//!   volume for certificates;
//! - `sidecar.mesh.dev/status` recording what was added, and Prometheus
//!   scrape annotations for 15020;
//! - the app's HTTP probes rewritten to the sidecar's status port
//!   (`/app-health/<container>/<kind>` on 15020), which forwards them to
//!   the app, so they keep working when plaintext is refused.
//!
//! Injecting an injected pod changes only what a later admission webhook
//! may have added since: HTTP probes of app containers not yet rewritten
//! are rewritten and the sidecar's `MESH_APP_PROBERS` updated. Injecting
//! twice is injecting once: `inject(inject(p)) == inject(p)`.
//!
//! Every annotation value is checked the way its consumer reads it (the
//! capture lists with `mesh-proxy init`'s own parser from
//! [`mesh_api::capture`]), so a pod is either injected with values that
//! work or not injected, with an error naming the annotation and value.

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
use mesh_api::capture::{self, ListError};
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
    /// Where sidecars reach pilot's xDS: `https://` for TLS checked
    /// against the mesh root (the default, pilot's 15012).
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
            pilot_address: "https://mesh-pilot.mesh-system.svc:15012".into(),
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
    /// The pod's `sidecar.mesh.dev/inject` is neither `"true"` nor
    /// `"false"`.
    InvalidInjectValue,
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
            Skip::InvalidInjectValue => "invalid_inject_value",
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
            Skip::InvalidInjectValue => {
                "the pod's sidecar.mesh.dev/inject is neither \"true\" nor \"false\""
            }
            Skip::NotEnabled => "neither the namespace (mesh-injection=enabled) nor the pod (sidecar.mesh.dev/inject=true) asks for injection",
            Skip::NamespaceDisabled => "the namespace sets mesh-injection=disabled",
            Skip::ControlPlaneNamespace => "the control-plane namespace is never injected",
            Skip::KubeSystem => "kube-system is never injected",
            Skip::HostNetwork => "the pod uses the host's network",
            Skip::AlreadyInjected => "the pod is already injected",
        })
    }
}

/// What the pod's `sidecar.mesh.dev/inject` says. The label wins over the
/// annotation, as in Istio. Only `"true"` and `"false"` count: they are the
/// values the MutatingWebhookConfiguration's object selectors match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    Unset,
    Inject,
    DoNotInject,
    Invalid,
}

fn pod_choice(meta: &ObjectMeta) -> Choice {
    let value = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_KEY))
        .or_else(|| meta.annotations.as_ref().and_then(|a| a.get(INJECT_KEY)));
    match value.map(String::as_str) {
        None => Choice::Unset,
        Some("true") => Choice::Inject,
        Some("false") => Choice::DoNotInject,
        Some(_) => Choice::Invalid,
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
        pod_choice(meta),
        namespace_labels.get(NAMESPACE_LABEL).map(String::as_str),
    ) {
        (Choice::Inject, _) | (Choice::Unset, Some("enabled")) => Ok(()),
        (Choice::Unset, Some("disabled")) => Err(Skip::NamespaceDisabled),
        (Choice::Unset, _) => Err(Skip::NotEnabled),
        // candidate() has refused these already.
        (Choice::DoNotInject, _) => Err(Skip::PodDisabled),
        (Choice::Invalid, _) => Err(Skip::InvalidInjectValue),
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
    match pod_choice(meta) {
        Choice::DoNotInject => Err(Skip::PodDisabled),
        Choice::Invalid => Err(Skip::InvalidInjectValue),
        Choice::Unset | Choice::Inject => Ok(()),
    }
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
/// candidate ([`candidate`]) comes back unchanged; an injected one gets
/// only the probes of containers added since rewritten
/// ([`Skip::AlreadyInjected`] still holds for it).
pub fn inject(
    meta: &ObjectMeta,
    spec: &PodSpec,
    settings: &Settings,
    cluster: Cluster,
) -> Result<(ObjectMeta, PodSpec), InjectError> {
    match candidate(meta, spec) {
        Ok(()) => {}
        Err(Skip::AlreadyInjected) => return update_probes(meta, spec, settings),
        Err(_) => return Ok((meta.clone(), spec.clone())),
    }
    let ann = meta.annotations.clone().unwrap_or_default();
    let mut meta = meta.clone();
    let mut spec = spec.clone();
    let native = cluster.native_sidecars();

    // Probes first: the sidecar's env carries where they really go.
    let rewrite = bool_annotation(
        &ann,
        annotation::REWRITE_PROBES,
        settings.rewrite_app_http_probes,
    )?;
    let hold = bool_annotation(
        &ann,
        annotation::HOLD_APPLICATION,
        settings.hold_application_until_proxy_starts,
    )?;
    let probers = if rewrite {
        rewrite_probes(&mut spec.containers)?
    } else {
        BTreeMap::new()
    };

    let init = init_container(settings, &ann)?;
    let mut proxy = proxy_container(settings, &ann, &meta, &probers)?;
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    // Capture rules before anything else runs. Native: the kubelet starts
    // the init containers after the sidecar only once its startup probe
    // passes, so their traffic, captured, reaches a proxy that is ready.
    // Classic: the proxy is not up before the app, so the capture rules
    // come last and other init containers run uncaptured.
    if native {
        proxy.restart_policy = Some("Always".into());
        proxy.startup_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(READY_PORT),
                ..Default::default()
            }),
            // Checked every second for up to 10 minutes (Istio's
            // numbers): the first config and certificate can take a while
            // on a busy control plane, and a sidecar that never becomes
            // ready is restarted.
            period_seconds: Some(1),
            timeout_seconds: Some(3),
            failure_threshold: Some(600),
            ..Default::default()
        });
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

const PROBERS_ENV: &str = "MESH_APP_PROBERS";

/// An injected pod again (the API server reinvokes the webhook after a
/// later webhook changed the pod): HTTP probes of app containers that are
/// not rewritten yet are rewritten, and the sidecar's `MESH_APP_PROBERS`
/// gets their targets. Nothing else changes; a pod whose sidecar is not
/// the mesh's comes back unchanged.
fn update_probes(
    meta: &ObjectMeta,
    spec: &PodSpec,
    settings: &Settings,
) -> Result<(ObjectMeta, PodSpec), InjectError> {
    let unchanged = || Ok((meta.clone(), spec.clone()));
    let ann = meta.annotations.clone().unwrap_or_default();
    if !bool_annotation(
        &ann,
        annotation::REWRITE_PROBES,
        settings.rewrite_app_http_probes,
    )? {
        return unchanged();
    }
    let mut spec = spec.clone();
    let added = rewrite_probes(&mut spec.containers)?;
    if added.is_empty() {
        return unchanged();
    }
    let Some((at, proxy)) = spec
        .containers
        .iter_mut()
        .enumerate()
        .map(|(i, c)| (format!("spec.containers[{i}]"), c))
        .chain(
            spec.init_containers
                .iter_mut()
                .flatten()
                .enumerate()
                .map(|(i, c)| (format!("spec.initContainers[{i}]"), c)),
        )
        .find(|(_, c)| c.name == PROXY_NAME)
    else {
        return unchanged();
    };
    let env = proxy.env.get_or_insert_with(Vec::new);
    match env
        .iter_mut()
        .enumerate()
        .find(|(_, e)| e.name == PROBERS_ENV)
    {
        Some((i, var)) => {
            let mut all: BTreeMap<String, serde_json::Value> =
                serde_json::from_str(var.value.as_deref().unwrap_or("{}")).map_err(|e| {
                    InjectError {
                        field: format!("{at}.env[{i}]"),
                        message: format!("{PROBERS_ENV} is not the injector's: {e}"),
                    }
                })?;
            all.extend(added);
            var.value = Some(json_text(&all));
            var.value_from = None;
        }
        None => env.push(value_env(PROBERS_ENV, json_text(&added))),
    }
    Ok((meta.clone(), spec))
}

fn json_text(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn annotation_error(key: &str, message: String) -> InjectError {
    InjectError {
        field: format!("metadata.annotations[{key}]"),
        message,
    }
}

/// A boolean annotation: `"true"` or `"false"`, nothing else.
fn bool_annotation(
    ann: &BTreeMap<String, String>,
    key: &str,
    default: bool,
) -> Result<bool, InjectError> {
    match ann.get(key).map(String::as_str) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(annotation_error(
            key,
            format!("must be \"true\" or \"false\", got {other:?}"),
        )),
    }
}

/// Where the sidecar's resources come from, for error messages.
#[derive(Clone, Copy)]
enum Source {
    Annotation(&'static str),
    Setting(&'static str),
}

impl Source {
    fn field(self) -> String {
        match self {
            Source::Annotation(key) => format!("metadata.annotations[{key}]"),
            Source::Setting(name) => format!("settings.{name}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Source::Annotation(name) | Source::Setting(name) => name,
        }
    }
}

/// The sidecar's requests and limits, as Istio's injection template makes
/// them: when the pod sets any of `proxyCPU`, `proxyMemory`,
/// `proxyCPULimit`, `proxyMemoryLimit`, those annotations alone give the
/// resources (an annotated request never meets a default limit below
/// it); otherwise the settings do. Unlike Istio, which hands a request
/// above its limit to the API server to refuse the pod, a request above
/// its limit is refused here, naming both.
fn proxy_resources(
    settings: &Settings,
    ann: &BTreeMap<String, String>,
) -> Result<ResourceRequirements, InjectError> {
    use annotation::{PROXY_CPU, PROXY_CPU_LIMIT, PROXY_MEMORY, PROXY_MEMORY_LIMIT};
    let annotated = [PROXY_CPU, PROXY_MEMORY, PROXY_CPU_LIMIT, PROXY_MEMORY_LIMIT]
        .iter()
        .any(|k| ann.contains_key(*k));
    let pick = |key: &'static str, setting: &'static str, default: &str| {
        if annotated {
            ann.get(key).map(|v| (Source::Annotation(key), v.clone()))
        } else {
            Some((Source::Setting(setting), default.to_string()))
        }
    };
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (resource, request, limit) in [
        (
            "cpu",
            pick(PROXY_CPU, "proxyCPU", &settings.proxy_cpu),
            pick(PROXY_CPU_LIMIT, "proxyCPULimit", &settings.proxy_cpu_limit),
        ),
        (
            "memory",
            pick(PROXY_MEMORY, "proxyMemory", &settings.proxy_memory),
            pick(
                PROXY_MEMORY_LIMIT,
                "proxyMemoryLimit",
                &settings.proxy_memory_limit,
            ),
        ),
    ] {
        let checked = |q: Option<(Source, String)>| -> Result<_, InjectError> {
            q.map(|(source, text)| match quantity::parse(&text) {
                Some(value) => Ok((source, text, value)),
                None => Err(InjectError {
                    field: source.field(),
                    message: format!("not a Kubernetes quantity (like 100m, 0.5, 128Mi): {text:?}"),
                }),
            })
            .transpose()
        };
        let request = checked(request)?;
        let limit = checked(limit)?;
        if let (Some((source, req, r)), Some((limit_source, lim, l))) = (&request, &limit)
            && r > l
        {
            return Err(InjectError {
                field: source.field(),
                message: format!(
                    "the request {req:?} is more than the limit {lim:?} ({}); a request may not exceed its limit",
                    limit_source.name()
                ),
            });
        }
        if let Some((_, text, _)) = request {
            requests.insert(resource.to_string(), Quantity(text));
        }
        if let Some((_, text, _)) = limit {
            limits.insert(resource.to_string(), Quantity(text));
        }
    }
    Ok(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    })
}

impl Settings {
    /// Checks the values injection copies into every pod: the proxy's
    /// resources (quantities, requests within limits) and log level. An
    /// error names the setting.
    pub fn validate(&self) -> Result<(), InjectError> {
        proxy_resources(self, &BTreeMap::new())?;
        log_level(self, &BTreeMap::new())?;
        Ok(())
    }
}

fn log_level(settings: &Settings, ann: &BTreeMap<String, String>) -> Result<String, InjectError> {
    let (level, field) = match ann.get(annotation::LOG_LEVEL) {
        Some(v) => (
            v.clone(),
            format!("metadata.annotations[{}]", annotation::LOG_LEVEL),
        ),
        None => (settings.log_level.clone(), "settings.logLevel".to_string()),
    };
    if !matches!(
        level.as_str(),
        "trace" | "debug" | "info" | "warn" | "error" | "off"
    ) {
        return Err(InjectError {
            field,
            message: format!("one of trace, debug, info, warn, error, off; got {level:?}"),
        });
    }
    Ok(level)
}

/// A capture-list annotation, checked with `mesh-proxy init`'s parser and
/// written in canonical form (what init reads back the same).
fn capture_annotation(
    ann: &BTreeMap<String, String>,
    key: &str,
    parse: fn(&str) -> Result<String, ListError>,
) -> Result<Option<String>, InjectError> {
    let Some(v) = ann.get(key) else {
        return Ok(None);
    };
    parse(v).map(Some).map_err(|e| {
        annotation_error(
            key,
            match e {
                ListError::InvalidPort { value } => {
                    format!("not a port: {value:?} (an integer 1-65535)")
                }
                ListError::InvalidCidr { value, reason } => {
                    format!("not a CIDR: {value:?} ({reason})")
                }
                ListError::MixedWildcard { value } => {
                    format!("{value:?}: \"*\" must be the only value")
                }
            },
        )
    })
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
    let ports = |v: &str| capture::port_list(v).map(|l| capture::join(&l));
    let ports_or_all = |v: &str| capture::port_capture(v).map(|c| c.to_string());
    let cidrs = |v: &str| capture::cidr_list(v).map(|l| capture::join(&l));
    let cidrs_or_all = |v: &str| capture::cidr_capture(v).map(|c| c.to_string());
    type Render = fn(&str) -> Result<String, ListError>;
    for (key, flag, render) in [
        (
            annotation::INCLUDE_INBOUND_PORTS,
            "--inbound-ports",
            ports_or_all as Render,
        ),
        (
            annotation::EXCLUDE_INBOUND_PORTS,
            "--exclude-inbound-ports",
            ports,
        ),
        (
            annotation::INCLUDE_OUTBOUND_PORTS,
            "--include-outbound-ports",
            ports,
        ),
        (
            annotation::EXCLUDE_OUTBOUND_PORTS,
            "--exclude-outbound-ports",
            ports,
        ),
        (
            annotation::INCLUDE_OUTBOUND_IP_RANGES,
            "--outbound-ips",
            cidrs_or_all,
        ),
        (
            annotation::EXCLUDE_OUTBOUND_IP_RANGES,
            "--exclude-outbound-ips",
            cidrs,
        ),
    ] {
        if let Some(v) = capture_annotation(ann, key, render)? {
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
    let log_level = log_level(settings, ann)?;
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
        env.push(value_env(PROBERS_ENV, json_text(probers)));
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
        resources: Some(proxy_resources(settings, ann)?),
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

/// Whether a probe already goes through the sidecar's status port.
fn is_rewritten(get: &HTTPGetAction) -> bool {
    get.port == IntOrString::Int(STATUS_PORT)
        && get
            .path
            .as_deref()
            .is_some_and(|p| p.starts_with("/app-health/"))
}

/// Rewrites the HTTP probes of the app's containers to the sidecar's
/// status port (the sidecar's own and already rewritten ones are left
/// alone); returns, by new path, where each really goes (for
/// `MESH_APP_PROBERS`, in the form the proxy reads).
fn rewrite_probes(
    containers: &mut [Container],
) -> Result<BTreeMap<String, serde_json::Value>, InjectError> {
    let mut probers = BTreeMap::new();
    for (ci, c) in containers.iter_mut().enumerate() {
        if c.name == PROXY_NAME {
            continue;
        }
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
                || is_rewritten(get)
            {
                continue;
            }
            let at = format!("spec.containers[{ci}].{field}.httpGet.port");
            let port = match &get.port {
                IntOrString::Int(p) => *p,
                IntOrString::String(s) => match named.get(s) {
                    Some(p) => *p,
                    None => {
                        return Err(InjectError {
                            field: at,
                            message: format!("no container port named {s:?}"),
                        });
                    }
                },
            };
            let Some(port) = u16::try_from(port).ok().filter(|p| *p != 0) else {
                return Err(InjectError {
                    field: at,
                    message: format!("{port} is not a port (1-65535)"),
                });
            };
            // The kubelet asks for "/" when there is no path and puts a
            // "/" before a path without one; the proxy asks the same.
            let path = match get.path.as_deref() {
                None | Some("") => "/".to_string(),
                Some(p) if p.starts_with('/') => p.to_string(),
                Some(p) => format!("/{p}"),
            };
            let mut target = serde_json::json!({
                "port": port,
                "path": path,
                "scheme": get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
            });
            if let Some(h) = &get.http_headers {
                target["httpHeaders"] = serde_json::to_value(h).unwrap_or_default();
            }
            if let Some(host) = &get.host {
                target["host"] = host.clone().into();
            }
            if let Some(t) = probe.timeout_seconds.filter(|t| *t > 0) {
                target["timeoutSeconds"] = t.into();
            }
            let new_path = format!("/app-health/{name}/{kind}");
            probers.insert(new_path.clone(), target);
            *get = HTTPGetAction {
                path: Some(new_path),
                port: IntOrString::Int(STATUS_PORT),
                scheme: Some("HTTP".into()),
                ..Default::default()
            };
        }
    }
    Ok(probers)
}

/// Reads a pod given as JSON (as the API server sends it, or a manifest's
/// pod template): its metadata (absent is empty) and spec.
pub fn parse_pod(pod: &serde_json::Value) -> Result<(ObjectMeta, PodSpec), InjectError> {
    let meta = match pod.get("metadata") {
        None | Some(serde_json::Value::Null) => ObjectMeta::default(),
        Some(m) => ObjectMeta::deserialize(m).map_err(|e| InjectError {
            field: "metadata".into(),
            message: e.to_string(),
        })?,
    };
    let spec = match pod.get("spec") {
        None | Some(serde_json::Value::Null) => {
            return Err(InjectError {
                field: "spec".into(),
                message: "missing".into(),
            });
        }
        Some(s) => PodSpec::deserialize(s).map_err(|e| InjectError {
            field: "spec".into(),
            message: e.to_string(),
        })?,
    };
    Ok((meta, spec))
}

/// What [`inject_pod`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct Patched {
    /// The JSON Patch (RFC 6902) operations; empty when nothing changes.
    pub patch: Vec<serde_json::Value>,
    /// The pod with the patch applied.
    pub pod: serde_json::Value,
}

/// Injects a pod given as JSON, `meta` and `spec` being what
/// [`parse_pod`] read from it. The patch is computed between the typed
/// pod and the typed injected pod, so it touches only what injection
/// changed: fields the Kubernetes types here do not know (a newer API's)
/// stay as they are. The patch is applied to `pod` before it is returned,
/// so a patch that does not apply is an error here, not at the API server.
pub fn inject_pod(
    pod: &serde_json::Value,
    meta: &ObjectMeta,
    spec: &PodSpec,
    settings: &Settings,
    cluster: Cluster,
) -> Result<Patched, InjectError> {
    let (new_meta, new_spec) = inject(meta, spec, settings, cluster)?;
    let typed = |meta: &ObjectMeta, spec: &PodSpec| -> Result<serde_json::Value, InjectError> {
        let fail = |e: serde_json::Error| InjectError {
            field: "pod".into(),
            message: e.to_string(),
        };
        Ok(serde_json::json!({
            "metadata": serde_json::to_value(meta).map_err(fail)?,
            "spec": serde_json::to_value(spec).map_err(fail)?,
        }))
    };
    let mut ops = patch::diff(&typed(meta, spec)?, &typed(&new_meta, &new_spec)?);
    if ops.is_empty() {
        return Ok(Patched {
            patch: ops,
            pod: pod.clone(),
        });
    }
    if !pod
        .get("metadata")
        .is_some_and(serde_json::Value::is_object)
    {
        ops.insert(
            0,
            serde_json::json!({"op": "add", "path": "/metadata", "value": {}}),
        );
    }
    let fail = |e: String| InjectError {
        field: "pod".into(),
        message: format!("the injection does not apply: {e}"),
    };
    let parsed: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops.clone()))
        .map_err(|e| fail(e.to_string()))?;
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &parsed).map_err(|e| fail(e.to_string()))?;
    Ok(Patched {
        patch: ops,
        pod: patched,
    })
}

mod documents;
mod patch;
mod quantity;
pub mod webhook;

pub use documents::{DocumentError, inject_documents};

#[cfg(test)]
mod tests;

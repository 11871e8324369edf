//! From values to the objects an installation is made of: the YAML in
//! `manifests/` (embedded), adjusted to the values, plus what is generated
//! (the CA and webhook Secrets, the injector's settings, the Grafana
//! dashboards, the mesh-wide PeerAuthentication).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::values::{Component, Gateway, Resources, Values};

/// The namespace the control plane is installed in.
pub const NAMESPACE: &str = "mesh-system";
/// The label on every object install creates; uninstall and pruning
/// select by it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "meshctl";
/// Which part of the installation an object belongs to.
pub const COMPONENT_LABEL: &str = "mesh.dev/component";
/// The Secret holding pilot's CA (mounted as its `--ca-dir`).
pub const CA_SECRET: &str = "mesh-ca";
/// The Secret holding the injector's serving certificate.
pub const WEBHOOK_SECRET: &str = "mesh-injector-tls";
pub const WEBHOOK_NAME: &str = "mesh-sidecar-injector";
/// The DNS name the API server calls the webhook at.
pub const WEBHOOK_DNS: &str = "mesh-injector.mesh-system.svc";

/// The parts of an installation, in the order they are applied; each
/// part waits for the one before it to be ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// The namespace and the CRDs (established before anything uses them).
    Base,
    /// Pilot and its CA.
    Pilot,
    /// Mesh-wide config (the mTLS mode), once the CRDs exist.
    Config,
    Injector,
    /// The MutatingWebhookConfiguration, once the injector answers.
    Webhook,
    Gateways,
    Addons,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Base => "base",
            Stage::Pilot => "pilot",
            Stage::Config => "config",
            Stage::Injector => "injector",
            Stage::Webhook => "webhook",
            Stage::Gateways => "gateways",
            Stage::Addons => "addons",
        }
    }

    /// What progress lines call it.
    pub fn title(self) -> &'static str {
        match self {
            Stage::Base => "Namespace and CRDs",
            Stage::Pilot => "Pilot (config and CA)",
            Stage::Config => "Mesh-wide config",
            Stage::Injector => "Sidecar injector",
            Stage::Webhook => "Injection webhook",
            Stage::Gateways => "Gateways",
            Stage::Addons => "Addons",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub stage: Stage,
    pub value: Value,
}

impl Object {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    pub fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or_default()
    }
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    pub fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }
    /// `Kind namespace/name` or `Kind name`.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.kind(), self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }
}

/// Generated key material: created once, then read back from the cluster
/// so that installing again keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Material {
    /// The CA directory's files by name (`ca-cert.pem`, …).
    pub ca: BTreeMap<String, String>,
    pub webhook: WebhookTls,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WebhookTls {
    /// The CA that signed the serving certificate.
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA being replaced, still trusted in the caBundle while the
    /// injector reloads its new certificate (empty otherwise).
    pub previous_ca_pem: String,
}

impl Material {
    pub fn generate(trust_domain: &str) -> Result<Material, String> {
        let root = mesh_pilot::ca::generate_root(trust_domain).map_err(|e| e.to_string())?;
        let ca = root
            .files()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Material {
            ca,
            webhook: WebhookTls::generate()?,
        })
    }
}

impl WebhookTls {
    /// A CA of its own and a serving certificate for the webhook's
    /// Service name, both valid ten years.
    pub fn generate() -> Result<WebhookTls, String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let err = |e: rcgen::Error| format!("generating the webhook certificate: {e}");
        let now = time::OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "mesh-injector CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = now - time::Duration::minutes(5);
        ca.not_after = now + time::Duration::days(3650);
        let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().map_err(err)?;
        let mut leaf = CertificateParams::new(vec![
            WEBHOOK_DNS.to_string(),
            "mesh-injector.mesh-system.svc.cluster.local".to_string(),
        ])
        .map_err(err)?;
        leaf.distinguished_name
            .push(DnType::CommonName, WEBHOOK_DNS);
        leaf.not_before = now - time::Duration::minutes(5);
        leaf.not_after = now + time::Duration::days(3650);
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &issuer).map_err(err)?;
        Ok(WebhookTls {
            ca_pem: ca_cert.pem(),
            previous_ca_pem: String::new(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn yaml_docs(text: &str, file: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("the embedded {file} is not valid YAML: {e}"));
            (!v.is_null()).then_some(v)
        })
        .collect()
}

macro_rules! manifest {
    ($path:literal) => {
        yaml_docs(include_str!(concat!("../../../manifests/", $path)), $path)
    };
}

/// Every object of an installation with `values`, in apply order.
/// `kubernetes_minor` is the cluster's (for the injector).
pub fn render(values: &Values, material: &Material, kubernetes_minor: u32) -> Vec<Object> {
    let mut out = Vec::new();
    let mut push = |stage: Stage, mut value: Value| {
        let labels = value["metadata"]
            .as_object_mut()
            .map(|m| m.entry("labels").or_insert_with(|| json!({})));
        if let Some(Value::Object(labels)) = labels {
            labels.insert(MANAGED_BY.into(), MANAGER.into());
            labels.insert("app.kubernetes.io/part-of".into(), "mesh".into());
            labels.insert(COMPONENT_LABEL.into(), stage.name().into());
        }
        out.push(Object { stage, value });
    };

    for doc in manifest!("base/namespace.yaml") {
        push(Stage::Base, doc);
    }
    for crd in mesh_api::crd::all() {
        push(
            Stage::Base,
            serde_json::to_value(crd).expect("a CRD serializes"),
        );
    }

    let td = &values.trust_domain;
    let pilot = &values.pilot;
    push(
        Stage::Pilot,
        secret(CA_SECRET, "Opaque", &material.ca, "pilot's CA: --ca-dir"),
    );
    for mut doc in manifest!("pilot/pilot.yaml") {
        match doc["kind"].as_str() {
            Some("Deployment") => {
                deployment(&mut doc, pilot.replicas);
                let c = container(&mut doc, "discovery");
                c["image"] = values.image("pilot", &pilot.image).into();
                c["imagePullPolicy"] = values.image_pull_policy.clone().into();
                c["resources"] = resources(&pilot.resources);
                let policy = match values.outbound_traffic_policy.mode.as_str() {
                    "REGISTRY_ONLY" => "registry-only",
                    _ => "allow-any",
                };
                c["args"] = json!([
                    "--ca-dir=/etc/mesh/ca",
                    format!("--trust-domain={td}"),
                    format!("--outbound-policy={policy}"),
                    "--log-format=json",
                ]);
            }
            Some("PodDisruptionBudget") if pilot.replicas > 1 => {
                let spec = doc["spec"].as_object_mut().expect("a PDB has a spec");
                spec.remove("maxUnavailable");
                spec.insert("minAvailable".into(), 1.into());
            }
            _ => {}
        }
        push(Stage::Pilot, doc);
    }

    if !values.mtls.mode.is_empty() {
        push(
            Stage::Config,
            json!({
                "apiVersion": "security.mesh.dev/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "default", "namespace": NAMESPACE},
                "spec": {"mtls": {"mode": values.mtls.mode}},
            }),
        );
    }

    if values.injector.enabled {
        push(
            Stage::Injector,
            secret(
                WEBHOOK_SECRET,
                "kubernetes.io/tls",
                &BTreeMap::from([
                    ("tls.crt".to_string(), material.webhook.cert_pem.clone()),
                    ("tls.key".to_string(), material.webhook.key_pem.clone()),
                    ("ca.crt".to_string(), material.webhook.ca_pem.clone()),
                ]),
                "the injector's serving certificate",
            ),
        );
        push(Stage::Injector, injector_settings(values));
        let inj: &Component = &values.injector;
        for mut doc in manifest!("injector/injector.yaml") {
            if doc["kind"] == "Deployment" {
                deployment(&mut doc, inj.replicas);
                let c = container(&mut doc, "injector");
                c["image"] = values.image("injector", &inj.image).into();
                c["imagePullPolicy"] = values.image_pull_policy.clone().into();
                c["resources"] = resources(&inj.resources);
                set_env(c, "MESH_KUBERNETES_MINOR", &kubernetes_minor.to_string());
            }
            push(Stage::Injector, doc);
        }
        for mut doc in manifest!("injector/mutatingwebhook.yaml") {
            use base64::Engine;
            let trusted = format!(
                "{}{}",
                material.webhook.ca_pem, material.webhook.previous_ca_pem
            );
            let bundle = base64::engine::general_purpose::STANDARD.encode(trusted);
            for hook in doc["webhooks"].as_array_mut().into_iter().flatten() {
                hook["clientConfig"]["caBundle"] = bundle.clone().into();
            }
            push(Stage::Webhook, doc);
        }
    }

    let gateways = [
        (&values.ingress_gateway, manifest!("gateways/ingress.yaml")),
        (&values.egress_gateway, manifest!("gateways/egress.yaml")),
    ];
    for (gw, docs) in gateways {
        if !gw.enabled {
            continue;
        }
        for mut doc in docs {
            gateway(&mut doc, gw, values);
            push(Stage::Gateways, doc);
        }
    }

    let addons = &values.addons;
    if addons.prometheus.enabled {
        for doc in manifest!("addons/prometheus.yaml") {
            push(Stage::Addons, doc);
        }
    }
    if addons.grafana.enabled {
        push(
            Stage::Addons,
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "mesh-grafana-dashboards", "namespace": NAMESPACE,
                    "labels": {"app": "grafana"}},
                "data": {
                    "mesh-overview.json": include_str!("../../../manifests/addons/dashboards/mesh-overview.json"),
                    "mesh-service.json": include_str!("../../../manifests/addons/dashboards/mesh-service.json"),
                    "mesh-control-plane.json": include_str!("../../../manifests/addons/dashboards/mesh-control-plane.json"),
                },
            }),
        );
        for doc in manifest!("addons/grafana.yaml") {
            push(Stage::Addons, doc);
        }
    }
    if addons.jaeger.enabled {
        for doc in manifest!("addons/jaeger.yaml") {
            push(Stage::Addons, doc);
        }
    }
    out.sort_by_key(|o| o.stage);
    out
}

fn secret(name: &str, kind: &str, data: &BTreeMap<String, String>, what: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "annotations": {"mesh.dev/holds": what},
        },
        "type": kind,
        "stringData": data,
    })
}

/// The settings the webhook mounts (and `meshctl kube-inject` reads).
fn injector_settings(values: &Values) -> Value {
    let r = &values.proxy.resources;
    let settings = mesh_injector::Settings {
        proxy_image: values.image("proxy", &values.proxy.image),
        image_pull_policy: Some(values.image_pull_policy.clone()),
        trust_domain: values.trust_domain.clone(),
        proxy_cpu: r.requests.cpu.clone(),
        proxy_memory: r.requests.memory.clone(),
        proxy_cpu_limit: r.limits.cpu.clone(),
        proxy_memory_limit: r.limits.memory.clone(),
        log_level: values.proxy.log_level.clone(),
        control_plane_namespace: NAMESPACE.into(),
        zipkin_address: values.zipkin_address(),
        trace_sampling: values.telemetry.tracing.sampling,
        access_log: values.telemetry.access_log.clone(),
        ..Default::default()
    };
    let text = serde_yaml::to_string(&settings).expect("settings serialize");
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "mesh-injector", "namespace": NAMESPACE,
            "labels": {"app": "mesh-injector"}},
        "data": {"settings.yaml": text},
    })
}

fn deployment(doc: &mut Value, replicas: i64) {
    doc["spec"]["replicas"] = replicas.into();
}

/// The pod template's container `name`.
fn container<'a>(doc: &'a mut Value, name: &str) -> &'a mut Value {
    doc["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .and_then(|cs| cs.iter_mut().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("the embedded manifest has no container {name}"))
}

fn set_env(container: &mut Value, name: &str, value: &str) {
    let env = container["env"]
        .as_array_mut()
        .expect("the embedded container has env");
    match env.iter_mut().find(|e| e["name"] == name) {
        Some(e) => e["value"] = value.into(),
        None => env.push(json!({"name": name, "value": value})),
    }
}

fn resources(r: &Resources) -> Value {
    json!({
        "requests": {"cpu": r.requests.cpu, "memory": r.requests.memory},
        "limits": {"cpu": r.limits.cpu, "memory": r.limits.memory},
    })
}

fn gateway(doc: &mut Value, gw: &Gateway, values: &Values) {
    match doc["kind"].as_str() {
        Some("Deployment") => {
            deployment(doc, gw.replicas);
            let c = container(doc, "mesh-proxy");
            c["image"] = values.image("proxy", &gw.image).into();
            c["imagePullPolicy"] = values.image_pull_policy.clone().into();
            c["resources"] = resources(&gw.resources);
            set_env(c, "MESH_TRUST_DOMAIN", &values.trust_domain);
            set_env(c, "MESH_LOG", &values.proxy.log_level);
            let zipkin = values.zipkin_address();
            if !zipkin.is_empty() {
                set_env(c, "MESH_ZIPKIN_ADDR", &zipkin);
                set_env(
                    c,
                    "MESH_TRACE_SAMPLING",
                    &values.telemetry.tracing.sampling.to_string(),
                );
            }
            if values.telemetry.access_log != "off" {
                set_env(c, "MESH_ACCESS_LOG", &values.telemetry.access_log);
            }
        }
        Some("Service") => {
            doc["spec"]["type"] = gw.service_type.clone().into();
            for port in doc["spec"]["ports"].as_array_mut().into_iter().flatten() {
                let fixed = match port["name"].as_str() {
                    Some("http2") => gw.node_ports.http,
                    Some("https") => gw.node_ports.https,
                    _ => 0,
                };
                if fixed != 0 {
                    port["nodePort"] = fixed.into();
                }
            }
        }
        _ => {}
    }
}

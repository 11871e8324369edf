//! What `meshctl install`, `uninstall` and `check` do to a cluster:
//! server-side apply (field manager `meshctl`) stage by stage, waiting for
//! each stage to be ready; pruning what a previous installation made and
//! this one does not; saying which pod is at fault and why when something
//! does not come up.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use super::render::{
    self, CA_SECRET, MANAGED_BY, MANAGER, Material, NAMESPACE, Object, Stage, WEBHOOK_DNS,
    WEBHOOK_NAME, WEBHOOK_SECRET, WebhookTls,
};
use super::values::Values;
use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams,
    PostParams,
};

/// A kind install creates.
struct KindInfo {
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
}

/// Every kind install creates, in the order they are applied; they are
/// removed in the reverse order.
const KINDS: [KindInfo; 12] = [
    kind("v1", "Namespace", "namespaces", false),
    kind(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
    ),
    kind("v1", "ServiceAccount", "serviceaccounts", true),
    kind(
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    kind(
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    kind("v1", "Secret", "secrets", true),
    kind("v1", "ConfigMap", "configmaps", true),
    kind("v1", "Service", "services", true),
    kind("apps/v1", "Deployment", "deployments", true),
    kind(
        "policy/v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
    ),
    kind(
        "security.mesh.dev/v1",
        "PeerAuthentication",
        "peerauthentications",
        true,
    ),
    kind(
        "admissionregistration.k8s.io/v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        false,
    ),
];

const fn kind(
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
) -> KindInfo {
    KindInfo {
        api_version,
        kind,
        plural,
        namespaced,
    }
}

fn kind_info(api_version: &str, kind: &str) -> Result<&'static KindInfo> {
    KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind)
        .ok_or_else(|| anyhow!("install does not manage {api_version} {kind}"))
}

fn api_for(client: &kube::Client, info: &KindInfo, namespace: Option<&str>) -> Api<DynamicObject> {
    let (group, version) = info
        .api_version
        .split_once('/')
        .unwrap_or(("", info.api_version));
    let ar = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: info.api_version.into(),
        kind: info.kind.into(),
        plural: info.plural.into(),
    };
    match namespace {
        Some(ns) if info.namespaced => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    }
}

/// How long to wait, and how often to look.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub timeout: Duration,
    pub poll: Duration,
}

/// An object install made, as found in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    /// Position in [`KINDS`].
    order: usize,
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
}

impl Found {
    fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// Every object carrying install's label.
pub async fn installed(client: &kube::Client) -> Result<Vec<Found>> {
    let lp = ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}"));
    let mut found = Vec::new();
    for (order, info) in KINDS.iter().enumerate() {
        let api = api_for(client, info, Some(NAMESPACE));
        let list = match api.list(&lp).await {
            Ok(l) => l,
            // The mesh's CRDs are gone: nothing of that kind exists.
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", info.plural)),
        };
        for o in list.items {
            found.push(Found {
                order,
                kind: info.kind,
                namespace: o.metadata.namespace.clone(),
                name: o.metadata.name.clone().unwrap_or_default(),
            });
        }
    }
    Ok(found)
}

/// The generated material already in the cluster, or new material where
/// there is none (or the webhook certificate is no longer usable).
pub async fn material(client: &kube::Client, trust_domain: &str) -> Result<Material> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let fresh = Material::generate(trust_domain).map_err(|e| anyhow!(e))?;
    let text = |s: &Secret| -> BTreeMap<String, String> {
        s.data
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
            .collect()
    };
    let ca = match secrets.get_opt(CA_SECRET).await? {
        Some(s) => {
            let files = text(&s);
            if !files.contains_key("ca-cert.pem") || !files.contains_key("ca-key.pem") {
                bail!(
                    "Secret {NAMESPACE}/{CA_SECRET} lacks ca-cert.pem or ca-key.pem; \
                     fix it or delete it to have a new root generated"
                );
            }
            files
        }
        None => fresh.ca,
    };
    let webhook = match secrets.get_opt(WEBHOOK_SECRET).await? {
        Some(s) => {
            let files = text(&s);
            let get = |k: &str| files.get(k).cloned().unwrap_or_default();
            let tls = WebhookTls {
                ca_pem: get("ca.crt"),
                cert_pem: get("tls.crt"),
                key_pem: get("tls.key"),
                previous_ca_pem: String::new(),
            };
            if webhook_usable(&tls) {
                tls
            } else {
                // The running injector serves the old certificate until
                // its volume refreshes: the API server trusts both CAs
                // meanwhile. The next install drops the old one.
                WebhookTls {
                    previous_ca_pem: tls.ca_pem,
                    ..fresh.webhook
                }
            }
        }
        None => fresh.webhook,
    };
    Ok(Material { ca, webhook })
}

/// Whether a webhook certificate names the Service and has 30 days left.
fn webhook_usable(tls: &WebhookTls) -> bool {
    if tls.ca_pem.is_empty() || tls.key_pem.is_empty() {
        return false;
    }
    match mesh_pilot::ca::cert_validity(&tls.cert_pem) {
        Ok((not_after, names)) => {
            not_after > unix_now() + 30 * 86_400 && names.iter().any(|n| n == WEBHOOK_DNS)
        }
        Err(_) => false,
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The cluster's Kubernetes minor version.
pub async fn kubernetes_minor(client: &kube::Client) -> Result<u32> {
    let v = client
        .apiserver_version()
        .await
        .context("asking the cluster for its version")?;
    v.minor
        .trim_end_matches('+')
        .parse()
        .map_err(|_| anyhow!("unexpected Kubernetes minor version {:?}", v.minor))
}

/// The objects `values` make in this cluster: its version and the
/// material already there.
pub async fn plan(client: &kube::Client, values: &Values) -> Result<Vec<Object>> {
    let minor = match values.kubernetes_minor {
        0 => kubernetes_minor(client).await?,
        m => m,
    };
    let material = material(client, &values.trust_domain).await?;
    Ok(render::render(values, &material, minor))
}

/// Installs (or reconciles to) `values`.
pub async fn install(
    client: &kube::Client,
    values: &Values,
    timing: Timing,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let objects = plan(client, values).await?;
    let before = installed(client).await?;
    let wanted: BTreeSet<(String, Option<String>, String)> = objects
        .iter()
        .map(|o| {
            (
                o.kind().to_string(),
                o.namespace().map(str::to_string),
                o.name().to_string(),
            )
        })
        .collect();
    let stale: Vec<Found> = before
        .into_iter()
        .filter(|f| !wanted.contains(&(f.kind.to_string(), f.namespace.clone(), f.name.clone())))
        .collect();
    if dry_run {
        for o in &objects {
            writeln!(out, "would apply  {}", o.describe())?;
        }
        for f in &stale {
            writeln!(out, "would delete {}", f.describe())?;
        }
        return Ok(());
    }
    let mut stages: Vec<Stage> = objects.iter().map(|o| o.stage).collect();
    stages.dedup();
    for stage in stages {
        let started = Instant::now();
        let part: Vec<&Object> = objects.iter().filter(|o| o.stage == stage).collect();
        writeln!(
            out,
            "- {}: applying {} object(s)",
            stage.title(),
            part.len()
        )?;
        for o in &part {
            if found_unowned(client, o).await? {
                // Not made by install: used as it is, never pruned or
                // removed by uninstall.
                writeln!(
                    out,
                    "  {} exists and was not created by meshctl: it is left in place and uninstall keeps it",
                    o.describe()
                )?;
                let mut kept = (*o).clone();
                if let Some(labels) = kept.value["metadata"]["labels"].as_object_mut() {
                    labels.remove(MANAGED_BY);
                    labels.remove(render::COMPONENT_LABEL);
                }
                apply(client, &kept).await?;
            } else {
                apply(client, o).await?;
            }
        }
        wait_stage(client, &part, timing)
            .await
            .with_context(|| format!("{} did not become ready", stage.title()))?;
        writeln!(
            out,
            "✔ {} ready ({:.1}s)",
            stage.title(),
            started.elapsed().as_secs_f64()
        )?;
    }
    if !stale.is_empty() {
        writeln!(
            out,
            "- removing {} object(s) this installation no longer has",
            stale.len()
        )?;
        remove(client, stale, out).await?;
    }
    if values.ingress_gateway.enabled {
        writeln!(out, "{}", gateway_address(client).await)?;
    }
    writeln!(
        out,
        "✔ Installation complete. Turn on injection with: kubectl label namespace default mesh-injection=enabled"
    )?;
    Ok(())
}

/// Whether `o` already exists without install's label (someone else made
/// it: a namespace, a plug-in CA Secret, their own policy).
async fn found_unowned(client: &kube::Client, o: &Object) -> Result<bool> {
    let info = kind_info(o.api_version(), o.kind())?;
    let api = api_for(client, info, o.namespace());
    Ok(match api.get_opt(o.name()).await {
        Ok(Some(existing)) => existing
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY))
            .is_none_or(|m| m != MANAGER),
        Ok(None) => false,
        // The kind is not served yet (a CRD about to be created).
        Err(kube::Error::Api(e)) if e.code == 404 => false,
        Err(e) => return Err(e).with_context(|| format!("reading {}", o.describe())),
    })
}

/// Server-side apply of one object.
async fn apply(client: &kube::Client, o: &Object) -> Result<()> {
    let info = kind_info(o.api_version(), o.kind())?;
    let api = api_for(client, info, o.namespace());
    let params = PatchParams::apply(MANAGER).force();
    api.patch(o.name(), &params, &Patch::Apply(&o.value))
        .await
        .with_context(|| format!("applying {}", o.describe()))?;
    Ok(())
}

/// Waits for a stage's CRDs to be established and its Deployments to be
/// available.
async fn wait_stage(client: &kube::Client, part: &[&Object], timing: Timing) -> Result<()> {
    let deadline = Instant::now() + timing.timeout;
    for o in part {
        match o.kind() {
            "CustomResourceDefinition" => wait_crd(client, o.name(), deadline, timing).await?,
            "Deployment" => {
                let ns = o.namespace().unwrap_or(NAMESPACE);
                wait_deployment(client, ns, o.name(), deadline, timing).await?
            }
            _ => {}
        }
    }
    Ok(())
}

async fn wait_crd(
    client: &kube::Client,
    name: &str,
    deadline: Instant,
    timing: Timing,
) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    loop {
        let crd = api.get(name).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("CRD {name} is not established after {:?}", timing.timeout);
        }
        tokio::time::sleep(timing.poll).await;
    }
}

/// Whether a Deployment's latest generation is fully rolled out and
/// available.
fn rolled_out(d: &Deployment) -> bool {
    let want = d.spec.replicas.unwrap_or(1);
    let Some(s) = &d.status else {
        return false;
    };
    s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && s.updated_replicas.unwrap_or(0) >= want
        && s.available_replicas.unwrap_or(0) >= want
        && s.replicas.unwrap_or(0) == s.updated_replicas.unwrap_or(0)
}

async fn wait_deployment(
    client: &kube::Client,
    ns: &str,
    name: &str,
    deadline: Instant,
    timing: Timing,
) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    loop {
        let d = api.get(name).await?;
        if rolled_out(&d) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = diagnose(client, ns, &d).await;
            bail!(
                "Deployment {ns}/{name} is not ready after {:?}: {why}",
                timing.timeout
            );
        }
        tokio::time::sleep(timing.poll).await;
    }
}

/// Why a Deployment's pods are not ready: the first reason found per pod
/// (image pull errors, crash loops with their last log lines, scheduling).
async fn diagnose(client: &kube::Client, ns: &str, d: &Deployment) -> String {
    let selector = d
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(l) => l.items,
        Err(e) => return format!("cannot list its pods: {e}"),
    };
    if list.is_empty() {
        return "it has no pods (check its ReplicaSet's events: quota, admission, service account)"
            .into();
    }
    let mut reasons = Vec::new();
    for pod in &list {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        if let Some(why) = pod_problem(pod) {
            let mut line = format!("pod {ns}/{pod_name}: {}", why.text);
            if let Some(container) = why.crashing {
                let lp = LogParams {
                    container: Some(container),
                    previous: true,
                    tail_lines: Some(10),
                    ..Default::default()
                };
                if let Ok(logs) = pods.logs(&pod_name, &lp).await
                    && !logs.trim().is_empty()
                {
                    line.push_str("; its last log lines:\n");
                    for l in logs.trim_end().lines() {
                        line.push_str("    ");
                        line.push_str(l);
                        line.push('\n');
                    }
                }
            }
            reasons.push(line);
        }
    }
    if reasons.is_empty() {
        "its pods are running but not ready yet (readiness probe failing)".into()
    } else {
        reasons.join("\n")
    }
}

pub(super) struct Problem {
    pub(super) text: String,
    /// A container in a crash loop, whose previous logs tell why.
    crashing: Option<String>,
}

pub(super) fn pod_problem(pod: &Pod) -> Option<Problem> {
    let status = pod.status.as_ref()?;
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for cs in statuses {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            if reason == "ContainerCreating" || reason == "PodInitializing" {
                continue;
            }
            let message = w.message.clone().unwrap_or_default();
            let crashing = (reason == "CrashLoopBackOff"
                || cs
                    .last_state
                    .as_ref()
                    .is_some_and(|s| s.terminated.is_some()))
            .then(|| cs.name.clone());
            let mut text = format!("container {}: {reason}", cs.name);
            if !message.is_empty() {
                text.push_str(": ");
                text.push_str(&message);
            }
            return Some(Problem { text, crashing });
        }
    }
    for c in status.conditions.iter().flatten() {
        if c.type_ == "PodScheduled" && c.status == "False" {
            return Some(Problem {
                text: format!(
                    "not scheduled: {}",
                    c.message
                        .clone()
                        .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
                ),
                crashing: None,
            });
        }
    }
    None
}

/// Deletes `found`, webhook first and namespace last.
async fn remove(client: &kube::Client, mut found: Vec<Found>, out: &mut dyn Write) -> Result<()> {
    found.sort_by(|a, b| b.order.cmp(&a.order).then(a.name.cmp(&b.name)));
    for f in found {
        let info = &KINDS[f.order];
        let api = api_for(client, info, f.namespace.as_deref());
        match api.delete(&f.name, &DeleteParams::background()).await {
            Ok(_) => writeln!(out, "  deleted {}", f.describe())?,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("deleting {}", f.describe())),
        }
    }
    Ok(())
}

/// Removes what install created. Without `purge`, the namespace, the CRDs
/// (and so the mesh's config) and the CA's Secret stay; with it, those
/// go too, and so do the root-certificate ConfigMaps pilot published.
pub async fn uninstall(
    client: &kube::Client,
    purge: bool,
    timing: Timing,
    out: &mut dyn Write,
) -> Result<()> {
    let found = installed(client).await?;
    let (gone, kept): (Vec<Found>, Vec<Found>) = found.into_iter().partition(|f| {
        purge
            || !(f.kind == "Namespace"
                || f.kind == "CustomResourceDefinition"
                || (f.kind == "Secret" && f.name == CA_SECRET))
    });
    if gone.is_empty() {
        writeln!(
            out,
            "nothing to remove: no object carries {MANAGED_BY}={MANAGER}"
        )?;
    }
    // Pilot goes first among the workloads' owners so it stops republishing
    // roots before they are removed.
    let (last, first): (Vec<Found>, Vec<Found>) = gone
        .into_iter()
        .partition(|f| f.kind == "Namespace" || f.kind == "CustomResourceDefinition");
    remove(client, first, out).await?;
    if purge {
        wait_pods_gone(client, "app=mesh-pilot", timing).await?;
        let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::all(client.clone());
        let published = maps
            .list(&ListParams::default().labels(&format!("{MANAGED_BY}=mesh-pilot")))
            .await
            .context("listing the root-certificate ConfigMaps")?;
        for cm in published.items {
            let (Some(ns), Some(name)) = (cm.metadata.namespace, cm.metadata.name) else {
                continue;
            };
            let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
                Api::namespaced(client.clone(), &ns);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => writeln!(out, "  deleted ConfigMap {ns}/{name}")?,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting ConfigMap {ns}/{name}")),
            }
        }
    }
    remove(client, last, out).await?;
    if !kept.is_empty() {
        writeln!(
            out,
            "kept (uninstall --purge removes them too): {}",
            kept.iter()
                .map(Found::describe)
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    writeln!(out, "✔ Uninstalled.")?;
    Ok(())
}

async fn wait_pods_gone(client: &kube::Client, selector: &str, timing: Timing) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + timing.timeout;
    loop {
        let left = pods
            .list(&ListParams::default().labels(selector))
            .await?
            .items;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "pods {selector} still exist after {:?}: {}",
                timing.timeout,
                left.iter()
                    .filter_map(|p| p.metadata.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(timing.poll).await;
    }
}

/// Where the ingress gateway is reached.
async fn gateway_address(client: &kube::Client) -> String {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let Ok(svc) = services.get("mesh-ingressgateway").await else {
        return "The ingress gateway's Service is not there yet.".into();
    };
    let lb = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip.clone().or(i.hostname.clone()));
    if let Some(addr) = lb {
        return format!("Ingress gateway: http://{addr}/");
    }
    let node_port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ps| ps.iter().find(|p| p.name.as_deref() == Some("http2")))
        .and_then(|p| p.node_port);
    match node_port {
        Some(p) => format!(
            "Ingress gateway: no load balancer address yet; reach it on any node at port {p} (http://NODE_IP:{p}/)"
        ),
        None => "Ingress gateway: reach it inside the cluster at http://mesh-ingressgateway.mesh-system/".into(),
    }
}

/// One line of `meshctl check`.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub ok: bool,
    /// A warning does not fail the check.
    pub warning: bool,
    pub text: String,
}

fn pass(text: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        warning: false,
        text: text.into(),
    }
}
fn fail(text: impl Into<String>) -> Finding {
    Finding {
        ok: false,
        warning: false,
        text: text.into(),
    }
}
fn warn(text: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        warning: true,
        text: text.into(),
    }
}

/// The oldest Kubernetes minor version the mesh supports.
pub const MIN_MINOR: u32 = 27;

/// `meshctl check --pre`: can the mesh be installed here?
pub async fn check_pre(client: &kube::Client) -> Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let minor = kubernetes_minor(client).await?;
    findings.push(if minor >= MIN_MINOR {
        pass(format!(
            "Kubernetes 1.{minor} is supported (1.{MIN_MINOR} or later); sidecars will be {}",
            if minor >= 29 {
                "native sidecars"
            } else {
                "classic sidecars"
            }
        ))
    } else {
        fail(format!(
            "Kubernetes 1.{minor} is too old: the mesh needs 1.{MIN_MINOR} or later"
        ))
    });
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for info in &KINDS {
        let (group, _) = info.api_version.split_once('/').unwrap_or(("", ""));
        for verb in ["create", "patch", "delete"] {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(group.into()),
                        resource: Some(info.plural.into()),
                        verb: Some(verb.into()),
                        namespace: info.namespaced.then(|| NAMESPACE.to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = reviews
                .create(&PostParams::default(), &review)
                .await
                .context("asking the API server what this user may do")?;
            if !answer.status.is_some_and(|s| s.allowed) {
                missing.push(format!("{verb} {}", info.plural));
            }
        }
    }
    findings.push(if missing.is_empty() {
        pass("you may create, patch and delete everything install creates")
    } else {
        fail(format!("you may not: {}", missing.join(", ")))
    });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    findings.push(match deployments.get_opt("mesh-pilot").await? {
        Some(d) => warn(format!(
            "a mesh is already installed ({}); install reconciles it",
            d.spec
                .template
                .spec
                .and_then(|s| s.containers.first().and_then(|c| c.image.clone()))
                .unwrap_or_default()
        )),
        None => pass("no mesh is installed yet"),
    });
    let hooks: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(client.clone());
    if hooks.get_opt("istio-sidecar-injector").await?.is_some() {
        findings.push(warn(
            "Istio's sidecar injector is installed: a namespace must not enable both meshes' injection",
        ));
    }
    Ok(findings)
}

/// `meshctl check`: is the installed mesh healthy?
pub async fn check(client: &kube::Client) -> Result<Vec<Finding>> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let mut findings = Vec::new();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut absent = Vec::new();
    for kind in mesh_api::Kind::ALL {
        let name = format!("{}.{}", kind.plural(), kind.group());
        let established = crds.get_opt(&name).await?.is_some_and(|c| {
            c.status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if !established {
            absent.push(name);
        }
    }
    findings.push(if absent.is_empty() {
        pass(format!(
            "all {} CRDs are established",
            mesh_api::Kind::ALL.len()
        ))
    } else {
        fail(format!(
            "CRDs missing or not established: {}",
            absent.join(", ")
        ))
    });

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let mut injector_installed = false;
    for (name, what, required) in [
        ("mesh-pilot", "pilot", true),
        ("mesh-injector", "the sidecar injector", false),
        ("mesh-ingressgateway", "the ingress gateway", false),
        ("mesh-egressgateway", "the egress gateway", false),
    ] {
        match deployments.get_opt(name).await? {
            None if required => findings.push(fail(format!(
                "{what} is not installed (no Deployment {NAMESPACE}/{name}); run meshctl install"
            ))),
            None => {}
            Some(d) => {
                injector_installed |= name == "mesh-injector";
                findings.push(if rolled_out(&d) {
                    pass(format!("{what} is available"))
                } else {
                    fail(format!(
                        "{what} is not available: {}",
                        diagnose(client, NAMESPACE, &d).await
                    ))
                });
            }
        }
    }

    if injector_installed {
        findings.push(webhook_check(client).await);
    }
    findings.push(sync_check(client).await);
    findings.push(root_check(client).await?);
    findings.extend(uninjected(client).await?);
    Ok(findings)
}

/// Creates a pod that asks for injection, as a server-side dry run, and
/// checks that it comes back injected: the API server reached the webhook.
async fn webhook_check(client: &kube::Client) -> Finding {
    let hooks: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(client.clone());
    match hooks.get_opt(WEBHOOK_NAME).await {
        Ok(Some(h)) => {
            let bundle_missing = h.webhooks.iter().flatten().any(|w| {
                w.client_config
                    .ca_bundle
                    .as_ref()
                    .is_none_or(|b| b.0.is_empty())
            });
            if bundle_missing {
                return fail(format!(
                    "MutatingWebhookConfiguration {WEBHOOK_NAME} has no caBundle: run meshctl install again"
                ));
            }
        }
        Ok(None) => {
            return fail(format!(
                "MutatingWebhookConfiguration {WEBHOOK_NAME} is missing: run meshctl install again"
            ));
        }
        Err(e) => return fail(format!("cannot read the webhook configuration: {e}")),
    }
    let probe: Pod = match serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "mesh-check-",
            "labels": {mesh_injector::INJECT_KEY: "true"},
        },
        "spec": {"containers": [{"name": "app", "image": "mesh-check"}]},
    })) {
        Ok(p) => p,
        Err(e) => return fail(format!("building the probe pod: {e}")),
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match pods.create(&pp, &probe).await {
        Ok(p) => {
            let injected = p
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(mesh_injector::STATUS_ANNOTATION));
            if injected {
                pass(
                    "the injection webhook answers the API server (a dry-run pod came back injected)",
                )
            } else {
                fail(
                    "a dry-run pod asking for injection came back without a sidecar: the API server did not reach the injector (failurePolicy Ignore hides this from pod creation)",
                )
            }
        }
        Err(e) => fail(format!("a dry-run pod in namespace default failed: {e}")),
    }
}

/// Asks pilot, through the API server's service proxy, which proxies are in
/// sync.
async fn sync_check(client: &kube::Client) -> Finding {
    let path = format!(
        "/api/v1/namespaces/{NAMESPACE}/services/mesh-pilot:http-monitoring/proxy/debug/syncz"
    );
    let req = match http::Request::get(&path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let text = match client.request_text(req).await {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot read pilot's sync status: {e}")),
    };
    let proxies: Vec<mesh_api::sync::ProxyStatus> = match serde_json::from_str(&text) {
        Ok(p) => p,
        Err(e) => return fail(format!("pilot's /debug/syncz is unreadable: {e}")),
    };
    use mesh_api::sync::SyncState;
    let behind: Vec<String> = proxies
        .iter()
        .filter(|p| p.state != SyncState::Synced)
        .map(|p| format!("{} ({:?})", p.proxy, p.state))
        .collect();
    if behind.is_empty() {
        pass(format!("{} proxies are in sync with pilot", proxies.len()))
    } else {
        warn(format!(
            "{} of {} proxies are not in sync: {} (meshctl proxy-status tells more)",
            behind.len(),
            proxies.len(),
            behind.join(", ")
        ))
    }
}

async fn root_check(client: &kube::Client) -> Result<Finding> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let Some(s) = secrets.get_opt(CA_SECRET).await? else {
        return Ok(fail(format!(
            "the CA Secret {NAMESPACE}/{CA_SECRET} is missing"
        )));
    };
    let pem = s
        .data
        .as_ref()
        .and_then(|d| d.get("root-cert.pem").or(d.get("ca-cert.pem")))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default();
    Ok(match mesh_pilot::ca::cert_validity(&pem) {
        Err(e) => fail(format!("the root certificate is unreadable: {e}")),
        Ok((not_after, _)) => {
            let days = (not_after - unix_now()) / 86_400;
            if days < 0 {
                fail("the root certificate has expired: rotate it (docs: Workload identity)")
            } else if days < 90 {
                warn(format!(
                    "the root certificate expires in {days} days: rotate it soon"
                ))
            } else {
                pass(format!(
                    "the root certificate is valid for {days} more days"
                ))
            }
        }
    })
}

/// Pods in namespaces with injection enabled that run without a sidecar
/// (created while the injector was down: failurePolicy Ignore).
async fn uninjected(client: &kube::Client) -> Result<Vec<Finding>> {
    use k8s_openapi::api::core::v1::Namespace;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let enabled = namespaces
        .list(&ListParams::default().labels(&format!("{}=enabled", mesh_injector::NAMESPACE_LABEL)))
        .await?;
    let mut lacking = Vec::new();
    for ns in enabled.items {
        let Some(ns) = ns.metadata.name else { continue };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        for p in pods.list(&ListParams::default()).await?.items {
            let opted_out = p
                .metadata
                .labels
                .iter()
                .flatten()
                .chain(p.metadata.annotations.iter().flatten())
                .any(|(k, v)| k == mesh_injector::INJECT_KEY && v == "false");
            let host = p
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            let injected = p
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(mesh_injector::STATUS_ANNOTATION));
            if !opted_out && !host && !injected {
                lacking.push(format!("{ns}/{}", p.metadata.name.unwrap_or_default()));
            }
        }
    }
    Ok(if lacking.is_empty() {
        vec![pass(
            "every pod in a namespace with injection enabled has its sidecar",
        )]
    } else {
        vec![warn(format!(
            "pods without a sidecar in namespaces with injection enabled (restart them): {}",
            lacking.join(", ")
        ))]
    })
}

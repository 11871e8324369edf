//! One pod's life on a node: checks, network, volumes, init containers in
//! order (native sidecars until their startup probe passes), the app
//! containers with their probes and restart policy, status and events, and
//! on deletion preStop hooks, SIGTERM, the grace period, SIGKILL and
//! cleanup before the pod is let go.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, Event, EventSource, LifecycleHandler, ObjectReference, Pod, Probe,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{Notify, mpsc, watch};

use crate::agent::{Agent, NodeCtx};
use crate::status::{Ctr, Kind, PodState, State, Term};
use crate::{env, images, launch, net, probe, services, status, volumes};

/// Restart back-off: the kubelet's doubling, from 2 s (it starts at 10 s)
/// to 5 minutes.
const BACKOFF_START: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Why this node cannot run the pod as written, naming the field.
pub fn unsupported(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return Some("spec.hostNetwork is not supported by this node".into());
    }
    if spec.host_pid == Some(true) || spec.host_ipc == Some(true) {
        return Some("spec.hostPID and spec.hostIPC are not supported by this node".into());
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(why) = volumes::unsupported(v) {
            return Some(format!("spec.volumes: {why}"));
        }
    }
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in all {
        for p in [&c.readiness_probe, &c.liveness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            if p.grpc.is_some() {
                return Some(format!(
                    "container {:?}: grpc probes are not supported by this node",
                    c.name
                ));
            }
        }
    }
    None
}

pub struct PodCtx {
    pub agent: Arc<Agent>,
    pub node: Arc<NodeCtx>,
    pub pod: Pod,
    pub name: String,
    pub ns: String,
    pub uid: String,
    pub net: net::PodNet,
    pub dir: PathBuf,
    pub state: Mutex<PodState>,
    pub changed: Notify,
    /// Woken on every change, for the tasks that wait on the record.
    pub progress: Notify,
    pub grace: Mutex<Duration>,
}

impl PodCtx {
    fn update(&self, f: impl FnOnce(&mut PodState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
        self.changed.notify_one();
        self.progress.notify_waiters();
    }

    fn ctr(&self, kind: Kind, i: usize, f: impl FnOnce(&mut Ctr)) {
        self.update(|s| {
            let list = if kind == Kind::Main {
                &mut s.mains
            } else {
                &mut s.inits
            };
            if let Some(c) = list.get_mut(i) {
                f(c);
            }
        });
    }

    fn snapshot(&self) -> Option<PodState> {
        self.state.lock().ok().map(|s| s.clone())
    }

    pub async fn event(&self, warning: bool, reason: &str, message: &str, field: Option<&str>) {
        event(
            &self.agent.client,
            &self.pod,
            &self.node.facts.name,
            warning,
            reason,
            message,
            field,
        )
        .await;
    }

    /// A command in the container's namespaces, mounts and user.
    fn exec_command(
        &self,
        c: &Container,
        argv: &[String],
        env: &[(String, String)],
    ) -> Result<tokio::process::Command, String> {
        let image = images::lookup(c.image.as_deref().unwrap_or_default(), &self.agent.bin_dir)?;
        let program = images::program(&image, &self.agent.bin_dir, &argv[0])?;
        let mut full = vec![program.to_string_lossy().into_owned()];
        full.extend(argv[1..].iter().cloned());
        let spec = self.launch_spec(c, full, env.to_vec());
        let file = self.dir.join(format!("{}.exec.json", c.name));
        std::fs::write(&file, serde_json::to_vec(&spec).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.net.netns])
            .arg(&self.agent.self_exe)
            .arg("launch")
            .arg(file);
        Ok(cmd)
    }

    fn launch_spec(
        &self,
        c: &Container,
        argv: Vec<String>,
        env: Vec<(String, String)>,
    ) -> launch::Spec {
        let sc = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let csc = c.security_context.as_ref();
        let uid = csc
            .and_then(|s| s.run_as_user)
            .or(sc.and_then(|s| s.run_as_user));
        let gid = csc
            .and_then(|s| s.run_as_group)
            .or(sc.and_then(|s| s.run_as_group));
        let mut mounts: Vec<launch::Mount> = vec![];
        for m in c.volume_mounts.iter().flatten() {
            let mut source = self.dir.join("volumes").join(&m.name);
            if let Some(sub) = m
                .sub_path
                .as_deref()
                .filter(|s| !s.is_empty() && !s.contains(".."))
            {
                source = source.join(sub);
            }
            mounts.push(launch::Mount {
                source,
                target: PathBuf::from(&m.mount_path),
                read_only: m.read_only.unwrap_or(false),
            });
        }
        // The kubelet's termination-log file.
        launch::Spec {
            argv,
            env,
            mounts,
            uid: uid.and_then(|u| u32::try_from(u).ok()),
            gid: gid.and_then(|g| u32::try_from(g).ok()),
            working_dir: c.working_dir.as_ref().map(PathBuf::from),
        }
    }
}

pub async fn event(
    client: &kube::Client,
    pod: &Pod,
    node: &str,
    warning: bool,
    reason: &str,
    message: &str,
    field: Option<&str>,
) {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let now = Timestamp::now();
    let ev = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            field_path: field.map(String::from),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(if warning { "Warning" } else { "Normal" }.into()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(node.into()),
        }),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some(reason.into()),
        count: Some(1),
        ..Default::default()
    };
    if let Err(e) = Api::<Event>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &ev)
        .await
    {
        tracing::debug!(error = %e, "event not recorded");
    }
}

/// Waits until the pod is being deleted (or is gone).
async fn deleting(rx: &mut watch::Receiver<Option<Pod>>) {
    loop {
        let gone = rx
            .borrow()
            .as_ref()
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
        if gone || rx.changed().await.is_err() {
            return;
        }
    }
}

fn grace_of(p: Option<&Pod>) -> Duration {
    let secs = p
        .and_then(|p| p.metadata.deletion_grace_period_seconds)
        .or_else(|| p.and_then(|p| p.spec.as_ref()?.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(secs.max(0) as u64)
}

/// Runs the pod until it is deleted; then lets it go.
pub async fn run(agent: Arc<Agent>, node: Arc<NodeCtx>, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow().clone() else {
        return;
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let (netns, veth) = net::names(&uid);
    let spec = pod.spec.clone().unwrap_or_default();
    let inits: Vec<Ctr> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            let kind = if c.restart_policy.as_deref() == Some("Always") {
                Kind::Sidecar
            } else {
                Kind::Init
            };
            Ctr::new(&c.name, c.image.as_deref().unwrap_or_default(), kind)
        })
        .collect();
    let mains: Vec<Ctr> = spec
        .containers
        .iter()
        .map(|c| Ctr::new(&c.name, c.image.as_deref().unwrap_or_default(), Kind::Main))
        .collect();
    let ip = node.ipam.lock().ok().and_then(|mut i| i.take());
    // What `status.podIP` references resolve to.
    let mut pod = pod;
    if let Some(ip) = ip {
        pod.status.get_or_insert_default().pod_ip = Some(ip.to_string());
    }
    let dir = agent
        .state_dir
        .join("pods")
        .join(format!("{ns}_{name}_{uid}"));
    let ctx = Arc::new(PodCtx {
        agent: agent.clone(),
        node: node.clone(),
        name: name.clone(),
        ns: ns.clone(),
        uid: uid.clone(),
        net: net::PodNet {
            netns,
            veth,
            ip: ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            node_ip: node.facts.ip,
        },
        dir,
        state: Mutex::new(PodState {
            pod_ip: None,
            host_ip: node.facts.ip,
            start: Timestamp::now(),
            network_ready: false,
            initialized: false,
            terminal: None,
            inits,
            mains,
        }),
        changed: Notify::new(),
        progress: Notify::new(),
        grace: Mutex::new(grace_of(Some(&pod))),
        pod,
    });
    let reporter = tokio::spawn(report(ctx.clone()));
    tokio::select! {
        _ = life(ctx.clone(), ip) => {}
        _ = deleting(&mut rx) => {}
    }
    if let Ok(mut g) = ctx.grace.lock() {
        *g = grace_of(rx.borrow().as_ref());
    }
    // Containers are stopped by their own tasks when `stop` fires, which
    // `life` was holding: dropping it above sent the signal; wait here.
    shutdown(&ctx).await;
    reporter.abort();
    push_status(&ctx, &mut None).await;
    remove_sandbox(&ctx.net);
    if let (Some(ip), Ok(mut ipam)) = (ip, node.ipam.lock()) {
        ipam.give_back(ip);
    }
    let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", ctx.net.netns));
    let present = rx.borrow().is_some();
    if present {
        let api = Api::<Pod>::namespaced(agent.client.clone(), &ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        if let Err(e) = api.delete(&name, &dp).await {
            tracing::debug!(pod = %name, error = %e, "final delete");
        }
    }
    // Logs stay for the cluster's lifetime; volumes go.
    let _ = std::fs::remove_dir_all(ctx.dir.join("volumes"));
    tracing::info!(pod = %format!("{ns}/{name}"), "pod removed");
}

/// The container processes still alive, stopped: app containers first
/// (after their preStop hooks), sidecars after them in reverse order, all
/// within the grace period.
async fn shutdown(ctx: &Arc<PodCtx>) {
    let grace = ctx
        .grace
        .lock()
        .map(|g| *g)
        .unwrap_or(Duration::from_secs(30));
    let deadline = tokio::time::Instant::now() + grace;
    let spec = ctx.pod.spec.clone().unwrap_or_default();
    let Some(s) = ctx.snapshot() else { return };
    let mut hooks = vec![];
    for (i, c) in spec.containers.iter().enumerate() {
        if s.mains.get(i).and_then(|m| m.pid).is_some()
            && let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref())
        {
            hooks.push(hook(ctx, c, h));
        }
    }
    let _ = tokio::time::timeout_at(deadline, futures_util::future::join_all(hooks)).await;
    let mains: Vec<u32> = s.mains.iter().filter_map(|c| c.pid).collect();
    stop_all(&mains, deadline).await;
    let sidecars: Vec<u32> = s.inits.iter().rev().filter_map(|c| c.pid).collect();
    for pid in sidecars {
        stop_all(
            &[pid],
            deadline.max(tokio::time::Instant::now() + Duration::from_secs(2)),
        )
        .await;
    }
    // Wait for the container tasks to record the exits.
    for _ in 0..20 {
        let alive = ctx
            .snapshot()
            .is_some_and(|s| s.mains.iter().chain(&s.inits).any(|c| c.pid.is_some()));
        if !alive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
}

async fn stop_all(pids: &[u32], deadline: tokio::time::Instant) {
    for &pid in pids {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    while tokio::time::Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for &pid in pids {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

async fn hook(ctx: &Arc<PodCtx>, c: &Container, h: &LifecycleHandler) {
    let ip = ctx.net.ip;
    let result = if let Some(e) = &h.exec {
        let env = env::container_env(&ctx.agent.client, &ctx.pod, &ctx.node.facts, c, &[])
            .await
            .unwrap_or_default();
        let run = |argv: &[String]| {
            ctx.exec_command(c, argv, &env)
                .unwrap_or_else(|_| tokio::process::Command::new("false"))
        };
        probe::exec(e, &run, Duration::from_secs(30)).await
    } else if let Some(g) = &h.http_get {
        probe::http_get(c, ip, g, Duration::from_secs(30)).await
    } else if let Some(s) = &h.sleep {
        tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64)).await;
        Ok(())
    } else {
        Err("lifecycle handler has no action".into())
    };
    if let Err(e) = result {
        ctx.event(
            true,
            "FailedPreStopHook",
            &format!("PreStopHook failed: {e}"),
            Some(&format!("spec.containers{{{}}}", c.name)),
        )
        .await;
    }
}

/// Patches the pod's status whenever the record changes.
async fn report(ctx: Arc<PodCtx>) {
    let mut last = None;
    loop {
        push_status(&ctx, &mut last).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), ctx.changed.notified()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn push_status(ctx: &PodCtx, last: &mut Option<serde_json::Value>) {
    let Some(s) = ctx.snapshot() else { return };
    let patch = status::patch(&s);
    let fp = status::fingerprint(&patch);
    if last.as_ref() == Some(&fp) {
        return;
    }
    let api = Api::<Pod>::namespaced(ctx.agent.client.clone(), &ctx.ns);
    match api
        .patch_status(
            &ctx.name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        Ok(_) => *last = Some(fp),
        Err(e) => tracing::debug!(pod = %ctx.name, error = %e, "status not written"),
    }
}

/// Everything before deletion: returns only when the pod can do no more
/// (it is left to wait for its deletion).
async fn life(ctx: Arc<PodCtx>, ip: Option<Ipv4Addr>) {
    let spec = ctx.pod.spec.clone().unwrap_or_default();
    if let Some(why) = unsupported(&ctx.pod) {
        fail(&ctx, "Unsupported", &why).await;
        return std::future::pending().await;
    }
    // Images first: an unknown image is ErrImagePull, as the kubelet shows it.
    let mut bad = false;
    for (kind, i, c) in spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (Kind::Init, i, c))
        .chain(
            spec.containers
                .iter()
                .enumerate()
                .map(|(i, c)| (Kind::Main, i, c)),
        )
    {
        if let Err(e) = images::lookup(c.image.as_deref().unwrap_or_default(), &ctx.agent.bin_dir) {
            bad = true;
            let msg = format!(
                "Failed to pull image {:?}: {e}",
                c.image.as_deref().unwrap_or_default()
            );
            ctx.ctr(kind, i, |s| {
                s.state = State::Waiting {
                    reason: "ErrImagePull".into(),
                    message: Some(msg.clone()),
                }
            });
            ctx.event(
                true,
                "Failed",
                &msg,
                Some(&format!("spec.containers{{{}}}", c.name)),
            )
            .await;
            ctx.event(
                true,
                "Failed",
                "Error: ErrImagePull",
                Some(&format!("spec.containers{{{}}}", c.name)),
            )
            .await;
        }
    }
    if bad {
        return std::future::pending().await;
    }
    let Some(ip) = ip else {
        fail(
            &ctx,
            "OutOfAddresses",
            "the node's pod CIDR has no free address",
        )
        .await;
        return std::future::pending().await;
    };
    // The sandbox: network namespace, resolv.conf and hosts.
    loop {
        match sandbox(&ctx) {
            Ok(()) => break,
            Err(e) => {
                ctx.event(
                    true,
                    "FailedCreatePodSandBox",
                    &format!("Failed to create pod sandbox: {e}"),
                    None,
                )
                .await;
                remove_sandbox(&ctx.net);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    ctx.update(|s| {
        s.pod_ip = Some(ip);
        s.network_ready = true;
    });
    // Volumes, retried until they can be made; then kept up to date.
    let mut tokens = volumes::Tokens::default();
    let root = ctx.dir.join("volumes");
    let mut last_err = String::new();
    loop {
        let vctx = volumes::Ctx {
            client: &ctx.agent.client,
            pod: &ctx.pod,
            root: &root,
            node: &ctx.node.facts,
        };
        match volumes::sync(&vctx, &mut tokens).await {
            Ok(()) => break,
            Err(e) => {
                if e != last_err {
                    ctx.event(
                        true,
                        "FailedMount",
                        &format!("MountVolume.SetUp failed: {e}"),
                        None,
                    )
                    .await;
                    last_err = e;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    let refresher = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let vctx = volumes::Ctx {
                    client: &ctx.agent.client,
                    pod: &ctx.pod,
                    root: &root,
                    node: &ctx.node.facts,
                };
                if let Err(e) = volumes::sync(&vctx, &mut tokens).await {
                    tracing::debug!(pod = %ctx.name, error = %e, "volume refresh");
                }
            }
        })
    };
    let _refresher = AbortOnDrop(refresher);
    let policy = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = vec![];
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let sidecar = c.restart_policy.as_deref() == Some("Always");
        let t = tokio::spawn(container(
            ctx.clone(),
            if sidecar { Kind::Sidecar } else { Kind::Init },
            i,
            c.clone(),
            policy.clone(),
            stop_rx.clone(),
        ));
        if sidecar {
            // The next container starts once this one has started.
            loop {
                let next = ctx.progress.notified();
                if ctx.snapshot().is_some_and(|s| s.inits[i].started) {
                    break;
                }
                next.await;
            }
            tasks.push(AbortOnDrop(t));
        } else {
            match t.await {
                Ok(Some(0)) => {}
                _ => {
                    fail(
                        &ctx,
                        "Failed",
                        &format!("init container {:?} failed", c.name),
                    )
                    .await;
                    let _ = stop_tx.send(true);
                    return std::future::pending().await;
                }
            }
        }
    }
    ctx.update(|s| s.initialized = true);
    let mut mains = vec![];
    for (i, c) in spec.containers.iter().enumerate() {
        mains.push(tokio::spawn(container(
            ctx.clone(),
            Kind::Main,
            i,
            c.clone(),
            policy.clone(),
            stop_rx.clone(),
        )));
    }
    let codes = futures_util::future::join_all(mains).await;
    // Only a pod whose policy lets its containers end gets here.
    let ok = codes.iter().all(|c| matches!(c, Ok(Some(0))));
    let _ = stop_tx.send(true);
    // The sidecars stop now; their tasks record the exits.
    for t in &mut tasks {
        let _ = (&mut t.0).await;
    }
    let phase = if ok { "Succeeded" } else { "Failed" };
    ctx.update(|s| s.terminal = Some((phase.into(), None, None)));
    std::future::pending().await
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn fail(ctx: &PodCtx, reason: &str, message: &str) {
    ctx.update(|s| s.terminal = Some(("Failed".into(), Some(reason.into()), Some(message.into()))));
    ctx.event(true, reason, message, None).await;
}

/// The pod's veth link and network namespace, gone (what is already gone
/// is fine).
fn remove_sandbox(p: &net::PodNet) {
    let mut r = services::System;
    for cmd in net::teardown(p) {
        let _ = services::Runner::run(&mut r, &cmd, None);
    }
}

fn sandbox(ctx: &PodCtx) -> Result<(), String> {
    let mut r = services::System;
    for cmd in net::setup(&ctx.net) {
        services::Runner::run(&mut r, &cmd, None).map_err(|e| e.to_string())?;
    }
    for (path, value) in net::sysctls(&ctx.net) {
        std::fs::write(&path, value).map_err(|e| format!("{path}: {e}"))?;
    }
    let etc = PathBuf::from(format!("/etc/netns/{}", ctx.net.netns));
    std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
    let resolv = net::resolv_conf(&ctx.ns, &ctx.agent.domain, ctx.agent.dns_ip);
    std::fs::write(etc.join("resolv.conf"), resolv).map_err(|e| e.to_string())?;
    let spec = ctx.pod.spec.as_ref();
    let hostname = spec
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| ctx.name.clone());
    let fqdn = spec
        .and_then(|s| s.subdomain.as_ref())
        .map(|sub| format!("{hostname}.{sub}.{}.svc.{}", ctx.ns, ctx.agent.domain));
    std::fs::write(
        etc.join("hosts"),
        net::hosts(ctx.net.ip, &hostname, fqdn.as_deref()),
    )
    .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(ctx.dir.join("volumes")).map_err(|e| e.to_string())?;
    Ok(())
}

enum Outcome {
    Exited(i32),
    Stopped(i32),
    Unhealthy(i32, String),
}

/// One container, restarted as its kind and the pod's policy say. Returns
/// the last exit code when it ends for good.
async fn container(
    ctx: Arc<PodCtx>,
    kind: Kind,
    i: usize,
    c: Container,
    policy: String,
    mut stop: watch::Receiver<bool>,
) -> Option<i32> {
    let field = if kind == Kind::Main {
        format!("spec.containers{{{}}}", c.name)
    } else {
        format!("spec.initContainers{{{}}}", c.name)
    };
    let mut backoff = BACKOFF_START;
    let log = ctx.dir.join(&c.name);
    let _ = std::fs::create_dir_all(&log);
    loop {
        let halted = *stop.borrow();
        if halted {
            return None;
        }
        let started_at = Timestamp::now();
        let restarts = ctx
            .snapshot()
            .map(|s| {
                if kind == Kind::Main {
                    s.mains[i].restarts
                } else {
                    s.inits[i].restarts
                }
            })
            .unwrap_or(0);
        let child = match start(&ctx, &c, &log.join(format!("{restarts}.log"))).await {
            Ok(child) => child,
            Err((reason, e)) => {
                ctx.ctr(kind, i, |s| {
                    s.state = State::Waiting {
                        reason: reason.into(),
                        message: Some(e.clone()),
                    }
                });
                ctx.event(true, "Failed", &format!("Error: {e}"), Some(&field))
                    .await;
                if sleep_or_stop(backoff, &mut stop).await {
                    return None;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let pid = child.id();
        ctx.ctr(kind, i, |s| {
            s.state = State::Running { since: started_at };
            s.pid = pid;
            s.ready = false;
            s.started = false;
        });
        ctx.event(
            false,
            "Started",
            &format!("Started container {}", c.name),
            Some(&field),
        )
        .await;
        let (kill_tx, mut kill_rx) = mpsc::channel::<String>(1);
        let probes = AbortOnDrop(tokio::spawn(probes(
            ctx.clone(),
            kind,
            i,
            c.clone(),
            kill_tx,
        )));
        let mut child = child;
        let outcome = tokio::select! {
            s = child.wait() => Outcome::Exited(s.ok().and_then(code).unwrap_or(-1)),
            _ = stopped(&mut stop) => {
                let grace = ctx.grace.lock().map(|g| *g).unwrap_or(Duration::from_secs(30));
                if let Some(pid) = pid { stop_all(&[pid], tokio::time::Instant::now() + grace).await; }
                Outcome::Stopped(child.wait().await.ok().and_then(code).unwrap_or(137))
            }
            Some(why) = kill_rx.recv() => {
                ctx.event(false, "Killing", &format!("Container {} failed {why}, will be restarted", c.name), Some(&field)).await;
                let grace = Duration::from_secs(c.lifecycle.as_ref().map(|_| 5).unwrap_or(5));
                if let Some(pid) = pid { stop_all(&[pid], tokio::time::Instant::now() + grace).await; }
                Outcome::Unhealthy(child.wait().await.ok().and_then(code).unwrap_or(137), why)
            }
        };
        drop(probes);
        let (code, stopped) = match &outcome {
            Outcome::Exited(c) => (*c, false),
            Outcome::Stopped(c) => (*c, true),
            Outcome::Unhealthy(c, _) => (*c, false),
        };
        let term = Term {
            code,
            reason: if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            message: match &outcome {
                Outcome::Unhealthy(_, why) => Some(why.clone()),
                _ => None,
            },
            started: started_at,
            finished: Timestamp::now(),
        };
        ctx.ctr(kind, i, |s| {
            s.state = State::Terminated(term.clone());
            s.pid = None;
            s.ready = false;
        });
        if stopped {
            return Some(code);
        }
        let restart = match kind {
            Kind::Sidecar => true,
            Kind::Init => code != 0 && policy != "Never",
            Kind::Main => policy == "Always" || (policy == "OnFailure" && code != 0),
        };
        if !restart {
            return Some(code);
        }
        if started_at.duration_until(Timestamp::now()).as_secs() > 600 {
            backoff = BACKOFF_START;
        }
        let msg = format!(
            "back-off {}s restarting failed container={} pod={}_{}({})",
            backoff.as_secs(),
            c.name,
            ctx.name,
            ctx.ns,
            ctx.uid
        );
        ctx.ctr(kind, i, |s| {
            s.restarts += 1;
            s.last = Some(term.clone());
            s.state = State::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(msg.clone()),
            };
        });
        ctx.event(
            true,
            "BackOff",
            "Back-off restarting failed container",
            Some(&field),
        )
        .await;
        if sleep_or_stop(backoff, &mut stop).await {
            return Some(code);
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn code(s: std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    s.code().or_else(|| s.signal().map(|sig| 128 + sig))
}

/// Until the stop signal (without holding the channel's guard).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stopped(stop) => true,
    }
}

async fn start(
    ctx: &PodCtx,
    c: &Container,
    log: &std::path::Path,
) -> Result<tokio::process::Child, (&'static str, String)> {
    let image = images::lookup(c.image.as_deref().unwrap_or_default(), &ctx.agent.bin_dir)
        .map_err(|e| ("ErrImagePull", e))?;
    let services: Vec<_> = ctx
        .agent
        .services
        .state()
        .iter()
        .map(|s| (**s).clone())
        .collect();
    let env = env::container_env(&ctx.agent.client, &ctx.pod, &ctx.node.facts, c, &services)
        .await
        .map_err(|e| ("CreateContainerConfigError", e))?;
    let expand = |v: &Vec<String>| v.iter().map(|a| env::expand(a, &env)).collect::<Vec<_>>();
    let argv = match &c.command {
        Some(cmd) if !cmd.is_empty() => {
            let cmd = expand(cmd);
            let program = images::program(&image, &ctx.agent.bin_dir, &cmd[0])
                .map_err(|e| ("RunContainerError", e))?;
            let mut argv = vec![program.to_string_lossy().into_owned()];
            argv.extend(cmd[1..].iter().cloned());
            argv.extend(c.args.as_ref().map(expand).unwrap_or_default());
            argv
        }
        _ => {
            let mut argv = image.entrypoint.clone();
            argv.extend(c.args.as_ref().map(expand).unwrap_or_default());
            argv
        }
    };
    let spec = ctx.launch_spec(c, argv, env);
    let file = ctx.dir.join(format!("{}.json", c.name));
    let err = |e: std::io::Error| ("RunContainerError", format!("{}: {e}", file.display()));
    std::fs::write(
        &file,
        serde_json::to_vec(&spec).map_err(|e| ("RunContainerError", e.to_string()))?,
    )
    .map_err(err)?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| ("RunContainerError", format!("{}: {e}", log.display())))?;
    let errf = out
        .try_clone()
        .map_err(|e| ("RunContainerError", e.to_string()))?;
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &ctx.net.netns])
        .arg(&ctx.agent.self_exe)
        .arg("launch")
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(errf)
        .process_group(0);
    cmd.spawn()
        .map_err(|e| ("RunContainerError", format!("start {}: {e}", c.name)))
}

/// One probe attempt.
async fn attempt(ctx: &PodCtx, c: &Container, p: &Probe) -> Result<(), String> {
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(h) = &p.http_get {
        probe::http_get(c, ctx.net.ip, h, timeout).await
    } else if let Some(t) = &p.tcp_socket {
        probe::tcp(c, ctx.net.ip, t, timeout).await
    } else if let Some(e) = &p.exec {
        let services: Vec<_> = ctx
            .agent
            .services
            .state()
            .iter()
            .map(|s| (**s).clone())
            .collect();
        let env =
            env::container_env(&ctx.agent.client, &ctx.pod, &ctx.node.facts, c, &services).await?;
        let made = std::sync::Mutex::new(None);
        let run = |argv: &[String]| match ctx.exec_command(c, argv, &env) {
            Ok(cmd) => cmd,
            Err(e) => {
                if let Ok(mut m) = made.lock() {
                    *m = Some(e);
                }
                tokio::process::Command::new("false")
            }
        };
        let r = probe::exec(e, &run, timeout).await;
        match made.lock().ok().and_then(|mut m| m.take()) {
            Some(e) => Err(e),
            None => r,
        }
    } else {
        Err("probe has no action".into())
    }
}

/// Startup, then readiness and liveness, as the kubelet runs them.
async fn probes(ctx: Arc<PodCtx>, kind: Kind, i: usize, c: Container, kill: mpsc::Sender<String>) {
    let field = format!("spec.containers{{{}}}", c.name);
    if let Some(p) = &c.startup_probe {
        match run_probe(&ctx, &c, p, "Startup", &field, true).await {
            Ok(()) => {}
            Err(why) => {
                let _ = kill.send(format!("startup probe: {why}")).await;
                return;
            }
        }
    }
    ctx.ctr(kind, i, |s| s.started = true);
    let readiness = async {
        match &c.readiness_probe {
            None => ctx.ctr(kind, i, |s| s.ready = true),
            Some(p) => {
                tokio::time::sleep(Duration::from_secs(
                    p.initial_delay_seconds.unwrap_or(0).max(0) as u64,
                ))
                .await;
                let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
                let (succ_need, fail_need) = (
                    p.success_threshold.unwrap_or(1).max(1),
                    p.failure_threshold.unwrap_or(3).max(1),
                );
                let (mut succ, mut fails, mut ready) = (0, 0, false);
                loop {
                    match attempt(&ctx, &c, p).await {
                        Ok(()) => {
                            succ += 1;
                            fails = 0;
                            if !ready && succ >= succ_need {
                                ready = true;
                                ctx.ctr(kind, i, |s| s.ready = true);
                            }
                        }
                        Err(e) => {
                            succ = 0;
                            fails += 1;
                            if fails == 1 || fails == fail_need {
                                ctx.event(
                                    true,
                                    "Unhealthy",
                                    &format!("Readiness probe failed: {e}"),
                                    Some(&field),
                                )
                                .await;
                            }
                            if ready && fails >= fail_need {
                                ready = false;
                                ctx.ctr(kind, i, |s| s.ready = false);
                            }
                        }
                    }
                    // Not yet ready: probe quickly, as the kubelet does after a start.
                    let wait = if ready {
                        period
                    } else {
                        period.min(Duration::from_secs(1))
                    };
                    tokio::time::sleep(wait).await;
                }
            }
        }
    };
    let liveness = async {
        if let Some(p) = &c.liveness_probe {
            if let Err(why) = run_probe(&ctx, &c, p, "Liveness", &field, false).await {
                let _ = kill.send(format!("liveness probe: {why}")).await;
            }
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::join!(readiness, liveness);
}

/// Probes until the probe fails `failureThreshold` times in a row (Err);
/// with `until_success`, returns Ok at the first success.
async fn run_probe(
    ctx: &PodCtx,
    c: &Container,
    p: &Probe,
    what: &str,
    field: &str,
    until_success: bool,
) -> Result<(), String> {
    tokio::time::sleep(Duration::from_secs(
        p.initial_delay_seconds.unwrap_or(0).max(0) as u64,
    ))
    .await;
    let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
    let fail_need = p.failure_threshold.unwrap_or(3).max(1);
    let mut fails = 0;
    loop {
        match attempt(ctx, c, p).await {
            Ok(()) if until_success => return Ok(()),
            Ok(()) => fails = 0,
            Err(e) => {
                fails += 1;
                if !until_success || fails == fail_need {
                    ctx.event(
                        true,
                        "Unhealthy",
                        &format!("{what} probe failed: {e}"),
                        Some(field),
                    )
                    .await;
                }
                if fails >= fail_need {
                    return Err(e);
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn what_the_node_cannot_honour_is_named() {
        let p = pod(serde_json::json!({"hostNetwork": true, "containers": [{"name": "c"}]}));
        assert!(unsupported(&p).unwrap().contains("hostNetwork"));
        let p = pod(
            serde_json::json!({"containers": [{"name": "c"}], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "x"}}]}),
        );
        assert!(unsupported(&p).unwrap().contains("persistentVolumeClaim"));
        let p = pod(
            serde_json::json!({"containers": [{"name": "c", "image": "mesh/proxy"}], "volumes": [{"name": "d", "emptyDir": {}}]}),
        );
        assert_eq!(unsupported(&p), None);
    }
}

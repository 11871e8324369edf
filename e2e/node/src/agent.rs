//! The node agent: registers its Nodes and keeps their leases, runs the
//! pods bound to them, programs Services on the host and serves the
//! cluster DNS.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;

use crate::env::NodeFacts;
use crate::{dns, net, pod, services};

pub struct Agent {
    pub client: kube::Client,
    pub bin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub self_exe: PathBuf,
    pub domain: String,
    pub dns_ip: Ipv4Addr,
    pub services: Store<Service>,
}

pub struct NodeCtx {
    pub facts: NodeFacts,
    pub cidr: ipnet::Ipv4Net,
    pub ipam: Mutex<net::Ipam>,
}

pub struct Config {
    pub kubeconfig: Option<PathBuf>,
    pub nodes: Vec<(String, Ipv4Addr, ipnet::Ipv4Net)>,
    pub layout: services::Layout,
    pub dns: SocketAddr,
    pub domain: String,
    pub bin_dir: PathBuf,
    pub state_dir: PathBuf,
}

const FIELD_MANAGER: &str = "mesh-node";

fn node_object(n: &NodeCtx) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": n.facts.name, "labels": {
            "kubernetes.io/hostname": n.facts.name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "node.mesh.dev/agent": "mesh-node",
        }},
        "spec": {"podCIDR": n.cidr.to_string(), "podCIDRs": [n.cidr.to_string()]},
    })
}

fn node_status(n: &NodeCtx) -> serde_json::Value {
    let now = Timestamp::now().to_string();
    let cond = |t: &str, status: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": status, "reason": reason, "message": msg,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let cap = json!({"cpu": format!("{}m", n.facts.cpu_millis), "memory": format!("{}", n.facts.memory),
                     "pods": "110", "ephemeral-storage": "20Gi"});
    json!({"status": {
        "capacity": cap, "allocatable": cap,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "mesh-node is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": n.facts.ip.to_string()},
                      {"type": "Hostname", "address": n.facts.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": n.facts.name, "systemUUID": n.facts.name, "bootID": std::process::id().to_string(),
            "kernelVersion": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "osImage": "mesh-node", "containerRuntimeVersion": "mesh-node://0.1.0",
            "kubeletVersion": "v1.37.2", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
        },
    }})
}

/// Registers a Node and keeps its status and lease fresh.
async fn heartbeat(client: kube::Client, n: Arc<NodeCtx>) {
    let nodes = Api::<Node>::all(client.clone());
    let leases = Api::<Lease>::namespaced(client, "kube-node-lease");
    let name = n.facts.name.clone();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    loop {
        let r = async {
            nodes.patch(&name, &pp, &Patch::Apply(node_object(&n))).await?;
            nodes.patch_status(&name, &PatchParams::default(), &Patch::Merge(node_status(&n))).await?;
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                         "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now())},
            });
            leases.patch(&name, &pp, &Patch::Apply(lease)).await?;
            Ok::<_, kube::Error>(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(node = %name, error = %e, "node heartbeat failed");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Runs the pods bound to one node: one task per pod UID.
async fn pods(agent: Arc<Agent>, n: Arc<NodeCtx>) {
    let api = Api::<Pod>::all(agent.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", n.facts.name));
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut seen_in_list: Vec<String> = vec![];
    let mut stream = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch");
                continue;
            }
        };
        let apply = |p: Pod, workers: &mut HashMap<String, watch::Sender<Option<Pod>>>| {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let ended = p
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
            match workers.get(&uid) {
                Some(tx) => {
                    let _ = tx.send(Some(p));
                }
                None if ended && p.metadata.deletion_timestamp.is_none() => {}
                None => {
                    let (tx, rx) = watch::channel(Some(p));
                    tokio::spawn(pod::run(agent.clone(), n.clone(), rx));
                    workers.insert(uid, tx);
                }
            }
        };
        match ev {
            watcher::Event::Init => seen_in_list.clear(),
            watcher::Event::InitApply(p) => {
                seen_in_list.push(p.metadata.uid.clone().unwrap_or_default());
                apply(p, &mut workers);
            }
            watcher::Event::InitDone => {
                for (uid, tx) in workers.iter() {
                    if !seen_in_list.contains(uid) {
                        let _ = tx.send(None);
                    }
                }
            }
            watcher::Event::Apply(p) => apply(p, &mut workers),
            watcher::Event::Delete(p) => {
                if let Some(tx) = workers.get(p.metadata.uid.as_deref().unwrap_or_default()) {
                    let _ = tx.send(None);
                }
            }
        }
        workers.retain(|_, tx| !tx.is_closed());
    }
}

/// Keeps the Service rules and the DNS zone in step with the API.
async fn services_and_dns(
    client: kube::Client,
    svc_store: Store<Service>,
    svc_writer: reflector::store::Writer<Service>,
    layout: services::Layout,
    domain: String,
    zone: watch::Sender<Arc<dns::Zone>>,
) {
    let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
    let svc = watcher::watcher(Api::<Service>::all(client.clone()), Default::default())
        .default_backoff()
        .reflect(svc_writer)
        .map(|_| ());
    let eps = watcher::watcher(Api::<EndpointSlice>::all(client), Default::default())
        .default_backoff()
        .reflect(slice_writer)
        .map(|_| ());
    let mut events = std::pin::pin!(futures_util::stream::select(svc, eps));
    let mut programmer = services::Programmer::default();
    let mut runner = services::System;
    while events.next().await.is_some() {
        // Coalesce a burst of changes into one sync.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), events.next()).await
        {
        }
        let services: Vec<Service> = svc_store.state().iter().map(|s| (**s).clone()).collect();
        let slices: Vec<EndpointSlice> =
            slice_store.state().iter().map(|s| (**s).clone()).collect();
        if let Err(e) = programmer.sync(&mut runner, &layout, &services, &slices) {
            tracing::error!(error = %e, "service rules not applied");
        }
        let z = dns::Zone::build(&domain, &services, &slices);
        zone.send_if_modified(|cur| {
            if **cur == z {
                false
            } else {
                *cur = Arc::new(z);
                true
            }
        });
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let client = match &cfg.kubeconfig {
        None => kube::Client::try_default().await?,
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            let c = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            kube::Client::try_from(c)?
        }
    };
    let self_exe = std::env::current_exe()?;
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let dns_ip = match cfg.dns.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => anyhow::bail!("--dns must be an IPv4 address"),
    };
    let agent = Arc::new(Agent {
        client: client.clone(),
        bin_dir: cfg.bin_dir,
        state_dir: cfg.state_dir.clone(),
        self_exe,
        domain: cfg.domain.clone(),
        dns_ip,
        services: svc_store.clone(),
    });
    std::fs::create_dir_all(cfg.state_dir.join("pods"))?;
    cleanup();
    let mut runner = services::System;
    for cmd in services::hooks() {
        services::Runner::run(&mut runner, &cmd, None)?;
    }
    let socket = tokio::net::UdpSocket::bind(cfg.dns)
        .await
        .map_err(|e| anyhow::anyhow!("DNS on {}: {e}", cfg.dns))?;
    let (zone_tx, zone_rx) = watch::channel(Arc::new(dns::Zone::default()));
    tokio::spawn(dns::serve(socket, zone_rx));
    tokio::spawn(services_and_dns(
        client.clone(),
        svc_store,
        svc_writer,
        cfg.layout,
        cfg.domain,
        zone_tx,
    ));
    // Services are known before the first pod starts (its service links).
    if tokio::time::timeout(Duration::from_secs(10), agent.services.wait_until_ready())
        .await
        .is_err()
    {
        tracing::warn!("Services not listed after 10 s; pods start without their service links");
    }
    for (name, ip, cidr) in cfg.nodes {
        let n = Arc::new(NodeCtx {
            facts: NodeFacts {
                name,
                ip,
                cpu_millis: 8000,
                memory: 16 << 30,
            },
            cidr,
            ipam: Mutex::new(net::Ipam::new(cidr)),
        });
        tokio::spawn(heartbeat(client.clone(), n.clone()));
        tokio::spawn(pods(agent.clone(), n));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: every pod's processes and network namespace are removed");
    cleanup();
    for cmd in services::unhooks() {
        let _ = services::Runner::run(&mut runner, &cmd, None);
    }
    Ok(())
}

/// Removes what pods of an earlier run left: their process groups, network
/// namespaces and veth links (names start with `mk-` / `mkv`).
pub fn cleanup() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("mk-") {
            continue;
        }
        // Every process in that namespace is killed.
        if let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", &name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let veth = name.replacen("mk-", "mkv", 1);
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &veth])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
    }
}

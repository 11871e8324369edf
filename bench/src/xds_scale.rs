//! `mesh-bench xds-scale`: pilot with N services and M simulated proxies
//! (real gRPC clients over loopback TCP, each subscribed to K
//! destinations). Measures how long one service's endpoint change takes to
//! be acknowledged by every proxy subscribed to it, and a change that
//! touches every service; pilot's CPU for each push; memory.
//!
//! Pilot runs on its own runtime (threads named `pilot`), so its CPU time
//! is read per thread from /proc, apart from the clients'.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::discovery::{CLUSTER, DESTINATION, DeltaDiscoveryRequest, Node, WORKLOAD};
use mesh_pilot::registry::{Inputs, ObjectKey, Service, ServicePort, TargetPort, Workload};
use mesh_pilot::source::{Sink, Source};
use mesh_pilot::{Config, Debounce, MeshSettings};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Args)]
pub struct ScaleArgs {
    /// Services (each with two endpoints), spread over 50 namespaces.
    #[arg(long, default_value_t = 5000)]
    services: usize,
    /// Simulated proxy counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    proxies: Vec<usize>,
    /// Destinations each proxy subscribes to.
    #[arg(long, default_value_t = 10)]
    destinations: usize,
    /// Single-service changes measured per proxy count.
    #[arg(long, default_value_t = 30)]
    changes: usize,
}

const NAMESPACES: usize = 50;

fn service(i: usize) -> Service {
    let (ns, name) = (format!("ns-{}", i % NAMESPACES), format!("svc-{i}"));
    Service {
        host: format!("{name}.{ns}.svc.cluster.local"),
        key: ObjectKey::new(ns, name.clone()),
        addresses: vec![std::net::IpAddr::from([10, 96, (i >> 8) as u8, i as u8])],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            target: TargetPort::Number(8080),
            protocol: mesh_api::model::Protocol::Http,
        }],
        selector: Some([("app".to_string(), name)].into()),
    }
}

fn endpoint(i: usize, n: usize) -> Workload {
    let s = service(i);
    Workload {
        key: ObjectKey::new(s.key.namespace.clone(), format!("svc-{i}-{n}")),
        address: std::net::IpAddr::from([10, (n % 250) as u8 + 1, (i >> 8) as u8, i as u8]),
        labels: [("app".to_string(), s.key.name.clone())].into(),
        service_account: s.key.name,
        ports: Default::default(),
        weight: 1,
        locality: None,
        ready: true,
    }
}

/// Loads the synthetic registry once, then holds still.
struct Synthetic(usize);

impl Source for Synthetic {
    async fn run(self, sink: Sink) {
        let mut inputs = Inputs::default();
        for i in 0..self.0 {
            let s = service(i);
            inputs.services.insert(s.key.clone(), Arc::new(s));
            for n in 0..2 {
                let w = endpoint(i, n);
                inputs.workloads.insert(w.key.clone(), Arc::new(w));
            }
        }
        sink.store.update(|i| *i = inputs);
        sink.ready.send_replace(true);
        std::future::pending::<()>().await;
    }
}

/// What one simulated proxy has acknowledged: cluster name → (version,
/// when the ACK was sent).
type Acked = Arc<Mutex<HashMap<String, (String, Instant)>>>;

struct SimProxy {
    /// Destination service indexes it subscribed to.
    subs: Vec<usize>,
    acked: Acked,
}

async fn sim_proxy(
    addr: SocketAddr,
    id: usize,
    subs: Vec<usize>,
    acked: Acked,
    connecting: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(16);
    let ns = format!("ns-{}", id % NAMESPACES);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: format!("proxy-{id}.{ns}"),
            workload: format!("proxy-{id}"),
            namespace: ns.clone(),
            labels: [("app".to_string(), format!("proxy-{id}"))].into(),
            service_account: "default".into(),
            version: "bench".into(),
            mode: "sidecar".into(),
            metrics_addr: String::new(),
            gateways: vec![],
        }),
        type_url: WORKLOAD.into(),
        resource_names_subscribe: vec![format!("{ns}/proxy-{id}")],
        ..Default::default()
    })
    .await?;
    tx.send(DeltaDiscoveryRequest {
        type_url: DESTINATION.into(),
        resource_names_subscribe: subs
            .iter()
            .map(|i| format!("svc-{i}.ns-{}:80", i % NAMESPACES))
            .collect(),
        ..Default::default()
    })
    .await?;
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    drop(connecting);
    while let Some(resp) = inbound.message().await? {
        let now = Instant::now();
        if resp.type_url == CLUSTER {
            let mut a = acked.lock().unwrap_or_else(|e| e.into_inner());
            for r in &resp.resources {
                a.insert(r.name.clone(), (r.version.clone(), now));
            }
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// CPU time (ns) of this process's threads whose name starts with `prefix`.
fn thread_cpu_ns(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn cluster_name(i: usize) -> String {
    format!(
        "outbound|80||svc-{i}.ns-{}.svc.cluster.local",
        i % NAMESPACES
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Waits until every `(proxy, cluster)` pair has acked a version other
/// than `old`; returns each pair's latency from `since`.
async fn wait_acked(
    proxies: &[SimProxy],
    pairs: &[(usize, String, String)],
    since: Instant,
    deadline: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let end = Instant::now() + deadline;
    loop {
        let mut done = Vec::with_capacity(pairs.len());
        for (p, name, old) in pairs {
            let a = proxies[*p].acked.lock().unwrap_or_else(|e| e.into_inner());
            match a.get(name) {
                Some((v, at)) if v != old => done.push(at.saturating_duration_since(since)),
                _ => break,
            }
        }
        if done.len() == pairs.len() {
            return Ok(done);
        }
        anyhow::ensure!(
            Instant::now() < end,
            "{} of {} subscribers acknowledged within {deadline:?}",
            done.len(),
            pairs.len()
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

pub fn run(args: ScaleArgs) -> anyhow::Result<()> {
    let pilot_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pilot")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("clients")
        .enable_all()
        .build()?;
    let rss_start = rss_mb();
    let services = args.services;
    let running = pilot_rt.block_on(async {
        mesh_pilot::start(
            Config {
                xds_addr: "127.0.0.1:0".parse().expect("address"),
                http_addr: "127.0.0.1:0".parse().expect("address"),
                mesh: MeshSettings::default(),
                debounce: Debounce::default(),
            },
            Synthetic(services),
        )
        .await
    })?;
    let pilot = running.pilot.clone();
    let xds = running.xds_addr;
    client_rt.block_on(async {
        let mut ready = pilot.ready.clone();
        ready.wait_for(|r| *r).await.context("pilot ready")?;
        // The first recompute has run once destinations exist.
        while pilot.store.read().destinations.len() < services {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::Ok(())
    })?;
    let rss_loaded = rss_mb();
    println!(
        "pilot with {services} services, {} endpoints: RSS {:.1} MB (process at start {:.1} MB)",
        services * 2,
        rss_loaded,
        rss_start
    );
    println!();
    println!(
        "{:>7} {:>5} | {:>13} {:>13} {:>13} {:>11} | {:>13} {:>11} | {:>9}",
        "proxies",
        "subs",
        "1 change p50",
        "p99",
        "max",
        "pilot CPU",
        "all-svc p99",
        "pilot CPU",
        "RSS MB"
    );
    let mut next_endpoint = 2;
    let mut all_total = 0usize;
    let mut proxies: Vec<SimProxy> = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    for &m in &args.proxies {
        // Grow the simulated fleet to m.
        client_rt.block_on(async {
            // Connect a few hundred at a time, as a rollout would, not
            // thousands in one instant (the listen backlog overflows).
            let connecting = Arc::new(tokio::sync::Semaphore::new(256));
            while proxies.len() < m {
                let permit = connecting.clone().acquire_owned().await?;
                let id = proxies.len();
                let subs: Vec<usize> = (0..args.destinations)
                    .map(|_| rng.usize(0..services))
                    .collect();
                let acked: Acked = Default::default();
                tokio::spawn({
                    let (subs, acked) = (subs.clone(), acked.clone());
                    async move {
                        if let Err(e) = sim_proxy(xds, id, subs, acked, permit).await {
                            eprintln!("proxy {id}: {e:#}");
                        }
                    }
                });
                proxies.push(SimProxy { subs, acked });
            }
            // Everyone has every subscribed cluster.
            let pairs: Vec<(usize, String, String)> = proxies
                .iter()
                .enumerate()
                .flat_map(|(p, sp)| {
                    sp.subs
                        .iter()
                        .map(move |i| (p, cluster_name(*i), String::new()))
                })
                .collect();
            wait_acked(&proxies, &pairs, Instant::now(), Duration::from_secs(120)).await?;
            anyhow::Ok(())
        })?;
        // Single-service endpoint changes.
        let mut lat = Vec::new();
        let mut cpu = Vec::new();
        let by_service = {
            let mut m: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (p, sp) in proxies.iter().enumerate() {
                for s in &sp.subs {
                    m.entry(*s).or_default().push(p);
                }
            }
            m
        };
        let subscribed: Vec<usize> = by_service.keys().copied().collect();
        for c in 0..args.changes {
            let svc = subscribed[(c * 7919) % subscribed.len()];
            let pairs: Vec<(usize, String, String)> = by_service[&svc]
                .iter()
                .map(|p| {
                    let name = cluster_name(svc);
                    let old = proxies[*p].acked.lock().unwrap_or_else(|e| e.into_inner())[&name]
                        .0
                        .clone();
                    (*p, name, old)
                })
                .collect();
            let cpu_before = thread_cpu_ns("pilot");
            let since = Instant::now();
            let w = endpoint(svc, next_endpoint);
            next_endpoint += 1;
            pilot.store.update(|i| {
                i.workloads.insert(w.key.clone(), Arc::new(w));
            });
            let got =
                client_rt.block_on(wait_acked(&proxies, &pairs, since, Duration::from_secs(30)))?;
            // Let pilot finish what it does after the last send.
            std::thread::sleep(Duration::from_millis(20));
            cpu.push(Duration::from_nanos(thread_cpu_ns("pilot") - cpu_before));
            lat.extend(got);
        }
        lat.sort();
        cpu.sort();
        // A change to every service: a mesh-wide DestinationRule.
        all_total += 1;
        let dr: mesh_api::Resource = serde_yaml::from_str::<mesh_api::networking::DestinationRule>(&format!(
            "apiVersion: networking.mesh.dev/v1\nkind: DestinationRule\nmetadata: {{name: all-{all_total}, namespace: mesh-system}}\nspec:\n  host: '*.svc.cluster.local'\n  trafficPolicy: {{loadBalancer: {{simple: {}}}}}\n",
            if all_total % 2 == 1 { "LEAST_REQUEST" } else { "RANDOM" }
        ))
        .map(mesh_api::Resource::DestinationRule)?;
        let pairs: Vec<(usize, String, String)> = proxies
            .iter()
            .enumerate()
            .flat_map(|(p, sp)| {
                let a = sp.acked.lock().unwrap_or_else(|e| e.into_inner());
                sp.subs
                    .iter()
                    .map(|i| {
                        let name = cluster_name(*i);
                        let old = a[&name].0.clone();
                        (p, name, old)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let cpu_before = thread_cpu_ns("pilot");
        let since = Instant::now();
        pilot.store.update(|i| {
            i.config
                .retain(|k, _| k.kind != mesh_api::Kind::DestinationRule);
            i.config.insert(dr.key(), Arc::new(dr));
        });
        let mut all = client_rt.block_on(wait_acked(
            &proxies,
            &pairs,
            since,
            Duration::from_secs(120),
        ))?;
        std::thread::sleep(Duration::from_millis(20));
        let all_cpu = Duration::from_nanos(thread_cpu_ns("pilot") - cpu_before);
        all.sort();
        println!(
            "{:>7} {:>5} | {:>10} ms {:>10} ms {:>10} ms {:>8} ms | {:>10} ms {:>8} ms | {:>9.1}",
            m,
            lat.len() / args.changes.max(1),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            ms(*lat.last().unwrap_or(&Duration::ZERO)),
            ms(percentile(&cpu, 0.5)),
            ms(percentile(&all, 0.99)),
            ms(all_cpu),
            rss_mb()
        );
    }
    println!();
    println!(
        "1 change: one service's endpoints change; time until each proxy subscribed to it has acknowledged the new cluster (pilot CPU: median per change)."
    );
    println!(
        "all-svc: a DestinationRule for every host; time until every proxy has acknowledged all of its clusters."
    );
    println!(
        "RSS: the whole process (pilot and the simulated proxies); pilot alone with the registry loaded: {rss_loaded:.1} MB."
    );
    drop(running);
    Ok(())
}

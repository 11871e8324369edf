//! `mesh-bench xds-scale`: pilot with N services and M simulated proxies
//! (real gRPC clients over loopback TCP, each subscribed to K
//! destinations). For each of many single-service endpoint changes it
//! measures the time until the last proxy subscribed to that service has
//! acknowledged the new cluster, and pilot's CPU for the change; then a
//! change that touches every service; and pilot's memory.
//!
//! Pilot runs in a child process (this program again, `--serve-pilot`), so
//! its CPU time and RSS are its own, apart from the simulated proxies in
//! this process:
//!
//! - A change is made inside pilot's process, on its runtime, the way a
//!   source that knows what changed makes it (`Store::edit`, as the
//!   Kubernetes source does for Service, Pod and EndpointSlice events),
//!   on a command from this process; the child answers when pilot has *recorded* the
//!   ACK of every subscriber (pilot's own count of acknowledged
//!   resources). That is the latency reported; the proxies' own view (the
//!   time each had sent its ACK) is reported next to it.
//! - Pilot's CPU for a change: the CPU time of all of the child's threads
//!   but the one reading commands, from before the change until its last
//!   ACK is recorded plus a short settle (`/proc/<pid>/task/<tid>/schedstat`,
//!   nanoseconds). It includes the store edit, the debounce, the
//!   recompute, waking the subscribers, every push and every ACK.
//! - Pilot's RSS: the child's `VmRSS` (and its peak, `VmHWM`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::discovery::{CLUSTER, DESTINATION, DeltaDiscoveryRequest, Node, WORKLOAD};
use mesh_pilot::registry::{Inputs, ObjectKey, Service, ServicePort, TargetPort, Workload};
use mesh_pilot::source::{Sink, Source};
use mesh_pilot::store::Store;
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
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Changes touching every service measured per proxy count.
    #[arg(long, default_value_t = 3)]
    mesh_changes: usize,
    /// Run as the pilot process the benchmark drives (internal).
    #[arg(long, hide = true)]
    serve_pilot: bool,
}

const NAMESPACES: usize = 50;
/// The targets, at 1,000 proxies × 10 destinations and 5,000 services.
const TARGET_PROXIES: usize = 1000;
const TARGET_P99_MS: f64 = 100.0;
const TARGET_RSS_MB: f64 = 300.0;
const TARGET_CPU_MS: f64 = 50.0;
/// Single changes made through `Store::update` at the target size.
const WHOLE_CHANGES: usize = 20;
/// After the last ACK is recorded, how long pilot's CPU is still counted.
const SETTLE: Duration = Duration::from_millis(10);

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

/// A DestinationRule for every host; `n` alternates the policy so each
/// one changes every cluster.
fn mesh_wide_rule(n: usize) -> anyhow::Result<mesh_api::Resource> {
    let yaml = format!(
        "apiVersion: networking.mesh.dev/v1\nkind: DestinationRule\nmetadata: {{name: all-{n}, namespace: mesh-system}}\nspec:\n  host: '*.svc.cluster.local'\n  trafficPolicy: {{loadBalancer: {{simple: {}}}}}\n",
        if n % 2 == 1 {
            "LEAST_REQUEST"
        } else {
            "RANDOM"
        }
    );
    Ok(mesh_api::Resource::DestinationRule(serde_yaml::from_str(
        &yaml,
    )?))
}

fn cluster_name(i: usize) -> String {
    format!(
        "outbound|80||svc-{i}.ns-{}.svc.cluster.local",
        i % NAMESPACES
    )
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
        sink.store.replace(inputs);
        sink.ready.send_replace(true);
        std::future::pending::<()>().await;
    }
}

// ---- the pilot process ----

/// A change to pilot's inputs, made through the store.
type InputChange = Box<dyn FnOnce(&Store) + Send>;

/// Pilot on its own runtime; commands on stdin, one answer line each:
///
/// - `change SVC N EXPECT`: adds endpoint N to service SVC; answers
///   `done MICROS` once pilot has recorded EXPECT more cluster ACKs.
/// - `mesh N EXPECT`: the mesh-wide DestinationRule N, likewise.
fn serve_pilot(services: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("pilot")
        .enable_all()
        .build()?;
    let running = rt.block_on(mesh_pilot::start(
        Config {
            xds_addr: "127.0.0.1:0".parse()?,
            http_addr: "127.0.0.1:0".parse()?,
            mesh: MeshSettings::default(),
            debounce: Debounce::default(),
        },
        Synthetic(services),
    ))?;
    let pilot = running.pilot.clone();
    rt.block_on(async {
        let mut ready = pilot.ready.clone();
        ready.wait_for(|r| *r).await.context("pilot ready")?;
        // The first recompute has run once destinations exist.
        let mut generation = pilot.store.subscribe();
        while pilot.store.read().destinations.len() < services {
            generation.changed().await?;
        }
        anyhow::Ok(())
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", running.xds_addr)?;
    out.flush()?;
    let mut acked = pilot.sync.acknowledged();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> anyhow::Result<usize> {
            words
                .get(i)
                .context("missing argument")?
                .parse()
                .context("not a number")
        };
        let (change, expect): (InputChange, u64) = match words.first() {
            Some(&"change") => {
                let w = endpoint(num(1)?, num(2)?);
                (
                    Box::new(move |s: &Store| s.edit(|e| e.put_workload(Arc::new(w)))),
                    num(3)? as u64,
                )
            }
            Some(&"update") => {
                // The same change the way a source that replaces its whole
                // view makes it: a copy of the inputs, compared whole.
                let w = endpoint(num(1)?, num(2)?);
                (
                    Box::new(move |s: &Store| {
                        s.update(|i| {
                            i.workloads.insert(w.key.clone(), Arc::new(w));
                        })
                    }),
                    num(3)? as u64,
                )
            }
            Some(&"mesh") => {
                let dr = mesh_wide_rule(num(1)?)?;
                (
                    Box::new(move |s: &Store| {
                        s.edit(|e| {
                            let old: Vec<_> = e
                                .inputs()
                                .config_of(mesh_api::Kind::DestinationRule)
                                .map(|r| r.key())
                                .collect();
                            for k in &old {
                                e.remove_config(k);
                            }
                            e.put_config(Arc::new(dr));
                        })
                    }),
                    num(2)? as u64,
                )
            }
            Some(&"quit") | None => break,
            Some(other) => bail!("unknown command {other:?}"),
        };
        let want = acked.borrow_and_update()[2] + expect;
        let since = Instant::now();
        // On pilot's runtime, as a source would.
        let store = pilot.store.clone();
        rt.spawn(async move { change(&store) });
        let got = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), acked.wait_for(|a| a[2] >= want))
                .await
                .map(|r| r.is_ok())
        });
        let took = since.elapsed();
        match got {
            Ok(true) => writeln!(out, "done {}", took.as_micros())?,
            _ => writeln!(
                out,
                "timeout {} of {expect}",
                acked.borrow()[2] + expect - want
            )?,
        }
        out.flush()?;
    }
    drop(running);
    Ok(())
}

/// The pilot child process; killed when dropped.
struct PilotProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    xds: SocketAddr,
}

impl PilotProcess {
    fn spawn(services: usize) -> anyhow::Result<PilotProcess> {
        let exe = std::env::current_exe().context("this program's path")?;
        let mut child = Command::new(exe)
            .args(["xds-scale", "--serve-pilot", "--services"])
            .arg(services.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the pilot process")?;
        let stdin = child.stdin.take().context("pilot stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("pilot stdout")?);
        let mut p = PilotProcess {
            child,
            stdin,
            stdout,
            xds: "0.0.0.0:0".parse()?,
        };
        let line = p.read_line()?;
        p.xds = line
            .strip_prefix("ready ")
            .with_context(|| format!("pilot said {line:?}"))?
            .parse()?;
        Ok(p)
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the pilot process exited");
        }
        Ok(line.trim().to_string())
    }

    /// Sends a command; returns pilot's time until every expected ACK was
    /// recorded.
    fn command(&mut self, cmd: &str) -> anyhow::Result<Duration> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let line = self.read_line()?;
        match line.strip_prefix("done ") {
            Some(us) => Ok(Duration::from_micros(us.parse()?)),
            None => bail!("{cmd}: {line}"),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time of pilot's threads (all but the one reading commands).
    fn cpu(&self) -> Duration {
        let pid = self.pid();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Duration::ZERO;
        };
        let ns: u64 = tasks
            .flatten()
            .filter(|t| t.file_name().to_str() != Some(&pid.to_string()))
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        Duration::from_nanos(ns)
    }

    /// Resident and peak resident memory, MB.
    fn rss_mb(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()));
        (
            status_mb(status.as_deref().unwrap_or(""), "VmRSS:"),
            status_mb(status.as_deref().unwrap_or(""), "VmHWM:"),
        )
    }
}

impl Drop for PilotProcess {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_mb(status: &str, field: &str) -> f64 {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

// ---- the simulated proxies ----

/// What one simulated proxy has acknowledged: cluster name → (version,
/// when its ACK had been sent).
type Acked = Arc<Mutex<HashMap<String, (String, Instant)>>>;

struct SimProxy {
    /// Destination service indexes it subscribed to (distinct).
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
    // As the proxy does: its workload (with the node), its destinations,
    // then the clusters it holds (none).
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
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await?;
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    drop(connecting);
    while let Some(resp) = inbound.message().await? {
        let clusters: Vec<(String, String)> = if resp.type_url == CLUSTER {
            resp.resources
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect()
        } else {
            Vec::new()
        };
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        })
        .await?;
        // Acknowledged once the ACK is on its way.
        let now = Instant::now();
        let mut a = acked.lock().unwrap_or_else(|e| e.into_inner());
        for (name, version) in clusters {
            a.insert(name, (version, now));
        }
    }
    Ok(())
}

/// Waits until every `(proxy, cluster)` pair has acked a version other
/// than `old`; returns the time of the last of those ACKs.
async fn wait_acked(
    proxies: &[SimProxy],
    pairs: &[(usize, String, String)],
    deadline: Duration,
) -> anyhow::Result<Option<Instant>> {
    let end = Instant::now() + deadline;
    loop {
        let mut last: Option<Instant> = None;
        let mut done = 0;
        for (p, name, old) in pairs {
            let a = proxies[*p].acked.lock().unwrap_or_else(|e| e.into_inner());
            match a.get(name) {
                Some((v, at)) if v != old => {
                    done += 1;
                    last = Some(last.map_or(*at, |l| l.max(*at)));
                }
                _ => break,
            }
        }
        if done == pairs.len() {
            return Ok(last);
        }
        anyhow::ensure!(
            Instant::now() < end,
            "{done} of {} subscribers acknowledged within {deadline:?}",
            pairs.len()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Every proxy's subscriptions to `svcs` (all when `None`), with the
/// version each holds now.
fn pairs_of(proxies: &[SimProxy], svcs: Option<&[usize]>) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    for (p, sp) in proxies.iter().enumerate() {
        let a = sp.acked.lock().unwrap_or_else(|e| e.into_inner());
        for s in &sp.subs {
            if svcs.is_some_and(|v| !v.contains(s)) {
                continue;
            }
            let name = cluster_name(*s);
            let old = a.get(&name).map(|(v, _)| v.clone()).unwrap_or_default();
            out.push((p, name, old));
        }
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One row of the curve.
struct Row {
    proxies: usize,
    subscribers: f64,
    lat: Vec<Duration>,
    client_lat: Vec<Duration>,
    cpu: Vec<Duration>,
    mesh_lat: Vec<Duration>,
    mesh_cpu: Vec<Duration>,
    /// The single changes made through `Store::update` instead.
    whole_lat: Vec<Duration>,
    whole_cpu: Vec<Duration>,
    rss: f64,
    peak: f64,
}

pub fn run(args: ScaleArgs) -> anyhow::Result<()> {
    if args.serve_pilot {
        return serve_pilot(args.services);
    }
    anyhow::ensure!(args.changes > 0, "--changes must be at least 1");
    let services = args.services;
    let loading = Instant::now();
    let mut pilot = PilotProcess::spawn(services)?;
    let (rss_loaded, _) = pilot.rss_mb();
    println!(
        "pilot (pid {}) with {services} services, {} endpoints: RSS {rss_loaded:.1} MB, loaded in {:.1} s",
        pilot.pid(),
        services * 2,
        loading.elapsed().as_secs_f64()
    );
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("clients")
        .enable_all()
        .build()?;
    let mut next_endpoint = 2;
    let mut mesh_total = 0usize;
    let mut proxies: Vec<SimProxy> = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut rows = Vec::new();
    for &m in &args.proxies {
        // Grow the simulated fleet to m.
        let xds = pilot.xds;
        client_rt.block_on(async {
            // Connect a few hundred at a time, as a rollout would, not
            // thousands in one instant (the listen backlog overflows).
            let connecting = Arc::new(tokio::sync::Semaphore::new(256));
            while proxies.len() < m {
                let permit = connecting.clone().acquire_owned().await?;
                let id = proxies.len();
                let subs: Vec<usize> = (0..args.destinations)
                    .map(|_| rng.usize(0..services))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
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
            let pairs = pairs_of(&proxies, None)
                .into_iter()
                .map(|(p, n, _)| (p, n, String::new()))
                .collect::<Vec<_>>();
            wait_acked(&proxies, &pairs, Duration::from_secs(300)).await?;
            anyhow::Ok(())
        })?;
        let by_service = {
            let mut by: BTreeMap<usize, usize> = BTreeMap::new();
            for sp in &proxies {
                for s in &sp.subs {
                    *by.entry(*s).or_default() += 1;
                }
            }
            by
        };
        let subscribed: Vec<usize> = by_service.keys().copied().collect();
        let mut row = Row {
            proxies: m,
            subscribers: 0.0,
            lat: Vec::new(),
            client_lat: Vec::new(),
            cpu: Vec::new(),
            mesh_lat: Vec::new(),
            mesh_cpu: Vec::new(),
            whole_lat: Vec::new(),
            whole_cpu: Vec::new(),
            rss: 0.0,
            peak: 0.0,
        };
        // Single-service endpoint changes, as an edit; at the target size
        // also some through a whole-view update, for comparison.
        let whole = if m == TARGET_PROXIES {
            WHOLE_CHANGES
        } else {
            0
        };
        for c in 0..args.changes + whole {
            let svc = subscribed[(c * 7919) % subscribed.len()];
            let expect = by_service[&svc];
            let pairs = pairs_of(&proxies, Some(&[svc]));
            let how = if c < args.changes { "change" } else { "update" };
            let cpu_before = pilot.cpu();
            let since = Instant::now();
            let took = pilot.command(&format!("{how} {svc} {next_endpoint} {expect}"))?;
            std::thread::sleep(SETTLE);
            let cpu = pilot.cpu().saturating_sub(cpu_before);
            next_endpoint += 1;
            let last = client_rt.block_on(wait_acked(&proxies, &pairs, Duration::from_secs(30)))?;
            if c >= args.changes {
                row.whole_lat.push(took);
                row.whole_cpu.push(cpu);
                continue;
            }
            row.subscribers += expect as f64 / args.changes as f64;
            row.cpu.push(cpu);
            row.lat.push(took);
            row.client_lat
                .push(last.map_or(Duration::ZERO, |l| l.saturating_duration_since(since)));
        }
        // Changes to every service: a mesh-wide DestinationRule.
        for _ in 0..args.mesh_changes {
            mesh_total += 1;
            let pairs = pairs_of(&proxies, None);
            let cpu_before = pilot.cpu();
            let took = pilot.command(&format!("mesh {mesh_total} {}", pairs.len()))?;
            std::thread::sleep(SETTLE);
            row.mesh_cpu.push(pilot.cpu().saturating_sub(cpu_before));
            row.mesh_lat.push(took);
            client_rt.block_on(wait_acked(&proxies, &pairs, Duration::from_secs(120)))?;
        }
        (row.rss, row.peak) = pilot.rss_mb();
        for v in [
            &mut row.lat,
            &mut row.client_lat,
            &mut row.cpu,
            &mut row.mesh_lat,
            &mut row.mesh_cpu,
            &mut row.whole_lat,
            &mut row.whole_cpu,
        ] {
            v.sort();
        }
        print_row(&row, rows.is_empty());
        rows.push(row);
    }
    println!();
    println!(
        "1 change: one service's endpoints change ({} changes per row); latency: until pilot has recorded the ACK of the last proxy subscribed to it (proxies' view: until the last had sent its ACK); pilot CPU: all of pilot's threads, from the store edit to the last ACK plus {} ms.",
        args.changes,
        SETTLE.as_millis()
    );
    println!(
        "mesh-wide: a DestinationRule for every host ({} changes per row): until every proxy's ACK of all its clusters is recorded; median latency and CPU.",
        args.mesh_changes
    );
    println!(
        "pilot runs in its own process (pid {}): RSS and CPU are pilot's alone; the simulated proxies run in this one.",
        pilot.pid()
    );
    if let Some(r) = rows.iter().find(|r| !r.whole_lat.is_empty()) {
        println!(
            "the same single changes through Store::update (the inputs copied and compared whole, as the files source does, and the Kubernetes source after a relist or a namespace or config change), {} at {} proxies: p50 {:.1} ms, p99 {:.1} ms; pilot CPU p50 {:.1} ms, p99 {:.1} ms.",
            r.whole_lat.len(),
            r.proxies,
            ms(percentile(&r.whole_lat, 0.5)),
            ms(percentile(&r.whole_lat, 0.99)),
            ms(percentile(&r.whole_cpu, 0.5)),
            ms(percentile(&r.whole_cpu, 0.99)),
        );
    }
    println!();
    match rows.iter().find(|r| r.proxies == TARGET_PROXIES) {
        Some(r) if services == 5000 && args.destinations == 10 => {
            let p99 = ms(percentile(&r.lat, 0.99));
            let cpu = ms(percentile(&r.cpu, 0.99));
            let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
            println!(
                "target at 1,000 proxies x 10 destinations, 5,000 services: 1-change p99 {p99:.1} ms <= {TARGET_P99_MS} ms: {}",
                verdict(p99 <= TARGET_P99_MS)
            );
            println!(
                "target: pilot RSS {:.1} MB (peak {:.1}) <= {TARGET_RSS_MB} MB: {}",
                r.rss,
                r.peak,
                verdict(r.peak <= TARGET_RSS_MB)
            );
            println!(
                "target: pilot CPU for the push p99 {cpu:.1} ms (p50 {:.1}) <= {TARGET_CPU_MS} ms: {}",
                ms(percentile(&r.cpu, 0.5)),
                verdict(cpu <= TARGET_CPU_MS)
            );
        }
        _ => println!(
            "targets apply to 5,000 services and 1,000 proxies x 10 destinations; not measured in this run"
        ),
    }
    Ok(())
}

fn print_row(r: &Row, header: bool) {
    if header {
        println!();
        println!(
            "{:>7} {:>5} | {:>8} {:>8} {:>8} {:>9} | {:>8} {:>8} | {:>9} {:>9} | {:>8} {:>8}",
            "proxies",
            "subs",
            "p50 ms",
            "p99 ms",
            "max ms",
            "proxy p99",
            "CPU p50",
            "CPU p99",
            "mesh ms",
            "mesh CPU",
            "RSS MB",
            "peak MB"
        );
    }
    println!(
        "{:>7} {:>5.1} | {:>8.1} {:>8.1} {:>8.1} {:>9.1} | {:>8.1} {:>8.1} | {:>9.1} {:>9.1} | {:>8.1} {:>8.1}",
        r.proxies,
        r.subscribers,
        ms(percentile(&r.lat, 0.5)),
        ms(percentile(&r.lat, 0.99)),
        ms(*r.lat.last().unwrap_or(&Duration::ZERO)),
        ms(percentile(&r.client_lat, 0.99)),
        ms(percentile(&r.cpu, 0.5)),
        ms(percentile(&r.cpu, 0.99)),
        ms(percentile(&r.mesh_lat, 0.5)),
        ms(percentile(&r.mesh_cpu, 0.5)),
        r.rss,
        r.peak
    );
}

//! `meshctl demo`: the whole mesh on one machine, in this process, without
//! root: pilot reading a config directory, the bookinfo apps each with a
//! sidecar in explicit mode (the app sends its calls to the sidecar as an
//! HTTP proxy), and an ingress gateway.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mesh_api::Resource;
use mesh_api::convert::{Output, convert};
use mesh_proxy::{Addrs, ConnSettings, Proxy, Running};
use mesh_samples::{App, Upstream};

use crate::local::{self, State};

/// The bookinfo workloads: app and version.
const WORKLOADS: [(&str, &str); 6] = [
    ("productpage", "v1"),
    ("details", "v1"),
    ("ratings", "v1"),
    ("reviews", "v1"),
    ("reviews", "v2"),
    ("reviews", "v3"),
];
const SERVICES: [&str; 4] = ["productpage", "details", "ratings", "reviews"];
const NAMESPACE: &str = "default";

const GATEWAY_YAML: &str = include_str!("../../samples/bookinfo/networking/bookinfo-gateway.yaml");
const SUBSETS_YAML: &str =
    include_str!("../../samples/bookinfo/networking/destination-rule-all.yaml");

pub struct Options {
    pub gateway_port: u16,
    pub xds_addr: SocketAddr,
    pub status_addr: SocketAddr,
}

pub fn run(opts: Options) -> Result<()> {
    if let Some(s) = local::find() {
        bail!(
            "a local mesh is already running (pid {}, gateway {}); stop it first",
            s.pid,
            s.gateway
        );
    }
    let gateway = SocketAddr::from(([127, 0, 0, 1], opts.gateway_port));
    if let Err(e) = std::net::TcpListener::bind(gateway) {
        bail!(
            "{gateway} is not available for the ingress gateway ({e}): stop what listens there, or choose another port with --gateway-port"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(demo(opts, gateway));
    let _ = std::fs::remove_file(local::state_path());
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn demo(opts: Options, gateway: SocketAddr) -> Result<()> {
    let started = Instant::now();
    let dir = local::home().join("demo");
    let config = dir.join("config");
    if config.exists() {
        std::fs::remove_dir_all(&config)
            .with_context(|| format!("clearing {}", config.display()))?;
    }
    std::fs::create_dir_all(&config).with_context(|| format!("creating {}", config.display()))?;

    // The apps' ports first: the config names them.
    let mut apps = Vec::new();
    for (app, version) in WORKLOADS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding an app's port")?;
        apps.push((app, version, listener));
    }
    let mut platform = String::new();
    for svc in SERVICES {
        platform.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {NAMESPACE}}}\n\
             spec: {{selector: {{app: {svc}}}, ports: [{{name: http, port: 9080, targetPort: http}}]}}\n---\n"
        ));
    }
    for (app, version, l) in &apps {
        platform.push_str(&format!(
            "apiVersion: networking.mesh.dev/v1\nkind: WorkloadEntry\n\
             metadata: {{name: {app}-{version}, namespace: {NAMESPACE}}}\n\
             spec: {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{app: {app}, version: {version}}}, serviceAccount: bookinfo-{app}}}\n---\n",
            l.local_addr()?.port()
        ));
    }
    std::fs::write(config.join("platform.yaml"), platform)?;
    for r in sample_resources(GATEWAY_YAML, opts.gateway_port)?
        .into_iter()
        .chain(sample_resources(SUBSETS_YAML, opts.gateway_port)?)
    {
        local::write_resource(&config, &r)?;
    }

    let pilot = mesh_pilot::start(
        mesh_pilot::Config {
            xds_addr: opts.xds_addr,
            http_addr: opts.status_addr,
            mesh: mesh_pilot::MeshSettings::default(),
            debounce: mesh_pilot::Debounce::default(),
        },
        mesh_pilot::source::Files {
            path: config.clone(),
            interval: Duration::from_millis(100),
        },
    )
    .await
    .map_err(|e| {
        anyhow!("{e} (is another local mesh running? otherwise pass --xds-addr / --status-addr)")
    })?;

    let mut proxies = Vec::new();
    let mut admin = std::collections::BTreeMap::new();
    for (app, version, listener) in apps {
        let name = format!("{app}-{version}");
        let sidecar = proxy(
            pilot.xds_addr,
            &name,
            &[("app", app), ("version", version)],
            None,
        )
        .await?;
        let explicit = sidecar.explicit;
        if let Some(a) = sidecar.admin {
            admin.insert(name.clone(), a.to_string());
        }
        proxies.push(sidecar);
        let which = match app {
            "productpage" => App::Productpage,
            "details" => App::Details,
            "ratings" => App::Ratings,
            _ => App::Reviews {
                version: version.to_string(),
            },
        };
        let router = mesh_samples::router(which, Upstream::new(explicit), name);
        tokio::spawn(mesh_samples::serve(listener, router));
    }
    let gw = proxy(
        pilot.xds_addr,
        "ingressgateway",
        &[("mesh", "ingressgateway")],
        Some(gateway),
    )
    .await?;

    if let Some(a) = gw.admin {
        admin.insert("ingressgateway".to_string(), a.to_string());
    }
    let state = State {
        admin,
        pid: std::process::id(),
        config: config.clone(),
        status: pilot.http_addr.to_string(),
        xds: pilot.xds_addr.to_string(),
        gateway: gateway.to_string(),
    };
    std::fs::write(local::state_path(), serde_json::to_vec_pretty(&state)?)?;

    // Ready when every proxy has its config and the gateway serves the
    // product page with its details and reviews.
    let probe = Upstream::new(None);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut waiting: Vec<SocketAddr> = proxies
        .iter()
        .chain(std::iter::once(&gw))
        .filter_map(|p| p.ready)
        .collect();
    let none = Default::default();
    loop {
        let mut still = Vec::new();
        for r in waiting {
            let got = probe
                .get(
                    &r.to_string(),
                    "/healthz/ready",
                    &none,
                    Duration::from_secs(2),
                )
                .await;
            if !matches!(&got, Ok((s, _)) if s.is_success()) {
                still.push(r);
            }
        }
        waiting = still;
        let page = match waiting.is_empty() {
            true => probe
                .get(
                    &gateway.to_string(),
                    "/productpage",
                    &none,
                    Duration::from_secs(5),
                )
                .await
                .map_err(|e| e.to_string()),
            false => Err(format!("{} proxies without config", waiting.len())),
        };
        match &page {
            Ok((s, body))
                if s.is_success()
                    && !String::from_utf8_lossy(body).contains("currently unavailable") =>
            {
                break;
            }
            _ if Instant::now() > deadline => {
                bail!(
                    "the mesh did not serve /productpage within 30 s: {:?}",
                    page.map(|(s, _)| s)
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let shown = |p: &Path| {
        let s = p.display().to_string();
        match s.strip_prefix(&home) {
            Some(rest) if !home.is_empty() => format!("~{rest}"),
            _ => s,
        }
    };
    println!(
        "Local mesh ready in {:.1} s.\n\n\
         \x20 bookinfo    http://{gateway}/productpage   (sign in as jason for his routes)\n\
         \x20 dashboard   http://{}/dashboard   (the live service graph)\n\
         \x20 API         http://{gateway}/api/v1/products/0/reviews\n\
         \x20 pilot       xDS {}, status http://{}  (/metrics, /debug/syncz, /debug/configz)\n\
         \x20 workloads   {}, each with a sidecar; ingress gateway on {gateway}\n\
         \x20 config      {}\n\n\
         Reviews rotate between v1 (no stars), v2 (black) and v3 (red). Try:\n\n\
         \x20 {m} apply -f samples/bookinfo/networking/virtual-service-all-v1.yaml\n\
         \x20 {m} apply -f samples/bookinfo/networking/virtual-service-reviews-80-20.yaml\n\
         \x20 {m} apply -f samples/bookinfo/networking/virtual-service-reviews-jason-v2.yaml\n\
         \x20 {m} get virtualservices\n\
         \x20 {m} proxy-status\n\
         \x20 {m} proxy-config routes productpage-v1\n\
         \x20 {m} delete -f samples/bookinfo/networking/virtual-service-reviews-jason-v2.yaml\n\n\
         Ctrl-C stops everything.",
        started.elapsed().as_secs_f64(),
        pilot.http_addr,
        pilot.xds_addr,
        pilot.http_addr,
        WORKLOADS
            .iter()
            .map(|(a, v)| format!("{a}-{v}"))
            .collect::<Vec<_>>()
            .join(", "),
        shown(&config),
        m = {
            let m = meshctl_command();
            let cwd = std::env::current_dir().unwrap_or_default();
            match m.strip_prefix(&cwd) {
                Ok(rel) if m.is_absolute() => rel.display().to_string(),
                _ => shown(&m),
            }
        },
    );
    wait_for_signal().await;
    println!("\nStopping.");
    gw.drain(Duration::from_secs(1)).await;
    for p in &proxies {
        p.drain(Duration::from_millis(200)).await;
    }
    drop(pilot);
    Ok(())
}

/// How to run this meshctl from here: `meshctl` when that is what `PATH`
/// finds, otherwise this binary's path (as after `cargo run`).
fn meshctl_command() -> std::path::PathBuf {
    let me = std::env::current_exe().and_then(std::fs::canonicalize);
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("meshctl"))
            .find(|p| p.is_file())
    });
    match (me, on_path) {
        (Ok(me), Some(found)) if std::fs::canonicalize(&found).is_ok_and(|f| f == me) => {
            "meshctl".into()
        }
        (Ok(me), _) => me,
        (Err(_), _) => "meshctl".into(),
    }
}

/// A sample file's mesh resources; Gateway servers moved to `port`.
fn sample_resources(yaml: &str, port: u16) -> Result<Vec<Resource>> {
    let (docs, _) = convert(mesh_api::load::parse_stream("sample", yaml));
    let mut out = Vec::new();
    for d in docs {
        match d.item {
            Output::Resource(r) => {
                let mut r = *r;
                if let Resource::Gateway(g) = &mut r {
                    for s in &mut g.spec.servers {
                        s.port.number = port.into();
                    }
                }
                out.push(r);
            }
            Output::Invalid(e) => bail!("bundled sample: {e}"),
            Output::Other(_) => {}
        }
    }
    Ok(out)
}

/// A proxy configured by pilot: a sidecar in explicit mode, or (with a
/// gateway address) the ingress gateway.
async fn proxy(
    xds: SocketAddr,
    workload: &str,
    labels: &[(&str, &str)],
    gateway: Option<SocketAddr>,
) -> Result<Arc<Running>> {
    let local = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let addrs = Addrs {
        outbound: None,
        inbound: None,
        explicit: if gateway.is_none() { local } else { None },
        gateway_bind: gateway.map(|g| g.ip()),
        admin: local,
        metrics: local,
        ready: local,
    };
    let running = Arc::new(
        mesh_proxy::start(
            Arc::new(Proxy::new(Vec::new())),
            addrs,
            ConnSettings::default(),
            None,
        )
        .await
        .with_context(|| format!("starting the proxy of {workload}"))?,
    );
    mesh_proxy::follow_pilot(
        &running,
        mesh_proxy::xds::Settings {
            addr: format!("http://{xds}"),
            node: mesh_api::discovery::Node {
                id: format!("{workload}.{NAMESPACE}"),
                workload: workload.to_string(),
                namespace: NAMESPACE.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                service_account: match gateway {
                    Some(_) => "mesh-ingressgateway".into(),
                    None => format!("bookinfo-{}", labels[0].1),
                },
                version: env!("CARGO_PKG_VERSION").into(),
                mode: if gateway.is_some() {
                    "gateway"
                } else {
                    "explicit"
                }
                .into(),
                metrics_addr: String::new(),
                gateways: Vec::new(),
            },
            demand_timeout: Duration::from_secs(5),
            backoff: (Duration::from_millis(50), Duration::from_secs(2)),
        },
    );
    Ok(running)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

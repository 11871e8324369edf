//! `mesh-proxy`: run the data plane, or (`mesh-proxy init`) install the
//! iptables capture in a pod's network namespace.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use mesh_proxy::{Addrs, ConnSettings, Proxy, admin, init};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Exit status for invalid configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "mesh-proxy",
    version,
    about = "The mesh's data-plane proxy",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Wait until the proxy is ready (for a classic sidecar's postStart
    /// hook: the app's containers start after it returns).
    Wait {
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        /// The proxy's readiness port.
        #[arg(long, default_value_t = 15021)]
        ready_port: u16,
    },
    /// Install the iptables rules that redirect the pod's traffic to the
    /// proxy (run by the injected init container).
    Init(init::InitArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Transparent capture (outbound 15001, inbound 15006).
    Sidecar,
    /// Listen on the ports of the config's gateway listeners.
    Gateway,
    /// An HTTP proxy the app uses via HTTP_PROXY, plus inbound.
    Explicit,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The proxy config (YAML or JSON), reloaded when it changes.
    #[arg(long, env = "MESH_PROXY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Pilot's xDS address: the config comes from pilot instead of a file.
    /// `https://host:15012` is pilot's TLS port: its certificate must chain
    /// to --ca-root and name the host (or --xds-name), and the workload
    /// certificate is offered once the proxy has one; a failed handshake is
    /// retried, never downgraded. `host:port` or `http://host:port` is the
    /// plaintext port (15010, local mode and tests).
    #[arg(
        long,
        env = "MESH_XDS_ADDR",
        value_name = "ADDR",
        conflicts_with = "config"
    )]
    xds: Option<String>,
    /// The name in pilot's certificate for an https --xds (default: the
    /// host of --xds).
    #[arg(long, env = "MESH_XDS_NAME", value_name = "NAME")]
    xds_name: Option<String>,
    /// The workload this proxy serves (xDS).
    #[arg(long, env = "MESH_WORKLOAD", value_name = "NAME")]
    workload: Option<String>,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The workload's labels, `key=value`; repeatable or comma-separated.
    #[arg(long = "label", env = "MESH_LABELS", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    /// This proxy's id in pilot's status (default: workload.namespace).
    #[arg(long, env = "POD_NAME")]
    proxy_id: Option<String>,
    /// How long the first request to a new destination waits for pilot.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    demand_timeout: Duration,
    #[arg(long, value_enum, default_value_t = Mode::Sidecar)]
    mode: Mode,
    /// The mesh's CA (`https://host:15012`): the proxy gets its workload
    /// certificate there.
    #[arg(long, env = "MESH_CA_ADDR")]
    ca_addr: Option<String>,
    /// PEM roots to trust for pilot's certificate (the CA, and xDS over
    /// https).
    #[arg(
        long,
        env = "MESH_CA_ROOT",
        default_value = "/etc/mesh/root/root-cert.pem"
    )]
    ca_root: PathBuf,
    /// The name in the CA's certificate (default: the host of --ca-addr).
    #[arg(long, env = "MESH_CA_NAME")]
    ca_name: Option<String>,
    /// The token proving the service account to the CA.
    #[arg(
        long,
        env = "MESH_TOKEN_FILE",
        default_value = "/var/run/secrets/mesh/token"
    )]
    token_file: PathBuf,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Requested certificate validity (default: the CA's).
    #[arg(long, value_parser = parse_duration)]
    cert_ttl: Option<Duration>,
    /// Accept and offer TLS 1.2 for mTLS between sidecars, for peers that
    /// cannot do 1.3 (1.3 is still chosen when both can). Off: 1.3 only.
    #[arg(long, env = "MESH_TLS12")]
    mesh_tls12: bool,
    /// Percentage of new traces sampled (a caller's decision, in
    /// traceparent or B3 headers, is kept).
    #[arg(long, env = "MESH_TRACE_SAMPLING", default_value_t = 1.0)]
    trace_sampling: f64,
    /// A Zipkin v2 collector (`host:port` or `http://host:port/api/v2/spans`):
    /// turns on tracing.
    #[arg(long, env = "MESH_ZIPKIN_ADDR", value_parser = mesh_proxy::telemetry::Collector::parse_zipkin, conflicts_with = "otlp_addr")]
    zipkin_addr: Option<mesh_proxy::telemetry::Collector>,
    /// An OTLP/HTTP collector (`host:port` or `http://host:port/v1/traces`,
    /// JSON): turns on tracing.
    #[arg(long, env = "MESH_OTLP_ADDR", value_parser = mesh_proxy::telemetry::Collector::parse_otlp)]
    otlp_addr: Option<mesh_proxy::telemetry::Collector>,
    /// Access logs on stdout: `off`, `json`, `text`, or a template of
    /// `%field%`s (start_time, method, authority, path, status, reason,
    /// response_flags, denied_by, duration_ms, bytes_sent, upstream_host,
    /// request_id, trace_id, …).
    #[arg(long, env = "MESH_ACCESS_LOG", default_value = "off", value_parser = parse_access_log)]
    access_log: AccessLog,
    /// The app's HTTP probes, rewritten to `/app-health/…` on the metrics
    /// port (JSON, written by the injector).
    #[arg(long, env = "MESH_APP_PROBERS", hide_env_values = true)]
    app_probers: Option<String>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    #[arg(long, default_value = "0.0.0.0:15001")]
    outbound_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    /// The explicit HTTP proxy (explicit mode).
    #[arg(long, default_value = "127.0.0.1:15080")]
    explicit_addr: SocketAddr,
    /// Address gateway ports bind on (gateway mode).
    #[arg(long, default_value = "0.0.0.0")]
    gateway_bind: IpAddr,
    /// The Gateways (`namespace/name`) this gateway serves, for
    /// VirtualService `gateways` matches; repeatable.
    #[arg(long = "gateway-name")]
    gateway_names: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    ready_addr: SocketAddr,
    /// How long a SIGTERM drain waits for in-flight requests.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// How long to wait for a client's first bytes to detect its protocol.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    detect_timeout: Duration,
    /// How often the config file is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    reload_interval: Duration,
    /// Log format; the filter comes from MESH_LOG (default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// `--access-log`: off, or a format.
#[derive(Clone)]
struct AccessLog(Option<mesh_proxy::telemetry::LogFormat>);

fn parse_access_log(s: &str) -> Result<AccessLog, String> {
    match s {
        "" | "off" => Ok(AccessLog(None)),
        other => mesh_proxy::telemetry::LogFormat::parse(other).map(|f| AccessLog(Some(f))),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_api::Duration::parse(s)
        .map(|d| d.as_std())
        .map_err(|e| e.to_string())
}

fn init_logging(format: LogFormat) -> admin::LogControl {
    let filter = EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json())
            .init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).init(),
    }
    Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| format!("invalid filter {level:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Init(args)) = cli.command {
        return match init::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-proxy init: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    if let Some(Command::Wait {
        timeout,
        ready_port,
    }) = cli.command
    {
        let waited = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(mesh_proxy::probes::wait_ready(ready_port, timeout)));
        return match waited {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-proxy wait: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = cli.run;
    let app_probers = match args.app_probers.as_deref() {
        None | Some("") => Default::default(),
        Some(json) => match mesh_proxy::probes::parse(json) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("mesh-proxy: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let xds = match args.xds.as_deref().map(mesh_proxy::xds::parse_addr) {
        None => None,
        Some(Ok(x)) => Some(x),
        Some(Err(e)) => {
            eprintln!("mesh-proxy: --xds {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if xds.is_some() && args.workload.is_none() {
        eprintln!("mesh-proxy: --xds needs --workload (or MESH_WORKLOAD)");
        return ExitCode::from(EXIT_CONFIG);
    }
    let log = init_logging(args.log_format);
    let initial = match &args.config {
        Some(path) => match mesh_proxy::read_config(path) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("mesh-proxy: invalid config: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => None,
    };
    // One worker: a single-threaded runtime (no work stealing, no
    // cross-thread wake-ups), like one Envoy worker.
    let built = if args.concurrency <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.concurrency)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut proxy = Proxy::new(args.gateway_names.clone());
        proxy.app_probers = app_probers;
        proxy.telemetry = mesh_proxy::telemetry::Telemetry::start(
            mesh_proxy::telemetry::Settings {
                sampling: args.trace_sampling,
                collector: args.zipkin_addr.clone().or(args.otlp_addr.clone()),
                access_log: args.access_log.0.clone(),
                ..Default::default()
            },
            &proxy.metrics,
        );
        if args.mesh_tls12 {
            proxy.tls = Arc::new(mesh_proxy::tls::MeshTls::with_tls12(
                proxy.tls.certs.clone(),
                true,
            ));
        }
        let proxy = Arc::new(proxy);
        if let Some(cfg) = initial
            && let Err(e) = proxy.apply(cfg)
        {
            eprintln!("mesh-proxy: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        let addrs = Addrs {
            outbound: (args.mode == Mode::Sidecar).then_some(args.outbound_addr),
            inbound: (args.mode != Mode::Gateway).then_some(args.inbound_addr),
            explicit: (args.mode == Mode::Explicit).then_some(args.explicit_addr),
            gateway_bind: (args.mode == Mode::Gateway).then_some(args.gateway_bind),
            admin: Some(args.admin_addr),
            metrics: Some(args.metrics_addr),
            ready: Some(args.ready_addr),
        };
        let settings = ConnSettings {
            detect_timeout: args.detect_timeout,
            ..ConnSettings::default()
        };
        let running = match mesh_proxy::start(proxy, addrs, settings, Some(log)).await {
            Ok(r) => Arc::new(r),
            Err(e) => {
                eprintln!("mesh-proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        for (what, a) in [
            ("outbound", running.outbound),
            ("inbound", running.inbound),
            ("explicit", running.explicit),
            ("admin", running.admin),
            ("metrics", running.metrics),
            ("ready", running.ready),
        ] {
            if let Some(a) = a {
                tracing::info!(listener = what, addr = %a, "listening");
            }
        }
        if let (Some((addr, tls)), Some(workload)) = (xds, args.workload.clone()) {
            if !tls && addr.ends_with(":15012") {
                tracing::warn!(%addr, "pilot's 15012 speaks TLS only: use https://");
            }
            let node = mesh_api::discovery::Node {
                id: args
                    .proxy_id
                    .clone()
                    .unwrap_or_else(|| format!("{workload}.{}", args.namespace)),
                workload,
                namespace: args.namespace.clone(),
                labels: args.labels.iter().cloned().collect(),
                service_account: args.service_account.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                mode: match args.mode {
                    Mode::Sidecar => "sidecar",
                    Mode::Gateway => "gateway",
                    Mode::Explicit => "explicit",
                }
                .to_string(),
                metrics_addr: String::new(),
                gateways: args.gateway_names.clone(),
            };
            let settings = mesh_proxy::xds::Settings {
                addr,
                node,
                demand_timeout: args.demand_timeout,
                backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            };
            if tls {
                let tls = mesh_proxy::identity::PilotTls {
                    root: args.ca_root.clone(),
                    name: args.xds_name.clone(),
                };
                mesh_proxy::follow_pilot_tls(&running, settings, tls);
            } else {
                mesh_proxy::follow_pilot(&running, settings);
            }
        }
        if let Some(ca_addr) = &args.ca_addr {
            let ca_addr = if ca_addr.contains("://") {
                ca_addr.clone()
            } else {
                format!("https://{ca_addr}")
            };
            tokio::spawn(mesh_proxy::identity::run(
                running.proxy.tls.certs.clone(),
                mesh_proxy::identity::Settings {
                    ca_addr,
                    ca_root: args.ca_root.clone(),
                    ca_name: args.ca_name.clone(),
                    token_file: args.token_file.clone(),
                    trust_domain: args.trust_domain.clone(),
                    namespace: args.namespace.clone(),
                    service_account: args.service_account.clone(),
                    ttl: args.cert_ttl,
                },
            ));
        }
        if let Some(path) = args.config.clone() {
            tokio::spawn(mesh_proxy::watch_file(
                running.clone(),
                path,
                args.reload_interval,
            ));
        }
        wait_for_signal().await;
        tracing::info!(deadline = ?args.drain_timeout, "draining");
        running.drain(args.drain_timeout).await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

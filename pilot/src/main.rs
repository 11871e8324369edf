//! `mesh-pilot`: the control plane binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use mesh_api::model::OutboundPolicy;
use mesh_pilot::{Config, Debounce, MeshSettings, source};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Exit status for invalid configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit status when no cluster can be reached (sysexits EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(name = "mesh-pilot", version, about = "The mesh's control plane")]
struct Cli {
    /// A directory (or file) of YAML: mesh and Istio resources, Kubernetes
    /// Services and WorkloadEntries; re-read when it changes. Without it,
    /// pilot watches the Kubernetes cluster it runs in (or the one of the
    /// current kubeconfig context).
    #[arg(long, env = "MESH_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// Plaintext xDS.
    #[arg(long, default_value = "0.0.0.0:15010")]
    xds_addr: SocketAddr,
    /// Metrics, debug and readiness.
    #[arg(long, default_value = "0.0.0.0:15014")]
    http_addr: SocketAddr,
    /// What sidecars do with traffic to hosts pilot does not know.
    #[arg(long, value_enum, default_value_t = Policy::AllowAny)]
    outbound_policy: Policy,
    #[arg(long, default_value = mesh_api::resource::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Push once changes have been quiet this long…
    #[arg(long, default_value = "2ms", value_parser = parse_duration)]
    debounce_quiet: Duration,
    /// …or this long after the first change of a burst.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    debounce_max: Duration,
    /// How often the config directory is checked for changes.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    reload_interval: Duration,
    /// The certificate authority's directory (`ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, `cert-chain.pem`; a root is generated there when
    /// empty). Turns on the CA and secure xDS on --secure-addr.
    #[arg(long, env = "MESH_CA_DIR", value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// The CA and xDS over TLS.
    #[arg(long, default_value = "0.0.0.0:15012")]
    secure_addr: SocketAddr,
    /// Validity of workload certificates.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// The audience workload tokens must carry (Kubernetes TokenReview).
    #[arg(long, default_value = "mesh-ca")]
    ca_audience: String,
    /// Who may ask for which identity: a YAML list of {namespace,
    /// serviceAccount, token}. Without it, in a cluster, service-account
    /// tokens are checked with a TokenReview.
    #[arg(long, env = "MESH_BOOTSTRAP_TOKENS", value_name = "FILE")]
    bootstrap_tokens: Option<PathBuf>,
    /// Names in pilot's TLS certificate (DNS names or IPs); repeatable.
    #[arg(
        long = "tls-name",
        default_values_t = ["mesh-pilot.mesh-system.svc".to_string(), "localhost".to_string(), "127.0.0.1".to_string()]
    )]
    tls_names: Vec<String>,
    /// Log format; the filter comes from MESH_LOG (default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// One step of rotating the CA's root in --ca-dir: `prepare` (a new
    /// root, trusted next to the current one), `activate` (the new root
    /// signs), `finish` (only the new root is trusted). Wait one
    /// certificate lifetime (--cert-ttl) between steps so every proxy
    /// renews. A running pilot signs with each step's CA by itself;
    /// restart it after `activate` so its own serving certificate (port
    /// 15012) comes from the new root before `finish`.
    RotateRoot {
        #[arg(value_enum)]
        step: Step,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Step {
    Prepare,
    Activate,
    Finish,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Policy {
    AllowAny,
    RegistryOnly,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_api::Duration::parse(s)
        .map(|d| d.as_std())
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::RotateRoot { step }) = cli.command {
        let Some(dir) = &cli.ca_dir else {
            eprintln!("mesh-pilot rotate-root: --ca-dir is required");
            return ExitCode::from(EXIT_CONFIG);
        };
        let step = match step {
            Step::Prepare => mesh_pilot::ca::RotateStep::Prepare,
            Step::Activate => mesh_pilot::ca::RotateStep::Activate,
            Step::Finish => mesh_pilot::ca::RotateStep::Finish,
        };
        return match mesh_pilot::ca::rotate_root(dir, &cli.trust_domain, step) {
            Ok(done) => {
                println!("{done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-pilot rotate-root: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let filter = EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match cli.log_format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json())
            .init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).init(),
    }
    if let Some(dir) = &cli.config_dir
        && !dir.exists()
    {
        eprintln!(
            "mesh-pilot: --config-dir {}: no such file or directory",
            dir.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    // The CA, and bootstrap tokens when given (else, in a cluster, the
    // Kubernetes TokenReview).
    let authority = match &cli.ca_dir {
        None => None,
        Some(dir) => {
            let tokens = match &cli.bootstrap_tokens {
                None if cli.config_dir.is_some() => {
                    eprintln!(
                        "mesh-pilot: --ca-dir with --config-dir needs --bootstrap-tokens FILE (no Kubernetes tokens to check)"
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
                None => None,
                Some(path) => match mesh_pilot::ca::BootstrapTokens::load(path) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        eprintln!("mesh-pilot: --bootstrap-tokens {e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
            };
            match mesh_pilot::ca::Ca::load_or_create(dir, &cli.trust_domain, cli.cert_ttl) {
                Ok(ca) => Some((std::sync::Arc::new(ca), tokens)),
                Err(e) => {
                    eprintln!("mesh-pilot: CA: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    if cli.debounce_quiet > cli.debounce_max {
        eprintln!("mesh-pilot: --debounce-quiet must not exceed --debounce-max");
        return ExitCode::from(EXIT_CONFIG);
    }
    let cfg = Config {
        xds_addr: cli.xds_addr,
        http_addr: cli.http_addr,
        mesh: MeshSettings {
            outbound_policy: match cli.outbound_policy {
                Policy::AllowAny => OutboundPolicy::AllowAny,
                Policy::RegistryOnly => OutboundPolicy::RegistryOnly,
            },
            trust_domain: cli.trust_domain.clone(),
        },
        debounce: Debounce {
            quiet: cli.debounce_quiet,
            max: cli.debounce_max,
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-pilot: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut kube_client = None;
        let started = match cli.config_dir.clone() {
            Some(path) => {
                let files = source::Files {
                    path,
                    interval: cli.reload_interval,
                };
                mesh_pilot::start(cfg, files).await
            }
            None => match kube::Client::try_default().await {
                Ok(client) => {
                    let cluster = source::Kubernetes::new(client.clone());
                    kube_client = Some((client, cluster.namespaces()));
                    mesh_pilot::start(cfg, cluster).await
                }
                Err(e) => {
                    eprintln!(
                        "mesh-pilot: no Kubernetes cluster to watch: {e}\n\
                         (run in a cluster, set KUBECONFIG, or give --config-dir DIR)"
                    );
                    return ExitCode::from(EXIT_UNAVAILABLE);
                }
            },
        };
        let mut running = match started {
            Ok(r) => r,
            Err(e) => {
                eprintln!("mesh-pilot: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some((authority, tokens)) = authority {
            if let Some((client, namespaces)) = &kube_client {
                // Every namespace gets the roots to mount; the namespaces
                // come from the source's own watch.
                let ca = authority.clone();
                tokio::spawn(mesh_pilot::ca::distribute_roots(
                    client.clone(),
                    namespaces.clone(),
                    move || ca.roots(),
                    Duration::from_secs(10),
                ));
            }
            let served = match (tokens, kube_client.map(|(client, _)| client)) {
                (Some(tokens), _) => {
                    running
                        .serve_secure(cli.secure_addr, authority, tokens, &cli.tls_names)
                        .await
                }
                (None, Some(client)) => {
                    let auth = mesh_pilot::ca::KubeTokens {
                        client,
                        audience: cli.ca_audience.clone(),
                    };
                    running
                        .serve_secure(cli.secure_addr, authority, auth, &cli.tls_names)
                        .await
                }
                (None, None) => Err(std::io::Error::other("no way to check tokens")),
            };
            if let Err(e) = served {
                eprintln!("mesh-pilot: {e}");
                return ExitCode::FAILURE;
            }
        }
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}

//! `mesh-injector`: the sidecar injection webhook (HTTPS on 15017).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mesh_injector::webhook::{self, CertFiles, Webhook};
use mesh_injector::{Cluster, Settings};

/// Exit status for invalid configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "mesh-injector",
    version,
    about = "The mesh's sidecar injection webhook"
)]
struct Cli {
    #[arg(long, default_value = "0.0.0.0:15017")]
    addr: SocketAddr,
    /// The serving certificate (PEM); read again when it changes.
    #[arg(long, default_value = "/etc/mesh/webhook/tls.crt")]
    cert: PathBuf,
    #[arg(long, default_value = "/etc/mesh/webhook/tls.key")]
    key: PathBuf,
    /// Injection settings (YAML, as `meshctl kube-inject --injection-config`).
    #[arg(long, default_value = "/etc/mesh/injector/settings.yaml")]
    settings: PathBuf,
    /// The cluster's Kubernetes minor version: from 29, native sidecars.
    #[arg(long, env = "MESH_KUBERNETES_MINOR", default_value_t = 29)]
    kubernetes_minor: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let settings = match std::fs::read_to_string(&cli.settings) {
        Ok(text) => match serde_yaml::from_str::<Settings>(&text) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mesh-injector: {}: {e}", cli.settings.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Settings::default(),
        Err(e) => {
            eprintln!("mesh-injector: {}: {e}", cli.settings.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = settings.validate() {
        eprintln!("mesh-injector: {}: {e}", cli.settings.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    let certs = match CertFiles::load(cli.cert.clone(), cli.key.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-injector: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-injector: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(cli.addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("mesh-injector: cannot listen on {}: {e}", cli.addr);
                return ExitCode::FAILURE;
            }
        };
        let hook = Arc::new(Webhook {
            settings,
            cluster: Cluster {
                minor: cli.kubernetes_minor,
            },
            metrics: Default::default(),
        });
        tokio::spawn(certs.clone().watch(Duration::from_secs(2)));
        tracing::info!(addr = %cli.addr, "injection webhook listening");
        tokio::select! {
            _ = webhook::serve_tls(listener, webhook::tls_config(certs), webhook::router(hook)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        ExitCode::SUCCESS
    })
}

//! `mesh-node`: the node agent of the mesh's test cluster. It plays the
//! kubelet (and kube-proxy, and the cluster DNS) for a real kube-apiserver:
//! pods bound to its nodes run as processes in network namespaces, their
//! images mapped to this project's binaries.

mod agent;
mod dns;
mod env;
mod images;
mod launch;
mod net;
mod pod;
mod probe;
mod services;
mod status;
mod volumes;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mesh-node",
    about = "The node agent of the mesh's test cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Registers the nodes and runs their pods until SIGTERM.
    Run {
        /// The kubeconfig to use (else KUBECONFIG / in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        #[arg(long)]
        state_dir: PathBuf,
        /// Where the images' binaries are (mesh-proxy, mesh-sample, …).
        #[arg(long)]
        bin_dir: PathBuf,
        /// NAME=IP=POD_CIDR, once per node.
        #[arg(long = "node", value_parser = parse_node, required = true)]
        nodes: Vec<(String, Ipv4Addr, ipnet::Ipv4Net)>,
        #[arg(long)]
        pod_cidr: ipnet::Ipv4Net,
        #[arg(long)]
        service_cidr: ipnet::Ipv4Net,
        /// Where the cluster DNS listens (pods' nameserver).
        #[arg(long)]
        dns: SocketAddr,
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
    },
    /// Removes what a killed agent left: pod processes, network namespaces,
    /// veth links and the Service chains.
    Cleanup {
        /// The agent's state directory (its pods' files are removed too).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// (internal) The first process of a container.
    #[command(hide = true)]
    Launch { spec: PathBuf },
}

fn parse_node(s: &str) -> Result<(String, Ipv4Addr, ipnet::Ipv4Net), String> {
    let mut it = s.splitn(3, '=');
    let (Some(name), Some(ip), Some(cidr)) = (it.next(), it.next(), it.next()) else {
        return Err(format!("{s:?}: expected NAME=IP=POD_CIDR"));
    };
    let ip = ip
        .parse()
        .map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
    let cidr = cidr
        .parse()
        .map_err(|_| format!("{s:?}: {cidr:?} is not an IPv4 CIDR"))?;
    Ok((name.to_string(), ip, cidr))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Launch { spec } => {
            let e = launch::launch(&spec);
            eprintln!("mesh-node launch: {e:#}");
            ExitCode::from(127)
        }
        Cmd::Cleanup { state_dir } => {
            agent::cleanup();
            if let Some(dir) = state_dir {
                let _ = std::fs::remove_dir_all(dir.join("pods"));
            }
            let mut r = services::System;
            for cmd in services::unhooks() {
                let _ = services::Runner::run(&mut r, &cmd, None);
            }
            ExitCode::SUCCESS
        }
        Cmd::Run {
            kubeconfig,
            state_dir,
            bin_dir,
            nodes,
            pod_cidr,
            service_cidr,
            dns,
            cluster_domain,
            ..
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let node_ips = nodes.iter().map(|n| n.1).collect();
            let cfg = agent::Config {
                kubeconfig,
                nodes,
                layout: services::Layout {
                    pod_cidr,
                    service_cidr,
                    node_ips,
                },
                dns,
                domain: cluster_domain,
                bin_dir,
                state_dir,
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mesh-node: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(agent::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mesh-node: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

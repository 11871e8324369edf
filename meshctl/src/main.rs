//! `meshctl`: the mesh's command-line tool.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use mesh_api::analysis::{self, Source};
use mesh_api::convert::{Output, convert};

mod cluster;
mod dashboard;
mod demo;
mod describe;
mod install;
mod local;
mod pilot;
mod proxy_config;
mod status;

#[derive(Parser)]
#[command(
    name = "meshctl",
    version = env!("CARGO_PKG_VERSION"),
    about = "Install, configure and inspect the mesh",
    long_about = "Install, configure and inspect the mesh.\n\n\
        Config files may use the mesh's apiVersions (networking.mesh.dev/v1, \
        security.mesh.dev/v1), Istio's (networking.istio.io/*, security.istio.io/*) \
        or the legacy config.istio.io/v1alpha2 RouteRule.",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check config files for errors before applying them.
    ///
    /// Reads multi-document YAML, converts Istio and legacy resources, and
    /// reports every problem with its file, line and field path: invalid
    /// fields, weights that do not add up, regexes that do not compile,
    /// subsets no DestinationRule defines, gateways that do not exist,
    /// conflicting resources. Exits 0 when there is no error, 1 otherwise.
    Analyze {
        #[command(flatten)]
        input: Input,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Rewrite Istio config as the mesh's, keeping document order.
    ///
    /// Istio resources get the mesh's apiVersion; legacy RouteRules become a
    /// VirtualService and DestinationRule per destination; anything else is
    /// printed unchanged. Notes go to stderr.
    Convert {
        #[command(flatten)]
        input: Input,
    },
    /// Run the mesh on this machine: pilot, bookinfo with sidecars, and an
    /// ingress gateway on 127.0.0.1:8080.
    ///
    /// Everything runs in this process, without root: each app sends its
    /// calls to its sidecar as an HTTP proxy. While it runs, `meshctl
    /// apply`, `delete`, `get` and `proxy-status` work on it without flags.
    /// Each start begins from the sample config. Ctrl-C stops everything.
    Demo {
        /// The ingress gateway's port on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        gateway_port: u16,
        /// Pilot's xDS address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds_addr: std::net::SocketAddr,
        /// Pilot's status address (metrics, debug, readiness).
        #[arg(long, default_value = "127.0.0.1:15014")]
        status_addr: std::net::SocketAddr,
    },
    /// Apply config to the local mesh (`meshctl demo`).
    ///
    /// Mesh or Istio apiVersions and legacy RouteRules. Everything is
    /// validated first, alone and with the config already applied; if
    /// anything is wrong nothing is applied. For a cluster, use `kubectl
    /// apply`.
    Apply {
        #[command(flatten)]
        input: Input,
    },
    /// Delete config from the local mesh (`meshctl demo`): the resources
    /// the files name.
    Delete {
        #[command(flatten)]
        input: Input,
    },
    /// List the config pilot serves: virtualservices, destinationrules,
    /// gateways, serviceentries, sidecars, workloadentries,
    /// peerauthentications, authorizationpolicies, requestauthentications,
    /// ratelimitpolicies (or their short names: vs, dr, gw, …).
    Get {
        /// The resource type.
        kind: String,
        /// One resource's name.
        name: Option<String>,
        #[arg(
            short = 'n',
            long,
            default_value = "default",
            conflicts_with = "all_namespaces"
        )]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = local::GetFormat::Table)]
        output: local::GetFormat,
        /// Pilot's status address (default: the local mesh's).
        #[arg(long, env = "MESH_PILOT")]
        pilot: Option<String>,
    },
    /// Add the mesh's sidecar to Kubernetes manifests.
    ///
    /// Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and
    /// CronJobs come out injected, exactly as the admission webhook would
    /// inject them; every other document comes out unchanged, in the same
    /// order. Pods that opt out (`sidecar.mesh.dev/inject: "false"`), use the
    /// host's network or are already injected are left as they are.
    ///
    /// When the current kubeconfig context's cluster answers, its version
    /// and the injector's settings there are used (flags still win);
    /// otherwise, or with `--offline`, the defaults.
    ///
    /// For example: `meshctl kube-inject -f deploy.yaml | kubectl apply -f -`.
    KubeInject {
        #[command(flatten)]
        input: Input,
        /// Injection settings (YAML: proxyImage, pilotAddress, proxyCPU, …);
        /// the defaults otherwise.
        #[arg(long, value_name = "FILE")]
        injection_config: Option<PathBuf>,
        /// The mesh-proxy image.
        #[arg(long)]
        proxy_image: Option<String>,
        /// The cluster's Kubernetes minor version: from 29 the sidecar is a
        /// native sidecar (an init container with restartPolicy: Always).
        /// Default: the cluster's, else 29.
        #[arg(long, value_name = "MINOR")]
        kubernetes_minor: Option<u32>,
        /// Do not ask the cluster for its version and injector settings.
        #[arg(long)]
        offline: bool,
    },
    /// Show which version of its config each proxy runs.
    ///
    /// Asks pilot which resources it sent each connected proxy and which
    /// the proxy acknowledged: SYNCED (all acknowledged), STALE (something
    /// not acknowledged yet) or NACKED (the proxy rejected something and
    /// runs its previous version; the error is printed below the table).
    /// Name a proxy (its id or `namespace/workload`) to list each resource.
    ProxyStatus {
        /// A proxy id or `namespace/workload`.
        proxy: Option<String>,
        /// Pilot's status address, HOST:PORT (default: the local mesh's, or
        /// 127.0.0.1:15014).
        #[arg(long, env = "MESH_PILOT")]
        pilot: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Show what one proxy runs: its routes, clusters, endpoints,
    /// listeners or workload certificate.
    ///
    /// Reads the proxy's admin port (15000: `/config_dump`, `/certs`). In a
    /// cluster, name the pod (`pod`, `pod.namespace` or `-n NS pod`): the
    /// admin port listens on the pod's loopback, so meshctl reaches it
    /// through a port-forward, as `kubectl port-forward` does. `--admin
    /// HOST:PORT` reads any proxy directly. In the local mesh (`meshctl
    /// demo`), name the workload (`productpage-v1`, `ingressgateway`).
    ///
    /// routes: per destination (host:port) each route's match and where it
    /// sends requests (weighted clusters, redirect, direct response,
    /// fault). clusters: subset, load balancing, TLS, endpoint count and
    /// circuit breaker. endpoints: each endpoint with its cluster, workload,
    /// locality and identity. listeners: inbound ports with their mTLS
    /// mode, the inbound policy, gateway listeners. secret: the workload
    /// certificate. all: each of these, titled. `-o json|yaml` prints that
    /// part of the raw config instead.
    #[command(alias = "pc")]
    ProxyConfig {
        #[arg(value_enum)]
        section: proxy_config::Section,
        /// The proxy's pod: `pod`, `pod.namespace` or `namespace/pod`
        /// (optional with --admin).
        target: Option<String>,
        /// The pod's namespace (default: the kubeconfig context's).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = local::GetFormat::Table)]
        output: local::GetFormat,
        /// The proxy's admin address, HOST:PORT: read it directly.
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
    },
    /// Experimental commands.
    X {
        #[command(subcommand)]
        command: Experimental,
    },
    /// Install the mesh into the current kubeconfig context's cluster, or
    /// bring an installation in line with a profile and values.
    ///
    /// Server-side apply (field manager `meshctl`) in dependency order: the
    /// namespace and CRDs (established first), pilot and its CA, the
    /// injector and then its webhook, the gateways, the addons; each part
    /// waits until ready, and a part that does not come up says which pod
    /// and why. Objects a previous installation made and this one does not
    /// are removed. Running it again changes nothing. Generated key material
    /// (the CA, the webhook certificate) is kept across runs.
    Install {
        #[command(flatten)]
        selection: install::Selection,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long)]
        yes: bool,
        /// Print what would be applied and removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long each part may take to become ready.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Remove what `meshctl install` created.
    ///
    /// Without --purge, the mesh-system namespace, the CRDs (and so every
    /// mesh resource) and the CA's Secret stay, so a new install keeps the
    /// config and the workloads' trust; --purge removes those too, and the
    /// root-certificate ConfigMaps pilot published in every namespace.
    Uninstall {
        #[arg(short = 'y', long)]
        yes: bool,
        #[arg(long)]
        purge: bool,
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Check a cluster before installing (--pre), or the installed mesh.
    ///
    /// --pre: the Kubernetes version, whether you may create what install
    /// creates, an existing installation. Without it: CRDs, pilot,
    /// injector and gateways available, the webhook reachable from the API
    /// server, proxies in sync, the root certificate's expiry, pods lacking
    /// their sidecar. Exits 1 when something is wrong.
    Check {
        #[arg(long)]
        pre: bool,
    },
    /// The manifests install applies.
    Manifest {
        #[command(subcommand)]
        command: ManifestCommand,
    },
    /// Open the mesh's dashboard (a live service graph served by pilot), or
    /// an addon's UI.
    ///
    /// In the local mesh (`meshctl demo`) it prints pilot's dashboard URL.
    /// In a cluster it forwards a local port to the pod (pilot's 15014, or
    /// the addon's) and prints the URL; Ctrl-C stops.
    Dashboard {
        #[arg(value_enum)]
        addon: Option<dashboard::Addon>,
        /// Local port (default: the addon's own: 9090, 3000, 16686).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value = "127.0.0.1")]
        address: std::net::IpAddr,
    },
    /// Print the version.
    Version {
        /// Print only the version number.
        #[arg(long)]
        short: bool,
    },
    /// Print a shell completion script.
    ///
    /// For example: `meshctl completion bash > /etc/bash_completion.d/meshctl`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Config files to read.
#[derive(clap::Args)]
struct Input {
    /// A file, a directory (read recursively) or `-` for stdin; repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    files: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Experimental {
    /// Explain a pod's place in the mesh, from the cluster's config.
    ///
    /// Whether it has a sidecar and its identity; per Service selecting it
    /// and per port, the VirtualService that routes it (each route, and
    /// whether any sends traffic to this pod) and the DestinationRule
    /// subsets it belongs to; its effective mTLS mode and the
    /// PeerAuthentication that sets it; the AuthorizationPolicies that
    /// apply to it and why. Decided as pilot decides.
    Describe {
        #[arg(value_enum)]
        what: describe::DescribeKind,
        /// The pod: `pod`, `pod.namespace` or `namespace/pod`.
        name: String,
        /// The pod's namespace (default: the kubeconfig context's).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
}

#[derive(Subcommand)]
enum ManifestCommand {
    /// Print exactly what `meshctl install` would apply, as YAML.
    ///
    /// With a reachable cluster, its version and the key material already
    /// there are used; otherwise (or with --offline) new key material is
    /// generated and Kubernetes 1.29 assumed (`--set kubernetesMinor=N`).
    Generate {
        #[command(flatten)]
        selection: install::Selection,
        #[arg(long)]
        offline: bool,
    },
    /// Print a profile's values with the --set overrides applied: every key
    /// `--set` accepts.
    Values {
        #[command(flatten)]
        selection: install::Selection,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 90s or 5m"))?;
    match unit {
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: expected e.g. 90s or 5m")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>> {
    let mut sources = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            sources.push(Source {
                name: "-".to_string(),
                text,
            });
        } else {
            sources.extend(
                analysis::read_path(path).with_context(|| format!("reading {}", path.display()))?,
            );
        }
    }
    Ok(sources)
}

fn analyze(files: &[PathBuf], output: Format) -> Result<ExitCode> {
    let sources = read_sources(files)?;
    let result = analysis::analyze(analysis::parse_sources(&sources));
    let mut out = std::io::stdout().lock();
    match output {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &result.findings)?;
            writeln!(out)?;
        }
        Format::Text => {
            for f in &result.findings {
                writeln!(out, "{f}")?;
            }
            let errors = result.errors();
            let warnings = result.findings.len() - errors;
            if result.findings.is_empty() {
                eprintln!(
                    "no problems found in {} resource(s) from {} file(s)",
                    result.resources.len(),
                    sources.len()
                );
            } else {
                eprintln!("{errors} error(s), {warnings} warning(s)");
            }
        }
    }
    Ok(if result.errors() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn convert_cmd(files: &[PathBuf]) -> Result<ExitCode> {
    let sources = read_sources(files)?;
    let (docs, warnings) = convert(analysis::parse_sources(&sources));
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let mut failed = false;
    let mut out = std::io::stdout().lock();
    let mut first = true;
    for doc in docs {
        let yaml = match doc.item {
            Output::Resource(r) => serde_yaml::to_string(&r)?,
            Output::Other(v) => serde_yaml::to_string(&v)?,
            Output::Invalid(e) => {
                eprintln!("error: {e}");
                failed = true;
                continue;
            }
        };
        if !first {
            writeln!(out, "---")?;
        }
        first = false;
        out.write_all(yaml.as_bytes())?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Analyze { input, output } => analyze(&input.files, output),
        Command::Convert { input } => convert_cmd(&input.files),
        Command::ProxyStatus {
            proxy,
            pilot,
            output,
        } => {
            let pilot = local::pilot_addr(pilot);
            status::proxy_status(
                &pilot,
                proxy.as_deref(),
                output,
                &mut std::io::stdout().lock(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ProxyConfig {
            section,
            target,
            namespace,
            output,
            admin,
        } => {
            proxy_config::run(
                &proxy_config::Request {
                    section,
                    target: target.as_deref(),
                    namespace: namespace.as_deref(),
                    admin: admin.as_deref(),
                    output,
                },
                &mut std::io::stdout().lock(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::X {
            command:
                Experimental::Describe {
                    what,
                    name,
                    namespace,
                },
        } => {
            match what {
                describe::DescribeKind::Pod => {
                    describe::pod(&name, namespace.as_deref(), &mut std::io::stdout().lock())?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::KubeInject {
            input,
            injection_config,
            proxy_image,
            kubernetes_minor,
            offline,
        } => {
            let from_cluster = if offline {
                None
            } else {
                match cluster::injection() {
                    Ok(i) => Some(i),
                    Err(e) => {
                        eprintln!(
                            "meshctl kube-inject: no cluster settings ({e}); using the defaults"
                        );
                        None
                    }
                }
            };
            let mut settings = match &injection_config {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    serde_yaml::from_str::<mesh_injector::Settings>(&text)
                        .with_context(|| format!("{}", path.display()))?
                }
                None => from_cluster
                    .as_ref()
                    .and_then(|c| c.settings.clone())
                    .unwrap_or_default(),
            };
            if let Some(image) = proxy_image {
                settings.proxy_image = image;
            }
            let cluster = mesh_injector::Cluster {
                minor: kubernetes_minor
                    .or(from_cluster.as_ref().map(|c| c.minor))
                    .unwrap_or(29),
            };
            let mut out = std::io::stdout().lock();
            let mut first = true;
            for source in read_sources(&input.files)? {
                let injected = mesh_injector::inject_documents(&source.text, &settings, cluster)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", source.name))?;
                if injected.is_empty() {
                    continue;
                }
                if !first {
                    out.write_all(b"---\n")?;
                }
                first = false;
                out.write_all(injected.as_bytes())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            gateway_port,
            xds_addr,
            status_addr,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
            tracing_subscriber::fmt().with_env_filter(filter).init();
            demo::run(demo::Options {
                gateway_port,
                xds_addr,
                status_addr,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply { input } => {
            let sources = read_sources(&input.files)?;
            local::apply(
                &sources,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete { input } => {
            let sources = read_sources(&input.files)?;
            local::delete(
                &sources,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
            pilot,
        } => {
            let pilot = local::pilot_addr(pilot);
            let ns = (!all_namespaces).then_some(namespace.as_str());
            local::get(
                &pilot,
                &kind,
                name.as_deref(),
                ns,
                output,
                &mut std::io::stdout().lock(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Install {
            selection,
            yes,
            dry_run,
            timeout,
        } => {
            install::install(install::InstallArgs {
                selection: &selection,
                yes,
                dry_run,
                timeout,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall {
            yes,
            purge,
            timeout,
        } => {
            install::uninstall(yes, purge, timeout)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { pre } => Ok(if install::check(pre, &mut std::io::stdout().lock())? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Command::Manifest { command } => {
            let mut out = std::io::stdout().lock();
            match command {
                ManifestCommand::Generate { selection, offline } => {
                    install::generate(&selection, offline, &mut out)?
                }
                ManifestCommand::Values { selection } => {
                    out.write_all(serde_yaml::to_string(&selection.values()?)?.as_bytes())?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dashboard {
            addon,
            port,
            address,
        } => {
            dashboard::run(addon, address, port)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Version { short } => {
            if short {
                println!("{}", env!("CARGO_PKG_VERSION"));
            } else {
                println!("meshctl version {}", env!("CARGO_PKG_VERSION"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "meshctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

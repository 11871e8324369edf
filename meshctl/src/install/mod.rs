//! Installing the mesh on Kubernetes: profiles and `--set` values, the
//! objects they render to, and applying, pruning and checking them.

pub mod ops;
pub mod render;
pub mod values;

#[cfg(test)]
mod tests;

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

pub use values::{Profile, Values};

/// Flags shared by `install` and `manifest generate`.
#[derive(clap::Args)]
pub struct Selection {
    /// The profile to start from: minimal (CRDs and pilot), default
    /// (+ injector and ingress gateway) or demo (+ egress gateway and the
    /// Prometheus, Grafana and Jaeger addons, small resource requests).
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    pub profile: Profile,
    /// Override a value, `key=value`; repeatable. For example `tag=1.2.0`,
    /// `hub=registry.example.com/mesh`, `pilot.replicas=2`,
    /// `mtls.mode=STRICT`, `outboundTrafficPolicy.mode=REGISTRY_ONLY`,
    /// `trustDomain=example.org`, `proxy.resources.limits.memory=512Mi`,
    /// `addons.grafana.enabled=false`. `meshctl manifest values` lists them.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl Selection {
    pub fn values(&self) -> Result<Values> {
        Values::with_sets(self.profile, &self.sets).map_err(|e| anyhow!(e))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

async fn client() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("no cluster to talk to (set KUBECONFIG or a kubeconfig context)")
}

/// Prints a multi-document YAML stream of `objects`.
pub fn write_yaml(objects: &[render::Object], out: &mut dyn Write) -> Result<()> {
    for (i, o) in objects.iter().enumerate() {
        if i > 0 {
            writeln!(out, "---")?;
        }
        out.write_all(serde_yaml::to_string(&o.value)?.as_bytes())?;
    }
    Ok(())
}

/// `meshctl manifest generate`: what install would apply. With a
/// reachable cluster (unless `offline`), with its version and the key
/// material already there, so the output is exactly install's; otherwise
/// with new material and Kubernetes 1.29 unless `kubernetesMinor` is set.
pub fn generate(selection: &Selection, offline: bool, out: &mut dyn Write) -> Result<()> {
    let values = selection.values()?;
    let objects = if offline {
        offline_plan(&values)?
    } else {
        let rt = runtime()?;
        let from_cluster = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                let c = client().await?;
                ops::plan(&c, &values).await
            })
            .await
            .map_err(|_| anyhow!("the cluster did not answer within 5 s"))?
        });
        match from_cluster {
            Ok(objects) => objects,
            Err(e) => {
                eprintln!(
                    "meshctl manifest generate: {e}; generating new key material, assuming Kubernetes 1.{}",
                    default_minor(&values)
                );
                offline_plan(&values)?
            }
        }
    };
    write_yaml(&objects, out)
}

fn default_minor(values: &Values) -> u32 {
    match values.kubernetes_minor {
        0 => 29,
        m => m,
    }
}

fn offline_plan(values: &Values) -> Result<Vec<render::Object>> {
    let material = render::Material::generate(&values.trust_domain).map_err(|e| anyhow!(e))?;
    Ok(render::render(values, &material, default_minor(values)))
}

pub struct InstallArgs<'a> {
    pub selection: &'a Selection,
    pub yes: bool,
    pub dry_run: bool,
    pub timeout: Duration,
}

pub fn install(args: InstallArgs<'_>) -> Result<()> {
    let values = args.selection.values()?;
    if !args.dry_run && !args.yes {
        confirm(&format!(
            "Install the mesh with the {} profile into the current cluster? [y/N] ",
            args.selection.profile
        ))?;
    }
    let rt = runtime()?;
    rt.block_on(async {
        let c = client().await?;
        let timing = ops::Timing {
            timeout: args.timeout,
            poll: Duration::from_secs(1),
        };
        ops::install(&c, &values, timing, args.dry_run, &mut std::io::stderr()).await
    })
}

pub fn uninstall(yes: bool, purge: bool, timeout: Duration) -> Result<()> {
    if !yes {
        confirm(if purge {
            "Remove the mesh, its CRDs and every mesh resource, its CA and namespace? [y/N] "
        } else {
            "Remove the mesh's control plane, injector, gateways and addons? [y/N] "
        })?;
    }
    let rt = runtime()?;
    rt.block_on(async {
        let c = client().await?;
        let timing = ops::Timing {
            timeout,
            poll: Duration::from_secs(1),
        };
        ops::uninstall(&c, purge, timing, &mut std::io::stderr()).await
    })
}

/// `meshctl check [--pre]`; false when something failed.
pub fn check(pre: bool, out: &mut dyn Write) -> Result<bool> {
    let rt = runtime()?;
    let findings = rt.block_on(async {
        let c = client().await?;
        if pre {
            ops::check_pre(&c).await
        } else {
            ops::check(&c).await
        }
    })?;
    let mut ok = true;
    for f in &findings {
        let mark = match (f.ok, f.warning) {
            (false, _) => {
                ok = false;
                "✘"
            }
            (true, true) => "!",
            (true, false) => "✔",
        };
        writeln!(out, "{mark} {}", f.text)?;
    }
    writeln!(
        out,
        "{}",
        if ok {
            "No problems found."
        } else {
            "Problems found (✘ above)."
        }
    )?;
    Ok(ok)
}

fn confirm(question: &str) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("stdin is not a terminal to confirm on: pass -y to proceed");
    }
    eprint!("{question}");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!("cancelled")
    }
}

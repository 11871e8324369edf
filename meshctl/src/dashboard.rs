//! `meshctl dashboard [prometheus|grafana|jaeger]`: the mesh's own
//! dashboard (served by pilot) or an addon's UI. In the local mesh it
//! prints pilot's URL; in a cluster it forwards a local port to the pod
//! through the API server and prints the URL.

use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::install::render::NAMESPACE;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Addon {
    Prometheus,
    Grafana,
    Jaeger,
}

impl Addon {
    /// The pods' `app` label and the port its UI listens on.
    fn target(self) -> (&'static str, u16) {
        match self {
            Addon::Prometheus => ("prometheus", 9090),
            Addon::Grafana => ("grafana", 3000),
            Addon::Jaeger => ("jaeger", 16686),
        }
    }
}

/// Runs until Ctrl-C (in a cluster); `None` is the mesh's own dashboard.
pub fn run(addon: Option<Addon>, address: std::net::IpAddr, port: Option<u16>) -> Result<()> {
    let Some(addon) = addon else {
        if let Some(state) = crate::local::find() {
            println!("mesh dashboard: http://{}/dashboard", state.status);
            return Ok(());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the runtime")?;
        return rt.block_on(forward(("mesh-pilot", 15014), "/dashboard", address, port));
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(forward(addon.target(), "/", address, port))
}

async fn forward(
    (app, remote): (&'static str, u16),
    path: &str,
    address: std::net::IpAddr,
    port: Option<u16>,
) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no cluster to talk to (set KUBECONFIG or a kubeconfig context)")?;
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .with_context(|| format!("listing the {app} pods in {NAMESPACE}"))?;
    let pod = list
        .items
        .into_iter()
        .find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .and_then(|p| p.metadata.name)
        .ok_or_else(|| {
            if app == "mesh-pilot" {
                anyhow!("no ready pilot pod in {NAMESPACE}: is the mesh installed? (`meshctl check`)")
            } else {
                anyhow!(
                    "no ready {app} pod in {NAMESPACE}: install the addon with `meshctl install --profile demo` (or --set addons.{app}.enabled=true)"
                )
            }
        })?;
    let local = SocketAddr::new(address, port.unwrap_or(remote));
    let listener = match tokio::net::TcpListener::bind(local).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("{local} is taken; choose another with --port")
        }
        Err(e) => return Err(e).with_context(|| format!("listening on {local}")),
    };
    let bound = listener.local_addr()?;
    println!("{app}: http://{bound}{path} (pod {NAMESPACE}/{pod}, port {remote}); Ctrl-C stops");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let (mut conn, _) = accepted?;
                let pods = pods.clone();
                let pod = pod.clone();
                tokio::spawn(async move {
                    let mut pf = match pods.portforward(&pod, &[remote]).await {
                        Ok(pf) => pf,
                        Err(e) => {
                            eprintln!("port-forward to {pod}: {e}");
                            return;
                        }
                    };
                    let Some(mut upstream) = pf.take_stream(remote) else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                    drop(upstream);
                    let _ = pf.join().await;
                });
            }
        }
    }
}

//! `mesh-bench injector`: the injection webhook over HTTPS at a fixed rate
//! of AdmissionReviews (a bookinfo pod each), as the API server sends them:
//! latency percentiles of the whole exchange, TLS included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_injector::webhook::{self, CertFiles, Webhook};

#[derive(Args)]
pub struct InjectorArgs {
    /// Reviews per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Keep-alive connections (the API server reuses a few).
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

const POD: &str = include_str!("../../samples/bookinfo/platform/bookinfo.yaml");

fn review() -> anyhow::Result<Vec<u8>> {
    let deployment = serde_yaml::Deserializer::from_str(POD)
        .map(<serde_json::Value as serde::Deserialize>::deserialize)
        .filter_map(Result::ok)
        .find(|d| d["kind"] == "Deployment")
        .context("a Deployment in the sample")?;
    let mut pod = deployment["spec"]["template"].clone();
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    Ok(serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "bench", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "default", "operation": "CREATE", "object": pod,
        }
    }))?)
}

pub fn run(a: InjectorArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(a))
}

async fn bench(a: InjectorArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("mesh-bench-injector-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ck = rcgen::generate_simple_self_signed(vec!["mesh-injector.mesh-system.svc".to_string()])?;
    std::fs::write(dir.join("tls.crt"), ck.cert.pem())?;
    std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem())?;
    let certs =
        CertFiles::load(dir.join("tls.crt"), dir.join("tls.key")).map_err(anyhow::Error::msg)?;
    let hook = Arc::new(Webhook {
        settings: Default::default(),
        cluster: mesh_injector::Cluster { minor: 30 },
        metrics: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(webhook::serve_tls(
        listener,
        webhook::tls_config(certs),
        webhook::router(hook),
    ));
    let _ = std::fs::remove_dir_all(&dir);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone())?;
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let body = Bytes::from(review()?);
    let total = (a.rate * a.seconds as f64) as usize;
    let interval = Duration::from_secs_f64(a.connections as f64 / a.rate);
    let mut tasks = Vec::new();
    let start = Instant::now();
    for c in 0..a.connections {
        let (client, body) = (client.clone(), body.clone());
        let n = total / a.connections;
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("mesh-injector.mesh-system.svc")?;
            let tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            // Staggered starts spread the connections' requests evenly.
            let first = start + interval.mul_f64(c as f64 / a.connections as f64);
            let mut samples = Vec::with_capacity(n);
            for i in 0..n {
                tokio::time::sleep_until((first + interval * i as u32).into()).await;
                let t = Instant::now();
                let req = hyper::Request::post("/inject")
                    .header("host", "mesh-injector.mesh-system.svc")
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))?;
                let resp = send.send_request(req).await?;
                anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
                let got = resp.into_body().collect().await?.to_bytes();
                anyhow::ensure!(got.windows(5).any(|w| w == b"patch"), "no patch");
                samples.push(t.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "injector webhook over HTTPS, {:.0} reviews/s for {} s ({} reviews, {} keep-alive connections):",
        a.rate,
        a.seconds,
        all.len(),
        a.connections
    );
    println!(
        "  p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(*all.last().unwrap_or(&Duration::ZERO))
    );
    Ok(())
}

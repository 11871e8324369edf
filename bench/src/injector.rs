//! `mesh-bench injector`: the injection webhook over HTTPS at a fixed rate
//! of AdmissionReviews (a bookinfo pod each), as the API server sends them.
//!
//! Open loop, like `load`: a timetable thread schedules review k at
//! `start + k / rate` whatever the answers do, and hands it to one of N
//! keep-alive connections; each review's latency runs from its scheduled
//! time, so a slow answer that delays the reviews queued behind it counts
//! for all of them (no coordinated omission). The first `--warmup` seconds
//! are sent but not measured. It prints p50/p90/p99/max and PASS or MISS
//! against the target: p99 ≤ 5 ms at 200 reviews/s, with every review
//! answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use mesh_injector::webhook::{self, CertFiles, Webhook};

use crate::Job;
use tokio::sync::mpsc;

use crate::Histogram;

#[derive(Args)]
pub struct InjectorArgs {
    /// Reviews per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sent at the same rate before measuring, in seconds.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Keep-alive connections (the API server reuses a few).
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

/// The target: p99 at or under this, at [`TARGET_RATE`] or more.
const TARGET_P99: Duration = Duration::from_millis(5);
const TARGET_RATE: f64 = 200.0;
/// A review not answered in this long is counted as lost.
const TIMEOUT: Duration = Duration::from_secs(2);
const HOST: &str = "mesh-injector.mesh-system.svc";

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
    if !(a.rate.is_finite() && a.rate > 0.0) {
        bail!("--rate must be a positive number");
    }
    if a.seconds == 0 {
        bail!("--seconds must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(bench(&a))?;
    report.print(&a);
    Ok(())
}

/// One review on the timetable.
#[derive(Default)]
struct Errors {
    /// Answered, but not a 200 with a patch.
    bad_answer: u64,
    /// The connection failed.
    io: u64,
    /// Not answered within [`TIMEOUT`] or before the run ended.
    lost: u64,
}

impl Errors {
    fn total(&self) -> u64 {
        self.bad_answer + self.io + self.lost
    }
}

struct Report {
    hist: Histogram,
    errors: Errors,
    scheduled: u64,
}

impl Report {
    fn print(&self, a: &InjectorArgs) {
        let ms = |ns: u64| ns as f64 / 1e6;
        let h = &self.hist;
        println!(
            "injector webhook over HTTPS, open loop at {} reviews/s for {} s after {} s warm-up, {} keep-alive connections; latency from each review's scheduled send time:",
            a.rate, a.seconds, a.warmup, a.connections
        );
        println!(
            "  scheduled {}   answered {}   errors {} (bad answer {}, connection {}, lost {})",
            self.scheduled,
            h.total,
            self.errors.total(),
            self.errors.bad_answer,
            self.errors.io,
            self.errors.lost
        );
        if h.total == 0 {
            println!("  no review was answered");
        } else {
            println!(
                "  p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
                ms(h.quantile(0.50)),
                ms(h.quantile(0.90)),
                ms(h.quantile(0.99)),
                ms(h.max)
            );
        }
        let p99 = Duration::from_nanos(h.quantile(0.99));
        let verdict = if h.total == 0 {
            "MISS (nothing measured)".to_string()
        } else if self.errors.total() > 0 {
            format!("MISS ({} reviews not answered well)", self.errors.total())
        } else if a.rate < TARGET_RATE {
            format!("MISS (ran at {} reviews/s, below the target rate)", a.rate)
        } else if p99 > TARGET_P99 {
            "MISS".to_string()
        } else {
            "PASS".to_string()
        };
        println!(
            "  target p99 <= {} ms at {:.0} reviews/s: {verdict}",
            TARGET_P99.as_millis(),
            TARGET_RATE
        );
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(HOST)?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let (send, conn) = http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(send)
}

enum Failure {
    BadAnswer,
    Io,
}

async fn one_review(send: &mut Sender, body: Bytes) -> Result<(), Failure> {
    send.ready().await.map_err(|_| Failure::Io)?;
    let req = hyper::Request::post("/inject")
        .header("host", HOST)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|_| Failure::Io)?;
    let resp = send.send_request(req).await.map_err(|_| Failure::Io)?;
    let ok = resp.status() == 200;
    let got = resp
        .into_body()
        .collect()
        .await
        .map_err(|_| Failure::Io)?
        .to_bytes();
    if ok && got.windows(7).any(|w| w == b"\"patch\"") {
        Ok(())
    } else {
        Err(Failure::BadAnswer)
    }
}

/// Answers the jobs of one connection in order; a broken connection is
/// opened again.
async fn worker(
    mut send: Option<Sender>,
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    body: Bytes,
    hard_stop: Instant,
) -> (Histogram, Errors) {
    let mut hist = Histogram::new();
    let mut errors = Errors::default();
    loop {
        let job = match tokio::time::timeout_at(hard_stop.into(), jobs.recv()).await {
            Ok(Some(job)) => job,
            Ok(None) => break,
            Err(_) => {
                jobs.close();
                while let Ok(job) = jobs.try_recv() {
                    errors.lost += u64::from(job.record);
                }
                break;
            }
        };
        let deadline = (Instant::now() + TIMEOUT).min(hard_stop);
        let result = tokio::time::timeout_at(deadline.into(), async {
            if send.as_ref().is_none_or(|s| s.is_closed()) {
                send = None;
                send = Some(connect(addr, tls.clone()).await.map_err(|_| Failure::Io)?);
            }
            let s = send.as_mut().ok_or(Failure::Io)?;
            one_review(s, body.clone()).await
        })
        .await;
        let done = Instant::now();
        let failed = match result {
            Ok(Ok(())) => {
                if job.record {
                    hist.record(done.saturating_duration_since(job.scheduled));
                }
                continue;
            }
            Ok(Err(Failure::BadAnswer)) => {
                errors.bad_answer += u64::from(job.record);
                false
            }
            Ok(Err(Failure::Io)) => {
                errors.io += u64::from(job.record);
                true
            }
            Err(_) => {
                errors.lost += u64::from(job.record);
                true
            }
        };
        if failed {
            send = None;
        }
    }
    (hist, errors)
}

async fn bench(a: &InjectorArgs) -> anyhow::Result<Report> {
    let dir = std::env::temp_dir().join(format!("mesh-bench-injector-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ck = rcgen::generate_simple_self_signed(vec![HOST.to_string()])?;
    std::fs::write(dir.join("tls.crt"), ck.cert.pem())?;
    std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem())?;
    let certs =
        CertFiles::load(dir.join("tls.crt"), dir.join("tls.key")).map_err(anyhow::Error::msg)?;
    let _ = std::fs::remove_dir_all(&dir);
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

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone())?;
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let body = Bytes::from(review()?);

    // Connect everything first: handshakes are not what is measured.
    let n = a.connections.max(1);
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        senders.push(
            connect(addr, tls.clone())
                .await
                .context("cannot connect to the webhook")?,
        );
    }

    let start = Instant::now() + Duration::from_millis(20);
    let measure_start = start + Duration::from_secs(a.warmup);
    let end = measure_start + Duration::from_secs(a.seconds);
    let hard_stop = end + TIMEOUT;
    let mut txs = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    for send in senders {
        let (tx, rx) = mpsc::unbounded_channel();
        txs.push(tx);
        workers.push(tokio::spawn(worker(
            Some(send),
            addr,
            tls.clone(),
            rx,
            body.clone(),
            hard_stop,
        )));
    }

    let timetable = crate::timetable(start, measure_start, end, a.rate, txs);

    let mut hist = Histogram::new();
    let mut errors = Errors::default();
    for w in workers {
        let (h, e) = w.await.context("a connection task failed")?;
        hist.merge(&h);
        errors.bad_answer += e.bad_answer;
        errors.io += e.io;
        errors.lost += e.lost;
    }
    let scheduled = timetable
        .join()
        .map_err(|_| anyhow::anyhow!("the timetable thread failed"))?;
    // Jobs handed to a worker after it stopped.
    errors.lost += scheduled.saturating_sub(hist.total + errors.total());
    Ok(Report {
        hist,
        errors,
        scheduled,
    })
}

//! `mesh-bench`: the origin and the fixed-rate load generator of the
//! proxy's benchmark program (`bench/run.sh`).
//!
//! * `origin` answers every request with 200 and a fixed body, over
//!   HTTP/1.1 and h2c (prior knowledge), as cheaply as hyper allows: the
//!   body is allocated once and each response clones the `Bytes` handle.
//! * `load` sends HTTP/1.1 keep-alive requests on a fixed timetable (open
//!   loop) over N connections and measures each request's latency from the
//!   time it was *scheduled*, not sent, so a stalled server is not hidden by
//!   the generator waiting for it (coordinated omission). It prints one line
//!   of JSON.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};

mod injector;
mod xds_scale;
use http::header::{HOST, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(
    name = "mesh-bench",
    version,
    about = "Origin and fixed-rate load generator for the mesh's benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve 200 with a fixed body to every request (HTTP/1.1 and h2c).
    Origin(OriginArgs),
    /// Send requests at a fixed rate and print latency percentiles as JSON.
    Load(LoadArgs),
    /// Pilot with N services and M simulated proxies: config propagation
    /// latency, pilot CPU and memory.
    XdsScale(xds_scale::ScaleArgs),
    /// The injection webhook over HTTPS at a fixed rate of AdmissionReviews:
    /// latency percentiles.
    Injector(injector::InjectorArgs),
}

#[derive(Args)]
struct OriginArgs {
    /// Address to listen on.
    #[arg(long)]
    addr: SocketAddr,
    /// Size of every response body, in bytes.
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
    /// Runtime threads (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args)]
struct LoadArgs {
    /// The URL to request (http only).
    #[arg(long)]
    url: String,
    /// Requests per second, spread evenly over time.
    #[arg(long)]
    rate: f64,
    /// How long to measure, e.g. `10s`, `1500ms`, `1m`.
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// Keep-alive connections, one task each; requests go round-robin.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Load sent at the same rate before measuring, not recorded.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// A request not answered within this is an error.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
    /// Runtime threads (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// `10s`, `250ms`, `100us`, `1m`, `1.5s`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 10s or 500ms"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().context("cannot start the runtime")
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Origin(a) => runtime(a.threads)?.block_on(origin(a)),
        Command::XdsScale(a) => xds_scale::run(a),
        Command::Injector(a) => injector::run(a),
        Command::Load(a) => {
            let report = runtime(a.threads)?.block_on(load(&a))?;
            println!("{}", report.to_json(&a));
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- origin

async fn origin(args: OriginArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let body = Bytes::from(vec![b'x'; args.body_size]);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    builder.http2().max_concurrent_streams(1024);
    let builder = Arc::new(builder);
    eprintln!(
        "mesh-bench origin: listening on {} ({} byte bodies)",
        listener.local_addr()?,
        args.body_size
    );
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: back off briefly.
                eprintln!("mesh-bench origin: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let resp = Response::new(Full::new(body.clone()));
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

// ---------------------------------------------------------------- histogram

/// Linear sub-buckets per power of two: values below `2 * SUB` are exact,
/// larger ones are kept to within 1/SUB (0.8%).
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;

/// A log-linear histogram of nanosecond values.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; Self::index(u64::MAX) + 1],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        // (v >> shift) is in [SUB, 2*SUB).
        (u64::from(shift) * SUB + (v >> shift)) as usize
    }

    /// The middle of bucket `i`'s value range.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let sub = i - shift * SUB;
        (sub << shift) + ((1u64 << shift) >> 1)
    }

    fn record(&mut self, d: Duration) {
        let v = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0–1), in nanoseconds.
    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }
}

// ---------------------------------------------------------------- load

/// One request on the timetable.
/// One request of a fixed-rate run: when it was due, and whether it is
/// past the warm-up (recorded).
struct Job {
    scheduled: Instant,
    record: bool,
}

/// The timetable of a fixed-rate run, on its own thread (a thread sleep is
/// good to tens of microseconds, tokio's timer to a millisecond): from
/// `start` until `end`, a job every `1/rate` s, dealt to the workers in
/// turn. Returns how many recorded jobs it scheduled; a job sent to a
/// worker that has passed the hard stop is lost, and the caller counts it.
fn timetable(
    start: Instant,
    measure_start: Instant,
    end: Instant,
    rate: f64,
    txs: Vec<mpsc::UnboundedSender<Job>>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut scheduled = 0u64;
        for k in 0u64.. {
            let t = start + Duration::from_secs_f64(k as f64 / rate);
            if t >= end {
                break;
            }
            let now = Instant::now();
            if t > now {
                std::thread::sleep(t - now);
            }
            let record = t >= measure_start;
            scheduled += u64::from(record);
            let _ = txs[(k % txs.len() as u64) as usize].send(Job {
                scheduled: t,
                record,
            });
        }
        scheduled
    })
}

#[derive(Default)]
struct Errors {
    connect: u64,
    status: u64,
    io: u64,
    timeout: u64,
}

impl Errors {
    fn total(&self) -> u64 {
        self.connect + self.status + self.io + self.timeout
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.status += o.status;
        self.io += o.io;
        self.timeout += o.timeout;
    }
}

struct WorkerStats {
    hist: Histogram,
    errors: Errors,
    last_done: Option<Instant>,
}

struct Report {
    hist: Histogram,
    errors: Errors,
    scheduled: u64,
    elapsed: Duration,
}

impl Report {
    fn to_json(&self, a: &LoadArgs) -> String {
        let us = |ns: u64| ns as f64 / 1e3;
        let h = &self.hist;
        let secs = self.elapsed.as_secs_f64();
        let rps = if secs > 0.0 {
            h.total as f64 / secs
        } else {
            0.0
        };
        format!(
            concat!(
                "{{\"url\":\"{}\",\"target_rps\":{},\"connections\":{},\"duration_s\":{:.3},",
                "\"achieved_rps\":{:.1},\"scheduled\":{},\"count\":{},\"errors\":{},",
                "\"errors_connect\":{},\"errors_status\":{},\"errors_io\":{},\"errors_timeout\":{},",
                "\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1}}}"
            ),
            a.url.replace(['"', '\\'], ""),
            a.rate,
            a.connections,
            a.duration.as_secs_f64(),
            rps,
            self.scheduled,
            h.total,
            self.errors.total(),
            self.errors.connect,
            self.errors.status,
            self.errors.io,
            self.errors.timeout,
            us(h.quantile(0.50)),
            us(h.quantile(0.90)),
            us(h.quantile(0.99)),
            us(h.quantile(0.999)),
            us(h.max),
        )
    }
}

/// What every request of a run shares.
struct Target {
    addr: SocketAddr,
    path: Uri,
    host: HeaderValue,
}

async fn connect(t: &Target) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(t.addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

enum Failure {
    Status,
    Io,
    Timeout,
}

async fn one_request(
    t: &Target,
    sender: &mut http1::SendRequest<Empty<Bytes>>,
) -> Result<(), Failure> {
    sender.ready().await.map_err(|_| Failure::Io)?;
    let req = Request::builder()
        .method(Method::GET)
        .uri(t.path.clone())
        .header(HOST, t.host.clone())
        .body(Empty::new())
        .map_err(|_| Failure::Io)?;
    let resp = sender.send_request(req).await.map_err(|_| Failure::Io)?;
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        frame.map_err(|_| Failure::Io)?;
    }
    if ok { Ok(()) } else { Err(Failure::Status) }
}

async fn worker(
    target: Arc<Target>,
    mut sender: Option<http1::SendRequest<Empty<Bytes>>>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    timeout: Duration,
    hard_stop: Instant,
) -> WorkerStats {
    let mut st = WorkerStats {
        hist: Histogram::new(),
        errors: Errors::default(),
        last_done: None,
    };
    loop {
        let job = match tokio::time::timeout_at(hard_stop.into(), jobs.recv()).await {
            Ok(Some(job)) => job,
            Ok(None) => break,
            Err(_) => {
                // Out of time: whatever is still queued never got an answer.
                jobs.close();
                while let Ok(job) = jobs.try_recv() {
                    if job.record {
                        st.errors.timeout += 1;
                    }
                }
                break;
            }
        };
        let deadline = (Instant::now() + timeout).min(hard_stop);
        let result = tokio::time::timeout_at(deadline.into(), async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = None;
                sender = Some(connect(&target).await.map_err(|_| None)?);
            }
            let s = sender.as_mut().ok_or(None)?;
            one_request(&target, s).await.map_err(Some)
        })
        .await;
        let done = Instant::now();
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(None)) => {
                st.errors.connect += u64::from(job.record);
                // Do not spin on a refused connection.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Ok(Err(Some(f))) => Some(f),
            Err(_) => Some(Failure::Timeout),
        };
        if !job.record {
            if failure.is_some() {
                sender = None;
            }
            continue;
        }
        match failure {
            None => {
                st.hist
                    .record(done.saturating_duration_since(job.scheduled));
                st.last_done = Some(done);
            }
            Some(Failure::Status) => st.errors.status += 1,
            Some(Failure::Io) => {
                st.errors.io += 1;
                sender = None;
            }
            Some(Failure::Timeout) => {
                st.errors.timeout += 1;
                sender = None;
            }
        }
    }
    st
}

async fn load(a: &LoadArgs) -> anyhow::Result<Report> {
    if !(a.rate.is_finite() && a.rate > 0.0) {
        bail!("--rate must be a positive number");
    }
    if a.duration.is_zero() {
        bail!("--duration must be positive");
    }
    let uri: Uri = a
        .url
        .parse()
        .with_context(|| format!("invalid --url {:?}", a.url))?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be an http:// URL");
    }
    let authority = uri.authority().context("--url has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((authority.host(), port))
        .await
        .with_context(|| format!("cannot resolve {}", authority.host()))?
        .next()
        .with_context(|| format!("{} resolves to no address", authority.host()))?;
    let path: Uri = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()
        .context("invalid path")?;
    let target = Arc::new(Target {
        addr,
        path,
        host: HeaderValue::from_str(authority.as_str()).context("invalid host")?,
    });

    // Connect everything first, so connection set-up is not measured.
    let n = a.connections.max(1);
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        senders.push(Some(
            connect(&target)
                .await
                .with_context(|| format!("cannot connect to {addr}"))?,
        ));
    }

    let start = Instant::now() + Duration::from_millis(20);
    let measure_start = start + a.warmup;
    let end = measure_start + a.duration;
    let hard_stop = end + a.timeout;
    let mut txs = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    for sender in senders {
        let (tx, rx) = mpsc::unbounded_channel();
        txs.push(tx);
        workers.push(tokio::spawn(worker(
            target.clone(),
            sender,
            rx,
            a.timeout,
            hard_stop,
        )));
    }

    let timetable = timetable(start, measure_start, end, a.rate, txs);

    let mut hist = Histogram::new();
    let mut errors = Errors::default();
    let mut last_done = end;
    for w in workers {
        let st = w.await.context("a connection task failed")?;
        hist.merge(&st.hist);
        errors.add(&st.errors);
        if let Some(d) = st.last_done {
            last_done = last_done.max(d);
        }
    }
    let scheduled = timetable
        .join()
        .map_err(|_| anyhow::anyhow!("the timetable thread panicked"))?;
    // Jobs sent to a worker after it stopped.
    let answered = hist.total + errors.total();
    errors.timeout += scheduled.saturating_sub(answered);
    Ok(Report {
        hist,
        errors,
        scheduled,
        elapsed: last_done.saturating_duration_since(measure_start),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_close() {
        let mut last = 0;
        for v in (0..1_000_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let i = Histogram::index(v);
            assert!(i == last || i == last + 1 || v > 1_000_000, "gap at {v}");
            last = i;
            let mid = Histogram::value(i);
            let err = mid.abs_diff(v) as f64 / (v.max(1)) as f64;
            assert!(err <= 1.0 / SUB as f64, "{v} -> bucket {i} ({mid})");
        }
        assert!(Histogram::index(u64::MAX) < Histogram::new().counts.len());
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let q = |q| h.quantile(q) as f64 / 1e3;
        assert!((q(0.5) - 500.0).abs() < 5.0, "{}", q(0.5));
        assert!((q(0.99) - 990.0).abs() < 9.0, "{}", q(0.99));
        assert_eq!(h.max, 1_000_000);
        assert_eq!(Histogram::new().quantile(0.5), 0);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3h").is_err());
    }
}

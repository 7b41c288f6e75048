//! nats-peer-bench: the NATS JetStream peer of `courier bench --workload publish`.
//!
//! Shape (defaults): 200 concurrent publisher tasks spread over 4 connections;
//! each publishes one message and awaits its JetStream publish ack before it
//! sends the next ("single-message publisher"). Message `n` goes to subject
//! `bench.<n mod streams>`, and each subject has its own stream (`BENCH_<i>`,
//! file storage, limits retention, one replica).
//!
//! With `--batch-async` each publisher instead keeps up to `--in-flight`
//! publishes outstanding, using the ack futures that async-nats hands back.
//!
//! The streams are created (after deleting any of the same name) before the
//! clock starts; the clock runs from the first publish to the last ack; one
//! JSON line goes to stdout; then the streams are deleted. Progress and
//! errors go to stderr.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::ContextBuilder, stream};
use async_nats::Subject;
use bytes::Bytes;
use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;

type BoxError = async_nats::Error;

/// Publish throughput and latency of NATS JetStream, in the shape of
/// `courier bench --workload publish`.
#[derive(Parser, Debug, Clone)]
#[command(name = "nats-peer-bench", version)]
struct Args {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    server: String,

    /// Total messages to publish (over all publishers).
    #[arg(long, default_value_t = 100_000)]
    messages: u64,

    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,

    /// Concurrent publisher tasks.
    #[arg(long, default_value_t = 200)]
    publishers: usize,

    /// Number of streams, one subject each; message n goes to subject n mod N.
    #[arg(long, default_value_t = 1)]
    streams: usize,

    /// Client connections; publisher p uses connection p mod N.
    #[arg(long, default_value_t = 4)]
    connections: usize,

    /// Keep up to --in-flight publishes outstanding per publisher, instead of
    /// awaiting each ack before the next publish.
    #[arg(long)]
    batch_async: bool,

    /// Outstanding publishes per publisher with --batch-async.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,

    /// How long to wait for one publish ack (seconds) before counting it failed.
    #[arg(long, default_value_t = 30)]
    ack_timeout_s: u64,
}

/// Largest latency tracked, in microseconds (one hour; larger values saturate).
const HIST_MAX_US: u64 = 3_600_000_000;

/// Stream setup/teardown requests kept in flight at once.
const ADMIN_CONCURRENCY: usize = 16;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

fn stream_name(i: usize) -> String {
    format!("BENCH_{i}")
}

fn subject_name(i: usize) -> String {
    format!("bench.{i}")
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// What one publisher task measured.
struct Measured {
    hist: Histogram<u64>,
    first_send: Option<Instant>,
    last_ack: Option<Instant>,
}

/// State every publisher task shares.
struct Shared {
    subjects: Vec<Subject>,
    payload: Bytes,
    total: u64,
    next: AtomicU64,
    failed: AtomicBool,
}

impl Shared {
    /// The next message number to publish, or `None` when all are claimed
    /// (or another publisher failed).
    fn claim(&self) -> Option<u64> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < self.total).then_some(n)
    }

    fn subject(&self, n: u64) -> Subject {
        self.subjects[(n % self.subjects.len() as u64) as usize].clone()
    }
}

fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).clamp(1, HIST_MAX_US);
    hist.record(us).expect("value within histogram bounds");
}

/// One message at a time: publish, await the ack, repeat.
async fn publish_one_at_a_time(js: jetstream::Context, shared: Arc<Shared>) -> Result<Measured, BoxError> {
    let mut m = Measured { hist: new_histogram(), first_send: None, last_ack: None };
    while let Some(n) = shared.claim() {
        let t0 = Instant::now();
        m.first_send.get_or_insert(t0);
        let ack = js.publish(shared.subject(n), shared.payload.clone()).await?;
        ack.await?;
        let done = Instant::now();
        record(&mut m.hist, done - t0);
        m.last_ack = Some(done);
    }
    Ok(m)
}

/// Up to `k` publishes outstanding; each latency runs from the publish call
/// to the moment its ack future is seen complete.
async fn publish_pipelined(js: jetstream::Context, shared: Arc<Shared>, k: usize) -> Result<Measured, BoxError> {
    let mut m = Measured { hist: new_histogram(), first_send: None, last_ack: None };
    let mut pending = FuturesUnordered::new();
    loop {
        // Fill the window.
        while pending.len() < k {
            let Some(n) = shared.claim() else { break };
            let t0 = Instant::now();
            m.first_send.get_or_insert(t0);
            let ack = js.publish(shared.subject(n), shared.payload.clone()).await?;
            pending.push(async move {
                let r = ack.await;
                (t0, Instant::now(), r)
            });
        }
        // Wait for one ack (or stop when nothing is left).
        match pending.next().await {
            None => break,
            Some((t0, done, r)) => {
                r?;
                record(&mut m.hist, done - t0);
                m.last_ack = Some(m.last_ack.map_or(done, |l| l.max(done)));
            }
        }
    }
    Ok(m)
}

async fn delete_if_present(js: &jetstream::Context, name: String) -> Result<(), BoxError> {
    match js.delete_stream(&name).await {
        Ok(_) => Ok(()),
        Err(e) => match e.kind() {
            jetstream::context::DeleteStreamErrorKind::JetStream(je)
                if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(())
            }
            _ => Err(format!("deleting stream {name}: {e}").into()),
        },
    }
}

async fn create_streams(js: &jetstream::Context, count: usize) -> Result<(), BoxError> {
    let results: Vec<Result<(), BoxError>> = futures::stream::iter(0..count)
        .map(|i| {
            let js = js.clone();
            async move {
                delete_if_present(&js, stream_name(i)).await?;
                js.create_stream(stream::Config {
                    name: stream_name(i),
                    subjects: vec![subject_name(i)],
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::Limits,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| -> BoxError { format!("creating stream {}: {e}", stream_name(i)).into() })?;
                Ok(())
            }
        })
        .buffer_unordered(ADMIN_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn delete_streams(js: &jetstream::Context, count: usize) -> Result<(), BoxError> {
    let results: Vec<Result<(), BoxError>> = futures::stream::iter(0..count)
        .map(|i| {
            let js = js.clone();
            async move { delete_if_present(&js, stream_name(i)).await }
        })
        .buffer_unordered(ADMIN_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

fn validate(a: &Args) -> Result<(), String> {
    if a.messages == 0 {
        return Err("--messages must be at least 1".into());
    }
    if a.publishers == 0 || a.streams == 0 || a.connections == 0 || a.in_flight == 0 {
        return Err("--publishers, --streams, --connections and --in-flight must be at least 1".into());
    }
    if a.in_flight > 1 && !a.batch_async {
        return Err("--in-flight only applies with --batch-async".into());
    }
    Ok(())
}

async fn run(args: Args) -> Result<serde_json::Value, BoxError> {
    // Connections and one JetStream context per connection. The context's
    // ack-in-flight limit is raised above what the publishers can have
    // outstanding so that it never throttles them.
    let per_conn_publishers = args.publishers.div_ceil(args.connections);
    let ack_capacity = (per_conn_publishers * args.in_flight + 64).max(5_000);
    let mut clients = Vec::with_capacity(args.connections);
    let mut contexts = Vec::with_capacity(args.connections);
    for c in 0..args.connections {
        let client = async_nats::ConnectOptions::new()
            .name(format!("nats-peer-bench-{c}"))
            .connect(&args.server)
            .await
            .map_err(|e| -> BoxError { format!("connecting to {}: {e}", args.server).into() })?;
        let js = ContextBuilder::new()
            .timeout(Duration::from_secs(args.ack_timeout_s))
            .max_ack_inflight(ack_capacity)
            .build(client.clone());
        clients.push(client);
        contexts.push(js);
    }
    let server_version = clients[0].server_info().version;

    eprintln!("nats-peer-bench: server {} ({server_version}); creating {} stream(s)", args.server, args.streams);
    let admin = contexts[0].clone();
    if let Err(e) = create_streams(&admin, args.streams).await {
        let _ = delete_streams(&admin, args.streams).await;
        return Err(e);
    }

    let shared = Arc::new(Shared {
        subjects: (0..args.streams).map(|i| Subject::from(subject_name(i))).collect(),
        // Deterministic, non-constant payload.
        payload: Bytes::from((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
        total: args.messages,
        next: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    });

    eprintln!(
        "nats-peer-bench: publishing {} x {} B with {} publisher(s) over {} connection(s){}",
        args.messages,
        args.size,
        args.publishers,
        args.connections,
        if args.batch_async { format!(", up to {} in flight each", args.in_flight) } else { String::new() }
    );
    let mut tasks = Vec::with_capacity(args.publishers);
    for p in 0..args.publishers {
        let js = contexts[p % args.connections].clone();
        let shared = shared.clone();
        let (batch, k) = (args.batch_async, args.in_flight);
        tasks.push(tokio::spawn(async move {
            let r = if batch {
                publish_pipelined(js, shared.clone(), k).await
            } else {
                publish_one_at_a_time(js, shared.clone()).await
            };
            if r.is_err() {
                shared.failed.store(true, Ordering::Relaxed);
            }
            r
        }));
    }

    let mut hist = new_histogram();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut errors: Vec<String> = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(m)) => {
                hist.add(&m.hist).expect("same histogram bounds");
                if let Some(f) = m.first_send {
                    first = Some(first.map_or(f, |x| x.min(f)));
                }
                if let Some(l) = m.last_ack {
                    last = Some(last.map_or(l, |x| x.max(l)));
                }
            }
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("publisher task panicked: {e}")),
        }
    }

    // Clean up whatever happened above.
    let cleanup = delete_streams(&admin, args.streams).await;
    for c in &clients {
        let _ = c.flush().await;
    }

    if !errors.is_empty() {
        errors.sort();
        errors.dedup();
        return Err(format!("{} publisher(s) failed; first error: {}", errors.len(), errors[0]).into());
    }
    cleanup?;

    let published = hist.len();
    if published != args.messages {
        return Err(format!("acked {published} of {} messages", args.messages).into());
    }
    let elapsed = match (first, last) {
        (Some(f), Some(l)) => l - f,
        _ => Duration::ZERO,
    };
    let secs = elapsed.as_secs_f64();
    let (msgs_per_s, mb_per_s) = if secs > 0.0 {
        (
            round(published as f64 / secs, 1),
            round(published as f64 * args.size as f64 / 1e6 / secs, 3),
        )
    } else {
        (0.0, 0.0)
    };
    let ms = |us: u64| round(us as f64 / 1000.0, 3);

    Ok(serde_json::json!({
        "peer": "nats-jetstream",
        "messages": published,
        "size": args.size,
        "publishers": args.publishers,
        "streams": args.streams,
        "msgs_per_s": msgs_per_s,
        "mb_per_s": mb_per_s,
        "p50_ms": ms(hist.value_at_quantile(0.50)),
        "p99_ms": ms(hist.value_at_quantile(0.99)),
        "p999_ms": ms(hist.value_at_quantile(0.999)),
        "max_ms": ms(hist.max()),
        // Context beyond the comparison figures.
        "connections": args.connections,
        "in_flight": if args.batch_async { args.in_flight } else { 1 },
        "mode": if args.batch_async { "batch-async" } else { "single" },
        "elapsed_s": round(secs, 4),
        "server_version": server_version,
    }))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = validate(&args) {
        eprintln!("nats-peer-bench: {e}");
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nats-peer-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

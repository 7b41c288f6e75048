//! nats-peer-bench: the NATS JetStream peer of `courier bench --workload publish`
//! (default, `--mode publish`) and of `courier bench --workload fanout`
//! (`--mode fanout`).
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
//!
//! `--mode fanout`: one stream (`BENCH_0`, subject `bench.0`) with
//! `--subscriptions` durable pull consumers (`BENCH_0_S<i>`, explicit ack),
//! created before anything is published. First `--messages` are published as
//! in `--batch-async` (timed on its own), then every consumer drains the
//! stream at once: fetch up to `--fetch-batch` messages, ack each of them
//! with an ack the server confirms (`--ack double`: async-nats
//! `double_ack`; `--ack request`: the same `+ACK` as a core request), await
//! all those confirmations, fetch again, until it has acked every message. The drain clock runs from just
//! before the consumers start to the last ack confirmed.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, context::ContextBuilder, stream};
use async_nats::Subject;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;

type BoxError = async_nats::Error;

/// Which workload to run.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Publish only (the shape of `courier bench --workload publish`).
    Publish,
    /// One stream, N durable pull consumers: publish, then drain all
    /// consumers at once (the shape of `courier bench --workload fanout`).
    Fanout,
}

/// How a fan-out consumer acks. Both send `+ACK` with a reply subject and
/// wait for the server's reply, so an ack counts only once the server has
/// processed it.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    /// async-nats `Message::double_ack()` (it subscribes a fresh inbox for
    /// every ack, then unsubscribes).
    Double,
    /// The same ack sent as `Client::request` on the message's reply subject
    /// (the connection's one shared, multiplexed reply inbox).
    Request,
}

impl AckMode {
    fn name(self) -> &'static str {
        match self {
            AckMode::Double => "double",
            AckMode::Request => "request",
        }
    }
}

/// Publish throughput and latency of NATS JetStream, in the shape of
/// `courier bench --workload publish`; with `--mode fanout`, publish then
/// fan-out drain, in the shape of `courier bench --workload fanout`.
#[derive(Parser, Debug, Clone)]
#[command(name = "nats-peer-bench", version)]
struct Args {
    /// Workload: `publish` (default) or `fanout`.
    #[arg(long, value_enum, default_value = "publish")]
    mode: Mode,

    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    server: String,

    /// Total messages to publish (over all publishers).
    #[arg(long, default_value_t = 100_000)]
    messages: u64,

    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,

    /// Concurrent publisher tasks [default: 200; 10 with --mode fanout].
    #[arg(long)]
    publishers: Option<usize>,

    /// Number of streams, one subject each; message n goes to subject n mod N.
    #[arg(long, default_value_t = 1)]
    streams: usize,

    /// Client connections; publisher p uses connection p mod N.
    #[arg(long, default_value_t = 4)]
    connections: usize,

    /// Keep up to --in-flight publishes outstanding per publisher, instead of
    /// awaiting each ack before the next publish (always on with --mode fanout).
    #[arg(long)]
    batch_async: bool,

    /// Outstanding publishes per publisher with --batch-async
    /// [default: 1; 100 with --mode fanout].
    #[arg(long)]
    in_flight: Option<usize>,

    /// Durable pull consumers on the stream (--mode fanout only) [default: 10].
    #[arg(long)]
    subscriptions: Option<usize>,

    /// Messages per fetch, and the consumers' max_ack_pending
    /// (--mode fanout only) [default: 1000].
    #[arg(long)]
    fetch_batch: Option<usize>,

    /// How fan-out consumers ack (--mode fanout only): `double`
    /// (`Message::double_ack`) or `request` (`Client::request`) [default: double].
    #[arg(long, value_enum)]
    ack: Option<AckMode>,

    /// How long to wait for one publish ack, or (fan-out) one consumer ack's
    /// confirmation, in seconds, before counting it failed.
    #[arg(long, default_value_t = 30)]
    ack_timeout_s: u64,
}

impl Args {
    fn fanout(&self) -> bool {
        self.mode == Mode::Fanout
    }
    /// Pipelined publishing (`--batch-async`, implied by fanout).
    fn pipelined(&self) -> bool {
        self.batch_async || self.fanout()
    }
    fn publishers(&self) -> usize {
        self.publishers.unwrap_or(if self.fanout() { 10 } else { 200 })
    }
    fn in_flight(&self) -> usize {
        self.in_flight.unwrap_or(if self.fanout() { 100 } else { 1 })
    }
    fn subscriptions(&self) -> usize {
        self.subscriptions.unwrap_or(10)
    }
    fn fetch_batch(&self) -> usize {
        self.fetch_batch.unwrap_or(1_000)
    }
    fn ack(&self) -> AckMode {
        self.ack.unwrap_or(AckMode::Double)
    }
}

/// A consumer whose fetches bring nothing new for this long fails the run
/// (as a StreamingPull that receives nothing for 60 s fails `courier bench`).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

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

fn consumer_name(i: usize) -> String {
    format!("BENCH_0_S{i}")
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
    if a.publishers() == 0 || a.streams == 0 || a.connections == 0 || a.in_flight() == 0 {
        return Err("--publishers, --streams, --connections and --in-flight must be at least 1".into());
    }
    if a.fanout() {
        if a.streams != 1 {
            return Err("--mode fanout uses one stream; --streams does not apply".into());
        }
        if a.subscriptions() == 0 || a.fetch_batch() == 0 {
            return Err("--subscriptions and --fetch-batch must be at least 1".into());
        }
        if usize::try_from(a.messages).is_err() {
            return Err("--messages too large".into());
        }
    } else {
        if a.in_flight() > 1 && !a.batch_async {
            return Err("--in-flight only applies with --batch-async".into());
        }
        if a.subscriptions.is_some() || a.fetch_batch.is_some() || a.ack.is_some() {
            return Err("--subscriptions, --fetch-batch and --ack only apply with --mode fanout".into());
        }
    }
    Ok(())
}

/// Connections and one JetStream context per connection. The context's
/// ack-in-flight limit is raised above what the publishers can have
/// outstanding so that it never throttles them.
async fn connect(args: &Args) -> Result<(Vec<async_nats::Client>, Vec<jetstream::Context>), BoxError> {
    let per_conn_publishers = args.publishers().div_ceil(args.connections);
    let ack_capacity = (per_conn_publishers * args.in_flight() + 64).max(5_000);
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
    Ok((clients, contexts))
}

fn new_shared(args: &Args) -> Arc<Shared> {
    Arc::new(Shared {
        subjects: (0..args.streams).map(|i| Subject::from(subject_name(i))).collect(),
        // Deterministic, non-constant payload.
        payload: Bytes::from((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
        total: args.messages,
        next: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    })
}

/// What all publishers measured together.
struct Published {
    hist: Histogram<u64>,
    first: Option<Instant>,
    last: Option<Instant>,
    errors: Vec<String>,
}

impl Published {
    fn elapsed(&self) -> Duration {
        match (self.first, self.last) {
            (Some(f), Some(l)) => l - f,
            _ => Duration::ZERO,
        }
    }

    /// `Err` if a publisher failed or not every message was acked.
    fn check(&mut self, expected: u64) -> Result<(), BoxError> {
        if !self.errors.is_empty() {
            self.errors.sort();
            self.errors.dedup();
            return Err(format!("{} publisher(s) failed; first error: {}", self.errors.len(), self.errors[0]).into());
        }
        let published = self.hist.len();
        if published != expected {
            return Err(format!("acked {published} of {expected} messages").into());
        }
        Ok(())
    }
}

/// Runs `args.publishers()` publisher tasks to completion.
async fn publish_all(args: &Args, contexts: &[jetstream::Context], shared: Arc<Shared>) -> Published {
    eprintln!(
        "nats-peer-bench: publishing {} x {} B with {} publisher(s) over {} connection(s){}",
        args.messages,
        args.size,
        args.publishers(),
        args.connections,
        if args.pipelined() { format!(", up to {} in flight each", args.in_flight()) } else { String::new() }
    );
    let mut tasks = Vec::with_capacity(args.publishers());
    for p in 0..args.publishers() {
        let js = contexts[p % args.connections].clone();
        let shared = shared.clone();
        let (batch, k) = (args.pipelined(), args.in_flight());
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

    let mut out = Published { hist: new_histogram(), first: None, last: None, errors: Vec::new() };
    for t in tasks {
        match t.await {
            Ok(Ok(m)) => {
                out.hist.add(&m.hist).expect("same histogram bounds");
                if let Some(f) = m.first_send {
                    out.first = Some(out.first.map_or(f, |x| x.min(f)));
                }
                if let Some(l) = m.last_ack {
                    out.last = Some(out.last.map_or(l, |x| x.max(l)));
                }
            }
            Ok(Err(e)) => out.errors.push(e.to_string()),
            Err(e) => out.errors.push(format!("publisher task panicked: {e}")),
        }
    }
    out
}

async fn run(args: Args) -> Result<serde_json::Value, BoxError> {
    let (clients, contexts) = connect(&args).await?;
    let server_version = clients[0].server_info().version;

    eprintln!("nats-peer-bench: server {} ({server_version}); creating {} stream(s)", args.server, args.streams);
    let admin = contexts[0].clone();
    if let Err(e) = create_streams(&admin, args.streams).await {
        let _ = delete_streams(&admin, args.streams).await;
        return Err(e);
    }

    if args.fanout() {
        let result = run_fanout(&args, &clients, &contexts, server_version).await;
        // Deleting the stream deletes its consumers too.
        let cleanup = delete_streams(&admin, args.streams).await;
        for c in &clients {
            let _ = c.flush().await;
        }
        let line = result?;
        cleanup?;
        return Ok(line);
    }

    let mut published = publish_all(&args, &contexts, new_shared(&args)).await;

    // Clean up whatever happened above.
    let cleanup = delete_streams(&admin, args.streams).await;
    for c in &clients {
        let _ = c.flush().await;
    }

    published.check(args.messages)?;
    cleanup?;

    let hist = &published.hist;
    let published_n = hist.len();
    let secs = published.elapsed().as_secs_f64();
    let (msgs_per_s, mb_per_s) = if secs > 0.0 {
        (
            round(published_n as f64 / secs, 1),
            round(published_n as f64 * args.size as f64 / 1e6 / secs, 3),
        )
    } else {
        (0.0, 0.0)
    };
    let ms = |us: u64| round(us as f64 / 1000.0, 3);

    Ok(serde_json::json!({
        "peer": "nats-jetstream",
        "messages": published_n,
        "size": args.size,
        "publishers": args.publishers(),
        "streams": args.streams,
        "msgs_per_s": msgs_per_s,
        "mb_per_s": mb_per_s,
        "p50_ms": ms(hist.value_at_quantile(0.50)),
        "p99_ms": ms(hist.value_at_quantile(0.99)),
        "p999_ms": ms(hist.value_at_quantile(0.999)),
        "max_ms": ms(hist.max()),
        // Context beyond the comparison figures.
        "connections": args.connections,
        "in_flight": if args.batch_async { args.in_flight() } else { 1 },
        "mode": if args.batch_async { "batch-async" } else { "single" },
        "elapsed_s": round(secs, 4),
        "server_version": server_version,
    }))
}

// --- fan-out ------------------------------------------------------------------

/// What one consumer's drain measured.
struct Drained {
    /// Acks the server confirmed (redelivered messages' acks included).
    acked: u64,
    /// Deliveries with a delivery count above 1.
    redeliveries: u64,
    /// When its last ack was confirmed.
    last_ack: Instant,
}

/// Creates the durable pull consumers on `BENCH_0`; consumer i is bound to
/// connection i mod C (its fetches and acks go over that connection).
async fn create_consumers(
    args: &Args,
    contexts: &[jetstream::Context],
) -> Result<Vec<consumer::PullConsumer>, BoxError> {
    let ack_wait = Duration::from_secs(args.ack_timeout_s.saturating_mul(2).max(60));
    let max_ack_pending = i64::try_from(args.fetch_batch()).unwrap_or(i64::MAX);
    let results: Vec<Result<consumer::PullConsumer, BoxError>> = futures::stream::iter(0..args.subscriptions())
        .map(|i| {
            let js = contexts[i % contexts.len()].clone();
            async move {
                let stream = js
                    .get_stream(stream_name(0))
                    .await
                    .map_err(|e| -> BoxError { format!("getting stream {}: {e}", stream_name(0)).into() })?;
                let c = stream
                    .create_consumer(consumer::pull::Config {
                        durable_name: Some(consumer_name(i)),
                        deliver_policy: consumer::DeliverPolicy::All,
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait,
                        max_ack_pending,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| -> BoxError { format!("creating consumer {}: {e}", consumer_name(i)).into() })?;
                Ok(c)
            }
        })
        .buffered(ADMIN_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Fetch, ack every fetched message with a confirmed ack (all of a batch's
/// acks in flight at once, each awaited), repeat until every one of the
/// stream's `total` messages has been acked once. `client` is the
/// connection the consumer is bound to.
async fn drain_consumer(
    consumer: consumer::PullConsumer,
    client: async_nats::Client,
    ack: AckMode,
    ack_timeout: Duration,
    total: u64,
    batch: usize,
    failed: Arc<AtomicBool>,
) -> Result<Drained, BoxError> {
    let name = consumer.cached_info().name.clone();
    let mut seen = vec![false; total as usize + 1];
    let mut distinct = 0u64;
    let mut d = Drained { acked: 0, redeliveries: 0, last_ack: Instant::now() };
    let mut last_progress = Instant::now();
    let mut msgs: Vec<jetstream::Message> = Vec::with_capacity(batch);
    while distinct < total {
        if failed.load(Ordering::Relaxed) {
            return Err(format!("{name}: stopped, another consumer failed").into());
        }
        msgs.clear();
        // fetch(): a no-wait pull request; the batch ends with the last
        // message available (up to `batch`).
        let fetched = tokio::time::timeout(STALL_TIMEOUT, async {
            let mut b = consumer.fetch().max_messages(batch).messages().await?;
            while let Some(m) = b.next().await {
                msgs.push(m?);
            }
            Ok::<(), BoxError>(())
        })
        .await;
        match fetched {
            Ok(r) => r.map_err(|e| -> BoxError { format!("{name}: fetch: {e}").into() })?,
            Err(_) if msgs.is_empty() => {
                return Err(format!("{name}: a fetch brought nothing for {} s", STALL_TIMEOUT.as_secs()).into())
            }
            Err(_) => {} // ack what arrived, then fetch again
        }
        if msgs.is_empty() {
            if last_progress.elapsed() > STALL_TIMEOUT {
                return Err(format!(
                    "{name}: nothing new for {} s after {distinct} of {total} messages",
                    STALL_TIMEOUT.as_secs()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        for m in &msgs {
            let info = m.info().map_err(|e| -> BoxError { format!("{name}: message metadata: {e}").into() })?;
            if info.delivered > 1 {
                d.redeliveries += 1;
            }
            let seq = info.stream_sequence;
            if seq == 0 || seq > total {
                return Err(format!("{name}: unexpected stream sequence {seq} (stream has {total})").into());
            }
            if !seen[seq as usize] {
                seen[seq as usize] = true;
                distinct += 1;
            }
        }
        let mut acking: FuturesUnordered<_> = msgs
            .iter()
            .map(|m| {
                let client = &client;
                async move {
                    match ack {
                        AckMode::Double => m.double_ack().await,
                        AckMode::Request => {
                            let reply = m.reply.clone().ok_or("message without a reply subject")?;
                            let req = async_nats::Request::new()
                                .payload(Bytes::from_static(b"+ACK"))
                                .timeout(Some(ack_timeout));
                            client.send_request(reply, req).await.map(|_| ()).map_err(BoxError::from)
                        }
                    }
                }
            })
            .collect();
        while let Some(r) = acking.next().await {
            r.map_err(|e| -> BoxError { format!("{name}: ack: {e}").into() })?;
            d.acked += 1;
        }
        d.last_ack = Instant::now();
        last_progress = d.last_ack;
    }
    Ok(d)
}

async fn run_fanout(
    args: &Args,
    clients: &[async_nats::Client],
    contexts: &[jetstream::Context],
    server_version: String,
) -> Result<serde_json::Value, BoxError> {
    let subs = args.subscriptions();
    eprintln!("nats-peer-bench: creating {subs} durable pull consumer(s) on {}", stream_name(0));
    let consumers = create_consumers(args, contexts).await?;

    // Publish phase, timed on its own.
    let mut published = publish_all(args, contexts, new_shared(args)).await;
    published.check(args.messages)?;
    let pub_secs = published.elapsed().as_secs_f64();
    let stream_bytes = contexts[0]
        .get_stream(stream_name(0))
        .await
        .map_err(|e| -> BoxError { format!("stream info: {e}").into() })?
        .cached_info()
        .state
        .bytes;

    // Drain phase: all consumers at once.
    eprintln!(
        "nats-peer-bench: draining {subs} consumer(s), fetches of up to {}, acks: {}",
        args.fetch_batch(),
        args.ack().name()
    );
    let failed = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = consumers
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, c)| {
            let failed = failed.clone();
            // Consumer i was created through contexts[i mod C], i.e. clients[i mod C].
            let client = clients[i % clients.len()].clone();
            let (ack, ack_timeout) = (args.ack(), Duration::from_secs(args.ack_timeout_s));
            let (total, batch) = (args.messages, args.fetch_batch());
            tokio::spawn(async move {
                let r = drain_consumer(c, client, ack, ack_timeout, total, batch, failed.clone()).await;
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                r
            })
        })
        .collect();
    let mut drained = Vec::with_capacity(subs);
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(d)) => drained.push(d),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("consumer task panicked: {e}")),
        }
    }
    if !errors.is_empty() {
        // Report the root cause, not the "another consumer failed" echoes.
        errors.sort_by_key(|e| e.contains("another consumer failed"));
        return Err(format!("{} consumer(s) failed; first error: {}", errors.len(), errors[0]).into());
    }

    // Untimed check on the server side: every consumer's ack floor is the
    // last message and nothing is left pending.
    for c in &consumers {
        let info = c.get_info().await.map_err(|e| -> BoxError { format!("consumer info: {e}").into() })?;
        if info.ack_floor.stream_sequence != args.messages || info.num_ack_pending != 0 || info.num_pending != 0 {
            return Err(format!(
                "consumer {} after drain: ack floor {}, {} ack pending, {} pending (expected {}, 0, 0)",
                info.name, info.ack_floor.stream_sequence, info.num_ack_pending, info.num_pending, args.messages
            )
            .into());
        }
    }

    let acked: u64 = drained.iter().map(|d| d.acked).sum();
    let redeliveries: u64 = drained.iter().map(|d| d.redeliveries).sum();
    let slowest = drained.iter().map(|d| d.last_ack - start).max().unwrap_or_default();
    let fastest = drained.iter().map(|d| d.last_ack - start).min().unwrap_or_default();
    let drain_secs = slowest.as_secs_f64();
    let per_s = |n: f64, secs: f64| if secs > 0.0 { n / secs } else { 0.0 };
    let n = args.messages as f64;
    let payload = args.size as f64;
    let ms = |us: u64| round(us as f64 / 1000.0, 3);

    Ok(serde_json::json!({
        "peer": "nats-jetstream",
        "mode": "fanout",
        "messages": args.messages,
        "size": args.size,
        "subscriptions": subs,
        "publish_msgs_per_s": round(per_s(n, pub_secs), 1),
        "publish_mb_per_s": round(per_s(n * payload / 1e6, pub_secs), 3),
        "deliveries_acked_per_s": round(per_s(acked as f64, drain_secs), 1),
        "deliveries_mb_per_s": round(per_s(acked as f64 * payload / 1e6, drain_secs), 3),
        // Context beyond the comparison figures.
        "deliveries_expected": args.messages * subs as u64,
        "deliveries_acked": acked,
        "redeliveries": redeliveries,
        "publish_elapsed_s": round(pub_secs, 4),
        "drain_elapsed_s": round(drain_secs, 4),
        "fastest_subscription_s": round(fastest.as_secs_f64(), 4),
        "slowest_subscription_s": round(drain_secs, 4),
        "publish_p50_ms": ms(published.hist.value_at_quantile(0.50)),
        "publish_p99_ms": ms(published.hist.value_at_quantile(0.99)),
        "stream_bytes_per_message": round(stream_bytes as f64 / n, 1),
        "publishers": args.publishers(),
        "in_flight": args.in_flight(),
        "connections": args.connections,
        "fetch_batch": args.fetch_batch(),
        "ack": args.ack().name(),
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

//! `courier bench`: a load generator for a running broker, in the spirit of
//! `nats bench` and `redis-benchmark`. It drives the broker only through the
//! public gRPC API (Publisher, Subscriber, Admin) with fixed, documented
//! workloads (`publish`, `fanout`, `latency`, `drain`, `backlog`, or `all`
//! of them in sequence), shows a progress bar on stderr while running, and
//! prints a human summary or, with `--json`, one JSON object ([`Report`])
//! on stdout; `--record FILE` appends that object as one line to FILE so
//! runs can be compared over time, and `--chart FILE.svg` sweeps fanout over
//! 1, 2, 5, 10 and 20 subscriptions and draws the result. Every workload
//! runs on fresh topics named `bench-<workload>-<random>`, deleted at the
//! end unless `--keep`. With `--spawn-broker` the bench starts (and, for
//! `backlog`, restarts) its own broker in a temporary data directory.
//! docs/bench.md describes each workload, flag and JSON field.

use std::collections::VecDeque;
use std::fmt::Display;
use std::io::{BufRead, BufReader, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use bytes::{BufMut as _, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tonic::{Status, Streaming};

use super::UsageError;
use super::conn::{Conn, error_chain, rpc_error_line};
use super::output::{Output, count};
use super::parse;
use crate::api::pb::v1::{
    AckStatus, CreateTopicRequest, DeleteTopicRequest, GetBrokerStatsRequest, GetTopicStatsRequest,
    PublishMessage, ReceivedMessage, StreamingPullRequest, StreamingPullResponse, Subscription,
    TopicStats,
};
use crate::broker::config::{
    ACK_IDS_PER_REQUEST_MAX, PUBLISH_BATCH_MESSAGES_MAX, STREAM_OUTSTANDING_MESSAGES_MAX,
};
use crate::client::Client;

/// Messages of the `publish` workload.
const PUBLISH_MESSAGES: u64 = 200_000;
/// Messages of the `fanout` workload.
const FANOUT_MESSAGES: u64 = 100_000;
/// Subscriptions of the `fanout` workload (`all` also runs it with 1).
const FANOUT_SUBSCRIPTIONS: u32 = 10;
/// Subscription counts of the `--chart` fanout sweep.
const CHART_SUBSCRIPTIONS: [u32; 5] = [1, 2, 5, 10, 20];
/// Messages of the `drain` workload (published untimed, then drained).
const DRAIN_MESSAGES: u64 = 200_000;
/// Messages of the `backlog` workload.
const BACKLOG_MESSAGES: u64 = 10_000_000;
/// Publish rate of the `latency` workload, messages per second.
const LATENCY_RATE: u64 = 5_000;
/// How long the `latency` workload publishes.
const LATENCY_DURATION_MS: u64 = 10_000;
/// Shortest pause between two paced Publish calls in `latency` (tokio's
/// timer resolution); the default batch is sized so the pause is at least
/// this long.
const LATENCY_TICK_MIN_NS: u64 = 1_000_000;
/// Default payload size.
const DEFAULT_SIZE: &str = "256";
/// Default messages per Publish call of the throughput workloads.
const DEFAULT_BATCH: u32 = 100;
/// Default most unconfirmed messages per publisher.
const DEFAULT_IN_FLIGHT: u64 = 1_000;
/// Default gRPC connections.
const DEFAULT_CONNECTIONS: u32 = 4;
/// Default StreamingPull `max_outstanding_messages`.
const DEFAULT_MAX_OUTSTANDING: u64 = 1_000;
/// The latency workload writes two u64 timestamps at the head of each
/// payload, so its payloads are at least this long.
const LATENCY_HEADER_BYTES: usize = 16;
/// A consumer that receives nothing for this long fails the run.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a spawned broker may take to print its listening line (a
/// restart over a large backlog recovers first).
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a spawned broker may take to exit after SIGTERM.
const BROKER_STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the first Pull after a restart may wait in total.
const FIRST_DELIVERY_TIMEOUT: Duration = Duration::from_secs(600);
/// Stderr lines of a spawned broker kept for error messages.
const BROKER_STDERR_TAIL: usize = 20;
/// Largest latency the histograms track, in microseconds (saturating).
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;
/// Upper bounds of the numeric flags.
const RATE_MAX: u64 = 10_000_000;
const CONNECTIONS_MAX: i64 = 64;
const SUBSCRIPTIONS_MAX: i64 = 1_000;

/// Which workload `courier bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// 1 topic, 1 subscription: publish throughput until every publish is confirmed.
    Publish,
    /// 1 topic, N subscriptions: publish, then drain all subscriptions at once.
    Fanout,
    /// Publish at a fixed rate; publish-to-receive latency percentiles.
    Latency,
    /// Drain a 200,000-message backlog with one StreamingPull consumer.
    Drain,
    /// A large backlog: broker memory and disk, and restart time with --spawn-broker.
    Backlog,
    /// publish, fanout (1 and 10 subscriptions), latency, drain; backlog with --spawn-broker.
    All,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Publish => "publish",
            Workload::Fanout => "fanout",
            Workload::Latency => "latency",
            Workload::Drain => "drain",
            Workload::Backlog => "backlog",
            Workload::All => "all",
        }
    }
}

/// `courier bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Workload to run.
    #[arg(long, value_enum, default_value_t = Workload::Publish)]
    pub workload: Workload,
    /// Messages to publish [default: publish 200000, fanout 100000, drain 200000, backlog 10000000]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: Option<u64>,
    /// Payload size of each message, e.g. 256 or 4KiB
    #[arg(long, value_name = "BYTES", default_value = DEFAULT_SIZE, value_parser = parse::bytes)]
    pub size: u64,
    /// fanout: subscriptions on the topic [default: 10]
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=SUBSCRIPTIONS_MAX))]
    pub subscriptions: Option<u32>,
    /// latency: messages per second [default: 5000]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=RATE_MAX))]
    pub rate: Option<u64>,
    /// latency: how long to publish [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = positive_duration_ms)]
    pub duration: Option<u64>,
    /// Most messages a publisher has sent and not yet confirmed [default: 1000]
    #[arg(long = "in-flight", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub in_flight: Option<u64>,
    /// Messages per Publish call, 1 to 1000 [default: 100; latency: ceil(rate/1000)]
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=PUBLISH_BATCH_MESSAGES_MAX as i64))]
    pub batch: Option<u32>,
    /// gRPC connections (HTTP/2) that publishers and consumers spread over
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=CONNECTIONS_MAX))]
    pub connections: u32,
    /// StreamingPull flow control: max_outstanding_messages of each stream
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_OUTSTANDING,
          value_parser = clap::value_parser!(u64).range(1..=STREAM_OUTSTANDING_MESSAGES_MAX))]
    pub max_outstanding: u64,
    /// No progress bar (it is also hidden when stderr is not a terminal)
    #[arg(long)]
    pub quiet: bool,
    /// Append the result as one JSON line to FILE
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// fanout/all: run fanout with 1, 2, 5, 10 and 20 subscriptions and draw an SVG chart to FILE
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// Keep the bench topics and subscriptions (and a spawned broker's data dir)
    #[arg(long)]
    pub keep: bool,
    /// Start a broker (this binary, or COURIER) on 127.0.0.1 and run against it instead of --server; backlog then measures a restart
    #[arg(long, value_name = "COURIER", num_args = 0..=1)]
    pub spawn_broker: Option<Option<PathBuf>>,
    /// Where --spawn-broker puts the broker's data directory [default: the system temp dir]
    #[arg(long, value_name = "DIR", requires = "spawn_broker")]
    pub bench_dir: Option<PathBuf>,
}

/// A duration flag in milliseconds, more than zero.
fn positive_duration_ms(s: &str) -> Result<u64, String> {
    match parse::duration_ms(s)? {
        0 => Err(format!("{s:?} must be longer than 0")),
        ms => Ok(ms),
    }
}

/// One workload run within a bench invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Publish,
    Fanout { subscriptions: u32 },
    Latency,
    Drain,
    Backlog,
}

/// The parameters a workload ran with, after defaults.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Messages published (latency: rate × duration).
    pub messages: u64,
    /// Payload bytes per message.
    pub size: u64,
    /// Subscriptions on the topic.
    pub subscriptions: u32,
    /// Messages per Publish call.
    pub batch: u32,
    /// Most unconfirmed messages per publisher.
    pub in_flight: u64,
    /// Concurrent Publish calls: max(1, in_flight / batch) (latency: as
    /// many as the schedule and in_flight allow).
    pub publish_concurrency: u64,
    /// gRPC connections.
    pub connections: u32,
    /// StreamingPull max_outstanding_messages, for workloads that consume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_outstanding: Option<u64>,
    /// Target publish rate (latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Publishing time (latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl BenchArgs {
    /// Runs the bench and prints (and records) its report.
    pub async fn run(self) -> anyhow::Result<()> {
        self.check()?;
        let started = Instant::now();
        let timestamp = SystemTime::now();
        let show_progress = !self.quiet && std::io::stderr().is_terminal();
        let mut spawned = None;
        let server = match &self.spawn_broker {
            Some(exe) => {
                let exe = match exe {
                    Some(path) => path.clone(),
                    None => std::env::current_exe().context("finding the courier executable")?,
                };
                let parent = self.bench_dir.clone().unwrap_or_else(std::env::temp_dir);
                let data_dir = parent.join(format!("courier-bench-{}", random_hex()));
                let (broker, _) = SpawnedBroker::start(&exe, &data_dir).await?;
                let url = broker.url();
                spawned = Some(broker);
                url
            }
            None => self.conn.server.clone(),
        };
        let mut ctx = Ctx::connect(&server, self.connections, show_progress, self.keep).await?;
        ctx.spawned = spawned;
        let stats = ctx.broker_stats().await?;
        let broker = BrokerInfo {
            version: stats.version,
            fsync_mode: stats.fsync_mode,
            spawned: ctx.spawned.is_some(),
            data_dir: ctx
                .spawned
                .as_ref()
                .map(|b| b.data_dir.display().to_string()),
        };

        let outcome = tokio::select! {
            r = self.run_steps(&mut ctx) => r,
            r = tokio::signal::ctrl_c() => match r {
                Ok(()) => Err(anyhow!("interrupted")),
                Err(e) => Err(anyhow!("listening for Ctrl-C: {e}")),
            },
        };
        // An interrupted step leaves its topics registered: delete them now.
        ctx.cleanup().await;
        let stop = ctx.stop_spawned().await;
        let results = outcome?;
        stop?;

        let chart = match &self.chart {
            Some(path) => {
                let svg = chart_svg(&chart_points(&results), &broker.fsync_mode);
                std::fs::write(path, svg)
                    .with_context(|| format!("writing chart {}", path.display()))?;
                Some(path.display().to_string())
            }
            None => None,
        };
        let report = Report {
            timestamp: prost_types::Timestamp::from(timestamp).to_string(),
            unix_ms: timestamp
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            bench_version: env!("CARGO_PKG_VERSION"),
            workload: self.workload,
            server,
            broker,
            host: HostInfo::current(),
            results,
            chart,
            elapsed_s: round(started.elapsed().as_secs_f64(), 3),
        };
        let line = serde_json::to_string(&report).context("encoding the report")?;
        if let Some(path) = &self.record {
            append_line(path, &line)?;
        }
        let mut out = Output::new(self.conn.json);
        if self.conn.json {
            out.line(&line)?;
        } else {
            for text in report.human() {
                out.line(text)?;
            }
        }
        out.flush()?;
        Ok(())
    }

    /// Rejects flags the chosen workload does not use.
    fn check(&self) -> anyhow::Result<()> {
        use Workload::*;
        let w = self.workload;
        let unused = |flag: &str, given: bool, users: &[Workload]| -> anyhow::Result<()> {
            if given && !users.contains(&w) {
                let names: Vec<&str> = users.iter().map(|u| u.name()).collect();
                return Err(UsageError(format!(
                    "{flag} applies only to --workload {}",
                    names.join(", ")
                ))
                .into());
            }
            Ok(())
        };
        unused(
            "--messages",
            self.messages.is_some(),
            &[Publish, Fanout, Drain, Backlog, All],
        )?;
        unused(
            "--subscriptions",
            self.subscriptions.is_some(),
            &[Fanout, All],
        )?;
        unused("--rate", self.rate.is_some(), &[Latency, All])?;
        unused("--duration", self.duration.is_some(), &[Latency, All])?;
        unused("--chart", self.chart.is_some(), &[Fanout, All])?;
        unused(
            "--max-outstanding",
            self.max_outstanding != DEFAULT_MAX_OUTSTANDING,
            &[Fanout, Latency, Drain, All],
        )?;
        if self.chart.is_some() && self.subscriptions.is_some() {
            return Err(UsageError(
                "--chart runs fanout with 1, 2, 5, 10 and 20 subscriptions; drop --subscriptions"
                    .into(),
            )
            .into());
        }
        Ok(())
    }

    /// The workload runs of this invocation, in order.
    fn steps(&self) -> Vec<Step> {
        let fanouts: Vec<u32> = if self.chart.is_some() {
            CHART_SUBSCRIPTIONS.to_vec()
        } else {
            let n = self.subscriptions.unwrap_or(FANOUT_SUBSCRIPTIONS);
            match self.workload {
                Workload::All if n != 1 => vec![1, n],
                _ => vec![n],
            }
        };
        let fanout = fanouts
            .into_iter()
            .map(|subscriptions| Step::Fanout { subscriptions });
        match self.workload {
            Workload::Publish => vec![Step::Publish],
            Workload::Fanout => fanout.collect(),
            Workload::Latency => vec![Step::Latency],
            Workload::Drain => vec![Step::Drain],
            Workload::Backlog => vec![Step::Backlog],
            Workload::All => {
                let mut steps = vec![Step::Publish];
                steps.extend(fanout);
                steps.extend([Step::Latency, Step::Drain]);
                if self.spawn_broker.is_some() {
                    steps.push(Step::Backlog);
                }
                steps
            }
        }
    }

    /// A step's parameters: the flags over the workload's defaults.
    fn params(&self, step: Step) -> Params {
        let batch = self.batch.unwrap_or(DEFAULT_BATCH);
        let in_flight = self.in_flight.unwrap_or(DEFAULT_IN_FLIGHT);
        let mut p = Params {
            messages: 0,
            size: self.size,
            subscriptions: 1,
            batch,
            in_flight,
            publish_concurrency: (in_flight / u64::from(batch)).max(1),
            connections: self.connections,
            max_outstanding: Some(self.max_outstanding),
            rate: None,
            duration_ms: None,
        };
        match step {
            Step::Publish => {
                p.messages = self.messages.unwrap_or(PUBLISH_MESSAGES);
                p.max_outstanding = None;
            }
            Step::Fanout { subscriptions } => {
                p.messages = self.messages.unwrap_or(FANOUT_MESSAGES);
                p.subscriptions = subscriptions;
            }
            Step::Drain => p.messages = self.messages.unwrap_or(DRAIN_MESSAGES),
            Step::Backlog => {
                p.messages = self.messages.unwrap_or(BACKLOG_MESSAGES);
                p.max_outstanding = None;
            }
            Step::Latency => {
                let rate = self.rate.unwrap_or(LATENCY_RATE);
                let duration_ms = self.duration.unwrap_or(LATENCY_DURATION_MS);
                // Enough messages per call that calls are at least one timer
                // tick apart.
                let batch = self.batch.unwrap_or_else(|| {
                    let per_tick = (rate * LATENCY_TICK_MIN_NS).div_ceil(1_000_000_000);
                    per_tick.clamp(1, PUBLISH_BATCH_MESSAGES_MAX as u64) as u32
                });
                p.batch = batch;
                p.messages = (rate * duration_ms / 1000).max(1);
                p.size = self.size.max(LATENCY_HEADER_BYTES as u64);
                p.publish_concurrency = (in_flight / u64::from(batch)).max(1);
                p.rate = Some(rate);
                p.duration_ms = Some(duration_ms);
            }
        }
        p
    }

    /// Runs every step, each on fresh topics deleted right after it.
    async fn run_steps(&self, ctx: &mut Ctx) -> anyhow::Result<Vec<WorkloadResult>> {
        let mut results = Vec::new();
        for step in self.steps() {
            let p = self.params(step);
            let result = match step {
                Step::Publish => publish(ctx, &p).await.map(WorkloadResult::Publish),
                Step::Fanout { .. } => fanout(ctx, &p).await.map(WorkloadResult::Fanout),
                Step::Latency => latency(ctx, &p).await.map(WorkloadResult::Latency),
                Step::Drain => drain(ctx, &p).await.map(WorkloadResult::Drain),
                Step::Backlog => backlog(ctx, &p).await.map(WorkloadResult::Backlog),
            };
            ctx.cleanup().await;
            results.push(result?);
        }
        Ok(results)
    }
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// Everything one `courier bench` invocation measured: the object printed
/// by `--json` and appended by `--record`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// When the run started, RFC 3339 UTC.
    pub timestamp: String,
    /// The same, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Version of the courier binary that ran the bench.
    pub bench_version: &'static str,
    /// The `--workload` flag.
    pub workload: Workload,
    /// The broker URL (a spawned broker's, with --spawn-broker).
    pub server: String,
    /// What the broker said about itself (GetBrokerStats) at the start.
    pub broker: BrokerInfo,
    /// The machine the bench ran on.
    pub host: HostInfo,
    /// One entry per workload run, in order.
    pub results: Vec<WorkloadResult>,
    /// Path of the SVG written for `--chart`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<String>,
    /// Wall time of the whole invocation.
    pub elapsed_s: f64,
}

/// The broker under test.
#[derive(Debug, Serialize)]
pub struct BrokerInfo {
    pub version: String,
    pub fsync_mode: String,
    /// Whether the bench started the broker itself (`--spawn-broker`).
    pub spawned: bool,
    /// Data directory of a spawned broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
}

/// The machine the bench ran on.
#[derive(Debug, Serialize)]
pub struct HostInfo {
    pub os: &'static str,
    pub arch: &'static str,
    pub cpus: usize,
}

impl HostInfo {
    fn current() -> HostInfo {
        HostInfo {
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The result of one workload run, tagged with its name.
#[derive(Debug, Serialize)]
#[serde(tag = "workload", rename_all = "lowercase")]
pub enum WorkloadResult {
    Publish(PublishResult),
    Fanout(FanoutResult),
    Latency(LatencyResult),
    Drain(DrainResult),
    Backlog(BacklogResult),
}

/// Latency percentiles in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles {
                count: 0,
                min_ms: 0.0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                p999_ms: 0.0,
                max_ms: 0.0,
                mean_ms: 0.0,
            };
        }
        Percentiles {
            count: h.len(),
            min_ms: ms(h.min()),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: round(h.mean() / 1000.0, 3),
        }
    }

    fn human(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// `publish`: throughput until every publish is confirmed.
#[derive(Debug, Serialize)]
pub struct PublishResult {
    pub topic: String,
    pub params: Params,
    /// Messages confirmed by the broker (always params.messages).
    pub published: u64,
    /// From the first Publish call to the last confirmation.
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Publish calls made.
    pub publish_calls: u64,
    /// Duration of each Publish call (send to confirmation).
    pub publish_call_latency: Percentiles,
}

/// Disk usage of a fanout run, around its publish and drain phases.
#[derive(Debug, Serialize)]
pub struct DiskUsage {
    /// Payload bytes per message (params.size).
    pub payload_bytes_per_message: u64,
    /// GetTopicStats.retained_bytes of the new topic before publishing.
    pub topic_bytes_before: u64,
    /// ... once every message is published.
    pub topic_bytes_after_publish: u64,
    /// ... once every subscription is drained.
    pub topic_bytes_after_drain: u64,
    /// (topic_bytes_after_publish - topic_bytes_before) / published.
    pub topic_bytes_per_message: f64,
    /// GetBrokerStats.data_dir_bytes before publishing.
    pub data_dir_bytes_before: u64,
    /// ... once every message is published.
    pub data_dir_bytes_after_publish: u64,
    /// ... once every subscription is drained (includes ack state).
    pub data_dir_bytes_after_drain: u64,
    /// (data_dir_bytes_after_publish - data_dir_bytes_before) / published.
    pub data_dir_bytes_per_message_published: f64,
    /// (data_dir_bytes_after_drain - data_dir_bytes_before) / published.
    pub data_dir_bytes_per_message_drained: f64,
}

/// `fanout`: publish once, then drain every subscription concurrently.
#[derive(Debug, Serialize)]
pub struct FanoutResult {
    pub topic: String,
    pub params: Params,
    pub published: u64,
    pub publish_elapsed_s: f64,
    pub publish_msgs_per_s: f64,
    pub publish_mb_per_s: f64,
    pub publish_call_latency: Percentiles,
    /// published × subscriptions.
    pub deliveries_expected: u64,
    /// Acks confirmed OK over all subscriptions (equals deliveries_expected).
    pub deliveries_acked: u64,
    /// Deliveries with delivery_attempt > 1.
    pub redeliveries: u64,
    /// Ack results other than OK (stale or unknown).
    pub acks_not_ok: u64,
    /// From opening the first stream to the last ack confirmed.
    pub drain_elapsed_s: f64,
    /// deliveries_acked / drain_elapsed_s.
    pub deliveries_acked_per_s: f64,
    /// Payload megabytes (10^6 bytes) acked per second.
    pub deliveries_mb_per_s: f64,
    /// Drain time of the fastest and the slowest subscription.
    pub fastest_subscription_s: f64,
    pub slowest_subscription_s: f64,
    pub disk: DiskUsage,
}

/// `latency`: paced publishing, publish-to-receive latency.
#[derive(Debug, Serialize)]
pub struct LatencyResult {
    pub topic: String,
    pub params: Params,
    /// What `latency` is measured from: the intended send time of the
    /// message on the fixed schedule (no coordinated omission).
    pub measured_from: &'static str,
    pub sent: u64,
    /// First deliveries received (delivery_attempt 1).
    pub received: u64,
    pub acked: u64,
    pub redeliveries: u64,
    /// Messages whose payload did not carry the bench's timestamps.
    pub malformed: u64,
    /// Messages per second actually sent: (calls - 1) × batch / time from
    /// the first intended send to the last actual send.
    pub achieved_rate: f64,
    /// Largest delay between a call's intended and actual send time.
    pub max_send_lag_ms: f64,
    /// Intended send time to receipt by the StreamingPull consumer.
    pub latency: Percentiles,
    /// Actual send time (just before the Publish call) to receipt.
    pub latency_from_send: Percentiles,
    /// Duration of each Publish call.
    pub publish_call_latency: Percentiles,
}

/// `drain`: one StreamingPull consumer empties a prepared backlog.
#[derive(Debug, Serialize)]
pub struct DrainResult {
    pub topic: String,
    pub params: Params,
    /// Messages published before the timed part (untimed by the workload,
    /// but reported).
    pub prefilled: u64,
    pub prefill_elapsed_s: f64,
    pub prefill_msgs_per_s: f64,
    /// Acks confirmed OK (equals prefilled).
    pub drained: u64,
    pub redeliveries: u64,
    pub acks_not_ok: u64,
    /// From opening the stream to the last ack confirmed.
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
}

/// `backlog`: a large backlog with no consumer.
#[derive(Debug, Serialize)]
pub struct BacklogResult {
    pub topic: String,
    pub params: Params,
    pub published: u64,
    pub publish_elapsed_s: f64,
    pub publish_msgs_per_s: f64,
    pub publish_mb_per_s: f64,
    /// GetBrokerStats.resident_memory_bytes after publishing.
    pub resident_memory_bytes: u64,
    /// VmRSS of /proc/<pid>/status, when the bench spawned the broker.
    pub vm_rss_bytes: Option<u64>,
    /// GetBrokerStats.data_dir_bytes after publishing.
    pub data_dir_bytes: u64,
    /// GetTopicStats.retained_bytes after publishing.
    pub topic_bytes: u64,
    pub topic_bytes_per_message: f64,
    /// Whether a restart was measured (needs --spawn-broker).
    pub restart_measured: bool,
    pub restart: Option<RestartResult>,
}

/// A SIGTERM and restart of a spawned broker holding the backlog.
#[derive(Debug, Serialize)]
pub struct RestartResult {
    /// SIGTERM to process exit.
    pub shutdown_s: f64,
    /// Exit code of the stopped broker (None if killed by a signal).
    pub shutdown_exit_code: Option<i32>,
    /// Spawn to the `listening on` line.
    pub restart_s: f64,
    /// `listening on` line to the first message returned by Pull.
    pub first_delivery_after_listening_s: f64,
    /// Spawn to the first message returned by Pull.
    pub first_delivery_after_spawn_s: f64,
    /// GetBrokerStats after the first delivery.
    pub resident_memory_bytes: u64,
    pub vm_rss_bytes: Option<u64>,
    pub data_dir_bytes: u64,
}

// ---------------------------------------------------------------------------
// Shared machinery
// ---------------------------------------------------------------------------

/// The connections, settings and bookkeeping every workload shares.
struct Ctx {
    server: String,
    clients: Vec<Client>,
    connections: u32,
    show_progress: bool,
    keep: bool,
    /// Topics created by the current step, deleted by [`Ctx::cleanup`].
    topics: Vec<String>,
    spawned: Option<SpawnedBroker>,
    /// The origin of the latency workload's timestamps.
    epoch: Instant,
}

impl Ctx {
    async fn connect(
        server: &str,
        connections: u32,
        show_progress: bool,
        keep: bool,
    ) -> anyhow::Result<Ctx> {
        let mut ctx = Ctx {
            server: server.to_string(),
            clients: Vec::new(),
            connections,
            show_progress,
            keep,
            topics: Vec::new(),
            spawned: None,
            epoch: Instant::now(),
        };
        ctx.reconnect(server).await?;
        Ok(ctx)
    }

    /// Opens `connections` fresh connections to `server`.
    async fn reconnect(&mut self, server: &str) -> anyhow::Result<()> {
        let mut clients = Vec::new();
        for _ in 0..self.connections {
            let client = Client::connect(server)
                .await
                .map_err(|e| anyhow!("cannot reach courier at {server}: {}", error_chain(&e)))?;
            clients.push(client);
        }
        self.server = server.to_string();
        self.clients = clients;
        Ok(())
    }

    /// The client of connection `i` (modulo the connection count).
    fn client(&self, i: usize) -> &Client {
        &self.clients[i % self.clients.len()]
    }

    /// Maps a failed RPC on `what` to the CLI's error line.
    fn err(&self, what: impl Display) -> impl FnOnce(Status) -> anyhow::Error + '_ {
        let what = what.to_string();
        move |status| rpc_error(&self.server, &what, status)
    }

    /// A new progress bar of `len` steps (hidden unless enabled).
    fn bar(&self, len: u64, prefix: impl Into<String>) -> ProgressBar {
        if !self.show_progress {
            return ProgressBar::hidden();
        }
        let style = ProgressStyle::with_template(
            "{prefix:>20} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} {rate:>9} eta {eta}",
        )
        .map(|s| {
            s.progress_chars("=> ")
                .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}/s", thousands(state.per_sec()));
                })
        })
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        bar.set_style(style);
        bar.set_prefix(prefix.into());
        bar
    }

    async fn broker_stats(&self) -> anyhow::Result<crate::api::pb::v1::BrokerStats> {
        Ok(self
            .client(0)
            .admin()
            .get_broker_stats(GetBrokerStatsRequest {})
            .await
            .map_err(self.err("stats"))?
            .into_inner())
    }

    async fn topic_stats(&self, topic: &str) -> anyhow::Result<TopicStats> {
        Ok(self
            .client(0)
            .admin()
            .get_topic_stats(GetTopicStatsRequest {
                name: topic.to_string(),
            })
            .await
            .map_err(self.err(format_args!("topic stats {topic:?}")))?
            .into_inner())
    }

    /// Creates `bench-<workload>-<random>` with `subscriptions`
    /// subscriptions `<topic>-s<i>`; returns the names.
    async fn create(
        &mut self,
        workload: &str,
        subscriptions: u32,
    ) -> anyhow::Result<(String, Vec<String>)> {
        let topic = format!("bench-{workload}-{}", random_hex());
        self.client(0)
            .admin()
            .create_topic(CreateTopicRequest {
                name: topic.clone(),
                retention: None,
            })
            .await
            .map_err(self.err(format_args!("topic create {topic:?}")))?;
        self.topics.push(topic.clone());
        let mut subs = Vec::new();
        for i in 0..subscriptions {
            let name = format!("{topic}-s{i}");
            let sub = Subscription {
                name: name.clone(),
                topic: topic.clone(),
                ..Subscription::default()
            };
            self.client(0)
                .create_subscription(sub)
                .await
                .map_err(self.err(format_args!("sub create {name:?}")))?;
            subs.push(name);
        }
        Ok((topic, subs))
    }

    /// Deletes the topics (with their subscriptions) of the current step,
    /// unless `--keep`. Failures are warnings: the figures stand.
    async fn cleanup(&mut self) {
        let topics = std::mem::take(&mut self.topics);
        if self.keep || self.clients.is_empty() {
            return;
        }
        for topic in topics {
            let request = DeleteTopicRequest {
                name: topic.clone(),
            };
            if let Err(status) = self.client(0).admin().delete_topic(request).await {
                let line =
                    rpc_error_line(&self.server, &format!("topic delete {topic:?}"), &status);
                eprintln!("warning: {line}");
            }
        }
    }

    /// Stops a spawned broker and removes its data directory unless
    /// `--keep`.
    async fn stop_spawned(&mut self) -> anyhow::Result<()> {
        let Some(mut broker) = self.spawned.take() else {
            return Ok(());
        };
        broker.stop().await?;
        if self.keep {
            eprintln!("kept the broker's data dir {}", broker.data_dir.display());
        } else {
            std::fs::remove_dir_all(&broker.data_dir).with_context(|| {
                format!(
                    "removing the broker's data dir {}",
                    broker.data_dir.display()
                )
            })?;
        }
        Ok(())
    }
}

/// The error for a failed RPC, in the CLI's usual wording.
fn rpc_error(server: &str, what: &str, status: Status) -> anyhow::Error {
    anyhow!(rpc_error_line(server, what, &status))
}

/// Eight random hex digits for unique names.
fn random_hex() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

/// A payload of `size` pseudo-random bytes (xorshift), shared by every
/// message of a run.
fn payload(size: u64) -> Bytes {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    Bytes::from(bytes)
}

/// A histogram of microseconds.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("constant histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// `count / seconds`, rounded to 0.1.
fn rate(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        return 0.0;
    }
    round(count as f64 / s, 1)
}

/// Megabytes (10^6 bytes) of `count` payloads of `size` bytes per second.
fn mb_rate(count: u64, size: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        return 0.0;
    }
    round(count as f64 * size as f64 / 1e6 / s, 3)
}

/// `(after - before) / n` as a float (negative if the size shrank).
fn per_message(before: u64, after: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    round((after as f64 - before as f64) / n as f64, 2)
}

fn secs(d: Duration) -> f64 {
    round(d.as_secs_f64(), 4)
}

/// What [`publish_all`] measured.
struct Published {
    elapsed: Duration,
    calls: u64,
    call_latency: Histogram<u64>,
}

/// Publishes `messages` copies of a `p.size`-byte payload to `topic` with
/// `p.publish_concurrency` concurrent Publish calls of `p.batch` messages,
/// spread over the connections; returns once every message is confirmed.
async fn publish_all(
    ctx: &Ctx,
    topic: &str,
    messages: u64,
    p: &Params,
    bar: &ProgressBar,
) -> anyhow::Result<Published> {
    let data = payload(p.size);
    let next = Arc::new(AtomicU64::new(0));
    let batch = u64::from(p.batch);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..p.publish_concurrency {
        let client = ctx.client(worker as usize).clone();
        let (topic, server) = (topic.to_string(), ctx.server.clone());
        let (next, data, bar) = (next.clone(), data.clone(), bar.clone());
        tasks.spawn(async move {
            let mut calls = 0u64;
            let mut call_latency = histogram();
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= messages {
                    break;
                }
                let n = batch.min(messages - first);
                let batch: Vec<PublishMessage> = (0..n)
                    .map(|_| PublishMessage {
                        data: data.clone(),
                        ..PublishMessage::default()
                    })
                    .collect();
                let sent = Instant::now();
                let ids = client
                    .publish(&topic, batch)
                    .await
                    .map_err(|e| rpc_error(&server, &format!("publish to {topic:?}"), e))?;
                call_latency.saturating_record(micros(sent.elapsed()));
                if ids.len() as u64 != n {
                    bail!(
                        "publish to {topic:?}: {} message ids for {n} messages",
                        ids.len()
                    );
                }
                calls += 1;
                bar.inc(n);
            }
            anyhow::Ok((calls, call_latency))
        });
    }
    let mut calls = 0;
    let mut call_latency = histogram();
    while let Some(joined) = tasks.join_next().await {
        let (c, h) = joined.context("publisher task")??;
        calls += c;
        call_latency
            .add(&h)
            .map_err(|e| anyhow!("merging histograms: {e}"))?;
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    Ok(Published {
        elapsed,
        calls,
        call_latency,
    })
}

/// What [`consume`] counted on one stream.
#[derive(Debug, Clone, Copy)]
struct Consumed {
    received: u64,
    acked: u64,
    redeliveries: u64,
    acks_not_ok: u64,
    /// When the last needed ack result arrived.
    last_ack: Instant,
}

/// The request sender and response stream of one StreamingPull.
type PullStream = (
    mpsc::Sender<StreamingPullRequest>,
    Streaming<StreamingPullResponse>,
);

/// Opens a StreamingPull on `sub` with the given flow-control limit.
async fn open_stream(
    server: &str,
    client: &Client,
    sub: &str,
    max_outstanding: u64,
) -> anyhow::Result<PullStream> {
    client
        .streaming_pull(sub, max_outstanding)
        .await
        .map_err(|e| rpc_error(server, &format!("streaming pull {sub:?}"), e))
}

/// Reads `stream` and acks every message it delivers (one ack request per
/// response) until `expected` acks are confirmed OK, then ends the stream.
/// `on_message` sees each delivery with the time its response arrived.
async fn consume(
    server: &str,
    sub: &str,
    stream: PullStream,
    expected: u64,
    bar: &ProgressBar,
    mut on_message: impl FnMut(&ReceivedMessage, Instant),
) -> anyhow::Result<Consumed> {
    let (requests, mut responses) = stream;
    let mut c = Consumed {
        received: 0,
        acked: 0,
        redeliveries: 0,
        acks_not_ok: 0,
        last_ack: Instant::now(),
    };
    let what = format!("streaming pull {sub:?}");
    while c.acked < expected {
        let response = tokio::time::timeout(STALL_TIMEOUT, responses.message())
            .await
            .map_err(|_| {
                anyhow!(
                    "{what}: nothing received for {}s ({} of {expected} messages acked)",
                    STALL_TIMEOUT.as_secs(),
                    c.acked
                )
            })?
            .map_err(|e| rpc_error(server, &what, e))?;
        let Some(response) = response else {
            bail!(
                "{what}: the broker ended the stream after {} of {expected} acks",
                c.acked
            );
        };
        let now = Instant::now();
        let mut acked = 0;
        for r in &response.ack_results {
            if r.status == AckStatus::Ok as i32 {
                acked += 1;
            } else {
                c.acks_not_ok += 1;
            }
        }
        if acked > 0 {
            c.acked += acked;
            c.last_ack = now;
            bar.inc(acked);
        }
        let received = &response.received_messages;
        if received.is_empty() {
            continue;
        }
        for m in received {
            on_message(m, now);
            c.received += 1;
            if m.delivery_attempt > 1 {
                c.redeliveries += 1;
            }
        }
        for chunk in received.chunks(ACK_IDS_PER_REQUEST_MAX) {
            let ack = StreamingPullRequest {
                ack_ids: chunk.iter().map(|m| m.ack_id.clone()).collect(),
                ..StreamingPullRequest::default()
            };
            requests
                .send(ack)
                .await
                .map_err(|_| anyhow!("{what}: the stream closed while acking"))?;
        }
    }
    // Dropping the sender and the response stream ends the call; nothing
    // is outstanding any more.
    Ok(c)
}

// ---------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------

/// `publish`: 1 topic, 1 subscription; publish `messages` and time it until
/// the last confirmation.
async fn publish(ctx: &mut Ctx, p: &Params) -> anyhow::Result<PublishResult> {
    let (topic, _subs) = ctx.create("publish", 1).await?;
    let bar = ctx.bar(p.messages, "publish");
    let published = publish_all(ctx, &topic, p.messages, p, &bar).await?;
    Ok(PublishResult {
        topic,
        params: p.clone(),
        published: p.messages,
        elapsed_s: secs(published.elapsed),
        msgs_per_s: rate(p.messages, published.elapsed),
        mb_per_s: mb_rate(p.messages, p.size, published.elapsed),
        publish_calls: published.calls,
        publish_call_latency: Percentiles::of(&published.call_latency),
    })
}

/// `fanout`: 1 topic, `subscriptions` subscriptions; publish `messages`,
/// then drain every subscription at once, one stream each, and measure the
/// disk used per message.
async fn fanout(ctx: &mut Ctx, p: &Params) -> anyhow::Result<FanoutResult> {
    let (topic, subs) = ctx.create("fanout", p.subscriptions).await?;
    let topic_before = ctx.topic_stats(&topic).await?.retained_bytes;
    let dir_before = ctx.broker_stats().await?.data_dir_bytes;

    let bar = ctx.bar(p.messages, format!("fanout {}: publish", subs.len()));
    let published = publish_all(ctx, &topic, p.messages, p, &bar).await?;
    let topic_after_publish = ctx.topic_stats(&topic).await?.retained_bytes;
    let dir_after_publish = ctx.broker_stats().await?.data_dir_bytes;

    let expected = p.messages * subs.len() as u64;
    let bar = ctx.bar(expected, format!("fanout {}: drain", subs.len()));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, sub) in subs.iter().enumerate() {
        let stream = open_stream(
            &ctx.server,
            ctx.client(i),
            sub,
            p.max_outstanding_or_default(),
        )
        .await?;
        let (server, sub, bar) = (ctx.server.clone(), sub.clone(), bar.clone());
        let messages = p.messages;
        tasks.spawn(async move { consume(&server, &sub, stream, messages, &bar, |_, _| {}).await });
    }
    let mut total = Consumed {
        received: 0,
        acked: 0,
        redeliveries: 0,
        acks_not_ok: 0,
        last_ack: start,
    };
    let mut fastest = Duration::MAX;
    while let Some(joined) = tasks.join_next().await {
        let c = joined.context("consumer task")??;
        total.received += c.received;
        total.acked += c.acked;
        total.redeliveries += c.redeliveries;
        total.acks_not_ok += c.acks_not_ok;
        total.last_ack = total.last_ack.max(c.last_ack);
        fastest = fastest.min(c.last_ack - start);
    }
    let drain = total.last_ack - start;
    bar.finish_and_clear();
    let topic_after_drain = ctx.topic_stats(&topic).await?.retained_bytes;
    let dir_after_drain = ctx.broker_stats().await?.data_dir_bytes;

    Ok(FanoutResult {
        topic,
        params: p.clone(),
        published: p.messages,
        publish_elapsed_s: secs(published.elapsed),
        publish_msgs_per_s: rate(p.messages, published.elapsed),
        publish_mb_per_s: mb_rate(p.messages, p.size, published.elapsed),
        publish_call_latency: Percentiles::of(&published.call_latency),
        deliveries_expected: expected,
        deliveries_acked: total.acked,
        redeliveries: total.redeliveries,
        acks_not_ok: total.acks_not_ok,
        drain_elapsed_s: secs(drain),
        deliveries_acked_per_s: rate(total.acked, drain),
        deliveries_mb_per_s: mb_rate(total.acked, p.size, drain),
        fastest_subscription_s: secs(fastest),
        slowest_subscription_s: secs(drain),
        disk: DiskUsage {
            payload_bytes_per_message: p.size,
            topic_bytes_before: topic_before,
            topic_bytes_after_publish: topic_after_publish,
            topic_bytes_after_drain: topic_after_drain,
            topic_bytes_per_message: per_message(topic_before, topic_after_publish, p.messages),
            data_dir_bytes_before: dir_before,
            data_dir_bytes_after_publish: dir_after_publish,
            data_dir_bytes_after_drain: dir_after_drain,
            data_dir_bytes_per_message_published: per_message(
                dir_before,
                dir_after_publish,
                p.messages,
            ),
            data_dir_bytes_per_message_drained: per_message(
                dir_before,
                dir_after_drain,
                p.messages,
            ),
        },
    })
}

impl Params {
    fn max_outstanding_or_default(&self) -> u64 {
        self.max_outstanding.unwrap_or(DEFAULT_MAX_OUTSTANDING)
    }
}

/// Histograms of the latency workload's consumer.
struct LatencyRecorder {
    epoch: Instant,
    from_intended: Histogram<u64>,
    from_send: Histogram<u64>,
    malformed: u64,
}

impl LatencyRecorder {
    /// Records a first delivery: its payload starts with the intended and
    /// the actual send time, in nanoseconds since `epoch` (u64 LE each).
    fn record(&mut self, m: &ReceivedMessage, received: Instant) {
        if m.delivery_attempt != 1 {
            return;
        }
        let data = m.message.as_ref().map(|m| &m.data[..]).unwrap_or_default();
        if data.len() < LATENCY_HEADER_BYTES {
            self.malformed += 1;
            return;
        }
        let read = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let now = nanos_since(self.epoch, received);
        self.from_intended
            .saturating_record(now.saturating_sub(read(0)) / 1000);
        self.from_send
            .saturating_record(now.saturating_sub(read(8)) / 1000);
    }
}

fn nanos_since(epoch: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// `latency`: 1 subscription with a StreamingPull consumer acking each
/// message, while a publisher sends `rate` messages per second for
/// `duration`, in batches of `batch` on a fixed schedule. Latency runs from
/// each message's intended send time on that schedule (so a stalled
/// publisher cannot hide latency) to the arrival of the response carrying
/// it; the time from the actual send is reported too.
async fn latency(ctx: &mut Ctx, p: &Params) -> anyhow::Result<LatencyResult> {
    let (topic, subs) = ctx.create("latency", 1).await?;
    let sub = subs[0].clone();
    let total = p.messages;
    let rate_per_s = p.rate.unwrap_or(LATENCY_RATE);
    let batch = u64::from(p.batch);
    let calls = total.div_ceil(batch);
    let epoch = ctx.epoch;

    let bar = ctx.bar(total, "latency");
    let stream = open_stream(
        &ctx.server,
        ctx.client(0),
        &sub,
        p.max_outstanding_or_default(),
    )
    .await?;
    let consumer = {
        let (server, bar) = (ctx.server.clone(), bar.clone());
        tokio::spawn(async move {
            let mut rec = LatencyRecorder {
                epoch,
                from_intended: histogram(),
                from_send: histogram(),
                malformed: 0,
            };
            let c = consume(&server, &sub, stream, total, &bar, |m, at| {
                rec.record(m, at)
            })
            .await?;
            anyhow::Ok((c, rec))
        })
    };
    // Abort the consumer if publishing fails.
    let consumer = AbortOnDrop(consumer);

    let base = payload(p.size);
    let permits = Arc::new(Semaphore::new(
        usize::try_from(p.in_flight.max(batch))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS),
    ));
    // Message k is due at start + k / rate; call i sends messages
    // i*batch .. (i+1)*batch, due at the first one's time.
    let start = tokio::time::Instant::now();
    let due = |i: u64| {
        let nanos = u128::from(i * batch) * 1_000_000_000 / u128::from(rate_per_s);
        start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    };
    let mut ticker = tokio::time::interval_at(start, due(1) - start);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    let mut call_latency = histogram();
    let mut max_lag = Duration::ZERO;
    let mut last_send = start;
    let collect = |joined: Result<anyhow::Result<Duration>, tokio::task::JoinError>,
                   h: &mut Histogram<u64>|
     -> anyhow::Result<()> {
        let took = joined.context("publisher task")??;
        h.saturating_record(micros(took));
        Ok(())
    };
    for i in 0..calls {
        ticker.tick().await;
        let intended = due(i);
        let n = batch.min(total - i * batch);
        let permit = permits
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .context("publish permits")?;
        let sent = tokio::time::Instant::now();
        max_lag = max_lag.max(sent.saturating_duration_since(intended));
        last_send = sent;
        let header_intended = nanos_since(epoch, intended.into_std());
        let header_sent = nanos_since(epoch, sent.into_std());
        let messages: Vec<PublishMessage> = (0..n)
            .map(|_| {
                let mut data = BytesMut::with_capacity(base.len());
                data.put_u64_le(header_intended);
                data.put_u64_le(header_sent);
                data.extend_from_slice(&base[LATENCY_HEADER_BYTES..]);
                PublishMessage {
                    data: data.freeze(),
                    ..PublishMessage::default()
                }
            })
            .collect();
        let client = ctx.client(i as usize).clone();
        let (topic, server) = (topic.clone(), ctx.server.clone());
        tasks.spawn(async move {
            let t = Instant::now();
            let ids = client
                .publish(&topic, messages)
                .await
                .map_err(|e| rpc_error(&server, &format!("publish to {topic:?}"), e))?;
            drop(permit);
            if ids.len() as u64 != n {
                bail!("publish to {topic:?}: {} ids for {n} messages", ids.len());
            }
            anyhow::Ok(t.elapsed())
        });
        while let Some(joined) = tasks.try_join_next() {
            collect(joined, &mut call_latency)?;
        }
    }
    while let Some(joined) = tasks.join_next().await {
        collect(joined, &mut call_latency)?;
    }
    let send_span = last_send.saturating_duration_since(start);
    let (consumed, rec) = consumer.join().await.context("consumer task")??;
    bar.finish_and_clear();

    // Calls 0 .. calls-1 are (calls - 1) intervals apart, each of `batch`
    // messages.
    let achieved = if calls < 2 {
        0.0
    } else {
        rate((calls - 1) * batch, send_span)
    };
    Ok(LatencyResult {
        topic,
        params: p.clone(),
        measured_from: "intended send time on the fixed schedule (coordinated omission corrected)",
        sent: total,
        received: rec.from_intended.len(),
        acked: consumed.acked,
        redeliveries: consumed.redeliveries,
        malformed: rec.malformed,
        achieved_rate: achieved,
        max_send_lag_ms: round(max_lag.as_secs_f64() * 1000.0, 3),
        latency: Percentiles::of(&rec.from_intended),
        latency_from_send: Percentiles::of(&rec.from_send),
        publish_call_latency: Percentiles::of(&call_latency),
    })
}

/// A task aborted when dropped (so an error elsewhere stops it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `drain`: publish `messages` (untimed), then one StreamingPull consumer
/// acks them all; time from opening the stream to the last ack confirmed.
async fn drain(ctx: &mut Ctx, p: &Params) -> anyhow::Result<DrainResult> {
    let (topic, subs) = ctx.create("drain", 1).await?;
    let bar = ctx.bar(p.messages, "drain: prefill");
    let prefill = publish_all(ctx, &topic, p.messages, p, &bar).await?;

    let bar = ctx.bar(p.messages, "drain");
    let start = Instant::now();
    let stream = open_stream(
        &ctx.server,
        ctx.client(0),
        &subs[0],
        p.max_outstanding_or_default(),
    )
    .await?;
    let c = consume(&ctx.server, &subs[0], stream, p.messages, &bar, |_, _| {}).await?;
    let elapsed = c.last_ack - start;
    bar.finish_and_clear();
    Ok(DrainResult {
        topic,
        params: p.clone(),
        prefilled: p.messages,
        prefill_elapsed_s: secs(prefill.elapsed),
        prefill_msgs_per_s: rate(p.messages, prefill.elapsed),
        drained: c.acked,
        redeliveries: c.redeliveries,
        acks_not_ok: c.acks_not_ok,
        elapsed_s: secs(elapsed),
        msgs_per_s: rate(c.acked, elapsed),
        mb_per_s: mb_rate(c.acked, p.size, elapsed),
    })
}

/// `backlog`: publish `messages` with one idle subscription, then read
/// the broker's memory and disk use; with a spawned broker, stop it with
/// SIGTERM, start it again and time the restart and the first delivery.
async fn backlog(ctx: &mut Ctx, p: &Params) -> anyhow::Result<BacklogResult> {
    let (topic, subs) = ctx.create("backlog", 1).await?;
    let bar = ctx.bar(p.messages, "backlog: publish");
    let published = publish_all(ctx, &topic, p.messages, p, &bar).await?;
    let stats = ctx.broker_stats().await?;
    let topic_stats = ctx.topic_stats(&topic).await?;
    let vm_rss_bytes = ctx.spawned.as_ref().and_then(|b| vm_rss_bytes(b.pid()));

    let restart = if ctx.spawned.is_some() {
        Some(restart(ctx, &subs[0]).await?)
    } else {
        None
    };
    Ok(BacklogResult {
        topic,
        params: p.clone(),
        published: p.messages,
        publish_elapsed_s: secs(published.elapsed),
        publish_msgs_per_s: rate(p.messages, published.elapsed),
        publish_mb_per_s: mb_rate(p.messages, p.size, published.elapsed),
        resident_memory_bytes: stats.resident_memory_bytes,
        vm_rss_bytes,
        data_dir_bytes: stats.data_dir_bytes,
        topic_bytes: topic_stats.retained_bytes,
        topic_bytes_per_message: per_message(0, topic_stats.retained_bytes, p.messages),
        restart_measured: restart.is_some(),
        restart,
    })
}

/// Stops the spawned broker, starts it on the same data directory, and
/// waits for the first delivery from `sub`.
async fn restart(ctx: &mut Ctx, sub: &str) -> anyhow::Result<RestartResult> {
    let bar = ctx.bar(1, "backlog: restart");
    let Some(broker) = ctx.spawned.as_mut() else {
        bail!("restart needs --spawn-broker");
    };
    let (shutdown, status) = broker.stop().await?;
    let spawned_at = Instant::now();
    let restarted = broker.restart().await?;
    let listening_at = spawned_at + restarted;
    let url = broker.url();
    let pid = broker.pid();
    ctx.reconnect(&url).await?;
    let what = format!("pull {sub:?}");
    loop {
        let waited = listening_at.elapsed();
        if waited > FIRST_DELIVERY_TIMEOUT {
            bail!("{what}: no message {}s after the restart", waited.as_secs());
        }
        let received = ctx
            .client(0)
            .pull(sub, 1, crate::broker::config::PULL_WAIT_MS_MAX)
            .await
            .map_err(ctx.err(&what))?;
        if !received.is_empty() {
            break;
        }
    }
    let delivered_at = Instant::now();
    bar.finish_and_clear();
    let stats = ctx.broker_stats().await?;
    Ok(RestartResult {
        shutdown_s: secs(shutdown),
        shutdown_exit_code: status.code(),
        restart_s: secs(restarted),
        first_delivery_after_listening_s: secs(delivered_at - listening_at),
        first_delivery_after_spawn_s: secs(delivered_at - spawned_at),
        resident_memory_bytes: stats.resident_memory_bytes,
        vm_rss_bytes: vm_rss_bytes(pid),
        data_dir_bytes: stats.data_dir_bytes,
    })
}

/// VmRSS of a local process, from /proc/<pid>/status.
fn vm_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------
// A broker process of our own (--spawn-broker)
// ---------------------------------------------------------------------------

/// A `courier serve` child process on 127.0.0.1 with its own data
/// directory. Dropping it kills the process.
struct SpawnedBroker {
    exe: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
    addr: String,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl SpawnedBroker {
    /// Starts the broker and waits for its listening line; returns it with
    /// the time from spawn to that line.
    async fn start(exe: &Path, data_dir: &Path) -> anyhow::Result<(SpawnedBroker, Duration)> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut broker = SpawnedBroker {
            exe: exe.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            child: None,
            addr: String::new(),
            stderr_tail: Arc::new(Mutex::new(VecDeque::new())),
        };
        let took = broker.restart().await?;
        Ok((broker, took))
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn tail(&self) -> String {
        let tail = self.stderr_tail.lock();
        tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// Spawns `courier serve --listen 127.0.0.1:0 --data-dir DIR` and waits
    /// for `listening on ADDR` on its stderr; returns spawn-to-line time.
    async fn restart(&mut self) -> anyhow::Result<Duration> {
        let spawned_at = Instant::now();
        let mut child = std::process::Command::new(&self.exe)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--log-format")
            .arg("human")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} serve", self.exe.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("the broker's stderr is not piped"))?;
        self.child = Some(child);
        let (tx, rx) = oneshot::channel();
        let tail = self.stderr_tail.clone();
        tail.lock().clear();
        // Reads stderr to the end (so the broker never blocks on a full
        // pipe), reporting the listening address once.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut tail = tail.lock();
                if tail.len() == BROKER_STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        match tokio::time::timeout(BROKER_START_TIMEOUT, rx).await {
            Ok(Ok(addr)) => {
                self.addr = addr;
                Ok(spawned_at.elapsed())
            }
            Ok(Err(_)) => {
                let status = self.child.as_mut().and_then(|c| c.wait().ok());
                self.child = None;
                bail!(
                    "the spawned broker exited before listening ({}): {}",
                    status.map_or("unknown status".to_string(), |s| s.to_string()),
                    self.tail()
                )
            }
            Err(_) => bail!(
                "the spawned broker did not listen within {}s: {}",
                BROKER_START_TIMEOUT.as_secs(),
                self.tail()
            ),
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns the time
    /// that took and the exit status.
    async fn stop(&mut self) -> anyhow::Result<(Duration, ExitStatus)> {
        let Some(mut child) = self.child.take() else {
            bail!("the spawned broker is not running");
        };
        let pid = libc::pid_t::try_from(child.id()).context("broker pid")?;
        let start = Instant::now();
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own child, not yet reaped.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            let e = std::io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            bail!("sending SIGTERM to the spawned broker: {e}");
        }
        let waiter = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            (child, status)
        });
        match tokio::time::timeout(BROKER_STOP_TIMEOUT, waiter).await {
            Ok(Ok((_, Ok(status)))) => Ok((start.elapsed(), status)),
            Ok(Ok((_, Err(e)))) => Err(anyhow!("waiting for the spawned broker: {e}")),
            Ok(Err(e)) => Err(anyhow!("waiting for the spawned broker: {e}")),
            Err(_) => {
                // The waiter still owns the child; kill it by pid.
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                bail!(
                    "the spawned broker did not exit within {}s of SIGTERM; killed it: {}",
                    BROKER_STOP_TIMEOUT.as_secs(),
                    self.tail()
                )
            }
        }
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The address in the broker's `... listening on ADDR ...` log line.
fn listening_addr(line: &str) -> Option<String> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let addr = rest.split_whitespace().next()?;
    Some(addr.trim_end_matches([',', ')']).to_string())
}

/// Appends `line` and a newline to `path`, creating it if needed.
fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // One write call, so concurrent appenders do not interleave lines.
    file.write_all(format!("{line}\n").as_bytes())
        .with_context(|| format!("appending to {}", path.display()))
}

// ---------------------------------------------------------------------------
// Human output
// ---------------------------------------------------------------------------

/// Aligned `  key: value` lines under a heading.
struct Section {
    lines: Vec<String>,
    fields: Vec<(String, String)>,
}

impl Section {
    fn new(heading: String) -> Section {
        Section {
            lines: vec![heading],
            fields: Vec::new(),
        }
    }

    fn field(&mut self, key: &str, value: impl Display) -> &mut Section {
        self.fields.push((key.to_string(), value.to_string()));
        self
    }

    fn finish(&mut self) -> Vec<String> {
        let width = self.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut lines = std::mem::take(&mut self.lines);
        for (k, v) in self.fields.drain(..) {
            lines.push(format!("  {k}:{:pad$} {v}", "", pad = width - k.len()));
        }
        lines
    }
}

/// `12345.6` as `12,346`.
fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Params {
    fn human(&self) -> String {
        let mut s = format!(
            "{} messages x {} B, batch {}, {} in flight, {} connections",
            thousands(self.messages as f64),
            self.size,
            self.batch,
            self.in_flight,
            self.connections
        );
        if let Some(n) = self.max_outstanding {
            s.push_str(&format!(", max outstanding {n}"));
        }
        s
    }
}

impl Report {
    /// The human summary, one line per element.
    fn human(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "courier bench {}: broker {} at {} (fsync {}), {} CPUs on this host, {}",
            self.workload.name(),
            self.broker.version,
            self.server,
            self.broker.fsync_mode,
            self.host.cpus,
            self.timestamp
        )];
        for r in &self.results {
            lines.push(String::new());
            lines.extend(r.human());
        }
        if let Some(chart) = &self.chart {
            lines.push(String::new());
            lines.push(format!("chart written to {chart}"));
        }
        lines
    }
}

impl WorkloadResult {
    fn human(&self) -> Vec<String> {
        match self {
            WorkloadResult::Publish(r) => Section::new(format!("publish: {}", r.params.human()))
                .field(
                    "published",
                    format!("{} in {:.2} s", thousands(r.published as f64), r.elapsed_s),
                )
                .field(
                    "throughput",
                    format!("{} msgs/s, {:.2} MB/s", thousands(r.msgs_per_s), r.mb_per_s),
                )
                .field("publish call", r.publish_call_latency.human())
                .finish(),
            WorkloadResult::Fanout(r) => Section::new(format!(
                "fanout, {}: {}",
                count(u64::from(r.params.subscriptions), "subscription"),
                r.params.human()
            ))
            .field(
                "publish",
                format!(
                    "{} msgs/s, {:.2} MB/s ({:.2} s)",
                    thousands(r.publish_msgs_per_s),
                    r.publish_mb_per_s,
                    r.publish_elapsed_s
                ),
            )
            .field(
                "deliveries acked",
                format!(
                    "{} msgs/s, {:.2} MB/s ({} in {:.2} s; subscriptions done after {:.2}-{:.2} s)",
                    thousands(r.deliveries_acked_per_s),
                    r.deliveries_mb_per_s,
                    thousands(r.deliveries_acked as f64),
                    r.drain_elapsed_s,
                    r.fastest_subscription_s,
                    r.slowest_subscription_s
                ),
            )
            .field(
                "redeliveries",
                format!("{} (acks not ok: {})", r.redeliveries, r.acks_not_ok),
            )
            .field(
                "topic log",
                format!(
                    "{:.1} B/message ({} payload)",
                    r.disk.topic_bytes_per_message, r.disk.payload_bytes_per_message
                ),
            )
            .field(
                "data dir growth",
                format!(
                    "{:.1} B/message after publish, {:.1} B/message after drain",
                    r.disk.data_dir_bytes_per_message_published,
                    r.disk.data_dir_bytes_per_message_drained
                ),
            )
            .finish(),
            WorkloadResult::Latency(r) => Section::new(format!(
                "latency: {} msgs/s for {:.1} s, {} B, batch {}, {} in flight, {} connections",
                thousands(r.params.rate.unwrap_or(0) as f64),
                r.params.duration_ms.unwrap_or(0) as f64 / 1000.0,
                r.params.size,
                r.params.batch,
                r.params.in_flight,
                r.params.connections
            ))
            .field(
                "sent",
                format!(
                    "{} (achieved {} msgs/s, max send lag {:.2} ms)",
                    thousands(r.sent as f64),
                    thousands(r.achieved_rate),
                    r.max_send_lag_ms
                ),
            )
            .field(
                "received",
                format!(
                    "{} (redeliveries {}, acked {})",
                    thousands(r.received as f64),
                    r.redeliveries,
                    thousands(r.acked as f64)
                ),
            )
            .field("latency (intended)", r.latency.human())
            .field("latency (actual)", r.latency_from_send.human())
            .field("publish call", r.publish_call_latency.human())
            .finish(),
            WorkloadResult::Drain(r) => Section::new(format!("drain: {}", r.params.human()))
                .field(
                    "prefill",
                    format!(
                        "{} in {:.2} s ({} msgs/s, untimed)",
                        thousands(r.prefilled as f64),
                        r.prefill_elapsed_s,
                        thousands(r.prefill_msgs_per_s)
                    ),
                )
                .field(
                    "drained",
                    format!(
                        "{} in {:.2} s: {} msgs/s, {:.2} MB/s",
                        thousands(r.drained as f64),
                        r.elapsed_s,
                        thousands(r.msgs_per_s),
                        r.mb_per_s
                    ),
                )
                .field(
                    "redeliveries",
                    format!("{} (acks not ok: {})", r.redeliveries, r.acks_not_ok),
                )
                .finish(),
            WorkloadResult::Backlog(r) => {
                let mut s = Section::new(format!("backlog: {}", r.params.human()));
                s.field(
                    "publish",
                    format!(
                        "{} msgs/s, {:.2} MB/s ({:.2} s)",
                        thousands(r.publish_msgs_per_s),
                        r.publish_mb_per_s,
                        r.publish_elapsed_s
                    ),
                )
                .field(
                    "broker memory",
                    format!(
                        "{} resident{}",
                        mib(r.resident_memory_bytes),
                        r.vm_rss_bytes
                            .map_or(String::new(), |b| format!(" (VmRSS {})", mib(b)))
                    ),
                )
                .field(
                    "disk",
                    format!(
                        "data dir {}, topic {} ({:.1} B/message)",
                        mib(r.data_dir_bytes),
                        mib(r.topic_bytes),
                        r.topic_bytes_per_message
                    ),
                );
                match &r.restart {
                    Some(x) => {
                        s.field(
                            "shutdown",
                            format!(
                                "{:.2} s after SIGTERM (exit code {})",
                                x.shutdown_s,
                                x.shutdown_exit_code
                                    .map_or("none".to_string(), |c| c.to_string())
                            ),
                        )
                        .field(
                            "restart",
                            format!("listening {:.2} s after spawn", x.restart_s),
                        )
                        .field(
                            "first delivery",
                            format!(
                                "{:.3} s after listening, {:.2} s after spawn",
                                x.first_delivery_after_listening_s, x.first_delivery_after_spawn_s
                            ),
                        )
                        .field(
                            "after restart",
                            format!(
                                "{} resident{}, data dir {}",
                                mib(x.resident_memory_bytes),
                                x.vm_rss_bytes
                                    .map_or(String::new(), |b| format!(" (VmRSS {})", mib(b))),
                                mib(x.data_dir_bytes)
                            ),
                        );
                    }
                    None => {
                        s.field("restart", "not measured (needs --spawn-broker)");
                    }
                }
                s.finish()
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The fanout chart
// ---------------------------------------------------------------------------

/// One fanout run on the chart.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ChartPoint {
    subscriptions: u32,
    publish_msgs_per_s: f64,
    deliveries_acked_per_s: f64,
}

fn chart_points(results: &[WorkloadResult]) -> Vec<ChartPoint> {
    let mut points: Vec<ChartPoint> = results
        .iter()
        .filter_map(|r| match r {
            WorkloadResult::Fanout(f) => Some(ChartPoint {
                subscriptions: f.params.subscriptions,
                publish_msgs_per_s: f.publish_msgs_per_s,
                deliveries_acked_per_s: f.deliveries_acked_per_s,
            }),
            _ => None,
        })
        .collect();
    points.sort_by_key(|p| p.subscriptions);
    points
}

/// The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10^k) at
/// least `x` (and at least 1): an axis maximum whose fifths are round too.
fn nice_ceiling(x: f64) -> f64 {
    if x <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(x.log10().floor());
    for step in [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if step * magnitude >= x {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

/// A rate for an axis label: `500`, `25k`, `1.5M`.
fn short_rate(x: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if x >= 1e6 {
        format!("{}M", trim(format!("{:.2}", x / 1e6)))
    } else if x >= 1e3 {
        format!("{}k", trim(format!("{:.1}", x / 1e3)))
    } else {
        trim(format!("{x:.1}"))
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A chart series: legend label, colour, value of a point.
type Series = (&'static str, &'static str, fn(&ChartPoint) -> f64);

/// A line chart of publish msgs/s and deliveries acked/s against the
/// number of subscriptions, as standalone SVG text.
fn chart_svg(points: &[ChartPoint], fsync_mode: &str) -> String {
    const W: f64 = 760.0;
    const H: f64 = 490.0;
    const LEFT: f64 = 90.0;
    const RIGHT: f64 = 30.0;
    const TOP: f64 = 60.0;
    const BOTTOM: f64 = 100.0;
    const Y_TICKS: u32 = 5;
    let series: [Series; 2] = [
        ("publish msgs/s", "#1f77b4", |p| p.publish_msgs_per_s),
        ("deliveries acked/s (all subscriptions)", "#d62728", |p| {
            p.deliveries_acked_per_s
        }),
    ];
    let x_max = f64::from(
        points
            .iter()
            .map(|p| p.subscriptions)
            .max()
            .unwrap_or(1)
            .max(1),
    );
    let y_top = points
        .iter()
        .flat_map(|p| [p.publish_msgs_per_s, p.deliveries_acked_per_s])
        .fold(0.0, f64::max);
    let y_max = nice_ceiling(y_top * 1.05);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |subs: u32| LEFT + f64::from(subs) / x_max * pw;
    let y = |v: f64| TOP + ph - v / y_max * ph;

    let mut svg = String::new();
    let mut put = |s: String| {
        svg.push_str(&s);
        svg.push('\n');
    };
    put(format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    ));
    put(format!(r#"<rect width="{W}" height="{H}" fill="white"/>"#));
    put(format!(
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">courier bench fanout: throughput vs subscriptions</text>"#,
        W / 2.0
    ));
    put(format!(
        r##"<text x="{}" y="46" text-anchor="middle" fill="#555">fsync {}; publish = messages confirmed/s; deliveries = acks confirmed/s summed over subscriptions</text>"##,
        W / 2.0,
        xml_escape(fsync_mode)
    ));
    // Horizontal grid lines and y tick labels.
    for i in 0..=Y_TICKS {
        let v = y_max * f64::from(i) / f64::from(Y_TICKS);
        let yy = y(v);
        put(format!(
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
            LEFT + pw
        ));
        put(format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            yy + 4.0,
            short_rate(v)
        ));
    }
    // Axes.
    put(format!(
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="black"/>"#,
        TOP + ph
    ));
    put(format!(
        r#"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        TOP + ph,
        LEFT + pw,
        TOP + ph
    ));
    // X ticks at each measured subscription count, plus 0.
    let mut ticks: Vec<u32> = points.iter().map(|p| p.subscriptions).collect();
    ticks.insert(0, 0);
    ticks.dedup();
    for t in ticks {
        let xx = x(t);
        put(format!(
            r#"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="black"/>"#,
            TOP + ph,
            TOP + ph + 5.0
        ));
        put(format!(
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t}</text>"#,
            TOP + ph + 20.0
        ));
    }
    put(format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">subscriptions</text>"#,
        LEFT + pw / 2.0,
        TOP + ph + 42.0
    ));
    put(format!(
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">messages / s</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    ));
    // The series: a polyline and a dot per point.
    for (_, color, value) in &series {
        let coords: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.subscriptions), y(value(p))))
            .collect();
        put(format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            coords.join(" ")
        ));
        for p in points {
            put(format!(
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{} subscriptions: {:.0}/s</title></circle>"#,
                x(p.subscriptions),
                y(value(p)),
                p.subscriptions,
                value(p)
            ));
        }
    }
    // Legend, in one row below the axis label, outside the plot.
    let ly = TOP + ph + 72.0;
    let mut lx = LEFT;
    for (label, color, _) in &series {
        put(format!(
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/>"#,
            lx + 24.0
        ));
        put(format!(
            r#"<circle cx="{:.1}" cy="{ly:.1}" r="3.5" fill="{color}"/>"#,
            lx + 12.0
        ));
        put(format!(
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 32.0,
            ly + 4.0,
            xml_escape(label)
        ));
        lx += 32.0 + 7.0 * label.len() as f64 + 30.0;
    }
    put("</svg>".to_string());
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(argv: &[&str]) -> BenchArgs {
        let mut full = vec!["bench"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).expect("parses").bench
    }

    #[test]
    fn defaults_follow_the_documented_workloads() {
        let args = parse(&[]);
        assert_eq!(args.workload, Workload::Publish);
        assert_eq!(args.steps(), vec![Step::Publish]);
        let p = args.params(Step::Publish);
        assert_eq!(
            (p.messages, p.size, p.batch, p.in_flight),
            (200_000, 256, 100, 1000)
        );
        assert_eq!(p.publish_concurrency, 10);

        let args = parse(&["--workload", "latency"]);
        let p = args.params(Step::Latency);
        assert_eq!(
            (p.rate, p.duration_ms, p.batch),
            (Some(5000), Some(10_000), 5)
        );
        assert_eq!(p.messages, 50_000);

        let args = parse(&["--workload", "latency", "--rate", "500", "--duration", "1s"]);
        let p = args.params(Step::Latency);
        assert_eq!((p.messages, p.batch), (500, 1));

        let args = parse(&["--workload", "backlog"]);
        assert_eq!(args.params(Step::Backlog).messages, 10_000_000);
    }

    #[test]
    fn all_runs_fanout_with_one_and_ten_subscriptions() {
        let args = parse(&["--workload", "all"]);
        assert_eq!(
            args.steps(),
            vec![
                Step::Publish,
                Step::Fanout { subscriptions: 1 },
                Step::Fanout { subscriptions: 10 },
                Step::Latency,
                Step::Drain,
            ]
        );
        let args = parse(&["--workload", "all", "--spawn-broker"]);
        assert_eq!(args.steps().last(), Some(&Step::Backlog));
        assert_eq!(args.spawn_broker, Some(None));
        let args = parse(&["--workload", "fanout", "--chart", "x.svg"]);
        assert_eq!(args.steps().len(), 5);
    }

    #[test]
    fn flags_for_other_workloads_are_usage_errors() {
        assert!(parse(&["--rate", "10"]).check().is_err());
        assert!(
            parse(&["--workload", "latency", "--messages", "10"])
                .check()
                .is_err()
        );
        assert!(parse(&["--chart", "x.svg"]).check().is_err());
        assert!(
            parse(&[
                "--workload",
                "fanout",
                "--chart",
                "x.svg",
                "--subscriptions",
                "3"
            ])
            .check()
            .is_err()
        );
        assert!(
            parse(&["--workload", "all", "--rate", "10", "--messages", "5"])
                .check()
                .is_ok()
        );
    }

    #[test]
    fn the_listening_line_gives_the_address() {
        let line = "2025-01-01T00:00:00.000000Z  INFO courier::cli::serve: courier listening on 127.0.0.1:40123 (data dir /tmp/x, fsync always)";
        assert_eq!(listening_addr(line).as_deref(), Some("127.0.0.1:40123"));
        assert_eq!(listening_addr("starting"), None);
    }

    #[test]
    fn numbers_for_humans_and_axes() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(short_rate(25_000.0), "25k");
        assert_eq!(short_rate(1_500_000.0), "1.5M");
        assert_eq!(short_rate(0.0), "0");
        assert_eq!(nice_ceiling(73_000.0), 80_000.0);
        assert_eq!(nice_ceiling(593_000.0), 600_000.0);
        assert_eq!(nice_ceiling(151.0), 200.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn the_chart_has_axes_legend_and_both_series() {
        let points: Vec<ChartPoint> = CHART_SUBSCRIPTIONS
            .iter()
            .map(|&n| ChartPoint {
                subscriptions: n,
                publish_msgs_per_s: 50_000.0,
                deliveries_acked_per_s: 10_000.0 * f64::from(n),
            })
            .collect();
        let svg = chart_svg(&points, "always");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 10 + 2);
        assert!(svg.contains(">subscriptions</text>"));
        assert!(svg.contains("publish msgs/s"));
        assert!(svg.contains(">200k</text>"));
    }

    #[test]
    fn latency_payloads_round_trip_their_timestamps() {
        let epoch = Instant::now();
        let mut rec = LatencyRecorder {
            epoch,
            from_intended: histogram(),
            from_send: histogram(),
            malformed: 0,
        };
        let mut data = BytesMut::new();
        data.put_u64_le(0);
        data.put_u64_le(1_000_000);
        let m = ReceivedMessage {
            ack_id: "0-1".into(),
            delivery_attempt: 1,
            message: Some(crate::api::pb::v1::Message {
                data: data.freeze(),
                ..Default::default()
            }),
        };
        rec.record(&m, epoch + Duration::from_millis(5));
        let (intended, sent) = (&rec.from_intended, &rec.from_send);
        assert!(intended.equivalent(intended.max(), 5000));
        assert!(sent.equivalent(sent.max(), 4000));
        let short = ReceivedMessage {
            message: Some(crate::api::pb::v1::Message::default()),
            ..m
        };
        rec.record(&short, epoch);
        assert_eq!(rec.malformed, 1);
    }
}

//! `courier bench`: a load generator for a running broker, in the spirit of
//! `nats bench` and `redis-benchmark`. It drives the broker only through the
//! public gRPC API (Publisher, Subscriber, Admin) with fixed, documented
//! workloads (`publish`, `fanout`, `latency`, `drain`, `backlog`, or `all`
//! of them in sequence), shows a progress bar on stderr while running, and
//! prints a human summary or, with `--json`, one JSON object (`Report`)
//! on stdout; `--record FILE` appends that object as one line to FILE so
//! runs can be compared over time, and `--chart FILE.svg` sweeps fanout over
//! 1, 2, 5, 10 and 20 subscriptions and draws the result. Every workload
//! runs on fresh topics named `bench-<workload>-<random>`, deleted at the
//! end unless `--keep`. With `--spawn-broker` the bench starts (and, for
//! `backlog`, restarts) its own broker in a temporary data directory.
//! docs/bench.md describes each workload, flag and JSON field.
//!
//! This file holds the clap arguments, the workload defaults, and the run:
//! flags to `Step`s, each step's `Params`, dispatch to the workloads, and
//! the report at the end. The rest of the module, by role:
//!
//! - `ctx`: `Ctx`, the connections, progress bars and bench topics every
//!   workload shares;
//! - `traffic`: publishing at full speed and consuming over StreamingPull;
//! - `stats`: histograms, rates and rounding, and `Percentiles`;
//! - `throughput` (`publish`, `fanout`, `drain`), `latency` and `backlog`:
//!   the workloads, each returning its result struct;
//! - `report`: the JSON report, its result structs, the human summary and
//!   `--record`;
//! - `chart`: the `--chart` SVG;
//! - `spawn`: the broker process of `--spawn-broker`.

mod backlog;
mod chart;
mod ctx;
mod latency;
mod report;
mod scale;
mod slow;
mod spawn;
mod stats;
mod throughput;
mod traffic;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow};
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::UsageError;
use super::conn::Conn;
use super::output::Output;
use super::parse;
use crate::broker::config::{PUBLISH_BATCH_MESSAGES_MAX, STREAM_OUTSTANDING_MESSAGES_MAX};
use crate::client::GRPC_MESSAGE_BYTES_MAX;
use ctx::{Ctx, random_hex};
use report::{BrokerInfo, HostInfo, Params, Report, WorkloadResult, append_line};
use spawn::SpawnedBroker;
use stats::round;

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
const DEFAULT_SIZE: u64 = 256;
/// The `slow-consumers` workload: messages, their size, bytes per Publish
/// call, and silent streams.
const SLOW_MESSAGES: u64 = 300;
const SLOW_SIZE: u64 = 1024 * 1024;
const SLOW_BATCH_BYTES: u64 = 4 * 1024 * 1024;
const SLOW_STREAMS: u32 = 6;
const SLOW_STREAMS_MAX: i64 = 1_000;
/// Default messages per Publish call of the throughput workloads, fewer
/// when that would make a call larger than [`DEFAULT_BATCH_BYTES`].
const DEFAULT_BATCH: u32 = 100;
/// Payload bytes a default-sized Publish call carries at most.
const DEFAULT_BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// The default batch for messages of `size` bytes.
fn default_batch(size: u64) -> u32 {
    u32::try_from((DEFAULT_BATCH_BYTES / size.max(1)).clamp(1, u64::from(DEFAULT_BATCH)))
        .unwrap_or(1)
}
/// Default most unconfirmed messages per publisher.
const DEFAULT_IN_FLIGHT: u64 = 1_000;
/// Default gRPC connections.
const DEFAULT_CONNECTIONS: u32 = 4;
/// Default StreamingPull `max_outstanding_messages`.
const DEFAULT_MAX_OUTSTANDING: u64 = 1_000;
/// The latency workload writes two u64 timestamps at the head of each
/// payload, so its payloads are at least this long.
const LATENCY_HEADER_BYTES: usize = 16;
/// Upper bounds of the numeric flags.
const RATE_MAX: u64 = 10_000_000;
const CONNECTIONS_MAX: i64 = 64;
const SUBSCRIPTIONS_MAX: i64 = 1_000;
const TOPICS_MAX: i64 = 100_000;

/// How the bench's publishers publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishApi {
    /// Unary Publish calls of --batch messages.
    #[default]
    Unary,
    /// One message per call of courier::client::Publisher, which batches them onto a PublishStream.
    Stream,
}

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
    /// StreamingPull consumers that never read: the broker's memory while they hold on and after.
    #[serde(rename = "slow-consumers")]
    SlowConsumers,
    /// publish, fanout (1 and 10 subscriptions), latency, drain; backlog with --spawn-broker.
    All,
    /// Curves: publish vs topics (1..10000, stream publisher), fanout vs subscriptions (1..1000), publish vs size (256 B..1 MiB); then 10000 idle topics, restarted with --spawn-broker.
    Scale,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Publish => "publish",
            Workload::Fanout => "fanout",
            Workload::Latency => "latency",
            Workload::Drain => "drain",
            Workload::Backlog => "backlog",
            Workload::SlowConsumers => "slow-consumers",
            Workload::All => "all",
            Workload::Scale => "scale",
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
    /// Messages to publish [default: publish 200000, fanout 100000, drain 200000, backlog 10000000, slow-consumers 300]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: Option<u64>,
    /// Payload size of each message, e.g. 256 or 4KiB [default: 256; slow-consumers 1MiB]
    #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
    pub size: Option<u64>,
    /// slow-consumers: StreamingPull streams that never read [default: 6]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=SLOW_STREAMS_MAX))]
    pub streams: Option<u32>,
    /// publish: topics the publishers spread over, one subscription each [default: 1]
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=TOPICS_MAX))]
    pub topics: Option<u32>,
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
    /// How publishers publish: unary (Publish calls of --batch messages) or stream (one message per call of the batching client Publisher over PublishStream; --in-flight publishers)
    #[arg(long, value_enum, value_name = "API", default_value_t = PublishApi::Unary)]
    pub publisher: PublishApi,
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
    SlowConsumers,
    Scale,
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
                let svg = match self.workload {
                    Workload::Scale => chart::scale_svg(&results, &broker.fsync_mode),
                    _ => chart::chart_svg(&chart::chart_points(&results), &broker.fsync_mode),
                };
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
            &[Publish, Fanout, Drain, Backlog, SlowConsumers, All, Scale],
        )?;
        unused(
            "--subscriptions",
            self.subscriptions.is_some(),
            &[Fanout, All, Scale],
        )?;
        unused("--topics", self.topics.is_some(), &[Publish, Scale])?;
        unused("--rate", self.rate.is_some(), &[Latency, All])?;
        unused("--streams", self.streams.is_some(), &[SlowConsumers])?;
        unused("--duration", self.duration.is_some(), &[Latency, All])?;
        unused("--chart", self.chart.is_some(), &[Fanout, All, Scale])?;
        unused(
            "--max-outstanding",
            self.max_outstanding != DEFAULT_MAX_OUTSTANDING,
            &[Fanout, Latency, Drain, All],
        )?;
        if let (Some(batch), Some(size)) = (self.batch, self.size) {
            // Each message adds a few bytes of framing to its payload.
            let bytes = u64::from(batch).saturating_mul(size.saturating_add(64));
            if bytes > GRPC_MESSAGE_BYTES_MAX as u64 {
                return Err(UsageError(format!(
                    "--batch {batch} of --size {size} bytes makes Publish calls of {bytes} bytes; \
                     the broker takes at most {} per call: use a smaller --batch",
                    GRPC_MESSAGE_BYTES_MAX
                ))
                .into());
            }
        }
        if self.chart.is_some() && self.subscriptions.is_some() && w != Scale {
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
            Workload::SlowConsumers => vec![Step::SlowConsumers],
            Workload::Scale => vec![Step::Scale],
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
        let size = self.size.unwrap_or(DEFAULT_SIZE);
        let batch = self.batch.unwrap_or_else(|| default_batch(size));
        let in_flight = self.in_flight.unwrap_or(DEFAULT_IN_FLIGHT);
        let mut p = Params {
            messages: 0,
            size,
            publisher: self.publisher,
            topics: 1,
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
                p.topics = self.topics.unwrap_or(1);
                p.max_outstanding = None;
            }
            Step::Fanout { subscriptions } => {
                p.messages = self.messages.unwrap_or(FANOUT_MESSAGES);
                p.subscriptions = subscriptions;
            }
            Step::Drain => p.messages = self.messages.unwrap_or(DRAIN_MESSAGES),
            // Each point sets its own (scale::Sweep).
            Step::Scale => p.messages = self.messages.unwrap_or(0),
            Step::Backlog => {
                p.messages = self.messages.unwrap_or(BACKLOG_MESSAGES);
                p.max_outstanding = None;
            }
            Step::SlowConsumers => {
                p.messages = self.messages.unwrap_or(SLOW_MESSAGES);
                p.size = self.size.unwrap_or(SLOW_SIZE);
                // 1 MiB messages: keep each Publish call within a few MiB.
                p.batch = self.batch.unwrap_or_else(|| {
                    u32::try_from((SLOW_BATCH_BYTES / p.size.max(1)).clamp(1, 100)).unwrap_or(1)
                });
                p.publish_concurrency = (p.in_flight / u64::from(p.batch)).clamp(1, 4);
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
                p.size = p.size.max(LATENCY_HEADER_BYTES as u64);
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
                Step::Publish => throughput::publish(ctx, &p)
                    .await
                    .map(WorkloadResult::Publish),
                Step::Fanout { .. } => throughput::fanout(ctx, &p)
                    .await
                    .map(WorkloadResult::Fanout),
                Step::Latency => latency::latency(ctx, &p).await.map(WorkloadResult::Latency),
                Step::Drain => throughput::drain(ctx, &p).await.map(WorkloadResult::Drain),
                Step::Backlog => backlog::backlog(ctx, &p).await.map(WorkloadResult::Backlog),
                Step::Scale => {
                    let sweep = scale::Sweep::new(
                        self.topics,
                        self.subscriptions,
                        self.size,
                        self.messages,
                    );
                    scale::scale(ctx, &p, &sweep)
                        .await
                        .map(WorkloadResult::Scale)
                }
                Step::SlowConsumers => {
                    let streams = self.streams.unwrap_or(SLOW_STREAMS);
                    slow::slow_consumers(ctx, &p, streams)
                        .await
                        .map(WorkloadResult::SlowConsumers)
                }
            };
            ctx.cleanup().await;
            results.push(result?);
        }
        Ok(results)
    }
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
        // Large messages: the default batch keeps a call within 4 MiB.
        assert_eq!(default_batch(256), 100);
        assert_eq!(default_batch(1024 * 1024), 4);
        assert_eq!(default_batch(64 * 1024 * 1024), 1);

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
}

//! The report of a `courier bench` run: [`Report`], the object printed by
//! `--json` and appended as one line by `--record` ([`append_line`]), with
//! one result struct per workload and the [`Params`] each ran with (their
//! fields are the JSON fields docs/bench.md lists); and the human summary
//! printed without `--json`, plus the number formatting it shares with the
//! progress bars ([`thousands`]).

use std::fmt::Display;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use super::super::output::count;
use super::PublishApi;
use super::stats::Percentiles;
use super::{DEFAULT_MAX_OUTSTANDING, Workload};

/// Everything one `courier bench` invocation measured: the object printed
/// by `--json` and appended by `--record`.
#[derive(Debug, Serialize)]
pub(super) struct Report {
    /// When the run started, RFC 3339 UTC.
    pub(super) timestamp: String,
    /// The same, in milliseconds since the Unix epoch.
    pub(super) unix_ms: u64,
    /// Version of the courier binary that ran the bench.
    pub(super) bench_version: &'static str,
    /// The `--workload` flag.
    pub(super) workload: Workload,
    /// The broker URL (a spawned broker's, with --spawn-broker).
    pub(super) server: String,
    /// What the broker said about itself (GetBrokerStats) at the start.
    pub(super) broker: BrokerInfo,
    /// The machine the bench ran on.
    pub(super) host: HostInfo,
    /// One entry per workload run, in order.
    pub(super) results: Vec<WorkloadResult>,
    /// Path of the SVG written for `--chart`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) chart: Option<String>,
    /// Wall time of the whole invocation.
    pub(super) elapsed_s: f64,
}

/// The broker under test.
#[derive(Debug, Serialize)]
pub(super) struct BrokerInfo {
    pub(super) version: String,
    pub(super) fsync_mode: String,
    /// Whether the bench started the broker itself (`--spawn-broker`).
    pub(super) spawned: bool,
    /// Data directory of a spawned broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) data_dir: Option<String>,
}

/// The machine the bench ran on.
#[derive(Debug, Serialize)]
pub(super) struct HostInfo {
    pub(super) os: &'static str,
    pub(super) arch: &'static str,
    pub(super) cpus: usize,
}

impl HostInfo {
    pub(super) fn current() -> HostInfo {
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
pub(super) enum WorkloadResult {
    Publish(PublishResult),
    Fanout(FanoutResult),
    Latency(LatencyResult),
    Drain(DrainResult),
    Backlog(BacklogResult),
    #[serde(rename = "slow-consumers")]
    SlowConsumers(SlowConsumersResult),
    Scale(ScaleResult),
}

/// `scale`: the curves against topics, subscriptions and payload size, and
/// an idle broker of many topics.
#[derive(Debug, Serialize)]
pub(super) struct ScaleResult {
    /// The flags every point starts from (each curve changes some).
    pub(super) params: Params,
    pub(super) points: Vec<ScalePoint>,
    pub(super) idle: IdleResult,
}

/// One point of a `scale` curve.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ScalePoint {
    /// `topics`, `subscriptions` or `size`: what this curve varies.
    pub(super) curve: &'static str,
    pub(super) topics: u32,
    pub(super) subscriptions: u32,
    pub(super) size: u64,
    pub(super) messages: u64,
    pub(super) publisher: PublishApi,
    pub(super) publish_msgs_per_s: f64,
    pub(super) publish_mb_per_s: f64,
    /// Of each Publish call (unary) or each message (stream publisher).
    pub(super) publish_p99_ms: f64,
    /// Fan-out points: deliveries acked per second, all subscriptions.
    pub(super) deliveries_acked_per_s: Option<f64>,
    pub(super) deliveries_mb_per_s: Option<f64>,
    /// GetBrokerStats after the point, its topics still there.
    pub(super) resident_memory_bytes: u64,
    /// A spawned broker's VmRSS and threads after the point.
    pub(super) vm_rss_bytes: Option<u64>,
    pub(super) threads: Option<u64>,
}

/// The idle part of `scale`: many topics with a subscription and a message
/// each.
#[derive(Debug, Serialize)]
pub(super) struct IdleResult {
    pub(super) topics: u32,
    pub(super) subscriptions: u32,
    /// Publishing one message to each topic.
    pub(super) publish_msgs_per_s: f64,
    pub(super) publish_mb_per_s: f64,
    pub(super) resident_memory_bytes: u64,
    pub(super) vm_rss_bytes: Option<u64>,
    pub(super) threads: Option<u64>,
    /// With `--spawn-broker`: stop, start, first delivery.
    pub(super) restart: Option<RestartResult>,
    pub(super) threads_after_restart: Option<u64>,
}

/// `publish`: throughput until every publish is confirmed.
#[derive(Debug, Serialize)]
pub(super) struct PublishResult {
    pub(super) topic: String,
    pub(super) params: Params,
    /// Messages confirmed by the broker (always params.messages).
    pub(super) published: u64,
    /// From the first Publish call to the last confirmation.
    pub(super) elapsed_s: f64,
    pub(super) msgs_per_s: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub(super) mb_per_s: f64,
    /// Publish calls made.
    pub(super) publish_calls: u64,
    /// Duration of each Publish call (send to confirmation).
    pub(super) publish_call_latency: Percentiles,
}

/// Disk usage of a fanout run, around its publish and drain phases.
#[derive(Debug, Serialize)]
pub(super) struct DiskUsage {
    /// Payload bytes per message (params.size).
    pub(super) payload_bytes_per_message: u64,
    /// GetTopicStats.retained_bytes of the new topic before publishing.
    pub(super) topic_bytes_before: u64,
    /// ... once every message is published.
    pub(super) topic_bytes_after_publish: u64,
    /// ... once every subscription is drained.
    pub(super) topic_bytes_after_drain: u64,
    /// (topic_bytes_after_publish - topic_bytes_before) / published.
    pub(super) topic_bytes_per_message: f64,
    /// GetBrokerStats.data_dir_bytes before publishing.
    pub(super) data_dir_bytes_before: u64,
    /// ... once every message is published.
    pub(super) data_dir_bytes_after_publish: u64,
    /// ... once every subscription is drained (includes ack state).
    pub(super) data_dir_bytes_after_drain: u64,
    /// (data_dir_bytes_after_publish - data_dir_bytes_before) / published.
    pub(super) data_dir_bytes_per_message_published: f64,
    /// (data_dir_bytes_after_drain - data_dir_bytes_before) / published.
    pub(super) data_dir_bytes_per_message_drained: f64,
}

/// `fanout`: publish once, then drain every subscription concurrently.
#[derive(Debug, Serialize)]
pub(super) struct FanoutResult {
    pub(super) topic: String,
    pub(super) params: Params,
    pub(super) published: u64,
    pub(super) publish_elapsed_s: f64,
    pub(super) publish_msgs_per_s: f64,
    pub(super) publish_mb_per_s: f64,
    pub(super) publish_call_latency: Percentiles,
    /// published × subscriptions.
    pub(super) deliveries_expected: u64,
    /// Acks confirmed OK over all subscriptions (equals deliveries_expected).
    pub(super) deliveries_acked: u64,
    /// Deliveries with delivery_attempt > 1.
    pub(super) redeliveries: u64,
    /// Ack results other than OK (stale or unknown).
    pub(super) acks_not_ok: u64,
    /// From opening the first stream to the last ack confirmed.
    pub(super) drain_elapsed_s: f64,
    /// deliveries_acked / drain_elapsed_s.
    pub(super) deliveries_acked_per_s: f64,
    /// Payload megabytes (10^6 bytes) acked per second.
    pub(super) deliveries_mb_per_s: f64,
    /// Drain time of the fastest and the slowest subscription.
    pub(super) fastest_subscription_s: f64,
    pub(super) slowest_subscription_s: f64,
    pub(super) disk: DiskUsage,
}

/// `latency`: paced publishing, publish-to-receive latency.
#[derive(Debug, Serialize)]
pub(super) struct LatencyResult {
    pub(super) topic: String,
    pub(super) params: Params,
    /// What `latency` is measured from: the intended send time of the
    /// message on the fixed schedule (no coordinated omission).
    pub(super) measured_from: &'static str,
    pub(super) sent: u64,
    /// First deliveries received (delivery_attempt 1).
    pub(super) received: u64,
    pub(super) acked: u64,
    pub(super) redeliveries: u64,
    /// Messages whose payload did not carry the bench's timestamps.
    pub(super) malformed: u64,
    /// Messages per second actually sent: (calls - 1) × batch / time from
    /// the first intended send to the last actual send.
    pub(super) achieved_rate: f64,
    /// Largest delay between a call's intended and actual send time.
    pub(super) max_send_lag_ms: f64,
    /// Intended send time to receipt by the StreamingPull consumer.
    pub(super) latency: Percentiles,
    /// Actual send time (just before the Publish call) to receipt.
    pub(super) latency_from_send: Percentiles,
    /// Duration of each Publish call.
    pub(super) publish_call_latency: Percentiles,
}

/// `drain`: one StreamingPull consumer empties a prepared backlog.
#[derive(Debug, Serialize)]
pub(super) struct DrainResult {
    pub(super) topic: String,
    pub(super) params: Params,
    /// Messages published before the timed part (untimed by the workload,
    /// but reported).
    pub(super) prefilled: u64,
    pub(super) prefill_elapsed_s: f64,
    pub(super) prefill_msgs_per_s: f64,
    /// Acks confirmed OK (equals prefilled).
    pub(super) drained: u64,
    pub(super) redeliveries: u64,
    pub(super) acks_not_ok: u64,
    /// From opening the stream to the last ack confirmed.
    pub(super) elapsed_s: f64,
    pub(super) msgs_per_s: f64,
    pub(super) mb_per_s: f64,
}

/// `backlog`: a large backlog with no consumer.
#[derive(Debug, Serialize)]
pub(super) struct BacklogResult {
    pub(super) topic: String,
    pub(super) params: Params,
    pub(super) published: u64,
    pub(super) publish_elapsed_s: f64,
    pub(super) publish_msgs_per_s: f64,
    pub(super) publish_mb_per_s: f64,
    /// GetBrokerStats.resident_memory_bytes after publishing.
    pub(super) resident_memory_bytes: u64,
    /// VmRSS of `/proc/<pid>/status`, when the bench spawned the broker.
    pub(super) vm_rss_bytes: Option<u64>,
    /// GetBrokerStats.data_dir_bytes after publishing.
    pub(super) data_dir_bytes: u64,
    /// GetTopicStats.retained_bytes after publishing.
    pub(super) topic_bytes: u64,
    pub(super) topic_bytes_per_message: f64,
    /// Whether a restart was measured (needs --spawn-broker).
    pub(super) restart_measured: bool,
    pub(super) restart: Option<RestartResult>,
}

/// `slow-consumers`: streams that never read, and the broker's memory.
#[derive(Debug, Serialize)]
pub(super) struct SlowConsumersResult {
    pub(super) topic: String,
    pub(super) params: Params,
    /// StreamingPull streams that never read, one subscription.
    pub(super) streams: u32,
    /// GetBrokerStats.memory_max_bytes (0 from a broker without a budget).
    pub(super) memory_max_bytes: u64,
    /// GetBrokerStats.resident_memory_bytes after publishing.
    pub(super) resident_before_streams_bytes: u64,
    /// Highest resident memory sampled while the streams held on.
    pub(super) resident_peak_bytes: u64,
    /// Resident memory 3 s after the streams ended.
    pub(super) resident_after_streams_end_bytes: u64,
    /// Highest GetBrokerStats.queued_delivery_bytes sampled.
    pub(super) queued_delivery_peak_bytes: u64,
    pub(super) queued_delivery_after_end_bytes: u64,
    /// Messages leased to the streams once they stopped taking more.
    pub(super) held_messages: u64,
    pub(super) held_bytes_per_stream: u64,
    /// From opening the streams to the last change of the in-flight count.
    pub(super) settled_s: f64,
}

/// A SIGTERM and restart of a spawned broker holding the backlog.
#[derive(Debug, Serialize)]
pub(super) struct RestartResult {
    /// SIGTERM to process exit.
    pub(super) shutdown_s: f64,
    /// Exit code of the stopped broker (None if killed by a signal).
    pub(super) shutdown_exit_code: Option<i32>,
    /// Spawn to the `listening on` line.
    pub(super) restart_s: f64,
    /// `listening on` line to the first message returned by Pull.
    pub(super) first_delivery_after_listening_s: f64,
    /// Spawn to the first message returned by Pull.
    pub(super) first_delivery_after_spawn_s: f64,
    /// GetBrokerStats after the first delivery.
    pub(super) resident_memory_bytes: u64,
    pub(super) vm_rss_bytes: Option<u64>,
    pub(super) data_dir_bytes: u64,
}

/// The parameters a workload ran with, after defaults.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Params {
    /// Messages published (latency: rate × duration).
    pub(super) messages: u64,
    /// Payload bytes per message.
    pub(super) size: u64,
    /// Topics published to (publish: the calls go round robin over them,
    /// each with one subscription).
    pub(super) topics: u32,
    /// Subscriptions on the topic.
    pub(super) subscriptions: u32,
    /// Messages per Publish call (publisher `stream`: per `publish` call, 1).
    pub(super) batch: u32,
    /// How messages are published: `unary` Publish calls of `batch`
    /// messages, or `stream`: one message per call of the client's
    /// batching Publisher over PublishStream.
    pub(super) publisher: PublishApi,
    /// Most unconfirmed messages per publisher.
    pub(super) in_flight: u64,
    /// Concurrent Publish calls: max(1, in_flight / batch) (latency: as
    /// many as the schedule and in_flight allow).
    pub(super) publish_concurrency: u64,
    /// gRPC connections.
    pub(super) connections: u32,
    /// StreamingPull max_outstanding_messages, for workloads that consume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) max_outstanding: Option<u64>,
    /// Target publish rate (latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) rate: Option<u64>,
    /// Publishing time (latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) duration_ms: Option<u64>,
}

impl Params {
    /// The StreamingPull flow-control limit (the default for workloads
    /// that do not consume).
    pub(super) fn max_outstanding_or_default(&self) -> u64 {
        self.max_outstanding.unwrap_or(DEFAULT_MAX_OUTSTANDING)
    }
}

/// Appends `line` and a newline to `path`, creating it if needed.
pub(super) fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
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
pub(super) fn thousands(x: f64) -> String {
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

/// ` (VmRSS 12.3 MiB)` when the process's VmRSS is known, else nothing.
fn vm_rss(bytes: Option<u64>) -> String {
    bytes.map_or(String::new(), |b| format!(" (VmRSS {})", mib(b)))
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
        if self.publisher == PublishApi::Stream {
            s.push_str(", publisher stream");
        }
        if self.topics > 1 {
            s.push_str(&format!(", {} topics", thousands(f64::from(self.topics))));
        }
        if let Some(n) = self.max_outstanding {
            s.push_str(&format!(", max outstanding {n}"));
        }
        s
    }
}

impl Report {
    /// The human summary, one line per element.
    pub(super) fn human(&self) -> Vec<String> {
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
            WorkloadResult::SlowConsumers(r) => Section::new(format!(
                "slow-consumers: {}, {} silent streams",
                r.params.human(),
                r.streams
            ))
            .field(
                "memory budget",
                if r.memory_max_bytes == 0 {
                    "none reported".to_string()
                } else {
                    mib(r.memory_max_bytes)
                },
            )
            .field(
                "held",
                format!(
                    "{} messages ({} per stream) after {:.1} s",
                    thousands(r.held_messages as f64),
                    mib(r.held_bytes_per_stream),
                    r.settled_s
                ),
            )
            .field(
                "queued deliveries",
                format!(
                    "peak {}, {} after the streams ended",
                    mib(r.queued_delivery_peak_bytes),
                    mib(r.queued_delivery_after_end_bytes)
                ),
            )
            .field(
                "broker memory",
                format!(
                    "{} before, peak {} while held, {} after the streams ended",
                    mib(r.resident_before_streams_bytes),
                    mib(r.resident_peak_bytes),
                    mib(r.resident_after_streams_end_bytes)
                ),
            )
            .finish(),
            WorkloadResult::Scale(r) => r.human(),
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
                        vm_rss(r.vm_rss_bytes)
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
                                vm_rss(x.vm_rss_bytes),
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

impl ScaleResult {
    fn human(&self) -> Vec<String> {
        let mut s = Section::new(format!("scale: from {}", self.params.human()));
        let threads = |t: Option<u64>| t.map_or(String::new(), |t| format!(", {t} threads"));
        for p in &self.points {
            let (key, what) = match p.curve {
                "topics" => (
                    format!("{} topics", thousands(f64::from(p.topics))),
                    "publish (stream publisher)",
                ),
                "subscriptions" => (count(u64::from(p.subscriptions), "subscription"), "publish"),
                _ => (
                    format!("{} B messages", thousands(p.size as f64)),
                    "publish",
                ),
            };
            let mut line = format!(
                "{what} {} msgs/s, {:.2} MB/s, p99 {:.2} ms",
                thousands(p.publish_msgs_per_s),
                p.publish_mb_per_s,
                p.publish_p99_ms
            );
            if let Some(acked) = p.deliveries_acked_per_s {
                line.push_str(&format!("; deliveries acked {} /s", thousands(acked)));
            }
            line.push_str(&format!(
                "; broker {} resident{}{}",
                mib(p.resident_memory_bytes),
                vm_rss(p.vm_rss_bytes),
                threads(p.threads)
            ));
            s.field(&key, line);
        }
        let i = &self.idle;
        s.field(
            &format!("idle, {} topics", thousands(f64::from(i.topics))),
            format!(
                "{} subscriptions, a message each: broker {} resident{}{}",
                thousands(f64::from(i.subscriptions)),
                mib(i.resident_memory_bytes),
                vm_rss(i.vm_rss_bytes),
                threads(i.threads)
            ),
        );
        if let Some(x) = &i.restart {
            s.field(
                "idle restart",
                format!(
                    "listening {:.2} s after spawn, first delivery {:.3} s after listening \
                     ({:.2} s after spawn){}",
                    x.restart_s,
                    x.first_delivery_after_listening_s,
                    x.first_delivery_after_spawn_s,
                    threads(i.threads_after_restart)
                ),
            );
        }
        s.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_humans() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}

//! The `scale` workload: the curves of how the broker grows. Publish
//! throughput against the number of topics (single-message publishers
//! through the batching `Publisher`), fan-out against the number of
//! subscriptions, and publish bandwidth against the payload size; each
//! point also samples the broker's threads and resident memory. Then an
//! idle data directory of many topics and subscriptions: its threads and
//! memory, and, with `--spawn-broker`, a restart to the first delivery.

use std::time::Duration;

use super::backlog::{restart, vm_rss_bytes};
use super::ctx::Ctx;
use super::report::{IdleResult, Params, ScalePoint, ScaleResult};
use super::stats::{mb_rate, rate, round};
use super::traffic::publish_spread;
use super::{DEFAULT_SIZE, PublishApi, default_batch, throughput};

/// Topic counts of the topics curve.
pub(super) const TOPICS: [u32; 5] = [1, 10, 100, 1_000, 10_000];
/// Subscription counts of the fan-out curve.
pub(super) const SUBSCRIPTIONS: [u32; 4] = [1, 10, 100, 1_000];
/// Payload sizes of the size curve.
pub(super) const SIZES: [u64; 4] = [256, 4 * 1024, 64 * 1024, 1024 * 1024];
/// Single-message publishers of the topics curve.
const PUBLISHERS: u64 = 200;
/// Messages of each point of the topics curve.
const TOPICS_MESSAGES: u64 = 100_000;
/// Payload bytes of each point of the size curve (fewer messages as they
/// grow), and the most messages.
const SIZE_BYTES: u64 = 512 * 1024 * 1024;
const SIZE_MESSAGES_MAX: u64 = 200_000;
/// Deliveries of each point of the fan-out curve, and the most messages.
const FANOUT_DELIVERIES: u64 = 2_000_000;
const FANOUT_MESSAGES_MAX: u64 = 100_000;
/// How long the idle broker is left before its threads and memory are read.
const IDLE_SETTLE: Duration = Duration::from_secs(3);

/// What the scale workload sweeps: each curve's points (capped by
/// `--topics`, `--subscriptions` and `--size`), and the idle topics.
#[derive(Debug, Clone)]
pub(super) struct Sweep {
    pub(super) topics: Vec<u32>,
    pub(super) subscriptions: Vec<u32>,
    pub(super) sizes: Vec<u64>,
    pub(super) idle_topics: u32,
    /// `--messages`: the same count at every point.
    pub(super) messages: Option<u64>,
}

impl Sweep {
    pub(super) fn new(
        topics_max: Option<u32>,
        subscriptions_max: Option<u32>,
        size_max: Option<u64>,
        messages: Option<u64>,
    ) -> Sweep {
        let upto = |points: &[u32], max: Option<u32>| -> Vec<u32> {
            let max = max.unwrap_or(u32::MAX);
            let mut v: Vec<u32> = points.iter().copied().filter(|&n| n < max).collect();
            v.push(max.min(*points.last().expect("points")));
            v.dedup();
            v
        };
        let size_max = size_max.unwrap_or(u64::MAX);
        let mut sizes: Vec<u64> = SIZES.iter().copied().filter(|&s| s < size_max).collect();
        sizes.push(size_max.min(SIZES[SIZES.len() - 1]));
        sizes.dedup();
        let topics = upto(&TOPICS, topics_max);
        Sweep {
            idle_topics: *topics.last().expect("points"),
            topics,
            subscriptions: upto(&SUBSCRIPTIONS, subscriptions_max),
            sizes,
            messages,
        }
    }
}

/// Runs every curve and the idle point, each on fresh topics deleted after
/// it.
pub(super) async fn scale(
    ctx: &mut Ctx,
    base: &Params,
    sweep: &Sweep,
) -> anyhow::Result<ScaleResult> {
    let mut points = Vec::new();
    for &topics in &sweep.topics {
        let mut p = small(base);
        p.topics = topics;
        p.publisher = PublishApi::Stream;
        p.in_flight = PUBLISHERS;
        p.batch = 1;
        p.publish_concurrency = PUBLISHERS;
        p.messages = sweep.messages.unwrap_or(TOPICS_MESSAGES);
        p.max_outstanding = None;
        let r = throughput::publish(ctx, &p).await?;
        let mut point = ScalePoint::new("topics", &p, r.msgs_per_s, r.mb_per_s);
        point.publish_p99_ms = r.publish_call_latency.p99_ms();
        point.sample(ctx).await?;
        ctx.cleanup().await;
        points.push(point);
    }
    for &subscriptions in &sweep.subscriptions {
        let mut p = small(base);
        p.subscriptions = subscriptions;
        p.messages = sweep.messages.unwrap_or(
            (FANOUT_DELIVERIES / u64::from(subscriptions)).clamp(1_000, FANOUT_MESSAGES_MAX),
        );
        let r = throughput::fanout(ctx, &p).await?;
        let mut point = ScalePoint::new(
            "subscriptions",
            &p,
            r.publish_msgs_per_s,
            r.publish_mb_per_s,
        );
        point.publish_p99_ms = r.publish_call_latency.p99_ms();
        point.deliveries_acked_per_s = Some(r.deliveries_acked_per_s);
        point.deliveries_mb_per_s = Some(r.deliveries_mb_per_s);
        point.sample(ctx).await?;
        ctx.cleanup().await;
        points.push(point);
    }
    for &size in &sweep.sizes {
        let mut p = base.clone();
        p.size = size;
        p.batch = default_batch(size);
        p.publish_concurrency = (p.in_flight / u64::from(p.batch)).max(1);
        p.messages = sweep
            .messages
            .unwrap_or((SIZE_BYTES / size).clamp(100, SIZE_MESSAGES_MAX));
        p.max_outstanding = None;
        let r = throughput::publish(ctx, &p).await?;
        let mut point = ScalePoint::new("size", &p, r.msgs_per_s, r.mb_per_s);
        point.publish_p99_ms = r.publish_call_latency.p99_ms();
        point.sample(ctx).await?;
        ctx.cleanup().await;
        points.push(point);
    }
    let idle = idle(ctx, base, sweep.idle_topics).await?;
    Ok(ScaleResult {
        params: small(base),
        points,
        idle,
    })
}

/// `base` with the default payload size (`--size` caps the size curve).
fn small(base: &Params) -> Params {
    let mut p = base.clone();
    p.size = DEFAULT_SIZE;
    p.batch = default_batch(p.size);
    p.publish_concurrency = (p.in_flight / u64::from(p.batch)).max(1);
    p
}

/// `topics` topics with one subscription and one message each, left idle:
/// the broker's threads and memory; with a spawned broker, a restart to
/// the first delivery from the last subscription.
async fn idle(ctx: &mut Ctx, base: &Params, topics: u32) -> anyhow::Result<IdleResult> {
    let names = ctx.create_topics("idle", topics, 1).await?;
    let mut p = small(base);
    p.topics = topics;
    p.batch = 1;
    p.messages = u64::from(topics);
    p.publish_concurrency = p.publish_concurrency.min(u64::from(topics));
    let bar = ctx.bar(
        p.messages,
        format!("idle: a message to each of {topics} topics"),
    );
    let published = publish_spread(ctx, &names, p.messages, &p, &bar).await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    let stats = ctx.broker_stats().await?;
    let pid = ctx.spawned.as_ref().map(|b| b.pid());
    let mut result = IdleResult {
        topics,
        subscriptions: topics,
        publish_msgs_per_s: rate(p.messages, published.elapsed),
        publish_mb_per_s: mb_rate(p.messages, p.size, published.elapsed),
        resident_memory_bytes: stats.resident_memory_bytes,
        vm_rss_bytes: pid.and_then(vm_rss_bytes),
        threads: pid.and_then(threads),
        restart: None,
        threads_after_restart: None,
    };
    if ctx.spawned.is_some() {
        // The last topic's subscription: its name follows the topic's.
        let sub = format!("{}-s0", names[names.len() - 1]);
        result.restart = Some(restart(ctx, &sub, "idle: restart").await?);
        result.threads_after_restart = ctx.spawned.as_ref().and_then(|b| threads(b.pid()));
    }
    ctx.cleanup().await;
    Ok(result)
}

impl ScalePoint {
    fn new(curve: &'static str, p: &Params, msgs_per_s: f64, mb_per_s: f64) -> ScalePoint {
        ScalePoint {
            curve,
            topics: p.topics,
            subscriptions: p.subscriptions,
            size: p.size,
            messages: p.messages,
            publisher: p.publisher,
            publish_msgs_per_s: msgs_per_s,
            publish_mb_per_s: mb_per_s,
            publish_p99_ms: 0.0,
            deliveries_acked_per_s: None,
            deliveries_mb_per_s: None,
            resident_memory_bytes: 0,
            vm_rss_bytes: None,
            threads: None,
        }
    }

    /// The broker's memory and threads now, with the point's topics still
    /// there.
    async fn sample(&mut self, ctx: &mut Ctx) -> anyhow::Result<()> {
        self.resident_memory_bytes = ctx.broker_stats().await?.resident_memory_bytes;
        let pid = ctx.spawned.as_ref().map(|b| b.pid());
        self.vm_rss_bytes = pid.and_then(vm_rss_bytes);
        self.threads = pid.and_then(threads);
        self.publish_p99_ms = round(self.publish_p99_ms, 3);
        Ok(())
    }
}

/// Threads of a local process, from `/proc/<pid>/status`.
fn threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_end_each_curve() {
        let s = Sweep::new(None, None, None, None);
        assert_eq!(s.topics, TOPICS.to_vec());
        assert_eq!(s.subscriptions, SUBSCRIPTIONS.to_vec());
        assert_eq!(s.sizes, SIZES.to_vec());
        assert_eq!(s.idle_topics, 10_000);
        let s = Sweep::new(Some(50), Some(1), Some(4096), Some(10));
        assert_eq!(s.topics, vec![1, 10, 50]);
        assert_eq!(s.subscriptions, vec![1]);
        assert_eq!(s.sizes, vec![256, 4096]);
        assert_eq!(s.idle_topics, 50);
        assert_eq!(s.messages, Some(10));
        let s = Sweep::new(Some(1_000_000), None, Some(100), None);
        assert_eq!(s.topics.last(), Some(&10_000));
        assert_eq!(s.sizes, vec![100]);
    }
}

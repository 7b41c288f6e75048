//! The `slow-consumers` workload: StreamingPull consumers that never read
//! their responses, with flow control far above any memory bound, on one
//! subscription of a topic with a backlog of large messages. It reads the
//! broker's resident memory before the streams open, while they hold on,
//! and after they went away: how much memory a stuck or malicious consumer
//! can pin, and whether the broker gives it back.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::super::conn::error_chain;
use super::ctx::Ctx;
use super::report::{Params, SlowConsumersResult};
use super::stats::secs;
use super::traffic::publish_all;
use crate::api::pb::v1::{GetSubscriptionStatsRequest, StreamingPullRequest};
use crate::client::Client;

/// Flow control each silent stream asks for: far beyond any memory bound.
const SILENT_OUTSTANDING_MESSAGES: u64 = 100_000;
const SILENT_OUTSTANDING_BYTES: u64 = 1 << 40;
/// How often the broker is sampled while the streams hold on.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The streams have taken all they will once the subscription's in-flight
/// count has not changed for this long.
const SETTLED_AFTER: Duration = Duration::from_secs(2);
/// Longest wait for that.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after the streams ended memory is read again (housekeeping,
/// which gives memory back, runs every second).
const AFTER_END_WAIT: Duration = Duration::from_secs(3);

/// `slow-consumers`: publish a backlog, open `streams` streams that never
/// read, sample the broker until they stop taking messages, end them.
pub(super) async fn slow_consumers(
    ctx: &mut Ctx,
    p: &Params,
    streams: u32,
) -> anyhow::Result<SlowConsumersResult> {
    let (topic, subs) = ctx.create("slow", 1).await?;
    let sub = &subs[0];
    let bar = ctx.bar(p.messages, "slow: publish");
    publish_all(ctx, &topic, p.messages, p, &bar).await?;
    let before = ctx.broker_stats().await?;

    // Each stream on a connection of its own: a silent stream also fills
    // its connection's HTTP/2 window, which would stall the others.
    let mut open = Vec::new();
    for _ in 0..streams {
        let client = Client::connect(&ctx.server).await.map_err(|e| {
            anyhow!(
                "cannot reach courier at {}: {}",
                ctx.server,
                error_chain(&e)
            )
        })?;
        let (tx, rx) = mpsc::channel(1);
        tx.send(StreamingPullRequest {
            subscription: sub.clone(),
            max_outstanding_messages: Some(SILENT_OUTSTANDING_MESSAGES),
            max_outstanding_bytes: Some(SILENT_OUTSTANDING_BYTES),
            stream_ack_deadline_ms: Some(600_000),
            ..StreamingPullRequest::default()
        })
        .await
        .map_err(|_| anyhow!("stream request queue closed"))?;
        let responses = client
            .subscriber()
            .streaming_pull(ReceiverStream::new(rx))
            .await
            .map_err(ctx.err(format_args!("stream {sub:?}")))?
            .into_inner();
        open.push((client, tx, responses));
    }

    let started = Instant::now();
    let (mut peak_rss, mut peak_queued) = (0, 0);
    let (mut held, mut changed) = (0, Instant::now());
    while started.elapsed() < SETTLE_TIMEOUT {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let stats = ctx.broker_stats().await?;
        peak_rss = peak_rss.max(stats.resident_memory_bytes);
        peak_queued = peak_queued.max(stats.queued_delivery_bytes);
        let now = in_flight(ctx, sub).await?;
        if now != held {
            (held, changed) = (now, Instant::now());
        } else if changed.elapsed() >= SETTLED_AFTER {
            break;
        }
    }
    let settled_s = secs(changed - started);
    let holding = ctx.broker_stats().await?;

    drop(open);
    tokio::time::sleep(AFTER_END_WAIT).await;
    let after = ctx.broker_stats().await?;
    Ok(SlowConsumersResult {
        topic,
        params: p.clone(),
        streams,
        memory_max_bytes: holding.memory_max_bytes,
        resident_before_streams_bytes: before.resident_memory_bytes,
        resident_peak_bytes: peak_rss,
        resident_after_streams_end_bytes: after.resident_memory_bytes,
        queued_delivery_peak_bytes: peak_queued,
        queued_delivery_after_end_bytes: after.queued_delivery_bytes,
        held_messages: held,
        held_bytes_per_stream: held * p.size / u64::from(streams.max(1)),
        settled_s,
    })
}

async fn in_flight(ctx: &Ctx, sub: &str) -> anyhow::Result<u64> {
    Ok(ctx
        .client(0)
        .admin()
        .get_subscription_stats(GetSubscriptionStatsRequest {
            name: sub.to_string(),
        })
        .await
        .map_err(ctx.err(format_args!("sub stats {sub:?}")))?
        .into_inner()
        .in_flight_messages)
}

//! The throughput workloads: `publish` (publish until every message is
//! confirmed), `fanout` (publish once, drain N subscriptions at once, and
//! measure the disk used per message) and `drain` (empty a prepared
//! backlog with one StreamingPull consumer).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinSet;

use super::ctx::Ctx;
use super::report::{DiskUsage, DrainResult, FanoutResult, Params, PublishResult};
use super::stats::{Percentiles, mb_rate, per_message, rate, secs};
use super::traffic::{Consumed, consume, open_stream, publish_all, publish_spread};

/// `publish`: `p.topics` topics (1 by default) with 1 subscription each;
/// publish `messages` over them and time it until the last confirmation.
pub(super) async fn publish(ctx: &mut Ctx, p: &Params) -> anyhow::Result<PublishResult> {
    let topics = ctx.create_topics("publish", p.topics, 1).await?;
    let bar = ctx.bar(p.messages, "publish");
    let published = publish_spread(ctx, &topics, p.messages, p, &bar).await?;
    Ok(PublishResult {
        topic: topics[0].clone(),
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
pub(super) async fn fanout(ctx: &mut Ctx, p: &Params) -> anyhow::Result<FanoutResult> {
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
    let mut total = Consumed::new(start);
    let mut fastest = Duration::MAX;
    while let Some(joined) = tasks.join_next().await {
        let c = joined.context("consumer task")??;
        total.add(&c);
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

/// `drain`: publish `messages` (untimed), then one StreamingPull consumer
/// acks them all; time from opening the stream to the last ack confirmed.
pub(super) async fn drain(ctx: &mut Ctx, p: &Params) -> anyhow::Result<DrainResult> {
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

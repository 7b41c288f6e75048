//! The `backlog` workload: publish a large backlog with no consumer and
//! read the broker's memory and disk use; with `--spawn-broker`, also stop
//! the broker with SIGTERM, start it again on the same data directory, and
//! time the shutdown, the restart and the first delivery after it.

use std::time::{Duration, Instant};

use anyhow::bail;

use super::ctx::Ctx;
use super::report::{BacklogResult, Params, RestartResult};
use super::stats::{mb_rate, per_message, rate, secs};
use super::traffic::publish_all;
use crate::broker::config::PULL_WAIT_MS_MAX;

/// How long the first Pull after a restart may wait in total.
const FIRST_DELIVERY_TIMEOUT: Duration = Duration::from_secs(600);

/// `backlog`: publish `messages` with one idle subscription, then read
/// the broker's memory and disk use; with a spawned broker, stop it with
/// SIGTERM, start it again and time the restart and the first delivery.
pub(super) async fn backlog(ctx: &mut Ctx, p: &Params) -> anyhow::Result<BacklogResult> {
    let (topic, subs) = ctx.create("backlog", 1).await?;
    let bar = ctx.bar(p.messages, "backlog: publish");
    let published = publish_all(ctx, &topic, p.messages, p, &bar).await?;
    let stats = ctx.broker_stats().await?;
    let topic_stats = ctx.topic_stats(&topic).await?;
    let vm_rss_bytes = ctx.spawned.as_ref().and_then(|b| vm_rss_bytes(b.pid()));

    let restart = if ctx.spawned.is_some() {
        Some(restart(ctx, &subs[0], "backlog: restart").await?)
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
/// waits for the first delivery from `sub`; `label` names the progress bar.
pub(super) async fn restart(
    ctx: &mut Ctx,
    sub: &str,
    label: &str,
) -> anyhow::Result<RestartResult> {
    let bar = ctx.bar(1, label.to_string());
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
            .pull(sub, 1, PULL_WAIT_MS_MAX)
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

/// VmRSS of a local process, from `/proc/<pid>/status`.
pub(super) fn vm_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

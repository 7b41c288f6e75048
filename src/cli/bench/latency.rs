//! The `latency` workload: a publisher on a fixed schedule (`--rate`
//! messages per second for `--duration`, each payload carrying its
//! intended and actual send time) and one StreamingPull consumer that
//! turns those timestamps into latency histograms ([`LatencyRecorder`]).
//! Latency counts from the intended send time, so a stalled publisher
//! cannot hide it (no coordinated omission).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::{BufMut as _, BytesMut};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use super::ctx::{Ctx, rpc_error};
use super::report::{LatencyResult, Params};
use super::stats::{Percentiles, histogram, micros, rate, round};
use super::traffic::{consume, open_stream, payload};
use super::{LATENCY_HEADER_BYTES, LATENCY_RATE};
use crate::api::pb::v1::{PublishMessage, ReceivedMessage};

/// Histograms of the latency workload's consumer.
struct LatencyRecorder {
    epoch: Instant,
    from_intended: Histogram<u64>,
    from_send: Histogram<u64>,
    malformed: u64,
}

impl LatencyRecorder {
    /// Empty histograms for timestamps relative to `epoch`.
    fn new(epoch: Instant) -> LatencyRecorder {
        LatencyRecorder {
            epoch,
            from_intended: histogram(),
            from_send: histogram(),
            malformed: 0,
        }
    }

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

/// Nanoseconds from `epoch` to `t` (0 if `t` is earlier).
fn nanos_since(epoch: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// `latency`: 1 subscription with a StreamingPull consumer acking each
/// message, while a publisher sends `rate` messages per second for
/// `duration`, in batches of `batch` on a fixed schedule. Latency runs from
/// each message's intended send time on that schedule (so a stalled
/// publisher cannot hide latency) to the arrival of the response carrying
/// it; the time from the actual send is reported too.
pub(super) async fn latency(ctx: &mut Ctx, p: &Params) -> anyhow::Result<LatencyResult> {
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
            let mut rec = LatencyRecorder::new(epoch);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_payloads_round_trip_their_timestamps() {
        let epoch = Instant::now();
        let mut rec = LatencyRecorder::new(epoch);
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

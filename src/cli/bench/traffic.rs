//! The traffic the workloads generate: [`publish_all`] publishes a fixed
//! number of copies of one [`payload`] with concurrent batched Publish
//! calls over all connections, and [`consume`] reads a StreamingPull
//! ([`open_stream`]) and acks every delivery until enough acks are
//! confirmed, counting what it saw ([`Consumed`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::Streaming;

use super::PublishApi;
use super::ctx::{Ctx, rpc_error};
use super::report::Params;
use super::stats::{histogram, micros};
use crate::api::pb::v1::{
    AckStatus, PublishMessage, ReceivedMessage, StreamingPullRequest, StreamingPullResponse,
};
use crate::broker::config::ACK_IDS_PER_REQUEST_MAX;
use crate::client::{Client, Publisher, PublisherSettings};

/// A consumer that receives nothing for this long fails the run.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A payload of `size` pseudo-random bytes (xorshift), shared by every
/// message of a run.
pub(super) fn payload(size: u64) -> Bytes {
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

/// What [`publish_all`] measured.
pub(super) struct Published {
    pub(super) elapsed: Duration,
    pub(super) calls: u64,
    pub(super) call_latency: Histogram<u64>,
}

/// Publishes `messages` copies of a `p.size`-byte payload to `topic` with
/// `p.publish_concurrency` concurrent Publish calls of `p.batch` messages,
/// spread over the connections; returns once every message is confirmed.
pub(super) async fn publish_all(
    ctx: &Ctx,
    topic: &str,
    messages: u64,
    p: &Params,
    bar: &ProgressBar,
) -> anyhow::Result<Published> {
    publish_spread(ctx, &[topic.to_string()], messages, p, bar).await
}

/// [`publish_all`] over several topics: the n-th Publish call goes to
/// topic n modulo their number.
pub(super) async fn publish_spread(
    ctx: &Ctx,
    topics: &[String],
    messages: u64,
    p: &Params,
    bar: &ProgressBar,
) -> anyhow::Result<Published> {
    if p.publisher == PublishApi::Stream {
        return publish_streamed(ctx, topics, messages, p, bar).await;
    }
    let topics: Arc<[String]> = topics.into();
    let data = payload(p.size);
    let next = Arc::new(AtomicU64::new(0));
    let batch = u64::from(p.batch);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..p.publish_concurrency {
        let client = ctx.client(worker as usize).clone();
        let (topics, server) = (topics.clone(), ctx.server.clone());
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
                let topic = &topics[((first / batch) % topics.len() as u64) as usize];
                let batch: Vec<PublishMessage> = (0..n)
                    .map(|_| PublishMessage {
                        data: data.clone(),
                        ..PublishMessage::default()
                    })
                    .collect();
                let sent = Instant::now();
                let ids = client
                    .publish(topic, batch)
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

/// [`publish_spread`] as an application that publishes one message at a
/// time through [`Publisher`] (one per connection, batching onto a
/// PublishStream): `p.in_flight` concurrent publishers each wait for their
/// message's id before publishing the next; message n goes to topic n
/// modulo their number. A "call" is one message.
async fn publish_streamed(
    ctx: &Ctx,
    topics: &[String],
    messages: u64,
    p: &Params,
    bar: &ProgressBar,
) -> anyhow::Result<Published> {
    let topics: Arc<[String]> = topics.into();
    let publishers: Vec<Publisher> = (0..p.connections as usize)
        .map(|i| Publisher::new(ctx.client(i), PublisherSettings::default()))
        .collect();
    let data = payload(p.size);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..p.in_flight {
        let publisher = publishers[worker as usize % publishers.len()].clone();
        let (topics, server) = (topics.clone(), ctx.server.clone());
        let (next, data, bar) = (next.clone(), data.clone(), bar.clone());
        tasks.spawn(async move {
            let mut calls = 0u64;
            let mut call_latency = histogram();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= messages {
                    break;
                }
                let topic = &topics[(n % topics.len() as u64) as usize];
                let message = PublishMessage {
                    data: data.clone(),
                    ..PublishMessage::default()
                };
                let sent = Instant::now();
                publisher
                    .publish(topic, message)
                    .await
                    .map_err(|e| rpc_error(&server, &format!("publish to {topic:?}"), e))?;
                call_latency.saturating_record(micros(sent.elapsed()));
                calls += 1;
                bar.inc(1);
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
pub(super) struct Consumed {
    pub(super) received: u64,
    pub(super) acked: u64,
    pub(super) redeliveries: u64,
    pub(super) acks_not_ok: u64,
    /// When the last needed ack result arrived.
    pub(super) last_ack: Instant,
}

impl Consumed {
    /// Nothing consumed yet; `last_ack` starts at `start`.
    pub(super) fn new(start: Instant) -> Consumed {
        Consumed {
            received: 0,
            acked: 0,
            redeliveries: 0,
            acks_not_ok: 0,
            last_ack: start,
        }
    }

    /// Adds the counts of another stream; the last ack is the later one.
    pub(super) fn add(&mut self, other: &Consumed) {
        self.received += other.received;
        self.acked += other.acked;
        self.redeliveries += other.redeliveries;
        self.acks_not_ok += other.acks_not_ok;
        self.last_ack = self.last_ack.max(other.last_ack);
    }
}

/// The request sender and response stream of one StreamingPull.
pub(super) type PullStream = (
    mpsc::Sender<StreamingPullRequest>,
    Streaming<StreamingPullResponse>,
);

/// Opens a StreamingPull on `sub` with the given flow-control limit.
pub(super) async fn open_stream(
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
pub(super) async fn consume(
    server: &str,
    sub: &str,
    stream: PullStream,
    expected: u64,
    bar: &ProgressBar,
    mut on_message: impl FnMut(&ReceivedMessage, Instant),
) -> anyhow::Result<Consumed> {
    let (requests, mut responses) = stream;
    let mut c = Consumed::new(Instant::now());
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

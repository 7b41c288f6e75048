//! The broker's one memory budget (`memory_bytes_max`): streams that never
//! read their responses, many of them, and many topics' tail caches stay
//! within their shares, and what they held is given back when they end.
//! What the budget means in resident memory is measured by
//! `courier bench --workload slow-consumers` (docs/performance.md).

mod common;

use std::time::{Duration, Instant};

use common::{Clients, TestServer, test_config};
use courier::api::pb::v1;
use courier::broker::memory::STREAM_QUEUED_BYTES_MAX;
use tokio::sync::mpsc;

const MIB: u64 = 1024 * 1024;

/// 64 MiB budget, no tail cache: 16 MiB for appends, 1 MiB for nack
/// reasons, 47 MiB for queued deliveries.
async fn server() -> TestServer {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(tmp.path());
    config.memory_bytes_max = 64 * MIB;
    config.tail_cache_bytes_max = 0;
    config.message_bytes_max = 2 * MIB as usize;
    config.segment_bytes_max = 16 * MIB;
    let mut server = TestServer::start_with(config).await;
    server.keep_dir(tmp);
    server
}

async fn publish_mib_messages(c: &mut Clients, topic: &str, n: usize) {
    let payload = vec![b'x'; MIB as usize];
    for batch in (0..n).collect::<Vec<_>>().chunks(4) {
        c.publisher
            .publish(v1::PublishRequest {
                topic: topic.into(),
                messages: batch
                    .iter()
                    .map(|_| v1::PublishMessage {
                        data: payload.clone().into(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .unwrap();
    }
}

/// Opens a stream with flow control far above the memory bounds and never
/// reads it.
async fn silent_stream(
    c: &mut Clients,
    sub: &str,
) -> (
    mpsc::Sender<v1::StreamingPullRequest>,
    tonic::Streaming<v1::StreamingPullResponse>,
) {
    c.stream(v1::StreamingPullRequest {
        subscription: sub.into(),
        max_outstanding_messages: Some(100_000),
        max_outstanding_bytes: Some(64 * 1024 * MIB),
        stream_ack_deadline_ms: Some(600_000),
        ..Default::default()
    })
    .await
}

async fn broker_stats(c: &mut Clients) -> v1::BrokerStats {
    c.admin
        .get_broker_stats(v1::GetBrokerStatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls `sample` until it has not changed for 500 ms (at most 15 s), and
/// returns every value seen.
async fn settle<F, Fut>(mut sample: F) -> Vec<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let start = Instant::now();
    let mut seen = vec![sample().await];
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(500) && start.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let v = sample().await;
        if v != *seen.last().unwrap() {
            since = Instant::now();
        }
        seen.push(v);
    }
    seen
}

#[tokio::test]
async fn a_stream_that_never_reads_holds_at_most_its_queue_bound() {
    let server = server().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    publish_mib_messages(&mut c, "t", 60).await;
    // A connection of its own: a silent stream also uses up its
    // connection's HTTP/2 window, which would stall the probe's calls.
    let (tx, stream) = silent_stream(&mut server.clients().await, "s").await;
    let mut probe = c.clone();
    let in_flight = settle(|| {
        let mut probe = probe.clone();
        async move { probe.stats("s").await.in_flight_messages }
    })
    .await;
    let held = *in_flight.last().unwrap();
    // Its queue, plus what the transport took: one response being encoded
    // and what fits the client's HTTP/2 window.
    let bound = STREAM_QUEUED_BYTES_MAX / MIB + 4 + 2;
    assert!(
        held >= 1 && held <= bound,
        "a silent stream holds {held} 1 MiB messages; its bound is {bound} (flow control allowed 60)"
    );
    let queued = broker_stats(&mut probe).await.queued_delivery_bytes;
    assert!(
        queued <= STREAM_QUEUED_BYTES_MAX + MIB,
        "queued deliveries {queued} bytes"
    );
    // The client goes away: the reservation is given back.
    drop((tx, stream));
    let after = settle(|| {
        let mut probe = probe.clone();
        async move { broker_stats(&mut probe).await.queued_delivery_bytes }
    })
    .await;
    assert_eq!(
        *after.last().unwrap(),
        0,
        "reserved bytes after the stream ended: {after:?}"
    );
}

#[tokio::test]
async fn silent_streams_together_stay_within_the_brokers_share_and_pull_waits_for_room() {
    let server = server().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    const STREAMS: usize = 6;
    for i in 0..STREAMS {
        c.create_sub(&format!("s{i}"), "t").await;
    }
    c.create_sub("puller", "t").await;
    // Each subscription could queue its stream's 16 MiB: 96 MiB in all,
    // twice the 47 MiB the budget gives queued deliveries.
    publish_mib_messages(&mut c, "t", 40).await;
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let mut own = server.clients().await;
        streams.push(silent_stream(&mut own, &format!("s{i}")).await);
    }
    let share = 47 * MIB;
    let mut probe = c.clone();
    let queued = settle(|| {
        let mut probe = probe.clone();
        async move { broker_stats(&mut probe).await.queued_delivery_bytes }
    })
    .await;
    let peak = queued.iter().copied().max().unwrap();
    assert!(
        peak <= share,
        "queued deliveries peaked at {peak} bytes; the share is {share}"
    );
    assert!(
        *queued.last().unwrap() > share - 2 * (4 * MIB + MIB),
        "the streams should fill the share: {queued:?}"
    );
    let mut in_flight = 0;
    for i in 0..STREAMS {
        in_flight += probe.stats(&format!("s{i}")).await.in_flight_messages;
    }
    let bound = share / MIB + STREAMS as u64 * (4 + 2);
    assert!(
        in_flight <= bound,
        "{in_flight} messages held; bound {bound}"
    );
    // With the share used up, a Pull waits and then returns nothing.
    let got = probe.pull("puller", 10, 300).await;
    assert!(
        got.is_empty(),
        "Pull got {} messages with no memory left",
        got.len()
    );
    // The streams end; the memory comes back and Pull is served.
    drop(streams);
    let after = settle(|| {
        let mut probe = probe.clone();
        async move { broker_stats(&mut probe).await.queued_delivery_bytes }
    })
    .await;
    assert_eq!(*after.last().unwrap(), 0);
    let got = probe.pull("puller", 10, 5_000).await;
    assert!(!got.is_empty());
}

#[tokio::test]
async fn tail_caches_of_many_topics_share_one_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(tmp.path());
    config.memory_bytes_max = 64 * MIB;
    config.tail_cache_bytes_max = 4 * MIB;
    config.message_bytes_max = 2 * MIB as usize;
    let mut server = TestServer::start_with(config).await;
    server.keep_dir(tmp);
    let mut c = server.clients().await;
    // 20 topics × 2 MiB: per-topic caches would hold 40 MiB.
    for i in 0..20 {
        let topic = format!("t{i}");
        c.create_topic(&topic).await;
        publish_mib_messages(&mut c, &topic, 2).await;
        let cached = broker_stats(&mut c).await.tail_cache_bytes;
        assert!(
            cached <= 4 * MIB,
            "tail caches hold {cached} bytes after {} topics",
            i + 1
        );
    }
    let cached = broker_stats(&mut c).await.tail_cache_bytes;
    assert!(cached > 2 * MIB, "the cache is used: {cached} bytes");
}

#[tokio::test]
async fn nack_reasons_stay_within_their_share_and_are_kept_again_once_settled() {
    let server = server().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 600_000,
        retry_policy: Some(v1::RetryPolicy {
            min_backoff_ms: 600_000,
            max_backoff_ms: 600_000,
            no_jitter: false,
        }),
        ..Default::default()
    })
    .await;
    // 1,200 nacks of 1 KiB reasons: more than the 1 MiB share can keep.
    const N: usize = 1_200;
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let payloads: Vec<String> = chunk.iter().map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        c.publish("t", &refs).await;
    }
    let reason = "r".repeat(1024);
    let got = c.pull_n("s", N, Duration::from_secs(10)).await;
    assert_eq!(got.len(), N);
    for chunk in got.chunks(100) {
        let results = c.nack_because("s", common::ack_ids(chunk), &reason).await;
        assert!(results.iter().all(|r| r.status == v1::AckStatus::Ok as i32));
    }
    let kept = broker_stats(&mut c).await.nack_reason_bytes;
    assert!(
        kept <= MIB && kept > MIB / 2,
        "nack reasons hold {kept} bytes; the share is 1 MiB"
    );
    let last = &got[N - 1].message.as_ref().unwrap().message_id;
    assert_eq!(c.status_in("t", last, "s").await.last_nack_reason, "");
    let first = &got[0].message.as_ref().unwrap().message_id;
    assert_eq!(c.status_in("t", first, "s").await.last_nack_reason, reason);
    // Settling gives the share back (at the next housekeeping pass at the
    // latest), and reasons are kept again.
    c.admin
        .purge_subscription(v1::PurgeSubscriptionRequest { name: "s".into() })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while broker_stats(&mut c).await.nack_reason_bytes > 0 {
        assert!(Instant::now() < deadline, "the share was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids = c.publish("t", &["again"]).await;
    let again = c.pull_n("s", 1, Duration::from_secs(3)).await;
    c.nack_because("s", common::ack_ids(&again), "kept").await;
    assert_eq!(
        c.status_in("t", &ids[0], "s").await.last_nack_reason,
        "kept"
    );
}

//! Retention against a real broker: under drop-oldest each subscription
//! counts (durably, and in one log line per pass) the messages it lost;
//! under reject-publish nothing unsettled is removed and Publish is
//! RESOURCE_EXHAUSTED at the bound until consumers catch up, without a
//! restart. Segments are 64 KiB so retention has something to cut, and
//! in-process brokers run housekeeping every 100 ms instead of every second.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{ChildBroker, Clients, TestServer, ack_ids, spawn_broker_with};
use courier::api::pb::v1;
use courier::broker::BrokerConfig;

/// How often in-process brokers here run housekeeping.
const HOUSEKEEPING_MS: u64 = 100;

fn test_config(dir: &std::path::Path) -> BrokerConfig {
    let mut config = common::test_config(dir);
    config.housekeeping_ms = HOUSEKEEPING_MS;
    config
}

/// Starts an in-process broker on a fresh directory.
async fn start() -> (TestServer, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    (TestServer::start_with(test_config(tmp.path())).await, tmp)
}

const PAYLOAD_BYTES: usize = 1000;

fn retention(max_bytes: u64, mode: v1::RetentionMode) -> Option<v1::RetentionPolicy> {
    Some(v1::RetentionPolicy {
        max_age_ms: None,
        max_bytes: Some(max_bytes),
        mode: mode as i32,
    })
}

async fn create_topic(c: &mut Clients, name: &str, retention: Option<v1::RetentionPolicy>) {
    c.admin
        .create_topic(v1::CreateTopicRequest {
            name: name.into(),
            retention,
        })
        .await
        .unwrap();
}

async fn topic_stats(c: &mut Clients, name: &str) -> v1::TopicStats {
    c.admin
        .get_topic_stats(v1::GetTopicStatsRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Publishes `n` messages of [`PAYLOAD_BYTES`] bytes in one call.
async fn publish_batch(
    c: &mut Clients,
    topic: &str,
    n: usize,
) -> Result<Vec<String>, tonic::Status> {
    let messages = (0..n)
        .map(|_| v1::PublishMessage {
            data: vec![b'x'; PAYLOAD_BYTES].into(),
            ..Default::default()
        })
        .collect();
    c.publisher
        .publish(v1::PublishRequest {
            topic: topic.into(),
            messages,
        })
        .await
        .map(|r| r.into_inner().message_ids)
}

/// A child broker with 64 KiB segments, killed if the test fails.
struct Child(ChildBroker);

impl Child {
    fn start(dir: &std::path::Path) -> Child {
        Child(spawn_broker_with(dir, &["--segment-bytes", "64KiB"], None))
    }

    /// The warning lines retention logged for `subscription`, with their
    /// counts.
    fn drop_lines(&self, subscription: &str) -> Vec<(String, u64)> {
        let needle = format!("subscription={subscription} ");
        self.0
            .log
            .lock()
            .iter()
            .filter(|l| {
                l.contains("retention removed messages this subscription had not acknowledged")
                    && l.contains(&needle)
            })
            .map(|l| {
                let count = l
                    .split("count=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no count in {l:?}"));
                (l.clone(), count)
            })
            .collect()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_counts_what_each_subscription_lost_logs_it_and_keeps_the_count_across_a_crash()
{
    let tmp = tempfile::tempdir().unwrap();
    let broker = Child::start(tmp.path());
    let mut c = Clients::connect(&broker.0.url).await;
    create_topic(
        &mut c,
        "t",
        retention(128 * 1024, v1::RetentionMode::DropOldest),
    )
    .await;
    c.create_sub("lagging", "t").await;
    c.create_sub("keeping-up", "t").await;
    for _ in 0..12 {
        publish_batch(&mut c, "t", 50).await.unwrap();
        let got = c.pull_n("keeping-up", 50, Duration::from_secs(3)).await;
        assert_eq!(got.len(), 50);
        c.ack("keeping-up", ack_ids(&got)).await;
    }
    // "lagging" never settled anything, from offset 0: it lost exactly what
    // retention removed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (first, dropped) = loop {
        let first = topic_stats(&mut c, "t").await.first_offset;
        let dropped = c.stats("lagging").await.dropped_by_retention;
        if first > 0 && dropped == first {
            break (first, dropped);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never settled: first_offset {first}, dropped {dropped}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(c.stats("keeping-up").await.dropped_by_retention, 0);
    let lines = broker.drop_lines("lagging");
    assert_eq!(
        lines.iter().map(|(_, n)| n).sum::<u64>(),
        dropped,
        "{lines:#?}"
    );
    assert!(
        (lines.len() as u64) < dropped,
        "one line per pass, not per message: {lines:#?}"
    );
    assert!(
        lines.iter().all(|(l, _)| l.contains("topic=t ")),
        "{lines:#?}"
    );
    assert_eq!(broker.drop_lines("keeping-up"), Vec::new());
    let gone = c
        .admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: "0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("removed by retention"), "{gone:?}");

    // kill -9: the count is in the state journal, durable before the
    // segments went.
    drop(broker);
    let broker = Child::start(tmp.path());
    let mut c = Clients::connect(&broker.0.url).await;
    assert_eq!(c.stats("lagging").await.dropped_by_retention, dropped);
    assert_eq!(c.stats("keeping-up").await.dropped_by_retention, 0);
    let retained = usize::try_from(600 - first).unwrap();
    let rest = c.pull_n("lagging", retained, Duration::from_secs(5)).await;
    let ids: Vec<u64> = rest
        .iter()
        .map(|m| m.message.as_ref().unwrap().message_id.parse().unwrap())
        .collect();
    assert_eq!(ids, (first..600).collect::<Vec<u64>>());
    // Nothing more is lost, so nothing more is counted or logged.
    c.ack("lagging", ack_ids(&rest)).await;
    assert_eq!(c.stats("lagging").await.dropped_by_retention, dropped);
    assert_eq!(broker.drop_lines("lagging"), Vec::new());
}

#[tokio::test]
async fn the_drop_count_survives_journal_compaction_and_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(tmp.path());
    // Compact at every housekeeping pass.
    config.journal_compact_bytes = 1;
    let server = TestServer::start_with(config.clone()).await;
    let mut c = server.clients().await;
    create_topic(
        &mut c,
        "t",
        retention(128 * 1024, v1::RetentionMode::DropOldest),
    )
    .await;
    c.create_sub("lagging", "t").await;
    for _ in 0..6 {
        publish_batch(&mut c, "t", 100).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let dropped = loop {
        let dropped = c.stats("lagging").await.dropped_by_retention;
        if dropped > 0 && dropped == topic_stats(&mut c, "t").await.first_offset {
            break dropped;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // More passes: the journal is compacted after the drop, so only
    // snapshots carry the count. A pass that ran while the last batches
    // were being written may still cut once more: read the count again
    // after them.
    tokio::time::sleep(Duration::from_millis(3 * HOUSEKEEPING_MS)).await;
    let settled = c.stats("lagging").await.dropped_by_retention;
    assert!(
        settled >= dropped,
        "the count went back: {dropped} then {settled}"
    );
    assert_eq!(settled, topic_stats(&mut c, "t").await.first_offset);
    let dropped = settled;
    // Compaction (every pass here) has removed the journal segment that
    // held the drop entries; wait for it on a loaded machine.
    let first_journal_segment = tmp.path().join("state").join("00000000000000000000.seg");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while first_journal_segment.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the state journal was never compacted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
    let server = TestServer::start_with(config).await;
    let mut c = server.clients().await;
    assert_eq!(c.stats("lagging").await.dropped_by_retention, dropped);
    server.stop().await;
}

#[tokio::test]
async fn reject_publish_refuses_at_the_bound_and_accepts_again_once_consumers_catch_up() {
    const MAX_BYTES: u64 = 96 * 1024;
    let (server, _tmp) = start().await;
    let mut c = server.clients().await;
    create_topic(
        &mut c,
        "t",
        retention(MAX_BYTES, v1::RetentionMode::RejectPublish),
    )
    .await;
    c.create_sub("s", "t").await;
    c.create_sub("other", "t").await;
    let mut published: Vec<String> = Vec::new();
    let refused = loop {
        match publish_batch(&mut c, "t", 10).await {
            Ok(ids) => published.extend(ids),
            Err(status) => break status,
        }
        assert!(published.len() < 10_000, "never refused");
    };
    // The gRPC status the protocol documents, naming the topic and bound.
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    for part in [
        "topic \"t\"",
        "retention.max_bytes of 98304",
        "reject-publish",
    ] {
        assert!(refused.message().contains(part), "{part}: {refused:?}");
    }
    // A smaller publish may still fit under the bound; fill it up.
    while let Ok(ids) = publish_batch(&mut c, "t", 1).await {
        published.extend(ids);
        assert!(published.len() < 10_000, "never refused");
    }
    let stored = published.len() as u64 * PAYLOAD_BYTES as u64;
    assert!(
        (MAX_BYTES - 10 * 1024..MAX_BYTES + 10 * 1024).contains(&stored),
        "refused after {stored} bytes of payload"
    );
    // Still refused housekeeping passes later, and nothing was removed.
    tokio::time::sleep(Duration::from_millis(3 * HOUSEKEEPING_MS)).await;
    let err = publish_batch(&mut c, "t", 1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(topic_stats(&mut c, "t").await.first_offset, 0);
    assert_eq!(c.stats("s").await.backlog_messages, published.len() as u64);

    // One subscription catching up is not enough: the backlog is measured
    // from the lowest ack floor.
    let all = published.len();
    let got = c.pull_n("s", all, Duration::from_secs(5)).await;
    assert_eq!(got.len(), all);
    c.ack("s", ack_ids(&got)).await;
    let err = publish_batch(&mut c, "t", 1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);

    // The other acks its oldest half: publishes are accepted at once, with
    // no restart and no wait for housekeeping.
    let got = c.pull_n("other", all, Duration::from_secs(5)).await;
    assert_eq!(got.len(), all);
    let (older, newer) = got.split_at(all / 2);
    c.ack("other", ack_ids(older)).await;
    published.extend(publish_batch(&mut c, "t", 10).await.unwrap());
    c.ack("other", ack_ids(newer)).await;
    for _ in 0..3 {
        published.extend(publish_batch(&mut c, "t", 10).await.unwrap());
    }

    // Nothing acknowledged was lost: every id published is delivered to
    // both subscriptions, and neither counted a drop.
    let rest = published.len() - all;
    for sub in ["s", "other"] {
        let got = c.pull_n(sub, rest, Duration::from_secs(5)).await;
        c.ack(sub, ack_ids(&got)).await;
        let ids: BTreeSet<&str> = got
            .iter()
            .map(|m| m.message.as_ref().unwrap().message_id.as_str())
            .collect();
        let want: BTreeSet<&str> = published[all..].iter().map(String::as_str).collect();
        assert_eq!(ids, want, "{sub}");
        let stats = c.stats(sub).await;
        assert_eq!(stats.backlog_messages, 0, "{sub}");
        assert_eq!(stats.dropped_by_retention, 0, "{sub}");
    }
    // Settled segments leave the disk on the ticker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while topic_stats(&mut c, "t").await.segments > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "settled segments kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn reject_publish_without_subscriptions_keeps_nothing_for_anyone_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    create_topic(
        &mut c,
        "t",
        retention(32 * 1024, v1::RetentionMode::RejectPublish),
    )
    .await;
    // No subscription can ever receive these: they are settled for all
    // (none), so nothing is refused and sealed segments go.
    for _ in 0..20 {
        publish_batch(&mut c, "t", 10).await.unwrap();
    }
    server.stop().await;
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    let topic = c
        .admin
        .get_topic(v1::GetTopicRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    let kept = topic.retention.unwrap();
    assert_eq!(kept.mode, v1::RetentionMode::RejectPublish as i32);
    assert_eq!(kept.max_bytes, Some(32 * 1024));
    // Still the same mode after the restart.
    c.create_sub("s", "t").await;
    let err = loop {
        if let Err(e) = publish_batch(&mut c, "t", 10).await {
            break e;
        }
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn retention_modes_are_checked_against_the_limits() {
    let (server, _tmp) = start().await;
    let mut c = server.clients().await;
    let cases = [
        (
            v1::RetentionPolicy {
                max_age_ms: None,
                max_bytes: None,
                mode: v1::RetentionMode::RejectPublish as i32,
            },
            "invalid retention.mode",
        ),
        (
            v1::RetentionPolicy {
                max_age_ms: Some(1000),
                max_bytes: Some(1 << 20),
                mode: v1::RetentionMode::RejectPublish as i32,
            },
            "invalid retention.max_age_ms",
        ),
        (
            v1::RetentionPolicy {
                max_age_ms: None,
                max_bytes: Some(1 << 20),
                mode: 7,
            },
            "invalid retention.mode",
        ),
    ];
    for (policy, want) in cases {
        let err = c
            .admin
            .create_topic(v1::CreateTopicRequest {
                name: "t".into(),
                retention: Some(policy),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(want), "{err:?}");
    }
    // Unspecified reads as drop-oldest, and is returned as such.
    create_topic(
        &mut c,
        "t",
        retention(1 << 20, v1::RetentionMode::Unspecified),
    )
    .await;
    let topic = c
        .admin
        .get_topic(v1::GetTopicRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        topic.retention.unwrap().mode,
        v1::RetentionMode::DropOldest as i32
    );
    server.stop().await;
}

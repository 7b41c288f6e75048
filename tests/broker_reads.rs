//! Disk reads never run under a subscription's lock: a consumer catching up
//! on a backlog older than the tail cache waits for its segment read
//! without holding up the subscription's other consumers, its acks or its
//! ticker. The broker runs on a model file system (SimFs) whose reads of
//! topic segments can be held.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier::broker::{
    AckOutcome, Broker, BrokerConfig, LeaseLimits, Subscription, SubscriptionSpec,
};
use courier::storage::NewRecord;
use courier::storage::io::SimFs;
use courier::storage::meta::Retention;

fn limits(messages_max: usize) -> LeaseLimits {
    LeaseLimits {
        messages_max,
        bytes_max: u64::MAX,
        allow_oversize: true,
        batch_bytes_max: 4 << 20,
        deadline: Duration::from_secs(60),
    }
}

fn message(i: usize) -> NewRecord {
    NewRecord {
        message_id: None,
        target: None,
        attributes: Vec::new(),
        ordering_key: Bytes::new(),
        payload: Bytes::from(format!("{i:04}").repeat(256)),
    }
}

/// A broker on `fs` (its definitions in `dir`) with topic "t" and its
/// subscription "s"; `tail_cache` bytes of recent records in memory.
async fn open(dir: &Path, fs: &SimFs, tail_cache: Option<u64>) -> (Broker, Arc<Subscription>) {
    let mut config = BrokerConfig::new(dir);
    if let Some(bytes) = tail_cache {
        config.tail_cache_bytes_max = bytes;
    }
    let broker = Broker::open_on(config, Arc::new(fs.clone())).await.unwrap();
    broker
        .create_topic("t", Retention::default())
        .await
        .unwrap();
    let sub = broker
        .create_subscription(SubscriptionSpec {
            name: "s".into(),
            topic: "t".into(),
            ack_deadline_ms: None,
            retry: Default::default(),
            dead_letter: None,
            from_earliest: false,
        })
        .await
        .unwrap();
    (broker, sub)
}

/// Publishes messages `0..n` (as [`message`] makes them) to "t".
async fn publish(broker: &Broker, n: usize) {
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(100) {
        let batch = chunk.iter().map(|&i| message(i)).collect();
        broker.publish("t", batch).await.unwrap();
    }
}

/// Polls on this thread: the runtime's timers may be what is stalled.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_read_holds_no_lock_others_need() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = SimFs::new();
    // A tail cache far smaller than the backlog: the oldest records are
    // only in the segment files. 1000 messages of 1 KiB: about 16 times
    // the tail cache.
    let (broker, sub) = open(tmp.path(), &fs, Some(64 * 1024)).await;
    publish(&broker, 1000).await;
    let first = broker.new_consumer_id();
    let held = sub.lease(first, limits(5)).await.unwrap();
    assert_eq!(held.len(), 5);
    assert_eq!(held[0].record.offset.0, 0);

    // A lock held over the read below would stall the runtime's workers
    // (the ticker blocks on it too), so a watchdog thread lets the read go
    // after a while and the test fails on what it records.
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (answered_tx, answered_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn({
        let (fs, stalled) = (fs.clone(), stalled.clone());
        move || {
            if answered_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                stalled.store(true, std::sync::atomic::Ordering::SeqCst);
                fs.hold_reads_under(None);
            }
        }
    });
    // Every read of a topic segment now waits.
    let topics = tmp.path().join("topics");
    fs.hold_reads_under(Some(&topics));
    let second = broker.new_consumer_id();
    let behind = tokio::spawn({
        let sub = sub.clone();
        async move { sub.lease(second, limits(50)).await }
    });
    wait_for("the second lease to read from disk", || fs.reads_held() > 0);
    assert!(!behind.is_finished());

    // Meanwhile the subscription answers: what the first consumer holds is
    // counted, and its acks are applied and durable.
    let outstanding = sub.outstanding(first);
    let ids: Vec<_> = held.iter().map(|d| Some(d.ack_id)).collect();
    let acked = sub.ack(&ids).await.unwrap();
    let overtook = !behind.is_finished();
    let _ = answered_tx.send(()); // the watchdog may have given up
    watchdog.join().unwrap();
    assert!(
        !stalled.load(std::sync::atomic::Ordering::SeqCst),
        "the subscription's lock was held over another consumer's disk read"
    );
    assert!(overtook, "the ack waited for another consumer's disk read");
    assert_eq!(outstanding.messages, 5);
    assert!(acked.iter().all(|o| *o == AckOutcome::Ok), "{acked:?}");
    assert_eq!(sub.outstanding(first).messages, 0);

    // Released, the second consumer gets the next messages in order.
    fs.hold_reads_under(None);
    let got = tokio::time::timeout(Duration::from_secs(5), behind)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let offsets: Vec<u64> = got.iter().map(|d| d.record.offset.0).collect();
    assert_eq!(offsets, (5..55).collect::<Vec<u64>>());
    assert!(
        got.iter()
            .all(|d| d.record.payload == message(d.record.offset.0 as usize).payload)
    );
    broker.close_and_release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_far_behind_reads_the_whole_backlog_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (broker, sub) = open(tmp.path(), &SimFs::new(), Some(64 * 1024)).await;
    publish(&broker, 2000).await;
    // Two consumers alternate: each lease reads from disk or the cache,
    // and between them every offset is handed out once, in order.
    let consumers = [broker.new_consumer_id(), broker.new_consumer_id()];
    let mut next = 0u64;
    let mut turn = 0;
    while next < 2000 {
        let got = sub.lease(consumers[turn % 2], limits(64)).await.unwrap();
        assert!(!got.is_empty(), "nothing leased at offset {next}");
        for d in &got {
            assert_eq!(d.record.offset.0, next);
            assert_eq!(d.record.payload, message(next as usize).payload);
            next += 1;
        }
        let ids: Vec<_> = got.iter().map(|d| Some(d.ack_id)).collect();
        sub.ack(&ids).await.unwrap();
        turn += 1;
    }
    assert!(
        sub.lease(consumers[0], limits(64))
            .await
            .unwrap()
            .is_empty()
    );
    broker.close_and_release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_status_finds_dead_letters_among_thousands() {
    use courier::broker::MessageState;
    use courier::broker::subscription::NackKind;
    let tmp = tempfile::tempdir().unwrap();
    let (broker, sub) = open(tmp.path(), &SimFs::new(), None).await;
    let consumer = broker.new_consumer_id();
    // Publishes `n` messages and rejects every one: `n` dead letters.
    let reject_all = async |n: usize| {
        let mut first = None;
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let appended = broker
                .publish("t", chunk.iter().copied().map(message).collect())
                .await
                .unwrap();
            first.get_or_insert(appended.base_offset.0);
        }
        let first = first.unwrap();
        let mut left = n;
        while left > 0 {
            let got = sub.lease(consumer, limits(500)).await.unwrap();
            assert!(!got.is_empty());
            left -= got.len();
            let ids: Vec<_> = got.iter().map(|d| Some(d.ack_id)).collect();
            let how = NackKind {
                reject: true,
                reason: "not for us",
            };
            let outcomes = sub.nack(&ids, how).await.unwrap();
            assert!(outcomes.iter().all(|o| *o == AckOutcome::Ok));
        }
        first
    };
    let state = async |id: u64| {
        let status = broker.message_status("t", id).await.unwrap();
        assert_eq!(status.subscriptions.len(), 1);
        status.subscriptions[0].1.clone()
    };
    let dead = |state: &MessageState| matches!(state, MessageState::DeadLettered { reason_text, .. } if reason_text == "not for us");

    let first = reject_all(3000).await;
    for id in [
        first,
        first + 1023,
        first + 1024,
        first + 1500,
        first + 2999,
    ] {
        let s = state(id).await;
        assert!(dead(&s), "message {id}: {s:?}");
    }
    // One acknowledged, after the index was built: not a dead letter.
    let acked = broker
        .publish("t", vec![message(0)])
        .await
        .unwrap()
        .base_offset
        .0;
    let got = sub.lease(consumer, limits(1)).await.unwrap();
    sub.ack(&[Some(got[0].ack_id)]).await.unwrap();
    assert!(matches!(state(acked).await, MessageState::Acked));
    // Dead letters written after the index was built are found too.
    let later = reject_all(700).await;
    for id in [later, later + 699] {
        let s = state(id).await;
        assert!(dead(&s), "message {id}: {s:?}");
    }
    assert!(dead(&state(first + 10).await));
    broker.close_and_release().await;
}

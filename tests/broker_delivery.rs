//! Delivery semantics end to end over gRPC: fan-out, acks, deadlines,
//! nacks with backoff, dead letters, redrive, purge, stats and status.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{TestServer, ack_ids, text};
use courier::api::pb::v1;

#[tokio::test]
async fn fan_out_gives_every_subscription_every_message_once() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("orders").await;
    for s in ["a", "b", "c"] {
        c.create_sub(s, "orders").await;
    }
    let payloads: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    let ids = c.publish("orders", &refs).await;
    assert_eq!(ids.len(), 50);
    for s in ["a", "b", "c"] {
        let got = c.pull_n(s, 50, Duration::from_secs(5)).await;
        let texts: BTreeSet<String> = got.iter().map(text).collect();
        assert_eq!(texts.len(), 50, "subscription {s}");
        assert!(got.iter().all(|m| m.delivery_attempt == 1));
        let results = c.ack(s, ack_ids(&got)).await;
        assert!(results.iter().all(|r| r.status == v1::AckStatus::Ok as i32));
        // Nothing more: every message exactly once.
        assert!(c.pull(s, 10, 300).await.is_empty());
        assert_eq!(c.stats(s).await.backlog_messages, 0);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_later_subscription_gets_only_later_messages() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.publish("t", &["before"]).await;
    c.create_sub("late", "t").await;
    c.publish("t", &["after"]).await;
    let got = c.pull_n("late", 2, Duration::from_millis(800)).await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), vec!["after"]);
    // From earliest sees both.
    c.create_sub_with(v1::Subscription {
        name: "early".into(),
        topic: "t".into(),
        start_position: v1::StartPosition::Earliest as i32,
        ..Default::default()
    })
    .await;
    let got = c.pull_n("early", 2, Duration::from_secs(3)).await;
    assert_eq!(
        got.iter().map(text).collect::<Vec<_>>(),
        vec!["before", "after"]
    );
    server.stop().await;
}

#[tokio::test]
async fn an_expired_deadline_redelivers_with_attempt_two() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 200,
        ..Default::default()
    })
    .await;
    c.publish("t", &["x"]).await;
    // The lease starts after this instant, so redelivery cannot come
    // sooner than one deadline after it.
    let before_lease = Instant::now();
    let first = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(first[0].delivery_attempt, 1);
    let second = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert!(before_lease.elapsed() >= Duration::from_millis(200));
    assert_eq!(second[0].delivery_attempt, 2);
    assert_eq!(text(&second[0]), "x");
    // The first ack id is now stale; the second acks.
    let r = c.ack("s", ack_ids(&first)).await;
    assert_eq!(r[0].status, v1::AckStatus::Stale as i32);
    let r = c.ack("s", ack_ids(&second)).await;
    assert_eq!(r[0].status, v1::AckStatus::Ok as i32);
    let r = c.ack("s", ack_ids(&second)).await;
    assert_eq!(r[0].status, v1::AckStatus::AlreadySettled as i32);
    let r = c.ack("s", vec!["garbage".into()]).await;
    assert_eq!(r[0].status, v1::AckStatus::Unknown as i32);
    server.stop().await;
}

#[tokio::test]
async fn a_nack_waits_for_the_retry_backoff() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        retry_policy: Some(v1::RetryPolicy {
            min_backoff_ms: 1000,
            max_backoff_ms: 2000,
            no_jitter: false,
        }),
        ..Default::default()
    })
    .await;
    c.publish("t", &["x"]).await;
    let first = c.pull_n("s", 1, Duration::from_secs(3)).await;
    // The backoff starts when the broker handles the nack, after this.
    let nacked = Instant::now();
    c.nack("s", ack_ids(&first), None).await;
    assert!(
        c.pull("s", 1, 0).await.is_empty(),
        "redelivered before the backoff"
    );
    let again = c.pull_n("s", 1, Duration::from_secs(3)).await;
    // Equal jitter: between half of the 1 s backoff and all of it.
    assert!(
        nacked.elapsed() >= Duration::from_millis(500),
        "{:?}",
        nacked.elapsed()
    );
    assert_eq!(again[0].delivery_attempt, 2);
    server.stop().await;
}

#[tokio::test]
async fn an_expired_lease_and_a_stream_that_ends_wait_for_the_retry_backoff_too() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 100,
        retry_policy: Some(v1::RetryPolicy {
            min_backoff_ms: 1000,
            max_backoff_ms: 2000,
            no_jitter: false,
        }),
        ..Default::default()
    })
    .await;
    c.publish("t", &["x"]).await;
    // A consumer takes it and crashes: the lease expires after 100 ms and
    // the message waits at least half the 1 s backoff more.
    let first = c.pull_n("s", 1, Duration::from_secs(3)).await;
    let leased = Instant::now();
    let again = c.pull_n("s", 1, Duration::from_secs(5)).await;
    assert!(
        leased.elapsed() >= Duration::from_millis(100 + 500),
        "redelivered {:?} after the lease",
        leased.elapsed()
    );
    assert_eq!(again[0].delivery_attempt, first[0].delivery_attempt + 1);
    // Attempt 2 expires too (1–2 s of backoff), then goes to a stream
    // that ends with it leased: attempt 3 failed, so the backoff is the
    // 2 s maximum, at least 1 s with jitter.
    let (tx, mut stream) = c
        .stream(v1::StreamingPullRequest {
            subscription: "s".into(),
            stream_ack_deadline_ms: Some(60_000),
            ..Default::default()
        })
        .await;
    let got = loop {
        let r = stream.message().await.unwrap().unwrap();
        if !r.received_messages.is_empty() {
            break r.received_messages;
        }
    };
    assert_eq!(got[0].delivery_attempt, 3);
    drop((tx, stream));
    let ended = Instant::now();
    let last = c.pull_n("s", 1, Duration::from_secs(8)).await;
    assert!(
        ended.elapsed() >= Duration::from_millis(1000),
        "redelivered {:?} after the stream ended",
        ended.elapsed()
    );
    assert_eq!(last[0].delivery_attempt, 4);
    server.stop().await;
}

#[tokio::test]
async fn exhausted_attempts_dead_letter_once_with_full_metadata_and_redrive_returns_it() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        dead_letter_policy: Some(v1::DeadLetterPolicy {
            max_delivery_attempts: 3,
            forward_topic: String::new(),
        }),
        ..Default::default()
    })
    .await;
    c.create_sub("other", "t").await;
    let ids = c.publish("t", &["poison", "fine"]).await;
    let mut attempts = Vec::new();
    loop {
        let got = c.pull("s", 10, 300).await;
        if got.is_empty() {
            break;
        }
        for m in got {
            if text(&m) == "poison" {
                attempts.push(m.delivery_attempt);
                c.nack("s", vec![m.ack_id.clone()], None).await;
            } else {
                c.ack("s", vec![m.ack_id.clone()]).await;
            }
        }
    }
    assert_eq!(attempts, vec![1, 2, 3]);
    let dls = c.dead_letters("s").await;
    assert_eq!(dls.len(), 1);
    let dl = &dls[0];
    assert_eq!(dl.reason, v1::DeadLetterReason::AttemptsExhausted as i32);
    assert_eq!(
        dl.reason_text,
        "3 delivery attempts failed; the last one was nacked"
    );
    assert_eq!(dl.delivery_attempts, 3);
    assert_eq!(dl.topic, "t");
    assert_eq!(dl.subscription, "s");
    assert_eq!(dl.message.as_ref().unwrap().message_id, ids[0]);
    assert_eq!(&dl.message.as_ref().unwrap().data[..], b"poison");
    assert!(
        dl.first_delivery_time.is_some()
            && dl.last_delivery_time.is_some()
            && dl.dead_letter_time.is_some()
    );
    assert_eq!(c.stats("s").await.dead_lettered_messages, 1);
    assert_eq!(c.stats("s").await.backlog_messages, 0);

    // Status: dead-lettered on s, pending on other.
    let status = c
        .admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let states: Vec<(String, i32)> = status
        .subscriptions
        .iter()
        .map(|s| (s.subscription.clone(), s.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("other".into(), v1::MessageState::Pending as i32),
            ("s".into(), v1::MessageState::DeadLettered as i32)
        ]
    );

    // Redrive: back into s only, attempts reset.
    let n = c
        .admin
        .redrive_dead_letters(v1::RedriveDeadLettersRequest {
            subscription: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(n, 1);
    assert!(c.dead_letters("s").await.is_empty());
    let state_on_s = |mut c: common::Clients, id: String| async move {
        let status = c
            .admin
            .get_message_status(v1::GetMessageStatusRequest {
                topic: "t".into(),
                message_id: id,
            })
            .await
            .unwrap()
            .into_inner();
        let s = status
            .subscriptions
            .iter()
            .find(|s| s.subscription == "s")
            .unwrap()
            .clone();
        (s.state, s.delivery_attempt)
    };
    // "Where is my job?" follows the redriven copy.
    assert_eq!(
        state_on_s(c.clone(), ids[0].clone()).await,
        (v1::MessageState::Pending as i32, 0)
    );
    let back = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(
        state_on_s(c.clone(), ids[0].clone()).await,
        (v1::MessageState::InFlight as i32, 1)
    );
    assert_eq!(text(&back[0]), "poison");
    assert_eq!(back[0].delivery_attempt, 1);
    assert_eq!(back[0].message.as_ref().unwrap().message_id, ids[0]);
    // "other" sees the two originals only, not the redriven copy.
    let other = c.pull_n("other", 3, Duration::from_millis(800)).await;
    assert_eq!(other.len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_rejected_message_goes_straight_to_the_dead_letter_queue_with_its_reason() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    c.publish("t", &["bad"]).await;
    let got = c.pull_n("s", 1, Duration::from_secs(3)).await;
    let r = c.nack("s", ack_ids(&got), Some("schema mismatch")).await;
    assert_eq!(r[0].status, v1::AckStatus::Ok as i32);
    let dls = c.dead_letters("s").await;
    assert_eq!(dls.len(), 1);
    assert_eq!(dls[0].reason, v1::DeadLetterReason::Rejected as i32);
    assert_eq!(dls[0].reason_text, "schema mismatch");
    assert_eq!(dls[0].delivery_attempts, 1);
    assert!(c.pull("s", 1, 300).await.is_empty());
    // Purge the dead letters.
    let purged = c
        .admin
        .purge_dead_letters(v1::PurgeDeadLettersRequest {
            subscription: "s".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 1);
    assert!(c.dead_letters("s").await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn purge_acks_everything_published_so_far() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    c.publish("t", &["1", "2", "3"]).await;
    let leased = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(c.stats("s").await.backlog_messages, 3);
    assert_eq!(c.stats("s").await.in_flight_messages, 1);
    let purged = c
        .admin
        .purge_subscription(v1::PurgeSubscriptionRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner()
        .purged_messages;
    assert_eq!(purged, 3);
    let stats = c.stats("s").await;
    assert_eq!((stats.backlog_messages, stats.in_flight_messages), (0, 0));
    assert!(c.pull("s", 10, 200).await.is_empty());
    assert_eq!(
        c.ack("s", ack_ids(&leased)).await[0].status,
        v1::AckStatus::AlreadySettled as i32
    );
    c.publish("t", &["4"]).await;
    let got = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(text(&got[0]), "4");
    server.stop().await;
}

#[tokio::test]
async fn ack_ids_are_unguessable_and_valid_only_on_their_subscription() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    for s in ["a", "b"] {
        c.create_sub_with(v1::Subscription {
            name: s.into(),
            topic: "t".into(),
            ack_deadline_ms: 60_000,
            ..Default::default()
        })
        .await;
    }
    c.publish("t", &["m0", "m1"]).await;
    let on_a = c.pull_n("a", 2, Duration::from_secs(3)).await;
    let on_b = c.pull_n("b", 2, Duration::from_secs(3)).await;
    assert!(
        on_a.iter().all(|m| m.ack_id.len() >= 32),
        "opaque, long ack ids"
    );
    assert_ne!(on_a[0].ack_id, on_b[0].ack_id);

    // A's ack ids on B, ids guessed from offsets and attempts, and an id
    // with one character changed: all UNKNOWN, and B's leases stay.
    let mut tampered = on_b[0].ack_id.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let mut forged = ack_ids(&on_a);
    forged.extend(["0-1".to_string(), "1-1".to_string()]);
    forged.push(String::from_utf8(tampered).unwrap());
    let results = c.ack("b", forged.clone()).await;
    assert_eq!(results.len(), forged.len());
    assert!(
        results
            .iter()
            .all(|r| r.status == v1::AckStatus::Unknown as i32),
        "{results:?}"
    );
    let rejected = c.nack("b", forged, Some("guessed")).await;
    assert!(
        rejected
            .iter()
            .all(|r| r.status == v1::AckStatus::Unknown as i32)
    );
    assert!(c.dead_letters("b").await.is_empty());
    assert_eq!(c.stats("b").await.in_flight_messages, 2);

    // The real ids still work.
    let ok = c.ack("b", ack_ids(&on_b)).await;
    assert!(ok.iter().all(|r| r.status == v1::AckStatus::Ok as i32));
    let ok = c.ack("a", ack_ids(&on_a)).await;
    assert!(ok.iter().all(|r| r.status == v1::AckStatus::Ok as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_redrives_return_each_dead_letter_once() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 60_000,
        ..Default::default()
    })
    .await;
    let payloads: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    c.publish("t", &refs).await;
    let mut got = Vec::new();
    while got.len() < payloads.len() {
        got.extend(c.pull("s", 100, 500).await);
    }
    for chunk in got.chunks(100) {
        c.nack("s", ack_ids(chunk), Some("bad")).await;
    }
    assert_eq!(c.dead_letters("s").await.len(), 300);

    let redrive = |mut admin: courier::api::pb::v1::admin_client::AdminClient<_>| async move {
        admin
            .redrive_dead_letters(v1::RedriveDeadLettersRequest {
                subscription: "s".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .redriven
    };
    let (a, b) = tokio::join!(redrive(c.admin.clone()), redrive(c.admin.clone()));
    assert_eq!(a + b, 300, "redriven {a} + {b}");
    let mut seen = BTreeSet::new();
    loop {
        let batch = c.pull("s", 100, 500).await;
        if batch.is_empty() {
            break;
        }
        for m in &batch {
            assert!(seen.insert(text(m)), "{} redriven twice", text(m));
        }
        c.ack("s", ack_ids(&batch)).await;
    }
    assert_eq!(seen.len(), 300);
}

#[tokio::test]
async fn an_attempts_exhausted_dead_letter_says_how_the_last_attempt_failed() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 100,
        dead_letter_policy: Some(v1::DeadLetterPolicy {
            max_delivery_attempts: 1,
            forward_topic: String::new(),
        }),
        ..Default::default()
    })
    .await;
    c.publish("t", &["expires", "stream ends"]).await;
    // The first is pulled and left to expire.
    let first = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(text(&first[0]), "expires");
    // The second goes to a stream that ends with it leased.
    let (tx, mut stream) = c
        .stream(v1::StreamingPullRequest {
            subscription: "s".into(),
            stream_ack_deadline_ms: Some(60_000),
            ..Default::default()
        })
        .await;
    loop {
        let r = stream.message().await.unwrap().unwrap();
        if !r.received_messages.is_empty() {
            assert_eq!(text(&r.received_messages[0]), "stream ends");
            break;
        }
    }
    drop((tx, stream));
    let deadline = Instant::now() + Duration::from_secs(5);
    let dls = loop {
        let dls = c.dead_letters("s").await;
        if dls.len() == 2 || Instant::now() > deadline {
            break dls;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut texts: Vec<(String, String)> = dls
        .iter()
        .map(|d| {
            let data = d.message.as_ref().unwrap().data.to_vec();
            (String::from_utf8(data).unwrap(), d.reason_text.clone())
        })
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        vec![
            (
                "expires".to_string(),
                "1 delivery attempt failed; the last one expired (its ack deadline passed)"
                    .to_string()
            ),
            (
                "stream ends".to_string(),
                "1 delivery attempt failed; the last one was leased to a stream that ended"
                    .to_string()
            ),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_pull_waiting_when_the_broker_shuts_down_ends_unavailable() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let mut waiting = c.clone();
    let pull = tokio::spawn(async move {
        waiting
            .subscriber
            .pull(v1::PullRequest {
                subscription: "s".into(),
                max_messages: 10,
                wait_ms: 30_000,
            })
            .await
    });
    // Let the Pull reach the broker and wait there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.stop().await;
    let status = pull
        .await
        .unwrap()
        .expect_err("a Pull during shutdown is UNAVAILABLE");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} for the Pull",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_dead_letter_redriven_with_a_replacement_is_delivered_with_it_and_says_so() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    c.create_sub("other", "t").await;
    c.publisher
        .publish(v1::PublishRequest {
            topic: "t".into(),
            messages: vec![v1::PublishMessage {
                data: "{\"amount\": \"12,50\"}".into(),
                attributes: [("kind".to_string(), "invoice".to_string())].into(),
                ordering_key: "acct-7".into(),
            }],
        })
        .await
        .unwrap();
    let got = c.pull_n("s", 1, Duration::from_secs(3)).await;
    let id = got[0].message.as_ref().unwrap().message_id.clone();
    c.nack("s", ack_ids(&got), Some("amount is not a number"))
        .await;
    let redriven = c
        .admin
        .redrive_dead_letters(v1::RedriveDeadLettersRequest {
            subscription: "s".into(),
            message_ids: vec![id.clone()],
            reason: None,
            replacement: Some(v1::RedriveReplacement {
                data: Some("{\"amount\": 12.5}".into()),
                replace_attributes: true,
                attributes: [("kind".to_string(), "invoice-v2".to_string())].into(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(redriven, 1);
    assert!(c.dead_letters("s").await.is_empty());

    let status = c.status_in("t", &id, "s").await;
    assert_eq!(status.state, v1::MessageState::Pending as i32);
    assert_eq!(status.redrive, v1::Redrive::Replaced as i32);
    // Other subscriptions are not touched.
    assert_eq!(
        c.status_in("t", &id, "other").await.redrive,
        v1::Redrive::None as i32
    );

    let again = c.pull_n("s", 1, Duration::from_secs(3)).await;
    let m = again[0].message.as_ref().unwrap();
    assert_eq!(m.message_id, id, "the message keeps its id");
    assert_eq!(&m.data[..], b"{\"amount\": 12.5}");
    assert_eq!(
        m.attributes.get("kind").map(String::as_str),
        Some("invoice-v2")
    );
    assert_eq!(m.ordering_key, "acct-7");
    assert_eq!(again[0].delivery_attempt, 1);
    // Rejected again: the dead letter says it was a replaced redrive.
    c.nack("s", ack_ids(&again), Some("still wrong")).await;
    let status = c.status_in("t", &id, "s").await;
    assert_eq!(status.state, v1::MessageState::DeadLettered as i32);
    assert_eq!(status.redrive, v1::Redrive::Replaced as i32);
    assert_eq!(status.dead_letter_reason_text, "still wrong");

    // The copy's own offset is not a message of its own.
    let next = c
        .admin
        .get_topic_stats(v1::GetTopicStatsRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .next_offset;
    let copy = c
        .admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: (next - 1).to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(copy.code(), tonic::Code::NotFound);
    assert!(
        copy.message()
            .contains(&format!("redriven copy of message {id}")),
        "{}",
        copy.message()
    );
    server.stop().await;
}

//! A graceful restart keeps topics, subscriptions, unacked messages,
//! attempt numbers and dead letters.

mod common;

use std::time::Duration;

use common::{TestServer, ack_ids, test_config, text};
use courier::api::pb::v1;

#[tokio::test]
async fn graceful_restart_keeps_everything_where_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 60_000,
        dead_letter_policy: Some(v1::DeadLetterPolicy {
            max_delivery_attempts: 5,
            forward_topic: String::new(),
        }),
        ..Default::default()
    })
    .await;
    c.create_sub("other", "t").await;
    c.publish("t", &["acked", "leased", "pending", "rejected"])
        .await;
    c.create_sub("late", "t").await;
    c.publish("t", &["for late"]).await;
    let late = c.pull_n("late", 1, Duration::from_secs(3)).await;
    assert_eq!(text(&late[0]), "for late");
    let got = c.pull_n("s", 4, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 4);
    for m in &got {
        match text(m).as_str() {
            "acked" => assert_eq!(
                c.ack("s", vec![m.ack_id.clone()]).await[0].status,
                v1::AckStatus::Ok as i32
            ),
            "pending" => {
                c.nack("s", vec![m.ack_id.clone()], None).await;
            }
            "rejected" => {
                c.nack("s", vec![m.ack_id.clone()], Some("nope")).await;
            }
            _ => {} // "leased" stays in flight across the restart
        }
    }
    // "pending" was nacked and is redelivered with attempt 2, then left.
    let again = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(
        (text(&again[0]).as_str(), again[0].delivery_attempt),
        ("pending", 2)
    );
    server.stop().await;

    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    let topics = c
        .admin
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(
        topics.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        vec!["t"]
    );
    let sub = c
        .admin
        .get_subscription(v1::GetSubscriptionRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sub.ack_deadline_ms, 60_000);
    assert_eq!(sub.dead_letter_policy.unwrap().max_delivery_attempts, 5);
    // Dead letter kept.
    let dls = c.dead_letters("s").await;
    assert_eq!(dls.len(), 1);
    assert_eq!(dls[0].reason_text, "nope");
    // Unacked messages come back with the next attempt numbers; the acked
    // one does not.
    let mut back: Vec<(String, u32)> = c
        .pull_n("s", 4, Duration::from_secs(3))
        .await
        .iter()
        .map(|m| (text(m), m.delivery_attempt))
        .collect();
    back.sort();
    assert_eq!(
        back,
        vec![
            ("for late".to_string(), 1),
            ("leased".to_string(), 2),
            ("pending".to_string(), 3)
        ]
    );
    // The other subscription still has all five.
    let other = c.pull_n("other", 5, Duration::from_secs(3)).await;
    assert_eq!(other.len(), 5);
    // "late" never sees messages from before it existed, after a restart
    // too; its unacked message comes back.
    let late = c.pull_n("late", 5, Duration::from_millis(800)).await;
    assert_eq!(late.iter().map(text).collect::<Vec<_>>(), vec!["for late"]);
    assert!(
        c.ack("other", ack_ids(&other))
            .await
            .iter()
            .all(|r| r.status == v1::AckStatus::Ok as i32)
    );
    // Publishing continues after the last offset.
    let ids = c.publish("t", &["next"]).await;
    assert_eq!(ids, vec!["5".to_string()]);
    server.stop().await;
}

#[tokio::test]
async fn retention_frees_segments_once_every_subscription_acked_past_them() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("a", "t").await;
    c.create_sub("b", "t").await;
    let payload = "x".repeat(1000);
    for _ in 0..10 {
        let batch: Vec<&str> = (0..50).map(|_| payload.as_str()).collect();
        c.publish("t", &batch).await;
    }
    let stats = |c: &mut common::Clients| {
        let mut a = c.admin.clone();
        async move {
            a.get_topic_stats(v1::GetTopicStatsRequest { name: "t".into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let before = stats(&mut c).await;
    assert!(before.segments > 3, "{before:?}");
    // Only "a" acks everything: nothing can go yet.
    let got = c.pull_n("a", 500, Duration::from_secs(5)).await;
    c.ack("a", ack_ids(&got)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stats(&mut c).await.segments, before.segments);
    // Then "b" too: disk use returns to about one segment.
    let got = c.pull_n("b", 500, Duration::from_secs(5)).await;
    for chunk in got.chunks(500) {
        c.ack("b", ack_ids(chunk)).await;
    }
    let mut after = stats(&mut c).await;
    for _ in 0..30 {
        if after.segments == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = stats(&mut c).await;
    }
    assert_eq!(after.segments, 1, "{after:?}");
    server.stop().await;
}

#[tokio::test]
async fn journal_compaction_under_traffic_keeps_every_subscription_state() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(tmp.path());
    config.journal_compact_bytes = 8 * 1024;
    let server = TestServer::start_with(config.clone()).await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("a", "t").await;
    c.create_sub("b", "t").await;
    let payloads: Vec<String> = (0..600).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    for chunk in refs.chunks(100) {
        c.publish("t", chunk).await;
    }
    // "a" acks everything in small steps (many journal records); "b" acks
    // the even ones only.
    let mut acked_b = 0;
    for _ in 0..60 {
        let got = c.pull("a", 10, 200).await;
        c.ack("a", ack_ids(&got)).await;
        let got = c.pull("b", 10, 200).await;
        let even: Vec<_> = got
            .iter()
            .filter(|m| text(m)[1..].parse::<u32>().unwrap() % 2 == 0)
            .cloned()
            .collect();
        acked_b += even.len();
        c.ack("b", ack_ids(&even)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(acked_b, 300);
    // Let at least one compaction run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.stop().await;
    // Compaction deleted the journal's first segment.
    let first_segment = tmp.path().join("state").join("00000000000000000000.seg");
    assert!(
        !first_segment.exists(),
        "the state journal was never compacted"
    );

    let server = TestServer::start_with(config).await;
    let mut c = server.clients().await;
    assert_eq!(c.stats("a").await.backlog_messages, 0);
    assert_eq!(c.stats("b").await.backlog_messages, 300);
    let rest = c.pull_n("b", 300, Duration::from_secs(5)).await;
    assert_eq!(rest.len(), 300);
    assert!(
        rest.iter()
            .all(|m| text(m)[1..].parse::<u32>().unwrap() % 2 == 1)
    );
    assert!(rest.iter().all(|m| m.delivery_attempt == 2));
    server.stop().await;
}

#[tokio::test]
async fn size_retention_drops_old_messages_even_for_a_lagging_subscription() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.admin
        .create_topic(v1::CreateTopicRequest {
            name: "t".into(),
            retention: Some(v1::RetentionPolicy {
                max_age_ms: None,
                max_bytes: Some(128 * 1024),
                mode: v1::RetentionMode::Unspecified as i32,
            }),
        })
        .await
        .unwrap();
    c.create_sub("lagging", "t").await;
    let payload = "x".repeat(1000);
    for _ in 0..12 {
        let batch: Vec<&str> = (0..50).map(|_| payload.as_str()).collect();
        c.publish("t", &batch).await;
    }
    let mut first = 0;
    for _ in 0..40 {
        let t = c
            .admin
            .get_topic_stats(v1::GetTopicStatsRequest { name: "t".into() })
            .await
            .unwrap()
            .into_inner();
        first = t.first_offset;
        if first > 0 {
            assert!(t.retained_bytes <= 192 * 1024, "{t:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(first > 0, "retention never ran");
    // A message retention removed is not in the topic any more: NOT_FOUND,
    // never "acked".
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
    // The subscription skips what is gone and gets the rest, in order.
    let retained = usize::try_from(600 - first).unwrap();
    let got = c.pull_n("lagging", retained, Duration::from_secs(5)).await;
    let ids: Vec<u64> = got
        .iter()
        .map(|m| m.message.as_ref().unwrap().message_id.parse().unwrap())
        .collect();
    assert_eq!(ids.first().copied(), Some(first));
    assert_eq!(ids.last().copied(), Some(599));
    assert_eq!(ids.len() as u64, 600 - first);
    c.ack("lagging", ack_ids(&got)).await;
    assert_eq!(c.stats("lagging").await.backlog_messages, 0);
    server.stop().await;
}

#[tokio::test]
async fn state_about_a_lost_topic_tail_is_forgotten_so_new_messages_start_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    c.publish("t", &["a", "b", "c"]).await;
    // Deliver all three (attempt 1 is journaled for offsets 0..3), ack none.
    let got = c.pull_n("s", 3, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 3);
    server.stop().await;

    // Simulate a power loss that kept the journal but lost the topic's
    // last record: cut the segment in the middle of offset 2's frame.
    let topic_dir = std::fs::read_dir(tmp.path().join("topics"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let seg = topic_dir.join("00000000000000000000.seg");
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 3)
        .unwrap();

    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    // Offset 2 now names a new message, delivered as a first attempt.
    let ids = c.publish("t", &["new"]).await;
    assert_eq!(ids, vec!["2".to_string()]);
    let mut back: Vec<(String, u32)> = c
        .pull_n("s", 3, Duration::from_secs(3))
        .await
        .iter()
        .map(|m| (text(m), m.delivery_attempt))
        .collect();
    back.sort();
    assert_eq!(
        back,
        vec![
            ("a".to_string(), 2),
            ("b".to_string(), 2),
            ("new".to_string(), 1)
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn the_unacked_window_bounds_what_a_subscription_hands_out() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(tmp.path());
    config.unacked_window_max = 5;
    let server = TestServer::start_with(config).await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let payloads: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    c.publish("t", &refs).await;
    // Only five past the ack floor are handed out while the oldest is held.
    let first = c.pull("s", 100, 500).await;
    assert_eq!(first.len(), 5);
    assert!(c.pull("s", 100, 300).await.is_empty());
    // Settling the oldest opens the window by as much.
    c.ack("s", ack_ids(&first[..2])).await;
    let more = c.pull("s", 100, 500).await;
    assert_eq!(more.iter().map(text).collect::<Vec<_>>(), vec!["m5", "m6"]);
    server.stop().await;
}

#[tokio::test]
async fn a_last_attempt_in_flight_at_restart_is_dead_lettered_not_delivered_again() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 60_000,
        dead_letter_policy: Some(v1::DeadLetterPolicy {
            max_delivery_attempts: 3,
            forward_topic: String::new(),
        }),
        ..Default::default()
    })
    .await;
    c.publish("t", &["poison", "fine"]).await;
    for attempt in 1..=3 {
        let got = c.pull_n("s", 2, Duration::from_secs(3)).await;
        assert!(got.iter().all(|m| m.delivery_attempt == attempt));
        let fine: Vec<_> = got.iter().filter(|m| text(m) == "fine").cloned().collect();
        let poison: Vec<_> = got
            .iter()
            .filter(|m| text(m) == "poison")
            .cloned()
            .collect();
        if attempt < 3 {
            c.nack("s", ack_ids(&got), None).await;
        } else {
            // Attempt 3 of "poison" stays in flight across the restart.
            c.ack("s", ack_ids(&fine)).await;
            assert_eq!(poison.len(), 1);
        }
    }
    server.stop().await;

    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    let again = c.pull("s", 10, 500).await;
    assert!(
        again.is_empty(),
        "delivered past the attempt limit: {:?}",
        again
            .iter()
            .map(|m| (text(m), m.delivery_attempt))
            .collect::<Vec<_>>()
    );
    let dead = c.dead_letters("s").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].delivery_attempts, 3);
    assert_eq!(
        dead[0].reason_text,
        "3 delivery attempts failed; the last one was in flight when the broker stopped"
    );
    assert_eq!(c.stats("s").await.backlog_messages, 0);
    server.stop().await;
}

#[tokio::test]
async fn nack_reasons_are_kept_per_message_across_a_restart_and_reach_the_dead_letter() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 60_000,
        retry_policy: Some(v1::RetryPolicy {
            min_backoff_ms: 1,
            max_backoff_ms: 1,
            no_jitter: false,
        }),
        dead_letter_policy: Some(v1::DeadLetterPolicy {
            max_delivery_attempts: 3,
            forward_topic: String::new(),
        }),
        ..Default::default()
    })
    .await;
    let ids = c.publish("t", &["job"]).await;
    let first = c.pull_n("s", 1, Duration::from_secs(3)).await;
    c.nack_because("s", ack_ids(&first), "billing timed out")
        .await;
    let status = c.status_in("t", &ids[0], "s").await;
    assert_eq!(status.state, v1::MessageState::Pending as i32);
    assert_eq!(
        (status.last_nack_reason.as_str(), status.last_nack_attempt),
        ("billing timed out", 1)
    );
    // A nack without a reason keeps the earlier one, with its attempt.
    let second = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(second[0].delivery_attempt, 2);
    c.nack("s", ack_ids(&second), None).await;
    server.stop().await;

    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    let status = c.status_in("t", &ids[0], "s").await;
    assert_eq!(
        (
            status.delivery_attempt,
            status.last_nack_reason.as_str(),
            status.last_nack_attempt
        ),
        (2, "billing timed out", 1)
    );
    // The last attempt is nacked with a new reason: the dead letter has it.
    let third = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(third[0].delivery_attempt, 3);
    c.nack_because("s", ack_ids(&third), "card declined").await;
    let dls = c.dead_letters("s").await;
    assert_eq!(dls.len(), 1);
    assert_eq!(
        (dls[0].last_nack_reason.as_str(), dls[0].last_nack_attempt),
        ("card declined", 3)
    );
    assert_eq!(
        dls[0].reason_text,
        "3 delivery attempts failed; the last one was nacked: card declined"
    );
    let status = c.status_in("t", &ids[0], "s").await;
    assert_eq!(status.state, v1::MessageState::DeadLettered as i32);
    assert_eq!(status.last_nack_reason, "card declined");
    server.stop().await;
}

#[tokio::test]
async fn an_acked_message_keeps_no_nack_reason_or_attempt_count() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        retry_policy: Some(v1::RetryPolicy {
            min_backoff_ms: 1,
            max_backoff_ms: 1,
            no_jitter: false,
        }),
        ..Default::default()
    })
    .await;
    let ids = c.publish("t", &["job"]).await;
    let first = c.pull_n("s", 1, Duration::from_secs(3)).await;
    c.nack_because("s", ack_ids(&first), "flaky").await;
    let again = c.pull_n("s", 1, Duration::from_secs(3)).await;
    let status = c.status_in("t", &ids[0], "s").await;
    assert_eq!(status.state, v1::MessageState::InFlight as i32);
    assert_eq!((status.delivery_attempt, status.last_nack_attempt), (2, 1));
    c.ack("s", ack_ids(&again)).await;
    let status = c.status_in("t", &ids[0], "s").await;
    assert_eq!(status.state, v1::MessageState::Acked as i32);
    assert_eq!(
        (
            status.delivery_attempt,
            status.last_nack_reason.as_str(),
            status.last_nack_attempt
        ),
        (0, "", 0)
    );
    server.stop().await;
}

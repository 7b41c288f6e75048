//! Admin operations end to end: updates, deletes and their files, orphan
//! clean-up, message status, stats, dead-letter forwarding, health and
//! reflection.

mod common;

use std::time::Duration;

use common::{TestServer, ack_ids, test_config, text};
use courier::api::pb::v1;
use tokio_stream::StreamExt;

#[tokio::test]
async fn update_subscription_changes_only_the_masked_fields() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 5_000,
        retry_policy: Some(v1::RetryPolicy {
            min_backoff_ms: 10,
            max_backoff_ms: 20,
            no_jitter: false,
        }),
        ..Default::default()
    })
    .await;
    let updated = c
        .admin
        .update_subscription(v1::UpdateSubscriptionRequest {
            subscription: Some(v1::Subscription {
                name: "s".into(),
                ack_deadline_ms: 9_000,
                dead_letter_policy: Some(v1::DeadLetterPolicy {
                    max_delivery_attempts: 4,
                    forward_topic: String::new(),
                }),
                ..Default::default()
            }),
            update_mask: vec!["ack_deadline_ms".into(), "dead_letter_policy".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.ack_deadline_ms, 9_000);
    assert_eq!(updated.dead_letter_policy.unwrap().max_delivery_attempts, 4);
    assert_eq!(updated.retry_policy.unwrap().min_backoff_ms, 10);
    let listed = c
        .admin
        .list_subscriptions(v1::ListSubscriptionsRequest { topic: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions.len(), 1);
    assert_eq!(listed.subscriptions[0].ack_deadline_ms, 9_000);
    server.stop().await;
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn deleting_a_topic_removes_its_subscriptions_and_files_and_orphans_are_cleaned_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("keep").await;
    c.create_topic("gone").await;
    c.create_sub("s1", "gone").await;
    c.create_sub("s2", "keep").await;
    c.publish("gone", &["x"]).await;
    c.publish("keep", &["y"]).await;
    // Dead-letter one message on each subscription: their dead-letter logs
    // (opened on first use) now exist on disk.
    for (sub, n) in [("s1", "x"), ("s2", "y")] {
        let got = c.pull_n(sub, 1, std::time::Duration::from_secs(3)).await;
        assert_eq!(text(&got[0]), n);
        c.nack(sub, ack_ids(&got), Some("test")).await;
    }
    assert_eq!(entries(&tmp.path().join("topics")).len(), 2);
    assert_eq!(entries(&tmp.path().join("subscriptions")).len(), 2);
    c.admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "gone".into(),
            force: true,
        })
        .await
        .unwrap();
    assert_eq!(entries(&tmp.path().join("topics")).len(), 1);
    assert_eq!(entries(&tmp.path().join("subscriptions")).len(), 1);
    let err = c
        .admin
        .get_subscription(v1::GetSubscriptionRequest { name: "s1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Re-creating the name starts empty.
    c.create_topic("gone").await;
    let stats = c
        .admin
        .get_topic_stats(v1::GetTopicStatsRequest {
            name: "gone".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.next_offset, 0);
    server.stop().await;

    // Leftovers of a crash half-way through a create or delete.
    std::fs::create_dir_all(tmp.path().join("topics/999999/x")).unwrap();
    std::fs::create_dir_all(tmp.path().join("subscriptions/42.deleting")).unwrap();
    let before = entries(&tmp.path().join("topics"));
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let after = entries(&tmp.path().join("topics"));
    assert_eq!(after.len(), before.len() - 1, "{before:?} -> {after:?}");
    assert_eq!(entries(&tmp.path().join("subscriptions")).len(), 1);
    let mut c = server.clients().await;
    assert_eq!(
        c.admin
            .list_topics(v1::ListTopicsRequest {})
            .await
            .unwrap()
            .into_inner()
            .topics
            .len(),
        2
    );
    server.stop().await;
}

#[tokio::test]
async fn message_status_reports_each_state() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("acker", "t").await;
    let early = c.publish("t", &["early"]).await;
    c.create_sub("holder", "t").await;
    c.create_sub("idle", "t").await;
    let ids = c.publish("t", &["job"]).await;
    let got = c.pull_n("acker", 2, Duration::from_secs(3)).await;
    c.ack("acker", ack_ids(&got)).await;
    let held = c.pull_n("holder", 1, Duration::from_secs(3)).await;
    assert_eq!(text(&held[0]), "job");
    let status = c
        .admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.publish_time.is_some());
    let by_sub: Vec<(String, i32, u32, bool)> = status
        .subscriptions
        .iter()
        .map(|s| {
            (
                s.subscription.clone(),
                s.state,
                s.delivery_attempt,
                s.lease_deadline.is_some(),
            )
        })
        .collect();
    assert_eq!(
        by_sub,
        vec![
            ("acker".into(), v1::MessageState::Acked as i32, 0, false),
            ("holder".into(), v1::MessageState::InFlight as i32, 1, true),
            ("idle".into(), v1::MessageState::Pending as i32, 0, false),
        ]
    );
    let status = c
        .admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: early[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.subscriptions[1].state,
        v1::MessageState::NotSubscribed as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn stats_report_backlog_in_flight_and_oldest_age() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    c.publish("t", &["a", "b", "c", "d"]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let held = c.pull_n("s", 2, Duration::from_secs(3)).await;
    c.ack("s", ack_ids(&held[..1])).await;
    let s = c.stats("s").await;
    assert_eq!(s.backlog_messages, 3);
    assert_eq!(s.in_flight_messages, 1);
    assert!(s.backlog_bytes > 0);
    assert!(s.oldest_unacked_age_ms.unwrap() >= 40, "{s:?}");
    let t = c
        .admin
        .get_topic_stats(v1::GetTopicStatsRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            t.first_offset,
            t.next_offset,
            t.retained_messages,
            t.subscriptions
        ),
        (0, 4, 4, 1)
    );
    let b = c
        .admin
        .get_broker_stats(v1::GetBrokerStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (b.topics, b.subscriptions, b.fsync_mode.as_str()),
        (1, 1, "always")
    );
    assert!(b.resident_memory_bytes > 0 && b.data_dir_bytes > 0);
    server.stop().await;
}

#[tokio::test]
async fn dead_letters_are_forwarded_to_the_forward_topic() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_topic("graveyard").await;
    c.create_sub("watch", "graveyard").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        dead_letter_policy: Some(v1::DeadLetterPolicy {
            max_delivery_attempts: 1,
            forward_topic: "graveyard".into(),
        }),
        ..Default::default()
    })
    .await;
    c.publish("t", &["doomed"]).await;
    let got = c.pull_n("s", 1, Duration::from_secs(3)).await;
    c.nack("s", ack_ids(&got), None).await;
    let forwarded = c.pull_n("watch", 1, Duration::from_secs(3)).await;
    assert_eq!(text(&forwarded[0]), "doomed");
    assert_eq!(c.dead_letters("s").await.len(), 1);
    // The forward topic cannot be deleted while it is used.
    let err = c
        .admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "graveyard".into(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in [
        "courier.v1.Publisher",
        "courier.v1.Subscriber",
        "courier.v1.Admin",
    ] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "courier.v1.Publisher",
        "courier.v1.Subscriber",
        "courier.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing from {names:?}"
        );
    }
    server.stop().await;
}

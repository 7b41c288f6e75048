//! Every row of the bad-input table gets its documented status, and the
//! broker stays up afterwards.

mod common;

use common::TestServer;
use courier::api::pb::v1;
use tonic::Code;

fn msg(data: Vec<u8>) -> v1::PublishMessage {
    v1::PublishMessage {
        data: data.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_input_gets_a_precise_status_naming_the_field() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let big = vec![0u8; 10 * 1024 * 1024 + 1];
    let many_attrs: std::collections::HashMap<String, String> =
        (0..101).map(|i| (format!("k{i}"), "v".into())).collect();

    // (what, result, expected code, text the message must contain)
    let mut rows: Vec<(&str, Result<(), tonic::Status>, Code, &str)> = Vec::new();
    macro_rules! row {
        ($what:expr, $call:expr, $code:expr, $needle:expr) => {
            rows.push(($what, $call.await.map(|_| ()), $code, $needle));
        };
    }
    let mut a = c.admin.clone();
    let mut p = c.publisher.clone();
    let mut s = c.subscriber.clone();
    row!(
        "topic name empty",
        a.create_topic(v1::CreateTopicRequest {
            name: "".into(),
            retention: None
        }),
        Code::InvalidArgument,
        "name"
    );
    row!(
        "topic name starts with digit",
        a.create_topic(v1::CreateTopicRequest {
            name: "9x".into(),
            retention: None
        }),
        Code::InvalidArgument,
        "name"
    );
    row!(
        "topic name with slash",
        a.create_topic(v1::CreateTopicRequest {
            name: "a/b".into(),
            retention: None
        }),
        Code::InvalidArgument,
        "name"
    );
    row!(
        "topic name too long",
        a.create_topic(v1::CreateTopicRequest {
            name: "x".repeat(256),
            retention: None
        }),
        Code::InvalidArgument,
        "name"
    );
    row!(
        "topic exists",
        a.create_topic(v1::CreateTopicRequest {
            name: "t".into(),
            retention: None
        }),
        Code::AlreadyExists,
        "t"
    );
    row!(
        "unknown topic",
        a.get_topic(v1::GetTopicRequest {
            name: "nope".into()
        }),
        Code::NotFound,
        "nope"
    );
    row!(
        "delete unknown topic",
        a.delete_topic(v1::DeleteTopicRequest {
            name: "nope".into()
        }),
        Code::NotFound,
        "nope"
    );
    row!(
        "sub on unknown topic",
        a.create_subscription(v1::Subscription {
            name: "x".into(),
            topic: "nope".into(),
            ..Default::default()
        }),
        Code::NotFound,
        "nope"
    );
    row!(
        "sub exists",
        a.create_subscription(v1::Subscription {
            name: "s".into(),
            topic: "t".into(),
            ..Default::default()
        }),
        Code::AlreadyExists,
        "s"
    );
    row!(
        "ack deadline too short",
        a.create_subscription(v1::Subscription {
            name: "x".into(),
            topic: "t".into(),
            ack_deadline_ms: 99,
            ..Default::default()
        }),
        Code::InvalidArgument,
        "ack_deadline_ms"
    );
    row!(
        "ack deadline too long",
        a.create_subscription(v1::Subscription {
            name: "x".into(),
            topic: "t".into(),
            ack_deadline_ms: 600_001,
            ..Default::default()
        }),
        Code::InvalidArgument,
        "ack_deadline_ms"
    );
    row!(
        "zero delivery attempts",
        a.create_subscription(v1::Subscription {
            name: "x".into(),
            topic: "t".into(),
            dead_letter_policy: Some(v1::DeadLetterPolicy {
                max_delivery_attempts: 0,
                forward_topic: String::new()
            }),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "max_delivery_attempts"
    );
    row!(
        "backoff max below min",
        a.create_subscription(v1::Subscription {
            name: "x".into(),
            topic: "t".into(),
            retry_policy: Some(v1::RetryPolicy {
                min_backoff_ms: 100,
                max_backoff_ms: 10
            }),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "max_backoff_ms"
    );
    row!(
        "forward to own topic",
        a.create_subscription(v1::Subscription {
            name: "x".into(),
            topic: "t".into(),
            dead_letter_policy: Some(v1::DeadLetterPolicy {
                max_delivery_attempts: 3,
                forward_topic: "t".into()
            }),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "forward_topic"
    );
    row!(
        "empty update mask",
        a.update_subscription(v1::UpdateSubscriptionRequest {
            subscription: Some(v1::Subscription {
                name: "s".into(),
                ..Default::default()
            }),
            update_mask: vec![]
        }),
        Code::InvalidArgument,
        "update_mask"
    );
    row!(
        "update topic",
        a.update_subscription(v1::UpdateSubscriptionRequest {
            subscription: Some(v1::Subscription {
                name: "s".into(),
                ..Default::default()
            }),
            update_mask: vec!["topic".into()]
        }),
        Code::InvalidArgument,
        "update_mask"
    );
    row!(
        "empty batch",
        p.publish(v1::PublishRequest {
            topic: "t".into(),
            messages: vec![]
        }),
        Code::InvalidArgument,
        "messages"
    );
    row!(
        "publish unknown topic",
        p.publish(v1::PublishRequest {
            topic: "nope".into(),
            messages: vec![msg(b"x".to_vec())]
        }),
        Code::NotFound,
        "nope"
    );
    row!(
        "publish bad topic name",
        p.publish(v1::PublishRequest {
            topic: "".into(),
            messages: vec![msg(b"x".to_vec())]
        }),
        Code::InvalidArgument,
        "topic"
    );
    row!(
        "oversized message",
        p.publish(v1::PublishRequest {
            topic: "t".into(),
            messages: vec![msg(b"ok".to_vec()), msg(big.clone())]
        }),
        Code::InvalidArgument,
        "messages[1].data"
    );
    row!(
        "too many messages",
        p.publish(v1::PublishRequest {
            topic: "t".into(),
            messages: vec![msg(b"x".to_vec()); 1001]
        }),
        Code::InvalidArgument,
        "messages"
    );
    row!(
        "too many attributes",
        p.publish(v1::PublishRequest {
            topic: "t".into(),
            messages: vec![v1::PublishMessage {
                attributes: many_attrs,
                ..Default::default()
            }]
        }),
        Code::InvalidArgument,
        "messages[0].attributes"
    );
    row!(
        "empty attribute key",
        p.publish(v1::PublishRequest {
            topic: "t".into(),
            messages: vec![v1::PublishMessage {
                attributes: [(String::new(), "v".to_string())].into(),
                ..Default::default()
            }]
        }),
        Code::InvalidArgument,
        "attributes"
    );
    row!(
        "pull zero",
        s.pull(v1::PullRequest {
            subscription: "s".into(),
            max_messages: 0,
            wait_ms: 0
        }),
        Code::InvalidArgument,
        "max_messages"
    );
    row!(
        "pull too many",
        s.pull(v1::PullRequest {
            subscription: "s".into(),
            max_messages: 1001,
            wait_ms: 0
        }),
        Code::InvalidArgument,
        "max_messages"
    );
    row!(
        "pull wait too long",
        s.pull(v1::PullRequest {
            subscription: "s".into(),
            max_messages: 1,
            wait_ms: 60_001
        }),
        Code::InvalidArgument,
        "wait_ms"
    );
    row!(
        "pull unknown sub",
        s.pull(v1::PullRequest {
            subscription: "nope".into(),
            max_messages: 1,
            wait_ms: 0
        }),
        Code::NotFound,
        "nope"
    );
    row!(
        "ack nothing",
        s.acknowledge(v1::AcknowledgeRequest {
            subscription: "s".into(),
            ack_ids: vec![]
        }),
        Code::InvalidArgument,
        "ack_ids"
    );
    row!(
        "modack out of range",
        s.modify_ack_deadline(v1::ModifyAckDeadlineRequest {
            subscription: "s".into(),
            ack_ids: vec!["1-1".into()],
            ack_deadline_ms: 50
        }),
        Code::InvalidArgument,
        "ack_deadline_ms"
    );
    row!(
        "nack reason too long",
        s.nack(v1::NackRequest {
            subscription: "s".into(),
            ack_ids: vec!["1-1".into()],
            reject: true,
            reason: "x".repeat(1025)
        }),
        Code::InvalidArgument,
        "reason"
    );
    row!(
        "status bad id",
        a.get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: "abc".into()
        }),
        Code::InvalidArgument,
        "message_id"
    );
    row!(
        "status unknown message",
        a.get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: "999".into()
        }),
        Code::NotFound,
        "999"
    );
    row!(
        "dead letters page too big",
        a.list_dead_letters(v1::ListDeadLettersRequest {
            subscription: "s".into(),
            max: 1001,
            page_token: String::new()
        }),
        Code::InvalidArgument,
        "max"
    );
    row!(
        "dead letters bad token",
        a.list_dead_letters(v1::ListDeadLettersRequest {
            subscription: "s".into(),
            max: 1,
            page_token: "zz".into()
        }),
        Code::InvalidArgument,
        "page_token"
    );
    row!(
        "redrive bad reason",
        a.redrive_dead_letters(v1::RedriveDeadLettersRequest {
            subscription: "s".into(),
            message_ids: vec![],
            reason: Some(9)
        }),
        Code::InvalidArgument,
        "reason"
    );
    row!(
        "redrive unknown sub",
        a.redrive_dead_letters(v1::RedriveDeadLettersRequest {
            subscription: "nope".into(),
            message_ids: vec![],
            reason: None
        }),
        Code::NotFound,
        "nope"
    );

    let mut failures = Vec::new();
    for (what, result, code, needle) in rows {
        match result {
            Ok(()) => failures.push(format!("{what}: succeeded, expected {code:?}")),
            Err(status) if status.code() != code || !status.message().contains(needle) => failures
                .push(format!(
                    "{what}: got {:?} {:?}, expected {code:?} mentioning {needle:?}",
                    status.code(),
                    status.message()
                )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Still up and consistent.
    let ids = c.publish("t", &["still here"]).await;
    assert_eq!(ids.len(), 1);
    let got = c.pull_n("s", 1, std::time::Duration::from_secs(3)).await;
    assert_eq!(common::text(&got[0]), "still here");
    server.stop().await;
}

#[tokio::test]
async fn a_message_at_the_size_limit_round_trips() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let data = vec![7u8; 10 * 1024 * 1024];
    c.publisher
        .publish(v1::PublishRequest {
            topic: "t".into(),
            messages: vec![msg(data.clone())],
        })
        .await
        .unwrap();
    let got = c.pull_n("s", 1, std::time::Duration::from_secs(5)).await;
    assert_eq!(got[0].message.as_ref().unwrap().data.len(), data.len());
    server.stop().await;
}

#[tokio::test]
async fn a_second_broker_on_the_same_data_dir_is_refused() {
    let server = TestServer::start().await;
    let config = common::test_config(&server.dir);
    let err = courier::broker::Broker::open(config).await.unwrap_err();
    assert!(err.to_string().contains("locked"), "{err}");
    server.stop().await;
}

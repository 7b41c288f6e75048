//! The bad-input table: every RPC, fed bad input, answers its documented
//! status — and after each row the same broker process (a real `courier
//! serve` child) is alive and answers a health probe SERVING, so no row
//! crashes or hangs it.

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut};
use common::{Clients, TestServer, spawn_broker};
use courier::api::pb::v1;
use prost::Message as _;
use tonic::Code;
use tonic::codec::{DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn msg(data: Vec<u8>) -> v1::PublishMessage {
    v1::PublishMessage {
        data: data.into(),
        ..Default::default()
    }
}

/// Sends bytes as they are, so a row can send what no generated client
/// would: malformed protobuf, invalid UTF-8, a request over the limit.
#[derive(Debug, Clone, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// One call of `path` with `body` as the request's bytes.
async fn raw(channel: &Channel, path: &'static str, body: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    if path.as_str().ends_with("/StreamingPull") {
        let requests = tokio_stream::iter([body]);
        let mut responses = grpc
            .streaming(tonic::Request::new(requests), path, Raw)
            .await?
            .into_inner();
        return responses.message().await.map(|_| ());
    }
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(|_| ())
}

/// Every RPC the broker serves.
const RPCS: &[&str] = &[
    "/courier.v1.Publisher/Publish",
    "/courier.v1.Subscriber/Pull",
    "/courier.v1.Subscriber/StreamingPull",
    "/courier.v1.Subscriber/Acknowledge",
    "/courier.v1.Subscriber/ModifyAckDeadline",
    "/courier.v1.Subscriber/Nack",
    "/courier.v1.Admin/CreateTopic",
    "/courier.v1.Admin/GetTopic",
    "/courier.v1.Admin/ListTopics",
    "/courier.v1.Admin/DeleteTopic",
    "/courier.v1.Admin/CreateSubscription",
    "/courier.v1.Admin/GetSubscription",
    "/courier.v1.Admin/ListSubscriptions",
    "/courier.v1.Admin/UpdateSubscription",
    "/courier.v1.Admin/DeleteSubscription",
    "/courier.v1.Admin/PurgeSubscription",
    "/courier.v1.Admin/GetSubscriptionStats",
    "/courier.v1.Admin/GetTopicStats",
    "/courier.v1.Admin/GetMessageStatus",
    "/courier.v1.Admin/ListDeadLetters",
    "/courier.v1.Admin/RedriveDeadLetters",
    "/courier.v1.Admin/PurgeDeadLetters",
    "/courier.v1.Admin/GetBrokerStats",
];

/// A row's call may take this long; longer is a hang.
const ROW_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_status_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = spawn_broker(tmp.path());
    let pid = broker.child.id();
    let channel = Channel::from_shared(broker.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut c = Clients::connect(&broker.url).await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    c.create_topic("t2").await;
    c.create_sub("s2", "t2").await;
    let big = vec![0u8; 10 * 1024 * 1024 + 1];
    let many_attrs: std::collections::HashMap<String, String> =
        (0..101).map(|i| (format!("k{i}"), "v".into())).collect();

    // (what, result, expected code, text the message must contain)
    let mut rows: Vec<(String, Result<(), tonic::Status>, Code, &str)> = Vec::new();
    // After each call: the same process is alive and SERVING.
    let mut after_each = Vec::new();
    macro_rules! row {
        ($what:expr, $call:expr, $code:expr, $needle:expr) => {{
            let what: String = $what.into();
            let result = match tokio::time::timeout(ROW_TIMEOUT, $call).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(tonic::Status::deadline_exceeded("the call hung")),
            };
            if let Ok(Some(exit)) = broker.child.try_wait() {
                panic!("broker {pid} exited after row {what:?}: {exit}");
            }
            let probe = tokio::time::timeout(
                ROW_TIMEOUT,
                health.check(HealthCheckRequest {
                    service: String::new(),
                }),
            )
            .await;
            match probe {
                Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => {}
                other => after_each.push(format!("after {what:?}: health probe {other:?}")),
            }
            rows.push((what, result, $code, $needle));
        }};
    }
    let mut a = c.admin.clone();
    let mut p = c.publisher.clone();
    let mut s = c.subscriber.clone();

    // Bytes that are not a protobuf message, to every RPC.
    for rpc in RPCS {
        row!(
            format!("malformed protobuf to {rpc}"),
            raw(&channel, rpc, vec![0xff; 16]),
            Code::InvalidArgument,
            "malformed message"
        );
    }
    // Field 1 is a string in these: bytes that are not UTF-8.
    for rpc in [
        "/courier.v1.Publisher/Publish",
        "/courier.v1.Subscriber/Pull",
        "/courier.v1.Subscriber/StreamingPull",
        "/courier.v1.Admin/CreateTopic",
        "/courier.v1.Admin/CreateSubscription",
    ] {
        row!(
            format!("invalid UTF-8 to {rpc}"),
            raw(&channel, rpc, vec![0x0a, 0x02, 0xff, 0xfe]),
            Code::InvalidArgument,
            "malformed message"
        );
    }
    let huge = v1::PublishRequest {
        topic: "t".into(),
        messages: vec![msg(vec![1u8; 70 << 20])],
    }
    .encode_to_vec();
    row!(
        "70 MiB request",
        raw(&channel, "/courier.v1.Publisher/Publish", huge),
        Code::ResourceExhausted,
        "request too large"
    );
    let long_name = format!("a/{}", "x".repeat(1_000_000));
    row!(
        "million-character invalid name",
        a.create_topic(v1::CreateTopicRequest {
            name: long_name.clone(),
            retention: None
        }),
        Code::InvalidArgument,
        "(1000002 bytes)"
    );
    row!(
        "million-character unknown topic",
        p.publish(v1::PublishRequest {
            topic: format!("a{}", "x".repeat(1_000_000)),
            messages: vec![msg(b"x".to_vec())]
        }),
        Code::InvalidArgument,
        "topic"
    );
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
        "reject-publish without max_bytes",
        a.create_topic(v1::CreateTopicRequest {
            name: "rp".into(),
            retention: Some(v1::RetentionPolicy {
                max_age_ms: None,
                max_bytes: None,
                mode: v1::RetentionMode::RejectPublish as i32,
            })
        }),
        Code::InvalidArgument,
        "retention.mode"
    );
    row!(
        "reject-publish with max_age_ms",
        a.create_topic(v1::CreateTopicRequest {
            name: "rp".into(),
            retention: Some(v1::RetentionPolicy {
                max_age_ms: Some(1),
                max_bytes: Some(1),
                mode: v1::RetentionMode::RejectPublish as i32,
            })
        }),
        Code::InvalidArgument,
        "retention.max_age_ms"
    );
    row!(
        "unknown retention mode",
        a.create_topic(v1::CreateTopicRequest {
            name: "rp".into(),
            retention: Some(v1::RetentionPolicy {
                max_age_ms: None,
                max_bytes: Some(1),
                mode: 99,
            })
        }),
        Code::InvalidArgument,
        "retention.mode"
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
            name: "nope".into(),
            force: false,
        }),
        Code::NotFound,
        "nope"
    );
    row!(
        "delete a topic with subscriptions without force",
        a.delete_topic(v1::DeleteTopicRequest {
            name: "t".into(),
            force: false,
        }),
        Code::FailedPrecondition,
        "has 1 subscription (s)"
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
                max_backoff_ms: 10,
                no_jitter: false,
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
        "dead letters malformed token",
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
            reason: Some(9),
            replacement: None,
        }),
        Code::InvalidArgument,
        "reason"
    );
    row!(
        "redrive unknown sub",
        a.redrive_dead_letters(v1::RedriveDeadLettersRequest {
            subscription: "nope".into(),
            message_ids: vec![],
            reason: None,
            replacement: None,
        }),
        Code::NotFound,
        "nope"
    );

    // A page token from another subscription's listing, or never issued.
    for i in 0..3 {
        c.publish("t2", &[&format!("d{i}")]).await;
    }
    let got = c.pull_n("s2", 3, Duration::from_secs(5)).await;
    c.nack("s2", common::ack_ids(&got), Some("bad")).await;
    let page = a
        .list_dead_letters(v1::ListDeadLettersRequest {
            subscription: "s2".into(),
            max: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !page.next_page_token.is_empty(),
        "three dead letters, page of one"
    );
    row!(
        "dead letters token of another subscription",
        a.list_dead_letters(v1::ListDeadLettersRequest {
            subscription: "s".into(),
            max: 1,
            page_token: page.next_page_token.clone()
        }),
        Code::InvalidArgument,
        "page_token"
    );
    row!(
        "dead letters token never issued",
        a.list_dead_letters(v1::ListDeadLettersRequest {
            subscription: "s2".into(),
            max: 1,
            page_token: "1".into()
        }),
        Code::InvalidArgument,
        "page_token"
    );
    let next = a
        .list_dead_letters(v1::ListDeadLettersRequest {
            subscription: "s2".into(),
            max: 10,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next.dead_letters.len(),
        2,
        "an issued token goes on where the page ended"
    );

    // Replacing a dead letter's content when redriving it.
    let dead_id = next.dead_letters[0]
        .message
        .as_ref()
        .unwrap()
        .message_id
        .clone();
    let replace = |ids: &[&str], replacement: v1::RedriveReplacement| {
        let mut a = a.clone();
        let request = v1::RedriveDeadLettersRequest {
            subscription: "s2".into(),
            message_ids: ids.iter().map(|id| id.to_string()).collect(),
            reason: None,
            replacement: Some(replacement),
        };
        async move { a.redrive_dead_letters(request).await }
    };
    let data = |bytes: Vec<u8>| v1::RedriveReplacement {
        data: Some(bytes.into()),
        ..Default::default()
    };
    row!(
        "redrive replacement for two ids",
        replace(&[&dead_id, "0"], data(b"x".to_vec())),
        Code::InvalidArgument,
        "replacement"
    );
    row!(
        "redrive replacement for all",
        replace(&[], data(b"x".to_vec())),
        Code::InvalidArgument,
        "replacement"
    );
    row!(
        "redrive replacement of nothing",
        replace(&[&dead_id], v1::RedriveReplacement::default()),
        Code::InvalidArgument,
        "replacement"
    );
    row!(
        "redrive replacement too large",
        replace(&[&dead_id], data(vec![b'x'; 10 * 1024 * 1024 + 1])),
        Code::InvalidArgument,
        "replacement.data"
    );
    row!(
        "redrive replacement with an empty attribute key",
        replace(
            &[&dead_id],
            v1::RedriveReplacement {
                replace_attributes: true,
                attributes: [(String::new(), "v".to_string())].into(),
                ..Default::default()
            }
        ),
        Code::InvalidArgument,
        "replacement.attributes"
    );
    row!(
        "redrive replacement of a message not dead-lettered",
        replace(&["999"], data(b"x".to_vec())),
        Code::NotFound,
        "999"
    );

    let mut failures = after_each;
    for (what, result, code, needle) in &rows {
        match result {
            Ok(()) => failures.push(format!("{what}: succeeded, expected {code:?}")),
            Err(status) if status.code() != *code || !status.message().contains(needle) => failures
                .push(format!(
                    "{what}: got {:?} {:?}, expected {code:?} mentioning {needle:?}",
                    status.code(),
                    status.message().chars().take(300).collect::<String>()
                )),
            Err(status) if status.message().len() > 1100 => failures.push(format!(
                "{what}: status message of {} bytes",
                status.message().len()
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(rows.len() > 60, "{} rows", rows.len());

    // Ack ids that were never issued are UNKNOWN per id, never a status.
    let results = c.ack("s", vec!["0-0".into(), "A".repeat(38)]).await;
    for r in &results {
        assert_eq!(r.status, v1::AckStatus::Unknown as i32, "{r:?}");
    }

    // Still up and consistent: the same process publishes and delivers.
    let ids = c.publish("t", &["still here"]).await;
    assert_eq!(ids.len(), 1);
    let got = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(common::text(&got[0]), "still here");
    assert_eq!(broker.child.id(), pid);
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
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

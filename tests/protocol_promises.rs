//! Every concrete promise in the `.proto` comments and docs/protocol.md that
//! no other test holds, checked against a real broker on 127.0.0.1 through
//! the generated clients, grouped by RPC.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Clients, TestServer, ack_ids, test_config, text};
use courier::api::pb::v1;
use courier::broker::BrokerConfig;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

type Stream = tonic::Streaming<v1::StreamingPullResponse>;
type Sender = tokio::sync::mpsc::Sender<v1::StreamingPullRequest>;

/// The longest any single wait in these tests may take before it fails.
const WAIT: Duration = Duration::from_secs(10);
/// How long a stream is watched to see that nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

// ----- harness -------------------------------------------------------------

async fn start() -> (TestServer, Clients) {
    let server = TestServer::start().await;
    let c = server.clients().await;
    (server, c)
}

/// A broker whose configuration `tune` changed.
async fn start_with(tune: impl FnOnce(&mut BrokerConfig)) -> (TestServer, Clients) {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(tmp.path());
    tune(&mut config);
    let mut server = TestServer::start_with(config).await;
    server.keep_dir(tmp);
    let c = server.clients().await;
    (server, c)
}

/// A topic `t` with a default subscription `s`.
async fn start_with_t_and_s() -> (TestServer, Clients) {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    (server, c)
}

fn sub(name: &str, topic: &str) -> v1::Subscription {
    v1::Subscription {
        name: name.into(),
        topic: topic.into(),
        ..Default::default()
    }
}

fn retry(min_backoff_ms: u64, max_backoff_ms: u64) -> Option<v1::RetryPolicy> {
    Some(v1::RetryPolicy {
        min_backoff_ms,
        max_backoff_ms,
        no_jitter: false,
    })
}

fn dead_letter(max_delivery_attempts: u32, forward_topic: &str) -> Option<v1::DeadLetterPolicy> {
    Some(v1::DeadLetterPolicy {
        max_delivery_attempts,
        forward_topic: forward_topic.into(),
    })
}

/// A retry policy so long that a nacked or expired message stays pending
/// for the rest of the test.
fn never_again() -> Option<v1::RetryPolicy> {
    retry(600_000, 600_000)
}

fn data(bytes: &[u8]) -> v1::PublishMessage {
    v1::PublishMessage {
        data: bytes.to_vec().into(),
        ..Default::default()
    }
}

fn attrs(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn publish(
    c: &mut Clients,
    topic: &str,
    messages: Vec<v1::PublishMessage>,
) -> Result<Vec<String>, Status> {
    c.publisher
        .publish(v1::PublishRequest {
            topic: topic.into(),
            messages,
        })
        .await
        .map(|r| r.into_inner().message_ids)
}

/// Publishes `n` messages `m0`, `m1`, … in one call.
async fn publish_n(c: &mut Clients, topic: &str, n: usize) -> Vec<String> {
    let messages = (0..n).map(|i| data(format!("m{i}").as_bytes())).collect();
    publish(c, topic, messages).await.unwrap()
}

/// Pulls `n` messages of `sub` and rejects them: `n` dead letters.
async fn reject_n(c: &mut Clients, sub: &str, n: usize) -> Vec<v1::ReceivedMessage> {
    let got = c.pull_n(sub, n, WAIT).await;
    assert_eq!(got.len(), n, "pulled {} of {n}", got.len());
    c.nack(sub, ack_ids(&got), Some("bad")).await;
    got
}

fn id_of(m: &v1::ReceivedMessage) -> String {
    m.message.as_ref().unwrap().message_id.clone()
}

async fn topic_stats(c: &mut Clients, name: &str) -> v1::TopicStats {
    c.admin
        .get_topic_stats(v1::GetTopicStatsRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn message_status(c: &mut Clients, topic: &str, id: &str) -> v1::MessageStatus {
    c.admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: topic.into(),
            message_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The state of message `id` of topic `t` in subscription `sub`.
async fn state_in(c: &mut Clients, sub: &str, id: &str) -> v1::SubscriptionMessageStatus {
    message_status(c, "t", id)
        .await
        .subscriptions
        .into_iter()
        .find(|s| s.subscription == sub)
        .unwrap_or_else(|| panic!("no status for {sub}"))
}

async fn dead_letter_page(
    c: &mut Clients,
    sub: &str,
    max: u32,
    page_token: &str,
) -> v1::ListDeadLettersResponse {
    c.admin
        .list_dead_letters(v1::ListDeadLettersRequest {
            subscription: sub.into(),
            max,
            page_token: page_token.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn unix_us(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds * 1_000_000 + i64::from(ts.nanos) / 1000
}

fn now_us() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(d.as_micros()).unwrap()
}

/// Seconds from now until `ts`.
fn secs_until(ts: &Option<prost_types::Timestamp>) -> f64 {
    let us = unix_us(ts.as_ref().expect("a timestamp")) - now_us();
    us as f64 / 1e6
}

/// Polls `check` until it holds, for at most [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < until, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a call must answer.
#[derive(Debug, Clone, Copy)]
enum Want {
    Ok,
    /// INVALID_ARGUMENT with a message starting `invalid <field>`.
    Invalid(&'static str),
    /// This code, with a message containing the text.
    Code(Code, &'static str),
}

/// Rows of a table-driven test: every mismatch is collected, then reported
/// together.
#[derive(Default)]
struct Table(Vec<String>);

impl Table {
    fn row<T>(&mut self, what: &str, result: Result<T, Status>, want: Want) {
        let got = match &result {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?} {:?}", s.code(), s.message()),
        };
        let holds = match (&result, want) {
            (Ok(_), Want::Ok) => true,
            (Err(s), Want::Invalid(field)) => {
                s.code() == Code::InvalidArgument
                    && s.message().starts_with(&format!("invalid {field}"))
            }
            (Err(s), Want::Code(code, needle)) => s.code() == code && s.message().contains(needle),
            _ => false,
        };
        if !holds {
            self.0.push(format!("{what}: got {got}, want {want:?}"));
        }
    }

    #[track_caller]
    fn assert_all_hold(self) {
        assert!(self.0.is_empty(), "\n{}", self.0.join("\n"));
    }
}

/// Opens a StreamingPull stream with `first` as its first request.
async fn open(c: &Clients, first: v1::StreamingPullRequest) -> Result<(Sender, Stream), Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut s = c.subscriber.clone();
    let stream = s
        .streaming_pull(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

fn first_on(sub: &str) -> v1::StreamingPullRequest {
    v1::StreamingPullRequest {
        subscription: sub.into(),
        ..Default::default()
    }
}

fn acking(ids: Vec<String>) -> v1::StreamingPullRequest {
    v1::StreamingPullRequest {
        ack_ids: ids,
        ..Default::default()
    }
}

/// Reads responses until at least `messages` messages and `results` ack
/// results arrived.
async fn read(
    stream: &mut Stream,
    messages: usize,
    results: usize,
) -> (Vec<v1::ReceivedMessage>, Vec<v1::AckResult>) {
    let (mut ms, mut rs) = (Vec::new(), Vec::new());
    while ms.len() < messages || rs.len() < results {
        let r = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap_or_else(|_| panic!("only {} messages, {} results", ms.len(), rs.len()))
            .expect("the stream failed")
            .expect("the stream ended");
        ms.extend(r.received_messages);
        rs.extend(r.ack_results);
    }
    (ms, rs)
}

/// The messages that arrive within [`QUIET`].
async fn quiet(stream: &mut Stream) -> Vec<v1::ReceivedMessage> {
    let until = tokio::time::Instant::now() + QUIET;
    let mut ms = Vec::new();
    while let Ok(r) = tokio::time::timeout_at(until, stream.message()).await {
        ms.extend(
            r.expect("the stream failed")
                .expect("the stream ended")
                .received_messages,
        );
    }
    ms
}

/// Reads until the stream ends: `Ok` if it ended with OK, else its status.
/// Also returns the ack results read on the way.
async fn stream_end(stream: &mut Stream) -> (Result<(), Status>, Vec<v1::AckResult>) {
    let mut results = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stream.message()).await {
            Err(_) => {
                return (
                    Err(Status::deadline_exceeded("the stream stayed open")),
                    results,
                );
            }
            Ok(Ok(Some(r))) => results.extend(r.ack_results),
            Ok(Ok(None)) => return (Ok(()), results),
            Ok(Err(status)) => return (Err(status), results),
        }
    }
}

/// Sends `requests` on a new stream (kept open) and returns how it ended.
async fn stream_outcome(
    c: &Clients,
    requests: Vec<v1::StreamingPullRequest>,
) -> Result<(), Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(requests.len());
    for r in requests {
        tx.send(r).await.unwrap();
    }
    let mut s = c.subscriber.clone();
    let mut stream = s
        .streaming_pull(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let (end, _) = stream_end(&mut stream).await;
    drop(tx);
    end
}

/// Calls every RPC that names one topic or subscription with `name` in
/// that field (every other field valid). Returns (rpc, field, answer).
async fn call_naming(
    c: &Clients,
    name: &str,
) -> Vec<(&'static str, &'static str, Result<(), Status>)> {
    let (mut a, mut p, mut s) = (c.admin.clone(), c.publisher.clone(), c.subscriber.clone());
    let n = || name.to_string();
    let ids = || vec!["some-ack-id".to_string()];
    vec![
        (
            "GetTopic",
            "name",
            a.get_topic(v1::GetTopicRequest { name: n() })
                .await
                .map(|_| ()),
        ),
        (
            "DeleteTopic",
            "name",
            a.delete_topic(v1::DeleteTopicRequest {
                name: n(),
                force: true,
            })
            .await
            .map(|_| ()),
        ),
        (
            "CreateSubscription",
            "topic",
            a.create_subscription(sub("fresh", name)).await.map(|_| ()),
        ),
        (
            "GetSubscription",
            "name",
            a.get_subscription(v1::GetSubscriptionRequest { name: n() })
                .await
                .map(|_| ()),
        ),
        (
            "ListSubscriptions",
            "topic",
            a.list_subscriptions(v1::ListSubscriptionsRequest { topic: n() })
                .await
                .map(|_| ()),
        ),
        (
            "UpdateSubscription",
            "subscription.name",
            a.update_subscription(v1::UpdateSubscriptionRequest {
                subscription: Some(v1::Subscription {
                    name: n(),
                    ..Default::default()
                }),
                update_mask: vec!["ack_deadline_ms".into()],
            })
            .await
            .map(|_| ()),
        ),
        (
            "DeleteSubscription",
            "name",
            a.delete_subscription(v1::DeleteSubscriptionRequest { name: n() })
                .await
                .map(|_| ()),
        ),
        (
            "PurgeSubscription",
            "name",
            a.purge_subscription(v1::PurgeSubscriptionRequest { name: n() })
                .await
                .map(|_| ()),
        ),
        (
            "GetSubscriptionStats",
            "name",
            a.get_subscription_stats(v1::GetSubscriptionStatsRequest { name: n() })
                .await
                .map(|_| ()),
        ),
        (
            "GetTopicStats",
            "name",
            a.get_topic_stats(v1::GetTopicStatsRequest { name: n() })
                .await
                .map(|_| ()),
        ),
        (
            "GetMessageStatus",
            "topic",
            a.get_message_status(v1::GetMessageStatusRequest {
                topic: n(),
                message_id: "0".into(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "ListDeadLetters",
            "subscription",
            a.list_dead_letters(v1::ListDeadLettersRequest {
                subscription: n(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "RedriveDeadLetters",
            "subscription",
            a.redrive_dead_letters(v1::RedriveDeadLettersRequest {
                subscription: n(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "PurgeDeadLetters",
            "subscription",
            a.purge_dead_letters(v1::PurgeDeadLettersRequest { subscription: n() })
                .await
                .map(|_| ()),
        ),
        (
            "Publish",
            "topic",
            p.publish(v1::PublishRequest {
                topic: n(),
                messages: vec![data(b"x")],
            })
            .await
            .map(|_| ()),
        ),
        (
            "Pull",
            "subscription",
            s.pull(v1::PullRequest {
                subscription: n(),
                max_messages: 1,
                wait_ms: 0,
            })
            .await
            .map(|_| ()),
        ),
        (
            "Acknowledge",
            "subscription",
            s.acknowledge(v1::AcknowledgeRequest {
                subscription: n(),
                ack_ids: ids(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "ModifyAckDeadline",
            "subscription",
            s.modify_ack_deadline(v1::ModifyAckDeadlineRequest {
                subscription: n(),
                ack_ids: ids(),
                ack_deadline_ms: 1000,
            })
            .await
            .map(|_| ()),
        ),
        (
            "Nack",
            "subscription",
            s.nack(v1::NackRequest {
                subscription: n(),
                ack_ids: ids(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "StreamingPull",
            "subscription",
            open(c, first_on(name)).await.map(|_| ()),
        ),
    ]
}

// ----- conventions (common.proto header, docs/protocol.md) -----------------

#[tokio::test]
async fn names_matching_the_pattern_are_accepted_and_topics_and_subscriptions_are_separate_namespaces()
 {
    let (server, mut c) = start().await;
    for name in ["a", "Z", "a.b_c-D9", &"x".repeat(255)] {
        c.create_topic(name).await;
        c.create_sub(name, name).await;
    }
    // A topic and a subscription share each of those names.
    let got = c
        .admin
        .get_subscription(v1::GetSubscriptionRequest { name: "Z".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.topic, "Z");
    server.stop().await;
}

#[tokio::test]
async fn every_rpc_rejects_a_bad_name_naming_its_field() {
    let (server, mut c) = start_with_t_and_s().await;
    let mut t = Table::default();
    for (rpc, field, result) in call_naming(&c, "9bad").await {
        t.row(rpc, result, Want::Invalid(field));
    }
    let r = c.admin.create_subscription(sub("9bad", "t")).await;
    t.row("CreateSubscription name", r, Want::Invalid("name"));
    t.assert_all_hold();
    server.stop().await;
}

#[tokio::test]
async fn every_rpc_naming_a_missing_topic_or_subscription_is_not_found_naming_it() {
    let (server, c) = start_with_t_and_s().await;
    let mut t = Table::default();
    for (rpc, _, result) in call_naming(&c, "missing").await {
        t.row(rpc, result, Want::Code(Code::NotFound, "\"missing\""));
    }
    t.assert_all_hold();
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_name_is_echoed_only_up_to_64_characters() {
    let (server, c) = start().await;
    let long = format!("9{}", "y".repeat(200));
    let mut t = Table::default();
    for (rpc, field, result) in call_naming(&c, &long).await {
        let echoed_whole = matches!(&result, Err(s) if s.message().contains(&"y".repeat(65)));
        t.row(rpc, result, Want::Invalid(field));
        if echoed_whole {
            t.0.push(format!("{rpc}: more than 64 characters of the name echoed"));
        }
    }
    t.assert_all_hold();
    server.stop().await;
}

#[tokio::test]
async fn every_rejected_value_is_echoed_only_up_to_64_characters() {
    let (server, mut c) = start_with_t_and_s().await;
    let long = format!("m{}", "x".repeat(254)); // a valid name, not there
    let mut results = call_naming(&c, &long).await;
    let r = c
        .admin
        .update_subscription(v1::UpdateSubscriptionRequest {
            subscription: Some(sub("s", "")),
            update_mask: vec!["x".repeat(300)],
        })
        .await;
    results.push(("UpdateSubscription update_mask", "", r.map(|_| ())));
    let r = c
        .admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: "x".repeat(300),
        })
        .await;
    results.push(("GetMessageStatus message_id", "", r.map(|_| ())));
    let r = c
        .admin
        .redrive_dead_letters(v1::RedriveDeadLettersRequest {
            subscription: "s".into(),
            message_ids: vec!["x".repeat(300)],
            reason: None,
            replacement: None,
        })
        .await;
    results.push(("RedriveDeadLetters message_ids", "", r.map(|_| ())));
    let whole: Vec<&str> = results
        .iter()
        .filter(|(_, _, r)| match r {
            Err(s) => s.message().contains(&"x".repeat(65)),
            Ok(_) => true,
        })
        .map(|(rpc, _, _)| *rpc)
        .collect();
    assert!(whole.is_empty(), "echoed over 64 characters: {whole:?}");
    server.stop().await;
}

#[tokio::test]
async fn status_messages_are_at_most_1024_bytes() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    let names: Vec<String> = (0..6).map(|i| format!("s{i}{}", "x".repeat(253))).collect();
    for name in &names {
        c.create_sub(name, "t").await;
    }
    let mut messages = Vec::new();
    let r = c
        .admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "t".into(),
            force: false,
        })
        .await;
    messages.push(("DeleteTopic naming six long subscriptions", r.unwrap_err()));
    let r = c
        .admin
        .update_subscription(v1::UpdateSubscriptionRequest {
            subscription: Some(sub(&names[0], "")),
            update_mask: vec!["x".repeat(100_000)],
        })
        .await;
    messages.push(("UpdateSubscription with a long mask entry", r.unwrap_err()));
    let r = c
        .admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: "x".repeat(100_000),
        })
        .await;
    messages.push(("GetMessageStatus with a long id", r.unwrap_err()));
    let over: Vec<String> = messages
        .iter()
        .filter(|(_, s)| s.message().len() > 1024)
        .map(|(what, s)| format!("{what}: {} bytes", s.message().len()))
        .collect();
    assert!(over.is_empty(), "{over:#?}");
    server.stop().await;
}

#[tokio::test]
async fn a_request_that_is_not_protobuf_gets_a_message_starting_malformed_message() {
    let (server, _c) = start().await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    // A PublishMessage's `data` (field 1, bytes) lands in the request's
    // field 1, a string: invalid UTF-8 there is not a valid message.
    for path in [
        "/courier.v1.Admin/CreateTopic",
        "/courier.v1.Admin/GetTopic",
        "/courier.v1.Publisher/Publish",
    ] {
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<v1::PublishMessage, v1::Topic>::default();
        let status = grpc
            .unary(
                tonic::Request::new(data(&[0xff, 0xfe])),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(
            status.message().starts_with("malformed message"),
            "{path}: {status:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn open_streams_end_unavailable_when_the_broker_shuts_down() {
    let (server, mut c) = start_with_t_and_s().await;
    let (_tx, mut stream) = open(&c, first_on("s")).await.unwrap();
    // The stream is running once it delivers.
    c.publish("t", &["x"]).await;
    read(&mut stream, 1, 0).await;
    let stop = tokio::spawn(server.stop());
    let (end, _) = stream_end(&mut stream).await;
    stop.await.unwrap();
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test]
async fn the_broker_refuses_topics_and_subscriptions_past_its_limits() {
    let (server, mut c) = start_with(|config| {
        config.topics_max = 2;
        config.subscriptions_max = 1;
    })
    .await;
    c.create_topic("a").await;
    c.create_topic("b").await;
    let r = c
        .admin
        .create_topic(v1::CreateTopicRequest {
            name: "c".into(),
            retention: None,
        })
        .await;
    let mut t = Table::default();
    t.row(
        "third topic",
        r,
        Want::Code(Code::ResourceExhausted, "2 topics"),
    );
    c.create_sub("s", "a").await;
    let r = c.admin.create_subscription(sub("s2", "b")).await;
    t.row(
        "second subscription",
        r,
        Want::Code(Code::ResourceExhausted, "1 subscriptions"),
    );
    t.assert_all_hold();
    server.stop().await;
}

// ----- Admin.CreateTopic, GetTopic, ListTopics ------------------------------

#[tokio::test]
async fn create_topic_rejects_zero_retention_limits_naming_the_field() {
    let (server, mut c) = start().await;
    let mut t = Table::default();
    for (limits, field) in [
        ((Some(0), None), "retention.max_age_ms"),
        ((None, Some(0)), "retention.max_bytes"),
    ] {
        let r = c
            .admin
            .create_topic(v1::CreateTopicRequest {
                name: "t".into(),
                retention: Some(v1::RetentionPolicy {
                    max_age_ms: limits.0,
                    max_bytes: limits.1,
                    mode: v1::RetentionMode::DropOldest as i32,
                }),
            })
            .await;
        t.row(field, r, Want::Invalid(field));
    }
    t.assert_all_hold();
    server.stop().await;
}

#[tokio::test]
async fn a_topic_reads_back_with_its_effective_retention_and_create_time() {
    let (server, mut c) = start().await;
    let before = now_us();
    let created = c
        .admin
        .create_topic(v1::CreateTopicRequest {
            name: "plain".into(),
            retention: None,
        })
        .await
        .unwrap()
        .into_inner();
    let got = c
        .admin
        .get_topic(v1::GetTopicRequest {
            name: "plain".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created, got);
    // Unset retention: no limits, mode DROP_OLDEST.
    let r = got.retention.unwrap_or_default();
    assert_eq!((r.max_age_ms, r.max_bytes), (None, None));
    assert_ne!(r.mode, v1::RetentionMode::RejectPublish as i32);
    // create_time is in milliseconds: allow for the truncation.
    let at = unix_us(got.create_time.as_ref().unwrap());
    assert!(at >= before - 1000 && at <= now_us(), "create_time {at}");
    server.stop().await;
}

#[tokio::test]
async fn list_topics_returns_every_topic_sorted_by_name() {
    let (server, mut c) = start().await;
    for name in ["b", "C", "a", "a.1"] {
        c.create_topic(name).await;
    }
    let names: Vec<String> = c
        .admin
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["C", "a", "a.1", "b"]);
    server.stop().await;
}

// ----- Admin.DeleteTopic ----------------------------------------------------

#[tokio::test]
async fn delete_topic_with_force_names_what_it_deleted_and_ends_its_streams_and_pulls_not_found() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub("s1", "t").await;
    c.create_sub("s2", "t").await;
    let (_tx, mut stream) = open(&c, first_on("s1")).await.unwrap();
    let mut waiting = c.clone();
    let pull = tokio::spawn(async move {
        waiting
            .subscriber
            .pull(v1::PullRequest {
                subscription: "s2".into(),
                max_messages: 1,
                wait_ms: 30_000,
            })
            .await
    });
    // Let the Pull reach the broker and wait there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut deleted = c
        .admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "t".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner()
        .deleted_subscriptions;
    deleted.sort();
    assert_eq!(deleted, ["s1", "s2"]);
    let (end, _) = stream_end(&mut stream).await;
    assert_eq!(end.unwrap_err().code(), Code::NotFound);
    let pulled = tokio::time::timeout(WAIT, pull).await.unwrap().unwrap();
    assert_eq!(pulled.unwrap_err().code(), Code::NotFound);
    for name in ["s1", "s2"] {
        let r = c
            .admin
            .get_subscription(v1::GetSubscriptionRequest { name: name.into() })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::NotFound, "{name}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_forward_topic_cannot_be_deleted_and_the_status_names_the_subscription() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_topic("graveyard").await;
    c.create_sub_with(v1::Subscription {
        dead_letter_policy: dead_letter(3, "graveyard"),
        ..sub("forwarder", "t")
    })
    .await;
    let mut t = Table::default();
    for force in [false, true] {
        let r = c
            .admin
            .delete_topic(v1::DeleteTopicRequest {
                name: "graveyard".into(),
                force,
            })
            .await;
        t.row(
            &format!("force {force}"),
            r,
            Want::Code(Code::FailedPrecondition, "\"forwarder\""),
        );
    }
    t.assert_all_hold();
    server.stop().await;
}

// ----- Admin.CreateSubscription, GetSubscription, ListSubscriptions ---------

#[tokio::test]
async fn create_subscription_fills_in_defaults_and_sets_create_time() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    let before = now_us();
    let created = c
        .admin
        .create_subscription(v1::Subscription {
            // Ignored in requests.
            create_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..sub("s", "t")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.ack_deadline_ms, 30_000);
    let at = unix_us(created.create_time.as_ref().unwrap());
    assert!(at >= before - 1000 && at <= now_us(), "create_time {at}");
    let got = c
        .admin
        .get_subscription(v1::GetSubscriptionRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);
    // Returned as given; UNSPECIFIED reads as LATEST.
    for (name, given, want) in [
        (
            "e",
            v1::StartPosition::Earliest,
            v1::StartPosition::Earliest,
        ),
        ("l", v1::StartPosition::Latest, v1::StartPosition::Latest),
        (
            "u",
            v1::StartPosition::Unspecified,
            v1::StartPosition::Latest,
        ),
    ] {
        let s = c
            .admin
            .create_subscription(v1::Subscription {
                start_position: given as i32,
                ..sub(name, "t")
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.start_position, want as i32, "{given:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn create_subscription_checks_every_policy_field_naming_it() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_topic("other").await;
    type Edit = fn(&mut v1::Subscription);
    let rows: &[(&str, Edit, Want)] = &[
        (
            "ack 99",
            |s| s.ack_deadline_ms = 99,
            Want::Invalid("ack_deadline_ms"),
        ),
        ("ack 100", |s| s.ack_deadline_ms = 100, Want::Ok),
        ("ack 600000", |s| s.ack_deadline_ms = 600_000, Want::Ok),
        (
            "ack 600001",
            |s| s.ack_deadline_ms = 600_001,
            Want::Invalid("ack_deadline_ms"),
        ),
        (
            "min backoff over 10 min",
            |s| s.retry_policy = retry(600_001, 600_001),
            Want::Invalid("retry_policy.min_backoff_ms"),
        ),
        (
            "max backoff over 10 min",
            |s| s.retry_policy = retry(0, 600_001),
            Want::Invalid("retry_policy.max_backoff_ms"),
        ),
        (
            "backoffs of 10 min",
            |s| s.retry_policy = retry(600_000, 600_000),
            Want::Ok,
        ),
        (
            "min over max",
            |s| s.retry_policy = retry(200, 100),
            Want::Invalid("retry_policy.max_backoff_ms"),
        ),
        (
            "0 attempts",
            |s| s.dead_letter_policy = dead_letter(0, ""),
            Want::Invalid("dead_letter_policy.max_delivery_attempts"),
        ),
        (
            "1 attempt",
            |s| s.dead_letter_policy = dead_letter(1, ""),
            Want::Ok,
        ),
        (
            "1000 attempts",
            |s| s.dead_letter_policy = dead_letter(1000, "other"),
            Want::Ok,
        ),
        (
            "1001 attempts",
            |s| s.dead_letter_policy = dead_letter(1001, ""),
            Want::Invalid("dead_letter_policy.max_delivery_attempts"),
        ),
        (
            "forward to own topic",
            |s| s.dead_letter_policy = dead_letter(5, "t"),
            Want::Invalid("dead_letter_policy.forward_topic"),
        ),
        (
            "forward to a bad name",
            |s| s.dead_letter_policy = dead_letter(5, "9x"),
            Want::Invalid("dead_letter_policy.forward_topic"),
        ),
        (
            "start position 9",
            |s| s.start_position = 9,
            Want::Invalid("start_position"),
        ),
    ];
    let mut t = Table::default();
    for (i, (what, edit, want)) in rows.iter().enumerate() {
        let mut s = sub(&format!("p{i}"), "t");
        edit(&mut s);
        let r = c.admin.create_subscription(s).await;
        t.row(what, r, *want);
    }
    t.assert_all_hold();
    server.stop().await;
}

#[tokio::test]
async fn a_missing_forward_topic_is_not_found_naming_the_field() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    let r = c
        .admin
        .create_subscription(v1::Subscription {
            dead_letter_policy: dead_letter(3, "nope"),
            ..sub("s", "t")
        })
        .await;
    let status = r.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status
            .message()
            .contains("dead_letter_policy.forward_topic"),
        "{status:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn subscription_names_are_unique_across_topics() {
    let (server, mut c) = start_with_t_and_s().await;
    c.create_topic("t2").await;
    let r = c.admin.create_subscription(sub("s", "t2")).await;
    let mut t = Table::default();
    t.row(
        "s on another topic",
        r,
        Want::Code(Code::AlreadyExists, "\"s\""),
    );
    t.assert_all_hold();
    server.stop().await;
}

#[tokio::test]
async fn list_subscriptions_filters_by_topic_and_sorts_by_name() {
    let (server, mut c) = start().await;
    c.create_topic("t1").await;
    c.create_topic("t2").await;
    for (name, topic) in [("c", "t1"), ("a", "t2"), ("b", "t1"), ("B", "t2")] {
        c.create_sub(name, topic).await;
    }
    let mut list = async |topic: &str| -> Vec<String> {
        c.admin
            .list_subscriptions(v1::ListSubscriptionsRequest {
                topic: topic.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .subscriptions
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    assert_eq!(list("").await, ["B", "a", "b", "c"]);
    assert_eq!(list("t1").await, ["b", "c"]);
    assert_eq!(list("t2").await, ["B", "a"]);
    server.stop().await;
}

// ----- Admin.UpdateSubscription ---------------------------------------------

fn update(s: v1::Subscription, mask: &[&str]) -> v1::UpdateSubscriptionRequest {
    v1::UpdateSubscriptionRequest {
        subscription: Some(s),
        update_mask: mask.iter().map(|m| m.to_string()).collect(),
    }
}

#[tokio::test]
async fn update_subscription_refuses_bad_masks_and_values_and_changes_nothing() {
    let (server, mut c) = start_with_t_and_s().await;
    let get = v1::GetSubscriptionRequest { name: "s".into() };
    let before = c
        .admin
        .get_subscription(get.clone())
        .await
        .unwrap()
        .into_inner();
    type Edit = fn(&mut v1::Subscription);
    let keep: Edit = |_| {};
    let rows: &[(&str, &[&str], Edit, Want)] = &[
        (
            "mask naming name",
            &["name"],
            keep,
            Want::Invalid("update_mask"),
        ),
        (
            "mask naming start_position",
            &["start_position"],
            keep,
            Want::Invalid("update_mask"),
        ),
        (
            "mask naming create_time",
            &["ack_deadline_ms", "create_time"],
            keep,
            Want::Invalid("update_mask"),
        ),
        (
            "mask naming an unknown field",
            &["nonsense"],
            keep,
            Want::Invalid("update_mask"),
        ),
        (
            "empty name",
            &["ack_deadline_ms"],
            |s| s.name.clear(),
            Want::Invalid("subscription.name"),
        ),
        (
            "ack deadline 99",
            &["ack_deadline_ms"],
            |s| s.ack_deadline_ms = 99,
            Want::Code(Code::InvalidArgument, "ack_deadline_ms"),
        ),
        (
            "ack deadline 600001",
            &["ack_deadline_ms"],
            |s| s.ack_deadline_ms = 600_001,
            Want::Code(Code::InvalidArgument, "ack_deadline_ms"),
        ),
        (
            "backoff over 10 min",
            &["retry_policy"],
            |s| s.retry_policy = retry(600_001, 600_001),
            Want::Code(Code::InvalidArgument, "retry_policy.min_backoff_ms"),
        ),
        (
            "1001 attempts",
            &["dead_letter_policy"],
            |s| s.dead_letter_policy = dead_letter(1001, ""),
            Want::Code(
                Code::InvalidArgument,
                "dead_letter_policy.max_delivery_attempts",
            ),
        ),
        (
            "forward to own topic",
            &["dead_letter_policy"],
            |s| s.dead_letter_policy = dead_letter(3, "t"),
            Want::Code(Code::InvalidArgument, "dead_letter_policy.forward_topic"),
        ),
        (
            "missing forward topic",
            &["dead_letter_policy"],
            |s| s.dead_letter_policy = dead_letter(3, "nope"),
            Want::Code(Code::NotFound, "\"nope\""),
        ),
    ];
    let mut t = Table::default();
    for (what, mask, edit, want) in rows {
        let mut s = sub("s", "");
        edit(&mut s);
        let r = c.admin.update_subscription(update(s, mask)).await;
        t.row(what, r, *want);
    }
    let r = c
        .admin
        .update_subscription(v1::UpdateSubscriptionRequest {
            subscription: None,
            update_mask: vec!["ack_deadline_ms".into()],
        })
        .await;
    t.row("no subscription", r, Want::Invalid("subscription"));
    t.assert_all_hold();
    let after = c.admin.get_subscription(get).await.unwrap().into_inner();
    assert_eq!(after, before);
    server.stop().await;
}

#[tokio::test]
async fn a_listed_field_left_unset_or_zero_takes_its_default_and_others_are_ignored() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 5_000,
        retry_policy: retry(10, 20),
        dead_letter_policy: dead_letter(3, ""),
        ..sub("s", "t")
    })
    .await;
    let updated = c
        .admin
        .update_subscription(update(
            // topic and start_position are not in the mask: ignored.
            v1::Subscription {
                topic: "elsewhere".into(),
                start_position: v1::StartPosition::Earliest as i32,
                ..sub("s", "")
            },
            &["ack_deadline_ms", "retry_policy", "dead_letter_policy"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.ack_deadline_ms, 30_000);
    let r = updated.retry_policy.unwrap_or_default();
    assert_eq!((r.min_backoff_ms, r.max_backoff_ms), (0, 0));
    assert_eq!(updated.dead_letter_policy, None);
    assert_eq!(updated.topic, "t");
    assert_eq!(updated.start_position, v1::StartPosition::Latest as i32);
    server.stop().await;
}

#[tokio::test]
async fn a_new_ack_deadline_applies_to_leases_granted_afterwards() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 600_000,
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["before"]).await;
    c.pull_n("s", 1, WAIT).await;
    c.admin
        .update_subscription(update(
            v1::Subscription {
                ack_deadline_ms: 20_000,
                ..sub("s", "")
            },
            &["ack_deadline_ms"],
        ))
        .await
        .unwrap();
    c.publish("t", &["after"]).await;
    c.pull_n("s", 1, WAIT).await;
    let old = secs_until(&state_in(&mut c, "s", "0").await.lease_deadline);
    let new = secs_until(&state_in(&mut c, "s", "1").await.lease_deadline);
    assert!((500.0..=600.5).contains(&old), "old lease ends in {old} s");
    assert!((10.0..=20.5).contains(&new), "new lease ends in {new} s");
    server.stop().await;
}

#[tokio::test]
async fn a_new_retry_policy_applies_to_nacks_made_afterwards() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        retry_policy: never_again(),
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["nacked before", "nacked after"]).await;
    let got = c.pull_n("s", 2, WAIT).await;
    c.nack("s", vec![got[0].ack_id.clone()], None).await;
    c.admin
        .update_subscription(update(sub("s", ""), &["retry_policy"]))
        .await
        .unwrap();
    c.nack("s", vec![got[1].ack_id.clone()], None).await;
    // Immediate redelivery for the later nack; the earlier one still backs
    // off for minutes.
    let again = c.pull_n("s", 1, WAIT).await;
    assert_eq!(text(&again[0]), "nacked after");
    assert!(c.pull("s", 10, 300).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_new_dead_letter_policy_applies_to_deliveries_made_afterwards() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["x"]).await;
    let first = c.pull_n("s", 1, WAIT).await;
    c.nack("s", ack_ids(&first), None).await;
    let second = c.pull_n("s", 1, WAIT).await;
    assert_eq!(second[0].delivery_attempt, 2, "no policy yet: redelivered");
    c.admin
        .update_subscription(update(
            v1::Subscription {
                dead_letter_policy: dead_letter(2, ""),
                ..sub("s", "")
            },
            &["dead_letter_policy"],
        ))
        .await
        .unwrap();
    c.nack("s", ack_ids(&second), None).await;
    let dls = c.dead_letters("s").await;
    assert_eq!(dls.len(), 1);
    assert_eq!(
        dls[0].reason,
        v1::DeadLetterReason::AttemptsExhausted as i32
    );
    assert!(c.pull("s", 1, 300).await.is_empty());
    server.stop().await;
}

// ----- Admin.DeleteSubscription ---------------------------------------------

#[tokio::test]
async fn deleting_a_subscription_ends_its_waiting_pulls_and_leaves_the_topic_alone() {
    let (server, mut c) = start_with_t_and_s().await;
    c.create_sub("other", "t").await;
    c.publish("t", &["m"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    c.ack("s", ack_ids(&got)).await;
    let mut waiting = c.clone();
    let pull = tokio::spawn(async move {
        waiting
            .subscriber
            .pull(v1::PullRequest {
                subscription: "s".into(),
                max_messages: 1,
                wait_ms: 30_000,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.admin
        .delete_subscription(v1::DeleteSubscriptionRequest { name: "s".into() })
        .await
        .unwrap();
    let pulled = tokio::time::timeout(WAIT, pull).await.unwrap().unwrap();
    assert_eq!(pulled.unwrap_err().code(), Code::NotFound);
    let stats = topic_stats(&mut c, "t").await;
    assert_eq!(
        (stats.first_offset, stats.next_offset, stats.subscriptions),
        (0, 1, 1)
    );
    let other = c.pull_n("other", 1, WAIT).await;
    assert_eq!(text(&other[0]), "m");
    server.stop().await;
}

// ----- Admin.PurgeSubscription ----------------------------------------------

#[tokio::test]
async fn purge_counts_what_it_cleared_and_leaves_the_dead_letter_queue_alone() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["rejected"]).await;
    reject_n(&mut c, "s", 1).await;
    c.publish("t", &["a", "b"]).await;
    c.pull_n("s", 1, WAIT).await;
    let purged = c
        .admin
        .purge_subscription(v1::PurgeSubscriptionRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner()
        .purged_messages;
    assert_eq!(purged, 2);
    assert_eq!(c.stats("s").await.dead_lettered_messages, 1);
    assert_eq!(c.dead_letters("s").await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn purge_makes_in_flight_ack_ids_report_already_settled() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["leased"]).await;
    let leased = c.pull_n("s", 1, WAIT).await;
    c.admin
        .purge_subscription(v1::PurgeSubscriptionRequest { name: "s".into() })
        .await
        .unwrap();
    let r = c.ack("s", ack_ids(&leased)).await;
    assert_eq!(r[0].status, v1::AckStatus::AlreadySettled as i32, "{r:?}");
    server.stop().await;
}

// ----- Admin.GetSubscriptionStats -------------------------------------------

#[tokio::test]
async fn subscription_stats_follow_the_backlog_the_floor_and_the_dead_letters() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    publish_n(&mut c, "t", 3).await;
    c.create_sub("s", "t").await;
    let s = c.stats("s").await;
    assert_eq!(s.subscription, "s");
    // Nothing to read yet; what precedes the start position is below the
    // floor.
    assert_eq!(
        (
            s.backlog_messages,
            s.in_flight_messages,
            s.dead_lettered_messages
        ),
        (0, 0, 0)
    );
    assert_eq!((s.oldest_unacked_age_ms, s.ack_floor_offset), (None, 3));
    publish_n(&mut c, "t", 4).await; // offsets 3..=6
    let got = c.pull_n("s", 2, WAIT).await; // 3 and 4, in flight
    let s = c.stats("s").await;
    assert_eq!(
        (s.backlog_messages, s.in_flight_messages, s.ack_floor_offset),
        (4, 2, 3)
    );
    assert!(s.oldest_unacked_age_ms.is_some());
    c.ack("s", vec![got[1].ack_id.clone()]).await;
    let s = c.stats("s").await;
    assert_eq!(
        (s.backlog_messages, s.in_flight_messages, s.ack_floor_offset),
        (3, 1, 3)
    );
    c.nack("s", vec![got[0].ack_id.clone()], Some("no")).await;
    let s = c.stats("s").await;
    assert_eq!(
        (
            s.backlog_messages,
            s.in_flight_messages,
            s.dead_lettered_messages,
            s.ack_floor_offset
        ),
        (2, 0, 1, 5)
    );
    let rest = c.pull_n("s", 2, WAIT).await;
    c.ack("s", ack_ids(&rest)).await;
    let s = c.stats("s").await;
    assert_eq!((s.backlog_messages, s.oldest_unacked_age_ms), (0, None));
    assert_eq!(
        s.ack_floor_offset,
        topic_stats(&mut c, "t").await.next_offset
    );
    assert_eq!(s.dropped_by_retention, 0);
    server.stop().await;
}

#[tokio::test]
async fn backlog_bytes_are_what_the_log_holds_from_the_ack_floor_on() {
    let (server, mut c) = start_with_t_and_s().await;
    publish(&mut c, "t", vec![data(&[b'x'; 1000]); 3])
        .await
        .unwrap();
    let all_three = c.stats("s").await.backlog_bytes;
    assert!(all_three > 3000, "framing included: {all_three}");
    // Settling the two newer ones does not move the floor: the log still
    // holds them for this subscription.
    let got = c.pull_n("s", 3, WAIT).await;
    c.ack("s", ack_ids(&got[1..])).await;
    let s = c.stats("s").await;
    assert_eq!((s.backlog_messages, s.backlog_bytes), (1, all_three));
    // Settling the oldest moves the floor past all three.
    c.ack("s", ack_ids(&got[..1])).await;
    let s = c.stats("s").await;
    assert_eq!((s.backlog_messages, s.backlog_bytes), (0, 0));
    server.stop().await;
}

// ----- Admin.GetTopicStats --------------------------------------------------

#[tokio::test]
async fn topic_stats_count_offsets_messages_segments_and_subscriptions() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    let s = topic_stats(&mut c, "t").await;
    assert_eq!(s.topic, "t");
    assert_eq!(
        (s.first_offset, s.next_offset, s.retained_messages),
        (0, 0, 0)
    );
    assert_eq!((s.segments, s.subscriptions), (1, 0));
    c.create_sub("a", "t").await;
    c.create_sub("b", "t").await;
    publish_n(&mut c, "t", 3).await;
    let s = topic_stats(&mut c, "t").await;
    assert_eq!(
        (s.first_offset, s.next_offset, s.retained_messages),
        (0, 3, 3)
    );
    assert_eq!(s.subscriptions, 2);
    assert!(s.retained_bytes > 0 && s.segments >= 1, "{s:?}");
    server.stop().await;
}

// ----- Admin.GetMessageStatus -----------------------------------------------

#[tokio::test]
async fn message_status_refuses_ids_that_are_not_decimal_uint64() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["m"]).await;
    let mut t = Table::default();
    for id in ["", "-1", "abc", "1.5", "0x1", "18446744073709551616"] {
        let r = c
            .admin
            .get_message_status(v1::GetMessageStatusRequest {
                topic: "t".into(),
                message_id: id.into(),
            })
            .await;
        t.row(&format!("{id:?}"), r, Want::Invalid("message_id"));
    }
    let r = c
        .admin
        .get_message_status(v1::GetMessageStatusRequest {
            topic: "t".into(),
            message_id: "1".into(),
        })
        .await;
    t.row("never assigned", r, Want::Code(Code::NotFound, "1"));
    t.assert_all_hold();
    server.stop().await;
}

#[tokio::test]
async fn message_status_lists_subscriptions_by_name_with_fields_only_for_their_state() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        retry_policy: never_again(),
        ..sub("pending", "t")
    })
    .await;
    c.create_sub("rejected", "t").await;
    c.create_sub("leased", "t").await;
    c.publish("t", &["m"]).await;
    let got = c.pull_n("pending", 1, WAIT).await;
    c.nack("pending", ack_ids(&got), None).await;
    let got = c.pull_n("rejected", 1, WAIT).await;
    c.nack("rejected", ack_ids(&got), Some("why")).await;
    let leased = c.pull_n("leased", 1, WAIT).await;
    let status = message_status(&mut c, "t", "0").await;
    assert_eq!(status.message_id, "0");
    assert_eq!(
        status.publish_time,
        leased[0].message.as_ref().unwrap().publish_time
    );
    let seen: Vec<_> = status
        .subscriptions
        .iter()
        .map(|s| {
            (
                s.subscription.as_str(),
                s.state,
                s.delivery_attempt,
                s.lease_deadline.is_some(),
                s.dead_letter_reason,
                s.dead_letter_reason_text.as_str(),
            )
        })
        .collect();
    use v1::MessageState as S;
    let rejected = v1::DeadLetterReason::Rejected as i32;
    assert_eq!(
        seen,
        [
            ("leased", S::InFlight as i32, 1, true, 0, ""),
            ("pending", S::Pending as i32, 1, false, 0, ""),
            (
                "rejected",
                S::DeadLettered as i32,
                1,
                false,
                rejected,
                "why"
            ),
        ]
    );
    server.stop().await;
}

// ----- Admin.ListDeadLetters ------------------------------------------------

/// Every page of `sub`'s dead letters of `max`: (message ids, next token).
async fn all_pages(c: &mut Clients, sub: &str, max: u32) -> Vec<(Vec<String>, String)> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = dead_letter_page(c, sub, max, &token).await;
        let ids = page
            .dead_letters
            .iter()
            .map(|d| d.message.as_ref().unwrap().message_id.clone())
            .collect();
        token = page.next_page_token.clone();
        pages.push((ids, page.next_page_token));
        if token.is_empty() {
            return pages;
        }
        assert!(pages.len() < 10, "the pages never end: {pages:?}");
    }
}

#[tokio::test]
async fn dead_letters_page_in_offset_order_until_the_token_is_empty() {
    let (server, mut c) = start_with_t_and_s().await;
    publish_n(&mut c, "t", 4).await;
    reject_n(&mut c, "s", 4).await;
    let ids = |p: &[(Vec<String>, String)]| -> Vec<Vec<String>> {
        p.iter().map(|(ids, _)| ids.clone()).collect()
    };
    let pages = all_pages(&mut c, "s", 3).await;
    assert_eq!(ids(&pages), [vec!["0", "1", "2"], vec!["3"]]);
    assert!(!pages[0].1.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_full_last_page_has_no_next_page_token() {
    let (server, mut c) = start_with_t_and_s().await;
    publish_n(&mut c, "t", 4).await;
    reject_n(&mut c, "s", 4).await;
    let pages = all_pages(&mut c, "s", 2).await;
    let ids: Vec<Vec<String>> = pages.iter().map(|(ids, _)| ids.clone()).collect();
    assert_eq!(ids, [vec!["0", "1"], vec!["2", "3"]]);
    server.stop().await;
}

#[tokio::test]
async fn a_dead_letter_page_is_100_unless_max_says_otherwise() {
    let (server, mut c) = start_with_t_and_s().await;
    publish_n(&mut c, "t", 101).await;
    reject_n(&mut c, "s", 101).await;
    let page = dead_letter_page(&mut c, "s", 0, "").await;
    assert_eq!(page.dead_letters.len(), 100);
    assert!(!page.next_page_token.is_empty());
    let page = dead_letter_page(&mut c, "s", 1000, "").await;
    assert_eq!(page.dead_letters.len(), 101);
    assert_eq!(page.next_page_token, "");
    server.stop().await;
}

#[tokio::test]
async fn a_dead_letter_carries_the_whole_message_and_where_it_came_from() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["filler"]).await;
    let published = v1::PublishMessage {
        data: b"payload".to_vec().into(),
        attributes: attrs(&[("k", "v")]),
        ordering_key: "key".into(),
    };
    publish(&mut c, "t", vec![published]).await.unwrap();
    let got = c.pull_n("s", 2, WAIT).await;
    c.ack("s", vec![got[0].ack_id.clone()]).await;
    c.nack("s", vec![got[1].ack_id.clone()], None).await;
    let again = c.pull_n("s", 1, WAIT).await;
    c.nack("s", ack_ids(&again), Some("why")).await;
    let dls = c.dead_letters("s").await;
    assert_eq!(dls.len(), 1);
    let dl = &dls[0];
    let m = dl.message.as_ref().unwrap();
    assert_eq!((m.message_id.as_str(), dl.offset), ("1", 1));
    assert_eq!(&m.data[..], b"payload");
    assert_eq!(m.attributes, attrs(&[("k", "v")]));
    assert_eq!(m.ordering_key, "key");
    assert_eq!(
        m.publish_time,
        got[1].message.as_ref().unwrap().publish_time
    );
    assert_eq!((dl.topic.as_str(), dl.subscription.as_str()), ("t", "s"));
    assert_eq!(dl.reason, v1::DeadLetterReason::Rejected as i32);
    assert_eq!((dl.reason_text.as_str(), dl.delivery_attempts), ("why", 2));
    let first = unix_us(dl.first_delivery_time.as_ref().unwrap());
    let last = unix_us(dl.last_delivery_time.as_ref().unwrap());
    let dead = unix_us(dl.dead_letter_time.as_ref().unwrap());
    assert!(first < last && last <= dead, "{first} {last} {dead}");
    server.stop().await;
}

// ----- Admin.RedriveDeadLetters ---------------------------------------------

#[tokio::test]
async fn redrive_refuses_bad_ids_and_an_unspecified_reason() {
    let (server, mut c) = start_with_t_and_s().await;
    let rows = [
        (
            "1001 ids",
            vec!["1".to_string(); 1001],
            None,
            Want::Invalid("message_ids"),
        ),
        ("1000 ids", vec!["1".to_string(); 1000], None, Want::Ok),
        (
            "an id that is not a number",
            vec!["x".to_string()],
            None,
            Want::Invalid("message_ids"),
        ),
        (
            "reason UNSPECIFIED",
            vec![],
            Some(v1::DeadLetterReason::Unspecified as i32),
            Want::Invalid("reason"),
        ),
    ];
    let mut t = Table::default();
    for (what, message_ids, reason, want) in rows {
        let r = c
            .admin
            .redrive_dead_letters(v1::RedriveDeadLettersRequest {
                subscription: "s".into(),
                message_ids,
                reason,
                replacement: None,
            })
            .await;
        t.row(what, r, want);
    }
    t.assert_all_hold();
    server.stop().await;
}

async fn redrive(c: &mut Clients, ids: &[&str], reason: Option<v1::DeadLetterReason>) -> u64 {
    c.admin
        .redrive_dead_letters(v1::RedriveDeadLettersRequest {
            subscription: "s".into(),
            message_ids: ids.iter().map(|i| i.to_string()).collect(),
            reason: reason.map(|r| r as i32),
            replacement: None,
        })
        .await
        .unwrap()
        .into_inner()
        .redriven
}

fn dead_letter_ids(dls: &[v1::DeadLetter]) -> Vec<String> {
    dls.iter()
        .map(|d| d.message.as_ref().unwrap().message_id.clone())
        .collect()
}

#[tokio::test]
async fn redrive_by_ids_skips_ids_not_in_the_queue() {
    let (server, mut c) = start_with_t_and_s().await;
    publish_n(&mut c, "t", 3).await;
    reject_n(&mut c, "s", 3).await;
    assert_eq!(redrive(&mut c, &["1", "99"], None).await, 1);
    assert_eq!(dead_letter_ids(&c.dead_letters("s").await), ["0", "2"]);
    let back = c.pull_n("s", 1, WAIT).await;
    assert_eq!(id_of(&back[0]), "1");
    server.stop().await;
}

#[tokio::test]
async fn redrive_by_reason_moves_only_dead_letters_of_that_reason() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        dead_letter_policy: dead_letter(1, ""),
        ..sub("s", "t")
    })
    .await;
    publish_n(&mut c, "t", 2).await;
    let got = c.pull_n("s", 2, WAIT).await;
    c.nack("s", vec![got[0].ack_id.clone()], None).await;
    c.nack("s", vec![got[1].ack_id.clone()], Some("no")).await;
    assert_eq!(
        redrive(&mut c, &[], Some(v1::DeadLetterReason::Rejected)).await,
        1
    );
    let left = c.dead_letters("s").await;
    assert_eq!(dead_letter_ids(&left), ["0"]);
    assert_eq!(
        left[0].reason,
        v1::DeadLetterReason::AttemptsExhausted as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn a_redriven_message_keeps_its_id_and_content_restarts_its_attempts_and_gets_a_new_publish_time()
 {
    let (server, mut c) = start_with_t_and_s().await;
    let original = v1::PublishMessage {
        data: b"job".to_vec().into(),
        attributes: attrs(&[("k", "v")]),
        ordering_key: "key".into(),
    };
    publish(&mut c, "t", vec![original]).await.unwrap();
    let first = c.pull_n("s", 1, WAIT).await;
    c.nack("s", ack_ids(&first), None).await;
    let second = c.pull_n("s", 1, WAIT).await;
    c.nack("s", ack_ids(&second), Some("bad")).await;
    let redriven_at = now_us();
    assert_eq!(redrive(&mut c, &[], None).await, 1);
    let state = state_in(&mut c, "s", "0").await;
    assert_eq!(
        (state.state, state.delivery_attempt),
        (v1::MessageState::Pending as i32, 0)
    );
    let back = c.pull_n("s", 1, WAIT).await;
    assert_eq!(back[0].delivery_attempt, 1);
    let m = back[0].message.as_ref().unwrap();
    assert_eq!((m.message_id.as_str(), &m.data[..]), ("0", &b"job"[..]));
    assert_eq!(m.attributes, attrs(&[("k", "v")]));
    assert_eq!(m.ordering_key, "key");
    let published = unix_us(m.publish_time.as_ref().unwrap());
    assert!(
        published >= redriven_at,
        "publish time {published} before the redrive {redriven_at}"
    );
    // Counted again since the redrive.
    c.nack("s", ack_ids(&back), Some("still bad")).await;
    let dl = &c.dead_letters("s").await[0];
    assert_eq!(dl.delivery_attempts, 1);
    assert!(unix_us(dl.first_delivery_time.as_ref().unwrap()) >= redriven_at);
    server.stop().await;
}

// ----- Admin.PurgeDeadLetters -----------------------------------------------

#[tokio::test]
async fn purged_dead_letters_count_as_done_like_acked_ones() {
    let (server, mut c) = start_with_t_and_s().await;
    publish_n(&mut c, "t", 2).await;
    reject_n(&mut c, "s", 2).await;
    let purged = c
        .admin
        .purge_dead_letters(v1::PurgeDeadLettersRequest {
            subscription: "s".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 2);
    let s = c.stats("s").await;
    assert_eq!((s.dead_lettered_messages, s.backlog_messages), (0, 0));
    assert!(c.dead_letters("s").await.is_empty());
    assert_eq!(
        state_in(&mut c, "s", "0").await.state,
        v1::MessageState::Acked as i32
    );
    assert!(c.pull("s", 10, 200).await.is_empty());
    assert_eq!(redrive(&mut c, &[], None).await, 0);
    server.stop().await;
}

// ----- Admin.GetBrokerStats -------------------------------------------------

#[tokio::test]
async fn broker_stats_report_version_uptime_counts_and_memory_budget() {
    let (server, mut c) = start_with(|config| config.memory_bytes_max = 256 << 20).await;
    c.create_topic("t1").await;
    c.create_topic("t2").await;
    c.create_sub("s", "t1").await;
    let mut stats = async || {
        c.admin
            .get_broker_stats(v1::GetBrokerStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let first = stats().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = stats().await;
    assert_eq!(first.version, env!("CARGO_PKG_VERSION"));
    assert_eq!((first.topics, first.subscriptions), (2, 1));
    assert_eq!(first.fsync_mode, "always");
    assert_eq!(first.memory_max_bytes, 256 << 20);
    assert!(
        second.uptime_ms >= first.uptime_ms + 50,
        "{first:?} {second:?}"
    );
    server.stop().await;
}

// ----- Publisher.Publish ----------------------------------------------------

#[tokio::test]
async fn publish_returns_increasing_decimal_ids_per_topic_in_request_order() {
    let (server, mut c) = start().await;
    c.create_topic("a").await;
    c.create_topic("b").await;
    // No subscriptions: publishing still succeeds.
    assert_eq!(publish_n(&mut c, "a", 3).await, ["0", "1", "2"]);
    assert_eq!(publish_n(&mut c, "a", 2).await, ["3", "4"]);
    // Ids of different topics may collide.
    assert_eq!(publish_n(&mut c, "b", 1).await, ["0"]);
    server.stop().await;
}

#[tokio::test]
async fn publish_limits_accept_the_bound_refuse_past_it_naming_the_field_and_publish_nothing() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    let with = |attributes: &[(&str, &str)], ordering_key: &str| v1::PublishMessage {
        data: b"x".to_vec().into(),
        attributes: attrs(attributes),
        ordering_key: ordering_key.into(),
    };
    let (k256, k257) = ("k".repeat(256), "k".repeat(257));
    let (v1024, v1025) = ("v".repeat(1024), "v".repeat(1025));
    let many = |n: usize| v1::PublishMessage {
        attributes: (0..n).map(|i| (format!("k{i}"), "v".into())).collect(),
        ..data(b"x")
    };
    let ok = || data(b"ok");
    let rows: Vec<(&str, Vec<v1::PublishMessage>, Want)> = vec![
        ("1000 messages", vec![ok(); 1000], Want::Ok),
        ("1001 messages", vec![ok(); 1001], Want::Invalid("messages")),
        ("100 attributes", vec![many(100)], Want::Ok),
        (
            "101 attributes",
            vec![ok(), many(101)],
            Want::Invalid("messages[1].attributes"),
        ),
        ("256-byte key", vec![with(&[(&k256, "v")], "")], Want::Ok),
        (
            "257-byte key",
            vec![ok(), with(&[(&k257, "v")], "")],
            Want::Invalid("messages[1].attributes"),
        ),
        (
            "empty key",
            vec![ok(), with(&[("", "v")], "")],
            Want::Invalid("messages[1].attributes"),
        ),
        (
            "1024-byte value",
            vec![with(&[("k", &v1024)], "")],
            Want::Ok,
        ),
        (
            "1025-byte value",
            vec![ok(), with(&[("k", &v1025)], "")],
            Want::Invalid("messages[1].attributes"),
        ),
        ("1024-byte ordering key", vec![with(&[], &v1024)], Want::Ok),
        (
            "1025-byte ordering key",
            vec![ok(), with(&[], &v1025)],
            Want::Invalid("messages[1].ordering_key"),
        ),
        (
            "the fourth message bad",
            vec![ok(), ok(), ok(), many(101)],
            Want::Invalid("messages[3].attributes"),
        ),
        ("empty data", vec![data(b"")], Want::Ok),
    ];
    let mut t = Table::default();
    let mut accepted = 0;
    for (what, messages, want) in rows {
        let n = messages.len() as u64;
        let r = publish(&mut c, "t", messages).await;
        if r.is_ok() {
            accepted += n;
        }
        t.row(what, r, want);
    }
    t.assert_all_hold();
    // Refused batches left nothing behind, not even their good messages.
    assert_eq!(topic_stats(&mut c, "t").await.next_offset, accepted);
    server.stop().await;
}

#[tokio::test]
async fn a_messages_size_counts_data_attribute_keys_and_values_and_the_ordering_key() {
    let (server, mut c) = start_with(|config| config.message_bytes_max = 2000).await;
    c.create_topic("t").await;
    let sized = |data_bytes: usize, key: usize, value: usize, ordering: usize| v1::PublishMessage {
        data: vec![b'd'; data_bytes].into(),
        attributes: if key > 0 {
            attrs(&[(&"k".repeat(key), &"v".repeat(value))])
        } else {
            Default::default()
        },
        ordering_key: "o".repeat(ordering),
    };
    let rows = [
        ("data at the limit", sized(2000, 0, 0, 0), Want::Ok),
        (
            "data over it",
            sized(2001, 0, 0, 0),
            Want::Invalid("messages[0]"),
        ),
        (
            "with an attribute at the limit",
            sized(1000, 256, 744, 0),
            Want::Ok,
        ),
        (
            "with an attribute over it",
            sized(1000, 256, 745, 0),
            Want::Invalid("messages[0]"),
        ),
        (
            "with an ordering key at the limit",
            sized(976, 0, 0, 1024),
            Want::Ok,
        ),
        (
            "with an ordering key over it",
            sized(977, 0, 0, 1024),
            Want::Invalid("messages[0]"),
        ),
        (
            "everything at the limit",
            sized(1000, 100, 400, 500),
            Want::Ok,
        ),
        (
            "everything over it",
            sized(1001, 100, 400, 500),
            Want::Invalid("messages[0]"),
        ),
    ];
    let mut t = Table::default();
    for (what, m, want) in rows {
        let r = publish(&mut c, "t", vec![m]).await;
        t.row(what, r, want);
    }
    t.assert_all_hold();
    server.stop().await;
}

#[tokio::test]
async fn a_message_round_trips_with_attributes_ordering_key_and_publish_time() {
    let (server, mut c) = start_with_t_and_s().await;
    let before = now_us();
    let ids = publish(
        &mut c,
        "t",
        vec![v1::PublishMessage {
            data: Default::default(),
            attributes: attrs(&[("a", "1"), ("b", "")]),
            ordering_key: "order-7".into(),
        }],
    )
    .await
    .unwrap();
    let after = now_us();
    let got = c.pull_n("s", 1, WAIT).await;
    let m = got[0].message.as_ref().unwrap();
    assert_eq!(m.message_id, ids[0]);
    assert!(m.data.is_empty());
    assert_eq!(m.attributes, attrs(&[("a", "1"), ("b", "")]));
    assert_eq!(m.ordering_key, "order-7");
    let at = unix_us(m.publish_time.as_ref().unwrap());
    assert!(
        (before..=after).contains(&at),
        "publish time {at} outside {before}..={after}"
    );
    server.stop().await;
}

fn reject_publish(max_bytes: u64) -> Option<v1::RetentionPolicy> {
    Some(v1::RetentionPolicy {
        max_age_ms: None,
        max_bytes: Some(max_bytes),
        mode: v1::RetentionMode::RejectPublish as i32,
    })
}

#[tokio::test]
async fn a_batch_larger_than_a_reject_publish_bound_never_fits_and_stores_nothing() {
    let (server, mut c) = start().await;
    c.admin
        .create_topic(v1::CreateTopicRequest {
            name: "rp".into(),
            retention: reject_publish(1000),
        })
        .await
        .unwrap();
    c.create_sub("s", "rp").await;
    let r = publish(&mut c, "rp", vec![data(&[0; 2000])]).await;
    let mut t = Table::default();
    t.row(
        "2000 bytes into 1000",
        r.clone(),
        Want::Code(Code::ResourceExhausted, "\"rp\""),
    );
    t.row(
        "2000 bytes into 1000",
        r,
        Want::Code(Code::ResourceExhausted, "1000"),
    );
    t.assert_all_hold();
    assert_eq!(topic_stats(&mut c, "rp").await.next_offset, 0);
    publish(&mut c, "rp", vec![data(&[0; 100])]).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn redrives_and_forwarding_into_a_full_reject_publish_topic_are_not_refused() {
    let (server, mut c) = start().await;
    c.admin
        .create_topic(v1::CreateTopicRequest {
            name: "rp".into(),
            retention: reject_publish(4096),
        })
        .await
        .unwrap();
    c.create_sub("s", "rp").await;
    c.create_topic("src").await;
    c.create_sub_with(v1::Subscription {
        dead_letter_policy: dead_letter(5, "rp"),
        ..sub("fwd", "src")
    })
    .await;
    let mut fills = 0;
    while publish(&mut c, "rp", vec![data(&[0; 1000])]).await.is_ok() {
        fills += 1;
        assert!(fills < 20, "never full");
    }
    let full = topic_stats(&mut c, "rp").await.next_offset;
    reject_n(&mut c, "s", 1).await;
    assert_eq!(redrive(&mut c, &[], None).await, 1);
    assert_eq!(topic_stats(&mut c, "rp").await.next_offset, full + 1);
    c.publish("src", &["forward me"]).await;
    reject_n(&mut c, "fwd", 1).await;
    let mut probe = c.clone();
    eventually("the dead letter is forwarded into the full topic", || {
        let mut c = probe.clone();
        async move { topic_stats(&mut c, "rp").await.next_offset == full + 2 }
    })
    .await;
    // Still full for publishers.
    let r = publish(&mut probe, "rp", vec![data(&[0; 1000])]).await;
    assert_eq!(r.unwrap_err().code(), Code::ResourceExhausted);
    server.stop().await;
}

// ----- Subscriber.Pull ------------------------------------------------------

fn pull_req(sub: &str, max_messages: u32, wait_ms: u64) -> v1::PullRequest {
    v1::PullRequest {
        subscription: sub.into(),
        max_messages,
        wait_ms,
    }
}

#[tokio::test]
async fn pull_returns_as_soon_as_a_message_arrives() {
    let (server, mut c) = start_with_t_and_s().await;
    let mut waiting = c.clone();
    let started = Instant::now();
    let pull =
        tokio::spawn(async move { waiting.subscriber.pull(pull_req("s", 10, 30_000)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.publish("t", &["x"]).await;
    let got = tokio::time::timeout(WAIT, pull)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(got.received_messages.len(), 1);
    assert!(started.elapsed() < WAIT, "waited {:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn pull_returns_at_most_max_messages_in_offset_order() {
    let (server, mut c) = start_with_t_and_s().await;
    publish_n(&mut c, "t", 5).await;
    let got = c.pull("s", 3, 5_000).await;
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ["0", "1", "2"]);
    let got = c.pull("s", 1000, 5_000).await;
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ["3", "4"]);
    server.stop().await;
}

#[tokio::test]
async fn pull_with_nothing_deliverable_returns_empty_once_wait_ms_passed() {
    let (server, mut c) = start_with_t_and_s().await;
    let started = Instant::now();
    assert!(c.pull("s", 10, 0).await.is_empty());
    assert!(started.elapsed() < WAIT);
    let started = Instant::now();
    assert!(c.pull("s", 10, 300).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test]
async fn pull_accepts_the_bounds_of_its_ranges() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["x"]).await;
    // A message is ready, so the longest wait returns at once.
    let got = c.pull("s", 1000, 60_000).await;
    assert_eq!(got.len(), 1);
    let got = c.pull("s", 1, 0).await;
    assert!(got.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn pull_leases_for_the_subscriptions_ack_deadline() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 20_000,
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["x"]).await;
    c.pull_n("s", 1, WAIT).await;
    let left = secs_until(&state_in(&mut c, "s", "0").await.lease_deadline);
    assert!((10.0..=20.5).contains(&left), "the lease ends in {left} s");
    server.stop().await;
}

#[tokio::test]
async fn a_lost_pull_response_is_delivered_again_when_its_lease_expires() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 200,
        ..sub("s", "t")
    })
    .await;
    publish(&mut c, "t", vec![data(&[1; 1000])]).await.unwrap();
    // This client cannot decode the response: it is lost on the way.
    let mut tiny = v1::subscriber_client::SubscriberClient::new(server.channel().await)
        .max_decoding_message_size(64);
    tiny.pull(pull_req("s", 1, 5_000)).await.unwrap_err();
    let again = c.pull_n("s", 1, WAIT).await;
    assert_eq!(again[0].delivery_attempt, 2);
    server.stop().await;
}

// ----- Subscriber.StreamingPull ---------------------------------------------

#[tokio::test]
async fn bad_stream_requests_end_the_stream_naming_the_field() {
    let (server, mut c) = start_with_t_and_s().await;
    c.create_sub("other", "t").await;
    let on_s = |r: v1::StreamingPullRequest| v1::StreamingPullRequest {
        subscription: "s".into(),
        ..r
    };
    let none = v1::StreamingPullRequest::default;
    let deadline = |ms| v1::StreamingPullRequest {
        stream_ack_deadline_ms: Some(ms),
        ..none()
    };
    let messages = |n| v1::StreamingPullRequest {
        max_outstanding_messages: Some(n),
        ..none()
    };
    let bytes = |n| v1::StreamingPullRequest {
        max_outstanding_bytes: Some(n),
        ..none()
    };
    let modify = |n: usize, ms| v1::StreamingPullRequest {
        modify_deadlines: vec![
            v1::ModifyDeadline {
                ack_id: "x".into(),
                ack_deadline_ms: ms,
            };
            n
        ],
        ..none()
    };
    let nacks = |n: usize, reason: usize| v1::StreamingPullRequest {
        nacks: vec![
            v1::NackEntry {
                ack_id: "x".into(),
                reject: true,
                reason: "r".repeat(reason),
            };
            n
        ],
        ..none()
    };
    // Bad settings, checked on the first request and on a later one.
    let settings = [
        (
            "stream_ack_deadline_ms 99",
            deadline(99),
            "stream_ack_deadline_ms",
        ),
        (
            "stream_ack_deadline_ms 600001",
            deadline(600_001),
            "stream_ack_deadline_ms",
        ),
        (
            "max_outstanding_messages 0",
            messages(0),
            "max_outstanding_messages",
        ),
        (
            "max_outstanding_messages 100001",
            messages(100_001),
            "max_outstanding_messages",
        ),
        ("max_outstanding_bytes 0", bytes(0), "max_outstanding_bytes"),
    ];
    let later_only = [
        ("another subscription", first_on("other"), "subscription"),
        ("1001 ack ids", acking(vec!["x".into(); 1001]), "ack_ids"),
        (
            "1001 deadline changes",
            modify(1001, 1000),
            "modify_deadlines",
        ),
        ("deadline change of 99", modify(1, 99), "modify_deadlines"),
        (
            "deadline change of 600001",
            modify(1, 600_001),
            "modify_deadlines",
        ),
        ("1001 nacks", nacks(1001, 0), "nacks"),
        ("a 1025-byte nack reason", nacks(1, 1025), "nacks"),
    ];
    let mut t = Table::default();
    t.row(
        "first request without a subscription",
        stream_outcome(&c, vec![none()]).await,
        Want::Invalid("subscription"),
    );
    for (what, req, field) in settings.clone() {
        let r = stream_outcome(&c, vec![on_s(req)]).await;
        t.row(&format!("first request: {what}"), r, Want::Invalid(field));
    }
    for (what, req, field) in settings.into_iter().chain(later_only) {
        let r = stream_outcome(&c, vec![first_on("s"), req]).await;
        t.row(&format!("later request: {what}"), r, Want::Invalid(field));
    }
    t.assert_all_hold();
    // None of them touched the subscription.
    c.publish("t", &["x"]).await;
    assert_eq!(c.pull_n("s", 1, WAIT).await[0].delivery_attempt, 1);
    server.stop().await;
}

#[tokio::test]
async fn later_requests_may_repeat_the_subscription_and_set_the_bounds_of_each_range() {
    let (server, mut c) = start_with_t_and_s().await;
    let (tx, mut stream) = open(&c, first_on("s")).await.unwrap();
    for req in [
        v1::StreamingPullRequest {
            stream_ack_deadline_ms: Some(100),
            max_outstanding_messages: Some(1),
            max_outstanding_bytes: Some(1),
            ..first_on("s")
        },
        v1::StreamingPullRequest {
            stream_ack_deadline_ms: Some(600_000),
            max_outstanding_messages: Some(100_000),
            ..Default::default()
        },
        v1::StreamingPullRequest {
            nacks: vec![v1::NackEntry {
                ack_id: "x".into(),
                reject: true,
                reason: "r".repeat(1024),
            }],
            modify_deadlines: vec![v1::ModifyDeadline {
                ack_id: "x".into(),
                ack_deadline_ms: 0,
            }],
            ack_ids: vec!["x".into(); 1000],
            ..Default::default()
        },
    ] {
        tx.send(req).await.unwrap();
    }
    let (_, results) = read(&mut stream, 0, 1002).await;
    assert!(
        results
            .iter()
            .all(|r| r.status == v1::AckStatus::Unknown as i32)
    );
    c.publish("t", &["still streaming"]).await;
    let (got, _) = read(&mut stream, 1, 0).await;
    assert_eq!(text(&got[0]), "still streaming");
    server.stop().await;
}

#[tokio::test]
async fn half_close_sends_the_outstanding_ack_results_and_ends_ok() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["a", "b"]).await;
    let (tx, mut stream) = open(&c, first_on("s")).await.unwrap();
    let (got, _) = read(&mut stream, 2, 0).await;
    tx.send(acking(ack_ids(&got))).await.unwrap();
    drop(tx);
    let (end, results) = stream_end(&mut stream).await;
    end.unwrap();
    let statuses: Vec<i32> = results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [v1::AckStatus::Ok as i32; 2]);
    assert_eq!(c.stats("s").await.backlog_messages, 0);
    server.stop().await;
}

#[tokio::test]
async fn within_a_request_acks_apply_before_deadline_changes_and_nacks() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["x"]).await;
    let (tx, mut stream) = open(&c, first_on("s")).await.unwrap();
    let (got, _) = read(&mut stream, 1, 0).await;
    let id = got[0].ack_id.clone();
    tx.send(v1::StreamingPullRequest {
        nacks: vec![v1::NackEntry {
            ack_id: id.clone(),
            reject: true,
            reason: "too late".into(),
        }],
        modify_deadlines: vec![v1::ModifyDeadline {
            ack_id: id.clone(),
            ack_deadline_ms: 5_000,
        }],
        ack_ids: vec![id.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, results) = read(&mut stream, 0, 3).await;
    let seen: Vec<(&str, i32)> = results
        .iter()
        .map(|r| (r.ack_id.as_str(), r.status))
        .collect();
    use v1::AckStatus as A;
    assert_eq!(
        seen,
        [
            (id.as_str(), A::Ok as i32),
            (id.as_str(), A::AlreadySettled as i32),
            (id.as_str(), A::AlreadySettled as i32),
        ]
    );
    assert!(c.dead_letters("s").await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_expired_lease_frees_credit_and_its_stale_ack_id_does_not_end_the_stream() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["x"]).await;
    let (tx, mut stream) = open(
        &c,
        v1::StreamingPullRequest {
            max_outstanding_messages: Some(1),
            stream_ack_deadline_ms: Some(60_000),
            ..first_on("s")
        },
    )
    .await
    .unwrap();
    let (first, _) = read(&mut stream, 1, 0).await;
    // Cut this lease short: once it expires the message comes back on the
    // same stream (its only credit is free again) under a new ack id.
    c.subscriber
        .modify_ack_deadline(v1::ModifyAckDeadlineRequest {
            subscription: "s".into(),
            ack_ids: ack_ids(&first),
            ack_deadline_ms: 100,
        })
        .await
        .unwrap();
    let (second, _) = read(&mut stream, 1, 0).await;
    assert_eq!(second[0].delivery_attempt, 2);
    tx.send(acking(vec![
        first[0].ack_id.clone(),
        second[0].ack_id.clone(),
    ]))
    .await
    .unwrap();
    let (_, results) = read(&mut stream, 0, 2).await;
    let statuses: Vec<i32> = results.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [v1::AckStatus::Stale as i32, v1::AckStatus::Ok as i32]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_unary_ack_frees_stream_credit() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["a", "b"]).await;
    let (_tx, mut stream) = open(
        &c,
        v1::StreamingPullRequest {
            max_outstanding_messages: Some(1),
            ..first_on("s")
        },
    )
    .await
    .unwrap();
    let (first, _) = read(&mut stream, 1, 0).await;
    assert!(quiet(&mut stream).await.is_empty(), "over the window of 1");
    c.ack("s", ack_ids(&first)).await;
    let (second, _) = read(&mut stream, 1, 0).await;
    assert_eq!(text(&second[0]), "b");
    server.stop().await;
}

#[tokio::test]
async fn the_default_window_is_1000_messages() {
    let (server, mut c) = start_with_t_and_s().await;
    publish_n(&mut c, "t", 1000).await;
    publish_n(&mut c, "t", 100).await;
    let (_tx, mut stream) = open(&c, first_on("s")).await.unwrap();
    let (mut got, _) = read(&mut stream, 1000, 0).await;
    got.extend(quiet(&mut stream).await);
    assert_eq!(got.len(), 1000);
    server.stop().await;
}

#[tokio::test]
async fn lowering_max_outstanding_takes_nothing_back_and_holds_from_then_on() {
    let (server, mut c) = start_with_t_and_s().await;
    publish_n(&mut c, "t", 6).await;
    let (tx, mut stream) = open(
        &c,
        v1::StreamingPullRequest {
            max_outstanding_messages: Some(4),
            ..first_on("s")
        },
    )
    .await
    .unwrap();
    let (mut got, _) = read(&mut stream, 4, 0).await;
    got.extend(quiet(&mut stream).await);
    assert_eq!(got.len(), 4);
    tx.send(v1::StreamingPullRequest {
        max_outstanding_messages: Some(1),
        ack_ids: ack_ids(&got[..2]),
        ..Default::default()
    })
    .await
    .unwrap();
    read(&mut stream, 0, 2).await;
    assert!(
        quiet(&mut stream).await.is_empty(),
        "2 outstanding, over the new window of 1"
    );
    tx.send(acking(ack_ids(&got[2..]))).await.unwrap();
    let (more, _) = read(&mut stream, 1, 2).await;
    let mut more: Vec<String> = more.iter().map(text).collect();
    more.extend(quiet(&mut stream).await.iter().map(text));
    assert_eq!(more, ["m4"]);
    server.stop().await;
}

#[tokio::test]
async fn stream_leases_use_the_subscriptions_deadline_until_the_stream_sets_one() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 600_000,
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["default"]).await;
    let (tx, mut stream) = open(&c, first_on("s")).await.unwrap();
    read(&mut stream, 1, 0).await;
    // The setting and an ack of nothing: its result says the setting is in.
    tx.send(v1::StreamingPullRequest {
        stream_ack_deadline_ms: Some(20_000),
        ack_ids: vec!["x".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    read(&mut stream, 0, 1).await;
    c.publish("t", &["set"]).await;
    read(&mut stream, 1, 0).await;
    let old = secs_until(&state_in(&mut c, "s", "0").await.lease_deadline);
    let new = secs_until(&state_in(&mut c, "s", "1").await.lease_deadline);
    assert!(
        (500.0..=600.5).contains(&old),
        "the first lease ends in {old} s"
    );
    assert!(
        (10.0..=20.5).contains(&new),
        "the second lease ends in {new} s"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_message_larger_than_max_outstanding_bytes_goes_alone() {
    let (server, mut c) = start_with_t_and_s().await;
    publish(&mut c, "t", vec![data(&[1; 100]), data(&[2; 100])])
        .await
        .unwrap();
    let (_tx, mut stream) = open(
        &c,
        v1::StreamingPullRequest {
            max_outstanding_bytes: Some(1),
            ..first_on("s")
        },
    )
    .await
    .unwrap();
    let (mut got, _) = read(&mut stream, 1, 0).await;
    got.extend(quiet(&mut stream).await);
    assert_eq!(got.len(), 1);
    c.ack("s", ack_ids(&got)).await;
    let (next, _) = read(&mut stream, 1, 0).await;
    assert_eq!(id_of(&next[0]), "1");
    server.stop().await;
}

#[tokio::test]
async fn max_outstanding_bytes_counts_attributes_and_ordering_keys() {
    let (server, mut c) = start_with_t_and_s().await;
    let heavy = || v1::PublishMessage {
        data: b"d".to_vec().into(),
        attributes: attrs(&[("k", &"v".repeat(1000))]),
        ordering_key: String::new(),
    };
    publish(&mut c, "t", vec![heavy(), heavy(), heavy()])
        .await
        .unwrap();
    // Each message is 1002 bytes as sized for the maximum message size:
    // one fits in 1500, two do not.
    let (_tx, mut stream) = open(
        &c,
        v1::StreamingPullRequest {
            max_outstanding_bytes: Some(1500),
            ..first_on("s")
        },
    )
    .await
    .unwrap();
    let (mut got, _) = read(&mut stream, 1, 0).await;
    got.extend(quiet(&mut stream).await);
    assert_eq!(got.len(), 1, "{} messages outstanding", got.len());
    server.stop().await;
}

// ----- Subscriber.Acknowledge -----------------------------------------------

#[tokio::test]
async fn acknowledge_answers_each_ack_id_in_request_order() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["acked", "rejected"]).await;
    let got = c.pull_n("s", 2, WAIT).await;
    c.nack("s", vec![got[1].ack_id.clone()], Some("no")).await;
    let (a, r) = (got[0].ack_id.clone(), got[1].ack_id.clone());
    let sent = vec![a.clone(), "junk".to_string(), r];
    let results = c.ack("s", sent.clone()).await;
    use v1::AckStatus as A;
    let seen: Vec<(String, i32)> = results.into_iter().map(|r| (r.ack_id, r.status)).collect();
    let want: Vec<(String, i32)> = sent
        .into_iter()
        .zip([A::Ok, A::Unknown, A::AlreadySettled])
        .map(|(id, s)| (id, s as i32))
        .collect();
    assert_eq!(seen, want);
    // Acknowledged by an earlier call.
    assert_eq!(
        c.ack("s", vec![a]).await[0].status,
        A::AlreadySettled as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn an_ack_id_acknowledged_earlier_in_the_same_call_is_already_settled() {
    let (server, mut c) = start_with_t_and_s().await;
    c.publish("t", &["x"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    let id = got[0].ack_id.clone();
    let statuses: Vec<i32> = c
        .ack("s", vec![id.clone(), id])
        .await
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses,
        [
            v1::AckStatus::Ok as i32,
            v1::AckStatus::AlreadySettled as i32
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn acknowledge_modify_and_nack_take_1_to_1000_ack_ids() {
    let (server, c) = start_with_t_and_s().await;
    let mut s = c.subscriber.clone();
    let mut t = Table::default();
    for (what, n, want) in [
        ("no ack ids", 0, Want::Invalid("ack_ids")),
        ("1000 ack ids", 1000, Want::Ok),
        ("1001 ack ids", 1001, Want::Invalid("ack_ids")),
    ] {
        let ids = || vec!["x".to_string(); n];
        let r = s
            .acknowledge(v1::AcknowledgeRequest {
                subscription: "s".into(),
                ack_ids: ids(),
            })
            .await;
        t.row(&format!("Acknowledge, {what}"), r, want);
        let r = s
            .modify_ack_deadline(v1::ModifyAckDeadlineRequest {
                subscription: "s".into(),
                ack_ids: ids(),
                ack_deadline_ms: 1000,
            })
            .await;
        t.row(&format!("ModifyAckDeadline, {what}"), r, want);
        let r = s
            .nack(v1::NackRequest {
                subscription: "s".into(),
                ack_ids: ids(),
                ..Default::default()
            })
            .await;
        t.row(&format!("Nack, {what}"), r, want);
    }
    t.assert_all_hold();
    server.stop().await;
}

/// A subscription `s` of `t` (leases of 10 minutes) on a broker that keeps
/// its data directory across `restart`.
struct Restartable {
    tmp: tempfile::TempDir,
    server: TestServer,
}

impl Restartable {
    async fn start() -> (Restartable, Clients) {
        let tmp = tempfile::tempdir().unwrap();
        let server = TestServer::start_with(test_config(tmp.path())).await;
        let mut c = server.clients().await;
        c.create_topic("t").await;
        c.create_sub_with(v1::Subscription {
            ack_deadline_ms: 600_000,
            ..sub("s", "t")
        })
        .await;
        (Restartable { tmp, server }, c)
    }

    async fn restart(self) -> (Restartable, Clients) {
        self.server.stop().await;
        let server = TestServer::start_with(test_config(self.tmp.path())).await;
        let c = server.clients().await;
        (
            Restartable {
                tmp: self.tmp,
                server,
            },
            c,
        )
    }
}

#[tokio::test]
async fn an_ack_id_is_38_characters_and_is_still_recognized_after_a_restart() {
    let (broker, mut c) = Restartable::start().await;
    c.publish("t", &["x"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    assert_eq!(got[0].ack_id.len(), 38, "{:?}", got[0].ack_id);
    c.ack("s", ack_ids(&got)).await;
    let (broker, mut c) = broker.restart().await;
    // Recognized as this subscription's, not UNKNOWN like a forged one.
    let r = c.ack("s", ack_ids(&got)).await;
    assert_eq!(r[0].status, v1::AckStatus::AlreadySettled as i32);
    broker.server.stop().await;
}

#[tokio::test]
async fn an_in_flight_ack_id_still_counts_after_a_restart() {
    let (broker, mut c) = Restartable::start().await;
    c.publish("t", &["x"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    let (broker, mut c) = broker.restart().await;
    let r = c.ack("s", ack_ids(&got)).await;
    assert_eq!(r[0].status, v1::AckStatus::Ok as i32);
    broker.server.stop().await;
}

#[tokio::test]
async fn the_ack_id_of_a_nacked_delivery_counts_until_it_is_delivered_again() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        retry_policy: never_again(),
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["x"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    c.nack("s", ack_ids(&got), None).await;
    let r = c.ack("s", ack_ids(&got)).await;
    let state = state_in(&mut c, "s", "0").await.state;
    assert_eq!(
        (r[0].status, state),
        (v1::AckStatus::Ok as i32, v1::MessageState::Acked as i32)
    );
    server.stop().await;
}

/// Pulls the one message of a subscription whose leases last 100 ms and
/// whose retries wait minutes, and waits until its lease expired.
async fn an_expired_delivery() -> (TestServer, Clients, Vec<v1::ReceivedMessage>) {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 100,
        retry_policy: never_again(),
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["x"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    let probe = c.clone();
    eventually("the lease expires", || {
        let mut c = probe.clone();
        async move { state_in(&mut c, "s", "0").await.state == v1::MessageState::Pending as i32 }
    })
    .await;
    (server, c, got)
}

#[tokio::test]
async fn an_ack_after_the_lease_expired_still_counts_until_the_message_is_delivered_again() {
    let (server, mut c, got) = an_expired_delivery().await;
    let r = c.ack("s", ack_ids(&got)).await;
    assert_eq!(r[0].status, v1::AckStatus::Ok as i32);
    assert_eq!(
        state_in(&mut c, "s", "0").await.state,
        v1::MessageState::Acked as i32
    );
    server.stop().await;
}

// ----- Subscriber.ModifyAckDeadline -----------------------------------------

async fn modify(c: &mut Clients, ids: Vec<String>, ms: u64) -> Result<Vec<v1::AckResult>, Status> {
    c.subscriber
        .modify_ack_deadline(v1::ModifyAckDeadlineRequest {
            subscription: "s".into(),
            ack_ids: ids,
            ack_deadline_ms: ms,
        })
        .await
        .map(|r| r.into_inner().results)
}

#[tokio::test]
async fn modify_ack_deadline_takes_0_or_100_to_600000_and_answers_each_ack_id_in_order() {
    let (server, mut c) = start_with_t_and_s().await;
    let mut t = Table::default();
    for (ms, want) in [
        (99, Want::Invalid("ack_deadline_ms")),
        (600_001, Want::Invalid("ack_deadline_ms")),
        (100, Want::Ok),
        (600_000, Want::Ok),
        (0, Want::Ok),
    ] {
        let r = modify(&mut c, vec!["x".into()], ms).await;
        t.row(&format!("{ms} ms"), r, want);
    }
    t.assert_all_hold();
    c.publish("t", &["x"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    let results = modify(&mut c, vec!["junk".into(), got[0].ack_id.clone()], 60_000)
        .await
        .unwrap();
    let seen: Vec<(&str, i32)> = results
        .iter()
        .map(|r| (r.ack_id.as_str(), r.status))
        .collect();
    assert_eq!(
        seen,
        [
            ("junk", v1::AckStatus::Unknown as i32),
            (got[0].ack_id.as_str(), v1::AckStatus::Ok as i32)
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn modify_ack_deadline_extends_a_lease_under_the_same_ack_id() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 200,
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["x"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    modify(&mut c, ack_ids(&got), 60_000).await.unwrap();
    // Well past the original 200 ms: not delivered again.
    assert!(c.pull("s", 1, 600).await.is_empty());
    let state = state_in(&mut c, "s", "0").await;
    assert_eq!(state.delivery_attempt, 1);
    assert!(secs_until(&state.lease_deadline) > 30.0);
    assert_eq!(
        c.ack("s", ack_ids(&got)).await[0].status,
        v1::AckStatus::Ok as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn modify_ack_deadline_shortens_a_lease() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 600_000,
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["x"]).await;
    let got = c.pull_n("s", 1, WAIT).await;
    modify(&mut c, ack_ids(&got), 100).await.unwrap();
    let again = c.pull_n("s", 1, WAIT).await;
    assert_eq!(again[0].delivery_attempt, 2);
    server.stop().await;
}

#[tokio::test]
async fn modify_ack_deadline_zero_is_a_nack() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 600_000,
        dead_letter_policy: dead_letter(2, ""),
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["x"]).await;
    let first = c.pull_n("s", 1, WAIT).await;
    modify(&mut c, ack_ids(&first), 0).await.unwrap();
    let second = c.pull_n("s", 1, WAIT).await;
    assert_eq!(second[0].delivery_attempt, 2);
    modify(&mut c, ack_ids(&second), 0).await.unwrap();
    let dls = c.dead_letters("s").await;
    assert_eq!(dls.len(), 1);
    assert_eq!(
        dls[0].reason_text,
        "2 delivery attempts failed; the last one was nacked"
    );
    server.stop().await;
}

// ----- Subscriber.Nack ------------------------------------------------------

#[tokio::test]
async fn a_nack_reason_may_be_1024_bytes_and_is_kept_with_or_without_reject() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        dead_letter_policy: dead_letter(1, ""),
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["retried", "rejected"]).await;
    let got = c.pull_n("s", 2, WAIT).await;
    let long = "r".repeat(1024);
    for (m, reject) in [(&got[0], false), (&got[1], true)] {
        c.subscriber
            .nack(v1::NackRequest {
                subscription: "s".into(),
                ack_ids: vec![m.ack_id.clone()],
                reject,
                reason: long.clone(),
            })
            .await
            .unwrap();
    }
    let mut dls = c.dead_letters("s").await;
    dls.sort_by_key(|d| d.offset);
    let texts: Vec<(&str, String, &str)> = dls
        .iter()
        .map(|d| {
            (
                std::str::from_utf8(&d.message.as_ref().unwrap().data).unwrap(),
                d.reason_text.clone(),
                d.last_nack_reason.as_str(),
            )
        })
        .collect();
    // Without reject the reason is the message's last nack reason, and
    // its attempts-exhausted text carries it; with reject it is the text.
    assert_eq!(
        texts,
        [
            (
                "retried",
                format!("1 delivery attempt failed; the last one was nacked: {long}"),
                long.as_str()
            ),
            ("rejected", long.clone(), "")
        ]
    );
    server.stop().await;
}

// ----- retention and forwarding (common.proto) ------------------------------

#[tokio::test]
async fn a_dead_letter_outlives_retention_of_its_original_and_a_dropped_lease_is_settled() {
    let (server, mut c) = start_with(|config| config.housekeeping_ms = 100).await;
    c.admin
        .create_topic(v1::CreateTopicRequest {
            name: "t".into(),
            retention: Some(v1::RetentionPolicy {
                max_age_ms: None,
                max_bytes: Some(64 * 1024),
                mode: v1::RetentionMode::DropOldest as i32,
            }),
        })
        .await
        .unwrap();
    c.create_sub_with(v1::Subscription {
        ack_deadline_ms: 600_000,
        ..sub("s", "t")
    })
    .await;
    c.publish("t", &["doomed", "held"]).await;
    let got = c.pull_n("s", 2, WAIT).await;
    c.nack("s", vec![got[0].ack_id.clone()], Some("bad")).await;
    for _ in 0..3 {
        publish(&mut c, "t", vec![data(&[0; 1000]); 100])
            .await
            .unwrap();
    }
    let probe = c.clone();
    eventually("retention removes the first segment", || {
        let mut c = probe.clone();
        async move { topic_stats(&mut c, "t").await.first_offset >= 2 }
    })
    .await;
    let dls = c.dead_letters("s").await;
    assert_eq!(dls.len(), 1);
    assert_eq!(&dls[0].message.as_ref().unwrap().data[..], b"doomed");
    let r = c.ack("s", vec![got[1].ack_id.clone()]).await;
    assert_eq!(r[0].status, v1::AckStatus::AlreadySettled as i32);
    assert!(c.stats("s").await.dropped_by_retention >= 1);
    server.stop().await;
}

#[tokio::test]
async fn forwarded_dead_letters_keep_data_attributes_and_ordering_key_under_a_new_id() {
    let (server, mut c) = start().await;
    c.create_topic("t").await;
    c.create_topic("graveyard").await;
    publish_n(&mut c, "graveyard", 5).await;
    c.create_sub("watch", "graveyard").await;
    c.create_sub_with(v1::Subscription {
        dead_letter_policy: dead_letter(3, "graveyard"),
        ..sub("s", "t")
    })
    .await;
    let original = v1::PublishMessage {
        data: b"doomed".to_vec().into(),
        attributes: attrs(&[("k", "v")]),
        ordering_key: "key".into(),
    };
    publish(&mut c, "t", vec![original]).await.unwrap();
    reject_n(&mut c, "s", 1).await;
    let forwarded = c.pull_n("watch", 1, WAIT).await;
    let m = forwarded[0].message.as_ref().unwrap();
    assert_eq!(m.message_id, "5");
    assert_eq!(&m.data[..], b"doomed");
    assert_eq!(m.attributes, attrs(&[("k", "v")]));
    assert_eq!(m.ordering_key, "key");
    assert_eq!(c.dead_letters("s").await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn max_age_removes_old_messages_whole_segments_at_a_time() {
    let (server, mut c) = start_with(|config| config.housekeeping_ms = 100).await;
    c.admin
        .create_topic(v1::CreateTopicRequest {
            name: "t".into(),
            retention: Some(v1::RetentionPolicy {
                max_age_ms: Some(200),
                max_bytes: None,
                mode: v1::RetentionMode::DropOldest as i32,
            }),
        })
        .await
        .unwrap();
    c.create_sub("lagging", "t").await;
    // 100 KB in batches: the 64 KiB segments roll, so a sealed one can go.
    for _ in 0..10 {
        publish(&mut c, "t", vec![data(&[0; 1000]); 10])
            .await
            .unwrap();
    }
    let probe = c.clone();
    eventually("messages older than max_age_ms are removed", || {
        let mut c = probe.clone();
        async move { topic_stats(&mut c, "t").await.first_offset > 0 }
    })
    .await;
    let s = topic_stats(&mut c, "t").await;
    // The active segment stays, however old its messages.
    assert!(s.first_offset < 100 && s.segments >= 1, "{s:?}");
    assert_eq!(
        c.stats("lagging").await.dropped_by_retention,
        s.first_offset
    );
    server.stop().await;
}

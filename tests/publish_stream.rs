//! `Publisher.PublishStream` and the batching `courier::client::Publisher`
//! against a real broker: ids in stream order, per-request errors that do
//! not end the stream, many requests outstanding, the ends (half-close,
//! shutdown), and a broker killed mid-stream (every answered message is
//! kept; the rest are reported as unknown or not published).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Clients, TestServer, spawn_broker, text};
use courier::api::pb::v1::{PublishMessage, PublishStreamRequest, PublishStreamResponse};
use courier::client::{Client, Publisher, PublisherSettings};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Streaming};

fn msg(text: &str) -> PublishMessage {
    PublishMessage {
        data: text.to_string().into(),
        ..PublishMessage::default()
    }
}

fn request(id: u64, topic: &str, texts: &[String]) -> PublishStreamRequest {
    PublishStreamRequest {
        topic: topic.into(),
        messages: texts.iter().map(|t| msg(t)).collect(),
        request_id: id,
    }
}

async fn open(
    clients: &mut Clients,
) -> (
    mpsc::UnboundedSender<PublishStreamRequest>,
    Streaming<PublishStreamResponse>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let responses = clients
        .publisher
        .publish_stream(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

/// Pulls (and acks) everything `sub` holds until a pull comes back empty,
/// as (id, text) sorted by id.
async fn drain(clients: &mut Clients, sub: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    loop {
        let got = clients.pull(sub, 1000, 300).await;
        if got.is_empty() {
            break;
        }
        for m in &got {
            let id = m.message.as_ref().unwrap().message_id.parse().unwrap();
            out.push((id, text(m)));
        }
        clients.ack(sub, common::ack_ids(&got)).await;
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_appended_and_answered_in_stream_order() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    for t in ["a", "b"] {
        c.create_topic(t).await;
        c.create_sub(&format!("{t}-sub"), t).await;
    }
    let (tx, mut responses) = open(&mut c).await;
    // 300 requests of 1 to 5 messages, alternating topics, all sent before
    // any answer is read.
    let mut expected: HashMap<&str, Vec<String>> = HashMap::new();
    for r in 0..300u64 {
        let topic = if r % 3 == 0 { "b" } else { "a" };
        let texts: Vec<String> = (0..=(r % 5)).map(|m| format!("{topic}-{r}-{m}")).collect();
        expected.entry(topic).or_default().extend(texts.clone());
        tx.send(request(r + 1, topic, &texts)).unwrap();
    }
    drop(tx); // half-close: the broker answers all, then ends with OK
    let mut ids: HashMap<&str, Vec<u64>> = HashMap::new();
    for r in 0..300u64 {
        let resp = responses
            .message()
            .await
            .unwrap()
            .expect("an answer per request");
        assert_eq!(resp.request_id, r + 1, "answers come in request order");
        assert_eq!(resp.code, 0, "{}", resp.message);
        assert_eq!(resp.message_ids.len() as u64, r % 5 + 1);
        let topic = if r % 3 == 0 { "b" } else { "a" };
        ids.entry(topic)
            .or_default()
            .extend(resp.message_ids.iter().map(|i| i.parse::<u64>().unwrap()));
    }
    assert!(
        responses.message().await.unwrap().is_none(),
        "then the stream ends with OK"
    );
    for topic in ["a", "b"] {
        let want = &expected[topic];
        // Ids are dense and follow the stream's order.
        let got_ids = &ids[topic];
        assert_eq!(*got_ids, (0..want.len() as u64).collect::<Vec<_>>());
        let stored = drain(&mut c, &format!("{topic}-sub")).await;
        let texts: Vec<String> = stored.into_iter().map(|(_, t)| t).collect();
        assert_eq!(&texts, want, "topic {topic} holds the stream's order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_is_answered_with_its_status_and_the_stream_goes_on() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let (tx, mut responses) = open(&mut c).await;
    let ok = |id| request(id, "t", &[format!("ok-{id}")]);
    let mut bad_attr = request(3, "t", &["x".to_string()]);
    bad_attr.messages[0]
        .attributes
        .insert(String::new(), "v".into());
    let sent = vec![
        ok(1),
        request(2, "missing", &["x".to_string()]),
        bad_attr,
        request(4, "bad name!", &["x".to_string()]),
        PublishStreamRequest {
            topic: "t".into(),
            messages: Vec::new(),
            request_id: 5,
        },
        ok(6),
    ];
    for r in sent {
        tx.send(r).unwrap();
    }
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(responses.message().await.unwrap().unwrap());
    }
    let codes: Vec<(u64, i32)> = answers.iter().map(|a| (a.request_id, a.code)).collect();
    assert_eq!(
        codes,
        vec![
            (1, 0),
            (2, Code::NotFound as i32),
            (3, Code::InvalidArgument as i32),
            (4, Code::InvalidArgument as i32),
            (5, Code::InvalidArgument as i32),
            (6, 0),
        ]
    );
    assert!(
        answers[1].message.contains("missing"),
        "{}",
        answers[1].message
    );
    assert!(
        answers[2]
            .message
            .starts_with("invalid messages[0].attributes:"),
        "{}",
        answers[2].message
    );
    assert!(
        answers[3].message.starts_with("invalid topic:"),
        "{}",
        answers[3].message
    );
    assert!(
        answers[4].message.starts_with("invalid messages:"),
        "{}",
        answers[4].message
    );
    for failed in &answers[1..5] {
        assert!(failed.message_ids.is_empty());
    }
    assert_eq!(answers[0].message_ids, vec!["0".to_string()]);
    assert_eq!(
        answers[5].message_ids,
        vec!["1".to_string()],
        "nothing of a failed request was stored"
    );
    drop(tx);
    assert!(responses.message().await.unwrap().is_none());
    let stored = drain(&mut c, "s").await;
    assert_eq!(
        stored,
        vec![(0, "ok-1".to_string()), (1, "ok-6".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_far_ahead_of_its_answers_loses_nothing() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    // Three times the broker's window of unanswered requests, sent before
    // any answer is read: the broker stops reading at its window and the
    // rest wait in flow control, to be read as answers go out.
    let n = 3 * courier::api::publisher::PUBLISH_STREAM_REQUESTS_MAX as u64;
    let (tx, mut responses) = open(&mut c).await;
    for r in 0..n {
        tx.send(request(r, "t", &[format!("m{r}")])).unwrap();
    }
    drop(tx);
    for r in 0..n {
        let resp = responses.message().await.unwrap().unwrap();
        assert_eq!((resp.request_id, resp.code), (r, 0));
        assert_eq!(resp.message_ids, vec![r.to_string()]);
    }
    assert!(responses.message().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_the_stream_answers_what_it_read_then_ends_unavailable() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let (tx, mut responses) = open(&mut c).await;
    for r in 0..50 {
        tx.send(request(r, "t", &[format!("m{r}")])).unwrap();
    }
    let first = responses.message().await.unwrap().unwrap();
    assert_eq!(first.code, 0);
    let dir = server.dir.clone();
    let stopping = tokio::spawn(server.stop());
    let mut answered = vec![first];
    let end = loop {
        match responses.message().await {
            Ok(Some(resp)) => answered.push(resp),
            Ok(None) => panic!("a shutdown ends the stream with UNAVAILABLE, not OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    for (i, resp) in answered.iter().enumerate() {
        assert_eq!(resp.request_id, i as u64, "in order up to the end");
    }
    drop(tx);
    let (tmp, _) = stopping.await.unwrap();
    // Every request answered OK is there after a restart.
    let server = TestServer::start_with(common::test_config(&dir)).await;
    let mut c = server.clients().await;
    let ok: Vec<(u64, String)> = answered
        .iter()
        .filter(|r| r.code == 0)
        .map(|r| {
            (
                r.message_ids[0].parse().unwrap(),
                format!("m{}", r.request_id),
            )
        })
        .collect();
    let stored = drain(&mut c, "s").await;
    for kept in &ok {
        assert!(
            stored.contains(kept),
            "{kept:?} was answered OK but is gone"
        );
    }
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_batches_single_messages_and_keeps_each_publishers_order() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    for t in ["x", "y"] {
        c.create_topic(t).await;
        c.create_sub(&format!("{t}-sub"), t).await;
    }
    let client = Client::connect(&server.url()).await.unwrap();
    let publisher = Publisher::new(&client, PublisherSettings::default());
    // 40 application tasks, each publishing 50 messages one at a time.
    let mut tasks = Vec::new();
    for task in 0..40 {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            let topic = if task % 2 == 0 { "x" } else { "y" };
            let mut ids = Vec::new();
            for m in 0..50 {
                let id = publisher
                    .publish(topic, msg(&format!("{task}-{m}")))
                    .await
                    .unwrap();
                ids.push(id.parse::<u64>().unwrap());
            }
            (topic, ids)
        }));
    }
    let mut by_topic: HashMap<&str, Vec<u64>> = HashMap::new();
    for t in tasks {
        let (topic, ids) = t.await.unwrap();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "one task's messages keep its order"
        );
        by_topic.entry(topic).or_default().extend(ids);
    }
    for (topic, mut ids) in by_topic {
        ids.sort();
        assert_eq!(
            ids,
            (0..1000).collect::<Vec<_>>(),
            "{topic}: 1000 distinct dense ids"
        );
        let stored = drain(&mut c, &format!("{topic}-sub")).await;
        assert_eq!(stored.len(), 1000);
    }
    // A message to a missing topic fails alone, with the broker's status.
    let (missing, fine) = tokio::join!(
        publisher.publish("nope", msg("lost")),
        publisher.publish("x", msg("kept"))
    );
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    assert_eq!(fine.unwrap(), "1000");
    publisher.flush().await;
}

/// kill -9 of the broker while a Publisher has many messages in flight:
/// each `publish` either returned an id (and the message is there after a
/// restart, with that id) or an error that says the outcome is unknown or
/// that it was not published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_by_a_crash_keeps_every_answered_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut broker = spawn_broker(&dir);
    let mut c = Clients::connect(&broker.url).await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let client = Client::connect(&broker.url).await.unwrap();
    let publisher = Publisher::new(&client, PublisherSettings::default());
    let answered_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..20 {
        let publisher = publisher.clone();
        let counter = answered_so_far.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for m in 0.. {
                let text = format!("{task}-{m}");
                match publisher.publish("t", msg(&text)).await {
                    Ok(id) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        outcomes.push((text, Ok(id)));
                    }
                    Err(status) => {
                        outcomes.push((text, Err(status)));
                        break;
                    }
                }
            }
            outcomes
        }));
    }
    // Kill it mid-stream, once a good number of messages were answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answered_so_far.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing is stuck"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    let mut answered = Vec::new();
    for t in tasks {
        let outcomes = t.await.unwrap();
        let (_, last) = outcomes.last().unwrap();
        let status = last.as_ref().expect_err("publishing ends with the crash");
        assert!(
            matches!(status.code(), Code::Unknown | Code::Unavailable),
            "{status:?}"
        );
        for (text, outcome) in outcomes {
            if let Ok(id) = outcome {
                answered.push((id.parse::<u64>().unwrap(), text));
            }
        }
    }
    assert!(answered.len() >= 200, "{} answered", answered.len());
    let broker = spawn_broker(&dir);
    let mut c = Clients::connect(&broker.url).await;
    let stored: HashMap<u64, String> = drain(&mut c, "s").await.into_iter().collect();
    for (id, text) in &answered {
        assert_eq!(
            stored.get(id),
            Some(text),
            "message {id} was answered but is not kept"
        );
    }
}

#[test]
fn the_publisher_refuses_settings_it_cannot_honour() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::from_channel(
            tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
        );
        let bad = PublisherSettings {
            batch_messages_max: 1001,
            ..PublisherSettings::default()
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Publisher::new(&client, bad)
        }));
        assert!(
            result.is_err(),
            "more than 1000 messages per batch is refused"
        );
    });
}

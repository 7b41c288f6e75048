//! StreamingPull end to end: flow control, sharing a subscription between
//! streams, and prompt redelivery when a stream ends.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Clients, TestServer};
use courier::api::pb::v1;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

async fn open_stream(
    c: &mut Clients,
    sub: &str,
    max_outstanding: u64,
) -> (
    mpsc::Sender<v1::StreamingPullRequest>,
    tonic::Streaming<v1::StreamingPullResponse>,
) {
    let (tx, rx) = mpsc::channel(64);
    tx.send(v1::StreamingPullRequest {
        subscription: sub.into(),
        max_outstanding_messages: Some(max_outstanding),
        stream_ack_deadline_ms: Some(10_000),
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = c
        .subscriber
        .streaming_pull(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

#[tokio::test]
async fn two_streams_split_the_work_and_never_exceed_their_limits() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    const TOTAL: usize = 400;
    const LIMIT: u64 = 7;
    let payloads: Vec<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    for chunk in refs.chunks(100) {
        c.publish("t", chunk).await;
    }
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (tx, mut stream) = open_stream(&mut c, "s", LIMIT).await;
        let seen = seen.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut outstanding: HashSet<String> = HashSet::new();
            let mut max_seen = 0usize;
            let mut got = 0usize;
            while done.load(Ordering::SeqCst) < TOTAL {
                let resp =
                    match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
                        Ok(Some(Ok(resp))) => resp,
                        Ok(_) => break,
                        Err(_) => continue,
                    };
                // Count a message done once the broker confirms its ack, so
                // no stream closes while its acks are still in flight.
                let confirmed = resp
                    .ack_results
                    .iter()
                    .filter(|r| r.status == v1::AckStatus::Ok as i32)
                    .count();
                got += confirmed;
                done.fetch_add(confirmed, Ordering::SeqCst);
                for m in &resp.received_messages {
                    outstanding.insert(m.ack_id.clone());
                    seen.lock().push(
                        String::from_utf8(m.message.as_ref().unwrap().data.to_vec()).unwrap(),
                    );
                }
                max_seen = max_seen.max(outstanding.len());
                if !resp.received_messages.is_empty() {
                    // Ack in small steps so both streams get a share.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let ids: Vec<String> = outstanding.drain().collect();
                    tx.send(v1::StreamingPullRequest {
                        ack_ids: ids,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
            }
            drop(tx);
            (got, max_seen)
        }));
    }
    let mut shares = Vec::new();
    for t in tasks {
        let (got, max_seen) = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
        assert!(
            max_seen as u64 <= LIMIT,
            "a stream held {max_seen} messages, over its limit {LIMIT}"
        );
        shares.push(got);
    }
    let seen = seen.lock().clone();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), TOTAL, "every message delivered");
    assert_eq!(seen.len(), TOTAL, "no message delivered twice");
    assert!(
        shares.iter().all(|n| *n > 0),
        "both streams got work: {shares:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_dropped_stream_releases_its_messages_for_prompt_redelivery() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await; // ack deadline 30 s: only release can bring them back fast
    c.publish("t", &["a", "b", "c"]).await;
    let (tx, mut stream) = open_stream(&mut c, "s", 10).await;
    let mut got = 0;
    while got < 3 {
        let resp = stream.next().await.unwrap().unwrap();
        got += resp.received_messages.len();
    }
    drop(tx);
    drop(stream);
    let again = c.pull_n("s", 3, Duration::from_secs(5)).await;
    assert_eq!(again.len(), 3);
    assert!(again.iter().all(|m| m.delivery_attempt == 2));
    server.stop().await;
}

#[tokio::test]
async fn stream_reports_unknown_acks_without_ending() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let (tx, mut stream) = open_stream(&mut c, "s", 10).await;
    tx.send(v1::StreamingPullRequest {
        ack_ids: vec!["nonsense".into(), "5-1".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let resp = stream.next().await.unwrap().unwrap();
    let statuses: Vec<i32> = resp.ack_results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![v1::AckStatus::Unknown as i32; 2]);
    // The stream still delivers.
    c.publish("t", &["x"]).await;
    let resp = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.received_messages.len(), 1);
    let ack = resp.received_messages[0].ack_id.clone();
    tx.send(v1::StreamingPullRequest {
        ack_ids: vec![ack],
        ..Default::default()
    })
    .await
    .unwrap();
    let resp = stream.next().await.unwrap().unwrap();
    assert_eq!(resp.ack_results[0].status, v1::AckStatus::Ok as i32);
    server.stop().await;
}

#[tokio::test]
async fn a_deleted_subscription_ends_its_streams_with_not_found() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let (_tx, mut stream) = open_stream(&mut c, "s", 10).await;
    c.admin
        .delete_subscription(v1::DeleteSubscriptionRequest { name: "s".into() })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    match end {
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::NotFound),
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_stream_gets_its_window_in_two_halves() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let payloads: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    c.publish("t", &refs).await;
    let (_tx, mut stream) = open_stream(&mut c, "s", 10).await;
    let mut sizes = Vec::new();
    let mut got = Vec::new();
    while got.len() < 10 {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the window was not filled")
            .unwrap()
            .unwrap();
        if !resp.received_messages.is_empty() {
            sizes.push(resp.received_messages.len());
            got.extend(resp.received_messages.iter().map(common::text));
        }
    }
    assert_eq!(
        got, payloads,
        "the whole window arrives without acks, in order"
    );
    assert!(
        sizes.iter().all(|&n| n <= 5),
        "a response carried more than half the window: {sizes:?}"
    );
}

#[tokio::test]
async fn responses_carry_at_most_4_mib_of_payload_but_always_one_message() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub("pull", "t").await;
    c.create_sub("stream", "t").await;
    // Three 3 MiB messages, then two small ones.
    let big = "x".repeat(3 << 20);
    let payloads = [big.as_str(), big.as_str(), big.as_str(), "a", "b"];
    c.publish("t", &payloads).await;

    let mut pulled = Vec::new();
    while pulled.len() < payloads.len() {
        let msgs = c.pull("pull", 100, 5_000).await;
        assert!(!msgs.is_empty(), "pull returned nothing");
        let bytes: usize = msgs
            .iter()
            .map(|m| m.message.as_ref().unwrap().data.len())
            .sum();
        assert!(
            msgs.len() == 1 || bytes <= 4 << 20,
            "pull response of {bytes} bytes"
        );
        pulled.extend(msgs.iter().map(|m| m.message.as_ref().unwrap().data.len()));
        c.ack("pull", common::ack_ids(&msgs)).await;
    }
    assert_eq!(pulled, vec![3 << 20, 3 << 20, 3 << 20, 1, 1]);

    let (_tx, mut stream) = open_stream(&mut c, "stream", 100).await;
    let mut streamed = Vec::new();
    while streamed.len() < payloads.len() {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("nothing streamed")
            .unwrap()
            .unwrap();
        let sizes: Vec<usize> = resp
            .received_messages
            .iter()
            .map(|m| m.message.as_ref().unwrap().data.len())
            .collect();
        let bytes: usize = sizes.iter().sum();
        assert!(
            sizes.len() <= 1 || bytes <= 4 << 20,
            "stream response of {sizes:?}"
        );
        streamed.extend(sizes);
    }
    assert_eq!(streamed, vec![3 << 20, 3 << 20, 3 << 20, 1, 1]);
}

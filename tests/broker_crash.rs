//! kill -9 of a real broker process in the middle of publishing and
//! acking: after a restart every publish that returned OK is there, every
//! ack that returned OK holds, dead letters are kept, and attempt numbers
//! only grow.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Clients, ack_ids, spawn_broker, text};
use courier::api::pb::v1;
use parking_lot::Mutex;

#[derive(Default)]
struct Observed {
    /// Payloads whose Publish returned OK.
    published: BTreeSet<String>,
    /// Payloads acked on "work" with an OK result.
    acked: BTreeSet<String>,
    /// Payloads rejected on "work" with an OK result.
    rejected: BTreeSet<String>,
    /// Highest attempt seen per payload on "work".
    attempts: BTreeMap<String, u32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_publish_or_ack() {
    for round in 0..2u64 {
        let tmp = tempfile::tempdir().unwrap();
        let mut broker = spawn_broker(tmp.path());
        let mut c = Clients::connect(&broker.url).await;
        c.create_topic("t").await;
        c.create_sub("audit", "t").await;
        c.create_sub_with(v1::Subscription {
            name: "work".into(),
            topic: "t".into(),
            ack_deadline_ms: 60_000,
            ..Default::default()
        })
        .await;
        let seen = Arc::new(Mutex::new(Observed::default()));

        let mut tasks = Vec::new();
        for p in 0..4 {
            let mut c = c.clone();
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let payloads: Vec<String> = (0..10).map(|j| format!("p{p}-{i}-{j}")).collect();
                    let messages = payloads
                        .iter()
                        .map(|s| v1::PublishMessage {
                            data: s.clone().into(),
                            ..Default::default()
                        })
                        .collect();
                    match c
                        .publisher
                        .publish(v1::PublishRequest {
                            topic: "t".into(),
                            messages,
                        })
                        .await
                    {
                        Ok(_) => seen.lock().published.extend(payloads),
                        Err(_) => return,
                    }
                }
            }));
        }
        {
            let mut c = c.clone();
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok(resp) = c
                        .subscriber
                        .pull(v1::PullRequest {
                            subscription: "work".into(),
                            max_messages: 50,
                            wait_ms: 100,
                        })
                        .await
                    else {
                        return;
                    };
                    let msgs = resp.into_inner().received_messages;
                    for m in &msgs {
                        seen.lock().attempts.insert(text(m), m.delivery_attempt);
                    }
                    let (reject, ack): (Vec<_>, Vec<_>) =
                        msgs.into_iter().partition(|m| text(m).ends_with("-7"));
                    if !ack.is_empty() {
                        let Ok(r) = c
                            .subscriber
                            .acknowledge(v1::AcknowledgeRequest {
                                subscription: "work".into(),
                                ack_ids: ack_ids(&ack),
                            })
                            .await
                        else {
                            return;
                        };
                        for (m, r) in ack.iter().zip(r.into_inner().results) {
                            if r.status == v1::AckStatus::Ok as i32 {
                                seen.lock().acked.insert(text(m));
                            }
                        }
                    }
                    if !reject.is_empty() {
                        let Ok(r) = c
                            .subscriber
                            .nack(v1::NackRequest {
                                subscription: "work".into(),
                                ack_ids: ack_ids(&reject),
                                reject: true,
                                reason: "sevens".into(),
                            })
                            .await
                        else {
                            return;
                        };
                        for (m, r) in reject.iter().zip(r.into_inner().results) {
                            if r.status == v1::AckStatus::Ok as i32 {
                                seen.lock().rejected.insert(text(m));
                            }
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(400 + 300 * round)).await;
        broker.child.kill().unwrap(); // SIGKILL
        broker.child.wait().unwrap();
        for t in tasks {
            let _ = t.await;
        }
        let seen = std::mem::take(&mut *seen.lock());
        assert!(
            seen.published.len() > 50,
            "too little traffic to test: {}",
            seen.published.len()
        );

        let mut broker = spawn_broker(tmp.path());
        let mut c = Clients::connect(&broker.url).await;
        // Every acknowledged publish is there (audit never acked anything).
        let mut audit = BTreeSet::new();
        loop {
            let got = c.pull("audit", 1000, 300).await;
            if got.is_empty() {
                break;
            }
            audit.extend(got.iter().map(text));
        }
        let missing: Vec<&String> = seen.published.difference(&audit).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged publishes lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        // Nothing that was not published appears (payloads are well-formed).
        assert!(audit.iter().all(|p| p.starts_with('p')));
        // Acked messages are never redelivered; others come back with a
        // higher attempt number.
        let mut redelivered = Vec::new();
        loop {
            let got = c.pull("work", 1000, 300).await;
            if got.is_empty() {
                break;
            }
            c.ack("work", ack_ids(&got)).await;
            redelivered.extend(got.iter().map(|m| (text(m), m.delivery_attempt)));
        }
        for (payload, attempt) in &redelivered {
            assert!(
                !seen.acked.contains(payload),
                "round {round}: acked message {payload} was redelivered"
            );
            assert!(
                !seen.rejected.contains(payload),
                "round {round}: rejected message {payload} was redelivered"
            );
            if let Some(before) = seen.attempts.get(payload) {
                assert!(
                    attempt > before,
                    "round {round}: {payload} attempt {attempt} after {before}"
                );
            }
        }
        // Every rejected-OK message is in the dead-letter queue exactly once.
        let dls = c.dead_letters("work").await;
        let dl_payloads: Vec<String> = dls
            .iter()
            .map(|d| String::from_utf8(d.message.as_ref().unwrap().data.to_vec()).unwrap())
            .collect();
        let unique: BTreeSet<&String> = dl_payloads.iter().collect();
        assert_eq!(
            unique.len(),
            dl_payloads.len(),
            "round {round}: a message was dead-lettered twice"
        );
        for r in &seen.rejected {
            assert!(
                unique.contains(r),
                "round {round}: rejected {r} missing from the dead-letter queue"
            );
        }
        broker.child.kill().unwrap();
        broker.child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_and_a_second_broker_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = spawn_broker(tmp.path());
    let mut c = Clients::connect(&broker.url).await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    c.publish("t", &["kept"]).await;

    // A second broker on the same data directory is refused, with one line.
    let second = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("locked"), "{stderr}");

    // SAFETY: kill(2) with a valid pid of our own child.
    let rc = unsafe { libc::kill(broker.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = broker.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");

    let mut broker = spawn_broker(tmp.path());
    let mut c = Clients::connect(&broker.url).await;
    let got = c.pull_n("s", 1, Duration::from_secs(3)).await;
    assert_eq!(text(&got[0]), "kept");
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
}

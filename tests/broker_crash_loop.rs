//! A crash loop with a checker: one data directory, a real `courier serve`
//! child killed with SIGKILL at a random moment of concurrent publish,
//! pull, ack, nack, reject and expiry traffic, again and again. Every
//! publish outcome, delivery and ack result is recorded, and the checker
//! reports what went wrong: messages lost, unexpected (never published),
//! corrupt, duplicated, acked-then-redelivered, attempt numbers going
//! backwards or past the limit, rejected messages missing from the
//! dead-letter queue.
//!
//! CI runs `COURIER_CRASH_CYCLES` cycles (default 3). The long run and its
//! latest figures are in docs/reliability.md:
//! `COURIER_CRASH_CYCLES=100 cargo test --release --test broker_crash_loop -- --nocapture`

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Clients, ack_ids, spawn_broker, text};
use courier::api::pb::v1;
use parking_lot::Mutex;

/// The attempt limit of the "work" subscription.
const ATTEMPTS_MAX: u32 = 3;

/// A payload carries its own checksum, so corruption is detectable.
fn payload(publisher: u64, cycle: u64, i: u64, j: u64) -> String {
    let body = format!("p{publisher}.c{cycle}.{i}.{j}");
    format!("{body}#{:08x}", crc32fast::hash(body.as_bytes()))
}

fn well_formed(p: &str) -> bool {
    match p.rsplit_once('#') {
        Some((body, crc)) => format!("{:08x}", crc32fast::hash(body.as_bytes())) == crc,
        None => false,
    }
}

/// Everything the clients saw, across all cycles.
#[derive(Default)]
struct Record {
    /// Publish returned OK.
    published: BTreeSet<String>,
    /// Sent, and Publish has not returned OK (still in flight, or it
    /// returned an error because the broker died): may or may not exist.
    uncertain: BTreeSet<String>,
    /// Ack on "work" returned OK.
    acked: BTreeSet<String>,
    /// Reject on "work" returned OK.
    rejected: BTreeSet<String>,
    /// Highest attempt seen per payload on "work".
    attempts: BTreeMap<String, u32>,
    deliveries: u64,
}

#[derive(Default, Debug)]
struct Findings {
    lost: Vec<String>,
    unexpected: Vec<String>,
    corrupt: Vec<String>,
    duplicated: Vec<String>,
    acked_then_redelivered: Vec<String>,
    attempts_backwards: Vec<String>,
    attempts_over_limit: Vec<String>,
    /// Dead letters written more than once. Not a failure: dead-lettering
    /// is at-least-once across a crash (docs/durability.md), as a kill
    /// between the dead-letter append and the journal record repeats it.
    /// Reported, and bounded by one extra copy per kill.
    dead_letter_duplicates: Vec<String>,
    rejected_missing_from_dlq: Vec<String>,
}

impl Findings {
    fn total(&self) -> usize {
        self.lost.len()
            + self.unexpected.len()
            + self.corrupt.len()
            + self.duplicated.len()
            + self.acked_then_redelivered.len()
            + self.attempts_backwards.len()
            + self.attempts_over_limit.len()
            + self.rejected_missing_from_dlq.len()
    }
}

impl Record {
    /// Checks one delivery on "work" against everything seen before.
    fn delivered(&mut self, m: &v1::ReceivedMessage, f: &mut Findings) {
        let p = text(m);
        self.deliveries += 1;
        if !well_formed(&p) {
            f.corrupt.push(p);
            return;
        }
        if !self.published.contains(&p) && !self.uncertain.contains(&p) {
            f.unexpected.push(p.clone());
        }
        if self.acked.contains(&p) || self.rejected.contains(&p) {
            f.acked_then_redelivered.push(p.clone());
        }
        if m.delivery_attempt > ATTEMPTS_MAX {
            f.attempts_over_limit
                .push(format!("{p} attempt {}", m.delivery_attempt));
        }
        if let Some(before) = self.attempts.get(&p) {
            if m.delivery_attempt <= *before {
                f.attempts_backwards
                    .push(format!("{p} attempt {} after {before}", m.delivery_attempt));
            }
        }
        self.attempts.insert(p, m.delivery_attempt);
    }
}

async fn create_all(c: &mut Clients) {
    c.create_topic("t").await;
    c.create_sub("audit", "t").await;
    c.create_sub_with(v1::Subscription {
        name: "work".into(),
        topic: "t".into(),
        ack_deadline_ms: 300,
        dead_letter_policy: Some(v1::DeadLetterPolicy {
            max_delivery_attempts: ATTEMPTS_MAX,
            forward_topic: String::new(),
        }),
        ..Default::default()
    })
    .await;
}

/// One cycle's traffic until the broker dies.
async fn traffic(
    c: Clients,
    cycle: u64,
    record: Arc<Mutex<Record>>,
    findings: Arc<Mutex<Findings>>,
) {
    let mut tasks = Vec::new();
    for p in 0..3u64 {
        let mut c = c.clone();
        let record = record.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let payloads: Vec<String> = (0..8).map(|j| payload(p, cycle, i, j)).collect();
                // Recorded before the call: a subscriber may see the
                // message before this task sees the reply.
                record.lock().uncertain.extend(payloads.iter().cloned());
                let messages = payloads
                    .iter()
                    .map(|s| v1::PublishMessage {
                        data: s.clone().into(),
                        ..Default::default()
                    })
                    .collect();
                let r = c
                    .publisher
                    .publish(v1::PublishRequest {
                        topic: "t".into(),
                        messages,
                    })
                    .await;
                let mut rec = record.lock();
                match r {
                    Ok(_) => {
                        for p in payloads {
                            rec.uncertain.remove(&p);
                            rec.published.insert(p);
                        }
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    let mut c = c.clone();
    tasks.push(tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let Ok(resp) = c
                .subscriber
                .pull(v1::PullRequest {
                    subscription: "work".into(),
                    max_messages: 40,
                    wait_ms: 50,
                })
                .await
            else {
                return;
            };
            let msgs = resp.into_inner().received_messages;
            {
                let mut rec = record.lock();
                let mut f = findings.lock();
                for m in &msgs {
                    rec.delivered(m, &mut f);
                }
            }
            // Ack most, reject some, nack some, and leave some to expire.
            let mut ack = Vec::new();
            let mut reject = Vec::new();
            let mut nack = Vec::new();
            for m in msgs {
                n += 1;
                match n % 10 {
                    0 => reject.push(m),
                    1 => nack.push(m),
                    2 => {} // expires
                    _ => ack.push(m),
                }
            }
            for (list, kind) in [(ack, 0), (reject, 1), (nack, 2)] {
                if list.is_empty() {
                    continue;
                }
                let ids = ack_ids(&list);
                let results = match kind {
                    0 => c
                        .subscriber
                        .acknowledge(v1::AcknowledgeRequest {
                            subscription: "work".into(),
                            ack_ids: ids,
                        })
                        .await
                        .map(|r| r.into_inner().results),
                    _ => c
                        .subscriber
                        .nack(v1::NackRequest {
                            subscription: "work".into(),
                            ack_ids: ids,
                            reject: kind == 1,
                            reason: if kind == 1 {
                                "checker".into()
                            } else {
                                String::new()
                            },
                        })
                        .await
                        .map(|r| r.into_inner().results),
                };
                let Ok(results) = results else { return };
                let mut rec = record.lock();
                for (m, r) in list.iter().zip(results) {
                    if r.status == v1::AckStatus::Ok as i32 {
                        match kind {
                            0 => {
                                rec.acked.insert(text(m));
                            }
                            1 => {
                                rec.rejected.insert(text(m));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }));
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_loses_nothing_acknowledged_and_keeps_every_promise() {
    let cycles: u64 = std::env::var("COURIER_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let tmp = tempfile::tempdir().unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let findings = Arc::new(Mutex::new(Findings::default()));
    for cycle in 0..cycles {
        let mut broker = spawn_broker(tmp.path());
        let mut c = Clients::connect(&broker.url).await;
        if cycle == 0 {
            create_all(&mut c).await;
        }
        let load = tokio::spawn(traffic(c.clone(), cycle, record.clone(), findings.clone()));
        // A random moment: 150..750 ms into the cycle.
        let at = 150 + (crc32fast::hash(&cycle.to_le_bytes()) % 600) as u64;
        tokio::time::sleep(Duration::from_millis(at)).await;
        broker.child.kill().unwrap(); // SIGKILL
        broker.child.wait().unwrap();
        let _ = load.await;
    }

    // The final check on a broker that is not killed.
    let mut broker = spawn_broker(tmp.path());
    let mut c = Clients::connect(&broker.url).await;
    let mut f = std::mem::take(&mut *findings.lock());
    let rec = std::mem::take(&mut *record.lock());
    let mut rec = rec;
    // "audit" never acks before this: it holds every message once.
    let mut audit: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        let got = c.pull("audit", 1000, 500).await;
        if got.is_empty() {
            break;
        }
        for m in &got {
            *audit.entry(text(m)).or_default() += 1;
        }
        c.ack("audit", ack_ids(&got)).await;
    }
    for (p, n) in &audit {
        if !well_formed(p) {
            f.corrupt.push(p.clone());
        } else if !rec.published.contains(p) && !rec.uncertain.contains(p) {
            f.unexpected.push(p.clone());
        }
        if *n > 1 {
            f.duplicated.push(format!("{p} x{n}"));
        }
    }
    f.lost = rec
        .published
        .iter()
        .filter(|p| !audit.contains_key(*p))
        .cloned()
        .collect();
    // "work": whatever is left is delivered, with the same checks.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = c.pull("work", 1000, 700).await;
        if got.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        for m in &got {
            rec.delivered(m, &mut f);
        }
        c.ack("work", ack_ids(&got)).await;
    }
    let mut dlq: BTreeMap<String, u32> = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .admin
            .list_dead_letters(v1::ListDeadLettersRequest {
                subscription: "work".into(),
                max: 1000,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        for d in &page.dead_letters {
            let p = String::from_utf8_lossy(&d.message.as_ref().unwrap().data).into_owned();
            *dlq.entry(p).or_default() += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    f.dead_letter_duplicates = dlq
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(p, n)| format!("{p} x{n}"))
        .collect();
    f.rejected_missing_from_dlq = rec
        .rejected
        .iter()
        .filter(|p| !dlq.contains_key(*p))
        .cloned()
        .collect();
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();

    println!(
        "crash loop: cycles={cycles} published_ok={} uncertain={} deliveries={} acked={} rejected={} dead_letters={} \
         lost={} unexpected={} corrupt={} duplicated={} acked_then_redelivered={} attempts_backwards={} \
         attempts_over_limit={} dead_letter_duplicates={} rejected_missing_from_dlq={}",
        rec.published.len(),
        rec.uncertain.len(),
        rec.deliveries,
        rec.acked.len(),
        rec.rejected.len(),
        dlq.len(),
        f.lost.len(),
        f.unexpected.len(),
        f.corrupt.len(),
        f.duplicated.len(),
        f.acked_then_redelivered.len(),
        f.attempts_backwards.len(),
        f.attempts_over_limit.len(),
        f.dead_letter_duplicates.len(),
        f.rejected_missing_from_dlq.len(),
    );
    assert!(
        rec.published.len() > 100 * cycles as usize / 2,
        "too little traffic to test"
    );
    assert!(rec.acked.len() > 10, "too few acks to test");
    assert_eq!(f.total(), 0, "{f:#?}");
    let over: Vec<_> = dlq
        .iter()
        .filter(|(_, n)| **n as u64 > 1 + cycles)
        .collect();
    assert!(
        over.is_empty(),
        "dead letters repeated more often than the broker was killed: {over:?}"
    );
}

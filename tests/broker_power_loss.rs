//! Power loss under the whole `courier serve` binary: each test runs a real
//! broker child on a PowerFs mount (tests/common/powerfs.rs), SIGKILLs it
//! and cuts the power, so that only what the broker fsynced is left, then
//! restarts it on the same directory and checks what docs/durability.md
//! promises for the default fsync mode (`always`):
//!
//! - an admin change (create, update, delete) that returned OK survives;
//! - a Publish that returned ids survives, every message of it;
//! - an ack that returned OK is never followed by a redelivery;
//! - a message once delivered is never taken back, and its delivery
//!   attempts only grow.
//!
//! The tests need root and /dev/fuse (CI has both); elsewhere they say so
//! on stderr and pass without running. The load test runs
//! `COURIER_POWER_CYCLES` cuts (default 3):
//! `COURIER_POWER_CYCLES=30 cargo test --test broker_power_loss -- --nocapture`

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::powerfs::PowerFs;
use common::{ChildBroker, Clients, ack_ids, spawn_broker, text};
use courier::api::pb::v1;
use parking_lot::Mutex;

/// A PowerFs on a fresh temporary directory; unmounted before the
/// directory is removed (fields drop in order).
struct Mount {
    fs: PowerFs,
    _tmp: tempfile::TempDir,
}

impl Mount {
    fn dir(&self) -> &Path {
        self.fs.path()
    }
}

/// `None`, after saying why on stderr, where PowerFs cannot be mounted.
fn mount(test: &str) -> Option<Mount> {
    if let Some(why) = PowerFs::unavailable() {
        eprintln!("SKIPPED {test}: power-loss tests need root and /dev/fuse: {why}");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fs = PowerFs::mount(tmp.path());
    Some(Mount { fs, _tmp: tmp })
}

/// What src/broker/recovery.rs logs when it repairs something (see
/// [`Broker::repairs`]).
const REPAIRS: [&str; 4] = [
    "the metadata store had lost",
    "was set aside; nothing was deleted",
    "directory is missing",
    "never completed",
];

#[test]
fn the_repairs_looked_for_are_what_recovery_logs() {
    let recovery = include_str!("../src/broker/recovery.rs");
    for r in REPAIRS {
        assert!(recovery.contains(r), "recovery.rs no longer logs {r:?}");
    }
}

/// A broker child that is killed if the test fails half-way.
struct Broker(ChildBroker);

impl Broker {
    fn start(dir: &Path) -> Broker {
        Broker(spawn_broker(dir))
    }

    async fn clients(&self) -> Clients {
        Clients::connect(&self.0.url).await
    }

    /// SIGKILL, then the power cut.
    fn power_loss(mut self, fs: &PowerFs) {
        self.0.child.kill().unwrap();
        self.0.child.wait().unwrap();
        fs.cut();
    }

    /// Log lines that say recovery had to repair the metadata store or set
    /// data aside: after a power loss that hit only completed changes,
    /// sled itself must have kept every definition.
    fn repairs(&self) -> Vec<String> {
        self.0
            .log
            .lock()
            .iter()
            .filter(|l| REPAIRS.iter().any(|r| l.contains(r)))
            .cloned()
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

fn is_not_found<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> bool {
    matches!(r, Err(s) if s.code() == tonic::Code::NotFound)
}

/// PowerFs itself: a cut keeps exactly what was synced.
#[test]
fn powerfs_keeps_only_what_was_synced() {
    let Some(m) = mount("powerfs_keeps_only_what_was_synced") else {
        return;
    };
    let d = m.dir();
    let sync_dir = |p: &Path| std::fs::File::open(p).unwrap().sync_all().unwrap();
    let write = |p: &Path, bytes: &[u8], sync: bool| {
        let mut f = std::fs::File::create(p).unwrap();
        f.write_all(bytes).unwrap();
        if sync {
            f.sync_data().unwrap();
        }
    };
    write(&d.join("kept"), b"durable", true);
    write(&d.join("empty"), b"never synced", false);
    write(&d.join("old"), b"old", true);
    write(&d.join("gone"), b"removed", true);
    std::fs::create_dir(d.join("sub")).unwrap();
    sync_dir(d);
    write(&d.join("sub/orphan"), b"x", true);
    sync_dir(&d.join("sub"));
    // A rename over an existing file and a removal, both synced.
    write(&d.join("new.tmp"), b"new", true);
    std::fs::rename(d.join("new.tmp"), d.join("old")).unwrap();
    std::fs::remove_file(d.join("gone")).unwrap();
    sync_dir(d);
    // Everything from here on is lost: a name never synced, a removal, a
    // file's growth and shrinking, a directory.
    write(&d.join("unnamed"), b"synced, but not its name", true);
    std::fs::remove_file(d.join("empty")).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(d.join("kept"))
        .unwrap()
        .write_all(b" and lost")
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("old"))
        .unwrap()
        .set_len(1)
        .unwrap();
    std::fs::create_dir(d.join("unsynced-dir")).unwrap();
    assert_eq!(std::fs::read(d.join("kept")).unwrap(), b"durable and lost");

    m.fs.cut();
    assert_eq!(std::fs::read(d.join("kept")).unwrap(), b"durable");
    assert_eq!(std::fs::read(d.join("empty")).unwrap(), b"");
    assert_eq!(std::fs::read(d.join("old")).unwrap(), b"new");
    assert_eq!(std::fs::read(d.join("sub/orphan")).unwrap(), b"x");
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["empty", "kept", "old", "sub"]);
    let stats = m.fs.stats();
    assert_eq!(stats.cuts, 1);
    assert!(stats.file_syncs >= 6 && stats.dir_syncs >= 3, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_after_create_and_publish_keeps_topic_subscription_and_messages() {
    let Some(m) = mount("power_cut_after_create_and_publish") else {
        return;
    };
    let broker = Broker::start(m.dir());
    let mut c = broker.clients().await;
    c.create_topic("orders").await;
    c.create_sub("billing", "orders").await;
    let mut published = BTreeMap::new();
    for batch in 0..5 {
        let payloads: Vec<String> = (0..20).map(|i| format!("order-{batch}-{i}")).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        let ids = c.publish("orders", &refs).await;
        published.extend(payloads.into_iter().zip(ids));
    }
    broker.power_loss(&m.fs);

    let broker = Broker::start(m.dir());
    let mut c = broker.clients().await;
    c.admin
        .get_topic(v1::GetTopicRequest {
            name: "orders".into(),
        })
        .await
        .expect("the topic survives");
    let sub = c
        .admin
        .get_subscription(v1::GetSubscriptionRequest {
            name: "billing".into(),
        })
        .await
        .expect("the subscription survives")
        .into_inner();
    assert_eq!(sub.topic, "orders");
    let got = c
        .pull_n("billing", published.len() + 1, Duration::from_secs(5))
        .await;
    let got: BTreeMap<String, String> = got
        .iter()
        .map(|m| (text(m), m.message.as_ref().unwrap().message_id.clone()))
        .collect();
    assert_eq!(got, published, "every published message, once, with its id");
    assert_eq!(
        broker.repairs(),
        Vec::<String>::new(),
        "sled kept every definition"
    );
    assert!(m.fs.stats().file_syncs > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_after_update_subscription_keeps_the_update() {
    let Some(m) = mount("power_cut_after_update_subscription") else {
        return;
    };
    let broker = Broker::start(m.dir());
    let mut c = broker.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 5_000,
        ..Default::default()
    })
    .await;
    c.admin
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
        .unwrap();
    broker.power_loss(&m.fs);

    let broker = Broker::start(m.dir());
    let mut c = broker.clients().await;
    let sub = c
        .admin
        .get_subscription(v1::GetSubscriptionRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sub.ack_deadline_ms, 9_000, "the update survives");
    assert_eq!(sub.dead_letter_policy.unwrap().max_delivery_attempts, 4);
    assert_eq!(broker.repairs(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_after_delete_keeps_it_deleted() {
    let Some(m) = mount("power_cut_after_delete") else {
        return;
    };
    let broker = Broker::start(m.dir());
    let mut c = broker.clients().await;
    c.create_topic("keep").await;
    c.create_sub("keep-sub", "keep").await;
    c.create_sub("gone-sub", "keep").await;
    c.create_topic("gone-topic").await;
    c.create_sub("gone-topic-sub", "gone-topic").await;
    c.publish("keep", &["k1", "k2"]).await;
    c.publish("gone-topic", &["g1"]).await;
    c.admin
        .delete_subscription(v1::DeleteSubscriptionRequest {
            name: "gone-sub".into(),
        })
        .await
        .unwrap();
    broker.power_loss(&m.fs);

    let broker = Broker::start(m.dir());
    let mut c = broker.clients().await;
    assert!(is_not_found(
        c.admin
            .get_subscription(v1::GetSubscriptionRequest {
                name: "gone-sub".into()
            })
            .await
    ));
    c.admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "gone-topic".into(),
            force: true,
        })
        .await
        .unwrap();
    assert_eq!(broker.repairs(), Vec::<String>::new());
    broker.power_loss(&m.fs);

    let broker = Broker::start(m.dir());
    let mut c = broker.clients().await;
    assert!(is_not_found(
        c.admin
            .get_topic(v1::GetTopicRequest {
                name: "gone-topic".into()
            })
            .await
    ));
    let topics: Vec<String> = c
        .admin
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(topics, ["keep"]);
    let subs: Vec<String> = c
        .admin
        .list_subscriptions(v1::ListSubscriptionsRequest {
            topic: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .subscriptions
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(subs, ["keep-sub"]);
    let got: BTreeSet<String> = c
        .pull_n("keep-sub", 3, Duration::from_secs(2))
        .await
        .iter()
        .map(text)
        .collect();
    assert_eq!(got, BTreeSet::from(["k1".to_string(), "k2".to_string()]));
    assert_eq!(broker.repairs(), Vec::<String>::new());
    for kind in ["topics", "subscriptions"] {
        let left: Vec<String> = std::fs::read_dir(m.dir().join(kind))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), 1, "only the live {kind} are left: {left:?}");
    }
    assert!(
        !m.dir().join("lost+found").exists(),
        "nothing set aside: {:?}",
        std::fs::read_dir(m.dir().join("lost+found")).map(|d| d.count())
    );
}

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
    /// Sent, without an OK: may or may not exist.
    uncertain: BTreeSet<String>,
    /// Ack on "work" returned OK.
    acked: BTreeSet<String>,
    /// Delivered on "work" at least once.
    delivered: BTreeSet<String>,
    /// Highest attempt seen per payload on "work".
    attempts: BTreeMap<String, u32>,
    deliveries: u64,
    redeliveries: u64,
}

#[derive(Default, Debug)]
struct Findings {
    lost: Vec<String>,
    unexpected: Vec<String>,
    corrupt: Vec<String>,
    duplicated: Vec<String>,
    acked_then_redelivered: Vec<String>,
    delivered_then_lost: Vec<String>,
    attempts_not_growing: Vec<String>,
}

impl Findings {
    fn total(&self) -> usize {
        self.lost.len()
            + self.unexpected.len()
            + self.corrupt.len()
            + self.duplicated.len()
            + self.acked_then_redelivered.len()
            + self.delivered_then_lost.len()
            + self.attempts_not_growing.len()
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
        if self.acked.contains(&p) {
            f.acked_then_redelivered.push(p.clone());
        }
        if let Some(before) = self.attempts.get(&p) {
            self.redeliveries += 1;
            if m.delivery_attempt <= *before {
                f.attempts_not_growing
                    .push(format!("{p} attempt {} after {before}", m.delivery_attempt));
            }
        }
        self.attempts.insert(p.clone(), m.delivery_attempt);
        self.delivered.insert(p);
    }
}

/// One cycle's traffic until the broker dies: three publishers, one
/// consumer of "work" that acks everything it gets.
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
                // Recorded before the call: a consumer may see a message
                // before this task sees the reply.
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
                if r.is_err() {
                    return;
                }
                let mut rec = record.lock();
                for p in payloads {
                    rec.uncertain.remove(&p);
                    rec.published.insert(p);
                }
            }
        }));
    }
    let mut c = c.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let Ok(resp) = c
                .subscriber
                .pull(v1::PullRequest {
                    subscription: "work".into(),
                    max_messages: 50,
                    wait_ms: 50,
                })
                .await
            else {
                return;
            };
            let msgs = resp.into_inner().received_messages;
            if msgs.is_empty() {
                continue;
            }
            {
                let mut rec = record.lock();
                let mut f = findings.lock();
                for m in &msgs {
                    rec.delivered(m, &mut f);
                }
            }
            let Ok(results) = c
                .subscriber
                .acknowledge(v1::AcknowledgeRequest {
                    subscription: "work".into(),
                    ack_ids: ack_ids(&msgs),
                })
                .await
            else {
                return;
            };
            let mut rec = record.lock();
            for (m, r) in msgs.iter().zip(results.into_inner().results) {
                if r.status == v1::AckStatus::Ok as i32 {
                    rec.acked.insert(text(m));
                }
            }
        }
    }));
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_load_lose_no_publish_and_redeliver_no_ack() {
    let Some(m) = mount("power_cuts_under_load") else {
        return;
    };
    let cycles: u64 = std::env::var("COURIER_POWER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let record = Arc::new(Mutex::new(Record::default()));
    let findings = Arc::new(Mutex::new(Findings::default()));
    for cycle in 0..cycles {
        let broker = Broker::start(m.dir());
        let mut c = broker.clients().await;
        if cycle == 0 {
            c.create_topic("t").await;
            // "audit" is never read before the end: it holds every message.
            c.create_sub("audit", "t").await;
            c.create_sub("work", "t").await;
        }
        let load = tokio::spawn(traffic(c.clone(), cycle, record.clone(), findings.clone()));
        // A random moment: 200..800 ms into the cycle.
        let at = 200 + u64::from(crc32fast::hash(&(cycle + 7).to_le_bytes()) % 600);
        tokio::time::sleep(Duration::from_millis(at)).await;
        broker.power_loss(&m.fs);
        let _ = load.await;
    }

    // The final check, on a broker that is not cut.
    let broker = Broker::start(m.dir());
    let mut c = broker.clients().await;
    let mut f = std::mem::take(&mut *findings.lock());
    let mut rec = std::mem::take(&mut *record.lock());
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
    f.delivered_then_lost = rec
        .delivered
        .iter()
        .filter(|p| !audit.contains_key(*p))
        .cloned()
        .collect();
    // "work": what was not acked comes again, with the same checks.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = c.pull("work", 1000, 300).await;
        if got.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        for m in &got {
            rec.delivered(m, &mut f);
        }
        c.ack("work", ack_ids(&got)).await;
    }
    let stats = m.fs.stats();
    println!(
        "power loss: cycles={cycles} published_ok={} uncertain={} in_audit={} deliveries={} redeliveries={} \
         acked={} file_syncs={} dir_syncs={} lost={} unexpected={} corrupt={} duplicated={} \
         acked_then_redelivered={} delivered_then_lost={} attempts_not_growing={}",
        rec.published.len(),
        rec.uncertain.len(),
        audit.len(),
        rec.deliveries,
        rec.redeliveries,
        rec.acked.len(),
        stats.file_syncs,
        stats.dir_syncs,
        f.lost.len(),
        f.unexpected.len(),
        f.corrupt.len(),
        f.duplicated.len(),
        f.acked_then_redelivered.len(),
        f.delivered_then_lost.len(),
        f.attempts_not_growing.len(),
    );
    assert!(
        rec.published.len() > 50 * cycles as usize,
        "too little traffic to test"
    );
    assert!(
        rec.acked.len() > 10 * cycles as usize,
        "too few acks to test"
    );
    assert_eq!(f.total(), 0, "{f:#?}");
}

/// Found with PowerFs: a data directory (and its parents) that `serve`
/// creates must be synced into its parent, or the first power cut takes
/// it whole, acknowledged publishes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_keeps_a_data_dir_the_broker_created() {
    let Some(m) = mount("power_cut_keeps_a_data_dir_the_broker_created") else {
        return;
    };
    let dir = m.dir().join("new/data");
    let broker = Broker::start(&dir);
    let mut c = broker.clients().await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    c.publish("t", &["kept"]).await;
    broker.power_loss(&m.fs);

    assert!(dir.exists(), "the data directory survives");
    let broker = Broker::start(&dir);
    let mut c = broker.clients().await;
    let got: Vec<String> = c
        .pull_n("s", 1, Duration::from_secs(2))
        .await
        .iter()
        .map(text)
        .collect();
    assert_eq!(got, ["kept"]);
}

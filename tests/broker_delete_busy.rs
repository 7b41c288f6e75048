//! Deletes on a file system where an open file keeps its directory busy:
//! PowerFs with NFS silly-rename semantics (tests/common/powerfs.rs), under
//! a real `courier serve` child. DeleteTopic and DeleteSubscription must
//! close their logs' files before removing the directory, so the directory
//! (and its `.deleting` name) is gone without a restart.
//!
//! Needs root and /dev/fuse, like tests/broker_power_loss.rs; elsewhere the
//! tests say so on stderr and pass without running.

mod common;

use std::path::Path;
use std::time::Duration;

use common::powerfs::{HIDDEN_PREFIX, MountOptions, PowerFs};
use common::{ChildBroker, Clients, ack_ids, spawn_broker_with};
use courier::api::pb::v1;

/// A silly-renaming PowerFs on a fresh temporary directory; unmounted
/// before the directory is removed (fields drop in order).
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
        eprintln!("SKIPPED {test}: PowerFs tests need root and /dev/fuse: {why}");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fs = PowerFs::mount_with(tmp.path(), MountOptions { silly_rename: true });
    Some(Mount { fs, _tmp: tmp })
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Polls (up to 2 s) until `dir` holds exactly `want`.
async fn wait_for_names(dir: &Path, want: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = names(dir);
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} still holds {now:?}, want {want:?}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn powerfs_silly_rename_hides_open_files_until_closed() {
    let Some(m) = mount("powerfs_silly_rename_hides_open_files_until_closed") else {
        return;
    };
    let d = m.dir().join("d");
    std::fs::create_dir(&d).unwrap();
    let open = std::fs::File::create(d.join("open")).unwrap();
    std::fs::write(d.join("closed"), b"x").unwrap();
    std::fs::remove_file(d.join("closed")).unwrap();
    std::fs::remove_file(d.join("open")).unwrap();
    let left = names(&d);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(HIDDEN_PREFIX), "{left:?}");
    let err = std::fs::remove_file(d.join(&left[0])).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    let err = std::fs::remove_dir(&d).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "{err}");
    drop(open);
    // The kernel sends the release after close returns.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !names(&d).is_empty() {
        assert!(std::time::Instant::now() < deadline, "{:?}", names(&d));
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_dir(&d).unwrap();
}

/// A broker child that is killed if the test fails half-way.
struct Broker(ChildBroker);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_remove_their_directories_where_open_files_keep_them_busy() {
    let Some(m) = mount("deletes_remove_their_directories_where_open_files_keep_them_busy") else {
        return;
    };
    let broker = Broker(spawn_broker_with(
        m.dir(),
        &["--segment-bytes", "64KiB"],
        None,
    ));
    let mut c = Clients::connect(&broker.0.url).await;
    let (topics, subs) = (m.dir().join("topics"), m.dir().join("subscriptions"));
    c.create_topic("keep").await;
    c.create_sub("keep-sub", "keep").await;
    let (kept_topics, kept_subs) = (names(&topics), names(&subs));
    c.create_topic("t").await;
    for sub in ["s", "gone-with-topic"] {
        c.create_sub_with(v1::Subscription {
            name: sub.into(),
            topic: "t".into(),
            dead_letter_policy: Some(v1::DeadLetterPolicy {
                max_delivery_attempts: 5,
                forward_topic: String::new(),
            }),
            ..Default::default()
        })
        .await;
    }
    // Several segments, a dead-letter log per subscription, some acked,
    // some still leased.
    let payload = "x".repeat(1000);
    for _ in 0..4 {
        let batch: Vec<&str> = (0..50).map(|_| payload.as_str()).collect();
        c.publish("t", &batch).await;
    }
    for sub in ["s", "gone-with-topic"] {
        let got = c.pull_n(sub, 120, Duration::from_secs(3)).await;
        assert_eq!(got.len(), 120);
        c.ack(sub, ack_ids(&got[..100])).await;
        c.nack(sub, ack_ids(&got[100..101]), Some("poison")).await;
        assert_eq!(c.dead_letters(sub).await.len(), 1);
    }

    c.admin
        .delete_subscription(v1::DeleteSubscriptionRequest { name: "s".into() })
        .await
        .unwrap();
    let with_t_sub = names(&subs);
    assert_eq!(with_t_sub.len(), kept_subs.len() + 1, "{with_t_sub:?}");
    assert!(
        !with_t_sub.iter().any(|n| n.ends_with(".deleting")),
        "{with_t_sub:?}"
    );

    c.admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "t".into(),
            force: true,
        })
        .await
        .unwrap();
    wait_for_names(&topics, &kept_topics).await;
    wait_for_names(&subs, &kept_subs).await;

    // The broker goes on serving what is left.
    c.publish("keep", &["k"]).await;
    let got = c.pull_n("keep-sub", 1, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 1);
    let warned: Vec<String> = broker
        .0
        .log
        .lock()
        .iter()
        .filter(|l| l.contains("cannot remove a deleted directory"))
        .cloned()
        .collect();
    assert_eq!(warned, Vec::<String>::new());
}

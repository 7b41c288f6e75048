//! A full disk is an error that passes: on a small real tmpfs, publishes
//! get RESOURCE_EXHAUSTED (never INTERNAL), acks keep working (they are how
//! space is freed), health says NOT_SERVING, and once space returns the
//! broker publishes again without a restart. A failed Publish is all or
//! nothing: none of its messages is ever delivered, before or after a
//! restart.
//!
//! Needs root to mount the tmpfs (CI runs as root); without it the test
//! says so loudly and checks nothing.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestServer, ack_ids, test_config, text};
use courier::api::pb::v1;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A tmpfs of `size` mounted on a fresh temp directory; unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let tmp = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(tmp.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(SmallDisk {
            dir: tmp.path().to_path_buf(),
            _tmp: tmp,
        })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

async fn health(url: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    let r = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

async fn wait_health(url: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(url).await != want {
        assert!(Instant::now() < deadline, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn batch(tag: &str, n: usize) -> Vec<v1::PublishMessage> {
    (0..n)
        .map(|i| v1::PublishMessage {
            data: format!("{tag}-{i}-{}", "p".repeat(4000)).into(),
            ..Default::default()
        })
        .collect()
}

fn short(m: &v1::ReceivedMessage) -> String {
    text(m).split('-').take(2).collect::<Vec<_>>().join("-")
}

fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string and a zeroed out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

fn data_dir(disk: &Path) -> PathBuf {
    disk.join("data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_cleanly_keeps_acks_and_passes() {
    let Some(disk) = SmallDisk::mount("6m") else {
        return;
    };
    let config = test_config(&data_dir(&disk.dir));
    let server = TestServer::start_with(config.clone()).await;
    let url = server.url();
    let mut c = server.clients().await;
    c.create_topic("t").await;
    c.create_sub_with(v1::Subscription {
        name: "s".into(),
        topic: "t".into(),
        ack_deadline_ms: 60_000,
        ..Default::default()
    })
    .await;

    // Fill the disk.
    let mut ok: BTreeSet<String> = BTreeSet::new();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut refusals = 0;
    for b in 0..2_000 {
        let tag = format!("b{b}");
        let r = c
            .publisher
            .publish(v1::PublishRequest {
                topic: "t".into(),
                messages: batch(&tag, 8),
            })
            .await;
        match r {
            Ok(_) => {
                ok.extend((0..8).map(|i| format!("{tag}-{i}")));
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                failed.extend((0..8).map(|i| format!("{tag}-{i}")));
                refusals += 1;
                if refusals == 5 {
                    break;
                }
            }
        }
    }
    assert_eq!(refusals, 5, "the disk never filled");
    assert!(!ok.is_empty());
    wait_health(&url, ServingStatus::NotServing).await;

    // Acks work on a full disk, and acking everything frees the space
    // (retention deletes acked segments).
    let mut delivered: BTreeSet<String> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.len() < ok.len() {
        assert!(
            Instant::now() < deadline,
            "drained {} of {}",
            delivered.len(),
            ok.len()
        );
        let got = c.pull("s", 100, 200).await;
        if got.is_empty() {
            continue;
        }
        for m in &got {
            let name = short(m);
            assert!(
                !failed.contains(&name),
                "a message of a failed publish was delivered: {name}"
            );
            delivered.insert(name);
        }
        let results = c.ack("s", ack_ids(&got)).await;
        assert!(
            results.iter().all(|r| r.status == v1::AckStatus::Ok as i32),
            "acks failed on a full disk: {results:?}"
        );
    }
    assert_eq!(delivered, ok);

    // Retention deletes the acked segments: the space comes back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while free_bytes(&disk.dir) < 4 << 20 {
        assert!(
            Instant::now() < deadline,
            "acked segments were never deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Publishing works again without a restart.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .publisher
            .publish(v1::PublishRequest {
                topic: "t".into(),
                messages: batch("after", 8),
            })
            .await;
        match r {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(Instant::now() < deadline, "publishing never resumed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    wait_health(&url, ServingStatus::Serving).await;
    server.stop().await;

    // After a restart: the "after" messages, and nothing of a failed
    // publish.
    let server = TestServer::start_with(config).await;
    let mut c = server.clients().await;
    let mut rest = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rest.len() < 8 {
        assert!(Instant::now() < deadline, "got only {rest:?}");
        for m in c.pull("s", 100, 200).await {
            rest.insert(short(&m));
        }
    }
    let after: BTreeSet<String> = (0..8).map(|i| format!("after-{i}")).collect();
    assert_eq!(rest, after);
    assert!(c.pull("s", 100, 300).await.is_empty());
    server.stop().await;
}

//! Many logs on one shared writer pool: interleaved appends under every
//! fsync mode survive power loss as each mode promises, a failing sync
//! fails only its own log's appends, and closing many dirty logs syncs
//! them all.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use courier::storage::io::{Fs, SimFs};
use courier::storage::{FsyncMode, Log, LogConfig, NewRecord, Offset, ReadLimits, WriterPool};

const LOGS: usize = 24;
const PER_LOG: usize = 40;

fn config(fsync: FsyncMode, pool: &WriterPool) -> LogConfig {
    LogConfig {
        fsync,
        // Small segments: the logs roll while they share the writers.
        segment_bytes_max: 2048,
        index_interval_bytes: 256,
        writers: Some(pool.clone()),
        ..LogConfig::default()
    }
}

fn rec(payload: String) -> NewRecord {
    NewRecord {
        payload: Bytes::from(payload),
        ..NewRecord::default()
    }
}

fn dir(i: usize) -> PathBuf {
    PathBuf::from(format!("/data/log-{i}"))
}

fn open(fs: &SimFs, path: &Path, config: LogConfig) -> Log {
    Log::open(Arc::new(fs.clone()) as Arc<dyn Fs>, path, config, Offset(0))
        .unwrap()
        .0
}

fn payloads(log: &Log) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut from = Offset(0);
    loop {
        let batch = log
            .read(
                from,
                ReadLimits {
                    records_max: 1000,
                    bytes_max: 1 << 20,
                },
            )
            .unwrap();
        if batch.records.is_empty() {
            return out;
        }
        for r in &batch.records {
            out.push((r.offset.0, String::from_utf8(r.payload.to_vec()).unwrap()));
        }
        from = batch.next;
    }
}

/// Appends `PER_LOG` messages to each of `logs` from one task per log, all
/// at once; returns how many appends of each log completed.
async fn append_everywhere(logs: &[Log]) -> Vec<usize> {
    let tasks: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut done = 0;
                for m in 0..PER_LOG {
                    log.append(&[rec(format!("log{i}-m{m}"))]).await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interleaved_appends_to_many_logs_survive_power_loss_as_each_mode_promises() {
    for fsync in [FsyncMode::Always, FsyncMode::Interval(5), FsyncMode::Never] {
        let fs = SimFs::new();
        let pool = WriterPool::new(2).unwrap();
        let logs: Vec<Log> = (0..LOGS)
            .map(|i| open(&fs, &dir(i), config(fsync, &pool)))
            .collect();
        let done = append_everywhere(&logs).await;
        fs.power_loss();
        drop(logs);
        let pool = WriterPool::new(2).unwrap();
        for (i, completed) in done.iter().enumerate() {
            let log = open(&fs, &dir(i), config(fsync, &pool));
            let got = payloads(&log);
            // Whatever survived is a dense prefix of what was appended.
            for (n, (offset, payload)) in got.iter().enumerate() {
                assert_eq!(*offset, n as u64, "{fsync:?} log {i}");
                assert_eq!(payload, &format!("log{i}-m{n}"), "{fsync:?} log {i}");
            }
            if fsync == FsyncMode::Always {
                assert_eq!(
                    got.len(),
                    *completed,
                    "{fsync:?} log {i}: every completed append survives"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_many_dirty_logs_syncs_every_one_of_them() {
    for fsync in [FsyncMode::Interval(60_000), FsyncMode::Never] {
        let fs = SimFs::new();
        let pool = WriterPool::new(2).unwrap();
        let logs: Vec<Log> = (0..LOGS)
            .map(|i| open(&fs, &dir(i), config(fsync, &pool)))
            .collect();
        append_everywhere(&logs).await;
        for log in &logs {
            log.close();
        }
        fs.power_loss();
        for i in 0..LOGS {
            let log = open(&fs, &dir(i), config(fsync, &pool));
            assert_eq!(
                payloads(&log).len(),
                PER_LOG,
                "{fsync:?} log {i}: a clean close keeps everything"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_sync_fails_only_the_appends_of_its_own_log() {
    let pool = WriterPool::new(1).unwrap();
    let (bad_fs, good_fs) = (SimFs::new(), SimFs::new());
    let bad = open(
        &bad_fs,
        Path::new("/data/bad"),
        config(FsyncMode::Always, &pool),
    );
    let good = open(
        &good_fs,
        Path::new("/data/good"),
        config(FsyncMode::Always, &pool),
    );
    bad.append(&[rec("before".into())]).await.unwrap();
    bad_fs.set_fail_syncs(true);
    // One writer serves both: the bad log's failures must not reach the
    // good log's appends, before, between or after them.
    let bad_task = {
        let bad = bad.clone();
        tokio::spawn(async move {
            let mut failed = 0;
            for m in 0..20 {
                if bad.append(&[rec(format!("bad{m}"))]).await.is_err() {
                    failed += 1;
                }
            }
            failed
        })
    };
    for m in 0..50 {
        good.append(&[rec(format!("good{m}"))]).await.unwrap();
    }
    assert_eq!(
        bad_task.await.unwrap(),
        20,
        "every append to the failing log fails"
    );
    assert_eq!(payloads(&good).len(), 50);
    // Once syncs work again the bad log takes appends where it was (a
    // log whose rewind failed too retries it every second).
    bad_fs.set_fail_syncs(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let appended = loop {
        match bad.append(&[rec("after".into())]).await {
            Ok(a) => break a,
            Err(e) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let _ = e;
            }
            Err(e) => panic!("the log did not recover: {e}"),
        }
    };
    assert_eq!(appended.base_offset, Offset(1));
    assert_eq!(
        payloads(&bad),
        vec![(0, "before".to_string()), (1, "after".to_string())]
    );
}

#[test]
fn logs_on_a_pool_start_no_threads_of_their_own() {
    let fs = SimFs::new();
    let pool = WriterPool::new(2).unwrap();
    let before = threads_named("courier-writer");
    let logs: Vec<Log> = (0..200)
        .map(|i| open(&fs, &dir(i), config(FsyncMode::Always, &pool)))
        .collect();
    // Other tests of this file start pools of their own meanwhile (a few
    // threads); 200 logs with a thread each would be 200 more.
    let after = threads_named("courier-writer");
    assert!(
        after <= before + 8,
        "{before} writer threads before, {after} after 200 logs"
    );
    assert_eq!(pool.threads(), 2);
    drop(logs);
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

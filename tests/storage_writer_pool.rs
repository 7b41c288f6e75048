//! Many logs on one shared writer pool: interleaved appends under every
//! fsync mode, with per-file syncs and with whole syncs, survive power loss
//! as each mode promises; a failing sync (on its own or inside a whole
//! sync) fails only its own log's appends; closing many dirty logs syncs
//! them all; and on a real disk a round of many logs is made durable by
//! one `syncfs` where the file system offers it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use courier::storage::io::{Fs, OsFs, SimFs};
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
    let modes = [FsyncMode::Always, FsyncMode::Interval(5), FsyncMode::Never];
    for (fsync, whole_sync) in modes.into_iter().flat_map(|m| [(m, false), (m, true)]) {
        let fs = SimFs::new();
        fs.set_whole_sync(whole_sync);
        let pool = WriterPool::new(2).unwrap();
        let logs: Vec<Log> = (0..LOGS)
            .map(|i| open(&fs, &dir(i), config(fsync, &pool)))
            .collect();
        let done = append_everywhere(&logs).await;
        let stats = pool.stats();
        if whole_sync && fsync == FsyncMode::Always {
            // 12 logs per writer appending at once: rounds hold several.
            assert!(stats.whole_syncs > 0, "{fsync:?}: {stats:?}");
            assert_eq!(fs.whole_sync_count(), stats.whole_syncs);
        }
        if !whole_sync {
            assert_eq!(stats.whole_syncs, 0, "{fsync:?}: {stats:?}");
        }
        fs.power_loss();
        drop(logs);
        let pool = WriterPool::new(2).unwrap();
        for (i, completed) in done.iter().enumerate() {
            let log = open(&fs, &dir(i), config(fsync, &pool));
            let got = payloads(&log);
            // Whatever survived is a dense prefix of what was appended.
            for (n, (offset, payload)) in got.iter().enumerate() {
                assert_eq!(*offset, n as u64, "{fsync:?} {whole_sync} log {i}");
                assert_eq!(
                    payload,
                    &format!("log{i}-m{n}"),
                    "{fsync:?} {whole_sync} log {i}"
                );
            }
            if fsync == FsyncMode::Always {
                assert_eq!(
                    got.len(),
                    *completed,
                    "{fsync:?} {whole_sync} log {i}: every completed append survives"
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

/// A whole sync that fails because one log's files cannot be synced fails
/// that log's appends only: the other logs of the round are synced on
/// their own, complete, and survive a power loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_whole_sync_fails_only_the_log_whose_file_failed() {
    let mut shared_rounds = 0;
    for attempt in 0..50 {
        let fs = SimFs::new();
        fs.set_whole_sync(true);
        let pool = WriterPool::new(1).unwrap();
        let bad_dir = PathBuf::from("/data/bad");
        let good: Vec<Log> = (0..3)
            .map(|i| open(&fs, &dir(i), config(FsyncMode::Always, &pool)))
            .collect();
        let bad = open(&fs, &bad_dir, config(FsyncMode::Always, &pool));
        fs.set_fail_syncs_under(Some(&bad_dir));
        // Queued back to back, so the one writer finds them in one round.
        let bad_ticket = bad.enqueue(&[rec("bad".into())]).unwrap();
        let good_tickets: Vec<_> = good
            .iter()
            .enumerate()
            .map(|(i, log)| log.enqueue(&[rec(format!("log{i}-m0"))]).unwrap())
            .collect();
        assert!(bad_ticket.wait().await.is_err(), "attempt {attempt}");
        for (i, ticket) in good_tickets.into_iter().enumerate() {
            let appended = ticket.wait().await.unwrap_or_else(|e| {
                panic!("attempt {attempt}: log {i} shares a round with the failing log: {e}")
            });
            assert_eq!(appended.base_offset, Offset(0));
        }
        let stats = pool.stats();
        assert!(stats.file_syncs >= 1, "attempt {attempt}: {stats:?}");
        if stats.whole_sync_failures > 0 {
            shared_rounds += 1;
        }
        fs.power_loss();
        let pool = WriterPool::new(1).unwrap();
        for i in 0..3 {
            let log = open(&fs, &dir(i), config(FsyncMode::Always, &pool));
            assert_eq!(
                payloads(&log),
                vec![(0, format!("log{i}-m0"))],
                "attempt {attempt}"
            );
        }
        if shared_rounds >= 3 {
            break;
        }
    }
    assert!(
        shared_rounds >= 3,
        "the failing log shared a round with the others in only {shared_rounds} of 50 attempts"
    );
}

/// On the disk the tests run on: where the file system offers a trusted
/// `syncfs`, rounds of many logs use it (fewer syncs than appends); where it
/// does not, every round syncs file by file. Either way everything
/// appended is there after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_real_disk_a_round_of_many_logs_takes_one_syncfs_where_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<dyn Fs> = Arc::new(OsFs);
    let trusted = fs.whole_sync(tmp.path()).is_some();
    let pool = WriterPool::new(1).unwrap();
    let open_os = |i: usize, pool: &WriterPool| {
        let path = tmp.path().join(format!("log-{i}"));
        Log::open(
            fs.clone(),
            &path,
            config(FsyncMode::Always, pool),
            Offset(0),
        )
        .unwrap()
        .0
    };
    let logs: Vec<Log> = (0..LOGS).map(|i| open_os(i, &pool)).collect();
    append_everywhere(&logs).await;
    let stats = pool.stats();
    let appends = (LOGS * PER_LOG) as u64;
    if trusted {
        assert!(stats.whole_syncs > 0, "{stats:?}");
        assert!(
            stats.whole_syncs + stats.file_syncs < appends,
            "{appends} appends: {stats:?}"
        );
    } else {
        assert_eq!(stats.whole_syncs, 0, "{stats:?}");
    }
    eprintln!("syncfs trusted here: {trusted}; {appends} appends: {stats:?}");
    drop(logs);
    let pool = WriterPool::new(1).unwrap();
    for i in 0..LOGS {
        assert_eq!(payloads(&open_os(i, &pool)).len(), PER_LOG, "log {i}");
    }
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

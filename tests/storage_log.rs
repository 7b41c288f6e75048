//! Storage API tests: appends, reads, rolls, recovery, retention, and power
//! loss on the simulated page cache.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use courier::storage::io::{Fs, OsFs, SimFs};
use courier::storage::{FsyncMode, Log, LogConfig, NewRecord, Offset, ReadLimits};

fn rec(payload: &str) -> NewRecord {
    NewRecord {
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..NewRecord::default()
    }
}

fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn read_all(log: &Log) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut from = Offset(0);
    loop {
        let batch = log
            .read(
                from,
                ReadLimits {
                    records_max: 100,
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

fn open(fs: Arc<dyn Fs>, dir: &Path, config: LogConfig) -> Log {
    Log::open(fs, dir, config, Offset(0)).unwrap().0
}

#[tokio::test]
async fn appended_records_read_back_in_order_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(Arc::new(OsFs), tmp.path(), small_config());
    for i in 0..50 {
        let batch: Vec<NewRecord> = (0..10).map(|j| rec(&format!("m{}", i * 10 + j))).collect();
        let appended = log.append(&batch).await.unwrap();
        assert_eq!(appended.base_offset, Offset(i * 10));
        assert_eq!(appended.last_offset, Offset(i * 10 + 9));
    }
    let all = read_all(&log);
    assert_eq!(all.len(), 500);
    for (i, (offset, payload)) in all.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(payload, &format!("m{i}"));
    }
    assert!(log.stats().segments > 1);
    // Reads from the middle start exactly there, from files and cache alike.
    let batch = log
        .read(
            Offset(123),
            ReadLimits {
                records_max: 3,
                bytes_max: 1 << 20,
            },
        )
        .unwrap();
    let offsets: Vec<u64> = batch.records.iter().map(|r| r.offset.0).collect();
    assert_eq!(offsets, vec![123, 124, 125]);
}

#[tokio::test]
async fn reopen_keeps_every_record_and_continues_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let log = open(Arc::new(OsFs), tmp.path(), small_config());
        for i in 0..200 {
            log.append(&[rec(&format!("m{i}"))]).await.unwrap();
        }
        log.close();
    }
    let log = open(Arc::new(OsFs), tmp.path(), small_config());
    assert_eq!(log.next_offset(), Offset(200));
    assert_eq!(read_all(&log).len(), 200);
    let appended = log.append(&[rec("after")]).await.unwrap();
    assert_eq!(appended.base_offset, Offset(200));
}

#[tokio::test]
async fn torn_tail_is_truncated_to_the_last_valid_record() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let log = open(Arc::new(OsFs), tmp.path(), LogConfig::default());
        for i in 0..10 {
            log.append(&[rec(&format!("m{i}"))]).await.unwrap();
        }
        log.close();
    }
    let seg = tmp.path().join("00000000000000000000.seg");
    let len = std::fs::metadata(&seg).unwrap().len();
    // Cut the last record in half and add garbage.
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);
    let (log, report) =
        Log::open(Arc::new(OsFs), tmp.path(), LogConfig::default(), Offset(0)).unwrap();
    assert!(report.truncated_bytes > 0);
    let all = read_all(&log);
    assert_eq!(all.len(), 9);
    assert_eq!(log.next_offset(), Offset(9));
}

#[tokio::test]
async fn power_loss_keeps_every_completed_append_under_always() {
    let fs = SimFs::new();
    let dir = Path::new("/data/topic");
    {
        let log = open(Arc::new(fs.clone()), dir, small_config());
        for i in 0..100 {
            log.append(&[rec(&format!("m{i}"))]).await.unwrap();
        }
        // Queued but never awaited: may or may not survive.
        let _ = log.enqueue(&[rec("maybe")]).unwrap();
        fs.power_loss();
    }
    let log = open(Arc::new(fs.clone()), dir, small_config());
    let all = read_all(&log);
    assert!(all.len() >= 100, "lost completed appends: {}", all.len());
    for (i, (offset, payload)) in all.iter().take(100).enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(payload, &format!("m{i}"));
    }
}

#[tokio::test]
async fn power_loss_under_never_may_lose_the_tail_but_never_corrupts() {
    let fs = SimFs::new();
    let dir = Path::new("/data/topic");
    let config = LogConfig {
        fsync: FsyncMode::Never,
        ..small_config()
    };
    {
        let log = open(Arc::new(fs.clone()), dir, config.clone());
        for i in 0..100 {
            log.append(&[rec(&format!("m{i}"))]).await.unwrap();
        }
        fs.power_loss();
    }
    let log = open(Arc::new(fs.clone()), dir, config);
    for (offset, payload) in read_all(&log) {
        assert_eq!(payload, format!("m{offset}"));
    }
}

#[tokio::test]
async fn corrupt_record_in_sealed_segment_is_an_error_and_the_rest_stays_readable() {
    let fs = SimFs::new();
    let dir = Path::new("/data/topic");
    {
        let log = open(Arc::new(fs.clone()), dir, small_config());
        for i in 0..300 {
            log.append(&[rec(&format!("message-{i:04}"))])
                .await
                .unwrap();
        }
        log.close();
    }
    // Flip a byte in the middle of the first segment.
    assert!(
        fs.corrupt(&dir.join("00000000000000000000.seg"), |data| data[2000] ^=
            0xff)
    );
    let log = open(Arc::new(fs.clone()), dir, small_config());
    let mut from = Offset(0);
    let mut good = Vec::new();
    let mut errors = 0;
    while from < log.next_offset() {
        match log.read(
            from,
            ReadLimits {
                records_max: 50,
                bytes_max: 1 << 20,
            },
        ) {
            Ok(batch) => {
                for r in &batch.records {
                    assert_eq!(r.payload, Bytes::from(format!("message-{:04}", r.offset.0)));
                    good.push(r.offset.0);
                }
                assert!(!batch.records.is_empty());
                from = batch.next;
            }
            Err(courier::storage::StorageError::Corrupt {
                first,
                next_readable,
                ..
            }) => {
                assert!(next_readable > first);
                errors += 1;
                from = next_readable;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(errors, 1);
    assert!(good.len() > 250 && good.len() < 300, "{}", good.len());
    assert!(good.contains(&299));
}

#[tokio::test]
async fn truncate_before_deletes_only_fully_consumed_sealed_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(Arc::new(OsFs), tmp.path(), small_config());
    for i in 0..500 {
        log.append(&[rec(&format!("m{i}"))]).await.unwrap();
    }
    let before = log.stats();
    assert!(before.segments > 3);
    let deleted = log.truncate_before(Offset(250)).unwrap();
    assert!(deleted > 0);
    let after = log.stats();
    assert!(after.first_offset <= Offset(250));
    assert!(after.first_offset > Offset(0));
    let batch = log
        .read(
            Offset(0),
            ReadLimits {
                records_max: 1,
                bytes_max: 1 << 20,
            },
        )
        .unwrap();
    assert_eq!(batch.records[0].offset, after.first_offset);
    // Everything acked: about one segment is left.
    log.truncate_before(Offset(500)).unwrap();
    assert_eq!(log.stats().segments, 1);
}

#[tokio::test]
async fn missing_index_files_are_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let log = open(Arc::new(OsFs), tmp.path(), small_config());
        for i in 0..300 {
            log.append(&[rec(&format!("m{i}"))]).await.unwrap();
        }
        log.close();
    }
    for entry in std::fs::read_dir(tmp.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "idx") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let (log, report) = Log::open(Arc::new(OsFs), tmp.path(), small_config(), Offset(0)).unwrap();
    assert!(report.rebuilt_indexes > 0);
    assert_eq!(read_all(&log).len(), 300);
}

#[tokio::test]
async fn offset_for_time_finds_the_first_record_at_or_after() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(Arc::new(OsFs), tmp.path(), small_config());
    let mut times = Vec::new();
    for i in 0..20 {
        let a = log.append(&[rec(&format!("m{i}"))]).await.unwrap();
        times.push(a.publish_time_us);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert_eq!(log.offset_for_time(0).unwrap(), Offset(0));
    assert_eq!(log.offset_for_time(times[7]).unwrap(), Offset(7));
    assert_eq!(log.offset_for_time(times[7] + 1).unwrap(), Offset(8));
    assert_eq!(log.offset_for_time(u64::MAX).unwrap(), Offset(20));
}

#[tokio::test]
async fn concurrent_appenders_share_fsyncs() {
    let fs = SimFs::new();
    let log = open(Arc::new(fs.clone()), Path::new("/d"), LogConfig::default());
    let before = fs.sync_count();
    let mut tasks = Vec::new();
    for t in 0..32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                log.append(&[rec(&format!("t{t}-{i}"))]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let syncs = fs.sync_count() - before;
    assert_eq!(read_all(&log).len(), 32 * 50);
    assert!(syncs < 32 * 50, "every append synced on its own: {syncs}");
}

#[tokio::test]
async fn retention_by_bytes_and_age_deletes_old_sealed_segments_only() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(Arc::new(OsFs), tmp.path(), small_config());
    for i in 0..500 {
        log.append(&[rec(&format!("m{i}"))]).await.unwrap();
    }
    let before = log.stats();
    log.enforce_retention(None, Some(8192)).unwrap();
    let after = log.stats();
    assert!(after.disk_bytes <= 8192 + 4096, "{after:?}");
    assert!(after.first_offset > before.first_offset);
    assert_eq!(after.next_offset, before.next_offset);
    // Everything is older than 1 µs ago: all sealed segments go, the active stays.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    log.enforce_retention(Some(1), None).unwrap();
    assert_eq!(log.stats().segments, 1);
    let rest = read_all(&log);
    assert_eq!(rest.last().unwrap().0, 499);
}

#[tokio::test]
async fn records_that_cannot_be_framed_are_refused_before_any_write() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(Arc::new(OsFs), tmp.path(), small_config());
    assert!(matches!(
        log.append(&[]).await,
        Err(courier::storage::StorageError::EmptyBatch)
    ));
    let bad = NewRecord {
        ordering_key: Bytes::from(vec![b'k'; 70_000]),
        ..NewRecord::default()
    };
    assert!(matches!(
        log.append(&[rec("fine"), bad]).await,
        Err(courier::storage::StorageError::TooLarge { .. })
    ));
    // Nothing of the refused batch was written.
    assert_eq!(log.next_offset(), Offset(0));
    assert_eq!(
        log.append(&[rec("next")]).await.unwrap().base_offset,
        Offset(0)
    );
}

#[tokio::test]
async fn a_failed_fsync_fails_the_append_and_the_log_recovers_once_syncs_work() {
    let fs = SimFs::new();
    let log = open(Arc::new(fs.clone()), Path::new("/d"), small_config());
    log.append(&[rec("before")]).await.unwrap();
    fs.set_fail_syncs(true);
    assert!(matches!(
        log.append(&[rec("lost")]).await,
        Err(courier::storage::StorageError::Io { .. })
    ));
    // The rewind after the failed sync cannot sync either: the log refuses
    // appends while the disk is broken, and readers never saw "lost".
    assert!(matches!(
        log.append(&[rec("refused")]).await,
        Err(courier::storage::StorageError::Failed { .. })
    ));
    assert_eq!(log.next_offset(), Offset(1));
    assert_eq!(read_all(&log), vec![(0, "before".to_string())]);
    // Once syncs work again the writer's retry rewinds the log to its last
    // synced state and appends are accepted, at the next offset.
    fs.set_fail_syncs(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let appended = loop {
        match log.append(&[rec("after")]).await {
            Ok(a) => break a,
            Err(courier::storage::StorageError::Failed { .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    };
    assert_eq!(appended.base_offset, Offset(1));
    log.close();
    fs.power_loss();
    let log = open(Arc::new(fs.clone()), Path::new("/d"), small_config());
    assert_eq!(
        read_all(&log),
        vec![(0, "before".to_string()), (1, "after".to_string())]
    );
}

#[tokio::test]
async fn a_full_disk_fails_the_whole_batch_leaves_no_trace_and_passes() {
    let fs = SimFs::new();
    let log = open(Arc::new(fs.clone()), Path::new("/d"), small_config());
    log.append(&[rec("before")]).await.unwrap();
    // Room for part of the next batch only: the write is torn by ENOSPC.
    fs.set_space_left(Some(100));
    let big: Vec<NewRecord> = (0..8)
        .map(|i| rec(&format!("batch-{i}-{}", "x".repeat(40))))
        .collect();
    let err = log.append(&big).await.unwrap_err();
    assert!(
        matches!(&err, courier::storage::StorageError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{err}"
    );
    assert_eq!(log.next_offset(), Offset(1));
    assert_eq!(read_all(&log), vec![(0, "before".to_string())]);
    // Still full: still a clean error, not a broken log.
    assert!(log.append(&big).await.is_err());
    // Space comes back: the next append succeeds at the next offset,
    // without reopening anything.
    fs.set_space_left(None);
    let appended = log.append(&[rec("after")]).await.unwrap();
    assert_eq!(appended.base_offset, Offset(1));
    // Nothing of the failed batch survives a crash either (all or nothing).
    log.close();
    fs.power_loss();
    let log = open(Arc::new(fs.clone()), Path::new("/d"), small_config());
    assert_eq!(
        read_all(&log),
        vec![(0, "before".to_string()), (1, "after".to_string())]
    );
}

#[tokio::test]
async fn a_full_disk_during_a_roll_fails_the_batch_and_the_log_carries_on() {
    let fs = SimFs::new();
    let config = LogConfig {
        segment_bytes_max: 512,
        ..small_config()
    };
    let log = open(Arc::new(fs.clone()), Path::new("/d"), config.clone());
    let mut expected = Vec::new();
    for i in 0..6u64 {
        let payload = format!("m{i}-{}", "y".repeat(60));
        log.append(&[rec(&payload)]).await.unwrap();
        expected.push((i, payload));
    }
    // Rolls need a new segment and an index file: no room for them.
    fs.set_space_left(Some(10));
    for _ in 0..20 {
        let _ = log.append(&[rec(&"z".repeat(200))]).await;
    }
    fs.set_space_left(None);
    let next = log.next_offset().0;
    assert_eq!(next, 6, "failed appends took no offsets");
    let payload = format!("after-{}", "w".repeat(200));
    log.append(&[rec(&payload)]).await.unwrap();
    expected.push((6, payload));
    assert_eq!(read_all(&log), expected);
    log.close();
    fs.power_loss();
    let log = open(Arc::new(fs.clone()), Path::new("/d"), config);
    assert_eq!(read_all(&log), expected);
}

fn deferring(defer_max: std::time::Duration) -> LogConfig {
    LogConfig {
        defer_max,
        ..LogConfig::default()
    }
}

#[tokio::test]
async fn a_deferred_batch_shares_the_next_ordinary_batchs_sync() {
    let fs = SimFs::new();
    let log = open(
        Arc::new(fs.clone()),
        Path::new("/d"),
        deferring(std::time::Duration::from_secs(3600)),
    );
    log.append(&[rec("first")]).await.unwrap();
    let before = fs.sync_count();
    let deferred = log.enqueue_deferred(&[rec("ack")]).unwrap();
    // Held back: an hour-long deferral outlasts this wait by far.
    let mut deferred = std::pin::pin!(deferred.wait());
    let held = tokio::time::timeout(std::time::Duration::from_millis(50), deferred.as_mut()).await;
    assert!(held.is_err(), "a lone deferred batch was written at once");
    assert_eq!(fs.sync_count(), before);
    let ordinary = log.append(&[rec("delivery")]).await.unwrap();
    let deferred = deferred.await.unwrap();
    assert_eq!(deferred.base_offset, Offset(1));
    assert_eq!(ordinary.base_offset, Offset(2));
    assert_eq!(
        fs.sync_count() - before,
        1,
        "the two batches took separate syncs"
    );
    assert_eq!(
        read_all(&log),
        vec![
            (0, "first".into()),
            (1, "ack".into()),
            (2, "delivery".into())
        ]
    );
}

#[tokio::test]
async fn a_lone_deferred_batch_is_synced_after_at_most_defer_max() {
    let fs = SimFs::new();
    let log = open(
        Arc::new(fs.clone()),
        Path::new("/d"),
        deferring(std::time::Duration::from_millis(20)),
    );
    let ticket = log.enqueue_deferred(&[rec("ack")]).unwrap();
    let done = tokio::time::timeout(std::time::Duration::from_secs(30), ticket.wait())
        .await
        .expect("a deferred batch was never written")
        .unwrap();
    assert_eq!(done.base_offset, Offset(0));
    // Complete means durable: it survives a power loss.
    fs.power_loss();
    drop(log);
    let log = open(Arc::new(fs.clone()), Path::new("/d"), LogConfig::default());
    assert_eq!(read_all(&log), vec![(0, "ack".into())]);
}

#[tokio::test]
async fn close_writes_deferred_batches() {
    let fs = SimFs::new();
    let dir = Path::new("/d");
    let log = open(
        Arc::new(fs.clone()),
        dir,
        deferring(std::time::Duration::from_secs(3600)),
    );
    let ticket = log.enqueue_deferred(&[rec("ack")]).unwrap();
    log.close();
    assert_eq!(ticket.wait().await.unwrap().base_offset, Offset(0));
    fs.power_loss();
    let log = open(Arc::new(fs.clone()), dir, LogConfig::default());
    assert_eq!(read_all(&log), vec![(0, "ack".into())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_never_appenders_writing_inline_keep_offset_order_across_rolls() {
    let tmp = tempfile::tempdir().unwrap();
    let config = LogConfig {
        fsync: FsyncMode::Never,
        ..small_config()
    };
    let log = open(Arc::new(OsFs), tmp.path(), config.clone());
    let mut tasks = Vec::new();
    for t in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..40 {
                let batch: Vec<NewRecord> = (0..3).map(|j| rec(&format!("t{t}-{i}-{j}"))).collect();
                let appended = log.append(&batch).await.unwrap();
                for (j, r) in batch.iter().enumerate() {
                    mine.push((appended.base_offset.0 + j as u64, r.payload.clone()));
                }
            }
            mine
        }));
    }
    let mut expected = Vec::new();
    for t in tasks {
        expected.extend(t.await.unwrap());
    }
    expected.sort();
    let expected: Vec<(u64, String)> = expected
        .into_iter()
        .map(|(o, p)| (o, String::from_utf8(p.to_vec()).unwrap()))
        .collect();
    assert_eq!(expected.len(), 16 * 40 * 3);
    assert!(
        expected
            .iter()
            .enumerate()
            .all(|(i, (o, _))| *o == i as u64)
    );
    assert_eq!(read_all(&log), expected);
    assert!(log.stats().segments > 10, "the test must cross rolls");
    log.close();
    let log = open(Arc::new(OsFs), tmp.path(), config);
    assert_eq!(read_all(&log), expected, "reopen sees the same records");
}

#[tokio::test]
async fn one_read_spans_many_refills_and_frames_larger_than_a_refill() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(Arc::new(OsFs), tmp.path(), LogConfig::default());
    // Varied sizes, with a few frames larger than the first 64 KiB refill.
    let payloads: Vec<String> = (0..600)
        .map(|i| {
            let len = if i % 97 == 0 {
                200_000
            } else {
                100 + (i * 37) % 3000
            };
            format!("{i}:").repeat(len / 4 + 1)
        })
        .collect();
    for chunk in payloads.chunks(50) {
        let batch: Vec<NewRecord> = chunk.iter().map(|p| rec(p)).collect();
        log.append(&batch).await.unwrap();
    }
    // Past the tail cache: read from the file.
    log.close();
    let log = open(Arc::new(OsFs), tmp.path(), LogConfig::default());
    let batch = log
        .read(
            Offset(0),
            ReadLimits {
                records_max: 10_000,
                bytes_max: 64 << 20,
            },
        )
        .unwrap();
    let got: Vec<String> = batch
        .records
        .iter()
        .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(got, payloads);
    assert_eq!(batch.next, Offset(600));
    // And from the middle, in small steps.
    let mut from = Offset(250);
    let mut seen = Vec::new();
    while from < Offset(600) {
        let b = log
            .read(
                from,
                ReadLimits {
                    records_max: 7,
                    bytes_max: 1 << 20,
                },
            )
            .unwrap();
        seen.extend(b.records.iter().map(|r| r.offset.0));
        from = b.next;
    }
    assert_eq!(seen, (250..600).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_closed_log_releases_its_files_and_reads_from_them_fail_as_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let config = LogConfig {
        tail_cache_bytes_max: 0,
        ..small_config()
    };
    let log = open(Arc::new(OsFs), tmp.path(), config);
    for i in 0..20 {
        let batch: Vec<NewRecord> = (0..10).map(|j| rec(&format!("m{i}-{j}"))).collect();
        log.append(&batch).await.unwrap();
    }
    assert_eq!(read_all(&log).len(), 200);
    assert!(log.stats().segments > 1);
    log.close();
    let err = log
        .read(
            Offset(0),
            ReadLimits {
                records_max: 10,
                bytes_max: 1 << 20,
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, courier::storage::StorageError::Closed { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("is closed"), "{err}");
    // Reopened from disk, everything is there.
    drop(log);
    let log = open(Arc::new(OsFs), tmp.path(), small_config());
    assert_eq!(read_all(&log).len(), 200);
}

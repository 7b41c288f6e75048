//! A real crash test, in the style of sled's `test_crash_recovery`: the test
//! binary runs itself again as a child process that appends to a log from
//! eight tokio tasks under `FsyncMode::Always` and prints one line for every
//! append that completed. The parent kills the child with SIGKILL at a random
//! moment, reopens the log and checks that every append the child saw
//! complete is present and intact.
//!
//! SIGKILL loses no page cache, so beyond "completed appends survive" the log
//! must also reopen dense (no gaps, no corrupt record) with nothing more than
//! a torn tail cut off.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier::storage::io::OsFs;
use courier::storage::{
    FsyncMode, Log, LogConfig, NewRecord, Offset, ReadLimits, Record, StorageError,
};
use rand::Rng;

/// Set in the child's environment to the log directory: selects child mode.
const CHILD_DIR_ENV: &str = "COURIER_CRASH_CHILD_DIR";
/// Segment size for the child's log (the parent varies it per round).
const CHILD_SEGMENT_ENV: &str = "COURIER_CRASH_SEGMENT_BYTES";
/// Name of the test below, for the child's `--exact` filter.
const TEST_NAME: &str = "sigkill_during_concurrent_appends_loses_no_completed_append";
const TASKS: usize = 8;
/// The child's line once its log is open.
const READY: &str = "courier-crash-child-ready";
const ROUNDS: usize = 3;

fn log_config(segment_bytes_max: u64) -> LogConfig {
    LogConfig {
        segment_bytes_max,
        index_interval_bytes: 1024,
        fsync: FsyncMode::Always,
        ..LogConfig::default()
    }
}

/// Records in append `seq` of task `task`.
fn batch_len(task: usize, seq: u64) -> usize {
    1 + ((task as u64 + seq) % 4) as usize
}

/// Payload of record `i` of append `seq` of task `task`: a header naming it
/// and a filler derived from it, 0 to 400 bytes long.
fn payload(task: usize, seq: u64, i: usize) -> Bytes {
    let mut out = format!("{task}:{seq}:{i}:").into_bytes();
    let mut x = (task as u64) << 48 ^ seq << 8 ^ i as u64;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let len = (x >> 40) as usize % 401;
    out.extend((0..len).map(|j| (x >> (j % 8 * 8)) as u8 ^ j as u8));
    Bytes::from(out)
}

/// FNV-1a, the checksum the child prints for each append.
fn checksum(payloads: impl IntoIterator<Item = Bytes>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in payloads {
        for b in p.iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn batch_checksum(task: usize, seq: u64) -> u64 {
    checksum((0..batch_len(task, seq)).map(|i| payload(task, seq, i)))
}

/// Child mode: append from `TASKS` tasks forever, printing
/// `done TASK SEQ BASE LAST CHECKSUM` for every completed append.
fn child_main(dir: &Path) -> ! {
    let segment_bytes_max = std::env::var(CHILD_SEGMENT_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (log, _) = Log::open(
            Arc::new(OsFs),
            dir,
            log_config(segment_bytes_max),
            Offset(0),
        )
        .expect("child: open the log");
        {
            let mut out = std::io::stdout().lock();
            // libtest may have printed "test NAME ... " without a newline.
            writeln!(out, "\n{READY}").unwrap();
            out.flush().unwrap();
        }
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for seq in 0u64.. {
                    let records: Vec<NewRecord> = (0..batch_len(task, seq))
                        .map(|i| NewRecord {
                            payload: payload(task, seq, i),
                            ..NewRecord::default()
                        })
                        .collect();
                    let a = log.append(&records).await.expect("child: append");
                    let mut out = std::io::stdout().lock();
                    writeln!(
                        out,
                        "done {task} {seq} {} {} {}",
                        a.base_offset.0,
                        a.last_offset.0,
                        batch_checksum(task, seq)
                    )
                    .unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    unreachable!("the child appends until it is killed");
}

/// One completed append, as the child reported it.
#[derive(Debug, Clone, Copy)]
struct Done {
    task: usize,
    seq: u64,
    base: u64,
    last: u64,
    checksum: u64,
}

fn parse_done(line: &str) -> Option<Done> {
    let mut f = line.strip_prefix("done ")?.split(' ');
    let mut next = || f.next()?.trim().parse::<u64>().ok();
    Some(Done {
        task: next()? as usize,
        seq: next()?,
        base: next()?,
        last: next()?,
        checksum: next()?,
    })
}

/// Checks a record's payload against its header; returns (task, seq, i).
fn check_payload(r: &Record) -> (usize, u64, usize) {
    let text = String::from_utf8_lossy(&r.payload);
    let mut parts = text.splitn(4, ':');
    let mut id = || -> u64 {
        parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("record {} has no header: {:?}", r.offset, r.payload))
    };
    let (task, seq, i) = (id() as usize, id(), id() as usize);
    assert_eq!(
        r.payload,
        payload(task, seq, i),
        "record {} ({task}:{seq}:{i}) has a damaged payload",
        r.offset
    );
    (task, seq, i)
}

fn read_all(log: &Log) -> BTreeMap<u64, Record> {
    let mut out = BTreeMap::new();
    let mut from = Offset(0);
    while from < log.next_offset() {
        match log.read(
            from,
            ReadLimits {
                records_max: 1000,
                bytes_max: 1 << 20,
            },
        ) {
            Ok(batch) => {
                assert!(batch.next > from, "read from {from} made no progress");
                for r in batch.records {
                    out.insert(r.offset.0, r);
                }
                from = batch.next;
            }
            Err(e @ StorageError::Corrupt { .. }) => panic!("corrupt records after SIGKILL: {e}"),
            Err(e) => panic!("read from {from} failed: {e}"),
        }
    }
    out
}

/// Runs the child until a random moment 100-500 ms after its log is open,
/// kills it, and returns the appends it reported complete.
fn run_and_kill(dir: &Path, segment_bytes_max: u64, kill_after: Duration) -> Vec<Done> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEGMENT_ENV, segment_bytes_max.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut done = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return done,
                Ok(_) => {}
            }
            // A line cut by the kill has no newline: the append it reports
            // completed, but the report did not, so it promises nothing.
            if !line.ends_with('\n') {
                return done;
            }
            if line.trim_end() == READY {
                let _ = ready_tx.send(());
            } else if let Some(d) = parse_done(&line) {
                done.push(d);
            }
        }
    });
    let started = Instant::now();
    if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child did not open its log within 20 s");
    }
    let ready_after = started.elapsed();
    std::thread::sleep(kill_after);
    if let Some(status) = child.try_wait().unwrap() {
        panic!("the child exited before it was killed: {status}");
    }
    // Child::kill sends SIGKILL on Unix.
    child.kill().expect("SIGKILL the child");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child exited on its own: {status}");
    let done = reader.join().unwrap();
    eprintln!(
        "crash round: segment_bytes_max {segment_bytes_max}, child ready after {ready_after:?}, \
         killed {kill_after:?} later, {} appends reported complete",
        done.len()
    );
    done
}

fn verify(dir: &Path, segment_bytes_max: u64, done: &[Done]) {
    let (log, report) = Log::open(
        Arc::new(OsFs),
        dir,
        log_config(segment_bytes_max),
        Offset(0),
    )
    .unwrap_or_else(|e| panic!("reopen after SIGKILL failed: {e}"));
    eprintln!(
        "  recovery: next offset {}, {} segments, truncated {} bytes, rebuilt {} indexes, findings {:?}",
        log.next_offset(),
        log.stats().segments,
        report.truncated_bytes,
        report.rebuilt_indexes,
        report.findings
    );
    let records = read_all(&log);
    // Dense from 0: a kill loses nothing that reached the page cache.
    let next = log.next_offset().0;
    assert_eq!(records.len() as u64, next, "offsets are not dense");
    if let Some((&last, _)) = records.last_key_value() {
        assert_eq!(last + 1, next);
    }
    // Every record is intact and the records of one append are contiguous.
    let mut seqs_seen: BTreeMap<(usize, u64), Vec<u64>> = BTreeMap::new();
    for r in records.values() {
        let (task, seq, i) = check_payload(r);
        assert_eq!(r.message_id, r.offset.0);
        let offs = seqs_seen.entry((task, seq)).or_default();
        assert_eq!(
            offs.len(),
            i,
            "record {} is {task}:{seq}:{i} out of order",
            r.offset
        );
        if let Some(prev) = offs.last() {
            assert_eq!(*prev + 1, r.offset.0, "append {task}:{seq} is split");
        }
        offs.push(r.offset.0);
    }
    // Every completed append is there, whole, where the child was told.
    for d in done {
        let n = batch_len(d.task, d.seq);
        assert_eq!(d.last - d.base + 1, n as u64, "child report {d:?}");
        assert_eq!(
            d.checksum,
            batch_checksum(d.task, d.seq),
            "child report {d:?}"
        );
        let mut got = Vec::with_capacity(n);
        for (i, offset) in (d.base..=d.last).enumerate() {
            let r = records.get(&offset).unwrap_or_else(|| {
                panic!(
                    "completed append {}:{} lost record {i} at offset {offset} (next offset {next})",
                    d.task, d.seq
                )
            });
            assert_eq!(
                r.payload,
                payload(d.task, d.seq, i),
                "completed append {}:{} has other data at offset {offset}",
                d.task,
                d.seq
            );
            got.push(r.payload.clone());
        }
        assert_eq!(checksum(got), d.checksum);
    }
    // Each task's completed appends are a prefix of what it attempted: the
    // task appends one at a time, so its reports have consecutive seqs.
    for task in 0..TASKS {
        let seqs: Vec<u64> = done
            .iter()
            .filter(|d| d.task == task)
            .map(|d| d.seq)
            .collect();
        assert!(
            seqs.iter().enumerate().all(|(i, s)| *s == i as u64),
            "task {task} reported seqs {seqs:?}"
        );
    }
    // The recovered log takes appends.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = rt
        .block_on(log.append(&[NewRecord {
            payload: payload(99, 0, 0),
            ..NewRecord::default()
        }]))
        .unwrap();
    assert_eq!(a.base_offset, Offset(next));
    log.close();
}

#[test]
fn sigkill_during_concurrent_appends_loses_no_completed_append() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        child_main(&PathBuf::from(dir));
    }
    let mut rng = rand::rng();
    // Segment sizes from "no roll" to "a roll every few dozen appends".
    let segment_sizes = [4 << 20, 64 << 10, 8 << 10];
    let mut total_done = 0;
    for (round, segment_bytes_max) in segment_sizes.into_iter().enumerate().take(ROUNDS) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let kill_after = Duration::from_millis(rng.random_range(100..=500));
        let done = run_and_kill(&dir, segment_bytes_max, kill_after);
        verify(&dir, segment_bytes_max, &done);
        total_done += done.len();
        eprintln!("  round {round}: ok");
    }
    assert!(
        total_done > 0,
        "no append completed in any round: the test checked nothing"
    );
}

//! Storage benchmarks (criterion).
//!
//! - `append_{always,interval10,never}/{payload}B/batch{n}/appenders{c}`:
//!   append throughput in records per second (`Throughput::Elements`), `c`
//!   tokio tasks on a multi-thread runtime each appending batches of `n`
//!   records. Combinations moving more than 16 MiB per iteration are
//!   skipped. The headline figure is
//!   `append_always/256B/batch100/appenders64` (target: >= 500,000 records/s).
//! - `read_sequential/{payload}B`: reading a whole log from offset 0 with
//!   `ReadLimits { records_max: 1000, bytes_max: 1 MiB }`, segments in the
//!   page cache and the tail cache off (`Throughput::Bytes`).
//! - `open/{n}_records` and `open/{n}_records_rebuild_indexes`: time to open
//!   a log of `n` records (default 1,000,000; set
//!   `COURIER_BENCH_OPEN_RECORDS=10000000` for the large run) with its index
//!   files, and with every index file deleted first. The log's size and
//!   `index_memory_bytes()` are printed before the measurement.
//!
//! Files go to a temporary directory under `CARGO_TARGET_TMPDIR` (or
//! `COURIER_BENCH_DIR` if set), removed after each benchmark.
//!
//! ```text
//! cargo bench --bench storage                        # everything, a few minutes
//! cargo bench --bench storage -- append_always       # one group
//! COURIER_BENCH_OPEN_RECORDS=10000000 cargo bench --bench storage -- open/
//! ```

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier::storage::io::OsFs;
use courier::storage::{FsyncMode, Log, LogConfig, NewRecord, Offset, ReadLimits};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const MIB: usize = 1 << 20;

fn bench_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("COURIER_BENCH_DIR") {
        return PathBuf::from(dir);
    }
    option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn bench_dir() -> tempfile::TempDir {
    let root = bench_root();
    std::fs::create_dir_all(&root).unwrap();
    tempfile::Builder::new()
        .prefix("courier-bench-")
        .tempdir_in(root)
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn open(dir: &std::path::Path, config: LogConfig) -> Log {
    Log::open(Arc::new(OsFs), dir, config, Offset(0)).unwrap().0
}

fn batch_of(n: usize, payload_bytes: usize) -> Arc<Vec<NewRecord>> {
    let payload = Bytes::from(vec![0xa5u8; payload_bytes]);
    Arc::new(
        (0..n)
            .map(|_| NewRecord {
                payload: payload.clone(),
                ..NewRecord::default()
            })
            .collect(),
    )
}

/// Appends `total` records of `payload_bytes` in batches of 1000 from one
/// task.
fn fill(rt: &tokio::runtime::Runtime, log: &Log, total: u64, payload_bytes: usize) {
    let batch = batch_of(1000, payload_bytes);
    rt.block_on(async {
        let mut left = total;
        while left > 0 {
            let n = left.min(1000) as usize;
            log.append(&batch[..n]).await.unwrap();
            left -= n as u64;
        }
    });
}

fn mode_name(mode: FsyncMode) -> &'static str {
    match mode {
        FsyncMode::Always => "always",
        FsyncMode::Interval(_) => "interval10",
        FsyncMode::Never => "never",
    }
}

fn append_benches(c: &mut Criterion) {
    let rt = runtime();
    for mode in [FsyncMode::Always, FsyncMode::Interval(10), FsyncMode::Never] {
        let mut group = c.benchmark_group(format!("append_{}", mode_name(mode)));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for payload in [256usize, 4096] {
            for batch in [1usize, 100, 1000] {
                for appenders in [1usize, 64] {
                    if appenders * batch * payload > 16 * MIB {
                        continue;
                    }
                    group.throughput(Throughput::Elements((appenders * batch) as u64));
                    let id = BenchmarkId::from_parameter(format!(
                        "{payload}B/batch{batch}/appenders{appenders}"
                    ));
                    group.bench_function(id, |b| {
                        let dir = bench_dir();
                        let log = open(
                            dir.path(),
                            LogConfig {
                                fsync: mode,
                                ..LogConfig::default()
                            },
                        );
                        let records = batch_of(batch, payload);
                        b.to_async(&rt).iter_custom(|iters| {
                            let log = log.clone();
                            let records = records.clone();
                            async move {
                                let start = Instant::now();
                                let tasks: Vec<_> = (0..appenders)
                                    .map(|_| {
                                        let log = log.clone();
                                        let records = records.clone();
                                        tokio::spawn(async move {
                                            for _ in 0..iters {
                                                black_box(log.append(&records).await.unwrap());
                                            }
                                        })
                                    })
                                    .collect();
                                for t in tasks {
                                    t.await.unwrap();
                                }
                                let elapsed = start.elapsed();
                                // Keep the disk use bounded: drop sealed
                                // segments between samples (not timed).
                                log.truncate_before(log.next_offset()).unwrap();
                                elapsed
                            }
                        });
                        log.close();
                    });
                }
            }
        }
        group.finish();
    }
}

fn read_benches(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("read_sequential");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let limits = ReadLimits {
        records_max: 1000,
        bytes_max: MIB,
    };
    // About 64 MiB of log for each payload size.
    for (payload, records) in [(256usize, 220_000u64), (4096, 16_000)] {
        let dir = bench_dir();
        let config = LogConfig {
            fsync: FsyncMode::Never,
            // Every read goes to the segment files (in the page cache).
            tail_cache_bytes_max: 0,
            ..LogConfig::default()
        };
        {
            let log = open(dir.path(), config.clone());
            fill(&rt, &log, records, payload);
            log.close();
        }
        let log = open(dir.path(), config);
        let read_all = |log: &Log| {
            let mut from = Offset(0);
            let mut bytes = 0u64;
            let end = log.next_offset();
            while from < end {
                let batch = log.read(from, limits).unwrap();
                for r in &batch.records {
                    bytes += r.frame_len() as u64;
                }
                from = batch.next;
                black_box(&batch.records);
            }
            bytes
        };
        // Warm the page cache and learn the byte count.
        let bytes = read_all(&log);
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(BenchmarkId::from_parameter(format!("{payload}B")), |b| {
            b.iter(|| read_all(&log));
        });
        log.close();
    }
    group.finish();
}

fn open_benches(c: &mut Criterion) {
    let records: u64 = std::env::var("COURIER_BENCH_OPEN_RECORDS")
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(1_000_000);
    let payload = 100;
    let rt = runtime();
    let dir = bench_dir();
    let config = LogConfig {
        fsync: FsyncMode::Never,
        ..LogConfig::default()
    };
    let start = Instant::now();
    {
        let log = open(dir.path(), config.clone());
        fill(&rt, &log, records, payload);
        log.close();
    }
    let written = start.elapsed();
    {
        let start = Instant::now();
        let (log, report) =
            Log::open(Arc::new(OsFs), dir.path(), config.clone(), Offset(0)).unwrap();
        let opened = start.elapsed();
        let stats = log.stats();
        eprintln!(
            "open: {records} records of {payload} B payload written in {written:.2?}; \
             {} segments, {} bytes on disk; first open {opened:.2?} \
             (rebuilt {} indexes); index_memory_bytes() = {}",
            stats.segments,
            stats.disk_bytes,
            report.rebuilt_indexes,
            log.index_memory_bytes()
        );
        log.close();
    }
    let mut group = c.benchmark_group("open");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(records));
    group.bench_function(format!("{records}_records"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += timed_open(dir.path(), &config);
            }
            total
        });
    });
    group.bench_function(format!("{records}_records_rebuild_indexes"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for entry in std::fs::read_dir(dir.path()).unwrap() {
                    let path = entry.unwrap().path();
                    if path.extension().is_some_and(|e| e == "idx") {
                        std::fs::remove_file(path).unwrap();
                    }
                }
                total += timed_open(dir.path(), &config);
            }
            total
        });
    });
    group.finish();
}

/// Time to open (recover) the log in `dir`; the log is closed afterwards.
fn timed_open(dir: &std::path::Path, config: &LogConfig) -> Duration {
    let start = Instant::now();
    let (log, _) = Log::open(Arc::new(OsFs), dir, config.clone(), Offset(0)).unwrap();
    let took = start.elapsed();
    black_box(log.next_offset());
    log.close();
    took
}

criterion_group!(benches, append_benches, read_benches, open_benches);
criterion_main!(benches);

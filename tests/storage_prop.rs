//! Property tests of the storage layer:
//!
//! - (a) record framing: encode/decode round trips for arbitrary records, and
//!   every truncation or bit flip of a frame is an error, never a panic or a
//!   different record;
//! - (b) recovery on the OS file system: a multi-segment log whose last
//!   segment is truncated and whose segment files get random bit flips
//!   reopens without panicking, never returns wrong data, and keeps every
//!   record that lies entirely before the damage;
//! - (c) power loss on the simulated page cache: under `FsyncMode::Always`
//!   every append that completed before the power loss survives it.
//!
//! Case counts are kept modest so the file runs in a few seconds in debug
//! builds; set `PROPTEST_CASES` for a longer hunt. Failures are not persisted to a regressions file; proptest prints
//! the minimal failing input instead.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::{Bytes, BytesMut};
use courier::storage::io::{File, Fs, OpenMode, OsFs, SimFs};
use courier::storage::record::{self, FrameError};
use courier::storage::segment::{SEGMENT_HEADER_BYTES, parse_segment_file_name};
use courier::storage::{
    Appended, Attribute, FsyncMode, Log, LogConfig, NewRecord, Offset, ReadLimits, Record,
    StorageError, Target,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// `cases` cases, or `PROPTEST_CASES` from the environment for a longer run
/// (e.g. `PROPTEST_CASES=5000 cargo test --release --test storage_prop`).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// (a) Record framing.
// ---------------------------------------------------------------------------

fn bytes_up_to(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn arb_attribute() -> impl Strategy<Value = Attribute> {
    (bytes_up_to(40), bytes_up_to(200)).prop_map(|(key, value)| Attribute { key, value })
}

fn arb_new_record() -> impl Strategy<Value = NewRecord> {
    (
        any::<Option<u64>>(),
        any::<Option<(u64, bool)>>(),
        prop::collection::vec(arb_attribute(), 0..6),
        bytes_up_to(300),
        bytes_up_to(4096),
    )
        .prop_map(
            |(message_id, target, attributes, ordering_key, payload)| NewRecord {
                message_id,
                target: target.map(|(subscription, replaced)| Target {
                    subscription,
                    replaced,
                }),
                attributes,
                ordering_key,
                payload,
            },
        )
}

fn assert_same_fields(got: &Record, want: &NewRecord, offset: Offset, time_us: u64) {
    assert_eq!(got.offset, offset);
    assert_eq!(got.publish_time_us, time_us);
    assert_eq!(got.message_id, want.message_id.unwrap_or(offset.0));
    assert_eq!(got.target, want.target);
    assert_eq!(got.attributes, want.attributes);
    assert_eq!(got.ordering_key, want.ordering_key);
    assert_eq!(got.payload, want.payload);
    assert_eq!(got.frame_len(), want.frame_len());
}

proptest! {
    #![proptest_config(config(256))]

    /// Encoding then decoding returns every field, at any position in a
    /// buffer with unrelated bytes before and after, and a second frame
    /// right after the first decodes too.
    #[test]
    fn record_round_trips(
        a in arb_new_record(),
        b in arb_new_record(),
        offset in any::<u64>(),
        time_us in any::<u64>(),
        prefix in bytes_up_to(64),
        suffix in bytes_up_to(64),
    ) {
        prop_assert!(record::check_encodable(&a).is_ok());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&prefix);
        record::encode(&mut buf, &a, Offset(offset), time_us);
        prop_assert_eq!(buf.len() - prefix.len(), a.frame_len());
        let second = offset.wrapping_add(1);
        record::encode(&mut buf, &b, Offset(second), time_us);
        buf.extend_from_slice(&suffix);
        let buf = buf.freeze();

        let pos = prefix.len();
        let info = record::check_frame(&buf[pos..]).expect("a frame just encoded checks out");
        prop_assert_eq!(info.frame_len, a.frame_len());
        prop_assert_eq!(info.offset, Offset(offset));
        prop_assert_eq!(info.publish_time_us, time_us);

        let (got, len) = record::decode(&buf, pos).expect("a frame just encoded decodes");
        prop_assert_eq!(len, a.frame_len());
        assert_same_fields(&got, &a, Offset(offset), time_us);

        let (got_b, len_b) = record::decode(&buf, pos + len).expect("second frame decodes");
        prop_assert_eq!(len_b, b.frame_len());
        assert_same_fields(&got_b, &b, Offset(second), time_us);
    }

    /// A frame cut anywhere is `Incomplete`; a frame with any one bit
    /// flipped is an error. Neither panics.
    #[test]
    fn damaged_frames_are_errors(
        r in arb_new_record(),
        cut in any::<Index>(),
        bit in any::<Index>(),
    ) {
        let mut buf = BytesMut::new();
        record::encode(&mut buf, &r, Offset(7), 11);
        let clean = buf.freeze();

        let cut = cut.index(clean.len());
        prop_assert_eq!(
            record::decode(&clean.slice(..cut), 0).unwrap_err(),
            FrameError::Incomplete
        );
        prop_assert_eq!(
            record::check_frame(&clean[..cut]).unwrap_err(),
            FrameError::Incomplete
        );

        let bit = bit.index(clean.len() * 8);
        let mut bad = clean.to_vec();
        bad[bit / 8] ^= 1 << (bit % 8);
        let bad = Bytes::from(bad);
        prop_assert!(record::decode(&bad, 0).is_err(), "flip of bit {} went unnoticed", bit);
    }

    /// Arbitrary bytes never panic the decoder, and whatever it accepts
    /// re-encodes to exactly the bytes it was decoded from.
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512), at in any::<Index>()) {
        let data = Bytes::from(data);
        let pos = at.index(data.len() + 1);
        let _ = record::check_frame(&data[pos..]);
        if let Ok((rec, len)) = record::decode(&data, pos) {
            let again = NewRecord {
                message_id: Some(rec.message_id),
                target: rec.target,
                attributes: rec.attributes.clone(),
                ordering_key: rec.ordering_key.clone(),
                payload: rec.payload.clone(),
            };
            let mut out = BytesMut::new();
            record::encode(&mut out, &again, rec.offset, rec.publish_time_us);
            prop_assert_eq!(&out[..], &data[pos..pos + len]);
        }
    }
}

// ---------------------------------------------------------------------------
// (b) Truncation and bit flips on the OS file system.
// ---------------------------------------------------------------------------

/// Records written to the pristine log: offsets `0..PRISTINE_RECORDS`.
const PRISTINE_RECORDS: u64 = 240;

fn damage_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 2048,
        index_interval_bytes: 128,
        // Rolls sync in every mode and close syncs the tail: the files are
        // complete after close, and writing them is fast.
        fsync: FsyncMode::Never,
        ..LogConfig::default()
    }
}

/// The record the pristine log holds at `offset`: sizes, attributes and
/// ordering keys vary with the offset so frames have different lengths.
fn expected_record(offset: u64) -> NewRecord {
    let len = 4 + (offset.wrapping_mul(37) % 160) as usize;
    let mut payload = Vec::with_capacity(len);
    payload.extend_from_slice(&offset.to_le_bytes()[..4]);
    payload.extend((0..len - 4).map(|i| (offset as usize * 31 + i * 7) as u8));
    let attributes = if offset % 3 == 0 {
        vec![Attribute {
            key: Bytes::from_static(b"seq"),
            value: Bytes::from(offset.to_string()),
        }]
    } else {
        Vec::new()
    };
    let ordering_key = if offset % 5 == 0 {
        Bytes::from(format!("key-{}", offset % 7))
    } else {
        Bytes::new()
    };
    NewRecord {
        message_id: None,
        target: None,
        attributes,
        ordering_key,
        payload: Bytes::from(payload),
    }
}

/// A record appended after recovery, at `offset`.
fn new_record(offset: u64) -> NewRecord {
    NewRecord {
        payload: Bytes::from(format!("new-{offset}")),
        ..NewRecord::default()
    }
}

fn assert_record_is(got: &Record, want: &NewRecord) {
    assert_eq!(got.message_id, got.offset.0, "message id at {}", got.offset);
    assert_eq!(got.target, want.target, "target at {}", got.offset);
    assert_eq!(
        got.attributes, want.attributes,
        "attributes at {}",
        got.offset
    );
    assert_eq!(
        got.ordering_key, want.ordering_key,
        "ordering key at {}",
        got.offset
    );
    assert_eq!(got.payload, want.payload, "payload at {}", got.offset);
}

/// Where a record of the pristine log lies.
#[derive(Debug, Clone, Copy)]
struct RecLoc {
    offset: u64,
    /// Index into `Pristine::files`.
    file: usize,
    start: u64,
    end: u64,
}

#[derive(Debug)]
struct Pristine {
    /// Every file of the log directory: name and contents, sorted by name.
    files: Vec<(String, Vec<u8>)>,
    /// Indexes into `files` of the segment files, in offset order.
    segs: Vec<usize>,
    records: Vec<RecLoc>,
}

/// Writes the pristine log once and keeps its files in memory; each case
/// copies them into a fresh temporary directory.
fn pristine() -> &'static Pristine {
    static PRISTINE: OnceLock<Pristine> = OnceLock::new();
    PRISTINE.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (log, _) =
                Log::open(Arc::new(OsFs), tmp.path(), damage_config(), Offset(0)).unwrap();
            let mut next = 0u64;
            let mut i = 0u64;
            while next < PRISTINE_RECORDS {
                let n = (1 + i % 4).min(PRISTINE_RECORDS - next);
                let batch: Vec<NewRecord> = (next..next + n).map(expected_record).collect();
                let appended = log.append(&batch).await.unwrap();
                assert_eq!(appended.base_offset, Offset(next));
                next += n;
                i += 1;
            }
            log.close();
        });
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let files: Vec<(String, Vec<u8>)> = names
            .into_iter()
            .map(|n| {
                let data = std::fs::read(tmp.path().join(&n)).unwrap();
                (n, data)
            })
            .collect();
        let segs: Vec<usize> = (0..files.len())
            .filter(|&i| parse_segment_file_name(&files[i].0).is_some())
            .collect();
        let mut records = Vec::new();
        for &f in &segs {
            let data = Bytes::from(files[f].1.clone());
            let mut pos = SEGMENT_HEADER_BYTES as usize;
            while pos < data.len() {
                let (rec, len) = record::decode(&data, pos).expect("pristine frames decode");
                records.push(RecLoc {
                    offset: rec.offset.0,
                    file: f,
                    start: pos as u64,
                    end: (pos + len) as u64,
                });
                pos += len;
            }
        }
        let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..PRISTINE_RECORDS).collect::<Vec<_>>());
        assert!(
            segs.len() >= 6,
            "the pristine log should span several segments, has {}",
            segs.len()
        );
        assert!(
            files.iter().any(|(n, _)| n.ends_with(".idx")),
            "sealed segments should have index files"
        );
        Pristine {
            files,
            segs,
            records,
        }
    })
}

#[derive(Debug, Clone)]
struct Damage {
    /// Delete every index file too, so sealed segments are rebuilt by a scan.
    drop_indexes: bool,
    /// Cut the last segment to this fraction of its length.
    truncate_last: Option<f64>,
    /// (segment, byte, bit) to flip in the pristine files; segment and byte
    /// are fractions in `[0, 1)` of the segment count and file length.
    flips: Vec<(f64, f64, u8)>,
    limits: ReadLimits,
}

fn arb_damage() -> impl Strategy<Value = Damage> {
    (
        prop::bool::weighted(0.3),
        prop::option::of(0.0f64..=1.0),
        prop::collection::vec((0.0f64..1.0, 0.0f64..1.0, 0u8..8), 0..4),
        1usize..64,
        prop_oneof![Just(1usize << 20), 1usize..4096],
    )
        .prop_map(
            |(drop_indexes, truncate_last, flips, records_max, bytes_max)| Damage {
                drop_indexes,
                truncate_last,
                flips,
                limits: ReadLimits {
                    records_max,
                    bytes_max,
                },
            },
        )
}

/// Reads the whole log from offset 0, stepping over `Corrupt` regions, and
/// checks every record with `check`. Returns the offsets read.
fn read_everything(
    log: &Log,
    limits: ReadLimits,
    mut check: impl FnMut(&Record),
) -> (BTreeSet<u64>, u32) {
    let mut seen = BTreeSet::new();
    let mut corrupt_errors = 0;
    let mut from = Offset(0);
    let end = log.next_offset();
    let mut steps = 0;
    while from < end {
        steps += 1;
        assert!(steps < 100_000, "reads do not make progress at {from}");
        match log.read(from, limits) {
            Ok(batch) => {
                let mut prev = None;
                for r in &batch.records {
                    assert!(r.offset >= from, "read from {from} returned {}", r.offset);
                    assert!(prev < Some(r.offset), "offsets out of order");
                    prev = Some(r.offset);
                    check(r);
                    assert!(
                        seen.insert(r.offset.0),
                        "offset {} returned twice",
                        r.offset
                    );
                }
                assert!(
                    batch.records.len() <= limits.records_max,
                    "read returned more than records_max"
                );
                if batch.records.is_empty() {
                    assert!(
                        batch.next > from,
                        "empty read from {from} below next offset {end} made no progress"
                    );
                } else {
                    assert_eq!(batch.next, Offset(prev.unwrap().0 + 1));
                }
                from = batch.next;
            }
            Err(StorageError::Corrupt {
                first,
                next_readable,
                ..
            }) => {
                corrupt_errors += 1;
                assert!(first >= from, "corrupt region {first} starts before {from}");
                assert!(
                    next_readable > from,
                    "corrupt region at {from} gives no way forward ({next_readable})"
                );
                from = next_readable;
            }
            Err(e) => panic!("unexpected error reading from {from}: {e}"),
        }
    }
    (seen, corrupt_errors)
}

/// The element of `0..len` at fraction `frac` of the way.
fn pick(frac: f64, len: usize) -> usize {
    ((frac * len as f64) as usize).min(len - 1)
}

fn damage_case(damage: &Damage) {
    let p = pristine();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut files: Vec<Vec<u8>> = p.files.iter().map(|(_, d)| d.clone()).collect();
    // First damaged byte of each file (u64::MAX: undamaged).
    let mut damage_at = vec![u64::MAX; files.len()];
    for (seg, byte, bit) in &damage.flips {
        let f = p.segs[pick(*seg, p.segs.len())];
        let pos = pick(*byte, files[f].len());
        files[f][pos] ^= 1 << bit;
        damage_at[f] = damage_at[f].min(pos as u64);
    }
    let last = *p.segs.last().unwrap();
    if let Some(frac) = damage.truncate_last {
        let cut = ((files[last].len() as f64 * frac) as usize).min(files[last].len());
        files[last].truncate(cut);
        damage_at[last] = damage_at[last].min(cut as u64);
    }
    for (i, (name, _)) in p.files.iter().enumerate() {
        if damage.drop_indexes && name.ends_with(".idx") {
            continue;
        }
        std::fs::write(dir.join(name), &files[i]).unwrap();
    }
    let intact: BTreeSet<u64> = p
        .records
        .iter()
        .filter(|r| r.end <= damage_at[r.file])
        .map(|r| r.offset)
        .collect();

    // First open: recovery.
    let (log, _report) = Log::open(Arc::new(OsFs), dir, damage_config(), Offset(0))
        .unwrap_or_else(|e| panic!("reopen of a damaged log failed: {e}"));
    let check_old = |r: &Record| {
        assert!(
            r.offset.0 < PRISTINE_RECORDS,
            "offset {} was never written",
            r.offset
        );
        assert_record_is(r, &expected_record(r.offset.0));
    };
    let (seen, _) = read_everything(&log, damage.limits, check_old);
    let missing: Vec<(u64, &str, u64, u64)> = p
        .records
        .iter()
        .filter(|r| intact.contains(&r.offset) && !seen.contains(&r.offset))
        .map(|r| (r.offset, p.files[r.file].0.as_str(), r.start, r.end))
        .collect();
    assert!(
        missing.is_empty(),
        "records before the damage are missing (offset, file, start, end): {missing:?}; \
         first damaged byte per file: {:?}",
        p.files
            .iter()
            .zip(&damage_at)
            .filter(|(_, d)| **d != u64::MAX)
            .map(|((n, _), d)| (n.as_str(), *d))
            .collect::<Vec<_>>()
    );
    // Random access: each intact record can be read on its own.
    for &o in intact.iter().step_by(7) {
        let batch = log
            .read(
                Offset(o),
                ReadLimits {
                    records_max: 1,
                    bytes_max: 1,
                },
            )
            .unwrap_or_else(|e| panic!("read of intact record {o} failed: {e}"));
        assert_eq!(batch.records.len(), 1, "read of intact record {o}");
        assert_eq!(batch.records[0].offset, Offset(o));
        assert_record_is(&batch.records[0], &expected_record(o));
    }

    // The recovered log takes appends and keeps them across another open,
    // which finds nothing left to truncate.
    let resume = log.next_offset();
    assert!(
        seen.last().is_none_or(|&l| l < resume.0),
        "next offset {resume} is not past the last readable record"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let new: Vec<NewRecord> = (resume.0..resume.0 + 3).map(new_record).collect();
    let appended = rt.block_on(log.append(&new)).unwrap();
    assert_eq!(appended.base_offset, resume);
    log.close();
    drop(log);

    let (log, report) = Log::open(Arc::new(OsFs), dir, damage_config(), Offset(0))
        .unwrap_or_else(|e| panic!("second reopen failed: {e}"));
    assert_eq!(
        report.truncated_bytes, 0,
        "second open truncated again: {:?}",
        report.findings
    );
    let check_all = |r: &Record| {
        if r.offset >= resume {
            assert_record_is(r, &new_record(r.offset.0));
        } else {
            check_old(r);
        }
    };
    let (seen2, _) = read_everything(&log, damage.limits, check_all);
    let mut want = seen.clone();
    want.extend(resume.0..resume.0 + 3);
    assert_eq!(seen2, want, "second open reads a different set of records");
}

proptest! {
    #![proptest_config(config(64))]

    /// Truncation of the last segment and bit flips anywhere in segment
    /// files: reopening never panics, no read returns wrong data, and every
    /// record entirely before the first damaged byte of its file is read.
    #[test]
    fn damaged_segments_recover_without_wrong_data(damage in arb_damage()) {
        damage_case(&damage);
    }
}

/// The same checks on a few fixed damages, so they run regardless of what
/// the random cases hit.
#[test]
fn fixed_damages_recover() {
    let p = pristine();
    let n = p.segs.len();
    let seg = |i: usize| (i as f64 + 0.5) / n as f64;
    let at = |frac: f64| frac;
    let limits = ReadLimits {
        records_max: 10,
        bytes_max: 1 << 20,
    };
    let cases = [
        // Nothing but a clean truncation at each interesting place.
        (false, Some(0.0), vec![]),
        (false, Some(0.01), vec![]),
        (false, Some(0.5), vec![]),
        (false, Some(1.0), vec![]),
        // A header flip in a sealed segment and in the last one.
        (false, None, vec![(seg(1), at(0.0), 3)]),
        (false, None, vec![(seg(n - 1), at(0.0), 0)]),
        // Flips in the middle of sealed segments, with and without indexes.
        (
            false,
            None,
            vec![(seg(0), at(0.5), 1), (seg(2), at(0.9), 7)],
        ),
        (true, None, vec![(seg(0), at(0.5), 1), (seg(2), at(0.9), 7)]),
        (true, Some(0.3), vec![(seg(n - 1), at(0.6), 2)]),
    ];
    for (drop_indexes, truncate_last, flips) in cases {
        damage_case(&Damage {
            drop_indexes,
            truncate_last,
            flips,
            limits,
        });
    }
}

// ---------------------------------------------------------------------------
// (c) Power loss on the simulated page cache.
// ---------------------------------------------------------------------------

/// A [`SimFs`] view that can be killed: `crash` takes the power away under a
/// write lock, and every operation through this view afterwards fails, so
/// the old log's writer cannot touch the "disk" once the power is gone.
/// Reopening uses a fresh view of the same `SimFs`.
#[derive(Debug, Clone)]
struct KillableFs {
    sim: SimFs,
    gate: Arc<RwLock<bool>>,
}

#[derive(Debug)]
struct KillableFile {
    inner: Arc<dyn File>,
    gate: Arc<RwLock<bool>>,
}

impl KillableFs {
    fn new(sim: SimFs) -> Self {
        Self {
            sim,
            gate: Arc::new(RwLock::new(false)),
        }
    }

    /// Cuts the power: waits for operations in flight, then drops every
    /// unsynced write; later operations through this view fail.
    fn crash(&self) {
        let mut dead = self.gate.write().unwrap();
        *dead = true;
        self.sim.power_loss();
    }

    fn with<T>(&self, f: impl FnOnce(&SimFs) -> io::Result<T>) -> io::Result<T> {
        let dead = self.gate.read().unwrap();
        if *dead {
            return Err(dead_err());
        }
        f(&self.sim)
    }
}

fn dead_err() -> io::Error {
    io::Error::other("power is off")
}

impl File for KillableFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let dead = self.gate.read().unwrap();
        if *dead {
            return Err(dead_err());
        }
        self.inner.read_at(buf, pos)
    }
    fn write_at(&self, data: &[u8], pos: u64) -> io::Result<()> {
        let dead = self.gate.read().unwrap();
        if *dead {
            return Err(dead_err());
        }
        self.inner.write_at(data, pos)
    }
    fn len(&self) -> io::Result<u64> {
        let dead = self.gate.read().unwrap();
        if *dead {
            return Err(dead_err());
        }
        self.inner.len()
    }
    fn sync_data(&self) -> io::Result<()> {
        let dead = self.gate.read().unwrap();
        if *dead {
            return Err(dead_err());
        }
        self.inner.sync_data()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        let dead = self.gate.read().unwrap();
        if *dead {
            return Err(dead_err());
        }
        self.inner.truncate(len)
    }
    fn reserve(&self, len: u64) -> io::Result<()> {
        let dead = self.gate.read().unwrap();
        if *dead {
            return Err(dead_err());
        }
        self.inner.reserve(len)
    }
}

impl Fs for KillableFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let inner = self.with(|s| s.open(path, mode))?;
        Ok(Arc::new(KillableFile {
            inner,
            gate: self.gate.clone(),
        }))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.with(|s| s.create_dir_all(path))
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.with(|s| s.list_dir(path))
    }
    fn exists(&self, path: &Path) -> bool {
        self.with(|s| Ok(s.exists(path))).unwrap_or(false)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.with(|s| s.rename(from, to))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.with(|s| s.remove_file(path))
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.with(|s| s.remove_dir_all(path))
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.with(|s| s.sync_dir(path))
    }
}

/// Payload of record `i` of append `seq` of task `task`: a readable header
/// and a filler derived from it, so any record read back can be checked on
/// its own.
fn sim_payload(task: usize, seq: usize, i: usize) -> Bytes {
    let head = format!("{task}:{seq}:{i}:");
    let h = (task * 1_000_003 + seq * 7919 + i * 104_729) as u64;
    let len = (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize; // 0..=255
    let mut out = head.into_bytes();
    out.extend((0..len).map(|j| (h as usize + j * 13) as u8));
    Bytes::from(out)
}

/// Checks that `payload` is exactly what [`sim_payload`] gives for the ids
/// in its header; returns the ids.
fn check_sim_payload(payload: &Bytes) -> (usize, usize, usize) {
    let text = String::from_utf8_lossy(payload);
    let mut parts = text.splitn(4, ':');
    let mut id = || -> usize {
        parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("payload without a header: {payload:?}"))
    };
    let (task, seq, i) = (id(), id(), id());
    assert_eq!(
        payload,
        &sim_payload(task, seq, i),
        "payload of {task}:{seq}:{i} is damaged"
    );
    (task, seq, i)
}

fn sim_config(fsync: FsyncMode) -> LogConfig {
    LogConfig {
        segment_bytes_max: 2048,
        index_interval_bytes: 128,
        fsync,
        ..LogConfig::default()
    }
}

#[derive(Debug, Default)]
struct CrashState {
    /// (task, seq, records, where) of every append that completed before
    /// the power loss.
    completed: Vec<(usize, usize, usize, Appended)>,
    crashed: bool,
}

fn power_loss_case(fsync: FsyncMode, plan: &[Vec<usize>], k_frac: f64) {
    let total: usize = plan.iter().map(Vec::len).sum();
    let k = 1 + ((k_frac * total as f64) as usize).min(total - 1);
    let sim = SimFs::new();
    let dir = Path::new("/prop/log");
    let config = sim_config(fsync);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let completed = rt.block_on(async {
        let fs = KillableFs::new(sim.clone());
        let (log, _) = Log::open(Arc::new(fs.clone()), dir, config.clone(), Offset(0)).unwrap();
        let state = Arc::new(Mutex::new(CrashState::default()));
        let mut handles = Vec::new();
        for (task, batches) in plan.iter().cloned().enumerate() {
            let log = log.clone();
            let state = state.clone();
            let fs = fs.clone();
            handles.push(tokio::spawn(async move {
                for (seq, n) in batches.into_iter().enumerate() {
                    if state.lock().unwrap().crashed {
                        return;
                    }
                    let recs: Vec<NewRecord> = (0..n)
                        .map(|i| NewRecord {
                            payload: sim_payload(task, seq, i),
                            ..NewRecord::default()
                        })
                        .collect();
                    let Ok(appended) = log.append(&recs).await else {
                        return;
                    };
                    let mut st = state.lock().unwrap();
                    if st.crashed {
                        return;
                    }
                    st.completed.push((task, seq, n, appended));
                    if st.completed.len() == k {
                        // The power goes at the k-th completion, with the
                        // other tasks' appends in flight.
                        fs.crash();
                        st.crashed = true;
                        return;
                    }
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        {
            let mut st = state.lock().unwrap();
            if !st.crashed {
                fs.crash();
                st.crashed = true;
            }
        }
        log.close();
        std::mem::take(&mut state.lock().unwrap().completed)
    });
    drop(rt);

    let (log, report) = Log::open(
        Arc::new(KillableFs::new(sim.clone())),
        dir,
        config,
        Offset(0),
    )
    .unwrap_or_else(|e| panic!("reopen after power loss failed: {e}"));
    let mut got: BTreeMap<u64, Record> = BTreeMap::new();
    let (seen, corrupt) = read_everything(
        &log,
        ReadLimits {
            records_max: 37,
            bytes_max: 1 << 20,
        },
        |r| {
            check_sim_payload(&r.payload);
            got.insert(r.offset.0, r.clone());
        },
    );
    assert_eq!(
        corrupt, 0,
        "a power loss left corrupt records: {:?}",
        report.findings
    );
    // Nothing but a tail can go: offsets are dense from 0.
    let dense: BTreeSet<u64> = (0..log.next_offset().0).collect();
    assert_eq!(seen, dense, "offsets are not dense after power loss");
    // Records of one append stay together and in order.
    for r in got.values() {
        let (task, seq, i) = check_sim_payload(&r.payload);
        if i > 0 {
            let prev = got
                .get(&(r.offset.0 - 1))
                .unwrap_or_else(|| panic!("record {task}:{seq}:{i} without its predecessor"));
            assert_eq!(check_sim_payload(&prev.payload), (task, seq, i - 1));
        }
    }
    if fsync == FsyncMode::Always {
        for (task, seq, n, appended) in &completed {
            assert_eq!(
                appended.last_offset.0 - appended.base_offset.0 + 1,
                *n as u64
            );
            for i in 0..*n {
                let offset = appended.base_offset.0 + i as u64;
                let rec = got.get(&offset).unwrap_or_else(|| {
                    panic!(
                        "completed append {task}:{seq} lost record {i} at offset {offset} \
                         ({} completed, next offset {})",
                        completed.len(),
                        log.next_offset()
                    )
                });
                assert_eq!(rec.payload, sim_payload(*task, *seq, i));
            }
        }
    }
}

/// Regression: `SimFile::sync_data` used to take the file-system lock while
/// holding its inode's lock, and `SimFs::power_loss` takes them the other
/// way round, so a power loss during a sync deadlocked (and with it
/// `tests/storage_log.rs::power_loss_keeps_every_completed_append_under_always`
/// hung most of the time).
#[test]
fn sim_power_loss_during_sync_does_not_deadlock() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let file = fs.open(&dir.join("f"), OpenMode::CreateNew).unwrap();
        fs.sync_dir(dir).unwrap();
        let syncer = std::thread::spawn(move || {
            for i in 0..20_000u64 {
                file.write_at(&i.to_le_bytes(), 0).unwrap();
                file.sync_data().unwrap();
            }
        });
        for _ in 0..20_000 {
            fs.power_loss();
        }
        syncer.join().unwrap();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("SimFs deadlocked: power_loss racing sync_data");
}

fn arb_fsync() -> impl Strategy<Value = FsyncMode> {
    prop_oneof![
        4 => Just(FsyncMode::Always),
        1 => Just(FsyncMode::Interval(1)),
        1 => Just(FsyncMode::Never),
    ]
}

proptest! {
    #![proptest_config(config(48))]

    /// Concurrent appends, then a power loss at the k-th completion: under
    /// `always` every completed append survives; in every mode the log
    /// reopens dense, with no corrupt or damaged record.
    #[test]
    fn power_loss_keeps_completed_appends(
        fsync in arb_fsync(),
        plan in prop::collection::vec(prop::collection::vec(1usize..=5, 1..25), 1..=4),
        k_frac in 0.0f64..1.0,
    ) {
        power_loss_case(fsync, &plan, k_frac);
    }
}

#[test]
fn power_loss_at_the_last_completion_keeps_everything() {
    let plan: Vec<Vec<usize>> = (0..4).map(|t| vec![1 + t; 20]).collect();
    power_loss_case(FsyncMode::Always, &plan, 0.999);
}

//! Fuzz target: recovery and reads of segment files with arbitrary contents.
//!
//! The input builds one or two segment files on a `SimFs` under `/fuzz`,
//! each a valid header (`segment::encode_header`) followed by a body, then
//! `Log::open`s the directory, reads everything (stepping over `Corrupt`
//! regions), appends one record, closes, opens again and reads again.
//!
//! The first input byte holds flags:
//! - bit 0: two segments (the first one sealed, the second the active one);
//! - bit 1: structured: the bodies are valid frames generated from the
//!   input, then damaged by edits from the input (byte XORs and a possible
//!   truncation), so recovery and the read path meet realistic damage;
//!   otherwise the rest of the input is the raw body;
//! - bit 2: (structured, two segments) also write a correct index file for
//!   the sealed segment, so it is trusted and damage is found by reads
//!   rather than by the recovery scan (no truncation in this mode);
//! - bits 3..7: read limits.
//!
//! Checks, besides "never panics":
//! - open never fails (nothing here is an I/O error);
//! - reads make progress, return offsets in order and at or after `from`,
//!   and `Corrupt` errors point forward;
//! - structured inputs: every record read is exactly the record generated at
//!   that offset (unless the edits forged a frame with a valid CRC), and
//!   every record lying entirely before the first damaged byte is read;
//! - when the layout is one a real log can have, the second open truncates
//!   nothing and reads what the first did plus the appended record.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use courier::storage::io::{Fs, OpenMode, SimFs};
use courier::storage::record;
use courier::storage::segment::{self, IndexBuilder, SEGMENT_HEADER_BYTES};
use courier::storage::{
    Attribute, FsyncMode, Log, LogConfig, NewRecord, Offset, ReadLimits, Record, StorageError,
};
use libfuzzer_sys::fuzz_target;

const FLAG_TWO_SEGMENTS: u8 = 1;
const FLAG_STRUCTURED: u8 = 2;
const FLAG_INDEX: u8 = 4;
const INDEX_INTERVAL: u64 = 64;

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: INDEX_INTERVAL,
        fsync: FsyncMode::Never,
        tail_cache_bytes_max: 0,
        ..LogConfig::default()
    }
}

/// What the files hold and what reads may return.
struct Layout {
    /// (base offset, body after the header) of each segment.
    segments: Vec<(Offset, Vec<u8>)>,
    /// Index file for the first segment, if any.
    index: Option<Vec<u8>>,
    /// Structured inputs: the generated records by offset, and which of
    /// them lie entirely before the first damaged byte.
    expected: Option<BTreeMap<u64, Record>>,
    intact: Vec<u64>,
    /// Whether a real log could be in this state (offsets of the second
    /// segment follow the first's), so re-opening must be a no-op.
    realistic: bool,
}

fn raw_layout(flags: u8, rest: &[u8]) -> Layout {
    if flags & FLAG_TWO_SEGMENTS == 0 || rest.len() < 3 {
        return Layout {
            segments: vec![(Offset(0), rest.to_vec())],
            index: None,
            expected: None,
            intact: Vec::new(),
            realistic: true,
        };
    }
    let split = usize::from(u16::from_le_bytes([rest[0], rest[1]])) % (rest.len() - 2);
    let base2 = u64::from(rest[2]).max(1);
    let body = &rest[3..];
    let split = split.min(body.len());
    Layout {
        segments: vec![
            (Offset(0), body[..split].to_vec()),
            (Offset(base2), body[split..].to_vec()),
        ],
        index: None,
        expected: None,
        intact: Vec::new(),
        realistic: false,
    }
}

fn structured_layout(flags: u8, rest: &[u8]) -> Layout {
    let n = rest.first().map_or(0, |b| usize::from(*b % 48));
    let sizes: Vec<u8> = rest.iter().skip(1).take(n).copied().collect();
    let n = sizes.len();
    let edits = rest.get(1 + n..).unwrap_or(&[]);
    let two = flags & FLAG_TWO_SEGMENTS != 0 && n >= 2;
    let with_index = two && flags & FLAG_INDEX != 0;
    let k = if two { n / 2 } else { n };

    // Generate the frames: offsets 0..n, segment 0 holds 0..k.
    let mut stream = BytesMut::new();
    let mut starts = Vec::with_capacity(n + 1);
    let mut boundary = 0;
    for (i, size) in sizes.iter().enumerate() {
        if i == k {
            boundary = stream.len();
        }
        starts.push(stream.len());
        let attributes = if size & 1 == 1 {
            vec![Attribute {
                key: Bytes::from_static(b"a"),
                value: Bytes::from(vec![*size; usize::from(size % 7)]),
            }]
        } else {
            Vec::new()
        };
        let rec = NewRecord {
            message_id: (size & 4 != 0).then_some(u64::from(*size) << 32),
            target: (size & 8 != 0).then_some(u64::from(*size)),
            attributes,
            ordering_key: if size & 2 != 0 {
                Bytes::from_static(b"key")
            } else {
                Bytes::new()
            },
            payload: Bytes::from(vec![i as u8; usize::from(*size) * 3]),
        };
        record::encode(&mut stream, &rec, Offset(i as u64), 1_000 + i as u64 * 10);
    }
    if k == n {
        boundary = stream.len();
    }
    starts.push(stream.len());
    let pristine = stream.freeze();
    let mut expected = BTreeMap::new();
    for (i, &start) in starts[..n].iter().enumerate() {
        let (rec, _) = record::decode(&pristine, start).expect("generated frame");
        expected.insert(i as u64, rec);
    }

    // Index of the sealed segment, from the undamaged frames.
    let index = with_index.then(|| {
        let mut builder = IndexBuilder::new(INDEX_INTERVAL);
        for i in 0..k {
            builder.observe(
                Offset(0),
                Offset(i as u64),
                SEGMENT_HEADER_BYTES + starts[i] as u64,
                expected[&(i as u64)].publish_time_us,
            );
        }
        let max_time = k
            .checked_sub(1)
            .map_or(0, |l| expected[&(l as u64)].publish_time_us);
        segment::encode_index(
            SEGMENT_HEADER_BYTES + boundary as u64,
            Offset(k as u64),
            Offset(0),
            max_time,
            &builder.entries,
        )
        .to_vec()
    });

    // Damage: XOR edits, and a truncation for a zero XOR (not with an
    // index: a sealed segment's length always matches its index).
    let mut damaged = pristine.to_vec();
    let mut first_damage = usize::MAX;
    for e in edits.chunks_exact(3) {
        if damaged.is_empty() {
            break;
        }
        let pos = usize::from(u16::from_le_bytes([e[0], e[1]])) % damaged.len();
        if e[2] != 0 {
            damaged[pos] ^= e[2];
            first_damage = first_damage.min(pos);
        } else if !with_index {
            damaged.truncate(pos);
            first_damage = first_damage.min(pos);
        }
    }

    // A frame at a generated position that still checks out but differs
    // was forged by the edits: then reads may return it, rightly.
    let damaged_bytes = Bytes::from(damaged.clone());
    let forged = (0..n).any(|i| {
        starts[i] < damaged_bytes.len()
            && matches!(record::decode(&damaged_bytes, starts[i]),
                Ok((rec, _)) if rec != expected[&(i as u64)])
    });
    let intact = (0..n)
        .filter(|&i| starts[i + 1] <= first_damage)
        .map(|i| i as u64)
        .collect();

    let cut = boundary.min(damaged.len());
    let mut segments = vec![(Offset(0), damaged[..cut].to_vec())];
    if two {
        segments.push((Offset(k as u64), damaged[cut..].to_vec()));
    }
    Layout {
        segments,
        index,
        expected: (!forged).then_some(expected),
        intact,
        realistic: !forged,
    }
}

/// Reads the whole log, checking the read invariants; returns the records.
fn read_all(log: &Log, limits: ReadLimits) -> BTreeMap<u64, Record> {
    let mut out = BTreeMap::new();
    let mut from = Offset(0);
    let end = log.next_offset();
    let mut steps = 0u32;
    while from < end {
        steps += 1;
        assert!(steps < 1_000_000, "reads make no progress at {from}");
        match log.read(from, limits) {
            Ok(batch) => {
                let mut prev = None;
                for r in batch.records {
                    assert!(r.offset >= from && prev < Some(r.offset));
                    prev = Some(r.offset);
                    assert!(out.insert(r.offset.0, r).is_none(), "offset read twice");
                }
                assert!(batch.next > from, "read from {from} made no progress");
                from = batch.next;
            }
            Err(StorageError::Corrupt {
                first,
                next_readable,
                ..
            }) => {
                assert!(first >= from && next_readable > from);
                from = next_readable;
            }
            Err(e) => panic!("unexpected error reading from {from}: {e}"),
        }
    }
    out
}

fn run(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let layout = if flags & FLAG_STRUCTURED != 0 {
        structured_layout(flags, rest)
    } else {
        raw_layout(flags, rest)
    };
    let limits = ReadLimits {
        records_max: 1 + usize::from(flags >> 3 & 7) * 5,
        bytes_max: if flags & 0x40 != 0 { 1 } else { 1 << 20 },
    };

    let fs = SimFs::new();
    let dir = Path::new("/fuzz");
    fs.create_dir_all(dir).unwrap();
    for (base, body) in &layout.segments {
        let path = dir.join(segment::segment_file_name(*base));
        let file = fs.open(&path, OpenMode::CreateNew).unwrap();
        file.write_at(&segment::encode_header(*base), 0).unwrap();
        file.write_at(body, SEGMENT_HEADER_BYTES).unwrap();
        file.sync_data().unwrap();
    }
    if let Some(index) = &layout.index {
        segment::write_index(&fs, dir, Offset(0), index).unwrap();
    }
    fs.sync_dir(dir).unwrap();

    let (log, _report) = Log::open(Arc::new(fs.clone()), dir, log_config(), Offset(0))
        .expect("open of a damaged log failed");
    let first = read_all(&log, limits);
    if let Some(expected) = &layout.expected {
        for (offset, rec) in &first {
            assert_eq!(Some(rec), expected.get(offset), "wrong record at {offset}");
        }
        for offset in &layout.intact {
            assert!(
                first.contains_key(offset),
                "record {offset} before the damage is lost"
            );
        }
    }

    // Append after recovery, then open again.
    let next = log.next_offset();
    let appended = NewRecord {
        payload: Bytes::from_static(b"after recovery"),
        ..NewRecord::default()
    };
    drop(
        log.enqueue(std::slice::from_ref(&appended))
            .expect("enqueue after recovery"),
    );
    log.close();
    drop(log);

    let (log, report) =
        Log::open(Arc::new(fs.clone()), dir, log_config(), Offset(0)).expect("second open failed");
    let second = read_all(&log, limits);
    if layout.realistic {
        assert_eq!(
            report.truncated_bytes, 0,
            "second open truncated: {:?}",
            report.findings
        );
        assert_eq!(log.next_offset(), Offset(next.0 + 1));
        let mut want = first.clone();
        let last = second.get(&next.0).expect("appended record is lost");
        assert_eq!(last.payload, appended.payload);
        want.insert(next.0, last.clone());
        assert_eq!(second, want, "second open reads differently");
    }
    log.close();
}

fuzz_target!(|data: &[u8]| run(data));

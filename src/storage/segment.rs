//! Segment files and their indexes: the on-disk unit of a log.
//!
//! A segment is one file named by its first offset (`{base:020}.seg`): a
//! 24-byte header (magic, format version, base offset, CRC of the header)
//! followed by record frames with dense, consecutive offsets. Only the last
//! segment of a log (the active one) is ever appended to; rolling seals it
//! (fsync, write its index file) and starts the next.
//!
//! Safety properties and how they are kept:
//! - A record is only ever returned after its CRC and framing checked out
//!   and its offset is the one its position implies (see [`scan`]).
//! - A torn or corrupt tail of the active segment is found on open by
//!   scanning every frame and is truncated to the last valid record; the
//!   dropped byte count is reported to the caller, who logs it.
//! - A sealed segment's index file (`{base:020}.idx`) records the segment
//!   length it describes and a CRC over its entries; if either disagrees with
//!   the segment, the index is rebuilt from the segment by a scan.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::storage::Offset;
use crate::storage::error::{Result, StorageError};
use crate::storage::io::{File, Fs, OpenMode};
use crate::storage::record::{self, FrameError};

/// Bytes of the segment header.
pub const SEGMENT_HEADER_BYTES: u64 = 24;
const SEGMENT_MAGIC: &[u8; 8] = b"CRSEGMNT";
const INDEX_MAGIC: &[u8; 8] = b"CRSEGIDX";
/// Version of the segment and index formats in docs/storage.md.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of one index entry on disk and in memory.
pub const INDEX_ENTRY_BYTES: usize = 16;
const INDEX_HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 4 + 4;
/// How many bytes a recovery scan reads at a time.
const SCAN_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// File name of the segment whose first offset is `base`.
pub fn segment_file_name(base: Offset) -> String {
    format!("{:020}.seg", base.0)
}

/// File name of the index of the segment whose first offset is `base`.
pub fn index_file_name(base: Offset) -> String {
    format!("{:020}.idx", base.0)
}

/// Parses a segment file name back to its base offset.
pub fn parse_segment_file_name(name: &str) -> Option<Offset> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Offset)
}

/// One sparse index entry: the record at `rel_offset` from the segment's
/// base starts at byte `pos` and was published at `time_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub rel_offset: u32,
    pub pos: u32,
    pub time_us: u64,
}

/// Encodes a segment header for `base`.
pub fn encode_header(base: Offset) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&base.0.to_le_bytes());
    let crc = crc32fast::hash(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns why it is bad, if it is.
pub fn check_header(h: &[u8], base: Offset) -> std::result::Result<(), &'static str> {
    if h.len() < SEGMENT_HEADER_BYTES as usize {
        return Err("header is torn");
    }
    if &h[0..8] != SEGMENT_MAGIC {
        return Err("bad magic");
    }
    let crc = u32::from_le_bytes(h[20..24].try_into().expect("4 bytes"));
    if crc32fast::hash(&h[0..20]) != crc {
        return Err("header CRC mismatch");
    }
    if u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) != FORMAT_VERSION {
        return Err("unsupported format version");
    }
    if u64::from_le_bytes(h[12..20].try_into().expect("8 bytes")) != base.0 {
        return Err("base offset disagrees with the file name");
    }
    Ok(())
}

/// Builds the index as records are appended: one entry at the first record
/// and then one whenever `interval_bytes` have passed since the last entry.
#[derive(Debug, Clone)]
pub struct IndexBuilder {
    pub entries: Vec<IndexEntry>,
    interval_bytes: u64,
    last_pos: Option<u64>,
}

impl IndexBuilder {
    pub fn new(interval_bytes: u64) -> Self {
        Self {
            entries: Vec::new(),
            interval_bytes,
            last_pos: None,
        }
    }

    pub fn from_entries(entries: Vec<IndexEntry>, interval_bytes: u64) -> Self {
        let last_pos = entries.last().map(|e| u64::from(e.pos));
        Self {
            entries,
            interval_bytes,
            last_pos,
        }
    }

    /// Keeps only the first `entries` entries (a write was undone).
    pub fn truncate(&mut self, entries: usize) {
        self.entries.truncate(entries);
        self.last_pos = self.entries.last().map(|e| u64::from(e.pos));
    }

    /// Notes a record at `pos`; adds an entry if the interval has passed.
    pub fn observe(&mut self, base: Offset, offset: Offset, pos: u64, time_us: u64) {
        let due = match self.last_pos {
            None => true,
            Some(last) => pos - last >= self.interval_bytes,
        };
        if due {
            self.entries.push(IndexEntry {
                rel_offset: u32::try_from(offset.0 - base.0).expect("segment offsets fit u32"),
                pos: u32::try_from(pos).expect("segment size fits u32"),
                time_us,
            });
            self.last_pos = Some(pos);
        }
    }
}

/// What a scan of a segment found.
#[derive(Debug)]
pub struct ScanResult {
    /// Bytes of valid data, header included.
    pub valid_len: u64,
    /// Offset after the last valid record.
    pub next: Offset,
    pub max_time_us: u64,
    pub index: Vec<IndexEntry>,
    /// Why the scan stopped before the end of the file, if it did.
    pub stop_reason: Option<&'static str>,
}

/// Scans a segment from its header to the end of the first invalid or
/// incomplete frame, checking every CRC and that offsets are consecutive
/// from `base`.
pub fn scan(
    file: &dyn File,
    base: Offset,
    file_len: u64,
    index_interval_bytes: u64,
) -> std::io::Result<ScanResult> {
    let mut builder = IndexBuilder::new(index_interval_bytes);
    let mut window = ScanWindow::default();
    let mut pos = SEGMENT_HEADER_BYTES;
    let mut next = base;
    let mut max_time_us = 0;
    let mut stop_reason = None;
    while pos < file_len {
        let head = window.get(file, pos, record::FRAME_HEADER_BYTES, file_len)?;
        if head.len() < record::FRAME_HEADER_BYTES {
            stop_reason = Some("torn frame at end of file");
            break;
        }
        let declared = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
        if declared > record::FRAME_BODY_BYTES_MAX {
            stop_reason = Some("frame length over the limit");
            break;
        }
        let frame = window.get(file, pos, record::FRAME_HEADER_BYTES + declared, file_len)?;
        match record::check_frame(frame) {
            Ok(info) if info.offset == next => {
                builder.observe(base, info.offset, pos, info.publish_time_us);
                max_time_us = max_time_us.max(info.publish_time_us);
                next = Offset(next.0 + 1);
                pos += info.frame_len as u64;
            }
            Ok(_) => {
                stop_reason = Some("offset out of sequence");
                break;
            }
            Err(FrameError::Incomplete) => {
                stop_reason = Some("torn frame at end of file");
                break;
            }
            Err(FrameError::Corrupt(why)) => {
                stop_reason = Some(why);
                break;
            }
        }
    }
    Ok(ScanResult {
        valid_len: pos.min(file_len),
        next,
        max_time_us,
        index: builder.entries,
        stop_reason,
    })
}

/// A window of a file read in large chunks, so a scan makes few reads.
#[derive(Default)]
struct ScanWindow {
    buf: Vec<u8>,
    start: u64,
}

impl ScanWindow {
    /// Returns up to `n` bytes at `pos` (fewer only at end of file).
    fn get(
        &mut self,
        file: &dyn File,
        pos: u64,
        n: usize,
        file_len: u64,
    ) -> std::io::Result<&[u8]> {
        let end = self.start + self.buf.len() as u64;
        if pos < self.start || pos + n as u64 > end {
            let len = n.max(SCAN_CHUNK_BYTES).min((file_len - pos) as usize);
            self.buf.resize(len, 0);
            self.start = pos;
            file.read_exact_at(&mut self.buf, pos)?;
        }
        let rel = (pos - self.start) as usize;
        let avail = (self.buf.len() - rel).min(n);
        Ok(&self.buf[rel..rel + avail])
    }
}

/// Contents of a loaded index file.
#[derive(Debug)]
pub struct LoadedIndex {
    pub segment_len: u64,
    pub next: Offset,
    pub max_time_us: u64,
    pub entries: Vec<IndexEntry>,
}

/// Encodes an index file for a sealed segment.
pub fn encode_index(
    segment_len: u64,
    next: Offset,
    base: Offset,
    max_time_us: u64,
    entries: &[IndexEntry],
) -> BytesMut {
    let mut body = BytesMut::with_capacity(entries.len() * INDEX_ENTRY_BYTES);
    for e in entries {
        body.put_u32_le(e.rel_offset);
        body.put_u32_le(e.pos);
        body.put_u64_le(e.time_us);
    }
    let mut out = BytesMut::with_capacity(INDEX_HEADER_BYTES + 16 + body.len());
    out.put_slice(INDEX_MAGIC);
    out.put_u32_le(FORMAT_VERSION);
    out.put_u32_le(u32::try_from(entries.len()).expect("index entries fit u32"));
    out.put_u64_le(segment_len);
    out.put_u32_le(u32::try_from(next.0 - base.0).expect("segment offsets fit u32"));
    out.put_u32_le(crc32fast::hash(&body));
    out.put_u64_le(max_time_us);
    out.put_u64_le(0);
    out.put_slice(&body);
    out
}

/// Decodes an index file; `None` if anything about it is off.
pub fn decode_index(buf: &[u8], base: Offset) -> Option<LoadedIndex> {
    let header = INDEX_HEADER_BYTES + 16;
    if buf.len() < header || &buf[0..8] != INDEX_MAGIC {
        return None;
    }
    let u32_at = |p: usize| u32::from_le_bytes(buf[p..p + 4].try_into().expect("4 bytes"));
    let u64_at = |p: usize| u64::from_le_bytes(buf[p..p + 8].try_into().expect("8 bytes"));
    if u32_at(8) != FORMAT_VERSION {
        return None;
    }
    let count = u32_at(12) as usize;
    let segment_len = u64_at(16);
    let next = Offset(base.0 + u64::from(u32_at(24)));
    let crc = u32_at(28);
    let max_time_us = u64_at(32);
    let body = &buf[header..];
    if body.len() != count * INDEX_ENTRY_BYTES || crc32fast::hash(body) != crc {
        return None;
    }
    let entries = body
        .chunks_exact(INDEX_ENTRY_BYTES)
        .map(|c| IndexEntry {
            rel_offset: u32::from_le_bytes(c[0..4].try_into().expect("4 bytes")),
            pos: u32::from_le_bytes(c[4..8].try_into().expect("4 bytes")),
            time_us: u64::from_le_bytes(c[8..16].try_into().expect("8 bytes")),
        })
        .collect();
    Some(LoadedIndex {
        segment_len,
        next,
        max_time_us,
        entries,
    })
}

/// Writes the index file of a sealed segment and syncs it.
pub fn write_index(fs: &dyn Fs, dir: &Path, base: Offset, data: &[u8]) -> Result<()> {
    let path = dir.join(index_file_name(base));
    let file = fs
        .open(&path, OpenMode::CreateTruncate)
        .map_err(|e| StorageError::io(&path, e))?;
    file.write_at(data, 0)
        .map_err(|e| StorageError::io(&path, e))?;
    file.sync_data().map_err(|e| StorageError::io(&path, e))?;
    Ok(())
}

/// Reads and checks the index file of a sealed segment.
pub fn read_index(fs: &dyn Fs, dir: &Path, base: Offset) -> Option<LoadedIndex> {
    let path = dir.join(index_file_name(base));
    let file = fs.open(&path, OpenMode::Existing).ok()?;
    let len = usize::try_from(file.len().ok()?).ok()?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0).ok()?;
    decode_index(&buf, base)
}

/// A segment's path and open file.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    pub path: PathBuf,
    pub file: Arc<dyn File>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_sort_by_offset() {
        let a = segment_file_name(Offset(9));
        let b = segment_file_name(Offset(10));
        assert!(a < b);
        assert_eq!(parse_segment_file_name(&b), Some(Offset(10)));
        assert_eq!(parse_segment_file_name("10.seg"), None);
        assert_eq!(parse_segment_file_name("00000000000000000010.idx"), None);
    }

    #[test]
    fn header_checks_catch_damage() {
        let h = encode_header(Offset(5));
        assert!(check_header(&h, Offset(5)).is_ok());
        assert!(check_header(&h, Offset(6)).is_err());
        assert!(check_header(&h[..10], Offset(5)).is_err());
        let mut bad = h;
        bad[13] ^= 1;
        assert!(check_header(&bad, Offset(5)).is_err());
    }

    #[test]
    fn index_round_trips_and_rejects_damage() {
        let entries = vec![
            IndexEntry {
                rel_offset: 0,
                pos: 24,
                time_us: 1,
            },
            IndexEntry {
                rel_offset: 30,
                pos: 9000,
                time_us: 2,
            },
        ];
        let data = encode_index(10_000, Offset(140), Offset(100), 2, &entries);
        let got = decode_index(&data, Offset(100)).unwrap();
        assert_eq!(got.entries, entries);
        assert_eq!(got.next, Offset(140));
        assert_eq!(got.segment_len, 10_000);
        let mut bad = data.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_index(&bad, Offset(100)).is_none());
    }
}

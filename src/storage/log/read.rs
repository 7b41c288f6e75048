//! Reading a log: [`Log::read`] and its variants (visible or written
//! records; memory only or files too), the tail cache, the segment files in
//! chunks bounded by the caller's limits, and [`Log::offset_for_time`].

use bytes::{Bytes, BytesMut};

use std::sync::atomic::Ordering;

use super::{Log, ReadBatch, ReadLimits, Segment};
use crate::storage::Offset;
use crate::storage::error::{Result, StorageError};
use crate::storage::record;
use crate::storage::segment::SEGMENT_HEADER_BYTES;

/// First read of a segment read call, in bytes; later reads double up to
/// [`READ_CHUNK_MAX`].
const READ_CHUNK_MIN: usize = 64 * 1024;
/// Largest read of a segment read call (unless one frame is larger).
const READ_CHUNK_MAX: usize = 1024 * 1024;

fn read_segment(
    seg: &Segment,
    from: Offset,
    visible: Offset,
    next_base: Option<Offset>,
    limits: ReadLimits,
) -> Result<ReadBatch> {
    let (start_pos, end_pos, seg_next, unreadable, resume_points) = {
        let st = seg.state.read();
        let rel = from.0.saturating_sub(seg.base.0);
        let e = st
            .index
            .entries
            .partition_point(|e| u64::from(e.rel_offset) <= rel);
        let start = e.checked_sub(1).and_then(|i| st.index.entries.get(i));
        let start_pos = start.map_or(SEGMENT_HEADER_BYTES, |e| u64::from(e.pos));
        // Where reading could resume past a corrupt region: the next index
        // entry after the start.
        let resume = st
            .index
            .entries
            .get(e)
            .map(|e| Offset(seg.base.0 + u64::from(e.rel_offset)));
        (start_pos, st.len, st.next, st.unreadable, resume)
    };
    // Offsets at or past the next segment's base belong to that segment,
    // even if this one (damaged, or copied in by hand) claims them too.
    let seg_next = next_base.map_or(seg_next, |nb| seg_next.min(nb));
    let seg_end_offset = next_base.unwrap_or(seg_next).max(seg_next);
    if let Some(why) = unreadable {
        return Err(StorageError::Corrupt {
            path: seg.path.clone(),
            first: from.max(seg.base),
            next_readable: seg_end_offset,
            detail: why,
        });
    }
    if from >= seg_next {
        return Ok(ReadBatch {
            records: Vec::new(),
            next: from.max(seg_next),
        });
    }
    // Taken once: a close while this read runs lets it finish.
    let file = seg.file()?;
    let mut out = ReadBatch {
        records: Vec::new(),
        next: from,
    };
    let mut pos = start_pos;
    let mut bytes = 0usize;
    let mut buf = Bytes::new();
    let mut buf_start = pos;
    // Reads start small and double: a reader after a few hundred records
    // should not copy (and zero) a megabyte it then throws away.
    let mut chunk = READ_CHUNK_MIN;
    let corrupt = |first: Offset, detail: &'static str| StorageError::Corrupt {
        path: seg.path.clone(),
        first,
        next_readable: resume_points
            .filter(|r| *r > first)
            .unwrap_or(seg_end_offset),
        detail,
    };
    while pos < end_pos {
        let rel = (pos - buf_start) as usize;
        let decoded = if rel < buf.len() {
            record::decode(&buf, rel)
        } else {
            Err(record::FrameError::Incomplete)
        };
        let (rec, len) = match decoded {
            Ok(ok) => ok,
            Err(record::FrameError::Incomplete) => {
                // Refill: read from `pos` at least the next whole frame.
                let mut head = [0u8; record::FRAME_HEADER_BYTES];
                file.read_exact_at(&mut head, pos)
                    .map_err(|e| StorageError::io(&seg.path, e))?;
                let declared = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
                if declared > record::FRAME_BODY_BYTES_MAX {
                    let first = out.next;
                    return if out.records.is_empty() {
                        Err(corrupt(first, "frame length over the limit"))
                    } else {
                        Ok(out)
                    };
                }
                let want = (record::FRAME_HEADER_BYTES + declared).max(limits.bytes_max.min(chunk));
                chunk = (chunk * 2).min(READ_CHUNK_MAX);
                let n = (want as u64).min(end_pos - pos) as usize;
                if n < record::FRAME_HEADER_BYTES + declared {
                    let first = out.next;
                    return if out.records.is_empty() {
                        Err(corrupt(first, "frame runs past the segment end"))
                    } else {
                        Ok(out)
                    };
                }
                let mut fresh = BytesMut::zeroed(n);
                file.read_exact_at(&mut fresh, pos)
                    .map_err(|e| StorageError::io(&seg.path, e))?;
                buf = fresh.freeze();
                buf_start = pos;
                continue;
            }
            Err(record::FrameError::Corrupt(why)) => {
                let first = out.next;
                return if out.records.is_empty() {
                    Err(corrupt(first, why))
                } else {
                    Ok(out)
                };
            }
        };
        if rec.offset.0 < seg.base.0 || rec.offset >= seg_next {
            let first = out.next;
            return if out.records.is_empty() {
                Err(corrupt(first, "record offset outside its segment"))
            } else {
                Ok(out)
            };
        }
        pos += len as u64;
        if rec.offset < from {
            continue;
        }
        if rec.offset >= visible
            || out.records.len() >= limits.records_max
            || (!out.records.is_empty() && bytes + len > limits.bytes_max)
        {
            break;
        }
        bytes += len;
        out.next = Offset(rec.offset.0 + 1);
        out.records.push(rec);
    }
    if out.records.is_empty() {
        out.next = from.max(seg_next.min(visible));
    }
    Ok(out)
}

impl Log {
    /// Reads records with offsets `>= from` that are visible, up to the
    /// limits, from one segment (or the tail cache). Returns an empty batch
    /// at the end of the log.
    ///
    /// # Errors
    /// `Corrupt` if the first record to return fails its checks; records
    /// before a corrupt one are returned first, and the error names where
    /// reading may resume. `Io` for read failures.
    pub fn read(&self, from: Offset, limits: ReadLimits) -> Result<ReadBatch> {
        self.read_until(from, self.next_offset(), limits)
    }

    /// Like [`Log::read`], but also returns records that are written and
    /// not yet durable (under `always`, while their fdatasync runs). A
    /// caller must not hand such a record to anyone before
    /// [`Log::wait_visible`] says it is durable.
    pub fn read_written(&self, from: Offset, limits: ReadLimits) -> Result<ReadBatch> {
        let written = Offset(self.shared.written_next.load(Ordering::Acquire));
        self.read_until(from, written, limits)
    }

    /// Like [`Log::read`], from memory only: `None` when answering would
    /// read a segment file (the records are older than the tail cache).
    /// Never blocks on IO, so it may be called under a lock.
    pub fn read_cached(&self, from: Offset, limits: ReadLimits) -> Option<ReadBatch> {
        self.read_until_cached(from, self.next_offset(), limits)
    }

    /// Like [`Log::read_written`], from memory only (see
    /// [`Log::read_cached`]).
    pub fn read_written_cached(&self, from: Offset, limits: ReadLimits) -> Option<ReadBatch> {
        let written = Offset(self.shared.written_next.load(Ordering::Acquire));
        self.read_until_cached(from, written, limits)
    }

    fn read_until_cached(
        &self,
        from: Offset,
        visible: Offset,
        limits: ReadLimits,
    ) -> Option<ReadBatch> {
        let from = from.max(self.first_offset());
        if from >= visible {
            return Some(ReadBatch {
                records: Vec::new(),
                next: from,
            });
        }
        self.read_cache(from, visible, limits)
    }

    fn read_until(&self, from: Offset, visible: Offset, limits: ReadLimits) -> Result<ReadBatch> {
        let from = from.max(self.first_offset());
        if from >= visible {
            return Ok(ReadBatch {
                records: Vec::new(),
                next: from,
            });
        }
        if let Some(batch) = self.read_cache(from, visible, limits) {
            return Ok(batch);
        }
        self.read_files(from, visible, limits)
    }

    fn read_cache(&self, from: Offset, visible: Offset, limits: ReadLimits) -> Option<ReadBatch> {
        let cache = self.shared.cache.chunks();
        let front = cache.front()?;
        if from < front.first {
            return None;
        }
        let start = cache.partition_point(|c| c.next <= from);
        let mut out = ReadBatch {
            records: Vec::new(),
            next: from,
        };
        let mut bytes = 0;
        for chunk in cache.iter().skip(start) {
            let mut pos = 0;
            while pos < chunk.data.len() {
                let (len, offset) = record::peek_trusted(&chunk.data, pos);
                if offset < from {
                    pos += len;
                    continue;
                }
                if offset >= visible
                    || out.records.len() >= limits.records_max
                    || (!out.records.is_empty() && bytes + len > limits.bytes_max)
                {
                    return Some(out);
                }
                let (rec, _) = record::decode_trusted(&chunk.data, pos)
                    .expect("tail cache holds frames this log encoded");
                pos += len;
                bytes += len;
                out.next = Offset(rec.offset.0 + 1);
                out.records.push(rec);
            }
        }
        Some(out)
    }

    fn read_files(&self, from: Offset, visible: Offset, limits: ReadLimits) -> Result<ReadBatch> {
        let segments = self.shared.segments.read().clone();
        let mut i = segments
            .partition_point(|s| s.base <= from)
            .saturating_sub(1);
        loop {
            let Some(seg) = segments.get(i) else {
                return Ok(ReadBatch {
                    records: Vec::new(),
                    next: from,
                });
            };
            let next_base = segments.get(i + 1).map(|s| s.base);
            let batch = read_segment(seg, from, visible, next_base, limits)?;
            if !batch.records.is_empty() || next_base.is_none() {
                return Ok(batch);
            }
            i += 1;
        }
    }

    /// The first offset whose publish time is at or after `time_us` (the
    /// next offset if there is none). Uses the sparse time index, then a
    /// short scan.
    pub fn offset_for_time(&self, time_us: u64) -> Result<Offset> {
        let segments = self.shared.segments.read().clone();
        let i = segments.partition_point(|s| s.state.read().max_time_us < time_us);
        let Some(seg) = segments.get(i) else {
            return Ok(self.next_offset());
        };
        let start = {
            let st = seg.state.read();
            let e = st
                .index
                .entries
                .partition_point(|e| e.time_us < time_us)
                .saturating_sub(1);
            st.index
                .entries
                .get(e)
                .map_or(seg.base, |e| Offset(seg.base.0 + u64::from(e.rel_offset)))
        };
        let mut from = start;
        loop {
            let batch = self.read(
                from,
                ReadLimits {
                    records_max: 1024,
                    bytes_max: 1 << 20,
                },
            )?;
            if batch.records.is_empty() {
                return Ok(batch.next);
            }
            if let Some(r) = batch.records.iter().find(|r| r.publish_time_us >= time_us) {
                return Ok(r.offset);
            }
            from = batch.next;
        }
    }
}

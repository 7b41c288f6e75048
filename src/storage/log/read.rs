//! Reading records from segment files, in chunks, bounded by the caller's
//! limits.

use bytes::{Bytes, BytesMut};

use super::{ReadBatch, ReadLimits, Segment};
use crate::storage::Offset;
use crate::storage::error::{Result, StorageError};
use crate::storage::record;
use crate::storage::segment::SEGMENT_HEADER_BYTES;

/// First read of a segment read call, in bytes; later reads double up to
/// [`READ_CHUNK_MAX`].
const READ_CHUNK_MIN: usize = 64 * 1024;
/// Largest read of a segment read call (unless one frame is larger).
const READ_CHUNK_MAX: usize = 1024 * 1024;

pub(super) fn read_segment(
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

//! Segment files: creating a new one, and recovering one at open (checking
//! every frame, truncating a torn tail, rebuilding a missing or stale
//! index).

use std::path::Path;

use super::{LogConfig, RecoveryReport, Segment, SegmentState};
use crate::storage::Offset;
use crate::storage::error::{Result, StorageError};
use crate::storage::io::{Fs, OpenMode};
use crate::storage::segment::{self, IndexBuilder, SEGMENT_HEADER_BYTES, segment_file_name};

pub(super) fn create_segment(
    fs: &dyn Fs,
    dir: &Path,
    base: Offset,
    config: &LogConfig,
) -> Result<Segment> {
    let path = dir.join(segment_file_name(base));
    let file = fs
        .open(&path, OpenMode::CreateTruncate)
        .map_err(|e| StorageError::io(&path, e))?;
    // Synced in every mode: once per segment costs nothing, and it keeps a
    // power loss from leaving a headerless segment in the middle of a log.
    let written = file
        .write_at(&segment::encode_header(base), 0)
        .and_then(|()| {
            if config.preallocate {
                file.reserve(config.segment_bytes_max)
            } else {
                Ok(())
            }
        })
        .and_then(|()| file.sync_data());
    if let Err(e) = written {
        // A full disk: leave no headerless file behind.
        let _ = fs.remove_file(&path);
        return Err(StorageError::io(&path, e));
    }
    Ok(Segment::new(
        base,
        path,
        file,
        SegmentState {
            next: base,
            len: SEGMENT_HEADER_BYTES,
            index: IndexBuilder::new(config.index_interval_bytes),
            max_time_us: 0,
            unreadable: None,
        },
    ))
}

pub(super) fn recover_segment(
    fs: &dyn Fs,
    dir: &Path,
    base: Offset,
    last: bool,
    next_base: Option<Offset>,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<Segment> {
    let path = dir.join(segment_file_name(base));
    let io = |e| StorageError::io(&path, e);
    let file = fs.open(&path, OpenMode::Existing).map_err(io)?;
    let file_len = file.len().map_err(io)?;
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    let got = file.read_at(&mut header, 0).map_err(io)?;
    if let Err(why) = segment::check_header(&header[..got], base) {
        if last {
            // A torn roll: the new segment's header never made it. Start it
            // again; nothing after a bad header can be trusted.
            report.truncated_bytes += file_len;
            report.findings.push(format!(
                "{}: {why}; recreated the active segment",
                path.display()
            ));
            return create_segment(fs, dir, base, config);
        }
        report.findings.push(format!(
            "{}: {why}; its records are unreadable",
            path.display()
        ));
        return Ok(Segment::new(
            base,
            path.clone(),
            file,
            SegmentState {
                next: next_base.unwrap_or(base),
                len: file_len,
                index: IndexBuilder::new(config.index_interval_bytes),
                max_time_us: 0,
                unreadable: Some(why),
            },
        ));
    }
    if !last {
        if let Some(idx) = segment::read_index(fs, dir, base) {
            if idx.segment_len == file_len && Some(idx.next) <= next_base {
                return Ok(Segment::new(
                    base,
                    path,
                    file,
                    SegmentState {
                        next: idx.next,
                        len: file_len,
                        index: IndexBuilder::from_entries(idx.entries, config.index_interval_bytes),
                        max_time_us: idx.max_time_us,
                        unreadable: None,
                    },
                ));
            }
        }
    }
    let scan =
        segment::scan(file.as_ref(), base, file_len, config.index_interval_bytes).map_err(io)?;
    if scan.valid_len < file_len {
        let dropped = file_len - scan.valid_len;
        report.truncated_bytes += dropped;
        report.findings.push(format!(
            "{}: {} at byte {}; truncated {dropped} bytes after offset {}",
            path.display(),
            scan.stop_reason.unwrap_or("trailing bytes"),
            scan.valid_len,
            scan.next.0,
        ));
        file.truncate(scan.valid_len).map_err(io)?;
        file.sync_data().map_err(io)?;
    }
    if let Some(next_base) = next_base {
        if scan.next > next_base {
            report.findings.push(format!(
                "{}: records up to offset {} overlap the next segment (starting at {}); the next segment's copies are used",
                path.display(),
                scan.next.0,
                next_base.0
            ));
        } else if scan.next != next_base {
            report.findings.push(format!(
                "{}: ends at offset {} but the next segment starts at {}; offsets in between are missing",
                path.display(),
                scan.next.0,
                next_base.0
            ));
        }
    }
    if !last {
        let data = segment::encode_index(
            scan.valid_len,
            scan.next,
            base,
            scan.max_time_us,
            &scan.index,
        );
        segment::write_index(fs, dir, base, &data)?;
        report.rebuilt_indexes += 1;
    }
    Ok(Segment::new(
        base,
        path,
        file,
        SegmentState {
            next: scan.next,
            len: scan.valid_len,
            index: IndexBuilder::from_entries(scan.index, config.index_interval_bytes),
            max_time_us: scan.max_time_us,
            unreadable: None,
        },
    ))
}

//! Retention: where a log's limits cut (by age or size, whole segments
//! at a time, never the active one) and deleting the segments before a cut.

use std::sync::Arc;

use super::{Log, Segment, now_us};
use crate::storage::Offset;
use crate::storage::error::{Result, StorageError};
use crate::storage::segment::index_file_name;

impl Log {
    /// Deletes every sealed segment whose records are all below `offset`.
    /// The active segment is never deleted. Returns how many were deleted.
    pub fn truncate_before(&self, offset: Offset) -> Result<u32> {
        self.delete_segments_while(|seg, next| next <= offset && seg.base < offset)
    }

    /// Retention by age and size: deletes sealed segments whose newest
    /// record is older than `max_age_us` before now, then the oldest sealed
    /// segments while the log is over `max_bytes` (see
    /// [`Log::retention_cut`]).
    pub fn enforce_retention(
        &self,
        max_age_us: Option<u64>,
        max_bytes: Option<u64>,
    ) -> Result<u32> {
        self.truncate_before(self.retention_cut(max_age_us, max_bytes))
    }

    /// Where retention by age and size would cut the log: the offset below
    /// which [`Log::truncate_before`] deletes what the limits allow, that is
    /// the sealed segments whose newest record is older than `max_age_us`
    /// before now, then the oldest sealed segments while the log is over
    /// `max_bytes`. Deletes nothing itself, so a caller can first account
    /// for what is about to go. The active segment is never cut.
    pub fn retention_cut(&self, max_age_us: Option<u64>, max_bytes: Option<u64>) -> Offset {
        let segments = self.shared.segments.read();
        let sealed = segments.len() - 1;
        let mut n = 0;
        if let Some(age) = max_age_us {
            let cutoff = now_us().saturating_sub(age);
            while n < sealed && segments[n].state.read().max_time_us < cutoff {
                n += 1;
            }
        }
        if let Some(max) = max_bytes {
            let mut total: u64 = segments[n..].iter().map(|s| s.state.read().len).sum();
            while n < sealed && total > max {
                total -= segments[n].state.read().len;
                n += 1;
            }
        }
        segments[n].base
    }

    fn delete_segments_while(&self, mut pred: impl FnMut(&Segment, Offset) -> bool) -> Result<u32> {
        let doomed: Vec<Arc<Segment>> = {
            let mut segments = self.shared.segments.write();
            let mut n = 0;
            while n + 1 < segments.len() && pred(&segments[n], segments[n + 1].base) {
                n += 1;
            }
            segments.drain(..n).collect()
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        let fs = &self.shared.fs;
        for seg in &doomed {
            // Index first: a crash between the two leaves a segment without
            // an index, which the next open rebuilds.
            let _ = fs.remove_file(&self.shared.dir.join(index_file_name(seg.base)));
            fs.remove_file(&seg.path)
                .map_err(|e| StorageError::io(&seg.path, e))?;
        }
        fs.sync_dir(&self.shared.dir)
            .map_err(|e| StorageError::io(&self.shared.dir, e))?;
        Ok(u32::try_from(doomed.len()).unwrap_or(u32::MAX))
    }
}

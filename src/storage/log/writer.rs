//! Writing one log for the writer pool: take the pending buffer, write it
//! (rolling segments), hand it to the pool's round for its sync under the
//! fsync mode, then complete the appends; on a failed write or sync, rewind
//! the log to a state it can account for (steps 2–4 of the write path in
//! mod.rs).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Mark, PendingBatch, RECOVER_EVERY, Segment, Shared, create_segment};
use crate::storage::error::{Result, StorageError};
use crate::storage::record;
use crate::storage::segment::{self, SEGMENT_HEADER_BYTES, index_file_name};
use crate::storage::{FsyncMode, Offset};

impl Shared {
    /// Stops accepting appends and waits until the log's writer has
    /// written and synced what was queued and finished for good.
    pub(super) fn close_and_join(self: &Arc<Self>) {
        self.pending.lock().closed = true;
        if self.space_owned {
            self.space.close();
        }
        self.worker.kick(self);
        let mut sched = self.sched.lock();
        while !sched.finished {
            self.finished.wait(&mut sched);
        }
        drop(sched);
        // Wake anyone still waiting for visibility after the last write.
        self.visible_tx.send_modify(|_| {});
    }

    pub(super) fn active(&self) -> Arc<Segment> {
        self.segments
            .read()
            .last()
            .expect("a log always has an active segment")
            .clone()
    }

    /// The log's state now.
    pub(super) fn mark(&self) -> Mark {
        let segments = self.segments.read();
        Mark::of(
            segments.len(),
            &segments.last().expect("an active segment").state.read(),
        )
    }

    /// Fails `batches` and everything queued behind them with `err`, and
    /// rewinds the log to `to`. Returns false if the rewind failed too (the
    /// log is then failed until [`Shared::recover`] works).
    pub(super) fn rewind(
        &self,
        to: Mark,
        err: &StorageError,
        mut batches: Vec<PendingBatch>,
    ) -> bool {
        *self.write_error.lock() = Some(err.to_string());
        {
            let mut pending = self.pending.lock();
            batches.append(&mut pending.batches);
            pending.buf.clear();
            pending.urgent = false;
            pending.deferred_since = None;
            // Offsets of the failed batches are handed out again.
            pending.next_offset = to.next;
        }
        // Rewind (or fail) before anyone hears of the error, so an append
        // made in reaction to it sees the log as it now is.
        let rewound = match self.undo_to(to) {
            Ok(()) => true,
            Err(undo) => {
                tracing::error!(dir = %self.dir.display(), error = %undo, "cannot rewind the log; it refuses appends until a rewind works");
                self.fail(&undo);
                false
            }
        };
        for batch in batches {
            let _ = batch.done.send(Err(err.clone()));
        }
        rewound
    }

    /// Cuts the files back to `to` and syncs them, then moves the written
    /// and visible offsets back and tells readers (`rewinds`).
    pub(super) fn undo_to(&self, to: Mark) -> Result<()> {
        let extra: Vec<Arc<Segment>> = {
            let mut segments = self.segments.write();
            let keep = to.segments.min(segments.len());
            segments.drain(keep..).collect()
        };
        let active = self.active();
        let io = |e| StorageError::io(&active.path, e);
        if !extra.is_empty() {
            for seg in &extra {
                let _ = self
                    .fs
                    .remove_file(&self.dir.join(index_file_name(seg.base)));
                if let Err(e) = self.fs.remove_file(&seg.path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        // Keep the list whole: the next try removes it.
                        let mut segments = self.segments.write();
                        segments.extend(extra.iter().cloned());
                        return Err(StorageError::io(&seg.path, e));
                    }
                }
            }
            // The roll sealed the segment that is active again.
            let _ = self
                .fs
                .remove_file(&self.dir.join(index_file_name(active.base)));
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| StorageError::io(&self.dir, e))?;
        }
        active.file()?.truncate(to.len).map_err(io)?;
        active.sync_data()?;
        {
            let mut st = active.state.write();
            st.len = to.len;
            st.next = to.next;
            st.index.truncate(to.index_entries);
            st.max_time_us = to.max_time_us;
        }
        *self.synced.lock() = to;
        self.cache.drop_from(to.next);
        self.rewinds.fetch_add(1, Ordering::AcqRel);
        // Still under the write lock: nothing is written at `to.next` before
        // the listener has forgotten what it knew about those offsets.
        let listener = self.rewind_listener.lock().0.clone();
        if let Some(listener) = listener {
            listener(to.next);
        }
        if self.written_next.load(Ordering::Acquire) > to.next.0 {
            self.written_next.store(to.next.0, Ordering::Release);
            self.written_tx.send_replace(to.next);
        }
        if self.visible_next.load(Ordering::Acquire) > to.next.0 {
            self.visible_next.store(to.next.0, Ordering::Release);
        }
        // Wake everyone waiting for visibility: it will not come for the
        // offsets that were cut.
        self.visible_tx.send_modify(|_| {});
        Ok(())
    }

    /// A failed log tries its rewind again; on success it takes appends.
    pub(super) fn recover(&self) -> bool {
        let to = *self.synced.lock();
        match self.undo_to(to) {
            Ok(()) => {
                let mut pending = self.pending.lock();
                pending.failed = None;
                pending.next_offset = to.next;
                tracing::warn!(dir = %self.dir.display(), next = %to.next, "log recovered: rewound to its last synced state, appends accepted again");
                true
            }
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "log still cannot be rewound");
                false
            }
        }
    }

    pub(super) fn fail(&self, err: &StorageError) {
        {
            let mut pending = self.pending.lock();
            pending.failed.get_or_insert_with(|| err.to_string());
            for batch in pending.batches.drain(..) {
                let _ = batch.done.send(Err(err.clone()));
            }
            pending.buf.clear();
        }
        // Wake everyone waiting for visibility: it will not come.
        self.visible_tx.send_modify(|_| {});
    }
}

/// What a log needs from its worker after being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// More may be queued: serve it again after the others.
    Again,
    /// Serve it again at this time (a deferred batch, an interval sync, a
    /// rewind retry), or sooner if an append comes.
    At(Instant),
    /// Nothing to do until an append comes.
    Idle,
    /// Closed: everything queued is written and synced.
    Finished,
}

/// What serving a log did.
#[derive(Debug)]
pub(super) enum Served {
    /// Done for now; the worker acts on [`Next`].
    Next(Next),
    /// Written (or due for an interval sync) and waiting for its round's
    /// sync: the worker syncs every log of the round, then calls
    /// [`finish`] with the outcome.
    Sync(Unsynced),
}

/// Batches written to a log's file that complete once the file is synced.
#[derive(Debug)]
pub(super) struct Unsynced {
    /// `None` for an interval sync with nothing new written.
    written: Option<Written>,
    /// The file to sync (the active segment after the write: a roll
    /// synced the one before).
    segment: Arc<Segment>,
}

impl Unsynced {
    /// Syncs this log's file on its own.
    pub(super) fn sync_file(&self) -> Result<()> {
        self.segment.sync_data()
    }
}

/// Batches written to the file, readable by the log's own writer paths
/// but not yet visible or complete.
#[derive(Debug)]
pub(super) struct Written {
    batches: Vec<PendingBatch>,
    next: Offset,
}

/// Serves one log once: retries a failed log's rewind when due, writes
/// what is queued, makes an interval sync that is due, or finishes a closed
/// log. A write that must be synced (under `always`, or with an interval
/// sync due) comes back as [`Served::Sync`], so that one round's syncs
/// cover many logs. Never blocks waiting for work: the pool's worker calls
/// it again as [`Next`] says.
///
/// Between a write and its [`finish`] nobody else writes the log: only
/// `never` writes inline (see `Log::write_inline`), and `never` has no
/// syncs to wait for.
pub(super) fn serve(shared: &Shared) -> Served {
    let next = |n| Served::Next(n);
    let interval = match shared.config.fsync {
        FsyncMode::Interval(ms) => Some(Duration::from_millis(ms.max(1))),
        _ => None,
    };
    let now = Instant::now();
    let pending = shared.pending.lock();
    if pending.failed.is_some() {
        if pending.closed {
            return next(Next::Finished);
        }
        drop(pending);
        let due = *shared
            .sched
            .lock()
            .recover_at
            .get_or_insert(now + RECOVER_EVERY);
        if now < due {
            return next(Next::At(due));
        }
        shared.sched.lock().recover_at = None;
        let _writing = shared.write_lock.lock();
        shared.recover();
        return next(Next::Again);
    }
    if pending.batches.is_empty() && pending.closed {
        drop(pending);
        let _writing = shared.write_lock.lock();
        let unsynced = shared.sched.lock().unsynced;
        if unsynced || shared.config.fsync == FsyncMode::Never {
            if let Err(e) = shared.active().sync_data() {
                tracing::error!(dir = %shared.dir.display(), error = %e, "final sync failed");
            }
        }
        return next(Next::Finished);
    }
    let (unsynced, last_sync) = {
        let sched = shared.sched.lock();
        (sched.unsynced, sched.last_sync)
    };
    let sync_due = match interval {
        Some(every) if unsynced => Some(last_sync + every),
        _ => None,
    };
    if !pending.batches.is_empty() {
        if !pending.urgent && !pending.closed {
            // Only deferred batches: wait for an ordinary one, or until
            // the deferral (or an interval sync) is due.
            let deferred = pending
                .deferred_since
                .map(|since| since + shared.config.defer_max);
            if let Some(due) = deferred.into_iter().chain(sync_due).min() {
                if now < due {
                    return next(Next::At(due));
                }
            }
        }
        drop(pending);
        // Take the batches under the write lock, so an inline writer
        // cannot write later batches before these.
        let writing = shared.write_lock.lock();
        let (buf, batches, roll) = shared.pending.lock().take();
        if batches.is_empty() {
            return next(Next::Again); // an inline writer took them first
        }
        let sync = shared.config.fsync == FsyncMode::Always
            || interval.is_some_and(|every| last_sync.elapsed() >= every);
        let written = write_taken(shared, buf, batches, roll);
        drop(writing);
        let Some(written) = written else {
            return next(Next::Again); // failed, and rewound
        };
        if sync {
            return Served::Sync(Unsynced {
                written: Some(written),
                segment: shared.active(),
            });
        }
        complete(shared, written);
        shared.sched.lock().unsynced = true;
        return next(Next::Again);
    }
    drop(pending);
    match sync_due {
        Some(due) if now < due => next(Next::At(due)),
        // An interval sync with nothing new queued.
        Some(_) => Served::Sync(Unsynced {
            written: None,
            segment: shared.active(),
        }),
        None => next(Next::Idle),
    }
}

/// Completes a log's part of a round once its sync is done: on success
/// the written batches become visible and complete; on failure they fail
/// and the log rewinds to its last successful sync.
pub(super) fn finish(shared: &Shared, round: Unsynced, synced: Result<()>) -> Next {
    let wrote = round.written.is_some();
    match synced {
        Ok(()) => {
            *shared.synced.lock() = shared.mark();
            if let Some(written) = round.written {
                complete(shared, written);
            }
        }
        Err(err) => {
            tracing::error!(dir = %shared.dir.display(), error = %err, "fdatasync failed; rewinding to the last successful one");
            let to = *shared.synced.lock();
            let batches = round.written.map(|w| w.batches).unwrap_or_default();
            shared.rewind(to, &err, batches);
        }
    }
    let mut sched = shared.sched.lock();
    sched.unsynced = false;
    sched.last_sync = Instant::now();
    if wrote { Next::Again } else { Next::Idle }
}

/// Writes taken batches, syncs them if `sync`, makes them visible and
/// completes them, all on the caller's thread. On a failed write or sync
/// the batches fail and the log rewinds (see the module docs). Returns
/// false if the log is failed. The caller holds the write lock.
pub(super) fn complete_write(
    shared: &Shared,
    buf: Bytes,
    batches: Vec<PendingBatch>,
    roll: bool,
    sync: bool,
) -> bool {
    let Some(written) = write_taken(shared, buf, batches, roll) else {
        return false;
    };
    if sync {
        if let Err(err) = shared.active().sync_data() {
            tracing::error!(error = %err, "fdatasync failed; rewinding to the last successful one");
            let synced = *shared.synced.lock();
            return shared.rewind(synced, &err, written.batches);
        }
        *shared.synced.lock() = shared.mark();
    }
    complete(shared, written);
    true
}

/// Writes taken batches to the file and the tail cache. On a failed
/// write the batches fail and the log rewinds to before them (`None`).
fn write_taken(
    shared: &Shared,
    buf: Bytes,
    batches: Vec<PendingBatch>,
    roll: bool,
) -> Option<Written> {
    let before = shared.mark();
    if let Err(err) = write_batches(shared, &buf, &batches, roll) {
        tracing::error!(dir = %shared.dir.display(), error = %err, "log write failed; rewinding to before it");
        shared.rewind(before, &err, batches);
        return None;
    }
    let last = batches.last().expect("non-empty").appended.last_offset;
    let first = batches[0].appended.base_offset;
    let next = Offset(last.0 + 1);
    shared.cache.push(first, next, buf);
    shared.written_next.store(next.0, Ordering::Release);
    shared.written_tx.send_replace(next);
    Some(Written { batches, next })
}

/// Makes written (and, as the mode asks, synced) batches visible and
/// completes them.
fn complete(shared: &Shared, written: Written) {
    shared.visible_next.store(written.next.0, Ordering::Release);
    shared.visible_tx.send_replace(written.next);
    for batch in written.batches {
        let _ = batch.done.send(Ok(batch.appended));
    }
    if shared.write_error.lock().is_some() {
        *shared.write_error.lock() = None;
        tracing::info!(dir = %shared.dir.display(), "log writes again");
    }
}

/// Writes the taken batches: one write per segment touched, rolling first
/// where a batch would overflow the active segment.
fn write_batches(
    shared: &Shared,
    buf: &Bytes,
    batches: &[PendingBatch],
    roll_requested: bool,
) -> Result<()> {
    let mut start = 0; // position in buf of the first unwritten batch
    let mut i = 0;
    let mut roll = roll_requested;
    while i < batches.len() {
        let mut active = shared.active();
        let active_len = active.state.read().len;
        let has_records = active_len > SEGMENT_HEADER_BYTES;
        let first_len = (batches[i].end - start) as u64;
        if has_records && (roll || active_len + first_len > shared.config.segment_bytes_max) {
            roll_segment(shared, &active, batches[i].appended.base_offset)?;
            active = shared.active();
        }
        roll = false;
        // Take as many batches as fit into this segment (at least one).
        let mut j = i + 1;
        let mut len = active.state.read().len;
        len += first_len;
        while j < batches.len() {
            let next_len = (batches[j].end - batches[j - 1].end) as u64;
            if len + next_len > shared.config.segment_bytes_max {
                break;
            }
            len += next_len;
            j += 1;
        }
        let end = batches[j - 1].end;
        let data = &buf[start..end];
        let pos = active.state.read().len;
        active
            .file()?
            .write_at(data, pos)
            .map_err(|e| StorageError::io(&active.path, e))?;
        // Index the frames just written.
        let mut st = active.state.write();
        let mut p = 0;
        while p < data.len() {
            let info = record::check_frame(&data[p..]).expect("frames this writer encoded");
            st.index.observe(
                active.base,
                info.offset,
                pos + p as u64,
                info.publish_time_us,
            );
            st.max_time_us = st.max_time_us.max(info.publish_time_us);
            p += info.frame_len;
        }
        st.len = pos + data.len() as u64;
        st.next = Offset(batches[j - 1].appended.last_offset.0 + 1);
        drop(st);
        start = end;
        i = j;
    }
    Ok(())
}

/// Seals the active segment (sync, index file) and starts one at `next`.
fn roll_segment(shared: &Shared, active: &Segment, next: Offset) -> Result<()> {
    // Sealing syncs in every mode, `never` included: a sealed segment is
    // complete on disk before the next one exists.
    active.sync_data()?;
    let data = {
        let st = active.state.read();
        segment::encode_index(
            st.len,
            st.next,
            active.base,
            st.max_time_us,
            &st.index.entries,
        )
    };
    segment::write_index(shared.fs.as_ref(), &shared.dir, active.base, &data)?;
    let seg = create_segment(shared.fs.as_ref(), &shared.dir, next, &shared.config)?;
    shared
        .fs
        .sync_dir(&shared.dir)
        .map_err(|e| StorageError::io(&shared.dir, e))?;
    {
        let mut st = active.state.write();
        st.index.entries.shrink_to_fit();
    }
    let fresh = {
        let mut segments = shared.segments.write();
        segments.push(Arc::new(seg));
        Mark::of(
            segments.len(),
            &segments.last().expect("just pushed").state.read(),
        )
    };
    // Everything before the new segment is synced, and so is its header.
    *shared.synced.lock() = fresh;
    Ok(())
}

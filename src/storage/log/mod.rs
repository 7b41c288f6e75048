//! [`Log`]: one append-only, segmented, checksummed log (a topic's messages,
//! a subscription's dead letters, or the broker's state journal).
//!
//! Write path (docs/durability.md numbers the same steps):
//! 1. `append`/`enqueue` check every record, take the pending lock, assign
//!    dense offsets and a non-decreasing publish time, encode the frames into
//!    the shared pending buffer and queue a completion. Appends from many
//!    tasks land in one buffer: that is the coalescing.
//! 2. The log's writer (a thread of the shared [`WriterPool`]) takes the
//!    whole pending buffer, rolls the active segment if the batch would
//!    overflow it, and writes it with one positional write per segment
//!    touched.
//! 3. In `always` mode it then calls fdatasync once for everything it took
//!    (group commit: every append that arrived while the previous sync ran
//!    shares the next one), and only then completes the appends and moves
//!    the visible offset. In `interval` mode appends complete after the write
//!    and the writer syncs every interval; in `never` mode it never syncs.
//! 4. A failed write or sync fails every append queued at that moment and
//!    **rewinds** the log: segments made by this write are removed, the
//!    active segment is truncated back (to before the write after a failed
//!    write; to the last successful fdatasync after a failed sync, since the
//!    page cache can no longer be trusted to match the disk) and synced,
//!    and offsets are handed out again from there. So a failed append
//!    leaves nothing behind that could ever be read or recovered: a batch
//!    is durable as a whole or not at all. A full disk is an error that
//!    passes: the next append succeeds once there is room. Only if the
//!    rewind itself fails is the log **failed**; the writer retries the
//!    rewind every `RECOVER_EVERY` and accepts appends again once it works.
//!    Readers learn of a rewind through [`Log::rewinds`].
//!
//! Readers see records below the visible offset only, so under `always` a
//! reader never observes a record a crash could take back. Recent records
//! are served from an in-memory tail cache of the encoded batches; older
//! ones are read from the segment files with one read per call.

mod pool;
mod read;
mod retention;
mod segments;
mod writer;

use pool::{Sched, Worker};
pub use pool::{WriterPool, WriterStats};

use segments::{create_segment, recover_segment};
use writer::complete_write;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

use crate::storage::cache::{CacheBudget, TailCache};
use crate::storage::error::{Result, StorageError};
use crate::storage::io::{File, Fs, WholeSync};
use crate::storage::record::{self, NewRecord, Record};
use crate::storage::segment::{self, IndexBuilder, IndexEntry, SEGMENT_HEADER_BYTES};
use crate::storage::{FsyncMode, Offset};

/// How often a failed log tries to rewind to its last synced state again.
const RECOVER_EVERY: Duration = Duration::from_secs(1);

/// Settings of one log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A segment is rolled when the next batch would take it past this size.
    pub segment_bytes_max: u64,
    /// Distance in bytes between sparse index entries.
    pub index_interval_bytes: u64,
    /// When an append is complete; see [`FsyncMode`].
    pub fsync: FsyncMode,
    /// Bytes of recently written batches kept in memory for readers
    /// (ignored with `shared_memory`).
    pub tail_cache_bytes_max: u64,
    /// Encoded bytes that may wait for the writer before `append` waits
    /// (ignored with `shared_memory`).
    pub pending_bytes_max: u64,
    /// Pools shared with other logs in place of this log's own
    /// `tail_cache_bytes_max` and `pending_bytes_max`.
    pub shared_memory: Option<SharedMemory>,
    /// Longest a batch queued with [`Log::enqueue_deferred`] waits for an
    /// ordinary batch to share its write and sync before the writer writes
    /// it by itself.
    pub defer_max: Duration,
    /// Reserve each new segment's full size on disk when it is created
    /// (the state journal: acks must keep working when topic data fills
    /// the disk, since acks are how space is freed).
    pub preallocate: bool,
    /// The writer threads that write and sync this log, shared with other
    /// logs; `None` gives the log a pool of one thread of its own.
    pub writers: Option<WriterPool>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 64 * 1024 * 1024,
            index_interval_bytes: 8 * 1024,
            fsync: FsyncMode::Always,
            tail_cache_bytes_max: 8 * 1024 * 1024,
            pending_bytes_max: 64 * 1024 * 1024,
            shared_memory: None,
            defer_max: Duration::from_millis(5),
            preallocate: false,
            writers: None,
        }
    }
}

/// Memory pools that many logs share, so that one setting bounds them all
/// whatever the number of logs.
#[derive(Debug, Clone)]
pub struct SharedMemory {
    /// Encoded bytes of appends waiting for their writers, in all logs.
    pub appends: Arc<Semaphore>,
    /// Permits in `appends` (the largest batch that can wait).
    pub appends_bytes_max: usize,
    /// Every log's tail cache.
    pub cache: Arc<CacheBudget>,
}

impl SharedMemory {
    pub fn new(appends_bytes_max: u64, cache_bytes_max: u64) -> Self {
        let appends_bytes_max = usize::try_from(appends_bytes_max)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        Self {
            appends: Arc::new(Semaphore::new(appends_bytes_max)),
            appends_bytes_max,
            cache: CacheBudget::new(cache_bytes_max),
        }
    }

    /// Bytes of appends waiting for their writers now.
    pub fn appends_bytes(&self) -> usize {
        self.appends_bytes_max - self.appends.available_permits()
    }
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record of the batch.
    pub base_offset: Offset,
    /// Offset of the last record of the batch.
    pub last_offset: Offset,
    /// Publish time given to every record of the batch.
    pub publish_time_us: u64,
}

/// A queued append; resolve it with [`AppendTicket::wait`].
#[derive(Debug)]
pub struct AppendTicket {
    rx: oneshot::Receiver<Result<Appended>>,
    path: PathBuf,
}

impl AppendTicket {
    /// Waits until the append is complete under the log's fsync mode.
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw the append; it only stops
    /// waiting for its outcome.
    pub async fn wait(self) -> Result<Appended> {
        match self.rx.await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Closed { path: self.path }),
        }
    }
}

/// Limits of one read.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub records_max: usize,
    /// Frame bytes; at least one record is returned even if larger.
    pub bytes_max: usize,
}

/// What a read returned: records with offsets `>= from`, in order (there may
/// be gaps where retention or a lost tail removed records).
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<Record>,
    /// Where the next read should start.
    pub next: Offset,
}

/// A summary of a log's disk use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    pub first_offset: Offset,
    pub next_offset: Offset,
    pub segments: u32,
    pub disk_bytes: u64,
}

/// What recovery found when the log was opened.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Bytes cut from the tails of segments (torn or corrupt).
    pub truncated_bytes: u64,
    /// Index files rebuilt from their segment.
    pub rebuilt_indexes: u32,
    /// Human-readable findings, for the log.
    pub findings: Vec<String>,
}

/// One segment as the log keeps it.
#[derive(Debug)]
struct Segment {
    base: Offset,
    path: PathBuf,
    /// `None` once the log is closed: the descriptor is released, so that
    /// the directory can be removed where an open file keeps it busy (NFS,
    /// some FUSE file systems). A read that took the file first finishes
    /// with it; later ones get `Closed`.
    file: RwLock<Option<Arc<dyn File>>>,
    state: RwLock<SegmentState>,
}

impl Segment {
    fn new(base: Offset, path: PathBuf, file: Arc<dyn File>, state: SegmentState) -> Segment {
        Segment {
            base,
            path,
            file: RwLock::new(Some(file)),
            state: RwLock::new(state),
        }
    }

    /// The open file.
    ///
    /// # Errors
    /// `Closed` once the log is closed.
    fn file(&self) -> Result<Arc<dyn File>> {
        self.file
            .read()
            .clone()
            .ok_or_else(|| StorageError::Closed {
                path: self.path.clone(),
            })
    }

    fn sync_data(&self) -> Result<()> {
        self.file()?
            .sync_data()
            .map_err(|e| StorageError::io(&self.path, e))
    }
}

#[derive(Debug)]
struct SegmentState {
    /// Offset after the last written record.
    next: Offset,
    /// Bytes written, header included.
    len: u64,
    index: IndexBuilder,
    max_time_us: u64,
    /// The header failed its checks: nothing in the segment is readable.
    unreadable: Option<&'static str>,
}

#[derive(Debug)]
struct PendingBatch {
    /// End of this batch in the pending buffer.
    end: usize,
    appended: Appended,
    done: oneshot::Sender<Result<Appended>>,
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Debug, Default)]
struct Pending {
    buf: BytesMut,
    batches: Vec<PendingBatch>,
    next_offset: Offset,
    last_time_us: u64,
    closed: bool,
    failed: Option<String>,
    /// Writer asked to roll before the next write (retention of the journal).
    roll_requested: bool,
    /// Some queued batch was not deferred: the writer should write now.
    urgent: bool,
    /// When the oldest queued deferred batch was queued.
    deferred_since: Option<Instant>,
}

impl Pending {
    /// Takes everything queued for one write: the encoded frames, their
    /// batches, and whether a roll was asked for.
    fn take(&mut self) -> (Bytes, Vec<PendingBatch>, bool) {
        self.urgent = false;
        self.deferred_since = None;
        (
            std::mem::take(&mut self.buf).freeze(),
            std::mem::take(&mut self.batches),
            std::mem::take(&mut self.roll_requested),
        )
    }
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    fs: Arc<dyn Fs>,
    config: LogConfig,
    pending: Mutex<Pending>,
    /// The pool worker that writes this log, and the log's place in its
    /// schedule; `finished` is signalled (under `sched`) when the worker
    /// is done with a closed log.
    worker: Arc<Worker>,
    sched: Mutex<Sched>,
    /// The sync of this log's whole file system its worker's rounds may
    /// use in place of an fdatasync of its file.
    whole_sync: Option<Arc<dyn WholeSync>>,
    finished: Condvar,
    segments: RwLock<Vec<Arc<Segment>>>,
    visible_next: AtomicU64,
    visible_tx: watch::Sender<Offset>,
    /// Offset after the last record written to the file (visible or not).
    written_next: AtomicU64,
    written_tx: watch::Sender<Offset>,
    cache: Arc<TailCache>,
    /// Room for pending appends: this log's own, or shared.
    space: Arc<Semaphore>,
    space_permits_max: usize,
    /// `space` is this log's alone (closed with the log).
    space_owned: bool,
    /// The log's state as of its last successful fdatasync: what a failed
    /// sync rewinds to.
    synced: Mutex<Mark>,
    /// How many times the log was rewound (see the module docs).
    rewinds: AtomicU64,
    /// Told of every rewind, with the offset the log went back to, before
    /// any record is written at that offset again.
    rewind_listener: Mutex<ListenerSlot>,
    /// The error of the last write or sync, until one succeeds again.
    write_error: Mutex<Option<String>>,
    /// Held while taking pending batches and writing them, so batches reach
    /// the file in offset order whoever writes them: the writer thread, or
    /// under `never` an appender that finds the log idle
    /// ([`Log::write_inline`]).
    write_lock: Mutex<()>,
}

/// Called with the offset a log was rewound to; see [`Log::on_rewind`].
pub type RewindListener = Arc<dyn Fn(Offset) + Send + Sync>;

struct ListenerSlot(Option<RewindListener>);

impl std::fmt::Debug for ListenerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// A point of the log to rewind to: the active segment's state then.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// Segments in the log (the active one is the last).
    segments: usize,
    len: u64,
    next: Offset,
    index_entries: usize,
    max_time_us: u64,
}

impl Mark {
    fn of(segments: usize, st: &SegmentState) -> Mark {
        Mark {
            segments,
            len: st.len,
            next: st.next,
            index_entries: st.index.entries.len(),
            max_time_us: st.max_time_us,
        }
    }
}

/// An append-only segmented log. Cloning is cheap and shares the log.
#[derive(Debug, Clone)]
pub struct Log {
    shared: Arc<Shared>,
    _writer: Arc<WriterHandle>,
}

/// Closes the log when its last handle goes, and keeps its writer pool
/// alive until then.
#[derive(Debug)]
struct WriterHandle {
    shared: Arc<Shared>,
    _pool: WriterPool,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.shared.close_and_join();
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Log {
    /// Opens the log in `dir`, creating it if empty, and recovers it: the
    /// active segment is scanned and a torn or corrupt tail truncated;
    /// missing or inconsistent index files of sealed segments are rebuilt.
    /// `first_offset` is where a brand-new log starts.
    pub fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        config: LogConfig,
        first_offset: Offset,
    ) -> Result<(Log, RecoveryReport)> {
        let io = |e| StorageError::io(dir, e);
        if !fs.exists(dir) {
            // The directory's own entry must be durable too, or a power cut
            // could take every fdatasync'd segment with it.
            crate::storage::io::create_dir_all_durable(fs.as_ref(), dir).map_err(io)?;
        }
        let mut report = RecoveryReport::default();
        let names = fs.list_dir(dir).map_err(io)?;
        let mut bases: Vec<Offset> = names
            .iter()
            .filter_map(|n| segment::parse_segment_file_name(n))
            .collect();
        bases.sort();
        for name in &names {
            if name.ends_with(".tmp") {
                let _ = fs.remove_file(&dir.join(name));
            }
        }
        let mut segments = Vec::with_capacity(bases.len().max(1));
        if bases.is_empty() {
            segments.push(Arc::new(create_segment(
                fs.as_ref(),
                dir,
                first_offset,
                &config,
            )?));
            fs.sync_dir(dir).map_err(io)?;
        }
        for (i, base) in bases.iter().enumerate() {
            let last = i + 1 == bases.len();
            let next_base = bases.get(i + 1).copied();
            let seg = recover_segment(
                fs.as_ref(),
                dir,
                *base,
                last,
                next_base,
                &config,
                &mut report,
            )?;
            segments.push(Arc::new(seg));
        }
        let active = segments.last().expect("at least one segment");
        let next = active.state.read().next;
        // What recovery found is what the disk holds.
        let synced = Mark::of(segments.len(), &active.state.read());
        let last_time_us = segments
            .iter()
            .map(|s| s.state.read().max_time_us)
            .max()
            .unwrap_or(0);
        let (visible_tx, _) = watch::channel(next);
        let (written_tx, _) = watch::channel(next);
        let memory = config.shared_memory.clone().unwrap_or_else(|| {
            SharedMemory::new(config.pending_bytes_max, config.tail_cache_bytes_max)
        });
        let space_owned = config.shared_memory.is_none();
        let pool = match &config.writers {
            Some(pool) => pool.clone(),
            None => WriterPool::new(1).map_err(|e| StorageError::io(dir, e))?,
        };
        let whole_sync = if pool.whole_syncs() {
            fs.whole_sync(dir)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            fs,
            pending: Mutex::new(Pending {
                next_offset: next,
                last_time_us,
                ..Pending::default()
            }),
            worker: pool.assign(),
            sched: Mutex::new(Sched::default()),
            whole_sync,
            finished: Condvar::new(),
            segments: RwLock::new(segments),
            visible_next: AtomicU64::new(next.0),
            visible_tx,
            written_next: AtomicU64::new(next.0),
            written_tx,
            cache: TailCache::new(memory.cache),
            space: memory.appends,
            space_permits_max: memory.appends_bytes_max,
            space_owned,
            synced: Mutex::new(synced),
            rewinds: AtomicU64::new(0),
            rewind_listener: Mutex::new(ListenerSlot(None)),
            write_error: Mutex::new(None),
            write_lock: Mutex::new(()),
            config,
        });
        let writer = Arc::new(WriterHandle {
            shared: shared.clone(),
            _pool: pool,
        });
        Ok((
            Log {
                shared,
                _writer: writer,
            },
            report,
        ))
    }

    /// The directory holding this log's files.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends a batch and waits until it is complete under the log's fsync
    /// mode. Waits first for room if the writer is behind by more than
    /// `pending_bytes_max`.
    ///
    /// # Errors
    /// `TooLarge` for a record that cannot be framed, `Closed` after
    /// [`Log::close`], `Failed` after an earlier I/O error, `Io` if this
    /// batch's write or sync failed.
    ///
    /// # Cancel safety
    /// Cancelling before the batch is queued appends nothing; cancelling
    /// after leaves the append to complete on its own.
    pub async fn append(&self, records: &[NewRecord]) -> Result<Appended> {
        self.append_queued(records).await?.wait().await
    }

    /// Like [`Log::append`], but returns as soon as the batch is queued
    /// (its offsets fixed, so batches queued one after the other are
    /// appended in that order), with a ticket that resolves once it is
    /// complete. Waits only for room in the pending buffer.
    ///
    /// # Errors
    /// As [`Log::append`], but for the write itself: that error comes
    /// from the ticket.
    pub async fn append_queued(&self, records: &[NewRecord]) -> Result<AppendTicket> {
        let bytes: usize = records.iter().map(NewRecord::frame_len).sum();
        let permits = bytes.clamp(1, self.shared.space_permits_max);
        let permit = self
            .shared
            .space
            .clone()
            .acquire_many_owned(u32::try_from(permits).unwrap_or(u32::MAX))
            .await
            .map_err(|_| StorageError::Closed {
                path: self.shared.dir.clone(),
            })?;
        self.enqueue_inner(records, Some(permit), false)
    }

    /// Queues a batch without waiting for room or completion: the batch's
    /// position in the log is fixed when this returns.
    pub fn enqueue(&self, records: &[NewRecord]) -> Result<AppendTicket> {
        self.enqueue_inner(records, None, false)
    }

    /// Like [`Log::enqueue`], for a batch nobody is waiting on urgently:
    /// the writer holds it for up to [`LogConfig::defer_max`] so that it
    /// shares the write and sync of the next ordinary batch instead of
    /// costing one of its own. Durability is unchanged: the ticket still
    /// resolves only once the batch is complete under the fsync mode.
    pub fn enqueue_deferred(&self, records: &[NewRecord]) -> Result<AppendTicket> {
        self.enqueue_inner(records, None, true)
    }

    fn enqueue_inner(
        &self,
        records: &[NewRecord],
        permit: Option<OwnedSemaphorePermit>,
        deferred: bool,
    ) -> Result<AppendTicket> {
        if records.is_empty() {
            return Err(StorageError::EmptyBatch);
        }
        for r in records {
            if let Err(what) = record::check_encodable(r) {
                return Err(StorageError::TooLarge {
                    what,
                    actual: r.frame_len() as u64,
                    limit: (record::FRAME_BODY_BYTES_MAX + record::FRAME_HEADER_BYTES) as u64,
                });
            }
        }
        let (tx, rx) = oneshot::channel();
        let mut pending = self.shared.pending.lock();
        if let Some(cause) = &pending.failed {
            return Err(StorageError::Failed {
                path: self.shared.dir.clone(),
                cause: cause.clone(),
            });
        }
        if pending.closed {
            return Err(StorageError::Closed {
                path: self.shared.dir.clone(),
            });
        }
        let time = now_us().max(pending.last_time_us);
        pending.last_time_us = time;
        let base = pending.next_offset;
        for (i, r) in records.iter().enumerate() {
            record::encode(&mut pending.buf, r, Offset(base.0 + i as u64), time);
        }
        let last = Offset(base.0 + records.len() as u64 - 1);
        pending.next_offset = Offset(last.0 + 1);
        let end = pending.buf.len();
        pending.batches.push(PendingBatch {
            end,
            appended: Appended {
                base_offset: base,
                last_offset: last,
                publish_time_us: time,
            },
            done: tx,
            _permit: permit,
        });
        // Wake the writer when its wait changes: the first ordinary batch
        // ends it, the first deferred one gives it a deadline.
        let wake = if deferred {
            let first = pending.deferred_since.is_none() && !pending.urgent;
            pending.deferred_since.get_or_insert_with(Instant::now);
            first
        } else {
            !std::mem::replace(&mut pending.urgent, true)
        };
        drop(pending);
        if wake && (deferred || !self.write_inline()) {
            self.shared.worker.kick(&self.shared);
        }
        Ok(AppendTicket {
            rx,
            path: self.shared.dir.clone(),
        })
    }

    /// Under `never`, where completing an append takes no fdatasync, writes
    /// the pending batches on the caller's thread if no one else is
    /// writing: this saves two thread hand-offs (to the writer and back)
    /// per append, most of an append's latency on an idle log. Returns
    /// false, leaving the work to the writer thread, under other modes,
    /// when the log is busy, closed or failed, or when a roll is due
    /// (rolling syncs; that stays on the writer thread).
    fn write_inline(&self) -> bool {
        let shared = &*self.shared;
        if shared.config.fsync != FsyncMode::Never {
            return false;
        }
        let Some(_writing) = shared.write_lock.try_lock() else {
            return false;
        };
        let (buf, batches, roll) = {
            let mut pending = shared.pending.lock();
            if pending.closed || pending.failed.is_some() || pending.roll_requested {
                return false;
            }
            let active_len = shared.active().state.read().len;
            if active_len + pending.buf.len() as u64 > shared.config.segment_bytes_max {
                return false;
            }
            pending.take()
        };
        if !batches.is_empty() {
            complete_write(shared, buf, batches, roll, false);
        }
        true
    }

    /// Offset after the last record readers may see.
    pub fn next_offset(&self) -> Offset {
        Offset(self.shared.visible_next.load(Ordering::Acquire))
    }

    /// Offset the next queued record will get (queued records may not be
    /// written or visible yet).
    pub fn pending_next_offset(&self) -> Offset {
        self.shared.pending.lock().next_offset
    }

    /// Oldest retained offset.
    pub fn first_offset(&self) -> Offset {
        self.shared.segments.read()[0].base
    }

    /// A receiver of the visible next offset, for waiting on new records.
    pub fn watch(&self) -> watch::Receiver<Offset> {
        self.shared.visible_tx.subscribe()
    }

    /// A receiver of the written next offset: it changes as soon as new
    /// records are written, before they are durable.
    pub fn watch_written(&self) -> watch::Receiver<Offset> {
        self.shared.written_tx.subscribe()
    }

    /// Why the log cannot write right now: its last write or sync failed
    /// (a full disk, an I/O error) and none has succeeded since. `None`
    /// when healthy.
    pub fn write_problem(&self) -> Option<String> {
        if let Some(cause) = &self.shared.pending.lock().failed {
            return Some(cause.clone());
        }
        self.shared.write_error.lock().clone()
    }

    /// How many times this log was rewound after a failed write or sync.
    /// A reader that read records (with [`Log::read_written`]) when this
    /// was `n` must not use them if it is no longer `n`.
    pub fn rewinds(&self) -> u64 {
        self.shared.rewinds.load(Ordering::Acquire)
    }

    /// Sets the function told of every rewind (the offset the log went back
    /// to), called on the writer's thread before anything is written at
    /// that offset again. It must not append to this log.
    pub fn on_rewind(&self, listener: RewindListener) {
        self.shared.rewind_listener.lock().0 = Some(listener);
    }

    /// Like [`Log::wait_visible`] for records read when [`Log::rewinds`]
    /// was `rewinds`.
    ///
    /// # Errors
    /// As `wait_visible`, and `Rewound` if the log was rewound since.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn wait_visible_since(&self, next: Offset, rewinds: u64) -> Result<()> {
        let mut rx = self.shared.visible_tx.subscribe();
        loop {
            if self.rewinds() != rewinds {
                return Err(StorageError::Rewound {
                    path: self.shared.dir.clone(),
                });
            }
            if self.next_offset() >= next {
                return Ok(());
            }
            self.check_waitable(next)?;
            if rx.changed().await.is_err() {
                return Err(StorageError::Closed {
                    path: self.shared.dir.clone(),
                });
            }
        }
    }

    fn check_waitable(&self, next: Offset) -> Result<()> {
        let pending = self.shared.pending.lock();
        if let Some(cause) = &pending.failed {
            return Err(StorageError::Failed {
                path: self.shared.dir.clone(),
                cause: cause.clone(),
            });
        }
        if pending.closed && pending.batches.is_empty() && self.next_offset() < next {
            return Err(StorageError::Closed {
                path: self.shared.dir.clone(),
            });
        }
        Ok(())
    }

    /// Waits until every record below `next` is visible (durable under the
    /// fsync mode).
    ///
    /// # Errors
    /// `Failed` if the log failed (those records will never be durable),
    /// `Closed` if it was closed first.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn wait_visible(&self, next: Offset) -> Result<()> {
        let mut rx = self.shared.visible_tx.subscribe();
        loop {
            if self.next_offset() >= next {
                return Ok(());
            }
            self.check_waitable(next)?;
            if rx.changed().await.is_err() {
                return Err(StorageError::Closed {
                    path: self.shared.dir.clone(),
                });
            }
        }
    }

    /// Asks the writer to roll the active segment before its next write, so
    /// that everything appended so far can later be deleted by
    /// [`Log::truncate_before`].
    pub fn request_roll(&self) {
        self.shared.pending.lock().roll_requested = true;
    }

    /// Offsets, segment count and bytes on disk.
    pub fn stats(&self) -> LogStats {
        let segments = self.shared.segments.read();
        LogStats {
            first_offset: segments[0].base,
            next_offset: self.next_offset(),
            segments: u32::try_from(segments.len()).unwrap_or(u32::MAX),
            disk_bytes: segments.iter().map(|s| s.state.read().len).sum(),
        }
    }

    /// Approximate bytes of records at offsets `>= from`, from the index.
    pub fn bytes_from(&self, from: Offset) -> u64 {
        let segments = self.shared.segments.read();
        let mut total = 0;
        for seg in segments.iter() {
            let st = seg.state.read();
            if st.next <= from {
                continue;
            }
            if seg.base >= from {
                total += st.len - SEGMENT_HEADER_BYTES;
            } else {
                let rel = from.0 - seg.base.0;
                let e = st
                    .index
                    .entries
                    .partition_point(|e| u64::from(e.rel_offset) <= rel)
                    .saturating_sub(1);
                let pos = st
                    .index
                    .entries
                    .get(e)
                    .map_or(SEGMENT_HEADER_BYTES, |e| u64::from(e.pos));
                total += st.len - pos;
            }
        }
        total
    }

    /// Bytes of index entries held in memory, for the memory budget.
    pub fn index_memory_bytes(&self) -> usize {
        let segments = self.shared.segments.read();
        segments
            .iter()
            .map(|s| s.state.read().index.entries.capacity() * std::mem::size_of::<IndexEntry>())
            .sum()
    }

    /// Stops accepting appends, lets the writer finish and sync what is
    /// queued, waits for it, and releases every segment's file descriptor
    /// (a read already under way finishes first; reads after this fail
    /// with `Closed`), so nothing keeps the log's directory busy.
    pub fn close(&self) {
        self.shared.close_and_join();
        for seg in self.shared.segments.read().iter() {
            seg.file.write().take();
        }
    }
}

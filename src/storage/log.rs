//! [`Log`]: one append-only, segmented, checksummed log (a topic's messages,
//! a subscription's dead letters, or the broker's state journal).
//!
//! Write path (docs/durability.md numbers the same steps):
//! 1. `append`/`enqueue` check every record, take the pending lock, assign
//!    dense offsets and a non-decreasing publish time, encode the frames into
//!    the shared pending buffer and queue a completion. Appends from many
//!    tasks land in one buffer: that is the coalescing.
//! 2. The log's writer thread takes the whole pending buffer, rolls the
//!    active segment if the batch would overflow it, and writes it with one
//!    positional write per segment touched.
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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

use crate::storage::cache::{CacheBudget, TailCache};
use crate::storage::error::{Result, StorageError};
use crate::storage::io::{File, Fs, OpenMode};
use crate::storage::record::{self, NewRecord, Record};
use crate::storage::segment::{
    self, IndexBuilder, IndexEntry, SEGMENT_HEADER_BYTES, index_file_name, segment_file_name,
};
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
    wake: Condvar,
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
    writer: Arc<WriterHandle>,
}

#[derive(Debug)]
struct WriterHandle {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.shared.close_and_join(&self.thread);
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
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            fs,
            pending: Mutex::new(Pending {
                next_offset: next,
                last_time_us,
                ..Pending::default()
            }),
            wake: Condvar::new(),
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
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("courier-log-writer".into())
            .stack_size(256 * 1024)
            .spawn(move || writer_loop(&thread_shared))
            .map_err(|e| StorageError::io(dir, e))?;
        let writer = Arc::new(WriterHandle {
            shared: shared.clone(),
            thread: Mutex::new(Some(thread)),
        });
        Ok((Log { shared, writer }, report))
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
        self.enqueue_inner(records, Some(permit), false)?
            .wait()
            .await
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
            self.shared.wake.notify_one();
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
        self.shared.close_and_join(&self.writer.thread);
        for seg in self.shared.segments.read().iter() {
            seg.file.write().take();
        }
    }
}

impl Shared {
    fn close_and_join(&self, thread: &Mutex<Option<std::thread::JoinHandle<()>>>) {
        self.pending.lock().closed = true;
        self.wake.notify_all();
        if self.space_owned {
            self.space.close();
        }
        if let Some(handle) = thread.lock().take() {
            let _ = handle.join();
        }
        // Wake anyone still waiting for visibility after the last write.
        self.visible_tx.send_modify(|_| {});
    }

    fn active(&self) -> Arc<Segment> {
        self.segments
            .read()
            .last()
            .expect("a log always has an active segment")
            .clone()
    }

    /// The log's state now.
    fn mark(&self) -> Mark {
        let segments = self.segments.read();
        Mark::of(
            segments.len(),
            &segments.last().expect("an active segment").state.read(),
        )
    }

    /// Fails `batches` and everything queued behind them with `err`, and
    /// rewinds the log to `to`. Returns false if the rewind failed too (the
    /// log is then failed until [`Shared::recover`] works).
    fn rewind(&self, to: Mark, err: &StorageError, mut batches: Vec<PendingBatch>) -> bool {
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
    fn undo_to(&self, to: Mark) -> Result<()> {
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
    fn recover(&self) -> bool {
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

    fn fail(&self, err: &StorageError) {
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

fn create_segment(fs: &dyn Fs, dir: &Path, base: Offset, config: &LogConfig) -> Result<Segment> {
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

fn recover_segment(
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

/// The writer thread: takes pending batches, writes, syncs, completes.
fn writer_loop(shared: &Shared) {
    let interval = match shared.config.fsync {
        FsyncMode::Interval(ms) => Some(Duration::from_millis(ms.max(1))),
        _ => None,
    };
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    loop {
        {
            let mut pending = shared.pending.lock();
            loop {
                if pending.urgent || pending.closed || pending.failed.is_some() {
                    break;
                }
                let deferred = pending
                    .deferred_since
                    .map(|since| since + shared.config.defer_max);
                let sync = match interval {
                    Some(every) if unsynced => Some(last_sync + every),
                    _ => None,
                };
                match deferred.into_iter().chain(sync).min() {
                    Some(deadline) => {
                        if Instant::now() >= deadline {
                            break;
                        }
                        shared.wake.wait_until(&mut pending, deadline);
                    }
                    None => shared.wake.wait(&mut pending),
                }
            }
            if pending.failed.is_some() {
                if pending.closed {
                    return;
                }
                shared.wake.wait_for(&mut pending, RECOVER_EVERY);
                if pending.failed.is_none() || pending.closed {
                    continue;
                }
                drop(pending);
                let _writing = shared.write_lock.lock();
                shared.recover();
                continue;
            }
            if pending.batches.is_empty() && pending.closed {
                drop(pending);
                let _writing = shared.write_lock.lock();
                if unsynced || shared.config.fsync == FsyncMode::Never {
                    let active = shared.active();
                    if let Err(e) = active.sync_data() {
                        tracing::error!(error = %e, "final sync failed");
                    }
                }
                return;
            }
            if !pending.batches.is_empty() {
                drop(pending);
                // Take the batches under the write lock, so an inline
                // writer cannot write later batches before these.
                let writing = shared.write_lock.lock();
                let (buf, batches, roll) = shared.pending.lock().take();
                if batches.is_empty() {
                    // An inline writer took them first.
                    continue;
                }
                let sync = shared.config.fsync == FsyncMode::Always
                    || interval.is_some_and(|every| last_sync.elapsed() >= every);
                let written = complete_write(shared, buf, batches, roll, sync);
                drop(writing);
                if !written {
                    continue; // failed: the loop above retries the rewind
                }
                if sync {
                    unsynced = false;
                    last_sync = Instant::now();
                } else {
                    unsynced = true;
                }
                continue;
            }
        }
        // Interval sync with nothing new queued.
        let _writing = shared.write_lock.lock();
        if let Err(err) = shared.active().sync_data() {
            tracing::error!(error = %err, "fdatasync failed; rewinding to the last successful one");
            let synced = *shared.synced.lock();
            shared.rewind(synced, &err, Vec::new());
        } else {
            *shared.synced.lock() = shared.mark();
        }
        unsynced = false;
        last_sync = Instant::now();
    }
}

/// Writes taken batches, syncs them if `sync`, makes them visible and
/// completes them. On a failed write or sync the batches fail and the log
/// rewinds (see the module docs). Returns false if the log is failed. The
/// caller holds the write lock.
fn complete_write(
    shared: &Shared,
    buf: Bytes,
    batches: Vec<PendingBatch>,
    roll: bool,
    sync: bool,
) -> bool {
    let before = shared.mark();
    if let Err(err) = write_batches(shared, &buf, &batches, roll) {
        tracing::error!(dir = %shared.dir.display(), error = %err, "log write failed; rewinding to before it");
        return shared.rewind(before, &err, batches);
    }
    let last = batches.last().expect("non-empty").appended.last_offset;
    let first = batches[0].appended.base_offset;
    shared.cache.push(first, Offset(last.0 + 1), buf);
    shared.written_next.store(last.0 + 1, Ordering::Release);
    shared.written_tx.send_replace(Offset(last.0 + 1));
    if sync {
        if let Err(err) = shared.active().sync_data() {
            tracing::error!(error = %err, "fdatasync failed; rewinding to the last successful one");
            let synced = *shared.synced.lock();
            return shared.rewind(synced, &err, batches);
        }
        *shared.synced.lock() = shared.mark();
    }
    shared.visible_next.store(last.0 + 1, Ordering::Release);
    shared.visible_tx.send_replace(Offset(last.0 + 1));
    for batch in batches {
        let _ = batch.done.send(Ok(batch.appended));
    }
    if shared.write_error.lock().is_some() {
        *shared.write_error.lock() = None;
        tracing::info!(dir = %shared.dir.display(), "log writes again");
    }
    true
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

//! The broker: topics, subscriptions, publishing, leases, acks, dead
//! letters and administration, on top of the storage layer.
//!
//! - mod.rs: [`Broker`], the registry of topics and subscriptions, open
//!   and close, the background ticker (lease expiry, retention, journal
//!   compaction), and the helpers admin operations share.
//! - topics.rs: create, delete and look up topics; publish.
//! - subscriptions.rs: create, update, delete and look up subscriptions.
//! - redrive.rs: redrive (with a replacement) and purge dead letters.
//! - status.rs: a message's status, broker stats, logs that cannot write.
//! - topic.rs: [`Topic`], a definition plus its one [`Log`].
//! - subscription/: [`Subscription`], a cursor plus ack state over the
//!   topic's log: leasing, acks, nacks, deadlines, dead-lettering.
//! - dead_letter.rs: how dead letters are stored and decoded.
//! - ack_id.rs: opaque ack ids, bound to their subscription by a keyed tag.
//! - recovery.rs: at open, every directory is matched with its definition;
//!   nothing unaccounted is deleted.
//! - config.rs: settings and every limit.
//!
//! The broker knows nothing of gRPC: the API layer maps its types and
//! errors to the protocol.

pub mod ack_id;
pub mod config;
pub mod dead_letter;
pub mod error;
pub mod memory;
pub mod recovery;
mod redrive;
pub mod retry;
mod status;
pub mod subscription;
mod subscriptions;
pub mod topic;
mod topics;

pub use ack_id::{AckId, AckKey};
pub use config::BrokerConfig;
pub use dead_letter::{DeadLetter, DeadLetterReason, Redrive};
pub use error::{BrokerError, Result};
pub use memory::MemoryBudget;
pub use redrive::{RedriveFilter, Replacement};
pub use status::{BrokerStats, MessageStatus};
pub use subscription::{
    AckOutcome, ConsumerId, Delivery, LeaseLimits, MessageState, Subscription, SubscriptionStats,
};
pub use subscriptions::{SubscriptionSpec, SubscriptionUpdate};
pub use topic::Topic;
pub use topics::TopicStats;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::storage::io::{Fs, OsFs};
use crate::storage::meta::{MetaStore, RetentionMode, SubscriptionDef};
use crate::storage::state::{StateEntry, StateJournal, SubscriptionState};
use crate::storage::{Log, LogConfig, Offset, StorageError, WriterPool};

use recovery::DELETING_SUFFIX;
use subscription::SubscriptionEnv;
use topic::TopicMap;

const DIR_TOPICS: &str = "topics";
const DIR_SUBSCRIPTIONS: &str = "subscriptions";
const DIR_STATE: &str = "state";
const DIR_META: &str = "meta";
const DIR_DEAD_LETTERS: &str = "dead-letters";
const LOCK_FILE: &str = "courier.lock";
/// Segment size of dead-letter logs.
const DEAD_LETTER_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// The broker. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: BrokerConfig,
    fs: Arc<dyn Fs>,
    meta: MetaStore,
    journal: StateJournal,
    ack_key: AckKey,
    memory: MemoryBudget,
    /// The writer threads every log of the broker shares.
    writers: WriterPool,
    topics: Arc<TopicMap>,
    subs: RwLock<HashMap<String, Arc<Subscription>>>,
    /// Serializes admin changes (create, delete, update).
    admin: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    /// Turns true with `shutting_down`, for tasks that wait on it.
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    started: Instant,
    next_consumer: AtomicU64,
    ticker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    _lock: std::fs::File,
}

impl Broker {
    /// Opens the data directory, recovers every log and the state journal,
    /// and starts the background ticker. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// `Storage(Locked)` if another process holds the data directory.
    pub async fn open(config: BrokerConfig) -> Result<Broker> {
        Self::open_on(config, Arc::new(OsFs)).await
    }

    /// Like [`Broker::open`], with the logs, the journal and the ack key
    /// on `fs` (tests use a model file system). The definitions store and
    /// the lock file stay on the real `data_dir`.
    ///
    /// # Errors
    /// As [`Broker::open`].
    pub async fn open_on(config: BrokerConfig, fs: Arc<dyn Fs>) -> Result<Broker> {
        let dir = config.data_dir.clone();
        // Every directory created here is synced into its parent: a power
        // cut must not take a new data directory with what it holds.
        crate::storage::io::create_dir_all_durable(fs.as_ref(), &dir)
            .map_err(|e| StorageError::io(&dir, e))?;
        let lock = lock_data_dir(&dir)?;
        let meta_dir = dir.join(DIR_META);
        crate::storage::io::create_dir_all_durable(fs.as_ref(), &meta_dir)
            .map_err(|e| StorageError::io(&meta_dir, e))?;
        let meta = MetaStore::open(&meta_dir)?;
        let ack_key = AckKey::load_or_create(fs.as_ref(), &dir)?;
        let memory = MemoryBudget::new(&config)?;
        let writers = WriterPool::with_whole_syncs(config.writer_threads, config.syncfs)
            .map_err(|e| StorageError::io(&dir, e))?;
        let log_config = topic_log_config(&config, &memory, &writers);
        let journal_config = LogConfig {
            segment_bytes_max: config.segment_bytes_max,
            fsync: config.fsync,
            defer_max: Duration::from_millis(config.journal_defer_ms),
            // Acks free space: they must not fail when topics fill the disk.
            preallocate: true,
            // Read only at start and when compacting; its entries are small.
            tail_cache_bytes_max: 0,
            pending_bytes_max: JOURNAL_PENDING_BYTES_MAX,
            writers: Some(writers.clone()),
            ..LogConfig::default()
        };
        let (journal, mut states) =
            StateJournal::open(fs.clone(), &dir.join(DIR_STATE), journal_config)?;
        let topics: Arc<TopicMap> = Arc::new(RwLock::new(HashMap::new()));
        let accounted = recovery::account(
            fs.as_ref(),
            &meta,
            recovery::Layout {
                data_dir: &dir,
                topics_dir: &dir.join(DIR_TOPICS),
                subscriptions_dir: &dir.join(DIR_SUBSCRIPTIONS),
            },
            &states,
        )?;
        if accounted.restored > 0 || accounted.set_aside > 0 {
            tracing::warn!(
                restored = accounted.restored,
                set_aside = accounted.set_aside,
                "definitions restored from their directories / directories set aside in lost+found"
            );
        }
        let (topic_defs, sub_defs) = (accounted.topics, accounted.subscriptions);
        for def in topic_defs {
            let log = open_log(
                fs.clone(),
                &dir.join(DIR_TOPICS).join(def.id.to_string()),
                log_config.clone(),
                &def.name,
            )?;
            let name = def.name.clone();
            topics
                .write()
                .insert(name, Topic::new(def, log, Arc::downgrade(&topics)));
        }
        let broker = Broker {
            inner: Arc::new(Inner {
                fs,
                meta,
                journal,
                ack_key,
                memory,
                writers,
                topics,
                subs: RwLock::new(HashMap::new()),
                admin: tokio::sync::Mutex::new(()),
                shutting_down: AtomicBool::new(false),
                shutdown_tx: tokio::sync::watch::Sender::new(false),
                started: Instant::now(),
                next_consumer: AtomicU64::new(1),
                ticker: Mutex::new(None),
                _lock: lock,
                config,
            }),
        };
        for def in sub_defs {
            // recovery::account kept only subscriptions of known topics.
            let topic = broker
                .topic(&def.topic)
                .ok()
                .filter(|t| t.def().id == def.topic_id)
                .ok_or_else(|| BrokerError::NotFound {
                    kind: "topic",
                    name: def.topic.clone(),
                })?;
            // The journal only records changes; the starting position comes
            // from the definition.
            let mut state = states.remove(&def.id).unwrap_or_default();
            state.apply(&StateEntry::Floor {
                floor: def.start_offset,
            });
            // Deliveries are leased while their topic sync runs; a crash
            // (power loss) can keep the journal entry and lose the record.
            // Those offsets will name new messages: forget them.
            state.truncate_at(topic.log.next_offset());
            let sub = broker.attach_subscription(def, topic, state)?;
            let fixed = sub.reconcile_dead_letters().await?;
            if fixed > 0 {
                tracing::info!(subscription = %sub.name(), fixed, "settled messages dead-lettered just before a crash");
            }
        }
        let ticker = tokio::spawn(ticker_loop(Arc::downgrade(&broker.inner)));
        *broker.inner.ticker.lock() = Some(ticker);
        Ok(broker)
    }

    fn attach_subscription(
        &self,
        def: SubscriptionDef,
        topic: Arc<Topic>,
        state: SubscriptionState,
    ) -> Result<Arc<Subscription>> {
        let dir = self.sub_dir(def.id).join(DIR_DEAD_LETTERS);
        let dlq_config = LogConfig {
            segment_bytes_max: DEAD_LETTER_SEGMENT_BYTES,
            fsync: self.inner.config.fsync,
            tail_cache_bytes_max: 0,
            shared_memory: Some(self.inner.memory.logs()),
            writers: Some(self.inner.writers.clone()),
            ..LogConfig::default()
        };
        let dlq = dead_letter::DeadLetterLog::new(dir, self.inner.fs.clone(), dlq_config);
        let name = def.name.clone();
        let env = SubscriptionEnv {
            journal: self.inner.journal.clone(),
            window_max: self.inner.config.unacked_window_max,
            ack_key: self.inner.ack_key.clone(),
            notes: self.inner.memory.notes(),
        };
        let sub = Arc::new(Subscription::new(def, topic.clone(), dlq, state, env));
        topic.subs.write().push(sub.clone());
        self.inner.subs.write().insert(name, sub.clone());
        Ok(sub)
    }

    fn sub_dir(&self, id: u64) -> PathBuf {
        self.inner
            .config
            .data_dir
            .join(DIR_SUBSCRIPTIONS)
            .join(id.to_string())
    }

    fn topic_dir(&self, id: u64) -> PathBuf {
        self.inner
            .config
            .data_dir
            .join(DIR_TOPICS)
            .join(id.to_string())
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    fn check_running(&self) -> Result<()> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(BrokerError::ShuttingDown);
        }
        Ok(())
    }

    /// A fresh consumer id for a stream.
    pub fn new_consumer_id(&self) -> ConsumerId {
        self.inner.next_consumer.fetch_add(1, Ordering::Relaxed)
    }

    /// The broker's memory budget and what it holds.
    pub fn memory(&self) -> &MemoryBudget {
        &self.inner.memory
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Resolves once the broker starts shutting down.
    pub async fn shutting_down(&self) {
        let mut rx = self.inner.shutdown_tx.subscribe();
        let _ = rx.wait_for(|down| *down).await;
    }

    /// Starts shutting down: new operations fail with `ShuttingDown`.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.shutdown_tx.send_replace(true);
        for sub in self.inner.subs.read().values() {
            sub.wake_all();
        }
    }

    /// Closes the broker (as [`Broker::close`]) and waits until nothing
    /// else holds it, so that the data directory's lock is released when
    /// this returns: a new broker may open the directory at once. Tasks
    /// still holding it after [`RELEASE_WAIT`] are reported and left.
    pub async fn close_and_release(self) {
        let ticker = self.inner.ticker.lock().take();
        self.close();
        if let Some(t) = ticker {
            t.abort();
            let _ = t.await;
        }
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        while Arc::strong_count(&self.inner) > 1 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    holders = Arc::strong_count(&self.inner) - 1,
                    "tasks still hold the broker after it closed; the data directory stays locked until they end"
                );
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Stops the ticker and closes every log after syncing it.
    pub fn close(&self) {
        self.begin_shutdown();
        if let Some(t) = self.inner.ticker.lock().take() {
            t.abort();
        }
        for topic in self.inner.topics.read().values() {
            topic.log.close();
        }
        for sub in self.inner.subs.read().values() {
            sub.dlq.close();
        }
        self.inner.journal.close();
    }

    // ----- housekeeping -------------------------------------------------

    /// Deletes what retention allows, and compacts the journal when due.
    /// A failure on one topic is logged and the others still run; the
    /// first error is returned.
    pub async fn housekeeping(&self) -> Result<()> {
        if self.inner.memory.take_trim_wanted() {
            let _ = blocking(|| {
                memory::trim();
                Ok(())
            })
            .await;
        }
        let mut first_error = None;
        for topic in self.topics() {
            if let Err(e) = self.topic_housekeeping(&topic).await {
                tracing::error!(topic = %topic.name(), error = %e, "retention failed for this topic");
                first_error.get_or_insert(e);
            }
        }
        if self.inner.journal.disk_bytes() > self.inner.config.journal_compact_bytes {
            if let Err(e) = self.compact_journal().await {
                tracing::error!(error = %e, "journal compaction failed");
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One retention pass over a topic. Under drop-oldest, the offset the
    /// limits cut at is first recorded, durably, by every subscription
    /// (each counts what it had not settled and says so in one log line),
    /// and only then are the segments deleted: a crash in between leaves
    /// segments that the next pass deletes, never a loss nobody counted.
    /// Then, in every mode, segments every subscription has settled are
    /// deleted. File removal runs off the runtime's threads.
    async fn topic_housekeeping(&self, topic: &Arc<Topic>) -> Result<()> {
        let retention = topic.def().retention;
        let subs = topic.subscriptions();
        let mut first = topic.log.first_offset();
        if retention.mode == RetentionMode::DropOldest
            && (retention.max_age_ms.is_some() || retention.max_bytes.is_some())
        {
            first = first.max(topic.log.retention_cut(
                retention.max_age_ms.map(|ms| ms.saturating_mul(1000)),
                retention.max_bytes,
            ));
        }
        // Also catches up a subscription whose floor is below what an
        // earlier pass (or one before a restart) already removed.
        for sub in &subs {
            sub.drop_below(first).await?;
        }
        let floor = subs
            .iter()
            .map(|s| s.ack_floor())
            .min()
            .unwrap_or_else(|| topic.log.next_offset())
            .max(first);
        let log = topic.log.clone();
        blocking(move || {
            log.truncate_before(floor)?;
            for sub in subs {
                if let Some(dlq) = sub.dlq.existing()? {
                    dlq.truncate_before(sub.dlq_floor())?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Compacts the state journal: every entry queued before `cut` belongs
    /// to a subscription that existed when `cut` was taken, so once each of
    /// those has a durable snapshot (queued after `cut`, hence covering all
    /// its earlier entries), the segments wholly before `cut` can go.
    async fn compact_journal(&self) -> Result<()> {
        let before = self.inner.journal.disk_bytes();
        self.inner.journal.request_roll();
        let cut = self.inner.journal.tail_offset();
        let subs: Vec<Arc<Subscription>> = self.inner.subs.read().values().cloned().collect();
        let mut tickets = Vec::with_capacity(subs.len());
        for sub in &subs {
            tickets.push(sub.snapshot()?);
        }
        for t in tickets {
            t.wait().await?;
        }
        self.inner.journal.truncate_before(cut)?;
        tracing::info!(
            before,
            after = self.inner.journal.disk_bytes(),
            "state journal compacted"
        );
        Ok(())
    }
}

async fn ticker_loop(inner: std::sync::Weak<Inner>) {
    let (tick, housekeeping_every) = match inner.upgrade() {
        Some(i) => (
            Duration::from_millis(i.config.tick_ms.max(1)),
            Duration::from_millis(i.config.housekeeping_ms),
        ),
        None => return,
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_housekeeping = Instant::now();
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let broker = Broker { inner };
        if broker.is_shutting_down() {
            return;
        }
        // Only subscriptions with something due are ticked: an idle one
        // costs one uncontended lock per tick (taken outside the map's
        // lock, so a subscription busy under its own lock holds up no
        // creation or deletion).
        let now = Instant::now();
        let mut subs: Vec<Arc<Subscription>> = broker.inner.subs.read().values().cloned().collect();
        subs.retain(|sub| sub.tick_due(now));
        for sub in subs {
            sub.tick().await;
        }
        if last_housekeeping.elapsed() >= housekeeping_every {
            last_housekeeping = Instant::now();
            if let Err(e) = broker.housekeeping().await {
                tracing::error!(error = %e, "housekeeping failed");
            }
        }
    }
}

fn open_log(fs: Arc<dyn Fs>, dir: &Path, config: LogConfig, name: &str) -> Result<Log> {
    let (log, report) = Log::open(fs, dir, config, Offset(0))?;
    for finding in &report.findings {
        tracing::warn!(log = name, %finding, "recovery");
    }
    if report.truncated_bytes > 0 {
        tracing::warn!(
            log = name,
            bytes = report.truncated_bytes,
            "recovery truncated a torn or corrupt tail"
        );
    }
    Ok(log)
}

/// Log settings of a topic's log.
fn topic_log_config(
    config: &BrokerConfig,
    memory: &MemoryBudget,
    writers: &WriterPool,
) -> LogConfig {
    LogConfig {
        segment_bytes_max: config.segment_bytes_max,
        fsync: config.fsync,
        shared_memory: Some(memory.logs()),
        writers: Some(writers.clone()),
        ..LogConfig::default()
    }
}

/// Pending appends of the state journal, outside the memory budget (one
/// log of small entries).
const JOURNAL_PENDING_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Runs `work` in a task of its own, so that dropping the caller's future
/// (a cancelled RPC) cannot stop it half-way.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(BrokerError::ShuttingDown),
        },
    }
}

/// How often removing a deleted directory that an open file keeps busy
/// (ENOTEMPTY, EBUSY) is tried again, and how many tries in all: together
/// a second, since only a read already under way can still hold a file.
const REMOVE_BUSY_RETRY_MS: u64 = 20;
const REMOVE_BUSY_TRIES_MAX: u32 = 50;

/// How long [`Broker::close_and_release`] waits for tasks to let go.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs blocking file and metadata work off the async runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(BrokerError::ShuttingDown),
        },
    }
}

/// Renames `dir` to `{dir}.deleting` and syncs the parent: from then on a
/// crash leaves a deletion in progress (see `recovery`). Returns the new
/// path (`dir` itself if it does not exist).
fn mark_deleting(fs: &dyn Fs, dir: &Path) -> Result<PathBuf> {
    let mut doomed = dir.as_os_str().to_owned();
    doomed.push(DELETING_SUFFIX);
    let doomed = PathBuf::from(doomed);
    if !fs.exists(dir) {
        return Ok(doomed);
    }
    fs.rename(dir, &doomed)
        .map_err(|e| StorageError::io(dir, e))?;
    if let Some(parent) = dir.parent() {
        fs.sync_dir(parent)
            .map_err(|e| StorageError::io(parent, e))?;
    }
    Ok(doomed)
}

/// Undoes `mark_deleting` after the definition could not be removed. If
/// that fails too, recovery renames it back at the next start (the
/// definition is still there).
fn unmark_deleting(fs: &dyn Fs, doomed: &Path, dir: &Path) {
    if !fs.exists(doomed) {
        return;
    }
    let renamed = fs.rename(doomed, dir).and_then(|()| match dir.parent() {
        Some(parent) => fs.sync_dir(parent),
        None => Ok(()),
    });
    if let Err(e) = renamed {
        tracing::error!(dir = %dir.display(), error = %e, "cannot undo a failed deletion; the next start does");
    }
}

/// Sets a directory aside as `.deleting`, then removes it (a directory of a
/// create that failed, whose definition was never stored).
fn remove_dir(fs: &dyn Fs, dir: &Path) -> Result<()> {
    let doomed = mark_deleting(fs, dir)?;
    if fs.exists(&doomed) {
        fs.remove_dir_all(&doomed)
            .map_err(|e| StorageError::io(&doomed, e))?;
    }
    Ok(())
}

fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    use fs2::FileExt;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io(&path, e))?;
    if file.try_lock_exclusive().is_err() {
        return Err(StorageError::Locked {
            path: dir.to_path_buf(),
            lock: path,
        }
        .into());
    }
    Ok(file)
}

/// Resident set size of this process, from /proc.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Bytes of all files below `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

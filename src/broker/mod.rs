//! The broker: topics, subscriptions, publishing, leases, acks, dead
//! letters and administration, on top of the storage layer.
//!
//! - mod.rs: [`Broker`], the registry of topics and subscriptions, admin
//!   operations, publish, the background ticker (lease expiry, retention,
//!   journal compaction), open and close.
//! - topic.rs: [`Topic`], a definition plus its one [`Log`].
//! - subscription.rs: [`Subscription`], a cursor plus ack state over the
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
pub mod retry;
pub mod subscription;
pub mod topic;

pub use ack_id::{AckId, AckKey};
pub use config::BrokerConfig;
pub use dead_letter::{DeadLetter, DeadLetterReason, Redrive};
pub use error::{BrokerError, Result};
pub use memory::MemoryBudget;
pub use subscription::{
    AckOutcome, ConsumerId, Delivery, LeaseLimits, MessageState, Subscription, SubscriptionStats,
};
pub use topic::Topic;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::storage::definition;
use crate::storage::io::{Fs, OsFs};
use crate::storage::meta::{
    DeadLetterPolicy, MetaStore, Retention, RetentionMode, RetryPolicy, SubscriptionDef, TopicDef,
};
use crate::storage::state::{StateEntry, StateJournal, SubscriptionState};
use crate::storage::{
    Appended, Attribute, Log, LogConfig, NewRecord, Offset, StorageError, Target,
};

use recovery::{DELETING_SUFFIX, KIND_SUBSCRIPTION, KIND_TOPIC};
use subscription::{SubscriptionEnv, now_us};
use topic::TopicMap;

const DIR_TOPICS: &str = "topics";
const DIR_SUBSCRIPTIONS: &str = "subscriptions";
const DIR_STATE: &str = "state";
const DIR_META: &str = "meta";
const DIR_DEAD_LETTERS: &str = "dead-letters";
const LOCK_FILE: &str = "courier.lock";
/// Segment size of dead-letter logs.
const DEAD_LETTER_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// A new subscription, as an admin asks for it.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionSpec {
    pub name: String,
    pub topic: String,
    /// `None` = the default.
    pub ack_deadline_ms: Option<u64>,
    pub retry: RetryPolicy,
    pub dead_letter: Option<DeadLetterPolicy>,
    pub from_earliest: bool,
}

/// Which fields an update changes.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionUpdate {
    pub ack_deadline_ms: Option<Option<u64>>,
    pub retry: Option<RetryPolicy>,
    pub dead_letter: Option<Option<DeadLetterPolicy>>,
}

/// Topic figures.
#[derive(Debug, Clone, Copy)]
pub struct TopicStats {
    pub first_offset: u64,
    pub next_offset: u64,
    pub retained_bytes: u64,
    pub segments: u32,
    pub subscriptions: u32,
}

/// Broker-wide figures.
#[derive(Debug, Clone)]
pub struct BrokerStats {
    pub resident_memory_bytes: u64,
    pub data_dir_bytes: u64,
    pub uptime_ms: u64,
    pub topics: u32,
    pub subscriptions: u32,
    pub fsync: String,
    pub memory_max_bytes: u64,
    pub memory: memory::MemoryUse,
}

/// A message's status on each subscription of its topic.
#[derive(Debug, Clone)]
pub struct MessageStatus {
    pub publish_time_us: Option<u64>,
    /// Per subscription: the message's state there, and whether a redrive
    /// put it there.
    pub subscriptions: Vec<(String, MessageState, Option<Redrive>)>,
}

/// Which dead letters to redrive.
#[derive(Debug, Clone, Default)]
pub struct RedriveFilter {
    /// Message ids; empty = all.
    pub message_ids: Vec<u64>,
    pub reason: Option<DeadLetterReason>,
    /// New content for the one dead letter named in `message_ids`.
    pub replacement: Option<Replacement>,
}

/// What an operator replaces in a dead letter they redrive; `None` keeps
/// the dead letter's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replacement {
    pub data: Option<Bytes>,
    pub attributes: Option<Vec<Attribute>>,
}

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
    topics: Arc<TopicMap>,
    subs: RwLock<HashMap<String, Arc<Subscription>>>,
    /// Serializes admin changes (create, delete, update).
    admin: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
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
        let fs: Arc<dyn Fs> = Arc::new(OsFs);
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
        let log_config = topic_log_config(&config, &memory);
        let journal_config = LogConfig {
            segment_bytes_max: config.segment_bytes_max,
            fsync: config.fsync,
            defer_max: Duration::from_millis(config.journal_defer_ms),
            // Acks free space: they must not fail when topics fill the disk.
            preallocate: true,
            // Read only at start and when compacting; its entries are small.
            tail_cache_bytes_max: 0,
            pending_bytes_max: JOURNAL_PENDING_BYTES_MAX,
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
                topics,
                subs: RwLock::new(HashMap::new()),
                admin: tokio::sync::Mutex::new(()),
                shutting_down: AtomicBool::new(false),
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

    // ----- topics -------------------------------------------------------

    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.inner
            .topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound {
                kind: "topic",
                name: name.to_string(),
            })
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        let mut all: Vec<Arc<Topic>> = self.inner.topics.read().values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Creates a topic: its directory, definition file and definition are
    /// durable when this returns.
    ///
    /// # Cancel safety
    /// Runs in a task of its own: dropping the future does not stop the
    /// change half-way; it completes or fails as a whole.
    pub async fn create_topic(&self, name: &str, retention: Retention) -> Result<Arc<Topic>> {
        let (this, name) = (self.clone(), name.to_string());
        detached(async move { this.create_topic_in_task(&name, retention).await }).await
    }

    async fn create_topic_in_task(&self, name: &str, retention: Retention) -> Result<Arc<Topic>> {
        self.check_running()?;
        config::check_name("name", name)?;
        if retention.max_age_ms == Some(0) {
            return Err(BrokerError::invalid(
                "retention.max_age_ms",
                "must be at least 1 when set",
            ));
        }
        if retention.max_bytes == Some(0) {
            return Err(BrokerError::invalid(
                "retention.max_bytes",
                "must be at least 1 when set",
            ));
        }
        if retention.mode == RetentionMode::RejectPublish {
            if retention.max_bytes.is_none() {
                return Err(BrokerError::invalid(
                    "retention.mode",
                    "reject-publish needs retention.max_bytes: publishes are refused while the unsettled backlog is at that bound",
                ));
            }
            if retention.max_age_ms.is_some() {
                return Err(BrokerError::invalid(
                    "retention.max_age_ms",
                    "cannot be combined with retention mode reject-publish, which never removes a message a subscription has not settled (settled ones are removed anyway); use drop-oldest to remove messages by age",
                ));
            }
        }
        let _admin = self.inner.admin.lock().await;
        if self.inner.topics.read().contains_key(name) {
            return Err(BrokerError::AlreadyExists {
                kind: "topic",
                name: name.to_string(),
            });
        }
        if self.inner.topics.read().len() >= self.inner.config.topics_max {
            return Err(BrokerError::ResourceExhausted(format!(
                "the broker already has the maximum of {} topics",
                self.inner.config.topics_max
            )));
        }
        let def = TopicDef {
            id: self.inner.meta.next_id()?,
            name: name.to_string(),
            retention,
            created_ms: now_us() / 1000,
        };
        // The directory and its definition file first, then the store: a
        // crash in between leaves a directory that recovery restores.
        let (fs, meta) = (self.inner.fs.clone(), self.inner.meta.clone());
        let (dir, config) = (
            self.topic_dir(def.id),
            topic_log_config(&self.inner.config, &self.inner.memory),
        );
        let stored = def.clone();
        let log = blocking(move || {
            let log = open_log(fs.clone(), &dir, config, &stored.name)?;
            let kept = definition::write(fs.as_ref(), &dir, KIND_TOPIC, &stored)
                .and_then(|()| meta.create_topic(&stored))
                .map_err(|e| match e {
                    StorageError::AlreadyExists { kind, name } => {
                        BrokerError::AlreadyExists { kind, name }
                    }
                    other => other.into(),
                });
            if let Err(e) = kept {
                log.close();
                if let Err(cleanup) = remove_dir(fs.as_ref(), &dir) {
                    tracing::warn!(dir = %dir.display(), error = %cleanup, "cannot remove the directory of a topic that was not created");
                }
                return Err(e);
            }
            Ok(log)
        })
        .await?;
        let topic = Topic::new(def, log, Arc::downgrade(&self.inner.topics));
        self.inner
            .topics
            .write()
            .insert(name.to_string(), topic.clone());
        tracing::info!(topic = name, "topic created");
        Ok(topic)
    }

    /// Deletes a topic and its files; with `force` also its subscriptions,
    /// whose names it returns.
    ///
    /// # Errors
    /// `FailedPrecondition` naming them if the topic has subscriptions and
    /// `force` is false, or if it is another subscription's dead-letter
    /// forward topic.
    ///
    /// # Cancel safety
    /// Runs in a task of its own: dropping the future does not stop the
    /// change half-way; it completes or fails as a whole.
    pub async fn delete_topic(&self, name: &str, force: bool) -> Result<Vec<String>> {
        let (this, name) = (self.clone(), name.to_string());
        detached(async move { this.delete_topic_in_task(&name, force).await }).await
    }

    async fn delete_topic_in_task(&self, name: &str, force: bool) -> Result<Vec<String>> {
        self.check_running()?;
        let _admin = self.inner.admin.lock().await;
        let topic = self.topic(name)?;
        let forwarding: Vec<String> = self
            .inner
            .subs
            .read()
            .values()
            .filter(|s| s.def().dead_letter.and_then(|p| p.forward_topic).as_deref() == Some(name))
            .filter(|s| s.def().topic != name)
            .map(|s| s.name())
            .collect();
        if let Some(first) = forwarding.first() {
            return Err(BrokerError::FailedPrecondition(format!(
                "topic {name:?} is the dead-letter forward topic of subscription {first:?}; change that policy first"
            )));
        }
        let mut subs: Vec<String> = topic.subscriptions().iter().map(|s| s.name()).collect();
        subs.sort();
        if !force && !subs.is_empty() {
            const NAMED_MAX: usize = 5;
            let mut named = subs[..subs.len().min(NAMED_MAX)].join(", ");
            if subs.len() > NAMED_MAX {
                named.push_str(&format!(" and {} more", subs.len() - NAMED_MAX));
            }
            return Err(BrokerError::FailedPrecondition(format!(
                "topic {name:?} has {} subscription{} ({named}) with their unread messages; \
                 delete them first or delete the topic with force",
                subs.len(),
                if subs.len() == 1 { "" } else { "s" }
            )));
        }
        let mut deleted_subs = Vec::new();
        for sub in subs {
            self.delete_subscription_locked(&sub).await?;
            deleted_subs.push(sub);
        }
        // Close the log's files, set the directory aside (`.deleting`),
        // then drop the definition: at every step a crash leaves either the
        // topic or an acknowledged deletion, never a definition without its
        // data or data without a definition.
        // Joining the writer thread blocks: not on a runtime thread.
        let closing = topic.clone();
        blocking(move || {
            closing.log.close();
            Ok(())
        })
        .await?;
        let (fs, meta) = (self.inner.fs.clone(), self.inner.meta.clone());
        let dir = self.topic_dir(topic.def().id);
        let (doomed_name, dir_again) = (name.to_string(), dir.clone());
        let deleted = blocking(move || {
            let doomed = mark_deleting(fs.as_ref(), &dir)?;
            if let Err(e) = meta.delete_topic(&doomed_name) {
                unmark_deleting(fs.as_ref(), &doomed, &dir);
                return Err(e.into());
            }
            Ok(doomed)
        })
        .await;
        let doomed = match deleted {
            Ok(doomed) => doomed,
            Err(e) => {
                // The topic stays: serve it again from a freshly opened log.
                let def = topic.def().clone();
                let log = open_log(
                    self.inner.fs.clone(),
                    &dir_again,
                    topic_log_config(&self.inner.config, &self.inner.memory),
                    name,
                )?;
                self.inner.topics.write().insert(
                    name.to_string(),
                    Topic::new(def, log, Arc::downgrade(&self.inner.topics)),
                );
                return Err(e);
            }
        };
        self.inner.topics.write().remove(name);
        self.finish_removal(doomed).await;
        tracing::info!(
            topic = name,
            subscriptions = deleted_subs.len(),
            "topic deleted"
        );
        Ok(deleted_subs)
    }

    /// Removes a directory whose deletion is acknowledged. Where an open
    /// file keeps a directory busy (NFS renames a removed open file to
    /// `.nfs…`; some FUSE file systems do alike) removal fails with
    /// ENOTEMPTY or EBUSY until the last descriptor closes: the logs in it
    /// are closed by then, so only a read that was under way can hold one,
    /// and removal is tried again every [`REMOVE_BUSY_RETRY_MS`] up to
    /// [`REMOVE_BUSY_TRIES_MAX`] times. A failure is logged, not returned:
    /// the directory is accounted for (`.deleting`) and the next start
    /// removes it.
    async fn finish_removal(&self, doomed: PathBuf) {
        let fs = self.inner.fs.clone();
        let shown = doomed.display().to_string();
        let removed = blocking(move || {
            let mut tries = 1;
            loop {
                match fs.remove_dir_all(&doomed) {
                    Ok(()) => return Ok(()),
                    Err(e)
                        if tries < REMOVE_BUSY_TRIES_MAX
                            && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EBUSY)) =>
                    {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(REMOVE_BUSY_RETRY_MS));
                    }
                    Err(e) => return Err(StorageError::io(&doomed, e).into()),
                }
            }
        })
        .await;
        if let Err(e) = removed {
            tracing::warn!(dir = %shown, error = %e, "cannot remove a deleted directory yet; the next start removes it");
        }
    }

    /// The broker's memory budget and what it holds.
    pub fn memory(&self) -> &MemoryBudget {
        &self.inner.memory
    }

    pub fn topic_stats(&self, name: &str) -> Result<TopicStats> {
        let topic = self.topic(name)?;
        let s = topic.log.stats();
        Ok(TopicStats {
            first_offset: s.first_offset.0,
            next_offset: s.next_offset.0,
            retained_bytes: s.disk_bytes,
            segments: s.segments,
            subscriptions: u32::try_from(topic.subs.read().len()).unwrap_or(u32::MAX),
        })
    }

    // ----- publish ------------------------------------------------------

    /// Appends a batch to a topic; returns once it is durable under the
    /// fsync mode. Message ids are the offsets of the batch.
    pub async fn publish(&self, topic: &str, messages: Vec<NewRecord>) -> Result<Appended> {
        self.check_running()?;
        if messages.is_empty() {
            return Err(BrokerError::invalid(
                "messages",
                "must contain at least one message",
            ));
        }
        if messages.len() > config::PUBLISH_BATCH_MESSAGES_MAX {
            return Err(BrokerError::invalid(
                "messages",
                format!(
                    "has {} messages; at most {} per call",
                    messages.len(),
                    config::PUBLISH_BATCH_MESSAGES_MAX
                ),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            self.check_message(&format!("messages[{i}]"), m)?;
        }
        let topic = self.topic(topic)?;
        topic.check_room(&messages)?;
        Ok(topic.log.append(&messages).await?)
    }

    /// Checks a message's limits; errors name `{prefix}.{field}`.
    fn check_message(&self, prefix: &str, m: &NewRecord) -> Result<()> {
        let field = |f: &str| format!("{prefix}.{f}");
        if m.attributes.len() > config::ATTRIBUTES_MAX {
            return Err(BrokerError::invalid(
                field("attributes"),
                format!(
                    "has {} attributes; at most {}",
                    m.attributes.len(),
                    config::ATTRIBUTES_MAX
                ),
            ));
        }
        let mut size = m.payload.len() + m.ordering_key.len();
        for a in &m.attributes {
            if a.key.is_empty() {
                return Err(BrokerError::invalid(
                    field("attributes"),
                    "keys must not be empty",
                ));
            }
            if a.key.len() > config::ATTRIBUTE_KEY_BYTES_MAX {
                return Err(BrokerError::invalid(
                    field("attributes"),
                    format!(
                        "key is {} bytes; at most {}",
                        a.key.len(),
                        config::ATTRIBUTE_KEY_BYTES_MAX
                    ),
                ));
            }
            if a.value.len() > config::ATTRIBUTE_VALUE_BYTES_MAX {
                return Err(BrokerError::invalid(
                    field("attributes"),
                    format!(
                        "value is {} bytes; at most {}",
                        a.value.len(),
                        config::ATTRIBUTE_VALUE_BYTES_MAX
                    ),
                ));
            }
            size += a.key.len() + a.value.len();
        }
        if m.ordering_key.len() > config::ORDERING_KEY_BYTES_MAX {
            return Err(BrokerError::invalid(
                field("ordering_key"),
                format!(
                    "is {} bytes; at most {}",
                    m.ordering_key.len(),
                    config::ORDERING_KEY_BYTES_MAX
                ),
            ));
        }
        if size > self.inner.config.message_bytes_max {
            return Err(BrokerError::invalid(
                field("data"),
                format!(
                    "message is {size} bytes; the limit is {} bytes",
                    self.inner.config.message_bytes_max
                ),
            ));
        }
        Ok(())
    }

    // ----- subscriptions ------------------------------------------------

    pub fn subscription(&self, name: &str) -> Result<Arc<Subscription>> {
        self.inner
            .subs
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound {
                kind: "subscription",
                name: name.to_string(),
            })
    }

    /// Subscriptions, all or of one topic, sorted by name.
    pub fn subscriptions(&self, topic: Option<&str>) -> Result<Vec<Arc<Subscription>>> {
        let mut all: Vec<Arc<Subscription>> = match topic {
            Some(t) => self.topic(t)?.subscriptions(),
            None => self.inner.subs.read().values().cloned().collect(),
        };
        all.sort_by_key(|s| s.name());
        Ok(all)
    }

    fn check_policies(
        &self,
        ack_deadline_ms: u64,
        retry: &RetryPolicy,
        dead_letter: Option<&DeadLetterPolicy>,
        topic: &str,
    ) -> Result<()> {
        if !(config::ACK_DEADLINE_MS_MIN..=config::ACK_DEADLINE_MS_MAX).contains(&ack_deadline_ms) {
            return Err(BrokerError::invalid(
                "ack_deadline_ms",
                format!(
                    "{ack_deadline_ms} is outside {}..={}",
                    config::ACK_DEADLINE_MS_MIN,
                    config::ACK_DEADLINE_MS_MAX
                ),
            ));
        }
        if retry.min_backoff_ms > config::BACKOFF_MS_MAX {
            return Err(BrokerError::invalid(
                "retry_policy.min_backoff_ms",
                format!("at most {}", config::BACKOFF_MS_MAX),
            ));
        }
        if retry.max_backoff_ms > config::BACKOFF_MS_MAX {
            return Err(BrokerError::invalid(
                "retry_policy.max_backoff_ms",
                format!("at most {}", config::BACKOFF_MS_MAX),
            ));
        }
        if retry.max_backoff_ms < retry.min_backoff_ms {
            return Err(BrokerError::invalid(
                "retry_policy.max_backoff_ms",
                "must not be below min_backoff_ms",
            ));
        }
        if let Some(p) = dead_letter {
            if !(config::DELIVERY_ATTEMPTS_MIN..=config::DELIVERY_ATTEMPTS_MAX)
                .contains(&p.max_delivery_attempts)
            {
                return Err(BrokerError::invalid(
                    "dead_letter_policy.max_delivery_attempts",
                    format!(
                        "{} is outside {}..={}",
                        p.max_delivery_attempts,
                        config::DELIVERY_ATTEMPTS_MIN,
                        config::DELIVERY_ATTEMPTS_MAX
                    ),
                ));
            }
            if let Some(fwd) = &p.forward_topic {
                config::check_name("dead_letter_policy.forward_topic", fwd)?;
                if fwd == topic {
                    return Err(BrokerError::invalid(
                        "dead_letter_policy.forward_topic",
                        "must differ from the subscription's own topic",
                    ));
                }
                self.topic(fwd)?;
            }
        }
        Ok(())
    }

    /// Creates a subscription: durable when this returns.
    ///
    /// # Cancel safety
    /// Runs in a task of its own: dropping the future does not stop the
    /// change half-way; it completes or fails as a whole.
    pub async fn create_subscription(&self, spec: SubscriptionSpec) -> Result<Arc<Subscription>> {
        let this = self.clone();
        detached(async move { this.create_subscription_in_task(spec).await }).await
    }

    async fn create_subscription_in_task(
        &self,
        spec: SubscriptionSpec,
    ) -> Result<Arc<Subscription>> {
        self.check_running()?;
        config::check_name("name", &spec.name)?;
        config::check_name("topic", &spec.topic)?;
        let ack_deadline_ms = spec
            .ack_deadline_ms
            .unwrap_or(config::ACK_DEADLINE_MS_DEFAULT);
        self.check_policies(
            ack_deadline_ms,
            &spec.retry,
            spec.dead_letter.as_ref(),
            &spec.topic,
        )?;
        let _admin = self.inner.admin.lock().await;
        let topic = self.topic(&spec.topic)?;
        if self.inner.subs.read().contains_key(&spec.name) {
            return Err(BrokerError::AlreadyExists {
                kind: "subscription",
                name: spec.name,
            });
        }
        if self.inner.subs.read().len() >= self.inner.config.subscriptions_max {
            return Err(BrokerError::ResourceExhausted(format!(
                "the broker already has the maximum of {} subscriptions",
                self.inner.config.subscriptions_max
            )));
        }
        let start = if spec.from_earliest {
            topic.log.first_offset()
        } else {
            topic.log.next_offset()
        };
        let def = SubscriptionDef {
            id: self.inner.meta.next_id()?,
            name: spec.name.clone(),
            topic: spec.topic.clone(),
            topic_id: topic.def().id,
            ack_deadline_ms,
            retry: spec.retry,
            dead_letter: spec.dead_letter,
            from_earliest: spec.from_earliest,
            start_offset: start.0,
            created_ms: now_us() / 1000,
        };
        let (fs, meta) = (self.inner.fs.clone(), self.inner.meta.clone());
        let (parent, dir) = (
            self.inner.config.data_dir.join(DIR_SUBSCRIPTIONS),
            self.sub_dir(def.id),
        );
        let stored = def.clone();
        blocking(move || {
            recovery::create_dir(fs.as_ref(), &parent, &dir)?;
            let kept = definition::write(fs.as_ref(), &dir, KIND_SUBSCRIPTION, &stored)
                .and_then(|()| meta.create_subscription(&stored));
            if let Err(e) = kept {
                if let Err(cleanup) = remove_dir(fs.as_ref(), &dir) {
                    tracing::warn!(dir = %dir.display(), error = %cleanup, "cannot remove the directory of a subscription that was not created");
                }
                return Err(e.into());
            }
            Ok(())
        })
        .await?;
        let sub = self.attach_subscription(def, topic, SubscriptionState::starting_at(start))?;
        tracing::info!(subscription = %spec.name, topic = %spec.topic, "subscription created");
        Ok(sub)
    }

    /// Changes a subscription's settings: durable when this returns.
    ///
    /// # Cancel safety
    /// Runs in a task of its own: dropping the future does not stop the
    /// change half-way; it completes or fails as a whole.
    pub async fn update_subscription(
        &self,
        name: &str,
        update: SubscriptionUpdate,
    ) -> Result<Arc<Subscription>> {
        let (this, name) = (self.clone(), name.to_string());
        detached(async move { this.update_subscription_in_task(&name, update).await }).await
    }

    async fn update_subscription_in_task(
        &self,
        name: &str,
        update: SubscriptionUpdate,
    ) -> Result<Arc<Subscription>> {
        self.check_running()?;
        let _admin = self.inner.admin.lock().await;
        let sub = self.subscription(name)?;
        let mut def = sub.def();
        if let Some(d) = update.ack_deadline_ms {
            def.ack_deadline_ms = d.unwrap_or(config::ACK_DEADLINE_MS_DEFAULT);
        }
        if let Some(r) = update.retry {
            def.retry = r;
        }
        if let Some(d) = update.dead_letter {
            def.dead_letter = d;
        }
        self.check_policies(
            def.ack_deadline_ms,
            &def.retry,
            def.dead_letter.as_ref(),
            &def.topic,
        )?;
        let (fs, meta) = (self.inner.fs.clone(), self.inner.meta.clone());
        let dir = self.sub_dir(def.id);
        let stored = def.clone();
        blocking(move || {
            definition::write(fs.as_ref(), &dir, KIND_SUBSCRIPTION, &stored)?;
            Ok(meta.update_subscription(&stored)?)
        })
        .await?;
        sub.set_def(def);
        Ok(sub)
    }

    /// Deletes a subscription, its state and its dead letters.
    ///
    /// # Cancel safety
    /// Runs in a task of its own: dropping the future does not stop the
    /// change half-way; it completes or fails as a whole.
    pub async fn delete_subscription(&self, name: &str) -> Result<()> {
        let (this, name) = (self.clone(), name.to_string());
        detached(async move {
            this.check_running()?;
            let _admin = this.inner.admin.lock().await;
            this.delete_subscription_locked(&name).await
        })
        .await
    }

    async fn delete_subscription_locked(&self, name: &str) -> Result<()> {
        let sub = self.subscription(name)?;
        // No new leases, no dead-letter log reopened while its directory
        // moves; then the same order as for a topic (see delete_topic).
        sub.mark_deleted();
        let closing = sub.clone();
        blocking(move || {
            closing.dlq.close();
            Ok(())
        })
        .await?;
        let (fs, meta) = (self.inner.fs.clone(), self.inner.meta.clone());
        let dir = self.sub_dir(sub.id());
        let doomed_name = name.to_string();
        let deleted = blocking(move || {
            let doomed = mark_deleting(fs.as_ref(), &dir)?;
            if let Err(e) = meta.delete_subscription(&doomed_name) {
                unmark_deleting(fs.as_ref(), &doomed, &dir);
                return Err(e.into());
            }
            Ok(doomed)
        })
        .await;
        let doomed = match deleted {
            Ok(doomed) => doomed,
            Err(e) => {
                sub.dlq.reopen();
                sub.unmark_deleted();
                return Err(e);
            }
        };
        self.inner.subs.write().remove(name);
        sub.topic.subs.write().retain(|s| !Arc::ptr_eq(s, &sub));
        let ticket = self
            .inner
            .journal
            .enqueue(sub.id(), &[StateEntry::Dropped])?;
        ticket.wait().await?;
        self.finish_removal(doomed).await;
        tracing::info!(subscription = name, "subscription deleted");
        Ok(())
    }

    // ----- dead letters -------------------------------------------------

    /// Puts dead letters back into their subscription (only that one), with
    /// attempts reset. Returns how many. One redrive or purge of a
    /// subscription runs at a time.
    ///
    /// # Cancel safety
    /// Runs in a task of its own: dropping the future does not stop the
    /// change half-way; it completes or fails as a whole.
    pub async fn redrive(&self, subscription: &str, filter: RedriveFilter) -> Result<u64> {
        let (this, name) = (self.clone(), subscription.to_string());
        detached(async move { this.redrive_in_task(&name, filter).await }).await
    }

    async fn redrive_in_task(&self, subscription: &str, filter: RedriveFilter) -> Result<u64> {
        self.check_running()?;
        let sub = self.subscription(subscription)?;
        if let Some(r) = &filter.replacement {
            if filter.message_ids.len() != 1 {
                return Err(BrokerError::invalid(
                    "replacement",
                    format!(
                        "replaces one dead letter's content: message_ids must name exactly one, not {}",
                        filter.message_ids.len()
                    ),
                ));
            }
            if r.data.is_none() && r.attributes.is_none() {
                return Err(BrokerError::invalid(
                    "replacement",
                    "replaces nothing: set data, attributes or both",
                ));
            }
        }
        let _one_at_a_time = sub.dead_letter_ops.lock().await;
        let target = Target {
            subscription: sub.id(),
            replaced: filter.replacement.is_some(),
        };
        let mut total = 0u64;
        let mut from = Offset(0);
        // Page through the queue so memory stays bounded however many
        // dead letters there are; removal does not move later entries.
        loop {
            let (page, next) = sub.dead_letters(from, config::PUBLISH_BATCH_MESSAGES_MAX)?;
            let chosen: Vec<&DeadLetter> = page
                .iter()
                .filter(|dl| {
                    filter.message_ids.is_empty()
                        || filter.message_ids.contains(&dl.message.message_id)
                })
                .filter(|dl| filter.reason.is_none_or(|r| r == dl.reason))
                .collect();
            if !chosen.is_empty() {
                let mut records: Vec<NewRecord> = chosen
                    .iter()
                    .map(|dl| NewRecord {
                        message_id: Some(dl.message.message_id),
                        target: Some(target),
                        attributes: dl.message.attributes.clone(),
                        ordering_key: dl.message.ordering_key.clone(),
                        payload: dl.message.payload.clone(),
                    })
                    .collect();
                if let Some(r) = &filter.replacement {
                    // One id, so at most one dead letter (a message is
                    // dead-lettered once per redrive).
                    let copy = &mut records[0];
                    if let Some(data) = &r.data {
                        copy.payload = data.clone();
                    }
                    if let Some(attributes) = &r.attributes {
                        copy.attributes = attributes.clone();
                    }
                    self.check_message("replacement", copy)?;
                    tracing::info!(
                        subscription,
                        message_id = chosen[0].message.message_id,
                        replaced_data = r.data.is_some(),
                        replaced_attributes = r.attributes.is_some(),
                        old_bytes = chosen[0].message.payload.len(),
                        new_bytes = copy.payload.len(),
                        "dead letter redriven with a replacement"
                    );
                }
                sub.topic.log.append(&records).await?;
                sub.remove_dead_letters(chosen.iter().map(|dl| dl.dlq_offset.0).collect())
                    .await?;
                total += chosen.len() as u64;
            }
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        if total > 0 {
            tracing::info!(subscription, count = total, "dead letters redriven");
        } else if filter.replacement.is_some() {
            return Err(BrokerError::NotFound {
                kind: "dead letter",
                name: filter.message_ids[0].to_string(),
            });
        }
        Ok(total)
    }

    /// Removes every dead letter of a subscription.
    ///
    /// # Cancel safety
    /// Runs in a task of its own: dropping the future does not stop the
    /// change half-way; it completes or fails as a whole.
    pub async fn purge_dead_letters(&self, subscription: &str) -> Result<u64> {
        let (this, name) = (self.clone(), subscription.to_string());
        detached(async move { this.purge_dead_letters_in_task(&name).await }).await
    }

    async fn purge_dead_letters_in_task(&self, subscription: &str) -> Result<u64> {
        self.check_running()?;
        let sub = self.subscription(subscription)?;
        let _one_at_a_time = sub.dead_letter_ops.lock().await;
        let mut total = 0u64;
        let mut from = Offset(0);
        loop {
            let (page, next) = sub.dead_letters(from, config::PUBLISH_BATCH_MESSAGES_MAX)?;
            total += page.len() as u64;
            sub.remove_dead_letters(page.iter().map(|dl| dl.dlq_offset.0).collect())
                .await?;
            match next {
                Some(n) => from = n,
                None => return Ok(total),
            }
        }
    }

    // ----- status -------------------------------------------------------

    /// Where a message is on every subscription of its topic.
    pub fn message_status(&self, topic: &str, message_id: u64) -> Result<MessageStatus> {
        let topic = self.topic(topic)?;
        if message_id >= topic.log.next_offset().0 {
            return Err(BrokerError::NotFound {
                kind: "message",
                name: message_id.to_string(),
            });
        }
        if message_id < topic.log.first_offset().0 {
            // Removed by retention: it is not in the topic any more, and
            // what its subscriptions did with it is not known.
            return Err(BrokerError::NotFound {
                kind: "message",
                name: format!("{message_id} (removed by retention)"),
            });
        }
        let record = topic
            .log
            .read(
                Offset(message_id),
                crate::storage::ReadLimits {
                    records_max: 1,
                    bytes_max: 1,
                },
            )
            .ok()
            .and_then(|b| b.records.into_iter().next())
            .filter(|r| r.offset.0 == message_id);
        if let Some(copy) = record.as_ref().filter(|r| r.message_id != message_id) {
            // The offset holds a redriven dead letter, which keeps its
            // original id: it is not a message of its own.
            return Err(BrokerError::NotFound {
                kind: "message",
                name: format!(
                    "{message_id} (offset {message_id} holds a redriven copy of message {}; ask for that id)",
                    copy.message_id
                ),
            });
        }
        let publish_time_us = record.map(|r| r.publish_time_us);
        let mut subs = topic.subscriptions();
        subs.sort_by_key(|s| s.name());
        let mut out = Vec::with_capacity(subs.len());
        for sub in subs {
            let (state, redrive) = sub.message_state(message_id)?;
            out.push((sub.name(), state, redrive));
        }
        Ok(MessageStatus {
            publish_time_us,
            subscriptions: out,
        })
    }

    pub fn broker_stats(&self) -> BrokerStats {
        BrokerStats {
            resident_memory_bytes: resident_memory_bytes().unwrap_or(0),
            data_dir_bytes: dir_bytes(&self.inner.config.data_dir),
            uptime_ms: u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            topics: u32::try_from(self.inner.topics.read().len()).unwrap_or(u32::MAX),
            subscriptions: u32::try_from(self.inner.subs.read().len()).unwrap_or(u32::MAX),
            fsync: self.inner.config.fsync.to_string(),
            memory_max_bytes: self.inner.config.memory_bytes_max,
            memory: self.inner.memory.in_use(),
        }
    }

    /// Logs that cannot write now, each with why: their last write or
    /// sync failed and none succeeded since. Empty when healthy.
    pub fn write_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = self.inner.journal.write_problem() {
            out.push(format!("state journal: {p}"));
        }
        for topic in self.topics() {
            if let Some(p) = topic.log.write_problem() {
                out.push(format!("topic {:?}: {p}", topic.name()));
            }
        }
        for sub in self.inner.subs.read().values() {
            if let Some(p) = sub.dlq.write_problem() {
                out.push(format!("dead letters of {:?}: {p}", sub.name()));
            }
        }
        out
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Starts shutting down: new operations fail with `ShuttingDown`.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
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
        let subs: Vec<Arc<Subscription>> = broker.inner.subs.read().values().cloned().collect();
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
fn topic_log_config(config: &BrokerConfig, memory: &MemoryBudget) -> LogConfig {
    LogConfig {
        segment_bytes_max: config.segment_bytes_max,
        fsync: config.fsync,
        shared_memory: Some(memory.logs()),
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

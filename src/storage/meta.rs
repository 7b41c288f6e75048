//! Topic and subscription definitions, kept in sled.
//!
//! This is the only module that imports sled; callers see plain structs.
//!
//! Every change is durable before the call returns, so a definition that
//! an admin RPC reported as changed survives a power cut. sled's `flush`
//! alone does not promise that: on Linux sled 0.34 writes its buffers with
//! `sync_file_range`, which flushes neither file metadata nor the drive's
//! cache (only its background flusher, every 500 ms, calls `sync_all`). So
//! after every `flush` this store fsyncs sled's data file and its
//! directory itself.
//!
//! Ids come from sled's `generate_id`, which is monotonic across restarts;
//! [`MetaStore::raise_id_floor`] additionally keeps them above every id
//! found on disk, so an id is never reused even if the store lost its last
//! changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::storage::error::{Result, StorageError};

/// Version of the metadata layout, stored under a fixed key.
const META_FORMAT_VERSION: u64 = 1;
const KEY_VERSION: &[u8] = b"format_version";
const TREE_TOPICS: &str = "topics";
const TREE_SUBSCRIPTIONS: &str = "subscriptions";
/// sled's page cache; its default (1 GiB) is far more than definitions need.
const SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// sled's data file in its directory (sled 0.34's layout); fsynced after
/// every flush.
const SLED_DATA_FILE: &str = "db";

/// Retention by age or size; unset means off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub max_age_ms: Option<u64>,
    pub max_bytes: Option<u64>,
    /// What reaching a limit does. Definitions stored before modes existed
    /// have no such field: they read as [`RetentionMode::DropOldest`], what
    /// retention did then.
    #[serde(default)]
    pub mode: RetentionMode,
}

/// What a topic does when its retention limit is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetentionMode {
    /// Remove the oldest segments, settled or not; subscriptions count what
    /// they lost.
    #[default]
    DropOldest,
    /// Never remove a message some subscription has not settled: refuse
    /// publishes while the unsettled backlog is at `max_bytes`.
    RejectPublish,
}

/// A topic's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicDef {
    /// Stable id; names the topic's directory, never reused.
    pub id: u64,
    pub name: String,
    pub retention: Retention,
    pub created_ms: u64,
}

/// Redelivery backoff after a failed delivery (nack, lease expiry, stream end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Wait exactly the backoff (definitions written before this existed
    /// read as jittered).
    #[serde(default)]
    pub no_jitter: bool,
}

/// When a message is moved to the dead-letter queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterPolicy {
    pub max_delivery_attempts: u32,
    /// Also publish dead letters to this topic.
    pub forward_topic: Option<String>,
}

/// A subscription's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionDef {
    /// Stable id; names the subscription's state, never reused.
    pub id: u64,
    pub name: String,
    pub topic: String,
    pub topic_id: u64,
    pub ack_deadline_ms: u64,
    pub retry: RetryPolicy,
    pub dead_letter: Option<DeadLetterPolicy>,
    /// True if it started from the earliest retained message.
    pub from_earliest: bool,
    /// First offset of the topic this subscription receives.
    pub start_offset: u64,
    pub created_ms: u64,
}

/// The metadata store.
#[derive(Debug, Clone)]
pub struct MetaStore {
    db: sled::Db,
    topics: sled::Tree,
    subs: sled::Tree,
    dir: PathBuf,
    /// sled's data file, kept open to fsync it after each flush.
    data_file: Arc<std::fs::File>,
    /// Every id handed out is above this.
    id_floor: Arc<AtomicU64>,
}

fn meta_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Metadata(e.to_string())
}

impl MetaStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(meta_err)?;
        match db.get(KEY_VERSION).map_err(meta_err)? {
            None => {
                db.insert(KEY_VERSION, &META_FORMAT_VERSION.to_le_bytes())
                    .map_err(meta_err)?;
                db.flush().map_err(meta_err)?;
            }
            Some(v) if v.as_ref() == META_FORMAT_VERSION.to_le_bytes() => {}
            Some(_) => {
                return Err(StorageError::Format {
                    path: dir.to_path_buf(),
                    detail: "metadata written by an unsupported version".into(),
                });
            }
        }
        let topics = db.open_tree(TREE_TOPICS).map_err(meta_err)?;
        let subs = db.open_tree(TREE_SUBSCRIPTIONS).map_err(meta_err)?;
        let data_path = dir.join(SLED_DATA_FILE);
        let data_file =
            std::fs::File::open(&data_path).map_err(|e| StorageError::io(&data_path, e))?;
        let store = Self {
            db,
            topics,
            subs,
            dir: dir.to_path_buf(),
            data_file: Arc::new(data_file),
            id_floor: Arc::new(AtomicU64::new(0)),
        };
        store.flush()?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(store)
    }

    /// A fresh id for a topic or subscription; never returned twice, and
    /// above every id passed to [`MetaStore::raise_id_floor`].
    pub fn next_id(&self) -> Result<u64> {
        // generate_id is monotonic across restarts (sled persists a bound).
        let id = self.db.generate_id().map_err(meta_err)? + 1;
        let floor = self.id_floor.fetch_max(id, Ordering::AcqRel);
        if floor < id {
            return Ok(id);
        }
        Ok(self.id_floor.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Ids handed out from now on are above `id` (one found on disk).
    pub fn raise_id_floor(&self, id: u64) {
        self.id_floor.fetch_max(id, Ordering::AcqRel);
    }

    /// sled's flush, then a real fsync of its data file and directory.
    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(meta_err)?;
        let data_path = self.dir.join(SLED_DATA_FILE);
        self.data_file
            .sync_all()
            .map_err(|e| StorageError::io(&data_path, e))?;
        sync_dir(&self.dir)
    }

    fn insert_new<T: Serialize>(
        tree: &sled::Tree,
        kind: &'static str,
        name: &str,
        value: &T,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(meta_err)?;
        let swapped = tree
            .compare_and_swap(name.as_bytes(), None as Option<&[u8]>, Some(bytes))
            .map_err(meta_err)?;
        swapped.map_err(|_| StorageError::AlreadyExists {
            kind,
            name: name.to_string(),
        })
    }

    fn list<T: for<'de> Deserialize<'de>>(tree: &sled::Tree) -> Result<Vec<T>> {
        tree.iter()
            .values()
            .map(|v| serde_json::from_slice(&v.map_err(meta_err)?).map_err(meta_err))
            .collect()
    }

    /// Stores a definition found beside its data that the store had lost.
    ///
    /// # Errors
    /// `AlreadyExists` if another topic has the name.
    pub fn restore_topic(&self, def: &TopicDef) -> Result<()> {
        self.create_topic(def)
    }

    /// Stores a subscription definition found beside its data.
    ///
    /// # Errors
    /// `AlreadyExists` if another subscription has the name.
    pub fn restore_subscription(&self, def: &SubscriptionDef) -> Result<()> {
        self.create_subscription(def)
    }

    pub fn create_topic(&self, def: &TopicDef) -> Result<()> {
        Self::insert_new(&self.topics, "topic", &def.name, def)?;
        self.flush()
    }

    pub fn topics(&self) -> Result<Vec<TopicDef>> {
        Self::list(&self.topics)
    }

    pub fn delete_topic(&self, name: &str) -> Result<()> {
        self.topics.remove(name.as_bytes()).map_err(meta_err)?;
        self.flush()
    }

    pub fn create_subscription(&self, def: &SubscriptionDef) -> Result<()> {
        Self::insert_new(&self.subs, "subscription", &def.name, def)?;
        self.flush()
    }

    /// Replaces an existing subscription's definition.
    pub fn update_subscription(&self, def: &SubscriptionDef) -> Result<()> {
        let bytes = serde_json::to_vec(def).map_err(meta_err)?;
        self.subs
            .insert(def.name.as_bytes(), bytes)
            .map_err(meta_err)?;
        self.flush()
    }

    pub fn subscriptions(&self) -> Result<Vec<SubscriptionDef>> {
        Self::list(&self.subs)
    }

    pub fn delete_subscription(&self, name: &str) -> Result<()> {
        self.subs.remove(name.as_bytes()).map_err(meta_err)?;
        self.flush()
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_stored_before_retention_modes_reads_as_drop_oldest() {
        let old =
            r#"{"id":3,"name":"t","retention":{"max_age_ms":null,"max_bytes":10},"created_ms":1}"#;
        let def: TopicDef = serde_json::from_str(old).unwrap();
        assert_eq!(def.retention.mode, RetentionMode::DropOldest);
        assert_eq!(def.retention.max_bytes, Some(10));
        let new = TopicDef {
            retention: Retention {
                mode: RetentionMode::RejectPublish,
                ..def.retention
            },
            ..def
        };
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(r#""mode":"reject_publish""#), "{json}");
        assert_eq!(serde_json::from_str::<TopicDef>(&json).unwrap(), new);
    }

    #[test]
    fn a_retry_policy_stored_before_the_jitter_switch_reads_as_jittered() {
        let old: RetryPolicy =
            serde_json::from_str(r#"{"min_backoff_ms":100,"max_backoff_ms":1000}"#).unwrap();
        assert_eq!(old.min_backoff_ms, 100);
        assert!(!old.no_jitter);
    }

    #[test]
    fn definitions_survive_reopen_and_names_are_unique() {
        let tmp = tempfile::tempdir().unwrap();
        let def = TopicDef {
            id: 1,
            name: "orders".into(),
            retention: Retention::default(),
            created_ms: 5,
        };
        {
            let store = MetaStore::open(tmp.path()).unwrap();
            store.create_topic(&def).unwrap();
            assert!(matches!(
                store.create_topic(&def),
                Err(StorageError::AlreadyExists { .. })
            ));
        }
        let store = MetaStore::open(tmp.path()).unwrap();
        assert_eq!(store.topics().unwrap(), vec![def]);
        let a = store.next_id().unwrap();
        assert!(store.next_id().unwrap() > a);
        store.raise_id_floor(a + 1_000_000_000);
        let b = store.next_id().unwrap();
        assert!(b > a + 1_000_000_000);
        assert!(store.next_id().unwrap() > b);
    }
}

//! Topic and subscription definitions, kept in sled.
//!
//! This is the only module that imports sled; callers see plain structs.
//! Every change is flushed (sled's fsync) before the call returns, so a
//! definition that an admin RPC reported as created survives a crash.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::storage::error::{Result, StorageError};

/// Version of the metadata layout, stored under a fixed key.
const META_FORMAT_VERSION: u64 = 1;
const KEY_VERSION: &[u8] = b"format_version";
const TREE_TOPICS: &str = "topics";
const TREE_SUBSCRIPTIONS: &str = "subscriptions";
/// sled's page cache; its default (1 GiB) is far more than definitions need.
const SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Retention by age or size; unset means off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub max_age_ms: Option<u64>,
    pub max_bytes: Option<u64>,
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

/// Redelivery backoff after a nack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
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
        Ok(Self { db, topics, subs })
    }

    /// A fresh id for a topic or subscription; never returned twice.
    pub fn next_id(&self) -> Result<u64> {
        // generate_id is monotonic across restarts (sled persists a bound).
        Ok(self.db.generate_id().map_err(meta_err)? + 1)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(meta_err)?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}

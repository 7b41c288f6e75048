//! Topics: create, delete (with the files of their subscriptions), look
//! up, stats, and publishing to them with each message's limits checked.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::recovery::KIND_TOPIC;
use super::subscription::now_us;
use super::{
    Broker, BrokerError, REMOVE_BUSY_RETRY_MS, REMOVE_BUSY_TRIES_MAX, Result, Topic, blocking,
    config, detached, mark_deleting, open_log, remove_dir, topic_log_config, unmark_deleting,
};
use crate::storage::definition;
use crate::storage::meta::{Retention, RetentionMode, TopicDef};
use crate::storage::{AppendTicket, Appended, NewRecord, StorageError};

/// Topic figures.
#[derive(Debug, Clone, Copy)]
pub struct TopicStats {
    pub first_offset: u64,
    pub next_offset: u64,
    pub retained_bytes: u64,
    pub segments: u32,
    pub subscriptions: u32,
}

impl Broker {
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
            topic_log_config(&self.inner.config, &self.inner.memory, &self.inner.writers),
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
                    topic_log_config(&self.inner.config, &self.inner.memory, &self.inner.writers),
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
    pub(super) async fn finish_removal(&self, doomed: PathBuf) {
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

    /// Appends a batch to a topic; returns once it is durable under the
    /// fsync mode. Message ids are the offsets of the batch.
    pub async fn publish(&self, topic: &str, messages: Vec<NewRecord>) -> Result<Appended> {
        Ok(self.publish_queued(topic, messages).await?.wait().await?)
    }

    /// Like [`Broker::publish`], but returns once the batch is queued in
    /// the topic's log, with the ticket of its completion: batches queued
    /// one after the other to a topic are appended in that order
    /// (PublishStream relies on it).
    pub async fn publish_queued(
        &self,
        topic: &str,
        messages: Vec<NewRecord>,
    ) -> Result<AppendTicket> {
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
        Ok(topic.log.append_queued(&messages).await?)
    }

    /// Checks a message's limits; errors name `{prefix}.{field}`.
    pub(super) fn check_message(&self, prefix: &str, m: &NewRecord) -> Result<()> {
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
        let size = m.message_bytes();
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
}

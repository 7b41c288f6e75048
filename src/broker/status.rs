//! Where a message stands in every subscription of its topic, broker-wide
//! figures, and the logs that cannot write.

use super::{
    Broker, BrokerError, MessageState, Redrive, Result, blocking, dir_bytes, memory,
    resident_memory_bytes,
};
use crate::storage::Offset;

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

impl Broker {
    /// Where a message is on every subscription of its topic. It reads the
    /// topic and dead-letter logs, so it runs on the blocking pool, off the
    /// runtime's threads.
    pub async fn message_status(&self, topic: &str, message_id: u64) -> Result<MessageStatus> {
        let (this, topic) = (self.clone(), topic.to_string());
        blocking(move || this.message_status_now(&topic, message_id)).await
    }

    fn message_status_now(&self, topic: &str, message_id: u64) -> Result<MessageStatus> {
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
            return Err(BrokerError::NotFoundBecause {
                kind: "message",
                name: message_id.to_string(),
                why: "removed by retention".into(),
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
            return Err(BrokerError::NotFoundBecause {
                kind: "message",
                name: message_id.to_string(),
                why: format!(
                    "offset {message_id} holds a redriven copy of message {}; ask for that id",
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
}

//! A topic: its definition, its one log, and the subscriptions reading it.
//!
//! Under the reject-publish retention mode the topic refuses publishes
//! while its **backlog** (the stored bytes from the lowest ack floor of its
//! subscriptions on) is at `retention.max_bytes`; see
//! [`Topic::check_room`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use crate::broker::error::{BrokerError, Result};
use crate::broker::subscription::Subscription;
use crate::storage::meta::{RetentionMode, TopicDef};
use crate::storage::{Log, NewRecord, Offset};

/// The broker's map of topics by name.
pub(crate) type TopicMap = RwLock<HashMap<String, Arc<Topic>>>;

/// One topic.
#[derive(Debug)]
pub struct Topic {
    def: TopicDef,
    pub(crate) log: Log,
    pub(crate) subs: RwLock<Vec<Arc<Subscription>>>,
    /// The broker's topics, for dead-letter forwarding.
    all: Weak<TopicMap>,
}

impl Topic {
    /// A topic over `log`. Its subscriptions hear of every rewind of the
    /// log (a failed write cut its tail) before the offsets are reused.
    pub(crate) fn new(def: TopicDef, log: Log, all: Weak<TopicMap>) -> Arc<Self> {
        let topic = Arc::new(Self {
            def,
            log,
            subs: RwLock::new(Vec::new()),
            all,
        });
        let weak = Arc::downgrade(&topic);
        topic.log.on_rewind(Arc::new(move |end| {
            if let Some(topic) = weak.upgrade() {
                for sub in topic.subscriptions() {
                    sub.forget_from(end);
                }
            }
        }));
        topic
    }

    pub fn def(&self) -> &TopicDef {
        &self.def
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// Looks up another topic of the same broker.
    pub(crate) fn broker_topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.all.upgrade()?.read().get(name).cloned()
    }

    /// The subscriptions currently on this topic.
    pub fn subscriptions(&self) -> Vec<Arc<Subscription>> {
        self.subs.read().clone()
    }

    /// The lowest ack floor of the subscriptions: every record below it is
    /// settled by all of them. The log's next offset if there are none
    /// (nothing is kept for anyone).
    pub fn settled_floor(&self) -> Offset {
        self.subscriptions()
            .iter()
            .map(|s| s.ack_floor())
            .min()
            .unwrap_or_else(|| self.log.next_offset())
    }

    /// Stored bytes of the records from [`Topic::settled_floor`] on: what
    /// the log keeps because some subscription has not settled it. Measured
    /// from the sparse index, so it may count up to one index interval
    /// (8 KiB) more.
    pub fn backlog_bytes(&self) -> u64 {
        self.log.bytes_from(self.settled_floor())
    }

    /// Whether publishing `messages` may go ahead:
    /// under the reject-publish retention mode, not if it would take the
    /// backlog past `retention.max_bytes` (a batch larger than the bound
    /// never fits). Concurrent publishes are checked against the same
    /// backlog, so together they may pass the bound by what is in flight.
    ///
    /// # Errors
    /// `TopicFull` naming the topic and its bound.
    pub(crate) fn check_room(&self, messages: &[NewRecord]) -> Result<()> {
        let retention = self.def.retention;
        let (RetentionMode::RejectPublish, Some(max_bytes)) = (retention.mode, retention.max_bytes)
        else {
            return Ok(());
        };
        // Stored size, computed only for topics that need it.
        let publish_bytes: u64 = messages.iter().map(|m| m.frame_len() as u64).sum();
        // The backlog is part of the log: a log below the bound needs no
        // look at the subscriptions.
        if self.log.stats().disk_bytes + publish_bytes <= max_bytes {
            return Ok(());
        }
        let backlog_bytes = self.backlog_bytes();
        if backlog_bytes + publish_bytes <= max_bytes {
            return Ok(());
        }
        Err(BrokerError::TopicFull {
            topic: self.def.name.clone(),
            max_bytes,
            backlog_bytes,
            publish_bytes,
        })
    }
}

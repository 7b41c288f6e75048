//! A topic: its definition, its one log, and the subscriptions reading it.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use crate::broker::subscription::Subscription;
use crate::storage::Log;
use crate::storage::meta::TopicDef;

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
}

//! Subscriptions as an admin sees them: create (with its policies
//! checked), update, delete, look up.

use std::sync::Arc;

use super::recovery::{self, KIND_SUBSCRIPTION};
use super::subscription::now_us;
use super::{
    Broker, BrokerError, DIR_SUBSCRIPTIONS, Result, Subscription, blocking, config, detached,
    mark_deleting, remove_dir, unmark_deleting,
};
use crate::storage::definition;
use crate::storage::meta::{DeadLetterPolicy, RetryPolicy, SubscriptionDef};
use crate::storage::state::{StateEntry, SubscriptionState};

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

impl Broker {
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
                if self.topic(fwd).is_err() {
                    return Err(BrokerError::NotFoundBecause {
                        kind: "topic",
                        name: fwd.clone(),
                        why: "dead_letter_policy.forward_topic must name an existing topic".into(),
                    });
                }
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

    pub(super) async fn delete_subscription_locked(&self, name: &str) -> Result<()> {
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
}

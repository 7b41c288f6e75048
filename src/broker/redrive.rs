//! What operators do with dead letters: redrive them (unchanged, or one
//! with a replacement of its content) and purge them.

use bytes::Bytes;

use super::{Broker, BrokerError, DeadLetter, DeadLetterReason, Result, config, detached};
use crate::storage::{Attribute, NewRecord, Offset, Target};

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

impl Broker {
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
}

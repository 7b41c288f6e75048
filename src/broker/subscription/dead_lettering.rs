//! Dead-lettering: moving a message to the subscription's dead-letter log
//! exactly once (durable before it is settled), forwarding it, listing
//! the queue in pages, and removing entries (redrive, purge).

use std::time::Instant;

use rustc_hash::FxHashSet as HashSet;

use super::{
    DEAD_LETTER_RETRY_AFTER, DEAD_LETTER_SCAN_PAGE, DueDeadLetter, READ_RETRY_AFTER, Subscription,
    ranges_of,
};
use crate::broker::dead_letter::{self, DeadLetter, DeadLetterMeta, DeadLetterReason, Redrive};
use crate::broker::error::Result;
use crate::broker::retry::with_nack_reason;
use crate::storage::state::StateEntry;
use crate::storage::{NewRecord, Offset, ReadLimits, StorageError};

impl Subscription {
    /// Moves messages to the dead-letter log, then settles them. On error
    /// the messages go back to the redelivery queue.
    pub(super) async fn dead_letter(
        &self,
        items: Vec<(u64, DeadLetterReason, String)>,
    ) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let def = self.def();
        let mut records = Vec::with_capacity(items.len());
        let mut offsets = Vec::with_capacity(items.len());
        let mut forward = Vec::new();
        let mut not_yet_durable = Vec::new();
        let mut unreadable = Vec::new();
        // What to try again if the dead-letter log cannot take them.
        let mut retry = Vec::new();
        for (offset, reason, text) in items {
            let (attempts, last_nack) = {
                let core = self.core.lock();
                let attempts = core.state.attempts.get(&offset).copied();
                (attempts, core.state.nack_note(offset).cloned())
            };
            if offset >= self.topic.log.next_offset().0 {
                // A lease that expired before its record was durable:
                // retry the delivery instead.
                not_yet_durable.push(offset);
                continue;
            }
            let message = match self.read_one(offset) {
                Ok(Some(message)) => message,
                Ok(None) => {
                    tracing::warn!(subscription = %def.name, offset, "message to dead-letter is no longer retained");
                    offsets.push(offset);
                    continue;
                }
                Err(StorageError::Corrupt { path, detail, .. }) => {
                    tracing::error!(subscription = %def.name, path = %path.display(), offset, detail, "message to dead-letter is corrupt; settled without a dead letter");
                    offsets.push(offset);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(subscription = %def.name, offset, error = %e, "cannot read a message to dead-letter; retrying later");
                    unreadable.push(DueDeadLetter {
                        offset,
                        reason,
                        text,
                        not_before: Instant::now() + READ_RETRY_AFTER,
                    });
                    continue;
                }
            };
            retry.push(DueDeadLetter {
                offset,
                reason,
                text: text.clone(),
                not_before: Instant::now() + DEAD_LETTER_RETRY_AFTER,
            });
            let reason_text = match reason {
                DeadLetterReason::AttemptsExhausted => {
                    let count = attempts.map_or(0, |a| a.count);
                    with_nack_reason(text, count, last_nack.as_ref())
                }
                DeadLetterReason::Rejected => text,
            };
            let meta = DeadLetterMeta {
                reason,
                reason_text,
                delivery_attempts: attempts.map_or(0, |a| a.count),
                first_delivery_us: attempts.map_or(0, |a| a.first_delivery_us),
                last_delivery_us: attempts.map_or(0, |a| a.last_delivery_us),
                topic: def.topic.clone(),
                last_nack,
                redrive: Redrive::of(&message),
            };
            records.push(NewRecord {
                message_id: Some(message.message_id),
                target: None,
                attributes: message.attributes.clone(),
                ordering_key: message.ordering_key.clone(),
                payload: dead_letter::encode_payload(&meta, &message),
            });
            forward.push(message);
            offsets.push(offset);
        }
        if !not_yet_durable.is_empty() || !unreadable.is_empty() {
            let mut core = self.core.lock();
            let now = Instant::now();
            for o in not_yet_durable {
                core.dead_lettering.remove(&o);
                core.schedule(o, now);
            }
            // Still being dead-lettered: `tick` tries again.
            core.dead_letter_due.extend(unreadable);
        }
        if offsets.is_empty() {
            return Ok(()); // everything went back to the redelivery queue
        }
        let appended = if records.is_empty() {
            Ok(())
        } else {
            match self.dlq.get_or_create() {
                Ok(log) => log.append(&records).await.map(|_| ()),
                Err(e) => Err(e),
            }
        };
        let ticket = {
            let mut core = self.core.lock();
            for o in &offsets {
                core.dead_lettering.remove(o);
            }
            if let Err(e) = appended {
                // Still being dead-lettered (never delivered again):
                // `tick` tries again in a while. Messages that turned out
                // gone or corrupt are settled all the same.
                for d in &retry {
                    core.dead_lettering.insert(d.offset);
                }
                let retried: HashSet<u64> = retry.iter().map(|d| d.offset).collect();
                core.dead_letter_due.extend(retry);
                let gone: Vec<u64> = offsets
                    .iter()
                    .copied()
                    .filter(|o| !retried.contains(o))
                    .collect();
                if !gone.is_empty() {
                    let ranges = core.settle(&gone);
                    let _ = self
                        .journal
                        .enqueue(self.id(), &[StateEntry::Settled { ranges }]);
                }
                return Err(e.into());
            }
            let ranges = core.settle(&offsets);
            self.journal
                .enqueue(self.id(), &[StateEntry::Settled { ranges }])?
        };
        ticket.wait().await?;
        if let Some(topic) = def
            .dead_letter
            .as_ref()
            .and_then(|p| p.forward_topic.clone())
        {
            if let Some(target) = self.topic.broker_topic(&topic) {
                let copies: Vec<NewRecord> = forward
                    .into_iter()
                    .map(|m| NewRecord {
                        message_id: None,
                        target: None,
                        attributes: m.attributes,
                        ordering_key: m.ordering_key,
                        payload: m.payload,
                    })
                    .collect();
                if let Err(e) = target.log.append(&copies).await {
                    tracing::error!(subscription = %def.name, forward_topic = %topic, error = %e, "forwarding dead letters failed");
                }
            } else {
                tracing::warn!(subscription = %def.name, forward_topic = %topic, "dead-letter forward topic does not exist");
            }
        }
        Ok(())
    }

    /// Live dead letters from dead-letter offset `from`, up to `max`.
    /// Returns them and the offset to continue from, if there are more.
    /// The page token that continues a dead-letter listing at `offset`.
    pub fn dead_letter_page_token(&self, offset: Offset) -> String {
        self.ack_key.page_token(self.id(), offset.0)
    }

    /// Where a dead-letter listing goes on, from a token
    /// [`Subscription::dead_letter_page_token`] issued; `None` if this
    /// subscription did not issue it.
    pub fn dead_letter_page_from(&self, token: &str) -> Option<Offset> {
        self.ack_key.parse_page_token(self.id(), token).map(Offset)
    }

    /// The dead letter of `message_id` still in the queue, if any. Reads
    /// only the runs of the queue that may hold it
    /// ([`dead_letter::DeadLetterLog::runs_holding`]), off the runtime's
    /// threads.
    pub(crate) fn dead_letter_of(&self, message_id: u64) -> Result<Option<DeadLetter>> {
        let Some(dlq) = self.dlq.existing()? else {
            return Ok(None);
        };
        let removed = self.core.lock().state.dlq_removed.clone();
        for (start, end) in self.dlq.runs_holding(&dlq, message_id)? {
            let mut at = start.max(Offset(removed.floor()));
            while at < end {
                let limits = ReadLimits {
                    records_max: usize::try_from(end.0 - at.0).unwrap_or(usize::MAX),
                    bytes_max: 4 << 20,
                };
                let batch = match dlq.read(at, limits) {
                    Ok(b) => b,
                    Err(StorageError::Corrupt { next_readable, .. }) => {
                        at = next_readable.max(Offset(at.0 + 1));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if batch.records.is_empty() {
                    break;
                }
                let found = batch.records.iter().find(|r| {
                    r.offset < end && r.message_id == message_id && !removed.contains(r.offset.0)
                });
                if let Some(dl) = found.and_then(dead_letter::decode) {
                    return Ok(Some(dl));
                }
                at = batch.next;
            }
        }
        Ok(None)
    }

    pub fn dead_letters(
        &self,
        from: Offset,
        max: usize,
    ) -> Result<(Vec<DeadLetter>, Option<Offset>)> {
        let Some(dlq) = self.dlq.existing()? else {
            return Ok((Vec::new(), None));
        };
        let removed = self.core.lock().state.dlq_removed.clone();
        let mut out = Vec::new();
        let mut from = from.max(Offset(removed.floor()));
        loop {
            let batch = match dlq.read(
                from,
                ReadLimits {
                    records_max: 1000,
                    bytes_max: 4 << 20,
                },
            ) {
                Ok(b) => b,
                Err(StorageError::Corrupt { next_readable, .. }) => {
                    from = next_readable;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if batch.records.is_empty() {
                return Ok((out, None));
            }
            for record in &batch.records {
                if removed.contains(record.offset.0) {
                    continue;
                }
                if out.len() >= max {
                    return Ok((out, Some(record.offset)));
                }
                match dead_letter::decode(record) {
                    Some(dl) => out.push(dl),
                    None => {
                        tracing::error!(subscription = %self.name(), offset = %record.offset, "undecodable dead letter skipped")
                    }
                }
            }
            from = batch.next;
        }
    }

    /// Durably marks dead-letter offsets as removed.
    pub(crate) async fn remove_dead_letters(&self, offsets: Vec<u64>) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let ticket = {
            let mut core = self.core.lock();
            let ranges = ranges_of(offsets);
            let entry = StateEntry::DlqRemoved { ranges };
            core.state.apply(&entry);
            self.journal.enqueue(self.id(), &[entry])?
        };
        ticket.wait().await?;
        Ok(())
    }

    /// On open: settles every message that has a live dead letter but is
    /// not yet settled (a crash came between the two steps).
    pub(crate) async fn reconcile_dead_letters(&self) -> Result<u64> {
        let mut fixed = 0;
        let mut from = Offset(0);
        loop {
            let (page, next) = self.dead_letters(from, DEAD_LETTER_SCAN_PAGE)?;
            let unsettled: Vec<u64> = {
                let core = self.core.lock();
                page.iter()
                    .map(|d| d.source_offset.0)
                    .filter(|o| !core.state.settled.contains(*o))
                    .collect()
            };
            if !unsettled.is_empty() {
                fixed += unsettled.len() as u64;
                let ticket = {
                    let mut core = self.core.lock();
                    let ranges = core.settle(&unsettled);
                    self.journal
                        .enqueue(self.id(), &[StateEntry::Settled { ranges }])?
                };
                ticket.wait().await?;
            }
            match next {
                Some(n) => from = n,
                None => return Ok(fixed),
            }
        }
    }

    /// Dead-letter log offset below which every entry is removed.
    pub(crate) fn dlq_floor(&self) -> Offset {
        Offset(self.core.lock().state.dlq_removed.floor())
    }
}

//! Messages given back: nacks (with the reason a consumer gave, kept
//! within the broker's share for them), deadline changes, leases that
//! expire (`tick`) and streams that end. Each failed delivery is retried
//! after the backoff or dead-lettered when its attempts run out.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{AckOutcome, ConsumerId, Core, DueDeadLetter, Lease, NackKind, Subscription};
use crate::broker::ack_id::AckId;
use crate::broker::dead_letter::DeadLetterReason;
use crate::broker::error::{BrokerError, Result};
use crate::broker::retry::{Failure, exhausted_text, retry_delay};
use crate::storage::meta::RetryPolicy;
use crate::storage::state::{NACK_NOTE_OVERHEAD_BYTES, NackNote, StateEntry};

impl Subscription {
    /// Changes lease deadlines; `deadline` zero nacks.
    ///
    /// # Cancel safety
    /// As [`Subscription::nack`].
    pub async fn modify_deadline(
        self: &Arc<Self>,
        ids: &[Option<AckId>],
        deadline: Duration,
    ) -> Result<Vec<AckOutcome>> {
        if deadline.is_zero() {
            return self.nack(ids, NackKind::default()).await;
        }
        let visible = self.topic.log.next_offset().0;
        let mut core = self.core.lock();
        let now = Instant::now();
        Ok(ids
            .iter()
            .map(|id| {
                let Some(id) = id else {
                    return AckOutcome::Unknown;
                };
                match core.leases.get(&id.offset).copied() {
                    Some(lease) if lease.attempt == id.attempt => {
                        core.deadlines.remove(&(lease.deadline, id.offset));
                        let new = now + deadline;
                        core.deadlines.insert((new, id.offset));
                        core.leases.insert(
                            id.offset,
                            Lease {
                                deadline: new,
                                ..lease
                            },
                        );
                        AckOutcome::Ok
                    }
                    _ => match self.check_current(&core, visible, *id) {
                        // Not leased any more: too late to extend.
                        AckOutcome::Ok => AckOutcome::Stale,
                        other => other,
                    },
                }
            })
            .collect())
    }

    /// Nacks deliveries: each is redelivered after the retry backoff, or
    /// dead-lettered if `reject` is given or attempts are exhausted. Dead
    /// letters are durable when this returns.
    ///
    /// # Cancel safety
    /// Everything happens in memory before the first await; the dead
    /// letters are then written by a task of their own. Dropping the future
    /// leaves no message half-way: each is scheduled for redelivery or
    /// moved to the dead-letter queue all the same.
    pub async fn nack(
        self: &Arc<Self>,
        ids: &[Option<AckId>],
        how: NackKind<'_>,
    ) -> Result<Vec<AckOutcome>> {
        let def = self.def();
        let mut to_dead_letter = Vec::new();
        let outcomes = {
            let visible = self.topic.log.next_offset().0;
            let mut core = self.core.lock();
            let now = Instant::now();
            let mut notes = Vec::new();
            let outcomes = ids
                .iter()
                .map(|id| {
                    let Some(id) = id else {
                        return AckOutcome::Unknown;
                    };
                    let outcome = self.check_current(&core, visible, *id);
                    if outcome != AckOutcome::Ok {
                        return outcome;
                    }
                    core.remove_lease(id.offset);
                    if let Some(at) = core.ready_at.remove(&id.offset) {
                        core.ready.remove(&(at, id.offset));
                    }
                    let attempts = core.attempts(id.offset);
                    if how.reject {
                        core.dead_lettering.insert(id.offset);
                        to_dead_letter.push((
                            id.offset,
                            DeadLetterReason::Rejected,
                            how.reason.to_string(),
                        ));
                        return AckOutcome::Ok;
                    }
                    notes.extend(self.note_nack(&mut core, id.offset, attempts, how.reason));
                    if def
                        .dead_letter
                        .as_ref()
                        .is_some_and(|p| attempts >= p.max_delivery_attempts)
                    {
                        core.dead_lettering.insert(id.offset);
                        to_dead_letter.push((
                            id.offset,
                            DeadLetterReason::AttemptsExhausted,
                            exhausted_text(attempts, Failure::Nacked),
                        ));
                    } else if id.offset < core.cursor {
                        core.schedule(
                            id.offset,
                            now + retry_delay(&def.retry, attempts, id.offset),
                        );
                    }
                    // (At or past the cursor, after a restart: the cursor
                    // delivers it again when it gets there.)
                    AckOutcome::Ok
                })
                .collect();
            if !notes.is_empty() {
                // Kept for the status and the dead letter; they need not
                // hold up the nack, so they share a later sync. A journal
                // that cannot take them loses them at the next restart
                // only: the nacks themselves are done.
                if let Err(e) = self.journal.enqueue_deferred(self.id(), &notes) {
                    tracing::warn!(subscription = %def.name, error = %e, "nack reasons not journaled");
                }
            }
            outcomes
        };
        self.wake.notify_waiters();
        if !to_dead_letter.is_empty() {
            let this = self.clone();
            let written = tokio::spawn(async move { this.dead_letter(to_dead_letter).await });
            match written.await {
                Ok(result) => result?,
                Err(e) => {
                    if let Ok(panic) = e.try_into_panic() {
                        std::panic::resume_unwind(panic);
                    }
                    return Err(BrokerError::ShuttingDown);
                }
            }
        }
        Ok(outcomes)
    }

    /// Releases every lease of `consumer` (its stream ended): each counts
    /// as a failed attempt and is redelivered after the retry backoff, or
    /// dead-lettered if out of attempts.
    ///
    /// # Cancel safety
    /// The leases are released before the first await and the dead letters
    /// are written by a task of their own, which dropping the future does
    /// not stop.
    pub async fn release_consumer(self: &Arc<Self>, consumer: ConsumerId) {
        let attempts_max = self.attempts_max();
        let retry = self.def().retry;
        let mut to_dead_letter = Vec::new();
        {
            let mut core = self.core.lock();
            let mine: Vec<u64> = core
                .leases
                .iter()
                .filter(|(_, l)| l.consumer == consumer)
                .map(|(o, _)| *o)
                .collect();
            let now = Instant::now();
            for offset in mine {
                core.remove_lease(offset);
                Self::fail_attempt(
                    &mut core,
                    attempts_max,
                    &retry,
                    offset,
                    (now, Failure::StreamEnded),
                    &mut to_dead_letter,
                );
            }
            core.consumers.remove(&consumer);
        }
        self.wake.notify_waiters();
        if to_dead_letter.is_empty() {
            return;
        }
        let this = self.clone();
        let written = tokio::spawn(async move { this.dead_letter(to_dead_letter).await });
        if let Ok(Err(e)) = written.await {
            tracing::error!(subscription = %self.name(), error = %e, "dead-lettering after stream end failed; retried by the ticker");
        }
    }

    /// A delivery failed (lease expired or released): redeliver after the
    /// retry backoff, as for a nack, or dead-letter if attempts reached
    /// `attempts_max`.
    fn fail_attempt(
        core: &mut Core,
        attempts_max: Option<u32>,
        retry: &RetryPolicy,
        offset: u64,
        (now, how): (Instant, Failure),
        to_dead_letter: &mut Vec<(u64, DeadLetterReason, String)>,
    ) {
        if core.exhausted(attempts_max, offset) {
            core.dead_lettering.insert(offset);
            let text = exhausted_text(core.attempts(offset), how);
            to_dead_letter.push((offset, DeadLetterReason::AttemptsExhausted, text));
        } else {
            let attempts = core.attempts(offset);
            core.schedule(offset, now + retry_delay(retry, attempts, offset));
        }
    }

    pub(super) fn attempts_max(&self) -> Option<u32> {
        self.def
            .read()
            .dead_letter
            .as_ref()
            .map(|p| p.max_delivery_attempts)
    }

    /// Whether [`Subscription::tick`] has anything to do at `now` (a lease
    /// expired, a dead letter or a redelivery due). Costs one lock and
    /// brings the broker's count of nack notes up to date, so the ticker
    /// asks every subscription and ticks only those that say yes.
    pub fn tick_due(&self, now: Instant) -> bool {
        let core = self.core.lock();
        let expiry_due = core.deadlines.first().is_some_and(|&(at, _)| at <= now);
        let dead_letter_due = core.dead_letter_due.iter().any(|d| d.not_before <= now);
        let ready_due = core.ready.first().is_some_and(|(at, _)| *at <= now);
        if !expiry_due && !dead_letter_due && !ready_due {
            self.report_notes(&core);
            return false;
        }
        true
    }

    /// Expires due leases and wakes waiters if redeliveries are due.
    /// Called by the broker's ticker.
    pub async fn tick(&self) {
        let now = Instant::now();
        if !self.tick_due(now) {
            return;
        }
        let attempts_max = self.attempts_max();
        let retry = self.def.read().retry;
        let mut to_dead_letter = Vec::new();
        let wake = {
            let mut core = self.core.lock();
            while let Some(&(deadline, offset)) = core.deadlines.first() {
                if deadline > now {
                    break;
                }
                core.remove_lease(offset);
                Self::fail_attempt(
                    &mut core,
                    attempts_max,
                    &retry,
                    offset,
                    (now, Failure::Expired),
                    &mut to_dead_letter,
                );
            }
            let (due, later): (Vec<DueDeadLetter>, Vec<DueDeadLetter>) =
                std::mem::take(&mut core.dead_letter_due)
                    .into_iter()
                    .partition(|d| d.not_before <= now);
            core.dead_letter_due = later;
            to_dead_letter.extend(due.into_iter().map(|d| (d.offset, d.reason, d.text)));
            self.report_notes(&core);
            core.ready.first().is_some_and(|(at, _)| *at <= now)
        };
        if wake {
            self.wake.notify_waiters();
        }
        if let Err(e) = self.dead_letter(to_dead_letter).await {
            tracing::error!(subscription = %self.name(), error = %e, "dead-lettering expired messages failed");
        }
    }

    /// Brings the broker-wide count of nack notes up to date with this
    /// subscription's (which settling, purging and retention lower).
    fn report_notes(&self, core: &Core) {
        let now = core.state.nack_note_bytes();
        let before = self.notes_reported.swap(now, Ordering::Relaxed);
        self.notes.report(before, now);
    }

    /// Keeps `reason` as the last nack reason of the delivery `attempt` at
    /// `offset`, if the broker's share for them has room; returns the
    /// entry to journal.
    fn note_nack(
        &self,
        core: &mut Core,
        offset: u64,
        attempt: u32,
        reason: &str,
    ) -> Option<StateEntry> {
        if reason.is_empty() {
            return None;
        }
        self.report_notes(core);
        let cost = reason.len() as u64 + NACK_NOTE_OVERHEAD_BYTES;
        let freed = core.state.nack_note(offset).map_or(0, NackNote::cost);
        if !self.notes.has_room(cost.saturating_sub(freed)) {
            if !self.notes_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(subscription = %self.name(), "nack reasons are not being kept: their share of the memory budget (1/64 of memory_max) is full until messages with kept reasons are settled");
            }
            return None;
        }
        if self.notes_full.swap(false, Ordering::Relaxed) {
            tracing::info!(subscription = %self.name(), "nack reasons are kept again");
        }
        let entry = StateEntry::Nacked {
            offset,
            attempt,
            text: reason.to_string(),
        };
        core.state.apply(&entry);
        self.report_notes(core);
        Some(entry)
    }
}

//! A subscription: a cursor plus ack state over its topic's one log.
//!
//! - mod.rs: the subscription's state, acks, purge, retention cuts,
//!   snapshots.
//! - lease.rs: leasing: from memory under the lock, reading ahead off it.
//! - nack.rs: messages given back: nacks (and their reasons), deadline
//!   changes, expiry (`tick`), streams that end.
//! - dead_lettering.rs: moving messages to the dead-letter log, listing
//!   and removing its entries.
//! - status.rs: figures and one message's state.
//!
//! Invariants (held under `Subscription::core`):
//! - Every offset below `cursor` that is not settled is in exactly one of
//!   `leases` (delivered, awaiting ack), `ready` (waiting for redelivery)
//!   or `dead_lettering` (being moved to the dead-letter queue).
//! - `cursor - settled.floor() <= unacked_window_max`: memory for leases and
//!   attempts is bounded by configuration, not by the backlog.
//! - A delivery's attempt number is journaled (and durable under the fsync
//!   mode) before the delivery is handed to a consumer, so attempt numbers
//!   are exact across crashes.
//! - A message is moved to the dead-letter queue exactly once: the dead
//!   letter is appended and durable before the offset is settled, and on
//!   open any dead letter whose offset is not settled is settled then.
//! - No delivery's attempt number exceeds `max_delivery_attempts`, across
//!   restarts too: a message whose last allowed attempt was in flight at a
//!   crash, or whose dead-lettering failed, is queued for dead-lettering
//!   (`dead_letter_due`, handled by `tick`) when it would be delivered
//!   again, never handed out.

mod dead_lettering;
mod lease;
mod nack;
mod status;

pub use lease::{LeaseLimits, Leased, frame_bytes};

use std::collections::BTreeSet;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::broker::ack_id::{AckId, AckKey};
use crate::broker::dead_letter::{DeadLetterLog, DeadLetterReason};
use crate::broker::error::Result;
use crate::broker::memory::NoteLedger;
use crate::broker::retry::{Failure, exhausted_text};
use crate::broker::topic::Topic;
use crate::storage::meta::SubscriptionDef;
use crate::storage::state::{NackNote, StateEntry, StateJournal, SubscriptionState};
use crate::storage::{AppendTicket, Log, Offset, ReadBatch, ReadLimits, Record, StorageError};

/// Identifies the consumer holding a lease: a StreamingPull stream, or
/// [`PULL_CONSUMER`] for unary Pull.
pub type ConsumerId = u64;
/// How long a message whose dead-lettering failed waits before it is tried
/// again.
const DEAD_LETTER_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a message whose record could not be read (an I/O error, not
/// corruption) waits before it is tried again.
const READ_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Dead letters read per page when scanning the queue.
const DEAD_LETTER_SCAN_PAGE: usize = 1_000;
/// The consumer id of leases handed out by unary Pull.
pub const PULL_CONSUMER: ConsumerId = 0;
const ONE_RECORD: ReadLimits = ReadLimits {
    records_max: 1,
    bytes_max: 1,
};

/// The record at `offset` of `log`, if it is still retained.
fn read_one(log: &Log, offset: u64) -> Result<Option<Record>, StorageError> {
    log.read(Offset(offset), ONE_RECORD)
        .map(|batch| first_at(batch, offset))
}

/// The record of `batch` at `offset`, if it is the first.
fn first_at(batch: ReadBatch, offset: u64) -> Option<Record> {
    batch
        .records
        .into_iter()
        .next()
        .filter(|r| r.offset.0 == offset)
}

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub ack_id: AckId,
    pub attempt: u32,
    pub record: Record,
}

/// Outcome of one ack, nack or deadline change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    Ok,
    /// Malformed, not issued by this subscription, or never delivered.
    Unknown,
    /// Issued by this subscription for a message that is settled already
    /// (acknowledged, dead-lettered, purged or removed by retention).
    AlreadySettled,
    /// A newer delivery of the message exists; the operation was ignored.
    Stale,
}

/// What a consumer holds right now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outstanding {
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    attempt: u32,
    deadline: Instant,
    consumer: ConsumerId,
    bytes: u64,
}

/// State of a message a status lookup reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageState {
    NotSubscribed,
    Pending {
        attempts: u32,
        last_nack: Option<NackNote>,
    },
    InFlight {
        attempt: u32,
        deadline_us: u64,
        last_nack: Option<NackNote>,
    },
    Acked,
    DeadLettered {
        reason: DeadLetterReason,
        reason_text: String,
        attempts: u32,
        last_nack: Option<NackNote>,
    },
}

/// Per-subscription figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubscriptionStats {
    pub backlog_messages: u64,
    pub backlog_bytes: u64,
    pub in_flight_messages: u64,
    pub dead_lettered_messages: u64,
    pub oldest_unacked_age_ms: Option<u64>,
    pub ack_floor: u64,
    /// Messages the topic's retention removed before this subscription
    /// settled them, since it was created (durable).
    pub dropped_by_retention: u64,
}

#[derive(Debug)]
struct Core {
    state: SubscriptionState,
    /// Next offset of the topic not yet read for a first delivery.
    cursor: u64,
    leases: HashMap<u64, Lease>,
    /// (deadline, offset) of every lease.
    deadlines: BTreeSet<(Instant, u64)>,
    /// (ready at, offset) of messages waiting for redelivery.
    ready: BTreeSet<(Instant, u64)>,
    ready_at: HashMap<u64, Instant>,
    dead_lettering: HashSet<u64>,
    /// Messages in `dead_lettering` that `tick` must still move to the
    /// dead-letter queue (attempts exhausted, or a dead-lettering that
    /// could not read the message and tries again).
    dead_letter_due: Vec<DueDeadLetter>,
    consumers: HashMap<ConsumerId, Outstanding>,
}

/// A dead letter `tick` still has to write.
#[derive(Debug, Clone)]
struct DueDeadLetter {
    offset: u64,
    reason: DeadLetterReason,
    text: String,
    not_before: Instant,
}

/// One subscription. Shared by the broker, its streams and the ticker.
#[derive(Debug)]
pub struct Subscription {
    /// `def.id`, which never changes, without the lock.
    id: u64,
    def: RwLock<SubscriptionDef>,
    pub(crate) topic: Arc<Topic>,
    pub(crate) dlq: DeadLetterLog,
    journal: StateJournal,
    core: Mutex<Core>,
    /// Signalled when a redelivery becomes ready or the subscription is
    /// deleted.
    wake: Notify,
    deleted: AtomicBool,
    window_max: u64,
    /// Issues and checks this subscription's ack ids.
    ack_key: AckKey,
    /// Held by redrive and purge, so two of them never pick the same dead
    /// letters.
    pub(crate) dead_letter_ops: tokio::sync::Mutex<()>,
    /// The broker-wide count the nack notes are kept against, and this
    /// subscription's share of it as last reported.
    notes: NoteLedger,
    notes_reported: AtomicU64,
    /// Set while nack reasons are not kept for want of room (warned once).
    notes_full: AtomicBool,
}

/// What every subscription of a broker shares.
#[derive(Debug, Clone)]
pub struct SubscriptionEnv {
    pub journal: StateJournal,
    /// Most offsets past the ack floor that may be read for delivery.
    pub window_max: u64,
    pub ack_key: AckKey,
    pub notes: NoteLedger,
}

/// How a consumer gave a message back.
#[derive(Debug, Clone, Copy, Default)]
pub struct NackKind<'a> {
    /// Non-retriable: dead-letter it now, with `reason` as the text.
    pub reject: bool,
    /// The consumer's reason; kept per message for a plain nack.
    pub reason: &'a str,
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn instant_to_unix_us(at: Instant) -> u64 {
    let now = Instant::now();
    let now_us = now_us();
    if at >= now {
        now_us + u64::try_from((at - now).as_micros()).unwrap_or(u64::MAX)
    } else {
        now_us.saturating_sub(u64::try_from((now - at).as_micros()).unwrap_or(u64::MAX))
    }
}

/// Turns sorted offsets into half-open ranges.
fn ranges_of(mut offsets: Vec<u64>) -> Vec<(u64, u64)> {
    offsets.sort_unstable();
    offsets.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for o in offsets {
        match out.last_mut() {
            Some((_, end)) if *end == o => *end = o + 1,
            _ => out.push((o, o + 1)),
        }
    }
    out
}

impl Core {
    fn settle(&mut self, offsets: &[u64]) -> Vec<(u64, u64)> {
        for o in offsets {
            self.remove_lease(*o);
            if let Some(at) = self.ready_at.remove(o) {
                self.ready.remove(&(at, *o));
            }
        }
        let ranges = ranges_of(offsets.to_vec());
        let entry = StateEntry::Settled {
            ranges: ranges.clone(),
        };
        self.state.apply(&entry);
        ranges
    }

    fn remove_lease(&mut self, offset: u64) -> Option<Lease> {
        let lease = self.leases.remove(&offset)?;
        self.deadlines.remove(&(lease.deadline, offset));
        if let Some(o) = self.consumers.get_mut(&lease.consumer) {
            o.messages = o.messages.saturating_sub(1);
            o.bytes = o.bytes.saturating_sub(lease.bytes);
        }
        Some(lease)
    }

    fn schedule(&mut self, offset: u64, at: Instant) {
        self.ready.insert((at, offset));
        self.ready_at.insert(offset, at);
    }

    fn attempts(&self, offset: u64) -> u32 {
        self.state.attempts.get(&offset).map_or(0, |a| a.count)
    }

    /// True if another delivery of `offset` would exceed `attempts_max`.
    fn exhausted(&self, attempts_max: Option<u32>, offset: u64) -> bool {
        attempts_max.is_some_and(|max| self.attempts(offset) >= max)
    }

    /// Retention removed everything below `first`: forgets the leases,
    /// redeliveries and dead-letterings there, raises the floor to `first`
    /// and counts the offsets that were not settled. Returns the journal
    /// entry saying so (already applied) and that count, or `None` if the
    /// floor was already there.
    fn drop_below(&mut self, first: u64) -> Option<(StateEntry, u64)> {
        let floor = self.state.settled.floor();
        if floor >= first {
            return None;
        }
        let count = (first - floor) - self.state.settled.count_in(floor, first);
        let leased: Vec<u64> = self.leases.keys().copied().filter(|o| *o < first).collect();
        for o in leased {
            self.remove_lease(o);
        }
        let waiting: Vec<(Instant, u64)> = self
            .ready
            .iter()
            .copied()
            .filter(|(_, o)| *o < first)
            .collect();
        for (at, o) in waiting {
            self.ready.remove(&(at, o));
            self.ready_at.remove(&o);
        }
        self.dead_lettering.retain(|o| *o >= first);
        self.dead_letter_due.retain(|d| d.offset >= first);
        let entry = StateEntry::RetentionDropped {
            floor: first,
            count,
        };
        self.state.apply(&entry);
        self.cursor = self.cursor.max(self.state.settled.floor());
        Some((entry, count))
    }

    /// Queues `offset` for `tick` to dead-letter (attempts exhausted; the
    /// last one was in flight when the broker stopped).
    fn dead_letter_later(&mut self, offset: u64) {
        if self.dead_lettering.insert(offset) {
            let attempts = self.attempts(offset);
            self.dead_letter_due.push(DueDeadLetter {
                offset,
                reason: DeadLetterReason::AttemptsExhausted,
                text: exhausted_text(attempts, Failure::Interrupted),
                not_before: Instant::now(),
            });
        }
    }
}

impl Subscription {
    pub(crate) fn new(
        def: SubscriptionDef,
        topic: Arc<Topic>,
        dlq: DeadLetterLog,
        state: SubscriptionState,
        env: SubscriptionEnv,
    ) -> Self {
        let cursor = state.settled.floor();
        // Messages whose last allowed attempt was delivered before the
        // restart: dead-lettered by the first tick, never delivered again.
        let attempts_max = def.dead_letter.as_ref().map(|p| p.max_delivery_attempts);
        let now = Instant::now();
        let dead_letter_due: Vec<DueDeadLetter> = state
            .attempts
            .iter()
            .filter(|(o, a)| {
                attempts_max.is_some_and(|max| a.count >= max) && !state.settled.contains(**o)
            })
            .map(|(o, a)| DueDeadLetter {
                offset: *o,
                reason: DeadLetterReason::AttemptsExhausted,
                text: exhausted_text(a.count, Failure::Interrupted),
                not_before: now,
            })
            .collect();
        let notes_reported = state.nack_note_bytes();
        env.notes.report(0, notes_reported);
        Self {
            id: def.id,
            def: RwLock::new(def),
            topic,
            dlq,
            journal: env.journal,
            core: Mutex::new(Core {
                state,
                cursor,
                leases: HashMap::default(),
                deadlines: BTreeSet::new(),
                ready: BTreeSet::new(),
                ready_at: HashMap::default(),
                dead_lettering: dead_letter_due.iter().map(|d| d.offset).collect(),
                dead_letter_due,
                consumers: HashMap::default(),
            }),
            wake: Notify::new(),
            deleted: AtomicBool::new(false),
            window_max: env.window_max,
            ack_key: env.ack_key,
            dead_letter_ops: tokio::sync::Mutex::new(()),
            notes: env.notes,
            notes_reported: AtomicU64::new(notes_reported),
            notes_full: AtomicBool::new(false),
        }
    }

    /// The subscription's definition.
    pub fn def(&self) -> SubscriptionDef {
        self.def.read().clone()
    }

    pub(crate) fn set_def(&self, def: SubscriptionDef) {
        *self.def.write() = def;
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> String {
        self.def.read().name.clone()
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    /// The topic's log was rewound to `end` after a failed write: forget
    /// every lease, redelivery and attempt count at or past it (like
    /// recovery after a lost tail), so the offsets start clean when new
    /// messages get them. Nothing at those offsets was ever sent.
    pub(crate) fn forget_from(&self, end: Offset) {
        let mut core = self.core.lock();
        let doomed: Vec<u64> = core
            .leases
            .keys()
            .copied()
            .filter(|o| *o >= end.0)
            .collect();
        for o in doomed {
            core.remove_lease(o);
        }
        let stale: Vec<(Instant, u64)> = core
            .ready
            .iter()
            .copied()
            .filter(|(_, o)| *o >= end.0)
            .collect();
        for (at, o) in stale {
            core.ready.remove(&(at, o));
            core.ready_at.remove(&o);
        }
        core.dead_lettering.retain(|o| *o < end.0);
        core.dead_letter_due.retain(|d| d.offset < end.0);
        core.state.truncate_at(end);
        core.cursor = core.cursor.min(end.0.max(core.state.settled.floor()));
    }

    /// Undoes `mark_deleted` (the deletion failed).
    pub(crate) fn unmark_deleted(&self) {
        self.deleted.store(false, Ordering::Release);
    }

    /// A receiver of the topic's visible next offset: it changes when new
    /// records may be deliverable.
    pub fn watch_topic(&self) -> tokio::sync::watch::Receiver<Offset> {
        self.topic.log.watch_written()
    }

    /// Notified when a redelivery comes due, the subscription is deleted, or
    /// the broker shuts down. Create and `enable` the `Notified` future
    /// before checking for work, so no signal is missed.
    pub fn wake_signal(&self) -> &Notify {
        &self.wake
    }

    /// Wakes every waiter (used at shutdown).
    pub(crate) fn wake_all(&self) {
        self.wake.notify_waiters();
    }

    /// Registers a consumer (a stream) so its outstanding leases are
    /// counted.
    pub fn register_consumer(&self, consumer: ConsumerId) {
        self.core.lock().consumers.entry(consumer).or_default();
    }

    /// What `consumer` holds now.
    pub fn outstanding(&self, consumer: ConsumerId) -> Outstanding {
        self.core
            .lock()
            .consumers
            .get(&consumer)
            .copied()
            .unwrap_or_default()
    }

    /// The record at `offset` of the topic, if it is still retained. Reads
    /// the segment files: not under the subscription's lock.
    fn read_one(&self, offset: u64) -> Result<Option<Record>, StorageError> {
        read_one(&self.topic.log, offset)
    }

    /// Acknowledges deliveries; durable when this returns.
    pub async fn ack(&self, ids: &[Option<AckId>]) -> Result<Vec<AckOutcome>> {
        let (outcomes, ticket) = self.ack_now(ids)?;
        if let Some(ticket) = ticket {
            ticket.wait().await?;
        }
        Ok(outcomes)
    }

    /// The synchronous part of [`Subscription::ack`]: settles in memory and
    /// queues the journal entry. Report the outcomes as durable only after
    /// the ticket (if any) resolves.
    pub fn ack_now(
        &self,
        ids: &[Option<AckId>],
    ) -> Result<(Vec<AckOutcome>, Option<AppendTicket>)> {
        self.settle_acks(ids, false)
    }

    /// Like [`Subscription::ack_now`], for acks whose results nobody waits
    /// on (a StreamingPull's): the journal entry may wait up to
    /// `BrokerConfig::journal_defer_ms` to share the next delivery's sync
    /// instead of costing a sync of its own.
    pub fn ack_now_deferred(
        &self,
        ids: &[Option<AckId>],
    ) -> Result<(Vec<AckOutcome>, Option<AppendTicket>)> {
        self.settle_acks(ids, true)
    }

    fn settle_acks(
        &self,
        ids: &[Option<AckId>],
        deferred: bool,
    ) -> Result<(Vec<AckOutcome>, Option<AppendTicket>)> {
        let visible = self.topic.log.next_offset().0;
        let (outcomes, ticket) = {
            let mut core = self.core.lock();
            let mut settle = Vec::new();
            let mut seen = HashSet::default();
            let outcomes: Vec<AckOutcome> = ids
                .iter()
                .map(|id| {
                    let Some(id) = id else {
                        return AckOutcome::Unknown;
                    };
                    // An id acked earlier in this same call is settled
                    // already (the journal hears of it below).
                    if seen.contains(&id.offset) {
                        return AckOutcome::AlreadySettled;
                    }
                    let outcome = self.check_current(&core, visible, *id);
                    if outcome == AckOutcome::Ok {
                        settle.push(id.offset);
                        seen.insert(id.offset);
                    }
                    outcome
                })
                .collect();
            let ticket = if settle.is_empty() {
                None
            } else {
                let entry = [StateEntry::Settled {
                    ranges: core.settle(&settle),
                }];
                Some(if deferred {
                    self.journal.enqueue_deferred(self.id(), &entry)?
                } else {
                    self.journal.enqueue(self.id(), &entry)?
                })
            };
            (outcomes, ticket)
        };
        Ok((outcomes, ticket))
    }

    /// Whether `id` names the current delivery of an unsettled message.
    fn check_current(&self, core: &Core, visible: u64, id: AckId) -> AckOutcome {
        // Not issued by this subscription: forged, guessed, or another's.
        if !self.ack_key.verify(self.id(), &id) {
            return AckOutcome::Unknown;
        }
        // Nothing not yet durable can have reached a consumer.
        if id.offset >= visible {
            return AckOutcome::Unknown;
        }
        if core.state.settled.contains(id.offset) {
            return AckOutcome::AlreadySettled;
        }
        if id.offset >= core.cursor {
            // Not read since a restart. Its ack id still counts if the
            // journal says this was its latest delivery.
            return match core.attempts(id.offset) {
                n if n == id.attempt && n > 0 => AckOutcome::Ok,
                n if n > id.attempt => AckOutcome::Stale,
                _ => AckOutcome::Unknown,
            };
        }
        if core.dead_lettering.contains(&id.offset) {
            return AckOutcome::Stale;
        }
        match core.leases.get(&id.offset) {
            Some(lease) if lease.attempt == id.attempt => AckOutcome::Ok,
            Some(_) => AckOutcome::Stale,
            // Expired or released but not yet redelivered: the consumer's
            // ack of the latest delivery still counts.
            None if core.attempts(id.offset) == id.attempt => AckOutcome::Ok,
            None if core.attempts(id.offset) > id.attempt => AckOutcome::Stale,
            None => AckOutcome::Unknown,
        }
    }

    /// Settles every message published so far.
    pub async fn purge(&self) -> Result<u64> {
        let next = self.topic.log.next_offset().0;
        let (purged, ticket) = {
            let mut core = self.core.lock();
            let purged = self.backlog_messages(&core, next);
            let leased: Vec<u64> = core.leases.keys().copied().collect();
            for o in leased {
                core.remove_lease(o);
            }
            core.ready.clear();
            core.ready_at.clear();
            let entry = StateEntry::Floor { floor: next };
            core.state.apply(&entry);
            core.cursor = core.cursor.max(core.state.settled.floor());
            (purged, self.journal.enqueue(self.id(), &[entry])?)
        };
        ticket.wait().await?;
        Ok(purged)
    }

    fn backlog_messages(&self, core: &Core, next: u64) -> u64 {
        next.saturating_sub(core.state.settled.floor())
            .saturating_sub(core.state.settled.count_above_floor())
    }

    /// Settled floor: every offset below is acked or dead-lettered.
    pub fn ack_floor(&self) -> Offset {
        Offset(self.core.lock().state.settled.floor())
    }

    /// Retention is about to remove (or removed) everything below `first`:
    /// raises the floor there, forgetting leases and redeliveries below
    /// it, and counts the messages this subscription had not settled in
    /// `dropped_by_retention`. Returns that count once the journal entry
    /// saying so is durable; the caller may delete the segments then.
    ///
    /// # Cancel safety
    /// The change is made in memory and queued in the journal before the
    /// first await; dropping the future only stops waiting for it to be
    /// durable.
    pub(crate) async fn drop_below(&self, first: Offset) -> Result<u64> {
        let (count, ticket) = {
            let mut core = self.core.lock();
            let Some((entry, count)) = core.drop_below(first.0) else {
                return Ok(0);
            };
            (count, self.journal.enqueue(self.id(), &[entry])?)
        };
        ticket.wait().await?;
        if count > 0 {
            self.warn_dropped(count);
        }
        Ok(count)
    }

    /// The one log line of a retention pass that dropped messages.
    fn warn_dropped(&self, count: u64) {
        let total = self.core.lock().state.dropped_by_retention;
        tracing::warn!(
            topic = %self.topic.name(),
            subscription = %self.name(),
            count,
            total,
            "retention removed messages this subscription had not acknowledged or dead-lettered"
        );
    }

    /// Journals the full state (compaction). The returned ticket resolves
    /// once it is durable.
    pub(crate) fn snapshot(&self) -> Result<crate::storage::AppendTicket> {
        let core = self.core.lock();
        Ok(self.journal.enqueue(
            self.id(),
            &[StateEntry::Snapshot(Box::new(core.state.clone()))],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_ranges() {
        assert_eq!(ranges_of(vec![5, 1, 2, 3, 7, 6]), vec![(1, 4), (5, 8)]);
    }
}

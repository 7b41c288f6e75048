//! Leasing: due redeliveries first, then new records from the cursor,
//! within the unacked window. Records are taken under the subscription's
//! lock only from memory; what only the segment files hold is read ahead
//! on the blocking pool with the lock let go, and the lease tried again.

use std::time::{Duration, Instant};

use super::{
    ConsumerId, Core, Delivery, HashMap, Lease, ONE_RECORD, READ_RETRY_AFTER, Subscription,
    first_at, now_us, ranges_of, read_one,
};
use crate::broker::error::{BrokerError, Result};
use crate::storage::state::StateEntry;
use crate::storage::{AppendTicket, Log, Offset, ReadBatch, ReadLimits, Record, StorageError};

/// Most bytes of records read from the cursor at a time.
const CURSOR_READ_BYTES_MAX: usize = 4 << 20;
/// Most redeliveries read from the segment files in one read-ahead.
const REDELIVERY_READS_MAX: usize = 256;

/// Records read from the segment files off the subscription's lock, for
/// the next try of a lease ([`Subscription::lease_now`]).
#[derive(Debug, Default)]
struct ReadAhead {
    /// `Log::rewinds` of the topic before the records were read.
    rewinds: u64,
    /// Redeliveries by offset (`None`: no longer retained).
    redeliveries: HashMap<u64, Result<Option<Record>, StorageError>>,
    /// Records from this cursor position.
    cursor: Option<(u64, Result<ReadBatch, StorageError>)>,
}

/// What a lease that stopped at a record only the segment files hold needs
/// read.
#[derive(Debug)]
struct ReadPlan {
    /// Due redeliveries, in the order they are due.
    redeliveries: Vec<u64>,
    /// The cursor and how many records from it, if the window has room.
    cursor: Option<(u64, usize)>,
}

/// How many records to read from the cursor: at most `messages_max`, and
/// no further than the unacked window allows.
fn cursor_want(core: &Core, window_max: u64, messages_max: usize) -> usize {
    let window_left = (core.state.settled.floor() + window_max).saturating_sub(core.cursor);
    messages_max.min(usize::try_from(window_left).unwrap_or(usize::MAX))
}

impl ReadPlan {
    fn at(core: &Core, now: Instant, visible: u64, limits: LeaseLimits, window_max: u64) -> Self {
        let redeliveries = core
            .ready
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, offset)| *offset)
            .filter(|offset| *offset < visible)
            .take(limits.messages_max.min(REDELIVERY_READS_MAX))
            .collect();
        let want = cursor_want(core, window_max, limits.messages_max);
        ReadPlan {
            redeliveries,
            cursor: (want > 0).then_some((core.cursor, want)),
        }
    }
}

/// Leases taken by [`Subscription::lease_now`], waiting for their attempt
/// numbers to be durable.
#[derive(Debug)]
#[must_use = "deliveries must be awaited with `durable` before they are sent"]
pub struct Leased {
    deliveries: Vec<Delivery>,
    ticket: Option<AppendTicket>,
    /// The topic log and the offset below which it must be durable before
    /// the deliveries may go out.
    topic: Log,
    topic_until: Offset,
    /// `Log::rewinds` of the topic when the records were read.
    topic_rewinds: u64,
}

impl Leased {
    /// True if nothing was leased.
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// Stored size of the leased messages ([`Record::frame_len`]).
    pub fn frame_bytes(&self) -> u64 {
        frame_bytes(&self.deliveries)
    }

    /// Waits until the attempt numbers are durable; then the deliveries may
    /// be handed out.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the leases in place; they expire.
    pub async fn durable(self) -> Result<Vec<Delivery>> {
        if let Some(ticket) = self.ticket {
            ticket.wait().await?;
        }
        self.topic
            .wait_visible_since(self.topic_until, self.topic_rewinds)
            .await?;
        Ok(self.deliveries)
    }
}

/// Stored size of `deliveries` ([`Record::frame_len`]).
pub fn frame_bytes(deliveries: &[Delivery]) -> u64 {
    deliveries.iter().map(|d| d.record.frame_len() as u64).sum()
}

/// Limits of one lease call.
#[derive(Debug, Clone, Copy)]
pub struct LeaseLimits {
    pub messages_max: usize,
    /// Payload bytes; one message is always allowed when `allow_oversize`.
    pub bytes_max: u64,
    pub allow_oversize: bool,
    /// Stored size ([`Record::frame_len`]) of this one batch (one
    /// response), past the first message; unlike `bytes_max` it never
    /// holds back a lone message.
    pub batch_bytes_max: u64,
    pub deadline: Duration,
}

impl Subscription {
    /// Leases up to the limits: ready redeliveries first, then new messages
    /// from the cursor. Each delivery's attempt number is durable before
    /// this returns.
    pub async fn lease(&self, consumer: ConsumerId, limits: LeaseLimits) -> Result<Vec<Delivery>> {
        self.lease_now(consumer, limits).await?.durable().await
    }

    /// The first part of [`Subscription::lease`]: takes the leases in
    /// memory and queues their attempt numbers in the journal. The
    /// deliveries may be handed to a consumer only after
    /// [`Leased::durable`]; meanwhile the caller may do other work (a
    /// stream leases its next batch while the journal syncs).
    ///
    /// Records are taken under the subscription's lock only from memory
    /// (the topic's tail cache). When the next one is older, the lock is
    /// let go, the records are read from the segment files on a blocking
    /// thread, and the lease is tried again with them: a consumer far
    /// behind never holds up the others, acks or the ticker while its disk
    /// read runs.
    pub async fn lease_now(&self, consumer: ConsumerId, limits: LeaseLimits) -> Result<Leased> {
        let mut read = ReadAhead::default();
        loop {
            let (leased, plan) = self.lease_step(consumer, limits, &mut read)?;
            match plan {
                Some(plan) if leased.is_empty() => read = self.read_ahead(plan).await?,
                _ => return Ok(leased),
            }
        }
    }

    /// Reads what `plan` names from the topic's segment files, off the
    /// runtime's threads and without any lock of this subscription.
    async fn read_ahead(&self, plan: ReadPlan) -> Result<ReadAhead> {
        let log = self.topic.log.clone();
        tokio::task::spawn_blocking(move || {
            // Taken before reading: a rewind after this voids the records.
            let rewinds = log.rewinds();
            let redeliveries = plan
                .redeliveries
                .into_iter()
                .map(|offset| (offset, read_one(&log, offset)))
                .collect();
            let cursor = plan.cursor.map(|(from, want)| {
                let batch = log.read_written(
                    Offset(from),
                    ReadLimits {
                        records_max: want,
                        bytes_max: CURSOR_READ_BYTES_MAX,
                    },
                );
                (from, batch)
            });
            ReadAhead {
                rewinds,
                redeliveries,
                cursor,
            }
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The runtime is going away.
            Err(_) => BrokerError::ShuttingDown,
        })
    }

    /// One try of [`Subscription::lease_now`], under the lock, reading
    /// nothing from disk: records come from `read` (read ahead off the
    /// lock) or the tail cache. Returns what it leased and, if it stopped
    /// at a record only the segment files hold, what to read.
    fn lease_step(
        &self,
        consumer: ConsumerId,
        limits: LeaseLimits,
        read: &mut ReadAhead,
    ) -> Result<(Leased, Option<ReadPlan>)> {
        if self.is_deleted() {
            return Err(BrokerError::NotFound {
                kind: "subscription",
                name: self.name(),
            });
        }
        let my_id = self.id();
        let attempts_max = self.attempts_max();
        let mut picked: Vec<Record> = Vec::new();
        let mut entries = Vec::new();
        let mut skipped = Vec::new();
        // Offsets gone to retention or corruption: single ones from the
        // redelivery queue, and whole ranges past the cursor (never
        // delivered, so nothing leased), kept as ranges however long.
        let mut lost = Vec::new();
        let mut lost_ranges: Vec<(u64, u64)> = Vec::new();
        // Messages retention removed before this subscription settled them
        // (counted, journaled and logged like a retention pass does).
        let mut dropped = 0u64;
        let mut plan = None;
        let (deliveries, ticket, topic_rewinds) = {
            let visible = self.topic.log.next_offset().0;
            let mut core = self.core.lock();
            // Read before any record: a rewind after this voids them.
            let topic_rewinds = self.topic.log.rewinds();
            if read.rewinds != topic_rewinds {
                *read = ReadAhead::default();
            }
            if let Some((entry, count)) = core.drop_below(self.topic.log.first_offset().0) {
                entries.push(entry);
                dropped += count;
            }
            let now = Instant::now();
            let now_us = now_us();
            let mut bytes = 0u64;
            let mut batch_bytes = 0u64;
            // `size` counts against the consumer's credit, `frame` against
            // this batch's response size.
            let fits = |n: usize, bytes: u64, batch_bytes: u64, size: u64, frame: u64| {
                n < limits.messages_max
                    && (bytes + size <= limits.bytes_max || (n == 0 && limits.allow_oversize))
                    && (n == 0 || batch_bytes + frame <= limits.batch_bytes_max)
            };
            // Redeliveries that are due.
            while let Some(&(at, offset)) = core.ready.first() {
                if at > now || picked.len() >= limits.messages_max {
                    break;
                }
                if offset >= visible {
                    // Released before its record was durable (the stream
                    // ended at once): it comes due again once it is.
                    break;
                }
                if core.exhausted(attempts_max, offset) {
                    core.ready.remove(&(at, offset));
                    core.ready_at.remove(&offset);
                    core.dead_letter_later(offset);
                    continue;
                }
                let cached = read.redeliveries.remove(&offset).or_else(|| {
                    self.topic
                        .log
                        .read_cached(Offset(offset), ONE_RECORD)
                        .map(|b| Ok(first_at(b, offset)))
                });
                let Some(cached) = cached else {
                    plan = Some(ReadPlan::at(&core, now, visible, limits, self.window_max));
                    break;
                };
                let record = match cached {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        // Gone to retention: nothing to deliver.
                        core.ready.remove(&(at, offset));
                        core.ready_at.remove(&offset);
                        lost.push(offset);
                        continue;
                    }
                    Err(StorageError::Corrupt { path, detail, .. }) => {
                        // Proven corrupt by its checks: skipped, reported.
                        tracing::error!(subscription = %self.name(), path = %path.display(), offset, detail, "skipping a corrupt record");
                        core.ready.remove(&(at, offset));
                        core.ready_at.remove(&offset);
                        lost.push(offset);
                        continue;
                    }
                    Err(e) => {
                        // A read error is not proof of anything: the
                        // message stays, and is tried again later.
                        tracing::warn!(subscription = %self.name(), offset, error = %e, "cannot read a message to redeliver; retrying later");
                        core.ready.remove(&(at, offset));
                        core.schedule(offset, now + READ_RETRY_AFTER);
                        break;
                    }
                };
                let (size, frame) = (record.message_bytes() as u64, record.frame_len() as u64);
                if !fits(picked.len(), bytes, batch_bytes, size, frame) {
                    break;
                }
                core.ready.remove(&(at, offset));
                core.ready_at.remove(&offset);
                bytes += size;
                batch_bytes += frame;
                picked.push(record);
            }
            // New messages from the cursor, within the unacked window.
            'fill: while plan.is_none() && picked.len() < limits.messages_max {
                let want = cursor_want(&core, self.window_max, limits.messages_max - picked.len());
                if want == 0 {
                    break;
                }
                // Records still being synced are leased too, so their
                // attempt numbers are journaled while the topic's fdatasync
                // runs; `Leased::durable` waits for both.
                let limits_here = ReadLimits {
                    records_max: want,
                    bytes_max: CURSOR_READ_BYTES_MAX,
                };
                let cached = match read.cursor.take() {
                    Some((from, batch)) if from == core.cursor => Some(batch),
                    _ => self
                        .topic
                        .log
                        .read_written_cached(Offset(core.cursor), limits_here)
                        .map(Ok),
                };
                let Some(cached) = cached else {
                    plan = Some(ReadPlan::at(&core, now, visible, limits, self.window_max));
                    break;
                };
                let batch = match cached {
                    Ok(b) => b,
                    Err(StorageError::Corrupt {
                        first,
                        next_readable,
                        path,
                        detail,
                    }) => {
                        tracing::error!(subscription = %self.name(), path = %path.display(), %first, %next_readable, detail, "skipping corrupt records");
                        lost_ranges.push((core.cursor.max(first.0), next_readable.0));
                        core.cursor = core.cursor.max(next_readable.0);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                // Retention may have removed records since the floor was
                // checked above: account for them as it would.
                let gap_end = batch.records.first().map_or(batch.next.0, |r| r.offset.0);
                if gap_end > core.cursor {
                    if let Some((entry, count)) = core.drop_below(self.topic.log.first_offset().0) {
                        entries.push(entry);
                        dropped += count;
                    }
                }
                if batch.records.is_empty() {
                    // Offsets missing from the log (not retention's).
                    if batch.next.0 > core.cursor {
                        lost_ranges.push((core.cursor, batch.next.0));
                        core.cursor = batch.next.0;
                        continue;
                    }
                    break;
                }
                for record in batch.records {
                    let offset = record.offset.0;
                    if offset < core.cursor {
                        continue; // below a floor retention just raised
                    }
                    if offset > core.cursor {
                        lost_ranges.push((core.cursor, offset));
                    }
                    if core.state.settled.contains(offset) || core.dead_lettering.contains(&offset)
                    {
                        core.cursor = offset + 1;
                        continue;
                    }
                    if core.exhausted(attempts_max, offset) {
                        core.dead_letter_later(offset);
                        core.cursor = offset + 1;
                        continue;
                    }
                    if record.target.is_some_and(|t| t.subscription != my_id) {
                        if offset >= visible {
                            // Settle it only once it is durable.
                            break 'fill;
                        }
                        // A redrive meant for another subscription.
                        skipped.push(offset);
                        core.cursor = offset + 1;
                        continue;
                    }
                    let (size, frame) = (record.message_bytes() as u64, record.frame_len() as u64);
                    if !fits(picked.len(), bytes, batch_bytes, size, frame) {
                        break 'fill;
                    }
                    bytes += size;
                    batch_bytes += frame;
                    core.cursor = offset + 1;
                    picked.push(record);
                }
            }
            // A redelivery read just before retention removed it is not
            // delivered: it is counted as dropped.
            picked.retain(|r| !core.state.settled.contains(r.offset.0));
            let mut out = Vec::with_capacity(picked.len());
            let mut first_deliveries = Vec::new();
            for record in picked {
                let offset = record.offset.0;
                let attempt = core.attempts(offset) + 1;
                if attempt == 1 {
                    first_deliveries.push(offset);
                } else {
                    let entry = StateEntry::Delivered {
                        offset,
                        count: attempt,
                        time_us: now_us,
                    };
                    core.state.apply(&entry);
                    entries.push(entry);
                }
                let deadline = now + limits.deadline;
                let bytes = record.message_bytes() as u64;
                core.leases.insert(
                    offset,
                    Lease {
                        attempt,
                        deadline,
                        consumer,
                        bytes,
                    },
                );
                core.deadlines.insert((deadline, offset));
                let o = core.consumers.entry(consumer).or_default();
                o.messages += 1;
                o.bytes += bytes;
                out.push(Delivery {
                    ack_id: self.ack_key.issue(my_id, offset, attempt),
                    attempt,
                    record,
                });
            }
            if !first_deliveries.is_empty() {
                let entry = StateEntry::FirstDelivered {
                    ranges: ranges_of(first_deliveries),
                    time_us: now_us,
                };
                core.state.apply(&entry);
                entries.push(entry);
            }
            let mut settle_now = skipped;
            settle_now.extend(lost.iter().copied());
            if !settle_now.is_empty() {
                let ranges = core.settle(&settle_now);
                entries.push(StateEntry::Settled { ranges });
            }
            lost_ranges.retain(|(start, end)| start < end);
            if !lost_ranges.is_empty() {
                let entry = StateEntry::Settled {
                    ranges: lost_ranges.clone(),
                };
                core.state.apply(&entry);
                entries.push(entry);
            }
            let ticket = if entries.is_empty() {
                None
            } else {
                Some(self.journal.enqueue(self.id(), &entries)?)
            };
            (out, ticket, topic_rewinds)
        };
        if dropped > 0 {
            self.warn_dropped(dropped);
        }
        let lost_count = lost.len() as u64 + lost_ranges.iter().map(|(s, e)| e - s).sum::<u64>();
        if lost_count > 0 {
            tracing::warn!(topic = %self.topic.name(), subscription = %self.name(), count = lost_count, "messages missing from the topic or corrupt were skipped");
        }
        let topic_until = Offset(
            deliveries
                .iter()
                .map(|d| d.ack_id.offset + 1)
                .max()
                .unwrap_or(0),
        );
        let leased = Leased {
            deliveries,
            ticket,
            topic: self.topic.log.clone(),
            topic_until,
            topic_rewinds,
        };
        Ok((leased, plan))
    }
}

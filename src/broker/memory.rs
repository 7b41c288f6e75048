//! The broker's one memory budget, `memory_bytes_max`, and how it is
//! shared out.
//!
//! Message bytes the broker holds in memory live in three places, and each
//! draws on a share of the budget that holds for the whole broker, however
//! many topics, subscriptions and streams there are:
//!
//! - **tail caches** (`tail_cache_bytes_max`, at most half the budget): the
//!   batches every log wrote last; the oldest in the broker are evicted
//!   first (`storage::cache`).
//! - **pending appends** (a quarter of the budget): encoded batches of every
//!   topic and dead-letter log waiting for their writer; a publish waits for
//!   room (back pressure), it does not fail.
//! - **nack reasons** (1/64 of the budget): the last reason a consumer
//!   gave when it nacked a message, kept per unsettled message
//!   ([`NoteLedger`]). When the share is full a nack's reason is not kept
//!   (the nack itself works as ever).
//! - **queued deliveries** (the rest, at least a quarter): messages leased
//!   for Pull and StreamingPull responses and not yet handed to the
//!   transport. A stream reserves the bytes of a batch before it reads the
//!   batch and gives them back when the transport, having taken the
//!   response, asks for the next one (Pull: when the call returns), so a
//!   client that stops reading holds at most its stream's own bound
//!   ([`STREAM_QUEUED_BYTES_MAX`]) and every such client together at most
//!   this share. When the share is used up, streams wait and Pull returns
//!   what it has (possibly nothing) when its wait ends.
//!
//! Outside the budget: per stream, the transport's encode buffer (as large
//! as the largest response the stream sent) and HTTP/2 send buffer.
//!
//! When a stream ends, the allocator is asked to give freed memory back to
//! the operating system at the next housekeeping pass ([`trim`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::broker::BrokerError;
use crate::broker::config::{BrokerConfig, DELIVERY_RESPONSE_BYTES_MAX};
use crate::storage::SharedMemory;

/// Bytes one StreamingPull stream may have leased and not yet handed to the
/// transport, whatever its flow-control settings; a single larger message
/// still goes out alone.
pub const STREAM_QUEUED_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Smallest `memory_bytes_max`.
pub const MEMORY_BYTES_MIN: u64 = 64 * 1024 * 1024;

/// How `memory_bytes_max` is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryShares {
    pub cache_bytes: u64,
    pub appends_bytes: u64,
    pub notes_bytes: u64,
    pub deliveries_bytes: u64,
}

impl MemoryShares {
    /// Divides the budget of `config`.
    ///
    /// # Errors
    /// `InvalidArgument` naming the setting when the budget is below
    /// [`MEMORY_BYTES_MIN`], the tail caches would take more than half of
    /// it, or the deliveries' share could not hold two of the largest
    /// messages.
    pub fn of(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let total = config.memory_bytes_max;
        if total < MEMORY_BYTES_MIN {
            return Err(BrokerError::invalid(
                "memory_max",
                format!(
                    "{total} bytes is below the minimum of {} MiB",
                    MEMORY_BYTES_MIN >> 20
                ),
            ));
        }
        if config.tail_cache_bytes_max > total / 2 {
            return Err(BrokerError::invalid(
                "tail_cache_bytes",
                format!(
                    "{} bytes is more than half of memory_max ({total} bytes)",
                    config.tail_cache_bytes_max
                ),
            ));
        }
        let appends_bytes = total / 4;
        let notes_bytes = total / 64;
        let deliveries_bytes = total - config.tail_cache_bytes_max - appends_bytes - notes_bytes;
        let needed = 2 * (config.message_bytes_max as u64 + DELIVERY_RESPONSE_BYTES_MAX);
        if deliveries_bytes < needed {
            return Err(BrokerError::invalid(
                "memory_max",
                format!(
                    "{total} bytes leaves {deliveries_bytes} bytes for queued deliveries; \
                     with max_message_bytes of {} at least {needed} are needed",
                    config.message_bytes_max
                ),
            ));
        }
        Ok(Self {
            cache_bytes: config.tail_cache_bytes_max,
            appends_bytes,
            notes_bytes,
            deliveries_bytes,
        })
    }
}

/// The broker-wide count of memory held by kept nack reasons, against its
/// share. Each subscription reports its own total
/// ([`NoteLedger::report`]); a new reason is kept only if it fits.
#[derive(Debug, Clone)]
pub struct NoteLedger {
    max: u64,
    used: Arc<AtomicU64>,
}

impl NoteLedger {
    pub fn new(max: u64) -> Self {
        Self {
            max,
            used: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A subscription's notes went from `before` to `after` bytes.
    pub fn report(&self, before: u64, after: u64) {
        if after >= before {
            self.used.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Whether `bytes` more fit in the share now.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.used.load(Ordering::Relaxed).saturating_add(bytes) <= self.max
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// The broker's memory pools.
#[derive(Debug)]
pub struct MemoryBudget {
    shares: MemoryShares,
    logs: SharedMemory,
    notes: NoteLedger,
    deliveries: Arc<Semaphore>,
    deliveries_permits: usize,
    trim_wanted: AtomicBool,
}

/// What the pools hold now, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUse {
    pub cache_bytes: u64,
    pub appends_bytes: u64,
    pub notes_bytes: u64,
    pub deliveries_bytes: u64,
}

/// The bound of one queue of deliveries (one stream), beside the broker's.
#[derive(Debug, Clone)]
pub struct DeliveryQueue {
    permits: Arc<Semaphore>,
}

impl DeliveryQueue {
    pub fn new(bytes_max: u64) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(permits(bytes_max))),
        }
    }
}

/// Bytes of deliveries reserved in the broker's share and in a stream's
/// queue; given back when dropped.
#[derive(Debug)]
pub struct DeliveryReservation {
    broker: OwnedSemaphorePermit,
    queue: Option<OwnedSemaphorePermit>,
}

impl DeliveryReservation {
    /// Bytes reserved in the broker's share.
    pub fn bytes(&self) -> u64 {
        self.broker.num_permits() as u64
    }

    /// Takes over `other`'s bytes (two batches sent as one response).
    /// Both must come from the same budget and queue.
    pub fn absorb(&mut self, other: DeliveryReservation) {
        self.broker.merge(other.broker);
        match (&mut self.queue, other.queue) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (None, theirs) => self.queue = theirs,
            (Some(_), None) => {}
        }
    }

    /// Gives back what is reserved beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        let keep = permits(bytes);
        for permit in [Some(&mut self.broker), self.queue.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Some(excess) = permit.num_permits().checked_sub(keep) {
                drop(permit.split(excess));
            }
        }
    }
}

fn permits(bytes: u64) -> usize {
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

fn permits_u32(bytes: u64) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl MemoryBudget {
    /// The pools of `config`'s budget.
    ///
    /// # Errors
    /// As [`MemoryShares::of`].
    pub fn new(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let shares = MemoryShares::of(config)?;
        let deliveries_permits = permits(shares.deliveries_bytes);
        Ok(Self {
            shares,
            logs: SharedMemory::new(shares.appends_bytes, shares.cache_bytes),
            notes: NoteLedger::new(shares.notes_bytes),
            deliveries: Arc::new(Semaphore::new(deliveries_permits)),
            deliveries_permits,
            trim_wanted: AtomicBool::new(false),
        })
    }

    pub fn shares(&self) -> MemoryShares {
        self.shares
    }

    /// The pools that topic and dead-letter logs share.
    pub fn logs(&self) -> SharedMemory {
        self.logs.clone()
    }

    /// The ledger every subscription's nack reasons count against.
    pub fn notes(&self) -> NoteLedger {
        self.notes.clone()
    }

    pub fn in_use(&self) -> MemoryUse {
        MemoryUse {
            cache_bytes: self.logs.cache.bytes(),
            appends_bytes: self.logs.appends_bytes() as u64,
            notes_bytes: self.notes.used(),
            deliveries_bytes: (self.deliveries_permits - self.deliveries.available_permits())
                as u64,
        }
    }

    /// Reserves `bytes` of deliveries in the broker's share and in `queue`,
    /// if both have room now.
    pub fn try_reserve_deliveries(
        &self,
        queue: Option<&DeliveryQueue>,
        bytes: u64,
    ) -> Option<DeliveryReservation> {
        let n = permits_u32(bytes.max(1));
        let queue = match queue {
            Some(q) => Some(q.permits.clone().try_acquire_many_owned(n).ok()?),
            None => None,
        };
        let broker = self.deliveries.clone().try_acquire_many_owned(n).ok()?;
        Some(DeliveryReservation { broker, queue })
    }

    /// Grows `reservation` in the broker's share to `bytes`, waiting for
    /// room: for a lone message larger than a batch, already leased. (The
    /// stream's own queue bound does not hold it back: one message always
    /// goes out.)
    ///
    /// # Cancel safety
    /// Cancelling leaves `reservation` as it was.
    pub async fn grow_deliveries(&self, reservation: &mut DeliveryReservation, bytes: u64) {
        let have = reservation.bytes();
        if bytes <= have {
            return;
        }
        // Never more than the share holds, or this would wait forever; the
        // share is checked at start to hold two of the largest messages.
        let want = (bytes - have).min(self.deliveries_permits as u64);
        if let Ok(more) = self
            .deliveries
            .clone()
            .acquire_many_owned(permits_u32(want))
            .await
        {
            reservation.broker.merge(more);
        }
    }

    /// A stream ended: freed memory may be given back at the next
    /// housekeeping pass.
    pub fn stream_ended(&self) {
        self.trim_wanted.store(true, Ordering::Relaxed);
    }

    /// True once after streams ended since the last call.
    pub fn take_trim_wanted(&self) -> bool {
        self.trim_wanted.swap(false, Ordering::Relaxed)
    }
}

/// Asks the allocator to return freed memory to the operating system.
/// glibc keeps freed memory of its per-thread arenas otherwise, so the
/// process stays as large as its peak long after streams ended. Blocking:
/// call off the async runtime's threads.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(memory: u64, cache: u64) -> BrokerConfig {
        let mut c = BrokerConfig::new("/nonexistent");
        c.memory_bytes_max = memory;
        c.tail_cache_bytes_max = cache;
        c
    }

    #[test]
    fn the_budget_is_divided_between_caches_appends_notes_and_deliveries() {
        let s = MemoryShares::of(&config(1 << 30, 256 << 20)).unwrap();
        assert_eq!(s.cache_bytes, 256 << 20);
        assert_eq!(s.appends_bytes, 256 << 20);
        assert_eq!(s.notes_bytes, 16 << 20);
        assert_eq!(s.deliveries_bytes, 496 << 20);
        assert_eq!(
            s.cache_bytes + s.appends_bytes + s.notes_bytes + s.deliveries_bytes,
            1 << 30
        );
    }

    #[test]
    fn budgets_that_cannot_work_are_refused_naming_the_setting() {
        let e = MemoryShares::of(&config(1 << 20, 0)).unwrap_err();
        assert!(e.to_string().contains("memory_max"), "{e}");
        let e = MemoryShares::of(&config(1 << 30, 600 << 20)).unwrap_err();
        assert!(e.to_string().contains("tail_cache_bytes"), "{e}");
        let mut c = config(64 << 20, 32 << 20);
        c.message_bytes_max = 10 << 20;
        let e = MemoryShares::of(&c).unwrap_err();
        assert!(e.to_string().contains("queued deliveries"), "{e}");
    }

    #[tokio::test]
    async fn reservations_hold_both_bounds_and_give_back_what_they_do_not_use() {
        let budget = MemoryBudget::new(&config(64 << 20, 0)).unwrap();
        let share = budget.shares().deliveries_bytes;
        let queue = DeliveryQueue::new(10 << 20);
        let mut a = budget
            .try_reserve_deliveries(Some(&queue), 8 << 20)
            .unwrap();
        // The queue has 2 MiB left.
        assert!(
            budget
                .try_reserve_deliveries(Some(&queue), 4 << 20)
                .is_none()
        );
        a.shrink_to(1 << 20);
        assert_eq!(budget.in_use().deliveries_bytes, 1 << 20);
        let b = budget
            .try_reserve_deliveries(Some(&queue), 9 << 20)
            .unwrap();
        // The broker's share bounds reservations without a queue.
        assert!(budget.try_reserve_deliveries(None, share).is_none());
        drop((a, b));
        assert_eq!(budget.in_use().deliveries_bytes, 0);
        let mut c = budget.try_reserve_deliveries(None, 1).unwrap();
        budget.grow_deliveries(&mut c, 12 << 20).await;
        assert_eq!(c.bytes(), 12 << 20);
        assert_eq!(budget.in_use().deliveries_bytes, 12 << 20);
    }
}

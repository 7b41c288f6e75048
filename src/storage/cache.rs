//! The tail cache: the batches a log wrote last, kept in memory so that
//! consumers close behind the writer read without touching the files; and
//! [`CacheBudget`], the one bound that every log's cache shares.
//!
//! Each log keeps its chunks oldest first ([`TailCache`]). The budget keeps
//! a ledger of every chunk of every log that shares it, in the order they
//! were cached. When a new chunk takes the total past the budget, the
//! oldest chunks of the whole broker are evicted first, whichever log holds
//! them: a busy topic's cache grows into what idle topics no longer use,
//! and the total never exceeds the budget however many logs there are.
//!
//! A chunk a log drops by itself (a rewind, or the log going away) stays
//! counted until the ledger reaches it, so the ledger may over-count and
//! never under-counts. Each chunk is counted as its bytes plus
//! [`CHUNK_OVERHEAD_BYTES`] for its bookkeeping.
//!
//! Lock order: a log's chunk lock is never held while the ledger lock is
//! taken; eviction takes the ledger lock, then one chunk lock at a time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use super::Offset;

/// What one cached chunk costs beyond its bytes: its entry in the log's
/// queue and in the ledger.
pub const CHUNK_OVERHEAD_BYTES: u64 = 96;

/// A chunk of the tail cache: the encoded frames of `[first, next)`.
#[derive(Debug)]
pub(crate) struct CacheChunk {
    pub first: Offset,
    pub next: Offset,
    pub data: Bytes,
    /// Identifies the chunk in the ledger (offsets repeat after a rewind).
    seq: u64,
}

/// The bound on the bytes held by every tail cache that shares it.
#[derive(Debug)]
pub struct CacheBudget {
    bytes_max: u64,
    next_seq: AtomicU64,
    ledger: Mutex<Ledger>,
}

#[derive(Debug, Default)]
struct Ledger {
    bytes: u64,
    entries: VecDeque<LedgerEntry>,
}

#[derive(Debug)]
struct LedgerEntry {
    cache: Weak<TailCache>,
    seq: u64,
    bytes: u64,
}

impl CacheBudget {
    /// A budget of `bytes_max` bytes; 0 caches nothing.
    pub fn new(bytes_max: u64) -> Arc<Self> {
        Arc::new(Self {
            bytes_max,
            next_seq: AtomicU64::new(0),
            ledger: Mutex::new(Ledger::default()),
        })
    }

    /// The budget.
    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// Bytes counted against the budget now (at least what is cached).
    pub fn bytes(&self) -> u64 {
        self.ledger.lock().bytes
    }
}

/// One log's tail cache.
#[derive(Debug)]
pub(crate) struct TailCache {
    chunks: RwLock<VecDeque<CacheChunk>>,
    budget: Arc<CacheBudget>,
}

/// `data` in an allocation of its own length. A log's write buffer grows
/// by doubling, so the buffer a write hands over may hold up to twice
/// what it carries: kept as it is, the cache would hold more memory than
/// it counts against the budget. Shrinking a large allocation is a
/// `realloc` in place (or `mremap`); only a shared buffer is copied.
fn exact(data: Bytes) -> Bytes {
    let mut v = Vec::from(data);
    v.shrink_to_fit();
    Bytes::from(v)
}

impl TailCache {
    pub fn new(budget: Arc<CacheBudget>) -> Arc<Self> {
        Arc::new(Self {
            chunks: RwLock::new(VecDeque::new()),
            budget,
        })
    }

    /// The chunks, oldest first.
    pub fn chunks(&self) -> RwLockReadGuard<'_, VecDeque<CacheChunk>> {
        self.chunks.read()
    }

    /// Caches the frames of `[first, next)`, evicting the broker's oldest
    /// chunks as needed. A chunk larger than the whole budget is not cached.
    pub fn push(self: &Arc<Self>, first: Offset, next: Offset, data: Bytes) {
        let cost = data.len() as u64 + CHUNK_OVERHEAD_BYTES;
        if data.is_empty() || cost > self.budget.bytes_max {
            return;
        }
        let data = exact(data);
        let seq = self.budget.next_seq.fetch_add(1, Ordering::Relaxed);
        self.chunks.write().push_back(CacheChunk {
            first,
            next,
            data,
            seq,
        });
        let mut ledger = self.budget.ledger.lock();
        ledger.bytes += cost;
        ledger.entries.push_back(LedgerEntry {
            cache: Arc::downgrade(self),
            seq,
            bytes: cost,
        });
        while ledger.bytes > self.budget.bytes_max {
            let Some(oldest) = ledger.entries.pop_front() else {
                break;
            };
            ledger.bytes -= oldest.bytes;
            if let Some(cache) = oldest.cache.upgrade() {
                let mut chunks = cache.chunks.write();
                if chunks.front().is_some_and(|c| c.seq == oldest.seq) {
                    chunks.pop_front();
                }
            }
        }
    }

    /// Drops the chunks holding anything at or past `next` (a rewind).
    pub fn drop_from(&self, next: Offset) {
        let mut chunks = self.chunks.write();
        while chunks.back().is_some_and(|c| c.next > next) {
            chunks.pop_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    fn cached(cache: &TailCache) -> Vec<u64> {
        cache.chunks().iter().map(|c| c.first.0).collect()
    }

    #[test]
    fn logs_sharing_a_budget_evict_the_oldest_chunk_of_any_log() {
        let per = 1000 + CHUNK_OVERHEAD_BYTES;
        let budget = CacheBudget::new(3 * per);
        let a = TailCache::new(budget.clone());
        let b = TailCache::new(budget.clone());
        a.push(Offset(0), Offset(1), chunk(1000));
        b.push(Offset(0), Offset(1), chunk(1000));
        a.push(Offset(1), Offset(2), chunk(1000));
        assert_eq!(budget.bytes(), 3 * per);
        // A fourth chunk evicts the broker's oldest: a's first.
        b.push(Offset(1), Offset(2), chunk(1000));
        assert_eq!(cached(&a), vec![1]);
        assert_eq!(cached(&b), vec![0, 1]);
        assert_eq!(budget.bytes(), 3 * per);
    }

    #[test]
    fn the_total_stays_within_the_budget_when_logs_go_away_or_rewind() {
        let budget = CacheBudget::new(10_000);
        let a = TailCache::new(budget.clone());
        for i in 0..50 {
            a.push(Offset(i), Offset(i + 1), chunk(500));
            assert!(budget.bytes() <= 10_000);
        }
        a.drop_from(Offset(45));
        let b = TailCache::new(budget.clone());
        drop(a);
        for i in 0..50 {
            b.push(Offset(i), Offset(i + 1), chunk(700));
            assert!(budget.bytes() <= 10_000);
        }
        let held: u64 = b
            .chunks()
            .iter()
            .map(|c| c.data.len() as u64 + CHUNK_OVERHEAD_BYTES)
            .sum();
        assert!(held <= budget.bytes());
        assert!(held > 10_000 - 2 * (700 + CHUNK_OVERHEAD_BYTES));
    }

    #[test]
    fn a_chunk_larger_than_the_budget_is_not_cached_and_evicts_nothing() {
        let budget = CacheBudget::new(2_000);
        let a = TailCache::new(budget.clone());
        a.push(Offset(0), Offset(1), chunk(1_000));
        a.push(Offset(1), Offset(2), chunk(5_000));
        assert_eq!(cached(&a), vec![0]);
    }

    #[test]
    fn a_zero_budget_caches_nothing() {
        let budget = CacheBudget::new(0);
        let a = TailCache::new(budget.clone());
        a.push(Offset(0), Offset(1), chunk(10));
        assert!(cached(&a).is_empty());
        assert_eq!(budget.bytes(), 0);
    }
}

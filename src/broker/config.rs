//! Broker settings and every limit the broker enforces, in one place.
//!
//! Names carry their unit last (`ack_deadline_ms_max`). Each limit is
//! enforced where input enters the broker, with an error naming the field.

use std::path::PathBuf;

use crate::storage::FsyncMode;

/// Default ack deadline of a subscription.
pub const ACK_DEADLINE_MS_DEFAULT: u64 = 30_000;
/// Shortest ack deadline (short so tests and local development are fast).
pub const ACK_DEADLINE_MS_MIN: u64 = 100;
/// Longest ack deadline.
pub const ACK_DEADLINE_MS_MAX: u64 = 600_000;
/// Longest retry backoff.
pub const BACKOFF_MS_MAX: u64 = 600_000;
/// Range of `max_delivery_attempts` in a dead-letter policy.
pub const DELIVERY_ATTEMPTS_MIN: u32 = 1;
pub const DELIVERY_ATTEMPTS_MAX: u32 = 1_000;
/// Longest topic or subscription name.
pub const NAME_BYTES_MAX: usize = 255;
/// Messages per Publish call.
pub const PUBLISH_BATCH_MESSAGES_MAX: usize = 1_000;
/// Attributes per message and their sizes.
pub const ATTRIBUTES_MAX: usize = 100;
pub const ATTRIBUTE_KEY_BYTES_MAX: usize = 256;
pub const ATTRIBUTE_VALUE_BYTES_MAX: usize = 1_024;
pub const ORDERING_KEY_BYTES_MAX: usize = 1_024;
/// Messages per Pull call, and its longest wait.
pub const PULL_MESSAGES_MAX: u32 = 1_000;
pub const PULL_WAIT_MS_MAX: u64 = 60_000;
/// Ack ids per request (acknowledge, modify deadline, nack, stream request).
pub const ACK_IDS_PER_REQUEST_MAX: usize = 1_000;
/// Stored bytes of the messages in one Pull or StreamingPull response; a
/// single larger message still goes out alone. Keeps responses of
/// ordinary messages within the 4 MiB that gRPC clients accept by default.
pub const DELIVERY_RESPONSE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Flow-control defaults and ceiling of a StreamingPull stream.
pub const STREAM_OUTSTANDING_MESSAGES_DEFAULT: u64 = 1_000;
pub const STREAM_OUTSTANDING_MESSAGES_MAX: u64 = 100_000;
pub const STREAM_OUTSTANDING_BYTES_DEFAULT: u64 = 100 * 1024 * 1024;
/// Default `writer_threads`.
pub const WRITER_THREADS_DEFAULT: usize = 4;

/// Length of a nack's reason text.
pub const REASON_BYTES_MAX: usize = 1_024;
/// Dead letters per ListDeadLetters page.
pub const DEAD_LETTER_PAGE_MAX: u32 = 1_000;
pub const DEAD_LETTER_PAGE_DEFAULT: u32 = 100;
/// Message ids per RedriveDeadLetters call.
pub const REDRIVE_IDS_MAX: usize = 1_000;

/// Unless set, the tail caches get this fraction of the memory budget
/// (1/16: 64 MiB of the default 1 GiB). Consumers close behind the writer
/// read from it; the page cache serves the rest.
pub const TAIL_CACHE_SHARE_DEFAULT: u64 = 16;

/// Everything the broker can be configured with.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub fsync: FsyncMode,
    /// Topic segment size.
    pub segment_bytes_max: u64,
    /// Largest message: data + attribute keys and values + ordering key.
    pub message_bytes_max: usize,
    /// The memory budget of message bytes held in memory, for the whole
    /// broker: tail caches, pending appends and queued deliveries share it
    /// (see `broker::memory`).
    pub memory_bytes_max: u64,
    /// For the whole broker: bytes of recent records served from memory,
    /// part of `memory_bytes_max` (at most half of it).
    pub tail_cache_bytes_max: u64,
    /// Per subscription: how far past the ack floor messages are handed
    /// out. Bounds the memory of lease and attempt tracking; when reached,
    /// new messages wait until the oldest are settled.
    pub unacked_window_max: u64,
    /// Threads that write and sync every topic, dead-letter and journal
    /// log (storage's `WriterPool`): an idle log costs no thread.
    pub writer_threads: usize,
    /// Let the writer pool make a round of many logs durable with one
    /// `syncfs` where the file system's can be trusted.
    pub syncfs: bool,
    /// The state journal is compacted when it grows past this.
    pub journal_compact_bytes: u64,
    /// Longest a StreamingPull ack's journal entry waits to share the next
    /// delivery's write and sync before it is synced by itself. Delays that
    /// stream's ack results (sent once the acks are durable) by at most
    /// this much; durability is unchanged.
    pub journal_defer_ms: u64,
    pub topics_max: usize,
    pub subscriptions_max: usize,
    /// How often leases are checked for expiry and redeliveries for
    /// readiness.
    pub tick_ms: u64,
    /// How often retention and journal compaction run (a housekeeping
    /// pass). Settled segments leave the disk within about this long.
    pub housekeeping_ms: u64,
}

impl BrokerConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            fsync: FsyncMode::Always,
            segment_bytes_max: 64 * 1024 * 1024,
            message_bytes_max: 10 * 1024 * 1024,
            memory_bytes_max: 1024 * 1024 * 1024,
            tail_cache_bytes_max: 1024 * 1024 * 1024 / TAIL_CACHE_SHARE_DEFAULT,
            unacked_window_max: 100_000,
            writer_threads: WRITER_THREADS_DEFAULT,
            syncfs: true,
            journal_compact_bytes: 64 * 1024 * 1024,
            journal_defer_ms: 5,
            topics_max: 10_000,
            subscriptions_max: 10_000,
            tick_ms: 10,
            housekeeping_ms: 1_000,
        }
    }
}

/// How many characters of a rejected value an error message repeats.
pub const ECHOED_CHARS_MAX: usize = 64;

/// `value` quoted for an error message, cut after [`ECHOED_CHARS_MAX`]
/// characters: a client's bad input is named, not echoed whole.
pub fn shown(value: &str) -> String {
    match value.char_indices().nth(ECHOED_CHARS_MAX) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
    }
}

/// Checks a topic or subscription name: `[A-Za-z][A-Za-z0-9._-]{0,254}`.
pub fn check_name(field: &str, name: &str) -> Result<(), crate::broker::BrokerError> {
    let bad = |reason: &str| {
        crate::broker::BrokerError::invalid(field, format!("{} {reason}", shown(name)))
    };
    let mut bytes = name.bytes();
    match bytes.next() {
        None => {
            return Err(crate::broker::BrokerError::invalid(
                field,
                "must not be empty",
            ));
        }
        Some(b) if !b.is_ascii_alphabetic() => return Err(bad("must start with a letter")),
        Some(_) => {}
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(bad("is longer than 255 characters"));
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(bad("may contain only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_pattern() {
        for good in ["a", "Orders", "a.b_c-d9", &"x".repeat(255)] {
            assert!(check_name("name", good).is_ok(), "{good}");
        }
        for bad in ["", "9a", "-a", "a b", "a/b", "é", &"x".repeat(256)] {
            assert!(check_name("name", bad).is_err(), "{bad}");
        }
        let long = check_name("name", &"x".repeat(1_000_000))
            .unwrap_err()
            .to_string();
        assert!(long.len() < 200, "{long}");
        assert!(long.contains("(1000000 bytes)"), "{long}");
    }
}

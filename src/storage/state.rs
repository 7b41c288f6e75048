//! Durable subscription state: ack floors, acked ranges, delivery attempts,
//! the last reason a consumer gave when it nacked a message, dead-letter
//! removals and the count of messages lost to retention, kept in one
//! broker-wide state journal.
//!
//! The journal is a [`Log`] whose records each carry a batch of
//! [`StateEntry`] values for one subscription. Writers enqueue entries in
//! the order they change the in-memory [`SubscriptionState`] (the broker
//! holds the subscription's lock while it enqueues), so replaying the
//! journal in order rebuilds exactly the state that was acknowledged. Many
//! acks become one journal record, and all subscriptions share the
//! journal's group commit: acking never waits for a sync of its own.
//!
//! Compaction: when the journal grows past a limit, the broker asks for a
//! roll, notes the journal's tail offset (the cut), enqueues one
//! [`StateEntry::Snapshot`] per live subscription (an absolute statement of
//! its state, which replay applies by replacement), and once those are
//! durable deletes the segments wholly before the cut. A crash at any point leaves a journal whose replay is correct:
//! older entries are only deleted after snapshots covering them are durable.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::storage::Offset;
use crate::storage::error::{Result, StorageError};
use crate::storage::io::Fs;
use crate::storage::log::{AppendTicket, Log, LogConfig, ReadLimits};
pub use crate::storage::range_set::RangeSet;
use crate::storage::record::NewRecord;

/// One delivered-but-unsettled message's attempt history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts {
    /// Deliveries so far (1 after the first).
    pub count: u32,
    pub first_delivery_us: u64,
    pub last_delivery_us: u64,
}

/// The last reason a consumer gave when it nacked a delivered, unsettled
/// message (a plain nack: a rejection's reason goes into its dead letter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackNote {
    /// The delivery attempt that was nacked with this reason.
    pub attempt: u32,
    pub text: String,
}

impl NackNote {
    /// Memory one note is counted as: its text and the map entry around it.
    pub fn cost(&self) -> u64 {
        self.text.len() as u64 + NACK_NOTE_OVERHEAD_BYTES
    }
}

/// What a kept [`NackNote`] costs beyond its text (key, attempt, string
/// header and the map's node), as counted against the broker's budget.
pub const NACK_NOTE_OVERHEAD_BYTES: u64 = 64;

/// The durable state of one subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionState {
    /// Offsets of the topic log that are settled (acked or dead-lettered).
    pub settled: RangeSet,
    /// Attempt history of delivered, unsettled messages.
    pub attempts: BTreeMap<u64, Attempts>,
    /// The last nack reason of delivered, unsettled messages that have one.
    nack_notes: BTreeMap<u64, NackNote>,
    /// Sum of the notes' [`NackNote::cost`].
    nack_note_bytes: u64,
    /// Offsets of the subscription's dead-letter log that were removed
    /// (redriven or purged).
    pub dlq_removed: RangeSet,
    /// Messages the topic's retention removed before this subscription
    /// settled them, since it was created.
    pub dropped_by_retention: u64,
}

/// One change to a subscription's state, as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateEntry {
    /// Offsets `[start, end)` are settled.
    Settled { ranges: Vec<(u64, u64)> },
    /// The message at `offset` was delivered for the `count`th time.
    Delivered {
        offset: u64,
        count: u32,
        time_us: u64,
    },
    /// The messages at offsets `[start, end)` of each range were delivered
    /// for the first time. One entry for a whole run of first deliveries
    /// keeps the journal's bytes per message near zero however many
    /// subscriptions a topic has.
    FirstDelivered {
        ranges: Vec<(u64, u64)>,
        time_us: u64,
    },
    /// Everything below `floor` is settled (purge, initial position).
    Floor { floor: u64 },
    /// The topic's retention removed everything below `floor`; `count` of
    /// those offsets were not settled (they are added to
    /// `dropped_by_retention`). Everything below `floor` is settled from
    /// now on, as for [`StateEntry::Floor`].
    RetentionDropped { floor: u64, count: u64 },
    /// Dead-letter log offsets `[start, end)` were removed.
    DlqRemoved { ranges: Vec<(u64, u64)> },
    /// Attempt history of `offset` is forgotten (a redrive reset).
    ResetAttempts { offset: u64 },
    /// The delivery `attempt` of the message at `offset` was nacked with
    /// reason `text` (kept until the message is settled).
    Nacked {
        offset: u64,
        attempt: u32,
        text: String,
    },
    /// The subscription's full state, replacing what came before.
    Snapshot(Box<SubscriptionState>),
    /// The subscription was deleted.
    Dropped,
}

impl SubscriptionState {
    /// A new subscription whose first deliverable offset is `start`.
    pub fn starting_at(start: Offset) -> Self {
        Self {
            settled: RangeSet::with_floor(start.0),
            ..Self::default()
        }
    }

    /// Forgets everything about offsets at or above `end`: after a crash
    /// that lost the unsynced tail of a topic log, those offsets will be
    /// given to new messages, which must start with a clean slate.
    pub fn truncate_at(&mut self, end: Offset) {
        self.settled.truncate_at(end.0);
        self.attempts.split_off(&end.0);
        let gone = self.nack_notes.split_off(&end.0);
        self.nack_note_bytes -= gone.values().map(NackNote::cost).sum::<u64>();
    }

    fn raise_floor(&mut self, floor: u64) {
        self.settled.raise_floor(floor);
        let floor = self.settled.floor();
        self.attempts = self.attempts.split_off(&floor);
        let kept = self.nack_notes.split_off(&floor);
        self.nack_note_bytes -= self.nack_notes.values().map(NackNote::cost).sum::<u64>();
        self.nack_notes = kept;
    }

    /// The last nack reason of the message at `offset`, if it has one and
    /// is unsettled.
    pub fn nack_note(&self, offset: u64) -> Option<&NackNote> {
        self.nack_notes.get(&offset)
    }

    /// Memory the kept nack notes are counted as ([`NackNote::cost`]).
    pub fn nack_note_bytes(&self) -> u64 {
        self.nack_note_bytes
    }

    fn forget_note(&mut self, offset: u64) {
        if let Some(note) = self.nack_notes.remove(&offset) {
            self.nack_note_bytes -= note.cost();
        }
    }

    /// Applies one entry (used by replay and by the broker alike).
    pub fn apply(&mut self, entry: &StateEntry) {
        match entry {
            StateEntry::Settled { ranges } => {
                for &(s, e) in ranges {
                    self.settled.insert(s, e);
                    let doomed: Vec<u64> = self.attempts.range(s..e).map(|(o, _)| *o).collect();
                    for o in doomed {
                        self.attempts.remove(&o);
                    }
                    let doomed: Vec<u64> = self.nack_notes.range(s..e).map(|(o, _)| *o).collect();
                    for o in doomed {
                        self.forget_note(o);
                    }
                }
            }
            StateEntry::Delivered {
                offset,
                count,
                time_us,
            } => {
                let a = self.attempts.entry(*offset).or_insert(Attempts {
                    count: 0,
                    first_delivery_us: *time_us,
                    last_delivery_us: *time_us,
                });
                a.count = *count;
                a.last_delivery_us = *time_us;
                if *count == 1 {
                    a.first_delivery_us = *time_us;
                }
            }
            StateEntry::FirstDelivered { ranges, time_us } => {
                let first = Attempts {
                    count: 1,
                    first_delivery_us: *time_us,
                    last_delivery_us: *time_us,
                };
                for &(s, e) in ranges {
                    for offset in s..e {
                        self.attempts.insert(offset, first);
                    }
                }
            }
            StateEntry::Floor { floor } => self.raise_floor(*floor),
            StateEntry::RetentionDropped { floor, count } => {
                self.raise_floor(*floor);
                self.dropped_by_retention = self.dropped_by_retention.saturating_add(*count);
            }
            StateEntry::DlqRemoved { ranges } => {
                for &(s, e) in ranges {
                    self.dlq_removed.insert(s, e);
                }
            }
            StateEntry::ResetAttempts { offset } => {
                self.attempts.remove(offset);
                self.forget_note(*offset);
            }
            StateEntry::Nacked {
                offset,
                attempt,
                text,
            } => {
                self.forget_note(*offset);
                let note = NackNote {
                    attempt: *attempt,
                    text: text.clone(),
                };
                self.nack_note_bytes += note.cost();
                self.nack_notes.insert(*offset, note);
            }
            StateEntry::Snapshot(state) => *self = (**state).clone(),
            StateEntry::Dropped => *self = SubscriptionState::default(),
        }
    }
}

const TAG_SETTLED: u8 = 1;
const TAG_DELIVERED: u8 = 2;
const TAG_FLOOR: u8 = 3;
const TAG_DLQ_REMOVED: u8 = 4;
const TAG_RESET: u8 = 5;
const TAG_SNAPSHOT: u8 = 6;
const TAG_DROPPED: u8 = 7;
const TAG_FIRST_DELIVERED: u8 = 8;
const TAG_RETENTION_DROPPED: u8 = 9;
/// A snapshot followed by `dropped_by_retention`. Journals written before
/// that counter existed hold `TAG_SNAPSHOT` (read as a count of 0).
const TAG_SNAPSHOT_WITH_DROPS: u8 = 10;
const TAG_NACKED: u8 = 11;
/// A snapshot followed by `dropped_by_retention` and the nack notes.
/// Journals written before notes existed hold the two tags above (read as
/// no notes).
const TAG_SNAPSHOT_WITH_NOTES: u8 = 12;

fn put_ranges(out: &mut BytesMut, ranges: impl ExactSizeIterator<Item = (u64, u64)>) {
    out.put_u32_le(u32::try_from(ranges.len()).expect("range count fits u32"));
    for (s, e) in ranges {
        out.put_u64_le(s);
        out.put_u64_le(e);
    }
}

/// Encodes a batch of entries for subscription `sub` into one payload.
pub fn encode_entries(sub: u64, entries: &[StateEntry]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u64_le(sub);
    for entry in entries {
        match entry {
            StateEntry::Settled { ranges } => {
                out.put_u8(TAG_SETTLED);
                put_ranges(&mut out, ranges.iter().copied());
            }
            StateEntry::Delivered {
                offset,
                count,
                time_us,
            } => {
                out.put_u8(TAG_DELIVERED);
                out.put_u64_le(*offset);
                out.put_u32_le(*count);
                out.put_u64_le(*time_us);
            }
            StateEntry::FirstDelivered { ranges, time_us } => {
                out.put_u8(TAG_FIRST_DELIVERED);
                out.put_u64_le(*time_us);
                put_ranges(&mut out, ranges.iter().copied());
            }
            StateEntry::Floor { floor } => {
                out.put_u8(TAG_FLOOR);
                out.put_u64_le(*floor);
            }
            StateEntry::RetentionDropped { floor, count } => {
                out.put_u8(TAG_RETENTION_DROPPED);
                out.put_u64_le(*floor);
                out.put_u64_le(*count);
            }
            StateEntry::DlqRemoved { ranges } => {
                out.put_u8(TAG_DLQ_REMOVED);
                put_ranges(&mut out, ranges.iter().copied());
            }
            StateEntry::ResetAttempts { offset } => {
                out.put_u8(TAG_RESET);
                out.put_u64_le(*offset);
            }
            StateEntry::Nacked {
                offset,
                attempt,
                text,
            } => {
                out.put_u8(TAG_NACKED);
                out.put_u64_le(*offset);
                out.put_u32_le(*attempt);
                put_text(&mut out, text);
            }
            StateEntry::Snapshot(state) => {
                out.put_u8(TAG_SNAPSHOT_WITH_NOTES);
                out.put_u64_le(state.settled.floor());
                put_ranges(&mut out, state.settled.ranges());
                out.put_u32_le(u32::try_from(state.attempts.len()).expect("attempts fit u32"));
                for (offset, a) in &state.attempts {
                    out.put_u64_le(*offset);
                    out.put_u32_le(a.count);
                    out.put_u64_le(a.first_delivery_us);
                    out.put_u64_le(a.last_delivery_us);
                }
                out.put_u64_le(state.dlq_removed.floor());
                put_ranges(&mut out, state.dlq_removed.ranges());
                out.put_u64_le(state.dropped_by_retention);
                out.put_u32_le(u32::try_from(state.nack_notes.len()).expect("notes fit u32"));
                for (offset, note) in &state.nack_notes {
                    out.put_u64_le(*offset);
                    out.put_u32_le(note.attempt);
                    put_text(&mut out, &note.text);
                }
            }
            StateEntry::Dropped => out.put_u8(TAG_DROPPED),
        }
    }
    out.freeze()
}

/// A text of at most 65535 bytes (longer ones are cut at a character
/// boundary; nack reasons are far shorter).
fn put_text(out: &mut BytesMut, text: &str) {
    let mut end = text.len().min(u16::MAX as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16_le(end as u16);
    out.put_slice(&text.as_bytes()[..end]);
}

fn get_text(buf: &mut Bytes) -> Option<String> {
    if buf.remaining() < 2 {
        return None;
    }
    let len = buf.get_u16_le() as usize;
    if buf.remaining() < len {
        return None;
    }
    String::from_utf8(buf.split_to(len).to_vec()).ok()
}

fn get_ranges(buf: &mut Bytes) -> Option<Vec<(u64, u64)>> {
    let n = get_u32(buf)? as usize;
    if buf.remaining() < n.checked_mul(16)? {
        return None;
    }
    Some(
        (0..n)
            .map(|_| (buf.get_u64_le(), buf.get_u64_le()))
            .collect(),
    )
}

fn get_u64(buf: &mut Bytes) -> Option<u64> {
    (buf.remaining() >= 8).then(|| buf.get_u64_le())
}

fn get_u32(buf: &mut Bytes) -> Option<u32> {
    (buf.remaining() >= 4).then(|| buf.get_u32_le())
}

fn range_set(floor: u64, ranges: Vec<(u64, u64)>) -> RangeSet {
    let mut set = RangeSet::with_floor(floor);
    for (s, e) in ranges {
        set.insert(s, e);
    }
    set
}

/// Decodes a payload made by [`encode_entries`]; `None` if malformed.
pub fn decode_entries(mut buf: Bytes) -> Option<(u64, Vec<StateEntry>)> {
    let sub = get_u64(&mut buf)?;
    let mut entries = Vec::new();
    while buf.has_remaining() {
        let entry = match buf.get_u8() {
            TAG_SETTLED => StateEntry::Settled {
                ranges: get_ranges(&mut buf)?,
            },
            TAG_DELIVERED => StateEntry::Delivered {
                offset: get_u64(&mut buf)?,
                count: get_u32(&mut buf)?,
                time_us: get_u64(&mut buf)?,
            },
            TAG_FIRST_DELIVERED => {
                let time_us = get_u64(&mut buf)?;
                StateEntry::FirstDelivered {
                    ranges: get_ranges(&mut buf)?,
                    time_us,
                }
            }
            TAG_FLOOR => StateEntry::Floor {
                floor: get_u64(&mut buf)?,
            },
            TAG_RETENTION_DROPPED => StateEntry::RetentionDropped {
                floor: get_u64(&mut buf)?,
                count: get_u64(&mut buf)?,
            },
            TAG_DLQ_REMOVED => StateEntry::DlqRemoved {
                ranges: get_ranges(&mut buf)?,
            },
            TAG_RESET => StateEntry::ResetAttempts {
                offset: get_u64(&mut buf)?,
            },
            TAG_NACKED => StateEntry::Nacked {
                offset: get_u64(&mut buf)?,
                attempt: get_u32(&mut buf)?,
                text: get_text(&mut buf)?,
            },
            tag @ (TAG_SNAPSHOT | TAG_SNAPSHOT_WITH_DROPS | TAG_SNAPSHOT_WITH_NOTES) => {
                let floor = get_u64(&mut buf)?;
                let settled = range_set(floor, get_ranges(&mut buf)?);
                let n = get_u32(&mut buf)? as usize;
                let mut attempts = BTreeMap::new();
                for _ in 0..n {
                    let offset = get_u64(&mut buf)?;
                    let count = get_u32(&mut buf)?;
                    let first_delivery_us = get_u64(&mut buf)?;
                    let last_delivery_us = get_u64(&mut buf)?;
                    attempts.insert(
                        offset,
                        Attempts {
                            count,
                            first_delivery_us,
                            last_delivery_us,
                        },
                    );
                }
                let dlq_floor = get_u64(&mut buf)?;
                let dlq_removed = range_set(dlq_floor, get_ranges(&mut buf)?);
                let dropped_by_retention = if tag == TAG_SNAPSHOT {
                    0
                } else {
                    get_u64(&mut buf)?
                };
                let mut state = SubscriptionState {
                    settled,
                    attempts,
                    dlq_removed,
                    dropped_by_retention,
                    ..SubscriptionState::default()
                };
                if tag == TAG_SNAPSHOT_WITH_NOTES {
                    let n = get_u32(&mut buf)?;
                    for _ in 0..n {
                        state.apply(&StateEntry::Nacked {
                            offset: get_u64(&mut buf)?,
                            attempt: get_u32(&mut buf)?,
                            text: get_text(&mut buf)?,
                        });
                    }
                }
                StateEntry::Snapshot(Box::new(state))
            }
            TAG_DROPPED => StateEntry::Dropped,
            _ => return None,
        };
        entries.push(entry);
    }
    Some((sub, entries))
}

/// The broker-wide journal of subscription state changes.
#[derive(Debug, Clone)]
pub struct StateJournal {
    log: Log,
}

impl StateJournal {
    /// Opens the journal in `dir` and replays it. Returns the journal and
    /// the state of every subscription it mentions (dropped ones excluded).
    pub fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        config: LogConfig,
    ) -> Result<(Self, HashMap<u64, SubscriptionState>)> {
        let config = LogConfig {
            tail_cache_bytes_max: 0,
            ..config
        };
        let (log, report) = Log::open(fs, dir, config, Offset(0))?;
        for finding in &report.findings {
            tracing::warn!(%finding, "state journal recovery");
        }
        let mut states: HashMap<u64, SubscriptionState> = HashMap::new();
        let mut from = log.first_offset();
        loop {
            let batch = match log.read(
                from,
                ReadLimits {
                    records_max: 4096,
                    bytes_max: 4 << 20,
                },
            ) {
                Ok(batch) => batch,
                Err(StorageError::Corrupt {
                    next_readable,
                    path,
                    first,
                    ..
                }) => {
                    tracing::error!(path = %path.display(), %first, %next_readable, "corrupt state journal records skipped");
                    from = next_readable;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if batch.records.is_empty() {
                break;
            }
            for record in &batch.records {
                let Some((sub, entries)) = decode_entries(record.payload.clone()) else {
                    return Err(StorageError::Format {
                        path: dir.to_path_buf(),
                        detail: format!("undecodable state entry at offset {}", record.offset),
                    });
                };
                let state = states.entry(sub).or_default();
                for entry in &entries {
                    state.apply(entry);
                }
                if entries.last() == Some(&StateEntry::Dropped) {
                    states.remove(&sub);
                }
            }
            from = batch.next;
        }
        Ok((Self { log }, states))
    }

    /// Queues `entries` for subscription `sub`; their place in the journal
    /// is fixed when this returns. Await the ticket for durability.
    pub fn enqueue(&self, sub: u64, entries: &[StateEntry]) -> Result<AppendTicket> {
        self.log.enqueue(&[NewRecord {
            payload: encode_entries(sub, entries),
            ..NewRecord::default()
        }])
    }

    /// Like [`StateJournal::enqueue`], but the entries may wait a little
    /// to share the next ordinary entry's write and sync
    /// ([`Log::enqueue_deferred`]).
    pub fn enqueue_deferred(&self, sub: u64, entries: &[StateEntry]) -> Result<AppendTicket> {
        self.log.enqueue_deferred(&[NewRecord {
            payload: encode_entries(sub, entries),
            ..NewRecord::default()
        }])
    }

    /// Offset the next queued entry will get: everything queued so far is
    /// below it.
    pub fn tail_offset(&self) -> Offset {
        self.log.pending_next_offset()
    }

    /// Bytes the journal holds on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.log.stats().disk_bytes
    }

    /// See [`Log::write_problem`].
    pub fn write_problem(&self) -> Option<String> {
        self.log.write_problem()
    }

    /// First step of compaction: the next write starts a new segment.
    pub fn request_roll(&self) {
        self.log.request_roll();
    }

    /// Last step of compaction: deletes segments wholly before `offset`.
    pub fn truncate_before(&self, offset: Offset) -> Result<u32> {
        self.log.truncate_before(offset)
    }

    /// Stops the journal's writer after syncing what is queued.
    pub fn close(&self) {
        self.log.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut state = SubscriptionState::starting_at(Offset(3));
        state.apply(&StateEntry::Settled {
            ranges: vec![(5, 7)],
        });
        state.apply(&StateEntry::Delivered {
            offset: 3,
            count: 2,
            time_us: 9,
        });
        state.apply(&StateEntry::Nacked {
            offset: 3,
            attempt: 2,
            text: "timeout calling billing".into(),
        });
        let entries = vec![
            StateEntry::Settled {
                ranges: vec![(1, 2), (4, 9)],
            },
            StateEntry::Delivered {
                offset: 3,
                count: 2,
                time_us: 99,
            },
            StateEntry::FirstDelivered {
                ranges: vec![(3, 9)],
                time_us: 5,
            },
            StateEntry::Floor { floor: 7 },
            StateEntry::RetentionDropped {
                floor: 11,
                count: 3,
            },
            StateEntry::DlqRemoved {
                ranges: vec![(0, 1)],
            },
            StateEntry::ResetAttempts { offset: 4 },
            StateEntry::Nacked {
                offset: 4,
                attempt: 1,
                text: "déjà vu".into(),
            },
            StateEntry::Snapshot(Box::new(state)),
            StateEntry::Dropped,
        ];
        let (sub, got) = decode_entries(encode_entries(42, &entries)).unwrap();
        assert_eq!(sub, 42);
        assert_eq!(got, entries);
    }

    #[test]
    fn snapshots_written_before_the_retention_counter_or_notes_still_read() {
        let mut state = SubscriptionState::starting_at(Offset(4));
        state.apply(&StateEntry::RetentionDropped { floor: 9, count: 5 });
        assert_eq!(state.settled.floor(), 9);
        assert_eq!(state.dropped_by_retention, 5);
        let new = encode_entries(1, &[StateEntry::Snapshot(Box::new(state.clone()))]);
        assert_eq!(new[8], TAG_SNAPSHOT_WITH_NOTES);
        // The older layouts: the same bytes under the older tags, without
        // the trailing note count (4 bytes) and counter (8 bytes).
        for (tag, cut, drops) in [(TAG_SNAPSHOT_WITH_DROPS, 4, 5), (TAG_SNAPSHOT, 12, 0)] {
            let mut old = BytesMut::from(&new[..new.len() - cut]);
            old[8] = tag;
            let (_, got) = decode_entries(old.freeze()).unwrap();
            let StateEntry::Snapshot(got) = &got[0] else {
                panic!("{got:?}")
            };
            assert_eq!(got.dropped_by_retention, drops);
            assert_eq!(got.settled, state.settled);
        }
    }

    #[test]
    fn nack_notes_are_kept_until_settled_and_counted() {
        let mut state = SubscriptionState::starting_at(Offset(0));
        let note = |offset: u64, attempt: u32, text: &str| StateEntry::Nacked {
            offset,
            attempt,
            text: text.into(),
        };
        state.apply(&note(1, 1, "first"));
        state.apply(&note(1, 2, "second"));
        state.apply(&note(2, 1, "x"));
        state.apply(&note(7, 3, "late"));
        assert_eq!(
            state.nack_note(1),
            Some(&NackNote {
                attempt: 2,
                text: "second".into()
            })
        );
        let cost = |text: &str| text.len() as u64 + NACK_NOTE_OVERHEAD_BYTES;
        assert_eq!(
            state.nack_note_bytes(),
            cost("second") + cost("x") + cost("late")
        );
        state.apply(&StateEntry::Settled {
            ranges: vec![(2, 3)],
        });
        assert_eq!(state.nack_note(2), None);
        state.apply(&StateEntry::Floor { floor: 5 });
        assert_eq!(state.nack_note(1), None);
        assert_eq!(state.nack_note_bytes(), cost("late"));
        state.truncate_at(Offset(6));
        assert_eq!(state.nack_note(7), None);
        assert_eq!(state.nack_note_bytes(), 0);
    }

    #[test]
    fn settling_forgets_attempts() {
        let mut state = SubscriptionState::starting_at(Offset(0));
        state.apply(&StateEntry::Delivered {
            offset: 0,
            count: 1,
            time_us: 1,
        });
        state.apply(&StateEntry::Delivered {
            offset: 1,
            count: 1,
            time_us: 1,
        });
        state.apply(&StateEntry::Settled {
            ranges: vec![(0, 1)],
        });
        assert_eq!(state.settled.floor(), 1);
        assert_eq!(state.attempts.keys().copied().collect::<Vec<_>>(), vec![1]);
    }
}

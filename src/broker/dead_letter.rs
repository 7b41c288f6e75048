//! Dead-letter entries: how a dead-lettered message and its history are
//! stored in a subscription's dead-letter log.
//!
//! Each entry is one record of the dead-letter log. The record keeps the
//! original message id, attributes and ordering key in its own fields; its
//! payload is `meta_len: u32 | meta | original payload`, so the original
//! payload is a zero-copy slice. The record's publish time is the time the
//! message was dead-lettered. `meta` is little-endian:
//! `reason: u8 | attempts: u32 | first_delivery_us: u64 |
//! last_delivery_us: u64 | source_offset: u64 | publish_time_us: u64 |
//! reason_text_len: u16 | reason_text | topic_len: u16 | topic`, then
//! optional fields, each `tag: u8 | value` (entries written before they
//! existed end at the topic):
//! - tag 1, the last reason a consumer gave with a plain nack:
//!   `attempt: u32 | text_len: u16 | text`;
//! - tag 2, the message was a redriven copy: `replaced: u8` (1 if the
//!   operator replaced its data or attributes).

use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

use crate::storage::io::Fs;
use crate::storage::state::NackNote;
use crate::storage::{Log, LogConfig, Offset, Record, StorageError};

/// A subscription's dead-letter log, opened on first use: most
/// subscriptions never dead-letter anything, and an open log holds a file
/// and a writer thread.
#[derive(Debug)]
pub struct DeadLetterLog {
    dir: PathBuf,
    fs: Arc<dyn Fs>,
    config: LogConfig,
    log: Mutex<Slot>,
    ids: Mutex<IdIndex>,
}

/// Dead-letter offsets per run of the id index.
const ID_RUN: u64 = 1024;

/// The lowest and highest message id of each run of [`ID_RUN`] dead-letter
/// offsets, so that finding one message's dead letter reads only the runs
/// that may hold it (dead letters come roughly in message order, so one or
/// two runs). 16 bytes per 1,024 dead letters; built on first use and
/// extended with what was dead-lettered since.
#[derive(Debug, Default)]
struct IdIndex {
    /// Offsets below this are indexed.
    next: u64,
    /// Per run: (lowest, highest) id, `(u64::MAX, 0)` when it holds none.
    runs: Vec<(u64, u64)>,
}

impl IdIndex {
    fn add(&mut self, offset: u64, message_id: u64) {
        let run = usize::try_from(offset / ID_RUN).expect("run index fits usize");
        if self.runs.len() <= run {
            self.runs.resize(run + 1, (u64::MAX, 0));
        }
        let (lo, hi) = &mut self.runs[run];
        *lo = (*lo).min(message_id);
        *hi = (*hi).max(message_id);
    }
}

#[derive(Debug, Default)]
struct Slot {
    log: Option<Log>,
    /// Set by `close`: the directory may be renamed or removed, so nothing
    /// may open the log again until `reopen`.
    closed: bool,
}

impl DeadLetterLog {
    pub fn new(dir: PathBuf, fs: Arc<dyn Fs>, config: LogConfig) -> Self {
        Self {
            dir,
            fs,
            config,
            log: Mutex::new(Slot::default()),
            ids: Mutex::new(IdIndex::default()),
        }
    }

    /// The ranges of dead-letter offsets of `log` (this queue's) that may
    /// hold a dead letter of `message_id`, in order. Reads the dead
    /// letters written since the last call (all of them the first time)
    /// to index them, without holding any lock over the read; call it off
    /// the runtime's threads.
    ///
    /// # Errors
    /// A read error other than corruption (corrupt records are skipped:
    /// they cannot be shown either).
    pub fn runs_holding(
        &self,
        log: &Log,
        message_id: u64,
    ) -> Result<Vec<(Offset, Offset)>, StorageError> {
        let from = self.ids.lock().next;
        let end = log.next_offset().0;
        let mut found = Vec::new();
        let mut at = Offset(from.max(log.first_offset().0));
        while at.0 < end {
            let batch = match log.read(
                at,
                crate::storage::ReadLimits {
                    records_max: 1000,
                    bytes_max: 4 << 20,
                },
            ) {
                Ok(b) => b,
                Err(StorageError::Corrupt { next_readable, .. }) => {
                    at = next_readable.max(Offset(at.0 + 1));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if batch.records.is_empty() {
                break;
            }
            found.extend(batch.records.iter().map(|r| (r.offset.0, r.message_id)));
            at = batch.next;
        }
        let mut ids = self.ids.lock();
        if ids.next == from {
            for (offset, id) in found {
                ids.add(offset, id);
            }
            ids.next = end.max(from);
        }
        Ok(ids
            .runs
            .iter()
            .enumerate()
            .filter(|(_, (lo, hi))| *lo <= message_id && message_id <= *hi)
            .map(|(run, _)| {
                let start = run as u64 * ID_RUN;
                (Offset(start), Offset(start + ID_RUN))
            })
            .collect())
    }

    /// The log if it exists on disk (opening it if needed), else `None`.
    /// `None` too once closed.
    pub fn existing(&self) -> Result<Option<Log>, StorageError> {
        let mut slot = self.log.lock();
        if slot.log.is_none() && !slot.closed && self.fs.exists(&self.dir) {
            slot.log = Some(self.open()?);
        }
        Ok(slot.log.clone())
    }

    /// The log, created if it does not exist yet.
    ///
    /// # Errors
    /// `Closed` after [`DeadLetterLog::close`]; a storage error if it cannot
    /// be opened.
    pub fn get_or_create(&self) -> Result<Log, StorageError> {
        let mut slot = self.log.lock();
        if slot.closed {
            return Err(StorageError::Closed {
                path: self.dir.clone(),
            });
        }
        if slot.log.is_none() {
            slot.log = Some(self.open()?);
        }
        Ok(slot.log.clone().expect("just opened"))
    }

    fn open(&self) -> Result<Log, StorageError> {
        let (log, report) = Log::open(self.fs.clone(), &self.dir, self.config.clone(), Offset(0))?;
        for finding in &report.findings {
            tracing::warn!(dir = %self.dir.display(), %finding, "dead-letter log recovery");
        }
        Ok(log)
    }

    /// Offset after the last dead letter ever written (0 if none).
    pub fn next_offset(&self) -> Offset {
        self.log
            .lock()
            .log
            .as_ref()
            .map_or(Offset(0), Log::next_offset)
    }

    /// Why the log cannot write, if it is open and cannot.
    pub fn write_problem(&self) -> Option<String> {
        self.log.lock().log.as_ref().and_then(Log::write_problem)
    }

    /// Closes the log if it is open; it stays closed until `reopen`.
    pub fn close(&self) {
        let mut slot = self.log.lock();
        slot.closed = true;
        if let Some(log) = slot.log.take() {
            log.close();
        }
    }

    /// Allows the log to be opened again after `close` (a deletion that
    /// failed).
    pub fn reopen(&self) {
        self.log.lock().closed = false;
    }
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// It failed `max_delivery_attempts` deliveries.
    AttemptsExhausted,
    /// A consumer rejected it as non-retriable.
    Rejected,
}

/// How a redrive put a message back into its subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redrive {
    Unchanged,
    /// With a replacement of its data and/or attributes.
    Replaced,
}

impl Redrive {
    /// How the record `r` came to be, if it is a redriven copy.
    pub fn of(r: &Record) -> Option<Self> {
        r.target.map(|t| {
            if t.replaced {
                Redrive::Replaced
            } else {
                Redrive::Unchanged
            }
        })
    }
}

const TAG_NACK_NOTE: u8 = 1;
const TAG_REDRIVE: u8 = 2;

/// A dead letter as listed to operators.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Offset of the entry in the dead-letter log (page tokens use it).
    pub dlq_offset: Offset,
    pub reason: DeadLetterReason,
    pub reason_text: String,
    pub delivery_attempts: u32,
    pub first_delivery_us: u64,
    pub last_delivery_us: u64,
    pub dead_letter_us: u64,
    pub topic: String,
    /// The last reason a consumer gave with a plain nack, and its attempt.
    pub last_nack: Option<NackNote>,
    /// Set if the message dead-lettered was a redriven copy.
    pub redrive: Option<Redrive>,
    /// Offset of the message in its topic.
    pub source_offset: Offset,
    /// The original message: id, attributes, ordering key, payload and
    /// publish time as published.
    pub message: Record,
}

/// The history a dead-letter entry records besides the message.
#[derive(Debug, Clone)]
pub struct DeadLetterMeta {
    pub reason: DeadLetterReason,
    pub reason_text: String,
    pub delivery_attempts: u32,
    pub first_delivery_us: u64,
    pub last_delivery_us: u64,
    pub topic: String,
    pub last_nack: Option<NackNote>,
    pub redrive: Option<Redrive>,
}

/// Builds the payload of a dead-letter record for `message`.
pub fn encode_payload(meta: &DeadLetterMeta, message: &Record) -> Bytes {
    let text = truncate_utf8(&meta.reason_text, u16::MAX as usize);
    let topic = truncate_utf8(&meta.topic, u16::MAX as usize);
    let mut m = BytesMut::new();
    m.put_u8(match meta.reason {
        DeadLetterReason::AttemptsExhausted => 1,
        DeadLetterReason::Rejected => 2,
    });
    m.put_u32_le(meta.delivery_attempts);
    m.put_u64_le(meta.first_delivery_us);
    m.put_u64_le(meta.last_delivery_us);
    m.put_u64_le(message.offset.0);
    m.put_u64_le(message.publish_time_us);
    m.put_u16_le(text.len() as u16);
    m.put_slice(text.as_bytes());
    m.put_u16_le(topic.len() as u16);
    m.put_slice(topic.as_bytes());
    if let Some(note) = &meta.last_nack {
        let text = truncate_utf8(&note.text, u16::MAX as usize);
        m.put_u8(TAG_NACK_NOTE);
        m.put_u32_le(note.attempt);
        m.put_u16_le(text.len() as u16);
        m.put_slice(text.as_bytes());
    }
    if let Some(redrive) = meta.redrive {
        m.put_u8(TAG_REDRIVE);
        m.put_u8(u8::from(redrive == Redrive::Replaced));
    }
    let mut out = BytesMut::with_capacity(4 + m.len() + message.payload.len());
    out.put_u32_le(m.len() as u32);
    out.put_slice(&m);
    out.put_slice(&message.payload);
    out.freeze()
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Decodes a dead-letter record; `None` if its payload is malformed.
pub fn decode(record: &Record) -> Option<DeadLetter> {
    let mut p = record.payload.clone();
    if p.remaining() < 4 {
        return None;
    }
    let meta_len = p.get_u32_le() as usize;
    if p.remaining() < meta_len {
        return None;
    }
    let payload = p.split_off(meta_len);
    let mut m = p;
    if m.remaining() < 1 + 4 + 8 * 4 + 2 {
        return None;
    }
    let reason = match m.get_u8() {
        1 => DeadLetterReason::AttemptsExhausted,
        2 => DeadLetterReason::Rejected,
        _ => return None,
    };
    let delivery_attempts = m.get_u32_le();
    let first_delivery_us = m.get_u64_le();
    let last_delivery_us = m.get_u64_le();
    let source_offset = Offset(m.get_u64_le());
    let publish_time_us = m.get_u64_le();
    let text_len = m.get_u16_le() as usize;
    if m.remaining() < text_len + 2 {
        return None;
    }
    let reason_text = String::from_utf8(m.split_to(text_len).to_vec()).ok()?;
    let topic_len = m.get_u16_le() as usize;
    if m.remaining() < topic_len {
        return None;
    }
    let topic = String::from_utf8(m.split_to(topic_len).to_vec()).ok()?;
    let (mut last_nack, mut redrive) = (None, None);
    while m.has_remaining() {
        match m.get_u8() {
            TAG_NACK_NOTE if m.remaining() >= 4 + 2 => {
                let attempt = m.get_u32_le();
                let len = m.get_u16_le() as usize;
                if m.remaining() < len {
                    return None;
                }
                let text = String::from_utf8(m.split_to(len).to_vec()).ok()?;
                last_nack = Some(NackNote { attempt, text });
            }
            TAG_REDRIVE if m.has_remaining() => {
                redrive = Some(match m.get_u8() {
                    0 => Redrive::Unchanged,
                    _ => Redrive::Replaced,
                });
            }
            _ => return None,
        }
    }
    Some(DeadLetter {
        dlq_offset: record.offset,
        reason,
        reason_text,
        delivery_attempts,
        first_delivery_us,
        last_delivery_us,
        dead_letter_us: record.publish_time_us,
        topic,
        last_nack,
        redrive,
        source_offset,
        message: Record {
            offset: source_offset,
            publish_time_us,
            message_id: record.message_id,
            target: None,
            attributes: record.attributes.clone(),
            ordering_key: record.ordering_key.clone(),
            payload,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Attribute;

    #[test]
    fn dead_letter_payload_round_trips() {
        let message = Record {
            offset: Offset(17),
            publish_time_us: 5,
            message_id: 17,
            target: None,
            attributes: vec![Attribute {
                key: "k".into(),
                value: "v".into(),
            }],
            ordering_key: Bytes::new(),
            payload: Bytes::from_static(b"body"),
        };
        let meta = DeadLetterMeta {
            reason: DeadLetterReason::Rejected,
            reason_text: "bad json".into(),
            delivery_attempts: 3,
            first_delivery_us: 10,
            last_delivery_us: 20,
            topic: "orders".into(),
            last_nack: None,
            redrive: None,
        };
        let stored = |meta: &DeadLetterMeta| Record {
            offset: Offset(0),
            publish_time_us: 30,
            payload: encode_payload(meta, &message),
            ..message.clone()
        };
        let dl = decode(&stored(&meta)).unwrap();
        assert_eq!(dl.reason, DeadLetterReason::Rejected);
        assert_eq!(dl.reason_text, "bad json");
        assert_eq!(dl.delivery_attempts, 3);
        assert_eq!(dl.dead_letter_us, 30);
        assert_eq!(dl.topic, "orders");
        assert_eq!(dl.last_nack, None);
        assert_eq!(dl.message, message);

        let note = NackNote {
            attempt: 2,
            text: "upstream 503".into(),
        };
        let with_note = DeadLetterMeta {
            last_nack: Some(note.clone()),
            redrive: Some(Redrive::Replaced),
            ..meta
        };
        let dl = decode(&stored(&with_note)).unwrap();
        assert_eq!(dl.last_nack, Some(note));
        assert_eq!(dl.redrive, Some(Redrive::Replaced));
        assert_eq!(dl.topic, "orders");
        assert_eq!(dl.message, message);
    }
}

//! Record framing: how one message is laid out in a segment file.
//!
//! A frame is `len: u32 | crc: u32 | body`, little-endian, where `len` is the
//! body's length and `crc` is CRC-32 (IEEE, crc32fast) of the body. The body
//! holds the offset, publish time, message id, optional target subscription,
//! attributes, ordering key and payload; docs/storage.md has the table.
//!
//! Decoding checks the frame on the way in: the length must be within
//! [`FRAME_BODY_BYTES_MAX`], the CRC must match, and the body's own lengths
//! must add up to exactly `len`. Decoded fields are `Bytes` slices of the
//! buffer they came from: reading a record copies nothing beyond the read.

use bytes::{BufMut, Bytes, BytesMut};

use crate::storage::Offset;

/// Bytes of `len` and `crc` before the body.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Largest body a frame may declare. Larger lengths are treated as
/// corruption. Generous compared with the broker's message-size limit.
pub const FRAME_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Fixed part of the body: offset, time, message id, flags.
const BODY_FIXED_BYTES: usize = 8 + 8 + 8 + 1;
const FLAG_TARGET: u8 = 1;
/// Only with [`FLAG_TARGET`]: see [`Target::replaced`].
const FLAG_REPLACED: u8 = 2;
const FLAGS_KNOWN: u8 = FLAG_TARGET | FLAG_REPLACED;

/// The one subscription a record is for, instead of every subscription of
/// its topic: a dead letter redriven into its subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Id of the subscription.
    pub subscription: u64,
    /// The operator replaced the dead letter's data or attributes when
    /// redriving it.
    pub replaced: bool,
}

impl Target {
    /// A plain redrive into `subscription`.
    pub fn redrive(subscription: u64) -> Self {
        Self {
            subscription,
            replaced: false,
        }
    }
}

/// One attribute of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub key: Bytes,
    pub value: Bytes,
}

/// A message as the caller hands it to [`crate::storage::Log::append`]; the
/// log assigns the offset and publish time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRecord {
    /// Message id to store; `None` means "the record's own offset", which is
    /// what a fresh publish uses. A redriven message keeps its original id.
    pub message_id: Option<u64>,
    /// If set, only this subscription should receive the record (used to
    /// redrive a dead letter into one subscription).
    pub target: Option<Target>,
    pub attributes: Vec<Attribute>,
    pub ordering_key: Bytes,
    pub payload: Bytes,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: Offset,
    /// Publish time, microseconds since the Unix epoch; non-decreasing
    /// within a log.
    pub publish_time_us: u64,
    pub message_id: u64,
    pub target: Option<Target>,
    pub attributes: Vec<Attribute>,
    pub ordering_key: Bytes,
    pub payload: Bytes,
}

/// A message's size as the broker's limits count it (the maximum message
/// size, flow control): payload, attribute keys and values, ordering key.
fn message_bytes(attributes: &[Attribute], ordering_key: &[u8], payload: &[u8]) -> usize {
    let attributes: usize = attributes.iter().map(|a| a.key.len() + a.value.len()).sum();
    payload.len() + attributes + ordering_key.len()
}

impl Record {
    /// Its size as the broker's limits count it (not its frame).
    pub fn message_bytes(&self) -> usize {
        message_bytes(&self.attributes, &self.ordering_key, &self.payload)
    }

    /// Size of this record's frame on disk.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_BYTES
            + body_len(
                self.target.is_some(),
                &self.attributes,
                self.ordering_key.len(),
                self.payload.len(),
            )
    }
}

impl NewRecord {
    /// Its size as the broker's limits count it (not its frame).
    pub fn message_bytes(&self) -> usize {
        message_bytes(&self.attributes, &self.ordering_key, &self.payload)
    }

    /// Size the frame of this record will take on disk.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_BYTES
            + body_len(
                self.target.is_some(),
                &self.attributes,
                self.ordering_key.len(),
                self.payload.len(),
            )
    }
}

fn body_len(target: bool, attributes: &[Attribute], key_len: usize, payload_len: usize) -> usize {
    let attrs: usize = attributes
        .iter()
        .map(|a| 2 + a.key.len() + 4 + a.value.len())
        .sum();
    BODY_FIXED_BYTES + if target { 8 } else { 0 } + 2 + attrs + 2 + key_len + 4 + payload_len
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The buffer ends before the frame does (a torn write at a log's tail,
    /// or simply the end of the data).
    Incomplete,
    /// The frame is present but wrong: a bad length, CRC mismatch or body
    /// that does not add up.
    Corrupt(&'static str),
}

/// Facts about a checked frame, without building a [`Record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub frame_len: usize,
    pub offset: Offset,
    pub publish_time_us: u64,
}

/// Limits a frame must respect to be encoded; checked before any write.
pub fn check_encodable(record: &NewRecord) -> Result<(), &'static str> {
    if record.attributes.len() > u16::MAX as usize {
        return Err("too many attributes");
    }
    if record
        .attributes
        .iter()
        .any(|a| a.key.len() > u16::MAX as usize)
    {
        return Err("attribute key longer than 65535 bytes");
    }
    if record.ordering_key.len() > u16::MAX as usize {
        return Err("ordering key longer than 65535 bytes");
    }
    if record.frame_len() - FRAME_HEADER_BYTES > FRAME_BODY_BYTES_MAX {
        return Err("record larger than the frame limit");
    }
    Ok(())
}

/// Appends the frame of `record` at `offset` and `publish_time_us` to `out`.
///
/// The caller must have checked the record with [`check_encodable`].
pub fn encode(out: &mut BytesMut, record: &NewRecord, offset: Offset, publish_time_us: u64) {
    let body = record.frame_len() - FRAME_HEADER_BYTES;
    debug_assert!(check_encodable(record).is_ok());
    out.reserve(FRAME_HEADER_BYTES + body);
    let start = out.len();
    out.put_u32_le(u32::try_from(body).expect("checked by check_encodable"));
    out.put_u32_le(0); // CRC, filled below
    out.put_u64_le(offset.0);
    out.put_u64_le(publish_time_us);
    out.put_u64_le(record.message_id.unwrap_or(offset.0));
    match record.target {
        Some(target) => {
            let replaced = if target.replaced { FLAG_REPLACED } else { 0 };
            out.put_u8(FLAG_TARGET | replaced);
            out.put_u64_le(target.subscription);
        }
        None => out.put_u8(0),
    }
    out.put_u16_le(record.attributes.len() as u16);
    for attr in &record.attributes {
        out.put_u16_le(attr.key.len() as u16);
        out.put_slice(&attr.key);
        out.put_u32_le(attr.value.len() as u32);
        out.put_slice(&attr.value);
    }
    out.put_u16_le(record.ordering_key.len() as u16);
    out.put_slice(&record.ordering_key);
    out.put_u32_le(record.payload.len() as u32);
    out.put_slice(&record.payload);
    let crc = crc32fast::hash(&out[start + FRAME_HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, FRAME_HEADER_BYTES + body);
}

fn u32_at(buf: &[u8], pos: usize) -> u32 {
    u32::from_le_bytes(buf[pos..pos + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(buf[pos..pos + 8].try_into().expect("8 bytes"))
}

/// Checks the frame at the start of `buf`: length bounds and CRC.
pub fn check_frame(buf: &[u8]) -> Result<FrameInfo, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Incomplete);
    }
    let body = u32_at(buf, 0) as usize;
    if body > FRAME_BODY_BYTES_MAX {
        return Err(FrameError::Corrupt("frame length over the limit"));
    }
    if body < BODY_FIXED_BYTES + 2 + 2 + 4 {
        return Err(FrameError::Corrupt("frame length too small"));
    }
    let frame_len = FRAME_HEADER_BYTES + body;
    if buf.len() < frame_len {
        return Err(FrameError::Incomplete);
    }
    let crc = u32_at(buf, 4);
    if crc32fast::hash(&buf[FRAME_HEADER_BYTES..frame_len]) != crc {
        return Err(FrameError::Corrupt("CRC mismatch"));
    }
    Ok(FrameInfo {
        frame_len,
        offset: Offset(u64_at(buf, FRAME_HEADER_BYTES)),
        publish_time_us: u64_at(buf, FRAME_HEADER_BYTES + 8),
    })
}

/// Decodes the frame at `buf[pos..]`. Returns the record and the frame's
/// length. Fields are slices of `buf`.
pub fn decode(buf: &Bytes, pos: usize) -> Result<(Record, usize), FrameError> {
    let info = check_frame(&buf[pos..])?;
    let body = buf.slice(pos + FRAME_HEADER_BYTES..pos + info.frame_len);
    let record = decode_body(&body).ok_or(FrameError::Corrupt("body lengths do not add up"))?;
    Ok((record, info.frame_len))
}

/// Length and offset of the frame at `buf[pos..]`, trusting it: for
/// frames this process encoded and kept in memory (the tail cache), where
/// a CRC check would only cost time.
pub fn peek_trusted(buf: &[u8], pos: usize) -> (usize, Offset) {
    let body = u32_at(buf, pos) as usize;
    (
        FRAME_HEADER_BYTES + body,
        Offset(u64_at(buf, pos + FRAME_HEADER_BYTES)),
    )
}

/// Decodes a frame this process encoded and kept in memory, without the
/// CRC check (lengths are still checked).
pub fn decode_trusted(buf: &Bytes, pos: usize) -> Result<(Record, usize), FrameError> {
    let (frame_len, _) = peek_trusted(buf, pos);
    if buf.len() < pos + frame_len {
        return Err(FrameError::Incomplete);
    }
    let body = buf.slice(pos + FRAME_HEADER_BYTES..pos + frame_len);
    let record = decode_body(&body).ok_or(FrameError::Corrupt("body lengths do not add up"))?;
    Ok((record, frame_len))
}

/// A cursor over a body that fails (returns `None`) instead of panicking
/// when a declared length runs past the end.
struct BodyReader<'a> {
    body: &'a Bytes,
    pos: usize,
}

impl BodyReader<'_> {
    fn take(&mut self, n: usize) -> Option<Bytes> {
        let end = self.pos.checked_add(n)?;
        if end > self.body.len() {
            return None;
        }
        let out = self.body.slice(self.pos..end);
        self.pos = end;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?[..].try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?[..].try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?[..].try_into().ok()?))
    }
}

fn decode_body(body: &Bytes) -> Option<Record> {
    let mut r = BodyReader { body, pos: 0 };
    let offset = Offset(r.u64()?);
    let publish_time_us = r.u64()?;
    let message_id = r.u64()?;
    let flags = r.u8()?;
    if flags & !FLAGS_KNOWN != 0 {
        return None;
    }
    let target = if flags & FLAG_TARGET != 0 {
        Some(Target {
            subscription: r.u64()?,
            replaced: flags & FLAG_REPLACED != 0,
        })
    } else if flags & FLAG_REPLACED != 0 {
        return None;
    } else {
        None
    };
    let count = r.u16()? as usize;
    let mut attributes = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let key_len = r.u16()? as usize;
        let key = r.take(key_len)?;
        let value_len = r.u32()? as usize;
        let value = r.take(value_len)?;
        attributes.push(Attribute { key, value });
    }
    let key_len = r.u16()? as usize;
    let ordering_key = r.take(key_len)?;
    let payload_len = r.u32()? as usize;
    let payload = r.take(payload_len)?;
    if r.pos != body.len() {
        return None;
    }
    Some(Record {
        offset,
        publish_time_us,
        message_id,
        target,
        attributes,
        ordering_key,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NewRecord {
        NewRecord {
            message_id: None,
            target: Some(Target {
                subscription: 7,
                replaced: true,
            }),
            attributes: vec![Attribute {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"value"),
            }],
            ordering_key: Bytes::from_static(b"order"),
            payload: Bytes::from_static(b"hello"),
        }
    }

    #[test]
    fn encode_then_decode_returns_the_same_fields() {
        let mut buf = BytesMut::new();
        let rec = sample();
        encode(&mut buf, &rec, Offset(42), 1_000);
        assert_eq!(buf.len(), rec.frame_len());
        let buf = buf.freeze();
        let (got, len) = decode(&buf, 0).unwrap();
        assert_eq!(len, buf.len());
        assert_eq!(got.offset, Offset(42));
        assert_eq!(got.message_id, 42);
        assert_eq!(got.target, rec.target);
        assert_eq!(got.attributes, rec.attributes);
        assert_eq!(got.ordering_key, rec.ordering_key);
        assert_eq!(got.payload, rec.payload);
        assert_eq!(got.frame_len(), len);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = BytesMut::new();
        encode(&mut buf, &sample(), Offset(1), 2);
        let clean = buf.freeze();
        for bit in 0..clean.len() * 8 {
            let mut bad = clean.to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            let bad = Bytes::from(bad);
            assert!(decode(&bad, 0).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_incomplete_not_a_panic() {
        let mut buf = BytesMut::new();
        encode(&mut buf, &sample(), Offset(1), 2);
        let clean = buf.freeze();
        for cut in 0..clean.len() {
            assert_eq!(
                decode(&clean.slice(..cut), 0).unwrap_err(),
                FrameError::Incomplete
            );
        }
    }
}

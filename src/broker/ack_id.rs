//! Ack ids: opaque, unguessable names of one delivery, valid only on the
//! subscription that issued them.
//!
//! An ack id carries the message's offset and the delivery's attempt
//! number (what the subscription needs to find the lease) and a 128-bit
//! tag: SipHash-2-4-128 under the broker's secret key of
//! `(subscription id, offset, attempt)`. A subscription accepts an ack id
//! only if the tag matches its own id, so ids cannot be guessed from
//! offsets and an id from subscription A never settles anything on B
//! (subscription ids are never reused, so neither on a later subscription
//! of the same name).
//!
//! The key is 16 random bytes in `ack-id.key` in the data directory,
//! created once and fsynced before the first ack id is issued, so ack ids
//! stay valid across restarts. Wire form: URL-safe base64 (no padding) of
//! `offset: u64 LE | attempt: u32 LE | tag: 16 bytes` (38 characters).

use std::hash::Hasher;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use siphasher::sip128::{Hasher128, SipHasher24};

use crate::storage::StorageError;
use crate::storage::io::{Fs, OpenMode};

/// File of the ack-id key in the data directory.
pub const ACK_KEY_FILE: &str = "ack-id.key";
const ACK_KEY_TMP_FILE: &str = "ack-id.key.tmp";
const ACK_KEY_BYTES: usize = 16;
const ACK_ID_BYTES: usize = 8 + 4 + 16;

/// Names one delivery of one message. Obtain one from a delivery or by
/// parsing a client's string; [`AckKey::verify`] says whether it is real.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckId {
    pub offset: u64,
    pub attempt: u32,
    tag: u128,
}

impl AckId {
    /// The wire form.
    pub fn encode(&self) -> String {
        let mut raw = [0u8; ACK_ID_BYTES];
        raw[..8].copy_from_slice(&self.offset.to_le_bytes());
        raw[8..12].copy_from_slice(&self.attempt.to_le_bytes());
        raw[12..].copy_from_slice(&self.tag.to_le_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }
}

impl std::fmt::Display for AckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.encode())
    }
}

impl std::str::FromStr for AckId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        // 38 characters encode 28 bytes; anything else is not an ack id.
        if s.len() != 38 {
            return Err(());
        }
        let mut raw = [0u8; ACK_ID_BYTES + 2];
        let n = URL_SAFE_NO_PAD.decode_slice(s, &mut raw).map_err(|_| ())?;
        if n != ACK_ID_BYTES {
            return Err(());
        }
        let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
        Ok(AckId {
            offset: u64_at(0),
            attempt: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
            tag: u128::from_le_bytes(raw[12..28].try_into().expect("16 bytes")),
        })
    }
}

/// The broker's secret for ack-id tags.
#[derive(Clone)]
pub struct AckKey {
    key: [u8; ACK_KEY_BYTES],
}

impl std::fmt::Debug for AckKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckKey(..)") // never print the secret
    }
}

impl AckKey {
    /// Loads the key from `data_dir`, creating it (durably) if absent.
    ///
    /// # Errors
    /// `Io` if it cannot be read or written; `Format` if the file is not a
    /// key.
    pub fn load_or_create(fs: &dyn Fs, data_dir: &Path) -> Result<AckKey, StorageError> {
        let path = data_dir.join(ACK_KEY_FILE);
        if fs.exists(&path) {
            let file = fs
                .open(&path, OpenMode::Existing)
                .map_err(|e| StorageError::io(&path, e))?;
            let mut key = [0u8; ACK_KEY_BYTES];
            let n = file
                .read_at(&mut key, 0)
                .map_err(|e| StorageError::io(&path, e))?;
            let len = file.len().map_err(|e| StorageError::io(&path, e))?;
            if n != ACK_KEY_BYTES || len != ACK_KEY_BYTES as u64 {
                return Err(StorageError::Format {
                    path,
                    detail: format!("an ack-id key is {ACK_KEY_BYTES} bytes, found {len}"),
                });
            }
            return Ok(AckKey { key });
        }
        let mut key = [0u8; ACK_KEY_BYTES];
        getrandom::fill(&mut key).map_err(|e| {
            StorageError::io(&path, std::io::Error::other(format!("no randomness: {e}")))
        })?;
        let tmp = data_dir.join(ACK_KEY_TMP_FILE);
        let file = fs
            .open(&tmp, OpenMode::CreateTruncate)
            .map_err(|e| StorageError::io(&tmp, e))?;
        file.write_at(&key, 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| StorageError::io(&tmp, e))?;
        drop(file);
        fs.rename(&tmp, &path)
            .map_err(|e| StorageError::io(&path, e))?;
        fs.sync_dir(data_dir)
            .map_err(|e| StorageError::io(data_dir, e))?;
        Ok(AckKey { key })
    }

    /// A key for tests and tools that keep no data directory.
    pub fn from_bytes(key: [u8; ACK_KEY_BYTES]) -> AckKey {
        AckKey { key }
    }

    fn tag(&self, subscription_id: u64, offset: u64, attempt: u32) -> u128 {
        let mut h = SipHasher24::new_with_key(&self.key);
        h.write_u64(subscription_id);
        h.write_u64(offset);
        h.write_u32(attempt);
        h.finish128().as_u128()
    }

    /// The ack id of delivery `attempt` of `offset` on a subscription.
    pub fn issue(&self, subscription_id: u64, offset: u64, attempt: u32) -> AckId {
        AckId {
            offset,
            attempt,
            tag: self.tag(subscription_id, offset, attempt),
        }
    }

    fn page_tag(&self, subscription_id: u64, offset: u64) -> u64 {
        // A different input length from an ack id's: the two never share
        // a tag.
        let mut h = SipHasher24::new_with_key(&self.key);
        h.write_u8(b'p');
        h.write_u64(subscription_id);
        h.write_u64(offset);
        h.finish()
    }

    /// An opaque page token for a listing of subscription
    /// `subscription_id` that goes on at `offset`.
    pub fn page_token(&self, subscription_id: u64, offset: u64) -> String {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&offset.to_le_bytes());
        raw[8..].copy_from_slice(&self.page_tag(subscription_id, offset).to_le_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The offset of a token [`AckKey::page_token`] issued for this
    /// subscription; `None` for anything else.
    pub fn parse_page_token(&self, subscription_id: u64, token: &str) -> Option<u64> {
        if token.len() != 22 {
            return None;
        }
        let mut raw = [0u8; 18];
        if URL_SAFE_NO_PAD.decode_slice(token, &mut raw).ok()? != 16 {
            return None;
        }
        let offset = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        let tag = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        ((self.page_tag(subscription_id, offset) ^ tag) == 0).then_some(offset)
    }

    /// True if `id` was issued by subscription `subscription_id`.
    pub fn verify(&self, subscription_id: u64, id: &AckId) -> bool {
        // One xor over the whole tag: no early exit on the first
        // differing byte.
        (self.tag(subscription_id, id.offset, id.attempt) ^ id.tag) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_ids_round_trip_and_are_bound_to_their_subscription() {
        let key = AckKey::from_bytes([7; ACK_KEY_BYTES]);
        for (offset, attempt) in [(0, 1), (12, 3), (u64::MAX, u32::MAX)] {
            let id = key.issue(5, offset, attempt);
            let wire = id.encode();
            assert_eq!(wire.len(), 38);
            assert_eq!(wire.parse::<AckId>(), Ok(id));
            assert!(key.verify(5, &id));
            assert!(!key.verify(6, &id), "valid on another subscription");
            let other = AckKey::from_bytes([8; ACK_KEY_BYTES]);
            assert!(!other.verify(5, &id), "valid under another key");
        }
        let id = key.issue(5, 12, 3);
        let forged = AckId { attempt: 4, ..id };
        assert!(!key.verify(5, &forged));
        for bad in [
            "",
            "12-3",
            "a-b",
            &"A".repeat(38),
            &"!".repeat(38),
            &"A".repeat(39),
        ] {
            let parsed = bad.parse::<AckId>();
            assert!(parsed.is_err() || !key.verify(5, &parsed.unwrap()), "{bad}");
        }
    }

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_subscription() {
        let key = AckKey::from_bytes([7; ACK_KEY_BYTES]);
        for offset in [0, 1, 1000, u64::MAX] {
            let token = key.page_token(5, offset);
            assert_eq!(key.parse_page_token(5, &token), Some(offset));
            assert_eq!(key.parse_page_token(6, &token), None);
        }
        for bad in ["", "0", "1000", &"A".repeat(22), &"!".repeat(22)] {
            assert_eq!(key.parse_page_token(5, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_key_is_created_once_and_kept() {
        let fs = crate::storage::io::SimFs::new();
        let dir = Path::new("/data");
        fs.create_dir_all(dir).unwrap();
        let a = AckKey::load_or_create(&fs, dir).unwrap();
        fs.power_loss();
        let b = AckKey::load_or_create(&fs, dir).unwrap();
        assert_eq!(a.key, b.key);
    }
}

//! Fuzz target: `record::check_frame` and `record::decode` on arbitrary
//! bytes.
//!
//! Checks: neither ever panics; what `decode` accepts, `check_frame` accepts
//! with the same length, offset and time; and an accepted frame re-encodes
//! to exactly the bytes it was decoded from (so a frame has one meaning).
//! The first input byte picks the start position in the rest.
#![no_main]

use bytes::{Bytes, BytesMut};
use courier::storage::NewRecord;
use courier::storage::record::{self, FRAME_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&at, rest)) = data.split_first() else {
        return;
    };
    let buf = Bytes::copy_from_slice(rest);
    let pos = usize::from(at).min(buf.len());

    let checked = record::check_frame(&buf[pos..]);
    match record::decode(&buf, pos) {
        Ok((rec, len)) => {
            let info = checked.expect("decode accepted what check_frame rejected");
            assert_eq!(info.frame_len, len);
            assert_eq!(info.offset, rec.offset);
            assert_eq!(info.publish_time_us, rec.publish_time_us);
            assert!(len >= FRAME_HEADER_BYTES && pos + len <= buf.len());
            assert_eq!(rec.frame_len(), len);
            let again = NewRecord {
                message_id: Some(rec.message_id),
                target: rec.target,
                attributes: rec.attributes.clone(),
                ordering_key: rec.ordering_key.clone(),
                payload: rec.payload.clone(),
            };
            assert!(record::check_encodable(&again).is_ok());
            let mut out = BytesMut::new();
            record::encode(&mut out, &again, rec.offset, rec.publish_time_us);
            assert_eq!(&out[..], &buf[pos..pos + len], "re-encoding differs");
        }
        Err(_) => {
            // check_frame may accept a frame whose body does not add up;
            // it must never accept less than a whole frame.
            if let Ok(info) = checked {
                assert!(pos + info.frame_len <= buf.len());
            }
        }
    }

    // Walk frames back to back from the start, as a segment scan does.
    let mut p = 0;
    while p < buf.len() {
        match record::decode(&buf, p) {
            Ok((_, len)) => p += len,
            Err(_) => break,
        }
    }
});

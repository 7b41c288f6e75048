//! Conversions between protocol messages and broker types.

use std::collections::HashMap;

use bytes::Bytes;
use prost_types::Timestamp;

use crate::api::pb::v1;
use crate::api::status;
use crate::broker::{DeadLetter, DeadLetterReason, Delivery, Subscription};
use crate::storage::meta::{DeadLetterPolicy, RetentionMode, RetryPolicy, TopicDef};
use crate::storage::{Attribute, NewRecord, Record};

/// A protobuf timestamp from microseconds since the Unix epoch.
pub fn timestamp_us(us: u64) -> Timestamp {
    Timestamp {
        seconds: i64::try_from(us / 1_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from((us % 1_000_000) * 1000).unwrap_or(0),
    }
}

/// A protobuf timestamp from milliseconds since the Unix epoch.
pub fn timestamp_ms(ms: u64) -> Timestamp {
    timestamp_us(ms.saturating_mul(1000))
}

/// Microseconds since the epoch as an optional timestamp (0 = unset).
fn opt_timestamp_us(us: u64) -> Option<Timestamp> {
    (us > 0).then(|| timestamp_us(us))
}

/// Attributes as stored: sorted by key (a map's order is random).
pub fn attributes(map: HashMap<String, String>) -> Vec<Attribute> {
    let mut attributes: Vec<Attribute> = map
        .into_iter()
        .map(|(k, v)| Attribute {
            key: Bytes::from(k),
            value: Bytes::from(v),
        })
        .collect();
    attributes.sort_by(|a, b| a.key.cmp(&b.key));
    attributes
}

pub fn new_record(m: v1::PublishMessage) -> NewRecord {
    NewRecord {
        message_id: None,
        target: None,
        attributes: attributes(m.attributes),
        ordering_key: Bytes::from(m.ordering_key),
        payload: m.data,
    }
}

fn attributes_map(attrs: &[Attribute]) -> HashMap<String, String> {
    attrs
        .iter()
        .map(|a| {
            (
                String::from_utf8_lossy(&a.key).into_owned(),
                String::from_utf8_lossy(&a.value).into_owned(),
            )
        })
        .collect()
}

pub fn message(r: &Record) -> v1::Message {
    v1::Message {
        message_id: itoa::Buffer::new().format(r.message_id).to_owned(),
        data: r.payload.clone(),
        attributes: attributes_map(&r.attributes),
        ordering_key: String::from_utf8_lossy(&r.ordering_key).into_owned(),
        publish_time: Some(timestamp_us(r.publish_time_us)),
    }
}

pub fn received(d: &Delivery) -> v1::ReceivedMessage {
    v1::ReceivedMessage {
        ack_id: d.ack_id.encode(),
        message: Some(message(&d.record)),
        delivery_attempt: d.attempt,
    }
}

pub fn topic(def: &TopicDef) -> v1::Topic {
    v1::Topic {
        name: def.name.clone(),
        retention: Some(v1::RetentionPolicy {
            max_age_ms: def.retention.max_age_ms,
            max_bytes: def.retention.max_bytes,
            mode: match def.retention.mode {
                RetentionMode::DropOldest => v1::RetentionMode::DropOldest,
                RetentionMode::RejectPublish => v1::RetentionMode::RejectPublish,
            } as i32,
        }),
        create_time: Some(timestamp_ms(def.created_ms)),
    }
}

pub fn subscription(sub: &Subscription) -> v1::Subscription {
    let def = sub.def();
    v1::Subscription {
        name: def.name,
        topic: def.topic,
        ack_deadline_ms: def.ack_deadline_ms,
        retry_policy: (def.retry != RetryPolicy::default()).then_some(v1::RetryPolicy {
            min_backoff_ms: def.retry.min_backoff_ms,
            max_backoff_ms: def.retry.max_backoff_ms,
            no_jitter: def.retry.no_jitter,
        }),
        dead_letter_policy: def.dead_letter.map(|p| v1::DeadLetterPolicy {
            max_delivery_attempts: p.max_delivery_attempts,
            forward_topic: p.forward_topic.unwrap_or_default(),
        }),
        start_position: if def.from_earliest {
            v1::StartPosition::Earliest as i32
        } else {
            v1::StartPosition::Latest as i32
        },
        create_time: Some(timestamp_ms(def.created_ms)),
    }
}

/// A request's retention mode; UNSPECIFIED is drop-oldest.
pub fn retention_mode(mode: i32) -> Result<RetentionMode, tonic::Status> {
    match v1::RetentionMode::try_from(mode) {
        Ok(v1::RetentionMode::Unspecified | v1::RetentionMode::DropOldest) => {
            Ok(RetentionMode::DropOldest)
        }
        Ok(v1::RetentionMode::RejectPublish) => Ok(RetentionMode::RejectPublish),
        Err(_) => Err(status::invalid(
            "retention.mode",
            format!("{mode} is not a retention mode"),
        )),
    }
}

pub fn retry_policy(p: Option<v1::RetryPolicy>) -> RetryPolicy {
    p.map(|p| RetryPolicy {
        min_backoff_ms: p.min_backoff_ms,
        max_backoff_ms: p.max_backoff_ms,
        no_jitter: p.no_jitter,
    })
    .unwrap_or_default()
}

pub fn dead_letter_policy(p: Option<v1::DeadLetterPolicy>) -> Option<DeadLetterPolicy> {
    p.map(|p| DeadLetterPolicy {
        max_delivery_attempts: p.max_delivery_attempts,
        forward_topic: (!p.forward_topic.is_empty()).then_some(p.forward_topic),
    })
}

pub fn reason(r: DeadLetterReason) -> v1::DeadLetterReason {
    match r {
        DeadLetterReason::AttemptsExhausted => v1::DeadLetterReason::AttemptsExhausted,
        DeadLetterReason::Rejected => v1::DeadLetterReason::Rejected,
    }
}

pub fn dead_letter(dl: &DeadLetter, subscription: &str) -> v1::DeadLetter {
    v1::DeadLetter {
        message: Some(message(&dl.message)),
        reason: reason(dl.reason) as i32,
        reason_text: dl.reason_text.clone(),
        delivery_attempts: dl.delivery_attempts,
        first_delivery_time: opt_timestamp_us(dl.first_delivery_us),
        last_delivery_time: opt_timestamp_us(dl.last_delivery_us),
        dead_letter_time: Some(timestamp_us(dl.dead_letter_us)),
        topic: dl.topic.clone(),
        subscription: subscription.to_string(),
        offset: dl.source_offset.0,
        last_nack_reason: dl
            .last_nack
            .as_ref()
            .map(|n| n.text.clone())
            .unwrap_or_default(),
        last_nack_attempt: dl.last_nack.as_ref().map_or(0, |n| n.attempt),
    }
}

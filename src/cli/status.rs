//! `courier status` (where one message stands in every subscription of its
//! topic) and `courier stats` (broker-wide statistics), through the Admin
//! service.

use clap::Args;
use serde_json::{Value, json};

use super::conn::Conn;
use super::output::{bytes_human, count, ms_human, reason_name, state_name, time_human, time_json};
use crate::api::pb::v1::{
    GetBrokerStatsRequest, GetMessageStatusRequest, MessageState, MessageStatus, Redrive,
    SubscriptionMessageStatus,
};

/// `courier status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Topic of the message.
    pub topic: String,
    /// Id of the message.
    pub message_id: String,
}

/// `courier stats`.
#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub conn: Conn,
}

impl StatusArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open().await?;
        let request = GetMessageStatusRequest {
            topic: self.topic.clone(),
            message_id: self.message_id.clone(),
        };
        let status = s
            .client
            .admin()
            .get_message_status(request)
            .await
            .map_err(|e| {
                s.fail(
                    format_args!("status {:?} message {:?}", self.topic, self.message_id),
                    e,
                )
            })?
            .into_inner();
        if s.out.json() {
            s.out.json_line(&status_json(&self.topic, &status))?;
        } else {
            s.out.line(format_args!(
                "message {} of topic {:?}, published {}",
                status.message_id,
                self.topic,
                time_human(&status.publish_time)
            ))?;
            if status.subscriptions.is_empty() {
                s.out.line("(no subscriptions)")?;
            } else {
                let rows: Vec<Vec<String>> = status
                    .subscriptions
                    .iter()
                    .map(|sub| {
                        vec![
                            sub.subscription.clone(),
                            state_human(sub.state),
                            detail_human(sub),
                        ]
                    })
                    .collect();
                s.out.table(&["SUBSCRIPTION", "STATE", "DETAIL"], &rows)?;
            }
        }
        s.out.flush()?;
        Ok(())
    }
}

/// A message status as one JSON object with a `subscriptions` array.
pub fn status_json(topic: &str, status: &MessageStatus) -> Value {
    let subs: Vec<Value> = status
        .subscriptions
        .iter()
        .map(|sub| {
            let dead = sub.state == MessageState::DeadLettered as i32;
            // Attempts are not kept once a message is acked: say nothing
            // rather than 0.
            let counted = [
                MessageState::Pending,
                MessageState::InFlight,
                MessageState::DeadLettered,
            ]
            .map(|s| s as i32)
            .contains(&sub.state);
            let nacked = !sub.last_nack_reason.is_empty();
            json!({
                "subscription": sub.subscription,
                "state": state_name(sub.state),
                "delivery_attempt": counted.then_some(sub.delivery_attempt),
                "last_nack_reason": nacked.then(|| sub.last_nack_reason.clone()),
                "last_nack_attempt": nacked.then_some(sub.last_nack_attempt),
                "redrive": redrive_name(sub.redrive),
                "lease_deadline": time_json(&sub.lease_deadline),
                "dead_letter_reason": dead.then(|| reason_name(sub.dead_letter_reason)),
                "dead_letter_reason_text": dead.then(|| sub.dead_letter_reason_text.clone()),
            })
        })
        .collect();
    json!({
        "topic": topic,
        "message_id": status.message_id,
        "publish_time": time_json(&status.publish_time),
        "subscriptions": subs,
    })
}

fn state_human(state: i32) -> String {
    state_name(state).replace('-', " ")
}

/// `None`, `"unchanged"` or `"replaced"`.
fn redrive_name(redrive: i32) -> Option<&'static str> {
    match Redrive::try_from(redrive) {
        Ok(Redrive::Unchanged) => Some("unchanged"),
        Ok(Redrive::Replaced) => Some("replaced"),
        _ => None,
    }
}

fn detail_human(sub: &SubscriptionMessageStatus) -> String {
    let detail = nack_detail(sub);
    match redrive_name(sub.redrive) {
        None => detail,
        Some(how) => {
            let redriven = match how {
                "replaced" => "redriven with replaced content",
                _ => "redriven",
            };
            if detail == "-" {
                redriven.to_string()
            } else {
                format!("{redriven}; {detail}")
            }
        }
    }
}

fn nack_detail(sub: &SubscriptionMessageStatus) -> String {
    let detail = state_detail(sub);
    if sub.last_nack_reason.is_empty()
        || sub.state == MessageState::DeadLettered as i32
            && sub.dead_letter_reason_text.contains(&sub.last_nack_reason)
    {
        return detail;
    }
    let nacked = format!(
        "attempt {} nacked: {}",
        sub.last_nack_attempt, sub.last_nack_reason
    );
    if detail == "-" {
        nacked
    } else {
        format!("{detail}; {nacked}")
    }
}

fn state_detail(sub: &SubscriptionMessageStatus) -> String {
    let attempts = |n: u32| count(u64::from(n), "attempt");
    match MessageState::try_from(sub.state) {
        Ok(MessageState::InFlight) => format!(
            "attempt {}, lease until {}",
            sub.delivery_attempt,
            time_human(&sub.lease_deadline)
        ),
        Ok(MessageState::DeadLettered) => {
            let mut text = reason_name(sub.dead_letter_reason);
            if !sub.dead_letter_reason_text.is_empty() {
                text = format!("{text}: {}", sub.dead_letter_reason_text);
            }
            format!("{text} (after {})", attempts(sub.delivery_attempt))
        }
        Ok(MessageState::Pending) if sub.delivery_attempt > 0 => {
            format!("redelivery after {}", attempts(sub.delivery_attempt))
        }
        _ => "-".into(),
    }
}

impl StatsArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut s = self.conn.open().await?;
        let st = s
            .client
            .admin()
            .get_broker_stats(GetBrokerStatsRequest {})
            .await
            .map_err(|e| s.fail("stats", e))?
            .into_inner();
        if s.out.json() {
            s.out.json_line(&json!({
                "version": st.version,
                "uptime_ms": st.uptime_ms,
                "topics": st.topics,
                "subscriptions": st.subscriptions,
                "resident_memory_bytes": st.resident_memory_bytes,
                "data_dir_bytes": st.data_dir_bytes,
                "fsync_mode": st.fsync_mode,
                "memory_max_bytes": st.memory_max_bytes,
                "tail_cache_bytes": st.tail_cache_bytes,
                "pending_append_bytes": st.pending_append_bytes,
                "queued_delivery_bytes": st.queued_delivery_bytes,
                "nack_reason_bytes": st.nack_reason_bytes,
            }))?;
        } else {
            // Whole seconds read better than humantime's ms/us/ns tail.
            let uptime = ms_human(st.uptime_ms / 1000 * 1000);
            s.out.fields(&[
                ("version", st.version.clone()),
                ("uptime", uptime),
                ("topics", st.topics.to_string()),
                ("subscriptions", st.subscriptions.to_string()),
                ("resident_memory", bytes_human(st.resident_memory_bytes)),
                ("data_dir_size", bytes_human(st.data_dir_bytes)),
                ("fsync", st.fsync_mode.clone()),
                (
                    "memory_budget",
                    format!(
                        "{} (tail caches {}, pending appends {}, queued deliveries {}, nack reasons {})",
                        bytes_human(st.memory_max_bytes),
                        bytes_human(st.tail_cache_bytes),
                        bytes_human(st.pending_append_bytes),
                        bytes_human(st.queued_delivery_bytes),
                        bytes_human(st.nack_reason_bytes)
                    ),
                ),
            ])?;
        }
        s.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::v1::DeadLetterReason;

    #[test]
    fn details_per_state() {
        let sub = |state: MessageState, attempt: u32| SubscriptionMessageStatus {
            subscription: "s".into(),
            state: state as i32,
            delivery_attempt: attempt,
            lease_deadline: None,
            dead_letter_reason: DeadLetterReason::Rejected as i32,
            dead_letter_reason_text: "bad".into(),
            ..SubscriptionMessageStatus::default()
        };
        assert_eq!(detail_human(&sub(MessageState::Pending, 0)), "-");
        assert_eq!(detail_human(&sub(MessageState::NotSubscribed, 0)), "-");
        assert_eq!(
            detail_human(&sub(MessageState::InFlight, 2)),
            "attempt 2, lease until -"
        );
        assert_eq!(
            detail_human(&sub(MessageState::DeadLettered, 1)),
            "rejected: bad (after 1 attempt)"
        );
        assert_eq!(
            state_human(MessageState::NotSubscribed as i32),
            "not subscribed"
        );
        let nacked = SubscriptionMessageStatus {
            last_nack_reason: "upstream 503".into(),
            last_nack_attempt: 1,
            ..sub(MessageState::Pending, 1)
        };
        assert_eq!(
            detail_human(&nacked),
            "redelivery after 1 attempt; attempt 1 nacked: upstream 503"
        );
        let in_flight = SubscriptionMessageStatus {
            state: MessageState::InFlight as i32,
            delivery_attempt: 2,
            ..nacked.clone()
        };
        assert_eq!(
            detail_human(&in_flight),
            "attempt 2, lease until -; attempt 1 nacked: upstream 503"
        );
        // A dead letter whose text already carries the reason says it once.
        let dead = SubscriptionMessageStatus {
            state: MessageState::DeadLettered as i32,
            dead_letter_reason: DeadLetterReason::AttemptsExhausted as i32,
            dead_letter_reason_text:
                "1 delivery attempt failed; the last one was nacked: upstream 503".into(),
            ..nacked
        };
        let redriven = SubscriptionMessageStatus {
            redrive: Redrive::Replaced as i32,
            ..sub(MessageState::Pending, 0)
        };
        assert_eq!(detail_human(&redriven), "redriven with replaced content");
        assert_eq!(
            detail_human(&dead),
            "attempts-exhausted: 1 delivery attempt failed; the last one was nacked: upstream 503 (after 1 attempt)"
        );
    }

    #[test]
    fn status_json_is_one_object() {
        let status = MessageStatus {
            message_id: "3".into(),
            publish_time: None,
            subscriptions: vec![SubscriptionMessageStatus {
                subscription: "s".into(),
                state: MessageState::Acked as i32,
                delivery_attempt: 1,
                ..SubscriptionMessageStatus::default()
            }],
        };
        let v = status_json("t", &status);
        assert_eq!(v["subscriptions"][0]["state"], "acked");
        assert_eq!(v["subscriptions"][0]["delivery_attempt"], Value::Null);
        assert_eq!(v["subscriptions"][0]["last_nack_reason"], Value::Null);
        assert_eq!(v["subscriptions"][0]["dead_letter_reason"], Value::Null);
        assert_eq!(v["topic"], "t");
    }
}

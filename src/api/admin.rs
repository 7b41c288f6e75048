//! The Admin service: topics, subscriptions, stats, message status and
//! dead letters.

use tonic::{Request, Response, Status};

use crate::api::pb::v1::{self, admin_server::Admin};
use crate::api::{convert, status};
use crate::broker::config::{
    DEAD_LETTER_PAGE_DEFAULT, DEAD_LETTER_PAGE_MAX, REDRIVE_IDS_MAX, check_name, shown,
};
use crate::broker::{
    Broker, DeadLetterReason, MessageState, Redrive, RedriveFilter, Replacement, SubscriptionSpec,
    SubscriptionUpdate,
};
use crate::storage::Offset;
use crate::storage::meta::Retention;
use crate::storage::state::NackNote;

/// Serves `courier.v1.Admin` over a [`Broker`].
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Broker,
}

impl AdminService {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

fn name(field: &str, value: &str) -> Result<(), Status> {
    check_name(field, value).map_err(status::to_status)
}

fn parse_reason(field: &str, r: i32) -> Result<DeadLetterReason, Status> {
    match v1::DeadLetterReason::try_from(r) {
        Ok(v1::DeadLetterReason::AttemptsExhausted) => Ok(DeadLetterReason::AttemptsExhausted),
        Ok(v1::DeadLetterReason::Rejected) => Ok(DeadLetterReason::Rejected),
        _ => Err(status::invalid(
            field,
            format!("{r} is not a dead-letter reason"),
        )),
    }
}

fn set_last_nack(out: &mut v1::SubscriptionMessageStatus, note: Option<NackNote>) {
    if let Some(note) = note {
        out.last_nack_reason = note.text;
        out.last_nack_attempt = note.attempt;
    }
}

fn parse_message_id(field: &str, id: &str) -> Result<u64, Status> {
    id.parse().map_err(|_| {
        status::invalid(
            field,
            format!("{} is not a message id (a decimal number)", shown(id)),
        )
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topic(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::Topic>, Status> {
        let req = request.into_inner();
        let retention = match req.retention {
            None => Retention::default(),
            Some(r) => Retention {
                max_age_ms: r.max_age_ms,
                max_bytes: r.max_bytes,
                mode: convert::retention_mode(r.mode)?,
            },
        };
        let topic = self
            .broker
            .create_topic(&req.name, retention)
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(convert::topic(topic.def())))
    }

    async fn get_topic(
        &self,
        request: Request<v1::GetTopicRequest>,
    ) -> Result<Response<v1::Topic>, Status> {
        let req = request.into_inner();
        name("name", &req.name)?;
        let topic = self.broker.topic(&req.name).map_err(status::to_status)?;
        Ok(Response::new(convert::topic(topic.def())))
    }

    async fn list_topics(
        &self,
        _: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        let topics = self
            .broker
            .topics()
            .iter()
            .map(|t| convert::topic(t.def()))
            .collect();
        Ok(Response::new(v1::ListTopicsResponse { topics }))
    }

    async fn delete_topic(
        &self,
        request: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        let req = request.into_inner();
        name("name", &req.name)?;
        let deleted_subscriptions = self
            .broker
            .delete_topic(&req.name, req.force)
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(v1::DeleteTopicResponse {
            deleted_subscriptions,
        }))
    }

    async fn create_subscription(
        &self,
        request: Request<v1::Subscription>,
    ) -> Result<Response<v1::Subscription>, Status> {
        let req = request.into_inner();
        let from_earliest = match v1::StartPosition::try_from(req.start_position) {
            Ok(v1::StartPosition::Earliest) => true,
            Ok(_) => false,
            Err(_) => {
                return Err(status::invalid(
                    "start_position",
                    format!("{} is not a start position", req.start_position),
                ));
            }
        };
        let spec = SubscriptionSpec {
            name: req.name,
            topic: req.topic,
            ack_deadline_ms: (req.ack_deadline_ms != 0).then_some(req.ack_deadline_ms),
            retry: convert::retry_policy(req.retry_policy),
            dead_letter: convert::dead_letter_policy(req.dead_letter_policy),
            from_earliest,
        };
        let sub = self
            .broker
            .create_subscription(spec)
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(convert::subscription(&sub)))
    }

    async fn get_subscription(
        &self,
        request: Request<v1::GetSubscriptionRequest>,
    ) -> Result<Response<v1::Subscription>, Status> {
        let req = request.into_inner();
        name("name", &req.name)?;
        let sub = self
            .broker
            .subscription(&req.name)
            .map_err(status::to_status)?;
        Ok(Response::new(convert::subscription(&sub)))
    }

    async fn list_subscriptions(
        &self,
        request: Request<v1::ListSubscriptionsRequest>,
    ) -> Result<Response<v1::ListSubscriptionsResponse>, Status> {
        let req = request.into_inner();
        let topic = if req.topic.is_empty() {
            None
        } else {
            name("topic", &req.topic)?;
            Some(req.topic.as_str())
        };
        let subs = self
            .broker
            .subscriptions(topic)
            .map_err(status::to_status)?;
        Ok(Response::new(v1::ListSubscriptionsResponse {
            subscriptions: subs.iter().map(|s| convert::subscription(s)).collect(),
        }))
    }

    async fn update_subscription(
        &self,
        request: Request<v1::UpdateSubscriptionRequest>,
    ) -> Result<Response<v1::Subscription>, Status> {
        let req = request.into_inner();
        let Some(sub) = req.subscription else {
            return Err(status::invalid("subscription", "is required"));
        };
        name("subscription.name", &sub.name)?;
        if req.update_mask.is_empty() {
            return Err(status::invalid(
                "update_mask",
                "must name at least one field",
            ));
        }
        let mut update = SubscriptionUpdate::default();
        for field in &req.update_mask {
            match field.as_str() {
                "ack_deadline_ms" => {
                    update.ack_deadline_ms =
                        Some((sub.ack_deadline_ms != 0).then_some(sub.ack_deadline_ms))
                }
                "retry_policy" => update.retry = Some(convert::retry_policy(sub.retry_policy)),
                "dead_letter_policy" => {
                    update.dead_letter =
                        Some(convert::dead_letter_policy(sub.dead_letter_policy.clone()))
                }
                other => {
                    return Err(status::invalid(
                        "update_mask",
                        format!(
                            "{} cannot be updated; use ack_deadline_ms, retry_policy or dead_letter_policy",
                            shown(other)
                        ),
                    ));
                }
            }
        }
        let sub = self
            .broker
            .update_subscription(&sub.name, update)
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(convert::subscription(&sub)))
    }

    async fn delete_subscription(
        &self,
        request: Request<v1::DeleteSubscriptionRequest>,
    ) -> Result<Response<v1::DeleteSubscriptionResponse>, Status> {
        let req = request.into_inner();
        name("name", &req.name)?;
        self.broker
            .delete_subscription(&req.name)
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(v1::DeleteSubscriptionResponse {}))
    }

    async fn purge_subscription(
        &self,
        request: Request<v1::PurgeSubscriptionRequest>,
    ) -> Result<Response<v1::PurgeSubscriptionResponse>, Status> {
        let req = request.into_inner();
        name("name", &req.name)?;
        let sub = self
            .broker
            .subscription(&req.name)
            .map_err(status::to_status)?;
        let purged_messages = sub.purge().await.map_err(status::to_status)?;
        Ok(Response::new(v1::PurgeSubscriptionResponse {
            purged_messages,
        }))
    }

    async fn get_subscription_stats(
        &self,
        request: Request<v1::GetSubscriptionStatsRequest>,
    ) -> Result<Response<v1::SubscriptionStats>, Status> {
        let req = request.into_inner();
        name("name", &req.name)?;
        let sub = self
            .broker
            .subscription(&req.name)
            .map_err(status::to_status)?;
        let s = sub.stats();
        Ok(Response::new(v1::SubscriptionStats {
            subscription: req.name,
            backlog_messages: s.backlog_messages,
            backlog_bytes: s.backlog_bytes,
            in_flight_messages: s.in_flight_messages,
            dead_lettered_messages: s.dead_lettered_messages,
            oldest_unacked_age_ms: s.oldest_unacked_age_ms,
            ack_floor_offset: s.ack_floor,
            dropped_by_retention: s.dropped_by_retention,
        }))
    }

    async fn get_topic_stats(
        &self,
        request: Request<v1::GetTopicStatsRequest>,
    ) -> Result<Response<v1::TopicStats>, Status> {
        let req = request.into_inner();
        name("name", &req.name)?;
        let s = self
            .broker
            .topic_stats(&req.name)
            .map_err(status::to_status)?;
        Ok(Response::new(v1::TopicStats {
            topic: req.name,
            first_offset: s.first_offset,
            next_offset: s.next_offset,
            retained_messages: s.next_offset - s.first_offset,
            retained_bytes: s.retained_bytes,
            segments: s.segments,
            subscriptions: s.subscriptions,
        }))
    }

    async fn get_message_status(
        &self,
        request: Request<v1::GetMessageStatusRequest>,
    ) -> Result<Response<v1::MessageStatus>, Status> {
        let req = request.into_inner();
        name("topic", &req.topic)?;
        let id = parse_message_id("message_id", &req.message_id)?;
        let status = self
            .broker
            .message_status(&req.topic, id)
            .await
            .map_err(status::to_status)?;
        let subscriptions = status
            .subscriptions
            .into_iter()
            .map(|(subscription, state, redrive)| {
                let mut out = v1::SubscriptionMessageStatus {
                    subscription,
                    redrive: match redrive {
                        None => v1::Redrive::None,
                        Some(Redrive::Unchanged) => v1::Redrive::Unchanged,
                        Some(Redrive::Replaced) => v1::Redrive::Replaced,
                    } as i32,
                    ..Default::default()
                };
                match state {
                    MessageState::NotSubscribed => {
                        out.state = v1::MessageState::NotSubscribed as i32
                    }
                    MessageState::Pending {
                        attempts,
                        last_nack,
                    } => {
                        out.state = v1::MessageState::Pending as i32;
                        out.delivery_attempt = attempts;
                        set_last_nack(&mut out, last_nack);
                    }
                    MessageState::InFlight {
                        attempt,
                        deadline_us,
                        last_nack,
                    } => {
                        out.state = v1::MessageState::InFlight as i32;
                        out.delivery_attempt = attempt;
                        out.lease_deadline = Some(convert::timestamp_us(deadline_us));
                        set_last_nack(&mut out, last_nack);
                    }
                    MessageState::Acked => out.state = v1::MessageState::Acked as i32,
                    MessageState::DeadLettered {
                        reason,
                        reason_text,
                        attempts,
                        last_nack,
                    } => {
                        out.state = v1::MessageState::DeadLettered as i32;
                        out.delivery_attempt = attempts;
                        out.dead_letter_reason = convert::reason(reason) as i32;
                        out.dead_letter_reason_text = reason_text;
                        set_last_nack(&mut out, last_nack);
                    }
                }
                out
            })
            .collect();
        Ok(Response::new(v1::MessageStatus {
            message_id: req.message_id,
            publish_time: status.publish_time_us.map(convert::timestamp_us),
            subscriptions,
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<v1::ListDeadLettersRequest>,
    ) -> Result<Response<v1::ListDeadLettersResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.subscription)?;
        let max = match req.max {
            0 => DEAD_LETTER_PAGE_DEFAULT,
            n if n <= DEAD_LETTER_PAGE_MAX => n,
            n => {
                return Err(status::invalid(
                    "max",
                    format!("{n} is over {DEAD_LETTER_PAGE_MAX}"),
                ));
            }
        };
        let sub = self
            .broker
            .subscription(&req.subscription)
            .map_err(status::to_status)?;
        let from = if req.page_token.is_empty() {
            Offset(0)
        } else {
            sub.dead_letter_page_from(&req.page_token).ok_or_else(|| {
                status::invalid(
                    "page_token",
                    "is not a token this subscription's listing issued",
                )
            })?
        };
        // A page reads the dead-letter log: off the runtime's threads.
        let reader = sub.clone();
        let (page, next) =
            tokio::task::spawn_blocking(move || reader.dead_letters(from, max as usize))
                .await
                .map_err(|_| Status::unavailable("the broker is shutting down"))?
                .map_err(status::to_status)?;
        Ok(Response::new(v1::ListDeadLettersResponse {
            dead_letters: page
                .iter()
                .map(|dl| convert::dead_letter(dl, &req.subscription))
                .collect(),
            next_page_token: next
                .map(|o| sub.dead_letter_page_token(o))
                .unwrap_or_default(),
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<v1::RedriveDeadLettersRequest>,
    ) -> Result<Response<v1::RedriveDeadLettersResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.subscription)?;
        if req.message_ids.len() > REDRIVE_IDS_MAX {
            return Err(status::invalid(
                "message_ids",
                format!(
                    "has {} ids; at most {REDRIVE_IDS_MAX}",
                    req.message_ids.len()
                ),
            ));
        }
        let message_ids = req
            .message_ids
            .iter()
            .map(|id| parse_message_id("message_ids", id))
            .collect::<Result<_, _>>()?;
        let reason = req.reason.map(|r| parse_reason("reason", r)).transpose()?;
        let replacement = req.replacement.map(|r| Replacement {
            data: r.data,
            attributes: r
                .replace_attributes
                .then(|| convert::attributes(r.attributes)),
        });
        let redriven = self
            .broker
            .redrive(
                &req.subscription,
                RedriveFilter {
                    message_ids,
                    reason,
                    replacement,
                },
            )
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(v1::RedriveDeadLettersResponse { redriven }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<v1::PurgeDeadLettersRequest>,
    ) -> Result<Response<v1::PurgeDeadLettersResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.subscription)?;
        let purged = self
            .broker
            .purge_dead_letters(&req.subscription)
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(v1::PurgeDeadLettersResponse { purged }))
    }

    async fn get_broker_stats(
        &self,
        _: Request<v1::GetBrokerStatsRequest>,
    ) -> Result<Response<v1::BrokerStats>, Status> {
        let s = self.broker.broker_stats();
        Ok(Response::new(v1::BrokerStats {
            version: env!("CARGO_PKG_VERSION").to_string(),
            resident_memory_bytes: s.resident_memory_bytes,
            data_dir_bytes: s.data_dir_bytes,
            uptime_ms: s.uptime_ms,
            topics: s.topics,
            subscriptions: s.subscriptions,
            fsync_mode: s.fsync,
            memory_max_bytes: s.memory_max_bytes,
            tail_cache_bytes: s.memory.cache_bytes,
            pending_append_bytes: s.memory.appends_bytes,
            queued_delivery_bytes: s.memory.deliveries_bytes,
            nack_reason_bytes: s.memory.notes_bytes,
        }))
    }
}

//! What a subscription reports: its figures, and where one message stands
//! in it (following a redriven copy and the dead-letter queue).

use super::{Core, MessageState, Subscription, SubscriptionStats, instant_to_unix_us, now_us};
use crate::broker::dead_letter::Redrive;
use crate::broker::error::Result;
use crate::storage::{Offset, ReadLimits, StorageError};

impl Subscription {
    /// Figures for the stats RPC.
    pub fn stats(&self) -> SubscriptionStats {
        let next = self.topic.log.next_offset().0;
        let (floor, backlog, in_flight, dlq_floor, dlq_removed, dropped) = {
            let core = self.core.lock();
            (
                core.state.settled.floor(),
                self.backlog_messages(&core, next),
                core.leases.len() as u64,
                core.state.dlq_removed.floor(),
                core.state.dlq_removed.count_above_floor(),
                core.state.dropped_by_retention,
            )
        };
        let oldest = if floor < next {
            self.read_one(floor)
                .ok()
                .flatten()
                .map(|r| now_us().saturating_sub(r.publish_time_us) / 1000)
        } else {
            None
        };
        SubscriptionStats {
            backlog_messages: backlog,
            backlog_bytes: if backlog == 0 {
                0
            } else {
                self.topic.log.bytes_from(Offset(floor))
            },
            in_flight_messages: in_flight,
            dead_lettered_messages: self
                .dlq
                .next_offset()
                .0
                .saturating_sub(dlq_floor)
                .saturating_sub(dlq_removed),
            oldest_unacked_age_ms: oldest,
            ack_floor: floor,
            dropped_by_retention: dropped,
        }
    }

    /// In flight or pending, if the record at `offset` is unsettled.
    fn unsettled_state(core: &Core, offset: u64) -> Option<MessageState> {
        let last_nack = core.state.nack_note(offset).cloned();
        if let Some(lease) = core.leases.get(&offset) {
            return Some(MessageState::InFlight {
                attempt: lease.attempt,
                deadline_us: instant_to_unix_us(lease.deadline),
                last_nack,
            });
        }
        (!core.state.settled.contains(offset)).then(|| MessageState::Pending {
            attempts: core.attempts(offset),
            last_nack,
        })
    }

    /// Where message `message_id` (first published at that offset) is for
    /// this subscription: the original record's state, else a dead letter,
    /// else a redriven copy still waiting, else acked.
    pub fn message_state(&self, message_id: u64) -> Result<(MessageState, Option<Redrive>)> {
        if message_id < self.def.read().start_offset {
            return Ok((MessageState::NotSubscribed, None));
        }
        if let Some(state) = Self::unsettled_state(&self.core.lock(), message_id) {
            return Ok((state, None));
        }
        if let Some(dl) = self.dead_letter_of(message_id)? {
            let state = MessageState::DeadLettered {
                reason: dl.reason,
                reason_text: dl.reason_text,
                attempts: dl.delivery_attempts,
                last_nack: dl.last_nack,
            };
            return Ok((state, dl.redrive));
        }
        // A redriven copy lives at a later offset, unsettled, within the
        // unacked window above the floor (or just past it).
        let (floor, my_id) = (self.ack_floor().0, self.id());
        let end = self
            .topic
            .log
            .next_offset()
            .0
            .min(floor.saturating_add(self.window_max));
        let mut at = Offset(floor);
        while at.0 < end {
            let batch = match self.topic.log.read(
                at,
                ReadLimits {
                    records_max: 1000,
                    bytes_max: 4 << 20,
                },
            ) {
                Ok(b) => b,
                Err(StorageError::Corrupt { next_readable, .. }) => {
                    at = next_readable;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if batch.records.is_empty() {
                break;
            }
            for r in batch.records.iter().filter(|r| r.offset.0 < end) {
                if r.target.is_some_and(|t| t.subscription == my_id) && r.message_id == message_id {
                    if let Some(state) = Self::unsettled_state(&self.core.lock(), r.offset.0) {
                        return Ok((state, Redrive::of(r)));
                    }
                }
            }
            at = batch.next;
        }
        Ok((MessageState::Acked, None))
    }
}

//! The Subscriber service: Pull, StreamingPull, Acknowledge,
//! ModifyAckDeadline and Nack.
//!
//! A StreamingPull stream is a spawned task feeding a bounded channel: it
//! leases messages up to the stream's flow-control limits, applies the
//! acks, nacks and deadline changes the client sends, and on any exit
//! releases the stream's leases so their messages are redelivered at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::api::pb::v1::{self, subscriber_server::Subscriber};
use crate::api::{convert, status};
use crate::broker::config::{
    ACK_DEADLINE_MS_MAX, ACK_DEADLINE_MS_MIN, ACK_IDS_PER_REQUEST_MAX, DELIVERY_RESPONSE_BYTES_MAX,
    PULL_MESSAGES_MAX, PULL_WAIT_MS_MAX, REASON_BYTES_MAX, STREAM_OUTSTANDING_BYTES_DEFAULT,
    STREAM_OUTSTANDING_MESSAGES_DEFAULT, STREAM_OUTSTANDING_MESSAGES_MAX,
};
use crate::broker::memory::{DeliveryQueue, DeliveryReservation, STREAM_QUEUED_BYTES_MAX};
use crate::broker::subscription::{Leased, NackKind, PULL_CONSUMER, frame_bytes};
use crate::broker::{AckId, AckOutcome, Broker, ConsumerId, LeaseLimits, Subscription};
use crate::storage::AppendTicket;

/// Responses buffered per stream before the stream task waits for the
/// client to read.
const STREAM_CHANNEL_CAPACITY: usize = 16;
/// How often a stream with no credit re-checks (lease expiry frees credit).
const STREAM_RECHECK: Duration = Duration::from_millis(50);

/// Serves `courier.v1.Subscriber` over a [`Broker`].
#[derive(Debug, Clone)]
pub struct SubscriberService {
    broker: Broker,
}

impl SubscriberService {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    fn subscription(&self, name: &str) -> Result<Arc<Subscription>, Status> {
        crate::broker::config::check_name("subscription", name).map_err(status::to_status)?;
        if self.broker.is_shutting_down() {
            return Err(Status::unavailable("the broker is shutting down"));
        }
        self.broker.subscription(name).map_err(status::to_status)
    }
}

fn check_ack_ids(field: &str, ids: &[String]) -> Result<Vec<Option<AckId>>, Status> {
    if ids.is_empty() {
        return Err(status::invalid(field, "must contain at least one ack id"));
    }
    if ids.len() > ACK_IDS_PER_REQUEST_MAX {
        return Err(status::invalid(
            field,
            format!(
                "has {} ack ids; at most {ACK_IDS_PER_REQUEST_MAX}",
                ids.len()
            ),
        ));
    }
    Ok(ids.iter().map(|s| s.parse().ok()).collect())
}

fn check_deadline(field: &str, ms: u64, zero_ok: bool) -> Result<Duration, Status> {
    if (ms == 0 && zero_ok) || (ACK_DEADLINE_MS_MIN..=ACK_DEADLINE_MS_MAX).contains(&ms) {
        return Ok(Duration::from_millis(ms));
    }
    Err(status::invalid(
        field,
        format!(
            "{ms} is outside {ACK_DEADLINE_MS_MIN}..={ACK_DEADLINE_MS_MAX}{}",
            if zero_ok { " (or 0 to nack)" } else { "" }
        ),
    ))
}

fn check_reason(field: &str, reason: &str) -> Result<(), Status> {
    if reason.len() > REASON_BYTES_MAX {
        return Err(status::invalid(
            field,
            format!("is {} bytes; at most {REASON_BYTES_MAX}", reason.len()),
        ));
    }
    Ok(())
}

/// One result per ack id, in order; the request's strings are moved into
/// the results, not copied.
fn results(ids: Vec<String>, outcomes: Vec<AckOutcome>) -> Vec<v1::AckResult> {
    ids.into_iter()
        .zip(outcomes)
        .map(|(ack_id, o)| v1::AckResult {
            ack_id,
            status: match o {
                AckOutcome::Ok => v1::AckStatus::Ok,
                AckOutcome::Unknown => v1::AckStatus::Unknown,
                AckOutcome::Stale => v1::AckStatus::Stale,
                AckOutcome::AlreadySettled => v1::AckStatus::AlreadySettled,
            } as i32,
        })
        .collect()
}

/// Flow-control settings of one stream.
#[derive(Debug, Clone, Copy)]
struct StreamSettings {
    deadline: Duration,
    messages_max: u64,
    bytes_max: u64,
}

impl StreamSettings {
    fn update(&mut self, req: &v1::StreamingPullRequest) -> Result<(), Status> {
        if let Some(ms) = req.stream_ack_deadline_ms {
            self.deadline = check_deadline("stream_ack_deadline_ms", ms, false)?;
        }
        if let Some(n) = req.max_outstanding_messages {
            if !(1..=STREAM_OUTSTANDING_MESSAGES_MAX).contains(&n) {
                return Err(status::invalid(
                    "max_outstanding_messages",
                    format!("{n} is outside 1..={STREAM_OUTSTANDING_MESSAGES_MAX}"),
                ));
            }
            self.messages_max = n;
        }
        if let Some(n) = req.max_outstanding_bytes {
            if n == 0 {
                return Err(status::invalid(
                    "max_outstanding_bytes",
                    "must be at least 1",
                ));
            }
            self.bytes_max = n;
        }
        Ok(())
    }

    /// Most messages one response carries: half the stream's window
    /// (rounded up), so while the client works through one batch and acks
    /// it, the next is already on its way. Handing out the whole window
    /// at once makes the stream wait for each round trip in turn.
    fn batch_messages_max(&self) -> usize {
        usize::try_from(self.messages_max.div_ceil(2)).unwrap_or(usize::MAX)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::StreamingPullResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Subscriber for SubscriberService {
    async fn pull(
        &self,
        request: Request<v1::PullRequest>,
    ) -> Result<Response<v1::PullResponse>, Status> {
        let req = request.into_inner();
        let sub = self.subscription(&req.subscription)?;
        if !(1..=PULL_MESSAGES_MAX).contains(&req.max_messages) {
            return Err(status::invalid(
                "max_messages",
                format!("{} is outside 1..={PULL_MESSAGES_MAX}", req.max_messages),
            ));
        }
        if req.wait_ms > PULL_WAIT_MS_MAX {
            return Err(status::invalid(
                "wait_ms",
                format!("{} is over {PULL_WAIT_MS_MAX}", req.wait_ms),
            ));
        }
        let until = Instant::now() + Duration::from_millis(req.wait_ms);
        let mut topic = sub.watch_topic();
        loop {
            topic.borrow_and_update();
            let notified = sub.wake_signal().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Room for the response in the broker's memory budget first;
            // without it, wait as if nothing were ready.
            let memory = self.broker.memory();
            let reserved = memory.try_reserve_deliveries(None, DELIVERY_RESPONSE_BYTES_MAX);
            let starved = reserved.is_none();
            if let Some(mut reservation) = reserved {
                let limits = LeaseLimits {
                    messages_max: req.max_messages as usize,
                    bytes_max: u64::MAX,
                    allow_oversize: true,
                    batch_bytes_max: DELIVERY_RESPONSE_BYTES_MAX,
                    deadline: Duration::from_millis(sub.def().ack_deadline_ms),
                };
                let deliveries = sub
                    .lease(PULL_CONSUMER, limits)
                    .await
                    .map_err(status::to_status)?;
                if !deliveries.is_empty() {
                    let bytes = frame_bytes(&deliveries);
                    memory.grow_deliveries(&mut reservation, bytes).await;
                    reservation.shrink_to(bytes);
                    return Ok(Response::new(v1::PullResponse {
                        received_messages: deliveries.iter().map(convert::received).collect(),
                    }));
                }
            }
            if self.broker.is_shutting_down() {
                return Err(Status::unavailable("the broker is shutting down"));
            }
            if Instant::now() >= until {
                return Ok(Response::new(v1::PullResponse::default()));
            }
            tokio::select! {
                _ = topic.changed(), if !starved => {}
                _ = notified => {}
                _ = tokio::time::sleep(STREAM_RECHECK), if starved => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    type StreamingPullStream = ResponseStream;

    async fn streaming_pull(
        &self,
        request: Request<Streaming<v1::StreamingPullRequest>>,
    ) -> Result<Response<Self::StreamingPullStream>, Status> {
        let mut inbound = request.into_inner();
        let first = match inbound.next().await {
            Some(Ok(first)) => first,
            Some(Err(status)) => return Err(status),
            None => {
                return Err(status::invalid(
                    "subscription",
                    "the stream ended before its first request",
                ));
            }
        };
        let sub = self.subscription(&first.subscription)?;
        let mut settings = StreamSettings {
            deadline: Duration::from_millis(sub.def().ack_deadline_ms),
            messages_max: STREAM_OUTSTANDING_MESSAGES_DEFAULT,
            bytes_max: STREAM_OUTSTANDING_BYTES_DEFAULT,
        };
        settings.update(&first)?;
        let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CAPACITY);
        let consumer = self.broker.new_consumer_id();
        sub.register_consumer(consumer);
        let stream = StreamTask {
            broker: self.broker.clone(),
            sub,
            consumer,
            settings,
            queue: DeliveryQueue::new(STREAM_QUEUED_BYTES_MAX),
            tx,
        };
        tokio::spawn(stream.run(first, inbound));
        // The transport takes a response here. Its memory stays reserved
        // until the transport asks for the next one: by then the response
        // has left the encoder and at most the HTTP/2 send buffer holds
        // part of it.
        let mut handed_over: Option<DeliveryReservation> = None;
        let responses = ReceiverStream::new(rx).map(move |queued: Queued| {
            // Gives back the reservation of the response before this one.
            drop(std::mem::replace(&mut handed_over, queued.held));
            queued.response
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn acknowledge(
        &self,
        request: Request<v1::AcknowledgeRequest>,
    ) -> Result<Response<v1::AcknowledgeResponse>, Status> {
        let req = request.into_inner();
        let sub = self.subscription(&req.subscription)?;
        let ids = check_ack_ids("ack_ids", &req.ack_ids)?;
        let outcomes = sub.ack(&ids).await.map_err(status::to_status)?;
        Ok(Response::new(v1::AcknowledgeResponse {
            results: results(req.ack_ids, outcomes),
        }))
    }

    async fn modify_ack_deadline(
        &self,
        request: Request<v1::ModifyAckDeadlineRequest>,
    ) -> Result<Response<v1::ModifyAckDeadlineResponse>, Status> {
        let req = request.into_inner();
        let sub = self.subscription(&req.subscription)?;
        let ids = check_ack_ids("ack_ids", &req.ack_ids)?;
        let deadline = check_deadline("ack_deadline_ms", req.ack_deadline_ms, true)?;
        let outcomes = sub
            .modify_deadline(&ids, deadline)
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(v1::ModifyAckDeadlineResponse {
            results: results(req.ack_ids, outcomes),
        }))
    }

    async fn nack(
        &self,
        request: Request<v1::NackRequest>,
    ) -> Result<Response<v1::NackResponse>, Status> {
        let req = request.into_inner();
        let sub = self.subscription(&req.subscription)?;
        let ids = check_ack_ids("ack_ids", &req.ack_ids)?;
        check_reason("reason", &req.reason)?;
        let how = NackKind {
            reject: req.reject,
            reason: &req.reason,
        };
        let outcomes = sub.nack(&ids, how).await.map_err(status::to_status)?;
        Ok(Response::new(v1::NackResponse {
            results: results(req.ack_ids, outcomes),
        }))
    }
}

/// Something for the stream's sender task to send, in order.
enum Outgoing {
    /// Deliveries, once their attempt numbers are durable, with the memory
    /// reserved for them.
    Deliveries(Leased, DeliveryReservation),
    /// Ack results, once the acks are durable.
    Results(Option<AppendTicket>, Vec<v1::AckResult>),
}

/// Outgoing items queued per stream before its loop waits.
const STREAM_OUTGOING_CAPACITY: usize = 64;

/// One StreamingPull stream's task.
///
/// The loop applies client requests and takes leases in memory; a sender
/// task waits for each item's journal entry to be durable and then sends
/// it, in order. So the loop leases the next batch while the journal
/// syncs the last one, and nothing is sent before it is durable.
struct StreamTask {
    broker: Broker,
    sub: Arc<Subscription>,
    consumer: ConsumerId,
    settings: StreamSettings,
    /// This stream's bound on bytes leased and not yet taken by the
    /// transport.
    queue: DeliveryQueue,
    tx: mpsc::Sender<Queued>,
}

/// A response waiting for the transport, holding the memory reserved for
/// its messages until the transport takes it.
struct Queued {
    response: Result<v1::StreamingPullResponse, Status>,
    held: Option<DeliveryReservation>,
}

impl Queued {
    fn status(status: Status) -> Self {
        Self {
            response: Err(status),
            held: None,
        }
    }
}

/// A response and the memory reserved for it.
type Built = (v1::StreamingPullResponse, Option<DeliveryReservation>);

/// An outgoing item on its way to becoming a response.
type Resolving = Pin<Box<dyn Future<Output = Result<Built, Status>> + Send>>;

/// Waits for `item` to be durable and builds its response.
fn resolve(item: Outgoing) -> Resolving {
    Box::pin(async move {
        match item {
            Outgoing::Deliveries(leased, reservation) => {
                let deliveries = leased.durable().await.map_err(status::to_status)?;
                let response = v1::StreamingPullResponse {
                    received_messages: deliveries.iter().map(convert::received).collect(),
                    ack_results: Vec::new(),
                };
                Ok((response, Some(reservation)))
            }
            Outgoing::Results(ticket, ack_results) => {
                if let Some(ticket) = ticket {
                    ticket
                        .wait()
                        .await
                        .map_err(|e| status::to_status(e.into()))?;
                }
                let response = v1::StreamingPullResponse {
                    received_messages: Vec::new(),
                    ack_results,
                };
                Ok((response, None))
            }
        }
    })
}

/// Sends queued items once durable, in order; ends at the first failure.
///
/// Ack results queued next to a batch of deliveries and already durable
/// (the same journal sync usually covers both) go out in the same
/// response, so the client reads one message instead of several.
async fn send_in_order(mut items: mpsc::Receiver<Outgoing>, tx: mpsc::Sender<Queued>) {
    let mut next: Option<Resolving> = None;
    loop {
        let resolving = match next.take() {
            Some(r) => r,
            None => match items.recv().await {
                Some(item) => resolve(item),
                None => return,
            },
        };
        let (mut response, mut held) = match resolving.await {
            Ok(built) => built,
            Err(status) => {
                let _ = tx.send(Queued::status(status)).await;
                return;
            }
        };
        // Computed only if something is queued to merge: it walks every
        // message of the response.
        let mut bytes = None;
        let mut failed = None;
        while let Ok(item) = items.try_recv() {
            let mut resolving = resolve(item);
            match std::future::poll_fn(|cx| Poll::Ready(resolving.as_mut().poll(cx))).await {
                Poll::Ready(Ok((more, more_held))) => {
                    // One batch of deliveries per response, so the batches
                    // the stream task sized for pipelining stay apart.
                    let both_deliver = !response.received_messages.is_empty()
                        && !more.received_messages.is_empty();
                    let fits = !both_deliver && {
                        let so_far = *bytes.get_or_insert_with(|| response.encoded_len() as u64);
                        let total = so_far + more.encoded_len() as u64;
                        bytes = Some(total);
                        total <= DELIVERY_RESPONSE_BYTES_MAX
                    };
                    if !fits {
                        next = Some(Box::pin(std::future::ready(Ok((more, more_held)))));
                        break;
                    }
                    response.received_messages.extend(more.received_messages);
                    response.ack_results.extend(more.ack_results);
                    if let Some(more_held) = more_held {
                        match &mut held {
                            Some(held) => held.absorb(more_held),
                            None => held = Some(more_held),
                        }
                    }
                }
                Poll::Ready(Err(status)) => {
                    failed = Some(status);
                    break;
                }
                Poll::Pending => {
                    next = Some(resolving);
                    break;
                }
            }
        }
        let queued = Queued {
            response: Ok(response),
            held,
        };
        if tx.send(queued).await.is_err() {
            return; // the client went away
        }
        if let Some(status) = failed {
            let _ = tx.send(Queued::status(status)).await;
            return;
        }
    }
}

impl StreamTask {
    async fn run(
        self,
        first: v1::StreamingPullRequest,
        mut inbound: Streaming<v1::StreamingPullRequest>,
    ) {
        let name = self.sub.name();
        let (out_tx, out_rx) = mpsc::channel(STREAM_OUTGOING_CAPACITY);
        let sender = tokio::spawn(send_in_order(out_rx, self.tx.clone()));
        let mut task = self;
        let end = task.serve(first, &mut inbound, &out_tx).await;
        // Let queued items go out before the final status.
        drop(out_tx);
        let _ = sender.await;
        if let Err(status) = end {
            let _ = task.tx.send(Queued::status(status)).await;
        }
        task.sub.release_consumer(task.consumer).await;
        task.broker.memory().stream_ended();
        tracing::debug!(subscription = %name, consumer = task.consumer, "stream ended");
    }

    /// Runs until the client half-closes or goes away (Ok) or an error
    /// ends the stream.
    async fn serve(
        &mut self,
        first: v1::StreamingPullRequest,
        inbound: &mut Streaming<v1::StreamingPullRequest>,
        out: &mpsc::Sender<Outgoing>,
    ) -> Result<(), Status> {
        self.apply(first, out).await?;
        let mut topic = self.sub.watch_topic();
        let sub = self.sub.clone();
        loop {
            if self.broker.is_shutting_down() {
                return Err(Status::unavailable("the broker is shutting down"));
            }
            if self.sub.is_deleted() {
                return Err(Status::not_found(format!(
                    "subscription {:?} was deleted",
                    self.sub.name()
                )));
            }
            topic.borrow_and_update();
            let notified = sub.wake_signal().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let held = self.sub.outstanding(self.consumer);
            let has_credit =
                held.messages < self.settings.messages_max && held.bytes < self.settings.bytes_max;
            let mut sent = false;
            // Room for a batch in the broker's memory budget and in this
            // stream's queue, reserved before the batch is read: a client
            // that stops reading stops being sent to.
            let reserved = if has_credit {
                self.broker
                    .memory()
                    .try_reserve_deliveries(Some(&self.queue), DELIVERY_RESPONSE_BYTES_MAX)
            } else {
                None
            };
            let can_lease = reserved.is_some();
            if let Some(mut reservation) = reserved {
                let limits = LeaseLimits {
                    messages_max: usize::try_from(self.settings.messages_max - held.messages)
                        .unwrap_or(usize::MAX)
                        .min(self.settings.batch_messages_max()),
                    bytes_max: self.settings.bytes_max - held.bytes,
                    allow_oversize: held.messages == 0,
                    batch_bytes_max: DELIVERY_RESPONSE_BYTES_MAX,
                    deadline: self.settings.deadline,
                };
                let leased = self
                    .sub
                    .lease_now(self.consumer, limits)
                    .await
                    .map_err(status::to_status)?;
                if !leased.is_empty() {
                    sent = true;
                    let bytes = leased.frame_bytes();
                    self.broker
                        .memory()
                        .grow_deliveries(&mut reservation, bytes)
                        .await;
                    reservation.shrink_to(bytes);
                    if out
                        .send(Outgoing::Deliveries(leased, reservation))
                        .await
                        .is_err()
                    {
                        return Ok(()); // the sender stopped: the client went away
                    }
                }
            }
            // After a delivery, poll the client and come straight back;
            // otherwise wait for new work (or re-check credit soon, since
            // lease expiry frees it).
            let recheck = if sent { Duration::ZERO } else { STREAM_RECHECK };
            tokio::select! {
                biased;
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => self.apply(req, out).await?,
                    Some(Err(_)) | None => return Ok(()),
                },
                _ = self.tx.closed() => return Ok(()),
                _ = topic.changed(), if can_lease && !sent => {}
                _ = &mut notified, if !sent => {}
                _ = tokio::time::sleep(recheck) => {}
            }
        }
    }

    /// Applies one client request: settings, acks, deadline changes, nacks.
    async fn apply(
        &mut self,
        mut req: v1::StreamingPullRequest,
        out: &mpsc::Sender<Outgoing>,
    ) -> Result<(), Status> {
        if !req.subscription.is_empty() && req.subscription != self.sub.name() {
            return Err(status::invalid(
                "subscription",
                "must be empty or the stream's subscription after the first request",
            ));
        }
        self.settings.update(&req)?;
        if req.modify_deadlines.len() > ACK_IDS_PER_REQUEST_MAX {
            return Err(status::invalid(
                "modify_deadlines",
                format!("at most {ACK_IDS_PER_REQUEST_MAX} per request"),
            ));
        }
        if req.nacks.len() > ACK_IDS_PER_REQUEST_MAX {
            return Err(status::invalid(
                "nacks",
                format!("at most {ACK_IDS_PER_REQUEST_MAX} per request"),
            ));
        }
        let mut ack_results = Vec::new();
        let mut ticket = None;
        if !req.ack_ids.is_empty() {
            let ids = check_ack_ids("ack_ids", &req.ack_ids)?;
            let (outcomes, t) = self.sub.ack_now_deferred(&ids).map_err(status::to_status)?;
            ticket = t;
            ack_results.extend(results(std::mem::take(&mut req.ack_ids), outcomes));
        }
        for m in &req.modify_deadlines {
            let deadline =
                check_deadline("modify_deadlines.ack_deadline_ms", m.ack_deadline_ms, true)?;
            let outcomes = self
                .sub
                .modify_deadline(&[m.ack_id.parse().ok()], deadline)
                .await
                .map_err(status::to_status)?;
            ack_results.extend(results(vec![m.ack_id.clone()], outcomes));
        }
        for n in &req.nacks {
            check_reason("nacks.reason", &n.reason)?;
            let how = NackKind {
                reject: n.reject,
                reason: &n.reason,
            };
            let outcomes = self
                .sub
                .nack(&[n.ack_id.parse().ok()], how)
                .await
                .map_err(status::to_status)?;
            ack_results.extend(results(vec![n.ack_id.clone()], outcomes));
        }
        if !ack_results.is_empty()
            && out
                .send(Outgoing::Results(ticket, ack_results))
                .await
                .is_err()
        {
            return Err(Status::cancelled("client went away"));
        }
        Ok(())
    }
}

//! [`Publisher`]: publish one message at a time and still share the
//! broker's group commits. Messages are gathered per topic into batches
//! and sent as requests of one `Publisher.PublishStream`, many in flight at
//! once; each `publish` call returns its message's id once the broker has
//! made it durable.
//!
//! A topic's batch is sent as soon as fewer than
//! `requests_in_flight_per_topic` (4) earlier requests of that topic wait
//! for their answers (so an idle publisher adds no delay), or once it is
//! full (count or bytes), or once its oldest message has waited
//! `batch_delay_max`. Under load a batch therefore gathers what arrives
//! while earlier ones are made durable: the broker's group commit,
//! continued in the client. (With one request in flight per topic,
//! several publishers on one topic fell into step with the broker's sync
//! rounds, each round carrying one publisher's batch; four keep every
//! round full.)

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use super::Client;
use crate::api::pb::v1::publisher_client::PublisherClient;
use crate::api::pb::v1::{PublishMessage, PublishStreamRequest, PublishStreamResponse};

/// How a [`Publisher`] batches and how much it keeps in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublisherSettings {
    /// Most messages per request, 1 to 1000 (the broker's limit).
    pub batch_messages_max: usize,
    /// A batch is sent once its messages' sizes (data, attributes and
    /// ordering key) reach this many bytes.
    pub batch_bytes_max: usize,
    /// Longest a message waits in its batch while an earlier request of its
    /// topic is unanswered.
    pub batch_delay_max: Duration,
    /// Requests of one topic that may be unanswered before its next batch
    /// waits to fill (or for `batch_delay_max`).
    pub requests_in_flight_per_topic: usize,
    /// Most messages given to `publish` and not yet answered; `publish`
    /// waits for room beyond it.
    pub outstanding_messages_max: usize,
    /// Most bytes of such messages.
    pub outstanding_bytes_max: usize,
}

impl Default for PublisherSettings {
    /// 100 messages or 1 MiB per batch, 4 requests of a topic in flight
    /// before a batch waits (1 ms at most), 10,000 messages or 64 MiB
    /// outstanding.
    fn default() -> Self {
        Self {
            batch_messages_max: 100,
            batch_bytes_max: 1024 * 1024,
            batch_delay_max: Duration::from_millis(1),
            requests_in_flight_per_topic: 4,
            outstanding_messages_max: 10_000,
            outstanding_bytes_max: 64 * 1024 * 1024,
        }
    }
}

/// A batching publisher over one `PublishStream` of a [`Client`]'s
/// connection. Cloning is cheap: clones share the batches and the stream.
/// Dropping the last clone sends what is batched and lets the answers
/// arrive; `publish` calls still waiting get them.
#[derive(Debug, Clone)]
pub struct Publisher {
    commands: mpsc::UnboundedSender<Command>,
    messages: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    settings: PublisherSettings,
}

#[derive(Debug)]
enum Command {
    Publish {
        topic: String,
        message: PublishMessage,
        waiter: Waiter,
    },
    Flush(oneshot::Sender<()>),
}

/// A `publish` call waiting for its answer, holding its share of the
/// outstanding limits.
#[derive(Debug)]
struct Waiter {
    answer: oneshot::Sender<Result<String, Status>>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl Publisher {
    /// A publisher over `client`'s connection. Must be called inside a
    /// Tokio runtime: it starts the task that owns the stream.
    ///
    /// # Panics
    /// If `settings` has a limit of 0, or more than 1000 messages per batch.
    pub fn new(client: &Client, settings: PublisherSettings) -> Publisher {
        assert!(
            (1..=1000).contains(&settings.batch_messages_max),
            "batch_messages_max must be 1 to 1000"
        );
        assert!(
            settings.batch_bytes_max > 0
                && settings.outstanding_messages_max > 0
                && settings.outstanding_bytes_max > 0,
            "publisher limits must be positive"
        );
        let (commands, rx) = mpsc::unbounded_channel();
        let task = Task {
            client: client.publisher(),
            settings,
            commands: rx,
            batches: HashMap::new(),
            stream: None,
            sent: VecDeque::new(),
            unanswered: HashMap::new(),
            flushes: Vec::new(),
            next_request: 1,
        };
        tokio::spawn(task.run());
        Publisher {
            commands,
            messages: Arc::new(Semaphore::new(settings.outstanding_messages_max)),
            bytes: Arc::new(Semaphore::new(settings.outstanding_bytes_max)),
            settings,
        }
    }

    /// Publishes one message to `topic` and returns its id once the broker
    /// has made it durable. Waits first while the outstanding limits are
    /// reached.
    ///
    /// # Errors
    /// The status the broker gave the message's batch (NOT_FOUND,
    /// INVALID_ARGUMENT naming `messages[i]…`, RESOURCE_EXHAUSTED, …):
    /// nothing of that batch was published. UNAVAILABLE when the broker shut
    /// down before reading the batch (not published; retry elsewhere or
    /// later). UNKNOWN when the stream broke after the batch was sent and
    /// before its answer: it may or may not have been published.
    ///
    /// # Cancel safety
    /// Cancelling after the message was handed over does not withdraw it.
    pub async fn publish(&self, topic: &str, message: PublishMessage) -> Result<String, Status> {
        let size = message_bytes(&message).clamp(1, self.settings.outstanding_bytes_max);
        let closed = || Status::cancelled("the publisher's task has stopped");
        let messages = self.messages.clone().acquire_owned().await;
        let bytes = self
            .bytes
            .clone()
            .acquire_many_owned(u32::try_from(size).unwrap_or(u32::MAX))
            .await;
        let (Ok(messages), Ok(bytes)) = (messages, bytes) else {
            return Err(closed());
        };
        let (answer, rx) = oneshot::channel();
        let command = Command::Publish {
            topic: topic.to_string(),
            message,
            waiter: Waiter {
                answer,
                _permits: (messages, bytes),
            },
        };
        self.commands.send(command).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Sends every batch now and waits until every message handed over
    /// before this call is answered.
    pub async fn flush(&self) {
        let (done, rx) = oneshot::channel();
        if self.commands.send(Command::Flush(done)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The bytes of a message that count towards batch and outstanding sizes.
fn message_bytes(m: &PublishMessage) -> usize {
    m.data.len()
        + m.ordering_key.len()
        + m.attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Messages gathered for one topic, not yet sent.
#[derive(Debug)]
struct Batch {
    messages: Vec<PublishMessage>,
    waiters: Vec<Waiter>,
    bytes: usize,
    /// When its first message came: it is sent by `batch_delay_max` after.
    since: Instant,
}

/// A request sent on the stream and not yet answered.
#[derive(Debug)]
struct Sent {
    request_id: u64,
    topic: String,
    waiters: Vec<Waiter>,
}

#[derive(Debug)]
struct Stream {
    requests: mpsc::UnboundedSender<PublishStreamRequest>,
    responses: Streaming<PublishStreamResponse>,
}

/// The task that owns the batches and the stream.
struct Task {
    client: PublisherClient<Channel>,
    settings: PublisherSettings,
    commands: mpsc::UnboundedReceiver<Command>,
    batches: HashMap<String, Batch>,
    stream: Option<Stream>,
    /// In request order, as the answers come.
    sent: VecDeque<Sent>,
    /// Requests of each topic in `sent`.
    unanswered: HashMap<String, usize>,
    /// Flushes waiting for every request up to an id to be answered.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    next_request: u64,
}

impl Task {
    async fn run(mut self) {
        let mut open = true;
        loop {
            if !open && self.batches.is_empty() && self.sent.is_empty() {
                break;
            }
            let due = self.batches.values().map(|b| b.since).min();
            let delay = self.settings.batch_delay_max;
            tokio::select! {
                command = self.commands.recv(), if open => match command {
                    Some(Command::Publish { topic, message, waiter }) => {
                        self.add(topic, message, waiter).await;
                    }
                    Some(Command::Flush(done)) => {
                        self.send_all().await;
                        self.flushes.push((self.next_request - 1, done));
                    }
                    None => {
                        open = false;
                        self.send_all().await;
                    }
                },
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now) + delay), if due.is_some() => {
                    self.send_due().await;
                }
                answer = next_answer(&mut self.stream) => match answer {
                    Ok(Some(response)) => {
                        if let Some(topic) = self.answer(response) {
                            // Its batch waited for this answer.
                            if self.may_send(&topic) {
                                self.send(topic).await;
                            }
                        }
                    }
                    Ok(None) => self.broken(None),
                    Err(status) => self.broken(Some(status)),
                },
            }
            self.finish_flushes();
        }
        self.finish_flushes();
    }

    /// Whether a batch of `topic` may go out before it is full.
    fn may_send(&self, topic: &str) -> bool {
        self.unanswered.get(topic).copied().unwrap_or(0)
            < self.settings.requests_in_flight_per_topic
    }

    /// Adds a message to its topic's batch, sending the batch once full.
    async fn add(&mut self, topic: String, message: PublishMessage, waiter: Waiter) {
        let size = message_bytes(&message);
        let full = {
            let batch = self.batches.entry(topic.clone()).or_insert_with(|| Batch {
                messages: Vec::new(),
                waiters: Vec::new(),
                bytes: 0,
                since: Instant::now(),
            });
            batch.messages.push(message);
            batch.waiters.push(waiter);
            batch.bytes += size;
            batch.messages.len() >= self.settings.batch_messages_max
                || batch.bytes >= self.settings.batch_bytes_max
        };
        if full || self.may_send(&topic) {
            self.send(topic).await;
        }
    }

    async fn send_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .batches
            .iter()
            .filter(|(_, b)| b.since + self.settings.batch_delay_max <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for topic in due {
            self.send(topic).await;
        }
    }

    async fn send_all(&mut self) {
        let topics: Vec<String> = self.batches.keys().cloned().collect();
        for topic in topics {
            self.send(topic).await;
        }
    }

    /// Sends `topic`'s batch on the stream, opening it if need be.
    async fn send(&mut self, topic: String) {
        let Some(batch) = self.batches.remove(&topic) else {
            return;
        };
        if self.stream.is_none() {
            match self.open().await {
                Ok(stream) => self.stream = Some(stream),
                Err(status) => {
                    for w in batch.waiters {
                        let _ = w.answer.send(Err(status.clone()));
                    }
                    return;
                }
            }
        }
        let request_id = self.next_request;
        self.next_request += 1;
        let request = PublishStreamRequest {
            topic: topic.clone(),
            messages: batch.messages,
            request_id,
        };
        let stream = self.stream.as_ref().expect("opened above");
        if stream.requests.send(request).is_err() {
            for w in batch.waiters {
                let _ = w.answer.send(Err(not_sent()));
            }
            return;
        }
        *self.unanswered.entry(topic.clone()).or_default() += 1;
        self.sent.push_back(Sent {
            request_id,
            topic,
            waiters: batch.waiters,
        });
    }

    async fn open(&mut self) -> Result<Stream, Status> {
        let (requests, rx) = mpsc::unbounded_channel();
        let responses = self
            .client
            .publish_stream(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Stream {
            requests,
            responses,
        })
    }

    /// Hands out the answer of the oldest request; returns its topic.
    fn answer(&mut self, response: PublishStreamResponse) -> Option<String> {
        let Some(sent) = self.sent.pop_front() else {
            self.broken(Some(Status::internal(
                "the broker answered a request that was not sent",
            )));
            return None;
        };
        if sent.request_id != response.request_id {
            let status = Status::internal(format!(
                "the broker answered request {} where {} was next",
                response.request_id, sent.request_id
            ));
            self.sent.push_front(sent);
            self.broken(Some(status));
            return None;
        }
        if let Some(n) = self.unanswered.get_mut(&sent.topic) {
            *n -= 1;
            if *n == 0 {
                self.unanswered.remove(&sent.topic);
            }
        }
        let topic = sent.topic.clone();
        hand_out(sent, response);
        Some(topic)
    }

    /// The stream ended (`None`: with OK) or failed: every unanswered
    /// request gets its outcome, and the next batch opens a new stream.
    fn broken(&mut self, end: Option<Status>) {
        self.stream = None;
        self.unanswered.clear();
        // A broker that shuts down answers every request it read before
        // ending the stream: the others were not published.
        let shut_down = end
            .as_ref()
            .is_some_and(|s| s.code() == Code::Unavailable && s.message() == SHUTTING_DOWN);
        let status = if shut_down {
            Status::unavailable(
                "the broker shut down before reading the message's batch: it was not published",
            )
        } else {
            let why = match &end {
                Some(s) => format!("{}: {}", s.code(), s.message()),
                None => "it ended".to_string(),
            };
            Status::unknown(format!(
                "the publish stream broke before the broker answered ({why}): the message may or may not have been published"
            ))
        };
        for sent in self.sent.drain(..) {
            for w in sent.waiters {
                let _ = w.answer.send(Err(status.clone()));
            }
        }
    }

    fn finish_flushes(&mut self) {
        let answered_below = self
            .sent
            .front()
            .map_or(self.next_request, |s| s.request_id);
        let mut i = 0;
        while i < self.flushes.len() {
            if self.flushes[i].0 < answered_below {
                let (_, done) = self.flushes.swap_remove(i);
                let _ = done.send(());
            } else {
                i += 1;
            }
        }
    }
}

/// The status message with which the broker ends streams at shutdown.
const SHUTTING_DOWN: &str = "the broker is shutting down";

fn not_sent() -> Status {
    Status::unavailable("the publish stream closed before the batch was sent: it was not published")
}

/// The next answer of the open stream (never resolves if none is open).
async fn next_answer(stream: &mut Option<Stream>) -> Result<Option<PublishStreamResponse>, Status> {
    match stream {
        Some(s) => s.responses.message().await,
        None => std::future::pending().await,
    }
}

/// Answers each message of an answered request.
fn hand_out(sent: Sent, response: PublishStreamResponse) {
    if response.code != 0 {
        let status = Status::new(Code::from(response.code), response.message);
        for w in sent.waiters {
            let _ = w.answer.send(Err(status.clone()));
        }
        return;
    }
    if response.message_ids.len() != sent.waiters.len() {
        let status = Status::internal(format!(
            "the broker returned {} ids for {} messages",
            response.message_ids.len(),
            sent.waiters.len()
        ));
        for w in sent.waiters {
            let _ = w.answer.send(Err(status.clone()));
        }
        return;
    }
    for (w, id) in sent.waiters.into_iter().zip(response.message_ids) {
        let _ = w.answer.send(Ok(id));
    }
}

//! A small Rust client for Courier, shared by the `courier` CLI, tests,
//! benches and examples: one gRPC [`Channel`] behind the three generated
//! service clients (Publisher, Subscriber, Admin), plus convenience methods
//! for the common calls. For anything else, take a generated client with
//! [`Client::publisher`], [`Client::subscriber`] or [`Client::admin`] and
//! call it directly; the `.proto` comments are the reference for semantics
//! and error codes. [`Publisher`] publishes one message at a time over a
//! `PublishStream`, batching them for the caller.

mod publisher;

pub use publisher::{Publisher, PublisherSettings};

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use crate::api::pb::v1::admin_client::AdminClient;
use crate::api::pb::v1::publisher_client::PublisherClient;
use crate::api::pb::v1::subscriber_client::SubscriberClient;
use crate::api::pb::v1::{
    AckResult, AcknowledgeRequest, CreateTopicRequest, NackRequest, PublishMessage, PublishRequest,
    PullRequest, ReceivedMessage, StreamingPullRequest, StreamingPullResponse, Subscription, Topic,
};

/// Largest gRPC message the client (and the server) sends or accepts: a
/// batch of messages at the default 10 MiB limit, or a broker configured
/// with larger messages, plus response overhead.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// HTTP/2 flow-control window of each stream, advertised by the client
/// and the server. The protocol's default of 64 KiB caps a stream at one
/// window per round trip; a StreamingPull response of 1,000 256-byte
/// messages is about 300 KiB.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// HTTP/2 flow-control window of a whole connection, shared by its streams.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// How long [`Client::connect`] waits for the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests a [`Client::streaming_pull`] stream can queue before
/// `Sender::send` waits.
const STREAM_REQUEST_QUEUE: usize = 64;

/// A connection to a Courier broker. Cloning is cheap: clones share the
/// underlying HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct Client {
    publisher: PublisherClient<Channel>,
    subscriber: SubscriberClient<Channel>,
    admin: AdminClient<Channel>,
}

impl Client {
    /// Connects to the broker at `url` (such as `http://127.0.0.1:50051`),
    /// failing if the URL is malformed or the broker cannot be reached
    /// within [`CONNECT_TIMEOUT`].
    pub async fn connect(url: &str) -> Result<Client, tonic::transport::Error> {
        Self::connect_with_timeout(url, None).await
    }

    /// Like [`Client::connect`]; with `request_timeout`, every call that
    /// has no answer within it fails (status CANCELLED from the client's
    /// transport), so a listener that accepts and never answers cannot
    /// hang the caller.
    pub async fn connect_with_timeout(
        url: &str,
        request_timeout: Option<Duration>,
    ) -> Result<Client, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(url.to_string())?;
        if let Some(timeout) = request_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
            .connect()
            .await?;
        Ok(Client::from_channel(channel))
    }

    /// Wraps an existing channel (for custom endpoint settings or
    /// in-process transports), with the raised message size limits.
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            publisher: PublisherClient::new(channel.clone())
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
            subscriber: SubscriberClient::new(channel.clone())
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
            admin: AdminClient::new(channel)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        }
    }

    /// The generated Publisher client (a clone sharing the connection).
    pub fn publisher(&self) -> PublisherClient<Channel> {
        self.publisher.clone()
    }

    /// The generated Subscriber client (a clone sharing the connection).
    pub fn subscriber(&self) -> SubscriberClient<Channel> {
        self.subscriber.clone()
    }

    /// The generated Admin client (a clone sharing the connection).
    pub fn admin(&self) -> AdminClient<Channel> {
        self.admin.clone()
    }

    /// Publishes a batch (1 to 1000 messages) to `topic` and returns the
    /// assigned message ids, in request order.
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<PublishMessage>,
    ) -> Result<Vec<String>, Status> {
        let request = PublishRequest {
            topic: topic.to_string(),
            messages,
        };
        let response = self.publisher().publish(request).await?;
        Ok(response.into_inner().message_ids)
    }

    /// Creates a topic without retention limits and returns it.
    pub async fn create_topic(&self, name: &str) -> Result<Topic, Status> {
        let request = CreateTopicRequest {
            name: name.to_string(),
            retention: None,
        };
        Ok(self.admin().create_topic(request).await?.into_inner())
    }

    /// Creates a subscription and returns it with the broker's defaults
    /// filled in.
    pub async fn create_subscription(
        &self,
        subscription: Subscription,
    ) -> Result<Subscription, Status> {
        Ok(self
            .admin()
            .create_subscription(subscription)
            .await?
            .into_inner())
    }

    /// Leases up to `max` (1 to 1000) messages of `subscription`, waiting up
    /// to `wait_ms` (at most 60000) for the first one. Returns an empty list
    /// if nothing became deliverable in time.
    pub async fn pull(
        &self,
        subscription: &str,
        max: u32,
        wait_ms: u64,
    ) -> Result<Vec<ReceivedMessage>, Status> {
        let request = PullRequest {
            subscription: subscription.to_string(),
            max_messages: max,
            wait_ms,
        };
        Ok(self
            .subscriber()
            .pull(request)
            .await?
            .into_inner()
            .received_messages)
    }

    /// Acknowledges deliveries (1 to 1000 ack ids) and returns one result
    /// per ack id, in order.
    pub async fn ack(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
    ) -> Result<Vec<AckResult>, Status> {
        let request = AcknowledgeRequest {
            subscription: subscription.to_string(),
            ack_ids,
        };
        Ok(self
            .subscriber()
            .acknowledge(request)
            .await?
            .into_inner()
            .results)
    }

    /// Nacks deliveries (1 to 1000 ack ids): without `reject` gives them
    /// back for redelivery after the retry backoff (a non-empty `reason` is
    /// kept as each message's last nack reason); with `reject` sends them
    /// straight to the dead-letter queue with `reason` as the text.
    /// Returns one result per ack id, in order.
    pub async fn nack(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
        reject: bool,
        reason: &str,
    ) -> Result<Vec<AckResult>, Status> {
        let request = NackRequest {
            subscription: subscription.to_string(),
            ack_ids,
            reject,
            reason: reason.to_string(),
        };
        Ok(self.subscriber().nack(request).await?.into_inner().results)
    }

    /// Opens a StreamingPull stream on `subscription` with the given flow
    /// control limit, sending the first request. Returns the sender for
    /// later requests (acks, deadline changes, nacks, new settings) and the
    /// stream of responses. Dropping the sender half-closes the stream: the
    /// broker then sends the outstanding ack results and ends it.
    pub async fn streaming_pull(
        &self,
        subscription: &str,
        max_outstanding_messages: u64,
    ) -> Result<
        (
            mpsc::Sender<StreamingPullRequest>,
            Streaming<StreamingPullResponse>,
        ),
        Status,
    > {
        let (tx, rx) = mpsc::channel(STREAM_REQUEST_QUEUE);
        let first = StreamingPullRequest {
            subscription: subscription.to_string(),
            max_outstanding_messages: Some(max_outstanding_messages),
            ..StreamingPullRequest::default()
        };
        // The queue is empty and the receiver alive: this cannot fail.
        tx.send(first)
            .await
            .map_err(|_| Status::internal("streaming pull request queue closed"))?;
        let responses = self
            .subscriber()
            .streaming_pull(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((tx, responses))
    }
}

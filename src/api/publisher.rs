//! The Publisher service: unary `Publish`, and `PublishStream`, which
//! takes batches over one stream and answers each in request order.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::pb::v1::{self, publisher_server::Publisher};
use crate::api::{convert, status};
use crate::broker::Broker;
use crate::storage::Appended;

/// Requests of one PublishStream that may wait for their responses at
/// once; the stream reads no more until the oldest is answered.
pub const PUBLISH_STREAM_REQUESTS_MAX: usize = 1_000;

/// Responses of one PublishStream queued for the transport.
const PUBLISH_STREAM_RESPONSES_QUEUED: usize = 64;

/// Serves `courier.v1.Publisher` over a [`Broker`].
#[derive(Debug, Clone)]
pub struct PublisherService {
    broker: Broker,
}

impl PublisherService {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl Publisher for PublisherService {
    async fn publish(
        &self,
        request: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        let req = request.into_inner();
        crate::broker::config::check_name("topic", &req.topic).map_err(status::to_status)?;
        let records = req.messages.into_iter().map(convert::new_record).collect();
        let appended = self
            .broker
            .publish(&req.topic, records)
            .await
            .map_err(status::to_status)?;
        Ok(Response::new(v1::PublishResponse {
            message_ids: message_ids(appended),
        }))
    }

    type PublishStreamStream = ReceiverStream<Result<v1::PublishStreamResponse, Status>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<v1::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let (tx, rx) = mpsc::channel(PUBLISH_STREAM_RESPONSES_QUEUED);
        tokio::spawn(serve_stream(self.broker.clone(), request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn message_ids(appended: Appended) -> Vec<String> {
    (appended.base_offset.0..=appended.last_offset.0)
        .map(|o| o.to_string())
        .collect()
}

/// A request's response, once it is known.
type Answer = Pin<Box<dyn Future<Output = v1::PublishStreamResponse> + Send>>;

/// One PublishStream: reads requests and queues each in its topic's log in
/// stream order (so their ids follow that order), keeping up to
/// [`PUBLISH_STREAM_REQUESTS_MAX`] waiting for durability, and sends the
/// answers in the same order. Ends as the proto says: OK after the client
/// half-closes and every read request is answered, UNAVAILABLE after the
/// same once the broker shuts down, silently when the client goes away.
async fn serve_stream(
    broker: Broker,
    mut inbound: Streaming<v1::PublishStreamRequest>,
    tx: mpsc::Sender<Result<v1::PublishStreamResponse, Status>>,
) {
    let mut waiting: VecDeque<Answer> = VecDeque::new();
    let mut reading = true;
    let shutdown = broker.shutting_down();
    tokio::pin!(shutdown);
    let mut shut_down = false;
    loop {
        if !reading && waiting.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            answer = oldest(&mut waiting) => {
                waiting.pop_front();
                if tx.send(Ok(answer)).await.is_err() {
                    return; // the client went away
                }
            }
            () = &mut shutdown, if reading && !shut_down => {
                shut_down = true;
                reading = false;
            }
            next = inbound.message(), if reading && waiting.len() < PUBLISH_STREAM_REQUESTS_MAX => {
                match next {
                    Ok(Some(req)) => waiting.push_back(start(&broker, req).await),
                    Ok(None) => reading = false,
                    Err(status) => {
                        // The transport broke (or a request could not be
                        // decoded): nobody will read the answers.
                        tracing::debug!(%status, "publish stream ended by its transport");
                        return;
                    }
                }
            }
        }
    }
    if shut_down {
        let _ = tx
            .send(Err(Status::unavailable("the broker is shutting down")))
            .await;
    }
}

/// The answer of the oldest waiting request (never resolves if none).
async fn oldest(waiting: &mut VecDeque<Answer>) -> v1::PublishStreamResponse {
    match waiting.front_mut() {
        Some(answer) => answer.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Checks a request and queues its batch (waiting for room in the pending
/// buffer if need be); the answer resolves once the batch is durable, or
/// at once with the error that stopped it.
async fn start(broker: &Broker, req: v1::PublishStreamRequest) -> Answer {
    let request_id = req.request_id;
    let failed = move |s: Status| v1::PublishStreamResponse {
        request_id,
        message_ids: Vec::new(),
        code: s.code() as i32,
        message: s.message().to_string(),
    };
    if let Err(e) = crate::broker::config::check_name("topic", &req.topic) {
        let answer = failed(status::to_status(e));
        return Box::pin(std::future::ready(answer));
    }
    let records = req.messages.into_iter().map(convert::new_record).collect();
    match broker.publish_queued(&req.topic, records).await {
        Err(e) => Box::pin(std::future::ready(failed(status::to_status(e)))),
        Ok(ticket) => Box::pin(async move {
            match ticket.wait().await {
                Ok(appended) => v1::PublishStreamResponse {
                    request_id,
                    message_ids: message_ids(appended),
                    code: 0,
                    message: String::new(),
                },
                Err(e) => failed(status::to_status(e.into())),
            }
        }),
    }
}

//! The Publisher service.

use tonic::{Request, Response, Status};

use crate::api::pb::v1::{self, publisher_server::Publisher};
use crate::api::{convert, status};
use crate::broker::Broker;

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
        let message_ids = (appended.base_offset.0..=appended.last_offset.0)
            .map(|o| o.to_string())
            .collect();
        Ok(Response::new(v1::PublishResponse { message_ids }))
    }
}

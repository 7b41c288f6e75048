//! The broker layer's error type. The API layer maps it to a gRPC status
//! in exactly one function (`api::status`).

use crate::broker::config::shown;
use crate::storage::StorageError;

/// Errors from broker operations.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{kind} {} not found", shown(name))]
    NotFound { kind: &'static str, name: String },
    /// Not found, and the broker knows why.
    #[error("{kind} {} not found: {why}", shown(name))]
    NotFoundBecause {
        kind: &'static str,
        name: String,
        why: String,
    },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// Bad input; `field` names the offending request field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// A configured limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A publish would take the unsettled backlog of a topic whose
    /// retention mode is reject-publish past `retention.max_bytes`:
    /// publishes wait for consumers.
    #[error(
        "topic {topic:?} has {backlog_bytes} bytes its subscriptions have not settled; this publish of \
         {publish_bytes} bytes would take it past its retention.max_bytes of {max_bytes} and its \
         retention mode is reject-publish: publishes are refused until its subscriptions acknowledge \
         or dead-letter older messages"
    )]
    TopicFull {
        topic: String,
        max_bytes: u64,
        backlog_bytes: u64,
        publish_bytes: u64,
    },
    /// The request is valid but the system is not in a state to run it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl BrokerError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        BrokerError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

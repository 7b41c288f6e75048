//! The one place where broker and storage errors become gRPC statuses.

use tonic::{Code, Status};

use crate::broker::BrokerError;
use crate::storage::StorageError;

/// Maps a broker error to the status the protocol documents for it.
pub fn to_status(err: BrokerError) -> Status {
    match err {
        BrokerError::NotFound { .. } => Status::not_found(err.to_string()),
        BrokerError::AlreadyExists { .. } => Status::already_exists(err.to_string()),
        BrokerError::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
        BrokerError::ResourceExhausted(_) => Status::resource_exhausted(err.to_string()),
        BrokerError::FailedPrecondition(_) => Status::failed_precondition(err.to_string()),
        BrokerError::ShuttingDown => Status::unavailable(err.to_string()),
        BrokerError::Storage(e) => storage_status(e),
    }
}

fn storage_status(err: StorageError) -> Status {
    let code = match &err {
        StorageError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
        {
            Code::ResourceExhausted
        }
        StorageError::Io { .. }
        | StorageError::Failed { .. }
        | StorageError::Format { .. }
        | StorageError::Metadata(_) => Code::Internal,
        StorageError::Corrupt { .. } => Code::DataLoss,
        StorageError::Closed { .. } | StorageError::Rewound { .. } => Code::Unavailable,
        StorageError::TooLarge { .. } | StorageError::EmptyBatch => Code::InvalidArgument,
        StorageError::Locked { .. } => Code::FailedPrecondition,
        StorageError::NotFound { .. } => Code::NotFound,
        StorageError::AlreadyExists { .. } => Code::AlreadyExists,
    };
    if code == Code::Internal {
        tracing::error!(error = %err, "storage error");
    }
    Status::new(code, err.to_string())
}

/// An INVALID_ARGUMENT status naming `field`.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid {field}: {reason}"))
}

//! The one place where broker and storage errors become gRPC statuses.

use tonic::{Code, Status};

use crate::broker::BrokerError;
use crate::storage::StorageError;

/// The longest status message sent, in bytes: input echoed in a message
/// (a name, a field value) never makes a reply as large as the request.
pub const STATUS_MESSAGE_BYTES_MAX: usize = 1024;

/// `message`, cut to [`STATUS_MESSAGE_BYTES_MAX`] at a character boundary.
fn capped(message: String) -> String {
    if message.len() <= STATUS_MESSAGE_BYTES_MAX {
        return message;
    }
    // The suffix counts towards the bound too.
    let suffix = format!("… ({} bytes in all)", message.len());
    let mut end = STATUS_MESSAGE_BYTES_MAX - suffix.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &message[..end])
}

/// Maps a broker error to the status the protocol documents for it.
pub fn to_status(err: BrokerError) -> Status {
    let status = status_of(err);
    if status.message().len() > STATUS_MESSAGE_BYTES_MAX {
        return Status::new(status.code(), capped(status.message().to_owned()));
    }
    status
}

fn status_of(err: BrokerError) -> Status {
    match err {
        BrokerError::NotFound { .. } | BrokerError::NotFoundBecause { .. } => {
            Status::not_found(err.to_string())
        }
        BrokerError::AlreadyExists { .. } => Status::already_exists(err.to_string()),
        BrokerError::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
        BrokerError::ResourceExhausted(_) | BrokerError::TopicFull { .. } => {
            Status::resource_exhausted(err.to_string())
        }
        BrokerError::FailedPrecondition(_) => Status::failed_precondition(err.to_string()),
        BrokerError::ShuttingDown => Status::unavailable(err.to_string()),
        BrokerError::Storage(e) => storage_status(e),
    }
}

fn storage_status(err: StorageError) -> Status {
    let code = match &err {
        StorageError::Io { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE | libc::ENOMEM)
            ) =>
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
    Status::invalid_argument(capped(format!("invalid {field}: {reason}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_capped_at_a_char_boundary() {
        let status = invalid("name", "é".repeat(1_000_000));
        assert!(status.message().len() < STATUS_MESSAGE_BYTES_MAX + 40);
        assert!(
            status.message().ends_with("bytes in all)"),
            "{}",
            status.message()
        );
        let short = invalid("name", "too short");
        assert_eq!(short.message(), "invalid name: too short");
    }
}

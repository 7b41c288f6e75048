//! The storage layer's one error type.
//!
//! Every fallible storage call returns [`StorageError`]. Variants carry the
//! structured facts a caller needs (which file, which offsets) so the broker
//! can decide what to do and the API layer can map them to a status in one
//! place; nothing here knows about gRPC.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::storage::Offset;

/// Errors from the storage layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// An operating-system I/O call failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// Records in `[first, next_readable)` failed their checksum or framing
    /// checks in a sealed segment. They are never returned as data; reads may
    /// continue from `next_readable`.
    #[error("corrupt records in {path} at offsets {first}..{next_readable}: {detail}")]
    Corrupt {
        path: PathBuf,
        first: Offset,
        next_readable: Offset,
        detail: &'static str,
    },
    /// A file header or index did not have the expected format or version.
    #[error("bad format in {path}: {detail}")]
    Format { path: PathBuf, detail: String },
    /// A write or sync failed and the log could not be rewound to its last
    /// synced state; it refuses appends until a retried rewind works.
    #[error("log {path} cannot write after an I/O error ({cause}); retrying its recovery")]
    Failed { path: PathBuf, cause: String },
    /// The log was rewound after a failed write or sync: records read
    /// before are no longer part of it.
    #[error("log {path} was rewound after a failed write; retry")]
    Rewound { path: PathBuf },
    /// The log is closed (shutting down or deleted).
    #[error("log {path} is closed")]
    Closed { path: PathBuf },
    /// A record or batch exceeds a configured limit.
    #[error("{what} is {actual} bytes, over the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        actual: u64,
        limit: u64,
    },
    /// An append was given no records.
    #[error("an append needs at least one record")]
    EmptyBatch,
    /// The metadata store (sled) failed.
    #[error("metadata store error: {0}")]
    Metadata(String),
    /// Another process holds the data directory lock.
    #[error("data directory {path} is locked by another courier process (lock file {lock})")]
    Locked { path: PathBuf, lock: PathBuf },
    /// A named item was not found in the metadata store.
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    /// A named item already exists in the metadata store.
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: &'static str, name: String },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }
}

/// Result alias for the storage layer.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

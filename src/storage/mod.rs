//! Durable storage: everything Courier keeps on disk passes through here.
//!
//! - [`Log`] (log/): an append-only log split into segment files
//!   (segment.rs) of CRC-framed records (record.rs), with group commit,
//!   sparse offset and time indexes, a tail cache (cache.rs, with the
//!   budget all logs' caches share), recovery and retention.
//! - [`state`]: subscription state (ack floors, acked ranges, delivery
//!   attempts, dead-letter removals) journaled in one broker-wide log.
//! - [`meta`]: topic and subscription definitions in sled; the only module
//!   that imports sled. [`definition`]: the fsynced copy of each definition
//!   kept beside its data, which recovery trusts when sled lost one.
//! - [`io`]: the narrow file interface all of that uses, with an OS
//!   implementation and a simulated page cache for power-loss tests.
//!
//! This layer knows nothing of gRPC or of the broker's delivery logic.

pub mod cache;
pub mod definition;
pub mod error;
pub mod io;
pub mod log;
pub mod meta;
pub mod range_set;
pub mod record;
pub mod segment;
pub mod state;

pub use error::{Result, StorageError};
pub use log::{
    AppendTicket, Appended, Log, LogConfig, LogStats, ReadBatch, ReadLimits, RecoveryReport,
    SharedMemory, WriterPool, WriterStats,
};
pub use record::{Attribute, NewRecord, Record, Target};

use std::fmt;
use std::str::FromStr;

/// Position of a record in a log: dense and increasing from 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// When an append counts as complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// After fdatasync covers it (group commit). The default.
    Always,
    /// After the write; synced every this many milliseconds.
    Interval(u64),
    /// After the write; syncing is left to the OS.
    Never,
}

impl fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncMode::Always => f.write_str("always"),
            FsyncMode::Interval(ms) => write!(f, "interval:{ms}"),
            FsyncMode::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FsyncMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncMode::Always),
            "never" => Ok(FsyncMode::Never),
            _ => match s.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(FsyncMode::Interval(ms)),
                _ => Err(format!(
                    "bad fsync mode {s:?}: expected always, never or interval:MS with MS > 0"
                )),
            },
        }
    }
}

use std::sync::Arc;

use crate::PartitionKey;

/// Errors of the engine, named by meaning. `net` maps them to Kafka codes
/// (in its `codes` module only). Backend errors keep their source, so that
/// only what is really retriable is reported as retriable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The object store failed; the source says how.
    #[error("object store: {source}")]
    Storage {
        #[source]
        source: Arc<floe_objstore::Error>,
    },
    /// The metadata store failed; the source says how.
    #[error("metadata store: {source}")]
    Metadata {
        #[source]
        source: Arc<floe_meta::Error>,
    },
    /// A conditional update lost a race with another writer: trying again
    /// may succeed.
    #[error("{what} changed concurrently; retry")]
    Conflict { what: String },
    /// Stored data that does not decode, or a log that breaks its own
    /// rules: a bug or corruption, never fixed by retrying.
    #[error("{what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("node id {node_id} is held by a live broker; give this one another --node-id")]
    NodeIdTaken { node_id: i32 },
    #[error("partition {tp:?} has no topic")]
    UnknownPartition { tp: PartitionKey },
    #[error("offset {offset} out of range [{log_start}, {high_watermark}]")]
    OffsetOutOfRange {
        offset: u64,
        log_start: u64,
        high_watermark: u64,
    },
    #[error("broker is shutting down")]
    ShuttingDown,
    /// The commit was certainly not written (never sent, or settled as
    /// not landed) and is given up: the producer may retry.
    #[error("commit not written: {reason}")]
    CommitAbandoned { reason: String },
    /// Whether the commit landed cannot be known any more (the log was
    /// trimmed past where it could be): an idempotent producer's retry
    /// finds out, by its sequence numbers.
    #[error("commit outcome unknown: {reason}")]
    CommitOutcomeUnknown { reason: String },
    /// The offset is above what this broker has learnt of the log, and the
    /// log could not be read to tell whether it exists.
    #[error(
        "offset {offset} is not available yet on this broker (it knows up to {high_watermark})"
    )]
    OffsetNotAvailable { offset: u64, high_watermark: u64 },
    #[error("topic {name:?} already exists")]
    TopicExists { name: String },
    #[error("topic {name:?} does not exist")]
    UnknownTopic { name: String },
    #[error("invalid topic: {reason}")]
    InvalidTopic { reason: String },
    #[error("invalid partitions: {reason}")]
    InvalidPartitions { reason: String },
    #[error("invalid config: {reason}")]
    InvalidConfig { reason: String },
}

impl Error {
    /// Whether a client retrying the same request may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Storage { source } => source.is_retriable(),
            Error::Metadata { source } => source.is_retriable(),
            Error::Conflict { .. }
            | Error::ShuttingDown
            | Error::CommitAbandoned { .. }
            | Error::CommitOutcomeUnknown { .. }
            | Error::OffsetNotAvailable { .. } => true,
            _ => false,
        }
    }
}

impl From<floe_objstore::Error> for Error {
    fn from(e: floe_objstore::Error) -> Self {
        Error::Storage {
            source: Arc::new(e),
        }
    }
}

impl From<floe_meta::Error> for Error {
    fn from(e: floe_meta::Error) -> Self {
        Error::Metadata {
            source: Arc::new(e),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_retriable_backend_failures_are_retriable() {
        let denied: Error = floe_objstore::Error::PermissionDenied {
            op: "put",
            key: "k".into(),
            reason: "403".into(),
        }
        .into();
        assert!(!denied.is_retriable());
        let timeout: Error = floe_objstore::Error::Timeout {
            op: "put",
            key: "k".into(),
            after: std::time::Duration::from_secs(1),
        }
        .into();
        assert!(timeout.is_retriable());
        let down: Error = floe_meta::Error::Unavailable {
            op: "txn",
            reason: "connection reset".into(),
        }
        .into();
        assert!(down.is_retriable());
        let corrupt = Error::Corrupt {
            what: "log entry 3".into(),
            reason: "expected value".into(),
        };
        assert!(!corrupt.is_retriable());
        // The source is kept for whoever reports the error.
        assert!(std::error::Error::source(&denied).is_some());
    }
}

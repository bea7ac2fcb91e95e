use crate::PartitionKey;

/// Errors of the engine, named by meaning. `net` maps them to Kafka codes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("object store: {reason}")]
    Storage { reason: String },
    #[error("metadata store: {reason}")]
    Metadata { reason: String },
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
        matches!(
            self,
            Error::Storage { .. } | Error::Metadata { .. } | Error::ShuttingDown
        )
    }
}

impl From<floe_objstore::Error> for Error {
    fn from(e: floe_objstore::Error) -> Self {
        Error::Storage {
            reason: e.to_string(),
        }
    }
}

impl From<floe_meta::Error> for Error {
    fn from(e: floe_meta::Error) -> Self {
        Error::Metadata {
            reason: e.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

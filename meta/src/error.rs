/// Errors of the metadata port, named by meaning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("metadata transaction has {ops} operations, above the limit of {limit}")]
    TooManyOps { ops: usize, limit: usize },
    #[error("metadata store unavailable during {op}: {reason}")]
    Unavailable { op: &'static str, reason: String },
    #[error("metadata store corrupt at key {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("metadata configuration: {reason}")]
    Config { reason: String },
    #[error("watch on {prefix:?} needs revision {revision}, but history before {compacted} is compacted")]
    Compacted {
        prefix: String,
        revision: u64,
        compacted: u64,
    },
    #[error("lease {lease} has expired or was revoked")]
    LeaseExpired { lease: i64 },
}

impl Error {
    pub fn is_retriable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

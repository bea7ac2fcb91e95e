use std::ops::Range;

/// Errors of the object-store port, named by meaning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object {key:?} not found")]
    NotFound { key: String },
    #[error("range {range:?} is outside object {key:?} of {size} bytes")]
    RangeOutOfBounds {
        key: String,
        range: Range<u64>,
        size: u64,
    },
    #[error("invalid object key {key:?}")]
    InvalidKey { key: String },
    #[error("object store configuration: {reason}")]
    Config { reason: String },
    #[error("object store I/O during {op} of {key:?}: {source}")]
    Io {
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same request may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Error::Io { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

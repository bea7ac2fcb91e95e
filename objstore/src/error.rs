use std::ops::Range;
use std::time::Duration;

/// Errors of the object-store port, named by meaning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object {key:?} not found")]
    NotFound { key: String },
    #[error("bucket {bucket:?} does not exist")]
    BucketNotFound { bucket: String },
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
    /// The store asked us to slow down (S3 503 SlowDown, 429).
    #[error("object store throttled {op} of {key:?}: {reason}")]
    Throttled {
        op: &'static str,
        key: String,
        reason: String,
    },
    /// One request got no complete answer in time.
    #[error("object store {op} of {key:?} timed out after {after:?}")]
    Timeout {
        op: &'static str,
        key: String,
        after: Duration,
    },
    /// A body ended before the length the store announced or we asked for.
    #[error("object store {op} of {key:?} returned {got} of {expected} bytes")]
    Truncated {
        op: &'static str,
        key: String,
        expected: u64,
        got: u64,
    },
    /// A conditional request's condition did not hold.
    #[error("object store precondition failed for {op} of {key:?}: {reason}")]
    Precondition {
        op: &'static str,
        key: String,
        reason: String,
    },
    /// The credentials may not do this (HTTP 401/403).
    #[error("object store denied {op} of {key:?}: {reason}")]
    PermissionDenied {
        op: &'static str,
        key: String,
        reason: String,
    },
    /// The store refused the request as malformed or unsupported (other
    /// 4xx); sending it again will not help.
    #[error("object store rejected {op} of {key:?} (HTTP {status}): {reason}")]
    Rejected {
        op: &'static str,
        key: String,
        status: u16,
        reason: String,
    },
    /// Every retry within the bound failed; `source` is the last failure.
    #[error(
        "object store {op} of {key:?} failed after {attempts} attempts in {elapsed:?}: {source}"
    )]
    RetriesExhausted {
        op: &'static str,
        key: String,
        attempts: u32,
        elapsed: Duration,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Whether retrying the same request may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Io { .. }
            | Error::Throttled { .. }
            | Error::Timeout { .. }
            | Error::Truncated { .. } => true,
            Error::RetriesExhausted { source, .. } => source.is_retriable(),
            _ => false,
        }
    }

    /// The error behind any retry wrapper.
    pub fn root(&self) -> &Error {
        match self {
            Error::RetriesExhausted { source, .. } => source.root(),
            e => e,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

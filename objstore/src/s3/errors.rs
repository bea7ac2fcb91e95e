//! How the S3 backend's failures become the port's [`Error`]s: first by
//! `object_store`'s named kinds, then by the HTTP status and S3 error code
//! in the message. The variant decides whether floe's retry loop tries
//! again ([`Error::is_retriable`]).

use std::time::Duration;

use object_store::client::{HttpError, HttpErrorKind};

use super::S3;
use crate::Error;

impl S3 {
    /// Maps an `object_store` error to the port's meaning. Statuses are
    /// read from the error's text: `object_store` 0.14 keeps its
    /// `RetryError` type private.
    pub(super) fn map_err(&self, op: &'static str, key: &str, e: object_store::Error) -> Error {
        use object_store::Error as O;
        let key = key.to_string();
        let text = error_chain(&e);
        if text.contains("<Code>NoSuchBucket</Code>") {
            return Error::BucketNotFound {
                bucket: self.bucket.clone(),
            };
        }
        match e {
            O::NotFound { .. } => Error::NotFound { key },
            O::Precondition { .. } | O::AlreadyExists { .. } | O::NotModified { .. } => {
                Error::Precondition {
                    op,
                    key,
                    reason: text,
                }
            }
            O::PermissionDenied { .. } | O::Unauthenticated { .. } => Error::PermissionDenied {
                op,
                key,
                reason: text,
            },
            O::InvalidPath { .. } => Error::InvalidKey { key },
            O::NotSupported { .. }
            | O::NotImplemented { .. }
            | O::UnknownConfigurationKey { .. } => Error::Config { reason: text },
            other => classify(op, key, &other, text, self.opts.attempt_timeout),
        }
    }
}

/// The error and all its sources, as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The HTTP status in `object_store`'s message for a non-2xx answer
/// ("Server returned non-2xx status code: 503 Service Unavailable: …").
fn status_in(text: &str) -> Option<u16> {
    let (_, rest) = text.split_once("status code: ")?;
    rest.get(..3)?.parse().ok()
}

/// S3 error codes that mean "slow down".
const THROTTLE_CODES: [&str; 5] = [
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
];

/// Classifies a failure that is not one of `object_store`'s named kinds.
fn classify(
    op: &'static str,
    key: String,
    e: &object_store::Error,
    text: String,
    attempt_timeout: Duration,
) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            return match h.kind() {
                HttpErrorKind::Timeout => Error::Timeout {
                    op,
                    key,
                    after: attempt_timeout,
                },
                _ => Error::Io {
                    op,
                    key,
                    source: std::io::Error::other(text),
                },
            };
        }
        source = s.source();
    }
    let status = status_in(&text);
    if matches!(status, Some(429 | 503)) || THROTTLE_CODES.iter().any(|c| text.contains(c)) {
        return Error::Throttled {
            op,
            key,
            reason: text,
        };
    }
    match status {
        Some(s @ 400..=499) if !text.contains("RequestTimeout") => Error::Rejected {
            op,
            key,
            status: s,
            reason: text,
        },
        // 5xx, S3's RequestTimeout (400), an InternalError inside a 200, a
        // body that failed to decode: the next attempt may succeed.
        _ => Error::Io {
            op,
            key,
            source: std::io::Error::other(text),
        },
    }
}

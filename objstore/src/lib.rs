//! floe-objstore: the object-store port and its backends.
//!
//! Owns: the [`ObjectStore`] trait (put, ranged get, delete, list), the
//! local-directory backend (the embedded default), the S3 backend (multipart
//! policy, retries, hedged reads), the in-memory backend and the
//! fault-injecting wrapper for tests, and request accounting. The
//! conformance suite every backend passes is in `tests/conformance/`.
//!
//! Must never: know about Kafka, partitions or offsets; buffer without bound;
//! report a put as done before the object is durable in the backend.
//!
//! Backends are `Send + Sync` and tokio-based; floe's shards reach them
//! through the engine's sidecar runtime.

pub mod aws_profile;
mod error;
mod faulty;
mod local;
mod memory;
mod metrics;
mod retry;
pub mod s3;

// The conformance suite is test code and ships in no build: it lives with
// the integration tests, which include it too, and names this crate the way
// they do.
#[cfg(test)]
extern crate self as floe_objstore;
#[cfg(test)]
#[path = "../tests/conformance/mod.rs"]
mod conformance;

use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

pub use error::{Error, Result};
pub use faulty::{FaultConfig, FaultCounts, Faulty};
pub use local::LocalDir;
pub use memory::Memory;
pub use metrics::{
    current_purpose, with_purpose, Accounting, Purpose, RequestCounters, REQUEST_OPS,
};
pub use retry::RetryPolicy;
pub use s3::{S3Options, S3};

/// Metadata of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was last written, as the backend reports it (S3's
    /// `LastModified`, a file's mtime). Lifecycle uses it to tell an
    /// abandoned upload from one whose commit is still on its way.
    pub last_modified: SystemTime,
}

/// The object-store port. Keys are `/`-separated relative paths
/// (`segments/000123-4`), never starting with `/` and never containing `..`.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores `parts`, concatenated in order, as one object. Returns only
    /// once the object is durable; an existing object is replaced whole.
    async fn put(&self, key: &str, parts: Vec<Bytes>) -> Result<()>;

    /// Reads `range` (byte offsets, end exclusive) of an object. A range
    /// reaching past the end is an error, never a short read.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes>;

    /// Reads a whole object.
    async fn get(&self, key: &str) -> Result<Bytes>;

    /// Deletes an object; deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Lists objects whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// A short description for logs (`file:///var/lib/floe/objects`).
    fn describe(&self) -> String;

    /// Aborts the multipart uploads under this store's prefix that were
    /// started more than `older_than` ago (a broker killed mid-upload, an
    /// abort that itself failed); returns how many. Backends without
    /// multipart uploads have none to abort.
    async fn abort_stale_uploads(&self, older_than: std::time::Duration) -> Result<usize> {
        let _ = older_than;
        Ok(0)
    }

    /// The backend's own count of the requests it sent (retries, multipart
    /// parts and hedged reads included), if it keeps one. Remote backends
    /// do; local ones have no requests to bill.
    fn accounting(&self) -> Option<Arc<Accounting>> {
        None
    }
}

/// Checks a key against the port's rules.
pub fn validate_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || key.contains('\0');
    if bad {
        return Err(Error::InvalidKey {
            key: key.to_string(),
        });
    }
    Ok(())
}

/// A body whose length differs from what was announced or asked for is an
/// error ([`Error::Truncated`]), never short data.
pub fn check_body_len(op: &'static str, key: &str, expected: u64, body: &Bytes) -> Result<()> {
    let got = body.len() as u64;
    if got != expected {
        return Err(Error::Truncated {
            op,
            key: key.to_string(),
            expected,
            got,
        });
    }
    Ok(())
}

/// Opens a backend from its URL: `file://DIR`, `s3://BUCKET[/PREFIX]`
/// (with `s3`'s settings), `memory://`.
/// Opens a backend and, when `faults` is given (testing only), wraps it in
/// [`Faulty`] with that [`FaultConfig::parse`] spec.
pub fn open_with_faults(
    url: &str,
    s3: &S3Options,
    faults: Option<&str>,
) -> Result<Arc<dyn ObjectStore>> {
    let Some(spec) = faults.filter(|f| !f.trim().is_empty()) else {
        return open(url, s3);
    };
    let config = FaultConfig::parse(spec)?;
    if let Some(dir) = url.strip_prefix("file://") {
        return Ok(Arc::new(Faulty::new(LocalDir::open(dir)?, config)?));
    }
    if url.starts_with("s3://") {
        return Ok(Arc::new(Faulty::new(S3::open(url, s3)?, config)?));
    }
    if url.starts_with("memory://") {
        return Ok(Arc::new(Faulty::new(Memory::default(), config)?));
    }
    open(url, s3)
}

pub fn open(url: &str, s3: &S3Options) -> Result<Arc<dyn ObjectStore>> {
    if let Some(dir) = url.strip_prefix("file://") {
        return Ok(Arc::new(LocalDir::open(dir)?));
    }
    if url.starts_with("s3://") {
        return Ok(Arc::new(S3::open(url, s3)?));
    }
    if url.starts_with("memory://") {
        return Ok(Arc::new(Memory::default()));
    }
    Err(Error::Config {
        reason: format!(
            "unsupported object store URL {url:?} (expected file://DIR, s3://BUCKET[/PREFIX] or memory://)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rules() {
        assert!(validate_key("segments/0001").is_ok());
        for bad in ["", "/abs", "a//b", "a/../b", "./a", "a/", "a\0b"] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
    }
}

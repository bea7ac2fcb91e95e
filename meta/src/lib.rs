//! floe-meta: the metadata port and its backends, plus the cluster schema.
//!
//! Owns: the etcd-shaped [`MetaStore`] trait (get, range, compare-and-swap
//! transactions), the embedded backend (a redb file under the data dir), the
//! conformance suite every backend passes, and [`schema`] — the keys and
//! records floe keeps in the store.
//!
//! Must never: hold record data (that lives in object storage); interpret
//! commits (sequencing is the engine's); let a transaction apply partially.
//!
//! Not yet here (issue 4): the etcd backend, prefix watches and leases.

mod embedded;
mod error;

pub mod conformance;
pub mod schema;

use bytes::Bytes;

pub use embedded::Embedded;
pub use error::{Error, Result};

/// One key with its value and revisions, as etcd reports them: revisions
/// are store-wide and strictly increasing; a key's `mod_revision` is the
/// revision of the transaction that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub create_revision: u64,
    pub mod_revision: u64,
}

/// A transaction guard. All must hold for the success branch to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod revision equals this; 0 means "the key is absent".
    ModRevision(String, u64),
    /// The key exists and holds exactly this value.
    Value(String, Bytes),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Bytes),
    Delete(String),
}

/// An etcd-style transaction: if every compare holds, apply `success`,
/// otherwise apply `failure`; atomically either way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    /// Operations per transaction (etcd's default `--max-txn-ops`).
    pub const OPS_MAX: usize = 128;

    pub fn when(compares: Vec<Compare>) -> Self {
        Self {
            compares,
            ..Self::default()
        }
    }
    pub fn and_then(mut self, ops: Vec<Op>) -> Self {
        self.success = ops;
        self
    }
    pub fn or_else(mut self, ops: Vec<Op>) -> Self {
        self.failure = ops;
        self
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: u64,
}

/// The metadata port.
#[async_trait::async_trait]
pub trait MetaStore: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Keys in `[start, end)` in key order, at most `limit` of them.
    async fn range(&self, start: &str, end: &str, limit: usize) -> Result<Vec<KeyValue>>;

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;

    fn describe(&self) -> String;
}

/// The smallest key greater than every key starting with `prefix`
/// (etcd's "range end" for a prefix).
pub fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0x7f {
            end.push(last + 1);
            return String::from_utf8(end).unwrap_or_default();
        }
    }
    "\u{7f}".to_string()
}

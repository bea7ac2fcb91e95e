//! floe-meta: the metadata port and its backends, plus the cluster schema.
//!
//! Owns: the etcd-shaped [`MetaStore`] trait (get, range, compare-and-swap
//! transactions), the embedded backend (a redb file under the data dir), and
//! [`schema`] — the keys and records floe keeps in the store. The
//! conformance suite every backend passes is in `tests/conformance/`.
//!
//! Must never: hold record data (that lives in object storage); interpret
//! commits (sequencing is the engine's); let a transaction apply partially.
//!
mod embedded;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
pub mod faulty;
pub mod schema;

// The conformance suite is test code and ships in no build: it lives with
// the integration tests, which include it too, and names this crate the way
// they do.
#[cfg(test)]
extern crate self as floe_meta;
#[cfg(test)]
#[path = "../tests/conformance/mod.rs"]
mod conformance;

use bytes::Bytes;

pub use embedded::Embedded;
pub use error::{Error, Result};
#[cfg(feature = "etcd")]
pub use etcd::Etcd;
pub use faulty::{FaultyMeta, MetaFaults};

/// A lease: keys put under it are deleted when it expires or is revoked.
pub type LeaseId = i64;

/// One change, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, mod_revision: u64 },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> u64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Changes under a prefix, in revision order. A backend re-establishes a
/// broken connection itself and resumes after the last delivered revision;
/// the stream ends with [`Error::Compacted`] only when the history it needs
/// is gone.
pub type Watch = futures::stream::BoxStream<'static, Result<Event>>;

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
    /// The key's create revision equals this (0: absent): it still exists
    /// and was not deleted and created again since, however often it was
    /// rewritten. What fences writes on a registration's life.
    CreateRevision(String, u64),
}

impl Compare {
    /// The key compared.
    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision(k, _) | Compare::Value(k, _) | Compare::CreateRevision(k, _) => k,
        }
    }
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Bytes),
    /// A put whose key lives only as long as the lease.
    PutLeased(String, Bytes, LeaseId),
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

    /// The store's current revision.
    async fn revision(&self) -> Result<u64>;

    /// Every change to keys starting with `prefix` at or after
    /// `from_revision`, in revision order.
    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch>;

    /// Grants a lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: std::time::Duration) -> Result<LeaseId>;

    /// Refreshes a lease; [`Error::LeaseExpired`] if it is gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    fn describe(&self) -> String;
}

/// How floe authenticates to etcd and checks it: for `etcds://` the CA
/// that signed etcd's certificate and, for mutual TLS, a client
/// certificate and key (PEM); with etcd's authentication on, a user and
/// password (over either scheme; the token is refreshed when it expires).
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    pub ca_pem: Option<Vec<u8>>,
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client_pem.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// Opens a backend from its URL: `embedded` (a redb file at
/// `embedded_path`), `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`, or
/// `etcds://…` (the same over TLS; `security` must name the CA).
pub async fn open(
    url: &str,
    embedded_path: &std::path::Path,
    security: &EtcdSecurity,
) -> Result<std::sync::Arc<dyn MetaStore>> {
    if url == "embedded" {
        return Ok(std::sync::Arc::new(Embedded::open(embedded_path)?));
    }
    let (tls, rest) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => {
            return Err(Error::Config {
                reason: format!("unsupported metadata URL {url:?} (expected embedded, etcd://HOST:PORT[,HOST:PORT...][/PREFIX] or etcds://…)"),
            })
        }
    };
    #[cfg(not(feature = "etcd"))]
    {
        let _ = (tls, rest, security);
        Err(Error::Config {
            reason: format!(
                "{url:?}: this floe was built without etcd support; build it with the default features (needs protoc)"
            ),
        })
    }
    #[cfg(feature = "etcd")]
    {
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, p.trim_matches('/')),
            None => (rest, ""),
        };
        let scheme = if tls { "https" } else { "http" };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(Error::Config {
                reason: format!("{url:?} names no etcd endpoint"),
            });
        }
        if tls && security.ca_pem.is_none() {
            return Err(Error::Config {
                reason: format!(
                    "{url:?} is TLS: give the CA that signed etcd's certificate (--etcd-ca-file)"
                ),
            });
        }
        if !tls && (security.ca_pem.is_some() || security.client_pem.is_some()) {
            return Err(Error::Config {
                reason: format!("{url:?} is plain text but etcd TLS files are given: use etcds://"),
            });
        }
        Ok(std::sync::Arc::new(
            Etcd::connect(endpoints, prefix, security).await?,
        ))
    }
}

/// Compare-and-swap attempts `take_next` makes before giving up.
pub const COUNTER_ATTEMPTS_MAX: usize = 16;

/// Takes the next value of a cluster-wide counter stored as decimal text
/// at `key` (starting at `first`): every caller, on any broker, gets a
/// different value.
pub async fn take_next(store: &dyn MetaStore, key: &str, first: i64) -> Result<i64> {
    for _ in 0..COUNTER_ATTEMPTS_MAX {
        let (next, guard) = match store.get(key).await? {
            Some(kv) => {
                let n = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(|| Error::Corrupt {
                        key: key.to_string(),
                        reason: "counter is not a decimal number".into(),
                    })?;
                (n, Compare::ModRevision(key.to_string(), kv.mod_revision))
            }
            None => (first, Compare::ModRevision(key.to_string(), 0)),
        };
        let txn = Txn::when(vec![guard]).and_then(vec![Op::Put(
            key.to_string(),
            Bytes::from((next + 1).to_string()),
        )]);
        if store.txn(txn).await?.succeeded {
            return Ok(next);
        }
    }
    Err(Error::Unavailable {
        op: "take_next",
        reason: format!(
            "counter {key:?} still contended after {COUNTER_ATTEMPTS_MAX} attempts; retry"
        ),
    })
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

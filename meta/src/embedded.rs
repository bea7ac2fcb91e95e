use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use crate::{
    Compare, Error, Event, KeyValue, LeaseId, MetaStore, Op, Result, Txn, TxnOutcome, Watch,
};

/// key -> create_revision · mod_revision · lease (u64/u64/i64 LE) · value
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// "revision" -> the store-wide revision
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const REVISION: &str = "revision";
const HEADER_BYTES: usize = 24;

/// Changes kept in memory for watches that start in the past.
pub const HISTORY_EVENTS_MAX: usize = 100_000;
/// Live changes buffered per watcher before it must catch up from history.
const LIVE_EVENTS_MAX: usize = 4096;
/// How often expired leases are looked for.
const LEASE_SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// The embedded metadata backend: one redb file, written with immediate
/// durability (a transaction is fsynced before it is reported). redb allows
/// one writer at a time, so transactions are serializable, and it locks the
/// file, so two brokers cannot open the same data dir by accident.
///
/// Watches are served from an in-memory history of recent changes; leases
/// live in memory, so keys leased by a previous process are deleted when the
/// store is opened (their owner is gone).
#[derive(Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: String,
    /// In memory: calls run on the caller's thread (no file I/O to keep
    /// off the async executor), not on tokio's blocking pool.
    inline: bool,
    history: Mutex<VecDeque<Event>>,
    live: broadcast::Sender<Event>,
    leases: Mutex<Leases>,
}

#[derive(Default)]
struct Leases {
    next: LeaseId,
    active: HashMap<LeaseId, (Duration, Instant, BTreeSet<String>)>,
}

fn unavailable(op: &'static str) -> impl FnOnce(redb::Error) -> Error {
    move |e| Error::Unavailable {
        op,
        reason: e.to_string(),
    }
}

macro_rules! redb_try {
    ($op:literal, $e:expr) => {
        $e.map_err(|e| unavailable($op)(e.into()))?
    };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only means a panicking thread held the lock; the data are
    // updated in single assignments and stay consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Record {
    kv: KeyValue,
    lease: LeaseId,
}

fn decode(key: &str, raw: &[u8]) -> Result<Record> {
    if raw.len() < HEADER_BYTES {
        return Err(Error::Corrupt {
            key: key.to_string(),
            reason: format!("{} byte record is shorter than its header", raw.len()),
        });
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&raw[at..at + 8]);
        w
    };
    Ok(Record {
        kv: KeyValue {
            key: key.to_string(),
            value: Bytes::copy_from_slice(&raw[HEADER_BYTES..]),
            create_revision: u64::from_le_bytes(word(0)),
            mod_revision: u64::from_le_bytes(word(8)),
        },
        lease: i64::from_le_bytes(word(16)),
    })
}

fn encode(create: u64, modr: u64, lease: LeaseId, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_BYTES + value.len());
    v.extend_from_slice(&create.to_le_bytes());
    v.extend_from_slice(&modr.to_le_bytes());
    v.extend_from_slice(&lease.to_le_bytes());
    v.extend_from_slice(value);
    v
}

impl Embedded {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let db = Database::create(path).map_err(|e| Error::Unavailable {
            op: "open",
            reason: format!("{}: {e}", path.display()),
        })?;
        Self::with_database(db, path.display().to_string(), false)
    }

    /// A store that lives in memory only, for tests and simulation: the
    /// same code as the file-backed store, on redb's in-memory backend.
    pub fn in_memory() -> Result<Self> {
        let db = Database::builder()
            .create_with_backend(MemoryPages::default())
            .map_err(|e| Error::Unavailable {
                op: "open",
                reason: format!("in-memory store: {e}"),
            })?;
        Self::with_database(db, "memory".to_string(), true)
    }

    fn with_database(db: Database, path: String, inline: bool) -> Result<Self> {
        let w = redb_try!("open", db.begin_write());
        {
            redb_try!("open", w.open_table(KV));
            redb_try!("open", w.open_table(STATE));
        }
        redb_try!("open", w.commit());
        let (live, _) = broadcast::channel(LIVE_EVENTS_MAX);
        let store = Self {
            inner: Arc::new(Inner {
                db,
                path,
                inline,
                history: Mutex::new(VecDeque::new()),
                live,
                leases: Mutex::new(Leases::default()),
            }),
        };
        store.drop_orphaned_leased_keys()?;
        let weak = Arc::downgrade(&store.inner);
        std::thread::Builder::new()
            .name("floe-meta-leases".into())
            .spawn(move || sweep_leases(weak))
            .map_err(|e| Error::Unavailable {
                op: "open",
                reason: format!("starting the lease sweeper: {e}"),
            })?;
        Ok(store)
    }

    fn drop_orphaned_leased_keys(&self) -> Result<()> {
        let r = redb_try!("open", self.inner.db.begin_read());
        let t = redb_try!("open", r.open_table(KV));
        let mut orphans = Vec::new();
        for item in redb_try!("open", t.iter()) {
            let (k, v) = redb_try!("open", item);
            if decode(k.value(), v.value())?.lease != 0 {
                orphans.push(Op::Delete(k.value().to_string()));
            }
        }
        drop(t);
        drop(r);
        for chunk in orphans.chunks(Txn::OPS_MAX) {
            self.txn_blocking(Txn::default().and_then(chunk.to_vec()))?;
        }
        Ok(())
    }

    fn get_blocking(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = redb_try!("get", self.inner.db.begin_read());
        let t = redb_try!("get", r.open_table(KV));
        match redb_try!("get", t.get(key)) {
            Some(v) => Ok(Some(decode(key, v.value())?.kv)),
            None => Ok(None),
        }
    }

    fn range_blocking(&self, start: &str, end: &str, limit: usize) -> Result<Vec<KeyValue>> {
        let r = redb_try!("range", self.inner.db.begin_read());
        let t = redb_try!("range", r.open_table(KV));
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        for item in redb_try!("range", t.range(start..end)).take(limit) {
            let (k, v) = redb_try!("range", item);
            out.push(decode(k.value(), v.value())?.kv);
        }
        Ok(out)
    }

    fn revision_blocking(&self) -> Result<u64> {
        let r = redb_try!("revision", self.inner.db.begin_read());
        let t = redb_try!("revision", r.open_table(STATE));
        Ok(redb_try!("revision", t.get(REVISION))
            .map(|v| v.value())
            .unwrap_or(0))
    }

    fn txn_blocking(&self, txn: Txn) -> Result<TxnOutcome> {
        let ops = txn.compares.len() + txn.success.len().max(txn.failure.len());
        if ops > Txn::OPS_MAX {
            return Err(Error::TooManyOps {
                ops,
                limit: Txn::OPS_MAX,
            });
        }
        // Leases named by puts must exist (as in etcd).
        {
            let leases = lock(&self.inner.leases);
            for op in txn.success.iter().chain(&txn.failure) {
                if let Op::PutLeased(_, _, lease) = op {
                    if !leases.active.contains_key(lease) {
                        return Err(Error::LeaseExpired { lease: *lease });
                    }
                }
            }
        }
        let w = redb_try!("txn", self.inner.db.begin_write());
        let mut events = Vec::new();
        let mut leased = Vec::new();
        let outcome = {
            let mut kv = redb_try!("txn", w.open_table(KV));
            let mut state = redb_try!("txn", w.open_table(STATE));
            let mut revision = redb_try!("txn", state.get(REVISION))
                .map(|v| v.value())
                .unwrap_or(0);
            let mut holds = true;
            for c in &txn.compares {
                holds &= match c {
                    Compare::ModRevision(key, want) => {
                        let cur = match redb_try!("txn", kv.get(key.as_str())) {
                            Some(v) => decode(key, v.value())?.kv.mod_revision,
                            None => 0,
                        };
                        cur == *want
                    }
                    Compare::Value(key, want) => match redb_try!("txn", kv.get(key.as_str())) {
                        Some(v) => decode(key, v.value())?.kv.value == *want,
                        None => false,
                    },
                    Compare::CreateRevision(key, want) => {
                        let cur = match redb_try!("txn", kv.get(key.as_str())) {
                            Some(v) => decode(key, v.value())?.kv.create_revision,
                            None => 0,
                        };
                        cur == *want
                    }
                };
            }
            let ops = if holds { &txn.success } else { &txn.failure };
            if !ops.is_empty() {
                revision += 1;
                for op in ops {
                    match op {
                        Op::Put(key, value) | Op::PutLeased(key, value, _) => {
                            let lease = match op {
                                Op::PutLeased(_, _, l) => *l,
                                _ => 0,
                            };
                            let create = match redb_try!("txn", kv.get(key.as_str())) {
                                Some(v) => decode(key, v.value())?.kv.create_revision,
                                None => revision,
                            };
                            let rec = encode(create, revision, lease, value);
                            redb_try!("txn", kv.insert(key.as_str(), rec.as_slice()));
                            if lease != 0 {
                                leased.push((key.clone(), lease));
                            }
                            events.push(Event::Put(KeyValue {
                                key: key.clone(),
                                value: value.clone(),
                                create_revision: create,
                                mod_revision: revision,
                            }));
                        }
                        Op::Delete(key) => {
                            if redb_try!("txn", kv.remove(key.as_str())).is_some() {
                                events.push(Event::Delete {
                                    key: key.clone(),
                                    mod_revision: revision,
                                });
                            }
                        }
                    }
                }
                redb_try!("txn", state.insert(REVISION, revision));
            }
            TxnOutcome {
                succeeded: holds,
                revision,
            }
        };
        redb_try!("txn", w.commit());
        {
            let mut leases = lock(&self.inner.leases);
            for (key, lease) in leased {
                if let Some(l) = leases.active.get_mut(&lease) {
                    l.2.insert(key);
                }
            }
        }
        self.publish(events);
        Ok(outcome)
    }

    fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut history = lock(&self.inner.history);
        for e in events {
            if history.len() == HISTORY_EVENTS_MAX {
                history.pop_front();
            }
            history.push_back(e.clone());
            // No receivers is fine: nobody is watching.
            let _ = self.inner.live.send(e);
        }
    }

    /// Deletes the keys of leases whose deadline passed.
    fn expire_leases(&self, now: Instant) -> Result<()> {
        let expired: Vec<(LeaseId, BTreeSet<String>)> = {
            let mut leases = lock(&self.inner.leases);
            let ids: Vec<LeaseId> = leases
                .active
                .iter()
                .filter(|(_, (_, deadline, _))| *deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| leases.active.remove(&id).map(|(_, _, keys)| (id, keys)))
                .collect()
        };
        for (lease, keys) in expired {
            self.delete_leased(lease, keys)?;
        }
        Ok(())
    }

    /// Deletes the keys still held by `lease` (a key re-put without the
    /// lease since then is left alone).
    fn delete_leased(&self, lease: LeaseId, keys: BTreeSet<String>) -> Result<()> {
        let mine: Vec<Op> = {
            let r = redb_try!("lease", self.inner.db.begin_read());
            let t = redb_try!("lease", r.open_table(KV));
            let mut ops = Vec::new();
            for k in keys {
                if let Some(v) = redb_try!("lease", t.get(k.as_str())) {
                    if decode(&k, v.value())?.lease == lease {
                        ops.push(Op::Delete(k));
                    }
                }
            }
            ops
        };
        for chunk in mine.chunks(Txn::OPS_MAX) {
            self.txn_blocking(Txn::default().and_then(chunk.to_vec()))?;
        }
        Ok(())
    }
}

fn sweep_leases(store: Weak<Inner>) {
    loop {
        std::thread::sleep(LEASE_SWEEP_INTERVAL);
        let Some(inner) = store.upgrade() else {
            return;
        };
        let e = Embedded { inner };
        if let Err(err) = e.expire_leases(Instant::now()) {
            tracing::warn!(error = %err, "expiring leases failed; will retry");
        }
    }
}

/// redb's pages in one vector. redb's own `InMemoryBackend` grows its
/// vector one zero byte at a time, which was a fifth of the commit-log
/// simulation's time.
#[derive(Debug, Default)]
struct MemoryPages(std::sync::RwLock<Vec<u8>>);

impl MemoryPages {
    fn out_of_range() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "beyond the in-memory store's end",
        )
    }
}

impl redb::StorageBackend for MemoryPages {
    fn len(&self) -> std::result::Result<u64, std::io::Error> {
        Ok(self.0.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }

    fn read(&self, offset: u64, len: usize) -> std::result::Result<Vec<u8>, std::io::Error> {
        let pages = self.0.read().unwrap_or_else(|p| p.into_inner());
        let at = usize::try_from(offset).map_err(|_| Self::out_of_range())?;
        pages
            .get(at..at.saturating_add(len))
            .map(<[u8]>::to_vec)
            .ok_or_else(Self::out_of_range)
    }

    fn set_len(&self, len: u64) -> std::result::Result<(), std::io::Error> {
        let len = usize::try_from(len).map_err(|_| Self::out_of_range())?;
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .resize(len, 0);
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> std::result::Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), std::io::Error> {
        let mut pages = self.0.write().unwrap_or_else(|p| p.into_inner());
        let at = usize::try_from(offset).map_err(|_| Self::out_of_range())?;
        pages
            .get_mut(at..at.saturating_add(data.len()))
            .ok_or_else(Self::out_of_range)?
            .copy_from_slice(data);
        Ok(())
    }
}

impl Embedded {
    /// Runs a store call: on tokio's blocking pool for a file, inline for
    /// memory.
    async fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if self.inner.inline {
            return f();
        }
        blocking(op, f).await
    }
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Unavailable {
            op,
            reason: e.to_string(),
        })?
}

#[async_trait::async_trait]
impl MetaStore for Embedded {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let (s, key) = (self.clone(), key.to_string());
        self.call("get", move || s.get_blocking(&key)).await
    }

    async fn range(&self, start: &str, end: &str, limit: usize) -> Result<Vec<KeyValue>> {
        let (s, start, end) = (self.clone(), start.to_string(), end.to_string());
        self.call("range", move || s.range_blocking(&start, &end, limit))
            .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let s = self.clone();
        self.call("txn", move || s.txn_blocking(txn)).await
    }

    async fn revision(&self) -> Result<u64> {
        let s = self.clone();
        self.call("revision", move || s.revision_blocking()).await
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch> {
        // Subscribe before reading history so nothing falls between them.
        let mut live = self.inner.live.subscribe();
        let current = self.revision().await?;
        let from = if from_revision == 0 {
            current + 1
        } else {
            from_revision
        };
        let past: Vec<Event> = {
            let history = lock(&self.inner.history);
            let oldest = history.front().map_or(current + 1, Event::revision);
            if from < oldest && from <= current {
                return Err(Error::Compacted {
                    prefix: prefix.to_string(),
                    revision: from,
                    compacted: oldest,
                });
            }
            history
                .iter()
                .filter(|e| e.revision() >= from && e.key().starts_with(prefix))
                .cloned()
                .collect()
        };
        let prefix = prefix.to_string();
        let mut next = past.last().map_or(from, |e| e.revision());
        let store = self.clone();
        let live_part = async_stream(move |tx| async move {
            loop {
                match live.recv().await {
                    Ok(e) => {
                        if e.revision() < next || !e.key().starts_with(&prefix) {
                            continue;
                        }
                        next = e.revision();
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Catch up from history, then go on live.
                        let missed: Vec<Event> = {
                            let history = lock(&store.inner.history);
                            history
                                .iter()
                                .filter(|e| e.revision() > next)
                                .cloned()
                                .collect()
                        };
                        for e in missed {
                            if !e.key().starts_with(&prefix) {
                                continue;
                            }
                            next = e.revision();
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        // Events of one transaction share a revision: the history part may
        // already hold some of the live part's first revision, so the live
        // part skips revisions below `next` only (equal ones are new keys of
        // the same transaction and are filtered by the dedupe below).
        let seen_last: Option<(u64, String)> =
            past.last().map(|e| (e.revision(), e.key().to_string()));
        let past_keys: BTreeSet<(u64, String)> = past
            .iter()
            .filter(|e| Some(e.revision()) == seen_last.as_ref().map(|s| s.0))
            .map(|e| (e.revision(), e.key().to_string()))
            .collect();
        let live_part = live_part.filter(move |r| {
            let dup =
                matches!(r, Ok(e) if past_keys.contains(&(e.revision(), e.key().to_string())));
            futures::future::ready(!dup)
        });
        Ok(futures::stream::iter(past.into_iter().map(Ok))
            .chain(live_part)
            .boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let mut leases = lock(&self.inner.leases);
        leases.next += 1;
        let id = leases.next;
        leases
            .active
            .insert(id, (ttl, Instant::now() + ttl, BTreeSet::new()));
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut leases = lock(&self.inner.leases);
        match leases.active.get_mut(&lease) {
            Some((ttl, deadline, _)) => {
                *deadline = Instant::now() + *ttl;
                Ok(())
            }
            None => Err(Error::LeaseExpired { lease }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let keys = lock(&self.inner.leases).active.remove(&lease).map(|l| l.2);
        match keys {
            Some(keys) => {
                let s = self.clone();
                self.call("lease", move || s.delete_leased(lease, keys))
                    .await
            }
            None => Err(Error::LeaseExpired { lease }),
        }
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.inner.path)
    }
}

/// A stream fed by a task: `f` gets a sender and runs until it returns or
/// the stream is dropped.
pub(crate) fn async_stream<F, Fut>(
    f: F,
) -> impl futures::Stream<Item = Result<Event>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(LIVE_EVENTS_MAX);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::Embedded::open(dir.path().join("meta.redb")).expect("open");
        crate::conformance::run(std::sync::Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_in_memory() {
        let store = super::Embedded::in_memory().expect("in-memory store");
        crate::conformance::run(std::sync::Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_reopen_and_drops_orphaned_leased_keys() {
        use crate::{MetaStore, Op, Txn};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.redb");
        {
            let s = super::Embedded::open(&path).expect("open");
            let lease = s
                .grant_lease(std::time::Duration::from_secs(60))
                .await
                .expect("lease");
            s.txn(Txn::default().and_then(vec![
                Op::Put("k".into(), "v".into()),
                Op::PutLeased("live".into(), "x".into(), lease),
            ]))
            .await
            .expect("txn");
        }
        let s = super::Embedded::open(&path).expect("reopen");
        let kv = s.get("k").await.expect("get").expect("present");
        assert_eq!(&kv.value[..], b"v");
        assert_eq!(kv.mod_revision, 1);
        assert!(
            s.get("live").await.expect("get").is_none(),
            "its lease died with the process"
        );
    }
}

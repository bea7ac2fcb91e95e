use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
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
    storage: Storage,
    path: String,
    /// Held by a transaction from its write until its events are
    /// published, so that watchers get revisions in order (two writers
    /// publishing after their commits could otherwise swap, and a watcher
    /// skips a revision older than one it has seen).
    writer: Mutex<()>,
    history: Mutex<VecDeque<Event>>,
    live: broadcast::Sender<Event>,
    leases: Mutex<Leases>,
    /// A transaction whose commit failed with an I/O error: the revision
    /// it would have written and its events. Whether it landed is known
    /// only once the file is reopened; its events are published then if
    /// it did, so watchers see every revision.
    unsettled: Mutex<Option<(u64, Vec<Event>)>>,
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
    ($op:expr, $e:expr) => {
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
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        Self::open_with(shown, move || {
            Database::create(&path).map_err(|e| e.to_string())
        })
    }

    /// Opens the store with `open`, which is called again to reopen the
    /// file after an I/O error (tests pass a backend that fails on demand).
    fn open_with(
        path: String,
        open: impl Fn() -> std::result::Result<Database, String> + Send + Sync + 'static,
    ) -> Result<Self> {
        let db = open().map_err(|e| Error::Unavailable {
            op: "open",
            reason: format!("{path}: {e}"),
        })?;
        Self::with_database(db, Box::new(open), path)
    }

    /// A store that lives in memory only, for tests and simulation: the
    /// same transactions, watches and leases as the file-backed store, on
    /// a sorted map instead of redb (whose commit costs dominated the
    /// commit-log simulation), its calls run inline.
    pub fn in_memory() -> Result<Self> {
        Self::with_storage(Storage::Map(Mutex::default()), "memory".to_string())
    }

    fn with_database(db: Database, open: Box<Opener>, path: String) -> Result<Self> {
        let w = redb_try!("open", db.begin_write());
        {
            redb_try!("open", w.open_table(KV));
            redb_try!("open", w.open_table(STATE));
        }
        redb_try!("open", w.commit());
        let file = RedbFile {
            db: RwLock::new(Some(db)),
            open,
            failed: Mutex::new(None),
            logged: Mutex::new(None),
        };
        Self::with_storage(Storage::Redb(file), path)
    }

    fn with_storage(storage: Storage, path: String) -> Result<Self> {
        let (live, _) = broadcast::channel(LIVE_EVENTS_MAX);
        let store = Self {
            inner: Arc::new(Inner {
                storage,
                path,
                writer: Mutex::new(()),
                history: Mutex::new(VecDeque::new()),
                live,
                leases: Mutex::new(Leases::default()),
                unsettled: Mutex::new(None),
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
        let mut orphans = Vec::new();
        for (k, v) in self.inner.storage.scan("open", "", None, usize::MAX)? {
            if decode(&k, &v)?.lease != 0 {
                orphans.push(Op::Delete(k));
            }
        }
        for chunk in orphans.chunks(Txn::OPS_MAX) {
            self.txn_blocking(Txn::default().and_then(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// After an I/O error redb refuses every call until the file is
    /// reopened (a full disk, for example, poisons it for good). Reopens
    /// it, at most every [`REOPEN_INTERVAL`], and settles the transaction
    /// whose commit failed: its events are published if it landed.
    fn recover(&self) -> Result<()> {
        let Storage::Redb(file) = &self.inner.storage else {
            return Ok(());
        };
        if lock(&file.failed).is_none() {
            return Ok(());
        }
        let _writer = lock(&self.inner.writer);
        let reason = match &*lock(&file.failed) {
            None => return Ok(()),
            Some(f) if f.tried.elapsed() < REOPEN_INTERVAL => {
                return Err(Error::Unavailable {
                    op: "reopen",
                    reason: format!(
                        "{}: closed after an I/O error: {}",
                        self.inner.path, f.reason
                    ),
                })
            }
            Some(f) => f.reason.clone(),
        };
        if let Err(e) = file.reopen() {
            let mut failed = lock(&file.failed);
            if let Some(f) = failed.as_mut() {
                f.tried = Instant::now();
            }
            return Err(Error::Unavailable {
                op: "reopen",
                reason: format!(
                    "{}: closed after an I/O error ({reason}); reopening it failed: {e}",
                    self.inner.path
                ),
            });
        }
        let durable = self.inner.storage.revision()?;
        match lock(&self.inner.unsettled).take() {
            Some((revision, events)) if revision == durable => {
                tracing::warn!(path = %self.inner.path, revision, "the metadata store file was reopened after an I/O error; the transaction that failed had landed");
                self.publish(events);
            }
            _ => {
                tracing::debug!(path = %self.inner.path, revision = durable, "the metadata store file was reopened after an I/O error ({reason})");
            }
        }
        Ok(())
    }

    fn get_blocking(&self, key: &str) -> Result<Option<KeyValue>> {
        self.recover()?;
        match self.inner.storage.get("get", key)? {
            Some(v) => Ok(Some(decode(key, &v)?.kv)),
            None => Ok(None),
        }
    }

    fn range_blocking(&self, start: &str, end: &str, limit: usize) -> Result<Vec<KeyValue>> {
        if start >= end {
            return Ok(Vec::new());
        }
        self.recover()?;
        self.inner
            .storage
            .scan("range", start, Some(end), limit)?
            .into_iter()
            .map(|(k, v)| decode(&k, &v).map(|r| r.kv))
            .collect()
    }

    fn revision_blocking(&self) -> Result<u64> {
        self.recover()?;
        self.inner.storage.revision()
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
        self.recover()?;
        let _writer = lock(&self.inner.writer);
        let mut events = Vec::new();
        let mut leased = Vec::new();
        let mut attempted = None;
        let outcome = self.inner.storage.write(|kv, revision| {
            let mut holds = true;
            for c in &txn.compares {
                let cur = kv.get(c.key())?.map(|v| decode(c.key(), &v)).transpose()?;
                holds &= match c {
                    Compare::ModRevision(_, want) => cur.map_or(0, |r| r.kv.mod_revision) == *want,
                    Compare::Value(_, want) => cur.is_some_and(|r| r.kv.value == *want),
                    Compare::CreateRevision(_, want) => {
                        cur.map_or(0, |r| r.kv.create_revision) == *want
                    }
                };
            }
            let ops = if holds { &txn.success } else { &txn.failure };
            if !ops.is_empty() {
                *revision += 1;
                for op in ops {
                    match op {
                        Op::Put(key, value) | Op::PutLeased(key, value, _) => {
                            let lease = match op {
                                Op::PutLeased(_, _, l) => *l,
                                _ => 0,
                            };
                            let create = match kv.get(key)? {
                                Some(v) => decode(key, &v)?.kv.create_revision,
                                None => *revision,
                            };
                            kv.insert(key, encode(create, *revision, lease, value))?;
                            if lease != 0 {
                                leased.push((key.clone(), lease));
                            }
                            events.push(Event::Put(KeyValue {
                                key: key.clone(),
                                value: value.clone(),
                                create_revision: create,
                                mod_revision: *revision,
                            }));
                        }
                        Op::Delete(key) => {
                            if kv.remove(key)? {
                                events.push(Event::Delete {
                                    key: key.clone(),
                                    mod_revision: *revision,
                                });
                            }
                        }
                    }
                }
            }
            attempted = Some(*revision);
            Ok(TxnOutcome {
                succeeded: holds,
                revision: *revision,
            })
        });
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                if self.inner.storage.failed() {
                    // The commit may have landed: settled on reopening.
                    *lock(&self.inner.unsettled) = attempted.map(|r| (r, events));
                }
                return Err(e);
            }
        };
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
        let mut mine = Vec::new();
        for k in keys {
            if let Some(v) = self.inner.storage.get("lease", &k)? {
                if decode(&k, &v)?.lease == lease {
                    mine.push(Op::Delete(k));
                }
            }
        }
        for chunk in mine.chunks(Txn::OPS_MAX) {
            self.txn_blocking(Txn::default().and_then(chunk.to_vec()))?;
        }
        Ok(())
    }
}

fn sweep_leases(store: Weak<Inner>) {
    // A store that cannot write fails every sweep: one line per 10 s.
    let mut warned: Option<Instant> = None;
    loop {
        std::thread::sleep(LEASE_SWEEP_INTERVAL);
        let Some(inner) = store.upgrade() else {
            return;
        };
        let e = Embedded { inner };
        if let Err(err) = e.recover().and_then(|()| e.expire_leases(Instant::now())) {
            if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(error = %err, "expiring leases failed; will retry");
                warned = Some(Instant::now());
            }
        }
    }
}

/// Where the records live.
enum Storage {
    /// A redb file: durable, one writer at a time.
    Redb(RedbFile),
    /// A sorted map under a lock (in-memory stores).
    Map(Mutex<MapState>),
}

/// Opens (or reopens) the redb file; its error is the message (redb's
/// error types are large).
type Opener = dyn Fn() -> std::result::Result<Database, String> + Send + Sync;

/// How often a store closed by an I/O error tries to reopen its file.
const REOPEN_INTERVAL: Duration = Duration::from_millis(500);

/// A redb file that is closed after an I/O error and reopened later.
struct RedbFile {
    /// None while closed.
    db: RwLock<Option<Database>>,
    open: Box<Opener>,
    /// Why the file was closed, and when reopening was last tried.
    failed: Mutex<Option<Failed>>,
    /// When an I/O error was last logged.
    logged: Mutex<Option<Instant>>,
}

struct Failed {
    reason: String,
    tried: Instant,
}

impl RedbFile {
    /// Runs `f` on the open database, or says why the file is closed.
    fn with<T>(&self, op: &'static str, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        match db.as_ref() {
            Some(db) => f(db),
            None => {
                let reason = lock(&self.failed)
                    .as_ref()
                    .map_or_else(|| "closed".to_string(), |f| f.reason.clone());
                Err(Error::Unavailable {
                    op,
                    reason: format!("closed after an I/O error: {reason}"),
                })
            }
        }
    }

    /// Maps a redb error; an I/O error (or redb's "a previous I/O error
    /// occurred") closes the file, to be reopened by the next call.
    fn failure(&self, op: &'static str, e: redb::Error) -> Error {
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            let mut failed = lock(&self.failed);
            if failed.is_none() {
                // A full disk fails every write: one line per 10 s.
                let mut logged = lock(&self.logged);
                if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::error!(error = %e, "the metadata store file hit an I/O error; closing it, to reopen (further errors within 10 s are not logged)");
                    *logged = Some(Instant::now());
                }
                *failed = Some(Failed {
                    reason: e.to_string(),
                    // Due at once: the next call reopens.
                    tried: Instant::now()
                        .checked_sub(REOPEN_INTERVAL)
                        .unwrap_or_else(Instant::now),
                });
            }
        }
        unavailable(op)(e)
    }

    /// Drops the database (and its file lock) and opens the file again;
    /// redb recovers it to its last durable commit.
    fn reopen(&self) -> std::result::Result<(), String> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        *db = None;
        *db = Some((self.open)()?);
        *lock(&self.failed) = None;
        Ok(())
    }
}

#[derive(Default)]
struct MapState {
    kv: BTreeMap<String, Vec<u8>>,
    revision: u64,
}

/// The records a transaction reads and writes, whatever the storage.
trait Records {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn insert(&mut self, key: &str, record: Vec<u8>) -> Result<()>;
    /// Whether the key was there.
    fn remove(&mut self, key: &str) -> Result<bool>;
}

impl Records for redb::Table<'_, &'static str, &'static [u8]> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(redb_try!("txn", ReadableTable::get(self, key)).map(|v| v.value().to_vec()))
    }

    fn insert(&mut self, key: &str, record: Vec<u8>) -> Result<()> {
        redb_try!("txn", redb::Table::insert(self, key, record.as_slice()));
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool> {
        Ok(redb_try!("txn", redb::Table::remove(self, key)).is_some())
    }
}

impl Records for BTreeMap<String, Vec<u8>> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(BTreeMap::get(self, key).cloned())
    }

    fn insert(&mut self, key: &str, record: Vec<u8>) -> Result<()> {
        BTreeMap::insert(self, key.to_string(), record);
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool> {
        Ok(BTreeMap::remove(self, key).is_some())
    }
}

impl Storage {
    /// Whether the file was closed by an I/O error.
    fn failed(&self) -> bool {
        matches!(self, Storage::Redb(f) if lock(&f.failed).is_some())
    }

    fn get(&self, op: &'static str, key: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Storage::Redb(file) => file.with(op, |db| {
                let fail = |e: redb::Error| file.failure(op, e);
                let r = db.begin_read().map_err(|e| fail(e.into()))?;
                let t = r.open_table(KV).map_err(|e| fail(e.into()))?;
                Ok(t.get(key)
                    .map_err(|e| fail(e.into()))?
                    .map(|v| v.value().to_vec()))
            }),
            Storage::Map(m) => Ok(lock(m).kv.get(key).cloned()),
        }
    }

    /// Records with keys in `[start, end)` (no end: to the last key).
    fn scan(
        &self,
        op: &'static str,
        start: &str,
        end: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let bounds = (Included(start), end.map_or(Unbounded, Excluded));
        match self {
            Storage::Redb(file) => file.with(op, |db| {
                let fail = |e: redb::Error| file.failure(op, e);
                let r = db.begin_read().map_err(|e| fail(e.into()))?;
                let t = r.open_table(KV).map_err(|e| fail(e.into()))?;
                let mut out = Vec::new();
                for item in t
                    .range::<&str>(bounds)
                    .map_err(|e| fail(e.into()))?
                    .take(limit)
                {
                    let (k, v) = item.map_err(|e| fail(e.into()))?;
                    out.push((k.value().to_string(), v.value().to_vec()));
                }
                Ok(out)
            }),
            Storage::Map(m) => Ok(lock(m)
                .kv
                .range::<str, _>(bounds)
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
        }
    }

    fn revision(&self) -> Result<u64> {
        match self {
            Storage::Redb(file) => file.with("revision", |db| {
                let fail = |e: redb::Error| file.failure("revision", e);
                let r = db.begin_read().map_err(|e| fail(e.into()))?;
                let t = r.open_table(STATE).map_err(|e| fail(e.into()))?;
                Ok(t.get(REVISION)
                    .map_err(|e| fail(e.into()))?
                    .map(|v| v.value())
                    .unwrap_or(0))
            }),
            Storage::Map(m) => Ok(lock(m).revision),
        }
    }

    /// Runs `f` as one serializable transaction over the records and the
    /// store's revision; what it changed is kept only if it returns `Ok`
    /// (the map applies as it goes: its records always decode, so `f`
    /// cannot fail half way there).
    fn write<T>(&self, f: impl FnOnce(&mut dyn Records, &mut u64) -> Result<T>) -> Result<T> {
        match self {
            Storage::Redb(file) => file.with("txn", |db| {
                let fail = |e: redb::Error| file.failure("txn", e);
                let w = db.begin_write().map_err(|e| fail(e.into()))?;
                let out = {
                    let mut kv = w.open_table(KV).map_err(|e| fail(e.into()))?;
                    let mut state = w.open_table(STATE).map_err(|e| fail(e.into()))?;
                    let before = state
                        .get(REVISION)
                        .map_err(|e| fail(e.into()))?
                        .map(|v| v.value())
                        .unwrap_or(0);
                    let mut revision = before;
                    let out = f(&mut kv, &mut revision)?;
                    if revision != before {
                        state
                            .insert(REVISION, revision)
                            .map_err(|e| fail(e.into()))?;
                    }
                    out
                };
                w.commit().map_err(|e| fail(e.into()))?;
                Ok(out)
            }),
            Storage::Map(m) => {
                let mut m = lock(m);
                let MapState { kv, revision } = &mut *m;
                f(kv, revision)
            }
        }
    }
}

impl Embedded {
    /// Runs a store call: on tokio's blocking pool for a file, on the
    /// caller's thread for memory.
    async fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        // In memory there is no file I/O to keep off the async executor.
        if matches!(self.inner.storage, Storage::Map(_)) {
            // Still a point where other tasks run, as a call over the
            // network (or to the blocking pool) is: the simulation's
            // interleavings depend on it.
            tokio::task::yield_now().await;
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
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::atomic::{AtomicBool, AtomicI64};
    use std::sync::Arc;

    use futures::StreamExt;
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

    /// Writers racing on several threads: a watcher still gets every
    /// revision, in order (a writer publishing after a later one would make
    /// the watcher skip its event).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_writers_reach_a_watcher_in_order() {
        use crate::{MetaStore, Op, Txn};
        use futures::StreamExt;
        let store = std::sync::Arc::new(super::Embedded::in_memory().expect("in-memory store"));
        let mut watch = store.watch("race/", 0).await.expect("watch");
        const WRITERS: usize = 8;
        const EACH: usize = 300;
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let s = store.clone();
                tokio::spawn(async move {
                    for i in 0..EACH {
                        let key = format!("race/{w}/{i}");
                        s.txn(Txn::default().and_then(vec![Op::Put(key, "v".into())]))
                            .await
                            .expect("txn");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer");
        }
        let mut last = 0;
        for n in 0..WRITERS * EACH {
            let e = tokio::time::timeout(std::time::Duration::from_secs(10), watch.next())
                .await
                .unwrap_or_else(|_| panic!("event {n} of {} never came", WRITERS * EACH))
                .expect("watch open")
                .expect("event");
            assert!(
                e.revision() > last,
                "revision {} after {last}",
                e.revision()
            );
            last = e.revision();
        }
    }

    /// A file backend that fails on demand: every write while `full`
    /// (ENOSPC), and the `sync_fails`-th sync from now (1: the next).
    #[derive(Debug)]
    struct Flaky {
        file: redb::backends::FileBackend,
        full: Arc<AtomicBool>,
        sync_fails: Arc<AtomicI64>,
    }

    fn no_space() -> std::io::Error {
        std::io::Error::from_raw_os_error(28)
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            self.file.read(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            if self.full.load(SeqCst) {
                return Err(no_space());
            }
            self.file.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
            if self.sync_fails.fetch_sub(1, SeqCst) == 1 {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            self.file.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            if self.full.load(SeqCst) {
                return Err(no_space());
            }
            self.file.write(offset, data)
        }
    }

    fn flaky(path: &std::path::Path) -> (super::Embedded, Arc<AtomicBool>, Arc<AtomicI64>) {
        let full = Arc::new(AtomicBool::new(false));
        let sync_fails = Arc::new(AtomicI64::new(0));
        let (f, n, p) = (full.clone(), sync_fails.clone(), path.to_path_buf());
        let store = super::Embedded::open_with(p.display().to_string(), move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(|e| e.to_string())?;
            let backend = Flaky {
                file: redb::backends::FileBackend::new(file).map_err(|e| e.to_string())?,
                full: f.clone(),
                sync_fails: n.clone(),
            };
            redb::Database::builder()
                .create_with_backend(backend)
                .map_err(|e| e.to_string())
        })
        .expect("open");
        (store, full, sync_fails)
    }

    /// Puts `key` until the store takes it (it reopens its file at most
    /// every REOPEN_INTERVAL); panics after 10 s.
    async fn put_when_healed(s: &super::Embedded, key: &str) -> u64 {
        use crate::{MetaStore, Op, Txn};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match s
                .txn(Txn::default().and_then(vec![Op::Put(key.into(), "v".into())]))
                .await
            {
                Ok(o) => return o.revision,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(matches!(e, crate::Error::Unavailable { .. }), "{e}");
                    tokio::time::sleep(super::REOPEN_INTERVAL / 4).await;
                }
                Err(e) => panic!("the store did not heal: {e}"),
            }
        }
    }

    /// The revisions and keys a watch from revision 1 has delivered.
    async fn watched(w: &mut crate::Watch, until: u64) -> Vec<(u64, String)> {
        let mut seen = Vec::new();
        while seen.last().is_none_or(|(r, _)| *r < until) {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), w.next())
                .await
                .expect("an event within 5 s")
                .expect("stream open")
                .expect("event");
            seen.push((e.revision(), e.key().to_string()));
        }
        seen
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_closes_the_file_until_it_can_be_reopened() {
        use crate::{MetaStore, Op, Txn};
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, full, _) = flaky(&dir.path().join("meta.redb"));
        let mut w = s.watch("k", 1).await.expect("watch");
        assert_eq!(put_when_healed(&s, "k1").await, 1);
        full.store(true, SeqCst);
        let put = Txn::default().and_then(vec![Op::Put("k2".into(), "v".into())]);
        let e = s.txn(put).await.unwrap_err();
        assert!(matches!(e, crate::Error::Unavailable { .. }), "{e}");
        // redb must repair the file after the failed commit, which writes:
        // reopening fails while the disk is full, and the store stays closed.
        assert!(s.get("k1").await.is_err(), "closed until reopened");
        full.store(false, SeqCst);
        let r = put_when_healed(&s, "k3").await;
        assert_eq!(s.get("k1").await.expect("get").expect("k1").mod_revision, 1);
        let landed = s.get("k2").await.expect("get").is_some();
        assert_eq!(r, if landed { 3 } else { 2 });
        let mut want = vec![(1, "k1".to_string())];
        if landed {
            want.push((2, "k2".to_string()));
        }
        want.push((r, "k3".to_string()));
        assert_eq!(watched(&mut w, r).await, want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fsync_is_settled_on_reopening() {
        use crate::MetaStore;
        // redb 2 commits with one fsync, after writing the commit: failing
        // it leaves a commit that landed but reported an error, the case
        // the settling on reopening exists for.
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _, sync_fails) = flaky(&dir.path().join("meta.redb"));
        let mut w = s.watch("k", 1).await.expect("watch");
        assert_eq!(put_when_healed(&s, "k1").await, 1);
        sync_fails.store(1, SeqCst);
        let first = s
            .txn(crate::Txn::default().and_then(vec![crate::Op::Put("k2".into(), "v".into())]))
            .await;
        assert!(first.is_err(), "the injected fsync failure is reported");
        let r = put_when_healed(&s, "k3").await;
        assert!(
            s.get("k2").await.expect("get").is_some(),
            "the commit landed before its fsync failed"
        );
        assert_eq!(r, 3);
        // Its event was published on reopening: no revision is skipped.
        let want = [(1, "k1"), (2, "k2"), (3, "k3")].map(|(r, k)| (r, k.to_string()));
        assert_eq!(watched(&mut w, r).await, want);
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

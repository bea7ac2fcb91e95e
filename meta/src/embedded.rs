use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition};

use crate::{Compare, Error, KeyValue, MetaStore, Op, Result, Txn, TxnOutcome};

/// key -> create_revision (u64 LE) · mod_revision (u64 LE) · value
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// "revision" -> the store-wide revision
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const REVISION: &str = "revision";
const HEADER_BYTES: usize = 16;

/// The embedded metadata backend: one redb file, written with immediate
/// durability (a transaction is fsynced before it is reported). redb allows
/// one writer at a time, so transactions are serializable, and it locks the
/// file, so two brokers cannot open the same data dir by accident.
#[derive(Clone)]
pub struct Embedded {
    db: Arc<Database>,
    path: String,
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

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue> {
    if raw.len() < HEADER_BYTES {
        return Err(Error::Corrupt {
            key: key.to_string(),
            reason: format!("{} byte record is shorter than its header", raw.len()),
        });
    }
    let (create, rest) = raw.split_at(8);
    let (modr, value) = rest.split_at(8);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    Ok(KeyValue {
        key: key.to_string(),
        value: Bytes::copy_from_slice(value),
        create_revision: word(create),
        mod_revision: word(modr),
    })
}

fn encode(create: u64, modr: u64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_BYTES + value.len());
    v.extend_from_slice(&create.to_le_bytes());
    v.extend_from_slice(&modr.to_le_bytes());
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
        let w = redb_try!("open", db.begin_write());
        {
            redb_try!("open", w.open_table(KV));
            redb_try!("open", w.open_table(STATE));
        }
        redb_try!("open", w.commit());
        Ok(Self {
            db: Arc::new(db),
            path: path.display().to_string(),
        })
    }

    fn get_blocking(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = redb_try!("get", self.db.begin_read());
        let t = redb_try!("get", r.open_table(KV));
        match redb_try!("get", t.get(key)) {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn range_blocking(&self, start: &str, end: &str, limit: usize) -> Result<Vec<KeyValue>> {
        let r = redb_try!("range", self.db.begin_read());
        let t = redb_try!("range", r.open_table(KV));
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        for item in redb_try!("range", t.range(start..end)).take(limit) {
            let (k, v) = redb_try!("range", item);
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn txn_blocking(&self, txn: Txn) -> Result<TxnOutcome> {
        let ops = txn.compares.len() + txn.success.len().max(txn.failure.len());
        if ops > Txn::OPS_MAX {
            return Err(Error::TooManyOps {
                ops,
                limit: Txn::OPS_MAX,
            });
        }
        let w = redb_try!("txn", self.db.begin_write());
        let outcome = {
            let mut kv = redb_try!("txn", w.open_table(KV));
            let mut state = redb_try!("txn", w.open_table(STATE));
            let mut revision = redb_try!("txn", state.get(REVISION))
                .map(|v| v.value())
                .unwrap_or(0);
            let mut holds = true;
            for c in &txn.compares {
                let (key, ok) = match c {
                    Compare::ModRevision(key, want) => {
                        let cur = match redb_try!("txn", kv.get(key.as_str())) {
                            Some(v) => decode(key, v.value())?.mod_revision,
                            None => 0,
                        };
                        (key, cur == *want)
                    }
                    Compare::Value(key, want) => {
                        let ok = match redb_try!("txn", kv.get(key.as_str())) {
                            Some(v) => decode(key, v.value())?.value == *want,
                            None => false,
                        };
                        (key, ok)
                    }
                };
                let _ = key;
                holds &= ok;
            }
            let ops = if holds { &txn.success } else { &txn.failure };
            if !ops.is_empty() {
                revision += 1;
                for op in ops {
                    match op {
                        Op::Put(key, value) => {
                            let create = match redb_try!("txn", kv.get(key.as_str())) {
                                Some(v) => decode(key, v.value())?.create_revision,
                                None => revision,
                            };
                            let rec = encode(create, revision, value);
                            redb_try!("txn", kv.insert(key.as_str(), rec.as_slice()));
                        }
                        Op::Delete(key) => {
                            redb_try!("txn", kv.remove(key.as_str()));
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
        Ok(outcome)
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
        blocking("get", move || s.get_blocking(&key)).await
    }

    async fn range(&self, start: &str, end: &str, limit: usize) -> Result<Vec<KeyValue>> {
        let (s, start, end) = (self.clone(), start.to_string(), end.to_string());
        blocking("range", move || s.range_blocking(&start, &end, limit)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let s = self.clone();
        blocking("txn", move || s.txn_blocking(txn)).await
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.path)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::Embedded::open(dir.path().join("meta.redb")).expect("open");
        crate::conformance::run(std::sync::Arc::new(store)).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        use crate::{MetaStore, Op, Txn};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.redb");
        {
            let s = super::Embedded::open(&path).expect("open");
            s.txn(Txn::default().and_then(vec![Op::Put("k".into(), "v".into())]))
                .await
                .expect("txn");
        }
        let s = super::Embedded::open(&path).expect("reopen");
        let kv = s.get("k").await.expect("get").expect("present");
        assert_eq!(&kv.value[..], b"v");
        assert_eq!(kv.mod_revision, 1);
    }
}

//! Snapshots of the log state, and trimming the log behind them.
//!
//! A snapshot is the [`super::LogState`] after one entry, written as one
//! JSON object under `snapshots/` in the object store; `log/snapshot` in
//! the metadata store points at the newest. A starting broker loads it
//! instead of replaying the whole log. Once a snapshot is in place, log
//! entries more than [`LOG_KEEP_ENTRIES`] behind it are deleted.

use bytes::Bytes;
use floe_meta::schema::{self, SnapshotPointer};
use floe_meta::{Compare, MetaStore, Op, Txn};
use floe_objstore::ObjectStore;

use crate::sequencer::SequencerState;
use crate::{Error, PartitionKey, Result};

/// A snapshot is written after every this many log entries (by the broker
/// that wrote the entry).
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 500;
/// Log entries kept behind the newest snapshot, for brokers that lag.
pub const LOG_KEEP_ENTRIES: u64 = 1000;
const _: () = assert!(LOG_KEEP_ENTRIES >= SNAPSHOT_EVERY_ENTRIES);

/// One readable batch in the log state's index (and in snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "IndexedBatchWire", into = "IndexedBatchWire")]
pub struct IndexedBatch {
    pub base_offset: u64,
    pub records: u32,
    pub max_ts: i64,
    /// The segment's number in the state's (or snapshot's) segment list.
    pub segment: u32,
    /// Where the batch sits in its segment.
    pub pos: u64,
    pub len: u32,
}

impl IndexedBatch {
    /// The offset after the batch's last record.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.records)
    }
}

/// The snapshot encoding of an [`IndexedBatch`]: a JSON array, as every
/// snapshot written so far has it (and about half the bytes of an object).
type IndexedBatchWire = (u64, u32, i64, u32, u64, u32);

impl From<IndexedBatchWire> for IndexedBatch {
    fn from((base_offset, records, max_ts, segment, pos, len): IndexedBatchWire) -> Self {
        Self {
            base_offset,
            records,
            max_ts,
            segment,
            pos,
            len,
        }
    }
}

impl From<IndexedBatch> for IndexedBatchWire {
    fn from(b: IndexedBatch) -> Self {
        (b.base_offset, b.records, b.max_ts, b.segment, b.pos, b.len)
    }
}

/// The derived state after a log entry: what a starting broker loads
/// instead of replaying the log from the beginning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub seq: u64,
    pub sequencer: SequencerState,
    pub segments: Vec<String>,
    pub index: Vec<(PartitionKey, Vec<IndexedBatch>)>,
}

impl Snapshot {
    pub fn encode(&self) -> Result<Bytes> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| Error::Corrupt {
                what: format!("snapshot {}", self.seq),
                reason: e.to_string(),
            })
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
            what: format!("snapshot {key}"),
            reason: e.to_string(),
        })
    }
}

/// The object key of the snapshot after entry `seq`.
pub fn snapshot_key(seq: u64) -> String {
    format!("{}{seq:020}.json", crate::retention::SNAPSHOTS_PREFIX)
}

/// Reads where `log/snapshot` points, if anywhere.
pub async fn read_pointer(meta: &dyn MetaStore) -> Result<Option<SnapshotPointer>> {
    let Some(kv) = meta.get(schema::LOG_SNAPSHOT).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&kv.value)
        .map(Some)
        .map_err(|e| Error::Corrupt {
            what: schema::LOG_SNAPSHOT.to_string(),
            reason: e.to_string(),
        })
}

/// Stores a snapshot after entry `seq`, points `log/snapshot` at it (only
/// ever forward), and deletes log entries more than `keep` behind it.
pub async fn write_snapshot(
    meta: &dyn MetaStore,
    store: &dyn ObjectStore,
    seq: u64,
    bytes: Bytes,
    keep: u64,
) -> Result<()> {
    let key = snapshot_key(seq);
    store.put(&key, vec![bytes]).await?;
    let ptr = Bytes::from(
        serde_json::to_vec(&SnapshotPointer {
            seq,
            key: key.clone(),
        })
        .map_err(|e| Error::Corrupt {
            what: schema::LOG_SNAPSHOT.to_string(),
            reason: e.to_string(),
        })?,
    );
    let cur = meta.get(schema::LOG_SNAPSHOT).await?;
    let (guard, older) = match &cur {
        Some(kv) => {
            let p: SnapshotPointer =
                serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
                    what: schema::LOG_SNAPSHOT.to_string(),
                    reason: e.to_string(),
                })?;
            (
                Compare::ModRevision(schema::LOG_SNAPSHOT.into(), kv.mod_revision),
                p.seq < seq,
            )
        }
        None => (Compare::ModRevision(schema::LOG_SNAPSHOT.into(), 0), true),
    };
    if !older
        || !meta
            .txn(Txn::when(vec![guard]).and_then(vec![Op::Put(schema::LOG_SNAPSHOT.into(), ptr)]))
            .await?
            .succeeded
    {
        return Ok(());
    }
    tracing::info!(seq, key = %key, "metadata snapshot written");
    // Trim: entries up to seq - keep are no longer needed.
    let Some(upto) = seq.checked_sub(keep) else {
        return Ok(());
    };
    loop {
        let old = meta
            .range(schema::LOG_PREFIX, &schema::log_key(upto + 1), Txn::OPS_MAX)
            .await?;
        if old.is_empty() {
            return Ok(());
        }
        let deletes = old.into_iter().map(|kv| Op::Delete(kv.key)).collect();
        meta.txn(Txn::default().and_then(deletes)).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexed_batches_keep_the_array_encoding_of_older_snapshots() {
        let b = IndexedBatch {
            base_offset: 7,
            records: 3,
            max_ts: -1,
            segment: 2,
            pos: 16,
            len: 100,
        };
        let json = serde_json::to_string(&b).expect("encodes");
        assert_eq!(json, "[7,3,-1,2,16,100]");
        let back: IndexedBatch = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, b);
    }
}

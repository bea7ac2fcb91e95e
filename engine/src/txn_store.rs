//! Transaction records in the metadata store: every change to
//! `txns/<id>` is a read, a transition of [`crate::txn::TxnRecord`], and a
//! compare-and-swap on the revision read, so any broker may change any
//! transactional id and two brokers racing on one cannot both advance it.
//!
//! A write whose reply is lost is settled before it is answered: the
//! record is read again and the transition applied again to what is there
//! (the transitions are written so that applying one to its own result is
//! harmless or refused, never a second change of the same kind).

use bytes::Bytes;
use floe_meta::schema;
use floe_meta::{Compare, MetaStore, Op, Txn};

use crate::txn::{TxnError, TxnRecord};

/// Reads and CAS attempts before a contended update gives up (the client
/// retries: Kafka's clients retry CONCURRENT_TRANSACTIONS and
/// COORDINATOR_LOAD_IN_PROGRESS).
pub const UPDATE_ATTEMPTS_MAX: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnStoreError {
    #[error("{0}")]
    Txn(TxnError),
    /// The metadata store could not be reached, or the record stayed
    /// contended; the outcome of the last write may be unknown.
    #[error("transaction state unavailable: {0}")]
    Unavailable(String),
    #[error("transaction record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

impl From<TxnError> for TxnStoreError {
    fn from(e: TxnError) -> Self {
        TxnStoreError::Txn(e)
    }
}

/// The record of `transactional_id` and the revision it was read at (0:
/// absent).
pub async fn read(
    meta: &dyn MetaStore,
    transactional_id: &str,
) -> Result<(Option<TxnRecord>, u64), TxnStoreError> {
    let key = schema::txn_key(transactional_id);
    let kv = meta
        .get(&key)
        .await
        .map_err(|e| TxnStoreError::Unavailable(e.to_string()))?;
    match kv {
        None => Ok((None, 0)),
        Some(kv) => serde_json::from_slice(&kv.value)
            .map(|r| (Some(r), kv.mod_revision))
            .map_err(|e| TxnStoreError::Corrupt {
                key,
                reason: e.to_string(),
            }),
    }
}

/// Applies `transition` to the record of `transactional_id` (None when it
/// has none) and stores its result by CAS, retrying on contention; returns
/// what the transition returned. A transition that returns an error
/// changes nothing; one that leaves the record as it was writes nothing.
pub async fn update<T>(
    meta: &dyn MetaStore,
    transactional_id: &str,
    mut transition: impl FnMut(Option<TxnRecord>) -> Result<(TxnRecord, T), TxnError>,
) -> Result<T, TxnStoreError> {
    update_with(meta, transactional_id, |current| {
        let (next, answer) = transition(current)?;
        Ok((next, Vec::new(), answer))
    })
    .await
}

/// [`update`], where the transition may also ask for writes to other keys
/// that land in the same store transaction as the record (a commit's
/// offsets land exactly when it completes).
pub async fn update_with<T>(
    meta: &dyn MetaStore,
    transactional_id: &str,
    mut transition: impl FnMut(Option<TxnRecord>) -> Result<(TxnRecord, Vec<Op>, T), TxnError>,
) -> Result<T, TxnStoreError> {
    let key = schema::txn_key(transactional_id);
    let mut last_error = String::from("contended");
    for _ in 0..UPDATE_ATTEMPTS_MAX {
        let (current, revision) = match read(meta, transactional_id).await {
            Ok(r) => r,
            Err(TxnStoreError::Unavailable(e)) => {
                last_error = e;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (next, mut ops, answer) = transition(current.clone())?;
        if current.as_ref() == Some(&next) && ops.is_empty() {
            return Ok(answer);
        }
        let value = serde_json::to_vec(&next).map_err(|e| TxnStoreError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        ops.insert(0, Op::Put(key.clone(), Bytes::from(value)));
        let write = Txn::when(vec![Compare::ModRevision(key.clone(), revision)]).and_then(ops);
        match meta.txn(write).await {
            Ok(o) if o.succeeded => return Ok(answer),
            // Another broker changed it first: apply to what it wrote.
            Ok(_) => {}
            // Unknown outcome: the next read tells. If it landed, the
            // transition runs again on its own result.
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(TxnStoreError::Unavailable(last_error))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use floe_meta::{Embedded, FaultyMeta, MetaFaults};

    use super::*;
    use crate::txn::{InitOutcome, TxnState, TRANSACTION_MAX_TIMEOUT_MS};

    fn init(current: Option<TxnRecord>, fresh: i64) -> Result<(TxnRecord, InitOutcome), TxnError> {
        let mut r = current.unwrap_or_else(|| TxnRecord::new(fresh, 60_000, 0));
        let out = r.init(60_000, TRANSACTION_MAX_TIMEOUT_MS, None, 0, || fresh)?;
        Ok((r, out))
    }

    #[tokio::test]
    async fn acknowledged_changes_survive_racing_brokers_and_lost_replies() {
        for seed in 1..=20u64 {
            let store: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
            let faulty: Arc<dyn MetaStore> = Arc::new(FaultyMeta::new(
                store.clone(),
                MetaFaults {
                    seed,
                    txn_reply_lost: 0.2,
                    txn_refused: 0.1,
                    read_failed: 0.1,
                    ..MetaFaults::none()
                },
            ));
            let (pid, epoch) = match update(&*store, "t", |c| init(c, 7)).await.unwrap() {
                InitOutcome::Ready { producer_id, epoch } => (producer_id, epoch),
                other => panic!("{other:?}"),
            };
            // Two "brokers" add partitions to the same transaction at once,
            // through a store that loses replies and refuses requests.
            let adders = (0..2).map(|b| {
                let meta = faulty.clone();
                tokio::spawn(async move {
                    let mut added = Vec::new();
                    for p in 0..25 {
                        let part = (format!("topic-{b}"), p);
                        let r = update(&*meta, "t", |c| {
                            let mut r = c.ok_or(TxnError::InvalidProducerIdMapping)?;
                            r.add(pid, epoch, std::slice::from_ref(&part), &[], 1)?;
                            Ok((r, ()))
                        })
                        .await;
                        if r.is_ok() {
                            added.push(part);
                        }
                    }
                    added
                })
            });
            let mut acknowledged = BTreeSet::new();
            for a in adders {
                acknowledged.extend(a.await.unwrap());
            }
            let (rec, _) = read(&*store, "t").await.unwrap();
            let rec = rec.unwrap();
            assert_eq!(rec.state, TxnState::Ongoing, "seed {seed}");
            assert!(
                acknowledged.is_subset(&rec.partitions),
                "seed {seed}: an acknowledged add is missing"
            );
            // EndTxn through the faults: prepared once, then retried
            // answers agree.
            let prepared = update(&*faulty, "t", |c| {
                let mut r = c.ok_or(TxnError::InvalidProducerIdMapping)?;
                let first = r.end(pid, epoch, true, 2)?;
                Ok((r, first))
            })
            .await;
            let (rec, _) = read(&*store, "t").await.unwrap();
            if prepared.is_ok() {
                assert_eq!(rec.unwrap().state, TxnState::PrepareCommit, "seed {seed}");
            }
        }
    }

    #[tokio::test]
    async fn a_refused_transition_writes_nothing() {
        let store = Embedded::in_memory().unwrap();
        update(&store, "t", |c| init(c, 7)).await.unwrap();
        let (_, before) = read(&store, "t").await.unwrap();
        let e = update(&store, "t", |c| {
            let mut r = c.unwrap();
            r.end(7, 0, true, 1)?;
            Ok((r, ()))
        })
        .await
        .unwrap_err();
        assert_eq!(e, TxnStoreError::Txn(TxnError::ProducerFenced));
        assert_eq!(read(&store, "t").await.unwrap().1, before);
    }
}

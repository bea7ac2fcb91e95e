//! The transaction coordinator's runtime, without a coordinator: every
//! request for a transactional id reads its record (`txns/<id>`), applies
//! one transition of [`TxnRecord`] and writes it back by compare-and-swap
//! ([`txn_store`]); markers go through the commit log like data. Any
//! broker serves any transactional id, and one that finds a record left
//! half done (its broker died between the outcome and `Complete*`)
//! finishes it before going on. The cleanup owner's scan does the same
//! for records nobody asks about, aborts transactions open past their
//! timeout, and forgets idle ids.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use floe_meta::schema::{self, MarkerRecord};
use floe_meta::{MetaStore, Op, Txn};
use futures::channel::oneshot;

use crate::committer::CommitRequest;
use crate::topics::Topics;
use crate::txn::{InitOutcome, PendingOffset, TxnError, TxnRecord, TxnState};
use crate::txn_store::{self, TxnStoreError};

/// Kafka's `transactional.id.expiration.ms` default: 7 days.
pub const TRANSACTIONAL_ID_EXPIRATION_MS: i64 = 7 * 24 * 3600 * 1000;
/// How often the cleanup owner scans the transaction records.
pub const TXN_SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// A record prepared this long ago without completing was left by a
/// broker that died (finishing takes one log entry and one write).
const PREPARED_STALE_MS: i64 = 10_000;
/// Rounds of "finish what is prepared, then try again" per request.
const FINISH_ROUNDS_MAX: usize = 3;
/// Transaction records read per scan.
const SCAN_RECORDS_MAX: usize = 100_000;

fn now_ms() -> i64 {
    crate::health::now_ms() as i64
}

fn unavailable(e: impl std::fmt::Display) -> TxnStoreError {
    TxnStoreError::Unavailable(e.to_string())
}

/// What verification says of a transactional write to one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Part of the producer's open transaction.
    Covered,
    /// A newer instance of the transactional id exists.
    Fenced,
    /// Not added to an open transaction of this producer and epoch.
    NotInTransaction,
}

/// A transaction record as listed by ListTransactions.
#[derive(Debug, Clone)]
pub struct TxnListing {
    pub transactional_id: String,
    pub record: TxnRecord,
}

pub struct Transactions {
    meta: Arc<dyn MetaStore>,
    committer: flume::Sender<CommitRequest>,
    topics: Arc<Topics>,
    /// Kafka's `transaction.max.timeout.ms`.
    pub max_timeout_ms: i32,
    /// Kafka's `transactional.id.expiration.ms`.
    pub id_expiration_ms: i64,
}

impl Transactions {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        committer: flume::Sender<CommitRequest>,
        topics: Arc<Topics>,
        max_timeout_ms: i32,
        id_expiration_ms: i64,
    ) -> Self {
        Self {
            meta,
            committer,
            topics,
            max_timeout_ms,
            id_expiration_ms,
        }
    }

    async fn new_producer_id(&self) -> Result<i64, TxnStoreError> {
        floe_meta::take_next(
            &*self.meta,
            schema::PRODUCERS_NEXT,
            crate::engine::PRODUCER_ID_FIRST,
        )
        .await
        .map_err(unavailable)
    }

    /// InitProducerId with a transactional id: the id's producer at a new
    /// epoch, fencing the previous instance. A transaction it left open
    /// is aborted first, one left prepared is finished first.
    pub async fn init(
        &self,
        id: &str,
        timeout_ms: i32,
        expected: Option<(i64, i16)>,
    ) -> Result<(i64, i16), TxnStoreError> {
        for _ in 0..FINISH_ROUNDS_MAX {
            let (current, _) = txn_store::read(&*self.meta, id).await?;
            // A new id, or one whose epochs run out, needs a producer id
            // from the counter (an async call, so taken before the CAS; a
            // race that needs one after all retries the round).
            let fresh = if current.as_ref().is_none_or(|r| r.epoch >= i16::MAX - 2) {
                Some(self.new_producer_id().await?)
            } else {
                None
            };
            let max = self.max_timeout_ms;
            let outcome = txn_store::update(&*self.meta, id, |c| {
                let now = now_ms();
                let missing = std::cell::Cell::new(false);
                let mut r = match c {
                    Some(r) => r,
                    None => TxnRecord::new(
                        fresh.ok_or(TxnError::ConcurrentTransactions)?,
                        timeout_ms,
                        now,
                    ),
                };
                let out = r.init(timeout_ms, max, expected, now, || {
                    fresh.unwrap_or_else(|| {
                        missing.set(true);
                        -1
                    })
                })?;
                if missing.get() {
                    return Err(TxnError::ConcurrentTransactions);
                }
                Ok((r, out))
            })
            .await;
            match outcome {
                Ok(InitOutcome::Ready { producer_id, epoch }) => return Ok((producer_id, epoch)),
                Ok(InitOutcome::AbortFirst)
                | Err(TxnStoreError::Txn(TxnError::ConcurrentTransactions)) => {
                    self.finish(id).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(TxnStoreError::Txn(TxnError::ConcurrentTransactions))
    }

    /// Applies `transition`; when the record is prepared (its markers
    /// being written, or left so by a broker that died), finishes it and
    /// tries again.
    async fn after_finishing<T>(
        &self,
        id: &str,
        mut transition: impl FnMut(TxnRecord, i64) -> Result<(TxnRecord, T), TxnError>,
    ) -> Result<T, TxnStoreError> {
        for _ in 0..FINISH_ROUNDS_MAX {
            let r = txn_store::update(&*self.meta, id, |c| {
                let r = c.ok_or(TxnError::InvalidProducerIdMapping)?;
                transition(r, now_ms())
            })
            .await;
            match r {
                Err(TxnStoreError::Txn(TxnError::ConcurrentTransactions)) => {
                    self.finish(id).await?;
                }
                r => return r,
            }
        }
        Err(TxnStoreError::Txn(TxnError::ConcurrentTransactions))
    }

    /// AddPartitionsToTxn and AddOffsetsToTxn.
    pub async fn add(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, i32)],
        groups: &[String],
    ) -> Result<(), TxnStoreError> {
        self.after_finishing(id, |mut r, now| {
            r.add(producer_id, epoch, partitions, groups, now)?;
            Ok((r, ()))
        })
        .await
    }

    /// KIP-890's verification: whether each partition is part of the
    /// producer's open transaction.
    pub async fn verify(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, i32)],
    ) -> Result<Vec<Verified>, TxnStoreError> {
        let (rec, _) = txn_store::read(&*self.meta, id).await?;
        Ok(partitions
            .iter()
            .map(|p| match &rec {
                Some(r) if r.covers(producer_id, epoch, p) => Verified::Covered,
                Some(r) if r.producer_id == producer_id && r.epoch > epoch => Verified::Fenced,
                _ => Verified::NotInTransaction,
            })
            .collect())
    }

    /// TxnOffsetCommit (the group's checks are the caller's).
    pub async fn stage_offsets(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        group: &str,
        offsets: Vec<PendingOffset>,
    ) -> Result<(), TxnStoreError> {
        txn_store::update(&*self.meta, id, |c| {
            let mut r = c.ok_or(TxnError::InvalidProducerIdMapping)?;
            r.stage_offsets(producer_id, epoch, group, offsets.clone(), now_ms())?;
            Ok((r, ()))
        })
        .await
    }

    /// EndTxn: decides the outcome, writes its markers, completes it. A
    /// retry after a lost answer finds the outcome prepared or complete
    /// and answers the same.
    pub async fn end(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<(), TxnStoreError> {
        let prepared = self
            .after_finishing(id, |mut r, now| {
                let first = r.end(producer_id, epoch, commit, now)?;
                Ok((r, first))
            })
            .await?;
        if prepared {
            self.finish(id).await?;
        }
        Ok(())
    }

    /// Writes the markers of a prepared outcome and completes it; nothing
    /// when the record is not prepared. Safe to run twice, or on two
    /// brokers at once: a marker written twice places nothing more, and
    /// only one `Complete*` lands.
    pub async fn finish(&self, id: &str) -> Result<(), TxnStoreError> {
        let (current, _) = txn_store::read(&*self.meta, id).await?;
        let Some(rec) = current.filter(|r| r.state.is_preparing()) else {
            return Ok(());
        };
        let commit = rec.state == TxnState::PrepareCommit;
        let topics = self.topics.snapshot();
        // A partition of a topic deleted since gets no marker.
        let partitions: Vec<(uuid::Uuid, u32)> = rec
            .partitions
            .iter()
            .filter_map(|(name, p)| {
                let t = topics.get(name.as_str())?;
                let p = u32::try_from(*p).ok().filter(|p| *p < t.partitions)?;
                Some((t.id, p))
            })
            .collect();
        if !partitions.is_empty() {
            self.write_markers(vec![MarkerRecord {
                producer_id: rec.producer_id,
                epoch: rec.epoch,
                commit,
                partitions,
            }])
            .await?;
        }
        crate::crash::point("txn-markers-written");
        // The offsets a commit publishes land with `Complete*`; more than
        // one store transaction holds are written just before it (after
        // the markers: never visible before the commit is decided in the
        // log).
        let offsets = rec.clone().complete(now_ms()).map_err(TxnStoreError::Txn)?;
        let mut ops = offset_ops(&offsets)?;
        if ops.len() >= Txn::OPS_MAX {
            for chunk in ops.chunks(Txn::OPS_MAX) {
                self.meta
                    .txn(Txn::default().and_then(chunk.to_vec()))
                    .await
                    .map_err(unavailable)?;
            }
            ops.clear();
        }
        txn_store::update_with(&*self.meta, id, |c| {
            let mut r = c.ok_or(TxnError::InvalidTxnState)?;
            if (r.producer_id, r.epoch, r.state) != (rec.producer_id, rec.epoch, rec.state) {
                // Completed by another broker meanwhile.
                return Ok((r, Vec::new(), ()));
            }
            r.complete(now_ms())?;
            Ok((r, ops.clone(), ()))
        })
        .await
    }

    async fn write_markers(&self, markers: Vec<MarkerRecord>) -> Result<u64, TxnStoreError> {
        let (tx, rx) = oneshot::channel();
        self.committer
            .send_async(CommitRequest::Markers { markers, reply: tx })
            .await
            .map_err(|_| unavailable("the broker is shutting down"))?;
        rx.await
            .unwrap_or(Err(crate::Error::ShuttingDown))
            .map_err(unavailable)
    }

    /// The records of `ids` (None: unknown id).
    pub async fn describe(&self, id: &str) -> Result<Option<TxnRecord>, TxnStoreError> {
        Ok(txn_store::read(&*self.meta, id).await?.0)
    }

    /// Every transaction record, with its id and revision.
    pub async fn list(&self) -> Result<Vec<(TxnListing, u64)>, TxnStoreError> {
        let end = floe_meta::prefix_end(schema::TXNS_PREFIX);
        let kvs = self
            .meta
            .range(schema::TXNS_PREFIX, &end, SCAN_RECORDS_MAX)
            .await
            .map_err(unavailable)?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let id = schema::unescape_group(kv.key.strip_prefix(schema::TXNS_PREFIX)?);
                let record = serde_json::from_slice(&kv.value).ok()?;
                Some((
                    TxnListing {
                        transactional_id: id,
                        record,
                    },
                    kv.mod_revision,
                ))
            })
            .collect())
    }

    /// The cleanup owner's turn: aborts transactions open past their
    /// timeout, finishes those left prepared, and deletes records idle
    /// past the id expiration. Returns how many it aborted.
    pub async fn scan(&self) -> Result<usize, TxnStoreError> {
        let now = now_ms();
        let mut aborted = 0;
        for (t, revision) in self.list().await? {
            let (id, r) = (&t.transactional_id, &t.record);
            match r.state {
                TxnState::Ongoing if now.saturating_sub(r.started_ms) > i64::from(r.timeout_ms) => {
                    let expired = txn_store::update(&*self.meta, id, |c| {
                        let mut r = c.ok_or(TxnError::InvalidTxnState)?;
                        let due = r.expire(now_ms());
                        Ok((r, due))
                    })
                    .await?;
                    if expired {
                        tracing::info!(transactional_id = %id, "aborting a transaction open past its timeout");
                        aborted += 1;
                    }
                    self.finish(id).await?;
                }
                TxnState::PrepareCommit | TxnState::PrepareAbort
                    if now.saturating_sub(r.updated_ms) > PREPARED_STALE_MS =>
                {
                    tracing::info!(transactional_id = %id, state = r.state.as_str(), "finishing a transaction its broker left prepared");
                    self.finish(id).await?;
                }
                TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort
                    if now.saturating_sub(r.updated_ms) > self.id_expiration_ms =>
                {
                    let key = schema::txn_key(id);
                    let delete =
                        Txn::when(vec![floe_meta::Compare::ModRevision(key.clone(), revision)])
                            .and_then(vec![Op::Delete(key)]);
                    self.meta.txn(delete).await.map_err(unavailable)?;
                }
                _ => {}
            }
        }
        Ok(aborted)
    }
}

/// The writes that publish `offsets` to their groups.
fn offset_ops(offsets: &[PendingOffset]) -> Result<Vec<Op>, TxnStoreError> {
    offsets
        .iter()
        .map(|o| {
            let value = serde_json::to_vec(&o.record).map_err(|e| TxnStoreError::Corrupt {
                key: schema::offset_key(&o.group, &o.topic, o.partition),
                reason: e.to_string(),
            })?;
            Ok(Op::Put(
                schema::offset_key(&o.group, &o.topic, o.partition),
                Bytes::from(value),
            ))
        })
        .collect()
}

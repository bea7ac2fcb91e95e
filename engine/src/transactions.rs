//! The transaction coordinator's runtime, without a coordinator: every
//! request for a transactional id reads its record (`txns/<id>`), applies
//! one transition of [`TxnRecord`] and writes it back by compare-and-swap
//! ([`txn_store`]); markers go through the commit log like data. Any
//! broker serves any transactional id, and one that finds a record left
//! half done (its broker died between the outcome and `Complete*`)
//! finishes it before going on. The cleanup owner's scan does the same
//! for records nobody asks about, aborts transactions open past their
//! timeout, and forgets idle ids.

use std::collections::{HashMap, HashSet};
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
/// An open transaction in a partition that no transaction record covers
/// is aborted once it has looked so for this long (see
/// [`Transactions::abort_hanging`]): longer than any broker takes to
/// apply the marker that ends a real one.
pub const HANGING_GRACE_MS: i64 = 60_000;
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

/// Producers verified by this broker for some partitions of their open
/// transaction (KIP-890): a later batch of the same transaction to the
/// same partition skips the metadata-store read, as Kafka's partition
/// leader skips it once the producer has a transaction open there. An
/// entry lives until this broker applies a marker of that producer (its
/// transaction ended; the committer calls [`VerifiedCache::ended`]). A
/// read that raced a marker is not cached: every marker applied moves a
/// counter, and an answer is kept only if the counter did not move while
/// it was read.
#[derive(Debug, Default)]
pub struct VerifiedCache {
    inner: std::sync::Mutex<VerifiedInner>,
}

#[derive(Debug, Default)]
struct VerifiedInner {
    /// Markers applied (any producer).
    markers: u64,
    producers: HashMap<i64, VerifiedProducer>,
}

/// A producer's transactional id, epoch, and the partitions verified.
type VerifiedProducer = (String, i16, HashSet<(String, i32)>);

/// Producers the cache holds at most; past it, it starts again empty.
const VERIFIED_PRODUCERS_MAX: usize = 100_000;

impl VerifiedCache {
    /// Whether every partition is known verified for this producer.
    fn covers(&self, id: &str, producer_id: i64, epoch: i16, parts: &[(String, i32)]) -> bool {
        let Ok(g) = self.inner.lock() else {
            return false;
        };
        g.producers.get(&producer_id).is_some_and(|(t, e, set)| {
            t == id && *e == epoch && parts.iter().all(|p| set.contains(p))
        })
    }

    fn markers(&self) -> u64 {
        self.inner.lock().map_or(u64::MAX, |g| g.markers)
    }

    /// Remembers `parts` verified, unless a marker was applied since
    /// `markers` was read.
    fn remember(
        &self,
        markers: u64,
        id: &str,
        producer_id: i64,
        epoch: i16,
        parts: &[(String, i32)],
    ) {
        let Ok(mut g) = self.inner.lock() else { return };
        if g.markers != markers {
            return;
        }
        if g.producers.len() >= VERIFIED_PRODUCERS_MAX {
            g.producers.clear();
        }
        let e = g
            .producers
            .entry(producer_id)
            .or_insert_with(|| (id.to_string(), epoch, HashSet::new()));
        if e.0 != id || e.1 != epoch {
            *e = (id.to_string(), epoch, HashSet::new());
        }
        e.2.extend(parts.iter().cloned());
    }

    /// A marker of `producer_id` was applied: its transaction ended.
    pub fn ended(&self, producer_id: i64) {
        if let Ok(mut g) = self.inner.lock() {
            g.markers += 1;
            g.producers.remove(&producer_id);
        }
    }

    /// The log was loaded from a snapshot: markers may have been skipped.
    pub fn clear(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.markers += 1;
            g.producers.clear();
        }
    }
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
    verified: Arc<VerifiedCache>,
    /// Open transactions no record covers, and when each was first seen
    /// so (see [`Self::abort_hanging`]).
    hanging: std::sync::Mutex<HashMap<(crate::PartitionKey, i64, u64), i64>>,
    /// How long one must look hanging before it is aborted.
    pub hanging_grace_ms: i64,
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
            verified: Arc::default(),
            hanging: Default::default(),
            hanging_grace_ms: HANGING_GRACE_MS,
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

    /// The cache the committer tells of every marker it applies.
    pub fn verified_cache(&self) -> Arc<VerifiedCache> {
        self.verified.clone()
    }

    /// KIP-890's verification: whether each partition is part of the
    /// producer's open transaction. Partitions this broker verified for
    /// the same transaction before are not read again (see
    /// [`VerifiedCache`]).
    pub async fn verify(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, i32)],
    ) -> Result<Vec<Verified>, TxnStoreError> {
        if self.verified.covers(id, producer_id, epoch, partitions) {
            return Ok(vec![Verified::Covered; partitions.len()]);
        }
        let markers = self.verified.markers();
        let (rec, _) = txn_store::read(&*self.meta, id).await?;
        let out: Vec<Verified> = partitions
            .iter()
            .map(|p| match &rec {
                Some(r) if r.covers(producer_id, epoch, p) => Verified::Covered,
                Some(r) if r.producer_id == producer_id && r.epoch > epoch => Verified::Fenced,
                _ => Verified::NotInTransaction,
            })
            .collect();
        let covered: Vec<(String, i32)> = partitions
            .iter()
            .zip(&out)
            .filter(|(_, v)| **v == Verified::Covered)
            .map(|(p, _)| p.clone())
            .collect();
        self.verified
            .remember(markers, id, producer_id, epoch, &covered);
        Ok(out)
    }

    /// TxnOffsetCommit (the group's checks are the caller's). The
    /// group's partitions with offsets pending go to
    /// `txn-pending/<group>/<id>` in the same store transaction.
    pub async fn stage_offsets(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        group: &str,
        offsets: Vec<PendingOffset>,
    ) -> Result<(), TxnStoreError> {
        txn_store::update_with(&*self.meta, id, |c| {
            let mut r = c.ok_or(TxnError::InvalidProducerIdMapping)?;
            r.stage_offsets(producer_id, epoch, group, offsets.clone(), now_ms())?;
            let parts: Vec<(&str, i32)> = r
                .pending_offsets
                .iter()
                .filter(|o| o.group == group)
                .map(|o| (o.topic.as_str(), o.partition))
                .collect();
            let value = serde_json::to_vec(&parts).map_err(|_| TxnError::InvalidTxnState)?;
            let put = Op::Put(schema::txn_pending_key(group, id), Bytes::from(value));
            Ok((r, vec![put], ()))
        })
        .await
    }

    /// The partitions of `group` with offsets a transaction has staged
    /// and not yet published (OffsetFetch with `require_stable`).
    pub async fn pending_partitions(
        &self,
        group: &str,
    ) -> Result<HashSet<(String, i32)>, TxnStoreError> {
        let prefix = schema::txn_pending_prefix(group);
        let kvs = self
            .meta
            .range(&prefix, &floe_meta::prefix_end(&prefix), SCAN_RECORDS_MAX)
            .await
            .map_err(unavailable)?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Vec<(String, i32)>>(&kv.value).ok())
            .flatten()
            .collect())
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
        // Whatever it staged is no longer pending.
        let pending: HashSet<&str> = rec
            .pending_offsets
            .iter()
            .map(|o| o.group.as_str())
            .collect();
        let clear: Vec<Op> = pending
            .into_iter()
            .map(|g| Op::Delete(schema::txn_pending_key(g, id)))
            .collect();
        if ops.len() + clear.len() >= Txn::OPS_MAX {
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
            Ok((r, ops.iter().chain(&clear).cloned().collect(), ()))
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

    /// Aborts transactions open in a partition that no transaction record
    /// covers: a batch of a transaction that had already ended landed
    /// after its marker (a produce request delayed past its transaction's
    /// end — KIP-890's "hanging transaction", which the verification on
    /// produce narrows but cannot close for clients of this protocol
    /// version, whose transactions share an epoch). Left alone it would
    /// hold the partition's last stable offset, and every read_committed
    /// consumer, for good. One that looks so for `hanging_grace_ms` gets
    /// an abort marker of its own, under the producer's current epoch.
    async fn abort_hanging(
        &self,
        listed: &[(TxnListing, u64)],
        now: i64,
    ) -> Result<usize, TxnStoreError> {
        let (reply, rx) = oneshot::channel();
        self.committer
            .send_async(CommitRequest::OpenTransactions { reply })
            .await
            .map_err(|_| unavailable("the broker is shutting down"))?;
        let open = rx
            .await
            .unwrap_or(Err(crate::Error::ShuttingDown))
            .map_err(unavailable)?;
        let names: HashMap<uuid::Uuid, String> = self
            .topics
            .snapshot()
            .values()
            .map(|t| (t.id, t.name.clone()))
            .collect();
        let covered = |tp: &crate::PartitionKey, pid: i64| {
            let Some(name) = names.get(&tp.topic_id) else {
                return false;
            };
            let part = (name.clone(), tp.partition as i32);
            listed.iter().any(|(t, _)| {
                let r = &t.record;
                r.producer_id == pid
                    && matches!(
                        r.state,
                        TxnState::Ongoing | TxnState::PrepareCommit | TxnState::PrepareAbort
                    )
                    && r.partitions.contains(&part)
            })
        };
        let mut due = Vec::new();
        {
            let Ok(mut suspects) = self.hanging.lock() else {
                return Ok(0);
            };
            let mut still = HashMap::new();
            for o in open {
                if covered(&o.tp, o.producer_id) {
                    continue;
                }
                let key = (o.tp, o.producer_id, o.first_offset);
                let since = suspects.get(&key).copied().unwrap_or(now);
                if now.saturating_sub(since) >= self.hanging_grace_ms {
                    due.push((o.tp, o.producer_id, o.epoch));
                } else {
                    still.insert(key, since);
                }
            }
            *suspects = still;
        }
        for (tp, pid, epoch) in &due {
            tracing::warn!(producer_id = pid, topic_id = %tp.topic_id, partition = tp.partition, "aborting a transaction no transaction record covers (a batch that landed after its transaction ended)");
            self.write_markers(vec![MarkerRecord {
                producer_id: *pid,
                epoch: *epoch,
                commit: false,
                partitions: vec![(tp.topic_id, tp.partition)],
            }])
            .await?;
        }
        Ok(due.len())
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
    /// timeout, finishes those left prepared, deletes records idle past
    /// the id expiration, and aborts hanging transactions. Returns how
    /// many it aborted.
    pub async fn scan(&self) -> Result<usize, TxnStoreError> {
        let now = now_ms();
        let mut aborted = 0;
        let listed = self.list().await?;
        aborted += self.abort_hanging(&listed, now).await?;
        for (t, revision) in listed {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use floe_meta::{Embedded, FaultyMeta, MetaFaults};

    use super::*;

    /// A commit log that only records the markers it is asked to write.
    type Written = Arc<Mutex<Vec<MarkerRecord>>>;
    /// The open transactions it reports.
    type Open = Arc<Mutex<Vec<crate::sequencer::OpenTxn>>>;

    fn log_with(open: Open) -> (flume::Sender<CommitRequest>, Written) {
        let (tx, rx) = flume::unbounded();
        let written: Written = Arc::default();
        let w = written.clone();
        tokio::spawn(async move {
            let mut seq = 0;
            while let Ok(r) = rx.recv_async().await {
                match r {
                    CommitRequest::Markers { markers, reply } => {
                        w.lock().unwrap().extend(markers);
                        seq += 1;
                        let _ = reply.send(Ok(seq));
                    }
                    CommitRequest::OpenTransactions { reply } => {
                        let _ = reply.send(Ok(open.lock().unwrap().clone()));
                    }
                    _ => {}
                }
            }
        });
        (tx, written)
    }

    fn log() -> (flume::Sender<CommitRequest>, Written) {
        log_with(Open::default())
    }

    async fn setup(meta: Arc<dyn MetaStore>, timeout_max: i32) -> (Transactions, Written) {
        let topics = Arc::new(Topics::load(meta.clone()).await.unwrap());
        topics.create("t", 4, BTreeMap::new(), false).await.unwrap();
        let (tx, written) = log();
        (
            Transactions::new(
                meta,
                tx,
                topics,
                timeout_max,
                TRANSACTIONAL_ID_EXPIRATION_MS,
            ),
            written,
        )
    }

    fn part(p: i32) -> (String, i32) {
        ("t".to_string(), p)
    }

    fn offset(group: &str, p: i32, o: i64) -> PendingOffset {
        PendingOffset {
            group: group.into(),
            topic: "t".into(),
            partition: p,
            record: schema::OffsetRecord {
                offset: o,
                leader_epoch: -1,
                metadata: None,
                commit_ms: 0,
            },
        }
    }

    async fn committed(meta: &dyn MetaStore, group: &str, p: i32) -> Option<i64> {
        let kv = meta
            .get(&schema::offset_key(group, "t", p))
            .await
            .unwrap()?;
        let r: schema::OffsetRecord = serde_json::from_slice(&kv.value).unwrap();
        Some(r.offset)
    }

    #[tokio::test]
    async fn a_commit_writes_markers_and_publishes_offsets_an_abort_neither() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let (t, written) = setup(meta.clone(), 60_000).await;
        let (pid, e) = t.init("a", 60_000, None).await.unwrap();
        for (round, commit) in [(0, false), (1, true)] {
            t.add("a", pid, e, &[part(0), part(2)], &["g".into()])
                .await
                .unwrap();
            t.stage_offsets("a", pid, e, "g", vec![offset("g", 1, 10 + round)])
                .await
                .unwrap();
            assert_eq!(committed(&*meta, "g", 1).await, None, "not before the end");
            let pending = t.pending_partitions("g").await.unwrap();
            assert_eq!(pending, HashSet::from([part(1)]));
            t.end("a", pid, e, commit).await.unwrap();
            let m = written.lock().unwrap().pop().expect("a marker");
            assert_eq!((m.producer_id, m.epoch, m.commit), (pid, e, commit));
            assert_eq!(m.partitions.len(), 2);
            let expect = commit.then_some(11);
            assert_eq!(committed(&*meta, "g", 1).await, expect);
            assert!(t.pending_partitions("g").await.unwrap().is_empty());
        }
        // A retried EndTxn (its answer lost) answers the same, writing
        // nothing more.
        t.end("a", pid, e, true).await.unwrap();
        assert!(written.lock().unwrap().is_empty());
        // A partition never added is not covered.
        let v = t.verify("a", pid, e, &[part(0), part(3)]).await.unwrap();
        assert_eq!(
            v,
            vec![Verified::NotInTransaction; 2],
            "no transaction open"
        );
        t.add("a", pid, e, &[part(3)], &[]).await.unwrap();
        let v = t.verify("a", pid, e, &[part(0), part(3)]).await.unwrap();
        assert_eq!(v, vec![Verified::NotInTransaction, Verified::Covered]);
        let v = t.verify("a", pid, e - 1, &[part(3)]).await.unwrap();
        assert_eq!(v, vec![Verified::Fenced]);
    }

    #[test]
    fn the_verified_cache_forgets_at_a_marker_and_keeps_no_answer_that_raced_one() {
        let c = VerifiedCache::default();
        let parts = [part(0), part(1)];
        let m = c.markers();
        c.remember(m, "a", 5, 0, &parts[..1]);
        assert!(c.covers("a", 5, 0, &parts[..1]));
        assert!(!c.covers("a", 5, 0, &parts), "partition 1 not verified");
        assert!(!c.covers("a", 5, 1, &parts[..1]), "another epoch");
        assert!(
            !c.covers("b", 5, 0, &parts[..1]),
            "another transactional id"
        );
        c.ended(5);
        assert!(!c.covers("a", 5, 0, &parts[..1]), "the transaction ended");
        // An answer read before a marker was applied is not kept.
        let before = c.markers();
        c.ended(9);
        c.remember(before, "a", 5, 0, &parts);
        assert!(!c.covers("a", 5, 0, &parts[..1]));
        c.remember(c.markers(), "a", 5, 0, &parts);
        c.clear();
        assert!(
            !c.covers("a", 5, 0, &parts[..1]),
            "a snapshot load forgets all"
        );
    }

    #[tokio::test]
    async fn a_new_instance_aborts_what_the_old_left_open_and_fences_it() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let (t, written) = setup(meta, 60_000).await;
        let (pid, old) = t.init("a", 60_000, None).await.unwrap();
        t.add("a", pid, old, &[part(1)], &[]).await.unwrap();
        let (pid2, new) = t.init("a", 60_000, None).await.unwrap();
        assert_eq!(pid2, pid);
        let m = written.lock().unwrap().pop().expect("an abort marker");
        assert!(!m.commit && m.epoch > old && m.epoch < new, "{m:?}");
        let e = t.end("a", pid, old, true).await.unwrap_err();
        assert_eq!(e, TxnStoreError::Txn(TxnError::ProducerFenced));
    }

    #[tokio::test]
    async fn the_scan_aborts_a_hanging_transaction_after_its_grace_and_no_other() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let (plain, _) = setup(meta.clone(), 60_000).await;
        let open = Open::default();
        let (tx, written) = log_with(open.clone());
        let mut t = Transactions::new(
            meta,
            tx,
            plain.topics.clone(),
            60_000,
            TRANSACTIONAL_ID_EXPIRATION_MS,
        );
        t.hanging_grace_ms = 20;
        let topic = plain.topics.snapshot().get("t").unwrap().id;
        let tp = |p| crate::PartitionKey {
            topic_id: topic,
            partition: p,
        };
        // Producer "a" has a transaction open in partition 0 (covered by
        // its record); producer 77 has one in partition 2 nobody covers.
        let (pid, e) = t.init("a", 60_000, None).await.unwrap();
        t.add("a", pid, e, &[part(0)], &[]).await.unwrap();
        let o = |p, producer_id, epoch, first_offset| crate::sequencer::OpenTxn {
            tp: tp(p),
            producer_id,
            epoch,
            first_offset,
        };
        *open.lock().unwrap() = vec![o(0, pid, e, 4), o(2, 77, 3, 9)];
        assert_eq!(
            t.scan().await.unwrap(),
            0,
            "only suspected on the first look"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(t.scan().await.unwrap(), 1);
        let m = written.lock().unwrap().pop().expect("an abort marker");
        assert_eq!((m.producer_id, m.epoch, m.commit), (77, 3, false));
        assert_eq!(m.partitions, vec![(topic, 2)]);
        assert!(
            written.lock().unwrap().is_empty(),
            "the covered one is left alone"
        );
        // One seen ending before its grace is forgotten.
        *open.lock().unwrap() = vec![o(1, 78, 0, 3)];
        t.scan().await.unwrap();
        *open.lock().unwrap() = vec![];
        t.scan().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        *open.lock().unwrap() = vec![o(1, 78, 0, 3)];
        assert_eq!(t.scan().await.unwrap(), 0, "its grace starts again");
    }

    #[tokio::test]
    async fn idle_transactional_ids_expire_and_busy_ones_stay() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let (plain, _) = setup(meta.clone(), 60_000).await;
        let (tx, _) = log();
        let mut t = Transactions::new(meta.clone(), tx, plain.topics.clone(), 60_000, 50);
        t.hanging_grace_ms = i64::MAX;
        let (pid, e) = t.init("idle", 60_000, None).await.unwrap();
        t.add("idle", pid, e, &[part(0)], &[]).await.unwrap();
        t.end("idle", pid, e, true).await.unwrap();
        let (pid2, e2) = t.init("busy", 60_000, None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        t.add("busy", pid2, e2, &[part(1)], &[]).await.unwrap();
        t.scan().await.unwrap();
        assert!(t.describe("idle").await.unwrap().is_none(), "expired");
        let busy = t
            .describe("busy")
            .await
            .unwrap()
            .expect("an open transaction stays");
        assert_eq!(busy.state, TxnState::Ongoing);
        // The metadata store keeps only what is live.
        let left = meta
            .range(
                schema::TXNS_PREFIX,
                &floe_meta::prefix_end(schema::TXNS_PREFIX),
                10,
            )
            .await
            .unwrap();
        assert_eq!(left.len(), 1);
    }

    #[tokio::test]
    async fn the_scan_aborts_a_transaction_past_its_timeout() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let (t, written) = setup(meta, 60_000).await;
        let (pid, e) = t.init("a", 1, None).await.unwrap();
        t.add("a", pid, e, &[part(1)], &[]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(t.scan().await.unwrap(), 1);
        let m = written.lock().unwrap().pop().expect("an abort marker");
        assert!(!m.commit && m.epoch == e + 1);
        assert_eq!(
            t.describe("a").await.unwrap().unwrap().state,
            TxnState::CompleteAbort
        );
        let err = t.end("a", pid, e, true).await.unwrap_err();
        assert_eq!(err, TxnStoreError::Txn(TxnError::ProducerFenced));
        assert_eq!(t.scan().await.unwrap(), 0, "nothing more to abort");
        let bad = t.init("b", 60_001, None).await.unwrap_err();
        assert_eq!(bad, TxnStoreError::Txn(TxnError::InvalidTransactionTimeout));
    }

    /// Through a store that loses replies and refuses requests, and with
    /// two brokers finishing at once: every transaction ends the way its
    /// EndTxn asked, exactly once, with its offsets published when and only
    /// when it commits.
    #[tokio::test]
    async fn outcomes_hold_through_lost_replies_and_racing_brokers() {
        for seed in 1..=12u64 {
            let store: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
            let faulty: Arc<dyn MetaStore> = Arc::new(FaultyMeta::new(
                store.clone(),
                MetaFaults {
                    seed,
                    txn_reply_lost: 0.15,
                    txn_refused: 0.1,
                    read_failed: 0.1,
                    ..MetaFaults::none()
                },
            ));
            let (plain, written) = setup(store.clone(), 60_000).await;
            let broker = || {
                Transactions::new(
                    faulty.clone(),
                    plain.committer.clone(),
                    plain.topics.clone(),
                    60_000,
                    TRANSACTIONAL_ID_EXPIRATION_MS,
                )
            };
            let (a, b) = (broker(), broker());
            let retry = |n: usize| n < 50;
            let mut ids = None;
            for n in 0.. {
                assert!(retry(n), "seed {seed}: init never succeeded");
                if let Ok(x) = a.init("x", 60_000, ids).await {
                    ids = Some(x);
                    break;
                }
            }
            let (pid, e) = ids.unwrap();
            for round in 0..6i64 {
                let commit = round % 2 == 0;
                for n in 0.. {
                    assert!(retry(n), "seed {seed}: add never succeeded");
                    if a.add("x", pid, e, &[part(0)], &["g".into()]).await.is_ok() {
                        break;
                    }
                }
                for n in 0.. {
                    assert!(retry(n), "seed {seed}: stage never succeeded");
                    if a.stage_offsets("x", pid, e, "g", vec![offset("g", 0, round)])
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
                // EndTxn through broker a, while b finishes whatever it
                // finds prepared.
                let (ended, _) = tokio::join!(
                    async {
                        for n in 0.. {
                            assert!(retry(n), "seed {seed}: end never succeeded");
                            match a.end("x", pid, e, commit).await {
                                Ok(()) => break,
                                Err(TxnStoreError::Unavailable(_))
                                | Err(TxnStoreError::Txn(TxnError::ConcurrentTransactions)) => {}
                                Err(other) => return Err(other),
                            }
                        }
                        Ok(())
                    },
                    async {
                        let _ = b.finish("x").await;
                    }
                );
                ended.unwrap_or_else(|err| panic!("seed {seed} round {round}: {err}"));
                let rec = txn_store::read(&*store, "x").await.unwrap().0.unwrap();
                let want = if commit {
                    TxnState::CompleteCommit
                } else {
                    TxnState::CompleteAbort
                };
                assert_eq!(rec.state, want, "seed {seed} round {round}");
                let markers: Vec<_> = written.lock().unwrap().drain(..).collect();
                assert!(!markers.is_empty(), "seed {seed} round {round}: no marker");
                assert!(
                    markers.iter().all(|m| m.commit == commit && m.epoch == e),
                    "seed {seed} round {round}: {markers:?}"
                );
                let last_commit = (round / 2) * 2;
                assert_eq!(
                    committed(&*store, "g", 0).await,
                    Some(last_commit),
                    "seed {seed} round {round}"
                );
            }
        }
    }
}

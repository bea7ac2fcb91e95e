//! The committer: makes sealed segments part of the cluster's log.
//!
//! One task per broker, on the sidecar. It group-commits every segment that
//! is waiting into one log entry with a single compare-and-swap on
//! `log/head` (two writes whatever the number of partitions), replays log
//! entries written by others before retrying, and applies each entry through
//! the [`Sequencer`] so that offsets come from the order commits land in the
//! store. Every applied batch is routed to the shard that owns its
//! partition as an [`IndexUpdate`]. Commits by other brokers are learnt by
//! watching `log/` (see [`follow_log`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use floe_meta::schema::{self, CommitRecord, ProducerEpoch, SegmentRecord};
use floe_meta::{Compare, MetaStore, Op, Txn};
use futures::channel::oneshot;

use crate::sequencer::{BatchOutcome, Sequencer};
use crate::{Error, PartitionKey, Result};

/// Most segments committed in one log entry.
pub const GROUP_SEGMENTS_MAX: usize = 64;
/// Log entries read per range request while catching up.
pub const REPLAY_BATCH_MAX: usize = 256;
/// How long a commit keeps trying before its producers get a retriable
/// error.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(5);
/// Pause between commit attempts while the metadata store is unreachable.
const COMMIT_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// The log is read at least this often even without a watch event.
const LOG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Outcomes of one segment's batches, by chunk then batch.
pub type SegmentOutcomes = Vec<Vec<BatchOutcome>>;

pub enum CommitRequest {
    Segment {
        segment: SegmentRecord,
        /// The log sequence number the segment was committed at, and its
        /// outcomes.
        reply: oneshot::Sender<Result<(u64, SegmentOutcomes)>>,
    },
    /// Records a producer epoch bump (KIP-360) in the log.
    Epoch {
        epoch: ProducerEpoch,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Committed batches of one partition, for its owning shard's index.
#[derive(Debug, Clone)]
pub struct IndexUpdate {
    pub seq: u64,
    pub tp: PartitionKey,
    pub segment: Arc<str>,
    /// (pos, len, records, max_ts, outcome)
    pub batches: Vec<(u64, u32, u32, i64, BatchOutcome)>,
}

/// Where index updates go: the shard that owns each partition. Every
/// shard also learns each applied sequence number, after that entry's
/// updates, so it can tell when its index has caught up with a commit.
pub trait IndexSink: Send + Sync + 'static {
    fn send(&self, update: IndexUpdate);
    fn applied(&self, seq: u64);
}

pub struct Committer {
    meta: Arc<dyn MetaStore>,
    sequencer: Sequencer,
    sink: Arc<dyn IndexSink>,
}

impl Committer {
    pub fn new(meta: Arc<dyn MetaStore>, sink: Arc<dyn IndexSink>) -> Self {
        Self {
            meta,
            sequencer: Sequencer::default(),
            sink,
        }
    }

    /// Replays every entry after the last applied one. Returns how many.
    pub async fn catch_up(&mut self) -> Result<u64> {
        let before = self.sequencer.applied();
        self.replay(None).await?;
        Ok(self.sequencer.applied() - before)
    }

    /// Replays every entry after the last applied one; if one of them is
    /// exactly `mine`, returns its sequence number and outcomes.
    async fn replay(
        &mut self,
        mine: Option<&CommitRecord>,
    ) -> Result<Option<(u64, Vec<SegmentOutcomes>)>> {
        let mut found = None;
        loop {
            let from = schema::log_key(self.sequencer.applied() + 1);
            let end = floe_meta::prefix_end(schema::LOG_PREFIX);
            let kvs = self.meta.range(&from, &end, REPLAY_BATCH_MAX).await?;
            if kvs.is_empty() {
                return Ok(found);
            }
            for kv in kvs {
                let commit: CommitRecord =
                    serde_json::from_slice(&kv.value).map_err(|e| Error::Metadata {
                        reason: format!("log entry {}: {e}", kv.key),
                    })?;
                let seq = self.sequencer.applied() + 1;
                if kv.key != schema::log_key(seq) {
                    return Err(Error::Metadata {
                        reason: format!(
                            "log has a gap: expected {}, found {}",
                            schema::log_key(seq),
                            kv.key
                        ),
                    });
                }
                let outcomes = self.sequencer.apply(seq, &commit);
                self.route(seq, &commit, &outcomes);
                if mine == Some(&commit) {
                    found = Some((seq, outcomes));
                }
            }
        }
    }

    fn route(&self, seq: u64, commit: &CommitRecord, outcomes: &[SegmentOutcomes]) {
        for (seg, seg_out) in commit.segments.iter().zip(outcomes) {
            let key: Arc<str> = Arc::from(seg.key.as_str());
            for (chunk, chunk_out) in seg.chunks.iter().zip(seg_out) {
                self.sink.send(IndexUpdate {
                    seq,
                    tp: PartitionKey {
                        topic_id: chunk.topic_id,
                        partition: chunk.partition,
                    },
                    segment: key.clone(),
                    batches: chunk
                        .batches
                        .iter()
                        .zip(chunk_out)
                        .map(|(b, o)| (b.pos, b.len, b.records, b.max_ts, *o))
                        .collect(),
                });
            }
        }
        self.sink.applied(seq);
    }

    /// Appends `commit` to the log; returns its sequence number and the
    /// outcomes of its segments.
    ///
    /// A transaction that fails without an answer (timeout, lost
    /// connection) may still have landed. Before trying again the log is
    /// replayed looking for this very entry; a new attempt carries the same
    /// value and compares on the head it read, so at most one copy can ever
    /// land. Gives up (a retriable error for the producers) after
    /// `COMMIT_DEADLINE`; the entry may still appear later, which producers
    /// see as an ordinary retry.
    async fn append(&mut self, commit: &CommitRecord) -> Result<(u64, Vec<SegmentOutcomes>)> {
        let value = Bytes::from(serde_json::to_vec(commit).map_err(|e| Error::Metadata {
            reason: e.to_string(),
        })?);
        let deadline = Instant::now() + COMMIT_DEADLINE;
        loop {
            match self.replay(Some(commit)).await {
                Ok(Some(landed)) => return Ok(landed),
                Ok(None) => {}
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(COMMIT_RETRY_PAUSE).await;
                    continue;
                }
            }
            let head = self.sequencer.applied();
            let guard = if head == 0 {
                Compare::ModRevision(schema::LOG_HEAD.into(), 0)
            } else {
                Compare::Value(schema::LOG_HEAD.into(), Bytes::from(head.to_string()))
            };
            let next = head + 1;
            let txn = Txn::when(vec![guard]).and_then(vec![
                Op::Put(schema::LOG_HEAD.into(), Bytes::from(next.to_string())),
                Op::Put(schema::log_key(next), value.clone()),
            ]);
            match self.meta.txn(txn).await {
                Ok(o) if o.succeeded => {
                    let outcomes = self.sequencer.apply(next, commit);
                    self.route(next, commit, &outcomes);
                    return Ok((next, outcomes));
                }
                // Another broker committed first: the replay above learns
                // its entries on the next turn.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, seq = next, "commit outcome unknown; checking the log before retrying");
                    if Instant::now() >= deadline {
                        return Err(e.into());
                    }
                    tokio::time::sleep(COMMIT_RETRY_PAUSE).await;
                }
            }
        }
    }

    /// Serves commit requests and follows the log until every sender is
    /// gone. `poke` is signalled when the log may have grown (a watch on
    /// `log/`); it is also polled every `LOG_POLL_INTERVAL` as a safety net.
    pub async fn run(
        mut self,
        requests: flume::Receiver<CommitRequest>,
        poke: Arc<tokio::sync::Notify>,
    ) {
        loop {
            tokio::select! {
                r = requests.recv_async() => match r {
                    Ok(first) => self.serve_group(first, &requests).await,
                    Err(_) => return,
                },
                _ = poke.notified() => self.learn().await,
                _ = tokio::time::sleep(LOG_POLL_INTERVAL) => self.learn().await,
            }
        }
    }

    async fn learn(&mut self) {
        if let Err(e) = self.replay(None).await {
            tracing::debug!(error = %e, "reading the commit log failed; will retry");
        }
    }

    async fn serve_group(
        &mut self,
        first: CommitRequest,
        requests: &flume::Receiver<CommitRequest>,
    ) {
        {
            let mut group = vec![first];
            while group.len() < GROUP_SEGMENTS_MAX {
                match requests.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let mut commit = CommitRecord {
                segments: Vec::new(),
                epochs: Vec::new(),
            };
            for r in &group {
                match r {
                    CommitRequest::Segment { segment, .. } => commit.segments.push(segment.clone()),
                    CommitRequest::Epoch { epoch, .. } => commit.epochs.push(*epoch),
                }
            }
            match self.append(&commit).await {
                Ok((seq, outcomes)) => {
                    let mut outcomes = outcomes.into_iter();
                    for r in group {
                        match r {
                            CommitRequest::Segment { reply, .. } => {
                                let o = outcomes.next().map(|o| (seq, o)).ok_or(Error::Metadata {
                                    reason: "commit outcome missing".into(),
                                });
                                let _ = reply.send(o);
                            }
                            CommitRequest::Epoch { reply, .. } => {
                                let _ = reply.send(Ok(()));
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, segments = commit.segments.len(), "commit failed");
                    for r in group {
                        match r {
                            CommitRequest::Segment { reply, .. } => {
                                let _ = reply.send(Err(e.clone()));
                            }
                            CommitRequest::Epoch { reply, .. } => {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Pokes the committer whenever `log/` changes, so that commits by other
/// brokers are applied (and long-polling fetches woken) promptly.
pub async fn follow_log(meta: Arc<dyn MetaStore>, poke: Arc<tokio::sync::Notify>) {
    use futures::StreamExt;
    loop {
        match meta.watch("log/", 0).await {
            Ok(mut w) => {
                while let Some(ev) = w.next().await {
                    if ev.is_err() {
                        break;
                    }
                    poke.notify_one();
                }
            }
            Err(e) => tracing::debug!(error = %e, "watching the commit log failed; retrying"),
        }
        poke.notify_one();
        tokio::time::sleep(COMMIT_RETRY_PAUSE).await;
    }
}

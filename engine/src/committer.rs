//! The committer: makes sealed segments part of the cluster's log.
//!
//! One task per broker, on the sidecar. It group-commits every segment that
//! is waiting into one log entry with a single compare-and-swap on
//! `log/head` (two writes whatever the number of partitions), replays log
//! entries written by others before retrying, and applies each entry through
//! the [`Sequencer`] so that offsets come from the order commits land in the
//! store. Every applied batch is routed to the shard that owns its
//! partition as an [`IndexUpdate`].

use std::sync::Arc;

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
        let mut applied = 0;
        loop {
            let from = schema::log_key(self.sequencer.applied() + 1);
            let end = floe_meta::prefix_end(schema::LOG_PREFIX);
            let kvs = self.meta.range(&from, &end, REPLAY_BATCH_MAX).await?;
            if kvs.is_empty() {
                return Ok(applied);
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
                applied += 1;
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

    /// Appends `commit` to the log; returns the outcomes of its segments.
    async fn append(&mut self, commit: &CommitRecord) -> Result<(u64, Vec<SegmentOutcomes>)> {
        let value = Bytes::from(serde_json::to_vec(commit).map_err(|e| Error::Metadata {
            reason: e.to_string(),
        })?);
        loop {
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
            if self.meta.txn(txn).await?.succeeded {
                let outcomes = self.sequencer.apply(next, commit);
                self.route(next, commit, &outcomes);
                return Ok((next, outcomes));
            }
            // Another broker committed first: learn its entries, then retry.
            self.catch_up().await?;
        }
    }

    /// Serves commit requests until every sender is gone.
    pub async fn run(mut self, requests: flume::Receiver<CommitRequest>) {
        while let Ok(first) = requests.recv_async().await {
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

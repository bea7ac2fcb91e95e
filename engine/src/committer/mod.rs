//! The committer: makes sealed segments part of the cluster's log.
//!
//! One task per broker, on the sidecar. It group-commits every segment that
//! is waiting into one log entry with a single compare-and-swap on
//! `log/head` (two writes whatever the number of partitions), replays log
//! entries written by others before retrying, and applies each entry
//! through the [`LogState`] so that offsets come from the order commits
//! land in the store. Every applied batch is routed to the shard that owns
//! its partition as an [`IndexUpdate`]. Commits by other brokers are learnt
//! by watching `log/` (see [`follow_log`]).
//!
//! - [`state`]: the log as a pure state machine (no I/O);
//! - this module: the driver — group commit, CAS append, replay;
//! - [`snapshot`]: snapshots and trimming the log behind them;
//! - [`cleanup`]: retention and deleting objects nobody references.

mod archiving;
mod cleanup;
mod compaction;
mod snapshot;
mod state;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

// The commit deadline runs on tokio's clock, so that a simulation with a
// paused clock reaches it after the same retries as real time would.
use tokio::time::Instant as RetryClock;

use bytes::Bytes;
use floe_meta::schema::{
    self, ArchiveRecord, CommitRecord, MarkerRecord, ProducerEpoch, SegmentRecord, TrimRecord,
};
use floe_meta::{Compare, MetaStore, Op, Txn};
use floe_objstore::ObjectStore;
use futures::channel::oneshot;

pub use archiving::{archiver_of, ArchiveSettings, Archiver, ARCHIVE_BYTES_MAX};
pub use cleanup::Lifecycle;
pub use snapshot::{
    write_snapshot, IndexedBatch, Snapshot, LOG_KEEP_ENTRIES, SNAPSHOT_EVERY_ENTRIES,
};
pub use state::{Applied, LogState};

use crate::sequencer::{AbortedTxn, BatchOutcome, OpenTxn, ProducerSummary};
use crate::{Error, PartitionKey, Result};

/// A log entry with nothing in it (what a fence writes), as
/// `CommitRecord::default()` encodes.
const EMPTY_ENTRY: &[u8] = br#"{"segments":[]}"#;

/// Most segments committed in one log entry.
pub const GROUP_SEGMENTS_MAX: usize = 64;
/// Most batches described by one log entry: with about 80 bytes of JSON per
/// batch this keeps an entry well under etcd's 1.5 MiB request limit.
pub const LOG_ENTRY_BATCHES_MAX: usize = 8192;
const _: () = assert!(LOG_ENTRY_BATCHES_MAX >= crate::segment::SEGMENT_BATCHES_MAX);
/// Log entries read per range request while catching up.
pub const REPLAY_BATCH_MAX: usize = 256;
/// How long a commit that was never sent keeps trying before its producers
/// get a retriable error; one whose outcome is unknown never gives up.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(5);
/// Pause between commit attempts while the metadata store is unreachable.
const COMMIT_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Pause between attempts to settle an unknown outcome past the deadline.
const COMMIT_SETTLE_PAUSE: Duration = Duration::from_secs(1);
/// A settling commit warns once per this many attempts.
const SETTLE_WARN_EVERY_ATTEMPTS: u64 = 10;
/// The log is read at least this often even without a watch event.
const LOG_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Most partitions trimmed by one log entry (each trim is about 70 bytes
/// of JSON).
pub const LOG_ENTRY_TRIMS_MAX: usize = 4096;
/// Most objects deleted per cleanup turn; the rest wait for the next turn.
/// A turn a minute must outpace the segments a cluster writes (three
/// brokers flushing every 20 ms release about 150 a second): at 1,000 a
/// turn the backlog grew without bound (found by the soak).
pub const CLEANUP_DELETES_MAX: usize = 20_000;
/// Deletes in flight at once during a cleanup turn.
pub const CLEANUP_DELETES_CONCURRENT: usize = 16;

/// Outcomes of one segment's batches, by chunk then batch.
pub type SegmentOutcomes = Vec<Vec<BatchOutcome>>;

/// Where a segment landed in the log.
#[derive(Debug, Clone)]
pub struct SegmentCommitted {
    /// The log entry that holds it.
    pub seq: u64,
    pub outcomes: SegmentOutcomes,
}

/// Where a trim landed, and each trimmed partition's log start after it.
#[derive(Debug, Clone)]
pub struct TrimCommitted {
    pub seq: u64,
    pub log_starts: Vec<u64>,
}

/// What a shard (or a handler) asks the committer to put in the log.
pub enum CommitRequest {
    Segment {
        segment: SegmentRecord,
        /// When the segment was sealed, before its upload began: its
        /// object is at most this old (see [`Committer::with_max_commit_age`]).
        sealed_at: RetryClock,
        reply: oneshot::Sender<Result<SegmentCommitted>>,
    },
    /// Records a producer epoch bump (KIP-360) in the log.
    Epoch {
        epoch: ProducerEpoch,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Moves log start offsets forward (DeleteRecords).
    Trim {
        trims: Vec<TrimRecord>,
        reply: oneshot::Sender<Result<TrimCommitted>>,
    },
    /// Replaces a partition's first unarchived batches by an archive
    /// object; answers whether the log took it.
    Archive {
        archive: ArchiveRecord,
        /// When its upload began (the object is at most this old).
        uploaded_at: RetryClock,
        reply: oneshot::Sender<Result<bool>>,
    },
    /// Ends transactions: a control batch in every partition named where
    /// the marker's producer has a transaction open (see the sequencer).
    /// Answers the entry that holds them. Writing the same markers twice
    /// places nothing more, so a retry after an unknown outcome is safe.
    Markers {
        markers: Vec<MarkerRecord>,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Reads the log to its head, then describes the producers it
    /// remembers in each partition (DescribeProducers).
    Producers {
        partitions: Vec<PartitionKey>,
        reply: oneshot::Sender<Result<Vec<Vec<ProducerSummary>>>>,
    },
    /// Reads the log to its head, then lists every open transaction.
    OpenTransactions {
        reply: oneshot::Sender<Result<Vec<OpenTxn>>>,
    },
    /// Reads the log to its head (a linearizable read) and answers the
    /// last applied entry: everything committed before the request is
    /// then known to this broker.
    Sync { reply: oneshot::Sender<Result<u64>> },
}

impl CommitRequest {
    /// About how many batch-sized items this request adds to a log entry
    /// (a trim is about as long as a batch in the entry's JSON).
    fn weight(&self) -> usize {
        match self {
            CommitRequest::Segment { segment, .. } => {
                segment.chunks.iter().map(|c| c.batches.len()).sum()
            }
            CommitRequest::Epoch { .. }
            | CommitRequest::Sync { .. }
            | CommitRequest::Producers { .. }
            | CommitRequest::OpenTransactions { .. } => 0,
            CommitRequest::Trim { trims, .. } => trims.len(),
            CommitRequest::Archive { .. } => 1,
            CommitRequest::Markers { markers, .. } => {
                markers.iter().map(|m| m.partitions.len()).sum()
            }
        }
    }

    /// Reads the log, writes nothing: served on its own, never grouped.
    fn is_query(&self) -> bool {
        matches!(
            self,
            CommitRequest::Sync { .. }
                | CommitRequest::Producers { .. }
                | CommitRequest::OpenTransactions { .. }
        )
    }

    fn fail(self, e: Error) {
        match self {
            CommitRequest::Segment { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            CommitRequest::Epoch { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            CommitRequest::Trim { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            CommitRequest::Archive { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            CommitRequest::Markers { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            CommitRequest::Sync { reply } => {
                let _ = reply.send(Err(e));
            }
            CommitRequest::Producers { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            CommitRequest::OpenTransactions { reply } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// One committed batch of an [`IndexUpdate`], where it sits in its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommittedBatch {
    pub pos: u64,
    pub len: u32,
    pub records: u32,
    pub max_ts: i64,
    pub outcome: BatchOutcome,
}

/// Committed batches of one partition, for its owning shard's index.
#[derive(Debug, Clone)]
pub struct IndexUpdate {
    pub seq: u64,
    pub tp: PartitionKey,
    pub segment: Arc<str>,
    pub batches: Vec<CommittedBatch>,
    /// The partition's log start once these batches are in (retention
    /// moves it; the shard applies it after pushing the batches).
    pub log_start: u64,
    /// The partition's topic is deleted and nothing of it is left: the
    /// shard drops the partition's index.
    pub forget: bool,
    /// `batches` is one archive object, which replaces the batches over
    /// its offsets (already in the index) instead of following them.
    pub archived: bool,
    /// The first offset of the partition's oldest open transaction once
    /// the entry is applied (None: none open; the last stable offset is
    /// the high watermark).
    pub open_from: Option<u64>,
    /// Aborted transactions this update adds to the partition's index,
    /// oldest first (a snapshot load sends them all).
    pub aborted: Vec<AbortedTxn>,
}

/// Where index updates go: the shard that owns each partition. Every
/// shard also learns each applied sequence number, after that entry's
/// updates, so it can tell when its index has caught up with a commit.
pub trait IndexSink: Send + Sync + 'static {
    fn send(&self, update: IndexUpdate);
    fn applied(&self, seq: u64);
    /// Replaces everything sent so far by `updates` (a snapshot loaded
    /// after entry `seq`), then counts `seq` as applied. Each shard swaps
    /// its whole index at once, so no reader sees it half built.
    fn reload(&self, seq: u64, updates: Vec<IndexUpdate>);
}

/// Commit latency, published to the metrics once a second.
struct CommitLatency {
    metrics: Arc<crate::metrics::Metrics>,
    /// Since the last publication, in microseconds.
    recent: hdrhistogram::Histogram<u64>,
    /// Since start, in microseconds.
    total: hdrhistogram::Histogram<u64>,
}

impl CommitLatency {
    fn new(metrics: Arc<crate::metrics::Metrics>) -> Option<Self> {
        // Auto-resizing, 3 significant digits.
        Some(Self {
            metrics,
            recent: hdrhistogram::Histogram::new(3).ok()?,
            total: hdrhistogram::Histogram::new(3).ok()?,
        })
    }

    fn record(&mut self, elapsed: Duration) {
        let us = elapsed.as_micros().max(1) as u64;
        let _ = self.recent.record(us);
        let _ = self.total.record(us);
    }

    fn publish(&mut self) {
        use crate::metrics::Metrics;
        let (m, h) = (&self.metrics, &mut self.recent);
        // A second without commits reads as 0, not as the last busy second.
        let (p50, p99, max) = if h.is_empty() {
            (0, 0, 0)
        } else {
            (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
        };
        Metrics::set(&m.commit_latency_p50_us, p50);
        Metrics::set(&m.commit_latency_p99_us, p99);
        Metrics::set(&m.commit_latency_max_us, max);
        h.reset();
        let t = &self.total;
        Metrics::set(&m.commit_latency_total_p50_us, t.value_at_quantile(0.5));
        Metrics::set(&m.commit_latency_total_p99_us, t.value_at_quantile(0.99));
    }
}

/// The async driver around a [`LogState`]: reads and appends log entries
/// through the metadata store and routes what each entry decides.
pub struct Committer {
    /// A request taken from the queue that did not fit the last entry.
    carry: Option<CommitRequest>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    latency: Option<CommitLatency>,
    meta: Arc<dyn MetaStore>,
    store: Arc<dyn ObjectStore>,
    state: LogState,
    sink: Arc<dyn IndexSink>,
    lifecycle: Option<Lifecycle>,
    /// Writes archive objects for the partitions this broker archives.
    archiver: Option<Archiver>,
    /// Segments sealed longer ago than this are never sent to the log.
    max_commit_age: Option<Duration>,
    /// Written into each entry (0: the log's default).
    producer_expiration_ms: u64,
    /// Told of every marker applied (transactional writes verified here).
    verified: Option<Arc<crate::transactions::VerifiedCache>>,
    /// Entries land only while this broker's registration lives.
    fence: Option<Arc<crate::cluster::Fence>>,
    /// A snapshot is written after every this many entries, and this many
    /// entries are kept behind it.
    snapshot_every: u64,
    log_keep: u64,
    /// Log positions snapshot loads skipped over (first, last) during
    /// the current append: entries there were never seen one by one. All
    /// of them: a second load must not hide what the first skipped.
    skipped: Vec<(u64, u64)>,
    started: Instant,
}

impl Committer {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        store: Arc<dyn ObjectStore>,
        sink: Arc<dyn IndexSink>,
    ) -> Self {
        Self {
            carry: None,
            metrics: None,
            latency: None,
            meta,
            store,
            state: LogState::default(),
            sink,
            lifecycle: None,
            archiver: None,
            max_commit_age: None,
            producer_expiration_ms: 0,
            verified: None,
            fence: None,
            snapshot_every: SNAPSHOT_EVERY_ENTRIES,
            log_keep: LOG_KEEP_ENTRIES,
            skipped: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Makes this committer apply retention and delete objects when its
    /// broker is the cleanup owner. Commits then respect half the orphan
    /// grace as their maximum age (see [`Self::with_max_commit_age`]).
    pub fn with_lifecycle(mut self, lifecycle: Lifecycle) -> Self {
        self.max_commit_age = Some(lifecycle.orphan_grace / 2);
        self.lifecycle = Some(lifecycle);
        self
    }

    /// Never sends a log entry holding a segment sealed longer than `age`
    /// ago. The orphan sweep deletes uploads the log does not know once
    /// they are older than its grace; a commit sent later than that could
    /// land after the sweep read the log, and point at a deleted object.
    /// So an older segment is given up (its producers retry), and an entry
    /// whose outcome is unknown is settled by fencing its position with an
    /// empty entry instead of being sent again. Half the grace leaves the
    /// other half for a request that is already on its way.
    pub fn with_max_commit_age(mut self, age: Duration) -> Self {
        self.max_commit_age = Some(age);
        self
    }

    /// Makes this committer archive the partitions that fall to its broker
    /// (needs [`Self::with_lifecycle`] for membership and topics).
    pub fn with_archiver(mut self, archiver: Archiver) -> Self {
        self.archiver = Some(archiver);
        self
    }

    /// Publishes commit counters and latency to these metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.latency = CommitLatency::new(metrics.clone());
        self.metrics = Some(metrics);
        self
    }

    /// Makes every entry this committer writes land only while the
    /// registration behind `fence` lives (see [`crate::cluster::Fence`]).
    pub fn with_fence(mut self, fence: Arc<crate::cluster::Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Whether the registration this append started under is gone: the
    /// fence moved (this broker registered again), or the key no longer
    /// has that create revision. A read error counts as "not known gone".
    async fn fence_lost(&self, rev: u64) -> bool {
        let Some(f) = &self.fence else { return false };
        if f.revision() != rev {
            return true;
        }
        match self.meta.get(f.key()).await {
            Ok(Some(kv)) => kv.create_revision != rev,
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Tells `cache` of every transaction marker applied.
    pub fn with_verified_cache(mut self, cache: Arc<crate::transactions::VerifiedCache>) -> Self {
        self.verified = Some(cache);
        self
    }

    /// Asks, in every entry this committer writes, that producer ids
    /// silent for `ms` be forgotten (see the sequencer).
    pub fn with_producer_expiration(mut self, ms: u64) -> Self {
        self.producer_expiration_ms = ms;
        self
    }

    /// Writes snapshots every `snapshot_every` entries and keeps `keep`
    /// entries behind each (tests use a small window to make trimming
    /// race a lagging committer).
    pub fn with_log_window(mut self, snapshot_every: u64, keep: u64) -> Self {
        self.snapshot_every = snapshot_every.max(1);
        self.log_keep = keep.max(self.snapshot_every);
        self
    }

    /// The state derived from every entry applied so far.
    pub fn state(&self) -> &LogState {
        &self.state
    }

    /// Start-up: loads the newest snapshot (if any), hands its index to the
    /// shards, then replays the log after it. Returns the entries replayed.
    pub async fn recover(&mut self) -> Result<u64> {
        if let Some(ptr) = snapshot::read_pointer(&*self.meta).await? {
            self.load_snapshot(&ptr).await?;
            tracing::info!(seq = ptr.seq, key = %ptr.key, "loaded the metadata snapshot");
        }
        self.catch_up().await
    }

    /// Replaces the state (and the shards' indexes) by the snapshot
    /// `ptr` names.
    async fn load_snapshot(&mut self, ptr: &schema::SnapshotPointer) -> Result<()> {
        let bytes = self.store.get(&ptr.key).await?;
        let snap = Snapshot::decode(&ptr.key, &bytes)?;
        let seq = snap.seq;
        let (state, updates) = LogState::load(snap, SystemTime::now());
        self.state = state;
        if let Some(v) = &self.verified {
            v.clear();
        }
        self.sink.reload(seq, updates);
        Ok(())
    }

    /// The log has no entry after the last applied one, but a later one
    /// (`found`): the entries this committer needs were trimmed behind a
    /// snapshot while it lagged. Loads that snapshot in place, as a
    /// starting broker does, and carries on from it.
    async fn reload_behind_trim(&mut self, found: u64) -> Result<()> {
        let applied = self.state.applied();
        let ptr = snapshot::read_pointer(&*self.meta).await?;
        let Some(ptr) = ptr.filter(|p| p.seq + 1 >= found) else {
            return Err(Error::Corrupt {
                what: "the commit log".into(),
                reason: format!(
                    "a gap: entries {} to {} are missing and no snapshot covers them",
                    applied + 1,
                    found - 1
                ),
            });
        };
        self.load_snapshot(&ptr).await?;
        self.skipped.push((applied + 1, ptr.seq));
        if let Some(m) = &self.metrics {
            crate::metrics::Metrics::add(&m.log_snapshot_reloads, 1);
        }
        tracing::warn!(
            applied,
            snapshot = ptr.seq,
            "this broker fell behind the trimmed commit log; reloaded the snapshot and carries on from it"
        );
        Ok(())
    }

    /// Writes a snapshot of the state after the last applied entry, in the
    /// background.
    fn snapshot(&self) {
        let snap = self.state.snapshot();
        let seq = snap.seq;
        let bytes = match snap.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding a snapshot failed");
                return;
            }
        };
        let (meta, store, keep) = (self.meta.clone(), self.store.clone(), self.log_keep);
        tokio::spawn(async move {
            if let Err(e) = write_snapshot(&*meta, &*store, seq, bytes, keep).await {
                tracing::warn!(seq, error = %e, "writing the metadata snapshot failed; the next one will retry");
            }
        });
    }

    /// Replays every entry after the last applied one. Returns how many.
    pub async fn catch_up(&mut self) -> Result<u64> {
        let before = self.state.applied();
        self.replay(None, &mut None).await?;
        Ok(self.state.applied() - before)
    }

    /// Applies entry `seq` to the state and routes what it decided.
    fn apply(&mut self, seq: u64, commit: &CommitRecord) -> Vec<SegmentOutcomes> {
        let applied = self.state.apply(seq, commit, SystemTime::now());
        if let Some(v) = &self.verified {
            for m in &commit.markers {
                v.ended(m.producer_id);
            }
        }
        for u in applied.updates {
            self.sink.send(u);
        }
        self.sink.applied(seq);
        applied.outcomes
    }

    /// Replays every entry after the last applied one; if one of them is
    /// exactly `mine`, puts its sequence number and outcomes in `found`.
    /// `found` is the caller's, so that a read failing after the page that
    /// held `mine` does not lose the fact that it landed.
    async fn replay(
        &mut self,
        mine: Option<&CommitRecord>,
        found: &mut Option<(u64, Vec<SegmentOutcomes>)>,
    ) -> Result<()> {
        loop {
            let from = schema::log_key(self.state.applied() + 1);
            let end = floe_meta::prefix_end(schema::LOG_PREFIX);
            let kvs = self.meta.range(&from, &end, REPLAY_BATCH_MAX).await?;
            if kvs.is_empty() {
                if let Some(m) = &self.metrics {
                    crate::metrics::Metrics::set(&m.log_read_at_ms, crate::health::now_ms());
                }
                return Ok(());
            }
            for kv in kvs {
                let commit: CommitRecord =
                    serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
                        what: format!("log entry {}", kv.key),
                        reason: e.to_string(),
                    })?;
                let seq = self.state.applied() + 1;
                if kv.key != schema::log_key(seq) {
                    let found = schema::parse_log_key(&kv.key).ok_or_else(|| Error::Corrupt {
                        what: "the commit log".into(),
                        reason: format!("unexpected key {}", kv.key),
                    })?;
                    self.reload_behind_trim(found).await?;
                    // Read again from after the snapshot.
                    break;
                }
                let outcomes = self.apply(seq, &commit);
                if mine == Some(&commit) {
                    *found = Some((seq, outcomes));
                }
            }
        }
    }

    /// Appends `commit` to the log; returns its sequence number and the
    /// outcomes of its segments. `sealed` is when its oldest segment was
    /// sealed.
    ///
    /// A transaction that fails without an answer (timeout, lost
    /// connection) may still have landed. Each attempt compares the head
    /// it read, so it can only land as the entry right after that head.
    /// Before trying again the log is replayed looking for this very
    /// entry; a new attempt carries the same value, so at most one copy
    /// can ever land. An unknown outcome is settled, never abandoned: the
    /// committer keeps replaying until the log shows the entry, or shows
    /// another entry at every position an attempt could have taken,
    /// however long the metadata store is away, and everything queued
    /// behind it waits. Only an entry known not to be written gives up:
    /// after `COMMIT_DEADLINE`, or once a segment is older than the
    /// maximum commit age (then a position an unknown attempt may still
    /// take is fenced with an empty entry, rather than the entry sent
    /// again).
    async fn append(
        &mut self,
        commit: &CommitRecord,
        sealed: Option<RetryClock>,
    ) -> Result<(u64, Vec<SegmentOutcomes>)> {
        let value = Bytes::from(serde_json::to_vec(commit).map_err(|e| Error::Corrupt {
            what: "a new log entry".into(),
            reason: e.to_string(),
        })?);
        let started = RetryClock::now();
        let deadline = started + COMMIT_DEADLINE;
        let max_age = self.max_commit_age;
        let too_old = |now: RetryClock| match (sealed, max_age) {
            (Some(t), Some(max)) => now.saturating_duration_since(t) >= max,
            _ => false,
        };
        let mut landed = None;
        // The highest head an attempt with an unknown outcome compared on:
        // it landed as the entry after that head, or not at all.
        let mut unknown_at: Option<u64> = None;
        let mut attempts: u64 = 0;
        // The registration every attempt of this entry is fenced on.
        let fenced_on = self.fence.as_ref().map(|f| f.revision()).filter(|r| *r > 0);
        let mut fenced = false;
        self.skipped.clear();
        loop {
            let replayed = self.replay(Some(commit), &mut landed).await;
            if let Some(landed) = landed.take() {
                if unknown_at.is_some() {
                    tracing::info!(
                        seq = landed.0,
                        attempts,
                        "commit outcome settled: the entry is in the log"
                    );
                }
                return Ok(landed);
            }
            if let Err(e) = replayed {
                if unknown_at.is_none() && RetryClock::now() >= deadline {
                    return Err(e);
                }
                self.settle_pause(unknown_at.is_some(), started, attempts, &e)
                    .await;
                attempts += 1;
                continue;
            }
            if let Some(at) = unknown_at {
                if self
                    .skipped
                    .iter()
                    .any(|(first, last)| (first..=last).contains(&&(at + 1)))
                {
                    // The entry that could be ours was trimmed before
                    // this committer read it: nobody can tell any more.
                    return Err(Error::CommitOutcomeUnknown {
                        reason: format!(
                            "log entry {} was trimmed behind a snapshot before this broker read it",
                            at + 1
                        ),
                    });
                }
            }
            if let Some(rev) = fenced_on {
                fenced |= self.fence.as_ref().is_some_and(|f| f.revision() != rev);
            }
            if fenced {
                // No attempt can land any more, and the replay above read
                // the log to its head without finding one that did.
                return Err(Error::CommitAbandoned {
                    reason: "this broker's registration lapsed while the commit was pending".into(),
                });
            }
            let head = self.state.applied();
            if unknown_at.is_some_and(|at| head > at) {
                // Entry at+1 is another's (the replay would have found
                // ours), and no attempt could land anywhere else.
                tracing::info!(
                    attempts,
                    "commit outcome settled: the entry is not in the log"
                );
                unknown_at = None;
            }
            let now = RetryClock::now();
            let old = too_old(now);
            if unknown_at.is_none() && (old || now >= deadline) {
                return Err(Error::CommitAbandoned {
                    reason: if old {
                        "a segment waited longer than the maximum commit age".into()
                    } else {
                        format!("the metadata store refused it for {COMMIT_DEADLINE:?}")
                    },
                });
            }
            // Too old to send again while an attempt may still land: take
            // that position with an empty entry instead.
            let fence = old;
            let guard = if head == 0 {
                Compare::ModRevision(schema::LOG_HEAD.into(), 0)
            } else {
                Compare::Value(schema::LOG_HEAD.into(), Bytes::from(head.to_string()))
            };
            let next = head + 1;
            let mut guards = vec![guard];
            if let (Some(rev), Some(f)) = (fenced_on, &self.fence) {
                guards.push(Compare::CreateRevision(f.key().to_string(), rev));
            }
            let entry = if fence {
                Bytes::from_static(EMPTY_ENTRY)
            } else {
                value.clone()
            };
            let txn = Txn::when(guards).and_then(vec![
                Op::Put(schema::LOG_HEAD.into(), Bytes::from(next.to_string())),
                Op::Put(schema::log_key(next), entry),
            ]);
            attempts += 1;
            match self.meta.txn(txn).await {
                Ok(o) if o.succeeded && fence => {
                    tracing::info!(
                        seq = next,
                        "fenced the position of a commit too old to send again"
                    );
                    self.apply(next, &CommitRecord::default());
                }
                Ok(o) if o.succeeded => {
                    if let Some(l) = &mut self.latency {
                        l.record(started.elapsed());
                    }
                    if let Some(m) = &self.metrics {
                        crate::metrics::Metrics::add(&m.log_entries_written, 1);
                    }
                    let outcomes = self.apply(next, commit);
                    if next.is_multiple_of(self.snapshot_every) {
                        self.snapshot();
                    }
                    return Ok((next, outcomes));
                }
                // Another broker committed first (the replay above learns
                // its entries on the next turn), or the fence failed.
                Ok(_) => {
                    if let Some(rev) = fenced_on {
                        if self.fence_lost(rev).await {
                            tracing::warn!(
                                "this broker's registration lapsed; its pending commit is given up"
                            );
                            fenced = true;
                            continue;
                        }
                    }
                    if let Some(m) = &self.metrics {
                        crate::metrics::Metrics::add(&m.log_cas_conflicts, 1);
                    }
                }
                Err(e) => {
                    // A fence landing or not changes nothing: it holds no
                    // data, and the next replay settles either way.
                    if !fence {
                        unknown_at = Some(unknown_at.map_or(head, |at| at.max(head)));
                    }
                    self.settle_pause(true, started, attempts, &e.into()).await;
                }
            }
        }
    }

    /// Waits before the next attempt: briefly within the deadline, then
    /// (settling an unknown outcome) at a slower pace, with a warning now
    /// and then so that a stuck commit is visible.
    async fn settle_pause(&self, unknown: bool, started: RetryClock, attempts: u64, e: &Error) {
        let waited = started.elapsed();
        if waited < COMMIT_DEADLINE {
            tracing::debug!(error = %e, attempts, "commit attempt failed; checking the log before retrying");
            tokio::time::sleep(COMMIT_RETRY_PAUSE).await;
            return;
        }
        if unknown && attempts.is_multiple_of(SETTLE_WARN_EVERY_ATTEMPTS) {
            tracing::warn!(error = %e, attempts, waited_ms = waited.as_millis() as u64, "commit outcome still unknown; its producers wait until the log tells");
        }
        tokio::time::sleep(COMMIT_SETTLE_PAUSE).await;
    }

    /// Serves commit requests and follows the log until every sender is
    /// gone, then hands the committer back. `poke` is signalled when the log
    /// may have grown (a watch on `log/`); it is also polled every
    /// `LOG_POLL_INTERVAL` as a safety net.
    pub async fn run(
        mut self,
        requests: flume::Receiver<CommitRequest>,
        poke: Arc<tokio::sync::Notify>,
    ) -> Self {
        // An interval, not a sleep per turn: under load the other branches
        // win every turn and a fresh sleep would never fire.
        let mut tick = tokio::time::interval(LOG_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cleanup_every = self
            .lifecycle
            .as_ref()
            .map_or(Duration::from_secs(3600), |l| {
                l.interval.max(Duration::from_millis(100))
            });
        let mut cleanup_tick = tokio::time::interval(cleanup_every);
        cleanup_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<Instant> = None;
        let archive_every = self
            .archiver
            .as_ref()
            .map_or(Duration::from_secs(3600), Archiver::interval);
        let mut archive_tick = tokio::time::interval(archive_every);
        archive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(first) = self.carry.take() {
                self.serve_group(first, &requests).await;
                continue;
            }
            tokio::select! {
                r = requests.recv_async() => match r {
                    Ok(first) => self.serve_group(first, &requests).await,
                    Err(_) => return self,
                },
                _ = poke.notified() => self.learn().await,
                _ = tick.tick() => {
                    self.learn().await;
                    if let Some(l) = &mut self.latency {
                        l.publish();
                    }
                    if let Some(m) = &self.metrics {
                        use crate::metrics::Metrics;
                        Metrics::set(&m.producer_ids, self.state.producers_known() as u64);
                        Metrics::set(&m.log_partitions, self.state.partitions_known() as u64);
                        Metrics::set(&m.log_segment_table, self.state.segment_table_len() as u64);
                    }
                }
                _ = cleanup_tick.tick(), if self.lifecycle.is_some() => {
                    self.cleanup(&mut last_sweep).await;
                }
                _ = archive_tick.tick(), if self.archiver.is_some() => {
                    self.archive_turn();
                    self.compact_turn();
                }
            }
        }
    }

    async fn learn(&mut self) {
        if let Err(e) = self.replay(None, &mut None).await {
            tracing::debug!(error = %e, "reading the commit log failed; will retry");
        }
    }

    /// Commits `first` and whatever else is queued (up to the entry's
    /// bounds) as one log entry, and answers each request.
    async fn serve_group(
        &mut self,
        first: CommitRequest,
        requests: &flume::Receiver<CommitRequest>,
    ) {
        let first = match first {
            CommitRequest::Sync { reply } => {
                let r = self.replay(None, &mut None).await;
                let _ = reply.send(r.map(|()| self.state.applied()));
                return;
            }
            CommitRequest::Producers { partitions, reply } => {
                let r = self.replay(None, &mut None).await;
                let _ = reply.send(r.map(|()| {
                    partitions
                        .iter()
                        .map(|tp| self.state.producers_of(tp))
                        .collect()
                }));
                return;
            }
            CommitRequest::OpenTransactions { reply } => {
                let r = self.replay(None, &mut None).await;
                let _ = reply.send(r.map(|()| self.state.all_open_transactions()));
                return;
            }
            other => other,
        };
        let mut total = first.weight();
        let mut group = vec![first];
        while group.len() < GROUP_SEGMENTS_MAX {
            let Ok(r) = requests.try_recv() else { break };
            if r.is_query() || total + r.weight() > LOG_ENTRY_BATCHES_MAX {
                self.carry = Some(r);
                break;
            }
            total += r.weight();
            group.push(r);
        }
        // Segments sealed before this broker's current registration were
        // accepted while clients may already have been told they failed
        // (see `Fence`): never commit them.
        if let Some(since) = self.fence.as_ref().map(|f| f.registered_at()) {
            let (stale, fresh): (Vec<_>, Vec<_>) = group.into_iter().partition(
                |r| matches!(r, CommitRequest::Segment { sealed_at, .. } if *sealed_at < since),
            );
            for r in stale {
                r.fail(Error::CommitAbandoned {
                    reason: "sealed before this broker registered again".into(),
                });
            }
            group = fresh;
            if group.is_empty() {
                return;
            }
        }
        let mut commit = CommitRecord {
            at_ms: crate::health::now_ms(),
            producer_expiration_ms: self.producer_expiration_ms,
            ..CommitRecord::default()
        };
        let mut sealed: Option<RetryClock> = None;
        for r in &group {
            match r {
                CommitRequest::Segment {
                    segment, sealed_at, ..
                } => {
                    commit.segments.push(segment.clone());
                    sealed = Some(sealed.map_or(*sealed_at, |t| t.min(*sealed_at)));
                }
                CommitRequest::Epoch { epoch, .. } => commit.epochs.push(*epoch),
                CommitRequest::Markers { markers, .. } => commit.markers.extend_from_slice(markers),
                CommitRequest::Trim { trims, .. } => commit.trims.extend_from_slice(trims),
                CommitRequest::Archive {
                    archive,
                    uploaded_at,
                    ..
                } => {
                    commit.archives.push(archive.clone());
                    sealed = Some(sealed.map_or(*uploaded_at, |t| t.min(*uploaded_at)));
                }
                CommitRequest::Sync { .. }
                | CommitRequest::Producers { .. }
                | CommitRequest::OpenTransactions { .. } => {}
            }
        }
        let (seq, outcomes) = match self.append(&commit, sealed).await {
            Ok(landed) => landed,
            Err(e) => {
                tracing::warn!(error = %e, segments = commit.segments.len(), "commit failed");
                for r in group {
                    r.fail(e.clone());
                }
                return;
            }
        };
        let mut outcomes = outcomes.into_iter();
        for r in group {
            match r {
                CommitRequest::Segment { reply, .. } => {
                    let o = outcomes
                        .next()
                        .map(|outcomes| SegmentCommitted { seq, outcomes })
                        .ok_or(Error::Corrupt {
                            what: format!("log entry {seq}"),
                            reason: "fewer segment outcomes than segments".into(),
                        });
                    let _ = reply.send(o);
                }
                CommitRequest::Epoch { reply, .. } => {
                    let _ = reply.send(Ok(()));
                }
                CommitRequest::Trim { trims, reply } => {
                    let log_starts = trims
                        .iter()
                        .map(|t| {
                            self.state.log_start(&PartitionKey {
                                topic_id: t.topic_id,
                                partition: t.partition,
                            })
                        })
                        .collect();
                    let _ = reply.send(Ok(TrimCommitted { seq, log_starts }));
                }
                CommitRequest::Archive { archive, reply, .. } => {
                    // Taken when the log now references it: keys are never
                    // reused. One a trim in the same entry released at once
                    // reads as not taken, and its writer deletes it; no
                    // reader can reach it either way.
                    let taken = self.state.refs().is_referenced(&archive.key);
                    let _ = reply.send(Ok(taken));
                }
                CommitRequest::Markers { reply, .. } | CommitRequest::Sync { reply } => {
                    let _ = reply.send(Ok(seq));
                }
                // Never grouped (see above).
                CommitRequest::Producers { reply, .. } => {
                    let _ = reply.send(Ok(Vec::new()));
                }
                CommitRequest::OpenTransactions { reply } => {
                    let _ = reply.send(Ok(Vec::new()));
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

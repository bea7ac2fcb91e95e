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
use std::collections::{BTreeMap, HashMap};

use floe_meta::schema::{
    self, CommitRecord, ProducerEpoch, SegmentRecord, SnapshotPointer, TrimRecord,
};
use floe_meta::{Compare, MetaStore, Op, Txn};
use floe_objstore::ObjectStore;
use futures::channel::oneshot;

use crate::retention::{RetentionPlanner, RetentionPolicy, SegmentRefs, StoredBatch};
use crate::sequencer::{BatchOutcome, Sequencer, SequencerState};
use crate::{Error, PartitionKey, Result};

/// Most segments committed in one log entry.
pub const GROUP_SEGMENTS_MAX: usize = 64;
/// Most batches described by one log entry: with about 80 bytes of JSON per
/// batch this keeps an entry well under etcd's 1.5 MiB request limit.
pub const LOG_ENTRY_BATCHES_MAX: usize = 8192;
const _: () = assert!(LOG_ENTRY_BATCHES_MAX >= crate::segment::SEGMENT_BATCHES_MAX);
/// Log entries read per range request while catching up.
pub const REPLAY_BATCH_MAX: usize = 256;
/// How long a commit keeps trying before its producers get a retriable
/// error.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(5);
/// Pause between commit attempts while the metadata store is unreachable.
const COMMIT_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// The log is read at least this often even without a watch event.
const LOG_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A snapshot is written after every this many log entries (by the broker
/// that wrote the entry).
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 500;
/// Log entries kept behind the newest snapshot, for brokers that lag.
pub const LOG_KEEP_ENTRIES: u64 = 1000;
const _: () = assert!(LOG_KEEP_ENTRIES >= SNAPSHOT_EVERY_ENTRIES);

/// Most partitions trimmed by one log entry (each trim is about 70 bytes
/// of JSON).
pub const LOG_ENTRY_TRIMS_MAX: usize = 4096;
/// Most objects deleted per cleanup turn; the rest wait for the next turn.
pub const CLEANUP_DELETES_MAX: usize = 1000;

/// One batch of the committer's copy of the partition index:
/// (base offset, records, max timestamp, segment number, pos, len).
type SnapEntry = (u64, u32, i64, u32, u64, u32);

/// The derived state after a log entry: what a starting broker loads
/// instead of replaying the log from the beginning.
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    seq: u64,
    sequencer: SequencerState,
    segments: Vec<String>,
    index: Vec<(PartitionKey, Vec<SnapEntry>)>,
}

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
    /// Moves log start offsets forward (DeleteRecords). Replies with the
    /// entry's sequence number and each partition's log start after it.
    Trim {
        trims: Vec<TrimRecord>,
        reply: oneshot::Sender<Result<(u64, Vec<u64>)>>,
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
    /// The partition's log start once these batches are in (retention
    /// moves it; the shard applies it after pushing the batches).
    pub log_start: u64,
}

/// Where index updates go: the shard that owns each partition. Every
/// shard also learns each applied sequence number, after that entry's
/// updates, so it can tell when its index has caught up with a commit.
pub trait IndexSink: Send + Sync + 'static {
    fn send(&self, update: IndexUpdate);
    fn applied(&self, seq: u64);
}

pub struct Committer {
    /// A request taken from the queue that did not fit the last entry.
    carry: Option<CommitRequest>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Commit latency since the last publication, in microseconds.
    latency: Option<hdrhistogram::Histogram<u64>>,
    /// Commit latency since start, in microseconds.
    latency_total: Option<hdrhistogram::Histogram<u64>>,
    meta: Arc<dyn MetaStore>,
    store: Arc<dyn ObjectStore>,
    /// Every committed batch by partition, for snapshots.
    index: BTreeMap<PartitionKey, Vec<SnapEntry>>,
    segments: Vec<Arc<str>>,
    segment_ids: HashMap<Arc<str>, u32>,
    sequencer: Sequencer,
    sink: Arc<dyn IndexSink>,
    /// Which segments the log still references.
    refs: SegmentRefs,
    lifecycle: Option<Lifecycle>,
    started: Instant,
}

/// Settings and views the cleanup owner needs (see [`Committer::cleanup`]).
#[derive(Clone)]
pub struct Lifecycle {
    pub node_id: i32,
    pub topics: Arc<crate::topics::Topics>,
    pub members: Arc<crate::cluster::Members>,
    /// How often the cleanup owner applies retention and deletes.
    pub interval: Duration,
    /// A released segment is deleted this long after its last reference
    /// was trimmed (Kafka's `file.delete.delay.ms` is 60 s).
    pub delete_grace: Duration,
    /// An object the log does not know is deleted once this old.
    pub orphan_grace: Duration,
    /// How often the bucket is listed for orphans (a LIST per 1,000 keys).
    pub orphan_sweep_interval: Duration,
    /// Multipart uploads started longer ago than this are aborted by the
    /// sweep (S3 only).
    pub multipart_abort_after: Duration,
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
            // Auto-resizing, 3 significant digits.
            latency: hdrhistogram::Histogram::new(3).ok(),
            latency_total: hdrhistogram::Histogram::new(3).ok(),
            meta,
            store,
            index: BTreeMap::new(),
            segments: Vec::new(),
            segment_ids: HashMap::new(),
            sequencer: Sequencer::default(),
            sink,
            refs: SegmentRefs::default(),
            lifecycle: None,
            started: Instant::now(),
        }
    }

    /// Makes this committer apply retention and delete objects when its
    /// broker is the cleanup owner.
    pub fn with_lifecycle(mut self, lifecycle: Lifecycle) -> Self {
        self.lifecycle = Some(lifecycle);
        self
    }

    /// Publishes commit counters and latency to these metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn publish_latency(&mut self) {
        let (Some(m), Some(h)) = (&self.metrics, &mut self.latency) else {
            return;
        };
        // A second without commits reads as 0, not as the last busy second.
        let (p50, p99, max) = if h.is_empty() {
            (0, 0, 0)
        } else {
            (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
        };
        crate::metrics::Metrics::set(&m.commit_latency_p50_us, p50);
        crate::metrics::Metrics::set(&m.commit_latency_p99_us, p99);
        crate::metrics::Metrics::set(&m.commit_latency_max_us, max);
        h.reset();
        if let Some(t) = &self.latency_total {
            crate::metrics::Metrics::set(&m.commit_latency_total_p50_us, t.value_at_quantile(0.5));
            crate::metrics::Metrics::set(&m.commit_latency_total_p99_us, t.value_at_quantile(0.99));
        }
    }

    fn segment_id(&mut self, key: &Arc<str>) -> u32 {
        if let Some(id) = self.segment_ids.get(key) {
            return *id;
        }
        let id = self.segments.len() as u32;
        self.segments.push(key.clone());
        self.segment_ids.insert(key.clone(), id);
        id
    }

    /// Start-up: loads the newest snapshot (if any), hands its index to the
    /// shards, then replays the log after it. Returns the entries replayed.
    pub async fn recover(&mut self) -> Result<u64> {
        if let Some(kv) = self.meta.get(schema::LOG_SNAPSHOT).await? {
            let ptr: SnapshotPointer =
                serde_json::from_slice(&kv.value).map_err(|e| Error::Metadata {
                    reason: format!("{}: {e}", schema::LOG_SNAPSHOT),
                })?;
            let bytes = self.store.get(&ptr.key).await?;
            let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| Error::Storage {
                reason: format!("snapshot {}: {e}", ptr.key),
            })?;
            self.load(snap);
            tracing::info!(seq = ptr.seq, key = %ptr.key, "loaded the metadata snapshot");
        }
        self.catch_up().await
    }

    fn load(&mut self, snap: Snapshot) {
        self.sequencer = Sequencer::from_state(snap.sequencer);
        self.segments = snap
            .segments
            .iter()
            .map(|s| Arc::from(s.as_str()))
            .collect();
        self.segment_ids = self
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let mut held = vec![0u64; self.segments.len()];
        for (tp, entries) in &snap.index {
            let log_start = self.sequencer.log_start(tp);
            // A trimmed partition's first batch may start after 0: the
            // shard's index starts there, then moves to the log start.
            let first = entries.first().map_or(log_start, |e| e.0);
            if first > 0 {
                self.sink.send(IndexUpdate {
                    seq: snap.seq,
                    tp: *tp,
                    segment: Arc::from(""),
                    batches: Vec::new(),
                    log_start: first,
                });
            }
            // One update per run of batches in the same segment.
            let mut i = 0;
            while i < entries.len() {
                let seg = entries[i].3;
                let mut batches = Vec::new();
                while i < entries.len() && entries[i].3 == seg {
                    let (base, records, max_ts, _, pos, len) = entries[i];
                    batches.push((
                        pos,
                        len,
                        records,
                        max_ts,
                        BatchOutcome::Appended { base_offset: base },
                    ));
                    i += 1;
                }
                if let Some(h) = held.get_mut(seg as usize) {
                    *h += batches.len() as u64;
                }
                self.sink.send(IndexUpdate {
                    seq: snap.seq,
                    tp: *tp,
                    segment: self.segments[seg as usize].clone(),
                    batches,
                    log_start,
                });
            }
        }
        // Segments the snapshot lists but no batch references were released
        // before it was written: their grace starts again now, since this
        // broker cannot know whether they are deleted yet.
        let now = std::time::SystemTime::now();
        for (seg, n) in self.segments.iter().zip(held) {
            self.refs.hold(seg, n.max(1));
            if n == 0 {
                self.refs.release(seg, 1, snap.seq, now);
            }
        }
        self.index = snap.index.into_iter().collect();
        self.sink.applied(snap.seq);
    }

    /// Writes a snapshot of the state after entry `seq`, points
    /// `log/snapshot` at it, and trims log entries far behind it.
    fn snapshot(&self, seq: u64) {
        // Only segments still referenced, or released and perhaps not yet
        // deleted, are listed (renumbered): the list does not grow with
        // every segment ever written.
        let mut renumber: HashMap<u32, u32> = HashMap::new();
        let mut segments = Vec::new();
        for (id, key) in self.segments.iter().enumerate() {
            if self.refs.is_known(key) {
                renumber.insert(id as u32, segments.len() as u32);
                segments.push(key.to_string());
            }
        }
        let index = self
            .index
            .iter()
            .map(|(k, v)| {
                let entries = v
                    .iter()
                    .map(|&(base, records, ts, seg, pos, len)| {
                        (
                            base,
                            records,
                            ts,
                            renumber.get(&seg).copied().unwrap_or(seg),
                            pos,
                            len,
                        )
                    })
                    .collect();
                (*k, entries)
            })
            .collect();
        let snap = Snapshot {
            seq,
            sequencer: self.sequencer.state(),
            segments,
            index,
        };
        let bytes = match serde_json::to_vec(&snap) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "encoding a snapshot failed");
                return;
            }
        };
        let (meta, store) = (self.meta.clone(), self.store.clone());
        tokio::spawn(async move {
            if let Err(e) = write_snapshot(&*meta, &*store, seq, bytes).await {
                tracing::warn!(seq, error = %e, "writing the metadata snapshot failed; the next one will retry");
            }
        });
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

    fn route(&mut self, seq: u64, commit: &CommitRecord, outcomes: &[SegmentOutcomes]) {
        for (seg, seg_out) in commit.segments.iter().zip(outcomes) {
            let key: Arc<str> = Arc::from(seg.key.as_str());
            let seg_id = self.segment_id(&key);
            for (chunk, chunk_out) in seg.chunks.iter().zip(seg_out) {
                let entries = self
                    .index
                    .entry(PartitionKey {
                        topic_id: chunk.topic_id,
                        partition: chunk.partition,
                    })
                    .or_default();
                let mut held = 0;
                for (b, o) in chunk.batches.iter().zip(chunk_out) {
                    if let BatchOutcome::Appended { base_offset } = o {
                        entries.push((*base_offset, b.records, b.max_ts, seg_id, b.pos, b.len));
                        held += 1;
                    }
                }
                self.refs.hold(&key, held);
                let tp = PartitionKey {
                    topic_id: chunk.topic_id,
                    partition: chunk.partition,
                };
                self.sink.send(IndexUpdate {
                    seq,
                    tp,
                    log_start: self.sequencer.log_start(&tp),
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
        self.apply_trims(seq, &commit.trims);
        self.sink.applied(seq);
    }

    /// After the sequencer applied entry `seq`'s trims: drops the batches
    /// before each new log start from the snapshot index, releases their
    /// segments and tells the owning shards.
    fn apply_trims(&mut self, seq: u64, trims: &[TrimRecord]) {
        let now = std::time::SystemTime::now();
        for t in trims {
            let tp = PartitionKey {
                topic_id: t.topic_id,
                partition: t.partition,
            };
            let log_start = self.sequencer.log_start(&tp);
            if let Some(entries) = self.index.get_mut(&tp) {
                let gone = entries.partition_point(|e| e.0 + u64::from(e.1) <= log_start);
                let mut by_segment: BTreeMap<u32, u64> = BTreeMap::new();
                for e in entries.drain(..gone) {
                    *by_segment.entry(e.3).or_default() += 1;
                }
                for (seg, n) in by_segment {
                    if let Some(key) = self.segments.get(seg as usize) {
                        self.refs.release(key, n, seq, now);
                    }
                }
            }
            self.sink.send(IndexUpdate {
                seq,
                tp,
                segment: Arc::from(""),
                batches: Vec::new(),
                log_start,
            });
        }
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
        let started = Instant::now();
        let deadline = started + COMMIT_DEADLINE;
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
                    let us = started.elapsed().as_micros().max(1) as u64;
                    for h in [&mut self.latency, &mut self.latency_total]
                        .into_iter()
                        .flatten()
                    {
                        let _ = h.record(us);
                    }
                    if let Some(m) = &self.metrics {
                        crate::metrics::Metrics::add(&m.log_entries_written, 1);
                    }
                    let outcomes = self.sequencer.apply(next, commit);
                    self.route(next, commit, &outcomes);
                    if next.is_multiple_of(SNAPSHOT_EVERY_ENTRIES) {
                        self.snapshot(next);
                    }
                    return Ok((next, outcomes));
                }
                // Another broker committed first: the replay above learns
                // its entries on the next turn.
                Ok(_) => {
                    if let Some(m) = &self.metrics {
                        crate::metrics::Metrics::add(&m.log_cas_conflicts, 1);
                    }
                }
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
        loop {
            if let Some(first) = self.carry.take() {
                self.serve_group(first, &requests).await;
                continue;
            }
            tokio::select! {
                r = requests.recv_async() => match r {
                    Ok(first) => self.serve_group(first, &requests).await,
                    Err(_) => return,
                },
                _ = poke.notified() => self.learn().await,
                _ = tick.tick() => {
                    self.learn().await;
                    self.publish_latency();
                }
                _ = cleanup_tick.tick(), if self.lifecycle.is_some() => {
                    self.cleanup(&mut last_sweep).await;
                }
            }
        }
    }

    /// The cleanup owner is the live broker with the lowest node id. No
    /// extra key or lease: membership is already kept under each broker's
    /// lease, every broker reads the same list, and when the owner dies the
    /// next one takes over within a lease TTL. Two brokers may both act
    /// for a moment while membership changes; that is safe, since trims go
    /// through the log (forward only, clamped), deletes are idempotent and
    /// each broker's grace periods hold on their own.
    fn is_cleanup_owner(l: &Lifecycle) -> bool {
        l.members
            .live()
            .first()
            .is_some_and(|b| b.node_id == l.node_id)
    }

    /// One cleanup turn. Every broker forgets long-released segments; the
    /// owner also commits retention trims, deletes released segments past
    /// their grace, and now and then sweeps orphans and old snapshots.
    async fn cleanup(&mut self, last_sweep: &mut Option<Instant>) {
        let Some(l) = self.lifecycle.clone() else {
            return;
        };
        let now = std::time::SystemTime::now();
        if !Self::is_cleanup_owner(&l) {
            // The owner deletes these; keeping them past twice its grace
            // would only grow this broker's snapshots. One it failed to
            // delete becomes an orphan, which the sweep finds.
            for k in self.refs.deletable(u64::MAX, now, 2 * l.delete_grace) {
                self.refs.forget(&k);
            }
            return;
        }
        self.apply_retention(&l).await;
        let (snap_seq, snap_key) = match self.meta.get(schema::LOG_SNAPSHOT).await {
            Ok(Some(kv)) => match serde_json::from_slice::<SnapshotPointer>(&kv.value) {
                Ok(p) => (p.seq, Some(p.key)),
                Err(_) => (0, None),
            },
            Ok(None) => (0, None),
            Err(e) => {
                tracing::debug!(error = %e, "reading the snapshot pointer failed; cleanup waits");
                return;
            }
        };
        let applied = self.sequencer.applied();
        if self
            .refs
            .waiting_for_snapshot(snap_seq, now, l.delete_grace)
            && applied > snap_seq
        {
            // Released segments past their grace wait for a snapshot that
            // no longer names them; write one now rather than after the
            // next SNAPSHOT_EVERY_ENTRIES entries.
            self.snapshot(applied);
        }
        let doomed: Vec<String> = self
            .refs
            .deletable(snap_seq, now, l.delete_grace)
            .into_iter()
            .take(CLEANUP_DELETES_MAX)
            .map(|k| k.to_string())
            .collect();
        for k in &doomed {
            // Forgotten before the delete is done: one that fails is an
            // orphan by then, and the sweep retries it.
            self.refs.forget(k);
        }
        let sweep = self.started.elapsed() >= l.delete_grace
            && last_sweep.is_none_or(|t| t.elapsed() >= l.orphan_sweep_interval);
        // What the log knows now; anything committed after this instant
        // was uploaded moments ago, far younger than the orphan grace.
        let known = sweep.then(|| self.refs.known_keys());
        if sweep {
            *last_sweep = Some(Instant::now());
        }
        if doomed.is_empty() && known.is_none() {
            return;
        }
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        tokio::spawn(floe_objstore::with_purpose(
            floe_objstore::Purpose::Cleanup,
            async move {
                let counters = metrics.as_ref().map(|m| &m.objstore_cleanup);
                let deleted = delete_all(&*store, counters, &doomed).await;
                if deleted > 0 {
                    tracing::info!(deleted, "deleted segments no partition references any more");
                }
                if let Some(known) = known {
                    sweep_orphans(&*store, counters, &known, snap_key.as_deref(), &l).await;
                }
            },
        ));
    }

    /// Commits the trims retention asks for (owner only). Topics are
    /// re-read first: every topic whose batches this committer applied was
    /// created before them, so a topic missing from a fresh read was
    /// deleted, and its partitions are trimmed to their end.
    async fn apply_retention(&mut self, l: &Lifecycle) {
        if let Err(e) = l.topics.refresh().await {
            tracing::debug!(error = %e, "reading topics failed; retention waits");
            return;
        }
        let policies: HashMap<uuid::Uuid, RetentionPolicy> = l
            .topics
            .snapshot()
            .values()
            .map(|t| {
                let cfg = |k: &str| t.configs.get(k).map(String::as_str);
                (
                    t.id,
                    RetentionPolicy::from_configs(cfg("retention.ms"), cfg("retention.bytes")),
                )
            })
            .collect();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let planner = RetentionPlanner { now_ms };
        let mut trims = Vec::new();
        for (tp, entries) in &self.index {
            let start = self.sequencer.log_start(tp);
            let to = match policies.get(&tp.topic_id) {
                None => {
                    let hwm = self.sequencer.high_watermark(tp);
                    (hwm > start).then_some(hwm)
                }
                Some(p) if p.is_unlimited() => None,
                Some(p) => planner.plan(*p, start, entries.len(), |i| {
                    let (base_offset, records, max_ts, _, _, len) = entries[i];
                    StoredBatch {
                        base_offset,
                        records,
                        max_ts,
                        len,
                    }
                }),
            };
            if let Some(to) = to {
                trims.push(TrimRecord {
                    topic_id: tp.topic_id,
                    partition: tp.partition,
                    log_start: to,
                });
                if trims.len() == LOG_ENTRY_TRIMS_MAX {
                    break;
                }
            }
        }
        if trims.is_empty() {
            return;
        }
        let n = trims.len();
        let commit = CommitRecord {
            segments: Vec::new(),
            epochs: Vec::new(),
            trims,
        };
        match self.append(&commit).await {
            Ok((seq, _)) => {
                tracing::info!(seq, partitions = n, "retention moved log start offsets")
            }
            Err(e) => {
                tracing::warn!(error = %e, "committing retention trims failed; next turn retries")
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
            let batches = |r: &CommitRequest| match r {
                CommitRequest::Segment { segment, .. } => {
                    segment.chunks.iter().map(|c| c.batches.len()).sum()
                }
                CommitRequest::Epoch { .. } => 0,
                // A trim is about as long as a batch in the entry's JSON.
                CommitRequest::Trim { trims, .. } => trims.len(),
            };
            let mut total = batches(&first);
            let mut group = vec![first];
            while group.len() < GROUP_SEGMENTS_MAX {
                let Ok(r) = requests.try_recv() else { break };
                if total + batches(&r) > LOG_ENTRY_BATCHES_MAX {
                    self.carry = Some(r);
                    break;
                }
                total += batches(&r);
                group.push(r);
            }
            let mut commit = CommitRecord {
                segments: Vec::new(),
                epochs: Vec::new(),
                trims: Vec::new(),
            };
            for r in &group {
                match r {
                    CommitRequest::Segment { segment, .. } => commit.segments.push(segment.clone()),
                    CommitRequest::Epoch { epoch, .. } => commit.epochs.push(*epoch),
                    CommitRequest::Trim { trims, .. } => commit.trims.extend_from_slice(trims),
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
                            CommitRequest::Trim { trims, reply } => {
                                let starts = trims
                                    .iter()
                                    .map(|t| {
                                        self.sequencer.log_start(&PartitionKey {
                                            topic_id: t.topic_id,
                                            partition: t.partition,
                                        })
                                    })
                                    .collect();
                                let _ = reply.send(Ok((seq, starts)));
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
                            CommitRequest::Trim { reply, .. } => {
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

/// Deletes `keys`; returns how many went. A failure is logged and left
/// for the orphan sweep.
async fn delete_all(
    store: &dyn ObjectStore,
    counters: Option<&floe_objstore::RequestCounters>,
    keys: &[String],
) -> usize {
    let mut deleted = 0;
    for k in keys {
        match store.delete(k).await {
            Ok(()) => {
                deleted += 1;
                if let Some(c) = counters {
                    floe_objstore::RequestCounters::bump(&c.deletes);
                }
            }
            Err(e) => {
                if let Some(c) = counters {
                    c.error();
                }
                tracing::warn!(key = %k, error = %e, "deleting an object failed; the orphan sweep retries");
            }
        }
    }
    deleted
}

/// Lists `segments/` and `snapshots/` and deletes uploads the log never
/// committed (older than the orphan grace) and snapshots superseded for
/// longer than the delete grace.
async fn sweep_orphans(
    store: &dyn ObjectStore,
    counters: Option<&floe_objstore::RequestCounters>,
    known: &std::collections::HashSet<Arc<str>>,
    snapshot_key: Option<&str>,
    l: &Lifecycle,
) {
    let list = |prefix: &'static str| async move {
        let r = store.list(prefix).await;
        if let Some(c) = counters {
            match &r {
                Ok(_) => floe_objstore::RequestCounters::bump(&c.lists),
                Err(_) => c.error(),
            }
        }
        r.map_err(|e| tracing::warn!(prefix, error = %e, "listing for the orphan sweep failed"))
            .ok()
    };
    let now = std::time::SystemTime::now();
    let mut doomed = Vec::new();
    if let Some(listing) = list(crate::retention::SEGMENTS_PREFIX).await {
        doomed.extend(crate::retention::orphans(
            &listing,
            known,
            now,
            l.orphan_grace,
        ));
    }
    let orphans = doomed.len();
    if let Some(current) = snapshot_key {
        if let Some(listing) = list(crate::retention::SNAPSHOTS_PREFIX).await {
            doomed.extend(crate::retention::stale_snapshots(
                &listing,
                current,
                now,
                l.delete_grace,
            ));
        }
    }
    match store.abort_stale_uploads(l.multipart_abort_after).await {
        Ok(0) => {}
        Ok(aborted) => tracing::info!(aborted, "aborted stale multipart uploads"),
        Err(e) => tracing::warn!(error = %e, "aborting stale multipart uploads failed"),
    }
    doomed.truncate(CLEANUP_DELETES_MAX);
    if doomed.is_empty() {
        return;
    }
    let deleted = delete_all(store, counters, &doomed).await;
    tracing::info!(
        orphans,
        snapshots = doomed.len() - orphans.min(doomed.len()),
        deleted,
        "orphan sweep deleted objects the log does not reference"
    );
}

async fn write_snapshot(
    meta: &dyn MetaStore,
    store: &dyn ObjectStore,
    seq: u64,
    bytes: Bytes,
) -> Result<()> {
    let key = format!("snapshots/{seq:020}.json");
    store.put(&key, vec![bytes]).await?;
    let ptr = Bytes::from(
        serde_json::to_vec(&SnapshotPointer {
            seq,
            key: key.clone(),
        })
        .map_err(|e| Error::Metadata {
            reason: e.to_string(),
        })?,
    );
    // Only ever move the pointer forward.
    let cur = meta.get(schema::LOG_SNAPSHOT).await?;
    let (guard, older) = match &cur {
        Some(kv) => {
            let p: SnapshotPointer =
                serde_json::from_slice(&kv.value).map_err(|e| Error::Metadata {
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
    // Trim: entries up to seq - LOG_KEEP_ENTRIES are no longer needed.
    let Some(upto) = seq.checked_sub(LOG_KEEP_ENTRIES) else {
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

//! The commit log under concurrency and faults, without a broker: several
//! committers share one metadata store and one object store, idempotent
//! producers commit concurrently to the same partitions through all of
//! them, and the metadata store loses replies ("outcome unknown"), refuses
//! requests and fails reads at random. Every schedule is seeded; a failure
//! prints the seed to run it again:
//!
//!   FLOE_SCHEDULE_SEED=1234 FLOE_SCHEDULES=1 cargo test -p floe-engine --test commit_log
//!
//! Properties checked after each schedule:
//! - every committer, after catching up, holds the same state;
//! - each partition's offsets are contiguous from 0, with no duplicates;
//! - every acknowledged batch is in the log at its acknowledged offset, once;
//! - each producer's batches keep their order within a partition;
//! - a request answered with an error is not in the log;
//! - what the committers sent to their shards builds the same index;
//! - an archive the log took holds exactly the batches it replaced, and
//!   its object is never swept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use floe_engine::committer::{CommitRequest, Committer, IndexSink, IndexUpdate, SegmentCommitted};
use floe_engine::sequencer::BatchOutcome;
use floe_engine::{retention, PartitionKey};
use floe_meta::faulty::Rng;
use floe_meta::schema::{ArchiveRecord, BatchRecord, ChunkRecord, SegmentRecord};
use floe_meta::{Embedded, FaultyMeta, MetaFaults, MetaStore};
use floe_objstore::{Memory, ObjectMeta, ObjectStore};
use futures::channel::oneshot;

/// What one committer told its shards.
#[derive(Default)]
struct Recorder {
    updates: Mutex<Vec<IndexUpdate>>,
    applied: Mutex<u64>,
    /// Snapshots loaded in place.
    reloads: std::sync::atomic::AtomicU64,
}

impl IndexSink for Recorder {
    fn send(&self, update: IndexUpdate) {
        self.updates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(update);
    }
    fn applied(&self, seq: u64) {
        let mut a = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        assert!(seq > *a, "applied went from {} to {seq}", *a);
        *a = seq;
    }
    fn reload(&self, seq: u64, updates: Vec<IndexUpdate>) {
        *self.updates.lock().unwrap_or_else(|e| e.into_inner()) = updates;
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.applied(seq);
    }
}

#[derive(Debug, Clone, Copy)]
struct Schedule {
    seed: u64,
    committers: usize,
    producers_per_committer: usize,
    segments_per_producer: usize,
    partitions: u32,
    faults: MetaFaults,
    /// Faults of the last committer instead (a broker that lags).
    lagger: Option<MetaFaults>,
    /// Segments an idempotent producer keeps in flight at once.
    window: usize,
    /// Plain producers write producer ids below -1 (a client may).
    odd_producer_ids: bool,
    /// Runs an orphan sweep with this grace next to the committers.
    orphan_grace: Option<Duration>,
    /// Snapshot every this many entries, keep this many behind (the
    /// product's window is 500 and 1,000).
    log_window: Option<(u64, u64)>,
    /// Times the first committer crashes (its task is dropped wherever it
    /// is, between upload and commit or mid-transaction) and restarts from
    /// the snapshot and the log, as a broker killed with -9 does.
    crashes: u32,
    /// An archiver rewrites the first unarchived batches of a partition
    /// now and then, committing through the first committer.
    archiver: bool,
}

impl Schedule {
    fn new(seed: u64, faults: MetaFaults) -> Self {
        Self {
            seed,
            committers: 3,
            producers_per_committer: 2,
            segments_per_producer: 8,
            partitions: 2,
            faults,
            lagger: None,
            window: 1,
            odd_producer_ids: false,
            orphan_grace: None,
            log_window: None,
            crashes: 0,
            archiver: false,
        }
    }
}

/// One batch a producer sent: who, where, and its place in the
/// producer's order for that partition (the sequence number can start
/// again at 0 in a new epoch; this cannot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BatchId {
    producer: i64,
    partition: u32,
    idx: u32,
}

/// A batch at its offset, by where it was sent: (base offset, (segment
/// key, position)).
type Placed = (u64, (String, u64));

/// What the producers saw.
#[derive(Default)]
struct Acks {
    /// Acknowledged offset of each batch.
    offsets: HashMap<BatchId, u64>,
    /// Every (segment key, pos) a batch was sent at, over all attempts.
    placed: HashMap<(String, u64), BatchId>,
    /// Requests answered with an error (then retried).
    failures: u64,
    /// Segment keys of the attempts answered with an error.
    failed_keys: HashSet<String>,
    /// When each segment object was uploaded (tokio's clock).
    uploaded: HashMap<String, tokio::time::Instant>,
    /// Producer epochs bumped after an out-of-order answer.
    epoch_bumps: u64,
    /// Requests answered "outcome unknown".
    unknown: u64,
    /// The batches each archive object was planned with: (base offset,
    /// segment key and position).
    archived: HashMap<String, Vec<Placed>>,
    /// Archive entries the log took, and archives tried.
    archives_taken: u64,
    archives_tried: u64,
    /// Of those taken, compacted archives (replacing archives).
    compactions_taken: u64,
}

const RECORDS_PER_BATCH_MAX: u64 = 4;
/// Compacted archives the logs took, over every schedule run here.
static COMPACTIONS_TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Attempts per segment before the schedule is declared stuck.
const ATTEMPTS_MAX: usize = 200;

fn topic() -> uuid::Uuid {
    uuid::Uuid::from_u128(0xf10e)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One batch of a producer, as the producer tracks it.
#[derive(Debug, Clone, Copy)]
struct Sent {
    id: BatchId,
    records: u32,
    /// Sequence and epoch of the current attempt.
    seq: i32,
    epoch: i16,
    acked: Option<u64>,
}

/// Uploads a segment holding `batches` (at most one per partition) and
/// asks the committer to commit it; returns the reply, or None when the
/// reply was dropped.
#[allow(clippy::too_many_arguments)]
async fn send_segment(
    key: &str,
    producer_id: i64,
    batches: &[Sent],
    max_ts: i64,
    committer: &flume::Sender<CommitRequest>,
    store: &Arc<dyn ObjectStore>,
    acks: &Mutex<Acks>,
) -> Result<oneshot::Receiver<floe_engine::Result<SegmentCommitted>>, String> {
    let sealed_at = tokio::time::Instant::now();
    let mut pos = 16;
    let mut record = SegmentRecord {
        key: key.to_string(),
        size: 0,
        chunks: Vec::new(),
    };
    {
        let mut a = lock(acks);
        let mut by_partition: BTreeMap<u32, Vec<&Sent>> = BTreeMap::new();
        for b in batches {
            by_partition.entry(b.id.partition).or_default().push(b);
        }
        for (partition, bs) in by_partition {
            let mut chunk = ChunkRecord {
                topic_id: topic(),
                partition,
                batches: Vec::new(),
            };
            for b in bs {
                let len = 61 + 10 * b.records;
                chunk.batches.push(BatchRecord {
                    pos,
                    len,
                    records: b.records,
                    max_ts,
                    producer_id,
                    producer_epoch: if producer_id >= 0 { b.epoch } else { -1 },
                    base_sequence: if producer_id >= 0 { b.seq } else { -1 },
                    transactional: false,
                });
                a.placed.insert((key.to_string(), pos), b.id);
                pos += u64::from(len);
            }
            record.chunks.push(chunk);
        }
        a.uploaded.insert(key.to_string(), sealed_at);
    }
    record.size = pos;
    store
        .put(key, vec![bytes::Bytes::from(vec![0u8; pos as usize])])
        .await
        .map_err(|e| format!("upload of {key}: {e}"))?;
    let (tx, rx) = oneshot::channel();
    committer
        .send_async(CommitRequest::Segment {
            segment: record,
            sealed_at,
            reply: tx,
        })
        .await
        .map_err(|_| "committer gone".to_string())?;
    Ok(rx)
}

/// The batches a producer will send, each to a random partition, in order.
fn plan_batches(producer: i64, s: Schedule, rng: &mut Rng) -> Vec<Vec<Sent>> {
    let mut next_idx: BTreeMap<u32, u32> = BTreeMap::new();
    let mut next_seq: BTreeMap<u32, i32> = BTreeMap::new();
    (0..s.segments_per_producer)
        .map(|_| {
            let mut seg: Vec<Sent> = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let partition = rng.below(u64::from(s.partitions)) as u32;
                if seg.iter().any(|b| b.id.partition == partition) {
                    continue;
                }
                let records = 1 + rng.below(RECORDS_PER_BATCH_MAX) as u32;
                let idx = next_idx.entry(partition).or_insert(0);
                let seq = next_seq.entry(partition).or_insert(0);
                seg.push(Sent {
                    id: BatchId {
                        producer,
                        partition,
                        idx: *idx,
                    },
                    records,
                    seq: *seq,
                    epoch: 0,
                    acked: None,
                });
                *idx += 1;
                *seq += records as i32;
            }
            seg
        })
        .collect()
}

/// The committer's answer; a dropped reply (the committer crashed) is an
/// unknown outcome.
async fn answer(
    rx: oneshot::Receiver<floe_engine::Result<SegmentCommitted>>,
) -> floe_engine::Result<SegmentCommitted> {
    rx.await
        .unwrap_or(Err(floe_engine::Error::CommitOutcomeUnknown {
            reason: "the committer crashed".into(),
        }))
}

/// Each producer's own draws, from the schedule's seed.
fn producer_rng(producer: i64, s: Schedule) -> Rng {
    Rng(s.seed ^ (producer as u64).wrapping_mul(0x2545_f491_4f6c_dd1d))
}

/// A plain producer (no idempotence): sends each segment once, one at a
/// time, and never retries, so any copy of its batches in the log is the
/// committer's doing.
async fn produce_plain(
    producer: i64,
    s: Schedule,
    committer: flume::Sender<CommitRequest>,
    store: Arc<dyn ObjectStore>,
    acks: Arc<Mutex<Acks>>,
) -> Result<(), String> {
    let mut rng = producer_rng(producer, s);
    // A client may put any negative producer id in a plain batch.
    let producer_id = if s.odd_producer_ids {
        -2 - rng.below(1000) as i64
    } else {
        -1
    };
    for (n, seg) in plan_batches(producer, s, &mut rng).into_iter().enumerate() {
        let key = format!("segments/p{producer}-n{n}");
        let rx = send_segment(&key, producer_id, &seg, n as i64, &committer, &store, &acks).await?;
        let reply = answer(rx).await;
        match reply {
            Ok(SegmentCommitted { outcomes, .. }) => {
                let mut a = lock(&acks);
                // One chunk per partition, in partition order.
                let mut order = seg.clone();
                order.sort_by_key(|b| b.id.partition);
                for (b, o) in order.iter().zip(&outcomes) {
                    match o.first() {
                        Some(BatchOutcome::Appended { base_offset }) => {
                            a.offsets.insert(b.id, *base_offset);
                        }
                        other => return Err(format!("{:?} answered {other:?}", b.id)),
                    }
                }
            }
            // Maybe in the log, maybe not: neither acknowledged nor
            // refused.
            Err(floe_engine::Error::CommitOutcomeUnknown { .. }) => lock(&acks).unknown += 1,
            Err(_) => {
                let mut a = lock(&acks);
                a.failures += 1;
                a.failed_keys.insert(key);
            }
        }
    }
    Ok(())
}

/// An idempotent producer with up to `window` segments in flight: each
/// round sends the first unacknowledged batch of every partition in one
/// segment, the second in the next segment, and so on, a moment apart
/// (as a shard seals them), then waits for every answer. A batch answered
/// with an error or out of order is sent again next round with the same
/// sequence; when the first unacknowledged batch of a partition is
/// refused as out of order although everything before it was
/// acknowledged, the producer bumps its epoch and numbers what is left
/// from 0 again, as librdkafka and the Java client do.
async fn produce_idempotent(
    producer: i64,
    s: Schedule,
    committer: flume::Sender<CommitRequest>,
    store: Arc<dyn ObjectStore>,
    acks: Arc<Mutex<Acks>>,
) -> Result<(), String> {
    let mut rng = producer_rng(producer, s);
    let mut batches: Vec<Sent> = plan_batches(producer, s, &mut rng)
        .into_iter()
        .flatten()
        .collect();
    let mut epoch: i16 = 0;
    let rounds_max = ATTEMPTS_MAX * s.segments_per_producer;
    for round in 0.. {
        if batches.iter().all(|b| b.acked.is_some()) {
            return Ok(());
        }
        if round > rounds_max {
            return Err(format!(
                "producer {producer}: batches unacknowledged after {rounds_max} rounds"
            ));
        }
        // Segment k holds the k-th unacknowledged batch of each partition.
        let mut segments: Vec<Vec<usize>> = Vec::new();
        let mut per_partition: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, b) in batches.iter().enumerate() {
            if b.acked.is_some() {
                continue;
            }
            let k = per_partition.entry(b.id.partition).or_insert(0);
            if *k < s.window {
                if segments.len() <= *k {
                    segments.push(Vec::new());
                }
                segments[*k].push(i);
            }
            *k += 1;
        }
        let mut replies = Vec::new();
        for (k, seg) in segments.iter().enumerate() {
            if k > 0 {
                tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
            }
            let key = format!("segments/p{producer}-r{round}-k{k}");
            let sent: Vec<Sent> = seg.iter().map(|&i| batches[i]).collect();
            let rx = send_segment(
                &key,
                producer,
                &sent,
                round as i64,
                &committer,
                &store,
                &acks,
            )
            .await?;
            replies.push((key, rx));
        }
        let mut refused: Vec<usize> = Vec::new();
        for ((key, rx), seg) in replies.into_iter().zip(&segments) {
            let reply = answer(rx).await;
            let outcomes = match reply {
                Ok(SegmentCommitted { outcomes, .. }) => outcomes,
                // The retry finds out, by the sequence numbers.
                Err(floe_engine::Error::CommitOutcomeUnknown { .. }) => {
                    lock(&acks).unknown += 1;
                    continue;
                }
                Err(_) => {
                    let mut a = lock(&acks);
                    a.failures += 1;
                    a.failed_keys.insert(key);
                    continue;
                }
            };
            // One chunk per partition, in partition order.
            let mut order: Vec<usize> = seg.clone();
            order.sort_by_key(|&i| batches[i].id.partition);
            for (&i, chunk) in order.iter().zip(&outcomes) {
                let b = &mut batches[i];
                match chunk.first() {
                    Some(
                        BatchOutcome::Appended { base_offset }
                        | BatchOutcome::Duplicate { base_offset },
                    ) => {
                        if let Some(prev) = b.acked {
                            if prev != *base_offset {
                                return Err(format!(
                                    "{:?} acknowledged at {prev} and at {base_offset}",
                                    b.id
                                ));
                            }
                        }
                        b.acked = Some(*base_offset);
                        let mut a = lock(&acks);
                        if let Some(prev) = a.offsets.insert(b.id, *base_offset) {
                            if prev != *base_offset {
                                return Err(format!(
                                    "{:?} acknowledged at {prev} and at {base_offset}",
                                    b.id
                                ));
                            }
                        }
                    }
                    Some(BatchOutcome::OutOfOrder) => refused.push(i),
                    other => return Err(format!("{:?} answered {other:?}", b.id)),
                }
            }
        }
        // Out of order with nothing before it outstanding: the producer's
        // sequence is out of step with the log; bump the epoch.
        let desync = refused.iter().any(|&i| {
            let b = &batches[i];
            batches
                .iter()
                .filter(|o| o.id.partition == b.id.partition && o.id.idx < b.id.idx)
                .all(|o| o.acked.is_some())
        });
        if desync {
            epoch += 1;
            lock(&acks).epoch_bumps += 1;
            let mut next_seq: BTreeMap<u32, i32> = BTreeMap::new();
            for b in batches.iter_mut().filter(|b| b.acked.is_none()) {
                let seq = next_seq.entry(b.id.partition).or_insert(0);
                b.seq = *seq;
                b.epoch = epoch;
                *seq += b.records as i32;
            }
        }
    }
    Ok(())
}

async fn catch_up(c: &mut Committer) -> Result<(), String> {
    // Outages are counted in requests: enough attempts to outlast several.
    for _ in 0..20 * ATTEMPTS_MAX {
        if c.catch_up().await.is_ok() {
            return Ok(());
        }
    }
    Err("a committer could not catch up".into())
}

/// The orphan sweep of the cleanup owner, on the sim's clock: every
/// quarter grace it catches a committer of its own up with the log and
/// deletes, by the product's rule ([`retention::orphans`]), the uploads
/// the log does not know that are older than the grace.
async fn sweep(
    meta: Arc<dyn MetaStore>,
    store: Arc<dyn ObjectStore>,
    acks: Arc<Mutex<Acks>>,
    grace: Duration,
    done: Arc<tokio::sync::Notify>,
) -> u64 {
    let t0 = tokio::time::Instant::now();
    let sim_time = |t: tokio::time::Instant| SystemTime::UNIX_EPOCH + (t - t0);
    let mut owner = Committer::new(meta, store.clone(), Arc::new(Recorder::default()));
    let mut deleted = 0;
    loop {
        tokio::select! {
            _ = done.notified() => return deleted,
            _ = tokio::time::sleep(grace / 4) => {}
        }
        if owner.catch_up().await.is_err() {
            continue;
        }
        let known = owner.state().refs().known_keys();
        let (Ok(mut listing), Ok(archives)) = (
            store.list(retention::SEGMENTS_PREFIX).await,
            store.list(retention::ARCHIVES_PREFIX).await,
        ) else {
            continue;
        };
        listing.extend(archives);
        let listing: Vec<ObjectMeta> = {
            let a = lock(&acks);
            listing
                .into_iter()
                .filter_map(|m| {
                    let at = *a.uploaded.get(&m.key)?;
                    Some(ObjectMeta {
                        last_modified: sim_time(at),
                        ..m
                    })
                })
                .collect()
        };
        let now = sim_time(tokio::time::Instant::now());
        for key in retention::orphans(&listing, &known, now, grace) {
            if store.delete(&key).await.is_ok() {
                deleted += 1;
            }
        }
    }
}

/// The archiving job, on the sim's clock: now and then it plans an
/// archive of a partition's first unarchived batches from a committer of
/// its own (perhaps behind the log), uploads it and asks `requests` (the
/// first committer, which may crash and lose the reply) to commit it.
async fn archive_now_and_then(
    meta: Arc<dyn MetaStore>,
    store: Arc<dyn ObjectStore>,
    acks: Arc<Mutex<Acks>>,
    requests: flume::Sender<CommitRequest>,
    s: Schedule,
    done: Arc<tokio::sync::Notify>,
) {
    let mut rng = Rng(s.seed ^ 0xa5c1_1e00);
    let mut planner = Committer::new(meta, store.clone(), Arc::new(Recorder::default()));
    for n in 0u64.. {
        tokio::select! {
            _ = done.notified() => return,
            _ = tokio::time::sleep(Duration::from_millis(10 + rng.below(100))) => {}
        }
        if planner.catch_up().await.is_err() {
            continue;
        }
        let tp = PartitionKey {
            topic_id: topic(),
            partition: rng.below(u64::from(s.partitions)) as u32,
        };
        // Now and then a compaction pass instead: a run of two or three
        // of the partition's archives rewritten into one (the simulation
        // drops no record; what is tested is the switch).
        let archives: Vec<(u64, u64, String, u32)> = planner
            .state()
            .layout(&tp)
            .take_while(|(_, k)| retention::is_archive_key(k))
            .map(|(b, k)| (b.base_offset, b.end_offset(), k.to_string(), b.len))
            .collect();
        if archives.len() >= 2 && rng.below(3) == 0 {
            let len = 2 + rng.below(2).min(archives.len() as u64 - 2) as usize;
            let from = rng.below((archives.len() - len + 1) as u64) as usize;
            let run = &archives[from..from + len];
            let key = format!("{}{}-{n}-c", retention::ARCHIVES_PREFIX, s.seed);
            let size: u64 = run.iter().map(|a| u64::from(a.3)).sum();
            let archive = ArchiveRecord {
                topic_id: tp.topic_id,
                partition: tp.partition,
                key: key.clone(),
                size,
                base_offset: run[0].0,
                end_offset: run[len - 1].1,
                replaces: run.iter().map(|a| a.2.clone()).collect(),
            };
            let uploaded_at = tokio::time::Instant::now();
            {
                let mut a = lock(&acks);
                let held: Option<Vec<Placed>> = run
                    .iter()
                    .map(|r| a.archived.get(&r.2).cloned())
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.concat());
                let Some(held) = held else { continue };
                a.archived.insert(key.clone(), held);
                a.uploaded.insert(key.clone(), uploaded_at);
                a.archives_tried += 1;
            }
            if put_and_commit(&*store, &requests, archive, size, uploaded_at).await {
                let mut a = lock(&acks);
                a.archives_taken += 1;
                a.compactions_taken += 1;
                COMPACTIONS_TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            continue;
        }
        let take = 1 + rng.below(5) as usize;
        let batches: Vec<(u64, u64, String, u64, u32)> = planner
            .state()
            .unarchived(&tp)
            .take(take)
            .map(|(b, key)| (b.base_offset, b.end_offset(), key.to_string(), b.pos, b.len))
            .collect();
        let (Some(first), Some(last)) = (batches.first(), batches.last()) else {
            continue;
        };
        let key = format!("{}{}-{n}", retention::ARCHIVES_PREFIX, s.seed);
        let size: u64 = batches.iter().map(|b| u64::from(b.4)).sum::<u64>() + 32;
        let archive = ArchiveRecord {
            topic_id: tp.topic_id,
            partition: tp.partition,
            key: key.clone(),
            size,
            base_offset: first.0,
            end_offset: last.1,
            replaces: Vec::new(),
        };
        let uploaded_at = tokio::time::Instant::now();
        {
            let mut a = lock(&acks);
            a.archived.insert(
                key.clone(),
                batches.iter().map(|b| (b.0, (b.2.clone(), b.3))).collect(),
            );
            a.uploaded.insert(key.clone(), uploaded_at);
            a.archives_tried += 1;
        }
        if put_and_commit(&*store, &requests, archive, size, uploaded_at).await {
            lock(&acks).archives_taken += 1;
        }
    }
}

/// Uploads a stand-in object of `size` bytes for `archive` and sends its
/// entry; whether the log took it.
async fn put_and_commit(
    store: &dyn ObjectStore,
    requests: &flume::Sender<CommitRequest>,
    archive: ArchiveRecord,
    size: u64,
    uploaded_at: tokio::time::Instant,
) -> bool {
    let body = vec![bytes::Bytes::from(vec![0u8; size as usize])];
    if store.put(&archive.key, body).await.is_err() {
        return false;
    }
    let (reply, answer) = oneshot::channel();
    let sent = requests
        .send_async(CommitRequest::Archive {
            archive,
            uploaded_at,
            reply,
        })
        .await;
    sent.is_ok() && matches!(answer.await, Ok(Ok(true)))
}

/// Runs one committer until its queue closes, crashing it `crashes` times
/// at random moments (its task dropped wherever it is: requests in flight
/// lose their replies, an upload may never be committed) and starting a
/// fresh one from the snapshot and the log each time, as a restarted
/// broker does. Returns the last committer, what it told its shards, and
/// how many crashes happened.
async fn supervise(
    meta: Arc<dyn MetaStore>,
    store: Arc<dyn ObjectStore>,
    s: Schedule,
    requests: flume::Receiver<CommitRequest>,
    crashes: u32,
) -> Result<(Committer, Arc<Recorder>, u32), String> {
    let mut rng = Rng(s.seed ^ 0xc0ff_ee00);
    let mut crashed = 0;
    loop {
        let recorder = Arc::new(Recorder::default());
        let mut committer = Committer::new(meta.clone(), store.clone(), recorder.clone());
        if let Some(grace) = s.orphan_grace {
            // As the product derives it from the orphan grace.
            committer = committer.with_max_commit_age(grace / 2);
        }
        if let Some((every, keep)) = s.log_window {
            committer = committer.with_log_window(every, keep);
        }
        if crashed > 0 {
            let mut recovered = false;
            for _ in 0..20 * ATTEMPTS_MAX {
                if committer.recover().await.is_ok() {
                    recovered = true;
                    break;
                }
            }
            if !recovered {
                return Err("a restarted committer could not recover".into());
            }
        }
        let poke = Arc::new(tokio::sync::Notify::new());
        let mut task = tokio::spawn(committer.run(requests.clone(), poke));
        if crashed < crashes {
            let after = Duration::from_millis(rng.below(200));
            tokio::select! {
                done = &mut task => {
                    let c = done.map_err(|e| e.to_string())?;
                    return Ok((c, recorder, crashed));
                }
                _ = tokio::time::sleep(after) => {
                    task.abort();
                    let _ = task.await;
                    crashed += 1;
                    continue;
                }
            }
        }
        let c = task.await.map_err(|e| e.to_string())?;
        return Ok((c, recorder, crashed));
    }
}

async fn run_schedule(s: Schedule) -> Result<String, String> {
    let base: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().map_err(|e| e.to_string())?);
    let store: Arc<dyn ObjectStore> = Arc::new(Memory::default());
    let acks = Arc::new(Mutex::new(Acks::default()));
    let sweep_done = Arc::new(tokio::sync::Notify::new());
    let sweeper = s.orphan_grace.map(|grace| {
        tokio::spawn(sweep(
            base.clone(),
            store.clone(),
            acks.clone(),
            grace,
            sweep_done.clone(),
        ))
    });
    let mut running = Vec::new();
    let mut producers = Vec::new();
    let mut recorders = Vec::new();
    let archive_done = Arc::new(tokio::sync::Notify::new());
    let mut archiver = None;
    for c in 0..s.committers {
        let faults = match s.lagger {
            Some(f) if c + 1 == s.committers => f,
            _ => s.faults,
        };
        let meta = Arc::new(FaultyMeta::new(
            base.clone(),
            MetaFaults {
                seed: s.seed.wrapping_mul(31).wrapping_add(c as u64),
                ..faults
            },
        ));
        let (tx, rx) = flume::bounded(64);
        if c == 0 && s.archiver {
            archiver = Some(tokio::spawn(archive_now_and_then(
                base.clone(),
                store.clone(),
                acks.clone(),
                tx.clone(),
                s,
                archive_done.clone(),
            )));
        }
        let crashes = if c == 0 { s.crashes } else { 0 };
        running.push(tokio::spawn(supervise(meta, store.clone(), s, rx, crashes)));
        for p in 0..s.producers_per_committer {
            let id = 1000 + (c * s.producers_per_committer + p) as i64;
            let (tx, store, acks) = (tx.clone(), store.clone(), acks.clone());
            producers.push(if id % 2 == 0 {
                tokio::spawn(produce_idempotent(id, s, tx, store, acks))
            } else {
                tokio::spawn(produce_plain(id, s, tx, store, acks))
            });
        }
    }
    for p in producers {
        p.await.map_err(|e| e.to_string())??;
    }
    // The first committer's queue closes once the archiver lets go of it.
    archive_done.notify_one();
    if let Some(a) = archiver {
        a.await.map_err(|e| e.to_string())?;
    }
    let mut committers = Vec::new();
    let mut restarts = 0;
    for r in running {
        let (mut c, recorder, n) = r.await.map_err(|e| e.to_string())??;
        catch_up(&mut c).await?;
        committers.push(c);
        recorders.push(recorder);
        restarts += n;
    }
    // Let the sweep judge every object once more, all of them past the
    // grace: one the log references but does not know would go now.
    if let Some(grace) = s.orphan_grace {
        tokio::time::sleep(grace * 2).await;
    }
    sweep_done.notify_one();
    let swept = match sweeper {
        Some(t) => t.await.map_err(|e| e.to_string())?,
        None => 0,
    };
    let mut present: HashSet<String> = HashSet::new();
    for prefix in [retention::SEGMENTS_PREFIX, retention::ARCHIVES_PREFIX] {
        present.extend(
            store
                .list(prefix)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|m| m.key),
        );
    }
    let acks = lock(&acks);
    let summary = check(&committers, &recorders, &acks, &present, s)?;
    let reloads: u64 = recorders
        .iter()
        .map(|r| r.reloads.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    Ok(format!(
        "{summary}, {swept} orphans swept, {reloads} snapshot reloads, {} outcomes unknown, {restarts} crashes, {} of {} archives taken ({} compacted)",
        acks.unknown, acks.archives_taken, acks.archives_tried, acks.compactions_taken
    ))
}

fn check(
    committers: &[Committer],
    recorders: &[Arc<Recorder>],
    acks: &Acks,
    present: &HashSet<String>,
    s: Schedule,
) -> Result<String, String> {
    let reference = committers[0].state().snapshot();
    // Not a skipped test: committer 0 is the reference the others are
    // compared with.
    for (i, c) in committers.iter().enumerate().skip(1) {
        if c.state().snapshot() != reference {
            return Err(format!(
                "committer {i} disagrees with committer 0 after catching up"
            ));
        }
    }
    let mut seen: HashSet<BatchId> = HashSet::new();
    let mut at_offset: HashMap<(u32, u64), BatchId> = HashMap::new();
    let mut last_idx: HashMap<(i64, u32), u32> = HashMap::new();
    for partition in 0..s.partitions {
        let tp = PartitionKey {
            topic_id: topic(),
            partition,
        };
        let mut expected = 0;
        // The snapshot's own segment numbering: it lists only segments the
        // log still references.
        let batches = reference
            .index
            .iter()
            .find(|(k, _)| *k == tp)
            .map_or(&[][..], |(_, v)| v.as_slice());
        for b in batches {
            if b.base_offset != expected {
                return Err(format!(
                    "partition {partition}: batch at {} after offset {expected}: offsets not contiguous",
                    b.base_offset
                ));
            }
            expected = b.end_offset();
            let object = reference
                .segments
                .get(b.segment as usize)
                .ok_or_else(|| format!("segment {} not listed", b.segment))?;
            if !present.contains(object) {
                return Err(format!(
                    "offset {} is in the log, but its object {object} was deleted",
                    b.base_offset
                ));
            }
            // An archive stands for the batches it was planned with.
            let held: Vec<Placed> = if retention::is_archive_key(object) {
                let planned = acks
                    .archived
                    .get(object)
                    .ok_or_else(|| format!("archive {object} was never written"))?;
                if planned.first().map(|p| p.0) != Some(b.base_offset) {
                    return Err(format!(
                        "archive {object} is in the log at {}, but was planned from {:?}",
                        b.base_offset,
                        planned.first()
                    ));
                }
                planned.clone()
            } else {
                vec![(b.base_offset, (object.clone(), b.pos))]
            };
            for (base_offset, (key, pos)) in &held {
                let (base_offset, key) = (*base_offset, key);
                let id = *acks
                    .placed
                    .get(&(key.clone(), *pos))
                    .ok_or_else(|| format!("{key}@{pos} was never sent"))?;
                if acks.failed_keys.contains(key) {
                    return Err(format!(
                    "{id:?} is in the log at {base_offset}, although its request ({key}) was answered with an error"
                ));
                }
                if !seen.insert(id) {
                    return Err(format!("{id:?} is in partition {partition} twice"));
                }
                if let Some(prev) = last_idx.insert((id.producer, partition), id.idx) {
                    if prev >= id.idx {
                        return Err(format!(
                        "{id:?} at {base_offset} follows the producer's batch {prev}: producer order broken"
                    ));
                    }
                }
                at_offset.insert((partition, base_offset), id);
            }
        }
    }
    for (id, offset) in &acks.offsets {
        match at_offset.get(&(id.partition, *offset)) {
            Some(found) if found == id => {}
            Some(other) => {
                return Err(format!(
                    "{id:?} acknowledged at {offset}, where {other:?} is"
                ))
            }
            None => {
                return Err(format!(
                    "{id:?} acknowledged at {offset}, which holds no batch"
                ))
            }
        }
    }
    // What each committer told its shards builds the same index.
    for (i, r) in recorders.iter().enumerate() {
        // Base offset -> records, per partition; an archive replaces the
        // batches over its range, as a shard's index does.
        let mut index: BTreeMap<u32, BTreeMap<u64, u32>> = BTreeMap::new();
        for u in r.updates.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let offsets = index.entry(u.tp.partition).or_default();
            for b in &u.batches {
                if let BatchOutcome::Appended { base_offset } = b.outcome {
                    if u.archived {
                        let end = base_offset + u64::from(b.records);
                        let covered: Vec<u64> =
                            offsets.range(base_offset..end).map(|(o, _)| *o).collect();
                        if covered.first() != Some(&base_offset) {
                            return Err(format!(
                                "committer {i} archived {base_offset}..{end} of partition {}, which starts no batch",
                                u.tp.partition
                            ));
                        }
                        for o in covered {
                            offsets.remove(&o);
                        }
                    }
                    offsets.insert(base_offset, b.records);
                }
            }
        }
        for partition in 0..s.partitions {
            let tp = PartitionKey {
                topic_id: topic(),
                partition,
            };
            let want: Vec<u64> = committers[0]
                .state()
                .batches(&tp)
                .iter()
                .map(|b| b.base_offset)
                .collect();
            let got: Vec<u64> = index
                .get(&partition)
                .map(|o| o.keys().copied().collect())
                .unwrap_or_default();
            if got != want {
                return Err(format!("committer {i} sent partition {partition} offsets {got:?}, the log has {want:?}"));
            }
        }
        let applied = *r.applied.lock().unwrap_or_else(|e| e.into_inner());
        if applied != committers[0].state().applied() {
            return Err(format!(
                "committer {i}'s shards learnt entry {applied}, the log is at {}",
                committers[0].state().applied()
            ));
        }
    }
    Ok(format!(
        "{} entries, {} batches acknowledged, {} failed requests, {} epoch bumps",
        committers[0].state().applied(),
        acks.offsets.len(),
        acks.failures,
        acks.epoch_bumps
    ))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `count` schedules from `first_seed` on a paused clock (retry
/// pauses cost no time); stops at the first failure with its seed.
fn run_many(name: &str, count: u64, make: impl Fn(u64) -> Schedule) {
    let first = env_u64("FLOE_SCHEDULE_SEED", 1);
    let count = env_u64("FLOE_SCHEDULES", count);
    let mut last = String::new();
    for seed in first..first + count {
        let s = make(seed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        match rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(3600), run_schedule(s)).await
        }) {
            Ok(Ok(summary)) => last = summary,
            Ok(Err(e)) => panic!(
                "{name}: schedule with seed {seed} failed: {e}\n  rerun: FLOE_SCHEDULE_SEED={seed} FLOE_SCHEDULES=1 cargo test -p floe-engine --test commit_log {name}"
            ),
            Err(_) => panic!("{name}: schedule with seed {seed} did not finish"),
        }
    }
    eprintln!(
        "{name}: {count} schedules from seed {first} passed ({} compacted archives taken in this process); the last: {last}",
        COMPACTIONS_TAKEN.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn concurrent_committers_give_contiguous_offsets() {
    run_many(
        "concurrent_committers_give_contiguous_offsets",
        2000,
        |seed| Schedule {
            partitions: 3,
            window: 1 + (seed % 4) as usize,
            ..Schedule::new(seed, MetaFaults::none())
        },
    );
}

#[test]
fn lost_replies_and_refused_requests_neither_lose_nor_duplicate() {
    run_many(
        "lost_replies_and_refused_requests_neither_lose_nor_duplicate",
        3000,
        |seed| Schedule {
            window: 1 + (seed % 3) as usize,
            odd_producer_ids: true,
            ..Schedule::new(
                seed,
                MetaFaults {
                    seed,
                    txn_reply_lost: 0.15,
                    txn_refused: 0.1,
                    read_failed: 0.1,
                    delay_max_ms: 20,
                    ..MetaFaults::none()
                },
            )
        },
    );
}

/// Outages longer than the commit deadline: an entry whose outcome is
/// unknown must be settled, never answered with an error while it may have
/// landed; and a retry must find its batch, not append it again.
#[test]
fn outages_past_the_commit_deadline_neither_lose_nor_duplicate() {
    run_many(
        "outages_past_the_commit_deadline_neither_lose_nor_duplicate",
        1000,
        |seed| Schedule {
            segments_per_producer: 6,
            window: 1 + (seed % 2) as usize,
            ..Schedule::new(
                seed,
                MetaFaults {
                    seed,
                    txn_reply_lost: 0.05,
                    outage_start: 0.02,
                    outage_requests: 80,
                    outage_txn_applied: 0.5,
                    ..MetaFaults::none()
                },
            )
        },
    );
}

/// Producers with several segments in flight, some of which fail while
/// later ones commit: the log must keep each producer's order.
#[test]
fn pipelined_producers_keep_their_order_through_failures() {
    run_many(
        "pipelined_producers_keep_their_order_through_failures",
        1500,
        |seed| Schedule {
            segments_per_producer: 10,
            partitions: 3,
            window: 4,
            ..Schedule::new(
                seed,
                MetaFaults {
                    seed,
                    read_failed: 0.05,
                    outage_start: 0.03,
                    outage_requests: 40,
                    outage_txn_applied: 0.5,
                    delay_max_ms: 5,
                    ..MetaFaults::none()
                },
            )
        },
    );
}

/// A committer cut off from the metadata store for longer than the orphan
/// grace, while the cleanup owner sweeps: an upload the sweep deleted must
/// never be committed afterwards.
#[test]
fn the_orphan_sweep_never_deletes_what_a_late_commit_references() {
    run_many(
        "the_orphan_sweep_never_deletes_what_a_late_commit_references",
        1000,
        |seed| Schedule {
            segments_per_producer: 6,
            window: 2,
            orphan_grace: Some(Duration::from_secs(30)),
            ..Schedule::new(
                seed,
                MetaFaults {
                    seed,
                    txn_refused: 0.05,
                    outage_start: 0.02,
                    outage_requests: 150,
                    outage_txn_applied: 0.0,
                    ..MetaFaults::none()
                },
            )
        },
    );
}

/// A committer cut off for long while the others write, snapshot and trim
/// the log behind them: when it returns, the entries it needs are gone.
/// It must load the snapshot in place and carry on, agreeing with the
/// others, and settle (or declare unknown) what it had in flight.
#[test]
fn a_committer_behind_the_trimmed_log_reloads_the_snapshot() {
    run_many(
        "a_committer_behind_the_trimmed_log_reloads_the_snapshot",
        1000,
        |seed| Schedule {
            segments_per_producer: 12,
            window: 2,
            log_window: Some((4, 6)),
            lagger: Some(MetaFaults {
                seed,
                outage_start: 0.05,
                outage_requests: 60,
                outage_txn_applied: 0.5,
                ..MetaFaults::none()
            }),
            ..Schedule::new(seed, MetaFaults::none())
        },
    );
}

/// Committers killed at random moments (between an upload and its commit,
/// or mid-transaction) and restarted from the snapshot and the log, next to
/// an orphan sweep: replies lost to a crash are unknown outcomes, which the
/// idempotent producers' retries settle; nothing acknowledged is lost or
/// doubled, and no committed object is swept.
#[test]
fn committers_that_crash_and_restart_lose_nothing() {
    run_many(
        "committers_that_crash_and_restart_lose_nothing",
        1000,
        |seed| Schedule {
            segments_per_producer: 8,
            window: 2,
            crashes: 1 + (seed % 3) as u32,
            log_window: Some((5, 8)),
            orphan_grace: Some(Duration::from_secs(30)),
            ..Schedule::new(
                seed,
                MetaFaults {
                    seed,
                    txn_reply_lost: 0.05,
                    delay_max_ms: 10,
                    ..MetaFaults::none()
                },
            )
        },
    );
}

/// An archiver racing the producers' commits, crashes of the committer it
/// commits through (between its upload and its commit, or with the reply
/// lost) and an orphan sweep: an archive lands only over exactly the
/// batches it was planned with, never twice, and no archive the log
/// references is swept.
#[test]
fn archives_race_commits_crashes_and_the_sweep() {
    run_many(
        "archives_race_commits_crashes_and_the_sweep",
        1000,
        |seed| Schedule {
            segments_per_producer: 10,
            window: 2,
            crashes: (seed % 3) as u32,
            log_window: Some((5, 8)),
            // Short, so the sweep judges archives within the schedule.
            orphan_grace: Some(Duration::from_secs(2)),
            archiver: true,
            ..Schedule::new(
                seed,
                MetaFaults {
                    seed,
                    txn_reply_lost: 0.05,
                    txn_refused: 0.02,
                    delay_max_ms: 10,
                    ..MetaFaults::none()
                },
            )
        },
    );
}

/// A commit made under a registration that has lapsed never lands: the
/// clients were told the broker left, and librdkafka fails the requests in
/// flight there as "not persisted".
#[tokio::test]
async fn a_commit_never_lands_once_its_registration_lapsed() {
    use floe_engine::cluster::Registration;
    use floe_meta::schema::BrokerRecord;
    let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().expect("store"));
    let store: Arc<dyn ObjectStore> = Arc::new(Memory::default());
    let record = BrokerRecord {
        node_id: 7,
        host: "h".into(),
        port: 1,
        zone: String::new(),
        group: String::new(),
        listeners: Vec::new(),
        ready: true,
    };
    let reg = Registration::register(meta.clone(), record, Duration::from_secs(30))
        .await
        .expect("registers");
    let committer =
        Committer::new(meta.clone(), store, Arc::new(Recorder::default())).with_fence(reg.fence());
    let (tx, rx) = flume::bounded(8);
    let running = tokio::spawn(committer.run(rx, Arc::new(tokio::sync::Notify::new())));
    let commit = |n: u32| {
        let tx = tx.clone();
        async move {
            let (reply, answer) = oneshot::channel();
            let segment = SegmentRecord {
                key: format!("segments/s{n}"),
                size: 100,
                chunks: vec![ChunkRecord {
                    topic_id: topic(),
                    partition: 0,
                    batches: vec![BatchRecord {
                        pos: 16,
                        len: 70,
                        records: 1,
                        max_ts: 0,
                        producer_id: -1,
                        producer_epoch: -1,
                        base_sequence: -1,
                        transactional: false,
                    }],
                }],
            };
            tx.send_async(CommitRequest::Segment {
                segment,
                sealed_at: tokio::time::Instant::now(),
                reply,
            })
            .await
            .expect("queued");
            answer.await.expect("answered")
        }
    };
    assert!(commit(1).await.is_ok(), "commits while registered");
    // The lease lapses: the registration key is gone.
    let key = reg.fence().key().to_string();
    meta.txn(floe_meta::Txn::default().and_then(vec![floe_meta::Op::Delete(key)]))
        .await
        .expect("deleted");
    match commit(2).await {
        Err(floe_engine::Error::CommitAbandoned { .. }) => {}
        other => panic!("a commit under a lapsed registration answered {other:?}"),
    }
    drop(tx);
    let c = running.await.expect("committer");
    assert_eq!(
        c.state().applied(),
        1,
        "only the first commit is in the log"
    );
}

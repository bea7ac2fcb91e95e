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
//! - what the committers sent to their shards builds the same index.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floe_engine::committer::{CommitRequest, Committer, IndexSink, IndexUpdate, SegmentCommitted};
use floe_engine::sequencer::BatchOutcome;
use floe_engine::PartitionKey;
use floe_meta::faulty::Rng;
use floe_meta::schema::{BatchRecord, ChunkRecord, SegmentRecord};
use floe_meta::{Embedded, FaultyMeta, MetaFaults, MetaStore};
use floe_objstore::{Memory, ObjectStore};
use futures::channel::oneshot;

/// What one committer told its shards.
#[derive(Default)]
struct Recorder {
    updates: Mutex<Vec<IndexUpdate>>,
    applied: Mutex<u64>,
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
}

#[derive(Debug, Clone, Copy)]
struct Schedule {
    seed: u64,
    committers: usize,
    producers_per_committer: usize,
    segments_per_producer: usize,
    partitions: u32,
    faults: MetaFaults,
}

/// One batch a producer sent: who, where, which sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BatchId {
    producer: i64,
    partition: u32,
    sequence: i32,
}

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
}

const RECORDS_PER_BATCH_MAX: u64 = 4;
/// Attempts per segment before the schedule is declared stuck.
const ATTEMPTS_MAX: usize = 200;

fn topic() -> uuid::Uuid {
    uuid::Uuid::from_u128(0xf10e)
}

/// One producer: commits `segments` segments through `committer`, each
/// with batches for random partitions. An idempotent producer (even ids)
/// retries a failed segment with the same batches (same sequences) in a
/// new segment object, as a shard does when the producer retries; a plain
/// one (odd ids) never retries, so each of its batches is sent once and
/// any copy in the log is the committer's doing.
async fn produce(
    producer: i64,
    s: Schedule,
    committer: flume::Sender<CommitRequest>,
    acks: Arc<Mutex<Acks>>,
) -> Result<(), String> {
    let mut rng = Rng(s.seed ^ (producer as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut next_seq: BTreeMap<u32, i32> = BTreeMap::new();
    let idempotent = producer % 2 == 0;
    for n in 0..s.segments_per_producer {
        // Batches of this segment, by partition.
        let mut chunks: BTreeMap<u32, Vec<(BatchId, u32)>> = BTreeMap::new();
        for _ in 0..1 + rng.below(4) {
            let partition = rng.below(u64::from(s.partitions)) as u32;
            let records = 1 + rng.below(RECORDS_PER_BATCH_MAX) as u32;
            let seq = next_seq.entry(partition).or_insert(0);
            chunks.entry(partition).or_default().push((
                BatchId {
                    producer,
                    partition,
                    sequence: *seq,
                },
                records,
            ));
            *seq += records as i32;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > ATTEMPTS_MAX {
                return Err(format!(
                    "producer {producer} segment {n}: no commit in {ATTEMPTS_MAX} attempts"
                ));
            }
            let key = format!("segments/p{producer}-n{n}-a{attempt}");
            let mut pos = 16;
            let mut record = SegmentRecord {
                key: key.clone(),
                size: 0,
                chunks: Vec::new(),
            };
            {
                let mut a = acks.lock().unwrap_or_else(|e| e.into_inner());
                for (partition, batches) in &chunks {
                    let mut chunk = ChunkRecord {
                        topic_id: topic(),
                        partition: *partition,
                        batches: Vec::new(),
                    };
                    for (id, records) in batches {
                        let len = 61 + 10 * records;
                        chunk.batches.push(BatchRecord {
                            pos,
                            len,
                            records: *records,
                            max_ts: 1_000 + n as i64,
                            producer_id: if idempotent { producer } else { -1 },
                            producer_epoch: if idempotent { 0 } else { -1 },
                            base_sequence: if idempotent { id.sequence } else { -1 },
                        });
                        a.placed.insert((key.clone(), pos), *id);
                        pos += u64::from(len);
                    }
                    record.chunks.push(chunk);
                }
            }
            record.size = pos;
            let (tx, rx) = oneshot::channel();
            committer
                .send_async(CommitRequest::Segment {
                    segment: record,
                    reply: tx,
                })
                .await
                .map_err(|_| "committer gone".to_string())?;
            let reply = rx.await.map_err(|_| "reply dropped".to_string())?;
            let SegmentCommitted { outcomes, .. } = match reply {
                Ok(c) => c,
                Err(_) => {
                    let mut a = acks.lock().unwrap_or_else(|e| e.into_inner());
                    a.failures += 1;
                    a.failed_keys.insert(key);
                    if idempotent {
                        continue;
                    }
                    break;
                }
            };
            let mut a = acks.lock().unwrap_or_else(|e| e.into_inner());
            for ((_, batches), chunk_out) in chunks.iter().zip(&outcomes) {
                for ((id, _), o) in batches.iter().zip(chunk_out) {
                    let offset = match o {
                        BatchOutcome::Appended { base_offset }
                        | BatchOutcome::Duplicate { base_offset } => *base_offset,
                        other => {
                            return Err(format!("{id:?} answered {other:?} on attempt {attempt}"))
                        }
                    };
                    if let Some(prev) = a.offsets.insert(*id, offset) {
                        return Err(format!("{id:?} acknowledged twice: at {prev} and {offset}"));
                    }
                }
            }
            break;
        }
    }
    Ok(())
}

async fn catch_up(c: &mut Committer) -> Result<(), String> {
    for _ in 0..ATTEMPTS_MAX {
        if c.catch_up().await.is_ok() {
            return Ok(());
        }
    }
    Err("a committer could not catch up".into())
}

async fn run_schedule(s: Schedule) -> Result<String, String> {
    let base: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().map_err(|e| e.to_string())?);
    let store: Arc<dyn ObjectStore> = Arc::new(Memory::default());
    let acks = Arc::new(Mutex::new(Acks::default()));
    let mut running = Vec::new();
    let mut producers = Vec::new();
    let mut recorders = Vec::new();
    for c in 0..s.committers {
        let meta = Arc::new(FaultyMeta::new(
            base.clone(),
            MetaFaults {
                seed: s.seed.wrapping_mul(31).wrapping_add(c as u64),
                ..s.faults
            },
        ));
        let recorder = Arc::new(Recorder::default());
        recorders.push(recorder.clone());
        let committer = Committer::new(meta, store.clone(), recorder);
        let (tx, rx) = flume::bounded(64);
        let poke = Arc::new(tokio::sync::Notify::new());
        running.push(tokio::spawn(committer.run(rx, poke)));
        for p in 0..s.producers_per_committer {
            let id = 1000 + (c * s.producers_per_committer + p) as i64;
            producers.push(tokio::spawn(produce(id, s, tx.clone(), acks.clone())));
        }
    }
    for p in producers {
        p.await.map_err(|e| e.to_string())??;
    }
    let mut committers = Vec::new();
    for r in running {
        let mut c = r.await.map_err(|e| e.to_string())?;
        catch_up(&mut c).await?;
        committers.push(c);
    }
    let acks = acks.lock().unwrap_or_else(|e| e.into_inner());
    check(&committers, &recorders, &acks, s)
}

fn check(
    committers: &[Committer],
    recorders: &[Arc<Recorder>],
    acks: &Acks,
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
    let mut last_seq: HashMap<(i64, u32), i32> = HashMap::new();
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
            let key = reference
                .segments
                .get(b.segment as usize)
                .ok_or_else(|| format!("segment {} not listed", b.segment))?;
            let id = *acks
                .placed
                .get(&(key.clone(), b.pos))
                .ok_or_else(|| format!("{key}@{} was never sent", b.pos))?;
            if acks.failed_keys.contains(key) {
                return Err(format!(
                    "{id:?} is in the log at {}, although its request ({key}) was answered with an error",
                    b.base_offset
                ));
            }
            if !seen.insert(id) {
                return Err(format!("{id:?} is in partition {partition} twice"));
            }
            if let Some(prev) = last_seq.insert((id.producer, partition), id.sequence) {
                if prev >= id.sequence {
                    return Err(format!(
                        "{id:?} follows sequence {prev}: producer order broken"
                    ));
                }
            }
            at_offset.insert((partition, b.base_offset), id);
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
        let mut index: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for u in r.updates.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let offsets = index.entry(u.tp.partition).or_default();
            for b in &u.batches {
                if let BatchOutcome::Appended { base_offset } = b.outcome {
                    offsets.push(base_offset);
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
            let got = index.get(&partition).cloned().unwrap_or_default();
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
        "{} entries, {} batches acknowledged, {} failed requests retried",
        committers[0].state().applied(),
        acks.offsets.len(),
        acks.failures
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
    eprintln!("{name}: {count} schedules from seed {first} passed; the last: {last}");
}

#[test]
fn concurrent_committers_give_contiguous_offsets() {
    run_many(
        "concurrent_committers_give_contiguous_offsets",
        200,
        |seed| Schedule {
            seed,
            committers: 3,
            producers_per_committer: 2,
            segments_per_producer: 8,
            partitions: 3,
            faults: MetaFaults::none(),
        },
    );
}

#[test]
fn lost_replies_and_refused_requests_neither_lose_nor_duplicate() {
    run_many(
        "lost_replies_and_refused_requests_neither_lose_nor_duplicate",
        300,
        |seed| Schedule {
            seed,
            committers: 3,
            producers_per_committer: 2,
            segments_per_producer: 8,
            partitions: 2,
            faults: MetaFaults {
                seed,
                txn_reply_lost: 0.15,
                txn_refused: 0.1,
                read_failed: 0.1,
                ..MetaFaults::none()
            },
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
        100,
        |seed| Schedule {
            seed,
            committers: 3,
            producers_per_committer: 2,
            segments_per_producer: 6,
            partitions: 2,
            faults: MetaFaults {
                seed,
                txn_reply_lost: 0.05,
                outage_start: 0.02,
                outage_requests: 80,
                ..MetaFaults::none()
            },
        },
    );
}

//! The commit log as a pure state machine: [`LogState`] applies log
//! entries in order and says what follows from each — the outcome of every
//! batch, the index updates for the shards, the segments it releases — with
//! no I/O, no runtime and the clock passed in. The driver around it
//! ([`super::Committer`]) reads and writes the metadata store; everything
//! it decides comes from here, so the same log gives the same state on
//! every broker, and tests can apply logs without a store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use floe_meta::schema::{CommitRecord, TrimRecord};

use super::snapshot::{IndexedBatch, Snapshot};
use super::{CommittedBatch, IndexUpdate, SegmentOutcomes};
use crate::retention::{RetentionPlanner, RetentionPolicy, SegmentRefs, StoredBatch};
use crate::sequencer::{BatchOutcome, Sequencer};
use crate::PartitionKey;

/// What applying one log entry decided.
#[derive(Debug)]
pub struct Applied {
    /// The entry's sequence number.
    pub seq: u64,
    /// One outcome per segment, chunk and batch of the entry.
    pub outcomes: Vec<SegmentOutcomes>,
    /// For the shards that own the partitions, in the order to apply them.
    pub updates: Vec<IndexUpdate>,
}

/// Everything derived from the log up to [`LogState::applied`]: offsets
/// and producer state (the [`Sequencer`]), every readable batch by
/// partition (what a snapshot holds), and which segments are still
/// referenced. Owned by one committer; never shared.
#[derive(Debug, Default)]
pub struct LogState {
    sequencer: Sequencer,
    /// Every readable batch by partition, in offset order.
    index: BTreeMap<PartitionKey, Vec<IndexedBatch>>,
    /// Segment keys by number (numbers are this state's own, for a compact
    /// index).
    segments: Vec<Arc<str>>,
    segment_ids: HashMap<Arc<str>, u32>,
    refs: SegmentRefs,
}

impl LogState {
    /// The sequence number of the last applied entry (0: none).
    pub fn applied(&self) -> u64 {
        self.sequencer.applied()
    }

    pub fn log_start(&self, tp: &PartitionKey) -> u64 {
        self.sequencer.log_start(tp)
    }

    pub fn high_watermark(&self, tp: &PartitionKey) -> u64 {
        self.sequencer.high_watermark(tp)
    }

    /// Producer ids the log remembers (they expire; see the sequencer).
    pub fn producers_known(&self) -> usize {
        self.sequencer.producers_known()
    }

    /// Which segments the log references or released.
    pub fn refs(&self) -> &SegmentRefs {
        &self.refs
    }

    pub fn refs_mut(&mut self) -> &mut SegmentRefs {
        &mut self.refs
    }

    /// The readable batches of `tp`, in offset order.
    pub fn batches(&self, tp: &PartitionKey) -> &[IndexedBatch] {
        self.index.get(tp).map_or(&[], Vec::as_slice)
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

    /// Applies entry `seq`, which must directly follow the last applied
    /// one; `now` stamps the segments its trims release.
    pub fn apply(&mut self, seq: u64, commit: &CommitRecord, now: SystemTime) -> Applied {
        let outcomes = self.sequencer.apply(seq, commit);
        let mut updates = Vec::new();
        for (seg, seg_out) in commit.segments.iter().zip(&outcomes) {
            let key: Arc<str> = Arc::from(seg.key.as_str());
            let seg_id = self.segment_id(&key);
            for (chunk, chunk_out) in seg.chunks.iter().zip(seg_out) {
                let tp = PartitionKey {
                    topic_id: chunk.topic_id,
                    partition: chunk.partition,
                };
                let entries = self.index.entry(tp).or_default();
                let mut held = 0;
                for (b, o) in chunk.batches.iter().zip(chunk_out) {
                    if let BatchOutcome::Appended { base_offset } = o {
                        debug_assert!(
                            entries.last().is_none_or(
                                |e| e.base_offset + u64::from(e.records) == *base_offset
                            ),
                            "offsets of {tp:?} are not contiguous"
                        );
                        entries.push(IndexedBatch {
                            base_offset: *base_offset,
                            records: b.records,
                            max_ts: b.max_ts,
                            segment: seg_id,
                            pos: b.pos,
                            len: b.len,
                        });
                        held += 1;
                    }
                }
                self.refs.hold(&key, held);
                updates.push(IndexUpdate {
                    seq,
                    tp,
                    log_start: self.sequencer.log_start(&tp),
                    segment: key.clone(),
                    batches: chunk
                        .batches
                        .iter()
                        .zip(chunk_out)
                        .map(|(b, o)| CommittedBatch {
                            pos: b.pos,
                            len: b.len,
                            records: b.records,
                            max_ts: b.max_ts,
                            outcome: *o,
                        })
                        .collect(),
                });
            }
        }
        self.apply_trims(seq, &commit.trims, now, &mut updates);
        Applied {
            seq,
            outcomes,
            updates,
        }
    }

    /// After the sequencer applied entry `seq`'s trims: drops the batches
    /// before each new log start, releases their segments and tells the
    /// owning shards.
    fn apply_trims(
        &mut self,
        seq: u64,
        trims: &[TrimRecord],
        now: SystemTime,
        updates: &mut Vec<IndexUpdate>,
    ) {
        for t in trims {
            let tp = PartitionKey {
                topic_id: t.topic_id,
                partition: t.partition,
            };
            let log_start = self.sequencer.log_start(&tp);
            if let Some(entries) = self.index.get_mut(&tp) {
                let gone = entries.partition_point(|e| e.end_offset() <= log_start);
                let mut by_segment: BTreeMap<u32, u64> = BTreeMap::new();
                for e in entries.drain(..gone) {
                    *by_segment.entry(e.segment).or_default() += 1;
                }
                for (seg, n) in by_segment {
                    if let Some(key) = self.segments.get(seg as usize) {
                        self.refs.release(key, n, seq, now);
                    }
                }
            }
            updates.push(IndexUpdate {
                seq,
                tp,
                segment: Arc::from(""),
                batches: Vec::new(),
                log_start,
            });
        }
    }

    /// The state after entry `seq` (the last applied) as a snapshot.
    /// Only segments still referenced, or released and perhaps not yet
    /// deleted, are listed (renumbered): the list does not grow with every
    /// segment ever written.
    pub fn snapshot(&self) -> Snapshot {
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
                    .map(|e| IndexedBatch {
                        segment: renumber.get(&e.segment).copied().unwrap_or(e.segment),
                        ..*e
                    })
                    .collect();
                (*k, entries)
            })
            .collect();
        Snapshot {
            seq: self.applied(),
            sequencer: self.sequencer.state(),
            segments,
            index,
        }
    }

    /// The state a snapshot describes, and the index updates that give the
    /// shards the same view. Segments the snapshot lists but no batch
    /// references were released before it was written: their grace starts
    /// again at `now`, since nobody can know whether they are deleted yet.
    pub fn load(snap: Snapshot, now: SystemTime) -> (Self, Vec<IndexUpdate>) {
        let mut state = LogState {
            sequencer: Sequencer::from_state(snap.sequencer),
            ..LogState::default()
        };
        state.segments = snap
            .segments
            .iter()
            .map(|s| Arc::from(s.as_str()))
            .collect();
        state.segment_ids = state
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let mut updates = Vec::new();
        let mut held = vec![0u64; state.segments.len()];
        for (tp, entries) in &snap.index {
            let log_start = state.sequencer.log_start(tp);
            // A trimmed partition's first batch may start after 0: the
            // shard's index starts there, then moves to the log start.
            let first = entries.first().map_or(log_start, |e| e.base_offset);
            if first > 0 {
                updates.push(IndexUpdate {
                    seq: snap.seq,
                    tp: *tp,
                    segment: Arc::from(""),
                    batches: Vec::new(),
                    log_start: first,
                });
            }
            // One update per run of batches in the same segment.
            for run in entries.chunk_by(|a, b| a.segment == b.segment) {
                let seg = run[0].segment;
                let Some(key) = state.segments.get(seg as usize) else {
                    tracing::error!(
                        segment = seg,
                        ?tp,
                        "snapshot names a segment it does not list; skipping its batches"
                    );
                    continue;
                };
                if let Some(h) = held.get_mut(seg as usize) {
                    *h += run.len() as u64;
                }
                updates.push(IndexUpdate {
                    seq: snap.seq,
                    tp: *tp,
                    segment: key.clone(),
                    batches: run
                        .iter()
                        .map(|e| CommittedBatch {
                            pos: e.pos,
                            len: e.len,
                            records: e.records,
                            max_ts: e.max_ts,
                            outcome: BatchOutcome::Appended {
                                base_offset: e.base_offset,
                            },
                        })
                        .collect(),
                    log_start,
                });
            }
        }
        for (seg, n) in state.segments.iter().zip(held) {
            state.refs.hold(seg, n.max(1));
            if n == 0 {
                state.refs.release(seg, 1, snap.seq, now);
            }
        }
        state.index = snap.index.into_iter().collect();
        (state, updates)
    }

    /// The trims retention asks for at `now_ms`, at most `trims_max`.
    /// A partition of a topic missing from `policies` (deleted) is trimmed
    /// to its end.
    pub fn plan_retention(
        &self,
        policies: &HashMap<uuid::Uuid, RetentionPolicy>,
        now_ms: i64,
        trims_max: usize,
    ) -> Vec<TrimRecord> {
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
                Some(p) => planner.plan(*p, start, entries.len(), |i| StoredBatch {
                    base_offset: entries[i].base_offset,
                    records: entries[i].records,
                    max_ts: entries[i].max_ts,
                    len: entries[i].len,
                }),
            };
            if let Some(to) = to {
                trims.push(TrimRecord {
                    topic_id: tp.topic_id,
                    partition: tp.partition,
                    log_start: to,
                });
                if trims.len() == trims_max {
                    break;
                }
            }
        }
        trims
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_meta::schema::{BatchRecord, ChunkRecord, SegmentRecord};

    fn tp(p: u32) -> PartitionKey {
        PartitionKey {
            topic_id: uuid::Uuid::from_u128(3),
            partition: p,
        }
    }

    /// A seeded stream of entries: segments of plain and idempotent
    /// batches over four partitions, and now and then a trim.
    fn entries(seed: u64, n: usize) -> Vec<CommitRecord> {
        let mut rng = floe_meta::faulty::Rng(seed);
        let mut rnd = move |m: u64| rng.below(m);
        let mut seqs = [0i32; 4];
        (0..n)
            .map(|i| {
                let mut chunks = Vec::new();
                for p in 0..4u32 {
                    if rnd(2) == 0 {
                        continue;
                    }
                    let records = 1 + rnd(3) as u32;
                    let idempotent = p % 2 == 0;
                    let seq = seqs[p as usize];
                    // Now and then an idempotent batch is sent again.
                    let resend = idempotent && seq > 0 && rnd(5) == 0;
                    let (base_sequence, records) = if resend {
                        (seq - 2, 2)
                    } else {
                        seqs[p as usize] += records as i32;
                        (seq, records)
                    };
                    chunks.push(ChunkRecord {
                        topic_id: tp(p).topic_id,
                        partition: p,
                        batches: vec![BatchRecord {
                            pos: 16 + u64::from(p) * 100,
                            len: 100,
                            records,
                            max_ts: i as i64,
                            producer_id: if idempotent { 7 } else { -1 },
                            producer_epoch: if idempotent { 0 } else { -1 },
                            base_sequence: if idempotent { base_sequence } else { -1 },
                        }],
                    });
                }
                let trims = if rnd(6) == 0 {
                    vec![TrimRecord {
                        topic_id: tp(1).topic_id,
                        partition: rnd(4) as u32,
                        log_start: rnd(40),
                    }]
                } else {
                    Vec::new()
                };
                CommitRecord {
                    segments: vec![SegmentRecord {
                        key: format!("segments/{i:05}"),
                        size: 500,
                        chunks,
                    }],
                    epochs: Vec::new(),
                    trims,
                    at_ms: 0,
                    producer_expiration_ms: 0,
                }
            })
            .collect()
    }

    #[test]
    fn a_loaded_snapshot_continues_exactly_like_the_state_it_came_from() {
        let now = SystemTime::UNIX_EPOCH;
        for seed in 1..200 {
            let log = entries(seed, 60);
            let cut = 1 + (seed as usize * 7) % 58;
            let mut a = LogState::default();
            for (i, e) in log[..cut].iter().enumerate() {
                a.apply(i as u64 + 1, e, now);
            }
            let snap = a.snapshot();
            let bytes = snap.encode().expect("encodes");
            let (mut b, _) = LogState::load(Snapshot::decode("s", &bytes).expect("decodes"), now);
            assert_eq!(
                b.snapshot(),
                snap,
                "seed {seed}: load gives back the snapshot"
            );
            // Not a skipped test: the entries after the cut go to both
            // states; those before it reached `b` through the snapshot.
            for (i, e) in log.iter().enumerate().skip(cut) {
                let seq = i as u64 + 1;
                let (x, y) = (a.apply(seq, e, now), b.apply(seq, e, now));
                assert_eq!(x.outcomes, y.outcomes, "seed {seed}: entry {seq}");
            }
            assert_eq!(
                a.snapshot(),
                b.snapshot(),
                "seed {seed}: same state at the end"
            );
            for p in 0..4 {
                let batches = a.batches(&tp(p));
                for w in batches.windows(2) {
                    assert_eq!(
                        w[0].end_offset(),
                        w[1].base_offset,
                        "seed {seed}: contiguous"
                    );
                }
                if let Some(last) = batches.last() {
                    assert_eq!(last.end_offset(), a.high_watermark(&tp(p)), "seed {seed}");
                }
            }
        }
    }

    #[test]
    fn load_tells_the_shards_every_batch_and_log_start() {
        let now = SystemTime::UNIX_EPOCH;
        let log = entries(42, 40);
        let mut a = LogState::default();
        for (i, e) in log.iter().enumerate() {
            a.apply(i as u64 + 1, e, now);
        }
        let (_, updates) = LogState::load(a.snapshot(), now);
        let mut loaded: BTreeMap<PartitionKey, Vec<u64>> = BTreeMap::new();
        for u in updates {
            loaded
                .entry(u.tp)
                .or_default()
                .extend(u.batches.iter().filter_map(|b| match b.outcome {
                    BatchOutcome::Appended { base_offset } => Some(base_offset),
                    _ => None,
                }));
        }
        for p in 0..4 {
            let want: Vec<u64> = a.batches(&tp(p)).iter().map(|e| e.base_offset).collect();
            assert_eq!(loaded.get(&tp(p)).cloned().unwrap_or_default(), want);
        }
    }
}

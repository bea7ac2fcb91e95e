//! The sequencer: turns the cluster's commit log into offsets.
//!
//! Every broker replays the same log in the same order through a
//! `Sequencer`, so every broker derives the same offsets without a partition
//! leader. It also enforces idempotent-producer rules (duplicates answered
//! with their original offsets, sequence gaps and stale epochs refused)
//! deterministically, so a retry is recognised whichever broker it reaches.
//! Plain state, no I/O.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use floe_meta::schema::{BatchRecord, CommitRecord, MarkerRecord};

use crate::PartitionKey;

/// How many recent batches per producer and partition are remembered for
/// duplicate detection (Kafka keeps 5, matching max.in.flight of 5).
pub const PRODUCER_BATCHES_MAX: usize = 5;
/// A producer id silent this long (by the log's time) is forgotten, as
/// Kafka's `producer.id.expiration.ms` (default one day) does. Every broker
/// must expire the same producers at the same entry, or their offsets
/// would diverge, so the value in force is the one the last entry carried
/// (its writer's setting), this default when none did. A forgotten
/// producer's next batch must start a new epoch at sequence 0 (clients
/// bump the epoch on the out-of-order answer).
pub const PRODUCER_ID_EXPIRATION_MS: u64 = 24 * 3600 * 1000;
/// Expired producers are swept from memory each time the log's time
/// crosses a multiple of this (a deterministic schedule); between sweeps
/// an expired producer is treated as expired all the same.
const PRODUCER_SWEEP_EVERY_MS: u64 = 60 * 1000;

/// What the log decided for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Appended at `base_offset`.
    Appended { base_offset: u64 },
    /// A retry of a batch already appended at `base_offset`.
    Duplicate { base_offset: u64 },
    /// The batch's sequence does not follow the producer's last one.
    OutOfOrder,
    /// The batch's producer epoch is older than the producer's current one.
    Fenced,
    /// Not appended, and retriable: refused as out of order only because an
    /// earlier batch of its producer failed on this broker moments ago. The
    /// sequencer never decides this; a shard turns `OutOfOrder` into it
    /// (see `gaps`).
    NotPersisted,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ProducerPartition {
    epoch: i16,
    /// (first sequence, last sequence, base offset) of recent batches.
    recent: VecDeque<(i32, i32, u64)>,
}

/// Offsets and producer state for every partition, derived from the log.
#[derive(Debug, Default)]
pub struct Sequencer {
    next_offset: HashMap<PartitionKey, u64>,
    epochs: HashMap<i64, i16>,
    producers: HashMap<(i64, PartitionKey), ProducerPartition>,
    /// Log start offsets above 0 (retention, DeleteRecords).
    log_start: HashMap<PartitionKey, u64>,
    applied: u64,
    /// The log's time: the largest `at_ms` applied.
    log_time: u64,
    /// The log's time when each producer id was last seen.
    last_seen: HashMap<i64, u64>,
    /// The expiration in force (the last entry's, 0: the default).
    expiration_ms: u64,
    /// Per partition, the first offset of each producer's open
    /// transaction: the last stable offset is the least of them.
    open_txns: HashMap<PartitionKey, BTreeMap<i64, u64>>,
    /// Per partition, aborted transactions whose marker is at or above the
    /// log start, oldest first.
    aborted: HashMap<PartitionKey, VecDeque<AbortedTxn>>,
    /// Where the last entry's markers went: per marker, per partition, the
    /// marker's offset (None: no transaction of that producer was open
    /// there).
    last_markers: Vec<Vec<Option<u64>>>,
}

/// A transaction open in one partition: its producer, the producer's
/// current epoch, and the transaction's first offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTxn {
    pub tp: PartitionKey,
    pub producer_id: i64,
    pub epoch: i16,
    pub first_offset: u64,
}

/// One producer's state in one partition, as DescribeProducers shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerSummary {
    pub producer_id: i64,
    pub epoch: i16,
    pub last_sequence: i32,
    /// By the log's time (the entry that last carried it).
    pub last_seen_ms: i64,
    /// The first offset of its open transaction here, or -1.
    pub txn_first_offset: i64,
}

/// An aborted transaction in one partition: its producer, its first
/// offset and its marker's offset (Kafka's AbortedTransaction, with the
/// marker's offset as the last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: u64,
    pub marker_offset: u64,
}

fn next_seq(seq: i32, records: u32) -> i32 {
    // Sequences wrap at i32::MAX, as in Kafka.
    ((i64::from(seq) + i64::from(records)) % (i64::from(i32::MAX) + 1)) as i32
}

/// A sequencer's whole state, for snapshots (maps as lists: JSON map keys
/// must be strings).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SequencerState {
    applied: u64,
    next_offset: Vec<(PartitionKey, u64)>,
    epochs: Vec<(i64, i16)>,
    producers: Vec<(i64, PartitionKey, ProducerPartition)>,
    /// Absent from snapshots written before retention existed.
    #[serde(default)]
    log_start: Vec<(PartitionKey, u64)>,
    /// Absent from snapshots written before producers expired.
    #[serde(default)]
    log_time: u64,
    #[serde(default)]
    last_seen: Vec<(i64, u64)>,
    #[serde(default)]
    expiration_ms: u64,
    /// Absent from snapshots written before transactions existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    open_txns: Vec<(PartitionKey, i64, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    aborted: Vec<(PartitionKey, AbortedTxn)>,
}

impl Sequencer {
    /// The state, sorted so that equal sequencers give equal snapshots.
    pub fn state(&self) -> SequencerState {
        let mut next_offset: Vec<_> = self.next_offset.iter().map(|(k, v)| (*k, *v)).collect();
        next_offset.sort_unstable();
        let mut epochs: Vec<_> = self.epochs.iter().map(|(k, v)| (*k, *v)).collect();
        epochs.sort_unstable();
        let mut producers: Vec<_> = self
            .producers
            .iter()
            .map(|((id, tp), st)| (*id, *tp, st.clone()))
            .collect();
        producers.sort_unstable_by_key(|(id, tp, _)| (*id, *tp));
        let mut log_start: Vec<_> = self.log_start.iter().map(|(k, v)| (*k, *v)).collect();
        log_start.sort_unstable();
        let mut last_seen: Vec<_> = self.last_seen.iter().map(|(k, v)| (*k, *v)).collect();
        last_seen.sort_unstable();
        let mut open_txns: Vec<_> = self
            .open_txns
            .iter()
            .flat_map(|(tp, open)| open.iter().map(|(pid, first)| (*tp, *pid, *first)))
            .collect();
        open_txns.sort_unstable();
        let mut aborted: Vec<_> = self
            .aborted
            .iter()
            .flat_map(|(tp, list)| list.iter().map(|a| (*tp, *a)))
            .collect();
        // Stable: each partition's list stays oldest first.
        aborted.sort_by_key(|(tp, _)| *tp);
        SequencerState {
            applied: self.applied,
            next_offset,
            epochs,
            producers,
            log_start,
            log_time: self.log_time,
            last_seen,
            expiration_ms: self.expiration_ms,
            open_txns,
            aborted,
        }
    }

    pub fn from_state(st: SequencerState) -> Self {
        Self {
            applied: st.applied,
            next_offset: st.next_offset.into_iter().collect(),
            epochs: st.epochs.into_iter().collect(),
            producers: st
                .producers
                .into_iter()
                .map(|(id, tp, p)| ((id, tp), p))
                .collect(),
            log_start: st.log_start.into_iter().collect(),
            log_time: st.log_time,
            last_seen: st.last_seen.into_iter().collect(),
            expiration_ms: st.expiration_ms,
            open_txns: st
                .open_txns
                .into_iter()
                .fold(HashMap::new(), |mut m, (tp, pid, first)| {
                    m.entry(tp).or_insert_with(BTreeMap::new).insert(pid, first);
                    m
                }),
            aborted: st
                .aborted
                .into_iter()
                .fold(HashMap::new(), |mut m, (tp, a)| {
                    m.entry(tp).or_insert_with(VecDeque::new).push_back(a);
                    m
                }),
            last_markers: Vec::new(),
        }
    }

    /// Producer ids remembered (for tests and metrics).
    pub fn producers_known(&self) -> usize {
        self.epochs.len()
    }

    fn expiration(&self) -> u64 {
        if self.expiration_ms == 0 {
            PRODUCER_ID_EXPIRATION_MS
        } else {
            self.expiration_ms
        }
    }

    /// Whether `producer_id` has been silent past the expiration.
    fn expired(&self, producer_id: i64) -> bool {
        let exp = self.expiration();
        self.last_seen
            .get(&producer_id)
            .is_some_and(|&t| t.saturating_add(exp) < self.log_time)
    }

    /// Forgets `producer_id` entirely.
    fn forget(&mut self, producer_id: i64) {
        self.epochs.remove(&producer_id);
        self.last_seen.remove(&producer_id);
        self.producers.retain(|(id, _), _| *id != producer_id);
    }

    /// Advances the log's time to `at_ms` (never backwards); sweeps the
    /// expired producers when it crosses a sweep boundary.
    fn advance_time(&mut self, at_ms: u64) {
        if at_ms <= self.log_time {
            return;
        }
        let crossed = at_ms / PRODUCER_SWEEP_EVERY_MS != self.log_time / PRODUCER_SWEEP_EVERY_MS;
        self.log_time = at_ms;
        if crossed {
            let exp = self.expiration();
            let expired: std::collections::HashSet<i64> = self
                .last_seen
                .iter()
                .filter(|(_, &t)| t.saturating_add(exp) < at_ms)
                .map(|(id, _)| *id)
                .collect();
            if !expired.is_empty() {
                self.epochs.retain(|id, _| !expired.contains(id));
                self.last_seen.retain(|id, _| !expired.contains(id));
                self.producers.retain(|(id, _), _| !expired.contains(id));
            }
        }
    }

    /// Notes that `producer_id` is active now, forgetting what it had if it
    /// had expired.
    fn seen(&mut self, producer_id: i64) {
        if self.expired(producer_id) {
            self.forget(producer_id);
        }
        self.last_seen.insert(producer_id, self.log_time);
    }

    pub fn partitions_known(&self) -> usize {
        self.next_offset.len()
    }

    /// Whether the log ever put a batch in `tp` (and has not forgotten it).
    pub fn knows(&self, tp: &PartitionKey) -> bool {
        self.next_offset.contains_key(tp)
    }

    /// The sequence number of the last applied commit.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn high_watermark(&self, tp: &PartitionKey) -> u64 {
        self.next_offset.get(tp).copied().unwrap_or(0)
    }

    /// The last stable offset of `tp`: the first offset of its oldest open
    /// transaction, else the high watermark. `read_committed` consumers
    /// read below it.
    pub fn last_stable_offset(&self, tp: &PartitionKey) -> u64 {
        self.first_open(tp)
            .unwrap_or_else(|| self.high_watermark(tp))
    }

    /// The first offset of `tp`'s oldest open transaction, if any.
    pub fn first_open(&self, tp: &PartitionKey) -> Option<u64> {
        self.open_txns
            .get(tp)
            .and_then(|open| open.values().min().copied())
    }

    /// Every open transaction, by partition and producer.
    pub fn all_open_transactions(&self) -> Vec<OpenTxn> {
        let mut out: Vec<_> = self
            .open_txns
            .iter()
            .flat_map(|(tp, open)| {
                open.iter().map(move |(pid, first)| OpenTxn {
                    tp: *tp,
                    producer_id: *pid,
                    epoch: self.epochs.get(pid).copied().unwrap_or(0),
                    first_offset: *first,
                })
            })
            .collect();
        out.sort_unstable_by_key(|o| (o.tp, o.producer_id));
        out
    }

    /// The producers with a transaction open in `tp`, and where each
    /// began.
    pub fn open_transactions(&self, tp: &PartitionKey) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.open_txns
            .get(tp)
            .into_iter()
            .flatten()
            .map(|(pid, first)| (*pid, *first))
    }

    /// The aborted transactions of `tp` still within its log, oldest first.
    pub fn aborted(&self, tp: &PartitionKey) -> impl Iterator<Item = &AbortedTxn> + '_ {
        self.aborted.get(tp).into_iter().flatten()
    }

    /// Where the last applied entry's markers went: per marker, per
    /// partition named, the control batch's offset, or None where that
    /// producer had no transaction open.
    pub fn last_markers(&self) -> &[Vec<Option<u64>>] {
        &self.last_markers
    }

    /// The producers the log remembers in `tp` (DescribeProducers), by
    /// producer id.
    pub fn producers_of(&self, tp: &PartitionKey) -> Vec<ProducerSummary> {
        let open: HashMap<i64, u64> = self.open_transactions(tp).collect();
        let mut out: Vec<ProducerSummary> = self
            .producers
            .iter()
            .filter(|((_, p), _)| p == tp)
            .map(|((pid, _), st)| ProducerSummary {
                producer_id: *pid,
                epoch: self.epochs.get(pid).copied().unwrap_or(st.epoch),
                last_sequence: st.recent.back().map_or(-1, |r| r.1),
                last_seen_ms: self.last_seen.get(pid).map_or(-1, |t| *t as i64),
                txn_first_offset: open.get(pid).map(|o| *o as i64).unwrap_or(-1),
            })
            .collect();
        out.sort_unstable_by_key(|p| p.producer_id);
        out
    }

    /// The first offset still readable in `tp`.
    pub fn log_start(&self, tp: &PartitionKey) -> u64 {
        self.log_start.get(tp).copied().unwrap_or(0)
    }

    /// Every partition with a log start above 0.
    pub fn log_starts(&self) -> impl Iterator<Item = (PartitionKey, u64)> + '_ {
        self.log_start.iter().map(|(k, v)| (*k, *v))
    }

    /// Applies commit `seq` (which must directly follow the last applied
    /// one) and returns an outcome per segment, chunk and batch.
    pub fn apply(&mut self, seq: u64, commit: &CommitRecord) -> Vec<Vec<Vec<BatchOutcome>>> {
        assert_eq!(seq, self.applied + 1, "commit log replayed out of order");
        self.applied = seq;
        if commit.producer_expiration_ms > 0 {
            self.expiration_ms = commit.producer_expiration_ms;
        }
        self.advance_time(commit.at_ms);
        for e in &commit.epochs {
            self.seen(e.producer_id);
            let cur = self.epochs.entry(e.producer_id).or_insert(e.epoch);
            *cur = (*cur).max(e.epoch);
        }
        let outcomes = commit
            .segments
            .iter()
            .map(|s| {
                s.chunks
                    .iter()
                    .map(|c| {
                        let tp = PartitionKey {
                            topic_id: c.topic_id,
                            partition: c.partition,
                        };
                        c.batches.iter().map(|b| self.apply_batch(tp, b)).collect()
                    })
                    .collect()
            })
            .collect();
        self.last_markers = commit
            .markers
            .iter()
            .map(|m| {
                m.partitions
                    .iter()
                    .map(|&(topic_id, partition)| {
                        self.apply_marker(
                            PartitionKey {
                                topic_id,
                                partition,
                            },
                            m,
                        )
                    })
                    .collect()
            })
            .collect();
        let mut forgotten = HashSet::new();
        for t in &commit.trims {
            let tp = PartitionKey {
                topic_id: t.topic_id,
                partition: t.partition,
            };
            // Forward only, and never past what exists: a trim decided on
            // an older view stays valid whatever landed since.
            let hwm = self.high_watermark(&tp);
            let to = t.log_start.min(hwm);
            if to > self.log_start(&tp) {
                self.log_start.insert(tp, to);
                if let Some(list) = self.aborted.get_mut(&tp) {
                    while list.front().is_some_and(|a| a.marker_offset < to) {
                        list.pop_front();
                    }
                    if list.is_empty() {
                        self.aborted.remove(&tp);
                    }
                }
            }
            // A deleted topic's partition with nothing left readable is
            // forgotten; should a late segment still write to it, it
            // starts again from offset 0.
            if t.forget && self.log_start(&tp) == hwm {
                self.next_offset.remove(&tp);
                self.log_start.remove(&tp);
                self.open_txns.remove(&tp);
                self.aborted.remove(&tp);
                forgotten.insert(tp);
            }
        }
        if !forgotten.is_empty() {
            // One pass over the producer state for the whole entry, which
            // may forget thousands of partitions of a deleted topic.
            self.producers.retain(|(_, tp), _| !forgotten.contains(tp));
        }
        outcomes
    }

    fn apply_batch(&mut self, tp: PartitionKey, b: &BatchRecord) -> BatchOutcome {
        if b.producer_id >= 0 {
            self.seen(b.producer_id);
            let current = self.epochs.entry(b.producer_id).or_insert(b.producer_epoch);
            if b.producer_epoch < *current {
                return BatchOutcome::Fenced;
            }
            *current = b.producer_epoch;
            let last = b.base_sequence.wrapping_add(b.records as i32 - 1);
            let state = self.producers.entry((b.producer_id, tp)).or_default();
            if state.epoch == b.producer_epoch && !state.recent.is_empty() {
                if let Some(&(_, _, base)) = state
                    .recent
                    .iter()
                    .find(|(first, l, _)| *first == b.base_sequence && *l == last)
                {
                    return BatchOutcome::Duplicate { base_offset: base };
                }
                if let Some(&(_, prev_last, _)) = state.recent.back() {
                    if b.base_sequence != next_seq(prev_last, 1) {
                        return BatchOutcome::OutOfOrder;
                    }
                }
            } else {
                // A producer's first batch on a partition, and its first
                // in a new epoch, must start at sequence 0, as in Kafka:
                // accepting any other lets a later batch land before an
                // earlier one that failed and will be retried.
                if b.base_sequence != 0 {
                    return BatchOutcome::OutOfOrder;
                }
                state.epoch = b.producer_epoch;
                state.recent.clear();
            }
            let base = self.next_offset.get(&tp).copied().unwrap_or(0);
            if state.recent.len() == PRODUCER_BATCHES_MAX {
                state.recent.pop_front();
            }
            state.recent.push_back((b.base_sequence, last, base));
        }
        let next = self.next_offset.entry(tp).or_insert(0);
        let base = *next;
        *next += u64::from(b.records);
        if b.transactional && b.producer_id >= 0 {
            self.open_txns
                .entry(tp)
                .or_default()
                .entry(b.producer_id)
                .or_insert(base);
        }
        BatchOutcome::Appended { base_offset: base }
    }

    /// Ends `m`'s producer's open transaction in `tp` with a control batch
    /// (one offset); nothing when none is open there (a marker written
    /// twice, or for a partition the producer never wrote to). The epoch
    /// the marker carries becomes the producer's, so an instance fenced by
    /// it can append nothing more.
    fn apply_marker(&mut self, tp: PartitionKey, m: &MarkerRecord) -> Option<u64> {
        // The marker's epoch is the producer's from here on, in every
        // partition: a batch of a fenced instance still on its way lands
        // nowhere, even where its transaction had written nothing yet.
        if self.epochs.get(&m.producer_id).is_none_or(|e| *e < m.epoch) {
            self.seen(m.producer_id);
            self.epochs.insert(m.producer_id, m.epoch);
        }
        let open = self.open_txns.get_mut(&tp)?;
        let first = open.remove(&m.producer_id)?;
        if open.is_empty() {
            self.open_txns.remove(&tp);
        }
        self.seen(m.producer_id);
        let next = self.next_offset.entry(tp).or_insert(0);
        let offset = *next;
        *next += 1;
        if !m.commit {
            self.aborted.entry(tp).or_default().push_back(AbortedTxn {
                producer_id: m.producer_id,
                first_offset: first,
                marker_offset: offset,
            });
        }
        Some(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_meta::schema::{ChunkRecord, ProducerEpoch, SegmentRecord};
    use uuid::Uuid;

    fn tp(p: u32) -> PartitionKey {
        PartitionKey {
            topic_id: Uuid::from_u128(1),
            partition: p,
        }
    }

    fn commit(batches: Vec<(u32, BatchRecord)>) -> CommitRecord {
        CommitRecord {
            epochs: vec![],
            archives: Vec::new(),
            trims: vec![],
            at_ms: 0,
            producer_expiration_ms: 0,
            segments: vec![SegmentRecord {
                key: "s".into(),
                size: 0,
                chunks: batches
                    .into_iter()
                    .map(|(p, b)| ChunkRecord {
                        topic_id: tp(p).topic_id,
                        partition: p,
                        batches: vec![b],
                    })
                    .collect(),
            }],
            markers: Vec::new(),
        }
    }

    fn br(records: u32, pid: i64, epoch: i16, seq: i32) -> BatchRecord {
        BatchRecord {
            pos: 0,
            len: 0,
            records,
            max_ts: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            transactional: false,
        }
    }

    fn outcome(s: &mut Sequencer, p: u32, b: BatchRecord) -> BatchOutcome {
        let seq = s.applied() + 1;
        s.apply(seq, &commit(vec![(p, b)]))[0][0][0]
    }

    fn txn(records: u32, pid: i64, epoch: i16, seq: i32) -> BatchRecord {
        BatchRecord {
            transactional: true,
            ..br(records, pid, epoch, seq)
        }
    }

    /// Applies one entry holding only markers; where each went.
    fn end(
        s: &mut Sequencer,
        pid: i64,
        epoch: i16,
        commit: bool,
        parts: &[u32],
    ) -> Vec<Option<u64>> {
        let seq = s.applied() + 1;
        let entry = CommitRecord {
            markers: vec![MarkerRecord {
                producer_id: pid,
                epoch,
                commit,
                partitions: parts.iter().map(|&p| (tp(p).topic_id, p)).collect(),
            }],
            ..CommitRecord::default()
        };
        s.apply(seq, &entry);
        s.last_markers()[0].clone()
    }

    #[test]
    fn transactions_hold_the_last_stable_offset_until_their_marker() {
        let mut s = Sequencer::default();
        outcome(&mut s, 0, br(2, -1, 0, -1));
        assert_eq!(
            outcome(&mut s, 0, txn(3, 5, 0, 0)),
            BatchOutcome::Appended { base_offset: 2 }
        );
        outcome(&mut s, 0, br(1, -1, 0, -1));
        outcome(&mut s, 1, txn(1, 5, 0, 0));
        assert_eq!(
            (s.last_stable_offset(&tp(0)), s.high_watermark(&tp(0))),
            (2, 6)
        );
        assert_eq!(s.last_stable_offset(&tp(1)), 0);
        // One entry ends it in both partitions, and not in one it never
        // wrote to.
        assert_eq!(
            end(&mut s, 5, 0, true, &[0, 1, 2]),
            vec![Some(6), Some(1), None]
        );
        assert_eq!(s.last_stable_offset(&tp(0)), 7);
        assert_eq!(s.high_watermark(&tp(0)), 7);
        assert_eq!(s.high_watermark(&tp(2)), 0);
        assert_eq!(s.aborted(&tp(0)).count(), 0);
        // Written twice (a broker died before recording it): nothing more.
        assert_eq!(end(&mut s, 5, 0, true, &[0, 1]), vec![None, None]);
        assert_eq!(s.high_watermark(&tp(0)), 7);
        // The next transaction continues the producer's sequence.
        assert_eq!(
            outcome(&mut s, 0, txn(1, 5, 0, 3)),
            BatchOutcome::Appended { base_offset: 7 }
        );
        assert_eq!(s.last_stable_offset(&tp(0)), 7);
    }

    #[test]
    fn an_abort_is_indexed_and_its_epoch_fences_the_old_producer() {
        let mut s = Sequencer::default();
        outcome(&mut s, 0, txn(2, 5, 0, 0));
        outcome(&mut s, 0, txn(2, 6, 0, 0));
        assert_eq!(s.last_stable_offset(&tp(0)), 0);
        // The coordinator aborts 5's transaction under a bumped epoch.
        assert_eq!(end(&mut s, 5, 1, false, &[0]), vec![Some(4)]);
        assert_eq!(s.last_stable_offset(&tp(0)), 2, "6's is still open");
        let aborted: Vec<AbortedTxn> = s.aborted(&tp(0)).copied().collect();
        assert_eq!(
            aborted,
            vec![AbortedTxn {
                producer_id: 5,
                first_offset: 0,
                marker_offset: 4
            }]
        );
        assert_eq!(outcome(&mut s, 0, txn(1, 5, 0, 2)), BatchOutcome::Fenced);
        assert_eq!(
            outcome(&mut s, 0, txn(1, 5, 1, 0)),
            BatchOutcome::Appended { base_offset: 5 }
        );
        // A snapshot carries open transactions and the abort index.
        let copy = Sequencer::from_state(s.state());
        assert_eq!(copy.state(), s.state());
        assert_eq!(copy.last_stable_offset(&tp(0)), 2);
        assert_eq!(copy.aborted(&tp(0)).count(), 1);
        // Retention past the marker drops the abort from the index.
        let seq = s.applied() + 1;
        s.apply(
            seq,
            &CommitRecord {
                trims: vec![floe_meta::schema::TrimRecord {
                    topic_id: tp(0).topic_id,
                    partition: 0,
                    log_start: 5,
                    forget: false,
                }],
                ..CommitRecord::default()
            },
        );
        assert_eq!(s.aborted(&tp(0)).count(), 0);
        assert_eq!(s.last_stable_offset(&tp(0)), 2);
    }

    #[test]
    fn offsets_are_contiguous_per_partition() {
        let mut s = Sequencer::default();
        assert_eq!(
            outcome(&mut s, 0, br(3, -1, 0, -1)),
            BatchOutcome::Appended { base_offset: 0 }
        );
        assert_eq!(
            outcome(&mut s, 1, br(2, -1, 0, -1)),
            BatchOutcome::Appended { base_offset: 0 }
        );
        assert_eq!(
            outcome(&mut s, 0, br(5, -1, 0, -1)),
            BatchOutcome::Appended { base_offset: 3 }
        );
        assert_eq!(s.high_watermark(&tp(0)), 8);
        assert_eq!(s.high_watermark(&tp(1)), 2);
    }

    #[test]
    fn idempotent_duplicates_gaps_and_fencing() {
        let mut s = Sequencer::default();
        assert_eq!(
            outcome(&mut s, 0, br(2, 9, 0, 0)),
            BatchOutcome::Appended { base_offset: 0 }
        );
        assert_eq!(
            outcome(&mut s, 0, br(3, 9, 0, 2)),
            BatchOutcome::Appended { base_offset: 2 }
        );
        // A retry of either recent batch gets its original offsets.
        assert_eq!(
            outcome(&mut s, 0, br(2, 9, 0, 0)),
            BatchOutcome::Duplicate { base_offset: 0 }
        );
        assert_eq!(
            outcome(&mut s, 0, br(3, 9, 0, 2)),
            BatchOutcome::Duplicate { base_offset: 2 }
        );
        // A gap is refused and consumes no offsets.
        assert_eq!(outcome(&mut s, 0, br(1, 9, 0, 7)), BatchOutcome::OutOfOrder);
        assert_eq!(s.high_watermark(&tp(0)), 5);
        // A bumped epoch restarts at sequence 0 and fences the old epoch.
        let seq = s.applied() + 1;
        let mut c = commit(vec![(0, br(1, 9, 1, 0))]);
        c.epochs.push(ProducerEpoch {
            producer_id: 9,
            epoch: 1,
        });
        assert_eq!(
            s.apply(seq, &c)[0][0][0],
            BatchOutcome::Appended { base_offset: 5 }
        );
        assert_eq!(outcome(&mut s, 0, br(1, 9, 0, 5)), BatchOutcome::Fenced);
    }

    #[test]
    fn a_first_batch_must_start_at_sequence_zero() {
        let mut s = Sequencer::default();
        // New on this partition: only sequence 0 is accepted.
        assert_eq!(outcome(&mut s, 0, br(2, 4, 0, 5)), BatchOutcome::OutOfOrder);
        assert_eq!(s.high_watermark(&tp(0)), 0);
        assert_eq!(
            outcome(&mut s, 0, br(5, 4, 0, 0)),
            BatchOutcome::Appended { base_offset: 0 }
        );
        assert_eq!(
            outcome(&mut s, 0, br(2, 4, 0, 5)),
            BatchOutcome::Appended { base_offset: 5 }
        );
        // A new epoch starts again at 0, on every partition.
        assert_eq!(outcome(&mut s, 0, br(1, 4, 1, 7)), BatchOutcome::OutOfOrder);
        assert_eq!(
            outcome(&mut s, 0, br(1, 4, 1, 0)),
            BatchOutcome::Appended { base_offset: 7 }
        );
        assert_eq!(outcome(&mut s, 1, br(1, 4, 1, 3)), BatchOutcome::OutOfOrder);
    }

    #[test]
    fn silent_producers_expire_by_the_log_time() {
        let mut s = Sequencer::default();
        let at = |s: &mut Sequencer, ms: u64, p: u32, b: BatchRecord| {
            let seq = s.applied() + 1;
            let mut c = commit(vec![(p, b)]);
            c.at_ms = ms;
            s.apply(seq, &c)[0][0][0]
        };
        let t0 = 1_000_000_000;
        assert!(matches!(
            at(&mut s, t0, 0, br(2, 7, 0, 0)),
            BatchOutcome::Appended { .. }
        ));
        assert!(matches!(
            at(&mut s, t0, 0, br(2, 8, 0, 0)),
            BatchOutcome::Appended { .. }
        ));
        // Producer 8 stays active; producer 7 falls silent.
        let late = t0 + PRODUCER_ID_EXPIRATION_MS - 1;
        assert!(matches!(
            at(&mut s, late, 0, br(1, 8, 0, 2)),
            BatchOutcome::Appended { .. }
        ));
        // Just before the expiration, 7's retry is still a duplicate.
        assert_eq!(
            at(&mut s, late, 0, br(2, 7, 0, 0)),
            BatchOutcome::Duplicate { base_offset: 0 }
        );
        // Past it (the retry above counted as activity), 7 is forgotten:
        // its next sequence is refused, a new epoch at 0 is accepted.
        let after = late + PRODUCER_ID_EXPIRATION_MS + 1;
        assert_eq!(
            at(&mut s, after, 0, br(1, 7, 0, 2)),
            BatchOutcome::OutOfOrder
        );
        assert!(matches!(
            at(&mut s, after, 0, br(1, 7, 1, 0)),
            BatchOutcome::Appended { .. }
        ));
        // The sweep freed 8 (silent since `late`).
        assert_eq!(s.producers_known(), 1);
        // And the state round-trips with the log time.
        let back = Sequencer::from_state(s.state());
        assert_eq!(back.state(), s.state());
    }

    #[test]
    fn remembers_only_recent_batches() {
        let mut s = Sequencer::default();
        for i in 0..(PRODUCER_BATCHES_MAX as i32 + 1) {
            outcome(&mut s, 0, br(1, 3, 0, i));
        }
        // The oldest batch fell out of the window: its retry is out of order.
        assert_eq!(outcome(&mut s, 0, br(1, 3, 0, 0)), BatchOutcome::OutOfOrder);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = Sequencer::default();
        outcome(&mut s, 0, br(2, 9, 0, 0));
        outcome(&mut s, 1, br(1, -1, 0, -1));
        let json = serde_json::to_vec(&s.state()).expect("encode");
        let mut back = Sequencer::from_state(serde_json::from_slice(&json).expect("decode"));
        assert_eq!(back.state(), s.state());
        // Producer state survives: a retry is still a duplicate.
        assert_eq!(
            outcome(&mut back, 0, br(2, 9, 0, 0)),
            BatchOutcome::Duplicate { base_offset: 0 }
        );
    }

    /// Applies an entry that only trims partition 0 to `to`; returns the
    /// new log start.
    fn trim0(s: &mut Sequencer, to: u64, forget: bool) -> u64 {
        let seq = s.applied() + 1;
        let mut c = commit(vec![]);
        c.segments.clear();
        c.trims.push(floe_meta::schema::TrimRecord {
            topic_id: tp(0).topic_id,
            partition: 0,
            log_start: to,
            forget,
        });
        s.apply(seq, &c);
        s.log_start(&tp(0))
    }

    #[test]
    fn trims_move_the_log_start_forward_only_and_not_past_the_end() {
        let mut s = Sequencer::default();
        outcome(&mut s, 0, br(10, -1, 0, -1));
        let trim = |s: &mut Sequencer, to: u64| trim0(s, to, false);
        assert_eq!(trim(&mut s, 4), 4);
        assert_eq!(trim(&mut s, 2), 4, "never backwards");
        assert_eq!(trim(&mut s, 99), 10, "never past the high watermark");
        assert_eq!(s.high_watermark(&tp(0)), 10);
        // New batches continue after the trimmed ones.
        assert_eq!(
            outcome(&mut s, 0, br(1, -1, 0, -1)),
            BatchOutcome::Appended { base_offset: 10 }
        );
        let back = Sequencer::from_state(s.state());
        assert_eq!(back.log_start(&tp(0)), 10);
        assert_eq!(back.state(), s.state());
        // Snapshots from before retention (no log_start) still load.
        let mut json: serde_json::Value = serde_json::to_value(s.state()).expect("encode");
        json.as_object_mut().expect("object").remove("log_start");
        let old: SequencerState = serde_json::from_value(json).expect("decode");
        assert_eq!(Sequencer::from_state(old).log_start(&tp(0)), 0);
    }

    #[test]
    fn a_forgetting_trim_drops_the_partition_only_once_nothing_is_left() {
        let mut s = Sequencer::default();
        outcome(&mut s, 0, br(3, 9, 0, 0));
        outcome(&mut s, 1, br(2, 9, 0, 0));
        let forget = |s: &mut Sequencer, to: u64| trim0(s, to, true);
        // Planned on an older view: records remain, so it only trims.
        forget(&mut s, 2);
        assert!(s.knows(&tp(0)));
        assert_eq!(s.log_start(&tp(0)), 2);
        forget(&mut s, 3);
        assert!(!s.knows(&tp(0)), "everything trimmed: forgotten");
        assert_eq!((s.log_start(&tp(0)), s.high_watermark(&tp(0))), (0, 0));
        assert!(s.knows(&tp(1)), "other partitions stay");
        let st = s.state();
        assert!(st.producers.iter().all(|(_, p, _)| *p != tp(0)));
        assert_eq!(st.producers.len(), 1, "producer 9 on partition 1 stays");
        assert_eq!(
            outcome(&mut s, 1, br(2, 9, 0, 0)),
            BatchOutcome::Duplicate { base_offset: 0 }
        );
        // A late batch starts the partition again from 0.
        assert_eq!(
            outcome(&mut s, 0, br(1, -1, 0, -1)),
            BatchOutcome::Appended { base_offset: 0 }
        );
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn replay_must_be_in_order() {
        let mut s = Sequencer::default();
        s.apply(2, &commit(vec![]));
    }
}

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

use floe_meta::schema::{ArchiveRecord, CommitRecord, TrimRecord};

use super::snapshot::{IndexedBatch, Snapshot};
use super::{CommittedBatch, IndexUpdate, SegmentOutcomes};
use crate::batch::marker_key;
use crate::retention::{
    is_archive_key, RetentionPlanner, RetentionPolicy, SegmentRefs, StoredBatch,
};
use crate::sequencer::{AbortedTxn, BatchOutcome, Sequencer};
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
    /// Whether each of the entry's archives took effect.
    pub archived: Vec<bool>,
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
    /// The table is renumbered when it reaches this many keys, dropping
    /// segments deleted since (0: [`SEGMENT_TABLE_MIN`]).
    compact_at: usize,
    refs: SegmentRefs,
}

/// The segment table is not renumbered below this many keys.
const SEGMENT_TABLE_MIN: usize = 4096;

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

    /// Every open transaction, by partition and producer.
    pub fn all_open_transactions(&self) -> Vec<crate::sequencer::OpenTxn> {
        self.sequencer.all_open_transactions()
    }

    pub fn producers_of(&self, tp: &PartitionKey) -> Vec<crate::sequencer::ProducerSummary> {
        self.sequencer.producers_of(tp)
    }

    pub fn last_stable_offset(&self, tp: &PartitionKey) -> u64 {
        self.sequencer.last_stable_offset(tp)
    }

    /// The aborted transactions of `tp` still within its log.
    pub fn aborted(&self, tp: &PartitionKey) -> impl Iterator<Item = &AbortedTxn> + '_ {
        self.sequencer.aborted(tp)
    }

    /// The producers with a transaction open in `tp`, and where each
    /// began.
    pub fn open_transactions(&self, tp: &PartitionKey) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.sequencer.open_transactions(tp)
    }

    /// Producer ids the log remembers (they expire; see the sequencer).
    pub fn producers_known(&self) -> usize {
        self.sequencer.producers_known()
    }

    /// Partitions the log knows (deleted topics' are forgotten).
    pub fn partitions_known(&self) -> usize {
        self.sequencer.partitions_known()
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

    /// Keys in the segment table (live ones and, until the next
    /// renumbering, some already deleted).
    pub fn segment_table_len(&self) -> usize {
        self.segments.len()
    }

    fn segment_id(&mut self, key: &Arc<str>) -> u32 {
        if let Some(id) = self.segment_ids.get(key) {
            return *id;
        }
        if self.segments.len() >= self.compact_at.max(SEGMENT_TABLE_MIN) {
            self.compact_segments();
        }
        let id = self.segments.len() as u32;
        self.segments.push(key.clone());
        self.segment_ids.insert(key.clone(), id);
        id
    }

    /// The segments worth numbering — referenced by a batch, or released
    /// and perhaps not yet deleted — as (old number → new number, keys).
    fn live_segments(&self) -> (Vec<u32>, Vec<Arc<str>>) {
        let mut keep: Vec<bool> = self
            .segments
            .iter()
            .map(|k| self.refs.is_known(k))
            .collect();
        for e in self.index.values().flatten() {
            if let Some(k) = keep.get_mut(e.segment as usize) {
                *k = true;
            }
        }
        let mut renumber = vec![u32::MAX; self.segments.len()];
        let mut live = Vec::new();
        for (id, key) in self.segments.iter().enumerate() {
            if keep[id] {
                renumber[id] = live.len() as u32;
                live.push(key.clone());
            }
        }
        (renumber, live)
    }

    /// Renumbers the segment table without the segments deleted since the
    /// last time, so it grows with the live segments, not with every
    /// segment ever committed. Amortized: the next renumbering waits until
    /// the table has doubled.
    fn compact_segments(&mut self) {
        let (renumber, live) = self.live_segments();
        for e in self.index.values_mut().flatten() {
            e.segment = renumber[e.segment as usize];
        }
        self.segment_ids = live
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i as u32))
            .collect();
        self.compact_at = (2 * live.len()).max(SEGMENT_TABLE_MIN);
        self.segments = live;
    }

    /// Applies entry `seq`, which must directly follow the last applied
    /// one; `now` stamps the segments its trims release.
    pub fn apply(&mut self, seq: u64, commit: &CommitRecord, now: SystemTime) -> Applied {
        let before = self.partition_states(commit);
        let outcomes = self.sequencer.apply(seq, commit);
        let mut updates = Vec::new();
        // Per partition, the first transactional batch the entry appends.
        let mut txn_first: HashMap<PartitionKey, u64> = HashMap::new();
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
                        if b.transactional {
                            txn_first.entry(tp).or_insert(*base_offset);
                        }
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
                    open_from: self.sequencer.first_open(&tp),
                    aborted: Vec::new(),
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
                    forget: false,
                    archived: false,
                });
            }
        }
        self.apply_markers(seq, commit, &mut updates);
        let archived = commit
            .archives
            .iter()
            .map(|a| self.apply_archive(seq, a, now, &mut updates))
            .collect();
        self.apply_trims(seq, &commit.trims, now, &mut updates);
        settle_updates(&mut updates, &before, &txn_first);
        Applied {
            seq,
            outcomes,
            updates,
            archived,
        }
    }

    /// The log start and first open transaction of every partition
    /// `commit` touches, before it is applied.
    fn partition_states(&self, commit: &CommitRecord) -> HashMap<PartitionKey, (u64, Option<u64>)> {
        let chunks = commit
            .segments
            .iter()
            .flat_map(|s| s.chunks.iter().map(|c| (c.topic_id, c.partition)));
        let markers = commit
            .markers
            .iter()
            .flat_map(|m| m.partitions.iter().copied());
        let archives = commit.archives.iter().map(|a| (a.topic_id, a.partition));
        let trims = commit.trims.iter().map(|t| (t.topic_id, t.partition));
        chunks
            .chain(markers)
            .chain(archives)
            .chain(trims)
            .map(|(topic_id, partition)| {
                let tp = PartitionKey {
                    topic_id,
                    partition,
                };
                let st = (
                    self.sequencer.log_start(&tp),
                    self.sequencer.first_open(&tp),
                );
                (tp, st)
            })
            .collect()
    }

    /// Indexes the control batches the sequencer placed for the entry's
    /// markers. A marker has no object: its index entry names a marker
    /// key, and readers build its bytes from it (`batch::marker_bytes`).
    fn apply_markers(&mut self, seq: u64, commit: &CommitRecord, updates: &mut Vec<IndexUpdate>) {
        let placed = self.sequencer.last_markers().to_vec();
        let max_ts = i64::try_from(commit.at_ms).unwrap_or(i64::MAX);
        let len = crate::batch::CONTROL_BATCH_BYTES as u32;
        for (m, offsets) in commit.markers.iter().zip(placed) {
            let key: Arc<str> =
                Arc::from(marker_key(m.producer_id, m.epoch, m.commit, seq).as_str());
            for (&(topic_id, partition), offset) in m.partitions.iter().zip(offsets) {
                let Some(offset) = offset else { continue };
                let tp = PartitionKey {
                    topic_id,
                    partition,
                };
                let segment = self.segment_id(&key);
                self.index.entry(tp).or_default().push(IndexedBatch {
                    base_offset: offset,
                    records: 1,
                    max_ts,
                    segment,
                    pos: 0,
                    len,
                });
                let aborted = self
                    .sequencer
                    .aborted(&tp)
                    .last()
                    .filter(|a| !m.commit && a.marker_offset == offset)
                    .copied()
                    .into_iter()
                    .collect();
                updates.push(IndexUpdate {
                    seq,
                    tp,
                    open_from: self.sequencer.first_open(&tp),
                    aborted,
                    log_start: self.sequencer.log_start(&tp),
                    segment: key.clone(),
                    batches: vec![CommittedBatch {
                        pos: 0,
                        len,
                        records: 1,
                        max_ts,
                        outcome: BatchOutcome::Appended {
                            base_offset: offset,
                        },
                    }],
                    forget: false,
                    archived: false,
                });
            }
        }
    }

    /// Where the batches of `entries` not yet archived begin: archives are
    /// always a prefix of a partition's index.
    fn first_unarchived(&self, entries: &[IndexedBatch]) -> usize {
        entries.partition_point(|e| {
            self.segments
                .get(e.segment as usize)
                .is_some_and(|k| is_archive_key(k))
        })
    }

    /// The batches of `tp` not yet in an archive object, oldest first,
    /// with their segment keys: what an archiver rewrites next.
    pub fn unarchived(
        &self,
        tp: &PartitionKey,
    ) -> impl Iterator<Item = (&IndexedBatch, &Arc<str>)> {
        let entries = self.batches(tp);
        self.with_keys(&entries[self.first_unarchived(entries)..])
    }

    /// Every readable entry of `tp` in offset order (archive objects, then
    /// intake batches) with the key of the object that holds it.
    pub fn layout(&self, tp: &PartitionKey) -> impl Iterator<Item = (&IndexedBatch, &Arc<str>)> {
        self.with_keys(self.batches(tp))
    }

    fn with_keys<'a>(
        &'a self,
        entries: &'a [IndexedBatch],
    ) -> impl Iterator<Item = (&'a IndexedBatch, &'a Arc<str>)> {
        entries
            .iter()
            .filter_map(|e| Some((e, self.segments.get(e.segment as usize)?)))
    }

    /// Every partition with an index, in key order.
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionKey> {
        self.index.keys()
    }

    /// Replaces the first batches of a partition not yet archived by the
    /// archive `a`, if they are exactly the ones it holds (see
    /// [`ArchiveRecord`]); whether it did. Their segments lose those
    /// references (and are released when nothing else holds them).
    fn apply_archive(
        &mut self,
        seq: u64,
        a: &ArchiveRecord,
        now: SystemTime,
        updates: &mut Vec<IndexUpdate>,
    ) -> bool {
        let tp = PartitionKey {
            topic_id: a.topic_id,
            partition: a.partition,
        };
        // Its span and size fit an index entry's fields.
        let (Ok(records), Ok(_)) = (
            u32::try_from(a.end_offset.saturating_sub(a.base_offset)),
            u32::try_from(a.size),
        ) else {
            return false;
        };
        if records == 0 || !is_archive_key(&a.key) || self.refs.is_known(&a.key) {
            return false;
        }
        let Some(entries) = self.index.get(&tp) else {
            return false;
        };
        if !a.replaces.is_empty() {
            return self.apply_compacted(seq, tp, a, now, updates);
        }
        let from = self.first_unarchived(entries);
        let rest = &entries[from..];
        if rest.first().map(|e| e.base_offset) != Some(a.base_offset) {
            return false;
        }
        let to = rest.partition_point(|e| e.end_offset() < a.end_offset);
        if rest.get(to).map(IndexedBatch::end_offset) != Some(a.end_offset) {
            return false;
        }
        self.install(seq, tp, a, from..from + to + 1, now, updates);
        true
    }

    /// Puts archive `a` in place of the entries `range` of `tp` (checked by
    /// the caller), holds it, releases what those entries referenced, and
    /// tells the owning shard.
    fn install(
        &mut self,
        seq: u64,
        tp: PartitionKey,
        a: &ArchiveRecord,
        range: std::ops::Range<usize>,
        now: SystemTime,
        updates: &mut Vec<IndexUpdate>,
    ) {
        let key: Arc<str> = Arc::from(a.key.as_str());
        let id = self.segment_id(&key);
        let Some(entries) = self.index.get_mut(&tp) else {
            return;
        };
        let from = range.start;
        let replaced: Vec<IndexedBatch> = entries.drain(range).collect();
        // The newest timestamp of what it replaces (a compacted archive
        // holds no newer record, and retention by time keeps it no longer).
        let max_ts = replaced.iter().map(|e| e.max_ts).max().unwrap_or(-1);
        // Both fit: checked by `apply_archive`.
        let records = a.end_offset.saturating_sub(a.base_offset) as u32;
        let len = a.size as u32;
        entries.insert(
            from,
            IndexedBatch {
                base_offset: a.base_offset,
                records,
                max_ts,
                segment: id,
                pos: 0,
                len,
            },
        );
        let mut by_segment: BTreeMap<u32, u64> = BTreeMap::new();
        for e in &replaced {
            *by_segment.entry(e.segment).or_default() += 1;
        }
        self.refs.hold(&key, 1);
        for (seg, n) in by_segment {
            if let Some(k) = self.segments.get(seg as usize) {
                self.refs.release(k, n, seq, now);
            }
        }
        updates.push(IndexUpdate {
            seq,
            tp,
            open_from: self.sequencer.first_open(&tp),
            aborted: Vec::new(),
            log_start: self.sequencer.log_start(&tp),
            segment: key,
            batches: vec![CommittedBatch {
                pos: 0,
                len,
                records,
                max_ts,
                outcome: BatchOutcome::Appended {
                    base_offset: a.base_offset,
                },
            }],
            forget: false,
            archived: true,
        });
    }

    /// Puts the compacted archive `a` in place of the run of archives it
    /// names, if they are still the partition's and span exactly its
    /// offsets; whether it did. They are released.
    fn apply_compacted(
        &mut self,
        seq: u64,
        tp: PartitionKey,
        a: &ArchiveRecord,
        now: SystemTime,
        updates: &mut Vec<IndexUpdate>,
    ) -> bool {
        let Some(entries) = self.index.get(&tp) else {
            return false;
        };
        let archived = &entries[..self.first_unarchived(entries)];
        let key_of = |e: &IndexedBatch| self.segments.get(e.segment as usize);
        let Some(from) = archived
            .iter()
            .position(|e| key_of(e).is_some_and(|k| **k == *a.replaces[0]))
        else {
            return false;
        };
        let to = from + a.replaces.len();
        let Some(run) = archived.get(from..to) else {
            return false;
        };
        let matches = run
            .iter()
            .zip(&a.replaces)
            .all(|(e, k)| key_of(e).is_some_and(|have| **have == **k))
            && run[0].base_offset == a.base_offset
            && run[run.len() - 1].end_offset() == a.end_offset;
        if matches {
            self.install(seq, tp, a, from..to, now, updates);
        }
        matches
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
            // A forgetting trim the sequencer followed leaves the
            // partition unknown: every batch goes, and so does the entry.
            let forget = t.forget && !self.sequencer.knows(&tp);
            if let Some(entries) = self.index.get_mut(&tp) {
                let gone = if forget {
                    entries.len()
                } else {
                    entries.partition_point(|e| e.end_offset() <= log_start)
                };
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
            if forget {
                self.index.remove(&tp);
            }
            updates.push(IndexUpdate {
                seq,
                tp,
                open_from: self.sequencer.first_open(&tp),
                aborted: Vec::new(),
                segment: Arc::from(""),
                batches: Vec::new(),
                log_start,
                forget,
                archived: false,
            });
        }
    }

    /// The state after entry `seq` (the last applied) as a snapshot.
    /// Only segments still referenced, or released and perhaps not yet
    /// deleted, are listed (renumbered): the list does not grow with every
    /// segment ever written.
    pub fn snapshot(&self) -> Snapshot {
        let (renumber, live) = self.live_segments();
        let segments = live.iter().map(|k| k.to_string()).collect();
        let index = self
            .index
            .iter()
            .map(|(k, v)| {
                let entries = v
                    .iter()
                    .map(|e| IndexedBatch {
                        segment: renumber[e.segment as usize],
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
                    open_from: state.sequencer.first_open(tp),
                    aborted: Vec::new(),
                    segment: Arc::from(""),
                    batches: Vec::new(),
                    log_start: first,
                    forget: false,
                    archived: false,
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
                    open_from: state.sequencer.first_open(tp),
                    aborted: Vec::new(),
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
                    forget: false,
                    archived: false,
                });
            }
        }
        // Each partition's aborted transactions, after its batches.
        for tp in snap.index.iter().map(|(tp, _)| tp) {
            let aborted: Vec<_> = state.sequencer.aborted(tp).copied().collect();
            if !aborted.is_empty() {
                updates.push(IndexUpdate {
                    seq: snap.seq,
                    tp: *tp,
                    open_from: state.sequencer.first_open(tp),
                    aborted,
                    segment: Arc::from(""),
                    batches: Vec::new(),
                    log_start: state.sequencer.log_start(tp),
                    forget: false,
                    archived: false,
                });
            }
        }
        for (seg, n) in state.segments.iter().zip(held) {
            state.refs.hold(seg, n.max(1));
            if n == 0 {
                state.refs.release(seg, 1, snap.seq, now);
            }
        }
        // Batches in a segment the snapshot does not list were skipped
        // above (and logged); they are not kept either.
        let listed = state.segments.len();
        state.index = snap
            .index
            .into_iter()
            .map(|(tp, mut v)| {
                v.retain(|e| (e.segment as usize) < listed);
                (tp, v)
            })
            .collect();
        (state, updates)
    }

    /// The trims retention asks for at `now_ms`, at most `trims_max`.
    /// A partition of a topic missing from `policies` (deleted) is trimmed
    /// to its end; a later turn that finds it still missing, and empty,
    /// has every broker forget it. Two turns, so that one misreading of
    /// the topics never costs a live partition its offsets.
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
            let mut forget = false;
            let to = match policies.get(&tp.topic_id) {
                None => {
                    let hwm = self.sequencer.high_watermark(tp);
                    forget = hwm == start && entries.is_empty();
                    (hwm > start || forget).then_some(hwm)
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
                    forget,
                });
                if trims.len() == trims_max {
                    break;
                }
            }
        }
        trims
    }
}

/// Gives each update the partition state that holds once the shard has
/// applied it: a shard may serve reads between two updates of one entry.
/// The updates are built after the whole entry is applied, so each carries
/// the state at the entry's end; that is right only for a partition's
/// last update. The earlier ones keep the log start from before the entry
/// (only trims move it, and a trim's update comes last), and a last stable
/// offset no later than the entry's start or its first transactional batch
/// (a transaction the entry ends stays open until its marker's update;
/// without this, a read between the two could return an aborted batch
/// without the abort that hides it).
fn settle_updates(
    updates: &mut [IndexUpdate],
    before: &HashMap<PartitionKey, (u64, Option<u64>)>,
    txn_first: &HashMap<PartitionKey, u64>,
) {
    let mut last: HashMap<PartitionKey, usize> = HashMap::new();
    for (i, u) in updates.iter().enumerate() {
        last.insert(u.tp, i);
    }
    for (i, u) in updates.iter_mut().enumerate() {
        if last.get(&u.tp) == Some(&i) {
            continue;
        }
        let Some(&(log_start, open)) = before.get(&u.tp) else {
            continue;
        };
        u.log_start = log_start;
        u.open_from = match (open, txn_first.get(&u.tp)) {
            (Some(a), Some(&b)) => Some(a.min(b)),
            (a, b) => a.or(b.copied()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_meta::schema::{ArchiveRecord, BatchRecord, ChunkRecord, MarkerRecord, SegmentRecord};
    use std::time::Duration;

    fn tp(p: u32) -> PartitionKey {
        PartitionKey {
            topic_id: uuid::Uuid::from_u128(3),
            partition: p,
        }
    }

    /// A seeded stream of entries: segments of plain, idempotent and (in
    /// partition 3) transactional batches over four partitions, now and
    /// then a trim, and now and then a marker ending producer 9's
    /// transaction in partitions 1 and 3 (it never writes to 1).
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
                    let transactional = p == 3;
                    let idempotent = p % 2 == 0 || transactional;
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
                            producer_id: match (transactional, idempotent) {
                                (true, _) => 9,
                                (false, true) => 7,
                                _ => -1,
                            },
                            producer_epoch: if idempotent { 0 } else { -1 },
                            base_sequence: if idempotent { base_sequence } else { -1 },
                            transactional,
                        }],
                    });
                }
                let markers = if rnd(4) == 0 {
                    vec![MarkerRecord {
                        producer_id: 9,
                        epoch: 0,
                        commit: rnd(2) == 0,
                        partitions: vec![(tp(1).topic_id, 1), (tp(3).topic_id, 3)],
                    }]
                } else {
                    Vec::new()
                };
                let trims = if rnd(6) == 0 {
                    vec![TrimRecord {
                        topic_id: tp(1).topic_id,
                        partition: rnd(4) as u32,
                        log_start: rnd(40),
                        forget: rnd(3) == 0,
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
                    archives: Vec::new(),
                    trims,
                    at_ms: i as u64,
                    producer_expiration_ms: 0,
                    markers,
                }
            })
            .collect()
    }

    /// Applies `updates` to shard indexes as a shard does, checking that
    /// after each one, a read between two updates of one entry never
    /// sees a last stable offset beyond the one the entry ends with
    /// (`s`, the state after it).
    fn shard_view(
        indexes: &mut HashMap<PartitionKey, crate::index::PartitionIndex>,
        updates: Vec<IndexUpdate>,
        s: &LogState,
    ) {
        for u in updates {
            let tp = u.tp;
            crate::shard::apply_update(indexes, u);
            // (Not for a partition the entry forgets at its end.)
            if let Some(ix) = indexes
                .get(&tp)
                .filter(|ix| ix.high_watermark() <= s.high_watermark(&tp))
            {
                assert!(
                    ix.last_stable() <= s.last_stable_offset(&tp).max(ix.log_start()),
                    "{tp:?}: {} > {} (hwm {}, start {})",
                    ix.last_stable(),
                    s.last_stable_offset(&tp),
                    ix.high_watermark(),
                    ix.log_start()
                );
            }
        }
    }

    /// The shards' indexes say what the log state says: offsets, last
    /// stable offsets, aborted transactions, and marker entries whose
    /// bytes are control batches at their offsets.
    fn assert_same_view(
        seed: u64,
        s: &LogState,
        indexes: &HashMap<PartitionKey, crate::index::PartitionIndex>,
    ) {
        for p in 0..4 {
            let Some(ix) = indexes.get(&tp(p)) else {
                assert_eq!(s.high_watermark(&tp(p)), 0, "seed {seed}");
                continue;
            };
            assert_eq!(
                ix.high_watermark(),
                s.high_watermark(&tp(p)),
                "seed {seed} p{p}"
            );
            assert_eq!(
                ix.last_stable(),
                s.last_stable_offset(&tp(p)),
                "seed {seed} p{p}"
            );
            let aborted: Vec<AbortedTxn> = s.aborted(&tp(p)).copied().collect();
            assert_eq!(ix.aborted_between(0, u64::MAX), aborted, "seed {seed} p{p}");
            let mut i = ix.position(ix.log_start()).unwrap_or(usize::MAX);
            while let Some(e) = ix.entry(i) {
                if crate::batch::is_marker_key(&e.segment) {
                    assert_eq!(p, 3, "seed {seed}: a marker where no transaction was open");
                    let b = crate::batch::marker_bytes(&e.segment, e.max_ts).expect("a marker");
                    assert_eq!((e.records, e.len as usize), (1, b.len()));
                }
                i += 1;
            }
        }
    }

    #[test]
    fn a_loaded_snapshot_continues_exactly_like_the_state_it_came_from() {
        let now = SystemTime::UNIX_EPOCH;
        for seed in 1..200 {
            let log = entries(seed, 60);
            let cut = 1 + (seed as usize * 7) % 58;
            let mut a = LogState::default();
            let mut shard = HashMap::new();
            for (i, e) in log[..cut].iter().enumerate() {
                let applied = a.apply(i as u64 + 1, e, now);
                shard_view(&mut shard, applied.updates, &a);
            }
            assert_same_view(seed, &a, &shard);
            let snap = a.snapshot();
            let bytes = snap.encode().expect("encodes");
            let (mut b, reload) =
                LogState::load(Snapshot::decode("s", &bytes).expect("decodes"), now);
            // A shard loading the snapshot sees what one that applied
            // every entry sees.
            let mut loaded = HashMap::new();
            shard_view(&mut loaded, reload, &b);
            assert_same_view(seed, &b, &loaded);
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
                shard_view(&mut shard, x.updates, &a);
                shard_view(&mut loaded, y.updates, &b);
            }
            assert_same_view(seed, &a, &shard);
            assert_same_view(seed, &b, &loaded);
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

    /// One plain batch of one record in partition `p`, in its own segment
    /// named after `i` (also its position, to check the index later).
    fn single(i: u64, p: u32, trims: Vec<TrimRecord>) -> CommitRecord {
        CommitRecord {
            segments: vec![SegmentRecord {
                key: format!("segments/{i:06}"),
                size: 100,
                chunks: vec![ChunkRecord {
                    topic_id: tp(p).topic_id,
                    partition: p,
                    batches: vec![BatchRecord {
                        pos: i,
                        len: 100,
                        records: 1,
                        max_ts: i as i64,
                        producer_id: -1,
                        producer_epoch: -1,
                        base_sequence: -1,
                        transactional: false,
                    }],
                }],
            }],
            epochs: Vec::new(),
            archives: Vec::new(),
            trims,
            at_ms: 0,
            producer_expiration_ms: 0,
            markers: Vec::new(),
        }
    }

    #[test]
    fn the_segment_table_grows_with_live_segments_not_with_history() {
        let now = SystemTime::UNIX_EPOCH;
        let mut s = LogState::default();
        let mut largest = 0;
        for i in 1..=30_000u64 {
            let p = (i % 4) as u32;
            // Every 50th entry keeps only the last 20 batches of each
            // partition.
            let trims = if i % 50 == 0 {
                (0..4)
                    .map(|q| TrimRecord {
                        topic_id: tp(q).topic_id,
                        partition: q,
                        log_start: s.high_watermark(&tp(q)).saturating_sub(20),
                        forget: false,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            s.apply(i, &single(i, p, trims), now);
            // The cleanup owner deleted what was released.
            for k in s.refs().deletable(u64::MAX, now, Duration::ZERO) {
                s.refs_mut().forget(&k);
            }
            largest = largest.max(s.segment_table_len());
        }
        assert!(
            largest <= 2 * SEGMENT_TABLE_MIN,
            "the table reached {largest} keys"
        );
        // Renumbered many times, every batch still names its own segment.
        let snap = s.snapshot();
        let mut batches = 0;
        for (_, entries) in &snap.index {
            for e in entries {
                assert_eq!(
                    snap.segments[e.segment as usize],
                    format!("segments/{:06}", e.pos)
                );
                batches += 1;
            }
        }
        assert!(batches >= 4 * 20, "{batches} batches kept");
        let (loaded, _) = LogState::load(snap.clone(), now);
        assert_eq!(loaded.snapshot(), snap);
    }

    #[test]
    fn a_deleted_topic_is_trimmed_then_forgotten_everywhere() {
        let now = SystemTime::UNIX_EPOCH;
        let mut s = LogState::default();
        for i in 1..=6u64 {
            s.apply(i, &single(i, (i % 2) as u32, Vec::new()), now);
        }
        let mut seq = 6;
        let mut turn = |s: &mut LogState, policies: &HashMap<uuid::Uuid, RetentionPolicy>| {
            let trims = s.plan_retention(policies, 0, 100);
            seq += 1;
            let applied = s.apply(
                seq,
                &CommitRecord {
                    trims: trims.clone(),
                    ..CommitRecord::default()
                },
                now,
            );
            (trims, applied.updates)
        };
        // The topic exists, with no limits: nothing to do.
        let mut live = HashMap::new();
        live.insert(
            tp(0).topic_id,
            RetentionPolicy::from_configs(Some("-1"), None),
        );
        assert!(turn(&mut s, &live).0.is_empty());
        // Deleted: the first turn trims both partitions to their end...
        let (trims, updates) = turn(&mut s, &HashMap::new());
        assert_eq!(trims.len(), 2);
        assert!(trims.iter().all(|t| !t.forget && t.log_start == 3));
        assert!(updates.iter().all(|u| !u.forget && u.log_start == 3));
        assert!(s.batches(&tp(0)).is_empty());
        assert_eq!(s.high_watermark(&tp(1)), 3, "still known");
        assert_eq!(s.refs().known_keys().len(), 6, "released, not yet deleted");
        // ...the next forgets them on every broker that applies the log.
        let (trims, updates) = turn(&mut s, &HashMap::new());
        assert!(trims.iter().all(|t| t.forget), "{trims:?}");
        assert_eq!(updates.iter().filter(|u| u.forget).count(), 2);
        assert_eq!(s.high_watermark(&tp(1)), 0);
        assert!(s.snapshot().index.is_empty());
        assert!(!s.sequencer.knows(&tp(0)) && !s.sequencer.knows(&tp(1)));
        assert!(turn(&mut s, &HashMap::new()).0.is_empty(), "nothing left");
    }

    fn archive(p: u32, key: &str, base_offset: u64, end_offset: u64) -> CommitRecord {
        CommitRecord {
            archives: vec![ArchiveRecord {
                topic_id: tp(p).topic_id,
                partition: p,
                key: key.into(),
                size: 1000,
                base_offset,
                end_offset,
                replaces: Vec::new(),
            }],
            ..CommitRecord::default()
        }
    }

    /// An entry moving partition `p`'s log start to `log_start`.
    fn trim_to(p: u32, log_start: u64) -> CommitRecord {
        CommitRecord {
            trims: vec![TrimRecord {
                topic_id: tp(p).topic_id,
                partition: p,
                log_start,
                forget: false,
            }],
            ..CommitRecord::default()
        }
    }

    #[test]
    fn an_archive_replaces_the_first_unarchived_batches_it_matches_and_no_others() {
        let now = SystemTime::UNIX_EPOCH;
        let mut s = LogState::default();
        // Partition 0 gets offsets 0..6 in six segments.
        for i in 1..=6u64 {
            s.apply(i, &single(i, 0, Vec::new()), now);
        }
        let mut seq = 6;
        let mut try_archive = |s: &mut LogState, key: &str, from: u64, to: u64| {
            seq += 1;
            s.apply(seq, &archive(0, key, from, to), now).archived[0]
        };
        // Not from the first batch, past the end, not a batch boundary,
        // empty, or not under archives/: ignored.
        assert!(!try_archive(&mut s, "archives/x", 1, 3));
        assert!(!try_archive(&mut s, "archives/x", 0, 7));
        assert!(!try_archive(&mut s, "archives/x", 0, 0));
        assert!(!try_archive(&mut s, "segments/x", 0, 3));
        assert_eq!(s.batches(&tp(0)).len(), 6);
        assert!(try_archive(&mut s, "archives/a", 0, 3));
        // The same key again, or a range already archived: ignored.
        assert!(!try_archive(&mut s, "archives/a", 3, 4));
        assert!(!try_archive(&mut s, "archives/b", 0, 3));
        assert!(try_archive(&mut s, "archives/b", 3, 5));
        let b = s.batches(&tp(0));
        assert_eq!(
            b.iter()
                .map(|e| (e.base_offset, e.end_offset()))
                .collect::<Vec<_>>(),
            vec![(0, 3), (3, 5), (5, 6)]
        );
        assert_eq!(b[0].max_ts, 3, "the newest of the batches it replaced");
        assert_eq!(s.unarchived(&tp(0)).count(), 1);
        // The segments it replaced are released; the archives are held.
        for i in 1..=5u64 {
            assert!(!s.refs().is_referenced(&format!("segments/{i:06}")));
            assert!(s.refs().is_known(&format!("segments/{i:06}")));
        }
        assert!(s.refs().is_referenced("archives/a") && s.refs().is_referenced("segments/000006"));
        // A snapshot carries the archives, and a loaded state continues.
        let (loaded, updates) = LogState::load(s.snapshot(), now);
        assert_eq!(loaded.snapshot(), s.snapshot());
        assert!(updates.iter().any(|u| &*u.segment == "archives/b"));
        // Retention drops a whole archive only once it is wholly expired.
        seq += 1;
        s.apply(seq, &trim_to(0, 2), now);
        assert!(s.refs().is_referenced("archives/a"));
        seq += 1;
        s.apply(seq, &trim_to(0, 3), now);
        assert!(!s.refs().is_referenced("archives/a"));
        assert_eq!(s.batches(&tp(0))[0].base_offset, 3);
    }

    #[test]
    fn a_compacted_archive_replaces_the_run_of_archives_it_names_and_no_other() {
        let now = SystemTime::UNIX_EPOCH;
        let mut s = LogState::default();
        for i in 1..=8u64 {
            s.apply(i, &single(i, 0, Vec::new()), now);
        }
        let mut seq = 8;
        // Four archives of two batches each: a 0..2, b 2..4, c 4..6, d 6..8.
        for (k, from) in [("a", 0), ("b", 2), ("c", 4), ("d", 6)] {
            seq += 1;
            let key = format!("archives/{k}");
            assert!(
                s.apply(seq, &archive(0, &key, from, from + 2), now)
                    .archived[0]
            );
        }
        let mut compact = |s: &mut LogState, key: &str, from: u64, to: u64, replaces: &[&str]| {
            seq += 1;
            let mut c = archive(0, key, from, to);
            c.archives[0].replaces = replaces.iter().map(|k| format!("archives/{k}")).collect();
            s.apply(seq, &c, now).archived[0]
        };
        // Not a run, out of order, a range that is not the run's, a key
        // that is not an archive of the partition: ignored.
        assert!(!compact(&mut s, "archives/x", 0, 6, &["a", "c"]));
        assert!(!compact(&mut s, "archives/x", 0, 4, &["b", "a"]));
        assert!(!compact(&mut s, "archives/x", 0, 3, &["a", "b"]));
        assert!(!compact(&mut s, "archives/x", 2, 4, &["b", "c"]));
        assert!(!compact(&mut s, "archives/x", 0, 2, &["zz"]));
        assert!(!compact(&mut s, "archives/x", 6, 10, &["d", "e"]));
        // The run b, c: replaced by one archive spanning 2..6.
        assert!(compact(&mut s, "archives/bc", 2, 6, &["b", "c"]));
        let spans = |s: &LogState| {
            s.layout(&tp(0))
                .map(|(e, k)| (e.base_offset, e.end_offset(), k.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            spans(&s),
            vec![
                (0, 2, "archives/a".into()),
                (2, 6, "archives/bc".into()),
                (6, 8, "archives/d".into()),
            ]
        );
        assert!(!s.refs().is_referenced("archives/b") && s.refs().is_known("archives/b"));
        assert!(s.refs().is_referenced("archives/bc"));
        // Replaced archives cannot be replaced again; the new one can.
        assert!(!compact(&mut s, "archives/y", 2, 4, &["b"]));
        assert!(compact(&mut s, "archives/all", 0, 8, &["a", "bc", "d"]));
        assert_eq!(spans(&s), vec![(0, 8, "archives/all".into())]);
        // The high watermark and log start are untouched; a snapshot
        // carries it; retention still trims it whole.
        assert_eq!((s.log_start(&tp(0)), s.high_watermark(&tp(0))), (0, 8));
        let (loaded, _) = LogState::load(s.snapshot(), now);
        assert_eq!(loaded.snapshot(), s.snapshot());
        seq += 1;
        s.apply(seq, &trim_to(0, 8), now);
        assert!(!s.refs().is_referenced("archives/all"));
    }

    #[test]
    fn a_loaded_snapshot_with_archives_continues_like_its_source() {
        let now = SystemTime::UNIX_EPOCH;
        for seed in 1..300u64 {
            let log = entries(seed, 60);
            let cut = 1 + (seed as usize * 7) % 58;
            let mut rng = floe_meta::faulty::Rng(seed ^ 0xa4c);
            let (mut a, mut b) = (LogState::default(), None::<LogState>);
            let mut seq = 0;
            for (i, e) in log.iter().enumerate() {
                if i == cut {
                    let snap = a.snapshot();
                    let bytes = snap.encode().expect("encodes");
                    b = Some(
                        LogState::load(Snapshot::decode("s", &bytes).expect("decodes"), now).0,
                    );
                }
                // Now and then an archive of a partition's first few
                // unarchived batches, planned from `a`.
                let mut entries_now = vec![e.clone()];
                if rng.below(3) == 0 {
                    let p = rng.below(4) as u32;
                    let take = 1 + rng.below(4) as usize;
                    let planned: Vec<(u64, u64)> = a
                        .unarchived(&tp(p))
                        .take(take)
                        .map(|(x, _)| (x.base_offset, x.end_offset()))
                        .collect();
                    if let (Some(f), Some(l)) = (planned.first(), planned.last()) {
                        entries_now.push(archive(p, &format!("archives/{seed}-{i}"), f.0, l.1));
                    }
                }
                for e in entries_now {
                    seq += 1;
                    let x = a.apply(seq, &e, now);
                    if let Some(b) = b.as_mut() {
                        let y = b.apply(seq, &e, now);
                        assert_eq!(x.outcomes, y.outcomes, "seed {seed}: entry {seq}");
                        assert_eq!(x.archived, y.archived, "seed {seed}: entry {seq}");
                    }
                }
            }
            let b = b.expect("cut inside the log");
            assert_eq!(
                a.snapshot(),
                b.snapshot(),
                "seed {seed}: same state at the end"
            );
        }
    }

    #[test]
    fn an_archive_that_lost_to_a_trim_is_ignored() {
        let now = SystemTime::UNIX_EPOCH;
        let mut s = LogState::default();
        for i in 1..=4u64 {
            s.apply(i, &single(i, 1, Vec::new()), now);
        }
        s.apply(5, &trim_to(1, 2), now);
        // Planned before the trim: from offset 0, which is gone.
        assert!(!s.apply(6, &archive(1, "archives/late", 0, 3), now).archived[0]);
        assert!(s.apply(7, &archive(1, "archives/now", 2, 4), now).archived[0]);
        assert!(!s.refs().is_known("archives/late"));
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

//! The partition index: offset → (segment, byte range), per partition.
//! Owned by the partition's shard. Plain state, no I/O.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::sequencer::AbortedTxn;

/// One stored batch of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub base_offset: u64,
    pub records: u32,
    pub max_ts: i64,
    /// Shared with the read cache's keys and the committer's updates.
    pub segment: Arc<str>,
    pub pos: u64,
    pub len: u32,
}

impl IndexEntry {
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.records)
    }
}

#[derive(Debug, Default)]
pub struct PartitionIndex {
    entries: VecDeque<IndexEntry>,
    /// Bytes of the batches in `entries` (what the partition keeps stored).
    stored: u64,
    high_watermark: u64,
    log_start: u64,
    /// The first offset of the oldest open transaction.
    open_from: Option<u64>,
    /// Aborted transactions whose marker is at or after the log start,
    /// oldest first.
    aborted: VecDeque<AbortedTxn>,
}

impl PartitionIndex {
    /// The last stable offset: `read_committed` consumers read below it.
    pub fn last_stable(&self) -> u64 {
        self.open_from
            .map_or(self.high_watermark, |o| o.min(self.high_watermark))
    }

    /// Sets where the oldest open transaction begins (the log says).
    pub fn set_open_from(&mut self, open_from: Option<u64>) {
        self.open_from = open_from;
    }

    /// Adds aborted transactions (oldest first, after those known).
    pub fn add_aborted(&mut self, aborted: impl IntoIterator<Item = AbortedTxn>) {
        for a in aborted {
            if a.marker_offset >= self.log_start
                && self
                    .aborted
                    .back()
                    .is_none_or(|b| b.marker_offset < a.marker_offset)
            {
                self.aborted.push_back(a);
            }
        }
    }

    /// The aborted transactions a fetch returning offsets `from..to` must
    /// list (Kafka's rule: those ending at or after `from` and beginning
    /// before `to`).
    pub fn aborted_between(&self, from: u64, to: u64) -> Vec<AbortedTxn> {
        let first = self.aborted.partition_point(|a| a.marker_offset < from);
        self.aborted
            .range(first..)
            .filter(|a| a.first_offset < to)
            .copied()
            .collect()
    }

    pub fn high_watermark(&self) -> u64 {
        self.high_watermark
    }

    pub fn log_start(&self) -> u64 {
        self.log_start
    }

    /// Bytes of the batches the partition keeps (from its log start to its
    /// high watermark, as stored: intake ranges and archive objects).
    pub fn stored_bytes(&self) -> u64 {
        self.stored
    }

    /// Adds the next batch. Offsets must stay contiguous.
    pub fn push(&mut self, e: IndexEntry) {
        assert_eq!(
            e.base_offset, self.high_watermark,
            "partition index offsets must be contiguous"
        );
        self.high_watermark = e.next_offset();
        self.stored += u64::from(e.len);
        self.entries.push_back(e);
    }

    /// Replaces the batches `e` covers (from its base offset to its next
    /// offset, whole batches) by `e`: an archive object taking over from
    /// the intake segments. False, and nothing changed, when no run of
    /// batches starts and ends exactly there.
    pub fn replace(&mut self, e: IndexEntry) -> bool {
        let from = self
            .entries
            .partition_point(|x| x.base_offset < e.base_offset);
        let to = self
            .entries
            .partition_point(|x| x.next_offset() < e.next_offset());
        let fits = self
            .entries
            .get(from)
            .is_some_and(|x| x.base_offset == e.base_offset)
            && self
                .entries
                .get(to)
                .is_some_and(|x| x.next_offset() == e.next_offset());
        if !fits {
            return false;
        }
        let gone: u64 = self
            .entries
            .drain(from..=to)
            .map(|x| u64::from(x.len))
            .sum();
        self.stored = self.stored - gone + u64::from(e.len);
        self.entries.insert(from, e);
        true
    }

    /// Moves the log start forward (retention, DeleteRecords) and drops the
    /// batches wholly before it. An index with no batch left also moves its
    /// high watermark there, so the next batch pushed continues from it
    /// (how a shard loads a partition whose start was trimmed away).
    pub fn advance_log_start(&mut self, to: u64) {
        if to <= self.log_start {
            return;
        }
        self.log_start = to;
        while self.entries.front().is_some_and(|e| e.next_offset() <= to) {
            if let Some(e) = self.entries.pop_front() {
                self.stored -= u64::from(e.len);
            }
        }
        while self.aborted.front().is_some_and(|a| a.marker_offset < to) {
            self.aborted.pop_front();
        }
        if self.entries.is_empty() {
            self.high_watermark = self.high_watermark.max(to);
        }
        debug_assert!(self.log_start <= self.high_watermark);
    }

    /// The objects holding the partition's batches, once per batch.
    pub fn segments(&self) -> impl Iterator<Item = &Arc<str>> {
        self.entries.iter().map(|e| &e.segment)
    }

    /// Position of the entry holding `offset` (or the first after it).
    pub fn position(&self, offset: u64) -> Option<usize> {
        if offset >= self.high_watermark {
            return None;
        }
        let i = self.entries.partition_point(|e| e.next_offset() <= offset);
        (i < self.entries.len()).then_some(i)
    }

    pub fn entry(&self, i: usize) -> Option<&IndexEntry> {
        self.entries.get(i)
    }

    /// The first batch holding a record with timestamp >= `ts`.
    pub fn position_for_timestamp(&self, ts: i64) -> Option<usize> {
        self.entries.iter().position(|e| e.max_ts >= ts)
    }

    /// The batch holding the largest timestamp (the last such batch).
    pub fn position_of_max_timestamp(&self) -> Option<usize> {
        let max = self.entries.iter().map(|e| e.max_ts).max()?;
        self.entries.iter().rposition(|e| e.max_ts == max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(base: u64, records: u32, ts: i64) -> IndexEntry {
        IndexEntry {
            base_offset: base,
            records,
            max_ts: ts,
            segment: Arc::from("s"),
            pos: 0,
            len: 1,
        }
    }

    #[test]
    fn lookup_by_offset_and_timestamp() {
        let mut p = PartitionIndex::default();
        p.push(e(0, 3, 10));
        p.push(e(3, 2, 30));
        p.push(e(5, 1, 20));
        assert_eq!(p.high_watermark(), 6);
        assert_eq!(p.position(0), Some(0));
        assert_eq!(p.position(2), Some(0));
        assert_eq!(p.position(3), Some(1));
        assert_eq!(p.position(5), Some(2));
        assert_eq!(p.position(6), None);
        assert_eq!(p.position_for_timestamp(15), Some(1));
        assert_eq!(p.position_for_timestamp(31), None);
        assert_eq!(p.position_of_max_timestamp(), Some(1));
    }

    #[test]
    fn advancing_the_log_start_drops_whole_batches_only() {
        let mut p = PartitionIndex::default();
        p.push(e(0, 3, 10));
        p.push(e(3, 2, 30));
        p.advance_log_start(4);
        assert_eq!(p.log_start(), 4);
        // The batch holding offset 4 stays, and is found from inside it.
        assert_eq!(
            p.position(4)
                .and_then(|i| p.entry(i))
                .map(|e| e.base_offset),
            Some(3)
        );
        p.advance_log_start(1);
        assert_eq!(p.log_start(), 4, "never backwards");
        p.advance_log_start(5);
        assert_eq!((p.log_start(), p.high_watermark()), (5, 5));
        assert_eq!(p.position(5), None);
        p.push(e(5, 1, 40));
        assert_eq!(p.high_watermark(), 6);
    }

    #[test]
    fn an_empty_index_starts_where_the_trim_says() {
        let mut p = PartitionIndex::default();
        p.advance_log_start(7);
        assert_eq!((p.log_start(), p.high_watermark()), (7, 7));
        p.push(e(7, 2, 0));
        assert_eq!(p.high_watermark(), 9);
    }

    #[test]
    fn an_archive_replaces_exactly_the_batches_it_covers() {
        let mut p = PartitionIndex::default();
        for (base, n) in [(0, 3), (3, 2), (5, 1), (6, 4)] {
            p.push(e(base, n, base as i64));
        }
        let mut arc = e(3, 3, 5);
        arc.segment = Arc::from("archives/a");
        // Not on batch boundaries: refused, nothing changes.
        assert!(!p.replace(IndexEntry {
            base_offset: 4,
            records: 2,
            ..arc.clone()
        }));
        assert!(!p.replace(IndexEntry {
            records: 4,
            ..arc.clone()
        }));
        assert!(p.replace(arc.clone()));
        let bases: Vec<u64> = (0..4)
            .filter_map(|i| p.entry(i))
            .map(|x| x.base_offset)
            .collect();
        assert_eq!(bases, vec![0, 3, 6]);
        assert_eq!(p.entry(p.position(5).unwrap_or(9)), Some(&arc));
        assert_eq!(p.high_watermark(), 10);
    }

    /// Stored bytes follow pushes, archives replacing batches, and trims.
    #[test]
    fn stored_bytes_follow_every_change() {
        let mut p = PartitionIndex::default();
        for (base, n, len) in [(0, 3, 100), (3, 2, 50), (5, 1, 10), (6, 4, 40)] {
            p.push(IndexEntry {
                len,
                ..e(base, n, 0)
            });
        }
        assert_eq!(p.stored_bytes(), 200);
        assert!(p.replace(IndexEntry {
            len: 45,
            ..e(3, 3, 0)
        }));
        assert_eq!(p.stored_bytes(), 100 + 45 + 40);
        p.advance_log_start(4);
        assert_eq!(p.stored_bytes(), 85, "the batch before the new start goes");
        p.advance_log_start(10);
        assert_eq!(p.stored_bytes(), 0);
    }

    #[test]
    fn the_last_stable_offset_and_the_aborted_list() {
        let mut p = PartitionIndex::default();
        for (base, n) in [(0, 3), (3, 2), (5, 1), (6, 4)] {
            p.push(e(base, n, 0));
        }
        assert_eq!(p.last_stable(), 10);
        p.set_open_from(Some(6));
        assert_eq!(p.last_stable(), 6);
        let a = |first, marker| AbortedTxn {
            producer_id: 1,
            first_offset: first,
            marker_offset: marker,
        };
        p.add_aborted([a(0, 2), a(3, 5)]);
        p.add_aborted([a(0, 2)]); // already known: not twice
        assert_eq!(p.aborted_between(0, 10), vec![a(0, 2), a(3, 5)]);
        assert_eq!(p.aborted_between(3, 10), vec![a(3, 5)]);
        assert_eq!(p.aborted_between(0, 3), vec![a(0, 2)]);
        assert_eq!(p.aborted_between(6, 10), vec![]);
        p.advance_log_start(3);
        assert_eq!(p.aborted_between(0, 10), vec![a(3, 5)]);
    }

    #[test]
    #[should_panic(expected = "contiguous")]
    fn rejects_gaps() {
        let mut p = PartitionIndex::default();
        p.push(e(1, 1, 0));
    }
}

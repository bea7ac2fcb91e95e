//! Object lifecycle decisions: retention, segment release and orphan sweep.
//!
//! Plain state and pure functions, no I/O, the clock passed in: the
//! committer feeds them what the log says and carries out what they decide
//! (a trim committed through the log, then deletes on the object store).
//!
//! The rules they encode:
//! - Retention only moves a partition's log start forward, over a prefix of
//!   its batches (as Kafka deletes only the oldest segments).
//! - A segment object holds batches of many partitions; it is *released*
//!   when the last batch referencing it is trimmed, and deletable only once
//!   a grace period has passed since (a fetch that resolved a batch just
//!   before the trim can still read it) and the newest persisted snapshot
//!   was written after the release (so no snapshot a broker may load, nor
//!   any entry after it, names the object).
//! - An object under `segments/` that the log does not know is an orphan
//!   (uploaded, never committed) once it is older than the orphan grace:
//!   commits that are still on their way are far younger.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use floe_objstore::ObjectMeta;

/// Kafka's default `retention.ms`: 7 days.
pub const RETENTION_MS_DEFAULT: i64 = 7 * 24 * 3600 * 1000;
/// Kafka's default `retention.bytes`: unlimited.
pub const RETENTION_BYTES_DEFAULT: i64 = -1;
/// Where segment objects live; the orphan sweep looks nowhere else.
pub const SEGMENTS_PREFIX: &str = "segments/";
/// Where archive objects live (`engine/src/archive.rs`): one partition's
/// batches each. The orphan sweep looks here too.
pub const ARCHIVES_PREFIX: &str = "archives/";

/// Whether an object key names an archive object (else a segment).
pub fn is_archive_key(key: &str) -> bool {
    key.starts_with(ARCHIVES_PREFIX)
}

/// Where snapshots live (`snapshots/<seq, 20 digits>.json`).
pub const SNAPSHOTS_PREFIX: &str = "snapshots/";

/// A topic's retention, from its `retention.ms` and `retention.bytes`
/// (`None`: unlimited, Kafka's -1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self::from_configs(None, None)
    }
}

impl RetentionPolicy {
    /// From a topic's config strings (absent: Kafka's defaults). Values
    /// were validated at creation; one that does not parse keeps the
    /// default rather than deleting anything on a misreading.
    pub fn from_configs(retention_ms: Option<&str>, retention_bytes: Option<&str>) -> Self {
        let read = |v: Option<&str>, default: i64| {
            let n = v
                .and_then(|s| s.trim().parse::<i64>().ok())
                .unwrap_or(default);
            u64::try_from(n).ok()
        };
        Self {
            retention_ms: read(retention_ms, RETENTION_MS_DEFAULT),
            retention_bytes: read(retention_bytes, RETENTION_BYTES_DEFAULT),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.retention_ms.is_none() && self.retention_bytes.is_none()
    }
}

/// What the planner needs of one stored batch, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBatch {
    pub base_offset: u64,
    pub records: u32,
    pub max_ts: i64,
    pub len: u32,
}

impl StoredBatch {
    fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.records)
    }
}

/// Decides new log start offsets. `now_ms` is the wall clock (Unix
/// milliseconds, as record timestamps are), injected.
#[derive(Debug, Clone, Copy)]
pub struct RetentionPlanner {
    pub now_ms: i64,
}

impl RetentionPlanner {
    /// The new log start of a partition whose batches still readable are
    /// `batches` (oldest first, the first one holding `log_start`), or
    /// `None` when it stays where it is.
    ///
    /// Time: a batch expires once its newest record is older than
    /// `retention.ms` (Kafka's rule for a segment's largest timestamp);
    /// only a prefix expires, so one record with a future timestamp holds
    /// everything after it. Size: the oldest batches go while what remains
    /// still holds at least `retention.bytes` (Kafka's rule: a partition is
    /// never cut below its limit).
    /// `count` batches, read through `batch(i)` so the caller's own index
    /// needs no copy.
    pub fn plan(
        &self,
        policy: RetentionPolicy,
        log_start: u64,
        count: usize,
        batch: impl Fn(usize) -> StoredBatch,
    ) -> Option<u64> {
        let mut first = 0;
        if let Some(ms) = policy.retention_ms {
            let cutoff = self
                .now_ms
                .saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX));
            while first < count && batch(first).max_ts < cutoff {
                first += 1;
            }
        }
        if let Some(limit) = policy.retention_bytes {
            let mut left: u64 = (first..count).map(|i| u64::from(batch(i).len)).sum();
            while first < count && left - u64::from(batch(first).len) >= limit {
                left -= u64::from(batch(first).len);
                first += 1;
            }
        }
        if first == 0 {
            return None;
        }
        // Everything before the first kept batch goes; with none kept the
        // log starts at the end of the last one (the high watermark).
        let to = if first < count {
            batch(first).base_offset
        } else {
            batch(first - 1).next_offset()
        };
        (to > log_start).then_some(to)
    }
}

/// A segment whose last reference was trimmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The log entry whose trim released it.
    pub seq: u64,
    pub at: SystemTime,
}

/// Which segment objects the log still references, and which it let go.
/// Every broker keeps one (each applies the same log); only the cleanup
/// owner acts on it.
#[derive(Debug, Default)]
pub struct SegmentRefs {
    /// Batches referencing each segment.
    refs: HashMap<Arc<str>, u64>,
    released: BTreeMap<Arc<str>, Released>,
}

impl SegmentRefs {
    /// `batches` more batches of `segment` are readable.
    pub fn hold(&mut self, segment: &Arc<str>, batches: u64) {
        // Markers name no object: nothing to hold or delete.
        if batches == 0 || crate::batch::is_marker_key(segment) {
            return;
        }
        *self.refs.entry(segment.clone()).or_default() += batches;
        self.released.remove(segment);
    }

    /// `batches` batches of `segment` were trimmed by entry `seq`.
    pub fn release(&mut self, segment: &Arc<str>, batches: u64, seq: u64, at: SystemTime) {
        if crate::batch::is_marker_key(segment) {
            return;
        }
        let Some(n) = self.refs.get_mut(segment) else {
            debug_assert!(false, "released a segment never held: {segment}");
            return;
        };
        debug_assert!(*n >= batches, "segment {segment} released more than held");
        *n = n.saturating_sub(batches);
        if *n == 0 {
            self.refs.remove(segment);
            self.released.insert(segment.clone(), Released { seq, at });
        }
    }

    pub fn is_referenced(&self, segment: &str) -> bool {
        self.refs.contains_key(segment)
    }

    /// Referenced or released and not yet deleted: not an orphan.
    pub fn is_known(&self, segment: &str) -> bool {
        self.refs.contains_key(segment) || self.released.contains_key(segment)
    }

    /// Every segment referenced or released.
    pub fn known_keys(&self) -> HashSet<Arc<str>> {
        self.refs
            .keys()
            .chain(self.released.keys())
            .cloned()
            .collect()
    }

    /// Released segments safe to delete now: released at least `grace`
    /// ago, by an entry no later than the newest persisted snapshot.
    pub fn deletable(&self, snapshot_seq: u64, now: SystemTime, grace: Duration) -> Vec<Arc<str>> {
        self.released
            .iter()
            .filter(|(_, r)| r.seq <= snapshot_seq && r.at + grace <= now)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Released segments past their grace that wait only for a snapshot
    /// written after their release.
    pub fn waiting_for_snapshot(
        &self,
        snapshot_seq: u64,
        now: SystemTime,
        grace: Duration,
    ) -> bool {
        self.released
            .values()
            .any(|r| r.seq > snapshot_seq && r.at + grace <= now)
    }

    /// The object is gone (or another broker owns its deletion): forget it.
    pub fn forget(&mut self, segment: &str) {
        self.released.remove(segment);
    }
}

/// Objects under `segments/` or `archives/` that nothing in the log knows (`known`, from
/// [`SegmentRefs::known_keys`] taken before the listing), older than
/// `grace`: uploads whose commit never landed.
pub fn orphans(
    listing: &[ObjectMeta],
    known: &HashSet<Arc<str>>,
    now: SystemTime,
    grace: Duration,
) -> Vec<String> {
    listing
        .iter()
        .filter(|m| m.key.starts_with(SEGMENTS_PREFIX) || is_archive_key(&m.key))
        .filter(|m| !known.contains(m.key.as_str()))
        .filter(|m| m.last_modified + grace <= now)
        .map(|m| m.key.clone())
        .collect()
}

/// The sequence number in a snapshot object's key.
pub fn snapshot_seq(key: &str) -> Option<u64> {
    key.strip_prefix(SNAPSHOTS_PREFIX)?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// Snapshot objects superseded by the newest one (`current`, the key the
/// pointer names) for at least `grace`: a broker that read the pointer
/// just before it moved has had that long to load the older one.
pub fn stale_snapshots(
    listing: &[ObjectMeta],
    current: &str,
    now: SystemTime,
    grace: Duration,
) -> Vec<String> {
    let Some(cur_seq) = snapshot_seq(current) else {
        return Vec::new();
    };
    let Some(cur) = listing.iter().find(|m| m.key == current) else {
        return Vec::new();
    };
    if cur.last_modified + grace > now {
        return Vec::new();
    }
    listing
        .iter()
        .filter(|m| snapshot_seq(&m.key).is_some_and(|s| s < cur_seq))
        .map(|m| m.key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn b(base: u64, records: u32, max_ts: i64, len: u32) -> StoredBatch {
        StoredBatch {
            base_offset: base,
            records,
            max_ts,
            len,
        }
    }

    fn plan(
        p: &RetentionPlanner,
        policy: RetentionPolicy,
        log_start: u64,
        batches: &[StoredBatch],
    ) -> Option<u64> {
        p.plan(policy, log_start, batches.len(), |i| batches[i])
    }

    fn policy(ms: &str, bytes: &str) -> RetentionPolicy {
        RetentionPolicy::from_configs(Some(ms), Some(bytes))
    }

    #[test]
    fn defaults_are_kafkas() {
        let p = RetentionPolicy::default();
        assert_eq!(p.retention_ms, Some(604_800_000));
        assert_eq!(p.retention_bytes, None);
        assert!(policy("-1", "-1").is_unlimited());
        // A value that does not parse keeps the default, never "delete all".
        assert_eq!(policy("x", "-1").retention_ms, Some(604_800_000));
    }

    #[test]
    fn time_retention_trims_the_expired_prefix() {
        let now = 100 * MIN;
        let batches = [
            b(0, 10, 10 * MIN, 100),
            b(10, 5, 50 * MIN, 100),
            b(15, 5, 95 * MIN, 100),
        ];
        let p = RetentionPlanner { now_ms: now };
        // Batches' newest records are 90, 50 and 5 minutes old.
        // 30 minutes: the first two expired.
        assert_eq!(plan(&p, policy("1800000", "-1"), 0, &batches), Some(15));
        // 60 minutes: only the first.
        assert_eq!(plan(&p, policy("3600000", "-1"), 0, &batches), Some(10));
        // 95 minutes: none.
        assert_eq!(plan(&p, policy("5700000", "-1"), 0, &batches), None);
        assert_eq!(plan(&p, policy("-1", "-1"), 0, &batches), None);
        // Everything expired: the log starts at the high watermark.
        assert_eq!(plan(&p, policy("1000", "-1"), 0, &batches), Some(20));
    }

    #[test]
    fn only_a_prefix_expires() {
        // A batch with a future timestamp holds the older ones behind it.
        let batches = [b(0, 1, 999 * MIN, 10), b(1, 1, 0, 10)];
        let p = RetentionPlanner { now_ms: 100 * MIN };
        assert_eq!(plan(&p, policy("1000", "-1"), 0, &batches), None);
    }

    #[test]
    fn size_retention_keeps_at_least_the_limit() {
        let batches = [b(0, 1, 0, 100), b(1, 1, 0, 100), b(2, 1, 0, 100)];
        let p = RetentionPlanner { now_ms: 0 };
        // 300 bytes held, limit 150: dropping one leaves 200 >= 150, two
        // would leave 100 < 150.
        assert_eq!(plan(&p, policy("-1", "150"), 0, &batches), Some(1));
        assert_eq!(plan(&p, policy("-1", "200"), 0, &batches), Some(1));
        assert_eq!(plan(&p, policy("-1", "201"), 0, &batches), None);
        assert_eq!(plan(&p, policy("-1", "100"), 0, &batches), Some(2));
        assert_eq!(plan(&p, policy("-1", "0"), 0, &batches), Some(3));
    }

    #[test]
    fn time_and_size_combine_and_never_move_backwards() {
        let batches = [
            b(5, 5, 0, 100),
            b(10, 5, 100 * MIN, 100),
            b(15, 5, 100 * MIN, 100),
        ];
        let p = RetentionPlanner { now_ms: 100 * MIN };
        // Time drops the first, size then the second.
        assert_eq!(plan(&p, policy("60000", "100"), 5, &batches), Some(15));
        // The log already starts inside the first kept batch: no move.
        assert_eq!(plan(&p, policy("60000", "-1"), 12, &batches), None);
        assert_eq!(plan(&p, policy("60000", "-1"), 0, &[]), None);
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn a_segment_is_deletable_after_its_last_reference_grace_and_a_snapshot() {
        let (x, y): (Arc<str>, Arc<str>) = (Arc::from("segments/x"), Arc::from("segments/y"));
        let mut r = SegmentRefs::default();
        r.hold(&x, 2);
        r.hold(&y, 1);
        r.release(&x, 1, 10, at(100));
        assert!(r.is_referenced(&x), "one batch of x is still readable");
        r.release(&x, 1, 11, at(100));
        assert!(!r.is_referenced(&x) && r.is_known(&x));
        let grace = Duration::from_secs(60);
        assert!(r.deletable(11, at(159), grace).is_empty(), "within grace");
        assert!(
            r.deletable(10, at(500), grace).is_empty(),
            "no snapshot after the release"
        );
        assert!(r.waiting_for_snapshot(10, at(500), grace));
        assert_eq!(r.deletable(11, at(160), grace), vec![x.clone()]);
        assert!(!r.waiting_for_snapshot(11, at(500), grace));
        r.forget(&x);
        assert!(!r.is_known(&x) && r.is_known(&y));
    }

    fn meta(key: &str, secs: u64) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size: 1,
            last_modified: at(secs),
        }
    }

    #[test]
    fn orphans_are_unknown_old_segment_objects() {
        let mut r = SegmentRefs::default();
        r.hold(&Arc::from("segments/live"), 1);
        let listing = [
            meta("segments/live", 0),
            meta("segments/old-orphan", 0),
            meta("segments/young-orphan", 990),
            meta("snapshots/00000000000000000500.json", 0),
        ];
        assert_eq!(
            orphans(&listing, &r.known_keys(), at(1000), Duration::from_secs(60)),
            vec!["segments/old-orphan".to_string()]
        );
    }

    #[test]
    fn only_superseded_snapshots_go_and_only_after_grace() {
        let listing = [
            meta("snapshots/00000000000000000500.json", 0),
            meta("snapshots/00000000000000001000.json", 100),
            meta("snapshots/00000000000000001500.json", 200),
        ];
        let cur = "snapshots/00000000000000001000.json";
        let g = Duration::from_secs(60);
        assert!(stale_snapshots(&listing, cur, at(150), g).is_empty());
        assert_eq!(
            stale_snapshots(&listing, cur, at(160), g),
            vec!["snapshots/00000000000000000500.json".to_string()]
        );
        assert!(stale_snapshots(&listing, "snapshots/missing.json", at(999), g).is_empty());
    }
}

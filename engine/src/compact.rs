//! Log compaction, the pure parts: a topic's compaction settings, the key
//! map of a pass, and the rewriting of one stored batch without the
//! records a pass drops. No I/O; the job that reads and writes archive
//! objects is `committer::compaction`.
//!
//! Kafka's rules, on floe's archives (a partition's archive objects are
//! its log segments; intake batches not yet archived are its active
//! segment, never compacted):
//! - a pass maps each key of the *dirty* archives (not yet compacted) to
//!   its latest offset, then rewrites the archives from the first one up
//!   to the last dirty one it mapped, keeping a record only if no later
//!   offset of its key is in the map;
//! - a tombstone (a record with a key and no value) is kept while its
//!   archive was last written to less than `delete.retention.ms` ago;
//! - records without a key are dropped (produce refuses them on a
//!   compacted topic; older ones may predate the policy);
//! - offsets keep their values: whole batches that lose every record
//!   leave a gap, a batch that loses some is written again with the rest,
//!   keeping its producer id, epoch and sequence numbers.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
};
use md5::{Digest, Md5};

use crate::batch::{parse_header, patched_prefix};

/// Kafka's default `delete.retention.ms`: one day.
pub const DELETE_RETENTION_MS_DEFAULT: u64 = 24 * 3600 * 1000;
/// Kafka's default `min.cleanable.dirty.ratio`.
pub const DIRTY_RATIO_DEFAULT: f64 = 0.5;
/// Bytes of memory one key-map entry is counted as: the 16-byte key hash,
/// the 8-byte offset, and the hash table's own overhead.
pub const KEY_MAP_ENTRY_BYTES: usize = 40;

/// What a topic's configs say about compaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactionPolicy {
    /// `cleanup.policy` includes `compact`.
    pub compact: bool,
    /// `cleanup.policy` includes `delete` (time and size retention apply).
    pub delete: bool,
    pub delete_retention_ms: u64,
    pub min_lag_ms: u64,
    /// `None`: no maximum (Kafka's default, Long.MAX_VALUE).
    pub max_lag_ms: Option<u64>,
    pub min_dirty_ratio: f64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self::from_configs(|_| None)
    }
}

impl CompactionPolicy {
    /// From a topic's configs (`cfg(name)`; absent: Kafka's defaults).
    /// Values were validated when set; one that does not parse keeps its
    /// default.
    pub fn from_configs<'a>(cfg: impl Fn(&str) -> Option<&'a str>) -> Self {
        let policy = cfg("cleanup.policy");
        let num = |name: &str, default: u64| {
            cfg(name)
                .and_then(|v| v.trim().parse::<i64>().ok())
                .map_or(default, |v| u64::try_from(v).unwrap_or(0))
        };
        Self {
            compact: compacts(policy),
            delete: has_policy(policy, "delete"),
            delete_retention_ms: num("delete.retention.ms", DELETE_RETENTION_MS_DEFAULT),
            min_lag_ms: num("min.compaction.lag.ms", 0),
            max_lag_ms: Some(num("max.compaction.lag.ms", u64::MAX))
                .filter(|v| *v < i64::MAX as u64),
            min_dirty_ratio: cfg("min.cleanable.dirty.ratio")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| (0.0..=1.0).contains(v))
                .unwrap_or(DIRTY_RATIO_DEFAULT),
        }
    }
}

/// A key as the key map stores it (MD5, as Kafka's cleaner does: two keys
/// colliding would lose a record; at 2^-64 per pair for a billion keys it
/// does not happen).
pub type KeyHash = [u8; 16];

pub fn key_hash(key: &[u8]) -> KeyHash {
    Md5::digest(key).into()
}

/// The latest offset of each key of a pass's dirty archives.
#[derive(Debug, Default)]
pub struct KeyMap {
    latest: HashMap<KeyHash, u64>,
}

impl KeyMap {
    /// Entries a map may hold within `budget_bytes` of memory.
    pub fn capacity_for(budget_bytes: usize) -> usize {
        (budget_bytes / KEY_MAP_ENTRY_BYTES).max(1)
    }

    pub fn len(&self) -> usize {
        self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    /// Maps every keyed record of `stored` (one batch as stored, whose
    /// base offset in the log is `base_offset`).
    pub fn add_batch(&mut self, base_offset: u64, stored: &Bytes) -> Result<(), CompactError> {
        for r in decode(base_offset, stored)? {
            // A marker's key is its control record's, not a user's.
            if r.control {
                continue;
            }
            if let Some(k) = &r.key {
                let offset = r.offset as u64;
                let e = self.latest.entry(key_hash(k)).or_insert(offset);
                *e = (*e).max(offset);
            }
        }
        Ok(())
    }

    /// The latest offset of `key` mapped, if any.
    pub fn latest(&self, key: &[u8]) -> Option<u64> {
        self.latest.get(&key_hash(key)).copied()
    }
}

/// A batch after a pass.
#[derive(Debug, PartialEq)]
pub enum Kept {
    /// Every record stays: the stored bytes are reused as they are.
    All,
    /// Some records stay: the batch written again, with its new base
    /// offset (its first kept record's).
    Some { base_offset: u64, stored: Bytes },
    /// No record stays.
    None,
}

/// Why a batch could not be compacted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompactError {
    #[error("stored batch at offset {offset} is unreadable: {reason}")]
    Unreadable { offset: u64, reason: String },
}

/// Decodes `stored` (one batch) as if its base offset were `base_offset`.
/// Archived batches carry their base offset already and produced ones are
/// decoded only for their keys, so the bytes are copied (to patch the
/// offset in) only when it differs.
fn decode(base_offset: u64, stored: &Bytes) -> Result<Vec<Record>, CompactError> {
    let bad = |reason: String| CompactError::Unreadable {
        offset: base_offset,
        reason,
    };
    if stored.len() < 12 {
        return Err(bad("shorter than a batch header".into()));
    }
    let prefix = patched_prefix(stored, base_offset as i64);
    let mut buf = if stored[..12] == prefix {
        stored.clone()
    } else {
        let mut whole = BytesMut::with_capacity(stored.len());
        whole.extend_from_slice(&prefix);
        whole.extend_from_slice(&stored[12..]);
        whole.freeze()
    };
    let set = RecordBatchDecoder::decode(&mut buf).map_err(|e| bad(e.to_string()))?;
    Ok(set.records)
}

/// Whether every record of a produced batch (`stored`, as the producer
/// sent it: base offset 0) has a key: a compacted topic refuses records
/// without one.
pub fn all_keyed(stored: &Bytes) -> Result<bool, CompactError> {
    Ok(decode(0, stored)?.iter().all(|r| r.key.is_some()))
}

/// Whether a `cleanup.policy` value (absent: Kafka's `delete`) compacts.
pub fn compacts(cleanup_policy: Option<&str>) -> bool {
    has_policy(cleanup_policy, "compact")
}

fn has_policy(cleanup_policy: Option<&str>, which: &str) -> bool {
    cleanup_policy
        .unwrap_or("delete")
        .split(',')
        .any(|x| x.trim() == which)
}

/// Which records of one stored batch stay: those `keep` says yes to.
/// Batches that keep everything are not re-encoded; those that keep some
/// are written again with the batch's own compression and producer
/// fields.
pub fn filter_batch(
    base_offset: u64,
    stored: &Bytes,
    mut keep: impl FnMut(&Record) -> bool,
) -> Result<Kept, CompactError> {
    let records = decode(base_offset, stored)?;
    let total = records.len();
    let kept: Vec<Record> = records.into_iter().filter(|r| keep(r)).collect();
    if kept.len() == total {
        return Ok(Kept::All);
    }
    let Some(first) = kept.first() else {
        return Ok(Kept::None);
    };
    let bad = |reason: String| CompactError::Unreadable {
        offset: base_offset,
        reason,
    };
    let (_, h) = parse_header(stored).map_err(|e| bad(e.to_string()))?;
    let compression = match h.codec() {
        1 => Compression::Gzip,
        2 => Compression::Snappy,
        3 => Compression::Lz4,
        4 => Compression::Zstd,
        _ => Compression::None,
    };
    let new_base = first.offset as u64;
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut out,
        &kept,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .map_err(|e| bad(format!("re-encoding: {e}")))?;
    Ok(Kept::Some {
        base_offset: new_base,
        stored: out.freeze(),
    })
}

/// The rule of one pass for one record: `map` holds the latest offsets of
/// the dirty archives mapped; `tombstones_expire` says whether the
/// record's archive was last written more than `delete.retention.ms` ago.
pub fn survives(r: &Record, map: &KeyMap, tombstones_expire: bool) -> bool {
    // Transaction markers stay: read_committed consumers need them to
    // tell where a transaction ended.
    if r.control {
        return true;
    }
    let Some(key) = &r.key else {
        return false;
    };
    if map
        .latest(key)
        .is_some_and(|latest| latest > r.offset as u64)
    {
        return false;
    }
    r.value.is_some() || !tombstones_expire
}

/// Archive keys end in `…/<base offset>-n<node>-<ms>`, where `<ms>` is
/// when the archive's newest records were written into the log (for an
/// archive of intake batches: when it was written, a little later; for a
/// compacted one: the latest of the archives it replaced). A compacted
/// archive's key adds `-c<ms>`, when the pass wrote it.
pub fn compacted_key(
    prefix: &str,
    base_offset: u64,
    node: i32,
    written_ms: u64,
    now_ms: u64,
) -> String {
    format!("{prefix}{base_offset:020}-n{node}-{written_ms}-c{now_ms}")
}

/// The `<ms>` of an archive key (see [`compacted_key`]).
pub fn archive_written_ms(key: &str) -> Option<u64> {
    let name = key.rsplit('/').next()?;
    let mut parts = name.split('-');
    let (_base, node, ms) = (parts.next()?, parts.next()?, parts.next()?);
    node.strip_prefix('n')?;
    ms.parse().ok()
}

/// Whether a compaction pass wrote this archive.
pub fn is_compacted_key(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|name| name.split('-').nth(3).is_some_and(|c| c.starts_with('c')))
}

/// One archive of a partition, as a pass plans with it.
#[derive(Debug, Clone, PartialEq)]
pub struct PassInput {
    pub key: std::sync::Arc<str>,
    pub base_offset: u64,
    pub end_offset: u64,
    pub size: u64,
    /// The newest record timestamp in it.
    pub max_ts: i64,
}

impl PassInput {
    fn dirty(&self) -> bool {
        !is_compacted_key(&self.key)
    }
}

/// The archives a pass over a partition rewrites, or `None` when none is
/// due. `archives` are the partition's, oldest first; `capacity` the
/// entries the key map may hold. Kafka's rules: archives whose newest
/// record is younger than `min.compaction.lag.ms` are not cleanable (nor
/// any after them); a pass is due once the dirty share of the cleanable
/// bytes reaches `min.cleanable.dirty.ratio`, or the oldest dirty archive
/// was written more than `max.compaction.lag.ms` ago; it maps dirty
/// archives while their records fit the map (at least one), and rewrites
/// everything from the first archive to the last one mapped.
/// What [`plan_pass`] chose: rewrite `archives[..end]`; `limited` when
/// dirty archives after them did not fit the key map (the next pass takes
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassPlan {
    pub end: usize,
    pub limited: bool,
}

pub fn plan_pass(
    archives: &[PassInput],
    policy: &CompactionPolicy,
    now_ms: u64,
    capacity: usize,
) -> Option<PassPlan> {
    let horizon = i64::try_from(now_ms.saturating_sub(policy.min_lag_ms)).unwrap_or(i64::MAX);
    let cleanable = archives.partition_point(|a| a.max_ts <= horizon);
    let cleanable = &archives[..cleanable];
    let (mut dirty_bytes, mut total_bytes) = (0u64, 0u64);
    let mut oldest_dirty: Option<u64> = None;
    for a in cleanable {
        total_bytes += a.size;
        if a.dirty() {
            dirty_bytes += a.size;
            let written = archive_written_ms(&a.key).unwrap_or(now_ms);
            oldest_dirty = Some(oldest_dirty.map_or(written, |o| o.min(written)));
        }
    }
    let oldest_dirty = oldest_dirty?;
    let ratio = dirty_bytes as f64 / total_bytes.max(1) as f64;
    let overdue = policy
        .max_lag_ms
        .is_some_and(|lag| oldest_dirty.saturating_add(lag) <= now_ms);
    if ratio < policy.min_dirty_ratio && !overdue {
        return None;
    }
    let mut mapped = 0u64;
    let mut end = 0;
    let mut limited = false;
    for (i, a) in cleanable.iter().enumerate() {
        if !a.dirty() {
            continue;
        }
        let records = a.end_offset.saturating_sub(a.base_offset);
        if end > 0 && mapped + records > capacity as u64 {
            limited = true;
            break;
        }
        mapped += records;
        end = i + 1;
    }
    Some(PassPlan { end, limited })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::TimestampType;

    fn record(offset: i64, key: Option<&str>, value: Option<&str>) -> Record {
        Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: 42,
            producer_epoch: 3,
            timestamp_type: TimestampType::Creation,
            offset,
            sequence: 100 + offset as i32,
            timestamp: 1_000 + offset,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: Default::default(),
        }
    }

    /// One batch as a producer sends it (base offset 0), of `records`
    /// whose offsets start at 0.
    fn stored(records: &[Record], compression: Compression) -> Bytes {
        let mut out = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut out,
            records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .expect("encode");
        out.freeze()
    }

    fn input(key: &str, base: u64, end: u64, size: u64, max_ts: i64) -> PassInput {
        PassInput {
            key: key.into(),
            base_offset: base,
            end_offset: end,
            size,
            max_ts,
        }
    }

    #[test]
    fn keys_carry_when_an_archive_was_written_and_whether_it_was_compacted() {
        let plain = "archives/t/0/00000000000000000007-n3-1700";
        assert_eq!(archive_written_ms(plain), Some(1700));
        assert!(!is_compacted_key(plain));
        let c = compacted_key("archives/t/0/", 7, 3, 1700, 1900);
        assert_eq!(c, "archives/t/0/00000000000000000007-n3-1700-c1900");
        assert_eq!(archive_written_ms(&c), Some(1700));
        assert!(is_compacted_key(&c));
        assert_eq!(archive_written_ms("archives/odd"), None);
    }

    #[test]
    fn a_pass_is_planned_by_dirty_ratio_lags_and_the_key_map() {
        let policy =
            CompactionPolicy::from_configs(|n| (n == "cleanup.policy").then_some("compact"));
        let clean = |b, e| input(&format!("archives/t/0/{b:020}-n1-100-c200"), b, e, 100, 10);
        let dirty = |b, e, ms: u64| input(&format!("archives/t/0/{b:020}-n1-{ms}"), b, e, 100, 10);
        // Nothing dirty, nothing to do.
        assert_eq!(plan_pass(&[clean(0, 10)], &policy, 1_000, 100), None);
        // Dirty share 1/3 is below the default ratio 0.5.
        let a = [clean(0, 10), clean(10, 20), dirty(20, 30, 500)];
        assert_eq!(plan_pass(&a, &policy, 1_000, 100), None);
        // ... unless the oldest dirty archive waited past the maximum lag.
        let overdue = CompactionPolicy {
            max_lag_ms: Some(400),
            ..policy
        };
        assert_eq!(
            plan_pass(&a, &overdue, 1_000, 100),
            Some(PassPlan {
                end: 3,
                limited: false
            })
        );
        assert_eq!(plan_pass(&a, &overdue, 800, 100), None);
        // Half dirty: due; the map holds 15 records, so one dirty archive
        // (at least one always goes in) and not the next.
        let b = [clean(0, 10), dirty(10, 20, 500), dirty(20, 30, 600)];
        assert_eq!(
            plan_pass(&b, &policy, 1_000, 100),
            Some(PassPlan {
                end: 3,
                limited: false
            })
        );
        assert_eq!(
            plan_pass(&b, &policy, 1_000, 15),
            Some(PassPlan {
                end: 2,
                limited: true
            })
        );
        assert_eq!(
            plan_pass(&b, &policy, 1_000, 1),
            Some(PassPlan {
                end: 2,
                limited: true
            })
        );
        // Records younger than the minimum lag are not cleanable, nor is
        // anything after them.
        let young = CompactionPolicy {
            min_lag_ms: 995,
            ..policy
        };
        assert_eq!(plan_pass(&b, &young, 1_000, 100), None);
        let mut c = b.to_vec();
        c[2].max_ts = 990;
        let lagged = CompactionPolicy {
            min_lag_ms: 50,
            ..policy
        };
        assert_eq!(
            plan_pass(&c, &lagged, 1_000, 100),
            Some(PassPlan {
                end: 2,
                limited: false
            })
        );
    }

    #[test]
    fn policies_read_kafkas_configs_and_defaults() {
        let p = CompactionPolicy::default();
        assert!(!p.compact && p.delete);
        assert_eq!(p.delete_retention_ms, DELETE_RETENTION_MS_DEFAULT);
        assert_eq!(p.max_lag_ms, None);
        let cfg = |name: &str| match name {
            "cleanup.policy" => Some("compact, delete"),
            "min.compaction.lag.ms" => Some("5000"),
            "max.compaction.lag.ms" => Some("60000"),
            "min.cleanable.dirty.ratio" => Some("0.1"),
            "delete.retention.ms" => Some("100"),
            _ => None,
        };
        let p = CompactionPolicy::from_configs(cfg);
        assert!(p.compact && p.delete);
        assert_eq!(
            (p.min_lag_ms, p.max_lag_ms, p.delete_retention_ms),
            (5000, Some(60000), 100)
        );
        assert!((p.min_dirty_ratio - 0.1).abs() < 1e-9);
        let p = CompactionPolicy::from_configs(|n| (n == "cleanup.policy").then_some("compact"));
        assert!(p.compact && !p.delete);
    }

    #[test]
    fn a_batch_keeps_the_latest_value_per_key_at_its_offsets() {
        for compression in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let batch = stored(
                &[
                    record(0, Some("a"), Some("a0")),
                    record(1, Some("b"), Some("b1")),
                    record(2, Some("a"), Some("a2")),
                    record(3, Some("c"), None),
                    record(4, None, Some("keyless")),
                ],
                compression,
            );
            let mut map = KeyMap::default();
            map.add_batch(500, &batch).expect("map");
            assert_eq!(map.len(), 3);
            assert_eq!(map.latest(b"a"), Some(502));
            // Tombstones not yet expired stay.
            let kept = filter_batch(500, &batch, |r| survives(r, &map, false)).expect("filter");
            let Kept::Some {
                base_offset,
                stored,
            } = kept
            else {
                panic!("{compression:?}: {kept:?}");
            };
            assert_eq!(base_offset, 501);
            let got = decode(base_offset, &stored).expect("decode");
            let seen: Vec<(i64, Option<Bytes>, i32, i64)> = got
                .iter()
                .map(|r| (r.offset, r.value.clone(), r.sequence, r.timestamp))
                .collect();
            assert_eq!(
                seen,
                vec![
                    (501, Some(Bytes::from_static(b"b1")), 101, 1_001),
                    (502, Some(Bytes::from_static(b"a2")), 102, 1_002),
                    (503, None, 103, 1_003),
                ],
                "{compression:?}"
            );
            assert!(got
                .iter()
                .all(|r| r.producer_id == 42 && r.producer_epoch == 3));
            let (_, h) = parse_header(&stored).expect("header");
            assert_eq!(h.codec(), compression as i16, "the batch keeps its codec");
            assert_eq!(
                (h.last_offset_delta, h.record_count, h.base_sequence),
                (2, 3, 101)
            );
            // Expired tombstones go too.
            let Kept::Some { stored, .. } =
                filter_batch(500, &batch, |r| survives(r, &map, true)).expect("filter")
            else {
                panic!("records remain");
            };
            assert_eq!(decode(501, &stored).expect("decode").len(), 2);
        }
    }

    #[test]
    fn whole_batches_are_kept_as_they_are_or_dropped() {
        let batch = stored(
            &[
                record(0, Some("x"), Some("1")),
                record(1, Some("y"), Some("2")),
            ],
            Compression::None,
        );
        let map = KeyMap::default();
        assert_eq!(
            filter_batch(7, &batch, |r| survives(r, &map, true)).expect("f"),
            Kept::All
        );
        let mut newer = KeyMap::default();
        newer
            .add_batch(
                100,
                &stored(
                    &[record(0, Some("x"), Some("3")), record(1, Some("y"), None)],
                    Compression::None,
                ),
            )
            .expect("map");
        assert_eq!(
            filter_batch(7, &batch, |r| survives(r, &newer, true)).expect("f"),
            Kept::None
        );
        assert!(filter_batch(7, &Bytes::from_static(b"short"), |_| true).is_err());
        assert_eq!(all_keyed(&batch), Ok(true));
        let keyless = stored(
            &[record(0, Some("x"), Some("1")), record(1, None, Some("2"))],
            Compression::Lz4,
        );
        assert_eq!(all_keyed(&keyless), Ok(false));
    }
}

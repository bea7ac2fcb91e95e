//! Broker counters, exported on `/metrics` by the admin endpoint. Updated
//! once per batch, segment or request, never per record.
//!
//! What the data path counts is counted per shard ([`ShardCounters`]): each
//! shard writes only its own block, on its own cache lines, and a scrape
//! sums the shards. What is written off the data path (the committer, the
//! uploads on the sidecar, the object-store calls) stays in shared atomics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use floe_objstore::RequestCounters;

/// An upload slower than this counts towards a slow object store. An
/// 8 MiB PUT takes well under a second on S3 or a local disk.
pub const UPLOAD_SLOW: std::time::Duration = std::time::Duration::from_secs(2);

/// A counter with a single writer, its shard's thread: an increment is a
/// load and a store, no locked read-modify-write. Any thread may read it.
#[derive(Debug, Default)]
pub struct ShardCounter(AtomicU64);

impl ShardCounter {
    /// Only the owning shard's thread may call this: two writers would lose
    /// increments.
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    /// A gauge's new value; the owning shard's thread only, as `add`.
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
}

/// The counters of one shard's data path. Owned by shard `id` of
/// [`Metrics::shard`]: only that shard's thread writes them (through
/// `Shard::counters`), the scraper on the sidecar reads them. Aligned to
/// 128 bytes (two cache lines, for adjacent-line prefetch) so that no two
/// shards' blocks share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardCounters {
    /// RecordBatch bytes accepted from producers (by the owner of their
    /// partition).
    pub produce_payload_bytes: ShardCounter,
    /// RecordBatch bytes copied in user space between the socket and the
    /// object store (the one socket-to-buffer copy counts), by the shard
    /// that read them.
    pub produce_copied_bytes: ShardCounter,
    /// Payload bytes copied into the read cache when a segment is sealed
    /// (one packed buffer per segment, so the cache pins what it counts).
    pub cache_copied_bytes: ShardCounter,
    pub produce_batches: ShardCounter,
    pub fetch_bytes: ShardCounter,
    /// Partition reads that failed for another reason than an offset out
    /// of range (the object store failing, an object missing).
    pub fetch_read_errors: ShardCounter,
    pub segments_committed: ShardCounter,
    pub segment_bytes: ShardCounter,
    pub commit_failures: ShardCounter,
    pub upload_failures: ShardCounter,
    /// Requests that waited for the shard's in-flight budget before being
    /// read: back-pressure, usually because uploads are not keeping up.
    pub admission_waits: ShardCounter,
    pub requests: ShardCounter,
    pub connections_accepted: ShardCounter,
    /// Connections this shard handed to a shard with fewer (net::balance).
    pub connections_moved: ShardCounter,
    pub bad_frames: ShardCounter,
    /// Connections closed for having been idle past
    /// `connections.max.idle.ms` (net::conn).
    pub connections_idle_closed: ShardCounter,
    /// Actions the authorizer refused (net::authz).
    pub authorization_denied: ShardCounter,
    /// SASL authentications that failed, and attempts refused unchecked
    /// because their address failed too often (net::auth_limit).
    pub sasl_auth_failures: ShardCounter,
    pub sasl_auth_throttled: ShardCounter,
    /// Incremental fetch sessions started, and idle ones evicted to make
    /// room (net::fetch_session).
    pub fetch_sessions_created: ShardCounter,
    pub fetch_sessions_evicted: ShardCounter,
    /// Gauges, set when the shard seals a segment: the read cache's bytes
    /// (what its budget counts), and the capacity of the buffers the
    /// shard's pools hold for reuse: packed segment copies (those the
    /// cache pins and free ones) and request-frame slabs. All bounded by
    /// configuration; with them a soak tells bounded pools filling from
    /// growth.
    pub read_cache_bytes: ShardCounter,
    pub pack_pool_bytes: ShardCounter,
    pub frame_pool_bytes: ShardCounter,
}

const _: () = assert!(std::mem::align_of::<ShardCounters>() == 128);

/// Every counter of a broker: one [`ShardCounters`] per shard, plus the
/// broker-wide ones below. Those are shared atomics on purpose: they are
/// written off the data path (by the committer, by uploads running on the
/// sidecar, once per object-store call) or by several shards as one
/// health signal (the `_in_a_row` gauges /readyz reads).
#[derive(Debug)]
pub struct Metrics {
    shards: Box<[ShardCounters]>,
    /// Segment uploads that failed since the last one that succeeded (any
    /// shard): the object store's health, for /readyz.
    pub upload_failures_in_a_row: AtomicU64,
    /// Segment uploads slower than [`UPLOAD_SLOW`] since the last one that
    /// was not (any shard): a slow store, for /readyz.
    pub upload_slow_in_a_row: AtomicU64,
    /// Log entries this broker wrote, and CAS attempts it lost to others.
    pub log_entries_written: AtomicU64,
    pub log_cas_conflicts: AtomicU64,
    /// Times this broker fell behind the trimmed log and reloaded the
    /// snapshot in place.
    pub log_snapshot_reloads: AtomicU64,
    /// Archive objects this broker wrote that the log took, and their bytes.
    pub archives_written: AtomicU64,
    pub archive_bytes: AtomicU64,
    /// Compacted archives this broker wrote that the log took, and the
    /// records its compaction passes dropped (superseded, expired
    /// tombstones, keyless).
    pub compactions: AtomicU64,
    pub compaction_records_dropped: AtomicU64,
    /// When the commit log was last read to its head, and when the
    /// membership lease was last renewed (Unix ms): health, for /readyz.
    pub log_read_at_ms: AtomicU64,
    pub lease_renewed_at_ms: AtomicU64,
    /// Producer ids the log remembers (published once a second).
    pub producer_ids: AtomicU64,
    /// Partitions the commit log knows, and keys in its segment table
    /// (published once a second): both follow what exists, not history.
    pub log_partitions: AtomicU64,
    pub log_segment_table: AtomicU64,
    /// Commit latency (CAS round trips and retries) over the last interval,
    /// in microseconds, published by the committer.
    pub commit_latency_p50_us: AtomicU64,
    pub commit_latency_p99_us: AtomicU64,
    pub commit_latency_max_us: AtomicU64,
    /// The same since the broker started.
    pub commit_latency_total_p50_us: AtomicU64,
    pub commit_latency_total_p99_us: AtomicU64,
    pub objstore_intake: RequestCounters,
    pub objstore_fetch: RequestCounters,
    /// Retention deletes and orphan sweeps (lists, deletes).
    pub objstore_cleanup: RequestCounters,
}

impl Metrics {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards).map(|_| ShardCounters::default()).collect(),
            upload_failures_in_a_row: AtomicU64::default(),
            upload_slow_in_a_row: AtomicU64::default(),
            log_entries_written: AtomicU64::default(),
            log_cas_conflicts: AtomicU64::default(),
            log_snapshot_reloads: AtomicU64::default(),
            archives_written: AtomicU64::default(),
            archive_bytes: AtomicU64::default(),
            compactions: AtomicU64::default(),
            compaction_records_dropped: AtomicU64::default(),
            log_read_at_ms: AtomicU64::default(),
            lease_renewed_at_ms: AtomicU64::default(),
            producer_ids: AtomicU64::default(),
            log_partitions: AtomicU64::default(),
            log_segment_table: AtomicU64::default(),
            commit_latency_p50_us: AtomicU64::default(),
            commit_latency_p99_us: AtomicU64::default(),
            commit_latency_max_us: AtomicU64::default(),
            commit_latency_total_p50_us: AtomicU64::default(),
            commit_latency_total_p99_us: AtomicU64::default(),
            objstore_intake: RequestCounters::default(),
            objstore_fetch: RequestCounters::default(),
            objstore_cleanup: RequestCounters::default(),
        }
    }

    /// Shard `id`'s counters; only that shard writes them.
    pub(crate) fn shard(&self, id: usize) -> &ShardCounters {
        &self.shards[id]
    }

    /// One counter summed over every shard, for a scrape.
    pub fn sum(&self, pick: impl Fn(&ShardCounters) -> &ShardCounter) -> u64 {
        self.shards.iter().map(|s| pick(s).get()).sum()
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_sums_the_shards() {
        let m = Metrics::new(3);
        m.shard(0).requests.add(2);
        m.shard(2).requests.add(5);
        m.shard(1).fetch_bytes.add(7);
        assert_eq!(m.sum(|s| &s.requests), 7);
        assert_eq!(m.sum(|s| &s.fetch_bytes), 7);
        assert_eq!(m.sum(|s| &s.bad_frames), 0);
    }

    #[test]
    fn shards_do_not_share_a_cache_line() {
        let m = Metrics::new(2);
        let (a, b) = (
            m.shard(0) as *const _ as usize,
            m.shard(1) as *const _ as usize,
        );
        assert!(b - a >= 128 && a % 128 == 0);
    }
}

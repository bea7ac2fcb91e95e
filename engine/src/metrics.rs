//! Broker counters, exported by `floe-net` on `/metrics`. Updated once per
//! batch, segment or request, never per record.

/// An upload slower than this counts towards a slow object store. An
/// 8 MiB PUT takes well under a second on S3 or a local disk.
pub const UPLOAD_SLOW: std::time::Duration = std::time::Duration::from_secs(2);

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use floe_objstore::RequestCounters;

#[derive(Debug, Default)]
pub struct Metrics {
    /// RecordBatch bytes accepted from producers.
    pub produce_payload_bytes: AtomicU64,
    /// RecordBatch bytes copied in user space between the socket and the
    /// object store (the one socket-to-buffer copy counts).
    pub produce_copied_bytes: AtomicU64,
    pub produce_batches: AtomicU64,
    pub fetch_bytes: AtomicU64,
    /// Partition reads that failed for another reason than an offset out
    /// of range (the object store failing, an object missing).
    pub fetch_read_errors: AtomicU64,
    pub segments_committed: AtomicU64,
    pub segment_bytes: AtomicU64,
    pub commit_failures: AtomicU64,
    pub upload_failures: AtomicU64,
    /// Segment uploads that failed since the last one that succeeded (any
    /// shard): the object store's health, for /readyz.
    pub upload_failures_in_a_row: AtomicU64,
    /// Segment uploads slower than [`UPLOAD_SLOW`] since the last one that
    /// was not (any shard): a slow store, for /readyz.
    pub upload_slow_in_a_row: AtomicU64,
    /// Requests that waited for the shard's in-flight budget before being
    /// read: back-pressure, usually because uploads are not keeping up.
    pub admission_waits: AtomicU64,
    pub requests: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Connections handed to a shard with fewer (net::balance).
    pub connections_moved: AtomicU64,
    pub bad_frames: AtomicU64,
    /// Log entries this broker wrote, and CAS attempts it lost to others.
    pub log_entries_written: AtomicU64,
    pub log_cas_conflicts: AtomicU64,
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

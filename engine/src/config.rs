use std::time::Duration;

/// Engine settings, resolved by the `floe` binary from flags, environment, file
/// and the tuning model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub node_id: i32,
    pub shards: usize,
    /// Seal a segment this long after its first batch.
    pub flush_interval: Duration,
    /// Seal a segment once it holds this many payload bytes.
    pub flush_bytes: usize,
    /// Per shard: request bytes admitted but not yet answered.
    pub inflight_bytes_max: usize,
    /// Per shard: bytes of stored batches kept for reads.
    pub read_cache_bytes_max: usize,
    /// Per shard: object-store upload requests (single PUTs or multipart
    /// parts) in flight at once, across all of its segments.
    pub upload_concurrency: usize,
    /// Size of one multipart part (to count a segment's parts).
    pub upload_part_bytes: usize,
    /// An idempotent producer id silent this long (by the log's time) is
    /// forgotten; written into each log entry this broker commits.
    pub producer_id_expiration_ms: u64,
    /// The longest transaction timeout a producer may ask for (Kafka's
    /// `transaction.max.timeout.ms`).
    pub transaction_max_timeout_ms: i32,
    /// A transactional id idle this long is forgotten (Kafka's
    /// `transactional.id.expiration.ms`).
    pub transactional_id_expiration_ms: i64,
    /// Write a snapshot every this many log entries.
    pub snapshot_every_entries: u64,
    /// Log entries kept behind the newest snapshot.
    pub log_keep_entries: u64,
}

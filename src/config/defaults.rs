//! Every default of `floe serve` that is not derived from the machine
//! (shards and memory budgets come from `floe_tuning`, S3 settings from
//! `floe_objstore::S3Options::default`). `resolve` takes them from here;
//! a test checks that `floe serve --help` states these same values.

pub const DATA_DIR: &str = "floe-data";
pub const LISTEN: &str = "127.0.0.1:9092";
pub const ADMIN_LISTEN: &str = "127.0.0.1:9644";
pub const FLUSH_INTERVAL_MS: u64 = 100;
pub const FLUSH_BYTES: usize = 8 << 20;
pub const META: &str = "embedded";
pub const GROUP: &str = "default";
pub const LEASE_TTL_SECS: u64 = 10;
/// How long Metadata keeps listing a broker that left (librdkafka's
/// default metadata.max.age.ms, after which it forgets coordinators).
pub const DEPARTED_BROKER_LISTING_SECS: u64 = 900;
pub const AUTO_CREATE_TOPICS: bool = true;
pub const NUM_PARTITIONS: u32 = 1;
/// Kafka's socket.request.max.bytes.
pub const MAX_REQUEST_BYTES: usize = 104_857_600;
/// Kafka's message.max.bytes.
pub const MAX_MESSAGE_BYTES: usize = 1_048_588;
pub const FETCH_WAIT_MS_MAX: u64 = 30_000;
/// Kafka's max.incremental.fetch.session.cache.slots default.
pub const MAX_INCREMENTAL_FETCH_SESSION_CACHE_SLOTS: usize = 1_000;
/// Kafka's min.incremental.fetch.session.eviction.ms default.
pub const MIN_INCREMENTAL_FETCH_SESSION_EVICTION_MS: u64 = 120_000;
/// Kafka's group.consumer.session.timeout.ms default.
pub const GROUP_CONSUMER_SESSION_TIMEOUT_MS: u64 = 45_000;
/// Kafka's group.consumer.heartbeat.interval.ms default.
pub const GROUP_CONSUMER_HEARTBEAT_INTERVAL_MS: u64 = 5_000;
/// Kafka's `connections.max.idle.ms` default: ten minutes.
pub const CONNECTIONS_MAX_IDLE_MS: u64 = 600_000;
/// Kafka's `connection.failed.authentication.delay.ms` default.
pub const SASL_FAILED_AUTHENTICATION_DELAY_MS: u64 = 100;
/// Failed SASL authentications per client address per minute.
pub const SASL_MAX_FAILED_AUTHENTICATIONS: u32 = 10;
pub const LOG: &str = "info";
pub const CLEANUP_INTERVAL_SECS: u64 = 60;
/// Kafka's file.delete.delay.ms is 60 s.
pub const DELETE_GRACE_SECS: u64 = 60;
/// A segment sealed more than half the orphan grace ago is never sent to
/// the log, so the sweep cannot delete an upload a commit will reference;
/// an hour leaves room for long metadata outages.
pub const ORPHAN_GRACE_SECS: u64 = 3600;
pub const ORPHAN_SWEEP_INTERVAL_SECS: u64 = 600;
pub const SNAPSHOT_EVERY_ENTRIES: u64 = floe_engine::committer::SNAPSHOT_EVERY_ENTRIES;
pub const LOG_KEEP_ENTRIES: u64 = floe_engine::committer::LOG_KEEP_ENTRIES;
/// Kafka's producer.id.expiration.ms default: one day.
pub const PRODUCER_ID_EXPIRATION_MS: u64 = floe_engine::sequencer::PRODUCER_ID_EXPIRATION_MS;
pub const TRANSACTION_MAX_TIMEOUT_MS: u32 = floe_engine::txn::TRANSACTION_MAX_TIMEOUT_MS as u32;
pub const TRANSACTIONAL_ID_EXPIRATION_MS: u64 =
    floe_engine::transactions::TRANSACTIONAL_ID_EXPIRATION_MS as u64;
pub const MULTIPART_ABORT_AFTER_SECS: u64 = 86_400;
/// Archive objects of about 64 MiB: few GETs per GiB read, and a whole
/// object per retention step.
pub const ARCHIVE_TARGET_BYTES: u64 = 64 << 20;
/// A slow partition's batches stay in intake segments at most about ten
/// minutes.
pub const ARCHIVE_MAX_AGE_SECS: u64 = 600;
/// Memory for one compaction pass's key map: about 40 bytes a key, so
/// 1.6 million keys; a pass over more dirty keys goes in several.
pub const COMPACTION_KEY_MAP_BYTES: u64 = 64 << 20;

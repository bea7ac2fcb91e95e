//! `floe` command line and configuration: CLI flags override `FLOE_*`
//! environment variables, which override the TOML file, which overrides
//! the defaults ([`defaults`], the one place they are written).
//!
//! - [`cli`]: the command tree;
//! - this module: `floe serve`'s settings and their precedence;
//! - [`listeners`]: the listener grammar;
//! - [`security`]: the TLS and SASL files the listeners need.

mod cli;
pub mod defaults;
mod listeners;
mod security;

use std::path::PathBuf;

use clap::Args;
use floe_net::listener::Listener;
use serde::Deserialize;

pub use cli::{Cli, Command};
#[cfg(test)]
use floe_net::listener::SecurityProtocol;
#[cfg(test)]
use listeners::{machine_host_name, SHORTHAND_LISTENER};
use listeners::{resolve_listeners, ListenerSpec};
use security::resolve_security;

/// Every setting of `floe serve`. Each flag also reads a `FLOE_*`
/// environment variable and a key of the same name (with underscores) in
/// the `--config` TOML file.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML configuration file; flags and FLOE_* variables override it.
    #[arg(long, env = "FLOE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory for the embedded defaults: the local object store
    /// (DIR/objects) and the embedded metadata (DIR/meta.redb).
    /// [default: ./floe-data]
    #[arg(long, env = "FLOE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Kafka listener address. [default: 127.0.0.1:9092]
    #[arg(long, env = "FLOE_LISTEN")]
    pub listen: Option<String>,
    /// Address clients are told to connect to (host:port).
    /// [default: the listen address; its port with "localhost" when listening on 0.0.0.0]
    #[arg(long, env = "FLOE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Named Kafka listeners, comma-separated `NAME://BIND_HOST:PORT`, e.g.
    /// `internal://0.0.0.0:9092,external://0.0.0.0:9094`. Names are
    /// case-insensitive. `--listen` adds one more, named `plaintext`.
    /// [default: plaintext://127.0.0.1:9092 when neither is given]
    #[arg(long, env = "FLOE_LISTENERS")]
    pub listeners: Option<String>,
    /// What each listener advertises to clients that came in on it,
    /// comma-separated `NAME://HOST:PORT` (e.g. a load balancer's name and
    /// port). [default: the bind address; the host name when bound to 0.0.0.0]
    #[arg(long, env = "FLOE_ADVERTISED_LISTENERS")]
    pub advertised_listeners: Option<String>,
    /// Security protocol of each listener, comma-separated `NAME:PROTOCOL`
    /// (Kafka's spelling): PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    /// [default: PLAINTEXT, or the listener's name when it is a protocol's]
    #[arg(long, env = "FLOE_LISTENER_SECURITY_PROTOCOL_MAP")]
    pub listener_security_protocol_map: Option<String>,
    /// PEM certificate chain of SSL and SASL_SSL listeners (server
    /// certificate first). [default: none; required by those listeners]
    #[arg(long, env = "FLOE_SSL_CERT_FILE")]
    pub ssl_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --ssl-cert-file. [default: none]
    #[arg(long, env = "FLOE_SSL_KEY_FILE")]
    pub ssl_key_file: Option<PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to.
    /// [default: none]
    #[arg(long, env = "FLOE_SSL_CLIENT_CA_FILE")]
    pub ssl_client_ca_file: Option<PathBuf>,
    /// Client certificates on SSL listeners (Kafka's ssl.client.auth):
    /// none, requested or required (mutual TLS). SASL_SSL listeners never
    /// ask for one. [default: none]
    #[arg(long, env = "FLOE_SSL_CLIENT_AUTH")]
    pub ssl_client_auth: Option<String>,
    /// SASL/PLAIN users of SASL_PLAINTEXT and SASL_SSL listeners: a file of
    /// `user:password` lines (`#` comments). Keep it readable by floe only.
    /// PLAIN also accepts the password of a user's stored SCRAM
    /// credentials (`floe users set`). [default: none]
    #[arg(long, env = "FLOE_SASL_USERS_FILE")]
    pub sasl_users_file: Option<PathBuf>,
    /// The SASL mechanisms SASL listeners offer (Kafka's
    /// sasl.enabled.mechanisms), comma-separated, of PLAIN, SCRAM-SHA-256
    /// and SCRAM-SHA-512. [default: PLAIN,SCRAM-SHA-256,SCRAM-SHA-512]
    #[arg(long, env = "FLOE_SASL_ENABLED_MECHANISMS")]
    pub sasl_enabled_mechanisms: Option<String>,
    /// How a client certificate's subject DN (RFC 2253) becomes the
    /// principal's name: Kafka's `ssl.principal.mapping.rules`,
    /// `RULE:pattern/replacement/[LU]` and `DEFAULT`, comma-separated, the
    /// first match wins (no match: the connection is refused).
    /// [default: DEFAULT, the whole DN]
    #[arg(long, env = "FLOE_SSL_PRINCIPAL_MAPPING_RULES")]
    pub ssl_principal_mapping_rules: Option<String>,
    /// One listener's own setting, Kafka-style:
    /// `listener.name.NAME.KEY=VALUE`, KEY `sasl.enabled.mechanisms`,
    /// `ssl.client.auth`, `ssl.principal.mapping.rules`, `ssl.cert.file`,
    /// `ssl.key.file` or `ssl.client.ca.file`. Repeat the flag (`;`
    /// between them in the environment variable). [default: none]
    #[arg(long, env = "FLOE_LISTENER_CONFIG", value_delimiter = ';')]
    pub listener_config: Option<Vec<String>>,
    /// OAUTHBEARER: where the JWK set that signs tokens is, `file:///PATH`
    /// (re-read when it changes) or `https://…` (fetched every 5 minutes).
    /// Setting it enables OAUTHBEARER. [default: none]
    #[arg(long, env = "FLOE_SASL_OAUTHBEARER_JWKS_ENDPOINT_URL")]
    pub sasl_oauthbearer_jwks_endpoint_url: Option<String>,
    /// OAUTHBEARER: the `iss` a token must carry. [default: any]
    #[arg(long, env = "FLOE_SASL_OAUTHBEARER_EXPECTED_ISSUER")]
    pub sasl_oauthbearer_expected_issuer: Option<String>,
    /// OAUTHBEARER: audiences a token's `aud` must include one of,
    /// comma-separated. [default: any]
    #[arg(long, env = "FLOE_SASL_OAUTHBEARER_EXPECTED_AUDIENCE")]
    pub sasl_oauthbearer_expected_audience: Option<String>,
    /// OAUTHBEARER: the claim that names the principal. [default: sub]
    #[arg(long, env = "FLOE_SASL_OAUTHBEARER_SUB_CLAIM_NAME")]
    pub sasl_oauthbearer_sub_claim_name: Option<String>,
    /// A client connection with no request read and no answer owed for
    /// this long is closed (Kafka's `connections.max.idle.ms`); 0: never.
    /// [default: 600000]
    #[arg(long, env = "FLOE_CONNECTIONS_MAX_IDLE_MS")]
    pub connections_max_idle_ms: Option<u64>,
    /// Delay before a failed SASL authentication is answered and its
    /// connection closed (Kafka's `connection.failed.authentication.delay.ms`).
    /// [default: 100]
    #[arg(long, env = "FLOE_SASL_FAILED_AUTHENTICATION_DELAY_MS")]
    pub sasl_failed_authentication_delay_ms: Option<u64>,
    /// Failed SASL authentications one client address may make per minute;
    /// past it, its attempts are refused unchecked until the minute ends.
    /// 0: no limit. [default: 10]
    #[arg(long, env = "FLOE_SASL_MAX_FAILED_AUTHENTICATIONS")]
    pub sasl_max_failed_authentications: Option<u32>,
    /// Authorization: `acl` enforces Kafka ACLs (CreateAcls, `kafka-acls`)
    /// on every request; `none` lets every client do everything.
    /// [default: none]
    #[arg(long, env = "FLOE_AUTHORIZER")]
    pub authorizer: Option<String>,
    /// Principals allowed everything whatever the ACLs say, e.g.
    /// `User:admin;User:ops` (`;` or `,` between them). Needs
    /// `--authorizer acl`. [default: none]
    #[arg(long, env = "FLOE_SUPER_USERS")]
    pub super_users: Option<String>,
    /// With `--authorizer acl`: allow an action on a resource that no ACL
    /// names (Kafka's `allow.everyone.if.no.acl.found`). [default: false]
    #[arg(long, env = "FLOE_ALLOW_EVERYONE_IF_NO_ACL_FOUND")]
    pub allow_everyone_if_no_acl_found: Option<bool>,
    /// HTTP address for /metrics, /healthz and /readyz. [default: 127.0.0.1:9644]
    #[arg(long, env = "FLOE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Shards (one pinned thread each). [default: the CPUs the process may
    /// use, bounded by the cgroup CPU quota]
    #[arg(long, env = "FLOE_SHARDS")]
    pub shards: Option<usize>,
    /// Seal a segment this many milliseconds after its first batch. [default: 100]
    #[arg(long, env = "FLOE_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// Seal a segment once it holds this many bytes. [default: 8388608]
    #[arg(long, env = "FLOE_FLUSH_BYTES")]
    pub flush_bytes: Option<usize>,
    /// Object store URL: file://DIR, s3://BUCKET[/PREFIX] or memory://.
    /// [default: file://DATA_DIR/objects]
    #[arg(long, env = "FLOE_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// S3-compatible endpoint URL (http://HOST:PORT); implies path-style
    /// addressing and allows plain HTTP. [default: AWS, or AWS_ENDPOINT]
    #[arg(long, env = "FLOE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region. [default: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1]
    #[arg(long, env = "FLOE_S3_REGION")]
    pub s3_region: Option<String>,
    /// The bucket is an S3 Express One Zone directory bucket. [default: false]
    #[arg(long, env = "FLOE_S3_EXPRESS")]
    pub s3_express: Option<bool>,
    /// Size of each part of a multipart upload (at least 5 MiB). [default: 8388608 (tuning)]
    #[arg(long, env = "FLOE_UPLOAD_PART_BYTES")]
    pub upload_part_bytes: Option<usize>,
    /// Parts of one segment upload in flight at once.
    /// [default: from the memory budget (tuning), 1 to 8]
    #[arg(long, env = "FLOE_UPLOAD_CONCURRENCY")]
    pub upload_concurrency: Option<usize>,
    /// Segments larger than this are uploaded in parts. [default: 16777216]
    #[arg(long, env = "FLOE_MULTIPART_THRESHOLD_BYTES")]
    pub multipart_threshold_bytes: Option<usize>,
    /// Start a second identical ranged read when the first's response has
    /// not begun after this many milliseconds (at most one read in twenty,
    /// after a burst of ten); 0 disables hedging. [default: 250]
    #[arg(long, env = "FLOE_READ_HEDGE_MS")]
    pub read_hedge_ms: Option<u64>,
    /// How often the cleanup owner (the live broker with the lowest node
    /// id) applies retention and deletes unreferenced objects. [default: 60]
    #[arg(long, env = "FLOE_CLEANUP_INTERVAL_SECS")]
    pub cleanup_interval_secs: Option<u64>,
    /// A segment is deleted this long after retention released its last
    /// batch, so fetches that already located it can finish. [default: 60]
    #[arg(long, env = "FLOE_DELETE_GRACE_SECS")]
    pub delete_grace_secs: Option<u64>,
    /// An object under segments/ that the commit log never referenced (an
    /// upload whose commit never landed) is deleted once this old. [default: 3600]
    #[arg(long, env = "FLOE_ORPHAN_GRACE_SECS")]
    pub orphan_grace_secs: Option<u64>,
    /// How often the bucket is listed for orphans and old snapshots. [default: 600]
    #[arg(long, env = "FLOE_ORPHAN_SWEEP_INTERVAL_SECS")]
    pub orphan_sweep_interval_secs: Option<u64>,
    /// An idempotent producer id silent this long is forgotten (Kafka's
    /// producer.id.expiration.ms). Carried in each commit-log entry, so all
    /// brokers expire the same producers; set it the same everywhere.
    /// [default: 86400000]
    #[arg(long, env = "FLOE_PRODUCER_ID_EXPIRATION_MS")]
    pub producer_id_expiration_ms: Option<u64>,
    /// The longest transaction.timeout.ms a transactional producer may ask
    /// for (Kafka's transaction.max.timeout.ms). [default: 900000]
    #[arg(long, env = "FLOE_TRANSACTION_MAX_TIMEOUT_MS")]
    pub transaction_max_timeout_ms: Option<u32>,
    /// A transactional id idle this long is forgotten (Kafka's
    /// transactional.id.expiration.ms). [default: 604800000]
    #[arg(long, env = "FLOE_TRANSACTIONAL_ID_EXPIRATION_MS")]
    pub transactional_id_expiration_ms: Option<u64>,
    /// A partition's committed batches are rewritten into archive objects
    /// of about this many bytes, one partition each (its reads then cost
    /// one GET per fetch, and its retention deletes whole objects); 0 turns
    /// archiving off. [default: 67108864]
    #[arg(long, env = "FLOE_ARCHIVE_TARGET_BYTES")]
    pub archive_target_bytes: Option<u64>,
    /// A partition with less than the target waiting is archived once its
    /// oldest batch not yet archived has waited this long. [default: 600]
    #[arg(long, env = "FLOE_ARCHIVE_MAX_AGE_SECS")]
    pub archive_max_age_secs: Option<u64>,
    /// Memory for the key map of one compaction pass over a compacted
    /// topic's partition (about 40 bytes a key); when the dirty keys do
    /// not fit, the partition is compacted in several passes.
    /// Compaction works on archive objects, so it needs archiving on.
    /// [default: 67108864]
    #[arg(long, env = "FLOE_COMPACTION_KEY_MAP_BYTES")]
    pub compaction_key_map_bytes: Option<u64>,
    /// A snapshot of the commit log's state is written every this many
    /// entries. [default: 500]
    #[arg(long, env = "FLOE_SNAPSHOT_EVERY_ENTRIES")]
    pub snapshot_every_entries: Option<u64>,
    /// Log entries kept behind the newest snapshot; older ones are deleted
    /// from the metadata store. A broker further behind reloads the
    /// snapshot in place. At least the snapshot interval. [default: 1000]
    #[arg(long, env = "FLOE_LOG_KEEP_ENTRIES")]
    pub log_keep_entries: Option<u64>,
    /// S3: multipart uploads under the prefix started longer ago than this
    /// are aborted by the sweep. [default: 86400]
    #[arg(long, env = "FLOE_MULTIPART_ABORT_AFTER_SECS")]
    pub multipart_abort_after_secs: Option<u64>,
    /// TESTING ONLY: inject faults into object-store requests, e.g.
    /// `seed=1,errors=0.2,lost_replies=0.05,latency=0.3,latency_max_ms=100,truncate=0.1`.
    /// [default: none]
    #[arg(long, env = "FLOE_OBJECT_STORE_FAULTS")]
    pub object_store_faults: Option<String>,
    /// This broker's node id, unique in the cluster.
    /// [default: allocated from the metadata store and remembered in DATA_DIR/node-id]
    #[arg(long, env = "FLOE_NODE_ID")]
    pub node_id: Option<i32>,
    /// Metadata store: `embedded` (a redb file in the data dir),
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`, or `etcds://…` for etcd
    /// over TLS. [default: embedded]
    #[arg(long, env = "FLOE_META")]
    pub meta: Option<String>,
    /// The CA (PEM) that signed etcd's server certificate; required by
    /// `etcds://`. [default: none]
    #[arg(long, env = "FLOE_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's `--client-cert-auth`, with
    /// --etcd-key-file. [default: none]
    #[arg(long, env = "FLOE_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM). [default: none]
    #[arg(long, env = "FLOE_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// An etcd user, when etcd's authentication is on; the password comes
    /// from --etcd-password-file. [default: none]
    #[arg(long, env = "FLOE_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (one trailing newline is
    /// dropped): a credentials file of systemd, a Secret's file in
    /// Kubernetes. [default: none]
    #[arg(long, env = "FLOE_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// This broker's availability zone, registered with it. [default: none]
    #[arg(long, env = "FLOE_ZONE")]
    pub zone: Option<String>,
    /// A file holding this broker's zone (whitespace trimmed), read at
    /// start-up when --zone is not given: the Helm chart's init container
    /// writes the node's topology.kubernetes.io/zone label there. [default: none]
    #[arg(long, env = "FLOE_ZONE_FILE")]
    pub zone_file: Option<PathBuf>,
    /// This broker's agent group, registered with it. [default: default]
    #[arg(long, env = "FLOE_GROUP")]
    pub group: Option<String>,
    /// Seconds after which a broker that stopped renewing its registration
    /// is considered gone. [default: 10]
    #[arg(long, env = "FLOE_LEASE_TTL_SECS")]
    pub lease_ttl_secs: Option<u64>,
    /// Seconds Metadata keeps listing a broker that left the cluster, as
    /// leader of nothing and coordinator of nothing, so that clients keep
    /// their handle for a broker that is away for a moment (0: drop it at
    /// once). [default: 900]
    #[arg(long, env = "FLOE_DEPARTED_BROKER_LISTING_SECS")]
    pub departed_broker_listing_secs: Option<u64>,
    /// Create unknown topics when a client asks for their metadata
    /// (Kafka's auto.create.topics.enable). [default: true]
    #[arg(long, env = "FLOE_AUTO_CREATE_TOPICS")]
    pub auto_create_topics: Option<bool>,
    /// Partitions of auto-created topics (Kafka's num.partitions). [default: 1]
    #[arg(long, env = "FLOE_NUM_PARTITIONS")]
    pub num_partitions: Option<u32>,
    /// Largest request frame accepted (Kafka's socket.request.max.bytes). [default: 104857600]
    #[arg(long, env = "FLOE_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Default max.message.bytes of topics (Kafka's message.max.bytes). [default: 1048588]
    #[arg(long, env = "FLOE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Per shard: request bytes admitted but not yet answered; past it the
    /// shard stops reading sockets. [default: a quarter of the shard's
    /// budgeted memory (tuning: 768 MiB at 4 GiB per shard)]
    #[arg(long, env = "FLOE_INFLIGHT_BYTES")]
    pub inflight_bytes: Option<usize>,
    /// Per shard: bytes of recent batches kept in memory for fetches.
    /// [default: half of the shard's budgeted memory (tuning: 1536 MiB at 4 GiB per shard)]
    #[arg(long, env = "FLOE_READ_CACHE_BYTES")]
    pub read_cache_bytes: Option<usize>,
    /// Longest a fetch may wait for data, whatever the client asks. [default: 30000]
    #[arg(long, env = "FLOE_FETCH_WAIT_MS_MAX")]
    pub fetch_wait_ms_max: Option<u64>,
    /// Incremental fetch sessions (KIP-227) the broker keeps; 0 declines
    /// them (Kafka's max.incremental.fetch.session.cache.slots). [default: 1000]
    #[arg(long, env = "FLOE_MAX_INCREMENTAL_FETCH_SESSION_CACHE_SLOTS")]
    pub max_incremental_fetch_session_cache_slots: Option<usize>,
    /// How long a fetch session must have been idle before a new one may
    /// evict it (Kafka's min.incremental.fetch.session.eviction.ms). [default: 120000]
    #[arg(long, env = "FLOE_MIN_INCREMENTAL_FETCH_SESSION_EVICTION_MS")]
    pub min_incremental_fetch_session_eviction_ms: Option<u64>,
    /// A consumer-protocol (KIP-848) group member silent this long is
    /// removed (Kafka's group.consumer.session.timeout.ms). [default: 45000]
    #[arg(long, env = "FLOE_GROUP_CONSUMER_SESSION_TIMEOUT_MS")]
    pub group_consumer_session_timeout_ms: Option<u64>,
    /// How often consumer-protocol members heartbeat (Kafka's
    /// group.consumer.heartbeat.interval.ms). [default: 5000]
    #[arg(long, env = "FLOE_GROUP_CONSUMER_HEARTBEAT_INTERVAL_MS")]
    pub group_consumer_heartbeat_interval_ms: Option<u64>,
    /// Log filter (tracing's EnvFilter syntax). [default: info]
    #[arg(long, env = "FLOE_LOG")]
    pub log: Option<String>,
}

/// Settings after merging flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub data_dir: PathBuf,
    /// Every Kafka listener; never empty. The first one's bind and
    /// advertised addresses are also in `listen` / `advertise_*`.
    pub listeners: Vec<Listener>,
    /// Users file of SASL listeners (set when one exists).
    pub sasl_users_file: Option<PathBuf>,
    /// The mechanisms SASL listeners offer (empty when there is none).
    pub sasl_mechanisms: Vec<floe_net::sasl::Mechanism>,
    /// OAUTHBEARER's token checks (set when it is enabled).
    pub oauth: Option<floe_net::oauth::OAuthConfig>,
    /// Client certificate DN → principal name (`--ssl-principal-mapping-rules`).
    pub ssl_principal_mapping_rules: std::sync::Arc<floe_net::principal::MappingRules>,
    pub connections_max_idle_ms: u64,
    pub sasl_failed_authentication_delay_ms: u64,
    pub sasl_max_failed_authentications: u32,
    /// `--authorizer acl` and its settings (None: no authorization).
    pub authorizer: Option<floe_net::authz::AuthzConfig>,
    /// Listeners' own settings (`--listener-config`), by listener name.
    pub listener_overrides: std::collections::HashMap<String, floe_net::server::ListenerOverrides>,
    pub listen: String,
    pub advertise_host: String,
    pub advertise_port: u16,
    pub admin_listen: String,
    pub shards: usize,
    pub flush_interval_ms: u64,
    pub flush_bytes: usize,
    pub object_store: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_express: bool,
    pub upload_part_bytes: usize,
    pub upload_concurrency: usize,
    pub multipart_threshold_bytes: usize,
    pub read_hedge_ms: u64,
    pub cleanup_interval_secs: u64,
    pub delete_grace_secs: u64,
    pub orphan_grace_secs: u64,
    pub orphan_sweep_interval_secs: u64,
    pub producer_id_expiration_ms: u64,
    pub transaction_max_timeout_ms: u32,
    pub transactional_id_expiration_ms: u64,
    pub archive_target_bytes: u64,
    pub archive_max_age_secs: u64,
    pub compaction_key_map_bytes: u64,
    pub snapshot_every_entries: u64,
    pub log_keep_entries: u64,
    pub multipart_abort_after_secs: u64,
    pub object_store_faults: Option<String>,
    /// `None`: allocate one (or reuse the one remembered in the data dir).
    pub node_id: Option<i32>,
    pub meta: String,
    /// TLS files and credentials for etcd (all `None` for other stores).
    pub etcd: EtcdFiles,
    pub zone: String,
    pub group: String,
    pub lease_ttl_secs: u64,
    pub departed_broker_listing_secs: u64,
    pub auto_create_topics: bool,
    pub num_partitions: u32,
    pub max_request_bytes: usize,
    pub max_message_bytes: usize,
    pub inflight_bytes: usize,
    pub read_cache_bytes: usize,
    pub fetch_wait_ms_max: u64,
    pub max_incremental_fetch_session_cache_slots: usize,
    pub min_incremental_fetch_session_eviction_ms: u64,
    pub group_consumer_session_timeout_ms: u64,
    pub group_consumer_heartbeat_interval_ms: u64,
    pub log: String,
    /// The tuning model's choices, printed at start-up; the fields above
    /// that were not set explicitly come from it.
    pub budgets: floe_tuning::Budgets,
}

/// Most shards accepted: more than this is a configuration mistake.
pub const SHARDS_MAX: usize = 256;

pub(super) fn split_host_port(addr: &str, what: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("{what} {addr:?} must be HOST:PORT"))?;
    let port = port
        .parse()
        .map_err(|_| anyhow::anyhow!("{what} {addr:?}: port {port:?} is not a number"))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// The zone written in `path` (empty without a file).
fn zone_from_file(path: Option<&PathBuf>) -> anyhow::Result<String> {
    let Some(path) = path else {
        return Ok(String::new());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--zone-file {}: {e}", path.display()))?;
    Ok(text.trim().to_string())
}

impl ServeArgs {
    pub fn resolve(self) -> anyhow::Result<Resolved> {
        let file: ServeArgs = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        macro_rules! pick {
            ($f:ident, $default:expr) => {
                self.$f
                    .clone()
                    .or(file.$f.clone())
                    .unwrap_or_else(|| $default)
            };
        }
        let data_dir = pick!(data_dir, PathBuf::from(defaults::DATA_DIR));
        let listeners = resolve_listeners(&ListenerSpec {
            listen: self.listen.clone().or(file.listen.clone()),
            advertise: self.advertise.clone().or(file.advertise.clone()),
            listeners: self.listeners.clone().or(file.listeners.clone()),
            advertised: self
                .advertised_listeners
                .clone()
                .or(file.advertised_listeners.clone()),
            protocols: self
                .listener_security_protocol_map
                .clone()
                .or(file.listener_security_protocol_map.clone()),
        })?;
        let security::Security {
            sasl_users_file,
            sasl_mechanisms,
            oauth,
            listener_overrides,
            ssl_principal_mapping_rules,
            authorizer,
        } = resolve_security(&listeners, &self, &file)?;
        let listen = listeners[0].bind.clone();
        let (advertise_host, advertise_port) = (
            listeners[0].advertised_host.clone(),
            listeners[0].advertised_port,
        );
        let budgets = floe_tuning::Budgets::from_limits(&floe_tuning::Limits::read());
        let shards = pick!(shards, budgets.shards);
        if shards == 0 || shards > SHARDS_MAX {
            anyhow::bail!("--shards {shards} must be between 1 and {SHARDS_MAX}");
        }
        let flush_interval_ms = pick!(flush_interval_ms, defaults::FLUSH_INTERVAL_MS);
        if flush_interval_ms == 0 || flush_interval_ms > 60_000 {
            anyhow::bail!("--flush-interval-ms {flush_interval_ms} must be between 1 and 60000");
        }
        let flush_bytes = pick!(flush_bytes, defaults::FLUSH_BYTES);
        if flush_bytes < 1024 {
            anyhow::bail!("--flush-bytes {flush_bytes} must be at least 1024");
        }
        let object_store = pick!(
            object_store,
            format!("file://{}", data_dir.join("objects").display())
        );
        let s3_defaults = floe_objstore::S3Options::default();
        let s3_endpoint = self.s3_endpoint.clone().or(file.s3_endpoint.clone());
        let s3_region = self.s3_region.clone().or(file.s3_region.clone());
        let s3_express = pick!(s3_express, s3_defaults.express);
        let upload_part_bytes = pick!(upload_part_bytes, budgets.upload_part_bytes);
        let upload_concurrency = pick!(upload_concurrency, budgets.upload_concurrency);
        let multipart_threshold_bytes = pick!(
            multipart_threshold_bytes,
            s3_defaults.multipart_threshold_bytes
        );
        let read_hedge_ms = pick!(
            read_hedge_ms,
            s3_defaults.hedge_after.map_or(0, |d| d.as_millis() as u64)
        );
        let max_request_bytes = pick!(max_request_bytes, defaults::MAX_REQUEST_BYTES);
        let inflight_bytes = pick!(inflight_bytes, budgets.inflight_bytes);
        if inflight_bytes < 1 << 20 {
            anyhow::bail!("--inflight-bytes {inflight_bytes} must be at least 1 MiB");
        }
        let meta = pick!(meta, defaults::META.to_string());
        let resolved = Resolved {
            admin_listen: pick!(admin_listen, defaults::ADMIN_LISTEN.to_string()),
            node_id: self.node_id.or(file.node_id),
            meta: meta.clone(),
            etcd: etcd_files(&meta, &self, &file)?,
            zone: match self.zone.clone().or(file.zone.clone()) {
                Some(z) => z,
                None => zone_from_file(self.zone_file.as_ref().or(file.zone_file.as_ref()))?,
            },
            group: pick!(group, defaults::GROUP.to_string()),
            lease_ttl_secs: pick!(lease_ttl_secs, defaults::LEASE_TTL_SECS).clamp(2, 300),
            departed_broker_listing_secs: pick!(
                departed_broker_listing_secs,
                defaults::DEPARTED_BROKER_LISTING_SECS
            ),
            auto_create_topics: pick!(auto_create_topics, defaults::AUTO_CREATE_TOPICS),
            num_partitions: pick!(num_partitions, defaults::NUM_PARTITIONS).max(1),
            max_message_bytes: pick!(max_message_bytes, defaults::MAX_MESSAGE_BYTES),
            read_cache_bytes: pick!(read_cache_bytes, budgets.read_cache_bytes),
            fetch_wait_ms_max: pick!(fetch_wait_ms_max, defaults::FETCH_WAIT_MS_MAX),
            max_incremental_fetch_session_cache_slots: pick!(
                max_incremental_fetch_session_cache_slots,
                defaults::MAX_INCREMENTAL_FETCH_SESSION_CACHE_SLOTS
            ),
            min_incremental_fetch_session_eviction_ms: pick!(
                min_incremental_fetch_session_eviction_ms,
                defaults::MIN_INCREMENTAL_FETCH_SESSION_EVICTION_MS
            ),
            group_consumer_session_timeout_ms: pick!(
                group_consumer_session_timeout_ms,
                defaults::GROUP_CONSUMER_SESSION_TIMEOUT_MS
            )
            .clamp(1_000, 1_800_000),
            group_consumer_heartbeat_interval_ms: pick!(
                group_consumer_heartbeat_interval_ms,
                defaults::GROUP_CONSUMER_HEARTBEAT_INTERVAL_MS
            )
            .clamp(100, 600_000),
            connections_max_idle_ms: pick!(
                connections_max_idle_ms,
                defaults::CONNECTIONS_MAX_IDLE_MS
            ),
            sasl_failed_authentication_delay_ms: pick!(
                sasl_failed_authentication_delay_ms,
                defaults::SASL_FAILED_AUTHENTICATION_DELAY_MS
            ),
            sasl_max_failed_authentications: pick!(
                sasl_max_failed_authentications,
                defaults::SASL_MAX_FAILED_AUTHENTICATIONS
            ),
            log: pick!(log, defaults::LOG.to_string()),
            data_dir,
            listeners,
            sasl_users_file,
            sasl_mechanisms,
            oauth,
            listener_overrides,
            ssl_principal_mapping_rules,
            authorizer,
            listen,
            advertise_host,
            advertise_port,
            shards,
            flush_interval_ms,
            flush_bytes,
            object_store,
            s3_endpoint,
            s3_region,
            s3_express,
            upload_part_bytes,
            upload_concurrency,
            multipart_threshold_bytes,
            read_hedge_ms,
            cleanup_interval_secs: pick!(cleanup_interval_secs, defaults::CLEANUP_INTERVAL_SECS)
                .max(1),
            delete_grace_secs: pick!(delete_grace_secs, defaults::DELETE_GRACE_SECS),
            orphan_grace_secs: pick!(orphan_grace_secs, defaults::ORPHAN_GRACE_SECS),
            producer_id_expiration_ms: pick!(
                producer_id_expiration_ms,
                defaults::PRODUCER_ID_EXPIRATION_MS
            )
            .max(1),
            transaction_max_timeout_ms: pick!(
                transaction_max_timeout_ms,
                defaults::TRANSACTION_MAX_TIMEOUT_MS
            )
            .clamp(1, i32::MAX as u32),
            transactional_id_expiration_ms: pick!(
                transactional_id_expiration_ms,
                defaults::TRANSACTIONAL_ID_EXPIRATION_MS
            )
            .clamp(1, i64::MAX as u64),
            archive_target_bytes: pick!(archive_target_bytes, defaults::ARCHIVE_TARGET_BYTES),
            archive_max_age_secs: pick!(archive_max_age_secs, defaults::ARCHIVE_MAX_AGE_SECS)
                .max(1),
            compaction_key_map_bytes: pick!(
                compaction_key_map_bytes,
                defaults::COMPACTION_KEY_MAP_BYTES
            )
            .max(1 << 20),
            snapshot_every_entries: pick!(snapshot_every_entries, defaults::SNAPSHOT_EVERY_ENTRIES)
                .max(1),
            log_keep_entries: pick!(log_keep_entries, defaults::LOG_KEEP_ENTRIES).max(1),
            orphan_sweep_interval_secs: pick!(
                orphan_sweep_interval_secs,
                defaults::ORPHAN_SWEEP_INTERVAL_SECS
            )
            .max(1),
            multipart_abort_after_secs: pick!(
                multipart_abort_after_secs,
                defaults::MULTIPART_ABORT_AFTER_SECS
            ),
            object_store_faults: self
                .object_store_faults
                .clone()
                .or(file.object_store_faults.clone()),
            max_request_bytes,
            inflight_bytes,
            budgets,
        };
        resolved
            .object_store_options()
            .validate()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(resolved)
    }
}

/// A secret read from a file, without the one newline editors add.
pub fn without_final_newline(text: &str) -> &str {
    text.strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(text)
}

/// Where floe's etcd TLS files and credentials are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<PathBuf>,
}

/// The etcd settings, checked against the metadata URL: TLS files only
/// with `etcds://` (which needs the CA), a certificate with its key, a
/// user with its password file.
fn etcd_files(meta: &str, flags: &ServeArgs, file: &ServeArgs) -> anyhow::Result<EtcdFiles> {
    macro_rules! given {
        ($f:ident) => {
            flags.$f.clone().or(file.$f.clone())
        };
    }
    let f = EtcdFiles {
        ca: given!(etcd_ca_file),
        cert: given!(etcd_cert_file),
        key: given!(etcd_key_file),
        user: given!(etcd_user),
        password: given!(etcd_password_file),
    };
    let tls = meta.starts_with("etcds://");
    let etcd = tls || meta.starts_with("etcd://");
    if !etcd && f != EtcdFiles::default() {
        anyhow::bail!("--etcd-* settings are given but --meta {meta:?} is not etcd");
    }
    if tls && f.ca.is_none() {
        anyhow::bail!(
            "--meta {meta:?} is TLS: give --etcd-ca-file (the CA that signed etcd's certificate)"
        );
    }
    if !tls && (f.ca.is_some() || f.cert.is_some() || f.key.is_some()) {
        anyhow::bail!(
            "--etcd-ca-file/--etcd-cert-file/--etcd-key-file need --meta etcds://… (TLS)"
        );
    }
    if f.cert.is_some() != f.key.is_some() {
        anyhow::bail!("--etcd-cert-file and --etcd-key-file go together");
    }
    if f.user.is_some() != f.password.is_some() {
        anyhow::bail!("--etcd-user and --etcd-password-file go together");
    }
    Ok(f)
}

impl Resolved {
    /// Reads the etcd TLS files and password named by the settings.
    pub fn etcd_security(&self) -> anyhow::Result<floe_meta::EtcdSecurity> {
        use anyhow::Context as _;
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
        };
        let e = &self.etcd;
        let ca_pem =
            e.ca.as_ref()
                .map(|p| read("--etcd-ca-file", p))
                .transpose()?;
        let client_pem = match (&e.cert, &e.key) {
            (Some(c), Some(k)) => Some((read("--etcd-cert-file", c)?, read("--etcd-key-file", k)?)),
            _ => None,
        };
        let user = match (&e.user, &e.password) {
            (Some(u), Some(p)) => {
                let text =
                    String::from_utf8(read("--etcd-password-file", p)?).with_context(|| {
                        format!("--etcd-password-file {} is not UTF-8", p.display())
                    })?;
                Some((u.clone(), without_final_newline(&text).to_string()))
            }
            _ => None,
        };
        Ok(floe_meta::EtcdSecurity {
            ca_pem,
            client_pem,
            user,
        })
    }

    /// The object-store settings (used by the S3 backend only).
    pub fn object_store_options(&self) -> floe_objstore::S3Options {
        floe_objstore::S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            express: self.s3_express,
            multipart_threshold_bytes: self.multipart_threshold_bytes,
            part_bytes: self.upload_part_bytes,
            part_concurrency: self.upload_concurrency,
            hedge_after: (self.read_hedge_ms > 0)
                .then(|| std::time::Duration::from_millis(self.read_hedge_ms)),
            ..floe_objstore::S3Options::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_over_file_over_default() {
        let dir = tempfile_dir();
        let path = dir.join("floe.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:19092\"\nflush_interval_ms = 50\nnum_partitions = 4\n",
        )
        .expect("write");
        let args = ServeArgs {
            config: Some(path),
            flush_interval_ms: Some(20),
            ..Default::default()
        };
        let r = args.resolve().expect("resolves");
        assert_eq!(r.listen, "127.0.0.1:19092");
        assert_eq!(r.flush_interval_ms, 20);
        assert_eq!(r.num_partitions, 4);
        assert_eq!(
            (r.advertise_host.as_str(), r.advertise_port),
            ("127.0.0.1", 19092)
        );
        assert_eq!(r.flush_bytes, 8 << 20);
    }

    #[test]
    fn rejects_bad_values_with_clear_messages() {
        let bad = ServeArgs {
            listen: Some("nope".into()),
            ..Default::default()
        };
        assert!(bad.resolve().unwrap_err().to_string().contains("HOST:PORT"));
        let bad = ServeArgs {
            shards: Some(0),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
        let wild = ServeArgs {
            listen: Some("0.0.0.0:9092".into()),
            ..Default::default()
        };
        assert_eq!(
            wild.resolve().expect("ok").advertise_host,
            machine_host_name()
        );
    }

    #[test]
    fn named_listeners_and_advertised_overrides() {
        let r = ServeArgs {
            listeners: Some("INTERNAL://0.0.0.0:9092, external://127.0.0.2:9094".into()),
            advertised_listeners: Some("External://lb.example.com:19094".into()),
            listener_security_protocol_map: Some("internal:PLAINTEXT,external:plaintext".into()),
            ..Default::default()
        }
        .resolve()
        .expect("resolves");
        let names: Vec<_> = r.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["internal", "external"]);
        assert_eq!(r.listeners[0].bind, "0.0.0.0:9092");
        assert_eq!(r.listeners[0].advertised_host, machine_host_name());
        assert_eq!(r.listeners[1].bind, "127.0.0.2:9094");
        assert_eq!(
            (
                r.listeners[1].advertised_host.as_str(),
                r.listeners[1].advertised_port
            ),
            ("lb.example.com", 19094)
        );
        assert_eq!(r.listen, "0.0.0.0:9092");

        // --listen adds the `plaintext` listener, first; --advertise is its.
        let r = ServeArgs {
            listen: Some("127.0.0.1:9092".into()),
            advertise: Some("proxy:1234".into()),
            listeners: Some("external://127.0.0.1:9094".into()),
            ..Default::default()
        }
        .resolve()
        .expect("resolves");
        assert_eq!(r.listeners.len(), 2);
        assert_eq!(r.listeners[0].name, SHORTHAND_LISTENER);
        assert_eq!(
            (r.advertise_host.as_str(), r.advertise_port),
            ("proxy", 1234)
        );
    }

    #[test]
    fn security_files_follow_the_listeners() {
        let r = ServeArgs {
            listeners: Some(
                "plain://127.0.0.1:1,tls://127.0.0.1:2,sasl://127.0.0.1:3,both://127.0.0.1:4"
                    .into(),
            ),
            listener_security_protocol_map: Some(
                "tls:SSL,sasl:SASL_PLAINTEXT,both:sasl_ssl".into(),
            ),
            ssl_cert_file: Some("c.pem".into()),
            ssl_key_file: Some("k.pem".into()),
            ssl_client_ca_file: Some("ca.pem".into()),
            ssl_client_auth: Some("Required".into()),
            sasl_users_file: Some("users".into()),
            ..Default::default()
        }
        .resolve()
        .expect("resolves");
        let protocols: Vec<_> = r.listeners.iter().map(|l| l.protocol).collect();
        assert_eq!(
            protocols,
            [
                SecurityProtocol::Plaintext,
                SecurityProtocol::Ssl,
                SecurityProtocol::SaslPlaintext,
                SecurityProtocol::SaslSsl
            ]
        );
        let tls = |n: &str| r.listener_overrides[n].tls.clone().expect("tls files");
        assert_eq!(tls("tls").client_auth, floe_net::tls::ClientAuth::Required);
        assert_eq!(tls("tls").client_ca, Some(PathBuf::from("ca.pem")));
        // SASL_SSL: the SASL login is the identity; no certificate asked.
        assert_eq!(tls("both").client_auth, floe_net::tls::ClientAuth::None);
        assert!(
            !r.listener_overrides.contains_key("plain")
                || r.listener_overrides["plain"].tls.is_none()
        );
        assert_eq!(r.sasl_users_file, Some(PathBuf::from("users")));

        // The same settings as TOML keys; a flag overrides the file.
        let dir = tempfile_dir();
        let path = dir.join("secure.toml");
        std::fs::write(
            &path,
            "listeners = \"sasl_ssl://127.0.0.1:1\"\nssl_cert_file = \"c.pem\"\n\
             ssl_key_file = \"k.pem\"\nsasl_users_file = \"users\"\n",
        )
        .expect("write");
        let r = ServeArgs {
            config: Some(path),
            sasl_users_file: Some("flag-users".into()),
            ..Default::default()
        }
        .resolve()
        .expect("resolves");
        assert_eq!(r.listeners[0].protocol, SecurityProtocol::SaslSsl);
        let tls = r.listener_overrides[&r.listeners[0].name].tls.clone();
        assert_eq!(tls.map(|t| t.cert), Some(PathBuf::from("c.pem")));
        assert_eq!(r.sasl_users_file, Some(PathBuf::from("flag-users")));
    }

    #[test]
    fn listener_overrides_are_checked() {
        let two = |entries: &[&str]| ServeArgs {
            listeners: Some("int://127.0.0.1:1,ext://127.0.0.1:2,tls://127.0.0.1:3".into()),
            listener_security_protocol_map: Some("int:SASL_PLAINTEXT,ext:SASL_SSL,tls:SSL".into()),
            ssl_cert_file: Some("c.pem".into()),
            ssl_key_file: Some("k.pem".into()),
            ssl_client_ca_file: Some("ca.pem".into()),
            listener_config: Some(entries.iter().map(|e| e.to_string()).collect()),
            ..Default::default()
        };
        let r = two(&[
            "listener.name.EXT.sasl.enabled.mechanisms=SCRAM-SHA-512",
            "listener.name.tls.ssl.client.auth=required",
            "listener.name.ext.ssl.client.auth=requested",
        ])
        .resolve()
        .expect("resolves");
        let ext = &r.listener_overrides["ext"];
        assert_eq!(
            ext.sasl_mechanisms.as_deref(),
            Some(
                &[floe_net::sasl::Mechanism::Scram(
                    floe_net::scram::Mechanism::Sha512
                )][..]
            )
        );
        assert_eq!(
            ext.ssl_client_auth,
            Some(floe_net::tls::ClientAuth::Requested)
        );
        assert_eq!(
            r.listener_overrides["tls"].ssl_client_auth,
            Some(floe_net::tls::ClientAuth::Required)
        );
        for (entry, says) in [
            (
                "listener.name.nope.ssl.client.auth=required",
                "no listener is named \"nope\"",
            ),
            (
                "listener.name.int.ssl.client.auth=required",
                "SASL_PLAINTEXT, which has no ssl.client.auth",
            ),
            (
                "listener.name.tls.sasl.enabled.mechanisms=PLAIN",
                "SSL, which has no sasl.enabled.mechanisms",
            ),
            (
                "listener.name.int.sasl.enabled.mechanisms=GSSAPI",
                "unknown SASL mechanism",
            ),
            (
                "listener.name.int.sasl.enabled.mechanisms=OAUTHBEARER",
                "--sasl-oauthbearer-jwks-endpoint-url",
            ),
            (
                "listener.name.tls.ssl.client.auth=maybe",
                "none, requested or required",
            ),
            (
                "listener.name.tls.ssl.keystore.location=x",
                "unknown setting",
            ),
            ("ssl.client.auth=required", "listener.name.NAME.KEY=VALUE"),
        ] {
            let e = two(&[entry]).resolve().unwrap_err().to_string();
            assert!(e.contains(says), "{entry}: {e}");
        }
        // A listener with its own certificate needs no broker-wide one.
        let r = ServeArgs {
            listeners: Some("a://127.0.0.1:1,b://127.0.0.1:2".into()),
            listener_security_protocol_map: Some("a:SSL,b:SSL".into()),
            listener_config: Some(vec![
                "listener.name.a.ssl.cert.file=a.pem".into(),
                "listener.name.a.ssl.key.file=a.key".into(),
                "listener.name.b.ssl.cert.file=b.pem".into(),
                "listener.name.b.ssl.key.file=b.key".into(),
                "listener.name.b.ssl.client.ca.file=ca.pem".into(),
                "listener.name.b.ssl.client.auth=required".into(),
            ]),
            ..Default::default()
        }
        .resolve()
        .expect("resolves");
        let tls = |n: &str| r.listener_overrides[n].tls.clone().expect("tls files");
        assert_eq!(tls("a").cert, PathBuf::from("a.pem"));
        assert_eq!(tls("a").client_auth, floe_net::tls::ClientAuth::None);
        assert_eq!(tls("b").client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(tls("b").client_auth, floe_net::tls::ClientAuth::Required);
        let e = ServeArgs {
            listeners: Some("a://127.0.0.1:1,b://127.0.0.1:2".into()),
            listener_security_protocol_map: Some("a:SSL,b:SSL".into()),
            listener_config: Some(vec![
                "listener.name.a.ssl.cert.file=a.pem".into(),
                "listener.name.a.ssl.key.file=a.key".into(),
            ]),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listener \"b\" is SSL") && e.contains("listener.name.b.ssl.cert.file"),
            "{e}"
        );
        let e = ServeArgs {
            ssl_client_ca_file: None,
            ..two(&["listener.name.ext.ssl.client.auth=required"])
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.contains("give --ssl-client-ca-file"), "{e}");
    }

    #[test]
    fn etcd_security_settings_are_checked() {
        let err = |a: ServeArgs| a.resolve().unwrap_err().to_string();
        let tls = || ServeArgs {
            meta: Some("etcds://127.0.0.1:2379/p".into()),
            etcd_ca_file: Some("ca.pem".into()),
            ..Default::default()
        };
        let r = tls().resolve().expect("resolves");
        assert_eq!(r.etcd.ca, Some(PathBuf::from("ca.pem")));
        let e = err(ServeArgs {
            etcd_ca_file: None,
            ..tls()
        });
        assert!(e.contains("--etcd-ca-file"), "{e}");
        let e = err(ServeArgs {
            meta: Some("etcd://127.0.0.1:2379".into()),
            ..tls()
        });
        assert!(e.contains("etcds://"), "{e}");
        let e = err(ServeArgs {
            etcd_cert_file: Some("c.pem".into()),
            ..tls()
        });
        assert!(e.contains("go together"), "{e}");
        let e = err(ServeArgs {
            etcd_user: Some("floe".into()),
            ..tls()
        });
        assert!(e.contains("--etcd-password-file"), "{e}");
        let e = err(ServeArgs {
            etcd_user: Some("floe".into()),
            ..Default::default()
        });
        assert!(e.contains("not etcd"), "{e}");
        // A user over plain etcd:// is fine, and the password file is read.
        let dir = tempfile_dir();
        let pw = dir.join("etcd.pw");
        std::fs::write(&pw, "s3cret\r\n").expect("write");
        let r = ServeArgs {
            meta: Some("etcd://127.0.0.1:2379".into()),
            etcd_user: Some("floe".into()),
            etcd_password_file: Some(pw),
            ..Default::default()
        }
        .resolve()
        .expect("resolves");
        let sec = r.etcd_security().expect("reads");
        assert_eq!(sec.user, Some(("floe".into(), "s3cret".into())));
        assert!(
            !format!("{sec:?}").contains("s3cret"),
            "Debug hides the password"
        );
    }

    #[test]
    fn listener_mistakes_are_refused_clearly() {
        let err = |a: ServeArgs| a.resolve().unwrap_err().to_string();
        let e = err(ServeArgs {
            listeners: Some("a://127.0.0.1:1,A://127.0.0.1:2".into()),
            ..Default::default()
        });
        assert!(e.contains("defined twice"), "{e}");
        let e = err(ServeArgs {
            listeners: Some("a://127.0.0.1:1".into()),
            advertised_listeners: Some("b://h:1".into()),
            ..Default::default()
        });
        assert!(e.contains("does not define"), "{e}");
        let e = err(ServeArgs {
            listeners: Some("127.0.0.1:1".into()),
            ..Default::default()
        });
        assert!(e.contains("NAME://HOST:PORT"), "{e}");
        let e = err(ServeArgs {
            listeners: Some("secure://127.0.0.1:1".into()),
            listener_security_protocol_map: Some("secure:SASL_SSL".into()),
            ..Default::default()
        });
        assert!(e.contains("give --ssl-cert-file"), "{e}");
        let e = err(ServeArgs {
            listeners: Some("ssl://127.0.0.1:1".into()),
            ..Default::default()
        });
        assert!(e.contains("SSL"), "{e}");
        let e = err(ServeArgs {
            listeners: Some("sasl_plaintext://127.0.0.1:1".into()),
            sasl_enabled_mechanisms: Some("PLAIN,GSSAPI".into()),
            ..Default::default()
        });
        assert!(e.contains("unknown SASL mechanism \"GSSAPI\""), "{e}");
        let e = err(ServeArgs {
            sasl_enabled_mechanisms: Some("PLAIN".into()),
            ..Default::default()
        });
        assert!(e.contains("no listener is SASL"), "{e}");
        // A SASL listener needs no users file: SCRAM's users are stored.
        let r = ServeArgs {
            listeners: Some("sasl_plaintext://127.0.0.1:1".into()),
            ..Default::default()
        }
        .resolve()
        .expect("resolves");
        assert_eq!(r.sasl_mechanisms.len(), 3);
        // OAUTHBEARER: the JWK set enables it, and is needed by it.
        let sasl = || ServeArgs {
            listeners: Some("sasl_plaintext://127.0.0.1:1".into()),
            ..Default::default()
        };
        let r = ServeArgs {
            sasl_oauthbearer_jwks_endpoint_url: Some("file:///etc/jwks.json".into()),
            sasl_oauthbearer_expected_audience: Some("a, b".into()),
            ..sasl()
        }
        .resolve()
        .expect("resolves");
        assert_eq!(r.sasl_mechanisms.len(), 4);
        let oauth = r.oauth.expect("oauth");
        assert_eq!(
            (oauth.audience, oauth.principal_claim.as_str()),
            (vec!["a".to_string(), "b".to_string()], "sub")
        );
        for (args, says) in [
            (
                ServeArgs {
                    sasl_enabled_mechanisms: Some("OAUTHBEARER".into()),
                    ..sasl()
                },
                "give --sasl-oauthbearer-jwks-endpoint-url",
            ),
            (
                ServeArgs {
                    sasl_oauthbearer_jwks_endpoint_url: Some("file:///j".into()),
                    sasl_enabled_mechanisms: Some("PLAIN".into()),
                    ..sasl()
                },
                "leaves OAUTHBEARER out",
            ),
            (
                ServeArgs {
                    sasl_oauthbearer_expected_issuer: Some("i".into()),
                    ..sasl()
                },
                "need --sasl-oauthbearer-jwks-endpoint-url",
            ),
            (
                ServeArgs {
                    sasl_oauthbearer_jwks_endpoint_url: Some("/etc/jwks.json".into()),
                    ..sasl()
                },
                "expected file:///PATH",
            ),
        ] {
            let e = err(args);
            assert!(e.contains(says), "{says}: {e}");
        }
        let e = err(ServeArgs {
            listeners: Some("ssl://127.0.0.1:1".into()),
            ssl_cert_file: Some("c.pem".into()),
            ssl_key_file: Some("k.pem".into()),
            ssl_client_auth: Some("required".into()),
            ..Default::default()
        });
        assert!(e.contains("--ssl-client-ca-file"), "{e}");
        let e = err(ServeArgs {
            ssl_cert_file: Some("c.pem".into()),
            ..Default::default()
        });
        assert!(e.contains("no listener is SSL"), "{e}");
        let e = err(ServeArgs {
            listeners: Some("a://127.0.0.1:1".into()),
            listener_security_protocol_map: Some("a:TLS".into()),
            ..Default::default()
        });
        assert!(e.contains("protocol must be"), "{e}");
    }

    #[test]
    fn object_store_options_from_flags_and_file() {
        let dir = tempfile_dir();
        let path = dir.join("s3.toml");
        std::fs::write(
            &path,
            "object_store = \"s3://b/p\"\ns3_endpoint = \"http://127.0.0.1:9000\"\nupload_concurrency = 2\n",
        )
        .expect("write");
        let r = ServeArgs {
            config: Some(path),
            read_hedge_ms: Some(0),
            upload_part_bytes: Some(6 << 20),
            ..Default::default()
        }
        .resolve()
        .expect("resolves");
        let o = r.object_store_options();
        assert_eq!(r.object_store, "s3://b/p");
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((o.part_bytes, o.part_concurrency), (6 << 20, 2));
        assert_eq!(o.hedge_after, None);
        assert_eq!(o.multipart_threshold_bytes, 16 << 20);
        let d = ServeArgs::default().resolve().expect("defaults");
        let o = d.object_store_options();
        assert_eq!(o.hedge_after, Some(std::time::Duration::from_millis(250)));
        assert_eq!(
            (o.part_bytes, o.part_concurrency),
            (d.budgets.upload_part_bytes, d.budgets.upload_concurrency)
        );
        assert_eq!(d.inflight_bytes, d.budgets.inflight_bytes);
        assert_eq!(d.read_cache_bytes, d.budgets.read_cache_bytes);
        assert_eq!(d.shards, d.budgets.shards);

        let small_parts = ServeArgs {
            upload_part_bytes: Some(1 << 20),
            ..Default::default()
        };
        let e = small_parts.resolve().unwrap_err().to_string();
        assert!(e.contains("S3's minimum part"), "{e}");
        let bad_endpoint = ServeArgs {
            s3_endpoint: Some("127.0.0.1:9000".into()),
            ..Default::default()
        };
        assert!(bad_endpoint.resolve().is_err());
    }

    #[test]
    fn zone_from_a_file_unless_given() {
        let dir = tempfile_dir();
        let path = dir.join("zone");
        std::fs::write(&path, "eu-west-1b\n").expect("write");
        let r = ServeArgs {
            zone_file: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(r.resolve().expect("resolves").zone, "eu-west-1b");
        let given = ServeArgs {
            zone: Some("z1".into()),
            zone_file: Some(path),
            ..Default::default()
        };
        assert_eq!(given.resolve().expect("resolves").zone, "z1");
        let missing = ServeArgs {
            zone_file: Some(dir.join("no-such-zone-file")),
            ..Default::default()
        };
        let e = missing.resolve().unwrap_err().to_string();
        assert!(e.contains("--zone-file"), "{e}");
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("floe-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn help_states_the_defaults_resolve_uses() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let serve = cli.find_subcommand_mut("serve").expect("serve");
        let help = |id: &str| {
            serve
                .get_arguments()
                .find(|a| a.get_id() == id)
                .map(|a| {
                    format!(
                        "{} {}",
                        a.get_help().map(|h| h.to_string()).unwrap_or_default(),
                        a.get_long_help().map(|h| h.to_string()).unwrap_or_default()
                    )
                })
                .unwrap_or_default()
        };
        let s3 = floe_objstore::S3Options::default();
        let hedge_ms = s3.hedge_after.map_or(0, |d| d.as_millis());
        let cases = [
            ("data_dir", format!("./{}", defaults::DATA_DIR)),
            ("listen", defaults::LISTEN.to_string()),
            ("admin_listen", defaults::ADMIN_LISTEN.to_string()),
            ("flush_interval_ms", defaults::FLUSH_INTERVAL_MS.to_string()),
            ("flush_bytes", defaults::FLUSH_BYTES.to_string()),
            ("meta", defaults::META.to_string()),
            ("group", defaults::GROUP.to_string()),
            ("lease_ttl_secs", defaults::LEASE_TTL_SECS.to_string()),
            (
                "departed_broker_listing_secs",
                defaults::DEPARTED_BROKER_LISTING_SECS.to_string(),
            ),
            (
                "auto_create_topics",
                defaults::AUTO_CREATE_TOPICS.to_string(),
            ),
            ("num_partitions", defaults::NUM_PARTITIONS.to_string()),
            ("max_request_bytes", defaults::MAX_REQUEST_BYTES.to_string()),
            ("max_message_bytes", defaults::MAX_MESSAGE_BYTES.to_string()),
            ("fetch_wait_ms_max", defaults::FETCH_WAIT_MS_MAX.to_string()),
            (
                "max_incremental_fetch_session_cache_slots",
                defaults::MAX_INCREMENTAL_FETCH_SESSION_CACHE_SLOTS.to_string(),
            ),
            (
                "min_incremental_fetch_session_eviction_ms",
                defaults::MIN_INCREMENTAL_FETCH_SESSION_EVICTION_MS.to_string(),
            ),
            (
                "group_consumer_session_timeout_ms",
                defaults::GROUP_CONSUMER_SESSION_TIMEOUT_MS.to_string(),
            ),
            (
                "group_consumer_heartbeat_interval_ms",
                defaults::GROUP_CONSUMER_HEARTBEAT_INTERVAL_MS.to_string(),
            ),
            (
                "connections_max_idle_ms",
                defaults::CONNECTIONS_MAX_IDLE_MS.to_string(),
            ),
            (
                "sasl_failed_authentication_delay_ms",
                defaults::SASL_FAILED_AUTHENTICATION_DELAY_MS.to_string(),
            ),
            (
                "sasl_max_failed_authentications",
                defaults::SASL_MAX_FAILED_AUTHENTICATIONS.to_string(),
            ),
            ("log", defaults::LOG.to_string()),
            (
                "cleanup_interval_secs",
                defaults::CLEANUP_INTERVAL_SECS.to_string(),
            ),
            ("delete_grace_secs", defaults::DELETE_GRACE_SECS.to_string()),
            ("orphan_grace_secs", defaults::ORPHAN_GRACE_SECS.to_string()),
            (
                "producer_id_expiration_ms",
                defaults::PRODUCER_ID_EXPIRATION_MS.to_string(),
            ),
            (
                "transaction_max_timeout_ms",
                defaults::TRANSACTION_MAX_TIMEOUT_MS.to_string(),
            ),
            (
                "transactional_id_expiration_ms",
                defaults::TRANSACTIONAL_ID_EXPIRATION_MS.to_string(),
            ),
            (
                "orphan_sweep_interval_secs",
                defaults::ORPHAN_SWEEP_INTERVAL_SECS.to_string(),
            ),
            (
                "archive_target_bytes",
                defaults::ARCHIVE_TARGET_BYTES.to_string(),
            ),
            (
                "archive_max_age_secs",
                defaults::ARCHIVE_MAX_AGE_SECS.to_string(),
            ),
            (
                "compaction_key_map_bytes",
                defaults::COMPACTION_KEY_MAP_BYTES.to_string(),
            ),
            (
                "snapshot_every_entries",
                defaults::SNAPSHOT_EVERY_ENTRIES.to_string(),
            ),
            ("log_keep_entries", defaults::LOG_KEEP_ENTRIES.to_string()),
            (
                "multipart_abort_after_secs",
                defaults::MULTIPART_ABORT_AFTER_SECS.to_string(),
            ),
            (
                "multipart_threshold_bytes",
                s3.multipart_threshold_bytes.to_string(),
            ),
            ("read_hedge_ms", hedge_ms.to_string()),
            ("s3_express", s3.express.to_string()),
        ];
        for (id, want) in cases {
            let h = help(id);
            assert!(
                h.contains(&format!("[default: {want}]")),
                "--{id}: its help {h:?} does not state the default {want}"
            );
        }
    }
}

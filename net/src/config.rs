//! `floe` command line and configuration: CLI flags override `FLOE_*`
//! environment variables, which override the TOML file, which overrides
//! the defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "floe",
    version,
    about = "A diskless, Kafka-compatible streaming broker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a broker.
    Serve(ServeArgs),
    /// Check that the configured object store grants what floe needs
    /// (PutObject, GetObject, ListBucket, DeleteObject, multipart create and
    /// abort); takes serve's flags, environment and config file. Exits 1
    /// naming each failed permission.
    CheckBucket(ServeArgs),
}

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
    /// HTTP address for /metrics, /healthz and /readyz. [default: 127.0.0.1:9644]
    #[arg(long, env = "FLOE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Shards (one pinned thread each). [default: the CPUs the process may use]
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
    /// Size of each part of a multipart upload (at least 5 MiB). [default: 8388608]
    #[arg(long, env = "FLOE_UPLOAD_PART_BYTES")]
    pub upload_part_bytes: Option<usize>,
    /// Parts of one segment upload in flight at once. [default: 4]
    #[arg(long, env = "FLOE_UPLOAD_CONCURRENCY")]
    pub upload_concurrency: Option<usize>,
    /// Segments larger than this are uploaded in parts. [default: 16777216]
    #[arg(long, env = "FLOE_MULTIPART_THRESHOLD_BYTES")]
    pub multipart_threshold_bytes: Option<usize>,
    /// Start a second identical ranged read when the first has not finished
    /// after this many milliseconds; 0 disables hedging. [default: 250]
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
    /// Metadata store: `embedded` (a redb file in the data dir) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`. [default: embedded]
    #[arg(long, env = "FLOE_META")]
    pub meta: Option<String>,
    /// This broker's availability zone, registered with it. [default: none]
    #[arg(long, env = "FLOE_ZONE")]
    pub zone: Option<String>,
    /// This broker's agent group, registered with it. [default: default]
    #[arg(long, env = "FLOE_GROUP")]
    pub group: Option<String>,
    /// Seconds after which a broker that stopped renewing its registration
    /// is considered gone. [default: 10]
    #[arg(long, env = "FLOE_LEASE_TTL_SECS")]
    pub lease_ttl_secs: Option<u64>,
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
    /// shard stops reading sockets. [default: 268435456]
    #[arg(long, env = "FLOE_INFLIGHT_BYTES")]
    pub inflight_bytes: Option<usize>,
    /// Per shard: bytes of recent batches kept in memory for fetches. [default: 268435456]
    #[arg(long, env = "FLOE_READ_CACHE_BYTES")]
    pub read_cache_bytes: Option<usize>,
    /// Longest a fetch may wait for data, whatever the client asks. [default: 30000]
    #[arg(long, env = "FLOE_FETCH_WAIT_MS_MAX")]
    pub fetch_wait_ms_max: Option<u64>,
    /// Log filter (tracing's EnvFilter syntax). [default: info]
    #[arg(long, env = "FLOE_LOG")]
    pub log: Option<String>,
}

/// Settings after merging flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub data_dir: PathBuf,
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
    pub multipart_abort_after_secs: u64,
    pub object_store_faults: Option<String>,
    /// `None`: allocate one (or reuse the one remembered in the data dir).
    pub node_id: Option<i32>,
    pub meta: String,
    pub zone: String,
    pub group: String,
    pub lease_ttl_secs: u64,
    pub auto_create_topics: bool,
    pub num_partitions: u32,
    pub max_request_bytes: usize,
    pub max_message_bytes: usize,
    pub inflight_bytes: usize,
    pub read_cache_bytes: usize,
    pub fetch_wait_ms_max: u64,
    pub log: String,
}

/// Most shards accepted: more than this is a configuration mistake.
pub const SHARDS_MAX: usize = 256;

fn split_host_port(addr: &str, what: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("{what} {addr:?} must be HOST:PORT"))?;
    let port = port
        .parse()
        .map_err(|_| anyhow::anyhow!("{what} {addr:?}: port {port:?} is not a number"))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
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
        let data_dir = pick!(data_dir, PathBuf::from("floe-data"));
        let listen = pick!(listen, "127.0.0.1:9092".to_string());
        let (listen_host, listen_port) = split_host_port(&listen, "--listen")?;
        let advertise = self.advertise.clone().or(file.advertise.clone());
        let (advertise_host, advertise_port) = match advertise {
            Some(a) => split_host_port(&a, "--advertise")?,
            None if listen_host == "0.0.0.0" || listen_host == "::" || listen_host.is_empty() => {
                ("localhost".to_string(), listen_port)
            }
            None => (listen_host, listen_port),
        };
        let shards = pick!(shards, floe_tuning::default_shards());
        if shards == 0 || shards > SHARDS_MAX {
            anyhow::bail!("--shards {shards} must be between 1 and {SHARDS_MAX}");
        }
        let flush_interval_ms = pick!(flush_interval_ms, 100);
        if flush_interval_ms == 0 || flush_interval_ms > 60_000 {
            anyhow::bail!("--flush-interval-ms {flush_interval_ms} must be between 1 and 60000");
        }
        let flush_bytes = pick!(flush_bytes, 8 << 20);
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
        let upload_part_bytes = pick!(upload_part_bytes, s3_defaults.part_bytes);
        let upload_concurrency = pick!(upload_concurrency, s3_defaults.part_concurrency);
        let multipart_threshold_bytes = pick!(
            multipart_threshold_bytes,
            s3_defaults.multipart_threshold_bytes
        );
        let read_hedge_ms = pick!(
            read_hedge_ms,
            s3_defaults.hedge_after.map_or(0, |d| d.as_millis() as u64)
        );
        let max_request_bytes = pick!(max_request_bytes, 104_857_600);
        let inflight_bytes = pick!(inflight_bytes, 256 << 20);
        if inflight_bytes < 1 << 20 {
            anyhow::bail!("--inflight-bytes {inflight_bytes} must be at least 1 MiB");
        }
        let resolved = Resolved {
            admin_listen: pick!(admin_listen, "127.0.0.1:9644".to_string()),
            node_id: self.node_id.or(file.node_id),
            meta: pick!(meta, "embedded".to_string()),
            zone: pick!(zone, String::new()),
            group: pick!(group, "default".to_string()),
            lease_ttl_secs: pick!(lease_ttl_secs, 10).clamp(2, 300),
            auto_create_topics: pick!(auto_create_topics, true),
            num_partitions: pick!(num_partitions, 1).max(1),
            max_message_bytes: pick!(max_message_bytes, 1_048_588),
            read_cache_bytes: pick!(read_cache_bytes, 256 << 20),
            fetch_wait_ms_max: pick!(fetch_wait_ms_max, 30_000),
            log: pick!(log, "info".to_string()),
            data_dir,
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
            cleanup_interval_secs: pick!(cleanup_interval_secs, 60).max(1),
            delete_grace_secs: pick!(delete_grace_secs, 60),
            // Commits give up after 5 s; an orphan grace below a minute
            // would risk deleting an upload whose commit is still landing.
            orphan_grace_secs: pick!(orphan_grace_secs, 3600),
            orphan_sweep_interval_secs: pick!(orphan_sweep_interval_secs, 600).max(1),
            multipart_abort_after_secs: pick!(multipart_abort_after_secs, 86_400),
            object_store_faults: self
                .object_store_faults
                .clone()
                .or(file.object_store_faults.clone()),
            max_request_bytes,
            inflight_bytes,
        };
        resolved
            .object_store_options()
            .validate()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(resolved)
    }
}

impl Resolved {
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
        assert_eq!(wild.resolve().expect("ok").advertise_host, "localhost");
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
        assert_eq!((o.part_bytes, o.part_concurrency), (8 << 20, 4));

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

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("floe-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }
}

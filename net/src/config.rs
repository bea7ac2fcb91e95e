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
    /// Object store URL: file://DIR or memory://. [default: file://DATA_DIR/objects]
    #[arg(long, env = "FLOE_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// This broker's node id. [default: 1]
    #[arg(long, env = "FLOE_NODE_ID")]
    pub node_id: Option<i32>,
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
    pub node_id: i32,
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
        let max_request_bytes = pick!(max_request_bytes, 104_857_600);
        let inflight_bytes = pick!(inflight_bytes, 256 << 20);
        if inflight_bytes < 1 << 20 {
            anyhow::bail!("--inflight-bytes {inflight_bytes} must be at least 1 MiB");
        }
        Ok(Resolved {
            admin_listen: pick!(admin_listen, "127.0.0.1:9644".to_string()),
            node_id: pick!(node_id, 1),
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
            max_request_bytes,
            inflight_bytes,
        })
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

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("floe-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }
}

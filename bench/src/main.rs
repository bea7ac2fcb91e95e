//! `floe-bench`: produce, consume or end-to-end load against any Kafka
//! bootstrap address; prints JSON results and can draw an SVG plot.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use floe_bench::batch::{scan_values, BatchMaker, ProducerFields, STAMP_BYTES};
use floe_bench::client::{split_batches, Conn};
use floe_bench::report::{quantiles, series, summary, svg, Quantiles, Summary};
use floe_bench::{parse_bytes, BenchError, Recorder};
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, BrokerId, CreateTopicsRequest, EndTxnRequest, FetchRequest,
    FindCoordinatorRequest, InitProducerIdRequest, ListOffsetsRequest, MetadataRequest,
    ProduceRequest, ProducerId, TopicName, TransactionalId,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Compression, RecordBatchDecoder};
use serde::Serialize;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// Produce only.
    Produce,
    /// Consume what is already in the topics, from the earliest offset to
    /// the end offsets seen at the start; the rate counts the time until the
    /// last consumer got there (or `--duration`, whichever is first).
    Consume,
    /// Produce and consume at once; measures produce-to-consume latency.
    E2e,
}

/// How producers identify themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Producing {
    /// No producer id (acks only).
    Plain,
    /// A producer id per worker and sequence numbers per partition.
    Idempotent,
    /// Idempotent, and every worker's batches in transactions of
    /// `--txn-batches` produce requests, each committed with EndTxn;
    /// records count (and their latency ends) when their transaction
    /// commits. Consumers read with read_committed.
    Transactional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Codec {
    fn compression(self) -> Compression {
        match self {
            Codec::None => Compression::None,
            Codec::Gzip => Compression::Gzip,
            Codec::Snappy => Compression::Snappy,
            Codec::Lz4 => Compression::Lz4,
            Codec::Zstd => Compression::Zstd,
        }
    }
}

#[derive(Debug, Clone, Parser, Serialize)]
#[command(
    name = "floe-bench",
    version,
    about = "Kafka load generator and latency recorder"
)]
struct Args {
    /// Bootstrap broker, HOST:PORT.
    #[arg(long, short = 'b')]
    bootstrap: String,
    #[arg(long, value_enum, default_value_t = Mode::Produce)]
    mode: Mode,
    /// Topics are named PREFIX-0 .. PREFIX-(N-1); created if missing.
    #[arg(long, default_value = "floe-bench")]
    topic_prefix: String,
    #[arg(long, default_value_t = 1)]
    topics: u32,
    /// Partitions per topic (when creating).
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Producer connections (workers); as many consumers in e2e mode.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Bytes of each record's value.
    #[arg(long, value_parser = parse_bytes, default_value = "1024")]
    record_size: u64,
    /// Bytes of record values per produce batch (one partition per request).
    #[arg(long, value_parser = parse_bytes, default_value = "256KiB")]
    batch_size: u64,
    /// -1 (all), 1 or 0 (no reply: no latency).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    acks: i16,
    #[arg(long, value_enum, default_value_t = Codec::None)]
    compression: Codec,
    #[arg(long, value_enum, default_value_t = Producing::Plain)]
    producer: Producing,
    /// Produce requests per transaction (transactional producers), sent
    /// at once and awaited before EndTxn.
    #[arg(long, default_value_t = 20)]
    txn_batches: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to run the same load before measuring (not counted): lets a
    /// broker reach its steady state (caches filled, memory recycled), as
    /// OpenMessaging Benchmark's warm-up does.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Records per second across all producers; 0 = as fast as possible
    /// (closed loop). At a fixed rate latency counts from each record's
    /// intended send time, so a stalled broker is not hidden (coordinated
    /// omission).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Produce requests in flight per producer. A diskless broker answers
    /// after its flush interval, so the window must cover throughput x
    /// flush interval (100 x 256 KiB per 100 ms is 262 MB/s per producer).
    #[arg(long, default_value_t = 100)]
    inflight: usize,
    /// Write the JSON results here instead of stdout.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput and latency over time into this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// Longest a fetch waits at the broker: short, so consumers notice the end.
const FETCH_WAIT_MS: i32 = 100;
const FETCH_BYTES_MAX: i32 = 32 << 20;
const FETCH_PARTITION_BYTES_MAX: i32 = 4 << 20;
/// At a fixed rate a producer batches at most this long (like librdkafka's
/// linger.ms default), so low rates are not dominated by batching delay.
const LINGER: Duration = Duration::from_millis(5);
/// How long consumers keep reading after producers stop in e2e mode.
const E2E_DRAIN: Duration = Duration::from_secs(2);
const METADATA_WAIT: Duration = Duration::from_secs(15);

type Partition = (TopicName, i32);

struct Cluster {
    /// Leader address of each partition.
    leaders: HashMap<Partition, String>,
    partitions: Vec<Partition>,
}

fn topic_names(a: &Args) -> Vec<TopicName> {
    (0..a.topics)
        .map(|i| TopicName(StrBytes::from_string(format!("{}-{i}", a.topic_prefix))))
        .collect()
}

async fn prepare(a: &Args) -> Result<Cluster, BenchError> {
    let conn = Conn::connect(&a.bootstrap).await?;
    let names = topic_names(a);
    if a.mode != Mode::Consume {
        let v = conn.version::<CreateTopicsRequest>(5, 0)?;
        let req = CreateTopicsRequest::default()
            .with_timeout_ms(10_000)
            .with_topics(
                names
                    .iter()
                    .map(|n| {
                        CreatableTopic::default()
                            .with_name(n.clone())
                            .with_num_partitions(a.partitions)
                            .with_replication_factor(1)
                    })
                    .collect(),
            );
        let resp = conn.send_versioned(req, v).await?.wait().await?;
        for t in resp.topics {
            // 36: TOPIC_ALREADY_EXISTS.
            if t.error_code != 0 && t.error_code != 36 {
                return Err(BenchError::Kafka("CreateTopics", t.error_code));
            }
        }
    }
    let v = conn.version::<MetadataRequest>(9, 1)?;
    let began = Instant::now();
    loop {
        let req = MetadataRequest::default().with_topics(Some(
            names
                .iter()
                .map(|n| MetadataRequestTopic::default().with_name(Some(n.clone())))
                .collect(),
        ));
        let resp = conn.send_versioned(req, v).await?.wait().await?;
        let brokers: HashMap<i32, String> = resp
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
            .collect();
        let mut leaders = HashMap::new();
        let mut partitions = Vec::new();
        let mut complete = resp.topics.len() == names.len();
        for t in &resp.topics {
            let Some(name) = t.name.clone() else { continue };
            complete &= t.error_code == 0 && !t.partitions.is_empty();
            for p in &t.partitions {
                match brokers.get(&p.leader_id.0) {
                    Some(addr) if p.error_code == 0 => {
                        leaders.insert((name.clone(), p.partition_index), addr.clone());
                        partitions.push((name.clone(), p.partition_index));
                    }
                    _ => complete = false,
                }
            }
        }
        if complete {
            partitions.sort_by(|a, b| (a.0 .0.as_str(), a.1).cmp(&(b.0 .0.as_str(), b.1)));
            return Ok(Cluster {
                leaders,
                partitions,
            });
        }
        if began.elapsed() > METADATA_WAIT {
            return Err(BenchError::Setup(format!(
                "topics {:?} have no leader for every partition after {METADATA_WAIT:?}",
                names.iter().map(|n| n.0.as_str()).collect::<Vec<_>>()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Connections of one worker, one per leader it talks to.
#[derive(Default)]
struct Conns(HashMap<String, Arc<Conn>>);

impl Conns {
    async fn get(&mut self, addr: &str) -> Result<Arc<Conn>, BenchError> {
        if let Some(c) = self.0.get(addr) {
            return Ok(c.clone());
        }
        let c = Conn::connect(addr).await?;
        self.0.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// Pseudo-random bytes (xorshift): not trivially compressible, no
/// dependency, the same every run.
fn payload(len: usize) -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Printable bytes, as typical text/JSON payloads are.
        v.push(b' ' + (x % 95) as u8);
    }
    Bytes::from(v)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Shared {
    args: Args,
    cluster: Cluster,
    /// Time zero for e2e stamps (first 8 bytes of each value).
    base: Instant,
    template: Bytes,
}

async fn produce_worker(
    s: Arc<Shared>,
    parts: Vec<Partition>,
    start: Instant,
    measure_from: Instant,
    deadline: Instant,
) -> Result<Recorder, BenchError> {
    let a = &s.args;
    let rec = Arc::new(Mutex::new(Recorder::new(measure_from)));
    if parts.is_empty() {
        return Ok(Recorder::new(measure_from));
    }
    let mut conns = Conns::default();
    let mut targets = Vec::new();
    for p in &parts {
        let conn = conns.get(&s.cluster.leaders[p]).await?;
        let v = conn.version::<ProduceRequest>(9, 3)?;
        targets.push((p.clone(), conn, v));
    }
    let workers = a.connections.max(1) as f64;
    let rate_w = a.rate / workers;
    let batch_records_max = (a.batch_size / a.record_size.max(1)).max(1);
    let batch_records = if rate_w > 0.0 {
        ((rate_w * LINGER.as_secs_f64()) as u64).clamp(1, batch_records_max)
    } else {
        batch_records_max
    };
    let permits = Arc::new(Semaphore::new(a.inflight.max(1)));
    let maker = BatchMaker::new(
        s.template.clone(),
        batch_records,
        a.compression.compression(),
    )?;
    // An idempotent producer: an id, and a sequence per partition.
    let identity = match a.producer {
        Producing::Idempotent => {
            let boot = conns.get(&a.bootstrap).await?;
            Some(init_producer(&boot, None).await?)
        }
        _ => None,
    };
    let mut sequences = vec![0i32; targets.len()];
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent: u64 = 0;
    let mut j: usize = 0;
    loop {
        // Open loop: the time the last record of this batch was due.
        let due = (rate_w > 0.0)
            .then(|| start + Duration::from_secs_f64((sent + batch_records) as f64 / rate_w));
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
        if Instant::now() >= deadline {
            break;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BenchError::Closed)?;
        let send_at = Instant::now();
        if send_at >= deadline {
            break;
        }
        let t = j % targets.len();
        let (part, conn, version) = &targets[t];
        j += 1;
        // End-to-end latency counts from the same time produce latency does.
        let stamp = due
            .unwrap_or(send_at)
            .saturating_duration_since(s.base)
            .as_nanos() as u64;
        let now_ms = unix_ms();
        let fields = identity.map(|(producer_id, epoch)| ProducerFields {
            producer_id,
            epoch,
            base_sequence: sequences[t],
            transactional: false,
        });
        sequences[t] = next_sequence(sequences[t], batch_records);
        let batch = maker.make_as(stamp, now_ms, fields)?;
        let req = ProduceRequest::default()
            .with_acks(a.acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(part.0.clone())
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(part.1)
                    .with_records(Some(batch))])]);
        let first_due = sent;
        sent += batch_records;
        let bytes = batch_records * a.record_size;
        if a.acks == 0 {
            conn.send_no_reply(req, *version).await?;
            if let Ok(mut r) = rec.lock() {
                r.count(Instant::now(), batch_records, bytes);
            }
            drop(permit);
            continue;
        }
        let reply = conn.send_versioned(req, *version).await?;
        let rec = rec.clone();
        tasks.spawn(async move {
            let resp = reply.wait().await;
            let done = Instant::now();
            let ok = match resp {
                Ok(r) => r
                    .responses
                    .iter()
                    .flat_map(|t| t.partition_responses.iter())
                    .all(|p| p.error_code == 0),
                Err(_) => false,
            };
            if let Ok(mut r) = rec.lock() {
                if !ok {
                    r.errors += 1;
                } else {
                    r.count(done, batch_records, bytes);
                    if rate_w > 0.0 {
                        // Each record's latency from its own intended time.
                        for m in 0..batch_records {
                            let due = start
                                + Duration::from_secs_f64((first_due + m + 1) as f64 / rate_w);
                            r.latency(done, done.saturating_duration_since(due), 1);
                        }
                    } else {
                        r.latency(done, done - send_at, batch_records);
                    }
                }
            }
            drop(permit);
        });
        // Reap finished replies so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let out = rec
        .lock()
        .map(|r| r.clone())
        .map_err(|_| BenchError::Closed)?;
    Ok(out)
}

/// A sequence number `records` after `seq` (they wrap at i32::MAX).
fn next_sequence(seq: i32, records: u64) -> i32 {
    ((i64::from(seq) + records as i64) % (i64::from(i32::MAX) + 1)) as i32
}

/// InitProducerId at `conn`: (producer id, epoch); with a transactional
/// id, `conn` must be its coordinator.
async fn init_producer(conn: &Conn, txn_id: Option<&str>) -> Result<(i64, i16), BenchError> {
    let v = conn.version::<InitProducerIdRequest>(4, 0)?;
    let req = InitProducerIdRequest::default()
        .with_transactional_id(txn_id.map(|t| TransactionalId(StrBytes::from_string(t.into()))))
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let resp = conn.send_versioned(req, v).await?.wait().await?;
    if resp.error_code != 0 {
        return Err(BenchError::Kafka("InitProducerId", resp.error_code));
    }
    Ok((resp.producer_id.0, resp.producer_epoch))
}

/// A transactional producer: each transaction adds the worker's
/// partitions, sends `--txn-batches` produce requests at once, waits for
/// them and commits. A record counts, and its latency ends, when its
/// transaction commits (when a read_committed consumer may see it).
async fn produce_txn_worker(
    s: Arc<Shared>,
    parts: Vec<Partition>,
    worker: usize,
    measure_from: Instant,
    deadline: Instant,
) -> Result<Recorder, BenchError> {
    let a = &s.args;
    let mut rec = Recorder::new(measure_from);
    if parts.is_empty() {
        return Ok(rec);
    }
    let mut conns = Conns::default();
    let boot = conns.get(&a.bootstrap).await?;
    let txn_id = format!("floe-bench-{}-{worker}", std::process::id());
    let id = || TransactionalId(StrBytes::from_string(txn_id.clone()));
    let v = boot.version::<FindCoordinatorRequest>(3, 1)?;
    let req = FindCoordinatorRequest::default()
        .with_key(StrBytes::from_string(txn_id.clone()))
        .with_key_type(1);
    let found = boot.send_versioned(req, v).await?.wait().await?;
    if found.error_code != 0 {
        return Err(BenchError::Kafka("FindCoordinator", found.error_code));
    }
    let coord = conns
        .get(&format!("{}:{}", found.host.as_str(), found.port))
        .await?;
    let (producer_id, epoch) = init_producer(&coord, Some(&txn_id)).await?;
    let mut targets = Vec::new();
    for p in &parts {
        let conn = conns.get(&s.cluster.leaders[p]).await?;
        let v = conn.version::<ProduceRequest>(9, 3)?;
        targets.push((p.clone(), conn, v));
    }
    let mut by_topic: Vec<AddPartitionsToTxnTopic> = Vec::new();
    for (topic, p) in &parts {
        match by_topic.iter_mut().find(|t| &t.name == topic) {
            Some(t) => t.partitions.push(*p),
            None => by_topic.push(
                AddPartitionsToTxnTopic::default()
                    .with_name(topic.clone())
                    .with_partitions(vec![*p]),
            ),
        }
    }
    let batch_records = (a.batch_size / a.record_size.max(1)).max(1);
    let bytes = batch_records * a.record_size;
    let maker = BatchMaker::new(
        s.template.clone(),
        batch_records,
        a.compression.compression(),
    )?;
    let add_v = coord.version::<AddPartitionsToTxnRequest>(3, 0)?;
    let end_v = coord.version::<EndTxnRequest>(3, 0)?;
    let mut sequences = vec![0i32; targets.len()];
    let mut j = 0usize;
    while Instant::now() < deadline {
        let add = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(id())
            .with_v3_and_below_producer_id(ProducerId(producer_id))
            .with_v3_and_below_producer_epoch(epoch)
            .with_v3_and_below_topics(by_topic.clone());
        let added = coord.send_versioned(add, add_v).await?.wait().await?;
        if let Some(code) = added
            .results_by_topic_v3_and_below
            .iter()
            .flat_map(|t| t.results_by_partition.iter())
            .map(|p| p.partition_error_code)
            .find(|c| *c != 0)
        {
            return Err(BenchError::Kafka("AddPartitionsToTxn", code));
        }
        let mut sent = Vec::with_capacity(a.txn_batches.max(1));
        for _ in 0..a.txn_batches.max(1) {
            let t = j % targets.len();
            j += 1;
            let (part, conn, version) = &targets[t];
            let send_at = Instant::now();
            let stamp = send_at.saturating_duration_since(s.base).as_nanos() as u64;
            let fields = ProducerFields {
                producer_id,
                epoch,
                base_sequence: sequences[t],
                transactional: true,
            };
            sequences[t] = next_sequence(sequences[t], batch_records);
            let req = ProduceRequest::default()
                .with_transactional_id(Some(id()))
                .with_acks(-1)
                .with_timeout_ms(30_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(part.0.clone())
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(part.1)
                        .with_records(Some(maker.make_as(
                            stamp,
                            unix_ms(),
                            Some(fields),
                        )?))])]);
            sent.push((conn.send_versioned(req, *version).await?, send_at));
        }
        let mut times = Vec::with_capacity(sent.len());
        let mut failed = None;
        for (reply, send_at) in sent {
            let resp = reply.wait().await?;
            if let Some(code) = resp
                .responses
                .iter()
                .flat_map(|t| t.partition_responses.iter())
                .map(|p| p.error_code)
                .find(|c| *c != 0)
            {
                failed = failed.or(Some(code));
            }
            times.push(send_at);
        }
        let end = EndTxnRequest::default()
            .with_transactional_id(id())
            .with_producer_id(ProducerId(producer_id))
            .with_producer_epoch(epoch)
            .with_committed(failed.is_none());
        let ended = coord.send_versioned(end, end_v).await?.wait().await?;
        if let Some(code) = failed {
            return Err(BenchError::Kafka("Produce (transactional)", code));
        }
        if ended.error_code != 0 {
            return Err(BenchError::Kafka("EndTxn", ended.error_code));
        }
        let done = Instant::now();
        for send_at in times {
            rec.count(done, batch_records, bytes);
            rec.latency(done, done - send_at, batch_records);
        }
    }
    Ok(rec)
}

/// Offsets to start consuming from: earliest (-2) or latest (-1).
async fn start_offsets(
    s: &Shared,
    conns: &mut Conns,
    parts: &[Partition],
    timestamp: i64,
) -> Result<HashMap<Partition, i64>, BenchError> {
    let mut out = HashMap::new();
    for p in parts {
        let conn = conns.get(&s.cluster.leaders[p]).await?;
        let v = conn.version::<ListOffsetsRequest>(5, 1)?;
        let req = ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(p.0.clone())
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_partition_index(p.1)
                    .with_current_leader_epoch(-1)
                    .with_timestamp(timestamp)])]);
        let resp = conn.send_versioned(req, v).await?.wait().await?;
        let part = resp
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter())
            .find(|x| x.partition_index == p.1)
            .ok_or_else(|| BenchError::Setup(format!("no offset for partition {}", p.1)))?;
        if part.error_code != 0 {
            return Err(BenchError::Kafka("ListOffsets", part.error_code));
        }
        out.insert(p.clone(), part.offset.max(0));
    }
    Ok(out)
}

/// What a consumer read, its end-to-end latencies, and when it reached the
/// end offsets it was given (None: it read until the deadline).
type Consumed = (Recorder, Recorder, Option<Instant>);

async fn consume_worker(
    s: Arc<Shared>,
    parts: Vec<Partition>,
    mut offsets: HashMap<Partition, i64>,
    ends: Option<HashMap<Partition, i64>>,
    measure_from: Instant,
    deadline: Instant,
) -> Result<Consumed, BenchError> {
    let mut rec = Recorder::new(measure_from);
    let mut e2e = Recorder::new(measure_from);
    let mut conns = Conns::default();
    let mut by_leader: HashMap<String, Vec<Partition>> = HashMap::new();
    for p in parts {
        by_leader
            .entry(s.cluster.leaders[&p].clone())
            .or_default()
            .push(p);
    }
    let measure_e2e = s.args.mode == Mode::E2e;
    let reached = |offsets: &HashMap<Partition, i64>, p: &Partition| {
        let end = ends.as_ref().and_then(|e| e.get(p));
        end.is_some_and(|end| offsets.get(p).copied().unwrap_or(0) >= *end)
    };
    // One fetch in flight per leader, round-robin over leaders.
    while Instant::now() < deadline {
        by_leader.retain(|_, parts| {
            parts.retain(|p| !reached(&offsets, p));
            !parts.is_empty()
        });
        if by_leader.is_empty() {
            return Ok((rec, e2e, Some(Instant::now())));
        }
        for (addr, parts) in &by_leader {
            let conn = conns.get(addr).await?;
            // v11 at most: Tansu 0.6 answers v12 with a tagged field that
            // v12 does not define (FINDINGS.md), and v11 is all we need.
            let v = conn.version::<FetchRequest>(11, 4)?;
            let mut topics: Vec<FetchTopic> = Vec::new();
            for p in parts {
                let fp = FetchPartition::default()
                    .with_partition(p.1)
                    .with_current_leader_epoch(-1)
                    .with_last_fetched_epoch(-1)
                    .with_log_start_offset(-1)
                    .with_fetch_offset(offsets.get(p).copied().unwrap_or(0))
                    .with_partition_max_bytes(FETCH_PARTITION_BYTES_MAX);
                match topics.iter_mut().find(|t| t.topic == p.0) {
                    Some(t) => t.partitions.push(fp),
                    None => topics.push(
                        FetchTopic::default()
                            .with_topic(p.0.clone())
                            .with_partitions(vec![fp]),
                    ),
                }
            }
            let req = FetchRequest::default()
                .with_isolation_level(i8::from(s.args.producer == Producing::Transactional))
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(FETCH_WAIT_MS)
                .with_min_bytes(1)
                .with_max_bytes(FETCH_BYTES_MAX)
                .with_session_epoch(-1)
                .with_topics(topics);
            let resp = conn.send_versioned(req, v).await?.wait().await?;
            let done = Instant::now();
            let now_stamp = s.base.elapsed().as_nanos() as u64;
            for t in resp.responses {
                for pd in t.partitions {
                    let key = (t.topic.clone(), pd.partition_index);
                    if pd.error_code != 0 {
                        rec.errors += 1;
                        continue;
                    }
                    let Some(records) = pd.records else { continue };
                    let next = offsets.entry(key).or_insert(0);
                    for span in split_batches(records) {
                        if span.last_offset < *next {
                            continue;
                        }
                        let mut n = 0;
                        let mut bytes = 0;
                        let mut take = |delta: i64, value: &[u8]| {
                            if span.base_offset + delta < *next {
                                return;
                            }
                            n += 1;
                            bytes += value.len() as u64;
                            if measure_e2e && value.len() >= STAMP_BYTES {
                                let mut st = [0u8; STAMP_BYTES];
                                st.copy_from_slice(&value[..STAMP_BYTES]);
                                let sent = u64::from_be_bytes(st);
                                e2e.latency(
                                    done,
                                    Duration::from_nanos(now_stamp.saturating_sub(sent)),
                                    1,
                                );
                            }
                        };
                        if !scan_values(&span.bytes, &mut take) {
                            let mut b = span.bytes.clone();
                            let set = RecordBatchDecoder::decode(&mut b)
                                .map_err(|e| BenchError::Decode(e.to_string()))?;
                            for (i, r) in set.records.iter().enumerate() {
                                take(i as i64, r.value.as_deref().unwrap_or_default());
                            }
                        }
                        rec.count(done, n, bytes);
                        *next = span.last_offset + 1;
                    }
                }
            }
        }
    }
    Ok((rec, e2e, None))
}

#[derive(Serialize)]
struct Results {
    tool: &'static str,
    version: &'static str,
    settings: Args,
    started_unix_ms: i64,
    duration_s: f64,
    partitions: usize,
    produce: Summary,
    consume: Summary,
    e2e_latency: Option<Quantiles>,
    series: Vec<floe_bench::report::Point>,
}

async fn run(a: Args) -> Result<Results, BenchError> {
    if a.record_size < 8 && a.mode == Mode::E2e {
        return Err(BenchError::Setup(
            "e2e mode needs --record-size of at least 8".into(),
        ));
    }
    let valid = a.duration > 0.0
        && a.duration.is_finite()
        && a.rate >= 0.0
        && a.rate.is_finite()
        && a.warmup >= 0.0
        && a.warmup.is_finite();
    if !valid {
        return Err(BenchError::Setup(
            "--duration must be positive, --rate and --warmup not negative".into(),
        ));
    }
    if a.producer != Producing::Plain && a.acks != -1 {
        return Err(BenchError::Setup(
            "idempotent and transactional producers need --acks -1".into(),
        ));
    }
    if a.producer == Producing::Transactional && a.rate > 0.0 {
        return Err(BenchError::Setup(
            "transactional producers run closed-loop: --rate must be 0".into(),
        ));
    }
    let cluster = prepare(&a).await?;
    let s = Arc::new(Shared {
        template: payload(a.record_size as usize),
        base: Instant::now(),
        cluster,
        args: a.clone(),
    });
    let n = a.connections.max(1);
    let assign = |w: usize| -> Vec<Partition> {
        s.cluster
            .partitions
            .iter()
            .enumerate()
            .filter(|(i, _)| i % n == w)
            .map(|(_, p)| p.clone())
            .collect()
    };
    // Consumers start where the data is before producers begin.
    // In consume mode they stop at the end offsets seen now.
    let mut consumer_offsets = Vec::new();
    if a.mode != Mode::Produce {
        let ts = if a.mode == Mode::Consume { -2 } else { -1 };
        for w in 0..n {
            let mut conns = Conns::default();
            let from = start_offsets(&s, &mut conns, &assign(w), ts).await?;
            let ends = match a.mode {
                Mode::Consume => Some(start_offsets(&s, &mut conns, &assign(w), -1).await?),
                _ => None,
            };
            consumer_offsets.push((from, ends));
        }
    }
    let started_unix_ms = unix_ms();
    let start = Instant::now();
    let run_for = Duration::from_secs_f64(a.duration);
    let measure_from = start + Duration::from_secs_f64(a.warmup);
    let deadline = measure_from + run_for;
    let mut producers = tokio::task::JoinSet::new();
    if a.mode != Mode::Consume {
        for w in 0..n {
            if a.producer == Producing::Transactional {
                producers.spawn(produce_txn_worker(
                    s.clone(),
                    assign(w),
                    w,
                    measure_from,
                    deadline,
                ));
                continue;
            }
            producers.spawn(produce_worker(
                s.clone(),
                assign(w),
                start,
                measure_from,
                deadline,
            ));
        }
    }
    let mut consumers = tokio::task::JoinSet::new();
    let consume_deadline = if a.mode == Mode::E2e {
        deadline + E2E_DRAIN
    } else {
        deadline
    };
    for (w, (offsets, ends)) in consumer_offsets.into_iter().enumerate() {
        consumers.spawn(consume_worker(
            s.clone(),
            assign(w),
            offsets,
            ends,
            measure_from,
            consume_deadline,
        ));
    }
    let mut produced = Recorder::new(measure_from);
    let mut consumed = Recorder::new(measure_from);
    let mut e2e = Recorder::new(measure_from);
    let mut first_error = None;
    while let Some(r) = producers.join_next().await {
        match r {
            Ok(Ok(r)) => produced.merge(&r),
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(e) => first_error = first_error.or(Some(BenchError::Setup(e.to_string()))),
        }
    }
    // Consume mode: the time until the last consumer reached its end.
    let mut finished = Some(measure_from);
    while let Some(r) = consumers.join_next().await {
        match r {
            Ok(Ok((c, l, done))) => {
                consumed.merge(&c);
                e2e.merge(&l);
                finished = finished.zip(done).map(|(a, b)| a.max(b));
            }
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(e) => first_error = first_error.or(Some(BenchError::Setup(e.to_string()))),
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let secs = run_for.as_secs_f64();
    let consume_secs = match (a.mode, finished) {
        (Mode::Consume, Some(at)) => at.saturating_duration_since(measure_from).as_secs_f64(),
        _ => secs,
    };
    Ok(Results {
        tool: "floe-bench",
        version: env!("CARGO_PKG_VERSION"),
        started_unix_ms,
        duration_s: consume_secs,
        partitions: s.cluster.partitions.len(),
        produce: summary(&produced, secs),
        consume: summary(&consumed, consume_secs),
        e2e_latency: quantiles(&e2e.latency),
        series: series(&produced, &consumed, &e2e),
        settings: a,
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floe-bench: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let results = match rt.block_on(run(args.clone())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("floe-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let json = match serde_json::to_string_pretty(&results) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("floe-bench: encoding results: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match &args.json {
        Some(path) => {
            if let Err(e) = std::fs::write(path, json + "\n") {
                eprintln!("floe-bench: writing {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
        }
        None => println!("{json}"),
    }
    if let Some(path) = &args.svg {
        let title = format!(
            "floe-bench {:?} {} · {} B records · acks={} · {}",
            args.mode,
            args.bootstrap,
            args.record_size,
            args.acks,
            if args.rate > 0.0 {
                format!("{} rec/s", args.rate)
            } else {
                "closed loop".into()
            }
        );
        if let Err(e) = std::fs::write(path, svg(&results.series, &title)) {
            eprintln!("floe-bench: writing {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    let p = &results.produce;
    let c = &results.consume;
    eprintln!(
        "produced {} records ({:.1} MB/s, {} errors), consumed {} records ({:.1} MB/s over {:.2} s){}{}",
        p.records,
        p.mb_per_sec,
        p.errors,
        c.records,
        c.mb_per_sec,
        results.duration_s,
        p.latency
            .as_ref()
            .map(|q| format!(
                ", produce p50/p99/p99.9/max {:.1}/{:.1}/{:.1}/{:.1} ms",
                q.p50_ms, q.p99_ms, q.p999_ms, q.max_ms
            ))
            .unwrap_or_default(),
        results
            .e2e_latency
            .as_ref()
            .map(|q| format!(", e2e p50/p99 {:.1}/{:.1} ms", q.p50_ms, q.p99_ms))
            .unwrap_or_default()
    );
    std::process::ExitCode::SUCCESS
}

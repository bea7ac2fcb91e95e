//! floe-bench: a Kafka load generator and latency recorder that drives any
//! bootstrap address over the wire.
//!
//! Owns: the wire client ([`client`]), produce batches ([`batch`]), per-second throughput and latency
//! recording ([`Recorder`]), and the JSON and SVG reports ([`report`]).
//! Must never: link floe's own crates — it measures brokers from outside,
//! so the same binary measures floe, Tansu or Kafka.

pub mod batch;
pub mod client;
pub mod report;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Io(String),
    #[error("connection closed before the reply")]
    Closed,
    #[error("encoding a request: {0}")]
    Encode(String),
    #[error("decoding a reply: {0}")]
    Decode(String),
    #[error("{0} failed with Kafka error code {1}")]
    Kafka(&'static str, i16),
    #[error("the broker does not support API key {0} at a usable version (its highest: {1})")]
    Unsupported(i16, i16),
    #[error("{0}")]
    Setup(String),
}

/// Longest latency recorded; longer ones are clamped to it.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Width of one point of the time series.
pub const BUCKET: Duration = Duration::from_secs(1);
/// Most points kept (a day of seconds): a bound, not a limit anyone meets.
pub const BUCKETS_MAX: usize = 86_400;

fn histogram() -> Histogram<u64> {
    // 3 significant digits, 1 µs to an hour: bounded memory per histogram.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("constant histogram bounds are valid")
}

/// Throughput and latency of one worker, per second and overall; workers'
/// recorders are merged at the end. Events before `start` (a warm-up) are
/// not recorded.
#[derive(Debug, Clone)]
pub struct Recorder {
    start: Instant,
    pub records: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: Histogram<u64>,
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Clone)]
pub struct Bucket {
    pub records: u64,
    pub bytes: u64,
    pub latency: Histogram<u64>,
}

impl Recorder {
    pub fn new(start: Instant) -> Recorder {
        Recorder {
            start,
            records: 0,
            bytes: 0,
            errors: 0,
            latency: histogram(),
            buckets: Vec::new(),
        }
    }

    fn bucket(&mut self, at: Instant) -> Option<&mut Bucket> {
        let i =
            (at.saturating_duration_since(self.start).as_millis() / BUCKET.as_millis()) as usize;
        if i >= BUCKETS_MAX {
            return None;
        }
        while self.buckets.len() <= i {
            self.buckets.push(Bucket {
                records: 0,
                bytes: 0,
                latency: histogram(),
            });
        }
        self.buckets.get_mut(i)
    }

    /// Counts records completed at `at`.
    pub fn count(&mut self, at: Instant, records: u64, bytes: u64) {
        if at < self.start {
            return;
        }
        self.records += records;
        self.bytes += bytes;
        if let Some(b) = self.bucket(at) {
            b.records += records;
            b.bytes += bytes;
        }
    }

    /// Records `n` latencies of `latency`, completed at `at`.
    pub fn latency(&mut self, at: Instant, latency: Duration, n: u64) {
        if at < self.start {
            return;
        }
        let us = (latency.as_micros() as u64).clamp(1, LATENCY_US_MAX);
        let _ = self.latency.record_n(us, n);
        if let Some(b) = self.bucket(at) {
            let _ = b.latency.record_n(us, n);
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.records += other.records;
        self.bytes += other.bytes;
        self.errors += other.errors;
        let _ = self.latency.add(&other.latency);
        for (i, b) in other.buckets.iter().enumerate() {
            if i >= self.buckets.len() {
                self.buckets.push(b.clone());
            } else {
                self.buckets[i].records += b.records;
                self.buckets[i].bytes += b.bytes;
                let _ = self.buckets[i].latency.add(&b.latency);
            }
        }
    }
}

/// Parses sizes such as `1024`, `16KiB`, `1MiB`, `10MB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: expected a size such as 1024 or 16KiB"))?;
    let mult = match unit {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" | "K" | "k" => 1024.0,
        "MiB" | "M" => 1048576.0,
        "GiB" | "G" => 1073741824.0,
        u => return Err(format!("{text:?}: unknown unit {u:?}")),
    };
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("{text:?}: must not be negative"));
    }
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_buckets_and_merge() {
        let t0 = Instant::now();
        let mut a = Recorder::new(t0);
        a.count(t0, 10, 1000);
        a.count(t0 + Duration::from_millis(2500), 5, 500);
        a.latency(t0, Duration::from_millis(3), 10);
        let mut b = Recorder::new(t0);
        b.count(t0 + Duration::from_millis(1500), 1, 100);
        b.latency(
            t0 + Duration::from_millis(1500),
            Duration::from_millis(50),
            1,
        );
        b.errors = 2;
        a.merge(&b);
        assert_eq!((a.records, a.bytes, a.errors), (16, 1600, 2));
        assert_eq!(a.buckets.len(), 3);
        assert_eq!(a.buckets[1].records, 1);
        assert_eq!(a.buckets[2].bytes, 500);
        assert_eq!(a.latency.len(), 11);
        assert!(a.latency.max() >= 49_000);
    }

    #[test]
    fn warm_up_is_not_recorded() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0 + Duration::from_secs(5));
        r.count(t0 + Duration::from_secs(1), 100, 10_000);
        r.latency(t0 + Duration::from_secs(1), Duration::from_secs(2), 100);
        r.count(t0 + Duration::from_millis(5500), 3, 300);
        r.latency(
            t0 + Duration::from_millis(5500),
            Duration::from_millis(4),
            3,
        );
        assert_eq!((r.records, r.bytes, r.latency.len()), (3, 300, 3));
        assert_eq!(r.buckets.len(), 1);
        assert!(r.latency.max() < 5_000);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("16KiB"), Ok(16384));
        assert_eq!(parse_bytes("1MB"), Ok(1_000_000));
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("1XB").is_err());
    }

    #[test]
    fn batches_split_from_headers() {
        use kafka_protocol::records::{
            Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
        };
        let rec = |o: i64| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: o,
            // The encoder starts a new batch when offset - sequence changes.
            sequence: o as i32,
            timestamp: 0,
            key: None,
            value: Some(bytes::Bytes::from_static(b"value")),
            headers: Default::default(),
        };
        let mut buf = bytes::BytesMut::new();
        let opts = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(&mut buf, &[rec(5), rec(6), rec(7)], &opts).expect("encode");
        RecordBatchEncoder::encode(&mut buf, &[rec(8)], &opts).expect("encode");
        let whole = buf.len();
        buf.extend_from_slice(&[0u8; 30]); // a partial trailing batch
        let spans = client::split_batches(buf.freeze());
        assert_eq!(spans.len(), 2);
        assert_eq!(
            (
                spans[0].base_offset,
                spans[0].last_offset,
                spans[0].record_count
            ),
            (5, 7, 3)
        );
        assert_eq!((spans[1].base_offset, spans[1].last_offset), (8, 8));
        assert_eq!(spans[0].bytes.len() + spans[1].bytes.len(), whole);
    }
}

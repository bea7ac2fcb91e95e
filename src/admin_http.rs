//! The admin HTTP endpoint: `/metrics` (the Prometheus text format,
//! version 0.0.4, encoded by `prometheus-client`), `/healthz`, `/readyz`.
//! Runs on the sidecar; a tiny HTTP/1.1 responder, one request per
//! connection.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use floe_engine::metrics::{Metrics, ShardCounter, ShardCounters, UPLOAD_SLOW};
use floe_engine::Engine;
use floe_objstore::{Accounting, Purpose, RequestCounters};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use floe_net::balance::Balance;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest request head read from an admin client.
const REQUEST_BYTES_MAX: usize = 8 << 10;

/// A counter family read from one field of `T`: name, help, the field.
type FieldCounter<T, V> = (&'static str, &'static str, fn(&T) -> &V);

/// The counters every shard keeps, each summed over the shards.
const SHARD_COUNTERS: [FieldCounter<ShardCounters, ShardCounter>; 21] = [
    (
        "floe_produce_payload_bytes_total",
        "RecordBatch bytes accepted from producers.",
        |s| &s.produce_payload_bytes,
    ),
    (
        "floe_produce_copied_bytes_total",
        "RecordBatch bytes copied in user space before upload (the socket read counts once).",
        |s| &s.produce_copied_bytes,
    ),
    (
        "floe_read_cache_copied_bytes_total",
        "Payload bytes copied into the read cache when segments are sealed.",
        |s| &s.cache_copied_bytes,
    ),
    (
        "floe_produce_batches_total",
        "RecordBatches accepted.",
        |s| &s.produce_batches,
    ),
    (
        "floe_fetch_bytes_total",
        "RecordBatch bytes served to consumers.",
        |s| &s.fetch_bytes,
    ),
    (
        "floe_fetch_read_errors_total",
        "Partition reads that failed other than with an offset out of range.",
        |s| &s.fetch_read_errors,
    ),
    (
        "floe_segments_committed_total",
        "Segments uploaded and committed.",
        |s| &s.segments_committed,
    ),
    (
        "floe_segment_bytes_total",
        "Bytes of committed segments.",
        |s| &s.segment_bytes,
    ),
    (
        "floe_segment_upload_failures_total",
        "Segment uploads that failed.",
        |s| &s.upload_failures,
    ),
    (
        "floe_commit_failures_total",
        "Segment commits that failed.",
        |s| &s.commit_failures,
    ),
    ("floe_requests_total", "Kafka requests received.", |s| {
        &s.requests
    }),
    (
        "floe_connections_accepted_total",
        "Kafka connections accepted.",
        |s| &s.connections_accepted,
    ),
    (
        "floe_connections_moved_total",
        "Connections handed to the shard with the fewest, after the kernel's SO_REUSEPORT pick.",
        |s| &s.connections_moved,
    ),
    (
        "floe_admission_waits_total",
        "Requests that waited for the shard's in-flight budget (back-pressure).",
        |s| &s.admission_waits,
    ),
    (
        "floe_connections_idle_closed_total",
        "Client connections closed for sending no request and being owed no answer for connections.max.idle.ms.",
        |s| &s.connections_idle_closed,
    ),
    (
        "floe_bad_frames_total",
        "Connections closed for bad input.",
        |s| &s.bad_frames,
    ),
    (
        "floe_authorization_denied_total",
        "Actions the ACL authorizer refused.",
        |s| &s.authorization_denied,
    ),
    (
        "floe_sasl_authentication_failures_total",
        "SASL authentications that failed (wrong password, unknown user, bad token).",
        |s| &s.sasl_auth_failures,
    ),
    (
        "floe_sasl_authentication_throttled_total",
        "SASL authentications refused unchecked: their address failed too often.",
        |s| &s.sasl_auth_throttled,
    ),
    (
        "floe_fetch_sessions_created_total",
        "Incremental fetch sessions (KIP-227) started.",
        |s| &s.fetch_sessions_created,
    ),
    (
        "floe_fetch_sessions_evicted_total",
        "Idle fetch sessions evicted to make room for new ones.",
        |s| &s.fetch_sessions_evicted,
    ),
];

/// The backend's per-purpose counters exported as one family each.
const BACKEND_COUNTERS: [FieldCounter<RequestCounters, AtomicU64>; 6] = [
    (
        "floe_objstore_backend_failures_total",
        "Backend requests that failed (each retry's failure counts).",
        |c| &c.errors,
    ),
    (
        "floe_objstore_backend_retries_total",
        "Backend requests sent again after a retriable failure.",
        |c| &c.retries,
    ),
    (
        "floe_objstore_backend_throttled_total",
        "Backend requests the store answered with slow-down (503 SlowDown, 429).",
        |c| &c.throttled,
    ),
    (
        "floe_objstore_backend_timeouts_total",
        "Backend requests that got no answer within the attempt timeout.",
        |c| &c.timeouts,
    ),
    (
        "floe_objstore_backend_hedged_reads_total",
        "Ranged reads that started a second, hedging request.",
        |c| &c.hedges,
    ),
    (
        "floe_objstore_backend_hedge_wins_total",
        "Hedged reads answered first by the hedging request.",
        |c| &c.hedge_wins,
    ),
];

/// What `/metrics` reads at each scrape: the engine's counters (each shard's
/// summed), the connections each shard serves, and the object-store
/// backend's own request counts when it keeps them.
pub struct BrokerCollector {
    metrics: Arc<Metrics>,
    balance: Arc<Balance>,
    accounting: Option<Arc<Accounting>>,
}

impl std::fmt::Debug for BrokerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCollector").finish_non_exhaustive()
    }
}

impl Collector for BrokerCollector {
    fn encode(&self, mut out: DescriptorEncoder) -> std::fmt::Result {
        let m = &*self.metrics;
        for (name, help, pick) in SHARD_COUNTERS {
            counter(&mut out, name, help, [(NO_LABELS, m.sum(pick))])?;
        }
        counter(
            &mut out,
            "floe_log_entries_written_total",
            "Commit-log entries this broker wrote.",
            [(NO_LABELS, Metrics::get(&m.log_entries_written))],
        )?;
        counter(
            &mut out,
            "floe_log_cas_conflicts_total",
            "Commit attempts that lost to another broker's commit and were retried.",
            [(NO_LABELS, Metrics::get(&m.log_cas_conflicts))],
        )?;
        counter(
            &mut out,
            "floe_log_snapshot_reloads_total",
            "Times this broker fell behind the trimmed commit log and reloaded the snapshot in place.",
            [(NO_LABELS, Metrics::get(&m.log_snapshot_reloads))],
        )?;
        counter(
            &mut out,
            "floe_archives_written_total",
            "Archive objects this broker wrote that the commit log took.",
            [(NO_LABELS, Metrics::get(&m.archives_written))],
        )?;
        counter(
            &mut out,
            "floe_archive_bytes_total",
            "Bytes of the archive objects this broker wrote that the commit log took.",
            [(NO_LABELS, Metrics::get(&m.archive_bytes))],
        )?;
        counter(
            &mut out,
            "floe_compactions_total",
            "Compacted archive objects this broker wrote that the commit log took.",
            [(NO_LABELS, Metrics::get(&m.compactions))],
        )?;
        counter(
            &mut out,
            "floe_compaction_records_dropped_total",
            "Records this broker's compaction passes left out (superseded values, expired tombstones, records without a key).",
            [(NO_LABELS, Metrics::get(&m.compaction_records_dropped))],
        )?;
        gauge(
            &mut out,
            "floe_producer_ids",
            "Idempotent producer ids the commit log remembers (they expire after a day of silence).",
            [(NO_LABELS, Metrics::get(&m.producer_ids))],
        )?;
        gauge(
            &mut out,
            "floe_log_partitions",
            "Partitions the commit log knows; a deleted topic's are forgotten once its data is trimmed.",
            [(NO_LABELS, Metrics::get(&m.log_partitions))],
        )?;
        gauge(
            &mut out,
            "floe_log_segment_table",
            "Segment keys in this broker's commit-log state: live segments and, until the next renumbering, deleted ones.",
            [(NO_LABELS, Metrics::get(&m.log_segment_table))],
        )?;
        gauge(
            &mut out,
            "floe_connections",
            "Kafka connections open, by the shard serving them.",
            self.balance
                .loads()
                .into_iter()
                .enumerate()
                .map(|(shard, n)| ([("shard", shard)], n as u64)),
        )?;
        gauge(
            &mut out,
            "floe_segment_upload_failures_in_a_row",
            "Segment uploads failed since the last success (object-store health).",
            [(NO_LABELS, Metrics::get(&m.upload_failures_in_a_row))],
        )?;
        gauge(
            &mut out,
            "floe_segment_uploads_slow_in_a_row",
            &format!(
                "Segment uploads slower than {} s since the last faster one (object-store health).",
                UPLOAD_SLOW.as_secs()
            ),
            [(NO_LABELS, Metrics::get(&m.upload_slow_in_a_row))],
        )?;
        let per_call = [
            ("intake", &m.objstore_intake),
            ("fetch", &m.objstore_fetch),
            ("cleanup", &m.objstore_cleanup),
        ];
        counter(
            &mut out,
            "floe_objstore_requests_total",
            "Object-store calls made by the engine (one per put or ranged get, whatever the backend sends), by purpose.",
            per_call.iter().flat_map(|&(purpose, c)| {
                [
                    ("put", &c.puts),
                    ("get", &c.gets),
                    ("delete", &c.deletes),
                    ("list", &c.lists),
                    ("error", &c.errors),
                ]
                .map(|(op, v)| (purpose_op(purpose, op), Metrics::get(v)))
            }),
        )?;
        counter(
            &mut out,
            "floe_objstore_bytes_total",
            "Bytes of successful object-store calls made by the engine, by purpose.",
            per_call
                .iter()
                .flat_map(|&(purpose, c)| bytes_by_op(purpose, c)),
        )?;
        gauge(
            &mut out,
            "floe_buffer_bytes",
            "Memory the shards hold by design, each kind bounded by configuration (summed over shards, as of each shard's last sealed segment): read_cache (what the read cache's budget counts), pack_pool (capacity of the packed segment copies kept: those the read cache pins, and free ones for reuse), frame_pool (capacity of request-frame slabs and buffers kept for reuse).",
            [
                ([("kind", "read_cache")], m.sum(|s| &s.read_cache_bytes)),
                ([("kind", "pack_pool")], m.sum(|s| &s.pack_pool_bytes)),
                ([("kind", "frame_pool")], m.sum(|s| &s.frame_pool_bytes)),
            ],
        )?;
        if let Some(held) = crate::allocator::held() {
            gauge(
                &mut out,
                "floe_allocator_bytes",
                "What the memory allocator holds: in_use (allocated and not freed), mapped (allocated as separate mappings, not freed), free (freed and kept: in glibc's arenas, or jemalloc's resident pages beyond what is allocated).",
                [
                    ([("kind", "in_use")], held.in_use),
                    ([("kind", "mapped")], held.mapped),
                    ([("kind", "free")], held.free),
                ],
            )?;
        }
        if let Some(acc) = &self.accounting {
            backend_families(&mut out, acc)?;
        }
        Ok(())
    }
}

/// The label set of a series without labels.
const NO_LABELS: [(&str, &str); 0] = [];

fn purpose_op(purpose: &'static str, op: &'static str) -> [(&'static str, &'static str); 2] {
    [("purpose", purpose), ("op", op)]
}

/// Put and get bytes of one purpose, as `floe_objstore_*bytes_total` series.
fn bytes_by_op(
    purpose: &'static str,
    c: &RequestCounters,
) -> [([(&'static str, &'static str); 2], u64); 2] {
    [("put", &c.put_bytes), ("get", &c.get_bytes)]
        .map(|(op, v)| (purpose_op(purpose, op), Metrics::get(v)))
}

/// One counter family: HELP, TYPE and a series per label set. `name` is the
/// exposed name; the encoder appends `_total` itself.
fn counter<L: EncodeLabelSet>(
    out: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    debug_assert!(name.ends_with("_total"), "counter {name}");
    let base = name.strip_suffix("_total").unwrap_or(name);
    let family = out.encode_descriptor(base, help, None, MetricType::Counter)?;
    encode_series(family, series, ConstCounter::new)
}

/// One gauge family: HELP, TYPE and a series per label set.
fn gauge<L: EncodeLabelSet>(
    out: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let family = out.encode_descriptor(name, help, None, MetricType::Gauge)?;
    encode_series(family, series, ConstGauge::new)
}

fn encode_series<L: EncodeLabelSet, M: EncodeMetric>(
    mut family: MetricEncoder,
    series: impl IntoIterator<Item = (L, u64)>,
    metric: fn(u64) -> M,
) -> std::fmt::Result {
    for (labels, v) in series {
        metric(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The backend's own request counts (S3: every wire request, multipart
/// parts, retries and hedged reads included), by purpose.
fn backend_families(out: &mut DescriptorEncoder, acc: &Accounting) -> std::fmt::Result {
    let purposes = || Purpose::ALL.into_iter().map(|p| (p.as_str(), acc.of(p)));
    counter(
        out,
        "floe_objstore_backend_requests_total",
        "Requests the object-store backend sent, by purpose and request kind (what the store bills).",
        purposes().flat_map(|(purpose, c)| {
            c.requests_by_op()
                .map(|(op, v)| (purpose_op(purpose, op), v))
        }),
    )?;
    counter(
        out,
        "floe_objstore_backend_bytes_total",
        "Payload bytes of the backend's successful requests, by purpose.",
        purposes().flat_map(|(purpose, c)| bytes_by_op(purpose, c)),
    )?;
    for (name, help, pick) in BACKEND_COUNTERS {
        counter(
            out,
            name,
            help,
            purposes().map(|(purpose, c)| ([("purpose", purpose)], Metrics::get(pick(c)))),
        )?;
    }
    Ok(())
}

/// The commit-latency summaries (quantiles only). prometheus-client has no
/// summary type, so these two families are written here, after the
/// registry's: the text format allows families in any order.
fn commit_latency(out: &mut String, m: &Metrics) {
    let seconds = |v: &AtomicU64| Metrics::get(v) as f64 / 1e6;
    let families = [
        (
            "floe_commit_latency_seconds",
            "Commit latency (metadata CAS round trips and retries) over the last second.",
            vec![
                ("0.5", seconds(&m.commit_latency_p50_us)),
                ("0.99", seconds(&m.commit_latency_p99_us)),
                ("1", seconds(&m.commit_latency_max_us)),
            ],
        ),
        (
            "floe_commit_latency_since_start_seconds",
            "Commit latency since the broker started.",
            vec![
                ("0.5", seconds(&m.commit_latency_total_p50_us)),
                ("0.99", seconds(&m.commit_latency_total_p99_us)),
            ],
        ),
    ];
    for (name, help, quantiles) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
        for (q, v) in quantiles {
            let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
        }
    }
}

/// The `/metrics` registry: one collector that reads everything at scrape
/// time.
pub fn registry(engine: &Engine, balance: Arc<Balance>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BrokerCollector {
        metrics: engine.metrics().clone(),
        balance,
        accounting: engine.object_store_accounting(),
    }));
    registry
}

pub fn render_metrics(registry: &Registry, metrics: &Metrics) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, registry);
    commit_latency(&mut out, metrics);
    out
}

/// `/readyz`: ready once serving, not while shutting down, nor while the
/// engine's health says it cannot serve (the reason is in the body; see
/// `floe_engine::health`).
fn readiness(engine: &Engine, started: bool) -> (&'static str, String) {
    if !started {
        ("503 Service Unavailable", "not ready: starting\n".into())
    } else if engine.shutdown().is_triggered() {
        (
            "503 Service Unavailable",
            "not ready: shutting down\n".into(),
        )
    } else if let Some(reason) = engine.unready_reason() {
        ("503 Service Unavailable", format!("not ready: {reason}\n"))
    } else {
        ("200 OK", "ready\n".into())
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    balance: Arc<Balance>,
    ready: Arc<AtomicBool>,
) {
    let registry = Arc::new(registry(&engine, balance));
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let engine = engine.clone();
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; REQUEST_BYTES_MAX];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let plain = "text/plain; version=0.0.4";
            let (status, content_type, body) = match path {
                "/metrics" => (
                    "200 OK",
                    prometheus_text::CONTENT_TYPE,
                    render_metrics(&registry, engine.metrics()),
                ),
                "/healthz" => ("200 OK", plain, "ok\n".to_string()),
                "/readyz" => {
                    let (status, body) = readiness(&engine, ready.load(Ordering::SeqCst));
                    (status, plain, body)
                }
                _ => ("404 Not Found", plain, "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(metrics: Arc<Metrics>, accounting: Option<Arc<Accounting>>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(BrokerCollector {
            metrics: metrics.clone(),
            balance: Arc::new(Balance::new(2).0),
            accounting,
        }));
        render_metrics(&registry, &metrics)
    }

    /// Dashboards, tests and docs use these names and types: a change here
    /// is a change users see.
    #[test]
    fn families_keep_their_names_and_types() {
        let text = scrape(
            Arc::new(Metrics::new(2)),
            Some(Arc::new(Accounting::default())),
        );
        let mut types: Vec<_> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        types.sort_unstable();
        let mut want = [
            "floe_produce_payload_bytes_total counter",
            "floe_produce_copied_bytes_total counter",
            "floe_read_cache_copied_bytes_total counter",
            "floe_produce_batches_total counter",
            "floe_fetch_bytes_total counter",
            "floe_fetch_read_errors_total counter",
            "floe_segments_committed_total counter",
            "floe_segment_bytes_total counter",
            "floe_segment_upload_failures_total counter",
            "floe_commit_failures_total counter",
            "floe_requests_total counter",
            "floe_connections_accepted_total counter",
            "floe_connections_moved_total counter",
            "floe_admission_waits_total counter",
            "floe_bad_frames_total counter",
            "floe_connections_idle_closed_total counter",
            "floe_authorization_denied_total counter",
            "floe_sasl_authentication_failures_total counter",
            "floe_sasl_authentication_throttled_total counter",
            "floe_fetch_sessions_created_total counter",
            "floe_fetch_sessions_evicted_total counter",
            "floe_log_entries_written_total counter",
            "floe_log_partitions gauge",
            "floe_log_segment_table gauge",
            "floe_log_cas_conflicts_total counter",
            "floe_log_snapshot_reloads_total counter",
            "floe_archives_written_total counter",
            "floe_archive_bytes_total counter",
            "floe_compactions_total counter",
            "floe_compaction_records_dropped_total counter",
            "floe_producer_ids gauge",
            "floe_connections gauge",
            "floe_segment_upload_failures_in_a_row gauge",
            "floe_segment_uploads_slow_in_a_row gauge",
            "floe_commit_latency_seconds summary",
            "floe_commit_latency_since_start_seconds summary",
            "floe_objstore_requests_total counter",
            "floe_objstore_bytes_total counter",
            "floe_buffer_bytes gauge",
            "floe_objstore_backend_requests_total counter",
            "floe_objstore_backend_bytes_total counter",
            "floe_objstore_backend_failures_total counter",
            "floe_objstore_backend_retries_total counter",
            "floe_objstore_backend_throttled_total counter",
            "floe_objstore_backend_timeouts_total counter",
            "floe_objstore_backend_hedged_reads_total counter",
            "floe_objstore_backend_hedge_wins_total counter",
        ]
        .to_vec();
        if crate::allocator::held().is_some() {
            want.push("floe_allocator_bytes gauge");
        }
        want.sort_unstable();
        assert_eq!(types, want);
        // Each family's series follow its TYPE line, named after it.
        let mut family = "";
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                family = t.split(' ').next().unwrap_or("");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                assert_eq!(name, family, "{line}");
            }
        }
    }

    #[test]
    fn series_carry_their_labels_and_values() {
        let metrics = Arc::new(Metrics::new(2));
        Metrics::add(&metrics.log_entries_written, 3);
        Metrics::set(&metrics.commit_latency_p99_us, 1500);
        metrics.objstore_fetch.get(10);
        let accounting = Arc::new(Accounting::default());
        RequestCounters::bump(&accounting.of(Purpose::Intake).multipart_parts);
        RequestCounters::bump(&accounting.of(Purpose::Cleanup).retries);
        let text = scrape(metrics, Some(accounting));
        for line in [
            "floe_log_entries_written_total 3",
            "floe_requests_total 0",
            "floe_connections{shard=\"1\"} 0",
            "floe_commit_latency_seconds{quantile=\"0.99\"} 0.0015",
            "floe_objstore_requests_total{purpose=\"fetch\",op=\"get\"} 1",
            "floe_objstore_bytes_total{purpose=\"fetch\",op=\"get\"} 10",
            "floe_objstore_backend_requests_total{purpose=\"intake\",op=\"upload_part\"} 1",
            "floe_objstore_backend_retries_total{purpose=\"cleanup\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }

    #[test]
    fn without_backend_accounting_there_are_no_backend_families() {
        let text = scrape(Arc::new(Metrics::new(1)), None);
        assert!(!text.contains("floe_objstore_backend_"));
        assert!(text.contains("floe_objstore_requests_total"));
    }
}

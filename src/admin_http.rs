//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz`,
//! `/readyz`. Runs on the sidecar; a tiny HTTP/1.1 responder, one request
//! per connection.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use floe_engine::metrics::Metrics;
use floe_engine::Engine;
use floe_objstore::{Accounting, Purpose, RequestCounters};

use floe_net::balance::Balance;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest request head read from an admin client.
const REQUEST_BYTES_MAX: usize = 8 << 10;

pub fn render_metrics(engine: &Engine, balance: &Balance) -> String {
    let m = engine.metrics();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        "floe_produce_payload_bytes_total",
        "RecordBatch bytes accepted from producers.",
        Metrics::get(&m.produce_payload_bytes),
    );
    counter(
        "floe_produce_copied_bytes_total",
        "RecordBatch bytes copied in user space before upload (the socket read counts once).",
        Metrics::get(&m.produce_copied_bytes),
    );
    counter(
        "floe_produce_batches_total",
        "RecordBatches accepted.",
        Metrics::get(&m.produce_batches),
    );
    counter(
        "floe_fetch_bytes_total",
        "RecordBatch bytes served to consumers.",
        Metrics::get(&m.fetch_bytes),
    );
    counter(
        "floe_fetch_read_errors_total",
        "Partition reads that failed other than with an offset out of range.",
        Metrics::get(&m.fetch_read_errors),
    );
    counter(
        "floe_segments_committed_total",
        "Segments uploaded and committed.",
        Metrics::get(&m.segments_committed),
    );
    counter(
        "floe_segment_bytes_total",
        "Bytes of committed segments.",
        Metrics::get(&m.segment_bytes),
    );
    counter(
        "floe_segment_upload_failures_total",
        "Segment uploads that failed.",
        Metrics::get(&m.upload_failures),
    );
    counter(
        "floe_commit_failures_total",
        "Segment commits that failed.",
        Metrics::get(&m.commit_failures),
    );
    counter(
        "floe_requests_total",
        "Kafka requests received.",
        Metrics::get(&m.requests),
    );
    counter(
        "floe_connections_accepted_total",
        "Kafka connections accepted.",
        Metrics::get(&m.connections_accepted),
    );
    counter(
        "floe_connections_moved_total",
        "Connections handed to the shard with the fewest, after the kernel's SO_REUSEPORT pick.",
        Metrics::get(&m.connections_moved),
    );
    counter(
        "floe_admission_waits_total",
        "Requests that waited for the shard's in-flight budget (back-pressure).",
        Metrics::get(&m.admission_waits),
    );
    counter(
        "floe_bad_frames_total",
        "Connections closed for bad input.",
        Metrics::get(&m.bad_frames),
    );
    counter(
        "floe_log_entries_written_total",
        "Commit-log entries this broker wrote.",
        Metrics::get(&m.log_entries_written),
    );
    counter(
        "floe_log_cas_conflicts_total",
        "Commit attempts that lost to another broker's commit and were retried.",
        Metrics::get(&m.log_cas_conflicts),
    );
    let _ = writeln!(
        out,
        "# HELP floe_connections Kafka connections open, by the shard serving them.\n# TYPE floe_connections gauge"
    );
    for (shard, n) in balance.loads().into_iter().enumerate() {
        let _ = writeln!(out, "floe_connections{{shard=\"{shard}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP floe_segment_upload_failures_in_a_row Segment uploads failed since the last success (object-store health).\n# TYPE floe_segment_upload_failures_in_a_row gauge\nfloe_segment_upload_failures_in_a_row {}",
        Metrics::get(&m.upload_failures_in_a_row)
    );
    let _ = writeln!(
        out,
        "# HELP floe_segment_uploads_slow_in_a_row Segment uploads slower than {} s since the last faster one (object-store health).\n# TYPE floe_segment_uploads_slow_in_a_row gauge\nfloe_segment_uploads_slow_in_a_row {}",
        floe_engine::metrics::UPLOAD_SLOW.as_secs(),
        Metrics::get(&m.upload_slow_in_a_row)
    );
    let _ = writeln!(
        out,
        "# HELP floe_commit_latency_seconds Commit latency (metadata CAS round trips and retries) over the last second.\n# TYPE floe_commit_latency_seconds summary"
    );
    for (q, v) in [
        ("0.5", Metrics::get(&m.commit_latency_p50_us)),
        ("0.99", Metrics::get(&m.commit_latency_p99_us)),
        ("1", Metrics::get(&m.commit_latency_max_us)),
    ] {
        let _ = writeln!(
            out,
            "floe_commit_latency_seconds{{quantile=\"{q}\"}} {}",
            v as f64 / 1e6
        );
    }
    let _ = writeln!(
        out,
        "# HELP floe_commit_latency_since_start_seconds Commit latency since the broker started.\n# TYPE floe_commit_latency_since_start_seconds summary"
    );
    for (q, v) in [
        ("0.5", Metrics::get(&m.commit_latency_total_p50_us)),
        ("0.99", Metrics::get(&m.commit_latency_total_p99_us)),
    ] {
        let _ = writeln!(
            out,
            "floe_commit_latency_since_start_seconds{{quantile=\"{q}\"}} {}",
            v as f64 / 1e6
        );
    }
    // Each family's lines stay together, as the text format requires.
    let per_call = [
        ("intake", &m.objstore_intake),
        ("fetch", &m.objstore_fetch),
        ("cleanup", &m.objstore_cleanup),
    ];
    family(
        &mut out,
        "floe_objstore_requests_total",
        "Object-store calls made by the engine (one per put or ranged get, whatever the backend sends), by purpose.",
        per_call.iter().flat_map(|(purpose, c)| {
            [
                ("put", &c.puts),
                ("get", &c.gets),
                ("delete", &c.deletes),
                ("list", &c.lists),
                ("error", &c.errors),
            ]
            .map(|(op, v)| (format!("purpose=\"{purpose}\",op=\"{op}\""), Metrics::get(v)))
        }),
    );
    family(
        &mut out,
        "floe_objstore_bytes_total",
        "Bytes of successful object-store calls made by the engine, by purpose.",
        per_call.iter().flat_map(|(purpose, c)| {
            [("put", &c.put_bytes), ("get", &c.get_bytes)].map(|(op, v)| {
                (
                    format!("purpose=\"{purpose}\",op=\"{op}\""),
                    Metrics::get(v),
                )
            })
        }),
    );
    if let Some(acc) = engine.object_store_accounting() {
        backend_families(&mut out, &acc);
    }
    out
}

/// One counter family: HELP, TYPE and a line per label set.
fn family(
    out: &mut String,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (String, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, v) in series {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// The backend's own request counts (S3: every wire request, multipart
/// parts, retries and hedged reads included), by purpose.
fn backend_families(out: &mut String, acc: &Accounting) {
    let purposes = || Purpose::ALL.into_iter().map(|p| (p.as_str(), acc.of(p)));
    family(
        out,
        "floe_objstore_backend_requests_total",
        "Requests the object-store backend sent, by purpose and request kind (what the store bills).",
        purposes().flat_map(|(purpose, c)| {
            c.requests_by_op()
                .map(|(op, v)| (format!("purpose=\"{purpose}\",op=\"{op}\""), v))
        }),
    );
    family(
        out,
        "floe_objstore_backend_bytes_total",
        "Payload bytes of the backend's successful requests, by purpose.",
        purposes().flat_map(|(purpose, c)| {
            [("put", &c.put_bytes), ("get", &c.get_bytes)].map(|(op, v)| {
                (
                    format!("purpose=\"{purpose}\",op=\"{op}\""),
                    Metrics::get(v),
                )
            })
        }),
    );
    for (name, help, pick) in [
        (
            "floe_objstore_backend_failures_total",
            "Backend requests that failed (each retry's failure counts).",
            (|c| &c.errors) as fn(&RequestCounters) -> &AtomicU64,
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
    ] {
        family(
            out,
            name,
            help,
            purposes()
                .map(|(purpose, c)| (format!("purpose=\"{purpose}\""), Metrics::get(pick(c)))),
        );
    }
}

/// Consecutive failed segment uploads after which the broker reports
/// itself not ready: its producers are getting errors.
pub const UPLOAD_FAILURES_NOT_READY: u64 = 3;

/// `/readyz`: ready once serving, not while shutting down or while the
/// object store keeps failing or crawling (with the reason in the body).
fn readiness(engine: &Engine, started: bool) -> (&'static str, String) {
    let failing = Metrics::get(&engine.metrics().upload_failures_in_a_row);
    let slow = Metrics::get(&engine.metrics().upload_slow_in_a_row);
    if !started {
        ("503 Service Unavailable", "not ready: starting\n".into())
    } else if engine.shutdown().is_triggered() {
        (
            "503 Service Unavailable",
            "not ready: shutting down\n".into(),
        )
    } else if failing >= UPLOAD_FAILURES_NOT_READY {
        (
            "503 Service Unavailable",
            format!("not ready: the last {failing} segment uploads to the object store failed\n"),
        )
    } else if slow >= UPLOAD_FAILURES_NOT_READY {
        (
            "503 Service Unavailable",
            format!(
                "not ready: the last {slow} segment uploads to the object store each took over {} s; producers are being slowed down\n",
                floe_engine::metrics::UPLOAD_SLOW.as_secs()
            ),
        )
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
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let engine = engine.clone();
        let balance = balance.clone();
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
            let (status, body) = match path {
                "/metrics" => ("200 OK", render_metrics(&engine, &balance)),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/readyz" => readiness(&engine, ready.load(Ordering::SeqCst)),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz`,
//! `/readyz`. Runs on the sidecar; a tiny HTTP/1.1 responder, one request
//! per connection.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use floe_engine::metrics::Metrics;
use floe_engine::Engine;
use floe_objstore::RequestCounters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest request head read from an admin client.
const REQUEST_BYTES_MAX: usize = 8 << 10;

pub fn render_metrics(engine: &Engine) -> String {
    let m = &engine.metrics;
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
        "floe_bad_frames_total",
        "Connections closed for bad input.",
        Metrics::get(&m.bad_frames),
    );
    let mut objstore = |purpose: &str, c: &RequestCounters| {
        for (op, v) in [
            ("put", Metrics::get(&c.puts)),
            ("get", Metrics::get(&c.gets)),
            ("delete", Metrics::get(&c.deletes)),
            ("list", Metrics::get(&c.lists)),
            ("error", Metrics::get(&c.errors)),
        ] {
            let _ = writeln!(
                out,
                "floe_objstore_requests_total{{purpose=\"{purpose}\",op=\"{op}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "floe_objstore_bytes_total{{purpose=\"{purpose}\",op=\"put\"}} {}",
            Metrics::get(&c.put_bytes)
        );
        let _ = writeln!(
            out,
            "floe_objstore_bytes_total{{purpose=\"{purpose}\",op=\"get\"}} {}",
            Metrics::get(&c.get_bytes)
        );
    };
    objstore("intake", &m.objstore_intake);
    objstore("fetch", &m.objstore_fetch);
    out
}

pub async fn serve(listener: tokio::net::TcpListener, engine: Arc<Engine>, ready: Arc<AtomicBool>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let engine = engine.clone();
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
                "/metrics" => ("200 OK", render_metrics(&engine)),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/readyz" if ready.load(Ordering::SeqCst) && !engine.shutdown.is_triggered() => {
                    ("200 OK", "ready\n".to_string())
                }
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_string()),
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

//! A minimal pipelined Kafka client on tokio and the kafka-protocol crate:
//! one TCP connection, many requests in flight, replies matched by
//! correlation id. Only what the load generator needs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::BenchError;

/// Largest response frame accepted; a bigger length prefix means a broken
/// stream, not a big reply.
pub const RESPONSE_BYTES_MAX: usize = 256 << 20;

type Pending = Arc<Mutex<HashMap<i32, oneshot::Sender<Bytes>>>>;

/// One connection. Cheap to share (`Arc`) between the tasks of one worker.
pub struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    correlation: AtomicI32,
    /// Highest version the broker supports, per API key.
    versions: HashMap<i16, i16>,
    pub addr: String,
}

/// A reply not yet arrived.
pub struct Reply<R> {
    rx: oneshot::Receiver<Bytes>,
    version: i16,
    _r: std::marker::PhantomData<R>,
}

impl<R: Decodable + HeaderVersion> Reply<R> {
    pub async fn wait(self) -> Result<R, BenchError> {
        let mut body = self.rx.await.map_err(|_| BenchError::Closed)?;
        ResponseHeader::decode(&mut body, R::header_version(self.version))
            .map_err(|e| BenchError::Decode(e.to_string()))?;
        R::decode(&mut body, self.version).map_err(|e| BenchError::Decode(e.to_string()))
    }
}

impl Conn {
    /// Connects and asks the broker which versions it speaks.
    pub async fn connect(addr: &str) -> Result<Arc<Conn>, BenchError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| BenchError::Io(format!("connecting to {addr}: {e}")))?;
        // Latency matters more than packet count here.
        let _ = stream.set_nodelay(true);
        let (mut read, write) = stream.into_split();
        let pending: Pending = Arc::default();
        let reader_pending = pending.clone();
        tokio::spawn(async move {
            let mut len = [0u8; 4];
            loop {
                if read.read_exact(&mut len).await.is_err() {
                    break;
                }
                let n = u32::from_be_bytes(len) as usize;
                if !(4..=RESPONSE_BYTES_MAX).contains(&n) {
                    break;
                }
                let mut body = BytesMut::zeroed(n);
                if read.read_exact(&mut body).await.is_err() {
                    break;
                }
                let corr = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let tx = reader_pending.lock().ok().and_then(|mut p| p.remove(&corr));
                if let Some(tx) = tx {
                    let _ = tx.send(body.freeze());
                }
            }
            // Dropping the senders fails every waiting request.
            if let Ok(mut p) = reader_pending.lock() {
                p.clear();
            }
        });
        let mut conn = Conn {
            writer: tokio::sync::Mutex::new(write),
            pending,
            correlation: AtomicI32::new(1),
            versions: HashMap::new(),
            addr: addr.to_string(),
        };
        let resp: ApiVersionsResponse = conn
            .send_versioned(ApiVersionsRequest::default(), 0)
            .await?
            .wait()
            .await?;
        if resp.error_code != 0 {
            return Err(BenchError::Kafka("ApiVersions", resp.error_code));
        }
        conn.versions = resp
            .api_keys
            .iter()
            .map(|k| (k.api_key, k.max_version))
            .collect();
        Ok(Arc::new(conn))
    }

    /// The version to use for `R`: the broker's highest, at most `ours`;
    /// an error if that is below `min`.
    pub fn version<R: Request>(&self, ours: i16, min: i16) -> Result<i16, BenchError> {
        let theirs = self.versions.get(&R::KEY).copied().unwrap_or(-1);
        let v = theirs.min(ours);
        if v < min {
            return Err(BenchError::Unsupported(R::KEY, theirs));
        }
        Ok(v)
    }

    fn encode<R: Encodable + HeaderVersion + Request>(
        &self,
        req: &R,
        version: i16,
        corr: i32,
    ) -> Result<Bytes, BenchError> {
        // Sized up front: a produce request grown by doubling copied its
        // records several times.
        let body = req.compute_size(version).unwrap_or(0);
        let mut buf = BytesMut::with_capacity(body + 128);
        buf.put_i32(0);
        RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(corr)
            .with_client_id(Some(StrBytes::from_static_str("floe-bench")))
            .encode(&mut buf, R::header_version(version))
            .map_err(|e| BenchError::Encode(e.to_string()))?;
        req.encode(&mut buf, version)
            .map_err(|e| BenchError::Encode(e.to_string()))?;
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        Ok(buf.freeze())
    }

    async fn write(&self, frame: Bytes) -> Result<(), BenchError> {
        let mut w = self.writer.lock().await;
        w.write_all(&frame)
            .await
            .map_err(|e| BenchError::Io(format!("writing to {}: {e}", self.addr)))
    }

    /// Sends `req` at `version`; the reply can be awaited later, so many
    /// requests can be in flight on one connection.
    pub async fn send_versioned<R: Request>(
        &self,
        req: R,
        version: i16,
    ) -> Result<Reply<R::Response>, BenchError> {
        let corr = self.correlation.fetch_add(1, Ordering::Relaxed);
        let frame = self.encode(&req, version, corr)?;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| BenchError::Closed)?
            .insert(corr, tx);
        self.write(frame).await?;
        Ok(Reply {
            rx,
            version,
            _r: std::marker::PhantomData,
        })
    }

    /// Sends a request that gets no reply (produce with acks=0).
    pub async fn send_no_reply<R: Request>(&self, req: R, version: i16) -> Result<(), BenchError> {
        let corr = self.correlation.fetch_add(1, Ordering::Relaxed);
        let frame = self.encode(&req, version, corr)?;
        self.write(frame).await
    }
}

/// One record batch found in a fetched `records` field.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSpan {
    pub base_offset: i64,
    pub last_offset: i64,
    pub record_count: i32,
    /// The whole batch (for decoding records when needed).
    pub bytes: Bytes,
}

/// Splits fetched bytes into whole v2 batches from their headers alone (a
/// trailing partial batch, which brokers may send, is ignored).
pub fn split_batches(mut records: Bytes) -> Vec<BatchSpan> {
    let mut out = Vec::new();
    // baseOffset(8) batchLength(4) ... lastOffsetDelta at 23, records count at 57.
    while records.len() >= 61 {
        let base_offset = (&records[0..8]).get_i64();
        let len = (&records[8..12]).get_i32();
        if len < 49 {
            break;
        }
        let total = 12 + len as usize;
        if records.len() < total {
            break;
        }
        let last_delta = (&records[23..27]).get_i32();
        let record_count = (&records[57..61]).get_i32();
        let bytes = records.split_to(total);
        out.push(BatchSpan {
            base_offset,
            last_offset: base_offset + i64::from(last_delta),
            record_count,
            bytes,
        });
    }
    out
}

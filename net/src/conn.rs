//! One client connection: a thin socket loop. The reader admits each frame
//! against the shard's in-flight budget (before allocating it), decodes the
//! header, and starts the request; the writer sends responses in request
//! order. Bad input ends this connection with one log line and touches
//! nothing else.
//!
//! The connection also keeps what floe knows about its client (the
//! [`ClientView`]): the listener it came in on, the zone and host override
//! its `client.id` states, and the `rack_id` it sends in Fetch. Handlers
//! read it to decide which brokers this client sees.

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::{Buf, Bytes, BytesMut};
use floe_engine::metrics::Metrics;
use futures::channel::mpsc;
use futures::future::{select, Either};
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures::{SinkExt, StreamExt};
use glommio::net::TcpStream;
use glommio::sync::StaticPermit;
use kafka_protocol::messages::ApiKey;

use crate::client_id;
use crate::discovery::ClientView;
use crate::handlers::{self, Ctx, Pending, Reply};
use crate::request::Request;
use crate::request::{self, DecodeError, Decoded, FRAME_BYTES_MIN};

/// Requests a connection may have started but not yet answered.
pub const PIPELINE_DEPTH_MAX: usize = 128;
/// Parts below this size are gathered into one send; larger stored batches
/// are written from their own buffers (glommio 0.9 has no writev).
const GATHER_BYTES_MAX: usize = 16 << 10;

struct Outgoing {
    correlation_id: i32,
    header_version: i16,
    reply: Pending,
    _permit: StaticPermit,
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    Closed,
    ShuttingDown,
    Refused(String),
}

pub async fn serve(mut ctx: Ctx, stream: TcpStream, peer: SocketAddr) {
    ctx.peer = Some(peer);
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.split();
    let (tx, rx) = mpsc::channel::<Outgoing>(PIPELINE_DEPTH_MAX);
    let writer = glommio::spawn_local(write_loop(wr, rx, peer));
    match read_loop(&ctx, rd, tx, peer).await {
        End::Refused(why) => {
            Metrics::add(&ctx.broker.engine.metrics.bad_frames, 1);
            tracing::warn!(%peer, "closing connection: {why}");
        }
        End::Closed | End::ShuttingDown => {}
    }
    writer.await;
}

/// The client as this connection knows it so far; `refresh` updates the
/// view only when the client id or the Fetch rack changes (rarely: once).
struct ClientState {
    client_id: Option<Rc<str>>,
    rack: Option<String>,
}

impl ClientState {
    fn refresh(&mut self, ctx: &mut Ctx, client_id: Option<&str>, request: &Request) {
        let rack = match request {
            Request::Fetch(f) if !f.rack_id.is_empty() => Some(f.rack_id.as_str()),
            _ => None,
        };
        let id_changed = self.client_id.as_deref() != client_id;
        let rack_changed = rack.is_some() && self.rack.as_deref() != rack;
        if !id_changed && !rack_changed {
            return;
        }
        if id_changed {
            self.client_id = client_id.map(Rc::from);
        }
        if rack_changed {
            self.rack = rack.map(str::to_string);
        }
        let features = client_id.map(client_id::parse).unwrap_or_default();
        let view = ctx.client.with_features(&features, self.rack.as_deref());
        if view != *ctx.client {
            tracing::debug!(client_id = ?client_id, zone = ?view.zone, host_override = ?view.host_override, listener = %view.listener, "client view");
            ctx.client = Rc::new(view);
        }
        ctx.client_id = self.client_id.clone();
    }
}

/// The view of a client that just connected to `listener`.
pub fn new_client(listener: &str) -> Rc<ClientView> {
    Rc::new(ClientView::on_listener(listener))
}

async fn read_loop(
    ctx: &Ctx,
    mut rd: ReadHalf<TcpStream>,
    mut tx: mpsc::Sender<Outgoing>,
    peer: SocketAddr,
) -> End {
    let mut conn_ctx = ctx.clone();
    let mut client = ClientState {
        client_id: None,
        rack: None,
    };
    let broker = ctx.broker.clone();
    let max_request = broker.settings.max_request_bytes;
    let budget_max = broker.engine.config.inflight_bytes_max;
    loop {
        let mut prefix = [0u8; 4];
        {
            let read = Box::pin(rd.read_exact(&mut prefix));
            let stop = Box::pin(broker.engine.shutdown.wait());
            match select(read, stop).await {
                Either::Left((Ok(()), _)) => {}
                Either::Left((Err(_), _)) => return End::Closed,
                Either::Right(_) => return End::ShuttingDown,
            }
        }
        let len = i32::from_be_bytes(prefix);
        if len < FRAME_BYTES_MIN as i32 || len as usize > max_request {
            return End::Refused(format!(
                "frame length {len} outside {FRAME_BYTES_MIN}..={max_request} (socket.request.max.bytes)"
            ));
        }
        let len = len as usize;
        // Admit by memory before reading the body: when the shard's budget
        // is spent, this connection stops reading (TCP back-pressure).
        let need = len.min(budget_max) as u64;
        if ctx.shard.budget.available() < need {
            Metrics::add(&ctx.broker.engine.metrics.admission_waits, 1);
        }
        let permit = match ctx.shard.budget.acquire_static_permit(need).await {
            Ok(p) => p,
            Err(_) => return End::ShuttingDown,
        };
        let mut buf = ctx.shard.frames.take(len);
        if let Err(e) = rd.read_exact(&mut buf).await {
            return End::Refused(format!("truncated frame of {len} bytes: {e}"));
        }
        let frame: Bytes = buf.freeze();
        Metrics::add(&broker.engine.metrics.requests, 1);
        let decoded = match request::decode(frame) {
            Ok(d) => d,
            Err(DecodeError::Unsupported {
                api: ApiKey::ApiVersions,
                correlation_id,
                ..
            }) => {
                // KIP-511: answer in v0 with UNSUPPORTED_VERSION and our
                // ranges, so the client retries with one we support.
                let reply = handlers::api_versions_unsupported();
                let out = Outgoing {
                    correlation_id,
                    header_version: 0,
                    reply: Box::pin(async move { reply }),
                    _permit: permit,
                };
                if tx.send(out).await.is_err() {
                    return End::Closed;
                }
                continue;
            }
            Err(e) => return End::Refused(format!("{e} (peer {peer})")),
        };
        let Decoded {
            api,
            version,
            correlation_id,
            header,
            request,
        } = decoded;
        client.refresh(&mut conn_ctx, header.client_id.as_deref(), &request);
        let ctx = conn_ctx.clone();
        let reply = handlers::dispatch(&ctx, request, version).await;
        let out = Outgoing {
            correlation_id,
            header_version: api.response_header_version(version),
            reply,
            _permit: permit,
        };
        if tx.send(out).await.is_err() {
            return End::Closed;
        }
    }
}

async fn write_loop(
    mut wr: WriteHalf<TcpStream>,
    mut rx: mpsc::Receiver<Outgoing>,
    peer: SocketAddr,
) {
    while let Some(out) = rx.next().await {
        let parts = match out.reply.await {
            Reply::Body(b) => vec![b.freeze()],
            Reply::Parts(p) => p,
            Reply::Nothing => continue,
            Reply::Close => break,
        };
        let body: usize = parts.iter().map(Bytes::remaining).sum();
        let mut head = BytesMut::with_capacity(GATHER_BYTES_MAX);
        let header_len = if out.header_version >= 1 { 5 } else { 4 };
        head.extend_from_slice(&((header_len + body) as i32).to_be_bytes());
        head.extend_from_slice(&out.correlation_id.to_be_bytes());
        if out.header_version >= 1 {
            head.extend_from_slice(&[0]); // no tagged fields
        }
        let result = send(&mut wr, head, parts).await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client went away");
            return;
        }
    }
    let _ = wr.close().await;
}

/// Writes `head` followed by `parts`: small parts are gathered into `head`
/// (flushed whenever it fills), large ones written from their own buffers.
async fn send(
    wr: &mut WriteHalf<TcpStream>,
    mut head: BytesMut,
    parts: Vec<Bytes>,
) -> std::io::Result<()> {
    for p in parts {
        if p.len() < GATHER_BYTES_MAX {
            head.extend_from_slice(&p);
            if head.len() >= GATHER_BYTES_MAX {
                wr.write_all(&head).await?;
                head.clear();
            }
        } else {
            if !head.is_empty() {
                wr.write_all(&head).await?;
                head.clear();
            }
            wr.write_all(&p).await?;
        }
    }
    if !head.is_empty() {
        wr.write_all(&head).await?;
    }
    Ok(())
}

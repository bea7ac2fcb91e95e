//! One client connection: a thin socket loop. The reader admits each frame
//! against the shard's in-flight budget (before allocating it), decodes the
//! header, and starts the request; the writer sends responses in request
//! order. Bad input ends this connection with one log line and touches
//! nothing else.
//!
//! The loop is generic over the stream: a plain `TcpStream`, or a TLS
//! stream on SSL listeners (tls.rs). Each is its own monomorphised copy,
//! so PLAINTEXT keeps its direct writes with no TLS indirection.
//!
//! On SASL listeners a [`sasl::Session`] gates the connection: until it
//! has authenticated, only ApiVersions, SaslHandshake and SaslAuthenticate
//! are served, frames are capped at
//! [`sasl::UNAUTHENTICATED_FRAME_BYTES_MAX`], and anything else closes it.
//!
//! A connection that sends no request and is owed no answer for
//! `connections.max.idle.ms` is closed, as Kafka does: a client that
//! leaked it or went away without a FIN holds no socket, buffers or
//! sessions for ever. A long-poll fetch in flight keeps it open.
//!
//! The connection also keeps what floe knows about its client (the
//! [`ClientView`]): the listener it came in on, the zone and host override
//! its `client.id` states, and the `rack_id` it sends in Fetch. Handlers
//! read it to decide which brokers this client sees.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::channel::mpsc;
use futures::future::{select, Either};
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use futures::{SinkExt, StreamExt};
use glommio::sync::StaticPermit;
use kafka_protocol::messages::ApiKey;

use crate::auth_limit;
use crate::client_id;
use crate::discovery::ClientView;
use crate::handlers::{self, Ctx, Pending, Reply};
use crate::request::Request;
use crate::request::{self, DecodeError, Decoded, FRAME_BYTES_MIN};
use crate::sasl;

/// Requests a connection may have started but not yet answered.
pub const PIPELINE_DEPTH_MAX: usize = 128;
/// Parts below this size are gathered into one send; larger stored batches
/// are written from their own buffers (glommio 0.9 has no writev).
const GATHER_BYTES_MAX: usize = 16 << 10;
/// `header_version` of a response written without a header: the empty
/// frame that accepts a SASL v0 bare token.
const NO_HEADER: i16 = -1;

struct Outgoing {
    correlation_id: i32,
    header_version: i16,
    reply: Pending,
    _permit: StaticPermit,
}

/// When a connection last did something, and how many answers it owes:
/// the reader counts each request it reads, the writer each answer it
/// sends (or drops, for acks=0).
#[derive(Debug)]
struct Activity {
    last: Cell<Instant>,
    owed: Cell<usize>,
}

impl Activity {
    fn new() -> Self {
        Self {
            last: Cell::new(Instant::now()),
            owed: Cell::new(0),
        }
    }

    fn request_read(&self) {
        self.last.set(Instant::now());
        self.owed.set(self.owed.get() + 1);
    }

    fn answered(&self) {
        self.last.set(Instant::now());
        self.owed.set(self.owed.get().saturating_sub(1));
    }

    /// How much longer until the connection has been idle `max` (zero:
    /// it has). A connection owing an answer is not idle: checked again
    /// after `max`.
    fn idle_in(&self, max: Duration) -> Duration {
        if self.owed.get() > 0 {
            return max;
        }
        max.saturating_sub(self.last.get().elapsed())
    }
}

/// Resolves, with `max`, once the connection has been idle that long;
/// never when `max` is None.
async fn idle_for(max: Option<Duration>, activity: &Activity) -> Duration {
    let Some(max) = max else {
        return futures::future::pending().await;
    };
    loop {
        let left = activity.idle_in(max);
        if left.is_zero() {
            return max;
        }
        glommio::timer::sleep(left).await;
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    Closed,
    ShuttingDown,
    /// No request and no answer owed for `connections.max.idle.ms`.
    Idle(Duration),
    Refused(String),
    /// Refused after the last answer was queued (failed authentication):
    /// the writer sends it, then closes.
    Answered(String),
}

/// A stream a connection is served over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + 'static {
    /// Writes may stay in a buffer until flushed (a TLS record whose tail
    /// did not fit in the socket). Plain TCP writes go straight to the
    /// socket, so its writer never pays for a flush.
    const BUFFERED: bool;

    /// The client's certificate (DER), when it sent one over TLS.
    fn peer_certificate(&self) -> Option<Vec<u8>> {
        None
    }
}

impl Stream for glommio::net::TcpStream {
    const BUFFERED: bool = false;
}

impl Stream for futures_rustls::server::TlsStream<glommio::net::TcpStream> {
    const BUFFERED: bool = true;

    fn peer_certificate(&self) -> Option<Vec<u8>> {
        let certs = self.get_ref().1.peer_certificates()?;
        certs.first().map(|c| c.as_ref().to_vec())
    }
}

/// Serves one connection until the client leaves or the broker shuts down.
/// `sasl` is set on SASL listeners.
pub async fn serve<S: Stream>(
    mut ctx: Ctx,
    stream: S,
    peer: SocketAddr,
    sasl: Option<Arc<sasl::SaslConfig>>,
) {
    ctx.peer = Some(peer);
    ctx.host = Rc::from(peer.ip().to_canonical().to_string());
    // The listener's template is shared; each connection is muted alone.
    ctx.muted_until = Rc::default();
    // A client certificate names the connection (SSL listeners); a SASL
    // login names it once it authenticates.
    if let Some(der) = stream.peer_certificate() {
        let named = crate::principal::subject_dn(&der)
            .and_then(|dn| ctx.mapping_rules.apply(&dn).map(|name| (dn, name)));
        match named {
            Ok((dn, name)) => {
                tracing::debug!(%peer, listener = %ctx.client.listener, %dn, principal = %format!("User:{name}"), "TLS client authenticated");
                ctx.principal = Rc::from(format!("User:{name}"));
            }
            Err(why) => {
                tracing::warn!(%peer, listener = %ctx.client.listener, "closing connection: {why}");
                return;
            }
        }
    }
    let (mut rd, wr) = stream.split();
    let (tx, rx) = mpsc::channel::<Outgoing>(PIPELINE_DEPTH_MAX);
    let activity = Rc::new(Activity::new());
    let writer = glommio::spawn_local(write_loop(wr, rx, peer, activity.clone()));
    let session = sasl.map(sasl::Session::new);
    let end = read_loop(&ctx, &mut rd, tx, peer, session, &activity).await;
    let shutting_down = matches!(end, End::ShuttingDown);
    match end {
        End::Refused(why) => {
            ctx.shard.counters().bad_frames.add(1);
            tracing::warn!(%peer, "closing connection: {why}");
        }
        End::Answered(why) => {
            tracing::warn!(%peer, listener = %ctx.client.listener, "closing connection: {why}");
        }
        End::Idle(max) => {
            ctx.shard.counters().connections_idle_closed.add(1);
            tracing::debug!(%peer, listener = %ctx.client.listener, "closing connection idle for {max:?} (connections.max.idle.ms)");
        }
        End::Closed | End::ShuttingDown => {}
    }
    if !shutting_down {
        writer.await;
        return;
    }
    // A lingering close. The client may have sent requests this broker
    // will not read; closing the socket with them unread resets the
    // connection (RST), and the client can then lose answers already sent
    // to it — records committed by the drain but never acknowledged. So
    // the input is read and dropped until the writer has answered
    // everything it owes and the client has closed its side, at most
    // LINGER_MAX.
    let writer = std::pin::pin!(writer);
    match select(writer, Box::pin(discard_input(&mut rd))).await {
        // Everything is answered: go on dropping input until the client
        // closes, for a while.
        Either::Left((_, discarding)) => {
            let _ = glommio::timer::timeout(LINGER_MAX, async {
                discarding.await;
                Ok(())
            })
            .await;
        }
        // The client closed first: the answers still go out.
        Either::Right((_, writer)) => writer.await,
    };
}

/// Reads and drops input until the peer closes or the read fails.
async fn discard_input<R: AsyncRead + Unpin>(rd: &mut ReadHalf<R>) {
    let mut sink = vec![0u8; LINGER_READ_BYTES];
    while let Ok(n) = rd.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// Buffer of one read while lingering.
const LINGER_READ_BYTES: usize = 64 << 10;

/// How long a connection closing for shutdown keeps reading (and
/// dropping) what the client still sends, after its last answer.
const LINGER_MAX: std::time::Duration = std::time::Duration::from_secs(2);

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

/// Queues `reply` to be written in request order.
async fn queue(
    tx: &mut mpsc::Sender<Outgoing>,
    correlation_id: i32,
    header_version: i16,
    reply: Reply,
    permit: StaticPermit,
) -> bool {
    let out = Outgoing {
        correlation_id,
        header_version,
        reply: Box::pin(async move { reply }),
        _permit: permit,
    };
    tx.send(out).await.is_ok()
}

/// What the SASL session decides about one decoded request.
enum Gate {
    /// Serve it as usual.
    Pass,
    /// The session answered it (SaslHandshake, SaslAuthenticate).
    Answer(sasl::Step),
    /// Not allowed before authentication: close.
    Refuse(String),
}

async fn gate(
    session: Option<&mut sasl::Session>,
    api: ApiKey,
    request: &Request,
    version: i16,
    store: &dyn sasl::CredentialStore,
) -> Gate {
    let Some(session) = session else {
        return Gate::Pass;
    };
    match request {
        Request::SaslHandshake(req) => Gate::Answer(session.handshake(req, version)),
        Request::SaslAuthenticate(req) => {
            Gate::Answer(session.authenticate(req, version, store).await)
        }
        // KIP-368: past its credential's expiry a session must
        // re-authenticate before anything else is served.
        _ if session.expired() => Gate::Refuse(format!(
            "{api:?} after the SASL session expired (re-authentication required)"
        )),
        Request::ApiVersions => Gate::Pass,
        _ if session.authenticated().is_some() => Gate::Pass,
        _ => Gate::Refuse(format!("{api:?} before SASL authentication")),
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    ctx: &Ctx,
    rd: &mut ReadHalf<R>,
    mut tx: mpsc::Sender<Outgoing>,
    peer: SocketAddr,
    mut session: Option<sasl::Session>,
    activity: &Activity,
) -> End {
    let mut conn_ctx = ctx.clone();
    let mut client = ClientState {
        client_id: None,
        rack: None,
    };
    let broker = ctx.broker.clone();
    let max_request = broker.settings.max_request_bytes;
    let budget_max = broker.engine.config().inflight_bytes_max;
    loop {
        // A client over its quota: no request is read until its throttle
        // time has passed (KIP-219's muted channel).
        if let Some(until) = conn_ctx.muted_until.take() {
            let now = std::time::Instant::now();
            if until > now {
                let wait = Box::pin(glommio::timer::sleep(until - now));
                let stop = Box::pin(broker.engine.shutdown().wait());
                if let Either::Right(_) = select(wait, stop).await {
                    return End::ShuttingDown;
                }
            }
        }
        let mut prefix = [0u8; 4];
        {
            // The read is raced by the shutdown and by the idle deadline,
            // which moves while answers are still being written. The idle
            // timer is armed only if the read has to wait.
            let read = std::pin::pin!(rd.read_exact(&mut prefix));
            let stop = std::pin::pin!(broker.engine.shutdown().wait());
            let idle = std::pin::pin!(idle_for(broker.settings.connections_max_idle, activity));
            match select(select(read, stop), idle).await {
                Either::Left((Either::Left((Ok(()), _)), _)) => {}
                Either::Left((Either::Left((Err(_), _)), _)) => return End::Closed,
                Either::Left((Either::Right(_), _)) => return End::ShuttingDown,
                Either::Right((max, _)) => return End::Idle(max),
            }
        }
        let len = i32::from_be_bytes(prefix);
        let unauthenticated = session
            .as_ref()
            .is_some_and(|s| s.authenticated().is_none());
        let raw_token = session
            .as_ref()
            .is_some_and(sasl::Session::awaits_raw_token);
        let (len_min, len_max) = match (raw_token, unauthenticated) {
            (true, _) => (1, sasl::UNAUTHENTICATED_FRAME_BYTES_MAX),
            (false, true) => (FRAME_BYTES_MIN, sasl::UNAUTHENTICATED_FRAME_BYTES_MAX),
            (false, false) => (FRAME_BYTES_MIN, max_request),
        };
        if len < len_min as i32 || len as usize > len_max {
            return End::Refused(format!(
                "frame length {len} outside {len_min}..={len_max} ({})",
                if unauthenticated {
                    "before SASL authentication"
                } else {
                    "socket.request.max.bytes"
                }
            ));
        }
        let len = len as usize;
        // Admit by memory before reading the body: when the shard's budget
        // is spent, this connection stops reading (TCP back-pressure).
        let need = len.min(budget_max) as u64;
        if ctx.shard.budget.available() < need {
            ctx.shard.counters().admission_waits.add(1);
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
        // Every frame read is answered once (or ends the connection).
        activity.request_read();
        if raw_token {
            // After a v0 SaslHandshake each token is a whole frame and so
            // is each answer (PLAIN's success: an empty frame); a failure
            // has no answer but a close.
            let Some(s) = session.as_mut() else {
                return End::Closed;
            };
            let key = auth_limit::key(peer.ip().to_canonical(), s.claimed_user(&frame).as_deref());
            if let Err(why) = admit_authentication(ctx, &key).await {
                return End::Answered(why);
            }
            let reply = match s.token(&frame, &*broker.engine).await {
                sasl::TokenStep::Challenge(bytes) => bytes,
                sasl::TokenStep::Done { user, reply, .. } => {
                    tracing::debug!(%peer, %user, listener = %ctx.client.listener, "SASL authenticated (v0)");
                    conn_ctx.principal = Rc::from(format!("User:{user}"));
                    reply
                }
                sasl::TokenStep::Failed(why) => {
                    authentication_failed(ctx, key).await;
                    return End::Answered(why);
                }
            };
            let reply = Reply::Body(BytesMut::from(&reply[..]));
            if !queue(&mut tx, 0, NO_HEADER, reply, permit).await {
                return End::Closed;
            }
            continue;
        }
        ctx.shard.counters().requests.add(1);
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
                if !queue(&mut tx, correlation_id, 0, reply, permit).await {
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
        let header_version = api.response_header_version(version);
        // A login's key: the address and the user it claims.
        let login = match (&request, session.as_ref()) {
            (Request::SaslAuthenticate(req), Some(s)) => Some(auth_limit::key(
                peer.ip().to_canonical(),
                s.claimed_user(&req.auth_bytes).as_deref(),
            )),
            _ => None,
        };
        if let Some(key) = &login {
            if let Err(why) = admit_authentication(ctx, key).await {
                let step = sasl::failed_step(why.clone(), version);
                // The close follows whether or not the answer is written.
                let _ = queue(&mut tx, correlation_id, header_version, step.reply, permit).await;
                return End::Answered(why);
            }
        }
        match gate(session.as_mut(), api, &request, version, &*broker.engine).await {
            Gate::Pass => {}
            Gate::Answer(step) => {
                if let (true, Some(key)) = (step.close, login) {
                    authentication_failed(ctx, key).await;
                }
                if let (false, Some(user)) =
                    (step.close, session.as_ref().and_then(|s| s.authenticated()))
                {
                    if api == ApiKey::SaslAuthenticate {
                        tracing::debug!(%peer, %user, listener = %ctx.client.listener, "SASL authenticated");
                        conn_ctx.principal = Rc::from(format!("User:{user}"));
                    }
                }
                if !queue(&mut tx, correlation_id, header_version, step.reply, permit).await {
                    return End::Closed;
                }
                if step.close {
                    return End::Answered(step.why.unwrap_or_else(|| "SASL error".into()));
                }
                continue;
            }
            Gate::Refuse(why) => return End::Refused(why),
        }
        client.refresh(&mut conn_ctx, header.client_id.as_deref(), &request);
        let ctx = conn_ctx.clone();
        let reply = handlers::dispatch(&ctx, request, version).await;
        let out = Outgoing {
            correlation_id,
            header_version,
            reply,
            _permit: permit,
        };
        if tx.send(out).await.is_err() {
            return End::Closed;
        }
    }
}

/// Whether this login (from `peer`'s address, for the user it claims) may
/// be checked now: `Err(why)` (counted, and answered after the failure
/// delay) when it failed too often.
async fn admit_authentication(ctx: &Ctx, key: &auth_limit::Key) -> Result<(), String> {
    match ctx.broker.auth_limiter.check(key) {
        Ok(()) => Ok(()),
        Err(wait) => {
            ctx.shard.counters().sasl_auth_throttled.add(1);
            glommio::timer::sleep(ctx.broker.settings.sasl_failure_delay).await;
            let (ip, user) = key;
            let who = if user.is_empty() {
                String::new()
            } else {
                format!(" for {user:?}")
            };
            Err(format!(
                "too many failed authentications{who} from {ip}; refused unchecked for another {} s",
                wait.as_secs() + 1
            ))
        }
    }
}

/// Counts a failed login against its key and waits the failure delay
/// before it is answered.
async fn authentication_failed(ctx: &Ctx, key: auth_limit::Key) {
    ctx.broker.auth_limiter.failed(key);
    ctx.shard.counters().sasl_auth_failures.add(1);
    glommio::timer::sleep(ctx.broker.settings.sasl_failure_delay).await;
}

async fn write_loop<S: Stream>(
    mut wr: WriteHalf<S>,
    mut rx: mpsc::Receiver<Outgoing>,
    peer: SocketAddr,
    activity: Rc<Activity>,
) {
    while let Some(out) = rx.next().await {
        let parts = match out.reply.await {
            Reply::Body(b) => vec![b.freeze()],
            Reply::Parts(p) => p,
            Reply::Nothing => {
                activity.answered();
                continue;
            }
            Reply::Close => break,
        };
        let body: usize = parts.iter().map(Bytes::remaining).sum();
        let mut head = BytesMut::with_capacity(GATHER_BYTES_MAX);
        let header_len = match out.header_version {
            NO_HEADER => 0,
            v if v >= 1 => 5,
            _ => 4,
        };
        head.extend_from_slice(&((header_len + body) as i32).to_be_bytes());
        if out.header_version != NO_HEADER {
            head.extend_from_slice(&out.correlation_id.to_be_bytes());
        }
        if out.header_version >= 1 {
            head.extend_from_slice(&[0]); // no tagged fields
        }
        let mut result = send(&mut wr, head, parts).await;
        if S::BUFFERED && result.is_ok() {
            result = wr.flush().await;
        }
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client went away");
            return;
        }
        activity.answered();
    }
    let _ = wr.close().await;
}

/// Writes `head` followed by `parts`: small parts are gathered into `head`
/// (flushed whenever it fills), large ones written from their own buffers.
async fn send<W: AsyncWrite + Unpin>(
    wr: &mut WriteHalf<W>,
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

//! Serving Kafka connections on one shard: bind every listener (each shard
//! binds with SO_REUSEPORT, so the kernel spreads connections), hand new
//! connections to the shard serving the fewest ([`crate::balance`]), run
//! the TLS handshake and SASL where the listener asks for them, serve
//! until shutdown, then drain: stop accepting, let every connection finish
//! what it read, and close the shard once every shard has drained.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{select, Either};

use crate::balance::{Balance, Moved};
use crate::broker::Broker;
use crate::conn;
use crate::handlers::Ctx;
use crate::listener::{Listener, SecurityProtocol};

/// Longest a shard waits for its connections to finish at shutdown.
const DRAIN_CONNECTIONS_MS_MAX: u64 = 30_000;

/// Counts shards that have drained their connections.
#[derive(Default)]
pub struct Barrier {
    arrived: AtomicUsize,
    event: event_listener::Event,
}

impl Barrier {
    pub async fn arrive_and_wait(&self, total: usize) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        self.event.notify(usize::MAX);
        loop {
            let l = self.event.listen();
            if self.arrived.load(Ordering::SeqCst) >= total {
                return;
            }
            l.await;
        }
    }
}

/// What a shard accepts connections from: every listener, and its share of
/// the broker's connection balance.
pub struct Conns {
    pub listeners: Vec<(Listener, Secure)>,
    pub balance: Arc<Balance>,
    pub moved: flume::Receiver<Moved>,
}

/// Runs shard `id`'s engine side and serves its connections until
/// shutdown; reports on `bound` whether every listener could be bound.
pub async fn shard_main(
    id: usize,
    shards: usize,
    broker: Arc<Broker>,
    conns: Conns,
    bound: std::sync::mpsc::Sender<Result<(), String>>,
    barrier: Arc<Barrier>,
) {
    let (shard, commits_done) = match broker.engine.start_shard(id) {
        Ok(s) => s,
        Err(e) => {
            let _ = bound.send(Err(format!("shard {id}: {e}")));
            barrier.arrive_and_wait(shards).await;
            return;
        }
    };
    // Every listener on every shard: glommio binds with SO_REUSEPORT, so
    // the kernel spreads each listener's connections over the shards.
    let mut bound_listeners = Vec::with_capacity(conns.listeners.len());
    let mut bind_error = None;
    for (l, secure) in &conns.listeners {
        match glommio::net::TcpListener::bind(l.bind.as_str()) {
            Ok(socket) => bound_listeners.push((l.clone(), secure.clone(), socket)),
            Err(e) => {
                bind_error = Some(format!(
                    "shard {id}: cannot listen on {} (listener {}): {e}",
                    l.bind, l.name
                ));
                break;
            }
        }
    }
    let _ = bound.send(match bind_error {
        Some(e) => {
            bound_listeners.clear();
            Err(e)
        }
        None => Ok(()),
    });
    let mut sockets = Vec::with_capacity(bound_listeners.len());
    let mut served = Vec::with_capacity(bound_listeners.len());
    for (listener, secure, socket) in bound_listeners {
        let ctx = Ctx {
            shard: shard.clone(),
            broker: broker.clone(),
            client_id: None,
            peer: None,
            host: Rc::from(""),
            client: conn::new_client(&listener.name),
            principal: Rc::from(crate::principal::ANONYMOUS),
            mapping_rules: secure.mapping_rules.clone(),
            muted_until: Rc::default(),
        };
        served.push((ctx, secure));
        sockets.push(socket);
    }
    let serving = Rc::new(Serving {
        shard: id,
        listeners: served,
        live: Rc::new(Cell::new(0)),
        idle: Rc::new(event_listener::Event::new()),
        balance: conns.balance,
    });
    let (live, idle) = (serving.live.clone(), serving.idle.clone());
    let mut accepting: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(index, socket)| glommio::spawn_local(accept_loop(serving.clone(), index, socket)))
        .collect();
    accepting.push(glommio::spawn_local(moved_loop(
        serving.clone(),
        conns.moved,
    )));
    futures::future::join_all(accepting).await;
    drop(serving);
    // Drain: connections stop reading and finish what they started.
    let drain = async {
        loop {
            let l = idle.listen();
            if live.get() == 0 {
                return;
            }
            l.await;
        }
    };
    if glommio::timer::timeout(Duration::from_millis(DRAIN_CONNECTIONS_MS_MAX), async {
        drain.await;
        Ok(())
    })
    .await
    .is_err()
    {
        tracing::warn!(
            shard = id,
            connections = live.get(),
            "connections still open after the drain limit"
        );
    }
    // Other shards may still route appends here until they have drained.
    barrier.arrive_and_wait(shards).await;
    shard.close();
    commits_done.await;
}

/// What a listener's connections go through before they are served: the
/// TLS handshake (SSL, SASL_SSL) and SASL authentication (SASL_*).
#[derive(Clone, Default)]
pub struct Secure {
    mapping_rules: Arc<crate::principal::MappingRules>,
    tls: Option<Arc<crate::tls::Reloading>>,
    sasl: Option<Arc<crate::sasl::SaslConfig>>,
}

/// Why a listener's TLS or SASL settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Sasl(#[from] crate::sasl::SaslError),
}

/// Settings one listener has apart from the broker-wide ones (Kafka's
/// `listener.name.NAME.` prefix).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerOverrides {
    /// `ssl.client.auth` (SSL listeners take `--ssl-client-auth` by
    /// default; SASL_SSL listeners ask for no certificate by default).
    pub ssl_client_auth: Option<crate::tls::ClientAuth>,
    /// `sasl.enabled.mechanisms`.
    pub sasl_mechanisms: Option<Vec<crate::sasl::Mechanism>>,
    /// `ssl.principal.mapping.rules`.
    pub ssl_principal_mapping_rules: Option<Arc<crate::principal::MappingRules>>,
    /// `ssl.cert.file`, `ssl.key.file`, `ssl.client.ca.file`.
    pub ssl_cert_file: Option<std::path::PathBuf>,
    pub ssl_key_file: Option<std::path::PathBuf>,
    pub ssl_client_ca_file: Option<std::path::PathBuf>,
    /// The listener's TLS files and client-auth mode with the broker-wide
    /// ones filled in: what it serves. Set by the configuration for every
    /// SSL and SASL_SSL listener.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// What each listener's connections go through, by listener name: TLS
/// configurations (reloaded when their files change) and SASL settings,
/// built once at start-up and shared by every shard.
#[derive(Clone, Default)]
pub struct ListenerSecurity {
    by_name: std::collections::HashMap<String, Secure>,
}

impl ListenerSecurity {
    /// Loads what `listeners` need: TLS for SSL and SASL_SSL listeners
    /// from their resolved files (`overrides[name].tls`: a TLS listener
    /// without them is refused), SASL users from `sasl_users_file`; SASL
    /// listeners offer `sasl_mechanisms` (OAUTHBEARER checks tokens with
    /// `oauth`) unless their `overrides` say otherwise.
    pub fn load(
        listeners: &[Listener],
        sasl_users_file: Option<&std::path::Path>,
        sasl_mechanisms: &[crate::sasl::Mechanism],
        overrides: &std::collections::HashMap<String, ListenerOverrides>,
        mapping_rules: Arc<crate::principal::MappingRules>,
        oauth: Option<Arc<crate::oauth::Validator>>,
    ) -> Result<Self, SecurityError> {
        use SecurityProtocol as P;
        let mut users = None;
        if let Some(path) = sasl_users_file {
            let u = crate::sasl::Users::load(path)?;
            tracing::info!(users = u.len(), file = %path.display(), "SASL/PLAIN users loaded");
            users = Some(u);
        }
        let mut out = Self::default();
        for l in listeners {
            let o = overrides.get(&l.name).cloned().unwrap_or_default();
            let mut secure = Secure {
                mapping_rules: o
                    .ssl_principal_mapping_rules
                    .clone()
                    .unwrap_or_else(|| mapping_rules.clone()),
                ..Secure::default()
            };
            if matches!(l.protocol, P::Ssl | P::SaslSsl) {
                // Fail closed: never serve a TLS listener in plain text.
                let files = o.tls.as_ref().ok_or_else(|| {
                    crate::tls::TlsError::Config(format!(
                        "listener {:?} is {} but has no certificate",
                        l.name,
                        l.protocol.kafka_name()
                    ))
                })?;
                secure.tls = Some(Arc::new(crate::tls::Reloading::load(files)?));
                tracing::info!(listener = %l.name, cert = %files.cert.display(), client_auth = ?files.client_auth, "TLS listener ready");
            }
            if matches!(l.protocol, P::SaslPlaintext | P::SaslSsl) {
                let mechanisms = o
                    .sasl_mechanisms
                    .unwrap_or_else(|| sasl_mechanisms.to_vec());
                let names: Vec<_> = mechanisms.iter().map(|m| m.name()).collect();
                tracing::info!(listener = %l.name, mechanisms = %names.join(","), "SASL listener ready");
                secure.sasl = Some(Arc::new(crate::sasl::SaslConfig {
                    mechanisms,
                    users: users.clone(),
                    oauth: oauth.clone(),
                }));
            }
            out.by_name.insert(l.name.clone(), secure);
        }
        Ok(out)
    }

    /// Watches the TLS files until the process ends (on the sidecar):
    /// when the certificate, key or client CA changes, new connections get
    /// the new configuration. A file that does not load is logged and the
    /// previous configuration kept.
    pub async fn watch_tls_files(self) {
        let all: Vec<_> = self.by_name.into_values().filter_map(|s| s.tls).collect();
        if all.is_empty() {
            return;
        }
        loop {
            tokio::time::sleep(crate::tls::RELOAD_POLL).await;
            for t in &all {
                match t.reload_if_changed() {
                    Ok(true) => {
                        tracing::info!(cert = %t.files().cert.display(), "TLS certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "reloading TLS files failed; keeping the previous certificate")
                    }
                }
            }
        }
    }

    /// What a connection of `listener` goes through.
    pub fn of(&self, listener: &Listener) -> Secure {
        self.by_name
            .get(&listener.name)
            .cloned()
            .unwrap_or_default()
    }
}

/// What one shard needs to serve connections: each listener's context
/// (by index, the same on every shard) and the counts the drain and the
/// balance read.
struct Serving {
    shard: usize,
    listeners: Vec<(Ctx, Secure)>,
    live: Rc<Cell<usize>>,
    idle: Rc<event_listener::Event>,
    balance: Arc<Balance>,
}

impl Serving {
    /// Serves a connection of listener `index` on this shard until it
    /// closes; it was already counted here by the balance.
    fn spawn(self: &Rc<Self>, index: usize, stream: glommio::net::TcpStream, peer: SocketAddr) {
        let Some((ctx, secure)) = self.listeners.get(index).cloned() else {
            self.balance.closed(self.shard);
            return;
        };
        self.live.set(self.live.get() + 1);
        let me = self.clone();
        glommio::spawn_local(async move {
            let _ = stream.set_nodelay(true);
            match secure.tls.as_ref().map(|t| t.acceptor()) {
                None => conn::serve(ctx, stream, peer, secure.sasl).await,
                Some(acceptor) => match crate::tls::handshake(&acceptor, stream).await {
                    Ok(tls) => conn::serve(ctx, tls, peer, secure.sasl).await,
                    Err(e) => {
                        ctx.shard.counters().bad_frames.add(1);
                        tracing::warn!(%peer, listener = %ctx.client.listener, error = %e, "closing connection: TLS handshake failed");
                    }
                },
            }
            me.live.set(me.live.get() - 1);
            me.balance.closed(me.shard);
            me.idle.notify(usize::MAX);
        })
        .detach();
    }

    /// Serves `stream` on the shard with the fewest connections: here, or
    /// handed over (see [`crate::balance`]).
    fn place(self: &Rc<Self>, index: usize, stream: glommio::net::TcpStream, peer: SocketAddr) {
        let to = self.balance.place(self.shard);
        if to == self.shard {
            return self.spawn(index, stream, peer);
        }
        let shard = &self.listeners[index].0.shard;
        let stream = match socket2::SockRef::from(&stream).try_clone() {
            Ok(socket) => {
                drop(stream);
                let moved = Moved {
                    listener: index,
                    socket,
                    peer,
                };
                match self.balance.send(to, moved) {
                    Ok(()) => {
                        shard.counters().connections_moved.add(1);
                        return;
                    }
                    Err(m) => glommio::net::TcpStream::from(m.socket),
                }
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand a connection to another shard; serving it here");
                stream
            }
        };
        self.balance.closed(to);
        self.balance.opened(self.shard);
        self.spawn(index, stream, peer);
    }
}

/// Accepts connections on listener `index` until shutdown; each connection
/// starts as a client of this listener (`ctx.client`).
async fn accept_loop(serving: Rc<Serving>, index: usize, listener: glommio::net::TcpListener) {
    let engine = serving.listeners[index].0.broker.engine.clone();
    let shard = serving.listeners[index].0.shard.clone();
    let name = serving.listeners[index].0.client.listener.clone();
    loop {
        let accept = Box::pin(listener.accept());
        let stop = Box::pin(engine.shutdown().wait());
        match select(accept, stop).await {
            Either::Left((Ok(stream), _)) => {
                shard.counters().connections_accepted.add(1);
                let peer = stream
                    .peer_addr()
                    .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
                serving.place(index, stream, peer);
            }
            Either::Left((Err(e), _)) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(shard = serving.shard, listener = %name, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            Either::Right(_) => break,
        }
    }
}

/// Serves the connections other shards hand to this one, until shutdown.
async fn moved_loop(serving: Rc<Serving>, moved: flume::Receiver<Moved>) {
    let engine = serving.listeners.first().map(|l| l.0.broker.engine.clone());
    let Some(engine) = engine else { return };
    loop {
        let next = Box::pin(moved.recv_async());
        let stop = Box::pin(engine.shutdown().wait());
        match select(next, stop).await {
            Either::Left((Ok(m), _)) => {
                let stream = glommio::net::TcpStream::from(m.socket);
                serving.spawn(m.listener, stream, m.peer);
            }
            Either::Left((Err(_), _)) | Either::Right(_) => break,
        }
    }
}

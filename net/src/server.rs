//! Broker lifecycle: open the backends, replay the commit log, start one
//! pinned glommio executor per shard (each accepting on the Kafka port with
//! SO_REUSEPORT), serve until SIGTERM/SIGINT, then drain: stop accepting,
//! finish every request already read, seal and commit what was accepted,
//! answer those producers, and return.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use floe_engine::cluster::{allocate_node_id, Members, Registration};
use floe_engine::committer::Committer;
use floe_engine::metrics::Metrics;
use floe_engine::shard::{self, Shard, ShardInbox, ShardIndexSink};
use floe_engine::sidecar::Sidecar;
use floe_engine::topics::Topics;
use floe_engine::{Engine, EngineConfig, Shutdown};
use floe_meta::schema::BrokerRecord;
use floe_meta::{schema, Compare, MetaStore, Op, Txn};
use futures::future::{select, Either};
use glommio::{LocalExecutorBuilder, Placement};

use crate::balance::{Balance, Moved};
use crate::broker::{Broker, Settings};
use crate::config::Resolved;
use crate::conn;
use crate::handlers::Ctx;

/// Longest a shard waits for its connections to finish at shutdown.
const DRAIN_CONNECTIONS_MS_MAX: u64 = 30_000;
/// Commit requests queued before shards wait for the committer.
const COMMIT_QUEUE_MAX: usize = 1024;

async fn cluster_id(meta: &dyn MetaStore) -> anyhow::Result<String> {
    if let Some(kv) = meta.get(schema::CLUSTER_ID).await? {
        return Ok(String::from_utf8_lossy(&kv.value).into_owned());
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let txn = Txn::when(vec![Compare::ModRevision(schema::CLUSTER_ID.into(), 0)]).and_then(vec![
        Op::Put(schema::CLUSTER_ID.into(), Bytes::from(id.clone())),
    ]);
    meta.txn(txn).await?;
    let kv = meta
        .get(schema::CLUSTER_ID)
        .await?
        .context("cluster id vanished")?;
    Ok(String::from_utf8_lossy(&kv.value).into_owned())
}

/// Retention and object cleanup settings for the committer.
fn lifecycle(
    cfg: &Resolved,
    node_id: i32,
    topics: &Arc<Topics>,
    members: &Arc<Members>,
) -> floe_engine::committer::Lifecycle {
    floe_engine::committer::Lifecycle {
        node_id,
        topics: topics.clone(),
        members: members.clone(),
        interval: Duration::from_secs(cfg.cleanup_interval_secs),
        delete_grace: Duration::from_secs(cfg.delete_grace_secs),
        orphan_grace: Duration::from_secs(cfg.orphan_grace_secs),
        orphan_sweep_interval: Duration::from_secs(cfg.orphan_sweep_interval_secs),
        multipart_abort_after: Duration::from_secs(cfg.multipart_abort_after_secs),
    }
}

/// The node id remembered in the data dir, or a new one allocated from the
/// metadata store and remembered there.
async fn remembered_node_id(
    data_dir: &std::path::Path,
    meta: &dyn MetaStore,
) -> anyhow::Result<i32> {
    let path = data_dir.join("node-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return text
            .trim()
            .parse()
            .with_context(|| format!("{} does not hold a node id", path.display()));
    }
    let id = allocate_node_id(meta).await?;
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("remembering the node id in {}", path.display()))?;
    tracing::info!(
        node = id,
        "allocated node id {id} (remembered in {})",
        path.display()
    );
    Ok(id)
}

/// Counts shards that have drained their connections.
#[derive(Default)]
struct Barrier {
    arrived: AtomicUsize,
    event: event_listener::Event,
}

impl Barrier {
    async fn arrive_and_wait(&self, total: usize) {
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

/// One start-up line with the tuning model's choices and what was
/// actually used (flags win), then one warning per mismatch with the model.
fn log_budgets(cfg: &Resolved) {
    let b = &cfg.budgets;
    tracing::info!(
        "tuning: {b}; using {} shard(s), in-flight {} MiB, read cache {} MiB, upload parts {} MiB x {} per shard",
        cfg.shards,
        cfg.inflight_bytes >> 20,
        cfg.read_cache_bytes >> 20,
        cfg.upload_part_bytes >> 20,
        cfg.upload_concurrency
    );
    for w in &b.warnings {
        tracing::warn!("tuning: {w}");
    }
}

pub fn run(cfg: Resolved) -> anyhow::Result<()> {
    // Certificates and users first: a bad file stops start-up before
    // anything is registered.
    let security = ListenerSecurity::load(&cfg)?;
    log_budgets(&cfg);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let store = floe_objstore::open_with_faults(
        &cfg.object_store,
        &cfg.object_store_options(),
        cfg.object_store_faults.as_deref(),
    )?;
    if let Some(f) = &cfg.object_store_faults {
        tracing::warn!(faults = %f, "object-store fault injection is ON (testing only)");
    }
    let sidecar = Sidecar::start().context("starting the sidecar runtime")?;
    let meta: Arc<dyn MetaStore> = sidecar
        .block_on(floe_meta::open(&cfg.meta, &cfg.data_dir.join("meta.redb")))
        .with_context(|| {
            if cfg.meta == "embedded" {
                "opening the embedded metadata store (is another floe using this data dir?)"
                    .to_string()
            } else {
                format!("opening the metadata store {}", cfg.meta)
            }
        })?;
    let topics = Arc::new(sidecar.block_on(Topics::load(meta.clone()))?);
    let cluster_id = sidecar.block_on(cluster_id(&*meta))?;
    let node_id = match cfg.node_id {
        Some(id) => id,
        None => sidecar.block_on(remembered_node_id(&cfg.data_dir, &*meta))?,
    };
    let registration = sidecar
        .block_on(Registration::register(
            meta.clone(),
            BrokerRecord {
                node_id,
                host: cfg.advertise_host.clone(),
                port: cfg.advertise_port,
                zone: cfg.zone.clone(),
                group: cfg.group.clone(),
                listeners: crate::discovery::listener_records(&cfg.listeners),
            },
            Duration::from_secs(cfg.lease_ttl_secs),
        ))
        .context("registering this broker")?;
    let members = Arc::new(Members::default());

    let (links, inboxes): (Vec<_>, Vec<ShardInbox>) =
        (0..cfg.shards).map(|_| shard::link()).unzip();
    let (commit_tx, commit_rx) = flume::bounded(COMMIT_QUEUE_MAX);
    let engine = Arc::new(Engine {
        config: EngineConfig {
            node_id,
            shards: cfg.shards,
            flush_interval: Duration::from_millis(cfg.flush_interval_ms),
            flush_bytes: cfg.flush_bytes,
            inflight_bytes_max: cfg.inflight_bytes,
            read_cache_bytes_max: cfg.read_cache_bytes,
            upload_concurrency: cfg.upload_concurrency,
            upload_part_bytes: cfg.upload_part_bytes,
        },
        sidecar: sidecar.handle(),
        store: store.clone(),
        meta: meta.clone(),
        topics: topics.clone(),
        members: members.clone(),
        committer: commit_tx,
        shards: links,
        metrics: Arc::new(Metrics::default()),
        shutdown: Shutdown::default(),
        cluster_id,
    });
    let sink = Arc::new(ShardIndexSink {
        links: engine.shards.iter().map(|l| l.index.clone()).collect(),
    });
    let mut committer = Committer::new(meta.clone(), store.clone(), sink)
        .with_metrics(engine.metrics.clone())
        .with_lifecycle(lifecycle(&cfg, node_id, &topics, &members));
    let replayed = sidecar
        .block_on(committer.recover())
        .context("loading the metadata snapshot and replaying the commit log")?;
    let poke = Arc::new(tokio::sync::Notify::new());
    sidecar.handle().spawn({
        let poke = poke.clone();
        async move {
            committer.run(commit_rx, poke).await;
        }
    });
    sidecar
        .handle()
        .spawn(floe_engine::committer::follow_log(meta.clone(), poke));
    sidecar.handle().spawn(topics.clone().follow());
    sidecar.handle().spawn(members.clone().follow(meta.clone()));
    {
        let engine = engine.clone();
        sidecar
            .handle()
            .spawn(registration.maintain(async move { engine.shutdown.wait().await }));
    }

    let groups = floe_engine::coordinator::Coordinator::new(
        node_id,
        meta.clone(),
        Duration::from_secs(cfg.lease_ttl_secs),
    );
    {
        let engine = engine.clone();
        sidecar.handle().spawn(
            groups
                .clone()
                .run(async move { engine.shutdown.wait().await }),
        );
    }
    let broker = Arc::new(Broker {
        groups,
        engine: engine.clone(),
        settings: Settings {
            node_id,
            advertise_host: cfg.advertise_host.clone(),
            advertise_port: cfg.advertise_port,
            listeners: crate::discovery::listener_records(&cfg.listeners),
            zone: cfg.zone.clone(),
            group: cfg.group.clone(),
            auto_create_topics: cfg.auto_create_topics,
            num_partitions: cfg.num_partitions,
            max_message_bytes: cfg.max_message_bytes,
            max_request_bytes: cfg.max_request_bytes,
            fetch_wait_ms_max: cfg.fetch_wait_ms_max,
        },
    });

    let ready = Arc::new(AtomicBool::new(false));
    let admin = sidecar
        .block_on(tokio::net::TcpListener::bind(&cfg.admin_listen))
        .with_context(|| format!("binding the admin listener {}", cfg.admin_listen))?;
    let (balance, moved) = Balance::new(cfg.shards);
    let balance = Arc::new(balance);
    sidecar.handle().spawn(crate::admin_http::serve(
        admin,
        engine.clone(),
        balance.clone(),
        ready.clone(),
    ));

    let notifier = crate::notify::Notifier::from_env().map(Arc::new);
    {
        let engine = engine.clone();
        let notifier = notifier.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
        .context("installing signal handlers")?;
        std::thread::Builder::new()
            .name("floe-signals".into())
            .spawn(move || {
                let mut seen = 0;
                for sig in signals.forever() {
                    seen += 1;
                    if seen == 1 {
                        tracing::info!(
                            signal = sig,
                            "shutting down: no new requests; committing what was accepted"
                        );
                        if let Some(n) = &notifier {
                            n.send_or_log(&crate::notify::stopping_message("draining"));
                        }
                        engine.shutdown.trigger();
                    } else {
                        tracing::warn!(signal = sig, "second signal: exiting without draining");
                        std::process::exit(130);
                    }
                }
            })
            .context("starting the signal thread")?;
    }

    let cpus = floe_tuning::cpus_allowed();
    let barrier = Arc::new(Barrier::default());
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut threads = Vec::new();
    for ((i, inbox), moved) in inboxes.into_iter().enumerate().zip(moved) {
        let broker = broker.clone();
        let balance = balance.clone();
        let listeners: Vec<_> = cfg
            .listeners
            .iter()
            .map(|l| (l.clone(), security.of(l.protocol)))
            .collect();
        let bound_tx = bound_tx.clone();
        let barrier = barrier.clone();
        let shards = cfg.shards;
        let placement = if cfg.shards <= cpus.len() {
            Placement::Fixed(cpus[i])
        } else {
            Placement::Unbound
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("floe-shard-{i}"))
            .spawn(move || {
                let conns = Conns {
                    listeners,
                    balance,
                    moved,
                };
                shard_main(i, shards, broker, inbox, conns, bound_tx, barrier)
            })
            .map_err(|e| {
                anyhow::anyhow!(
                    "starting shard {i}: {e} — {}",
                    io_uring_hint(&e.to_string())
                )
            })?;
        threads.push(handle);
    }
    drop(bound_tx);
    let mut failure = None;
    for _ in 0..cfg.shards {
        match bound_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a shard exited during start-up".into()),
        }
    }
    if let Some(e) = &failure {
        engine.shutdown.trigger();
        tracing::error!("{e}");
    } else {
        ready.store(true, Ordering::SeqCst);
        let binds: Vec<&str> = cfg.listeners.iter().map(|l| l.bind.as_str()).collect();
        let advertised: Vec<String> = cfg
            .listeners
            .iter()
            .map(|l| format!("{}://{}:{}", l.name, l.advertised_host, l.advertised_port))
            .collect();
        tracing::info!(
            "listening on {} (kafka), admin on {}, advertising {}, zone {:?}, group {:?}, node {}, {} shard(s), objects {}, metadata {}, {} log entries replayed",
            binds.join(", "),
            cfg.admin_listen,
            advertised.join(", "),
            cfg.zone,
            cfg.group,
            node_id,
            cfg.shards,
            store.describe(),
            meta.describe(),
            replayed
        );
        if let Some(n) = &notifier {
            n.send_or_log(&crate::notify::ready_message(&format!(
                "listening on {}, node {node_id}, {} shard(s)",
                cfg.listen, cfg.shards
            )));
            // WatchdogSec=: pinged from the sidecar, whose liveness is also
            // what /healthz reports.
            if let Some(every) = crate::notify::watchdog_interval() {
                let n = n.clone();
                sidecar.handle().spawn(async move {
                    loop {
                        n.send_or_log("WATCHDOG=1");
                        tokio::time::sleep(every / 2).await;
                    }
                });
            }
        }
    }
    for t in threads {
        if let Err(e) = t.join() {
            tracing::error!("shard thread ended abnormally: {e:?}");
        }
    }
    sidecar.shutdown();
    match failure {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
    }
}

fn io_uring_hint(err: &str) -> String {
    if err.contains("Operation not permitted")
        || err.contains("Cannot allocate memory")
        || err.contains("memlock")
    {
        "io_uring could not be set up: raise the memory-lock limit (ulimit -l / LimitMEMLOCK=infinity) and make sure io_uring is not blocked by seccomp or kernel.io_uring_disabled".into()
    } else {
        "see the error above".into()
    }
}

/// What a shard accepts connections from: every listener, and its share of
/// the broker's connection balance.
struct Conns {
    listeners: Vec<(crate::config::Listener, Secure)>,
    balance: Arc<Balance>,
    moved: flume::Receiver<Moved>,
}

async fn shard_main(
    id: usize,
    shards: usize,
    broker: Arc<Broker>,
    inbox: ShardInbox,
    conns: Conns,
    bound: std::sync::mpsc::Sender<Result<(), String>>,
    barrier: Arc<Barrier>,
) {
    let engine = broker.engine.clone();
    let (shard, commits_done) = Shard::start(id, engine.clone(), inbox);
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
            client: conn::new_client(&listener.name),
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
struct Secure {
    tls: Option<futures_rustls::TlsAcceptor>,
    sasl: Option<Arc<crate::sasl::Users>>,
}

/// The broker's TLS acceptors and SASL users, built once at start-up and
/// shared by every shard.
#[derive(Clone, Default)]
struct ListenerSecurity {
    /// SSL listeners: with `--ssl-client-auth`.
    ssl: Option<futures_rustls::TlsAcceptor>,
    /// SASL_SSL listeners: never asks for client certificates.
    sasl_ssl: Option<futures_rustls::TlsAcceptor>,
    users: Option<Arc<crate::sasl::Users>>,
}

impl ListenerSecurity {
    fn load(cfg: &Resolved) -> anyhow::Result<Self> {
        use crate::config::SecurityProtocol as P;
        let uses = |p: P| cfg.listeners.iter().any(|l| l.protocol == p);
        let mut out = Self::default();
        if let Some(files) = &cfg.tls {
            if uses(P::Ssl) {
                out.ssl = Some(crate::tls::acceptor(files, true)?);
            }
            if uses(P::SaslSsl) {
                out.sasl_ssl = Some(crate::tls::acceptor(files, false)?);
            }
            tracing::info!(cert = %files.cert.display(), client_auth = ?files.client_auth, "TLS listeners ready");
        }
        if let Some(path) = &cfg.sasl_users_file {
            let users = crate::sasl::Users::load(path)?;
            tracing::info!(users = users.len(), file = %path.display(), "SASL/PLAIN users loaded");
            out.users = Some(users);
        }
        Ok(out)
    }

    fn of(&self, protocol: crate::config::SecurityProtocol) -> Secure {
        use crate::config::SecurityProtocol as P;
        match protocol {
            P::Plaintext => Secure::default(),
            P::Ssl => Secure {
                tls: self.ssl.clone(),
                sasl: None,
            },
            P::SaslPlaintext => Secure {
                tls: None,
                sasl: self.users.clone(),
            },
            P::SaslSsl => Secure {
                tls: self.sasl_ssl.clone(),
                sasl: self.users.clone(),
            },
        }
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
            match &secure.tls {
                None => conn::serve(ctx, stream, peer, secure.sasl).await,
                Some(acceptor) => match crate::tls::handshake(acceptor, stream).await {
                    Ok(tls) => conn::serve(ctx, tls, peer, secure.sasl).await,
                    Err(e) => {
                        Metrics::add(&ctx.broker.engine.metrics.bad_frames, 1);
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
        let metrics = &self.listeners[index].0.broker.engine.metrics;
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
                        Metrics::add(&metrics.connections_moved, 1);
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
    let name = serving.listeners[index].0.client.listener.clone();
    loop {
        let accept = Box::pin(listener.accept());
        let stop = Box::pin(engine.shutdown.wait());
        match select(accept, stop).await {
            Either::Left((Ok(stream), _)) => {
                Metrics::add(&engine.metrics.connections_accepted, 1);
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
        let stop = Box::pin(engine.shutdown.wait());
        match select(next, stop).await {
            Either::Left((Ok(m), _)) => {
                let stream = glommio::net::TcpStream::from(m.socket);
                serving.spawn(m.listener, stream, m.peer);
            }
            Either::Left((Err(_), _)) | Either::Right(_) => break,
        }
    }
}

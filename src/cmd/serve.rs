//! `floe serve`: open the backends, replay the commit log, start one
//! pinned glommio executor per shard (each serving the Kafka listeners, see
//! `floe_net::server`), serve until SIGTERM/SIGINT, then drain: stop
//! accepting, finish every request already read, seal and commit what was
//! accepted, answer those producers, and return.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use floe_engine::cluster::allocate_node_id;
use floe_engine::sidecar::Sidecar;
use floe_engine::{CleanupSettings, Engine, EngineConfig, EngineStart};
use floe_meta::schema::BrokerRecord;
use floe_meta::MetaStore;
use floe_net::balance::Balance;
use floe_net::broker::{Broker, Settings};
use floe_net::server::{shard_main, Barrier, Conns, ListenerSecurity};
use floe_objstore::ObjectStore;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::Resolved;

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

/// Runs a broker until SIGTERM/SIGINT and its drain are done.
pub fn run(cfg: Resolved) -> anyhow::Result<()> {
    // Certificates and users first: a bad file stops start-up before
    // anything is registered.
    let oauth = cfg
        .oauth
        .clone()
        .map(|c| Arc::new(floe_net::oauth::Validator::new(c)));
    let security = ListenerSecurity::load(
        &cfg.listeners,
        cfg.sasl_users_file.as_deref(),
        &cfg.sasl_mechanisms,
        &cfg.listener_overrides,
        cfg.ssl_principal_mapping_rules.clone(),
        oauth.clone(),
    )?;
    log_budgets(&cfg);
    let Backends {
        sidecar,
        store,
        meta,
    } = open_backends(&cfg)?;
    if let Some(v) = oauth {
        // The JWK set must load once before clients are served; later
        // failures keep the previous set (and log).
        sidecar
            .block_on(v.reload())
            .map_err(|e| anyhow::anyhow!("--sasl-oauthbearer-jwks-endpoint-url: {e}"))?;
        tracing::info!(source = %v.config().jwks_url, "OAUTHBEARER JWK set loaded");
        sidecar.handle().spawn(v.refresh_loop());
    }
    let engine = start_engine(&cfg, &sidecar, store, meta)?;
    let broker = Arc::new(Broker {
        engine: engine.clone(),
        settings: broker_settings(&cfg, engine.node_id()),
        auth_limiter: floe_net::auth_limit::AuthLimiter::new(
            cfg.sasl_max_failed_authentications,
            floe_net::auth_limit::WINDOW,
        ),
        fetch_sessions: floe_net::fetch_session::FetchSessions::new(
            cfg.max_incremental_fetch_session_cache_slots,
            Duration::from_millis(cfg.min_incremental_fetch_session_eviction_ms),
        ),
        throttler: floe_net::quota::Throttler::default(),
    });
    if let Some(a) = &broker.settings.authorizer {
        let mut supers: Vec<&str> = a.super_users.iter().map(String::as_str).collect();
        supers.sort_unstable();
        tracing::info!(
            acls = engine.acls().count(),
            super_users = %supers.join(";"),
            allow_everyone_if_no_acl_found = a.allow_everyone_if_no_acl_found,
            "ACL authorizer on"
        );
    }
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
    install_signals(&engine, notifier.clone())?;

    sidecar.handle().spawn(security.clone().watch_tls_files());
    let ShardThreads { threads, bound } = start_shards(&cfg, &broker, &security, &balance, moved)?;
    let mut failure = None;
    for _ in 0..cfg.shards {
        match bound.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a shard exited during start-up".into()),
        }
    }
    if let Some(e) = &failure {
        engine.shutdown().trigger();
        tracing::error!("{e}");
    } else {
        ready.store(true, Ordering::SeqCst);
        announce(&cfg, &engine);
        if let Some(n) = &notifier {
            n.send_or_log(&crate::notify::ready_message(&format!(
                "listening on {}, node {}, {} shard(s)",
                cfg.listen,
                engine.node_id(),
                cfg.shards
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
    // Only now, with every drain commit answered, does the broker give up
    // the registration that fences those commits.
    sidecar.block_on(engine.leave());
    sidecar.shutdown();
    match failure {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
    }
}

/// The backends, and the runtime the metadata store was opened on.
struct Backends {
    sidecar: Sidecar,
    store: Arc<dyn ObjectStore>,
    meta: Arc<dyn MetaStore>,
}

/// The object store, the sidecar runtime and, on it, the metadata store.
fn open_backends(cfg: &Resolved) -> anyhow::Result<Backends> {
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
    let meta: Arc<dyn MetaStore> = sidecar.block_on(super::open_meta(cfg))?;
    Ok(Backends {
        sidecar,
        store,
        meta,
    })
}

/// Takes a node id and starts the engine (see `floe_engine::Engine::start`).
fn start_engine(
    cfg: &Resolved,
    sidecar: &Sidecar,
    store: Arc<dyn ObjectStore>,
    meta: Arc<dyn MetaStore>,
) -> anyhow::Result<Arc<Engine>> {
    let node_id = match cfg.node_id {
        Some(id) => id,
        None => sidecar.block_on(remembered_node_id(&cfg.data_dir, &*meta))?,
    };
    let start = EngineStart {
        config: EngineConfig {
            node_id,
            shards: cfg.shards,
            flush_interval: Duration::from_millis(cfg.flush_interval_ms),
            flush_bytes: cfg.flush_bytes,
            inflight_bytes_max: cfg.inflight_bytes,
            read_cache_bytes_max: cfg.read_cache_bytes,
            upload_concurrency: cfg.upload_concurrency,
            upload_part_bytes: cfg.upload_part_bytes,
            producer_id_expiration_ms: cfg.producer_id_expiration_ms,
            transaction_max_timeout_ms: cfg.transaction_max_timeout_ms as i32,
            transactional_id_expiration_ms: cfg.transactional_id_expiration_ms as i64,
            snapshot_every_entries: cfg.snapshot_every_entries,
            log_keep_entries: cfg.log_keep_entries,
        },
        broker: BrokerRecord {
            node_id,
            host: cfg.advertise_host.clone(),
            port: cfg.advertise_port,
            zone: cfg.zone.clone(),
            group: cfg.group.clone(),
            listeners: floe_net::discovery::listener_records(&cfg.listeners),
            ready: true,
        },
        lease_ttl: Duration::from_secs(cfg.lease_ttl_secs),
        departed_listing: Duration::from_secs(cfg.departed_broker_listing_secs),
        consumer_groups: floe_engine::consumer_group::Config {
            session_timeout: Duration::from_millis(cfg.group_consumer_session_timeout_ms),
            heartbeat_interval: Duration::from_millis(cfg.group_consumer_heartbeat_interval_ms),
        },
        cleanup: CleanupSettings {
            interval: Duration::from_secs(cfg.cleanup_interval_secs),
            delete_grace: Duration::from_secs(cfg.delete_grace_secs),
            orphan_grace: Duration::from_secs(cfg.orphan_grace_secs),
            orphan_sweep_interval: Duration::from_secs(cfg.orphan_sweep_interval_secs),
            multipart_abort_after: Duration::from_secs(cfg.multipart_abort_after_secs),
            archive: floe_engine::committer::ArchiveSettings {
                target_bytes: cfg.archive_target_bytes,
                max_age: Duration::from_secs(cfg.archive_max_age_secs),
                // Often enough to archive a busy partition soon after it
                // reaches the target.
                interval: Duration::from_secs(cfg.archive_max_age_secs.clamp(1, 5)),
                key_map_bytes: usize::try_from(cfg.compaction_key_map_bytes).unwrap_or(usize::MAX),
            },
        },
    };
    Engine::start(start, sidecar, store, meta)
        .context("starting the engine (registering, loading the snapshot, replaying the log)")
}

/// What shapes the protocol layer's answers.
fn broker_settings(cfg: &Resolved, node_id: i32) -> Settings {
    Settings {
        node_id,
        advertise_host: cfg.advertise_host.clone(),
        advertise_port: cfg.advertise_port,
        listeners: floe_net::discovery::listener_records(&cfg.listeners),
        zone: cfg.zone.clone(),
        group: cfg.group.clone(),
        auto_create_topics: cfg.auto_create_topics,
        num_partitions: cfg.num_partitions,
        max_message_bytes: cfg.max_message_bytes,
        max_request_bytes: cfg.max_request_bytes,
        fetch_wait_ms_max: cfg.fetch_wait_ms_max,
        authorizer: cfg.authorizer.clone().map(Arc::new),
        sasl_failure_delay: Duration::from_millis(cfg.sasl_failed_authentication_delay_ms),
        connections_max_idle: (cfg.connections_max_idle_ms > 0)
            .then(|| Duration::from_millis(cfg.connections_max_idle_ms)),
    }
}

/// The first SIGTERM/SIGINT drains the broker; a second exits at once.
fn install_signals(
    engine: &Arc<Engine>,
    notifier: Option<Arc<crate::notify::Notifier>>,
) -> anyhow::Result<()> {
    let engine = engine.clone();
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
                    engine.shutdown().trigger();
                } else {
                    tracing::warn!(signal = sig, "second signal: exiting without draining");
                    std::process::exit(130);
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// The shard threads, and where each reports whether it bound every
/// listener.
struct ShardThreads {
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    bound: std::sync::mpsc::Receiver<Result<(), String>>,
}

/// One pinned glommio executor per shard, each running
/// `floe_net::server::shard_main`.
fn start_shards(
    cfg: &Resolved,
    broker: &Arc<Broker>,
    security: &ListenerSecurity,
    balance: &Arc<Balance>,
    moved: Vec<flume::Receiver<floe_net::balance::Moved>>,
) -> anyhow::Result<ShardThreads> {
    let cpus = floe_tuning::cpus_allowed();
    let barrier = Arc::new(Barrier::default());
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut threads = Vec::new();
    for (i, moved) in moved.into_iter().enumerate() {
        let broker = broker.clone();
        let balance = balance.clone();
        let listeners: Vec<_> = cfg
            .listeners
            .iter()
            .map(|l| (l.clone(), security.of(l)))
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
                shard_main(i, shards, broker, conns, bound_tx, barrier)
            })
            .map_err(|e| {
                anyhow::anyhow!(
                    "starting shard {i}: {e} — {}",
                    io_uring_hint(&e.to_string())
                )
            })?;
        threads.push(handle);
    }
    Ok(ShardThreads {
        threads,
        bound: bound_rx,
    })
}

/// The one start-up line operators and tests look for.
fn announce(cfg: &Resolved, engine: &Engine) {
    let binds: Vec<&str> = cfg.listeners.iter().map(|l| l.bind.as_str()).collect();
    let advertised: Vec<String> = cfg
        .listeners
        .iter()
        .map(|l| format!("{}://{}:{}", l.name, l.advertised_host, l.advertised_port))
        .collect();
    let (objects, metadata) = engine.describe_backends();
    tracing::info!(
        "listening on {} (kafka), admin on {}, advertising {}, zone {:?}, group {:?}, node {}, {} shard(s), objects {}, metadata {}, {} log entries replayed",
        binds.join(", "),
        cfg.admin_listen,
        advertised.join(", "),
        cfg.zone,
        cfg.group,
        engine.node_id(),
        cfg.shards,
        objects,
        metadata,
        engine.replayed()
    );
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

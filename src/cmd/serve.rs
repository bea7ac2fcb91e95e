//! `floe serve`: open the backends, replay the commit log, start one
//! pinned glommio executor per shard (each serving the Kafka listeners, see
//! `floe_net::server`), serve until SIGTERM/SIGINT, then drain: stop
//! accepting, finish every request already read, seal and commit what was
//! accepted, answer those producers, and return.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use floe_engine::cluster::{allocate_node_id, Members, Registration};
use floe_engine::committer::Committer;
use floe_engine::metrics::Metrics;
use floe_engine::shard::{self, ShardInbox, ShardIndexSink};
use floe_engine::sidecar::Sidecar;
use floe_engine::topics::Topics;
use floe_engine::{Engine, EngineConfig, Shutdown};
use floe_meta::schema::BrokerRecord;
use floe_meta::{schema, Compare, MetaStore, Op, Txn};
use floe_net::balance::Balance;
use floe_net::broker::{Broker, Settings};
use floe_net::server::{shard_main, Barrier, Conns, ListenerSecurity};
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::Resolved;

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
    let security = ListenerSecurity::load(
        &cfg.listeners,
        cfg.tls.as_ref(),
        cfg.sasl_users_file.as_deref(),
    )?;
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
                listeners: floe_net::discovery::listener_records(&cfg.listeners),
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
            listeners: floe_net::discovery::listener_records(&cfg.listeners),
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

//! [`Engine`]: what one broker's engine offers the protocol layer, and how
//! it starts. The protocol layer holds an `Arc<Engine>` and, on each shard,
//! that shard's [`Shard`]; it never reaches the sidecar, the committer or
//! the backends itself.
//!
//! Start-up ([`Engine::start`]) loads topics, registers the broker under a
//! lease, recovers the commit log (snapshot, then replay), and spawns on
//! the sidecar every background task the engine owns: the committer, the
//! log, topic and membership followers, the registration keep-alive and
//! the group coordinator. Each shard thread then calls
//! [`Engine::start_shard`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use floe_meta::schema::{self, BrokerRecord, ProducerEpoch, TopicRecord};
use floe_meta::{Compare, MetaStore, Op, Txn};
use floe_objstore::ObjectStore;
use futures::channel::oneshot;

use crate::cluster::{Members, Registration};
use crate::committer::{CommitRequest, Committer, Lifecycle};
use crate::coordinator::{CoordError, Coordinator};
use crate::metrics::Metrics;
use crate::shard::{self, Shard, ShardInbox, ShardIndexSink, ShardLink};
use crate::sidecar::{Sidecar, SidecarHandle};
use crate::topics::{TopicMap, Topics};
use crate::txn_store::TxnStoreError;
use crate::{EngineConfig, Error, PartitionKey, Result, Shutdown};

/// Commit requests queued before shards wait for the committer.
const COMMIT_QUEUE_MAX: usize = 1024;
fn snapshot_gone(e: &Error) -> bool {
    matches!(e, Error::Storage { source } if matches!(source.root(), floe_objstore::Error::NotFound { .. }))
}

/// Attempts to load the snapshot and replay the log at start-up, a second
/// apart, before the broker gives up (a store down for two minutes).
const RECOVER_ATTEMPTS_MAX: u32 = 120;
const RECOVER_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// First producer id handed out; lower ones are left unused.
pub(crate) const PRODUCER_ID_FIRST: i64 = 1000;

/// How the engine cleans up after itself: retention and object deletion
/// (see [`crate::committer::Lifecycle`]).
#[derive(Debug, Clone)]
pub struct CleanupSettings {
    /// How often the cleanup owner applies retention and deletes.
    pub interval: Duration,
    /// A released segment is deleted this long after its last reference.
    pub delete_grace: Duration,
    /// An object the log does not know is deleted once this old.
    pub orphan_grace: Duration,
    /// How often the bucket is listed for orphans.
    pub orphan_sweep_interval: Duration,
    /// Multipart uploads older than this are aborted (S3 only).
    pub multipart_abort_after: Duration,
    /// The archiving job (see `committer::archiving`).
    pub archive: crate::committer::ArchiveSettings,
}

/// Longest wait for a read of the metadata store made only to answer with
/// the freshest value ([`Engine::topic_fresh`]).
pub const FRESH_READ_MAX: Duration = Duration::from_secs(2);

/// Everything [`Engine::start`] needs besides the backends.
pub struct EngineStart {
    pub config: EngineConfig,
    /// This broker as the cluster sees it (its `node_id` is
    /// `config.node_id`).
    pub broker: BrokerRecord,
    /// The membership lease: a broker silent this long is gone.
    pub lease_ttl: Duration,
    /// How long a broker that left stays listed (see [`Members::departed`]).
    pub departed_listing: Duration,
    pub cleanup: CleanupSettings,
    /// Consumer-protocol (KIP-848) group timings.
    pub consumer_groups: crate::consumer_group::Config,
}

/// A running engine. Shared by every shard (`Send + Sync`); nothing here is
/// on the per-record path except reading `shards`.
pub struct Engine {
    pub(crate) config: EngineConfig,
    pub(crate) sidecar: SidecarHandle,
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) meta: Arc<dyn MetaStore>,
    pub(crate) topics: Arc<Topics>,
    pub(crate) members: Arc<Members>,
    pub(crate) committer: flume::Sender<CommitRequest>,
    pub(crate) shards: Vec<ShardLink>,
    pub(crate) metrics: Arc<Metrics>,
    shutdown: Shutdown,
    /// Set by [`Engine::leave`] once the shards have drained: the
    /// registration is revoked only then.
    drained: Arc<Shutdown>,
    /// Set once the registration is revoked (or given up).
    left: Arc<Shutdown>,
    cluster_id: String,
    groups: Arc<Coordinator>,
    txns: Arc<crate::transactions::Transactions>,
    /// SASL/SCRAM users (`scram/*`).
    users: Arc<crate::users::Users>,
    /// Kafka ACLs (`acls/*`).
    acls: Arc<crate::acls::Acls>,
    /// Dynamic broker configs (`configs/brokers/*`).
    broker_configs: Arc<crate::broker_configs::BrokerConfigs>,
    /// Client quotas (`quotas/*`).
    quotas: Arc<crate::quotas::Quotas>,
    /// Each shard's receivers, taken by [`Engine::start_shard`].
    inboxes: Mutex<Vec<Option<ShardInbox>>>,
    /// Log entries replayed at start-up.
    replayed: u64,
    /// The membership lease TTL (health judges staleness by it).
    lease_ttl: Duration,
}

impl Engine {
    /// Starts the engine on `sidecar` (where `meta` was opened; the caller
    /// keeps the runtime and shuts it down after the shards): see the
    /// module documentation for what runs where.
    pub fn start(
        start: EngineStart,
        sidecar: &Sidecar,
        store: Arc<dyn ObjectStore>,
        meta: Arc<dyn MetaStore>,
    ) -> Result<Arc<Self>> {
        let handle = sidecar.handle();
        let node_id = start.config.node_id;
        let topics = Arc::new(sidecar.block_on(Topics::load(meta.clone()))?);
        let users = Arc::new(sidecar.block_on(crate::users::Users::load(meta.clone()))?);
        let acls = Arc::new(sidecar.block_on(crate::acls::Acls::load(meta.clone()))?);
        let broker_configs =
            Arc::new(sidecar.block_on(crate::broker_configs::BrokerConfigs::load(meta.clone()))?);
        let quotas = Arc::new(sidecar.block_on(crate::quotas::Quotas::load(meta.clone()))?);
        let cluster_id = sidecar.block_on(cluster_id(&*meta))?;
        let registration = sidecar.block_on(Registration::register(
            meta.clone(),
            start.broker,
            start.lease_ttl,
        ))?;
        let members = Arc::new(Members::new(start.departed_listing));
        let (links, inboxes): (Vec<_>, Vec<ShardInbox>) =
            (0..start.config.shards).map(|_| shard::link()).unzip();
        let (commit_tx, commit_rx) = flume::bounded(COMMIT_QUEUE_MAX);
        let metrics = Arc::new(Metrics::new(start.config.shards));
        let sink = Arc::new(ShardIndexSink {
            links: links.iter().map(|l| l.index.clone()).collect(),
        });
        let c = &start.cleanup;
        let lifecycle = Lifecycle {
            node_id,
            topics: topics.clone(),
            members: members.clone(),
            interval: c.interval,
            delete_grace: c.delete_grace,
            orphan_grace: c.orphan_grace,
            orphan_sweep_interval: c.orphan_sweep_interval,
            multipart_abort_after: c.multipart_abort_after,
        };
        let txns = Arc::new(crate::transactions::Transactions::new(
            meta.clone(),
            commit_tx.clone(),
            topics.clone(),
            start.config.transaction_max_timeout_ms,
            start.config.transactional_id_expiration_ms,
        ));
        let mut committer = Committer::new(meta.clone(), store.clone(), sink)
            .with_fence(registration.fence())
            .with_verified_cache(txns.verified_cache())
            .with_producer_expiration(start.config.producer_id_expiration_ms)
            .with_log_window(
                start.config.snapshot_every_entries,
                start.config.log_keep_entries,
            )
            .with_metrics(metrics.clone())
            .with_lifecycle(lifecycle)
            .with_archiver(crate::committer::Archiver::new(
                c.archive.clone(),
                &commit_tx,
            ));
        let replayed = sidecar.block_on(async {
            // A store or metadata hiccup at start-up (the snapshot read
            // failing once) is retried, as it would be later; only an
            // error retrying cannot fix stops the broker.
            let mut attempt = 0u32;
            loop {
                match committer.recover().await {
                    Ok(n) => return Ok(n),
                    // A snapshot deleted under us (the pointer moved on)
                    // is read again through the new pointer.
                    Err(e)
                        if (e.is_retriable() || snapshot_gone(&e))
                            && attempt < RECOVER_ATTEMPTS_MAX =>
                    {
                        attempt += 1;
                        tracing::warn!(error = %e, attempt, "loading the commit log failed; retrying");
                        tokio::time::sleep(RECOVER_RETRY_PAUSE).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        })?;
        let groups = Coordinator::with_consumer_config(
            node_id,
            meta.clone(),
            start.lease_ttl,
            start.consumer_groups,
        );
        let engine = Arc::new(Self {
            config: start.config,
            sidecar: handle.clone(),
            store,
            meta: meta.clone(),
            topics: topics.clone(),
            members: members.clone(),
            committer: commit_tx,
            shards: links,
            metrics,
            shutdown: Shutdown::default(),
            drained: Arc::default(),
            left: Arc::default(),
            cluster_id,
            groups: groups.clone(),
            txns: txns.clone(),
            users: users.clone(),
            acls: acls.clone(),
            broker_configs: broker_configs.clone(),
            quotas: quotas.clone(),
            inboxes: Mutex::new(inboxes.into_iter().map(Some).collect()),
            replayed,
            lease_ttl: start.lease_ttl,
        });
        let poke = Arc::new(tokio::sync::Notify::new());
        handle.spawn({
            let poke = poke.clone();
            async move {
                committer.run(commit_rx, poke).await;
            }
        });
        handle.spawn(crate::committer::follow_log(meta.clone(), poke));
        handle.spawn(topics.follow());
        handle.spawn(users.follow());
        handle.spawn(acls.follow());
        handle.spawn(broker_configs.follow());
        handle.spawn(quotas.follow());
        handle.spawn(members.follow(meta));
        let stop = || {
            let engine = Arc::downgrade(&engine);
            async move {
                if let Some(e) = engine.upgrade() {
                    e.shutdown.wait().await;
                }
            }
        };
        let ready = {
            let engine = Arc::downgrade(&engine);
            move || {
                engine
                    .upgrade()
                    .is_none_or(|e| !e.shutdown.is_triggered() && e.unready_reason().is_none())
            }
        };
        handle.spawn({
            let (drained, left) = (engine.drained.clone(), engine.left.clone());
            let metrics = engine.metrics.clone();
            let stopping = stop();
            async move {
                registration
                    .maintain(stopping, drained.wait(), metrics, ready)
                    .await;
                left.trigger();
            }
        });
        handle.spawn(probe_store(Arc::downgrade(&engine)));
        handle.spawn(groups.run(stop()));
        handle.spawn(scan_transactions(
            txns,
            engine.members.clone(),
            node_id,
            stop(),
        ));
        Ok(engine)
    }

    /// Starts shard `id`'s side of the engine on the calling (shard)
    /// thread: its segment builder, index and read cache. The future
    /// resolves once the shard is closed and its last commits are done.
    pub fn start_shard(
        self: &Arc<Self>,
        id: usize,
    ) -> Result<(std::rc::Rc<Shard>, impl Future<Output = ()>)> {
        let inbox = self
            .inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(id)
            .and_then(Option::take)
            .ok_or_else(|| Error::Corrupt {
                what: format!("shard {id}"),
                reason: "started twice, or beyond the configured shards".into(),
            })?;
        Ok(Shard::start(id, self.clone(), inbox))
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn node_id(&self) -> i32 {
        self.config.node_id
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Log entries replayed at start-up.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// Why this broker cannot serve now, if it cannot (see
    /// [`crate::health`]).
    pub fn unready_reason(&self) -> Option<String> {
        crate::health::unready_reason(&self.metrics, self.lease_ttl, crate::health::now_ms())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Leaves the cluster: revokes this broker's registration. Call it
    /// after the shards have drained (their futures from
    /// [`Engine::start_shard`] resolved), never before: the drain's
    /// commits are fenced by the registration. Waits at most one lease
    /// TTL for the revoke; the lease expires by itself otherwise.
    pub async fn leave(&self) {
        self.shutdown.trigger();
        self.drained.trigger();
        if tokio::time::timeout(self.lease_ttl, self.left.wait())
            .await
            .is_err()
        {
            tracing::warn!("revoking the registration timed out; its lease will expire");
        }
    }

    /// The object store's own request counts, when its backend keeps them.
    pub fn object_store_accounting(&self) -> Option<Arc<floe_objstore::Accounting>> {
        self.store.accounting()
    }

    /// Human-readable names of the backends, for the start-up line.
    pub fn describe_backends(&self) -> (String, String) {
        (self.store.describe(), self.meta.describe())
    }

    /// The shard that owns `tp` on every broker.
    pub fn owner(&self, tp: &PartitionKey) -> usize {
        tp.owner(self.shards.len())
    }

    /// Notified whenever the partitions `shard` owns gain committed data
    /// (long-polling fetches wait on it).
    pub fn data_event(&self, shard: usize) -> &event_listener::Event {
        &self.shards[shard % self.shards.len()].data
    }

    /// Live brokers, by node id.
    /// Reads the commit log to its head; answers the last entry applied
    /// then. Once this broker's shards have applied it, they know every
    /// commit that landed before the call.
    pub fn sync_log(&self) -> impl Future<Output = Result<u64>> + 'static {
        let committer = self.committer.clone();
        async move {
            let (reply, rx) = oneshot::channel();
            committer
                .send_async(CommitRequest::Sync { reply })
                .await
                .map_err(|_| Error::ShuttingDown)?;
            rx.await.unwrap_or(Err(Error::ShuttingDown))
        }
    }

    pub fn live_brokers(&self) -> Arc<Vec<BrokerRecord>> {
        self.members.live()
    }

    /// Brokers that left the membership not long ago, marked not ready
    /// (see [`Members::departed`]).
    pub fn departed_brokers(&self) -> Vec<BrokerRecord> {
        self.members.departed()
    }

    // ---- SCRAM users ------------------------------------------------------

    /// The SCRAM credential of `user` for `mechanism` (its name), if any.
    pub async fn scram_credential(
        &self,
        user: &str,
        mechanism: &str,
    ) -> Result<Option<floe_meta::schema::ScramCredential>> {
        let (users, user, mechanism) =
            (self.users.clone(), user.to_string(), mechanism.to_string());
        self.sidecar
            .run(async move { users.credential(&user, &mechanism).await })
            .await
    }

    /// Every user with SCRAM credentials, read from the metadata store.
    pub async fn scram_users(&self) -> Result<Vec<floe_meta::schema::ScramUserRecord>> {
        let users = self.users.clone();
        self.sidecar.run(async move { users.list().await }).await
    }

    /// Applies one user's credential changes (AlterUserScramCredentials).
    pub async fn alter_scram_user(
        &self,
        user: &str,
        change: crate::users::UserChange,
    ) -> std::result::Result<(), crate::users::UserChangeError> {
        let (users, user) = (self.users.clone(), user.to_string());
        match self
            .sidecar
            .run(async move { Ok(users.alter(&user, &change).await) })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(crate::users::UserChangeError::Store(e)),
        }
    }

    // ---- ACLs ------------------------------------------------------------

    /// The ACLs this broker enforces (a snapshot followed by a watch).
    pub fn acls(&self) -> &crate::acls::Acls {
        &self.acls
    }

    /// Dynamic broker configs per scope, as last read.
    pub fn broker_configs(&self) -> Arc<crate::broker_configs::BrokerConfigMap> {
        self.broker_configs.snapshot()
    }

    /// Client quotas per entity, as last read.
    pub fn quotas(&self) -> Arc<crate::quotas::QuotaMap> {
        self.quotas.snapshot()
    }

    /// Applies AlterClientQuotas changes to one entity.
    pub async fn alter_quotas(
        &self,
        entity: Vec<floe_meta::schema::QuotaEntityPart>,
        ops: Vec<crate::quotas::QuotaOp>,
    ) -> Result<()> {
        let quotas = self.quotas.clone();
        self.sidecar
            .run(async move { quotas.alter(entity, &ops).await })
            .await
    }

    /// Alters the dynamic broker configs of `scope` (`default` or a node
    /// id); see [`crate::broker_configs::BrokerConfigs::alter`].
    pub async fn alter_broker_configs(
        &self,
        scope: &str,
        change: Arc<crate::topics::ConfigChange>,
        validate_only: bool,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let (store, scope) = (self.broker_configs.clone(), scope.to_string());
        self.sidecar
            .run(async move { store.alter(&scope, &*change, validate_only).await })
            .await
    }

    /// Every ACL `filter` matches, read from the metadata store.
    pub async fn describe_acls(
        &self,
        filter: crate::acls::AclFilter,
    ) -> Result<Vec<crate::acls::AclBinding>> {
        let acls = self.acls.clone();
        self.sidecar
            .run(async move { acls.describe(&filter).await })
            .await
    }

    /// Adds ACLs (CreateAcls): one result per binding.
    pub async fn create_acls(&self, new: Vec<crate::acls::AclBinding>) -> Vec<Result<()>> {
        let acls = self.acls.clone();
        let n = new.len();
        match self
            .sidecar
            .run(async move { Ok(acls.create(&new).await) })
            .await
        {
            Ok(r) => r,
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }

    /// Removes the ACLs each filter matches (DeleteAcls).
    pub async fn delete_acls(
        &self,
        filters: Vec<crate::acls::AclFilter>,
    ) -> Vec<Result<Vec<crate::acls::AclBinding>>> {
        let acls = self.acls.clone();
        let n = filters.len();
        match self
            .sidecar
            .run(async move { Ok(acls.delete(&filters).await) })
            .await
        {
            Ok(r) => r,
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }

    // ---- topics ----------------------------------------------------------

    pub fn topic(&self, name: &str) -> Option<Arc<TopicRecord>> {
        self.topics.get(name)
    }

    /// Topic `name` as the metadata store has it now, so that a change
    /// made through another broker a moment ago is seen; `None` if it does
    /// not exist. An error when the store does not answer within
    /// [`FRESH_READ_MAX`]: [`Engine::topic`] is what this broker last saw.
    pub async fn topic_fresh(&self, name: &str) -> Result<Option<Arc<TopicRecord>>> {
        let (topics, n) = (self.topics.clone(), name.to_string());
        self.sidecar
            .run(async move {
                tokio::time::timeout(FRESH_READ_MAX, topics.get_fresh(&n))
                    .await
                    .unwrap_or_else(|_| {
                        Err(floe_meta::Error::Unavailable {
                            op: "get",
                            reason: format!("topic {n:?}: no answer within {FRESH_READ_MAX:?}"),
                        }
                        .into())
                    })
            })
            .await
    }

    /// Every topic, as of the last change this broker saw.
    pub fn topics(&self) -> Arc<TopicMap> {
        self.topics.snapshot()
    }

    /// Every topic by id (see [`crate::topics::Topics::by_id`]).
    pub fn topics_by_id(&self) -> Arc<crate::topics::TopicIdMap> {
        self.topics.by_id()
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: std::collections::BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<Arc<TopicRecord>> {
        let (topics, name) = (self.topics.clone(), name.to_string());
        self.sidecar
            .run(async move {
                topics
                    .create(&name, partitions, configs, validate_only)
                    .await
            })
            .await
    }

    /// The topic `name`, created with `partitions` if it does not exist
    /// (auto-creation: a concurrent creator's topic is as good as ours).
    pub async fn ensure_topic(&self, name: &str, partitions: u32) -> Result<Arc<TopicRecord>> {
        let (topics, name) = (self.topics.clone(), name.to_string());
        self.sidecar
            .run(async move {
                match topics
                    .create(&name, partitions, Default::default(), false)
                    .await
                {
                    Err(Error::TopicExists { .. }) => {
                        topics.get(&name).ok_or(Error::UnknownTopic { name })
                    }
                    other => other,
                }
            })
            .await
    }

    pub async fn delete_topic(&self, name: &str) -> Result<Arc<TopicRecord>> {
        let (topics, name) = (self.topics.clone(), name.to_string());
        self.sidecar
            .run(async move { topics.delete(&name).await })
            .await
    }

    /// Sets topic `name`'s configs to what `change` makes of them
    /// (IncrementalAlterConfigs, AlterConfigs); see `Topics::alter_configs`.
    pub async fn alter_topic_configs(
        &self,
        name: &str,
        change: Arc<crate::topics::ConfigChange>,
        validate_only: bool,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let (topics, name) = (self.topics.clone(), name.to_string());
        self.sidecar
            .run(async move { topics.alter_configs(&name, &*change, validate_only).await })
            .await
    }

    /// Raises topic `name`'s partition count to `total`.
    pub async fn add_partitions(&self, name: &str, total: u32, validate_only: bool) -> Result<()> {
        let (topics, name) = (self.topics.clone(), name.to_string());
        self.sidecar
            .run(async move { topics.add_partitions(&name, total, validate_only).await })
            .await
    }

    // ---- producers -------------------------------------------------------

    /// InitProducerId without a transactional id: a new producer id, or
    /// (when the client passes its current id and epoch) the same id at the
    /// next epoch, recorded in the commit log so that every broker's
    /// sequencer fences batches of the old one (KIP-360).
    pub async fn init_producer_id(&self, producer_id: i64, epoch: i16) -> Result<(i64, i16)> {
        if producer_id < 0 || epoch < 0 || epoch == i16::MAX {
            let meta = self.meta.clone();
            let id = self
                .sidecar
                .run(async move {
                    Ok(
                        floe_meta::take_next(&*meta, schema::PRODUCERS_NEXT, PRODUCER_ID_FIRST)
                            .await?,
                    )
                })
                .await?;
            return Ok((id, 0));
        }
        let bumped = ProducerEpoch {
            producer_id,
            epoch: epoch + 1,
        };
        let (tx, rx) = oneshot::channel();
        self.committer
            .send_async(CommitRequest::Epoch {
                epoch: bumped,
                reply: tx,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.unwrap_or(Err(Error::ShuttingDown))?;
        Ok((producer_id, bumped.epoch))
    }

    // ---- transactions ----------------------------------------------------

    /// The producers the log remembers in each of `partitions`, once this
    /// broker has read the log to its head (DescribeProducers).
    pub async fn describe_producers(
        &self,
        partitions: Vec<PartitionKey>,
    ) -> Result<Vec<Vec<crate::sequencer::ProducerSummary>>> {
        let (reply, rx) = oneshot::channel();
        self.committer
            .send_async(CommitRequest::Producers { partitions, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Runs `f` with the transaction coordinator on the sidecar, where its
    /// metadata-store calls run.
    pub async fn with_txns<T, F, Fut>(&self, f: F) -> Result<T, TxnStoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<crate::transactions::Transactions>) -> Fut,
        Fut: Future<Output = Result<T, TxnStoreError>> + Send + 'static,
    {
        let work = f(self.txns.clone());
        match self.sidecar.run(async move { Ok(work.await) }).await {
            Ok(r) => r,
            Err(e) => Err(TxnStoreError::Unavailable(e.to_string())),
        }
    }

    // ---- consumer groups -------------------------------------------------

    /// Runs `f` with this broker's group coordinator on the sidecar, where
    /// its metadata-store calls run. A broker shutting down answers
    /// [`CoordError::NotCoordinator`], so clients move to another broker.
    pub async fn with_groups<T, F, Fut>(&self, f: F) -> Result<T, CoordError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Coordinator>) -> Fut,
        Fut: Future<Output = Result<T, CoordError>> + Send + 'static,
    {
        let work = f(self.groups.clone());
        match self.sidecar.run(async move { Ok(work.await) }).await {
            Ok(r) => r,
            Err(_) => Err(CoordError::NotCoordinator),
        }
    }
}

/// The cluster id, created by the first broker that starts.
async fn cluster_id(meta: &dyn MetaStore) -> Result<String> {
    if let Some(kv) = meta.get(schema::CLUSTER_ID).await? {
        return Ok(String::from_utf8_lossy(&kv.value).into_owned());
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let txn = Txn::when(vec![Compare::ModRevision(schema::CLUSTER_ID.into(), 0)]).and_then(vec![
        Op::Put(schema::CLUSTER_ID.into(), Bytes::from(id.clone())),
    ]);
    meta.txn(txn).await?;
    let kv = meta.get(schema::CLUSTER_ID).await?.ok_or(Error::Conflict {
        what: schema::CLUSTER_ID.to_string(),
    })?;
    Ok(String::from_utf8_lossy(&kv.value).into_owned())
}

/// The cleanup owner's periodic turn over the transaction records (see
/// [`crate::transactions::Transactions::scan`]).
async fn scan_transactions(
    txns: Arc<crate::transactions::Transactions>,
    members: Arc<Members>,
    node_id: i32,
    stop: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(crate::transactions::TXN_SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let turns = async {
        loop {
            tick.tick().await;
            let owner = members.live().first().is_some_and(|b| b.node_id == node_id);
            if !owner {
                continue;
            }
            if let Err(e) = txns.scan().await {
                tracing::debug!(error = %e, "scanning transactions failed; will retry");
            }
        }
    };
    futures::pin_mut!(turns);
    futures::future::select(turns, Box::pin(stop)).await;
}

/// How often a broker that is not ready because of its object store checks
/// whether the store is back.
const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// The object a store probe writes (one per broker, overwritten).
fn probe_key(node_id: i32) -> String {
    format!("health/{node_id}")
}

/// While the last uploads failed (or crawled), writes a small object every
/// `STORE_PROBE_INTERVAL`, and clears the failure counts once one succeeds
/// in time. Without it a broker that Metadata stopped handing out would get
/// no uploads to prove the store healthy again. Costs nothing while ready.
async fn probe_store(engine: std::sync::Weak<Engine>) {
    loop {
        tokio::time::sleep(STORE_PROBE_INTERVAL).await;
        let Some(e) = engine.upgrade() else { return };
        let m = &e.metrics;
        let failing = Metrics::get(&m.upload_failures_in_a_row);
        let slow = Metrics::get(&m.upload_slow_in_a_row);
        if failing < crate::health::UPLOAD_FAILURES_NOT_READY
            && slow < crate::health::UPLOAD_FAILURES_NOT_READY
        {
            continue;
        }
        let started = std::time::Instant::now();
        let body = Bytes::from(crate::health::now_ms().to_string());
        match e.store.put(&probe_key(e.config.node_id), vec![body]).await {
            Ok(()) if started.elapsed() <= crate::metrics::UPLOAD_SLOW => {
                tracing::info!("the object store answers again; uploads resume");
                Metrics::set(&m.upload_failures_in_a_row, 0);
                Metrics::set(&m.upload_slow_in_a_row, 0);
            }
            Ok(()) => Metrics::set(&m.upload_failures_in_a_row, 0),
            Err(err) => tracing::debug!(error = %err, "object store probe failed"),
        }
    }
}

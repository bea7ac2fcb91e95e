//! The group coordinator of one broker: the [`Group`] state machines this
//! broker coordinates, their waiting JoinGroup/SyncGroup requests, and the
//! committed offsets in the metadata store. Runs on the sidecar (tokio);
//! shards call it through [`crate::sidecar::SidecarHandle::run`].
//!
//! floe has no fixed coordinators. A broker coordinates a group once it
//! holds `group-owners/<group>` under its own lease: the first broker a
//! group's members are sent to (by FindCoordinator, in their zone) claims
//! it; when that broker dies its lease expires, the claim vanishes and the
//! next broker asked claims it and loads the group from `groups/<group>`,
//! so members keep their generation and assignment. Every write of the
//! group record is a compare-and-swap on the revision this broker last
//! wrote, so two brokers can never both advance one group.
//!
//! Committed offsets are plain keys in the metadata store, written before
//! OffsetCommit is answered: any broker can read them back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use floe_meta::schema::{self, OffsetRecord};
use floe_meta::{prefix_end, Compare, LeaseId, MetaStore, Op, Txn};
use futures::channel::oneshot;

use crate::consumer_group::{self, CgState, ConsumerGroup, Heartbeat, HeartbeatAnswer, Topics};
use crate::group::{
    Effects, Group, GroupError, GroupRecord, GroupState, JoinOutcome, JoinRequest, Joined,
    SyncOutcome, Synced,
};

/// How often deadlines (sessions, rebalance timeouts) are checked.
const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// Keys read per range request when listing offsets or groups.
const RANGE_KEYS_MAX: usize = 10_000;
/// An empty group nobody asked about for this long is unloaded and its
/// claim given up: the record and offsets stay in the metadata store, and
/// the next request claims and loads it again. Memory follows the groups
/// in use, not every group ever created.
pub const GROUP_IDLE_UNLOAD: Duration = Duration::from_secs(300);
/// How often idle groups are looked for.
const UNLOAD_INTERVAL: Duration = Duration::from_secs(30);
/// How long FindCoordinator waits for the metadata store to say who owns
/// a group before it answers without knowing (see
/// [`Coordinator::current_owner`]).
pub const OWNER_LOOKUP_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum CoordError {
    /// Another broker coordinates the group (or this one just lost it).
    #[error("this broker is not the group's coordinator")]
    NotCoordinator,
    /// The metadata store could not be reached.
    #[error("group coordination unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Group(GroupError),
}

impl From<GroupError> for CoordError {
    fn from(e: GroupError) -> Self {
        CoordError::Group(e)
    }
}

impl From<floe_meta::Error> for CoordError {
    fn from(e: floe_meta::Error) -> Self {
        CoordError::Unavailable(e.to_string())
    }
}

pub type CoordResult<T> = std::result::Result<T, CoordError>;

/// A JoinGroup's answer: the member id goes back even with an error
/// (MEMBER_ID_REQUIRED carries the id the client must rejoin with).
pub type JoinAnswer = std::result::Result<Joined, (CoordError, String)>;

/// One group id names one group, under either protocol. An empty group
/// takes the protocol of the next member that joins (Kafka's upgrade and
/// downgrade of empty groups); a group with members refuses the other
/// protocol's members.
enum Protocol {
    Classic(Group),
    Consumer(ConsumerGroup),
}

impl Protocol {
    fn load(group_id: &str, rec: GroupRecord, now: Instant, cfg: &consumer_group::Config) -> Self {
        match rec.consumer {
            Some(mut cg) => {
                cg.id = group_id.to_string();
                Protocol::Consumer(cg.loaded(now, cfg))
            }
            None => Protocol::Classic(Group::from_record(group_id, rec, now)),
        }
    }

    fn record(&self) -> GroupRecord {
        match self {
            Protocol::Classic(g) => g.record(),
            Protocol::Consumer(cg) => GroupRecord {
                generation: cg.epoch,
                protocol_type: "consumer".into(),
                protocol: cg.assignor.clone(),
                leader: String::new(),
                members: Vec::new(),
                consumer: Some(cg.clone()),
            },
        }
    }

    fn is_dead(&self) -> bool {
        match self {
            Protocol::Classic(g) => g.state() == GroupState::Dead,
            Protocol::Consumer(cg) => cg.state() == CgState::Dead,
        }
    }

    /// Empty, with nothing due.
    fn is_quiet(&self) -> bool {
        match self {
            Protocol::Classic(g) => g.state() == GroupState::Empty && g.next_deadline().is_none(),
            Protocol::Consumer(cg) => cg.is_empty() && cg.next_deadline().is_none(),
        }
    }

    fn generation(&self) -> i32 {
        match self {
            Protocol::Classic(g) => g.generation(),
            Protocol::Consumer(cg) => cg.epoch,
        }
    }

    /// The classic group a JoinGroup joins: an empty consumer-protocol
    /// group becomes one.
    fn classic_join(&mut self) -> Result<&mut Group, GroupError> {
        if let Protocol::Consumer(cg) = self {
            if !cg.is_empty() {
                return Err(GroupError::InconsistentGroupProtocol);
            }
            tracing::info!(group = %cg.id, "empty consumer-protocol group converted to a classic group");
            *self = Protocol::Classic(Group::new(cg.id.clone()));
        }
        self.classic()
    }

    /// The classic group of a SyncGroup, Heartbeat or LeaveGroup: a
    /// consumer-protocol group has no classic members.
    fn classic(&mut self) -> Result<&mut Group, GroupError> {
        match self {
            Protocol::Classic(g) => Ok(g),
            Protocol::Consumer(_) => Err(GroupError::UnknownMemberId),
        }
    }

    /// The consumer-protocol group of a ConsumerGroupHeartbeat: an empty
    /// classic group becomes one (its committed offsets stay).
    fn consumer(&mut self) -> Result<&mut ConsumerGroup, GroupError> {
        if let Protocol::Classic(g) = self {
            if g.state() != GroupState::Empty || !g.is_empty() {
                return Err(GroupError::GroupIdNotFound);
            }
            if g.generation() > 0 {
                tracing::info!(group = %g.id, "empty classic group converted to a consumer-protocol group");
            }
            *self = Protocol::Consumer(ConsumerGroup::new(g.id.clone()));
        }
        match self {
            Protocol::Consumer(cg) => Ok(cg),
            Protocol::Classic(_) => Err(GroupError::GroupIdNotFound),
        }
    }

    fn check_commit(
        &self,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        match self {
            Protocol::Classic(g) => g.check_commit(member_id, generation, instance_id),
            Protocol::Consumer(cg) => cg.check_commit(member_id, generation),
        }
    }

    fn delete(&mut self) -> Result<(), GroupError> {
        match self {
            Protocol::Classic(g) => g.delete(),
            Protocol::Consumer(cg) => cg.delete(),
        }
    }
}

struct Slot {
    group: Protocol,
    /// Mod revision of `groups/<id>` as this broker last wrote or read it
    /// (0: absent).
    revision: u64,
    joins: HashMap<String, oneshot::Sender<Result<Joined, GroupError>>>,
    syncs: HashMap<String, oneshot::Sender<Result<Synced, GroupError>>>,
    /// When a request last reached the group.
    touched: Instant,
    /// Mod revision of `group-owners/<id>` as this broker's claim wrote
    /// it: unique to this claim. Writes compare it, not the node id, which
    /// an earlier claim by this same broker also wrote.
    claim: u64,
}

impl Slot {
    /// Empty, nobody waiting, and untouched for `idle` at `now`.
    fn is_idle(&self, now: Instant, idle: Duration) -> bool {
        // No deadline: no member, no pending member id, no rebalance.
        self.group.is_quiet()
            && self.joins.is_empty()
            && self.syncs.is_empty()
            && now.saturating_duration_since(self.touched) >= idle
    }

    fn deliver(&mut self, fx: &mut Effects) {
        for (id, r) in fx.joined.drain(..) {
            if let Some(tx) = self.joins.remove(&id) {
                let _ = tx.send(r);
            }
        }
        for (id, r) in fx.synced.drain(..) {
            if let Some(tx) = self.syncs.remove(&id) {
                let _ = tx.send(r);
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    lease: Option<LeaseId>,
    /// When the last renewal (or the grant) of `lease` that succeeded was
    /// sent: etcd keeps the lease at least a TTL after that, not longer
    /// for sure.
    renewed_at: Option<Instant>,
    groups: HashMap<String, Slot>,
}

/// The part of the lease TTL this broker coordinates for after its last
/// successful renewal was sent; the rest covers clock-rate differences.
const LEASE_TRUST_NUM: u32 = 9;
const LEASE_TRUST_DEN: u32 = 10;

/// A group as ListGroups/DescribeGroups show it.
#[derive(Debug, Clone)]
pub struct GroupSummary {
    pub group_id: String,
    /// Kafka's name of its state (the classic or the consumer protocol's).
    pub state: &'static str,
    /// "classic" or "consumer" (ListGroups v5's group type).
    pub kind: &'static str,
    pub protocol_type: String,
    pub protocol: String,
    pub members: Vec<crate::group::Member>,
    /// Node id of the broker coordinating it now, if any.
    pub owner: Option<i32>,
}

/// What OffsetDelete needs to know of a group's subscriptions.
#[derive(Debug, Clone, Default)]
pub struct Subscriptions {
    /// Members are subscribed (a classic group of the consumer protocol
    /// type with members, or a consumer-protocol group with members).
    pub active: bool,
    /// A classic group's members' raw subscription bytes.
    pub classic: Vec<Bytes>,
    /// A consumer-protocol group's subscribed topics.
    pub topics: Vec<String>,
}

pub struct Coordinator {
    node_id: i32,
    meta: Arc<dyn MetaStore>,
    lease_ttl: Duration,
    consumer: consumer_group::Config,
    inner: Mutex<Inner>,
    /// Serializes claims and record writes (both read-then-CAS).
    writes: tokio::sync::Mutex<()>,
}

impl Coordinator {
    pub fn new(node_id: i32, meta: Arc<dyn MetaStore>, lease_ttl: Duration) -> Arc<Self> {
        Self::with_consumer_config(node_id, meta, lease_ttl, consumer_group::Config::default())
    }

    pub fn with_consumer_config(
        node_id: i32,
        meta: Arc<dyn MetaStore>,
        lease_ttl: Duration,
        consumer: consumer_group::Config,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            meta,
            lease_ttl,
            consumer,
            inner: Mutex::new(Inner::default()),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a group half-updated
        // in a way later calls depend on; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ticks every group and renews the ownership lease until `stop`.
    /// Runs on the sidecar.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(TICK_INTERVAL);
        let mut renew = tokio::time::interval(self.lease_ttl / 3);
        let mut unload = tokio::time::interval(UNLOAD_INTERVAL);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => self.tick(Instant::now()).await,
                _ = renew.tick() => self.renew().await,
                _ = unload.tick() => {
                    self.unload_idle(Instant::now(), GROUP_IDLE_UNLOAD).await;
                }
            }
        }
        self.resign().await;
    }

    async fn tick(&self, now: Instant) {
        let mut to_persist = Vec::new();
        {
            let mut inner = self.lock();
            for (id, slot) in inner.groups.iter_mut() {
                match &mut slot.group {
                    Protocol::Classic(g) => {
                        if g.next_deadline().is_none_or(|d| d > now) {
                            continue;
                        }
                        let mut fx = g.tick(now);
                        if fx.persist {
                            to_persist.push(id.clone());
                        }
                        slot.deliver(&mut fx);
                    }
                    Protocol::Consumer(cg) => {
                        if cg.next_deadline().is_some_and(|d| d <= now) && cg.tick(now) {
                            to_persist.push(id.clone());
                        }
                    }
                }
            }
        }
        for id in to_persist {
            if let Err(e) = self.persist(&id).await {
                tracing::warn!(group = %id, error = %e, "persisting the group failed");
            }
        }
    }

    /// Unloads the groups idle for `idle` at `now` (see
    /// [`GROUP_IDLE_UNLOAD`]); returns how many went. Each is persisted
    /// first, so the record the next coordinator loads is this one, then
    /// dropped and its claim deleted while no claim or write can run. A
    /// request already past its claim finds no group (NOT_COORDINATOR) or
    /// fails its ownership compare, and its client asks again.
    pub async fn unload_idle(&self, now: Instant, idle: Duration) -> usize {
        let candidates: Vec<String> = self
            .lock()
            .groups
            .iter()
            .filter(|(_, s)| s.is_idle(now, idle))
            .map(|(id, _)| id.clone())
            .collect();
        let mut unloaded = 0;
        for id in candidates {
            if let Err(e) = self.persist(&id).await {
                tracing::debug!(group = %id, error = %e, "persisting an idle group failed; it stays loaded");
                continue;
            }
            let _w = self.writes.lock().await;
            // Checked and removed under one lock: a request that touched
            // the group since keeps it loaded.
            let claim = {
                let mut inner = self.lock();
                if !inner.groups.get(&id).is_some_and(|s| s.is_idle(now, idle)) {
                    continue;
                }
                inner.groups.remove(&id).map(|s| s.claim)
            };
            let Some(claim) = claim else { continue };
            let key = schema::group_owner_key(&id);
            let released = self
                .meta
                .txn(
                    Txn::when(vec![Compare::ModRevision(key.clone(), claim)])
                        .and_then(vec![Op::Delete(key)]),
                )
                .await;
            if let Err(e) = released {
                // The claim stays until this broker's lease ends; the next
                // request here claims the group again as its own.
                tracing::debug!(group = %id, error = %e, "releasing an idle group's claim failed");
            }
            unloaded += 1;
        }
        if unloaded > 0 {
            tracing::debug!(groups = unloaded, "unloaded idle empty groups");
        }
        unloaded
    }

    /// Groups this broker has loaded.
    pub fn groups_loaded(&self) -> usize {
        self.lock().groups.len()
    }

    /// Whether the ownership lease is surely still alive in the metadata
    /// store. Past that point another broker may claim this broker's
    /// groups, so it stops coordinating them at once (every request then
    /// answers NOT_COORDINATOR), even while the store is unreachable and
    /// cannot tell: two coordinators accepting offset commits for one group
    /// would let committed offsets go backwards.
    fn check_lease(&self) -> bool {
        let mut inner = self.lock();
        let Some(at) = inner.renewed_at else {
            return true;
        };
        if at.elapsed() < self.lease_ttl * LEASE_TRUST_NUM / LEASE_TRUST_DEN {
            return true;
        }
        if !inner.groups.is_empty() {
            tracing::warn!(
                groups = inner.groups.len(),
                "group ownership lease not renewed in time; no longer coordinating any group"
            );
        }
        inner.lease = None;
        inner.renewed_at = None;
        inner.groups.clear();
        false
    }

    async fn renew(&self) {
        let lease = self.lock().lease;
        let Some(lease) = lease else { return };
        let sent = Instant::now();
        match self.meta.keep_alive(lease).await {
            Ok(()) => {
                let mut inner = self.lock();
                if inner.lease == Some(lease) {
                    inner.renewed_at = Some(sent);
                }
            }
            Err(floe_meta::Error::LeaseExpired { .. }) => {
                tracing::warn!("group ownership lease lost; dropping every coordinated group");
                self.drop_all();
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the group ownership lease failed");
                self.check_lease();
            }
        }
    }

    /// Gives up every group at once (clean shutdown): revoking the lease
    /// deletes the claims, so members find the next coordinator without
    /// waiting for a TTL.
    async fn resign(&self) {
        let lease = self.lock().lease;
        self.drop_all();
        if let Some(lease) = lease {
            let _ = self.meta.revoke_lease(lease).await;
        }
    }

    fn drop_all(&self) {
        let mut inner = self.lock();
        inner.lease = None;
        inner.renewed_at = None;
        // Dropping the slots drops the senders: waiting requests answer
        // NOT_COORDINATOR and their clients look the coordinator up again.
        inner.groups.clear();
    }

    fn drop_group(&self, group_id: &str) {
        self.lock().groups.remove(group_id);
    }

    /// Makes this broker the group's coordinator if nobody is, and loads
    /// the group. `NotCoordinator` when another live broker holds it.
    async fn acquire(&self, group_id: &str) -> CoordResult<()> {
        if !self.check_lease() {
            return Err(CoordError::NotCoordinator);
        }
        if let Some(slot) = self.lock().groups.get_mut(group_id) {
            slot.touched = Instant::now();
            return Ok(());
        }
        let _w = self.writes.lock().await;
        if self.lock().groups.contains_key(group_id) {
            return Ok(());
        }
        let held = self.lock().lease;
        let lease = match held {
            Some(l) => l,
            None => {
                let sent = Instant::now();
                let l = self.meta.grant_lease(self.lease_ttl).await?;
                let mut inner = self.lock();
                inner.lease = Some(l);
                inner.renewed_at = Some(sent);
                l
            }
        };
        let owner_key = schema::group_owner_key(group_id);
        let me = Bytes::from(self.node_id.to_string());
        let current = self.meta.get(&owner_key).await?;
        let expect = match &current {
            None => 0,
            // A claim of this node id from an earlier life of the broker.
            Some(kv) if kv.value == me => kv.mod_revision,
            Some(_) => return Err(CoordError::NotCoordinator),
        };
        let claimed = self
            .meta
            .txn(
                Txn::when(vec![Compare::ModRevision(owner_key.clone(), expect)])
                    .and_then(vec![Op::PutLeased(owner_key, me, lease)]),
            )
            .await?;
        if !claimed.succeeded {
            return Err(CoordError::NotCoordinator);
        }
        // The claim's put is the transaction's only write: its revision.
        let claim = claimed.revision;
        let now = Instant::now();
        let empty = || Protocol::Classic(Group::new(group_id));
        let (group, revision) = match self.meta.get(&schema::group_key(group_id)).await? {
            Some(kv) => match serde_json::from_slice::<GroupRecord>(&kv.value) {
                Ok(rec) => (
                    Protocol::load(group_id, rec, now, &self.consumer),
                    kv.mod_revision,
                ),
                Err(e) => {
                    tracing::warn!(group = %group_id, error = %e, "unreadable group record; starting the group empty");
                    (empty(), kv.mod_revision)
                }
            },
            None => (empty(), 0),
        };
        tracing::info!(group = %group_id, generation = group.generation(), "coordinating group");
        self.lock().groups.insert(
            group_id.to_string(),
            Slot {
                group,
                revision,
                joins: HashMap::new(),
                syncs: HashMap::new(),
                touched: now,
                claim,
            },
        );
        Ok(())
    }

    /// Claims or loads the group, then runs `f` on it under the lock.
    async fn with_slot<T>(
        &self,
        group_id: &str,
        f: impl FnOnce(&mut Slot) -> CoordResult<T>,
    ) -> CoordResult<T> {
        self.acquire(group_id).await?;
        let mut inner = self.lock();
        let slot = inner
            .groups
            .get_mut(group_id)
            .ok_or(CoordError::NotCoordinator)?;
        f(slot)
    }

    /// Writes the group's record by CAS on the revision this broker last
    /// saw. Losing the CAS means another broker took the group over.
    async fn persist(&self, group_id: &str) -> CoordResult<()> {
        let _w = self.writes.lock().await;
        let (record, expect, dead, changes, claim) = {
            let inner = self.lock();
            let Some(slot) = inner.groups.get(group_id) else {
                return Err(CoordError::NotCoordinator);
            };
            let changes = match &slot.group {
                Protocol::Consumer(cg) => cg.changes(),
                Protocol::Classic(_) => 0,
            };
            (
                slot.group.record(),
                slot.revision,
                slot.group.is_dead(),
                changes,
                slot.claim,
            )
        };
        if dead {
            return Ok(());
        }
        let value = serde_json::to_vec(&record)
            .map_err(|e| CoordError::Unavailable(format!("encoding the group record: {e}")))?;
        let key = schema::group_key(group_id);
        // Under this claim only: a write held up in the network until the
        // claim ended (the lease expired) must not land over a group the
        // next coordinator has loaded and answers from without writing.
        let owner = Compare::ModRevision(schema::group_owner_key(group_id), claim);
        let out = self
            .meta
            .txn(
                Txn::when(vec![owner, Compare::ModRevision(key.clone(), expect)])
                    .and_then(vec![Op::Put(key, Bytes::from(value))]),
            )
            .await?;
        if !out.succeeded {
            tracing::warn!(group = %group_id, "group record or claim changed under this broker; giving the group up");
            self.drop_group(group_id);
            return Err(CoordError::NotCoordinator);
        }
        if let Some(slot) = self.lock().groups.get_mut(group_id) {
            slot.revision = out.revision;
            if let Protocol::Consumer(cg) = &mut slot.group {
                cg.persisted_up_to(changes);
            }
        }
        Ok(())
    }

    pub async fn join(&self, group_id: &str, req: JoinRequest) -> JoinAnswer {
        let member = req.member_id.clone();
        if let Err(e) = self.acquire(group_id).await {
            return Err((e, member));
        }
        let (outcome, persist) = {
            let mut inner = self.lock();
            let Some(slot) = inner.groups.get_mut(group_id) else {
                return Err((CoordError::NotCoordinator, member));
            };
            let group = match slot.group.classic_join() {
                Ok(g) => g,
                Err(e) => return Err((CoordError::Group(e), member)),
            };
            let (outcome, mut fx) = group.join(req, Instant::now());
            let persist = fx.persist;
            slot.deliver(&mut fx);
            let outcome = match outcome {
                JoinOutcome::Now(r) => Ok(r),
                JoinOutcome::Wait(id) => {
                    let (tx, rx) = oneshot::channel();
                    slot.joins.insert(id.clone(), tx);
                    Err((rx, id))
                }
            };
            (outcome, persist)
        };
        if persist {
            let _ = self.persist(group_id).await;
        }
        match outcome {
            Ok(r) => r.map_err(|(e, id)| (CoordError::Group(e), id)),
            Err((rx, id)) => match rx.await {
                Ok(r) => r.map_err(|e| (CoordError::Group(e), id)),
                Err(_) => Err((CoordError::NotCoordinator, id)),
            },
        }
    }

    pub async fn sync(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
        assignments: Vec<(String, Bytes)>,
    ) -> CoordResult<Synced> {
        self.acquire(group_id).await?;
        let (outcome, persist) = {
            let mut inner = self.lock();
            let Some(slot) = inner.groups.get_mut(group_id) else {
                return Err(CoordError::NotCoordinator);
            };
            let (outcome, mut fx) = slot.group.classic()?.sync(
                member_id,
                generation,
                instance_id,
                assignments,
                Instant::now(),
            );
            let persist = fx.persist;
            slot.deliver(&mut fx);
            let outcome = match outcome {
                SyncOutcome::Now(r) => Ok(r),
                SyncOutcome::Wait => {
                    let (tx, rx) = oneshot::channel();
                    slot.syncs.insert(member_id.to_string(), tx);
                    Err(rx)
                }
            };
            (outcome, persist)
        };
        if persist {
            // The leader's assignment is answered only once it is durable:
            // a coordinator that takes over must know this generation.
            self.persist(group_id).await?;
        }
        let r = match outcome {
            Ok(r) => r,
            Err(rx) => rx.await.map_err(|_| CoordError::NotCoordinator)?,
        };
        r.map_err(CoordError::Group)
    }

    pub async fn heartbeat(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
    ) -> CoordResult<()> {
        self.with_slot(group_id, |slot| {
            slot.group
                .classic()?
                .heartbeat(member_id, generation, instance_id, Instant::now())
                .map_err(CoordError::Group)
        })
        .await
    }

    /// LeaveGroup for several members; one result per member, in order.
    pub async fn leave(
        &self,
        group_id: &str,
        members: Vec<(String, Option<String>)>,
    ) -> CoordResult<Vec<(String, Option<String>, Result<(), GroupError>)>> {
        self.acquire(group_id).await?;
        let (results, persist) = {
            let mut inner = self.lock();
            let slot = inner
                .groups
                .get_mut(group_id)
                .ok_or(CoordError::NotCoordinator)?;
            let mut persist = false;
            let mut results = Vec::with_capacity(members.len());
            for (member, instance) in members {
                let (r, mut fx) =
                    slot.group
                        .classic()?
                        .leave(&member, instance.as_deref(), Instant::now());
                persist |= fx.persist;
                slot.deliver(&mut fx);
                let id = r.clone().unwrap_or(member);
                results.push((id, instance, r.map(|_| ())));
            }
            (results, persist)
        };
        if persist {
            let _ = self.persist(group_id).await;
        }
        Ok(results)
    }

    /// Validates an OffsetCommit against the group and writes the offsets.
    pub async fn commit_offsets(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
        offsets: Vec<(String, i32, OffsetRecord)>,
    ) -> CoordResult<()> {
        let (new_group, claim) = self
            .with_slot(group_id, |slot| {
                slot.group
                    .check_commit(member_id, generation, instance_id)
                    .map_err(CoordError::Group)?;
                Ok((slot.revision == 0, slot.claim))
            })
            .await?;
        let mut ops = Vec::with_capacity(offsets.len());
        for (topic, partition, rec) in offsets {
            let value = serde_json::to_vec(&rec)
                .map_err(|e| CoordError::Unavailable(format!("encoding an offset: {e}")))?;
            ops.push(Op::Put(
                schema::offset_key(group_id, &topic, partition),
                Bytes::from(value),
            ));
        }
        // More than one transaction's worth of partitions is written in
        // chunks; each partition's offset is still written whole. Each
        // chunk lands only while the claim it was validated under stands:
        // a coordinator that lost the group (its lease expired, another
        // broker claimed it) can never write an offset over the new
        // coordinator's. Not even a request of its own from an earlier
        // claim, held up in the network until this broker claimed the
        // group again (nemesis seed 5: an offset went back from 2970 to
        // 640 so): the compare is on this claim's revision.
        for chunk in ops.chunks(Txn::OPS_MAX) {
            self.write_under_claim(group_id, claim, chunk.to_vec())
                .await?;
        }
        if new_group {
            // A group known only by its offsets (simple consumers) still
            // shows in ListGroups.
            let _ = self.persist(group_id).await;
        }
        Ok(())
    }

    /// TxnOffsetCommit's group checks (KIP-447): the member and
    /// generation must be the group's current ones, so a consumer that
    /// lost its partitions in a rebalance (a zombie) cannot commit for
    /// them inside a transaction either.
    pub async fn check_txn_commit(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
    ) -> CoordResult<()> {
        self.with_slot(group_id, |slot| {
            slot.group
                .check_commit(member_id, generation, instance_id)
                .map_err(CoordError::Group)
        })
        .await
    }

    /// Committed offsets of a group; all of them when `topics` is `None`.
    /// Served by any broker: offsets are in the metadata store.
    pub async fn fetch_offsets(
        &self,
        group_id: &str,
        topics: Option<Vec<(String, Vec<i32>)>>,
    ) -> CoordResult<Vec<(String, i32, OffsetRecord)>> {
        let prefix = schema::group_offsets_prefix(group_id);
        let (start, end) = match &topics {
            // One topic: read only its keys.
            Some(t) if t.len() == 1 => {
                let p = format!("{prefix}{}/", t[0].0);
                let e = prefix_end(&p);
                (p, e)
            }
            _ => (prefix.clone(), prefix_end(&prefix)),
        };
        let kvs = self.meta.range(&start, &end, RANGE_KEYS_MAX).await?;
        let mut out = Vec::new();
        for kv in kvs {
            let Some((topic, partition)) = schema::parse_offset_key(&prefix, &kv.key) else {
                continue;
            };
            let wanted = topics.as_ref().is_none_or(|ts| {
                ts.iter()
                    .any(|(t, ps)| t == topic && (ps.is_empty() || ps.contains(&partition)))
            });
            if !wanted {
                continue;
            }
            if let Ok(rec) = serde_json::from_slice::<OffsetRecord>(&kv.value) {
                out.push((topic.to_string(), partition, rec));
            }
        }
        Ok(out)
    }

    /// Deletes a group without members, with its offsets.
    pub async fn delete_group(&self, group_id: &str) -> CoordResult<()> {
        let claim = self
            .with_slot(group_id, |slot| {
                slot.group.delete().map_err(CoordError::Group)?;
                Ok(slot.claim)
            })
            .await?;
        let prefix = schema::group_offsets_prefix(group_id);
        loop {
            let kvs = self
                .meta
                .range(&prefix, &prefix_end(&prefix), Txn::OPS_MAX)
                .await?;
            if kvs.is_empty() {
                break;
            }
            let ops = kvs.into_iter().map(|kv| Op::Delete(kv.key)).collect();
            self.write_under_claim(group_id, claim, ops).await?;
        }
        let _w = self.writes.lock().await;
        self.write_under_claim(
            group_id,
            claim,
            vec![
                Op::Delete(schema::group_key(group_id)),
                Op::Delete(schema::group_owner_key(group_id)),
            ],
        )
        .await?;
        self.lock().groups.remove(group_id);
        Ok(())
    }

    /// Applies `ops` only while this broker's claim `claim` on the group
    /// stands (see [`Slot::claim`]); otherwise the group is dropped here
    /// and the caller answers NOT_COORDINATOR.
    async fn write_under_claim(&self, group_id: &str, claim: u64, ops: Vec<Op>) -> CoordResult<()> {
        let owner = Compare::ModRevision(schema::group_owner_key(group_id), claim);
        let done = self.meta.txn(Txn::when(vec![owner]).and_then(ops)).await?;
        if !done.succeeded {
            tracing::warn!(group = %group_id, "another broker coordinates this group now; write refused");
            self.drop_group(group_id);
            return Err(CoordError::NotCoordinator);
        }
        Ok(())
    }

    /// Deletes some committed offsets of a group (OffsetDelete).
    /// `GROUP_SUBSCRIBED_TO_TOPIC` is the caller's check, made with
    /// [`Coordinator::subscribed_topics`].
    pub async fn delete_offsets(
        &self,
        group_id: &str,
        keys: Vec<(String, i32)>,
    ) -> CoordResult<()> {
        let claim = self.with_slot(group_id, |slot| Ok(slot.claim)).await?;
        let ops: Vec<Op> = keys
            .iter()
            .map(|(t, p)| Op::Delete(schema::offset_key(group_id, t, *p)))
            .collect();
        for chunk in ops.chunks(Txn::OPS_MAX) {
            self.write_under_claim(group_id, claim, chunk.to_vec())
                .await?;
        }
        Ok(())
    }

    /// The group's members' subscriptions, loading the group if this
    /// broker is to coordinate it.
    pub async fn member_subscriptions(&self, group_id: &str) -> CoordResult<Subscriptions> {
        self.with_slot(group_id, |slot| {
            Ok(match &slot.group {
                Protocol::Classic(g) => Subscriptions {
                    active: g.state() != GroupState::Empty && g.protocol_type() == "consumer",
                    classic: g
                        .members()
                        .filter_map(|m| m.protocols.first().map(|(_, b)| b.clone()))
                        .collect(),
                    topics: Vec::new(),
                },
                Protocol::Consumer(cg) => Subscriptions {
                    active: !cg.is_empty(),
                    classic: Vec::new(),
                    topics: cg.subscribed_topics().into_iter().collect(),
                },
            })
        })
        .await
    }

    /// One ConsumerGroupHeartbeat (KIP-848). `topics` is every topic of
    /// the cluster as this broker knows them. It is answered only once the
    /// store holds every change of the group — this request's, and an
    /// earlier one's whose write failed or is still in flight — so a
    /// coordinator that takes over knows every assignment a member was
    /// told of. (Answering from changes not yet written let a partition be
    /// held twice after a failover: the simulation's seed 164 with the
    /// store failing writes.)
    pub async fn consumer_heartbeat(
        &self,
        group_id: &str,
        hb: Heartbeat,
        topics: Arc<dyn Topics + Send + Sync>,
    ) -> Result<HeartbeatAnswer, (CoordError, Option<String>)> {
        self.acquire(group_id).await.map_err(|e| (e, None))?;
        let (answer, changed) = {
            let mut inner = self.lock();
            let slot = inner
                .groups
                .get_mut(group_id)
                .ok_or((CoordError::NotCoordinator, None))?;
            slot.touched = Instant::now();
            let cg = slot.group.consumer().map_err(|e| {
                let why = format!("Group {group_id} is not a consumer group.");
                (CoordError::Group(e), Some(why))
            })?;
            cg.heartbeat(hb, &*topics, Instant::now(), &self.consumer)
        };
        if changed {
            self.persist(group_id).await.map_err(|e| (e, None))?;
        }
        answer.map_err(|r| (CoordError::Group(r.error), Some(r.message)))
    }

    /// OffsetFetch v9's member check: for a consumer-protocol group this
    /// broker coordinates, a named member must be a member at that epoch
    /// (UNKNOWN_MEMBER_ID, STALE_MEMBER_EPOCH), as Kafka checks. Offsets
    /// are read from the metadata store by any broker, so a broker that
    /// does not have the group loaded checks nothing (and claims nothing:
    /// an offset read never moves a group); classic groups check nothing.
    pub fn check_offset_fetch(
        &self,
        group_id: &str,
        member_id: &str,
        epoch: i32,
    ) -> CoordResult<()> {
        match self.lock().groups.get(group_id).map(|s| &s.group) {
            Some(Protocol::Consumer(cg)) => {
                cg.check_fetch(member_id, epoch).map_err(CoordError::Group)
            }
            _ => Ok(()),
        }
    }

    /// A consumer-protocol group's live state (ConsumerGroupDescribe);
    /// `None` when the group does not exist or is a classic group.
    pub async fn describe_consumer(&self, group_id: &str) -> CoordResult<Option<ConsumerGroup>> {
        self.with_slot(group_id, |slot| {
            Ok(match &slot.group {
                Protocol::Consumer(cg) if cg.state() != CgState::Dead => Some(cg.clone()),
                _ => None,
            })
        })
        .await
    }

    /// The consumer-protocol settings this coordinator runs with.
    pub fn consumer_config(&self) -> consumer_group::Config {
        self.consumer
    }

    /// A group as this broker sees it: live state if it coordinates it,
    /// else the persisted record (and who holds it).
    pub async fn describe(&self, group_id: &str) -> CoordResult<GroupSummary> {
        if let Some(s) = self.summary_if_owned(group_id) {
            return Ok(s);
        }
        let owner = self.owner_of(group_id).await?;
        if owner.is_some_and(|o| o != self.node_id) {
            return Err(CoordError::NotCoordinator);
        }
        // Nobody coordinates it: take it, so the answer is live state.
        match self.acquire(group_id).await {
            Ok(()) => self
                .summary_if_owned(group_id)
                .ok_or(CoordError::NotCoordinator),
            Err(e) => Err(e),
        }
    }

    fn summary_if_owned(&self, group_id: &str) -> Option<GroupSummary> {
        let inner = self.lock();
        let slot = inner.groups.get(group_id)?;
        Some(summary(group_id, &slot.group, Some(self.node_id)))
    }

    async fn owner_of(&self, group_id: &str) -> CoordResult<Option<i32>> {
        Ok(self
            .meta
            .get(&schema::group_owner_key(group_id))
            .await?
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok()))
    }

    /// Which broker coordinates the group now, if any (FindCoordinator).
    /// The store is asked for at most [`OWNER_LOOKUP_MAX`]: a stalled
    /// store answers `Unavailable` quickly, so FindCoordinator can fall
    /// back to another answer instead of holding the client.
    pub async fn current_owner(&self, group_id: &str) -> CoordResult<Option<i32>> {
        if self.lock().groups.contains_key(group_id) {
            return Ok(Some(self.node_id));
        }
        match tokio::time::timeout(OWNER_LOOKUP_MAX, self.owner_of(group_id)).await {
            Ok(r) => r,
            Err(_) => Err(CoordError::Unavailable(format!(
                "the metadata store did not answer who owns group {group_id} within {OWNER_LOOKUP_MAX:?}"
            ))),
        }
    }

    async fn range_prefix(&self, prefix: &str) -> CoordResult<Vec<floe_meta::KeyValue>> {
        Ok(self
            .meta
            .range(prefix, &prefix_end(prefix), RANGE_KEYS_MAX)
            .await?)
    }

    /// Every group in the cluster with its owner: live state for the
    /// groups this broker coordinates, the persisted record otherwise.
    pub async fn list(&self) -> CoordResult<Vec<GroupSummary>> {
        let owners = self.range_prefix(schema::GROUP_OWNERS_PREFIX).await?;
        let owners: HashMap<String, i32> = owners
            .into_iter()
            .filter_map(|kv| {
                let g = kv.key.strip_prefix(schema::GROUP_OWNERS_PREFIX)?;
                let id = std::str::from_utf8(&kv.value).ok()?.parse().ok()?;
                Some((schema::unescape_group(g), id))
            })
            .collect();
        let records = self.range_prefix(schema::GROUPS_PREFIX).await?;
        let mut out = Vec::with_capacity(records.len());
        for kv in records {
            let Some(g) = kv.key.strip_prefix(schema::GROUPS_PREFIX) else {
                continue;
            };
            let group_id = schema::unescape_group(g);
            if let Some(s) = self.summary_if_owned(&group_id) {
                out.push(s);
                continue;
            }
            let Ok(rec) = serde_json::from_slice::<GroupRecord>(&kv.value) else {
                continue;
            };
            // As a coordinator would load it (deadlines do not matter here).
            let group = Protocol::load(&group_id, rec, Instant::now(), &self.consumer);
            out.push(summary(&group_id, &group, owners.get(&group_id).copied()));
        }
        Ok(out)
    }
}

fn summary(group_id: &str, group: &Protocol, owner: Option<i32>) -> GroupSummary {
    match group {
        Protocol::Classic(g) => GroupSummary {
            group_id: group_id.to_string(),
            state: g.state().as_str(),
            kind: "classic",
            protocol_type: g.protocol_type().to_string(),
            protocol: g.protocol().to_string(),
            members: g.members().cloned().collect(),
            owner,
        },
        Protocol::Consumer(cg) => GroupSummary {
            group_id: group_id.to_string(),
            state: cg.state().as_str(),
            kind: "consumer",
            protocol_type: "consumer".into(),
            protocol: String::new(),
            members: Vec::new(),
            owner,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_meta::Embedded;

    fn offset(o: i64) -> OffsetRecord {
        OffsetRecord {
            offset: o,
            leader_epoch: -1,
            metadata: None,
            commit_ms: 0,
        }
    }

    async fn commit(c: &Coordinator, group: &str, o: i64) -> CoordResult<()> {
        // A simple consumer's commit: no member, no generation.
        c.commit_offsets(group, "", -1, None, vec![("t".into(), 0, offset(o))])
            .await
    }

    #[tokio::test]
    async fn an_idle_empty_group_is_unloaded_and_comes_back_whole() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().expect("store"));
        let c = Coordinator::new(1, meta.clone(), Duration::from_secs(10));
        commit(&c, "g", 5).await.expect("commit");
        assert_eq!(c.groups_loaded(), 1);
        let owner = schema::group_owner_key("g");
        assert!(meta.get(&owner).await.expect("get").is_some(), "claimed");

        // Touched just now: not idle yet.
        assert_eq!(c.unload_idle(Instant::now(), GROUP_IDLE_UNLOAD).await, 0);
        assert_eq!(c.groups_loaded(), 1);
        let later = Instant::now() + GROUP_IDLE_UNLOAD;
        assert_eq!(c.unload_idle(later, GROUP_IDLE_UNLOAD).await, 1);
        assert_eq!(c.groups_loaded(), 0);
        assert!(
            meta.get(&owner).await.expect("get").is_none(),
            "claim released"
        );
        assert!(
            meta.get(&schema::group_key("g"))
                .await
                .expect("get")
                .is_some(),
            "record kept"
        );
        let kept = c.fetch_offsets("g", None).await.expect("fetch");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].2.offset, 5, "offsets kept");

        // Another broker may now claim it; here this one does, and the
        // group continues.
        commit(&c, "g", 9).await.expect("commit after unloading");
        assert_eq!(c.groups_loaded(), 1);
        assert_eq!(
            c.fetch_offsets("g", None).await.expect("fetch")[0].2.offset,
            9
        );
        let listed = c.list().await.expect("list");
        assert!(listed.iter().any(|g| g.group_id == "g"), "still listed");
    }

    fn classic_join(member: &str) -> JoinRequest {
        JoinRequest {
            member_id: member.into(),
            group_instance_id: None,
            client_id: "c".into(),
            client_host: "h".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 10_000,
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::new())],
            require_known_member_id: false,
        }
    }

    /// A consumer-protocol group lives in the metadata store: the next
    /// coordinator carries on with the members' epochs and partitions, and
    /// the group refuses the classic protocol until it is empty.
    #[tokio::test]
    async fn a_consumer_group_moves_between_coordinators_and_protocols() {
        use crate::consumer_group::{Assignment, TopicInfo, TopicView};
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().expect("store"));
        let topics: Arc<TopicView> = Arc::new(
            [(
                "t".to_string(),
                TopicInfo {
                    id: uuid::Uuid::from_bytes([7; 16]),
                    partitions: 4,
                },
            )]
            .into_iter()
            .collect::<TopicView>(),
        );
        let hb = |id: &str, epoch: i32, owned: &Assignment| Heartbeat {
            member_id: id.into(),
            member_epoch: epoch,
            rebalance_timeout_ms: 10_000,
            subscribed_names: (epoch == 0).then(|| vec!["t".to_string()]),
            owned: Some(owned.clone()),
            ..Default::default()
        };
        let c1 = Coordinator::new(1, meta.clone(), Duration::from_secs(10));
        let mut state: std::collections::BTreeMap<&str, (i32, Assignment)> = Default::default();
        state.insert("a", (0, Assignment::new()));
        state.insert("b", (0, Assignment::new()));
        for _ in 0..4 {
            for (id, (epoch, owned)) in state.iter_mut() {
                let a = c1
                    .consumer_heartbeat("cg", hb(id, *epoch, owned), topics.clone())
                    .await
                    .expect("heartbeat");
                *epoch = a.member_epoch;
                if let Some(a) = a.assignment {
                    *owned = a;
                }
            }
        }
        let sizes: Vec<usize> = state
            .values()
            .map(|(_, a)| a.values().map(|p| p.len()).sum())
            .collect();
        assert_eq!(sizes, vec![2, 2]);
        let err = c1
            .join("cg", classic_join(""))
            .await
            .expect_err("classic join");
        assert!(matches!(
            err.0,
            CoordError::Group(GroupError::InconsistentGroupProtocol)
        ));
        let listed = c1.list().await.expect("list");
        assert_eq!((listed[0].kind, listed[0].state), ("consumer", "Stable"));

        // Broker 1 goes; broker 2 loads the group and nothing moves.
        c1.resign().await;
        let c2 = Coordinator::new(2, meta.clone(), Duration::from_secs(10));
        for (id, (epoch, owned)) in &state {
            let a = c2
                .consumer_heartbeat("cg", hb(id, *epoch, owned), topics.clone())
                .await
                .expect("heartbeat after failover");
            assert_eq!(a.member_epoch, *epoch);
            assert!(a.assignment.is_none(), "nothing moved: {a:?}");
        }
        let described = c2
            .describe_consumer("cg")
            .await
            .expect("describe")
            .expect("a consumer group");
        assert_eq!(described.members.len(), 2);

        // Empty, it becomes a classic group on the next JoinGroup, and a
        // classic group with members refuses consumer-protocol members.
        for (id, (_, owned)) in &state {
            c2.consumer_heartbeat(
                "cg",
                hb(id, crate::consumer_group::LEAVE_EPOCH, owned),
                topics.clone(),
            )
            .await
            .expect("leave");
        }
        let joined = c2.join("cg", classic_join("")).await;
        assert!(
            matches!(
                joined,
                Err((CoordError::Group(GroupError::MemberIdRequired), _)) | Ok(_)
            ),
            "{joined:?}"
        );
        let member = match joined {
            Err((_, id)) => id,
            Ok(j) => j.member_id,
        };
        let c2b = c2.clone();
        let rejoin = tokio::spawn(async move { c2b.join("cg", classic_join(&member)).await });
        let joined = rejoin.await.expect("task").expect("classic member joined");
        assert_eq!(joined.generation, 1);
        let refused = c2
            .consumer_heartbeat("cg", hb("z", 0, &Assignment::new()), topics.clone())
            .await
            .expect_err("non-empty classic group");
        assert!(matches!(
            refused.0,
            CoordError::Group(GroupError::GroupIdNotFound)
        ));
    }

    /// A store that holds back the next transaction writing an offset
    /// until told to let it through: a request delayed in the network.
    struct Gate {
        inner: Arc<dyn MetaStore>,
        /// Which writes it holds back: puts of keys under this prefix.
        prefix: &'static str,
        armed: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
        held: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl MetaStore for Gate {
        async fn get(&self, key: &str) -> floe_meta::Result<Option<floe_meta::KeyValue>> {
            self.inner.get(key).await
        }
        async fn range(
            &self,
            start: &str,
            end: &str,
            limit: usize,
        ) -> floe_meta::Result<Vec<floe_meta::KeyValue>> {
            self.inner.range(start, end, limit).await
        }
        async fn txn(&self, txn: Txn) -> floe_meta::Result<floe_meta::TxnOutcome> {
            let writes_offset = txn
                .success
                .iter()
                .any(|op| matches!(op, Op::Put(k, _) if k.starts_with(self.prefix)));
            let wait = if writes_offset {
                self.armed.lock().expect("lock").take()
            } else {
                None
            };
            if let Some(rx) = wait {
                self.held.notify_one();
                let _ = rx.await;
            }
            self.inner.txn(txn).await
        }
        async fn revision(&self) -> floe_meta::Result<u64> {
            self.inner.revision().await
        }
        async fn watch(&self, prefix: &str, from: u64) -> floe_meta::Result<floe_meta::Watch> {
            self.inner.watch(prefix, from).await
        }
        async fn grant_lease(&self, ttl: Duration) -> floe_meta::Result<LeaseId> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> floe_meta::Result<()> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: LeaseId) -> floe_meta::Result<()> {
            self.inner.revoke_lease(lease).await
        }
        fn describe(&self) -> String {
            "gate".into()
        }
    }

    #[tokio::test]
    async fn an_offset_write_from_an_earlier_claim_never_lands() {
        let base: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().expect("store"));
        let gate = Arc::new(Gate {
            inner: base,
            prefix: schema::OFFSETS_PREFIX,
            armed: Mutex::new(None),
            held: tokio::sync::Notify::new(),
        });
        let c = Coordinator::new(1, gate.clone(), Duration::from_secs(10));
        commit(&c, "g", 5).await.expect("commit");
        // A commit of 3, validated under this claim, is held up on its way.
        let (release, rx) = tokio::sync::oneshot::channel();
        *gate.armed.lock().expect("lock") = Some(rx);
        let stale = {
            let c = c.clone();
            tokio::spawn(async move { commit(&c, "g", 3).await })
        };
        gate.held.notified().await;
        // Meanwhile the claim is given up, and the same broker claims the
        // group again and commits 7.
        let later = Instant::now() + GROUP_IDLE_UNLOAD;
        assert_eq!(c.unload_idle(later, GROUP_IDLE_UNLOAD).await, 1);
        commit(&c, "g", 7)
            .await
            .expect("commit under the new claim");
        // The held-up write arrives: its claim is gone, so it is refused.
        let _ = release.send(());
        let r = stale.await.expect("task");
        assert!(r.is_err(), "an offset write of an earlier claim landed");
        assert_eq!(
            c.fetch_offsets("g", None).await.expect("fetch")[0].2.offset,
            7
        );
    }

    /// A consumer group's record written by a broker whose claim is gone
    /// (its lease expired while the write was on its way) never lands,
    /// even when the next coordinator has loaded the group and not written
    /// it yet: that coordinator answers from what it loaded.
    #[tokio::test]
    async fn a_group_record_write_from_an_earlier_claim_never_lands() {
        use crate::consumer_group::{Assignment, TopicInfo, TopicView};
        let base: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().expect("store"));
        let gate = Arc::new(Gate {
            inner: base.clone(),
            prefix: schema::GROUPS_PREFIX,
            armed: Mutex::new(None),
            held: tokio::sync::Notify::new(),
        });
        let topics: Arc<TopicView> = Arc::new(
            [(
                "t".to_string(),
                TopicInfo {
                    id: uuid::Uuid::from_bytes([3; 16]),
                    partitions: 2,
                },
            )]
            .into_iter()
            .collect::<TopicView>(),
        );
        let join = |id: &str| Heartbeat {
            member_id: id.into(),
            member_epoch: 0,
            rebalance_timeout_ms: 10_000,
            subscribed_names: Some(vec!["t".into()]),
            owned: Some(Assignment::new()),
            ..Default::default()
        };
        let c1 = Coordinator::new(1, gate.clone(), Duration::from_secs(10));
        c1.consumer_heartbeat("cg", join("a"), topics.clone())
            .await
            .expect("a joins");
        let (release, rx) = tokio::sync::oneshot::channel();
        *gate.armed.lock().expect("lock") = Some(rx);
        let stale = {
            let (c1, topics) = (c1.clone(), topics.clone());
            tokio::spawn(async move { c1.consumer_heartbeat("cg", join("b"), topics).await })
        };
        gate.held.notified().await;
        // Broker 1's lease ends (its claim goes); broker 2 loads the group.
        base.txn(Txn::when(vec![]).and_then(vec![Op::Delete(schema::group_owner_key("cg"))]))
            .await
            .expect("claim gone");
        let c2 = Coordinator::new(2, base.clone(), Duration::from_secs(10));
        let loaded = c2
            .describe_consumer("cg")
            .await
            .expect("describe")
            .expect("consumer group");
        assert_eq!(loaded.members.len(), 1);
        let _ = release.send(());
        assert!(
            stale.await.expect("task").is_err(),
            "a write of an earlier claim was answered"
        );
        let kv = base
            .get(&schema::group_key("cg"))
            .await
            .expect("get")
            .expect("record");
        let rec: GroupRecord = serde_json::from_slice(&kv.value).expect("record");
        assert_eq!(
            rec.consumer.expect("consumer group").members.len(),
            1,
            "the stale write landed"
        );
    }

    #[tokio::test]
    async fn a_group_claimed_elsewhere_meanwhile_keeps_its_claim() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().expect("store"));
        let a = Coordinator::new(1, meta.clone(), Duration::from_secs(10));
        let b = Coordinator::new(2, meta.clone(), Duration::from_secs(10));
        commit(&a, "g", 1).await.expect("commit");
        assert_eq!(
            commit(&b, "g", 2).await.err().map(|e| e.to_string()),
            Some(CoordError::NotCoordinator.to_string()),
            "a holds the group"
        );
        let later = Instant::now() + GROUP_IDLE_UNLOAD;
        assert_eq!(a.unload_idle(later, GROUP_IDLE_UNLOAD).await, 1);
        commit(&b, "g", 3).await.expect("b claims it once a let go");
        // a's idle sweep must never delete b's claim.
        assert_eq!(a.unload_idle(later, GROUP_IDLE_UNLOAD).await, 0);
        let owner = meta.get(&schema::group_owner_key("g")).await.expect("get");
        assert_eq!(owner.map(|kv| kv.value), Some(Bytes::from("2")));
        // a answers NOT_COORDINATOR now; b's offset stands.
        assert!(commit(&a, "g", 4).await.is_err());
        assert_eq!(
            a.fetch_offsets("g", None).await.expect("fetch")[0].2.offset,
            3
        );
    }
}

//! The classic consumer-group state machine (Kafka's "generic" group
//! protocol: JoinGroup / SyncGroup / Heartbeat / LeaveGroup), as a plain
//! struct with an injected clock and no I/O.
//!
//! The runtime ([`crate::coordinator`]) feeds it requests and the current
//! time, delivers the answers it returns — some of them later, to requests
//! that wait for a rebalance to finish — and persists the group after each
//! completed generation.
//!
//! States follow Kafka: `Empty` → (join) `PreparingRebalance` → (every
//! known member rejoined, or the rebalance timeout passed)
//! `CompletingRebalance` → (the leader's SyncGroup) `Stable`. A member that
//! stops heartbeating for its session timeout is removed and the others
//! rebalance. Assignors run in the client; the group passes their bytes
//! through untouched.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Kafka's `group.min.session.timeout.ms` and `group.max.session.timeout.ms`.
pub const SESSION_TIMEOUT_MS_MIN: i32 = 6_000;
pub const SESSION_TIMEOUT_MS_MAX: i32 = 1_800_000;
/// Kafka's `group.max.size` default is unbounded; floe bounds it so the
/// persisted group record (~600 bytes a member) stays well below etcd's
/// 1.5 MiB request limit.
pub const GROUP_MEMBERS_MAX: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    /// The name Kafka's DescribeGroups and ListGroups use.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

/// Why a group request is refused; `net` maps each to its Kafka code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("unknown member id")]
    UnknownMemberId,
    #[error("the member id is required; rejoin with the one assigned")]
    MemberIdRequired,
    #[error("illegal generation")]
    IllegalGeneration,
    #[error("a rebalance is in progress")]
    RebalanceInProgress,
    #[error("the member's protocols do not match the group's")]
    InconsistentGroupProtocol,
    #[error("session timeout outside [{SESSION_TIMEOUT_MS_MIN}, {SESSION_TIMEOUT_MS_MAX}] ms")]
    InvalidSessionTimeout,
    #[error("another member joined with the same group.instance.id")]
    FencedInstanceId,
    #[error("the group has reached its maximum size")]
    GroupMaxSizeReached,
    #[error("the group is not empty")]
    NonEmptyGroup,
    #[error("the group is being deleted")]
    CoordinatorNotAvailable,
    // The consumer protocol's (KIP-848) refusals.
    #[error("the member epoch is not the member's current one")]
    FencedMemberEpoch,
    #[error("the member epoch is an older one")]
    StaleMemberEpoch,
    #[error("the static member's instance id is held by a live member")]
    UnreleasedInstanceId,
    #[error("the server assignor is not supported")]
    UnsupportedAssignor,
    #[error("the subscription regex is invalid")]
    InvalidRegularExpression,
    #[error("the request is invalid")]
    InvalidRequest,
    /// The group exists under the other protocol and cannot change now.
    #[error("the group uses the other group protocol")]
    GroupIdNotFound,
}

/// What a member asks for when it joins.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    /// (assignor name, subscription bytes), in the client's preference order.
    pub protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a member without an id is given one and must rejoin.
    pub require_known_member_id: bool,
}

/// A completed JoinGroup answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Joined {
    pub member_id: String,
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    /// Only the leader gets the members with their subscriptions.
    pub members: Vec<(String, Option<String>, Bytes)>,
}

/// A completed SyncGroup answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Synced {
    pub protocol_type: String,
    pub protocol: String,
    pub assignment: Bytes,
}

/// The outcome of a JoinGroup: answered now, or when the rebalance ends.
#[derive(Debug, Clone, PartialEq)]
pub enum JoinOutcome {
    Now(Result<Joined, (GroupError, String)>),
    /// The member (by this id) waits; its answer comes out of a later
    /// [`Effects::joined`].
    Wait(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum SyncOutcome {
    Now(Result<Synced, GroupError>),
    Wait,
}

/// Answers to deliver to waiting requests, and whether the group must be
/// persisted. Returned by every call that can move the state.
#[derive(Debug, Default, PartialEq)]
pub struct Effects {
    pub joined: Vec<(String, Result<Joined, GroupError>)>,
    pub synced: Vec<(String, Result<Synced, GroupError>)>,
    pub persist: bool,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.joined.extend(other.joined);
        self.synced.extend(other.synced);
        self.persist |= other.persist;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    #[serde(with = "b64::protocols")]
    pub protocols: Vec<(String, Bytes)>,
    #[serde(with = "b64::bytes")]
    pub assignment: Bytes,
    #[serde(skip)]
    awaiting_join: bool,
    #[serde(skip)]
    awaiting_sync: bool,
    #[serde(skip, default = "Instant::now")]
    deadline: Instant,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

/// What is persisted after each generation (and read back by the broker
/// that coordinates the group next).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupRecord {
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    pub members: Vec<Member>,
    /// Set when the group uses the consumer protocol (KIP-848): its whole
    /// state, the classic fields then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<crate::consumer_group::ConsumerGroup>,
}

#[derive(Debug)]
pub struct Group {
    pub id: String,
    state: GroupState,
    generation: i32,
    protocol_type: String,
    protocol: String,
    leader: String,
    members: BTreeMap<String, Member>,
    /// Member ids handed out by MEMBER_ID_REQUIRED, until they rejoin.
    pending: BTreeMap<String, Instant>,
    rebalance_deadline: Option<Instant>,
}

fn sorted_protocol_names(m: &Member) -> Vec<&str> {
    m.protocols.iter().map(|(n, _)| n.as_str()).collect()
}

impl Group {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol: String::new(),
            leader: String::new(),
            members: BTreeMap::new(),
            pending: BTreeMap::new(),
            rebalance_deadline: None,
        }
    }

    /// A group as its last coordinator persisted it: members keep their
    /// ids and assignments and have a full session to heartbeat here.
    pub fn from_record(id: impl Into<String>, rec: GroupRecord, now: Instant) -> Self {
        let mut g = Self::new(id);
        g.generation = rec.generation;
        g.protocol_type = rec.protocol_type;
        g.protocol = rec.protocol;
        g.leader = rec.leader;
        for mut m in rec.members {
            m.deadline = now + session(&m);
            g.members.insert(m.id.clone(), m);
        }
        g.state = if g.members.is_empty() {
            GroupState::Empty
        } else {
            GroupState::Stable
        };
        g
    }

    pub fn record(&self) -> GroupRecord {
        GroupRecord {
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol: self.protocol.clone(),
            leader: self.leader.clone(),
            members: self.members.values().cloned().collect(),
            consumer: None,
        }
    }

    pub fn state(&self) -> GroupState {
        self.state
    }
    pub fn generation(&self) -> i32 {
        self.generation
    }
    pub fn protocol_type(&self) -> &str {
        &self.protocol_type
    }
    pub fn protocol(&self) -> &str {
        &self.protocol
    }
    pub fn leader(&self) -> &str {
        &self.leader
    }
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.pending.is_empty()
    }

    /// Marks the group deleted; every later request for it is refused.
    pub fn delete(&mut self) -> Result<(), GroupError> {
        if !self.members.is_empty() {
            return Err(GroupError::NonEmptyGroup);
        }
        self.state = GroupState::Dead;
        Ok(())
    }

    /// Kafka's shape: the client id, then a random uuid.
    fn new_member_id(client_id: &str) -> String {
        let base = if client_id.is_empty() {
            "member"
        } else {
            client_id
        };
        format!("{base}-{}", uuid::Uuid::new_v4())
    }

    /// The earliest time [`Group::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let members = self.members.values().map(|m| m.deadline);
        let pending = self.pending.values().copied();
        members.chain(pending).chain(self.rebalance_deadline).min()
    }

    pub fn join(&mut self, req: JoinRequest, now: Instant) -> (JoinOutcome, Effects) {
        let refuse = |e: GroupError, id: &str| {
            (
                JoinOutcome::Now(Err((e, id.to_string()))),
                Effects::default(),
            )
        };
        if self.state == GroupState::Dead {
            return refuse(GroupError::CoordinatorNotAvailable, &req.member_id);
        }
        if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&req.session_timeout_ms) {
            return refuse(GroupError::InvalidSessionTimeout, &req.member_id);
        }
        if req.protocols.is_empty()
            || req.protocol_type.is_empty()
            || !self.protocols_compatible(&req)
        {
            return refuse(GroupError::InconsistentGroupProtocol, &req.member_id);
        }
        // Static membership: the instance id names the member across
        // restarts; a new member id for it fences the old one.
        if let Some(instance) = req.group_instance_id.clone() {
            let existing = self
                .members
                .values()
                .find(|m| m.instance_id.as_deref() == Some(&instance))
                .map(|m| m.id.clone());
            match existing {
                Some(old) if req.member_id.is_empty() => {
                    return self.replace_static(old, req, now);
                }
                Some(old) if old != req.member_id => {
                    return refuse(GroupError::FencedInstanceId, &req.member_id);
                }
                Some(_) => {}
                None if req.member_id.is_empty() => {
                    let id = Self::new_member_id(&req.client_id);
                    return self.add_member(id, req, now);
                }
                None => return refuse(GroupError::UnknownMemberId, &req.member_id),
            }
        } else if req.member_id.is_empty() {
            let id = Self::new_member_id(&req.client_id);
            if req.require_known_member_id {
                self.pending.insert(id.clone(), now + session_of(&req));
                return refuse(GroupError::MemberIdRequired, &id);
            }
            return self.add_member(id, req, now);
        }
        if self.pending.remove(&req.member_id).is_some() {
            let id = req.member_id.clone();
            return self.add_member(id, req, now);
        }
        let Some(m) = self.members.get_mut(&req.member_id) else {
            return refuse(GroupError::UnknownMemberId, &req.member_id);
        };
        // A known member joins again.
        let changed = m.protocols != req.protocols;
        m.protocols = req.protocols;
        m.session_timeout_ms = req.session_timeout_ms;
        m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        m.client_id = req.client_id;
        m.client_host = req.client_host;
        m.deadline = now + session(m);
        let id = req.member_id;
        match self.state {
            GroupState::Stable if !changed && id != self.leader => {
                // Nothing changed for a follower: answer with the current
                // generation, as Kafka does, without disturbing the others.
                let joined = self.joined_for(&id);
                (JoinOutcome::Now(Ok(joined)), Effects::default())
            }
            GroupState::CompletingRebalance if !changed => {
                let joined = self.joined_for(&id);
                (JoinOutcome::Now(Ok(joined)), Effects::default())
            }
            _ => {
                if let Some(m) = self.members.get_mut(&id) {
                    m.awaiting_join = true;
                }
                let mut fx = self.prepare_rebalance(now);
                fx.merge(self.maybe_complete_join(now));
                (self.wait_or_answer(id, &mut fx), fx)
            }
        }
    }

    /// If the member's own answer came out of this call, return it now.
    fn wait_or_answer(&self, id: String, fx: &mut Effects) -> JoinOutcome {
        if let Some(pos) = fx.joined.iter().position(|(m, _)| *m == id) {
            let (_, r) = fx.joined.remove(pos);
            return JoinOutcome::Now(r.map_err(|e| (e, id)));
        }
        JoinOutcome::Wait(id)
    }

    fn add_member(&mut self, id: String, req: JoinRequest, now: Instant) -> (JoinOutcome, Effects) {
        if self.members.len() >= GROUP_MEMBERS_MAX {
            return (
                JoinOutcome::Now(Err((GroupError::GroupMaxSizeReached, id))),
                Effects::default(),
            );
        }
        let m = Member {
            id: id.clone(),
            instance_id: req.group_instance_id,
            client_id: req.client_id,
            client_host: req.client_host,
            session_timeout_ms: req.session_timeout_ms,
            rebalance_timeout_ms: req.rebalance_timeout_ms,
            protocols: req.protocols,
            assignment: Bytes::new(),
            awaiting_join: true,
            awaiting_sync: false,
            deadline: now + session_of_ms(req.session_timeout_ms),
        };
        if self.members.is_empty() {
            self.protocol_type = req.protocol_type;
        }
        self.members.insert(id.clone(), m);
        let mut fx = self.prepare_rebalance(now);
        fx.merge(self.maybe_complete_join(now));
        (self.wait_or_answer(id, &mut fx), fx)
    }

    fn replace_static(
        &mut self,
        old: String,
        req: JoinRequest,
        now: Instant,
    ) -> (JoinOutcome, Effects) {
        let Some(mut m) = self.members.remove(&old) else {
            return (
                JoinOutcome::Now(Err((GroupError::UnknownMemberId, req.member_id))),
                Effects::default(),
            );
        };
        let id = Self::new_member_id(&req.client_id);
        let mut fx = Effects::default();
        // A request of the old incarnation that still waits is fenced.
        if m.awaiting_join {
            fx.joined
                .push((old.clone(), Err(GroupError::FencedInstanceId)));
        }
        if m.awaiting_sync {
            fx.synced
                .push((old.clone(), Err(GroupError::FencedInstanceId)));
        }
        let changed = m.protocols != req.protocols;
        m.id = id.clone();
        m.protocols = req.protocols.clone();
        m.session_timeout_ms = req.session_timeout_ms;
        m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        m.client_id = req.client_id.clone();
        m.client_host = req.client_host.clone();
        m.deadline = now + session(&m);
        m.awaiting_join = false;
        m.awaiting_sync = false;
        let was_leader = self.leader == old;
        if was_leader {
            self.leader = id.clone();
        }
        self.members.insert(id.clone(), m);
        fx.persist = true;
        if self.state == GroupState::Stable && !changed && !was_leader {
            // The restarted static member takes its old place and
            // assignment; nobody else rebalances (KIP-345).
            let joined = self.joined_for(&id);
            return (JoinOutcome::Now(Ok(joined)), fx);
        }
        if let Some(m) = self.members.get_mut(&id) {
            m.awaiting_join = true;
        }
        fx.merge(self.prepare_rebalance(now));
        fx.merge(self.maybe_complete_join(now));
        (self.wait_or_answer(id, &mut fx), fx)
    }

    fn protocols_compatible(&self, req: &JoinRequest) -> bool {
        let others: Vec<&Member> = self
            .members
            .values()
            .filter(|m| m.id != req.member_id)
            .collect();
        if others.is_empty() {
            return true;
        }
        if req.protocol_type != self.protocol_type {
            return false;
        }
        req.protocols.iter().any(|(name, _)| {
            others
                .iter()
                .all(|m| m.protocols.iter().any(|(n, _)| n == name))
        })
    }

    fn joined_for(&self, id: &str) -> Joined {
        let members = if id == self.leader {
            self.members
                .values()
                .map(|m| {
                    (
                        m.id.clone(),
                        m.instance_id.clone(),
                        m.metadata_for(&self.protocol),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        Joined {
            member_id: id.to_string(),
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol: self.protocol.clone(),
            leader: self.leader.clone(),
            members,
        }
    }

    /// Moves to PreparingRebalance: SyncGroups still waiting are told to
    /// rejoin.
    fn prepare_rebalance(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        if self.state == GroupState::PreparingRebalance {
            return fx;
        }
        for m in self.members.values_mut() {
            if m.awaiting_sync {
                m.awaiting_sync = false;
                fx.synced
                    .push((m.id.clone(), Err(GroupError::RebalanceInProgress)));
            }
        }
        let timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout_ms.max(0))
            .max()
            .unwrap_or(0);
        self.rebalance_deadline = Some(now + Duration::from_millis(timeout as u64));
        self.state = GroupState::PreparingRebalance;
        fx
    }

    /// Ends the join phase when every member has rejoined (or, with
    /// `force`, because the rebalance timeout passed: those that did not
    /// rejoin are dropped).
    fn maybe_complete_join(&mut self, now: Instant) -> Effects {
        self.complete_join(now, false)
    }

    fn complete_join(&mut self, _now: Instant, force: bool) -> Effects {
        let mut fx = Effects::default();
        if self.state != GroupState::PreparingRebalance {
            return fx;
        }
        let all_in = self.members.values().all(|m| m.awaiting_join) && self.pending.is_empty();
        if !all_in && !force {
            return fx;
        }
        self.members.retain(|_, m| m.awaiting_join);
        self.rebalance_deadline = None;
        self.generation += 1;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol.clear();
            self.leader.clear();
            fx.persist = true;
            return fx;
        }
        self.protocol = self.select_protocol();
        if !self.members.contains_key(&self.leader) {
            self.leader = self.members.keys().next().cloned().unwrap_or_default();
        }
        self.state = GroupState::CompletingRebalance;
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let joined = self.joined_for(&id);
            if let Some(m) = self.members.get_mut(&id) {
                m.awaiting_join = false;
                m.assignment = Bytes::new();
            }
            fx.joined.push((id, Ok(joined)));
        }
        fx
    }

    /// The protocol every member supports with the most first-choice
    /// votes (Kafka's rule), ties broken by the first member's preference.
    fn select_protocol(&self) -> String {
        let first = self.members.values().next();
        let candidates: Vec<&str> = first.map(sorted_protocol_names).unwrap_or_default();
        let supported: Vec<&str> = candidates
            .into_iter()
            .filter(|p| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == p))
            })
            .collect();
        let votes = |p: &str| {
            self.members
                .values()
                .filter(|m| {
                    m.protocols
                        .iter()
                        .find(|(n, _)| supported.contains(&n.as_str()))
                        .is_some_and(|(n, _)| n == p)
                })
                .count()
        };
        let mut best: Option<(&str, usize)> = None;
        for p in &supported {
            let v = votes(p);
            if best.is_none_or(|(_, bv)| v > bv) {
                best = Some((p, v));
            }
        }
        best.map(|(p, _)| p.to_string()).unwrap_or_default()
    }

    pub fn sync(
        &mut self,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
        assignments: Vec<(String, Bytes)>,
        now: Instant,
    ) -> (SyncOutcome, Effects) {
        let none = Effects::default();
        if let Err(e) = self.check_member(member_id, generation, instance_id) {
            return (SyncOutcome::Now(Err(e)), none);
        }
        match self.state {
            GroupState::PreparingRebalance => {
                (SyncOutcome::Now(Err(GroupError::RebalanceInProgress)), none)
            }
            GroupState::Stable => (SyncOutcome::Now(Ok(self.synced_for(member_id))), none),
            GroupState::CompletingRebalance => {
                if let Some(m) = self.members.get_mut(member_id) {
                    m.deadline = now + session(m);
                }
                if member_id != self.leader {
                    if let Some(m) = self.members.get_mut(member_id) {
                        m.awaiting_sync = true;
                    }
                    return (SyncOutcome::Wait, none);
                }
                for (id, a) in assignments {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.assignment = a;
                    }
                }
                self.state = GroupState::Stable;
                let mut fx = Effects {
                    persist: true,
                    ..Effects::default()
                };
                let waiting: Vec<String> = self
                    .members
                    .values()
                    .filter(|m| m.awaiting_sync)
                    .map(|m| m.id.clone())
                    .collect();
                for id in waiting {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.awaiting_sync = false;
                    }
                    fx.synced.push((id.clone(), Ok(self.synced_for(&id))));
                }
                (SyncOutcome::Now(Ok(self.synced_for(member_id))), fx)
            }
            GroupState::Empty | GroupState::Dead => {
                (SyncOutcome::Now(Err(GroupError::UnknownMemberId)), none)
            }
        }
    }

    fn synced_for(&self, id: &str) -> Synced {
        Synced {
            protocol_type: self.protocol_type.clone(),
            protocol: self.protocol.clone(),
            assignment: self
                .members
                .get(id)
                .map(|m| m.assignment.clone())
                .unwrap_or_default(),
        }
    }

    fn check_member(
        &self,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        if self.state == GroupState::Dead {
            return Err(GroupError::CoordinatorNotAvailable);
        }
        if let Some(instance) = instance_id {
            let holder = self
                .members
                .values()
                .find(|m| m.instance_id.as_deref() == Some(instance));
            if let Some(h) = holder {
                if h.id != member_id {
                    return Err(GroupError::FencedInstanceId);
                }
            }
        }
        if !self.members.contains_key(member_id) {
            return Err(GroupError::UnknownMemberId);
        }
        if generation != self.generation {
            return Err(GroupError::IllegalGeneration);
        }
        Ok(())
    }

    pub fn heartbeat(
        &mut self,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
        now: Instant,
    ) -> Result<(), GroupError> {
        self.check_member(member_id, generation, instance_id)?;
        if let Some(m) = self.members.get_mut(member_id) {
            m.deadline = now + session(m);
        }
        match self.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    /// OffsetCommit's check: a member of the current generation, or a
    /// "simple" commit (generation -1) to a group without members.
    pub fn check_commit(
        &self,
        member_id: &str,
        generation: i32,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        if generation < 0 && member_id.is_empty() {
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(GroupError::UnknownMemberId)
            };
        }
        self.check_member(member_id, generation, instance_id)?;
        if self.state == GroupState::CompletingRebalance {
            return Err(GroupError::RebalanceInProgress);
        }
        Ok(())
    }

    /// LeaveGroup for one member (by id, or by instance id for static
    /// members leaving with an unknown id).
    pub fn leave(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        now: Instant,
    ) -> (Result<String, GroupError>, Effects) {
        let id = match instance_id {
            Some(instance) => {
                let holder = self
                    .members
                    .values()
                    .find(|m| m.instance_id.as_deref() == Some(instance))
                    .map(|m| m.id.clone());
                match holder {
                    Some(h) if member_id.is_empty() || h == member_id => h,
                    Some(_) => return (Err(GroupError::FencedInstanceId), Effects::default()),
                    None => return (Err(GroupError::UnknownMemberId), Effects::default()),
                }
            }
            None => member_id.to_string(),
        };
        if self.pending.remove(&id).is_some() {
            return (Ok(id), Effects::default());
        }
        let Some(m) = self.members.remove(&id) else {
            return (Err(GroupError::UnknownMemberId), Effects::default());
        };
        let mut fx = Effects::default();
        if m.awaiting_join {
            fx.joined
                .push((id.clone(), Err(GroupError::UnknownMemberId)));
        }
        if m.awaiting_sync {
            fx.synced
                .push((id.clone(), Err(GroupError::UnknownMemberId)));
        }
        fx.merge(self.after_removal(now));
        (Ok(id), fx)
    }

    fn after_removal(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                fx.merge(self.prepare_rebalance(now));
                fx.merge(self.maybe_complete_join(now));
            }
            GroupState::PreparingRebalance => fx.merge(self.maybe_complete_join(now)),
            GroupState::Empty | GroupState::Dead => {}
        }
        fx
    }

    /// Expires members whose session ran out and ends join phases whose
    /// rebalance timeout passed.
    pub fn tick(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        self.pending.retain(|_, d| *d > now);
        let expired: Vec<String> = self
            .members
            .values()
            // A member waiting in JoinGroup is not heartbeating; the
            // rebalance timeout bounds it instead.
            .filter(|m| m.deadline <= now && !m.awaiting_join)
            .map(|m| m.id.clone())
            .collect();
        for id in expired {
            tracing::info!(group = %self.id, member = %id, "session timed out; removing the member");
            if let Some(m) = self.members.remove(&id) {
                if m.awaiting_sync {
                    fx.synced
                        .push((id.clone(), Err(GroupError::UnknownMemberId)));
                }
            }
            fx.merge(self.after_removal(now));
        }
        if self.rebalance_deadline.is_some_and(|d| d <= now) {
            fx.merge(self.complete_join(now, true));
        } else {
            fx.merge(self.maybe_complete_join(now));
        }
        fx
    }
}

/// Subscriptions and assignments are opaque client bytes; the record
/// keeps them as base64 so it stays readable JSON.
mod b64 {
    use ::bytes::Bytes;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    pub mod bytes {
        use super::*;
        pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
            B64.encode(b).serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
            let text = String::deserialize(d)?;
            B64.decode(text)
                .map(Bytes::from)
                .map_err(serde::de::Error::custom)
        }
    }

    pub mod protocols {
        use super::*;
        pub fn serialize<S: Serializer>(p: &[(String, Bytes)], s: S) -> Result<S::Ok, S::Error> {
            let v: Vec<(&str, String)> =
                p.iter().map(|(n, b)| (n.as_str(), B64.encode(b))).collect();
            v.serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<(String, Bytes)>, D::Error> {
            let v: Vec<(String, String)> = Vec::deserialize(d)?;
            v.into_iter()
                .map(|(n, t)| {
                    B64.decode(t)
                        .map(|b| (n, Bytes::from(b)))
                        .map_err(serde::de::Error::custom)
                })
                .collect()
        }
    }
}

fn session(m: &Member) -> Duration {
    session_of_ms(m.session_timeout_ms)
}

fn session_of(r: &JoinRequest) -> Duration {
    session_of_ms(r.session_timeout_ms)
}

fn session_of_ms(ms: i32) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(member: &str, protocols: &[&str]) -> JoinRequest {
        JoinRequest {
            member_id: member.into(),
            group_instance_id: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
            protocol_type: "consumer".into(),
            protocols: protocols
                .iter()
                .map(|p| (p.to_string(), Bytes::from(format!("sub-{p}"))))
                .collect(),
            require_known_member_id: true,
        }
    }

    /// Joins a new member through MEMBER_ID_REQUIRED; returns its id and
    /// the outcome of the second join.
    fn join_new(g: &mut Group, now: Instant) -> (String, JoinOutcome, Effects) {
        let (o, _) = g.join(req("", &["range"]), now);
        let JoinOutcome::Now(Err((GroupError::MemberIdRequired, id))) = o else {
            panic!("expected MEMBER_ID_REQUIRED, got {o:?}");
        };
        let (o, fx) = g.join(req(&id, &["range"]), now);
        (id, o, fx)
    }

    #[test]
    fn one_member_gets_a_generation_and_its_assignment() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let (id, o, _) = join_new(&mut g, now);
        let JoinOutcome::Now(Ok(j)) = o else {
            panic!("{o:?}")
        };
        assert_eq!(
            (j.generation, j.leader.as_str(), j.protocol.as_str()),
            (1, id.as_str(), "range")
        );
        assert_eq!(j.members.len(), 1);
        assert_eq!(g.state(), GroupState::CompletingRebalance);
        let (s, fx) = g.sync(
            &id,
            1,
            None,
            vec![(id.clone(), Bytes::from_static(b"a"))],
            now,
        );
        assert_eq!(
            s,
            SyncOutcome::Now(Ok(Synced {
                protocol_type: "consumer".into(),
                protocol: "range".into(),
                assignment: Bytes::from_static(b"a"),
            }))
        );
        assert!(fx.persist);
        assert_eq!(g.state(), GroupState::Stable);
        assert_eq!(g.heartbeat(&id, 1, None, now), Ok(()));
        assert_eq!(
            g.heartbeat(&id, 0, None, now),
            Err(GroupError::IllegalGeneration)
        );
        assert_eq!(
            g.heartbeat("x", 1, None, now),
            Err(GroupError::UnknownMemberId)
        );
    }

    #[test]
    fn a_second_member_rebalances_everyone_and_followers_wait_for_the_leader() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let (a, _, _) = join_new(&mut g, now);
        g.sync(&a, 1, None, vec![], now);
        let (b, o, _) = join_new(&mut g, now);
        assert_eq!(o, JoinOutcome::Wait(b.clone()));
        assert_eq!(
            g.heartbeat(&a, 1, None, now),
            Err(GroupError::RebalanceInProgress)
        );
        let (o, fx) = g.join(req(&a, &["range"]), now);
        let JoinOutcome::Now(Ok(ja)) = o else {
            panic!("{o:?}")
        };
        assert_eq!(ja.generation, 2);
        assert_eq!(ja.leader, a);
        assert_eq!(ja.members.len(), 2);
        let (_, jb) = &fx.joined[0];
        let jb = jb.clone().expect("b joined");
        assert!(jb.members.is_empty(), "only the leader sees the members");
        let (s, _) = g.sync(&b, 2, None, vec![], now);
        assert_eq!(s, SyncOutcome::Wait);
        let (s, fx) = g.sync(
            &a,
            2,
            None,
            vec![
                (a.clone(), Bytes::from_static(b"A")),
                (b.clone(), Bytes::from_static(b"B")),
            ],
            now,
        );
        assert!(
            matches!(s, SyncOutcome::Now(Ok(ref x)) if x.assignment == Bytes::from_static(b"A"))
        );
        assert_eq!(fx.synced.len(), 1);
        assert_eq!(fx.synced[0].0, b);
        assert_eq!(
            fx.synced[0].1.clone().map(|s| s.assignment),
            Ok(Bytes::from_static(b"B"))
        );
    }

    #[test]
    fn an_expired_member_is_removed_and_the_rest_rebalance() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let (a, _, _) = join_new(&mut g, now);
        g.sync(&a, 1, None, vec![], now);
        let (b, _, _) = join_new(&mut g, now);
        g.join(req(&a, &["range"]), now);
        g.sync(&a, 2, None, vec![], now);
        g.sync(&b, 2, None, vec![], now);
        assert_eq!(g.state(), GroupState::Stable);
        // a keeps heartbeating, b goes silent.
        let later = now + Duration::from_secs(8);
        assert_eq!(g.heartbeat(&a, 2, None, later), Ok(()));
        let fx = g.tick(now + Duration::from_secs(11));
        assert!(fx.joined.is_empty());
        assert_eq!(g.state(), GroupState::PreparingRebalance);
        assert_eq!(g.members().count(), 1);
        let (o, _) = g.join(req(&a, &["range"]), now + Duration::from_secs(12));
        assert!(matches!(o, JoinOutcome::Now(Ok(ref j)) if j.generation == 3));
    }

    #[test]
    fn members_that_do_not_rejoin_in_the_rebalance_timeout_are_dropped() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let (a, _, _) = join_new(&mut g, now);
        g.sync(&a, 1, None, vec![], now);
        let (b, o, _) = join_new(&mut g, now);
        assert_eq!(o, JoinOutcome::Wait(b.clone()));
        let fx = g.tick(now + Duration::from_secs(31));
        assert_eq!(fx.joined.len(), 1);
        let j = fx.joined[0].1.clone().expect("b joined");
        assert_eq!((j.generation, j.leader.as_str()), (2, b.as_str()));
        assert_eq!(g.members().count(), 1);
        assert_eq!(
            g.heartbeat(&a, 1, None, now),
            Err(GroupError::UnknownMemberId)
        );
    }

    #[test]
    fn leave_and_last_leave_empties_the_group() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let (a, _, _) = join_new(&mut g, now);
        g.sync(&a, 1, None, vec![], now);
        let (r, fx) = g.leave(&a, None, now);
        assert_eq!(r, Ok(a.clone()));
        assert!(fx.persist);
        assert_eq!(g.state(), GroupState::Empty);
        assert_eq!(g.generation(), 2);
        assert_eq!(g.check_commit("", -1, None), Ok(()));
        assert_eq!(g.leave(&a, None, now).0, Err(GroupError::UnknownMemberId));
    }

    #[test]
    fn static_member_rejoins_without_a_rebalance_and_fences_its_old_id() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let mut r = req("", &["range"]);
        r.group_instance_id = Some("i1".into());
        let (o, _) = g.join(r.clone(), now);
        let JoinOutcome::Now(Ok(j1)) = o else {
            panic!("{o:?}")
        };
        let mut r2 = req("", &["range"]);
        r2.group_instance_id = Some("i2".into());
        let (o, _) = g.join(r2, now);
        let JoinOutcome::Wait(id2) = o else {
            panic!("{o:?}")
        };
        let (o, fx) = g.join(req(&j1.member_id, &["range"]), now);
        let JoinOutcome::Now(Ok(j)) = o else {
            panic!("{o:?}")
        };
        assert_eq!(j.generation, 2);
        assert_eq!(fx.joined.len(), 1);
        g.sync(
            &j1.member_id,
            2,
            Some("i1"),
            vec![(id2.clone(), Bytes::from_static(b"X"))],
            now,
        );
        assert_eq!(g.state(), GroupState::Stable);
        // i2 restarts: same generation, same assignment, no rebalance.
        let mut again = req("", &["range"]);
        again.group_instance_id = Some("i2".into());
        let (o, _) = g.join(again, now);
        let JoinOutcome::Now(Ok(j)) = o else {
            panic!("{o:?}")
        };
        assert_eq!(j.generation, 2);
        assert_ne!(j.member_id, id2);
        assert_eq!(g.state(), GroupState::Stable);
        assert_eq!(
            g.heartbeat(&id2, 2, Some("i2"), now),
            Err(GroupError::FencedInstanceId)
        );
        let (s, _) = g.sync(&j.member_id, 2, Some("i2"), vec![], now);
        assert!(
            matches!(s, SyncOutcome::Now(Ok(ref x)) if x.assignment == Bytes::from_static(b"X"))
        );
    }

    #[test]
    fn inconsistent_protocols_and_bad_session_timeouts_are_refused() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let (a, _, _) = join_new(&mut g, now);
        g.sync(&a, 1, None, vec![], now);
        let (o, _) = g.join(req("", &["roundrobin"]), now);
        assert!(matches!(
            o,
            JoinOutcome::Now(Err((GroupError::InconsistentGroupProtocol, _)))
        ));
        let mut r = req("", &["range"]);
        r.session_timeout_ms = 10;
        let (o, _) = g.join(r, now);
        assert!(matches!(
            o,
            JoinOutcome::Now(Err((GroupError::InvalidSessionTimeout, _)))
        ));
    }

    #[test]
    fn protocol_with_most_votes_among_common_ones_wins() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let mut r = req("", &["cooperative-sticky", "range"]);
        r.require_known_member_id = false;
        let (o, _) = g.join(r.clone(), now);
        let JoinOutcome::Now(Ok(j)) = o else {
            panic!("{o:?}")
        };
        assert_eq!(j.protocol, "cooperative-sticky");
        g.sync(&j.member_id, 1, None, vec![], now);
        let mut r2 = req("", &["range", "cooperative-sticky"]);
        r2.require_known_member_id = false;
        g.join(r2.clone(), now);
        let mut r3 = r2;
        r3.member_id.clear();
        g.join(r3, now);
        let (_, fx) = g.join(req(&j.member_id, &["cooperative-sticky", "range"]), now);
        let j = fx.joined[0].1.clone().expect("joined");
        assert_eq!(j.protocol, "range", "two of three prefer range");
    }

    #[test]
    fn a_persisted_group_is_restored_stable() {
        let now = Instant::now();
        let mut g = Group::new("g");
        let (a, _, _) = join_new(&mut g, now);
        g.sync(
            &a,
            1,
            None,
            vec![(a.clone(), Bytes::from_static(b"A"))],
            now,
        );
        let rec = g.record();
        let json = serde_json::to_vec(&rec).expect("encode");
        let back: GroupRecord = serde_json::from_slice(&json).expect("decode");
        let mut h = Group::from_record("g", back, now);
        assert_eq!(h.state(), GroupState::Stable);
        assert_eq!(h.heartbeat(&a, 1, None, now), Ok(()));
        let (s, _) = h.sync(&a, 1, None, vec![], now);
        assert!(
            matches!(s, SyncOutcome::Now(Ok(ref x)) if x.assignment == Bytes::from_static(b"A"))
        );
    }
}

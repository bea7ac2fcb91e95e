//! The KIP-848 consumer-group state machine (ConsumerGroupHeartbeat), as a
//! plain struct with an injected clock and no I/O, like [`crate::group`]
//! for the classic protocol.
//!
//! The broker assigns. Each member heartbeats with its subscription (topic
//! names and/or a regular expression) and, now and then, the partitions it
//! owns. A change of members, subscriptions or subscribed topics bumps the
//! **group epoch**; the next heartbeat computes a **target assignment**
//! for that epoch with a server-side assignor (`uniform` or `range`). Each
//! member then walks to its target on its own heartbeats, Kafka's
//! reconciliation:
//!
//! - partitions it owns that are not in its target are **revoked first**
//!   (state `UnrevokedPartitions`, the member epoch unchanged): the member
//!   keeps the rest and is told to give those up;
//! - once it reports them gone, it moves to the target epoch and gets the
//!   target partitions **nobody else still owns** (a partition another
//!   member has not revoked yet waits: `UnreleasedPartitions`), the rest on
//!   later heartbeats, as their previous owners let go.
//!
//! So no partition is ever owned by two members at once, while members that
//! keep their partitions consume through the rebalance. A member that does
//! not revoke within its rebalance timeout, or stops heartbeating for the
//! session timeout, is removed and its partitions freed.
//!
//! Static members (`group.instance.id`) leave with epoch -2: they keep
//! their partitions until the session timeout, and a new member with the
//! same instance id takes them over without a rebalance.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::group::GroupError;

/// The assignors the broker runs (Kafka's `group.consumer.assignors`), the
/// first the default.
pub const ASSIGNORS: [&str; 2] = ["uniform", "range"];
/// Kafka's `group.consumer.session.timeout.ms`.
pub const SESSION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(45);
/// Kafka's `group.consumer.heartbeat.interval.ms`.
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// Kafka's `group.consumer.max.size` is unbounded; floe bounds it, as
/// [`crate::group::GROUP_MEMBERS_MAX`], to keep the persisted record small.
pub const MEMBERS_MAX: usize = crate::group::GROUP_MEMBERS_MAX;
/// The epoch a member leaves with.
pub const LEAVE_EPOCH: i32 = -1;
/// The epoch a static member leaves with "for now".
pub const LEAVE_STATIC_EPOCH: i32 = -2;
/// A subscription regex longer than this is refused (Kafka bounds them
/// through its request size only; the regex engine's compile limits apply
/// too).
const REGEX_LEN_MAX: usize = 1_000;
/// The most memory one compiled subscription regex may take (the regex
/// crate's `size_limit`): a pathological pattern is refused, not built.
const REGEX_COMPILED_BYTES_MAX: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub session_timeout: Duration,
    pub heartbeat_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            session_timeout: SESSION_TIMEOUT_DEFAULT,
            heartbeat_interval: HEARTBEAT_INTERVAL_DEFAULT,
        }
    }
}

/// A topic as the assignors see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub id: Uuid,
    pub partitions: u32,
}

/// Topics by name.
pub type TopicView = BTreeMap<String, TopicInfo>;

/// Every topic of the cluster, as a heartbeat sees them: the engine's
/// topic map (no copy per heartbeat) or, in tests, a [`TopicView`].
pub trait Topics {
    fn info(&self, name: &str) -> Option<TopicInfo>;
    fn each_name(&self, f: &mut dyn FnMut(&str));
}

impl Topics for TopicView {
    fn info(&self, name: &str) -> Option<TopicInfo> {
        self.get(name).copied()
    }
    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        self.keys().for_each(|n| f(n));
    }
}

impl Topics for crate::topics::TopicMap {
    fn info(&self, name: &str) -> Option<TopicInfo> {
        self.get(name).map(|t| TopicInfo {
            id: t.id,
            partitions: t.partitions,
        })
    }
    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        self.keys().for_each(|n| f(n));
    }
}

/// The group's subscription regexes, compiled once each (a heartbeat
/// would otherwise compile every member's): not state, so equal to any
/// other.
#[derive(Clone, Default)]
struct Patterns(std::collections::HashMap<String, regex::Regex>);

impl PartialEq for Patterns {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Patterns {
    /// Compiled for exactly the patterns the members use now.
    fn sync(&mut self, members: &BTreeMap<String, CgMember>) {
        let wanted: BTreeSet<&str> = members
            .values()
            .filter_map(|m| m.subscribed_regex.as_deref())
            .collect();
        self.0.retain(|p, _| wanted.contains(p.as_str()));
        for p in wanted {
            if !self.0.contains_key(p) {
                if let Ok(re) = compile_regex(p) {
                    self.0.insert(p.to_string(), re);
                }
            }
        }
    }

    fn matches(&self, pattern: &str, topic: &str) -> bool {
        !topic.starts_with("__") && self.0.get(pattern).is_some_and(|re| re.is_match(topic))
    }
}

/// Partitions by topic id.
pub type Assignment = BTreeMap<Uuid, BTreeSet<i32>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    Stable,
    UnrevokedPartitions,
    UnreleasedPartitions,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CgMember {
    pub id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub subscribed_names: Vec<String>,
    pub subscribed_regex: Option<String>,
    pub server_assignor: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub epoch: i32,
    pub previous_epoch: i32,
    pub state: MemberState,
    /// What the member owns (as far as the group knows).
    pub assigned: Assignment,
    /// What it was told to give up and has not yet reported gone.
    pub revoking: Assignment,
    #[serde(skip, default = "Instant::now")]
    session_deadline: Instant,
    #[serde(skip)]
    revoke_deadline: Option<Instant>,
}

impl CgMember {
    /// A static member that left with epoch -2 and may come back.
    pub fn is_away(&self) -> bool {
        self.epoch == LEAVE_STATIC_EPOCH
    }

    fn owns(&self, topic: &Uuid, p: i32) -> bool {
        let has = |a: &Assignment| a.get(topic).is_some_and(|s| s.contains(&p));
        has(&self.assigned) || has(&self.revoking)
    }
}

/// What a heartbeat carries; `None` fields are "unchanged since the last".
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    pub member_id: String,
    pub member_epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub subscribed_names: Option<Vec<String>>,
    pub subscribed_regex: Option<String>,
    pub server_assignor: Option<String>,
    /// The partitions the member owns now.
    pub owned: Option<Assignment>,
    pub client_id: String,
    pub client_host: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatAnswer {
    pub member_id: String,
    pub member_epoch: i32,
    /// Sent when it changed, on a join, or when the member's report of what
    /// it owns disagrees.
    pub assignment: Option<Assignment>,
}

/// Why a heartbeat is refused, with the message for the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub error: GroupError,
    pub message: String,
}

fn refuse(error: GroupError, message: impl Into<String>) -> Refusal {
    Refusal {
        error,
        message: message.into(),
    }
}

/// Kafka's consumer group states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgState {
    Empty,
    Assigning,
    Reconciling,
    Stable,
    Dead,
}

impl CgState {
    pub fn as_str(self) -> &'static str {
        match self {
            CgState::Empty => "Empty",
            CgState::Assigning => "Assigning",
            CgState::Reconciling => "Reconciling",
            CgState::Stable => "Stable",
            CgState::Dead => "Dead",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConsumerGroup {
    pub id: String,
    /// Bumped by every change of members, subscriptions or subscribed
    /// topics.
    pub epoch: i32,
    /// The group epoch `target` was computed for.
    pub assignment_epoch: i32,
    pub assignor: String,
    pub target: BTreeMap<String, Assignment>,
    pub members: BTreeMap<String, CgMember>,
    /// The subscribed topics as of the last heartbeat: the assignors' input
    /// (also when a member times out between heartbeats).
    pub topics: TopicView,
    #[serde(skip)]
    dead: bool,
    /// Changes made (counted), and how many of them the metadata store
    /// holds: an answer is given only once the store has every change it
    /// could reveal, including another request's still being written.
    #[serde(skip)]
    changes: u64,
    #[serde(skip)]
    persisted: u64,
    /// The group epoch is to advance.
    #[serde(skip)]
    stale: bool,
    #[serde(skip)]
    patterns: Patterns,
}

/// A compiled subscription regex: RE2 syntax (Rust's `regex` is an RE2
/// engine, as is the RE2J Kafka uses), matched against the whole name.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, Refusal> {
    let invalid = |why: String| {
        refuse(
            GroupError::InvalidRegularExpression,
            format!("SubscribedTopicRegex `{pattern}` is not a valid regular expression: {why}"),
        )
    };
    if pattern.len() > REGEX_LEN_MAX {
        return Err(invalid(format!("longer than {REGEX_LEN_MAX} bytes")));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_COMPILED_BYTES_MAX)
        .build()
        .map_err(|e| invalid(e.to_string()))
}

impl ConsumerGroup {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            epoch: 0,
            assignment_epoch: 0,
            assignor: ASSIGNORS[0].to_string(),
            target: BTreeMap::new(),
            members: BTreeMap::new(),
            topics: TopicView::new(),
            dead: false,
            changes: 0,
            persisted: 0,
            stale: false,
            patterns: Patterns::default(),
        }
    }

    /// A group as its last coordinator persisted it: every member gets a
    /// full session (and rebalance timeout) from `now` to heartbeat here.
    pub fn loaded(mut self, now: Instant, cfg: &Config) -> Self {
        for m in self.members.values_mut() {
            m.session_deadline = now + cfg.session_timeout;
            if m.state == MemberState::UnrevokedPartitions {
                m.revoke_deadline = Some(now + rebalance_timeout(m));
            }
        }
        self
    }

    pub fn state(&self) -> CgState {
        if self.dead {
            CgState::Dead
        } else if self.members.is_empty() {
            CgState::Empty
        } else if self.epoch != self.assignment_epoch {
            CgState::Assigning
        } else if self
            .members
            .values()
            .any(|m| m.epoch != self.assignment_epoch || m.state != MemberState::Stable)
        {
            CgState::Reconciling
        } else {
            CgState::Stable
        }
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn delete(&mut self) -> Result<(), GroupError> {
        if !self.members.is_empty() {
            return Err(GroupError::NonEmptyGroup);
        }
        self.dead = true;
        Ok(())
    }

    /// The earliest time [`ConsumerGroup::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.members
            .values()
            .flat_map(|m| [Some(m.session_deadline), m.revoke_deadline])
            .flatten()
            .min()
    }

    /// Topic names the members subscribe to, as of their last heartbeat.
    pub fn subscribed_topics(&self) -> BTreeSet<String> {
        self.topics.keys().cloned().collect()
    }

    /// OffsetCommit's check (`generation` is the member epoch): a member at
    /// its current epoch, or an admin commit (no member, epoch -1) to a
    /// group without members. An older epoch is STALE_MEMBER_EPOCH, as
    /// Kafka answers, so the client retries with its new epoch.
    pub fn check_commit(&self, member_id: &str, epoch: i32) -> Result<(), GroupError> {
        if member_id.is_empty() && epoch < 0 {
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(GroupError::UnknownMemberId)
            };
        }
        self.check_fetch(member_id, epoch)
    }

    /// OffsetFetch v9's check, made only when the client names its member
    /// (and OffsetCommit's for a named member): a member at that epoch.
    pub fn check_fetch(&self, member_id: &str, epoch: i32) -> Result<(), GroupError> {
        let m = self
            .members
            .get(member_id)
            .ok_or(GroupError::UnknownMemberId)?;
        if epoch != m.epoch {
            return Err(GroupError::StaleMemberEpoch);
        }
        Ok(())
    }

    /// One ConsumerGroupHeartbeat. `all_topics` is every topic of the
    /// cluster now. Returns the answer and whether the group has changes
    /// (this request's or an earlier one's) that must be persisted before
    /// it is answered.
    pub fn heartbeat(
        &mut self,
        hb: Heartbeat,
        all_topics: &dyn Topics,
        now: Instant,
        cfg: &Config,
    ) -> (Result<HeartbeatAnswer, Refusal>, bool) {
        // Every refusal comes before the first change.
        let r = self.heartbeat_inner(hb, all_topics, now, cfg);
        (r, self.unpersisted())
    }

    fn heartbeat_inner(
        &mut self,
        hb: Heartbeat,
        all_topics: &dyn Topics,
        now: Instant,
        cfg: &Config,
    ) -> Result<HeartbeatAnswer, Refusal> {
        if self.dead {
            return Err(refuse(
                GroupError::CoordinatorNotAvailable,
                "the group is being deleted",
            ));
        }
        if hb.member_id.is_empty() {
            return Err(refuse(
                GroupError::InvalidRequest,
                "MemberId can't be empty.",
            ));
        }
        if let Some(a) = &hb.server_assignor {
            if !ASSIGNORS.contains(&a.as_str()) {
                return Err(refuse(
                    GroupError::UnsupportedAssignor,
                    format!(
                        "ServerAssignor {a} is not supported. Supported assignors: {ASSIGNORS:?}."
                    ),
                ));
            }
        }
        if let Some(p) = &hb.subscribed_regex {
            compile_regex(p)?;
        }
        match hb.member_epoch {
            LEAVE_EPOCH | LEAVE_STATIC_EPOCH => return self.leave(&hb),
            0 => self.join(&hb, now, cfg)?,
            e if e < 0 => {
                return Err(refuse(
                    GroupError::InvalidRequest,
                    format!("MemberEpoch {e} is invalid."),
                ))
            }
            _ => self.check_epoch(&hb)?,
        }
        let join = hb.member_epoch == 0;
        let m = self
            .members
            .get_mut(&hb.member_id)
            .expect("joined or checked");
        m.session_deadline = now + cfg.session_timeout;
        let (old_epoch, old_assigned) = (m.epoch, m.assigned.clone());
        // The subscription and client facts, when sent.
        let mut resubscribed = false;
        if let Some(names) = hb.subscribed_names {
            let mut names = names;
            names.sort();
            names.dedup();
            resubscribed |= names != m.subscribed_names;
            m.subscribed_names = names;
        }
        if let Some(re) = hb.subscribed_regex {
            // An empty regex clears it.
            let re = Some(re).filter(|r| !r.is_empty());
            resubscribed |= re != m.subscribed_regex;
            m.subscribed_regex = re;
        }
        if hb.server_assignor.is_some() && hb.server_assignor != m.server_assignor {
            m.server_assignor = hb.server_assignor;
            resubscribed = true;
        }
        if hb.rebalance_timeout_ms > 0 {
            m.rebalance_timeout_ms = hb.rebalance_timeout_ms;
        }
        if hb.rack_id.is_some() {
            m.rack_id = hb.rack_id;
        }
        m.client_id = hb.client_id;
        m.client_host = hb.client_host;
        if resubscribed {
            self.bump();
        }
        self.refresh_topics(all_topics);
        self.assign_if_due();
        self.reconcile(&hb.member_id, hb.owned.as_ref(), now);
        let m = &self.members[&hb.member_id];
        let send = join
            || m.epoch != old_epoch
            || m.assigned != old_assigned
            || hb.owned.as_ref().is_some_and(|o| !same(o, &m.assigned));
        Ok(HeartbeatAnswer {
            member_id: m.id.clone(),
            member_epoch: m.epoch,
            assignment: send.then(|| m.assigned.clone()),
        })
    }

    fn join(&mut self, hb: &Heartbeat, now: Instant, cfg: &Config) -> Result<(), Refusal> {
        if hb.subscribed_names.is_none() && hb.subscribed_regex.is_none() {
            return Err(refuse(
                GroupError::InvalidRequest,
                "SubscribedTopicNames or SubscribedTopicRegex must be set in first request.",
            ));
        }
        if hb.rebalance_timeout_ms <= 0 {
            return Err(refuse(
                GroupError::InvalidRequest,
                "RebalanceTimeoutMs must be provided in first request.",
            ));
        }
        if let Some(instance) = &hb.instance_id {
            let holder = self
                .members
                .values()
                .find(|m| m.instance_id.as_deref() == Some(instance))
                .map(|m| (m.id.clone(), m.is_away()));
            match holder {
                Some((old, _)) if old == hb.member_id => {
                    self.rejoin(&hb.member_id, hb.owned.as_ref());
                    return Ok(());
                }
                Some((old, true)) => {
                    // The static member is back under a new member id: it
                    // takes its predecessor's place, epoch and partitions.
                    let mut m = self.members.remove(&old).expect("found above");
                    m.id = hb.member_id.clone();
                    m.epoch = m.previous_epoch.max(0);
                    if let Some(t) = self.target.remove(&old) {
                        self.target.insert(m.id.clone(), t);
                    }
                    m.session_deadline = now + cfg.session_timeout;
                    self.members.insert(m.id.clone(), m);
                    self.changes += 1;
                    return Ok(());
                }
                Some(_) => {
                    return Err(refuse(
                        GroupError::UnreleasedInstanceId,
                        format!(
                        "Static member {instance} of group {} is still in use by another member.",
                        self.id
                    ),
                    ))
                }
                None => {}
            }
        }
        if self.members.contains_key(&hb.member_id) {
            self.rejoin(&hb.member_id, hb.owned.as_ref());
            return Ok(());
        }
        if self.members.len() >= MEMBERS_MAX {
            return Err(refuse(
                GroupError::GroupMaxSizeReached,
                format!(
                    "The consumer group has reached its maximum capacity of {MEMBERS_MAX} members."
                ),
            ));
        }
        self.members.insert(
            hb.member_id.clone(),
            CgMember {
                id: hb.member_id.clone(),
                instance_id: hb.instance_id.clone(),
                rack_id: None,
                client_id: String::new(),
                client_host: String::new(),
                subscribed_names: Vec::new(),
                subscribed_regex: None,
                server_assignor: None,
                rebalance_timeout_ms: hb.rebalance_timeout_ms,
                epoch: 0,
                previous_epoch: 0,
                state: MemberState::Stable,
                assigned: Assignment::new(),
                revoking: Assignment::new(),
                session_deadline: now + cfg.session_timeout,
                revoke_deadline: None,
            },
        );
        self.bump();
        Ok(())
    }

    /// A known member joins again (epoch 0): after it was fenced, or when
    /// its join's answer was lost. It owns at most what it reports now; it
    /// starts over from there at epoch 0 and reconciles to its target.
    fn rejoin(&mut self, id: &str, owned: Option<&Assignment>) {
        let m = self.members.get_mut(id).expect("present");
        let none = Assignment::new();
        let owned = owned.unwrap_or(&none);
        // What it still holds of what it had, revoking included: reconciling
        // from there asks it again to give up what is not in its target.
        let mut held = Assignment::new();
        for (t, ps) in m.assigned.iter().chain(m.revoking.iter()) {
            for p in ps {
                if contains(owned, t, *p) {
                    held.entry(*t).or_default().insert(*p);
                }
            }
        }
        m.assigned = held;
        m.revoking = Assignment::new();
        m.revoke_deadline = None;
        m.state = MemberState::Stable;
        m.previous_epoch = m.epoch.max(0);
        m.epoch = 0;
        self.changes += 1;
    }

    /// A member's epoch must be its current one, or the one before it when
    /// the answer that moved it was lost and it owns nothing it should not.
    fn check_epoch(&self, hb: &Heartbeat) -> Result<(), Refusal> {
        let Some(m) = self.members.get(&hb.member_id) else {
            return Err(refuse(
                GroupError::UnknownMemberId,
                format!(
                    "Member {} is not a member of group {}.",
                    hb.member_id, self.id
                ),
            ));
        };
        if m.is_away() {
            return Err(refuse(
                GroupError::UnknownMemberId,
                format!("Static member {} left the group.", hb.member_id),
            ));
        }
        if hb.instance_id.is_some() && hb.instance_id != m.instance_id {
            return Err(refuse(
                GroupError::FencedInstanceId,
                "The member's instance id does not match the one it joined with.",
            ));
        }
        let lost_answer = hb.member_epoch == m.previous_epoch
            && hb.owned.as_ref().is_some_and(|o| subset(o, &m.assigned));
        if hb.member_epoch == m.epoch || lost_answer {
            return Ok(());
        }
        Err(refuse(
            GroupError::FencedMemberEpoch,
            format!(
                "The consumer group member has a member epoch ({}) that differs from the group's ({}).",
                hb.member_epoch, m.epoch
            ),
        ))
    }

    fn leave(&mut self, hb: &Heartbeat) -> Result<HeartbeatAnswer, Refusal> {
        let found = self.members.contains_key(&hb.member_id)
            || hb.instance_id.as_ref().is_some_and(|i| {
                self.members
                    .values()
                    .any(|m| m.instance_id.as_ref() == Some(i))
            });
        if !found {
            return Err(refuse(
                GroupError::UnknownMemberId,
                format!(
                    "Member {} is not a member of group {}.",
                    hb.member_id, self.id
                ),
            ));
        }
        let id = if self.members.contains_key(&hb.member_id) {
            hb.member_id.clone()
        } else {
            let i = hb.instance_id.as_ref().expect("checked");
            self.members
                .values()
                .find(|m| m.instance_id.as_ref() == Some(i))
                .expect("checked")
                .id
                .clone()
        };
        let stays =
            hb.member_epoch == LEAVE_STATIC_EPOCH && self.members[&id].instance_id.is_some();
        if stays {
            // Away for now: it keeps its partitions until its session ends.
            let m = self.members.get_mut(&id).expect("found");
            if !m.is_away() {
                m.previous_epoch = m.epoch;
                m.epoch = LEAVE_STATIC_EPOCH;
                self.changes += 1;
            }
        } else {
            self.remove_member(&id);
            self.assign_if_due();
        }
        Ok(HeartbeatAnswer {
            member_id: hb.member_id.clone(),
            member_epoch: hb.member_epoch,
            assignment: None,
        })
    }

    /// The group epoch advances (once per request, however many changes
    /// it carries) at the next [`ConsumerGroup::assign_if_due`].
    fn bump(&mut self) {
        self.stale = true;
        self.changes += 1;
    }

    fn remove_member(&mut self, id: &str) {
        if self.members.remove(id).is_some() {
            self.target.remove(id);
            self.bump();
        }
    }

    /// Takes in the subscribed topics as they are now; a change (a topic
    /// created, deleted, grown, or matched by a regex) bumps the epoch.
    fn refresh_topics(&mut self, all: &dyn Topics) {
        // Over the distinct subscriptions: members mostly share one.
        self.patterns.sync(&self.members);
        let mut names: BTreeSet<&str> = BTreeSet::new();
        let mut regexes: BTreeSet<&str> = BTreeSet::new();
        for m in self.members.values() {
            names.extend(m.subscribed_names.iter().map(String::as_str));
            regexes.extend(m.subscribed_regex.as_deref());
        }
        let mut view = TopicView::new();
        for name in names {
            if let Some(info) = all.info(name) {
                view.insert(name.to_string(), info);
            }
        }
        if !regexes.is_empty() {
            all.each_name(&mut |t| {
                if !view.contains_key(t) && regexes.iter().any(|p| self.patterns.matches(p, t)) {
                    if let Some(info) = all.info(t) {
                        view.insert(t.to_string(), info);
                    }
                }
            });
        }
        if view != self.topics {
            self.topics = view;
            self.bump();
        }
    }

    /// Computes the target assignment when the group epoch moved past it.
    fn assign_if_due(&mut self) {
        if std::mem::take(&mut self.stale) {
            self.epoch += 1;
        }
        if self.epoch == self.assignment_epoch {
            return;
        }
        self.assignor = self.preferred_assignor();
        // After a failover the cache starts empty.
        self.patterns.sync(&self.members);
        let subs: BTreeMap<String, BTreeSet<String>> = self
            .members
            .values()
            .map(|m| (m.id.clone(), member_topics(m, &self.topics, &self.patterns)))
            .collect();
        self.target = match self.assignor.as_str() {
            "range" => assign_range(&subs, &self.topics),
            _ => assign_uniform(&subs, &self.topics, &self.target),
        };
        self.assignment_epoch = self.epoch;
        self.changes += 1;
    }

    /// The assignor most members ask for; the default when none does
    /// (ties go to the name first in [`ASSIGNORS`]).
    fn preferred_assignor(&self) -> String {
        let votes = |a: &str| {
            self.members
                .values()
                .filter(|m| m.server_assignor.as_deref() == Some(a))
                .count()
        };
        let mut best = ASSIGNORS[0];
        for a in ASSIGNORS {
            if votes(a) > votes(best) {
                best = a;
            }
        }
        best.to_string()
    }

    /// Moves one member towards its target (see the module comment).
    fn reconcile(&mut self, id: &str, owned: Option<&Assignment>, now: Instant) {
        let target = self.target.get(id).cloned().unwrap_or_default();
        let target_epoch = self.assignment_epoch;
        let m = &self.members[id];
        match m.state {
            MemberState::UnrevokedPartitions => {
                let released = owned.is_some_and(|o| !intersects(o, &m.revoking));
                if !released {
                    return;
                }
                let m = self.members.get_mut(id).expect("present");
                m.revoking.clear();
                m.revoke_deadline = None;
                self.changes += 1;
            }
            MemberState::Stable if m.epoch == target_epoch => return,
            _ => {}
        }
        let m = &self.members[id];
        let mut keep = Assignment::new();
        let mut revoke = Assignment::new();
        for (t, ps) in &m.assigned {
            for p in ps {
                let into = if contains(&target, t, *p) {
                    &mut keep
                } else {
                    &mut revoke
                };
                into.entry(*t).or_default().insert(*p);
            }
        }
        if !revoke.is_empty() {
            let deadline = now + rebalance_timeout(m);
            let m = self.members.get_mut(id).expect("present");
            m.assigned = keep;
            m.revoking = revoke;
            m.state = MemberState::UnrevokedPartitions;
            m.revoke_deadline = Some(deadline);
            self.changes += 1;
            return;
        }
        let mut unreleased = false;
        for (t, ps) in &target {
            for p in ps {
                if contains(&keep, t, *p) {
                    continue;
                }
                let taken = self.members.values().any(|o| o.id != id && o.owns(t, *p));
                if taken {
                    unreleased = true;
                } else {
                    keep.entry(*t).or_default().insert(*p);
                }
            }
        }
        let m = self.members.get_mut(id).expect("present");
        let state = if unreleased {
            MemberState::UnreleasedPartitions
        } else {
            MemberState::Stable
        };
        if m.epoch != target_epoch || m.assigned != keep || m.state != state {
            self.changes += 1;
        }
        if m.epoch != target_epoch {
            m.previous_epoch = m.epoch;
            m.epoch = target_epoch;
        }
        m.assigned = keep;
        m.state = state;
    }

    /// Removes members whose session ended, or that did not revoke within
    /// their rebalance timeout. Returns whether the group has changes to
    /// persist.
    pub fn tick(&mut self, now: Instant) -> bool {
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| m.session_deadline <= now || m.revoke_deadline.is_some_and(|d| d <= now))
            .map(|m| m.id.clone())
            .collect();
        for id in &expired {
            tracing::info!(group = %self.id, member = %id, "consumer group member expired");
            self.remove_member(id);
        }
        if !expired.is_empty() {
            self.assign_if_due();
        }
        self.unpersisted()
    }

    /// Whether the group has changes the metadata store does not hold yet.
    pub fn unpersisted(&self) -> bool {
        self.changes != self.persisted
    }

    /// How many changes the group has had; a record taken now holds them.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The store holds the record taken after `changes` changes.
    pub fn persisted_up_to(&mut self, changes: u64) {
        self.persisted = self.persisted.max(changes);
    }
}

fn rebalance_timeout(m: &CgMember) -> Duration {
    Duration::from_millis(m.rebalance_timeout_ms.max(1) as u64)
}

/// The topics of `topics` one member subscribes to.
fn member_topics(m: &CgMember, topics: &TopicView, patterns: &Patterns) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = m
        .subscribed_names
        .iter()
        .filter(|t| topics.contains_key(*t))
        .cloned()
        .collect();
    if let Some(p) = m.subscribed_regex.as_deref() {
        out.extend(topics.keys().filter(|t| patterns.matches(p, t)).cloned());
    }
    out
}

fn contains(a: &Assignment, t: &Uuid, p: i32) -> bool {
    a.get(t).is_some_and(|s| s.contains(&p))
}

fn intersects(a: &Assignment, b: &Assignment) -> bool {
    a.iter()
        .any(|(t, ps)| ps.iter().any(|p| contains(b, t, *p)))
}

fn subset(a: &Assignment, b: &Assignment) -> bool {
    a.iter()
        .all(|(t, ps)| ps.iter().all(|p| contains(b, t, *p)))
}

/// Equal as sets of partitions (empty topic entries ignored).
fn same(a: &Assignment, b: &Assignment) -> bool {
    subset(a, b) && subset(b, a)
}

/// Kafka's range assignor: per topic, the subscribed members in member id
/// order take contiguous ranges, the first `partitions % members` one
/// more. Members subscribed to co-partitioned topics get the same
/// partition numbers on each.
pub fn assign_range(
    subs: &BTreeMap<String, BTreeSet<String>>,
    topics: &TopicView,
) -> BTreeMap<String, Assignment> {
    let mut out: BTreeMap<String, Assignment> = subs
        .keys()
        .map(|m| (m.clone(), Assignment::new()))
        .collect();
    for (name, info) in topics {
        let members: Vec<&String> = subs
            .iter()
            .filter(|(_, ts)| ts.contains(name))
            .map(|(m, _)| m)
            .collect();
        if members.is_empty() {
            continue;
        }
        let n = info.partitions as usize;
        let (base, extra) = (n / members.len(), n % members.len());
        let mut next = 0usize;
        for (i, m) in members.iter().enumerate() {
            let take = base + usize::from(i < extra);
            if take > 0 {
                let set = out
                    .get_mut(*m)
                    .expect("every member")
                    .entry(info.id)
                    .or_default();
                set.extend((next..next + take).map(|p| p as i32));
            }
            next += take;
        }
    }
    out
}

/// Kafka's uniform assignor: every partition to one subscribed member,
/// counts as even as the subscriptions allow, and as few moves from the
/// previous target as that takes (sticky). Previous owners keep what they
/// still subscribe to, the rest goes to the least loaded subscriber, then
/// partitions move from the most to the least loaded member while that
/// narrows the gap by two or more.
pub fn assign_uniform(
    subs: &BTreeMap<String, BTreeSet<String>>,
    topics: &TopicView,
    previous: &BTreeMap<String, Assignment>,
) -> BTreeMap<String, Assignment> {
    // Partition -> owner index; members by index in id order.
    let members: Vec<&String> = subs.keys().collect();
    let index: BTreeMap<&String, usize> =
        members.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let eligible = |i: usize, topic: &str| subs[members[i]].contains(topic);
    let mut owner: BTreeMap<(String, i32), usize> = BTreeMap::new();
    let mut load = vec![0usize; members.len()];
    let names_by_id: BTreeMap<Uuid, &String> = topics.iter().map(|(n, i)| (i.id, n)).collect();
    for (m, a) in previous {
        let Some(&i) = index.get(m) else { continue };
        for (tid, ps) in a {
            let Some(name) = names_by_id.get(tid) else {
                continue;
            };
            if !eligible(i, name) {
                continue;
            }
            for p in ps {
                if (*p as u32) < topics[*name].partitions
                    && !owner.contains_key(&((*name).clone(), *p))
                {
                    owner.insert(((*name).clone(), *p), i);
                    load[i] += 1;
                }
            }
        }
    }
    for (name, info) in topics {
        for p in 0..info.partitions as i32 {
            if owner.contains_key(&(name.clone(), p)) {
                continue;
            }
            let best = (0..members.len())
                .filter(|&i| eligible(i, name))
                .min_by_key(|&i| (load[i], i));
            if let Some(i) = best {
                owner.insert((name.clone(), p), i);
                load[i] += 1;
            }
        }
    }
    // Balance: each move lowers the sum of squared loads, so this ends.
    loop {
        let mut moved = false;
        let mut keys: Vec<(String, i32)> = owner.keys().cloned().collect();
        keys.reverse();
        for key in keys {
            let from = owner[&key];
            let to = (0..members.len())
                .filter(|&i| eligible(i, &key.0) && load[i] + 1 < load[from])
                .min_by_key(|&i| (load[i], i));
            if let Some(to) = to {
                owner.insert(key, to);
                load[from] -= 1;
                load[to] += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let mut out: BTreeMap<String, Assignment> = subs
        .keys()
        .map(|m| (m.clone(), Assignment::new()))
        .collect();
    for ((name, p), i) in owner {
        out.get_mut(members[i])
            .expect("every member")
            .entry(topics[&name].id)
            .or_default()
            .insert(p);
    }
    out
}

#[cfg(test)]
mod tests;

//! Consumer groups: FindCoordinator, JoinGroup, SyncGroup, Heartbeat,
//! LeaveGroup, OffsetCommit, OffsetFetch, DescribeGroups, ListGroups,
//! DeleteGroups, OffsetDelete. The group logic is the engine's
//! ([`floe_engine::coordinator`]); this file maps Kafka messages and error
//! codes onto it.

use floe_engine::acls::{AclOperation, AclResourceType};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use floe_engine::coordinator::{CoordError, Coordinator, GroupSummary};
use floe_engine::group::{GroupState, JoinRequest};
use floe_meta::schema::OffsetRecord;
use kafka_protocol::messages::delete_groups_request::DeleteGroupsRequest;
use kafka_protocol::messages::delete_groups_response::{
    DeletableGroupResult, DeleteGroupsResponse,
};
use kafka_protocol::messages::describe_groups_request::DescribeGroupsRequest;
use kafka_protocol::messages::describe_groups_response::{
    DescribeGroupsResponse, DescribedGroup, DescribedGroupMember,
};
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::{
    Coordinator as Coord, FindCoordinatorResponse,
};
use kafka_protocol::messages::heartbeat_request::HeartbeatRequest;
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::join_group_request::JoinGroupRequest;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};
use kafka_protocol::messages::leave_group_request::LeaveGroupRequest;
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};
use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
use kafka_protocol::messages::list_groups_response::{ListGroupsResponse, ListedGroup};
use kafka_protocol::messages::offset_commit_request::OffsetCommitRequest;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_request::OffsetDeleteRequest;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponse, OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::sync_group_request::SyncGroupRequest;
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;
use kafka_protocol::messages::{BrokerId, ConsumerProtocolSubscription, GroupId, TopicName};
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::{encode, Ctx, Reply};
use crate::codes;
use crate::discovery::{self, Advertised};
use crate::request;

const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;
/// FindCoordinator v6's share-group key (KIP-932).
const KEY_TYPE_SHARE: i8 = 2;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// Runs `f` with the group coordinator (on the engine's runtime).
pub(super) async fn on_coordinator<T, F, Fut>(ctx: &Ctx, f: F) -> Result<T, CoordError>
where
    T: Send + 'static,
    F: FnOnce(Arc<Coordinator>) -> Fut,
    Fut: Future<Output = Result<T, CoordError>> + Send + 'static,
{
    ctx.broker.engine.with_groups(f).await
}

/// A described group's authorized operations: the principal's when asked
/// for, else Kafka's "not asked" (i32::MIN).
pub(super) fn group_operations(ctx: &Ctx, asked: bool, group: &str) -> i32 {
    if asked {
        ctx.authorized_operations(AclResourceType::Group, group)
    } else {
        i32::MIN
    }
}

pub(super) fn client_host(ctx: &Ctx) -> String {
    ctx.peer.map(|p| format!("/{}", p.ip())).unwrap_or_default()
}

// ---- FindCoordinator --------------------------------------------------------

/// The broker that coordinates `group` for this client: the one holding
/// the group now if the client can see it, else the rendezvous choice among
/// the brokers the client sees (which claims it on first use).
///
/// When the metadata store cannot say who holds the group (an outage, or
/// no answer within [`floe_engine::coordinator::OWNER_LOOKUP_MAX`]), the
/// answer is the rendezvous choice too, never an error. A wrong guess
/// costs the client one group request answered NOT_COORDINATOR or
/// COORDINATOR_NOT_AVAILABLE, which every client retries within its own
/// timeouts. A FindCoordinator error can cost far more: librdkafka (2.16)
/// parks a coordinator lookup after three COORDINATOR_NOT_AVAILABLE
/// answers, or after one of any other error, until one of its broker
/// connections changes state, and its `send_offsets_to_transaction` waits
/// for that lookup without a timeout. With stable connections that wait
/// never ends (FINDINGS.md, 2026-12-01).
async fn locate(ctx: &Ctx, group: &str, visible: &[Advertised]) -> Option<Advertised> {
    let g = group.to_string();
    match on_coordinator(ctx, |coord| async move { coord.current_owner(&g).await }).await {
        Ok(Some(owner)) => {
            if let Some(b) = visible.iter().find(|b| b.node_id == owner) {
                return Some(b.clone());
            }
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(
            group,
            "FindCoordinator answers the rendezvous choice without the group's owner: {e}"
        ),
    }
    discovery::coordinator(visible, group.as_bytes()).cloned()
}

pub async fn find_coordinator(ctx: &Ctx, req: FindCoordinatorRequest, version: i16) -> Reply {
    let keys: Vec<StrBytes> = if version >= 4 {
        req.coordinator_keys.clone()
    } else {
        vec![req.key.clone()]
    };
    let visible = discovery::visible_brokers(&ctx.broker, &ctx.client);
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let entry = Coord::default()
            .with_key(key.clone())
            .with_node_id(BrokerId(-1))
            .with_port(-1);
        let denied = match req.key_type {
            KEY_TYPE_TRANSACTION => !ctx.allowed(
                AclOperation::Describe,
                AclResourceType::TransactionalId,
                &key,
            ),
            KEY_TYPE_GROUP => !ctx.allowed(AclOperation::Describe, AclResourceType::Group, &key),
            _ => false,
        };
        let entry = if denied {
            entry.with_error_code(if req.key_type == KEY_TYPE_GROUP {
                codes::GROUP_AUTHORIZATION_FAILED
            } else {
                codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            })
        } else if req.key_type == KEY_TYPE_TRANSACTION {
            // Any broker coordinates any transactional id (its state is
            // in the metadata store, changed by CAS): the rendezvous
            // choice spreads them, and stays put while brokers do.
            match discovery::coordinator(&visible, key.as_bytes()) {
                Some(b) if !key.is_empty() => entry
                    .with_node_id(BrokerId(b.node_id))
                    .with_host(s(b.host.clone()))
                    .with_port(i32::from(b.port)),
                Some(_) => entry.with_error_code(codes::INVALID_REQUEST),
                None => entry.with_error_code(codes::COORDINATOR_NOT_AVAILABLE),
            }
        } else if req.key_type == KEY_TYPE_SHARE {
            entry
                .with_error_code(codes::INVALID_REQUEST)
                .with_error_message(Some(s("share groups (KIP-932) are not served")))
        } else if req.key_type != KEY_TYPE_GROUP {
            entry
                .with_error_code(codes::INVALID_REQUEST)
                .with_error_message(Some(s(format!("unknown key type {}", req.key_type))))
        } else if key.is_empty() {
            entry.with_error_code(codes::INVALID_GROUP_ID)
        } else {
            match locate(ctx, key.as_str(), &visible).await {
                Some(b) => entry
                    .with_node_id(BrokerId(b.node_id))
                    .with_host(s(b.host))
                    .with_port(i32::from(b.port)),
                None => entry
                    .with_error_code(codes::COORDINATOR_NOT_AVAILABLE)
                    .with_error_message(Some(s("no live broker"))),
            }
        };
        out.push(entry);
    }
    let mut resp = FindCoordinatorResponse::default();
    if version >= 4 {
        resp = resp.with_coordinators(out);
    } else if let Some(c) = out.pop() {
        resp = resp
            .with_error_code(c.error_code)
            .with_error_message(c.error_message)
            .with_node_id(c.node_id)
            .with_host(c.host)
            .with_port(c.port);
    }
    encode(&resp, version)
}

// ---- JoinGroup / SyncGroup / Heartbeat / LeaveGroup -------------------------

pub async fn join(ctx: &Ctx, req: JoinGroupRequest, version: i16) -> Reply {
    let resp = JoinGroupResponse::default()
        .with_generation_id(-1)
        .with_protocol_name(Some(StrBytes::default()))
        .with_member_id(req.member_id.clone());
    if !ctx.allowed(AclOperation::Read, AclResourceType::Group, &req.group_id) {
        return encode(
            &resp.with_error_code(codes::GROUP_AUTHORIZATION_FAILED),
            version,
        );
    }
    if req.group_id.is_empty() {
        return encode(&resp.with_error_code(codes::INVALID_GROUP_ID), version);
    }
    let join = JoinRequest {
        member_id: req.member_id.to_string(),
        group_instance_id: req.group_instance_id.as_ref().map(|i| i.to_string()),
        client_id: ctx.client_id.as_deref().unwrap_or_default().to_string(),
        client_host: client_host(ctx),
        session_timeout_ms: req.session_timeout_ms,
        rebalance_timeout_ms: if version >= 1 {
            req.rebalance_timeout_ms
        } else {
            req.session_timeout_ms
        },
        protocol_type: req.protocol_type.to_string(),
        protocols: req
            .protocols
            .iter()
            // Kept for as long as the member is in the group.
            .map(|p| (p.name.to_string(), request::detached(&p.metadata)))
            .collect(),
        require_known_member_id: version >= 4,
    };
    let group = req.group_id.to_string();
    let answer = on_coordinator(
        ctx,
        |coord| async move { Ok(coord.join(&group, join).await) },
    )
    .await;
    let resp = match answer {
        Ok(Ok(j)) => resp
            .with_generation_id(j.generation)
            .with_protocol_type(Some(s(j.protocol_type)))
            .with_protocol_name(Some(s(j.protocol)))
            .with_leader(s(j.leader))
            .with_member_id(s(j.member_id))
            .with_members(
                j.members
                    .into_iter()
                    .map(|(id, instance, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(s(id))
                            .with_group_instance_id(instance.map(s))
                            .with_metadata(metadata)
                    })
                    .collect(),
            ),
        Ok(Err((e, id))) => resp
            .with_error_code(codes::coordinator(&e))
            .with_member_id(s(id)),
        Err(e) => resp.with_error_code(codes::coordinator(&e)),
    };
    encode(&resp, version)
}

pub async fn sync(ctx: &Ctx, req: SyncGroupRequest, version: i16) -> Reply {
    if !ctx.allowed(AclOperation::Read, AclResourceType::Group, &req.group_id) {
        return encode(
            &SyncGroupResponse::default().with_error_code(codes::GROUP_AUTHORIZATION_FAILED),
            version,
        );
    }
    let group = req.group_id.to_string();
    let member = req.member_id.to_string();
    let instance = req.group_instance_id.as_ref().map(|i| i.to_string());
    let generation = req.generation_id;
    let assignments = req
        .assignments
        .iter()
        // Kept until the next rebalance.
        .map(|a| (a.member_id.to_string(), request::detached(&a.assignment)))
        .collect();
    let r = on_coordinator(ctx, |coord| async move {
        coord
            .sync(
                &group,
                &member,
                generation,
                instance.as_deref(),
                assignments,
            )
            .await
    })
    .await;
    let resp = match r {
        Ok(synced) => SyncGroupResponse::default()
            .with_protocol_type(Some(s(synced.protocol_type)))
            .with_protocol_name(Some(s(synced.protocol)))
            .with_assignment(synced.assignment),
        Err(e) => SyncGroupResponse::default().with_error_code(codes::coordinator(&e)),
    };
    encode(&resp, version)
}

pub async fn heartbeat(ctx: &Ctx, req: HeartbeatRequest, version: i16) -> Reply {
    if !ctx.allowed(AclOperation::Read, AclResourceType::Group, &req.group_id) {
        return encode(
            &HeartbeatResponse::default().with_error_code(codes::GROUP_AUTHORIZATION_FAILED),
            version,
        );
    }
    let group = req.group_id.to_string();
    let member = req.member_id.to_string();
    let instance = req.group_instance_id.as_ref().map(|i| i.to_string());
    let generation = req.generation_id;
    let r = on_coordinator(ctx, |coord| async move {
        coord
            .heartbeat(&group, &member, generation, instance.as_deref())
            .await
    })
    .await;
    let code = r
        .err()
        .map(|e| codes::coordinator(&e))
        .unwrap_or(codes::NONE);
    encode(&HeartbeatResponse::default().with_error_code(code), version)
}

pub async fn leave(ctx: &Ctx, req: LeaveGroupRequest, version: i16) -> Reply {
    if !ctx.allowed(AclOperation::Read, AclResourceType::Group, &req.group_id) {
        return encode(
            &LeaveGroupResponse::default().with_error_code(codes::GROUP_AUTHORIZATION_FAILED),
            version,
        );
    }
    let members: Vec<(String, Option<String>)> = if version >= 3 {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|i| i.to_string()),
                )
            })
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    let group = req.group_id.to_string();
    let r = on_coordinator(
        ctx,
        |coord| async move { coord.leave(&group, members).await },
    )
    .await;
    let resp = match r {
        Ok(results) if version >= 3 => LeaveGroupResponse::default().with_members(
            results
                .into_iter()
                .map(|(id, instance, r)| {
                    MemberResponse::default()
                        .with_member_id(s(id))
                        .with_group_instance_id(instance.map(s))
                        .with_error_code(r.err().map(codes::group).unwrap_or(codes::NONE))
                })
                .collect(),
        ),
        Ok(results) => {
            let code = results
                .into_iter()
                .find_map(|(_, _, r)| r.err())
                .map(codes::group)
                .unwrap_or(codes::NONE);
            LeaveGroupResponse::default().with_error_code(code)
        }
        Err(e) => LeaveGroupResponse::default().with_error_code(codes::coordinator(&e)),
    };
    encode(&resp, version)
}

// ---- Offsets ----------------------------------------------------------------

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn partition_exists(ctx: &Ctx, topic: &str, partition: i32) -> bool {
    super::partition_key(ctx.broker.engine.topic(topic).as_deref(), partition).is_some()
}

pub async fn offset_commit(ctx: &Ctx, req: OffsetCommitRequest, version: i16) -> Reply {
    let mut known = Vec::new();
    // (topic, partition, code) in request order.
    let mut results: Vec<(TopicName, Vec<(i32, i16)>)> = Vec::with_capacity(req.topics.len());
    let max_metadata = 4096;
    let group_ok = ctx.allowed(AclOperation::Read, AclResourceType::Group, &req.group_id);
    for t in &req.topics {
        let mut parts = Vec::with_capacity(t.partitions.len());
        let topic_ok = group_ok && ctx.allowed(AclOperation::Read, AclResourceType::Topic, &t.name);
        for p in &t.partitions {
            let code = if !group_ok {
                codes::GROUP_AUTHORIZATION_FAILED
            } else if !topic_ok {
                codes::TOPIC_AUTHORIZATION_FAILED
            } else if !partition_exists(ctx, t.name.as_str(), p.partition_index) {
                codes::UNKNOWN_TOPIC_OR_PARTITION
            } else if p
                .committed_metadata
                .as_ref()
                .is_some_and(|m| m.len() > max_metadata)
            {
                codes::OFFSET_METADATA_TOO_LARGE
            } else {
                known.push((
                    t.name.to_string(),
                    p.partition_index,
                    OffsetRecord {
                        offset: p.committed_offset,
                        leader_epoch: if version >= 6 {
                            p.committed_leader_epoch
                        } else {
                            -1
                        },
                        metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
                        commit_ms: now_ms(),
                    },
                ));
                codes::NONE
            };
            parts.push((p.partition_index, code));
        }
        results.push((t.name.clone(), parts));
    }
    let failure = if !group_ok {
        None
    } else if req.group_id.is_empty() {
        Some(codes::INVALID_GROUP_ID)
    } else {
        let group = req.group_id.to_string();
        let member = req.member_id.to_string();
        let instance = req.group_instance_id.as_ref().map(|i| i.to_string());
        let generation = req.generation_id_or_member_epoch;
        on_coordinator(ctx, |coord| async move {
            coord
                .commit_offsets(&group, &member, generation, instance.as_deref(), known)
                .await
        })
        .await
        .err()
        .map(|e| codes::coordinator(&e))
    };
    let topics = results
        .into_iter()
        .map(|(name, parts)| {
            OffsetCommitResponseTopic::default()
                .with_name(name)
                .with_partitions(
                    parts
                        .into_iter()
                        .map(|(p, c)| {
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(p)
                                .with_error_code(if c == codes::NONE {
                                    failure.unwrap_or(c)
                                } else {
                                    c
                                })
                        })
                        .collect(),
                )
        })
        .collect();
    encode(
        &OffsetCommitResponse::default().with_topics(topics),
        version,
    )
}

/// One group's committed offsets, in the shape of the asked topics (or
/// every committed one when none are named).
/// A partition's committed offset as OffsetFetch answers it: None when
/// nothing is committed; UNSTABLE_OFFSET_COMMIT (KIP-447) instead when the
/// client asked for stable offsets and a transaction has offsets for it
/// staged and not yet published.
type Fetched = Result<Option<OffsetRecord>, i16>;

/// A partition's answer as OffsetFetch writes it: (error code, offset,
/// leader epoch, metadata); -1s when nothing is committed or stable.
fn fields(r: Fetched) -> (i16, i64, i32, String) {
    match r {
        Ok(Some(r)) => (
            codes::NONE,
            r.offset,
            r.leader_epoch,
            r.metadata.unwrap_or_default(),
        ),
        Ok(None) => (codes::NONE, -1, -1, String::new()),
        Err(code) => (code, -1, -1, String::new()),
    }
}

async fn fetch_group(
    ctx: &Ctx,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
    require_stable: bool,
) -> Result<Vec<(String, Vec<(i32, Fetched)>)>, CoordError> {
    let g = group.to_string();
    let asked = topics.clone();
    let found = on_coordinator(
        ctx,
        |coord| async move { coord.fetch_offsets(&g, asked).await },
    )
    .await?;
    let unstable = if require_stable {
        let g = group.to_string();
        ctx.broker
            .engine
            .with_txns(|t| async move { t.pending_partitions(&g).await })
            .await
            .map_err(|e| CoordError::Unavailable(e.to_string()))?
    } else {
        Default::default()
    };
    let answer = |t: &str, p: i32, rec: Option<OffsetRecord>| -> Fetched {
        if unstable.contains(&(t.to_string(), p)) {
            Err(codes::UNSTABLE_OFFSET_COMMIT)
        } else {
            Ok(rec)
        }
    };
    let mut by_topic: BTreeMap<String, BTreeMap<i32, OffsetRecord>> = BTreeMap::new();
    for (t, p, rec) in found {
        by_topic.entry(t).or_default().insert(p, rec);
    }
    Ok(match topics {
        Some(ts) => ts
            .into_iter()
            .map(|(t, ps)| {
                let have = by_topic.get(&t);
                let parts = ps
                    .into_iter()
                    .map(|p| (p, answer(&t, p, have.and_then(|h| h.get(&p)).cloned())))
                    .collect();
                (t, parts)
            })
            .collect(),
        None => by_topic
            .into_iter()
            .map(|(t, ps)| {
                let parts = ps
                    .into_iter()
                    .map(|(p, r)| (p, answer(&t, p, Some(r))))
                    .collect();
                (t, parts)
            })
            .collect(),
    })
}

/// [`fetch_group`] as the principal may see it: the group needs DESCRIBE
/// (else the group's error code), each topic named needs DESCRIBE (else
/// TOPIC_AUTHORIZATION_FAILED on its partitions), and a fetch of every
/// committed offset leaves out the topics it may not describe.
async fn fetch_group_authorized(
    ctx: &Ctx,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
    require_stable: bool,
) -> Result<Vec<(String, Vec<(i32, Fetched)>)>, i16> {
    if !ctx.allowed(AclOperation::Describe, AclResourceType::Group, group) {
        return Err(codes::GROUP_AUTHORIZATION_FAILED);
    }
    let named = topics.is_some();
    let found = fetch_group(ctx, group, topics, require_stable)
        .await
        .map_err(|e| codes::coordinator(&e))?;
    Ok(found
        .into_iter()
        .filter_map(|(t, parts)| {
            if named && !ctx.allowed(AclOperation::Describe, AclResourceType::Topic, &t) {
                let parts = parts
                    .into_iter()
                    .map(|(p, _)| (p, Err(codes::TOPIC_AUTHORIZATION_FAILED)))
                    .collect();
                Some((t, parts))
            } else if !named && !ctx.may(AclOperation::Describe, AclResourceType::Topic, &t) {
                None
            } else {
                Some((t, parts))
            }
        })
        .collect())
}

pub async fn offset_fetch(ctx: &Ctx, req: OffsetFetchRequest, version: i16) -> Reply {
    if version >= 8 {
        let mut groups = Vec::with_capacity(req.groups.len());
        for g in &req.groups {
            let topics = g.topics.as_ref().map(|ts| {
                ts.iter()
                    .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                    .collect()
            });
            let entry = OffsetFetchResponseGroup::default().with_group_id(g.group_id.clone());
            // v9: a consumer-protocol member names itself and its epoch;
            // admin clients send neither.
            let member = g.member_id.as_ref().map(|m| m.to_string());
            let described =
                ctx.allowed(AclOperation::Describe, AclResourceType::Group, &g.group_id);
            if described && (member.is_some() || g.member_epoch >= 0) {
                let (group, epoch) = (g.group_id.to_string(), g.member_epoch);
                let member = member.unwrap_or_default();
                let checked = on_coordinator(ctx, |coord| async move {
                    coord.check_offset_fetch(&group, &member, epoch)
                })
                .await;
                if let Err(e) = checked {
                    groups.push(entry.with_error_code(codes::coordinator(&e)));
                    continue;
                }
            }
            let entry =
                match fetch_group_authorized(ctx, g.group_id.as_str(), topics, req.require_stable)
                    .await
                {
                    Ok(found) => entry.with_topics(
                        found
                            .into_iter()
                            .map(|(t, parts)| {
                                OffsetFetchResponseTopics::default()
                                    .with_name(TopicName(s(t)))
                                    .with_partitions(
                                        parts
                                            .into_iter()
                                            .map(|(p, r)| {
                                                let (error, offset, epoch, meta) = fields(r);
                                                OffsetFetchResponsePartitions::default()
                                                    .with_partition_index(p)
                                                    .with_error_code(error)
                                                    .with_committed_offset(offset)
                                                    .with_committed_leader_epoch(epoch)
                                                    .with_metadata(Some(s(meta)))
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    ),
                    Err(code) => entry.with_error_code(code),
                };
            groups.push(entry);
        }
        return encode(&OffsetFetchResponse::default().with_groups(groups), version);
    }
    let topics = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
            .collect()
    });
    // v7 added require_stable.
    let stable = version >= 7 && req.require_stable;
    let resp = match fetch_group_authorized(ctx, req.group_id.as_str(), topics, stable).await {
        Ok(found) => OffsetFetchResponse::default().with_topics(
            found
                .into_iter()
                .map(|(t, parts)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(TopicName(s(t)))
                        .with_partitions(
                            parts
                                .into_iter()
                                .map(|(p, r)| {
                                    let (error, offset, epoch, meta) = fields(r);
                                    OffsetFetchResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_error_code(error)
                                        .with_committed_offset(offset)
                                        .with_committed_leader_epoch(epoch)
                                        .with_metadata(Some(s(meta)))
                                })
                                .collect(),
                        )
                })
                .collect(),
        ),
        Err(code) => OffsetFetchResponse::default().with_error_code(code),
    };
    encode(&resp, version)
}

// ---- Administration ---------------------------------------------------------

pub async fn describe(ctx: &Ctx, req: DescribeGroupsRequest, version: i16) -> Reply {
    let mut groups = Vec::with_capacity(req.groups.len());
    for g in req.groups {
        let id = g.to_string();
        let entry = DescribedGroup::default()
            .with_group_id(g.clone())
            .with_authorized_operations(group_operations(
                ctx,
                req.include_authorized_operations,
                &id,
            ));
        if !ctx.allowed(AclOperation::Describe, AclResourceType::Group, &id) {
            groups.push(
                entry
                    .with_error_code(codes::GROUP_AUTHORIZATION_FAILED)
                    .with_group_state(s(""))
                    .with_authorized_operations(i32::MIN),
            );
            continue;
        }
        let r = on_coordinator(ctx, |coord| async move { coord.describe(&id).await }).await;
        groups.push(match r {
            Ok(sum) => described(entry, sum),
            Err(e) => entry
                .with_error_code(codes::coordinator(&e))
                .with_group_state(s(GroupState::Dead.as_str())),
        });
    }
    encode(
        &DescribeGroupsResponse::default().with_groups(groups),
        version,
    )
}

fn described(entry: DescribedGroup, sum: GroupSummary) -> DescribedGroup {
    if sum.kind != "classic" {
        // Kafka describes a consumer-protocol group here as Dead (v6:
        // GROUP_ID_NOT_FOUND); ConsumerGroupDescribe is the call for it.
        return entry.with_group_state(s(GroupState::Dead.as_str()));
    }
    let protocol = sum.protocol.clone();
    entry
        .with_group_state(s(sum.state))
        .with_protocol_type(s(sum.protocol_type))
        .with_protocol_data(s(sum.protocol))
        .with_members(
            sum.members
                .into_iter()
                .map(|m| {
                    let metadata = m
                        .protocols
                        .iter()
                        .find(|(n, _)| *n == protocol)
                        .map(|(_, b)| b.clone())
                        .unwrap_or_default();
                    DescribedGroupMember::default()
                        .with_member_id(s(m.id))
                        .with_group_instance_id(m.instance_id.map(s))
                        .with_client_id(s(m.client_id))
                        .with_client_host(s(m.client_host))
                        .with_member_metadata(metadata)
                        .with_member_assignment(m.assignment)
                })
                .collect(),
        )
}

/// ListGroups: every broker lists the groups it coordinates, plus the
/// groups whose coordinator the client cannot see (or that nobody
/// coordinates now) for which it is the client's rendezvous choice — so an
/// admin client that asks every broker it sees lists each group once.
pub async fn list(ctx: &Ctx, req: ListGroupsRequest, version: i16) -> Reply {
    let r = on_coordinator(ctx, |coord| async move { coord.list().await }).await;
    let me = ctx.broker.settings.node_id;
    let visible = discovery::visible_brokers(&ctx.broker, &ctx.client);
    let states: Vec<String> = req.states_filter.iter().map(|x| x.to_lowercase()).collect();
    let types: Vec<String> = req.types_filter.iter().map(|x| x.to_lowercase()).collect();
    let cluster_describe = ctx.may(
        AclOperation::Describe,
        AclResourceType::Cluster,
        floe_engine::acls::CLUSTER_NAME,
    );
    let resp = match r {
        Ok(all) => ListGroupsResponse::default().with_groups(
            all.into_iter()
                .filter(|g| {
                    let seen_owner = g.owner.filter(|o| visible.iter().any(|b| b.node_id == *o));
                    match seen_owner {
                        Some(o) => o == me,
                        None => {
                            discovery::coordinator(&visible, g.group_id.as_bytes())
                                .map(|b| b.node_id)
                                == Some(me)
                        }
                    }
                })
                .filter(|g| states.is_empty() || states.contains(&g.state.to_lowercase()))
                // DESCRIBE on the cluster lists every group; else the ones
                // the principal may describe, silently.
                .filter(|g| {
                    cluster_describe
                        || ctx.may(AclOperation::Describe, AclResourceType::Group, &g.group_id)
                })
                .filter(|g| types.is_empty() || types.iter().any(|t| t == g.kind))
                .map(|g| {
                    ListedGroup::default()
                        .with_group_id(GroupId(s(g.group_id)))
                        .with_protocol_type(s(g.protocol_type))
                        .with_group_state(s(g.state))
                        .with_group_type(s(g.kind))
                })
                .collect(),
        ),
        Err(e) => ListGroupsResponse::default().with_error_code(codes::coordinator(&e)),
    };
    encode(&resp, version)
}

pub async fn delete(ctx: &Ctx, req: DeleteGroupsRequest, version: i16) -> Reply {
    let mut results = Vec::with_capacity(req.groups_names.len());
    for g in req.groups_names {
        let id = g.to_string();
        if !ctx.allowed(AclOperation::Delete, AclResourceType::Group, &id) {
            results.push(
                DeletableGroupResult::default()
                    .with_group_id(g)
                    .with_error_code(codes::GROUP_AUTHORIZATION_FAILED),
            );
            continue;
        }
        let r = on_coordinator(ctx, |coord| async move { coord.delete_group(&id).await }).await;
        results.push(
            DeletableGroupResult::default()
                .with_group_id(g)
                .with_error_code(
                    r.err()
                        .map(|e| codes::coordinator(&e))
                        .unwrap_or(codes::NONE),
                ),
        );
    }
    encode(
        &DeleteGroupsResponse::default().with_results(results),
        version,
    )
}

/// Topics the group's consumers subscribe to (consumer protocol only).
fn subscribed(subscriptions: &[Bytes]) -> Vec<String> {
    let mut topics = Vec::new();
    for sub in subscriptions {
        let mut b = sub.clone();
        if b.len() < 2 {
            continue;
        }
        let version = i16::from_be_bytes([b[0], b[1]]);
        let _ = bytes::Buf::get_i16(&mut b);
        if let Ok(s) = ConsumerProtocolSubscription::decode(&mut b, version.clamp(0, 3)) {
            topics.extend(s.topics.iter().map(|t| t.to_string()));
        }
    }
    topics
}

pub async fn offset_delete(ctx: &Ctx, req: OffsetDeleteRequest, version: i16) -> Reply {
    if !ctx.allowed(AclOperation::Delete, AclResourceType::Group, &req.group_id) {
        return encode(
            &OffsetDeleteResponse::default().with_error_code(codes::GROUP_AUTHORIZATION_FAILED),
            version,
        );
    }
    let group = req.group_id.to_string();
    let state = on_coordinator(ctx, |coord| async move {
        coord.member_subscriptions(&group).await
    })
    .await;
    let subs = match state {
        Ok(x) => x,
        Err(e) => {
            return encode(
                &OffsetDeleteResponse::default().with_error_code(codes::coordinator(&e)),
                version,
            )
        }
    };
    let busy: Vec<String> = if !subs.active {
        Vec::new()
    } else if subs.classic.is_empty() {
        subs.topics
    } else {
        subscribed(&subs.classic)
    };
    let mut delete = Vec::new();
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let mut parts = Vec::with_capacity(t.partitions.len());
        let readable = ctx.allowed(AclOperation::Read, AclResourceType::Topic, &t.name);
        for p in &t.partitions {
            let code = if !readable {
                codes::TOPIC_AUTHORIZATION_FAILED
            } else if busy.iter().any(|b| b == t.name.as_str()) {
                codes::GROUP_SUBSCRIBED_TO_TOPIC
            } else if !partition_exists(ctx, t.name.as_str(), p.partition_index) {
                codes::UNKNOWN_TOPIC_OR_PARTITION
            } else {
                delete.push((t.name.to_string(), p.partition_index));
                codes::NONE
            };
            parts.push(
                OffsetDeleteResponsePartition::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(code),
            );
        }
        topics.push(
            OffsetDeleteResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(parts),
        );
    }
    let group = req.group_id.to_string();
    let r = on_coordinator(ctx, |coord| async move {
        coord.delete_offsets(&group, delete).await
    })
    .await;
    let resp = match r {
        Ok(()) => OffsetDeleteResponse::default().with_topics(topics),
        Err(e) => OffsetDeleteResponse::default().with_error_code(codes::coordinator(&e)),
    };
    encode(&resp, version)
}

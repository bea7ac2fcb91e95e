//! KIP-848 consumer groups: ConsumerGroupHeartbeat and
//! ConsumerGroupDescribe. The group logic is the engine's
//! ([`floe_engine::consumer_group`], run by
//! [`floe_engine::coordinator::Coordinator`]); this file maps Kafka messages
//! and error codes onto it.

use floe_engine::acls::{AclOperation, AclResourceType};
use floe_engine::consumer_group::{Assignment, Heartbeat};
use kafka_protocol::messages::consumer_group_describe_request::ConsumerGroupDescribeRequest;
use kafka_protocol::messages::consumer_group_describe_response::{
    self as describe_response, ConsumerGroupDescribeResponse, DescribedGroup,
};
use kafka_protocol::messages::consumer_group_heartbeat_request::ConsumerGroupHeartbeatRequest;
use kafka_protocol::messages::consumer_group_heartbeat_response::{
    self as heartbeat_response, ConsumerGroupHeartbeatResponse,
};
use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::StrBytes;

use super::groups::{client_host, group_operations, on_coordinator};
use super::{encode, Ctx, Reply};
use crate::codes;

/// ConsumerGroupDescribe v1's member type of a consumer-protocol member.
const MEMBER_TYPE_CONSUMER: i8 = 1;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

pub async fn heartbeat(ctx: &Ctx, req: ConsumerGroupHeartbeatRequest, version: i16) -> Reply {
    let refuse = |code: i16, message: Option<String>| {
        encode(
            &ConsumerGroupHeartbeatResponse::default()
                .with_error_code(code)
                .with_error_message(message.map(s)),
            version,
        )
    };
    let group = req.group_id.to_string();
    if !ctx.allowed(AclOperation::Read, AclResourceType::Group, &group) {
        return refuse(codes::GROUP_AUTHORIZATION_FAILED, None);
    }
    // Kafka's check: DESCRIBE on every topic subscribed to by name.
    let hidden: Vec<String> = req
        .subscribed_topic_names
        .iter()
        .flatten()
        .map(|t| t.to_string())
        .filter(|t| !ctx.allowed(AclOperation::Describe, AclResourceType::Topic, t))
        .collect();
    if !hidden.is_empty() {
        return refuse(
            codes::TOPIC_AUTHORIZATION_FAILED,
            Some(format!("Unauthorized topics: {}", hidden.join(", "))),
        );
    }
    if group.is_empty() {
        // Kafka's own check and words (after the authorization checks).
        return refuse(
            codes::INVALID_REQUEST,
            Some("GroupId can't be empty.".into()),
        );
    }
    let mut member_id = req.member_id.to_string();
    // v0: the broker names a joining member; from v1 the client does
    // (KIP-1082), and an empty id is refused by the group.
    if version == 0 && member_id.is_empty() && req.member_epoch == 0 {
        member_id = uuid::Uuid::new_v4().to_string();
    }
    let owned = req.topic_partitions.map(|tps| {
        let mut a = Assignment::new();
        for tp in tps {
            a.entry(tp.topic_id).or_default().extend(tp.partitions);
        }
        a
    });
    let hb = Heartbeat {
        member_id,
        member_epoch: req.member_epoch,
        instance_id: req.instance_id.map(|i| i.to_string()),
        rack_id: req.rack_id.map(|r| r.to_string()),
        rebalance_timeout_ms: req.rebalance_timeout_ms,
        subscribed_names: req
            .subscribed_topic_names
            .map(|ns| ns.iter().map(|n| n.to_string()).collect()),
        subscribed_regex: req.subscribed_topic_regex.map(|r| r.to_string()),
        server_assignor: req.server_assignor.map(|a| a.to_string()),
        owned,
        client_id: ctx.client_id.as_deref().unwrap_or_default().to_string(),
        client_host: client_host(ctx),
    };
    let topics = ctx.broker.engine.topics();
    let r = ctx
        .broker
        .engine
        .with_groups(|coord| async move {
            let interval = coord.consumer_config().heartbeat_interval;
            Ok((coord.consumer_heartbeat(&group, hb, topics).await, interval))
        })
        .await;
    let (answer, interval) = match r {
        Ok(x) => x,
        Err(e) => return refuse(codes::coordinator(&e), None),
    };
    match answer {
        Ok(a) => {
            let assignment = a.assignment.map(|a| {
                heartbeat_response::Assignment::default().with_topic_partitions(
                    a.into_iter()
                        .filter(|(_, ps)| !ps.is_empty())
                        .map(|(id, ps)| {
                            heartbeat_response::TopicPartitions::default()
                                .with_topic_id(id)
                                .with_partitions(ps.into_iter().collect())
                        })
                        .collect(),
                )
            });
            encode(
                &ConsumerGroupHeartbeatResponse::default()
                    .with_member_id(Some(s(a.member_id)))
                    .with_member_epoch(a.member_epoch)
                    .with_heartbeat_interval_ms(interval.as_millis().min(i32::MAX as u128) as i32)
                    .with_assignment(assignment),
                version,
            )
        }
        Err((e, message)) => refuse(codes::coordinator(&e), message),
    }
}

pub async fn describe(ctx: &Ctx, req: ConsumerGroupDescribeRequest, version: i16) -> Reply {
    let names = ctx.broker.engine.topics_by_id();
    let named = |a: &Assignment| {
        describe_response::Assignment::default().with_topic_partitions(
            a.iter()
                .filter(|(_, ps)| !ps.is_empty())
                .map(|(id, ps)| {
                    let name = names.get(id).map(|t| t.name.clone()).unwrap_or_default();
                    describe_response::TopicPartitions::default()
                        .with_topic_id(*id)
                        .with_topic_name(TopicName(s(name)))
                        .with_partitions(ps.iter().copied().collect())
                })
                .collect(),
        )
    };
    let mut groups = Vec::with_capacity(req.group_ids.len());
    for g in req.group_ids {
        let id = g.to_string();
        let entry = DescribedGroup::default()
            .with_group_id(g)
            .with_authorized_operations(group_operations(
                ctx,
                req.include_authorized_operations,
                &id,
            ));
        if !ctx.allowed(AclOperation::Describe, AclResourceType::Group, &id) {
            groups.push(
                entry
                    .with_error_code(codes::GROUP_AUTHORIZATION_FAILED)
                    .with_authorized_operations(i32::MIN),
            );
            continue;
        }
        let gid = id.clone();
        let r = on_coordinator(
            ctx,
            |coord| async move { coord.describe_consumer(&gid).await },
        )
        .await;
        groups.push(match r {
            Ok(Some(cg)) => {
                let state = cg.state().as_str();
                entry
                    .with_group_state(s(state))
                    .with_group_epoch(cg.epoch)
                    .with_assignment_epoch(cg.assignment_epoch)
                    .with_assignor_name(s(cg.assignor.clone()))
                    .with_members(
                        cg.members
                            .values()
                            .map(|m| {
                                let target = cg.target.get(&m.id).cloned().unwrap_or_default();
                                describe_response::Member::default()
                                    .with_member_id(s(m.id.clone()))
                                    .with_instance_id(m.instance_id.clone().map(s))
                                    .with_rack_id(m.rack_id.clone().map(s))
                                    .with_member_epoch(m.epoch)
                                    .with_client_id(s(m.client_id.clone()))
                                    .with_client_host(s(m.client_host.clone()))
                                    .with_subscribed_topic_names(
                                        m.subscribed_names
                                            .iter()
                                            .map(|n| TopicName(s(n.clone())))
                                            .collect(),
                                    )
                                    .with_subscribed_topic_regex(m.subscribed_regex.clone().map(s))
                                    .with_assignment(named(&m.assigned))
                                    .with_target_assignment(named(&target))
                                    .with_member_type(MEMBER_TYPE_CONSUMER)
                            })
                            .collect(),
                    )
            }
            Ok(None) => entry
                .with_error_code(codes::GROUP_ID_NOT_FOUND)
                .with_error_message(Some(s(format!("Group {id} is not a consumer group.")))),
            Err(e) => entry.with_error_code(codes::coordinator(&e)),
        });
    }
    encode(
        &ConsumerGroupDescribeResponse::default().with_groups(groups),
        version,
    )
}

//! Metadata: the brokers this client may use (see [`discovery`]: its agent
//! group, listener, zone and overrides), and the topics asked for
//! (auto-creating unknown ones when allowed, as Kafka does), each
//! partition "led" by one of those brokers. Brokers that left the cluster
//! not long ago stay in the broker list, leading nothing.

use std::sync::Arc;

use floe_engine::acls::{AclOperation, AclResourceType, CLUSTER_NAME};
use floe_meta::schema::TopicRecord;
use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::{
    MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::{encode, Ctx, Reply};
use crate::codes;
use crate::discovery::{self, Advertised};

fn topic_entry(t: &TopicRecord, brokers: &[Advertised], version: i16) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(t.name.clone()))))
        .with_topic_id(t.id)
        .with_topic_authorized_operations(i32::MIN)
        .with_partitions(
            (0..t.partitions)
                .map(|p| {
                    let node = discovery::leader(brokers, t.id, p).unwrap_or(-1);
                    MetadataResponsePartition::default()
                        .with_partition_index(p as i32)
                        .with_leader_id(BrokerId(node))
                        .with_leader_epoch(if version >= 7 { 0 } else { -1 })
                        .with_replica_nodes(vec![BrokerId(node)])
                        .with_isr_nodes(vec![BrokerId(node)])
                })
                .collect(),
        )
}

fn error_entry(name: &str, code: i16) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(name.to_string()))))
        .with_error_code(code)
        .with_topic_authorized_operations(i32::MIN)
}

/// Creates a topic on first use when the broker and request allow it.
pub async fn auto_create(ctx: &Ctx, name: &str) -> Result<Arc<TopicRecord>, i16> {
    let partitions = ctx.broker.effective().num_partitions;
    let r = ctx.broker.engine.ensure_topic(name, partitions).await;
    match r {
        Ok(t) => {
            tracing::info!(topic = %name, partitions, "topic auto-created");
            Ok(t)
        }
        Err(e) => Err(codes::engine(&e)),
    }
}

pub async fn handle(ctx: &Ctx, req: MetadataRequest, version: i16) -> Reply {
    let st = &ctx.broker.settings;
    let brokers = discovery::visible_brokers(&ctx.broker, &ctx.client);
    let snapshot = ctx.broker.engine.topics();
    // v0: an empty list means all topics; v1+: null means all topics.
    // v10+ may name a topic by id instead (KIP-516; KIP-848 consumers
    // look their assigned topics up so).
    let requested: Option<Vec<Result<String, uuid::Uuid>>> = match req.topics {
        None => None,
        Some(ts) if ts.is_empty() && version == 0 => None,
        Some(ts) => Some(
            ts.into_iter()
                .filter_map(|t| match t.name {
                    Some(n) => Some(Ok(n.0.to_string())),
                    None if !t.topic_id.is_nil() => Some(Err(t.topic_id)),
                    None => None,
                })
                .collect(),
        ),
    };
    let allow_create =
        ctx.broker.effective().auto_create_topics && (version < 4 || req.allow_auto_topic_creation);
    // Kafka's authorized-operations fields (v8+), when the client asks.
    let topic_ops = |t: &TopicRecord| {
        if req.include_topic_authorized_operations {
            ctx.authorized_operations(AclResourceType::Topic, &t.name)
        } else {
            i32::MIN
        }
    };
    let entry = |t: &TopicRecord| {
        topic_entry(t, &brokers, version).with_topic_authorized_operations(topic_ops(t))
    };
    let mut topics = Vec::new();
    match requested {
        None => {
            // Every topic the principal may describe; the others are left
            // out without a word (Kafka does not log these refusals).
            let mut all: Vec<_> = snapshot
                .values()
                .filter(|t| ctx.may(AclOperation::Describe, AclResourceType::Topic, &t.name))
                .cloned()
                .collect();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            topics.extend(all.iter().map(|t| entry(t)));
        }
        Some(asked) => {
            let by_id = ctx.broker.engine.topics_by_id();
            for name in asked {
                let name = match name {
                    Ok(name) => name,
                    Err(id) => {
                        match by_id.get(&id) {
                            Some(t)
                                if ctx.may(
                                    AclOperation::Describe,
                                    AclResourceType::Topic,
                                    &t.name,
                                ) =>
                            {
                                topics.push(entry(t))
                            }
                            // Unknown, or not to be described: Kafka does
                            // not tell the two apart for an id.
                            _ => topics.push(
                                MetadataResponseTopic::default()
                                    .with_topic_id(id)
                                    .with_error_code(codes::UNKNOWN_TOPIC_ID)
                                    .with_topic_authorized_operations(i32::MIN),
                            ),
                        }
                        continue;
                    }
                };
                if !ctx.allowed(AclOperation::Describe, AclResourceType::Topic, &name) {
                    topics.push(error_entry(&name, codes::TOPIC_AUTHORIZATION_FAILED));
                } else if let Some(t) = snapshot.get(&name) {
                    topics.push(entry(t));
                } else if let Err(e) = floe_engine::topics::validate_name(&name) {
                    tracing::debug!(topic = %name, error = %e, "metadata for an invalid topic name");
                    topics.push(error_entry(&name, codes::INVALID_TOPIC));
                } else if allow_create
                    && !ctx.may(AclOperation::Create, AclResourceType::Cluster, CLUSTER_NAME)
                    && !ctx.allowed(AclOperation::Create, AclResourceType::Topic, &name)
                {
                    topics.push(error_entry(&name, codes::TOPIC_AUTHORIZATION_FAILED));
                } else if allow_create {
                    match auto_create(ctx, &name).await {
                        Ok(t) => topics.push(entry(&t)),
                        Err(code) => topics.push(error_entry(&name, code)),
                    }
                } else {
                    topics.push(error_entry(&name, codes::UNKNOWN_TOPIC_OR_PARTITION));
                }
            }
        }
    }
    // Brokers that left not long ago stay listed, leading nothing.
    let departed = discovery::departed_brokers(&ctx.broker, &ctx.client, &brokers);
    let resp = MetadataResponse::default()
        .with_brokers(
            brokers
                .iter()
                .chain(&departed)
                .map(|b| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(b.node_id))
                        .with_host(StrBytes::from_string(b.host.clone()))
                        .with_port(i32::from(b.port))
                        .with_rack(b.rack.clone().map(StrBytes::from_string))
                })
                .collect(),
        )
        .with_cluster_id(Some(StrBytes::from_string(
            ctx.broker.engine.cluster_id().to_string(),
        )))
        .with_controller_id(BrokerId(brokers.first().map_or(st.node_id, |b| b.node_id)))
        .with_cluster_authorized_operations(
            if req.include_cluster_authorized_operations && version <= 10 {
                ctx.authorized_operations(AclResourceType::Cluster, CLUSTER_NAME)
            } else {
                i32::MIN
            },
        )
        .with_topics(topics);
    encode(&resp, version)
}

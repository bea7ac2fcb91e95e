//! DescribeTopicPartitions (KIP-966): the topics asked for (or every topic
//! the principal may describe), sorted by name, their partitions paged by
//! a cursor so a client with many partitions asks in bounded answers.
//! Admin clients of Kafka 3.8+ describe topics with it. Partitions are
//! "led" as Metadata says (the client's rendezvous broker); floe has no
//! eligible leader replicas (KIP-966's ELR), so those lists are empty.

use kafka_protocol::messages::describe_topic_partitions_response::{
    Cursor, DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use floe_engine::acls::{AclOperation, AclResourceType};

use super::{encode, Ctx, Reply};
use crate::codes;
use crate::discovery;

/// Partitions in one answer at most (Kafka's
/// `max.request.partition.size.limit`).
pub const PARTITIONS_PER_RESPONSE_MAX: i32 = 2000;

fn name(s: &str) -> Option<TopicName> {
    Some(TopicName(StrBytes::from_string(s.to_string())))
}

pub async fn handle(ctx: &Ctx, req: DescribeTopicPartitionsRequest, version: i16) -> Reply {
    let snapshot = ctx.broker.engine.topics();
    let brokers = discovery::visible_brokers(&ctx.broker, &ctx.client);
    let limit = match req.response_partition_limit {
        l if l <= 0 => PARTITIONS_PER_RESPONSE_MAX,
        l => l.min(PARTITIONS_PER_RESPONSE_MAX),
    } as usize;
    // (name, asked by name): every topic asked for, or every describable one.
    let mut names: Vec<(String, bool)> = if req.topics.is_empty() {
        snapshot
            .keys()
            .filter(|t| ctx.may(AclOperation::Describe, AclResourceType::Topic, t))
            .map(|t| (t.clone(), false))
            .collect()
    } else {
        req.topics
            .iter()
            .map(|t| (t.name.to_string(), true))
            .collect()
    };
    names.sort();
    names.dedup();
    let (from_topic, from_partition) = match &req.cursor {
        Some(c) => (
            Some(c.topic_name.to_string()),
            c.partition_index.max(0) as u32,
        ),
        None => (None, 0),
    };
    let mut topics = Vec::new();
    let mut left = limit;
    let mut next_cursor = None;
    for (topic, asked) in names {
        if from_topic.as_deref().is_some_and(|f| topic.as_str() < f) {
            continue;
        }
        let entry = DescribeTopicPartitionsResponseTopic::default()
            .with_name(name(&topic))
            .with_topic_authorized_operations(i32::MIN);
        if asked && !ctx.allowed(AclOperation::Describe, AclResourceType::Topic, &topic) {
            topics.push(entry.with_error_code(codes::TOPIC_AUTHORIZATION_FAILED));
            continue;
        }
        let Some(rec) = snapshot.get(&topic) else {
            topics.push(entry.with_error_code(codes::UNKNOWN_TOPIC_OR_PARTITION));
            continue;
        };
        if left == 0 {
            next_cursor = Some(
                Cursor::default()
                    .with_topic_name(TopicName(StrBytes::from_string(topic.clone())))
                    .with_partition_index(0),
            );
            break;
        }
        let first = if from_topic.as_deref() == Some(topic.as_str()) {
            from_partition
        } else {
            0
        };
        let mut partitions = Vec::new();
        let mut p = first;
        while p < rec.partitions {
            if left == 0 {
                next_cursor = Some(
                    Cursor::default()
                        .with_topic_name(TopicName(StrBytes::from_string(topic.clone())))
                        .with_partition_index(p as i32),
                );
                break;
            }
            let node = BrokerId(discovery::leader(&brokers, rec.id, p).unwrap_or(-1));
            partitions.push(
                DescribeTopicPartitionsResponsePartition::default()
                    .with_partition_index(p as i32)
                    .with_leader_id(node)
                    .with_leader_epoch(0)
                    .with_replica_nodes(vec![node])
                    .with_isr_nodes(vec![node])
                    .with_eligible_leader_replicas(Some(Vec::new()))
                    .with_last_known_elr(Some(Vec::new())),
            );
            left -= 1;
            p += 1;
        }
        topics.push(
            entry
                .with_topic_id(rec.id)
                .with_partitions(partitions)
                .with_topic_authorized_operations(
                    ctx.authorized_operations(AclResourceType::Topic, &topic),
                ),
        );
        if next_cursor.is_some() {
            break;
        }
    }
    encode(
        &DescribeTopicPartitionsResponse::default()
            .with_topics(topics)
            .with_next_cursor(next_cursor),
        version,
    )
}

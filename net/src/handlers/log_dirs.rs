//! DescribeLogDirs and AlterReplicaLogDirs, answered as a diskless broker
//! can. A floe broker keeps no partition on a disk of its own: every
//! partition's batches live in the object store, which every broker
//! serves from. So each broker reports one log directory, named by the
//! object store (as its start-up line names it), holding every partition
//! with the bytes it keeps stored there (intake ranges and archive objects
//! from its log start on), no lag, and no capacity figures (-1: the
//! object store has no fixed size). The same partitions and sizes come
//! from every broker: a tool that adds sizes up across brokers (as it
//! would add up replicas) counts each partition once per broker.
//!
//! AlterReplicaLogDirs can only "move" a partition to where it is: that
//! directory is answered NONE, any other LOG_DIR_NOT_FOUND.

use kafka_protocol::messages::alter_replica_log_dirs_response::{
    AlterReplicaLogDirPartitionResult, AlterReplicaLogDirTopicResult,
};
use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::{
    AlterReplicaLogDirsRequest, AlterReplicaLogDirsResponse, DescribeLogDirsRequest,
    DescribeLogDirsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use floe_engine::acls::AclOperation;
use floe_engine::shard::OffsetQuery;

use super::{encode, partition_key, Ctx, Reply};
use crate::codes;

/// The one log directory of a floe broker: its object store.
fn log_dir(ctx: &Ctx) -> String {
    ctx.broker.engine.describe_backends().0
}

pub async fn describe(ctx: &Ctx, req: DescribeLogDirsRequest, version: i16) -> Reply {
    if !ctx.allowed_on_cluster(AclOperation::Describe) {
        return encode(
            &DescribeLogDirsResponse::default()
                .with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED),
            version,
        );
    }
    let snapshot = ctx.broker.engine.topics();
    // (topic, partitions asked) — every topic and partition when none are
    // named; partitions that do not exist are left out, as Kafka leaves
    // out replicas a broker does not host.
    let mut wanted: Vec<(String, Vec<i32>)> = match &req.topics {
        Some(ts) => ts
            .iter()
            .map(|t| (t.topic.to_string(), t.partitions.clone()))
            .collect(),
        None => snapshot
            .values()
            .map(|t| (t.name.clone(), (0..t.partitions as i32).collect()))
            .collect(),
    };
    wanted.sort();
    let mut topics = Vec::new();
    for (name, partitions) in wanted {
        let record = snapshot.get(&name);
        let mut out = Vec::new();
        for p in partitions {
            let Some(tp) = partition_key(record.map(|r| &**r), p) else {
                continue;
            };
            let answer = ctx.shard.offsets(tp, OffsetQuery::Latest).await;
            let size = answer.map_or(-1, |a| a.stored_bytes as i64);
            out.push(
                DescribeLogDirsPartition::default()
                    .with_partition_index(p)
                    .with_partition_size(size)
                    .with_offset_lag(0)
                    .with_is_future_key(false),
            );
        }
        if !out.is_empty() {
            topics.push(
                DescribeLogDirsTopic::default()
                    .with_name(TopicName(StrBytes::from_string(name)))
                    .with_partitions(out),
            );
        }
    }
    let dir = DescribeLogDirsResult::default()
        .with_log_dir(StrBytes::from_string(log_dir(ctx)))
        .with_topics(topics)
        .with_total_bytes(-1)
        .with_usable_bytes(-1);
    encode(
        &DescribeLogDirsResponse::default().with_results(vec![dir]),
        version,
    )
}

pub async fn alter(ctx: &Ctx, req: AlterReplicaLogDirsRequest, version: i16) -> Reply {
    let allowed = ctx.allowed_on_cluster(AclOperation::Alter);
    let here = log_dir(ctx);
    let snapshot = ctx.broker.engine.topics();
    let mut results = Vec::new();
    for dir in &req.dirs {
        for t in &dir.topics {
            let record = snapshot.get(t.name.as_str());
            let partitions = t
                .partitions
                .iter()
                .map(|&p| {
                    let code = if !allowed {
                        codes::CLUSTER_AUTHORIZATION_FAILED
                    } else if partition_key(record.map(|r| &**r), p).is_none() {
                        codes::UNKNOWN_TOPIC_OR_PARTITION
                    } else if dir.path.as_str() != here {
                        codes::LOG_DIR_NOT_FOUND
                    } else {
                        codes::NONE
                    };
                    AlterReplicaLogDirPartitionResult::default()
                        .with_partition_index(p)
                        .with_error_code(code)
                })
                .collect();
            results.push(
                AlterReplicaLogDirTopicResult::default()
                    .with_topic_name(t.name.clone())
                    .with_partitions(partitions),
            );
        }
    }
    encode(
        &AlterReplicaLogDirsResponse::default().with_results(results),
        version,
    )
}

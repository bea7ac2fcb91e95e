//! OffsetForLeaderEpoch (KIP-101, KIP-320): clients ask, for the leader
//! epoch of the records they last read, where that epoch's log ends, to
//! detect a truncation. A floe partition has one epoch, 0, for its whole
//! life (nothing is ever truncated: records are committed once, in order,
//! through the log), and Metadata and ListOffsets say 0.
//!
//! The answer for epoch 0 is the partition's end offset, and it must not
//! be a lagging broker's: a client positioned past it would see a
//! truncation and reset. So the request first reads the commit log to its
//! head (`Shard::sync_log`, one read however many partitions are asked),
//! and each partition's owning shard answers once it has applied that
//! entry — the end offset is then at least every offset acknowledged
//! before the request came. If the log cannot be read in time the answer
//! is OFFSET_NOT_AVAILABLE, which clients retry.
//!
//! Other epochs are answered as Kafka answers an epoch it does not know:
//! epoch and end offset -1. A client that believes the leader epoch is
//! newer than 0 gets UNKNOWN_LEADER_EPOCH (retried after a metadata
//! refresh).

use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};

use floe_engine::acls::{AclOperation, AclResourceType};
use floe_engine::shard::OffsetQuery;

use super::{encode, partition_key, Ctx, Reply};
use crate::codes;

/// The one leader epoch of every floe partition.
const EPOCH: i32 = 0;

pub async fn handle(ctx: &Ctx, req: OffsetForLeaderEpochRequest, version: i16) -> Reply {
    let snapshot = ctx.broker.engine.topics();
    // One read of the log for the whole request, and only if a partition
    // needs it.
    let mut synced = None;
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let readable = ctx.allowed(AclOperation::Describe, AclResourceType::Topic, &t.topic);
        let record = snapshot.get(t.topic.as_str()).filter(|_| readable);
        let mut partitions = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let out = EpochEndOffset::default()
                .with_partition(p.partition)
                .with_leader_epoch(-1)
                .with_end_offset(-1);
            let tp = partition_key(record.map(|r| &**r), p.partition);
            let out = match tp {
                None if !readable => out.with_error_code(codes::TOPIC_AUTHORIZATION_FAILED),
                None => out.with_error_code(codes::UNKNOWN_TOPIC_OR_PARTITION),
                Some(_) if p.current_leader_epoch > EPOCH => {
                    out.with_error_code(codes::UNKNOWN_LEADER_EPOCH)
                }
                Some(_) if p.leader_epoch != EPOCH => out,
                Some(tp) => {
                    if synced.is_none() {
                        synced = Some(ctx.shard.sync_log().await);
                    }
                    let answer = match synced.as_ref().expect("set above") {
                        Ok(seq) => ctx.shard.offsets(tp, OffsetQuery::LatestAfter(*seq)).await,
                        Err(e) => Err(e.clone()),
                    };
                    match answer {
                        Ok(a) => out
                            .with_leader_epoch(EPOCH)
                            .with_end_offset(a.high_watermark as i64),
                        Err(e) => out.with_error_code(codes::engine(&e)),
                    }
                }
            };
            partitions.push(out);
        }
        topics.push(
            OffsetForLeaderTopicResult::default()
                .with_topic(t.topic.clone())
                .with_partitions(partitions),
        );
    }
    encode(
        &OffsetForLeaderEpochResponse::default().with_topics(topics),
        version,
    )
}

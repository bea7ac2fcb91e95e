//! ListOffsets: earliest, latest (the last stable offset for
//! read_committed), by timestamp and max timestamp. Timestamp
//! lookups find the batch through the index, then the exact record inside
//! it by decoding that one batch.

use bytes::Bytes;
use floe_engine::acls::{AclOperation, AclResourceType};
use floe_engine::shard::OffsetQuery;
use kafka_protocol::messages::list_offsets_request::ListOffsetsRequest;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::records::RecordBatchDecoder;

use super::{encode, Ctx, Reply};
use crate::codes;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;
const EARLIEST_LOCAL: i64 = -4;

/// (offset, timestamp) of the first record at or after `ts`, or of the
/// record with the largest timestamp, inside one batch.
fn find_in_batch(batch: &Bytes, ts: Option<i64>) -> Option<(i64, i64)> {
    let mut buf = batch.clone();
    let set = RecordBatchDecoder::decode(&mut buf).ok()?;
    match ts {
        Some(ts) => set
            .records
            .iter()
            .find(|r| r.timestamp >= ts)
            .map(|r| (r.offset, r.timestamp)),
        None => {
            let max = set.records.iter().map(|r| r.timestamp).max()?;
            set.records
                .iter()
                .rev()
                .find(|r| r.timestamp == max)
                .map(|r| (r.offset, r.timestamp))
        }
    }
}

pub async fn handle(ctx: &Ctx, req: ListOffsetsRequest, version: i16) -> Reply {
    let snapshot = ctx.broker.engine.topics();
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let topic = snapshot.get(t.name.0.as_str()).cloned();
        let describable = ctx.allowed(AclOperation::Describe, AclResourceType::Topic, &t.name);
        let mut partitions = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let resp = ListOffsetsPartitionResponse::default()
                .with_partition_index(p.partition_index)
                .with_timestamp(-1)
                .with_offset(-1)
                .with_leader_epoch(if version >= 4 { 0 } else { -1 });
            if !describable {
                partitions.push(resp.with_error_code(codes::TOPIC_AUTHORIZATION_FAILED));
                continue;
            }
            let Some(tp) = super::partition_key(topic.as_deref(), p.partition_index) else {
                partitions.push(resp.with_error_code(codes::UNKNOWN_TOPIC_OR_PARTITION));
                continue;
            };
            let query = match p.timestamp {
                LATEST => OffsetQuery::Latest,
                EARLIEST | EARLIEST_LOCAL => OffsetQuery::Earliest,
                MAX_TIMESTAMP => OffsetQuery::MaxTimestamp,
                ts if ts >= 0 => OffsetQuery::Timestamp(ts),
                other => {
                    tracing::debug!(
                        timestamp = other,
                        "ListOffsets with an unknown special timestamp"
                    );
                    partitions.push(resp.with_error_code(codes::INVALID_REQUEST));
                    continue;
                }
            };
            let r = match ctx.shard.offsets(tp, query).await {
                Err(e) => resp.with_error_code(codes::engine(&e)),
                Ok(a) => match query {
                    // read_committed (v2+): the last stable offset.
                    OffsetQuery::Latest if req.isolation_level == codes::READ_COMMITTED => {
                        resp.with_offset(a.last_stable as i64)
                    }
                    OffsetQuery::Latest | OffsetQuery::LatestAfter(_) => {
                        resp.with_offset(a.high_watermark as i64)
                    }
                    OffsetQuery::Earliest => resp.with_offset(a.log_start as i64),
                    OffsetQuery::MaxTimestamp | OffsetQuery::Timestamp(_) => {
                        let ts = match query {
                            OffsetQuery::Timestamp(ts) => Some(ts),
                            _ => None,
                        };
                        match a.batch.and_then(|(_, b)| find_in_batch(&b, ts)) {
                            Some((offset, ts)) => resp.with_offset(offset).with_timestamp(ts),
                            None => resp,
                        }
                    }
                },
            };
            partitions.push(r);
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    encode(&ListOffsetsResponse::default().with_topics(topics), version)
}

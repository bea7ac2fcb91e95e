//! DeleteRecords: moves partitions' log start offsets forward, committed
//! through the log like retention (every broker applies it at the same
//! point). Segment objects are deleted later by the cleanup owner, once no
//! partition references them.

use floe_engine::acls::{AclOperation, AclResourceType};
use floe_engine::committer::LOG_ENTRY_TRIMS_MAX;
use floe_engine::shard::OffsetQuery;
use floe_meta::schema::TrimRecord;
use kafka_protocol::messages::delete_records_request::DeleteRecordsRequest;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};

use super::{encode, Ctx, Reply};
use crate::codes;

/// Offset -1: delete up to the high watermark.
const HIGH_WATERMARK: i64 = -1;

pub async fn handle(ctx: &Ctx, req: DeleteRecordsRequest, version: i16) -> Reply {
    let snapshot = ctx.broker.engine.topics();
    let asked: usize = req.topics.iter().map(|t| t.partitions.len()).sum();
    // Results by (topic, position); trims with where their answer goes.
    let mut results: Vec<(usize, Vec<DeleteRecordsPartitionResult>)> = Vec::new();
    let mut trims: Vec<(TrimRecord, (usize, usize))> = Vec::new();
    for (ti, t) in req.topics.iter().enumerate() {
        let topic = snapshot.get(t.name.0.as_str()).cloned();
        let mut partitions = Vec::with_capacity(t.partitions.len());
        let deletable = ctx.allowed(AclOperation::Delete, AclResourceType::Topic, &t.name);
        for p in &t.partitions {
            let resp = DeleteRecordsPartitionResult::default()
                .with_partition_index(p.partition_index)
                .with_low_watermark(-1);
            if !deletable {
                partitions.push(resp.with_error_code(codes::TOPIC_AUTHORIZATION_FAILED));
                continue;
            }
            if asked > LOG_ENTRY_TRIMS_MAX {
                // One log entry carries the whole request.
                partitions.push(resp.with_error_code(codes::INVALID_REQUEST));
                continue;
            }
            let Some(tp) = super::partition_key(topic.as_deref(), p.partition_index) else {
                partitions.push(resp.with_error_code(codes::UNKNOWN_TOPIC_OR_PARTITION));
                continue;
            };
            // The high watermark only grows, so an offset within this
            // broker's view is within the cluster's.
            let hwm = match ctx.shard.offsets(tp, OffsetQuery::Latest).await {
                Ok(a) => a.high_watermark,
                Err(e) => {
                    partitions.push(resp.with_error_code(codes::engine(&e)));
                    continue;
                }
            };
            let to = match p.offset {
                HIGH_WATERMARK => hwm,
                o if o >= 0 && (o as u64) <= hwm => o as u64,
                _ => {
                    partitions.push(resp.with_error_code(codes::OFFSET_OUT_OF_RANGE));
                    continue;
                }
            };
            trims.push((
                TrimRecord {
                    topic_id: tp.topic_id,
                    partition: tp.partition,
                    log_start: to,
                    forget: false,
                },
                (ti, partitions.len()),
            ));
            partitions.push(resp);
        }
        results.push((ti, partitions));
    }
    if !trims.is_empty() {
        let records = trims.iter().map(|(t, _)| *t).collect();
        match ctx.shard.delete_records(records).await {
            Ok(starts) => {
                for ((_, (ti, pi)), start) in trims.iter().zip(starts) {
                    results[*ti].1[*pi].low_watermark = start as i64;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "DeleteRecords commit failed");
                for (_, (ti, pi)) in &trims {
                    results[*ti].1[*pi].error_code = codes::engine(&e);
                }
            }
        }
    }
    let topics = req
        .topics
        .into_iter()
        .zip(results)
        .map(|(t, (_, partitions))| {
            DeleteRecordsTopicResult::default()
                .with_name(t.name)
                .with_partitions(partitions)
        })
        .collect();
    encode(
        &DeleteRecordsResponse::default().with_topics(topics),
        version,
    )
}

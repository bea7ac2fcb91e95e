//! Produce: validate each partition's batches in place, hand them to the
//! owning shard, and answer once their segment is durable and committed.

use floe_engine::batch::{self, BatchError};
use floe_engine::compact;
use floe_engine::sequencer::BatchOutcome;
use floe_engine::PartitionKey;
use futures::future::join_all;
use futures::FutureExt;
use kafka_protocol::messages::produce_request::ProduceRequest;
use kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, ProduceResponse, TopicProduceResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::{encode, Ctx, Pending, Reply};
use crate::codes;

fn partition_error(index: i32, code: i16, message: Option<String>) -> PartitionProduceResponse {
    PartitionProduceResponse::default()
        .with_index(index)
        .with_error_code(code)
        .with_base_offset(-1)
        .with_log_append_time_ms(-1)
        .with_log_start_offset(-1)
        .with_error_message(message.map(StrBytes::from_string))
}

/// The answer for one partition from its batches' outcomes: the first
/// batch's offset, or the first refusal.
fn answer(index: i32, outcomes: &[BatchOutcome]) -> PartitionProduceResponse {
    if let Some(bad) = outcomes.iter().find(|o| codes::outcome(o) != codes::NONE) {
        return partition_error(index, codes::outcome(bad), Some(format!("{bad:?}")));
    }
    let base = match outcomes.first() {
        Some(BatchOutcome::Appended { base_offset } | BatchOutcome::Duplicate { base_offset }) => {
            *base_offset as i64
        }
        _ => -1,
    };
    PartitionProduceResponse::default()
        .with_index(index)
        .with_base_offset(base)
        .with_log_append_time_ms(-1)
        .with_log_start_offset(0)
}

/// A compacted topic keeps the latest value per key: a record without a
/// key is refused (Kafka: INVALID_RECORD).
fn refuse_keyless(batches: &[batch::Batch], topic: &str, partition: i32) -> Result<(), BatchError> {
    for b in batches {
        match compact::all_keyed(&b.bytes) {
            Ok(true) => {}
            Ok(false) => {
                return Err(BatchError::Invalid {
                    reason: format!(
                    "compacted topic cannot accept a record without a key in {topic}-{partition}"
                ),
                })
            }
            Err(e) => {
                return Err(BatchError::Invalid {
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

pub async fn start(ctx: &Ctx, req: ProduceRequest, version: i16) -> Pending {
    let acks = req.acks;
    if req.transactional_id.is_some() || !matches!(acks, -1..=1) {
        let code = if matches!(acks, -1..=1) {
            codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED
        } else {
            codes::INVALID_REQUIRED_ACKS
        };
        let topics = req
            .topic_data
            .into_iter()
            .map(|t| {
                TopicProduceResponse::default()
                    .with_name(t.name)
                    .with_partition_responses(
                        t.partition_data
                            .iter()
                            .map(|p| partition_error(p.index, code, None))
                            .collect(),
                    )
            })
            .collect();
        let r = encode(&ProduceResponse::default().with_responses(topics), version);
        return async move { r }.boxed_local();
    }
    let engine = &ctx.broker.engine;
    let settings = &ctx.broker.settings;
    let snapshot = engine.topics();
    let mut topics = Vec::with_capacity(req.topic_data.len());
    for t in req.topic_data {
        let name = t.name.0.to_string();
        let topic = snapshot.get(&name).cloned();
        let mut parts = Vec::with_capacity(t.partition_data.len());
        for p in t.partition_data {
            let index = p.index;
            let Some(topic) = topic
                .as_ref()
                .filter(|tr| index >= 0 && (index as u32) < tr.partitions)
            else {
                parts.push(
                    async move { partition_error(index, codes::UNKNOWN_TOPIC_OR_PARTITION, None) }
                        .boxed_local(),
                );
                continue;
            };
            let records = p.records.unwrap_or_default();
            let limit = crate::topic_config::max_message_bytes(&topic.configs, settings);
            // Only `cleanup.policy` is read on the produce path.
            let compacted =
                compact::compacts(topic.configs.get("cleanup.policy").map(String::as_str));
            let validated = batch::validate(&records, limit).and_then(|batches| {
                if compacted {
                    refuse_keyless(&batches, &name, index)?;
                }
                Ok(batches)
            });
            match validated {
                Err(e) => {
                    tracing::debug!(topic = %name, partition = index, error = %e, "produce refused");
                    let code = codes::batch(&e);
                    let msg = e.to_string();
                    parts
                        .push(async move { partition_error(index, code, Some(msg)) }.boxed_local());
                }
                Ok(batches) => {
                    // The socket-to-frame copy is the only copy of payload
                    // bytes before upload.
                    ctx.shard
                        .counters()
                        .produce_copied_bytes
                        .add(records.len() as u64);
                    let tp = PartitionKey {
                        topic_id: topic.id,
                        partition: index as u32,
                    };
                    let idempotent = batches.iter().any(|b| b.header.is_idempotent());
                    let appended = ctx.shard.append(tp, batches).await;
                    parts.push(
                        async move {
                            match appended.await {
                                Ok(outcomes) => answer(index, &outcomes),
                                Err(e) => partition_error(
                                    index,
                                    codes::append(&e, idempotent),
                                    Some(e.to_string()),
                                ),
                            }
                        }
                        .boxed_local(),
                    );
                }
            }
        }
        topics.push((t.name, parts));
    }
    async move {
        let mut responses = Vec::with_capacity(topics.len());
        for (name, parts) in topics {
            let partition_responses = join_all(parts).await;
            responses.push(
                TopicProduceResponse::default()
                    .with_name(name)
                    .with_partition_responses(partition_responses),
            );
        }
        if acks == 0 {
            return Reply::Nothing;
        }
        encode(
            &ProduceResponse::default().with_responses(responses),
            version,
        )
    }
    .boxed_local()
}

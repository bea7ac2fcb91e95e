//! Produce: validate each partition's batches in place, hand them to the
//! owning shard, and answer once their segment is durable and committed.

use floe_engine::acls::{AclOperation, AclResourceType};
use floe_engine::batch::{self, BatchError};
use floe_engine::compact;
use floe_engine::sequencer::BatchOutcome;
use floe_engine::transactions::Verified;
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

/// The first Produce version that names topics by id (KIP-516).
const TOPIC_IDS_FROM: i16 = 13;

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

/// The same error for every partition of the request.
fn refuse_all(req: ProduceRequest, code: i16, message: Option<&str>, version: i16) -> Pending {
    let topics = req
        .topic_data
        .into_iter()
        .map(|t| {
            TopicProduceResponse::default()
                .with_name(t.name)
                .with_topic_id(t.topic_id)
                .with_partition_responses(
                    t.partition_data
                        .iter()
                        .map(|p| partition_error(p.index, code, message.map(str::to_string)))
                        .collect(),
                )
        })
        .collect();
    let r = encode(&ProduceResponse::default().with_responses(topics), version);
    async move { r }.boxed_local()
}

pub async fn start(ctx: &Ctx, req: ProduceRequest, version: i16) -> Pending {
    let acks = req.acks;
    if !matches!(acks, -1..=1) {
        return refuse_all(req, codes::INVALID_REQUIRED_ACKS, None, version);
    }
    let transactional_id = req
        .transactional_id
        .as_ref()
        .map(|t| t.0.to_string())
        .filter(|t| !t.is_empty());
    if let Some(id) = &transactional_id {
        if !ctx.allowed(AclOperation::Write, AclResourceType::TransactionalId, id) {
            return refuse_all(
                req,
                codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                Some("not authorized to write with this transactional id"),
                version,
            );
        }
    }
    let engine = &ctx.broker.engine;
    let effective = ctx.broker.effective();
    let snapshot = engine.topics();
    let by_id = engine.topics_by_id();
    // First every partition's batches are validated, then the
    // transactional ones verified (one read of the transaction's record),
    // and only then is anything appended, in request order.
    let mut checked = Vec::with_capacity(req.topic_data.len());
    let mut verify: Vec<(String, i32, i64, i16)> = Vec::new();
    let mut produced_bytes = 0u64;
    for t in req.topic_data {
        // v13 names topics by id only.
        let (name, topic) = if version >= TOPIC_IDS_FROM {
            let topic = by_id.get(&t.topic_id).cloned();
            (topic.as_ref().map(|t| t.name.clone()), topic)
        } else {
            let name = t.name.0.to_string();
            (Some(name.clone()), snapshot.get(&name).cloned())
        };
        let mut parts = Vec::with_capacity(t.partition_data.len());
        let refused = match &name {
            None => Some(codes::UNKNOWN_TOPIC_ID),
            Some(n) if !ctx.allowed(AclOperation::Write, AclResourceType::Topic, n) => {
                Some(codes::TOPIC_AUTHORIZATION_FAILED)
            }
            Some(_) => None,
        };
        let name = name.unwrap_or_default();
        for p in t.partition_data {
            let index = p.index;
            if let Some(code) = refused {
                parts.push((index, Err((code, None))));
                continue;
            }
            let Some(topic) = topic
                .as_ref()
                .filter(|tr| index >= 0 && (index as u32) < tr.partitions)
            else {
                parts.push((index, Err((codes::UNKNOWN_TOPIC_OR_PARTITION, None))));
                continue;
            };
            let records = p.records.unwrap_or_default();
            produced_bytes += records.len() as u64;
            let limit = crate::topic_config::max_message_bytes(&topic.configs, &effective);
            // Only `cleanup.policy` is read on the produce path.
            let compacted =
                compact::compacts(topic.configs.get("cleanup.policy").map(String::as_str));
            let validated = batch::validate(&records, limit).and_then(|batches| {
                if compacted {
                    refuse_keyless(&batches, &name, index)?;
                }
                Ok(batches)
            });
            let batches = match validated {
                Err(e) => {
                    tracing::debug!(topic = %name, partition = index, error = %e, "produce refused");
                    parts.push((index, Err((codes::batch(&e), Some(e.to_string())))));
                    continue;
                }
                Ok(batches) => batches,
            };
            if let Some(h) = batches
                .iter()
                .map(|b| b.header)
                .find(|h| h.is_transactional())
            {
                if transactional_id.is_none() {
                    parts.push((
                        index,
                        Err((
                            codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                            Some("transactional records without a transactional id".into()),
                        )),
                    ));
                    continue;
                }
                verify.push((name.clone(), index, h.producer_id, h.producer_epoch));
            }
            // The socket-to-frame copy is the only copy of payload bytes
            // before upload.
            ctx.shard
                .counters()
                .produce_copied_bytes
                .add(records.len() as u64);
            let tp = PartitionKey {
                topic_id: topic.id,
                partition: index as u32,
            };
            parts.push((index, Ok((tp, batches))));
        }
        checked.push((t.name, t.topic_id, name, parts));
    }
    let throttle_ms = ctx.throttle(crate::quota::Kind::Produce, produced_bytes);
    let refused = match (&transactional_id, verify.is_empty()) {
        (Some(id), false) => verified(ctx, id, &verify).await,
        _ => Vec::new(),
    };
    let mut topics = Vec::with_capacity(checked.len());
    for (asked_name, topic_id, name, parts) in checked {
        let mut answers = Vec::with_capacity(parts.len());
        for (index, part) in parts {
            let refusal = refused
                .iter()
                .find(|(t, p, _)| *p == index && *t == name)
                .map(|(_, _, code)| *code);
            let (tp, batches) = match (part, refusal) {
                (Err((code, msg)), _) => {
                    answers.push(async move { partition_error(index, code, msg) }.boxed_local());
                    continue;
                }
                (Ok(_), Some(code)) => {
                    let msg = Some("the partition is not part of the producer's open transaction (AddPartitionsToTxn first)".to_string());
                    answers.push(async move { partition_error(index, code, msg) }.boxed_local());
                    continue;
                }
                (Ok(ok), None) => ok,
            };
            let idempotent = batches.iter().any(|b| b.header.is_idempotent());
            let appended = ctx.shard.append(tp, batches).await;
            answers.push(
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
        topics.push((asked_name, topic_id, answers));
    }
    async move {
        let mut responses = Vec::with_capacity(topics.len());
        for (name, topic_id, parts) in topics {
            let partition_responses = join_all(parts).await;
            responses.push(
                TopicProduceResponse::default()
                    .with_name(name)
                    .with_topic_id(topic_id)
                    .with_partition_responses(partition_responses),
            );
        }
        if acks == 0 {
            return Reply::Nothing;
        }
        encode(
            &ProduceResponse::default()
                .with_responses(responses)
                .with_throttle_time_ms(throttle_ms),
            version,
        )
    }
    .boxed_local()
}

/// KIP-890 part 1: a transactional write is appended only to a partition
/// added to the producer's open transaction, so a late or stray batch
/// cannot open a transaction nobody will end. Returns the partitions
/// refused, with their error codes.
async fn verified(
    ctx: &Ctx,
    id: &str,
    writes: &[(String, i32, i64, i16)],
) -> Vec<(String, i32, i16)> {
    let mut refused = Vec::new();
    // Nearly always one producer and epoch per request.
    let mut producers: Vec<(i64, i16)> = writes.iter().map(|w| (w.2, w.3)).collect();
    producers.sort_unstable();
    producers.dedup();
    for (pid, epoch) in producers {
        let parts: Vec<(String, i32)> = writes
            .iter()
            .filter(|w| (w.2, w.3) == (pid, epoch))
            .map(|w| (w.0.clone(), w.1))
            .collect();
        let (key, asked) = (id.to_string(), parts.clone());
        let r = ctx
            .broker
            .engine
            .with_txns(move |t| async move { t.verify(&key, pid, epoch, &asked).await })
            .await;
        match r {
            Ok(v) => {
                for ((topic, p), v) in parts.into_iter().zip(v) {
                    match v {
                        Verified::Covered => {}
                        Verified::Fenced => refused.push((topic, p, codes::INVALID_PRODUCER_EPOCH)),
                        Verified::NotInTransaction => {
                            refused.push((topic, p, codes::INVALID_TXN_STATE))
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "verifying a transactional write failed");
                // Retriable: the producer sends the batch again.
                refused.extend(
                    parts
                        .into_iter()
                        .map(|(t, p)| (t, p, codes::NOT_ENOUGH_REPLICAS)),
                );
            }
        }
    }
    refused
}

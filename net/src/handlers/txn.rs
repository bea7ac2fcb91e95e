//! Transactions: AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit,
//! EndTxn, and the admin side (ListTransactions, DescribeTransactions,
//! DescribeProducers).
//! InitProducerId with a transactional id is in `admin`. Every broker
//! coordinates every transactional id (see `floe_engine::transactions`).

use floe_engine::acls::{AclOperation, AclResourceType};
use floe_engine::transactions::{Transactions, Verified};
use floe_engine::txn::PendingOffset;
use floe_engine::txn_store::TxnStoreError;
use floe_meta::schema::OffsetRecord;
use kafka_protocol::messages::add_offsets_to_txn_request::AddOffsetsToTxnRequest;
use kafka_protocol::messages::add_offsets_to_txn_response::AddOffsetsToTxnResponse;
use kafka_protocol::messages::add_partitions_to_txn_request::{
    AddPartitionsToTxnRequest, AddPartitionsToTxnTopic,
};
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResponse, AddPartitionsToTxnResult,
    AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::describe_producers_request::DescribeProducersRequest;
use kafka_protocol::messages::describe_producers_response::{
    DescribeProducersResponse, PartitionResponse, ProducerState, TopicResponse,
};
use kafka_protocol::messages::describe_transactions_request::DescribeTransactionsRequest;
use kafka_protocol::messages::describe_transactions_response::{
    DescribeTransactionsResponse, TopicData, TransactionState,
};
use kafka_protocol::messages::end_txn_request::EndTxnRequest;
use kafka_protocol::messages::end_txn_response::EndTxnResponse;
use kafka_protocol::messages::list_transactions_request::ListTransactionsRequest;
use kafka_protocol::messages::list_transactions_response::{self, ListTransactionsResponse};
use kafka_protocol::messages::txn_offset_commit_request::TxnOffsetCommitRequest;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponse, TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{ProducerId, TopicName, TransactionalId};
use kafka_protocol::protocol::StrBytes;

use super::{encode, Ctx, Reply};
use crate::codes;

/// The first version of each request that knows PRODUCER_FENCED.
const ADD_PARTITIONS_FENCED_FROM: i16 = 2;
const ADD_OFFSETS_FENCED_FROM: i16 = 2;
const END_TXN_FENCED_FROM: i16 = 2;
const TXN_OFFSET_COMMIT_FENCED_FROM: i16 = 3;
pub const INIT_PRODUCER_ID_FENCED_FROM: i16 = 4;

async fn on_txns<T, F, Fut>(ctx: &Ctx, f: F) -> Result<T, TxnStoreError>
where
    T: Send + 'static,
    F: FnOnce(std::sync::Arc<Transactions>) -> Fut,
    Fut: std::future::Future<Output = Result<T, TxnStoreError>> + Send + 'static,
{
    ctx.broker.engine.with_txns(f).await
}

fn partitions_of(topics: &[AddPartitionsToTxnTopic]) -> Vec<(String, i32)> {
    topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| (t.name.0.to_string(), *p)))
        .collect()
}

/// Every partition of `topics` answered `code`, or
/// UNKNOWN_TOPIC_OR_PARTITION for one that does not exist.
fn topic_results(
    ctx: &Ctx,
    topics: &[AddPartitionsToTxnTopic],
    code: impl Fn(&str, i32) -> i16,
) -> Vec<AddPartitionsToTxnTopicResult> {
    let snapshot = ctx.broker.engine.topics();
    each_partition(topics, |name, p| {
        let topic = snapshot.get(name);
        if super::partition_key(topic.map(|x| &**x), p).is_some() {
            code(name, p)
        } else {
            codes::UNKNOWN_TOPIC_OR_PARTITION
        }
    })
}

/// Every partition of `topics` answered `code(topic, partition)`.
fn each_partition(
    topics: &[AddPartitionsToTxnTopic],
    code: impl Fn(&str, i32) -> i16,
) -> Vec<AddPartitionsToTxnTopicResult> {
    topics
        .iter()
        .map(|t| {
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(
                    t.partitions
                        .iter()
                        .map(|&p| {
                            AddPartitionsToTxnPartitionResult::default()
                                .with_partition_index(p)
                                .with_partition_error_code(code(t.name.0.as_str(), p))
                        })
                        .collect(),
                )
        })
        .collect()
}

/// Whether every partition named exists (Kafka adds none of them
/// otherwise, and answers OPERATION_NOT_ATTEMPTED for the rest).
fn all_known(ctx: &Ctx, topics: &[AddPartitionsToTxnTopic]) -> bool {
    let snapshot = ctx.broker.engine.topics();
    topics.iter().all(|t| {
        let topic = snapshot.get(t.name.0.as_str());
        t.partitions
            .iter()
            .all(|&p| super::partition_key(topic.map(|x| &**x), p).is_some())
    })
}

/// One transaction's AddPartitionsToTxn (a client's, v0–3, or one entry of
/// a batched v4+ request, which may only verify).
async fn add_one(
    ctx: &Ctx,
    id: &str,
    producer_id: i64,
    epoch: i16,
    verify_only: bool,
    topics: &[AddPartitionsToTxnTopic],
    version: i16,
) -> Vec<AddPartitionsToTxnTopicResult> {
    if !ctx.allowed(AclOperation::Write, AclResourceType::TransactionalId, id) {
        return each_partition(topics, |_, _| codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
    }
    // Kafka adds nothing when one topic may not be written: that topic is
    // refused and the others are not attempted.
    let unwritable: Vec<&str> = topics
        .iter()
        .map(|t| t.name.0.as_str())
        .filter(|name| !ctx.allowed(AclOperation::Write, AclResourceType::Topic, name))
        .collect();
    if !unwritable.is_empty() {
        return each_partition(topics, |name, _| {
            if unwritable.contains(&name) {
                codes::TOPIC_AUTHORIZATION_FAILED
            } else {
                codes::OPERATION_NOT_ATTEMPTED
            }
        });
    }
    if !all_known(ctx, topics) {
        return topic_results(ctx, topics, |_, _| codes::OPERATION_NOT_ATTEMPTED);
    }
    let parts = partitions_of(topics);
    let id = id.to_string();
    if verify_only {
        let asked = parts.clone();
        let r = on_txns(ctx, move |t| async move {
            t.verify(&id, producer_id, epoch, &asked).await
        })
        .await;
        return match r {
            Ok(verified) => topic_results(ctx, topics, |name, p| {
                let i = parts.iter().position(|(n, q)| n == name && *q == p);
                match i.map(|i| verified[i]) {
                    Some(Verified::Covered) => codes::NONE,
                    Some(Verified::Fenced) => codes::INVALID_PRODUCER_EPOCH,
                    _ => codes::INVALID_TXN_STATE,
                }
            }),
            Err(e) => {
                let code = codes::txn(&e, version, ADD_PARTITIONS_FENCED_FROM);
                topic_results(ctx, topics, |_, _| code)
            }
        };
    }
    let r = on_txns(ctx, move |t| async move {
        t.add(&id, producer_id, epoch, &parts, &[]).await
    })
    .await;
    let code = match r {
        Ok(()) => codes::NONE,
        Err(e) => codes::txn(&e, version, ADD_PARTITIONS_FENCED_FROM),
    };
    topic_results(ctx, topics, |_, _| code)
}

pub async fn add_partitions(ctx: &Ctx, req: AddPartitionsToTxnRequest, version: i16) -> Reply {
    let resp = AddPartitionsToTxnResponse::default();
    if version < 4 {
        let results = add_one(
            ctx,
            req.v3_and_below_transactional_id.0.as_str(),
            req.v3_and_below_producer_id.0,
            req.v3_and_below_producer_epoch,
            false,
            &req.v3_and_below_topics,
            version,
        )
        .await;
        return encode(&resp.with_results_by_topic_v3_and_below(results), version);
    }
    // v4+ is the batched form brokers send each other (KIP-890).
    if !ctx.allowed_on_cluster(AclOperation::ClusterAction) {
        return encode(
            &resp.with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED),
            version,
        );
    }
    let mut out = Vec::with_capacity(req.transactions.len());
    for t in &req.transactions {
        let results = add_one(
            ctx,
            t.transactional_id.0.as_str(),
            t.producer_id.0,
            t.producer_epoch,
            t.verify_only,
            &t.topics,
            version,
        )
        .await;
        out.push(
            AddPartitionsToTxnResult::default()
                .with_transactional_id(t.transactional_id.clone())
                .with_topic_results(results),
        );
    }
    encode(&resp.with_results_by_transaction(out), version)
}

pub async fn add_offsets(ctx: &Ctx, req: AddOffsetsToTxnRequest, version: i16) -> Reply {
    let id = req.transactional_id.0.to_string();
    let group = req.group_id.0.to_string();
    let (pid, epoch) = (req.producer_id.0, req.producer_epoch);
    let code = if !ctx.allowed(AclOperation::Write, AclResourceType::TransactionalId, &id) {
        codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    } else if !ctx.allowed(AclOperation::Read, AclResourceType::Group, &group) {
        codes::GROUP_AUTHORIZATION_FAILED
    } else if group.is_empty() {
        codes::INVALID_GROUP_ID
    } else {
        match on_txns(ctx, move |t| async move {
            t.add(&id, pid, epoch, &[], &[group]).await
        })
        .await
        {
            Ok(()) => codes::NONE,
            Err(e) => codes::txn(&e, version, ADD_OFFSETS_FENCED_FROM),
        }
    };
    encode(
        &AddOffsetsToTxnResponse::default().with_error_code(code),
        version,
    )
}

pub async fn end(ctx: &Ctx, req: EndTxnRequest, version: i16) -> Reply {
    let id = req.transactional_id.0.to_string();
    if !ctx.allowed(AclOperation::Write, AclResourceType::TransactionalId, &id) {
        return encode(
            &EndTxnResponse::default()
                .with_error_code(codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED),
            version,
        );
    }
    let (pid, epoch, commit) = (req.producer_id.0, req.producer_epoch, req.committed);
    let r = on_txns(
        ctx,
        move |t| async move { t.end(&id, pid, epoch, commit).await },
    )
    .await;
    let code = match r {
        Ok(()) => codes::NONE,
        Err(e) => codes::txn(&e, version, END_TXN_FENCED_FROM),
    };
    encode(&EndTxnResponse::default().with_error_code(code), version)
}

pub async fn offset_commit(ctx: &Ctx, req: TxnOffsetCommitRequest, version: i16) -> Reply {
    let group = req.group_id.0.to_string();
    // Every partition answered its topic's code.
    let answer_by_topic = |code: &dyn Fn(&str) -> i16| -> Reply {
        let topics = req
            .topics
            .iter()
            .map(|t| {
                let code = code(t.name.0.as_str());
                TxnOffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                TxnOffsetCommitResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(code)
                            })
                            .collect(),
                    )
            })
            .collect();
        encode(
            &TxnOffsetCommitResponse::default().with_topics(topics),
            version,
        )
    };
    let answer = |code: i16| answer_by_topic(&|_| code);
    if !ctx.allowed(
        AclOperation::Write,
        AclResourceType::TransactionalId,
        &req.transactional_id,
    ) {
        return answer(codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
    }
    if !ctx.allowed(AclOperation::Read, AclResourceType::Group, &group) {
        return answer(codes::GROUP_AUTHORIZATION_FAILED);
    }
    let unreadable: Vec<&str> = req
        .topics
        .iter()
        .map(|t| t.name.0.as_str())
        .filter(|name| !ctx.allowed(AclOperation::Read, AclResourceType::Topic, name))
        .collect();
    if !unreadable.is_empty() {
        // Kafka answers the unreadable topics and commits the others; a
        // transaction's offsets are staged together here, so none are.
        return answer_by_topic(&|name| {
            if unreadable.contains(&name) {
                codes::TOPIC_AUTHORIZATION_FAILED
            } else {
                codes::OPERATION_NOT_ATTEMPTED
            }
        });
    }
    if group.is_empty() {
        return answer(codes::INVALID_GROUP_ID);
    }
    // KIP-447: the member and generation must be the group's current
    // ones, so a consumer that lost its partitions cannot commit for them.
    // A request without them (generation -1, older clients) is not
    // checked, as in Kafka.
    if req.generation_id >= 0 || !req.member_id.is_empty() {
        let (g, member) = (group.clone(), req.member_id.to_string());
        let instance = req.group_instance_id.as_ref().map(|i| i.to_string());
        let generation = req.generation_id;
        let checked = ctx
            .broker
            .engine
            .with_groups(move |c| async move {
                c.check_txn_commit(&g, &member, generation, instance.as_deref())
                    .await
            })
            .await;
        if let Err(e) = checked {
            return answer(codes::coordinator(&e));
        }
    }
    let now = floe_engine::health::now_ms() as i64;
    let offsets: Vec<PendingOffset> = req
        .topics
        .iter()
        .flat_map(|t| {
            let group = group.clone();
            t.partitions.iter().map(move |p| PendingOffset {
                group: group.clone(),
                topic: t.name.0.to_string(),
                partition: p.partition_index,
                record: OffsetRecord {
                    offset: p.committed_offset,
                    leader_epoch: p.committed_leader_epoch,
                    metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
                    commit_ms: now,
                },
            })
        })
        .collect();
    let id = req.transactional_id.0.to_string();
    let (pid, epoch) = (req.producer_id.0, req.producer_epoch);
    let r = on_txns(ctx, move |t| async move {
        t.stage_offsets(&id, pid, epoch, &group, offsets).await
    })
    .await;
    answer(match r {
        Ok(()) => codes::NONE,
        Err(e) => codes::txn(&e, version, TXN_OFFSET_COMMIT_FENCED_FROM),
    })
}

pub async fn describe(ctx: &Ctx, req: DescribeTransactionsRequest, version: i16) -> Reply {
    let mut out = Vec::with_capacity(req.transactional_ids.len());
    for id in req.transactional_ids {
        let key = id.0.to_string();
        let state = TransactionState::default().with_transactional_id(id.clone());
        if !ctx.allowed(
            AclOperation::Describe,
            AclResourceType::TransactionalId,
            &key,
        ) {
            out.push(
                state
                    .with_error_code(codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1),
            );
            continue;
        }
        let r = on_txns(ctx, move |t| async move { t.describe(&key).await }).await;
        out.push(match r {
            Ok(Some(rec)) => {
                let mut by_topic: Vec<TopicData> = Vec::new();
                for (topic, p) in &rec.partitions {
                    // Only the topics the principal may describe are shown.
                    if !ctx.may(AclOperation::Describe, AclResourceType::Topic, topic) {
                        continue;
                    }
                    match by_topic.last_mut() {
                        Some(t) if t.topic.0.as_str() == topic => t.partitions.push(*p),
                        _ => by_topic.push(
                            TopicData::default()
                                .with_topic(TopicName(StrBytes::from_string(topic.clone())))
                                .with_partitions(vec![*p]),
                        ),
                    }
                }
                state
                    .with_transaction_state(StrBytes::from_static_str(rec.state.as_str()))
                    .with_transaction_timeout_ms(rec.timeout_ms)
                    .with_transaction_start_time_ms(rec.started_ms)
                    .with_producer_id(ProducerId(rec.producer_id))
                    .with_producer_epoch(rec.epoch)
                    .with_topics(by_topic)
            }
            Ok(None) => state
                .with_error_code(codes::TRANSACTIONAL_ID_NOT_FOUND)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
            Err(e) => state
                .with_error_code(codes::txn(&e, version, 0))
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        });
    }
    encode(
        &DescribeTransactionsResponse::default().with_transaction_states(out),
        version,
    )
}

pub async fn describe_producers(ctx: &Ctx, req: DescribeProducersRequest, version: i16) -> Reply {
    let snapshot = ctx.broker.engine.topics();
    // Every partition asked for that exists, in request order.
    let wanted: Vec<Vec<Option<floe_engine::PartitionKey>>> = req
        .topics
        .iter()
        .map(|t| {
            let topic = snapshot
                .get(t.name.0.as_str())
                .filter(|_| ctx.allowed(AclOperation::Read, AclResourceType::Topic, &t.name));
            t.partition_indexes
                .iter()
                .map(|&p| super::partition_key(topic.map(|x| &**x), p))
                .collect()
        })
        .collect();
    let known: Vec<floe_engine::PartitionKey> =
        wanted.iter().flatten().flatten().copied().collect();
    let described = ctx.broker.engine.describe_producers(known).await;
    let mut described = match described {
        Ok(d) => Ok(d.into_iter()),
        Err(e) => Err(codes::engine(&e)),
    };
    let topics = req
        .topics
        .iter()
        .zip(wanted)
        .map(|(t, parts)| {
            let partitions = t
                .partition_indexes
                .iter()
                .zip(parts)
                .map(|(&index, tp)| {
                    let out = PartitionResponse::default().with_partition_index(index);
                    if tp.is_none() {
                        return out.with_error_code(
                            if ctx.may(AclOperation::Read, AclResourceType::Topic, &t.name) {
                                codes::UNKNOWN_TOPIC_OR_PARTITION
                            } else {
                                codes::TOPIC_AUTHORIZATION_FAILED
                            },
                        );
                    }
                    match &mut described {
                        Err(code) => out.with_error_code(*code),
                        Ok(it) => out.with_active_producers(
                            it.next()
                                .unwrap_or_default()
                                .into_iter()
                                .map(|p| {
                                    ProducerState::default()
                                        .with_producer_id(ProducerId(p.producer_id))
                                        .with_producer_epoch(i32::from(p.epoch))
                                        .with_last_sequence(p.last_sequence)
                                        .with_last_timestamp(p.last_seen_ms)
                                        .with_coordinator_epoch(-1)
                                        .with_current_txn_start_offset(p.txn_first_offset)
                                })
                                .collect(),
                        ),
                    }
                })
                .collect();
            TopicResponse::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    encode(
        &DescribeProducersResponse::default().with_topics(topics),
        version,
    )
}

pub async fn list(ctx: &Ctx, req: ListTransactionsRequest, version: i16) -> Reply {
    const STATES: [&str; 6] = [
        "Empty",
        "Ongoing",
        "PrepareCommit",
        "PrepareAbort",
        "CompleteCommit",
        "CompleteAbort",
    ];
    let unknown: Vec<StrBytes> = req
        .state_filters
        .iter()
        .filter(|s| !STATES.contains(&s.as_str()))
        .cloned()
        .collect();
    let r = on_txns(ctx, |t| async move { t.list().await }).await;
    let resp = ListTransactionsResponse::default().with_unknown_state_filters(unknown);
    let listed = match r {
        Ok(l) => l,
        Err(e) => return encode(&resp.with_error_code(codes::txn(&e, version, 0)), version),
    };
    let now = floe_engine::health::now_ms() as i64;
    let states = listed
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| {
            let r = &t.record;
            (req.state_filters.is_empty()
                || req.state_filters.iter().any(|s| s.as_str() == r.state.as_str()))
                && (req.producer_id_filters.is_empty()
                    || req.producer_id_filters.contains(&ProducerId(r.producer_id)))
                // v1: only transactions running longer than this (ms).
                // Only the ids the principal may describe, silently.
                && ctx.may(AclOperation::Describe, AclResourceType::TransactionalId, &t.transactional_id)
                && (req.duration_filter < 0
                    || (r.state == floe_engine::txn::TxnState::Ongoing
                        && now.saturating_sub(r.started_ms) >= req.duration_filter))
        })
        .map(|t| {
            list_transactions_response::TransactionState::default()
                .with_transactional_id(TransactionalId(StrBytes::from_string(t.transactional_id)))
                .with_producer_id(ProducerId(t.record.producer_id))
                .with_transaction_state(StrBytes::from_static_str(t.record.state.as_str()))
        })
        .collect();
    encode(&resp.with_transaction_states(states), version)
}

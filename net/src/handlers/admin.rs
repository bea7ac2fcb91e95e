//! ApiVersions, topic administration, configs, cluster and producer ids.

use floe_engine::acls::{AclOperation, AclResourceType, CLUSTER_NAME};
use std::collections::BTreeMap;

use kafka_protocol::messages::api_versions_response::{ApiVersion, ApiVersionsResponse};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsRequest;
use kafka_protocol::messages::create_partitions_response::{
    CreatePartitionsResponse, CreatePartitionsTopicResult,
};
use kafka_protocol::messages::create_topics_request::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicsRequest;
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
};
use kafka_protocol::messages::describe_cluster_response::{
    DescribeClusterBroker, DescribeClusterResponse,
};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsRequest;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResponse, DescribeConfigsResult,
};
use kafka_protocol::messages::init_producer_id_request::InitProducerIdRequest;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::{BrokerId, ProducerId, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::{encode, Ctx, Reply};
use crate::apis::SUPPORTED;
use crate::codes;
use crate::topic_config::{self, ConfigSource};

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

fn api_list() -> Vec<ApiVersion> {
    SUPPORTED
        .iter()
        .map(|&(k, lo, hi)| {
            ApiVersion::default()
                .with_api_key(k as i16)
                .with_min_version(lo)
                .with_max_version(hi)
        })
        .collect()
}

pub fn api_versions(version: i16) -> Reply {
    encode(
        &ApiVersionsResponse::default().with_api_keys(api_list()),
        version,
    )
}

pub fn api_versions_error(code: i16) -> Reply {
    encode(
        &ApiVersionsResponse::default()
            .with_error_code(code)
            .with_api_keys(api_list()),
        0,
    )
}

fn message(e: &floe_engine::Error) -> Option<StrBytes> {
    Some(s(e.to_string()))
}

pub async fn create_topics(ctx: &Ctx, req: CreateTopicsRequest, version: i16) -> Reply {
    let broker = &ctx.broker;
    let mut results = Vec::with_capacity(req.topics.len());
    // CREATE on the cluster allows every topic; else each topic's own.
    let cluster_create = ctx.may(AclOperation::Create, AclResourceType::Cluster, CLUSTER_NAME);
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut result = CreatableTopicResult::default()
            .with_name(t.name.clone())
            .with_num_partitions(-1)
            .with_replication_factor(-1);
        if !cluster_create && !ctx.allowed(AclOperation::Create, AclResourceType::Topic, &name) {
            results.push(
                result
                    .with_error_code(codes::TOPIC_AUTHORIZATION_FAILED)
                    .with_error_message(Some(s(format!(
                        "not authorized to create topic {name:?}"
                    )))),
            );
            continue;
        }
        let partitions = if !t.assignments.is_empty() {
            t.assignments.len() as i32
        } else if t.num_partitions == -1 {
            broker.effective().num_partitions as i32
        } else {
            t.num_partitions
        };
        if t.replication_factor == 0 || t.replication_factor < -1 {
            results.push(
                result
                    .with_error_code(codes::INVALID_REPLICATION_FACTOR)
                    .with_error_message(Some(s(format!(
                        "replication factor {} must be positive or -1",
                        t.replication_factor
                    )))),
            );
            continue;
        }
        let mut configs = BTreeMap::new();
        let mut bad = None;
        for c in &t.configs {
            // A null value means "use the default".
            let Some(v) = c.value.as_ref().map(|v| v.to_string()) else {
                continue;
            };
            let key = c.name.to_string();
            match topic_config::validate(&key, &v) {
                Ok(()) => {
                    configs.insert(key, v);
                }
                Err(reason) => bad = Some(reason),
            }
        }
        if let Some(reason) = bad {
            results.push(
                result
                    .with_error_code(codes::INVALID_CONFIG)
                    .with_error_message(Some(s(reason))),
            );
            continue;
        }
        if partitions <= 0 {
            let e = floe_engine::Error::InvalidPartitions {
                reason: format!("{partitions} partitions; must be at least 1"),
            };
            results.push(
                result
                    .with_error_code(codes::engine(&e))
                    .with_error_message(message(&e)),
            );
            continue;
        }
        let created = broker
            .engine
            .create_topic(&name, partitions as u32, configs, req.validate_only)
            .await;
        match created {
            Ok(rec) => {
                result = result
                    .with_topic_id(if req.validate_only {
                        Default::default()
                    } else {
                        rec.id
                    })
                    .with_num_partitions(rec.partitions as i32)
                    .with_replication_factor(1);
                // The configs are shown to who may describe them (Kafka
                // answers TOPIC_AUTHORIZATION_FAILED in their error field).
                let configs_visible =
                    ctx.may(AclOperation::DescribeConfigs, AclResourceType::Topic, &name);
                if version >= 5 && !configs_visible {
                    result = result.with_topic_config_error_code(codes::TOPIC_AUTHORIZATION_FAILED);
                } else if version >= 5 {
                    let configs = topic_config::describe(&rec.configs, &broker.effective())
                        .into_iter()
                        .map(|c| {
                            CreatableTopicConfigs::default()
                                .with_name(s(c.name))
                                .with_value(Some(s(c.value)))
                                .with_read_only(false)
                                .with_config_source(c.source as i8)
                        })
                        .collect();
                    result = result.with_configs(Some(configs));
                }
                if !req.validate_only {
                    tracing::info!(topic = %name, partitions, "topic created");
                }
                results.push(result);
            }
            Err(e) => results.push(
                result
                    .with_error_code(codes::engine(&e))
                    .with_error_message(message(&e)),
            ),
        }
    }
    encode(
        &CreateTopicsResponse::default().with_topics(results),
        version,
    )
}

pub async fn delete_topics(ctx: &Ctx, req: DeleteTopicsRequest, version: i16) -> Reply {
    let engine = &ctx.broker.engine;
    let mut names: Vec<(Option<String>, uuid::Uuid)> = req
        .topic_names
        .iter()
        .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
        .collect();
    for t in &req.topics {
        names.push((t.name.as_ref().map(|n| n.0.to_string()), t.topic_id));
    }
    let mut responses = Vec::new();
    let by_id = engine.topics_by_id();
    for (name, id) in names {
        let mut r = DeletableTopicResult::default()
            .with_name(name.clone().map(|n| TopicName(s(n))))
            .with_topic_id(id);
        if name.is_some() && !id.is_nil() {
            responses.push(
                r.with_error_code(codes::INVALID_REQUEST)
                    .with_error_message(Some(s("name a topic by its name or its id, not both"))),
            );
            continue;
        }
        let resolved = name
            .clone()
            .or_else(|| by_id.get(&id).map(|t| t.name.clone()));
        // Kafka: without DESCRIBE the topic's existence is not revealed;
        // with it but without DELETE, the deletion is refused.
        let refused = resolved.as_deref().is_some_and(|n| {
            !ctx.may(AclOperation::Describe, AclResourceType::Topic, n)
                || !ctx.allowed(AclOperation::Delete, AclResourceType::Topic, n)
        });
        if refused {
            r = r.with_error_code(codes::TOPIC_AUTHORIZATION_FAILED);
            responses.push(r);
            continue;
        }
        match resolved {
            // A deleted topic's id stays unknown, even once a topic of
            // the same name is created again (with a new id).
            None if name.is_none() => r = r.with_error_code(codes::UNKNOWN_TOPIC_ID),
            None => r = r.with_error_code(codes::UNKNOWN_TOPIC_OR_PARTITION),
            Some(n) => match engine.delete_topic(&n).await {
                Ok(rec) => {
                    tracing::info!(topic = %n, "topic deleted");
                    r = r.with_topic_id(rec.id).with_name(Some(TopicName(s(n))));
                }
                Err(e) => {
                    r = r
                        .with_error_code(codes::engine(&e))
                        .with_error_message(message(&e))
                }
            },
        }
        responses.push(r);
    }
    encode(
        &DeleteTopicsResponse::default().with_responses(responses),
        version,
    )
}

pub async fn create_partitions(ctx: &Ctx, req: CreatePartitionsRequest, version: i16) -> Reply {
    let engine = &ctx.broker.engine;
    let mut results = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let count = t.count;
        let validate_only = req.validate_only;
        let r = if !ctx.allowed(AclOperation::Alter, AclResourceType::Topic, &name) {
            results.push(
                CreatePartitionsTopicResult::default()
                    .with_name(t.name)
                    .with_error_code(codes::TOPIC_AUTHORIZATION_FAILED)
                    .with_error_message(Some(s(format!("not authorized to alter topic {name:?}")))),
            );
            continue;
        } else if count <= 0 {
            Err(floe_engine::Error::InvalidPartitions {
                reason: format!("partition count {count} must be positive"),
            })
        } else {
            engine
                .add_partitions(&name, count as u32, validate_only)
                .await
        };
        let mut res = CreatePartitionsTopicResult::default().with_name(t.name);
        if let Err(e) = r {
            res = res
                .with_error_code(codes::engine(&e))
                .with_error_message(message(&e));
        }
        results.push(res);
    }
    encode(
        &CreatePartitionsResponse::default().with_results(results),
        version,
    )
}

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;

/// DescribeConfigs. A topic's configs are read from the metadata store, so
/// that a change made through any broker a moment ago is seen; once one
/// such read fails (the store away or slow), the rest of the request
/// answers this broker's view, so that it waits for the store at most
/// once (2 s) in all.
pub async fn describe_configs(ctx: &Ctx, req: DescribeConfigsRequest, version: i16) -> Reply {
    let settings = &ctx.broker.settings;
    let mut store_answers = true;
    let effective = ctx.broker.effective();
    let mut results = Vec::new();
    for r in req.resources {
        let name = r.resource_name.to_string();
        let mut res = DescribeConfigsResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name.clone());
        let entries = match r.resource_type {
            RESOURCE_TOPIC
                if !ctx.allowed(AclOperation::DescribeConfigs, AclResourceType::Topic, &name) =>
            {
                res = res.with_error_code(codes::TOPIC_AUTHORIZATION_FAILED);
                None
            }
            RESOURCE_BROKER if !ctx.allowed_on_cluster(AclOperation::DescribeConfigs) => {
                res = res.with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED);
                None
            }
            RESOURCE_TOPIC => match topic_for_describe(ctx, &name, &mut store_answers).await {
                Some(t) => Some(topic_config::describe(&t.configs, &effective)),
                None => {
                    res = res
                        .with_error_code(codes::UNKNOWN_TOPIC_OR_PARTITION)
                        .with_error_message(Some(s(format!("topic {name:?} does not exist"))));
                    None
                }
            },
            RESOURCE_BROKER => {
                if name.is_empty() {
                    let all = ctx.broker.engine.broker_configs();
                    let set = all.get(floe_meta::schema::BROKER_CONFIGS_DEFAULT);
                    Some(topic_config::describe_broker_defaults(
                        set.unwrap_or(&Default::default()),
                    ))
                } else if name == settings.node_id.to_string() {
                    Some(topic_config::describe_broker(&ctx.broker))
                } else {
                    res = res
                        .with_error_code(codes::INVALID_REQUEST)
                        .with_error_message(Some(s(format!("broker {name:?} is not this broker"))));
                    None
                }
            }
            other => {
                res = res
                    .with_error_code(codes::INVALID_REQUEST)
                    .with_error_message(Some(s(format!("resource type {other} is not supported"))));
                None
            }
        };
        if let Some(entries) = entries {
            let wanted = r.configuration_keys.as_ref();
            res = res.with_configs(
                entries
                    .into_iter()
                    .filter(|c| wanted.is_none_or(|w| w.iter().any(|k| k.as_str() == c.name)))
                    .map(|c| {
                        let read_only = c.source == ConfigSource::StaticBroker
                            && topic_config::is_static_broker(&c.name);
                        DescribeConfigsResourceResult::default()
                            .with_name(s(c.name))
                            .with_value(Some(s(c.value)))
                            // Topic configs and the dynamic broker configs
                            // can be altered; the others are fixed at start.
                            .with_read_only(read_only)
                            .with_config_source(c.source as i8)
                            .with_config_type(c.kind as i8)
                            .with_documentation(req.include_documentation.then(|| s(c.doc)))
                    })
                    .collect(),
            );
        }
        results.push(res);
    }
    encode(
        &DescribeConfigsResponse::default().with_results(results),
        version,
    )
}

/// Topic `name` from the metadata store while it answers, else as this
/// broker last saw it (and `store_answers` turns false).
async fn topic_for_describe(
    ctx: &Ctx,
    name: &str,
    store_answers: &mut bool,
) -> Option<std::sync::Arc<floe_meta::schema::TopicRecord>> {
    let engine = &ctx.broker.engine;
    if *store_answers {
        match engine.topic_fresh(name).await {
            Ok(t) => return t,
            Err(e) => {
                tracing::debug!(
                    topic = name,
                    "DescribeConfigs answers this broker's view: {e}"
                );
                *store_answers = false;
            }
        }
    }
    engine.topic(name)
}

pub fn describe_cluster(ctx: &Ctx, include_operations: bool, version: i16) -> Reply {
    let brokers = crate::discovery::visible_brokers(&ctx.broker, &ctx.client);
    encode(
        &DescribeClusterResponse::default()
            .with_endpoint_type(1)
            .with_cluster_id(s(ctx.broker.engine.cluster_id().to_string()))
            .with_controller_id(BrokerId(
                brokers
                    .first()
                    .map_or(ctx.broker.settings.node_id, |b| b.node_id),
            ))
            .with_cluster_authorized_operations(if include_operations {
                ctx.authorized_operations(AclResourceType::Cluster, CLUSTER_NAME)
            } else {
                i32::MIN
            })
            .with_brokers(
                brokers
                    .iter()
                    .map(|b| {
                        DescribeClusterBroker::default()
                            .with_broker_id(BrokerId(b.node_id))
                            .with_host(s(b.host.clone()))
                            .with_port(i32::from(b.port))
                            .with_rack(b.rack.clone().map(s))
                    })
                    .collect(),
            ),
        version,
    )
}

pub async fn init_producer_id(ctx: &Ctx, req: InitProducerIdRequest, version: i16) -> Reply {
    let resp = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if let Some(id) = req.transactional_id.as_ref().filter(|id| !id.is_empty()) {
        let id = id.0.to_string();
        if !ctx.allowed(AclOperation::Write, AclResourceType::TransactionalId, &id) {
            return encode(
                &resp.with_error_code(codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED),
                version,
            );
        }
        let timeout = req.transaction_timeout_ms;
        // KIP-360: a client that already holds an id and epoch says so.
        let expected = (req.producer_id.0 >= 0).then_some((req.producer_id.0, req.producer_epoch));
        let r = ctx
            .broker
            .engine
            .with_txns(move |t| async move { t.init(&id, timeout, expected).await })
            .await;
        return encode(
            &match r {
                Ok((pid, epoch)) => resp
                    .with_producer_id(ProducerId(pid))
                    .with_producer_epoch(epoch),
                Err(e) => resp.with_error_code(codes::txn(
                    &e,
                    version,
                    super::txn::INIT_PRODUCER_ID_FENCED_FROM,
                )),
            },
            version,
        );
    }
    // An idempotent producer: IDEMPOTENT_WRITE on the cluster, or WRITE
    // on some topic (Kafka 2.8+, KIP-679).
    if !ctx.may(
        AclOperation::IdempotentWrite,
        AclResourceType::Cluster,
        CLUSTER_NAME,
    ) && !ctx.allowed_on_any(AclOperation::Write, AclResourceType::Topic)
    {
        return encode(
            &resp.with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED),
            version,
        );
    }
    let engine = ctx.broker.engine.clone();
    let (pid, epoch) = (req.producer_id.0, req.producer_epoch);
    let r = engine.init_producer_id(pid, epoch).await;
    match r {
        Ok((pid, epoch)) => encode(
            &resp
                .with_producer_id(ProducerId(pid))
                .with_producer_epoch(epoch),
            version,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "InitProducerId failed");
            encode(&resp.with_error_code(codes::engine(&e)), version)
        }
    }
}

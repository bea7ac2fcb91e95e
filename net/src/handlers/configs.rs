//! IncrementalAlterConfigs and AlterConfigs: topic configs changed the
//! way `kafka-configs --alter` and the admin clients change them. A
//! topic's configs live in its record in the metadata store; a change is
//! one compare-and-swap, and every broker follows the topic records, so
//! retention, compaction and produce limits use it within the watch delay.
//!
//! Broker configs are static in floe (flags, environment, config file):
//! altering one is refused with a message saying so.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, IncrementalAlterConfigsRequest,
    IncrementalAlterConfigsResponse,
};
use kafka_protocol::protocol::StrBytes;

use floe_engine::acls::{AclOperation, AclResourceType};

use super::{encode, Ctx, Reply};
use crate::codes;
use crate::topic_config::{self, ConfigOp};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const RESOURCE_BROKER_LOGGER: i8 = 8;

/// What one resource's alteration asks for.
enum Change {
    /// IncrementalAlterConfigs: these operations on the current configs.
    Incremental(Vec<(String, ConfigOp)>),
    /// AlterConfigs: exactly these configs, the others back to defaults.
    Replace(BTreeMap<String, String>),
}

/// Alters one resource; the error code and message of its answer.
async fn alter_resource(
    ctx: &Ctx,
    resource_type: i8,
    name: &str,
    change: Result<Change, String>,
    validate_only: bool,
) -> (i16, Option<String>) {
    match resource_type {
        RESOURCE_TOPIC => {
            if !ctx.allowed(AclOperation::AlterConfigs, AclResourceType::Topic, name) {
                return (codes::TOPIC_AUTHORIZATION_FAILED, None);
            }
        }
        RESOURCE_BROKER | RESOURCE_BROKER_LOGGER => {
            if !ctx.allowed_on_cluster(AclOperation::AlterConfigs) {
                return (codes::CLUSTER_AUTHORIZATION_FAILED, None);
            }
            return (
                codes::INVALID_REQUEST,
                Some(
                    "floe's broker configs are static: set them with flags, FLOE_* variables or the config file, and restart"
                        .into(),
                ),
            );
        }
        other => {
            return (
                codes::INVALID_REQUEST,
                Some(format!("resource type {other} has no configs to alter")),
            )
        }
    }
    let change = match change {
        Ok(c) => c,
        Err(why) => return (codes::INVALID_REQUEST, Some(why)),
    };
    let defaults = topic_config::defaults(&ctx.broker.settings);
    let apply: Arc<floe_engine::topics::ConfigChange> =
        Arc::new(move |current: &BTreeMap<String, String>| {
            let refused = |(_, reason): (i16, String)| floe_engine::Error::InvalidConfig { reason };
            match &change {
                Change::Incremental(ops) => {
                    topic_config::apply(current, ops, &defaults).map_err(refused)
                }
                Change::Replace(all) => {
                    let ops: Vec<(String, ConfigOp)> = all
                        .iter()
                        .map(|(k, v)| (k.clone(), ConfigOp::Set(v.clone())))
                        .collect();
                    topic_config::apply(&BTreeMap::new(), &ops, &defaults).map_err(refused)
                }
            }
        });
    match ctx
        .broker
        .engine
        .alter_topic_configs(name, apply, validate_only)
        .await
    {
        Ok(configs) => {
            if !validate_only {
                tracing::info!(topic = %name, ?configs, "topic configs altered");
            }
            (codes::NONE, None)
        }
        Err(e) => (codes::engine(&e), Some(e.to_string())),
    }
}

/// Config names given twice in one resource (Kafka refuses the resource).
fn duplicate<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = HashSet::new();
    names.into_iter().find(|n| !seen.insert(*n))
}

pub async fn incremental_alter(
    ctx: &Ctx,
    req: IncrementalAlterConfigsRequest,
    version: i16,
) -> Reply {
    use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
    let mut responses = Vec::with_capacity(req.resources.len());
    for r in &req.resources {
        let change = (|| {
            if let Some(d) = duplicate(r.configs.iter().map(|c| c.name.as_str())) {
                return Err(format!("Error due to duplicate config keys: {d}"));
            }
            r.configs
                .iter()
                .map(|c| {
                    let value = || {
                        c.value
                            .as_ref()
                            .map(|v| v.to_string())
                            .ok_or_else(|| format!("Null value not supported for: {}", c.name))
                    };
                    let op = match c.config_operation {
                        0 => ConfigOp::Set(value()?),
                        1 => ConfigOp::Delete,
                        2 => ConfigOp::Append(value()?),
                        3 => ConfigOp::Subtract(value()?),
                        other => return Err(format!("unknown config operation {other}")),
                    };
                    Ok((c.name.to_string(), op))
                })
                .collect::<Result<Vec<_>, String>>()
                .map(Change::Incremental)
        })();
        let (code, message) = alter_resource(
            ctx,
            r.resource_type,
            &r.resource_name,
            change,
            req.validate_only,
        )
        .await;
        responses.push(
            AlterConfigsResourceResponse::default()
                .with_error_code(code)
                .with_error_message(message.map(StrBytes::from_string))
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone()),
        );
    }
    encode(
        &IncrementalAlterConfigsResponse::default().with_responses(responses),
        version,
    )
}

pub async fn alter(ctx: &Ctx, req: AlterConfigsRequest, version: i16) -> Reply {
    use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
    let mut responses = Vec::with_capacity(req.resources.len());
    for r in &req.resources {
        let change = (|| {
            if let Some(d) = duplicate(r.configs.iter().map(|c| c.name.as_str())) {
                return Err(format!("Error due to duplicate config keys: {d}"));
            }
            r.configs
                .iter()
                .map(|c| match &c.value {
                    Some(v) => Ok((c.name.to_string(), v.to_string())),
                    None => Err(format!("Null value not supported for: {}", c.name)),
                })
                .collect::<Result<BTreeMap<_, _>, String>>()
                .map(Change::Replace)
        })();
        let (code, message) = alter_resource(
            ctx,
            r.resource_type,
            &r.resource_name,
            change,
            req.validate_only,
        )
        .await;
        responses.push(
            AlterConfigsResourceResponse::default()
                .with_error_code(code)
                .with_error_message(message.map(StrBytes::from_string))
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone()),
        );
    }
    encode(
        &AlterConfigsResponse::default().with_responses(responses),
        version,
    )
}

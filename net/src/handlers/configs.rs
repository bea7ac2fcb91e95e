//! IncrementalAlterConfigs and AlterConfigs: topic configs changed the
//! way `kafka-configs --alter` and the admin clients change them. A
//! topic's configs live in its record in the metadata store; a change is
//! one compare-and-swap, and every broker follows the topic records, so
//! retention, compaction and produce limits use it within the watch delay.
//!
//! BROKER resources carry the dynamic broker configs
//! (`topic_config::BROKER_DYNAMIC`): the resource named "" sets them for
//! every broker, one named by a node id for that broker alone (Kafka's
//! order: the broker's own value, then the cluster-wide one, then its
//! static setting). They live at `configs/brokers/<scope>`, one CAS per
//! change, followed by every broker. Configs fixed at start are refused
//! with a message saying so.

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

/// What one resource's alteration asks for: operations on the current
/// configs (IncrementalAlterConfigs), or, with `replace`, on none — the
/// configs named become the only overrides (AlterConfigs).
struct Change {
    replace: bool,
    ops: Vec<(String, ConfigOp)>,
}

/// A resource's change as the request states it: (name, operation code,
/// value); duplicate names and missing values are refused as Kafka does.
fn change<'a>(
    replace: bool,
    configs: impl Iterator<Item = (&'a str, i8, Option<&'a StrBytes>)>,
) -> Result<Change, String> {
    let mut seen = HashSet::new();
    let mut ops = Vec::new();
    for (name, op, value) in configs {
        if !seen.insert(name) {
            return Err(format!("Error due to duplicate config keys: {name}"));
        }
        let value = || {
            value
                .map(|v| v.to_string())
                .ok_or_else(|| format!("Null value not supported for: {name}"))
        };
        let op = match op {
            0 => ConfigOp::Set(value()?),
            1 => ConfigOp::Delete,
            2 => ConfigOp::Append(value()?),
            3 => ConfigOp::Subtract(value()?),
            other => return Err(format!("unknown config operation {other}")),
        };
        ops.push((name.to_string(), op));
    }
    Ok(Change { replace, ops })
}

impl Change {
    /// The change as the store applies it to what it reads (a pure
    /// function of that, so a lost reply settles by retrying): `apply`
    /// checks and applies the operations, on no base when replacing.
    fn into_store_change(
        self,
        apply: impl Fn(
                &BTreeMap<String, String>,
                &[(String, ConfigOp)],
            ) -> Result<BTreeMap<String, String>, (i16, String)>
            + Send
            + Sync
            + 'static,
    ) -> Arc<floe_engine::topics::ConfigChange> {
        let Change { replace, ops } = self;
        Arc::new(move |current: &BTreeMap<String, String>| {
            let none = BTreeMap::new();
            let base = if replace { &none } else { current };
            apply(base, &ops).map_err(|(_, reason)| floe_engine::Error::InvalidConfig { reason })
        })
    }
}

/// The store scope of the BROKER resource `name`: "" for every broker,
/// else a node id.
fn broker_scope(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Ok(floe_meta::schema::BROKER_CONFIGS_DEFAULT.to_string());
    }
    match name.parse::<i32>() {
        Ok(id) if id >= 0 => Ok(id.to_string()),
        _ => Err(format!(
            "broker resource {name:?} is neither \"\" (every broker) nor a node id"
        )),
    }
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
            if resource_type == RESOURCE_BROKER_LOGGER {
                return (
                    codes::INVALID_REQUEST,
                    Some("log levels are set with --log (FLOE_LOG) at start".into()),
                );
            }
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
    let engine = &ctx.broker.engine;
    let altered = if resource_type == RESOURCE_TOPIC {
        let defaults = topic_config::defaults(&ctx.broker.effective());
        let apply =
            change.into_store_change(move |base, ops| topic_config::apply(base, ops, &defaults));
        engine.alter_topic_configs(name, apply, validate_only).await
    } else {
        let scope = match broker_scope(name) {
            Ok(s) => s,
            Err(why) => return (codes::INVALID_REQUEST, Some(why)),
        };
        let apply = change.into_store_change(topic_config::apply_broker);
        engine
            .alter_broker_configs(&scope, apply, validate_only)
            .await
    };
    match altered {
        Ok(configs) => {
            if !validate_only {
                tracing::info!(resource_type, %name, ?configs, "configs altered");
            }
            (codes::NONE, None)
        }
        Err(e) => (codes::engine(&e), Some(e.to_string())),
    }
}

/// Every resource's (type, name, error code, message), in request order.
async fn alter_all(
    ctx: &Ctx,
    resources: Vec<(i8, StrBytes, Result<Change, String>)>,
    validate_only: bool,
) -> Vec<(i8, StrBytes, i16, Option<StrBytes>)> {
    let mut out = Vec::with_capacity(resources.len());
    for (rtype, name, change) in resources {
        let (code, message) = alter_resource(ctx, rtype, &name, change, validate_only).await;
        out.push((rtype, name, code, message.map(StrBytes::from_string)));
    }
    out
}

pub async fn incremental_alter(
    ctx: &Ctx,
    req: IncrementalAlterConfigsRequest,
    version: i16,
) -> Reply {
    use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
    let resources = req
        .resources
        .iter()
        .map(|r| {
            let configs = r
                .configs
                .iter()
                .map(|c| (c.name.as_str(), c.config_operation, c.value.as_ref()));
            (
                r.resource_type,
                r.resource_name.clone(),
                change(false, configs),
            )
        })
        .collect();
    let responses = alter_all(ctx, resources, req.validate_only)
        .await
        .into_iter()
        .map(|(rtype, name, code, message)| {
            AlterConfigsResourceResponse::default()
                .with_resource_type(rtype)
                .with_resource_name(name)
                .with_error_code(code)
                .with_error_message(message)
        })
        .collect();
    encode(
        &IncrementalAlterConfigsResponse::default().with_responses(responses),
        version,
    )
}

pub async fn alter(ctx: &Ctx, req: AlterConfigsRequest, version: i16) -> Reply {
    use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
    const SET: i8 = 0;
    let resources = req
        .resources
        .iter()
        .map(|r| {
            let configs = r
                .configs
                .iter()
                .map(|c| (c.name.as_str(), SET, c.value.as_ref()));
            (
                r.resource_type,
                r.resource_name.clone(),
                change(true, configs),
            )
        })
        .collect();
    let responses = alter_all(ctx, resources, req.validate_only)
        .await
        .into_iter()
        .map(|(rtype, name, code, message)| {
            AlterConfigsResourceResponse::default()
                .with_resource_type(rtype)
                .with_resource_name(name)
                .with_error_code(code)
                .with_error_message(message)
        })
        .collect();
    encode(
        &AlterConfigsResponse::default().with_responses(responses),
        version,
    )
}

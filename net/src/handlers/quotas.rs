//! DescribeClientQuotas and AlterClientQuotas (KIP-546): the quotas of
//! user, client-id and ip entities, kept in the metadata store
//! (`engine::quotas`) and enforced by every broker on its own traffic
//! (`crate::quota`: the byte rates; `request_percentage`,
//! `controller_mutation_rate` and `connection_creation_rate` are kept and
//! described but not enforced).

use kafka_protocol::messages::alter_client_quotas_response as alter_resp;
use kafka_protocol::messages::describe_client_quotas_response::{EntityData, EntryData, ValueData};
use kafka_protocol::messages::{
    AlterClientQuotasRequest, AlterClientQuotasResponse, DescribeClientQuotasRequest,
    DescribeClientQuotasResponse,
};
use kafka_protocol::protocol::StrBytes;

use floe_engine::acls::AclOperation;
use floe_meta::schema::QuotaEntityPart;

use super::{encode, Ctx, Reply};
use crate::codes;
use crate::quota::{
    CLIENT_ID, CONNECTION_CREATION_RATE, CONSUMER_BYTE_RATE, CONTROLLER_MUTATION_RATE, IP,
    PRODUCER_BYTE_RATE, REQUEST_PERCENTAGE, USER,
};

const MATCH_EXACT: i8 = 0;
const MATCH_DEFAULT: i8 = 1;
const MATCH_ANY: i8 = 2;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// The quota keys an entity of these types may carry.
fn keys_for(types: &[&str]) -> &'static [&'static str] {
    if types == [IP] {
        &[CONNECTION_CREATION_RATE]
    } else {
        &[
            PRODUCER_BYTE_RATE,
            CONSUMER_BYTE_RATE,
            REQUEST_PERCENTAGE,
            CONTROLLER_MUTATION_RATE,
        ]
    }
}

/// An AlterClientQuotas entity, checked: user and client-id (one of each
/// at most), or ip alone. Sorted by type.
fn entity(parts: &[(String, Option<String>)]) -> Result<Vec<QuotaEntityPart>, String> {
    let mut types: Vec<&str> = parts.iter().map(|(t, _)| t.as_str()).collect();
    types.sort_unstable();
    let ok = matches!(
        types.as_slice(),
        [USER] | [CLIENT_ID] | [CLIENT_ID, USER] | [IP]
    );
    if !ok {
        return Err(format!(
            "invalid quota entity {types:?}: user, client-id, both, or ip alone"
        ));
    }
    if let Some((_, Some(n))) = parts.iter().find(|(t, n)| t == IP && n.is_some()) {
        if n.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("{n:?} is not an IP address"));
        }
    }
    let mut e: Vec<QuotaEntityPart> = parts
        .iter()
        .map(|(t, n)| QuotaEntityPart {
            entity_type: t.clone(),
            name: n.clone(),
        })
        .collect();
    e.sort();
    Ok(e)
}

pub async fn alter(ctx: &Ctx, req: AlterClientQuotasRequest, version: i16) -> Reply {
    let allowed = ctx.allowed_on_cluster(AclOperation::AlterConfigs);
    let mut entries = Vec::with_capacity(req.entries.len());
    for e in &req.entries {
        let parts: Vec<(String, Option<String>)> = e
            .entity
            .iter()
            .map(|p| {
                (
                    p.entity_type.to_string(),
                    p.entity_name.as_ref().map(|n| n.to_string()),
                )
            })
            .collect();
        let echo: Vec<alter_resp::EntityData> = e
            .entity
            .iter()
            .map(|p| {
                alter_resp::EntityData::default()
                    .with_entity_type(p.entity_type.clone())
                    .with_entity_name(p.entity_name.clone())
            })
            .collect();
        let checked = entity(&parts).and_then(|entity| {
            let types: Vec<&str> = entity.iter().map(|p| p.entity_type.as_str()).collect();
            let allowed_keys = keys_for(&types);
            let mut ops = Vec::with_capacity(e.ops.len());
            for op in &e.ops {
                let key = op.key.as_str();
                if !allowed_keys.contains(&key) {
                    return Err(format!(
                        "{key:?} is not a quota of a {types:?} entity; accepted: {allowed_keys:?}"
                    ));
                }
                if op.remove {
                    ops.push((key.to_string(), None));
                } else if !(op.value.is_finite() && op.value > 0.0) {
                    return Err(format!("{key} must be a positive number, not {}", op.value));
                } else {
                    ops.push((key.to_string(), Some(op.value)));
                }
            }
            Ok((entity, ops))
        });
        let (code, message) = match checked {
            _ if !allowed => (codes::CLUSTER_AUTHORIZATION_FAILED, None),
            Err(why) => (codes::INVALID_REQUEST, Some(why)),
            Ok(_) if req.validate_only => (codes::NONE, None),
            Ok((entity, ops)) => match ctx.broker.engine.alter_quotas(entity, ops).await {
                Ok(()) => {
                    tracing::info!(entity = ?parts, "client quotas altered");
                    (codes::NONE, None)
                }
                Err(e) => (codes::engine(&e), Some(e.to_string())),
            },
        };
        entries.push(
            alter_resp::EntryData::default()
                .with_error_code(code)
                .with_error_message(message.map(s))
                .with_entity(echo),
        );
    }
    encode(
        &AlterClientQuotasResponse::default().with_entries(entries),
        version,
    )
}

pub fn describe(ctx: &Ctx, req: DescribeClientQuotasRequest, version: i16) -> Reply {
    let refuse = |code: i16, why: Option<String>| {
        encode(
            &DescribeClientQuotasResponse::default()
                .with_error_code(code)
                .with_error_message(why.map(s))
                .with_entries(None),
            version,
        )
    };
    if !ctx.allowed_on_cluster(AclOperation::DescribeConfigs) {
        return refuse(codes::CLUSTER_AUTHORIZATION_FAILED, None);
    }
    let mut seen = Vec::new();
    for c in &req.components {
        let t = c.entity_type.as_str();
        if ![USER, CLIENT_ID, IP].contains(&t) {
            return refuse(
                codes::INVALID_REQUEST,
                Some(format!("unknown entity type {t:?}")),
            );
        }
        if seen.contains(&t) {
            return refuse(
                codes::INVALID_REQUEST,
                Some(format!("entity type {t:?} named twice")),
            );
        }
        seen.push(t);
        if c.match_type == MATCH_EXACT && c._match.is_none() {
            return refuse(
                codes::INVALID_REQUEST,
                Some(format!("an exact match of {t:?} needs a name")),
            );
        }
        if ![MATCH_EXACT, MATCH_DEFAULT, MATCH_ANY].contains(&c.match_type) {
            return refuse(
                codes::INVALID_REQUEST,
                Some(format!("unknown match type {}", c.match_type)),
            );
        }
    }
    let all = ctx.broker.engine.quotas();
    let mut found: Vec<_> = all
        .iter()
        .filter(|(entity, _)| {
            let matches = req.components.iter().all(|c| {
                entity.iter().any(|p| {
                    p.entity_type == c.entity_type.as_str()
                        && match c.match_type {
                            MATCH_EXACT => p.name.as_deref() == c._match.as_deref(),
                            MATCH_DEFAULT => p.name.is_none(),
                            _ => true,
                        }
                })
            });
            matches && (!req.strict || entity.len() == req.components.len())
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(b.0));
    let entries = found
        .into_iter()
        .map(|(entity, values)| {
            EntryData::default()
                .with_entity(
                    entity
                        .iter()
                        .map(|p| {
                            EntityData::default()
                                .with_entity_type(s(p.entity_type.clone()))
                                .with_entity_name(p.name.clone().map(s))
                        })
                        .collect(),
                )
                .with_values(
                    values
                        .iter()
                        .map(|(k, v)| ValueData::default().with_key(s(k.clone())).with_value(*v))
                        .collect(),
                )
        })
        .collect();
    encode(
        &DescribeClientQuotasResponse::default().with_entries(Some(entries)),
        version,
    )
}

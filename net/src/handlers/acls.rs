//! CreateAcls, DescribeAcls and DeleteAcls: Kafka's ACLs in the metadata
//! store, as `kafka-acls` and the admin clients manage them. The wire
//! codes of resource types, pattern types, operations and permissions are
//! Kafka's (`org.apache.kafka.common.acl`, `…resource`).

use std::collections::BTreeMap;

use kafka_protocol::messages::create_acls_response::AclCreationResult;
use kafka_protocol::messages::delete_acls_response::{
    DeleteAclsFilterResult, DeleteAclsMatchingAcl,
};
use kafka_protocol::messages::describe_acls_response::{AclDescription, DescribeAclsResource};
use kafka_protocol::messages::{
    CreateAclsRequest, CreateAclsResponse, DeleteAclsRequest, DeleteAclsResponse,
    DescribeAclsRequest, DescribeAclsResponse,
};
use kafka_protocol::protocol::StrBytes;

use floe_engine::acls::{
    AclBinding, AclEntry, AclFilter, AclOperation, AclPatternType, AclPermission, AclResourceType,
    PatternFilter, CLUSTER_NAME,
};

use super::{encode, Ctx, Reply};
use crate::codes;

fn text(s: impl Into<String>) -> Option<StrBytes> {
    Some(StrBytes::from_string(s.into()))
}

const ANY: i8 = 1;

pub fn resource_type(code: i8) -> Result<AclResourceType, String> {
    Ok(match code {
        2 => AclResourceType::Topic,
        3 => AclResourceType::Group,
        4 => AclResourceType::Cluster,
        5 => AclResourceType::TransactionalId,
        6 | 7 => {
            return Err(format!(
                "resource type {} is not served: floe has no {}",
                code,
                if code == 6 {
                    "delegation tokens"
                } else {
                    "user resources"
                }
            ))
        }
        _ => return Err(format!("invalid resource type {code}")),
    })
}

pub fn resource_type_code(t: AclResourceType) -> i8 {
    match t {
        AclResourceType::Topic => 2,
        AclResourceType::Group => 3,
        AclResourceType::Cluster => 4,
        AclResourceType::TransactionalId => 5,
    }
}

fn pattern_type(code: i8) -> Result<AclPatternType, String> {
    match code {
        3 => Ok(AclPatternType::Literal),
        4 => Ok(AclPatternType::Prefixed),
        _ => Err(format!(
            "invalid pattern type {code}: an ACL is LITERAL (3) or PREFIXED (4)"
        )),
    }
}

fn pattern_type_code(t: AclPatternType) -> i8 {
    match t {
        AclPatternType::Literal => 3,
        AclPatternType::Prefixed => 4,
    }
}

pub fn operation(code: i8) -> Result<AclOperation, String> {
    use AclOperation::*;
    Ok(match code {
        2 => All,
        3 => Read,
        4 => Write,
        5 => Create,
        6 => Delete,
        7 => Alter,
        8 => Describe,
        9 => ClusterAction,
        10 => DescribeConfigs,
        11 => AlterConfigs,
        12 => IdempotentWrite,
        13 => CreateTokens,
        14 => DescribeTokens,
        _ => return Err(format!("invalid operation {code}")),
    })
}

pub fn operation_code(op: AclOperation) -> i8 {
    use AclOperation::*;
    match op {
        All => 2,
        Read => 3,
        Write => 4,
        Create => 5,
        Delete => 6,
        Alter => 7,
        Describe => 8,
        ClusterAction => 9,
        DescribeConfigs => 10,
        AlterConfigs => 11,
        IdempotentWrite => 12,
        CreateTokens => 13,
        DescribeTokens => 14,
    }
}

fn permission(code: i8) -> Result<AclPermission, String> {
    match code {
        2 => Ok(AclPermission::Deny),
        3 => Ok(AclPermission::Allow),
        _ => Err(format!(
            "invalid permission type {code}: an ACL is DENY (2) or ALLOW (3)"
        )),
    }
}

fn permission_code(p: AclPermission) -> i8 {
    match p {
        AclPermission::Deny => 2,
        AclPermission::Allow => 3,
    }
}

/// `Type:name`, as Kafka's principals are written.
fn principal(p: &str) -> Result<String, String> {
    match p.split_once(':') {
        Some((t, n)) if !t.is_empty() && !n.is_empty() => Ok(p.to_string()),
        _ => Err(format!(
            "invalid principal {p:?}: a principal is written Type:name, e.g. User:alice"
        )),
    }
}

/// One ACL of a CreateAcls request, checked as Kafka checks it.
fn binding(
    c: &kafka_protocol::messages::create_acls_request::AclCreation,
) -> Result<AclBinding, String> {
    let resource_type = resource_type(c.resource_type)?;
    let pattern_type = pattern_type(c.resource_pattern_type)?;
    let name = c.resource_name.to_string();
    if name.is_empty() {
        return Err("the resource name must not be empty".into());
    }
    if resource_type == AclResourceType::Cluster && name != CLUSTER_NAME {
        return Err(format!(
            "the only valid name for the CLUSTER resource is {CLUSTER_NAME}"
        ));
    }
    if c.host.is_empty() {
        return Err("the host must not be empty: an IP address, or * for any".into());
    }
    Ok(AclBinding {
        resource_type,
        pattern_type,
        name,
        entry: AclEntry {
            principal: principal(&c.principal)?,
            host: c.host.to_string(),
            operation: operation(c.operation)?,
            permission: permission(c.permission_type)?,
        },
    })
}

/// A DescribeAcls or DeleteAcls filter. `Ok(None)`: a filter that can
/// match nothing floe stores (a resource type it does not serve).
#[allow(clippy::too_many_arguments)]
fn filter(
    rt: i8,
    name: Option<&StrBytes>,
    pt: i8,
    principal_filter: Option<&StrBytes>,
    host: Option<&StrBytes>,
    op: i8,
    perm: i8,
) -> Result<Option<AclFilter>, String> {
    let resource_type = match rt {
        ANY => None,
        6 | 7 => return Ok(None),
        code => Some(resource_type(code)?),
    };
    let pattern = match pt {
        ANY => PatternFilter::Any,
        2 => PatternFilter::Match,
        code => PatternFilter::Exactly(pattern_type(code).map_err(|_| {
            format!("invalid pattern type filter {code}: ANY, MATCH, LITERAL or PREFIXED")
        })?),
    };
    let operation = match op {
        ANY => None,
        code => Some(operation(code)?),
    };
    let permission = match perm {
        ANY => None,
        code => Some(permission(code)?),
    };
    Ok(Some(AclFilter {
        resource_type,
        name: name.map(|n| n.to_string()),
        pattern,
        principal: principal_filter.map(|p| p.to_string()),
        host: host.map(|h| h.to_string()),
        operation,
        permission,
    }))
}

const NO_AUTHORIZER: &str = "No Authorizer is configured: start the broker with --authorizer acl";

/// Whether the ACL calls are served to this principal: an authorizer is
/// configured and the principal may do `op` on the cluster; else the
/// error code and message every result carries.
fn admit(ctx: &Ctx, op: AclOperation, what: &str) -> Result<(), (i16, String)> {
    if ctx.broker.settings.authorizer.is_none() {
        return Err((codes::SECURITY_DISABLED, NO_AUTHORIZER.into()));
    }
    if !ctx.allowed_on_cluster(op) {
        return Err((
            codes::CLUSTER_AUTHORIZATION_FAILED,
            format!("{what} needs {op:?} on the cluster"),
        ));
    }
    Ok(())
}

pub async fn create(ctx: &Ctx, req: CreateAclsRequest, version: i16) -> Reply {
    if let Err((code, msg)) = admit(ctx, AclOperation::Alter, "Creating ACLs") {
        let results = req
            .creations
            .iter()
            .map(|_| {
                AclCreationResult::default()
                    .with_error_code(code)
                    .with_error_message(text(msg.clone()))
            })
            .collect();
        return encode(
            &CreateAclsResponse::default().with_results(results),
            version,
        );
    }
    let parsed: Vec<Result<AclBinding, String>> = req.creations.iter().map(binding).collect();
    let valid: Vec<AclBinding> = parsed.iter().filter_map(|p| p.clone().ok()).collect();
    let mut stored = ctx.broker.engine.create_acls(valid).await.into_iter();
    let results = parsed
        .into_iter()
        .map(|p| match p {
            Err(why) => AclCreationResult::default()
                .with_error_code(codes::INVALID_REQUEST)
                .with_error_message(text(why)),
            Ok(_) => match stored.next() {
                Some(Ok(())) => AclCreationResult::default(),
                Some(Err(e)) => AclCreationResult::default()
                    .with_error_code(codes::engine(&e))
                    .with_error_message(text(e.to_string())),
                None => AclCreationResult::default()
                    .with_error_code(codes::UNKNOWN_SERVER_ERROR)
                    .with_error_message(text("no result for this ACL")),
            },
        })
        .collect();
    encode(
        &CreateAclsResponse::default().with_results(results),
        version,
    )
}

pub async fn describe(ctx: &Ctx, req: DescribeAclsRequest, version: i16) -> Reply {
    let error = |code: i16, msg: String| {
        encode(
            &DescribeAclsResponse::default()
                .with_error_code(code)
                .with_error_message(text(msg)),
            version,
        )
    };
    if let Err((code, msg)) = admit(ctx, AclOperation::Describe, "Describing ACLs") {
        return error(code, msg);
    }
    let f = match filter(
        req.resource_type_filter,
        req.resource_name_filter.as_ref(),
        req.pattern_type_filter,
        req.principal_filter.as_ref(),
        req.host_filter.as_ref(),
        req.operation,
        req.permission_type,
    ) {
        Ok(Some(f)) => f,
        Ok(None) => return encode(&DescribeAclsResponse::default(), version),
        Err(why) => return error(codes::INVALID_REQUEST, why),
    };
    let found = match ctx.broker.engine.describe_acls(f).await {
        Ok(found) => found,
        Err(e) => return error(codes::engine(&e), e.to_string()),
    };
    let mut by_resource: BTreeMap<(AclResourceType, String, AclPatternType), Vec<AclDescription>> =
        BTreeMap::new();
    for b in found {
        by_resource
            .entry((b.resource_type, b.name, b.pattern_type))
            .or_default()
            .push(description(&b.entry));
    }
    let resources = by_resource
        .into_iter()
        .map(|((rt, name, pt), acls)| {
            DescribeAclsResource::default()
                .with_resource_type(resource_type_code(rt))
                .with_resource_name(StrBytes::from_string(name))
                .with_pattern_type(pattern_type_code(pt))
                .with_acls(acls)
        })
        .collect();
    encode(
        &DescribeAclsResponse::default().with_resources(resources),
        version,
    )
}

fn description(e: &AclEntry) -> AclDescription {
    AclDescription::default()
        .with_principal(StrBytes::from_string(e.principal.clone()))
        .with_host(StrBytes::from_string(e.host.clone()))
        .with_operation(operation_code(e.operation))
        .with_permission_type(permission_code(e.permission))
}

pub async fn delete(ctx: &Ctx, req: DeleteAclsRequest, version: i16) -> Reply {
    if let Err((code, msg)) = admit(ctx, AclOperation::Alter, "Deleting ACLs") {
        let results = req
            .filters
            .iter()
            .map(|_| {
                DeleteAclsFilterResult::default()
                    .with_error_code(code)
                    .with_error_message(text(msg.clone()))
            })
            .collect();
        return encode(
            &DeleteAclsResponse::default().with_filter_results(results),
            version,
        );
    }
    let parsed: Vec<Result<Option<AclFilter>, String>> = req
        .filters
        .iter()
        .map(|f| {
            filter(
                f.resource_type_filter,
                f.resource_name_filter.as_ref(),
                f.pattern_type_filter,
                f.principal_filter.as_ref(),
                f.host_filter.as_ref(),
                f.operation,
                f.permission_type,
            )
        })
        .collect();
    let valid: Vec<AclFilter> = parsed
        .iter()
        .filter_map(|p| p.clone().ok().flatten())
        .collect();
    let mut removed = ctx.broker.engine.delete_acls(valid).await.into_iter();
    let results = parsed
        .into_iter()
        .map(|p| match p {
            Err(why) => DeleteAclsFilterResult::default()
                .with_error_code(codes::INVALID_REQUEST)
                .with_error_message(text(why)),
            Ok(None) => DeleteAclsFilterResult::default(),
            Ok(Some(_)) => match removed.next() {
                Some(Ok(gone)) => DeleteAclsFilterResult::default().with_matching_acls(
                    gone.iter()
                        .map(|b| {
                            DeleteAclsMatchingAcl::default()
                                .with_resource_type(resource_type_code(b.resource_type))
                                .with_resource_name(StrBytes::from_string(b.name.clone()))
                                .with_pattern_type(pattern_type_code(b.pattern_type))
                                .with_principal(StrBytes::from_string(b.entry.principal.clone()))
                                .with_host(StrBytes::from_string(b.entry.host.clone()))
                                .with_operation(operation_code(b.entry.operation))
                                .with_permission_type(permission_code(b.entry.permission))
                        })
                        .collect(),
                ),
                Some(Err(e)) => DeleteAclsFilterResult::default()
                    .with_error_code(codes::engine(&e))
                    .with_error_message(text(e.to_string())),
                None => DeleteAclsFilterResult::default()
                    .with_error_code(codes::UNKNOWN_SERVER_ERROR)
                    .with_error_message(text("no result for this filter")),
            },
        })
        .collect();
    encode(
        &DeleteAclsResponse::default().with_filter_results(results),
        version,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_round_trip() {
        for code in 2..=14 {
            assert_eq!(operation_code(operation(code).unwrap()), code);
        }
        for code in 2..=5 {
            assert_eq!(resource_type_code(resource_type(code).unwrap()), code);
        }
        assert!(operation(1).is_err() && operation(0).is_err());
        assert!(resource_type(1).is_err() && resource_type(6).is_err());
        assert!(pattern_type(2).is_err() && permission(1).is_err());
        assert!(principal("alice").is_err() && principal("User:").is_err());
    }
}

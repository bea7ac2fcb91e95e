//! DescribeUserScramCredentials and AlterUserScramCredentials: the SCRAM
//! users in the metadata store, as Kafka's `kafka-configs --entity-type
//! users --alter --add-config 'SCRAM-SHA-512=[password=…]'` and the admin
//! clients manage them.

use std::collections::{BTreeMap, HashMap};

use kafka_protocol::messages::alter_user_scram_credentials_response::AlterUserScramCredentialsResult;
use kafka_protocol::messages::describe_user_scram_credentials_response::{
    CredentialInfo, DescribeUserScramCredentialsResult,
};
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, AlterUserScramCredentialsResponse,
    DescribeUserScramCredentialsRequest, DescribeUserScramCredentialsResponse,
};
use kafka_protocol::protocol::StrBytes;

use floe_engine::acls::AclOperation;
use floe_engine::users::{UserChange, UserChangeError};

use super::{encode, Ctx, Reply};
use crate::codes;
use crate::scram::{self, Mechanism};

fn text(s: impl Into<String>) -> Option<StrBytes> {
    Some(StrBytes::from_string(s.into()))
}

fn infos(record: &floe_meta::schema::ScramUserRecord) -> Vec<CredentialInfo> {
    record
        .credentials
        .iter()
        .filter_map(|(name, c)| {
            let m = Mechanism::parse(name)?;
            Some(
                CredentialInfo::default()
                    .with_mechanism(m.wire())
                    .with_iterations(c.iterations as i32),
            )
        })
        .collect()
}

pub async fn describe(ctx: &Ctx, req: DescribeUserScramCredentialsRequest, version: i16) -> Reply {
    if !ctx.allowed_on_cluster(AclOperation::Describe) {
        let resp = DescribeUserScramCredentialsResponse::default()
            .with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED)
            .with_error_message(text("Describing SCRAM users needs DESCRIBE on the cluster"));
        return encode(&resp, version);
    }
    let all = match ctx.broker.engine.scram_users().await {
        Ok(all) => all,
        Err(e) => {
            let resp = DescribeUserScramCredentialsResponse::default()
                .with_error_code(codes::engine(&e))
                .with_error_message(text(e.to_string()));
            return encode(&resp, version);
        }
    };
    let results = match req.users.filter(|u| !u.is_empty()) {
        // Null or empty: every user with credentials.
        None => all
            .iter()
            .map(|r| {
                DescribeUserScramCredentialsResult::default()
                    .with_user(StrBytes::from_string(r.name.clone()))
                    .with_credential_infos(infos(r))
            })
            .collect(),
        Some(names) => {
            let by_name: HashMap<&str, _> = all.iter().map(|r| (r.name.as_str(), r)).collect();
            let mut seen: HashMap<&str, usize> = HashMap::new();
            for n in &names {
                *seen.entry(n.name.as_str()).or_default() += 1;
            }
            let mut done = std::collections::HashSet::new();
            names
                .iter()
                .filter(|n| done.insert(n.name.as_str()))
                .map(|n| {
                    let name = n.name.as_str();
                    let r = DescribeUserScramCredentialsResult::default().with_user(n.name.clone());
                    if seen[name] > 1 {
                        return r.with_error_code(codes::DUPLICATE_RESOURCE).with_error_message(text(
                            format!("Cannot describe SCRAM credentials for the same user twice in a single request: {name}"),
                        ));
                    }
                    match by_name.get(name) {
                        Some(rec) => r.with_credential_infos(infos(rec)),
                        None => r.with_error_code(codes::RESOURCE_NOT_FOUND).with_error_message(
                            text(format!("Attempt to describe a user credential that does not exist: {name}")),
                        ),
                    }
                })
                .collect()
        }
    };
    encode(
        &DescribeUserScramCredentialsResponse::default().with_results(results),
        version,
    )
}

/// One user's alterations, checked as Kafka checks them; the first
/// problem found is the user's answer.
fn validate(
    user: &str,
    deletions: &[i8],
    upsertions: &[&kafka_protocol::messages::alter_user_scram_credentials_request::ScramCredentialUpsertion],
) -> Result<UserChange, (i16, String)> {
    if user.is_empty() {
        return Err((
            codes::UNACCEPTABLE_CREDENTIAL,
            "Username must not be empty".into(),
        ));
    }
    let mechanism = |wire: i8| {
        Mechanism::from_wire(wire).ok_or_else(|| {
            (
                codes::UNSUPPORTED_SASL_MECHANISM,
                format!("Unknown SCRAM mechanism {wire}"),
            )
        })
    };
    // Each (user, mechanism) at most once in a request.
    let mut touched = std::collections::HashSet::new();
    let mut once = |wire: i8| {
        let m = mechanism(wire)?;
        match touched.insert(m) {
            true => Ok(m),
            false => Err((
                codes::DUPLICATE_RESOURCE,
                format!(
                    "A user credential cannot be altered twice in the same request: {user} {}",
                    m.name()
                ),
            )),
        }
    };
    let mut change = UserChange::default();
    for &d in deletions {
        change.delete.push(once(d)?.name().to_string());
    }
    let mut upsert = BTreeMap::new();
    for u in upsertions {
        let m = once(u.mechanism)?;
        let iterations = scram::check_iterations(u.iterations)
            .map_err(|e| (codes::UNACCEPTABLE_CREDENTIAL, e))?;
        if u.salt.is_empty() {
            return Err((
                codes::UNACCEPTABLE_CREDENTIAL,
                "Salt must not be empty".into(),
            ));
        }
        if u.salted_password.is_empty() {
            return Err((
                codes::UNACCEPTABLE_CREDENTIAL,
                "Salted password must not be empty".into(),
            ));
        }
        upsert.insert(
            m.name().to_string(),
            m.credential(&u.salted_password, &u.salt, iterations),
        );
    }
    change.upsert = upsert;
    Ok(change)
}

pub async fn alter(ctx: &Ctx, req: AlterUserScramCredentialsRequest, version: i16) -> Reply {
    // Each user's alterations, in the order users first appear.
    let mut order: Vec<&str> = Vec::new();
    let mut deletions: HashMap<&str, Vec<i8>> = HashMap::new();
    let mut upsertions: HashMap<&str, Vec<_>> = HashMap::new();
    for d in &req.deletions {
        let n = d.name.as_str();
        if !deletions.contains_key(n) && !upsertions.contains_key(n) {
            order.push(n);
        }
        deletions.entry(n).or_default().push(d.mechanism);
    }
    for u in &req.upsertions {
        let n = u.name.as_str();
        if !deletions.contains_key(n) && !upsertions.contains_key(n) {
            order.push(n);
        }
        upsertions.entry(n).or_default().push(u);
    }
    let mut results = Vec::with_capacity(order.len());
    let authorized = ctx.allowed_on_cluster(AclOperation::Alter);
    for user in order {
        if !authorized {
            results.push(
                AlterUserScramCredentialsResult::default()
                    .with_user(StrBytes::from_string(user.to_string()))
                    .with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED)
                    .with_error_message(text("Altering SCRAM users needs ALTER on the cluster")),
            );
            continue;
        }
        let dels = deletions.get(user).map(Vec::as_slice).unwrap_or_default();
        let ups = upsertions.get(user).map(Vec::as_slice).unwrap_or_default();
        let result = AlterUserScramCredentialsResult::default()
            .with_user(StrBytes::from_string(user.to_string()));
        let result = match validate(user, dels, ups) {
            Err((code, msg)) => result.with_error_code(code).with_error_message(text(msg)),
            Ok(change) => match ctx.broker.engine.alter_scram_user(user, change).await {
                Ok(()) => {
                    tracing::info!(%user, "SCRAM credentials altered");
                    result
                }
                Err(e @ UserChangeError::NotFound { .. }) => result
                    .with_error_code(codes::RESOURCE_NOT_FOUND)
                    .with_error_message(text(e.to_string())),
                Err(UserChangeError::Store(e)) => result
                    .with_error_code(codes::engine(&e))
                    .with_error_message(text(e.to_string())),
            },
        };
        results.push(result);
    }
    encode(
        &AlterUserScramCredentialsResponse::default().with_results(results),
        version,
    )
}

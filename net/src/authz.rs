//! Authorization with Kafka's ACL model: what a connection's principal may
//! do, decided from the engine's ACLs (`floe_engine::acls`) and the
//! broker's policy — super users, and the answer when no ACL names a
//! resource (`allow.everyone.if.no.acl.found`). Without an authorizer
//! every client may do everything, as in Kafka.
//!
//! The checks themselves are in the handlers, one per API, as Kafka's
//! `KafkaApis` makes them; each answers Kafka's error code.

use std::collections::HashSet;

use floe_engine::acls::{AclOperation, AclResourceType, Decision, CLUSTER_NAME};

use crate::handlers::Ctx;

/// `--authorizer acl` and its settings.
#[derive(Debug, Clone, Default)]
pub struct AuthzConfig {
    /// Principals (`User:NAME`) allowed everything, whatever the ACLs say.
    pub super_users: HashSet<String>,
    /// Allow an action on a resource no ACL names (Kafka's
    /// `allow.everyone.if.no.acl.found`); off: deny it.
    pub allow_everyone_if_no_acl_found: bool,
}

impl AuthzConfig {
    fn verdict(&self, d: Decision) -> bool {
        match d {
            Decision::Allow => true,
            Decision::Deny | Decision::NotAllowed => false,
            Decision::NoAcls => self.allow_everyone_if_no_acl_found,
        }
    }
}

/// Parses `--super-users`: principals separated by `;` (Kafka's
/// `super.users`) or `,`, each `Type:name`.
pub fn parse_super_users(s: &str) -> Result<HashSet<String>, String> {
    s.split([';', ','])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once(':') {
            Some((t, n)) if !t.is_empty() && !n.is_empty() => Ok(p.to_string()),
            _ => Err(format!(
                "super user {p:?} is not a principal of the form User:NAME"
            )),
        })
        .collect()
}

impl Ctx {
    /// Whether this connection's principal may do `op` on resource `name`
    /// of type `rt`. A refusal is counted and logged at debug level.
    pub fn allowed(&self, op: AclOperation, rt: AclResourceType, name: &str) -> bool {
        let ok = self.may(op, rt, name);
        if !ok {
            self.refused(op, rt, name);
        }
        ok
    }

    /// [`Self::allowed`] without counting or logging a refusal: for
    /// filtering what a listing shows, and for a check that another one
    /// backs up (Kafka's `logIfDenied = false`).
    pub fn may(&self, op: AclOperation, rt: AclResourceType, name: &str) -> bool {
        let Some(cfg) = self.broker.settings.authorizer.as_deref() else {
            return true;
        };
        cfg.super_users.contains(&*self.principal)
            || cfg.verdict(self.broker.engine.acls().decide(
                &self.principal,
                &self.host,
                op,
                rt,
                name,
            ))
    }

    /// Whether this connection's principal may do `op` on the cluster.
    pub fn allowed_on_cluster(&self, op: AclOperation) -> bool {
        self.allowed(op, AclResourceType::Cluster, CLUSTER_NAME)
    }

    /// Whether `op` is allowed on some resource of type `rt` (Kafka's
    /// authorizeByResourceType).
    pub fn allowed_on_any(&self, op: AclOperation, rt: AclResourceType) -> bool {
        let Some(cfg) = self.broker.settings.authorizer.as_deref() else {
            return true;
        };
        if cfg.super_users.contains(&*self.principal) {
            return true;
        }
        let d = self
            .broker
            .engine
            .acls()
            .decide_any(&self.principal, &self.host, op, rt);
        let ok = cfg.verdict(d);
        if !ok {
            self.refused(op, rt, "(any)");
        }
        ok
    }

    /// Kafka's authorized-operations bit field of a resource (Metadata,
    /// DescribeGroups, DescribeCluster): bit `n` set when operation code
    /// `n` of `ops` is allowed. Checking is silent here: a bit left clear
    /// is not a refusal.
    pub fn authorized_operations(&self, rt: AclResourceType, name: &str) -> i32 {
        let ops: &[AclOperation] = match rt {
            AclResourceType::Topic => &[
                AclOperation::Read,
                AclOperation::Write,
                AclOperation::Create,
                AclOperation::Delete,
                AclOperation::Alter,
                AclOperation::Describe,
                AclOperation::DescribeConfigs,
                AclOperation::AlterConfigs,
            ],
            AclResourceType::Group => &[
                AclOperation::Read,
                AclOperation::Delete,
                AclOperation::Describe,
            ],
            AclResourceType::Cluster => &[
                AclOperation::Create,
                AclOperation::Alter,
                AclOperation::Describe,
                AclOperation::ClusterAction,
                AclOperation::DescribeConfigs,
                AclOperation::AlterConfigs,
                AclOperation::IdempotentWrite,
            ],
            AclResourceType::TransactionalId => &[AclOperation::Write, AclOperation::Describe],
        };
        ops.iter()
            .filter(|&&op| self.may(op, rt, name))
            .fold(0i32, |bits, &op| {
                bits | (1 << crate::handlers::acls::operation_code(op))
            })
    }

    fn refused(&self, op: AclOperation, rt: AclResourceType, name: &str) {
        self.shard.counters().authorization_denied.add(1);
        tracing::debug!(
            principal = %self.principal,
            host = %self.host,
            operation = ?op,
            resource_type = ?rt,
            resource = name,
            "authorization denied"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn super_users_parse() {
        let s = parse_super_users("User:admin; User:ops,User:x").unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.contains("User:ops"));
        assert!(parse_super_users("admin").is_err());
        assert!(parse_super_users("User:").is_err());
        assert!(parse_super_users("").unwrap().is_empty());
    }
}

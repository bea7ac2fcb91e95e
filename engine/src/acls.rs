//! Kafka ACLs: every broker's view of `acls/*` (see
//! [`floe_meta::schema::AclResourceRecord`]), the changes CreateAcls and
//! DeleteAcls make to it, and the match an authorization decision rests on.
//!
//! Lookups read a lock-free snapshot, followed by a watch, so a change made
//! through any broker is enforced by every broker within the watch's delay.
//! Changes are made per resource pattern by compare-and-swap on the
//! revision read. Adding an ACL that is there and removing one that is gone
//! change nothing, so an attempt whose reply was lost is settled by trying
//! again. What a principal may do beyond the ACLs (super users, the default
//! when no ACL names a resource) is the protocol layer's policy
//! (`floe_net::authz`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use floe_meta::schema::{self, AclResourceRecord};
use floe_meta::MetaStore;

pub use floe_meta::schema::{
    AclEntry, AclOperation, AclPatternType, AclPermission, AclResourceType,
};

use crate::topics::{follow_prefix, read_prefix, update_record};
use crate::Result;

/// The one cluster resource's name, as Kafka names it.
pub const CLUSTER_NAME: &str = "kafka-cluster";
/// A literal resource name matching every resource of its type.
pub const WILDCARD: &str = "*";
/// The principal of an ACL for every user.
pub const WILDCARD_PRINCIPAL: &str = "User:*";

/// Attempts of one resource pattern's compare-and-swap before giving up.
const UPDATE_ATTEMPTS_MAX: usize = 16;

/// One ACL with its resource pattern (Kafka's AclBinding).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AclBinding {
    pub resource_type: AclResourceType,
    pub pattern_type: AclPatternType,
    pub name: String,
    pub entry: AclEntry,
}

/// Which pattern types a filter takes (Kafka's PatternType in a filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternFilter {
    /// Any pattern type; a name must equal the pattern's name.
    Any,
    /// Every pattern that would apply to a resource of the filter's name:
    /// that literal name, the literal `*`, and every prefix of the name.
    Match,
    Exactly(AclPatternType),
}

/// Kafka's AclBindingFilter: `None` fields match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclFilter {
    pub resource_type: Option<AclResourceType>,
    pub name: Option<String>,
    pub pattern: PatternFilter,
    pub principal: Option<String>,
    pub host: Option<String>,
    pub operation: Option<AclOperation>,
    pub permission: Option<AclPermission>,
}

impl AclFilter {
    pub fn matches_pattern(&self, rt: AclResourceType, pt: AclPatternType, name: &str) -> bool {
        if self.resource_type.is_some_and(|t| t != rt) {
            return false;
        }
        match (self.pattern, self.name.as_deref()) {
            (PatternFilter::Exactly(p), _) if p != pt => false,
            (_, None) => true,
            (PatternFilter::Any | PatternFilter::Exactly(_), Some(n)) => n == name,
            (PatternFilter::Match, Some(n)) => match pt {
                AclPatternType::Literal => n == name || name == WILDCARD,
                AclPatternType::Prefixed => n.starts_with(name),
            },
        }
    }

    pub fn matches_entry(&self, e: &AclEntry) -> bool {
        self.principal.as_deref().is_none_or(|p| p == e.principal)
            && self.host.as_deref().is_none_or(|h| h == e.host)
            && self.operation.is_none_or(|o| o == e.operation)
            && self.permission.is_none_or(|p| p == e.permission)
    }

    pub fn matches(&self, b: &AclBinding) -> bool {
        self.matches_pattern(b.resource_type, b.pattern_type, &b.name)
            && self.matches_entry(&b.entry)
    }
}

/// What the ACLs say about one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// Some ACL names the resource, none allows the action.
    NotAllowed,
    /// No ACL names the resource at all (the default decides).
    NoAcls,
}

/// ACLs indexed for the decision: literal names by (type, name), prefixed
/// patterns in a list (few in practice), per resource type.
#[derive(Debug, Default)]
struct Index {
    /// Type → name → ACLs: looked up by `&str`, no allocation per check.
    literal: HashMap<AclResourceType, HashMap<String, Vec<AclEntry>>>,
    prefixed: Vec<(AclResourceType, String, Vec<AclEntry>)>,
    count: usize,
}

impl Index {
    fn build(records: Vec<AclResourceRecord>) -> Self {
        let mut ix = Index::default();
        for r in records {
            ix.count += r.entries.len();
            match r.pattern_type {
                AclPatternType::Literal => {
                    ix.literal
                        .entry(r.resource_type)
                        .or_default()
                        .insert(r.name, r.entries);
                }
                AclPatternType::Prefixed => {
                    ix.prefixed.push((r.resource_type, r.name, r.entries));
                }
            }
        }
        ix
    }

    /// Every ACL whose pattern applies to the resource.
    fn applying<'a>(
        &'a self,
        rt: AclResourceType,
        name: &'a str,
    ) -> impl Iterator<Item = &'a AclEntry> + 'a {
        let names = self.literal.get(&rt);
        let lit = move |n: &str| names.and_then(|m| m.get(n)).into_iter().flatten();
        let wildcard = if name == WILDCARD {
            None
        } else {
            Some(lit(WILDCARD))
        };
        lit(name).chain(wildcard.into_iter().flatten()).chain(
            self.prefixed
                .iter()
                .filter(move |(t, p, _)| *t == rt && name.starts_with(p.as_str()))
                .flat_map(|(_, _, e)| e),
        )
    }
}

/// Whether an ACL for `principal` from `host` applies to them.
fn applies_to(e: &AclEntry, principal: &str, host: &str) -> bool {
    (e.principal == principal || e.principal == WILDCARD_PRINCIPAL)
        && (e.host == host || e.host == WILDCARD)
}

/// Whether allowing `granted` allows `op`: Kafka's implied operations.
fn grants(granted: AclOperation, op: AclOperation) -> bool {
    use AclOperation::*;
    granted == op
        || granted == All
        || match op {
            Describe => matches!(granted, Read | Write | Delete | Alter),
            DescribeConfigs => granted == AlterConfigs,
            _ => false,
        }
}

/// Decides one action from the ACLs alone: a matching DENY wins over any
/// ALLOW; denying an operation does not deny the ones it implies.
fn decide<'a>(
    acls: impl Iterator<Item = &'a AclEntry>,
    principal: &str,
    host: &str,
    op: AclOperation,
) -> Decision {
    let mut any = false;
    let mut allowed = false;
    for e in acls {
        any = true;
        if !applies_to(e, principal, host) {
            continue;
        }
        match e.permission {
            AclPermission::Deny if e.operation == op || e.operation == AclOperation::All => {
                return Decision::Deny
            }
            AclPermission::Deny => {}
            AclPermission::Allow => allowed |= grants(e.operation, op),
        }
    }
    match (allowed, any) {
        (true, _) => Decision::Allow,
        (false, true) => Decision::NotAllowed,
        (false, false) => Decision::NoAcls,
    }
}

pub struct Acls {
    meta: Arc<dyn MetaStore>,
    snapshot: ArcSwap<Index>,
}

fn bindings(r: &AclResourceRecord) -> impl Iterator<Item = AclBinding> + '_ {
    r.entries.iter().map(|e| AclBinding {
        resource_type: r.resource_type,
        pattern_type: r.pattern_type,
        name: r.name.clone(),
        entry: e.clone(),
    })
}

impl Acls {
    pub async fn load(meta: Arc<dyn MetaStore>) -> Result<Self> {
        let a = Self {
            meta,
            snapshot: ArcSwap::from_pointee(Index::default()),
        };
        a.refresh().await?;
        Ok(a)
    }

    /// Follows `acls/` until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let meta = self.meta.clone();
        follow_prefix(&*meta, schema::ACLS_PREFIX, "ACLs", || self.refresh()).await
    }

    pub async fn refresh(&self) -> Result<()> {
        let records = self.records().await?;
        self.snapshot.store(Arc::new(Index::build(records)));
        Ok(())
    }

    async fn records(&self) -> Result<Vec<AclResourceRecord>> {
        read_prefix(&*self.meta, schema::ACLS_PREFIX, "ACL record").await
    }

    /// [`Self::records`], tried again after a failed read.
    async fn records_retrying(&self) -> Result<Vec<AclResourceRecord>> {
        let mut last = None;
        for _ in 0..UPDATE_ATTEMPTS_MAX {
            match self.records().await {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// How many ACLs this broker enforces.
    pub fn count(&self) -> usize {
        self.snapshot.load().count
    }

    /// What the ACLs say about `principal` from `host` doing `op` on the
    /// resource `name` of type `rt`.
    pub fn decide(
        &self,
        principal: &str,
        host: &str,
        op: AclOperation,
        rt: AclResourceType,
        name: &str,
    ) -> Decision {
        let ix = self.snapshot.load();
        decide(ix.applying(rt, name), principal, host, op)
    }

    /// Whether some resource of type `rt` allows `op` to `principal` (the
    /// check of an idempotent producer's InitProducerId: WRITE on any
    /// topic). Any allowing ACL counts unless a DENY on the literal `*`
    /// takes every resource of the type away; `NoAcls` when the type has
    /// no ACL at all.
    pub fn decide_any(
        &self,
        principal: &str,
        host: &str,
        op: AclOperation,
        rt: AclResourceType,
    ) -> Decision {
        let ix = self.snapshot.load();
        let wildcard = decide(ix.applying(rt, WILDCARD), principal, host, op);
        if wildcard == Decision::Deny {
            return Decision::Deny;
        }
        let all = ix
            .literal
            .get(&rt)
            .into_iter()
            .flat_map(|m| m.values().flatten())
            .chain(
                ix.prefixed
                    .iter()
                    .filter(|(t, _, _)| *t == rt)
                    .flat_map(|(_, _, e)| e),
            );
        let mut any = false;
        for e in all {
            any = true;
            if e.permission == AclPermission::Allow
                && applies_to(e, principal, host)
                && grants(e.operation, op)
            {
                return Decision::Allow;
            }
        }
        if any {
            Decision::NotAllowed
        } else {
            Decision::NoAcls
        }
    }

    /// Every ACL the filter matches, read from the store (an admin call
    /// must see a change another broker made a moment ago), sorted.
    pub async fn describe(&self, filter: &AclFilter) -> Result<Vec<AclBinding>> {
        let mut out: Vec<AclBinding> = self
            .records()
            .await?
            .iter()
            .flat_map(bindings)
            .filter(|b| filter.matches(b))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Adds ACLs; one result per binding, in order. Bindings of one
    /// resource pattern land together or not at all.
    pub async fn create(&self, new: &[AclBinding]) -> Vec<Result<()>> {
        let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, b) in new.iter().enumerate() {
            by_key
                .entry(schema::acl_key(b.resource_type, b.pattern_type, &b.name))
                .or_default()
                .push(i);
        }
        let mut results: Vec<Result<()>> = (0..new.len()).map(|_| Ok(())).collect();
        for (key, idx) in by_key {
            let first = &new[idx[0]];
            let outcome = self
                .update(
                    &key,
                    first.resource_type,
                    first.pattern_type,
                    &first.name,
                    |entries| {
                        for &i in &idx {
                            if !entries.contains(&new[i].entry) {
                                entries.push(new[i].entry.clone());
                            }
                        }
                    },
                )
                .await;
            if let Err(e) = outcome {
                for &i in &idx {
                    results[i] = Err(e.clone());
                }
            }
        }
        let _ = self.refresh().await;
        results
    }

    /// Removes every ACL a filter matches; per filter, the ACLs it removed
    /// (or the error that stopped it).
    pub async fn delete(&self, filters: &[AclFilter]) -> Vec<Result<Vec<AclBinding>>> {
        let records = match self.records_retrying().await {
            Ok(r) => r,
            Err(e) => return filters.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut results: Vec<Result<Vec<AclBinding>>> =
            filters.iter().map(|_| Ok(Vec::new())).collect();
        for r in &records {
            let hits: Vec<usize> = (0..filters.len())
                .filter(|&i| {
                    filters[i].matches_pattern(r.resource_type, r.pattern_type, &r.name)
                        && r.entries.iter().any(|e| filters[i].matches_entry(e))
                })
                .collect();
            if hits.is_empty() {
                continue;
            }
            let key = schema::acl_key(r.resource_type, r.pattern_type, &r.name);
            let outcome = self
                .update(&key, r.resource_type, r.pattern_type, &r.name, |entries| {
                    entries.retain(|e| !hits.iter().any(|&i| filters[i].matches_entry(e)))
                })
                .await;
            for &i in &hits {
                match (&outcome, &mut results[i]) {
                    (Ok(()), Ok(done)) => {
                        done.extend(bindings(r).filter(|b| filters[i].matches_entry(&b.entry)))
                    }
                    (Err(e), slot) => *slot = Err(e.clone()),
                    (Ok(()), Err(_)) => {}
                }
            }
        }
        let _ = self.refresh().await;
        for r in results.iter_mut().flatten() {
            r.sort();
            r.dedup();
        }
        results
    }

    /// Applies `change` to the ACLs of one resource pattern
    /// ([`update_record`]; `change` is idempotent, so a landed attempt
    /// makes the next one a no-op). A pattern left without ACLs is removed.
    async fn update(
        &self,
        key: &str,
        resource_type: AclResourceType,
        pattern_type: AclPatternType,
        name: &str,
        change: impl Fn(&mut Vec<AclEntry>),
    ) -> Result<()> {
        update_record(
            &*self.meta,
            key,
            "ACL record",
            |current: Option<&AclResourceRecord>| {
                let mut record = current.cloned().unwrap_or_else(|| AclResourceRecord {
                    resource_type,
                    pattern_type,
                    name: name.to_string(),
                    entries: Vec::new(),
                });
                change(&mut record.entries);
                Ok((!record.entries.is_empty()).then_some(record))
            },
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use floe_meta::{Embedded, FaultyMeta, MetaFaults};

    use super::*;
    use AclOperation::*;
    use AclPatternType::*;
    use AclPermission::*;
    use AclResourceType::*;

    fn acl(
        rt: AclResourceType,
        pt: AclPatternType,
        name: &str,
        principal: &str,
        op: AclOperation,
        perm: AclPermission,
    ) -> AclBinding {
        AclBinding {
            resource_type: rt,
            pattern_type: pt,
            name: name.into(),
            entry: AclEntry {
                principal: principal.into(),
                host: WILDCARD.into(),
                operation: op,
                permission: perm,
            },
        }
    }

    fn any_filter() -> AclFilter {
        AclFilter {
            resource_type: None,
            name: None,
            pattern: PatternFilter::Any,
            principal: None,
            host: None,
            operation: None,
            permission: None,
        }
    }

    async fn store() -> (Arc<dyn MetaStore>, Acls) {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let acls = Acls::load(meta.clone()).await.unwrap();
        (meta, acls)
    }

    #[tokio::test]
    async fn kafka_matching_rules() {
        let (_, acls) = store().await;
        let new = [
            acl(Topic, Literal, "orders", "User:alice", Read, Allow),
            acl(Topic, Prefixed, "logs-", "User:bob", Write, Allow),
            acl(Topic, Literal, "*", "User:carol", All, Allow),
            acl(Topic, Literal, "secret", "User:carol", Read, Deny),
            acl(Group, Literal, "g", "User:*", Read, Allow),
            acl(Topic, Literal, "pinned", "User:dave", Read, Allow),
        ];
        assert!(acls.create(&new).await.iter().all(|r| r.is_ok()));
        let d = |p: &str, op, rt, n: &str| acls.decide(p, "10.0.0.1", op, rt, n);
        assert_eq!(d("User:alice", Read, Topic, "orders"), Decision::Allow);
        // READ implies DESCRIBE; not WRITE.
        assert_eq!(d("User:alice", Describe, Topic, "orders"), Decision::Allow);
        assert_eq!(
            d("User:alice", Write, Topic, "orders"),
            Decision::NotAllowed
        );
        // Prefixed.
        assert_eq!(d("User:bob", Write, Topic, "logs-1"), Decision::Allow);
        assert_eq!(d("User:bob", Write, Topic, "log"), Decision::NotAllowed);
        // The wildcard names every topic; DENY wins over it.
        assert_eq!(d("User:carol", Delete, Topic, "anything"), Decision::Allow);
        assert_eq!(d("User:carol", Read, Topic, "secret"), Decision::Deny);
        // Denying READ does not deny DESCRIBE.
        assert_eq!(d("User:carol", Describe, Topic, "secret"), Decision::Allow);
        // User:* is every user.
        assert_eq!(d("User:eve", Read, Group, "g"), Decision::Allow);
        assert_eq!(d("User:eve", Delete, Group, "g"), Decision::NotAllowed);
        // A resource no ACL names (the topic wildcard names every topic).
        assert_eq!(d("User:eve", Read, Group, "h"), Decision::NoAcls);
        assert_eq!(d("User:eve", Read, Topic, "x"), Decision::NotAllowed);
        // Host: an ACL for one address does not apply from another.
        let pinned = AclBinding {
            entry: AclEntry {
                host: "10.0.0.9".into(),
                ..new[5].entry.clone()
            },
            ..new[5].clone()
        };
        let f = AclFilter {
            name: Some("pinned".into()),
            ..any_filter()
        };
        acls.delete(&[f]).await;
        acls.create(&[pinned]).await;
        assert_eq!(
            acls.decide("User:dave", "10.0.0.9", Read, Topic, "pinned"),
            Decision::Allow
        );
        assert_eq!(
            acls.decide("User:dave", "10.0.0.1", Read, Topic, "pinned"),
            Decision::NotAllowed
        );
        // InitProducerId's "WRITE on any topic".
        assert_eq!(
            acls.decide_any("User:bob", "h", Write, Topic),
            Decision::Allow
        );
        assert_eq!(
            acls.decide_any("User:alice", "h", Write, Topic),
            Decision::NotAllowed
        );
        assert_eq!(
            acls.decide_any("User:alice", "h", Read, TransactionalId),
            Decision::NoAcls
        );
    }

    #[tokio::test]
    async fn filters_describe_and_delete() {
        let (meta, acls) = store().await;
        let new = [
            acl(Topic, Literal, "a/b%", "User:x", Read, Allow),
            acl(Topic, Literal, "a/b%", "User:y", Read, Allow),
            acl(Topic, Prefixed, "a/", "User:x", Write, Deny),
            acl(Topic, Literal, "*", "User:x", Describe, Allow),
            acl(Group, Literal, "a/b%", "User:x", Read, Allow),
        ];
        acls.create(&new).await;
        // Creating again changes nothing.
        acls.create(&new[..2]).await;
        assert_eq!(acls.describe(&any_filter()).await.unwrap().len(), 5);
        let matching = AclFilter {
            resource_type: Some(Topic),
            name: Some("a/b%".into()),
            pattern: PatternFilter::Match,
            ..any_filter()
        };
        assert_eq!(acls.describe(&matching).await.unwrap().len(), 4);
        let exact = AclFilter {
            pattern: PatternFilter::Any,
            ..matching.clone()
        };
        assert_eq!(acls.describe(&exact).await.unwrap().len(), 2);
        let x_only = AclFilter {
            principal: Some("User:x".into()),
            ..matching.clone()
        };
        let removed = acls.delete(&[x_only.clone(), x_only]).await;
        assert_eq!(removed[0].as_ref().unwrap().len(), 3);
        assert_eq!(removed[1].as_ref().unwrap().len(), 3);
        let left = acls.describe(&any_filter()).await.unwrap();
        assert_eq!(left, vec![new[1].clone(), new[4].clone()]);
        // Another broker sees the same.
        let other = Acls::load(meta).await.unwrap();
        assert_eq!(other.count(), 2);
        assert_eq!(
            other.decide("User:y", "h", Read, Topic, "a/b%"),
            Decision::Allow
        );
    }

    /// Seeded lost replies and failed reads: creations and deletions are
    /// answered as what happened and the store ends as they say.
    #[tokio::test]
    async fn lost_replies_settle() {
        for seed in 1..=40u64 {
            let inner: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
            let faults = MetaFaults {
                seed,
                txn_reply_lost: 0.4,
                read_failed: 0.2,
                ..MetaFaults::none()
            };
            let meta: Arc<dyn MetaStore> = Arc::new(FaultyMeta::new(inner.clone(), faults));
            let acls = Acls {
                meta,
                snapshot: ArcSwap::from_pointee(Index::default()),
            };
            for round in 0..4 {
                let p = format!("User:{seed}-{round}");
                let new = [
                    acl(Topic, Literal, "t", &p, Read, Allow),
                    acl(Topic, Literal, "t", &p, Write, Allow),
                    acl(Group, Prefixed, "g", &p, Read, Allow),
                ];
                let created = acls.create(&new).await;
                assert!(
                    created.iter().all(|r| r.is_ok()),
                    "seed {seed}: {created:?}"
                );
                let truth = Acls::load(inner.clone()).await.unwrap();
                assert_eq!(truth.count(), 3, "seed {seed}");
                let f = AclFilter {
                    principal: Some(p.clone()),
                    ..any_filter()
                };
                let removed = acls.delete(&[f]).await;
                let removed = removed[0].as_ref();
                assert!(
                    removed.is_ok_and(|r| r.len() == 3),
                    "seed {seed}: {removed:?}"
                );
                truth.refresh().await.unwrap();
                assert_eq!(truth.count(), 0, "seed {seed}");
            }
        }
    }
}

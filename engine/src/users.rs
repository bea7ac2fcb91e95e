//! The SASL/SCRAM users: every broker's view of `scram/*` (the credentials
//! stored there, see [`floe_meta::schema::ScramUserRecord`]), and the
//! changes AlterUserScramCredentials and `floe users` make to it.
//!
//! Lookups are lock-free snapshots, followed by a watch so a user created
//! or changed through any broker is seen within milliseconds; a user the
//! snapshot does not know yet is read from the store before a client is
//! refused. Changes are made per user by compare-and-swap on the revision
//! read. The engine keeps the records opaque: deriving and checking keys is
//! the SASL layer's business (`floe_net::scram`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use floe_meta::schema::{self, ScramCredential, ScramUserRecord};
use floe_meta::{Compare, MetaStore, Op, Txn};

use crate::topics::{follow_prefix, read_prefix};
use crate::{Error, Result};

/// Attempts of one user's compare-and-swap before giving up.
const UPDATE_ATTEMPTS_MAX: usize = 16;

pub type UserMap = HashMap<String, Arc<ScramUserRecord>>;

/// One user's part of an AlterUserScramCredentials request, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserChange {
    /// Mechanisms whose credential is removed.
    pub delete: Vec<String>,
    /// Mechanism → the credential that replaces (or adds) it.
    pub upsert: BTreeMap<String, ScramCredential>,
}

/// Why one user's change was not applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UserChangeError {
    #[error("Attempt to delete a user credential that does not exist: {user} {mechanism}")]
    NotFound { user: String, mechanism: String },
    #[error("{0}")]
    Store(Error),
}

pub struct Users {
    meta: Arc<dyn MetaStore>,
    snapshot: ArcSwap<UserMap>,
}

fn decode(kv: &floe_meta::KeyValue) -> Result<ScramUserRecord> {
    serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
        what: format!("user record {}", kv.key),
        reason: e.to_string(),
    })
}

impl Users {
    pub async fn load(meta: Arc<dyn MetaStore>) -> Result<Self> {
        let u = Self {
            meta,
            snapshot: ArcSwap::from_pointee(UserMap::new()),
        };
        u.refresh().await?;
        Ok(u)
    }

    /// The credential of `user` for `mechanism`, from the snapshot, else
    /// from the store (a user created a moment ago through another broker).
    pub async fn credential(&self, user: &str, mechanism: &str) -> Result<Option<ScramCredential>> {
        if let Some(r) = self.snapshot.load().get(user) {
            if let Some(c) = r.credentials.get(mechanism) {
                return Ok(Some(c.clone()));
            }
        }
        let Some(kv) = self.meta.get(&schema::scram_key(user)).await? else {
            return Ok(None);
        };
        Ok(decode(&kv)?.credentials.get(mechanism).cloned())
    }

    /// Every user with credentials, read from the store (an admin call
    /// must see a change another broker made a moment ago).
    pub async fn list(&self) -> Result<Vec<ScramUserRecord>> {
        read_prefix(&*self.meta, schema::SCRAM_PREFIX, "user record").await
    }

    /// Follows `scram/` until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let meta = self.meta.clone();
        follow_prefix(&*meta, schema::SCRAM_PREFIX, "SCRAM users", || {
            self.refresh()
        })
        .await
    }

    pub async fn refresh(&self) -> Result<()> {
        let map = self
            .list()
            .await?
            .into_iter()
            .map(|r| (r.name.clone(), Arc::new(r)))
            .collect();
        self.snapshot.store(Arc::new(map));
        Ok(())
    }

    /// Applies one user's change atomically: either every deletion and
    /// upsertion lands or none does. A user left without credentials is
    /// removed. An attempt whose outcome is unknown is settled by the next
    /// read: a deletion that finds its credential gone after such an
    /// attempt counts as done.
    pub async fn alter(
        &self,
        user: &str,
        change: &UserChange,
    ) -> std::result::Result<(), UserChangeError> {
        let key = schema::scram_key(user);
        let mut ambiguous = false;
        let mut last = None;
        for _ in 0..UPDATE_ATTEMPTS_MAX {
            let current = match self.meta.get(&key).await {
                Ok(kv) => kv,
                Err(e) => {
                    last = Some(Error::from(e));
                    continue;
                }
            };
            let revision = current.as_ref().map_or(0, |kv| kv.mod_revision);
            let before = match &current {
                Some(kv) => decode(kv).map_err(UserChangeError::Store)?,
                None => ScramUserRecord {
                    name: user.to_string(),
                    credentials: BTreeMap::new(),
                },
            };
            let mut record = before.clone();
            for m in &change.delete {
                if record.credentials.remove(m).is_none() && !ambiguous {
                    return Err(UserChangeError::NotFound {
                        user: user.to_string(),
                        mechanism: m.clone(),
                    });
                }
            }
            for (m, c) in &change.upsert {
                record.credentials.insert(m.clone(), c.clone());
            }
            // Nothing to write (an earlier attempt landed, or the change
            // sets what is there).
            if record == before {
                return Ok(());
            }
            let op = if record.credentials.is_empty() {
                Op::Delete(key.clone())
            } else {
                let value = serde_json::to_vec(&record).map_err(|e| {
                    UserChangeError::Store(Error::Corrupt {
                        what: format!("user record {key}"),
                        reason: e.to_string(),
                    })
                })?;
                Op::Put(key.clone(), Bytes::from(value))
            };
            let txn =
                Txn::when(vec![Compare::ModRevision(key.clone(), revision)]).and_then(vec![op]);
            match self.meta.txn(txn).await {
                Ok(o) if o.succeeded => {
                    let _ = self.refresh().await;
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    ambiguous = true;
                    last = Some(Error::from(e));
                }
            }
        }
        Err(UserChangeError::Store(last.unwrap_or(Error::Conflict {
            what: format!("user {user:?}"),
        })))
    }
}

#[cfg(test)]
mod tests {
    use floe_meta::{Embedded, FaultyMeta, MetaFaults};

    use super::*;

    fn cred(tag: &str) -> ScramCredential {
        ScramCredential {
            salt: format!("salt-{tag}"),
            stored_key: format!("stored-{tag}"),
            server_key: format!("server-{tag}"),
            iterations: 4096,
        }
    }

    fn upsert(m: &str, tag: &str) -> UserChange {
        UserChange {
            delete: vec![],
            upsert: [(m.to_string(), cred(tag))].into(),
        }
    }

    #[tokio::test]
    async fn alter_and_look_up() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let users = Users::load(meta.clone()).await.unwrap();
        users
            .alter("a/b%", &upsert("SCRAM-SHA-256", "1"))
            .await
            .unwrap();
        users
            .alter("a/b%", &upsert("SCRAM-SHA-512", "2"))
            .await
            .unwrap();
        assert_eq!(
            users.credential("a/b%", "SCRAM-SHA-256").await.unwrap(),
            Some(cred("1"))
        );
        // Another broker's view: not in its snapshot yet, read from the store.
        let other = Users {
            meta: meta.clone(),
            snapshot: ArcSwap::from_pointee(UserMap::new()),
        };
        assert_eq!(
            other.credential("a/b%", "SCRAM-SHA-512").await.unwrap(),
            Some(cred("2"))
        );
        assert_eq!(
            other.credential("nobody", "SCRAM-SHA-512").await.unwrap(),
            None
        );
        // Deleting every credential removes the user.
        let bad = UserChange {
            delete: vec!["SCRAM-SHA-512".into(), "SCRAM-SHA-256".into()],
            upsert: BTreeMap::new(),
        };
        users.alter("a/b%", &bad).await.unwrap();
        assert!(
            users.list().await.unwrap().is_empty(),
            "the user is gone with its last credential"
        );
        // Deleting what is not there fails and changes nothing.
        users
            .alter("c", &upsert("SCRAM-SHA-256", "3"))
            .await
            .unwrap();
        let e = users.alter("c", &bad).await.unwrap_err();
        assert!(matches!(e, UserChangeError::NotFound { .. }), "{e}");
        assert_eq!(users.list().await.unwrap().len(), 1);
    }

    /// Seeded lost replies and failed reads: every change is answered
    /// as what happened (a deletion whose reply was lost is not "not
    /// found"), and the store ends as the changes say.
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
            let users = Users {
                meta,
                snapshot: ArcSwap::from_pointee(UserMap::new()),
            };
            let del = |m: &str| UserChange {
                delete: vec![m.to_string()],
                upsert: BTreeMap::new(),
            };
            for round in 0..5 {
                let tag = format!("{seed}-{round}");
                users
                    .alter("u", &upsert("SCRAM-SHA-256", &tag))
                    .await
                    .unwrap();
                users
                    .alter("u", &upsert("SCRAM-SHA-512", &tag))
                    .await
                    .unwrap();
                users.alter("u", &del("SCRAM-SHA-256")).await.unwrap();
                let truth = Users::load(inner.clone()).await.unwrap();
                let all = truth.list().await.unwrap();
                assert_eq!(all.len(), 1, "seed {seed}");
                assert_eq!(
                    all[0].credentials,
                    [("SCRAM-SHA-512".to_string(), cred(&tag))].into(),
                    "seed {seed}"
                );
                users.alter("u", &del("SCRAM-SHA-512")).await.unwrap();
                assert!(truth.list().await.unwrap().is_empty(), "seed {seed}");
            }
        }
    }
}

//! The topic registry: every broker's read-mostly view of `topics/*`.
//! Reads are lock-free snapshots (any shard, any thread); writes go through
//! the metadata store with compare-and-swap and then refresh the snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use floe_meta::schema::{self, TopicRecord};
use floe_meta::{prefix_end, Compare, MetaStore, Op, Txn};

use crate::{Error, Result};

/// Kafka's limit on topic name length.
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Upper bound on partitions per topic that floe accepts.
pub const PARTITIONS_MAX: u32 = 10_000;

pub type TopicMap = HashMap<String, Arc<TopicRecord>>;

/// The same topics by id (Fetch v13+, Produce v13, DeleteTopics by id).
pub type TopicIdMap = HashMap<uuid::Uuid, Arc<TopicRecord>>;

pub struct Topics {
    meta: Arc<dyn MetaStore>,
    snapshot: ArcSwap<TopicMap>,
    /// Stored just before `snapshot`, from the same read.
    by_id: ArcSwap<TopicIdMap>,
}

/// Kafka's rule: 1..=249 characters of `[a-zA-Z0-9._-]`, not "." or "..".
pub fn validate_name(name: &str) -> Result<()> {
    let bad_char = || {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    };
    let reason = if name.is_empty() {
        Some("the empty string is not allowed".to_string())
    } else if name == "." || name == ".." {
        Some(format!("{name:?} is not allowed"))
    } else if name.len() > TOPIC_NAME_BYTES_MAX {
        Some(format!(
            "a name of {} characters exceeds the limit of {TOPIC_NAME_BYTES_MAX}",
            name.len()
        ))
    } else {
        bad_char().map(|c| {
            format!(
                "{name:?} contains {c:?}; only ASCII alphanumerics, '.', '_' and '-' are allowed"
            )
        })
    };
    match reason {
        Some(reason) => Err(Error::InvalidTopic { reason }),
        None => Ok(()),
    }
}

/// Re-reads a watched prefix with `refresh` whenever it changes, and once
/// when each watch begins (what changed before it). Runs until the process
/// ends; a broken watch is made again after half a second.
pub(crate) async fn follow_prefix<F, Fut>(
    meta: &dyn MetaStore,
    prefix: &str,
    what: &str,
    refresh: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use futures::StreamExt;
    loop {
        match meta.watch(prefix, 0).await {
            Ok(mut w) => {
                let _ = refresh().await;
                while let Some(ev) = w.next().await {
                    if ev.is_err() {
                        break;
                    }
                    if let Err(e) = refresh().await {
                        tracing::warn!(error = %e, "refreshing {what} failed");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "watching {what} failed; retrying"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Every JSON record under `prefix`, in key order.
pub(crate) async fn read_prefix<T: serde::de::DeserializeOwned>(
    meta: &dyn MetaStore,
    prefix: &str,
    what: &str,
) -> Result<Vec<T>> {
    let kvs = meta.range(prefix, &prefix_end(prefix), usize::MAX).await?;
    kvs.iter()
        .map(|kv| {
            serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
                what: format!("{what} {}", kv.key),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// What a config alteration makes of a topic's configs (a pure function of
/// them; an error refuses the alteration).
pub type ConfigChange =
    dyn Fn(&BTreeMap<String, String>) -> Result<BTreeMap<String, String>> + Send + Sync;

/// Reads and CAS attempts of [`update_record`] before it gives up.
const UPDATE_ATTEMPTS_MAX: usize = 16;

/// Changes the JSON record at `key` by compare-and-swap on the revision
/// read, retrying after a conflict, a failed read or an unknown outcome.
/// `change` maps the record (None: absent) to what it should become
/// (None: deleted); it must be a pure function of the record, so that an
/// attempt which landed unseen makes the next one write nothing. Returns
/// the record as it now is. (The transaction and SCRAM stores keep their
/// own loops: their transitions also answer, add writes, or judge a
/// deletion by whether an earlier attempt's outcome was unknown.)
pub(crate) async fn update_record<R>(
    meta: &dyn MetaStore,
    key: &str,
    what: &str,
    mut change: impl FnMut(Option<&R>) -> Result<Option<R>>,
) -> Result<Option<R>>
where
    R: serde::Serialize + serde::de::DeserializeOwned + PartialEq,
{
    let corrupt = |e: serde_json::Error| Error::Corrupt {
        what: format!("{what} {key}"),
        reason: e.to_string(),
    };
    let mut last = None;
    for _ in 0..UPDATE_ATTEMPTS_MAX {
        let current = match meta.get(key).await {
            Ok(kv) => kv,
            Err(e) => {
                last = Some(Error::from(e));
                continue;
            }
        };
        let revision = current.as_ref().map_or(0, |kv| kv.mod_revision);
        let before: Option<R> = match &current {
            Some(kv) => Some(serde_json::from_slice(&kv.value).map_err(corrupt)?),
            None => None,
        };
        let after = change(before.as_ref())?;
        if after == before {
            return Ok(after);
        }
        let op = match &after {
            None => Op::Delete(key.to_string()),
            Some(r) => Op::Put(
                key.to_string(),
                Bytes::from(serde_json::to_vec(r).map_err(corrupt)?),
            ),
        };
        let txn =
            Txn::when(vec![Compare::ModRevision(key.to_string(), revision)]).and_then(vec![op]);
        match meta.txn(txn).await {
            Ok(o) if o.succeeded => return Ok(after),
            // Another writer was first: apply to what it wrote.
            Ok(_) => {}
            // Unknown outcome: the next read tells.
            Err(e) => last = Some(Error::from(e)),
        }
    }
    Err(last.unwrap_or(Error::Conflict {
        what: format!("{what} {key}"),
    }))
}

impl Topics {
    pub async fn load(meta: Arc<dyn MetaStore>) -> Result<Self> {
        let t = Self {
            meta,
            snapshot: ArcSwap::from_pointee(TopicMap::new()),
            by_id: ArcSwap::from_pointee(TopicIdMap::new()),
        };
        t.refresh().await?;
        Ok(t)
    }

    pub fn snapshot(&self) -> Arc<TopicMap> {
        self.snapshot.load_full()
    }

    pub fn get(&self, name: &str) -> Option<Arc<TopicRecord>> {
        self.snapshot.load().get(name).cloned()
    }

    /// Every topic by id. A deleted topic's id is gone from it, and a
    /// topic created again under the same name has a new id.
    pub fn by_id(&self) -> Arc<TopicIdMap> {
        self.by_id.load_full()
    }

    /// Follows `topics/` so that topics created, changed or deleted through
    /// any broker are seen here. Runs until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let meta = self.meta.clone();
        follow_prefix(&*meta, schema::TOPICS_PREFIX, "topics", || self.refresh()).await
    }

    /// Re-reads every topic from the store.
    pub async fn refresh(&self) -> Result<()> {
        let records: Vec<TopicRecord> =
            read_prefix(&*self.meta, schema::TOPICS_PREFIX, "topic record").await?;
        let records: Vec<Arc<TopicRecord>> = records.into_iter().map(Arc::new).collect();
        let by_id = records.iter().map(|t| (t.id, t.clone())).collect();
        let map = records.into_iter().map(|t| (t.name.clone(), t)).collect();
        self.by_id.store(Arc::new(by_id));
        self.snapshot.store(Arc::new(map));
        Ok(())
    }

    /// Topic `name` as the store has it now (not as this broker last saw
    /// it), and this broker's view updated if it lagged: a change made
    /// through another broker a moment ago is seen.
    pub async fn get_fresh(&self, name: &str) -> Result<Option<Arc<TopicRecord>>> {
        let key = schema::topic_key(name);
        let Some(kv) = self.meta.get(&key).await? else {
            return Ok(None);
        };
        let rec: TopicRecord = serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
            what: key,
            reason: e.to_string(),
        })?;
        if self.get(name).as_deref() != Some(&rec) {
            // The watch has not delivered it yet; it will, and a refresh
            // now makes the rest of this broker agree sooner.
            self.refresh().await?;
        }
        Ok(Some(Arc::new(rec)))
    }

    /// Creates a topic unless one of that name exists.
    pub async fn create(
        &self,
        name: &str,
        partitions: u32,
        configs: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<Arc<TopicRecord>> {
        validate_name(name)?;
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(Error::InvalidPartitions {
                reason: format!("{partitions} partitions; must be 1..={PARTITIONS_MAX}"),
            });
        }
        let rec = TopicRecord {
            id: uuid::Uuid::new_v4(),
            name: name.to_string(),
            partitions,
            configs,
        };
        if self.get(name).is_some() {
            return Err(Error::TopicExists { name: name.into() });
        }
        if validate_only {
            return Ok(Arc::new(rec));
        }
        let key = schema::topic_key(name);
        let value = Bytes::from(serde_json::to_vec(&rec).map_err(|e| Error::Corrupt {
            what: format!("topic record {name:?}"),
            reason: e.to_string(),
        })?);
        let txn = Txn::when(vec![Compare::ModRevision(key.clone(), 0)])
            .and_then(vec![Op::Put(key, value)]);
        let done = self.meta.txn(txn).await?;
        // The change landed (or lost to another): a failed re-read is not
        // this call's failure; the watch brings the topics in either way.
        let _ = self.refresh().await;
        if !done.succeeded {
            return Err(Error::TopicExists { name: name.into() });
        }
        Ok(Arc::new(rec))
    }

    pub async fn delete(&self, name: &str) -> Result<Arc<TopicRecord>> {
        let old = self
            .get(name)
            .ok_or(Error::UnknownTopic { name: name.into() })?;
        let key = schema::topic_key(name);
        let cur = self
            .meta
            .get(&key)
            .await?
            .ok_or(Error::UnknownTopic { name: name.into() })?;
        let txn = Txn::when(vec![Compare::ModRevision(key.clone(), cur.mod_revision)])
            .and_then(vec![Op::Delete(key)]);
        let done = self.meta.txn(txn).await?;
        // As in `create`: a failed re-read does not undo what landed.
        let _ = self.refresh().await;
        if !done.succeeded {
            return Err(Error::Conflict {
                what: format!("topic {name:?}"),
            });
        }
        Ok(old)
    }

    /// Replaces topic `name`'s configs with what `change` makes of them
    /// ([`update_record`]: `change` must be a function of the configs
    /// alone). Returns the configs as set (with `validate_only`, as they
    /// would be, nothing written).
    pub async fn alter_configs(
        &self,
        name: &str,
        change: &ConfigChange,
        validate_only: bool,
    ) -> Result<BTreeMap<String, String>> {
        let unknown = || Error::UnknownTopic { name: name.into() };
        let key = schema::topic_key(name);
        if validate_only {
            let kv = self.meta.get(&key).await?.ok_or_else(unknown)?;
            let rec: TopicRecord =
                serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
                    what: format!("topic record {key}"),
                    reason: e.to_string(),
                })?;
            return change(&rec.configs);
        }
        let after = update_record(
            &*self.meta,
            &key,
            "topic record",
            |rec: Option<&TopicRecord>| {
                let mut rec = rec.cloned().ok_or_else(unknown)?;
                rec.configs = change(&rec.configs)?;
                Ok(Some(rec))
            },
        )
        .await?;
        // It landed: a failed re-read is the watch's to repair, not a
        // failure of the change.
        let _ = self.refresh().await;
        Ok(after.map(|r| r.configs).unwrap_or_default())
    }

    /// Raises a topic's partition count to `total`.
    pub async fn add_partitions(&self, name: &str, total: u32, validate_only: bool) -> Result<()> {
        let key = schema::topic_key(name);
        let cur = self
            .meta
            .get(&key)
            .await?
            .ok_or(Error::UnknownTopic { name: name.into() })?;
        let mut rec: TopicRecord =
            serde_json::from_slice(&cur.value).map_err(|e| Error::Corrupt {
                what: format!("topic record {}", cur.key),
                reason: e.to_string(),
            })?;
        if total <= rec.partitions || total > PARTITIONS_MAX {
            return Err(Error::InvalidPartitions {
                reason: format!(
                    "topic {name:?} has {} partitions; the new count {total} must be larger and at most {PARTITIONS_MAX}",
                    rec.partitions
                ),
            });
        }
        if validate_only {
            return Ok(());
        }
        rec.partitions = total;
        let value = Bytes::from(serde_json::to_vec(&rec).map_err(|e| Error::Corrupt {
            what: format!("topic record {name:?}"),
            reason: e.to_string(),
        })?);
        let txn = Txn::when(vec![Compare::ModRevision(key.clone(), cur.mod_revision)])
            .and_then(vec![Op::Put(key, value)]);
        let done = self.meta.txn(txn).await?;
        // As in `create`: a failed re-read does not undo what landed.
        let _ = self.refresh().await;
        if !done.succeeded {
            return Err(Error::Conflict {
                what: format!("topic {name:?}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_meta::{Embedded, FaultyMeta, MetaFaults};

    /// Seeded lost replies and failed reads: every alteration is answered
    /// as what happened and the record ends as the last one says.
    #[tokio::test]
    async fn config_changes_settle_lost_replies() {
        for seed in 1..=40u64 {
            let inner: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
            Topics::load(inner.clone())
                .await
                .unwrap()
                .create("t", 1, BTreeMap::new(), false)
                .await
                .unwrap();
            let faults = MetaFaults {
                seed,
                txn_reply_lost: 0.4,
                read_failed: 0.2,
                ..MetaFaults::none()
            };
            let topics = Topics {
                meta: Arc::new(FaultyMeta::new(inner.clone(), faults)),
                snapshot: ArcSwap::from_pointee(TopicMap::new()),
                by_id: ArcSwap::from_pointee(TopicIdMap::new()),
            };
            for round in 0..5u32 {
                let want = round.to_string();
                let value = want.clone();
                let set = move |c: &BTreeMap<String, String>| {
                    let mut c = c.clone();
                    c.insert("retention.ms".into(), value.clone());
                    Ok(c)
                };
                let got = topics.alter_configs("t", &set, false).await;
                assert!(got.is_ok(), "seed {seed}: {got:?}");
                let truth = Topics::load(inner.clone()).await.unwrap();
                let rec = truth.get("t").unwrap();
                assert_eq!(rec.configs.get("retention.ms"), Some(&want), "seed {seed}");
                assert_eq!(rec.partitions, 1);
            }
        }
    }

    /// A change made through another broker's registry is seen by a fresh
    /// read at once, which also brings this registry up to date; before,
    /// this broker (no watch running here) still had the old record.
    #[tokio::test]
    async fn a_fresh_read_sees_a_change_made_elsewhere() {
        let meta: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let here = Topics::load(meta.clone()).await.unwrap();
        let there = Topics::load(meta.clone()).await.unwrap();
        there.create("t", 1, BTreeMap::new(), false).await.unwrap();
        assert!(here.get("t").is_none(), "no watch here: not seen yet");
        let fresh = here.get_fresh("t").await.unwrap().expect("seen fresh");
        assert_eq!(fresh.partitions, 1);
        assert!(here.get("t").is_some(), "the registry caught up");
        let set = |c: &BTreeMap<String, String>| {
            let mut c = c.clone();
            c.insert("retention.ms".into(), "5000".into());
            Ok(c)
        };
        there.alter_configs("t", &set, false).await.unwrap();
        assert_eq!(here.get("t").unwrap().configs.get("retention.ms"), None);
        let fresh = here.get_fresh("t").await.unwrap().unwrap();
        assert_eq!(
            fresh.configs.get("retention.ms").map(String::as_str),
            Some("5000")
        );
        assert!(here.get_fresh("missing").await.unwrap().is_none());
    }

    /// Every read fails, so the re-read after the compare-and-swap does: a
    /// creation that landed is answered as landed, not as the failed
    /// re-read (a retried creation would meet TOPIC_ALREADY_EXISTS).
    /// (DeleteTopics and CreatePartitions read the record before their
    /// swap, which this fault also fails; they end the same way.)
    #[tokio::test]
    async fn a_landed_creation_is_answered_as_landed() {
        let inner: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
        let topics = Topics {
            meta: Arc::new(FaultyMeta::new(
                inner.clone(),
                MetaFaults {
                    seed: 1,
                    read_failed: 1.0,
                    ..MetaFaults::none()
                },
            )),
            snapshot: ArcSwap::from_pointee(TopicMap::new()),
            by_id: ArcSwap::from_pointee(TopicIdMap::new()),
        };
        let made = topics.create("t", 1, BTreeMap::new(), false).await;
        let stored = Topics::load(inner.clone()).await.unwrap().get("t");
        let stored = stored.expect("created in the store");
        assert_eq!(made.expect("answered as landed").id, stored.id);
    }

    #[test]
    fn topic_names() {
        for ok in ["a", "orders.v1", "A_b-c", &"x".repeat(249)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "bad/name", "sp ace", &"x".repeat(250), "ü"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}

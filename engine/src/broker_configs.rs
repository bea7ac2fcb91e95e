//! Dynamic broker configs: what IncrementalAlterConfigs and AlterConfigs
//! set on BROKER resources, kept in the metadata store per scope (the
//! cluster-wide defaults, or one node id) and followed by every broker, so
//! a change applies everywhere within the watch delay. Which names may be
//! set and what values mean is the protocol layer's business; this store
//! keeps strings.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use floe_meta::schema::{self, BrokerConfigRecord};
use floe_meta::MetaStore;

use crate::topics::{follow_prefix, read_prefix, update_record, ConfigChange};
use crate::Result;

/// Configs per scope (`default` or a node id).
pub type BrokerConfigMap = HashMap<String, BTreeMap<String, String>>;

pub struct BrokerConfigs {
    meta: Arc<dyn MetaStore>,
    snapshot: ArcSwap<BrokerConfigMap>,
}

impl BrokerConfigs {
    pub async fn load(meta: Arc<dyn MetaStore>) -> Result<Self> {
        let b = Self {
            meta,
            snapshot: ArcSwap::from_pointee(BrokerConfigMap::new()),
        };
        b.refresh().await?;
        Ok(b)
    }

    /// Follows `configs/brokers/` until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let meta = self.meta.clone();
        follow_prefix(
            &*meta,
            schema::BROKER_CONFIGS_PREFIX,
            "broker configs",
            || self.refresh(),
        )
        .await
    }

    pub async fn refresh(&self) -> Result<()> {
        let records: Vec<BrokerConfigRecord> = read_prefix(
            &*self.meta,
            schema::BROKER_CONFIGS_PREFIX,
            "broker config record",
        )
        .await?;
        let map = records.into_iter().map(|r| (r.scope, r.configs)).collect();
        self.snapshot.store(Arc::new(map));
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<BrokerConfigMap> {
        self.snapshot.load_full()
    }

    /// Replaces scope's configs with what `change` makes of them (a pure
    /// function of them, so a lost reply settles by retrying); an empty
    /// result removes the record. Returns the configs as set (with
    /// `validate_only`, as they would be, nothing written).
    pub async fn alter(
        &self,
        scope: &str,
        change: &ConfigChange,
        validate_only: bool,
    ) -> Result<BTreeMap<String, String>> {
        let key = schema::broker_configs_key(scope);
        if validate_only {
            let current = self.snapshot().get(scope).cloned().unwrap_or_default();
            return change(&current);
        }
        let after = update_record(
            &*self.meta,
            &key,
            "broker config record",
            |cur: Option<&BrokerConfigRecord>| {
                let before = cur.map(|r| r.configs.clone()).unwrap_or_default();
                let configs = change(&before)?;
                Ok((!configs.is_empty()).then(|| BrokerConfigRecord {
                    scope: scope.to_string(),
                    configs,
                }))
            },
        )
        .await?;
        // The watch also brings it; a failed re-read is not this call's.
        let _ = self.refresh().await;
        Ok(after.map(|r| r.configs).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_meta::{Embedded, FaultyMeta, MetaFaults};

    /// Seeded lost replies and failed reads: every alteration ends as
    /// asked, and removing the last config removes the record.
    #[tokio::test]
    async fn alterations_settle_lost_replies() {
        for seed in 1..=30u64 {
            let inner: Arc<dyn MetaStore> = Arc::new(Embedded::in_memory().unwrap());
            let faults = MetaFaults {
                seed,
                txn_reply_lost: 0.4,
                read_failed: 0.2,
                ..MetaFaults::none()
            };
            let store = BrokerConfigs {
                meta: Arc::new(FaultyMeta::new(inner.clone(), faults)),
                snapshot: ArcSwap::from_pointee(BrokerConfigMap::new()),
            };
            for round in 0..4u32 {
                let value = round.to_string();
                let set = move |c: &BTreeMap<String, String>| {
                    let mut c = c.clone();
                    c.insert("num.partitions".into(), value.clone());
                    Ok(c)
                };
                let got = store.alter("default", &set, false).await;
                assert!(got.is_ok(), "seed {seed}: {got:?}");
                let truth = BrokerConfigs::load(inner.clone()).await.unwrap().snapshot();
                assert_eq!(
                    truth["default"].get("num.partitions"),
                    Some(&round.to_string()),
                    "seed {seed}"
                );
            }
            let clear = |_: &BTreeMap<String, String>| Ok(BTreeMap::new());
            assert!(
                store.alter("default", &clear, false).await.is_ok(),
                "seed {seed}"
            );
            let truth = BrokerConfigs::load(inner.clone()).await.unwrap().snapshot();
            assert!(truth.is_empty(), "seed {seed}");
        }
    }
}

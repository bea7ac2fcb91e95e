//! Client quotas (AlterClientQuotas, DescribeClientQuotas): one record per
//! entity in the metadata store, followed by every broker. What the quota
//! keys mean and how they are enforced is the protocol layer's business
//! (`net::quota`); this store keeps numbers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use floe_meta::schema::{self, ClientQuotaRecord, QuotaEntityPart};
use floe_meta::MetaStore;

use crate::topics::{follow_prefix, read_prefix, update_record};
use crate::Result;

/// Quotas per entity (its parts sorted by type).
pub type QuotaMap = HashMap<Vec<QuotaEntityPart>, BTreeMap<String, f64>>;

pub struct Quotas {
    meta: Arc<dyn MetaStore>,
    snapshot: ArcSwap<QuotaMap>,
}

/// One change of AlterClientQuotas: a key set to a value, or removed.
pub type QuotaOp = (String, Option<f64>);

impl Quotas {
    pub async fn load(meta: Arc<dyn MetaStore>) -> Result<Self> {
        let q = Self {
            meta,
            snapshot: ArcSwap::from_pointee(QuotaMap::new()),
        };
        q.refresh().await?;
        Ok(q)
    }

    /// Follows `quotas/` until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let meta = self.meta.clone();
        follow_prefix(&*meta, schema::QUOTAS_PREFIX, "client quotas", || {
            self.refresh()
        })
        .await
    }

    pub async fn refresh(&self) -> Result<()> {
        let records: Vec<ClientQuotaRecord> =
            read_prefix(&*self.meta, schema::QUOTAS_PREFIX, "client quota record").await?;
        let map = records.into_iter().map(|r| (r.entity, r.values)).collect();
        self.snapshot.store(Arc::new(map));
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<QuotaMap> {
        self.snapshot.load_full()
    }

    /// Applies `ops` to `entity`'s quotas (sorted by type); an entity left
    /// with none is removed. Setting and removing are idempotent, so a
    /// lost reply settles by retrying.
    pub async fn alter(&self, mut entity: Vec<QuotaEntityPart>, ops: &[QuotaOp]) -> Result<()> {
        entity.sort();
        let key = schema::quota_key(&entity);
        update_record(
            &*self.meta,
            &key,
            "client quota record",
            |cur: Option<&ClientQuotaRecord>| {
                let mut values = cur.map(|r| r.values.clone()).unwrap_or_default();
                for (k, v) in ops {
                    match v {
                        Some(v) => values.insert(k.clone(), *v),
                        None => values.remove(k),
                    };
                }
                Ok((!values.is_empty()).then(|| ClientQuotaRecord {
                    entity: entity.clone(),
                    values,
                }))
            },
        )
        .await?;
        let _ = self.refresh().await;
        Ok(())
    }
}

//! Membership: each broker registers `brokers/<node id>` under a lease and
//! renews it; every broker watches `brokers/` for the set of live brokers.
//! A broker that dies disappears when its lease expires (its TTL).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use floe_meta::schema::{self, BrokerRecord};
use floe_meta::{prefix_end, Compare, Event, LeaseId, MetaStore, Op, Txn};
use futures::StreamExt;

use crate::{Error, Result};

/// Pause before retrying a failed membership step.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The live brokers, as last seen, and the brokers that left not long
/// ago. Read by any thread.
#[derive(Default)]
pub struct Members {
    live: ArcSwap<Vec<BrokerRecord>>,
    /// Brokers that left the membership, with when this broker saw them go;
    /// forgotten after `departed_listing` or when they come back.
    departed: std::sync::Mutex<Vec<(BrokerRecord, Instant)>>,
    departed_listing: Duration,
}

impl Members {
    /// Members that remember a departed broker for `departed_listing`.
    pub fn new(departed_listing: Duration) -> Self {
        Self {
            departed_listing,
            ..Self::default()
        }
    }

    /// Live brokers, by node id.
    pub fn live(&self) -> Arc<Vec<BrokerRecord>> {
        self.live.load_full()
    }

    /// Brokers that left the membership less than `departed_listing` ago
    /// and have not come back, by node id, marked not ready. Metadata keeps
    /// listing them (leading nothing), so that a broker that is away for a
    /// moment does not make clients discard their handle for it: librdkafka
    /// (2.16) keeps a discarded handle in its coordinator cache and can wait
    /// on it for good (FINDINGS.md, 2026-12-01).
    pub fn departed(&self) -> Vec<BrokerRecord> {
        let mut departed = self.departed.lock().unwrap_or_else(|e| e.into_inner());
        departed.retain(|(_, at)| at.elapsed() < self.departed_listing);
        departed
            .iter()
            .map(|(b, _)| BrokerRecord {
                ready: false,
                ..b.clone()
            })
            .collect()
    }

    fn set(&self, mut brokers: Vec<BrokerRecord>) {
        brokers.sort_by_key(|b| b.node_id);
        let before = self.live.load_full();
        {
            let mut departed = self.departed.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let is_live = |id: i32| brokers.iter().any(|b| b.node_id == id);
            departed.retain(|(b, at)| !is_live(b.node_id) && now - *at < self.departed_listing);
            if !self.departed_listing.is_zero() {
                for gone in before.iter().filter(|b| !is_live(b.node_id)) {
                    departed.retain(|(b, _)| b.node_id != gone.node_id);
                    departed.push((gone.clone(), now));
                }
            }
            departed.sort_by_key(|(b, _)| b.node_id);
        }
        self.live.store(Arc::new(brokers));
    }

    /// Follows `brokers/` until the process ends.
    pub async fn follow(self: Arc<Self>, meta: Arc<dyn MetaStore>) {
        loop {
            if let Err(e) = self.follow_once(&*meta).await {
                tracing::warn!(error = %e, "membership watch interrupted; restarting");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }

    async fn follow_once(&self, meta: &dyn MetaStore) -> Result<()> {
        let rev = meta.revision().await?;
        let kvs = meta
            .range(
                schema::BROKERS_PREFIX,
                &prefix_end(schema::BROKERS_PREFIX),
                usize::MAX,
            )
            .await?;
        let mut brokers: Vec<BrokerRecord> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        self.set(brokers.clone());
        let mut w = meta.watch(schema::BROKERS_PREFIX, rev + 1).await?;
        while let Some(ev) = w.next().await {
            match ev? {
                Event::Put(kv) => {
                    if let Ok(b) = serde_json::from_slice::<BrokerRecord>(&kv.value) {
                        brokers.retain(|x| x.node_id != b.node_id);
                        let listeners: Vec<String> = b
                            .listeners
                            .iter()
                            .map(|l| format!("{}://{}:{}", l.name, l.host, l.port))
                            .collect();
                        tracing::info!(node = b.node_id, host = %b.host, port = b.port, zone = %b.zone, group = %b.group, listeners = %listeners.join(","), "broker joined");
                        brokers.push(b);
                    }
                }
                Event::Delete { key, .. } => {
                    if let Some(id) = key
                        .strip_prefix(schema::BROKERS_PREFIX)
                        .and_then(|s| s.parse::<i32>().ok())
                    {
                        tracing::info!(node = id, "broker left");
                        brokers.retain(|x| x.node_id != id);
                    }
                }
            }
            self.set(brokers.clone());
        }
        Ok(())
    }
}

/// Allocates a node id unused in the cluster (counter in `nodes/next`).
pub async fn allocate_node_id(meta: &dyn MetaStore) -> Result<i32> {
    let id = floe_meta::take_next(meta, schema::NODES_NEXT, 1).await?;
    i32::try_from(id).map_err(|_| Error::Corrupt {
        what: schema::NODES_NEXT.to_string(),
        reason: format!("node id counter {id} is out of range"),
    })
}

/// What fences this broker's commits on its registration. Clients learn
/// that a broker left when its lease expires: its partitions move, and
/// once it drops out of Metadata (after the departed listing, see
/// [`Members::departed`]) librdkafka fails the requests it had in flight
/// there as "not persisted" and may send those records again under a new
/// epoch. So a
/// commit must never land once the registration it was made under is
/// gone: every log entry compares the registration key's create revision
/// (a re-registration creates the key anew), and segments sealed before
/// the current registration are never committed.
#[derive(Debug)]
pub struct Fence {
    key: String,
    create_revision: std::sync::atomic::AtomicU64,
    registered_at: std::sync::Mutex<tokio::time::Instant>,
}

impl Fence {
    fn new(key: String, create_revision: u64) -> Self {
        Self {
            key,
            create_revision: create_revision.into(),
            registered_at: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// The registration key it compares.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The registration key's create revision now.
    pub fn revision(&self) -> u64 {
        self.create_revision
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// When the current registration was made.
    pub fn registered_at(&self) -> tokio::time::Instant {
        *self.registered_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn renew(&self, create_revision: u64) {
        *self.registered_at.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
        self.create_revision
            .store(create_revision, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A broker's registration: renewed while it lives, revoked on shutdown.
pub struct Registration {
    meta: Arc<dyn MetaStore>,
    record: BrokerRecord,
    ttl: Duration,
    lease: LeaseId,
    fence: Arc<Fence>,
}

impl Registration {
    /// Registers `record` under a new lease. If the node id is held by a
    /// live lease (another broker, or this broker's previous life killed
    /// before its lease ran out), waits up to two TTLs for it to go.
    pub async fn register(
        meta: Arc<dyn MetaStore>,
        record: BrokerRecord,
        ttl: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + 2 * ttl + Duration::from_secs(1);
        let mut warned = false;
        loop {
            let lease = put_record(&*meta, &record, ttl).await?;
            if let Some((lease, revision)) = lease {
                let fence = Arc::new(Fence::new(schema::broker_key(record.node_id), revision));
                return Ok(Self {
                    meta,
                    record,
                    ttl,
                    lease,
                    fence,
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::NodeIdTaken {
                    node_id: record.node_id,
                });
            }
            if !warned {
                tracing::warn!(
                    node = record.node_id,
                    "node id still registered (a previous run?); waiting for its lease to expire"
                );
                warned = true;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The fence on this registration, for the committer.
    pub fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// Renews the lease every third of its TTL until `drained` resolves,
    /// then revokes it so the broker leaves at once. Re-registers if the
    /// lease was lost (for example after the store was unreachable for a
    /// TTL). Each renewal is stamped in `metrics`; when `ready()` changes,
    /// the record is written again saying so, and other brokers' Metadata
    /// answers leave this broker out while it is not ready.
    ///
    /// `stopping` (the shutdown trigger) only wakes the loop early, so a
    /// draining broker says at once that it is not ready (`ready()` must
    /// answer false by then); the lease itself is held until `drained`,
    /// because the commits of what the shards seal while draining are
    /// fenced by it and would be given up without it.
    pub async fn maintain(
        mut self,
        stopping: impl std::future::Future<Output = ()>,
        drained: impl std::future::Future<Output = ()>,
        metrics: Arc<crate::metrics::Metrics>,
        ready: impl Fn() -> bool,
    ) {
        use crate::metrics::Metrics;
        Metrics::set(&metrics.lease_renewed_at_ms, crate::health::now_ms());
        let mut drained = std::pin::pin!(drained);
        let mut stopping = std::pin::pin!(futures::FutureExt::fuse(stopping));
        let mut draining = false;
        loop {
            tokio::select! {
                _ = &mut drained => break,
                _ = &mut stopping => draining = true,
                _ = tokio::time::sleep(self.ttl / 3) => {}
            }
            let ready = ready();
            if ready != self.record.ready {
                self.record.ready = ready;
                match put_leased(&*self.meta, &self.record, self.lease).await {
                    Ok(()) if draining => tracing::info!(
                        node = self.record.node_id,
                        "told the cluster this broker is draining"
                    ),
                    Ok(()) => tracing::warn!(
                        node = self.record.node_id,
                        ready,
                        "told the cluster this broker's readiness changed"
                    ),
                    Err(e) => {
                        // Tried again on the next turn.
                        self.record.ready = !ready;
                        tracing::debug!(error = %e, "updating the registration failed");
                    }
                }
            }
            match self.meta.keep_alive(self.lease).await {
                Ok(()) => Metrics::set(&metrics.lease_renewed_at_ms, crate::health::now_ms()),
                Err(floe_meta::Error::LeaseExpired { .. }) => {
                    tracing::warn!(
                        node = self.record.node_id,
                        "registration lease lost; registering again"
                    );
                    match put_record(&*self.meta, &self.record, self.ttl).await {
                        Ok(Some((lease, revision))) => {
                            self.lease = lease;
                            self.fence.renew(revision);
                        }
                        Ok(None) => tracing::error!(
                            node = self.record.node_id,
                            "node id taken by another broker while this one was away"
                        ),
                        Err(e) => tracing::warn!(error = %e, "re-registration failed; will retry"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the registration failed; will retry")
                }
            }
        }
        if let Err(e) = self.meta.revoke_lease(self.lease).await {
            tracing::debug!(error = %e, "revoking the registration lease failed; it will expire");
        }
    }
}

/// Writes the record again under the lease it holds.
async fn put_leased(meta: &dyn MetaStore, record: &BrokerRecord, lease: LeaseId) -> Result<()> {
    let key = schema::broker_key(record.node_id);
    let value = Bytes::from(serde_json::to_vec(record).map_err(|e| Error::Corrupt {
        what: key.clone(),
        reason: e.to_string(),
    })?);
    meta.txn(Txn::default().and_then(vec![Op::PutLeased(key, value, lease)]))
        .await?;
    Ok(())
}

/// Puts the record under a fresh lease if the key is free, returning the
/// lease and the key's create revision; `None` if taken.
async fn put_record(
    meta: &dyn MetaStore,
    record: &BrokerRecord,
    ttl: Duration,
) -> Result<Option<(LeaseId, u64)>> {
    let key = schema::broker_key(record.node_id);
    let value = Bytes::from(serde_json::to_vec(record).map_err(|e| Error::Corrupt {
        what: key.clone(),
        reason: e.to_string(),
    })?);
    let lease = meta.grant_lease(ttl).await?;
    let txn = Txn::when(vec![Compare::ModRevision(key.clone(), 0)])
        .and_then(vec![Op::PutLeased(key, value, lease)]);
    let outcome = meta.txn(txn).await?;
    if outcome.succeeded {
        // The key was absent: this transaction created it.
        Ok(Some((lease, outcome.revision)))
    } else {
        let _ = meta.revoke_lease(lease).await;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: i32) -> BrokerRecord {
        BrokerRecord {
            node_id: id,
            host: "h".into(),
            port: 9092,
            zone: String::new(),
            group: String::new(),
            listeners: Vec::new(),
            ready: true,
        }
    }

    fn ids(v: &[BrokerRecord]) -> Vec<i32> {
        v.iter().map(|b| b.node_id).collect()
    }

    #[test]
    fn a_broker_that_left_is_remembered_until_it_returns_or_the_listing_ends() {
        let m = Members::new(Duration::from_millis(300));
        m.set(vec![rec(2), rec(1), rec(3)]);
        assert!(m.departed().is_empty());
        m.set(vec![rec(1), rec(2)]);
        assert_eq!(ids(&m.live()), [1, 2]);
        let gone = m.departed();
        assert_eq!(ids(&gone), [3]);
        assert!(!gone[0].ready, "listed as not ready");
        // It comes back: live again, no longer departed.
        m.set(vec![rec(1), rec(2), rec(3)]);
        assert!(m.departed().is_empty());
        // Two leave; one returns; the other is forgotten after the listing.
        m.set(vec![rec(1)]);
        assert_eq!(ids(&m.departed()), [2, 3]);
        m.set(vec![rec(1), rec(3)]);
        assert_eq!(ids(&m.departed()), [2]);
        std::thread::sleep(Duration::from_millis(350));
        assert!(m.departed().is_empty(), "forgotten after the listing");
        // A listing of zero remembers nobody.
        let none = Members::new(Duration::ZERO);
        none.set(vec![rec(1), rec(2)]);
        none.set(vec![rec(1)]);
        assert!(none.departed().is_empty());
    }
}

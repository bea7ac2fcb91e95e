//! A [`MetaStore`] wrapper that injects the failures a real etcd client
//! sees: a transaction whose reply is lost after it was applied ("outcome
//! unknown"), a request refused before it reached the store (a lost
//! connection), failed reads, outages (a run of failed requests, as when a
//! broker is cut off from etcd) and delays. Decisions come from a seeded generator,
//! so a failing schedule can be run again from its seed. With
//! [`MetaFaults::none`] it passes the conformance suite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Error, KeyValue, LeaseId, MetaStore, Result, Txn, TxnOutcome, Watch};

/// How often each fault happens, as a probability per request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetaFaults {
    pub seed: u64,
    /// A transaction is applied, then its reply is lost.
    pub txn_reply_lost: f64,
    /// A transaction fails before it reaches the store.
    pub txn_refused: f64,
    /// A `get` or `range` fails.
    pub read_failed: f64,
    /// A request starts an outage: it and the next `outage_requests`
    /// requests fail.
    pub outage_start: f64,
    pub outage_requests: u32,
    /// The chance that a transaction sent during an outage is applied
    /// anyway (its reply lost, as when the link breaks on the way back);
    /// the others never reach the store (cut off on the way there).
    pub outage_txn_applied: f64,
    /// Each request first waits a uniform delay up to this many
    /// milliseconds (on tokio's clock, so a paused clock makes it free).
    pub delay_max_ms: u64,
}

impl MetaFaults {
    pub fn none() -> Self {
        Self {
            seed: 0,
            txn_reply_lost: 0.0,
            txn_refused: 0.0,
            read_failed: 0.0,
            outage_start: 0.0,
            outage_requests: 0,
            outage_txn_applied: 1.0,
            delay_max_ms: 0,
        }
    }
}

/// What was injected so far.
#[derive(Debug, Default)]
pub struct MetaFaultCounts {
    pub txn_reply_lost: AtomicU64,
    pub txn_refused: AtomicU64,
    pub read_failed: AtomicU64,
    pub outage_failed: AtomicU64,
}

/// splitmix64: small, seedable, and the same on every platform — what
/// fault injection and seeded schedules draw from.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

pub struct FaultyMeta {
    inner: Arc<dyn MetaStore>,
    faults: MetaFaults,
    rng: Mutex<Rng>,
    /// Requests left in the current outage.
    outage_left: Mutex<u32>,
    pub counts: MetaFaultCounts,
}

impl FaultyMeta {
    pub fn new(inner: Arc<dyn MetaStore>, faults: MetaFaults) -> Self {
        Self {
            inner,
            rng: Mutex::new(Rng(faults.seed)),
            outage_left: Mutex::new(0),
            faults,
            counts: MetaFaultCounts::default(),
        }
    }

    fn roll(&self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        rng.next_f64() < p
    }

    /// Whether this request falls in an outage (starting one, perhaps).
    fn in_outage(&self) -> bool {
        let mut left = self.outage_left.lock().unwrap_or_else(|e| e.into_inner());
        if *left == 0 && self.roll(self.faults.outage_start) {
            *left = self.faults.outage_requests + 1;
        }
        if *left == 0 {
            return false;
        }
        *left -= 1;
        self.counts.outage_failed.fetch_add(1, Ordering::Relaxed);
        true
    }

    async fn delay(&self) {
        if self.faults.delay_max_ms == 0 {
            return;
        }
        let ms = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            rng.below(self.faults.delay_max_ms + 1)
        };
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }

    fn read_fault(&self, op: &'static str) -> Result<()> {
        if self.in_outage() {
            return Err(Error::Unavailable {
                op,
                reason: "injected: outage".into(),
            });
        }
        if self.roll(self.faults.read_failed) {
            self.counts.read_failed.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Unavailable {
                op,
                reason: "injected: read failed".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl MetaStore for FaultyMeta {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.delay().await;
        self.read_fault("get")?;
        self.inner.get(key).await
    }

    async fn range(&self, start: &str, end: &str, limit: usize) -> Result<Vec<KeyValue>> {
        self.delay().await;
        self.read_fault("range")?;
        self.inner.range(start, end, limit).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        self.delay().await;
        if self.roll(self.faults.txn_refused) {
            self.counts.txn_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Unavailable {
                op: "txn",
                reason: "injected: connection lost before the request was sent".into(),
            });
        }
        if self.in_outage() {
            if !self.roll(self.faults.outage_txn_applied) {
                return Err(Error::Unavailable {
                    op: "txn",
                    reason: "injected: outage (the request never reached the store)".into(),
                });
            }
            self.inner.txn(txn).await?;
            self.counts.txn_reply_lost.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Unavailable {
                op: "txn",
                reason: "injected: outage (reply lost after the transaction was applied)".into(),
            });
        }
        let lose_reply = self.roll(self.faults.txn_reply_lost);
        let outcome = self.inner.txn(txn).await?;
        if lose_reply {
            self.counts.txn_reply_lost.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Unavailable {
                op: "txn",
                reason: "injected: reply lost after the transaction was applied".into(),
            });
        }
        Ok(outcome)
    }

    async fn revision(&self) -> Result<u64> {
        self.inner.revision().await
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch> {
        self.inner.watch(prefix, from_revision).await
    }

    async fn grant_lease(&self, ttl: std::time::Duration) -> Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.revoke_lease(lease).await
    }

    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_with_faults_off() {
        let inner = Arc::new(crate::Embedded::in_memory().expect("in-memory store"));
        crate::conformance::run(Arc::new(FaultyMeta::new(inner, MetaFaults::none()))).await;
    }

    #[tokio::test]
    async fn a_lost_reply_still_applies_the_transaction() {
        use crate::Op;
        let inner: Arc<dyn MetaStore> =
            Arc::new(crate::Embedded::in_memory().expect("in-memory store"));
        let faulty = FaultyMeta::new(
            inner.clone(),
            MetaFaults {
                txn_reply_lost: 1.0,
                ..MetaFaults::none()
            },
        );
        let r = faulty
            .txn(Txn::default().and_then(vec![Op::Put("k".into(), "v".into())]))
            .await;
        assert!(r.is_err(), "the caller sees a failure");
        let kv = inner.get("k").await.expect("get");
        assert!(kv.is_some(), "but the write landed");
    }

    #[test]
    fn the_same_seed_gives_the_same_faults() {
        let draw = |seed| {
            let mut r = Rng(seed);
            (0..8).map(|_| r.next_f64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(draw(1).iter().all(|x| (0.0..1.0).contains(x)));
    }
}

//! A fault-injecting wrapper for tests: any backend, with seeded, per-request
//! probabilities of I/O errors, lost replies, added latency, timeouts and
//! truncated bodies.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{check_body_len, Accounting, Error, ObjectMeta, ObjectStore, Result};

/// Which faults to inject. Rates are probabilities per request; the sum of
/// the error, lost-reply, timeout and truncate rates must not exceed 1 (one
/// request gets at most one of them, plus latency independently).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultConfig {
    /// Seed of the fault sequence: the same seed and the same order of
    /// requests give the same faults.
    pub seed: u64,
    /// The request fails with a retriable I/O error and does nothing.
    pub error_rate: f64,
    /// The request takes effect, then its reply is lost: a retriable I/O
    /// error although a put or delete happened (as after a dropped
    /// connection).
    pub lost_reply_rate: f64,
    /// The request is delayed first, uniformly between `latency_min` and
    /// `latency_max` (a slow store rather than a jittery one when the
    /// minimum is high).
    pub latency_rate: f64,
    pub latency_min: Duration,
    pub latency_max: Duration,
    /// The request hangs for `timeout_after`, then fails with
    /// [`Error::Timeout`] and does nothing.
    pub timeout_rate: f64,
    pub timeout_after: Duration,
    /// A get's body arrives cut short; it must surface as
    /// [`Error::Truncated`]. Applies to `get` and `get_range` only.
    pub truncate_rate: f64,
}

impl FaultConfig {
    /// Parses `seed=7,errors=0.2,lost_replies=0.05,latency=0.3,latency_min_ms=0,latency_max_ms=100,
    /// timeouts=0.01,timeout_ms=2000,truncate=0.05` (any subset; rates are
    /// per request).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut c = Self::none();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = || {
                Error::Config {
                reason: format!("object-store fault {item:?}: expected NAME=VALUE with a known name and a number"),
            }
            };
            let (name, value) = item.split_once('=').ok_or_else(bad)?;
            let rate = || value.parse::<f64>().map_err(|_| bad());
            let ms = || {
                value
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| bad())
            };
            match name {
                "seed" => c.seed = value.parse().map_err(|_| bad())?,
                "errors" => c.error_rate = rate()?,
                "lost_replies" => c.lost_reply_rate = rate()?,
                "latency" => c.latency_rate = rate()?,
                "latency_min_ms" => c.latency_min = ms()?,
                "latency_max_ms" => c.latency_max = ms()?,
                "timeouts" => c.timeout_rate = rate()?,
                "timeout_ms" => c.timeout_after = ms()?,
                "truncate" => c.truncate_rate = rate()?,
                _ => return Err(bad()),
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// No faults: the wrapper passes every request through.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        let rates = [
            self.error_rate,
            self.lost_reply_rate,
            self.latency_rate,
            self.timeout_rate,
            self.truncate_rate,
        ];
        let exclusive =
            self.error_rate + self.lost_reply_rate + self.timeout_rate + self.truncate_rate;
        if self.latency_min > self.latency_max {
            return Err(Error::Config {
                reason: format!(
                    "latency_min_ms {:?} exceeds latency_max_ms {:?}",
                    self.latency_min, self.latency_max
                ),
            });
        }
        if rates.iter().any(|r| !(0.0..=1.0).contains(r)) || exclusive > 1.0 + f64::EPSILON {
            return Err(Error::Config {
                reason: format!("fault rates must be in [0, 1] and the exclusive ones sum to at most 1: {self:?}"),
            });
        }
        Ok(())
    }
}

/// How many faults were injected, by kind.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub errors: AtomicU64,
    pub lost_replies: AtomicU64,
    pub latencies: AtomicU64,
    pub timeouts: AtomicU64,
    pub truncations: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Error,
    LostReply,
    Timeout,
    Truncate,
}

/// The fate of one request, drawn when it starts.
#[derive(Debug)]
struct Plan {
    latency: Option<Duration>,
    fault: Fault,
    /// Where a truncated body is cut, as a fraction of its length.
    cut: f64,
}

#[derive(Debug)]
struct Dice {
    config: FaultConfig,
    rng: StdRng,
}

/// Wraps a backend and injects faults into its requests. Passes the
/// conformance suite with [`FaultConfig::none`].
#[derive(Debug)]
pub struct Faulty<S> {
    inner: S,
    dice: Mutex<Dice>,
    injected: Arc<FaultCounts>,
}

impl<S: ObjectStore> Faulty<S> {
    pub fn new(inner: S, config: FaultConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            inner,
            dice: Mutex::new(Dice {
                rng: StdRng::seed_from_u64(config.seed),
                config,
            }),
            injected: Arc::default(),
        })
    }

    /// Changes the faults from the next request on (the random sequence
    /// continues; the new config's seed is ignored).
    pub fn set_faults(&self, config: FaultConfig) -> Result<()> {
        config.validate()?;
        self.dice().config = config;
        Ok(())
    }

    pub fn injected(&self) -> &FaultCounts {
        &self.injected
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn dice(&self) -> std::sync::MutexGuard<'_, Dice> {
        // The dice hold no invariant a panicking holder could break.
        self.dice.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn plan(&self, is_get: bool) -> Plan {
        let mut d = self.dice();
        let Dice { config: c, rng } = &mut *d;
        let latency = (c.latency_rate > 0.0 && rng.random::<f64>() < c.latency_rate)
            .then(|| c.latency_min + (c.latency_max - c.latency_min).mul_f64(rng.random::<f64>()));
        let x = rng.random::<f64>();
        let cut = rng.random::<f64>();
        let mut edge = 0.0;
        let mut fault = Fault::None;
        for (rate, f) in [
            (c.error_rate, Fault::Error),
            (c.lost_reply_rate, Fault::LostReply),
            (c.timeout_rate, Fault::Timeout),
            (if is_get { c.truncate_rate } else { 0.0 }, Fault::Truncate),
        ] {
            edge += rate;
            if x < edge {
                fault = f;
                break;
            }
        }
        Plan {
            latency,
            fault,
            cut,
        }
    }

    /// Applies the faults that strike before the request reaches the store.
    async fn before(&self, op: &'static str, key: &str, is_get: bool) -> Result<Plan> {
        let plan = self.plan(is_get);
        if let Some(d) = plan.latency {
            self.injected.latencies.fetch_add(1, Relaxed);
            tokio::time::sleep(d).await;
        }
        match plan.fault {
            Fault::Error => {
                self.injected.errors.fetch_add(1, Relaxed);
                Err(Error::Io {
                    op,
                    key: key.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected fault: connection reset",
                    ),
                })
            }
            Fault::Timeout => {
                self.injected.timeouts.fetch_add(1, Relaxed);
                let after = self.dice().config.timeout_after;
                tokio::time::sleep(after).await;
                Err(Error::Timeout {
                    op,
                    key: key.to_string(),
                    after,
                })
            }
            _ => Ok(plan),
        }
    }

    /// Applies the faults that strike after the store answered.
    fn after<T>(&self, plan: &Plan, op: &'static str, key: &str, r: Result<T>) -> Result<T> {
        if plan.fault == Fault::LostReply && r.is_ok() {
            self.injected.lost_replies.fetch_add(1, Relaxed);
            return Err(Error::Io {
                op,
                key: key.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "injected fault: reply lost after the request took effect",
                ),
            });
        }
        r
    }

    /// Cuts a body short when the plan says so; the length check turns it
    /// into [`Error::Truncated`], as a real short read must be.
    fn body(&self, plan: &Plan, op: &'static str, key: &str, body: Bytes) -> Result<Bytes> {
        let expected = body.len() as u64;
        if plan.fault != Fault::Truncate || body.is_empty() {
            return Ok(body);
        }
        self.injected.truncations.fetch_add(1, Relaxed);
        let cut = ((body.len() as f64 * plan.cut) as usize).min(body.len() - 1);
        let short = body.slice(..cut);
        check_body_len(op, key, expected, &short)?;
        Ok(short)
    }
}

#[async_trait::async_trait]
impl<S: ObjectStore> ObjectStore for Faulty<S> {
    async fn put(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        let plan = self.before("put", key, false).await?;
        let r = self.inner.put(key, parts).await;
        self.after(&plan, "put", key, r)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let plan = self.before("get_range", key, true).await?;
        let r = self.inner.get_range(key, range).await;
        let body = self.after(&plan, "get_range", key, r)?;
        self.body(&plan, "get_range", key, body)
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let plan = self.before("get", key, true).await?;
        let r = self.inner.get(key).await;
        let body = self.after(&plan, "get", key, r)?;
        self.body(&plan, "get", key, body)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let plan = self.before("delete", key, false).await?;
        let r = self.inner.delete(key).await;
        self.after(&plan, "delete", key, r)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let plan = self.before("list", prefix, false).await?;
        let r = self.inner.list(prefix).await;
        self.after(&plan, "list", prefix, r)
    }

    async fn abort_stale_uploads(&self, older_than: std::time::Duration) -> Result<usize> {
        self.inner.abort_stale_uploads(older_than).await
    }

    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    fn accounting(&self) -> Option<Arc<Accounting>> {
        self.inner.accounting()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn fault_specs_parse_and_reject_nonsense() {
        let c = FaultConfig::parse(
            "seed=7, errors=0.2,lost_replies=0.1,latency=0.3,latency_max_ms=100,truncate=0.2",
        )
        .expect("valid spec");
        assert_eq!((c.seed, c.error_rate, c.truncate_rate), (7, 0.2, 0.2));
        assert_eq!(c.latency_max, Duration::from_millis(100));
        assert_eq!(FaultConfig::parse("").expect("empty"), FaultConfig::none());
        for bad in [
            "errors",
            "errors=x",
            "nope=1",
            "errors=0.8,truncate=0.5",
            "errors=-1",
        ] {
            assert!(FaultConfig::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    use super::*;
    use crate::Memory;

    fn faulty(config: FaultConfig) -> Faulty<Memory> {
        Faulty::new(Memory::default(), config).unwrap()
    }

    fn data() -> Vec<Bytes> {
        vec![Bytes::from_static(b"hello "), Bytes::from_static(b"world")]
    }

    #[tokio::test]
    async fn conformance_with_faults_off() {
        crate::conformance::run(&faulty(FaultConfig::none())).await;
    }

    #[tokio::test]
    async fn injected_error_is_retriable_and_does_nothing() {
        let f = faulty(FaultConfig {
            error_rate: 1.0,
            ..Default::default()
        });
        let e = f.put("a", data()).await.unwrap_err();
        assert!(
            matches!(e, Error::Io { op: "put", .. }) && e.is_retriable(),
            "{e}"
        );
        assert!(matches!(
            f.inner().get("a").await,
            Err(Error::NotFound { .. })
        ));
        assert_eq!(f.injected().errors.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn lost_reply_fails_although_the_put_happened() {
        let f = faulty(FaultConfig {
            lost_reply_rate: 1.0,
            ..Default::default()
        });
        let e = f.put("a", data()).await.unwrap_err();
        assert!(e.is_retriable(), "{e}");
        assert_eq!(&f.inner().get("a").await.unwrap()[..], b"hello world");
        assert_eq!(f.injected().lost_replies.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn latency_delays_but_succeeds() {
        let f = faulty(FaultConfig {
            latency_rate: 1.0,
            latency_max: Duration::from_millis(40),
            seed: 3,
            ..Default::default()
        });
        f.put("a", data()).await.unwrap();
        assert_eq!(&f.get("a").await.unwrap()[..], b"hello world");
        assert_eq!(f.injected().latencies.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn timeout_hangs_then_fails() {
        let f = faulty(FaultConfig {
            timeout_rate: 1.0,
            timeout_after: Duration::from_millis(50),
            ..Default::default()
        });
        let start = tokio::time::Instant::now();
        let e = f.list("").await.unwrap_err();
        assert!(matches!(e, Error::Timeout { op: "list", .. }), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(f.injected().timeouts.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn truncated_body_is_an_error_never_short_data() {
        let f = faulty(FaultConfig::none());
        f.put("a", data()).await.unwrap();
        f.set_faults(FaultConfig {
            truncate_rate: 1.0,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..20 {
            let e = f.get("a").await.unwrap_err();
            assert!(matches!(e, Error::Truncated { expected: 11, .. }), "{e}");
            let e = f.get_range("a", 2..9).await.unwrap_err();
            assert!(matches!(e, Error::Truncated { expected: 7, .. }), "{e}");
        }
        // Puts, deletes and lists have no body to cut.
        f.put("b", data()).await.unwrap();
        assert_eq!(f.list("").await.unwrap().len(), 2);
        assert_eq!(f.injected().truncations.load(Relaxed), 40);
    }

    #[tokio::test]
    async fn same_seed_same_faults() {
        let config = FaultConfig {
            seed: 42,
            error_rate: 0.3,
            truncate_rate: 0.3,
            ..Default::default()
        };
        let outcomes = |f: Faulty<Memory>| async move {
            f.inner().put("a", data()).await.unwrap();
            let mut v = Vec::new();
            for _ in 0..64 {
                v.push(match f.get("a").await {
                    Ok(_) => 'o',
                    Err(Error::Io { .. }) => 'e',
                    Err(Error::Truncated { .. }) => 't',
                    Err(e) => panic!("{e}"),
                });
            }
            v
        };
        let a = outcomes(faulty(config.clone())).await;
        let b = outcomes(faulty(config)).await;
        assert_eq!(a, b);
        for c in ['o', 'e', 't'] {
            assert!(a.contains(&c), "{c} never drawn in {a:?}");
        }
    }

    #[test]
    fn rejects_impossible_rates() {
        let bad = FaultConfig {
            error_rate: 0.7,
            timeout_rate: 0.7,
            ..Default::default()
        };
        assert!(Faulty::new(Memory::default(), bad).is_err());
    }
}

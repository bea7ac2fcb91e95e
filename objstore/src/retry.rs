//! Bounded retries with full-jitter exponential backoff and a total
//! deadline, shared by the remote backends.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::{Error, RequestCounters, Result};

/// How one logical operation is retried. Every attempt is limited by
/// `attempt_timeout`, the whole operation by `deadline` (attempts and
/// sleeps together), and the count of retries by `retry_max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retry_max: u32,
    /// Total time for all attempts and the sleeps between them.
    pub deadline: Duration,
    /// Time for one attempt.
    pub attempt_timeout: Duration,
    /// Upper bound of the first sleep; doubles per retry.
    pub backoff_base: Duration,
    /// Cap of the sleep's upper bound.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retry_max: 10,
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The sleep before retry number `retry` (1-based): uniform in
    /// `[0, min(backoff_max, backoff_base * 2^(retry-1))]` ("full jitter"),
    /// so that many brokers throttled together do not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << (retry.saturating_sub(1)).min(20));
        let cap = exp.min(self.backoff_max);
        cap.mul_f64(rand::rng().random::<f64>())
    }

    /// Runs `attempt` until it succeeds, fails with an error that is not
    /// retriable, or the bounds are reached (then
    /// [`Error::RetriesExhausted`] carrying the last failure). `counters`
    /// records retries, throttling and timeouts; the attempt itself counts
    /// its request.
    pub async fn run<T, F, Fut>(
        &self,
        counters: &RequestCounters,
        op: &'static str,
        key: &str,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut failures: u32 = 0;
        loop {
            let left = self.deadline.saturating_sub(start.elapsed());
            let limit = self.attempt_timeout.min(left);
            let result = match tokio::time::timeout(limit, attempt()).await {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout {
                    op,
                    key: key.to_string(),
                    after: limit,
                }),
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            counters.error();
            match err {
                Error::Throttled { .. } => RequestCounters::bump(&counters.throttled),
                Error::Timeout { .. } => RequestCounters::bump(&counters.timeouts),
                _ => {}
            }
            if !err.is_retriable() {
                return Err(err);
            }
            failures += 1;
            let sleep = self.backoff(failures);
            let elapsed = start.elapsed();
            if failures > self.retry_max || elapsed + sleep >= self.deadline {
                return Err(Error::RetriesExhausted {
                    op,
                    key: key.to_string(),
                    attempts: failures,
                    elapsed,
                    source: Box::new(err),
                });
            }
            tracing::debug!(
                op,
                key,
                failures,
                ?sleep,
                "retrying object store request: {err}"
            );
            RequestCounters::bump(&counters.retries);
            tokio::time::sleep(sleep).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

    use super::*;

    fn io(key: &str) -> Error {
        Error::Io {
            op: "put",
            key: key.to_string(),
            source: std::io::Error::other("connection reset"),
        }
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = RetryPolicy::default();
        for retry in 1..40 {
            let b = p.backoff(retry);
            assert!(b <= p.backoff_max, "retry {retry}: {b:?}");
        }
        let first: Vec<_> = (0..32).map(|_| p.backoff(1)).collect();
        assert!(first.iter().all(|d| *d <= p.backoff_base));
        assert!(first.iter().any(|d| *d != first[0]), "no jitter");
    }

    #[tokio::test]
    async fn retries_retriable_errors_until_success() {
        let c = RequestCounters::default();
        let n = AtomicU32::new(0);
        let r = RetryPolicy::default()
            .run(&c, "put", "k", || async {
                match n.fetch_add(1, Relaxed) {
                    0 => Err(io("k")),
                    1 => Err(Error::Throttled {
                        op: "put",
                        key: "k".into(),
                        reason: "SlowDown".into(),
                    }),
                    _ => Ok(7),
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(c.retries.load(Relaxed), 2);
        assert_eq!(c.throttled.load(Relaxed), 1);
        assert_eq!(c.errors.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn stops_at_the_first_permanent_error() {
        let c = RequestCounters::default();
        let n = AtomicU32::new(0);
        let r: Result<()> = RetryPolicy::default()
            .run(&c, "get", "k", || async {
                n.fetch_add(1, Relaxed);
                Err(Error::PermissionDenied {
                    op: "get",
                    key: "k".into(),
                    reason: "AccessDenied".into(),
                })
            })
            .await;
        assert!(matches!(r, Err(Error::PermissionDenied { .. })));
        assert_eq!(n.load(Relaxed), 1);
        assert_eq!(c.retries.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn bounded_by_count() {
        let c = RequestCounters::default();
        let n = AtomicU32::new(0);
        let p = RetryPolicy {
            retry_max: 3,
            deadline: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(1),
            ..Default::default()
        };
        let r: Result<()> = p
            .run(&c, "put", "k", || async {
                n.fetch_add(1, Relaxed);
                Err(io("k"))
            })
            .await;
        match r {
            Err(Error::RetriesExhausted {
                attempts, source, ..
            }) => {
                assert_eq!(attempts, 4);
                assert!(matches!(*source, Error::Io { .. }));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(n.load(Relaxed), 4);
        assert_eq!(c.retries.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn bounded_by_deadline_with_hanging_attempts() {
        let c = RequestCounters::default();
        let p = RetryPolicy {
            retry_max: 1000,
            deadline: Duration::from_millis(300),
            attempt_timeout: Duration::from_millis(50),
            backoff_base: Duration::from_millis(1),
            ..Default::default()
        };
        let start = Instant::now();
        let r: Result<()> = p.run(&c, "get", "k", std::future::pending).await;
        let Err(Error::RetriesExhausted { source, .. }) = r else {
            panic!("{r:?}");
        };
        assert!(matches!(*source, Error::Timeout { .. }));
        // Attempts and sleeps never overrun the deadline by more than the
        // scheduler's slack.
        assert!(start.elapsed() < p.deadline + Duration::from_millis(200));
        assert!(c.timeouts.load(Relaxed) >= 2);
    }
}

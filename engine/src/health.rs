//! Whether this broker can serve. One answer, used twice: `/readyz`
//! reports it with the reason, and Metadata stops handing out a broker that
//! is not ready (its membership record says so, and its own answers leave
//! it out), so clients move to healthy brokers and come back when it
//! recovers.
//!
//! A broker is not ready when
//! - its last segment uploads failed, or each crawled (the object store);
//! - it has not read the commit log to its head for longer than the lease
//!   TTL (it cannot learn commits: its reads would be stale);
//! - its membership lease was last renewed longer ago than the TTL (it is
//!   cut off from the metadata store; the others have dropped it).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use crate::metrics::{Metrics, UPLOAD_SLOW};

/// Consecutive failed (or slow) segment uploads after which the broker is
/// not ready: its producers are getting errors.
pub const UPLOAD_FAILURES_NOT_READY: u64 = 3;
/// Shortest bound on how stale the commit log may be: the committer reads
/// it at least every second when the metadata store answers.
const LOG_STALE_MIN: Duration = Duration::from_secs(5);

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why the broker is not ready, if it is not, judged at `now_ms` from its
/// metrics and its membership lease TTL.
pub fn unready_reason(m: &Metrics, lease_ttl: Duration, now_ms: u64) -> Option<String> {
    let failing = m.upload_failures_in_a_row.load(Relaxed);
    if failing >= UPLOAD_FAILURES_NOT_READY {
        return Some(format!(
            "the last {failing} segment uploads to the object store failed"
        ));
    }
    let slow = m.upload_slow_in_a_row.load(Relaxed);
    if slow >= UPLOAD_FAILURES_NOT_READY {
        return Some(format!(
            "the last {slow} segment uploads to the object store each took over {} s; producers are being slowed down",
            UPLOAD_SLOW.as_secs()
        ));
    }
    let since = |at: u64| Duration::from_millis(now_ms.saturating_sub(at));
    let lease = since(m.lease_renewed_at_ms.load(Relaxed));
    if lease > lease_ttl {
        return Some(format!(
            "cut off from the metadata store: the membership lease was last renewed {} s ago (TTL {} s)",
            lease.as_secs(),
            lease_ttl.as_secs()
        ));
    }
    let log = since(m.log_read_at_ms.load(Relaxed));
    if log > lease_ttl.max(LOG_STALE_MIN) {
        return Some(format!(
            "cannot learn commits: the commit log was last read to its head {} s ago",
            log.as_secs()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_reported_and_clears() {
        let m = Metrics::new(1);
        let ttl = Duration::from_secs(3);
        let now = 1_000_000;
        Metrics::set(&m.lease_renewed_at_ms, now - 1_000);
        Metrics::set(&m.log_read_at_ms, now - 500);
        assert_eq!(unready_reason(&m, ttl, now), None);
        Metrics::set(&m.upload_failures_in_a_row, 3);
        assert!(unready_reason(&m, ttl, now).is_some_and(|r| r.contains("failed")));
        Metrics::set(&m.upload_failures_in_a_row, 0);
        Metrics::set(&m.lease_renewed_at_ms, now - 4_000);
        assert!(unready_reason(&m, ttl, now).is_some_and(|r| r.contains("cut off")));
        Metrics::set(&m.lease_renewed_at_ms, now);
        Metrics::set(&m.log_read_at_ms, now - 6_000);
        assert!(unready_reason(&m, ttl, now).is_some_and(|r| r.contains("learn commits")));
        Metrics::set(&m.log_read_at_ms, now);
        assert_eq!(unready_reason(&m, ttl, now), None);
    }
}

//! Brute-force protection for SASL: failed authentications are counted
//! per client address and claimed user over a fixed window; past the
//! limit, that user's logins from that address are refused without their
//! credentials being checked until the window ends. Keyed by both, a
//! misconfigured client locks out only itself, not the other users behind
//! the same address (a NAT, a Kubernetes node); a login that names no user
//! we can trust (a bad OAUTHBEARER token) counts against the address alone.
//! Every failure is also answered late (Kafka's
//! `connection.failed.authentication.delay.ms`), so one connection cannot
//! try passwords at full speed either.
//!
//! Shared by every shard and listener (one lock taken only on the SASL
//! path, never per request). The table is bounded: past [`KEYS_MAX`]
//! tracked pairs, entries whose window has ended are dropped, and if none
//! has, new pairs are not tracked (and so not limited) until some are:
//! memory stays bounded under a spray of addresses or names, at the cost
//! of the limit for that spray.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window failures are counted over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// (address, user) pairs tracked at most.
pub const KEYS_MAX: usize = 65_536;

pub struct AuthLimiter {
    /// Failures an address may have per window; 0: no limit.
    max_failures: u32,
    window: Duration,
    table: Mutex<HashMap<Key, Window>>,
}

/// A client address and the user it claims ("" when none).
pub type Key = (IpAddr, String);

/// Longest user name kept in a key (the table's memory stays bounded).
const USER_BYTES_MAX: usize = 256;

/// The key of a login from `ip` claiming `user`.
pub fn key(ip: IpAddr, user: Option<&str>) -> Key {
    let user = user.unwrap_or_default();
    let mut end = user.len().min(USER_BYTES_MAX);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    (ip, user[..end].to_string())
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

impl AuthLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` when `key` is over its limit: refuse it for `wait`.
    pub fn check(&self, key: &Key) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// Counts one failed authentication of `key`.
    pub fn failed(&self, key: Key) {
        self.failed_at(key, Instant::now())
    }

    fn check_at(&self, key: &Key, now: Instant) -> Result<(), Duration> {
        if self.max_failures == 0 {
            return Ok(());
        }
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(key) {
            Some(w) if w.failures >= self.max_failures => {
                let ends = w.started + self.window;
                if ends > now {
                    Err(ends - now)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    fn failed_at(&self, key: Key, now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !table.contains_key(&key) && table.len() >= KEYS_MAX {
            let window = self.window;
            table.retain(|_, w| now.duration_since(w.started) < window);
            if table.len() >= KEYS_MAX {
                return;
            }
        }
        let w = table.entry(key).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.duration_since(w.started) >= self.window {
            *w = Window {
                started: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_over_its_limit_waits_for_its_window() {
        let l = AuthLimiter::new(3, Duration::from_secs(60));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = key(ip("10.0.0.1"), Some("alice"));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at(&a, t0).is_ok());
            l.failed_at(a.clone(), t0);
        }
        let wait = l.check_at(&a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        // Another address, or another user at the same address, is not
        // affected.
        assert!(l.check_at(&key(ip("10.0.0.2"), Some("alice")), t0).is_ok());
        assert!(l.check_at(&key(ip("10.0.0.1"), Some("bob")), t0).is_ok());
        // The window ends; the count starts again.
        assert!(l.check_at(&a, t0 + Duration::from_secs(60)).is_ok());
        l.failed_at(a.clone(), t0 + Duration::from_secs(61));
        assert!(l.check_at(&a, t0 + Duration::from_secs(61)).is_ok());
        // No limit.
        let off = AuthLimiter::new(0, Duration::from_secs(60));
        for _ in 0..100 {
            off.failed_at(a.clone(), t0);
        }
        assert!(off.check_at(&a, t0).is_ok());
        // Long names are cut (on a character boundary).
        let long = "é".repeat(200);
        assert_eq!(key(ip("10.0.0.1"), Some(&long)).1.len(), USER_BYTES_MAX);
    }

    #[test]
    fn the_table_stays_bounded() {
        let l = AuthLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..(KEYS_MAX as u32 + 10) {
            l.failed_at(key(IpAddr::from(i.to_be_bytes()), None), t0);
        }
        assert_eq!(l.table.lock().unwrap().len(), KEYS_MAX);
        // Once the windows end, new pairs are tracked again.
        let later = t0 + Duration::from_secs(61);
        let fresh = key(IpAddr::from([255, 255, 255, 255]), None);
        l.failed_at(fresh.clone(), later);
        assert!(l.check_at(&fresh, later).is_err());
        assert_eq!(l.table.lock().unwrap().len(), 1);
    }
}

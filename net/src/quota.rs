//! Enforcing client quotas: `producer_byte_rate` on the record bytes a
//! client produces and `consumer_byte_rate` on the bytes its fetches
//! return, per broker (as Kafka's are).
//!
//! Which quota applies is Kafka's order of precedence over the entities
//! set with AlterClientQuotas: (user, client id), (user, default client
//! id), user, (default user, client id), (default user, default client
//! id), default user, client id, default client id. A default applies to
//! each user or client id on its own: the traffic is metered per the user
//! and client id the matching entity names (a client-id quota meters the
//! client id whatever its user).
//!
//! Metering: the bytes of the last [`WINDOW_SECONDS`] one-second buckets.
//! A client over its quota is throttled for as long as its bytes need to
//! fall back within it at the quota's rate (the bytes over the quota
//! divided by the quota), at most [`THROTTLE_MAX`]; the answer says so in
//! `throttle_time_ms`, and the connection reads no further request until
//! then (KIP-219: clients also hold back on their own). The meters are
//! bounded: past [`METERS_MAX`] the idle ones are dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use floe_engine::quotas::QuotaMap;
use floe_meta::schema::QuotaEntityPart;

pub const PRODUCER_BYTE_RATE: &str = "producer_byte_rate";
pub const CONSUMER_BYTE_RATE: &str = "consumer_byte_rate";
pub const REQUEST_PERCENTAGE: &str = "request_percentage";
pub const CONTROLLER_MUTATION_RATE: &str = "controller_mutation_rate";
pub const CONNECTION_CREATION_RATE: &str = "connection_creation_rate";

pub const USER: &str = "user";
pub const CLIENT_ID: &str = "client-id";
pub const IP: &str = "ip";

/// Seconds of traffic a meter keeps (Kafka: 11 samples of 1 s).
pub const WINDOW_SECONDS: usize = 11;
/// The longest one answer is throttled.
pub const THROTTLE_MAX: Duration = Duration::from_secs(30);
/// Meters kept at most.
pub const METERS_MAX: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Produce,
    Fetch,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Produce => PRODUCER_BYTE_RATE,
            Kind::Fetch => CONSUMER_BYTE_RATE,
        }
    }
}

fn part(t: &str, name: Option<&str>) -> QuotaEntityPart {
    QuotaEntityPart {
        entity_type: t.to_string(),
        name: name.map(str::to_string),
    }
}

/// The quota for `kind` of `user`'s client `client_id`, and the (user,
/// client id) its traffic is metered under; None when no entity sets it.
pub fn resolve(
    quotas: &QuotaMap,
    kind: Kind,
    user: &str,
    client_id: &str,
) -> Option<(f64, (String, String))> {
    if quotas.is_empty() {
        return None;
    }
    // (user part, client part): Some(Some(name)), Some(None) = default,
    // None = not in the entity. Parts sorted by type: client-id < user.
    type Part<'a> = Option<Option<&'a str>>;
    let order: [(Part, Part); 8] = [
        (Some(Some(user)), Some(Some(client_id))),
        (Some(Some(user)), Some(None)),
        (Some(Some(user)), None),
        (Some(None), Some(Some(client_id))),
        (Some(None), Some(None)),
        (Some(None), None),
        (None, Some(Some(client_id))),
        (None, Some(None)),
    ];
    for (u, c) in order {
        let mut entity = Vec::with_capacity(2);
        if let Some(c) = c {
            entity.push(part(CLIENT_ID, c));
        }
        if let Some(u) = u {
            entity.push(part(USER, u));
        }
        if let Some(v) = quotas.get(&entity).and_then(|q| q.get(kind.key())) {
            let metered = (
                if u.is_some() { user } else { "" }.to_string(),
                if c.is_some() { client_id } else { "" }.to_string(),
            );
            return Some((*v, metered));
        }
    }
    None
}

struct Meter {
    /// Bytes per second, by `second % WINDOW_SECONDS`.
    buckets: [u64; WINDOW_SECONDS],
    /// The second (since `epoch`) of the newest bucket written.
    newest: u64,
    /// The second the meter began.
    began: u64,
}

impl Meter {
    fn new(now: u64) -> Self {
        Self {
            buckets: [0; WINDOW_SECONDS],
            newest: now,
            began: now,
        }
    }

    fn add(&mut self, now: u64, bytes: u64) {
        let gap = now.saturating_sub(self.newest);
        for s in 1..=gap.min(WINDOW_SECONDS as u64) {
            self.buckets[((self.newest + s) % WINDOW_SECONDS as u64) as usize] = 0;
        }
        self.newest = self.newest.max(now);
        self.buckets[(now % WINDOW_SECONDS as u64) as usize] += bytes;
    }

    fn total(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

pub struct Throttler {
    epoch: Instant,
    meters: Mutex<HashMap<(Kind, String, String), Meter>>,
}

impl Default for Throttler {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            meters: Mutex::new(HashMap::new()),
        }
    }
}

impl Throttler {
    /// Counts `bytes` of `kind` for `user`'s client `client_id`; how long
    /// to throttle it (zero when no quota applies or it is within it).
    pub fn record(
        &self,
        quotas: &QuotaMap,
        kind: Kind,
        user: &str,
        client_id: &str,
        bytes: u64,
    ) -> Duration {
        let Some((quota, (u, c))) = resolve(quotas, kind, user, client_id) else {
            return Duration::ZERO;
        };
        self.record_at(kind, (u, c), quota, bytes, self.epoch.elapsed())
    }

    fn record_at(
        &self,
        kind: Kind,
        (u, c): (String, String),
        quota: f64,
        bytes: u64,
        since_epoch: Duration,
    ) -> Duration {
        let now = since_epoch.as_secs();
        let mut meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        let key = (kind, u, c);
        if !meters.contains_key(&key) && meters.len() >= METERS_MAX {
            meters.retain(|_, m| now.saturating_sub(m.newest) < WINDOW_SECONDS as u64);
            if meters.len() >= METERS_MAX {
                return Duration::ZERO;
            }
        }
        let meter = meters.entry(key).or_insert_with(|| Meter::new(now));
        meter.add(now, bytes);
        // The time the window has covered, at least one second.
        let covered =
            (since_epoch.as_secs_f64() - meter.began as f64).clamp(1.0, WINDOW_SECONDS as f64);
        let over = meter.total() as f64 / quota.max(1.0) - covered;
        if over <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(over).min(THROTTLE_MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Entity<'a> = &'a [(&'a str, Option<&'a str>)];

    fn quotas(entries: &[(Entity, &str, f64)]) -> QuotaMap {
        let mut m = QuotaMap::new();
        for (entity, key, v) in entries {
            let mut e: Vec<QuotaEntityPart> = entity.iter().map(|(t, n)| part(t, *n)).collect();
            e.sort();
            m.entry(e).or_default().insert(key.to_string(), *v);
        }
        m
    }

    #[test]
    fn the_most_specific_entity_wins() {
        let q = quotas(&[
            (&[(CLIENT_ID, None)], PRODUCER_BYTE_RATE, 1.0),
            (&[(CLIENT_ID, Some("app"))], PRODUCER_BYTE_RATE, 2.0),
            (&[(USER, None)], PRODUCER_BYTE_RATE, 3.0),
            (&[(USER, Some("alice"))], PRODUCER_BYTE_RATE, 4.0),
            (
                &[(USER, Some("alice")), (CLIENT_ID, Some("app"))],
                PRODUCER_BYTE_RATE,
                5.0,
            ),
        ]);
        let r = |u, c| resolve(&q, Kind::Produce, u, c);
        assert_eq!(
            r("alice", "app"),
            Some((5.0, ("alice".into(), "app".into())))
        );
        assert_eq!(
            r("alice", "other"),
            Some((4.0, ("alice".into(), "".into())))
        );
        assert_eq!(r("bob", "app"), Some((3.0, ("bob".into(), "".into()))));
        assert_eq!(resolve(&q, Kind::Fetch, "alice", "app"), None);
        let q = quotas(&[
            (&[(CLIENT_ID, None)], CONSUMER_BYTE_RATE, 1.0),
            (&[(CLIENT_ID, Some("app"))], CONSUMER_BYTE_RATE, 2.0),
        ]);
        let r = |u, c| resolve(&q, Kind::Fetch, u, c);
        assert_eq!(r("alice", "app"), Some((2.0, ("".into(), "app".into()))));
        // A default applies to each client id on its own.
        assert_eq!(r("alice", "x"), Some((1.0, ("".into(), "x".into()))));
    }

    /// The throttle is the time the bytes over the quota take at its rate.
    #[test]
    fn throttle_time_brings_the_rate_back_to_the_quota() {
        let t = Throttler::default();
        let who = || ("".to_string(), "c".to_string());
        let at = Duration::from_secs;
        // 1,000 B/s: 500 B in the first second are within it.
        assert_eq!(
            t.record_at(Kind::Produce, who(), 1000.0, 500, at(0)),
            Duration::ZERO
        );
        // 5,500 B within a second of the start: 4.5 s too many.
        let d = t.record_at(Kind::Produce, who(), 1000.0, 5000, at(0));
        assert_eq!(d, Duration::from_millis(4500));
        // Five seconds on, the window covers 5 s and 5,500 B: 0.5 s over.
        let d = t.record_at(Kind::Produce, who(), 1000.0, 0, at(5));
        assert_eq!(d, Duration::from_millis(500));
        // Past the window the old bytes are gone.
        let d = t.record_at(Kind::Produce, who(), 1000.0, 100, at(30));
        assert_eq!(d, Duration::ZERO);
        // Other kinds and clients have meters of their own.
        let d = t.record_at(Kind::Fetch, who(), 1000.0, 900, at(30));
        assert_eq!(d, Duration::ZERO);
    }
}

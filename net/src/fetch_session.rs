//! Incremental fetch sessions (KIP-227). A consumer of many partitions
//! sends the whole partition list once; the broker keeps it as a session,
//! and later requests carry only what changed (a new fetch offset, a
//! partition added or forgotten) while the answers carry only partitions
//! with news (records, an error, a moved high watermark, last stable or
//! log start offset). A session belongs to the broker, not to a connection
//! or shard: connections move between shards (net::balance), so one cache
//! behind a lock, taken twice per fetch for a few map operations and never
//! held across a wait.
//!
//! The cache is bounded as Kafka's: at most `slots` sessions
//! (`max.incremental.fetch.session.cache.slots`, 1,000); a new session may
//! evict the least recently used one only if it has been idle past
//! `eviction` (`min.incremental.fetch.session.eviction.ms`, 120 s), so busy
//! consumers are not thrashed by new ones; when no slot can be had the
//! client is answered with session id 0 and goes on with full requests.
//! A session unknown here (evicted, or made by another broker before the
//! client moved) is answered FETCH_SESSION_ID_NOT_FOUND, and the client
//! starts a new one with a full request, as KIP-227 describes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indexmap::IndexMap;

use crate::codes;

/// The epoch of a request that starts a session (full request).
pub const INITIAL_EPOCH: i32 = 0;
/// The epoch of a request that ends its session (full request, no new
/// session).
pub const FINAL_EPOCH: i32 = -1;

/// A session's topic: by id (Fetch v13+) or by name (older versions).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TopicKey {
    Id(uuid::Uuid),
    Name(Arc<str>),
}

pub type PartKey = (TopicKey, i32);

/// What a session knows of one partition: what the client last asked,
/// and what the last answer that carried the partition said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cached {
    pub fetch_offset: i64,
    pub max_bytes: i32,
    pub high_watermark: i64,
    pub last_stable: i64,
    pub log_start: i64,
}

impl Cached {
    pub fn asked(fetch_offset: i64, max_bytes: i32) -> Self {
        Self {
            fetch_offset,
            max_bytes,
            high_watermark: -1,
            last_stable: -1,
            log_start: -1,
        }
    }

    /// Records an answer; true when the client must see it (records, an
    /// error, or an offset it has not been told).
    pub fn answered(&mut self, bytes: usize, error: i16, hw: i64, lso: i64, start: i64) -> bool {
        let news = bytes > 0
            || error != codes::NONE
            || (hw, lso, start) != (self.high_watermark, self.last_stable, self.log_start);
        if error == codes::NONE {
            (self.high_watermark, self.last_stable, self.log_start) = (hw, lso, start);
        }
        news
    }
}

/// One session's partitions, in the order they are read and answered.
#[derive(Debug)]
pub struct Session {
    pub id: i32,
    pub uses_topic_ids: bool,
    pub parts: IndexMap<PartKey, Cached>,
}

impl Session {
    pub fn new(uses_topic_ids: bool, parts: IndexMap<PartKey, Cached>) -> Self {
        Self {
            id: 0,
            uses_topic_ids,
            parts,
        }
    }

    /// Moves the partitions that just returned records to the end, keeping
    /// the order within each group, so that a response filled to its
    /// `max_bytes` by the first partitions does not starve the last ones
    /// (Kafka does the same).
    pub fn rotate(&mut self, returned_records: &[bool]) {
        debug_assert_eq!(returned_records.len(), self.parts.len());
        if !returned_records.iter().any(|r| *r) {
            return;
        }
        let old = std::mem::take(&mut self.parts);
        let (mut stay, mut moved) = (IndexMap::with_capacity(old.len()), Vec::new());
        for ((k, v), r) in old.into_iter().zip(returned_records) {
            if *r {
                moved.push((k, v));
            } else {
                stay.insert(k, v);
            }
        }
        stay.extend(moved);
        self.parts = stay;
    }
}

/// How a fetch request relates to sessions.
#[derive(Debug)]
pub enum Context {
    /// No session: answer every partition asked, with session id 0.
    Sessionless,
    /// A full request that starts a session: answer every partition, then
    /// [`FetchSessions::create`] one from them.
    New,
    /// An incremental request on this session, taken from the cache until
    /// [`FetchSessions::finish`] gives it back.
    Incremental(Session),
}

struct Entry {
    /// The epoch the session's next request must carry.
    epoch: i32,
    last_used: Instant,
    /// None while a request is using it.
    session: Option<Session>,
}

pub struct FetchSessions {
    slots: usize,
    eviction: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    sessions: HashMap<i32, Entry>,
    /// splitmix64 state for session ids.
    rng: u64,
}

fn next_epoch(epoch: i32) -> i32 {
    if epoch == i32::MAX {
        1
    } else {
        epoch + 1
    }
}

impl FetchSessions {
    /// `slots` 0: sessions declined (every answer carries session id 0).
    pub fn new(slots: usize, eviction: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            slots,
            eviction,
            inner: Mutex::new(Inner {
                sessions: HashMap::new(),
                rng: seed,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a request with session `id` and `epoch` is, or the error code
    /// to answer it with. `uses_topic_ids`: the request names topics by id
    /// (Fetch v13+); a session is used with one or the other throughout.
    pub fn begin(&self, id: i32, epoch: i32, uses_topic_ids: bool) -> Result<Context, i16> {
        self.begin_at(id, epoch, uses_topic_ids, Instant::now())
    }

    fn begin_at(
        &self,
        id: i32,
        epoch: i32,
        uses_topic_ids: bool,
        now: Instant,
    ) -> Result<Context, i16> {
        let mut g = self.lock();
        if epoch == INITIAL_EPOCH || epoch == FINAL_EPOCH {
            // A full request closes the session it names.
            if id != 0 {
                g.remove(id);
            }
            return Ok(if epoch == INITIAL_EPOCH && self.slots > 0 {
                Context::New
            } else {
                Context::Sessionless
            });
        }
        let Some(entry) = g.sessions.get_mut(&id) else {
            return Err(codes::FETCH_SESSION_ID_NOT_FOUND);
        };
        match &entry.session {
            Some(s) if s.uses_topic_ids != uses_topic_ids => {
                return Err(codes::FETCH_SESSION_TOPIC_ID_ERROR)
            }
            Some(_) if entry.epoch == epoch => {}
            // In use by another request, or not the epoch expected.
            _ => return Err(codes::INVALID_FETCH_SESSION_EPOCH),
        }
        entry.epoch = next_epoch(epoch);
        entry.last_used = now;
        let session = entry.session.take().expect("checked above");
        Ok(Context::Incremental(session))
    }

    /// Caches `session` as a new one. Returns its id, or 0 when no slot
    /// can be had (the client goes on without a session), and whether an
    /// idle session was evicted for it.
    pub fn create(&self, session: Session) -> (i32, bool) {
        self.create_at(session, Instant::now())
    }

    fn create_at(&self, mut session: Session, now: Instant) -> (i32, bool) {
        let mut g = self.lock();
        let mut evicted = false;
        if g.sessions.len() >= self.slots {
            // One taken by a request and never given back (its connection
            // closed mid-wait) is evictable too, once idle long enough.
            let idle = g
                .sessions
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .filter(|(_, e)| now.saturating_duration_since(e.last_used) >= self.eviction)
                .map(|(id, _)| *id);
            match idle {
                Some(id) => {
                    g.remove(id);
                    evicted = true;
                }
                None => return (0, false),
            }
        }
        let id = loop {
            let candidate = (g.next_random() & 0x7fff_ffff) as i32;
            if candidate != 0 && !g.sessions.contains_key(&candidate) {
                break candidate;
            }
        };
        session.id = id;
        g.sessions.insert(
            id,
            Entry {
                epoch: 1,
                last_used: now,
                session: Some(session),
            },
        );
        (id, evicted)
    }

    /// Gives back a session [`begin`](Self::begin) took. If it was closed
    /// meanwhile (a full request naming it), it stays closed.
    pub fn finish(&self, session: Session) {
        self.finish_at(session, Instant::now())
    }

    fn finish_at(&self, session: Session, now: Instant) {
        let mut g = self.lock();
        if let Some(e) = g.sessions.get_mut(&session.id) {
            if e.session.is_none() {
                e.session = Some(session);
                e.last_used = now;
            }
        }
    }
}

impl Inner {
    fn remove(&mut self, id: i32) {
        self.sessions.remove(&id);
    }

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVICTION_DEFAULT: Duration = Duration::from_secs(120);

    /// (sessions cached, partitions in those not in use).
    fn stats(c: &FetchSessions) -> (usize, usize) {
        let g = c.lock();
        let parts = g.sessions.values().filter_map(|e| e.session.as_ref());
        (g.sessions.len(), parts.map(|s| s.parts.len()).sum())
    }

    fn parts(n: i32) -> IndexMap<PartKey, Cached> {
        (0..n)
            .map(|p| ((TopicKey::Name("t".into()), p), Cached::asked(0, 1024)))
            .collect()
    }

    fn start(c: &FetchSessions, n: i32, now: Instant) -> i32 {
        assert!(matches!(c.begin_at(0, 0, false, now), Ok(Context::New)));
        c.create_at(Session::new(false, parts(n)), now).0
    }

    #[test]
    fn epochs_are_checked_and_advance() {
        let c = FetchSessions::new(10, EVICTION_DEFAULT);
        let now = Instant::now();
        let id = start(&c, 3, now);
        assert_ne!(id, 0);
        assert_eq!(stats(&c), (1, 3));
        // The first incremental request carries epoch 1.
        assert_eq!(
            c.begin_at(id, 2, false, now).unwrap_err(),
            codes::INVALID_FETCH_SESSION_EPOCH
        );
        let Ok(Context::Incremental(s)) = c.begin_at(id, 1, false, now) else {
            panic!("incremental")
        };
        // While it is in use, the same epoch again is refused.
        assert_eq!(
            c.begin_at(id, 1, false, now).unwrap_err(),
            codes::INVALID_FETCH_SESSION_EPOCH
        );
        c.finish(s);
        assert!(matches!(
            c.begin_at(id, 2, false, now),
            Ok(Context::Incremental(_))
        ));
        assert_eq!(
            c.begin_at(id + 1, 1, false, now).unwrap_err(),
            codes::FETCH_SESSION_ID_NOT_FOUND
        );
    }

    #[test]
    fn a_session_keeps_to_names_or_ids() {
        let c = FetchSessions::new(10, EVICTION_DEFAULT);
        let id = start(&c, 1, Instant::now());
        assert_eq!(
            c.begin(id, 1, true).unwrap_err(),
            codes::FETCH_SESSION_TOPIC_ID_ERROR
        );
        assert!(matches!(c.begin(id, 1, false), Ok(Context::Incremental(_))));
    }

    #[test]
    fn full_requests_close_what_they_name() {
        let c = FetchSessions::new(10, EVICTION_DEFAULT);
        let now = Instant::now();
        let id = start(&c, 2, now);
        assert!(matches!(
            c.begin_at(id, FINAL_EPOCH, false, now),
            Ok(Context::Sessionless)
        ));
        assert_eq!(stats(&c), (0, 0));
        assert_eq!(
            c.begin_at(id, 1, false, now).unwrap_err(),
            codes::FETCH_SESSION_ID_NOT_FOUND
        );
        // Closed while in use: giving it back does not revive it.
        let id = start(&c, 2, now);
        let Ok(Context::Incremental(s)) = c.begin_at(id, 1, false, now) else {
            panic!()
        };
        assert!(matches!(
            c.begin_at(id, INITIAL_EPOCH, false, now),
            Ok(Context::New)
        ));
        c.finish(s);
        assert_eq!(stats(&c), (0, 0));
    }

    #[test]
    fn no_slots_means_no_sessions() {
        let c = FetchSessions::new(0, EVICTION_DEFAULT);
        assert!(matches!(c.begin(0, 0, false), Ok(Context::Sessionless)));
    }

    /// Full: a new session evicts only one idle past the eviction time,
    /// the least recently used; otherwise it is not created.
    #[test]
    fn eviction_takes_only_idle_sessions() {
        let c = FetchSessions::new(2, Duration::from_secs(120));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let a = start(&c, 1, t0);
        let b = start(&c, 5, at(10));
        assert_eq!(
            c.create_at(Session::new(false, parts(1)), at(20)),
            (0, false)
        );
        let Ok(Context::Incremental(s)) = c.begin_at(a, 1, false, at(100)) else {
            panic!()
        };
        c.finish_at(s, at(100));
        // b, the least recently used, has been idle 115 s: kept.
        assert_eq!(
            c.create_at(Session::new(false, parts(1)), at(125)),
            (0, false)
        );
        // Idle 121 s: evicted for the new session; a is untouched.
        let (id, evicted) = c.create_at(Session::new(false, parts(7)), at(131));
        assert!(id != 0 && evicted);
        assert_eq!(
            c.begin_at(b, 1, false, at(131)).unwrap_err(),
            codes::FETCH_SESSION_ID_NOT_FOUND
        );
        assert!(matches!(
            c.begin_at(a, 2, false, at(131)),
            Ok(Context::Incremental(_))
        ));
        assert!(matches!(
            c.begin_at(id, 1, false, at(131)),
            Ok(Context::Incremental(_))
        ));
    }

    #[test]
    fn rotation_moves_partitions_with_records_to_the_end() {
        let mut s = Session::new(false, parts(5));
        s.rotate(&[false, true, false, true, false]);
        let order: Vec<i32> = s.parts.keys().map(|(_, p)| *p).collect();
        assert_eq!(order, vec![0, 2, 4, 1, 3]);
    }

    #[test]
    fn only_news_is_answered() {
        let mut c = Cached::asked(10, 100);
        assert!(c.answered(0, 0, 20, 20, 0), "first answer");
        assert!(!c.answered(0, 0, 20, 20, 0), "nothing new");
        assert!(c.answered(0, 0, 21, 20, 0), "high watermark moved");
        assert!(c.answered(0, 0, 21, 21, 0), "last stable moved");
        assert!(c.answered(0, 0, 21, 21, 5), "log start moved");
        assert!(c.answered(9, 0, 21, 21, 5), "records");
        assert!(c.answered(0, 3, -1, -1, -1), "an error");
        assert!(!c.answered(0, 0, 21, 21, 5), "errors leave what was said");
    }
}

//! The read caches of one shard: stored batches by (segment, position),
//! and archive objects' footers by key, each bounded in bytes and evicted
//! oldest first. Owned by its shard.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use crate::archive::{ArchiveBatch, ArchiveFooter};

/// What an entry costs a cache's byte budget.
trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// Estimated from the batch count.
impl Weigh for Rc<ArchiveFooter> {
    fn weight(&self) -> usize {
        64 + self.batches.len() * std::mem::size_of::<ArchiveBatch>()
    }
}

/// Entries bounded by their total weight, evicted oldest first: what both
/// caches are.
#[derive(Debug)]
struct Fifo<K, V> {
    entries: HashMap<K, V>,
    order: VecDeque<K>,
    bytes: usize,
    bytes_max: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V: Weigh + Clone> Fifo<K, V> {
    fn new(bytes_max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            bytes_max,
        }
    }

    fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.entries.get(key).cloned()
    }

    /// Keeps `value` unless it alone exceeds the budget or `key` is here.
    fn insert(&mut self, key: K, value: V) {
        let weight = value.weight();
        if weight > self.bytes_max || self.entries.contains_key(&key) {
            return;
        }
        self.bytes += weight;
        self.entries.insert(key.clone(), value);
        self.order.push_back(key);
        while self.bytes > self.bytes_max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.entries.remove(&old) {
                self.bytes -= v.weight();
            }
        }
    }

    /// Drops the entries `keep` says no, keeping the others' order.
    fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let mut bytes = self.bytes;
        self.entries.retain(|k, v| {
            let kept = keep(k);
            if !kept {
                bytes -= v.weight();
            }
            kept
        });
        self.bytes = bytes;
        let entries = &self.entries;
        self.order.retain(|k| entries.contains_key(k));
    }
}

/// Decoded archive footers: one GET per fetch once an object's footer is
/// here.
#[derive(Debug)]
pub struct FooterCache(Fifo<Arc<str>, Rc<ArchiveFooter>>);

impl FooterCache {
    pub fn new(bytes_max: usize) -> Self {
        Self(Fifo::new(bytes_max))
    }

    pub fn get(&self, key: &str) -> Option<Rc<ArchiveFooter>> {
        self.0.get(key)
    }

    pub fn insert(&mut self, key: Arc<str>, footer: Rc<ArchiveFooter>) {
        self.0.insert(key, footer);
    }

    /// Drops the footers of archives `live` says are gone, as
    /// [`ReadCache::drop_dead`] does for batches.
    pub fn drop_dead(&mut self, mut live: impl FnMut(&str) -> bool) {
        self.0.retain(|key| live(key));
    }

    pub fn bytes(&self) -> usize {
        self.0.bytes
    }
}

/// Stored batches by (segment, position).
#[derive(Debug)]
pub struct ReadCache(Fifo<(Arc<str>, u64), Bytes>);

impl ReadCache {
    pub fn new(bytes_max: usize) -> Self {
        Self(Fifo::new(bytes_max))
    }

    pub fn get(&self, segment: &Arc<str>, pos: u64) -> Option<Bytes> {
        self.0.get(&(segment.clone(), pos))
    }

    pub fn insert(&mut self, segment: Arc<str>, pos: u64, batch: Bytes) {
        self.0.insert((segment, pos), batch);
    }

    /// Drops the batches of every segment `live` says is gone (deleted
    /// with its topic, trimmed by retention, replaced by an archive): no
    /// read can ask for them again, so they would only hold memory until
    /// newer batches pushed them out, which on a broker that takes little
    /// produce is hours.
    pub fn drop_dead(&mut self, mut live: impl FnMut(&str) -> bool) {
        self.0.retain(|(segment, _)| live(segment));
    }

    pub fn bytes(&self) -> usize {
        self.0.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_oldest_first() {
        let mut c = ReadCache::new(10);
        let s: Arc<str> = Arc::from("s");
        c.insert(s.clone(), 0, Bytes::from(vec![0; 4]));
        c.insert(s.clone(), 4, Bytes::from(vec![0; 4]));
        c.insert(s.clone(), 8, Bytes::from(vec![0; 4]));
        assert!(c.get(&s, 0).is_none());
        assert!(c.get(&s, 4).is_some() && c.get(&s, 8).is_some());
        assert_eq!(c.bytes(), 8);
        c.insert(s.clone(), 99, Bytes::from(vec![0; 11]));
        assert!(c.get(&s, 99).is_none(), "larger than the cache");
    }

    #[test]
    fn dead_segments_go_and_the_rest_keep_their_order() {
        let mut c = ReadCache::new(12);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        c.insert(a.clone(), 0, Bytes::from(vec![0; 4]));
        c.insert(b.clone(), 0, Bytes::from(vec![0; 4]));
        c.insert(a.clone(), 4, Bytes::from(vec![0; 4]));
        c.drop_dead(|s| s != "a");
        assert!(c.get(&a, 0).is_none() && c.get(&a, 4).is_none());
        assert_eq!(c.bytes(), 4);
        // Room for two more before the oldest left (b's) goes.
        c.insert(a.clone(), 8, Bytes::from(vec![0; 4]));
        c.insert(a.clone(), 12, Bytes::from(vec![0; 4]));
        assert!(c.get(&b, 0).is_some());
        c.insert(a.clone(), 16, Bytes::from(vec![0; 4]));
        assert!(c.get(&b, 0).is_none() && c.get(&a, 8).is_some());
        assert_eq!(c.bytes(), 12);
    }

    #[test]
    fn footers_are_bounded_too() {
        let footer = |n: usize| {
            Rc::new(ArchiveFooter {
                topic_id: [0; 16],
                partition: 0,
                base_offset: 0,
                end_offset: n as u64,
                batches: vec![
                    ArchiveBatch {
                        base_offset: 0,
                        at: crate::segment::FooterBatch {
                            pos: 0,
                            len: 1,
                            records: 1,
                            max_ts: 0,
                            producer_id: -1,
                            producer_epoch: -1,
                            base_sequence: -1,
                        },
                    };
                    n
                ],
            })
        };
        let one = footer(10).weight();
        let mut c = FooterCache::new(2 * one);
        for k in ["a", "b", "c"] {
            c.insert(Arc::from(k), footer(10));
        }
        assert!(c.get("a").is_none() && c.get("b").is_some() && c.get("c").is_some());
        assert_eq!(c.bytes(), 2 * one);
        c.insert(Arc::from("big"), footer(100));
        assert!(c.get("big").is_none(), "larger than the cache");
        c.drop_dead(|k| k != "b");
        assert!(c.get("b").is_none() && c.get("c").is_some());
        assert_eq!(c.bytes(), one);
    }
}

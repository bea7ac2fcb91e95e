//! The read cache of one shard: stored batches by (segment, position),
//! bounded in bytes, evicted oldest first. Owned by its shard.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

#[derive(Debug)]
pub struct ReadCache {
    batches: HashMap<(Arc<str>, u64), Bytes>,
    order: VecDeque<(Arc<str>, u64)>,
    bytes: usize,
    bytes_max: usize,
}

impl ReadCache {
    pub fn new(bytes_max: usize) -> Self {
        Self {
            batches: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            bytes_max,
        }
    }

    pub fn get(&self, segment: &Arc<str>, pos: u64) -> Option<Bytes> {
        self.batches.get(&(segment.clone(), pos)).cloned()
    }

    pub fn insert(&mut self, segment: Arc<str>, pos: u64, batch: Bytes) {
        if batch.len() > self.bytes_max {
            return;
        }
        let key = (segment, pos);
        if self.batches.contains_key(&key) {
            return;
        }
        self.bytes += batch.len();
        self.batches.insert(key.clone(), batch);
        self.order.push_back(key);
        while self.bytes > self.bytes_max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.batches.remove(&old) {
                self.bytes -= b.len();
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
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
}

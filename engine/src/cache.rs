//! The read caches of one shard: stored batches by (segment, position),
//! and archive objects' footers by key, each bounded in bytes and evicted
//! oldest first. Owned by its shard.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use crate::archive::{ArchiveBatch, ArchiveFooter};

/// Decoded archive footers: one GET per fetch once an object's footer is
/// here. Bytes are estimated from the batch count.
#[derive(Debug)]
pub struct FooterCache {
    footers: HashMap<Arc<str>, Rc<ArchiveFooter>>,
    order: VecDeque<Arc<str>>,
    bytes: usize,
    bytes_max: usize,
}

fn footer_bytes(f: &ArchiveFooter) -> usize {
    64 + f.batches.len() * std::mem::size_of::<ArchiveBatch>()
}

impl FooterCache {
    pub fn new(bytes_max: usize) -> Self {
        Self {
            footers: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            bytes_max,
        }
    }

    pub fn get(&self, key: &str) -> Option<Rc<ArchiveFooter>> {
        self.footers.get(key).cloned()
    }

    pub fn insert(&mut self, key: Arc<str>, footer: Rc<ArchiveFooter>) {
        let size = footer_bytes(&footer);
        if size > self.bytes_max || self.footers.contains_key(&key) {
            return;
        }
        self.bytes += size;
        self.footers.insert(key.clone(), footer);
        self.order.push_back(key);
        while self.bytes > self.bytes_max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(f) = self.footers.remove(&old) {
                self.bytes -= footer_bytes(&f);
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

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
        let one = footer_bytes(&footer(10));
        let mut c = FooterCache::new(2 * one);
        for k in ["a", "b", "c"] {
            c.insert(Arc::from(k), footer(10));
        }
        assert!(c.get("a").is_none() && c.get("b").is_some() && c.get("c").is_some());
        assert_eq!(c.bytes(), 2 * one);
        c.insert(Arc::from("big"), footer(100));
        assert!(c.get("big").is_none(), "larger than the cache");
    }
}

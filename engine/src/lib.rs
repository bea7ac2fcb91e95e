//! floe-engine: shards, partition ownership, intake and segment assembly,
//! sequencing, partition index and read cache.
//!
//! Owns: the state machines of the data path — [`batch`] validation,
//! [`segment::SegmentBuilder`], [`sequencer::Sequencer`],
//! [`index::PartitionIndex`], [`cache::ReadCache`] — which are plain structs
//! with no I/O, and the runtime that drives them: one [`shard::Shard`] per
//! core (glommio) and the [`sidecar`] (tokio) where the object-store and
//! metadata backends run, with the [`committer::Committer`] on it.
//!
//! Must never: speak the Kafka wire protocol (that is `floe-net`); answer a
//! producer before its segment is durable and committed; grow memory
//! without a bound.

pub mod acls;
pub mod archive;
pub mod batch;
pub mod broker_configs;
pub mod cache;
pub mod cluster;
pub mod committer;
pub mod compact;
pub mod config;
pub mod consumer_group;
pub mod coordinator;
pub mod crash;
mod engine;
mod error;
mod gaps;
pub mod group;
pub mod health;
pub mod index;
pub mod metrics;
pub mod pool;
pub mod quotas;
pub mod retention;
pub mod segment;
pub mod sequencer;
pub mod shard;
pub mod sidecar;
pub mod topics;
pub mod transactions;
pub mod txn;
pub mod txn_store;
pub mod users;

use std::sync::atomic::{AtomicBool, Ordering};

pub use config::EngineConfig;
pub use engine::{CleanupSettings, Engine, EngineStart};
pub use error::{Error, Result};

/// A partition, by topic id (new when a topic is created again).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PartitionKey {
    pub topic_id: uuid::Uuid,
    pub partition: u32,
}

impl PartitionKey {
    /// The shard that owns this partition: a stable hash, so every broker
    /// and every restart agree.
    pub fn owner(&self, shards: usize) -> usize {
        // FNV-1a over the topic id and partition.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self
            .topic_id
            .as_bytes()
            .iter()
            .chain(self.partition.to_le_bytes().iter())
        {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % shards.max(1) as u64) as usize
    }
}

/// Broker-wide shutdown signal, set once by the signal handler.
#[derive(Default)]
pub struct Shutdown {
    flag: AtomicBool,
    event: event_listener::Event,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }
    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Resolves once shutdown has been triggered.
    pub async fn wait(&self) {
        loop {
            let l = self.event.listen();
            if self.is_triggered() {
                return;
            }
            l.await;
        }
    }
}

//! floe-engine (stub while being written)
pub mod batch;
pub mod index;
pub mod segment;
pub mod sequencer;

/// A partition, by topic id (stable across renames, new on re-creation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub topic_id: uuid::Uuid,
    pub partition: u32,
}

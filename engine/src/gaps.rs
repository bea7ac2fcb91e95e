//! Sequence gaps behind a batch this shard failed.
//!
//! An idempotent producer pipelines up to five requests per partition. When
//! the segment holding its batch at sequence `n` fails (upload or commit)
//! and the one holding `n + 1` commits, the log refuses `n + 1` as out of
//! order, and Kafka's answer would be OUT_OF_ORDER_SEQUENCE_NUMBER. In
//! Kafka that is rare (a leader appends before it can fail a write); here
//! it is the ordinary result of a failed upload. librdkafka answers it by
//! bumping the producer's epoch for *all* its partitions and renumbering
//! every message not yet acknowledged, including ones that failed as
//! "possibly persisted" elsewhere (a broker killed after its commit
//! landed): those are then written twice. So a batch refused as out of
//! order only because an earlier batch of the same producer, epoch and
//! partition failed here moments ago is answered with a retriable "not
//! persisted" error instead: the client retries both, in order, under the
//! same epoch. The batch is not in the log either way; only the advice to
//! the client differs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use floe_meta::schema::SegmentRecord;

use crate::sequencer::BatchOutcome;
use crate::PartitionKey;

/// How long a failure explains a later gap. Clients retry within their
/// retry backoff (librdkafka: 100 ms to 1 s); past this, a gap is answered
/// as Kafka does.
pub const GAP_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Failed {
    epoch: i16,
    /// The lowest first sequence among the failed batches.
    first_seq: i32,
    at: Instant,
}

/// One idempotent batch of a segment, where `gaps` looks.
#[derive(Debug, Clone, Copy)]
struct Idempotent {
    chunk: usize,
    batch: usize,
    producer: (i64, PartitionKey),
    epoch: i16,
    seq: i32,
}

/// A segment's idempotent batches, taken before the segment goes to the
/// committer (which keeps its record): one small list, empty without an
/// allocation when no batch is idempotent, instead of a copy of the record.
#[derive(Debug, Default)]
pub struct IdempotentBatches(Vec<Idempotent>);

impl IdempotentBatches {
    pub fn of(record: &SegmentRecord) -> Self {
        let mut out = Vec::new();
        for (c, chunk) in record.chunks.iter().enumerate() {
            let tp = PartitionKey {
                topic_id: chunk.topic_id,
                partition: chunk.partition,
            };
            for (i, b) in chunk.batches.iter().enumerate() {
                if b.producer_id >= 0 {
                    out.push(Idempotent {
                        chunk: c,
                        batch: i,
                        producer: (b.producer_id, tp),
                        epoch: b.producer_epoch,
                        seq: b.base_sequence,
                    });
                }
            }
        }
        Self(out)
    }
}

/// Producer partitions whose batches failed on this shard lately.
#[derive(Debug, Default)]
pub struct FailedBatches {
    failed: HashMap<(i64, PartitionKey), Failed>,
}

impl FailedBatches {
    /// Remembers the idempotent batches of a segment that failed.
    pub fn segment_failed(&mut self, batches: &IdempotentBatches, now: Instant) {
        self.failed
            .retain(|_, f| now.duration_since(f.at) < GAP_GRACE);
        for b in &batches.0 {
            let fresh = Failed {
                epoch: b.epoch,
                first_seq: b.seq,
                at: now,
            };
            let f = self.failed.entry(b.producer).or_insert(fresh);
            if f.epoch == b.epoch {
                f.first_seq = f.first_seq.min(b.seq);
                f.at = now;
            } else {
                *f = fresh;
            }
        }
    }

    /// Reviews a committed segment's outcomes (`outcomes[chunk][batch]`):
    /// an out-of-order batch behind a recent failure of its producer
    /// partition becomes [`BatchOutcome::NotPersisted`]; a batch that
    /// landed at or past the failed sequence ends the failure's effect.
    pub fn review(
        &mut self,
        batches: &IdempotentBatches,
        outcomes: &mut [Vec<BatchOutcome>],
        now: Instant,
    ) {
        if self.failed.is_empty() {
            return;
        }
        for b in &batches.0 {
            let Some(f) = self.failed.get(&b.producer).copied() else {
                continue;
            };
            if now.duration_since(f.at) >= GAP_GRACE || f.epoch != b.epoch {
                self.failed.remove(&b.producer);
                continue;
            }
            let out = &mut outcomes[b.chunk][b.batch];
            match out {
                BatchOutcome::OutOfOrder if b.seq > f.first_seq => {
                    *out = BatchOutcome::NotPersisted;
                }
                BatchOutcome::Appended { .. } | BatchOutcome::Duplicate { .. }
                    if b.seq >= f.first_seq =>
                {
                    self.failed.remove(&b.producer);
                }
                _ => {}
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.failed.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.failed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_meta::schema::{BatchRecord, ChunkRecord};
    use uuid::Uuid;

    fn segment(topic: Uuid, batches: &[(i64, i16, i32)]) -> IdempotentBatches {
        IdempotentBatches::of(&SegmentRecord {
            key: "s".into(),
            size: 0,
            chunks: vec![ChunkRecord {
                topic_id: topic,
                partition: 0,
                batches: batches
                    .iter()
                    .map(
                        |&(producer_id, producer_epoch, base_sequence)| BatchRecord {
                            pos: 0,
                            len: 1,
                            records: 1,
                            max_ts: 0,
                            producer_id,
                            producer_epoch,
                            base_sequence,
                            transactional: false,
                        },
                    )
                    .collect(),
            }],
        })
    }

    #[test]
    fn a_gap_behind_a_recent_failure_is_not_persisted_and_ends_when_the_retry_lands() {
        let topic = Uuid::new_v4();
        let t0 = Instant::now();
        let mut f = FailedBatches::default();
        f.segment_failed(&segment(topic, &[(7, 2, 231), (8, 0, 5)]), t0);
        assert_eq!(f.len(), 2);

        // 232 of producer 7 lands out of order: retriable, not persisted.
        // Producer 9 never failed here: Kafka's answer stands.
        let s = segment(topic, &[(7, 2, 232), (9, 0, 3)]);
        let mut o = vec![vec![BatchOutcome::OutOfOrder, BatchOutcome::OutOfOrder]];
        f.review(&s, &mut o, t0 + Duration::from_millis(50));
        assert_eq!(o[0], [BatchOutcome::NotPersisted, BatchOutcome::OutOfOrder]);

        // The retry of 231 lands: a later gap is the producer's own.
        let s = segment(topic, &[(7, 2, 231)]);
        let mut o = vec![vec![BatchOutcome::Appended { base_offset: 10 }]];
        f.review(&s, &mut o, t0 + Duration::from_millis(200));
        let s = segment(topic, &[(7, 2, 240)]);
        let mut o = vec![vec![BatchOutcome::OutOfOrder]];
        f.review(&s, &mut o, t0 + Duration::from_millis(300));
        assert_eq!(o[0], [BatchOutcome::OutOfOrder]);
        assert_eq!(f.len(), 1, "producer 8's failure is still remembered");
    }

    #[test]
    fn a_failure_explains_nothing_after_the_grace_or_in_another_epoch() {
        let topic = Uuid::new_v4();
        let t0 = Instant::now();
        let mut f = FailedBatches::default();
        f.segment_failed(&segment(topic, &[(7, 2, 10)]), t0);
        let s = segment(topic, &[(7, 3, 1)]);
        let mut o = vec![vec![BatchOutcome::OutOfOrder]];
        f.review(&s, &mut o, t0 + Duration::from_millis(10));
        assert_eq!(
            o[0],
            [BatchOutcome::OutOfOrder],
            "a new epoch starts afresh"
        );

        f.segment_failed(&segment(topic, &[(7, 2, 10)]), t0);
        let s = segment(topic, &[(7, 2, 11)]);
        let mut o = vec![vec![BatchOutcome::OutOfOrder]];
        f.review(&s, &mut o, t0 + GAP_GRACE);
        assert_eq!(o[0], [BatchOutcome::OutOfOrder]);
        assert!(f.is_empty());

        // A batch at or below the failed sequence is not behind it.
        f.segment_failed(&segment(topic, &[(7, 2, 10)]), t0);
        let s = segment(topic, &[(7, 2, 9)]);
        let mut o = vec![vec![BatchOutcome::OutOfOrder]];
        f.review(&s, &mut o, t0 + Duration::from_millis(10));
        assert_eq!(o[0], [BatchOutcome::OutOfOrder]);
    }

    #[test]
    fn old_failures_are_forgotten_when_new_ones_arrive() {
        let topic = Uuid::new_v4();
        let t0 = Instant::now();
        let mut f = FailedBatches::default();
        for pid in 0..100 {
            f.segment_failed(&segment(topic, &[(pid, 0, 1)]), t0);
        }
        assert_eq!(f.len(), 100);
        f.segment_failed(&segment(topic, &[(1000, 0, 1)]), t0 + GAP_GRACE);
        assert_eq!(f.len(), 1);
    }
}

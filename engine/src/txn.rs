//! The transaction coordinator's state machine for one transactional id,
//! as a plain record with the time passed in and no I/O (Kafka's
//! `TransactionMetadata` and the coordinator's checks around it).
//!
//! Not wired to the protocol yet: floe still refuses a `transactional.id`.
//! The runtime that will drive it (ARCHITECTURE.md, "Transactions") reads
//! the record from the metadata store, applies one of these transitions,
//! and writes the result back by compare-and-swap on the revision it read,
//! so any broker can coordinate any transactional id and two brokers
//! racing on one id cannot both advance it.
//!
//! States follow Kafka: `Empty` → (AddPartitionsToTxn / AddOffsetsToTxn)
//! `Ongoing` → (EndTxn) `PrepareCommit` or `PrepareAbort` → (every marker
//! written) `CompleteCommit` or `CompleteAbort` → (the next partition
//! added) `Ongoing`… A new producer instance (InitProducerId) or the
//! transaction timeout aborts an open transaction with the epoch bumped,
//! which fences the instance that opened it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Kafka's `transaction.max.timeout.ms` default (15 minutes).
pub const TRANSACTION_MAX_TIMEOUT_MS: i32 = 900_000;
/// Partitions one transaction may write to; bounds the persisted record
/// (about 40 bytes a partition) well below etcd's 1.5 MiB request limit.
pub const TXN_PARTITIONS_MAX: usize = 10_000;
/// Groups one transaction may commit offsets for.
pub const TXN_GROUPS_MAX: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnState {
    /// The name Kafka's DescribeTransactions and ListTransactions use.
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Empty => "Empty",
            TxnState::Ongoing => "Ongoing",
            TxnState::PrepareCommit => "PrepareCommit",
            TxnState::PrepareAbort => "PrepareAbort",
            TxnState::CompleteCommit => "CompleteCommit",
            TxnState::CompleteAbort => "CompleteAbort",
        }
    }

    /// Markers are being written: the outcome is decided, not yet visible.
    pub fn is_preparing(self) -> bool {
        matches!(self, TxnState::PrepareCommit | TxnState::PrepareAbort)
    }
}

/// Why a transactional request is refused; `net` maps each to its Kafka
/// code (the name says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// A newer instance of this transactional id exists.
    #[error("producer fenced: a newer producer with this transactional id exists")]
    ProducerFenced,
    /// The epoch is not the current one, and not older either.
    #[error("invalid producer epoch")]
    InvalidProducerEpoch,
    /// The producer id is not the one this transactional id holds.
    #[error("the producer id does not belong to this transactional id")]
    InvalidProducerIdMapping,
    /// The previous transaction is still being completed: retry.
    #[error("a transaction of this transactional id is being completed")]
    ConcurrentTransactions,
    /// The request does not fit the transaction's state.
    #[error("invalid transaction state")]
    InvalidTxnState,
    /// `transaction.timeout.ms` outside 1 ..= the broker's maximum.
    #[error("transaction timeout outside 1..=transaction.max.timeout.ms")]
    InvalidTransactionTimeout,
    /// More partitions or groups than one transaction may hold.
    #[error("the transaction holds too many partitions or groups")]
    TooLarge,
}

/// One transactional id's persisted state (`txns/<id>` in the metadata
/// store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    pub producer_id: i64,
    pub epoch: i16,
    /// The producer id and epoch before the last InitProducerId, so a
    /// client retrying that call (KIP-360) gets the same answer.
    pub last_producer_id: i64,
    pub last_epoch: i16,
    pub timeout_ms: i32,
    pub state: TxnState,
    /// Topic-partitions written in the current transaction.
    pub partitions: BTreeSet<(String, i32)>,
    /// Groups whose offsets the current transaction commits.
    pub groups: BTreeSet<String>,
    /// When the current transaction began (its first partition or group).
    pub started_ms: i64,
    pub updated_ms: i64,
    /// Offsets committed in the current transaction (TxnOffsetCommit):
    /// written to the groups' offsets when it commits, dropped when it
    /// aborts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_offsets: Vec<PendingOffset>,
}

/// One offset a transaction commits for a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOffset {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub record: floe_meta::schema::OffsetRecord,
}

/// What InitProducerId does with the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitOutcome {
    /// Answer with this producer id and epoch (the record is updated).
    Ready { producer_id: i64, epoch: i16 },
    /// A transaction is open: it is aborted first (the record now says
    /// `PrepareAbort` under a bumped epoch, fencing its producer). The
    /// client is answered CONCURRENT_TRANSACTIONS and retries once the
    /// markers are written.
    AbortFirst,
}

/// The epoch after `epoch`, or None when the producer id is exhausted
/// (Kafka gives a new producer id then).
fn next_epoch(epoch: i16) -> Option<i16> {
    (epoch < i16::MAX - 1).then(|| epoch + 1)
}

impl TxnRecord {
    /// A new transactional id's record.
    pub fn new(producer_id: i64, timeout_ms: i32, now_ms: i64) -> Self {
        Self {
            producer_id,
            epoch: 0,
            last_producer_id: -1,
            last_epoch: -1,
            timeout_ms,
            state: TxnState::Empty,
            partitions: BTreeSet::new(),
            groups: BTreeSet::new(),
            started_ms: -1,
            updated_ms: now_ms,
            pending_offsets: Vec::new(),
        }
    }

    /// InitProducerId for an existing record. `expected` is the producer
    /// id and epoch the client already has (KIP-360; None for a new
    /// instance); `fresh_id` gives a new producer id when the epoch runs
    /// out.
    pub fn init(
        &mut self,
        timeout_ms: i32,
        max_timeout_ms: i32,
        expected: Option<(i64, i16)>,
        now_ms: i64,
        fresh_id: impl FnOnce() -> i64,
    ) -> Result<InitOutcome, TxnError> {
        if !(1..=max_timeout_ms).contains(&timeout_ms) {
            return Err(TxnError::InvalidTransactionTimeout);
        }
        if let Some((pid, epoch)) = expected {
            let retry = pid == self.last_producer_id && epoch == self.last_epoch;
            let current = pid == self.producer_id && epoch == self.epoch;
            if retry && self.state != TxnState::Ongoing && !self.state.is_preparing() {
                // The answer to this call was lost: give it again.
                return Ok(InitOutcome::Ready {
                    producer_id: self.producer_id,
                    epoch: self.epoch,
                });
            }
            if !current && !retry {
                return Err(if pid == self.producer_id && epoch < self.epoch {
                    TxnError::ProducerFenced
                } else {
                    TxnError::InvalidProducerEpoch
                });
            }
        }
        match self.state {
            TxnState::PrepareCommit | TxnState::PrepareAbort => {
                Err(TxnError::ConcurrentTransactions)
            }
            TxnState::Ongoing => {
                self.fence_and_abort(now_ms);
                Ok(InitOutcome::AbortFirst)
            }
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                self.bump_epoch(fresh_id);
                self.timeout_ms = timeout_ms;
                self.state = TxnState::Empty;
                self.partitions.clear();
                self.groups.clear();
                self.pending_offsets.clear();
                self.started_ms = -1;
                self.updated_ms = now_ms;
                Ok(InitOutcome::Ready {
                    producer_id: self.producer_id,
                    epoch: self.epoch,
                })
            }
        }
    }

    /// Aborts the open transaction under a bumped epoch (a new producer
    /// instance arrived, or the transaction timed out): its producer is
    /// fenced, and markers are written under the new epoch. The producer
    /// id stays, even at the last epoch (`next_epoch` leaves room for
    /// this one): the markers must name the producer whose batches are
    /// open; the next InitProducerId moves to a new id.
    fn fence_and_abort(&mut self, now_ms: i64) {
        self.last_producer_id = self.producer_id;
        self.last_epoch = self.epoch;
        self.epoch = self.epoch.saturating_add(1);
        self.state = TxnState::PrepareAbort;
        self.updated_ms = now_ms;
    }

    /// The next epoch (remembering this one for KIP-360 retries), or a new
    /// producer id at epoch 0 when the epochs run out.
    fn bump_epoch(&mut self, fresh_id: impl FnOnce() -> i64) {
        self.last_producer_id = self.producer_id;
        self.last_epoch = self.epoch;
        match next_epoch(self.epoch) {
            Some(e) => self.epoch = e,
            None => {
                self.producer_id = fresh_id();
                self.epoch = 0;
            }
        }
    }

    /// Checks that a request from `producer_id` at `epoch` may change the
    /// current transaction.
    fn check_producer(&self, producer_id: i64, epoch: i16) -> Result<(), TxnError> {
        if producer_id != self.producer_id {
            // A fenced instance whose epoch ran out holds the old id.
            return Err(if producer_id == self.last_producer_id {
                TxnError::ProducerFenced
            } else {
                TxnError::InvalidProducerIdMapping
            });
        }
        if epoch < self.epoch {
            return Err(TxnError::ProducerFenced);
        }
        if epoch > self.epoch {
            return Err(TxnError::InvalidProducerEpoch);
        }
        Ok(())
    }

    /// AddPartitionsToTxn and AddOffsetsToTxn: the transaction now covers
    /// `partitions` and `groups` (which may be empty).
    pub fn add(
        &mut self,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, i32)],
        groups: &[String],
        now_ms: i64,
    ) -> Result<(), TxnError> {
        self.check_producer(producer_id, epoch)?;
        if self.state.is_preparing() {
            return Err(TxnError::ConcurrentTransactions);
        }
        let new_parts = partitions
            .iter()
            .filter(|p| !self.partitions.contains(*p))
            .count();
        let new_groups = groups.iter().filter(|g| !self.groups.contains(*g)).count();
        let fresh = self.state != TxnState::Ongoing;
        let (held_parts, held_groups) = if fresh {
            (0, 0)
        } else {
            (self.partitions.len(), self.groups.len())
        };
        if held_parts + new_parts > TXN_PARTITIONS_MAX || held_groups + new_groups > TXN_GROUPS_MAX
        {
            return Err(TxnError::TooLarge);
        }
        if fresh {
            self.partitions.clear();
            self.groups.clear();
            self.pending_offsets.clear();
            self.started_ms = now_ms;
            self.state = TxnState::Ongoing;
        }
        self.partitions.extend(partitions.iter().cloned());
        self.groups.extend(groups.iter().cloned());
        self.updated_ms = now_ms;
        Ok(())
    }

    /// Whether a transactional write to `partition` by this producer is
    /// part of the open transaction (KIP-890 part 1: the broker verifies
    /// it before appending).
    pub fn covers(&self, producer_id: i64, epoch: i16, partition: &(String, i32)) -> bool {
        self.state == TxnState::Ongoing
            && self.producer_id == producer_id
            && self.epoch == epoch
            && self.partitions.contains(partition)
    }

    /// EndTxn. `Ok(true)`: the outcome is now prepared and its markers
    /// must be written; `Ok(false)`: a retry of an EndTxn that already
    /// completed the same way (answered with success, nothing to do).
    pub fn end(
        &mut self,
        producer_id: i64,
        epoch: i16,
        commit: bool,
        now_ms: i64,
    ) -> Result<bool, TxnError> {
        self.check_producer(producer_id, epoch)?;
        match (self.state, commit) {
            (TxnState::Ongoing, _) => {
                self.state = if commit {
                    TxnState::PrepareCommit
                } else {
                    TxnState::PrepareAbort
                };
                self.updated_ms = now_ms;
                Ok(true)
            }
            (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => Ok(false),
            (TxnState::PrepareCommit, true) | (TxnState::PrepareAbort, false) => {
                Err(TxnError::ConcurrentTransactions)
            }
            // An abort with nothing open is harmless (Kafka's clients send
            // one after an error before any partition was added).
            (TxnState::Empty, false) => Ok(false),
            _ => Err(TxnError::InvalidTxnState),
        }
    }

    /// TxnOffsetCommit: `offsets` of `group` become part of the open
    /// transaction (replacing any it staged for the same partitions).
    pub fn stage_offsets(
        &mut self,
        producer_id: i64,
        epoch: i16,
        group: &str,
        offsets: Vec<PendingOffset>,
        now_ms: i64,
    ) -> Result<(), TxnError> {
        self.check_producer(producer_id, epoch)?;
        if self.state.is_preparing() {
            return Err(TxnError::ConcurrentTransactions);
        }
        if self.state != TxnState::Ongoing || !self.groups.contains(group) {
            return Err(TxnError::InvalidTxnState);
        }
        for o in offsets {
            self.pending_offsets.retain(|p| {
                !(p.group == o.group && p.topic == o.topic && p.partition == o.partition)
            });
            self.pending_offsets.push(o);
        }
        if self.pending_offsets.len() > TXN_PARTITIONS_MAX {
            return Err(TxnError::TooLarge);
        }
        self.updated_ms = now_ms;
        Ok(())
    }

    /// Every marker of the prepared outcome is in the log. Returns the
    /// offsets to write now: a commit's staged ones (an abort drops
    /// them).
    pub fn complete(&mut self, now_ms: i64) -> Result<Vec<PendingOffset>, TxnError> {
        let commit = match self.state {
            TxnState::PrepareCommit => true,
            TxnState::PrepareAbort => false,
            _ => return Err(TxnError::InvalidTxnState),
        };
        self.state = if commit {
            TxnState::CompleteCommit
        } else {
            TxnState::CompleteAbort
        };
        self.updated_ms = now_ms;
        let offsets = std::mem::take(&mut self.pending_offsets);
        Ok(if commit { offsets } else { Vec::new() })
    }

    /// The cluster aborts a transaction open longer than its timeout:
    /// true when this record was changed to `PrepareAbort` (epoch bumped,
    /// its producer fenced).
    pub fn expire(&mut self, now_ms: i64) -> bool {
        let due = self.state == TxnState::Ongoing
            && now_ms.saturating_sub(self.started_ms) > i64::from(self.timeout_ms);
        if due {
            self.fence_and_abort(now_ms);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: i32 = TRANSACTION_MAX_TIMEOUT_MS;

    fn tp(p: i32) -> (String, i32) {
        ("t".to_string(), p)
    }

    fn ready(r: Result<InitOutcome, TxnError>) -> (i64, i16) {
        match r {
            Ok(InitOutcome::Ready { producer_id, epoch }) => (producer_id, epoch),
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    fn no_fresh_id() -> i64 {
        panic!("no new producer id expected")
    }

    #[test]
    fn commit_cycle_and_retried_end() {
        let mut r = TxnRecord::new(7, 60_000, 0);
        let (pid, e) = ready(r.init(60_000, MAX, None, 1, no_fresh_id));
        assert_eq!((pid, e), (7, 1));
        r.add(pid, e, &[tp(0), tp(1)], &[], 2).unwrap();
        assert_eq!((r.state, r.started_ms), (TxnState::Ongoing, 2));
        r.add(pid, e, &[tp(1)], &["g".to_string()], 3).unwrap();
        assert!(r.covers(pid, e, &tp(1)) && !r.covers(pid, e, &tp(2)));
        assert!(!r.covers(pid, e - 1, &tp(1)));
        assert_eq!(r.end(pid, e, true, 4), Ok(true));
        assert_eq!(r.state, TxnState::PrepareCommit);
        // The client retries while the markers are written.
        assert_eq!(
            r.end(pid, e, true, 5),
            Err(TxnError::ConcurrentTransactions)
        );
        assert_eq!(
            r.add(pid, e, &[tp(3)], &[], 5),
            Err(TxnError::ConcurrentTransactions)
        );
        assert_eq!(r.end(pid, e, false, 5), Err(TxnError::InvalidTxnState));
        r.complete(6).unwrap();
        assert_eq!(r.end(pid, e, true, 7), Ok(false), "a lost answer, retried");
        assert_eq!(r.end(pid, e, false, 7), Err(TxnError::InvalidTxnState));
        // The next transaction starts afresh.
        r.add(pid, e, &[tp(2)], &[], 8).unwrap();
        assert_eq!(r.partitions.len(), 1);
        assert!(r.groups.is_empty());
        assert_eq!(r.started_ms, 8);
    }

    #[test]
    fn a_new_instance_aborts_the_open_transaction_and_fences_the_old() {
        let mut r = TxnRecord::new(7, 60_000, 0);
        let (pid, old) = ready(r.init(60_000, MAX, None, 1, no_fresh_id));
        r.add(pid, old, &[tp(0)], &[], 2).unwrap();
        assert_eq!(
            r.init(60_000, MAX, None, 3, no_fresh_id),
            Ok(InitOutcome::AbortFirst)
        );
        assert_eq!((r.state, r.epoch), (TxnState::PrepareAbort, old + 1));
        // The old instance is fenced from here on.
        assert_eq!(r.end(pid, old, true, 4), Err(TxnError::ProducerFenced));
        assert_eq!(
            r.add(pid, old, &[tp(1)], &[], 4),
            Err(TxnError::ProducerFenced)
        );
        // The new one waits for the abort's markers, then gets an epoch
        // of its own.
        assert_eq!(
            r.init(60_000, MAX, None, 4, no_fresh_id),
            Err(TxnError::ConcurrentTransactions)
        );
        r.complete(5).unwrap();
        assert_eq!(r.state, TxnState::CompleteAbort);
        let (_, new) = ready(r.init(60_000, MAX, None, 6, no_fresh_id));
        assert_eq!(new, old + 2);
        assert_eq!(r.end(pid, old, false, 7), Err(TxnError::ProducerFenced));
    }

    #[test]
    fn init_retried_by_kip_360_gets_the_same_answer() {
        let mut r = TxnRecord::new(7, 60_000, 0);
        let first = ready(r.init(60_000, MAX, None, 1, no_fresh_id));
        let second = ready(r.init(60_000, MAX, Some(first), 2, no_fresh_id));
        assert_eq!(second, (7, first.1 + 1));
        // The answer to the second call was lost: the client asks again
        // with what it had.
        assert_eq!(
            ready(r.init(60_000, MAX, Some(first), 3, no_fresh_id)),
            second
        );
        assert_eq!(
            r.init(60_000, MAX, Some((7, first.1 - 1)), 3, no_fresh_id),
            Err(TxnError::ProducerFenced)
        );
        assert_eq!(
            r.init(60_000, MAX, Some((99, 0)), 3, no_fresh_id),
            Err(TxnError::InvalidProducerEpoch)
        );
    }

    #[test]
    fn an_exhausted_epoch_moves_to_a_new_producer_id() {
        let mut r = TxnRecord::new(7, 60_000, 0);
        r.epoch = i16::MAX - 1;
        let (pid, e) = ready(r.init(60_000, MAX, None, 1, || 8));
        assert_eq!((pid, e), (8, 0));
        r.add(8, 0, &[tp(0)], &[], 2).unwrap();
        // The fenced instance still holds the old id.
        assert_eq!(
            r.add(7, i16::MAX - 1, &[tp(0)], &[], 3),
            Err(TxnError::ProducerFenced)
        );
        assert_eq!(
            r.add(9, 0, &[tp(0)], &[], 3),
            Err(TxnError::InvalidProducerIdMapping)
        );
    }

    #[test]
    fn timeout_aborts_with_a_bumped_epoch() {
        let mut r = TxnRecord::new(7, 1_000, 0);
        let (pid, e) = ready(r.init(1_000, MAX, None, 0, no_fresh_id));
        assert!(!r.expire(5_000), "nothing open");
        r.add(pid, e, &[tp(0)], &[], 10).unwrap();
        assert!(!r.expire(1_010));
        assert!(r.expire(1_011));
        assert_eq!((r.state, r.epoch), (TxnState::PrepareAbort, e + 1));
        assert!(!r.expire(9_999), "already aborting");
        assert_eq!(r.end(pid, e, true, 1_012), Err(TxnError::ProducerFenced));
    }

    #[test]
    fn bounds_and_bad_requests() {
        let mut r = TxnRecord::new(7, 60_000, 0);
        assert_eq!(
            r.init(0, MAX, None, 1, no_fresh_id),
            Err(TxnError::InvalidTransactionTimeout)
        );
        assert_eq!(
            r.init(MAX + 1, MAX, None, 1, no_fresh_id),
            Err(TxnError::InvalidTransactionTimeout)
        );
        let (pid, e) = ready(r.init(60_000, MAX, None, 1, no_fresh_id));
        assert_eq!(r.end(pid, e, true, 2), Err(TxnError::InvalidTxnState));
        assert_eq!(r.end(pid, e, false, 2), Ok(false), "abort of nothing");
        assert_eq!(r.complete(2), Err(TxnError::InvalidTxnState));
        assert_eq!(
            r.add(pid, e + 1, &[tp(0)], &[], 2),
            Err(TxnError::InvalidProducerEpoch)
        );
        let many: Vec<String> = (0..=TXN_GROUPS_MAX).map(|i| format!("g{i}")).collect();
        assert_eq!(r.add(pid, e, &[], &many, 3), Err(TxnError::TooLarge));
        assert_eq!(r.state, TxnState::Empty, "a refused add changes nothing");
    }

    #[test]
    fn record_round_trips_through_json() {
        let mut r = TxnRecord::new(7, 60_000, 0);
        let (pid, e) = ready(r.init(60_000, MAX, None, 1, no_fresh_id));
        r.add(pid, e, &[tp(0)], &["g".to_string()], 2).unwrap();
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<TxnRecord>(&json).unwrap(), r);
    }
}

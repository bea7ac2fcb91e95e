//! The compaction job: compacted topics (`cleanup.policy=compact`) keep
//! the latest value of each key. A pass over a partition reads its dirty
//! archives into a key map, rewrites its archives from the first to the
//! last one mapped without the records that lost (`crate::compact`), and
//! commits each compacted archive in place of the archives it replaces
//! (an [`ArchiveRecord`] with `replaces`).
//!
//! It runs where the partition is archived (`archiver_of`), one pass at a
//! time per broker, and is as crash-safe as archiving: outputs are
//! uploaded before their entry is sent, an output the log did not take is
//! deleted, one whose fate is unknown is left to the orphan sweep, and the
//! archives an output replaces are released through the log and deleted
//! after the delete grace, so fetches that located them still read them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use floe_meta::schema::ArchiveRecord;
use floe_objstore::ObjectStore;

use super::archiving::{archiver_of, retried, spawn_round, upload_and_commit};
use super::{CommitRequest, Committer};
use crate::archive::{read_footer, ArchiveBuilder};
use crate::compact::{
    archive_written_ms, compacted_key, filter_batch, plan_pass, survives, CompactionPolicy, Kept,
    KeyMap, PassInput,
};
use crate::retention::{is_archive_key, ARCHIVES_PREFIX};
use crate::sequencer::AbortedTxn;
use crate::{Error, PartitionKey, Result};

/// One pass over one partition.
#[derive(Debug)]
struct Pass {
    tp: PartitionKey,
    policy: CompactionPolicy,
    inputs: Vec<PassInput>,
    log_start: u64,
    /// The pass reaches the partition's last offset: its last batch stays
    /// whole, so the log never ends in a gap (Kafka never cleans the
    /// active segment).
    at_head: bool,
    /// The partition's aborted transactions: their batches are dropped,
    /// and their keys do not count (a value a transaction wrote and
    /// aborted must not replace the last committed one).
    aborted: Vec<AbortedTxn>,
}

/// Whether the stored batch at `base_offset` belongs to an aborted
/// transaction (its producer's, between the transaction's first offset and
/// its abort marker).
fn is_aborted(aborted: &[AbortedTxn], base_offset: u64, stored: &[u8]) -> bool {
    let Ok((_, h)) = crate::batch::parse_header(stored) else {
        return false;
    };
    h.is_transactional()
        && h.producer_id >= 0
        && aborted.iter().any(|a| {
            a.producer_id == h.producer_id
                && (a.first_offset..a.marker_offset).contains(&base_offset)
        })
}

/// What a pass did.
#[derive(Debug, Default)]
struct PassDone {
    outputs: u64,
    dropped: u64,
}

impl Committer {
    /// One compaction turn: when no pass is running, finds the compacted
    /// partitions this broker archives that are due, and compacts them in
    /// the background, one after another.
    pub(super) fn compact_turn(&mut self) {
        let (Some(l), Some(a)) = (self.lifecycle.clone(), self.archiver.as_mut()) else {
            return;
        };
        if a.settings.target_bytes == 0 || a.compacting.load(Ordering::Acquire) {
            return;
        }
        let policies: HashMap<uuid::Uuid, CompactionPolicy> = l
            .topics
            .snapshot()
            .values()
            .filter_map(|t| {
                let p = CompactionPolicy::from_configs(|k| t.configs.get(k).map(String::as_str));
                p.compact.then_some((t.id, p))
            })
            .collect();
        if policies.is_empty() {
            return;
        }
        let nodes: Vec<i32> = l.members.live().iter().map(|b| b.node_id).collect();
        let now_ms = crate::health::now_ms();
        let capacity = KeyMap::capacity_for(a.settings.key_map_bytes);
        let mut passes = Vec::new();
        for tp in self.state.partitions() {
            let Some(policy) = policies.get(&tp.topic_id) else {
                continue;
            };
            if archiver_of(tp, &nodes) != Some(l.node_id) {
                continue;
            }
            let archives: Vec<PassInput> = self
                .state
                .layout(tp)
                .take_while(|(_, k)| is_archive_key(k))
                .map(|(e, k)| PassInput {
                    key: k.clone(),
                    base_offset: e.base_offset,
                    end_offset: e.end_offset(),
                    size: u64::from(e.len),
                    max_ts: e.max_ts,
                })
                .collect();
            let Some(plan) = plan_pass(&archives, policy, now_ms, capacity) else {
                continue;
            };
            if plan.limited {
                tracing::info!(
                    ?tp,
                    archives = plan.end,
                    "a compaction pass is limited by --compaction-key-map-bytes; the next pass goes on"
                );
            }
            let mut inputs = archives;
            inputs.truncate(plan.end);
            // Nothing past the last stable offset: a transaction still open
            // may yet abort, and its values must not replace committed ones
            // (Kafka's cleaner stops there too).
            let stable = self.state.last_stable_offset(tp);
            let upto = inputs.partition_point(|i| i.end_offset <= stable);
            inputs.truncate(upto);
            if inputs.is_empty() {
                continue;
            }
            let at_head = inputs
                .last()
                .is_some_and(|i| i.end_offset >= self.state.high_watermark(tp));
            passes.push(Pass {
                tp: *tp,
                policy: *policy,
                inputs,
                log_start: self.state.log_start(tp),
                at_head,
                aborted: self.state.aborted(tp).copied().collect(),
            });
        }
        if passes.is_empty() {
            return;
        }
        let Some(requests) = a.requests.upgrade() else {
            return;
        };
        let (store, node, target) = (self.store.clone(), l.node_id, a.settings.target_bytes);
        let metrics = self.metrics.clone();
        spawn_round(&a.compacting, async move {
            for pass in passes {
                let tp = pass.tp;
                match compact(&*store, &requests, node, target, pass).await {
                    Ok(done) => {
                        if let Some(m) = &metrics {
                            crate::metrics::Metrics::add(&m.compactions, done.outputs);
                            crate::metrics::Metrics::add(
                                &m.compaction_records_dropped,
                                done.dropped,
                            );
                        }
                        tracing::debug!(
                            ?tp,
                            outputs = done.outputs,
                            dropped = done.dropped,
                            "compacted"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(?tp, error = %e, "compaction failed; a later turn retries")
                    }
                }
            }
        });
    }
}

/// Runs one pass: maps the dirty inputs' keys, rewrites the inputs into
/// compacted archives of about `target` bytes (each replacing a run of
/// whole inputs) and commits each.
async fn compact(
    store: &dyn ObjectStore,
    requests: &flume::Sender<CommitRequest>,
    node: i32,
    target: u64,
    pass: Pass,
) -> Result<PassDone> {
    let mut map = KeyMap::default();
    for input in pass
        .inputs
        .iter()
        .filter(|i| !crate::compact::is_compacted_key(&i.key))
    {
        for (base_offset, stored) in read_batches(store, &input.key).await? {
            if is_aborted(&pass.aborted, base_offset, &stored) {
                continue;
            }
            map.add_batch(base_offset, &stored)
                .map_err(|e| corrupt(&input.key, e.to_string()))?;
        }
    }
    let now_ms = crate::health::now_ms();
    let prefix = format!(
        "{ARCHIVES_PREFIX}{}/{}/",
        pass.tp.topic_id, pass.tp.partition
    );
    let mut done = PassDone::default();
    let mut out: Option<Output> = None;
    let last = pass.inputs.len().saturating_sub(1);
    for (i, input) in pass.inputs.iter().enumerate() {
        let batches = read_batches(store, &input.key).await?;
        let expire = archive_written_ms(&input.key)
            .is_some_and(|w| w.saturating_add(pass.policy.delete_retention_ms) <= now_ms);
        let o = out.get_or_insert_with(|| Output::new(pass.tp, input.base_offset));
        let count = batches.len();
        for (j, (base_offset, stored)) in batches.into_iter().enumerate() {
            let head = pass.at_head && i == last && j + 1 == count;
            let kept = if head {
                Kept::All
            } else if is_aborted(&pass.aborted, base_offset, &stored) {
                // Kafka's cleaner drops aborted transactions' records too.
                let records = crate::batch::parse_header(&stored).map_or(0, |(_, h)| h.records());
                done.dropped += u64::from(records);
                Kept::None
            } else {
                let mut dropped = 0u64;
                let kept = filter_batch(base_offset, &stored, |r| {
                    let keep = r.offset as u64 >= pass.log_start && survives(r, &map, expire);
                    dropped += u64::from(!keep);
                    keep
                })
                .map_err(|e| corrupt(&input.key, e.to_string()))?;
                done.dropped += dropped;
                kept
            };
            let pushed = match kept {
                // Copied, so the output pins only what it keeps, not
                // every input object it drew from.
                Kept::All => o.builder.push(base_offset, Bytes::copy_from_slice(&stored)),
                Kept::Some {
                    base_offset,
                    stored,
                } => o.builder.push(base_offset, stored),
                Kept::None => Ok(()),
            };
            pushed.map_err(|e| corrupt(&input.key, e.to_string()))?;
        }
        o.builder.extend_to(input.end_offset);
        o.replaces.push(input.key.to_string());
        o.written_ms = o
            .written_ms
            .max(archive_written_ms(&input.key).unwrap_or(now_ms));
        if o.builder.bytes() >= target || i == last {
            if let Some(o) = out.take() {
                crate::crash::point("compact-read");
                if commit(store, requests, node, &prefix, now_ms, o).await? {
                    done.outputs += 1;
                }
            }
        }
    }
    Ok(done)
}

/// A compacted archive being assembled.
struct Output {
    builder: ArchiveBuilder,
    replaces: Vec<String>,
    written_ms: u64,
}

impl Output {
    fn new(tp: PartitionKey, base_offset: u64) -> Self {
        Self {
            builder: ArchiveBuilder::compacted(tp, base_offset),
            replaces: Vec::new(),
            written_ms: 0,
        }
    }
}

/// Uploads `o` and commits it in place of the archives it replaces;
/// whether the log took it.
async fn commit(
    store: &dyn ObjectStore,
    requests: &flume::Sender<CommitRequest>,
    node: i32,
    prefix: &str,
    now_ms: u64,
    o: Output,
) -> Result<bool> {
    let base_offset = o.builder.base_offset();
    let end_offset = o.builder.next_offset();
    let sealed = o.builder.seal();
    let key = compacted_key(prefix, base_offset, node, o.written_ms, now_ms);
    let footer = sealed.footer.clone();
    let record = ArchiveRecord {
        topic_id: uuid::Uuid::from_bytes(footer.topic_id),
        partition: footer.partition,
        key: key.clone(),
        size: sealed.size,
        base_offset,
        end_offset,
        replaces: o.replaces,
    };
    upload_and_commit(store, requests, sealed.parts, record, "compact").await
}

/// Every batch of archive object `key`, as (base offset, stored bytes
/// sliced from the one GET of the whole object).
async fn read_batches(store: &dyn ObjectStore, key: &str) -> Result<Vec<(u64, Bytes)>> {
    let object = retried(|| store.get(key)).await?;
    let footer = read_footer(&object).map_err(|e| corrupt(key, e.to_string()))?;
    footer
        .batches
        .iter()
        .map(|b| {
            let start = usize::try_from(b.at.pos).ok();
            let end = start.and_then(|s| s.checked_add(b.at.len as usize));
            match (start, end) {
                (Some(s), Some(e)) if e <= object.len() => Ok((b.base_offset, object.slice(s..e))),
                _ => Err(corrupt(
                    key,
                    format!(
                        "the batch at offset {} lies outside the object",
                        b.base_offset
                    ),
                )),
            }
        })
        .collect()
}

fn corrupt(key: &str, reason: String) -> Error {
    Error::Corrupt {
        what: format!("archive {key}"),
        reason,
    }
}

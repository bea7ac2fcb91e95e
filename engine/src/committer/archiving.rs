//! The archiving job: rewrites a partition's committed intake batches into
//! one archive object (`engine/src/archive.rs`) and commits the switch
//! through the log, so every broker reads those offsets from the archive
//! from the same entry on.
//!
//! - **Who.** Each partition is archived by one live broker, chosen by
//!   rendezvous hashing of the partition over the registered node ids:
//!   when a broker dies its partitions spread over the others, and the
//!   rest stay where they were. Two brokers that disagree for a moment
//!   (membership changing) may both write an archive of the same batches;
//!   the log takes the first and ignores the second (see
//!   [`floe_meta::schema::ArchiveRecord`]), whose object this job deletes.
//! - **When.** A partition is due once its batches not yet archived hold
//!   the target size, or the oldest has waited the maximum age (measured
//!   from when this broker first saw it waiting).
//! - **Crash safety.** The object is uploaded before its entry is sent,
//!   and an entry sent later than half the orphan grace after the upload
//!   began is never sent (the committer's maximum commit age), so the
//!   orphan sweep never deletes an archive the log will reference. A crash
//!   before the commit leaves an orphan, which the sweep removes; the
//!   intake segments stay referenced until the entry lands, and are
//!   deleted by the usual release-and-grace rule after it, so fetches that
//!   located them just before the switch still read them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use floe_meta::schema::ArchiveRecord;
use floe_objstore::ObjectStore;
use futures::channel::oneshot;
use futures::StreamExt as _;

use super::{CommitRequest, Committer, RetryClock};
use crate::archive::ArchiveBuilder;
use crate::retention::ARCHIVES_PREFIX;
use crate::{Error, PartitionKey, Result};

/// GETs in flight while reading one archive's intake batches.
const READS_IN_FLIGHT: usize = 8;
/// An archive never holds more bytes than this (its length is a u32 in
/// the index, and a target above it is lowered to it).
pub const ARCHIVE_BYTES_MAX: u64 = 1 << 30;

/// Settings of the archiving job.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    /// Batches are gathered into archives of about this many bytes
    /// (0: archiving is off).
    pub target_bytes: u64,
    /// A partition with fewer bytes waiting is archived once its oldest
    /// waiting batch has waited this long.
    pub max_age: Duration,
    /// How often due partitions are looked for.
    pub interval: Duration,
    /// Memory for the key map of one compaction pass (compacted topics).
    pub key_map_bytes: usize,
}

/// The job's state inside the committer.
pub struct Archiver {
    pub(super) settings: ArchiveSettings,
    /// Weak, so the committer still stops once everyone else has let go
    /// of its queue.
    pub(super) requests: flume::WeakSender<CommitRequest>,
    /// A round of archives is being written.
    busy: Arc<AtomicBool>,
    /// A round of compaction passes is running.
    pub(super) compacting: Arc<AtomicBool>,
    /// When this broker first saw each partition it archives with
    /// batches waiting.
    waiting_since: HashMap<PartitionKey, Instant>,
}

impl Archiver {
    pub fn new(settings: ArchiveSettings, requests: &flume::Sender<CommitRequest>) -> Self {
        Self {
            settings,
            requests: requests.downgrade(),
            busy: Arc::default(),
            compacting: Arc::default(),
            waiting_since: HashMap::new(),
        }
    }

    pub fn interval(&self) -> Duration {
        self.settings.interval.max(Duration::from_millis(100))
    }
}

/// The live broker that archives `tp`: the highest of a hash of the
/// partition and each node id (rendezvous hashing).
pub fn archiver_of(tp: &PartitionKey, nodes: &[i32]) -> Option<i32> {
    nodes.iter().copied().max_by_key(|n| {
        let mut h = 0x9e37_79b9_7f4a_7c15u64;
        for word in [
            tp.topic_id.as_u64_pair().0,
            tp.topic_id.as_u64_pair().1,
            u64::from(tp.partition),
            *n as u64,
        ] {
            h = mix(h ^ word);
        }
        (h, *n)
    })
}

/// splitmix64's finaliser: every input bit moves every output bit.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One batch to copy: its offset and where it sits in its segment.
#[derive(Debug, Clone)]
struct Source {
    base_offset: u64,
    records: u32,
    /// The newest timestamp (a marker's bytes carry it).
    max_ts: i64,
    segment: Arc<str>,
    pos: u64,
    len: u32,
}

/// One archive to write: the first batches of `tp` not yet archived.
#[derive(Debug)]
struct Job {
    tp: PartitionKey,
    batches: Vec<Source>,
}

impl Committer {
    /// One archiving turn: when no round is running, picks the partitions
    /// this broker archives that are due, and writes their archives in the
    /// background, one after another.
    pub(super) fn archive_turn(&mut self) {
        let (Some(l), Some(a)) = (self.lifecycle.clone(), self.archiver.as_mut()) else {
            return;
        };
        if a.settings.target_bytes == 0 || a.busy.load(Ordering::Acquire) {
            return;
        }
        let nodes: Vec<i32> = l.members.live().iter().map(|b| b.node_id).collect();
        let topics: HashSet<uuid::Uuid> = l.topics.snapshot().values().map(|t| t.id).collect();
        let target = a.settings.target_bytes.min(ARCHIVE_BYTES_MAX);
        let now = Instant::now();
        let mut jobs = Vec::new();
        let mut waiting = HashMap::new();
        for tp in self.state.partitions() {
            if !topics.contains(&tp.topic_id) || archiver_of(tp, &nodes) != Some(l.node_id) {
                continue;
            }
            let mut batches = Vec::new();
            let (mut bytes, mut records, mut total) = (0u64, 0u64, 0u64);
            let mut closed = false;
            for (b, segment) in self.state.unarchived(tp) {
                total += u64::from(b.len);
                // The first batch always goes in; after it, batches go in
                // while they fit, and the first that does not closes the
                // archive (its batches stay contiguous).
                closed |= !batches.is_empty()
                    && (bytes + u64::from(b.len) > target
                        || records + u64::from(b.records) > u64::from(u32::MAX));
                if closed {
                    continue;
                }
                bytes += u64::from(b.len);
                records += u64::from(b.records);
                batches.push(Source {
                    base_offset: b.base_offset,
                    records: b.records,
                    max_ts: b.max_ts,
                    segment: segment.clone(),
                    pos: b.pos,
                    len: b.len,
                });
            }
            if batches.is_empty() {
                continue;
            }
            let since = *a.waiting_since.get(tp).unwrap_or(&now);
            waiting.insert(*tp, since);
            if total >= target || now.duration_since(since) >= a.settings.max_age {
                jobs.push(Job { tp: *tp, batches });
            }
        }
        // Partitions archived, gone or handed to another broker stop
        // waiting here.
        a.waiting_since = waiting;
        if jobs.is_empty() {
            return;
        }
        for j in &jobs {
            a.waiting_since.remove(&j.tp);
        }
        let Some(requests) = a.requests.upgrade() else {
            return;
        };
        let (store, node) = (self.store.clone(), l.node_id);
        let metrics = self.metrics.clone();
        spawn_round(&a.busy, async move {
            for job in jobs {
                let (tp, n) = (job.tp, job.batches.len());
                match archive(&*store, &requests, node, job).await {
                    Ok(Some(a)) => {
                        if let Some(m) = &metrics {
                            crate::metrics::Metrics::add(&m.archives_written, 1);
                            crate::metrics::Metrics::add(&m.archive_bytes, a.size);
                        }
                        tracing::debug!(?tp, batches = n, key = %a.key, size = a.size, "archived");
                    }
                    Ok(None) => {
                        tracing::debug!(?tp, "an archive was not taken: the partition moved on")
                    }
                    Err(e) => {
                        tracing::warn!(?tp, error = %e, "archiving failed; a later turn retries")
                    }
                }
            }
        });
    }
}

/// Runs `round` in the background, with `busy` set until it ends however
/// it ends (a job that panicked must not stop this broker's archiving or
/// compaction for good). Its object-store calls count as cleanup.
pub(super) fn spawn_round(
    busy: &Arc<AtomicBool>,
    round: impl std::future::Future<Output = ()> + Send + 'static,
) {
    struct Idle(Arc<AtomicBool>);
    impl Drop for Idle {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    busy.store(true, Ordering::Release);
    let idle = Idle(busy.clone());
    tokio::spawn(floe_objstore::with_purpose(
        floe_objstore::Purpose::Cleanup,
        async move {
            let _idle = idle;
            round.await;
        },
    ));
}

/// Reads `job`'s batches, writes them as one archive object and commits
/// it. `Some` when the log took it; `None` when it ignored it (the object
/// is then deleted).
async fn archive(
    store: &dyn ObjectStore,
    requests: &flume::Sender<CommitRequest>,
    node: i32,
    job: Job,
) -> Result<Option<ArchiveRecord>> {
    let Some(first) = job.batches.first() else {
        return Ok(None);
    };
    let base_offset = first.base_offset;
    // Runs of adjacent batches in one segment: one ranged GET each.
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, b) in job.batches.iter().enumerate() {
        match runs.last_mut() {
            Some(r)
                if job.batches[r.end - 1].segment == b.segment
                    && job.batches[r.end - 1].pos + u64::from(job.batches[r.end - 1].len)
                        == b.pos =>
            {
                r.end = i + 1
            }
            _ => runs.push(i..i + 1),
        }
    }
    let batches = &job.batches;
    let mut reads = futures::stream::iter(runs)
        .map(|run| async move {
            let (s, e) = (&batches[run.start], &batches[run.end - 1]);
            let range = s.pos..e.pos + u64::from(e.len);
            // A transaction marker has no object (a run of one batch: its
            // position never follows another's).
            if let Some(marker) = crate::batch::marker_bytes(&s.segment, s.max_ts) {
                return (run, Ok(marker));
            }
            let data = retried(|| store.get_range(&s.segment, range.clone())).await;
            (run, data)
        })
        .buffered(READS_IN_FLIGHT);
    let mut builder = ArchiveBuilder::new(job.tp, base_offset);
    while let Some((run, data)) = reads.next().await {
        let data: Bytes = data?;
        let start = batches[run.start].pos;
        for b in &batches[run] {
            let at = (b.pos - start) as usize;
            let Some(stored) = data.get(at..at + b.len as usize).map(|s| data.slice_ref(s)) else {
                return Err(Error::Corrupt {
                    what: format!("segment {}", b.segment),
                    reason: format!(
                        "a read of the batch at offset {} came back short ({} bytes)",
                        b.base_offset,
                        data.len()
                    ),
                });
            };
            builder
                .push(b.base_offset, stored)
                .map_err(|e| Error::Corrupt {
                    what: format!("batch at offset {} in segment {}", b.base_offset, b.segment),
                    reason: e.to_string(),
                })?;
        }
    }
    drop(reads);
    crate::crash::point("archive-read");
    let end_offset = builder.next_offset();
    debug_assert_eq!(
        end_offset,
        batches
            .last()
            .map_or(base_offset, |b| b.base_offset + u64::from(b.records))
    );
    let sealed = builder.seal();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let key = format!(
        "{ARCHIVES_PREFIX}{}/{}/{base_offset:020}-n{node}-{ms}",
        job.tp.topic_id, job.tp.partition
    );
    let record = ArchiveRecord {
        topic_id: job.tp.topic_id,
        partition: job.tp.partition,
        key: key.clone(),
        size: sealed.size,
        base_offset,
        end_offset,
        replaces: Vec::new(),
    };
    let taken = upload_and_commit(store, requests, sealed.parts, record.clone(), "archive").await?;
    Ok(taken.then_some(record))
}

/// Uploads an archive object (`parts`) and sends its entry `record`;
/// whether the log took it. The crash points `<step>-uploaded` and
/// `<step>-committed` mark the two steps. An object the log is known not
/// to reference is deleted; one whose entry may have landed is left to
/// the orphan sweep.
pub(super) async fn upload_and_commit(
    store: &dyn ObjectStore,
    requests: &flume::Sender<CommitRequest>,
    parts: Vec<Bytes>,
    record: ArchiveRecord,
    step: &str,
) -> Result<bool> {
    let key = record.key.clone();
    let started = RetryClock::now();
    // The same key and bytes each time: a retry after a lost reply is
    // harmless.
    retried(|| store.put(&key, parts.clone())).await?;
    crate::crash::point(&format!("{step}-uploaded"));
    let (reply, answer) = oneshot::channel();
    let sent = requests
        .send_async(CommitRequest::Archive {
            archive: record,
            uploaded_at: started,
            reply,
        })
        .await;
    let outcome = match sent {
        Ok(()) => answer.await.unwrap_or(Err(Error::ShuttingDown)),
        Err(_) => Err(Error::ShuttingDown),
    };
    match outcome {
        Ok(true) => {
            crate::crash::point(&format!("{step}-committed"));
            Ok(true)
        }
        // Known not to be in the log: nothing will ever read the object.
        Ok(false) => {
            let _ = store.delete(&key).await;
            Ok(false)
        }
        Err(e @ Error::CommitAbandoned { .. }) => {
            let _ = store.delete(&key).await;
            Err(e)
        }
        // Perhaps in the log: the sweep decides once the log is known.
        Err(e) => Err(e),
    }
}

/// Attempts per object-store call of the job: an archive reads many
/// intake ranges, and one failure would otherwise waste all the others.
const ATTEMPTS: u32 = 4;

/// `call` until it succeeds, up to [`ATTEMPTS`] times, 100 ms apart and
/// doubling.
pub(super) async fn retried<T, F, Fut>(mut call: F) -> floe_objstore::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = floe_objstore::Result<T>>,
{
    let mut pause = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if attempt < ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "archiving: an object-store call failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_over_brokers_and_move_only_from_the_one_gone() {
        let tps: Vec<PartitionKey> = (0..3000)
            .map(|p| PartitionKey {
                topic_id: uuid::Uuid::from_u128(u128::from(p / 100) + 1),
                partition: p % 100,
            })
            .collect();
        let three = [1, 2, 3];
        let mut counts = HashMap::new();
        for tp in &tps {
            *counts.entry(archiver_of(tp, &three)).or_insert(0) += 1;
        }
        for n in three {
            let c = counts[&Some(n)];
            assert!((800..1200).contains(&c), "node {n} archives {c} of 3000");
        }
        for tp in &tps {
            let before = archiver_of(tp, &three);
            let after = archiver_of(tp, &[1, 3]);
            if before != Some(2) {
                assert_eq!(after, before, "{tp:?} moved though its broker stayed");
            }
        }
        assert_eq!(archiver_of(&tps[0], &[]), None);
    }
}

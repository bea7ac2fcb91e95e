//! One shard: a glommio executor pinned to one core, owning its partitions'
//! open segment, indexes and read cache. Work for a partition owned by
//! another shard crosses a bounded channel as `Bytes` handles (no copy).
//!
//! Everything in [`Shard`] is owned by its shard's thread (`Rc`, `RefCell`);
//! only [`ShardLink`] is shared.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use floe_meta::schema::SegmentRecord;
use futures::channel::{mpsc, oneshot};
use futures::{Future, FutureExt as _, StreamExt};

use crate::archive::{decode_footer, read_trailer, ArchiveFooter};
use crate::batch::{marker_bytes, patched_prefix, Batch};
use crate::cache::{FooterCache, ReadCache};
use crate::committer::{CommitRequest, IndexUpdate, SegmentCommitted};
use crate::gaps::{FailedBatches, IdempotentBatches};
use crate::index::{IndexEntry, PartitionIndex};
use crate::metrics::{Metrics, ShardCounters};
use crate::pool::{FramePool, Recycler};
use crate::retention::is_archive_key;
use crate::segment::{SealedSegment, SegmentBuilder};
use crate::sequencer::BatchOutcome;
use crate::{Engine, Error, PartitionKey, Result};

/// Bytes of decoded archive footers a shard keeps (about 48 bytes per
/// batch: a 64 MiB archive of 16 KiB batches has a 200 KB footer).
pub const FOOTER_CACHE_BYTES: usize = 16 << 20;
/// A read that misses the cache inside an archive object reads this far
/// ahead in the same GET (see `read_indexed`), but never more than a
/// sixteenth of the shard's read cache.
pub const ARCHIVE_READ_AHEAD_BYTES: usize = 16 << 20;
/// The tail of an archive read first for its footer: the trailer and, for
/// most objects, the whole footer in one GET.
const FOOTER_PROBE_BYTES: u64 = 64 << 10;

/// A ranged GET in flight, shared by every read that wants a prefix of it.
type SharedGet = futures::future::Shared<futures::future::LocalBoxFuture<'static, Result<Bytes>>>;

/// Ranged GETs in flight by (object, start).
type InflightGets = HashMap<(Arc<str>, u64), InflightGet>;

/// Weak: a GET every reader gave up on (a closed connection) is not kept
/// here waiting for a poll that never comes.
struct InflightGet {
    id: u64,
    end: u64,
    get: futures::future::WeakShared<futures::future::LocalBoxFuture<'static, Result<Bytes>>>,
}

/// Messages queued per shard mailbox before senders wait.
pub const MAILBOX_MESSAGES_MAX: usize = 1024;
/// Most bytes of frame slabs a shard keeps for reuse (bounded also by
/// its in-flight budget): see [`crate::pool`].
const FRAMES_KEPT_MAX: usize = 32 << 20;
/// Most bytes of packed-segment buffers a shard keeps for reuse (those
/// the read cache holds, and a couple free).
const PACKS_KEPT_MAX: usize = 256 << 20;

/// How often, at most, a seal or an index update also drops the read
/// caches' entries of objects no index holds any more, unless a partition
/// was forgotten (`Shard::drop_dead_cached`).
const CACHE_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The shared, `Send` side of a shard: how other shards and the committer
/// reach it.
pub struct ShardLink {
    pub mailbox: flume::Sender<ShardMsg>,
    pub index: flume::Sender<IndexMsg>,
    /// Notified whenever this shard's partitions gain committed data.
    pub data: event_listener::Event,
}

/// Receivers of a shard's channels, handed to the shard at start.
pub struct ShardInbox {
    pub mailbox: flume::Receiver<ShardMsg>,
    pub index: flume::Receiver<IndexMsg>,
}

pub fn link() -> (ShardLink, ShardInbox) {
    let (mtx, mrx) = flume::bounded(MAILBOX_MESSAGES_MAX);
    // Index updates arrive at the commit rate, one per partition per
    // commit; the committer must never block on a shard.
    let (itx, irx) = flume::unbounded();
    (
        ShardLink {
            mailbox: mtx,
            index: itx,
            data: event_listener::Event::new(),
        },
        ShardInbox {
            mailbox: mrx,
            index: irx,
        },
    )
}

/// How long a read above this broker's high watermark waits for the log
/// to be read to its head before answering "not available".
const SYNC_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// Ranged GETs one partition read keeps in flight. A consumer catching up
/// reads batches spread over many intake segments, one GET each; one after
/// another they cost a fetch the sum of the store's latencies.
const RUNS_IN_FLIGHT: usize = 16;

pub enum ShardMsg {
    Append {
        tp: PartitionKey,
        batches: Vec<Batch>,
        reply: oneshot::Sender<Result<Vec<BatchOutcome>>>,
    },
    Read {
        req: ReadRequest,
        reply: oneshot::Sender<Result<ReadResult>>,
    },
    Offsets {
        tp: PartitionKey,
        query: OffsetQuery,
        reply: oneshot::Sender<Result<OffsetAnswer>>,
    },
}

pub enum IndexMsg {
    Update(IndexUpdate),
    Applied(u64),
    /// Replaces the whole index (a snapshot loaded in place).
    Reload(Vec<IndexUpdate>),
}

/// One batch of an archive object as an index entry of its own.
fn archived_entry(b: &crate::archive::ArchiveBatch, key: &Arc<str>) -> IndexEntry {
    IndexEntry {
        base_offset: b.base_offset,
        records: b.at.records,
        max_ts: b.at.max_ts,
        segment: key.clone(),
        pos: b.at.pos,
        len: b.at.len,
    }
}

/// The batches of an archive to read from `offset` on, whole batches,
/// after `spent` bytes of the answer: while they fit `max_bytes`, and at
/// least one when the answer is still `empty` (KIP-74).
fn archived_batches(
    footer: &ArchiveFooter,
    key: &Arc<str>,
    offset: u64,
    spent: usize,
    max_bytes: usize,
    empty: bool,
) -> Vec<IndexEntry> {
    let first = footer.batches.partition_point(|b| b.end_offset() <= offset);
    let mut out = Vec::new();
    let mut bytes = spent;
    for b in &footer.batches[first..] {
        if !(empty && out.is_empty()) && bytes + b.at.len as usize > max_bytes {
            break;
        }
        bytes += b.at.len as usize;
        out.push(archived_entry(b, key));
    }
    out
}

/// Applies one committed update to a shard's indexes.
pub(crate) fn apply_update(indexes: &mut HashMap<PartitionKey, PartitionIndex>, u: IndexUpdate) {
    if u.forget {
        indexes.remove(&u.tp);
        return;
    }
    let index = indexes.entry(u.tp).or_default();
    for b in u.batches {
        if let BatchOutcome::Appended { base_offset } = b.outcome {
            let e = IndexEntry {
                base_offset,
                records: b.records,
                max_ts: b.max_ts,
                segment: u.segment.clone(),
                pos: b.pos,
                len: b.len,
            };
            if !u.archived {
                index.push(e);
            } else if !index.replace(e) {
                // The committer checked this against the same log: a
                // mismatch is a bug. The batches stay readable until
                // their segments' delete grace.
                tracing::error!(tp = ?u.tp, archive = %u.segment, base_offset, "an archive does not match this shard's index");
            }
        }
    }
    index.advance_log_start(u.log_start);
    index.set_open_from(u.open_from);
    index.add_aborted(u.aborted);
}

#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    pub tp: PartitionKey,
    pub offset: u64,
    pub max_bytes: usize,
    /// `read_committed`: only below the last stable offset, with the
    /// aborted transactions among what is returned.
    pub committed: bool,
}

/// Batches read from one partition, ready to write out: for each batch a
/// 12-byte patched prefix followed by the untouched rest of the stored batch.
#[derive(Debug, Clone, Default)]
pub struct ReadResult {
    pub high_watermark: u64,
    pub log_start: u64,
    /// The last stable offset (whatever the isolation level read).
    pub last_stable: u64,
    /// For `read_committed` reads: the aborted transactions that overlap
    /// the batches returned.
    pub aborted: Vec<crate::sequencer::AbortedTxn>,
    pub parts: Vec<Bytes>,
    pub bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetQuery {
    Earliest,
    Latest,
    /// The high watermark once this broker has applied the commit log up
    /// to this entry (a sequence from [`Shard::sync_log`]): it is then at
    /// least every offset acknowledged before the sync began.
    LatestAfter(u64),
    MaxTimestamp,
    /// The first batch with a record at or after this timestamp.
    Timestamp(i64),
}

#[derive(Debug, Clone, Default)]
pub struct OffsetAnswer {
    pub high_watermark: u64,
    pub log_start: u64,
    pub last_stable: u64,
    /// Bytes the partition keeps stored (DescribeLogDirs).
    pub stored_bytes: u64,
    /// For timestamp queries: the base offset and whole (patched) batch in
    /// which the answer lies; `None` when no record qualifies.
    pub batch: Option<(u64, Bytes)>,
}

#[derive(Default)]
struct ShardState {
    builder: SegmentBuilder,
    waiters: Vec<oneshot::Sender<Result<Vec<BatchOutcome>>>>,
    indexes: HashMap<PartitionKey, PartitionIndex>,
    segments_sealed: u64,
    /// This shard's segments sealed and not yet through the commit loop:
    /// their cached batches are live though no index shows them yet.
    sealing: HashSet<Arc<str>>,
    /// When the read cache last dropped dead segments' batches.
    swept_at: Option<Instant>,
}

struct Pending {
    record: SegmentRecord,
    appends: Vec<Vec<(usize, usize)>>,
    waiters: Vec<oneshot::Sender<Result<Vec<BatchOutcome>>>>,
    upload: std::pin::Pin<Box<dyn Future<Output = Result<()>>>>,
    /// Sealed, before the upload began.
    sealed_at: tokio::time::Instant,
}

/// One shard's state and runtime. Owned by its executor thread.
pub struct Shard {
    pub id: usize,
    pub(crate) engine: Arc<Engine>,
    pub frames: FramePool,
    /// Buffers of sealed segments' packed copies (held by the read cache).
    packs: RefCell<Recycler>,
    /// Request bytes admitted and not yet answered (TCP back-pressure).
    pub budget: Rc<glommio::sync::Semaphore>,
    /// Upload requests in flight for this shard's segments (the
    /// object-store calls run on the sidecar, hence a tokio semaphore).
    uploads: Arc<tokio::sync::Semaphore>,
    state: RefCell<ShardState>,
    cache: RefCell<ReadCache>,
    footers: RefCell<FooterCache>,
    /// Ranged GETs in flight by (object, start), for `shared_get`.
    inflight: Rc<RefCell<InflightGets>>,
    inflight_ids: Cell<u64>,
    applied_seq: Cell<u64>,
    applied: event_listener::Event,
    opened: event_listener::Event,
    commit_queue: RefCell<Option<mpsc::UnboundedSender<Pending>>>,
    /// Idempotent batches that failed here lately (see `gaps`).
    failed: RefCell<FailedBatches>,
    started_ms: u128,
}

impl Shard {
    /// Creates the shard and spawns its background tasks on the current
    /// glommio executor. Returns the shard and a future that completes when
    /// its commit queue has drained after [`Shard::close`].
    pub fn start(
        id: usize,
        engine: Arc<Engine>,
        inbox: ShardInbox,
    ) -> (Rc<Self>, impl Future<Output = ()>) {
        let (ctx, crx) = mpsc::unbounded();
        let cfg = &engine.config;
        let frames_kept = cfg.inflight_bytes_max.min(FRAMES_KEPT_MAX);
        let packs_kept = cfg
            .read_cache_bytes_max
            .saturating_add(2 * cfg.flush_bytes)
            .min(PACKS_KEPT_MAX);
        let packs_free = cfg.flush_bytes;
        let shard = Rc::new(Self {
            id,
            budget: Rc::new(glommio::sync::Semaphore::new(cfg.inflight_bytes_max as u64)),
            uploads: Arc::new(tokio::sync::Semaphore::new(cfg.upload_concurrency.max(1))),
            cache: RefCell::new(ReadCache::new(cfg.read_cache_bytes_max)),
            footers: RefCell::new(FooterCache::new(FOOTER_CACHE_BYTES)),
            inflight: Rc::default(),
            inflight_ids: Cell::new(0),
            engine,
            frames: FramePool::new(frames_kept),
            packs: RefCell::new(Recycler::new(packs_kept, packs_free)),
            state: RefCell::new(ShardState::default()),
            applied_seq: Cell::new(0),
            applied: event_listener::Event::new(),
            opened: event_listener::Event::new(),
            commit_queue: RefCell::new(Some(ctx)),
            failed: RefCell::default(),
            started_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        });
        glommio::spawn_local(Self::index_loop(shard.clone(), inbox.index)).detach();
        glommio::spawn_local(Self::mailbox_loop(shard.clone(), inbox.mailbox)).detach();
        glommio::spawn_local(Self::flush_loop(shard.clone())).detach();
        let done = glommio::spawn_local(Self::commit_loop(shard.clone(), crx));
        (shard, async move {
            done.await;
        })
    }

    fn link(&self) -> &ShardLink {
        &self.engine.shards[self.id]
    }

    /// This shard's counters, written only on this shard's thread (a
    /// `Shard` is not `Sync`, so only its thread holds one).
    pub fn counters(&self) -> &ShardCounters {
        self.engine.metrics.shard(self.id)
    }

    /// Hands validated batches to their partition's owning shard, in the
    /// order calls are made (a connection calls this in request order), and
    /// returns a future of their outcome once durable and committed (or
    /// refused). Awaiting this call only waits for a full cross-shard
    /// mailbox; the returned future waits for the commit.
    pub async fn append(
        self: &Rc<Self>,
        tp: PartitionKey,
        batches: Vec<Batch>,
    ) -> impl Future<Output = Result<Vec<BatchOutcome>>> + 'static {
        let owner = self.engine.owner(&tp);
        let rx = if owner == self.id {
            Ok(self.append_local(tp, batches))
        } else {
            let (tx, rx) = oneshot::channel();
            let msg = ShardMsg::Append {
                tp,
                batches,
                reply: tx,
            };
            self.engine.shards[owner]
                .mailbox
                .send_async(msg)
                .await
                .map(|()| rx)
                .map_err(|_| Error::ShuttingDown)
        };
        async move {
            match rx {
                Ok(rx) => rx.await.unwrap_or(Err(Error::ShuttingDown)),
                Err(e) => Err(e),
            }
        }
    }

    fn append_local(
        self: &Rc<Self>,
        tp: PartitionKey,
        batches: Vec<Batch>,
    ) -> oneshot::Receiver<Result<Vec<BatchOutcome>>> {
        let (tx, rx) = oneshot::channel();
        let bytes: usize = batches.iter().map(|b| b.bytes.len()).sum();
        let counters = self.counters();
        counters.produce_payload_bytes.add(bytes as u64);
        counters.produce_batches.add(batches.len() as u64);
        let full = {
            let mut st = self.state.borrow_mut();
            let first = st.builder.is_empty();
            let id = st.builder.append(tp, batches, Instant::now());
            debug_assert_eq!(id, st.waiters.len());
            st.waiters.push(tx);
            if first {
                self.opened.notify(usize::MAX);
            }
            st.builder.bytes() >= self.engine.config.flush_bytes
                || st.builder.batches() >= crate::segment::SEGMENT_BATCHES_MAX
        };
        if full {
            self.seal();
        }
        rx
    }

    /// Seals the open segment (if any), starts its upload and queues its
    /// commit behind the shard's earlier segments.
    fn seal(&self) {
        let (sealed, waiters, n) = {
            let mut st = self.state.borrow_mut();
            if st.builder.is_empty() {
                return;
            }
            st.segments_sealed += 1;
            (
                st.builder.seal(),
                std::mem::take(&mut st.waiters),
                st.segments_sealed,
            )
        };
        let SealedSegment {
            parts,
            size,
            chunks,
            appends,
            batch_bytes,
            ..
        } = sealed;
        let key = format!(
            "segments/{:013}-n{}-s{}-{:08}",
            self.started_ms, self.engine.config.node_id, self.id, n
        );
        let seg: Arc<str> = Arc::from(key.as_str());
        let sealed_at = tokio::time::Instant::now();
        self.state.borrow_mut().sealing.insert(seg.clone());
        self.drop_dead_cached(false);
        {
            // The batches are slices of request frames, themselves carved
            // from 4 MiB slabs: cached as they are, a 100-byte batch would
            // keep a whole slab alive, uncounted. The cache gets one packed
            // copy per segment instead, so it pins exactly what it counts
            // (and the frames go once the upload is done).
            let total: usize = batch_bytes.iter().flatten().map(Bytes::len).sum();
            let mut packs = self.packs.borrow_mut();
            let mut packed = packs.take(total);
            for data in batch_bytes.iter().flatten() {
                packed.extend_from_slice(data);
            }
            packs.keep_rest(&mut packed);
            drop(packs);
            let packed = packed.freeze();
            self.counters().cache_copied_bytes.add(total as u64);
            let mut cache = self.cache.borrow_mut();
            let mut at = 0;
            for (chunk, bytes) in chunks.iter().zip(&batch_bytes) {
                for (b, data) in chunk.batches.iter().zip(bytes) {
                    cache.insert(seg.clone(), b.pos, packed.slice(at..at + data.len()));
                    at += data.len();
                }
            }
            let counters = self.counters();
            counters.read_cache_bytes.set(cache.bytes() as u64);
            counters
                .pack_pool_bytes
                .set(self.packs.borrow().kept_bytes() as u64);
            counters
                .frame_pool_bytes
                .set(self.frames.kept_bytes() as u64);
        }
        let store = self.engine.store.clone();
        let metrics = self.engine.metrics.clone();
        let put_key = key.clone();
        let uploads = self.uploads.clone();
        let cfg = &self.engine.config;
        // A segment takes one permit per part it will send at once (one for
        // a single PUT), so the shard's uploads together stay within
        // `upload_concurrency` requests.
        let permits = size
            .div_ceil(cfg.upload_part_bytes.max(1) as u64)
            .clamp(1, cfg.upload_concurrency.max(1) as u64) as u32;
        let upload = self.engine.sidecar.run(async move {
            let _permits = uploads
                .acquire_many_owned(permits)
                .await
                .map_err(|_| Error::ShuttingDown)?;
            let started = Instant::now();
            let r = store.put(&put_key, parts).await;
            match &r {
                Ok(()) => metrics.objstore_intake.put(size),
                Err(_) => metrics.objstore_intake.error(),
            }
            if started.elapsed() > crate::metrics::UPLOAD_SLOW {
                Metrics::add(&metrics.upload_slow_in_a_row, 1);
            } else {
                Metrics::set(&metrics.upload_slow_in_a_row, 0);
            }
            r.map_err(Error::from)
        });
        let pending = Pending {
            record: SegmentRecord { key, size, chunks },
            appends,
            waiters,
            upload: Box::pin(upload),
            sealed_at,
        };
        let queue = self.commit_queue.borrow();
        match queue.as_ref() {
            Some(q) if q.unbounded_send(pending).is_ok() => {}
            _ => tracing::error!(
                shard = self.id,
                "segment sealed after the commit queue closed"
            ),
        }
    }

    async fn flush_loop(self: Rc<Self>) {
        let interval = self.engine.config.flush_interval;
        loop {
            let opened = self.opened.listen();
            let deadline = self.state.borrow().builder.deadline(interval);
            match deadline {
                None => {
                    if self.commit_queue.borrow().is_none() {
                        return;
                    }
                    opened.await;
                }
                Some(d) => {
                    let now = Instant::now();
                    if d > now {
                        glommio::timer::sleep(d - now).await;
                    }
                    if self.state.borrow().builder.deadline(interval) == Some(d) {
                        self.seal();
                    }
                }
            }
        }
    }

    async fn commit_loop(self: Rc<Self>, mut queue: mpsc::UnboundedReceiver<Pending>) {
        while let Some(p) = queue.next().await {
            let Pending {
                record,
                appends,
                waiters,
                upload,
                sealed_at,
            } = p;
            // What `gaps` needs of the record, which the commit takes.
            let idempotent = IdempotentBatches::of(&record);
            let key = record.key.clone();
            let result = match upload.await {
                Err(e) => {
                    self.counters().upload_failures.add(1);
                    Metrics::add(&self.engine.metrics.upload_failures_in_a_row, 1);
                    tracing::warn!(shard = self.id, segment = %record.key, error = %e, "segment upload failed; producers get a retriable error");
                    Err(e)
                }
                Ok(()) => {
                    Metrics::set(&self.engine.metrics.upload_failures_in_a_row, 0);
                    self.commit(record, sealed_at).await
                }
            };
            match result {
                Ok(mut outcomes) => {
                    self.failed
                        .borrow_mut()
                        .review(&idempotent, &mut outcomes, Instant::now());
                    for (append, tx) in appends.into_iter().zip(waiters) {
                        let o = append.iter().map(|&(c, b)| outcomes[c][b]).collect();
                        let _ = tx.send(Ok(o));
                    }
                }
                Err(e) => {
                    self.failed
                        .borrow_mut()
                        .segment_failed(&idempotent, Instant::now());
                    for tx in waiters {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
            // Committed (and in this shard's index) or failed (and never
            // to be read): the cache sweep judges it by the index now.
            self.state.borrow_mut().sealing.remove(key.as_str());
        }
    }

    /// Drops from the read cache the batches of segments that no
    /// partition index of this shard holds and that are not being
    /// committed — a deleted topic's, those retention trimmed, intake
    /// segments an archive replaced — and the footers of archives gone.
    /// The cache's budget would push them out too, but only as fast as
    /// new batches arrive. A walk over the
    /// shard's index entries, so at most every [`CACHE_SWEEP_EVERY`]
    /// unless `forced` (a partition was forgotten).
    fn drop_dead_cached(&self, forced: bool) {
        let now = Instant::now();
        let mut st = self.state.borrow_mut();
        if !forced
            && st
                .swept_at
                .is_some_and(|t| now.duration_since(t) < CACHE_SWEEP_EVERY)
        {
            return;
        }
        st.swept_at = Some(now);
        let mut live: HashSet<&str> = st.sealing.iter().map(|s| &**s).collect();
        for index in st.indexes.values() {
            live.extend(index.segments().map(|s| &**s));
        }
        let mut cache = self.cache.borrow_mut();
        cache.drop_dead(|segment| live.contains(segment));
        self.counters().read_cache_bytes.set(cache.bytes() as u64);
        self.footers
            .borrow_mut()
            .drop_dead(|archive| live.contains(archive));
    }

    /// Commits log start moves (DeleteRecords) and returns each partition's
    /// log start after them, once this shard's indexes show the entry.
    pub async fn delete_records(
        &self,
        trims: Vec<floe_meta::schema::TrimRecord>,
    ) -> Result<Vec<u64>> {
        let (tx, rx) = oneshot::channel();
        self.engine
            .committer
            .send_async(CommitRequest::Trim { trims, reply: tx })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let done = rx.await.unwrap_or(Err(Error::ShuttingDown))?;
        self.wait_applied(done.seq).await;
        Ok(done.log_starts)
    }

    async fn wait_applied(&self, seq: u64) {
        loop {
            let l = self.applied.listen();
            if self.applied_seq.get() >= seq {
                break;
            }
            l.await;
        }
    }

    async fn commit(
        &self,
        record: SegmentRecord,
        sealed_at: tokio::time::Instant,
    ) -> Result<Vec<Vec<BatchOutcome>>> {
        let size = record.size;
        let (tx, rx) = oneshot::channel();
        self.engine
            .committer
            .send_async(CommitRequest::Segment {
                segment: record,
                sealed_at,
                reply: tx,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let r = rx.await.unwrap_or(Err(Error::ShuttingDown));
        let SegmentCommitted { seq, outcomes } = match r {
            Ok(v) => v,
            Err(e) => {
                self.counters().commit_failures.add(1);
                return Err(e);
            }
        };
        let counters = self.counters();
        counters.segments_committed.add(1);
        counters.segment_bytes.add(size);
        // Answer only once this shard's index shows the commit, so that a
        // producer's acknowledged offsets are immediately readable.
        self.wait_applied(seq).await;
        Ok(outcomes)
    }

    async fn index_loop(self: Rc<Self>, rx: flume::Receiver<IndexMsg>) {
        // A partition forgotten (its topic deleted) or the indexes reloaded
        // since the cache was last swept.
        let mut forgotten = false;
        while let Ok(msg) = rx.recv_async().await {
            match msg {
                IndexMsg::Update(u) => {
                    forgotten |= u.forget;
                    apply_update(&mut self.state.borrow_mut().indexes, u);
                }
                IndexMsg::Reload(updates) => {
                    let mut fresh = HashMap::new();
                    for u in updates {
                        apply_update(&mut fresh, u);
                    }
                    self.state.borrow_mut().indexes = fresh;
                    forgotten = true;
                }
                IndexMsg::Applied(seq) => {
                    self.applied_seq.set(seq);
                    self.applied.notify(usize::MAX);
                    self.link().data.notify(usize::MAX);
                }
            }
            // Once the queue is drained, so that deleting a topic of many
            // partitions walks the indexes once.
            if rx.is_empty() {
                self.drop_dead_cached(std::mem::take(&mut forgotten));
            }
        }
    }

    async fn mailbox_loop(self: Rc<Self>, rx: flume::Receiver<ShardMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            match msg {
                ShardMsg::Append { tp, batches, reply } => {
                    let rx = self.append_local(tp, batches);
                    glommio::spawn_local(async move {
                        let _ = reply.send(rx.await.unwrap_or(Err(Error::ShuttingDown)));
                    })
                    .detach();
                }
                ShardMsg::Read { req, reply } => {
                    let me = self.clone();
                    glommio::spawn_local(async move {
                        let _ = reply.send(me.read_local(req).await);
                    })
                    .detach();
                }
                ShardMsg::Offsets { tp, query, reply } => {
                    let me = self.clone();
                    glommio::spawn_local(async move {
                        let _ = reply.send(me.offsets_local(tp, query).await);
                    })
                    .detach();
                }
            }
        }
    }

    /// Reads from a partition through its owning shard.
    pub fn read(
        self: &Rc<Self>,
        req: ReadRequest,
    ) -> impl Future<Output = Result<ReadResult>> + 'static {
        let owner = self.engine.owner(&req.tp);
        let me = self.clone();
        async move {
            if owner == me.id {
                return me.read_local(req).await;
            }
            let (tx, rx) = oneshot::channel();
            me.engine.shards[owner]
                .mailbox
                .send_async(ShardMsg::Read { req, reply: tx })
                .await
                .map_err(|_| Error::ShuttingDown)?;
            rx.await.unwrap_or(Err(Error::ShuttingDown))
        }
    }

    /// Answers a ListOffsets query through the partition's owning shard.
    pub fn offsets(
        self: &Rc<Self>,
        tp: PartitionKey,
        query: OffsetQuery,
    ) -> impl Future<Output = Result<OffsetAnswer>> + 'static {
        let owner = self.engine.owner(&tp);
        let me = self.clone();
        async move {
            if owner == me.id {
                return me.offsets_local(tp, query).await;
            }
            let (tx, rx) = oneshot::channel();
            me.engine.shards[owner]
                .mailbox
                .send_async(ShardMsg::Offsets {
                    tp,
                    query,
                    reply: tx,
                })
                .await
                .map_err(|_| Error::ShuttingDown)?;
            rx.await.unwrap_or(Err(Error::ShuttingDown))
        }
    }

    /// Reads the commit log to its head, within the time a read waits for
    /// it: the sequence to pass to [`OffsetQuery::LatestAfter`], or
    /// `OffsetNotAvailable` (which clients retry) when the log cannot be
    /// read in time.
    pub async fn sync_log(&self) -> Result<u64> {
        let synced = futures::future::select(
            Box::pin(self.engine.sync_log()),
            Box::pin(glommio::timer::sleep(SYNC_WAIT_MAX)),
        )
        .await;
        match synced {
            futures::future::Either::Left((r, _)) => r,
            futures::future::Either::Right(_) => Err(Error::OffsetNotAvailable {
                offset: 0,
                high_watermark: 0,
            }),
        }
    }

    /// The event notified when partitions owned by `tp`'s shard gain data.
    pub fn data_event(&self, tp: &PartitionKey) -> &event_listener::Event {
        &self.engine.shards[self.engine.owner(tp)].data
    }

    /// The stored bytes of `entries`, from the cache or with one ranged GET
    /// per run of adjacent batches in one segment, up to
    /// [`RUNS_IN_FLIGHT`] GETs at once, as a prefix: when a read fails after
    /// earlier batches were loaded, those are returned (a Kafka fetch may
    /// answer with fewer batches than asked). Only a failure on the first
    /// batch fails the read — so a consumer catching up through a store
    /// that fails now and then still progresses, instead of needing every
    /// one of a fetch's reads (often hundreds of small segments) to succeed
    /// at once.
    async fn load(&self, entries: &[IndexEntry]) -> Result<Vec<Bytes>> {
        let mut out: Vec<Option<Bytes>> = {
            let cache = self.cache.borrow();
            entries
                .iter()
                .map(|e| {
                    // A transaction marker has no object: its bytes are
                    // built from its key.
                    marker_bytes(&e.segment, e.max_ts).or_else(|| cache.get(&e.segment, e.pos))
                })
                .collect()
        };
        let mut runs = Vec::new();
        let mut i = 0;
        while i < entries.len() {
            if out[i].is_some() {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < entries.len()
                && out[j].is_none()
                && entries[j].segment == entries[i].segment
                && entries[j].pos == entries[j - 1].pos + u64::from(entries[j - 1].len)
            {
                j += 1;
            }
            runs.push(i..j);
            i = j;
        }
        let get = |run: std::ops::Range<usize>| {
            let start = entries[run.start].pos;
            let end = entries[run.end - 1].pos + u64::from(entries[run.end - 1].len);
            let object = entries[run.start].segment.clone();
            let data = self.shared_get(object, start, end);
            async move {
                let data = data.await.and_then(|d| {
                    d.get(..(end - start) as usize)
                        .map(|s| d.slice_ref(s))
                        .ok_or_else(|| Error::Corrupt {
                            what: format!("a read of {}", entries[run.start].segment),
                            reason: format!("{} bytes came back for {}", d.len(), end - start),
                        })
                });
                (run, start, data)
            }
        };
        let mut loaded = futures::stream::iter(runs)
            .map(get)
            .buffered(RUNS_IN_FLIGHT);
        while let Some((run, start, data)) = loaded.next().await {
            let data = match data {
                Ok(d) => d,
                Err(e) if run.start == 0 => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, loaded = run.start, "a read failed; answering the batches before it");
                    self.counters().fetch_read_errors.add(1);
                    out.truncate(run.start);
                    break;
                }
            };
            let seg = entries[run.start].segment.clone();
            let mut cache = self.cache.borrow_mut();
            for k in run {
                let off = (entries[k].pos - start) as usize;
                let b = data.slice(off..off + entries[k].len as usize);
                cache.insert(seg.clone(), entries[k].pos, b.clone());
                out[k] = Some(b);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// The bytes `start..end` of `object`, or more from `start` on: a GET
    /// of this shard already in flight from `start` that reaches `end` is
    /// awaited instead of sending another (consumers reading the same
    /// range at once, as after a restart, share one GET).
    fn shared_get(&self, object: Arc<str>, start: u64, end: u64) -> SharedGet {
        if let Some(g) = self
            .inflight
            .borrow()
            .get(&(object.clone(), start))
            .filter(|g| g.end >= end)
            .and_then(|g| g.get.upgrade())
        {
            return g;
        }
        let key = object.to_string();
        let store = self.engine.store.clone();
        let metrics = self.engine.metrics.clone();
        let data = self.engine.sidecar.run(async move {
            let r = store.get_range(&key, start..end).await;
            match &r {
                Ok(b) => metrics.objstore_fetch.get(b.len() as u64),
                Err(_) => metrics.objstore_fetch.error(),
            }
            r.map_err(Error::from)
        });
        let id = self.inflight_ids.get() + 1;
        self.inflight_ids.set(id);
        let inflight = self.inflight.clone();
        let slot = (object, start);
        let done = slot.clone();
        let get = async move {
            let r = data.await;
            let mut map = inflight.borrow_mut();
            if map.get(&done).is_some_and(|g| g.id == id) {
                map.remove(&done);
            }
            r
        }
        .boxed_local()
        .shared();
        if let Some(weak) = get.downgrade() {
            let mut map = self.inflight.borrow_mut();
            map.retain(|_, g| g.get.upgrade().is_some());
            map.insert(slot, InflightGet { id, end, get: weak });
        }
        get
    }

    /// The footer of the archive object `e` names, from the cache or the
    /// object's tail (one GET, two for a footer larger than the probe).
    async fn footer(&self, e: &IndexEntry) -> Result<Rc<ArchiveFooter>> {
        if let Some(f) = self.footers.borrow().get(&e.segment) {
            return Ok(f);
        }
        let size = u64::from(e.len);
        let corrupt = |err: crate::archive::ArchiveError| Error::Corrupt {
            what: format!("archive object {}", e.segment),
            reason: err.to_string(),
        };
        let tail = self
            .shared_get(
                e.segment.clone(),
                size.saturating_sub(FOOTER_PROBE_BYTES),
                size,
            )
            .await?;
        let t = tail.len().saturating_sub(crate::segment::TRAILER_BYTES);
        let (len, crc) = read_trailer(&tail[t..], size).map_err(corrupt)?;
        let raw = if len <= t {
            tail.slice(t - len..t)
        } else {
            let end = size - crate::segment::TRAILER_BYTES as u64;
            self.shared_get(e.segment.clone(), end - len as u64, end)
                .await?
        };
        let footer = decode_footer(&raw, crc).map_err(corrupt)?;
        if footer.base_offset != e.base_offset || footer.end_offset != e.next_offset() {
            return Err(Error::Corrupt {
                what: format!("archive object {}", e.segment),
                reason: format!(
                    "its footer holds offsets {}..{}, the log says {}..{}",
                    footer.base_offset,
                    footer.end_offset,
                    e.base_offset,
                    e.next_offset()
                ),
            });
        }
        let footer = Rc::new(footer);
        self.footers
            .borrow_mut()
            .insert(e.segment.clone(), footer.clone());
        Ok(footer)
    }

    /// Reads through this shard's index. An offset above what this broker
    /// has learnt may exist already (another broker committed it and this
    /// one lags): the log is read to its head first, and only an offset
    /// still above it then is out of range. When the log cannot be read in
    /// time the answer is "not available", which clients retry, never
    /// "out of range", which makes them reset their position.
    async fn read_local(self: &Rc<Self>, req: ReadRequest) -> Result<ReadResult> {
        match self.read_indexed(req).await {
            Err(Error::OffsetOutOfRange {
                offset,
                high_watermark,
                ..
            }) if offset > high_watermark => {
                let synced = futures::future::select(
                    Box::pin(self.engine.sync_log()),
                    Box::pin(glommio::timer::sleep(SYNC_WAIT_MAX)),
                )
                .await;
                match synced {
                    futures::future::Either::Left((Ok(seq), _)) => {
                        self.wait_applied(seq).await;
                        self.read_indexed(req).await
                    }
                    _ => Err(Error::OffsetNotAvailable {
                        offset,
                        high_watermark,
                    }),
                }
            }
            r => r,
        }
    }

    async fn read_indexed(self: &Rc<Self>, mut req: ReadRequest) -> Result<ReadResult> {
        // A compacted archive may hold no batch at or after the offset
        // (its last records are gone): the read goes on at the next entry,
        // as Kafka's does across a gap.
        loop {
            match self.read_indexed_once(req).await? {
                Ok(r) => return Ok(r),
                Err(next) => req.offset = next,
            }
        }
    }

    /// One read, or (`Err`) the offset to read from instead when the
    /// archive holding `req.offset` has no batch from there on.
    async fn read_indexed_once(
        self: &Rc<Self>,
        req: ReadRequest,
    ) -> Result<std::result::Result<ReadResult, u64>> {
        let (entries, hwm, log_start, stable, lso) = {
            let st = self.state.borrow();
            let Some(index) = st.indexes.get(&req.tp) else {
                if req.offset == 0 {
                    return Ok(Ok(ReadResult::default()));
                }
                return Err(Error::OffsetOutOfRange {
                    offset: req.offset,
                    log_start: 0,
                    high_watermark: 0,
                });
            };
            let (hwm, log_start) = (index.high_watermark(), index.log_start());
            // What this isolation level may read up to.
            let stable = if req.committed {
                index.last_stable()
            } else {
                hwm
            };
            if req.offset > hwm || req.offset < log_start {
                return Err(Error::OffsetOutOfRange {
                    offset: req.offset,
                    log_start,
                    high_watermark: hwm,
                });
            }
            let mut entries = Vec::new();
            if let Some(mut i) = index.position(req.offset).filter(|_| req.max_bytes > 0) {
                let mut bytes = 0usize;
                while let Some(e) = index.entry(i).filter(|e| e.base_offset < stable) {
                    // An archive object is opened into its batches below,
                    // with what is left of the budget.
                    if is_archive_key(&e.segment) {
                        entries.push(e.clone());
                        break;
                    }
                    // The first batch is returned even when larger than
                    // max_bytes, so a consumer always makes progress (KIP-74).
                    if !entries.is_empty() && bytes + e.len as usize > req.max_bytes {
                        break;
                    }
                    bytes += e.len as usize;
                    entries.push(e.clone());
                    i += 1;
                }
            }
            (entries, hwm, log_start, stable, index.last_stable())
        };
        let mut entries = entries;
        let mut wanted = entries.len();
        if let Some(archive) = entries.pop_if(|e| is_archive_key(&e.segment)) {
            wanted -= 1;
            let spent = entries.iter().map(|e| e.len as usize).sum();
            match self.footer(&archive).await {
                Ok(footer) => {
                    let from = req.offset.max(archive.base_offset);
                    let mut answer = archived_batches(
                        &footer,
                        &archive.segment,
                        from,
                        spent,
                        req.max_bytes,
                        entries.is_empty(),
                    );
                    answer.retain(|e| e.base_offset < stable);
                    if answer.is_empty() && entries.is_empty() {
                        let next = archive.next_offset();
                        if next < stable {
                            return Ok(Err(next));
                        }
                    }
                    wanted += answer.len();
                    // Read-ahead: when any batch of the answer is not
                    // cached (the last read-ahead may have ended inside
                    // it), its GET also fetches the batches after the
                    // answer into the cache; a consumer catching up then
                    // costs a GET per ARCHIVE_READ_AHEAD_BYTES, not one
                    // per fetch.
                    let uncached: usize = {
                        let cache = self.cache.borrow();
                        answer
                            .iter()
                            .filter(|e| cache.get(&e.segment, e.pos).is_none())
                            .map(|e| e.len as usize)
                            .sum()
                    };
                    let next = answer.last().map_or(from, IndexEntry::next_offset);
                    let ahead = if uncached > 0 {
                        archived_batches(
                            &footer,
                            &archive.segment,
                            next,
                            uncached,
                            self.read_ahead_bytes(),
                            false,
                        )
                        .into_iter()
                        .filter(|e| e.base_offset >= next)
                        .collect()
                    } else {
                        // Answered from the cache: the next window is
                        // loaded while the consumer works on this one.
                        self.read_ahead(&footer, &archive.segment, next);
                        Vec::new()
                    };
                    entries.extend(answer);
                    entries.extend(ahead);
                }
                Err(e) if entries.is_empty() => return Err(self.read_failed(req, e)),
                // The batches before it are an answer (a prefix).
                Err(e) => tracing::debug!(error = %e, "reading an archive's footer failed"),
            }
        }
        let data = match self.load(&entries).await {
            Ok(mut data) => {
                data.truncate(wanted);
                data
            }
            Err(e) => return Err(self.read_failed(req, e)),
        };
        let mut parts = Vec::with_capacity(2 * data.len());
        let mut bytes = 0;
        for (e, stored) in entries.iter().zip(data) {
            let prefix = patched_prefix(&stored, e.base_offset as i64);
            parts.push(Bytes::copy_from_slice(&prefix));
            parts.push(stored.slice(prefix.len()..));
            bytes += stored.len();
        }
        self.counters().fetch_bytes.add(bytes as u64);
        // One prefix and one rest per batch returned.
        let returned = parts.len() / 2;
        let last = returned.checked_sub(1).and_then(|i| entries.get(i));
        let aborted = match (req.committed, last) {
            (true, Some(last)) => self
                .state
                .borrow()
                .indexes
                .get(&req.tp)
                .map_or_else(Vec::new, |index| {
                    index.aborted_between(req.offset, last.next_offset())
                }),
            _ => Vec::new(),
        };
        Ok(Ok(ReadResult {
            high_watermark: hwm,
            log_start,
            last_stable: lso,
            aborted,
            parts,
            bytes,
        }))
    }

    /// How far a read inside an archive object reads ahead.
    fn read_ahead_bytes(&self) -> usize {
        ARCHIVE_READ_AHEAD_BYTES.min(self.engine.config.read_cache_bytes_max / 16)
    }

    /// Starts loading, in the background, the window of `key`'s batches
    /// after a read-ahead window from `next` when that window is not all
    /// cached or being read: a consumer catching up then finds its next
    /// fetches in the cache instead of waiting for a GET every window. The
    /// load is an ordinary [`Shard::load`] (its GET shared with any read
    /// that wants the same range, its batches bounded by the read cache).
    fn read_ahead(self: &Rc<Self>, footer: &ArchiveFooter, key: &Arc<str>, next: u64) {
        // Called for every fetch answered from the cache: it looks at one
        // batch (the window's last, found by position: batches lie in
        // offset order) unless a load is due.
        let window = self.read_ahead_bytes();
        let batches = &footer.batches;
        let first = batches.partition_point(|b| b.end_offset() <= next);
        let Some(start) = batches.get(first) else {
            return;
        };
        let edge = start.at.pos.saturating_add(window as u64);
        let last = batches
            .partition_point(|b| b.at.pos < edge)
            .saturating_sub(1)
            .max(first);
        let uncached = {
            let cache = self.cache.borrow();
            // Windows load in order: when the last batch is cached, so is
            // the rest.
            if cache.get(key, batches[last].at.pos).is_some() {
                return;
            }
            (first..=last).find(|&i| cache.get(key, batches[i].at.pos).is_none())
        };
        let Some(from) = uncached.map(|i| &batches[i]) else {
            return;
        };
        let loading = self.inflight.borrow().iter().any(|((object, start), g)| {
            object == key && (*start..g.end).contains(&from.at.pos) && g.get.upgrade().is_some()
        });
        if loading {
            return;
        }
        let run = archived_batches(footer, key, from.base_offset, 0, window, true);
        let me = self.clone();
        glommio::spawn_local(async move {
            if let Err(e) = me.load(&run).await {
                tracing::debug!(error = %e, "an archive read-ahead failed; the reads that need it will retry");
            }
        })
        .detach();
    }

    /// A read whose batches retention trimmed while they were being read
    /// (their object deleted after the grace) gets the answer any later
    /// fetch gets: out of range. Any other failure is counted.
    fn read_failed(&self, req: ReadRequest, e: Error) -> Error {
        let now = self
            .state
            .borrow()
            .indexes
            .get(&req.tp)
            .map(|i| (i.log_start(), i.high_watermark()));
        if let Some((log_start, high_watermark)) = now {
            if req.offset < log_start {
                return Error::OffsetOutOfRange {
                    offset: req.offset,
                    log_start,
                    high_watermark,
                };
            }
        }
        self.counters().fetch_read_errors.add(1);
        e
    }

    async fn offsets_local(&self, tp: PartitionKey, query: OffsetQuery) -> Result<OffsetAnswer> {
        if let OffsetQuery::LatestAfter(seq) = query {
            self.wait_applied(seq).await;
        }
        let (entry, hwm, log_start, last_stable, stored_bytes) = {
            let st = self.state.borrow();
            let Some(index) = st.indexes.get(&tp) else {
                return Ok(OffsetAnswer::default());
            };
            let pos = match query {
                OffsetQuery::Earliest | OffsetQuery::Latest | OffsetQuery::LatestAfter(_) => None,
                OffsetQuery::MaxTimestamp => index.position_of_max_timestamp(),
                OffsetQuery::Timestamp(ts) => index.position_for_timestamp(ts),
            };
            (
                pos.and_then(|p| index.entry(p).cloned()),
                index.high_watermark(),
                index.log_start(),
                index.last_stable(),
                index.stored_bytes(),
            )
        };
        let entry = match entry {
            Some(e) if is_archive_key(&e.segment) => {
                let footer = self.footer(&e).await?;
                let pick = match query {
                    OffsetQuery::Timestamp(ts) => {
                        footer.batches.iter().position(|b| b.at.max_ts >= ts)
                    }
                    _ => {
                        let max = footer.batches.iter().map(|b| b.at.max_ts).max();
                        footer
                            .batches
                            .iter()
                            .rposition(|b| Some(b.at.max_ts) == max)
                    }
                };
                pick.map(|i| archived_entry(&footer.batches[i], &e.segment))
            }
            e => e,
        };
        let batch = match entry {
            None => None,
            Some(e) => {
                let stored = self.load(std::slice::from_ref(&e)).await?;
                stored.into_iter().next().map(|b| {
                    let mut whole = patched_prefix(&b, e.base_offset as i64).to_vec();
                    whole.extend_from_slice(&b[12..]);
                    (e.base_offset, Bytes::from(whole))
                })
            }
        };
        Ok(OffsetAnswer {
            high_watermark: hwm,
            log_start,
            last_stable,
            stored_bytes,
            batch,
        })
    }

    /// Seals what is open and closes the commit queue; the future returned
    /// by [`Shard::start`] completes once every queued commit is answered.
    pub fn close(&self) {
        self.seal();
        self.commit_queue.borrow_mut().take();
        self.opened.notify(usize::MAX);
    }
}

/// Routes the committer's index updates to the owning shards.
pub struct ShardIndexSink {
    pub links: Vec<flume::Sender<IndexMsg>>,
}

impl crate::committer::IndexSink for ShardIndexSink {
    fn send(&self, update: IndexUpdate) {
        let owner = update.tp.owner(self.links.len());
        let _ = self.links[owner].send(IndexMsg::Update(update));
    }
    fn applied(&self, seq: u64) {
        for l in &self.links {
            let _ = l.send(IndexMsg::Applied(seq));
        }
    }
    fn reload(&self, seq: u64, updates: Vec<IndexUpdate>) {
        let mut by_shard: Vec<Vec<IndexUpdate>> = vec![Vec::new(); self.links.len()];
        for u in updates {
            by_shard[u.tp.owner(self.links.len())].push(u);
        }
        for (l, updates) in self.links.iter().zip(by_shard) {
            let _ = l.send(IndexMsg::Reload(updates));
        }
        self.applied(seq);
    }
}

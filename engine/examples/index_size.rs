//! How big the commit log's derived state gets as batches are written:
//! index entries held, segment-table keys, snapshot bytes and the
//! process's RSS, printed at 1, 10, 100… million batches.
//!
//! It writes index entries directly: log entries of one segment each
//! (4,096 batches over the partitions, round robin) go through
//! `LogState::apply` as a committer applies them; an archive entry follows
//! whenever a partition has the archive target waiting (as the archiving
//! job would commit it), retention by bytes trims every 100 entries, and
//! released objects are forgotten (as the cleanup owner deletes them).
//!
//!   cargo run --release -p floe-engine --example index_size -- \
//!       BATCHES [PARTITIONS] [BATCH_BYTES] [ARCHIVE_BYTES] [RETAIN_BYTES_PER_PARTITION]
//!
//! ARCHIVE_BYTES 0: no archiving (the index before archive objects).
//! RETAIN 0: unlimited retention.
//!
//! Memory is measured by counting the heap bytes allocated and not freed
//! (the peak since the last line): the state is the only thing here that
//! holds memory.

// The counting allocator below is the one unsafe block: a GlobalAlloc
// must be an `unsafe impl`, and it only forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use floe_engine::committer::LogState;
use floe_engine::retention::RetentionPolicy;
use floe_engine::PartitionKey;
use floe_meta::schema::{ArchiveRecord, BatchRecord, ChunkRecord, CommitRecord, SegmentRecord};

const BATCHES_PER_ENTRY: u64 = 4096;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes and their peak.
struct Counting;

// SAFETY: every call is forwarded unchanged to `System`, which upholds
// GlobalAlloc's contract; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let batches = arg(1, 10_000_000);
    let partitions = arg(2, 64).max(1) as u32;
    let batch_bytes = arg(3, 16 << 10).max(1) as u32;
    let archive_bytes = arg(4, 64 << 20);
    let retain = arg(5, 0);
    let topic = uuid::Uuid::from_u128(0x1de5);
    let tp = |p: u32| PartitionKey {
        topic_id: topic,
        partition: p,
    };
    let policy = RetentionPolicy {
        retention_ms: None,
        retention_bytes: (retain > 0).then_some(retain),
    };
    let policies: HashMap<uuid::Uuid, RetentionPolicy> = [(topic, policy)].into();
    let now = SystemTime::UNIX_EPOCH;
    println!(
        "{batches} batches of {batch_bytes} B over {partitions} partitions; archive target {archive_bytes} B; retention {} per partition",
        if retain == 0 { "unlimited".to_string() } else { format!("{retain} B") }
    );
    println!(
        "batches written | index entries (peak) | segment table | snapshot bytes | heap MiB (peak)"
    );
    let mut peak_entries = 0usize;
    let mut state = LogState::default();
    let mut seq = 0u64;
    let mut written = 0u64;
    let mut next_report = 1_000_000u64;
    let mut archives = 0u64;
    while written < batches {
        let n = BATCHES_PER_ENTRY.min(batches - written);
        let mut chunks: Vec<ChunkRecord> = (0..partitions.min(n as u32))
            .map(|p| ChunkRecord {
                topic_id: topic,
                partition: p,
                batches: Vec::new(),
            })
            .collect();
        let spread = chunks.len() as u64;
        for i in 0..n {
            chunks[(i % spread) as usize].batches.push(BatchRecord {
                pos: 16 + i * u64::from(batch_bytes),
                len: batch_bytes,
                records: 10,
                max_ts: (written + i) as i64,
                producer_id: -1,
                producer_epoch: -1,
                base_sequence: -1,
                transactional: false,
            });
        }
        seq += 1;
        state.apply(
            seq,
            &CommitRecord {
                segments: vec![SegmentRecord {
                    key: format!("segments/{seq:013}"),
                    size: n * u64::from(batch_bytes),
                    chunks,
                }],
                ..CommitRecord::default()
            },
            now,
        );
        written += n;
        if archive_bytes > 0 {
            let mut due = Vec::new();
            for p in 0..partitions {
                let mut bytes = 0;
                let mut range = None;
                for (b, _) in state.unarchived(&tp(p)) {
                    if bytes + u64::from(b.len) > archive_bytes {
                        break;
                    }
                    bytes += u64::from(b.len);
                    let first = range.map_or(b.base_offset, |(f, _)| f);
                    range = Some((first, b.end_offset()));
                }
                if let Some((from, to)) =
                    range.filter(|_| bytes + u64::from(batch_bytes) > archive_bytes)
                {
                    archives += 1;
                    due.push(ArchiveRecord {
                        topic_id: topic,
                        partition: p,
                        key: format!("archives/{p}/{from:020}-{archives}"),
                        size: bytes,
                        base_offset: from,
                        end_offset: to,
                        replaces: Vec::new(),
                    });
                }
            }
            if !due.is_empty() {
                seq += 1;
                state.apply(
                    seq,
                    &CommitRecord {
                        archives: due,
                        ..CommitRecord::default()
                    },
                    now,
                );
            }
        }
        if seq.is_multiple_of(100) {
            if retain > 0 {
                let trims = state.plan_retention(&policies, i64::MAX, 4096);
                if !trims.is_empty() {
                    seq += 1;
                    state.apply(
                        seq,
                        &CommitRecord {
                            trims,
                            ..CommitRecord::default()
                        },
                        now,
                    );
                }
            }
            for k in state.refs().deletable(u64::MAX, now, Duration::ZERO) {
                state.refs_mut().forget(&k);
            }
        }
        let entries: usize = (0..partitions).map(|p| state.batches(&tp(p)).len()).sum();
        peak_entries = peak_entries.max(entries);
        if written >= next_report || written == batches {
            let (live, peak) = (LIVE.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed));
            let snapshot = state.snapshot().encode().map_or(0, |b| b.len());
            println!(
                "{written:>15} | {entries:>9} ({peak_entries:>8}) | {:>13} | {snapshot:>14} | {:>6.1} ({:>6.1})",
                state.segment_table_len(),
                mib(live),
                mib(peak),
            );
            PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
            peak_entries = 0;
            next_report *= 10;
        }
    }
}

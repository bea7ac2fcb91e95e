//! What the memory allocator holds, for `/metrics`: the bytes floe has
//! allocated and not freed, and the bytes it freed that the allocator
//! keeps. A broker whose RSS rises while the first stays flat is not
//! growing its data; the allocator is keeping what it was given back
//! (docs/faults.md, "The soak").
//!
//! glibc's `mallinfo2` walks every arena under its lock, so it is read
//! once per scrape, never on the data path. Under `--features jemalloc`
//! the same three come from jemalloc's statistics (`stats.allocated`,
//! and `stats.resident` less it), read after advancing its epoch.
//!
//! With glibc, `floe serve` also gives freed memory back: a thread calls
//! `malloc_trim(0)` every `--malloc-trim-interval-secs`. An arena returns
//! memory to the system only from its top; free chunks in its middle keep
//! their pages resident until a trim tells the kernel to drop every whole
//! free page of every arena (`MADV_DONTNEED`). floe's large buffers are
//! reused per shard (engine/src/pool.rs), so what is freed is the churn
//! of small and medium allocations, often freed on another thread than
//! the one that allocated them, which leaves holes no later allocation of
//! the arena's own thread fills. Measured in docs/faults.md. A fixed mmap
//! threshold was tried too: RSS nearly flat, but every large request frame
//! became an `mmap`, its page faults and an `munmap`, twice the CPU per
//! produced MB. jemalloc (opt-in) purges by itself; nothing is trimmed
//! then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The allocator's accounts, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Allocated by floe from the arenas and not freed.
    pub in_use: u64,
    /// Allocated by floe as separate mappings (above glibc's mmap
    /// threshold), not freed.
    pub mapped: u64,
    /// Freed by floe and kept by the allocator in its arenas (resident
    /// unless the kernel was told to drop those pages).
    pub free: u64,
}

#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
pub fn held() -> Option<Held> {
    // SAFETY: mallinfo2 has no preconditions; it takes the arenas' locks
    // itself and returns a plain struct.
    #[allow(unsafe_code)]
    let m = unsafe { libc::mallinfo2() };
    Some(Held {
        in_use: m.uordblks as u64,
        mapped: m.hblkhd as u64,
        free: m.fordblks as u64,
    })
}

#[cfg(feature = "jemalloc")]
pub fn held() -> Option<Held> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The statistics are a snapshot taken when the epoch advances.
    epoch::advance().ok()?;
    let allocated = stats::allocated::read().ok()? as u64;
    let resident = stats::resident::read().ok()? as u64;
    Some(Held {
        in_use: allocated,
        // jemalloc maps large allocations from its own extents; they are
        // in `allocated` already.
        mapped: 0,
        // Resident pages not holding allocations: freed and not yet
        // purged (dirty), and jemalloc's own metadata.
        free: resident.saturating_sub(allocated),
    })
}

#[cfg(not(any(feature = "jemalloc", all(target_os = "linux", target_env = "gnu"))))]
pub fn held() -> Option<Held> {
    None
}

/// Trims done, and the time they took (each arena is locked while it is
/// walked, so this is time a shard allocating from it may have waited).
static TRIMS: AtomicU64 = AtomicU64::new(0);
static TRIM_NANOS: AtomicU64 = AtomicU64::new(0);

/// Trims so far and their total duration, for `/metrics`; `None` where
/// floe does not trim (jemalloc, other C libraries).
pub fn trims() -> Option<(u64, Duration)> {
    TRIM_SUPPORTED.then(|| {
        (
            TRIMS.load(Ordering::Relaxed),
            Duration::from_nanos(TRIM_NANOS.load(Ordering::Relaxed)),
        )
    })
}

/// Starts the thread that trims every arena each `interval` (zero: none).
/// It runs for the life of the process.
pub fn spawn_trimmer(interval: Duration) -> std::io::Result<()> {
    if interval.is_zero() || !TRIM_SUPPORTED {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("floe-malloc-trim".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let took = trim();
            if took > Duration::from_millis(20) {
                tracing::warn!(
                    ?took,
                    "malloc_trim was slow: shards allocating meanwhile waited"
                );
            }
        })
        .map(drop)
}

/// Gives every arena's whole free pages back to the system; how long it
/// took.
fn trim() -> Duration {
    let started = Instant::now();
    trim_arenas();
    let took = started.elapsed();
    TRIMS.fetch_add(1, Ordering::Relaxed);
    TRIM_NANOS.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    took
}

#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
const TRIM_SUPPORTED: bool = true;

#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
fn trim_arenas() {
    // SAFETY: malloc_trim takes the padding to keep at the top of the main
    // heap and only returns free pages to the system, under each arena's
    // lock. No memory is passed or returned.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc"))))]
const TRIM_SUPPORTED: bool = false;

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc"))))]
fn trim_arenas() {}

#[cfg(all(
    test,
    any(feature = "jemalloc", all(target_os = "linux", target_env = "gnu"))
))]
mod tests {
    use super::*;

    #[test]
    fn an_allocation_shows_in_use_until_freed() {
        // Other tests allocate on other threads meanwhile: the margins are
        // a MiB or more, their allocations a few KiB.
        let before = held().expect("the allocator reports");
        // 4 MiB in blocks far below glibc's mmap threshold, so from an arena.
        let blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8; 16 << 10]).collect();
        let during = held().expect("the allocator reports");
        assert!(
            during.in_use >= before.in_use + (3 << 20),
            "{before:?} -> {during:?}"
        );
        drop(blocks);
        let after = held().expect("the allocator reports");
        assert!(
            after.in_use + (3 << 20) <= during.in_use,
            "{during:?} -> {after:?}"
        );
        if cfg!(feature = "jemalloc") {
            return;
        }
        // Above glibc's largest mmap threshold (32 MiB): a mapping of its own.
        let big = vec![1u8; 64 << 20];
        let mapped = held().expect("the allocator reports");
        assert!(
            mapped.mapped >= after.mapped + (64 << 20),
            "{after:?} -> {mapped:?}"
        );
        drop(big);
    }

    /// Of the whole pages in `[start, end)`, how many are resident.
    #[cfg(not(feature = "jemalloc"))]
    fn resident_pages(start: usize, end: usize) -> (usize, usize) {
        const PAGE: usize = 4096;
        let (mut resident, mut pages) = (0, 0);
        let mut page = start.next_multiple_of(PAGE);
        while page + PAGE <= end {
            let mut vec = 0u8;
            // SAFETY: mincore only reads the page tables of the range it is
            // given; the range need not be allocated (ENOMEM if unmapped,
            // counted as not resident). `vec` has room for the one page.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::mincore(page as *mut libc::c_void, PAGE, &mut vec) };
            pages += 1;
            resident += usize::from(rc == 0 && vec & 1 == 1);
            page += PAGE;
        }
        (resident, pages)
    }

    #[cfg(not(feature = "jemalloc"))]
    #[test]
    fn a_trim_gives_back_the_pages_of_freed_blocks() {
        // 4 MiB in 16 KiB blocks (below any mmap threshold, above the
        // thread cache's sizes), written so their pages are resident, then
        // a block after them so that, freed, they are a hole in the arena
        // rather than its top.
        const BLOCK: usize = 16 << 10;
        let blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8 | 1; BLOCK]).collect();
        let guard = vec![1u8; BLOCK];
        let ranges: Vec<(usize, usize)> = blocks
            .iter()
            .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + BLOCK))
            .collect();
        let count = |ranges: &[(usize, usize)]| {
            ranges.iter().fold((0, 0), |(r, p), &(s, e)| {
                let (r2, p2) = resident_pages(s, e);
                (r + r2, p + p2)
            })
        };
        drop(blocks);
        let (before, pages) = count(&ranges);
        assert!(pages >= 512, "{pages} whole pages");
        // Freed, the pages stay with the arena: what the trim is for.
        // (Other tests' threads may reuse a little of the hole meanwhile.)
        assert!(
            before * 4 >= pages * 3,
            "{before} of {pages} resident before the trim"
        );
        trim();
        let (after, _) = count(&ranges);
        assert!(
            after * 2 <= pages,
            "{after} of {pages} still resident after the trim"
        );
        assert!(trims().expect("glibc trims").0 >= 1);
        drop(guard);
    }
}

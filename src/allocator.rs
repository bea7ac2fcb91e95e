//! What the memory allocator holds, for `/metrics`: the bytes floe has
//! allocated and not freed, and the bytes it freed that the allocator
//! keeps. A broker whose RSS rises while the first stays flat is not
//! growing its data; the allocator is keeping what it was given back
//! (docs/faults.md, "The soak").
//!
//! glibc's `mallinfo2` walks every arena under its lock, so it is read
//! once per scrape, never on the data path. With the `jemalloc` feature
//! (the default build) the same three come from jemalloc's statistics
//! (`stats.allocated`, and `stats.resident` less it), read after
//! advancing its epoch.

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
}

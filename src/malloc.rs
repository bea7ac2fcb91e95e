//! Asking glibc's allocator to give memory back to the system.
//!
//! Under constant load floe's heap is flat (heaptrack over a 30-minute
//! soak: 74–75 MiB in use from the first minutes to the last), but with
//! glibc's default settings its RSS is not: it rose 11–22 MiB an hour in a
//! one-hour soak (docs/faults.md). The pages are free memory glibc keeps:
//!
//! - glibc's mmap threshold is dynamic. The first time a large block
//!   served by `mmap` is freed, the threshold rises to that block's size
//!   (up to 32 MiB), so later request frames, fetch responses and segment
//!   buffers of that size are carved out of the per-thread arenas instead,
//!   where they fragment the arena and its pages stay resident after the
//!   blocks are freed. A fixed threshold keeps large blocks on `mmap`,
//!   whose pages go back at `free`.
//! - An arena returns memory only from its top. Free chunks in the middle
//!   keep their pages until `malloc_trim` releases them (`MADV_DONTNEED`
//!   on every whole free page, in every arena).
//!
//! `floe serve` runs a thread that calls `malloc_trim(0)` every few
//! seconds (about 0.2 ms a call in the soak). A fixed threshold was tried
//! too (`glibc.malloc.mmap_threshold=131072`): it kept RSS nearly flat but
//! doubled the broker's CPU per produced MB, every large request frame
//! becoming an `mmap`, page faults and an `munmap`. Other C libraries
//! (musl) and other systems: nothing is done.

use std::time::{Duration, Instant};

/// Starts the thread that trims every arena each `interval` (zero: none).
/// It runs for the life of the process.
pub fn spawn_trimmer(interval: Duration) -> std::io::Result<()> {
    if interval.is_zero() || !glibc::SUPPORTED {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("floe-malloc-trim".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let started = Instant::now();
            let released = glibc::trim();
            let took = started.elapsed();
            // Each arena is locked while it is walked; a slow trim stalls
            // the shard that allocates from it, so say so.
            if took > Duration::from_millis(20) {
                tracing::warn!(?took, released, "malloc_trim was slow");
            } else {
                tracing::debug!(?took, released, "malloc_trim");
            }
        })
        .map(drop)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    pub const SUPPORTED: bool = true;

    /// Releases the free pages of every arena; whether any were released.
    pub fn trim() -> bool {
        // SAFETY: malloc_trim takes an integer (the padding to keep at the
        // top of the main heap) and only returns free memory to the system,
        // under each arena's lock. No memory is passed or returned.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod glibc {
    pub const SUPPORTED: bool = false;

    pub fn trim() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_trims_and_returns() {
        // A freed block in the middle of the heap gives trim something to
        // release; its answer may be either, but it must return.
        let keep: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(keep);
        let _ = glibc::trim();
    }
}

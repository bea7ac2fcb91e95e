//! Per-shard buffers that are reused instead of freed.
//!
//! Request frames are carved out of 4 MiB slabs (`BytesMut::split_to`), so
//! one allocation serves many frames; a frame of a MiB or more gets a
//! buffer of its own. Each sealed segment's packed copy for the read cache
//! is one buffer. All of these are allocated at the produce rate and live
//! until an upload ends or the cache evicts them, often freed on another
//! thread than the one that allocated them. Left to glibc's malloc they
//! fragment its arenas (RSS grew 11–22 MiB an hour in a soak whose heap was
//! flat), and mapped afresh per use they cost a page fault per 4 KiB.
//!
//! So every such buffer stays known to its shard: a [`Recycler`] keeps an
//! empty handle on it, sharing it with the frames or cached batches still
//! using it. Once those are all gone, `BytesMut::try_reclaim` turns the
//! handle back into the whole buffer without allocating. The handles kept
//! are bounded in bytes; the oldest beyond the bound are let go (their
//! buffer is then freed by whoever drops the last user). A buffer whose
//! users are all gone is kept only while it is reused: one not taken again
//! within [`FREE_KEPT_FOR`] is let go, so a pool holds what its shard's
//! load reuses, not every size it has ever seen up to its bound.
//! Owned by its shard (`RefCell`, never shared across threads; the buffers'
//! users may be anywhere).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;

/// Size of one slab; frames from a quarter of it up get a buffer of their
/// own.
pub const SLAB_BYTES: usize = 4 << 20;

/// How long a buffer whose users are all gone is kept for reuse. A shard
/// under load takes buffers at its seal and frame rate, many times a
/// second; one not taken again for this long is not part of that load.
/// Counted from the first sweep that finds the buffer unused, so it is let
/// go at the first sweep after that (sweeps run when a buffer is kept).
pub const FREE_KEPT_FOR: Duration = Duration::from_secs(30);

/// Buffers, by capacity, whose users may still hold parts of them.
#[derive(Debug)]
pub struct Recycler {
    kept: VecDeque<Kept>,
    kept_bytes: usize,
    max_bytes: usize,
    free_max_bytes: usize,
}

/// One buffer known to the pool.
#[derive(Debug)]
struct Kept {
    cap: usize,
    /// The empty handle the whole buffer is reclaimed through.
    handle: BytesMut,
    /// When a sweep first found the buffer's users all gone (`None` while
    /// any is known to live).
    free_since: Option<Instant>,
}

impl Recycler {
    /// Keeps at most `max_bytes` of buffers, of which at most
    /// `free_max_bytes` unused (their users all gone): buffers in use are
    /// counted by their users' own budgets (in-flight bytes, read cache),
    /// unused ones only here, so a broker that was busy once does not keep
    /// its peak.
    pub fn new(max_bytes: usize, free_max_bytes: usize) -> Self {
        Self {
            kept: VecDeque::new(),
            kept_bytes: 0,
            max_bytes,
            free_max_bytes,
        }
    }

    /// An empty buffer of capacity at least `len` (and at most half as much
    /// again, so a reused buffer pins little beyond what its user counts):
    /// a kept one whose users are all gone, else a new one rounded up to a
    /// size class. Give it back with [`Recycler::keep_rest`].
    pub fn take(&mut self, len: usize) -> BytesMut {
        let fits = |cap: usize| cap >= len && cap <= len.saturating_add(len / 2);
        let found = self
            .kept
            .iter_mut()
            .position(|k| fits(k.cap) && k.handle.try_reclaim(k.cap));
        match found.and_then(|i| self.kept.remove(i)) {
            Some(k) => {
                self.kept_bytes -= k.cap;
                k.handle
            }
            None => BytesMut::with_capacity(size_class(len)),
        }
    }

    /// Splits off the unused end of `buf` (taken from [`Recycler::take`]
    /// and filled) and keeps it as the handle through which the whole
    /// buffer is reclaimed once `buf`'s users are gone.
    pub fn keep_rest(&mut self, buf: &mut BytesMut) {
        let cap = buf.capacity();
        let rest = buf.split_off(buf.len());
        self.keep(cap, rest);
    }

    /// Keeps `handle`, a handle on a buffer of `cap` bytes.
    fn keep(&mut self, cap: usize, handle: BytesMut) {
        self.keep_at(cap, handle, Instant::now());
    }

    /// [`Recycler::keep`] at `now`: also sweeps the kept buffers, letting
    /// go of unused ones beyond their allowance or unused for
    /// [`FREE_KEPT_FOR`].
    fn keep_at(&mut self, cap: usize, handle: BytesMut, now: Instant) {
        if cap == 0 || cap > self.max_bytes {
            return;
        }
        while self.kept_bytes + cap > self.max_bytes {
            match self.kept.pop_front() {
                Some(k) => self.kept_bytes -= k.cap,
                None => break,
            }
        }
        // Unused buffers beyond their allowance go, newest kept, and so do
        // those unused for too long.
        let mut free = 0;
        let free_max = self.free_max_bytes;
        let mut dropped = 0;
        self.kept.retain_mut(|k| {
            if !k.handle.try_reclaim(k.cap) {
                k.free_since = None;
                return true;
            }
            let since = *k.free_since.get_or_insert(now);
            if free + k.cap > free_max || now.duration_since(since) >= FREE_KEPT_FOR {
                dropped += k.cap;
                return false;
            }
            free += k.cap;
            true
        });
        self.kept_bytes -= dropped;
        self.kept_bytes += cap;
        self.kept.push_back(Kept {
            cap,
            handle,
            free_since: None,
        });
    }

    /// Bytes of buffers kept (in use or free).
    pub fn kept_bytes(&self) -> usize {
        self.kept_bytes
    }
}

/// `len` rounded up to a quarter of its power of two (4 KiB at least), so
/// buffers of nearby sizes serve each other and slack stays under 25 %.
fn size_class(len: usize) -> usize {
    let step = (len.next_power_of_two() / 8).max(4096);
    len.next_multiple_of(step)
}

/// The shard's request frames.
#[derive(Debug)]
pub struct FramePool {
    state: RefCell<Frames>,
}

#[derive(Debug)]
struct Frames {
    /// What is left of the current slab, and the slab's whole size
    /// (`None` before the first frame).
    slab: Option<(usize, BytesMut)>,
    kept: Recycler,
}

impl FramePool {
    /// Keeps up to `kept_bytes` of slabs and large frame buffers, of which
    /// two slabs' worth unused.
    pub fn new(kept_bytes: usize) -> Self {
        Self {
            state: RefCell::new(Frames {
                slab: None,
                kept: Recycler::new(kept_bytes, 2 * SLAB_BYTES),
            }),
        }
    }

    /// A zeroed buffer of exactly `len` bytes for one frame.
    pub fn take(&self, len: usize) -> BytesMut {
        let mut st = self.state.borrow_mut();
        let Frames { slab, kept } = &mut *st;
        if len >= SLAB_BYTES / 4 {
            let mut buf = kept.take(len);
            buf.resize(len, 0);
            kept.keep_rest(&mut buf);
            return buf;
        }
        // The current slab is reclaimed in place when every frame carved
        // from it is gone.
        let usable = match slab {
            Some((cap, s)) => s.capacity() >= len || s.try_reclaim(*cap),
            None => false,
        };
        let current = match slab {
            Some((_, s)) if usable => s,
            _ => {
                // Retire the current slab (its frames still live) and take
                // a kept one whose frames are gone, or a new one.
                if let Some((cap, old)) = slab.take() {
                    kept.keep(cap, old);
                }
                let fresh = kept.take(SLAB_BYTES);
                &mut slab.insert((fresh.capacity(), fresh)).1
            }
        };
        current.resize(len, 0);
        current.split_to(len)
    }

    /// Bytes of slabs and frame buffers kept for reuse.
    pub fn kept_bytes(&self) -> usize {
        self.state.borrow().kept.kept_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_exact_and_independent() {
        let p = FramePool::new(64 << 20);
        let mut a = p.take(10);
        let b = p.take(20);
        a[0] = 1;
        assert_eq!((a.len(), b.len()), (10, 20));
        assert_eq!(b[0], 0);
        assert_eq!(p.take(SLAB_BYTES).len(), SLAB_BYTES);
    }

    #[test]
    fn a_slab_is_reused_once_its_frames_are_gone() {
        const F: usize = SLAB_BYTES / 5;
        let p = FramePool::new(64 << 20);
        let first: Vec<_> = (0..5).map(|_| p.take(F)).collect();
        let first_at = first[0].as_ptr();
        // The slab is full and its frames live: a second slab.
        let second: Vec<_> = (0..5).map(|_| p.take(F)).collect();
        assert!(second.iter().all(|f| f.as_ptr() != first_at));
        drop(first);
        // The second slab is retired in turn and the first reclaimed.
        let mut third = p.take(F);
        assert_eq!(third.as_ptr(), first_at);
        assert!(third.iter().all(|b| *b == 0), "a reused frame is zeroed");
        third[0] = 9;
        drop((second, third));
        // Frames that come and go stay in one slab.
        let at: Vec<usize> = (0..100).map(|_| p.take(F).as_ptr() as usize).collect();
        let spread = at.iter().max().unwrap() - at.iter().min().unwrap();
        assert!(spread < SLAB_BYTES, "frames spread over {spread} bytes");
        assert!(p.kept_bytes() <= 2 * SLAB_BYTES);
    }

    #[test]
    fn large_frames_reuse_their_buffers() {
        let p = FramePool::new(64 << 20);
        let a = p.take(3 << 20);
        let at = a.as_ptr();
        drop(a);
        // A little smaller or larger still fits the same size class.
        let b = p.take((3 << 20) - 1000);
        assert_eq!(b.as_ptr(), at);
        assert_eq!(b.len(), (3 << 20) - 1000);
        // While it lives, another buffer.
        let c = p.take(3 << 20);
        assert_ne!(c.as_ptr(), at);
    }

    #[test]
    fn reused_buffers_fit_their_length() {
        let mut r = Recycler::new(64 << 20, 64 << 20);
        let mut big = r.take(8 << 20);
        big.extend_from_slice(&[1; 100]);
        r.keep_rest(&mut big);
        drop(big);
        // Far smaller: not served by the 8 MiB buffer.
        let small = r.take(1 << 20);
        assert!(small.capacity() < 2 << 20, "{}", small.capacity());
        let again = r.take(7 << 20);
        assert!(again.capacity() >= 8 << 20);
        assert!(again.is_empty());
    }

    #[test]
    fn kept_bytes_are_bounded() {
        let mut r = Recycler::new(10 << 20, 10 << 20);
        let mut live = Vec::new();
        for _ in 0..10 {
            let mut b = r.take(3 << 20);
            b.extend_from_slice(&[7; 10]);
            r.keep_rest(&mut b);
            live.push(b);
        }
        assert!(r.kept_bytes() <= 10 << 20, "{}", r.kept_bytes());
        // Buffers let go of are still intact for their users.
        assert!(live.iter().all(|b| b[..] == [7; 10]));
    }

    #[test]
    fn unused_buffers_are_kept_within_their_allowance() {
        let mut r = Recycler::new(64 << 20, 2 << 20);
        let mut live = Vec::new();
        for i in 0..8 {
            let mut b = r.take(1 << 20);
            b.extend_from_slice(&[i; 10]);
            r.keep_rest(&mut b);
            live.push(b);
        }
        // All in use: all kept.
        assert!(r.kept_bytes() >= 8 << 20);
        live.truncate(2);
        let mut b = r.take(4 << 20);
        b.extend_from_slice(&[9; 10]);
        r.keep_rest(&mut b);
        // Two in use, the new one, and at most 2 MiB unused.
        assert!(
            r.kept_bytes() <= (2 + 2 + 2) * (1 << 20) + (5 << 20),
            "{}",
            r.kept_bytes()
        );
        assert!(live.iter().enumerate().all(|(i, b)| b[..] == [i as u8; 10]));
    }

    /// Takes a buffer for `len` bytes, writes `fill` into it and keeps
    /// the rest at `now`, as a seal does; returns the user's part.
    fn use_at(r: &mut Recycler, len: usize, fill: u8, now: Instant) -> BytesMut {
        let mut b = r.take(len);
        b.extend_from_slice(&[fill; 10]);
        let cap = b.capacity();
        let rest = b.split_off(b.len());
        r.keep_at(cap, rest, now);
        b
    }

    #[test]
    fn unused_buffers_go_once_not_reused_for_a_while() {
        let t0 = Instant::now();
        let mut r = Recycler::new(64 << 20, 64 << 20);
        // A 2 MiB buffer used once, a 3 MiB one still in use.
        drop(use_at(&mut r, 2 << 20, 1, t0));
        let held = use_at(&mut r, 3 << 20, 3, t0);
        // 1 MiB buffers keep being taken and let go of.
        let mut t = t0;
        for _ in 0..10 {
            t += FREE_KEPT_FOR / 4;
            drop(use_at(&mut r, 1 << 20, 2, t));
        }
        let caps = |r: &Recycler| r.kept.iter().map(|k| k.cap).collect::<Vec<_>>();
        // The 2 MiB one, unused for well over FREE_KEPT_FOR, is let go of;
        // the reused 1 MiB one and the one in use are kept.
        let kept = caps(&r);
        assert!(
            !kept.iter().any(|&c| (2 << 20..3 << 20).contains(&c)),
            "{kept:?}"
        );
        assert!(kept.iter().any(|&c| c >= 3 << 20), "{kept:?}");
        assert!(kept.iter().any(|&c| c < 2 << 20), "{kept:?}");
        assert_eq!(r.kept_bytes(), kept.iter().sum::<usize>());
        assert_eq!(held[..], [3; 10]);
        // Once its user is gone, it goes too, after FREE_KEPT_FOR unused.
        drop(held);
        for _ in 0..6 {
            t += FREE_KEPT_FOR / 4;
            drop(use_at(&mut r, 1 << 20, 2, t));
        }
        let kept = caps(&r);
        assert!(kept.iter().all(|&c| c < 2 << 20), "{kept:?}");
    }

    #[test]
    fn size_classes_round_up_by_a_quarter_at_most() {
        for len in [1, 4095, 4096, 65_537, 1 << 20, (1 << 20) + 1, 5_000_000] {
            let c = size_class(len);
            assert!(c >= len && c <= len + len / 4 + 4096, "{len} -> {c}");
        }
    }
}

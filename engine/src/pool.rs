//! Per-shard frame buffers. Request frames are carved out of a shared slab
//! (`BytesMut::split_to`), so one allocation serves many frames, and a slab
//! whose frames have all been dropped is reused in place by `reserve`.
//! Owned by its shard (`Rc`, never shared across threads).

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of one slab; frames larger than this get a buffer of their own.
pub const SLAB_BYTES: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct FramePool {
    slab: RefCell<BytesMut>,
}

impl FramePool {
    /// A zeroed buffer of exactly `len` bytes for one frame.
    pub fn take(&self, len: usize) -> BytesMut {
        if len >= SLAB_BYTES / 4 {
            return BytesMut::zeroed(len);
        }
        let mut slab = self.slab.borrow_mut();
        if slab.capacity() < len {
            // Reclaims the slab when every frame carved from it is gone,
            // otherwise starts a new one.
            slab.reserve(SLAB_BYTES);
        }
        slab.resize(len, 0);
        slab.split_to(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_exact_and_independent() {
        let p = FramePool::default();
        let mut a = p.take(10);
        let b = p.take(20);
        a[0] = 1;
        assert_eq!((a.len(), b.len()), (10, 20));
        assert_eq!(b[0], 0);
        assert_eq!(p.take(SLAB_BYTES).len(), SLAB_BYTES);
    }
}

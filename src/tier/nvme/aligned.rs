//! 4 KiB-aligned I/O buffers and a small pool that reuses them.
//!
//! O_DIRECT needs the buffer address, the length and the file offset aligned
//! to the device's logical block; 4 KiB covers every device in use. Buffers
//! are allocated once and handed back to the pool on drop, so the hot path
//! does no allocation once the pool is warm. The pool keeps at most
//! `max_keep` idle buffers; a request larger than every idle buffer
//! replaces the smallest one.

use super::format::ALIGN;
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A zero-initialised heap buffer aligned to [`ALIGN`], whose capacity is a
/// multiple of [`ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates at least `min` bytes (rounded up to [`ALIGN`], at least one block).
    pub fn new(min: usize) -> Result<Self> {
        let cap = min.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN)
            .map_err(|e| Error::invalid(format!("aligned buffer of {cap} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| {
            Error::no_space(format!("cannot allocate an aligned buffer of {cap} bytes"))
        })?;
        Ok(AlignedBuf { ptr, cap })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap initialised bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

/// A pool of idle [`AlignedBuf`]s.
pub struct BufPool {
    idle: Mutex<Vec<AlignedBuf>>,
    max_keep: usize,
}

/// A buffer on loan from a [`BufPool`]; returns itself on drop.
pub struct PooledBuf<'a> {
    buf: Option<AlignedBuf>,
    pool: &'a BufPool,
}

impl BufPool {
    /// A pool keeping at most `max_keep` idle buffers.
    pub fn new(max_keep: usize) -> Self {
        BufPool {
            idle: Mutex::new(Vec::new()),
            max_keep: max_keep.max(1),
        }
    }

    /// A buffer of at least `min` bytes: the smallest idle one that fits, or a new one.
    pub fn get(&self, min: usize) -> Result<PooledBuf<'_>> {
        let found = {
            let mut idle = self.idle.lock();
            let best = idle
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= min)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| idle.swap_remove(i))
        };
        let buf = match found {
            Some(b) => b,
            None => AlignedBuf::new(min)?,
        };
        Ok(PooledBuf {
            buf: Some(buf),
            pool: self,
        })
    }

    fn put_back(&self, b: AlignedBuf) {
        let mut idle = self.idle.lock();
        if idle.len() < self.max_keep {
            idle.push(b);
            return;
        }
        // Keep the larger buffers: they serve every request the small ones do.
        if let Some((i, _)) = idle
            .iter()
            .enumerate()
            .min_by_key(|(_, x)| x.capacity())
            .filter(|(_, x)| x.capacity() < b.capacity())
        {
            idle[i] = b;
        }
    }

    /// Idle buffers held (for tests).
    pub fn idle(&self) -> usize {
        self.idle.lock().len()
    }
}

impl Deref for PooledBuf<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_ref().expect("present until drop")
    }
}

impl DerefMut for PooledBuf<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut().expect("present until drop")
    }
}

impl Drop for PooledBuf<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put_back(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_reused() {
        let pool = BufPool::new(2);
        let addr;
        {
            let mut b = pool.get(5000).unwrap();
            assert_eq!(b.len(), 8192);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            b[0] = 1;
            addr = b.as_ptr() as usize;
        }
        assert_eq!(pool.idle(), 1);
        let b = pool.get(4096).unwrap();
        assert_eq!(b.as_ptr() as usize, addr, "the idle buffer is reused");
        let c = pool.get(100_000).unwrap();
        assert!(c.len() >= 100_000);
        drop(b);
        drop(c);
        assert_eq!(pool.idle(), 2);
        let _d = pool.get(1).unwrap();
        assert_eq!(pool.idle(), 1);
    }
}

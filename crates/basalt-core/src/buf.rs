//! Aligned I/O buffers.
//!
//! `O_DIRECT` needs the memory of every transfer aligned to the device's
//! logical block size. Allocating every buffer on a 4 KiB boundary from the
//! start means the bytes a frontend reads off a socket can reach the disk
//! without being copied again.
//!
//! Large buffers (a 1 MiB guest write, a 1 MiB read) are allocated and freed
//! for every request. Fresh ones cost a page fault per 4 KiB page (the
//! allocator returns freed large blocks to the kernel) and a fill; so freed
//! buffers of [`POOLED_MIN`] bytes or more are kept in a small pool
//! ([`POOL_BYTES`] in all) and handed out again. [`IoBuf::zeroed`] clears a
//! reused buffer; [`IoBuf::for_overwrite`] does not, for callers that fill
//! all of it at once.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::IO_ALIGN;

/// Smallest capacity worth keeping for reuse.
pub const POOLED_MIN: usize = 64 << 10;
/// Most bytes kept for reuse, all sizes together.
pub const POOL_BYTES: usize = 32 << 20;

/// Freed buffers kept for reuse: (capacity, allocation).
struct Pool {
    buffers: Vec<(usize, PooledPtr)>,
    bytes: usize,
}

/// An allocation held by the pool and owned by nobody else.
struct PooledPtr(NonNull<u8>);

// SAFETY: the pool owns each allocation exclusively, as IoBuf does.
unsafe impl Send for PooledPtr {}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    buffers: Vec::new(),
    bytes: 0,
});

/// Takes a pooled allocation of exactly `capacity` bytes.
fn pool_take(capacity: usize) -> Option<NonNull<u8>> {
    if capacity < POOLED_MIN {
        return None;
    }
    let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let at = pool.buffers.iter().rposition(|(c, _)| *c == capacity)?;
    let (_, ptr) = pool.buffers.swap_remove(at);
    pool.bytes -= capacity;
    Some(ptr.0)
}

/// Keeps an allocation for reuse; gives it back when the pool is full.
fn pool_put(ptr: NonNull<u8>, capacity: usize) -> Option<NonNull<u8>> {
    if capacity < POOLED_MIN {
        return Some(ptr);
    }
    let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if pool.bytes + capacity > POOL_BYTES {
        return Some(ptr);
    }
    pool.bytes += capacity;
    pool.buffers.push((capacity, PooledPtr(ptr)));
    None
}

/// A heap buffer aligned to [`IO_ALIGN`] whose capacity is a multiple of it.
///
/// The visible length may be any size up to the capacity; the bytes past the
/// length are zero-initialised and belong to the buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: IoBuf owns its allocation exclusively (like Vec<u8>); moving it to
// another thread moves that ownership.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reading the bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let buf = IoBuf::for_overwrite(len);
        // SAFETY: ptr points to `capacity` bytes owned by buf.
        unsafe { std::ptr::write_bytes(buf.ptr.as_ptr(), 0, len) };
        buf
    }

    /// A buffer of `len` bytes whose contents are unspecified (zeros, or
    /// bytes of an earlier buffer of this process), for a caller that
    /// overwrites all of it at once. The bytes past `len` are zero.
    pub fn for_overwrite(len: usize) -> IoBuf {
        let capacity = len.div_ceil(IO_ALIGN).max(1) * IO_ALIGN;
        if let Some(ptr) = pool_take(capacity) {
            // SAFETY: the pooled allocation has `capacity` initialised bytes
            // and len <= capacity; clearing the tail keeps the zero-past-len
            // promise of the type.
            unsafe { std::ptr::write_bytes(ptr.as_ptr().add(len), 0, capacity - len) };
            return IoBuf { ptr, len, capacity };
        }
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size (at least IO_ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len, capacity }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> IoBuf {
        let mut buf = IoBuf::for_overwrite(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        buf
    }

    fn layout(capacity: usize) -> Layout {
        match Layout::from_size_align(capacity, IO_ALIGN) {
            Ok(layout) => layout,
            // A capacity this large cannot be allocated anyway.
            Err(_) => panic!("I/O buffer of {capacity} bytes exceeds the address space"),
        }
    }

    /// Visible length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the visible length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes (a multiple of [`IO_ALIGN`], at least `len`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the visible length. Growing exposes bytes that are zero unless
    /// they were written before; lengths past the capacity are clamped.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity);
    }

    /// The visible bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `capacity` initialised bytes owned by self and len <= capacity.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The visible bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer to the start of the buffer, for handing to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer to the start of the buffer, for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some(ptr) = pool_put(self.ptr, self.capacity) {
            // SAFETY: ptr was allocated in `for_overwrite` with exactly this
            // layout, and the pool did not keep it.
            unsafe { dealloc(ptr.as_ptr(), Self::layout(self.capacity)) }
        }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> IoBuf {
        IoBuf::from_slice(self.as_slice())
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for IoBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_buffers_are_cleared_where_promised() {
        // A size no other test uses, so the pool hands back our buffer.
        let len = POOLED_MIN * 2 - 100;
        for _ in 0..4 {
            let mut dirty = IoBuf::zeroed(len);
            dirty.set_len(dirty.capacity());
            dirty.as_mut_slice().fill(0xCD);
            let address = dirty.as_ptr() as usize;
            drop(dirty);
            let mut reused = IoBuf::for_overwrite(len - 100);
            assert_eq!(
                reused.as_ptr() as usize,
                address,
                "the freed buffer is reused"
            );
            let visible = reused.len();
            reused.set_len(reused.capacity());
            assert!(
                reused.as_slice()[visible..].iter().all(|&b| b == 0),
                "bytes past the length must be zero"
            );
            reused.as_mut_slice().fill(0xEF);
            drop(reused);
            let zeroed = IoBuf::zeroed(len);
            assert_eq!(zeroed.as_ptr() as usize, address);
            assert!(zeroed.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0usize, 1, 511, 4096, 4097, 1 << 20] {
            let buf = IoBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.capacity() >= len && buf.capacity().is_multiple_of(IO_ALIGN));
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn from_slice_copies_and_clone_is_deep() {
        let mut a = IoBuf::from_slice(b"basalt");
        let b = a.clone();
        a.as_mut_slice()[0] = b'B';
        assert_eq!(a.as_slice(), b"Basalt");
        assert_eq!(b.as_slice(), b"basalt");
    }

    #[test]
    fn set_len_clamps_to_capacity() {
        let mut buf = IoBuf::zeroed(10);
        buf.set_len(1 << 20);
        assert_eq!(buf.len(), IO_ALIGN);
    }
}

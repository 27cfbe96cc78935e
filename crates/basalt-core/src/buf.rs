//! Aligned I/O buffers.
//!
//! `O_DIRECT` needs the memory of every transfer aligned to the device's
//! logical block size. Allocating every buffer on a 4 KiB boundary from the
//! start means the bytes a frontend reads off a socket can reach the disk
//! without being copied again.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

use crate::IO_ALIGN;

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
        let capacity = len.div_ceil(IO_ALIGN).max(1) * IO_ALIGN;
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
        let mut buf = IoBuf::zeroed(bytes.len());
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
        // SAFETY: ptr was allocated in `zeroed` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
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

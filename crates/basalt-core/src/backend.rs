//! The interface between frontends and the vdisk controller.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::{BlockError, IoBuf};

/// A boxed, sendable future: the return type of [`BlockBackend`] methods so the
/// trait stays object-safe (frontends hold `Arc<dyn BlockBackend>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
}

/// One run of a [`BlockBackend::block_status`] answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationExtent {
    /// Length of the run in bytes.
    pub length: u64,
    /// No storage is allocated for the run (it reads as zeros).
    pub hole: bool,
    /// The run reads as zeros (allocated or not).
    pub zero: bool,
}

/// A sized block device as a frontend sees it.
///
/// Offsets and lengths are in bytes and need not be block aligned; a backend
/// handles partial blocks itself. Requests must lie inside `[0, size())`.
/// Completion order is the durability contract of the product: a write is
/// durable once it completed with [`WriteFlags::fua`], or once a `flush`
/// issued after it completed has completed.
pub trait BlockBackend: Send + Sync {
    /// Current size of the device in bytes.
    fn size(&self) -> u64;

    /// A short identifier of the device (at most 20 bytes are shown to guests).
    fn id(&self) -> String;

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<IoBuf, BlockError>>;

    /// Writes `data` at `offset`.
    fn write(
        &self,
        offset: u64,
        data: IoBuf,
        flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>>;

    /// Makes every completed write durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>>;

    /// Discards a range: it reads as zeros afterwards and whole extents free their space.
    fn trim(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BlockError>>;

    /// Writes zeros over a range. With `allocate` the range keeps its space
    /// allocated (NBD's NO_HOLE); otherwise the backend may free it.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>>;

    /// Describes allocation of `[offset, offset + len)` as a list of runs that
    /// starts at `offset` and covers at least one byte of the range.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<AllocationExtent>, BlockError>>;
}

/// Looks up exports by name for a frontend (an NBD export name is a vdisk name).
pub trait ExportRegistry: Send + Sync {
    /// The backend serving `name`, if any.
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>>;
    /// Names and descriptions of every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

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

/// Where the bytes of a [`BlockBackend::write_from`] come from, in order.
///
/// A frontend whose data sits in memory it does not own (a guest's RAM)
/// must copy it out before the data is checksummed and written: a guest may
/// change a page while it is being written. Handing the backend a source
/// instead of a filled buffer lets the backend copy one piece, send it to the
/// disk, and copy the next while the first is being written, so the copy is
/// no longer all on the request's critical path.
pub trait WriteSource: Send {
    /// Copies the next `dst.len()` bytes of the write into `dst`. The
    /// backend asks for the write's bytes exactly once, front to back.
    fn read_next(&mut self, dst: &mut [u8]) -> Result<(), BlockError>;
}

/// Takes all `len` bytes of `source` into one buffer.
pub fn gather_source(source: &mut dyn WriteSource, len: usize) -> Result<IoBuf, BlockError> {
    // Every byte is overwritten by `read_next` (or the buffer is dropped).
    let mut data = IoBuf::for_overwrite(len);
    source.read_next(data.as_mut_slice())?;
    Ok(data)
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

    /// Writes `len` bytes at `offset`, taken from `source` as the backend is
    /// ready for them. The default takes them all, then calls
    /// [`BlockBackend::write`]; a backend that can start writing before it
    /// has every byte overrides it. If `source` fails, the write fails with
    /// its error and what the device holds in the range is unspecified, as
    /// for any failed write.
    fn write_from<'a>(
        &'a self,
        offset: u64,
        len: u32,
        source: &'a mut dyn WriteSource,
        flags: WriteFlags,
    ) -> BoxFuture<'a, Result<(), BlockError>> {
        Box::pin(async move {
            let data = gather_source(source, len as usize)?;
            self.write(offset, data, flags).await
        })
    }

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

/// Refuses a `what` ("read", "write") of more than [`crate::MAX_REQUEST_BYTES`].
pub fn check_request_len(what: &str, len: u64) -> Result<(), BlockError> {
    if len > u64::from(crate::MAX_REQUEST_BYTES) {
        return Err(BlockError::Invalid(format!(
            "{what} of {len} bytes exceeds the maximum"
        )));
    }
    Ok(())
}

/// Whether `[offset, offset + len)` is made of whole blocks
/// ([`crate::BLOCK_SIZE`]).
pub fn whole_blocks(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(crate::BLOCK_SIZE) && len.is_multiple_of(crate::BLOCK_SIZE)
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

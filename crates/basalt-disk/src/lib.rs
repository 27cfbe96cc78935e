//! Disk engines: the one narrow interface through which Basalt touches a disk.
//!
//! Every byte the storage controller stores passes through a [`DiskEngine`].
//! There are three:
//!
//! * [`uring::UringEngine`] — io_uring with `O_DIRECT` on aligned buffers: the
//!   fast path. One thread per disk owns the ring; callers hand it operations
//!   through a queue and await a completion.
//! * [`sync::SyncEngine`] — `pread`/`pwrite` on a blocking thread pool: the
//!   fallback, chosen automatically when the filesystem refuses `O_DIRECT`
//!   (tmpfs, some CI filesystems).
//! * [`sim::SimEngine`] — memory that keeps *written* and *durable* bytes apart,
//!   so a test can cut the power at any point and see exactly what a real disk
//!   may have kept: everything synced, plus any subset of later writes, each
//!   possibly torn at sector granularity.
//!
//! The trait is deliberately tiny (read, vectored write, sync) so that crash
//! behaviour can be modelled completely.

mod error;
pub mod open;
pub mod sim;
pub mod sync;
pub mod uring;

use std::sync::Arc;

use basalt_core::{BoxFuture, IoBuf};

pub use error::DiskError;
pub use open::{DiskFile, EngineChoice, open_disk};

/// Which engine serves a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring with O_DIRECT.
    Uring,
    /// pread/pwrite through the page cache.
    Sync,
    /// In-memory simulation for tests.
    Simulated,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "io_uring+O_DIRECT",
            EngineKind::Sync => "pread/pwrite",
            EngineKind::Simulated => "simulated",
        })
    }
}

/// A slice of a shared buffer handed to a vectored write.
///
/// Segments let one write gather parts of several buffers (a log batch header
/// followed by client payloads, or one extent's share of a larger request)
/// without copying. The range must start and end on [`basalt_core::IO_ALIGN`]
/// boundaries.
#[derive(Clone)]
pub struct Segment {
    /// The buffer holding the bytes.
    pub buf: Arc<IoBuf>,
    /// Byte offset of the segment inside the buffer.
    pub start: usize,
    /// Length of the segment in bytes.
    pub len: usize,
}

impl Segment {
    /// The whole visible length of `buf` as one segment.
    pub fn whole(buf: Arc<IoBuf>) -> Segment {
        let len = buf.len();
        Segment { buf, start: 0, len }
    }

    /// The segment's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

/// Result of a read: the buffer is always handed back so it can be reused.
pub type ReadResult = (IoBuf, Result<(), DiskError>);

/// Block I/O on one disk.
///
/// Offsets, buffer addresses and lengths are multiples of
/// [`basalt_core::IO_ALIGN`] for every call (engines may rely on it; the
/// simulated engine checks it). A completed write is *not* durable until a
/// later [`DiskEngine::sync`] completes.
pub trait DiskEngine: Send + Sync + 'static {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;

    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` (its visible length) from `offset`.
    fn read_at(&self, offset: u64, buf: IoBuf) -> BoxFuture<'static, ReadResult>;

    /// Writes the segments back to back starting at `offset`.
    fn write_at(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>>;

    /// Writes like [`DiskEngine::write_at`], but through the kernel's page
    /// cache where the engine has one: the write completes once the kernel
    /// holds the bytes, not once the device has them, so it does not wait
    /// behind large writes already queued at the device. A crash of this
    /// process keeps it (the kernel writes it back); a power cut may lose
    /// it until the next [`DiskEngine::sync`], as it may any write. Reads
    /// see it at once (the kernel keeps direct and cached I/O of one file
    /// coherent). Engines without such a path write as `write_at`.
    fn write_at_cached(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        self.write_at(offset, segments)
    }

    /// Writes like [`DiskEngine::write_at_cached`], but copies the bytes
    /// into the page cache on the calling thread, before returning, where
    /// the engine can: the returned future is then already complete. For
    /// small writes that someone waits for and nothing else: io_uring hands
    /// a buffered write to one of its kernel worker threads on filesystems
    /// that cannot take it without blocking (ext4), and that thread, and
    /// then the completion's wake-up, each wait for a CPU on a busy host.
    /// The calling thread blocks for the copy (and, rarely, for the
    /// kernel's dirty-page throttling), so keep the writes small. Engines
    /// without such a path write as `write_at_cached`.
    fn write_at_cached_inline(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        self.write_at_cached(offset, segments)
    }

    /// Writes many independent ranges; the results come back in order. An
    /// engine may hand them to the kernel together (one submission, one
    /// device notification) instead of one by one.
    fn write_batch(
        &self,
        writes: Vec<(u64, Vec<Segment>)>,
    ) -> BoxFuture<'static, Vec<Result<(), DiskError>>> {
        let futures: Vec<_> = writes
            .into_iter()
            .map(|(offset, segments)| self.write_at(offset, segments))
            .collect();
        Box::pin(futures::future::join_all(futures))
    }

    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> BoxFuture<'static, Result<(), DiskError>>;

    /// Reserves backing space for `[offset, offset + len)` so later writes there
    /// cannot fail for lack of space (fallocate on file disks; a no-op on block
    /// devices). Fails with [`DiskError::NoSpace`] when the space is not there.
    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<(), DiskError>>;
}

/// Checks the alignment rules of [`DiskEngine`] for a transfer of segments
/// described by `(start, len, buffer length)` triples, and that each lies
/// inside its buffer.
pub(crate) fn check_aligned(
    offset: u64,
    parts: impl IntoIterator<Item = (usize, usize, usize)>,
) -> Result<(), DiskError> {
    let align = basalt_core::IO_ALIGN;
    if !offset.is_multiple_of(align as u64) {
        return Err(DiskError::Unaligned { offset, len: 0 });
    }
    for (start, len, capacity) in parts {
        if start % align != 0 || len % align != 0 || start + len > capacity {
            return Err(DiskError::Unaligned { offset, len });
        }
    }
    Ok(())
}

/// The `(start, len, buffer length)` triples of segments, for [`check_aligned`].
pub(crate) fn segment_parts(segments: &[Segment]) -> Vec<(usize, usize, usize)> {
    segments
        .iter()
        .map(|s| (s.start, s.len, s.buf.len()))
        .collect()
}

//! io_uring engine with `O_DIRECT`.
//!
//! Submitters push SQEs under a mutex and call `io_uring_enter` themselves, so
//! a submission costs one syscall and no thread hop. Completions are reaped
//! by a task on the tokio runtime: the ring signals an eventfd, the runtime's
//! reactor wakes the task, and the task completes the waiting futures on the
//! same worker thread — no extra thread and no extra wake-up per I/O. Short
//! transfers (rare on regular files) are resubmitted for the remainder.
//!
//! Cached writes ([`crate::DiskEngine::write_at_cached`]) go through the
//! same ring on another descriptor of the file, opened without `O_DIRECT`:
//! the kernel keeps the two coherent, and an `fdatasync` on either makes
//! both durable.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use basalt_core::{BoxFuture, IoBuf};
use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::{DiskEngine, DiskError, EngineKind, ReadResult, Segment, check_aligned, segment_parts};

const RING_ENTRIES: u32 = 256;
/// `user_data` of the no-op that tells the reaper to exit.
const SHUTDOWN_TOKEN: u64 = u64::MAX;

enum OpKind {
    Read {
        buf: IoBuf,
        done: oneshot::Sender<ReadResult>,
    },
    Write {
        _segments: Vec<Segment>,
        done: oneshot::Sender<Result<(), DiskError>>,
        /// Through the buffered descriptor (the page cache) where the
        /// engine has one (see `Shared::sqe_for`), else `O_DIRECT`.
        cached: bool,
    },
    Sync {
        done: oneshot::Sender<Result<(), DiskError>>,
    },
}

struct Op {
    kind: OpKind,
    /// Disk offset of the first byte not yet transferred.
    offset: u64,
    /// iovecs describing the bytes not yet transferred (empty for sync).
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the raw pointers inside `iovecs` point into buffers owned by the same
// Op (`buf` or `_segments`), which travel with it.
unsafe impl Send for Op {}

struct Shared {
    ring: IoUring,
    /// In-flight operations indexed by `user_data`; the mutex also serialises
    /// every access to the submission queue.
    ops: Mutex<Slab>,
    file: File,
    /// The same file opened without `O_DIRECT` (and without the lock or
    /// exclusive claim, which go with the engine), for cached writes; kept
    /// here so that it outlives every operation that names it.
    cached: Option<File>,
}

#[derive(Default)]
struct Slab {
    entries: Vec<Option<Op>>,
    free: Vec<usize>,
}

impl Slab {
    fn insert(&mut self, op: Op) -> usize {
        if let Some(index) = self.free.pop() {
            self.entries[index] = Some(op);
            index
        } else {
            self.entries.push(Some(op));
            self.entries.len() - 1
        }
    }

    fn in_flight(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    fn take(&mut self, index: usize) -> Option<Op> {
        let op = self.entries.get_mut(index)?.take();
        if op.is_some() {
            self.free.push(index);
        }
        op
    }
}

/// io_uring engine over one `O_DIRECT` file descriptor.
pub struct UringEngine {
    shared: Arc<Shared>,
    size: u64,
    /// The buffered descriptor: keeps the flock alive and serves fallocate.
    buffered: Option<Arc<File>>,
}

impl UringEngine {
    /// Starts an engine on `file`, which should be opened with `O_DIRECT`;
    /// `lock_holder` is kept (and closed) with the engine, `cached` (the
    /// file opened without `O_DIRECT`) serves cached writes, which without
    /// it are written direct. Must be called within a tokio runtime, which
    /// will reap completions.
    pub fn new(
        file: File,
        size: u64,
        lock_holder: Option<File>,
        cached: Option<File>,
    ) -> Result<UringEngine, DiskError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| DiskError::Uring(std::io::Error::other(e.to_string())))?;
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 16)
            .build(RING_ENTRIES)
            .map_err(DiskError::Uring)?;
        // SAFETY: eventfd has no memory effects; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(DiskError::Uring(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter()
            .register_eventfd(raw)
            .map_err(DiskError::Uring)?;
        let notifier = {
            let _entered = runtime.enter();
            // SAFETY: EventFd owns the descriptor and always returns it from
            // as_raw_fd; it stays open until the AsyncFd (which owns the
            // EventFd) is dropped.
            unsafe { tokio::io::unix::AsyncFd::register(EventFd(eventfd)) }
                .map_err(|e| DiskError::Uring(std::io::Error::other(e.to_string())))?
        };

        let shared = Arc::new(Shared {
            ring,
            ops: Mutex::new(Slab::default()),
            file,
            cached,
        });
        runtime.spawn(reap(shared.clone(), notifier));
        Ok(UringEngine {
            shared,
            size,
            buffered: lock_holder.map(Arc::new),
        })
    }

    /// Validates a write and builds its op and completion channel.
    fn write_op(
        &self,
        offset: u64,
        segments: Vec<Segment>,
        cached: bool,
    ) -> Result<(Op, oneshot::Receiver<Result<(), DiskError>>), DiskError> {
        let total: u64 = segments.iter().map(|s| s.len as u64).sum();
        check_aligned(offset, segment_parts(&segments))?;
        self.check_range(offset, total)?;
        let (done, wait) = oneshot::channel();
        let iovecs = segments
            .iter()
            .map(|s| libc::iovec {
                // SAFETY: start + len <= buffer length was checked above, so the
                // pointer stays inside the buffer.
                iov_base: unsafe { s.buf.as_ptr().add(s.start) } as *mut libc::c_void,
                iov_len: s.len,
            })
            .collect();
        let op = Op {
            kind: OpKind::Write {
                _segments: segments,
                done,
                cached,
            },
            offset,
            iovecs,
        };
        Ok((op, wait))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Submits one write, direct or `cached` (through the buffered descriptor).
    fn write(
        &self,
        offset: u64,
        segments: Vec<Segment>,
        cached: bool,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        let (op, wait) = match self.write_op(offset, segments, cached) {
            Ok(prepared) => prepared,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let shared = self.shared.clone();
        Box::pin(async move {
            if let Err((_, error)) = shared.submit(op) {
                return Err(DiskError::from_io(offset, error));
            }
            wait.await.unwrap_or(Err(DiskError::EngineGone))
        })
    }
}

impl Shared {
    /// Builds the SQE for `op` as it stands (remaining bytes at `op.offset`).
    fn sqe_for(&self, op: &Op, token: u64) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        match &op.kind {
            OpKind::Sync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(token),
            OpKind::Read { .. } => {
                opcode::Readv::new(fd, op.iovecs.as_ptr(), op.iovecs.len() as u32)
                    .offset(op.offset)
                    .build()
                    .user_data(token)
            }
            OpKind::Write { cached, .. } => {
                let fd = match (&self.cached, cached) {
                    (Some(file), true) => types::Fd(file.as_raw_fd()),
                    _ => fd,
                };
                opcode::Writev::new(fd, op.iovecs.as_ptr(), op.iovecs.len() as u32)
                    .offset(op.offset)
                    .build()
                    .user_data(token)
            }
        }
    }

    /// Queues `op` and enters the kernel. On failure the op is handed back.
    fn submit(&self, op: Op) -> Result<(), (Op, std::io::Error)> {
        let mut slab = self.ops.lock();
        let token = slab.insert(op);
        let Some(entry) = slab.entries[token]
            .as_ref()
            .map(|op| self.sqe_for(op, token as u64))
        else {
            unreachable!("slab entry was just inserted")
        };
        if let Err(error) = self.push_and_enter(&entry) {
            let op = slab.take(token);
            return match op {
                Some(op) => Err((op, error)),
                None => unreachable!("slab entry vanished under the lock"),
            };
        }
        Ok(())
    }

    /// Queues many ops and enters the kernel once (more often only when the
    /// submission queue fills up), so the block layer sees them together.
    fn submit_many(&self, ops: Vec<Op>) -> Vec<Result<(), (Op, std::io::Error)>> {
        let mut slab = self.ops.lock();
        let mut results = Vec::with_capacity(ops.len());
        let mut queued = 0usize;
        for op in ops {
            let token = slab.insert(op);
            let Some(entry) = slab.entries[token]
                .as_ref()
                .map(|op| self.sqe_for(op, token as u64))
            else {
                unreachable!("slab entry was just inserted")
            };
            match self.push(&entry) {
                Ok(()) => {
                    queued += 1;
                    results.push(Ok(()));
                }
                Err(error) => match slab.take(token) {
                    Some(op) => results.push(Err((op, error))),
                    None => unreachable!("slab entry vanished under the lock"),
                },
            }
        }
        if queued > 0
            && let Err(error) = self.enter_submit()
        {
            // The entries stay queued in the ring (their buffers stay
            // alive in the slab) and go out with the next submission.
            tracing::error!(%error, "io_uring submission failed; will retry with the next one");
        }
        results
    }

    /// Pushes one SQE, entering the kernel first if the queue is full.
    /// Caller holds the `ops` lock.
    fn push(&self, entry: &squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: the `ops` mutex (held by the caller) serialises every
            // producer of the submission queue; the reaper never touches it.
            let pushed = unsafe {
                let mut sq = self.ring.submission_shared();
                // SAFETY: the SQE's pointers (iovecs and buffers) live in the Op
                // stored in the slab until its completion is reaped.
                sq.push(entry).is_ok()
            };
            if pushed {
                return Ok(());
            }
            self.enter_submit()?;
        }
    }

    /// Pushes one SQE and submits. Caller holds the `ops` lock.
    fn push_and_enter(&self, entry: &squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: the `ops` mutex (held by the caller) serialises every
            // producer of the submission queue; the reaper never touches it.
            let pushed = unsafe {
                let mut sq = self.ring.submission_shared();
                // SAFETY: the SQE's pointers (iovecs and buffers) live in the Op
                // stored in the slab until its completion is reaped.
                sq.push(entry).is_ok()
            };
            if pushed {
                break;
            }
            // Queue full: hand what is queued to the kernel and retry.
            self.enter_submit()?;
        }
        self.enter_submit()
    }

    fn enter_submit(&self) -> std::io::Result<()> {
        loop {
            match self.ring.submitter().submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The eventfd the ring signals on every completion.
struct EventFd(OwnedFd);

impl std::os::fd::AsRawFd for EventFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl EventFd {
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Resets the counter (the descriptor is non-blocking).
    fn drain(&self) {
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid local buffer.
        let _ = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd()),
                counter.as_mut_ptr().cast(),
                8,
            )
        };
    }
}

/// Writes all of `op` (a write) to `file` with `pwritev` on this thread.
/// The op's completion channel is dropped unused: the caller has the result.
fn write_all_now(file: &File, mut op: Op) -> Result<(), DiskError> {
    /// Most iovecs one `pwritev` takes (Linux's `UIO_MAXIOV`).
    const MAX_IOVECS: usize = 1024;
    while !op.iovecs.is_empty() {
        let count = op.iovecs.len().min(MAX_IOVECS);
        let at = libc::off_t::try_from(op.offset).map_err(|_| DiskError::OutOfRange {
            offset: op.offset,
            len: 0,
            size: i64::MAX as u64,
        })?;
        // SAFETY: the iovecs point into the op's own buffers (its segments),
        // which it keeps alive for the call; `count` of them are valid, and
        // `count` fits a c_int (at most 1024).
        let written = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                op.iovecs.as_ptr(),
                count as libc::c_int,
                at,
            )
        };
        if written < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DiskError::from_io(op.offset, error));
        }
        if written == 0 {
            return Err(DiskError::from_io(
                op.offset,
                std::io::Error::from(std::io::ErrorKind::WriteZero),
            ));
        }
        // A short write (or the first 1024 iovecs of more): go on after
        // the bytes the kernel took.
        advance(&mut op, written as usize);
    }
    Ok(())
}

/// The reaper task: waits for the ring's eventfd and finishes operations.
/// After the shutdown token it keeps reaping until no operation is in flight,
/// so no buffer is freed while the kernel may still touch it.
async fn reap(shared: Arc<Shared>, notifier: tokio::io::unix::AsyncFd<EventFd>) {
    let mut shutting_down = false;
    loop {
        if shutting_down && shared.ops.lock().in_flight() == 0 {
            return;
        }
        let mut ready = match notifier.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                tracing::error!(error = %e, "io_uring completion wait failed; disk engine stops");
                abandon_all(&shared);
                return;
            }
        };
        // Reset the counter before draining the queue: a completion posted
        // after this point signals the eventfd again.
        notifier.get_ref().drain();
        ready.clear_ready();
        loop {
            let mut completions = Vec::new();
            {
                // SAFETY: only this task reads the completion queue.
                let cq = unsafe { shared.ring.completion_shared() };
                for cqe in cq {
                    completions.push((cqe.user_data(), cqe.result()));
                }
            }
            if completions.is_empty() {
                // Completions that found the queue full wait in the kernel's
                // overflow list and signal nothing; an enter with GETEVENTS
                // (which `submit` adds when the overflow flag is set) moves
                // them into the queue.
                let overflowed = {
                    let _guard = shared.ops.lock();
                    // SAFETY: the `ops` lock serialises access to the
                    // submission queue, which is only read here.
                    let overflow = unsafe { shared.ring.submission_shared() }.cq_overflow();
                    if overflow && let Err(e) = shared.enter_submit() {
                        tracing::warn!(error = %e, "flushing io_uring completion overflow failed");
                    }
                    overflow
                };
                if overflowed {
                    continue;
                }
                break;
            }
            for (token, result) in completions {
                if token == SHUTDOWN_TOKEN {
                    shutting_down = true;
                    continue;
                }
                let Some(op) = shared.ops.lock().take(token as usize) else {
                    tracing::error!(token, "completion for an unknown io_uring operation");
                    continue;
                };
                complete(&shared, op, result);
            }
        }
    }
}

fn complete(shared: &Shared, mut op: Op, result: i32) {
    if result < 0 {
        let error = DiskError::from_io(op.offset, std::io::Error::from_raw_os_error(-result));
        finish(op, Err(error));
        return;
    }
    let transferred = result as usize;
    let remaining: usize = op.iovecs.iter().map(|iov| iov.iov_len).sum();
    if matches!(op.kind, OpKind::Sync { .. }) || transferred >= remaining {
        finish(op, Ok(()));
        return;
    }
    if transferred == 0 {
        let error = DiskError::Io {
            offset: op.offset,
            source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "zero-length transfer"),
        };
        finish(op, Err(error));
        return;
    }
    // Short transfer: advance the iovecs and resubmit the remainder.
    advance(&mut op, transferred);
    if let Err((op, error)) = shared.submit(op) {
        finish(op, Err(DiskError::from_io(0, error)));
    }
}

/// Moves `op` past its first `transferred` bytes: the offset, and the
/// iovecs (those done dropped, a partly done one shortened).
fn advance(op: &mut Op, transferred: usize) {
    op.offset += transferred as u64;
    let mut skip = transferred;
    let mut rest = Vec::with_capacity(op.iovecs.len());
    for iov in &op.iovecs {
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        rest.push(libc::iovec {
            // SAFETY: skip < iov_len, so the pointer stays inside the same buffer.
            iov_base: unsafe { iov.iov_base.cast::<u8>().add(skip) }.cast(),
            iov_len: iov.iov_len - skip,
        });
        skip = 0;
    }
    op.iovecs = rest;
}

fn finish(op: Op, result: Result<(), DiskError>) {
    match op.kind {
        OpKind::Read { buf, done } => {
            let _ = done.send((buf, result));
        }
        OpKind::Write { done, .. } | OpKind::Sync { done } => {
            let _ = done.send(result);
        }
    }
}

/// Fails every in-flight operation after the ring itself broke. The kernel may
/// still own their buffers, so the buffers are leaked rather than freed.
fn abandon_all(shared: &Shared) {
    let mut slab = shared.ops.lock();
    let count = slab.entries.len();
    for index in 0..count {
        let Some(op) = slab.take(index) else { continue };
        match op.kind {
            OpKind::Read { buf, done } => {
                let len = buf.len();
                std::mem::forget(buf);
                let _ = done.send((IoBuf::zeroed(len), Err(DiskError::EngineGone)));
            }
            OpKind::Write {
                _segments, done, ..
            } => {
                std::mem::forget(_segments);
                let _ = done.send(Err(DiskError::EngineGone));
            }
            OpKind::Sync { done } => {
                let _ = done.send(Err(DiskError::EngineGone));
            }
        }
        std::mem::forget(op.iovecs);
    }
}

impl DiskEngine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<'static, ReadResult> {
        let len = buf.len();
        if let Err(e) = check_aligned(offset, [(0, len, len)])
            .and_then(|_| self.check_range(offset, len as u64))
        {
            return Box::pin(async move { (buf, Err(e)) });
        }
        let (done, wait) = oneshot::channel();
        let iovecs = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        }];
        let op = Op {
            kind: OpKind::Read { buf, done },
            offset,
            iovecs,
        };
        let shared = self.shared.clone();
        Box::pin(async move {
            if let Err((op, error)) = shared.submit(op) {
                return match op.kind {
                    OpKind::Read { buf, .. } => (buf, Err(DiskError::from_io(offset, error))),
                    _ => unreachable!("read op changed kind"),
                };
            }
            match wait.await {
                Ok(result) => result,
                Err(_) => (IoBuf::zeroed(len), Err(DiskError::EngineGone)),
            }
        })
    }

    fn write_at(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        self.write(offset, segments, false)
    }

    fn write_at_cached(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        self.write(offset, segments, true)
    }

    fn write_at_cached_inline(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        let Some(file) = self.shared.cached.as_ref() else {
            return self.write(offset, segments, true);
        };
        let result = self
            .write_op(offset, segments, true)
            .and_then(|(op, _done)| write_all_now(file, op));
        Box::pin(std::future::ready(result))
    }

    fn write_batch(
        &self,
        writes: Vec<(u64, Vec<Segment>)>,
    ) -> BoxFuture<'static, Vec<Result<(), DiskError>>> {
        let mut waits = Vec::with_capacity(writes.len());
        let mut ops = Vec::with_capacity(writes.len());
        for (offset, segments) in writes {
            match self.write_op(offset, segments, false) {
                Ok((op, wait)) => {
                    ops.push(op);
                    waits.push(Ok((offset, wait)));
                }
                Err(e) => waits.push(Err(e)),
            }
        }
        let submitted = self.shared.submit_many(ops);
        Box::pin(async move {
            let mut submitted = submitted.into_iter();
            let mut out = Vec::with_capacity(waits.len());
            for wait in waits {
                out.push(match wait {
                    Err(e) => Err(e),
                    Ok((offset, wait)) => match submitted.next() {
                        Some(Err((_, error))) => Err(DiskError::from_io(offset, error)),
                        _ => wait.await.unwrap_or(Err(DiskError::EngineGone)),
                    },
                });
            }
            out
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<(), DiskError>> {
        match &self.buffered {
            Some(file) => Box::pin(crate::open::fallocate(file.clone(), offset, len)),
            None => Box::pin(async { Ok(()) }),
        }
    }

    fn sync(&self) -> BoxFuture<'static, Result<(), DiskError>> {
        let (done, wait) = oneshot::channel();
        let op = Op {
            kind: OpKind::Sync { done },
            offset: 0,
            iovecs: Vec::new(),
        };
        let shared = self.shared.clone();
        Box::pin(async move {
            if let Err((_, error)) = shared.submit(op) {
                return Err(DiskError::from_io(0, error));
            }
            wait.await.unwrap_or(Err(DiskError::EngineGone))
        })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Tell the reaper to finish once nothing is in flight; it owns the
        // ring (through `Shared`) until then.
        let nop = opcode::Nop::new().build().user_data(SHUTDOWN_TOKEN);
        let _guard = self.shared.ops.lock();
        if let Err(e) = self.shared.push_and_enter(&nop) {
            tracing::warn!(error = %e, "could not signal the io_uring reaper to stop");
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Only reached when the reaper is gone. If the runtime stopped with
        // operations in flight, the kernel may still write into their
        // buffers while the ring is torn down: leak them rather than free.
        let slab = std::mem::take(self.ops.get_mut());
        for op in slab.entries.into_iter().flatten() {
            std::mem::forget(op);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EngineChoice, open_disk};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_round_trip_many_in_flight() {
        // /var/tmp is disk-backed on these machines; tmpfs would refuse O_DIRECT.
        let dir =
            tempfile::tempdir_in(std::env::var("BASALT_TEST_DIR").unwrap_or("/var/tmp".into()))
                .expect("tempdir");
        let disk =
            open_disk(&dir.path().join("d"), Some(64 << 20), EngineChoice::Auto).expect("open");
        let engine = disk.engine.clone();
        let mut tasks = Vec::new();
        for i in 0..512u64 {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let data = IoBuf::from_slice(&[(i % 251) as u8; 8192]);
                engine
                    .write_at(i * 8192, vec![Segment::whole(Arc::new(data))])
                    .await
                    .expect("write");
            }));
        }
        for t in tasks {
            t.await.expect("join");
        }
        engine.sync().await.expect("sync");
        for i in (0..512u64).step_by(7) {
            let (buf, result) = engine.read_at(i * 8192, IoBuf::zeroed(8192)).await;
            result.expect("read");
            assert!(buf.as_slice().iter().all(|&b| b == (i % 251) as u8));
        }
        let (_, result) = engine.read_at(64 << 20, IoBuf::zeroed(4096)).await;
        assert!(matches!(result, Err(DiskError::OutOfRange { .. })));
        let (_, result) = engine.read_at(1, IoBuf::zeroed(4096)).await;
        assert!(matches!(result, Err(DiskError::Unaligned { .. })));
    }

    /// A cached write is read back at once by a direct read, overwrites
    /// what a direct write put there (and is overwritten by the next one),
    /// and is still there when the disk is opened again without a sync (as
    /// after a crash of the process), and after one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_writes_are_coherent_with_direct_io_and_outlive_the_engine() {
        let dir =
            tempfile::tempdir_in(std::env::var("BASALT_TEST_DIR").unwrap_or("/var/tmp".into()))
                .expect("tempdir");
        let path = dir.path().join("d");
        let fill =
            |byte: u8, len: usize| Segment::whole(Arc::new(IoBuf::from_slice(&vec![byte; len])));
        let read = |engine: Arc<dyn DiskEngine>, offset: u64| async move {
            let (buf, result) = engine.read_at(offset, IoBuf::zeroed(8192)).await;
            result.expect("read");
            buf.as_slice().to_vec()
        };
        {
            let disk = open_disk(&path, Some(64 << 20), EngineChoice::Auto).expect("open");
            assert_eq!(
                disk.engine.kind(),
                EngineKind::Uring,
                "the test needs O_DIRECT"
            );
            let engine = disk.engine.clone();
            engine
                .write_at(0, vec![fill(1, 8192)])
                .await
                .expect("direct write");
            engine
                .write_at_cached(4096, vec![fill(2, 4096), fill(3, 4096)])
                .await
                .expect("cached write");
            let mut expected = vec![1u8; 4096];
            expected.extend([2u8; 4096]);
            assert_eq!(read(engine.clone(), 0).await, expected);
            assert_eq!(read(engine.clone(), 8192).await[..4096], [3u8; 4096]);
            engine
                .write_at(8192, vec![fill(4, 4096)])
                .await
                .expect("direct over cached");
            assert_eq!(read(engine.clone(), 8192).await[..4096], [4u8; 4096]);
            let (_, result) = engine.read_at(64 << 20, IoBuf::zeroed(4096)).await;
            assert!(matches!(result, Err(DiskError::OutOfRange { .. })));
            let out_of_range = engine.write_at_cached(64 << 20, vec![fill(5, 4096)]).await;
            assert!(matches!(out_of_range, Err(DiskError::OutOfRange { .. })));

            // Inline: done when the call returns, more iovecs than one
            // pwritev takes, coherent with direct reads; refused out of range.
            let many: Vec<Segment> = (0..1100u32).map(|i| fill((i % 251) as u8, 4096)).collect();
            let inline = engine.write_at_cached_inline(1 << 20, many);
            let inline = futures::FutureExt::now_or_never(inline).expect("inline write is done");
            inline.expect("inline write");
            for i in [0u32, 1023, 1024, 1099] {
                let at = (1 << 20) + u64::from(i) * 4096;
                assert_eq!(
                    read(engine.clone(), at).await[..4096],
                    [(i % 251) as u8; 4096]
                );
            }
            let out_of_range = engine
                .write_at_cached_inline((64 << 20) - 4096, vec![fill(6, 8192)])
                .await;
            assert!(matches!(out_of_range, Err(DiskError::OutOfRange { .. })));
            assert_eq!(
                read(engine.clone(), (64 << 20) - 8192).await,
                vec![0u8; 8192]
            );
        }
        let disk = open_disk(&path, None, EngineChoice::Auto).expect("reopen");
        let engine = disk.engine.clone();
        let mut expected = vec![1u8; 4096];
        expected.extend([2u8; 4096]);
        assert_eq!(read(engine.clone(), 0).await, expected);
        engine.sync().await.expect("sync");
        assert_eq!(read(engine.clone(), 8192).await[..4096], [4u8; 4096]);
        assert_eq!(
            read(engine.clone(), (1 << 20) + 1099 * 4096).await[..4096],
            [(1099 % 251) as u8; 4096]
        );
    }
}

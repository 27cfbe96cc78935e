//! io_uring engine with `O_DIRECT`.
//!
//! Submitters push SQEs under a mutex and call `io_uring_enter` themselves, so
//! a submission costs one syscall and no thread hop. One reaper thread per
//! disk blocks in `io_uring_enter(GETEVENTS)` and completes the waiting
//! futures. Short transfers (rare on regular files) are resubmitted for the
//! remainder by the reaper.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use basalt_core::{BoxFuture, IoBuf};
use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::{DiskEngine, DiskError, EngineKind, ReadResult, Segment, check_aligned, segment_parts};

const RING_ENTRIES: u32 = 256;
/// `user_data` of the no-op that tells the reaper to exit.
const SHUTDOWN_TOKEN: u64 = u64::MAX;
/// `IORING_ENTER_GETEVENTS` from the kernel ABI.
const ENTER_GETEVENTS: u32 = 1;

enum OpKind {
    Read {
        buf: IoBuf,
        done: oneshot::Sender<ReadResult>,
    },
    Write {
        _segments: Vec<Segment>,
        done: oneshot::Sender<Result<(), DiskError>>,
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
    reaper: Option<JoinHandle<()>>,
    /// The buffered descriptor: keeps the flock alive and serves fallocate.
    buffered: Option<Arc<File>>,
}

impl UringEngine {
    /// Starts an engine on `file`, which should be opened with `O_DIRECT`.
    pub fn new(file: File, size: u64, lock_holder: Option<File>) -> Result<UringEngine, DiskError> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .build(RING_ENTRIES)
            .map_err(DiskError::Uring)?;
        let shared = Arc::new(Shared {
            ring,
            ops: Mutex::new(Slab::default()),
            file,
        });
        let reaper_shared = shared.clone();
        let reaper = std::thread::Builder::new()
            .name("basalt-uring".into())
            .spawn(move || reap(&reaper_shared))
            .map_err(DiskError::Uring)?;
        Ok(UringEngine {
            shared,
            size,
            reaper: Some(reaper),
            buffered: lock_holder.map(Arc::new),
        })
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
            OpKind::Write { .. } => {
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

/// The reaper thread: waits for completions and finishes operations. After
/// the shutdown token it keeps reaping until no operation is in flight, so no
/// buffer is freed while the kernel may still touch it.
fn reap(shared: &Shared) {
    let mut shutting_down = false;
    loop {
        if shutting_down && shared.ops.lock().in_flight() == 0 {
            return;
        }
        // SAFETY: a plain GETEVENTS wait with no argument; to_submit is 0 so
        // the submission queue (owned by submitters) is not touched.
        let waited = unsafe {
            shared
                .ring
                .submitter()
                .enter::<libc::sigset_t>(0, 1, ENTER_GETEVENTS, None)
        };
        if let Err(e) = waited {
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!(error = %e, "io_uring wait failed; disk engine stops");
            abandon_all(shared);
            return;
        }
        let mut completions = Vec::new();
        {
            // SAFETY: only this thread reads the completion queue.
            let cq = unsafe { shared.ring.completion_shared() };
            for cqe in cq {
                completions.push((cqe.user_data(), cqe.result()));
            }
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
            complete(shared, op, result);
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
    if let Err((op, error)) = shared.submit(op) {
        finish(op, Err(DiskError::from_io(0, error)));
    }
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
            OpKind::Write { _segments, done } => {
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
        let total: u64 = segments.iter().map(|s| s.len as u64).sum();
        if let Err(e) = check_aligned(offset, segment_parts(&segments))
            .and_then(|_| self.check_range(offset, total))
        {
            return Box::pin(async move { Err(e) });
        }
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
            },
            offset,
            iovecs,
        };
        let shared = self.shared.clone();
        Box::pin(async move {
            if let Err((_, error)) = shared.submit(op) {
                return Err(DiskError::from_io(offset, error));
            }
            wait.await.unwrap_or(Err(DiskError::EngineGone))
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
        let nop = opcode::Nop::new().build().user_data(SHUTDOWN_TOKEN);
        let pushed = {
            let _guard = self.shared.ops.lock();
            self.shared.push_and_enter(&nop)
        };
        if pushed.is_ok()
            && let Some(reaper) = self.reaper.take()
        {
            let _ = reaper.join();
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
}

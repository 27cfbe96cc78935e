//! One frontend connection: the virtio-blk device behind a vhost-user socket.
//!
//! # Threads and the life of a request
//!
//! ```text
//!  vring worker thread (epoll; queue q is served by thread q % threads)
//!  ─────────────────────────────────────────────────────────────────────
//!  kick ─▶ pop every available chain (vring lock); number them in order
//!        ─▶ per chain: walk descriptors, frame, read header, classify
//!           (request.rs, pure)
//!        ─▶ malformed / GET_ID / empty: answer now
//!        ─▶ otherwise a job: poll its future once, right here
//!              call the backend; it copies OUT data from guest memory
//!              as it takes it (a whole extent piece by piece, each piece
//!              on its way to the disk while the next is copied)
//!              ├─ ready at once: finish here
//!              └─ pending: hand the future to the tokio runtime ──┐
//!        ─▶ end of batch: one guest notification for all        │
//!           requests finished here                               │
//!                                                                ▼
//!                         tokio worker: backend completes ─▶ finish
//!  finish: copy IN data + status into guest memory; add_used (vring lock)
//!          for it and every answer it was holding back (in the order taken),
//!          signal the guest unless EVENT_IDX suppresses it,
//!          start jobs parked by the byte budget
//! ```
//!
//! Requests run concurrently: a queue has as many requests in flight as the
//! guest posts (up to the queue size); the backend completes them in any
//! order and on any thread. Polling each job once on the worker thread before
//! handing it to the runtime means a request reaches the backend without waiting for
//! a runtime thread to wake up, and a backend that answers at once (a cache
//! hit) completes it with no thread hand-off at all, the way
//! qemu-storage-daemon's coroutines do. Only the byte volume is bounded: past
//! [`VhostBlkOptions::max_inflight_bytes`] per queue, parsed requests wait in a
//! FIFO until earlier ones complete.
//!
//! # Answers in order
//!
//! Answers enter the used ring in the order their requests were taken off
//! the available ring; an answer that is ready before an earlier request's
//! waits for it (its data and status are already in guest memory). The price
//! is a little head-of-line latency under mixed load. What it buys: when
//! basaltd dies without a word (`kill -9`, a crash), QEMU cannot ask where the
//! ring stood (`GET_VRING_BASE` fails on the dead socket) and restarts the
//! ring at the used index it reads from guest memory. With answers in order,
//! that index is exactly the first unanswered request: the restarted
//! basaltd takes every unanswered request again and nothing answered twice.
//! With answers out of order, a request taken before an answered one would
//! never be offered again (the guest waits for it forever) and an answered
//! one would be answered twice (the guest's driver could complete a
//! different request that reused its tag). `INFLIGHT_SHMFD` would solve the
//! same problem for out-of-order answers; vhost-user-backend does not
//! support it.
//!
//! # Stopping a queue
//!
//! `GET_VRING_BASE` (the frontend stops the ring: VM pause, migration, reset)
//! must not return while requests of that ring are still in flight, or their
//! completions would land in a ring the frontend considers stopped. `stop_vring`
//! therefore waits for the queue to drain, up to
//! [`VhostBlkOptions::drain_timeout`]. If the backend does not answer in time,
//! the queue's *generation* is raised: late completions of the abandoned
//! requests then touch neither guest memory nor the ring.
//!
//! # Dirty-page logging
//!
//! Guest memory is mapped with [`BitmapMmapRegion`] bitmaps: once the frontend
//! sends `VHOST_USER_SET_LOG_BASE` (live migration), every write this device
//! makes to guest memory through `vm-memory` (IN data, status bytes, used ring)
//! sets the page's bit in the frontend's log. Nothing here writes guest memory
//! any other way.
//!
//! Lock order: vring lock, then queue state lock. `stop_vring` only takes the
//! state lock (and waits on its condition variable).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use basalt_core::{BlockBackend, BlockError, IoBuf, WriteFlags, WriteSource};
use parking_lot::{Condvar, Mutex};
use tokio::runtime::Handle;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::cache::WriteCache;
use crate::config::{
    self, BlkConfig, DISCARD_ALIGNMENT_SECTORS, MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS,
    WRITEBACK_OFFSET,
};
use crate::export::{SharedStats, VhostBlkOptions};
use crate::request::{
    self, ChainLayout, DeviceLimits, Frame, FrameError, Header, Op, RangeKind, SECTOR_SIZE,
    Segment, Status,
};

/// Dirty-page bitmap of guest memory: a no-op until the frontend sends
/// `VHOST_USER_SET_LOG_BASE` (live migration), then every guest page the
/// device writes is marked in the frontend's log.
pub(crate) type Bitmap = BitmapMmapRegion;
/// Guest memory as mapped from the frontend's memory table.
pub(crate) type GuestMem = GuestMemoryMmap<Bitmap>;
/// Guest memory that the frontend may replace at any time.
pub(crate) type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// A virtqueue and its notification file descriptors.
pub(crate) type Vring = VringRwLock<GuestMemAtomic>;

/// Most descriptors accepted in one chain: far above what a driver that
/// honours `seg_max` produces, low enough to bound the memory of a request.
pub(crate) const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Data segments advertised per request (`seg_max`) by default. Linux needs
/// 256 to send a 1 MiB write of scattered 4 KiB pages as one request (with
/// 254 it splits it into 1016 KiB + 8 KiB, and neither half is a whole
/// extent).
pub(crate) const MAX_SEGMENTS: u32 = 256;

/// Largest `seg_max * size_max` advertised, in bytes. SeaBIOS computes the
/// largest request in 512-byte sectors as a 16-bit number: 32 MiB wraps to
/// zero, and its virtio-blk driver then loops forever on the first read
/// (Linux's boot code reads every BIOS disk's MBR). 16 MiB stays clear.
const MAX_ADVERTISED_REQUEST: u32 = 16 << 20;

/// How many malformed-request warnings one connection logs before going quiet.
const WARNING_BUDGET: u64 = 16;

/// Counters and parked work of one queue.
#[derive(Default)]
struct QueueState {
    /// Raised when `stop_vring` gives up on in-flight requests.
    generation: u64,
    /// Completions currently writing into guest memory.
    copying: usize,
    /// Data bytes of running jobs.
    inflight_bytes: u64,
    /// Jobs waiting for the byte budget, in arrival order.
    pending: VecDeque<Job>,
    /// A worker thread is processing a batch of this queue: completions only
    /// mark `signal_pending`, and the worker signals once at the end.
    batching: bool,
    /// Used entries were added while batching.
    signal_pending: bool,
    /// Sequence number of the next chain taken off the ring.
    next_seq: u64,
    /// Sequence number of the next answer to enter the used ring.
    next_published: u64,
    /// Answers waiting for an earlier request's (sequence number → head and
    /// used length): see "Answers in order" in the module documentation.
    held: BTreeMap<u64, (u16, u32)>,
}

impl QueueState {
    /// Chains taken off the ring and not yet returned to the guest
    /// (including `pending` and `held`).
    fn inflight(&self) -> u64 {
        self.next_seq - self.next_published
    }
}

#[derive(Default)]
struct QueueShared {
    state: Mutex<QueueState>,
    /// Signalled when `inflight` or `copying` drops to zero.
    idle: Condvar,
}

/// Where a request's answer goes.
struct Slot {
    queue: usize,
    head: u16,
    generation: u64,
    /// Position in the order the queue's chains were taken.
    seq: u64,
    vring: Vring,
    mem: Arc<GuestMem>,
    /// When the chain was taken off the available ring.
    taken: Instant,
}

/// A parsed request waiting for, or running on, the backend.
struct Job {
    slot: Slot,
    frame: Frame,
    op: Op,
    /// Data bytes counted against the queue's in-flight budget (its
    /// followers' included).
    budget: u64,
    /// Writes that continue this one, popped in the same batch: written
    /// with it as one backend write, answered with its status.
    followers: Vec<Job>,
}

/// Largest write that adjacent requests are merged into.
const MERGE_LIMIT: u64 = 4 << 20;

/// Merges writes that continue each other (in the order popped) into one
/// job. A guest may split a large write into pieces of at most `seg_max`
/// pages, dispatched together (Linux did so with 1016 KiB + 8 KiB while
/// `seg_max` was 254); merged, they reach the store as the whole-extent
/// write they were, which it writes copy-on-write instead of through its
/// write log.
fn merge_adjacent_writes(jobs: Vec<Job>) -> Vec<Job> {
    let mut merged: Vec<Job> = Vec::with_capacity(jobs.len());
    for job in jobs {
        if let (Some(head), Op::Write { offset, len }) = (merged.last_mut(), job.op)
            && let Op::Write {
                offset: head_offset,
                ..
            } = head.op
        {
            // `budget` is the head's length plus its followers'.
            if head_offset + head.budget == offset && head.budget + u64::from(len) <= MERGE_LIMIT {
                head.budget += u64::from(len);
                head.followers.push(job);
                continue;
            }
        }
        merged.push(job);
    }
    merged
}

/// What to write back for a request.
enum Answer {
    /// Return the chain without writing anything (no status byte to write).
    Unanswered,
    /// Write this status byte.
    Status(u64, Status),
    /// Copy `data` into `segments`, then write `Status::Ok` (or `IoErr` if the
    /// copy fails).
    Data {
        status: u64,
        segments: Vec<Segment>,
        data: IoBuf,
    },
}

/// The virtio-blk device of one vhost-user connection.
pub(crate) struct Device {
    backend: Arc<dyn BlockBackend>,
    runtime: Handle,
    options: VhostBlkOptions,
    id: [u8; request::ID_LEN],
    mem: GuestMemAtomic,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    /// Set before a graceful stop: nothing more is taken off the rings, so
    /// that every request taken is answered before the frontend is
    /// disconnected (see [`Device::quiesce`]).
    quiesced: AtomicBool,
    /// The write-cache mode the guest chose, shared with the export's other
    /// connections (see [`crate::cache`]); the config space shows it.
    cache: Arc<WriteCache>,
    queues: Vec<QueueShared>,
    /// For each worker thread, the queue indices it serves, ascending.
    thread_queues: Vec<Vec<usize>>,
    stats: Arc<SharedStats>,
    warnings: AtomicU64,
}

/// The handle the vhost-user library holds (it needs `Clone`).
#[derive(Clone)]
pub(crate) struct DeviceHandle(pub(crate) Arc<Device>);

impl Device {
    pub(crate) fn new(
        backend: Arc<dyn BlockBackend>,
        runtime: Handle,
        options: VhostBlkOptions,
        mem: GuestMemAtomic,
        stats: Arc<SharedStats>,
        cache: Arc<WriteCache>,
    ) -> Device {
        let num_queues = usize::from(options.num_queues);
        let threads = options.effective_worker_threads();
        let thread_queues = (0..threads)
            .map(|t| (0..num_queues).filter(|q| q % threads == t).collect())
            .collect();
        Device {
            id: request::id_bytes(&backend.id()),
            backend,
            runtime,
            options,
            mem,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            quiesced: AtomicBool::new(false),
            cache,
            queues: (0..num_queues).map(|_| QueueShared::default()).collect(),
            thread_queues,
            stats,
            warnings: AtomicU64::new(0),
        }
    }

    /// Whether writes must be durable when answered: the guest chose
    /// write-through, or its driver cannot flush (SeaBIOS negotiates without
    /// `FLUSH`). That firmware negotiation leaves the guest's choice alone:
    /// the config space goes on showing it, as QEMU's copy of it does.
    fn write_through(&self) -> bool {
        self.cache.write_through() || !self.acked(VIRTIO_BLK_F_FLUSH)
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features.load(Ordering::Acquire) & config::bit(feature) != 0
    }

    fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            capacity: self.backend.size(),
            read_only: self.options.read_only,
            discard: self.acked(VIRTIO_BLK_F_DISCARD),
            write_zeroes: self.acked(VIRTIO_BLK_F_WRITE_ZEROES),
            max_transfer: basalt_core::MAX_REQUEST_BYTES,
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_segments: MAX_RANGE_SEGMENTS,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_segments: MAX_RANGE_SEGMENTS,
        }
    }

    /// The configuration space as the guest sees it now.
    pub(crate) fn blk_config(&self) -> BlkConfig {
        let seg_max = self
            .options
            .max_segments
            .min(u32::from(self.options.queue_size).saturating_sub(2).max(1));
        // seg_max * size_max stays within the largest request the backend
        // takes and within what SeaBIOS can count.
        let largest = basalt_core::MAX_REQUEST_BYTES.min(MAX_ADVERTISED_REQUEST);
        let size_max = (largest / seg_max) / 4096 * 4096;
        let blk_size = self.options.logical_block_size;
        let physical_block_exp = (basalt_core::BLOCK_SIZE as u32 / blk_size).trailing_zeros() as u8;
        BlkConfig {
            capacity_sectors: self.backend.size() / SECTOR_SIZE,
            size_max: size_max.max(4096),
            seg_max,
            blk_size,
            physical_block_exp,
            min_io_size: 1 << physical_block_exp,
            opt_io_size: 0,
            writeback: u8::from(!self.cache.write_through()),
            num_queues: self.options.num_queues,
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_seg: MAX_RANGE_SEGMENTS,
            discard_sector_alignment: DISCARD_ALIGNMENT_SECTORS,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_seg: MAX_RANGE_SEGMENTS,
            write_zeroes_may_unmap: 1,
        }
    }

    fn warn_guest(&self, queue: usize, what: &dyn std::fmt::Display) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        let n = self.warnings.fetch_add(1, Ordering::Relaxed);
        if n < WARNING_BUDGET {
            tracing::warn!(
                queue,
                "vhost-user-blk: malformed request from the guest: {what}"
            );
        } else if n == WARNING_BUDGET {
            tracing::warn!("vhost-user-blk: further malformed-request warnings suppressed");
        }
    }

    /// Pops and starts every available request of `queue`.
    fn process_queue(self: &Arc<Self>, queue: usize, vring: &Vring) {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        if self.quiesced.load(Ordering::Acquire) {
            // Left on the ring: after a reconnection the frontend resumes
            // from the last answered request and the next backend takes it.
            return;
        }
        let shared = &self.queues[queue];
        shared.state.lock().batching = true;
        let mut empty_rounds = 0;
        loop {
            let mem = self.mem.memory().into_inner();
            let (chains, generation, first_seq) = {
                let mut guard = vring.get_mut();
                if event_idx {
                    let _ = guard.get_queue_mut().disable_notification(&*mem);
                }
                let mut chains = Vec::new();
                while let Some(chain) = guard.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                    chains.push(chain);
                }
                let mut state = self.queues[queue].state.lock();
                let first_seq = state.next_seq;
                state.next_seq += chains.len() as u64;
                (chains, state.generation, first_seq)
            };
            let popped = chains.len();
            let mut jobs = Vec::new();
            for (seq, chain) in (first_seq..).zip(chains) {
                let slot = Slot {
                    queue,
                    head: chain.head_index(),
                    generation,
                    seq,
                    vring: vring.clone(),
                    mem: mem.clone(),
                    taken: Instant::now(),
                };
                if let Some(job) = self.start(slot, chain) {
                    jobs.push(job);
                }
            }
            self.submit(queue, merge_adjacent_writes(jobs));
            if !event_idx {
                break;
            }
            // Re-arm notifications; if the guest added requests meanwhile, go again.
            match vring.enable_notification() {
                Ok(true) if popped > 0 => empty_rounds = 0,
                // More is announced but nothing could be popped: a race with
                // the guest, or a broken avail ring. Retry a little, never spin.
                Ok(true) if empty_rounds < 2 => empty_rounds += 1,
                _ => break,
            }
        }
        // One notification for everything completed during the batch.
        let mut guard = vring.get_mut();
        let mut state = shared.state.lock();
        state.batching = false;
        if std::mem::take(&mut state.signal_pending) {
            notify_guest(&mut guard, queue);
        }
    }

    /// Parses one chain. Answers it at once when no backend call is needed;
    /// otherwise returns the job to run.
    fn start(self: &Arc<Self>, slot: Slot, chain: DescriptorChain<Arc<GuestMem>>) -> Option<Job> {
        let layout = match collect_layout(chain, &slot.mem) {
            Ok(layout) => layout,
            Err(why) => {
                self.warn_guest(slot.queue, &why);
                self.finish(slot, 0, Answer::Unanswered);
                return None;
            }
        };
        let frame = match request::frame(&layout) {
            Ok(frame) => frame,
            Err(FrameError::NoStatus) => {
                self.warn_guest(slot.queue, &FrameError::NoStatus);
                self.finish(slot, 0, Answer::Unanswered);
                return None;
            }
            Err(err @ FrameError::ShortHeader { status }) => {
                self.warn_guest(slot.queue, &err);
                self.finish(slot, 0, Answer::Status(status, Status::IoErr));
                return None;
            }
        };
        let mut header = [0u8; request::HEADER_LEN];
        if let Err(err) = gather(&slot.mem, &frame.header, &mut header) {
            self.warn_guest(slot.queue, &err);
            self.finish(slot, 0, Answer::Status(frame.status, Status::IoErr));
            return None;
        }
        let header = Header::from_bytes(&header);
        let op = match request::classify(&header, &frame, &self.limits()) {
            Ok(op) => op,
            Err(status) => {
                tracing::debug!(?header, ?status, "vhost-user-blk: request refused");
                self.finish(slot, 0, Answer::Status(frame.status, status));
                return None;
            }
        };
        match op {
            Op::GetId { len } => {
                let mut data = IoBuf::from_slice(&self.id);
                data.set_len(len as usize);
                let answer = Answer::Data {
                    status: frame.status,
                    segments: frame.in_data,
                    data,
                };
                self.finish(slot, 0, answer);
                None
            }
            Op::Read { len: 0, .. } | Op::Write { len: 0, .. } => {
                self.finish(slot, 0, Answer::Status(frame.status, Status::Ok));
                None
            }
            Op::Read { len, .. } | Op::Write { len, .. } => Some(Job {
                slot,
                frame,
                op,
                budget: u64::from(len),
                followers: Vec::new(),
            }),
            Op::Flush | Op::Discard { .. } | Op::WriteZeroes { .. } => Some(Job {
                slot,
                frame,
                op,
                budget: 0,
                followers: Vec::new(),
            }),
        }
    }

    /// Runs `jobs` now, or parks them while the queue is over its byte budget.
    fn submit(self: &Arc<Self>, queue: usize, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut run = Vec::with_capacity(jobs.len());
        {
            let mut state = self.queues[queue].state.lock();
            for job in jobs {
                if job.slot.generation != state.generation {
                    // Abandoned by stop_vring while being parsed.
                    continue;
                }
                if state.pending.is_empty() && self.fits(&state, job.budget) {
                    state.inflight_bytes += job.budget;
                    run.push(job);
                } else {
                    state.pending.push_back(job);
                }
            }
        }
        for job in run {
            self.spawn(job);
        }
    }

    fn fits(&self, state: &QueueState, budget: u64) -> bool {
        state.inflight_bytes == 0
            || state.inflight_bytes.saturating_add(budget) <= self.options.max_inflight_bytes
    }

    /// Starts a job: polls it once right here, inside the runtime's context,
    /// so the request reaches the backend without waiting for a runtime
    /// thread to wake up (and a backend that answers at once completes it on
    /// the spot); only if it has to wait is it handed to the runtime.
    fn spawn(self: &Arc<Self>, job: Job) {
        let guard = JobGuard {
            device: self.clone(),
            job: Some(job),
        };
        let mut task: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(guard.run());
        let polled = {
            let _context = self.runtime.enter();
            // The no-op waker is fine: if the task is pending it is spawned
            // below, and the runtime polls it again with a real waker before
            // anything else, so no wake-up is lost.
            let mut cx = Context::from_waker(Waker::noop());
            std::panic::catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(&mut cx)))
        };
        match polled {
            Ok(Poll::Ready(())) => return,
            Ok(Poll::Pending) => {}
            Err(_) => {
                // A panicking backend must not take the queue's thread down:
                // dropping the task answers the request IOERR.
                tracing::error!("vhost-user-blk: backend panicked");
                drop(task);
                return;
            }
        }
        // If the runtime is gone the task is dropped unrun, and the guard
        // answers IOERR: no request is ever left without an answer.
        drop(self.runtime.spawn(task));
    }

    /// Executes a job on the backend and says what to answer.
    async fn execute(&self, job: &Job) -> Answer {
        let status = job.frame.status;
        let fua = self.write_through();
        let result = match job.op {
            Op::Read { offset, len } => match self.backend.read(offset, len).await {
                Ok(data) if data.len() >= len as usize => {
                    self.stats
                        .read_bytes
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    return Answer::Data {
                        status,
                        segments: job.frame.in_data.clone(),
                        data,
                    };
                }
                Ok(data) => Err(BlockError::Io(format!(
                    "backend returned {} bytes for a read of {len}",
                    data.len()
                ))),
                Err(err) => Err(err),
            },
            Op::Write { offset, .. } => {
                // `budget` is this write's length plus its followers' (at
                // most MERGE_LIMIT or the request limit, so it fits a u32).
                let total = u32::try_from(job.budget).unwrap_or(u32::MAX);
                let mut source = GuestSource::new(
                    std::iter::once(job)
                        .chain(&job.followers)
                        .map(|part| (&*part.slot.mem, part.frame.out_data.as_slice()))
                        .collect(),
                );
                let done = self
                    .backend
                    .write_from(offset, total, &mut source, WriteFlags { fua })
                    .await;
                if let Some(err) = source.failed.take() {
                    self.warn_guest(job.slot.queue, &err);
                    return Answer::Status(status, Status::IoErr);
                }
                if done.is_ok() {
                    self.stats
                        .written_bytes
                        .fetch_add(job.budget, Ordering::Relaxed);
                    if fua {
                        self.stats
                            .write_through_writes
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                done
            }
            Op::Flush => self.backend.flush().await,
            Op::Discard { payload_len } | Op::WriteZeroes { payload_len } => {
                let kind = match job.op {
                    Op::Discard { .. } => RangeKind::Discard,
                    _ => RangeKind::WriteZeroes,
                };
                let mut payload = vec![0u8; payload_len as usize];
                if let Err(err) = gather(&job.slot.mem, &job.frame.out_data, &mut payload) {
                    self.warn_guest(job.slot.queue, &err);
                    return Answer::Status(status, Status::IoErr);
                }
                let ranges = match request::parse_ranges(&payload, kind, &self.limits()) {
                    Ok(ranges) => ranges,
                    Err(refused) => return Answer::Status(status, refused),
                };
                let mut result = Ok(());
                for range in ranges {
                    result = match kind {
                        RangeKind::Discard => self.backend.trim(range.offset, range.len).await,
                        RangeKind::WriteZeroes => {
                            self.backend
                                .write_zeroes(
                                    range.offset,
                                    range.len,
                                    !range.unmap,
                                    WriteFlags { fua },
                                )
                                .await
                        }
                    };
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
            // Answered synchronously in `start`.
            Op::GetId { .. } => Ok(()),
        };
        match result {
            Ok(()) => Answer::Status(status, Status::Ok),
            Err(err) => {
                tracing::debug!(op = ?job.op, %err, "vhost-user-blk: backend error");
                let refused = match err {
                    BlockError::NotSupported(_) => Status::Unsupp,
                    _ => Status::IoErr,
                };
                Answer::Status(status, refused)
            }
        }
    }

    /// Writes the answer into guest memory, returns the chain to the guest,
    /// signals it if needed, and starts parked jobs that now fit.
    fn finish(self: &Arc<Self>, slot: Slot, budget: u64, answer: Answer) {
        let shared = &self.queues[slot.queue];
        {
            let mut state = shared.state.lock();
            if state.generation != slot.generation {
                return;
            }
            state.copying += 1;
        }

        let (used_len, status) = write_answer(&slot.mem, answer);
        match status {
            Some(Status::Ok) => {}
            Some(Status::Unsupp) => {
                self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
            }
            Some(Status::IoErr) | None => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let spent = u64::try_from(slot.taken.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.request_nanos.fetch_add(spent, Ordering::Relaxed);

        let mut run = Vec::new();
        {
            let mut vring = slot.vring.get_mut();
            let mut state = shared.state.lock();
            state.copying -= 1;
            if state.generation == slot.generation {
                state.held.insert(slot.seq, (slot.head, used_len));
                let mut published = false;
                loop {
                    let next = state.next_published;
                    let Some((head, len)) = state.held.remove(&next) else {
                        break;
                    };
                    if let Err(err) = vring.add_used(head, len) {
                        tracing::warn!(queue = slot.queue, %err, "vhost-user-blk: cannot add to used ring");
                    }
                    state.next_published = next + 1;
                    published = true;
                }
                if published {
                    if state.batching {
                        state.signal_pending = true;
                    } else {
                        notify_guest(&mut vring, slot.queue);
                    }
                }
                state.inflight_bytes = state.inflight_bytes.saturating_sub(budget);
                while let Some(next) = state.pending.front() {
                    if !self.fits(&state, next.budget) {
                        break;
                    }
                    let Some(next) = state.pending.pop_front() else {
                        break;
                    };
                    state.inflight_bytes += next.budget;
                    run.push(next);
                }
            }
            if state.inflight() == 0 || state.copying == 0 {
                shared.idle.notify_all();
            }
        }
        for job in run {
            self.spawn(job);
        }
    }

    /// Waits until `queue` has nothing in flight, at most `drain_timeout`; then
    /// abandons what is left (see the module documentation).
    pub(crate) fn drain(&self, queue: usize) {
        let Some(shared) = self.queues.get(queue) else {
            return;
        };
        let deadline = Instant::now() + self.options.drain_timeout;
        let mut state = shared.state.lock();
        while state.inflight() > 0 {
            if shared.idle.wait_until(&mut state, deadline).timed_out() {
                break;
            }
        }
        if state.inflight() > 0 {
            tracing::error!(
                queue,
                inflight = state.inflight(),
                "vhost-user-blk: backend did not complete requests within {:?}; abandoning them",
                self.options.drain_timeout
            );
            state.generation += 1;
            state.held.clear();
            state.next_published = state.next_seq;
            state.inflight_bytes = 0;
            state.pending.clear();
            // Completions already writing to guest memory finish first.
            while state.copying > 0 {
                shared.idle.wait_for(&mut state, Duration::from_millis(100));
            }
        }
    }

    /// Drains every queue (the frontend went away).
    /// Stops taking requests off the rings and waits for those taken to be
    /// answered, while the frontend is still connected. A frontend that
    /// then loses the connection restarts from the used index: with every
    /// taken request answered before, nothing is lost and nothing answered
    /// twice. (Answering after the disconnection raced with QEMU reading the
    /// used index, and a guest could wait forever for a request.)
    pub(crate) fn quiesce(&self) {
        self.quiesced.store(true, Ordering::Release);
        self.drain_all();
        // A batch that checked the flag just before it was set may have
        // taken requests since: wait for those too.
        std::thread::sleep(Duration::from_millis(20));
        self.drain_all();
    }

    pub(crate) fn drain_all(&self) {
        for queue in 0..self.queues.len() {
            self.drain(queue);
        }
    }

    /// Requests in flight over all queues.
    pub(crate) fn inflight(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.state.lock().inflight() as usize)
            .sum()
    }
}

/// Signals the guest that used entries were added, unless EVENT_IDX says it
/// does not want to hear about them yet.
fn notify_guest(vring: &mut VringState<GuestMemAtomic>, queue: usize) {
    match vring.needs_notification() {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(err) = vring.signal_used_queue() {
                tracing::warn!(queue, %err, "vhost-user-blk: cannot signal the guest");
            }
        }
    }
}

/// Owns a running job; if the job's future is dropped before it completes
/// (runtime shut down, backend panicked), the request is answered `IOERR`.
struct JobGuard {
    device: Arc<Device>,
    job: Option<Job>,
}

impl JobGuard {
    async fn run(mut self) {
        let Some(job) = self.job.as_ref() else {
            return;
        };
        let answer = self.device.execute(job).await;
        if let Some(mut job) = self.job.take() {
            // Merged writes share the outcome of the one backend write.
            let outcome = match &answer {
                Answer::Status(_, status) => *status,
                _ => Status::IoErr,
            };
            let followers = std::mem::take(&mut job.followers);
            self.device.finish(job.slot, job.budget, answer);
            for follower in followers {
                let status = follower.frame.status;
                self.device
                    .finish(follower.slot, 0, Answer::Status(status, outcome));
            }
        }
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if let Some(mut job) = self.job.take() {
            let followers = std::mem::take(&mut job.followers);
            let status = job.frame.status;
            self.device
                .finish(job.slot, job.budget, Answer::Status(status, Status::IoErr));
            for follower in followers {
                let status = follower.frame.status;
                self.device
                    .finish(follower.slot, 0, Answer::Status(status, Status::IoErr));
            }
        }
    }
}

/// Why a descriptor chain was refused before framing.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error(transparent)]
    Layout(#[from] request::LayoutError),
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    #[error("more than {MAX_CHAIN_DESCRIPTORS} descriptors in one chain")]
    TooManyDescriptors,
}

/// Walks a chain (following indirect tables) and checks that every buffer
/// lies in guest memory.
fn collect_layout(
    chain: DescriptorChain<Arc<GuestMem>>,
    mem: &GuestMem,
) -> Result<ChainLayout, ChainError> {
    let mut layout = ChainLayout::new();
    for (count, desc) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let addr = desc.addr().0;
        let len = desc.len();
        if len > 0 && !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize) {
            return Err(ChainError::OutOfBounds { addr, len });
        }
        layout.push(addr, len, desc.is_write_only())?;
    }
    Ok(layout)
}

/// A copy between guest memory and a buffer failed.
#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error("guest memory access failed")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("segments and buffer differ in length")]
    Length,
}

/// The bytes of a write (with the writes merged into it) as the backend
/// takes them: the readable segments of each chain, in order, copied out of
/// guest memory piece by piece.
struct GuestSource<'a> {
    parts: Vec<(&'a GuestMem, &'a [Segment])>,
    /// The part, segment and byte within the segment to copy next.
    part: usize,
    segment: usize,
    within: usize,
    /// Why a copy failed (reported to the guest's log by the device).
    failed: Option<CopyError>,
}

impl<'a> GuestSource<'a> {
    fn new(parts: Vec<(&'a GuestMem, &'a [Segment])>) -> GuestSource<'a> {
        GuestSource {
            parts,
            part: 0,
            segment: 0,
            within: 0,
            failed: None,
        }
    }

    fn copy_next(&mut self, dst: &mut [u8]) -> Result<(), CopyError> {
        let mut at = 0;
        while at < dst.len() {
            let &(mem, segments) = self.parts.get(self.part).ok_or(CopyError::Length)?;
            let Some(segment) = segments.get(self.segment) else {
                self.part += 1;
                self.segment = 0;
                continue;
            };
            let left = segment.len as usize - self.within;
            let n = left.min(dst.len() - at);
            let addr = segment.addr + self.within as u64;
            mem.read_slice(&mut dst[at..at + n], GuestAddress(addr))?;
            at += n;
            self.within += n;
            if self.within == segment.len as usize {
                self.segment += 1;
                self.within = 0;
            }
        }
        Ok(())
    }
}

impl WriteSource for GuestSource<'_> {
    fn read_next(&mut self, dst: &mut [u8]) -> Result<(), BlockError> {
        self.copy_next(dst).map_err(|err| {
            let error = BlockError::Io(format!("cannot copy the write from guest memory: {err}"));
            self.failed = Some(err);
            error
        })
    }
}

/// Copies `segments` of guest memory into `dst` (exactly filling it).
fn gather(mem: &GuestMem, segments: &[Segment], dst: &mut [u8]) -> Result<(), CopyError> {
    let mut at = 0usize;
    for segment in segments {
        let end = at + segment.len as usize;
        let chunk = dst.get_mut(at..end).ok_or(CopyError::Length)?;
        mem.read_slice(chunk, GuestAddress(segment.addr))?;
        at = end;
    }
    if at != dst.len() {
        return Err(CopyError::Length);
    }
    Ok(())
}

/// Copies `src` into `segments` of guest memory, in order, until `src` ends.
fn scatter(mem: &GuestMem, segments: &[Segment], src: &[u8]) -> Result<(), CopyError> {
    let mut at = 0usize;
    for segment in segments {
        if at == src.len() {
            break;
        }
        let end = (at + segment.len as usize).min(src.len());
        mem.write_slice(&src[at..end], GuestAddress(segment.addr))?;
        at = end;
    }
    if at != src.len() {
        return Err(CopyError::Length);
    }
    Ok(())
}

/// Writes an answer to guest memory; returns the used length and the status
/// written (`None` if nothing could be written).
fn write_answer(mem: &GuestMem, answer: Answer) -> (u32, Option<Status>) {
    let (status_addr, status, data_len) = match answer {
        Answer::Unanswered => return (0, None),
        Answer::Status(addr, status) => (addr, status, 0),
        Answer::Data {
            status,
            segments,
            data,
        } => match scatter(mem, &segments, data.as_slice()) {
            Ok(()) => (status, Status::Ok, data.len() as u32),
            Err(_) => (status, Status::IoErr, 0),
        },
    };
    match mem.write_obj(status.byte(), GuestAddress(status_addr)) {
        Ok(()) => (data_len + 1, Some(status)),
        Err(_) => (0, None),
    }
}

impl VhostUserBackend for DeviceHandle {
    type Bitmap = Bitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.0.options.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.options.queue_size)
    }

    fn features(&self) -> u64 {
        config::device_features(self.0.options.read_only)
    }

    fn acked_features(&self, features: u64) {
        let device = &self.0;
        device.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0.blk_config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the cache mode is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset as usize == WRITEBACK_OFFSET && buf.len() == 1 {
            let write_through = buf[0] == 0;
            let device = &self.0;
            // This runs on the connection's own thread, outside the runtime:
            // waiting for the flush here blocks no request.
            let flush = || {
                device
                    .runtime
                    .block_on(device.backend.flush())
                    .map_err(|err| format!("flushing before write-through: {err}"))
            };
            return match device.cache.choose(write_through, flush) {
                Ok(()) => {
                    tracing::info!(write_through, "vhost-user-blk: guest chose its cache mode");
                    Ok(())
                }
                Err(why) => {
                    tracing::warn!(write_through, %why, "vhost-user-blk: cache mode change refused");
                    Err(io::Error::other(why))
                }
            };
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "config write of {} bytes at {offset} touches read-only fields",
                buf.len()
            ),
        ))
    }

    fn update_memory(&self, _mem: GuestMemAtomic) -> io::Result<()> {
        // The device reads the same GuestMemoryAtomic the library updates.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.0
            .thread_queues
            .iter()
            .map(|queues| queues.iter().fold(0u64, |mask, &q| mask | (1u64 << q)))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(err) => {
                tracing::error!(%err, "vhost-user-blk: cannot create a worker exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.0.drain(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            tracing::warn!(?evset, "vhost-user-blk: unexpected event set");
            return Ok(());
        }
        let queue = self
            .0
            .thread_queues
            .get(thread_id)
            .and_then(|queues| queues.get(usize::from(device_event)));
        match (queue, vrings.get(usize::from(device_event))) {
            (Some(&queue), Some(vring)) => self.0.process_queue(queue, vring),
            _ => tracing::warn!(
                device_event,
                thread_id,
                "vhost-user-blk: event for an unknown queue"
            ),
        }
        // Never return an error: it would stop this worker thread for good.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_memory(bytes: &[u8]) -> GuestMem {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), bytes.len())]).expect("guest memory");
        mem.write_slice(bytes, GuestAddress(0)).expect("fill");
        mem
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, len }
    }

    #[test]
    fn guest_source_hands_out_the_segments_in_order_in_any_pieces() {
        let first: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        let second: Vec<u8> = (0..8192u32).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        let (a, b) = (guest_memory(&first), guest_memory(&second));
        // Out of order and uneven, across two chains (a merged write).
        let segments_a = [seg(8192, 4096), seg(100, 5000), seg(15000, 1384)];
        let segments_b = [seg(4096, 4096), seg(0, 10)];
        let mut expected = Vec::new();
        for s in &segments_a {
            expected
                .extend_from_slice(&first[s.addr as usize..(s.addr + u64::from(s.len)) as usize]);
        }
        for s in &segments_b {
            expected
                .extend_from_slice(&second[s.addr as usize..(s.addr + u64::from(s.len)) as usize]);
        }
        // Whole, and in pieces that end inside, at and across segment ends.
        let uneven = vec![3, 4093, 1, 6000, expected.len() - 10_097];
        for pieces in [vec![expected.len()], uneven] {
            let mut source = GuestSource::new(vec![(&a, &segments_a[..]), (&b, &segments_b[..])]);
            let mut got = Vec::new();
            for n in pieces {
                let mut piece = vec![0u8; n];
                source.read_next(&mut piece).expect("read");
                got.extend_from_slice(&piece);
            }
            assert!(got == expected, "pieces differ from the segments");
            // Nothing is left: asking for more fails and says why.
            assert!(source.read_next(&mut [0u8; 1]).is_err());
            assert!(matches!(source.failed, Some(CopyError::Length)));
        }
    }

    #[test]
    fn guest_source_reports_memory_outside_the_guest() {
        let mem = guest_memory(&[7u8; 4096]);
        let segments = [seg(0, 4096), seg(1 << 20, 4096)];
        let mut source = GuestSource::new(vec![(&mem, &segments[..])]);
        let mut piece = vec![0u8; 4096];
        source.read_next(&mut piece).expect("inside");
        assert_eq!(piece, vec![7u8; 4096]);
        assert!(source.read_next(&mut piece).is_err());
        assert!(matches!(source.failed, Some(CopyError::Memory(_))));
    }
}

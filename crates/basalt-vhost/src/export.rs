//! One vdisk exported on one vhost-user socket.
//!
//! ```text
//!   start() ──▶ listening ──accept──▶ serving one frontend ──disconnect──┐
//!                  ▲                     (drain in-flight requests)      │
//!                  └─────────────────────────────────────────────────────┘
//!   stop(): from any state ─▶ the connection is shut down, the thread ends,
//!           the socket file is removed
//! ```
//!
//! The socket serves one frontend at a time. A second frontend that connects
//! while one is served waits in the listen backlog and is accepted when the
//! first disconnects (a restarted VM's new QEMU may connect before the old
//! one's connection has been torn down). Each connection gets a fresh
//! vhost-user daemon, guest memory map and device state; only the guest's
//! write-cache choice ([`WriteCache`]) carries over, because QEMU keeps
//! showing it to the guest across reconnections.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use basalt_core::BlockBackend;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::VhostError;
use crate::cache::WriteCache;
use crate::device::{Device, DeviceHandle};

/// How a vdisk is exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostBlkOptions {
    /// Request queues offered (`VIRTIO_BLK_F_MQ`), 1 to 64; default 16.
    /// QEMU's `vhost-user-blk-pci,num-queues=N` must not ask for more, and
    /// QEMU 7.2 asks for one per vCPU unless told otherwise, so the default
    /// leaves room for VMs of up to 16 vCPUs. Queues the guest does not use
    /// cost nothing.
    pub num_queues: u16,
    /// Largest queue size the frontend may configure, a power of two up to
    /// 32768 (QEMU's `queue-size`, 128 by default in 7.2, at most 1024).
    pub queue_size: u16,
    /// Refuse writes, discards and write-zeroes (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Logical block size reported to the guest: 512 (default; physical
    /// block 4096) or 4096.
    pub logical_block_size: u32,
    /// Threads that pop requests off the queues; 0 picks `min(num_queues, 4)`.
    /// Queue `q` is served by thread `q % threads`.
    pub worker_threads: usize,
    /// How long stopping a queue waits for in-flight requests before
    /// abandoning them.
    pub drain_timeout: Duration,
    /// Data bytes in flight per queue before further requests wait.
    pub max_inflight_bytes: u64,
    /// Data segments a request may have (`seg_max`), 1 to 1022; default 256,
    /// so that Linux sends a 1 MiB write of scattered 4 KiB pages as one
    /// request, which a vdisk writes copy-on-write as one whole extent. The
    /// guest splits larger writes into requests of at most this many pages
    /// (qemu-storage-daemon shows 126). `bench/front_pair.py` measures what
    /// the choice costs the guest.
    pub max_segments: u32,
}

impl Default for VhostBlkOptions {
    fn default() -> VhostBlkOptions {
        VhostBlkOptions {
            num_queues: 16,
            queue_size: 1024,
            read_only: false,
            logical_block_size: 512,
            worker_threads: 0,
            drain_timeout: Duration::from_secs(60),
            max_inflight_bytes: 64 << 20,
            max_segments: crate::device::MAX_SEGMENTS,
        }
    }
}

impl VhostBlkOptions {
    /// Checks that the options make a valid device.
    pub fn validate(&self) -> Result<(), VhostError> {
        let bad = |why: String| Err(VhostError::InvalidOptions(why));
        if !(1..=64).contains(&self.num_queues) {
            return bad(format!("num_queues {} not in 1..=64", self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 4 {
            return bad(format!(
                "queue_size {} is not a power of two from 4 to 32768",
                self.queue_size
            ));
        }
        if self.logical_block_size != 512 && self.logical_block_size != 4096 {
            return bad(format!(
                "logical_block_size {} is neither 512 nor 4096",
                self.logical_block_size
            ));
        }
        if self.worker_threads > usize::from(self.num_queues) {
            return bad(format!(
                "worker_threads {} exceeds num_queues {}",
                self.worker_threads, self.num_queues
            ));
        }
        // A chain also carries the request header and the status byte.
        let most_segments = crate::device::MAX_CHAIN_DESCRIPTORS as u32 - 2;
        if !(1..=most_segments).contains(&self.max_segments) {
            return bad(format!(
                "max_segments {} not in 1..={most_segments}",
                self.max_segments
            ));
        }
        if self.max_inflight_bytes == 0 {
            return bad("max_inflight_bytes is zero".to_string());
        }
        Ok(())
    }

    pub(crate) fn effective_worker_threads(&self) -> usize {
        match self.worker_threads {
            0 => usize::from(self.num_queues).clamp(1, 4),
            n => n,
        }
    }
}

/// Counters shared by the connections of one export.
#[derive(Debug, Default)]
pub(crate) struct SharedStats {
    pub(crate) connections: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) unsupported: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) write_through_writes: AtomicU64,
    pub(crate) request_nanos: AtomicU64,
}

/// A snapshot of an export's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Frontends accepted since the export started.
    pub connections: u64,
    /// Requests answered (including refused ones).
    pub requests: u64,
    /// The time those requests spent in the device, summed, in nanoseconds:
    /// from being taken off the available ring to their answer entering
    /// the used ring (divided by `requests`: the mean service time the
    /// guest sees, minus its own notification paths).
    pub request_nanos: u64,
    /// Requests answered `VIRTIO_BLK_S_IOERR`, or returned unanswered.
    pub errors: u64,
    /// Requests answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// Malformed requests seen (bad chains, bad guest addresses).
    pub malformed: u64,
    /// Bytes read by the guest.
    pub read_bytes: u64,
    /// Bytes written by the guest.
    pub written_bytes: u64,
    /// Writes made durable before they were answered, because the guest
    /// chose write-through or its driver cannot flush.
    pub write_through_writes: u64,
    /// The guest chose write-through (see [`WriteCache`]).
    pub write_through: bool,
    /// Requests in flight on the current connection.
    pub inflight: u64,
    /// A frontend is connected.
    pub connected: bool,
}

struct ExportShared {
    stopping: AtomicBool,
    wake: EventFd,
    /// The connection being served, to shut it down on stop.
    current: Mutex<Option<(ShutdownHandle, Arc<Device>)>>,
    stats: Arc<SharedStats>,
    cache: Arc<WriteCache>,
}

/// A vdisk served to one frontend (QEMU) at a time over a vhost-user socket.
///
/// Dropping the export stops it.
pub struct VhostBlkExport {
    socket_path: PathBuf,
    shared: Arc<ExportShared>,
    thread: Option<JoinHandle<()>>,
}

impl VhostBlkExport {
    /// Listens on `socket_path` and serves `backend` to each frontend that
    /// connects, until [`stop`](Self::stop). Backend calls run on `runtime`.
    ///
    /// A stale socket file left by a dead process is replaced; a socket that
    /// another process still serves, or any other file, is an error.
    pub fn start(
        socket_path: impl AsRef<Path>,
        backend: Arc<dyn BlockBackend>,
        runtime: Handle,
        options: VhostBlkOptions,
    ) -> Result<VhostBlkExport, VhostError> {
        Self::start_with_cache(
            socket_path,
            backend,
            runtime,
            options,
            Arc::new(WriteCache::default()),
        )
    }

    /// Like [`start`](Self::start), with the guest's write-cache mode
    /// starting from `cache` (a VM's QEMU reconnecting after a restart of
    /// basaltd, or a migration's destination) and its changes recorded by
    /// the cache's keeper.
    pub fn start_with_cache(
        socket_path: impl AsRef<Path>,
        backend: Arc<dyn BlockBackend>,
        runtime: Handle,
        options: VhostBlkOptions,
        cache: Arc<WriteCache>,
    ) -> Result<VhostBlkExport, VhostError> {
        options.validate()?;
        let socket_path = socket_path.as_ref().to_path_buf();
        let listener = bind(&socket_path)?;
        let shared = Arc::new(ExportShared {
            stopping: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(VhostError::EventFd)?,
            current: Mutex::new(None),
            stats: Arc::new(SharedStats::default()),
            cache,
        });
        let name = format!(
            "vhost-blk-{}",
            socket_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let server = Server {
            name: name.clone(),
            listener: Listener::from(listener),
            backend,
            runtime,
            options,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || server.run())
            .map_err(|err| {
                let _ = std::fs::remove_file(&socket_path);
                VhostError::Thread(err)
            })?;
        tracing::info!(socket = %socket_path.display(), "vhost-user-blk export listening");
        Ok(VhostBlkExport {
            socket_path,
            shared,
            thread: Some(thread),
        })
    }

    /// The socket the export listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The guest's write-cache mode, kept across connections.
    pub fn write_cache(&self) -> &Arc<WriteCache> {
        &self.shared.cache
    }

    /// Current counters.
    pub fn stats(&self) -> ExportStats {
        let s = &self.shared.stats;
        let current = self.shared.current.lock();
        ExportStats {
            connections: s.connections.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            request_nanos: s.request_nanos.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            unsupported: s.unsupported.load(Ordering::Relaxed),
            malformed: s.malformed.load(Ordering::Relaxed),
            read_bytes: s.read_bytes.load(Ordering::Relaxed),
            written_bytes: s.written_bytes.load(Ordering::Relaxed),
            write_through_writes: s.write_through_writes.load(Ordering::Relaxed),
            write_through: self.shared.cache.write_through(),
            inflight: current
                .as_ref()
                .map_or(0, |(_, device)| device.inflight() as u64),
            connected: current.is_some(),
        }
    }

    /// Stops serving: disconnects the current frontend (after its in-flight
    /// requests complete, within the drain timeout), ends the export's thread
    /// and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        let current = self.shared.current.lock().clone();
        if let Some((handle, device)) = current {
            // Answer what was taken before the frontend sees the socket go.
            device.quiesce();
            handle.shutdown();
        }
        if thread.join().is_err() {
            tracing::error!(socket = %self.socket_path.display(), "vhost-user-blk thread panicked");
        }
        let _ = std::fs::remove_file(&self.socket_path);
        tracing::info!(socket = %self.socket_path.display(), "vhost-user-blk export stopped");
    }
}

impl Drop for VhostBlkExport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds the listening socket, replacing a stale socket file.
fn bind(path: &Path) -> Result<UnixListener, VhostError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(VhostError::SocketBusy(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| VhostError::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => return Err(VhostError::PathInUse(path.to_path_buf())),
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| VhostError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// The export's thread: accepts frontends one after the other.
struct Server {
    name: String,
    listener: Listener,
    backend: Arc<dyn BlockBackend>,
    runtime: Handle,
    options: VhostBlkOptions,
    shared: Arc<ExportShared>,
}

impl Server {
    fn run(mut self) {
        while !self.shared.stopping.load(Ordering::SeqCst) {
            match wait_readable(self.listener.as_raw_fd(), self.shared.wake.as_raw_fd()) {
                Ok(Ready::Listener) => {}
                Ok(Ready::Wake) => continue,
                Err(err) => {
                    tracing::error!(%err, "vhost-user-blk: poll failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            if let Err(err) = self.serve_one() {
                tracing::error!(%err, "vhost-user-blk: connection failed");
                // Do not spin on a persistent error.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Accepts one frontend and serves it until it disconnects.
    fn serve_one(&mut self) -> Result<(), VhostError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = Arc::new(Device::new(
            self.backend.clone(),
            self.runtime.clone(),
            self.options.clone(),
            mem.clone(),
            self.shared.stats.clone(),
            self.shared.cache.clone(),
        ));
        let mut daemon = VhostUserDaemon::new(self.name.clone(), DeviceHandle(device.clone()), mem)
            .map_err(|err| VhostError::Daemon(err.to_string()))?;
        daemon
            .start(&mut self.listener)
            .map_err(|err| VhostError::Daemon(err.to_string()))?;
        self.shared
            .stats
            .connections
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(export = %self.name, "vhost-user-blk: frontend connected");
        if let Some(handle) = daemon.shutdown_handle() {
            *self.shared.current.lock() = Some((handle.clone(), device.clone()));
            if self.shared.stopping.load(Ordering::SeqCst) {
                handle.shutdown();
            }
        }
        let result = daemon.wait();
        // In-flight requests still hold the old memory map: let them finish
        // before a new frontend can touch the disk.
        device.drain_all();
        *self.shared.current.lock() = None;
        // Dropping the daemon stops and joins its worker threads.
        drop(daemon);
        match result {
            Ok(()) => tracing::info!(export = %self.name, "vhost-user-blk: frontend disconnected"),
            Err(err) => {
                tracing::info!(export = %self.name, %err, "vhost-user-blk: frontend connection ended")
            }
        }
        Ok(())
    }
}

enum Ready {
    Listener,
    Wake,
}

/// Blocks until the listener has a connection or the wake eventfd fires.
fn wait_readable(listener: RawFd, wake: RawFd) -> std::io::Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structures that lives
        // across the call; poll only writes their `revents` fields.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if fds[1].revents != 0 {
            return Ok(Ready::Wake);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(Ready::Listener);
        }
        if fds[0].revents != 0 {
            return Err(std::io::Error::other(format!(
                "listening socket reported poll events {:#x}",
                fds[0].revents
            )));
        }
    }
}

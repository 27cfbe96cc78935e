//! A test vhost-user frontend and a minimal split-virtqueue guest driver: a
//! memfd plays guest RAM.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use basalt_vhost::config::bit;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 32 << 20;
pub const QSIZE: u16 = 256;
pub const BUF_BASE: u64 = 1 << 20;
pub const STATUS_UNTOUCHED: u8 = 0xee;

pub fn memfd(name: &str, size: usize) -> File {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no
    // other memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

/// One descriptor of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Desc(pub u64, pub u32, pub bool);

pub struct DriverQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub last_used: u16,
    pub next_desc: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

/// A test frontend plus guest driver.
pub struct Driver {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap<()>,
    _memfd: File,
    pub queues: Vec<DriverQueue>,
    pub next_buf: u64,
    pub features: u64,
}

pub struct Completion {
    pub status: u8,
    pub used_len: u32,
    pub data: Vec<u8>,
}

impl Driver {
    /// Connects to a Basalt export (checking the protocol features it must offer).
    pub fn connect(path: &Path, num_queues: usize, extra_features: u64) -> Driver {
        Driver::connect_with(path, num_queues, extra_features, true)
    }

    /// Connects to any vhost-user-blk backend (e.g. qemu-storage-daemon).
    pub fn connect_with(
        path: &Path,
        num_queues: usize,
        extra_features: u64,
        check_protocol: bool,
    ) -> Driver {
        let mut frontend = Frontend::connect(path, num_queues as u64).unwrap();
        let offered = frontend.get_features().unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        if check_protocol {
            assert!(protocol.contains(
                VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::LOG_SHMFD
            ));
        }
        let protocol = protocol
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::LOG_SHMFD);
        frontend.set_protocol_features(protocol).unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert!(frontend.get_queue_num().unwrap() >= num_queues as u64);
        frontend.set_owner().unwrap();

        let wanted = bit(VIRTIO_F_VERSION_1)
            | bit(30) // VHOST_USER_F_PROTOCOL_FEATURES
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_DISCARD)
            | bit(VIRTIO_BLK_F_WRITE_ZEROES)
            | bit(VIRTIO_BLK_F_MQ)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_RO)
            | extra_features;
        let features = offered & wanted;
        frontend.set_features(features).unwrap();

        let file = memfd("guest-ram", MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_SIZE as u64,
                userspace_addr: host,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }])
            .unwrap();

        let mut queues = Vec::new();
        for q in 0..num_queues {
            let base = q as u64 * 0x10000;
            let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
            frontend.set_vring_num(q, QSIZE).unwrap();
            frontend.set_vring_base(q, 0).unwrap();
            frontend
                .set_vring_addr(
                    q,
                    &VringConfigData {
                        queue_max_size: QSIZE,
                        queue_size: QSIZE,
                        flags: 0,
                        desc_table_addr: host + desc,
                        used_ring_addr: host + used,
                        avail_ring_addr: host + avail,
                        log_addr: None,
                    },
                )
                .unwrap();
            let kick = EventFd::new(0).unwrap();
            let call = EventFd::new(0).unwrap();
            frontend.set_vring_call(q, &call).unwrap();
            frontend.set_vring_kick(q, &kick).unwrap();
            frontend.set_vring_enable(q, true).unwrap();
            queues.push(DriverQueue {
                desc,
                avail,
                used,
                avail_idx: 0,
                last_used: 0,
                next_desc: 0,
                kick,
                call,
            });
        }
        Driver {
            frontend,
            mem,
            _memfd: file,
            queues,
            next_buf: BUF_BASE,
            features,
        }
    }

    /// A fresh guest buffer holding `bytes`.
    pub fn buffer(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.next_buf;
        self.next_buf += (bytes.len().max(1) as u64).div_ceil(4096) * 4096;
        if self.next_buf > MEM_SIZE as u64 {
            self.next_buf = BUF_BASE;
            return self.buffer(bytes);
        }
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    /// Blocks until the device signals queue `q` or `timeout` passes.
    pub fn wait_call(&self, q: usize, timeout: Duration) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.queues[q].call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: fds is a valid one-element pollfd array for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as i32) };
        if rc > 0 {
            let _ = self.queues[q].call.read();
            true
        } else {
            false
        }
    }

    /// The used elements of queue `q` not seen yet, without waiting.
    pub fn poll_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let queue = &mut self.queues[q];
        fence(Ordering::SeqCst);
        let idx: u16 = self.mem.read_obj(GuestAddress(queue.used + 2)).unwrap();
        let mut out = Vec::new();
        while queue.last_used != idx {
            let elem = queue.used + 4 + u64::from(queue.last_used % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            out.push((id, len));
            queue.last_used = queue.last_used.wrapping_add(1);
        }
        out
    }

    /// Writes descriptors into queue `q`'s table; returns the head index.
    pub fn write_descs(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let queue = &mut self.queues[q];
        let ids: Vec<u16> = (0..descs.len())
            .map(|i| (queue.next_desc + i as u16) % QSIZE)
            .collect();
        queue.next_desc = (queue.next_desc + descs.len() as u16) % QSIZE;
        for (i, d) in descs.iter().enumerate() {
            let mut flags = 0u16;
            if d.2 {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                ids[i + 1]
            } else {
                0
            };
            write_desc(
                &self.mem,
                queue.desc + u64::from(ids[i]) * 16,
                d.0,
                d.1,
                flags,
                next,
            );
        }
        ids[0]
    }

    /// Makes `head` available and kicks the device.
    pub fn publish(&mut self, q: usize, heads: &[u16]) {
        let queue = &mut self.queues[q];
        for &head in heads {
            let slot = queue.avail + 4 + u64::from(queue.avail_idx % QSIZE) * 2;
            self.mem
                .write_obj(head.to_le(), GuestAddress(slot))
                .unwrap();
            queue.avail_idx = queue.avail_idx.wrapping_add(1);
        }
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(queue.avail_idx.to_le(), GuestAddress(queue.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        queue.kick.write(1).unwrap();
    }

    /// Waits for `count` used elements of queue `q`: (descriptor id, length).
    pub fn wait_used(&mut self, q: usize, count: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let queue = &mut self.queues[q];
        while out.len() < count {
            fence(Ordering::SeqCst);
            let idx: u16 = self.mem.read_obj(GuestAddress(queue.used + 2)).unwrap();
            while queue.last_used != idx && out.len() < count {
                let elem = queue.used + 4 + u64::from(queue.last_used % QSIZE) * 8;
                let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
                out.push((id, len));
                queue.last_used = queue.last_used.wrapping_add(1);
            }
            if out.len() < count {
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {count} completions on queue {q}, got {}",
                    out.len()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        out
    }

    /// Submits one request with the classic layout (header | out | in | status)
    /// and waits for it.
    pub fn request(
        &mut self,
        q: usize,
        request_type: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
    ) -> Completion {
        let header = self.buffer(&header(request_type, sector));
        let mut descs = vec![Desc(header, 16, false)];
        if !out.is_empty() {
            let data = self.buffer(out);
            descs.push(Desc(data, out.len() as u32, false));
        }
        let in_addr = self.buffer(&vec![0x5a; in_len]);
        if in_len > 0 {
            descs.push(Desc(in_addr, in_len as u32, true));
        }
        let status = self.buffer(&[STATUS_UNTOUCHED]);
        descs.push(Desc(status, 1, true));
        self.run_chain(q, &descs, status, in_addr, in_len)
    }

    pub fn run_chain(
        &mut self,
        q: usize,
        descs: &[Desc],
        status: u64,
        in_addr: u64,
        in_len: usize,
    ) -> Completion {
        let head = self.write_descs(q, descs);
        self.publish(q, &[head]);
        let used = self.wait_used(q, 1, Duration::from_secs(10));
        assert_eq!(used[0].0, u32::from(head), "completion for another chain");
        Completion {
            status: self.read_mem(status, 1)[0],
            used_len: used[0].1,
            data: self.read_mem(in_addr, in_len),
        }
    }
}

pub fn write_desc(mem: &GuestMemoryMmap<()>, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

pub fn header(request_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

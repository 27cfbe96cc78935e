//! The export driven through the vhost-user protocol by a test frontend: a
//! memfd plays guest RAM, and a minimal split-virtqueue driver below plays the
//! guest's virtio-blk driver. No QEMU needed; malformed chains are easy to make.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_vhost::config::{VHOST_F_LOG_ALL, bit};
use basalt_vhost::{VhostBlkExport, VhostBlkOptions, WriteCache, WriteCacheKeeper};
use common::MemBackend;
use common::driver::*;
use vhost::VhostBackend;
use vhost::VhostUserDirtyLogRegion;
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::VhostUserConfigFlags;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const DISK_SIZE: usize = 16 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    backend: Arc<MemBackend>,
    export: Option<VhostBlkExport>,
    runtime: tokio::runtime::Runtime,
}

fn fixture(options: VhostBlkOptions) -> Fixture {
    fixture_with_cache(options, Arc::new(WriteCache::default()))
}

fn fixture_with_cache(options: VhostBlkOptions, cache: Arc<WriteCache>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vd.sock");
    let backend = MemBackend::new(DISK_SIZE, "basalt-vd-test");
    let runtime = common::runtime();
    let export = VhostBlkExport::start_with_cache(
        &path,
        backend.clone(),
        runtime.handle().clone(),
        options,
        cache,
    )
    .unwrap();
    Fixture {
        _dir: dir,
        path,
        backend,
        export: Some(export),
        runtime,
    }
}

impl Fixture {
    fn export(&self) -> &VhostBlkExport {
        self.export.as_ref().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(export) = self.export.take() {
            export.stop();
        }
    }
}

fn options() -> VhostBlkOptions {
    VhostBlkOptions {
        num_queues: 2,
        drain_timeout: Duration::from_secs(10),
        ..VhostBlkOptions::default()
    }
}

#[test]
fn write_read_roundtrip_on_every_queue() {
    let fx = fixture(options());
    let mut drv = Driver::connect(&fx.path, 2, 0);
    let started = Instant::now();
    for q in 0..2 {
        let data = pattern(8192, q as u8);
        let sector = 8 + q as u64 * 64;
        let done = drv.request(q, VIRTIO_BLK_T_OUT, sector, &data, 0);
        assert_eq!(done.status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(done.used_len, 1);
        assert_eq!(fx.backend.read_bytes(sector as usize * 512, 8192), data);

        let done = drv.request(q, VIRTIO_BLK_T_IN, sector, &[], 8192);
        assert_eq!(done.status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(done.used_len, 8193);
        assert_eq!(done.data, data);
    }
    // The last 4 KiB of the disk.
    let last = (DISK_SIZE / 512 - 8) as u64;
    let data = pattern(4096, 9);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, last, &data, 0).status, 0);
    assert_eq!(drv.request(1, VIRTIO_BLK_T_IN, last, &[], 4096).data, data);
    let stats = fx.export().stats();
    assert!(stats.connected);
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.written_bytes, 8192 * 2 + 4096);
    // Six requests, each answered one after the other: their time in the
    // device adds up to something, and to no more than the whole exchange.
    assert_eq!(stats.requests, 6);
    assert!(stats.request_nanos > 0);
    assert!(
        u128::from(stats.request_nanos) <= started.elapsed().as_nanos(),
        "{} ns in the device for requests sent within {:?}",
        stats.request_nanos,
        started.elapsed()
    );
}

#[test]
fn any_layout_and_indirect_descriptors() {
    let fx = fixture(options());
    let mut drv = Driver::connect(&fx.path, 2, 0);
    // Header and data in one readable buffer, status in a writable one.
    let data = pattern(1024, 3);
    let mut combined = header(VIRTIO_BLK_T_OUT, 16).to_vec();
    combined.extend_from_slice(&data);
    let out = drv.buffer(&combined);
    let status = drv.buffer(&[STATUS_UNTOUCHED]);
    let done = drv.run_chain(
        0,
        &[
            Desc(out, combined.len() as u32, false),
            Desc(status, 1, true),
        ],
        status,
        0,
        0,
    );
    assert_eq!(done.status, 0);
    assert_eq!(fx.backend.read_bytes(16 * 512, 1024), data);

    // Read: header split over two descriptors; data and status share one.
    let h = header(VIRTIO_BLK_T_IN, 16);
    let h1 = drv.buffer(&h[..5]);
    let h2 = drv.buffer(&h[5..]);
    let inout = drv.buffer(&[0u8; 1025]);
    let done = drv.run_chain(
        0,
        &[
            Desc(h1, 5, false),
            Desc(h2, 11, false),
            Desc(inout, 1025, true),
        ],
        inout + 1024,
        inout,
        1024,
    );
    assert_eq!(done.status, 0);
    assert_eq!(done.used_len, 1025);
    assert_eq!(done.data, data);

    // The same read through an indirect descriptor table.
    assert_ne!(drv.features & bit(VIRTIO_RING_F_INDIRECT_DESC), 0);
    let hdr = drv.buffer(&h);
    let buf = drv.buffer(&[0u8; 1024]);
    let st = drv.buffer(&[STATUS_UNTOUCHED]);
    let table = drv.buffer(&[0u8; 48]);
    write_desc(&drv.mem, table, hdr, 16, VRING_DESC_F_NEXT as u16, 1);
    write_desc(
        &drv.mem,
        table + 16,
        buf,
        1024,
        (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
        2,
    );
    write_desc(&drv.mem, table + 32, st, 1, VRING_DESC_F_WRITE as u16, 0);
    let head = drv.write_descs(1, &[Desc(table, 48, false)]);
    let desc_addr = drv.queues[1].desc + u64::from(head) * 16;
    write_desc(
        &drv.mem,
        desc_addr,
        table,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    drv.publish(1, &[head]);
    let used = drv.wait_used(1, 1, Duration::from_secs(10));
    assert_eq!(used[0], (u32::from(head), 1025));
    assert_eq!(drv.read_mem(st, 1)[0], 0);
    assert_eq!(drv.read_mem(buf, 1024), data);
}

#[test]
fn flush_get_id_discard_write_zeroes_unsupported() {
    let fx = fixture(options());
    let mut drv = Driver::connect(&fx.path, 1, 0);

    let done = drv.request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_eq!(done.status, 0);
    assert_eq!(fx.backend.flushes.load(Ordering::SeqCst), 1);

    let done = drv.request(0, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!(done.status, 0);
    assert_eq!(done.used_len, 21);
    assert_eq!(&done.data[..14], b"basalt-vd-test");
    assert!(done.data[14..].iter().all(|&b| b == 0));

    fx.backend.write_bytes(0, &[0xab; 65536]);
    let mut ranges = range(8, 8, 0);
    ranges.extend(range(32, 16, 0));
    let done = drv.request(0, VIRTIO_BLK_T_DISCARD, 0, &ranges, 0);
    assert_eq!(done.status, 0);
    assert_eq!(*fx.backend.trims.lock(), vec![(4096, 4096), (16384, 8192)]);
    assert!(fx.backend.read_bytes(4096, 4096).iter().all(|&b| b == 0));
    assert!(fx.backend.read_bytes(8192, 4096).iter().all(|&b| b == 0xab));

    let done = drv.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(64, 8, 1), 0);
    assert_eq!(done.status, 0);
    let done = drv.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(80, 8, 0), 0);
    assert_eq!(done.status, 0);
    assert_eq!(
        *fx.backend.zeroes.lock(),
        vec![(32768, 4096, false), (40960, 4096, true)]
    );

    // Discard with the unmap flag, unknown write-zeroes flags, unknown types.
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_DISCARD, 0, &range(0, 8, 1), 0)
            .status,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(0, 8, 4), 0)
            .status,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_SCSI_CMD, 0, &[], 0).status,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(
        drv.request(0, 0x7777, 0, &[], 0).status,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    // A discard reaching past the end of the disk.
    let past = (DISK_SIZE / 512) as u64 - 4;
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_DISCARD, 0, &range(past, 8, 0), 0)
            .status,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(fx.export().stats().unsupported, 4);
}

fn range(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    let mut out = sector.to_le_bytes().to_vec();
    out.extend_from_slice(&num.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out
}

#[test]
fn malformed_chains_are_refused_and_serving_continues() {
    let fx = fixture(options());
    let mut drv = Driver::connect(&fx.path, 1, 0);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;

    // Past the end of the disk, and a sector number that overflows.
    let end = (DISK_SIZE / 512) as u64;
    assert_eq!(drv.request(0, VIRTIO_BLK_T_IN, end, &[], 512).status, ioerr);
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_IN, end - 1, &[], 1024).status,
        ioerr
    );
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_OUT, u64::MAX / 2, &[1; 512], 0)
            .status,
        ioerr
    );
    // Data not a multiple of 512 bytes.
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_OUT, 0, &[1; 100], 0).status,
        ioerr
    );
    // Header shorter than 16 bytes: IOERR at the status byte.
    let h = drv.buffer(&header(VIRTIO_BLK_T_IN, 0)[..8]);
    let st = drv.buffer(&[STATUS_UNTOUCHED]);
    let done = drv.run_chain(0, &[Desc(h, 8, false), Desc(st, 1, true)], st, 0, 0);
    assert_eq!((done.status, done.used_len), (ioerr, 1));
    // No writable byte at all: returned unanswered.
    let h = drv.buffer(&header(VIRTIO_BLK_T_FLUSH, 0));
    let done = drv.run_chain(0, &[Desc(h, 16, false)], h, 0, 0);
    assert_eq!(done.used_len, 0);
    // A readable descriptor after a writable one: returned unanswered.
    let h = drv.buffer(&header(VIRTIO_BLK_T_OUT, 0));
    let st = drv.buffer(&[STATUS_UNTOUCHED]);
    let d = drv.buffer(&[7; 512]);
    let done = drv.run_chain(
        0,
        &[Desc(h, 16, false), Desc(st, 1, true), Desc(d, 512, false)],
        st,
        0,
        0,
    );
    assert_eq!((done.status, done.used_len), (STATUS_UNTOUCHED, 0));
    // A data buffer outside guest memory: returned unanswered, nothing touched.
    let h = drv.buffer(&header(VIRTIO_BLK_T_IN, 0));
    let st = drv.buffer(&[STATUS_UNTOUCHED]);
    let outside = MEM_SIZE as u64 - 256;
    let done = drv.run_chain(
        0,
        &[
            Desc(h, 16, false),
            Desc(outside, 512, true),
            Desc(st, 1, true),
        ],
        st,
        0,
        0,
    );
    assert_eq!((done.status, done.used_len), (STATUS_UNTOUCHED, 0));
    let done = drv.run_chain(
        0,
        &[
            Desc(h, 16, false),
            Desc(u64::MAX - 100, 512, true),
            Desc(st, 1, true),
        ],
        st,
        0,
        0,
    );
    assert_eq!((done.status, done.used_len), (STATUS_UNTOUCHED, 0));
    // An indirect descriptor pointing outside guest memory.
    let head = drv.write_descs(0, &[Desc(0, 0, false)]);
    let at = drv.queues[0].desc + u64::from(head) * 16;
    write_desc(
        &drv.mem,
        at,
        MEM_SIZE as u64 * 4,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    drv.publish(0, &[head]);
    let used = drv.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used[0], (u32::from(head), 0));
    // A descriptor loop (next points back to itself) ends at the queue size.
    let h = drv.buffer(&header(VIRTIO_BLK_T_IN, 0));
    let head = drv.write_descs(0, &[Desc(h, 16, false)]);
    let at = drv.queues[0].desc + u64::from(head) * 16;
    write_desc(&drv.mem, at, h, 16, VRING_DESC_F_NEXT as u16, head);
    drv.publish(0, &[head]);
    let used = drv.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used[0], (u32::from(head), 0));

    // The device still serves good requests.
    let data = pattern(4096, 1);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &data, 0).status, 0);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_IN, 0, &[], 4096).data, data);
    // A backend error becomes IOERR.
    *fx.backend.poison.lock() = Some(8192);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_IN, 16, &[], 4096).status, ioerr);
    let stats = fx.export().stats();
    assert!(stats.malformed >= 7, "{stats:?}");
}

#[test]
fn a_panicking_backend_fails_the_request_not_the_queue() {
    let fx = fixture(options());
    let mut drv = Driver::connect(&fx.path, 1, 0);
    *fx.backend.panic_at.lock() = Some(4096);
    // Panics during the inline first poll, then inside a runtime task.
    for delay in [Duration::ZERO, Duration::from_millis(20)] {
        *fx.backend.delay.lock() = delay;
        let done = drv.request(0, VIRTIO_BLK_T_IN, 8, &[], 4096);
        assert_eq!(done.status, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(drv.request(0, VIRTIO_BLK_T_IN, 16, &[], 4096).status, 0);
    }
}

#[test]
fn requests_run_concurrently_and_are_answered_in_the_order_taken() {
    let fx = fixture(options());
    *fx.backend.delay.lock() = Duration::from_millis(100);
    for i in 0..64 {
        fx.backend.write_bytes(i * 4096, &pattern(4096, i as u8));
    }
    let mut drv = Driver::connect(&fx.path, 2, bit(VIRTIO_RING_F_EVENT_IDX));
    assert_ne!(drv.features & bit(VIRTIO_RING_F_EVENT_IDX), 0);
    let started = Instant::now();
    let mut expect = Vec::new();
    for q in 0..2 {
        let mut heads = Vec::new();
        for i in 0..32 {
            let block = q * 32 + i;
            let h = drv.buffer(&header(VIRTIO_BLK_T_IN, block as u64 * 8));
            let d = drv.buffer(&[0; 4096]);
            let st = drv.buffer(&[STATUS_UNTOUCHED]);
            let head = drv.write_descs(
                q,
                &[Desc(h, 16, false), Desc(d, 4096, true), Desc(st, 1, true)],
            );
            heads.push(head);
            expect.push((q, head, d, st, block));
        }
        drv.publish(q, &heads);
    }
    for q in 0..2 {
        let used = drv.wait_used(q, 32, Duration::from_secs(20));
        let taken: Vec<u32> = expect
            .iter()
            .filter(|e| e.0 == q)
            .map(|e| u32::from(e.1))
            .collect();
        let answered: Vec<u32> = used.iter().map(|u| u.0).collect();
        assert_eq!(answered, taken, "queue {q} answered out of order");
    }
    let elapsed = started.elapsed();
    for (_, _, d, st, block) in expect {
        assert_eq!(drv.read_mem(st, 1)[0], 0);
        assert_eq!(drv.read_mem(d, 4096), pattern(4096, block as u8));
    }
    // 64 requests of 100 ms each: one at a time would take 6.4 s.
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert!(fx.backend.max_inflight.load(Ordering::SeqCst) >= 32);
}

/// Posts a 4 KiB read of `block` on queue 0; returns (head, data, status).
fn post_read(drv: &mut Driver, block: u64) -> (u16, u64, u64) {
    let h = drv.buffer(&header(VIRTIO_BLK_T_IN, block * 8));
    let d = drv.buffer(&[0; 4096]);
    let st = drv.buffer(&[STATUS_UNTOUCHED]);
    let head = drv.write_descs(
        0,
        &[Desc(h, 16, false), Desc(d, 4096, true), Desc(st, 1, true)],
    );
    (head, d, st)
}

#[test]
fn a_finished_request_waits_for_those_taken_before_it_so_the_used_index_marks_every_unanswered_one()
{
    // QEMU restarts a ring at the used index when its backend died without
    // a word: everything from there on is offered again. So the used index
    // must never pass a request that has no answer yet.
    let fx = fixture(VhostBlkOptions {
        num_queues: 1,
        ..options()
    });
    for block in 0..3u64 {
        fx.backend
            .write_bytes(block as usize * 4096, &pattern(4096, block as u8 + 1));
    }
    *fx.backend.slow_read.lock() = Some((0, Duration::from_millis(800)));
    let mut drv = Driver::connect(&fx.path, 1, 0);
    let requests: Vec<_> = (0..3).map(|block| post_read(&mut drv, block)).collect();
    drv.publish(0, &requests.iter().map(|r| r.0).collect::<Vec<_>>());

    // The two later reads are served while the first one is still running...
    let deadline = Instant::now() + Duration::from_secs(5);
    while fx.backend.reads.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the later reads were not served");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(fx.backend.inflight(), 1, "the first read should still run");
    std::thread::sleep(Duration::from_millis(50));
    // ...but their answers wait: a frontend restarting at the used index now
    // would offer all three again, and none twice.
    assert_eq!(drv.poll_used(0), Vec::<(u32, u32)>::new());

    let used = drv.wait_used(0, 3, Duration::from_secs(5));
    let heads: Vec<u32> = requests.iter().map(|r| u32::from(r.0)).collect();
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), heads);
    for (block, (_, data, status)) in requests.into_iter().enumerate() {
        assert_eq!(drv.read_mem(status, 1)[0], 0);
        assert_eq!(drv.read_mem(data, 4096), pattern(4096, block as u8 + 1));
    }
    // And the queue keeps serving.
    assert_eq!(drv.request(0, VIRTIO_BLK_T_IN, 8, &[], 4096).status, 0);
}

#[test]
fn byte_budget_parks_requests_without_losing_them() {
    let fx = fixture(VhostBlkOptions {
        num_queues: 1,
        max_inflight_bytes: 64 * 1024,
        ..options()
    });
    *fx.backend.delay.lock() = Duration::from_millis(20);
    let mut drv = Driver::connect(&fx.path, 1, 0);
    let mut heads = Vec::new();
    let mut bufs = Vec::new();
    for i in 0..16u64 {
        let data = pattern(32 * 1024, i as u8);
        let h = drv.buffer(&header(VIRTIO_BLK_T_OUT, i * 64));
        let d = drv.buffer(&data);
        let st = drv.buffer(&[STATUS_UNTOUCHED]);
        heads.push(drv.write_descs(
            0,
            &[
                Desc(h, 16, false),
                Desc(d, 32 * 1024, false),
                Desc(st, 1, true),
            ],
        ));
        bufs.push((st, data));
    }
    drv.publish(0, &heads);
    drv.wait_used(0, 16, Duration::from_secs(20));
    for (i, (st, data)) in bufs.into_iter().enumerate() {
        assert_eq!(drv.read_mem(st, 1)[0], 0);
        assert_eq!(fx.backend.read_bytes(i * 32 * 1024, 32 * 1024), data);
    }
    // Never more than 64 KiB (two requests) at the backend at once.
    assert!(fx.backend.max_inflight.load(Ordering::SeqCst) <= 2);
}

#[test]
fn get_vring_base_waits_for_inflight_requests() {
    let fx = fixture(options());
    *fx.backend.delay.lock() = Duration::from_millis(300);
    let mut drv = Driver::connect(&fx.path, 1, 0);
    let h = drv.buffer(&header(VIRTIO_BLK_T_FLUSH, 0));
    let st = drv.buffer(&[STATUS_UNTOUCHED]);
    let head = drv.write_descs(0, &[Desc(h, 16, false), Desc(st, 1, true)]);
    drv.publish(0, &[head]);
    // Once the backend has it, stop the ring.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.backend.inflight() == 0 {
        assert!(
            Instant::now() < deadline,
            "request never reached the backend"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    let base = drv.frontend.get_vring_base(0).unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "GET_VRING_BASE returned early"
    );
    assert_eq!(base, 1);
    // The completion is in the used ring already.
    let used = drv.wait_used(0, 1, Duration::from_millis(1));
    assert_eq!(used[0], (u32::from(head), 1));
    assert_eq!(drv.read_mem(st, 1)[0], 0);
}

/// Records the write-cache choices it is handed; refuses them when told to.
#[derive(Default)]
struct Keeper {
    records: parking_lot::Mutex<Vec<bool>>,
    refuse: AtomicBool,
}

impl WriteCacheKeeper for Keeper {
    fn record(&self, write_through: bool) -> Result<(), String> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err("the cluster metadata cannot be reached".into());
        }
        self.records.lock().push(write_through);
        Ok(())
    }
}

fn config_writeback(drv: &mut Driver) -> u8 {
    let (_, config) = drv
        .frontend
        .get_config(32, 1, VhostUserConfigFlags::empty(), &[0u8; 1])
        .unwrap();
    config[0]
}

fn wait_disconnected(fx: &Fixture) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while fx.export().stats().connected {
        assert!(Instant::now() < deadline, "disconnect not noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_guests_cache_choice_outlives_firmware_negotiation_and_reconnection() {
    let keeper = Arc::new(Keeper::default());
    let cache = Arc::new(WriteCache::new(false, Some(keeper.clone())));
    let fx = fixture_with_cache(options(), cache.clone());
    let mut drv = Driver::connect(&fx.path, 2, bit(VIRTIO_BLK_F_CONFIG_WCE));
    let full = drv.features;
    assert_ne!(full & bit(VIRTIO_BLK_F_CONFIG_WCE), 0);
    let fua = |fx: &Fixture| fx.backend.fua_writes.load(Ordering::SeqCst);
    let firmware = bit(VIRTIO_F_VERSION_1) | bit(30);

    // Write-back: writes go without FUA.
    assert_eq!(config_writeback(&mut drv), 1);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &[1; 512], 0).status, 0);
    assert_eq!(fua(&fx), 0);
    // Firmware (as SeaBIOS does) negotiates neither FLUSH nor CONFIG_WCE:
    // it cannot flush, so its writes are made durable at once...
    drv.frontend.set_features(firmware).unwrap();
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &[1; 512], 0).status, 0);
    assert_eq!(fua(&fx), 1);
    // ...and once the guest's driver negotiates, write-back again.
    drv.frontend.set_features(full).unwrap();
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &[1; 512], 0).status, 0);
    assert_eq!(fua(&fx), 1);

    // The guest chooses write-through: what was answered before is flushed
    // and the choice recorded before the frontend hears back.
    let flushes = fx.backend.flushes.load(Ordering::SeqCst);
    drv.frontend
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(fx.backend.flushes.load(Ordering::SeqCst), flushes + 1);
    assert_eq!(*keeper.records.lock(), vec![true]);
    assert_eq!(config_writeback(&mut drv), 0);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &[2; 512], 0).status, 0);
    assert_eq!(fua(&fx), 2);
    // Features sent again (dirty logging for a migration) and a reboot of
    // the guest inside the same QEMU (firmware, then driver) keep the
    // choice: QEMU goes on showing the guest its copy of the config space,
    // write-through, and that guest will never send a FLUSH.
    drv.frontend
        .set_features(full | bit(VHOST_F_LOG_ALL))
        .unwrap();
    drv.frontend.set_features(firmware).unwrap();
    drv.frontend.set_features(full).unwrap();
    assert_eq!(config_writeback(&mut drv), 0);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &[3; 512], 0).status, 0);
    assert_eq!(fua(&fx), 3);

    // The socket reconnects (basaltd restarted under a running QEMU): the
    // new connection starts from the choice, not from write-back.
    drop(drv);
    wait_disconnected(&fx);
    let mut drv = Driver::connect(&fx.path, 2, bit(VIRTIO_BLK_F_CONFIG_WCE));
    assert_eq!(config_writeback(&mut drv), 0);
    assert_eq!(
        drv.request(1, VIRTIO_BLK_T_OUT, 4096, &[4; 512], 0).status,
        0
    );
    assert_eq!(fua(&fx), 4);
    let stats = fx.export().stats();
    assert!(stats.write_through);
    assert_eq!(
        stats.write_through_writes, 4,
        "the firmware's write and three: {stats:?}"
    );

    // A choice the keeper cannot record is refused and changes nothing. (The
    // vhost-user library ends a connection after any refused request; QEMU
    // keeps its copy of the config space, write-through, and reconnects.)
    keeper.refuse.store(true, Ordering::SeqCst);
    assert!(
        drv.frontend
            .set_config(32, VhostUserConfigFlags::WRITABLE, &[1])
            .is_err()
    );
    drop(drv);
    wait_disconnected(&fx);
    let mut drv = Driver::connect(&fx.path, 2, bit(VIRTIO_BLK_F_CONFIG_WCE));
    assert_eq!(config_writeback(&mut drv), 0);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &[5; 512], 0).status, 0);
    assert_eq!(fua(&fx), 5);
    keeper.refuse.store(false, Ordering::SeqCst);
    drv.frontend
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[1])
        .unwrap();
    assert_eq!(*keeper.records.lock(), vec![true, false]);
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &[6; 512], 0).status, 0);
    assert_eq!(fua(&fx), 5);
    assert!(!cache.write_through());
}

#[test]
fn an_export_started_write_through_shows_it_before_any_negotiation() {
    // A migration's destination: its QEMU reads the config space once, at
    // start, before any feature is negotiated, and shows the guest that.
    let cache = Arc::new(WriteCache::new(true, None));
    let fx = fixture_with_cache(options(), cache);
    let mut frontend = vhost::vhost_user::Frontend::connect(&fx.path, 2).unwrap();
    frontend.get_features().unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(protocol).unwrap();
    let (_, config) = frontend
        .get_config(32, 1, VhostUserConfigFlags::empty(), &[0u8; 1])
        .unwrap();
    assert_eq!(config[0], 0, "write-through not shown before negotiation");
}

#[test]
fn config_space_describes_the_disk() {
    let fx = fixture(options());
    let mut drv = Driver::connect(&fx.path, 2, 0);
    let (_, config) = drv
        .frontend
        .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
        .unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(config[o..o + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().unwrap()),
        (DISK_SIZE / 512) as u64
    );
    assert_eq!(u32_at(12), 256); // seg_max: a 1 MiB write of 4 KiB pages is one request
    // size_max: seg_max * size_max within the backend's largest request, and
    // below 65536 sectors, which wraps SeaBIOS's 16-bit request size to zero.
    let largest = u64::from(u32_at(8)) * 256;
    assert!(largest <= u64::from(basalt_core::MAX_REQUEST_BYTES));
    assert!(largest / 512 < 65536);
    assert!(largest >= 1 << 20);
    assert_eq!(u32_at(20), 512); // blk_size
    assert_eq!(config[24], 3); // 4096-byte physical blocks
    assert_eq!(u16::from_le_bytes([config[26], config[27]]), 8); // min_io_size
    assert_eq!(config[32], 1); // write-back
    assert_eq!(u16::from_le_bytes([config[34], config[35]]), 2); // num_queues
    assert_eq!(u32_at(44), 8); // discard alignment
    assert_eq!(config[56], 1); // write zeroes may unmap

    // Switching to write-through makes writes FUA.
    drv.frontend
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(drv.request(0, VIRTIO_BLK_T_OUT, 0, &[1; 512], 0).status, 0);
    assert_eq!(fx.backend.fua_writes.load(Ordering::SeqCst), 1);
    // Read-only fields cannot be written.
    assert!(
        drv.frontend
            .set_config(0, VhostUserConfigFlags::WRITABLE, &[0; 8])
            .is_err()
    );
}

#[test]
fn max_segments_sets_seg_max_and_bad_values_are_refused() {
    let fx = fixture(VhostBlkOptions {
        max_segments: 126,
        ..options()
    });
    let mut drv = Driver::connect(&fx.path, 2, 0);
    let (_, config) = drv
        .frontend
        .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
        .unwrap();
    assert_eq!(u32::from_le_bytes(config[12..16].try_into().unwrap()), 126);
    for bad in [0, 1023] {
        let options = VhostBlkOptions {
            max_segments: bad,
            ..options()
        };
        assert!(options.validate().is_err(), "max_segments {bad} accepted");
    }
}

#[test]
fn read_only_export_refuses_writes() {
    let fx = fixture(VhostBlkOptions {
        read_only: true,
        ..options()
    });
    let mut drv = Driver::connect(&fx.path, 1, 0);
    assert_ne!(drv.features & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(drv.features & bit(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_OUT, 0, &[1; 512], 0).status,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        drv.request(0, VIRTIO_BLK_T_DISCARD, 0, &range(0, 8, 0), 0)
            .status,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(drv.request(0, VIRTIO_BLK_T_IN, 0, &[], 512).status, 0);
    assert_eq!(fx.backend.writes.load(Ordering::SeqCst), 0);
}

#[test]
fn dirty_pages_are_logged_for_migration() {
    let fx = fixture(options());
    let mut drv = Driver::connect(&fx.path, 1, bit(VHOST_F_LOG_ALL));
    assert_ne!(drv.features & bit(VHOST_F_LOG_ALL), 0);
    let log_len = 4096;
    let log = memfd("dirty-log", log_len);
    drv.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log_len as u64,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .unwrap();
    let log_map = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        log_len,
        Some(FileOffset::new(log.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let dirty = |gpa: u64| {
        let page = gpa / 4096;
        let byte: u8 = log_map.read_obj(GuestAddress(page / 8)).unwrap();
        byte & (1 << (page % 8)) != 0
    };

    fx.backend.write_bytes(0, &pattern(8192, 4));
    drv.next_buf = 8 << 20;
    let done = drv.request(0, VIRTIO_BLK_T_IN, 0, &[], 8192);
    assert_eq!(done.status, 0);
    // Header at 8 MiB (read only), data at 8 MiB + 4 KiB (two pages), status after it.
    let base = 8u64 << 20;
    assert!(!dirty(base), "a page the device only read is marked dirty");
    assert!(
        dirty(base + 4096) && dirty(base + 8192),
        "data pages not logged"
    );
    assert!(dirty(base + 3 * 4096), "status page not logged");
    assert!(dirty(drv.queues[0].used), "used ring not logged");
    assert!(!dirty(16 << 20), "an untouched page is marked dirty");
}

#[test]
fn reconnects_after_the_frontend_goes_away_and_stop_removes_the_socket() {
    let mut fx = fixture(options());
    for round in 0..3u8 {
        let mut drv = Driver::connect(&fx.path, 2, 0);
        let data = pattern(4096, round);
        assert_eq!(drv.request(1, VIRTIO_BLK_T_OUT, 0, &data, 0).status, 0);
        assert_eq!(drv.request(0, VIRTIO_BLK_T_IN, 0, &[], 4096).data, data);
        drop(drv);
        wait_disconnected(&fx);
    }
    assert_eq!(fx.export().stats().connections, 3);

    // A second export on the same path is refused while the first serves it.
    let other = VhostBlkExport::start(
        &fx.path,
        fx.backend.clone(),
        fx.runtime.handle().clone(),
        options(),
    );
    assert!(other.is_err());

    // Stop while a frontend is connected.
    let _drv = Driver::connect(&fx.path, 1, 0);
    fx.export.take().unwrap().stop();
    assert!(!fx.path.exists());
}

#[test]
fn options_are_validated() {
    let runtime = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new(4096, "x");
    for bad in [
        VhostBlkOptions {
            num_queues: 0,
            ..options()
        },
        VhostBlkOptions {
            num_queues: 65,
            ..options()
        },
        VhostBlkOptions {
            queue_size: 100,
            ..options()
        },
        VhostBlkOptions {
            logical_block_size: 1024,
            ..options()
        },
        VhostBlkOptions {
            worker_threads: 3,
            ..options()
        },
    ] {
        let started = VhostBlkExport::start(
            dir.path().join("s"),
            backend.clone(),
            runtime.handle().clone(),
            bad,
        );
        assert!(started.is_err());
    }
    // A regular file at the socket path is never removed.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep").unwrap();
    assert!(VhostBlkExport::start(&file, backend, runtime.handle().clone(), options()).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

#[test]
fn adjacent_writes_of_one_batch_reach_the_backend_as_one_write() {
    let fx = fixture(options());
    let mut drv = Driver::connect(&fx.path, 2, 0);
    // A 1 MiB write split the way Linux splits it (1016 KiB + 8 KiB), plus
    // an unrelated write further on, all published at once.
    let pieces: [(u64, usize, u8); 3] = [
        (0, 1016 << 10, 1),
        (1016 << 10, 8 << 10, 2),
        (4 << 20, 4096, 3),
    ];
    let mut heads = Vec::new();
    let mut statuses = Vec::new();
    for (offset, len, seed) in pieces {
        let h = drv.buffer(&header(VIRTIO_BLK_T_OUT, offset / 512));
        let d = drv.buffer(&pattern(len, seed));
        let st = drv.buffer(&[STATUS_UNTOUCHED]);
        heads.push(drv.write_descs(
            0,
            &[
                Desc(h, 16, false),
                Desc(d, len as u32, false),
                Desc(st, 1, true),
            ],
        ));
        statuses.push(st);
    }
    let before = fx.backend.writes.load(Ordering::SeqCst);
    drv.publish(0, &heads);
    assert_eq!(drv.wait_used(0, 3, Duration::from_secs(10)).len(), 3);
    for st in &statuses {
        assert_eq!(drv.read_mem(*st, 1)[0], 0, "status OK");
    }
    assert_eq!(
        fx.backend.writes.load(Ordering::SeqCst) - before,
        2,
        "the two adjacent pieces were merged, the third stayed apart"
    );
    for (offset, len, seed) in pieces {
        assert!(fx.backend.read_bytes(offset as usize, len) == pattern(len, seed));
    }

    // A merged write that fails fails every request it carries.
    *fx.backend.poison.lock() = Some((8 << 20) + 4096);
    let mut heads = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..2u64 {
        let h = drv.buffer(&header(VIRTIO_BLK_T_OUT, ((8 << 20) + i * 4096) / 512));
        let d = drv.buffer(&pattern(4096, 9));
        let st = drv.buffer(&[STATUS_UNTOUCHED]);
        heads.push(drv.write_descs(
            0,
            &[Desc(h, 16, false), Desc(d, 4096, false), Desc(st, 1, true)],
        ));
        statuses.push(st);
    }
    drv.publish(0, &heads);
    assert_eq!(drv.wait_used(0, 2, Duration::from_secs(10)).len(), 2);
    for st in &statuses {
        assert_eq!(drv.read_mem(*st, 1)[0], 1, "status IOERR");
    }
}

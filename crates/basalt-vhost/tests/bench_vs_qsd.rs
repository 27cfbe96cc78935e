//! Frontend overhead of the export against qemu-storage-daemon's
//! vhost-user-blk export, side by side in one run, on null disks (the
//! daemon's `null-co` driver, a backend that answers at once here), so only
//! the vhost-user-blk data path is measured.
//!
//! ```text
//! cargo test -p basalt-vhost --release --test bench_vs_qsd -- --ignored --nocapture
//! ```
//!
//! The test frontend behaves like a guest driver: it keeps `QD` requests in
//! flight on one queue, sleeps on the call eventfd (an interrupt), reaps every
//! completion, refills and kicks once per batch.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_core::{AllocationExtent, BlockBackend, BlockError, BoxFuture, IoBuf, WriteFlags};
use basalt_vhost::{VhostBlkExport, VhostBlkOptions};
use common::driver::{Desc, Driver};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

const DISK: u64 = 1 << 30;
const RUN: Duration = Duration::from_secs(3);

/// Answers every request at once: reads are zeros, writes are dropped.
struct NullBackend;

impl BlockBackend for NullBackend {
    fn size(&self) -> u64 {
        DISK
    }
    fn id(&self) -> String {
        "null".into()
    }
    fn read(&self, _offset: u64, len: u32) -> BoxFuture<'_, Result<IoBuf, BlockError>> {
        Box::pin(async move { Ok(IoBuf::zeroed(len as usize)) })
    }
    fn write(&self, _: u64, _: IoBuf, _: WriteFlags) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async { Ok(()) })
    }
    fn trim(&self, _: u64, _: u64) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(
        &self,
        _: u64,
        _: u64,
        _: bool,
        _: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(
        &self,
        _: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<AllocationExtent>, BlockError>> {
        Box::pin(async move {
            Ok(vec![AllocationExtent {
                length: len,
                hole: false,
                zero: true,
            }])
        })
    }
}

/// utime + stime of a /proc stat file, in clock ticks.
fn cpu_ticks(stat: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(stat).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU ticks used by the serving side: the whole qsd process, or this
/// process's export threads (vring workers, tokio workers, the socket thread).
fn server_ticks(qsd_pid: Option<u32>) -> u64 {
    if let Some(pid) = qsd_pid {
        return cpu_ticks(Path::new(&format!("/proc/{pid}/stat"))).map_or(0, |(_, t)| t);
    }
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Some((comm, ticks)) = cpu_ticks(&task.path().join("stat"))
            && (comm == "vring_worker"
                || comm.starts_with("tokio-runtime")
                || comm.starts_with("vhost-blk"))
        {
            total += ticks;
        }
    }
    total
}

/// Runs QD requests of `bs` bytes for RUN; returns (IOPS, mean latency µs,
/// server CPU µs per request).
fn drive(socket: &Path, qd: usize, bs: u32, write: bool, qsd_pid: Option<u32>) -> (f64, f64, f64) {
    let mut drv = Driver::connect_with(socket, 1, 0, false);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_sector = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % (DISK / u64::from(bs))) * u64::from(bs) / 512
    };
    let request_type = if write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    // Slot k: descriptors 3k..3k+2, fixed buffers; only the sector changes.
    let mut slots = Vec::new();
    for _ in 0..qd {
        let header = drv.buffer(&[0u8; 16]);
        let data = drv.buffer(&vec![0x11u8; bs as usize]);
        let status = drv.buffer(&[0xee]);
        let head = drv.write_descs(
            0,
            &[
                Desc(header, 16, false),
                Desc(data, bs, !write),
                Desc(status, 1, true),
            ],
        );
        slots.push((head, header));
    }
    let set_header = |drv: &Driver, header: u64, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        drv.mem.write_slice(&h, GuestAddress(header)).unwrap();
    };
    let mut submitted_at = vec![Instant::now(); qd];
    for (k, &(_, header)) in slots.iter().enumerate() {
        set_header(&drv, header, next_sector());
        submitted_at[k] = Instant::now();
    }
    let heads: Vec<u16> = slots.iter().map(|s| s.0).collect();
    drv.publish(0, &heads);

    let started = Instant::now();
    let ticks_before = server_ticks(qsd_pid);
    let mut done = 0u64;
    let mut latency = Duration::ZERO;
    while started.elapsed() < RUN {
        drv.wait_call(0, Duration::from_secs(1));
        let used = drv.poll_used(0);
        let mut again = Vec::with_capacity(used.len());
        for (id, _) in used {
            let k = slots.iter().position(|s| u32::from(s.0) == id).unwrap();
            latency += submitted_at[k].elapsed();
            done += 1;
            set_header(&drv, slots[k].1, next_sector());
            submitted_at[k] = Instant::now();
            again.push(slots[k].0);
        }
        if !again.is_empty() {
            drv.publish(0, &again);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_us = (server_ticks(qsd_pid) - ticks_before) as f64 / hz * 1e6;
    (
        done as f64 / secs,
        latency.as_secs_f64() * 1e6 / done.max(1) as f64,
        cpu_us / done.max(1) as f64,
    )
}

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qsd(socket: &Path) -> Option<Qsd> {
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=null-co,node-name=null0,size={DISK},read-zeroes=on"),
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=null0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                socket.display()
            ),
        ])
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    let qsd = Qsd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(qsd)
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn frontend_overhead_against_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let qsd_socket = dir.path().join("qsd.sock");
    let Some(qsd) = start_qsd(&qsd_socket) else {
        eprintln!("SKIP: qemu-storage-daemon not available");
        return;
    };
    let runtime = common::runtime();
    let socket = dir.path().join("basalt.sock");
    let export = VhostBlkExport::start(
        &socket,
        Arc::new(NullBackend),
        runtime.handle().clone(),
        VhostBlkOptions {
            num_queues: 1,
            ..VhostBlkOptions::default()
        },
    )
    .unwrap();

    let qsd_pid = Some(qsd.0.id());
    println!(
        "{:<20} {:>10} {:>10} {:>6} {:>14} {:>14} {:>6}",
        "job", "qsd IOPS", "basalt", "ratio", "qsd CPU/req", "basalt CPU/req", "ratio"
    );
    for (name, qd, bs, write) in [
        ("4k randread QD1", 1, 4096, false),
        ("4k randread QD32", 32, 4096, false),
        ("4k randwrite QD32", 32, 4096, true),
        ("64k randread QD8", 8, 65536, false),
    ] {
        let (qsd_iops, qsd_lat, qsd_cpu) = drive(&qsd_socket, qd, bs, write, qsd_pid);
        let (our_iops, our_lat, our_cpu) = drive(&socket, qd, bs, write, None);
        println!(
            "{name:<20} {qsd_iops:>10.0} {our_iops:>10.0} {:>6.2} {qsd_cpu:>11.2} µs {our_cpu:>11.2} µs {:>6.2}   (latency {qsd_lat:.1} vs {our_lat:.1} µs)",
            our_iops / qsd_iops,
            our_cpu / qsd_cpu,
        );
    }
    export.stop();
}

#!/usr/bin/env python3
"""The vhost-user-blk device alone against qemu-storage-daemon's, in one guest.

A diagnostic beside vm_bench.py's one-guest comparison: instead of a vdisk
on basaltd it exports a raw file (O_DIRECT, blocking pread/pwrite) or a null
disk through Basalt's device (`crates/basalt-vhost/examples/file_export.rs`,
no store) and qsd exports the same kind (`driver=file` with
`cache.direct=on`, or `null-co`). The test guest runs `ddpair` over both
disks, chunk by chunk, so the guest's figures show what the device itself
costs, and `--max-segments` shows what the request shape costs: with 256
(Basalt's default) a 1 MiB guest write is one request, with 126 (what qsd
shows) it is three.

    cargo build --release -p basalt-vhost --example file_export
    python3 bench/front_pair.py [--null] [--max-segments 256] [--rounds 7] [--runs 1]
    python3 bench/front_pair.py --control    # qsd on both disks: the harness's own bias

Needs qemu-system-x86_64, qemu-storage-daemon and the test guest
(tests/guest/build-guest.sh). Findings are in docs/benchmarks.md.
"""

import argparse
import os
import shutil
import statistics as st
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import vm_bench  # noqa: E402

DISK_MB = 1024


def one_run(args, exporter, scratch):
    """One guest over both disks; the per-round (write, read) ratios device/qsd."""
    ours, theirs = os.path.join(scratch, "ours.img"), os.path.join(scratch, "qsd.img")
    # Our disk is 64 MiB larger: the guest prints each disk's size.
    sizes = {ours: (DISK_MB + 64) << 20, theirs: DISK_MB << 20}
    if not args.null:
        for path, size in sizes.items():
            subprocess.run(["fallocate", "-l", str(size), path], check=True)
    our_sock, qsd_sock = os.path.join(scratch, "ours.sock"), os.path.join(scratch, "qsd.sock")
    disk = ["--null", str(sizes[ours])] if args.null else ["--file", ours]
    def qsd(path, size, sock):
        blockdev = (f"driver=null-co,node-name=d0,size={size},read-zeroes=on" if args.null
                    else f"driver=file,node-name=d0,filename={path},cache.direct=on,aio=io_uring")
        return subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev", blockdev, "--export",
             f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},"
             "writable=on,num-queues=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    if args.control:
        # qsd on both sides: what the harness itself favours.
        procs = [qsd(ours, sizes[ours], our_sock)]
    else:
        procs = [subprocess.Popen([exporter, *disk, "--socket", our_sock,
                                   "--max-segments", str(args.max_segments)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(qsd(theirs, sizes[theirs], qsd_sock))
    try:
        deadline = time.time() + 30
        while not (os.path.exists(our_sock) and os.path.exists(qsd_sock)):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("an export did not start")
            time.sleep(0.05)
        guest = vm_bench.GUEST_DIR
        _, text = vm_bench.run_qemu_until(
            vm_bench.qemu_args(os.path.join(guest, "vmlinuz"), os.path.join(guest, "initrd"),
                               f"basalt.test=ddpair basalt.ddmb={args.mb} "
                               f"basalt.ddrounds={args.rounds} basalt.ddchunk=64") +
            vm_bench.vhost_disks(our_sock, qsd_sock),
            "BASALT-DONE", timeout=1800)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    rounds = vm_bench.ddpair_rounds(text, sizes[ours] >> 9)
    if "ddpair PASS" not in text:
        raise RuntimeError(f"the guest's ddpair failed:\n{text[-2000:]}")
    for line in text.splitlines():
        if "BASALT-DDPAIR-DISK" in line:
            print("  " + line.split(": ", 1)[1])
    # Round 0 writes fresh disks; the ratio is time(qsd) / time(ours).
    return [(r["qsd"][1] / r["basalt"][1], r["qsd"][2] / r["basalt"][2])
            for n, r in sorted(rounds.items()) if n > 0 and len(r) == 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--null", action="store_true", help="null disks instead of raw files")
    parser.add_argument("--max-segments", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--mb", type=int, default=512, help="MiB per dd pass")
    parser.add_argument("--dir", default="/var/tmp/basalt-frontpair")
    parser.add_argument("--exporter", default=os.path.join(ROOT, "target/release/examples/file_export"))
    parser.add_argument("--control", action="store_true",
                        help="qsd on both disks: the ratios the harness gives two equal exports")
    args = parser.parse_args()
    if not args.control and not os.path.exists(args.exporter):
        sys.exit("build it first: cargo build --release -p basalt-vhost --example file_export")
    subprocess.run(["sh", os.path.join(ROOT, "tests/guest/build-guest.sh"), vm_bench.GUEST_DIR], check=True)
    kind = ("null" if args.null else "raw file") + (", qsd against qsd" if args.control else "")
    for run in range(args.runs):
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
        try:
            ratios = one_run(args, args.exporter, args.dir)
        finally:
            shutil.rmtree(args.dir, ignore_errors=True)
        writes, reads = [w for w, _ in ratios], [r for _, r in ratios]
        print(f"run {run + 1}, {kind}, max_segments {args.max_segments}: device/qsd write "
              f"{st.median(writes):.2f}x (rounds {min(writes):.2f}-{max(writes):.2f}), "
              f"read {st.median(reads):.2f}x (rounds {min(reads):.2f}-{max(reads):.2f})")


if __name__ == "__main__":
    main()

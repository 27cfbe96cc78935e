#!/usr/bin/env python3
"""A guest with a reader and a writer in flight together, for the cost of
answering requests in order (docs/vhost-user-blk.md, "Answers in order").

The test guest (tests/guest/build-guest.sh) turns its Basalt disk to
write-through and writes its sequence, one 4 KiB O_DIRECT write at a time
(each a FUA write, answered once synced), while a second process reads
64 KiB blocks O_DIRECT, one at a time (`basalt.seqreader=1`). A fast read
taken after a slow write waits for the write's answer. The script counts
writes and reads per second over a window, for each build given, in turn.

A rough check, not a benchmark with a peer: every guest operation starts a
`dd` process under TCG, which costs more than the I/O itself; runs of the
same build spread by ±20 %.

    bench/mixed_guest.py --bin-dir /tmp/a --bin-dir /tmp/b [--rounds 2] [--seconds 30]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import vm_bench  # noqa: E402


def last(text, tag):
    found = re.findall(rf"{tag}: (\d+)", text)
    return int(found[-1]) if found else 0


def measure(bin_dir, work, seconds):
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    node = vm_bench.Node(work, "node1", os.path.join(bin_dir, "basaltd"),
                         os.path.join(bin_dir, "basalt"))
    try:
        time.sleep(2)  # the node offers its VM capacity
        node.cli("vdisk", "create", "mixed", "--size", "128M", "--rf", "1")
        node.cli("vm", "create", "mixed", "--memory", "256M", "--disk", "mixed",
                 "--kernel", os.path.join(vm_bench.GUEST_DIR, "vmlinuz"),
                 "--initrd", os.path.join(vm_bench.GUEST_DIR, "initrd"),
                 "--cmdline", f"{vm_bench.CMDLINE} basalt.test=writethrough,seq "
                              "basalt.seq=1000000 basalt.seqreader=1")
        node.cli("vm", "start", "mixed")
        deadline = time.time() + 120
        while last(node.console("mixed"), "BASALT-SEQ") < 100:
            if time.time() > deadline:
                raise RuntimeError("the guest does not write")
            time.sleep(0.5)
        text = node.console("mixed")
        writes, reads, start = last(text, "BASALT-SEQ"), last(text, "BASALT-READS"), time.time()
        time.sleep(seconds)
        text = node.console("mixed")
        took = time.time() - start
        return ((last(text, "BASALT-SEQ") - writes) / took,
                (last(text, "BASALT-READS") - reads) / took)
    finally:
        node.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", action="append", required=True,
                        help="a directory with basaltd and basalt (repeat to compare)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--dir", default="/var/tmp/basalt-mixed")
    args = parser.parse_args()
    subprocess.run(["sh", os.path.join(ROOT, "tests/guest/build-guest.sh"), vm_bench.GUEST_DIR],
                   check=True, stdout=subprocess.DEVNULL)
    results = {d: [] for d in args.bin_dir}
    try:
        for _ in range(args.rounds):
            for bin_dir in args.bin_dir:
                writes, reads = measure(bin_dir, args.dir, args.seconds)
                results[bin_dir].append((writes, reads))
                print(f"{bin_dir}: writes {writes:.1f}/s, reads {reads:.1f}/s", flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    for bin_dir, runs in results.items():
        w = sorted(r[0] for r in runs)
        r = sorted(r[1] for r in runs)
        print(f"{bin_dir}: writes {w[len(w) // 2]:.1f}/s (runs {w[0]:.1f}-{w[-1]:.1f}), "
              f"reads {r[len(r) // 2]:.1f}/s (runs {r[0]:.1f}-{r[-1]:.1f})")


if __name__ == "__main__":
    main()

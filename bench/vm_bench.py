#!/usr/bin/env python3
"""Basalt VM benchmark: the tiny test guest (tests/guest/build-guest.sh) under
QEMU/TCG, in one run:

  boot      time from start to the guest's init seeing its data disk, with
            the disk on Basalt (`basalt vm start`, vhost-user-blk) and on a
            local raw file (QEMU virtio-blk, cache=none, io_uring)
  dd        guest-side sequential O_DIRECT write then read (1 MiB requests)
            through Basalt's vhost-user-blk and through qemu-storage-daemon's
            vhost-user-blk export of a raw file (the peer), same QEMU options;
            the first --warmup passes write fresh disks and are reported
            apart (see docs/benchmarks.md)
  dd-pair   the same dd, but one guest with both disks (Basalt's export and
            qsd's) doing its passes on them in turn (--pair-rounds rounds,
            the first disk alternating): both are measured side by side in
            the same seconds, so the host's swings (qsd alone ranges 2x
            between VM runs on a shared machine) hit both alike; per-round
            ratios, the first round (fresh disks) apart; since 2026-11-28 the
            guest runs --pair-runs times (default --repeat) and the rounds of
            all runs are pooled, with a 95 % bootstrap interval for the
            median ratio and each run's median. Since 2026-11-26
            20:20 each pass is cut into --pair-chunk-mb chunks (64) and the
            disks take turns chunk by chunk (0: whole passes, as before);
            also the CPU time basaltd and qsd spent per GiB the guest
            moved through them (an HCI node shares its CPUs with the VMs),
            and the requests and interrupts each disk cost the guest, and
            how long its writes took as the guest's block layer timed them
  fio       fio in the same one-guest setup (Debian's fio on a third,
            read-only disk built by tests/guest/build-fio-disk.sh): 1 MiB
            sequential writes at depth 1 and 4, 512 KiB sequential writes at
            depth 2 (each half an extent), reads at depth 4, 4 KiB random
            reads and writes at depth 32, 4 KiB random writes at depth 1
            (IOPS and completion latency), and a 4 KiB random read at depth 1
            beside a 1 MiB writer at depth 4 (the reader's latency shows
            requests waiting behind the writer's); --fio-rounds rounds, the
            first disk alternating, ratios per round; since 2026-11-28 the
            guest runs --fio-runs times (default --repeat) and the rounds of
            all runs are pooled, with the same bootstrap interval as dd-pair
  migrate   live migration of a 512 MiB guest between two Basalt nodes on
            this machine: QEMU's downtime and the total time (`vm show`)

Every measurement is repeated (--repeat) with the targets in turn; medians
are printed with the ratios. Absolute numbers on shared machines are noise.

Usage: bench/vm_bench.py [--dir /var/tmp/basalt-vmbench] [--repeat 3]
                         [--dd-mb 512] [--warmup 2] [--pair-rounds 7] [--pair-runs N] [--pair-chunk-mb 64]
                         [--pair-write-through]
                         [--no-build]
                         [--fio-rounds 2] [--fio-runs N] [--fio-runtime 5] [--fio-mb 256] [--fio-jobs a,b]
                         [--only boot,dd,pair,fio,migrate] [--bin-dir target/release]
                         [--json results.json]
Needs: qemu-system-x86_64, qemu-storage-daemon, fio, what build-guest.sh needs,
a release build (`cargo build --release --bins`, done unless --no-build).
"""
import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_DIR = os.environ.get("BASALT_GUEST_DIR", "/var/tmp/basalt-guest")
CMDLINE = "console=ttyS0 quiet panic=-1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{api}/api/v1/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"basaltd at {api} did not start")


class Node:
    """A release basaltd on 127.0.0.1 with its own directory."""

    def __init__(self, workdir, name, binary, cli, join=None):
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.api = f"127.0.0.1:{free_port()}"
        self.listen_port = free_port()
        self.cli_bin = cli
        args = [binary, "--data-dir", os.path.join(self.dir, "data"),
                "--disk", os.path.join(self.dir, "disk.img") + ":8G",
                "--api", self.api, "--nbd", f"127.0.0.1:{free_port()}",
                "--listen", f"127.0.0.1:{self.listen_port}", "--vm-accel", "tcg",
                "--no-rebalance"]
        if join:
            args += ["--join", f"127.0.0.1:{join}"]
        self.log = open(os.path.join(self.dir, "basaltd.log"), "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.api)

    def cli(self, *args, check=True):
        out = subprocess.run([self.cli_bin, "--api", f"http://{self.api}", "--json", *args],
                             capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"basalt {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout) if out.stdout.strip() else None

    def console(self, vm):
        out = subprocess.run([self.cli_bin, "--api", f"http://{self.api}", "vm", "console", vm],
                             capture_output=True, text=True)
        return out.stdout

    def node_id(self):
        return self.cli("cluster", "status")["node_id"]

    def stop(self):
        # Its VMs first (QEMU outlives basaltd by design).
        for vm in self.cli("vm", "list", check=False) or []:
            if vm["state"] != "stopped":
                self.cli("vm", "stop", vm["name"], "--force", check=False)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_console(node, vm, needle, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = node.console(vm)
        if needle in text:
            return text
        time.sleep(0.05)
    raise RuntimeError(f"{needle!r} not on the console of {vm}")


def wait_state(node, vm, state, timeout=300, interval=0.1):
    # Straight to the API rather than through the CLI: a CLI process every
    # poll would take CPU from the guest being measured.
    deadline = time.time() + timeout
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://{node.api}/api/v1/vms/{vm}", timeout=5) as reply:
            shown = json.loads(reply.read())
        if shown["state"] == state:
            return shown
        time.sleep(interval)
    raise RuntimeError(f"VM {vm} is not {state}")


def qemu_args(kernel, initrd, cmdline, memory="256"):
    # One vCPU with room for a second, as basaltd starts a one-vCPU VM under
    # TCG: QEMU before 8.1 leaves the guest's memory barriers out when no
    # second vCPU can exist, and a vhost-user disk then hangs now and then
    # (docs/vms.md, "QEMU").
    return ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-smp", "1,maxcpus=2", "-m", f"{memory}M",
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd, "-append", f"{CMDLINE} {cmdline}"]


def vhost_disks(*sockets):
    """QEMU options for guest RAM that a vhost-user backend can map (256 MiB,
    as `qemu_args` gives) and one vhost-user-blk disk, one queue, per socket,
    in order (the guest's vda, vdb, ...)."""
    args = ["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem"]
    for i, sock in enumerate(sockets):
        args += ["-chardev", f"socket,id=c{i},path={sock}",
                 "-device", f"vhost-user-blk-pci,chardev=c{i},num-queues=1"]
    return args


def run_qemu_until(args, needle, timeout=300):
    """Runs QEMU; returns (seconds until `needle` on the serial console,
    whole console once the guest powered off)."""
    start = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = None
    text = b""
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = start + timeout
    while time.time() < deadline:
        chunk = proc.stdout.read()
        if chunk:
            text += chunk
            if seen is None and needle.encode() in text:
                seen = time.time() - start
        if proc.poll() is not None:
            rest = proc.stdout.read()
            if rest:
                text += rest
            break
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if seen is None:
        raise RuntimeError(f"{needle!r} never appeared:\n{text.decode(errors='replace')[-2000:]}")
    return seen, text.decode(errors="replace")


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_interval(ratios_by_run, resamples=2000, seed=0):
    """A 95 % interval for the median of pooled per-round ratios, by a
    two-level bootstrap: runs drawn with replacement, then rounds within
    each drawn run. Rounds of one run share that run's host conditions,
    so resampling rounds alone would claim more certainty than there is."""
    rng = random.Random(seed)
    medians = []
    for _ in range(resamples):
        pooled = []
        for run in rng.choices(ratios_by_run, k=len(ratios_by_run)):
            pooled.extend(rng.choices(run, k=len(run)))
        medians.append(statistics.median(pooled))
    medians.sort()
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def pooled_ratio(ratios_by_run):
    """The median of pooled per-round ratios with their range, and, over
    several runs, the 95 % interval of `median_interval` and each run's
    median: "1.02x (rounds 0.90-1.10x; 95% interval ...; runs ...)"."""
    ratios = [x for run in ratios_by_run for x in run]
    text = (f"{statistics.median(ratios):.2f}x "
            f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x")
    if len(ratios_by_run) > 1:
        low, high = median_interval(ratios_by_run)
        per_run = ", ".join(f"{statistics.median(run):.2f}" for run in ratios_by_run)
        text += f"; 95% interval {low:.2f}-{high:.2f}x; runs {per_run}"
    return text + ")"


def guest_runs(count, qemu_command, test, rounds_of, expected_rounds, timeout):
    """Boots the one-guest comparison `test` `count` times with the same
    command; returns each run's rounds in order (each round with both
    targets) and the console text of the last run."""
    runs = []
    for _ in range(count):
        _, text = run_qemu_until(qemu_command, "BASALT-DONE", timeout=timeout)
        rounds = rounds_of(text)
        if f"{test} PASS" not in text or len(rounds) != expected_rounds or \
                any(len(r) != 2 for r in rounds.values()):
            raise RuntimeError(f"the one-guest {test} did not finish:\n{text[-3000:]}")
        runs.append([rounds[r] for r in sorted(rounds)])
    return runs, text


def ddpair_rounds(text, basalt_sectors):
    """The guest's `ddpair` lines: round -> {"basalt" | "qsd": (mb, write_s,
    read_s)}; the disks are told apart by size (`basalt_sectors`)."""
    rounds = {}
    for m in re.finditer(r"BASALT-DDPAIR: round=(\d+) disk=\w+ sectors=(\d+) mb=(\d+) "
                         r"write_s=([\d.]+) read_s=([\d.]+)", text):
        target = "basalt" if int(m.group(2)) == basalt_sectors else "qsd"
        rounds.setdefault(int(m.group(1)), {})[target] = (
            int(m.group(3)), float(m.group(4)), float(m.group(5)))
    return rounds


def pair_write_split(text, rounds, disk_targets):
    """Per target, from the guest's `/sys/block/*/stat` after a pair run
    (`text`, its console; `rounds`, that run's rounds in order):
    write requests per MiB written, their mean time in the device as the
    guest's block layer times them (flushes apart), and, where each MiB is
    one request (the guest waits for one request at a time), each MiB split
    into the device's part (writes and flushes) and the guest's own part
    (the rest of the write passes: dd, building and completing requests).
    With several requests per MiB in flight together their times overlap,
    so no split is given."""
    split = {}
    for m in re.finditer(r"BASALT-DDPAIR-COST: disk=(\w+) .*writes=(\d+) .*write_ms=(\d+) "
                         r"flush_ms=(\d+)", text):
        target = disk_targets.get(m.group(1))
        writes, write_ms, flush_ms = int(m.group(2)), int(m.group(3)), int(m.group(4))
        if target is None or writes == 0:
            continue
        total_s = sum(r[target]["write_s"] for r in rounds)
        total_mb = sum(r[target]["mb"] for r in rounds)
        per_mib = writes / total_mb
        figures = {"requests_per_mib": per_mib, "latency_us": write_ms * 1000 / writes}
        if per_mib < 1.1:
            device_s = (write_ms + flush_ms) / 1000
            figures["device_us_per_mib"] = device_s / total_mb * 1e6
            figures["guest_us_per_mib"] = (total_s - device_s) / total_mb * 1e6
        split[target] = figures
    return split


def dd_figures(text):
    m = re.search(r"BASALT-DD: mb=(\d+) write_s=([\d.]+) read_s=([\d.]+)", text)
    if not m:
        raise RuntimeError(f"no BASALT-DD line:\n{text[-2000:]}")
    mb, write_s, read_s = int(m.group(1)), float(m.group(2)), float(m.group(3))
    return mb / max(write_s, 0.01), mb / max(read_s, 0.01)


PARTS = ("boot", "dd", "pair", "fio", "migrate")

# fio's terse format, version 3: 0-based fields (see fio's HOWTO, "Terse output").
TERSE_JOB = 2
TERSE_READ_BW_KIB, TERSE_READ_IOPS, TERSE_READ_CLAT_PCT = 6, 7, range(17, 37)
TERSE_WRITE_BW_KIB, TERSE_WRITE_IOPS, TERSE_WRITE_CLAT_PCT = 47, 48, range(58, 78)

# What each fio job of the guest's `fiopair` is judged by: (label, job name
# in fio's output, figure, higher is better).
FIO_FIGURES = [
    ("seq write 1M QD1 (MB/s)", "seqwrite", "write_mbs", True),
    ("seq write 1M QD4 (MB/s)", "seqwrite-qd4", "write_mbs", True),
    ("seq write 1M QD4 p50 (us)", "seqwrite-qd4", "write_p50_us", False),
    ("seq write 1M QD4 p99 (us)", "seqwrite-qd4", "write_p99_us", False),
    ("seq write 512k QD2 (MB/s)", "seqwrite-512k", "write_mbs", True),
    ("seq read 1M QD4 (MB/s)", "seqread-qd4", "read_mbs", True),
    ("seq read 1M QD4 p50 (us)", "seqread-qd4", "read_p50_us", False),
    ("seq read 1M QD4 p99 (us)", "seqread-qd4", "read_p99_us", False),
    ("rand read 4k QD32 (IOPS)", "randread", "read_iops", True),
    ("rand write 4k QD32 (IOPS)", "randwrite", "write_iops", True),
    ("rand write 4k QD1 (IOPS)", "randwrite-qd1", "write_iops", True),
    ("rand write 4k QD1 p50 (us)", "randwrite-qd1", "write_p50_us", False),
    ("rand write 4k QD1 p99 (us)", "randwrite-qd1", "write_p99_us", False),
    ("beside a writer: rand read 4k QD1 p50 (us)", "probe", "read_p50_us", False),
    ("beside a writer: rand read 4k QD1 p99 (us)", "probe", "read_p99_us", False),
    ("beside a writer: the writer (MB/s)", "bulk", "write_mbs", True),
]


def terse_percentile(fields, indices, percent):
    """The completion-latency percentile `percent` (µs) from a terse line."""
    for i in indices:
        key, _, value = fields[i].partition("=")
        if key.endswith("%") and abs(float(key[:-1]) - percent) < 1e-6:
            return float(value)
    raise RuntimeError(f"no {percent}% percentile in fio's terse line")


def fio_rounds(text, basalt_sectors):
    """The guest's `BASALT-FIO` lines: round -> target -> fio job -> figures."""
    rounds = {}
    for m in re.finditer(r"BASALT-FIO: round=(\d+) disk=\w+ sectors=(\d+) job=\S+ (\S+)", text):
        fields = m.group(3).split(";")
        target = "basalt" if int(m.group(2)) == basalt_sectors else "qsd"
        rounds.setdefault(int(m.group(1)), {}).setdefault(target, {})[fields[TERSE_JOB]] = {
            "read_mbs": float(fields[TERSE_READ_BW_KIB]) * 1024 / 1e6,
            "write_mbs": float(fields[TERSE_WRITE_BW_KIB]) * 1024 / 1e6,
            "read_iops": float(fields[TERSE_READ_IOPS]),
            "write_iops": float(fields[TERSE_WRITE_IOPS]),
            "read_p50_us": terse_percentile(fields, TERSE_READ_CLAT_PCT, 50),
            "read_p99_us": terse_percentile(fields, TERSE_READ_CLAT_PCT, 99),
            "write_p50_us": terse_percentile(fields, TERSE_WRITE_CLAT_PCT, 50),
            "write_p99_us": terse_percentile(fields, TERSE_WRITE_CLAT_PCT, 99),
        }
    return rounds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/basalt-vmbench")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dd-mb", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2,
                        help="dd passes per target on fresh disks, reported apart")
    parser.add_argument("--pair-rounds", type=int, default=7,
                        help="rounds of the one-guest dd comparison (the first on fresh disks)")
    parser.add_argument("--pair-runs", type=int,
                        help="guest runs of the one-guest dd comparison, pooled (default: --repeat)")
    parser.add_argument("--pair-chunk-mb", type=int, default=64,
                        help="the one-guest comparison alternates the disks every this many MiB "
                             "(0: whole passes); must divide --dd-mb")
    parser.add_argument("--fio-rounds", type=int, default=2,
                        help="rounds of the one-guest fio comparison")
    parser.add_argument("--fio-runs", type=int,
                        help="guest runs of the one-guest fio comparison, pooled (default: --repeat)")
    parser.add_argument("--fio-runtime", type=int, default=5, help="seconds per fio job and disk")
    parser.add_argument("--fio-mb", type=int, default=256, help="MiB of each disk fio works on")
    parser.add_argument("--fio-jobs", help="comma-separated fio jobs to run (default: all); "
                                           "names as in FIO_FIGURES ('mixed' runs bulk and probe)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated parts to run: " + ", ".join(PARTS))
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--pair-write-through", action="store_true",
                        help="dd-pair with both disks write-through (the guest "
                             "switches them; qsd's export gets writethrough=on)")
    parser.add_argument("--bin-dir",
                        help="where basaltd and basalt are (to compare builds; implies --no-build)")
    parser.add_argument("--json")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    fio_runs = args.repeat if args.fio_runs is None else args.fio_runs
    if fio_runs < 1:
        parser.error("--fio-runs must be at least 1")
    pair_runs = args.repeat if args.pair_runs is None else args.pair_runs
    if pair_runs < 1:
        parser.error("--pair-runs must be at least 1")
    if args.pair_chunk_mb < 0 or (args.pair_chunk_mb and args.dd_mb % args.pair_chunk_mb):
        parser.error("--pair-chunk-mb must be 0 or divide --dd-mb")
    if not parts <= set(PARTS):
        parser.error(f"--only takes {', '.join(PARTS)}; got {args.only}")

    if not args.no_build and args.bin_dir is None:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    subprocess.run(["sh", os.path.join(ROOT, "tests/guest/build-guest.sh"), GUEST_DIR], check=True)
    if "fio" in parts:
        subprocess.run(["sh", os.path.join(ROOT, "tests/guest/build-fio-disk.sh"), GUEST_DIR], check=True)
    kernel = os.path.join(GUEST_DIR, "vmlinuz")
    initrd = os.path.join(GUEST_DIR, "initrd")
    bin_dir = args.bin_dir or os.path.join(ROOT, "target/release")
    binary = os.path.join(bin_dir, "basaltd")
    cli = os.path.join(bin_dir, "basalt")
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    results = {"boot_s": {"basalt": [], "raw": []}, "dd_write_mbs": {"basalt": [], "qsd": []},
               "dd_read_mbs": {"basalt": [], "qsd": []}, "migration": [],
               "warmup_dd_write_mbs": {"basalt": [], "qsd": []},
               "warmup_dd_read_mbs": {"basalt": [], "qsd": []},
               "pair_runs": [], "pair_disks": {}, "fio_runs": []}
    nodes = []
    qsd = None
    try:
        first = Node(args.dir, "node1", binary, cli)
        nodes.append(first)
        second = Node(args.dir, "node2", binary, cli, join=first.listen_port)
        nodes.append(second)
        deadline = time.time() + 30
        while len(first.cli("cluster", "status")["nodes"]) < 2 or \
                second.cli("cluster", "status", check=False) is None:
            if time.time() > deadline:
                raise RuntimeError("node2 did not join")
            time.sleep(0.2)
        time.sleep(2)  # both offer their VM capacity
        disk_mb = max(args.dd_mb, 64) + 64

        # --- boot ---------------------------------------------------------------
        raw = os.path.join(args.dir, "raw.img")
        with open(raw, "wb") as f:
            f.truncate(disk_mb << 20)
        if "boot" in parts:
            first.cli("vdisk", "create", "boot-data", "--size", f"{disk_mb}M", "--rf", "1")
            first.cli("vm", "create", "boot", "--memory", "256M", "--disk", "boot-data",
                      "--kernel", kernel, "--initrd", initrd, "--cmdline", f"{CMDLINE} basalt.test=info")
            for i in range(args.repeat):
                for target in (["basalt", "raw"] if i % 2 == 0 else ["raw", "basalt"]):
                    if target == "basalt":
                        start = time.time()
                        first.cli("vm", "start", "boot")
                        wait_console(first, "boot", "BASALT-INFO: size_sectors")
                        results["boot_s"]["basalt"].append(time.time() - start)
                        wait_state(first, "boot", "stopped")
                    else:
                        seen, _ = run_qemu_until(
                            qemu_args(kernel, initrd, "basalt.test=info") +
                            ["-drive", f"file={raw},if=virtio,format=raw,cache=none,aio=io_uring"],
                            "BASALT-INFO: size_sectors")
                        results["boot_s"]["raw"].append(seen)

        # --- dd -----------------------------------------------------------------
        if parts & {"dd", "pair", "fio"}:
            first.cli("vdisk", "create", "dd-data", "--size", f"{disk_mb}M", "--rf", "1")
            first.cli("vm", "create", "dd", "--memory", "256M", "--disk", "dd-data",
                      "--kernel", kernel, "--initrd", initrd,
                      "--cmdline", f"{CMDLINE} basalt.test=ddbench basalt.ddmb={args.dd_mb}")
            sock = os.path.join(args.dir, "qsd.sock")
            # With --pair-write-through the guest makes both disks
            # write-through; qsd's export then syncs after every write
            # (writethrough=on), as Basalt makes every such write durable.
            writethrough = ",writethrough=on" if args.pair_write_through else ""
            qsd = subprocess.Popen([
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={raw},cache.direct=on,aio=io_uring",
                "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on,num-queues=1{writethrough}",
            ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 10
            while not os.path.exists(sock):
                if time.time() > deadline:
                    raise RuntimeError("qemu-storage-daemon did not start")
                time.sleep(0.05)
            # The first passes write fresh disks: qsd's raw file is sparse and
            # Basalt's copy-on-write writes fresh (never written) slots until the
            # slots of earlier passes come free. Those passes are reported on
            # their own; the comparison is on the passes after them.
            for i in range(args.warmup + args.repeat if "dd" in parts else 0):
                for target in (["basalt", "qsd"] if i % 2 == 0 else ["qsd", "basalt"]):
                    if target == "basalt":
                        first.cli("vm", "start", "dd")
                        wait_state(first, "dd", "stopped", timeout=600, interval=0.5)
                        text = first.console("dd")
                    else:
                        _, text = run_qemu_until(
                            qemu_args(kernel, initrd, f"basalt.test=ddbench basalt.ddmb={args.dd_mb}") +
                            vhost_disks(sock),
                            "BASALT-DONE", timeout=600)
                    write, read = dd_figures(text)
                    phase = "warmup_" if i < args.warmup else ""
                    results[f"{phase}dd_write_mbs"][target].append(write)
                    results[f"{phase}dd_read_mbs"][target].append(read)

        # --- dd-pair: one guest, both disks ---------------------------------------
        # Basalt's disk is 64 MiB larger than qsd's raw file: the guest prints
        # each disk's size, which tells them apart.
        if "pair" in parts:
            first.cli("vdisk", "create", "pair-data", "--size", f"{disk_mb + 64}M", "--rf", "1")
            basalt_sock = first.cli("vdisk", "export", "pair-data", "--vhost")["socket"]
            basalt_sectors = (disk_mb + 64) << 11
            cpu_before = {"basalt": cpu_seconds(first.proc.pid), "qsd": cpu_seconds(qsd.pid)}
            # One guest run's rounds are not independent samples of the
            # ratio (they share the host's mood of that half minute), so
            # the guest runs --pair-runs times and the figures pool them.
            results["pair_runs"], text = guest_runs(
                pair_runs,
                qemu_args(kernel, initrd, f"basalt.test=ddpair basalt.ddmb={args.dd_mb} "
                                          f"basalt.ddrounds={args.pair_rounds} "
                                          f"basalt.ddchunk={args.pair_chunk_mb}" +
                                          (" basalt.ddwt=1" if args.pair_write_through else "")) +
                vhost_disks(basalt_sock, sock),
                "ddpair",
                lambda text: {rnd: {target: {"write_mbs": mb / max(write_s, 0.01),
                                             "read_mbs": mb / max(read_s, 0.01),
                                             "mb": mb, "write_s": write_s}
                                    for target, (mb, write_s, read_s) in disks.items()}
                              for rnd, disks in ddpair_rounds(text, basalt_sectors).items()},
                args.pair_rounds, timeout=1800)
            # What each backend spent on the CPU over the whole guest runs
            # (basaltd also keeps its idle cluster chores going meanwhile).
            moved_gib = 2 * pair_runs * args.pair_rounds * args.dd_mb / 1024
            results["pair_cpu_s_per_gib"] = {
                target: (cpu_seconds(pid) - cpu_before[target]) / moved_gib
                for target, pid in (("basalt", first.proc.pid), ("qsd", qsd.pid))}
            # What each device told the guest (request limits, cache mode),
            # and what each disk cost it, from the last run.
            results["pair_disks"] = {}
            disk_targets = {}
            for m in re.finditer(r"BASALT-DDPAIR-DISK: disk=(\w+) sectors=(\d+) (.*)", text):
                target = "basalt" if int(m.group(2)) == basalt_sectors else "qsd"
                disk_targets[m.group(1)] = target
                results["pair_disks"][target] = m.group(3).strip()
            # What each disk cost the guest: requests and interrupts.
            results["pair_cost"] = {}
            for m in re.finditer(r"BASALT-DDPAIR-COST: disk=(\w+) (.*)", text):
                results["pair_cost"][disk_targets.get(m.group(1), m.group(1))] = m.group(2).strip()
            results["pair_write_split_us"] = pair_write_split(text, results["pair_runs"][-1], disk_targets)
            first.cli("vdisk", "unexport", "pair-data", "--vhost")

        # --- fio: one guest, both disks, fio from a third disk -------------------
        if "fio" in parts:
            first.cli("vdisk", "create", "fio-data", "--size", f"{disk_mb + 64}M", "--rf", "1")
            basalt_sock = first.cli("vdisk", "export", "fio-data", "--vhost")["socket"]
            basalt_sectors = (disk_mb + 64) << 11
            fio_img = os.path.join(GUEST_DIR, "fio.img")
            # Like the dd pair, the guest runs several times and the rounds
            # of all runs are pooled (each run boots afresh: a run's rounds
            # share its host conditions, runs less so).
            results["fio_runs"], _ = guest_runs(
                fio_runs,
                qemu_args(kernel, initrd, f"basalt.test=fiopair basalt.fiomb={min(args.fio_mb, disk_mb)} "
                                          f"basalt.fiorounds={args.fio_rounds} "
                                          f"basalt.fioruntime={args.fio_runtime}" +
                                          (f" basalt.fiojobs={args.fio_jobs}" if args.fio_jobs else "")) +
                vhost_disks(basalt_sock, sock) +
                ["-drive", f"file={fio_img},if=none,id=tools,format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=tools"],
                "fiopair",
                lambda text: fio_rounds(text, basalt_sectors),
                args.fio_rounds, timeout=3600)
            first.cli("vdisk", "unexport", "fio-data", "--vhost")
        if qsd:
            qsd.terminate()
            qsd.wait()
            qsd = None

        # --- migration ----------------------------------------------------------
        if "migrate" in parts:
            first.cli("vdisk", "create", "mig-data", "--size", "64M", "--rf", "2")
            first.cli("vm", "create", "mig", "--memory", "512M", "--disk", "mig-data",
                      "--kernel", kernel, "--initrd", initrd, "--cmdline", f"{CMDLINE} basalt.test=idle")
            first.cli("vm", "start", "mig")
            wait_console(first, "mig", "BASALT-ALIVE: 2")
            ids = {first.node_id(): first, second.node_id(): second}
            for i in range(args.repeat):
                shown = first.cli("vm", "show", "mig")
                here = shown["node"]
                there = next(n for n in ids if n != here)
                start = time.time()
                moved = ids[here].cli("vm", "migrate", "mig", "--to", str(there))
                wall = time.time() - start
                results["migration"].append({
                    "downtime_ms": moved["last_migration_downtime_ms"],
                    "total_ms": moved["last_migration_total_ms"],
                    "cli_s": wall,
                })
                # The guest runs on: its heartbeat goes on after the switch-over.
                text = ids[there].console("mig")
                count = max((int(n) for n in re.findall(r"BASALT-ALIVE: (\d+)", text)), default=0)
                wait_console(ids[there], "mig", f"BASALT-ALIVE: {count + 2}", timeout=60)
    finally:
        if qsd:
            qsd.kill()
            qsd.wait()
        for node in nodes:
            node.stop()
    # Only after a run that finished: a failed one leaves its logs behind.
    shutil.rmtree(args.dir, ignore_errors=True)

    med = statistics.median
    print(f"\nVM benchmark, {args.repeat} repeats (medians), TCG, {args.dd_mb} MiB dd")
    if "boot" in parts:
        b, r = med(results["boot_s"]["basalt"]), med(results["boot_s"]["raw"])
        print(f"boot to init: basalt {b:.2f} s (vm start to init), raw file {r:.2f} s (QEMU start to init), ratio raw/basalt {r / b:.2f}x")
    for key, label in (("dd_write_mbs", "dd write"), ("dd_read_mbs", "dd read")):
        if results[key]["basalt"]:
            b, q = med(results[key]["basalt"]), med(results[key]["qsd"])
            print(f"{label}: basalt {b:.0f} MB/s, qsd {q:.0f} MB/s, basalt/qsd {b / q:.2f}x")
    for key, label in (("warmup_dd_write_mbs", "dd write"), ("warmup_dd_read_mbs", "dd read")):
        if results[key]["basalt"]:
            b, q = med(results[key]["basalt"]), med(results[key]["qsd"])
            print(f"{label}, first {args.warmup} passes on fresh disks: basalt {b:.0f} MB/s, "
                  f"qsd {q:.0f} MB/s, basalt/qsd {b / q:.2f}x")
    runs = results["pair_runs"]
    # The first round of the first run writes fresh disks; it is reported
    # apart. Every later round (of any run) overwrites.
    steady = [run[1:] if i == 0 else run for i, run in enumerate(runs)]
    for rounds_by_run, label in ((steady, f"one guest, both disks in turn, {len(runs)} runs"),
                                 ([run[:1] for run in runs[:1]], "one guest, first round (fresh disks)")):
        rounds = [r for run in rounds_by_run for r in run]
        if not rounds:
            continue
        figures = []
        for key, name in (("write_mbs", "write"), ("read_mbs", "read")):
            ratios_by_run = [[r["basalt"][key] / r["qsd"][key] for r in run] for run in rounds_by_run]
            b, q = med(r["basalt"][key] for r in rounds), med(r["qsd"][key] for r in rounds)
            figures.append(f"{name} basalt {b:.0f} MB/s, qsd {q:.0f} MB/s, "
                           f"basalt/qsd {pooled_ratio(ratios_by_run)}")
        print(f"dd, {label} ({len(rounds)} rounds): " + "; ".join(figures))
    if "pair_cpu_s_per_gib" in results:
        cpu = results["pair_cpu_s_per_gib"]
        print(f"  backend CPU per GiB the guest moved: basaltd {cpu['basalt']:.2f} s, "
              f"qsd {cpu['qsd']:.2f} s, basalt/qsd {cpu['basalt'] / max(cpu['qsd'], 1e-9):.2f}x")
    for target, limits in sorted(results.get("pair_disks", {}).items()):
        print(f"  as the guest sees {target}'s disk: {limits}")
    for target, cost in sorted(results.get("pair_cost", {}).items()):
        print(f"  what {target}'s disk cost the guest (requests completed, interrupts, "
              f"ms in the device): {cost}")
    # The guest's own timing of each disk's writes (see pair_write_split).
    for target, figures in sorted(results.get("pair_write_split_us", {}).items()):
        line = (f"  {target}'s writes as the guest timed them: {figures['requests_per_mib']:.2f} "
                f"requests per MiB, {figures['latency_us']:.0f} µs each")
        if "device_us_per_mib" in figures:
            line += (f"; each MiB {figures['device_us_per_mib']:.0f} µs in the device, "
                     f"{figures['guest_us_per_mib']:.0f} µs in the guest")
        print(line)
    if results["fio_runs"]:
        fio_by_run = results["fio_runs"]
        print(f"fio, one guest, both disks in turn ({len(fio_by_run)} runs of {args.fio_rounds} rounds, "
              f"{args.fio_runtime} s per job; for latencies the ratio is qsd/basalt, "
              "so above 1 is Basalt better everywhere):")
        for label, job, figure, higher_better in FIO_FIGURES:
            if any(job not in r["basalt"] for run in fio_by_run for r in run):
                continue
            pairs_by_run = [[(r["basalt"][job][figure], r["qsd"][job][figure]) for r in run]
                            for run in fio_by_run]
            ratios_by_run = [[(b / q if higher_better else q / b) if min(b, q) > 0 else float("nan")
                              for b, q in run] for run in pairs_by_run]
            pairs = [p for run in pairs_by_run for p in run]
            print(f"  {label}: basalt {med(b for b, _ in pairs):.0f}, qsd {med(q for _, q in pairs):.0f}, "
                  f"{pooled_ratio(ratios_by_run)}")
    if results["migration"]:
        down = med(m["downtime_ms"] for m in results["migration"])
        total = med(m["total_ms"] for m in results["migration"])
        cli_s = med(m["cli_s"] for m in results["migration"])
        print(f"migration of a 512 MiB guest: downtime {down} ms, total {total} ms (QEMU), {cli_s:.2f} s from the CLI call to the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

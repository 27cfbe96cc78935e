#!/usr/bin/env python3
"""Where a guest's 1 MiB writes spend their time, Basalt against qsd.

A diagnostic, not a benchmark: it runs the one-guest comparison of
vm_bench.py (one TCG guest, a Basalt vhost-user-blk disk and a
qemu-storage-daemon one, `dd` alternating between them in 64 MiB chunks)
and records, with `perf`, the syscalls and io_uring events of QEMU, qsd and
basaltd for a few seconds of the write phase. From the events it cuts each
1 MiB write into:

* backend: the kick (QEMU's vCPU writes the disk's kick eventfd) to the
  last answer (the backend writes its call eventfd);
* guest: that answer to the next kick -- the guest completing the request
  and building the next one;
* for Basalt also the wait from the data's landing (the last data piece
  completes) to the answer, and the first piece's start after the kick;
* how many answers a request cycle has and how long before the last the
  first came (an early answer lets the guest complete that request while
  the backend finishes the rest);
* from the scheduler's switches: how much CPU the backend itself used
  while the guest built its next request, and how long QEMU's threads sat
  preempted (runnable but off the CPU) meanwhile, which says whether the
  backend's own work competes with the guest's.

The per-chunk times of both disks in the traced window give the ratio the
guest would measure. Findings of 2026-11-26 are in docs/benchmarks.md.

    cargo build --release --bins
    sudo python3 bench/trace_pair.py [--seconds 3] [--mb 1024] [--bin-dir DIR]

Needs perf (linux-perf) with syscall, io_uring and sched tracepoints, and what
vm_bench.py needs. Runs as root (system-wide tracing).
"""

import argparse
import bisect
import os
import re
import shutil
import statistics as st
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import vm_bench  # noqa: E402

EVENTS = ",".join([
    "syscalls:sys_enter_write", "syscalls:sys_enter_read", "syscalls:sys_enter_io_uring_enter",
    "io_uring:io_uring_submit_req", "io_uring:io_uring_complete", "sched:sched_switch",
])
LINE = re.compile(r"^\s*(\S+)\s+(\d+)/(\d+)\s+(?:\[\d+\]\s+)?([\d.]+):\s+(\S+):\s*(.*)$")
SWITCH = re.compile(r"prev_pid=(\d+) .*prev_state=(\S+) ==> .*next_pid=(\d+)")


def parse(path):
    events = []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                comm, pid, tid, t, name, rest = m.groups()
                if name == "sched:sched_switch":
                    sw = SWITCH.search(rest)
                    if sw:
                        events.append({"comm": comm, "pid": int(pid), "tid": int(tid), "t": float(t),
                                       "name": name, "rest": rest, "fd": None,
                                       "prev": int(sw.group(1)), "state": sw.group(2),
                                       "next": int(sw.group(3))})
                    continue
                fd = re.search(r"fd: 0x([0-9a-f]+)", rest)
                events.append({"comm": comm, "pid": int(pid), "tid": int(tid), "t": float(t),
                               "name": name, "rest": rest, "fd": int(fd.group(1), 16) if fd else None})
    return events


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def identify(events, pids):
    """The kick fd (in QEMU) and call fd (in the backend) of each backend:
    the QEMU write most often followed by the backend reading within 1 ms,
    and the backend write most often followed by QEMU reading within 200 us."""
    qemu = pids["qemu"]
    kicks, calls = {}, {}
    for name in ("basalt", "qsd"):
        pid = pids[name]
        reads = [e["t"] for e in events if e["pid"] == pid and e["name"] == "syscalls:sys_enter_read"]
        qemu_reads = [e["t"] for e in events if e["pid"] == qemu and e["name"] == "syscalls:sys_enter_read"]
        votes, call_votes = {}, {}
        for e in events:
            if e["name"] != "syscalls:sys_enter_write":
                continue
            if e["pid"] == qemu:
                i = bisect.bisect_right(reads, e["t"])
                if i < len(reads) and reads[i] - e["t"] < 0.001:
                    votes[e["fd"]] = votes.get(e["fd"], 0) + 1
            elif e["pid"] == pid:
                i = bisect.bisect_right(qemu_reads, e["t"])
                hit = i < len(qemu_reads) and qemu_reads[i] - e["t"] < 0.0002
                tally = call_votes.setdefault(e["fd"], [0, 0])
                tally[0] += hit
                tally[1] += 1
        kicks[name] = max(votes, key=votes.get)
        calls[name] = max(call_votes, key=lambda fd: (call_votes[fd][0] / call_votes[fd][1], call_votes[fd][1]))
    # Each backend's kick fd must be one the other's is not.
    if kicks["basalt"] == kicks["qsd"]:
        raise RuntimeError("cannot tell the two disks' kick eventfds apart")
    return kicks, calls


def on_cpu(events, threads):
    """Per process name: the sorted (start, end) intervals its threads were on
    a CPU, and those they sat preempted (runnable but switched out)."""
    running, preempted_at = {}, {}
    busy = {name: [] for name in threads}
    waiting = {name: [] for name in threads}
    owner = {tid: name for name, tids in threads.items() for tid in tids}
    for e in events:
        if e["name"] != "sched:sched_switch":
            continue
        t, prev, nxt = e["t"], e["prev"], e["next"]
        if prev in owner:
            if prev in running:
                busy[owner[prev]].append((running.pop(prev), t))
            if e["state"].startswith("R"):
                preempted_at[prev] = t
        if nxt in owner:
            running[nxt] = t
            if nxt in preempted_at:
                waiting[owner[nxt]].append((preempted_at.pop(nxt), t))
    return ({k: sorted(v) for k, v in busy.items()}, {k: sorted(v) for k, v in waiting.items()})


def overlap(intervals, a, z):
    """Microseconds of `intervals` (sorted by start) inside [a, z]; an
    interval that began more than 50 ms before `a` is not counted."""
    total = 0.0
    for s, e in intervals[max(0, bisect.bisect_left(intervals, (a - 0.05, 0))):]:
        if s > z:
            break
        total += max(0.0, min(e, z) - max(s, a))
    return total * 1e6


def analyze(events, pids, threads=None):
    kicks_fd, calls_fd = identify(events, pids)
    busy, waiting = on_cpu(events, threads) if threads else ({}, {})
    qemu = pids["qemu"]
    out = {}
    for name in ("basalt", "qsd"):
        pid = pids[name]
        kicks = [e["t"] for e in events if e["pid"] == qemu and e["name"] == "syscalls:sys_enter_write"
                 and e["fd"] == kicks_fd[name]]
        calls = [e["t"] for e in events if e["pid"] == pid and e["name"] == "syscalls:sys_enter_write"
                 and e["fd"] == calls_fd[name]]
        # MiB done: completed data bytes reach the next MiB (Basalt: 256 KiB
        # pieces only; its 4 KiB oplog batches are not data).
        done, acc, pieces = [], 0, []
        for e in events:
            if e["pid"] != pid or e["name"] != "io_uring:io_uring_complete":
                continue
            result = int(re.search(r"result (-?\d+)", e["rest"]).group(1))
            # (Basalt: data pieces of 64 KiB and more; its oplog
            # batches are smaller.)
            if name == "basalt" and result < 64 * 1024:
                continue
            if name == "basalt":
                pieces.append(e["t"])
            acc += max(result, 0)
            while acc >= 1 << 20:
                acc -= 1 << 20
                done.append(e["t"])
        # The last answer before each kick ends a request cycle.
        last = [t for i, t in enumerate(calls)
                if (j := bisect.bisect_right(kicks, t)) < len(kicks) and kicks[j] - t < 0.01
                and not (i + 1 < len(calls) and calls[i + 1] < kicks[j])]
        guest = [(kicks[bisect.bisect_right(kicks, t)] - t) * 1e6 for t in last]
        cpu_in_guest, qemu_wait_in_guest = [], []
        for t in last:
            k = kicks[bisect.bisect_right(kicks, t)]
            if name in busy:
                cpu_in_guest.append(overlap(busy[name], t, k))
                qemu_wait_in_guest.append(overlap(waiting["qemu"], t, k))
        # QEMU picks the answer up: its first read after the backend's call
        # write (the call eventfd, which its main loop turns into an interrupt).
        qemu_reads = [e["t"] for e in events if e["pid"] == qemu and e["name"] == "syscalls:sys_enter_read"]
        pickup = []
        for t in last:
            i = bisect.bisect_left(qemu_reads, t)
            if i < len(qemu_reads) and qemu_reads[i] - t < 0.002:
                pickup.append((qemu_reads[i] - t) * 1e6)
        backend, answers, spread = [], [], []
        for before, t in zip(last, last[1:]):
            first = kicks[bisect.bisect_right(kicks, before)]
            if first < t and t - first < 0.01:
                backend.append((t - first) * 1e6)
                # The answers of this cycle: how many, and how long before
                # the last one the first came (the guest completes an early
                # answer's request while the backend finishes the rest).
                cycle = calls[bisect.bisect_right(calls, first):bisect.bisect_right(calls, t)]
                answers.append(len(cycle))
                spread.append((t - cycle[0]) * 1e6 if cycle else 0.0)
        # chunks: runs of this disk's kicks without the other's in between
        other = [e["t"] for e in events if e["pid"] == qemu and e["name"] == "syscalls:sys_enter_write"
                 and e["fd"] == kicks_fd["qsd" if name == "basalt" else "basalt"]]
        chunks, start = [], None
        for t in kicks:
            if start is None:
                start, last = t, t
                continue
            if bisect.bisect_right(other, last) != bisect.bisect_right(other, t):
                chunks.append((start, last))
                start = t
            last = t
        per_chunk = []
        for a, z in chunks:
            n = sum(1 for t in done if a <= t <= z + 0.01)
            if n >= 32:  # whole chunks only (the window cuts the first and last)
                per_chunk.append((z - a) * 1e6 / max(n - 1, 1))
        tail = []
        if name == "basalt":
            for t in calls:
                i = bisect.bisect_right(pieces, t) - 1
                if i >= 0 and t - pieces[i] < 0.02:
                    tail.append((t - pieces[i]) * 1e6)
        out[name] = {"mib": len(done), "guest": guest, "backend": backend, "per_chunk": per_chunk,
                     "tail": tail, "pickup": pickup, "answers": answers, "spread": spread, "cpu_in_guest": cpu_in_guest,
                     "qemu_wait_in_guest": qemu_wait_in_guest}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/basalt-tracepair")
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--bin-dir", default=os.path.join(ROOT, "target/release"))
    args = parser.parse_args()
    if not shutil.which("perf"):
        sys.exit("perf is not installed (apt-get install linux-perf)")
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    subprocess.run(["sh", os.path.join(ROOT, "tests/guest/build-guest.sh"), vm_bench.GUEST_DIR], check=True)
    node = vm_bench.Node(args.dir, "node", os.path.join(args.bin_dir, "basaltd"),
                         os.path.join(args.bin_dir, "basalt"))
    procs = []
    try:
        node.cli("vdisk", "create", "trace", "--size", f"{args.mb + 64}M", "--rf", "1")
        basalt_sock = node.cli("vdisk", "export", "trace", "--vhost")["socket"]
        raw = os.path.join(args.dir, "raw.img")
        subprocess.run(["dd", "if=/dev/zero", f"of={raw}", "bs=1M", f"count={args.mb}", "oflag=direct",
                        "status=none"], check=True)
        qsd_sock = os.path.join(args.dir, "qsd.sock")
        qsd = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={raw},cache.direct=on,aio=io_uring",
            "--export", "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                        f"addr.path={qsd_sock},writable=on,num-queues=1",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(qsd)
        while not os.path.exists(qsd_sock):
            time.sleep(0.05)
        console = os.path.join(args.dir, "console.log")
        qemu = subprocess.Popen(
            vm_bench.qemu_args(os.path.join(vm_bench.GUEST_DIR, "vmlinuz"),
                               os.path.join(vm_bench.GUEST_DIR, "initrd"),
                               f"basalt.test=ddpair basalt.ddmb={args.mb} basalt.ddrounds=3 "
                               "basalt.ddchunk=64")
            + vm_bench.vhost_disks(basalt_sock, qsd_sock),
            stdout=open(console, "w"), stderr=subprocess.STDOUT)
        procs.append(qemu)
        # The first round writes fresh disks: trace the second's write phase.
        deadline = time.time() + 600
        while "round=0 disk=vdb" not in open(console).read():
            if time.time() > deadline or qemu.poll() is not None:
                raise RuntimeError("the guest did not finish its first round")
            time.sleep(0.1)
        data = os.path.join(args.dir, "perf.data")
        subprocess.run(["perf", "record", "-q", "-o", data, "-a", "-e", EVENTS, "--",
                        "sleep", str(args.seconds)], check=True, stdout=subprocess.DEVNULL)
        text = os.path.join(args.dir, "perf.txt")
        with open(text, "w") as f:
            subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,tid,cpu,time,event,trace"],
                           check=True, stdout=f, stderr=subprocess.DEVNULL)
        pids = {"qemu": qemu.pid, "qsd": qsd.pid, "basalt": node.proc.pid}
        threads = {name: [int(t) for t in os.listdir(f"/proc/{pid}/task")] for name, pid in pids.items()}
        qemu.wait(timeout=900)
        result = analyze(parse(text), pids, threads)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        node.stop()
    for line in open(console).read().splitlines():
        if line.startswith("BASALT-DDPAIR: round=1 "):
            print("traced round as the guest timed it:", line.split(": ", 1)[1])
    for name, r in result.items():
        print(f"{name}: {r['mib']} MiB traced; per MiB in whole chunks mean "
              f"{st.mean(r['per_chunk']) if r['per_chunk'] else float('nan'):.0f} us ({len(r['per_chunk'])} chunks); "
              f"guest side p50 {pct(r['guest'], 0.5):.0f} us; "
              f"kick to last answer p50 {pct(r['backend'], 0.5):.0f} us ({len(r['guest'])} cycles)")
        if r["pickup"]:
            print(f"  answer to QEMU reading it: p50 {st.median(r['pickup']):.0f} us, "
                  f"p90 {pct(r['pickup'], 0.9):.0f} us")
        if r["cpu_in_guest"]:
            print(f"  {name}'s own CPU while the guest builds the next request: "
                  f"mean {st.mean(r['cpu_in_guest']):.0f} us, p90 {pct(r['cpu_in_guest'], 0.9):.0f} us; "
                  f"QEMU threads preempted meanwhile: mean {st.mean(r['qemu_wait_in_guest']):.0f} us, "
                  f"p90 {pct(r['qemu_wait_in_guest'], 0.9):.0f} us")
        if r["answers"]:
            print(f"  answers per request cycle p50 {pct(r['answers'], 0.5)}; first answer to last: "
                  f"p50 {pct(r['spread'], 0.5):.0f} us, p90 {pct(r['spread'], 0.9):.0f} us")
        if r["tail"]:
            print(f"  data landed to answer: p50 {st.median(r['tail']):.0f} us, "
                  f"p90 {pct(r['tail'], 0.9):.0f} us")
    ratio = st.mean(result["qsd"]["per_chunk"]) / st.mean(result["basalt"]["per_chunk"])
    print(f"traced window: basalt/qsd throughput {ratio:.2f}x")
    # The disks and the trace take about 3 GiB; only a run that got this
    # far gives them back (a failed one keeps them for its logs).
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

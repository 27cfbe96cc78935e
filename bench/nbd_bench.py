#!/usr/bin/env python3
"""Basalt storage benchmark: the same fio jobs, in one run, against

  raw   -- a raw file on the same filesystem (io_uring, O_DIRECT): the ceiling
  qsd   -- qemu-storage-daemon exporting a raw file over NBD: the peer
  basalt -- basaltd (release build) exporting a vdisk over NBD

and prints every figure plus the ratios basalt/qsd and basalt/raw. Absolute
numbers on shared machines are noise; compare the ratios of one run. All
targets run side by side: every job is repeated (--repeat) with the targets
taken in turn (rotating the order), and the median of the repeats is
reported, so a burst of noise hits every target alike.

Usage: bench/nbd_bench.py [--dir /var/tmp/basalt-bench] [--size 2G] [--runtime 10]
                          [--repeat 3] [--targets raw,qsd,basalt] [--json results.json]
                          [--bin-dir target/release]
Needs: fio (with the nbd engine), qemu-storage-daemon, a release build
(`cargo build --release --bins`, done by this script unless --no-build).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOBS = [
    # name, fio args, what to report
    ("randread-4k-qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "iops"),
    ("randwrite-4k-qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops"),
    ("randwrite-4k-qd1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"], "lat"),
    ("read-1m-qd8", ["--rw=read", "--bs=1M", "--iodepth=8"], "bw"),
    ("write-1m-qd8", ["--rw=write", "--bs=1M", "--iodepth=8"], "bw"),
    # What a guest's dd (one 1 MiB write at a time) asks of the disk.
    ("write-1m-qd1", ["--rw=write", "--bs=1M", "--iodepth=1"], "bw"),
    # A sequential writer in units smaller than an extent (an extent is
    # rewritten in parts, each written once).
    ("write-256k-qd4", ["--rw=write", "--bs=256k", "--iodepth=4"], "bw"),
    ("randwrite-4k-qd32-flush32", ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32"], "iops"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def size_bytes(text):
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * (1 << units[text[-1].upper()]))
    return int(text)


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def wait_healthy(proc, api_port, log, timeout=60):
    """Waits until basaltd (`proc`) answers its health check."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/v1/health", timeout=1)
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"basaltd did not start; see {log}")
            time.sleep(0.2)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fio(target_args, job_args, runtime, size, name, env=None):
    cmd = ["fio", "--name=" + name, "--output-format=json", "--time_based",
           f"--runtime={runtime}", "--ramp_time=1", f"--size={size}", "--randrepeat=0",
           "--norandommap", "--numjobs=1", "--group_reporting"] + target_args + job_args
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    lat = side.get("clat_ns") or side.get("lat_ns")
    p99 = lat.get("percentile", {}).get("99.000000", 0)
    return {
        "iops": side["iops"],
        "bw_mib": side["bw_bytes"] / (1 << 20),
        "lat_mean_us": side["lat_ns"]["mean"] / 1000,
        "lat_p99_us": p99 / 1000,
    }


def prefill(target_args, size, env=None):
    subprocess.run(["fio", "--name=prefill", "--rw=write", "--bs=1M", "--iodepth=8",
                    f"--size={size}", "--output-format=json"] + target_args,
                   check=True, capture_output=True, env=env)


class Target:
    def __init__(self, name):
        self.name = name
        self.proc = None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Raw(Target):
    def __init__(self, workdir, size):
        super().__init__("raw")
        self.path = os.path.join(workdir, "raw.img")
        with open(self.path, "wb") as f:
            f.truncate(size)
        self.args = [f"--filename={self.path}", "--ioengine=io_uring", "--direct=1"]


class Qsd(Target):
    def __init__(self, workdir, size):
        super().__init__("qsd")
        path = os.path.join(workdir, "qsd.img")
        with open(path, "wb") as f:
            f.truncate(size)
        port = free_port()
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={path},cache.direct=on,aio=io_uring",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
            "--export", "type=nbd,id=exp0,node-name=file0,name=bench,writable=on",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        self.args = ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/bench"]


class Basalt(Target):
    def __init__(self, workdir, size, binary, cli):
        super().__init__("basalt")
        data = os.path.join(workdir, "basalt-data")
        api, nbd, listen = free_port(), free_port(), free_port()
        disk = max(size * 2 + (2 << 30), 8 << 30)
        self.log = open(os.path.join(workdir, "basaltd.log"), "w")
        self.proc = subprocess.Popen([
            binary, "--data-dir", data, "--disk", f"{data}/disk0.img:{disk}",
            "--api", f"127.0.0.1:{api}", "--nbd", f"127.0.0.1:{nbd}",
            "--listen", f"127.0.0.1:{listen}",
        ] + os.environ.get("BASALTD_ARGS", "").split(), stdout=self.log, stderr=self.log)
        wait_healthy(self.proc, api, os.path.join(workdir, "basaltd.log"))
        subprocess.run([cli, "--api", f"http://127.0.0.1:{api}", "vdisk", "create", "bench",
                        "--size", str(size)], check=True, capture_output=True)
        self.args = ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{nbd}/bench"]
        time.sleep(1)
        self.idle_rss_kib = rss_kib(self.proc.pid)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/var/tmp/basalt-bench")
    p.add_argument("--size", default="2G")
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--targets", default="raw,qsd,basalt")
    p.add_argument("--jobs", default=",".join(j[0] for j in JOBS))
    p.add_argument("--json", help="write all figures to this file")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--bin-dir",
                   help="where basaltd and basalt are (to compare builds; implies --no-build)")
    args = p.parse_args()
    for tool in ["fio", "qemu-storage-daemon"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (apt-get install fio qemu-system-x86 qemu-utils)")
    if not args.no_build and args.bin_dir is None:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    bin_dir = args.bin_dir or os.path.join(ROOT, "target/release")
    binary = os.path.join(bin_dir, "basaltd")
    cli = os.path.join(bin_dir, "basalt")
    size = size_bytes(args.size)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    wanted = [j for j in JOBS if j[0] in args.jobs.split(",")]
    makers = {"raw": lambda: Raw(args.dir, size), "qsd": lambda: Qsd(args.dir, size),
              "basalt": lambda: Basalt(args.dir, size, binary, cli)}
    names = args.targets.split(",")
    targets = {}
    rss = {}
    try:
        for name in names:
            targets[name] = makers[name]()
            print(f"== {name}: prefilling {args.size}", flush=True)
            prefill(targets[name].args, size)
        runs = {name: {job: [] for job, _, _ in wanted} for name in names}
        for job, job_args, _ in wanted:
            for rep in range(args.repeat):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    print(f"   {job} #{rep + 1} {name}", flush=True)
                    runs[name][job].append(fio(targets[name].args, job_args, args.runtime, size, job))
        results = {name: {job: {key: statistics.median(r[key] for r in reps) for key in reps[0]}
                          for job, reps in jobs.items()} for name, jobs in runs.items()}
        if "basalt" in targets:
            proc = targets["basalt"].proc
            peak = 0
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1])
            rss = {"idle_mib": targets["basalt"].idle_rss_kib / 1024, "peak_mib": peak / 1024}
    finally:
        for target in targets.values():
            target.stop()
    print()
    header = f"{'job':28} {'metric':10}" + "".join(f"{t:>12}" for t in results) + \
        ("   basalt/qsd  basalt/raw" if "basalt" in results else "")
    print(header)
    print("-" * len(header))
    for job, _, kind in wanted:
        metrics = {"iops": [("iops", "IOPS")], "bw": [("bw_mib", "MiB/s")],
                   "lat": [("lat_mean_us", "mean µs"), ("lat_p99_us", "p99 µs"), ("iops", "IOPS")]}[kind]
        for key, label in metrics:
            row = f"{job:28} {label:10}" + "".join(f"{results[t][job][key]:>12.1f}" for t in results)
            if "basalt" in results:
                b = results["basalt"][job][key]
                for ref in ["qsd", "raw"]:
                    if ref in results and results[ref][job][key]:
                        r = b / results[ref][job][key]
                        # For latency lower is better: print ref/basalt so >1 is good.
                        if key.startswith("lat"):
                            r = results[ref][job][key] / b if b else 0
                        row += f"{r:>12.2f}x"
                    else:
                        row += f"{'-':>13}"
            print(row)
    if rss:
        print(f"\nbasaltd resident memory: idle {rss['idle_mib']:.1f} MiB, peak under load {rss['peak_mib']:.1f} MiB")
    print("(ratios >1 favour Basalt; for latency the ratio is peer/basalt)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "runs": runs, "basalt_rss": rss, "size": args.size,
                       "runtime": args.runtime, "repeat": args.repeat,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=2)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

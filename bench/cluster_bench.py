#!/usr/bin/env python3
"""Basalt cluster benchmark: replication cost and rebuild speed, in one run.

  1. fio over NBD against vdisks of RF1, RF2 and RF3 on a three-node basaltd
     cluster on 127.0.0.1 (each vdisk created through node 1, which holds
     its first replica and serves it), next to a raw file and
     qemu-storage-daemon, with the jobs of bench/nbd_bench.py;
  2. with --ceph, the same jobs against a Ceph RF3 pool (bench/ceph_cluster.py:
     1 monitor, 3 BlueStore OSDs on files, fio's rbd engine) brought up after
     the basaltd cluster and the peers are stopped, so neither runs idle
     beside the other;
  3. rebuild: an RF2 vdisk is filled, the node holding its second replica is
     killed (kill -9), and the time from the replica's move to a healthy
     vdisk gives the rebuild throughput; once alone, once under a foreground
     fio randwrite load whose IOPS are compared with the same load without a
     rebuild.

Usage: bench/cluster_bench.py [--dir /var/tmp/basalt-cluster-bench] [--size 2G]
                              [--runtime 10] [--repeat 1] [--jobs ...] [--ceph]
                              [--json out.json]
All nodes, fio and the peers share this machine: the ratios between RF
levels and against the peers are the figures to read.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceph_cluster  # noqa: E402  (the Ceph peer)
import nbd_bench  # noqa: E402  (shared fio helpers and peers)

ROOT = nbd_bench.ROOT


class Node:
    def __init__(self, workdir, index, binary, disk_bytes, join=None, dead_after=5):
        self.dir = os.path.join(workdir, f"node{index}")
        os.makedirs(self.dir, exist_ok=True)
        self.api, self.nbd, self.listen = (nbd_bench.free_port() for _ in range(3))
        self.binary = binary
        self.args = [
            binary, "--data-dir", os.path.join(self.dir, "data"),
            "--disk", f"{self.dir}/disk0.img:{disk_bytes}",
            "--api", f"127.0.0.1:{self.api}", "--nbd", f"127.0.0.1:{self.nbd}",
            "--listen", f"127.0.0.1:{self.listen}", "--dead-after", str(dead_after),
            # Placement stays as created: RF1 must stay on the node serving it.
            "--no-rebalance",
        ] + (["--join", f"127.0.0.1:{join}"] if join else [])
        self.log = open(os.path.join(self.dir, "basaltd.log"), "a")
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=self.log)
        nbd_bench.wait_healthy(self.proc, self.api, os.path.join(self.dir, "basaltd.log"))

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api}/api/v1{path}", timeout=30) as r:
            return json.load(r)

    def post(self, path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{self.api}/api/v1{path}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)

    def fio_args(self, vdisk):
        return ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{self.nbd}/{vdisk}"]

    def kill9(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill9()


def cluster(workdir, binary, disk_bytes, count=3, others_dir=None):
    """`count` nodes; nodes 2.. put their data and disk under `others_dir`
    when given (e.g. a RAM disk: what replication costs without sharing the
    one device of this machine)."""
    nodes = [Node(workdir, 1, binary, disk_bytes)]
    for i in range(2, count + 1):
        nodes.append(Node(others_dir or workdir, i, binary, disk_bytes, join=nodes[0].listen))
    deadline = time.time() + 60
    while time.time() < deadline:
        status = nodes[0].get("/cluster")
        if len(status["nodes"]) == count and all(n["role"] == "voter" for n in status["nodes"]):
            return nodes
        time.sleep(0.5)
    raise RuntimeError("the cluster did not get its voters")


def wait_state(node, vdisk, predicate, timeout=3600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        shown = node.get(f"/vdisks/{vdisk}")
        if predicate(shown):
            return shown
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting on {vdisk}")


def node_by_id(nodes, ident):
    for node in nodes:
        if node.get("/cluster")["node_id"] == ident:
            return node
    raise RuntimeError(f"no node {ident}")


def rebuild(workdir, binary, size, runtime, load):
    """Seconds to rebuild `size` bytes after a replica holder dies."""
    disk = max(size * 3, 4 << 30)
    nodes = cluster(os.path.join(workdir, "load" if load else "alone"), binary, disk)
    try:
        first = nodes[0]
        created = first.post("/vdisks", {"name": "heal", "size": size, "rf": 2})
        victim_id = [r["node"] for r in created["replicas"]][1]
        ids = {n.get("/cluster")["node_id"]: n for n in nodes}
        victim = ids[victim_id]
        nbd_bench.prefill(first.fio_args("heal"), size)
        baseline = None
        if load:
            first.post("/vdisks", {"name": "fg", "size": 256 << 20, "rf": 1})
            job = ["--rw=randwrite", "--bs=4k", "--iodepth=32"]
            baseline = nbd_bench.fio(first.fio_args("fg"), job, runtime, 256 << 20, "fg")["iops"]
        victim.kill9()
        # The replica moves once the victim is declared down.
        wait_state(first, "heal", lambda v: victim_id not in [r["node"] for r in v["replicas"]])
        started = time.time()
        during = {}
        if load:
            def foreground():
                during["iops"] = nbd_bench.fio(first.fio_args("fg"), job, runtime, 256 << 20, "fg")["iops"]
            thread = threading.Thread(target=foreground)
            thread.start()
        wait_state(first, "heal", lambda v: v["state"] == "healthy")
        seconds = time.time() - started
        if load:
            thread.join()
        result = {"seconds": seconds, "mib_per_s": size / (1 << 20) / seconds}
        if load:
            result.update({"fg_iops_alone": baseline, "fg_iops_during": during.get("iops", 0)})
        return result
    finally:
        for node in nodes:
            node.stop()


class SkipFio(Exception):
    pass


def ceph_runs(args, size, wanted):
    """The jobs against a Ceph pool of size 3 on this machine (medians)."""
    ceph_cluster.ensure_packages()
    with ceph_cluster.CephCluster(os.path.join(args.dir, "ceph"),
                                  osd_size_bytes=size + (2 << 30)) as ceph:
        print(f"== ceph: up in {ceph.bringup_seconds:.0f} s; prefilling {args.size}", flush=True)
        ceph.create_image("bench", size)
        target = ceph.fio_args("bench")
        nbd_bench.prefill(target, size, env=ceph.fio_env())
        out = {}
        for job, job_args, _ in wanted:
            reps = []
            for rep in range(args.repeat):
                print(f"   {job} #{rep + 1} ceph", flush=True)
                reps.append(nbd_bench.fio(target, job_args, args.runtime, size, job,
                                          env=ceph.fio_env()))
            out[job] = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/var/tmp/basalt-cluster-bench")
    p.add_argument("--size", default="2G")
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--jobs", default=",".join(j[0] for j in nbd_bench.JOBS))
    p.add_argument("--skip-rebuild", action="store_true")
    p.add_argument("--only-rebuild", action="store_true")
    p.add_argument("--replica-dir", help="data and disks of nodes 2 and 3 here (e.g. under /dev/shm) "
                   "instead of on node 1's device, for the fio phase")
    p.add_argument("--ceph", action="store_true", help="also measure Ceph RF3 (installs Debian's ceph)")
    p.add_argument("--json")
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target/release/basaltd")
    size = nbd_bench.size_bytes(args.size)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    wanted = [j for j in nbd_bench.JOBS if j[0] in args.jobs.split(",")]
    names = ["raw", "qsd", "rf1", "rf2", "rf3"]
    results = {}
    nodes = []
    peers = {}
    try:
        if args.only_rebuild:
            raise SkipFio()
        others = os.path.join(args.replica_dir, "fio") if args.replica_dir else None
        nodes = cluster(os.path.join(args.dir, "fio"), binary, max(size * 4, 8 << 30),
                        others_dir=others)
        targets = {"raw": nbd_bench.Raw(args.dir, size), "qsd": nbd_bench.Qsd(args.dir, size)}
        peers = dict(targets)
        for rf in (1, 2, 3):
            nodes[0].post("/vdisks", {"name": f"rf{rf}", "size": size, "rf": rf})
        fio_args = {name: t.args for name, t in targets.items()}
        fio_args.update({f"rf{rf}": nodes[0].fio_args(f"rf{rf}") for rf in (1, 2, 3)})
        for name in names:
            print(f"== {name}: prefilling {args.size}", flush=True)
            nbd_bench.prefill(fio_args[name], size)
        runs = {name: {job: [] for job, _, _ in wanted} for name in names}
        for job, job_args, _ in wanted:
            for rep in range(args.repeat):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    print(f"   {job} #{rep + 1} {name}", flush=True)
                    runs[name][job].append(nbd_bench.fio(fio_args[name], job_args, args.runtime, size, job))
        results = {name: {job: {k: statistics.median(r[k] for r in reps) for k in reps[0]}
                          for job, reps in jobs.items()} for name, jobs in runs.items()}
    except SkipFio:
        wanted = []
    finally:
        for node in nodes:
            node.stop()
        for peer in peers.values():
            peer.stop()
    pairs = [("rf2", "rf1"), ("rf3", "rf1"), ("rf3", "qsd")]
    if args.ceph and wanted:
        results["ceph"] = ceph_runs(args, size, wanted)
        names.append("ceph")
        pairs.append(("rf3", "ceph"))
    print()
    header = f"{'job':28} {'metric':10}" + "".join(f"{t:>11}" for t in names) + \
        "".join(f"{a + '/' + b:>10}" for a, b in pairs)
    print(header)
    print("-" * len(header))
    for job, _, kind in wanted:
        metrics = {"iops": [("iops", "IOPS")], "bw": [("bw_mib", "MiB/s")],
                   "lat": [("lat_mean_us", "mean µs"), ("lat_p99_us", "p99 µs")]}[kind]
        for key, label in metrics:
            row = f"{job:28} {label:10}" + "".join(f"{results[t][job][key]:>11.1f}" for t in names)
            for a, b in pairs:
                x, y = results[a][job][key], results[b][job][key]
                ratio = (y / x if key.startswith("lat") else x / y) if x and y else 0
                row += f"{ratio:>9.2f}x"
            print(row)
    print("(ratios >1 favour the first named; for latency the ratio is inverted)")
    rebuilds = {}
    if not args.skip_rebuild:
        for load in (False, True):
            label = "under load" if load else "alone"
            print(f"== rebuild of {args.size} {label}", flush=True)
            rebuilds[label] = rebuild(args.dir, binary, size, args.runtime, load)
            r = rebuilds[label]
            line = f"rebuild {label}: {r['seconds']:.1f} s, {r['mib_per_s']:.0f} MiB/s"
            if load:
                kept = r["fg_iops_during"] / r["fg_iops_alone"] if r["fg_iops_alone"] else 0
                line += (f"; foreground 4k randwrite QD32 {r['fg_iops_during']:.0f} IOPS during vs "
                         f"{r['fg_iops_alone']:.0f} alone ({kept:.0%} kept; fio ran "
                         f"{args.runtime + 1} s from the rebuild's start"
                         f"{'' if r['seconds'] >= args.runtime + 1 else ', longer than the rebuild'})")
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "rebuild": rebuilds, "size": args.size,
                       "runtime": args.runtime, "repeat": args.repeat,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=2)
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.replica_dir:
        shutil.rmtree(os.path.join(args.replica_dir, "fio"), ignore_errors=True)


if __name__ == "__main__":
    main()

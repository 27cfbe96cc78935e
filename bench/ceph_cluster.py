#!/usr/bin/env python3
"""A throwaway single-host Ceph cluster: the Ceph peer of bench/cluster_bench.py.

Issue 3 asks for Basalt's replicated write path to be set against Ceph's, RF3
against RF3 (Basalt RF3 / Ceph RF3). This module brings up the smallest Ceph
that does the same job as the three-node basaltd cluster of the bench, on the
same machine and under the same rules, so that fio can drive both:

  * one monitor on 127.0.0.1 (msgr v2 only, on a free port),
  * one manager (Ceph keeps placement-group states in the manager, so without
    it "are all PGs active+clean?" cannot be asked), with the modules the
    bench does not need left unloaded,
  * N OSDs (3 by default) on BlueStore, each on a sparse file under the work
    directory, with a modest memory target,
  * a replicated pool `bench` whose failure domain is the OSD (there is one
    host), size `pool_size` (3 by default) and min_size 2,
  * RBD images in that pool, which fio's `rbd` engine (librbd) reads and
    writes directly, as its `nbd` engine does with basaltd.

Everything lives under the work directory: its own ceph.conf, monitor and OSD
data, logs, sockets and pid files; nothing touches /etc/ceph, /var/lib/ceph,
systemd or cephadm. Authentication is off (cephx gives nothing on a loopback
cluster that exists for a minute). The daemons run in the foreground as
children of this process, which stops each of them by pid (SIGTERM, then
SIGKILL) when the context manager exits, however it exits, and then removes
the work directory. They are also told by the kernel to die with their
parent, so a benchmark killed outright leaves no daemon behind.

Settings that matter when reading the figures:
  * the RBD client cache is off (`rbd_cache = false`): basaltd and
    qemu-storage-daemon are measured with O_DIRECT and no client-side cache;
  * a write is acknowledged by Ceph only once every replica has it on stable
    storage (BlueStore's write-ahead log for small writes), as with Basalt;
  * every other knob is Ceph's default for this machine's disk, which reports
    itself as rotational, so BlueStore and the OSD pick their HDD settings
    (5 op shards of 1 thread each, deferred writes up to 64 KiB);
  * all daemons, fio and the peers share the same few vCPUs: compare ratios
    within one run, not absolute numbers.

Usage as a module:

    with CephCluster("/var/tmp/ceph", osd_size_bytes=4 << 30) as ceph:
        ceph.create_image("img", 1 << 30)
        subprocess.run(["fio", ...] + ceph.fio_args("img"), env=ceph.fio_env())

Run as a script, it is a smoke test (bring-up, a 5 s fio randwrite and
randread on a 256 MiB image, tear-down):

    bench/ceph_cluster.py [--dir /var/tmp/ceph-smoke] [--runtime 5]

Needs the Debian packages ceph-mon, ceph-osd, ceph-mgr and ceph-common
(installed by ensure_packages()) and fio built with the rbd engine.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

PACKAGES = ["ceph-mon", "ceph-osd", "ceph-mgr", "ceph-common"]
# A program from each package, to tell whether it is installed.
PROGRAMS = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "ceph-mgr": "ceph-mgr",
            "ceph-common": "rbd"}

# Manager modules that load by default and that a benchmark cluster does not
# need: they would only spend CPU (or, for devicehealth, create a pool). The
# manager reports the always-on ones among them as failed (MGR_MODULE_ERROR),
# which the cluster mutes once it is up.
MGR_DISABLED_MODULES = [
    "balancer", "crash", "devicehealth", "diskprediction_local", "iostat", "nfs",
    "orchestrator", "pg_autoscaler", "progress", "rbd_support", "status",
    "telemetry", "volumes",
]

MARKER = ".ceph-cluster-workdir"


def ensure_packages():
    """Installs the Ceph packages that are missing (apt-get update only if needed)."""
    missing = [pkg for pkg in PACKAGES if shutil.which(PROGRAMS[pkg]) is None]
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends"] + missing
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Returns a preexec_fn that has the kernel SIGKILL the child when we die.

    (Strictly: when the thread that started it ends, so start the cluster from
    the thread that will outlive it.)
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec():
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


def _tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"({e})\n"


class CephError(RuntimeError):
    pass


class CephCluster:
    """A single-host Ceph cluster under `workdir`, for the time of a `with` block."""

    def __init__(self, workdir, osd_size_bytes, osds=3, pool_size=3, pool="bench",
                 pg_num=32, timeout=300, options=None):
        if pool_size > osds:
            raise ValueError(f"pool_size {pool_size} needs at least as many OSDs ({osds})")
        self.workdir = os.path.abspath(workdir)
        self.osd_size_bytes = osd_size_bytes
        self.osds = osds
        self.pool_size = pool_size
        self.pool = pool
        self.pg_num = pg_num
        self.timeout = timeout
        # Extra ceph.conf settings, {section: {option: value}}, over the defaults.
        self.options = options or {}
        self.conf_path = os.path.join(self.workdir, "ceph.conf")
        self.log_dir = os.path.join(self.workdir, "log")
        self.run_dir = os.path.join(self.workdir, "run")
        self.fsid = str(uuid.uuid4())
        self.mon_port = None
        self.procs = {}  # daemon name ("mon.a", "osd.0", ...) -> Popen
        self.bringup_seconds = None

    # -- context manager --------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- bring-up ---------------------------------------------------------

    def start(self):
        started = time.monotonic()
        self._prepare_workdir()
        self._write_conf()
        self._start_mon()
        self._start_mgr()
        for osd_id in range(self.osds):
            self._start_osd(osd_id)
        self._wait("all OSDs up and in", self._osds_up)
        self._create_pool()
        self._wait(f"all PGs of pool {self.pool} active+clean", self._pgs_clean)
        # The manager flags the always-on modules left unloaded as failed.
        self.ceph("health", "mute", "MGR_MODULE_ERROR", "--sticky", fmt=None, check=False)
        self.bringup_seconds = time.monotonic() - started

    def _prepare_workdir(self):
        if os.path.isdir(self.workdir) and os.listdir(self.workdir):
            if not os.path.exists(os.path.join(self.workdir, MARKER)):
                raise CephError(f"{self.workdir} is not empty and not a leftover ceph "
                                "work directory; refusing to wipe it")
            self._kill_stale_daemons()
            shutil.rmtree(self.workdir)
        for sub in ["", "log", "run", "mon", "mgr", "osd", "crash"]:
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        open(os.path.join(self.workdir, MARKER), "w").close()

    def _kill_stale_daemons(self):
        """Kills daemons of an earlier run in this workdir, found by their pid files."""
        if not os.path.isdir(self.run_dir):
            return
        for name in os.listdir(self.run_dir):
            if not name.endswith(".pid"):
                continue
            try:
                with open(os.path.join(self.run_dir, name)) as f:
                    pid = int(f.read().strip())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except (OSError, ValueError):
                continue
            if self.conf_path in cmdline:
                os.kill(pid, signal.SIGKILL)

    def _write_conf(self):
        self.mon_port = free_port()
        w = self.workdir
        min_size = min(2, self.pool_size)
        sections = {
            "global": {
                "fsid": self.fsid,
                "mon_host": f"v2:127.0.0.1:{self.mon_port}",
                # Loopback only, msgr v2 only, no cephx.
                "public_addr": "127.0.0.1",
                "cluster_addr": "127.0.0.1",
                "ms_bind_ipv4": "true",
                "ms_bind_ipv6": "false",
                "ms_bind_msgr1": "false",
                "ms_bind_msgr2": "true",
                "auth_cluster_required": "none",
                "auth_service_required": "none",
                "auth_client_required": "none",
                "run_dir": f"{w}/run",
                "crash_dir": f"{w}/crash",
                "mon_cluster_log_file": f"{w}/log/cluster.log",
                # One host: the replicas of a PG go to distinct OSDs.
                "osd_crush_chooseleaf_type": "0",
                "osd_pool_default_size": str(self.pool_size),
                "osd_pool_default_min_size": str(min_size),
                "osd_pool_default_pg_autoscale_mode": "off",
                "mon_allow_pool_size_one": "true",
                "mon_allow_pool_delete": "true",
                "mon_warn_on_pool_no_redundancy": "false",
                "mon_warn_on_insecure_global_id_reclaim_allowed": "false",
                "mon_data_avail_warn": "1",
                "mon_max_pg_per_osd": "1000",
            },
            "client": {
                "rbd_cache": "false",
                "log_file": f"{w}/log/client.log",
            },
            "mon": {
                "mon_data": f"{w}/mon/$cluster-$id",
            },
            "mgr": {
                "mgr_data": f"{w}/mgr/$cluster-$id",
                "mgr_disabled_modules": " ".join(MGR_DISABLED_MODULES),
            },
            "osd": {
                "osd_data": f"{w}/osd/$cluster-$id",
                "osd_objectstore": "bluestore",
                # mkfs creates <osd_data>/block as a sparse file of this size.
                "bluestore_block_create": "true",
                "bluestore_block_size": str(self.osd_size_bytes),
                "osd_memory_target": str(1 << 30),
            },
        }
        for daemon in ["mon", "mgr", "osd"]:
            sections[daemon]["log_file"] = f"{w}/log/$name.log"
            sections[daemon]["pid_file"] = f"{w}/run/$name.pid"
        for section, values in self.options.items():
            sections.setdefault(section, {}).update({k: str(v) for k, v in values.items()})
        with open(self.conf_path, "w") as f:
            f.write("# Generated by bench/ceph_cluster.py: a throwaway benchmark cluster.\n")
            for section, values in sections.items():
                f.write(f"\n[{section}]\n")
                f.writelines(f"{key} = {value}\n" for key, value in values.items())

    def _spawn(self, name, args):
        log = open(os.path.join(self.log_dir, f"{name}.stdout"), "ab")
        with log:
            self.procs[name] = subprocess.Popen(
                args + ["-f", "-c", self.conf_path], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, preexec_fn=_die_with_parent())

    def _start_mon(self):
        monmap = os.path.join(self.workdir, "monmap")
        keyring = os.path.join(self.workdir, "keyring")
        self._run(["monmaptool", "--create", "--fsid", self.fsid,
                   "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", monmap])
        # The monitor keeps a keyring even with authentication off.
        self._run(["ceph-authtool", "--create-keyring", keyring, "--gen-key",
                   "-n", "mon.", "--cap", "mon", "allow *"])
        self._run(["ceph-mon", "-c", self.conf_path, "--mkfs", "-i", "a",
                   "--monmap", monmap, "--keyring", keyring])
        self._spawn("mon.a", ["ceph-mon", "-i", "a"])
        self._wait("the monitor to answer", lambda: self.ceph("mon", "stat", check=False) is not None)

    def _start_mgr(self):
        os.makedirs(os.path.join(self.workdir, "mgr", "ceph-x"), exist_ok=True)
        self._spawn("mgr.x", ["ceph-mgr", "-i", "x"])

    def _start_osd(self, osd_id):
        osd_uuid = str(uuid.uuid4())
        got = self.ceph("osd", "new", osd_uuid, str(osd_id), fmt=None).strip()
        if got != str(osd_id):
            raise CephError(f"ceph osd new gave id {got!r}, expected {osd_id}")
        os.makedirs(os.path.join(self.workdir, "osd", f"ceph-{osd_id}"), exist_ok=True)
        # mkfs creates the sparse block file (bluestore_block_create/size).
        self._run(["ceph-osd", "-c", self.conf_path, "-i", str(osd_id), "--mkfs",
                   "--osd-uuid", osd_uuid])
        self._spawn(f"osd.{osd_id}", ["ceph-osd", "-i", str(osd_id)])

    def _osds_up(self):
        stat = self.ceph("osd", "stat", check=False)
        return bool(stat) and stat.get("num_up_osds") == self.osds \
            and stat.get("num_in_osds") == self.osds

    def _create_pool(self):
        self.ceph("osd", "pool", "create", self.pool, str(self.pg_num), str(self.pg_num),
                  "replicated", fmt=None)
        self.ceph("osd", "pool", "set", self.pool, "size", str(self.pool_size),
                  "--yes-i-really-mean-it", fmt=None)
        self.ceph("osd", "pool", "set", self.pool, "min_size",
                  str(min(2, self.pool_size)), fmt=None)
        self.ceph("osd", "pool", "application", "enable", self.pool, "rbd", fmt=None)

    def _pgs_clean(self):
        """True once the manager reports every PG of every pool active+clean."""
        stat = self.ceph("pg", "stat", check=False)
        if not stat:
            return False
        summary = stat.get("pg_summary", stat)
        total = summary.get("num_pgs", 0)
        states = {s["name"]: s["num"] for s in summary.get("num_pg_by_state", [])}
        return total >= self.pg_num and states.get("active+clean", 0) == total

    # -- helpers ----------------------------------------------------------

    def _run(self, args, timeout=120):
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CephError(f"timed out after {timeout}s: {' '.join(args)}\n"
                            + self._recent_logs()) from None
        if res.returncode != 0:
            raise CephError(f"failed ({res.returncode}): {' '.join(args)}\n"
                            f"{res.stdout}{res.stderr}\n" + self._recent_logs())
        return res.stdout

    def ceph(self, *args, fmt="json", check=True, timeout=60):
        """Runs the ceph CLI against this cluster; parsed JSON unless fmt is None.

        With check=False, returns None instead of raising when the command fails.
        """
        cmd = ["ceph", "-c", self.conf_path, "--connect-timeout", "10"] + list(args)
        if fmt:
            cmd += ["--format", fmt]
        try:
            out = self._run(cmd, timeout=timeout)
        except CephError:
            if check:
                raise
            return None
        if not fmt:
            return out
        try:
            return json.loads(out) if out.strip() else {}
        except ValueError:
            if check:
                raise CephError(f"unexpected output of {' '.join(cmd)}: {out!r}")
            return None

    def _wait(self, what, ready, interval=0.5):
        deadline = time.monotonic() + self.timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise CephError(f"{name} exited with {proc.returncode} while waiting "
                                    f"for {what}\n" + self._recent_logs())
            if ready():
                return
            if time.monotonic() > deadline:
                raise CephError(f"timed out after {self.timeout}s waiting for {what}\n"
                                + self._recent_logs())
            time.sleep(interval)

    def _recent_logs(self, lines=15):
        if not os.path.isdir(self.log_dir):
            return ""
        parts = []
        for name in sorted(os.listdir(self.log_dir)):
            path = os.path.join(self.log_dir, name)
            if os.path.getsize(path):
                parts.append(f"--- {path} (last {lines} lines)\n{_tail(path, lines)}")
        return "".join(parts)

    # -- for the benchmark ------------------------------------------------

    def create_image(self, name, size_bytes):
        """Creates RBD image `name` of `size_bytes` (rounded up to MiB) in the pool."""
        mib = -(-size_bytes // (1 << 20))
        self._run(["rbd", "-c", self.conf_path, "create", "--size", f"{mib}M",
                   f"{self.pool}/{name}"])

    def remove_image(self, name):
        self._run(["rbd", "-c", self.conf_path, "rm", "--no-progress", f"{self.pool}/{name}"])

    def fio_args(self, image):
        """fio arguments for the rbd engine on `image` (run fio with fio_env())."""
        return ["--ioengine=rbd", "--clientname=admin", f"--pool={self.pool}",
                f"--rbdname={image}"]

    def fio_env(self):
        """Environment for fio: librbd finds the cluster's ceph.conf through CEPH_CONF."""
        return dict(os.environ, CEPH_CONF=self.conf_path)

    def daemon_pids(self):
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def rss_kib(self):
        """Resident memory of each running daemon, in KiB."""
        rss = {}
        for name, pid in self.daemon_pids().items():
            try:
                with open(f"/proc/{pid}/status") as f:
                    rss[name] = next(int(line.split()[1]) for line in f
                                     if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
        return rss

    # -- tear-down --------------------------------------------------------

    def stop(self, grace=20):
        """Stops every daemon this object started (by pid) and removes the workdir."""
        # OSDs first, so they do not spend the grace period looking for the monitor.
        order = sorted(self.procs, key=lambda n: (not n.startswith("osd."), n))
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for name in order:
            proc = self.procs[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if os.path.exists(os.path.join(self.workdir, MARKER)):
            shutil.rmtree(self.workdir, ignore_errors=True)


# -- smoke test -----------------------------------------------------------

def _fio(ceph, image, rw, runtime):
    cmd = ["fio", f"--name={rw}", "--output-format=json", "--time_based",
           f"--runtime={runtime}", f"--rw={rw}", "--bs=4k", "--iodepth=32",
           "--numjobs=1", "--randrepeat=0", "--norandommap"] + ceph.fio_args(image)
    out = subprocess.run(cmd, env=ceph.fio_env(), check=True, capture_output=True,
                         text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["write" if "write" in rw else "read"]["iops"]


def main():
    ap = argparse.ArgumentParser(description="Smoke test of the throwaway Ceph cluster.")
    ap.add_argument("--dir", default="/var/tmp/ceph-smoke")
    ap.add_argument("--runtime", type=int, default=5)
    args = ap.parse_args()
    ensure_packages()
    image_bytes = 256 << 20
    with CephCluster(args.dir, osd_size_bytes=1 << 30, osds=3, pool_size=3) as ceph:
        print(f"bring-up: {ceph.bringup_seconds:.1f} s "
              f"(daemons: {', '.join(f'{n}={p}' for n, p in ceph.daemon_pids().items())})")
        ceph.create_image("img", image_bytes)
        started = time.monotonic()
        # Write the whole image once, so reads do not hit unallocated space.
        subprocess.run(["fio", "--name=prefill", "--rw=write", "--bs=1M", "--iodepth=8",
                        "--output-format=json"] + ceph.fio_args("img"),
                       env=ceph.fio_env(), check=True, capture_output=True)
        print(f"prefill 256 MiB: {time.monotonic() - started:.1f} s")
        for rw in ["randwrite", "randread"]:
            iops = _fio(ceph, "img", rw, args.runtime)
            print(f"{rw} 4k qd32 {args.runtime}s: {iops:.0f} IOPS")
        rss = ceph.rss_kib()
        print("daemon RSS: " + ", ".join(f"{n} {kib >> 10} MiB" for n, kib in rss.items())
              + f" (total {sum(rss.values()) >> 10} MiB)")
    print(f"torn down; {args.dir} exists: {os.path.exists(args.dir)}")


if __name__ == "__main__":
    main()

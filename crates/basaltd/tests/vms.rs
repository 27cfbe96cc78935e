//! VMs run by basaltd's QEMU supervisor, driven only through the `basalt`
//! CLI: a real Linux guest (tests/guest/build-guest.sh, QEMU under TCG)
//! boots from a kernel and initrd stored in the cluster, with a data vdisk
//! over vhost-user-blk; what it writes is read back over NBD.
//!
//! Covered: a guest writing a pattern and powering itself off (the VM ends
//! `stopped` and stays so); stop and start; a basaltd restart (SIGTERM,
//! then kill -9) under a running guest that writes and reads at once (QEMU
//! keeps running and reconnects, the guest goes on); live
//! migration between two nodes while the guest writes a sequence; a node
//! killed with its VM, which restarts elsewhere with its data; bad input.
//! The restart and migration guests switch their disk to write-through
//! first: the new basaltd and the destination must honour that choice.
//!
//! The guest's `seq` command writes block i = "basalt seq i" from
//! SEQ_OFFSET, one O_DIRECT write per block, printing `BASALT-SEQ: n` every
//! 10 blocks (n blocks written and acknowledged). The checks read the range
//! over NBD: it must hold "basalt seq i" for every i below some count at
//! least as large as the last count printed, and zeros after it — no gap,
//! no corrupted block.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, DaemonOptions, assert_guest_pattern, guest_count, guest_image, wait_for};
use serde_json::{Value, json};

// Kept in sync with the guest's /init (tests/guest/build-guest.sh).
const SEQ_OFFSET: u64 = 32 << 20;
/// Sequence blocks that fit between SEQ_OFFSET and the end of a 64 MiB vdisk.
const SEQ_BLOCKS: u64 = (64 << 20) / 4096 - SEQ_OFFSET / 4096;
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// One node whose VMs run under TCG.
fn vm_daemon(extra: &[&str]) -> Daemon {
    let mut flags = vec!["--vm-accel".to_string(), "tcg".to_string()];
    flags.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start_with(DaemonOptions {
        extra: flags,
        ..DaemonOptions::default()
    })
}

/// A cluster member whose VMs run under TCG.
fn vm_member(join: Option<u16>) -> Daemon {
    common::cluster_member(join, "2G", 3, &["--vm-accel", "tcg"])
}

/// `basalt vm create NAME` booting the test guest with `commands`.
fn create_guest(daemon: &Daemon, name: &str, disks: &[&str], commands: &str, memory: &str) {
    let (kernel, initrd) = guest_image();
    let cmdline = format!("console=ttyS0 quiet panic=-1 basalt.test={commands}");
    let kernel = kernel.display().to_string();
    let initrd = initrd.display().to_string();
    let mut args = vec![
        "vm",
        "create",
        name,
        "--vcpus",
        "1",
        "--memory",
        memory,
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &cmdline,
    ];
    for disk in disks {
        args.extend(["--disk", disk]);
    }
    daemon.cli_ok(&args);
}

/// With the default accelerator (`auto`) a guest boots: the probe picks KVM
/// only where KVM runs guest code faster than TCG. On the machines the tests
/// run on, `/dev/kvm` exists and QEMU's firmware prints under it, but a
/// kernel never gets through its decompressor there; a probe that trusted
/// the firmware's words picked KVM and this guest hung.
#[test]
fn a_guest_boots_with_the_default_accelerator() {
    let daemon = Daemon::start();
    daemon.create_vdisk("auto-data", "16M");
    create_guest(&daemon, "auto", &["auto-data"], "idle", "256M");
    assert_eq!(
        daemon.status().vm_accelerator,
        None,
        "decided before any VM start"
    );
    daemon.cli_ok(&["vm", "start", "auto"]);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !console(&daemon, "auto").contains("BASALT-ALIVE: 1") {
        assert!(
            Instant::now() < deadline,
            "the guest did not boot under the accelerator auto picked:\n{}",
            daemon.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = daemon.log_text();
    let probed = log
        .lines()
        .find(|l| l.contains("probed KVM"))
        .unwrap_or_else(|| panic!("no probe in the log:\n{log}"));
    eprintln!("{probed}");
    // The node says what its VMs run under, and why.
    let accel = daemon
        .status()
        .vm_accelerator
        .expect("decided by the start");
    assert!(
        (accel.starts_with("kvm (") || accel.starts_with("tcg (")) && accel.contains(" ms"),
        "{accel}"
    );
    daemon.cli_ok(&["vm", "stop", "auto", "--force"]);
}

fn show(daemon: &Daemon, name: &str) -> Value {
    daemon.cli_json(&["vm", "show", name])
}

fn console(daemon: &Daemon, name: &str) -> String {
    daemon.cli_ok(&["vm", "console", name])
}

/// The VM's console log as its file holds it (also while basaltd is down).
fn console_file(daemon: &Daemon, name: &str) -> String {
    std::fs::read_to_string(daemon.data_dir.join(format!("vms/{name}/console.log")))
        .unwrap_or_default()
}

/// Waits until the VM's console shows at least `n` sequence blocks written.
fn wait_seq(daemon: &Daemon, name: &str, n: u64) -> u64 {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let text = console(daemon, name);
        assert!(
            !text.contains("mismatch"),
            "the guest saw corrupted data:\n{text}"
        );
        let count = guest_count(&text, "BASALT-SEQ");
        if count >= n {
            return count;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not write {n} blocks (at {count}):\n{text}\n{}",
            daemon.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Reads the sequence over NBD through `daemon`: returns how many blocks
/// hold it, failing on any block that is neither the sequence (in order,
/// from 0) nor zero after its end.
fn read_sequence(daemon: &Daemon, vdisk: &str, max_blocks: u64) -> u64 {
    let mut client = daemon.nbd(vdisk);
    let data = client
        .read_all(SEQ_OFFSET, max_blocks * 4096)
        .unwrap_or_else(|e| panic!("NBD read of {vdisk}: {e:?}"));
    client.disconnect();
    let mut count = 0;
    for (i, block) in data.chunks(4096).enumerate() {
        let expected = format!("{:<4095}\n", format!("basalt seq {i}"));
        if block == expected.as_bytes() {
            assert_eq!(count, i as u64, "sequence block {i} after a gap");
            count += 1;
        } else {
            assert!(
                block.iter().all(|b| *b == 0),
                "block {i} of the sequence holds neither the sequence nor zeros: {:?}",
                String::from_utf8_lossy(&block[..40])
            );
        }
    }
    count
}

fn wait_state(daemon: &Daemon, name: &str, state: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let last = show(daemon, name);
        if last["state"] == state {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "VM {name} is not {state}: {last}\n{}",
            daemon.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Kills VM `name`'s QEMU, waits until the VM runs again in a new process,
/// and checks that the supervisor counts this as its crash `n`.
fn crash_qemu(daemon: &Daemon, name: &str, n: u64) -> Value {
    let before = daemon.qemu_pids();
    daemon.kill_qemus();
    let mut shown = Value::Null;
    wait_for("QEMU is restarted", Duration::from_secs(60), || {
        shown = show(daemon, name);
        let pids = daemon.qemu_pids();
        shown["state"] == "running" && pids.len() == 1 && pids != before
    });
    assert!(
        shown["reason"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("restarting (crash {n})")),
        "{shown}"
    );
    assert_eq!(shown["recent_crashes"], n, "{shown}");
    shown
}

fn node_id(daemon: &Daemon) -> u64 {
    daemon.cli_json(&["cluster", "status"])["node_id"]
        .as_u64()
        .expect("node id")
}

#[test]
fn guest_writes_a_pattern_on_its_vdisk_powers_off_and_stays_stopped() {
    let daemon = vm_daemon(&[]);
    daemon.cli_ok(&["vdisk", "create", "data", "--size", "64M"]);
    create_guest(
        &daemon,
        "pat",
        &["data"],
        "info,write-pattern,verify-pattern",
        "256M",
    );
    let created = show(&daemon, "pat");
    assert_eq!(created["state"], "stopped");
    assert_eq!(created["disks"], serde_json::json!(["data"]));
    let started = daemon.cli_json(&["vm", "start", "pat"]);
    assert_eq!(started["node"].as_u64(), Some(node_id(&daemon)));
    // The guest writes, checks, and powers itself off: the VM ends stopped.
    let stopped = wait_state(&daemon, "pat", "stopped", BOOT_TIMEOUT);
    assert_eq!(stopped["desired"], "stopped");
    assert!(
        stopped["reason"]
            .as_str()
            .unwrap_or("")
            .contains("powered off"),
        "{stopped}"
    );
    let text = console(&daemon, "pat");
    for check in ["info", "write-pattern", "verify-pattern"] {
        let pass = format!("BASALT-TEST: {check} PASS");
        assert!(text.contains(&pass), "no {pass:?} on the console:\n{text}");
    }
    assert!(text.contains("BASALT-INFO: size_sectors=131072"), "{text}");
    // The guest's pattern, read back over NBD.
    assert_guest_pattern(&daemon, "data");
    // Not restarted: no QEMU left, still stopped a moment later.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(show(&daemon, "pat")["state"], "stopped");
    assert!(
        daemon
            .qemu_pids()
            .iter()
            .all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()),
        "a QEMU process is left"
    );
    // Deleting the VM deletes its uploaded boot files, not its disks.
    daemon.cli_ok(&["vm", "delete", "pat"]);
    let vdisks = daemon.cli_json(&["vdisk", "list"]);
    let names: Vec<&str> = vdisks
        .as_array()
        .map(|l| l.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["data"]);
}

#[test]
fn guest_boots_through_the_bios_from_a_clone_of_an_imported_image() {
    let daemon = vm_daemon(&[]);
    let (kernel, _) = guest_image();
    let guest_dir = kernel.parent().expect("guest directory").to_path_buf();
    let image = daemon.dir().join("boot.raw");
    let mut build = std::process::Command::new(common::tool("sh"));
    build
        .arg(common::workspace_root().join("tests/guest/build-boot-disk.sh"))
        .arg(&guest_dir)
        .arg(&image)
        .arg("write-pattern,verify-pattern");
    let out = common::run_command(build, "build-boot-disk.sh", Duration::from_secs(120));
    assert!(
        out.status.success(),
        "build-boot-disk.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.cli_ok(&["image", "import", "bootimg", &image.display().to_string()]);
    daemon.cli_ok(&["vdisk", "create", "root", "--from", "bootimg"]);
    daemon.cli_ok(&["vdisk", "create", "data", "--size", "64M"]);
    // The data disk first (the guest's /dev/vda), the boot disk second.
    daemon.cli_ok(&[
        "vm",
        "create",
        "bios",
        "--memory",
        "256M",
        "--disk",
        "data",
        "--boot-disk",
        "root",
    ]);
    let shown = show(&daemon, "bios");
    assert_eq!(shown["disks"], serde_json::json!(["data", "root"]));
    assert_eq!(shown["boot"], "disk root");
    daemon.cli_ok(&["vm", "start", "bios"]);
    wait_state(&daemon, "bios", "stopped", BOOT_TIMEOUT);
    let text = console(&daemon, "bios");
    assert!(text.contains("BASALT-TEST: write-pattern PASS"), "{text}");
    assert!(text.contains("BASALT-TEST: verify-pattern PASS"), "{text}");
    assert_guest_pattern(&daemon, "data");
}

#[test]
fn guest_vm_stops_starts_and_keeps_running_across_a_basaltd_restart() {
    // 1 GiB of VM memory on this node: room for one 768 MiB guest only.
    let mut daemon = vm_daemon(&["--vm-memory", "1G"]);
    daemon.cli_ok(&["vdisk", "create", "data", "--size", "64M"]);
    daemon.cli_ok(&["vdisk", "create", "other", "--size", "64M"]);
    // The guest turns its disk's write cache off first: from then on it
    // sends no FLUSH, and each write must be durable when answered.
    create_guest(
        &daemon,
        "w",
        &["data"],
        "writethrough,seq basalt.seq=100000 basalt.seqreader=1",
        "768M",
    );
    daemon.cli_ok(&["vm", "start", "w"]);
    let before_stop = wait_seq(&daemon, "w", 40);
    assert!(
        console(&daemon, "w").contains("BASALT-TEST: writethrough PASS"),
        "{}",
        console(&daemon, "w")
    );
    assert_eq!(show(&daemon, "w")["write_through_disks"], json!(["data"]));
    assert!(daemon.metric("basalt_vhost_write_through_writes") >= 40);

    // Bad input while it runs: nothing changes.
    let (kernel, _) = guest_image();
    let kernel = kernel.display().to_string();
    daemon
        .cli(&["vm", "create", "x", "--disk", "data", "--kernel", &kernel])
        .assert_error(&["vdisk data is attached to VM w, which is running"]);
    daemon
        .cli(&["vm", "create", "x", "--disk", "nope", "--kernel", &kernel])
        .assert_error(&["no vdisk named nope"]);
    daemon
        .cli(&[
            "vm",
            "create",
            "x",
            "--disk",
            "other",
            "--kernel",
            "/no/such/kernel",
        ])
        .assert_error(&["/no/such/kernel"]);
    daemon
        .cli(&[
            "vm", "create", "x", "--memory", "2G", "--disk", "other", "--kernel", &kernel,
        ])
        .assert_error(&["2048 MiB", "largest node offers 1024 MiB"]);
    create_guest(&daemon, "second", &["other"], "idle", "512M");
    daemon
        .cli(&["vm", "start", "second"])
        .assert_error(&["no node can run VM second", "free VM memory"]);
    let me = node_id(&daemon).to_string();
    daemon
        .cli(&["vm", "migrate", "w", "--to", &me])
        .assert_error(&["already runs on node"]);
    daemon
        .cli(&["vm", "migrate", "w", "--to", "99"])
        .assert_error(&["no node 99"]);
    daemon
        .cli(&["vm", "start", "nope"])
        .assert_error(&["no VM named nope"]);
    daemon
        .cli(&["vdisk", "delete", "data"])
        .assert_error(&["used by VM w"]);
    let vms = daemon.cli_json(&["vm", "list"]);
    assert_eq!(vms.as_array().map(Vec::len), Some(2), "{vms}");
    assert_eq!(show(&daemon, "second")["state"], "stopped");
    assert_eq!(show(&daemon, "w")["state"], "running");
    let vdisks = daemon.cli_json(&["vdisk", "list"]);
    assert!(
        !vdisks.to_string().contains("\"x-kernel\""),
        "a refused create left its kernel behind: {vdisks}"
    );

    // A graceful stop: this guest ignores ACPI, so it is forced after 2 s.
    let stopped = daemon.cli_json(&["vm", "stop", "w", "--timeout", "2"]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let written = read_sequence(&daemon, "data", SEQ_BLOCKS);
    assert!(written >= before_stop, "{written} < {before_stop}");

    // Start again: a fresh boot writes the sequence from 0 again.
    let started = daemon.cli_json(&["vm", "start", "w"]);
    assert_eq!(started["state"], "running");
    let generation = started["generation"].as_u64();
    wait_seq(&daemon, "w", 30);
    let pids = daemon.qemu_pids();
    assert_eq!(pids.len(), 1);

    // basaltd restarts under the running guest: QEMU keeps running (the same
    // process), reconnects to the vdisk's socket, and the guest goes on.
    daemon.terminate();
    let during = guest_count(&console_file(&daemon, "w"), "BASALT-SEQ");
    assert!(
        std::path::Path::new(&format!("/proc/{}", pids[0])).exists(),
        "QEMU died with basaltd"
    );
    daemon.restart();
    let after = wait_seq(&daemon, "w", during + 50);
    let shown = show(&daemon, "w");
    assert_eq!(shown["state"], "running", "{shown}");
    // The new basaltd honours the choice the running QEMU still shows its
    // guest: every write since the restart was durable when answered.
    assert_eq!(shown["write_through_disks"], json!(["data"]), "{shown}");
    assert_eq!(daemon.metric("basalt_vhost_write_through_exports"), 1);
    let durable = daemon.metric("basalt_vhost_write_through_writes");
    assert!(
        durable + 10 >= after - during,
        "{durable} write-through writes for {} blocks written since the restart",
        after - during
    );
    assert_eq!(
        shown["generation"].as_u64(),
        generation,
        "the VM was not restarted"
    );
    assert_eq!(daemon.qemu_pids(), pids, "the same QEMU runs on");

    // basaltd dies (kill -9) while the guest writes and, in a second
    // process, reads: QEMU restarts the ring at the used index, the restarted
    // basaltd takes every request that had no answer, and both processes go
    // on without a reboot (answers enter the used ring in order; see
    // basalt_vhost's device module).
    daemon.kill9();
    let killed = console_file(&daemon, "w");
    let killed_at = guest_count(&killed, "BASALT-SEQ");
    let reads_at = guest_count(&killed, "BASALT-READS");
    daemon.restart();
    let after = wait_seq(&daemon, "w", killed_at.max(after) + 50);
    wait_for(
        "the guest's reader goes on after the kill",
        Duration::from_secs(60),
        || guest_count(&console(&daemon, "w"), "BASALT-READS") >= reads_at + 40,
    );
    let shown = show(&daemon, "w");
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["generation"].as_u64(), generation, "{shown}");
    assert_eq!(daemon.qemu_pids(), pids, "the same QEMU runs on");
    let forced = daemon.cli_json(&["vm", "stop", "w", "--force"]);
    assert_eq!(forced["state"], "stopped");
    let written = read_sequence(&daemon, "data", SEQ_BLOCKS);
    assert!(
        written >= after,
        "{written} < {after}: acknowledged writes lost"
    );
    assert!(!console(&daemon, "w").contains("mismatch"));
}

#[test]
fn guest_live_migrates_between_nodes_while_writing_without_losing_a_block() {
    let first = vm_member(None);
    let second = vm_member(Some(first.listen_port));
    wait_for("two members", Duration::from_secs(30), || {
        first.cli_json(&["cluster", "status"])["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    });
    first.cli_ok(&["vdisk", "create", "data", "--size", "64M", "--rf", "2"]);
    create_guest(
        &first,
        "mig",
        &["data"],
        "writethrough,seq basalt.seq=1200",
        "256M",
    );
    let started = first.cli_json(&["vm", "start", "mig"]);
    let source = started["node"].as_u64().expect("placed");
    let (source_daemon, target_daemon) = if source == node_id(&first) {
        (&first, &second)
    } else {
        (&second, &first)
    };
    let target = node_id(target_daemon);
    let before = wait_seq(source_daemon, "mig", 150);
    // Migrate in the middle of the sequence; the CLI follows the progress.
    // Asked through the destination (a Raft follower: what it answers must
    // already include the migration it forwarded to the leader).
    let migrated = target_daemon.cli_json(&["vm", "migrate", "mig", "--to", &target.to_string()]);
    assert_eq!(migrated["node"].as_u64(), Some(target), "{migrated}");
    assert_eq!(migrated["state"], "running");
    assert!(
        migrated["last_migration_total_ms"].as_u64().is_some(),
        "{migrated}"
    );
    // The destination's export started write-through, as the guest chose on
    // the source: its writes there are durable when answered.
    assert_eq!(
        migrated["write_through_disks"],
        json!(["data"]),
        "{migrated}"
    );
    wait_for(
        "write-through writes on the destination",
        Duration::from_secs(20),
        || target_daemon.metric("basalt_vhost_write_through_writes") > 0,
    );
    // The source's QEMU is gone; the destination's runs the guest on.
    wait_for("the source QEMU exits", Duration::from_secs(30), || {
        source_daemon
            .qemu_pids()
            .iter()
            .all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    });
    let stopped = wait_state(target_daemon, "mig", "stopped", BOOT_TIMEOUT);
    assert!(
        stopped["reason"]
            .as_str()
            .unwrap_or("")
            .contains("powered off"),
        "{stopped}"
    );
    let text = console(target_daemon, "mig");
    assert!(
        text.contains("BASALT-TEST: seq PASS"),
        "the guest's own checks failed after the migration:\n{text}"
    );
    assert!(
        guest_count(&text, "BASALT-SEQ") > before,
        "no writes after the migration"
    );
    // Every block, read through either node.
    assert_eq!(read_sequence(target_daemon, "data", 1200), 1200);
    assert_eq!(read_sequence(source_daemon, "data", 1200), 1200);
}

#[test]
fn guest_vm_of_a_killed_node_restarts_on_another_node_with_its_data() {
    let first = vm_member(None);
    let second = vm_member(Some(first.listen_port));
    let third = vm_member(Some(first.listen_port));
    wait_for("three voters", Duration::from_secs(30), || {
        first.cli_json(&["cluster", "status"])["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["role"] == "voter"))
    });
    let mut daemons = [Some(first), Some(second), Some(third)];
    let any = daemons[0].as_ref().expect("first");
    any.cli_ok(&["vdisk", "create", "data", "--size", "64M", "--rf", "2"]);
    create_guest(any, "ha", &["data"], "seq basalt.seq=100000", "256M");
    let started = any.cli_json(&["vm", "start", "ha"]);
    let dead = started["node"].as_u64().expect("placed");
    let index = daemons
        .iter()
        .position(|d| d.as_ref().is_some_and(|d| node_id(d) == dead))
        .expect("the VM's node");
    let acknowledged = wait_seq(daemons[index].as_ref().expect("node"), "ha", 100);
    // The host dies: basaltd and its QEMU, both SIGKILL.
    let mut victim = daemons[index].take().expect("node");
    victim.kill9();
    victim.kill_qemus();
    let survivor = daemons.iter().flatten().next().expect("a survivor");
    let moved = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let shown = show(survivor, "ha");
            if shown["state"] == "running" && shown["node"].as_u64() != Some(dead) {
                break shown;
            }
            assert!(
                Instant::now() < deadline,
                "the VM did not restart elsewhere: {shown}\n{}",
                survivor.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    assert!(
        moved["reason"].as_str().unwrap_or("").contains("died"),
        "vm show says why: {moved}"
    );
    let new_node = moved["node"].as_u64().expect("node");
    let host = daemons
        .iter()
        .flatten()
        .find(|d| node_id(d) == new_node)
        .expect("the new node");
    // The guest boots again there and writes on.
    wait_seq(host, "ha", 30);
    host.cli_ok(&["vm", "stop", "ha", "--force"]);
    let written = read_sequence(host, "data", SEQ_BLOCKS);
    assert!(
        written >= acknowledged,
        "{written} < {acknowledged}: writes acknowledged before the node died were lost"
    );
    drop(victim);
}

#[test]
fn guest_vm_whose_qemu_crashes_is_restarted_and_says_why() {
    let mut daemon = vm_daemon(&[]);
    daemon.cli_ok(&["vdisk", "create", "data", "--size", "64M"]);
    create_guest(&daemon, "crashy", &["data"], "idle", "256M");
    daemon.cli_ok(&["vm", "start", "crashy"]);
    wait_for("the guest is up", BOOT_TIMEOUT, || {
        console(&daemon, "crashy").contains("BASALT-ALIVE: 1")
    });
    assert_eq!(daemon.qemu_pids().len(), 1);
    // QEMU dies under the guest (not a power-off): the supervisor starts it
    // again on the same node and says why.
    let restarted = crash_qemu(&daemon, "crashy", 1);
    assert_eq!(restarted["desired"], "running");
    wait_for("the guest runs again", BOOT_TIMEOUT, || {
        console(&daemon, "crashy").contains("BASALT-ALIVE: 1")
    });
    // The count lives in the cluster, not in basaltd's memory: after a
    // restart of basaltd the next crash is the second.
    daemon.terminate();
    daemon.restart();
    crash_qemu(&daemon, "crashy", 2);
    daemon.cli_ok(&["vm", "stop", "crashy", "--force"]);
    assert_eq!(show(&daemon, "crashy")["state"], "stopped");
    // The operator's start gives it a fresh budget.
    let started = daemon.cli_json(&["vm", "start", "crashy"]);
    assert_eq!(started["recent_crashes"], 0, "{started}");
    daemon.cli_ok(&["vm", "stop", "crashy", "--force"]);

    // A hung QEMU (frozen with SIGSTOP: its monitor never answers) is
    // reported as such after 30 s and not killed; the report goes once it
    // answers again.
    daemon.cli_ok(&["vm", "start", "crashy"]);
    wait_for("the guest is up again", BOOT_TIMEOUT, || {
        console(&daemon, "crashy").contains("BASALT-ALIVE: 1")
    });
    wait_for(
        "the VM is reported running",
        Duration::from_secs(30),
        || show(&daemon, "crashy")["state"] == "running",
    );
    let pids = daemon.qemu_pids();
    daemon.signal_qemus(libc::SIGSTOP);
    let mut shown = Value::Null;
    wait_for("the hung QEMU is reported", Duration::from_secs(90), || {
        shown = show(&daemon, "crashy");
        shown["reason"]
            .as_str()
            .is_some_and(|r| r.contains("has not answered"))
    });
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(daemon.qemu_pids(), pids, "a hung QEMU is not replaced");
    daemon.signal_qemus(libc::SIGCONT);
    wait_for("the report is taken back", Duration::from_secs(60), || {
        show(&daemon, "crashy")["reason"]
            .as_str()
            .is_some_and(|r| !r.contains("has not answered"))
    });
    assert_eq!(daemon.qemu_pids(), pids);

    // A hung QEMU is stopped within the stop's timeout and a few seconds
    // for the kill, not after the QMP command timeouts on top.
    daemon.signal_qemus(libc::SIGSTOP);
    let asked = Instant::now();
    let stopped = daemon.cli_json(&["vm", "stop", "crashy", "--timeout", "2"]);
    let took = asked.elapsed();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(
        took < Duration::from_secs(12),
        "stopping a hung QEMU took {took:?}"
    );
    assert!(daemon.qemu_pids().is_empty(), "a QEMU is left");
}

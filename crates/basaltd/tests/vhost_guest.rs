//! A real Linux guest on a vdisk exported by the daemon over vhost-user-blk:
//! `basalt vdisk export NAME --vhost`, QEMU (TCG) boots the tiny test guest
//! (`tests/guest/build-guest.sh`) with the socket as its disk, the guest
//! writes a known pattern, checks one the test wrote over NBD, flushes and
//! powers off; the test then reads the guest's pattern back over NBD, also
//! after a restart of the daemon.
//!
//! Needs `qemu-system-x86_64` and what build-guest.sh needs (apt-get,
//! dpkg-deb); the guest is cached in `/var/tmp/basalt-guest` (or
//! `$BASALT_GUEST_DIR`), built under a lock so concurrent runs share it.
//! `BASALT_QEMU_ACCEL` picks the accelerator (default `tcg`).

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    Daemon, GUEST_PATTERN_BLOCKS, assert_guest_pattern, guest_count, guest_image,
    guest_pattern_block, run_command, tool,
};
use serde_json::Value;

// Kept in sync with the guest's /init (tests/guest/build-guest.sh).
const HOST_OFFSET: u64 = 4 << 20;
const VDISK_SIZE: u64 = 64 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// One guest at a time: two cores do not run two TCG guests well (nextest
/// also puts these tests in its `qemu` group).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Boots the guest on `socket` running `commands`; returns its console once
/// it powered off.
fn boot(image: &(PathBuf, PathBuf), socket: &str, commands: &str) -> String {
    let accel = std::env::var("BASALT_QEMU_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mut cmd = Command::new(tool("qemu-system-x86_64"));
    cmd.args(["-accel", &accel, "-m", "256", "-smp", "2"])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&image.0)
        .arg("-initrd")
        .arg(&image.1)
        .args([
            "-append",
            &format!("console=ttyS0 quiet panic=-1 basalt.test={commands}"),
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=vdisk,path={socket}"))
        .args(["-device", "vhost-user-blk-pci,chardev=vdisk,num-queues=2"]);
    let out = run_command(cmd, "qemu-system-x86_64 (test guest)", BOOT_TIMEOUT);
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "QEMU failed ({}):\n{console}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    console
}

fn expect_pass(console: &str, command: &str) {
    let pass = format!("BASALT-TEST: {command} PASS");
    assert!(
        console.lines().any(|l| l.trim_end() == pass),
        "no `{pass}` on the guest console:\n{console}"
    );
}

fn info<'a>(console: &'a str, key: &str) -> &'a str {
    let prefix = format!("BASALT-INFO: {key}=");
    console
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::trim_end)
        .unwrap_or_else(|| panic!("no {prefix} on the guest console:\n{console}"))
}

#[test]
fn linux_guest_on_a_vhost_export_writes_what_nbd_reads() {
    tool("qemu-system-x86_64");
    let _serial = serial();
    let image = guest_image();
    let mut daemon = Daemon::start();
    daemon.create_vdisk("vm", "64M");

    // The host pattern, written over NBD, for the guest to verify.
    let mut client = daemon.nbd("vm");
    let mut host = Vec::new();
    for i in 0..GUEST_PATTERN_BLOCKS {
        host.extend(guest_pattern_block("host", i));
    }
    client
        .write(HOST_OFFSET, &host, false)
        .expect("host pattern");
    client.flush().expect("flush");
    client.disconnect();

    let export = daemon.cli_json(&["vdisk", "export", "vm", "--vhost"]);
    let socket = export["socket"]
        .as_str()
        .unwrap_or_else(|| panic!("no socket in {export}"))
        .to_string();
    let meta = std::fs::metadata(&socket).unwrap_or_else(|e| panic!("{socket}: {e}"));
    assert!(meta.file_type().is_socket(), "{socket} is not a socket");
    assert_eq!(
        daemon.cli_json(&["vdisk", "show", "vm"])["vhost_socket"],
        Value::from(socket.clone())
    );
    assert_eq!(
        daemon.cli_json(&["vdisk", "export", "vm", "--vhost"])["socket"],
        Value::from(socket.clone()),
        "exporting twice gives the same socket"
    );

    let console = boot(
        &image,
        &socket,
        "info,write-pattern,verify-pattern,verify,flush",
    );
    eprintln!("--- guest console ---\n{console}");
    for command in ["info", "write-pattern", "verify-pattern", "verify", "flush"] {
        expect_pass(&console, command);
    }
    assert!(console.contains("BASALT-DONE"), "{console}");
    assert_eq!(
        info(&console, "size_sectors"),
        (VDISK_SIZE / 512).to_string()
    );
    assert_eq!(info(&console, "write_cache"), "write back");

    // What the guest wrote is on the vdisk, for any other client.
    assert_guest_pattern(&daemon, "vm");
    let status = daemon.status();
    assert!(
        status.io.flushes > 0,
        "no flush reached the store: {status:?}"
    );

    daemon.cli_ok(&["vdisk", "unexport", "vm", "--vhost"]);
    assert!(!Path::new(&socket).exists(), "socket left after unexport");
    assert_eq!(
        daemon.cli_json(&["vdisk", "show", "vm"])["vhost_socket"],
        Value::Null
    );

    // And it survives a restart.
    daemon.stop();
    daemon.restart();
    assert_guest_pattern(&daemon, "vm");
}

/// A QEMU process whose console is collected while it runs; killed (by
/// PID) when dropped.
struct RunningGuest {
    guard: common::ChildGuard,
    console: std::sync::Arc<std::sync::Mutex<String>>,
}

impl RunningGuest {
    fn console(&self) -> String {
        self.console.lock().expect("console lock").clone()
    }

    fn wait_for(&self, text: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.console().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} on the guest console within {timeout:?}:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn boot_running(image: &(PathBuf, PathBuf), socket: &str, commands: &str) -> RunningGuest {
    use std::io::Read;
    use std::process::Stdio;
    let accel = std::env::var("BASALT_QEMU_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mut cmd = Command::new(tool("qemu-system-x86_64"));
    cmd.args(["-accel", &accel, "-m", "256", "-smp", "2"])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&image.0)
        .arg("-initrd")
        .arg(&image.1)
        .args([
            "-append",
            &format!("console=ttyS0 quiet panic=-1 basalt.test={commands}"),
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-chardev")
        // Reconnects (every second) when basaltd goes away and comes back.
        .arg(format!("socket,id=vdisk,path={socket},reconnect=1"))
        .args(["-device", "vhost-user-blk-pci,chardev=vdisk,num-queues=2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start qemu-system-x86_64");
    let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = child.stdout.take().expect("qemu stdout");
    let sink = console.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("console lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    RunningGuest {
        guard: common::ChildGuard {
            child,
            name: "qemu-system-x86_64".into(),
        },
        console,
    }
}

/// A daemon with a 64 MiB vdisk `vm` exported by hand, and a guest running
/// `commands` on it: (daemon, socket, guest).
fn guest_on_a_hand_made_export(commands: &str) -> (Daemon, String, RunningGuest) {
    tool("qemu-system-x86_64");
    let image = guest_image();
    let daemon = Daemon::start();
    daemon.create_vdisk("vm", "64M");
    let export = daemon.cli_json(&["vdisk", "export", "vm", "--vhost"]);
    let socket = export["socket"].as_str().expect("socket").to_string();
    let guest = boot_running(&image, &socket, commands);
    (daemon, socket, guest)
}

/// SIGTERM while a guest does I/O through the vhost-user export: the daemon
/// still stops cleanly and in time, and comes back healthy.
#[test]
fn daemon_stops_cleanly_under_a_running_guest() {
    let _serial = serial();
    let (mut daemon, socket, mut guest) = guest_on_a_hand_made_export("soak");
    guest.wait_for("BASALT-SOAK: round 3", BOOT_TIMEOUT);
    let started = std::time::Instant::now();
    let status = daemon.terminate();
    let took = started.elapsed();
    eprintln!("basaltd stopped in {took:?} with {status}");
    assert!(
        status.success(),
        "basaltd exited with {status} when stopped under a running guest:\n{}",
        daemon.log_tail(40)
    );
    guest.guard.kill();
    daemon.restart();
    let v = daemon.cli_json(&["vdisk", "show", "vm"]);
    assert_eq!(v["state"], Value::from("healthy"), "{v}");
    assert_eq!(
        daemon.wait_for_vhost_export("vm"),
        socket,
        "an export made by hand comes back after a restart"
    );
    // The data of a completed soak round is on the vdisk (some round's
    // pattern, whole blocks).
    let mut client = daemon.nbd("vm");
    let data = client
        .read_all(16 << 20, 64 * 4096)
        .expect("read soak area");
    for (i, block) in data.chunks(4096).enumerate() {
        let text = String::from_utf8_lossy(&block[..40]);
        assert!(
            text.starts_with("basalt soak") && text.contains(&format!(" block {i} ")),
            "soak block {i} holds {text:?}"
        );
    }
    client.disconnect();
}

/// A guest of a QEMU that Basalt does not run turns its disk's write cache
/// off; basaltd is killed (`kill -9`) under it and restarts. The export comes
/// back by itself (the operator does nothing) and that QEMU reconnects. It
/// still shows its guest write-through (the guest sends no FLUSH), so the
/// export must make every write durable before answering it. Unexporting
/// forgets the export and the choice: the next restart brings back only
/// what is still exported.
#[test]
fn a_hand_made_export_and_its_write_through_choice_outlive_a_daemon_crash() {
    let _serial = serial();
    let (mut daemon, socket, mut guest) =
        guest_on_a_hand_made_export("writethrough,seq basalt.seq=100000");
    daemon.create_vdisk("other", "16M");
    let other = daemon.cli_json(&["vdisk", "export", "other", "--vhost"])["socket"]
        .as_str()
        .expect("socket")
        .to_string();
    guest.wait_for("BASALT-TEST: writethrough PASS", BOOT_TIMEOUT);
    guest.wait_for("BASALT-SEQ: 30", BOOT_TIMEOUT);
    assert_eq!(daemon.metric("basalt_vhost_write_through_exports"), 1);
    // The guest's requests and their time in basaltd (the mean under a
    // second: a slow TCG guest's, not a stuck one's).
    let requests = daemon.metric("basalt_vhost_requests");
    let spent = daemon.metric("basalt_vhost_request_microseconds");
    assert!(requests >= 30, "{requests} requests");
    assert!(
        spent > 0 && spent / requests < 1_000_000,
        "{spent} µs for {requests} requests"
    );

    daemon.kill9();
    let before = guest_count(&guest.console(), "BASALT-SEQ");
    daemon.restart();
    assert_eq!(daemon.wait_for_vhost_export("vm"), socket);
    assert_eq!(daemon.wait_for_vhost_export("other"), other);
    assert_eq!(daemon.metric("basalt_vhost_write_through_exports"), 1);
    guest.wait_for(&format!("BASALT-SEQ: {}", before + 50), BOOT_TIMEOUT);
    let after = guest_count(&guest.console(), "BASALT-SEQ");
    let durable = daemon.metric("basalt_vhost_write_through_writes");
    assert!(
        durable + 10 >= after - before,
        "{durable} write-through writes for {} blocks written since the restart",
        after - before
    );
    assert!(!guest.console().contains("mismatch"), "{}", guest.console());

    guest.guard.kill();
    daemon.cli_ok(&["vdisk", "unexport", "vm", "--vhost"]);
    daemon.stop();
    daemon.restart();
    // One pass brings back every recorded export: once `other` is back,
    // `vm` would be too.
    assert_eq!(daemon.wait_for_vhost_export("other"), other);
    assert_eq!(
        daemon.cli_json(&["vdisk", "show", "vm"])["vhost_socket"],
        Value::Null,
        "an unexported vdisk stays unexported after a restart"
    );
    daemon.cli_json(&["vdisk", "export", "vm", "--vhost"]);
    assert_eq!(
        daemon.metric("basalt_vhost_write_through_exports"),
        0,
        "an unexport forgets the choice"
    );
}

//! QEMU for Basalt's VM supervisor.
//!
//! Basalt runs every VM as one `qemu-system-x86_64` process and drives it
//! through QMP, QEMU's JSON control protocol. This crate knows QEMU and
//! nothing of the cluster:
//!
//! * [`qmp`]: a small asynchronous QMP client (line-delimited JSON over a
//!   unix socket): greeting, capabilities negotiation, commands, events.
//! * [`launch`]: the command line of a VM (guest RAM shared through a memfd so
//!   that vhost-user-blk backends can reach it; disks as vhost-user-blk
//!   devices whose sockets reconnect; serial console to a file; QMP socket,
//!   pid file) and spawning it in its own process group, so that QEMU
//!   outlives a restart of basaltd.
//! * [`probe_kvm`]: whether KVM really runs guests here, with a timeout (on
//!   some machines `/dev/kvm` exists but QEMU hangs with it).
//!
//! Supported: QEMU 7.2 (Debian 12) and later; the options used exist since
//! QEMU 6.0.

pub mod launch;
pub mod qmp;

use std::path::PathBuf;
use std::time::Duration;

pub use launch::{Accel, BootSource, VmLaunch, kill_process, process_alive, qmp_socket};
pub use qmp::Qmp;

/// Why a QEMU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused a command.
    #[error("QEMU refused {command}: {class}: {description}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's explanation.
        description: String,
    },
    /// QEMU did not answer in time.
    #[error("QEMU did not answer {0} in time")]
    Timeout(String),
    /// The QMP connection closed (QEMU exited).
    #[error("the QMP connection closed (QEMU exited)")]
    Closed,
    /// QEMU could not be started.
    #[error("cannot start QEMU ({binary}): {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl QemuError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> QemuError {
        QemuError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Whether QEMU runs a guest under KVM here: boots QEMU's firmware with
/// `-accel kvm` and waits up to `timeout` for the firmware's first words on
/// its debug console. A QEMU that hangs, fails, or has no `/dev/kvm` says no.
pub async fn probe_kvm(binary: &std::path::Path, timeout: Duration) -> bool {
    if !std::path::Path::new("/dev/kvm").exists() {
        return false;
    }
    let Ok(dir) = tempdir() else { return false };
    let log = dir.join("debugcon.log");
    let child = tokio::process::Command::new(binary)
        .args([
            "-accel",
            "kvm",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-serial", "none", "-monitor", "none", "-no-reboot"])
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", log.display()))
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        let _ = std::fs::remove_dir_all(&dir);
        return false;
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut works = false;
    while tokio::time::Instant::now() < deadline {
        if std::fs::read(&log).is_ok_and(|text| !text.is_empty()) {
            works = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    works
}

fn tempdir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "basalt-kvm-probe-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_qemu_means_no_kvm_at_once() {
        let started = std::time::Instant::now();
        let works = probe_kvm(
            std::path::Path::new("/nonexistent/qemu-system-x86_64"),
            Duration::from_secs(5),
        )
        .await;
        assert!(!works);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

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
//! * [`probe_kvm`]: whether KVM really runs guests here, and faster than
//!   TCG, timed on real work (on some machines `/dev/kvm` exists but a guest
//!   under it crawls).
//!
//! Supported: QEMU 7.2 (Debian 12) and later; the options used exist since
//! QEMU 6.0.

pub mod launch;
mod probe;
pub mod qmp;

use std::path::PathBuf;

pub use launch::{Accel, BootSource, VmLaunch, kill_process, process_alive, qmp_socket};
pub use probe::{KvmProbe, probe_kvm};
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

//! A VM's QEMU command line, and its process.
//!
//! Choices, and why:
//! * Guest RAM is a memfd shared with other processes
//!   (`memory-backend-memfd,share=on`): vhost-user-blk backends read and
//!   write guest buffers directly, so QEMU stays out of the I/O path.
//! * Disks are `vhost-user-blk-pci` devices on sockets that reconnect every
//!   second: when basaltd restarts, the guest's I/O waits and resumes.
//! * `-no-shutdown`: a guest that powers off leaves QEMU in the `shutdown`
//!   state instead of exiting, so the supervisor can tell it from a crash,
//!   even one noticed only after basaltd restarted.
//! * The serial console goes to a file, QMP to a unix socket and the pid to
//!   a pid file, all in the VM's run directory; QEMU runs in its own process
//!   group. Nothing ties QEMU to basaltd's life: a restarted basaltd finds
//!   its VMs again through these files.
//! * Under TCG a one-vCPU guest gets room for a second vCPU (`-smp
//!   1,maxcpus=2`), see [`VmLaunch::smp`].

use std::path::{Path, PathBuf};

use crate::QemuError;

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's own binary translation (slow, works everywhere).
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// From disk `index` of [`VmLaunch::disks`], through the firmware.
    Disk(usize),
    /// Direct kernel boot.
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Command line.
        cmdline: String,
    },
}

/// Everything QEMU needs to run one VM.
#[derive(Debug, Clone)]
pub struct VmLaunch {
    /// The VM's name.
    pub name: String,
    /// The QEMU binary.
    pub binary: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vhost-user-blk sockets, in the guest's disk order.
    pub disks: Vec<PathBuf>,
    /// Queues per disk (at most what the backend offers).
    pub queues_per_disk: u16,
    /// Boot source.
    pub boot: BootSource,
    /// NICs with user-mode networking.
    pub nics: u32,
    /// Run directory: QMP socket, console log, pid file, QEMU's own log.
    pub run_dir: PathBuf,
    /// Wait for an incoming migration at this URI (`tcp:HOST:PORT`).
    pub incoming: Option<String>,
}

impl VmLaunch {
    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        qmp_socket(&self.run_dir)
    }

    /// The `-smp` value.
    ///
    /// Under TCG with at most one possible vCPU, QEMU before 8.1 leaves the
    /// guest's memory barriers out of the code it translates (QEMU commit
    /// c914d46d, "tcg: Do not elide memory barriers for !CF_PARALLEL in
    /// system mode"). A guest's virtio driver and a vhost-user backend
    /// running beside it then can miss each other's ring updates: the
    /// driver waits for an interrupt the backend saw no reason to send, and
    /// the disk hangs with every request answered (seen with both Basalt's
    /// and qemu-storage-daemon's backends on QEMU 7.2). Allowing a second
    /// vCPU makes QEMU translate for parallel vCPUs, barriers included; the
    /// guest runs one vCPU and sees one more it could hot-add. The rule
    /// depends only on the spec and the accelerator, so a migration's two
    /// ends agree on it.
    pub fn smp(&self) -> String {
        if self.accel == Accel::Tcg && self.vcpus <= 1 {
            "1,maxcpus=2".to_string()
        } else {
            self.vcpus.to_string()
        }
    }

    /// QEMU's arguments.
    pub fn args(&self) -> Vec<String> {
        let run = |file: &str| self.run_dir.join(file).display().to_string();
        let mut args: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &format!("guest={},debug-threads=on", self.name)]);
        push(&["-accel", self.accel.as_str()]);
        push(&["-machine", "pc"]);
        push(&["-smp", &self.smp()]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=ram,size={}M,share=on",
                self.memory_mib
            ),
        ]);
        push(&["-numa", "node,memdev=ram"]);
        push(&["-nodefaults", "-display", "none", "-no-shutdown"]);
        push(&[
            "-chardev",
            &format!("file,id=console,path={}", run("console.log")),
        ]);
        push(&["-serial", "chardev:console"]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", run("qmp.sock")),
        ]);
        push(&["-pidfile", &run("qemu.pid")]);
        for (i, socket) in self.disks.iter().enumerate() {
            push(&[
                "-chardev",
                &format!("socket,id=disk{i},path={},reconnect=1", socket.display()),
            ]);
            let mut device = format!(
                "vhost-user-blk-pci,id=vdisk{i},chardev=disk{i},num-queues={}",
                self.queues_per_disk.max(1)
            );
            if self.boot == BootSource::Disk(i) {
                device.push_str(",bootindex=1");
            }
            push(&["-device", &device]);
        }
        for i in 0..self.nics {
            push(&["-netdev", &format!("user,id=net{i}")]);
            push(&[
                "-device",
                &format!(
                    "virtio-net-pci,netdev=net{i},mac={}",
                    mac_address(&self.name, i)
                ),
            ]);
        }
        if let BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &self.boot
        {
            push(&["-kernel", &kernel.display().to_string()]);
            if let Some(initrd) = initrd {
                push(&["-initrd", &initrd.display().to_string()]);
            }
            push(&["-append", cmdline]);
        }
        if let Some(uri) = &self.incoming {
            push(&["-incoming", uri]);
        }
        args
    }

    /// Starts QEMU in its own process group, its output appended to
    /// `qemu.log` in the run directory. The caller reaps the child.
    pub fn spawn(&self) -> Result<tokio::process::Child, QemuError> {
        std::fs::create_dir_all(&self.run_dir)
            .map_err(|e| QemuError::io(format!("creating {}", self.run_dir.display()), e))?;
        // A socket or pid file of an earlier process would mislead the
        // supervisor into talking to a dead QEMU.
        for stale in ["qmp.sock", "qemu.pid"] {
            let _ = std::fs::remove_file(self.run_dir.join(stale));
        }
        let log_path = self.run_dir.join("qemu.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| QemuError::io(format!("opening {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| QemuError::io(format!("opening {}", log_path.display()), e))?;
        tokio::process::Command::new(&self.binary)
            .args(self.args())
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: self.binary.clone(),
                source,
            })
    }
}

/// The QMP socket of the VM whose run directory is `run_dir`.
pub fn qmp_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("qmp.sock")
}

/// A locally administered MAC address, stable for a VM's NIC.
pub fn mac_address(vm: &str, nic: u32) -> String {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in vm.bytes().chain(nic.to_le_bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = hash.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}

/// Whether process `pid` is alive and its command line mentions `marker`
/// (the VM's run directory), so that a recycled pid is not taken for QEMU.
pub fn process_alive(pid: u32, marker: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie has exited: field 3, after the command in parentheses.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains(marker)
}

/// Sends SIGKILL to `pid`.
pub fn kill_process(pid: u32) -> Result<(), QemuError> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| {
        QemuError::io(
            format!("pid {pid}"),
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc == 0 {
        Ok(())
    } else {
        Err(QemuError::io(
            format!("killing pid {pid}"),
            std::io::Error::last_os_error(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> VmLaunch {
        VmLaunch {
            name: "web1".into(),
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            vcpus: 2,
            memory_mib: 256,
            disks: vec!["/run/a.sock".into(), "/run/b.sock".into()],
            queues_per_disk: 2,
            boot: BootSource::Disk(1),
            nics: 1,
            run_dir: "/var/lib/basalt/vms/web1".into(),
            incoming: Some("tcp:127.0.0.1:4444".into()),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_command_line_shares_ram_and_attaches_vhost_disks_in_order() {
        let args = launch().args();
        assert_eq!(after(&args, "-accel"), ["tcg"]);
        assert_eq!(after(&args, "-m"), ["256M"]);
        assert_eq!(
            after(&args, "-object"),
            ["memory-backend-memfd,id=ram,size=256M,share=on"]
        );
        assert_eq!(
            after(&args, "-chardev")[1..],
            [
                "socket,id=disk0,path=/run/a.sock,reconnect=1",
                "socket,id=disk1,path=/run/b.sock,reconnect=1"
            ]
        );
        let devices = after(&args, "-device");
        assert_eq!(
            devices[0],
            "vhost-user-blk-pci,id=vdisk0,chardev=disk0,num-queues=2"
        );
        assert_eq!(
            devices[1],
            "vhost-user-blk-pci,id=vdisk1,chardev=disk1,num-queues=2,bootindex=1"
        );
        assert!(devices[2].starts_with("virtio-net-pci,netdev=net0,mac=52:54:00:"));
        assert_eq!(after(&args, "-incoming"), ["tcp:127.0.0.1:4444"]);
        assert!(args.contains(&"-no-shutdown".to_string()));
        assert!(after(&args, "-kernel").is_empty());
    }

    #[test]
    fn a_one_vcpu_tcg_guest_gets_room_for_a_second_vcpu() {
        let mut vm = launch();
        assert_eq!(after(&vm.args(), "-smp"), ["2"]);
        vm.vcpus = 1;
        assert_eq!(after(&vm.args(), "-smp"), ["1,maxcpus=2"]);
        vm.accel = Accel::Kvm;
        assert_eq!(after(&vm.args(), "-smp"), ["1"]);
        vm.vcpus = 4;
        assert_eq!(after(&vm.args(), "-smp"), ["4"]);
    }

    #[test]
    fn kernel_boot_passes_kernel_initrd_and_command_line() {
        let mut vm = launch();
        vm.boot = BootSource::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0 quiet".into(),
        };
        vm.incoming = None;
        let args = vm.args();
        assert_eq!(after(&args, "-kernel"), ["/k"]);
        assert!(after(&args, "-initrd").is_empty());
        assert_eq!(after(&args, "-append"), ["console=ttyS0 quiet"]);
        assert!(!args.iter().any(|a| a.contains("bootindex")));
        assert!(after(&args, "-incoming").is_empty());
    }

    #[test]
    fn mac_addresses_are_stable_and_distinct() {
        assert_eq!(mac_address("web1", 0), mac_address("web1", 0));
        assert_ne!(mac_address("web1", 0), mac_address("web1", 1));
        assert_ne!(mac_address("web1", 0), mac_address("web2", 0));
        assert!(mac_address("x", 0).starts_with("52:54:00:"));
    }

    #[test]
    fn process_alive_checks_the_marker() {
        let me = std::process::id();
        let cmdline = std::fs::read(format!("/proc/{me}/cmdline")).unwrap_or_default();
        let first = String::from_utf8_lossy(&cmdline)
            .split('\0')
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(process_alive(me, &first));
        assert!(!process_alive(me, "no-such-marker-in-a-cmdline"));
        assert!(!process_alive(u32::MAX - 1, ""));
    }
}

//! VMs on this node: the QEMU supervisor.
//!
//! The cluster state says, for every VM, what the operator wants (`desired`),
//! which node runs it (`node`) under which placement (`generation`), and
//! whether a live migration is under way. Every node runs the same loop
//! ([`supervise_forever`]) over that state and its own QEMU processes:
//!
//! * a VM placed here that should run and has no process gets one (its
//!   vdisks exported over vhost-user-blk from this node, its boot files
//!   read out of the cluster);
//! * a process whose VM was stopped is asked to power off (or killed when
//!   forced or past the timeout); a process whose VM was deleted, moved to
//!   another node or placed anew (fail-over) is killed;
//! * a VM migrating here gets a process waiting for the migration stream,
//!   and the source node drives the migration through QMP.
//!
//! Each process has a monitor task that polls QMP: a guest that powered off
//! (QEMU runs with `-no-shutdown`, so it stays in the `shutdown` state) makes
//! the VM `stopped` for good; a QEMU that dies unexpectedly is restarted,
//! until it crashed three times within ten minutes (then `failed`). The
//! crashes are counted in the VM's record, so a restarted basaltd or the
//! node a fail-over moves the VM to goes on counting.
//!
//! QEMU does not depend on basaltd staying up: a restarted basaltd adopts
//! the processes it finds in its run directories (pid file and QMP socket)
//! and exports their vdisks again; QEMU's vhost-user sockets reconnect and
//! the guests' I/O resumes. A guest's write-cache choice, which its QEMU
//! shows it for as long as the process runs, is kept next to the process
//! and in the VM's record, so that the new exports (and a migration's
//! destination) honour it (`GuestWriteCache`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_api::{ConsoleChunk, CreateVm, Vm};
use basalt_core::IoBuf;
use basalt_meta::{
    ClusterState, Command, CommandResult, NodeId, Refusal, StoredFile, VmBoot, VmCommand,
    VmDesired, VmRecord, VmRunState, VmSpec,
};
use basalt_qemu::{Accel, BootSource, Qmp, VmLaunch};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::ControlError;
use crate::node::Node;

/// Which accelerator VMs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if a probe shows it works, else TCG.
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG.
    Tcg,
}

/// How this node runs VMs.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// Accelerator.
    pub accel: AccelChoice,
    /// Run directories of the VMs (one per VM).
    pub run_dir: PathBuf,
    /// Host part of the address the migration streams come in at.
    pub migration_host: String,
    /// vCPUs offered to VMs (CPUs times the CPU overcommit).
    pub vcpus: u64,
    /// MiB of memory offered to VMs.
    pub memory_mib: u64,
}

/// Crashes within [`CRASH_WINDOW`] after which a VM is `failed`.
const MAX_CRASHES: usize = 3;
const CRASH_WINDOW: Duration = Duration::from_secs(600);
/// How often the supervisor looks at its processes.
const TICK: Duration = Duration::from_millis(500);
/// How long a running QEMU's monitor may go without answering before the
/// VM's reason says so. It is not killed for it: a QEMU whose monitor is
/// stuck may still run its guest, and only the operator knows whether to
/// stop it (a stop kills a hung QEMU within its timeout).
const HUNG_AFTER: Duration = Duration::from_secs(30);

/// What this node keeps of a QEMU process, also on disk (`instance.json`)
/// so that a restarted basaltd can adopt it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstanceFile {
    generation: u64,
    pid: u32,
    disks: Vec<String>,
}

/// A QEMU process of this node.
struct Instance {
    name: String,
    generation: u64,
    pid: u32,
    run_dir: PathBuf,
    disks: Vec<String>,
    qmp: tokio::sync::Mutex<Option<Qmp>>,
    /// Set when the process has exited (our child) or vanished.
    exited: AtomicBool,
    /// The supervisor ends it: its exit is no crash.
    ending: AtomicBool,
    /// This node migrates it away.
    migrating_out: AtomicBool,
    /// It was started for an incoming migration and has not run yet: a
    /// guest migrated while paused (TCG) is resumed here once the
    /// switch-over is recorded.
    incoming: AtomicBool,
    /// It has been reported running under its generation.
    reported_running: AtomicBool,
}

impl Instance {
    /// The process described by `file`, running VM `name` from `run_dir`.
    fn new(
        name: String,
        file: InstanceFile,
        run_dir: PathBuf,
        incoming: bool,
        reported_running: bool,
    ) -> Instance {
        Instance {
            name,
            generation: file.generation,
            pid: file.pid,
            run_dir,
            disks: file.disks,
            qmp: tokio::sync::Mutex::new(None),
            exited: AtomicBool::new(false),
            ending: AtomicBool::new(false),
            migrating_out: AtomicBool::new(false),
            incoming: AtomicBool::new(incoming),
            reported_running: AtomicBool::new(reported_running),
        }
    }

    /// The process still runs.
    fn alive(&self) -> bool {
        !self.exited.load(Ordering::Acquire)
            && basalt_qemu::process_alive(self.pid, &self.run_dir.display().to_string())
    }

    async fn qmp_execute(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, basalt_qemu::QemuError> {
        let mut qmp = self.qmp.lock().await;
        if qmp.is_none() {
            let socket = basalt_qemu::qmp_socket(&self.run_dir);
            *qmp = Some(Qmp::connect(&socket, Duration::from_secs(2)).await?);
        }
        let Some(connection) = qmp.as_mut() else {
            return Err(basalt_qemu::QemuError::Closed);
        };
        let result = connection.execute(command, arguments).await;
        if matches!(
            result,
            Err(basalt_qemu::QemuError::Closed
                | basalt_qemu::QemuError::Timeout(_)
                | basalt_qemu::QemuError::Io { .. })
        ) {
            *qmp = None;
        }
        result
    }

    /// The VM runs here as reported, with no stop, kill or outgoing
    /// migration under way: the monitor may report on it.
    fn reportable(&self) -> bool {
        self.reported_running.load(Ordering::Acquire)
            && !self.ending.load(Ordering::Acquire)
            && !self.migrating_out.load(Ordering::Acquire)
    }

    /// Drops the QMP connection after a command was given up half way (its
    /// answer may still come and must not be taken for the next one's).
    /// Left alone if another task is using it.
    fn forget_qmp(&self) {
        if let Ok(mut qmp) = self.qmp.try_lock() {
            *qmp = None;
        }
    }

    async fn status(&self) -> Result<String, basalt_qemu::QemuError> {
        let status = self.qmp_execute("query-status", None).await?;
        Ok(status
            .get("status")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// Ends the process: `quit` through QMP, SIGKILL if it lingers.
    async fn kill(&self) {
        self.ending.store(true, Ordering::Release);
        let quit =
            tokio::time::timeout(Duration::from_secs(3), self.qmp_execute("quit", None)).await;
        // A QEMU that took the quit (or closed its monitor on it) gets a
        // moment to exit; one that did not answer is hung and killed now.
        let quitting = matches!(quit, Ok(Ok(_) | Err(basalt_qemu::QemuError::Closed)));
        if quitting {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            self.forget_qmp();
        }
        if self.alive() {
            if let Err(error) = basalt_qemu::kill_process(self.pid) {
                tracing::warn!(vm = %self.name, %error, "cannot kill QEMU");
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The supervisor's bookkeeping, held by the [`Node`].
#[derive(Default)]
pub(crate) struct Supervisor {
    instances: Mutex<HashMap<String, Arc<Instance>>>,
    /// VMs with a start, stop or migration task running.
    busy: Mutex<HashSet<String>>,
    /// The accelerator, and why it was chosen; set by the first VM start.
    accel: tokio::sync::OnceCell<(Accel, String)>,
}

impl Supervisor {
    fn claim(&self, name: &str) -> bool {
        self.busy.lock().insert(name.to_string())
    }

    fn release(&self, name: &str) {
        self.busy.lock().remove(name);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The API's view of a VM record.
pub(crate) fn vm_view(record: &VmRecord) -> Vm {
    let state = if record.migration.is_some() {
        "migrating"
    } else {
        match (record.desired, record.state) {
            (_, VmRunState::Failed) => "failed",
            (VmDesired::Stopped, VmRunState::Stopped) => "stopped",
            (VmDesired::Stopped, _) => "stopping",
            (VmDesired::Running, VmRunState::Running) => "running",
            (VmDesired::Running, _) => "starting",
        }
    };
    let (boot, cmdline) = match &record.spec.boot {
        VmBoot::Disk { vdisk } => (format!("disk {vdisk}"), None),
        VmBoot::Kernel {
            kernel, cmdline, ..
        } => (format!("kernel {}", kernel.vdisk), Some(cmdline.clone())),
    };
    Vm {
        name: record.spec.name.clone(),
        state: state.to_string(),
        desired: match record.desired {
            VmDesired::Running => "running",
            VmDesired::Stopped => "stopped",
        }
        .to_string(),
        node: record.node,
        vcpus: record.spec.vcpus,
        memory: record.spec.memory_mib << 20,
        disks: record.spec.disks.clone(),
        boot,
        cmdline,
        nics: record.spec.nics,
        reason: record.reason.clone(),
        generation: record.generation,
        migration: record.migration.as_ref().map(|m| basalt_api::VmMigration {
            from: m.from,
            to: m.to,
            transferred: m.transferred,
            total: m.total,
        }),
        last_migration_downtime_ms: record.last_migration_ms.map(|(d, _)| d),
        last_migration_total_ms: record.last_migration_ms.map(|(_, t)| t),
        write_through_disks: record.write_through_disks.iter().cloned().collect(),
        recent_crashes: record.crashes_since(unix_now(), CRASH_WINDOW.as_secs()) as u64,
        created: record.created,
    }
}

fn refusal(kind: Refusal, reason: String) -> ControlError {
    match kind {
        Refusal::NotFound => ControlError::NotFound(reason),
        Refusal::Exists | Refusal::Conflict => ControlError::Busy(reason),
        Refusal::Invalid => ControlError::BadRequest(reason),
    }
}

impl Node {
    async fn propose_vm(&self, command: VmCommand) -> Result<CommandResult, ControlError> {
        let result = self
            .cluster()
            .propose(Command::Vm { command })
            .await
            .map_err(|e| ControlError::Cluster(e.to_string()))?;
        match result {
            CommandResult::Refused { kind, reason } => Err(refusal(kind, reason)),
            other => Ok(other),
        }
    }

    fn vm_record(&self, name: &str) -> Result<VmRecord, ControlError> {
        self.cluster()
            .cluster()
            .vm(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no VM named {name}")))
    }

    /// Tells the cluster what VM capacity this node offers (retrying until
    /// the cluster takes it).
    pub async fn offer_vm_capacity(&self) {
        loop {
            let me = self.node_id();
            if me != 0 {
                let offered = self.cluster().cluster().node_resources.get(&me).copied();
                let wanted = basalt_meta::NodeResources {
                    vcpus: self.config.vm.vcpus,
                    memory_mib: self.config.vm.memory_mib,
                };
                if offered == Some(wanted) {
                    return;
                }
                let command = VmCommand::SetNodeResources {
                    node: me,
                    vcpus: wanted.vcpus,
                    memory_mib: wanted.memory_mib,
                };
                match self.propose_vm(command).await {
                    Ok(_) => {
                        tracing::info!(
                            vcpus = wanted.vcpus,
                            memory_mib = wanted.memory_mib,
                            "offered VM capacity"
                        );
                        return;
                    }
                    Err(error) => tracing::debug!(%error, "cannot offer VM capacity yet"),
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Every VM.
    pub fn vms(&self) -> Vec<Vm> {
        self.cluster().cluster().vms.values().map(vm_view).collect()
    }

    /// One VM.
    pub fn vm(&self, name: &str) -> Result<Vm, ControlError> {
        self.vm_record(name).map(|r| vm_view(&r))
    }

    /// Waits until this node has applied a state where `ready` holds (the
    /// leader applies a command before the followers do); gives up after
    /// the usual apply wait.
    async fn wait_local(&self, ready: impl Fn(&ClusterState) -> bool) {
        if crate::cluster::wait_applied(self, ready).await.is_none() {
            tracing::warn!("this node has not caught up with the cluster in time");
        }
    }

    /// Waits (up to `timeout`) until VM `name` satisfies `done`.
    async fn wait_vm(
        &self,
        name: &str,
        timeout: Duration,
        done: impl Fn(&VmRecord) -> bool,
    ) -> Result<VmRecord, ControlError> {
        let mut changes = self.cluster().subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let state = changes.borrow_and_update().clone();
            let record = state
                .vm(name)
                .cloned()
                .ok_or_else(|| ControlError::NotFound(format!("VM {name} was deleted")))?;
            if done(&record) {
                return Ok(record);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ControlError::Busy(format!(
                    "VM {name} did not get there within {} s: {}",
                    timeout.as_secs(),
                    record.reason
                )));
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
        }
    }

    /// Defines a VM (stopped). With `dry_run`, only checks it.
    pub async fn create_vm(&self, request: CreateVm) -> Result<Option<Vm>, ControlError> {
        if request.memory == 0 || !request.memory.is_multiple_of(1 << 20) {
            return Err(ControlError::BadRequest(format!(
                "memory must be a non-zero multiple of 1 MiB, not {} bytes",
                request.memory
            )));
        }
        let boot = match (&request.boot_disk, &request.kernel) {
            (Some(_), Some(_)) => {
                return Err(ControlError::BadRequest(
                    "give either a boot disk or a kernel, not both".into(),
                ));
            }
            (None, None) => {
                return Err(ControlError::BadRequest(
                    "give a boot source: a boot disk or a kernel".into(),
                ));
            }
            (Some(vdisk), None) => {
                if request.initrd.is_some() || request.cmdline.is_some() {
                    return Err(ControlError::BadRequest(
                        "an initrd and a command line go with a kernel, not a boot disk".into(),
                    ));
                }
                VmBoot::Disk {
                    vdisk: vdisk.clone(),
                }
            }
            (None, Some(kernel)) => VmBoot::Kernel {
                kernel: StoredFile {
                    vdisk: kernel.vdisk.clone(),
                    length: kernel.length,
                },
                initrd: request.initrd.as_ref().map(|f| StoredFile {
                    vdisk: f.vdisk.clone(),
                    length: f.length,
                }),
                cmdline: request.cmdline.clone().unwrap_or_default(),
            },
        };
        let spec = VmSpec {
            name: request.name.clone(),
            vcpus: request.vcpus,
            memory_mib: request.memory >> 20,
            disks: request.disks.clone(),
            boot,
            nics: request.nics,
            owned_vdisks: request.owned_vdisks.clone(),
        };
        if request.dry_run {
            // The boot files may not be uploaded yet: check the rest.
            let state = self.cluster().cluster();
            return match state.check_new_vm(&spec, false) {
                Ok(()) => Ok(None),
                Err((kind, reason)) => Err(refusal(kind, reason)),
            };
        }
        self.propose_vm(VmCommand::CreateVm {
            spec,
            created: unix_now(),
        })
        .await?;
        tracing::info!(vm = %request.name, "created VM");
        // The leader applied it; this node may lag behind.
        self.wait_local(|state| state.vm(&request.name).is_some())
            .await;
        self.vm(&request.name).map(Some)
    }

    /// Starts a VM (the cluster picks the node) and waits until its QEMU
    /// runs.
    pub async fn start_vm(&self, name: &str) -> Result<Vm, ControlError> {
        let before = self.vm_record(name)?.generation;
        self.propose_vm(VmCommand::StartVm {
            name: name.to_string(),
            reason: "started by the operator".into(),
        })
        .await?;
        // Not the state before the start, on a node that lags behind.
        self.wait_local(|state| {
            state
                .vm(name)
                .is_none_or(|vm| vm.desired == VmDesired::Running || vm.generation > before)
        })
        .await;
        let record = self
            .wait_vm(name, Duration::from_secs(120), |vm| {
                vm.state == VmRunState::Running
                    || vm.state == VmRunState::Failed
                    || vm.desired == VmDesired::Stopped
            })
            .await?;
        if record.state == VmRunState::Failed {
            return Err(ControlError::Internal(format!(
                "VM {name} failed to start: {}",
                record.reason
            )));
        }
        Ok(vm_view(&record))
    }

    /// Stops a VM and waits until its QEMU is gone.
    pub async fn stop_vm(&self, name: &str, force: bool, timeout: u64) -> Result<Vm, ControlError> {
        self.vm_record(name)?;
        self.propose_vm(VmCommand::StopVm {
            name: name.to_string(),
            force,
            timeout,
        })
        .await?;
        self.wait_local(|state| {
            state
                .vm(name)
                .is_none_or(|vm| vm.desired == VmDesired::Stopped)
        })
        .await;
        let record = self
            .wait_vm(name, Duration::from_secs(timeout + 30), |vm| {
                vm.state == VmRunState::Stopped || vm.desired == VmDesired::Running
            })
            .await?;
        Ok(vm_view(&record))
    }

    /// Deletes a stopped VM and the vdisks that hold its boot files.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ControlError> {
        let record = self.vm_record(name)?;
        self.propose_vm(VmCommand::DeleteVm {
            name: name.to_string(),
        })
        .await?;
        // Its boot files can go once this node knows the VM is gone.
        self.wait_local(|state| state.vm(name).is_none()).await;
        for vdisk in &record.spec.owned_vdisks {
            match self.delete_vdisk(vdisk).await {
                Ok(()) | Err(ControlError::Store(basalt_store::StoreError::NoSuchVdisk(_))) => {}
                Err(error) => {
                    tracing::warn!(vm = name, vdisk, %error, "cannot delete a boot file vdisk")
                }
            }
        }
        tracing::info!(vm = name, "deleted VM");
        Ok(())
    }

    /// Starts a live migration of VM `name` to node `to`; the answer comes
    /// at once, the progress shows in the VM's `migration`.
    pub async fn migrate_vm(&self, name: &str, to: NodeId) -> Result<Vm, ControlError> {
        self.vm_record(name)?;
        self.propose_vm(VmCommand::BeginMigration {
            name: name.to_string(),
            to,
            started: unix_now(),
        })
        .await?;
        tracing::info!(vm = name, to, "live migration asked for");
        // Answer with the migration visible (or already over): a client
        // following it from this node must not see the state before it.
        self.wait_local(|state| {
            state
                .vm(name)
                .is_none_or(|vm| vm.migration.is_some() || vm.node == Some(to))
        })
        .await;
        self.vm(name)
    }

    /// A piece of VM `name`'s serial console log from `offset`, read on the
    /// node that runs it (or last ran it).
    pub async fn vm_console(&self, name: &str, offset: u64) -> Result<ConsoleChunk, ControlError> {
        let record = self.vm_record(name)?;
        let me = self.node_id();
        let node = record.node.unwrap_or(me);
        if node == me {
            return self.local_console(name, offset);
        }
        let addr = self
            .cluster()
            .cluster()
            .nodes
            .get(&node)
            .map(|n| n.listen.clone())
            .ok_or_else(|| ControlError::NotFound(format!("node {node} is not a member")))?;
        crate::cluster::remote_console(self, &addr, name, offset).await
    }

    /// The local console log of VM `name`, from `offset`.
    pub(crate) fn local_console(
        &self,
        name: &str,
        offset: u64,
    ) -> Result<ConsoleChunk, ControlError> {
        use std::io::{Read, Seek, SeekFrom};
        const MAX_CHUNK: u64 = 1 << 20;
        let path = self.config.vm.run_dir.join(name).join("console.log");
        let me = self.node_id();
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ConsoleChunk {
                    node: me,
                    offset,
                    next: offset,
                    data: String::new(),
                });
            }
            Err(source) => return Err(ControlError::Io { path, source }),
        };
        let io = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        let length = file.metadata().map_err(io)?.len();
        // A new process on this node starts a new log: begin again.
        let offset = if offset > length { 0 } else { offset };
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut data = Vec::new();
        file.take(MAX_CHUNK).read_to_end(&mut data).map_err(io)?;
        Ok(ConsoleChunk {
            node: me,
            offset,
            next: offset + data.len() as u64,
            data: String::from_utf8_lossy(&data).into_owned(),
        })
    }

    /// Writes `data` at the start of vdisk `name` (boot files) and flushes.
    pub async fn write_vdisk_content(
        &self,
        name: &str,
        data: bytes::Bytes,
    ) -> Result<basalt_api::StoredFile, ControlError> {
        let vdisk = self.vdisk(name)?;
        if data.is_empty() {
            return Err(ControlError::BadRequest("the content is empty".into()));
        }
        if data.len() as u64 > vdisk.size {
            return Err(ControlError::BadRequest(format!(
                "{} bytes do not fit in vdisk {name} of {} bytes",
                data.len(),
                vdisk.size
            )));
        }
        let backend = self
            .backend(name)
            .ok_or_else(|| ControlError::NotFound(format!("no vdisk named {name}")))?;
        use basalt_core::BlockBackend;
        const CHUNK: usize = 1 << 20;
        for (i, piece) in data.chunks(CHUNK).enumerate() {
            // Whole 4 KiB blocks: the tail is padded with zeros.
            let mut buf = IoBuf::zeroed(piece.len().div_ceil(4096) * 4096);
            buf.as_mut_slice()[..piece.len()].copy_from_slice(piece);
            backend
                .write((i * CHUNK) as u64, buf, basalt_core::WriteFlags::default())
                .await
                .map_err(|e| ControlError::Internal(format!("writing vdisk {name}: {e}")))?;
        }
        backend
            .flush()
            .await
            .map_err(|e| ControlError::Internal(format!("flushing vdisk {name}: {e}")))?;
        drop(backend);
        // Whichever node starts the VM reads it next: no lease to wait out.
        self.hand_back(name).await;
        Ok(basalt_api::StoredFile {
            vdisk: name.to_string(),
            length: data.len() as u64,
        })
    }

    /// Creates vdisk `name` as a copy of `from` (an imported image):
    /// `size` 0 takes the source's size. Unallocated and zero ranges of the
    /// source are not written (the copy stays thin).
    pub async fn clone_vdisk(
        &self,
        name: &str,
        from: &str,
        size: u64,
        rf: Option<u32>,
    ) -> Result<basalt_api::Vdisk, ControlError> {
        use basalt_core::BlockBackend;
        let source_size = self.vdisk(from)?.size;
        let size = if size == 0 { source_size } else { size };
        if size < source_size {
            return Err(ControlError::BadRequest(format!(
                "a clone of {from} needs at least {source_size} bytes, not {size}"
            )));
        }
        let created = self.create_vdisk(name, size, rf).await?;
        let copy = async {
            let source = self
                .backend(from)
                .ok_or_else(|| ControlError::NotFound(format!("no vdisk named {from}")))?;
            let target = self
                .backend(name)
                .ok_or_else(|| ControlError::NotFound(format!("no vdisk named {name}")))?;
            const CHUNK: u64 = 1 << 20;
            let mut offset = 0;
            while offset < source_size {
                let len = (source_size - offset).min(CHUNK);
                let data = source
                    .read(offset, len as u32)
                    .await
                    .map_err(|e| ControlError::Internal(format!("reading {from}: {e}")))?;
                if data.as_slice().iter().any(|b| *b != 0) {
                    target
                        .write(offset, data, basalt_core::WriteFlags::default())
                        .await
                        .map_err(|e| ControlError::Internal(format!("writing {name}: {e}")))?;
                }
                offset += len;
            }
            target
                .flush()
                .await
                .map_err(|e| ControlError::Internal(format!("flushing {name}: {e}")))
        };
        if let Err(error) = copy.await {
            let _ = self.delete_vdisk(name).await;
            return Err(error);
        }
        tracing::info!(name, from, "cloned vdisk");
        Ok(created)
    }

    /// Reads a stored file out of its vdisk into `path`.
    async fn fetch_file(&self, file: &StoredFile, path: &std::path::Path) -> Result<(), String> {
        use basalt_core::BlockBackend;
        let backend = self
            .backend(&file.vdisk)
            .ok_or_else(|| format!("no vdisk named {}", file.vdisk))?;
        if file.length > backend.size() {
            return Err(format!("vdisk {} is smaller than its file", file.vdisk));
        }
        let mut content = Vec::with_capacity(usize::try_from(file.length).unwrap_or(0));
        let mut offset = 0u64;
        while offset < file.length {
            let len = (file.length - offset).min(1 << 20);
            let len32 = u32::try_from(len).map_err(|_| "chunk too large".to_string())?;
            let data = backend
                .read(offset, len32)
                .await
                .map_err(|e| format!("reading {}: {e}", file.vdisk))?;
            content.extend_from_slice(data.as_slice());
            offset += len;
        }
        std::fs::write(path, content).map_err(|e| format!("writing {}: {e}", path.display()))?;
        self.hand_back(&file.vdisk).await;
        Ok(())
    }

    /// Gives up ownership of a vdisk this node read a boot file from: the
    /// backend is fenced, then the cluster records no owner, so that the
    /// next node to start the VM reads it without waiting out a read lease.
    async fn hand_back(&self, vdisk: &str) {
        let me = self.node_id();
        let Some(record) = self.cluster().cluster().vdisk_by_name(vdisk).cloned() else {
            return;
        };
        if record.owner != Some(me) {
            return;
        }
        self.fence_backend(record.id);
        let release = Command::ReleaseVdisk {
            name: vdisk.to_string(),
            node: me,
        };
        if let Err(error) = self.cluster().propose(release).await {
            tracing::debug!(vdisk, %error, "cannot hand the vdisk back");
        }
    }

    /// Stops serving the vdisks of a VM that migrated away: its local
    /// backends are fenced, so that the destination can take them over
    /// without waiting out this node's read lease.
    fn release_vdisks(&self, disks: &[String]) {
        let state = self.cluster().cluster();
        for name in disks {
            if let Some(record) = state.vdisk_by_name(name) {
                self.fence_backend(record.id);
            }
        }
    }

    /// Reports on this node's QEMU process of VM `name` under `generation`.
    async fn report_vm(
        &self,
        name: &str,
        generation: u64,
        state: VmRunState,
        reason: String,
        powered_off: bool,
        crashed_at: Option<u64>,
    ) {
        let command = VmCommand::VmReport {
            name: name.to_string(),
            node: self.node_id(),
            generation,
            state,
            reason,
            powered_off,
            crashed_at,
        };
        if let Err(error) = self.propose_vm(command).await {
            tracing::info!(vm = %name, %error, "VM report not taken");
        }
    }

    /// Drops the write-cache choices recorded for an earlier QEMU process of
    /// `record` (one that crashed and is started afresh).
    async fn forget_write_through(&self, record: &VmRecord) {
        for vdisk in &record.write_through_disks {
            let command = VmCommand::SetDiskWriteThrough {
                name: record.spec.name.clone(),
                generation: record.generation,
                vdisk: vdisk.clone(),
                write_through: false,
            };
            if let Err(error) = self.propose_vm(command).await {
                tracing::warn!(vm = %record.spec.name, vdisk, %error, "cannot drop an old cache mode");
            }
        }
    }

    async fn accel(&self) -> Accel {
        let choice = self.config.vm.accel;
        let qemu = self.config.vm.qemu.clone();
        self.vm_supervisor
            .accel
            .get_or_init(|| async move {
                match choice {
                    AccelChoice::Kvm => (Accel::Kvm, "forced by --vm-accel kvm".to_string()),
                    AccelChoice::Tcg => (Accel::Tcg, "forced by --vm-accel tcg".to_string()),
                    AccelChoice::Auto => {
                        let probe = basalt_qemu::probe_kvm(&qemu, KVM_PROBE_TIMEOUT).await;
                        tracing::info!(kvm = probe.use_kvm, reason = %probe.reason, "probed KVM");
                        let accel = if probe.use_kvm {
                            Accel::Kvm
                        } else {
                            Accel::Tcg
                        };
                        (accel, probe.reason)
                    }
                }
            })
            .await
            .0
    }

    /// The accelerator this node's VMs run under and why, once decided.
    pub(crate) fn accel_decided(&self) -> Option<String> {
        self.vm_supervisor
            .accel
            .get()
            .map(|(accel, why)| format!("{} ({why})", accel.as_str()))
    }

    /// Starts QEMU for `record` here (waiting for a migration if `incoming`).
    async fn launch_vm(self: &Arc<Self>, record: &VmRecord, incoming: bool) -> Result<(), String> {
        let name = record.spec.name.clone();
        let run_dir = self.config.vm.run_dir.join(&name);
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
        // A migration's destination shows its guest the write-cache choices
        // the source's QEMU shows; a new process starts at write-back.
        let write_cache = if incoming {
            GuestWriteCache::starting_from(&run_dir, &record.write_through_disks)
        } else {
            self.forget_write_through(record).await;
            GuestWriteCache::starting_from(&run_dir, &BTreeSet::new())
        }
        .map_err(|e| format!("recording the disks' cache modes: {e}"))?;
        let mut sockets = Vec::new();
        for disk in &record.spec.disks {
            let export = self
                .export_vhost_for_vm(
                    disk,
                    write_cache.write_through(disk),
                    write_cache.keeper(self, &name, record.generation, disk),
                )
                .map_err(|e| format!("exporting vdisk {disk}: {e}"))?;
            sockets.push(PathBuf::from(export.socket));
        }
        let boot = match &record.spec.boot {
            VmBoot::Disk { vdisk } => BootSource::Disk(
                record
                    .spec
                    .disks
                    .iter()
                    .position(|d| d == vdisk)
                    .ok_or_else(|| format!("boot vdisk {vdisk} is not among the disks"))?,
            ),
            VmBoot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let kernel_path = run_dir.join("kernel");
                self.fetch_file(kernel, &kernel_path).await?;
                let initrd_path = match initrd {
                    Some(file) => {
                        let path = run_dir.join("initrd");
                        self.fetch_file(file, &path).await?;
                        Some(path)
                    }
                    None => None,
                };
                BootSource::Kernel {
                    kernel: kernel_path,
                    initrd: initrd_path,
                    cmdline: cmdline.clone(),
                }
            }
        };
        let incoming_uri = if incoming {
            let host = self.config.vm.migration_host.clone();
            let listener = std::net::TcpListener::bind((host.as_str(), 0))
                .map_err(|e| format!("no free port on {host} for the migration: {e}"))?;
            let port = listener
                .local_addr()
                .map_err(|e| format!("migration port: {e}"))?
                .port();
            drop(listener);
            Some(format!("tcp:{host}:{port}"))
        } else {
            None
        };
        let launch = VmLaunch {
            name: name.clone(),
            binary: self.config.vm.qemu.clone(),
            accel: self.accel().await,
            vcpus: record.spec.vcpus,
            memory_mib: record.spec.memory_mib,
            disks: sockets,
            queues_per_disk: u16::try_from(record.spec.vcpus.clamp(1, 4)).unwrap_or(1),
            boot,
            nics: record.spec.nics,
            run_dir: run_dir.clone(),
            incoming: incoming_uri.clone(),
        };
        // A new placement starts a new console log.
        if !incoming {
            let _ = std::fs::remove_file(run_dir.join("console.log"));
        }
        let mut child = launch.spawn().map_err(|e| e.to_string())?;
        let pid = child.id().ok_or("QEMU exited at once")?;
        let file = InstanceFile {
            generation: record.generation,
            pid,
            disks: record.spec.disks.clone(),
        };
        let json = serde_json::to_vec(&file).map_err(|e| e.to_string())?;
        std::fs::write(run_dir.join("instance.json"), json)
            .map_err(|e| format!("writing instance.json: {e}"))?;
        let instance = Arc::new(Instance::new(
            name.clone(),
            file,
            run_dir.clone(),
            incoming,
            false,
        ));
        {
            let instance = instance.clone();
            let log = run_dir.join("qemu.log");
            tokio::spawn(async move {
                let status = child.wait().await;
                instance.exited.store(true, Ordering::Release);
                tracing::info!(vm = %instance.name, ?status, "QEMU exited");
                if !instance.ending.load(Ordering::Acquire) {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                    tracing::warn!(vm = %instance.name, ?status, log = ?tail, "QEMU exited on its own");
                }
            });
        }
        self.vm_supervisor
            .instances
            .lock()
            .insert(name.clone(), instance.clone());
        let socket = basalt_qemu::qmp_socket(&run_dir);
        // A QEMU that exits while starting (a bad option, a file it cannot
        // open) is reported at once, not after the whole QMP timeout.
        let gone = async {
            while !instance.exited.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let connected = tokio::select! {
            connected = Qmp::connect(&socket, Duration::from_secs(20)) => {
                connected.map_err(|e| e.to_string())
            }
            () = gone => Err("it exited while starting".to_string()),
        };
        match connected {
            Ok(qmp) => *instance.qmp.lock().await = Some(qmp),
            Err(error) => {
                instance.kill().await;
                self.forget_instance(&instance);
                let log = std::fs::read_to_string(run_dir.join("qemu.log")).unwrap_or_default();
                let last = log.lines().last().unwrap_or("").to_string();
                return Err(format!("QEMU did not come up ({error}): {last}"));
            }
        }
        tracing::info!(vm = %name, pid, generation = record.generation, incoming, "QEMU started");
        tokio::spawn(monitor(Arc::downgrade(self), instance));
        if let Some(uri) = incoming_uri {
            self.propose_vm(VmCommand::MigrationReady {
                name: name.clone(),
                generation: record.generation,
                uri,
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Drops an instance that is gone, and the exports only it used.
    fn forget_instance(&self, instance: &Instance) {
        let mut instances = self.vm_supervisor.instances.lock();
        if instances
            .get(&instance.name)
            .is_some_and(|i| std::ptr::eq(Arc::as_ptr(i), instance))
        {
            instances.remove(&instance.name);
        }
        let still_used: HashSet<String> = instances
            .values()
            .flat_map(|i| i.disks.iter().cloned())
            .collect();
        drop(instances);
        // Stopping an export joins its thread (after in-flight requests).
        tokio::task::block_in_place(|| {
            for disk in &instance.disks {
                if !still_used.contains(disk) {
                    let _ = self.unexport_vhost(disk);
                }
            }
        });
        let _ = std::fs::remove_file(instance.run_dir.join("instance.json"));
    }

    /// Adopts the QEMU processes a previous basaltd left running.
    async fn adopt_vms(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(&self.config.vm.run_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let run_dir = entry.path();
            let Ok(text) = std::fs::read(run_dir.join("instance.json")) else {
                continue;
            };
            let Ok(file) = serde_json::from_slice::<InstanceFile>(&text) else {
                continue;
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            if !basalt_qemu::process_alive(file.pid, &run_dir.display().to_string()) {
                tracing::warn!(vm = %name, pid = file.pid, "QEMU exited while basaltd was down");
                let _ = std::fs::remove_file(run_dir.join("instance.json"));
                continue;
            }
            // Its vdisks first: QEMU is reconnecting to their sockets. Their
            // guest's write-cache choices come back before it does.
            let write_cache = GuestWriteCache::read_back(&run_dir);
            for disk in &file.disks {
                let keeper = write_cache.keeper(self, &name, file.generation, disk);
                let exported =
                    self.export_vhost_for_vm(disk, write_cache.write_through(disk), keeper);
                if let Err(error) = exported {
                    tracing::warn!(vm = %name, disk, %error, "cannot export an adopted VM's vdisk");
                }
            }
            tracing::info!(vm = %name, pid = file.pid, generation = file.generation, "adopted a running QEMU");
            let instance = Arc::new(Instance::new(name.clone(), file, run_dir, false, true));
            self.vm_supervisor
                .instances
                .lock()
                .insert(name, instance.clone());
            tokio::spawn(monitor(Arc::downgrade(self), instance));
        }
    }
}

/// The longest a run of the KVM probe may take (TCG takes about half a
/// second on the machines the tests run on).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long recording a guest's write-cache choice in the cluster may take
/// before the choice is refused (the guest's vCPU waits for the answer).
const WRITE_CACHE_RECORD_TIMEOUT: Duration = Duration::from_secs(10);

/// The write-cache choices of one QEMU process's guest, by vdisk (see
/// `basalt_vhost::WriteCache` for why they outlive a connection).
///
/// Kept twice: in `write-cache.json` in the VM's run directory, which a
/// restarted basaltd reads back before the process reconnects (and without
/// waiting for the cluster metadata to catch up), and in the VM's record
/// (`write_through_disks`), from which a migration's destination starts.
struct GuestWriteCache {
    path: PathBuf,
    write_through: Mutex<BTreeSet<String>>,
}

impl GuestWriteCache {
    const FILE: &'static str = "write-cache.json";

    /// The choices of a process that starts now: `write_through` (a
    /// migration's destination) or none (a new guest), recorded at once.
    fn starting_from(
        run_dir: &std::path::Path,
        write_through: &BTreeSet<String>,
    ) -> std::io::Result<Arc<GuestWriteCache>> {
        let cache = GuestWriteCache {
            path: run_dir.join(Self::FILE),
            write_through: Mutex::new(write_through.clone()),
        };
        cache.save(write_through)?;
        Ok(Arc::new(cache))
    }

    /// The choices recorded for a process that ran under an earlier basaltd.
    /// None recorded (or unreadable) means write-back everywhere, which is
    /// what a process started before this file existed shows.
    fn read_back(run_dir: &std::path::Path) -> Arc<GuestWriteCache> {
        let path = run_dir.join(Self::FILE);
        let write_through = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(path = %path.display(), %error, "unreadable; taking write-back");
                BTreeSet::new()
            }),
            Err(_) => BTreeSet::new(),
        };
        Arc::new(GuestWriteCache {
            path,
            write_through: Mutex::new(write_through),
        })
    }

    fn write_through(&self, vdisk: &str) -> bool {
        self.write_through.lock().contains(vdisk)
    }

    fn save(&self, write_through: &BTreeSet<String>) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(write_through).map_err(std::io::Error::other)?;
        basalt_meta::replace_file_durably(&self.path, &bytes)
    }

    /// Records one vdisk's choice in the file; returns the set before.
    fn set(&self, vdisk: &str, write_through: bool) -> std::io::Result<BTreeSet<String>> {
        let mut set = self.write_through.lock();
        let mut after = set.clone();
        if write_through {
            after.insert(vdisk.to_string());
        } else {
            after.remove(vdisk);
        }
        self.save(&after)?;
        Ok(std::mem::replace(&mut *set, after))
    }

    fn restore(&self, before: BTreeSet<String>) {
        let mut set = self.write_through.lock();
        if let Err(error) = self.save(&before) {
            tracing::warn!(path = %self.path.display(), %error, "cannot restore the cache modes");
        }
        *set = before;
    }

    /// The keeper the export of `vdisk` hands the guest's changes to.
    fn keeper(
        self: &Arc<Self>,
        node: &Arc<Node>,
        vm: &str,
        generation: u64,
        vdisk: &str,
    ) -> Arc<dyn basalt_vhost::WriteCacheKeeper> {
        Arc::new(DiskCacheKeeper {
            cache: self.clone(),
            node: Arc::downgrade(node),
            runtime: tokio::runtime::Handle::current(),
            vm: vm.to_string(),
            generation,
            vdisk: vdisk.to_string(),
        })
    }
}

/// Records one vdisk's write-cache choice for its VM's QEMU process: in the
/// run directory, then in the cluster. Runs on the export's connection
/// thread, which answers QEMU only afterwards.
struct DiskCacheKeeper {
    cache: Arc<GuestWriteCache>,
    node: Weak<Node>,
    runtime: tokio::runtime::Handle,
    vm: String,
    generation: u64,
    vdisk: String,
}

impl basalt_vhost::WriteCacheKeeper for DiskCacheKeeper {
    fn record(&self, write_through: bool) -> Result<(), String> {
        let node = self.node.upgrade().ok_or("basaltd is stopping")?;
        let before = self
            .cache
            .set(&self.vdisk, write_through)
            .map_err(|e| format!("writing {}: {e}", self.cache.path.display()))?;
        let command = VmCommand::SetDiskWriteThrough {
            name: self.vm.clone(),
            generation: self.generation,
            vdisk: self.vdisk.clone(),
            write_through,
        };
        // The timer must be made inside the runtime: this thread is not.
        let recorded = self.runtime.block_on(async {
            tokio::time::timeout(WRITE_CACHE_RECORD_TIMEOUT, node.propose_vm(command)).await
        });
        let refused = match recorded {
            Ok(Ok(_)) => {
                tracing::info!(vm = %self.vm, vdisk = %self.vdisk, write_through, "guest chose its disk's cache mode");
                return Ok(());
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => "the cluster did not record it in time".to_string(),
        };
        self.cache.restore(before);
        Err(format!("VM {}: {refused}", self.vm))
    }
}

/// Runs the supervisor until the node goes away.
pub(crate) async fn supervise_forever(node: Weak<Node>) {
    let Some(mut changes) = node.upgrade().map(|n| n.cluster().subscribe()) else {
        return;
    };
    let mut adopted = false;
    loop {
        let state = changes.borrow_and_update().clone();
        {
            let Some(node) = node.upgrade() else { return };
            if node.node_id() != 0 && !state.cluster_id.is_nil() {
                if !adopted {
                    node.adopt_vms().await;
                    adopted = true;
                }
                supervise(&node, &state);
            }
        }
        let _ = tokio::time::timeout(TICK, changes.changed()).await;
    }
}

/// One pass: start, stop, kill and migrate what the state asks for.
fn supervise(node: &Arc<Node>, state: &ClusterState) {
    let me = node.node_id();
    let supervisor = &node.vm_supervisor;
    let instances: HashMap<String, Arc<Instance>> = supervisor.instances.lock().clone();
    for (name, instance) in &instances {
        let Some(vm) = state.vm(name) else {
            spawn_end(node, instance.clone(), "its VM was deleted");
            continue;
        };
        let current = vm.generation == instance.generation;
        let placed_here = vm.node == Some(me) && current;
        let incoming = vm.migration.as_ref().is_some_and(|m| m.to == me) && current;
        if !(placed_here || incoming) {
            spawn_end(node, instance.clone(), "its VM runs elsewhere now");
            continue;
        }
        if placed_here && vm.desired == VmDesired::Stopped {
            spawn_stop(node, instance.clone(), vm.force_stop, vm.stop_timeout);
            continue;
        }
        if placed_here
            && let Some(migration) = &vm.migration
            && let Some(uri) = &migration.uri
            && !instance.migrating_out.swap(true, Ordering::AcqRel)
        {
            let node = node.clone();
            let instance = instance.clone();
            let uri = uri.clone();
            tokio::spawn(async move { migrate_out(node, instance, uri).await });
        }
    }
    for vm in state.vms.values() {
        let name = &vm.spec.name;
        if instances.contains_key(name) {
            continue;
        }
        let placed_here = vm.node == Some(me)
            && vm.desired == VmDesired::Running
            && vm.state != VmRunState::Failed
            && vm.migration.is_none();
        let incoming = vm
            .migration
            .as_ref()
            .is_some_and(|m| m.to == me && m.uri.is_none());
        let stopped_without_process = vm.node == Some(me)
            && vm.desired == VmDesired::Stopped
            && vm.state != VmRunState::Stopped;
        if stopped_without_process && supervisor.claim(name) {
            // Nothing runs here any more (it crashed, or was never started).
            let node = node.clone();
            let (name, generation) = (name.clone(), vm.generation);
            tokio::spawn(async move {
                let reason = "stopped by the operator (no QEMU process was running)";
                node.report_vm(
                    &name,
                    generation,
                    VmRunState::Stopped,
                    reason.into(),
                    false,
                    None,
                )
                .await;
                node.vm_supervisor.release(&name);
            });
            continue;
        }
        if !(placed_here || incoming) || !supervisor.claim(name) {
            continue;
        }
        let node = node.clone();
        let record = vm.clone();
        tokio::spawn(async move {
            let name = record.spec.name.clone();
            if let Err(why) = node.launch_vm(&record, incoming).await {
                tracing::error!(vm = %name, %why, "cannot start QEMU");
                if incoming {
                    let _ = node
                        .propose_vm(VmCommand::EndMigration {
                            name: name.clone(),
                            generation: record.generation,
                            completed: false,
                            reason: why,
                            downtime_ms: 0,
                            total_ms: 0,
                        })
                        .await;
                } else {
                    let reason = format!("cannot start QEMU: {why}");
                    node.report_vm(
                        &name,
                        record.generation,
                        VmRunState::Failed,
                        reason,
                        false,
                        None,
                    )
                    .await;
                }
            }
            node.vm_supervisor.release(&name);
        });
    }
}

/// Kills `instance` in the background (once).
fn spawn_end(node: &Arc<Node>, instance: Arc<Instance>, why: &'static str) {
    if !node.vm_supervisor.claim(&instance.name) {
        return;
    }
    let node = node.clone();
    tokio::spawn(async move {
        tracing::info!(vm = %instance.name, pid = instance.pid, why, "ending QEMU");
        instance.kill().await;
        node.forget_instance(&instance);
        node.vm_supervisor.release(&instance.name);
    });
}

/// Stops `instance` as the operator asked: ACPI power-off, forced after
/// `timeout` seconds (at once with `force`); then reports it stopped.
fn spawn_stop(node: &Arc<Node>, instance: Arc<Instance>, force: bool, timeout: u64) {
    if !node.vm_supervisor.claim(&instance.name) {
        return;
    }
    let node = node.clone();
    tokio::spawn(async move {
        instance.ending.store(true, Ordering::Release);
        let mut how = "forced";
        if !force {
            // The whole graceful part is bounded by the timeout, QMP
            // included: a hung QEMU does not answer at all.
            let powered_off = async {
                let _ = instance.qmp_execute("system_powerdown", None).await;
                while instance.alive() {
                    if instance.status().await.is_ok_and(|s| s == "shutdown") {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                false
            };
            if tokio::time::timeout(Duration::from_secs(timeout), powered_off)
                .await
                .unwrap_or(false)
            {
                how = "powered off";
            } else {
                instance.forget_qmp();
                tracing::info!(vm = %instance.name, timeout, "the guest did not power off in time; forcing");
            }
        }
        instance.kill().await;
        node.forget_instance(&instance);
        node.report_vm(
            &instance.name,
            instance.generation,
            VmRunState::Stopped,
            format!("stopped by the operator ({how})"),
            false,
            None,
        )
        .await;
        node.vm_supervisor.release(&instance.name);
    });
}

/// Watches one QEMU process until it ends.
async fn monitor(node: Weak<Node>, instance: Arc<Instance>) {
    let mut last_answer = Instant::now();
    // The VM's reason before a hang was reported, given back once QEMU
    // answers again (a report with an empty reason keeps the last one).
    let mut reason_before_hang: Option<String> = None;
    loop {
        tokio::time::sleep(TICK).await;
        let Some(node) = node.upgrade() else { return };
        if instance.ending.load(Ordering::Acquire) {
            // A stop or kill task owns it now.
            return;
        }
        if !instance.alive() {
            crashed(&node, &instance, "QEMU exited").await;
            return;
        }
        let status = match instance.status().await {
            Ok(status) => status,
            Err(error) => {
                tracing::debug!(vm = %instance.name, %error, "QMP");
                let silent = last_answer.elapsed();
                if silent >= HUNG_AFTER && reason_before_hang.is_none() && instance.reportable() {
                    tracing::warn!(vm = %instance.name, silent_s = silent.as_secs(), %error, "QEMU's monitor does not answer");
                    let before = node
                        .cluster()
                        .cluster()
                        .vm(&instance.name)
                        .map(|vm| vm.reason.clone())
                        .unwrap_or_default();
                    node.report_vm(
                        &instance.name,
                        instance.generation,
                        VmRunState::Running,
                        format!(
                            "QEMU's monitor has not answered for {} s; the process may be hung",
                            silent.as_secs()
                        ),
                        false,
                        None,
                    )
                    .await;
                    reason_before_hang = Some(before);
                }
                continue;
            }
        };
        last_answer = Instant::now();
        if let Some(before) = reason_before_hang.take()
            && instance.reportable()
        {
            tracing::info!(vm = %instance.name, "QEMU's monitor answers again");
            let reason = if before.is_empty() {
                "QEMU's monitor answers again".to_string()
            } else {
                before
            };
            node.report_vm(
                &instance.name,
                instance.generation,
                VmRunState::Running,
                reason,
                false,
                None,
            )
            .await;
        }
        match status.as_str() {
            "shutdown" => {
                // The guest powered itself off (QEMU runs with -no-shutdown).
                if !node.vm_supervisor.claim(&instance.name) {
                    continue;
                }
                instance.kill().await;
                node.forget_instance(&instance);
                node.report_vm(
                    &instance.name,
                    instance.generation,
                    VmRunState::Stopped,
                    "the guest powered off".into(),
                    true,
                    None,
                )
                .await;
                node.vm_supervisor.release(&instance.name);
                return;
            }
            "paused" if instance.incoming.load(Ordering::Acquire) => {
                // A guest migrated while paused: resume it once this node
                // is recorded as its node.
                let record = node.cluster().cluster().vm(&instance.name).cloned();
                let switched = record.as_ref().is_some_and(|vm| {
                    vm.node == Some(node.node_id())
                        && vm.generation == instance.generation
                        && vm.migration.is_none()
                });
                if switched {
                    match instance.qmp_execute("cont", None).await {
                        Ok(_) => {
                            instance.incoming.store(false, Ordering::Release);
                            tracing::info!(vm = %instance.name, "resumed the migrated guest");
                        }
                        Err(error) => {
                            tracing::warn!(vm = %instance.name, %error, "cannot resume the migrated guest")
                        }
                    }
                }
            }
            "internal-error" | "guest-panicked" => {
                instance.kill().await;
                crashed(
                    &node,
                    &instance,
                    &format!("QEMU stopped the guest ({status})"),
                )
                .await;
                return;
            }
            "running" if !instance.reported_running.load(Ordering::Acquire) => {
                instance.incoming.store(false, Ordering::Release);
                let record = node.cluster().cluster().vm(&instance.name).cloned();
                let ours = record.as_ref().is_some_and(|vm| {
                    vm.node == Some(node.node_id()) && vm.generation == instance.generation
                });
                if ours {
                    node.report_vm(
                        &instance.name,
                        instance.generation,
                        VmRunState::Running,
                        String::new(),
                        false,
                        None,
                    )
                    .await;
                    instance.reported_running.store(true, Ordering::Release);
                }
            }
            _ => {}
        }
    }
}

/// A QEMU process died without being asked to: restart it (the supervisor
/// does, seeing no process), or give up after too many crashes.
///
/// Holds the VM's claim throughout: once the instance is forgotten the
/// supervisor would start a new QEMU at once, and that launch must not find
/// the old exports still up (it would reuse a socket the tear-down is about
/// to remove) nor run before the crash is counted and reported.
async fn crashed(node: &Arc<Node>, instance: &Instance, what: &str) {
    // Another task may hold the claim: a stop or kill (which tears this
    // instance down itself), or the start that launched it, still
    // recording a migration's readiness. Wait for it.
    while !node.vm_supervisor.claim(&instance.name) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registered = node
        .vm_supervisor
        .instances
        .lock()
        .get(&instance.name)
        .is_some_and(|i| std::ptr::eq(Arc::as_ptr(i), instance));
    if !registered {
        // Torn down by whoever held the claim.
        node.vm_supervisor.release(&instance.name);
        return;
    }
    node.forget_instance(instance);
    // Counted in the cluster: a restarted basaltd, or the node a fail-over
    // moves the VM to, goes on counting.
    let now = unix_now();
    let earlier = node
        .cluster()
        .cluster()
        .vm(&instance.name)
        .map_or(0, |vm| vm.crashes_since(now, CRASH_WINDOW.as_secs()));
    let crashes = earlier + 1;
    tracing::warn!(vm = %instance.name, crashes, what, "QEMU crashed");
    let (state, reason) = if crashes >= MAX_CRASHES {
        (
            VmRunState::Failed,
            format!("{what}; {crashes} crashes within 10 minutes, not restarting"),
        )
    } else {
        (
            VmRunState::Starting,
            format!("{what} unexpectedly; restarting (crash {crashes})"),
        )
    };
    node.report_vm(
        &instance.name,
        instance.generation,
        state,
        reason,
        false,
        Some(now),
    )
    .await;
    node.vm_supervisor.release(&instance.name);
}

/// Drives the live migration of `instance` to the QEMU waiting at `uri`.
async fn migrate_out(node: Arc<Node>, instance: Arc<Instance>, uri: String) {
    let name = instance.name.clone();
    let started = Instant::now();
    let outcome = run_migration(&node, &instance, &uri).await;
    let command = match outcome {
        Ok((downtime_ms, total_ms)) => {
            tracing::info!(vm = %name, downtime_ms, total_ms, "live migration completed");
            // The guest is paused here for good: stop serving its vdisks
            // before the destination takes them.
            node.release_vdisks(&instance.disks);
            VmCommand::EndMigration {
                name: name.clone(),
                generation: instance.generation,
                completed: true,
                reason: String::new(),
                downtime_ms,
                total_ms,
            }
        }
        Err(why) => {
            tracing::warn!(vm = %name, %why, "live migration failed");
            // The source keeps running the guest.
            if instance
                .status()
                .await
                .is_ok_and(|s| s == "postmigrate" || s == "paused")
            {
                let _ = instance.qmp_execute("cont", None).await;
            }
            VmCommand::EndMigration {
                name: name.clone(),
                generation: instance.generation,
                completed: false,
                reason: why,
                downtime_ms: 0,
                total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            }
        }
    };
    if let Err(error) = node.propose_vm(command).await {
        tracing::warn!(vm = %name, %error, "cannot record the end of the migration");
    }
    instance.migrating_out.store(false, Ordering::Release);
}

async fn run_migration(node: &Node, instance: &Instance, uri: &str) -> Result<(u64, u64), String> {
    let name = &instance.name;
    let _ = instance
        .qmp_execute(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": 4u64 << 30, "downtime-limit": 300 })),
        )
        .await;
    // QEMU 7.2 under TCG corrupts the memory of guests with shared RAM (which
    // vhost-user needs) in about one live migration in five; paused, never
    // (docs/vms.md). Under TCG the guest is paused for the whole migration,
    // and resumed by the destination.
    let paused_at = if node.accel().await == Accel::Tcg {
        instance
            .qmp_execute("stop", None)
            .await
            .map_err(|e| format!("cannot pause the guest: {e}"))?;
        Some(Instant::now())
    } else {
        None
    };
    instance
        .qmp_execute("migrate", Some(serde_json::json!({ "uri": uri })))
        .await
        .map_err(|e| e.to_string())?;
    let mut last_report = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let info = instance
            .qmp_execute("query-migrate", None)
            .await
            .map_err(|e| e.to_string())?;
        let status = info.get("status").and_then(|s| s.as_str()).unwrap_or("");
        let number = |path: &[&str]| {
            path.iter()
                .try_fold(&info, |v, key| v.get(key))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        match status {
            "completed" => {
                let downtime = match paused_at {
                    // Paused from the start: the guest stood still all along.
                    Some(at) => u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
                    None => number(&["downtime"]),
                };
                return Ok((downtime, number(&["total-time"])));
            }
            "failed" | "cancelled" => {
                let why = info
                    .get("error-desc")
                    .and_then(|s| s.as_str())
                    .unwrap_or(status);
                return Err(format!("QEMU: {why}"));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = instance.qmp_execute("migrate_cancel", None).await;
            return Err("the migration did not complete within 10 minutes".into());
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let _ = node
                .propose_vm(VmCommand::MigrationProgress {
                    name: name.clone(),
                    generation: instance.generation,
                    transferred: number(&["ram", "transferred"]),
                    total: number(&["ram", "total"]),
                })
                .await;
        }
    }
}

/// Whether this node must not take `vdisk` over yet: a VM using it is
/// migrating here and has not switched over (the source still serves it).
pub(crate) fn migration_pending(state: &ClusterState, me: NodeId, vdisk: &str) -> bool {
    state
        .vms
        .values()
        .any(|vm| vm.migration.as_ref().is_some_and(|m| m.to == me) && vm.uses(vdisk))
}

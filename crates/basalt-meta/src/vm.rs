//! Virtual machines in the cluster metadata.
//!
//! A VM's definition, where it should run and what its node last reported
//! all live in the replicated [`ClusterState`], so any node can start it,
//! answer for it, or restart it after its node died. Scheduling happens *in*
//! [`ClusterState::apply`]: the node a `StartVm` lands on is chosen against
//! the state the command is applied to, so two starts racing for the last
//! free memory cannot both win.
//!
//! Every placement (start, fail-over) raises the VM's `generation`. A node
//! runs a QEMU process for (name, generation) and its reports carry the
//! generation: a report from a process of an older placement, or from a node
//! the VM has left, is refused and changes nothing.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::state::{
    ClusterState, CommandResult, NodeId, NodeState, Refused, conflict, invalid, not_found,
};

/// Whether the operator wants the VM running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmDesired {
    /// Keep it running (restart it after a crash or a dead node).
    Running,
    /// Keep it stopped.
    Stopped,
}

/// What the VM's node last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    /// No QEMU process.
    Stopped,
    /// Placed on a node that has not reported its QEMU running yet.
    Starting,
    /// QEMU runs the guest.
    Running,
    /// It cannot run: QEMU keeps crashing or no node can take it.
    Failed,
}

/// A file (kernel, initrd) stored in the cluster as the first `length`
/// bytes of a vdisk, so that any node can start the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// The vdisk holding it.
    pub vdisk: String,
    /// Its length in bytes.
    pub length: u64,
}

/// How the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VmBoot {
    /// From a vdisk, through QEMU's firmware (BIOS).
    Disk {
        /// The boot vdisk (one of the VM's disks).
        vdisk: String,
    },
    /// Direct kernel boot.
    Kernel {
        /// The kernel image.
        kernel: StoredFile,
        /// The initial ramdisk, if any.
        initrd: Option<StoredFile>,
        /// The kernel command line.
        cmdline: String,
    },
}

/// What an operator defines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name, unique in the cluster.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Vdisks, in the order the guest sees them.
    pub disks: Vec<String>,
    /// Boot source.
    pub boot: VmBoot,
    /// NICs with user-mode networking.
    #[serde(default)]
    pub nics: u32,
    /// Vdisks holding the boot files that belong to this VM (deleted with it).
    #[serde(default)]
    pub owned_vdisks: Vec<String>,
}

/// A live migration under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMigration {
    /// The node the VM leaves.
    pub from: NodeId,
    /// The node it moves to.
    pub to: NodeId,
    /// Where the destination's QEMU listens, once it does.
    pub uri: Option<String>,
    /// Guest memory bytes sent so far.
    pub transferred: u64,
    /// Guest memory bytes in all.
    pub total: u64,
    /// Unix seconds when it was asked for.
    pub started: u64,
}

/// A VM as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Its definition.
    pub spec: VmSpec,
    /// Creation time, unix seconds.
    pub created: u64,
    /// What the operator wants.
    pub desired: VmDesired,
    /// What its node last reported.
    pub state: VmRunState,
    /// The node it runs on (or ran on last).
    pub node: Option<NodeId>,
    /// Raised at every placement; QEMU processes and reports carry it.
    pub generation: u64,
    /// Why it is where and how it is, for people.
    pub reason: String,
    /// Stop without asking the guest (`vm stop --force`).
    pub force_stop: bool,
    /// Seconds a graceful stop waits for the guest before it is forced.
    pub stop_timeout: u64,
    /// A live migration under way.
    pub migration: Option<VmMigration>,
    /// The last completed migration's downtime and total time, in ms.
    #[serde(default)]
    pub last_migration_ms: Option<(u64, u64)>,
    /// The VM's vdisks whose guest chose write-through (virtio-blk's
    /// `writeback` config field) in its current QEMU process. QEMU shows
    /// the guest that choice until the process ends, so the vdisk's export
    /// must honour it across a restarted basaltd and on a migration's
    /// destination; a new placement (start, fail-over) starts over.
    #[serde(default)]
    pub write_through_disks: BTreeSet<String>,
    /// Unix seconds of the VM's QEMU crashes since the operator last
    /// started it (the last [`KEPT_CRASHES`]), kept here so that a
    /// restarted basaltd, or another node after a fail-over, counts them
    /// too.
    #[serde(default)]
    pub crashes: Vec<u64>,
}

/// How many crash times a VM's record keeps.
pub const KEPT_CRASHES: usize = 16;

impl VmRecord {
    /// Whether `vdisk` is one of the VM's disks.
    pub fn uses(&self, vdisk: &str) -> bool {
        self.spec.disks.iter().any(|d| d == vdisk)
    }

    /// Crashes within the `window` seconds before `now`.
    pub fn crashes_since(&self, now: u64, window: u64) -> usize {
        self.crashes
            .iter()
            .filter(|at| now.saturating_sub(**at) < window)
            .count()
    }
}

/// VM capacity a node offers (its CPUs and memory times the overcommit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    /// Virtual CPUs it takes.
    pub vcpus: u64,
    /// Memory in MiB it takes.
    pub memory_mib: u64,
}

/// Smallest guest memory, MiB.
pub const MIN_VM_MEMORY_MIB: u64 = 16;
/// Most virtual CPUs of one VM.
pub const MAX_VM_VCPUS: u32 = 64;
/// Most disks of one VM.
pub const MAX_VM_DISKS: usize = 16;

impl ClusterState {
    /// The VM called `name`.
    pub fn vm(&self, name: &str) -> Option<&VmRecord> {
        self.vms.get(name)
    }

    /// A VM that has `vdisk` among its disks (running or not).
    pub fn vm_using(&self, vdisk: &str) -> Option<&VmRecord> {
        self.vms.values().find(|vm| vm.uses(vdisk))
    }

    fn vm_ref(&self, name: &str) -> Result<&VmRecord, Refused> {
        self.vms
            .get(name)
            .ok_or_else(|| not_found(format!("no VM named {name}")))
    }

    fn vm_mut(&mut self, name: &str) -> Result<&mut VmRecord, Refused> {
        self.vms
            .get_mut(name)
            .ok_or_else(|| not_found(format!("no VM named {name}")))
    }

    /// vCPUs and MiB taken on `node` by VMs placed there that should run,
    /// and by migrations coming in; `except` is left out.
    pub fn vm_usage(&self, node: NodeId, except: Option<&str>) -> (u64, u64) {
        self.vms
            .values()
            .filter(|vm| Some(vm.spec.name.as_str()) != except)
            .filter(|vm| {
                let placed = vm.node == Some(node)
                    && vm.desired == VmDesired::Running
                    && vm.state != VmRunState::Failed;
                let incoming = vm.migration.as_ref().is_some_and(|m| m.to == node);
                placed || incoming
            })
            .fold((0, 0), |(cpus, mem), vm| {
                (cpus + u64::from(vm.spec.vcpus), mem + vm.spec.memory_mib)
            })
    }

    /// Whether `node` is up and has room for `spec` (besides VM `except`).
    fn check_room(&self, node: NodeId, spec: &VmSpec) -> Result<(), String> {
        if !self.is_up(node) {
            return Err(format!("node {node} is not up"));
        }
        let Some(offer) = self.node_resources.get(&node) else {
            return Err(format!("node {node} has not reported its VM capacity yet"));
        };
        let (cpus, mem) = self.vm_usage(node, Some(&spec.name));
        let free_cpus = offer.vcpus.saturating_sub(cpus);
        let free_mem = offer.memory_mib.saturating_sub(mem);
        if u64::from(spec.vcpus) > free_cpus {
            return Err(format!(
                "node {node} has {free_cpus} free vCPUs, VM {} needs {}",
                spec.name, spec.vcpus
            ));
        }
        if spec.memory_mib > free_mem {
            return Err(format!(
                "node {node} has {free_mem} MiB of free VM memory, VM {} needs {} MiB",
                spec.name, spec.memory_mib
            ));
        }
        Ok(())
    }

    /// The up node (not in `exclude`) with room for `spec` and the most free
    /// memory; lowest id on ties. The error says why none fits.
    pub fn schedule_vm(&self, spec: &VmSpec, exclude: &[NodeId]) -> Result<NodeId, String> {
        let mut best: Option<(u64, NodeId)> = None;
        let mut why = Vec::new();
        for node in self.nodes.values().filter(|n| !exclude.contains(&n.id)) {
            match self.check_room(node.id, spec) {
                Ok(()) => {
                    let offer = self
                        .node_resources
                        .get(&node.id)
                        .map_or(0, |r| r.memory_mib);
                    let free = offer.saturating_sub(self.vm_usage(node.id, Some(&spec.name)).1);
                    if best.is_none_or(|(f, _)| free > f) {
                        best = Some((free, node.id));
                    }
                }
                Err(reason) => why.push(reason),
            }
        }
        best.map(|(_, node)| node).ok_or_else(|| {
            if why.is_empty() {
                format!("no node can run VM {}", spec.name)
            } else {
                format!("no node can run VM {}: {}", spec.name, why.join("; "))
            }
        })
    }

    /// The running VM (other than `except`) that has `vdisk` attached.
    fn vdisk_attached_elsewhere(&self, vdisk: &str, except: &str) -> Option<&VmRecord> {
        self.vms.values().find(|vm| {
            vm.spec.name != except
                && (vm.desired == VmDesired::Running || vm.state != VmRunState::Stopped)
                && vm.uses(vdisk)
        })
    }

    /// Checks a new VM against this state (what `CreateVm` would refuse);
    /// without `with_boot_files`, the kernel and initrd are not looked at
    /// (they may not be uploaded yet).
    pub fn check_new_vm(&self, spec: &VmSpec, with_boot_files: bool) -> Result<(), Refused> {
        validate_vm_name(&spec.name)?;
        if self.vms.contains_key(&spec.name) {
            return Err((
                crate::state::Refusal::Exists,
                format!("a VM named {} exists", spec.name),
            ));
        }
        if spec.vcpus == 0 || spec.vcpus > MAX_VM_VCPUS {
            return Err(invalid(format!(
                "a VM has 1 to {MAX_VM_VCPUS} vCPUs, not {}",
                spec.vcpus
            )));
        }
        if spec.memory_mib < MIN_VM_MEMORY_MIB {
            return Err(invalid(format!(
                "a VM needs at least {MIN_VM_MEMORY_MIB} MiB of memory, not {} MiB",
                spec.memory_mib
            )));
        }
        let largest = self
            .node_resources
            .values()
            .map(|r| r.memory_mib)
            .max()
            .unwrap_or(0);
        if spec.memory_mib > largest {
            return Err(invalid(format!(
                "VM {} asks for {} MiB of memory; the largest node offers {largest} MiB to VMs",
                spec.name, spec.memory_mib
            )));
        }
        if spec.disks.len() > MAX_VM_DISKS {
            return Err(invalid(format!("a VM has at most {MAX_VM_DISKS} disks")));
        }
        if spec.nics > 8 {
            return Err(invalid("a VM has at most 8 NICs"));
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            if spec.disks[..i].contains(disk) {
                return Err(invalid(format!("vdisk {disk} is given twice")));
            }
            if self.vdisk_by_name(disk).is_none() {
                return Err(not_found(format!("no vdisk named {disk}")));
            }
            if let Some(other) = self.vdisk_attached_elsewhere(disk, &spec.name) {
                return Err(conflict(format!(
                    "vdisk {disk} is attached to VM {}, which is running",
                    other.spec.name
                )));
            }
        }
        match &spec.boot {
            VmBoot::Disk { vdisk } => {
                if !spec.disks.contains(vdisk) {
                    return Err(invalid(format!(
                        "the boot vdisk {vdisk} must be one of the VM's disks"
                    )));
                }
            }
            VmBoot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                if cmdline.len() > 4096 {
                    return Err(invalid("the kernel command line is longer than 4096 bytes"));
                }
                if !with_boot_files {
                    return Ok(());
                }
                for file in std::iter::once(kernel).chain(initrd) {
                    let Some(vdisk) = self.vdisk_by_name(&file.vdisk) else {
                        return Err(not_found(format!("no vdisk named {}", file.vdisk)));
                    };
                    if file.length == 0 || file.length > vdisk.size {
                        return Err(invalid(format!(
                            "vdisk {} cannot hold a file of {} bytes",
                            file.vdisk, file.length
                        )));
                    }
                    if spec.disks.contains(&file.vdisk) {
                        return Err(invalid(format!(
                            "vdisk {} holds a boot file; it cannot also be a disk",
                            file.vdisk
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies a VM command (called by [`ClusterState::apply`]).
    pub(crate) fn apply_vm(&mut self, command: &VmCommand) -> Result<CommandResult, Refused> {
        match command {
            VmCommand::SetNodeResources {
                node,
                vcpus,
                memory_mib,
            } => {
                if !self.nodes.contains_key(node) {
                    return Err(not_found(format!("no node {node}")));
                }
                self.node_resources.insert(
                    *node,
                    NodeResources {
                        vcpus: *vcpus,
                        memory_mib: *memory_mib,
                    },
                );
                Ok(CommandResult::Done)
            }
            VmCommand::CreateVm { spec, created } => {
                self.check_new_vm(spec, true)?;
                self.vms.insert(
                    spec.name.clone(),
                    VmRecord {
                        spec: spec.clone(),
                        created: *created,
                        desired: VmDesired::Stopped,
                        state: VmRunState::Stopped,
                        node: None,
                        generation: 0,
                        reason: "created".into(),
                        force_stop: false,
                        stop_timeout: 0,
                        migration: None,
                        last_migration_ms: None,
                        write_through_disks: BTreeSet::new(),
                        crashes: Vec::new(),
                    },
                );
                Ok(CommandResult::Done)
            }
            VmCommand::DeleteVm { name } => {
                let vm = self.vm_mut(name)?;
                if vm.desired != VmDesired::Stopped || vm.state != VmRunState::Stopped {
                    return Err(conflict(format!("VM {name} is not stopped; stop it first")));
                }
                self.vms.remove(name);
                Ok(CommandResult::Done)
            }
            VmCommand::StartVm { name, reason } => {
                let vm = self.vm_ref(name)?;
                if vm.desired == VmDesired::Running && vm.state != VmRunState::Failed {
                    // Already running or starting: nothing to do.
                    return Ok(CommandResult::Id(vm.node.unwrap_or(0)));
                }
                if vm.state != VmRunState::Stopped && vm.state != VmRunState::Failed {
                    return Err(conflict(format!("VM {name} is still stopping")));
                }
                let spec = vm.spec.clone();
                for disk in &spec.disks {
                    if self.vdisk_by_name(disk).is_none() {
                        return Err(not_found(format!(
                            "VM {name} needs vdisk {disk}, which does not exist"
                        )));
                    }
                    if let Some(other) = self.vdisk_attached_elsewhere(disk, name) {
                        return Err(conflict(format!(
                            "vdisk {disk} is attached to VM {}, which is running",
                            other.spec.name
                        )));
                    }
                }
                let node = self.schedule_vm(&spec, &[]).map_err(conflict)?;
                let vm = self.vm_mut(name)?;
                vm.desired = VmDesired::Running;
                vm.state = VmRunState::Starting;
                vm.node = Some(node);
                vm.generation += 1;
                vm.force_stop = false;
                vm.write_through_disks.clear();
                vm.crashes.clear();
                vm.reason = format!("{reason}; placed on node {node}");
                Ok(CommandResult::Id(node))
            }
            VmCommand::StopVm {
                name,
                force,
                timeout,
            } => {
                let vm = self.vm_mut(name)?;
                if vm.migration.is_some() {
                    return Err(conflict(format!(
                        "VM {name} is migrating; stop it when the migration ends"
                    )));
                }
                vm.desired = VmDesired::Stopped;
                vm.force_stop |= *force;
                vm.stop_timeout = *timeout;
                if vm.state == VmRunState::Failed {
                    vm.state = VmRunState::Stopped;
                }
                vm.reason = if *force {
                    "stop forced by the operator".into()
                } else {
                    "stop asked by the operator".into()
                };
                Ok(CommandResult::Done)
            }
            VmCommand::VmReport {
                name,
                node,
                generation,
                state,
                reason,
                powered_off,
                crashed_at,
            } => {
                let vm = self.vm_mut(name)?;
                if vm.node != Some(*node) || vm.generation != *generation {
                    return Err(conflict(format!(
                        "VM {name} no longer runs on node {node} under generation {generation}"
                    )));
                }
                if let Some(at) = crashed_at {
                    vm.crashes.push(*at);
                    let extra = vm.crashes.len().saturating_sub(KEPT_CRASHES);
                    vm.crashes.drain(..extra);
                }
                vm.state = *state;
                // An empty reason keeps the one that says how it got here
                // (started, restarted after a node died, migrated).
                if !reason.is_empty() {
                    vm.reason = reason.clone();
                }
                if *powered_off || *state == VmRunState::Stopped {
                    vm.desired = VmDesired::Stopped;
                    vm.migration = None;
                }
                Ok(CommandResult::Done)
            }
            VmCommand::BeginMigration { name, to, started } => {
                let vm = self.vm_ref(name)?;
                if !self.nodes.contains_key(to) {
                    return Err(not_found(format!("no node {to}")));
                }
                if vm.desired != VmDesired::Running || vm.state != VmRunState::Running {
                    return Err(conflict(format!("VM {name} is not running")));
                }
                let Some(from) = vm.node else {
                    return Err(conflict(format!("VM {name} is not placed")));
                };
                if from == *to {
                    return Err(invalid(format!("VM {name} already runs on node {to}")));
                }
                if vm.migration.is_some() {
                    return Err(conflict(format!("VM {name} is already migrating")));
                }
                let spec = vm.spec.clone();
                self.check_room(*to, &spec).map_err(conflict)?;
                let vm = self.vm_mut(name)?;
                vm.migration = Some(VmMigration {
                    from,
                    to: *to,
                    uri: None,
                    transferred: 0,
                    total: 0,
                    started: *started,
                });
                vm.reason = format!("migrating from node {from} to node {to}");
                Ok(CommandResult::Done)
            }
            VmCommand::MigrationReady {
                name,
                generation,
                uri,
            } => {
                let vm = self.vm_mut(name)?;
                let current = vm.generation == *generation;
                match vm.migration.as_mut() {
                    Some(migration) if current && migration.uri.is_none() => {
                        migration.uri = Some(uri.clone());
                        Ok(CommandResult::Done)
                    }
                    _ => Err(conflict(format!(
                        "VM {name} is not waiting for a migration"
                    ))),
                }
            }
            VmCommand::MigrationProgress {
                name,
                generation,
                transferred,
                total,
            } => {
                let vm = self.vm_mut(name)?;
                let current = vm.generation == *generation;
                match vm.migration.as_mut() {
                    Some(migration) if current => {
                        migration.transferred = *transferred;
                        migration.total = *total;
                        Ok(CommandResult::Done)
                    }
                    _ => Err(conflict(format!("VM {name} is not migrating"))),
                }
            }
            VmCommand::EndMigration {
                name,
                generation,
                completed,
                reason,
                downtime_ms,
                total_ms,
            } => {
                let vm = self.vm_ref(name)?;
                let Some(migration) = vm.migration.clone() else {
                    return Err(conflict(format!("VM {name} is not migrating")));
                };
                if vm.generation != *generation {
                    return Err(conflict(format!(
                        "VM {name} was placed anew during the migration"
                    )));
                }
                if *completed {
                    // The source stopped serving the VM's vdisks before it
                    // asked for this: the destination takes them without
                    // waiting out a read lease.
                    let disks = vm.spec.disks.clone();
                    for vdisk in self.vdisks.values_mut() {
                        if disks.contains(&vdisk.name) && vdisk.owner == Some(migration.from) {
                            vdisk.owner = None;
                            vdisk.previous_owner = None;
                        }
                    }
                }
                let vm = self.vm_mut(name)?;
                vm.migration = None;
                if *completed {
                    vm.node = Some(migration.to);
                    vm.state = VmRunState::Running;
                    vm.last_migration_ms = Some((*downtime_ms, *total_ms));
                    vm.reason = format!(
                        "migrated from node {} to node {} ({downtime_ms} ms downtime, {total_ms} ms in all)",
                        migration.from, migration.to
                    );
                } else {
                    vm.reason = format!(
                        "migration to node {} failed: {reason}; still on node {}",
                        migration.to, migration.from
                    );
                }
                Ok(CommandResult::Done)
            }
            VmCommand::SetDiskWriteThrough {
                name,
                generation,
                vdisk,
                write_through,
            } => {
                let vm = self.vm_mut(name)?;
                if vm.generation != *generation {
                    return Err(conflict(format!(
                        "VM {name} was placed anew (generation {} is not {generation})",
                        vm.generation
                    )));
                }
                if !vm.spec.disks.contains(vdisk) {
                    return Err(not_found(format!("VM {name} has no disk {vdisk}")));
                }
                if vm.migration.is_some() {
                    // The destination's QEMU may have read its config space
                    // already: it would not see the change.
                    return Err(conflict(format!(
                        "VM {name} is migrating; its disks' cache modes cannot change"
                    )));
                }
                if *write_through {
                    vm.write_through_disks.insert(vdisk.clone());
                } else {
                    vm.write_through_disks.remove(vdisk);
                }
                Ok(CommandResult::Done)
            }
            VmCommand::FailOverVm { name, dead } => {
                let vm = self.vm_ref(name)?;
                if vm.node != Some(*dead) || vm.desired != VmDesired::Running {
                    return Err(conflict(format!("VM {name} does not run on node {dead}")));
                }
                if self
                    .nodes
                    .get(dead)
                    .is_some_and(|n| n.state == NodeState::Up)
                {
                    return Err(conflict(format!("node {dead} is up")));
                }
                let spec = vm.spec.clone();
                let placed = self.schedule_vm(&spec, &[*dead]);
                let vm = self.vm_mut(name)?;
                vm.migration = None;
                match placed {
                    Ok(node) => {
                        vm.node = Some(node);
                        vm.generation += 1;
                        vm.write_through_disks.clear();
                        vm.state = VmRunState::Starting;
                        vm.reason = format!(
                            "node {dead} died; restarted on node {node} (high availability)"
                        );
                        Ok(CommandResult::Id(node))
                    }
                    Err(why) => {
                        vm.state = VmRunState::Failed;
                        vm.reason = format!("node {dead} died and {why}");
                        Ok(CommandResult::Done)
                    }
                }
            }
        }
    }
}

/// Changes to VMs (variants of [`crate::Command`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "vm_op")]
pub enum VmCommand {
    /// A node tells what VM capacity it offers.
    SetNodeResources {
        /// Which node.
        node: NodeId,
        /// vCPUs it takes.
        vcpus: u64,
        /// MiB of memory it takes.
        memory_mib: u64,
    },
    /// Defines a VM (stopped).
    CreateVm {
        /// The definition.
        spec: VmSpec,
        /// Unix seconds.
        created: u64,
    },
    /// Removes a stopped VM.
    DeleteVm {
        /// Name.
        name: String,
    },
    /// Wants the VM running, placed on the up node with the most free
    /// memory that has room for it; answers the node's id.
    StartVm {
        /// Name.
        name: String,
        /// Why, for people.
        reason: String,
    },
    /// Wants the VM stopped.
    StopVm {
        /// Name.
        name: String,
        /// Without asking the guest.
        force: bool,
        /// Seconds to wait for the guest before forcing.
        timeout: u64,
    },
    /// The VM's node reports on its QEMU process.
    VmReport {
        /// Name.
        name: String,
        /// The reporting node.
        node: NodeId,
        /// The placement the process belongs to.
        generation: u64,
        /// Its state.
        state: VmRunState,
        /// Why, for people (empty: keep the current one).
        reason: String,
        /// The guest powered itself off: it stays stopped.
        powered_off: bool,
        /// The process crashed at this unix second (counted in `crashes`).
        #[serde(default)]
        crashed_at: Option<u64>,
    },
    /// Starts a live migration to `to`.
    BeginMigration {
        /// Name.
        name: String,
        /// Destination node.
        to: NodeId,
        /// Unix seconds.
        started: u64,
    },
    /// The destination's QEMU waits for the migration stream at `uri`.
    MigrationReady {
        /// Name.
        name: String,
        /// The VM's generation.
        generation: u64,
        /// `tcp:HOST:PORT`.
        uri: String,
    },
    /// How far the migration has come.
    MigrationProgress {
        /// Name.
        name: String,
        /// The VM's generation.
        generation: u64,
        /// Bytes sent.
        transferred: u64,
        /// Bytes in all.
        total: u64,
    },
    /// The migration ended; on success the VM runs on the destination.
    EndMigration {
        /// Name.
        name: String,
        /// The VM's generation.
        generation: u64,
        /// Whether the destination runs the VM now.
        completed: bool,
        /// Why it failed, if it did.
        reason: String,
        /// Time the guest was paused, ms.
        downtime_ms: u64,
        /// Time the migration took, ms.
        total_ms: u64,
    },
    /// The guest of the VM's current QEMU process chose write-through
    /// (`true`) or write-back for one of its vdisks.
    SetDiskWriteThrough {
        /// Name.
        name: String,
        /// The placement the QEMU process belongs to.
        generation: u64,
        /// One of the VM's vdisks.
        vdisk: String,
        /// Write-through (`true`) or write-back.
        write_through: bool,
    },
    /// The leader restarts a VM of the down node `dead` elsewhere.
    FailOverVm {
        /// Name.
        name: String,
        /// The down node.
        dead: NodeId,
    },
}

fn validate_vm_name(name: &str) -> Result<(), Refused> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid VM name {name:?}: use 1-64 letters, digits, '-' or '_', not starting with '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::state::{Command, NodeRecord, Refusal};
    use uuid::Uuid;

    /// A cluster of `nodes` up members offering 8 vCPUs and 1 GiB each,
    /// with vdisks `a` and `b`, and kernel `k`.
    fn cluster(nodes: u64) -> ClusterState {
        let mut state = ClusterState::default();
        let ok = |r: CommandResult| assert!(!matches!(r, CommandResult::Refused { .. }), "{r:?}");
        ok(state.apply(&Command::Bootstrap {
            cluster_id: Uuid::new_v4(),
        }));
        for id in 1..=nodes {
            ok(state.apply(&Command::AddNode {
                node: NodeRecord {
                    id,
                    uuid: Uuid::new_v4(),
                    listen: format!("127.0.0.1:{}", 7000 + id),
                    api: String::new(),
                    nbd: String::new(),
                    joined: 0,
                    state: NodeState::Up,
                },
            }));
            ok(state.apply(&vm_command(VmCommand::SetNodeResources {
                node: id,
                vcpus: 8,
                memory_mib: 1024,
            })));
        }
        for name in ["a", "b", "k"] {
            ok(state.apply(&Command::CreateVdisk {
                name: name.into(),
                size: 16 << 20,
                rf: 1,
                created: 0,
                preferred: None,
            }));
        }
        state
    }

    fn vm_command(command: VmCommand) -> Command {
        Command::Vm { command }
    }

    fn spec(name: &str, disks: &[&str], memory_mib: u64) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus: 2,
            memory_mib,
            disks: disks.iter().map(|d| d.to_string()).collect(),
            boot: VmBoot::Kernel {
                kernel: StoredFile {
                    vdisk: "k".into(),
                    length: 1000,
                },
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
            nics: 0,
            owned_vdisks: Vec::new(),
        }
    }

    fn create(state: &mut ClusterState, spec: VmSpec) -> CommandResult {
        state.apply(&vm_command(VmCommand::CreateVm { spec, created: 0 }))
    }

    fn start(state: &mut ClusterState, name: &str) -> CommandResult {
        state.apply(&vm_command(VmCommand::StartVm {
            name: name.into(),
            reason: "test".into(),
        }))
    }

    fn refused(result: &CommandResult) -> (Refusal, String) {
        match result {
            CommandResult::Refused { kind, reason } => (*kind, reason.clone()),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn report(
        state: &mut ClusterState,
        name: &str,
        node: NodeId,
        generation: u64,
        run: VmRunState,
        off: bool,
    ) -> CommandResult {
        state.apply(&vm_command(VmCommand::VmReport {
            name: name.into(),
            node,
            generation,
            state: run,
            reason: String::new(),
            powered_off: off,
            crashed_at: None,
        }))
    }

    #[test]
    fn starts_go_to_the_node_with_the_most_free_memory_until_none_has_room() {
        let mut state = cluster(2);
        create(&mut state, spec("one", &["a"], 768));
        create(&mut state, spec("two", &["b"], 512));
        create(&mut state, spec("three", &[], 600));
        assert_eq!(start(&mut state, "one"), CommandResult::Id(1));
        // Node 1 has 256 MiB left, node 2 all of it; then 512 MiB.
        assert_eq!(start(&mut state, "two"), CommandResult::Id(2));
        let (kind, reason) = refused(&start(&mut state, "three"));
        assert_eq!(kind, Refusal::Conflict);
        assert!(reason.contains("no node can run VM three"), "{reason}");
        assert!(reason.contains("node 1 has 256 MiB"), "{reason}");
        assert_eq!(state.vm("three").unwrap().desired, VmDesired::Stopped);
        // Starting a running VM again changes nothing.
        let generation = state.vm("one").unwrap().generation;
        assert_eq!(start(&mut state, "one"), CommandResult::Id(1));
        assert_eq!(state.vm("one").unwrap().generation, generation);
    }

    #[test]
    fn bad_definitions_are_refused_with_reasons() {
        let mut state = cluster(1);
        let cases = [
            (
                spec("x", &["nope"], 256),
                Refusal::NotFound,
                "no vdisk named nope",
            ),
            (spec("x", &["a", "a"], 256), Refusal::Invalid, "given twice"),
            (
                spec("x", &["a"], 4096),
                Refusal::Invalid,
                "largest node offers 1024 MiB",
            ),
            (spec("x", &["a"], 8), Refusal::Invalid, "at least 16 MiB"),
            (
                spec("bad name", &["a"], 256),
                Refusal::Invalid,
                "invalid VM name",
            ),
            (
                spec("x", &["k"], 256),
                Refusal::Invalid,
                "holds a boot file",
            ),
        ];
        for (spec, kind, needle) in cases {
            let (got, reason) = refused(&create(&mut state, spec));
            assert_eq!(got, kind, "{reason}");
            assert!(reason.contains(needle), "{reason} lacks {needle}");
        }
        let mut no_kernel = spec("x", &["a"], 256);
        no_kernel.boot = VmBoot::Kernel {
            kernel: StoredFile {
                vdisk: "k".into(),
                length: 32 << 20,
            },
            initrd: None,
            cmdline: String::new(),
        };
        let (_, reason) = refused(&create(&mut state, no_kernel));
        assert!(reason.contains("cannot hold a file"), "{reason}");
        assert!(state.vms.is_empty());
    }

    #[test]
    fn a_vdisk_serves_one_running_vm_and_outlives_none() {
        let mut state = cluster(2);
        create(&mut state, spec("one", &["a"], 256));
        create(&mut state, spec("two", &["a"], 256));
        start(&mut state, "one");
        let (kind, reason) = refused(&start(&mut state, "two"));
        assert_eq!(kind, Refusal::Conflict);
        assert!(reason.contains("vdisk a is attached to VM one"), "{reason}");
        let (kind, _) = refused(&create(&mut state, spec("three", &["a"], 256)));
        assert_eq!(kind, Refusal::Conflict);
        let (_, reason) = refused(&state.apply(&Command::DeleteVdisk { name: "a".into() }));
        assert!(reason.contains("used by VM"), "{reason}");
        let (_, reason) = refused(&state.apply(&Command::DeleteVdisk { name: "k".into() }));
        assert!(reason.contains("used by VM"), "{reason}");
    }

    #[test]
    fn reports_of_old_placements_or_other_nodes_change_nothing() {
        let mut state = cluster(2);
        create(&mut state, spec("vm", &["a"], 256));
        start(&mut state, "vm");
        let generation = state.vm("vm").unwrap().generation;
        refused(&report(
            &mut state,
            "vm",
            2,
            generation,
            VmRunState::Running,
            false,
        ));
        refused(&report(
            &mut state,
            "vm",
            1,
            generation + 1,
            VmRunState::Running,
            false,
        ));
        assert_eq!(state.vm("vm").unwrap().state, VmRunState::Starting);
        report(&mut state, "vm", 1, generation, VmRunState::Running, false);
        let vm = state.vm("vm").unwrap();
        assert_eq!(vm.state, VmRunState::Running);
        assert!(vm.reason.contains("placed on node 1"), "{}", vm.reason);
        // The guest powers off: stopped, and it stays so.
        report(&mut state, "vm", 1, generation, VmRunState::Stopped, true);
        let vm = state.vm("vm").unwrap();
        assert_eq!(
            (vm.desired, vm.state),
            (VmDesired::Stopped, VmRunState::Stopped)
        );
        state.apply(&vm_command(VmCommand::DeleteVm { name: "vm".into() }));
        assert!(state.vm("vm").is_none());
    }

    #[test]
    fn a_completed_migration_moves_the_vm_and_frees_its_vdisks_for_the_destination() {
        let mut state = cluster(3);
        create(&mut state, spec("vm", &["a"], 256));
        start(&mut state, "vm");
        let generation = state.vm("vm").unwrap().generation;
        let migrate = |to| {
            vm_command(VmCommand::BeginMigration {
                name: "vm".into(),
                to,
                started: 0,
            })
        };
        let (kind, _) = refused(&state.apply(&migrate(2)));
        assert_eq!(kind, Refusal::Conflict, "not running yet");
        report(&mut state, "vm", 1, generation, VmRunState::Running, false);
        assert_eq!(refused(&state.apply(&migrate(1))).0, Refusal::Invalid);
        assert_eq!(refused(&state.apply(&migrate(9))).0, Refusal::NotFound);
        state.apply(&Command::AcquireVdisk {
            name: "a".into(),
            node: 1,
        });
        assert_eq!(state.apply(&migrate(2)), CommandResult::Done);
        assert_eq!(refused(&state.apply(&migrate(3))).0, Refusal::Conflict);
        // The destination's memory is taken while the migration runs.
        assert_eq!(state.vm_usage(2, None), (2, 256));
        let end = |completed| {
            vm_command(VmCommand::EndMigration {
                name: "vm".into(),
                generation,
                completed,
                reason: "test".into(),
                downtime_ms: 5,
                total_ms: 900,
            })
        };
        assert_eq!(state.apply(&end(true)), CommandResult::Done);
        let vm = state.vm("vm").unwrap();
        assert_eq!(vm.node, Some(2));
        assert_eq!(vm.last_migration_ms, Some((5, 900)));
        let vdisk = state.vdisk_by_name("a").unwrap();
        assert_eq!((vdisk.owner, vdisk.previous_owner), (None, None));
        // A failed one leaves the VM where it was.
        state.apply(&migrate(3));
        state.apply(&end(false));
        let vm = state.vm("vm").unwrap();
        assert_eq!((vm.node, vm.migration.is_none()), (Some(2), true));
        assert!(vm.reason.contains("failed"), "{}", vm.reason);
    }

    #[test]
    fn vms_of_a_down_node_restart_elsewhere_or_fail_for_lack_of_room() {
        let mut state = cluster(2);
        create(&mut state, spec("vm", &["a"], 768));
        create(&mut state, spec("big", &["b"], 768));
        start(&mut state, "vm");
        let failover = |name: &str| {
            vm_command(VmCommand::FailOverVm {
                name: name.into(),
                dead: 1,
            })
        };
        assert_eq!(refused(&state.apply(&failover("vm"))).0, Refusal::Conflict);
        state.apply(&Command::SetNodeState {
            node: 1,
            state: NodeState::Down,
        });
        let generation = state.vm("vm").unwrap().generation;
        assert_eq!(state.apply(&failover("vm")), CommandResult::Id(2));
        let vm = state.vm("vm").unwrap();
        assert_eq!((vm.node, vm.generation), (Some(2), generation + 1));
        assert!(vm.reason.contains("node 1 died"), "{}", vm.reason);
        // Node 1 comes back; `big` runs there, then node 1 dies again:
        // node 2 has no room left for it.
        state.apply(&Command::SetNodeState {
            node: 1,
            state: NodeState::Up,
        });
        assert_eq!(start(&mut state, "big"), CommandResult::Id(1));
        state.apply(&Command::SetNodeState {
            node: 1,
            state: NodeState::Down,
        });
        assert_eq!(state.apply(&failover("big")), CommandResult::Done);
        let big = state.vm("big").unwrap();
        assert_eq!(big.state, VmRunState::Failed);
        assert!(big.reason.contains("free VM memory"), "{}", big.reason);
    }

    #[test]
    fn a_guests_write_through_choice_lasts_for_its_qemu_process_and_a_new_placement_drops_it() {
        let mut state = cluster(2);
        create(&mut state, spec("vm", &["a", "b"], 256));
        start(&mut state, "vm");
        let generation = state.vm("vm").unwrap().generation;
        let choose = |generation, vdisk: &str, write_through| {
            vm_command(VmCommand::SetDiskWriteThrough {
                name: "vm".into(),
                generation,
                vdisk: vdisk.into(),
                write_through,
            })
        };
        let disks = |state: &ClusterState| -> Vec<String> {
            let vm = state.vm("vm").unwrap();
            vm.write_through_disks.iter().cloned().collect()
        };
        assert_eq!(
            state.apply(&choose(generation, "b", true)),
            CommandResult::Done
        );
        state.apply(&choose(generation, "a", true));
        state.apply(&choose(generation, "a", true));
        assert_eq!(disks(&state), ["a", "b"]);
        state.apply(&choose(generation, "b", false));
        assert_eq!(disks(&state), ["a"]);
        // Bad input changes nothing.
        assert_eq!(
            refused(&state.apply(&choose(generation, "k", true))).0,
            Refusal::NotFound
        );
        assert_eq!(
            refused(&state.apply(&choose(generation + 1, "b", true))).0,
            Refusal::Conflict
        );
        assert_eq!(disks(&state), ["a"]);
        // Not while migrating: the destination's QEMU may have read its
        // config space already. A migration keeps the choice.
        report(&mut state, "vm", 1, generation, VmRunState::Running, false);
        state.apply(&vm_command(VmCommand::BeginMigration {
            name: "vm".into(),
            to: 2,
            started: 0,
        }));
        assert_eq!(
            refused(&state.apply(&choose(generation, "b", true))).0,
            Refusal::Conflict
        );
        state.apply(&vm_command(VmCommand::EndMigration {
            name: "vm".into(),
            generation,
            completed: true,
            reason: String::new(),
            downtime_ms: 1,
            total_ms: 2,
        }));
        assert_eq!(disks(&state), ["a"]);
        // A fail-over boots the guest afresh: write-back again.
        state.apply(&Command::SetNodeState {
            node: 2,
            state: NodeState::Down,
        });
        state.apply(&vm_command(VmCommand::FailOverVm {
            name: "vm".into(),
            dead: 2,
        }));
        assert!(disks(&state).is_empty());
        // So does a new start.
        let generation = state.vm("vm").unwrap().generation;
        state.apply(&choose(generation, "a", true));
        state.apply(&vm_command(VmCommand::StopVm {
            name: "vm".into(),
            force: true,
            timeout: 0,
        }));
        report(&mut state, "vm", 1, generation, VmRunState::Stopped, false);
        assert_eq!(disks(&state), ["a"]);
        start(&mut state, "vm");
        assert!(disks(&state).is_empty());
    }

    #[test]
    fn crashes_are_counted_in_the_record_until_the_operator_starts_the_vm_again() {
        let mut state = cluster(1);
        create(&mut state, spec("vm", &["a"], 256));
        start(&mut state, "vm");
        let generation = state.vm("vm").unwrap().generation;
        let crash = |state: &mut ClusterState, at: u64, generation: u64| {
            state.apply(&vm_command(VmCommand::VmReport {
                name: "vm".into(),
                node: 1,
                generation,
                state: VmRunState::Starting,
                reason: "crashed".into(),
                powered_off: false,
                crashed_at: Some(at),
            }))
        };
        for at in 0..20 {
            assert_eq!(
                crash(&mut state, 1000 + at, generation),
                CommandResult::Done
            );
        }
        let vm = state.vm("vm").unwrap();
        assert_eq!(vm.crashes.len(), KEPT_CRASHES);
        assert_eq!(vm.crashes.last(), Some(&1019));
        assert_eq!(vm.crashes_since(1019, 5), 5);
        assert_eq!(vm.crashes_since(5000, 600), 0);
        // A stale report counts nothing.
        assert!(matches!(
            crash(&mut state, 2000, generation + 7),
            CommandResult::Refused { .. }
        ));
        assert_eq!(state.vm("vm").unwrap().crashes.last(), Some(&1019));
        // The operator's next start gives the VM a fresh budget.
        state.apply(&vm_command(VmCommand::StopVm {
            name: "vm".into(),
            force: true,
            timeout: 0,
        }));
        report(&mut state, "vm", 1, generation, VmRunState::Stopped, false);
        start(&mut state, "vm");
        assert!(state.vm("vm").unwrap().crashes.is_empty());
    }

    #[test]
    fn commands_round_trip_through_json() {
        let command = vm_command(VmCommand::CreateVm {
            spec: spec("vm", &["a"], 256),
            created: 7,
        });
        let text = serde_json::to_string(&command).unwrap();
        assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), command);
    }
}

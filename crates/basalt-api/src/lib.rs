//! The REST API's wire types, shared by the daemon (which serves them) and the
//! CLI (which reads them). Every type derives an OpenAPI schema, so the
//! document at `/api/openapi.json` is generated from the same definitions the
//! code uses and cannot drift from them.
//!
//! Sizes are integers in bytes; times are unix seconds.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The API version prefix.
pub const API_PREFIX: &str = "/api/v1";

/// An error answer: one line for a person to read.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong and, where it helps, what to do.
    pub error: String,
}

/// Answer of `GET /api/v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: String,
}

/// I/O counters of the node since it started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct IoCounters {
    /// Read requests served by the store.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests served by the store.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes served.
    pub flushes: u64,
    /// Blocks that failed their checksum (each one an I/O error to a client).
    pub checksum_errors: u64,
    /// Bytes copied into this node's replicas by resyncs.
    pub resync_copied_bytes: u64,
    /// Oplog batches written.
    pub log_batches: u64,
    /// Drain cycles completed.
    pub drains: u64,
}

/// Answer of `GET /api/v1/status`: the node at a glance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct NodeStatus {
    /// Identity of this node.
    pub node_id: String,
    /// Software version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
    /// `healthy`, or `degraded` when a disk failed or is missing.
    pub health: String,
    /// Data directory.
    pub data_dir: String,
    /// Where the NBD server listens.
    pub nbd_address: String,
    /// Where vhost-user sockets are created.
    pub vhost_dir: String,
    /// Disks in use (failed and missing included).
    pub disks: u64,
    /// Bytes of vdisk data the disks can hold.
    pub capacity: u64,
    /// Bytes allocated to vdisks.
    pub allocated: u64,
    /// Number of vdisks.
    pub vdisks: u64,
    /// Counters since start.
    pub io: IoCounters,
    /// What this node's VMs run under: `kvm` or `tcg`, and why (with
    /// `--vm-accel auto`, the probe's times); null until the first VM start
    /// on the node has decided it.
    pub vm_accelerator: Option<String>,
}

/// A disk owned by the node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Disk {
    /// Disk id (also in its on-disk label).
    pub id: String,
    /// Path of the file or block device.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `online`, `failed` or `missing`.
    pub state: String,
    /// Why the disk failed, if it did.
    pub error: Option<String>,
    /// Engine in use (`io_uring+O_DIRECT`, `pread/pwrite`).
    pub engine: String,
    /// Extent slots in total (1 MiB of vdisk data each).
    pub slots_total: u64,
    /// Extent slots free.
    pub slots_free: u64,
    /// Oplog size in bytes.
    pub log_bytes: u64,
    /// Oplog bytes in use.
    pub log_used: u64,
}

/// A virtual disk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Vdisk {
    /// Name (also the NBD export name).
    pub name: String,
    /// Numeric id.
    pub id: u64,
    /// Size in bytes.
    pub size: u64,
    /// Bytes of disk space allocated to it.
    pub allocated: u64,
    /// Replication factor: how many nodes hold a full copy.
    pub rf: u32,
    /// `healthy` when `rf` in-sync replicas sit on live nodes, `degraded`
    /// when fewer do, `unavailable` when none does.
    pub state: String,
    /// Creation time, unix seconds.
    pub created: u64,
    /// NBD URI for clients.
    pub nbd_uri: String,
    /// vhost-user socket, when exported that way.
    pub vhost_socket: Option<String>,
    /// Ownership epoch (raised each time a node takes the vdisk over).
    pub epoch: u64,
    /// The node serving it under `epoch`, if any has.
    pub owner: Option<u64>,
    /// Where its copies are.
    pub replicas: Vec<VdiskReplica>,
    /// While a rebalance moves a replica: the node giving its copy up (it
    /// goes once the new, stale copy is in sync).
    pub moving_from: Option<u64>,
    /// The resync of a stale copy on the answering node, while one runs.
    pub resync: Option<ResyncProgress>,
}

/// How far the resync of a replica has come.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ResyncProgress {
    /// The node whose copy is being resynced.
    pub node: u64,
    /// Bytes of the vdisk compared so far.
    pub done_bytes: u64,
    /// Size of the vdisk.
    pub total_bytes: u64,
    /// Bytes fetched because they differed.
    pub copied_bytes: u64,
}

/// One copy of a vdisk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VdiskReplica {
    /// The node holding it.
    pub node: u64,
    /// `in_sync`, `stale` when it missed writes, or `lost` when its node
    /// reported it unreadable (failed or missing disk; it is being replaced).
    pub state: String,
    /// Whether that node is up.
    pub node_up: bool,
}

/// Body of `POST /api/v1/vdisks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVdisk {
    /// Name: 1 to 64 letters, digits, `-`, `_`, `.`; starting with a letter or digit.
    pub name: String,
    /// Size in bytes (a multiple of 4096).
    pub size: u64,
    /// Replication factor, 1 to 3 [default: 2 on clusters of two or more
    /// nodes, else 1].
    #[serde(default)]
    pub rf: Option<u32>,
    /// Clone this vdisk (an imported image): its data is copied. `size` may
    /// be 0 (the source's size) or larger than the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// Body of `POST /api/v1/vdisks/{name}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResizeVdisk {
    /// New size in bytes (not smaller than the current one).
    pub size: u64,
}

/// Answer of `POST /api/v1/vdisks/{name}/vhost`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VhostExport {
    /// Vdisk name.
    pub name: String,
    /// Unix socket QEMU connects to (`-chardev socket,path=...`).
    pub socket: String,
}

/// A member of the cluster, as `GET /api/v1/cluster` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ClusterNode {
    /// Node id in the cluster (assigned when it joined).
    pub id: u64,
    /// The node's own identity (its disks' labels carry it).
    pub uuid: String,
    /// Node-to-node address (`--listen`).
    pub address: String,
    /// REST API address.
    pub api: String,
    /// NBD address.
    pub nbd: String,
    /// `up`, or `down` once silent past `--dead-after` (decided by the cluster).
    pub state: String,
    /// Whether the answering node heard from it in the last few seconds.
    pub reachable: bool,
    /// Raft role: `voter` or `learner`.
    pub role: String,
    /// Whether it is the Raft leader.
    pub leader: bool,
}

/// Answer of `GET /api/v1/cluster`: the cluster as the answering node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The cluster's identity.
    pub cluster_id: String,
    /// The answering node's id.
    pub node_id: u64,
    /// The Raft leader's id, if one is known.
    pub leader: Option<u64>,
    /// Every member.
    pub nodes: Vec<ClusterNode>,
    /// Vdisks that are not `healthy` (degraded, rebuilding, unavailable),
    /// with resync progress where one runs.
    pub unhealthy_vdisks: Vec<Vdisk>,
}

/// A file stored in the cluster (kernel, initrd): the first `length` bytes
/// of a vdisk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredFile {
    /// The vdisk holding it (uploaded with `PUT /api/v1/vdisks/{name}/content`).
    pub vdisk: String,
    /// Its length in bytes.
    pub length: u64,
}

/// Body of `POST /api/v1/vms`. Exactly one boot source: `boot_disk`, or
/// `kernel` (with `initrd` and `cmdline`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Name: 1 to 64 letters, digits, `-`, `_`.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in bytes (a multiple of 1 MiB).
    pub memory: u64,
    /// Vdisks, in the order the guest sees them (the first is its first
    /// virtio disk).
    #[serde(default)]
    pub disks: Vec<String>,
    /// Boot from this vdisk (one of `disks`) through the firmware.
    #[serde(default)]
    pub boot_disk: Option<String>,
    /// Direct kernel boot: the kernel.
    #[serde(default)]
    pub kernel: Option<StoredFile>,
    /// Direct kernel boot: the initrd.
    #[serde(default)]
    pub initrd: Option<StoredFile>,
    /// Direct kernel boot: the command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// NICs with user-mode networking.
    #[serde(default)]
    pub nics: u32,
    /// Vdisks that belong to the VM (its uploaded boot files): deleted with it.
    #[serde(default)]
    pub owned_vdisks: Vec<String>,
    /// Only check the request against the cluster; change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Body of `POST /api/v1/vms/{name}/stop`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct StopVm {
    /// Stop at once, without asking the guest to power off.
    #[serde(default)]
    pub force: bool,
    /// Seconds to wait for the guest to power off before forcing [default 30].
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// Body of `POST /api/v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// Destination node id.
    pub to: u64,
}

/// A live migration under way.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VmMigration {
    /// Source node.
    pub from: u64,
    /// Destination node.
    pub to: u64,
    /// Guest memory bytes sent so far.
    pub transferred: u64,
    /// Guest memory bytes in all (0 until known).
    pub total: u64,
}

/// A VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Vm {
    /// Name.
    pub name: String,
    /// `running`, `stopped`, `starting`, `stopping`, `migrating` or `failed`.
    pub state: String,
    /// What the operator wants: `running` or `stopped`.
    pub desired: String,
    /// The node it runs on (or last ran on), as `cluster status` lists it.
    pub node: Option<u64>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Vdisks, in guest order.
    pub disks: Vec<String>,
    /// Boot source, for people (`disk NAME` or `kernel NAME`).
    pub boot: String,
    /// Kernel command line (direct kernel boot).
    pub cmdline: Option<String>,
    /// NICs (user-mode networking).
    pub nics: u32,
    /// Why it is where and how it is.
    pub reason: String,
    /// Placement generation (raised at every start and fail-over).
    pub generation: u64,
    /// A live migration under way.
    pub migration: Option<VmMigration>,
    /// The last migration's downtime, ms.
    pub last_migration_downtime_ms: Option<u64>,
    /// The last migration's total time, ms.
    pub last_migration_total_ms: Option<u64>,
    /// Vdisks whose guest chose write-through (its driver's cache mode):
    /// each of their writes is durable before the guest hears of it.
    #[serde(default)]
    pub write_through_disks: Vec<String>,
    /// QEMU crashes within the last 10 minutes (three make it `failed`);
    /// the operator's next start clears them.
    #[serde(default)]
    pub recent_crashes: u64,
    /// Creation time, unix seconds.
    pub created: u64,
}

/// A piece of a VM's serial console (`GET /api/v1/vms/{name}/console`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ConsoleChunk {
    /// The node whose console log this is.
    pub node: u64,
    /// Byte offset of `data` in the log.
    pub offset: u64,
    /// The next offset to ask for.
    pub next: u64,
    /// Console output (lossy UTF-8).
    pub data: String,
}

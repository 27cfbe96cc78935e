//! The node service: what the API does, independent of HTTP.
//!
//! Handlers in [`crate::api`] only translate between HTTP and these methods,
//! so every operation can be tested (and later driven by the cluster layer)
//! without a web server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use basalt_api::{ClusterNode, ClusterStatus, Disk, IoCounters, NodeStatus, Vdisk, VhostExport};
use basalt_meta::{
    ClusterState, Command, CommandResult, MetaNode, NodeState, Refusal, ReplicaState, VdiskRecord,
};
use basalt_net::Transport;
use basalt_replica::{ReplicaGate, ReplicaService, ReplicatedVdisk, SERVICE_REPLICA};
use basalt_store::{Store, StoreError};
use basalt_vdisk::VdiskRegistry;
use basalt_vhost::{ExportStats, VhostBlkExport, VhostBlkOptions, WriteCache, WriteCacheKeeper};
use parking_lot::Mutex;

use crate::ControlError;
use crate::cluster::{
    ClusterExports, LocalCopies, NodeCoordinator, reconcile_forever, wait_applied,
};

/// Fixed facts about the node, for status answers.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Host and port the NBD server listens on (for URIs).
    pub nbd_address: String,
    /// Directory of vhost-user sockets.
    pub vhost_dir: PathBuf,
    /// Serve the fault-injection endpoints (tests only).
    pub fault_injection: bool,
    /// How long a local copy may stay unreadable (failed or missing disk)
    /// before it is reported lost and rebuilt elsewhere.
    pub dead_after: std::time::Duration,
    /// How this node runs VMs.
    pub vm: crate::vms::VmConfig,
}

/// One node's services.
pub struct Node {
    store: Store,
    registry: VdiskRegistry,
    pub(crate) config: NodeConfig,
    runtime: tokio::runtime::Handle,
    exports: Mutex<HashMap<String, VhostBlkExport>>,
    started: Instant,
    cluster: MetaNode,
    transport: Transport,
    gate: Arc<ReplicaGate>,
    /// Owner writes to local copies under resync.
    /// Resyncs running on this node, by vdisk.
    pub(crate) resync_progress: Mutex<HashMap<u64, crate::resync::Progress>>,
    /// Bytes copied by resyncs since the node started.
    pub(crate) resync_copied: std::sync::atomic::AtomicU64,
    /// The vdisks this node serves as owner, by id.
    backends: Mutex<HashMap<u64, Arc<ReplicatedVdisk>>>,
    /// The QEMU processes of this node's VMs.
    pub(crate) vm_supervisor: crate::vms::Supervisor,
    me: std::sync::Weak<Node>,
}

impl Node {
    /// A node over an open store. Must be called inside a tokio runtime.
    ///
    /// Registers the replica service on `transport` and starts the
    /// reconciler that keeps the local store in line with the cluster.
    pub fn new(
        store: Store,
        config: NodeConfig,
        cluster: MetaNode,
        transport: Transport,
    ) -> Result<Arc<Node>, ControlError> {
        std::fs::create_dir_all(&config.vhost_dir).map_err(|source| ControlError::Io {
            path: config.vhost_dir.clone(),
            source,
        })?;
        let registry = VdiskRegistry::new(store.clone());
        let gate = Arc::new(ReplicaGate::new());
        transport.register(
            SERVICE_REPLICA,
            Arc::new(ReplicaService::new(
                Arc::new(LocalCopies {
                    registry: registry.clone(),
                }),
                gate.clone(),
            )),
            false,
        );
        let node = Arc::new_cyclic(|me| Node {
            registry,
            store,
            config,
            runtime: tokio::runtime::Handle::current(),
            exports: Mutex::new(HashMap::new()),
            started: Instant::now(),
            cluster,
            transport,
            gate,
            resync_progress: Mutex::new(HashMap::new()),
            resync_copied: std::sync::atomic::AtomicU64::new(0),
            backends: Mutex::new(HashMap::new()),
            vm_supervisor: crate::vms::Supervisor::default(),
            me: me.clone(),
        });
        node.transport.register(
            crate::cluster::SERVICE_CONTROL,
            Arc::new(crate::cluster::ControlService {
                node: Arc::downgrade(&node),
            }),
            false,
        );
        tokio::spawn(reconcile_forever(Arc::downgrade(&node)));
        tokio::spawn(crate::resync::resync_forever(Arc::downgrade(&node)));
        tokio::spawn(crate::cluster::watch_local_copies(Arc::downgrade(&node)));
        tokio::spawn(crate::vms::supervise_forever(Arc::downgrade(&node)));
        tokio::spawn(crate::hand_exports::restore_forever(Arc::downgrade(&node)));
        Ok(node)
    }

    /// This node's id in the cluster (0 before it has one).
    pub fn node_id(&self) -> u64 {
        self.cluster.membership().map_or(0, |m| m.node_id)
    }

    /// The node-to-node transport.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// What every access to this node's replicas passes: epochs, dirty
    /// notes, resync records.
    pub fn gate(&self) -> &Arc<ReplicaGate> {
        &self.gate
    }

    /// The exports frontends see: every vdisk of the cluster.
    pub fn exports(&self) -> ClusterExports {
        ClusterExports {
            node: self.me.clone(),
        }
    }

    /// The backend serving `name` from this node (which takes ownership on
    /// its first request), shared by every client of this node.
    pub fn backend(&self, name: &str) -> Option<Arc<ReplicatedVdisk>> {
        let state = self.cluster.cluster();
        let record = state.vdisk_by_name(name)?;
        let mut backends = self.backends.lock();
        if let Some(backend) = backends.get(&record.id)
            && !backend.is_fenced()
        {
            return Some(backend.clone());
        }
        let backend = Arc::new(ReplicatedVdisk::new(
            record.id,
            record.name.clone(),
            record.size,
            self.transport.clone(),
            Arc::new(NodeCoordinator {
                node: self.me.clone(),
            }),
            self.gate.clone(),
        ));
        backends.insert(record.id, backend.clone());
        Some(backend)
    }

    /// Follows a vdisk's record: size, and loss of ownership.
    pub(crate) fn follow(&self, record: &VdiskRecord) {
        let me = self.node_id();
        let mut backends = self.backends.lock();
        if let Some(backend) = backends.get(&record.id) {
            backend.set_size(record.size);
            let superseded = backend
                .epoch()
                .is_some_and(|epoch| record.epoch > epoch && record.owner != Some(me));
            if superseded {
                backend.fence();
                backends.remove(&record.id);
            }
        }
    }

    /// Points this node's backend of `vdisk` (if it owns it) at the replicas
    /// the cluster places now, and returns once every later write reaches
    /// them (the resync barrier).
    ///
    /// With `after_acquisition`, an acquisition under way is waited for
    /// first: it computed its replica set before it fenced and waited out
    /// the previous owner's lease, so a resync barrier must not pass until
    /// that set is brought up to date. (The reconciler does not wait: an
    /// acquisition may be waiting for it to create the local copy.)
    pub(crate) async fn refresh_backend(&self, vdisk: u64, after_acquisition: bool) {
        let backend = self.backends.lock().get(&vdisk).cloned();
        let Some(backend) = backend else { return };
        if after_acquisition {
            backend.wait_for_acquisition().await;
        }
        let Some(epoch) = backend.epoch() else { return };
        let state = self.cluster.cluster();
        let current = state.vdisks.get(&vdisk).is_some_and(|v| v.epoch == epoch);
        if !current {
            return;
        }
        match crate::cluster::replica_set(self, &state, vdisk, epoch).await {
            Ok(set) => backend.refresh(set).await,
            Err(error) => tracing::warn!(vdisk, %error, "cannot refresh the replica set"),
        }
    }

    /// Fault injection: cut this node off from `nodes` (empty heals).
    pub fn set_partition(&self, nodes: Vec<u64>) -> Result<(), ControlError> {
        if !self.config.fault_injection {
            return Err(ControlError::NotFound(
                "fault injection is off (basaltd --fault-injection, for tests only)".into(),
            ));
        }
        self.transport.set_partition(nodes);
        Ok(())
    }

    /// Fences this node's backend of vdisk `id` (if any) and drops it: it
    /// serves nothing more; the next client gets a backend that acquires
    /// the vdisk anew.
    pub(crate) fn fence_backend(&self, id: u64) {
        if let Some(backend) = self.backends.lock().remove(&id) {
            backend.fence();
        }
    }

    /// Drops the backend of a vdisk (deleted or moved away).
    pub(crate) fn forget_backend(&self, id: u64) {
        if let Some(backend) = self.backends.lock().remove(&id) {
            backend.fence();
        }
    }

    /// Drops backends of vdisks the cluster no longer has.
    pub(crate) fn forget_deleted_backends(&self, state: &ClusterState) {
        let mut backends = self.backends.lock();
        backends.retain(|id, backend| {
            let keep = state.vdisks.contains_key(id);
            if !keep {
                backend.fence();
            }
            keep
        });
    }

    /// This node's part of the cluster metadata group.
    pub fn cluster(&self) -> &MetaNode {
        &self.cluster
    }

    /// The cluster as this node sees it.
    pub fn cluster_status(&self) -> Result<ClusterStatus, ControlError> {
        let membership = self
            .cluster
            .membership()
            .ok_or_else(|| ControlError::Internal("this node has not joined a cluster".into()))?;
        let state = self.cluster.cluster();
        let leader = self.cluster.leader();
        let voters = self.cluster.voters();
        let nodes = state
            .nodes
            .values()
            .map(|n| ClusterNode {
                id: n.id,
                uuid: n.uuid.to_string(),
                address: n.listen.clone(),
                api: n.api.clone(),
                nbd: n.nbd.clone(),
                state: match n.state {
                    NodeState::Up => "up",
                    NodeState::Down => "down",
                }
                .to_string(),
                reachable: self.cluster.reachable(n.id),
                role: if voters.contains(&n.id) {
                    "voter"
                } else {
                    "learner"
                }
                .to_string(),
                leader: leader == Some(n.id),
            })
            .collect();
        Ok(ClusterStatus {
            cluster_id: membership.cluster_id.to_string(),
            node_id: membership.node_id,
            leader,
            nodes,
            unhealthy_vdisks: Vec::new(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Exports by vdisk name, for frontends.
    pub fn registry(&self) -> &VdiskRegistry {
        &self.registry
    }

    /// The node at a glance.
    pub fn status(&self) -> NodeStatus {
        let stats = self.store.stats();
        let disks = self.store.list_disks();
        let vdisks = self.store.list_vdisks();
        let cluster_vdisks = self.cluster.cluster().vdisks.len();
        let degraded = disks.iter().any(|d| d.state != "online");
        NodeStatus {
            node_id: self.store.node_id().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            health: if degraded { "degraded" } else { "healthy" }.to_string(),
            data_dir: self.config.data_dir.display().to_string(),
            nbd_address: self.config.nbd_address.clone(),
            vhost_dir: self.config.vhost_dir.display().to_string(),
            disks: disks.len() as u64,
            capacity: self.store.capacity(),
            allocated: vdisks.iter().map(|v| v.allocated).sum(),
            vdisks: cluster_vdisks as u64,
            io: IoCounters {
                reads: stats.reads.load(Ordering::Relaxed),
                read_bytes: stats.read_bytes.load(Ordering::Relaxed),
                writes: stats.writes.load(Ordering::Relaxed),
                write_bytes: stats.write_bytes.load(Ordering::Relaxed),
                flushes: stats.flushes.load(Ordering::Relaxed),
                checksum_errors: stats.checksum_errors.load(Ordering::Relaxed),
                resync_copied_bytes: self.resync_copied.load(Ordering::Relaxed),
                log_batches: stats.log_batches.load(Ordering::Relaxed),
                drains: stats.drains.load(Ordering::Relaxed),
            },
            vm_accelerator: self.accel_decided(),
        }
    }

    /// The node's disks.
    pub fn disks(&self) -> Vec<Disk> {
        self.store
            .list_disks()
            .into_iter()
            .map(|d| Disk {
                id: d.id.to_string(),
                path: d.path,
                size: d.size,
                state: d.state,
                error: d.error,
                engine: d.engine,
                slots_total: d.slots_total,
                slots_free: d.slots_free,
                log_bytes: d.log_bytes,
                log_used: d.log_used,
            })
            .collect()
    }

    /// The API view of a vdisk; `allocated` is the space its local copy takes.
    fn describe(&self, state: &ClusterState, record: &VdiskRecord, allocated: u64) -> Vdisk {
        let vhost_socket = self
            .exports
            .lock()
            .get(&record.name)
            .map(|e| e.socket_path().display().to_string());
        let me = self.node_id();
        let live_in_sync = record
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync && state.is_up(r.node))
            .filter(|r| r.node != me || !self.store.vdisk_unavailable(record.id))
            .count();
        let resyncing = record
            .replicas
            .iter()
            .any(|r| r.state == ReplicaState::Stale && state.is_up(r.node));
        let health = if live_in_sync == 0 {
            "unavailable"
        } else if live_in_sync >= usize::from(record.rf) {
            "healthy"
        } else if resyncing {
            "rebuilding"
        } else {
            "degraded"
        };
        let resync =
            self.resync_progress
                .lock()
                .get(&record.id)
                .map(|p| basalt_api::ResyncProgress {
                    node: me,
                    done_bytes: p.done,
                    total_bytes: p.total,
                    copied_bytes: p.copied,
                });
        Vdisk {
            nbd_uri: format!("nbd://{}/{}", self.config.nbd_address, record.name),
            name: record.name.clone(),
            id: record.id,
            size: record.size,
            allocated,
            rf: u32::from(record.rf),
            state: health.to_string(),
            created: record.created,
            vhost_socket,
            epoch: record.epoch,
            owner: record.owner,
            replicas: record
                .replicas
                .iter()
                .map(|r| basalt_api::VdiskReplica {
                    node: r.node,
                    state: match r.state {
                        _ if r.lost => "lost",
                        ReplicaState::InSync => "in_sync",
                        ReplicaState::Stale => "stale",
                    }
                    .to_string(),
                    node_up: state.is_up(r.node),
                })
                .collect(),
            moving_from: record.leaving,
            resync,
        }
    }

    /// Space taken by each local copy, by vdisk id (one pass over the store).
    fn local_allocation(&self) -> HashMap<u64, u64> {
        self.store
            .list_vdisks()
            .into_iter()
            .map(|v| (v.id, v.allocated))
            .collect()
    }

    /// All vdisks of the cluster.
    pub fn vdisks(&self) -> Vec<Vdisk> {
        let state = self.cluster.cluster();
        let allocated = self.local_allocation();
        state
            .vdisks
            .values()
            .map(|v| self.describe(&state, v, allocated.get(&v.id).copied().unwrap_or(0)))
            .collect()
    }

    /// One vdisk.
    pub fn vdisk(&self, name: &str) -> Result<Vdisk, ControlError> {
        let state = self.cluster.cluster();
        let record = state
            .vdisk_by_name(name)
            .ok_or_else(|| StoreError::NoSuchVdisk(name.to_string()))?;
        let allocated = self
            .local_allocation()
            .get(&record.id)
            .copied()
            .unwrap_or(0);
        Ok(self.describe(&state, record, allocated))
    }

    /// One vdisk, with the progress of a resync running on another node.
    pub async fn vdisk_with_progress(&self, name: &str) -> Result<Vdisk, ControlError> {
        let mut vdisk = self.vdisk(name)?;
        if vdisk.resync.is_none() {
            vdisk.resync = self.remote_resync(&vdisk).await;
        }
        Ok(vdisk)
    }

    async fn remote_resync(&self, vdisk: &Vdisk) -> Option<basalt_api::ResyncProgress> {
        let state = self.cluster.cluster();
        for replica in &vdisk.replicas {
            if replica.state != "stale" || !replica.node_up || replica.node == self.node_id() {
                continue;
            }
            let addr = state.nodes.get(&replica.node)?.listen.clone();
            if let Some(progress) =
                crate::cluster::remote_progress(self, &addr, replica.node, vdisk.id).await
            {
                return Some(progress);
            }
        }
        None
    }

    /// Vdisks that are not healthy, with resync progress where one runs.
    pub async fn unhealthy_vdisks(&self) -> Vec<Vdisk> {
        let mut out = Vec::new();
        for mut vdisk in self.vdisks() {
            if vdisk.state == "healthy" {
                continue;
            }
            if vdisk.resync.is_none() {
                vdisk.resync = self.remote_resync(&vdisk).await;
            }
            out.push(vdisk);
        }
        out
    }

    async fn propose(&self, name: &str, command: Command) -> Result<CommandResult, ControlError> {
        let result = self
            .cluster
            .propose(command)
            .await
            .map_err(|e| ControlError::Cluster(e.to_string()))?;
        match result {
            CommandResult::Refused { kind, reason } => Err(match kind {
                Refusal::NotFound => StoreError::NoSuchVdisk(name.to_string()).into(),
                Refusal::Exists => StoreError::VdiskExists(name.to_string()).into(),
                Refusal::Invalid => ControlError::BadRequest(reason),
                Refusal::Conflict => ControlError::Busy(reason),
            }),
            other => Ok(other),
        }
    }

    /// Waits until this node holds (or, if it holds no replica, knows) the
    /// vdisk as the cluster defines it, so that it is reachable at once.
    /// Waits until this node has applied the vdisk at `size` (at least) and
    /// its local replica, if it holds one, follows: a node that lags behind
    /// the leader must not answer "no such vdisk" to its own create.
    async fn settle(&self, name: &str, size: u64) -> Result<Vdisk, ControlError> {
        let me = self.node_id();
        let store = self.store.clone();
        let ready = |state: &ClusterState| match state.vdisk_by_name(name) {
            None => false,
            Some(record) => {
                record.size >= size
                    && (!record.has_replica_on(me)
                        || store.vdisk_size(record.id) == Some(record.size))
            }
        };
        if wait_applied(self, ready).await.is_none() {
            tracing::warn!(vdisk = name, "the local replica is not ready yet");
        }
        self.vdisk(name)
    }

    /// Creates a vdisk with `rf` replicas (default: 2 when the cluster has
    /// at least two nodes up, else 1). It is reachable over NBD at once,
    /// through any node.
    pub async fn create_vdisk(
        &self,
        name: &str,
        size: u64,
        rf: Option<u32>,
    ) -> Result<Vdisk, ControlError> {
        self.store.validate_vdisk(name, size)?;
        let state = self.cluster.cluster();
        let rf = match rf {
            Some(rf) => u8::try_from(rf).map_err(|_| {
                ControlError::BadRequest(format!("replication factor must be 1 to 3, not {rf}"))
            })?,
            None if state.up_nodes() >= 2 => 2,
            None => 1,
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.propose(
            name,
            Command::CreateVdisk {
                name: name.to_string(),
                size,
                rf,
                created,
                preferred: Some(self.node_id()),
            },
        )
        .await?;
        tracing::info!(name, size, rf, "created vdisk");
        self.settle(name, size).await
    }

    /// Grows a vdisk.
    pub async fn resize_vdisk(&self, name: &str, size: u64) -> Result<Vdisk, ControlError> {
        self.vdisk(name)?;
        self.store.check_vdisk_size(size)?;
        self.propose(
            name,
            Command::ResizeVdisk {
                name: name.to_string(),
                size,
            },
        )
        .await?;
        tracing::info!(name, size, "resized vdisk");
        self.settle(name, size).await
    }

    /// Deletes a vdisk everywhere. Refused while it is exported over
    /// vhost-user on this node (a VM may be using it).
    pub async fn delete_vdisk(&self, name: &str) -> Result<(), ControlError> {
        let id = self.vdisk(name)?.id;
        if let Some(vm) = self.cluster.cluster().vm_using(name) {
            return Err(ControlError::Busy(format!(
                "vdisk {name} is used by VM {}; delete the VM first",
                vm.spec.name
            )));
        }
        if self.exports.lock().contains_key(name) {
            return Err(ControlError::Busy(format!(
                "vdisk {name} is exported over vhost-user; remove the export first (basalt vdisk unexport {name} --vhost)"
            )));
        }
        self.propose(
            name,
            Command::DeleteVdisk {
                name: name.to_string(),
            },
        )
        .await?;
        self.forget_backend(id);
        self.forget_hand_export(name);
        let store = self.store.clone();
        if wait_applied(self, |_| store.vdisk_size(id).is_none())
            .await
            .is_none()
        {
            tracing::warn!(vdisk = name, "the local copy is not deleted yet");
        }
        tracing::info!(name, "deleted vdisk");
        Ok(())
    }

    /// Exports a vdisk over vhost-user-blk (idempotent) and returns the socket.
    /// A new export is recorded, so that it comes back after a restart, and
    /// starts in the write-cache mode the vdisk's last export by hand was left
    /// in (see `crate::hand_exports`).
    pub fn export_vhost(&self, name: &str) -> Result<VhostExport, ControlError> {
        self.export_vhost_with(name, None)
    }

    /// Exports a vdisk to a VM's QEMU process: the guest's write-cache mode
    /// starts at `write_through` (what that process shows its guest) and
    /// `keeper` records its changes. An export already there starts over
    /// with them.
    pub(crate) fn export_vhost_for_vm(
        &self,
        name: &str,
        write_through: bool,
        keeper: Arc<dyn WriteCacheKeeper>,
    ) -> Result<VhostExport, ControlError> {
        self.export_vhost_with(name, Some((write_through, keeper)))
    }

    fn export_vhost_with(
        &self,
        name: &str,
        cache: Option<(bool, Arc<dyn WriteCacheKeeper>)>,
    ) -> Result<VhostExport, ControlError> {
        let mut exports = self.exports.lock();
        if let Some(export) = exports.get(name) {
            if let Some((write_through, keeper)) = cache {
                export.write_cache().reset(write_through, Some(keeper));
            }
            return Ok(VhostExport {
                name: name.to_string(),
                socket: export.socket_path().display().to_string(),
            });
        }
        let backend = self
            .backend(name)
            .ok_or_else(|| StoreError::NoSuchVdisk(name.to_string()))?;
        let socket = self.config.vhost_dir.join(format!("{name}.sock"));
        let (cache, new_record) = match cache {
            Some((write_through, keeper)) => (WriteCache::new(write_through, Some(keeper)), false),
            None => self.record_hand_export(name)?,
        };
        let export = match VhostBlkExport::start_with_cache(
            &socket,
            backend,
            self.runtime.clone(),
            VhostBlkOptions::default(),
            Arc::new(cache),
        ) {
            Ok(export) => export,
            Err(error) => {
                if new_record {
                    // Nothing was exported: a restart must not export it.
                    self.forget_hand_export(name);
                }
                return Err(error.into());
            }
        };
        tracing::info!(name, socket = %socket.display(), "exported vdisk over vhost-user");
        exports.insert(name.to_string(), export);
        Ok(VhostExport {
            name: name.to_string(),
            socket: socket.display().to_string(),
        })
    }

    /// Whether `name` is exported over vhost-user on this node.
    pub(crate) fn vhost_exported(&self, name: &str) -> bool {
        self.exports.lock().contains_key(name)
    }

    /// The counters of this node's vhost-user exports, by vdisk.
    pub fn vhost_stats(&self) -> Vec<(String, ExportStats)> {
        self.exports
            .lock()
            .iter()
            .map(|(name, export)| (name.clone(), export.stats()))
            .collect()
    }

    /// Stops a vhost-user export.
    pub fn unexport_vhost(&self, name: &str) -> Result<(), ControlError> {
        self.vdisk(name)?;
        let export = self.exports.lock().remove(name);
        match export {
            Some(export) => {
                export.stop();
                // Whoever used the export is done with it: the next export
                // by hand starts at write-back again.
                self.forget_hand_export(name);
                tracing::info!(name, "stopped vhost-user export");
                Ok(())
            }
            None => Err(ControlError::NotFound(format!(
                "vdisk {name} is not exported over vhost-user"
            ))),
        }
    }

    /// Stops every export and shuts the store down cleanly.
    pub async fn shutdown(&self) -> Result<(), ControlError> {
        let exports: Vec<VhostBlkExport> = self.exports.lock().drain().map(|(_, e)| e).collect();
        for export in exports {
            let _ = tokio::task::spawn_blocking(move || export.stop()).await;
        }
        self.store.shutdown().await?;
        Ok(())
    }
}

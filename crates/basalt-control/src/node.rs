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
use basalt_meta::{MetaNode, NodeState};
use basalt_store::{Store, StoreError, VdiskInfo};
use basalt_vdisk::VdiskRegistry;
use basalt_vhost::{VhostBlkExport, VhostBlkOptions};
use parking_lot::Mutex;

use crate::ControlError;

/// Fixed facts about the node, for status answers.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Host and port the NBD server listens on (for URIs).
    pub nbd_address: String,
    /// Directory of vhost-user sockets.
    pub vhost_dir: PathBuf,
}

/// One node's services.
pub struct Node {
    store: Store,
    registry: VdiskRegistry,
    config: NodeConfig,
    runtime: tokio::runtime::Handle,
    exports: Mutex<HashMap<String, VhostBlkExport>>,
    started: Instant,
    cluster: MetaNode,
}

impl Node {
    /// A node over an open store. Must be called inside a tokio runtime.
    pub fn new(
        store: Store,
        config: NodeConfig,
        cluster: MetaNode,
    ) -> Result<Arc<Node>, ControlError> {
        std::fs::create_dir_all(&config.vhost_dir).map_err(|source| ControlError::Io {
            path: config.vhost_dir.clone(),
            source,
        })?;
        Ok(Arc::new(Node {
            registry: VdiskRegistry::new(store.clone()),
            store,
            config,
            runtime: tokio::runtime::Handle::current(),
            exports: Mutex::new(HashMap::new()),
            started: Instant::now(),
            cluster,
        }))
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
            vdisks: vdisks.len() as u64,
            io: IoCounters {
                reads: stats.reads.load(Ordering::Relaxed),
                read_bytes: stats.read_bytes.load(Ordering::Relaxed),
                writes: stats.writes.load(Ordering::Relaxed),
                write_bytes: stats.write_bytes.load(Ordering::Relaxed),
                flushes: stats.flushes.load(Ordering::Relaxed),
                checksum_errors: stats.checksum_errors.load(Ordering::Relaxed),
                log_batches: stats.log_batches.load(Ordering::Relaxed),
                drains: stats.drains.load(Ordering::Relaxed),
            },
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

    fn describe(&self, info: VdiskInfo) -> Vdisk {
        let vhost_socket = self
            .exports
            .lock()
            .get(&info.name)
            .map(|e| e.socket_path().display().to_string());
        let state = if self.store.vdisk_unavailable(info.id) {
            "unavailable"
        } else {
            "healthy"
        };
        Vdisk {
            nbd_uri: format!("nbd://{}/{}", self.config.nbd_address, info.name),
            name: info.name,
            id: info.id,
            size: info.size,
            allocated: info.allocated,
            rf: 1,
            state: state.to_string(),
            created: info.created,
            vhost_socket,
        }
    }

    /// All vdisks.
    pub fn vdisks(&self) -> Vec<Vdisk> {
        self.store
            .list_vdisks()
            .into_iter()
            .map(|v| self.describe(v))
            .collect()
    }

    /// One vdisk.
    pub fn vdisk(&self, name: &str) -> Result<Vdisk, ControlError> {
        Ok(self.describe(self.store.vdisk(name)?))
    }

    /// Creates a vdisk; it is reachable over NBD at once.
    pub async fn create_vdisk(&self, name: &str, size: u64) -> Result<Vdisk, ControlError> {
        let info = self.store.create_vdisk(name, size).await?;
        tracing::info!(name, size, "created vdisk");
        Ok(self.describe(info))
    }

    /// Grows a vdisk.
    pub async fn resize_vdisk(&self, name: &str, size: u64) -> Result<Vdisk, ControlError> {
        let info = self.store.resize_vdisk(name, size).await?;
        tracing::info!(name, size, "resized vdisk");
        Ok(self.describe(info))
    }

    /// Deletes a vdisk. Refused while it is exported over vhost-user (a VM
    /// may be using it).
    pub async fn delete_vdisk(&self, name: &str) -> Result<(), ControlError> {
        let info = self.store.vdisk(name)?;
        if self.exports.lock().contains_key(name) {
            return Err(ControlError::Busy(format!(
                "vdisk {name} is exported over vhost-user; remove the export first (basalt vdisk unexport {name} --vhost)"
            )));
        }
        self.store.delete_vdisk(name).await?;
        self.registry.forget(info.id);
        tracing::info!(name, "deleted vdisk");
        Ok(())
    }

    /// Exports a vdisk over vhost-user-blk (idempotent) and returns the socket.
    pub fn export_vhost(&self, name: &str) -> Result<VhostExport, ControlError> {
        let mut exports = self.exports.lock();
        if let Some(export) = exports.get(name) {
            return Ok(VhostExport {
                name: name.to_string(),
                socket: export.socket_path().display().to_string(),
            });
        }
        let backend = self
            .registry
            .get(name)
            .ok_or_else(|| StoreError::NoSuchVdisk(name.to_string()))?;
        let socket = self.config.vhost_dir.join(format!("{name}.sock"));
        let export = VhostBlkExport::start(
            &socket,
            backend,
            self.runtime.clone(),
            VhostBlkOptions::default(),
        )?;
        tracing::info!(name, socket = %socket.display(), "exported vdisk over vhost-user");
        exports.insert(name.to_string(), export);
        Ok(VhostExport {
            name: name.to_string(),
            socket: socket.display().to_string(),
        })
    }

    /// Stops a vhost-user export.
    pub fn unexport_vhost(&self, name: &str) -> Result<(), ControlError> {
        self.store.vdisk(name)?;
        let export = self.exports.lock().remove(name);
        match export {
            Some(export) => {
                export.stop();
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

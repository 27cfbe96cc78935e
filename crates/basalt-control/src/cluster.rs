//! Where the control plane meets replication: vdisk ownership, the local
//! replicas a node must hold, and the exports frontends see.
//!
//! * [`NodeCoordinator`] is the data plane's [`Coordinator`]: taking
//!   ownership is an `AcquireVdisk` through Raft (epoch + 1) followed by
//!   fencing every in-sync replica at the new epoch; recording a replica
//!   stale is a `MarkStale` through Raft, which Raft refuses to an owner
//!   whose epoch is no longer current.
//! * The *reconciler* makes the local store follow the cluster state: it
//!   creates the local copy of every vdisk this node holds a replica of,
//!   follows resizes, deletes copies the cluster no longer places here, and
//!   fences local owners whose epoch was superseded.
//! * [`ClusterExports`] is the frontends' registry: any vdisk of the cluster
//!   is reachable through any node, which takes ownership on first I/O.

use std::sync::{Arc, Weak};
use std::time::Duration;

use basalt_core::{BlockBackend, BlockError, BoxFuture, ExportRegistry};
use basalt_meta::{ClusterState, Command, CommandResult, NodeId};
use basalt_net::TrafficClass;
use basalt_replica::{
    Acquired, Coordinator, DirtyReport, LocalReplicas, Op, ReplicaSet, ReplicaTarget, Request,
    SERVICE_REPLICA,
};
use bytes::Bytes;

use crate::ControlError;
use crate::node::Node;

/// How long to wait for this node to apply a change it proposed.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// The local copies, for the replica service.
pub struct LocalCopies {
    pub(crate) registry: basalt_vdisk::VdiskRegistry,
}

impl LocalReplicas for LocalCopies {
    fn replica(&self, vdisk: u64) -> Option<Arc<dyn BlockBackend>> {
        self.registry
            .get_by_id(vdisk)
            .map(|v| v as Arc<dyn BlockBackend>)
    }
}

/// The control plane's side of replication for one node.
pub struct NodeCoordinator {
    pub(crate) node: Weak<Node>,
}

fn io(why: impl Into<String>) -> BlockError {
    BlockError::Io(why.into())
}

impl NodeCoordinator {
    fn node(&self) -> Result<Arc<Node>, BlockError> {
        self.node.upgrade().ok_or(BlockError::Shutdown)
    }
}

/// Waits until this node has applied a state satisfying `ready` (which may
/// also look at local things, like the store: it is re-checked on every
/// state change and every few milliseconds).
pub(crate) async fn wait_applied(
    node: &Node,
    ready: impl Fn(&ClusterState) -> bool,
) -> Option<Arc<ClusterState>> {
    let mut changes = node.cluster().subscribe();
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    loop {
        let state = changes.borrow_and_update().clone();
        if ready(&state) {
            return Some(state);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        if let Ok(Err(_closed)) =
            tokio::time::timeout(Duration::from_millis(10), changes.changed()).await
        {
            return None;
        }
    }
}

async fn acquire(node: Arc<Node>, vdisk: u64) -> Result<Acquired, BlockError> {
    let me = node.node_id();
    let name = node
        .cluster()
        .cluster()
        .vdisks
        .get(&vdisk)
        .map(|v| v.name.clone())
        .ok_or_else(|| io(format!("vdisk {vdisk} was deleted")))?;
    // A VM using the vdisk is migrating here: its source serves the vdisk
    // until the switch-over and releases it then (no read lease to wait out).
    let me_now = me;
    let pending = |state: &ClusterState| crate::vms::migration_pending(state, me_now, &name);
    if pending(&node.cluster().cluster()) {
        tracing::info!(vdisk = %name, "waiting for the migration's switch-over before taking the vdisk");
        let _ = wait_applied(&node, |state| !pending(state)).await;
    }
    let epoch = match node
        .cluster()
        .propose(Command::AcquireVdisk {
            name: name.clone(),
            node: me,
        })
        .await
        .map_err(|e| io(format!("cannot take ownership of {name}: {e}")))?
    {
        CommandResult::Epoch(epoch) => epoch,
        CommandResult::Refused { reason, .. } => {
            return Err(io(format!("cannot take ownership of {name}: {reason}")));
        }
        other => {
            return Err(io(format!(
                "unexpected answer to an acquisition: {other:?}"
            )));
        }
    };
    let state = wait_applied(&node, |s| {
        s.vdisks.get(&vdisk).is_none_or(|v| v.epoch >= epoch)
    })
    .await
    .ok_or_else(|| {
        io(format!(
            "this node did not learn epoch {epoch} of {name} in time"
        ))
    })?;
    let record = state
        .vdisks
        .get(&vdisk)
        .ok_or_else(|| io(format!("vdisk {name} was deleted")))?;
    if record.epoch != epoch || record.owner != Some(me) {
        return Err(io(format!(
            "vdisk {name} was taken over by another node meanwhile"
        )));
    }
    let mut set = replica_set(&node, &state, vdisk, epoch).await?;
    let mut reports = Vec::new();
    // Fence the local replica (waiting out mutations of older owners still
    // being applied here), then every remote one; a remote replica that
    // cannot be reached is recorded stale (it missed nothing yet, but it
    // will). Each reports where a write may not have settled.
    match node.gate().fence(vdisk, epoch).await {
        Ok(report) => reports.push((me, report)),
        Err(newer) => {
            return Err(io(format!(
                "vdisk {name} was taken over by another node meanwhile (epoch {newer})"
            )));
        }
    }
    let fence = Request::new(Op::Fence, vdisk, epoch, 0, 0);
    let transport = node.transport().clone();
    let fences = set.remotes.iter().map(|target| {
        let transport = transport.clone();
        async move {
            let result = transport
                .call_timeout(
                    &target.addr,
                    TrafficClass::Control,
                    SERVICE_REPLICA,
                    fence.encode(),
                    Bytes::new(),
                    Duration::from_secs(5),
                )
                .await;
            (target.node, result)
        }
    });
    let mut unreachable = Vec::new();
    for (replica, result) in futures::future::join_all(fences).await {
        match result {
            Ok(reply) => reports.push((replica, DirtyReport::decode(&reply.data))),
            Err(error) => {
                tracing::warn!(vdisk = %name, replica, %error, "cannot fence a replica; recording it stale");
                unreachable.push(replica);
            }
        }
    }
    for replica in &unreachable {
        mark_stale(&node, vdisk, *replica, epoch).await?;
    }
    set.remotes.retain(|r| !unreachable.contains(&r.node));
    // Taken over from another node, which may still be alive behind a
    // partition: wait until its read lease has surely run out, so that it
    // can never serve a read older than a write acknowledged here.
    if let Some(previous) = record.previous_owner.filter(|p| *p != me) {
        let wait = node.cluster().takeover_wait();
        tracing::info!(vdisk = %name, previous, ?wait, "waiting out the previous owner's read lease");
        tokio::time::sleep(wait).await;
    }
    tracing::info!(vdisk = %name, epoch, replicas = set.remotes.len() + usize::from(set.local.is_some()), "took ownership");
    Ok(Acquired { set, reports })
}

/// The replicas an owner under `epoch` writes to, as `state` places them:
/// every replica, in sync or being resynced, on a member.
pub(crate) async fn replica_set(
    node: &Node,
    state: &ClusterState,
    vdisk: u64,
    epoch: u64,
) -> Result<ReplicaSet, BlockError> {
    let me = node.node_id();
    let record = state
        .vdisks
        .get(&vdisk)
        .ok_or_else(|| io(format!("vdisk {vdisk} was deleted")))?;
    let mut local = None;
    let mut local_in_sync = false;
    let mut remotes = Vec::new();
    // A lost copy (failed disk) takes no writes; it is being replaced.
    for replica in record.replicas.iter().filter(|r| !r.lost) {
        let in_sync = replica.state == basalt_meta::ReplicaState::InSync;
        if replica.node == me {
            let copy = local_copy(node, vdisk)
                .await
                .ok_or_else(|| io(format!("the local replica of {} is missing", record.name)))?;
            local = Some((me, copy));
            local_in_sync = in_sync;
        } else if let Some(member) = state.nodes.get(&replica.node) {
            remotes.push(ReplicaTarget {
                node: replica.node,
                addr: member.listen.clone(),
                in_sync,
            });
        }
    }
    Ok(ReplicaSet {
        epoch,
        local,
        local_in_sync,
        remotes,
    })
}

/// This node's copy of `vdisk`, waiting for the reconciler to create it if
/// the cluster placed it here just now.
pub(crate) async fn local_copy(node: &Node, vdisk: u64) -> Option<Arc<dyn BlockBackend>> {
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    loop {
        if let Some(copy) = node.registry().get_by_id(vdisk) {
            return Some(copy);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Service number of node-to-node control requests (the resync barrier).
pub const SERVICE_CONTROL: u16 = 4;

/// Requests of the control service.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    /// Asks the owner of `vdisk` to write to `replica` from now on; answered
    /// once no write that skipped it is in flight.
    Barrier {
        /// Vdisk id.
        vdisk: u64,
        /// The node whose replica is being resynced.
        replica: NodeId,
    },
    /// How far this node's resync of `vdisk` has come (JSON `null` when none
    /// runs, else `[done, total, copied]` bytes).
    ResyncProgress {
        /// Vdisk id.
        vdisk: u64,
    },
    /// A piece of the serial console log of a VM this node runs.
    Console {
        /// VM name.
        name: String,
        /// Byte offset.
        offset: u64,
    },
}

/// Serves [`SERVICE_CONTROL`].
pub struct ControlService {
    pub(crate) node: Weak<Node>,
}

impl basalt_net::Handler for ControlService {
    fn handle(
        &self,
        request: basalt_net::Incoming,
    ) -> futures::future::BoxFuture<'static, Result<basalt_net::Reply, basalt_net::RemoteError>>
    {
        let node = self.node.upgrade();
        Box::pin(async move {
            let fail = |why: String| basalt_net::RemoteError::new(1, why);
            let node = node.ok_or_else(|| fail("node is stopping".into()))?;
            let request: ControlRequest = serde_json::from_slice(&request.body)
                .map_err(|e| fail(format!("malformed control request: {e}")))?;
            match request {
                ControlRequest::Barrier { vdisk, replica } => {
                    // This node must know the replica before it can write to it.
                    let known = wait_applied(&node, |s| {
                        s.vdisks
                            .get(&vdisk)
                            .is_none_or(|v| v.has_replica_on(replica))
                    })
                    .await;
                    if known.is_none() {
                        return Err(fail("this node has not learned of the replica yet".into()));
                    }
                    node.refresh_backend(vdisk, true).await;
                    Ok(basalt_net::Reply::default())
                }
                ControlRequest::Console { name, offset } => {
                    let chunk = node
                        .local_console(&name, offset)
                        .map_err(|e| fail(e.to_string()))?;
                    json_reply(&chunk)
                }
                ControlRequest::ResyncProgress { vdisk } => {
                    let progress = node
                        .resync_progress
                        .lock()
                        .get(&vdisk)
                        .map(|p| (p.done, p.total, p.copied));
                    json_reply(&progress)
                }
            }
        })
    }
}

/// A control answer as JSON.
fn json_reply<T: serde::Serialize>(
    value: &T,
) -> Result<basalt_net::Reply, basalt_net::RemoteError> {
    serde_json::to_vec(value)
        .map(basalt_net::Reply::body)
        .map_err(|e| basalt_net::RemoteError::new(1, e.to_string()))
}

/// Sends `request` to the control service of the node at `addr`; returns
/// the reply's body.
async fn control_call(
    node: &Node,
    addr: &str,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<Bytes, String> {
    let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    let reply = node
        .transport()
        .call_timeout(
            addr,
            TrafficClass::Control,
            SERVICE_CONTROL,
            Bytes::from(body),
            Bytes::new(),
            timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(reply.body)
}

/// Asks the node at `addr` for a piece of VM `name`'s console log.
pub(crate) async fn remote_console(
    node: &Node,
    addr: &str,
    name: &str,
    offset: u64,
) -> Result<basalt_api::ConsoleChunk, ControlError> {
    let request = ControlRequest::Console {
        name: name.to_string(),
        offset,
    };
    let body = control_call(node, addr, &request, Duration::from_secs(5))
        .await
        .map_err(|e| ControlError::Cluster(format!("reading the console on {addr}: {e}")))?;
    serde_json::from_slice(&body)
        .map_err(|e| ControlError::Internal(format!("console answer from {addr}: {e}")))
}

/// Asks `node_id` (at `addr`) how far its resync of `vdisk` has come.
pub(crate) async fn remote_progress(
    node: &Node,
    addr: &str,
    node_id: NodeId,
    vdisk: u64,
) -> Option<basalt_api::ResyncProgress> {
    let request = ControlRequest::ResyncProgress { vdisk };
    let body = control_call(node, addr, &request, Duration::from_secs(2))
        .await
        .ok()?;
    let (done, total, copied): (u64, u64, u64) =
        serde_json::from_slice::<Option<(u64, u64, u64)>>(&body).ok()??;
    Some(basalt_api::ResyncProgress {
        node: node_id,
        done_bytes: done,
        total_bytes: total,
        copied_bytes: copied,
    })
}

async fn mark_stale(
    node: &Node,
    vdisk: u64,
    replica: NodeId,
    epoch: u64,
) -> Result<(), BlockError> {
    match node
        .cluster()
        .propose(Command::MarkStale {
            vdisk,
            node: replica,
            epoch,
        })
        .await
        .map_err(|e| io(e.to_string()))?
    {
        CommandResult::Refused { reason, .. } => Err(io(reason)),
        _ => Ok(()),
    }
}

impl Coordinator for NodeCoordinator {
    fn acquire(&self, vdisk: u64) -> BoxFuture<'static, Result<Acquired, BlockError>> {
        let node = self.node();
        Box::pin(async move { acquire(node?, vdisk).await })
    }

    fn holds_read_lease(&self) -> bool {
        self.node
            .upgrade()
            .is_some_and(|node| node.cluster().holds_read_lease())
    }

    fn mark_stale(
        &self,
        vdisk: u64,
        replica: u64,
        epoch: u64,
    ) -> BoxFuture<'static, Result<(), BlockError>> {
        let node = self.node();
        Box::pin(async move {
            let node = node?;
            mark_stale(&node, vdisk, replica, epoch).await
        })
    }
}

/// Every vdisk of the cluster, for the frontends of this node.
#[derive(Clone)]
pub struct ClusterExports {
    pub(crate) node: Weak<Node>,
}

impl ExportRegistry for ClusterExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        let node = self.node.upgrade()?;
        node.backend(name).map(|b| b as Arc<dyn BlockBackend>)
    }

    fn list(&self) -> Vec<(String, String)> {
        let Some(node) = self.node.upgrade() else {
            return Vec::new();
        };
        node.cluster()
            .cluster()
            .vdisks
            .values()
            .map(|v| {
                (
                    v.name.clone(),
                    format!(
                        "Basalt vdisk, {}, rf {}",
                        basalt_core::size::format_size(v.size),
                        v.rf
                    ),
                )
            })
            .collect()
    }
}

/// Makes the local store follow the cluster state, after every change.
pub(crate) async fn reconcile_forever(node: Weak<Node>) {
    let Some(mut changes) = node.upgrade().map(|n| n.cluster().subscribe()) else {
        return;
    };
    loop {
        let state = changes.borrow_and_update().clone();
        match node.upgrade() {
            Some(node) => reconcile(&node, &state).await,
            None => return,
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

async fn reconcile(node: &Node, state: &ClusterState) {
    let me = node.node_id();
    if me == 0 || state.cluster_id.is_nil() {
        return;
    }
    let store = node.store();
    // Copies the cluster no longer places here. Only ids the state has
    // already handed out are judged: a state that lags behind never deletes
    // a copy it has not heard of yet.
    for local in store.list_vdisks() {
        let wanted = state
            .vdisks
            .get(&local.id)
            .is_some_and(|v| v.has_replica_on(me));
        // A copy the cluster moved elsewhere is kept until the vdisk is
        // healthy again: until then it may be the last good data left.
        let others_complete = state
            .vdisks
            .get(&local.id)
            .is_none_or(|v| v.in_sync().count() >= usize::from(v.rf));
        if !wanted && local.id < state.next_vdisk_id && others_complete {
            if state.vdisks.contains_key(&local.id) {
                // The replica moved elsewhere but the vdisk lives on: if this
                // node serves it, it stops writing to the local copy first.
                node.refresh_backend(local.id, false).await;
            } else {
                node.forget_backend(local.id);
            }
            match store.delete_vdisk(&local.name).await {
                Ok(()) => {
                    node.registry().forget(local.id);
                    node.gate().forget(local.id);
                    tracing::info!(vdisk = %local.name, id = local.id, "deleted the local copy of a vdisk the cluster no longer places here");
                }
                Err(error) => {
                    tracing::warn!(vdisk = %local.name, %error, "cannot delete a local copy")
                }
            }
        }
    }
    for record in state.vdisks.values() {
        node.gate().epochs().raise(record.id, record.epoch);
        node.follow(record);
        if record.owner == Some(me) {
            // Replicas may have been added, resynced or lost: write to the
            // ones the cluster places now.
            node.refresh_backend(record.id, false).await;
        }
        if !record.has_replica_on(me) {
            continue;
        }
        match store.vdisk_size(record.id) {
            None => match store
                .create_vdisk_with_id(record.id, &record.name, record.size)
                .await
            {
                Ok(_) => {
                    // Nothing unsettled can predate a copy made just now.
                    node.gate().dirty().mark_known(record.id);
                    tracing::info!(vdisk = %record.name, id = record.id, "created the local replica")
                }
                Err(error) => {
                    tracing::error!(vdisk = %record.name, %error, "cannot create the local replica")
                }
            },
            Some(size) if size < record.size => {
                if let Err(error) = store.resize_vdisk(&record.name, record.size).await {
                    tracing::error!(vdisk = %record.name, %error, "cannot resize the local replica");
                }
            }
            Some(_) => {}
        }
    }
    node.forget_deleted_backends(state);
}

/// Watches this node's copies: one whose data sits on a failed or missing
/// disk for longer than the dead-after time is reported lost through Raft,
/// and the leader replaces it on another node.
pub(crate) async fn watch_local_copies(node: Weak<Node>) {
    let mut unreadable_since: std::collections::HashMap<u64, tokio::time::Instant> =
        std::collections::HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(node) = node.upgrade() else { return };
        let me = node.node_id();
        if me == 0 {
            continue;
        }
        let state = node.cluster().cluster();
        let mine: Vec<u64> = state
            .vdisks
            .values()
            .filter(|v| v.replicas.iter().any(|r| r.node == me && !r.lost))
            .map(|v| v.id)
            .collect();
        unreadable_since.retain(|id, _| mine.contains(id));
        for id in mine {
            if !node.store().vdisk_unavailable(id) {
                unreadable_since.remove(&id);
                continue;
            }
            let since = *unreadable_since
                .entry(id)
                .or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < node.config.dead_after {
                continue;
            }
            let name = state
                .vdisks
                .get(&id)
                .map(|v| v.name.clone())
                .unwrap_or_default();
            match node
                .cluster()
                .propose(Command::ReplicaLost {
                    vdisk: id,
                    node: me,
                })
                .await
            {
                Ok(CommandResult::Refused { reason, .. }) => {
                    tracing::warn!(vdisk = %name, %reason, "local copy unreadable but kept")
                }
                Ok(_) => {
                    tracing::error!(vdisk = %name, "local copy unreadable (failed or missing disk): reported lost, the cluster rebuilds it elsewhere")
                }
                Err(error) => {
                    tracing::warn!(vdisk = %name, %error, "cannot report a lost local copy yet")
                }
            }
            // Asked once per dead-after period at most.
            unreadable_since.insert(id, tokio::time::Instant::now());
        }
    }
}

//! The cluster's metadata and the commands that change it.
//!
//! Everything here is replicated through Raft: every node applies the same
//! commands in the same order and reaches the same [`ClusterState`]. Commands
//! are therefore validated *in* [`ClusterState::apply`], deterministically,
//! against the state they are applied to — a command that was valid when a
//! node proposed it may be refused when it is applied after a concurrent one
//! (two creates of one name: the second gets "already exists"). A refused
//! command changes nothing and reports why.
//!
//! What lives here is what every node must agree on: members, vdisk
//! definitions, who owns each vdisk and under which epoch, and where the
//! replicas of each segment sit. Per-write state never does: Raft is not on
//! the write path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::vm::{NodeResources, VmBoot, VmCommand, VmRecord};

/// Raft node ids.
pub type NodeId = u64;

/// How a node is doing, as the cluster has decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Serving.
    Up,
    /// Silent past the dead-after timeout; its replicas are being rebuilt.
    Down,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Raft node id, assigned when the node joins.
    pub id: NodeId,
    /// The node's own identity (written into its disks' labels).
    pub uuid: Uuid,
    /// Node-to-node address (`--listen`).
    pub listen: String,
    /// REST API address.
    pub api: String,
    /// NBD address.
    pub nbd: String,
    /// When it joined, unix seconds.
    pub joined: u64,
    /// Up or down.
    pub state: NodeState,
}

/// A vdisk as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiskRecord {
    /// Cluster-wide id (also the id the local stores file its data under).
    pub id: u64,
    /// Name (the NBD export name).
    pub name: String,
    /// Size in bytes, a multiple of 4 KiB.
    pub size: u64,
    /// Replication factor.
    pub rf: u8,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Raised every time ownership moves; replicas refuse older epochs.
    pub epoch: u64,
    /// The node serving the vdisk under `epoch`.
    pub owner: Option<NodeId>,
    /// Where its data lives: `rf` nodes, each holding a full copy (one more
    /// while a replica moves).
    #[serde(default)]
    pub replicas: Vec<Replica>,
    /// The owner before the current one (a new owner that took over from
    /// another live node waits out that node's read lease).
    #[serde(default)]
    pub previous_owner: Option<NodeId>,
    /// A rebalance moves the replica on this node to the stale replica
    /// added for it; it goes once that one is in sync.
    #[serde(default)]
    pub leaving: Option<NodeId>,
}

/// One copy of a vdisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// The node holding it.
    pub node: NodeId,
    /// Whether it holds every acknowledged write.
    pub state: ReplicaState,
    /// Raised every time the replica misses a write (or is placed anew): a
    /// resync that started at an older value did not see everything.
    #[serde(default)]
    pub seq: u64,
    /// Its node reported the copy unreadable (its disk failed or is
    /// missing): it is replaced like a replica on a down node.
    #[serde(default)]
    pub lost: bool,
}

/// Whether a replica can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Holds every acknowledged write.
    InSync,
    /// Missed writes (or is new); written to, but not read from or
    /// counted, until a resync has copied what it missed.
    Stale,
}

impl VdiskRecord {
    /// Nodes of the in-sync replicas.
    pub fn in_sync(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .map(|r| r.node)
    }

    /// Whether `node` holds a replica (in sync or not).
    pub fn has_replica_on(&self, node: NodeId) -> bool {
        self.replicas.iter().any(|r| r.node == node)
    }
}

/// A change to the cluster metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    /// First command of a new cluster: fixes its identity.
    Bootstrap {
        /// The new cluster's id.
        cluster_id: Uuid,
    },
    /// Adds a member (before Raft learns of it).
    AddNode {
        /// The new member.
        node: NodeRecord,
    },
    /// Records a node as up or down.
    SetNodeState {
        /// Which node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// A member restarted with other addresses (`--listen`, `--api`,
    /// `--nbd`): the cluster reaches it there from now on.
    SetNodeAddress {
        /// Which node.
        node: NodeId,
        /// Node-to-node address.
        listen: String,
        /// REST API address.
        api: String,
        /// NBD address.
        nbd: String,
    },
    /// Defines a vdisk and places its replicas: on `preferred` first (the
    /// node it was created through, so its owner reads locally), then on the
    /// up nodes holding the fewest replicas.
    CreateVdisk {
        /// Name.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Replication factor.
        rf: u8,
        /// Creation time, unix seconds.
        created: u64,
        /// Node to hold the first replica, if it is up.
        #[serde(default)]
        preferred: Option<NodeId>,
    },
    /// Adopts a vdisk that exists on one node already (a single node's
    /// vdisks when it bootstraps a cluster), keeping its id.
    ImportVdisk {
        /// Its id on the node.
        id: u64,
        /// Name.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Creation time, unix seconds.
        created: u64,
        /// The node holding it.
        node: NodeId,
    },
    /// Grows a vdisk.
    ResizeVdisk {
        /// Name.
        name: String,
        /// New size in bytes (not smaller than the current one).
        size: u64,
    },
    /// Removes a vdisk.
    DeleteVdisk {
        /// Name.
        name: String,
    },
    /// Makes `node` the vdisk's owner under a new epoch, fencing the old one.
    AcquireVdisk {
        /// Name.
        name: String,
        /// The new owner.
        node: NodeId,
    },
    /// The owner `node` stops serving the vdisk (it fenced its own
    /// backend first): the next owner need not wait out its read lease.
    /// Used for boot files, read once when a VM starts.
    ReleaseVdisk {
        /// Name.
        name: String,
        /// The owner giving it up.
        node: NodeId,
    },
    /// Puts a new replica on `new` in place of the one on the down node
    /// `dead`; the new one starts stale and is filled by a resync.
    ReplaceReplica {
        /// Vdisk id.
        vdisk: u64,
        /// The down node whose replica goes.
        dead: NodeId,
        /// The up node that takes its place.
        new: NodeId,
    },
    /// `node` reports its copy of the vdisk unreadable (a failed or missing
    /// disk) for longer than the dead-after time: it becomes stale and
    /// lost, and is replaced like a replica on a down node. Refused for the
    /// last in-sync replica.
    ReplicaLost {
        /// Vdisk id.
        vdisk: u64,
        /// The node whose copy is lost.
        node: NodeId,
    },
    /// Rebalance: adds a stale replica on `to` (up, holding none) that will
    /// take over from the in-sync one on `from`; `from`'s goes once the new
    /// one is in sync. Only for a healthy vdisk with nothing else moving.
    MoveReplica {
        /// Vdisk id.
        vdisk: u64,
        /// The node giving its replica up.
        from: NodeId,
        /// The node taking it.
        to: NodeId,
    },
    /// A resync of `node`'s replica that started at `seq` copied everything:
    /// the replica is in sync, unless it missed a write since (seq moved).
    ResyncDone {
        /// Vdisk id.
        vdisk: u64,
        /// The replica's node.
        node: NodeId,
        /// The replica's seq when the resync started.
        seq: u64,
    },
    /// Records that `node`'s replica missed a write. Only the owner under
    /// the current epoch may do so: a fenced owner's request is refused,
    /// and with it the write it wanted to complete.
    MarkStale {
        /// Vdisk id.
        vdisk: u64,
        /// The replica's node.
        node: NodeId,
        /// The epoch the requester writes under.
        epoch: u64,
    },
    /// A change to a VM (see [`crate::vm`]).
    Vm {
        /// The change.
        command: VmCommand,
    },
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandResult {
    /// Applied; nothing to report.
    Done,
    /// Applied; the id it assigned (vdisk id).
    Id(u64),
    /// Applied; the vdisk's new epoch.
    Epoch(u64),
    /// Refused; nothing changed.
    Refused {
        /// What kind of refusal.
        kind: Refusal,
        /// Why, for people.
        reason: String,
    },
}

/// Kinds of refusal, so callers can answer with the right status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Something named does not exist.
    NotFound,
    /// The name is taken.
    Exists,
    /// The request is invalid in itself.
    Invalid,
    /// The request conflicts with the current state (e.g. a fenced epoch).
    Conflict,
}

pub(crate) type Refused = (Refusal, String);

pub(crate) fn invalid(reason: impl Into<String>) -> Refused {
    (Refusal::Invalid, reason.into())
}

pub(crate) fn conflict(reason: impl Into<String>) -> Refused {
    (Refusal::Conflict, reason.into())
}

pub(crate) fn not_found(reason: impl Into<String>) -> Refused {
    (Refusal::NotFound, reason.into())
}

/// The replicated metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The cluster's identity; nil until bootstrapped.
    pub cluster_id: Uuid,
    /// Members by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Vdisks by id.
    pub vdisks: BTreeMap<u64, VdiskRecord>,
    /// The next vdisk id to hand out (ids are never reused).
    pub next_vdisk_id: u64,
    /// VMs by name.
    #[serde(default)]
    pub vms: BTreeMap<String, VmRecord>,
    /// VM capacity each node offers.
    #[serde(default)]
    pub node_resources: BTreeMap<NodeId, NodeResources>,
}

/// Largest replication factor.
pub const MAX_RF: u8 = 3;

impl ClusterState {
    /// The vdisk called `name`.
    pub fn vdisk_by_name(&self, name: &str) -> Option<&VdiskRecord> {
        self.vdisks.values().find(|vdisk| vdisk.name == name)
    }

    fn vdisk_id(&self, name: &str) -> Result<u64, Refused> {
        self.vdisk_by_name(name)
            .map(|vdisk| vdisk.id)
            .ok_or_else(|| not_found(format!("no vdisk named {name}")))
    }

    fn vdisk_mut(&mut self, id: u64) -> Result<&mut VdiskRecord, Refused> {
        self.vdisks
            .get_mut(&id)
            .ok_or_else(|| not_found(format!("no vdisk with id {id}")))
    }

    /// The next free node id (ids start at 1 and are never reused).
    pub fn next_node_id(&self) -> NodeId {
        self.nodes.keys().next_back().map_or(1, |last| last + 1)
    }

    /// Number of members that are up.
    pub fn up_nodes(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .count()
    }

    /// Whether `node` is a member that is up.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|n| n.state == NodeState::Up)
    }

    /// Up to `count` up nodes for new replicas: `preferred` first, then
    /// those holding the fewest replicas, lowest id first.
    fn place(&self, count: usize, preferred: Option<NodeId>) -> Vec<NodeId> {
        let mut load = self.tally(|_| 1);
        let mut chosen = Vec::new();
        if let Some(node) = preferred
            && load.remove(&node).is_some()
        {
            chosen.push(node);
        }
        let mut rest: Vec<(u64, NodeId)> = load.into_iter().map(|(id, n)| (n, id)).collect();
        rest.sort_unstable();
        chosen.extend(rest.into_iter().map(|(_, id)| id));
        chosen.truncate(count);
        chosen
    }

    /// The up node that should take a replica of `vdisk` (one that holds
    /// none yet, least loaded first), if there is one.
    pub fn replacement_candidate(&self, vdisk: &VdiskRecord) -> Option<NodeId> {
        self.place(self.nodes.len(), None)
            .into_iter()
            .find(|node| !vdisk.has_replica_on(*node))
    }

    /// Bytes of replicas each up member holds.
    pub fn load(&self) -> BTreeMap<NodeId, u64> {
        self.tally(|vdisk| vdisk.size)
    }

    /// Sums `weight` of every replica each up member holds.
    fn tally(&self, weight: impl Fn(&VdiskRecord) -> u64) -> BTreeMap<NodeId, u64> {
        let mut load: BTreeMap<NodeId, u64> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .map(|n| (n.id, 0))
            .collect();
        for vdisk in self.vdisks.values() {
            for replica in &vdisk.replicas {
                if let Some(total) = load.get_mut(&replica.node) {
                    *total += weight(vdisk);
                }
            }
        }
        load
    }

    /// The next rebalance step, if the cluster needs one: a replica moving
    /// from a more loaded up node to a less loaded one (by bytes held).
    ///
    /// Only when every member is up and no vdisk is degraded or moving
    /// (rebuilds go first; one move at a time keeps rebalance in the
    /// background). A replica of size `s` moves from a node holding `a`
    /// bytes to one holding `b` only if `s < a - b`: every move lowers the
    /// sum of squared loads, so rebalancing ends. Replicas not on their
    /// owner's node move first (the owner's local copy serves its reads),
    /// larger ones first.
    pub fn rebalance_move(&self) -> Option<Command> {
        if self.nodes.values().any(|n| n.state != NodeState::Up) {
            return None;
        }
        let busy = self.vdisks.values().any(|v| {
            v.leaving.is_some()
                || v.replicas.len() != usize::from(v.rf)
                || v.replicas.iter().any(|r| r.state != ReplicaState::InSync)
        });
        if busy {
            return None;
        }
        let load = self.load();
        let mut by_load: Vec<(u64, NodeId)> = load.iter().map(|(n, b)| (*b, *n)).collect();
        by_load.sort_unstable();
        for (from_load, from) in by_load.iter().rev() {
            for (to_load, to) in &by_load {
                if to_load >= from_load {
                    break;
                }
                let gap = from_load - to_load;
                let best = self
                    .vdisks
                    .values()
                    .filter(|v| v.has_replica_on(*from) && !v.has_replica_on(*to))
                    .filter(|v| v.size < gap)
                    .max_by_key(|v| (v.owner != Some(*from), v.size, std::cmp::Reverse(v.id)));
                if let Some(vdisk) = best {
                    return Some(Command::MoveReplica {
                        vdisk: vdisk.id,
                        from: *from,
                        to: *to,
                    });
                }
            }
        }
        None
    }

    /// Applies one command; a refusal changes nothing.
    pub fn apply(&mut self, command: &Command) -> CommandResult {
        match self.try_apply(command) {
            Ok(result) => result,
            Err((kind, reason)) => CommandResult::Refused { kind, reason },
        }
    }

    fn try_apply(&mut self, command: &Command) -> Result<CommandResult, Refused> {
        match command {
            Command::Bootstrap { cluster_id } => {
                if !self.cluster_id.is_nil() {
                    return Err(conflict(format!(
                        "cluster {} is already bootstrapped",
                        self.cluster_id
                    )));
                }
                self.cluster_id = *cluster_id;
                self.next_vdisk_id = self.next_vdisk_id.max(1);
                Ok(CommandResult::Done)
            }
            Command::AddNode { node } => {
                if node.id == 0 {
                    return Err(invalid("node id 0 is reserved"));
                }
                if self.nodes.contains_key(&node.id) {
                    return Err(conflict(format!("node id {} is taken", node.id)));
                }
                if let Some(existing) = self.nodes.values().find(|n| n.uuid == node.uuid) {
                    return Err(conflict(format!(
                        "node {} is already a member as node {}",
                        node.uuid, existing.id
                    )));
                }
                if let Some(existing) = self.nodes.values().find(|n| n.listen == node.listen) {
                    return Err(conflict(format!(
                        "address {} is already used by node {}",
                        node.listen, existing.id
                    )));
                }
                self.nodes.insert(node.id, node.clone());
                Ok(CommandResult::Done)
            }
            Command::SetNodeAddress {
                node,
                listen,
                api,
                nbd,
            } => {
                if let Some(other) = self
                    .nodes
                    .values()
                    .find(|n| n.id != *node && n.listen == *listen)
                {
                    return Err(conflict(format!(
                        "node {} already listens at {listen}",
                        other.id
                    )));
                }
                let record = self
                    .nodes
                    .get_mut(node)
                    .ok_or_else(|| not_found(format!("no node {node}")))?;
                record.listen = listen.clone();
                record.api = api.clone();
                record.nbd = nbd.clone();
                Ok(CommandResult::Done)
            }
            Command::SetNodeState { node, state } => {
                let record = self
                    .nodes
                    .get_mut(node)
                    .ok_or_else(|| not_found(format!("no node {node}")))?;
                record.state = *state;
                Ok(CommandResult::Done)
            }
            Command::CreateVdisk {
                name,
                size,
                rf,
                created,
                preferred,
            } => {
                validate_name(name)?;
                if self.vdisk_by_name(name).is_some() {
                    return Err((
                        Refusal::Exists,
                        format!("a vdisk named {name} already exists"),
                    ));
                }
                validate_size(*size)?;
                if *rf == 0 || *rf > MAX_RF {
                    return Err(invalid(format!(
                        "replication factor must be 1 to {MAX_RF}, not {rf}"
                    )));
                }
                let nodes = self.place(usize::from(*rf), *preferred);
                if nodes.len() < usize::from(*rf) {
                    return Err(invalid(format!(
                        "replication factor {rf} needs {rf} nodes that are up; the cluster has {}",
                        self.up_nodes()
                    )));
                }
                let id = self.next_vdisk_id.max(1);
                self.next_vdisk_id = id + 1;
                let replicas = nodes
                    .into_iter()
                    .map(|node| Replica {
                        node,
                        state: ReplicaState::InSync,
                        seq: 0,
                        lost: false,
                    })
                    .collect();
                self.vdisks.insert(
                    id,
                    VdiskRecord {
                        id,
                        name: name.clone(),
                        size: *size,
                        rf: *rf,
                        created: *created,
                        epoch: 0,
                        owner: None,
                        replicas,
                        previous_owner: None,
                        leaving: None,
                    },
                );
                Ok(CommandResult::Id(id))
            }
            Command::ImportVdisk {
                id,
                name,
                size,
                created,
                node,
            } => {
                validate_name(name)?;
                validate_size(*size)?;
                if self.vdisk_by_name(name).is_some() || self.vdisks.contains_key(id) {
                    return Err((
                        Refusal::Exists,
                        format!("vdisk {name} (id {id}) already exists"),
                    ));
                }
                if !self.nodes.contains_key(node) {
                    return Err(not_found(format!("no node {node}")));
                }
                self.next_vdisk_id = self.next_vdisk_id.max(id + 1);
                self.vdisks.insert(
                    *id,
                    VdiskRecord {
                        id: *id,
                        name: name.clone(),
                        size: *size,
                        rf: 1,
                        created: *created,
                        epoch: 0,
                        owner: None,
                        replicas: vec![Replica {
                            node: *node,
                            state: ReplicaState::InSync,
                            seq: 0,
                            lost: false,
                        }],
                        previous_owner: None,
                        leaving: None,
                    },
                );
                Ok(CommandResult::Id(*id))
            }
            Command::ResizeVdisk { name, size } => {
                let id = self.vdisk_id(name)?;
                validate_size(*size)?;
                let vdisk = self.vdisk_mut(id)?;
                if *size < vdisk.size {
                    return Err(invalid(format!(
                        "cannot shrink {name} from {} to {size} bytes; vdisks only grow",
                        vdisk.size
                    )));
                }
                vdisk.size = *size;
                Ok(CommandResult::Done)
            }
            Command::DeleteVdisk { name } => {
                let id = self.vdisk_id(name)?;
                if let Some(vm) = self.vms.values().find(|vm| {
                    vm.spec.disks.contains(name)
                        || vm.spec.owned_vdisks.contains(name)
                        || matches!(&vm.spec.boot, VmBoot::Kernel { kernel, initrd, .. }
                            if kernel.vdisk == *name
                                || initrd.as_ref().is_some_and(|f| f.vdisk == *name))
                }) {
                    return Err(conflict(format!(
                        "vdisk {name} is used by VM {}; delete the VM first",
                        vm.spec.name
                    )));
                }
                self.vdisks.remove(&id);
                Ok(CommandResult::Done)
            }
            Command::AcquireVdisk { name, node } => {
                let id = self.vdisk_id(name)?;
                if !self.nodes.contains_key(node) {
                    return Err(not_found(format!("no node {node}")));
                }
                let vdisk = self.vdisk_mut(id)?;
                vdisk.epoch += 1;
                vdisk.previous_owner = vdisk.owner;
                vdisk.owner = Some(*node);
                Ok(CommandResult::Epoch(vdisk.epoch))
            }
            Command::ReleaseVdisk { name, node } => {
                let id = self.vdisk_id(name)?;
                let vdisk = self.vdisk_mut(id)?;
                if vdisk.owner != Some(*node) {
                    return Err(conflict(format!("node {node} does not own vdisk {name}")));
                }
                vdisk.owner = None;
                vdisk.previous_owner = None;
                Ok(CommandResult::Done)
            }
            Command::MarkStale { vdisk, node, epoch } => {
                let record = self.vdisk_mut(*vdisk)?;
                if *epoch != record.epoch {
                    return Err(conflict(format!(
                        "epoch {epoch} of vdisk {} is fenced (current epoch {})",
                        record.name, record.epoch
                    )));
                }
                demote(record, *node, false)?;
                Ok(CommandResult::Done)
            }
            Command::ReplicaLost { vdisk, node } => {
                demote(self.vdisk_mut(*vdisk)?, *node, true)?;
                Ok(CommandResult::Done)
            }
            Command::ReplaceReplica { vdisk, dead, new } => {
                let lost = self
                    .vdisks
                    .get(vdisk)
                    .and_then(|v| v.replicas.iter().find(|r| r.node == *dead))
                    .is_some_and(|r| r.lost);
                if self.is_up(*dead) && !lost {
                    return Err(conflict(format!(
                        "node {dead} is up and its replica is not lost; only those are replaced"
                    )));
                }
                if !self.is_up(*new) {
                    return Err(conflict(format!("node {new} is not an up member")));
                }
                // Never give up a copy unless another in-sync copy lives on
                // an up node: the down node may hold the only good data and
                // come back (an RF1 vdisk waits for its node).
                let survivors = self
                    .vdisks
                    .get(vdisk)
                    .map(|v| v.in_sync().filter(|n| n != dead && self.is_up(*n)).count())
                    .unwrap_or(0);
                if survivors == 0 {
                    return Err(conflict(format!(
                        "node {dead} may hold the only good copy of vdisk {vdisk}; it is kept"
                    )));
                }
                let record = self.vdisk_mut(*vdisk)?;
                if record.leaving == Some(*dead) {
                    // It was moving away anyway: its successor is placed.
                    record.replicas.retain(|r| r.node != *dead);
                    record.leaving = None;
                    return Ok(CommandResult::Done);
                }
                if record.has_replica_on(*new) {
                    return Err(conflict(format!(
                        "node {new} already holds a replica of {}",
                        record.name
                    )));
                }
                let name = record.name.clone();
                let replica = record
                    .replicas
                    .iter_mut()
                    .find(|r| r.node == *dead)
                    .ok_or_else(|| not_found(format!("node {dead} holds no replica of {name}")))?;
                *replica = Replica {
                    node: *new,
                    state: ReplicaState::Stale,
                    seq: replica.seq + 1,
                    lost: false,
                };
                Ok(CommandResult::Done)
            }
            Command::MoveReplica { vdisk, from, to } => {
                if !self.is_up(*to) {
                    return Err(conflict(format!("node {to} is not an up member")));
                }
                let record = self.vdisk_mut(*vdisk)?;
                let name = record.name.clone();
                let healthy = record.leaving.is_none()
                    && record.replicas.len() == usize::from(record.rf)
                    && record
                        .replicas
                        .iter()
                        .all(|r| r.state == ReplicaState::InSync);
                if !healthy {
                    return Err(conflict(format!(
                        "vdisk {name} is not healthy or already moving a replica"
                    )));
                }
                if !record.in_sync().any(|n| n == *from) {
                    return Err(not_found(format!(
                        "node {from} holds no in-sync replica of {name}"
                    )));
                }
                if record.has_replica_on(*to) {
                    return Err(conflict(format!(
                        "node {to} already holds a replica of {name}"
                    )));
                }
                record.replicas.push(Replica {
                    node: *to,
                    state: ReplicaState::Stale,
                    seq: 1,
                    lost: false,
                });
                record.leaving = Some(*from);
                Ok(CommandResult::Done)
            }
            Command::Vm { command } => self.apply_vm(command),
            Command::ResyncDone { vdisk, node, seq } => {
                let record = self.vdisk_mut(*vdisk)?;
                let name = record.name.clone();
                let replica = record
                    .replicas
                    .iter_mut()
                    .find(|r| r.node == *node)
                    .ok_or_else(|| not_found(format!("node {node} holds no replica of {name}")))?;
                if replica.seq != *seq {
                    return Err(conflict(format!(
                        "the replica of {name} on node {node} missed writes during the resync"
                    )));
                }
                replica.state = ReplicaState::InSync;
                // A move completes: the replica it replaces goes.
                if let Some(from) = record.leaving
                    && record.in_sync().filter(|n| *n != from).count() >= usize::from(record.rf)
                {
                    record.replicas.retain(|r| r.node != from);
                    record.leaving = None;
                }
                Ok(CommandResult::Done)
            }
        }
    }
}

/// Makes `node`'s replica stale (and `lost`, if so), raising its seq;
/// never the last in-sync replica: it may hold the only good data.
fn demote(record: &mut VdiskRecord, node: NodeId, lost: bool) -> Result<(), Refused> {
    let in_sync = record.in_sync().count();
    let name = record.name.clone();
    let replica = record
        .replicas
        .iter_mut()
        .find(|r| r.node == node)
        .ok_or_else(|| not_found(format!("node {node} holds no replica of {name}")))?;
    if replica.state == ReplicaState::InSync && in_sync <= 1 {
        return Err(conflict(format!(
            "node {node} holds the last in-sync replica of {name}; it is kept"
        )));
    }
    replica.state = ReplicaState::Stale;
    replica.seq += 1;
    replica.lost |= lost;
    Ok(())
}

fn validate_name(name: &str) -> Result<(), Refused> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid vdisk name {name:?}: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

fn validate_size(size: u64) -> Result<(), Refused> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(invalid(format!(
            "size must be a non-zero multiple of 4 KiB, not {size}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId) -> NodeRecord {
        NodeRecord {
            id,
            uuid: Uuid::new_v4(),
            listen: format!("127.0.0.1:{}", 7000 + id),
            api: String::new(),
            nbd: String::new(),
            joined: 0,
            state: NodeState::Up,
        }
    }

    fn bootstrapped(nodes: u64) -> ClusterState {
        let mut state = ClusterState::default();
        assert_eq!(
            state.apply(&Command::Bootstrap {
                cluster_id: Uuid::new_v4()
            }),
            CommandResult::Done
        );
        for id in 1..=nodes {
            assert_eq!(
                state.apply(&Command::AddNode { node: node(id) }),
                CommandResult::Done
            );
        }
        state
    }

    fn create(name: &str, size: u64, rf: u8) -> Command {
        Command::CreateVdisk {
            name: name.into(),
            size,
            rf,
            created: 0,
            preferred: None,
        }
    }

    /// A 1 MiB vdisk created through node `preferred`.
    fn with_preference(name: &str, rf: u8, preferred: NodeId) -> Command {
        Command::CreateVdisk {
            name: name.into(),
            size: 1 << 20,
            rf,
            created: 0,
            preferred: Some(preferred),
        }
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut state = bootstrapped(2);
        assert_eq!(state.apply(&create("a", 1 << 20, 2)), CommandResult::Id(1));
        let before = state.clone();
        for bad in [
            create("a", 1 << 20, 1),
            create("b", 0, 1),
            create("b", 1000, 1),
            create("b", 1 << 20, 3),
            create("b", 1 << 20, 0),
            create("../x", 1 << 20, 1),
            create("", 1 << 20, 1),
            Command::ResizeVdisk {
                name: "a".into(),
                size: 4096,
            },
            Command::ResizeVdisk {
                name: "zz".into(),
                size: 1 << 30,
            },
            Command::DeleteVdisk { name: "zz".into() },
            Command::AcquireVdisk {
                name: "a".into(),
                node: 9,
            },
            Command::AddNode { node: node(1) },
            Command::Bootstrap {
                cluster_id: Uuid::new_v4(),
            },
        ] {
            let result = state.apply(&bad);
            assert!(
                matches!(result, CommandResult::Refused { .. }),
                "{bad:?} gave {result:?}"
            );
            assert_eq!(state, before, "{bad:?} changed the state");
        }
    }

    #[test]
    fn epochs_rise_with_every_acquisition_and_ids_are_never_reused() {
        let mut state = bootstrapped(3);
        assert_eq!(state.apply(&create("a", 1 << 20, 3)), CommandResult::Id(1));
        for (round, owner) in [1, 2, 1, 3].into_iter().enumerate() {
            let result = state.apply(&Command::AcquireVdisk {
                name: "a".into(),
                node: owner,
            });
            assert_eq!(result, CommandResult::Epoch(round as u64 + 1));
            assert_eq!(state.vdisk_by_name("a").and_then(|v| v.owner), Some(owner));
        }
        assert_eq!(
            state.apply(&Command::DeleteVdisk { name: "a".into() }),
            CommandResult::Done
        );
        assert_eq!(state.apply(&create("a", 1 << 20, 1)), CommandResult::Id(2));
        assert_eq!(state.next_node_id(), 4);
    }

    #[test]
    fn replicas_go_to_distinct_up_nodes_starting_with_the_preferred_one() {
        let mut state = bootstrapped(3);
        assert_eq!(
            state.apply(&with_preference("a", 2, 3)),
            CommandResult::Id(1)
        );
        let nodes = |state: &ClusterState, name: &str| -> Vec<NodeId> {
            state
                .vdisk_by_name(name)
                .map(|v| v.replicas.iter().map(|r| r.node).collect())
                .unwrap_or_default()
        };
        assert_eq!(nodes(&state, "a"), vec![3, 1]);
        // The least loaded node comes next: node 2 holds nothing yet.
        assert_eq!(
            state.apply(&with_preference("b", 2, 1)),
            CommandResult::Id(2)
        );
        assert_eq!(nodes(&state, "b"), vec![1, 2]);
        // A down node gets no replicas; rf beyond the up nodes is refused.
        state.apply(&Command::SetNodeState {
            node: 2,
            state: NodeState::Down,
        });
        assert_eq!(
            state.apply(&with_preference("c", 2, 2)),
            CommandResult::Id(3)
        );
        assert!(!nodes(&state, "c").contains(&2));
        assert!(matches!(
            state.apply(&with_preference("d", 3, 1)),
            CommandResult::Refused {
                kind: Refusal::Invalid,
                ..
            }
        ));
    }

    #[test]
    fn only_the_current_epoch_marks_replicas_stale_and_never_the_last_one() {
        let mut state = bootstrapped(2);
        assert_eq!(state.apply(&create("a", 1 << 20, 2)), CommandResult::Id(1));
        let acquire = |node| Command::AcquireVdisk {
            name: "a".into(),
            node,
        };
        assert_eq!(state.apply(&acquire(1)), CommandResult::Epoch(1));
        assert_eq!(state.apply(&acquire(2)), CommandResult::Epoch(2));
        let stale = |node, epoch| Command::MarkStale {
            vdisk: 1,
            node,
            epoch,
        };
        // The fenced owner (epoch 1) cannot exclude the new owner's replica.
        assert!(matches!(
            state.apply(&stale(2, 1)),
            CommandResult::Refused {
                kind: Refusal::Conflict,
                ..
            }
        ));
        assert_eq!(state.apply(&stale(1, 2)), CommandResult::Done);
        assert_eq!(
            state
                .vdisk_by_name("a")
                .map(|v| v.in_sync().collect::<Vec<_>>()),
            Some(vec![2])
        );
        assert!(matches!(
            state.apply(&stale(2, 2)),
            CommandResult::Refused {
                kind: Refusal::Conflict,
                ..
            }
        ));
    }

    #[test]
    fn the_only_good_copy_is_never_replaced() {
        let mut state = bootstrapped(3);
        assert_eq!(
            state.apply(&with_preference("one", 1, 1)),
            CommandResult::Id(1)
        );
        assert_eq!(
            state.apply(&with_preference("two", 2, 1)),
            CommandResult::Id(2)
        );
        state.apply(&Command::SetNodeState {
            node: 1,
            state: NodeState::Down,
        });
        let before = state.clone();
        let spare = |v: u64| state.replacement_candidate(&state.vdisks[&v]).unwrap_or(0);
        let (one_spare, two_spare) = (spare(1), spare(2));
        // RF1 on a down node: its copy stays placed, waiting for the node.
        assert!(matches!(
            state.apply(&Command::ReplaceReplica {
                vdisk: 1,
                dead: 1,
                new: one_spare,
            }),
            CommandResult::Refused { .. }
        ));
        assert_eq!(state, before);
        // RF2 with the other copy on an up node: moved.
        assert_eq!(
            state.apply(&Command::ReplaceReplica {
                vdisk: 2,
                dead: 1,
                new: two_spare,
            }),
            CommandResult::Done
        );
        // Now both of its nodes are down except the stale new one: the
        // remaining in-sync copy is not replaced either.
        let other = state.vdisks[&2].in_sync().next().unwrap_or(0);
        state.apply(&Command::SetNodeState {
            node: other,
            state: NodeState::Down,
        });
        state.apply(&Command::SetNodeState {
            node: 1,
            state: NodeState::Up,
        });
        let third = (1..=3)
            .find(|n| !state.vdisks[&2].has_replica_on(*n))
            .unwrap_or(0);
        assert!(state.is_up(third));
        assert!(matches!(
            state.apply(&Command::ReplaceReplica {
                vdisk: 2,
                dead: other,
                new: third,
            }),
            CommandResult::Refused { .. }
        ));
    }

    #[test]
    fn a_down_nodes_replica_is_replaced_and_a_resync_completes_only_if_nothing_was_missed() {
        let mut state = bootstrapped(3);
        assert_eq!(state.apply(&create("a", 1 << 20, 2)), CommandResult::Id(1));
        let holders: Vec<NodeId> = state.vdisks[&1].replicas.iter().map(|r| r.node).collect();
        let spare = (1..=3).find(|n| !holders.contains(n)).unwrap_or(0);
        let replace = Command::ReplaceReplica {
            vdisk: 1,
            dead: holders[1],
            new: spare,
        };
        assert!(
            matches!(state.apply(&replace), CommandResult::Refused { .. }),
            "an up node's replica stays"
        );
        state.apply(&Command::SetNodeState {
            node: holders[1],
            state: NodeState::Down,
        });
        assert_eq!(state.apply(&replace), CommandResult::Done);
        let new = state.vdisks[&1].replicas[1];
        assert_eq!((new.node, new.state), (spare, ReplicaState::Stale));
        // It missed a write during the resync: the resync's end is refused.
        state.apply(&Command::AcquireVdisk {
            name: "a".into(),
            node: holders[0],
        });
        let done = Command::ResyncDone {
            vdisk: 1,
            node: spare,
            seq: new.seq,
        };
        state.apply(&Command::MarkStale {
            vdisk: 1,
            node: spare,
            epoch: 1,
        });
        assert!(matches!(state.apply(&done), CommandResult::Refused { .. }));
        let seq = state.vdisks[&1].replicas[1].seq;
        assert_eq!(
            state.apply(&Command::ResyncDone {
                vdisk: 1,
                node: spare,
                seq
            }),
            CommandResult::Done
        );
        assert_eq!(state.vdisks[&1].in_sync().count(), 2);
    }

    #[test]
    fn rebalance_spreads_replicas_onto_joined_nodes_and_ends() {
        let mut state = bootstrapped(1);
        for (i, rf) in [(1u64, 1u8), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)] {
            state.apply(&Command::CreateVdisk {
                name: format!("v{i}"),
                size: (i % 3 + 1) << 30,
                rf,
                created: 0,
                preferred: Some(1),
            });
        }
        assert_eq!(state.rebalance_move(), None, "one node: nothing to do");
        for id in 2..=3 {
            state.apply(&Command::AddNode { node: node(id) });
        }
        let total: u64 = state.load().values().sum();
        let mut moves = 0;
        while let Some(command) = state.rebalance_move() {
            let Command::MoveReplica { vdisk, to, .. } = command else {
                panic!("not a move: {command:?}");
            };
            assert_eq!(state.apply(&command), CommandResult::Done);
            // Nothing else moves while one is under way.
            assert_eq!(state.rebalance_move(), None);
            assert_eq!(state.vdisks[&vdisk].replicas.len(), 2);
            assert_eq!(
                state.apply(&Command::ResyncDone {
                    vdisk,
                    node: to,
                    seq: 1
                }),
                CommandResult::Done
            );
            let record = &state.vdisks[&vdisk];
            assert_eq!(record.replicas.len(), 1, "the old replica went");
            assert_eq!(record.in_sync().collect::<Vec<_>>(), vec![to]);
            assert_eq!(record.leaving, None);
            moves += 1;
            assert!(moves < 20, "rebalance does not end");
        }
        assert!(moves >= 2, "only {moves} moves");
        let load = state.load();
        assert_eq!(load.values().sum::<u64>(), total, "no data lost or doubled");
        let spread = load.values().max().unwrap_or(&0) - load.values().min().unwrap_or(&0);
        assert!(spread <= 3 << 30, "still unbalanced: {load:?}");
        assert!(
            load.values().all(|b| *b > 0),
            "a node got nothing: {load:?}"
        );
    }

    #[test]
    fn moves_are_refused_unless_healthy_and_a_leaving_node_that_dies_is_just_dropped() {
        let mut state = bootstrapped(3);
        state.apply(&with_preference("a", 2, 1));
        let replicas: Vec<NodeId> = state.vdisks[&1].replicas.iter().map(|r| r.node).collect();
        assert_eq!(replicas, vec![1, 2]);
        let before = state.clone();
        for bad in [
            Command::MoveReplica {
                vdisk: 1,
                from: 3,
                to: 2,
            },
            Command::MoveReplica {
                vdisk: 1,
                from: 1,
                to: 2,
            },
            Command::MoveReplica {
                vdisk: 1,
                from: 1,
                to: 9,
            },
            Command::MoveReplica {
                vdisk: 9,
                from: 1,
                to: 3,
            },
        ] {
            assert!(
                matches!(state.apply(&bad), CommandResult::Refused { .. }),
                "{bad:?} was applied"
            );
        }
        assert_eq!(state, before);
        let ok = Command::MoveReplica {
            vdisk: 1,
            from: 1,
            to: 3,
        };
        assert_eq!(state.apply(&ok), CommandResult::Done);
        assert!(
            matches!(
                state.apply(&Command::MoveReplica {
                    vdisk: 1,
                    from: 2,
                    to: 3
                }),
                CommandResult::Refused { .. }
            ),
            "two moves at once"
        );
        // The leaving node dies before the move completes: its replica is
        // dropped, not replaced, since node 3's is on its way.
        state.apply(&Command::SetNodeState {
            node: 1,
            state: NodeState::Down,
        });
        assert_eq!(
            state.apply(&Command::ReplaceReplica {
                vdisk: 1,
                dead: 1,
                new: 3
            }),
            CommandResult::Done
        );
        let record = &state.vdisks[&1];
        assert_eq!(record.leaving, None);
        assert_eq!(
            record
                .replicas
                .iter()
                .map(|r| (r.node, r.state))
                .collect::<Vec<_>>(),
            vec![(2, ReplicaState::InSync), (3, ReplicaState::Stale)]
        );
    }

    #[test]
    fn a_member_moves_to_a_free_address_only() {
        let mut state = bootstrapped(2);
        let taken = state.nodes[&1].listen.clone();
        let before = state.clone();
        for bad in [
            Command::SetNodeAddress {
                node: 2,
                listen: taken,
                api: String::new(),
                nbd: String::new(),
            },
            Command::SetNodeAddress {
                node: 9,
                listen: "127.0.0.1:1".into(),
                api: String::new(),
                nbd: String::new(),
            },
        ] {
            assert!(matches!(state.apply(&bad), CommandResult::Refused { .. }));
        }
        assert_eq!(state, before);
        let moved = Command::SetNodeAddress {
            node: 2,
            listen: "127.0.0.1:9".into(),
            api: "127.0.0.1:10".into(),
            nbd: "127.0.0.1:11".into(),
        };
        assert_eq!(state.apply(&moved), CommandResult::Done);
        assert_eq!(state.nodes[&2].listen, "127.0.0.1:9");
        assert_eq!(state.nodes[&2].nbd, "127.0.0.1:11");
    }
}

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
    /// Defines a vdisk.
    CreateVdisk {
        /// Name.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Replication factor.
        rf: u8,
        /// Creation time, unix seconds.
        created: u64,
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
    Refused(String),
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
}

/// Largest replication factor.
pub const MAX_RF: u8 = 3;

impl ClusterState {
    /// The vdisk called `name`.
    pub fn vdisk_by_name(&self, name: &str) -> Option<&VdiskRecord> {
        self.vdisks.values().find(|vdisk| vdisk.name == name)
    }

    fn vdisk_id(&self, name: &str) -> Result<u64, String> {
        self.vdisk_by_name(name)
            .map(|vdisk| vdisk.id)
            .ok_or_else(|| format!("no vdisk named {name:?}"))
    }

    /// The next free node id (ids start at 1 and are never reused).
    pub fn next_node_id(&self) -> NodeId {
        self.nodes.keys().next_back().map_or(1, |last| last + 1)
    }

    /// Applies one command; a refusal changes nothing.
    pub fn apply(&mut self, command: &Command) -> CommandResult {
        match self.try_apply(command) {
            Ok(result) => result,
            Err(reason) => CommandResult::Refused(reason),
        }
    }

    fn try_apply(&mut self, command: &Command) -> Result<CommandResult, String> {
        match command {
            Command::Bootstrap { cluster_id } => {
                if !self.cluster_id.is_nil() {
                    return Err(format!(
                        "cluster {} is already bootstrapped",
                        self.cluster_id
                    ));
                }
                self.cluster_id = *cluster_id;
                if self.next_vdisk_id == 0 {
                    self.next_vdisk_id = 1;
                }
                Ok(CommandResult::Done)
            }
            Command::AddNode { node } => {
                if node.id == 0 {
                    return Err("node id 0 is reserved".into());
                }
                if self.nodes.contains_key(&node.id) {
                    return Err(format!("node id {} is taken", node.id));
                }
                if let Some(existing) = self.nodes.values().find(|n| n.uuid == node.uuid) {
                    return Err(format!(
                        "node {} is already a member as node {}",
                        node.uuid, existing.id
                    ));
                }
                if let Some(existing) = self.nodes.values().find(|n| n.listen == node.listen) {
                    return Err(format!(
                        "address {} is already used by node {}",
                        node.listen, existing.id
                    ));
                }
                self.nodes.insert(node.id, node.clone());
                Ok(CommandResult::Done)
            }
            Command::SetNodeState { node, state } => {
                let record = self
                    .nodes
                    .get_mut(node)
                    .ok_or_else(|| format!("no node {node}"))?;
                record.state = *state;
                Ok(CommandResult::Done)
            }
            Command::CreateVdisk {
                name,
                size,
                rf,
                created,
            } => {
                validate_name(name)?;
                if self.vdisk_by_name(name).is_some() {
                    return Err(format!("a vdisk named {name:?} already exists"));
                }
                validate_size(*size)?;
                if *rf == 0 || *rf > MAX_RF {
                    return Err(format!(
                        "replication factor must be 1 to {MAX_RF}, not {rf}"
                    ));
                }
                let members = self.nodes.len();
                if usize::from(*rf) > members {
                    return Err(format!(
                        "replication factor {rf} needs {rf} nodes; the cluster has {members}"
                    ));
                }
                let id = self.next_vdisk_id.max(1);
                self.next_vdisk_id = id + 1;
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
                    },
                );
                Ok(CommandResult::Id(id))
            }
            Command::ResizeVdisk { name, size } => {
                let id = self.vdisk_id(name)?;
                validate_size(*size)?;
                let vdisk = self.vdisks.get_mut(&id).ok_or("vdisk vanished")?;
                if *size < vdisk.size {
                    return Err(format!(
                        "cannot shrink {name:?} from {} to {size} bytes",
                        vdisk.size
                    ));
                }
                vdisk.size = *size;
                Ok(CommandResult::Done)
            }
            Command::DeleteVdisk { name } => {
                let id = self.vdisk_id(name)?;
                self.vdisks.remove(&id);
                Ok(CommandResult::Done)
            }
            Command::AcquireVdisk { name, node } => {
                let id = self.vdisk_id(name)?;
                if !self.nodes.contains_key(node) {
                    return Err(format!("no node {node}"));
                }
                let vdisk = self.vdisks.get_mut(&id).ok_or("vdisk vanished")?;
                vdisk.epoch += 1;
                vdisk.owner = Some(*node);
                Ok(CommandResult::Epoch(vdisk.epoch))
            }
        }
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid vdisk name {name:?}: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

fn validate_size(size: u64) -> Result<(), String> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(format!(
            "size must be a non-zero multiple of 4 KiB, not {size}"
        ));
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
                matches!(result, CommandResult::Refused(_)),
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
}

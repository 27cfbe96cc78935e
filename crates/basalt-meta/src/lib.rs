//! Basalt's cluster metadata: one Raft group, through openraft.
//!
//! What every node must agree on — members, vdisk definitions, ownership
//! epochs, replica placement — is a [`ClusterState`] replicated by Raft. Raft
//! is never on the write path: the state changes when vdisks are created,
//! acquired or resized, when nodes come and go and when placement moves, not
//! when a guest writes.
//!
//! * [`state`]: the state and the commands that change it, validated
//!   deterministically as they are applied.
//! * [`storage`]: the Raft log and vote in redb, the state machine in memory
//!   with snapshots in a file.
//! * [`network`]: Raft RPCs as control-class frames of `basalt-net`.
//!
//! The storage implementation passes openraft's own conformance suite
//! (`tests/conformance.rs`).

pub mod cluster;
pub mod network;
pub mod state;
pub mod storage;
pub mod vm;

/// Replaces the file at `path` with `bytes` so that a crash leaves either
/// the old or the new contents, never a mix, and the new contents are
/// durable when it returns: written to a temporary file next to it, synced,
/// renamed over it, and the directory synced.
pub fn replace_file_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = parent_dir(path);
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(".tmp");
    let temp = dir.join(temp_name);
    {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes the file at `path` (already gone is fine) so that the removal
/// is durable when it returns: the directory is synced.
pub fn remove_file_durably(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => std::fs::File::open(parent_dir(path))?.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &std::path::Path) -> &std::path::Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    }
}

pub use cluster::{
    Membership, MetaConfig, MetaNode, NodeAnnouncement, SERVICE_META, read_membership,
};
pub use state::{
    ClusterState, Command, CommandResult, NodeId, NodeRecord, NodeState, Refusal, Replica,
    ReplicaState, VdiskRecord,
};
pub use vm::{
    NodeResources, StoredFile, VmBoot, VmCommand, VmDesired, VmMigration, VmRecord, VmRunState,
    VmSpec,
};

/// What Raft knows of a node: its node-to-node address.
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// Basalt's Raft types.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A running Raft node of Basalt's metadata group.
pub type Raft = openraft::Raft<TypeConfig>;

/// Errors of the metadata layer.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The Raft log or snapshot storage failed.
    #[error("metadata storage: {0}")]
    Storage(String),
    /// A file operation failed.
    #[error("metadata storage: {0}")]
    Io(#[from] std::io::Error),
    /// Raft itself failed.
    #[error("raft: {0}")]
    Raft(String),
    /// Talking to a peer failed.
    #[error(transparent)]
    Net(#[from] basalt_net::NetError),
}

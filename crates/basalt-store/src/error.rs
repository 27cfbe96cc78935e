//! Errors of the local store.

use std::path::PathBuf;

use basalt_disk::DiskError;

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A disk operation failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The node-local metadata database failed.
    #[error("metadata database: {0}")]
    Catalog(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A disk carries a label of another node.
    #[error(
        "disk {path} belongs to node {owner} (this node is {node}); refusing to claim it without --force-claim"
    )]
    ForeignDisk {
        /// The disk.
        path: PathBuf,
        /// The node named in its label.
        owner: uuid::Uuid,
        /// This node.
        node: uuid::Uuid,
    },
    /// A disk's label or log could not be understood.
    #[error("disk {path}: {reason}")]
    BadDisk {
        /// The disk.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The oplog of a disk lost records that had been made durable.
    #[error("disk {path}: oplog damaged: {reason}")]
    LogCorrupt {
        /// The disk.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// No vdisk has this name or id.
    #[error("no vdisk named {0:?}")]
    NoSuchVdisk(String),
    /// A vdisk with this name exists.
    #[error("a vdisk named {0:?} already exists")]
    VdiskExists(String),
    /// A vdisk name is not acceptable.
    #[error(
        "invalid vdisk name {0:?}: use 1 to 64 characters from letters, digits, '-', '_' and '.', starting with a letter or digit"
    )]
    BadName(String),
    /// A size is not acceptable.
    #[error("invalid size: {0}")]
    BadSize(String),
    /// A request reaches past the end of a vdisk.
    #[error(
        "request of {blocks} blocks at block {first} is past the end of vdisk {vdisk} ({size_blocks} blocks)"
    )]
    OutOfRange {
        /// Vdisk id.
        vdisk: u64,
        /// First block.
        first: u64,
        /// Block count.
        blocks: u64,
        /// Vdisk size in blocks.
        size_blocks: u64,
    },
    /// Every slot of the disks is in use.
    #[error("no free space left on the node's disks")]
    NoSpace,
    /// Stored data failed its checksum.
    #[error("checksum mismatch in vdisk {vdisk} block {block}")]
    Checksum {
        /// Vdisk id.
        vdisk: u64,
        /// Block number within the vdisk.
        block: u64,
    },
    /// The disk holding the data has failed.
    #[error("disk {0} has failed: {1}")]
    DiskFailed(String, String),
    /// Another process (another basaltd) has the data directory open.
    #[error("data directory {0} is in use by another basaltd")]
    DataDirInUse(PathBuf),
    /// The bytes of a streamed write could not be taken from their source;
    /// nothing was written.
    #[error("the data to write could not be read from its source: {0}")]
    Source(#[source] basalt_core::BlockError),
    /// The store is shutting down.
    #[error("the store is shutting down")]
    ShuttingDown,
}

macro_rules! catalog_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Catalog(Box::new(e))
            }
        }
    )*};
}
catalog_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

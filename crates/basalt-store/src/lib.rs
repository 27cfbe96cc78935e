//! Basalt's local store: thin-provisioned, checksummed vdisks on a node's disks.
//!
//! A vdisk's address space is cut into 1 MiB *extents*; each extent that has
//! ever been written lives in a *slot* on one of the node's disks. Every 4 KiB
//! block carries a crc32c and a write generation, verified on every read: a
//! mismatch is an I/O error, never wrong data.
//!
//! Small writes go to a per-disk write log (the *oplog*) in one sequential
//! I/O with their checksums and are written home in the background; whole
//! extent writes go straight to a fresh slot (copy-on-write). Either way a
//! crash leaves each block old or new. See [`format`] for the bytes on disk,
//! `store` for the data paths, `log` for group commit and replay, and `drain`
//! for how data moves home and the catalog is checkpointed.
//!
//! The store knows nothing of protocols, clusters or HTTP; it receives plain
//! vdisk ids and block numbers.

pub mod catalog;
mod crc;
mod drain;
mod error;
pub mod format;
mod log;
mod state;
mod store;

pub use error::StoreError;
pub use store::{
    DEFAULT_DISK_BYTES, DiskInfo, DiskSpec, OpenedDisk, Store, StoreConfig, StoreStats, VdiskInfo,
};
#[doc(hidden)]
pub use store::{free_slots_for_tests, overlay_bytes_for_tests, uncheckpointed_batches_for_tests};

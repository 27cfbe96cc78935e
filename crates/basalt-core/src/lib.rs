//! Shared vocabulary of Basalt's data plane.
//!
//! Frontends (NBD, vhost-user-blk) and the vdisk controller meet at one narrow
//! interface, [`BlockBackend`]: a sized block address space with read, write,
//! flush, trim, write-zeroes and allocation status. Keeping that interface in a
//! crate of its own lets each frontend be built and tested against a fake
//! backend, and lets the controller change (replication, QoS) without touching
//! protocol code.
//!
//! Buffers are [`IoBuf`]s: heap memory aligned to [`IO_ALIGN`] so that the
//! bytes a frontend receives can go to an `O_DIRECT` disk without a copy.

mod backend;
mod buf;
mod error;
pub mod size;

pub use backend::{
    AllocationExtent, BlockBackend, BoxFuture, ExportRegistry, WriteFlags, WriteSource,
    check_range, check_request_len, gather_source, whole_blocks,
};
pub use buf::IoBuf;
pub use error::BlockError;

/// The logical block size of every vdisk: the unit of checksums and generations.
pub const BLOCK_SIZE: u64 = 4096;

/// Alignment of every [`IoBuf`], sufficient for `O_DIRECT` on 512- and 4096-byte devices.
pub const IO_ALIGN: usize = 4096;

/// The largest single request a frontend accepts (and advertises), in bytes.
pub const MAX_REQUEST_BYTES: u32 = 32 * 1024 * 1024;

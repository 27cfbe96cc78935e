//! vhost-user-blk: Basalt's fast path from a VM's virtqueues to a vdisk.
//!
//! QEMU (the vhost-user *frontend*) shares the guest's memory and virtqueues
//! with basaltd over a unix socket; the guest's virtio-blk requests are then
//! read straight out of guest memory by basaltd and answered there, with QEMU
//! out of the I/O path. One [`VhostBlkExport`] serves one vdisk on one socket:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(backend: Arc<dyn basalt_core::BlockBackend>, rt: tokio::runtime::Handle)
//! #     -> Result<(), basalt_vhost::VhostError> {
//! use basalt_vhost::{VhostBlkExport, VhostBlkOptions};
//!
//! let export = VhostBlkExport::start(
//!     "/run/basalt/vd-1.sock",
//!     backend,
//!     rt,
//!     VhostBlkOptions::default(),
//! )?;
//! // qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \
//! //   -numa node,memdev=mem -chardev socket,id=vd1,path=/run/basalt/vd-1.sock \
//! //   -device vhost-user-blk-pci,chardev=vd1,num-queues=2
//! export.stop();
//! # Ok(()) }
//! ```
//!
//! Modules:
//! * [`request`]: pure parsing of virtio-blk requests (no guest memory access),
//!   the part that faces the guest and is unit-tested and fuzzable.
//! * [`config`]: feature bits and the virtio-blk configuration space.
//! * `device`: the `vhost_user_backend::VhostUserBackend` of one connection:
//!   queue processing, concurrency, completion, draining.
//! * `export`: the socket, one connection after another.
//! * `cache`: the guest's write-cache choice, which outlives a connection.
//!
//! See `docs/vhost-user-blk.md` for the features offered, the threading model
//! and what is missing.

mod cache;
pub mod config;
mod device;
mod error;
mod export;
pub mod request;

pub use cache::{WriteCache, WriteCacheKeeper};
pub use error::VhostError;
pub use export::{ExportStats, VhostBlkExport, VhostBlkOptions};

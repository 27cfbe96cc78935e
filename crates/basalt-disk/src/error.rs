//! Errors of disk engines.

use std::path::PathBuf;

/// A failed disk operation.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The operating system reported an error for an I/O.
    #[error("disk I/O failed at offset {offset}: {source}")]
    Io {
        /// Byte offset of the failed I/O.
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The disk ran out of space (a sparse file on a full filesystem).
    #[error("no space left on the disk's filesystem at offset {offset}")]
    NoSpace {
        /// Byte offset of the failed write.
        offset: u64,
    },
    /// A transfer reached past the end of the disk.
    #[error("I/O at offset {offset} of {len} bytes is past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// An offset or length was not aligned as engines require.
    #[error("unaligned disk I/O at offset {offset} with a segment of {len} bytes")]
    Unaligned {
        /// Byte offset.
        offset: u64,
        /// Offending segment length (0 when the offset is the problem).
        len: usize,
    },
    /// Opening or claiming a disk failed.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The disk's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the disk.
    #[error("disk {0} is in use by another process")]
    InUse(PathBuf),
    /// The disk's size is not usable.
    #[error("disk {path} has an unusable size of {size} bytes: {reason}")]
    BadSize {
        /// The disk's path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The engine's worker is gone (the disk was closed).
    #[error("the disk engine has shut down")]
    EngineGone,
    /// Setting up io_uring failed.
    #[error("io_uring setup failed: {0}")]
    Uring(#[source] std::io::Error),
}

impl DiskError {
    /// Builds an [`DiskError::Io`] or [`DiskError::NoSpace`] from an OS error.
    pub fn from_io(offset: u64, source: std::io::Error) -> DiskError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            DiskError::NoSpace { offset }
        } else {
            DiskError::Io { offset, source }
        }
    }
}

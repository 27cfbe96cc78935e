//! Errors a block backend reports to a frontend.

/// Why a block request failed. Each variant maps to the errno a block protocol
/// carries back to its client (NBD error values and virtio-blk status).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlockError {
    /// Stored data failed its checksum or the disk reported an error.
    #[error("I/O error: {0}")]
    Io(String),
    /// The request reaches past the end of the device.
    #[error("request out of range: offset {offset} length {len} on a device of {size} bytes")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the device in bytes.
        size: u64,
    },
    /// No space is left on the disks that back this device.
    #[error("no space left on the disks backing this vdisk")]
    NoSpace,
    /// The request is malformed (length, alignment or flags).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The operation is not supported by this backend.
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// The backend is shutting down or was detached.
    #[error("device is shutting down")]
    Shutdown,
}

impl BlockError {
    /// The POSIX errno value used by NBD replies for this error.
    pub fn errno(&self) -> u32 {
        match self {
            BlockError::Io(_) => 5,              // EIO
            BlockError::OutOfRange { .. } => 22, // EINVAL (NBD spec: out of range is EINVAL or ENOSPC)
            BlockError::NoSpace => 28,           // ENOSPC
            BlockError::Invalid(_) => 22,        // EINVAL
            BlockError::NotSupported(_) => 95,   // ENOTSUP
            BlockError::Shutdown => 108,         // ESHUTDOWN
        }
    }
}

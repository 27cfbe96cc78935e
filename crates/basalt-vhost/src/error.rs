//! Errors of the vhost-user-blk export.

use std::path::PathBuf;

/// Why an export could not be started or served.
///
/// Guest mistakes (malformed descriptor chains, requests past the end of the
/// disk) are never errors of this type: they are answered with a virtio-blk
/// status to the guest and the export keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    /// The export options are inconsistent.
    #[error("invalid vhost-user-blk options: {0}")]
    InvalidOptions(String),
    /// Something other than a stale socket occupies the socket path.
    #[error("socket path {0} exists and is not a unix socket")]
    PathInUse(PathBuf),
    /// Another process is listening on the socket path.
    #[error("socket path {0} is already served by another process")]
    SocketBusy(PathBuf),
    /// Binding or preparing the listening socket failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Creating an event file descriptor failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Starting the export's thread failed.
    #[error("cannot start the vhost-user-blk thread")]
    Thread(#[source] std::io::Error),
    /// The vhost-user daemon of one connection could not be created or run.
    /// (`vhost_user_backend::Error` does not implement `std::error::Error`,
    /// so its text is kept instead of the value.)
    #[error("vhost-user daemon error: {0}")]
    Daemon(String),
}

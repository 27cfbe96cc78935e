//! Why a connection (or the server) stopped.
//!
//! These errors end one client's connection; the server logs them and keeps
//! serving everyone else. Errors of individual requests never appear here:
//! they travel back to the client as NBD error values.

use crate::proto::ProtoError;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Reading from or writing to the client failed (including the client
    /// closing the connection during the handshake).
    #[error("client connection I/O failed")]
    Io(#[from] std::io::Error),
    /// The client closed the connection or stalled in the middle of a request.
    #[error("client connection ended in the middle of a request")]
    Truncated(#[source] std::io::Error),
    /// The client sent bytes that break the protocol (bad magic, unknown flags).
    #[error("client broke the NBD protocol")]
    Protocol(#[from] ProtoError),
    /// The client sent an option larger than the server reads.
    #[error("option {option} carries {length} bytes, more than the server accepts")]
    OptionTooLarge {
        /// Option code.
        option: u32,
        /// Announced payload length.
        length: u32,
    },
    /// The client sent a request the server cannot skip over safely.
    #[error("unrecoverable request: {0}")]
    Fatal(&'static str),
    /// The client did not finish the handshake in time.
    #[error("client did not finish the handshake in time")]
    HandshakeTimeout,
}

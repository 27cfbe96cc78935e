//! Basalt's node-to-node transport.
//!
//! Nodes of a cluster talk over TCP with Basalt's own protocol: a fixed
//! handshake (versions, cluster id, node id) and then checksummed frames, each
//! a request, a reply or an error, each tagged with a traffic class. The
//! protocol is deliberately Basalt's own rather than gRPC or HTTP/2 because
//! the data path needs things those do not give: bulk data that is never
//! re-encoded, per-class scheduling of one connection's send queue, and a
//! layout simple enough to document byte by byte (`docs/cluster-protocol.md`).
//!
//! The transport knows nothing of Raft, replication or vdisks: layers above
//! register [`Handler`]s under service numbers and encode their own messages
//! into frame bodies. It therefore sits beside the data plane, not above it.
//!
//! TLS can later wrap the stream after the handshake's TCP connect without
//! changing frames; the handshake would then carry a flag announcing it.

mod frame;
mod handshake;
mod sched;
mod transport;

pub use frame::{
    FRAME_MAGIC, Frame, FrameKind, HEADER_BYTES, MAX_BODY_BYTES, MAX_DATA_BYTES, TrafficClass,
    decode_header, read_frame,
};
pub use handshake::{
    HANDSHAKE_BYTES, HANDSHAKE_MAGIC, Hello, PROTOCOL_VERSION, Welcome, WelcomeStatus,
};
pub use sched::{ClassQueues, ClassWeights};
pub use transport::{
    Handler, Identity, Incoming, MAX_IN_FLIGHT_PER_CONNECTION, PeerInfo, RemoteError, Reply,
    TrafficCounters, Transport, TransportConfig,
};

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A socket operation failed.
    #[error("peer connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not valid Basalt protocol.
    #[error("malformed peer traffic: {0}")]
    Malformed(String),
    /// A frame part exceeds the protocol's limit.
    #[error("{what} of {bytes} bytes exceeds the protocol limit")]
    TooLarge {
        /// Which part.
        what: &'static str,
        /// Its size.
        bytes: u64,
    },
    /// The peer refused the handshake.
    #[error("peer refused the connection: {reason}")]
    Refused {
        /// Why, as a status.
        status: WelcomeStatus,
        /// Why, in the peer's words.
        reason: String,
    },
    /// No connection could be made.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection closed before the reply arrived.
    #[error("peer connection lost")]
    Disconnected,
    /// No reply in time.
    #[error("peer did not answer in time")]
    Timeout,
    /// The peer handled the request and failed it.
    #[error("peer: {0}")]
    Remote(#[from] RemoteError),
}

//! Basalt's control plane on one node: the node service, the REST API with
//! its OpenAPI document, Prometheus metrics and the web console.
//!
//! The data plane (store, vdisk controller, frontends) knows nothing of this
//! crate; this crate composes them and exposes management.

pub mod api;
pub mod cluster;
mod hand_exports;
pub mod metrics;
pub mod node;
pub mod resync;
pub mod vms;

pub use node::{Node, NodeConfig};

/// Why a management operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] basalt_store::StoreError),
    /// A vhost-user export could not be set up.
    #[error(transparent)]
    Vhost(#[from] basalt_vhost::VhostError),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The operation conflicts with current use.
    #[error("{0}")]
    Busy(String),
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The cluster could not agree on the change (no leader, no quorum...).
    #[error("cluster: {0}")]
    Cluster(String),
    /// Something that should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

//! Basalt's replication data path.
//!
//! A replicated vdisk has one *owner* — the node serving it to a client —
//! and `rf` replicas on distinct nodes, each a full copy in that node's local
//! store under the vdisk's cluster-wide id. The owner sends every mutation to
//! every in-sync replica in parallel ([`ReplicatedVdisk`]); replicas serve
//! them through the [`ReplicaService`], refusing any owner whose epoch has
//! been superseded ([`EpochTable`]).
//!
//! This crate is data plane: it knows the transport and the block interface,
//! not Raft. What needs the cluster's agreement — taking ownership under a
//! new epoch, recording a replica stale — is asked of a [`Coordinator`] the
//! control plane provides.

mod backend;
pub mod dirty;
mod protocol;
mod service;

pub use backend::{Acquired, Coordinator, ReplicaSet, ReplicaTarget, ReplicatedVdisk};
pub use dirty::{DIRTY_REGION, DirtyReport, DirtyTable};
pub use protocol::{
    CODE_INVALID, CODE_IO, CODE_NO_REPLICA, CODE_NO_SPACE, CODE_STALE_EPOCH, DIGEST_PIECE,
    MAX_DIGEST_BYTES, Op, REQUEST_BYTES, Request, SERVICE_REPLICA,
};
pub use service::{
    EpochTable, LocalReplicas, MutationGuard, ReplicaGate, ReplicaService, ResyncTrackers,
    WrittenBlocks, digest, remote_error,
};

//! Raft's messages over the node-to-node transport.
//!
//! Raft RPCs travel as [`TrafficClass::Control`] frames of service
//! [`SERVICE_RAFT`], so heartbeats overtake any replication or rebuild
//! traffic queued on the same connection. Bodies are JSON (the messages are
//! openraft's own serde types); snapshots are small and go in openraft's
//! chunked form.

use std::sync::Arc;
use std::time::Duration;

use basalt_net::{Handler, Incoming, NetError, RemoteError, Reply, TrafficClass, Transport};
use bytes::Bytes;
use futures::future::BoxFuture;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::state::NodeId;
use crate::{Node, Raft, TypeConfig};

/// Service number of Raft RPCs.
pub const SERVICE_RAFT: u16 = 1;

/// Error code: the body could not be decoded.
const CODE_BAD_REQUEST: u16 = 1;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RaftRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// Creates Raft clients that talk through the transport.
#[derive(Clone)]
pub struct Network {
    transport: Transport,
}

impl Network {
    /// Raft networking over `transport`.
    pub fn new(transport: Transport) -> Network {
        Network { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            transport: self.transport.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// Raft's client for one peer.
pub struct PeerClient {
    transport: Transport,
    target: NodeId,
    addr: String,
}

impl PeerClient {
    async fn send<Resp, E>(
        &self,
        rpc: &RaftRpc,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Resp: for<'de> Deserialize<'de>,
        E: std::error::Error + for<'de> Deserialize<'de>,
    {
        let body = serde_json::to_vec(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let timeout = option.hard_ttl().max(Duration::from_millis(100));
        let reply = self
            .transport
            .call_timeout(
                &self.addr,
                TrafficClass::Control,
                SERVICE_RAFT,
                Bytes::from(body),
                Bytes::new(),
                timeout,
            )
            .await
            .map_err(|error| match error {
                NetError::Remote(_) | NetError::Malformed(_) => {
                    RPCError::Network(NetworkError::new(&error))
                }
                _ => RPCError::Unreachable(Unreachable::new(&error)),
            })?;
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.body)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|error| {
            RPCError::RemoteError(openraft::error::RemoteError::new(self.target, error))
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.send(&RaftRpc::AppendEntries(rpc), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(&RaftRpc::InstallSnapshot(rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.send(&RaftRpc::Vote(rpc), &option).await
    }
}

/// Serves Raft RPCs from peers to the local Raft node.
pub struct RaftService {
    raft: Arc<tokio::sync::OnceCell<Raft>>,
}

impl RaftService {
    /// A service that answers once `raft` is set.
    pub fn new(raft: Arc<tokio::sync::OnceCell<Raft>>) -> RaftService {
        RaftService { raft }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Reply, RemoteError> {
    serde_json::to_vec(value)
        .map(Reply::body)
        .map_err(|e| RemoteError::new(CODE_BAD_REQUEST, e.to_string()))
}

impl Handler for RaftService {
    fn handle(&self, request: Incoming) -> BoxFuture<'static, Result<Reply, RemoteError>> {
        let raft = self.raft.clone();
        Box::pin(async move {
            let Some(raft) = raft.get().cloned() else {
                return Err(RemoteError::new(
                    CODE_BAD_REQUEST,
                    "raft is not running yet",
                ));
            };
            let rpc: RaftRpc = serde_json::from_slice(&request.body).map_err(|e| {
                RemoteError::new(CODE_BAD_REQUEST, format!("malformed raft message: {e}"))
            })?;
            match rpc {
                RaftRpc::AppendEntries(rpc) => encode(&raft.append_entries(rpc).await),
                RaftRpc::Vote(rpc) => encode(&raft.vote(rpc).await),
                RaftRpc::InstallSnapshot(rpc) => encode(&raft.install_snapshot(rpc).await),
            }
        })
    }
}

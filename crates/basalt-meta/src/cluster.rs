//! A node's membership in the metadata group: bootstrap, join, proposals,
//! voter management.
//!
//! * **Bootstrap**: the first node initialises a one-voter Raft group and
//!   proposes the cluster's identity and its own member record.
//! * **Join**: a new node (nil cluster id, so it may call only the open
//!   meta service) asks any member to join; the member forwards to the
//!   leader, which assigns the next node id, records the member through Raft
//!   and adds it as a Raft learner. The new node then takes the cluster id
//!   and node id as its identity and starts its Raft node, which the leader
//!   fills in.
//! * **Voters**: the leader promotes caught-up learners until the group has
//!   1, 3 or 5 voters (the first three nodes, then five from five nodes).
//! * **Proposals** go to the leader: a follower forwards them over the meta
//!   service, so any node can change the metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use basalt_net::{
    Handler, Identity, Incoming, NetError, RemoteError, Reply, TrafficClass, Transport,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, ServerState};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::network::{Network, RaftService, SERVICE_RAFT};
use crate::state::{ClusterState, Command, CommandResult, NodeId, NodeRecord, NodeState};
use crate::storage::{LogStore, StateMachine};
use crate::{MetaError, Node, Raft};

/// How long a proposal may take before it is given up.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Service number of metadata requests (join, proposals).
pub const SERVICE_META: u16 = 2;

/// Error code of a meta request that failed.
const CODE_META: u16 = 2;

/// File recording which cluster this node belongs to and its node id.
pub const MEMBERSHIP_FILE: &str = "cluster.json";

/// How this node takes part, as recorded in its data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The cluster.
    pub cluster_id: Uuid,
    /// This node's id in it.
    pub node_id: NodeId,
}

/// Addresses and identity a node announces when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAnnouncement {
    /// The node's own identity (its disks' labels carry it).
    pub uuid: Uuid,
    /// Node-to-node address.
    pub listen: String,
    /// REST API address.
    pub api: String,
    /// NBD address.
    pub nbd: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MetaRequest {
    Join(NodeAnnouncement),
    Propose(Command),
    Ping,
    /// Leader only: the log index a linearizable read must wait for.
    ReadIndex,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MetaReply {
    Joined(Membership),
    Applied(CommandResult),
    Pong,
    ReadIndex(u64),
}

/// Timing of the metadata group.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout range (a follower waits a random time in it).
    pub election_timeout: (Duration, Duration),
    /// How often every node pings every other member.
    pub ping_interval: Duration,
    /// How long a member may stay silent before the leader declares it down.
    pub dead_after: Duration,
    /// Whether the leader moves replicas onto less loaded members (e.g.
    /// one that just joined) when nothing is degraded.
    pub rebalance: bool,
}

impl Default for MetaConfig {
    fn default() -> MetaConfig {
        MetaConfig {
            heartbeat: Duration::from_millis(250),
            election_timeout: (Duration::from_millis(1000), Duration::from_millis(2000)),
            ping_interval: Duration::from_secs(1),
            dead_after: Duration::from_secs(60),
            rebalance: true,
        }
    }
}

/// This node's part of the metadata group.
#[derive(Clone)]
pub struct MetaNode {
    inner: Arc<Inner>,
}

struct Inner {
    raft: Arc<tokio::sync::OnceCell<Raft>>,
    machine: StateMachine,
    log: LogStore,
    transport: Transport,
    dir: PathBuf,
    config: MetaConfig,
    /// Serialises joins on the leader so two joiners never get the same id.
    join_lock: tokio::sync::Mutex<()>,
    /// When each member last answered a ping from this node.
    last_seen: parking_lot::Mutex<std::collections::HashMap<NodeId, tokio::time::Instant>>,
    /// When pings last reached a majority of the Raft voters (this node
    /// counts if it votes).
    majority_contact: parking_lot::Mutex<Option<tokio::time::Instant>>,
    /// The read lease, cached for the read path (no lock, no allocation):
    /// this node is the only voter (or the only member)...
    sole_voter: std::sync::atomic::AtomicBool,
    /// ...or it holds the lease until this many milliseconds after
    /// `lease_base` (0: not at all).
    lease_until_ms: std::sync::atomic::AtomicU64,
    lease_base: std::time::Instant,
    /// Since when this node has been leader (None when it is not).
    leader_since: parking_lot::Mutex<Option<tokio::time::Instant>>,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Reads the membership file of a data directory, if the node belongs to a cluster.
pub fn read_membership(dir: &Path) -> Result<Option<Membership>, MetaError> {
    match std::fs::read(dir.join(MEMBERSHIP_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| MetaError::Storage(format!("{MEMBERSHIP_FILE} is unreadable: {e}"))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(MetaError::Io(error)),
    }
}

fn write_membership(dir: &Path, membership: &Membership) -> Result<(), MetaError> {
    let bytes =
        serde_json::to_vec_pretty(membership).map_err(|e| MetaError::Storage(e.to_string()))?;
    crate::replace_file_durably(&dir.join(MEMBERSHIP_FILE), &bytes)?;
    Ok(())
}

fn raft_error(error: impl std::fmt::Display) -> MetaError {
    MetaError::Raft(error.to_string())
}

impl MetaNode {
    /// Opens the metadata storage in `dir` and registers the Raft and meta
    /// services on `transport`. If the directory records a membership, the
    /// node's Raft starts at once; otherwise call [`MetaNode::bootstrap`] or
    /// [`MetaNode::join`].
    pub async fn open(
        dir: &Path,
        transport: Transport,
        config: MetaConfig,
    ) -> Result<MetaNode, MetaError> {
        std::fs::create_dir_all(dir)?;
        let log = LogStore::open(&dir.join("raft.redb"))?;
        let machine = StateMachine::open(dir)?;
        let raft = Arc::new(tokio::sync::OnceCell::new());
        let node = MetaNode {
            inner: Arc::new(Inner {
                raft: raft.clone(),
                machine,
                log,
                transport: transport.clone(),
                dir: dir.to_path_buf(),
                config,
                join_lock: tokio::sync::Mutex::new(()),
                last_seen: parking_lot::Mutex::new(std::collections::HashMap::new()),
                majority_contact: parking_lot::Mutex::new(None),
                sole_voter: std::sync::atomic::AtomicBool::new(false),
                lease_until_ms: std::sync::atomic::AtomicU64::new(0),
                lease_base: std::time::Instant::now(),
                leader_since: parking_lot::Mutex::new(None),
                tasks: parking_lot::Mutex::new(Vec::new()),
            }),
        };
        transport.register(SERVICE_RAFT, Arc::new(RaftService::new(raft)), false);
        transport.register(
            SERVICE_META,
            Arc::new(MetaService {
                node: Arc::downgrade(&node.inner),
            }),
            true,
        );
        if let Some(membership) = read_membership(dir)? {
            transport.set_identity(Identity {
                cluster_id: membership.cluster_id,
                node_id: membership.node_id,
            });
            node.start_raft(membership.node_id).await?;
        }
        Ok(node)
    }

    async fn start_raft(&self, node_id: NodeId) -> Result<Raft, MetaError> {
        let config = &self.inner.config;
        let raft_config = Config {
            cluster_name: "basalt".into(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: config.election_timeout.0.as_millis() as u64,
            election_timeout_max: config.election_timeout.1.as_millis() as u64,
            ..Config::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(raft_error)?);
        let raft = Raft::new(
            node_id,
            raft_config,
            Network::new(self.inner.transport.clone()),
            self.inner.log.clone(),
            self.inner.machine.clone(),
        )
        .await
        .map_err(raft_error)?;
        self.inner
            .raft
            .set(raft.clone())
            .map_err(|_| MetaError::Raft("raft is already running".into()))?;
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(inner) = weak.upgrade() else { return };
                let node = MetaNode { inner };
                if let Err(error) = node.manage_voters().await {
                    tracing::debug!(%error, "voter management");
                }
            }
        });
        self.inner.tasks.lock().push(task);
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.config.ping_interval;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let node = MetaNode { inner };
                node.ping_members().await;
                if let Err(error) = node.judge_members().await {
                    tracing::debug!(%error, "failure detection");
                }
            }
        });
        self.inner.tasks.lock().push(task);
        Ok(raft)
    }

    /// The running Raft node, once bootstrapped or joined.
    pub fn raft(&self) -> Option<Raft> {
        self.inner.raft.get().cloned()
    }

    /// This node's membership, once it has one.
    pub fn membership(&self) -> Option<Membership> {
        let identity = self.inner.transport.identity();
        (!identity.cluster_id.is_nil()).then_some(Membership {
            cluster_id: identity.cluster_id,
            node_id: identity.node_id,
        })
    }

    /// The replicated state as this node has applied it.
    pub fn cluster(&self) -> ClusterState {
        self.inner.machine.cluster()
    }

    /// Notified after every change to the replicated state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<ClusterState>> {
        self.inner.machine.subscribe()
    }

    /// Creates a new one-node cluster with this node as its first member.
    pub async fn bootstrap(&self, me: NodeAnnouncement) -> Result<Membership, MetaError> {
        if let Some(membership) = self.membership() {
            return Err(MetaError::Raft(format!(
                "this node already belongs to cluster {}",
                membership.cluster_id
            )));
        }
        let membership = Membership {
            cluster_id: Uuid::new_v4(),
            node_id: 1,
        };
        self.inner.transport.set_identity(Identity {
            cluster_id: membership.cluster_id,
            node_id: membership.node_id,
        });
        let raft = self.start_raft(membership.node_id).await?;
        let mut voters = std::collections::BTreeMap::new();
        voters.insert(membership.node_id, Node::new(me.listen.clone()));
        raft.initialize(voters).await.map_err(raft_error)?;
        raft.wait(Some(Duration::from_secs(10)))
            .state(ServerState::Leader, "bootstrap leader")
            .await
            .map_err(raft_error)?;
        self.propose_local(Command::Bootstrap {
            cluster_id: membership.cluster_id,
        })
        .await?;
        self.propose_local(Command::AddNode {
            node: record(membership.node_id, &me),
        })
        .await?;
        write_membership(&self.inner.dir, &membership)?;
        tracing::info!(cluster = %membership.cluster_id, node = membership.node_id, "bootstrapped a new cluster");
        Ok(membership)
    }

    /// Joins the cluster of the member listening at `member`.
    pub async fn join(&self, member: &str, me: NodeAnnouncement) -> Result<Membership, MetaError> {
        if let Some(membership) = self.membership() {
            return Err(MetaError::Raft(format!(
                "this node already belongs to cluster {}",
                membership.cluster_id
            )));
        }
        let membership = send_join(&self.inner.transport, member, &me).await?;
        // The identity must be in place before the leader's Raft messages
        // arrive; until then they are refused and retried.
        self.inner.transport.set_identity(Identity {
            cluster_id: membership.cluster_id,
            node_id: membership.node_id,
        });
        write_membership(&self.inner.dir, &membership)?;
        self.start_raft(membership.node_id).await?;
        tracing::info!(cluster = %membership.cluster_id, node = membership.node_id, via = member, "joined the cluster");
        Ok(membership)
    }

    /// A member that restarted with other addresses than the cluster has
    /// for it announces them through any other member it can reach (the
    /// leader cannot reach it at the old address). Nothing to do when they
    /// did not change.
    pub async fn announce_addresses(&self, me: NodeAnnouncement) -> Result<(), MetaError> {
        let Some(membership) = self.membership() else {
            return Err(MetaError::Raft("this node is not in a cluster".into()));
        };
        let state = self.cluster();
        let Some(record) = state.nodes.get(&membership.node_id) else {
            return Ok(());
        };
        if record.listen == me.listen && record.api == me.api && record.nbd == me.nbd {
            return Ok(());
        }
        let mut last_error = MetaError::Raft("no other member to tell".into());
        for _round in 0..10 {
            for other in state.nodes.values().filter(|n| n.id != membership.node_id) {
                match send_join(&self.inner.transport, &other.listen, &me).await {
                    Ok(answer) if answer == membership => {
                        tracing::info!(listen = %me.listen, via = %other.listen, "the cluster knows this node's new addresses");
                        return Ok(());
                    }
                    Ok(_) => {
                        last_error = MetaError::Raft("unexpected reply to an address change".into())
                    }
                    Err(error) => last_error = error,
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(last_error)
    }

    /// Applies a command through Raft, forwarding it to the leader if this
    /// node is not the leader. Returns what applying it produced (which may
    /// be a refusal).
    pub async fn propose(&self, command: Command) -> Result<CommandResult, MetaError> {
        let mut last_error = MetaError::Raft("no leader".into());
        // A leader cut off from its quorum never commits; give up rather
        // than hang (the caller fails what depended on the change).
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            let raft = self
                .raft()
                .ok_or_else(|| MetaError::Raft("this node is not in a cluster".into()))?;
            let written =
                tokio::time::timeout_at(deadline, raft.client_write(command.clone())).await;
            let Ok(written) = written else {
                return Err(MetaError::Raft(
                    "the change was not committed in time (no quorum reachable?)".into(),
                ));
            };
            match written {
                Ok(response) => return Ok(response.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    match forward.leader_node {
                        Some(leader) => match self.forward(&leader.addr, &command).await {
                            Ok(result) => return Ok(result),
                            Err(error) => last_error = error,
                        },
                        None => last_error = MetaError::Raft("no leader elected yet".into()),
                    }
                }
                Err(error) => last_error = raft_error(error),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(last_error)
    }

    async fn propose_local(&self, command: Command) -> Result<CommandResult, MetaError> {
        let raft = self
            .raft()
            .ok_or_else(|| MetaError::Raft("raft is not running".into()))?;
        let response = raft.client_write(command).await.map_err(raft_error)?;
        match response.data {
            CommandResult::Refused { reason, .. } => Err(MetaError::Raft(reason)),
            other => Ok(other),
        }
    }

    async fn forward(&self, leader: &str, command: &Command) -> Result<CommandResult, MetaError> {
        let request = MetaRequest::Propose(command.clone());
        match meta_call(
            &self.inner.transport,
            leader,
            &request,
            Duration::from_secs(10),
        )
        .await?
        {
            MetaReply::Applied(result) => Ok(result),
            _ => Err(MetaError::Raft("unexpected reply to a proposal".into())),
        }
    }

    /// Leader only: admits a joining node.
    async fn admit(&self, me: NodeAnnouncement) -> Result<Membership, MetaError> {
        let raft = self
            .raft()
            .ok_or_else(|| MetaError::Raft("this node is not in a cluster".into()))?;
        let _guard = self.inner.join_lock.lock().await;
        let state = self.cluster();
        let node_id = match state.nodes.values().find(|n| n.uuid == me.uuid) {
            // A retry of a join that got this far before.
            Some(existing) if existing.listen == me.listen => {
                if existing.api != me.api || existing.nbd != me.nbd {
                    self.propose_local(Command::SetNodeAddress {
                        node: existing.id,
                        listen: me.listen.clone(),
                        api: me.api.clone(),
                        nbd: me.nbd.clone(),
                    })
                    .await?;
                }
                existing.id
            }
            // A member that restarted with another --listen: the same node
            // (its disks' identity), reachable elsewhere now.
            Some(existing) => {
                tracing::warn!(node = existing.id, old = %existing.listen, new = %me.listen, "a member moved to another address");
                self.propose_local(Command::SetNodeAddress {
                    node: existing.id,
                    listen: me.listen.clone(),
                    api: me.api.clone(),
                    nbd: me.nbd.clone(),
                })
                .await?;
                let nodes = BTreeMap::from([(existing.id, Node::new(me.listen.clone()))]);
                raft.change_membership(ChangeMembers::SetNodes(nodes), false)
                    .await
                    .map_err(raft_error)?;
                return Ok(Membership {
                    cluster_id: state.cluster_id,
                    node_id: existing.id,
                });
            }
            None => {
                let node_id = state.next_node_id();
                self.propose_local(Command::AddNode {
                    node: record(node_id, &me),
                })
                .await?;
                node_id
            }
        };
        raft.add_learner(node_id, Node::new(me.listen.clone()), false)
            .await
            .map_err(raft_error)?;
        Ok(Membership {
            cluster_id: state.cluster_id,
            node_id,
        })
    }

    /// Leader only: promotes caught-up learners until there are enough voters.
    async fn manage_voters(&self) -> Result<(), MetaError> {
        let Some(raft) = self.raft() else {
            return Ok(());
        };
        let metrics = raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Ok(());
        }
        let state = self.cluster();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        // The first three members are voters, five from five members on.
        let target = match state.nodes.len() {
            0..=2 => 1,
            3..=4 => 3,
            _ => 5,
        };
        let live_voters: BTreeSet<NodeId> =
            voters.iter().copied().filter(|v| state.is_up(*v)).collect();
        if live_voters.len() == voters.len() && voters.len() >= target {
            return Ok(());
        }
        let last_log = metrics.last_log_index.unwrap_or(0);
        let replication = metrics.replication.clone().unwrap_or_default();
        let mut desired = live_voters.clone();
        for learner in membership.learner_ids() {
            if desired.len() >= target {
                break;
            }
            let caught_up = replication
                .get(&learner)
                .and_then(|matched| matched.map(|log_id| log_id.index + 16 >= last_log))
                .unwrap_or(false);
            if caught_up && state.is_up(learner) {
                desired.insert(learner);
            }
        }
        // Voter counts stay odd, and change only when the target is reached:
        // a dead voter is replaced by a live learner, never just dropped.
        if desired.len() != target || desired == voters {
            return Ok(());
        }
        tracing::warn!(?voters, ?desired, "changing the Raft voters");
        raft.change_membership(ChangeMembers::ReplaceAllVoters(desired), true)
            .await
            .map_err(raft_error)?;
        Ok(())
    }

    /// Pings every other member once (in parallel) and notes who answered.
    async fn ping_members(&self) {
        let me = self.inner.transport.identity().node_id;
        let members: Vec<(NodeId, String)> = self
            .cluster()
            .nodes
            .values()
            .filter(|n| n.id != me)
            .map(|n| (n.id, n.listen.clone()))
            .collect();
        let timeout = self
            .inner
            .config
            .ping_interval
            .max(Duration::from_millis(200));
        let pings = members.into_iter().map(|(id, addr)| {
            let transport = self.inner.transport.clone();
            async move {
                let body = encode_body(&MetaRequest::Ping).ok()?;
                transport
                    .call_timeout(
                        &addr,
                        TrafficClass::Control,
                        SERVICE_META,
                        body,
                        Bytes::new(),
                        timeout,
                    )
                    .await
                    .ok()
                    .map(|_| id)
            }
        });
        let answered: Vec<NodeId> = futures::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .collect();
        let now = tokio::time::Instant::now();
        // Contact that counts: a majority of the Raft voters (this node
        // included if it votes) — without them nobody can take a vdisk over.
        let voters = self.voters();
        let reached = voters
            .iter()
            .filter(|v| **v == me || answered.contains(v))
            .count();
        if reached > voters.len() / 2 {
            *self.inner.majority_contact.lock() = Some(now);
        }
        self.refresh_read_lease();
        let mut last_seen = self.inner.last_seen.lock();
        last_seen.insert(me, now);
        for id in answered {
            last_seen.insert(id, now);
        }
    }

    /// How long an owner may serve reads after it last reached a majority
    /// of the members (its read lease).
    pub fn read_lease(&self) -> Duration {
        self.inner.config.ping_interval * 4
    }

    /// How long a node taking a vdisk over from another live node waits
    /// before it serves: the old owner's read lease runs out first, so it
    /// can never read data older than what the new owner acknowledged.
    pub fn takeover_wait(&self) -> Duration {
        self.read_lease() + self.inner.config.ping_interval * 2
    }

    /// Whether this node reached a majority of the Raft voters within its
    /// read lease (always, for a cluster of one or when it is the only
    /// voter). A node cut off from them may have been replaced as owner
    /// without knowing it.
    pub fn holds_read_lease(&self) -> bool {
        if self.cached_read_lease() {
            return true;
        }
        // Not held as cached: recompute (membership may have changed).
        self.refresh_read_lease();
        self.cached_read_lease()
    }

    fn cached_read_lease(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.inner.sole_voter.load(Ordering::Acquire)
            || self.inner.lease_base.elapsed().as_millis()
                < u128::from(self.inner.lease_until_ms.load(Ordering::Acquire))
    }

    /// Recomputes the cached read lease from the membership and the last
    /// majority contact.
    fn refresh_read_lease(&self) {
        use std::sync::atomic::Ordering;
        let me = self.inner.transport.identity().node_id;
        // The only voter: no other node can take anything over.
        let sole =
            self.inner.machine.cluster_members() <= 1 || self.voters() == BTreeSet::from([me]);
        self.inner.sole_voter.store(sole, Ordering::Release);
        let until = self.inner.majority_contact.lock().map_or(0, |at| {
            let at = at
                .into_std()
                .saturating_duration_since(self.inner.lease_base);
            u64::try_from((at + self.read_lease()).as_millis()).unwrap_or(u64::MAX)
        });
        self.inner.lease_until_ms.store(until, Ordering::Release);
    }

    /// Whether this node heard from `node` within three ping intervals.
    pub fn reachable(&self, node: NodeId) -> bool {
        if node == self.inner.transport.identity().node_id {
            return true;
        }
        let window = self.inner.config.ping_interval * 3;
        self.inner
            .last_seen
            .lock()
            .get(&node)
            .is_some_and(|seen| seen.elapsed() <= window)
    }

    /// Leader only: the log index up to which a linearizable read must see
    /// the state, once a quorum has confirmed this node still leads.
    async fn leader_read_index(&self) -> Result<u64, MetaError> {
        let raft = self
            .raft()
            .ok_or_else(|| MetaError::Raft("this node is not in a cluster".into()))?;
        let (read, _applied) = raft
            .get_read_log_id()
            .await
            .map_err(|e| MetaError::Raft(e.to_string()))?;
        Ok(read.map_or(0, |id| id.index))
    }

    /// Waits until this node's state holds everything the cluster had
    /// committed when the call began (a read barrier through the leader).
    /// A node that has just restarted reads its own, older state until the
    /// leader catches it up; decisions that must not act on a stale state
    /// (exporting a vdisk again, for one) wait for this first.
    pub async fn catch_up(&self, timeout: Duration) -> Result<(), MetaError> {
        let raft = self
            .raft()
            .ok_or_else(|| MetaError::Raft("this node is not in a cluster".into()))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_error = MetaError::Raft("no leader elected yet".into());
        while tokio::time::Instant::now() < deadline {
            let metrics = raft.metrics().borrow().clone();
            let index = if metrics.state == ServerState::Leader {
                self.leader_read_index().await
            } else if let Some(leader) = leader_address(&metrics) {
                match meta_call(
                    &self.inner.transport,
                    &leader,
                    &MetaRequest::ReadIndex,
                    Duration::from_secs(5),
                )
                .await
                {
                    Ok(MetaReply::ReadIndex(index)) => Ok(index),
                    Ok(_) => Err(MetaError::Raft("unexpected reply to a read index".into())),
                    Err(error) => Err(error),
                }
            } else {
                Err(MetaError::Raft("no leader elected yet".into()))
            };
            match index {
                Ok(index) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    return raft
                        .wait(Some(left))
                        .applied_index_at_least(Some(index), "catch up with the leader")
                        .await
                        .map(|_| ())
                        .map_err(|e| MetaError::Raft(format!("catching up: {e}")));
                }
                Err(error) => last_error = error,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(last_error)
    }

    /// The current leader's id, as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft()
            .and_then(|raft| raft.metrics().borrow().current_leader)
    }

    /// Raft role of every member: voter or learner.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.raft()
            .map(|raft| {
                raft.metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Leader only: declares members silent past `dead_after` down, and
    /// members heard from again up. A new leader first gives everyone
    /// `dead_after` from its election: it has not been pinging them before.
    async fn judge_members(&self) -> Result<(), MetaError> {
        let Some(raft) = self.raft() else {
            return Ok(());
        };
        let is_leader = raft.metrics().borrow().state == ServerState::Leader;
        let since = {
            let mut leader_since = self.inner.leader_since.lock();
            if !is_leader {
                *leader_since = None;
                return Ok(());
            }
            *leader_since.get_or_insert_with(tokio::time::Instant::now)
        };
        let dead_after = self.inner.config.dead_after;
        let me = self.inner.transport.identity().node_id;
        let mut changes = Vec::new();
        {
            let last_seen = self.inner.last_seen.lock();
            for node in self.cluster().nodes.values() {
                if node.id == me {
                    continue;
                }
                let heard = last_seen
                    .get(&node.id)
                    .copied()
                    .map_or(since, |t| t.max(since));
                let silent = heard.elapsed();
                match node.state {
                    NodeState::Up if silent > dead_after => {
                        changes.push((node.id, NodeState::Down))
                    }
                    NodeState::Down
                        if last_seen.get(&node.id).is_some_and(|t| {
                            t.elapsed() <= self.inner.config.ping_interval * 3
                        }) =>
                    {
                        changes.push((node.id, NodeState::Up))
                    }
                    _ => {}
                }
            }
        }
        for (node, state) in changes {
            tracing::warn!(node, ?state, "member state changes");
            self.propose_local(Command::SetNodeState { node, state })
                .await?;
        }
        // Restore the replication factor: replicas on down nodes, and copies
        // their nodes reported lost, move to up nodes that hold none (they
        // start stale and are resynced there).
        let state = self.cluster();
        for vdisk in state.vdisks.values() {
            let Some(dead) = vdisk
                .replicas
                .iter()
                .find(|r| r.lost || !state.is_up(r.node))
            else {
                continue;
            };
            let survivors = vdisk
                .in_sync()
                .filter(|n| *n != dead.node && state.is_up(*n))
                .count();
            if survivors == 0 {
                // The down node may hold the only good copy: wait for it.
                continue;
            }
            let Some(new) = state.replacement_candidate(vdisk) else {
                continue;
            };
            tracing::warn!(vdisk = %vdisk.name, dead = dead.node, lost = dead.lost, new, "moving a replica off a down node or a lost copy");
            self.propose_local(Command::ReplaceReplica {
                vdisk: vdisk.id,
                dead: dead.node,
                new,
            })
            .await?;
        }
        // High availability: VMs that should run on a down node start
        // elsewhere (their new node takes their vdisks with a new epoch,
        // which fences the dead node).
        let state = self.cluster();
        for vm in state.vms.values() {
            let Some(node) = vm.node else { continue };
            if vm.desired == crate::VmDesired::Running
                && vm.state != crate::VmRunState::Failed
                && state
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.state == NodeState::Down)
            {
                tracing::warn!(vm = %vm.spec.name, node, "restarting a VM of a down node elsewhere");
                let failover = Command::Vm {
                    command: crate::VmCommand::FailOverVm {
                        name: vm.spec.name.clone(),
                        dead: node,
                    },
                };
                if let Err(error) = self.propose_local(failover).await {
                    tracing::warn!(vm = %vm.spec.name, %error, "cannot restart the VM elsewhere");
                }
            }
        }
        // Rebalance, one replica at a time, when nothing is degraded.
        if self.inner.config.rebalance
            && let Some(step) = self.cluster().rebalance_move()
        {
            tracing::info!(?step, "rebalancing");
            self.propose_local(step).await?;
        }
        Ok(())
    }

    /// Stops Raft and the background tasks (the transport is the caller's).
    pub async fn shutdown(&self) {
        for task in self.inner.tasks.lock().drain(..) {
            task.abort();
        }
        if let Some(raft) = self.raft() {
            let _ = raft.shutdown().await;
        }
    }
}

fn record(id: NodeId, me: &NodeAnnouncement) -> NodeRecord {
    NodeRecord {
        id,
        uuid: me.uuid,
        listen: me.listen.clone(),
        api: me.api.clone(),
        nbd: me.nbd.clone(),
        joined: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        state: NodeState::Up,
    }
}

fn encode_body<T: Serialize>(value: &T) -> Result<Bytes, MetaError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| MetaError::Storage(e.to_string()))
}

fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(body).map_err(|e| MetaError::Net(NetError::Malformed(e.to_string())))
}

struct MetaService {
    node: std::sync::Weak<Inner>,
}

impl Handler for MetaService {
    fn handle(&self, request: Incoming) -> BoxFuture<'static, Result<Reply, RemoteError>> {
        let node = self.node.upgrade().map(|inner| MetaNode { inner });
        Box::pin(async move {
            let node = node.ok_or_else(|| RemoteError::new(CODE_META, "node is stopping"))?;
            let meta_request: MetaRequest = serde_json::from_slice(&request.body)
                .map_err(|e| RemoteError::new(CODE_META, format!("malformed meta request: {e}")))?;
            let fail = |error: MetaError| RemoteError::new(CODE_META, error.to_string());
            let reply = match meta_request {
                MetaRequest::Join(me) => {
                    // A member may only announce itself (new addresses).
                    let announces_itself = node
                        .cluster()
                        .nodes
                        .get(&request.peer.node_id)
                        .is_some_and(|n| n.uuid == me.uuid);
                    if !request.peer.joining && !announces_itself {
                        return Err(RemoteError::new(CODE_META, "this node is already a member"));
                    }
                    MetaReply::Joined(node.join_via_leader(me).await.map_err(fail)?)
                }
                MetaRequest::Ping => {
                    if request.peer.joining {
                        return Err(RemoteError::new(CODE_META, "join the cluster first"));
                    }
                    MetaReply::Pong
                }
                MetaRequest::Propose(command) => {
                    if request.peer.joining {
                        return Err(RemoteError::new(CODE_META, "join the cluster first"));
                    }
                    MetaReply::Applied(node.propose(command).await.map_err(fail)?)
                }
                MetaRequest::ReadIndex => {
                    if request.peer.joining {
                        return Err(RemoteError::new(CODE_META, "join the cluster first"));
                    }
                    MetaReply::ReadIndex(node.leader_read_index().await.map_err(fail)?)
                }
            };
            serde_json::to_vec(&reply)
                .map(Reply::body)
                .map_err(|e| RemoteError::new(CODE_META, e.to_string()))
        })
    }
}

impl MetaNode {
    /// Admits a joiner here if this node leads, else asks the leader (the
    /// joiner reached a follower; the follower is a member, so it may call
    /// the leader's meta service — but as a member, so it proxies the join
    /// as an admission request of its own).
    async fn join_via_leader(&self, me: NodeAnnouncement) -> Result<Membership, MetaError> {
        let raft = self
            .raft()
            .ok_or_else(|| MetaError::Raft("this node is not in a cluster".into()))?;
        for _attempt in 0..20 {
            let metrics = raft.metrics().borrow().clone();
            if metrics.state == ServerState::Leader {
                return self.admit(me).await;
            }
            if let Some(leader) = leader_address(&metrics) {
                return self.forward_join(&leader, &me).await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(MetaError::Raft("no leader elected".into()))
    }

    async fn forward_join(
        &self,
        leader: &str,
        me: &NodeAnnouncement,
    ) -> Result<Membership, MetaError> {
        // Members reach the leader's admission through a proxy transport
        // without identity, so the leader sees a joining peer.
        let proxy = Transport::new(
            Identity {
                cluster_id: Uuid::nil(),
                node_id: 0,
            },
            basalt_net::TransportConfig::default(),
        );
        let joined = send_join(&proxy, leader, me).await;
        proxy.shutdown();
        joined
    }
}

/// Sends a join (or a member's address announcement) to the node at `addr`.
async fn send_join(
    transport: &Transport,
    addr: &str,
    me: &NodeAnnouncement,
) -> Result<Membership, MetaError> {
    let request = MetaRequest::Join(me.clone());
    match meta_call(transport, addr, &request, Duration::from_secs(30)).await? {
        MetaReply::Joined(membership) => Ok(membership),
        _ => Err(MetaError::Raft("unexpected reply to a join".into())),
    }
}

/// The current leader's address, as `metrics` (this node's view) knows it.
fn leader_address(metrics: &openraft::RaftMetrics<NodeId, crate::Node>) -> Option<String> {
    let leader = metrics.current_leader?;
    metrics
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|node| node.addr.clone())
}

/// Sends one meta-service request to the node at `addr`; returns its reply.
async fn meta_call(
    transport: &Transport,
    addr: &str,
    request: &MetaRequest,
    timeout: Duration,
) -> Result<MetaReply, MetaError> {
    let reply = transport
        .call_timeout(
            addr,
            TrafficClass::Control,
            SERVICE_META,
            encode_body(request)?,
            Bytes::new(),
            timeout,
        )
        .await?;
    decode_body(&reply.body)
}

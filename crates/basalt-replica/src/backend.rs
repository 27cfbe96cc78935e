//! The owner side: a vdisk whose every write goes to all its in-sync
//! replicas.
//!
//! Rules (shared/DESIGN.md, issue 3):
//!
//! * a write completes when every in-sync replica has it; a replica that
//!   fails is recorded stale through the [`Coordinator`] (Raft) *before* the
//!   write completes, and is left out of later writes;
//! * if that record cannot be made — e.g. this owner has been fenced or cut
//!   off from the Raft majority — the write fails: an owner that lost its
//!   epoch can never complete a write;
//! * reads come from the local replica when there is one (data locality),
//!   else from another; a local read error (e.g. a checksum mismatch) is
//!   retried on the other replicas;
//! * a replica answering "stale epoch" means another node owns the vdisk
//!   now: this backend fences itself and fails all further I/O (the client
//!   reconnects, to whichever node it likes).
//!
//! Unaligned writes and zeroes are turned into whole-block operations here,
//! under an exclusive lock held until every replica has answered, so every
//! replica sees them in the same order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use basalt_core::{
    AllocationExtent, BLOCK_SIZE, BlockBackend, BlockError, BoxFuture, IoBuf, MAX_REQUEST_BYTES,
    WriteFlags, check_range,
};
use basalt_net::{NetError, TrafficClass, Transport};
use bytes::Bytes;
use tokio::sync::RwLock;

use crate::protocol::{
    CODE_INVALID, CODE_NO_SPACE, CODE_STALE_EPOCH, Op, Request, SERVICE_REPLICA,
};

/// How long a replica may take to answer before it is recorded stale.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(10);

/// A remote replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaTarget {
    /// Its node id.
    pub node: u64,
    /// Its node-to-node address.
    pub addr: String,
    /// Whether it holds every acknowledged write (else it is being
    /// resynced: written to, never read from).
    pub in_sync: bool,
}

/// The in-sync replicas an owner writes to under one epoch.
#[derive(Clone)]
pub struct ReplicaSet {
    /// The ownership epoch.
    pub epoch: u64,
    /// This node's id and its replica, if it holds one.
    pub local: Option<(u64, Arc<dyn BlockBackend>)>,
    /// Whether the local replica is in sync.
    pub local_in_sync: bool,
    /// The other replicas.
    pub remotes: Vec<ReplicaTarget>,
}

impl ReplicaSet {
    fn in_sync_count(&self) -> usize {
        usize::from(self.local.is_some() && self.local_in_sync)
            + self.remotes.iter().filter(|r| r.in_sync).count()
    }

    /// Same replicas with the same in-sync flags.
    fn same_replicas(&self, other: &ReplicaSet) -> bool {
        let local = |set: &ReplicaSet| {
            set.local
                .as_ref()
                .map(|(node, _)| (*node, set.local_in_sync))
        };
        local(self) == local(other) && self.remotes == other.remotes
    }

    fn is_in_sync(&self, node: u64) -> bool {
        match &self.local {
            Some((local, _)) if *local == node => self.local_in_sync,
            _ => self.remotes.iter().any(|r| r.node == node && r.in_sync),
        }
    }

    fn without(&self, failed: &[u64]) -> ReplicaSet {
        ReplicaSet {
            epoch: self.epoch,
            local_in_sync: self.local_in_sync,
            local: self
                .local
                .clone()
                .filter(|(node, _)| !failed.contains(node)),
            remotes: self
                .remotes
                .iter()
                .filter(|r| !failed.contains(&r.node))
                .cloned()
                .collect(),
        }
    }
}

/// What the replicated vdisk needs from the control plane.
pub trait Coordinator: Send + Sync + 'static {
    /// Takes ownership of `vdisk` for this node under a new epoch, fences
    /// the replicas and returns the in-sync set.
    fn acquire(&self, vdisk: u64) -> BoxFuture<'static, Result<ReplicaSet, BlockError>>;
    /// Records durably that `node`'s replica missed a write under `epoch`.
    fn mark_stale(
        &self,
        vdisk: u64,
        node: u64,
        epoch: u64,
    ) -> BoxFuture<'static, Result<(), BlockError>>;
}

enum Failure {
    /// Another epoch owns the vdisk.
    Fenced(String),
    /// The replica failed the request.
    Failed(BlockError),
}

/// A vdisk served by this node as its owner.
pub struct ReplicatedVdisk {
    vdisk: u64,
    name: String,
    size: AtomicU64,
    transport: Transport,
    coordinator: Arc<dyn Coordinator>,
    set: parking_lot::RwLock<Option<Arc<ReplicaSet>>>,
    acquiring: tokio::sync::Mutex<()>,
    fenced: AtomicBool,
    rmw: RwLock<()>,
    /// Held shared by every mutation while it fans out; taken exclusively
    /// by [`ReplicatedVdisk::refresh`] to wait out mutations that used the
    /// previous replica set.
    inflight: RwLock<()>,
}

impl ReplicatedVdisk {
    /// A backend for `vdisk`; ownership is taken on the first request.
    pub fn new(
        vdisk: u64,
        name: String,
        size: u64,
        transport: Transport,
        coordinator: Arc<dyn Coordinator>,
    ) -> ReplicatedVdisk {
        ReplicatedVdisk {
            vdisk,
            name,
            size: AtomicU64::new(size),
            transport,
            coordinator,
            set: parking_lot::RwLock::new(None),
            acquiring: tokio::sync::Mutex::new(()),
            fenced: AtomicBool::new(false),
            rmw: RwLock::new(()),
            inflight: RwLock::new(()),
        }
    }

    /// The vdisk id.
    pub fn vdisk_id(&self) -> u64 {
        self.vdisk
    }

    /// The epoch this backend owns the vdisk under, once acquired.
    pub fn epoch(&self) -> Option<u64> {
        self.set.read().as_ref().map(|set| set.epoch)
    }

    /// Whether it lost ownership (every request fails from now on).
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Stops serving: another node owns the vdisk now, or it was deleted.
    pub fn fence(&self) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::info!(vdisk = %self.name, "ownership moved away; this node stops serving it");
        }
    }

    /// Replaces the replica set (same epoch: the cluster added or resynced a
    /// replica) and returns once no mutation is still using the old set, so
    /// that every later mutation reaches the replicas of `set`.
    pub async fn refresh(&self, set: ReplicaSet) {
        {
            let mut current = self.set.write();
            match current.as_ref() {
                // Nothing changed: no need to wait for writes in flight.
                Some(now) if now.epoch == set.epoch && now.same_replicas(&set) => return,
                Some(now) if now.epoch == set.epoch => *current = Some(Arc::new(set)),
                _ => return,
            }
        }
        drop(self.inflight.write().await);
    }

    /// Follows a resize.
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// The replicas written to, as node ids (local first).
    pub fn replica_nodes(&self) -> Vec<u64> {
        match self.set.read().as_ref() {
            Some(set) => set
                .local
                .iter()
                .map(|(node, _)| *node)
                .chain(set.remotes.iter().map(|r| r.node))
                .collect(),
            None => Vec::new(),
        }
    }

    fn fenced_error(&self) -> BlockError {
        BlockError::Io(format!(
            "vdisk {} is now served by another node; reconnect",
            self.name
        ))
    }

    async fn current_set(&self) -> Result<Arc<ReplicaSet>, BlockError> {
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        if let Some(set) = self.set.read().clone() {
            return Ok(set);
        }
        let _acquiring = self.acquiring.lock().await;
        if let Some(set) = self.set.read().clone() {
            return Ok(set);
        }
        let set = Arc::new(self.coordinator.acquire(self.vdisk).await?);
        if set.in_sync_count() == 0 {
            return Err(BlockError::Io(format!(
                "vdisk {} has no in-sync replica on a live node",
                self.name
            )));
        }
        *self.set.write() = Some(set.clone());
        Ok(set)
    }

    async fn remote(
        &self,
        target: &ReplicaTarget,
        request: Request,
        data: Bytes,
    ) -> Result<Bytes, Failure> {
        let reply = self
            .transport
            .call_timeout(
                &target.addr,
                TrafficClass::Foreground,
                SERVICE_REPLICA,
                request.encode(),
                data,
                REPLICA_TIMEOUT,
            )
            .await;
        match reply {
            Ok(reply) => Ok(reply.data),
            Err(NetError::Remote(error)) => Err(match error.code {
                CODE_STALE_EPOCH => Failure::Fenced(error.message),
                CODE_NO_SPACE => Failure::Failed(BlockError::NoSpace),
                CODE_INVALID => Failure::Failed(BlockError::Invalid(error.message)),
                _ => Failure::Failed(BlockError::Io(format!(
                    "replica on node {}: {}",
                    target.node, error.message
                ))),
            }),
            Err(error) => Err(Failure::Failed(BlockError::Io(format!(
                "replica on node {}: {error}",
                target.node
            )))),
        }
    }

    /// Runs a mutation on every replica of `set`; see the module rules.
    async fn fan_out<L>(
        &self,
        set: &ReplicaSet,
        request: Request,
        data: Bytes,
        local: L,
    ) -> Result<(), BlockError>
    where
        L: FnOnce(Arc<dyn BlockBackend>) -> BoxFuture<'static, Result<(), BlockError>>,
    {
        if set.remotes.is_empty()
            && set.local_in_sync
            && let Some((_, replica)) = &set.local
        {
            // The only copy: its result is the result, nothing to record.
            return local(replica.clone()).await;
        }
        let _inflight = self.inflight.read().await;
        let local_future = set.local.clone().map(|(node, replica)| {
            let op = local(replica);
            async move { (node, op.await.map_err(Failure::Failed)) }
        });
        let remote_futures = set.remotes.iter().map(|target| {
            let data = data.clone();
            async move {
                (
                    target.node,
                    self.remote(target, request, data).await.map(|_| ()),
                )
            }
        });
        let (local_result, remote_results) = tokio::join!(
            async {
                match local_future {
                    Some(op) => Some(op.await),
                    None => None,
                }
            },
            futures::future::join_all(remote_futures)
        );
        let results: Vec<(u64, Result<(), Failure>)> =
            local_result.into_iter().chain(remote_results).collect();
        let mut failed = Vec::new();
        let mut first_error = None;
        for (node, result) in results.iter() {
            match result {
                Ok(()) => {}
                Err(Failure::Fenced(why)) => {
                    tracing::warn!(vdisk = %self.name, node, %why, "fenced by a replica");
                    self.fence();
                    return Err(self.fenced_error());
                }
                Err(Failure::Failed(error)) => {
                    failed.push(*node);
                    if first_error.is_none() {
                        first_error = Some(error.clone());
                    }
                }
            }
        }
        let Some(error) = first_error else {
            return Ok(());
        };
        let in_sync_failed = failed.iter().filter(|n| set.is_in_sync(**n)).count();
        if in_sync_failed == set.in_sync_count() {
            // No in-sync replica has the write: the client gets the error.
            return Err(error);
        }
        for node in &failed {
            tracing::warn!(vdisk = %self.name, node, %error, "replica missed a write; recording it stale");
            if let Err(why) = self
                .coordinator
                .mark_stale(self.vdisk, *node, set.epoch)
                .await
            {
                tracing::error!(vdisk = %self.name, node, %why, "cannot record a stale replica; failing the write");
                return Err(BlockError::Io(format!(
                    "a replica missed the write and that could not be recorded: {why}"
                )));
            }
        }
        let mut current = self.set.write();
        if let Some(now) = current.as_ref()
            && now.epoch == set.epoch
        {
            *current = Some(Arc::new(now.without(&failed)));
        }
        Ok(())
    }

    async fn do_read(&self, offset: u64, len: u32) -> Result<IoBuf, BlockError> {
        check_range(offset, u64::from(len), self.size())?;
        if len > MAX_REQUEST_BYTES {
            return Err(BlockError::Invalid(format!(
                "read of {len} bytes exceeds the maximum"
            )));
        }
        let set = self.current_set().await?;
        let mut last_error = None;
        if let Some((_, local)) = set.local.as_ref().filter(|_| set.local_in_sync) {
            match local.read(offset, len).await {
                Ok(data) => return Ok(data),
                Err(error @ (BlockError::OutOfRange { .. } | BlockError::Invalid(_))) => {
                    return Err(error);
                }
                Err(error) => {
                    tracing::warn!(vdisk = %self.name, %error, "local replica read failed; trying the others");
                    last_error = Some(error);
                }
            }
        }
        let request = Request {
            op: Op::Read,
            fua: false,
            allocate: false,
            vdisk: self.vdisk,
            epoch: set.epoch,
            offset,
            length: u64::from(len),
        };
        for target in set.remotes.iter().filter(|r| r.in_sync) {
            match self.remote(target, request, Bytes::new()).await {
                Ok(data) if data.len() == len as usize => return Ok(IoBuf::from_slice(&data)),
                Ok(data) => {
                    last_error = Some(BlockError::Io(format!(
                        "replica on node {} returned {} bytes for a read of {len}",
                        target.node,
                        data.len()
                    )));
                }
                Err(Failure::Fenced(_)) => {
                    self.fence();
                    return Err(self.fenced_error());
                }
                Err(Failure::Failed(error)) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| BlockError::Io("no replica to read from".into())))
    }

    async fn do_write(
        &self,
        offset: u64,
        data: IoBuf,
        flags: WriteFlags,
    ) -> Result<(), BlockError> {
        let len = data.len() as u64;
        check_range(offset, len, self.size())?;
        if len > u64::from(MAX_REQUEST_BYTES) {
            return Err(BlockError::Invalid(format!(
                "write of {len} bytes exceeds the maximum"
            )));
        }
        if len == 0 {
            return Ok(());
        }
        if offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE) {
            let _shared = self.rmw.read().await;
            return self.write_blocks(offset, data, flags).await;
        }
        let _exclusive = self.rmw.write().await;
        let first = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        let covering = u32::try_from((end - first) * BLOCK_SIZE)
            .map_err(|_| BlockError::Invalid("write too large".into()))?;
        let mut blocks = self.do_read(first * BLOCK_SIZE, covering).await?;
        let skip = (offset - first * BLOCK_SIZE) as usize;
        blocks.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data.as_slice());
        self.write_blocks(first * BLOCK_SIZE, blocks, flags).await
    }

    async fn write_blocks(
        &self,
        offset: u64,
        data: IoBuf,
        flags: WriteFlags,
    ) -> Result<(), BlockError> {
        let set = self.current_set().await?;
        let request = Request {
            op: Op::Write,
            fua: flags.fua,
            allocate: false,
            vdisk: self.vdisk,
            epoch: set.epoch,
            offset,
            length: data.len() as u64,
        };
        let bytes = if set.remotes.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(data.as_slice())
        };
        self.fan_out(&set, request, bytes, move |replica| {
            Box::pin(async move { replica.write(offset, data, flags).await })
        })
        .await
    }

    async fn do_simple(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        allocate: bool,
        flags: WriteFlags,
    ) -> Result<(), BlockError> {
        if op != Op::Flush {
            check_range(offset, len, self.size())?;
        }
        let aligned = offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE);
        // Trims only drop whole blocks and flushes change no data: shared.
        let _guard = if aligned || op == Op::Flush || op == Op::Trim {
            RmwGuard::Shared(self.rmw.read().await)
        } else {
            RmwGuard::Exclusive(self.rmw.write().await)
        };
        let set = self.current_set().await?;
        let request = Request {
            op,
            fua: flags.fua,
            allocate,
            vdisk: self.vdisk,
            epoch: set.epoch,
            offset,
            length: len,
        };
        self.fan_out(&set, request, Bytes::new(), move |replica| {
            Box::pin(async move {
                match op {
                    Op::Flush => replica.flush().await,
                    Op::Trim => replica.trim(offset, len).await,
                    _ => replica.write_zeroes(offset, len, allocate, flags).await,
                }
            })
        })
        .await
    }

    async fn do_block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocationExtent>, BlockError> {
        check_range(offset, len, self.size())?;
        let set = self.current_set().await?;
        match set.local.as_ref().filter(|_| set.local_in_sync) {
            Some((_, local)) => local.block_status(offset, len).await,
            None => Ok(vec![AllocationExtent {
                length: len,
                hole: false,
                zero: false,
            }]),
        }
    }
}

/// Holds the read-modify-write lock either way until dropped (the guards
/// are kept for their `Drop`, never read).
enum RmwGuard<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

impl BlockBackend for ReplicatedVdisk {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn id(&self) -> String {
        self.name.clone()
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<IoBuf, BlockError>> {
        Box::pin(self.do_read(offset, len))
    }

    fn write(
        &self,
        offset: u64,
        data: IoBuf,
        flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.do_write(offset, data, flags))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.do_simple(Op::Flush, 0, 0, false, WriteFlags::default()))
    }

    fn trim(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.do_simple(Op::Trim, offset, len, false, WriteFlags::default()))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.do_simple(Op::Zero, offset, len, allocate, flags))
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<AllocationExtent>, BlockError>> {
        Box::pin(self.do_block_status(offset, len))
    }
}

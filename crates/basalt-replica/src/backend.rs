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
//! * a mutation that has not *settled* (see [`crate::dirty`]) may leave the
//!   in-sync replicas disagreeing on its blocks; every mutation carries a
//!   sequence number and the owner's settled mark, and a new owner compares
//!   the regions the replicas report unsettled and repairs them before it
//!   serves anything.
//!
//! Unaligned writes and zeroes are turned into whole-block operations here,
//! under an exclusive lock held until every replica has answered, so every
//! replica sees them in the same order.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use basalt_core::{
    AllocationExtent, BLOCK_SIZE, BlockBackend, BlockError, BoxFuture, IoBuf, WriteFlags,
    WriteSource, check_range, check_request_len, gather_source, whole_blocks,
};
use basalt_net::{NetError, TrafficClass, Transport};
use bytes::Bytes;
use tokio::sync::RwLock;

use crate::dirty::{DIRTY_REGION, DirtyReport};
use crate::protocol::{
    CODE_INVALID, CODE_NO_SPACE, CODE_STALE_EPOCH, DIGEST_PIECE, Op, Request, SERVICE_REPLICA,
};
use crate::service::{MutationGuard, ReplicaGate, digest};

/// How long a replica may take to answer before it is recorded stale.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read waits for this node to regain its read lease.
const READ_LEASE_WAIT: Duration = Duration::from_secs(3);

/// How much a new owner compares (and at most copies) per step.
const RECONCILE_CHUNK: u64 = 16 << 20;

/// The byte ranges covering `regions`, merged where adjacent and clipped
/// to `size`.
fn region_ranges(regions: &BTreeSet<u64>, size: u64) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for region in regions {
        let start = region.saturating_mul(DIRTY_REGION);
        if start >= size {
            continue;
        }
        let end = (start + DIRTY_REGION).min(size);
        match ranges.last_mut() {
            Some((first, len)) if *first + *len == start => *len = end - *first,
            _ => ranges.push((start, end - start)),
        }
    }
    ranges
}

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
    /// This node's replica when it is the vdisk's only copy and in sync:
    /// its result is the write's result, with nothing to record and nothing
    /// that could diverge.
    fn lone_local(&self) -> Option<&Arc<dyn BlockBackend>> {
        self.local
            .as_ref()
            .filter(|_| self.remotes.is_empty() && self.local_in_sync)
            .map(|(_, replica)| replica)
    }

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

    /// In-sync replicas by node, the local one first.
    fn in_sync_nodes(&self) -> Vec<u64> {
        self.local
            .iter()
            .filter(|_| self.local_in_sync)
            .map(|(node, _)| *node)
            .chain(self.remotes.iter().filter(|r| r.in_sync).map(|r| r.node))
            .collect()
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
    /// the replicas (recording stale those it cannot reach) and returns them
    /// with what each fenced replica reported unsettled.
    fn acquire(&self, vdisk: u64) -> BoxFuture<'static, Result<Acquired, BlockError>>;
    /// Whether this node may still serve reads as owner: it has reached a
    /// majority of the cluster recently enough that no other node can have
    /// taken the vdisk over and acknowledged writes without it knowing.
    fn holds_read_lease(&self) -> bool {
        true
    }

    /// Records durably that `node`'s replica missed a write under `epoch`.
    fn mark_stale(
        &self,
        vdisk: u64,
        node: u64,
        epoch: u64,
    ) -> BoxFuture<'static, Result<(), BlockError>>;
}

/// A fresh ownership: the replica set and the fence reports.
pub struct Acquired {
    /// The replicas, all fenced at `set.epoch`.
    pub set: ReplicaSet,
    /// What each fenced replica (by node) reported unsettled.
    pub reports: Vec<(u64, DirtyReport)>,
}

/// Numbers this owner's mutations and tracks which have settled.
#[derive(Default)]
struct WriteWindow {
    next: u64,
    unsettled: BTreeSet<u64>,
}

impl WriteWindow {
    /// A new mutation: its number and the settled mark to send with it.
    fn begin(&mut self) -> (u64, u64) {
        self.next += 1;
        let seq = self.next;
        self.unsettled.insert(seq);
        (seq, self.mark())
    }

    /// Every mutation numbered below the mark has settled.
    fn mark(&self) -> u64 {
        self.unsettled.first().copied().unwrap_or(self.next + 1)
    }
}

/// A mutation in flight; unless [`InFlight::settled`] is called it stays
/// unsettled for good (the replicas keep its regions noted, and the next
/// owner compares them), which is what a cancelled or failed part-way
/// mutation needs.
struct InFlight<'a> {
    window: &'a parking_lot::Mutex<WriteWindow>,
    seq: u64,
}

impl InFlight<'_> {
    fn settled(self) {
        self.window.lock().unsettled.remove(&self.seq);
    }
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
    gate: Arc<ReplicaGate>,
    window: parking_lot::Mutex<WriteWindow>,
    rmw: RwLock<()>,
    /// Held shared by every mutation while it fans out; taken exclusively
    /// by [`ReplicatedVdisk::refresh`] to wait out mutations that used the
    /// previous replica set.
    inflight: RwLock<()>,
}

impl ReplicatedVdisk {
    /// A backend for `vdisk`; ownership is taken on the first request.
    /// `gate` is this node's (local replicas are accessed through it).
    pub fn new(
        vdisk: u64,
        name: String,
        size: u64,
        transport: Transport,
        coordinator: Arc<dyn Coordinator>,
        gate: Arc<ReplicaGate>,
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
            gate,
            window: parking_lot::Mutex::new(WriteWindow::default()),
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

    /// Returns once no acquisition is under way (its replica set, computed
    /// when it started, is published by then and can be refreshed).
    pub async fn wait_for_acquisition(&self) {
        drop(self.acquiring.lock().await);
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
        let Acquired { set, reports } = self.coordinator.acquire(self.vdisk).await?;
        if set.in_sync_count() == 0 {
            return Err(BlockError::Io(format!(
                "vdisk {} has no in-sync replica on a live node",
                self.name
            )));
        }
        // Numbers restart with every epoch (notes are keyed by both).
        *self.window.lock() = WriteWindow::default();
        let set = Arc::new(self.reconcile(set, &reports).await?);
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
        mut request: Request,
        data: Bytes,
        local: L,
    ) -> Result<(), BlockError>
    where
        L: FnOnce(Arc<dyn BlockBackend>) -> BoxFuture<'static, Result<(), BlockError>>,
    {
        if let Some(replica) = set.lone_local() {
            let _admitted = self.admit_local(&request).await?;
            return local(replica.clone()).await;
        }
        let _inflight = self.inflight.read().await;
        // Flushes change no data: they carry the settled mark, no number.
        let (seq, settled) = if request.op == Op::Flush {
            (0, self.window.lock().mark())
        } else {
            self.window.lock().begin()
        };
        let in_flight = InFlight {
            window: &self.window,
            seq,
        };
        request.seq = seq;
        request.settled = settled;
        let local_future = set.local.clone().map(|(node, replica)| {
            let gate = self.gate.clone();
            let op = local(replica);
            async move {
                let result = match gate.begin_mutation(&request, request.length).await {
                    Ok(_admitted) => op.await.map_err(Failure::Failed),
                    Err(newer) => Err(Failure::Fenced(format!(
                        "this node has seen epoch {newer} of the vdisk"
                    ))),
                };
                (node, result)
            }
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
                    // Unsettled for good: some replicas may have applied it.
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
            in_flight.settled();
            return Ok(());
        };
        let in_sync_failed = failed.iter().filter(|n| set.is_in_sync(**n)).count();
        if in_sync_failed == set.in_sync_count() {
            // No in-sync replica has the write: the client gets the error.
            // It settled only if no replica at all applied it.
            if failed.len() == results.len() {
                in_flight.settled();
            }
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
        in_flight.settled();
        let mut current = self.set.write();
        if let Some(now) = current.as_ref()
            && now.epoch == set.epoch
        {
            *current = Some(Arc::new(now.without(&failed)));
        }
        Ok(())
    }

    /// Makes the in-sync replicas of a fresh ownership agree on every region
    /// a fenced replica reported unsettled — every region, when one could
    /// not tell — copying from the local replica when it is in sync, else
    /// from the first in-sync one; then tells the replicas it is done.
    async fn reconcile(
        &self,
        mut set: ReplicaSet,
        reports: &[(u64, DirtyReport)],
    ) -> Result<ReplicaSet, BlockError> {
        let in_sync = set.in_sync_nodes();
        if in_sync.len() >= 2 {
            let report_of = |node: u64| reports.iter().find(|(n, _)| *n == node).map(|(_, r)| r);
            let whole = in_sync
                .iter()
                .any(|node| report_of(*node).is_none_or(|r| !r.complete));
            let size = self.size();
            let ranges = if whole {
                vec![(0, size)]
            } else {
                let regions: BTreeSet<u64> = in_sync
                    .iter()
                    .filter_map(|node| report_of(*node))
                    .flat_map(|r| r.regions.iter().copied())
                    .collect();
                region_ranges(&regions, size)
            };
            let total: u64 = ranges.iter().map(|(_, len)| len).sum();
            if total > 0 {
                tracing::info!(vdisk = %self.name, bytes = total, whole, "comparing the in-sync replicas where a write may not have settled");
            }
            let mut repaired = 0;
            for (start, len) in ranges {
                let mut at = start;
                while at < start + len {
                    let chunk = (start + len - at).min(RECONCILE_CHUNK);
                    repaired += self.reconcile_range(&mut set, at, chunk).await?;
                    at += chunk;
                }
            }
            if repaired > 0 {
                tracing::warn!(vdisk = %self.name, bytes = repaired, "repaired in-sync replicas that disagreed after an unsettled write");
            }
        }
        let settled = self.window.lock().mark();
        if set.local.is_some() && self.gate.settle(self.vdisk, set.epoch, settled).is_err() {
            self.fence();
            return Err(self.fenced_error());
        }
        let settle = Request {
            settled,
            ..Request::new(Op::Settle, self.vdisk, set.epoch, 0, 0)
        };
        let settles = set.remotes.iter().map(|target| async move {
            (target.node, self.remote(target, settle, Bytes::new()).await)
        });
        for (node, result) in futures::future::join_all(settles).await {
            if result.is_err() {
                // Its notes stay: the next owner compares a little more.
                tracing::debug!(vdisk = %self.name, node, "a replica did not take the settle");
            }
        }
        Ok(set)
    }

    /// Compares `[offset, offset + len)` across the in-sync replicas and
    /// copies the differing pieces from the first; returns bytes repaired.
    /// A replica that fails is recorded stale and dropped from `set`.
    async fn reconcile_range(
        &self,
        set: &mut ReplicaSet,
        offset: u64,
        len: u64,
    ) -> Result<u64, BlockError> {
        let in_sync = set.in_sync_nodes();
        let digests = futures::future::join_all(
            in_sync
                .iter()
                .map(|node| self.digest_on(set, *node, offset, len)),
        )
        .await;
        let mut sums: Vec<(u64, Vec<u32>)> = Vec::new();
        let mut failed = Vec::new();
        for (node, result) in in_sync.iter().zip(digests) {
            match result {
                Ok(digest) => sums.push((*node, digest)),
                Err(Failure::Fenced(_)) => {
                    self.fence();
                    return Err(self.fenced_error());
                }
                Err(Failure::Failed(error)) => {
                    tracing::warn!(vdisk = %self.name, node, %error, "replica failed a comparison");
                    failed.push(*node);
                }
            }
        }
        self.drop_failed(set, &failed).await?;
        let Some(((source, reference), others)) = sums.split_first() else {
            return Err(BlockError::Io(format!(
                "no in-sync replica of {} could be read",
                self.name
            )));
        };
        let pieces = reference.len();
        let mut repaired = 0;
        let mut piece = 0;
        while piece < pieces {
            let differs = |i: usize| others.iter().any(|(_, d)| d.get(i) != reference.get(i));
            if !differs(piece) {
                piece += 1;
                continue;
            }
            let first = piece;
            while piece < pieces && differs(piece) {
                piece += 1;
            }
            let targets: Vec<u64> = others
                .iter()
                .filter(|(_, d)| d.get(first..piece) != reference.get(first..piece))
                .map(|(node, _)| *node)
                .collect();
            let at = offset + first as u64 * DIGEST_PIECE;
            let run = (piece as u64 * DIGEST_PIECE).min(len) - first as u64 * DIGEST_PIECE;
            let data = self.read_on(set, *source, at, run).await?;
            let (seq, _) = self.window.lock().begin();
            let in_flight = InFlight {
                window: &self.window,
                seq,
            };
            let write = Request {
                seq,
                ..Request::new(Op::Write, self.vdisk, set.epoch, at, run)
            };
            let writes = futures::future::join_all(
                targets
                    .iter()
                    .map(|node| self.write_on(set, *node, write, data.clone())),
            )
            .await;
            let mut failed = Vec::new();
            for (node, result) in targets.iter().zip(writes) {
                match result {
                    Ok(()) => {}
                    Err(Failure::Fenced(_)) => {
                        self.fence();
                        return Err(self.fenced_error());
                    }
                    Err(Failure::Failed(error)) => {
                        tracing::warn!(vdisk = %self.name, node, %error, "replica failed a repair");
                        failed.push(*node);
                    }
                }
            }
            self.drop_failed(set, &failed).await?;
            in_flight.settled();
            repaired += run * (targets.len() - failed.len()) as u64;
        }
        Ok(repaired)
    }

    /// Records `failed` replicas stale and leaves them out of `set`.
    async fn drop_failed(&self, set: &mut ReplicaSet, failed: &[u64]) -> Result<(), BlockError> {
        for node in failed {
            self.coordinator
                .mark_stale(self.vdisk, *node, set.epoch)
                .await
                .map_err(|why| {
                    BlockError::Io(format!(
                        "replica on node {node} failed and that could not be recorded: {why}"
                    ))
                })?;
        }
        if !failed.is_empty() {
            *set = set.without(failed);
        }
        Ok(())
    }

    fn target(set: &ReplicaSet, node: u64) -> Option<&ReplicaTarget> {
        set.remotes.iter().find(|r| r.node == node)
    }

    fn local_on(set: &ReplicaSet, node: u64) -> Option<Arc<dyn BlockBackend>> {
        set.local
            .as_ref()
            .filter(|(local, _)| *local == node)
            .map(|(_, replica)| replica.clone())
    }

    fn missing(node: u64) -> Failure {
        Failure::Failed(BlockError::Io(format!(
            "node {node} is not in the replica set"
        )))
    }

    async fn digest_on(
        &self,
        set: &ReplicaSet,
        node: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u32>, Failure> {
        let expected = len.div_ceil(DIGEST_PIECE) as usize;
        let sums = if let Some(local) = Self::local_on(set, node) {
            digest(local.as_ref(), offset, len)
                .await
                .map_err(Failure::Failed)?
        } else {
            let target = Self::target(set, node).ok_or_else(|| Self::missing(node))?;
            let request = Request::new(Op::Digest, self.vdisk, set.epoch, offset, len);
            let data = self.remote(target, request, Bytes::new()).await?;
            data.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        if sums.len() != expected {
            return Err(Failure::Failed(BlockError::Io(format!(
                "node {node} sent {} digests for {expected} pieces",
                sums.len()
            ))));
        }
        Ok(sums)
    }

    async fn read_on(
        &self,
        set: &ReplicaSet,
        node: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, BlockError> {
        let result = if let Some(local) = Self::local_on(set, node) {
            let len =
                u32::try_from(len).map_err(|_| BlockError::Invalid("range too long".into()))?;
            local
                .read(offset, len)
                .await
                .map(|data| Bytes::copy_from_slice(data.as_slice()))
        } else {
            let target =
                Self::target(set, node).ok_or_else(|| BlockError::Io("no such replica".into()))?;
            let request = Request::new(Op::Read, self.vdisk, set.epoch, offset, len);
            match self.remote(target, request, Bytes::new()).await {
                Ok(data) => Ok(data),
                Err(Failure::Fenced(_)) => {
                    self.fence();
                    Err(self.fenced_error())
                }
                Err(Failure::Failed(error)) => Err(error),
            }
        };
        match result {
            Ok(data) if data.len() as u64 == len => Ok(data),
            Ok(data) => Err(BlockError::Io(format!(
                "node {node} returned {} bytes for a read of {len}",
                data.len()
            ))),
            Err(error) => Err(error),
        }
    }

    async fn write_on(
        &self,
        set: &ReplicaSet,
        node: u64,
        request: Request,
        data: Bytes,
    ) -> Result<(), Failure> {
        if let Some(local) = Self::local_on(set, node) {
            let _admitted = self
                .gate
                .begin_mutation(&request, request.length)
                .await
                .map_err(|newer| Failure::Fenced(format!("epoch {newer} owns it")))?;
            return local
                .write(
                    request.offset,
                    IoBuf::from_slice(&data),
                    WriteFlags::default(),
                )
                .await
                .map_err(Failure::Failed);
        }
        let target = Self::target(set, node).ok_or_else(|| Self::missing(node))?;
        self.remote(target, request, data).await.map(|_| ())
    }

    /// Waits a little for the read lease (a node that just started has not
    /// reached the others yet); fails the read if it stays lost.
    async fn await_read_lease(&self) -> Result<(), BlockError> {
        let deadline = tokio::time::Instant::now() + READ_LEASE_WAIT;
        while !self.coordinator.holds_read_lease() {
            if tokio::time::Instant::now() >= deadline {
                return Err(BlockError::Io(format!(
                    "this node lost contact with the cluster majority; reads of {} are refused until it is back (another node may own the vdisk now)",
                    self.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Admits a mutation of the only (local) replica through this node's gate.
    async fn admit_local(&self, request: &Request) -> Result<MutationGuard, BlockError> {
        match self.gate.begin_mutation(request, request.length).await {
            Ok(admitted) => Ok(admitted),
            Err(newer) => {
                tracing::warn!(vdisk = %self.name, newer, "fenced on this node");
                self.fence();
                Err(self.fenced_error())
            }
        }
    }

    async fn do_read(&self, offset: u64, len: u32) -> Result<IoBuf, BlockError> {
        check_range(offset, u64::from(len), self.size())?;
        check_request_len("read", u64::from(len))?;
        let set = self.current_set().await?;
        self.await_read_lease().await?;
        let mut last_error = None;
        if let Some((_, local)) = set.local.as_ref().filter(|_| set.local_in_sync) {
            if self.gate.epochs().admit(self.vdisk, set.epoch).is_err() {
                self.fence();
                return Err(self.fenced_error());
            }
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
        let request = Request::new(Op::Read, self.vdisk, set.epoch, offset, u64::from(len));
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
        check_request_len("write", len)?;
        if len == 0 {
            return Ok(());
        }
        if whole_blocks(offset, len) {
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

    /// A block-aligned write to a vdisk whose only copy is this node's goes
    /// to that copy with its source, so the store can write while it copies;
    /// every other write takes its bytes first (replicas need all of them
    /// before anything is sent).
    async fn do_write_from(
        &self,
        offset: u64,
        len: u32,
        source: &mut dyn WriteSource,
        flags: WriteFlags,
    ) -> Result<(), BlockError> {
        check_request_len("write", u64::from(len))?;
        let aligned = whole_blocks(offset, u64::from(len));
        if aligned && len > 0 {
            check_range(offset, u64::from(len), self.size())?;
            let _shared = self.rmw.read().await;
            let set = self.current_set().await?;
            if let Some(replica) = set.lone_local() {
                let request = Request {
                    fua: flags.fua,
                    ..Request::new(Op::Write, self.vdisk, set.epoch, offset, u64::from(len))
                };
                let _admitted = self.admit_local(&request).await?;
                return replica.write_from(offset, len, source, flags).await;
            }
            let data = gather_source(source, len as usize)?;
            return self.write_blocks(offset, data, flags).await;
        }
        let data = gather_source(source, len as usize)?;
        self.do_write(offset, data, flags).await
    }

    async fn write_blocks(
        &self,
        offset: u64,
        data: IoBuf,
        flags: WriteFlags,
    ) -> Result<(), BlockError> {
        let set = self.current_set().await?;
        let request = Request {
            fua: flags.fua,
            ..Request::new(Op::Write, self.vdisk, set.epoch, offset, data.len() as u64)
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
        let aligned = whole_blocks(offset, len);
        // Trims only drop whole blocks and flushes change no data: shared.
        let _guard = if aligned || op == Op::Flush || op == Op::Trim {
            RmwGuard::Shared(self.rmw.read().await)
        } else {
            RmwGuard::Exclusive(self.rmw.write().await)
        };
        let set = self.current_set().await?;
        let request = Request {
            fua: flags.fua,
            allocate,
            ..Request::new(op, self.vdisk, set.epoch, offset, len)
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

    fn write_from<'a>(
        &'a self,
        offset: u64,
        len: u32,
        source: &'a mut dyn WriteSource,
        flags: WriteFlags,
    ) -> BoxFuture<'a, Result<(), BlockError>> {
        Box::pin(self.do_write_from(offset, len, source, flags))
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

//! The replica side: serves the owner's requests against the local copy,
//! refusing owners whose epoch has been superseded.
//!
//! Every access to a local replica — from a remote owner through the
//! [`ReplicaService`], or from an owner on this node — passes the node's
//! [`ReplicaGate`], so that the epoch fence, the dirty-region notes and the
//! resync's record of owner writes hold for both alike.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use basalt_core::{BlockBackend, BlockError, IoBuf, MAX_REQUEST_BYTES, WriteFlags};
use basalt_net::{Handler, Incoming, RemoteError, Reply};
use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::RwLock;

use crate::dirty::{DirtyReport, DirtyTable};
use crate::protocol::{
    CODE_INVALID, CODE_IO, CODE_NO_REPLICA, CODE_NO_SPACE, CODE_STALE_EPOCH, DIGEST_PIECE,
    MAX_DIGEST_BYTES, Op, Request,
};

/// This node's copies of vdisks, by vdisk id.
pub trait LocalReplicas: Send + Sync + 'static {
    /// The local copy of `vdisk`, if this node holds one.
    fn replica(&self, vdisk: u64) -> Option<Arc<dyn BlockBackend>>;
}

/// The newest ownership epoch seen per vdisk. A request under an older epoch
/// is refused: once a new owner has fenced a replica (or the replica has
/// applied the new epoch from Raft), the old owner can never write to it
/// again.
#[derive(Debug, Default)]
pub struct EpochTable {
    epochs: RwLock<HashMap<u64, u64>>,
}

impl EpochTable {
    /// An empty table.
    pub fn new() -> EpochTable {
        EpochTable::default()
    }

    /// Raises the vdisk's epoch to at least `epoch` (from Raft or a fence).
    pub fn raise(&self, vdisk: u64, epoch: u64) {
        let mut epochs = self.epochs.write();
        let entry = epochs.entry(vdisk).or_insert(0);
        *entry = (*entry).max(epoch);
    }

    /// Admits a request under `epoch`, raising the table to it; `Err` with
    /// the newer epoch when it is stale.
    pub fn admit(&self, vdisk: u64, epoch: u64) -> Result<(), u64> {
        // Nearly always the current epoch: settled under the read lock.
        match self.epochs.read().get(&vdisk) {
            Some(current) if *current > epoch => return Err(*current),
            Some(current) if *current == epoch => return Ok(()),
            _ => {}
        }
        let mut epochs = self.epochs.write();
        let entry = epochs.entry(vdisk).or_insert(0);
        if *entry > epoch {
            return Err(*entry);
        }
        *entry = epoch;
        Ok(())
    }

    /// The newest epoch seen for `vdisk`.
    pub fn current(&self, vdisk: u64) -> u64 {
        self.epochs.read().get(&vdisk).copied().unwrap_or(0)
    }

    /// Forgets a deleted vdisk.
    pub fn forget(&self, vdisk: u64) {
        self.epochs.write().remove(&vdisk);
    }
}

/// Blocks of one vdisk written by its owner while a resync of the local
/// copy runs. The resync never overwrites them with the (older) data it
/// copies: it checks and writes under the same lock the owner's writes
/// record under.
#[derive(Debug, Default)]
pub struct WrittenBlocks {
    blocks: tokio::sync::Mutex<BTreeSet<u64>>,
}

impl WrittenBlocks {
    /// Records `[offset, offset + len)` as written by the owner.
    pub async fn record(&self, offset: u64, len: u64) {
        let first = offset / basalt_core::BLOCK_SIZE;
        let end = (offset + len).div_ceil(basalt_core::BLOCK_SIZE);
        let mut blocks = self.blocks.lock().await;
        blocks.extend(first..end);
    }

    /// The set, locked: owner writes wait while the resync holds it.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.blocks.lock().await
    }
}

/// The resyncs running on this node, by vdisk.
#[derive(Debug, Default)]
pub struct ResyncTrackers {
    active: parking_lot::Mutex<HashMap<u64, Arc<WrittenBlocks>>>,
}

impl ResyncTrackers {
    /// An empty registry.
    pub fn new() -> ResyncTrackers {
        ResyncTrackers::default()
    }

    /// Starts tracking owner writes to `vdisk`.
    pub fn start(&self, vdisk: u64) -> Arc<WrittenBlocks> {
        let blocks = Arc::new(WrittenBlocks::default());
        self.active.lock().insert(vdisk, blocks.clone());
        blocks
    }

    /// Stops tracking `vdisk`.
    pub fn stop(&self, vdisk: u64) {
        self.active.lock().remove(&vdisk);
    }

    fn get(&self, vdisk: u64) -> Option<Arc<WrittenBlocks>> {
        self.active.lock().get(&vdisk).cloned()
    }
}

/// What every access to this node's replicas passes (see the module docs).
///
/// A mutation holds its vdisk's gate shared from admission until it has
/// been applied; a fence takes it exclusively. So when a new owner's fence
/// returns, every mutation of an older owner has either been applied — and
/// noted in the [`DirtyTable`] the fence reports — or will be refused.
#[derive(Debug, Default)]
pub struct ReplicaGate {
    epochs: EpochTable,
    dirty: DirtyTable,
    resyncs: ResyncTrackers,
    gates: parking_lot::Mutex<HashMap<u64, Arc<tokio::sync::RwLock<()>>>>,
}

/// An admitted mutation; the gate stays shared until it is dropped.
pub struct MutationGuard {
    _gate: tokio::sync::OwnedRwLockReadGuard<()>,
}

impl ReplicaGate {
    /// The gate of a process that just started (every vdisk's notes unknown).
    pub fn new() -> ReplicaGate {
        ReplicaGate::default()
    }

    /// Newest epochs seen.
    pub fn epochs(&self) -> &EpochTable {
        &self.epochs
    }

    /// Dirty-region notes.
    pub fn dirty(&self) -> &DirtyTable {
        &self.dirty
    }

    /// Resyncs running on this node.
    pub fn resyncs(&self) -> &ResyncTrackers {
        &self.resyncs
    }

    fn gate(&self, vdisk: u64) -> Arc<tokio::sync::RwLock<()>> {
        self.gates.lock().entry(vdisk).or_default().clone()
    }

    /// Admits a mutation (write, trim, zeroes, flush) of `request`, which
    /// covers `len` bytes: `Err` with the newer epoch when the sender has
    /// been fenced. Notes it as unsettled and applies the sender's settled
    /// mark.
    pub async fn begin_mutation(&self, request: &Request, len: u64) -> Result<MutationGuard, u64> {
        let gate = self.gate(request.vdisk).read_owned().await;
        self.epochs.admit(request.vdisk, request.epoch)?;
        if matches!(request.op, Op::Write | Op::Trim | Op::Zero) {
            self.dirty.record(
                request.vdisk,
                request.epoch,
                request.seq,
                request.offset,
                len,
            );
            if let Some(written) = self.resyncs.get(request.vdisk) {
                written.record(request.offset, len).await;
            }
        }
        self.dirty
            .sweep(request.vdisk, request.epoch, request.settled);
        Ok(MutationGuard { _gate: gate })
    }

    /// Fences `vdisk` at `epoch` once no older mutation is still being
    /// applied, and returns what may be unsettled.
    pub async fn fence(&self, vdisk: u64, epoch: u64) -> Result<DirtyReport, u64> {
        let _exclusive = self.gate(vdisk).write_owned().await;
        self.epochs.admit(vdisk, epoch)?;
        Ok(self.dirty.report(vdisk))
    }

    /// The owner under `epoch` reconciled what it was reported, and its own
    /// repairs numbered below `settled` have settled.
    pub fn settle(&self, vdisk: u64, epoch: u64, settled: u64) -> Result<(), u64> {
        self.epochs.admit(vdisk, epoch)?;
        self.dirty.settle(vdisk, epoch);
        self.dirty.sweep(vdisk, epoch, settled);
        Ok(())
    }

    /// Forgets a deleted vdisk.
    pub fn forget(&self, vdisk: u64) {
        self.epochs.forget(vdisk);
        self.dirty.forget(vdisk);
        self.gates.lock().remove(&vdisk);
    }
}

/// Serves [`crate::SERVICE_REPLICA`].
pub struct ReplicaService {
    local: Arc<dyn LocalReplicas>,
    gate: Arc<ReplicaGate>,
}

impl ReplicaService {
    /// Serves the replicas in `local` through `gate`.
    pub fn new(local: Arc<dyn LocalReplicas>, gate: Arc<ReplicaGate>) -> ReplicaService {
        ReplicaService { local, gate }
    }
}

/// CRC-32C of every [`DIGEST_PIECE`] of `[offset, offset + len)` of `replica`.
pub async fn digest(
    replica: &dyn BlockBackend,
    offset: u64,
    len: u64,
) -> Result<Vec<u32>, BlockError> {
    let mut sums = Vec::with_capacity(len.div_ceil(DIGEST_PIECE) as usize);
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let chunk = (end - at).min(1 << 20);
        let data = replica.read(at, chunk as u32).await?;
        sums.extend(
            data.as_slice()
                .chunks(DIGEST_PIECE as usize)
                .map(crc32c::crc32c),
        );
        at += chunk;
    }
    Ok(sums)
}

/// Maps a local failure to the error a remote owner sees.
pub fn remote_error(error: BlockError) -> RemoteError {
    let code = match &error {
        BlockError::NoSpace => CODE_NO_SPACE,
        BlockError::OutOfRange { .. } | BlockError::Invalid(_) => CODE_INVALID,
        _ => CODE_IO,
    };
    RemoteError::new(code, error.to_string())
}

fn fenced(request: &Request, newer: u64) -> RemoteError {
    RemoteError::new(
        CODE_STALE_EPOCH,
        format!(
            "epoch {} of vdisk {} is fenced: epoch {newer} owns it now",
            request.epoch, request.vdisk
        ),
    )
}

async fn serve(
    local: Arc<dyn LocalReplicas>,
    gate: Arc<ReplicaGate>,
    body: Bytes,
    data: Bytes,
) -> Result<Reply, RemoteError> {
    let request = Request::decode(&body).map_err(|why| RemoteError::new(CODE_INVALID, why))?;
    match request.op {
        Op::Fence => {
            let report = gate
                .fence(request.vdisk, request.epoch)
                .await
                .map_err(|newer| fenced(&request, newer))?;
            return Ok(Reply {
                body: Bytes::new(),
                data: Bytes::from(report.encode()),
            });
        }
        Op::Settle => {
            gate.settle(request.vdisk, request.epoch, request.settled)
                .map_err(|newer| fenced(&request, newer))?;
            return Ok(Reply::default());
        }
        Op::Read | Op::Digest => {
            gate.epochs()
                .admit(request.vdisk, request.epoch)
                .map_err(|newer| fenced(&request, newer))?;
        }
        Op::Write | Op::Flush | Op::Trim | Op::Zero => {}
    }
    let replica = local.replica(request.vdisk).ok_or_else(|| {
        RemoteError::new(
            CODE_NO_REPLICA,
            format!("this node holds no replica of vdisk {}", request.vdisk),
        )
    })?;
    let flags = WriteFlags { fua: request.fua };
    match request.op {
        Op::Write => {
            if data.len() > MAX_REQUEST_BYTES as usize {
                return Err(RemoteError::new(
                    CODE_INVALID,
                    "write exceeds the maximum request",
                ));
            }
            let _admitted = gate
                .begin_mutation(&request, data.len() as u64)
                .await
                .map_err(|newer| fenced(&request, newer))?;
            replica
                .write(request.offset, IoBuf::from_slice(&data), flags)
                .await
                .map_err(remote_error)?;
            Ok(Reply::default())
        }
        Op::Read => {
            let len = u32::try_from(request.length)
                .ok()
                .filter(|len| *len <= MAX_REQUEST_BYTES)
                .ok_or_else(|| {
                    RemoteError::new(CODE_INVALID, "read exceeds the maximum request")
                })?;
            let buf = replica
                .read(request.offset, len)
                .await
                .map_err(remote_error)?;
            Ok(Reply {
                body: Bytes::new(),
                data: Bytes::copy_from_slice(buf.as_slice()),
            })
        }
        Op::Flush => {
            let _admitted = gate
                .begin_mutation(&request, 0)
                .await
                .map_err(|newer| fenced(&request, newer))?;
            replica.flush().await.map_err(remote_error)?;
            Ok(Reply::default())
        }
        Op::Trim | Op::Zero => {
            let _admitted = gate
                .begin_mutation(&request, request.length)
                .await
                .map_err(|newer| fenced(&request, newer))?;
            if request.op == Op::Trim {
                replica
                    .trim(request.offset, request.length)
                    .await
                    .map_err(remote_error)?;
            } else {
                replica
                    .write_zeroes(request.offset, request.length, request.allocate, flags)
                    .await
                    .map_err(remote_error)?;
            }
            Ok(Reply::default())
        }
        Op::Digest => {
            if request.length > MAX_DIGEST_BYTES {
                return Err(RemoteError::new(CODE_INVALID, "digest range too large"));
            }
            let sums = digest(replica.as_ref(), request.offset, request.length)
                .await
                .map_err(remote_error)?;
            let bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
            Ok(Reply {
                body: Bytes::new(),
                data: Bytes::from(bytes),
            })
        }
        Op::Fence | Op::Settle => Ok(Reply::default()),
    }
}

impl Handler for ReplicaService {
    fn handle(&self, request: Incoming) -> BoxFuture<'static, Result<Reply, RemoteError>> {
        Box::pin(serve(
            self.local.clone(),
            self.gate.clone(),
            request.body,
            request.data,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fence_waits_for_older_mutations_and_then_refuses_them() {
        let gate = Arc::new(ReplicaGate::new());
        gate.dirty().mark_known(1);
        let write = |epoch, seq| Request {
            seq,
            settled: 1,
            ..Request::new(Op::Write, 1, epoch, 3 << 20, 4096)
        };
        let applying = gate
            .begin_mutation(&write(1, 1), 4096)
            .await
            .expect("admitted");
        let fencing = tokio::spawn({
            let gate = gate.clone();
            async move { gate.fence(1, 2).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !fencing.is_finished(),
            "the fence did not wait for the mutation being applied"
        );
        drop(applying);
        let report = fencing.await.expect("fence task").expect("fence");
        assert_eq!(report.regions, vec![3], "the applied mutation is reported");
        assert!(gate.begin_mutation(&write(1, 2), 4096).await.is_err());
        assert!(gate.begin_mutation(&write(2, 1), 4096).await.is_ok());
        assert_eq!(gate.fence(1, 1).await, Err(2), "an older fence is refused");
    }

    #[test]
    fn older_epochs_are_refused_and_newer_ones_raise_the_table() {
        let table = EpochTable::new();
        assert_eq!(table.admit(1, 3), Ok(()));
        assert_eq!(table.admit(1, 2), Err(3));
        assert_eq!(table.admit(1, 3), Ok(()));
        table.raise(1, 5);
        assert_eq!(table.admit(1, 4), Err(5));
        assert_eq!(table.admit(1, 6), Ok(()));
        assert_eq!(table.current(1), 6);
        table.raise(1, 2);
        assert_eq!(table.current(1), 6, "raising never lowers");
        assert_eq!(table.admit(2, 0), Ok(()), "vdisks are independent");
    }
}

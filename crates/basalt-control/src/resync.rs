//! Resync: bringing a stale replica back in sync by copying only what
//! differs.
//!
//! A replica goes stale when it misses a write (its node was down, or
//! unreachable) or when it is placed on a node anew (its first node died).
//! The node holding a stale replica resyncs it itself:
//!
//! 1. it starts recording the blocks the owner writes to its copy from now
//!    on ([`WrittenBlocks`]) and asks the owner to include the copy in every
//!    write (the *barrier*: the owner answers once no write that skipped the
//!    copy is still in flight);
//! 2. it walks the vdisk in chunks, taking chunks from the in-sync replicas
//!    in turn (so every healthy replica serves its share), compares CRC-32C
//!    digests of 64 KiB pieces with its own copy, and fetches only pieces
//!    that differ — a node back from a short absence copies what changed
//!    while it was away, a resync interrupted by a restart starts over but
//!    finds the pieces it already copied equal;
//! 3. it writes fetched pieces without touching blocks the owner wrote
//!    meanwhile (those are newer than anything it fetched);
//! 4. it proposes `ResyncDone` with the replica's seq from the start; Raft
//!    refuses it if the replica missed a write in between (seq moved), and
//!    the next pass catches up.
//!
//! Copies travel as background-class frames, so foreground replication on
//! the same connections keeps its share of the link.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use basalt_core::{BLOCK_SIZE, BlockBackend, IoBuf, WriteFlags};
use basalt_meta::{ClusterState, Command, CommandResult, NodeId, ReplicaState};
use basalt_net::{NetError, TrafficClass};
use basalt_replica::{DIGEST_PIECE, Op, Request, SERVICE_REPLICA, digest};
use bytes::Bytes;
use futures::StreamExt;

use crate::node::Node;

/// Bytes compared per step (and taken from one source replica).
const CHUNK: u64 = 4 << 20;
/// Chunks compared and copied at the same time.
const CHUNKS_IN_FLIGHT: usize = 2;
/// Rest after each chunk, as a fraction of the time the chunk took.
const RESYNC_REST: f64 = 1.0;
/// How often the node looks for stale replicas of its own to resync.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// How far a resync has come.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Bytes of the vdisk compared so far.
    pub done: u64,
    /// Size of the vdisk.
    pub total: u64,
    /// Bytes fetched from other replicas (the pieces that differed).
    pub copied: u64,
}

/// Resyncs this node's stale replicas, one vdisk at a time, forever.
pub(crate) async fn resync_forever(node: std::sync::Weak<Node>) {
    loop {
        tokio::time::sleep(SCAN_INTERVAL).await;
        let Some(node) = node.upgrade() else { return };
        let state = node.cluster().cluster();
        let me = node.node_id();
        if me == 0 {
            continue;
        }
        let stale: Vec<(u64, u64)> = state
            .vdisks
            .values()
            .filter_map(|v| {
                let mine = v
                    .replicas
                    .iter()
                    .find(|r| r.node == me && r.state == ReplicaState::Stale && !r.lost)?;
                let has_source = v.in_sync().any(|n| n != me && state.is_up(n));
                has_source.then_some((v.id, mine.seq))
            })
            .collect();
        for (vdisk, seq) in stale {
            match resync(&node, vdisk, seq).await {
                Ok(progress) => tracing::info!(
                    vdisk,
                    copied = progress.copied,
                    compared = progress.done,
                    "replica resynced"
                ),
                Err(why) => tracing::warn!(vdisk, %why, "resync did not finish; retrying"),
            }
        }
    }
}

/// Removes the tracker and the progress entry when a resync ends.
struct Running<'a> {
    node: &'a Node,
    vdisk: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.node.gate().resyncs().stop(self.vdisk);
        self.node.resync_progress.lock().remove(&self.vdisk);
    }
}

async fn resync(node: &Node, vdisk: u64, seq: u64) -> Result<Progress, String> {
    let me = node.node_id();
    let written = node.gate().resyncs().start(vdisk);
    let _running = Running { node, vdisk };
    barrier(node, vdisk).await?;
    let state = node.cluster().cluster();
    let record = state
        .vdisks
        .get(&vdisk)
        .ok_or("the vdisk was deleted")?
        .clone();
    let sources: Vec<(NodeId, String)> = record
        .in_sync()
        .filter(|n| *n != me && state.is_up(*n))
        .filter_map(|n| state.nodes.get(&n).map(|m| (n, m.listen.clone())))
        .collect();
    if sources.is_empty() {
        return Err("no in-sync replica on a live node to copy from".into());
    }
    let local = crate::cluster::local_copy(node, vdisk)
        .await
        .ok_or("the local copy does not exist")?;
    let mut progress = Progress {
        total: record.size,
        ..Progress::default()
    };
    node.resync_progress.lock().insert(vdisk, progress);
    let chunks: Vec<(u64, u64, usize)> = (0..record.size.div_ceil(CHUNK))
        .map(|i| {
            let offset = i * CHUNK;
            (
                offset,
                CHUNK.min(record.size - offset),
                i as usize % sources.len(),
            )
        })
        .collect();
    // A few chunks in flight, each from its own source in turn.
    let mut copies = futures::stream::iter(chunks)
        .map(|(offset, len, source)| {
            let addr = sources[source].1.clone();
            let local = local.clone();
            let written = written.clone();
            async move {
                let copied = copy_chunk(node, &addr, vdisk, &local, &written, offset, len).await?;
                Ok::<_, String>((offset + len, copied))
            }
        })
        .buffered(CHUNKS_IN_FLIGHT);
    let mut last = tokio::time::Instant::now();
    while let Some(done) = copies.next().await {
        let (end, copied) = done?;
        // Throttle: after each chunk, rest as long as the chunk took (scaled
        // by the chunks in flight), so a resync takes at most about half of
        // what the source and this node can do and foreground I/O keeps the
        // rest.
        let busy = last.elapsed();
        tokio::time::sleep(busy.mul_f64(RESYNC_REST)).await;
        last = tokio::time::Instant::now();
        progress.copied += copied;
        progress.done = progress.done.max(end);
        node.resync_copied.fetch_add(copied, Ordering::Relaxed);
        node.resync_progress.lock().insert(vdisk, progress);
        if !still_stale(&node.cluster().cluster(), vdisk, me, seq) {
            return Err("the replica changed meanwhile (missed a write, moved or deleted)".into());
        }
    }
    local
        .flush()
        .await
        .map_err(|e| format!("flushing the local copy: {e}"))?;
    match node
        .cluster()
        .propose(Command::ResyncDone {
            vdisk,
            node: me,
            seq,
        })
        .await
        .map_err(|e| e.to_string())?
    {
        CommandResult::Refused { reason, .. } => Err(reason),
        _ => Ok(progress),
    }
}

/// Compares one chunk with the source and copies the pieces that differ
/// (consecutive ones in one request). Returns the bytes copied.
async fn copy_chunk(
    node: &Node,
    addr: &str,
    vdisk: u64,
    local: &Arc<dyn BlockBackend>,
    written: &basalt_replica::WrittenBlocks,
    offset: u64,
    len: u64,
) -> Result<u64, String> {
    let epoch = node.gate().epochs().current(vdisk);
    let (theirs, ours) = tokio::join!(
        remote_digest(node, addr, vdisk, epoch, offset, len),
        digest(local.as_ref(), offset, len)
    );
    let theirs = theirs?;
    let ours = ours.map_err(|e| format!("reading the local copy: {e}"))?;
    let mut copied = 0;
    for (first, count) in differing_runs(&theirs, &ours) {
        let at = offset + first as u64 * DIGEST_PIECE;
        let run_len = (count as u64 * DIGEST_PIECE).min(offset + len - at);
        let data = remote_read(node, addr, vdisk, epoch, at, run_len).await?;
        write_unwritten(local.as_ref(), written, at, &data).await?;
        copied += run_len;
    }
    Ok(copied)
}

/// Runs `(first piece, count)` where the two digest lists differ.
fn differing_runs(theirs: &[u32], ours: &[u32]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (piece, (a, b)) in theirs.iter().zip(ours.iter()).enumerate() {
        if a == b {
            continue;
        }
        match runs.last_mut() {
            Some((first, count)) if *first + *count == piece => *count += 1,
            _ => runs.push((piece, 1)),
        }
    }
    runs
}

fn still_stale(state: &ClusterState, vdisk: u64, me: NodeId, seq: u64) -> bool {
    state.vdisks.get(&vdisk).is_some_and(|v| {
        v.replicas
            .iter()
            .any(|r| r.node == me && r.seq == seq && r.state == ReplicaState::Stale)
    })
}

/// Makes sure the owner (if any) writes to this node's copy from now on.
async fn barrier(node: &Node, vdisk: u64) -> Result<(), String> {
    let me = node.node_id();
    let state = node.cluster().cluster();
    let record = state.vdisks.get(&vdisk).ok_or("the vdisk was deleted")?;
    let Some(owner) = record.owner.filter(|o| state.is_up(*o)) else {
        // No live owner: whoever takes the vdisk over reads the state that
        // places this replica, and writes to it.
        return Ok(());
    };
    if owner == me {
        node.refresh_backend(vdisk, true).await;
        return Ok(());
    }
    let addr = state
        .nodes
        .get(&owner)
        .map(|n| n.listen.clone())
        .ok_or("the owner is not a member")?;
    let body = serde_json::to_vec(&crate::cluster::ControlRequest::Barrier { vdisk, replica: me })
        .map_err(|e| e.to_string())?;
    node.transport()
        .call_timeout(
            &addr,
            TrafficClass::Control,
            crate::cluster::SERVICE_CONTROL,
            Bytes::from(body),
            Bytes::new(),
            Duration::from_secs(15),
        )
        .await
        .map_err(|e| {
            format!("the owner (node {owner}) did not confirm it writes to this copy: {e}")
        })?;
    Ok(())
}

async fn call(node: &Node, addr: &str, request: Request) -> Result<Bytes, String> {
    node.transport()
        .call_timeout(
            addr,
            TrafficClass::Background,
            SERVICE_REPLICA,
            request.encode(),
            Bytes::new(),
            Duration::from_secs(30),
        )
        .await
        .map(|reply| reply.data)
        .map_err(|e: NetError| format!("source replica at {addr}: {e}"))
}

async fn remote_digest(
    node: &Node,
    addr: &str,
    vdisk: u64,
    epoch: u64,
    offset: u64,
    len: u64,
) -> Result<Vec<u32>, String> {
    let data = call(
        node,
        addr,
        Request::new(Op::Digest, vdisk, epoch, offset, len),
    )
    .await?;
    let expected = len.div_ceil(DIGEST_PIECE) as usize;
    if data.len() != expected * 4 {
        return Err(format!(
            "source sent {} digest bytes, expected {}",
            data.len(),
            expected * 4
        ));
    }
    Ok(data
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

async fn remote_read(
    node: &Node,
    addr: &str,
    vdisk: u64,
    epoch: u64,
    offset: u64,
    len: u64,
) -> Result<Bytes, String> {
    let data = call(
        node,
        addr,
        Request::new(Op::Read, vdisk, epoch, offset, len),
    )
    .await?;
    if data.len() as u64 != len {
        return Err(format!(
            "source sent {} bytes for a read of {len}",
            data.len()
        ));
    }
    Ok(data)
}

/// Writes `data` at `offset` except the blocks the owner wrote meanwhile.
async fn write_unwritten(
    local: &dyn BlockBackend,
    written: &basalt_replica::WrittenBlocks,
    offset: u64,
    data: &[u8],
) -> Result<(), String> {
    let blocks = written.lock().await;
    let first = offset / BLOCK_SIZE;
    let count = data.len() as u64 / BLOCK_SIZE;
    for (start, len) in unwritten_runs(&blocks, first, count) {
        let from = ((start - first) * BLOCK_SIZE) as usize;
        let to = from + (len * BLOCK_SIZE) as usize;
        local
            .write(
                start * BLOCK_SIZE,
                IoBuf::from_slice(&data[from..to]),
                WriteFlags::default(),
            )
            .await
            .map_err(|e| format!("writing the local copy: {e}"))?;
    }
    Ok(())
}

/// Runs `(first block, length)` of `[first, first + count)` not in `written`.
fn unwritten_runs(written: &BTreeSet<u64>, first: u64, count: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut run_start = None;
    for block in first..first + count {
        let free = !written.contains(&block);
        match (free, run_start) {
            (true, None) => run_start = Some(block),
            (false, Some(start)) => {
                runs.push((start, block - start));
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        runs.push((start, first + count - start));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_pieces_are_fetched_in_runs() {
        assert_eq!(
            differing_runs(&[1, 2, 3, 4, 5, 6], &[1, 0, 0, 4, 0, 6]),
            vec![(1, 2), (4, 1)]
        );
        assert!(differing_runs(&[7, 7], &[7, 7]).is_empty());
    }

    #[test]
    fn runs_skip_the_blocks_the_owner_wrote() {
        let written: BTreeSet<u64> = [3, 4, 9].into_iter().collect();
        assert_eq!(
            unwritten_runs(&written, 0, 12),
            vec![(0, 3), (5, 4), (10, 2)]
        );
        assert_eq!(unwritten_runs(&written, 3, 2), vec![]);
        assert_eq!(unwritten_runs(&BTreeSet::new(), 7, 3), vec![(7, 3)]);
    }
}

//! The oplog: group commit on the way in, replay on the way back.
//!
//! One writer task per disk takes the oldest gathered batch, places it in the
//! ring, and writes header and data in one vectored I/O, through the page
//! cache ([`basalt_disk::DiskEngine::write_at_cached`]) so that it does not
//! wait behind the data writes queued at the device. Only one batch's
//! own write is outstanding per disk, so while it is being written the next
//! one gathers everything that arrives (group commit); a batch that only
//! waits for the copy-on-write data its records point at does not hold up
//! the next. Batches complete in LSN order. A batch carrying a FUA write is
//! synced before its writers hear back.
//!
//! Replay walks the ring from the checkpointed tail, batch by batch, while
//! each next batch is valid (header checksum, expected LSN, this disk's id,
//! every data block's checksum). The first invalid batch ends the log: it was
//! torn by the crash, which is allowed because nothing after it was ever
//! synced. To tell a torn tail from damage to synced records, every header
//! carries the highest LSN known durable when it was built; if any batch
//! anywhere in the ring claims that the missing batch was durable, the log
//! lost acknowledged data, and the disk is failed rather than serving stale
//! blocks.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use basalt_core::IoBuf;
use basalt_disk::{DiskEngine, DiskError, Segment};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::StoreError;
use crate::catalog::ExtentRow;
use crate::format::{
    BLOCK_BYTES, BatchHeader, ExtentMeta, Label, MetaChoice, RecordKind, SLOT_META_BYTES,
    block_crcs,
};
use crate::state::{Content, ExtentState, OverlayEntry, State, overlay_data_bytes, overlay_insert};
use crate::store::Store;

/// LSNs skipped after a recovery, so that a batch torn by the crash (and
/// still lying in the ring) can never be mistaken for a new one.
const LSN_GAP_AFTER_RECOVERY: u64 = 1024;

struct Job {
    lsn: u64,
    pos: u64,
    bytes: u64,
    fua: bool,
    segments: Vec<Segment>,
    waiters: Vec<crate::state::Waiter>,
    landing: Vec<crate::state::LandingWrite>,
    written_waiters: Vec<crate::state::Waiter>,
}

/// A batch whose write was started and whose writers have not all heard.
struct InFlight {
    lsn: u64,
    pos: u64,
    bytes: u64,
    fua: bool,
    waiters: Vec<crate::state::Waiter>,
    /// The batch's own write, then the copy-on-write data it points at.
    done: tokio::task::JoinHandle<Result<(), DiskError>>,
}

/// A batch whose write was started, until its copy-on-write writers (who
/// wait for their own data beside it) have heard that it is written.
struct Unwritten {
    lsn: u64,
    written: oneshot::Receiver<Result<(), String>>,
    waiters: Vec<crate::state::Waiter>,
}

/// Largest batch written on the log writer's own thread (see
/// `Store::start_batch`): copying it into the page cache takes a few
/// microseconds.
const INLINE_BATCH_BYTES: u64 = 256 << 10;

/// Most batches started and not completed at once per disk.
const MAX_BATCHES_IN_FLIGHT: usize = 16;

impl Store {
    /// The log writer of disk `index`.
    ///
    /// Batches complete in LSN order: a batch's writers hear back only once
    /// every earlier batch is complete, so replay (which stops at the first
    /// invalid batch) never drops a batch that anyone was told about. A new
    /// batch is started as soon as no batch's own write is outstanding; a
    /// batch waiting only for the copy-on-write data its remap records
    /// point at does not hold up the next one (the parts of an extent's
    /// rewrite arrive one after the other, each with its own record).
    pub(crate) async fn log_writer(&self, index: usize) {
        let mut unwritten: VecDeque<Unwritten> = VecDeque::new();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        loop {
            let wake = self.inner.log_wake[index].notified();
            let progress = self.inner.progress.notified();
            tokio::pin!(wake);
            tokio::pin!(progress);
            wake.as_mut().enable();
            progress.as_mut().enable();
            while unwritten.is_empty() && in_flight.len() < MAX_BATCHES_IN_FLIGHT {
                let Some(job) = self.take_batch(index) else {
                    break;
                };
                let (started, written) = self.start_batch(index, job);
                unwritten.push_back(written);
                in_flight.push_back(started);
            }
            let may_start = unwritten.is_empty() && in_flight.len() < MAX_BATCHES_IN_FLIGHT;
            tokio::select! {
                biased;
                result = async {
                    match unwritten.front_mut() {
                        Some(front) => (&mut front.written).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(front) = unwritten.pop_front() {
                        self.batch_written(index, front, result.ok());
                    }
                }
                result = async {
                    match in_flight.front_mut() {
                        Some(front) => (&mut front.done).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(front) = in_flight.pop_front() {
                        // Its write finished before the data it waited for.
                        while unwritten.front().is_some_and(|u| u.lsn <= front.lsn) {
                            if let Some(mut u) = unwritten.pop_front() {
                                let result = u.written.try_recv().ok();
                                self.batch_written(index, u, result);
                            }
                        }
                        let result = result.unwrap_or(Err(DiskError::EngineGone));
                        self.batch_done(index, front, result).await;
                    }
                }
                _ = &mut wake, if may_start => {}
                _ = &mut progress, if may_start => {}
            }
        }
    }

    /// Starts writing `job`: its write, then (in the same task) the
    /// copy-on-write data writes it points at.
    fn start_batch(&self, index: usize, job: Job) -> (InFlight, Unwritten) {
        let engine = self.lock().disks[index].engine.clone();
        let (written_tx, written_rx) = oneshot::channel();
        // Through the page cache: a batch is mostly small (a header, and the
        // data of writes smaller than an extent), and its writers wait for
        // it; written direct it would queue at the device behind the large
        // copy-on-write data writes already there. Once the kernel holds it,
        // a crash of this process keeps it; a power cut may not until the
        // next sync, which is what the log promises anyway (only FUA
        // batches and flushes are synced).
        // A batch whose writers wait for nothing else (no copy-on-write data
        // rides on it) and that is small is copied into the page cache right
        // here: handed to io_uring, a buffered write goes to a kernel worker
        // thread (ext4 cannot take it without blocking), and that thread and
        // then the completion's wake-up each wait for a CPU on a busy host,
        // which doubled the latency of small writes. A batch that remap or
        // shadow records ride on is written beside their data anyway, so it
        // keeps the asynchronous path and this task keeps serving the
        // checksums and completions of that data meanwhile.
        let write = if job.landing.is_empty() && job.bytes <= INLINE_BATCH_BYTES {
            engine.write_at_cached_inline(job.pos, job.segments)
        } else {
            engine.write_at_cached(job.pos, job.segments)
        };
        let landing = job.landing;
        let done = crate::store::spawn_started(async move {
            let mut result = write.await;
            let _ = written_tx.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            // The batch counts as written only once the copy-on-write data
            // its remap records point at has landed: until then no flush,
            // checkpoint or durable-LSN claim may cover it.
            for landing in landing {
                let landed = match landing.await {
                    Ok(landed) => landed,
                    Err(_) => Err(DiskError::EngineGone),
                };
                if result.is_ok() {
                    result = landed;
                }
            }
            result
        });
        (
            InFlight {
                lsn: job.lsn,
                pos: job.pos,
                bytes: job.bytes,
                fua: job.fua,
                waiters: job.waiters,
                done,
            },
            Unwritten {
                lsn: job.lsn,
                written: written_rx,
                waiters: job.written_waiters,
            },
        )
    }

    /// Tells the copy-on-write writers of a batch that it is written (every
    /// earlier batch is).
    ///
    /// A batch whose write failed fails the disk at once: a later batch may
    /// be started before the failed one completes (it completes only once
    /// its copy-on-write data has landed), and its writers must not hear
    /// success for records that follow a batch missing from the log.
    fn batch_written(&self, index: usize, batch: Unwritten, result: Option<Result<(), String>>) {
        let failed = self.lock().disks[index].failed.clone();
        let outcome = match (result, failed) {
            (_, Some(why)) => Err(why),
            (Some(Ok(())), None) => Ok(()),
            (result, None) => {
                let error = result
                    .and_then(Result::err)
                    .unwrap_or_else(|| DiskError::EngineGone.to_string());
                let why = format!("oplog write failed: {error}");
                self.fail_disk(index, why.clone());
                Err(why)
            }
        };
        for waiter in batch.waiters {
            let _ = waiter.send(outcome.clone());
        }
    }

    /// Completes the oldest batch in flight (every earlier one is complete).
    async fn batch_done(&self, index: usize, batch: InFlight, mut result: Result<(), DiskError>) {
        let engine = self.lock().disks[index].engine.clone();
        if result.is_ok() && batch.fua {
            result = engine.sync().await;
        }
        let outcome = {
            let mut st = self.lock();
            let d = &mut st.disks[index];
            d.log.writing.pop_front();
            match (&result, d.failed.clone()) {
                // A batch after a failed one is not part of the log.
                (_, Some(why)) => Err(why),
                (Ok(()), None) => {
                    d.log.completed_lsn = batch.lsn;
                    d.log.batches.push_back((batch.lsn, batch.pos, batch.bytes));
                    if batch.fua {
                        d.log.durable_lsn = d.log.durable_lsn.max(batch.lsn);
                    }
                    let busy = d.undrained_bytes > self.inner.config.memory_budget / 4
                        || d.log.used_bytes() > d.log.ring_bytes() / 4;
                    if busy {
                        self.inner.drain_wake.notify_one();
                    }
                    Ok(())
                }
                (Err(e), None) => {
                    let why = format!("oplog write failed: {e}");
                    tracing::error!(disk = %d.path.display(), error = %e, "oplog write failed; disk marked failed");
                    d.failed = Some(why.clone());
                    self.inner.progress.notify_waiters();
                    Err(why)
                }
            }
        };
        self.inner.stats.log_batches.fetch_add(1, Ordering::Relaxed);
        for waiter in batch.waiters {
            let _ = waiter.send(outcome.clone());
        }
    }

    /// Takes the oldest gathered batch if it has records and fits in the ring.
    fn take_batch(&self, index: usize) -> Option<Job> {
        let mut st = self.lock();
        let d = &mut st.disks[index];
        if let Some(why) = d.failed.clone() {
            for batch in d.log.pending.drain(..) {
                for waiter in batch.waiters.into_iter().chain(batch.written_waiters) {
                    let _ = waiter.send(Err(why.clone()));
                }
                // Their data writes run on; nothing waits for them now.
                drop(batch.landing);
            }
            return None;
        }
        let front = d.log.pending.front()?;
        if front.records.is_empty() {
            return None;
        }
        let bytes = front.total_bytes();
        let Some(pos) = d.log.place(bytes) else {
            self.inner.drain_wake.notify_one();
            return None;
        };
        let batch = d.log.pending.pop_front()?;
        let header = BatchHeader {
            lsn: batch.lsn,
            durable_lsn: d.log.durable_lsn,
            data_blocks: batch.data_blocks,
            disk_id: d.id,
            records: batch.records,
        };
        debug_assert_eq!(header.total_bytes(), bytes);
        d.log.head_pos = pos + bytes;
        d.log.writing.push_back((batch.lsn, pos));
        tracing::debug!(
            lsn = batch.lsn,
            pos,
            bytes,
            records = header.records.len(),
            "writing batch"
        );
        let mut segments = Vec::with_capacity(batch.data.len() + 1);
        segments.push(Segment::whole(Arc::new(IoBuf::from_slice(
            &header.encode(),
        ))));
        segments.extend(batch.data);
        Some(Job {
            lsn: batch.lsn,
            pos,
            bytes,
            fua: batch.fua,
            segments,
            waiters: batch.waiters,
            landing: batch.landing,
            written_waiters: batch.written_waiters,
        })
    }
}

/// A batch read back during replay.
struct Replayed {
    lsn: u64,
    pos: u64,
    header: BatchHeader,
    data: Arc<IoBuf>,
}

/// Reads a batch header at `pos` if one with `lsn` for `disk_id` fits there.
async fn header_at(
    engine: &Arc<dyn DiskEngine>,
    disk_id: Uuid,
    pos: u64,
    ring_end: u64,
) -> Result<Option<BatchHeader>, StoreError> {
    if pos + BLOCK_BYTES > ring_end {
        return Ok(None);
    }
    let (first, result) = engine
        .read_at(pos, IoBuf::zeroed(BLOCK_BYTES as usize))
        .await;
    result?;
    let Ok(blocks) = BatchHeader::peek_header_blocks(first.as_slice()) else {
        return Ok(None);
    };
    let header_bytes = u64::from(blocks) * BLOCK_BYTES;
    if pos + header_bytes > ring_end {
        return Ok(None);
    }
    let bytes = if blocks == 1 {
        first
    } else {
        let (buf, result) = engine
            .read_at(pos, IoBuf::zeroed(header_bytes as usize))
            .await;
        result?;
        buf
    };
    match BatchHeader::decode(bytes.as_slice()) {
        Ok(h) if h.disk_id == disk_id && pos + h.total_bytes() <= ring_end => Ok(Some(h)),
        _ => Ok(None),
    }
}

/// Scans the whole ring for a header of this disk that claims a batch at or
/// after `missing` was durable. Returns that header's LSN.
async fn find_durable_claim(
    engine: &Arc<dyn DiskEngine>,
    disk_id: Uuid,
    ring_start: u64,
    ring_end: u64,
    missing: u64,
) -> Result<Option<u64>, StoreError> {
    const CHUNK: u64 = 4 << 20;
    let mut at = ring_start;
    while at < ring_end {
        let len = CHUNK.min(ring_end - at);
        let (buf, result) = engine.read_at(at, IoBuf::zeroed(len as usize)).await;
        result?;
        for (i, block) in buf.as_slice().chunks(BLOCK_BYTES as usize).enumerate() {
            if BatchHeader::peek_header_blocks(block).is_err() {
                continue;
            }
            let pos = at + i as u64 * BLOCK_BYTES;
            if let Some(h) = header_at(engine, disk_id, pos, ring_end).await?
                && h.lsn >= missing
                && h.durable_lsn >= missing
            {
                return Ok(Some(h.lsn));
            }
        }
        at += len;
    }
    Ok(None)
}

/// What replay found in a slot written copy-on-write.
struct SlotCheck {
    /// Every block not rewritten by a later record of the replayed log
    /// holds the data the remap record describes. (Blocks rewritten later
    /// may have been torn by an unsynced drain; replay writes them again
    /// from the log.)
    intact: bool,
    /// Highest sequence number of the tenancy's metadata copies on the disk
    /// (0 if none: a drain had not written them yet), so that the next
    /// metadata written supersedes them.
    meta_seq: u64,
}

/// Reads the two metadata copies at the start of the slot at `offset` and
/// picks the one that describes tenancy `alloc` of extent `key`.
pub(crate) async fn read_slot_meta(
    engine: &Arc<dyn DiskEngine>,
    offset: u64,
    key: (u64, u64),
    alloc: u64,
) -> Result<MetaChoice, StoreError> {
    let (buf, result) = engine
        .read_at(offset, IoBuf::zeroed(SLOT_META_BYTES as usize))
        .await;
    result?;
    let (a, b) = buf.as_slice().split_at(BLOCK_BYTES as usize);
    Ok(ExtentMeta::choose(a, b, key.0, key.1, alloc))
}

/// Reads blocks `first..first + blocks` of slot `slot`'s data: a rewrite
/// part's data, which replay takes into the overlay.
async fn read_part(
    engine: &Arc<dyn DiskEngine>,
    label: &Label,
    slot: u64,
    first: u16,
    blocks: u16,
) -> Result<IoBuf, StoreError> {
    let offset = label.slot_at(slot) + SLOT_META_BYTES + u64::from(first) * BLOCK_BYTES;
    let (buf, result) = engine
        .read_at(
            offset,
            IoBuf::zeroed(usize::from(blocks) * BLOCK_BYTES as usize),
        )
        .await;
    result?;
    Ok(buf)
}

/// Replay: `key` now lives in slot `r.slot` of disk `index` (tenancy
/// `r.alloc_id`), written copy-on-write at `lsn` and described by `meta`
/// until the drainer writes that home.
fn install_cow_tenancy(
    st: &mut State,
    index: usize,
    disk_id: Uuid,
    r: &crate::format::Record,
    meta: ExtentMeta,
    lsn: u64,
) {
    let key = (r.vdisk_id, r.extent);
    st.extents.insert(
        key,
        ExtentState {
            disk: index,
            slot: r.slot,
            alloc_id: r.alloc_id,
            persisted: true,
            meta: Some(Box::new(meta)),
            overlay: BTreeMap::new(),
            landing: None,
            meta_unsaved: Some(lsn),
        },
    );
    let row = ExtentRow {
        disk: disk_id,
        slot: r.slot,
        alloc_id: r.alloc_id,
        persisted: true,
    };
    st.disks[index].map_changes.push((lsn, key, Some(row)));
}

/// Reads the blocks the copy-on-write record `r` (a remap, or a rewrite
/// part) at position `at` of the replayed log wrote into its slot, and
/// checks those no later applied record rewrites against the record's
/// `crcs`; reads the slot's metadata blocks too, for their sequence number.
async fn check_cow_record(
    engine: &Arc<dyn DiskEngine>,
    label: &Label,
    replayed: &[Replayed],
    at: (usize, usize),
    r: &crate::format::Record,
    crcs: &[u32],
    applied: &HashSet<(usize, usize)>,
) -> Result<SlotCheck, StoreError> {
    let key = (r.vdisk_id, r.extent);
    let covered = covered_later(replayed, at.0, at.1, key, r.alloc_id, applied);
    let meta_seq = match read_slot_meta(engine, label.slot_at(r.slot), key, r.alloc_id).await? {
        MetaChoice::Valid(m) => m.seq,
        _ => 0,
    };
    // Only the record's own blocks: a rewrite part covers part of the slot.
    let data = read_part(engine, label, r.slot, r.first_block, r.blocks).await?;
    let intact = block_crcs(data.as_slice())
        .into_iter()
        .zip(crcs)
        .zip(&covered[usize::from(r.first_block)..])
        .all(|((got, &crc), &covered)| covered || got == crc);
    Ok(SlotCheck { intact, meta_seq })
}

/// Replay: `key` loses its tenancy; its slot (on disk `index`) is free again
/// and its overlay is dropped.
fn drop_replayed_extent(st: &mut State, index: usize, key: (u64, u64)) {
    if let Some(old) = st.extents.remove(&key)
        && old.disk == index
    {
        st.disks[index].free.insert(old.slot);
        st.disks[index].undrained_bytes -= overlay_data_bytes(&old.overlay);
    }
}

/// Replay: stops following the rewrite in parts of `key`, if any; its slot
/// goes to `unfinished` (freed at the end of replay).
fn stop_following(
    shadows: &mut HashMap<(u64, u64), ReplayShadow>,
    key: (u64, u64),
    unfinished: &mut Vec<u64>,
) {
    if let Some(shadow) = shadows.remove(&key) {
        unfinished.push(shadow.slot);
    }
}

/// A rewrite in parts as replay follows it (see `RecordKind::Shadow`).
struct ReplayShadow {
    slot: u64,
    alloc: u64,
    /// Blocks `0..recorded` are covered by its parts so far.
    recorded: u16,
    entries: Vec<crate::format::BlockEntry>,
}

/// Blocks of `key` (tenancy `alloc`) that records after position
/// (`batch`, `record`) of the replayed log rewrite. `applied` holds the
/// positions of the later copy-on-write records (remaps and rewrite parts)
/// that replay applies; only those count. A later remap replaces the
/// tenancy, so nothing of the earlier one matters then; an interrupted
/// rewrite's parts count as writes to the extent's tenancy of the time and
/// may have been drained into its slot, so they cover blocks there. But a
/// copy-on-write record that replay drops (its data never landed) vouches
/// for nothing: the earlier record must then stand on its own data.
fn covered_later(
    replayed: &[Replayed],
    batch: usize,
    record: usize,
    key: (u64, u64),
    alloc: u64,
    applied: &HashSet<(usize, usize)>,
) -> Vec<bool> {
    let mut covered = vec![false; crate::format::EXTENT_BLOCKS as usize];
    for (bi, b) in replayed.iter().enumerate().skip(batch) {
        for (ri, r) in b.header.records.iter().enumerate() {
            if (bi == batch && ri <= record) || (r.vdisk_id, r.extent) != key {
                continue;
            }
            match r.kind {
                RecordKind::Remap { .. } if applied.contains(&(bi, ri)) => covered.fill(true),
                RecordKind::Unmap => covered.fill(true),
                RecordKind::Shadow { .. } if applied.contains(&(bi, ri)) => {
                    let first = usize::from(r.first_block);
                    let end = (first + usize::from(r.blocks)).min(covered.len());
                    covered[first..end].fill(true);
                }
                RecordKind::Write { .. } | RecordKind::Zero if r.alloc_id == alloc => {
                    let first = usize::from(r.first_block);
                    let end = (first + usize::from(r.blocks)).min(covered.len());
                    covered[first..end].fill(true);
                }
                _ => {}
            }
        }
    }
    covered
}

/// Replays the oplog of disk `index` into `st`.
pub(crate) async fn replay_disk(
    st: &mut State,
    index: usize,
    tail_pos: u64,
    tail_lsn: u64,
    clean: bool,
) -> Result<(), StoreError> {
    let (engine, disk_id, label, path) = {
        let d = &st.disks[index];
        (d.engine.clone(), d.id, d.label.clone(), d.path.clone())
    };
    let ring_start = label.log_offset;
    let ring_end = label.log_offset + label.log_bytes;
    let mut pos = tail_pos;
    let mut expect = tail_lsn;
    let mut replayed: Vec<Replayed> = Vec::new();
    loop {
        let mut found = None;
        for candidate in [pos, ring_start] {
            if let Some(h) = header_at(&engine, disk_id, candidate, ring_end).await?
                && h.lsn == expect
            {
                found = Some((candidate, h));
                break;
            }
            if candidate == ring_start {
                break;
            }
        }
        let Some((at, header)) = found else { break };
        let data_at = at + u64::from(header.header_blocks()) * BLOCK_BYTES;
        let (data, result) = engine
            .read_at(
                data_at,
                IoBuf::zeroed(header.data_blocks as usize * BLOCK_BYTES as usize),
            )
            .await;
        result?;
        // The checksums of all the batch's data blocks at once; each write
        // record checks its own.
        let got = block_crcs(data.as_slice());
        let intact = header.records.iter().all(|r| match &r.kind {
            RecordKind::Write { data_index, crcs } => crcs
                .iter()
                .enumerate()
                .all(|(i, &crc)| got.get(*data_index as usize + i) == Some(&crc)),
            _ => true,
        });
        if !intact {
            tracing::info!(lsn = expect, "oplog ends in a torn batch");
            break;
        }
        let bytes = header.total_bytes();
        replayed.push(Replayed {
            lsn: expect,
            pos: at,
            header,
            data: Arc::new(data),
        });
        pos = at + bytes;
        expect += 1;
    }
    if !clean
        && let Some(claim) =
            find_durable_claim(&engine, disk_id, ring_start, ring_end, expect).await?
    {
        return Err(StoreError::LogCorrupt {
            path,
            reason: format!(
                "batch {expect} cannot be read back, but batch {claim} records it as durable"
            ),
        });
    }
    let max_durable = replayed
        .iter()
        .map(|b| b.header.durable_lsn)
        .max()
        .unwrap_or(0);
    if !replayed.is_empty() {
        tracing::info!(disk = %path.display(), batches = replayed.len(), "replaying oplog");
    }

    // Rewrites in parts followed so far, and the slots of those that were
    // interrupted or never completed: their parts were read into overlay
    // entries, and the recovery drain writes those home before anything
    // can reuse the slots.
    let mut shadows: HashMap<(u64, u64), ReplayShadow> = HashMap::new();
    let mut unfinished_shadow_slots = Vec::new();
    // The copy-on-write records (remaps and rewrite parts) that replay
    // applies: their data landed, or they are known durable. Found latest
    // first, since whether a record's blocks are intact depends on the
    // applied records after it. Each one's outcome is kept for the pass
    // below (whether its data is intact, and its metadata's sequence), so
    // that pass reads a slot only for the data of a part it applies.
    let mut applied = HashSet::new();
    let mut cow_checks: HashMap<(usize, usize), (bool, u64)> = HashMap::new();
    for (batch_index, batch) in replayed.iter().enumerate().rev() {
        for (record_index, r) in batch.header.records.iter().enumerate().rev() {
            let (RecordKind::Shadow { crcs, .. } | RecordKind::Remap { crcs }) = &r.kind else {
                continue;
            };
            let at = (batch_index, record_index);
            let check = check_cow_record(&engine, &label, &replayed, at, r, crcs, &applied).await?;
            if check.intact || batch.lsn <= max_durable {
                applied.insert(at);
            }
            cow_checks.insert(at, (check.intact, check.meta_seq));
        }
    }
    for (batch_index, batch) in replayed.iter().enumerate() {
        for (record_index, r) in batch.header.records.iter().enumerate() {
            if !st.vdisks.contains_key(&r.vdisk_id) {
                continue;
            }
            let key = (r.vdisk_id, r.extent);
            tracing::debug!(lsn = batch.lsn, ?key, alloc = r.alloc_id, slot = r.slot, first = r.first_block, blocks = r.blocks, kind = ?std::mem::discriminant(&r.kind), "replay record");
            if !matches!(r.kind, RecordKind::Shadow { .. }) {
                // Any other change of the extent interrupts its rewrite in
                // parts, as it did when it was made.
                stop_following(&mut shadows, key, &mut unfinished_shadow_slots);
            }
            match &r.kind {
                RecordKind::Shadow { crcs, completes } => {
                    let at = (batch_index, record_index);
                    let Some(&(intact, meta_seq)) = cow_checks.get(&at) else {
                        continue;
                    };
                    let continues = shadows.get(&key).is_some_and(|s| {
                        s.slot == r.slot && s.alloc == r.alloc_id && s.recorded == r.first_block
                    });
                    if !continues {
                        stop_following(&mut shadows, key, &mut unfinished_shadow_slots);
                        if r.first_block == 0 && !*completes {
                            if st.disks[index].free.remove(&r.slot) {
                                shadows.insert(
                                    key,
                                    ReplayShadow {
                                        slot: r.slot,
                                        alloc: r.alloc_id,
                                        recorded: 0,
                                        entries: vec![
                                            crate::format::BlockEntry::default();
                                            crate::format::EXTENT_BLOCKS as usize
                                        ],
                                    },
                                );
                            } else {
                                tracing::warn!(
                                    slot = r.slot,
                                    "oplog rewrites into a slot that is in use; read as a write"
                                );
                            }
                        }
                    }
                    if !applied.contains(&at) {
                        tracing::info!(
                            lsn = batch.lsn,
                            "a part of a rewrite never became durable; it is dropped"
                        );
                        stop_following(&mut shadows, key, &mut unfinished_shadow_slots);
                        continue;
                    }
                    if !intact {
                        tracing::error!(
                            lsn = batch.lsn,
                            slot = r.slot,
                            "a durable part of a rewrite is damaged; its bad blocks will fail reads"
                        );
                    }
                    let Some(e) = st.extents.get_mut(&key).filter(|e| e.disk == index) else {
                        stop_following(&mut shadows, key, &mut unfinished_shadow_slots);
                        continue;
                    };
                    let whole = shadows.get_mut(&key).is_some_and(|s| {
                        for (i, &crc) in crcs.iter().enumerate() {
                            s.entries[usize::from(r.first_block) + i] = crate::format::BlockEntry {
                                generation: r.generation,
                                has_data: true,
                                lost: false,
                                crc,
                            };
                        }
                        s.recorded += r.blocks;
                        *completes && u64::from(s.recorded) == crate::format::EXTENT_BLOCKS
                    });
                    if !whole {
                        // Counts as written to the current tenancy, its data
                        // taken from the slot (the drain writes it home).
                        let data = Arc::new(
                            read_part(&engine, &label, r.slot, r.first_block, r.blocks).await?,
                        );
                        for (i, &crc) in crcs.iter().enumerate() {
                            let block = usize::from(r.first_block) + i;
                            let seg = Segment {
                                buf: data.clone(),
                                start: i * BLOCK_BYTES as usize,
                                len: BLOCK_BYTES as usize,
                            };
                            let entry = OverlayEntry::new(
                                batch.lsn,
                                r.generation,
                                Content::Data { seg, crc },
                            );
                            overlay_insert(
                                &mut e.overlay,
                                &mut st.disks[index].undrained_bytes,
                                block as u16,
                                entry,
                            );
                        }
                        continue;
                    }
                    // The rewrite is whole: the extent moves to its slot.
                    let Some(shadow) = shadows.remove(&key) else {
                        continue;
                    };
                    drop_replayed_extent(st, index, key);
                    let meta = ExtentMeta {
                        vdisk_id: r.vdisk_id,
                        extent: r.extent,
                        alloc_id: r.alloc_id,
                        seq: meta_seq,
                        entries: shadow.entries,
                    };
                    install_cow_tenancy(st, index, disk_id, r, meta, batch.lsn);
                }
                RecordKind::Write { data_index, crcs } => {
                    if !st.extents.contains_key(&key) {
                        if !st.disks[index].free.remove(&r.slot) {
                            tracing::warn!(
                                slot = r.slot,
                                "oplog allocates a slot that is in use; record skipped"
                            );
                            continue;
                        }
                        st.extents.insert(
                            key,
                            ExtentState {
                                disk: index,
                                slot: r.slot,
                                alloc_id: r.alloc_id,
                                persisted: false,
                                meta: None,
                                overlay: BTreeMap::new(),
                                landing: None,
                                meta_unsaved: None,
                            },
                        );
                        let row = ExtentRow {
                            disk: disk_id,
                            slot: r.slot,
                            alloc_id: r.alloc_id,
                            persisted: false,
                        };
                        st.disks[index]
                            .map_changes
                            .push((batch.lsn, key, Some(row)));
                    }
                    let Some(e) = st.extents.get_mut(&key) else {
                        continue;
                    };
                    if e.alloc_id != r.alloc_id || e.disk != index {
                        continue;
                    }
                    for (i, &crc) in crcs.iter().enumerate() {
                        let seg = Segment {
                            buf: batch.data.clone(),
                            start: (*data_index as usize + i) * BLOCK_BYTES as usize,
                            len: BLOCK_BYTES as usize,
                        };
                        let entry =
                            OverlayEntry::new(batch.lsn, r.generation, Content::Data { seg, crc });
                        overlay_insert(
                            &mut e.overlay,
                            &mut st.disks[index].undrained_bytes,
                            r.first_block + i as u16,
                            entry,
                        );
                    }
                }
                RecordKind::Zero => {
                    let Some(e) = st.extents.get_mut(&key) else {
                        continue;
                    };
                    if e.alloc_id != r.alloc_id || e.disk != index {
                        continue;
                    }
                    for b in r.first_block..r.first_block + r.blocks {
                        let entry = OverlayEntry::new(batch.lsn, r.generation, Content::Zero);
                        overlay_insert(
                            &mut e.overlay,
                            &mut st.disks[index].undrained_bytes,
                            b,
                            entry,
                        );
                    }
                }
                RecordKind::Remap { crcs } => {
                    let at = (batch_index, record_index);
                    let Some(&(intact, meta_seq)) = cow_checks.get(&at) else {
                        continue;
                    };
                    if !applied.contains(&at) {
                        tracing::info!(
                            lsn = batch.lsn,
                            "copy-on-write never became durable; keeping the old extent"
                        );
                        continue;
                    }
                    if !intact {
                        tracing::error!(
                            lsn = batch.lsn,
                            slot = r.slot,
                            "a durable copy-on-write slot is damaged; its bad blocks will fail reads"
                        );
                    }
                    drop_replayed_extent(st, index, key);
                    if !st.disks[index].free.remove(&r.slot) {
                        tracing::warn!(
                            slot = r.slot,
                            "oplog remaps to a slot that is in use; record skipped"
                        );
                        continue;
                    }
                    // The metadata comes from the record; the drainer
                    // writes it home before the checkpoint that covers it.
                    // Blocks that do not match it fail reads.
                    let mut meta = ExtentMeta::written_whole(
                        r.vdisk_id,
                        r.extent,
                        r.alloc_id,
                        r.generation,
                        crcs,
                    );
                    meta.seq = meta_seq;
                    install_cow_tenancy(st, index, disk_id, r, meta, batch.lsn);
                }
                RecordKind::Unmap => {
                    let matches = st
                        .extents
                        .get(&key)
                        .is_some_and(|e| e.alloc_id == r.alloc_id && e.disk == index);
                    if matches {
                        drop_replayed_extent(st, index, key);
                        st.disks[index].map_changes.push((batch.lsn, key, None));
                    }
                }
            }
        }
    }

    let d = &mut st.disks[index];
    d.free.extend(unfinished_shadow_slots);
    d.free.extend(shadows.into_values().map(|s| s.slot));
    d.log.head_pos = pos;
    d.log.completed_lsn = expect - 1;
    d.log.durable_lsn = expect - 1;
    d.log.batches = replayed
        .iter()
        .map(|b| (b.lsn, b.pos, b.header.total_bytes()))
        .collect();
    d.log.next_lsn = if clean && replayed.is_empty() {
        expect
    } else {
        expect + LSN_GAP_AFTER_RECOVERY
    };
    Ok(())
}

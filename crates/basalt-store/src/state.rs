//! In-memory state of the store, guarded by one mutex.
//!
//! Every decision (which slot, which generation, which LSN, what a read must
//! fetch) is made here under the lock in a few microseconds; every I/O happens
//! outside it. The lock order is trivial because there is only one lock.
//!
//! Per extent the state has two layers:
//!
//! * `meta` — the block checksums and generations *as persisted in the slot*
//!   (loaded lazily from the slot's metadata blocks);
//! * `overlay` — blocks written since, whose newest contents live in the oplog
//!   and in memory until the drainer writes them home.
//!
//! A read consults the overlay first, then the persisted metadata.
//!
//! An extent written copy-on-write is published (with its new slot and
//! metadata, which only the drainer writes into the slot, see
//! `ExtentState::meta_unsaved`) as soon as its remap record is queued,
//! while the slot's data write is still in flight, so that the record's
//! batch is written at the same time as the data. Until the data has landed
//! the extent carries a [`Landing`] receiver: reads of its slot wait for it,
//! and the batch that holds the remap does not count as written (so no
//! flush, checkpoint or durable-LSN claim covers the remap) before the data
//! is on the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use basalt_disk::{DiskEngine, DiskError, Segment};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::catalog::{ExtentRow, VdiskRecord};
use crate::format::{BLOCK_BYTES, ExtentMeta, Label, Record};

/// (vdisk id, extent index).
pub(crate) type ExtentKey = (u64, u64);

/// What a block of the overlay reads as.
#[derive(Clone)]
pub(crate) enum Content {
    /// Data held in a shared buffer (one block at `seg`).
    Data { seg: Segment, crc: u32 },
    /// Zeros (trimmed or zeroed).
    Zero,
}

/// A block changed since the extent's metadata was last persisted.
///
/// Older versions not yet written home stay chained behind the newest: a
/// drain writes the newest version whose batch it knows durable, and the
/// newer one may still be in flight. Dropping the older version early would
/// let a checkpoint move the oplog tail past the only durable copy of it.
#[derive(Clone)]
pub(crate) struct OverlayEntry {
    /// LSN of the batch carrying the change.
    pub lsn: u64,
    /// Generation of the change.
    pub generation: u64,
    /// New contents.
    pub content: Content,
    /// The previous version, if it is not home yet.
    pub older: Option<Box<OverlayEntry>>,
}

impl OverlayEntry {
    /// A new version with no older one.
    pub fn new(lsn: u64, generation: u64, content: Content) -> OverlayEntry {
        OverlayEntry {
            lsn,
            generation,
            content,
            older: None,
        }
    }

    /// The newest version in the chain with an LSN at or below `limit`.
    pub fn newest_at_or_before(&self, limit: u64) -> Option<&OverlayEntry> {
        let mut at = Some(self);
        while let Some(e) = at {
            if e.lsn <= limit {
                return Some(e);
            }
            at = e.older.as_deref();
        }
        None
    }

    /// Bytes of data held by the chain.
    pub fn data_bytes(&self) -> u64 {
        let mut bytes = 0;
        let mut at = Some(self);
        while let Some(e) = at {
            if matches!(e.content, Content::Data { .. }) {
                bytes += BLOCK_BYTES;
            }
            at = e.older.as_deref();
        }
        bytes
    }
}

/// Drops every version of `block` at or below `lsn` (now home); returns the
/// data bytes released.
pub(crate) fn overlay_prune(
    overlay: &mut BTreeMap<u16, OverlayEntry>,
    block: u16,
    lsn: u64,
) -> u64 {
    let Some(head) = overlay.get_mut(&block) else {
        return 0;
    };
    if head.lsn <= lsn {
        let bytes = head.data_bytes();
        overlay.remove(&block);
        return bytes;
    }
    let mut at = head;
    loop {
        let cut = at.older.as_ref().is_some_and(|o| o.lsn <= lsn);
        if cut {
            return at.older.take().map_or(0, |o| o.data_bytes());
        }
        match at.older.as_deref_mut() {
            Some(next) => at = next,
            None => return 0,
        }
    }
}

/// Where an extent lives and what is known of it.
pub(crate) struct ExtentState {
    /// Index into `State::disks`.
    pub disk: usize,
    /// Slot on that disk.
    pub slot: u64,
    /// Allocation id of the tenancy.
    pub alloc_id: u64,
    /// The slot's metadata has been written for this tenancy at least once.
    pub persisted: bool,
    /// Metadata as persisted in the slot (or, while `meta_unsaved` is set,
    /// as the remap record describes it); `None` until loaded.
    pub meta: Option<Box<ExtentMeta>>,
    /// LSN of the remap record that published this tenancy, while its
    /// metadata lives only here and in that record: a copy-on-write does not
    /// write the slot's metadata blocks (one small write less per extent),
    /// the drainer does before a checkpoint covers the record. `None` once
    /// the metadata is home, and for every extent not written copy-on-write.
    pub meta_unsaved: Option<u64>,
    /// Blocks changed since, by block index within the extent.
    pub overlay: BTreeMap<u16, OverlayEntry>,
    /// The copy-on-write data write of a tenancy published by a whole-extent
    /// write (it stays, reading `Landed`, once the data is there); `None`
    /// for every other extent.
    pub landing: Option<watch::Receiver<Landing>>,
}

impl ExtentState {
    /// The tenancy's metadata is not home yet and must be by the checkpoint
    /// covering batches up to `limit` (its remap record is among them).
    pub fn meta_due(&self, limit: u64) -> bool {
        self.meta_unsaved.is_some_and(|lsn| lsn <= limit)
    }
}

/// How the copy-on-write data write of a freshly published extent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Landing {
    /// Submitted, not completed: the slot's contents are not there yet.
    InFlight,
    /// Completed: the slot holds the data its metadata describes.
    Landed,
    /// Failed (or abandoned): the slot cannot be read; the log writer fails
    /// the disk when it sees the same outcome.
    Failed,
}

/// A copy-on-write data write running beside the batch that holds its remap
/// record. The batch is not written until it has completed.
pub(crate) type LandingWrite = JoinHandle<Result<(), DiskError>>;

/// A completion channel for a record waiting on its batch.
pub(crate) type Waiter = oneshot::Sender<Result<(), String>>;

/// Records gathered for the next oplog batch.
pub(crate) struct PendingBatch {
    pub lsn: u64,
    pub records: Vec<Record>,
    pub data: Vec<Segment>,
    pub data_blocks: u32,
    pub fua: bool,
    pub waiters: Vec<Waiter>,
    /// Copy-on-write data writes whose remap records are in this batch.
    pub landing: Vec<LandingWrite>,
    /// Told as soon as the batch itself is on the disk, before the
    /// copy-on-write data above has landed: copy-on-write writers that wait
    /// for their own data (and need no sync) hear back one step earlier.
    pub written_waiters: Vec<Waiter>,
    /// Bytes the header will take (kept current as records are added).
    pub header_bytes: usize,
}

impl PendingBatch {
    pub fn new(lsn: u64) -> PendingBatch {
        PendingBatch {
            lsn,
            records: Vec::new(),
            data: Vec::new(),
            data_blocks: 0,
            fua: false,
            waiters: Vec::new(),
            landing: Vec::new(),
            written_waiters: Vec::new(),
            header_bytes: 64,
        }
    }

    /// Bytes the batch occupies in the ring.
    pub fn total_bytes(&self) -> u64 {
        (self.header_bytes as u64).div_ceil(BLOCK_BYTES) * BLOCK_BYTES
            + u64::from(self.data_blocks) * BLOCK_BYTES
    }

    pub fn push(&mut self, record: Record) {
        self.header_bytes += record.encoded_len();
        self.records.push(record);
    }

    /// Joins a copy-on-write data write (whose record was just pushed) to
    /// the batch and returns what its writer waits for: with `fua`, the
    /// batch completed (the data landed, the batch synced); otherwise the
    /// batch written, the data being waited for beside it.
    pub fn await_cow(
        &mut self,
        landing: LandingWrite,
        fua: bool,
    ) -> oneshot::Receiver<Result<(), String>> {
        self.fua |= fua;
        self.landing.push(landing);
        let (tx, rx) = oneshot::channel();
        if fua {
            self.waiters.push(tx);
        } else {
            self.written_waiters.push(tx);
        }
        rx
    }
}

/// The oplog ring of one disk.
pub(crate) struct LogState {
    pub ring_start: u64,
    pub ring_end: u64,
    /// Where the next batch goes if it fits before the ring's end.
    pub head_pos: u64,
    /// Batches written and not yet released: (lsn, position, bytes).
    pub batches: VecDeque<(u64, u64, u64)>,
    /// Highest LSN whose batch is written.
    pub completed_lsn: u64,
    /// Highest LSN known synced.
    pub durable_lsn: u64,
    /// Batches being gathered, oldest first (never empty; the back one takes
    /// new records until it is full).
    pub pending: VecDeque<PendingBatch>,
    /// Batches being written, oldest first: (lsn, position).
    pub writing: VecDeque<(u64, u64)>,
    /// Largest batch in bytes.
    pub max_batch_bytes: u64,
    /// LSN the next new batch gets.
    pub next_lsn: u64,
}

impl LogState {
    /// Where a batch of `bytes` can go now, if anywhere. The live region runs
    /// from the oldest unreleased batch to the head; the head never catches
    /// up with the oldest batch (equal positions would mean "empty").
    pub fn place(&self, bytes: u64) -> Option<u64> {
        let Some(oldest) = self.oldest_live() else {
            if self.head_pos + bytes <= self.ring_end {
                return Some(self.head_pos);
            }
            return (self.ring_start + bytes <= self.ring_end).then_some(self.ring_start);
        };
        if self.head_pos >= oldest {
            if self.head_pos + bytes <= self.ring_end {
                return Some(self.head_pos);
            }
            return (self.ring_start + bytes < oldest).then_some(self.ring_start);
        }
        (self.head_pos + bytes < oldest).then_some(self.head_pos)
    }

    /// Where the oldest batch not yet released (written, or being
    /// written) starts.
    fn oldest_live(&self) -> Option<u64> {
        match self.batches.front() {
            Some(&(_, pos, _)) => Some(pos),
            None => self.writing.front().map(|&(_, pos)| pos),
        }
    }

    /// Bytes of the ring in use.
    pub fn used_bytes(&self) -> u64 {
        let Some(oldest) = self.oldest_live() else {
            return 0;
        };
        if self.head_pos >= oldest {
            self.head_pos - oldest
        } else {
            (self.ring_end - oldest) + (self.head_pos - self.ring_start)
        }
    }

    pub fn ring_bytes(&self) -> u64 {
        self.ring_end - self.ring_start
    }

    /// The batch new records go to, starting a new one when the current one
    /// cannot take `extra_bytes` more.
    pub fn open_batch(&mut self, extra_bytes: u64) -> &mut PendingBatch {
        let full = match self.pending.back() {
            Some(b) => {
                !b.records.is_empty() && b.total_bytes() + extra_bytes > self.max_batch_bytes
            }
            None => true,
        };
        if full {
            let lsn = self.next_lsn;
            self.next_lsn += 1;
            self.pending.push_back(PendingBatch::new(lsn));
        }
        match self.pending.back_mut() {
            Some(b) => b,
            None => unreachable!("a pending batch was just ensured"),
        }
    }

    /// Position the oldest unreleased data starts at (for the checkpoint's tail).
    pub fn tail_after(&self, lsn: u64) -> (u64, u64) {
        if let Some(&(l, pos, _)) = self.batches.iter().find(|(l, _, _)| *l > lsn) {
            return (pos, l);
        }
        if let Some(&(l, pos)) = self.writing.iter().find(|(l, _)| *l > lsn) {
            return (pos, l);
        }
        let next = self.pending.front().map_or(self.next_lsn, |b| b.lsn);
        (self.head_pos, next.max(lsn + 1))
    }
}

/// Never-used slots whose space is reserved at once, ahead of their first
/// writes (64 MiB of a file disk per `fallocate`).
pub const SLOTS_RESERVED_AHEAD: u64 = 64;

/// An extent's rewrite in parts, copy-on-write into a *shadow* slot (see
/// `RecordKind::Shadow`): a guest that may send at most so many segments
/// per request sends a 1 MiB write as two or three requests, and each is
/// written once, into the shadow slot at its own blocks, and answered on
/// its own, instead of being logged and written again.
///
/// Each part's blocks also enter the current extent's overlay (so reads and
/// an interrupted rewrite need nothing else). The part that makes the
/// rewrite whole switches the extent to the shadow slot, and the old
/// tenancy and those overlay entries go. Any other change of the extent
/// (a write, a zero, a remap, a discard), a part out of order, or a drain
/// whose checkpoint would cover some of its parts *interrupts* it: its
/// parts stay overlay entries of the current extent, written home by the
/// drainer, and the slot is quarantined once no part is in flight.
pub(crate) struct Shadow {
    /// The shadow slot.
    pub slot: u64,
    /// Allocation id of the tenancy the slot gets when the rewrite completes.
    pub alloc_id: u64,
    /// Allocation id of the extent's tenancy when the rewrite started.
    pub old_alloc: u64,
    /// Blocks claimed by parts taken so far (recorded or in flight): the
    /// next part must start here.
    pub claimed: u16,
    /// Blocks whose parts' records are queued: `0..recorded`.
    pub recorded: u16,
    /// Metadata of the recorded blocks.
    pub entries: Vec<crate::format::BlockEntry>,
    /// Parts claimed whose records are not queued yet.
    pub inflight: u32,
    /// Interrupted: no part continues it; it goes once `inflight` is zero.
    pub interrupted: bool,
    /// LSN of the first part's record, once queued.
    pub first_lsn: Option<u64>,
    /// LSN of the latest part's record.
    pub last_lsn: u64,
    /// The parts' data writes.
    pub landings: Vec<watch::Receiver<Landing>>,
}

/// One disk of the node.
pub(crate) struct DiskState {
    pub id: Uuid,
    pub path: PathBuf,
    pub label: Label,
    pub engine: Arc<dyn DiskEngine>,
    /// Slots never used since the node started (space may need reserving).
    pub free: BTreeSet<u64>,
    /// Never-used slots whose space was reserved ahead, in bulk (see
    /// [`DiskState::wants_reservation`]): taking one needs no reservation.
    pub reserved: Range<u64>,
    /// A bulk reservation is under way.
    pub reserving: bool,
    /// Slots freed while running: their space is known to be allocated and
    /// written, so they are reused first (last freed, first reused).
    pub reuse: Vec<u64>,
    /// Slots freed at an LSN, reusable once a checkpoint covers that LSN.
    pub quarantine: Vec<(u64, u64)>,
    pub log: LogState,
    /// Bytes of overlay data held in memory for this disk.
    pub undrained_bytes: u64,
    /// Extents replaced or discarded at an LSN (first) that a checkpoint has
    /// not yet covered. Their overlay blocks up to the checkpoint's LSN must
    /// still be written to their old slot, which the checkpoint keeps mapped.
    pub retired: Vec<(u64, ExtentKey, ExtentState)>,
    /// Extent map changes not yet checkpointed, in LSN order.
    pub map_changes: Vec<(u64, ExtentKey, Option<ExtentRow>)>,
    /// Set when the disk failed an I/O; everything on it then fails.
    pub failed: Option<String>,
    /// Rewrites in parts under way on this disk (see [`Shadow`]).
    pub shadows: HashMap<ExtentKey, Shadow>,
    /// Rewrites in parts that completed at the second LSN, with their first
    /// part at the first LSN: until a checkpoint covers the second, no
    /// checkpoint may cover the first (replay must see every part).
    pub shadow_spans: Vec<(u64, u64)>,
}

impl DiskState {
    /// Interrupts the rewrite in parts of `key`, if one is under way: its
    /// parts stay overlay entries of the extent, and its slot is
    /// quarantined once no part is in flight.
    pub fn interrupt_shadow(&mut self, key: ExtentKey) {
        let Some(shadow) = self.shadows.get_mut(&key) else {
            return;
        };
        shadow.interrupted = true;
        if shadow.inflight == 0 {
            self.retire_shadow(key);
        }
    }

    /// Removes the interrupted rewrite of `key` (no part in flight). Its
    /// slot comes free once a checkpoint covers its last part's record
    /// (replay reads the parts from it until then), or at once if no part
    /// was recorded.
    pub fn retire_shadow(&mut self, key: ExtentKey) {
        let Some(shadow) = self.shadows.remove(&key) else {
            return;
        };
        tracing::debug!(?key, slot = shadow.slot, "rewrite in parts interrupted");
        if shadow.first_lsn.is_some() {
            self.quarantine.push((shadow.slot, shadow.last_lsn));
        } else {
            self.reuse.push(shadow.slot);
        }
    }

    /// The highest LSN a checkpoint may cover now, given `limit`: below the
    /// first part of a completed rewrite whose completing record `limit`
    /// does not cover. Interrupts the rewrites under way that a checkpoint
    /// at the returned LSN would cover part of.
    pub fn shadow_checkpoint_limit(&mut self, limit: u64) -> u64 {
        let capped = uncut_limit(&self.shadow_spans, limit);
        // Every span is now whole on one side of `capped`. Those below it
        // stay covered by every later checkpoint (even if this one fails):
        // rewrites begun at or below `capped` are interrupted here and never
        // complete, so every later span starts above it, and no later limit
        // falls below it.
        self.shadow_spans.retain(|&(_, last)| last > capped);
        let covered: Vec<ExtentKey> = self
            .shadows
            .iter()
            .filter(|(_, s)| !s.interrupted && s.first_lsn.is_some_and(|f| f <= capped))
            .map(|(k, _)| *k)
            .collect();
        for key in covered {
            self.interrupt_shadow(key);
        }
        capped
    }
}

/// The highest LSN at or below `limit` that cuts none of `spans` (first
/// and last LSN of a completed rewrite in parts): a checkpoint there covers
/// each rewrite whole or not at all. Capping below one span's first part
/// can cut another span that started earlier, so the cap repeats until no
/// span straddles it.
pub(crate) fn uncut_limit(spans: &[(u64, u64)], limit: u64) -> u64 {
    let mut capped = limit;
    while let Some(cut) = spans
        .iter()
        .filter(|&&(first, last)| first <= capped && capped < last)
        .map(|&(first, _)| first.saturating_sub(1))
        .min()
    {
        // Strictly lower each time (`cut < first <= capped`), as LSNs start
        // at 1; a span from LSN 0 could not be left uncut anyway.
        if cut >= capped {
            break;
        }
        capped = cut;
    }
    capped
}

impl DiskState {
    /// Slots available for new extents.
    pub fn free_slots(&self) -> usize {
        self.free.len() + self.reuse.len()
    }

    /// Takes a slot for a new tenancy: a recently freed one if any (no
    /// space to reserve), else a never-used one (`true`: reserve its space,
    /// unless that was done ahead). Only through `Store::take_slot`, which
    /// also keeps the never-used slots reserved ahead.
    pub fn take_slot(&mut self) -> Option<(u64, bool)> {
        if let Some(slot) = self.reuse.pop() {
            return Some((slot, false));
        }
        self.free
            .pop_first()
            .map(|slot| (slot, !self.reserved.contains(&slot)))
    }

    /// The never-used slots to reserve space for in one go, when the
    /// lowest ones (those taken next) are about to run past what is
    /// reserved: one `fallocate` of many slots instead of one per slot on
    /// the path of each first write. Marks the reservation as under way.
    pub fn wants_reservation(&mut self) -> Option<Range<u64>> {
        let &lowest = self.free.first()?;
        if self.reserving || lowest + SLOTS_RESERVED_AHEAD / 2 < self.reserved.end {
            return None;
        }
        let start = if self.reserved.contains(&lowest) {
            self.reserved.end
        } else {
            lowest
        };
        let end = (start + SLOTS_RESERVED_AHEAD).min(self.label.slot_count);
        if start >= end {
            return None;
        }
        self.reserving = true;
        Some(start..end)
    }

    /// Records the outcome of a reservation from [`DiskState::wants_reservation`].
    pub fn reservation_done(&mut self, range: Range<u64>, reserved: bool) {
        self.reserving = false;
        if !reserved {
            return;
        }
        // Every slot below the lowest free one is in use: a range that
        // does not continue the reserved one replaces it.
        self.reserved = if range.start == self.reserved.end {
            self.reserved.start..range.end
        } else {
            range
        };
    }

    /// Gives back a slot taken with [`DiskState::take_slot`] and not used.
    pub fn give_back(&mut self, slot: u64, fresh: bool) {
        if fresh {
            self.free.insert(slot);
        } else {
            self.reuse.push(slot);
        }
    }

    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.label.slot_at(slot)
    }
}

/// A vdisk and its generation counter.
pub(crate) struct VdiskState {
    pub record: VdiskRecord,
    pub next_gen: u64,
}

/// Everything behind the store's mutex.
pub(crate) struct State {
    pub disks: Vec<DiskState>,
    /// Disks the catalog knows but that are not present.
    pub missing_disks: HashMap<Uuid, String>,
    pub extents: HashMap<ExtentKey, ExtentState>,
    pub vdisks: HashMap<u64, VdiskState>,
    pub names: HashMap<String, u64>,
    pub alloc_next: u64,
    pub alloc_reserved: u64,
    pub shutting_down: bool,
}

/// Extents whose disk is missing point at this index.
pub(crate) const MISSING_DISK: usize = usize::MAX;

impl State {
    /// Takes a fresh allocation id, if the reservation allows.
    pub fn next_alloc_id(&mut self) -> Option<u64> {
        if self.alloc_next >= self.alloc_reserved {
            return None;
        }
        let id = self.alloc_next;
        self.alloc_next += 1;
        Some(id)
    }

    /// Takes the next generation of a vdisk.
    pub fn next_generation(&mut self, vdisk: u64) -> Option<u64> {
        let v = self.vdisks.get_mut(&vdisk)?;
        if v.next_gen >= v.record.gen_reserved {
            return None;
        }
        let g = v.next_gen;
        v.next_gen += 1;
        Some(g)
    }

    /// The disk a new extent should go to: the one with most free slots.
    pub fn pick_disk(&self) -> Option<usize> {
        self.disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.failed.is_none() && d.free_slots() > 0)
            .max_by_key(|(_, d)| d.free_slots())
            .map(|(i, _)| i)
    }

    /// Unmaps an extent at `lsn`. Its slot is quarantined and the extent
    /// retired (still drained) until a checkpoint covers `lsn`.
    pub fn release_extent(&mut self, key: ExtentKey, lsn: u64) {
        let Some(extent) = self.extents.remove(&key) else {
            return;
        };
        tracing::debug!(
            ?key,
            slot = extent.slot,
            alloc = extent.alloc_id,
            lsn,
            "release extent"
        );
        if let Some(disk) = self.disks.get_mut(extent.disk) {
            disk.interrupt_shadow(key);
            disk.quarantine.push((extent.slot, lsn));
            disk.map_changes.push((lsn, key, None));
            disk.retired.push((lsn, key, extent));
        }
    }

    /// Publishes `key` in a slot written copy-on-write, its record queued at
    /// `lsn`: `tenancy` is (disk index, disk id, slot, allocation id), and
    /// `meta` describes the slot until the drainer writes it home (before a
    /// checkpoint covers `lsn`). Reads of the slot wait for `landing`.
    pub fn publish_cow(
        &mut self,
        key: ExtentKey,
        tenancy: (usize, Uuid, u64, u64),
        meta: ExtentMeta,
        landing: watch::Receiver<Landing>,
        lsn: u64,
    ) {
        let (disk, disk_id, slot, alloc_id) = tenancy;
        let row = ExtentRow {
            disk: disk_id,
            slot,
            alloc_id,
            persisted: true,
        };
        if let Some(d) = self.disks.get_mut(disk) {
            d.map_changes.push((lsn, key, Some(row)));
        }
        self.extents.insert(
            key,
            ExtentState {
                disk,
                slot,
                alloc_id,
                persisted: true,
                meta: Some(Box::new(meta)),
                overlay: BTreeMap::new(),
                landing: Some(landing),
                meta_unsaved: Some(lsn),
            },
        );
    }

    /// The extent `key` with tenancy `alloc`, current or retired.
    pub fn tenancy_mut(
        &mut self,
        disk: usize,
        key: ExtentKey,
        alloc: u64,
    ) -> Option<&mut ExtentState> {
        if let Some(e) = self.extents.get_mut(&key)
            && e.alloc_id == alloc
            && e.disk == disk
        {
            return Some(e);
        }
        self.disks
            .get_mut(disk)?
            .retired
            .iter_mut()
            .find(|(_, k, e)| *k == key && e.alloc_id == alloc)
            .map(|(_, _, e)| e)
    }

    /// Total overlay bytes held in memory on disks that still work (a failed
    /// disk's bytes never drain and must not hold writers to other disks).
    pub fn undrained_total(&self) -> u64 {
        self.disks
            .iter()
            .filter(|d| d.failed.is_none())
            .map(|d| d.undrained_bytes)
            .sum()
    }
}

/// Bytes of data blocks in an overlay, older versions included.
pub(crate) fn overlay_data_bytes(overlay: &BTreeMap<u16, OverlayEntry>) -> u64 {
    overlay.values().map(OverlayEntry::data_bytes).sum()
}

/// Inserts a new version of a block, chaining the previous one behind it and
/// keeping the per-disk byte count right.
pub(crate) fn overlay_insert(
    overlay: &mut BTreeMap<u16, OverlayEntry>,
    undrained: &mut u64,
    block: u16,
    mut entry: OverlayEntry,
) {
    if matches!(entry.content, Content::Data { .. }) {
        *undrained += BLOCK_BYTES;
    }
    entry.older = overlay.remove(&block).map(Box::new);
    overlay.insert(block, entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(batches: &[(u64, u64, u64)], head: u64) -> LogState {
        LogState {
            ring_start: 0,
            ring_end: 100,
            head_pos: head,
            batches: batches.iter().copied().collect(),
            completed_lsn: 0,
            durable_lsn: 0,
            pending: VecDeque::new(),
            writing: VecDeque::new(),
            max_batch_bytes: 50,
            next_lsn: 1,
        }
    }

    #[test]
    fn a_checkpoint_limit_cuts_no_rewrite_in_parts() {
        // Nothing completed: the limit stands.
        assert_eq!(uncut_limit(&[], 25), 25);
        // Wholly covered or wholly above: the limit stands.
        assert_eq!(uncut_limit(&[(10, 20), (30, 40)], 25), 25);
        // One cut: the limit drops below its first part.
        assert_eq!(uncut_limit(&[(10, 30)], 25), 9);
        // Dropping below (15, 30) would cut (10, 20), which the limit alone
        // covered whole: the limit drops below both.
        assert_eq!(uncut_limit(&[(10, 20), (15, 30)], 25), 9);
        assert_eq!(uncut_limit(&[(15, 30), (10, 20), (3, 12)], 25), 2);
        // No LSN is 0, but such a span must not stall the cap.
        assert_eq!(uncut_limit(&[(0, 30)], 25), 0);
        for limit in 0..50 {
            let spans = [(10, 20), (15, 30), (3, 12), (35, 45)];
            let capped = uncut_limit(&spans, limit);
            assert!(capped <= limit);
            for (first, last) in spans {
                assert!(
                    last <= capped || first > capped,
                    "limit {limit} capped at {capped} cuts ({first}, {last})"
                );
            }
        }
    }

    #[test]
    fn ring_placement_never_overruns_live_batches() {
        // Empty ring: anywhere from the head, wrapping when needed.
        assert_eq!(log(&[], 0).place(100), Some(0));
        assert_eq!(log(&[], 90).place(20), Some(0));
        assert_eq!(log(&[], 90).place(101), None);
        // Live region 20..60: fits after the head, or wraps before 20 (strictly).
        let l = log(&[(1, 20, 40)], 60);
        assert_eq!(l.place(40), Some(60));
        assert_eq!(l.place(41), Some(0).filter(|_| 41 < 20));
        assert_eq!(l.place(19), Some(60));
        let l = log(&[(1, 20, 40)], 95);
        assert_eq!(l.place(10), Some(0));
        assert_eq!(l.place(20), None);
        assert_eq!(l.used_bytes(), 75);
        // Wrapped: head behind the oldest batch.
        let l = log(&[(1, 50, 50), (2, 0, 10)], 10);
        assert_eq!(l.place(39), Some(10));
        assert_eq!(l.place(40), None);
        assert_eq!(l.used_bytes(), 60);
        // A batch still being written is live too: nothing wraps over it.
        let mut l = log(&[], 10);
        l.writing.push_back((1, 0));
        assert_eq!(l.place(95), None);
        assert_eq!(l.place(90), Some(10));
        assert_eq!(l.used_bytes(), 10);
        let mut l = log(&[], 95);
        l.writing.push_back((1, 20));
        assert_eq!(l.place(10), Some(0));
        assert_eq!(l.place(20), None);
    }

    #[test]
    fn batches_split_at_the_size_limit() {
        let mut l = log(&[], 0);
        let record = |n: u16| Record {
            vdisk_id: 1,
            extent: 0,
            alloc_id: 1,
            slot: 0,
            first_block: 0,
            blocks: n,
            generation: 1,
            kind: crate::format::RecordKind::Zero,
        };
        l.max_batch_bytes = 8192;
        l.open_batch(0).push(record(1));
        assert_eq!(l.pending.len(), 1);
        let b = l.open_batch(4096);
        b.push(record(1));
        b.data_blocks += 1;
        assert_eq!(l.pending.len(), 1);
        l.open_batch(4096).push(record(1));
        assert_eq!(l.pending.len(), 2);
        assert_eq!(l.pending[1].lsn, 2);
    }

    #[test]
    fn overlay_accounting() {
        let mut overlay = BTreeMap::new();
        let mut bytes = 0;
        let seg = Segment::whole(Arc::new(basalt_core::IoBuf::zeroed(4096)));
        let data = |lsn| {
            OverlayEntry::new(
                lsn,
                lsn,
                Content::Data {
                    seg: seg.clone(),
                    crc: 0,
                },
            )
        };
        overlay_insert(&mut overlay, &mut bytes, 3, data(1));
        overlay_insert(&mut overlay, &mut bytes, 3, data(2));
        overlay_insert(
            &mut overlay,
            &mut bytes,
            3,
            OverlayEntry::new(3, 3, Content::Zero),
        );
        overlay_insert(&mut overlay, &mut bytes, 3, data(4));
        assert_eq!(bytes, 3 * 4096);
        assert_eq!(overlay_data_bytes(&overlay), bytes);
        let head = &overlay[&3];
        assert_eq!(head.newest_at_or_before(3).map(|e| e.lsn), Some(3));
        assert_eq!(head.newest_at_or_before(2).map(|e| e.lsn), Some(2));
        assert!(head.newest_at_or_before(0).is_none());
        // Draining version 2 drops versions 1 and 2, keeps 3 and 4.
        assert_eq!(overlay_prune(&mut overlay, 3, 2), 2 * 4096);
        assert_eq!(overlay[&3].newest_at_or_before(2).map(|e| e.lsn), None);
        assert_eq!(overlay_data_bytes(&overlay), 4096);
        assert_eq!(overlay_prune(&mut overlay, 3, 4), 4096);
        assert!(overlay.is_empty());
    }
}

//! The drainer: writes overlay blocks to their home slots and checkpoints.
//!
//! A cycle on one disk:
//!
//! 1. note `L`, the newest batch written to the oplog, and sync the disk so
//!    every record up to `L` is durable before anything is written in place
//!    (not needed when the cycle only writes copy-on-write metadata, below:
//!    the sync of step 3 then makes the records durable as well);
//! 2. for every extent with overlay blocks from batches `<= L`, write those
//!    blocks into the slot and a new metadata block (sequence + 1) into the
//!    metadata copy *not* holding the current version (a tenancy's first
//!    version into both copies at once: there is none to protect); likewise
//!    for every extent written copy-on-write by a batch `<= L`, whose
//!    metadata so far lives only in memory and in its remap record;
//! 3. sync the disk — now everything up to `L` is home and durable;
//! 4. commit a checkpoint to the catalog: extent-map changes up to `L`, the
//!    new oplog tail (first batch after `L`), generation reservations;
//! 5. release the oplog space of batches `<= L` and the slots freed by them.
//!
//! A crash anywhere in the cycle is harmless: until step 4 commits, the
//! oplog still holds every record and replay writes them again; a torn
//! metadata write leaves the previous copy. The cycle is idempotent.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use basalt_core::IoBuf;
use basalt_disk::Segment;
use futures::StreamExt;

use crate::StoreError;
use crate::catalog::{Checkpoint, ExtentRow};
use crate::format::{BLOCK_BYTES, BlockEntry, ExtentMeta, SLOT_META_BYTES};
use crate::state::{Content, ExtentKey, overlay_prune};
use crate::store::Store;

/// Most drain writes in the device queue at once under memory pressure.
const DRAIN_QUEUE_DEPTH: usize = 32;
/// Most drain writes in the device queue at once otherwise.
const DRAIN_QUEUE_DEPTH_GENTLE: usize = 1;

/// Half of this is the headroom below which reservations are renewed.
const RESERVE_AHEAD: u64 = 1 << 24;

struct DrainJob {
    key: ExtentKey,
    alloc_id: u64,
    slot_offset: u64,
    meta: ExtentMeta,
    /// Runs of consecutive data blocks: first block and one segment per block.
    runs: Vec<(u16, Vec<Segment>)>,
    /// Overlay entries written: block and the LSN of the entry.
    taken: Vec<(u16, u64)>,
}

impl Store {
    /// The drainer task: drains disks when asked (memory or oplog thresholds,
    /// slots waiting to come free) or every `drain_interval`.
    pub(crate) async fn drainer(&self) {
        loop {
            let wake = self.inner.drain_wake.notified();
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(self.inner.config.drain_interval) => {}

            }
            let count = self.lock().disks.len();
            for index in 0..count {
                if !self.needs_drain(index) {
                    continue;
                }
                if let Err(error) = self.drain_disk(index, false).await {
                    tracing::error!(%error, "drain failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if self.needs_reservation() {
                let count = self.lock().disks.len();
                for index in 0..count {
                    if let Err(error) = self.drain_disk(index, false).await {
                        tracing::error!(%error, "checkpoint failed");
                    }
                }
            }
        }
    }

    /// Marks a disk failed: everything on it fails from now on, and writers
    /// waiting for memory it held are released.
    pub(crate) fn fail_disk(&self, index: usize, why: String) {
        {
            let mut st = self.lock();
            let d = &mut st.disks[index];
            tracing::error!(disk = %d.path.display(), reason = %why, "disk marked failed");
            d.failed = Some(why);
        }
        self.inner.progress.notify_waiters();
    }

    fn needs_drain(&self, index: usize) -> bool {
        let st = self.lock();
        let d = &st.disks[index];
        d.failed.is_none()
            && (!d.log.batches.is_empty()
                || !d.map_changes.is_empty()
                || !d.quarantine.is_empty()
                || !d.retired.is_empty()
                || d.undrained_bytes > 0)
    }

    fn needs_reservation(&self) -> bool {
        let st = self.lock();
        st.alloc_next + RESERVE_AHEAD / 2 > st.alloc_reserved
            || st
                .vdisks
                .values()
                .any(|v| v.next_gen + RESERVE_AHEAD / 2 > v.record.gen_reserved)
    }

    /// Runs one drain cycle on disk `index`; `clean` marks a shutdown checkpoint.
    pub(crate) async fn drain_disk(&self, index: usize, clean: bool) -> Result<(), StoreError> {
        let (limit, engine) = {
            let mut st = self.lock();
            let d = &mut st.disks[index];
            if let Some(why) = &d.failed {
                return Err(StoreError::DiskFailed(
                    d.path.display().to_string(),
                    why.clone(),
                ));
            }
            // Rewrites in parts must be replayed whole or not at all.
            let limit = d.shadow_checkpoint_limit(d.log.completed_lsn);
            (limit, d.engine.clone())
        };
        // Metadata of every extent to drain must be in memory first.
        let jobs = loop {
            let missing: Vec<(ExtentKey, usize, u64, u64)> = {
                let st = self.lock();
                let retired = st.disks[index]
                    .retired
                    .iter()
                    .filter(|(lsn, _, _)| *lsn > limit)
                    .map(|(_, k, e)| (k, e));
                st.extents
                    .iter()
                    .filter(|(_, e)| e.disk == index)
                    .chain(retired)
                    .filter(|(_, e)| e.meta.is_none())
                    .filter(|(_, e)| {
                        e.overlay
                            .values()
                            .any(|o| o.newest_at_or_before(limit).is_some())
                    })
                    .map(|(k, e)| (*k, e.disk, e.slot, e.alloc_id))
                    .collect()
            };
            if !missing.is_empty() {
                let loads = futures::stream::iter(missing)
                    .map(|(key, disk, slot, alloc)| self.load_meta(key, disk, slot, alloc))
                    .buffer_unordered(32)
                    .collect::<Vec<_>>()
                    .await;
                for result in loads {
                    result?;
                }
                continue;
            }
            break self.plan_drain(index, limit);
        };

        // Only durable records may be written home: an in-place write of a
        // record the crash then loses would destroy the old contents. A
        // client flush may already have made them durable. The metadata of
        // a copy-on-write needs no such care: it goes into a slot only its
        // own tenancy maps, and the sync after it is written makes the
        // records durable too. So a cycle that writes nothing in place (a
        // stream of whole-extent writes) syncs once, not twice.
        let already_durable = self.lock().disks[index].log.durable_lsn >= limit;
        let in_place = jobs.iter().any(|job| !job.runs.is_empty());
        if !already_durable && (in_place || jobs.is_empty()) {
            if let Err(e) = engine.sync().await {
                self.fail_disk(index, format!("sync failed: {e}"));
                return Err(StoreError::Disk(e));
            }
            let mut st = self.lock();
            let log = &mut st.disks[index].log;
            log.durable_lsn = log.durable_lsn.max(limit);
        }

        // Write blocks and the new metadata home: first into the copy that
        // does not hold the current version, then (after a sync) into the
        // other, so both copies end identical and either can repair the other.
        let mut first_phase = Vec::new();
        let mut second_phase = Vec::new();
        let mut blocks = 0u64;
        for job in &jobs {
            for (first, segments) in &job.runs {
                blocks += segments.len() as u64;
                let at = job.slot_offset + SLOT_META_BYTES + u64::from(*first) * BLOCK_BYTES;
                first_phase.push((at, segments.clone()));
            }
            let block = Segment::whole(Arc::new(IoBuf::from_slice(&job.meta.encode())));
            if job.meta.seq == 1 {
                // The tenancy's first metadata: there is no current version
                // a torn write could destroy (until the checkpoint below
                // commits, the oplog describes everything), so both copies
                // go in one write.
                first_phase.push((job.slot_offset, vec![block.clone(), block]));
            } else {
                let copy = ExtentMeta::copy_for_seq(job.meta.seq);
                first_phase.push((job.slot_offset + copy * BLOCK_BYTES, vec![block.clone()]));
                second_phase.push((job.slot_offset + (1 - copy) * BLOCK_BYTES, vec![block]));
            }
        }
        let mut synced = Ok(());
        for phase in [first_phase, second_phase] {
            // Nothing written, nothing to sync (the records were synced above).
            if phase.is_empty() {
                continue;
            }
            // Background work must not bury foreground I/O: the drain keeps
            // at most DRAIN_QUEUE_DEPTH writes in the device queue, each
            // group handed to the kernel in one submission (fewer device
            // notifications, neighbours merged).
            let mut failed = None;
            let mut phase = phase.into_iter();
            loop {
                // Gentle while memory is plentiful (a foreground write waits
                // behind at most a few drain writes); full depth under
                // pressure, when writers are about to wait for the drain.
                let pressure = self.lock().undrained_total() > self.inner.config.memory_budget / 2;
                let depth = if pressure {
                    DRAIN_QUEUE_DEPTH
                } else {
                    DRAIN_QUEUE_DEPTH_GENTLE
                };
                let group: Vec<_> = phase.by_ref().take(depth).collect();
                if group.is_empty() {
                    break;
                }
                if let Some(Err(e)) = engine
                    .write_batch(group)
                    .await
                    .into_iter()
                    .find(|r| r.is_err())
                {
                    failed = Some(e);
                    break;
                }
            }
            synced = match failed {
                Some(e) => Err(e),
                None => engine.sync().await,
            };
            if synced.is_err() {
                break;
            }
        }
        if let Err(e) = synced {
            self.fail_disk(index, format!("writing home failed: {e}"));
            return Err(StoreError::Disk(e));
        }

        // Install the new metadata, drop drained overlay entries, checkpoint.
        let (checkpoint, changes_taken) = {
            let mut st = self.lock();
            let st = &mut *st;
            let disk_id = st.disks[index].id;
            let mut now_persisted = Vec::new();
            for job in jobs {
                // Retired extents (still mapped as of this checkpoint) were
                // drained too; their state is updated alike, but only a live
                // extent may change its catalog row.
                let live = st
                    .extents
                    .get(&job.key)
                    .is_some_and(|e| e.alloc_id == job.alloc_id && e.disk == index);
                let Some(e) = st.tenancy_mut(index, job.key, job.alloc_id) else {
                    continue;
                };
                if e.meta_due(limit) {
                    e.meta_unsaved = None;
                }
                if live && !e.persisted {
                    e.persisted = true;
                    let row = ExtentRow {
                        disk: disk_id,
                        slot: e.slot,
                        alloc_id: e.alloc_id,
                        persisted: true,
                    };
                    now_persisted.push((job.key, Some(row)));
                }
                let mut released = 0;
                for (block, lsn) in job.taken {
                    released += overlay_prune(&mut e.overlay, block, lsn);
                }
                e.meta = Some(Box::new(job.meta));
                st.disks[index].undrained_bytes -= released;
            }
            let d = &mut st.disks[index];
            d.log.durable_lsn = d.log.durable_lsn.max(limit);
            let mut changes: Vec<_> = d
                .map_changes
                .iter()
                .filter(|c| c.0 <= limit)
                .map(|c| (c.1, c.2))
                .collect();
            let changes_taken = changes.len();
            changes.extend(now_persisted);
            let (tail_pos, tail_lsn) = d.log.tail_after(limit);
            tracing::debug!(limit, tail_pos, tail_lsn, ?changes, "checkpoint");
            let gen_reserved = st
                .vdisks
                .values()
                .filter(|v| v.next_gen + RESERVE_AHEAD / 2 > v.record.gen_reserved)
                .map(|v| (v.record.id, v.next_gen + RESERVE_AHEAD))
                .collect();
            let alloc_reserved = (st.alloc_next + RESERVE_AHEAD / 2 > st.alloc_reserved)
                .then_some(st.alloc_next + RESERVE_AHEAD);
            let checkpoint = Checkpoint {
                disk_tails: vec![(disk_id, tail_pos, tail_lsn, clean)],
                extent_changes: changes,
                gen_reserved,
                alloc_reserved,
            };
            (checkpoint, changes_taken)
        };
        self.commit_checkpoint(checkpoint).await?;

        // Release oplog space and slots covered by the checkpoint.
        {
            let mut st = self.lock();
            let d = &mut st.disks[index];
            let mut removed = 0;
            d.map_changes.retain(|c| {
                if c.0 <= limit && removed < changes_taken {
                    removed += 1;
                    false
                } else {
                    true
                }
            });
            while d.log.batches.front().is_some_and(|b| b.0 <= limit) {
                d.log.batches.pop_front();
            }
            let mut released = Vec::new();
            d.quarantine.retain(|&(slot, lsn)| {
                if lsn <= limit {
                    released.push(slot);
                    false
                } else {
                    true
                }
            });
            d.reuse.extend(released);

            // Retired extents covered by the checkpoint are gone for good.
            let mut dropped = 0;
            d.retired.retain(|(lsn, _, e)| {
                if *lsn <= limit {
                    dropped += crate::state::overlay_data_bytes(&e.overlay);
                    false
                } else {
                    true
                }
            });
            d.undrained_bytes -= dropped;
        }
        self.inner.stats.drains.fetch_add(1, Ordering::Relaxed);
        self.inner
            .stats
            .drained_blocks
            .fetch_add(blocks, Ordering::Relaxed);
        self.inner.progress.notify_waiters();
        Ok(())
    }

    /// Builds the drain jobs of disk `index` for overlay entries up to `limit`.
    fn plan_drain(&self, index: usize, limit: u64) -> Vec<DrainJob> {
        let st = self.lock();
        let d = &st.disks[index];
        let mut jobs = Vec::new();
        let retired = d
            .retired
            .iter()
            .filter(|(lsn, _, _)| *lsn > limit)
            .map(|(_, k, e)| (k, e));
        for (key, e) in st
            .extents
            .iter()
            .filter(|(_, e)| e.disk == index)
            .chain(retired)
        {
            let Some(meta) = e.meta.as_ref() else {
                continue;
            };
            // A copy-on-write's metadata must be home before the checkpoint
            // covering its remap record is committed (the catalog then says
            // the slot's metadata is persisted, and replay no longer sees
            // the record): such extents get a job even without overlay blocks.
            if !e.meta_due(limit)
                && !e
                    .overlay
                    .values()
                    .any(|o| o.newest_at_or_before(limit).is_some())
            {
                continue;
            }
            let mut meta = (**meta).clone();
            meta.seq += 1;
            let mut runs: Vec<(u16, Vec<Segment>)> = Vec::new();
            let mut taken = Vec::new();
            let durable = e
                .overlay
                .iter()
                .filter_map(|(b, o)| Some((b, o.newest_at_or_before(limit)?)));
            for (&block, entry) in durable {
                taken.push((block, entry.lsn));
                match &entry.content {
                    Content::Data { seg, crc } => {
                        meta.entries[usize::from(block)] = BlockEntry {
                            generation: entry.generation,
                            has_data: true,
                            lost: false,
                            crc: *crc,
                        };
                        match runs.last_mut() {
                            Some((first, segs)) if *first + segs.len() as u16 == block => {
                                segs.push(seg.clone())
                            }
                            _ => runs.push((block, vec![seg.clone()])),
                        }
                    }
                    Content::Zero => {
                        meta.entries[usize::from(block)] = BlockEntry {
                            generation: entry.generation,
                            has_data: false,
                            lost: false,
                            crc: 0,
                        };
                    }
                }
            }
            tracing::debug!(?key, alloc = e.alloc_id, seq = meta.seq, blocks = ?taken.iter().map(|t| t.0).collect::<Vec<_>>(), "drain job");
            jobs.push(DrainJob {
                key: *key,
                alloc_id: e.alloc_id,
                slot_offset: d.slot_offset(e.slot),
                meta,
                runs,
                taken,
            });
        }
        jobs
    }
}

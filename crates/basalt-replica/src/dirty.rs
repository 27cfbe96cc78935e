//! Which regions of a replica may hold a mutation that has not *settled*.
//!
//! A mutation settles when every in-sync replica applied it, or every
//! replica failed it, or the ones that failed were recorded stale through
//! Raft. Until then the in-sync replicas may disagree on its blocks: the
//! owner may crash (or lose its Raft majority, or be fenced) after some
//! replicas applied a write and before it could record the others stale.
//! The write was never acknowledged, so either the old or the new data is a
//! correct answer — but all in-sync replicas must give the *same* answer,
//! or reads through different owners would see a block change with nobody
//! writing it.
//!
//! So every replica notes, in memory, the regions its unsettled mutations
//! touched, keyed by the owner's epoch and the mutation's sequence number.
//! The owner tells replicas on every mutation how far its mutations have
//! settled, which clears the notes behind it. A new owner collects the
//! notes when it fences the replicas ([`DirtyReport`]), compares the noted
//! regions across the in-sync replicas and repairs any difference before it
//! serves anything, then sends `Settle`.
//!
//! The notes live in memory: a process that starts does not know what it
//! applied before it stopped, so its table starts *unknown* for every vdisk
//! and the next owner compares that vdisk whole. A vdisk whose copy this
//! process created is known from the start.

use std::collections::HashMap;

use parking_lot::Mutex;

/// Granularity of the notes and of the comparisons they cause.
pub const DIRTY_REGION: u64 = 1 << 20;

/// A report longer than this many regions is sent as "compare everything".
pub const MAX_REPORTED_REGIONS: usize = 1 << 16;

/// What a replica reports when a new owner fences it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyReport {
    /// The replica knows every region it may hold unsettled data in; when
    /// false, the new owner must compare the whole vdisk.
    pub complete: bool,
    /// Region indexes (offset / [`DIRTY_REGION`]), ascending.
    pub regions: Vec<u64>,
}

impl DirtyReport {
    /// A report that asks for a whole comparison.
    pub fn unknown() -> DirtyReport {
        DirtyReport {
            complete: false,
            regions: Vec::new(),
        }
    }

    /// Encodes it as a fence reply's data: a flag byte (1: complete), then
    /// the regions as little-endian u64s.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.regions.len() * 8);
        out.push(u8::from(self.complete));
        for region in &self.regions {
            out.extend_from_slice(&region.to_le_bytes());
        }
        out
    }

    /// Decodes a fence reply's data; anything malformed (or the empty reply
    /// of an older peer) reads as [`DirtyReport::unknown`], which is always
    /// safe.
    pub fn decode(data: &[u8]) -> DirtyReport {
        let Some((&flag, rest)) = data.split_first() else {
            return DirtyReport::unknown();
        };
        if flag != 1 || !rest.len().is_multiple_of(8) {
            return DirtyReport::unknown();
        }
        let mut regions: Vec<u64> = rest
            .chunks_exact(8)
            .map(|chunk| {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(chunk);
                u64::from_le_bytes(bytes)
            })
            .collect();
        regions.sort_unstable();
        regions.dedup();
        DirtyReport {
            complete: true,
            regions,
        }
    }
}

#[derive(Debug, Default)]
struct VdiskNotes {
    known: bool,
    /// Region → newest (epoch, seq) of an unsettled mutation touching it.
    regions: HashMap<u64, (u64, u64)>,
    /// Newest (epoch, settled mark) applied, so old marks cost nothing.
    swept: (u64, u64),
}

/// The notes of every vdisk of one node (see the module docs).
#[derive(Debug, Default)]
pub struct DirtyTable {
    vdisks: Mutex<HashMap<u64, VdiskNotes>>,
}

impl DirtyTable {
    /// A table of a process that just started: every vdisk unknown.
    pub fn new() -> DirtyTable {
        DirtyTable::default()
    }

    /// This process created the vdisk's copy: nothing unsettled can predate it.
    pub fn mark_known(&self, vdisk: u64) {
        self.vdisks.lock().entry(vdisk).or_default().known = true;
    }

    /// Notes mutation `seq` of `epoch` over `[offset, offset + len)`.
    pub fn record(&self, vdisk: u64, epoch: u64, seq: u64, offset: u64, len: u64) {
        if seq == 0 || len == 0 {
            return;
        }
        let first = offset / DIRTY_REGION;
        let last = (offset + len - 1) / DIRTY_REGION;
        let mut vdisks = self.vdisks.lock();
        let notes = vdisks.entry(vdisk).or_default();
        for region in first..=last {
            let entry = notes.regions.entry(region).or_insert((epoch, seq));
            *entry = (*entry).max((epoch, seq));
        }
    }

    /// Applies the owner's settled mark: under `epoch`, every mutation
    /// numbered below `settled` has settled. Notes of older epochs go too:
    /// an owner under `epoch` reconciled them when it took over (or the
    /// replica was stale then and has been resynced since).
    ///
    /// A mark of 0 (the repairs a new owner makes before it settles) sweeps
    /// nothing.
    pub fn sweep(&self, vdisk: u64, epoch: u64, settled: u64) {
        if settled == 0 {
            return;
        }
        let mut vdisks = self.vdisks.lock();
        let Some(notes) = vdisks.get_mut(&vdisk) else {
            return;
        };
        if (epoch, settled) <= notes.swept {
            return;
        }
        notes.swept = (epoch, settled);
        notes.regions.retain(|_, (noted_epoch, seq)| {
            *noted_epoch > epoch || (*noted_epoch == epoch && *seq >= settled)
        });
    }

    /// What to tell a new owner.
    pub fn report(&self, vdisk: u64) -> DirtyReport {
        let vdisks = self.vdisks.lock();
        let Some(notes) = vdisks.get(&vdisk) else {
            return DirtyReport::unknown();
        };
        if !notes.known || notes.regions.len() > MAX_REPORTED_REGIONS {
            return DirtyReport::unknown();
        }
        let mut regions: Vec<u64> = notes.regions.keys().copied().collect();
        regions.sort_unstable();
        DirtyReport {
            complete: true,
            regions,
        }
    }

    /// The owner under `epoch` reconciled everything reported to it: notes
    /// of older epochs go and the vdisk is known from now on.
    pub fn settle(&self, vdisk: u64, epoch: u64) {
        let mut vdisks = self.vdisks.lock();
        let notes = vdisks.entry(vdisk).or_default();
        notes.known = true;
        notes
            .regions
            .retain(|_, (noted_epoch, _)| *noted_epoch >= epoch);
    }

    /// Forgets a deleted vdisk.
    pub fn forget(&self, vdisk: u64) {
        self.vdisks.lock().remove(&vdisk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_follow_the_settled_mark_and_a_new_process_knows_nothing() {
        let table = DirtyTable::new();
        assert_eq!(table.report(1), DirtyReport::unknown());
        table.mark_known(1);
        assert_eq!(
            table.report(1),
            DirtyReport {
                complete: true,
                regions: vec![]
            }
        );
        table.record(1, 3, 1, 0, 4096);
        table.record(1, 3, 2, DIRTY_REGION - 4096, 8192);
        table.record(1, 3, 0, 10 * DIRTY_REGION, 4096);
        assert_eq!(table.report(1).regions, vec![0, 1]);
        // Mutation 1 settled: region 0 still has mutation 2.
        table.sweep(1, 3, 2);
        assert_eq!(table.report(1).regions, vec![0, 1]);
        table.sweep(1, 3, 3);
        assert_eq!(table.report(1).regions, Vec::<u64>::new());
        // An old mark changes nothing.
        table.record(1, 3, 5, 0, 1);
        table.sweep(1, 3, 2);
        assert_eq!(table.report(1).regions, vec![0]);
        // Another epoch's mark does not clear a newer epoch's notes...
        table.record(1, 4, 1, 5 * DIRTY_REGION, 1);
        table.sweep(1, 3, 100);
        assert_eq!(table.report(1).regions, vec![5]);
        // ...while a newer epoch's mark clears older epochs' notes.
        table.record(1, 3, 200, 7 * DIRTY_REGION, 1);
        table.sweep(1, 4, 1);
        assert_eq!(table.report(1).regions, vec![5]);
        table.forget(1);
        assert!(!table.report(1).complete);
    }

    #[test]
    fn settling_makes_an_unknown_vdisk_known_and_keeps_newer_notes() {
        let table = DirtyTable::new();
        table.record(2, 1, 1, 0, 1);
        table.record(2, 2, 1, DIRTY_REGION, 1);
        assert!(!table.report(2).complete);
        table.settle(2, 2);
        assert_eq!(
            table.report(2),
            DirtyReport {
                complete: true,
                regions: vec![1]
            }
        );
    }

    #[test]
    fn reports_round_trip_and_garbage_asks_for_everything() {
        let report = DirtyReport {
            complete: true,
            regions: vec![1, 5, 9],
        };
        assert_eq!(DirtyReport::decode(&report.encode()), report);
        assert_eq!(
            DirtyReport::decode(&DirtyReport::unknown().encode()),
            DirtyReport::unknown()
        );
        assert_eq!(DirtyReport::decode(&[]), DirtyReport::unknown());
        assert_eq!(DirtyReport::decode(&[1, 2, 3]), DirtyReport::unknown());
        assert_eq!(DirtyReport::decode(&[7]), DirtyReport::unknown());
    }
}

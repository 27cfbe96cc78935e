//! A simulated disk that keeps written and durable bytes apart.
//!
//! [`SimDisk`] is the physical medium; [`SimDisk::engine`] hands out an engine
//! bound to the current "power cycle". [`SimDisk::power_cut`] ends that cycle:
//! every engine of it fails from then on (the process died with the power), and
//! the medium keeps what a real disk with a volatile write cache may keep —
//! every write synced before the cut, plus (in [`CutMode::Random`]) any subset
//! of the later writes, each possibly torn at 512-byte sector granularity.
//! Nothing that was never written can appear.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use basalt_core::{BoxFuture, IoBuf};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{DiskEngine, DiskError, EngineKind, ReadResult, Segment, check_aligned, segment_parts};

const PAGE: usize = 4096;
const SECTOR: usize = 512;

/// What survives a power cut.
#[derive(Debug, Clone, Copy)]
pub enum CutMode {
    /// Only synced writes survive.
    DropUnsynced,
    /// Every write survives, synced or not (the volatile cache happened to
    /// reach the medium); tests then damage chosen bytes with
    /// [`SimDisk::corrupt`] to model exactly the torn writes they need.
    KeepUnsynced,
    /// Synced writes survive; each later write survives whole, torn (a random
    /// subset of its sectors) or not at all, chosen by the seeded generator.
    Random {
        /// Seed of the choice.
        seed: u64,
    },
}

#[derive(Default)]
struct Medium {
    /// Bytes as the current power cycle reads them.
    volatile: HashMap<u64, Box<[u8; PAGE]>>,
    /// Bytes that survive a power cut.
    durable: HashMap<u64, Box<[u8; PAGE]>>,
    /// Writes completed since the last sync, in completion order.
    unsynced: Vec<(u64, Vec<u8>)>,
    cycle: u64,
    read_faults: Vec<Range<u64>>,
    write_faults: Vec<Range<u64>>,
    full: bool,
    stats: SimStats,
}

/// Counters of a simulated disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimStats {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Completed syncs.
    pub syncs: u64,
}

fn write_pages(pages: &mut HashMap<u64, Box<[u8; PAGE]>>, offset: u64, data: &[u8]) {
    let mut at = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let page_no = at / PAGE as u64;
        let in_page = (at % PAGE as u64) as usize;
        let n = (PAGE - in_page).min(rest.len());
        let page = pages
            .entry(page_no)
            .or_insert_with(|| Box::new([0u8; PAGE]));
        page[in_page..in_page + n].copy_from_slice(&rest[..n]);
        at += n as u64;
        rest = &rest[n..];
    }
}

fn read_pages(pages: &HashMap<u64, Box<[u8; PAGE]>>, offset: u64, out: &mut [u8]) {
    let mut at = offset;
    let mut done = 0;
    while done < out.len() {
        let page_no = at / PAGE as u64;
        let in_page = (at % PAGE as u64) as usize;
        let n = (PAGE - in_page).min(out.len() - done);
        match pages.get(&page_no) {
            Some(page) => out[done..done + n].copy_from_slice(&page[in_page..in_page + n]),
            None => out[done..done + n].fill(0),
        }
        at += n as u64;
        done += n;
    }
}

/// True when every page of the range was written before (has backing space).
fn written_before(pages: &HashMap<u64, Box<[u8; PAGE]>>, offset: u64, len: u64) -> bool {
    let first = offset / PAGE as u64;
    let end = (offset + len).div_ceil(PAGE as u64);
    (first..end).all(|p| pages.contains_key(&p))
}

fn overlaps(ranges: &[Range<u64>], offset: u64, len: u64) -> bool {
    ranges
        .iter()
        .any(|r| offset < r.end && r.start < offset + len)
}

/// A simulated physical disk shared by successive engines.
#[derive(Clone)]
pub struct SimDisk {
    medium: Arc<Mutex<Medium>>,
    size: u64,
}

impl SimDisk {
    /// A blank (all zero) disk of `size` bytes.
    pub fn new(size: u64) -> SimDisk {
        SimDisk {
            medium: Arc::new(Mutex::new(Medium::default())),
            size,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// An engine for the current power cycle.
    pub fn engine(&self) -> Arc<SimEngine> {
        let cycle = self.medium.lock().cycle;
        Arc::new(SimEngine {
            disk: self.clone(),
            cycle,
        })
    }

    /// Cuts the power: engines of this cycle fail from now on, and the medium
    /// keeps the durable bytes plus what `mode` lets through.
    pub fn power_cut(&self, mode: CutMode) {
        let mut m = self.medium.lock();
        m.cycle += 1;
        let unsynced = std::mem::take(&mut m.unsynced);
        match mode {
            CutMode::DropUnsynced => {}
            // What this cycle reads is every write, synced or not.
            CutMode::KeepUnsynced => m.durable = m.volatile.clone(),
            CutMode::Random { seed } => {
                let mut rng = StdRng::seed_from_u64(seed);
                for (offset, data) in unsynced {
                    match rng.gen_range(0..3) {
                        0 => {}
                        1 => write_pages(&mut m.durable, offset, &data),
                        _ => {
                            for (i, sector) in data.chunks(SECTOR).enumerate() {
                                if rng.gen_bool(0.5) {
                                    write_pages(
                                        &mut m.durable,
                                        offset + (i * SECTOR) as u64,
                                        sector,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        m.volatile = m.durable.clone();
    }

    /// Reads the medium as the current cycle sees it (test inspection).
    pub fn peek(&self, offset: u64, out: &mut [u8]) {
        read_pages(&self.medium.lock().volatile, offset, out);
    }

    /// Overwrites bytes on the medium, durable at once (simulates corruption).
    pub fn corrupt(&self, offset: u64, data: &[u8]) {
        let mut m = self.medium.lock();
        write_pages(&mut m.volatile, offset, data);
        write_pages(&mut m.durable, offset, data);
    }

    /// Makes reads touching `range` fail with an I/O error.
    pub fn fail_reads(&self, range: Range<u64>) {
        self.medium.lock().read_faults.push(range);
    }

    /// Makes writes touching `range` fail with an I/O error.
    pub fn fail_writes(&self, range: Range<u64>) {
        self.medium.lock().write_faults.push(range);
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        let mut m = self.medium.lock();
        m.read_faults.clear();
        m.write_faults.clear();
        m.full = false;
    }

    /// Models a full filesystem under a sparse file disk: reserving space
    /// and writing where nothing was ever written fail with ENOSPC;
    /// overwriting written bytes still works.
    pub fn set_full(&self, full: bool) {
        self.medium.lock().full = full;
    }

    /// Counters so far.
    pub fn stats(&self) -> SimStats {
        self.medium.lock().stats
    }
}

/// An engine over a [`SimDisk`], valid for one power cycle.
pub struct SimEngine {
    disk: SimDisk,
    cycle: u64,
}

impl SimEngine {
    fn check(
        &self,
        m: &Medium,
        offset: u64,
        parts: &[(usize, usize, usize)],
    ) -> Result<u64, DiskError> {
        if m.cycle != self.cycle {
            return Err(DiskError::EngineGone);
        }
        check_aligned(offset, parts.iter().copied())?;
        let total: u64 = parts.iter().map(|&(_, l, _)| l as u64).sum();
        match offset.checked_add(total) {
            Some(end) if end <= self.disk.size => Ok(total),
            _ => Err(DiskError::OutOfRange {
                offset,
                len: total,
                size: self.disk.size,
            }),
        }
    }
}

impl DiskEngine for SimEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Simulated
    }

    fn size(&self) -> u64 {
        self.disk.size
    }

    fn read_at(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<'static, ReadResult> {
        let result = {
            let mut m = self.disk.medium.lock();
            match self.check(&m, offset, &[(0, buf.len(), buf.len())]) {
                Err(e) => Err(e),
                Ok(len) if overlaps(&m.read_faults, offset, len) => Err(DiskError::Io {
                    offset,
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                }),
                Ok(_) => {
                    read_pages(&m.volatile, offset, buf.as_mut_slice());
                    m.stats.reads += 1;
                    Ok(())
                }
            }
        };
        Box::pin(async move {
            tokio::task::yield_now().await;
            (buf, result)
        })
    }

    fn write_at(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        let parts = segment_parts(&segments);
        let result = {
            let mut m = self.disk.medium.lock();
            match self.check(&m, offset, &parts) {
                Err(e) => Err(e),
                Ok(len) if m.full && !written_before(&m.volatile, offset, len) => {
                    Err(DiskError::NoSpace { offset })
                }
                Ok(len) if overlaps(&m.write_faults, offset, len) => Err(DiskError::Io {
                    offset,
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                }),
                Ok(len) => {
                    let mut data = Vec::with_capacity(len as usize);
                    for segment in &segments {
                        data.extend_from_slice(segment.as_slice());
                    }
                    write_pages(&mut m.volatile, offset, &data);
                    m.unsynced.push((offset, data));
                    m.stats.writes += 1;
                    m.stats.bytes_written += len;
                    Ok(())
                }
            }
        };
        Box::pin(async move {
            tokio::task::yield_now().await;
            result
        })
    }

    fn allocate(&self, offset: u64, _len: u64) -> BoxFuture<'static, Result<(), DiskError>> {
        let result = {
            let m = self.disk.medium.lock();
            if m.cycle != self.cycle {
                Err(DiskError::EngineGone)
            } else if m.full {
                Err(DiskError::NoSpace { offset })
            } else {
                Ok(())
            }
        };
        Box::pin(async move { result })
    }

    fn sync(&self) -> BoxFuture<'static, Result<(), DiskError>> {
        let result = {
            let mut m = self.disk.medium.lock();
            if m.cycle != self.cycle {
                Err(DiskError::EngineGone)
            } else {
                let unsynced = std::mem::take(&mut m.unsynced);
                for (offset, data) in unsynced {
                    write_pages(&mut m.durable, offset, &data);
                }
                m.stats.syncs += 1;
                Ok(())
            }
        };
        Box::pin(async move {
            tokio::task::yield_now().await;
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(byte: u8) -> Vec<Segment> {
        vec![Segment::whole(Arc::new(IoBuf::from_slice(&[byte; PAGE])))]
    }

    async fn read(engine: &SimEngine, offset: u64) -> Vec<u8> {
        let (buf, result) = engine.read_at(offset, IoBuf::zeroed(PAGE)).await;
        result.expect("read");
        buf.as_slice().to_vec()
    }

    #[tokio::test]
    async fn synced_writes_survive_and_unsynced_do_not() {
        let disk = SimDisk::new(1 << 20);
        let engine = disk.engine();
        engine.write_at(0, page(1)).await.expect("write");
        engine.sync().await.expect("sync");
        engine.write_at(0, page(2)).await.expect("write");
        engine.write_at(PAGE as u64, page(3)).await.expect("write");
        assert_eq!(read(&engine, 0).await, vec![2; PAGE]);
        disk.power_cut(CutMode::DropUnsynced);
        assert!(matches!(engine.sync().await, Err(DiskError::EngineGone)));
        let engine = disk.engine();
        assert_eq!(read(&engine, 0).await, vec![1; PAGE]);
        assert_eq!(read(&engine, PAGE as u64).await, vec![0; PAGE]);
    }

    #[tokio::test]
    async fn keep_unsynced_keeps_every_write_in_order() {
        let disk = SimDisk::new(1 << 20);
        let engine = disk.engine();
        engine.write_at(0, page(1)).await.expect("write");
        engine.sync().await.expect("sync");
        engine.write_at(0, page(2)).await.expect("write");
        engine.write_at(0, page(3)).await.expect("write");
        engine.write_at(PAGE as u64, page(4)).await.expect("write");
        disk.power_cut(CutMode::KeepUnsynced);
        let engine = disk.engine();
        assert_eq!(read(&engine, 0).await, vec![3; PAGE]);
        assert_eq!(read(&engine, PAGE as u64).await, vec![4; PAGE]);
    }

    #[tokio::test]
    async fn random_cut_keeps_only_written_sectors() {
        for seed in 0..20 {
            let disk = SimDisk::new(1 << 20);
            let engine = disk.engine();
            engine.write_at(0, page(1)).await.expect("write");
            engine.sync().await.expect("sync");
            engine.write_at(0, page(2)).await.expect("write");
            disk.power_cut(CutMode::Random { seed });
            let data = read(&disk.engine(), 0).await;
            for sector in data.chunks(SECTOR) {
                assert!(
                    sector == [1; SECTOR] || sector == [2; SECTOR],
                    "seed {seed}"
                );
            }
        }
    }

    #[tokio::test]
    async fn faults_and_alignment() {
        let disk = SimDisk::new(1 << 20);
        let engine = disk.engine();
        disk.fail_reads(0..1);
        let (_, result) = engine.read_at(0, IoBuf::zeroed(PAGE)).await;
        assert!(matches!(result, Err(DiskError::Io { .. })));
        engine.write_at(0, page(2)).await.expect("write");
        disk.set_full(true);
        assert!(matches!(
            engine.write_at(PAGE as u64, page(1)).await,
            Err(DiskError::NoSpace { .. })
        ));
        engine
            .write_at(0, page(3))
            .await
            .expect("overwrite keeps working when full");
        assert!(matches!(
            engine.allocate(PAGE as u64, PAGE as u64).await,
            Err(DiskError::NoSpace { .. })
        ));

        disk.clear_faults();
        assert!(matches!(
            engine.write_at(100, page(1)).await,
            Err(DiskError::Unaligned { .. })
        ));
        assert!(matches!(
            engine.write_at(1 << 20, page(1)).await,
            Err(DiskError::OutOfRange { .. })
        ));
    }
}

//! An in-memory [`BlockBackend`] and [`ExportRegistry`] for tests, examples
//! and benchmarks of frontends.
//!
//! The backend keeps bytes in a `Vec<u8>` and tracks which 4 KiB blocks are
//! allocated, so block status, trim and write-zeroes behave like a thin
//! vdisk. It counts operations and can inject failures and delays, so tests
//! can check that a frontend really forwards FUA, flushes and errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use basalt_core::{
    AllocationExtent, BLOCK_SIZE, BlockBackend, BlockError, BoxFuture, ExportRegistry, IoBuf,
    WriteFlags, check_range,
};
use parking_lot::RwLock;

struct State {
    data: Vec<u8>,
    /// One entry per 4 KiB block: true once written (and not trimmed since).
    allocated: Vec<bool>,
}

/// Counts of operations a [`MemBackend`] served.
#[derive(Debug, Default)]
pub struct MemStats {
    /// Reads served.
    pub reads: AtomicU64,
    /// Writes served.
    pub writes: AtomicU64,
    /// Writes (and write-zeroes) that carried FUA.
    pub fua_writes: AtomicU64,
    /// Flushes served.
    pub flushes: AtomicU64,
    /// Trims served.
    pub trims: AtomicU64,
    /// Write-zeroes served.
    pub write_zeroes: AtomicU64,
    /// Block status queries served.
    pub block_status: AtomicU64,
}

/// A thin-provisioned block device in memory.
pub struct MemBackend {
    size: u64,
    state: RwLock<State>,
    /// What the backend served.
    pub stats: MemStats,
    fail: AtomicBool,
    delay_us: AtomicU64,
}

impl MemBackend {
    /// A zero-filled device of `size` bytes with nothing allocated.
    pub fn new(size: u64) -> Arc<MemBackend> {
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        let blocks = size.div_ceil(BLOCK_SIZE) as usize;
        Arc::new(MemBackend {
            size,
            state: RwLock::new(State {
                data: vec![0; len],
                allocated: vec![false; blocks],
            }),
            stats: MemStats::default(),
            fail: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
        })
    }

    /// Makes every following operation fail with [`BlockError::Io`] (or succeed again).
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Delays every following operation by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.delay_us.store(us, Ordering::SeqCst);
    }

    /// A copy of `len` bytes at `offset` (panics outside the device: test helper).
    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let start = offset as usize;
        self.state.read().data[start..start + len].to_vec()
    }

    /// Overwrites bytes directly, marking their blocks allocated (test helper).
    pub fn fill(&self, offset: u64, bytes: &[u8]) {
        let mut state = self.state.write();
        let start = offset as usize;
        state.data[start..start + bytes.len()].copy_from_slice(bytes);
        mark(&mut state.allocated, offset, bytes.len() as u64, true);
    }

    /// Whether the 4 KiB block holding `offset` is allocated.
    pub fn is_allocated(&self, offset: u64) -> bool {
        self.state.read().allocated[(offset / BLOCK_SIZE) as usize]
    }

    async fn enter(&self) -> Result<(), BlockError> {
        let us = self.delay_us.load(Ordering::SeqCst);
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(BlockError::Io("injected failure".into()));
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, keep_allocated: bool) {
        let mut state = self.state.write();
        let (start, end) = (offset as usize, (offset + len) as usize);
        state.data[start..end].fill(0);
        if keep_allocated {
            mark(&mut state.allocated, offset, len, true);
        } else {
            // Only whole blocks become holes; partial blocks stay allocated.
            let first = offset.div_ceil(BLOCK_SIZE);
            let last = (offset + len) / BLOCK_SIZE;
            let end_of_device = offset + len == self.size;
            let last = if end_of_device {
                self.size.div_ceil(BLOCK_SIZE)
            } else {
                last
            };
            for block in first..last {
                state.allocated[block as usize] = false;
            }
        }
    }
}

fn mark(allocated: &mut [bool], offset: u64, len: u64, value: bool) {
    if len == 0 {
        return;
    }
    let first = offset / BLOCK_SIZE;
    let last = (offset + len - 1) / BLOCK_SIZE;
    for block in first..=last {
        allocated[block as usize] = value;
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn id(&self) -> String {
        "mem".into()
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<IoBuf, BlockError>> {
        Box::pin(async move {
            self.enter().await?;
            check_range(offset, u64::from(len), self.size)?;
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            let state = self.state.read();
            let start = offset as usize;
            Ok(IoBuf::from_slice(&state.data[start..start + len as usize]))
        })
    }

    fn write(
        &self,
        offset: u64,
        data: IoBuf,
        flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.enter().await?;
            check_range(offset, data.len() as u64, self.size)?;
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
            if flags.fua {
                self.stats.fua_writes.fetch_add(1, Ordering::Relaxed);
            }
            let mut state = self.state.write();
            let start = offset as usize;
            state.data[start..start + data.len()].copy_from_slice(data.as_slice());
            mark(&mut state.allocated, offset, data.len() as u64, true);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.enter().await?;
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.enter().await?;
            check_range(offset, len, self.size)?;
            self.stats.trims.fetch_add(1, Ordering::Relaxed);
            self.zero(offset, len, false);
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.enter().await?;
            check_range(offset, len, self.size)?;
            self.stats.write_zeroes.fetch_add(1, Ordering::Relaxed);
            if flags.fua {
                self.stats.fua_writes.fetch_add(1, Ordering::Relaxed);
            }
            self.zero(offset, len, allocate);
            Ok(())
        })
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<AllocationExtent>, BlockError>> {
        Box::pin(async move {
            self.enter().await?;
            check_range(offset, len, self.size)?;
            self.stats.block_status.fetch_add(1, Ordering::Relaxed);
            let state = self.state.read();
            let end = offset + len;
            let mut extents: Vec<AllocationExtent> = Vec::new();
            let mut at = offset;
            while at < end {
                let block = at / BLOCK_SIZE;
                let block_end = ((block + 1) * BLOCK_SIZE).min(end);
                let hole = !state.allocated[block as usize];
                let zero = hole
                    || state.data[at as usize..block_end as usize]
                        .iter()
                        .all(|&b| b == 0);
                let length = block_end - at;
                match extents.last_mut() {
                    Some(last) if last.hole == hole && last.zero == zero => last.length += length,
                    _ => extents.push(AllocationExtent { length, hole, zero }),
                }
                at = block_end;
            }
            Ok(extents)
        })
    }
}

type Entry = (String, Arc<dyn BlockBackend>);

/// A registry of named exports in memory.
#[derive(Default)]
pub struct MemRegistry {
    exports: RwLock<BTreeMap<String, Entry>>,
}

impl MemRegistry {
    /// An empty registry.
    pub fn new() -> MemRegistry {
        MemRegistry::default()
    }

    /// Adds or replaces an export.
    pub fn insert(&self, name: &str, description: &str, backend: Arc<dyn BlockBackend>) {
        self.exports
            .write()
            .insert(name.to_string(), (description.to_string(), backend));
    }

    /// Removes an export.
    pub fn remove(&self, name: &str) {
        self.exports.write().remove(name);
    }
}

impl ExportRegistry for MemRegistry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        self.exports
            .read()
            .get(name)
            .map(|(_, backend)| backend.clone())
    }

    fn list(&self) -> Vec<(String, String)> {
        self.exports
            .read()
            .iter()
            .map(|(name, (description, _))| (name.clone(), description.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn block_status_tracks_writes_trims_and_zeroes() {
        let b = MemBackend::new(64 * 1024);
        let status = b.block_status(0, 65536).await.expect("status");
        assert_eq!(
            status,
            vec![AllocationExtent {
                length: 65536,
                hole: true,
                zero: true
            }]
        );
        b.write(4096, IoBuf::from_slice(&[7; 100]), WriteFlags::default())
            .await
            .expect("write");
        b.write_zeroes(16384, 8192, true, WriteFlags::default())
            .await
            .expect("zeroes");
        let status = b.block_status(0, 65536).await.expect("status");
        let simple: Vec<_> = status.iter().map(|e| (e.length, e.hole, e.zero)).collect();
        assert_eq!(
            simple,
            vec![
                (4096, true, true),
                (4096, false, false),
                (8192, true, true),
                (8192, false, true),
                (40960, true, true)
            ]
        );
        b.trim(4096, 4096).await.expect("trim");
        assert!(!b.is_allocated(4096));
        assert_eq!(b.contents(4096, 100), vec![0; 100]);
        // Partial trims zero the bytes but keep the block.
        b.fill(0, &[1; 10]);
        b.trim(5, 5).await.expect("trim");
        assert!(b.is_allocated(0));
        assert_eq!(b.contents(0, 10), vec![1, 1, 1, 1, 1, 0, 0, 0, 0, 0]);
    }

    #[tokio::test]
    async fn failures_and_ranges() {
        let b = MemBackend::new(4096);
        assert!(matches!(
            b.read(4000, 200).await,
            Err(BlockError::OutOfRange { .. })
        ));
        b.set_failing(true);
        assert!(matches!(b.flush().await, Err(BlockError::Io(_))));
        b.set_failing(false);
        assert!(b.flush().await.is_ok());
    }
}

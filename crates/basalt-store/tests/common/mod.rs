//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use basalt_core::{BlockError, IoBuf, WriteSource};
use basalt_disk::sim::SimDisk;
use basalt_disk::{DiskEngine, DiskError, EngineKind, ReadResult, Segment};
use basalt_store::{OpenedDisk, Store, StoreConfig};
use futures::future::BoxFuture;
use tokio::sync::watch;

pub const BLOCK: usize = 4096;

/// A small-budget configuration so drains, wraps and backpressure happen often.
pub fn config(dir: &Path) -> StoreConfig {
    let mut config = StoreConfig::new(dir);
    config.memory_budget = 4 << 20;
    config
}

pub async fn open_sim(dir: &Path, disk: &SimDisk) -> Store {
    open_sim_with(config(dir), disk).await
}

/// Opens a store with `config` on `disk`.
pub async fn open_sim_with(config: StoreConfig, disk: &SimDisk) -> Store {
    Store::open_with_engines(
        config,
        vec![OpenedDisk {
            path: "sim0".into(),
            engine: disk.engine(),
        }],
    )
    .await
    .expect("open store")
}

/// Contents of `block` as written by write number `tag`: recognisable and
/// different for every (tag, block).
pub fn pattern(tag: u64, block: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK];
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    for chunk in out.chunks_mut(8) {
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out[..8].copy_from_slice(&tag.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out
}

/// The tag of a block written by [`pattern`], or 0 for a zero block; panics on
/// anything else (garbage must never be read back).
pub fn tag_of(data: &[u8], block: u64) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&data[..8]);
    let tag = u64::from_le_bytes(tag);
    assert_eq!(
        data,
        pattern(tag, block).as_slice(),
        "block {block} holds garbage (claims tag {tag})"
    );
    tag
}

pub fn buffer(tag: u64, first: u64, blocks: u64) -> IoBuf {
    let mut buf = IoBuf::zeroed(blocks as usize * BLOCK);
    for i in 0..blocks {
        let at = i as usize * BLOCK;
        buf.as_mut_slice()[at..at + BLOCK].copy_from_slice(&pattern(tag, first + i));
    }
    buf
}

/// The tags of the blocks of `data`, read from block `first` on.
pub fn tags(data: &IoBuf, first: u64) -> Vec<u64> {
    data.as_slice()
        .chunks(BLOCK)
        .enumerate()
        .map(|(i, block)| tag_of(block, first + i as u64))
        .collect()
}

/// The tags of `blocks` blocks of `vdisk` from block `first`.
pub async fn read_tags(store: &Store, vdisk: u64, first: u64, blocks: u64) -> Vec<u64> {
    let data = store.read(vdisk, first, blocks).await.expect("read");
    tags(&data, first)
}

/// Creates vdisk "v" (4 MiB) on `store` and writes tag 1 to its extent 1
/// (blocks 256..512), not flushed; returns its id.
pub async fn vdisk_with_extent_one(store: &Store) -> u64 {
    let v = store.create_vdisk("v", 4 << 20).await.expect("create").id;
    store
        .write(v, 256, buffer(1, 256, 256), false)
        .await
        .expect("first write");
    v
}

/// A simulated disk with test hooks: a write for which `hold` (given the
/// write's length) answers true waits until the gate is open (the simulated
/// disk writes when called, so a held write reaches it only then), and
/// space reservations are counted.
pub struct HookedEngine {
    inner: Arc<dyn DiskEngine>,
    hold: Box<dyn Fn(usize) -> bool + Send + Sync>,
    open: watch::Receiver<bool>,
    allocations: Arc<AtomicU64>,
}

/// The handles of a [`HookedEngine`].
pub struct Hooks {
    /// Open (true, the start) lets held writes through.
    pub gate: watch::Sender<bool>,
    /// Space reservations asked of the disk.
    pub allocations: Arc<AtomicU64>,
}

/// A [`HookedEngine`] over `disk`, its gate open.
pub fn hooked(
    disk: &SimDisk,
    hold: impl Fn(usize) -> bool + Send + Sync + 'static,
) -> (Arc<dyn DiskEngine>, Hooks) {
    let (gate, open) = watch::channel(true);
    let allocations = Arc::new(AtomicU64::new(0));
    let engine = HookedEngine {
        inner: disk.engine(),
        hold: Box::new(hold),
        open,
        allocations: allocations.clone(),
    };
    (Arc::new(engine), Hooks { gate, allocations })
}

/// Opens a store (with [`config`]) on one given engine.
pub async fn open_engine(dir: &Path, engine: Arc<dyn DiskEngine>) -> Store {
    open_configured(config(dir), engine).await
}

/// Opens a store with `config` on one given engine.
pub async fn open_configured(config: StoreConfig, engine: Arc<dyn DiskEngine>) -> Store {
    Store::open_with_engines(
        config,
        vec![OpenedDisk {
            path: "hooked0".into(),
            engine,
        }],
    )
    .await
    .expect("open store")
}

impl DiskEngine for HookedEngine {
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, buf: IoBuf) -> BoxFuture<'static, ReadResult> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(
        &self,
        offset: u64,
        segments: Vec<Segment>,
    ) -> BoxFuture<'static, Result<(), DiskError>> {
        let len: usize = segments.iter().map(|s| s.len).sum();
        if !(self.hold)(len) {
            return self.inner.write_at(offset, segments);
        }
        let inner = self.inner.clone();
        let mut open = self.open.clone();
        Box::pin(async move {
            let _ = open.wait_for(|&o| o).await;
            inner.write_at(offset, segments).await
        })
    }

    fn sync(&self) -> BoxFuture<'static, Result<(), DiskError>> {
        self.inner.sync()
    }

    fn allocate(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<(), DiskError>> {
        self.allocations.fetch_add(1, Ordering::SeqCst);
        self.inner.allocate(offset, len)
    }
}

/// Waits until every oplog batch written so far is covered by a checkpoint.
pub async fn checkpointed(store: &Store) {
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while basalt_store::uncheckpointed_batches_for_tests(store) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the drainer checkpoints within 10 s");
}

/// The bytes of `tag`'s write to `blocks` blocks from `first`, handed out in
/// whatever pieces the store asks for; fails from the `fail_at`-th request on.
pub struct TagSource {
    data: IoBuf,
    taken: usize,
    /// How many pieces the store has asked for.
    pub calls: usize,
    /// The request (counted from 0) from which on it fails.
    pub fail_at: Option<usize>,
}

impl TagSource {
    pub fn new(tag: u64, first: u64, blocks: u64) -> TagSource {
        TagSource {
            data: buffer(tag, first, blocks),
            taken: 0,
            calls: 0,
            fail_at: None,
        }
    }
}

impl WriteSource for TagSource {
    fn read_next(&mut self, dst: &mut [u8]) -> Result<(), BlockError> {
        if self.fail_at == Some(self.calls) {
            return Err(BlockError::Io("the guest's memory went away".into()));
        }
        self.calls += 1;
        let end = self.taken + dst.len();
        dst.copy_from_slice(&self.data.as_slice()[self.taken..end]);
        self.taken = end;
        Ok(())
    }
}

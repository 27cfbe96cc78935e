//! The vdisk controller: turns byte-addressed block requests from frontends
//! into block-granular store operations.
//!
//! Frontends speak bytes; the store speaks 4 KiB blocks that each carry a
//! checksum. This layer bridges them:
//!
//! * aligned requests go straight to the store (the fast path, no copies);
//! * unaligned writes become read-modify-write of the edge blocks, done under
//!   an exclusive lock of the vdisk so no concurrent write to the same block
//!   can be lost between the read and the write (aligned writes share the
//!   lock, so they never wait for each other);
//! * trim frees whole blocks only (the NBD and virtio contracts let the
//!   partial edges keep their data); write-zeroes zeroes exactly the range;
//! * store errors become the protocol-neutral [`BlockError`].
//!
//! Replication (a later capability) will live here too: the controller is the
//! one place that sees every write of a vdisk in order.

use std::collections::HashMap;
use std::sync::Arc;

use basalt_core::{
    AllocationExtent, BLOCK_SIZE, BlockBackend, BlockError, BoxFuture, ExportRegistry, IoBuf,
    WriteFlags, WriteSource, check_range, check_request_len, gather_source, whole_blocks,
};
use basalt_store::{Store, StoreError};
use parking_lot::Mutex;
use tokio::sync::RwLock;

/// Largest range handed to the store in one zeroing call.
const ZERO_CHUNK: u64 = 1 << 30;
/// Largest buffer of zeros written at once for write-zeroes that must allocate.
const ZERO_WRITE_CHUNK: u64 = 1 << 20;

/// Maps a store error to what a frontend reports.
pub fn block_error(error: StoreError) -> BlockError {
    match error {
        StoreError::OutOfRange {
            first,
            blocks,
            size_blocks,
            ..
        } => BlockError::OutOfRange {
            offset: first * BLOCK_SIZE,
            len: blocks * BLOCK_SIZE,
            size: size_blocks * BLOCK_SIZE,
        },
        StoreError::NoSpace => BlockError::NoSpace,
        StoreError::ShuttingDown => BlockError::Shutdown,
        StoreError::NoSuchVdisk(name) => BlockError::Io(format!("vdisk {name} was deleted")),
        StoreError::BadSize(why) => BlockError::Invalid(why),
        StoreError::Source(error) => error,
        other => BlockError::Io(other.to_string()),
    }
}

/// One vdisk as a [`BlockBackend`].
pub struct Vdisk {
    store: Store,
    id: u64,
    name: String,
    /// Shared by aligned writes, exclusive for read-modify-write.
    rmw: RwLock<()>,
}

impl Vdisk {
    /// The controller of vdisk `id` named `name`.
    pub fn new(store: Store, id: u64, name: String) -> Vdisk {
        Vdisk {
            store,
            id,
            name,
            rmw: RwLock::new(()),
        }
    }

    /// The vdisk's numeric id.
    pub fn vdisk_id(&self) -> u64 {
        self.id
    }

    fn current_size(&self) -> Result<u64, BlockError> {
        self.store
            .vdisk_size(self.id)
            .ok_or_else(|| BlockError::Io(format!("vdisk {} was deleted", self.name)))
    }

    async fn do_read(&self, offset: u64, len: u32) -> Result<IoBuf, BlockError> {
        let size = self.current_size()?;
        check_range(offset, u64::from(len), size)?;
        check_request_len("read", u64::from(len))?;
        if len == 0 {
            return Ok(IoBuf::zeroed(0));
        }
        let first = offset / BLOCK_SIZE;
        let end = (offset + u64::from(len)).div_ceil(BLOCK_SIZE);
        let data = self
            .store
            .read(self.id, first, end - first)
            .await
            .map_err(block_error)?;
        let skip = (offset - first * BLOCK_SIZE) as usize;
        if skip == 0 && data.len() == len as usize {
            return Ok(data);
        }
        Ok(IoBuf::from_slice(
            &data.as_slice()[skip..skip + len as usize],
        ))
    }

    /// An aligned write goes to the store with its source, so that the store
    /// can write a whole extent while it is still copying it; any other
    /// write takes its bytes first.
    async fn do_write_from(
        &self,
        offset: u64,
        len: u32,
        source: &mut dyn WriteSource,
        flags: WriteFlags,
    ) -> Result<(), BlockError> {
        check_request_len("write", u64::from(len))?;
        let aligned = whole_blocks(offset, u64::from(len));
        if !aligned || len == 0 {
            let data = gather_source(source, len as usize)?;
            return self.do_write(offset, data, flags).await;
        }
        check_range(offset, u64::from(len), self.current_size()?)?;
        let _shared = self.rmw.read().await;
        self.store
            .write_from(
                self.id,
                offset / BLOCK_SIZE,
                u64::from(len) / BLOCK_SIZE,
                source,
                flags.fua,
            )
            .await
            .map_err(block_error)
    }

    async fn do_write(
        &self,
        offset: u64,
        data: IoBuf,
        flags: WriteFlags,
    ) -> Result<(), BlockError> {
        let size = self.current_size()?;
        let len = data.len() as u64;
        check_range(offset, len, size)?;
        check_request_len("write", len)?;
        if len == 0 {
            return Ok(());
        }
        if whole_blocks(offset, len) {
            let _shared = self.rmw.read().await;
            return self
                .store
                .write(self.id, offset / BLOCK_SIZE, data, flags.fua)
                .await
                .map_err(block_error);
        }
        // Read-modify-write of the covering blocks.
        let _exclusive = self.rmw.write().await;
        let first = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        let mut blocks = self
            .store
            .read(self.id, first, end - first)
            .await
            .map_err(block_error)?;
        let skip = (offset - first * BLOCK_SIZE) as usize;
        blocks.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data.as_slice());
        self.store
            .write(self.id, first, blocks, flags.fua)
            .await
            .map_err(block_error)
    }

    /// Zeroes `[offset, offset + len)` exactly; whole blocks are deallocated
    /// unless `allocate`, partial blocks are rewritten with zeros.
    async fn do_zero(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        let size = self.current_size()?;
        check_range(offset, len, size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let whole_first = offset.div_ceil(BLOCK_SIZE);
        let whole_end = end / BLOCK_SIZE;
        let flags = WriteFlags { fua };
        if whole_end <= whole_first {
            // No whole block inside the range: one read-modify-write.
            return self
                .do_write(offset, IoBuf::zeroed(len as usize), flags)
                .await;
        }
        if offset < whole_first * BLOCK_SIZE {
            let head = whole_first * BLOCK_SIZE - offset;
            self.do_write(offset, IoBuf::zeroed(head as usize), flags)
                .await?;
        }
        if end > whole_end * BLOCK_SIZE {
            let tail = end - whole_end * BLOCK_SIZE;
            self.do_write(whole_end * BLOCK_SIZE, IoBuf::zeroed(tail as usize), flags)
                .await?;
        }
        let _shared = self.rmw.read().await;
        let mut at = whole_first;
        while at < whole_end {
            if allocate {
                let n = (whole_end - at).min(ZERO_WRITE_CHUNK / BLOCK_SIZE);
                let zeros = IoBuf::zeroed((n * BLOCK_SIZE) as usize);
                self.store
                    .write(self.id, at, zeros, fua)
                    .await
                    .map_err(block_error)?;
                at += n;
            } else {
                let n = (whole_end - at).min(ZERO_CHUNK / BLOCK_SIZE);
                self.store
                    .zero(self.id, at, n, fua)
                    .await
                    .map_err(block_error)?;
                at += n;
            }
        }
        Ok(())
    }

    async fn do_trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let size = self.current_size()?;
        check_range(offset, len, size)?;
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        if end <= first {
            return Ok(());
        }
        let _shared = self.rmw.read().await;
        let mut at = first;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK / BLOCK_SIZE);
            self.store
                .zero(self.id, at, n, false)
                .await
                .map_err(block_error)?;
            at += n;
        }
        Ok(())
    }

    async fn do_block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocationExtent>, BlockError> {
        let size = self.current_size()?;
        check_range(offset, len, size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        // Describe at most 64 MiB per answer: clients ask again for the rest.
        let len = len.min(64 << 20);
        let first = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        let runs = self
            .store
            .allocation(self.id, first, end - first)
            .await
            .map_err(block_error)?;
        let mut out = Vec::with_capacity(runs.len());
        let mut at = first * BLOCK_SIZE;
        let stop = (end * BLOCK_SIZE).min(size);
        for (blocks, data) in runs {
            let run_end = (at + blocks * BLOCK_SIZE).min(stop);
            let start = at.max(offset);
            if run_end > start {
                out.push(AllocationExtent {
                    length: run_end - start,
                    hole: !data,
                    zero: !data,
                });
            }
            at += blocks * BLOCK_SIZE;
        }
        Ok(out)
    }
}

impl BlockBackend for Vdisk {
    fn size(&self) -> u64 {
        self.store.vdisk_size(self.id).unwrap_or(0)
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
        Box::pin(async move { self.store.flush().await.map_err(block_error) })
    }

    fn trim(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.do_trim(offset, len))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        flags: WriteFlags,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.do_zero(offset, len, allocate, flags.fua))
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<AllocationExtent>, BlockError>> {
        Box::pin(self.do_block_status(offset, len))
    }
}

/// Every vdisk of a store as an export, one shared controller per vdisk (so
/// all connections to a vdisk share its read-modify-write lock).
#[derive(Clone)]
pub struct VdiskRegistry {
    store: Store,
    open: Arc<Mutex<HashMap<u64, Arc<Vdisk>>>>,
}

impl VdiskRegistry {
    /// A registry over `store`.
    pub fn new(store: Store) -> VdiskRegistry {
        VdiskRegistry {
            store,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The controller of vdisk `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<Vdisk>> {
        let id = self.store.vdisk_id(name)?;
        let mut open = self.open.lock();
        let vdisk = open
            .entry(id)
            .or_insert_with(|| Arc::new(Vdisk::new(self.store.clone(), id, name.to_string())));
        Some(vdisk.clone())
    }

    /// The controller of the vdisk with id `id`, if it exists.
    pub fn get_by_id(&self, id: u64) -> Option<Arc<Vdisk>> {
        if let Some(vdisk) = self.open.lock().get(&id)
            && self.store.vdisk_size(id).is_some()
        {
            return Some(vdisk.clone());
        }
        let info = self.store.list_vdisks().into_iter().find(|v| v.id == id)?;
        let mut open = self.open.lock();
        let vdisk = open
            .entry(id)
            .or_insert_with(|| Arc::new(Vdisk::new(self.store.clone(), id, info.name)));
        Some(vdisk.clone())
    }

    /// Forgets the controller of a deleted vdisk.
    pub fn forget(&self, id: u64) {
        self.open.lock().remove(&id);
    }
}

impl ExportRegistry for VdiskRegistry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        self.get(name).map(|v| v as Arc<dyn BlockBackend>)
    }

    fn list(&self) -> Vec<(String, String)> {
        self.store
            .list_vdisks()
            .into_iter()
            .map(|v| {
                (
                    v.name,
                    format!("Basalt vdisk, {}", basalt_core::size::format_size(v.size)),
                )
            })
            .collect()
    }
}

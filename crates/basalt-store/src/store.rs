//! The store: vdisks on the node's disks, at block granularity.
//!
//! Write path: a write is split at extent boundaries. A piece that covers a
//! whole extent is written copy-on-write to a fresh slot (its data only: the
//! drainer writes the slot's metadata later) and switched in by a `Remap`
//! record carrying the blocks' crcs. A piece that starts or continues an
//! extent's rewrite in parts goes copy-on-write into the rewrite's shadow
//! slot beside a `Shadow` record (see [`Shadow`]). Any other piece becomes a
//! `Write` record in the next oplog batch of its extent's disk, and its data
//! joins the overlay. The write completes when its batch is on disk.
//!
//! Read path: overlay first, then the slot, verifying every block's crc32c.
//!
//! Background: one log writer per disk (group commit, one batch write
//! outstanding)
//! and one drainer that writes overlay blocks home, syncs, and checkpoints
//! the extent map and the log tail to the catalog.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_core::{BlockError, IoBuf, WriteSource, gather_source};
use basalt_disk::{DiskEngine, DiskError, EngineChoice, Segment, open_disk};
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{Notify, oneshot, watch};
use uuid::Uuid;

use crate::catalog::{Catalog, Checkpoint, DiskRecord, ExtentRow, VdiskRecord};
use crate::format::BlockEntry;
use crate::format::{
    BLOCK_BYTES, EXTENT_BLOCKS, ExtentMeta, Label, MetaChoice, Record, RecordKind, SLOT_BYTES,
    SLOT_META_BYTES, block_crcs,
};
use crate::state::{
    Content, DiskState, ExtentKey, ExtentState, Landing, LogState, MISSING_DISK, OverlayEntry,
    Shadow, State, VdiskState, overlay_data_bytes, overlay_insert,
};
use crate::{StoreError, log};

/// How many generations / allocation ids a checkpoint reserves ahead.
const RESERVE_AHEAD: u64 = 1 << 24;
/// Default size of the disk created when none is given.
pub const DEFAULT_DISK_BYTES: u64 = 16 << 30;

/// A disk to open: a path, created sparse at `size` when missing.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// File or block device.
    pub path: PathBuf,
    /// Size for creating a missing file.
    pub size: Option<u64>,
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Where the catalog (and default disk) live.
    pub data_dir: PathBuf,
    /// Disks to use; empty means the catalog's disks, or a default file disk.
    pub disks: Vec<DiskSpec>,
    /// Engine selection.
    pub engine: EngineChoice,
    /// Claim disks labelled for another node (destroys their contents).
    pub force_claim: bool,
    /// Bytes of written-but-not-drained data held in memory before writers wait.
    pub memory_budget: u64,
    /// Size of the default disk.
    pub default_disk_bytes: u64,
    /// The drainer runs at least this often.
    pub drain_interval: Duration,
    /// A checkpoint is asked for whenever this many more slots, replaced by
    /// copy-on-write writes, wait for one to come free (at most an eighth
    /// of a disk's slots: a small disk does not run out of free slots
    /// meanwhile). It bounds the space a stream of whole-extent writes
    /// occupies beyond the data, and keeps such writes on slots written
    /// before instead of never-used ones (on a file disk the first write to
    /// a slot costs an allocation). Each checkpoint costs a drain cycle, two
    /// syncs and a catalog commit: 2048 (2 GiB) asks for one per second of
    /// a 2 GB/s sequential writer instead of eight (see
    /// `docs/benchmarks.md`, 2026-11-28).
    pub checkpoint_replaced_slots: usize,
}

impl StoreConfig {
    /// A configuration with defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            data_dir: data_dir.into(),
            disks: Vec::new(),
            engine: EngineChoice::Auto,
            force_claim: false,
            memory_budget: 128 << 20,
            default_disk_bytes: DEFAULT_DISK_BYTES,
            drain_interval: Duration::from_secs(2),
            checkpoint_replaced_slots: 2048,
        }
    }
}

/// A disk already opened by the caller (tests hand in simulated engines).
pub struct OpenedDisk {
    /// Name shown in listings.
    pub path: PathBuf,
    /// The engine.
    pub engine: Arc<dyn DiskEngine>,
}

/// A vdisk as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiskInfo {
    /// Numeric id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Creation time (unix seconds).
    pub created: u64,
    /// Bytes of disk space allocated to it (whole extents).
    pub allocated: u64,
}

/// A disk as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Disk id.
    pub id: Uuid,
    /// Path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Engine in use.
    pub engine: String,
    /// `online`, `failed` or `missing`.
    pub state: String,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Slots (extent homes) in total.
    pub slots_total: u64,
    /// Slots free.
    pub slots_free: u64,
    /// Oplog bytes in total.
    pub log_bytes: u64,
    /// Oplog bytes in use.
    pub log_used: u64,
}

/// Counters of the store.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Block reads served.
    pub reads: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Writes served.
    pub writes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Full-extent writes done copy-on-write.
    pub cow_writes: AtomicU64,
    /// Flushes served.
    pub flushes: AtomicU64,
    /// Blocks that failed their checksum.
    pub checksum_errors: AtomicU64,
    /// Oplog batches written.
    pub log_batches: AtomicU64,
    /// Drain cycles completed.
    pub drains: AtomicU64,
    /// Blocks written home by the drainer.
    pub drained_blocks: AtomicU64,
}

pub(crate) struct Inner {
    pub state: Mutex<State>,
    pub catalog: Catalog,
    pub node_id: Uuid,
    pub config: StoreConfig,
    pub stats: StoreStats,
    /// Wakes the log writer of each disk.
    pub log_wake: Vec<Notify>,
    /// Wakes the drainer.
    pub drain_wake: Notify,
    /// Signalled whenever the drainer frees memory or log space.
    pub progress: Notify,
    pub tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The node's local store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Splits `[first, first + blocks)` into per-extent pieces:
/// (extent, first block in extent, block count, offset in blocks from `first`).
fn pieces(first: u64, blocks: u64) -> Vec<(u64, u16, u16, u64)> {
    let mut out = Vec::new();
    let mut at = first;
    let end = first + blocks;
    while at < end {
        let extent = at / EXTENT_BLOCKS;
        let in_extent = at % EXTENT_BLOCKS;
        let n = (EXTENT_BLOCKS - in_extent).min(end - at);
        out.push((extent, in_extent as u16, n as u16, at - first));
        at += n;
    }
    out
}

impl Store {
    /// Opens the store described by `config`: opens (creating when needed)
    /// and claims the disks, replays their oplogs, and starts the background
    /// tasks. Must run inside a tokio runtime.
    pub async fn open(config: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| {
            StoreError::Disk(DiskError::Open {
                path: config.data_dir.clone(),
                source,
            })
        })?;
        let catalog_path = config.data_dir.join("meta.redb");
        let catalog = tokio::task::spawn_blocking(move || Catalog::open(&catalog_path))
            .await
            .map_err(|e| StoreError::Catalog(Box::new(e)))??;
        let snapshot = catalog.load()?;
        let mut specs = config.disks.clone();
        if specs.is_empty() {
            specs = snapshot
                .disks
                .iter()
                .map(|d| DiskSpec {
                    path: PathBuf::from(&d.path),
                    size: None,
                })
                .collect();
        }
        if specs.is_empty() {
            specs.push(DiskSpec {
                path: config.data_dir.join("disks").join("disk0.img"),
                size: Some(config.default_disk_bytes),
            });
        }
        let known_paths: Vec<PathBuf> = snapshot
            .disks
            .iter()
            .map(|d| PathBuf::from(&d.path))
            .collect();
        let mut opened = Vec::new();
        for spec in &specs {
            if !spec.path.exists() && known_paths.contains(&spec.path) {
                // Never create a fresh disk where one of ours should be (a
                // mount that is not up yet, a replaced device): the node
                // starts degraded and reports the disk missing.
                tracing::error!(path = %spec.path.display(), "a disk of this node is missing; its data is unavailable");
                continue;
            }
            let path = spec.path.clone();
            let size = spec.size;
            let engine = config.engine;
            let file = tokio::task::spawn_blocking(move || open_disk(&path, size, engine))
                .await
                .map_err(|e| StoreError::Catalog(Box::new(e)))??;
            if let Some(size) = spec.size
                && !file.created
                && file.size != size & !4095
            {
                tracing::warn!(
                    path = %spec.path.display(),
                    existing = file.size,
                    requested = size,
                    "disk exists with another size; using its current size"
                );
            }
            opened.push(OpenedDisk {
                path: file.path,
                engine: file.engine,
            });
        }
        Store::open_with_disks(config, catalog, opened).await
    }

    /// Opens a store on disks the caller already opened (simulated disks in tests).
    pub async fn open_with_engines(
        config: StoreConfig,
        disks: Vec<OpenedDisk>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| {
            StoreError::Disk(DiskError::Open {
                path: config.data_dir.clone(),
                source,
            })
        })?;
        let catalog = Catalog::open(&config.data_dir.join("meta.redb"))?;
        Store::open_with_disks(config, catalog, disks).await
    }

    async fn open_with_disks(
        config: StoreConfig,
        catalog: Catalog,
        opened: Vec<OpenedDisk>,
    ) -> Result<Store, StoreError> {
        let snapshot = catalog.load()?;
        let node_id = snapshot.node.node_id;
        let known: HashMap<Uuid, DiskRecord> =
            snapshot.disks.iter().map(|d| (d.id, d.clone())).collect();

        // Claim each disk: read its label, format it if blank.
        let mut disks = Vec::new();
        let mut tails = Vec::new();
        for disk in opened {
            let (label, record) =
                claim_disk(&catalog, node_id, &disk, &known, config.force_claim).await?;
            if disks.iter().any(|d: &DiskState| d.id == label.disk_id) {
                return Err(StoreError::BadDisk {
                    path: disk.path.clone(),
                    reason: "the same disk is given twice".into(),
                });
            }
            tails.push((record.tail_pos, record.tail_lsn, record.clean));
            let ring_start = label.log_offset;
            let ring_end = label.log_offset + label.log_bytes;
            disks.push(DiskState {
                id: label.disk_id,
                path: disk.path,
                free: (0..label.slot_count).collect(),
                reserved: 0..0,
                reserving: false,
                reuse: Vec::new(),

                quarantine: Vec::new(),
                log: LogState {
                    ring_start,
                    ring_end,
                    head_pos: record.tail_pos,
                    batches: VecDeque::new(),
                    completed_lsn: record.tail_lsn.saturating_sub(1),
                    durable_lsn: record.tail_lsn.saturating_sub(1),
                    pending: VecDeque::new(),
                    writing: VecDeque::new(),
                    max_batch_bytes: (16 << 20).min(label.log_bytes / 4),
                    next_lsn: record.tail_lsn,
                },
                label,
                engine: disk.engine,
                undrained_bytes: 0,
                map_changes: Vec::new(),
                retired: Vec::new(),
                failed: None,
                shadows: HashMap::new(),
                shadow_spans: Vec::new(),
            });
        }

        let mut state = State {
            disks,
            missing_disks: HashMap::new(),
            extents: HashMap::new(),
            vdisks: HashMap::new(),
            names: HashMap::new(),
            alloc_next: snapshot.node.alloc_reserved,
            alloc_reserved: snapshot.node.alloc_reserved,
            shutting_down: false,
        };
        for d in &snapshot.disks {
            if !state.disks.iter().any(|s| s.id == d.id) {
                tracing::warn!(disk = %d.id, path = %d.path, "disk known to this node is missing; its data is unavailable");
                state.missing_disks.insert(d.id, d.path.clone());
            }
        }
        for v in snapshot.vdisks {
            state.names.insert(v.name.clone(), v.id);
            let next_gen = v.gen_reserved;
            state.vdisks.insert(
                v.id,
                VdiskState {
                    record: v,
                    next_gen,
                },
            );
        }
        let disk_index: HashMap<Uuid, usize> = state
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id, i))
            .collect();
        for (key, row) in snapshot.extents {
            if !state.vdisks.contains_key(&key.0) {
                continue;
            }
            let disk = match disk_index.get(&row.disk) {
                Some(&i) => {
                    state.disks[i].free.remove(&row.slot);
                    i
                }
                None => MISSING_DISK,
            };
            state.extents.insert(
                key,
                ExtentState {
                    disk,
                    slot: row.slot,
                    alloc_id: row.alloc_id,
                    persisted: row.persisted,
                    meta: None,
                    overlay: BTreeMap::new(),
                    landing: None,
                    meta_unsaved: None,
                },
            );
        }

        // Replay every disk's oplog into the in-memory state.
        for (index, (tail_pos, tail_lsn, clean)) in tails.into_iter().enumerate() {
            if let Err(error) = log::replay_disk(&mut state, index, tail_pos, tail_lsn, clean).await
            {
                match error {
                    StoreError::LogCorrupt { .. } => {
                        tracing::error!(%error, "disk marked failed");
                        state.disks[index].failed = Some(error.to_string());
                    }
                    other => return Err(other),
                }
            }
        }

        let disk_count = state.disks.len();
        let store = Store {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                catalog,
                node_id,
                config,
                stats: StoreStats::default(),
                log_wake: (0..disk_count).map(|_| Notify::new()).collect(),
                drain_wake: Notify::new(),
                progress: Notify::new(),
                tasks: Mutex::new(Vec::new()),
            }),
        };

        // Recovery: write everything replayed home and checkpoint before serving,
        // which also reserves fresh generation and allocation ranges.
        for index in 0..disk_count {
            store.drain_disk(index, false).await?;
        }
        store.reserve_ahead().await?;

        let mut tasks = Vec::new();
        for index in 0..disk_count {
            let s = store.clone();
            tasks.push(tokio::spawn(async move { s.log_writer(index).await }));
        }
        let s = store.clone();
        tasks.push(tokio::spawn(async move { s.drainer().await }));
        store.inner.tasks.lock().extend(tasks);
        Ok(store)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock()
    }

    /// This node's id.
    pub fn node_id(&self) -> Uuid {
        self.inner.node_id
    }

    /// Counters.
    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    // ------------------------------------------------------------------
    // Vdisk management
    // ------------------------------------------------------------------

    /// Bytes of vdisk address space the disks can hold.
    pub fn capacity(&self) -> u64 {
        let st = self.lock();
        st.disks
            .iter()
            .filter(|d| d.failed.is_none())
            .map(|d| d.label.slot_count * crate::format::EXTENT_BYTES)
            .sum()
    }

    /// Creates a thin-provisioned vdisk with a fresh id.
    pub async fn create_vdisk(&self, name: &str, size: u64) -> Result<VdiskInfo, StoreError> {
        self.create_vdisk_as(None, name, size).await
    }

    /// Creates a thin-provisioned vdisk under an id the cluster assigned
    /// (the same id on every node holding a replica).
    pub async fn create_vdisk_with_id(
        &self,
        id: u64,
        name: &str,
        size: u64,
    ) -> Result<VdiskInfo, StoreError> {
        self.create_vdisk_as(Some(id), name, size).await
    }

    async fn create_vdisk_as(
        &self,
        id: Option<u64>,
        name: &str,
        size: u64,
    ) -> Result<VdiskInfo, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadName(name.to_string()));
        }
        self.check_size(size)?;
        if self.lock().names.contains_key(name) {
            return Err(StoreError::VdiskExists(name.to_string()));
        }
        let store = self.clone();
        let name_owned = name.to_string();
        let record = tokio::task::spawn_blocking(move || {
            store
                .inner
                .catalog
                .create_vdisk(id, &name_owned, size, now_secs())
        })
        .await
        .map_err(|e| StoreError::Catalog(Box::new(e)))??;
        let mut st = self.lock();
        st.names.insert(record.name.clone(), record.id);
        let next_gen = 1;
        let info = vdisk_info(&st, &record);
        st.vdisks.insert(record.id, VdiskState { record, next_gen });
        drop(st);
        // Give the new vdisk a generation range right away.
        self.inner.drain_wake.notify_one();
        Ok(info)
    }

    /// Checks a new vdisk's name and size as [`Store::create_vdisk`] would,
    /// without creating anything (the cluster creates it).
    pub fn validate_vdisk(&self, name: &str, size: u64) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadName(name.to_string()));
        }
        self.check_size(size)
    }

    /// Checks a vdisk size against the rules and this node's capacity.
    pub fn check_vdisk_size(&self, size: u64) -> Result<(), StoreError> {
        self.check_size(size)
    }

    fn check_size(&self, size: u64) -> Result<(), StoreError> {
        if size == 0 {
            return Err(StoreError::BadSize("a vdisk needs a size above 0".into()));
        }
        if !size.is_multiple_of(BLOCK_BYTES) {
            return Err(StoreError::BadSize(format!(
                "{size} bytes is not a multiple of 4 KiB"
            )));
        }
        let capacity = self.capacity();
        if size > capacity {
            return Err(StoreError::BadSize(format!(
                "{} exceeds the node's capacity of {}",
                basalt_core::size::format_size(size),
                basalt_core::size::format_size(capacity)
            )));
        }
        Ok(())
    }

    /// Grows a vdisk (shrinking is refused).
    pub async fn resize_vdisk(&self, name: &str, size: u64) -> Result<VdiskInfo, StoreError> {
        let mut record = self.vdisk_record(name)?;
        self.check_size(size)?;
        if size < record.size {
            return Err(StoreError::BadSize(format!(
                "cannot shrink {name} from {} to {}; vdisks only grow",
                record.size, size
            )));
        }
        record.size = size;
        let store = self.clone();
        let to_store = record.clone();
        tokio::task::spawn_blocking(move || store.inner.catalog.put_vdisk(&to_store))
            .await
            .map_err(|e| StoreError::Catalog(Box::new(e)))??;
        let mut st = self.lock();
        if let Some(v) = st.vdisks.get_mut(&record.id) {
            v.record.size = size;
        }
        Ok(vdisk_info(&st, &record))
    }

    /// Deletes a vdisk and frees its space.
    pub async fn delete_vdisk(&self, name: &str) -> Result<(), StoreError> {
        let record = self.vdisk_record(name)?;
        let store = self.clone();
        let id = record.id;
        tokio::task::spawn_blocking(move || store.inner.catalog.delete_vdisk(id))
            .await
            .map_err(|e| StoreError::Catalog(Box::new(e)))??;
        let mut st = self.lock();
        st.names.remove(&record.name);
        st.vdisks.remove(&id);
        let keys: Vec<ExtentKey> = st.extents.keys().filter(|k| k.0 == id).copied().collect();
        for key in keys {
            let Some(disk) = st.extents.get(&key).map(|e| e.disk) else {
                continue;
            };
            let lsn = match st.disks.get(disk) {
                Some(d) => d.log.pending.back().map_or(d.log.next_lsn, |b| b.lsn),
                None => 0,
            };
            st.release_extent(key, lsn);
        }
        drop(st);
        self.inner.progress.notify_waiters();
        Ok(())
    }

    fn vdisk_record(&self, name: &str) -> Result<VdiskRecord, StoreError> {
        let st = self.lock();
        st.names
            .get(name)
            .and_then(|id| st.vdisks.get(id))
            .map(|v| v.record.clone())
            .ok_or_else(|| StoreError::NoSuchVdisk(name.to_string()))
    }

    /// Looks a vdisk up by name.
    pub fn vdisk(&self, name: &str) -> Result<VdiskInfo, StoreError> {
        let record = self.vdisk_record(name)?;
        Ok(vdisk_info(&self.lock(), &record))
    }

    /// Size of a vdisk by id, if it exists.
    pub fn vdisk_size(&self, id: u64) -> Option<u64> {
        self.lock().vdisks.get(&id).map(|v| v.record.size)
    }

    /// All vdisks, by name.
    pub fn list_vdisks(&self) -> Vec<VdiskInfo> {
        let st = self.lock();
        let mut out: Vec<VdiskInfo> = st
            .vdisks
            .values()
            .map(|v| vdisk_info(&st, &v.record))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// All disks.
    pub fn list_disks(&self) -> Vec<DiskInfo> {
        let st = self.lock();
        let mut out: Vec<DiskInfo> = st
            .disks
            .iter()
            .map(|d| DiskInfo {
                id: d.id,
                path: d.path.display().to_string(),
                size: d.label.disk_bytes,
                engine: d.engine.kind().to_string(),
                state: if d.failed.is_some() {
                    "failed"
                } else {
                    "online"
                }
                .into(),
                error: d.failed.clone(),
                slots_total: d.label.slot_count,
                slots_free: (d.free_slots() + d.quarantine.len()) as u64,
                log_bytes: d.label.log_bytes,
                log_used: d.log.used_bytes(),
            })
            .collect();
        for (id, path) in &st.missing_disks {
            out.push(DiskInfo {
                id: *id,
                path: path.clone(),
                size: 0,
                engine: "-".into(),
                state: "missing".into(),
                error: Some("the disk was not found at startup".into()),
                slots_total: 0,
                slots_free: 0,
                log_bytes: 0,
                log_used: 0,
            });
        }
        out
    }

    // ------------------------------------------------------------------
    // I/O
    // ------------------------------------------------------------------

    fn check_io(st: &State, vdisk: u64, first: u64, blocks: u64) -> Result<(), StoreError> {
        let Some(v) = st.vdisks.get(&vdisk) else {
            return Err(StoreError::NoSuchVdisk(format!("#{vdisk}")));
        };
        if st.shutting_down {
            return Err(StoreError::ShuttingDown);
        }
        let size_blocks = v.record.size / BLOCK_BYTES;
        if first
            .checked_add(blocks)
            .is_none_or(|end| end > size_blocks)
        {
            return Err(StoreError::OutOfRange {
                vdisk,
                first,
                blocks,
                size_blocks,
            });
        }
        Ok(())
    }

    fn disk_usable(st: &State, disk: usize) -> Result<(), StoreError> {
        Store::disk_usable_ref(&st.disks, disk)
    }

    /// Waits while too much written data is waiting to be drained.
    async fn admit(&self) -> Result<(), StoreError> {
        loop {
            let notified = self.inner.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.shutting_down {
                    return Err(StoreError::ShuttingDown);
                }
                if st.undrained_total() <= self.inner.config.memory_budget {
                    return Ok(());
                }
            }
            self.inner.drain_wake.notify_one();
            notified.await;
        }
    }

    /// Reads `blocks` blocks from block `first` of vdisk `vdisk`.
    pub async fn read(&self, vdisk: u64, first: u64, blocks: u64) -> Result<IoBuf, StoreError> {
        {
            let st = self.lock();
            Store::check_io(&st, vdisk, first, blocks)?;
        }
        self.inner.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.inner
            .stats
            .read_bytes
            .fetch_add(blocks * BLOCK_BYTES, Ordering::Relaxed);
        let parts = pieces(first, blocks);
        if parts.len() == 1 {
            let (extent, start, n, _) = parts[0];
            return self.read_piece(vdisk, extent, start, n).await;
        }
        let reads = parts
            .iter()
            .map(|&(extent, start, n, _)| self.read_piece(vdisk, extent, start, n));
        let results = futures::future::try_join_all(reads).await?;
        // The pieces cover the whole range: nothing to clear first.
        let mut out = IoBuf::for_overwrite((blocks * BLOCK_BYTES) as usize);
        for ((_, _, _, at), piece) in parts.iter().zip(results) {
            let at = (*at * BLOCK_BYTES) as usize;
            out.as_mut_slice()[at..at + piece.len()].copy_from_slice(piece.as_slice());
        }
        Ok(out)
    }

    async fn read_piece(
        &self,
        vdisk: u64,
        extent: u64,
        start: u16,
        n: u16,
    ) -> Result<IoBuf, StoreError> {
        let key = (vdisk, extent);
        let len = usize::from(n) * BLOCK_BYTES as usize;
        let mut last_failure = 0u64;
        // Re-plans after a metadata load or a block that moved under the
        // read; waiting for a copy-on-write to land is not counted.
        let mut retries = 0u32;
        while retries < 8 {
            // Plan under the lock: copy overlay blocks, list the blocks to fetch.
            let planned = 'plan: {
                let st = self.lock();
                Store::check_io(
                    &st,
                    vdisk,
                    extent * EXTENT_BLOCKS + u64::from(start),
                    u64::from(n),
                )?;
                let Some(e) = st.extents.get(&key) else {
                    return Ok(IoBuf::zeroed(len));
                };
                Store::disk_usable(&st, e.disk)?;
                if let Some(landing) = &e.landing {
                    match *landing.borrow() {
                        Landing::Landed => {}
                        Landing::InFlight => break 'plan Err(Unready::Landing(landing.clone())),
                        Landing::Failed => return Err(cow_data_failed(&st, e.disk)),
                    }
                }
                let Some(meta) = e.meta.as_ref() else {
                    break 'plan Err(Unready::Meta(e.disk, e.slot, e.alloc_id));
                };
                // Overlay blocks with data, by their byte offset in the
                // result; copied out of their (immutable, shared) buffers
                // after the lock is released.
                let mut from_overlay: Vec<(usize, Segment)> = Vec::new();
                // Runs of consecutive blocks to read from the slot: (first, count).
                let mut runs: Vec<(u16, u16)> = Vec::new();
                let mut fingerprint = Vec::new();
                for b in start..start + n {
                    let i = usize::from(b - start) * BLOCK_BYTES as usize;
                    if let Some(entry) = e.overlay.get(&b) {
                        if let Content::Data { seg, .. } = &entry.content {
                            from_overlay.push((i, seg.clone()));
                        }
                        continue;
                    }
                    let m = meta.entries[usize::from(b)];
                    if m.lost {
                        self.inner
                            .stats
                            .checksum_errors
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(StoreError::Checksum {
                            vdisk,
                            block: extent * EXTENT_BLOCKS + u64::from(b),
                        });
                    }
                    if !m.has_data {
                        continue;
                    }
                    fingerprint.push((b, m.crc, m.generation));
                    match runs.last_mut() {
                        Some((f, c)) if *f + *c == b => *c += 1,
                        _ => runs.push((b, 1)),
                    }
                }
                let d = &st.disks[e.disk];
                Ok((
                    from_overlay,
                    runs,
                    d.engine.clone(),
                    d.slot_offset(e.slot) + SLOT_META_BYTES,
                    (e.alloc_id, fingerprint),
                ))
            };
            let (from_overlay, runs, engine, base, fingerprint) = match planned {
                Ok(plan) => plan,
                Err(Unready::Meta(disk, slot, alloc)) => {
                    self.load_meta(key, disk, slot, alloc).await?;
                    retries += 1;
                    continue;
                }
                Err(Unready::Landing(mut landing)) => {
                    if landing.wait_for(|l| *l != Landing::InFlight).await.is_err() {
                        // The writing task is gone (the runtime is shutting down).
                        return Err(StoreError::ShuttingDown);
                    }
                    continue;
                }
            };
            // The result, for a read not served by one fetch alone: blocks
            // neither in the overlay nor fetched read as zeros.
            let assemble = |fetched: Vec<(u16, IoBuf)>| {
                let mut out = IoBuf::zeroed(len);
                for (at, seg) in &from_overlay {
                    out.as_mut_slice()[*at..*at + seg.len].copy_from_slice(seg.as_slice());
                }
                for (f, buf) in fetched {
                    let at = usize::from(f - start) * BLOCK_BYTES as usize;
                    out.as_mut_slice()[at..at + buf.len()].copy_from_slice(buf.as_slice());
                }
                out
            };
            if runs.is_empty() {
                return Ok(assemble(Vec::new()));
            }
            // Fetch and verify.
            let whole = runs.len() == 1 && runs[0] == (start, n);
            let fetches = runs.iter().map(|&(f, c)| {
                let engine = engine.clone();
                async move {
                    // The engine fills it whole or fails.
                    let buf = IoBuf::for_overwrite(usize::from(c) * BLOCK_BYTES as usize);
                    let (buf, result) =
                        engine.read_at(base + u64::from(f) * BLOCK_BYTES, buf).await;
                    result.map(|_| (f, buf))
                }
            });
            let fetched = match futures::future::try_join_all(fetches).await {
                Ok(f) => f,
                Err(e) => return Err(StoreError::Disk(e)),
            };
            // The runs were planned from the fingerprint, block by block in
            // order, so the fetched blocks pair with its entries in order (no
            // lookup per block); a block that does not pair counts as bad.
            let mut expected = fingerprint.1.iter();
            let bad = fetched
                .iter()
                .flat_map(|(f, buf)| {
                    block_crcs(buf.as_slice())
                        .into_iter()
                        .enumerate()
                        .map(move |(i, got)| (f + i as u16, got))
                })
                .find_map(|(b, got)| match expected.next() {
                    Some(&(planned, crc, _)) if planned == b => (got != crc).then_some(b),
                    _ => Some(b),
                });
            match bad {
                None => {
                    let mut fetched = fetched;
                    if whole
                        && fetched.len() == 1
                        && let Some((_, buf)) = fetched.pop()
                    {
                        return Ok(buf);
                    }
                    return Ok(assemble(fetched));
                }
                Some(b) => {
                    // A drain or remap may have moved the block under us: retry if
                    // what we expected changed, else it is real corruption.
                    last_failure = extent * EXTENT_BLOCKS + u64::from(b);
                    let st = self.lock();
                    let changed = match st.extents.get(&key) {
                        None => true,
                        Some(e) => {
                            e.alloc_id != fingerprint.0
                                || e.overlay.contains_key(&b)
                                || e.meta.as_ref().is_none_or(|m| {
                                    let now = m.entries[usize::from(b)];
                                    !fingerprint.1.iter().any(|&(fb, crc, g)| {
                                        fb == b
                                            && crc == now.crc
                                            && g == now.generation
                                            && now.has_data
                                    })
                                })
                        }
                    };
                    if changed {
                        retries += 1;
                        continue;
                    }
                    break;
                }
            }
        }
        self.inner
            .stats
            .checksum_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            vdisk,
            block = last_failure,
            "checksum mismatch: returning an I/O error"
        );
        Err(StoreError::Checksum {
            vdisk,
            block: last_failure,
        })
    }

    /// Loads the persisted metadata of an extent from its slot.
    pub(crate) async fn load_meta(
        &self,
        key: ExtentKey,
        disk: usize,
        slot: u64,
        alloc: u64,
    ) -> Result<(), StoreError> {
        let (engine, offset) = {
            let st = self.lock();
            Store::disk_usable(&st, disk)?;
            let d = &st.disks[disk];
            (d.engine.clone(), d.slot_offset(slot))
        };
        let choice = crate::log::read_slot_meta(&engine, offset, key, alloc).await?;
        let mut st = self.lock();
        let stats = &self.inner.stats;
        if let Some(e) = st.tenancy_mut(disk, key, alloc)
            && e.meta.is_none()
        {
            let meta = match choice {
                MetaChoice::Valid(m) => m,
                // Metadata never durably written for this tenancy: a torn
                // first write is as good as none (the oplog still holds
                // everything it was to describe).
                MetaChoice::Fresh | MetaChoice::Damaged if !e.persisted => {
                    ExtentMeta::empty(key.0, key.1, alloc)
                }
                MetaChoice::Fresh | MetaChoice::Damaged => {
                    tracing::error!(
                        vdisk = key.0,
                        extent = key.1,
                        "extent metadata is damaged on disk; its blocks fail reads until rewritten"
                    );
                    stats.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    ExtentMeta::lost(key.0, key.1, alloc)
                }
            };
            e.meta = Some(Box::new(meta));
        }
        Ok(())
    }

    /// Writes `data` (a whole number of blocks) at block `first`.
    pub async fn write(
        &self,
        vdisk: u64,
        first: u64,
        data: IoBuf,
        fua: bool,
    ) -> Result<(), StoreError> {
        if !(data.len() as u64).is_multiple_of(BLOCK_BYTES) || data.is_empty() {
            return Err(StoreError::BadSize(format!(
                "write of {} bytes is not whole blocks",
                data.len()
            )));
        }
        let blocks = data.len() as u64 / BLOCK_BYTES;
        self.begin_write(vdisk, first, blocks).await?;
        self.write_admitted(vdisk, first, blocks, Arc::new(data), fua)
            .await
    }

    /// Writes `blocks` blocks at block `first`, copying them from `source`
    /// as they are needed. A write of exactly one whole extent goes
    /// copy-on-write in pieces: each piece is sent to the disk as soon as
    /// it is copied, while the next is being copied. So does a part of an
    /// extent's rewrite in parts (see [`Store::write_shadow`]). Any other
    /// write (or one that finds no free slot) copies everything first, as
    /// [`Store::write`].
    pub async fn write_from(
        &self,
        vdisk: u64,
        first: u64,
        blocks: u64,
        source: &mut dyn WriteSource,
        fua: bool,
    ) -> Result<(), StoreError> {
        let bytes = blocks
            .checked_mul(BLOCK_BYTES)
            .and_then(|b| usize::try_from(b).ok())
            .filter(|&b| b > 0)
            .ok_or_else(|| StoreError::BadSize(format!("write of {blocks} blocks")))?;
        self.begin_write(vdisk, first, blocks).await?;
        if blocks == EXTENT_BLOCKS
            && first.is_multiple_of(EXTENT_BLOCKS)
            && let Some(result) = self
                .write_cow((vdisk, first / EXTENT_BLOCKS), CowData::Source(source), fua)
                .await
        {
            return result;
        }
        // A part of an extent's rewrite in parts streams the same way.
        let (extent, start) = (first / EXTENT_BLOCKS, first % EXTENT_BLOCKS);
        if start + blocks <= EXTENT_BLOCKS
            && blocks < EXTENT_BLOCKS
            && let Some(result) = self
                .write_shadow(
                    (vdisk, extent),
                    start as u16,
                    blocks as u16,
                    CowData::Source(source),
                    fua,
                )
                .await
        {
            return result;
        }
        let data = gather_source(source, bytes).map_err(StoreError::Source)?;
        self.write_admitted(vdisk, first, blocks, Arc::new(data), fua)
            .await
    }

    /// Checks a write's range, waits for admission and counts it.
    async fn begin_write(&self, vdisk: u64, first: u64, blocks: u64) -> Result<(), StoreError> {
        {
            let st = self.lock();
            Store::check_io(&st, vdisk, first, blocks)?;
        }
        self.admit().await?;
        self.inner.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.inner
            .stats
            .write_bytes
            .fetch_add(blocks * BLOCK_BYTES, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `buf` (`blocks` blocks) at block `first` once admitted.
    async fn write_admitted(
        &self,
        vdisk: u64,
        first: u64,
        blocks: u64,
        buf: Arc<IoBuf>,
        fua: bool,
    ) -> Result<(), StoreError> {
        let parts = pieces(first, blocks);
        if parts.len() == 1 {
            let (extent, start, n, _) = parts[0];
            return self
                .write_piece(vdisk, extent, start, n, &buf, 0, fua)
                .await;
        }
        let writes = parts.iter().map(|&(extent, start, n, at)| {
            self.write_piece(vdisk, extent, start, n, &buf, at as usize, fua)
        });
        futures::future::try_join_all(writes).await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_piece(
        &self,
        vdisk: u64,
        extent: u64,
        start: u16,
        n: u16,
        buf: &Arc<IoBuf>,
        buf_block: usize,
        fua: bool,
    ) -> Result<(), StoreError> {
        let key = (vdisk, extent);
        if u64::from(n) == EXTENT_BLOCKS
            && let Some(result) = self
                .write_cow(key, CowData::Buffer(buf, buf_block), fua)
                .await
        {
            return result;
        }
        if u64::from(n) < EXTENT_BLOCKS
            && let Some(result) = self
                .write_shadow(key, start, n, CowData::Buffer(buf, buf_block), fua)
                .await
        {
            return result;
        }
        let crcs = block_crcs(block_range(buf, buf_block, usize::from(n)));
        loop {
            match self.queue_write(vdisk, extent, start, n, buf, buf_block, &crcs, fua)? {
                Queued::Waiting(rx) => return wait_log(rx).await,
                Queued::NeedsSlot => self.allocate_extent(key).await?,
                Queued::NeedsReservation => self.wait_for_checkpoint().await,
            }
        }
    }

    /// Queues a partial-extent write in the oplog batch of its disk and
    /// makes it visible in the overlay.
    #[allow(clippy::too_many_arguments)]
    fn queue_write(
        &self,
        vdisk: u64,
        extent: u64,
        start: u16,
        n: u16,
        buf: &Arc<IoBuf>,
        buf_block: usize,
        crcs: &[u32],
        fua: bool,
    ) -> Result<Queued, StoreError> {
        let key = (vdisk, extent);
        let mut guard = self.lock();
        Store::check_io(
            &guard,
            vdisk,
            extent * EXTENT_BLOCKS + u64::from(start),
            u64::from(n),
        )?;
        if !guard.extents.contains_key(&key) {
            return Ok(Queued::NeedsSlot);
        }
        let Some(generation) = guard.next_generation(vdisk) else {
            return Ok(Queued::NeedsReservation);
        };
        let st = &mut *guard;
        let Some(e) = st.extents.get_mut(&key) else {
            return Ok(Queued::NeedsSlot);
        };
        Store::disk_usable_ref(&st.disks, e.disk)?;
        let d = &mut st.disks[e.disk];
        d.interrupt_shadow(key);
        let extra = u64::from(n) * BLOCK_BYTES + 56 + 4 * u64::from(n);
        let batch = d.log.open_batch(extra);
        let lsn = batch.lsn;
        let data_index = batch.data_blocks;
        batch.push(Record {
            vdisk_id: vdisk,
            extent,
            alloc_id: e.alloc_id,
            slot: e.slot,
            first_block: start,
            blocks: n,
            generation,
            kind: RecordKind::Write {
                data_index,
                crcs: crcs.to_vec(),
            },
        });
        let at = buf_block * BLOCK_BYTES as usize;
        batch.data.push(Segment {
            buf: buf.clone(),
            start: at,
            len: usize::from(n) * BLOCK_BYTES as usize,
        });
        batch.data_blocks += u32::from(n);
        batch.fua |= fua;
        let (tx, rx) = oneshot::channel();
        batch.waiters.push(tx);
        for i in 0..n {
            let seg = Segment {
                buf: buf.clone(),
                start: at + usize::from(i) * BLOCK_BYTES as usize,
                len: BLOCK_BYTES as usize,
            };
            let entry = OverlayEntry::new(
                lsn,
                generation,
                Content::Data {
                    seg,
                    crc: crcs[usize::from(i)],
                },
            );
            overlay_insert(&mut e.overlay, &mut d.undrained_bytes, start + i, entry);
        }
        tracing::debug!(
            ?key,
            alloc = e.alloc_id,
            lsn,
            start,
            n,
            generation,
            "queued write"
        );
        self.inner.log_wake[e.disk].notify_one();
        Ok(Queued::Waiting(rx))
    }

    /// Refuses I/O to a disk that failed or is not present (`disk_usable`
    /// for callers holding only the disks, not the whole state).
    fn disk_usable_ref(disks: &[DiskState], disk: usize) -> Result<(), StoreError> {
        match disks.get(disk) {
            Some(d) => match &d.failed {
                Some(why) => Err(StoreError::DiskFailed(
                    d.path.display().to_string(),
                    why.clone(),
                )),
                None => Ok(()),
            },
            None => Err(StoreError::DiskFailed(
                "(missing)".into(),
                "the disk is not present".into(),
            )),
        }
    }

    async fn wait_for_checkpoint(&self) {
        let notified = self.inner.progress.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.inner.drain_wake.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
    }

    /// Gives an unmapped extent a slot (space reserved on the disk first).
    async fn allocate_extent(&self, key: ExtentKey) -> Result<(), StoreError> {
        let (disk, slot, fresh, engine, offset) = {
            let mut st = self.lock();
            if st.extents.contains_key(&key) {
                return Ok(());
            }
            let Some(disk) = st.pick_disk() else {
                return Err(StoreError::NoSpace);
            };
            let Some((slot, fresh)) = self.take_slot(&mut st, disk) else {
                return Err(StoreError::NoSpace);
            };
            let d = &st.disks[disk];
            (disk, slot, fresh, d.engine.clone(), d.slot_offset(slot))
        };
        let reserved = if fresh {
            engine.allocate(offset, SLOT_BYTES).await
        } else {
            Ok(())
        };
        if self.install_extent(key, disk, slot, fresh, reserved)? {
            self.wait_for_checkpoint().await;
        }
        Ok(())
    }

    /// Takes a slot of disk `disk` for a new tenancy (see
    /// `DiskState::take_slot`) and, when the never-used slots taken next are
    /// about to run out of reserved ones, starts reserving the next ones in
    /// the background. Every path that takes a slot comes through here:
    /// one that took slots without asking (the rewrite in parts did, once)
    /// finds only unreserved never-used slots once the reused ones run out,
    /// and falls back to writing everything twice, through the oplog.
    fn take_slot(&self, st: &mut State, disk: usize) -> Option<(u64, bool)> {
        let d = st.disks.get_mut(disk)?;
        let taken = d.take_slot();
        self.reserve_slots_ahead(d, disk);
        taken
    }

    /// Reserves the space of the next never-used slots of disk `disk` (whose
    /// state is `d`) in one go, in the background, when those taken next are
    /// about to run out of reserved ones (see `DiskState::wants_reservation`).
    fn reserve_slots_ahead(&self, d: &mut DiskState, disk: usize) {
        let Some(range) = d.wants_reservation() else {
            return;
        };
        let (engine, offset) = (d.engine.clone(), d.slot_offset(range.start));
        let store = self.clone();
        tokio::spawn(async move {
            let bytes = (range.end - range.start) * SLOT_BYTES;
            let reserved = engine.allocate(offset, bytes).await;
            if let Err(error) = &reserved {
                // Each slot reserves its own space again when taken.
                tracing::debug!(%error, "reserving slots ahead failed");
            }
            if let Some(d) = store.lock().disks.get_mut(disk) {
                d.reservation_done(range, reserved.is_ok());
            }
        });
    }

    /// Maps `key` to a slot whose space was just reserved (or gives the slot
    /// back). Returns true when allocation ids ran out and the caller should
    /// wait for a checkpoint.
    fn install_extent(
        &self,
        key: ExtentKey,
        disk: usize,
        slot: u64,
        fresh: bool,
        reserved: Result<(), DiskError>,
    ) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let give_back = |st: &mut State| {
            if let Some(d) = st.disks.get_mut(disk) {
                d.give_back(slot, fresh);
            }
        };
        if let Err(e) = reserved {
            give_back(&mut st);
            return Err(match e {
                DiskError::NoSpace { .. } => StoreError::NoSpace,
                other => StoreError::Disk(other),
            });
        }
        if st.extents.contains_key(&key) || !st.vdisks.contains_key(&key.0) {
            give_back(&mut st);
            return Ok(false);
        }
        let Some(alloc_id) = st.next_alloc_id() else {
            give_back(&mut st);
            return Ok(true);
        };
        let d = &mut st.disks[disk];
        let lsn = d.log.open_batch(0).lsn;
        tracing::debug!(?key, slot, alloc_id, lsn, "allocate extent");
        d.map_changes.push((
            lsn,
            key,
            Some(ExtentRow {
                disk: d.id,
                slot,
                alloc_id,
                persisted: false,
            }),
        ));
        st.extents.insert(
            key,
            ExtentState {
                disk,
                slot,
                alloc_id,
                persisted: false,
                meta: Some(Box::new(ExtentMeta::empty(key.0, key.1, alloc_id))),
                overlay: BTreeMap::new(),
                landing: None,
                meta_unsaved: None,
            },
        );
        Ok(false)
    }

    /// Writes a whole extent copy-on-write into a fresh slot. `None` means no
    /// slot was available and the caller should log the write instead.
    ///
    /// Only the data goes to the slot; it is checksummed while the disk
    /// writes it. The slot's metadata (the checksums and generation) is not
    /// written here: the remap record carries all of it, and the drainer
    /// writes it home before a checkpoint covers the record. So a whole-extent
    /// write costs the data write and its share of one oplog batch.
    async fn write_cow(
        &self,
        key: ExtentKey,
        data: CowData<'_>,
        fua: bool,
    ) -> Option<Result<(), StoreError>> {
        let (disk, slot, fresh, alloc_id, generation, engine, offset) = {
            let mut st = self.lock();
            let disk = match st.extents.get(&key) {
                Some(e) => e.disk,
                None => st.pick_disk()?,
            };
            if let Err(e) = Store::disk_usable(&st, disk) {
                return Some(Err(e));
            }
            if st.disks[disk].free_slots() == 0 {
                return None;
            }
            let alloc_id = st.next_alloc_id()?;
            let generation = st.next_generation(key.0)?;
            let (slot, fresh) = self.take_slot(&mut st, disk)?;
            let d = &st.disks[disk];
            (
                disk,
                slot,
                fresh,
                alloc_id,
                generation,
                d.engine.clone(),
                d.slot_offset(slot),
            )
        };
        let give_back = move |store: &Store| {
            if let Some(d) = store.lock().disks.get_mut(disk) {
                d.give_back(slot, fresh);
            }
        };
        if fresh && engine.allocate(offset, SLOT_BYTES).await.is_err() {
            give_back(self);
            return None;
        }
        let data_offset = offset + SLOT_META_BYTES;
        // The data write runs beside the remap record's batch write instead
        // of before it: one device round trip per extent write instead of
        // two (see `watch_landing` for the task it runs in).
        let (data_written, crcs) = match data {
            CowData::Buffer(buf, buf_block) => {
                let segment = Segment {
                    buf: buf.clone(),
                    start: buf_block * BLOCK_BYTES as usize,
                    len: crate::format::EXTENT_BYTES as usize,
                };
                let written = engine.write_at(data_offset, vec![segment.clone()]);
                (written, PendingCrcs::Whole(segment))
            }
            CowData::Source(source) => {
                let started = start_pieces(
                    &engine,
                    data_offset,
                    source,
                    crate::format::EXTENT_BYTES as usize,
                );
                if let Some(error) = started.failure {
                    // The slot goes back once the pieces already sent have
                    // landed; the extent keeps its old data.
                    let store = self.clone();
                    let written = started.written;
                    tokio::spawn(async move {
                        let _ = written.await;
                        give_back(&store);
                    });
                    return Some(Err(StoreError::Source(error)));
                }
                (started.written, PendingCrcs::Pieces(started.crcs))
            }
        };
        let (landing, landed_rx) = watch_landing(data_written);
        let Some(crcs) = crcs.collect().await else {
            // The runtime is going away: nothing is acknowledged, and the
            // slot goes back once the data has landed.
            let store = self.clone();
            tokio::spawn(async move {
                let _ = landing.await;
                give_back(&store);
            });
            return Some(Err(StoreError::ShuttingDown));
        };
        let meta = ExtentMeta::written_whole(key.0, key.1, alloc_id, generation, &crcs);
        self.inner.stats.cow_writes.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut st = self.lock();
            if !st.vdisks.contains_key(&key.0) {
                // Deleted meanwhile: the slot goes back once nothing is
                // writing into it any more.
                let store = self.clone();
                tokio::spawn(async move {
                    let _ = landing.await;
                    give_back(&store);
                });
                return Some(Err(StoreError::NoSuchVdisk(format!("#{}", key.0))));
            }
            let d = &mut st.disks[disk];
            d.interrupt_shadow(key);
            let batch = d.log.open_batch(56 + 4 * EXTENT_BLOCKS);
            let lsn = batch.lsn;
            batch.push(Record {
                vdisk_id: key.0,
                extent: key.1,
                alloc_id,
                slot,
                first_block: 0,
                blocks: EXTENT_BLOCKS as u16,
                generation,
                kind: RecordKind::Remap { crcs },
            });
            let rx = batch.await_cow(landing, fua);
            let disk_id = d.id;
            tracing::debug!(?key, slot, alloc_id, lsn, "copy-on-write remap");
            st.release_extent(key, lsn);
            let d = &mut st.disks[disk];
            self.slot_replaced(d);
            let tenancy = (disk, disk_id, slot, alloc_id);
            st.publish_cow(key, tenancy, meta, landed_rx.clone(), lsn);
            self.inner.log_wake[disk].notify_one();
            rx
        };
        Some(self.wait_cow_written(rx, landed_rx, disk, fua).await)
    }

    /// Asks for a checkpoint when enough replaced slots wait for one (see
    /// `checkpoint_replaced_slots`); called after a slot was quarantined.
    fn slot_replaced(&self, d: &DiskState) {
        let every = self
            .inner
            .config
            .checkpoint_replaced_slots
            .min(usize::try_from(d.label.slot_count / 8).unwrap_or(usize::MAX))
            .max(1);
        if !d.quarantine.is_empty() && d.quarantine.len().is_multiple_of(every) {
            // The slots replaced since the last checkpoint come free only
            // with the next one.
            self.inner.drain_wake.notify_one();
        }
    }

    /// A part of a rewrite in parts whose data could not all be taken (the
    /// source failed, or the runtime is going away), called once the
    /// writes it started have landed: it no longer counts as in flight, and
    /// its rewrite is interrupted.
    fn abandon_shadow_part(&self, disk: usize, key: ExtentKey) {
        let mut st = self.lock();
        let Some(d) = st.disks.get_mut(disk) else {
            return;
        };
        if let Some(s) = d.shadows.get_mut(&key) {
            s.inflight = s.inflight.saturating_sub(1);
            d.interrupt_shadow(key);
        }
    }

    /// Writes `n` blocks from block `start` of extent `key` as a part of the
    /// extent's rewrite in parts (see [`Shadow`]): the first part (from
    /// block 0, at least [`SHADOW_MIN_BLOCKS`]) takes a free slot, each part
    /// that continues it goes into the same slot at its own blocks, and the
    /// part that makes it whole switches the extent to that slot. Each part
    /// is written once and answered on its own. `None`: this write is no
    /// such part (or no slot with its space reserved is free); the caller logs it.
    async fn write_shadow(
        &self,
        key: ExtentKey,
        start: u16,
        n: u16,
        data: CowData<'_>,
        fua: bool,
    ) -> Option<Result<(), StoreError>> {
        let (disk, slot, generation, engine, offset) = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let e = st.extents.get(&key)?;
            let (disk, old_alloc) = (e.disk, e.alloc_id);
            Store::disk_usable(st, disk).ok()?;
            let continuing = match st.disks[disk].shadows.get(&key) {
                Some(s) if !s.interrupted && s.claimed == start && s.old_alloc == old_alloc => true,
                Some(_) => return None,
                None => {
                    if start != 0
                        || u64::from(n) < SHADOW_MIN_BLOCKS
                        || st.disks[disk].free_slots() == 0
                    {
                        return None;
                    }
                    false
                }
            };
            let new_alloc = if continuing { 0 } else { st.next_alloc_id()? };
            let generation = st.next_generation(key.0)?;
            let slot = if continuing {
                let s = st.disks[disk].shadows.get_mut(&key)?;
                s.claimed += n;
                s.inflight += 1;
                s.slot
            } else {
                let (slot, fresh) = self.take_slot(st, disk)?;
                let d = &mut st.disks[disk];
                if fresh {
                    // Its space is not reserved; the logged path needs none.
                    // The reservation `take_slot` started lets the next
                    // rewrites find reserved slots again.
                    d.give_back(slot, fresh);
                    return None;
                }
                d.shadows.insert(
                    key,
                    Shadow {
                        slot,
                        alloc_id: new_alloc,
                        old_alloc,
                        claimed: n,
                        recorded: 0,
                        entries: vec![BlockEntry::default(); EXTENT_BLOCKS as usize],
                        inflight: 1,
                        interrupted: false,
                        first_lsn: None,
                        last_lsn: 0,
                        landings: Vec::new(),
                    },
                );
                slot
            };
            let d = &st.disks[disk];
            (
                disk,
                slot,
                generation,
                d.engine.clone(),
                d.slot_offset(slot),
            )
        };
        let block = BLOCK_BYTES as usize;
        let data_offset = offset + SLOT_META_BYTES + u64::from(start) * BLOCK_BYTES;
        // The part's data, where it is held: one segment of the caller's
        // buffer, or the pieces copied from the source.
        let (data_written, held, crcs) = match data {
            CowData::Buffer(buf, buf_block) => {
                let segment = Segment {
                    buf: buf.clone(),
                    start: buf_block * block,
                    len: usize::from(n) * block,
                };
                let written = engine.write_at(data_offset, vec![segment.clone()]);
                (written, vec![segment.clone()], PendingCrcs::Whole(segment))
            }
            CowData::Source(source) => {
                let started = start_pieces(&engine, data_offset, source, usize::from(n) * block);
                if let Some(error) = started.failure {
                    // The part is refused; its rewrite is interrupted once
                    // the pieces already sent have landed, so that the slot
                    // is never reused under them.
                    let store = self.clone();
                    let written = started.written;
                    tokio::spawn(async move {
                        let _ = written.await;
                        store.abandon_shadow_part(disk, key);
                    });
                    return Some(Err(StoreError::Source(error)));
                }
                (
                    started.written,
                    started.pieces,
                    PendingCrcs::Pieces(started.crcs),
                )
            }
        };
        let (landing, landed_rx) = watch_landing(data_written);
        let Some(crcs) = crcs.collect().await else {
            // The runtime is going away: nothing is acknowledged.
            let store = self.clone();
            tokio::spawn(async move {
                let _ = landing.await;
                store.abandon_shadow_part(disk, key);
            });
            return Some(Err(StoreError::ShuttingDown));
        };
        let (rx, extent_gone) = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let current = st
                .extents
                .get(&key)
                .filter(|e| e.disk == disk)
                .map(|e| e.alloc_id);
            let d = &mut st.disks[disk];
            let Some(s) = d.shadows.get_mut(&key) else {
                // A claimed part keeps its rewrite in the map.
                unreachable!("a rewrite in parts vanished with a part in flight");
            };
            s.inflight -= 1;
            let continues = !s.interrupted && s.recorded == start && current == Some(s.old_alloc);
            let completes = continues && u64::from(start) + u64::from(n) == EXTENT_BLOCKS;
            if !continues {
                s.interrupted = true;
            }
            let batch = d.log.open_batch(56 + 4 * u64::from(n));
            let lsn = batch.lsn;
            batch.push(Record {
                vdisk_id: key.0,
                extent: key.1,
                alloc_id: s.alloc_id,
                slot,
                first_block: start,
                blocks: n,
                generation,
                kind: RecordKind::Shadow {
                    crcs: crcs.clone(),
                    completes,
                },
            });
            let rx = batch.await_cow(landing, fua);
            s.first_lsn.get_or_insert(lsn);
            s.last_lsn = lsn;
            if continues {
                for (i, &crc) in crcs.iter().enumerate() {
                    s.entries[usize::from(start) + i] = BlockEntry {
                        generation,
                        has_data: true,
                        lost: false,
                        crc,
                    };
                }
                s.recorded += n;
                s.landings.push(landed_rx.clone());
            }
            tracing::debug!(
                ?key,
                slot,
                lsn,
                start,
                n,
                continues,
                completes,
                "rewrite part"
            );
            if completes {
                let Some(s) = d.shadows.remove(&key) else {
                    unreachable!("the rewrite was just updated");
                };
                let first_lsn = s.first_lsn.unwrap_or(lsn);
                d.shadow_spans.push((first_lsn, lsn));
                let disk_id = d.id;
                st.release_extent(key, lsn);
                let d = &mut st.disks[disk];
                // The parts' overlay entries in the old tenancy are in the
                // slot now; no checkpoint can cover them before this record
                // (`shadow_spans`), so they need not be written home there.
                if let Some((_, _, old)) = d.retired.last_mut() {
                    d.undrained_bytes -= overlay_drop_from(&mut old.overlay, first_lsn);
                }
                self.slot_replaced(d);
                let meta = ExtentMeta {
                    vdisk_id: key.0,
                    extent: key.1,
                    alloc_id: s.alloc_id,
                    seq: 0,
                    entries: s.entries,
                };
                let tenancy = (disk, disk_id, slot, s.alloc_id);
                st.publish_cow(key, tenancy, meta, all_landed(s.landings), lsn);
                self.inner.stats.cow_writes.fetch_add(1, Ordering::Relaxed);
                (rx, false)
            } else {
                if s.interrupted && s.inflight == 0 {
                    d.retire_shadow(key);
                }
                // The part counts as written to the extent's current
                // tenancy (replay does the same with its record).
                let gone = match st.extents.get_mut(&key) {
                    Some(e) if e.disk == disk => {
                        let d = &mut st.disks[disk];
                        for (i, &crc) in crcs.iter().enumerate() {
                            let seg = block_of(&held, i);
                            let entry =
                                OverlayEntry::new(lsn, generation, Content::Data { seg, crc });
                            overlay_insert(
                                &mut e.overlay,
                                &mut d.undrained_bytes,
                                start + i as u16,
                                entry,
                            );
                        }
                        false
                    }
                    _ => true,
                };
                (rx, gone)
            }
        };
        self.inner.log_wake[disk].notify_one();
        if extent_gone {
            let _ = wait_log(rx).await;
            return Some(Err(StoreError::NoSuchVdisk(format!("#{}", key.0))));
        }
        Some(self.wait_cow_written(rx, landed_rx, disk, fua).await)
    }

    /// Waits for a copy-on-write write queued with its record: with `fua`,
    /// for its batch (which waits for the data and syncs); otherwise for the
    /// batch to be written and the data to land, side by side.
    async fn wait_cow_written(
        &self,
        rx: oneshot::Receiver<Result<(), String>>,
        mut landed_rx: watch::Receiver<Landing>,
        disk: usize,
        fua: bool,
    ) -> Result<(), StoreError> {
        if fua {
            return wait_log(rx).await;
        }
        let (written, landed) = futures::future::join(wait_log(rx), async {
            // Copied out at once: the borrow must not live across an await.
            landed_rx
                .wait_for(|l| *l != Landing::InFlight)
                .await
                .map(|l| *l)
        })
        .await;
        written?;
        match landed {
            Ok(Landing::Landed) => Ok(()),
            Ok(_) => Err(cow_data_failed(&self.lock(), disk)),
            Err(_) => Err(StoreError::ShuttingDown),
        }
    }

    /// Makes `blocks` blocks from `first` read as zeros; whole extents give
    /// their space back.
    pub async fn zero(
        &self,
        vdisk: u64,
        first: u64,
        blocks: u64,
        fua: bool,
    ) -> Result<(), StoreError> {
        {
            let st = self.lock();
            Store::check_io(&st, vdisk, first, blocks)?;
        }
        let mut waits = Vec::new();
        {
            let mut st = self.lock();
            for (extent, start, n, _) in pieces(first, blocks) {
                let key = (vdisk, extent);
                let Some(e) = st.extents.get(&key) else {
                    continue;
                };
                let disk = e.disk;
                Store::disk_usable(&st, disk)?;
                let (alloc_id, slot) = (e.alloc_id, e.slot);
                let generation = match st.next_generation(vdisk) {
                    Some(g) => g,
                    None => return Err(StoreError::ShuttingDown),
                };
                let st_ref = &mut *st;
                let d = &mut st_ref.disks[disk];
                d.interrupt_shadow(key);
                let batch = d.log.open_batch(56);
                let lsn = batch.lsn;
                let whole = u64::from(n) == EXTENT_BLOCKS;
                batch.push(Record {
                    vdisk_id: vdisk,
                    extent,
                    alloc_id,
                    slot,
                    first_block: start,
                    blocks: n,
                    generation,
                    kind: if whole {
                        RecordKind::Unmap
                    } else {
                        RecordKind::Zero
                    },
                });
                batch.fua |= fua;
                let (tx, rx) = oneshot::channel();
                batch.waiters.push(tx);
                waits.push(rx);
                if whole {
                    st_ref.release_extent(key, lsn);
                } else if let Some(e) = st_ref.extents.get_mut(&key) {
                    for b in start..start + n {
                        let entry = OverlayEntry::new(lsn, generation, Content::Zero);
                        overlay_insert(
                            &mut e.overlay,
                            &mut st_ref.disks[disk].undrained_bytes,
                            b,
                            entry,
                        );
                    }
                }

                self.inner.log_wake[disk].notify_one();
            }
        }
        for rx in waits {
            wait_log(rx).await?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.stats.flushes.fetch_add(1, Ordering::Relaxed);
        // A failed disk may hold completed writes that can no longer be made
        // durable: the flush must fail rather than vouch for them.
        let targets: Vec<(usize, u64, Arc<dyn DiskEngine>)> = {
            let st = self.lock();
            if st.shutting_down {
                return Err(StoreError::ShuttingDown);
            }
            if let Some(d) = st.disks.iter().find(|d| d.failed.is_some()) {
                let why = d.failed.clone().unwrap_or_default();
                return Err(StoreError::DiskFailed(d.path.display().to_string(), why));
            }
            st.disks
                .iter()
                .enumerate()
                .map(|(i, d)| (i, d.log.completed_lsn, d.engine.clone()))
                .collect()
        };
        let syncs = targets.into_iter().map(|(i, lsn, engine)| async move {
            tracing::debug!(lsn, "flush");
            engine.sync().await?;
            let mut st = self.lock();
            let log = &mut st.disks[i].log;
            log.durable_lsn = log.durable_lsn.max(lsn);
            Ok::<(), StoreError>(())
        });
        futures::future::try_join_all(syncs).await?;
        Ok(())
    }

    /// Allocation map of a range: runs of (blocks, holds data).
    pub async fn allocation(
        &self,
        vdisk: u64,
        first: u64,
        blocks: u64,
    ) -> Result<Vec<(u64, bool)>, StoreError> {
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, data: bool| match runs.last_mut() {
            Some((c, d)) if *d == data => *c += n,
            _ => runs.push((n, data)),
        };
        for (extent, start, n, _) in pieces(first, blocks) {
            let key = (vdisk, extent);
            loop {
                let needs_meta = {
                    let st = self.lock();
                    Store::check_io(&st, vdisk, first, blocks)?;
                    match st.extents.get(&key) {
                        None => {
                            push(u64::from(n), false);
                            None
                        }
                        Some(e) if Store::disk_usable(&st, e.disk).is_err() => {
                            push(u64::from(n), true);
                            None
                        }
                        Some(e) => match e.meta.as_ref() {
                            None => Some((e.disk, e.slot, e.alloc_id)),
                            Some(meta) => {
                                for b in start..start + n {
                                    let data = match e.overlay.get(&b) {
                                        Some(entry) => {
                                            matches!(entry.content, Content::Data { .. })
                                        }
                                        None => meta.entries[usize::from(b)].has_data,
                                    };
                                    push(1, data);
                                }
                                None
                            }
                        },
                    }
                };
                match needs_meta {
                    Some((disk, slot, alloc)) => self.load_meta(key, disk, slot, alloc).await?,
                    None => break,
                }
            }
        }
        Ok(runs)
    }

    /// Drains everything, checkpoints as a clean shutdown and stops the
    /// background tasks. I/O fails with `ShuttingDown` afterwards.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        // Let queued writes reach the log first.
        for _ in 0..500 {
            let busy = {
                let st = self.lock();
                st.disks.iter().any(|d| {
                    d.failed.is_none()
                        && (!d.log.writing.is_empty()
                            || d.log.pending.iter().any(|b| !b.records.is_empty()))
                })
            };
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.lock().shutting_down = true;
        self.inner.progress.notify_waiters();
        let tasks: Vec<_> = self.inner.tasks.lock().drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        let count = self.lock().disks.len();

        for index in 0..count {
            if self.lock().disks[index].failed.is_none() {
                self.drain_disk(index, true).await?;
            }
        }
        Ok(())
    }

    /// Stops the store abruptly, as if its process died: background tasks are
    /// aborted, nothing is drained or checkpointed. Waits until no other
    /// handle to the store is alive, so the catalog can be reopened. For tests.
    #[doc(hidden)]
    pub async fn halt(self) {
        self.lock().shutting_down = true;
        self.inner.progress.notify_waiters();
        let tasks: Vec<_> = self.inner.tasks.lock().drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&self.inner) > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reserves generations and allocation ids ahead and checkpoints it.
    async fn reserve_ahead(&self) -> Result<(), StoreError> {
        let checkpoint = {
            let st = self.lock();
            Checkpoint {
                gen_reserved: st
                    .vdisks
                    .values()
                    .map(|v| (v.record.id, v.next_gen + RESERVE_AHEAD))
                    .collect(),
                alloc_reserved: Some(st.alloc_next + RESERVE_AHEAD),
                ..Checkpoint::default()
            }
        };
        self.commit_checkpoint(checkpoint).await
    }

    pub(crate) async fn commit_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), StoreError> {
        let store = self.clone();
        let checkpoint = Arc::new(checkpoint);
        let committed = checkpoint.clone();
        tokio::task::spawn_blocking(move || store.inner.catalog.checkpoint(&committed))
            .await
            .map_err(|e| StoreError::Catalog(Box::new(e)))??;
        let mut st = self.lock();
        for &(id, reserved) in &checkpoint.gen_reserved {
            if let Some(v) = st.vdisks.get_mut(&id) {
                v.record.gen_reserved = v.record.gen_reserved.max(reserved);
            }
        }
        if let Some(reserved) = checkpoint.alloc_reserved {
            st.alloc_reserved = st.alloc_reserved.max(reserved);
        }
        Ok(())
    }

    /// Where the data of a vdisk block lives: (disk path, byte offset of the
    /// block's data on that disk). For tests and diagnostics.
    pub async fn locate(&self, vdisk: u64, block: u64) -> Option<(PathBuf, u64)> {
        let st = self.lock();
        let e = st.extents.get(&(vdisk, block / EXTENT_BLOCKS))?;
        let d = st.disks.get(e.disk)?;
        Some((
            d.path.clone(),
            d.slot_offset(e.slot) + SLOT_META_BYTES + (block % EXTENT_BLOCKS) * BLOCK_BYTES,
        ))
    }

    /// True when some data of the vdisk sits on a failed or missing disk.
    pub fn vdisk_unavailable(&self, id: u64) -> bool {
        let st = self.lock();
        st.extents
            .iter()
            .filter(|(k, _)| k.0 == id)
            .any(|(_, e)| st.disks.get(e.disk).is_none_or(|d| d.failed.is_some()))
    }

    /// Vdisk id by name.
    pub fn vdisk_id(&self, name: &str) -> Option<u64> {
        self.lock().names.get(name).copied()
    }

    /// The catalog path inside a data directory.
    pub fn catalog_path(data_dir: &Path) -> PathBuf {
        data_dir.join("meta.redb")
    }
}

/// The error of a request that met a copy-on-write data write that failed
/// on `disk` (the log writer fails the disk for it).
fn cow_data_failed(st: &State, disk: usize) -> StoreError {
    StoreError::DiskFailed(
        st.disks
            .get(disk)
            .map(|d| d.path.display().to_string())
            .unwrap_or_default(),
        "a copy-on-write data write failed".into(),
    )
}

/// Why a read cannot be planned yet.
enum Unready {
    /// The extent's metadata must be loaded from (disk, slot, tenancy).
    Meta(usize, u64, u64),
    /// The extent's copy-on-write data is still being written.
    Landing(watch::Receiver<Landing>),
}

/// What queueing a write led to.
enum Queued {
    /// Queued; completes with the batch.
    Waiting(oneshot::Receiver<Result<(), String>>),
    /// The extent has no slot yet.
    NeedsSlot,
    /// The vdisk's generation reservation is used up until the next checkpoint.
    NeedsReservation,
}

/// The bytes of a whole-extent copy-on-write write.
enum CowData<'a> {
    /// In a buffer, from block `.1` of it on.
    Buffer(&'a Arc<IoBuf>, usize),
    /// Still to be copied from a source, piece by piece.
    Source(&'a mut dyn WriteSource),
}

/// Smallest first part of an extent's rewrite in parts (256 KiB): smaller
/// writes at an extent's start are logged, as random writes are.
const SHADOW_MIN_BLOCKS: u64 = 64;

/// A landing that reads `Landed` once every one of `parts` has landed
/// (`Failed` if one failed).
fn all_landed(parts: Vec<watch::Receiver<Landing>>) -> watch::Receiver<Landing> {
    let (tx, rx) = watch::channel(Landing::InFlight);
    tokio::spawn(async move {
        let mut outcome = Landing::Landed;
        for mut part in parts {
            match part.wait_for(|l| *l != Landing::InFlight).await.map(|l| *l) {
                Ok(Landing::Landed) => {}
                _ => outcome = Landing::Failed,
            }
        }
        tx.send_replace(outcome);
    });
    rx
}

/// Drops every version at or after `lsn` from the head of each block's
/// chain in `overlay` (keeping older ones); returns the data bytes dropped.
fn overlay_drop_from(overlay: &mut BTreeMap<u16, OverlayEntry>, lsn: u64) -> u64 {
    let mut dropped = 0;
    let blocks: Vec<u16> = overlay.keys().copied().collect();
    for block in blocks {
        while let Some(head) = overlay.get_mut(&block)
            && head.lsn >= lsn
        {
            if matches!(head.content, Content::Data { .. }) {
                dropped += BLOCK_BYTES;
            }
            match head.older.take() {
                Some(older) => *head = *older,
                None => {
                    overlay.remove(&block);
                }
            }
        }
    }
    dropped
}

/// How much of an extent a streamed copy-on-write write copies before it
/// sends the piece to the disk. A quarter of an extent: the first piece
/// leaves after a quarter of the copy, and on the disks measured four
/// writes of 256 KiB in flight together finish sooner than one of 1 MiB.
const COW_PIECE_BYTES: usize = 256 * 1024;

/// A started copy-on-write data write (a whole extent, or a part of a
/// rewrite in parts): its pieces' writes joined.
type PiecesWritten = futures::future::BoxFuture<'static, Result<(), DiskError>>;

/// Where a copy-on-write write's checksums come from.
enum PendingCrcs {
    /// Computed here, over the buffer, once its write is started.
    Whole(Segment),
    /// Computed by the pieces' tasks (see [`StartedPieces::crcs`]).
    Pieces(Vec<oneshot::Receiver<Vec<u32>>>),
}

impl PendingCrcs {
    /// The checksums of every block, in order: computed now over a
    /// buffer (its write is already started), or gathered from the pieces'
    /// tasks. `None` if the runtime is going away.
    async fn collect(self) -> Option<Vec<u32>> {
        match self {
            PendingCrcs::Whole(segment) => Some(block_crcs(segment.as_slice())),
            PendingCrcs::Pieces(pieces) => futures::future::try_join_all(pieces)
                .await
                .ok()
                .map(|pieces| pieces.concat()),
        }
    }
}

/// Runs a started copy-on-write data write in its own task, so that no
/// caller dropping its future can abandon a write the log writer waits
/// for; the receiver tells when (and whether) the data has landed.
fn watch_landing(
    written: PiecesWritten,
) -> (
    tokio::task::JoinHandle<Result<(), DiskError>>,
    watch::Receiver<Landing>,
) {
    let (landed_tx, landed_rx) = watch::channel(Landing::InFlight);
    let landing = spawn_started(async move {
        let result = written.await;
        landed_tx.send_replace(match result {
            Ok(()) => Landing::Landed,
            Err(_) => Landing::Failed,
        });
        result
    });
    (landing, landed_rx)
}

/// A copy-on-write data write as [`start_pieces`] started it.
struct StartedPieces {
    /// The pieces' writes, joined.
    written: PiecesWritten,
    /// The checksums of each piece's blocks, in order. A piece is
    /// checksummed by a runtime worker once its write is started, beside
    /// the disk writing it and the caller copying the next piece: the
    /// pieces leave as fast as they are copied, and the remap or shadow
    /// record (which carries the checksums) soon after the last one.
    crcs: Vec<oneshot::Receiver<Vec<u32>>>,
    /// The pieces' data, in order (what reads see until the data is home).
    pieces: Vec<Segment>,
    /// Why the source failed, if it did: then not every piece was started,
    /// and the slot may be reused only once `written` has completed.
    failure: Option<BlockError>,
}

/// Copies `len` bytes (whole blocks) from `source` piece by piece into new
/// buffers, starting each piece's write at `data_offset` on `engine` as soon
/// as it is copied.
fn start_pieces(
    engine: &Arc<dyn DiskEngine>,
    data_offset: u64,
    source: &mut dyn WriteSource,
    len: usize,
) -> StartedPieces {
    let count = len.div_ceil(COW_PIECE_BYTES);
    let mut started = Vec::with_capacity(count);
    let mut crcs = Vec::with_capacity(count);
    let mut pieces = Vec::with_capacity(count);
    let mut failure = None;
    for at in (0..len).step_by(COW_PIECE_BYTES) {
        let mut piece = IoBuf::for_overwrite(COW_PIECE_BYTES.min(len - at));
        if let Err(error) = source.read_next(piece.as_mut_slice()) {
            failure = Some(error);
            break;
        }
        let piece = Segment::whole(Arc::new(piece));
        pieces.push(piece.clone());
        let write = engine.write_at(data_offset + at as u64, vec![piece.clone()]);
        let (crc_tx, crc_rx) = oneshot::channel();
        // The first poll, here, submits the write; the checksum waits for
        // the runtime's poll (`yield_now`), on a worker thread.
        let checksum = async move {
            tokio::task::yield_now().await;
            let _ = crc_tx.send(block_crcs(piece.as_slice()));
        };
        started.push(spawn_started(async move {
            futures::future::join(write, checksum).await.0
        }));
        crcs.push(crc_rx);
    }
    let written: PiecesWritten = Box::pin(async move {
        let mut result = Ok(());
        for piece in started {
            let landed = piece.await.unwrap_or(Err(DiskError::EngineGone));
            if result.is_ok() {
                result = landed;
            }
        }
        result
    });
    StartedPieces {
        written,
        crcs,
        pieces,
        failure,
    }
}

/// Block `index` of the data held in `segments` (whole blocks, in order).
fn block_of(segments: &[Segment], index: usize) -> Segment {
    let block = BLOCK_BYTES as usize;
    let mut at = index * block;
    for segment in segments {
        if at < segment.len {
            return Segment {
                buf: segment.buf.clone(),
                start: segment.start + at,
                len: block,
            };
        }
        at -= segment.len;
    }
    unreachable!("block {index} is beyond the data held");
}

/// The blocks `first..first + count` of `buf`.
fn block_range(buf: &IoBuf, first: usize, count: usize) -> &[u8] {
    let block = BLOCK_BYTES as usize;
    &buf.as_slice()[first * block..(first + count) * block]
}

/// Spawns `task` after polling it once on this thread, so that the I/O it
/// starts is submitted now instead of when a runtime worker gets to it.
pub(crate) fn spawn_started<T: Send + 'static>(
    task: impl Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    let mut task = Box::pin(task);
    // A no-op waker is enough for this first poll: the runtime polls the
    // spawned task again with a real waker before anything else.
    let mut cx = Context::from_waker(Waker::noop());
    match task.as_mut().poll(&mut cx) {
        Poll::Ready(done) => tokio::spawn(async move { done }),
        Poll::Pending => tokio::spawn(task),
    }
}

async fn wait_log(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), StoreError> {
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(StoreError::DiskFailed("oplog".into(), why)),
        Err(_) => Err(StoreError::ShuttingDown),
    }
}

fn vdisk_info(st: &State, record: &VdiskRecord) -> VdiskInfo {
    let extents = st.extents.keys().filter(|k| k.0 == record.id).count() as u64;
    VdiskInfo {
        id: record.id,
        name: record.name.clone(),
        size: record.size,
        created: record.created,
        allocated: extents * crate::format::EXTENT_BYTES,
    }
}

/// Reads a disk's label, formats blank disks, and registers the disk in the catalog.
async fn claim_disk(
    catalog: &Catalog,
    node_id: Uuid,
    disk: &OpenedDisk,
    known: &HashMap<Uuid, DiskRecord>,
    force: bool,
) -> Result<(Label, DiskRecord), StoreError> {
    let engine = &disk.engine;
    let (buf, result) = engine
        .read_at(0, IoBuf::zeroed(2 * BLOCK_BYTES as usize))
        .await;
    result?;
    let bytes = buf.as_slice();
    let copy_a = Label::decode(&bytes[..4096]);
    let copy_b = Label::decode(&bytes[4096..]);
    let label = copy_a.clone().or_else(|_| copy_b.clone());
    let bad = |reason: String| StoreError::BadDisk {
        path: disk.path.clone(),
        reason,
    };
    let path = disk.path.display().to_string();
    match label {
        Ok(label) if label.node_id == node_id && known.contains_key(&label.disk_id) => {
            if label.disk_bytes > engine.size() {
                return Err(bad(format!(
                    "the label says {} bytes but the disk has only {}",
                    label.disk_bytes,
                    engine.size()
                )));
            }
            if copy_a.as_ref().ok() != Some(&label) || copy_b.as_ref().ok() != Some(&label) {
                tracing::warn!(path = %disk.path.display(), "one label copy is damaged; rewriting it from the other");
                write_label(engine, &label).await?;
            }
            let mut record = known[&label.disk_id].clone();
            if record.path != path {
                record.path = path;
                catalog.put_disk(&record)?;
            }
            Ok((label, record))
        }
        Ok(label) if !force => {
            if label.node_id != node_id {
                Err(StoreError::ForeignDisk {
                    path: disk.path.clone(),
                    owner: label.node_id,
                    node: node_id,
                })
            } else {
                Err(bad("the disk carries this node's label but is not in its catalog (was the data directory lost?); use --force-claim to reformat it".into()))
            }
        }
        Err(_) if !force && known.values().any(|r| r.path == path) => {
            // A disk this node formatted whose two labels are both unreadable:
            // the catalog knows its identity and the layout follows from its
            // size, so rebuild the labels instead of formatting over the data.
            let Some(record) = known.values().find(|r| r.path == path).cloned() else {
                return Err(bad("catalog entry vanished".into()));
            };
            if record.bytes != engine.size() {
                return Err(bad(format!(
                    "both labels are unreadable and the disk's size ({}) differs from the catalog's ({}); refusing to guess (use --force-claim to reformat it)",
                    engine.size(),
                    record.bytes
                )));
            }
            let label = Label::plan(record.id, node_id, record.bytes, record.added);
            tracing::warn!(path = %disk.path.display(), disk = %record.id, "both labels are damaged; rebuilt them from the node catalog");
            write_label(engine, &label).await?;
            Ok((label, record))
        }
        Err(_) if !force && bytes.iter().any(|&b| b != 0) => Err(bad(
            "the disk holds data that is not a Basalt label; use --force-claim to overwrite it"
                .into(),
        )),
        _ => format_disk(catalog, node_id, disk).await,
    }
}

/// Writes both label copies and syncs.
async fn write_label(engine: &Arc<dyn DiskEngine>, label: &Label) -> Result<(), StoreError> {
    let encoded = Arc::new(IoBuf::from_slice(&label.encode()));
    engine
        .write_at(
            0,
            vec![Segment::whole(encoded.clone()), Segment::whole(encoded)],
        )
        .await?;
    engine.sync().await?;
    Ok(())
}

async fn format_disk(
    catalog: &Catalog,
    node_id: Uuid,
    disk: &OpenedDisk,
) -> Result<(Label, DiskRecord), StoreError> {
    let engine = &disk.engine;
    let label = Label::plan(Uuid::new_v4(), node_id, engine.size(), now_secs());
    if label.slot_count == 0 {
        return Err(StoreError::BadDisk {
            path: disk.path.clone(),
            reason: "too small to hold any extent".into(),
        });
    }
    // Write the whole oplog area once: its space is then reserved (log
    // writes can never fail for lack of it), no stale batch of an earlier
    // owner can be mistaken for ours, and on file disks the filesystem holds
    // real written extents, so log writes never pay for converting
    // preallocated (unwritten) extents.
    const ZERO_CHUNK: u64 = 4 << 20;
    let zeros = Arc::new(IoBuf::zeroed(ZERO_CHUNK as usize));
    let mut at = label.log_offset;
    let end = label.log_offset + label.log_bytes;
    while at < end {
        let len = ZERO_CHUNK.min(end - at) as usize;
        let segment = Segment {
            buf: zeros.clone(),
            start: 0,
            len,
        };
        engine.write_at(at, vec![segment]).await?;
        at += len as u64;
    }

    let encoded = Arc::new(IoBuf::from_slice(&label.encode()));
    engine
        .write_at(
            0,
            vec![Segment::whole(encoded.clone()), Segment::whole(encoded)],
        )
        .await?;
    engine.sync().await?;
    let record = DiskRecord {
        id: label.disk_id,
        path: disk.path.display().to_string(),
        bytes: label.disk_bytes,
        added: now_secs(),
        tail_pos: label.log_offset,
        tail_lsn: 1,
        clean: true,
    };
    catalog.put_disk(&record)?;
    tracing::info!(path = %disk.path.display(), disk = %label.disk_id, slots = label.slot_count, "formatted disk");
    Ok((label, record))
}

#[doc(hidden)]
pub fn overlay_bytes_for_tests(store: &Store) -> u64 {
    let st = store.lock();
    st.extents
        .values()
        .map(|e| overlay_data_bytes(&e.overlay))
        .sum()
}

/// Oplog batches written but not yet covered by a checkpoint, all disks.
#[doc(hidden)]
pub fn uncheckpointed_batches_for_tests(store: &Store) -> usize {
    store.lock().disks.iter().map(|d| d.log.batches.len()).sum()
}

#[doc(hidden)]
pub fn free_slots_for_tests(store: &Store) -> BTreeSet<u64> {
    let st = store.lock();
    st.disks
        .first()
        .map(|d| d.free.iter().chain(d.reuse.iter()).copied().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod send_tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// Frontends run store calls on tokio's multi-threaded runtime, so every
    /// future must be `Send` (no lock guard may live across an await).
    #[allow(dead_code)]
    fn store_futures_are_send(store: Store) {
        assert_send(&store.read(1, 0, 1));
        assert_send(&store.write(1, 0, IoBuf::zeroed(4096), false));
        assert_send(&store.zero(1, 0, 1, false));
        assert_send(&store.flush());
        assert_send(&store.allocation(1, 0, 1));
        assert_send(&store.create_vdisk("a", 4096));
        assert_send(&store.resize_vdisk("a", 4096));
        assert_send(&store.delete_vdisk("a"));
        assert_send(&store.shutdown());
        assert_send(&store.clone().halt());
        assert_send(&Store::open(StoreConfig::new("/nonexistent")));
    }
}

//! Node-local metadata in redb.
//!
//! What lives here is what a node needs to find its data again: its identity,
//! its disks (and where each disk's oplog must be replayed from), its vdisks,
//! and which slot of which disk holds each extent. Nothing here is on the
//! write path: the extent map is persisted in batches by the drainer's
//! checkpoint; between checkpoints the oplog is the record of changes.
//!
//! When the cluster arrives, vdisk definitions move behind Raft; the extent →
//! slot map stays here, because a slot number only means something on this
//! node's disks.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::StoreError;

const NODE: TableDefinition<&str, &[u8]> = TableDefinition::new("node");
const VDISKS: TableDefinition<u64, &[u8]> = TableDefinition::new("vdisks");
const VDISK_NAMES: TableDefinition<&str, u64> = TableDefinition::new("vdisk_names");
const DISKS: TableDefinition<u128, &[u8]> = TableDefinition::new("disks");
/// (vdisk id, extent index) → (disk id, slot, allocation id, metadata persisted).
const EXTENTS: TableDefinition<(u64, u64), (u128, u64, u64, bool)> =
    TableDefinition::new("extents");

const NODE_KEY: &str = "node";

/// Generations a new vdisk may use before its first checkpoint.
pub const INITIAL_GEN_RESERVATION: u64 = 1 << 24;

/// This node's identity and counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    /// Identity of the node, written into its disks' labels.
    pub node_id: Uuid,
    /// Allocation ids below this value may have been used.
    pub alloc_reserved: u64,
    /// Next vdisk id to hand out (ids are never reused).
    pub next_vdisk_id: u64,
}

/// A vdisk as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VdiskRecord {
    /// Numeric id used on disk and in the oplog.
    pub id: u64,
    /// Name (the NBD export name).
    pub name: String,
    /// Size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Generations below this value may have been used.
    pub gen_reserved: u64,
}

/// A disk as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    /// Identity (also in the disk's label).
    pub id: Uuid,
    /// Path the disk was last opened at.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// When it was added, unix seconds.
    pub added: u64,
    /// Oplog position replay starts from.
    pub tail_pos: u64,
    /// LSN of the batch expected at `tail_pos`.
    pub tail_lsn: u64,
    /// The last checkpoint was a clean shutdown (nothing to replay).
    pub clean: bool,
}

/// Where an extent lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentRow {
    /// Disk holding the slot.
    pub disk: Uuid,
    /// Slot number on that disk.
    pub slot: u64,
    /// Allocation id of the tenancy.
    pub alloc_id: u64,
    /// The slot's metadata blocks have been written for this tenancy, so
    /// finding none means they were destroyed.
    pub persisted: bool,
}

/// Everything the catalog holds, read at startup.
#[derive(Debug, Clone)]
pub struct CatalogSnapshot {
    /// Node identity and counters.
    pub node: NodeRecord,
    /// All vdisks.
    pub vdisks: Vec<VdiskRecord>,
    /// All disks.
    pub disks: Vec<DiskRecord>,
    /// The extent map.
    pub extents: Vec<((u64, u64), ExtentRow)>,
}

/// One checkpoint's changes, committed atomically.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// New oplog tails: (disk, tail position, tail LSN, clean).
    pub disk_tails: Vec<(Uuid, u64, u64, bool)>,
    /// Extent map changes in order; `None` removes the extent.
    pub extent_changes: Vec<((u64, u64), Option<ExtentRow>)>,
    /// New generation reservations per vdisk.
    pub gen_reserved: Vec<(u64, u64)>,
    /// New allocation-id reservation.
    pub alloc_reserved: Option<u64>,
}

/// The node-local metadata database.
pub struct Catalog {
    db: Database,
}

fn missing_node() -> StoreError {
    StoreError::Catalog("the node record is missing from the metadata database".into())
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(serde_json::from_slice(bytes)?)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(serde_json::to_vec(value)?)
}

impl Catalog {
    /// Opens (or creates) the database at `path`; a new database gets a fresh node id.
    pub fn open(path: &Path) -> Result<Catalog, StoreError> {
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                let dir = path.parent().unwrap_or(path).to_path_buf();
                return Err(StoreError::DataDirInUse(dir));
            }
            Err(e) => return Err(e.into()),
        };

        let txn = db.begin_write()?;
        {
            let mut node = txn.open_table(NODE)?;
            if node.get(NODE_KEY)?.is_none() {
                let record = NodeRecord {
                    node_id: Uuid::new_v4(),
                    alloc_reserved: 1,
                    next_vdisk_id: 1,
                };
                node.insert(NODE_KEY, encode(&record)?.as_slice())?;
            }
            txn.open_table(VDISKS)?;
            txn.open_table(VDISK_NAMES)?;
            txn.open_table(DISKS)?;
            txn.open_table(EXTENTS)?;
        }
        txn.commit()?;
        Ok(Catalog { db })
    }

    /// Reads everything.
    pub fn load(&self) -> Result<CatalogSnapshot, StoreError> {
        let txn = self.db.begin_read()?;
        let node_table = txn.open_table(NODE)?;
        let node = match node_table.get(NODE_KEY)? {
            Some(v) => decode(v.value())?,
            None => return Err(missing_node()),
        };
        let mut vdisks = Vec::new();
        for row in txn.open_table(VDISKS)?.iter()? {
            let (_, v) = row?;
            vdisks.push(decode(v.value())?);
        }
        let mut disks = Vec::new();
        for row in txn.open_table(DISKS)?.iter()? {
            let (_, v) = row?;
            disks.push(decode(v.value())?);
        }
        let mut extents = Vec::new();
        for row in txn.open_table(EXTENTS)?.iter()? {
            let (k, v) = row?;
            let (disk, slot, alloc_id, persisted) = v.value();
            extents.push((
                k.value(),
                ExtentRow {
                    disk: Uuid::from_u128(disk),
                    slot,
                    alloc_id,
                    persisted,
                },
            ));
        }
        Ok(CatalogSnapshot {
            node,
            vdisks,
            disks,
            extents,
        })
    }

    /// Creates a vdisk record with the given id (one the cluster assigned) or
    /// a fresh one. Fails if the name or the id is taken.
    pub fn create_vdisk(
        &self,
        id: Option<u64>,
        name: &str,
        size: u64,
        created: u64,
    ) -> Result<VdiskRecord, StoreError> {
        let txn = self.db.begin_write()?;
        let record;
        {
            let mut names = txn.open_table(VDISK_NAMES)?;
            if names.get(name)?.is_some() {
                return Err(StoreError::VdiskExists(name.to_string()));
            }
            let mut node_table = txn.open_table(NODE)?;
            let mut node: NodeRecord = match node_table.get(NODE_KEY)? {
                Some(v) => decode(v.value())?,
                None => return Err(missing_node()),
            };
            let id = match id {
                Some(id) => {
                    if id == 0 || txn.open_table(VDISKS)?.get(id)?.is_some() {
                        return Err(StoreError::VdiskExists(format!("{name} (id {id})")));
                    }
                    id
                }
                None => node.next_vdisk_id,
            };
            record = VdiskRecord {
                id,
                name: name.to_string(),
                size,
                created,
                gen_reserved: INITIAL_GEN_RESERVATION,
            };
            node.next_vdisk_id = node.next_vdisk_id.max(id + 1);
            node_table.insert(NODE_KEY, encode(&node)?.as_slice())?;
            names.insert(name, record.id)?;
            txn.open_table(VDISKS)?
                .insert(record.id, encode(&record)?.as_slice())?;
        }
        txn.commit()?;
        Ok(record)
    }

    /// Removes a vdisk and its extent rows.
    pub fn delete_vdisk(&self, id: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut vdisks = txn.open_table(VDISKS)?;
            let name = match vdisks.remove(id)? {
                Some(v) => decode::<VdiskRecord>(v.value())?.name,
                None => return Err(StoreError::NoSuchVdisk(format!("#{id}"))),
            };
            txn.open_table(VDISK_NAMES)?.remove(name.as_str())?;
            let mut extents = txn.open_table(EXTENTS)?;
            extents.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores a changed vdisk record (resize).
    pub fn put_vdisk(&self, record: &VdiskRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(VDISKS)?
            .insert(record.id, encode(record)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Stores a disk record.
    pub fn put_disk(&self, record: &DiskRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(DISKS)?
            .insert(record.id.as_u128(), encode(record)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Commits a checkpoint atomically.
    pub fn checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let vdisks = txn.open_table(VDISKS)?;
            let mut vdisk_updates = Vec::new();
            for &(id, reserved) in &checkpoint.gen_reserved {
                if let Some(v) = vdisks.get(id)? {
                    let mut record: VdiskRecord = decode(v.value())?;
                    record.gen_reserved = record.gen_reserved.max(reserved);
                    vdisk_updates.push(record);
                }
            }
            drop(vdisks);
            let mut vdisks = txn.open_table(VDISKS)?;
            for record in vdisk_updates {
                vdisks.insert(record.id, encode(&record)?.as_slice())?;
            }
            let mut extents = txn.open_table(EXTENTS)?;
            for (key, change) in &checkpoint.extent_changes {
                // Rows of vdisks deleted meanwhile are not written back.
                if vdisks.get(key.0)?.is_none() {
                    extents.remove(*key)?;
                    continue;
                }
                match change {
                    Some(row) => {
                        extents.insert(
                            *key,
                            (row.disk.as_u128(), row.slot, row.alloc_id, row.persisted),
                        )?;
                    }
                    None => {
                        extents.remove(*key)?;
                    }
                }
            }
            let mut disks = txn.open_table(DISKS)?;
            for &(id, pos, lsn, clean) in &checkpoint.disk_tails {
                let existing = disks
                    .get(id.as_u128())?
                    .map(|v| decode::<DiskRecord>(v.value()));
                if let Some(record) = existing {
                    let mut record = record?;
                    record.tail_pos = pos;
                    record.tail_lsn = lsn;
                    record.clean = clean;
                    disks.insert(id.as_u128(), encode(&record)?.as_slice())?;
                }
            }
            if let Some(reserved) = checkpoint.alloc_reserved {
                let mut node_table = txn.open_table(NODE)?;
                let node = node_table
                    .get(NODE_KEY)?
                    .map(|v| decode::<NodeRecord>(v.value()));
                if let Some(node) = node {
                    let mut node = node?;
                    node.alloc_reserved = node.alloc_reserved.max(reserved);
                    node_table.insert(NODE_KEY, encode(&node)?.as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdisks_disks_and_checkpoints_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.redb");
        let disk_id = Uuid::new_v4();
        let node_id;
        {
            let catalog = Catalog::open(&path).expect("open");
            node_id = catalog.load().expect("load").node.node_id;
            let a = catalog
                .create_vdisk(None, "a", 1 << 30, 1)
                .expect("create a");
            let b = catalog
                .create_vdisk(None, "b", 1 << 20, 2)
                .expect("create b");
            assert_ne!(a.id, b.id);
            assert!(matches!(
                catalog.create_vdisk(None, "a", 4096, 3),
                Err(StoreError::VdiskExists(_))
            ));
            catalog
                .put_disk(&DiskRecord {
                    id: disk_id,
                    path: "/x".into(),
                    bytes: 1 << 30,
                    added: 0,
                    tail_pos: 0,
                    tail_lsn: 1,
                    clean: false,
                })
                .expect("disk");
            let row = ExtentRow {
                disk: disk_id,
                slot: 9,
                alloc_id: 5,
                persisted: true,
            };
            catalog
                .checkpoint(&Checkpoint {
                    disk_tails: vec![(disk_id, 8192, 7, true)],
                    extent_changes: vec![
                        ((a.id, 0), Some(row)),
                        ((a.id, 1), Some(row)),
                        ((a.id, 1), None),
                        ((b.id, 3), Some(row)),
                    ],
                    gen_reserved: vec![(a.id, INITIAL_GEN_RESERVATION + 1000)],
                    alloc_reserved: Some(77),
                })
                .expect("checkpoint");
            catalog.delete_vdisk(b.id).expect("delete");
            assert!(matches!(
                catalog.delete_vdisk(b.id),
                Err(StoreError::NoSuchVdisk(_))
            ));
        }
        let catalog = Catalog::open(&path).expect("reopen");
        let snap = catalog.load().expect("load");
        assert_eq!(snap.node.node_id, node_id);
        assert_eq!(snap.node.alloc_reserved, 77);
        assert_eq!(snap.vdisks.len(), 1);
        assert_eq!(snap.vdisks[0].gen_reserved, INITIAL_GEN_RESERVATION + 1000);
        assert_eq!(snap.extents.len(), 1);
        assert_eq!(snap.extents[0].0, (snap.vdisks[0].id, 0));
        assert_eq!(snap.disks[0].tail_pos, 8192);
        assert!(snap.disks[0].clean);
        // A new vdisk never reuses a deleted id.
        let c = catalog
            .create_vdisk(None, "b", 4096, 4)
            .expect("create again");
        assert_eq!(c.id, 3);
        // Ids the cluster assigns are kept, never taken twice, and move the
        // local counter past them.
        let d = catalog
            .create_vdisk(Some(10), "d", 4096, 5)
            .expect("create with an id");
        assert_eq!(d.id, 10);
        assert!(matches!(
            catalog.create_vdisk(Some(10), "e", 4096, 5),
            Err(StoreError::VdiskExists(_))
        ));
        let f = catalog.create_vdisk(None, "f", 4096, 6).expect("create");
        assert_eq!(f.id, 11);
    }
}

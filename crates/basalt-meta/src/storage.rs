//! Raft's durable state: the log and vote in redb, the state machine in
//! memory with snapshots in a file.
//!
//! The log store is a redb database (`raft.redb`) of its own, apart from the
//! node's storage catalog, so that Raft's fsyncs never wait behind the
//! store's checkpoints and vice versa. Every append, vote and truncation is
//! one redb transaction committed with immediate durability before openraft
//! is told it is done.
//!
//! The state machine (the [`ClusterState`]) is small — members, vdisks,
//! placement — and lives in memory. It is made durable by snapshots: a
//! snapshot is written to a temporary file, synced and renamed over
//! `raft-snapshot.json`. After a restart the state machine starts from the
//! last snapshot and openraft re-applies the committed log entries after it
//! (the committed index is saved with the log for that purpose).

// openraft's trait methods return its `StorageError` (over 200 bytes); the
// helpers here return the same type rather than boxing and unboxing it.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, CommandResult, NodeId};
use crate::{MetaError, Node, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// File holding the latest snapshot of the state machine.
pub const SNAPSHOT_FILE: &str = "raft-snapshot.json";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn read_error(error: impl Into<openraft::AnyError>) -> StorageError<NodeId> {
    StorageIOError::read_logs(error).into()
}

fn write_error(error: impl Into<openraft::AnyError>) -> StorageError<NodeId> {
    StorageIOError::write_logs(error).into()
}

fn any(error: impl std::error::Error + 'static) -> openraft::AnyError {
    openraft::AnyError::new(&error)
}

/// The Raft log and vote, in redb.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (or creates) the log database at `path`.
    pub fn open(path: &Path) -> Result<LogStore, MetaError> {
        let db = Database::create(path).map_err(|e| MetaError::Storage(e.to_string()))?;
        let txn = db
            .begin_write()
            .map_err(|e| MetaError::Storage(e.to_string()))?;
        {
            txn.open_table(LOG)
                .map_err(|e| MetaError::Storage(e.to_string()))?;
            txn.open_table(META)
                .map_err(|e| MetaError::Storage(e.to_string()))?;
        }
        txn.commit()
            .map_err(|e| MetaError::Storage(e.to_string()))?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// Runs blocking redb work off the async workers.
    async fn blocking<T, F>(&self, work: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> StorageResult<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| read_error(any(e)))?
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(
        db: &Database,
        key: &str,
    ) -> StorageResult<Option<T>> {
        let txn = db.begin_read().map_err(|e| read_error(any(e)))?;
        let table = txn.open_table(META).map_err(|e| read_error(any(e)))?;
        let Some(value) = table.get(key).map_err(|e| read_error(any(e)))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| read_error(any(e)))
    }

    fn put_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> StorageResult<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| write_error(any(e)))?;
        let txn = db.begin_write().map_err(|e| write_error(any(e)))?;
        {
            let mut table = txn.open_table(META).map_err(|e| write_error(any(e)))?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| write_error(any(e)))?;
        }
        txn.commit().map_err(|e| write_error(any(e)))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| read_error(any(e)))?;
            let table = txn.open_table(LOG).map_err(|e| read_error(any(e)))?;
            let mut entries = Vec::new();
            for item in table
                .range::<u64>((start, end))
                .map_err(|e| read_error(any(e)))?
            {
                let (_, value) = item.map_err(|e| read_error(any(e)))?;
                let entry: Entry<TypeConfig> =
                    serde_json::from_slice(value.value()).map_err(|e| read_error(any(e)))?;
                entries.push(entry);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        self.blocking(|db| {
            let last_purged: Option<LogId<NodeId>> = LogStore::get_meta(db, KEY_PURGED)?;
            let txn = db.begin_read().map_err(|e| read_error(any(e)))?;
            let table = txn.open_table(LOG).map_err(|e| read_error(any(e)))?;
            let last = match table.last().map_err(|e| read_error(any(e)))? {
                Some((_, value)) => {
                    let entry: Entry<TypeConfig> =
                        serde_json::from_slice(value.value()).map_err(|e| read_error(any(e)))?;
                    Some(entry.log_id)
                }
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let vote = *vote;
        self.blocking(move |db| {
            LogStore::put_meta(db, KEY_VOTE, &vote)
                .map_err(|e| StorageIOError::write_vote(any(e)).into())
        })
        .await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.blocking(|db| LogStore::get_meta(db, KEY_VOTE)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.blocking(move |db| LogStore::put_meta(db, KEY_COMMITTED, &committed))
            .await
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        self.blocking(|db| {
            Ok(LogStore::get_meta::<Option<LogId<NodeId>>>(db, KEY_COMMITTED)?.flatten())
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|entry| {
                serde_json::to_vec(&entry)
                    .map(|bytes| (entry.log_id.index, bytes))
                    .map_err(|e| write_error(any(e)))
            })
            .collect::<StorageResult<Vec<_>>>()?;
        let result = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(|e| write_error(any(e)))?;
                {
                    let mut table = txn.open_table(LOG).map_err(|e| write_error(any(e)))?;
                    for (index, bytes) in &encoded {
                        table
                            .insert(*index, bytes.as_slice())
                            .map_err(|e| write_error(any(e)))?;
                    }
                }
                txn.commit().map_err(|e| write_error(any(e)))
            })
            .await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(error) => callback.log_io_completed(Err(std::io::Error::other(error.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(|e| write_error(any(e)))?;
            {
                let mut table = txn.open_table(LOG).map_err(|e| write_error(any(e)))?;
                table
                    .retain_in(log_id.index.., |_, _| false)
                    .map_err(|e| write_error(any(e)))?;
            }
            txn.commit().map_err(|e| write_error(any(e)))
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.blocking(move |db| {
            let bytes = serde_json::to_vec(&log_id).map_err(|e| write_error(any(e)))?;
            let txn = db.begin_write().map_err(|e| write_error(any(e)))?;
            {
                let mut meta = txn.open_table(META).map_err(|e| write_error(any(e)))?;
                meta.insert(KEY_PURGED, bytes.as_slice())
                    .map_err(|e| write_error(any(e)))?;
                let mut table = txn.open_table(LOG).map_err(|e| write_error(any(e)))?;
                table
                    .retain_in(..=log_id.index, |_, _| false)
                    .map_err(|e| write_error(any(e)))?;
            }
            txn.commit().map_err(|e| write_error(any(e)))
        })
        .await
    }
}

/// What a snapshot holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, Node>,
    cluster: ClusterState,
}

struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    cluster: ClusterState,
}

struct MachineInner {
    applied: RwLock<Applied>,
    dir: PathBuf,
    current: Mutex<Option<SnapshotFile>>,
    snapshots_built: Mutex<u64>,
    /// Told the new state after every apply and snapshot install.
    changes: tokio::sync::watch::Sender<Arc<ClusterState>>,
}

/// The cluster state machine.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<MachineInner>,
}

impl StateMachine {
    /// Opens the state machine whose snapshots live in `dir`, starting from
    /// the latest snapshot if there is one.
    pub fn open(dir: &Path) -> Result<StateMachine, MetaError> {
        let path = dir.join(SNAPSHOT_FILE);
        let current: Option<SnapshotFile> = match std::fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                MetaError::Storage(format!("snapshot {} is unreadable: {e}", path.display()))
            })?),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(MetaError::Io(error)),
        };
        let applied = match &current {
            Some(snapshot) => Applied {
                last_applied: snapshot.meta.last_log_id,
                membership: snapshot.meta.last_membership.clone(),
                cluster: snapshot.cluster.clone(),
            },
            None => Applied {
                last_applied: None,
                membership: StoredMembership::default(),
                cluster: ClusterState::default(),
            },
        };
        let (changes, _) = tokio::sync::watch::channel(Arc::new(applied.cluster.clone()));
        Ok(StateMachine {
            inner: Arc::new(MachineInner {
                applied: RwLock::new(applied),
                dir: dir.to_path_buf(),
                current: Mutex::new(current),
                snapshots_built: Mutex::new(0),
                changes,
            }),
        })
    }

    /// A copy of the current cluster state.
    pub fn cluster(&self) -> ClusterState {
        self.inner.applied.read().cluster.clone()
    }

    /// How many members the cluster has (without copying the state).
    pub fn cluster_members(&self) -> usize {
        self.inner.applied.read().cluster.nodes.len()
    }

    /// Notified with the new state after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<ClusterState>> {
        self.inner.changes.subscribe()
    }

    fn publish(&self) {
        let state = Arc::new(self.inner.applied.read().cluster.clone());
        self.inner.changes.send_replace(state);
    }

    fn persist(&self, snapshot: &SnapshotFile) -> Result<(), std::io::Error> {
        let bytes = serde_json::to_vec(snapshot).map_err(std::io::Error::other)?;
        crate::replace_file_durably(&self.inner.dir.join(SNAPSHOT_FILE), &bytes)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let snapshot = {
            let applied = self.inner.applied.read();
            let mut built = self.inner.snapshots_built.lock();
            *built += 1;
            let snapshot_id = match applied.last_applied {
                Some(log_id) => format!("{}-{}-{}", log_id.leader_id, log_id.index, *built),
                None => format!("none-{}", *built),
            };
            SnapshotFile {
                meta: SnapshotMeta {
                    last_log_id: applied.last_applied,
                    last_membership: applied.membership.clone(),
                    snapshot_id,
                },
                cluster: applied.cluster.clone(),
            }
        };
        let bytes = serde_json::to_vec(&snapshot.cluster)
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?;
        let machine = self.clone();
        let to_store = snapshot.clone();
        tokio::task::spawn_blocking(move || machine.persist(&to_store))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?;
        let meta = snapshot.meta.clone();
        *self.inner.current.lock() = Some(snapshot);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        let applied = self.inner.applied.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        {
            let mut applied = self.inner.applied.write();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::Done,
                    EntryPayload::Normal(command) => applied.cluster.apply(&command),
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        CommandResult::Done
                    }
                };
                results.push(result);
            }
        }
        self.publish();
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let cluster: ClusterState = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), any(e)))?;
        let file = SnapshotFile {
            meta: meta.clone(),
            cluster: cluster.clone(),
        };
        let machine = self.clone();
        let to_store = file.clone();
        tokio::task::spawn_blocking(move || machine.persist(&to_store))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?;
        {
            let mut applied = self.inner.applied.write();
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
            applied.cluster = cluster;
        }
        *self.inner.current.lock() = Some(file);
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let current = self.inner.current.lock().clone();
        match current {
            None => Ok(None),
            Some(file) => {
                let bytes = serde_json::to_vec(&file.cluster)
                    .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?;
                Ok(Some(Snapshot {
                    meta: file.meta,
                    snapshot: Box::new(Cursor::new(bytes)),
                }))
            }
        }
    }
}

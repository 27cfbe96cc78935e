//! Vhost-user exports made by hand outlive a basaltd restart.
//!
//! An operator may export a vdisk (`basalt vdisk export NAME --vhost`) to a
//! QEMU that Basalt does not run. When basaltd restarts under it (an
//! upgrade, a crash, `kill -9`), that QEMU keeps running and reconnects to
//! the socket (`reconnect=1`) as soon as the socket is served again. Basalt's
//! own VMs get their exports back when the supervisor adopts their QEMU
//! processes; exports made by hand get theirs back from a record per export:
//! `DATA_DIR/vhost-exports/NAME.export`, written durably before the export
//! is reported to the operator and removed by `basalt vdisk unexport` and
//! `basalt vdisk delete`.
//!
//! The record also holds the guest's write-cache choice (`write-back` or
//! `write-through`). QEMU shows its guest the mode it read when it started,
//! changed only by the guest, for as long as it runs: a guest that turned its
//! disk's write cache off sends no FLUSH, so the export that comes back must
//! keep making each write durable before answering it.
//!
//! A recorded vdisk that a VM of the cluster now uses, or that another node
//! (up) serves by now, is not exported again: its record is dropped with a
//! warning, and the operator exports it again by hand if that is still
//! meant. A recorded vdisk this node does not know (yet) waits until it
//! does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use basalt_vhost::{WriteCache, WriteCacheKeeper};

use crate::ControlError;
use crate::node::Node;

/// Directory (in the data directory) of the records of exports made by hand.
const DIR: &str = "vhost-exports";

/// Where the previous version kept only write-through choices
/// (`NAME.write-through`); read once and turned into records.
const LEGACY_DIR: &str = "vhost-write-through";

/// File name suffix of a record.
const SUFFIX: &str = ".export";

/// How long one attempt to catch up with the cluster's state may take.
const CATCH_UP: Duration = Duration::from_secs(10);

/// How often a start-up with recorded exports still waiting for their vdisks
/// looks again when the cluster state does not change.
const RETRY: Duration = Duration::from_secs(5);

/// The record of one export made by hand.
struct Record {
    path: PathBuf,
}

impl Record {
    fn new(data_dir: &Path, name: &str) -> Record {
        Record {
            path: data_dir.join(DIR).join(format!("{name}{SUFFIX}")),
        }
    }

    /// The recorded write-cache choice: `None` without a record. Anything
    /// but `write-back` reads as write-through, the mode that cannot lose an
    /// answered write.
    fn read(&self) -> Result<Option<bool>, ControlError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(Some(text.trim() != "write-back")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ControlError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Writes the record durably (its directory too).
    fn write(&self, write_through: bool) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text: &[u8] = if write_through {
            b"write-through\n"
        } else {
            b"write-back\n"
        };
        basalt_meta::replace_file_durably(&self.path, text)
    }

    fn remove(&self) -> std::io::Result<()> {
        basalt_meta::remove_file_durably(&self.path)
    }
}

/// Keeps a hand-made export's record in step with its guest's write-cache
/// choice (called before the guest hears back).
struct RecordKeeper {
    record: Record,
}

impl WriteCacheKeeper for RecordKeeper {
    fn record(&self, write_through: bool) -> Result<(), String> {
        self.record.write(write_through).map_err(|e| {
            format!(
                "recording the guest's cache mode in {}: {e}",
                self.record.path.display()
            )
        })
    }
}

impl Node {
    /// Records a new export by hand of `name` and returns its write cache
    /// (write-through if the guest of the vdisk's last export by hand chose
    /// it and nobody unexported the vdisk since) and whether the record is
    /// new.
    pub(crate) fn record_hand_export(
        &self,
        name: &str,
    ) -> Result<(WriteCache, bool), ControlError> {
        let record = Record::new(&self.config.data_dir, name);
        let before = record.read()?;
        let write_through = before.unwrap_or(false);
        if write_through {
            tracing::info!(
                name,
                "the guest of this vdisk's last export chose write-through; the new export starts so"
            );
        }
        record
            .write(write_through)
            .map_err(|source| ControlError::Io {
                path: record.path.clone(),
                source,
            })?;
        Ok((
            WriteCache::new(write_through, Some(Arc::new(RecordKeeper { record }))),
            before.is_none(),
        ))
    }

    /// Forgets the export by hand of `name`: a restart does not bring it
    /// back, and the next export starts at write-back.
    pub(crate) fn forget_hand_export(&self, name: &str) {
        let record = Record::new(&self.config.data_dir, name);
        if let Err(error) = record.remove() {
            tracing::warn!(name, path = %record.path.display(), %error, "could not forget the export by hand");
        }
    }

    /// Exports again what `waiting` names, as far as this node can yet;
    /// returns what still waits for its vdisk.
    fn restore_hand_exports(&self, waiting: BTreeSet<String>) -> BTreeSet<String> {
        let state = self.cluster().cluster();
        let mut still = BTreeSet::new();
        for name in waiting {
            if self.vhost_exported(&name) {
                continue;
            }
            if let Some(vm) = state.vm_using(&name) {
                tracing::warn!(
                    vdisk = %name,
                    vm = %vm.spec.name,
                    "not exporting a vdisk by hand again: a VM uses it now"
                );
                self.forget_hand_export(&name);
                continue;
            }
            let Some(record) = state.vdisk_by_name(&name) else {
                still.insert(name);
                continue;
            };
            if let Some(owner) = record.owner
                && owner != self.node_id()
                && state.is_up(owner)
            {
                // A client took the vdisk over on another node while this
                // one was down; exporting it here again would let the old
                // QEMU, reconnecting, take it back from under that client.
                tracing::warn!(
                    vdisk = %name,
                    owner,
                    "not exporting a vdisk by hand again: another node serves it now"
                );
                self.forget_hand_export(&name);
                continue;
            }
            match self.export_vhost(&name) {
                Ok(export) => {
                    tracing::info!(vdisk = %name, socket = %export.socket, "exported a vdisk by hand again after a restart");
                }
                Err(error) => {
                    tracing::warn!(vdisk = %name, %error, "cannot export a vdisk by hand again; retrying");
                    still.insert(name);
                }
            }
        }
        still
    }
}

/// The vdisks with a record in `data_dir`, after turning the previous
/// version's write-through files into records (write-through ones).
fn recorded(data_dir: &Path) -> BTreeSet<String> {
    if let Ok(entries) = std::fs::read_dir(data_dir.join(LEGACY_DIR)) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".write-through") else {
                continue;
            };
            let record = Record::new(data_dir, name);
            let moved = match record.read() {
                Ok(Some(_)) => Ok(()),
                _ => record.write(true),
            }
            .and_then(|()| basalt_meta::remove_file_durably(&entry.path()));
            if let Err(error) = moved {
                tracing::warn!(name, %error, "could not take over an earlier write-through record");
            }
        }
        let _ = std::fs::remove_dir(data_dir.join(LEGACY_DIR));
    }
    let Ok(entries) = std::fs::read_dir(data_dir.join(DIR)) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name().to_string_lossy().into_owned();
            file.strip_suffix(SUFFIX).map(str::to_string)
        })
        .collect()
}

/// Brings back this node's exports made by hand once it is a member of its
/// cluster, and keeps trying for those whose vdisk it does not know yet.
pub(crate) async fn restore_forever(node: Weak<Node>) {
    let Some(mut changes) = node.upgrade().map(|n| n.cluster().subscribe()) else {
        return;
    };
    let mut waiting: Option<BTreeSet<String>> = None;
    let mut reported = false;
    loop {
        let state = changes.borrow_and_update().clone();
        {
            let Some(node) = node.upgrade() else { return };
            if node.node_id() != 0 && !state.cluster_id.is_nil() {
                let todo = waiting
                    .take()
                    .unwrap_or_else(|| recorded(&node.config.data_dir));
                if todo.is_empty() {
                    return;
                }
                // Decide on the cluster's current state, not on what this
                // node last knew before it went down.
                if let Err(error) = node.cluster().catch_up(CATCH_UP).await {
                    tracing::info!(%error, "exports by hand wait until this node has caught up with its cluster");
                    waiting = Some(todo);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                let still = node.restore_hand_exports(todo);
                if still.is_empty() {
                    return;
                }
                if !reported {
                    tracing::warn!(vdisks = ?still, "exports by hand wait for vdisks this node does not know yet");
                    reported = true;
                }
                waiting = Some(still);
            }
        }
        let _ = tokio::time::timeout(RETRY, changes.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_keeps_the_guests_choice_and_reads_unknown_text_as_write_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Record::new(dir.path(), "db");
        assert_eq!(record.read().expect("read"), None);
        record.write(false).expect("write");
        assert_eq!(record.read().expect("read"), Some(false));
        let keeper = RecordKeeper {
            record: Record::new(dir.path(), "db"),
        };
        keeper.record(true).expect("keep");
        assert_eq!(record.read().expect("read"), Some(true));
        std::fs::write(&record.path, b"garbage").expect("overwrite");
        assert_eq!(record.read().expect("read"), Some(true));
        record.remove().expect("remove");
        assert_eq!(record.read().expect("read"), None);
    }

    #[test]
    fn the_previous_versions_write_through_files_become_write_through_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(recorded(dir.path()).is_empty(), "no records, no directory");
        Record::new(dir.path(), "kept").write(false).expect("write");
        let legacy = dir.path().join(LEGACY_DIR);
        std::fs::create_dir_all(&legacy).expect("mkdir");
        std::fs::write(legacy.join("old.write-through"), b"write-through\n").expect("write");
        std::fs::write(legacy.join("stray.txt"), b"?").expect("write");
        let names: Vec<String> = recorded(dir.path()).into_iter().collect();
        assert_eq!(names, ["kept", "old"]);
        assert_eq!(
            Record::new(dir.path(), "old").read().expect("read"),
            Some(true)
        );
        assert_eq!(
            Record::new(dir.path(), "kept").read().expect("read"),
            Some(false)
        );
        assert!(!legacy.join("old.write-through").exists());
    }
}

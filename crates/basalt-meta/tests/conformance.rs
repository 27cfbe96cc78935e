//! openraft's storage conformance suite, run against Basalt's Raft storage
//! (redb log store, snapshotting state machine).

use basalt_meta::TypeConfig;
use basalt_meta::storage::{LogStore, StateMachine};
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let io = |e: std::io::Error| StorageError::from(openraft::StorageIOError::write(&e));
        let dir = tempfile::tempdir().map_err(io)?;
        let log = LogStore::open(&dir.path().join("raft.redb"))
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let machine =
            StateMachine::open(dir.path()).map_err(|e| io(std::io::Error::other(e.to_string())))?;
        Ok((dir, log, machine))
    }
}

#[test]
fn openraft_storage_suite() -> anyhow::Result<()> {
    Suite::test_all(Builder).map_err(|error| anyhow::anyhow!("{error}"))
}

//! Copy-on-write data torn by a power cut, with later records of the same
//! extent in the oplog.
//!
//! Replay skips a copy-on-write record (a remap, or a part of a rewrite in
//! parts) that never became durable and whose data did not all land. Blocks
//! that a later record rewrites need no check, but only if replay applies
//! that later record: a later copy-on-write that is torn as well vouches for
//! nothing. These tests tear both and expect the extent's durable contents.

mod common;

use std::time::Duration;

use basalt_disk::sim::{CutMode, SimDisk};
use basalt_store::Store;
use common::*;

const EXTENT_BLOCKS: u64 = 256;

/// A store whose drainer never runs by itself during a test: nothing is
/// synced or checkpointed except by an explicit flush.
async fn open_quiet(dir: &std::path::Path, disk: &SimDisk) -> Store {
    let mut config = config(dir);
    config.drain_interval = Duration::from_secs(3600);
    config.checkpoint_replaced_slots = 1 << 20;
    config.memory_budget = 256 << 20;
    open_configured(config, disk.engine()).await
}

/// Vdisk "v" on `store` whose extent 0 holds tag 1, durable.
async fn durable_extent(store: &Store) -> u64 {
    let v = store.create_vdisk("v", 4 << 20).await.expect("create").id;
    store
        .write(v, 0, buffer(1, 0, EXTENT_BLOCKS), false)
        .await
        .expect("whole extent");
    store.flush().await.expect("flush");
    // The space of the next slots is reserved in the background; a rewrite
    // in parts only takes a slot whose space is.
    tokio::time::sleep(Duration::from_millis(50)).await;
    v
}

/// Where block `block` of extent 0 lives now.
async fn block_offset(store: &Store, v: u64, block: u64) -> u64 {
    store.locate(v, block).await.expect("mapped").1
}

/// Every write survives the cut; then `damaged` blocks are overwritten, as
/// if their writes had been torn.
fn cut_and_damage(disk: &SimDisk, damaged: &[u64]) {
    disk.power_cut(CutMode::KeepUnsynced);
    for &offset in damaged {
        disk.corrupt(offset, &[0xA5; BLOCK]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_remap_is_not_vouched_for_by_a_later_torn_remap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let store = open_quiet(dir.path(), &disk).await;
    let v = durable_extent(&store).await;
    store
        .write(v, 0, buffer(2, 0, EXTENT_BLOCKS), false)
        .await
        .expect("second write");
    let first = block_offset(&store, v, 5).await;
    store
        .write(v, 0, buffer(3, 0, EXTENT_BLOCKS), false)
        .await
        .expect("third write");
    let second = block_offset(&store, v, 9).await;
    assert_ne!(first - 5 * 4096, second - 9 * 4096, "two slots");
    store.halt().await;
    cut_and_damage(&disk, &[first, second]);

    let store = open_sim(dir.path(), &disk).await;
    let tags = read_tags(&store, v, 0, EXTENT_BLOCKS).await;
    assert_eq!(tags, vec![1; EXTENT_BLOCKS as usize], "the durable write");
    store.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_rewrite_in_parts_is_not_vouched_for_by_a_later_torn_remap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let store = open_quiet(dir.path(), &disk).await;
    let v = durable_extent(&store).await;
    let before = block_offset(&store, v, 130).await;
    for (first, n) in [(0, 126), (126, 126), (252, 4)] {
        store
            .write(v, first, buffer(2, first, n), false)
            .await
            .expect("part");
    }
    assert_eq!(
        read_tags(&store, v, 0, EXTENT_BLOCKS).await,
        vec![2; EXTENT_BLOCKS as usize]
    );
    // The rewrite is whole: the extent lives in its slot now.
    let shadow = block_offset(&store, v, 130).await;
    assert_ne!(shadow, before, "the rewrite in parts moved the extent");
    store
        .write(v, 0, buffer(3, 0, EXTENT_BLOCKS), false)
        .await
        .expect("whole write");
    let remapped = block_offset(&store, v, 9).await;
    store.halt().await;
    cut_and_damage(&disk, &[shadow, remapped]);

    // The second part is dropped, the parts beside it count as writes of
    // their own: each block reads its durable value or the rewrite's.
    let store = open_sim(dir.path(), &disk).await;
    let tags = read_tags(&store, v, 0, EXTENT_BLOCKS).await;
    for (block, &tag) in tags.iter().enumerate() {
        assert!(tag == 1 || tag == 2, "block {block} reads tag {tag}");
    }
    assert_eq!(tags[130], 1, "the damaged part is not applied");
    store.shutdown().await.expect("shutdown");
}

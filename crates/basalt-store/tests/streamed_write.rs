//! A whole-extent write taken from a source (`Store::write_from`) is copied
//! and sent to the disk in pieces. These tests check that it reads back like
//! any write, that a power cut with only some pieces on the disk keeps the
//! old contents, and that a source failing half-way changes nothing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use basalt_disk::sim::{CutMode, SimDisk};
use basalt_store::{Store, StoreError};
use common::*;

const EXTENT_BLOCKS: u64 = 256;
/// The size of the pieces a streamed extent write is sent in.
const PIECE: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_extent_write_reads_back_and_survives_a_power_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let store = open_sim(dir.path(), &disk).await;
    let v = store.create_vdisk("v", 4 << 20).await.expect("create").id;
    let cow_before = store.stats().cow_writes.load(Ordering::Relaxed);

    let mut source = TagSource::new(2, EXTENT_BLOCKS, EXTENT_BLOCKS);
    store
        .write_from(v, EXTENT_BLOCKS, EXTENT_BLOCKS, &mut source, false)
        .await
        .expect("streamed write");
    assert_eq!(source.calls, EXTENT_BLOCKS as usize * BLOCK / PIECE);
    assert_eq!(
        store.stats().cow_writes.load(Ordering::Relaxed),
        cow_before + 1,
        "a whole extent goes copy-on-write"
    );
    // Not an extent, and more than one: copied whole, written as usual.
    let mut partial = TagSource::new(3, 5, 3);
    store
        .write_from(v, 5, 3, &mut partial, false)
        .await
        .expect("partial write");
    let mut two = TagSource::new(4, 2 * EXTENT_BLOCKS, 2 * EXTENT_BLOCKS);
    store
        .write_from(v, 2 * EXTENT_BLOCKS, 2 * EXTENT_BLOCKS, &mut two, false)
        .await
        .expect("two extents");
    assert_eq!((partial.calls, two.calls), (1, 1));

    let check = |store: Store| async move {
        assert_eq!(
            read_tags(&store, v, EXTENT_BLOCKS, EXTENT_BLOCKS).await,
            vec![2; EXTENT_BLOCKS as usize]
        );
        assert_eq!(read_tags(&store, v, 4, 5).await, vec![0, 3, 3, 3, 0]);
        assert_eq!(
            read_tags(&store, v, 2 * EXTENT_BLOCKS, 2 * EXTENT_BLOCKS).await,
            vec![4; 2 * EXTENT_BLOCKS as usize]
        );
        store
    };
    let store = check(store).await;
    store.flush().await.expect("flush");
    store.halt().await;
    disk.power_cut(CutMode::DropUnsynced);
    let store = check(open_sim(dir.path(), &disk).await).await;
    store.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_failing_half_way_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let store = open_sim(dir.path(), &disk).await;
    let v = vdisk_with_extent_one(&store).await;
    let free_before = basalt_store::free_slots_for_tests(&store);

    let mut failing = TagSource::new(2, EXTENT_BLOCKS, EXTENT_BLOCKS);
    failing.fail_at = Some(2);
    let err = store
        .write_from(v, EXTENT_BLOCKS, EXTENT_BLOCKS, &mut failing, false)
        .await
        .expect_err("the source failed");
    assert!(matches!(err, StoreError::Source(_)), "{err}");
    assert_eq!(
        read_tags(&store, v, EXTENT_BLOCKS, EXTENT_BLOCKS).await,
        vec![1; EXTENT_BLOCKS as usize]
    );
    // The slot the pieces went to comes back once they have landed.
    tokio::time::timeout(Duration::from_secs(5), async {
        while basalt_store::free_slots_for_tests(&store) != free_before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the slot of the failed write is free again");

    // The store goes on serving, the extent included.
    let mut next = TagSource::new(3, EXTENT_BLOCKS, EXTENT_BLOCKS);
    store
        .write_from(v, EXTENT_BLOCKS, EXTENT_BLOCKS, &mut next, false)
        .await
        .expect("next write");
    store.flush().await.expect("flush");
    store.halt().await;
    disk.power_cut(CutMode::DropUnsynced);
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(
        read_tags(&store, v, EXTENT_BLOCKS, EXTENT_BLOCKS).await,
        vec![3; EXTENT_BLOCKS as usize]
    );
    store.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_with_some_pieces_on_the_disk_keeps_the_old_contents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    // Piece-sized writes after the first two wait at the gate when it is
    // closed.
    let pieces = Arc::new(AtomicU64::new(0));
    let counted = pieces.clone();
    let (engine, hooks) = hooked(&disk, move |len| {
        len == PIECE && counted.fetch_add(1, Ordering::SeqCst) >= 2
    });
    let gate = hooks.gate;
    let store = open_engine(dir.path(), engine).await;
    let v = vdisk_with_extent_one(&store).await;
    store.flush().await.expect("flush");

    // Two pieces reach the disk, two are held.
    gate.send_replace(false);
    let writer = store.clone();
    let write = tokio::spawn(async move {
        let mut source = TagSource::new(2, EXTENT_BLOCKS, EXTENT_BLOCKS);
        writer
            .write_from(v, EXTENT_BLOCKS, EXTENT_BLOCKS, &mut source, false)
            .await
    });
    tokio::time::timeout(Duration::from_secs(5), async {
        while pieces.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("all four pieces reach the disk");
    // Let the writer queue its remap record.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !write.is_finished(),
        "acknowledged before all pieces landed"
    );
    // A flush syncs the remap record but does not vouch for it.
    tokio::time::timeout(Duration::from_secs(5), store.flush())
        .await
        .expect("a flush does not wait for an unacknowledged write")
        .expect("flush");

    disk.power_cut(CutMode::DropUnsynced);
    gate.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
    store.halt().await;

    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(
        read_tags(&store, v, EXTENT_BLOCKS, EXTENT_BLOCKS).await,
        vec![1; EXTENT_BLOCKS as usize],
        "a half-landed extent write must leave the old contents"
    );
    store.halt().await;
}

/// A store on a simulated disk of `disk_bytes` with the drain timer out of
/// reach and a checkpoint asked for every `replaced_slots` replaced slots,
/// and a vdisk of four extents on it.
async fn store_without_timed_drains(
    dir: &std::path::Path,
    disk_bytes: u64,
    replaced_slots: usize,
) -> (Store, u64) {
    let disk = SimDisk::new(disk_bytes);
    let mut config = config(dir);
    config.drain_interval = Duration::from_secs(3600);
    config.checkpoint_replaced_slots = replaced_slots;
    let store = open_sim_with(config, &disk).await;
    let v = store.create_vdisk("v", 4 << 20).await.expect("create").id;
    (store, v)
}

/// Overwrites extent `tag % 4` of vdisk `v` whole with `tag`, streamed.
async fn overwrite_extent(store: &Store, v: u64, tag: u64) {
    let extent = tag % 4;
    let mut source = TagSource::new(tag, extent * EXTENT_BLOCKS, EXTENT_BLOCKS);
    store
        .write_from(v, extent * EXTENT_BLOCKS, EXTENT_BLOCKS, &mut source, false)
        .await
        .expect("overwrite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_slots_ask_for_a_checkpoint_before_the_timer_does() {
    // Without the ask, a stream of whole-extent overwrites keeps taking
    // never-used slots until the next timed drain frees the replaced ones.
    // (128 MiB: an eighth of its slots is more than the 8 asked for here.)
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, v) = store_without_timed_drains(dir.path(), 128 << 20, 8).await;
    // Creating the vdisk and the first tenancies ask for nothing.
    for tag in 1..=4 {
        overwrite_extent(&store, v, tag).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let free = || basalt_store::free_slots_for_tests(&store).len();
    let before = free();
    for tag in 5..=11 {
        overwrite_extent(&store, v, tag).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        free(),
        before - 7,
        "seven replaced slots already asked for a checkpoint"
    );
    overwrite_extent(&store, v, 12).await;
    // The checkpoint frees the replaced slots its cycle covers: at least
    // the seven before the last write.
    tokio::time::timeout(Duration::from_secs(5), async {
        while free() < before - 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the eighth replaced slot asks for a checkpoint");
    for (extent, tag) in [(0u64, 12u64), (1, 9), (2, 10), (3, 11)] {
        assert_eq!(
            read_tags(&store, v, extent * EXTENT_BLOCKS, EXTENT_BLOCKS).await,
            vec![tag; EXTENT_BLOCKS as usize]
        );
    }
    store.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_disk_asks_for_a_checkpoint_after_an_eighth_of_its_slots() {
    // The configured count is out of reach of a 64 MiB disk (about 60
    // slots): without the cap at an eighth of the slots, a stream of
    // overwrites would use up the free slots until the timed drain.
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, v) = store_without_timed_drains(dir.path(), 64 << 20, usize::MAX).await;
    for tag in 1..=4 {
        overwrite_extent(&store, v, tag).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let free = || basalt_store::free_slots_for_tests(&store).len();
    let before = free();
    assert!(before > 40, "a 64 MiB disk has {before} free slots");
    let quarter = before as u64 / 4;
    for tag in 5..5 + quarter {
        overwrite_extent(&store, v, tag).await;
    }
    // Checkpoints asked for after each eighth give the replaced slots back.
    tokio::time::timeout(Duration::from_secs(5), async {
        while free() + before / 8 + 1 < before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("replaced slots come free long before the timed drain");
    let last = 4 + quarter;
    for extent in 0..4u64 {
        // The newest tag written to this extent.
        let tag = (last - 3..=last)
            .find(|t| t % 4 == extent)
            .expect("a tag per extent");
        assert_eq!(
            read_tags(&store, v, extent * EXTENT_BLOCKS, EXTENT_BLOCKS).await,
            vec![tag; EXTENT_BLOCKS as usize]
        );
    }
    store.halt().await;
}

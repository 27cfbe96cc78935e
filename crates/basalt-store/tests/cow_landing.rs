//! A whole-extent (copy-on-write) write sends its data and its remap record
//! to the disk at the same time. These tests hold the data write back on a
//! gate and check what must hold meanwhile: reads never see the unwritten
//! slot, the write is not acknowledged, a flush does not vouch for the remap,
//! and a power cut keeps the old contents.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use basalt_disk::sim::{CutMode, SimDisk};
use basalt_store::Store;
use common::*;
use tokio::sync::watch;

const EXTENT_BLOCKS: u64 = 256;

struct Gated {
    store: Store,
    gate: watch::Sender<bool>,
    /// Writes of a whole extent or more (copy-on-write data) that reached
    /// the disk, held at the gate or not; everything else passes straight
    /// through.
    large_writes: Arc<AtomicU64>,
}

async fn open_gated(dir: &std::path::Path, disk: &SimDisk) -> Gated {
    let large_writes = Arc::new(AtomicU64::new(0));
    let counted = large_writes.clone();
    let (engine, hooks) = hooked(disk, move |len| {
        let large = len >= (EXTENT_BLOCKS as usize) * BLOCK;
        if large {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        large
    });
    Gated {
        store: open_engine(dir, engine).await,
        gate: hooks.gate,
        large_writes,
    }
}

/// A gated store with one vdisk whose extent 1 holds tag 1, flushed.
async fn gated_with_first_write(dir: &std::path::Path, disk: &SimDisk) -> (Gated, u64) {
    let g = open_gated(dir, disk).await;
    let v = vdisk_with_extent_one(&g.store).await;
    g.store.flush().await.expect("flush");
    (g, v)
}

/// Cuts the power of `disk` (unsynced writes are lost), reopens the store
/// and checks that extent 1 of `v` reads back as `tag` in every block.
async fn assert_after_power_cut(dir: &std::path::Path, disk: &SimDisk, v: u64, tag: u64) {
    disk.power_cut(CutMode::DropUnsynced);
    assert_eq!(
        tags_after_reopen(dir, disk, v).await,
        vec![tag; EXTENT_BLOCKS as usize]
    );
}

/// Cuts the power of `disk` while `write`'s data is still held at the gate,
/// then lets the write end and stops the store.
async fn power_cut_while_held(g: Gated, disk: &SimDisk, write: tokio::task::JoinHandle<()>) {
    disk.power_cut(CutMode::DropUnsynced);
    g.gate.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
    g.store.halt().await;
}

/// The tags of extent 1 of `v` after reopening the store on `disk`.
async fn tags_after_reopen(dir: &std::path::Path, disk: &SimDisk, v: u64) -> Vec<u64> {
    let store = open_sim(dir, disk).await;
    let data = store
        .read(v, EXTENT_BLOCKS, EXTENT_BLOCKS)
        .await
        .expect("read after the power cut");
    tags(&data, EXTENT_BLOCKS)
}

/// Starts a whole-extent write of `tag` to extent 1 with the gate closed and
/// waits until its data write is held at the gate.
async fn held_cow_write(g: &Gated, v: u64, tag: u64) -> tokio::task::JoinHandle<()> {
    g.gate.send_replace(false);
    let before = g.large_writes.load(Ordering::SeqCst);
    let store = g.store.clone();
    let write = tokio::spawn(async move {
        store
            .write(
                v,
                EXTENT_BLOCKS,
                buffer(tag, EXTENT_BLOCKS, EXTENT_BLOCKS),
                false,
            )
            .await
            .expect("copy-on-write");
    });
    tokio::time::timeout(Duration::from_secs(5), async {
        while g.large_writes.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the copy-on-write data write reaches the disk");
    // Let the writer queue its remap record and publish the extent.
    tokio::time::sleep(Duration::from_millis(50)).await;
    write
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_for_copy_on_write_data_and_see_it_afterwards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let (g, v) = gated_with_first_write(dir.path(), &disk).await;

    let write = held_cow_write(&g, v, 2).await;
    let store = g.store.clone();
    let read = tokio::spawn(async move { store.read(v, EXTENT_BLOCKS, EXTENT_BLOCKS).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !read.is_finished(),
        "a read of the extent went ahead while its data was not on the disk"
    );
    assert!(
        !write.is_finished(),
        "the write was acknowledged before its data landed"
    );
    // Other extents keep serving meanwhile.
    let other = tokio::time::timeout(Duration::from_secs(5), g.store.read(v, 0, 4))
        .await
        .expect("a read of another extent does not wait")
        .expect("read");
    assert_eq!(tags(&other, 0), vec![0; 4]);

    g.gate.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .expect("write completes once open")
        .expect("write task");
    let data = read.await.expect("read task").expect("read");
    assert_eq!(tags(&data, EXTENT_BLOCKS), vec![2; EXTENT_BLOCKS as usize]);
    g.store.flush().await.expect("flush");
    g.store.halt().await;
    assert_after_power_cut(dir.path(), &disk, v, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_does_not_vouch_for_a_remap_whose_data_has_not_landed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let (g, v) = gated_with_first_write(dir.path(), &disk).await;

    let write = held_cow_write(&g, v, 2).await;
    // A flush now syncs the disk, remap batch included, but must neither
    // wait for nor vouch for the write that is not acknowledged yet.
    tokio::time::timeout(Duration::from_secs(5), g.store.flush())
        .await
        .expect("a flush does not wait for an unacknowledged write")
        .expect("flush");
    assert!(!write.is_finished());

    // Power goes while the data is still held: the remap record is on the
    // disk, the data it points at is not.
    power_cut_while_held(g, &disk, write).await;

    // The old contents read back, not an error.
    assert_eq!(
        tags_after_reopen(dir.path(), &disk, v).await,
        vec![1; EXTENT_BLOCKS as usize]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_past_a_copy_on_write_writes_its_metadata_home_first() {
    // A copy-on-write leaves the slot's metadata to the drainer. Once a
    // checkpoint moves the oplog tail past the remap record, replay no
    // longer sees the record: the metadata must be in the slot by then.
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let (g, v) = gated_with_first_write(dir.path(), &disk).await;
    checkpointed(&g.store).await;
    g.store.halt().await;
    assert_after_power_cut(dir.path(), &disk, v, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_between_two_copy_on_writes_keeps_the_first_readable() {
    // Tenancy 1 is written and at once replaced by tenancy 2, whose data is
    // held back. A checkpoint now covers tenancy 1's remap but not tenancy
    // 2's: the catalog maps the extent to tenancy 1's slot, so tenancy 1's
    // metadata must be written home although it is already retired.
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let g = open_gated(dir.path(), &disk).await;
    let v = vdisk_with_extent_one(&g.store).await;
    let write = held_cow_write(&g, v, 2).await;
    checkpointed(&g.store).await;
    assert!(!write.is_finished());

    power_cut_while_held(g, &disk, write).await;
    assert_eq!(
        tags_after_reopen(dir.path(), &disk, v).await,
        vec![1; EXTENT_BLOCKS as usize]
    );
}

/// A copy-on-write whose record is queued behind a batch of small writes
/// whose own write is still under way: if that earlier batch fails, the
/// copy-on-write must fail too (its record would follow a batch that is not
/// in the log), even though its data is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_the_copy_on_write_recorded_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    // Holds the next write of one header block and one data block (a batch
    // with a one-block write) once armed.
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = Arc::new(AtomicU64::new(0));
    let (engine, hooks) = {
        let (armed, held) = (armed.clone(), held.clone());
        hooked(&disk, move |len| {
            let hold = len == 2 * BLOCK && armed.swap(false, Ordering::SeqCst);
            if hold {
                held.fetch_add(1, Ordering::SeqCst);
            }
            hold
        })
    };
    let store = open_engine(dir.path(), engine).await;
    let v = vdisk_with_extent_one(&store).await;
    store.flush().await.expect("flush");

    hooks.gate.send_replace(false);
    armed.store(true, Ordering::SeqCst);
    let small = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(v, EXTENT_BLOCKS, buffer(2, EXTENT_BLOCKS, 1), false)
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(5), async {
        while held.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the small write's batch reaches the disk");

    let whole = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(
                    v,
                    2 * EXTENT_BLOCKS,
                    buffer(3, 2 * EXTENT_BLOCKS, EXTENT_BLOCKS),
                    false,
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !whole.is_finished(),
        "a record after an unwritten batch is not answered"
    );

    disk.fail_writes(0..disk.size());
    hooks.gate.send_replace(true);
    let small = tokio::time::timeout(Duration::from_secs(5), small)
        .await
        .expect("the small write ends")
        .expect("join");
    let whole = tokio::time::timeout(Duration::from_secs(5), whole)
        .await
        .expect("the copy-on-write ends")
        .expect("join");
    assert!(small.is_err(), "its batch failed: {small:?}");
    assert!(whole.is_err(), "recorded after a failed batch: {whole:?}");
    assert!(store.flush().await.is_err(), "the disk is failed");
    store.halt().await;
}

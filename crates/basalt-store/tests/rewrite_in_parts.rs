//! An extent rewritten in parts (a guest that sends at most so many
//! segments per request splits a 1 MiB write into two or three requests):
//! each part goes once into a shadow slot and is answered on its own; the
//! part that makes the rewrite whole switches the extent to that slot.
//! These tests check that the parts read back at once, that the switch
//! happens only for a whole rewrite in order, that anything else in between
//! leaves every write readable, and that crashes and power cuts at any
//! point keep every acknowledged part (and, after a flush, every durable
//! one).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use basalt_disk::sim::{CutMode, SimDisk};
use basalt_store::{Store, StoreError};
use common::*;

const EXTENT_BLOCKS: u64 = 256;

/// The parts a guest limited to 126 segments of 4 KiB sends for a 1 MiB write.
const PARTS: [(u64, u64); 3] = [(0, 126), (126, 126), (252, 4)];

/// A store on `disk` with vdisk "v" whose extents 0..4 hold tag 1, and a
/// written slot free for reuse (a rewrite in parts takes only slots whose
/// space is reserved: reused ones, or never-used ones reserved ahead).
async fn store_with_written_extents(dir: &std::path::Path, disk: &SimDisk) -> (Store, u64) {
    let store = open_sim(dir, disk).await;
    let v = store.create_vdisk("v", 8 << 20).await.expect("create").id;
    for e in 0..4 {
        store
            .write(
                v,
                e * EXTENT_BLOCKS,
                buffer(1, e * EXTENT_BLOCKS, 256),
                false,
            )
            .await
            .expect("whole extent");
    }
    // Rewritten whole: the replaced slot comes free with the next checkpoint.
    store
        .write(
            v,
            3 * EXTENT_BLOCKS,
            buffer(1, 3 * EXTENT_BLOCKS, 256),
            false,
        )
        .await
        .expect("whole extent again");
    checkpointed(&store).await;
    (store, v)
}

/// Writes `parts` of extent `extent` with `tag`, one after the other.
async fn write_parts(store: &Store, v: u64, extent: u64, parts: &[(u64, u64)], tag: u64) {
    for &(first, n) in parts {
        let first = extent * EXTENT_BLOCKS + first;
        store
            .write(v, first, buffer(tag, first, n), false)
            .await
            .expect("part");
    }
}

/// Writes `parts` of extent `extent` with `tag` taken from a source, as the
/// vhost-user-blk device hands them over (`Store::write_from`).
async fn stream_parts(store: &Store, v: u64, extent: u64, parts: &[(u64, u64)], tag: u64) {
    for &(first, n) in parts {
        let first = extent * EXTENT_BLOCKS + first;
        let mut source = TagSource::new(tag, first, n);
        store
            .write_from(v, first, n, &mut source, false)
            .await
            .expect("streamed part");
    }
}

async fn extent_tags(store: &Store, v: u64, extent: u64) -> Vec<u64> {
    read_tags(store, v, extent * EXTENT_BLOCKS, EXTENT_BLOCKS).await
}

fn cow_writes(store: &Store) -> u64 {
    store.stats().cow_writes.load(Ordering::Relaxed)
}

fn logged_blocks(store: &Store) -> u64 {
    store.stats().drained_blocks.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_in_parts_is_written_once_and_survives_crash_and_power_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let (store, v) = store_with_written_extents(dir.path(), &disk).await;
    let cow_before = cow_writes(&store);
    let drained_before = logged_blocks(&store);

    write_parts(&store, v, 0, &PARTS[..1], 2).await;
    // The first part reads back at once, beside the old blocks.
    let mut expected = vec![2; 126];
    expected.extend(vec![1; 130]);
    assert_eq!(extent_tags(&store, v, 0).await, expected);
    write_parts(&store, v, 0, &PARTS[1..], 2).await;
    assert_eq!(extent_tags(&store, v, 0).await, vec![2; 256]);
    assert_eq!(
        cow_writes(&store),
        cow_before + 1,
        "the extent moved to the shadow slot"
    );

    // Nothing of it is written a second time by the drain.
    checkpointed(&store).await;
    assert_eq!(
        logged_blocks(&store),
        drained_before,
        "no block written home"
    );
    assert_eq!(extent_tags(&store, v, 0).await, vec![2; 256]);

    // kill -9 right after the answers of a second rewrite.
    write_parts(&store, v, 1, &PARTS, 3).await;
    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(extent_tags(&store, v, 0).await, vec![2; 256]);
    assert_eq!(extent_tags(&store, v, 1).await, vec![3; 256]);

    // A power cut after a flush keeps a third; one before any flush keeps
    // each block old or new, never anything else.
    checkpointed(&store).await;
    write_parts(&store, v, 2, &PARTS, 4).await;
    store.flush().await.expect("flush");
    write_parts(&store, v, 3, &PARTS, 5).await;
    store.halt().await;
    disk.power_cut(CutMode::DropUnsynced);
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(extent_tags(&store, v, 1).await, vec![3; 256]);
    assert_eq!(extent_tags(&store, v, 2).await, vec![4; 256]);
    for tag in extent_tags(&store, v, 3).await {
        assert!(tag == 1 || tag == 5, "block of extent 3 reads tag {tag}");
    }
    store.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_between_the_parts_interrupts_the_rewrite_and_every_write_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let (store, v) = store_with_written_extents(dir.path(), &disk).await;
    let cow_before = cow_writes(&store);

    write_parts(&store, v, 0, &PARTS[..1], 2).await;
    // A small write into blocks the first part wrote, then the other parts.
    store
        .write(v, 10, buffer(3, 10, 2), false)
        .await
        .expect("small write");
    write_parts(&store, v, 0, &PARTS[1..], 2).await;
    let mut expected = vec![2; 256];
    expected[10] = 3;
    expected[11] = 3;
    assert_eq!(extent_tags(&store, v, 0).await, expected);
    assert_eq!(
        cow_writes(&store),
        cow_before,
        "an interrupted rewrite does not switch"
    );

    // Parts out of order interrupt it too.
    write_parts(&store, v, 1, &[PARTS[1], PARTS[0], PARTS[2]], 4).await;
    assert_eq!(extent_tags(&store, v, 1).await, vec![4; 256]);
    // So does a zero between them.
    write_parts(&store, v, 2, &PARTS[..2], 5).await;
    store
        .zero(v, 2 * EXTENT_BLOCKS + 200, 10, false)
        .await
        .expect("zero");
    write_parts(&store, v, 2, &PARTS[2..], 5).await;
    let mut zeroed = vec![5; 256];
    zeroed[200..210].fill(0);
    assert_eq!(extent_tags(&store, v, 2).await, zeroed);
    assert_eq!(cow_writes(&store), cow_before);

    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(extent_tags(&store, v, 0).await, expected);
    assert_eq!(extent_tags(&store, v, 1).await, vec![4; 256]);
    assert_eq!(extent_tags(&store, v, 2).await, zeroed);

    // Their slots come free again: nothing leaks.
    let free_before = basalt_store::free_slots_for_tests(&store).len();
    checkpointed(&store).await;
    write_parts(&store, v, 3, &PARTS[..1], 6).await;
    write_parts(&store, v, 3, &PARTS[2..], 6).await;
    checkpointed(&store).await;
    store
        .write(v, 3 * EXTENT_BLOCKS, buffer(7, 3 * EXTENT_BLOCKS, 1), false)
        .await
        .expect("small write");
    checkpointed(&store).await;
    assert_eq!(
        basalt_store::free_slots_for_tests(&store).len(),
        free_before
    );
    store.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_rewrite_keeps_its_parts_through_crash_checkpoint_and_power_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let (store, v) = store_with_written_extents(dir.path(), &disk).await;

    // kill -9 after the first part: replay reads it from the shadow slot.
    write_parts(&store, v, 0, &PARTS[..1], 2).await;
    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    let mut expected = vec![2; 126];
    expected.extend(vec![1; 130]);
    assert_eq!(extent_tags(&store, v, 0).await, expected);

    // A checkpoint between the parts: the rest of the rewrite is written
    // as usual and nothing switches.
    let cow_before = cow_writes(&store);
    checkpointed(&store).await;
    write_parts(&store, v, 1, &PARTS[..2], 3).await;
    store.flush().await.expect("flush");
    checkpointed(&store).await;
    write_parts(&store, v, 1, &PARTS[2..], 3).await;
    assert_eq!(extent_tags(&store, v, 1).await, vec![3; 256]);
    assert_eq!(cow_writes(&store), cow_before);
    store.flush().await.expect("flush");
    store.halt().await;
    disk.power_cut(CutMode::DropUnsynced);
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(extent_tags(&store, v, 0).await, expected);
    assert_eq!(extent_tags(&store, v, 1).await, vec![3; 256]);
    store.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_sent_together_read_back_and_survive_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let (store, v) = store_with_written_extents(dir.path(), &disk).await;
    // Two extents, their parts in flight together, as a guest at depth 2.
    let writes = [0u64, 1].into_iter().flat_map(|extent| {
        let store = &store;
        PARTS.iter().map(move |&(first, n)| {
            let first = extent * EXTENT_BLOCKS + first;
            async move {
                store
                    .write(v, first, buffer(8 + extent, first, n), false)
                    .await
            }
        })
    });
    for result in futures::future::join_all(writes).await {
        result.expect("part");
    }
    assert_eq!(extent_tags(&store, v, 0).await, vec![8; 256]);
    assert_eq!(extent_tags(&store, v, 1).await, vec![9; 256]);
    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(extent_tags(&store, v, 0).await, vec![8; 256]);
    assert_eq!(extent_tags(&store, v, 1).await, vec![9; 256]);
    store.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_streamed_from_a_source_are_written_once_and_a_failing_one_interrupts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let (store, v) = store_with_written_extents(dir.path(), &disk).await;
    let cow_before = cow_writes(&store);
    let drained_before = logged_blocks(&store);

    // A first part of 504 KiB goes to the disk in two pieces, each sent
    // as soon as it is copied; its blocks read back from either.
    let mut source = TagSource::new(2, 0, 126);
    store
        .write_from(v, 0, 126, &mut source, false)
        .await
        .expect("streamed part");
    assert_eq!(source.calls, 2, "copied in two pieces");
    let mut expected = vec![2; 126];
    expected.extend(vec![1; 130]);
    assert_eq!(extent_tags(&store, v, 0).await, expected);
    stream_parts(&store, v, 0, &PARTS[1..], 2).await;
    assert_eq!(extent_tags(&store, v, 0).await, vec![2; 256]);
    assert_eq!(cow_writes(&store), cow_before + 1, "the extent switched");
    checkpointed(&store).await;
    assert_eq!(
        logged_blocks(&store),
        drained_before,
        "no block written home"
    );
    let free_before = basalt_store::free_slots_for_tests(&store);

    // The source fails in the second piece of the second part: that part
    // is refused, the first stays, and the rewrite is interrupted.
    stream_parts(&store, v, 1, &PARTS[..1], 3).await;
    let first = EXTENT_BLOCKS + 126;
    let mut failing = TagSource::new(3, first, 126);
    failing.fail_at = Some(1);
    let err = store
        .write_from(v, first, 126, &mut failing, false)
        .await
        .expect_err("the source failed");
    assert!(matches!(err, StoreError::Source(_)), "{err}");
    let mut expected = vec![3; 126];
    expected.extend(vec![1; 130]);
    assert_eq!(extent_tags(&store, v, 1).await, expected);

    // The rest arrives as ordinary writes and reads back; nothing switches.
    stream_parts(&store, v, 1, &PARTS[1..], 4).await;
    let mut expected = vec![3; 126];
    expected.extend(vec![4; 130]);
    assert_eq!(extent_tags(&store, v, 1).await, expected);
    assert_eq!(cow_writes(&store), cow_before + 1);

    // The interrupted rewrite's slot comes free with a checkpoint.
    tokio::time::timeout(Duration::from_secs(10), async {
        while basalt_store::free_slots_for_tests(&store) != free_before {
            let block = 2 * EXTENT_BLOCKS + 5;
            store
                .write(v, block, buffer(1, block, 1), false)
                .await
                .expect("a write to move the checkpoint on");
            checkpointed(&store).await;
        }
    })
    .await
    .expect("no slot leaked");

    // kill -9: every acknowledged part is still there.
    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(extent_tags(&store, v, 0).await, vec![2; 256]);
    assert_eq!(extent_tags(&store, v, 1).await, expected);
    store.halt().await;
}

/// Two rewrites in parts overlap in the oplog (A's first part, B's first
/// part, A's last part, then B's) and a checkpoint comes while B's last part
/// is still landing: it may not cover B's first part, and capping it below
/// B's must not cut A, which it would otherwise have covered whole. After a
/// crash every acknowledged part of A must read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_between_overlapping_rewrites_cuts_neither() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    // Holds the next write of B's last part's data once armed.
    let armed = Arc::new(AtomicBool::new(false));
    let (engine, hooks) = {
        let armed = armed.clone();
        hooked(&disk, move |len| {
            len == 4 * BLOCK && armed.swap(false, Ordering::SeqCst)
        })
    };
    let mut config = config(dir.path());
    // The drainer runs when two replaced slots wait (here: when both
    // rewrites have completed), not on a timer or for memory.
    config.drain_interval = Duration::from_secs(3600);
    config.checkpoint_replaced_slots = 2;
    config.memory_budget = 256 << 20;
    let store = open_configured(config, engine).await;
    let v = store.create_vdisk("v", 8 << 20).await.expect("create").id;
    for e in 0..3 {
        let first = e * EXTENT_BLOCKS;
        store
            .write(v, first, buffer(1, first, EXTENT_BLOCKS), false)
            .await
            .expect("whole extent");
    }
    store.flush().await.expect("flush");
    // The next slots' space is reserved in the background; a rewrite in
    // parts only takes such slots.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (a, b) = (0, 1);
    write_parts(&store, v, a, &PARTS[..1], 2).await;
    write_parts(&store, v, b, &PARTS[..1], 3).await;
    write_parts(&store, v, a, &PARTS[1..], 2).await;
    write_parts(&store, v, b, &PARTS[1..2], 3).await;
    let drains = store.stats().drains.load(Ordering::SeqCst);
    hooks.gate.send_replace(false);
    armed.store(true, Ordering::SeqCst);
    let last = {
        let store = store.clone();
        tokio::spawn(async move { write_parts(&store, v, b, &PARTS[2..], 3).await })
    };
    // B's completion asks for a checkpoint; it runs while B's last part is
    // held.
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.stats().drains.load(Ordering::SeqCst) == drains {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a checkpoint while B's last part lands");
    assert!(!last.is_finished(), "B's last part is still held");
    assert_eq!(extent_tags(&store, v, a).await, vec![2; 256]);

    // kill -9: A was acknowledged whole.
    hooks.gate.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), last).await;
    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(extent_tags(&store, v, a).await, vec![2; 256], "rewrite A");
    for tag in extent_tags(&store, v, b).await {
        assert!(tag == 1 || tag == 3, "block of B reads tag {tag}");
    }
    store.halt().await;
}

/// More extents rewritten in parts than never-used slots are reserved ahead,
/// with no checkpoint in between to hand replaced slots back: every rewrite
/// still goes once into a slot of its own and switches its extent (the
/// rewrites keep slots reserved ahead, as whole-extent writes do); none
/// falls back to the oplog and its second write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_in_parts_keep_never_used_slots_reserved_ahead() {
    const EXTENTS: u64 = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    // About a thousand slots: an eighth of them (the cap on replaced slots
    // before a checkpoint) is more than the rewrites replace.
    let disk = SimDisk::new(1 << 30);
    let mut config = config(dir.path());
    config.drain_interval = Duration::from_secs(3600);
    let store = open_sim_with(config, &disk).await;
    let v = store
        .create_vdisk("v", EXTENTS << 20)
        .await
        .expect("create")
        .id;
    for e in 0..EXTENTS {
        let first = e * EXTENT_BLOCKS;
        store
            .write(v, first, buffer(1, first, 256), false)
            .await
            .expect("whole extent");
    }
    let cow_before = cow_writes(&store);

    for e in 0..EXTENTS {
        write_parts(&store, v, e, &PARTS, 2).await;
    }
    // A part that fell back to the oplog would have interrupted its
    // rewrite, which then never switches.
    assert_eq!(
        cow_writes(&store),
        cow_before + EXTENTS,
        "every rewrite switched its extent to its own slot"
    );
    for e in 0..EXTENTS {
        assert_eq!(extent_tags(&store, v, e).await, vec![2; 256], "extent {e}");
    }
    store.halt().await;
}

//! Behaviour of the store on simulated disks: data paths, restarts, model checks.

mod common;

use std::collections::HashMap;

use basalt_disk::sim::{CutMode, SimDisk};
use basalt_store::{StoreError, free_slots_for_tests};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn small_large_and_zero_writes_survive_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(256 * MIB);
    let store = open_sim(dir.path(), &disk).await;
    let v = store.create_vdisk("a", 64 * MIB).await.expect("create").id;

    store
        .write(v, 3, buffer(1, 3, 1), false)
        .await
        .expect("small");
    store
        .write(v, 250, buffer(2, 250, 12), false)
        .await
        .expect("crossing");
    store
        .write(v, 512, buffer(3, 512, 256), false)
        .await
        .expect("whole extent");
    store
        .write(v, 1000, buffer(4, 1000, 10), true)
        .await
        .expect("fua");
    assert!(
        store
            .stats()
            .cow_writes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    let expect = |b: u64| match b {
        3 => 1,
        250..=261 => 2,
        512..=767 => 3,
        1000..=1009 => 4,
        _ => 0,
    };
    let tags = read_tags(&store, v, 0, 1100).await;
    for (b, tag) in tags.iter().enumerate() {
        assert_eq!(*tag, expect(b as u64), "block {b}");
    }

    // Zero part of an extent, and a whole extent (which frees its slot).
    let free_before = free_slots_for_tests(&store).len();
    store.zero(v, 252, 2, false).await.expect("zero partial");
    store.zero(v, 512, 256, false).await.expect("zero whole");
    store.flush().await.expect("flush");
    assert_eq!(read_tags(&store, v, 250, 4).await, vec![2, 2, 0, 0]);
    assert!(read_tags(&store, v, 512, 256).await.iter().all(|&t| t == 0));
    let runs = store.allocation(v, 512, 256).await.expect("allocation");
    assert_eq!(runs, vec![(256, false)]);
    let runs = store.allocation(v, 0, 8).await.expect("allocation");
    assert_eq!(runs, vec![(3, false), (1, true), (4, false)]);

    // Give the drainer a chance to release the slot.
    for _ in 0..50 {
        if free_slots_for_tests(&store).len() > free_before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        free_slots_for_tests(&store).len() > free_before,
        "trimmed extent's slot was not freed"
    );

    store.shutdown().await.expect("shutdown");
    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    let tags = read_tags(&store, v, 0, 1100).await;
    for (b, tag) in tags.iter().enumerate() {
        let b = b as u64;
        let want = if (252..254).contains(&b) || (512..768).contains(&b) {
            0
        } else {
            expect(b)
        };
        assert_eq!(*tag, want, "block {b} after restart");
    }
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn management_errors_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(128 * MIB);
    let store = open_sim(dir.path(), &disk).await;
    let capacity = store.capacity();
    assert!(capacity > 64 * MIB);

    assert!(matches!(
        store.create_vdisk("", MIB).await,
        Err(StoreError::BadName(_))
    ));
    assert!(matches!(
        store.create_vdisk("a/b", MIB).await,
        Err(StoreError::BadName(_))
    ));
    assert!(matches!(
        store.create_vdisk("-x", MIB).await,
        Err(StoreError::BadName(_))
    ));
    assert!(matches!(
        store.create_vdisk("a", 0).await,
        Err(StoreError::BadSize(_))
    ));
    assert!(matches!(
        store.create_vdisk("a", 1000).await,
        Err(StoreError::BadSize(_))
    ));
    assert!(matches!(
        store.create_vdisk("a", capacity + 4096).await,
        Err(StoreError::BadSize(_))
    ));
    assert!(store.list_vdisks().is_empty());

    let a = store.create_vdisk("a", 8 * MIB).await.expect("create");
    assert!(matches!(
        store.create_vdisk("a", MIB).await,
        Err(StoreError::VdiskExists(_))
    ));
    assert!(matches!(
        store.resize_vdisk("a", 4 * MIB).await,
        Err(StoreError::BadSize(_))
    ));
    assert!(matches!(
        store.resize_vdisk("nope", 4 * MIB).await,
        Err(StoreError::NoSuchVdisk(_))
    ));
    assert!(matches!(
        store.delete_vdisk("nope").await,
        Err(StoreError::NoSuchVdisk(_))
    ));
    assert_eq!(store.vdisk("a").expect("a").size, 8 * MIB);

    // I/O past the end is refused and writes nothing.
    let end = 8 * MIB / 4096;
    assert!(matches!(
        store.write(a.id, end, buffer(1, end, 1), false).await,
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        store.read(a.id, end - 1, 2).await,
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        store.zero(a.id, u64::MAX - 1, 4, false).await,
        Err(StoreError::OutOfRange { .. })
    ));

    let grown = store.resize_vdisk("a", 16 * MIB).await.expect("grow");
    assert_eq!(grown.size, 16 * MIB);
    store
        .write(a.id, end, buffer(1, end, 1), false)
        .await
        .expect("write in grown part");
    assert_eq!(store.vdisk("a").expect("a").allocated, MIB);

    store.delete_vdisk("a").await.expect("delete");
    assert!(matches!(
        store.read(a.id, 0, 1).await,
        Err(StoreError::NoSuchVdisk(_))
    ));
    let again = store.create_vdisk("a", MIB).await.expect("recreate");
    assert_ne!(again.id, a.id, "ids are never reused");
    assert_eq!(read_tags(&store, again.id, 0, 256).await, vec![0; 256]);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn full_disk_is_enospc_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 * MIB);
    let store = open_sim(dir.path(), &disk).await;
    let capacity = store.capacity();
    // Thin provisioning: two vdisks that together exceed the capacity.
    let a = store.create_vdisk("a", capacity).await.expect("a").id;
    let b = store.create_vdisk("b", capacity).await.expect("b").id;
    // A full filesystem under the disk file: a never-used slot cannot get
    // space, so the write that needs it fails cleanly, and nothing changes.
    disk.set_full(true);
    let err = store.write(a, 0, buffer(1, 0, 1), false).await;
    assert!(matches!(err, Err(StoreError::NoSpace)), "{err:?}");
    let err = store.write(a, 0, buffer(1, 0, 256), false).await;
    assert!(matches!(err, Err(StoreError::NoSpace)), "{err:?}");
    disk.set_full(false);
    assert_eq!(read_tags(&store, a, 0, 1).await, vec![0]);
    let slots = capacity / MIB;
    for e in 0..slots {
        store
            .write(a, e * 256, buffer(e + 1, e * 256, 1), false)
            .await
            .expect("fill");
    }
    let err = store.write(b, 0, buffer(99, 0, 1), false).await;
    assert!(matches!(err, Err(StoreError::NoSpace)), "{err:?}");
    let err = store.write(b, 0, buffer(99, 0, 256), false).await;
    assert!(matches!(err, Err(StoreError::NoSpace)), "{err:?}");
    // Allocated space keeps working, old data intact.
    store
        .write(a, 1, buffer(500, 1, 1), false)
        .await
        .expect("overwrite in place");
    assert_eq!(read_tags(&store, a, 0, 2).await, vec![1, 500]);
    assert_eq!(read_tags(&store, b, 0, 1).await, vec![0]);

    // A freed slot is reused, and its space is already reserved: it takes a
    // write even when the filesystem under the disk is full.
    store.zero(a, 0, 256, false).await.expect("free one extent");
    for _ in 0..100 {
        if !free_slots_for_tests(&store).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    disk.set_full(true);
    store
        .write(b, 0, buffer(7, 0, 1), false)
        .await
        .expect("reuses the freed slot");
    let err = store.write(b, 256, buffer(8, 256, 1), false).await;
    assert!(matches!(err, Err(StoreError::NoSpace)), "{err:?}");
    disk.set_full(false);
    assert_eq!(read_tags(&store, b, 0, 1).await, vec![7]);

    store.shutdown().await.expect("shutdown");
}

#[derive(Clone, Copy, Debug)]
enum Restart {
    Clean,
    ProcessCrash,
}

/// Random operations against a model, with restarts. A process crash keeps
/// everything the OS accepted (the simulated disk keeps its volatile state),
/// so every completed operation must survive it.
async fn model_run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(96 * MIB);
    let mut store = open_sim(dir.path(), &disk).await;
    let blocks = 8 * 256u64;
    let v = store
        .create_vdisk("m", blocks * 4096)
        .await
        .expect("create")
        .id;
    let mut model: HashMap<u64, u64> = HashMap::new();
    for step in 0..400u64 {
        let tag = step + 1;

        match rng.gen_range(0..100) {
            40..=49 => {
                // An extent rewritten in parts (a guest limited in segments
                // per request), sometimes not to the end.
                let base = rng.gen_range(0..blocks / 256) * 256;
                let first_part = rng.gen_range(64..=200u64);
                let mut parts = vec![(base, first_part), (base + first_part, 256 - first_part)];
                if rng.gen_bool(0.3) {
                    parts.truncate(1);
                }
                for (first, n) in parts {
                    store
                        .write(v, first, buffer(tag, first, n), false)
                        .await
                        .expect("part");
                    for b in first..first + n {
                        model.insert(b, tag);
                    }
                }
            }
            0..=49 => {
                let n = rng.gen_range(1..=24u64);
                let first = rng.gen_range(0..blocks - n);
                store
                    .write(v, first, buffer(tag, first, n), rng.gen_bool(0.1))
                    .await
                    .expect("write");
                for b in first..first + n {
                    model.insert(b, tag);
                }
            }
            50..=59 => {
                let e = rng.gen_range(0..blocks / 256);
                store
                    .write(v, e * 256, buffer(tag, e * 256, 256), false)
                    .await
                    .expect("cow");
                for b in e * 256..(e + 1) * 256 {
                    model.insert(b, tag);
                }
            }
            60..=69 => {
                let n = rng.gen_range(1..=300u64);
                let first = rng.gen_range(0..blocks - n);
                store.zero(v, first, n, false).await.expect("zero");
                for b in first..first + n {
                    model.remove(&b);
                }
            }
            70..=74 => store.flush().await.expect("flush"),
            75..=94 => {
                let n = rng.gen_range(1..=300u64);
                let first = rng.gen_range(0..blocks - n);
                let tags = read_tags(&store, v, first, n).await;
                for (i, t) in tags.iter().enumerate() {
                    let b = first + i as u64;
                    assert_eq!(
                        *t,
                        model.get(&b).copied().unwrap_or(0),
                        "seed {seed} step {step} block {b}"
                    );
                }
            }
            _ => {
                let how = if rng.gen_bool(0.5) {
                    Restart::Clean
                } else {
                    Restart::ProcessCrash
                };
                match how {
                    Restart::Clean => {
                        store.shutdown().await.expect("shutdown");
                        store.halt().await;
                    }
                    Restart::ProcessCrash => store.halt().await,
                }
                store = open_sim(dir.path(), &disk).await;
            }
        }
    }
    let tags = read_tags(&store, v, 0, blocks).await;
    for (b, t) in tags.iter().enumerate() {
        assert_eq!(
            *t,
            model.get(&(b as u64)).copied().unwrap_or(0),
            "seed {seed} final block {b}"
        );
    }
    store.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_check_with_restarts() {
    let seeds: u64 = std::env::var("BASALT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 0..seeds {
        model_run(seed).await;
    }
}

#[tokio::test]
async fn oplog_wraps_many_times() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 * MIB);
    let store = open_sim(dir.path(), &disk).await;
    let v = store.create_vdisk("w", 16 * MIB).await.expect("create").id;
    // 16 MiB ring; write ~48 MiB in small writes over a 4 MiB working set.
    let mut last = HashMap::new();
    for i in 0..(12 * 1024u64) {
        let b = (i * 37) % 1024;
        store
            .write(v, b, buffer(i + 1, b, 1), false)
            .await
            .expect("write");
        last.insert(b, i + 1);
    }
    for (b, t) in read_tags(&store, v, 0, 1024).await.iter().enumerate() {
        assert_eq!(*t, last.get(&(b as u64)).copied().unwrap_or(0));
    }
    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    for (b, t) in read_tags(&store, v, 0, 1024).await.iter().enumerate() {
        assert_eq!(
            *t,
            last.get(&(b as u64)).copied().unwrap_or(0),
            "after crash, block {b}"
        );
    }
    store.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_writes_find_their_slots_reserved_ahead_in_bulk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(256 * MIB);
    let (engine, hooks) = hooked(&disk, |_| false);
    let calls = hooks.allocations;
    let store = open_engine(dir.path(), engine).await;
    let v = store.create_vdisk("v", 160 * MIB).await.expect("create").id;
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    // 150 never-written extents, whole and partial: one reservation per
    // slot would be 150 calls.
    for e in 0..150u64 {
        let (first, blocks) = if e % 2 == 0 {
            (e * 256, 256)
        } else {
            (e * 256 + 3, 2)
        };
        store
            .write(v, first, buffer(e + 1, first, blocks), false)
            .await
            .expect("first write");
    }
    let asked = calls.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(asked < 20, "{asked} reservations for 150 first writes");
    for e in 0..150u64 {
        let (first, blocks) = if e % 2 == 0 {
            (e * 256, 256)
        } else {
            (e * 256 + 3, 2)
        };
        assert_eq!(
            read_tags(&store, v, first, blocks).await,
            vec![e + 1; blocks as usize]
        );
    }
    store.shutdown().await.expect("shutdown");
}

/// Partial writes made at once by runtime tasks (as NBD connections make
/// them) and from threads outside the runtime's tasks (as vhost-user-blk's
/// vring threads make their first poll), into one disk's oplog: none may be
/// left behind or reordered, so that after a flush and a power cut every
/// block holds its last write.
#[test]
fn writes_from_runtime_tasks_and_other_threads_survive_a_power_cut() {
    const THREADS: u64 = 4;
    const ROUNDS: u64 = 100;
    const BLOCKS_PER_THREAD: u64 = 64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(64 << 20);
    let store = runtime.block_on(open_sim(dir.path(), &disk));
    let v = runtime
        .block_on(store.create_vdisk("v", 4 << 20))
        .expect("create")
        .id;
    // Thread t writes its own blocks t * 64 .. t * 64 + 63 in turn, twice
    // over most of them, so the last write of a block is known.
    let block_of = |t: u64, round: u64| t * BLOCKS_PER_THREAD + round % BLOCKS_PER_THREAD;
    let tag_of_write = |t: u64, round: u64| round * THREADS + t + 1;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = store.clone();
            let handle = runtime.handle().clone();
            scope.spawn(move || {
                let writes = async move {
                    for round in 0..ROUNDS {
                        let block = block_of(t, round);
                        let data = buffer(tag_of_write(t, round), block, 1);
                        store
                            .write(v, block, data, round % 10 == 9)
                            .await
                            .expect("write");
                    }
                };
                if t % 2 == 0 {
                    // On this thread, outside the runtime's tasks.
                    handle.block_on(writes);
                } else {
                    handle.block_on(handle.spawn(writes)).expect("writer task");
                }
            });
        }
    });
    let mut expected = vec![0u64; (THREADS * BLOCKS_PER_THREAD) as usize];
    for t in 0..THREADS {
        for round in 0..ROUNDS {
            expected[block_of(t, round) as usize] = tag_of_write(t, round);
        }
    }
    let blocks = THREADS * BLOCKS_PER_THREAD;
    assert_eq!(runtime.block_on(read_tags(&store, v, 0, blocks)), expected);
    runtime.block_on(store.flush()).expect("flush");
    runtime.block_on(store.halt());
    disk.power_cut(CutMode::DropUnsynced);
    let store = runtime.block_on(open_sim(dir.path(), &disk));
    assert_eq!(
        runtime.block_on(read_tags(&store, v, 0, blocks)),
        expected,
        "after the power cut"
    );
    runtime.block_on(store.halt());
}

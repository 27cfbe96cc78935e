//! Damage on disk must surface as errors (or be repaired), never as wrong data.

mod common;

use basalt_disk::sim::SimDisk;
use basalt_store::StoreError;
use common::*;

#[tokio::test]
async fn corrupted_blocks_fail_reads_and_everything_else_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(128 << 20);
    let store = open_sim(dir.path(), &disk).await;
    let v = store.create_vdisk("c", 16 << 20).await.expect("create").id;
    // Extent 0 through the oplog, extent 1 copy-on-write, extent 2 both ways.
    for b in (0..256).step_by(8) {
        store
            .write(v, b, buffer(1, b, 8), false)
            .await
            .expect("write");
    }
    store
        .write(v, 256, buffer(2, 256, 256), false)
        .await
        .expect("cow");
    store
        .write(v, 512, buffer(3, 512, 256), false)
        .await
        .expect("cow");
    store
        .write(v, 600, buffer(4, 600, 16), false)
        .await
        .expect("write");
    store.shutdown().await.expect("shutdown");

    let at = |store: &basalt_store::Store, b: u64| {
        let store = store.clone();
        async move { store.locate(v, b).await.expect("mapped").1 }
    };
    // A data block of extent 0 and of extent 1.
    let bad0 = at(&store, 17).await;
    let bad1 = at(&store, 300).await;
    disk.corrupt(bad0 + 100, &[0xAB; 7]);
    disk.corrupt(bad1, &[0u8; 4096]);
    // One metadata copy of extent 1: the other copy repairs it.
    let slot1 = at(&store, 256).await - 8192;
    disk.corrupt(slot1 + 40, &[0xFF; 8]);
    // Both metadata copies of extent 2: all of its blocks are lost.
    let slot2 = at(&store, 512).await - 8192;
    disk.corrupt(slot2 + 500, &[1; 4]);
    disk.corrupt(slot2 + 4096 + 500, &[1; 4]);
    store.halt().await;

    let store = open_sim(dir.path(), &disk).await;
    for b in 0..768u64 {
        let result = store.read(v, b, 1).await;
        let expect_error = b == 17 || b == 300 || (512..768).contains(&b);
        match result {
            Ok(data) if !expect_error => {
                let tag = tag_of(data.as_slice(), b);
                let want = match b {
                    0..=255 => 1,
                    256..=511 => 2,
                    600..=615 => 4,
                    _ => 3,
                };
                assert_eq!(tag, want, "block {b}");
            }
            Err(StoreError::Checksum { .. }) if expect_error => {}
            other => panic!(
                "block {b}: unexpected {:?}",
                other.map(|d| tag_of(d.as_slice(), b))
            ),
        }
    }
    // A read spanning a bad block fails as a whole.
    assert!(matches!(
        store.read(v, 10, 16).await,
        Err(StoreError::Checksum { .. })
    ));
    let errors = store
        .stats()
        .checksum_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(errors >= 3, "checksum errors are counted ({errors})");
    // Rewriting a lost block makes it readable again; its neighbours stay lost.
    store
        .write(v, 520, buffer(9, 520, 1), false)
        .await
        .expect("rewrite");
    store.flush().await.expect("flush");
    assert_eq!(
        tag_of(store.read(v, 520, 1).await.expect("read").as_slice(), 520),
        9
    );
    assert!(store.read(v, 521, 1).await.is_err());
    store.shutdown().await.expect("shutdown");
    store.halt().await;
    let store = open_sim(dir.path(), &disk).await;
    assert_eq!(
        tag_of(store.read(v, 520, 1).await.expect("read").as_slice(), 520),
        9
    );
    assert!(
        store.read(v, 521, 1).await.is_err(),
        "lost blocks stay lost across restarts"
    );
    store.shutdown().await.expect("shutdown");
}

/// A read of one extent that the store serves from several runs of the
/// slot, with never-written blocks and newer overlay blocks between them:
/// every block is checked against its own checksum, so damage in a later
/// run fails the read, and a read beside it returns each block's own
/// contents (zeros for the holes).
#[tokio::test]
async fn reads_across_runs_holes_and_overlay_blocks_check_every_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new(128 << 20);
    let store = open_sim(dir.path(), &disk).await;
    let v = store
        .create_vdisk("runs", 4 << 20)
        .await
        .expect("create")
        .id;
    // Extent 1: blocks 256..264 and 272..288 written, 264..272 a hole.
    store
        .write(v, 256, buffer(1, 256, 8), false)
        .await
        .expect("write");
    store
        .write(v, 272, buffer(2, 272, 16), false)
        .await
        .expect("write");
    store.shutdown().await.expect("shutdown");
    let bad = store.locate(v, 281).await.expect("mapped").1;
    store.halt().await;
    disk.corrupt(bad + 1000, &[0x5A; 3]);

    let store = open_sim(dir.path(), &disk).await;
    // A newer block in the overlay, in the hole between the runs.
    store
        .write(v, 266, buffer(3, 266, 1), false)
        .await
        .expect("write");
    let mut want = vec![1u64; 8];
    want.extend([0, 0, 3, 0, 0, 0, 0, 0]);
    want.extend(vec![2u64; 9]);
    assert_eq!(read_tags(&store, v, 256, 25).await, want, "up to block 280");
    assert!(
        matches!(
            store.read(v, 256, 32).await,
            Err(StoreError::Checksum { block: 281, .. })
        ),
        "the damaged block in the second run fails the whole read"
    );
    assert!(matches!(
        store.read(v, 270, 14).await,
        Err(StoreError::Checksum { block: 281, .. })
    ));
    assert_eq!(read_tags(&store, v, 282, 6).await, vec![2u64; 6]);
    store.shutdown().await.expect("shutdown");
}

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

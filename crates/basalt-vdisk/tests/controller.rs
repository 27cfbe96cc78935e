//! Byte-level behaviour of the vdisk controller over a store on a simulated disk.

use std::sync::Arc;

use basalt_core::{BlockBackend, BlockError, ExportRegistry, IoBuf, WriteFlags, WriteSource};
use basalt_disk::sim::SimDisk;
use basalt_store::{OpenedDisk, Store, StoreConfig};
use basalt_vdisk::VdiskRegistry;
use rand::{Rng, SeedableRng, rngs::StdRng};

const SIZE: u64 = 8 << 20;
const EXTENT: u64 = 1 << 20;

/// A write's bytes handed out in the pieces the backend asks for.
struct SliceSource<'a> {
    bytes: &'a [u8],
    taken: usize,
    /// How many times the backend asked.
    calls: usize,
}

impl WriteSource for SliceSource<'_> {
    fn read_next(&mut self, dst: &mut [u8]) -> Result<(), BlockError> {
        let end = self.taken + dst.len();
        let bytes = self
            .bytes
            .get(self.taken..end)
            .ok_or_else(|| BlockError::Invalid("asked past the end of the write".into()))?;
        dst.copy_from_slice(bytes);
        self.taken = end;
        self.calls += 1;
        Ok(())
    }
}

async fn setup(dir: &std::path::Path) -> (Store, VdiskRegistry) {
    let disk = SimDisk::new(96 << 20);
    let store = Store::open_with_engines(
        StoreConfig::new(dir),
        vec![OpenedDisk {
            path: "sim".into(),
            engine: disk.engine(),
        }],
    )
    .await
    .expect("open");
    store.create_vdisk("v", SIZE).await.expect("create");
    let registry = VdiskRegistry::new(store.clone());
    (store, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_byte_ops_match_a_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, registry) = setup(dir.path()).await;
    let v = registry.lookup("v").expect("export");
    assert_eq!(v.size(), SIZE);
    assert_eq!(v.id(), "v");
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = StdRng::seed_from_u64(7);
    let mut streamed_whole_extents = 0;
    for step in 0..1500 {
        let mut offset = rng.gen_range(0..SIZE - 1);
        let max = (SIZE - offset).min(300_000);
        let mut len = rng.gen_range(1..=max);
        match rng.gen_range(0..11) {
            0..=3 => {
                let mut data = IoBuf::zeroed(len as usize);
                rng.fill(data.as_mut_slice());
                model[offset as usize..(offset + len) as usize].copy_from_slice(data.as_slice());
                v.write(
                    offset,
                    data,
                    WriteFlags {
                        fua: rng.gen_bool(0.1),
                    },
                )
                .await
                .expect("write");
            }
            10 => {
                // The same through a source: often a whole extent (which the
                // store takes piece by piece), otherwise any range.
                if rng.gen_bool(0.5) {
                    offset = rng.gen_range(0..SIZE / EXTENT) * EXTENT;
                    len = EXTENT;
                }
                let mut data = vec![0u8; len as usize];
                rng.fill(data.as_mut_slice());
                let mut source = SliceSource {
                    bytes: &data,
                    taken: 0,
                    calls: 0,
                };
                v.write_from(offset, len as u32, &mut source, WriteFlags::default())
                    .await
                    .expect("write from a source");
                assert_eq!(source.taken, data.len(), "step {step}: source not used up");
                if len == EXTENT && offset % EXTENT == 0 {
                    assert!(source.calls > 1, "a whole extent was not taken in pieces");
                    streamed_whole_extents += 1;
                }
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            4 => {
                let allocate = rng.gen_bool(0.5);
                v.write_zeroes(offset, len, allocate, WriteFlags::default())
                    .await
                    .expect("zeroes");
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            5 => {
                // Trim: whole blocks inside the range read as zeros afterwards.
                v.trim(offset, len).await.expect("trim");
                let first = offset.div_ceil(4096) * 4096;
                let end = (offset + len) / 4096 * 4096;
                if end > first {
                    model[first as usize..end as usize].fill(0);
                }
            }
            6 => v.flush().await.expect("flush"),
            _ => {
                let data = v.read(offset, len as u32).await.expect("read");
                assert_eq!(data.len(), len as usize);
                assert!(
                    data.as_slice() == &model[offset as usize..(offset + len) as usize],
                    "step {step}: read {offset}+{len} differs"
                );
            }
        }
    }
    assert!(
        streamed_whole_extents > 10,
        "{streamed_whole_extents} streamed extents"
    );
    let all = v.read(0, SIZE as u32).await.expect("read all");
    assert!(all.as_slice() == model.as_slice());
    // Block status agrees with the data: holes read as zeros.
    let mut at = 0;
    while at < SIZE {
        let runs = v.block_status(at, SIZE - at).await.expect("status");
        assert!(!runs.is_empty());
        for run in runs {
            if run.hole {
                assert!(
                    model[at as usize..(at + run.length) as usize]
                        .iter()
                        .all(|&b| b == 0)
                );
            }
            at += run.length;
        }
    }
    assert_eq!(at, SIZE);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unaligned_writes_to_one_block_all_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, registry) = setup(dir.path()).await;
    let v = registry.get("v").expect("vdisk");
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let v: Arc<dyn BlockBackend> = v.clone();
        tasks.push(tokio::spawn(async move {
            // 64 writers of 64 bytes each into the same 4 KiB block, plus
            // aligned writers on the neighbouring block.
            v.write(
                4096 + i * 64,
                IoBuf::from_slice(&[i as u8 + 1; 64]),
                WriteFlags::default(),
            )
            .await
            .expect("rmw");
            v.write(8192, IoBuf::from_slice(&[7; 4096]), WriteFlags::default())
                .await
                .expect("aligned");
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    let block = v.read(4096, 4096).await.expect("read");
    for i in 0..64usize {
        assert!(
            block.as_slice()[i * 64..(i + 1) * 64]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "slice {i} lost"
        );
    }
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, registry) = setup(dir.path()).await;
    let v = registry.lookup("v").expect("export");
    v.write(0, IoBuf::from_slice(&[5; 4096]), WriteFlags::default())
        .await
        .expect("write");
    assert!(matches!(
        v.read(SIZE - 10, 11).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(SIZE, IoBuf::from_slice(&[1]), WriteFlags::default())
            .await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(
            u64::MAX - 2,
            IoBuf::from_slice(&[1; 8]),
            WriteFlags::default()
        )
        .await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.trim(SIZE - 4096, 8192).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write_zeroes(0, SIZE + 1, false, WriteFlags::default())
            .await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.block_status(SIZE, 1).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert_eq!(v.read(0, 4096).await.expect("read").as_slice(), &[5; 4096]);
    assert!(registry.lookup("nope").is_none());
    assert_eq!(registry.list().len(), 1);
    // A deleted vdisk's controller fails cleanly.
    store.delete_vdisk("v").await.expect("delete");
    assert!(matches!(v.read(0, 1).await, Err(BlockError::Io(_))));
    assert!(registry.lookup("v").is_none());
    store.shutdown().await.expect("shutdown");
}

//! Measures queue-depth-1 write latency of the store against the bare disk
//! engine on the same file: what the store adds per write.
//!
//! `cargo run --release -p basalt-store --example qd1_latency [DIR]`

use std::sync::Arc;
use std::time::Instant;

use basalt_core::IoBuf;
use basalt_disk::{EngineChoice, Segment, open_disk};
use basalt_store::{DiskSpec, Store, StoreConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/var/tmp/basalt-qd1".into());
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let n = 5000u64;
        // Bare engine: 4 KiB O_DIRECT writes at random 4 KiB offsets.
        let disk = open_disk(
            std::path::Path::new(&format!("{dir}/raw.img")),
            Some(1 << 30),
            EngineChoice::Auto,
        )?;
        let buf = Arc::new(IoBuf::from_slice(&[7u8; 4096]));
        for b in 0..(1u64 << 30) / (1 << 20) {
            disk.engine
                .write_at(
                    b << 20,
                    vec![Segment::whole(Arc::new(IoBuf::zeroed(1 << 20)))],
                )
                .await?;
        }
        let start = Instant::now();
        for i in 0..n {
            let off = (i * 7919 % 262_144) * 4096;
            disk.engine
                .write_at(off, vec![Segment::whole(buf.clone())])
                .await?;
        }
        let raw = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        drop(disk);

        let mut config = StoreConfig::new(format!("{dir}/store"));
        config.disks = vec![DiskSpec {
            path: format!("{dir}/store/d.img").into(),
            size: Some(8 << 30),
        }];
        let store = Store::open(config).await?;
        let v = store.create_vdisk("v", 1 << 30).await?.id;
        for e in 0..1024u64 {
            store
                .write(v, e * 256, IoBuf::zeroed(1 << 20), false)
                .await?;
        }
        let start = Instant::now();
        for i in 0..n {
            let block = i * 7919 % 262_144;
            store
                .write(v, block, IoBuf::from_slice(&[9u8; 4096]), false)
                .await?;
        }
        let stored = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        store.shutdown().await?;
        println!("QD1 4 KiB write: engine {raw:.1} µs, store {stored:.1} µs");
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}

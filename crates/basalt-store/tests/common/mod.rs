//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::path::Path;

use basalt_core::IoBuf;
use basalt_disk::sim::SimDisk;
use basalt_store::{OpenedDisk, Store, StoreConfig};

pub const BLOCK: usize = 4096;

/// A small-budget configuration so drains, wraps and backpressure happen often.
pub fn config(dir: &Path) -> StoreConfig {
    let mut config = StoreConfig::new(dir);
    config.memory_budget = 4 << 20;
    config
}

pub async fn open_sim(dir: &Path, disk: &SimDisk) -> Store {
    Store::open_with_engines(
        config(dir),
        vec![OpenedDisk {
            path: "sim0".into(),
            engine: disk.engine(),
        }],
    )
    .await
    .expect("open store")
}

/// Contents of `block` as written by write number `tag`: recognisable and
/// different for every (tag, block).
pub fn pattern(tag: u64, block: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK];
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    for chunk in out.chunks_mut(8) {
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out[..8].copy_from_slice(&tag.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out
}

/// The tag of a block written by [`pattern`], or 0 for a zero block; panics on
/// anything else (garbage must never be read back).
pub fn tag_of(data: &[u8], block: u64) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&data[..8]);
    let tag = u64::from_le_bytes(tag);
    assert_eq!(
        data,
        pattern(tag, block).as_slice(),
        "block {block} holds garbage (claims tag {tag})"
    );
    tag
}

pub fn buffer(tag: u64, first: u64, blocks: u64) -> IoBuf {
    let mut buf = IoBuf::zeroed(blocks as usize * BLOCK);
    for i in 0..blocks {
        let at = i as usize * BLOCK;
        buf.as_mut_slice()[at..at + BLOCK].copy_from_slice(&pattern(tag, first + i));
    }
    buf
}

//! The virtio-blk feature bits and configuration space Basalt offers.
//!
//! Block sizes: virtio-blk always addresses the disk in 512-byte sectors.
//! Basalt reports a *logical* block size of 512 bytes (`blk_size`) and a
//! *physical* block size of 4096 bytes (`physical_block_exp = 3`, with
//! `min_io_size` of one physical block). Linux then accepts 512-byte-sector
//! disk images and partition tables unchanged (a 4096-byte logical size would
//! make every existing MBR/GPT image unreadable), while file systems and the
//! page cache align their I/O to 4 KiB, the vdisk's checksum block
//! ([`basalt_core::BLOCK_SIZE`]), so the backend's read-modify-write path is
//! only taken by deliberate 512-byte `O_DIRECT` I/O. A 4096-byte logical block
//! size can be chosen per export for guests that are known to cope.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::request::SECTOR_SIZE;

/// `VHOST_F_LOG_ALL`: the device logs the guest pages it writes (live migration).
pub const VHOST_F_LOG_ALL: u32 = 26;
/// `VHOST_USER_F_PROTOCOL_FEATURES`: vhost-user protocol feature negotiation.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Size of the configuration space image: `struct virtio_blk_config` up to and
/// including the zoned characteristics (virtio 1.2). Reads past it return zeros.
pub const CONFIG_LEN: usize = 96;

/// Largest configuration read answered (vhost-user caps config messages at 256 bytes).
pub const MAX_CONFIG_READ: u32 = 4096;

/// Offset of the `writeback` byte (`VIRTIO_BLK_F_CONFIG_WCE`).
pub const WRITEBACK_OFFSET: usize = 32;

/// Largest discard or write-zeroes segment, in sectors (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// Most segments in one discard or write-zeroes request.
pub const MAX_RANGE_SEGMENTS: u32 = 32;

/// Granularity the guest should discard at, in sectors (one 4 KiB block).
pub const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// The bit for feature number `bit`.
pub const fn bit(bit: u32) -> u64 {
    1u64 << bit
}

/// The virtio and vhost-user feature bits offered to the frontend.
pub fn device_features(read_only: bool) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VHOST_USER_F_PROTOCOL_FEATURES)
        | bit(VHOST_F_LOG_ALL)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ);
    if read_only {
        features |= bit(VIRTIO_BLK_F_RO);
    } else {
        features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    features
}

/// The fields of `struct virtio_blk_config` Basalt fills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Largest single data segment in bytes.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block size / logical block size).
    pub physical_block_exp: u8,
    /// Smallest efficient I/O, in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size, in logical blocks (0: no preference).
    pub opt_io_size: u32,
    /// 1: write-back cache (FLUSH needed for durability); 0: write-through.
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard segment, in sectors.
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Discard granularity, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes segment, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// 1: write zeroes with the UNMAP flag may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// The configuration space image (little-endian, packed as in the spec).
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut out = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            out[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20: geometry (not offered).
        put(20, &self.blk_size.to_le_bytes());
        put(24, &[self.physical_block_exp, 0]);
        put(26, &self.min_io_size.to_le_bytes());
        put(28, &self.opt_io_size.to_le_bytes());
        put(WRITEBACK_OFFSET, &[self.writeback, 0]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[self.write_zeroes_may_unmap]);
        // 60..72: secure erase, 72..96: zoned (not offered).
        out
    }

    /// `size` bytes of the configuration space from `offset`, zero past its end
    /// (the vhost-user reply must be exactly as long as the request).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let image = self.to_bytes();
        // vhost-user messages are at most a few KiB; never allocate more.
        let size = size.min(MAX_CONFIG_READ);
        (0..size as usize)
            .map(|i| {
                (offset as usize)
                    .checked_add(i)
                    .and_then(|at| image.get(at))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::mem::offset_of;

    use virtio_bindings::virtio_blk::virtio_blk_config;

    use super::*;

    #[test]
    fn layout_matches_the_kernel_header() {
        assert_eq!(std::mem::size_of::<virtio_blk_config>(), CONFIG_LEN);
        assert_eq!(offset_of!(virtio_blk_config, size_max), 8);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, physical_block_exp), 24);
        assert_eq!(offset_of!(virtio_blk_config, min_io_size), 26);
        assert_eq!(offset_of!(virtio_blk_config, opt_io_size), 28);
        assert_eq!(offset_of!(virtio_blk_config, wce), WRITEBACK_OFFSET);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_seg), 40);
        assert_eq!(offset_of!(virtio_blk_config, discard_sector_alignment), 44);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
    }

    fn sample() -> BlkConfig {
        BlkConfig {
            capacity_sectors: 0x0102_0304,
            size_max: 1 << 17,
            seg_max: 254,
            blk_size: 512,
            physical_block_exp: 3,
            min_io_size: 8,
            opt_io_size: 0,
            writeback: 1,
            num_queues: 4,
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_seg: MAX_RANGE_SEGMENTS,
            discard_sector_alignment: DISCARD_ALIGNMENT_SECTORS,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_seg: MAX_RANGE_SEGMENTS,
            write_zeroes_may_unmap: 1,
        }
    }

    #[test]
    fn encodes_fields() {
        let bytes = sample().to_bytes();
        assert_eq!(&bytes[0..8], &0x0102_0304u64.to_le_bytes());
        assert_eq!(&bytes[12..16], &254u32.to_le_bytes());
        assert_eq!(bytes[24], 3);
        assert_eq!(bytes[WRITEBACK_OFFSET], 1);
        assert_eq!(&bytes[34..36], &4u16.to_le_bytes());
        assert_eq!(bytes[56], 1);
        assert!(bytes[60..].iter().all(|&b| b == 0));
    }

    #[test]
    fn read_windows_and_pads() {
        let config = sample();
        assert_eq!(config.read(0, 8), 0x0102_0304u64.to_le_bytes().to_vec());
        assert_eq!(config.read(WRITEBACK_OFFSET as u32, 1), vec![1]);
        assert_eq!(config.read(90, 10), vec![0; 10]);
        assert_eq!(config.read(u32::MAX, 4), vec![0; 4]);
        assert_eq!(config.read(0, 0), Vec::<u8>::new());
    }

    #[test]
    fn read_only_disks_offer_no_discard() {
        let ro = device_features(true);
        assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & bit(VIRTIO_BLK_F_DISCARD), 0);
        let rw = device_features(false);
        assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(rw & bit(VHOST_F_LOG_ALL), 0);
    }
}

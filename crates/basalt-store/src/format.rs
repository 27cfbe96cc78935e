//! The on-disk format, byte by byte (also in `docs/on-disk-format.md`).
//!
//! A disk claimed by Basalt has three areas:
//!
//! ```text
//! 0        4K       8K             1M                      slot_offset
//! | label A | label B | (unused)    | oplog ring (log_bytes) | slot 0 | slot 1 | ...
//! ```
//!
//! * **Label** — who owns the disk and where the other areas are. Written once
//!   when the disk is formatted, twice (A and B) so one bad sector cannot
//!   orphan a disk.
//! * **Oplog** — a ring of *batches*. Every small write lands here first,
//!   together with its checksum and generation, in one sequential I/O; a
//!   batch is valid only if its header checksum and every data block checksum
//!   match, so a torn batch is recognised and dropped on replay. This is what
//!   makes every block "old or new" after a crash: home locations are only
//!   overwritten while the log still holds the new contents.
//! * **Slots** — homes of extents (1 MiB of vdisk address space). A slot is
//!   two 4 KiB metadata blocks (A and B) followed by 256 data blocks. The
//!   metadata block holds each block's crc32c and write generation. Updates
//!   alternate between A and B with a rising sequence number, so a torn
//!   metadata write leaves the previous one intact. A full-extent write puts
//!   only its data in a *fresh* slot and is switched in by a `Remap` log
//!   record carrying the blocks' crcs (copy-on-write), so large sequential
//!   writes are written once; the drainer writes the slot's metadata blocks
//!   before a checkpoint covers the record.
//!
//! All integers are little endian. Checksums are crc32c (Castagnoli).

use uuid::Uuid;

/// Bytes in a vdisk block: the unit of checksums and generations.
pub const BLOCK_BYTES: u64 = basalt_core::BLOCK_SIZE;
/// Blocks in an extent.
pub const EXTENT_BLOCKS: u64 = 256;
/// Bytes of vdisk address space in one extent.
pub const EXTENT_BYTES: u64 = EXTENT_BLOCKS * BLOCK_BYTES;
/// Bytes of the two metadata blocks at the start of a slot.
pub const SLOT_META_BYTES: u64 = 2 * BLOCK_BYTES;
/// Bytes of one slot on disk.
pub const SLOT_BYTES: u64 = SLOT_META_BYTES + EXTENT_BYTES;
/// Where the oplog ring starts.
pub const LOG_OFFSET: u64 = 1 << 20;
/// Format version written in labels, metadata blocks and log headers.
pub const FORMAT_VERSION: u32 = 1;

const LABEL_MAGIC: &[u8; 8] = b"BASALTDK";
const META_MAGIC: &[u8; 8] = b"BSLTMETA";
const LOG_MAGIC: &[u8; 8] = b"BSLTLOG1";

/// Offset of the per-block entries inside a metadata block.
const META_ENTRIES_AT: usize = 64;
/// Bytes of one per-block entry: generation+flags (u64) and crc32c (u32).
const META_ENTRY_BYTES: usize = 12;
/// Bit of a metadata entry's generation word that says the block holds data
/// (clear: the block reads as zeros).
pub const ENTRY_HAS_DATA: u64 = 1 << 63;
/// Bit of a metadata entry's generation word that says the block's contents
/// were lost (its metadata was found damaged): reads fail until it is rewritten.
pub const ENTRY_LOST: u64 = 1 << 62;
const ENTRY_FLAGS: u64 = ENTRY_HAS_DATA | ENTRY_LOST;

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(buf: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&buf[at..at + 2]);
    u16::from_le_bytes(b)
}
fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}
fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// crc32c of `buf` with the four bytes at `crc_at` taken as zero.
fn crc_with_hole(buf: &[u8], crc_at: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..crc_at]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &buf[crc_at + 4..])
}

/// The checksum stored for a data block.
pub fn block_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The checksum of each [`BLOCK_BYTES`] block of `data`, in order (a shorter
/// last block gets its own): what [`block_crc`] gives each, computed three
/// blocks at a time where the processor allows (see `crc`).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    let block = BLOCK_BYTES as usize;
    let mut crcs = Vec::with_capacity(data.len().div_ceil(block));
    let mut rest = data;
    while rest.len() >= 3 * block {
        let (a, tail) = rest.split_at(block);
        let (b, tail) = tail.split_at(block);
        let (c, tail) = tail.split_at(block);
        match crate::crc::three_at_once(a, b, c) {
            Some(three) => crcs.extend(three),
            None => crcs.extend([block_crc(a), block_crc(b), block_crc(c)]),
        }
        rest = tail;
    }
    crcs.extend(rest.chunks(block).map(block_crc));
    crcs
}

// ---------------------------------------------------------------------------
// Label
// ---------------------------------------------------------------------------

/// The label at the start of every disk.
///
/// | bytes | field |
/// |---|---|
/// | 0..8 | magic `BASALTDK` |
/// | 8..12 | format version |
/// | 12..16 | crc32c of the 4 KiB block with this field zero |
/// | 16..32 | disk id (UUID) |
/// | 32..48 | node id (UUID) of the owning node |
/// | 48..64 | cluster id (UUID, nil until clusters exist) |
/// | 64..72 | disk size in bytes |
/// | 72..80 | oplog offset |
/// | 80..88 | oplog bytes |
/// | 88..96 | offset of slot 0 |
/// | 96..104 | bytes per slot |
/// | 104..112 | slot count |
/// | 112..116 | block bytes (4096) |
/// | 116..120 | blocks per extent (256) |
/// | 120..128 | creation time, unix seconds |
/// | 128..4096 | zero |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Identity of this disk.
    pub disk_id: Uuid,
    /// Node that owns the disk.
    pub node_id: Uuid,
    /// Cluster the node belongs to (nil for now).
    pub cluster_id: Uuid,
    /// Size of the disk in bytes.
    pub disk_bytes: u64,
    /// Start of the oplog ring.
    pub log_offset: u64,
    /// Size of the oplog ring.
    pub log_bytes: u64,
    /// Start of slot 0.
    pub slot_offset: u64,
    /// Number of slots.
    pub slot_count: u64,
    /// Creation time (unix seconds).
    pub created: u64,
}

/// Why a label, metadata block or log header was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The magic bytes are not Basalt's.
    #[error("not a Basalt structure (bad magic)")]
    BadMagic,
    /// The checksum does not match.
    #[error("checksum mismatch")]
    BadChecksum,
    /// Written by a format version this build does not read.
    #[error("unsupported format version {0}")]
    Version(u32),
    /// A field is out of its valid range.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

impl Label {
    /// Lays out a fresh disk of `disk_bytes`: oplog of 1/32 of the disk
    /// (between 16 MiB and 1 GiB), then as many slots as fit.
    pub fn plan(disk_id: Uuid, node_id: Uuid, disk_bytes: u64, created: u64) -> Label {
        let log_bytes = (disk_bytes / 32).clamp(16 << 20, 1 << 30) & !((1 << 20) - 1);
        let slot_offset = LOG_OFFSET + log_bytes;
        let slot_count = disk_bytes.saturating_sub(slot_offset) / SLOT_BYTES;
        Label {
            disk_id,
            node_id,
            cluster_id: Uuid::nil(),
            disk_bytes,
            log_offset: LOG_OFFSET,
            log_bytes,
            slot_offset,
            slot_count,
            created,
        }
    }

    /// Byte offset of slot `slot` on the disk.
    pub fn slot_at(&self, slot: u64) -> u64 {
        self.slot_offset + slot * SLOT_BYTES
    }

    /// Encodes the label into a 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_BYTES as usize];
        b[0..8].copy_from_slice(LABEL_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        b[16..32].copy_from_slice(self.disk_id.as_bytes());
        b[32..48].copy_from_slice(self.node_id.as_bytes());
        b[48..64].copy_from_slice(self.cluster_id.as_bytes());
        put_u64(&mut b, 64, self.disk_bytes);
        put_u64(&mut b, 72, self.log_offset);
        put_u64(&mut b, 80, self.log_bytes);
        put_u64(&mut b, 88, self.slot_offset);
        put_u64(&mut b, 96, SLOT_BYTES);
        put_u64(&mut b, 104, self.slot_count);
        put_u32(&mut b, 112, BLOCK_BYTES as u32);
        put_u32(&mut b, 116, EXTENT_BLOCKS as u32);
        put_u64(&mut b, 120, self.created);
        let crc = crc_with_hole(&b, 12);
        put_u32(&mut b, 12, crc);
        b
    }

    /// Decodes and validates a label block.
    pub fn decode(b: &[u8]) -> Result<Label, FormatError> {
        if b.len() < BLOCK_BYTES as usize || &b[0..8] != LABEL_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let b = &b[..BLOCK_BYTES as usize];
        if crc_with_hole(b, 12) != get_u32(b, 12) {
            return Err(FormatError::BadChecksum);
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        if get_u64(b, 96) != SLOT_BYTES
            || u64::from(get_u32(b, 112)) != BLOCK_BYTES
            || u64::from(get_u32(b, 116)) != EXTENT_BLOCKS
        {
            return Err(FormatError::Invalid("geometry"));
        }
        let uuid = |at: usize| {
            let mut id = [0u8; 16];
            id.copy_from_slice(&b[at..at + 16]);
            Uuid::from_bytes(id)
        };
        let label = Label {
            disk_id: uuid(16),
            node_id: uuid(32),
            cluster_id: uuid(48),
            disk_bytes: get_u64(b, 64),
            log_offset: get_u64(b, 72),
            log_bytes: get_u64(b, 80),
            slot_offset: get_u64(b, 88),
            slot_count: get_u64(b, 104),
            created: get_u64(b, 120),
        };
        let slots_end = label
            .slot_count
            .checked_mul(SLOT_BYTES)
            .and_then(|s| s.checked_add(label.slot_offset));
        if !label.log_offset.is_multiple_of(BLOCK_BYTES)
            || !label.log_bytes.is_multiple_of(BLOCK_BYTES)
            || label.log_bytes == 0
            || !label.slot_offset.is_multiple_of(BLOCK_BYTES)
            || label
                .log_offset
                .checked_add(label.log_bytes)
                .is_none_or(|e| e > label.slot_offset)
            || slots_end.is_none_or(|e| e > label.disk_bytes)
        {
            return Err(FormatError::Invalid("layout"));
        }
        Ok(label)
    }
}

// ---------------------------------------------------------------------------
// Extent metadata block
// ---------------------------------------------------------------------------

/// One block's metadata: generation, whether it holds data, and its crc32c.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockEntry {
    /// Write generation of the block (0: never written since allocation).
    pub generation: u64,
    /// The block holds data; otherwise it reads as zeros.
    pub has_data: bool,
    /// The block's contents are lost: reads fail with an I/O error.
    pub lost: bool,
    /// crc32c of the block's data (meaningful when `has_data`).
    pub crc: u32,
}

/// A slot's metadata block (A or B).
///
/// | bytes | field |
/// |---|---|
/// | 0..8 | magic `BSLTMETA` |
/// | 8..12 | crc32c of the 4 KiB block with this field zero |
/// | 12..16 | format version |
/// | 16..24 | vdisk id |
/// | 24..32 | extent index within the vdisk |
/// | 32..40 | allocation id (unique per slot allocation, never reused) |
/// | 40..48 | sequence number (the valid block with the higher one wins) |
/// | 48..56 | extent generation (highest block generation) |
/// | 56..64 | zero |
/// | 64 + 12·i | block i: u64 generation (bit 63 = holds data), u32 crc32c |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMeta {
    /// Owning vdisk.
    pub vdisk_id: u64,
    /// Extent index within the vdisk.
    pub extent: u64,
    /// Allocation id of the slot tenancy this block describes.
    pub alloc_id: u64,
    /// Sequence number of this metadata version.
    pub seq: u64,
    /// Entries of the 256 blocks.
    pub entries: Vec<BlockEntry>,
}

impl ExtentMeta {
    /// Metadata of a freshly allocated extent (every block reads zeros).
    pub fn empty(vdisk_id: u64, extent: u64, alloc_id: u64) -> ExtentMeta {
        ExtentMeta {
            vdisk_id,
            extent,
            alloc_id,
            seq: 0,
            entries: vec![BlockEntry::default(); EXTENT_BLOCKS as usize],
        }
    }

    /// Metadata of an extent written whole (copy-on-write) at `generation`,
    /// one crc per block, as its remap record describes it (sequence 0: not
    /// yet written to the slot).
    pub fn written_whole(
        vdisk_id: u64,
        extent: u64,
        alloc_id: u64,
        generation: u64,
        crcs: &[u32],
    ) -> ExtentMeta {
        let mut meta = ExtentMeta::empty(vdisk_id, extent, alloc_id);
        for (entry, &crc) in meta.entries.iter_mut().zip(crcs) {
            *entry = BlockEntry {
                generation,
                has_data: true,
                lost: false,
                crc,
            };
        }
        meta
    }

    /// Highest generation of any block.
    pub fn extent_gen(&self) -> u64 {
        self.entries.iter().map(|e| e.generation).max().unwrap_or(0)
    }

    /// Encodes into a 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_BYTES as usize];
        b[0..8].copy_from_slice(META_MAGIC);
        put_u32(&mut b, 12, FORMAT_VERSION);
        put_u64(&mut b, 16, self.vdisk_id);
        put_u64(&mut b, 24, self.extent);
        put_u64(&mut b, 32, self.alloc_id);
        put_u64(&mut b, 40, self.seq);
        put_u64(&mut b, 48, self.extent_gen());
        for (i, e) in self.entries.iter().enumerate().take(EXTENT_BLOCKS as usize) {
            let at = META_ENTRIES_AT + i * META_ENTRY_BYTES;
            let word = (e.generation & !ENTRY_FLAGS)
                | if e.has_data { ENTRY_HAS_DATA } else { 0 }
                | if e.lost { ENTRY_LOST } else { 0 };
            put_u64(&mut b, at, word);
            put_u32(&mut b, at + 8, e.crc);
        }
        let crc = crc_with_hole(&b, 8);
        put_u32(&mut b, 8, crc);
        b
    }

    /// Decodes and validates a metadata block.
    pub fn decode(b: &[u8]) -> Result<ExtentMeta, FormatError> {
        if b.len() < BLOCK_BYTES as usize || &b[0..8] != META_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let b = &b[..BLOCK_BYTES as usize];
        if crc_with_hole(b, 8) != get_u32(b, 8) {
            return Err(FormatError::BadChecksum);
        }
        let version = get_u32(b, 12);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        let entries = (0..EXTENT_BLOCKS as usize)
            .map(|i| {
                let at = META_ENTRIES_AT + i * META_ENTRY_BYTES;
                let word = get_u64(b, at);
                BlockEntry {
                    generation: word & !ENTRY_FLAGS,
                    has_data: word & ENTRY_HAS_DATA != 0,
                    lost: word & ENTRY_LOST != 0,
                    crc: get_u32(b, at + 8),
                }
            })
            .collect();
        Ok(ExtentMeta {
            vdisk_id: get_u64(b, 16),
            extent: get_u64(b, 24),
            alloc_id: get_u64(b, 32),
            seq: get_u64(b, 40),
            entries,
        })
    }

    /// Chooses the current metadata of a slot from its two blocks: the valid
    /// one that belongs to `(vdisk_id, extent, alloc_id)` with the higher
    /// sequence number. Blocks left by an earlier tenant of the slot (another
    /// allocation id, or never written) make the extent [`MetaChoice::Fresh`];
    /// a block that is ours by its magic but fails its checksum, with no valid
    /// copy beside it, makes it [`MetaChoice::Damaged`].
    pub fn choose(a: &[u8], b: &[u8], vdisk_id: u64, extent: u64, alloc_id: u64) -> MetaChoice {
        let mut best: Option<ExtentMeta> = None;
        let mut damaged = false;
        for copy in [a, b] {
            match ExtentMeta::decode(copy) {
                Ok(m) if m.vdisk_id == vdisk_id && m.extent == extent && m.alloc_id == alloc_id => {
                    if best.as_ref().is_none_or(|b| m.seq > b.seq) {
                        best = Some(m);
                    }
                }
                Ok(_) | Err(FormatError::BadMagic) => {}
                Err(_) => damaged = true,
            }
        }
        match best {
            Some(m) => MetaChoice::Valid(m),
            None if damaged => MetaChoice::Damaged,
            None => MetaChoice::Fresh,
        }
    }

    /// Metadata for an extent whose metadata was lost: every block fails reads
    /// until it is written again.
    pub fn lost(vdisk_id: u64, extent: u64, alloc_id: u64) -> ExtentMeta {
        let mut m = ExtentMeta::empty(vdisk_id, extent, alloc_id);
        for e in &mut m.entries {
            e.lost = true;
        }
        m
    }

    /// Which of the two metadata blocks (0 = A, 1 = B) the version `seq` is written to.
    pub fn copy_for_seq(seq: u64) -> u64 {
        seq % 2
    }
}

/// What a slot's two metadata blocks say about an extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaChoice {
    /// A valid metadata block of this tenancy.
    Valid(ExtentMeta),
    /// No metadata of this tenancy was ever written.
    Fresh,
    /// Metadata of this tenancy exists but is damaged beyond use.
    Damaged,
}

// ---------------------------------------------------------------------------
// Oplog batches
// ---------------------------------------------------------------------------

/// What a log record does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    /// Blocks written with data carried in the batch; one crc per block.
    Write {
        /// Index of the record's first data block in the batch's data area.
        data_index: u32,
        /// crc32c of each block.
        crcs: Vec<u32>,
    },
    /// Blocks set to read as zeros (trim, write-zeroes).
    Zero,
    /// The extent now lives in a freshly written slot (copy-on-write of a
    /// full-extent write). Carries the crc of every block so replay can tell
    /// whether the slot's data reached the disk.
    Remap {
        /// crc32c of each of the extent's blocks.
        crcs: Vec<u32>,
    },
    /// The extent no longer has a slot (discarded whole).
    Unmap,
    /// Part of an extent's rewrite, written copy-on-write into the slot
    /// `slot` of the new tenancy `alloc_id` at the blocks' own offsets
    /// (a *shadow* slot; the extent's current slot is untouched). The parts
    /// of one rewrite arrive in block order from block 0; the part that
    /// makes them whole carries `completes` and switches the extent to the
    /// shadow slot. Until then (and for every part of a rewrite that was
    /// interrupted) each part's blocks count as written to the extent's
    /// current tenancy, their data read from the shadow slot.
    Shadow {
        /// crc32c of each block of the part.
        crcs: Vec<u32>,
        /// This part makes the rewrite whole: the extent moves to the slot.
        completes: bool,
    },
}

/// One change recorded in the oplog.
///
/// | bytes | field |
/// |---|---|
/// | 0 | kind: 1 write, 2 zero, 3 remap, 4 unmap, 5 shadow |
/// | 1 | flags: bit 0 = shadow part that completes its rewrite; else zero |
/// | 2..4 | block count |
/// | 4..6 | first block within the extent |
/// | 6..8 | zero |
/// | 8..16 | vdisk id |
/// | 16..24 | extent index |
/// | 24..32 | allocation id (the slot tenancy the change applies to; for remap the new one) |
/// | 32..40 | slot number |
/// | 40..48 | generation of the change |
/// | 48..52 | write: index of the first data block in the batch |
/// | 52..56 | zero |
/// | 56.. | write, remap and shadow: one u32 crc32c per block |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Vdisk the change belongs to.
    pub vdisk_id: u64,
    /// Extent index.
    pub extent: u64,
    /// Slot tenancy.
    pub alloc_id: u64,
    /// Slot number on this disk.
    pub slot: u64,
    /// First block within the extent.
    pub first_block: u16,
    /// Number of blocks.
    pub blocks: u16,
    /// Generation.
    pub generation: u64,
    /// The change.
    pub kind: RecordKind,
}

const RECORD_FIXED_BYTES: usize = 56;
const LOG_HEADER_FIXED_BYTES: usize = 64;

impl Record {
    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        RECORD_FIXED_BYTES
            + match &self.kind {
                RecordKind::Write { crcs, .. }
                | RecordKind::Remap { crcs }
                | RecordKind::Shadow { crcs, .. } => 4 * crcs.len(),
                _ => 0,
            }
    }

    fn encode_into(&self, b: &mut [u8]) {
        let (kind, flags, data_index) = match &self.kind {
            RecordKind::Write { data_index, .. } => (1u8, 0u8, *data_index),
            RecordKind::Zero => (2, 0, 0),
            RecordKind::Remap { .. } => (3, 0, 0),
            RecordKind::Unmap => (4, 0, 0),
            RecordKind::Shadow { completes, .. } => (5, u8::from(*completes), 0),
        };
        b[0] = kind;
        b[1] = flags;
        put_u16(b, 2, self.blocks);
        put_u16(b, 4, self.first_block);
        put_u64(b, 8, self.vdisk_id);
        put_u64(b, 16, self.extent);
        put_u64(b, 24, self.alloc_id);
        put_u64(b, 32, self.slot);
        put_u64(b, 40, self.generation);
        put_u32(b, 48, data_index);
        if let RecordKind::Write { crcs, .. }
        | RecordKind::Remap { crcs }
        | RecordKind::Shadow { crcs, .. } = &self.kind
        {
            for (i, crc) in crcs.iter().enumerate() {
                put_u32(b, RECORD_FIXED_BYTES + 4 * i, *crc);
            }
        }
    }

    /// Decodes one record from the front of `b`; returns it and its length.
    fn decode(b: &[u8]) -> Result<(Record, usize), FormatError> {
        if b.len() < RECORD_FIXED_BYTES {
            return Err(FormatError::Invalid("truncated record"));
        }
        let blocks = get_u16(b, 2);
        let first_block = get_u16(b, 4);
        if blocks == 0 || u64::from(first_block) + u64::from(blocks) > EXTENT_BLOCKS {
            return Err(FormatError::Invalid("record block range"));
        }
        let mut len = RECORD_FIXED_BYTES;
        let crcs = |len: &mut usize| {
            let n = usize::from(blocks);
            *len += 4 * n;
            if b.len() < *len {
                return Err(FormatError::Invalid("truncated record checksums"));
            }
            Ok((0..n)
                .map(|i| get_u32(b, RECORD_FIXED_BYTES + 4 * i))
                .collect::<Vec<u32>>())
        };
        let kind = match b[0] {
            1 => RecordKind::Write {
                data_index: get_u32(b, 48),
                crcs: crcs(&mut len)?,
            },
            2 => RecordKind::Zero,
            3 => {
                if u64::from(blocks) != EXTENT_BLOCKS {
                    return Err(FormatError::Invalid("remap record must cover the extent"));
                }
                RecordKind::Remap {
                    crcs: crcs(&mut len)?,
                }
            }
            4 => RecordKind::Unmap,
            5 => {
                if b[1] > 1 {
                    return Err(FormatError::Invalid("shadow record flags"));
                }
                RecordKind::Shadow {
                    completes: b[1] == 1,
                    crcs: crcs(&mut len)?,
                }
            }
            _ => return Err(FormatError::Invalid("record kind")),
        };
        let record = Record {
            vdisk_id: get_u64(b, 8),
            extent: get_u64(b, 16),
            alloc_id: get_u64(b, 24),
            slot: get_u64(b, 32),
            first_block,
            blocks,
            generation: get_u64(b, 40),
            kind,
        };
        Ok((record, len))
    }
}

/// The header of an oplog batch, followed on disk by `data_blocks` blocks.
///
/// | bytes | field |
/// |---|---|
/// | 0..8 | magic `BSLTLOG1` |
/// | 8..12 | crc32c of all header blocks with this field zero |
/// | 12..16 | format version |
/// | 16..24 | log sequence number (LSN) of the batch; consecutive batches differ by 1 |
/// | 24..32 | durable LSN: every batch up to it was synced before this header was built |
/// | 32..36 | header blocks (4 KiB each) |
/// | 36..40 | data blocks following the header |
/// | 40..44 | record count |
/// | 44..48 | zero |
/// | 48..64 | disk id (a log is only replayed on its own disk) |
/// | 64.. | records, back to back |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    /// Sequence number.
    pub lsn: u64,
    /// Highest LSN known durable when the header was built.
    pub durable_lsn: u64,
    /// Number of data blocks after the header.
    pub data_blocks: u32,
    /// Disk the batch belongs to.
    pub disk_id: Uuid,
    /// The changes.
    pub records: Vec<Record>,
}

impl BatchHeader {
    /// Size of the encoded header rounded up to whole blocks.
    pub fn header_blocks(&self) -> u32 {
        let bytes =
            LOG_HEADER_FIXED_BYTES + self.records.iter().map(Record::encoded_len).sum::<usize>();
        bytes.div_ceil(BLOCK_BYTES as usize) as u32
    }

    /// Total bytes of the batch on disk (header and data).
    pub fn total_bytes(&self) -> u64 {
        (u64::from(self.header_blocks()) + u64::from(self.data_blocks)) * BLOCK_BYTES
    }

    /// Encodes the header blocks.
    pub fn encode(&self) -> Vec<u8> {
        let header_blocks = self.header_blocks();
        let mut b = vec![0u8; header_blocks as usize * BLOCK_BYTES as usize];
        b[0..8].copy_from_slice(LOG_MAGIC);
        put_u32(&mut b, 12, FORMAT_VERSION);
        put_u64(&mut b, 16, self.lsn);
        put_u64(&mut b, 24, self.durable_lsn);
        put_u32(&mut b, 32, header_blocks);
        put_u32(&mut b, 36, self.data_blocks);
        put_u32(&mut b, 40, self.records.len() as u32);
        b[48..64].copy_from_slice(self.disk_id.as_bytes());
        let mut at = LOG_HEADER_FIXED_BYTES;
        for r in &self.records {
            let len = r.encoded_len();
            r.encode_into(&mut b[at..at + len]);
            at += len;
        }
        let crc = crc_with_hole(&b, 8);
        put_u32(&mut b, 8, crc);
        b
    }

    /// How many header blocks the batch starting with `first_block` claims,
    /// after checking magic and version (the checksum needs all of them).
    pub fn peek_header_blocks(first_block: &[u8]) -> Result<u32, FormatError> {
        if first_block.len() < LOG_HEADER_FIXED_BYTES || &first_block[0..8] != LOG_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = get_u32(first_block, 12);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        let blocks = get_u32(first_block, 32);
        if blocks == 0 || blocks > 64 {
            return Err(FormatError::Invalid("header block count"));
        }
        Ok(blocks)
    }

    /// Decodes and validates the header blocks of a batch.
    pub fn decode(b: &[u8]) -> Result<BatchHeader, FormatError> {
        let header_blocks = BatchHeader::peek_header_blocks(b)?;
        let header_len = header_blocks as usize * BLOCK_BYTES as usize;
        if b.len() < header_len {
            return Err(FormatError::Invalid("truncated header"));
        }
        let b = &b[..header_len];
        if crc_with_hole(b, 8) != get_u32(b, 8) {
            return Err(FormatError::BadChecksum);
        }
        let count = get_u32(b, 40) as usize;
        let data_blocks = get_u32(b, 36);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[48..64]);
        let mut records = Vec::with_capacity(count.min(4096));
        let mut at = LOG_HEADER_FIXED_BYTES;
        for _ in 0..count {
            let (record, len) = Record::decode(&b[at..])?;
            if let RecordKind::Write { data_index, .. } = &record.kind
                && u64::from(*data_index) + u64::from(record.blocks) > u64::from(data_blocks)
            {
                return Err(FormatError::Invalid("write record data range"));
            }
            records.push(record);
            at += len;
        }
        Ok(BatchHeader {
            lsn: get_u64(b, 16),
            durable_lsn: get_u64(b, 24),
            data_blocks,
            disk_id: Uuid::from_bytes(id),
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn label_round_trip_and_damage() {
        let label = Label::plan(Uuid::new_v4(), Uuid::new_v4(), 16 << 30, 1_700_000_000);
        assert_eq!(label.log_bytes, 512 << 20);
        assert!(label.slot_count > 15_000);
        let mut bytes = label.encode();
        assert_eq!(Label::decode(&bytes), Ok(label.clone()));
        bytes[70] ^= 1;
        assert_eq!(Label::decode(&bytes), Err(FormatError::BadChecksum));
        bytes[0] = b'X';
        assert_eq!(Label::decode(&bytes), Err(FormatError::BadMagic));
    }

    #[test]
    fn small_disk_plan_fits() {
        let label = Label::plan(Uuid::new_v4(), Uuid::new_v4(), 64 << 20, 0);
        assert_eq!(label.log_bytes, 16 << 20);
        assert!(label.slot_at(label.slot_count) <= 64 << 20);
        assert!(label.slot_count >= 40);
    }

    #[test]
    fn meta_round_trip_and_choice() {
        let mut m = ExtentMeta::empty(7, 3, 99);
        m.seq = 4;
        m.entries[5] = BlockEntry {
            generation: 12,
            has_data: true,
            lost: false,
            crc: 0xdead_beef,
        };
        m.entries[6] = BlockEntry {
            generation: 13,
            has_data: false,
            lost: true,
            crc: 0,
        };
        let a = m.encode();
        assert_eq!(ExtentMeta::decode(&a), Ok(m.clone()));
        assert_eq!(m.extent_gen(), 13);
        let mut newer = m.clone();
        newer.seq = 5;
        newer.entries[5].generation = 20;
        let b = newer.encode();
        assert_eq!(
            ExtentMeta::choose(&a, &b, 7, 3, 99),
            MetaChoice::Valid(newer)
        );
        // A torn B leaves A.
        let mut torn = b.clone();
        torn[100] ^= 0xff;
        assert_eq!(
            ExtentMeta::choose(&a, &torn, 7, 3, 99),
            MetaChoice::Valid(m.clone())
        );
        // A previous tenant's metadata, or none at all, is a fresh extent.
        assert_eq!(ExtentMeta::choose(&a, &b, 7, 3, 100), MetaChoice::Fresh);
        assert_eq!(
            ExtentMeta::choose(&[0; 4096], &[0; 4096], 7, 3, 99),
            MetaChoice::Fresh
        );
        // Ours but damaged, with no good copy: damaged.
        let mut torn_a = a.clone();
        torn_a[200] ^= 1;
        assert_eq!(
            ExtentMeta::choose(&torn_a, &torn, 7, 3, 99),
            MetaChoice::Damaged
        );
    }

    #[test]
    fn batch_round_trip() {
        let header = BatchHeader {
            lsn: 42,
            durable_lsn: 40,
            data_blocks: 3,
            disk_id: Uuid::new_v4(),
            records: vec![
                Record {
                    vdisk_id: 1,
                    extent: 2,
                    alloc_id: 3,
                    slot: 4,
                    first_block: 10,
                    blocks: 3,
                    generation: 77,
                    kind: RecordKind::Write {
                        data_index: 0,
                        crcs: vec![1, 2, 3],
                    },
                },
                Record {
                    vdisk_id: 1,
                    extent: 5,
                    alloc_id: 6,
                    slot: 7,
                    first_block: 0,
                    blocks: 256,
                    generation: 78,
                    kind: RecordKind::Remap { crcs: vec![9; 256] },
                },
                Record {
                    vdisk_id: 1,
                    extent: 8,
                    alloc_id: 9,
                    slot: 10,
                    first_block: 0,
                    blocks: 126,
                    generation: 79,
                    kind: RecordKind::Shadow {
                        crcs: (0..126).collect(),
                        completes: false,
                    },
                },
                Record {
                    vdisk_id: 1,
                    extent: 8,
                    alloc_id: 9,
                    slot: 10,
                    first_block: 126,
                    blocks: 130,
                    generation: 80,
                    kind: RecordKind::Shadow {
                        crcs: (0..130).map(|c| c * 3).collect(),
                        completes: true,
                    },
                },
            ],
        };
        let bytes = header.encode();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(BatchHeader::decode(&bytes), Ok(header.clone()));
        assert_eq!(header.total_bytes(), 4 * 4096);
        let mut damaged = bytes.clone();
        damaged[200] ^= 1;
        assert_eq!(BatchHeader::decode(&damaged), Err(FormatError::BadChecksum));
    }

    #[test]
    fn large_batch_spans_header_blocks() {
        let records: Vec<Record> = (0..40)
            .map(|i| Record {
                vdisk_id: 1,
                extent: i,
                alloc_id: i,
                slot: i,
                first_block: 0,
                blocks: 256,
                generation: i,
                kind: RecordKind::Write {
                    data_index: (i * 256) as u32,
                    crcs: vec![i as u32; 256],
                },
            })
            .collect();
        let header = BatchHeader {
            lsn: 1,
            durable_lsn: 0,
            data_blocks: 40 * 256,
            disk_id: Uuid::nil(),
            records,
        };
        assert!(header.header_blocks() > 1);
        assert_eq!(BatchHeader::decode(&header.encode()), Ok(header));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let _ = Label::decode(&bytes);
            let _ = ExtentMeta::decode(&bytes);
            let _ = BatchHeader::decode(&bytes);
        }

        #[test]
        fn decoders_never_panic_with_valid_magic(mut bytes in proptest::collection::vec(any::<u8>(), 64..9000), blocks in 1u32..3) {
            bytes[0..8].copy_from_slice(LOG_MAGIC);
            put_u32(&mut bytes, 12, FORMAT_VERSION);
            put_u32(&mut bytes, 32, blocks);
            let crc = crc_with_hole(&bytes[..bytes.len().min(blocks as usize * 4096)], 8);
            if bytes.len() >= blocks as usize * 4096 { put_u32(&mut bytes, 8, crc); }
            let _ = BatchHeader::decode(&bytes);
        }
    }
}

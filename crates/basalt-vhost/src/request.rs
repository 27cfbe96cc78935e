//! virtio-blk requests, parsed without touching guest memory.
//!
//! A request arrives as a descriptor chain: a list of guest-physical buffers,
//! the device-readable ones first, then the device-writable ones (virtio 1.x,
//! section 2.7.4). virtio-blk lays a request out as one byte stream over those
//! buffers, with no regard to where one descriptor ends and the next begins
//! (`VIRTIO_F_ANY_LAYOUT` is implied by `VIRTIO_F_VERSION_1`):
//!
//! ```text
//!  device-readable                          device-writable
//! ┌──────────────────┬────────────────────┐┌────────────────────┬────────┐
//! │ header (16 B)    │ out data           ││ in data            │ status │
//! │ type ioprio sector│ (OUT, DISCARD, …)  ││ (IN, GET_ID)       │ (1 B)  │
//! └──────────────────┴────────────────────┘└────────────────────┴────────┘
//! ```
//!
//! This module turns a chain's shape ([`ChainLayout`]) into a [`Frame`] (where
//! the header, data and status byte are), a header into an [`Op`] checked
//! against the device's limits ([`classify`]), and a discard/write-zeroes
//! payload into byte ranges ([`parse_ranges`]). Everything here is pure: the
//! caller copies bytes out of guest memory, which keeps these functions easy
//! to unit-test and to fuzz.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// virtio-blk addresses the disk in 512-byte sectors, whatever its block size.
pub const SECTOR_SIZE: u64 = 512;

/// Length of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;

/// Length of the answer to `VIRTIO_BLK_T_GET_ID`.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Length of one discard/write-zeroes segment
/// (`struct virtio_blk_discard_write_zeroes`).
pub const RANGE_LEN: usize = 16;

/// One guest-physical buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of the first byte.
    pub addr: u64,
    /// Length in bytes (never zero inside a [`ChainLayout`]).
    pub len: u32,
}

/// Why a descriptor chain cannot be a virtio-blk request at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The chain is longer than 4 GiB in total (virtio forbids it).
    #[error("descriptor chain longer than 4 GiB")]
    TooLong,
    /// A descriptor wraps around the end of the 64-bit address space.
    #[error("descriptor at {addr:#x} + {len} wraps around the address space")]
    AddressOverflow {
        /// Guest-physical address of the descriptor.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// The shape of a descriptor chain: its device-readable buffers, then its
/// device-writable buffers, in chain order. Zero-length descriptors are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainLayout {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    total: u64,
}

impl ChainLayout {
    /// An empty chain.
    pub fn new() -> ChainLayout {
        ChainLayout::default()
    }

    /// Appends the next descriptor of the chain.
    pub fn push(&mut self, addr: u64, len: u32, writable: bool) -> Result<(), LayoutError> {
        if len == 0 {
            return Ok(());
        }
        if addr.checked_add(u64::from(len) - 1).is_none() {
            return Err(LayoutError::AddressOverflow { addr, len });
        }
        if !writable && !self.writable.is_empty() {
            return Err(LayoutError::ReadableAfterWritable);
        }
        self.total += u64::from(len);
        if self.total > u64::from(u32::MAX) {
            return Err(LayoutError::TooLong);
        }
        let segment = Segment { addr, len };
        if writable {
            self.writable.push(segment);
        } else {
            self.readable.push(segment);
        }
        Ok(())
    }

    /// The device-readable buffers.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// The device-writable buffers.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }
}

/// Total length of `segments` in bytes.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segments` after the first `at` bytes, cutting a segment in two when
/// the boundary falls inside it. `None` if the segments hold fewer than `at` bytes.
pub fn split_segments(segments: &[Segment], at: u64) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut remaining = at;
    for segment in segments {
        let len = u64::from(segment.len);
        if remaining == 0 {
            tail.push(*segment);
        } else if len <= remaining {
            head.push(*segment);
            remaining -= len;
        } else {
            // remaining < len <= u32::MAX, so both casts are exact, and the
            // address cannot overflow: ChainLayout checked addr + len - 1.
            let cut = remaining as u32;
            head.push(Segment {
                addr: segment.addr,
                len: cut,
            });
            tail.push(Segment {
                addr: segment.addr + remaining,
                len: segment.len - cut,
            });
            remaining = 0;
        }
    }
    (remaining == 0).then_some((head, tail))
}

/// Where the parts of one request lie in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The 16 header bytes.
    pub header: Vec<Segment>,
    /// Device-readable bytes after the header (OUT data, discard ranges).
    pub out_data: Vec<Segment>,
    /// Device-writable bytes before the status byte (IN data, GET_ID answer).
    pub in_data: Vec<Segment>,
    /// Guest-physical address of the status byte: the chain's last byte.
    pub status: u64,
}

/// Why a chain does not frame a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// No device-writable byte: there is nowhere to put a status, so the chain
    /// can only be returned to the guest unanswered.
    #[error("no device-writable byte for the status")]
    NoStatus,
    /// Fewer than 16 device-readable bytes: answer `IOERR` at `status`.
    #[error("request header shorter than 16 bytes")]
    ShortHeader {
        /// Guest-physical address of the status byte.
        status: u64,
    },
}

/// Finds the header, data and status byte of a request in a chain.
pub fn frame(layout: &ChainLayout) -> Result<Frame, FrameError> {
    let writable_len = total_len(layout.writable());
    if writable_len == 0 {
        return Err(FrameError::NoStatus);
    }
    let (in_data, status_part) =
        split_segments(layout.writable(), writable_len - 1).ok_or(FrameError::NoStatus)?;
    let status = status_part.first().ok_or(FrameError::NoStatus)?.addr;
    let (header, out_data) = split_segments(layout.readable(), HEADER_LEN as u64)
        .ok_or(FrameError::ShortHeader { status })?;
    Ok(Frame {
        header,
        out_data,
        in_data,
        status,
    })
}

/// The request header (`struct virtio_blk_outhdr`, little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `VIRTIO_BLK_T_*`.
    pub request_type: u32,
    /// Priority hint (ignored).
    pub ioprio: u32,
    /// First sector (512 bytes) of the request.
    pub sector: u64,
}

impl Header {
    /// Decodes the 16 header bytes.
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Header {
        let [
            t0,
            t1,
            t2,
            t3,
            p0,
            p1,
            p2,
            p3,
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
        ] = *bytes;
        Header {
            request_type: u32::from_le_bytes([t0, t1, t2, t3]),
            ioprio: u32::from_le_bytes([p0, p1, p2, p3]),
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        }
    }
}

/// The status byte a request completes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `VIRTIO_BLK_S_OK`.
    Ok,
    /// `VIRTIO_BLK_S_IOERR`: the request failed or was malformed.
    IoErr,
    /// `VIRTIO_BLK_S_UNSUPP`: the request type or flags are not supported.
    Unsupp,
}

impl Status {
    /// The byte written to the guest.
    pub fn byte(self) -> u8 {
        let value = match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        };
        value as u8
    }
}

/// What the device offers, as far as request checking is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Size of the disk in bytes.
    pub capacity: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// `VIRTIO_BLK_F_DISCARD` was negotiated.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES` was negotiated.
    pub write_zeroes: bool,
    /// Largest IN/OUT data length in bytes.
    pub max_transfer: u32,
    /// Largest sector count of one discard segment.
    pub max_discard_sectors: u32,
    /// Most segments in one discard request.
    pub max_discard_segments: u32,
    /// Largest sector count of one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_segments: u32,
}

/// A checked request, ready to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into the in data.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes (a multiple of 512, possibly zero).
        len: u32,
    },
    /// Write the out data (`len` bytes) at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes (a multiple of 512, possibly zero).
        len: u32,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the first `len` bytes of the device id into the in data.
    GetId {
        /// Bytes to write (at most 20).
        len: u32,
    },
    /// Discard the ranges in the out data (`payload_len` bytes, see [`parse_ranges`]).
    Discard {
        /// Length of the range list in bytes.
        payload_len: u32,
    },
    /// Zero the ranges in the out data (`payload_len` bytes, see [`parse_ranges`]).
    WriteZeroes {
        /// Length of the range list in bytes.
        payload_len: u32,
    },
}

/// Checks a request's header and framing against the device and says what to do.
/// An `Err` is the status to complete the request with, without doing anything.
pub fn classify(header: &Header, frame: &Frame, limits: &DeviceLimits) -> Result<Op, Status> {
    match header.request_type {
        VIRTIO_BLK_T_IN => {
            let len = transfer_len(total_len(&frame.in_data), limits)?;
            let offset = checked_range(header.sector, u64::from(len), limits)?;
            Ok(Op::Read { offset, len })
        }
        VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                return Err(Status::IoErr);
            }
            let len = transfer_len(total_len(&frame.out_data), limits)?;
            let offset = checked_range(header.sector, u64::from(len), limits)?;
            Ok(Op::Write { offset, len })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Op::Flush),
        VIRTIO_BLK_T_GET_ID => {
            let room = total_len(&frame.in_data);
            if room == 0 {
                return Err(Status::IoErr);
            }
            Ok(Op::GetId {
                len: room.min(ID_LEN as u64) as u32,
            })
        }
        VIRTIO_BLK_T_DISCARD => {
            if !limits.discard {
                return Err(Status::Unsupp);
            }
            if limits.read_only {
                return Err(Status::IoErr);
            }
            let payload_len = range_payload_len(frame, limits.max_discard_segments)?;
            Ok(Op::Discard { payload_len })
        }
        VIRTIO_BLK_T_WRITE_ZEROES => {
            if !limits.write_zeroes {
                return Err(Status::Unsupp);
            }
            if limits.read_only {
                return Err(Status::IoErr);
            }
            let payload_len = range_payload_len(frame, limits.max_write_zeroes_segments)?;
            Ok(Op::WriteZeroes { payload_len })
        }
        _ => Err(Status::Unsupp),
    }
}

fn transfer_len(len: u64, limits: &DeviceLimits) -> Result<u32, Status> {
    if !len.is_multiple_of(SECTOR_SIZE) || len > u64::from(limits.max_transfer) {
        return Err(Status::IoErr);
    }
    u32::try_from(len).map_err(|_| Status::IoErr)
}

/// Byte offset of `sector`, if `[sector * 512, + len)` lies on the disk.
fn checked_range(sector: u64, len: u64, limits: &DeviceLimits) -> Result<u64, Status> {
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Status::IoErr)?;
    let end = offset.checked_add(len).ok_or(Status::IoErr)?;
    if end > limits.capacity {
        return Err(Status::IoErr);
    }
    Ok(offset)
}

fn range_payload_len(frame: &Frame, max_segments: u32) -> Result<u32, Status> {
    let len = total_len(&frame.out_data);
    let count = len / RANGE_LEN as u64;
    if len == 0 || !len.is_multiple_of(RANGE_LEN as u64) || count > u64::from(max_segments) {
        return Err(Status::IoErr);
    }
    u32::try_from(len).map_err(|_| Status::IoErr)
}

/// Which command a range list belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeKind {
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
}

/// One range of a discard or write-zeroes request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes (a multiple of 512, never zero).
    pub len: u64,
    /// Write zeroes may deallocate the range (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`).
    pub unmap: bool,
}

/// Decodes and checks the range list of a discard or write-zeroes request.
/// Ranges of zero sectors are dropped.
pub fn parse_ranges(
    payload: &[u8],
    kind: RangeKind,
    limits: &DeviceLimits,
) -> Result<Vec<Range>, Status> {
    let max_sectors = match kind {
        RangeKind::Discard => limits.max_discard_sectors,
        RangeKind::WriteZeroes => limits.max_write_zeroes_sectors,
    };
    if payload.is_empty() || !payload.len().is_multiple_of(RANGE_LEN) {
        return Err(Status::IoErr);
    }
    let mut ranges = Vec::with_capacity(payload.len() / RANGE_LEN);
    for chunk in payload.chunks_exact(RANGE_LEN) {
        let mut sector = [0u8; 8];
        let mut num = [0u8; 4];
        let mut flags = [0u8; 4];
        sector.copy_from_slice(&chunk[0..8]);
        num.copy_from_slice(&chunk[8..12]);
        flags.copy_from_slice(&chunk[12..16]);
        let sector = u64::from_le_bytes(sector);
        let num_sectors = u32::from_le_bytes(num);
        let flags = u32::from_le_bytes(flags);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        match kind {
            // The unmap bit is reserved for discard (virtio 1.2, 5.2.6.2).
            RangeKind::Discard if flags != 0 => return Err(Status::Unsupp),
            RangeKind::WriteZeroes if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 => {
                return Err(Status::Unsupp);
            }
            _ => {}
        }
        if num_sectors > max_sectors {
            return Err(Status::IoErr);
        }
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = checked_range(sector, len, limits)?;
        if len > 0 {
            ranges.push(Range { offset, len, unmap });
        }
    }
    Ok(ranges)
}

/// The 20 bytes answered to `VIRTIO_BLK_T_GET_ID`: the id, cut to 20 bytes or
/// padded with NULs (the guest shows it as the disk's serial number).
pub fn id_bytes(id: &str) -> [u8; ID_LEN] {
    let mut out = [0u8; ID_LEN];
    let bytes = id.as_bytes();
    let n = bytes.len().min(ID_LEN);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits() -> DeviceLimits {
        DeviceLimits {
            capacity: 1 << 20,
            read_only: false,
            discard: true,
            write_zeroes: true,
            max_transfer: 64 * 1024,
            max_discard_sectors: 1024,
            max_discard_segments: 4,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_segments: 4,
        }
    }

    fn header(request_type: u32, sector: u64) -> Header {
        Header {
            request_type,
            ioprio: 0,
            sector,
        }
    }

    /// A chain: header descriptor, data descriptors, status descriptor.
    fn chain(data: &[(u64, u32)], data_writable: bool) -> ChainLayout {
        let mut layout = ChainLayout::new();
        layout.push(0x1000, 16, false).unwrap();
        for &(addr, len) in data {
            layout.push(addr, len, data_writable).unwrap();
        }
        layout.push(0x9000, 1, true).unwrap();
        layout
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, len }
    }

    #[test]
    fn header_is_little_endian() {
        let mut bytes = [0u8; 16];
        bytes[0] = 1;
        bytes[4] = 7;
        bytes[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(
            Header::from_bytes(&bytes),
            Header {
                request_type: 1,
                ioprio: 7,
                sector: 0x0102_0304_0506_0708
            }
        );
    }

    #[test]
    fn layout_refuses_readable_after_writable() {
        let mut layout = ChainLayout::new();
        layout.push(0, 16, false).unwrap();
        layout.push(100, 1, true).unwrap();
        assert_eq!(
            layout.push(200, 4, false),
            Err(LayoutError::ReadableAfterWritable)
        );
    }

    #[test]
    fn layout_skips_empty_and_refuses_wrapping_and_huge() {
        let mut layout = ChainLayout::new();
        layout.push(0, 0, true).unwrap();
        layout.push(5, 0, false).unwrap();
        assert!(layout.writable().is_empty() && layout.readable().is_empty());
        assert_eq!(
            layout.push(u64::MAX - 2, 4, false),
            Err(LayoutError::AddressOverflow {
                addr: u64::MAX - 2,
                len: 4
            })
        );
        layout.push(u64::MAX - 3, 4, false).unwrap();
        layout.push(0, u32::MAX - 4, false).unwrap();
        assert_eq!(layout.push(0, 1, true), Err(LayoutError::TooLong));
    }

    #[test]
    fn split_cuts_inside_segments() {
        let segs = [seg(0, 10), seg(100, 10)];
        assert_eq!(
            split_segments(&segs, 15),
            Some((vec![seg(0, 10), seg(100, 5)], vec![seg(105, 5)]))
        );
        assert_eq!(
            split_segments(&segs, 10),
            Some((vec![seg(0, 10)], vec![seg(100, 10)]))
        );
        assert_eq!(split_segments(&segs, 0), Some((vec![], segs.to_vec())));
        assert_eq!(split_segments(&segs, 20), Some((segs.to_vec(), vec![])));
        assert_eq!(split_segments(&segs, 21), None);
    }

    #[test]
    fn frame_of_classic_three_descriptor_chain() {
        let layout = chain(&[(0x2000, 4096)], true);
        let frame = frame(&layout).unwrap();
        assert_eq!(frame.header, vec![seg(0x1000, 16)]);
        assert!(frame.out_data.is_empty());
        assert_eq!(frame.in_data, vec![seg(0x2000, 4096)]);
        assert_eq!(frame.status, 0x9000);
    }

    #[test]
    fn frame_with_any_layout() {
        // Header and data in one readable descriptor; data and status in one
        // writable descriptor; header split over two descriptors.
        let mut layout = ChainLayout::new();
        layout.push(0x1000, 8, false).unwrap();
        layout.push(0x3000, 8 + 512, false).unwrap();
        layout.push(0x5000, 513, true).unwrap();
        let frame = frame(&layout).unwrap();
        assert_eq!(frame.header, vec![seg(0x1000, 8), seg(0x3000, 8)]);
        assert_eq!(frame.out_data, vec![seg(0x3008, 512)]);
        assert_eq!(frame.in_data, vec![seg(0x5000, 512)]);
        assert_eq!(frame.status, 0x5000 + 512);
    }

    #[test]
    fn frame_errors() {
        let mut layout = ChainLayout::new();
        layout.push(0x1000, 16, false).unwrap();
        assert_eq!(frame(&layout), Err(FrameError::NoStatus));
        let mut layout = ChainLayout::new();
        layout.push(0x1000, 15, false).unwrap();
        layout.push(0x2000, 1, true).unwrap();
        assert_eq!(
            frame(&layout),
            Err(FrameError::ShortHeader { status: 0x2000 })
        );
        assert_eq!(frame(&ChainLayout::new()), Err(FrameError::NoStatus));
    }

    fn classify_chain(request_type: u32, sector: u64, layout: &ChainLayout) -> Result<Op, Status> {
        classify(
            &header(request_type, sector),
            &frame(layout).unwrap(),
            &limits(),
        )
    }

    #[test]
    fn classify_reads_and_writes() {
        let read = chain(&[(0x2000, 4096), (0x4000, 512)], true);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_IN, 8, &read),
            Ok(Op::Read {
                offset: 4096,
                len: 4608
            })
        );
        let write = chain(&[(0x2000, 4096)], false);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_OUT, 2, &write),
            Ok(Op::Write {
                offset: 1024,
                len: 4096
            })
        );
        // The last sector of the disk is fine; one past it is not.
        let last = (1 << 20) / 512 - 8;
        assert!(classify_chain(VIRTIO_BLK_T_IN, last, &read).is_err());
        assert!(classify_chain(VIRTIO_BLK_T_OUT, last, &write).is_ok());
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_OUT, last + 1, &write),
            Err(Status::IoErr)
        );
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_IN, u64::MAX / 256, &read),
            Err(Status::IoErr)
        );
        // Zero-length transfers are accepted (and do nothing).
        let empty = chain(&[], true);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_IN, 0, &empty),
            Ok(Op::Read { offset: 0, len: 0 })
        );
    }

    #[test]
    fn classify_refuses_bad_transfers() {
        let odd = chain(&[(0x2000, 100)], true);
        assert_eq!(classify_chain(VIRTIO_BLK_T_IN, 0, &odd), Err(Status::IoErr));
        let huge = chain(&[(0x2000, 64 * 1024 + 512)], false);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_OUT, 0, &huge),
            Err(Status::IoErr)
        );
        let write = chain(&[(0x2000, 4096)], false);
        let ro = DeviceLimits {
            read_only: true,
            ..limits()
        };
        assert_eq!(
            classify(&header(VIRTIO_BLK_T_OUT, 0), &frame(&write).unwrap(), &ro),
            Err(Status::IoErr)
        );
    }

    #[test]
    fn classify_other_types() {
        let id = chain(&[(0x2000, 20)], true);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_GET_ID, 0, &id),
            Ok(Op::GetId { len: 20 })
        );
        let small = chain(&[(0x2000, 8)], true);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_GET_ID, 0, &small),
            Ok(Op::GetId { len: 8 })
        );
        let none = chain(&[], true);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_GET_ID, 0, &none),
            Err(Status::IoErr)
        );
        assert_eq!(classify_chain(VIRTIO_BLK_T_FLUSH, 0, &none), Ok(Op::Flush));
        assert_eq!(classify_chain(2, 0, &none), Err(Status::Unsupp));
        assert_eq!(classify_chain(0xdead, 0, &none), Err(Status::Unsupp));
    }

    #[test]
    fn classify_discard_and_write_zeroes() {
        let two = chain(&[(0x2000, 32)], false);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_DISCARD, 0, &two),
            Ok(Op::Discard { payload_len: 32 })
        );
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_WRITE_ZEROES, 0, &two),
            Ok(Op::WriteZeroes { payload_len: 32 })
        );
        let ragged = chain(&[(0x2000, 20)], false);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_DISCARD, 0, &ragged),
            Err(Status::IoErr)
        );
        let too_many = chain(&[(0x2000, 5 * 16)], false);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_DISCARD, 0, &too_many),
            Err(Status::IoErr)
        );
        let empty = chain(&[], false);
        assert_eq!(
            classify_chain(VIRTIO_BLK_T_WRITE_ZEROES, 0, &empty),
            Err(Status::IoErr)
        );
        let no_discard = DeviceLimits {
            discard: false,
            ..limits()
        };
        assert_eq!(
            classify(
                &header(VIRTIO_BLK_T_DISCARD, 0),
                &frame(&two).unwrap(),
                &no_discard
            ),
            Err(Status::Unsupp)
        );
    }

    fn range_bytes(sector: u64, num: u32, flags: u32) -> Vec<u8> {
        let mut out = sector.to_le_bytes().to_vec();
        out.extend_from_slice(&num.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out
    }

    #[test]
    fn ranges_decode_and_check() {
        let mut payload = range_bytes(8, 16, 0);
        payload.extend(range_bytes(100, 0, 0));
        payload.extend(range_bytes(200, 8, 0));
        assert_eq!(
            parse_ranges(&payload, RangeKind::Discard, &limits()),
            Ok(vec![
                Range {
                    offset: 4096,
                    len: 8192,
                    unmap: false
                },
                Range {
                    offset: 200 * 512,
                    len: 4096,
                    unmap: false
                }
            ])
        );
        let unmap = range_bytes(0, 8, 1);
        assert_eq!(
            parse_ranges(&unmap, RangeKind::WriteZeroes, &limits()),
            Ok(vec![Range {
                offset: 0,
                len: 4096,
                unmap: true
            }])
        );
        assert_eq!(
            parse_ranges(&unmap, RangeKind::Discard, &limits()),
            Err(Status::Unsupp)
        );
        assert_eq!(
            parse_ranges(&range_bytes(0, 8, 2), RangeKind::WriteZeroes, &limits()),
            Err(Status::Unsupp)
        );
        assert_eq!(
            parse_ranges(&range_bytes(0, 1025, 0), RangeKind::Discard, &limits()),
            Err(Status::IoErr)
        );
        assert_eq!(
            parse_ranges(&range_bytes(2047, 2, 0), RangeKind::Discard, &limits()),
            Err(Status::IoErr)
        );
        assert_eq!(
            parse_ranges(&range_bytes(u64::MAX, 1, 0), RangeKind::Discard, &limits()),
            Err(Status::IoErr)
        );
        assert_eq!(
            parse_ranges(&[0u8; 15], RangeKind::Discard, &limits()),
            Err(Status::IoErr)
        );
        assert_eq!(
            parse_ranges(&[], RangeKind::Discard, &limits()),
            Err(Status::IoErr)
        );
    }

    #[test]
    fn id_is_cut_or_padded() {
        assert_eq!(&id_bytes("vd-1")[..5], b"vd-1\0");
        assert_eq!(
            &id_bytes("0123456789abcdefghijKLMN")[..],
            b"0123456789abcdefghij"
        );
    }

    #[test]
    fn status_bytes() {
        assert_eq!(Status::Ok.byte(), 0);
        assert_eq!(Status::IoErr.byte(), 1);
        assert_eq!(Status::Unsupp.byte(), 2);
    }

    /// Every layout, however strange, frames and classifies without panicking,
    /// and data segments never leave the chain's buffers.
    #[test]
    fn exhaustive_small_layouts_never_panic() {
        let lens = [0u32, 1, 7, 15, 16, 17, 512, 513];
        for &a in &lens {
            for &b in &lens {
                for &c in &lens {
                    for writable_from in 0..4 {
                        let mut layout = ChainLayout::new();
                        let descs = [(0x1000u64, a), (0x10_0000, b), (0x20_0000, c)];
                        for (i, &(addr, len)) in descs.iter().enumerate() {
                            layout.push(addr, len, i >= writable_from).unwrap();
                        }
                        let Ok(frame) = frame(&layout) else { continue };
                        let inside = |s: &Segment| {
                            descs.iter().any(|&(addr, len)| {
                                s.addr >= addr && s.addr + u64::from(s.len) <= addr + u64::from(len)
                            })
                        };
                        assert!(frame.header.iter().all(inside));
                        assert!(frame.out_data.iter().all(inside));
                        assert!(frame.in_data.iter().all(inside));
                        assert_eq!(total_len(&frame.header), 16);
                        for t in [0, 1, 4, 8, 11, 13, 99] {
                            let _ = classify(&header(t, 3), &frame, &limits());
                        }
                    }
                }
            }
        }
    }
}

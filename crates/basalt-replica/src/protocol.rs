//! The replica service's messages (service [`SERVICE_REPLICA`] of
//! `basalt-net`).
//!
//! Every request is a fixed 56-byte body; a write's bytes travel as the
//! frame's data part and a read's bytes come back the same way, so block
//! data is never encoded. Layout (little-endian), documented in
//! `docs/cluster-protocol.md`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | operation |
//! | 1 | 1 | flags: bit 0 FUA, bit 1 keep allocated (write zeroes) |
//! | 2 | 2 | reserved, 0 |
//! | 4 | 4 | reserved, 0 |
//! | 8 | 8 | vdisk id |
//! | 16 | 8 | epoch of the sender's ownership |
//! | 24 | 8 | byte offset |
//! | 32 | 8 | byte length (reads, trims, zeroes; writes use the data length) |
//! | 40 | 8 | mutation sequence number under the epoch (0: not tracked) |
//! | 48 | 8 | settled mark: every mutation of this epoch numbered below it has settled |
//!
//! The last two fields feed the replica's dirty-region table (see
//! [`crate::dirty`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Service number of the replica service.
pub const SERVICE_REPLICA: u16 = 3;

/// Size of a request body.
pub const REQUEST_BYTES: usize = 56;

/// Error code: the sender's epoch is older than one this replica has seen.
pub const CODE_STALE_EPOCH: u16 = 1;
/// Error code: this node holds no replica of the vdisk.
pub const CODE_NO_REPLICA: u16 = 2;
/// Error code: the replica's I/O failed (its message says how).
pub const CODE_IO: u16 = 3;
/// Error code: the request is malformed or out of range.
pub const CODE_INVALID: u16 = 4;
/// Error code: the replica's disks are full.
pub const CODE_NO_SPACE: u16 = 5;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write the frame's data at `offset`.
    Write = 1,
    /// Read `length` bytes at `offset`.
    Read = 2,
    /// Make every completed write durable.
    Flush = 3,
    /// Discard `[offset, offset + length)`.
    Trim = 4,
    /// Write zeroes over `[offset, offset + length)`.
    Zero = 5,
    /// Record `epoch` as the vdisk's newest: older senders are refused from now on.
    Fence = 6,
    /// CRC-32C of every [`DIGEST_PIECE`] of `[offset, offset + length)`,
    /// as little-endian u32s in the reply's data (resync compares them).
    Digest = 7,
    /// The owner under `epoch` has reconciled what the replica reported
    /// unsettled when fenced: older records can go.
    Settle = 8,
}

/// Granularity of [`Op::Digest`] and of resync copies.
pub const DIGEST_PIECE: u64 = 64 << 10;
/// Largest range one digest request may cover.
pub const MAX_DIGEST_BYTES: u64 = 64 << 20;

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub op: Op,
    /// Force unit access.
    pub fua: bool,
    /// Write zeroes keeps the space allocated.
    pub allocate: bool,
    /// Vdisk id.
    pub vdisk: u64,
    /// The sender's epoch.
    pub epoch: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u64,
    /// The mutation's number under `epoch` (0: not tracked).
    pub seq: u64,
    /// Every mutation of `epoch` numbered below this has settled.
    pub settled: u64,
}

impl Request {
    /// A request with no flags and no sequence number.
    pub fn new(op: Op, vdisk: u64, epoch: u64, offset: u64, length: u64) -> Request {
        Request {
            op,
            fua: false,
            allocate: false,
            vdisk,
            epoch,
            offset,
            length,
            seq: 0,
            settled: 0,
        }
    }

    /// Encodes the body.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(REQUEST_BYTES);
        out.put_u8(self.op as u8);
        out.put_u8(u8::from(self.fua) | (u8::from(self.allocate) << 1));
        out.put_u16_le(0);
        out.put_u32_le(0);
        out.put_u64_le(self.vdisk);
        out.put_u64_le(self.epoch);
        out.put_u64_le(self.offset);
        out.put_u64_le(self.length);
        out.put_u64_le(self.seq);
        out.put_u64_le(self.settled);
        out.freeze()
    }

    /// Decodes a body; `Err` says what is wrong with it.
    pub fn decode(mut body: &[u8]) -> Result<Request, String> {
        if body.len() != REQUEST_BYTES {
            return Err(format!(
                "replica request of {} bytes, expected {REQUEST_BYTES}",
                body.len()
            ));
        }
        let op = match body.get_u8() {
            1 => Op::Write,
            2 => Op::Read,
            3 => Op::Flush,
            4 => Op::Trim,
            5 => Op::Zero,
            6 => Op::Fence,
            7 => Op::Digest,
            8 => Op::Settle,
            other => return Err(format!("unknown replica operation {other}")),
        };
        let flags = body.get_u8();
        if flags & !0b11 != 0 {
            return Err(format!("unknown replica request flags {flags:#x}"));
        }
        let _reserved = body.get_u16_le();
        let _reserved = body.get_u32_le();
        Ok(Request {
            op,
            fua: flags & 1 != 0,
            allocate: flags & 2 != 0,
            vdisk: body.get_u64_le(),
            epoch: body.get_u64_le(),
            offset: body.get_u64_le(),
            length: body.get_u64_le(),
            seq: body.get_u64_le(),
            settled: body.get_u64_le(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let request = Request {
            op: Op::Zero,
            fua: true,
            allocate: true,
            vdisk: 7,
            epoch: 3,
            offset: 4096,
            length: 1 << 20,
            seq: 11,
            settled: 9,
        };
        assert_eq!(Request::decode(&request.encode()), Ok(request));
        let mut bad = request.encode().to_vec();
        bad[0] = 99;
        assert!(Request::decode(&bad).is_err());
        let mut bad = request.encode().to_vec();
        bad[1] = 0x80;
        assert!(Request::decode(&bad).is_err());
        assert!(Request::decode(&request.encode()[..REQUEST_BYTES - 1]).is_err());
    }
}

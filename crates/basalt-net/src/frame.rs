//! Frames: the unit of everything sent between nodes after the handshake.
//!
//! Every frame is a fixed 32-byte header followed by a *body* (a message the
//! layer above encodes as it likes) and *data* (raw bulk bytes, e.g. the
//! blocks of a replicated write, kept apart so they are never re-encoded or
//! copied into the body). The header carries its own checksum so that garbage
//! on the port is recognised before any length in it is believed, and a
//! checksum of body and data so that a flipped bit on the way never reaches a
//! disk. The layout is documented in `docs/cluster-protocol.md`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::NetError;

/// First four bytes of every frame: `BSLT`.
pub const FRAME_MAGIC: [u8; 4] = *b"BSLT";
/// Size of the frame header in bytes.
pub const HEADER_BYTES: usize = 32;
/// Largest body a frame may carry.
pub const MAX_BODY_BYTES: u32 = 16 << 20;
/// Largest data part a frame may carry.
pub const MAX_DATA_BYTES: u32 = 16 << 20;

/// The traffic class of a frame. Each peer connection sends control frames
/// first and shares the rest of the link between foreground and background
/// by weight (see [`crate::ClassWeights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrafficClass {
    /// Raft, heartbeats, metadata: small, latency-critical, always first.
    Control = 0,
    /// Guest I/O replication.
    Foreground = 1,
    /// Rebuild, rebalance, scrub.
    Background = 2,
}

impl TrafficClass {
    /// All classes, in priority order.
    pub const ALL: [TrafficClass; 3] = [
        TrafficClass::Control,
        TrafficClass::Foreground,
        TrafficClass::Background,
    ];

    fn from_wire(value: u8) -> Result<TrafficClass, NetError> {
        match value {
            0 => Ok(TrafficClass::Control),
            1 => Ok(TrafficClass::Foreground),
            2 => Ok(TrafficClass::Background),
            other => Err(NetError::Malformed(format!(
                "unknown traffic class {other}"
            ))),
        }
    }

    /// Name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            TrafficClass::Control => "control",
            TrafficClass::Foreground => "foreground",
            TrafficClass::Background => "background",
        }
    }
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A request; the peer answers with a reply or an error carrying the same id.
    Request = 1,
    /// A successful reply to the request with the same id.
    Reply = 2,
    /// A failed request: the body is a UTF-8 message.
    Error = 3,
}

impl FrameKind {
    fn from_wire(value: u8) -> Result<FrameKind, NetError> {
        match value {
            1 => Ok(FrameKind::Request),
            2 => Ok(FrameKind::Reply),
            3 => Ok(FrameKind::Error),
            other => Err(NetError::Malformed(format!("unknown frame kind {other}"))),
        }
    }
}

/// One frame, decoded.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Traffic class (scheduling only; it does not change meaning).
    pub class: TrafficClass,
    /// Request, reply or error.
    pub kind: FrameKind,
    /// Which service of the receiving node handles a request (echoed in replies).
    pub service: u16,
    /// Matches replies to requests; chosen by the requester.
    pub request_id: u64,
    /// The message.
    pub body: Bytes,
    /// Raw bulk bytes.
    pub data: Bytes,
}

impl Frame {
    /// Bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_BYTES + self.body.len() + self.data.len()
    }

    /// Encodes the header; body and data follow it unchanged.
    ///
    /// Fails when body or data exceed the protocol's limits.
    pub fn encode_header(&self) -> Result<[u8; HEADER_BYTES], NetError> {
        let body_len = u32::try_from(self.body.len())
            .ok()
            .filter(|len| *len <= MAX_BODY_BYTES)
            .ok_or(NetError::TooLarge {
                what: "body",
                bytes: self.body.len() as u64,
            })?;
        let data_len = u32::try_from(self.data.len())
            .ok()
            .filter(|len| *len <= MAX_DATA_BYTES)
            .ok_or(NetError::TooLarge {
                what: "data",
                bytes: self.data.len() as u64,
            })?;
        let payload_crc = crc32c::crc32c_append(crc32c::crc32c(&self.body), &self.data);
        let mut header = [0u8; HEADER_BYTES];
        let mut cursor = &mut header[..];
        cursor.put_slice(&FRAME_MAGIC);
        cursor.put_u8(self.class as u8);
        cursor.put_u8(self.kind as u8);
        cursor.put_u16_le(self.service);
        cursor.put_u64_le(self.request_id);
        cursor.put_u32_le(body_len);
        cursor.put_u32_le(data_len);
        cursor.put_u32_le(payload_crc);
        let header_crc = crc32c::crc32c(&header[..HEADER_BYTES - 4]);
        header[HEADER_BYTES - 4..].copy_from_slice(&header_crc.to_le_bytes());
        Ok(header)
    }

    /// Encodes the whole frame into one buffer (tests and small frames).
    pub fn encode(&self) -> Result<Bytes, NetError> {
        let header = self.encode_header()?;
        let mut out = BytesMut::with_capacity(self.wire_len());
        out.put_slice(&header);
        out.put_slice(&self.body);
        out.put_slice(&self.data);
        Ok(out.freeze())
    }
}

/// The decoded fields of a header whose checksum matched.
#[derive(Debug, Clone, Copy)]
pub struct FrameHeader {
    class: TrafficClass,
    kind: FrameKind,
    service: u16,
    request_id: u64,
    body_len: u32,
    data_len: u32,
    payload_crc: u32,
}

/// Decodes and checks a frame header: magic, header checksum, known class
/// and kind, lengths within limits.
pub fn decode_header(header: &[u8; HEADER_BYTES]) -> Result<FrameHeader, NetError> {
    if header[..4] != FRAME_MAGIC {
        return Err(NetError::Malformed("bad frame magic".into()));
    }
    let mut tail = &header[HEADER_BYTES - 4..];
    let header_crc = tail.get_u32_le();
    if crc32c::crc32c(&header[..HEADER_BYTES - 4]) != header_crc {
        return Err(NetError::Malformed("frame header checksum mismatch".into()));
    }
    let mut cursor = &header[4..HEADER_BYTES - 4];
    let class = TrafficClass::from_wire(cursor.get_u8())?;
    let kind = FrameKind::from_wire(cursor.get_u8())?;
    let service = cursor.get_u16_le();
    let request_id = cursor.get_u64_le();
    let body_len = cursor.get_u32_le();
    let data_len = cursor.get_u32_le();
    let payload_crc = cursor.get_u32_le();
    if body_len > MAX_BODY_BYTES {
        return Err(NetError::TooLarge {
            what: "body",
            bytes: u64::from(body_len),
        });
    }
    if data_len > MAX_DATA_BYTES {
        return Err(NetError::TooLarge {
            what: "data",
            bytes: u64::from(data_len),
        });
    }
    Ok(FrameHeader {
        class,
        kind,
        service,
        request_id,
        body_len,
        data_len,
        payload_crc,
    })
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames;
/// anything malformed, truncated or failing its checksum is an error after
/// which the stream must be closed (its framing can no longer be trusted).
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Frame>, NetError> {
    let mut header = [0u8; HEADER_BYTES];
    let mut filled = 0;
    while filled < HEADER_BYTES {
        let read = reader.read(&mut header[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(NetError::Malformed(
                "stream ended inside a frame header".into(),
            ));
        }
        filled += read;
    }
    let decoded = decode_header(&header)?;
    let mut body = BytesMut::zeroed(decoded.body_len as usize);
    read_exact_or_truncated(reader, &mut body).await?;
    let mut data = BytesMut::zeroed(decoded.data_len as usize);
    read_exact_or_truncated(reader, &mut data).await?;
    if crc32c::crc32c_append(crc32c::crc32c(&body), &data) != decoded.payload_crc {
        return Err(NetError::Malformed(
            "frame payload checksum mismatch".into(),
        ));
    }
    Ok(Some(Frame {
        class: decoded.class,
        kind: decoded.kind,
        service: decoded.service,
        request_id: decoded.request_id,
        body: body.freeze(),
        data: data.freeze(),
    }))
}

async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<(), NetError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(NetError::Malformed("stream ended inside a frame".into()))
        }
        Err(error) => Err(NetError::Io(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frame {
        Frame {
            class: TrafficClass::Background,
            kind: FrameKind::Request,
            service: 7,
            request_id: 0xdead_beef_0102,
            body: Bytes::from_static(b"hello"),
            data: Bytes::from(vec![0xa5; 4096]),
        }
    }

    #[tokio::test]
    async fn frames_round_trip() -> anyhow::Result<()> {
        let frame = sample();
        let wire = frame.encode()?;
        assert_eq!(wire.len(), frame.wire_len());
        let mut reader = &wire[..];
        let decoded = read_frame(&mut reader)
            .await?
            .ok_or(anyhow::anyhow!("eof"))?;
        assert_eq!(decoded.class, frame.class);
        assert_eq!(decoded.kind, frame.kind);
        assert_eq!(decoded.service, 7);
        assert_eq!(decoded.request_id, frame.request_id);
        assert_eq!(decoded.body, frame.body);
        assert_eq!(decoded.data, frame.data);
        assert!(read_frame(&mut reader).await?.is_none());
        Ok(())
    }

    #[tokio::test]
    async fn every_single_bit_flip_is_detected() -> anyhow::Result<()> {
        let frame = Frame {
            data: Bytes::from_static(b"0123456789"),
            ..sample()
        };
        let wire = frame.encode()?.to_vec();
        for byte in 0..wire.len() {
            for bit in 0..8 {
                let mut bad = wire.clone();
                bad[byte] ^= 1 << bit;
                let mut reader = &bad[..];
                let result = read_frame(&mut reader).await;
                assert!(
                    result.is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn truncated_frames_are_errors_not_eof() -> anyhow::Result<()> {
        let wire = sample().encode()?;
        for cut in 1..wire.len() {
            let mut reader = &wire[..cut];
            assert!(read_frame(&mut reader).await.is_err(), "cut at {cut}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn oversized_lengths_are_refused_before_allocation() -> anyhow::Result<()> {
        let mut header = sample().encode_header()?;
        header[16..20].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
        let crc = crc32c::crc32c(&header[..HEADER_BYTES - 4]);
        header[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_header(&header),
            Err(NetError::TooLarge { what: "body", .. })
        ));
        let too_big = Frame {
            data: Bytes::from(vec![0; MAX_DATA_BYTES as usize + 1]),
            ..sample()
        };
        assert!(too_big.encode_header().is_err());
        Ok(())
    }
}

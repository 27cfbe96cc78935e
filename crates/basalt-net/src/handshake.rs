//! The handshake that opens every node-to-node connection.
//!
//! Before any frame, the connecting node sends a fixed 48-byte *hello*: the
//! range of protocol versions it speaks, the cluster it belongs to and its
//! node id. The accepting node answers with a *welcome* carrying the chosen
//! version or the reason it refuses (another cluster, no common version).
//! Both messages have a fixed layout that never changes between protocol
//! versions, so that nodes of different versions can always tell each other
//! why they cannot talk. See `docs/cluster-protocol.md`.

use bytes::{Buf, BufMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

use crate::NetError;

/// First eight bytes of a hello and of a welcome.
pub const HANDSHAKE_MAGIC: [u8; 8] = *b"BASALT\r\n";
/// Size of a hello, and of a welcome before its reason text.
pub const HANDSHAKE_BYTES: usize = 48;
/// The protocol version this build speaks (its only one, for now).
pub const PROTOCOL_VERSION: u16 = 1;
/// Longest refusal reason a welcome may carry.
pub const MAX_REASON_BYTES: u32 = 1024;

/// Hello flag: the sender belongs to no cluster yet and wants to join one.
const FLAG_JOINING: u32 = 1;

/// What a connecting node says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub min_version: u16,
    /// Newest protocol version the sender speaks.
    pub max_version: u16,
    /// The sender's cluster; nil while joining.
    pub cluster_id: Uuid,
    /// The sender's node id; 0 while joining.
    pub node_id: u64,
}

impl Hello {
    /// True when the sender has no cluster yet.
    pub fn is_joining(&self) -> bool {
        self.cluster_id.is_nil()
    }

    /// Encodes the hello.
    pub fn encode(&self) -> [u8; HANDSHAKE_BYTES] {
        let mut out = [0u8; HANDSHAKE_BYTES];
        let mut cursor = &mut out[..];
        cursor.put_slice(&HANDSHAKE_MAGIC);
        cursor.put_u16_le(self.min_version);
        cursor.put_u16_le(self.max_version);
        cursor.put_u32_le(if self.is_joining() { FLAG_JOINING } else { 0 });
        cursor.put_slice(self.cluster_id.as_bytes());
        cursor.put_u64_le(self.node_id);
        cursor.put_u32_le(0);
        seal(&mut out);
        out
    }

    /// Decodes and checks a hello.
    pub fn decode(bytes: &[u8; HANDSHAKE_BYTES]) -> Result<Hello, NetError> {
        check(bytes, "hello")?;
        let mut cursor = &bytes[8..HANDSHAKE_BYTES - 4];
        let min_version = cursor.get_u16_le();
        let max_version = cursor.get_u16_le();
        let flags = cursor.get_u32_le();
        let mut id = [0u8; 16];
        cursor.copy_to_slice(&mut id);
        let cluster_id = Uuid::from_bytes(id);
        let node_id = cursor.get_u64_le();
        if min_version > max_version {
            return Err(NetError::Malformed(
                "hello with an empty version range".into(),
            ));
        }
        if (flags & FLAG_JOINING != 0) != cluster_id.is_nil() {
            return Err(NetError::Malformed(
                "hello flags disagree with its cluster id".into(),
            ));
        }
        Ok(Hello {
            min_version,
            max_version,
            cluster_id,
            node_id,
        })
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WelcomeStatus {
    /// Accepted; frames follow.
    Accepted = 0,
    /// No protocol version both sides speak.
    UnsupportedVersion = 1,
    /// The nodes belong to different clusters.
    WrongCluster = 2,
    /// Any other refusal; the reason says why.
    Refused = 3,
}

/// The accepting node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Accepted or why not.
    pub status: WelcomeStatus,
    /// The version both sides use from now on (when accepted).
    pub version: u16,
    /// The accepting node's cluster.
    pub cluster_id: Uuid,
    /// The accepting node's id.
    pub node_id: u64,
    /// Human-readable reason for a refusal.
    pub reason: String,
}

impl Welcome {
    /// Encodes the welcome (fixed part and reason).
    pub fn encode(&self) -> Vec<u8> {
        let reason = truncate_utf8(&self.reason, MAX_REASON_BYTES as usize);
        let mut fixed = [0u8; HANDSHAKE_BYTES];
        let mut cursor = &mut fixed[..];
        cursor.put_slice(&HANDSHAKE_MAGIC);
        cursor.put_u16_le(self.version);
        cursor.put_u16_le(self.status as u16);
        cursor.put_u32_le(reason.len() as u32);
        cursor.put_slice(self.cluster_id.as_bytes());
        cursor.put_u64_le(self.node_id);
        cursor.put_u32_le(0);
        seal(&mut fixed);
        let mut out = fixed.to_vec();
        out.extend_from_slice(reason.as_bytes());
        out
    }

    /// Decodes the fixed part; returns the welcome with an empty reason and
    /// the length of the reason text that follows.
    pub fn decode_fixed(bytes: &[u8; HANDSHAKE_BYTES]) -> Result<(Welcome, u32), NetError> {
        check(bytes, "welcome")?;
        let mut cursor = &bytes[8..HANDSHAKE_BYTES - 4];
        let version = cursor.get_u16_le();
        let status = match cursor.get_u16_le() {
            0 => WelcomeStatus::Accepted,
            1 => WelcomeStatus::UnsupportedVersion,
            2 => WelcomeStatus::WrongCluster,
            3 => WelcomeStatus::Refused,
            other => {
                return Err(NetError::Malformed(format!(
                    "unknown welcome status {other}"
                )));
            }
        };
        let reason_len = cursor.get_u32_le();
        if reason_len > MAX_REASON_BYTES {
            return Err(NetError::Malformed("welcome reason too long".into()));
        }
        let mut id = [0u8; 16];
        cursor.copy_to_slice(&mut id);
        let node_id = cursor.get_u64_le();
        Ok((
            Welcome {
                status,
                version,
                cluster_id: Uuid::from_bytes(id),
                node_id,
                reason: String::new(),
            },
            reason_len,
        ))
    }
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn seal(bytes: &mut [u8; HANDSHAKE_BYTES]) {
    let crc = crc32c::crc32c(&bytes[..HANDSHAKE_BYTES - 4]);
    bytes[HANDSHAKE_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
}

fn check(bytes: &[u8; HANDSHAKE_BYTES], what: &str) -> Result<(), NetError> {
    if bytes[..8] != HANDSHAKE_MAGIC {
        return Err(NetError::Malformed(format!(
            "not a Basalt peer: bad {what} magic"
        )));
    }
    let stored = u32::from_le_bytes([bytes[44], bytes[45], bytes[46], bytes[47]]);
    if crc32c::crc32c(&bytes[..HANDSHAKE_BYTES - 4]) != stored {
        return Err(NetError::Malformed(format!("{what} checksum mismatch")));
    }
    Ok(())
}

/// Picks the newest version in both ranges.
pub fn negotiate(hello: &Hello, min: u16, max: u16) -> Option<u16> {
    let high = hello.max_version.min(max);
    let low = hello.min_version.max(min);
    (low <= high).then_some(high)
}

/// Client side: sends `hello`, reads the welcome. A refusal becomes
/// [`NetError::Refused`] carrying the peer's reason.
pub async fn send_hello<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    hello: &Hello,
) -> Result<Welcome, NetError> {
    stream.write_all(&hello.encode()).await?;
    let mut fixed = [0u8; HANDSHAKE_BYTES];
    read_exact(stream, &mut fixed, "welcome").await?;
    let (mut welcome, reason_len) = Welcome::decode_fixed(&fixed)?;
    let mut reason = vec![0u8; reason_len as usize];
    read_exact(stream, &mut reason, "welcome reason").await?;
    welcome.reason = String::from_utf8_lossy(&reason).into_owned();
    if welcome.status != WelcomeStatus::Accepted {
        return Err(NetError::Refused {
            status: welcome.status,
            reason: welcome.reason,
        });
    }
    if welcome.version < hello.min_version || welcome.version > hello.max_version {
        return Err(NetError::Malformed(format!(
            "peer chose protocol version {} outside our range",
            welcome.version
        )));
    }
    Ok(welcome)
}

/// Server side: reads a hello (the caller decides and answers).
pub async fn read_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Hello, NetError> {
    let mut fixed = [0u8; HANDSHAKE_BYTES];
    read_exact(stream, &mut fixed, "hello").await?;
    Hello::decode(&fixed)
}

async fn read_exact<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    what: &str,
) -> Result<(), NetError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(
            NetError::Malformed(format!("connection closed during the {what}")),
        ),
        Err(error) => Err(NetError::Io(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_detects_corruption() -> Result<(), NetError> {
        let hello = Hello {
            min_version: 1,
            max_version: 3,
            cluster_id: Uuid::new_v4(),
            node_id: 42,
        };
        let bytes = hello.encode();
        assert_eq!(Hello::decode(&bytes)?, hello);
        for byte in 0..HANDSHAKE_BYTES {
            let mut bad = bytes;
            bad[byte] ^= 0x10;
            assert!(Hello::decode(&bad).is_err(), "byte {byte}");
        }
        Ok(())
    }

    #[test]
    fn welcome_round_trips_with_a_reason() -> Result<(), NetError> {
        let welcome = Welcome {
            status: WelcomeStatus::WrongCluster,
            version: 1,
            cluster_id: Uuid::new_v4(),
            node_id: 9,
            reason: "wrong cluster ✓".into(),
        };
        let bytes = welcome.encode();
        let mut fixed = [0u8; HANDSHAKE_BYTES];
        fixed.copy_from_slice(&bytes[..HANDSHAKE_BYTES]);
        let (mut decoded, len) = Welcome::decode_fixed(&fixed)?;
        decoded.reason = String::from_utf8_lossy(&bytes[HANDSHAKE_BYTES..]).into_owned();
        assert_eq!(len as usize, bytes.len() - HANDSHAKE_BYTES);
        assert_eq!(decoded, welcome);
        Ok(())
    }

    #[test]
    fn negotiation_picks_the_newest_common_version() {
        let hello = |min, max| Hello {
            min_version: min,
            max_version: max,
            cluster_id: Uuid::nil(),
            node_id: 0,
        };
        assert_eq!(negotiate(&hello(1, 4), 2, 3), Some(3));
        assert_eq!(negotiate(&hello(1, 1), 1, 2), Some(1));
        assert_eq!(negotiate(&hello(3, 4), 1, 2), None);
    }
}

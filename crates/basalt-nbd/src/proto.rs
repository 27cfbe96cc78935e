//! The NBD wire format, with no I/O.
//!
//! Everything a client can put on the wire is parsed here and nowhere else:
//! option headers and payloads during the handshake, request headers during
//! transmission, and the decision what to do with a request
//! ([`classify_request`]). Replies are encoded here too. Keeping this module
//! free of sockets and of the backend means it can be fuzzed
//! (`fuzz/fuzz_targets/nbd_request.rs`) and unit-tested byte by byte.
//!
//! Numbers follow the protocol specification
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>);
//! every integer on the wire is big-endian.

use basalt_core::{MAX_REQUEST_BYTES, check_range};

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export behaves like a rotational disk.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported (structured replies only).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flushes and FUA are visible across connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_RESIZE` (experimental; never set by Basalt).
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `NBD_CMD_CACHE` is understood.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: choose an export and enter transmission (cannot report errors).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: end the session.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: withdrawn `PEEK_EXPORT` extension.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Option: upgrade to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (not supported by Basalt).
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of a list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option error: forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = 0x8000_0002;
/// Option error: syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option error: unsupported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = 0x8000_0004;
/// Option error: TLS required.
pub const NBD_REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// Option error: no such export.
pub const NBD_REP_ERR_UNKNOWN: u32 = 0x8000_0006;
/// Option error: the server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
/// Option error: the client must request block sizes.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
/// Option error: request or reply too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// Information type: size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// The one metadata context Basalt serves.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id Basalt gives `base:allocation` in `NBD_REP_META_CONTEXT` and block status chunks.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Longest string (export name, query) a client may send, per the specification.
pub const MAX_STRING_LEN: usize = 4096;
/// Longest option payload Basalt reads; longer ones end the connection.
///
/// No valid option needs more: names and queries are at most 4 KiB each.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Length of the greeting the server sends first.
pub const GREETING_LEN: usize = 18;
/// Length of an option header.
pub const OPTION_HEADER_LEN: usize = 16;

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// Magic of every request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk before its data.
pub const DATA_CHUNK_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;
/// Length of a whole `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub const HOLE_CHUNK_LEN: usize = CHUNK_HEADER_LEN + 12;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const NBD_CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not create a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: read must be answered by one content chunk.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: block status must describe one extent.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: write zeroes must fail fast unless it is fast.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag: extended-header payload length (not negotiable here).
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag: last chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// Chunk type: no payload, ends a reply.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeroes.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors for one context.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error for the whole request.
pub const NBD_REPLY_TYPE_ERROR: u16 = 0x8001;
/// Chunk type: an error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// `base:allocation` state: the extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Error value: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Error value: input/output error.
pub const NBD_EIO: u32 = 5;
/// Error value: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Error value: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// Error value: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// Error value: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error value: operation not supported (only for fast zero).
pub const NBD_ENOTSUP: u32 = 95;
/// Error value: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Block sizes Basalt advertises in `NBD_INFO_BLOCK_SIZE`: any alignment is
/// accepted (the backend does read-modify-write), 4 KiB is efficient, and one
/// request carries at most [`MAX_REQUEST_BYTES`].
pub const BLOCK_SIZE_MIN: u32 = 1;
/// Preferred block size (see [`BLOCK_SIZE_MIN`]).
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Maximum payload size (see [`BLOCK_SIZE_MIN`]).
pub const BLOCK_SIZE_MAX: u32 = MAX_REQUEST_BYTES;

/// Why bytes from a client could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A request header did not start with [`NBD_REQUEST_MAGIC`].
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    RequestMagic(u32),
    /// An option header did not start with [`IHAVEOPT`].
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    OptionMagic(u64),
    /// The client set handshake flags the server did not offer.
    #[error("client flags {0:#x} contain bits the server did not offer")]
    ClientFlags(u32),
    /// An option payload does not have the layout its option requires.
    #[error("malformed option data: {0}")]
    Malformed(&'static str),
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// Flags the client sent after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE` was set.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES` was set.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Parses the client's 32-bit flags; unknown bits are a protocol violation
    /// (the specification says the server MUST drop the connection).
    pub fn parse(raw: u32) -> Result<ClientFlags, ProtoError> {
        if raw & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
            return Err(ProtoError::ClientFlags(raw));
        }
        Ok(ClientFlags {
            fixed_newstyle: raw & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: raw & NBD_FLAG_C_NO_ZEROES != 0,
        })
    }
}

/// The fixed part of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the payload that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parses an option header, checking its magic.
    pub fn parse(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
        let magic = be_u64(bytes, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::OptionMagic(magic));
        }
        Ok(OptionHeader {
            option: be_u32(bytes, 8),
            length: be_u32(bytes, 12),
        })
    }

    /// Encodes the header (used by test clients).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`), possibly unknown.
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (payload length for writes).
    pub length: u32,
}

impl RequestHeader {
    /// Parses a request header, checking its magic.
    pub fn parse(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, ProtoError> {
        let magic = be_u32(bytes, 0);
        if magic != NBD_REQUEST_MAGIC {
            return Err(ProtoError::RequestMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(bytes, 4),
            command: be_u16(bytes, 6),
            cookie: be_u64(bytes, 8),
            offset: be_u64(bytes, 16),
            length: be_u32(bytes, 24),
        })
    }

    /// Encodes the header (used by test clients).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A reader over an option payload that fails instead of panicking.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.rest.len() < n {
            return Err(ProtoError::Malformed(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string prefixed by its 32-bit length.
    fn string(&mut self, what: &'static str) -> Result<&'a str, ProtoError> {
        let len = self.u32(what)? as usize;
        parse_string(self.take(len, what)?)
    }

    fn finish(&self, what: &'static str) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed(what))
        }
    }
}

/// Checks an NBD string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
pub fn parse_string(bytes: &[u8]) -> Result<&str, ProtoError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtoError::Malformed("string longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(ProtoError::Malformed("string contains NUL"));
    }
    std::str::from_utf8(bytes).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Requested export name (empty: the default export).
    pub name: &'a str,
    requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    /// Parses the payload: name length, name, count, then `count` 16-bit info types.
    pub fn parse(payload: &'a [u8]) -> Result<InfoRequest<'a>, ProtoError> {
        let mut cur = Cursor { rest: payload };
        let name = cur.string("export name length exceeds the option")?;
        let count = cur.u16("information request count missing")? as usize;
        let requests = cur.take(count * 2, "information request list truncated")?;
        cur.finish("trailing bytes after the information requests")?;
        Ok(InfoRequest { name, requests })
    }

    /// The information types the client asked for, in order.
    pub fn requests(&self) -> impl Iterator<Item = u16> + '_ {
        self.requests
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
    }
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export the contexts are for.
    pub name: &'a str,
    /// Context queries, e.g. `base:allocation` or `base:`.
    pub queries: Vec<&'a str>,
}

impl<'a> MetaContextRequest<'a> {
    /// Parses the payload: name, query count, then length-prefixed queries.
    pub fn parse(payload: &'a [u8]) -> Result<MetaContextRequest<'a>, ProtoError> {
        let mut cur = Cursor { rest: payload };
        let name = cur.string("export name length exceeds the option")?;
        let count = cur.u32("query count missing")?;
        // Each query needs at least its 4-byte length; refuse counts the
        // payload cannot hold before allocating for them.
        if count as usize > cur.rest.len() / 4 {
            return Err(ProtoError::Malformed("query count exceeds the option"));
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            queries.push(cur.string("query length exceeds the option")?);
        }
        cur.finish("trailing bytes after the queries")?;
        Ok(MetaContextRequest { name, queries })
    }
}

/// What a metadata-context query selects among the contexts Basalt knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaQuery {
    /// `base:allocation`, or (for listing only) the `base:` wildcard.
    BaseAllocation,
    /// A context Basalt does not have: the specification says to ignore it.
    Nothing,
}

/// Interprets one query. `listing` is true for `NBD_OPT_LIST_META_CONTEXT`,
/// where `base:` is a wildcard; for `NBD_OPT_SET_META_CONTEXT` it selects nothing.
/// A query without a namespace (no colon) is invalid.
pub fn interpret_query(query: &str, listing: bool) -> Result<MetaQuery, ProtoError> {
    let Some((namespace, leaf)) = query.split_once(':') else {
        return Err(ProtoError::Malformed("metadata query has no namespace"));
    };
    if namespace != "base" {
        return Ok(MetaQuery::Nothing);
    }
    match leaf {
        "allocation" => Ok(MetaQuery::BaseAllocation),
        "" if listing => Ok(MetaQuery::BaseAllocation),
        _ => Ok(MetaQuery::Nothing),
    }
}

// ---------------------------------------------------------------------------
// Deciding what to do with a request
// ---------------------------------------------------------------------------

/// What the transmission phase negotiated, as [`classify_request`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Export size in bytes, as sent to the client.
    pub size: u64,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
}

/// A request the backend must serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `NBD_CMD_READ`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length in bytes (at most [`MAX_REQUEST_BYTES`], non-zero).
        length: u32,
        /// `NBD_CMD_FLAG_DF`: reply with a single content chunk.
        df: bool,
    },
    /// `NBD_CMD_WRITE`; `length` payload bytes follow the header.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload length (at most [`MAX_REQUEST_BYTES`], non-zero).
        length: u32,
        /// Force unit access.
        fua: bool,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length in bytes (non-zero).
        length: u32,
        /// Force unit access.
        fua: bool,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes (non-zero).
        length: u32,
        /// Force unit access.
        fua: bool,
        /// `NBD_CMD_FLAG_NO_HOLE`: keep the range allocated.
        no_hole: bool,
        /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `ENOTSUP` rather than be slow.
        fast: bool,
    },
    /// `NBD_CMD_BLOCK_STATUS` for `base:allocation`.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Length of interest (non-zero).
        length: u32,
        /// `NBD_CMD_FLAG_REQ_ONE`: describe a single extent.
        req_one: bool,
    },
}

/// What the server does with one request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Hand the request to the backend.
    Execute(Op),
    /// Reply success without touching the backend (zero-length I/O, `NBD_CMD_CACHE`).
    Succeed,
    /// Reply with an error without touching the backend. `drain` payload bytes
    /// follow the header and must be read and thrown away first.
    Reject {
        /// NBD error value.
        errno: u32,
        /// Payload bytes to discard.
        drain: u32,
        /// Text for a structured error chunk.
        message: &'static str,
    },
    /// `NBD_CMD_DISC`: finish outstanding requests, then close.
    Disconnect,
    /// The stream cannot be resynchronised: close the connection now.
    Close(&'static str),
}

/// Flags each command accepts. `FUA` is valid on every command once
/// `NBD_FLAG_SEND_FUA` is advertised (the specification says servers MUST
/// accept it everywhere).
fn allowed_flags(command: u16, session: &Session) -> u16 {
    let df = if session.structured {
        NBD_CMD_FLAG_DF
    } else {
        0
    };
    NBD_CMD_FLAG_FUA
        | match command {
            NBD_CMD_READ => df,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Decides what to do with a request, before any payload is read.
///
/// Every check that does not need the backend happens here: flags, lengths
/// against [`MAX_REQUEST_BYTES`], ranges against the export size, and whether
/// block status was negotiated. Error values follow the specification:
/// `EINVAL` for bad flags, unknown commands and reads/trims past the end,
/// `ENOSPC` for writes past the end, `EOVERFLOW` for reads longer than the
/// maximum payload when structured replies allow refusing them.
pub fn classify_request(header: &RequestHeader, session: &Session) -> Disposition {
    let (offset, length) = (header.offset, header.length);
    let drain = if header.command == NBD_CMD_WRITE {
        length
    } else {
        0
    };
    let reject = |errno, message| Disposition::Reject {
        errno,
        drain,
        message,
    };
    if header.command == NBD_CMD_WRITE && length > MAX_REQUEST_BYTES {
        // Draining up to 4 GiB from a client that ignored the advertised
        // maximum is not worth it: the specification allows a hard disconnect.
        return Disposition::Close("write payload exceeds the maximum payload size");
    }
    if header.command == NBD_CMD_DISC {
        return Disposition::Disconnect;
    }
    if !matches!(
        header.command,
        NBD_CMD_READ
            | NBD_CMD_WRITE
            | NBD_CMD_FLUSH
            | NBD_CMD_TRIM
            | NBD_CMD_CACHE
            | NBD_CMD_WRITE_ZEROES
            | NBD_CMD_BLOCK_STATUS
    ) {
        return reject(NBD_EINVAL, "unknown command");
    }
    if header.flags & !allowed_flags(header.command, session) != 0 {
        return reject(NBD_EINVAL, "command flag not valid for this command");
    }
    let fua = header.flags & NBD_CMD_FLAG_FUA != 0;
    let in_range = check_range(offset, u64::from(length), session.size).is_ok();
    match header.command {
        NBD_CMD_READ => {
            if length > MAX_REQUEST_BYTES {
                let errno = if session.structured {
                    NBD_EOVERFLOW
                } else {
                    NBD_EINVAL
                };
                return reject(errno, "read longer than the maximum payload size");
            }
            if !in_range {
                return reject(NBD_EINVAL, "read beyond the end of the export");
            }
            if length == 0 {
                return Disposition::Succeed;
            }
            Disposition::Execute(Op::Read {
                offset,
                length,
                df: header.flags & NBD_CMD_FLAG_DF != 0,
            })
        }
        NBD_CMD_WRITE => {
            if !in_range {
                return reject(NBD_ENOSPC, "write beyond the end of the export");
            }
            if length == 0 {
                return Disposition::Succeed;
            }
            Disposition::Execute(Op::Write {
                offset,
                length,
                fua,
            })
        }
        // Offset and length of a flush are reserved; clients that fill them
        // in anyway still mean "flush".
        NBD_CMD_FLUSH => Disposition::Execute(Op::Flush),
        NBD_CMD_TRIM => {
            if !in_range {
                return reject(NBD_EINVAL, "trim beyond the end of the export");
            }
            if length == 0 {
                return Disposition::Succeed;
            }
            Disposition::Execute(Op::Trim {
                offset,
                length,
                fua,
            })
        }
        NBD_CMD_CACHE => {
            if !in_range {
                return reject(NBD_EINVAL, "cache beyond the end of the export");
            }
            // Data is served from the cluster's own caches; there is nothing
            // to prefetch that a read would not do anyway.
            Disposition::Succeed
        }
        NBD_CMD_WRITE_ZEROES => {
            if !in_range {
                return reject(NBD_ENOSPC, "write zeroes beyond the end of the export");
            }
            if length == 0 {
                return Disposition::Succeed;
            }
            Disposition::Execute(Op::WriteZeroes {
                offset,
                length,
                fua,
                no_hole: header.flags & NBD_CMD_FLAG_NO_HOLE != 0,
                fast: header.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
            })
        }
        NBD_CMD_BLOCK_STATUS => {
            if !session.structured || !session.block_status {
                return reject(NBD_EINVAL, "no metadata context was negotiated");
            }
            if length == 0 {
                return reject(NBD_EINVAL, "block status of zero bytes");
            }
            if !in_range {
                return reject(NBD_EINVAL, "block status beyond the end of the export");
            }
            Disposition::Execute(Op::BlockStatus {
                offset,
                length,
                req_one: header.flags & NBD_CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => reject(NBD_EINVAL, "unknown command"),
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len_u32(payload.len()).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME`: size, flags and, unless the
/// client negotiated `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes.
pub fn export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A simple reply header.
pub fn simple_reply(errno: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// The header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying
/// `data_len` bytes (at most [`MAX_REQUEST_BYTES`]), which follow it.
pub fn data_chunk_header(
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: u32,
) -> [u8; DATA_CHUNK_HEADER_LEN] {
    let mut out = [0u8; DATA_CHUNK_HEADER_LEN];
    let length = data_len.saturating_add(8);
    out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        flags,
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        length,
    ));
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// A whole `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(flags: u16, cookie: u64, offset: u64, hole_len: u32) -> [u8; HOLE_CHUNK_LEN] {
    let mut out = [0u8; HOLE_CHUNK_LEN];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        flags,
        NBD_REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    out[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8].copy_from_slice(&offset.to_be_bytes());
    out[CHUNK_HEADER_LEN + 8..].copy_from_slice(&hole_len.to_be_bytes());
    out
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk. The message is cut to fit
/// its 16-bit length and the 4096-byte string limit, on a character boundary.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32, message: &str) {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    out.extend_from_slice(&chunk_header(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        len_u32(6 + message.len()),
    ));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk with the given
/// `(length, flags)` descriptors (at least one).
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    context: u32,
    descriptors: &[(u32, u32)],
) {
    out.extend_from_slice(&chunk_header(
        flags,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len_u32(4 + 8 * descriptors.len()),
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for (length, state) in descriptors {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&state.to_be_bytes());
    }
}

/// Appends an `NBD_REP_INFO` reply for `NBD_INFO_EXPORT`.
pub fn info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut payload = [0u8; 12];
    payload[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    payload[2..10].copy_from_slice(&size.to_be_bytes());
    payload[10..12].copy_from_slice(&flags.to_be_bytes());
    option_reply(out, option, NBD_REP_INFO, &payload);
}

/// Appends an `NBD_REP_INFO` reply carrying a string (`NBD_INFO_NAME` or
/// `NBD_INFO_DESCRIPTION`).
pub fn info_string(out: &mut Vec<u8>, option: u32, kind: u16, text: &str) {
    let mut payload = Vec::with_capacity(2 + text.len());
    payload.extend_from_slice(&kind.to_be_bytes());
    payload.extend_from_slice(text.as_bytes());
    option_reply(out, option, NBD_REP_INFO, &payload);
}

/// Appends an `NBD_REP_INFO` reply for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut payload = [0u8; 14];
    payload[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    payload[2..6].copy_from_slice(&min.to_be_bytes());
    payload[6..10].copy_from_slice(&preferred.to_be_bytes());
    payload[10..14].copy_from_slice(&max.to_be_bytes());
    option_reply(out, option, NBD_REP_INFO, &payload);
}

/// Appends an `NBD_REP_SERVER` reply for one export of a list.
pub fn rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut payload = Vec::with_capacity(4 + name.len() + description.len());
    payload.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(description.as_bytes());
    option_reply(out, NBD_OPT_LIST, NBD_REP_SERVER, &payload);
}

/// Appends an `NBD_REP_META_CONTEXT` reply.
pub fn rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut payload = Vec::with_capacity(4 + name.len());
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(name.as_bytes());
    option_reply(out, option, NBD_REP_META_CONTEXT, &payload);
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            size: 1 << 20,
            structured: true,
            block_status: true,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 0xdead_beef_0123_4567,
            offset,
            length,
        }
    }

    #[test]
    fn greeting_bytes_match_the_specification() {
        assert_eq!(&greeting()[..8], b"NBDMAGIC");
        assert_eq!(&greeting()[8..16], b"IHAVEOPT");
        assert_eq!(&greeting()[16..], &[0, 3]);
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    }

    #[test]
    fn request_header_round_trips_and_checks_magic() {
        let h = req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0x0102_0304_0506_0708, 512);
        let bytes = h.encode();
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::parse(&bytes), Ok(h));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(
            RequestHeader::parse(&bad),
            Err(ProtoError::RequestMagic(0x2460_9513))
        );
    }

    #[test]
    fn option_header_round_trips_and_checks_magic() {
        let h = OptionHeader {
            option: NBD_OPT_GO,
            length: 77,
        };
        assert_eq!(OptionHeader::parse(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[7] = b'X';
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(ProtoError::OptionMagic(_))
        ));
    }

    #[test]
    fn client_flags_refuse_unknown_bits() {
        assert_eq!(
            ClientFlags::parse(3),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(ClientFlags::parse(4), Err(ProtoError::ClientFlags(4)));
        assert_eq!(
            ClientFlags::parse(0x8000_0001),
            Err(ProtoError::ClientFlags(0x8000_0001))
        );
    }

    fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name);
        p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    }

    #[test]
    fn info_request_parses_and_rejects_bad_lengths() {
        let p = info_payload(b"disk0", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]);
        let r = InfoRequest::parse(&p).expect("valid");
        assert_eq!(r.name, "disk0");
        assert_eq!(r.requests().collect::<Vec<_>>(), vec![1, 3]);

        // Name length beyond the payload.
        let mut bad = p.clone();
        bad[3] = 200;
        assert!(InfoRequest::parse(&bad).is_err());
        // Count claims more requests than present.
        let mut bad = info_payload(b"x", &[1]);
        let at = 4 + 1 + 1;
        bad[at] = 5;
        assert!(InfoRequest::parse(&bad).is_err());
        // Trailing garbage.
        let mut bad = p.clone();
        bad.push(0);
        assert!(InfoRequest::parse(&bad).is_err());
        // Missing count entirely.
        assert!(InfoRequest::parse(&[0, 0, 0, 0]).is_err());
        assert!(InfoRequest::parse(&[]).is_err());
        // Empty name and list: the default export.
        let empty = info_payload(b"", &[]);
        assert_eq!(InfoRequest::parse(&empty).expect("valid").name, "");
        // Names must be UTF-8 without NUL.
        assert!(InfoRequest::parse(&info_payload(b"a\0b", &[])).is_err());
        assert!(InfoRequest::parse(&info_payload(&[0xff, 0xfe], &[])).is_err());
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    #[test]
    fn meta_context_request_parses_and_rejects_bad_lengths() {
        let p = meta_payload("disk", &["base:allocation", "qemu:dirty-bitmap:x"]);
        let r = MetaContextRequest::parse(&p).expect("valid");
        assert_eq!(r.name, "disk");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);

        let mut bad = p.clone();
        bad.pop();
        assert!(MetaContextRequest::parse(&bad).is_err());
        let mut bad = p.clone();
        bad.push(b'!');
        assert!(MetaContextRequest::parse(&bad).is_err());
        // A huge count must fail without allocating for it.
        let mut bad = meta_payload("d", &[]);
        let at = bad.len() - 4;
        bad[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextRequest::parse(&bad).is_err());
    }

    #[test]
    fn queries_select_base_allocation_only() {
        assert_eq!(
            interpret_query("base:allocation", false),
            Ok(MetaQuery::BaseAllocation)
        );
        assert_eq!(
            interpret_query("base:", true),
            Ok(MetaQuery::BaseAllocation)
        );
        assert_eq!(interpret_query("base:", false), Ok(MetaQuery::Nothing));
        assert_eq!(interpret_query("base:other", false), Ok(MetaQuery::Nothing));
        assert_eq!(
            interpret_query("qemu:dirty-bitmap:a", true),
            Ok(MetaQuery::Nothing)
        );
        assert!(interpret_query("allocation", true).is_err());
    }

    #[test]
    fn classify_accepts_valid_requests() {
        let s = session();
        assert_eq!(
            classify_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 4096, 4096), &s),
            Disposition::Execute(Op::Read {
                offset: 4096,
                length: 4096,
                df: true
            })
        );
        assert_eq!(
            classify_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 1 << 20), &s),
            Disposition::Execute(Op::Write {
                offset: 0,
                length: 1 << 20,
                fua: true
            })
        );
        assert_eq!(
            classify_request(
                &req(
                    NBD_CMD_WRITE_ZEROES,
                    NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                    1,
                    2
                ),
                &s
            ),
            Disposition::Execute(Op::WriteZeroes {
                offset: 1,
                length: 2,
                fua: false,
                no_hole: true,
                fast: true
            })
        );
        assert_eq!(
            classify_request(&req(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0), &s),
            Disposition::Execute(Op::Flush)
        );
        assert_eq!(
            classify_request(&req(NBD_CMD_CACHE, 0, 0, 4096), &s),
            Disposition::Succeed
        );
        assert_eq!(
            classify_request(
                &req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 1 << 20),
                &s
            ),
            Disposition::Execute(Op::BlockStatus {
                offset: 0,
                length: 1 << 20,
                req_one: true
            })
        );
        assert_eq!(
            classify_request(&req(NBD_CMD_DISC, 0, 0, 0), &s),
            Disposition::Disconnect
        );
        // Zero-length I/O succeeds without the backend.
        for cmd in [
            NBD_CMD_READ,
            NBD_CMD_WRITE,
            NBD_CMD_TRIM,
            NBD_CMD_WRITE_ZEROES,
        ] {
            assert_eq!(
                classify_request(&req(cmd, 0, 1 << 20, 0), &s),
                Disposition::Succeed
            );
        }
    }

    fn errno_of(d: Disposition) -> (u32, u32) {
        match d {
            Disposition::Reject { errno, drain, .. } => (errno, drain),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn classify_rejects_out_of_range_and_oversized_requests() {
        let s = session();
        let end = s.size;
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_READ, 0, end - 1, 2), &s)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_WRITE, 0, end, 512), &s)),
            (NBD_ENOSPC, 512)
        );
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_WRITE_ZEROES, 0, end, 1), &s)),
            (NBD_ENOSPC, 0)
        );
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_TRIM, 0, u64::MAX, 1), &s)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_CACHE, 0, end, 1), &s)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            errno_of(classify_request(
                &req(NBD_CMD_BLOCK_STATUS, 0, end - 10, 11),
                &s
            )),
            (NBD_EINVAL, 0)
        );
        // Offset overflow must not wrap around into range.
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_READ, 0, u64::MAX - 1, 4), &s)),
            (NBD_EINVAL, 0)
        );
        // Too long to read: EOVERFLOW with structured replies, EINVAL without.
        let big = MAX_REQUEST_BYTES + 1;
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_READ, 0, 0, big), &s)),
            (NBD_EOVERFLOW, 0)
        );
        let simple = Session {
            structured: false,
            ..s
        };
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_READ, 0, 0, big), &simple)),
            (NBD_EINVAL, 0)
        );
        // A write too long to drain closes the connection.
        assert!(matches!(
            classify_request(&req(NBD_CMD_WRITE, 0, 0, big), &s),
            Disposition::Close(_)
        ));
        assert!(matches!(
            classify_request(&req(NBD_CMD_WRITE, 0xffff, 0, u32::MAX), &s),
            Disposition::Close(_)
        ));
    }

    #[test]
    fn classify_rejects_bad_flags_and_unknown_commands() {
        let s = session();
        // DF is only valid on reads, and only with structured replies.
        assert_eq!(
            errno_of(classify_request(
                &req(NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 8),
                &s
            )),
            (NBD_EINVAL, 8)
        );
        let simple = Session {
            structured: false,
            block_status: false,
            ..s
        };
        assert_eq!(
            errno_of(classify_request(
                &req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 8),
                &simple
            )),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_READ, 1 << 9, 0, 8), &s)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            errno_of(classify_request(
                &req(NBD_CMD_TRIM, NBD_CMD_FLAG_NO_HOLE, 0, 8),
                &s
            )),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            errno_of(classify_request(
                &req(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 8),
                &s
            )),
            (NBD_EINVAL, 8)
        );
        assert_eq!(
            errno_of(classify_request(&req(99, 0, 0, 8), &s)),
            (NBD_EINVAL, 0)
        );
        // Block status needs a negotiated context and a non-zero length.
        assert_eq!(
            errno_of(classify_request(
                &req(NBD_CMD_BLOCK_STATUS, 0, 0, 8),
                &simple
            )),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            errno_of(classify_request(&req(NBD_CMD_BLOCK_STATUS, 0, 0, 0), &s)),
            (NBD_EINVAL, 0)
        );
    }

    #[test]
    fn reply_encodings_have_the_specified_layout() {
        let h = simple_reply(NBD_EIO, 7);
        assert_eq!(&h[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&h[4..8], &5u32.to_be_bytes());
        assert_eq!(&h[8..], &7u64.to_be_bytes());

        let d = data_chunk_header(NBD_REPLY_FLAG_DONE, 9, 4096, 512);
        assert_eq!(&d[..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&d[4..6], &1u16.to_be_bytes());
        assert_eq!(&d[6..8], &NBD_REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&d[16..20], &520u32.to_be_bytes());
        assert_eq!(&d[20..28], &4096u64.to_be_bytes());

        let z = hole_chunk(0, 9, 8192, 4096);
        assert_eq!(&z[16..20], &12u32.to_be_bytes());
        assert_eq!(&z[28..32], &4096u32.to_be_bytes());

        let mut e = Vec::new();
        error_chunk(&mut e, 3, NBD_EINVAL, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(&e[6..8], &NBD_REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e[16..20], &9u32.to_be_bytes());
        assert_eq!(&e[20..24], &22u32.to_be_bytes());
        assert_eq!(&e[24..26], &3u16.to_be_bytes());
        assert_eq!(&e[26..], b"bad");

        // Long messages are cut on a character boundary.
        let mut e = Vec::new();
        error_chunk(&mut e, 3, NBD_EIO, &"é".repeat(5000));
        let len = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert!(len <= MAX_STRING_LEN && len.is_multiple_of(2));
        assert_eq!(e.len(), 26 + len);

        let mut b = Vec::new();
        block_status_chunk(&mut b, NBD_REPLY_FLAG_DONE, 1, 1, &[(4096, 0), (8192, 3)]);
        assert_eq!(&b[16..20], &20u32.to_be_bytes());
        assert_eq!(&b[20..24], &1u32.to_be_bytes());
        assert_eq!(&b[24..28], &4096u32.to_be_bytes());
        assert_eq!(&b[36..40], &3u32.to_be_bytes());

        let mut o = Vec::new();
        option_reply(&mut o, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, b"no");
        assert_eq!(o.len(), 20 + 2);
        assert_eq!(&o[12..16], &0x8000_0006u32.to_be_bytes());

        let mut x = Vec::new();
        export_name_reply(&mut x, 1, 2, false);
        assert_eq!(x.len(), 8 + 2 + 124);
        x.clear();
        export_name_reply(&mut x, 1, 2, true);
        assert_eq!(x.len(), 10);
    }
}

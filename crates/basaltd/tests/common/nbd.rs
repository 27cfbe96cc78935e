//! A small, blocking NBD client for the tests: fixed newstyle handshake with
//! `NBD_OPT_GO`, simple replies only (no structured replies), and the raw
//! pieces (greeting, options, request headers, replies) hostile tests need.
//!
//! Protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>;
//! what Basalt's server does is in `docs/nbd.md`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: after `NBDMAGIC` from the server, and before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 2;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Error replies have this bit.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1;

/// Transmission flag: the export supports FLUSH.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the export supports FUA.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;

/// `EIO`.
pub const EIO: u32 = 5;
/// `EINVAL`.
pub const EINVAL: u32 = 22;
/// `ENOSPC`.
pub const ENOSPC: u32 = 28;

/// How long any read from the server may block.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an NBD operation failed.
#[derive(Debug)]
pub enum NbdError {
    /// The connection failed or closed.
    Io(io::Error),
    /// The server answered with this errno.
    Server(u32),
    /// The server broke the protocol, or refused the handshake.
    Protocol(String),
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdError::Io(e) => write!(f, "connection: {e}"),
            NbdError::Server(errno) => write!(f, "server error {errno}"),
            NbdError::Protocol(why) => write!(f, "protocol: {why}"),
        }
    }
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> Self {
        NbdError::Io(e)
    }
}

fn read_u16(stream: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    stream.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(stream: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(stream: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Connects with a read timeout and `TCP_NODELAY`.
pub fn connect(port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads the server's greeting; returns its handshake flags.
pub fn greeting(stream: &mut TcpStream) -> Result<u16, NbdError> {
    let magic = read_u64(stream)?;
    if magic != NBDMAGIC {
        return Err(NbdError::Protocol(format!("greeting magic {magic:#x}")));
    }
    let opt = read_u64(stream)?;
    if opt != IHAVEOPT {
        return Err(NbdError::Protocol(format!(
            "not fixed newstyle (magic {opt:#x})"
        )));
    }
    Ok(read_u16(stream)?)
}

/// Sends the client flags.
pub fn send_client_flags(stream: &mut TcpStream, flags: u32) -> io::Result<()> {
    stream.write_all(&flags.to_be_bytes())
}

/// Sends one option.
pub fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(
        &u32::try_from(data.len())
            .expect("option fits")
            .to_be_bytes(),
    );
    buf.extend_from_slice(data);
    stream.write_all(&buf)
}

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptionReply {
    /// Option it answers.
    pub option: u32,
    /// Reply type.
    pub kind: u32,
    /// Payload.
    pub data: Vec<u8>,
}

/// Reads one option reply.
pub fn read_option_reply(stream: &mut TcpStream) -> Result<OptionReply, NbdError> {
    let magic = read_u64(stream)?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!("option reply magic {magic:#x}")));
    }
    let option = read_u32(stream)?;
    let kind = read_u32(stream)?;
    let len = read_u32(stream)?;
    if len > 1 << 20 {
        return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    Ok(OptionReply { option, kind, data })
}

/// Payload of `NBD_OPT_GO` for `name`, no info requests.
pub fn go_payload(name: &str) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&u32::try_from(name.len()).expect("name fits").to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

/// Sends `NBD_OPT_GO` and reads replies up to the ACK; returns (size,
/// transmission flags).
pub fn go(stream: &mut TcpStream, name: &str) -> Result<(u64, u16), NbdError> {
    send_option(stream, OPT_GO, &go_payload(name))?;
    let mut export = None;
    loop {
        let reply = read_option_reply(stream)?;
        if reply.option != OPT_GO {
            return Err(NbdError::Protocol(format!(
                "reply to option {} during GO",
                reply.option
            )));
        }
        match reply.kind {
            REP_INFO => {
                if reply.data.len() >= 12 && reply.data[0..2] == INFO_EXPORT.to_be_bytes() {
                    let mut size = [0u8; 8];
                    size.copy_from_slice(&reply.data[2..10]);
                    let flags = u16::from_be_bytes([reply.data[10], reply.data[11]]);
                    export = Some((u64::from_be_bytes(size), flags));
                }
            }
            REP_ACK => {
                return export
                    .ok_or_else(|| NbdError::Protocol("GO without NBD_INFO_EXPORT".into()));
            }
            kind if kind & REP_FLAG_ERROR != 0 => {
                return Err(NbdError::Protocol(format!(
                    "GO {name:?} refused with {kind:#x}: {}",
                    String::from_utf8_lossy(&reply.data)
                )));
            }
            other => {
                return Err(NbdError::Protocol(format!(
                    "unexpected reply {other:#x} to GO"
                )));
            }
        }
    }
}

/// A request header (28 bytes).
pub fn request(flags: u16, kind: u16, handle: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// errno (0: success).
    pub error: u32,
    /// Handle of the request it answers.
    pub handle: u64,
}

/// Reads a simple reply header (a read's data follows it on success).
pub fn read_simple_reply(stream: &mut impl Read) -> Result<SimpleReply, NbdError> {
    let magic = read_u32(stream)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!("reply magic {magic:#x}")));
    }
    let error = read_u32(stream)?;
    let handle = read_u64(stream)?;
    Ok(SimpleReply { error, handle })
}

/// Whether the server closed the connection: reading returns EOF or a reset
/// within the stream's read timeout.
pub fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(within));
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A connected client in transmission phase.
pub struct NbdClient {
    stream: TcpStream,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    next_handle: u64,
}

impl NbdClient {
    /// Connects to 127.0.0.1:`port` and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(port: u16, export: &str) -> Result<NbdClient, NbdError> {
        NbdClient::negotiate(connect(port)?, export)
    }

    /// Negotiates on a fresh connection.
    pub fn negotiate(mut stream: TcpStream, export: &str) -> Result<NbdClient, NbdError> {
        let flags = greeting(&mut stream)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol(
                "server does not speak fixed newstyle".into(),
            ));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        send_client_flags(&mut stream, client_flags)?;
        let (size, flags) = go(&mut stream, export)?;
        Ok(NbdClient {
            stream,
            size,
            flags,
            next_handle: 1,
        })
    }

    /// Takes over a stream already in transmission phase.
    pub fn from_stream(stream: TcpStream, size: u64, flags: u16) -> NbdClient {
        NbdClient {
            stream,
            size,
            flags,
            next_handle: 1,
        }
    }

    fn handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    fn expect_reply(&mut self, handle: u64) -> Result<(), NbdError> {
        let reply = read_simple_reply(&mut self.stream)?;
        if reply.handle != handle {
            return Err(NbdError::Protocol(format!(
                "reply for handle {} while waiting for {handle}",
                reply.handle
            )));
        }
        if reply.error != 0 {
            return Err(NbdError::Server(reply.error));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        let handle = self.handle();
        self.stream
            .write_all(&request(0, CMD_READ, handle, offset, len))?;
        self.expect_reply(handle)?;
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(data)
    }

    /// Writes `data` at `offset`, with FUA if asked.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let handle = self.handle();
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let len = u32::try_from(data.len()).expect("write fits one request");
        let mut buf = Vec::with_capacity(28 + data.len());
        buf.extend_from_slice(&request(flags, CMD_WRITE, handle, offset, len));
        buf.extend_from_slice(data);
        self.stream.write_all(&buf)?;
        self.expect_reply(handle)
    }

    /// FLUSH.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        let handle = self.handle();
        self.stream
            .write_all(&request(0, CMD_FLUSH, handle, 0, 0))?;
        self.expect_reply(handle)
    }

    /// Reads `len` bytes at `offset` in requests of at most 1 MiB.
    pub fn read_all(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, NbdError> {
        let mut out = Vec::with_capacity(usize::try_from(len).expect("fits"));
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(1 << 20);
            out.extend(self.read(at, u32::try_from(n).expect("fits"))?);
            at += n;
        }
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub fn disconnect(mut self) {
        let handle = self.handle();
        let _ = self.stream.write_all(&request(0, CMD_DISC, handle, 0, 0));
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The raw stream.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Gives up the client, keeping the connection.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

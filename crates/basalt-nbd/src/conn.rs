//! One client connection: handshake, then the transmission loop.
//!
//! After the handshake, one task drives the whole connection in a single
//! poll loop, like this:
//!
//! ```text
//!            ┌──────────────────── connection task ─────────────────────┐
//!   socket ─▶│ read every request that has arrived (payload → IoBuf)    │
//!            │   │ classify; refused ones get their error reply at once │
//!            │   ▼                                                      │
//!            │ in flight: one future per request, all run concurrently  │──▶ backend
//!            │   │ (FuturesUnordered)                                   │◀──
//!            │   ▼                                                      │
//!   socket ◀─│ every finished reply goes out in one writev              │
//!            └──────────────────────────────────────────────────────────┘
//! ```
//!
//! The reader never waits for the backend, so a client's whole queue depth
//! reaches the backend at once; replies leave in completion order (the
//! protocol allows any order), and replies that finish together share one
//! system call. Keeping reading, running and writing in one task avoids
//! cross-thread wake-ups per request, which on small machines cost more than
//! the protocol work itself; connections still spread over the runtime's
//! threads.
//!
//! A connection holds at most [`NbdConfig::max_inflight_bytes`] of payload in
//! flight: past that it stops reading requests until replies have been
//! written, so a client that does not read its replies cannot make the server
//! buffer without bound.
//!
//! Faults stay inside the connection: a protocol violation, a truncated frame
//! or a vanished client ends this connection and nothing else.

use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use basalt_core::{AllocationExtent, BlockBackend, BlockError, ExportRegistry, IoBuf, WriteFlags};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::sync::watch;

use crate::error::NbdError;
use crate::negotiate::{Export, Negotiator, Outcome};
use crate::proto::{self, Disposition, Op, OptionHeader, RequestHeader, Session};
use crate::reply::{Head, OutQueue, Outgoing, Part, Reply};
use crate::server::NbdConfig;

/// Size of the buffer requests are read through. Headers and small write
/// payloads of many pipelined requests arrive in one `read`; payloads larger
/// than this go straight from the socket into their [`IoBuf`].
const READ_BUFFER: usize = 64 * 1024;

/// Budget charged per request on top of its payload, so that many tiny
/// requests are bounded too.
const REQUEST_OVERHEAD: u32 = 1024;

/// The most budget one request can take.
const MAX_REQUEST_COST: u64 = basalt_core::MAX_REQUEST_BYTES as u64 + REQUEST_OVERHEAD as u64;

/// Reads at 4 KiB granularity are checked for zero blocks, which structured
/// replies send as holes.
const ZERO_GRANULE: usize = 4096;

/// Most descriptors in one block status reply (the specification asks for at most 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// How the transmission phase ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    Eof,
    /// The server is shutting down.
    Shutdown,
    /// The handshake ended without entering transmission (abort, unknown export).
    Negotiation,
}

/// True once shutdown was requested or its sender is gone.
pub(crate) fn shutting_down(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Resolves when shutdown is requested (or its sender is dropped).
pub(crate) async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// Serves one client from its first byte to its last.
pub(crate) async fn serve<R, W>(
    reader: R,
    mut writer: W,
    registry: Arc<dyn ExportRegistry>,
    config: &NbdConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<End, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let negotiated = {
        let handshake = handshake(&mut reader, &mut writer, registry, &shutdown);
        let mut stop = shutdown.clone();
        tokio::select! {
            // No request can be in flight yet: on shutdown just hang up.
            _ = wait_shutdown(&mut stop) => return Ok(End::Shutdown),
            result = tokio::time::timeout(config.handshake_timeout, handshake) => {
                result.map_err(|_| NbdError::HandshakeTimeout)??
            }
        }
    };
    let Some(export) = negotiated else {
        let _ = writer.shutdown().await;
        return Ok(End::Negotiation);
    };
    tracing::debug!(export = %export.name, structured = export.structured,
        block_status = export.meta_context.is_some(), "entering transmission");
    let budget = u64::from(config.max_inflight_bytes).max(2 * MAX_REQUEST_COST);
    let end = transmission(&mut reader, &mut writer, export, budget, &mut shutdown).await?;
    writer.flush().await?;
    writer.shutdown().await?;
    Ok(end)
}

async fn handshake<R, W>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    registry: Arc<dyn ExportRegistry>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<Export>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&proto::greeting()).await?;
    writer.flush().await?;
    let mut flags = [0u8; 4];
    reader.read_exact(&mut flags).await?;
    let mut negotiator = Negotiator::new(registry, u32::from_be_bytes(flags))?;
    let mut payload = Vec::new();
    let mut out = Vec::with_capacity(512);
    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        reader.read_exact(&mut header).await?;
        let header = OptionHeader::parse(&header)?;
        if header.length > proto::MAX_OPTION_LEN {
            return Err(NbdError::OptionTooLarge {
                option: header.option,
                length: header.length,
            });
        }
        payload.resize(header.length as usize, 0);
        reader.read_exact(&mut payload).await?;
        out.clear();
        let outcome =
            negotiator.handle_option(header.option, &payload, shutting_down(shutdown), &mut out);
        writer.write_all(&out).await?;
        writer.flush().await?;
        match outcome {
            Outcome::Continue => {}
            Outcome::Close => return Ok(None),
            Outcome::Transmit(export) => return Ok(Some(export)),
        }
    }
}

/// What every request of a connection needs.
struct Conn {
    backend: Arc<dyn BlockBackend>,
    structured: bool,
    meta_context: u32,
}

/// A request ready for the backend.
enum Job {
    Write { offset: u64, data: IoBuf, fua: bool },
    Other(Op),
}

/// Where the reader is within the request stream.
enum ReadState {
    /// Collecting a request header.
    Header {
        bytes: [u8; proto::REQUEST_HEADER_LEN],
        filled: usize,
    },
    /// Collecting a write payload straight into its buffer.
    Payload {
        cookie: u64,
        offset: u64,
        fua: bool,
        data: IoBuf,
        filled: usize,
        cost: u32,
    },
    /// Skipping the payload of a refused write; its reply is sent afterwards.
    Drain { left: u32, reply: Reply },
    /// No more requests will be read.
    Done(End),
}

impl ReadState {
    fn header() -> ReadState {
        ReadState::Header {
            bytes: [0; proto::REQUEST_HEADER_LEN],
            filled: 0,
        }
    }
}

/// The future that serves one request and yields its reply.
fn run_request(
    conn: &Conn,
    cookie: u64,
    job: Job,
    cost: u32,
) -> impl Future<Output = Outgoing> + Send + '_ {
    AssertUnwindSafe(conn.execute(cookie, job))
        .catch_unwind()
        .map(move |result| {
            let reply = result.unwrap_or_else(|_| {
                tracing::error!(cookie, "backend panicked while serving a request");
                error_reply(conn.structured, cookie, proto::NBD_EIO, "internal error")
            });
            Outgoing { reply, cost }
        })
}

/// The transmission phase: returns once reading has ended and every request
/// read has been answered, or at the first fatal error.
async fn transmission<R, W>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    export: Export,
    budget: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<End, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let session = Session {
        size: export.size,
        structured: export.structured,
        block_status: export.meta_context.is_some(),
    };
    let conn = Conn {
        backend: export.backend,
        structured: export.structured,
        meta_context: export.meta_context.unwrap_or(0),
    };
    let mut inflight = FuturesUnordered::new();
    let mut out = OutQueue::default();
    let mut state = ReadState::header();
    // Payload bytes (plus overhead) read but not yet answered on the wire.
    let mut in_use: u64 = 0;
    let mut stop = pin!(wait_shutdown(shutdown));

    poll_fn(|cx| {
        loop {
            let mut progress = false;

            if !matches!(state, ReadState::Done(_)) && stop.as_mut().poll(cx).is_ready() {
                // Requests already read are still answered; a half-read one is dropped.
                state = ReadState::Done(End::Shutdown);
            }

            // 1. Read every request that has arrived, while the budget allows.
            while in_use + MAX_REQUEST_COST <= budget {
                let step = poll_read_step(cx, reader, &mut state, &session, &conn);
                match step {
                    Poll::Pending => break,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(Step::Nothing)) => break,
                    Poll::Ready(Ok(Step::Progress)) => progress = true,
                    Poll::Ready(Ok(Step::Reply(reply))) => {
                        progress = true;
                        out.push(Outgoing { reply, cost: 0 });
                    }
                    Poll::Ready(Ok(Step::Run(cookie, job, cost))) => {
                        progress = true;
                        in_use += u64::from(cost);
                        inflight.push(run_request(&conn, cookie, job, cost));
                    }
                }
            }

            // 2. Collect every request that has finished.
            while let Poll::Ready(Some(done)) = inflight.poll_next_unpin(cx) {
                progress = true;
                out.push(done);
            }

            // 3. Put every finished reply on the wire in one write.
            if !out.is_empty() {
                match out.poll_write(cx, writer) {
                    Poll::Ready(Ok(freed)) => {
                        in_use -= freed;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(NbdError::Io(e))),
                    Poll::Pending => {}
                }
            }

            if let ReadState::Done(end) = state
                && inflight.is_empty()
                && out.is_empty()
            {
                return Poll::Ready(Ok(end));
            }
            if !progress {
                return Poll::Pending;
            }
        }
    })
    .await
}

/// What one reading step produced.
enum Step {
    /// Nothing to do (reading is over).
    Nothing,
    /// Bytes were consumed; keep going.
    Progress,
    /// A reply that needs no backend.
    Reply(Reply),
    /// A request for the backend, with its budget.
    Run(u64, Job, u32),
}

/// Advances the reader by one step: some bytes of a header or payload, or a
/// complete request.
fn poll_read_step<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    reader: &mut BufReader<R>,
    state: &mut ReadState,
    session: &Session,
    conn: &Conn,
) -> Poll<Result<Step, NbdError>> {
    match state {
        ReadState::Done(_) => Poll::Ready(Ok(Step::Nothing)),
        ReadState::Header { bytes, filled } => {
            let available = ready!(Pin::new(&mut *reader).poll_fill_buf(cx))?;
            if available.is_empty() {
                if *filled == 0 {
                    *state = ReadState::Done(End::Eof);
                    return Poll::Ready(Ok(Step::Progress));
                }
                return Poll::Ready(Err(NbdError::Truncated(
                    std::io::ErrorKind::UnexpectedEof.into(),
                )));
            }
            let n = available.len().min(bytes.len() - *filled);
            bytes[*filled..*filled + n].copy_from_slice(&available[..n]);
            Pin::new(&mut *reader).consume(n);
            *filled += n;
            if *filled < bytes.len() {
                return Poll::Ready(Ok(Step::Progress));
            }
            let request = RequestHeader::parse(bytes)?;
            Poll::Ready(Ok(start_request(state, &request, session, conn)?))
        }
        ReadState::Payload {
            cookie,
            offset,
            fua,
            data,
            filled,
            cost,
        } => {
            let mut buf = ReadBuf::new(&mut data.as_mut_slice()[*filled..]);
            ready!(Pin::new(&mut *reader).poll_read(cx, &mut buf)).map_err(NbdError::Truncated)?;
            let n = buf.filled().len();
            if n == 0 {
                return Poll::Ready(Err(NbdError::Truncated(
                    std::io::ErrorKind::UnexpectedEof.into(),
                )));
            }
            *filled += n;
            if *filled < data.len() {
                return Poll::Ready(Ok(Step::Progress));
            }
            let (cookie, offset, fua, cost) = (*cookie, *offset, *fua, *cost);
            let ReadState::Payload { data, .. } = std::mem::replace(state, ReadState::header())
            else {
                return Poll::Ready(Ok(Step::Progress));
            };
            Poll::Ready(Ok(Step::Run(
                cookie,
                Job::Write { offset, data, fua },
                cost,
            )))
        }
        ReadState::Drain { left, .. } => {
            let available = ready!(Pin::new(&mut *reader).poll_fill_buf(cx))?;
            if available.is_empty() {
                return Poll::Ready(Err(NbdError::Truncated(
                    std::io::ErrorKind::UnexpectedEof.into(),
                )));
            }
            let n = available.len().min(*left as usize);
            Pin::new(&mut *reader).consume(n);
            *left -= n as u32;
            if *left > 0 {
                return Poll::Ready(Ok(Step::Progress));
            }
            match std::mem::replace(state, ReadState::header()) {
                ReadState::Drain { reply, .. } => Poll::Ready(Ok(Step::Reply(reply))),
                _ => Poll::Ready(Ok(Step::Progress)),
            }
        }
    }
}

/// Acts on a complete request header: decides, and moves the reader on.
fn start_request(
    state: &mut ReadState,
    request: &RequestHeader,
    session: &Session,
    conn: &Conn,
) -> Result<Step, NbdError> {
    let cookie = request.cookie;
    *state = ReadState::header();
    match proto::classify_request(request, session) {
        Disposition::Close(reason) => Err(NbdError::Fatal(reason)),
        Disposition::Disconnect => {
            *state = ReadState::Done(End::Disconnect);
            Ok(Step::Progress)
        }
        Disposition::Reject {
            errno,
            drain,
            message,
        } => {
            tracing::debug!(
                cookie,
                command = request.command,
                errno,
                message,
                "request refused"
            );
            let reply = error_reply(conn.structured, cookie, errno, message);
            if drain == 0 {
                Ok(Step::Reply(reply))
            } else {
                *state = ReadState::Drain { left: drain, reply };
                Ok(Step::Progress)
            }
        }
        Disposition::Succeed => Ok(Step::Reply(success_reply(
            conn.structured,
            cookie,
            request.command == proto::NBD_CMD_READ,
        ))),
        Disposition::Execute(Op::Write {
            offset,
            length,
            fua,
        }) => {
            *state = ReadState::Payload {
                cookie,
                offset,
                fua,
                data: IoBuf::for_overwrite(length as usize),
                filled: 0,
                cost: length.saturating_add(REQUEST_OVERHEAD),
            };
            Ok(Step::Progress)
        }
        Disposition::Execute(op) => {
            let payload = match op {
                Op::Read { length, .. } => length,
                _ => 0,
            };
            Ok(Step::Run(
                cookie,
                Job::Other(op),
                payload.saturating_add(REQUEST_OVERHEAD),
            ))
        }
    }
}

/// A reply with no data: simple, or an empty final chunk for reads under
/// structured replies (which must not get simple replies).
fn success_reply(structured: bool, cookie: u64, is_read: bool) -> Reply {
    let head = if structured && is_read {
        Head::new(&proto::chunk_header(
            proto::NBD_REPLY_FLAG_DONE,
            proto::NBD_REPLY_TYPE_NONE,
            cookie,
            0,
        ))
    } else {
        Head::new(&proto::simple_reply(0, cookie))
    };
    Reply::Head { head, data: None }
}

/// An error reply: a structured error chunk with a message when structured
/// replies are on, otherwise a simple reply carrying only the error value.
fn error_reply(structured: bool, cookie: u64, errno: u32, message: &str) -> Reply {
    if structured {
        let mut bytes = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 6 + message.len());
        proto::error_chunk(&mut bytes, cookie, errno, message);
        Reply::Bytes(bytes)
    } else {
        Reply::Head {
            head: Head::new(&proto::simple_reply(errno, cookie)),
            data: None,
        }
    }
}

/// The NBD error value for a backend error. `ENOTSUP` is only meaningful to
/// clients for fast zeroing; elsewhere it becomes `EINVAL`. Values outside
/// the protocol's list become `EIO`.
fn wire_errno(err: &BlockError, fast_zero: bool) -> u32 {
    match err.errno() {
        proto::NBD_ENOTSUP if !fast_zero => proto::NBD_EINVAL,
        errno @ (proto::NBD_EPERM
        | proto::NBD_EIO
        | proto::NBD_ENOMEM
        | proto::NBD_EINVAL
        | proto::NBD_ENOSPC
        | proto::NBD_EOVERFLOW
        | proto::NBD_ENOTSUP
        | proto::NBD_ESHUTDOWN) => errno,
        _ => proto::NBD_EIO,
    }
}

impl Conn {
    async fn execute(&self, cookie: u64, job: Job) -> Reply {
        let backend = &*self.backend;
        let (result, fast_zero) = match job {
            Job::Write { offset, data, fua } => (
                backend
                    .write(offset, data, WriteFlags { fua })
                    .await
                    .map(|()| success_reply(self.structured, cookie, false)),
                false,
            ),
            Job::Other(Op::Read { offset, length, df }) => (
                match backend.read(offset, length).await {
                    Ok(data) if data.len() == length as usize => {
                        Ok(read_reply(self.structured, cookie, offset, data, df))
                    }
                    // Sending a short buffer would desynchronise the stream.
                    Ok(data) => Err(BlockError::Io(format!(
                        "backend returned {} bytes for a read of {length}",
                        data.len()
                    ))),
                    Err(e) => Err(e),
                },
                false,
            ),
            Job::Other(Op::Write { .. }) => {
                (Err(BlockError::Io("write without payload".into())), false)
            }
            Job::Other(Op::Flush) => (
                backend
                    .flush()
                    .await
                    .map(|()| success_reply(self.structured, cookie, false)),
                false,
            ),
            Job::Other(Op::Trim { offset, length, .. }) => (
                match backend.trim(offset, u64::from(length)).await {
                    // Trim is advisory: a backend that cannot discard has done its job.
                    Ok(()) | Err(BlockError::NotSupported(_)) => {
                        Ok(success_reply(self.structured, cookie, false))
                    }
                    Err(e) => Err(e),
                },
                false,
            ),
            Job::Other(Op::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast,
            }) => (
                write_zeroes(backend, offset, length, no_hole, fua, fast)
                    .await
                    .map(|()| success_reply(self.structured, cookie, false)),
                fast,
            ),
            Job::Other(Op::BlockStatus {
                offset,
                length,
                req_one,
            }) => (
                match backend.block_status(offset, u64::from(length)).await {
                    Ok(extents) => Ok(self.block_status_reply(cookie, length, req_one, &extents)),
                    // Status 0 ("allocated, contents unknown") is always a safe answer.
                    Err(BlockError::NotSupported(_)) => {
                        Ok(self.block_status_reply(cookie, length, req_one, &[]))
                    }
                    Err(e) => Err(e),
                },
                false,
            ),
        };
        result.unwrap_or_else(|e| {
            let errno = wire_errno(&e, fast_zero);
            tracing::debug!(cookie, errno, error = %e, "request failed");
            error_reply(self.structured, cookie, errno, &e.to_string())
        })
    }

    fn block_status_reply(
        &self,
        cookie: u64,
        length: u32,
        req_one: bool,
        extents: &[AllocationExtent],
    ) -> Reply {
        let descriptors = descriptors(extents, length, req_one);
        let mut bytes = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 4 + 8 * descriptors.len());
        proto::block_status_chunk(
            &mut bytes,
            proto::NBD_REPLY_FLAG_DONE,
            cookie,
            self.meta_context,
            &descriptors,
        );
        Reply::Bytes(bytes)
    }
}

/// Turns backend extents into `base:allocation` descriptors: clipped to the
/// request, adjacent equal states merged, at most one with `REQ_ONE`, never
/// empty (a backend that says nothing gets one "allocated" descriptor).
fn descriptors(extents: &[AllocationExtent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(extents.len().min(64));
    let mut left = length;
    for extent in extents {
        if left == 0 {
            break;
        }
        if extent.length == 0 {
            continue;
        }
        let take = u32::try_from(extent.length).unwrap_or(u32::MAX).min(left);
        let state = if extent.hole {
            proto::NBD_STATE_HOLE
        } else {
            0
        } | if extent.zero {
            proto::NBD_STATE_ZERO
        } else {
            0
        };
        let full = (req_one && !out.is_empty()) || out.len() == MAX_DESCRIPTORS;
        match out.last_mut() {
            Some(last) if last.1 == state => last.0 += take,
            _ if full => break,
            _ => out.push((take, state)),
        }
        left -= take;
    }
    if out.is_empty() {
        out.push((length, 0));
    }
    out
}

async fn write_zeroes(
    backend: &dyn BlockBackend,
    offset: u64,
    length: u32,
    no_hole: bool,
    fua: bool,
    fast: bool,
) -> Result<(), BlockError> {
    let flags = WriteFlags { fua };
    match backend
        .write_zeroes(offset, u64::from(length), no_hole, flags)
        .await
    {
        // A backend without a zeroing primitive: a fast-zero request fails
        // fast (ENOTSUP); otherwise write zeroes the slow way.
        Err(BlockError::NotSupported(_)) if !fast => {
            const STEP: u32 = 1 << 20;
            let mut done = 0u32;
            while done < length {
                let n = STEP.min(length - done);
                backend
                    .write(offset + u64::from(done), IoBuf::zeroed(n as usize), flags)
                    .await?;
                done += n;
            }
            Ok(())
        }
        other => other,
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    // OR-folding fixed-size chunks vectorises well; stop at the first non-zero chunk.
    bytes
        .chunks(256)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The reply to a successful read.
///
/// With structured replies (and no `DF`), 4 KiB blocks that read as zeroes
/// travel as `NBD_REPLY_TYPE_OFFSET_HOLE` chunks: a never-written region
/// costs 32 bytes on the wire instead of its size. Checking a block that holds
/// data stops at its first non-zero bytes, so data reads pay almost nothing.
fn read_reply(structured: bool, cookie: u64, offset: u64, data: IoBuf, df: bool) -> Reply {
    if !structured {
        return Reply::Head {
            head: Head::new(&proto::simple_reply(0, cookie)),
            data: Some(data),
        };
    }
    if !df && let Some(reply) = sparse_read_reply(cookie, offset, &data) {
        return reply(data);
    }
    let len = data.len() as u32;
    Reply::Head {
        head: Head::new(&proto::data_chunk_header(
            proto::NBD_REPLY_FLAG_DONE,
            cookie,
            offset,
            len,
        )),
        data: Some(data),
    }
}

/// Splits a read into data and hole chunks if it holds at least one aligned
/// all-zero 4 KiB block. Returns a constructor taking the buffer back.
fn sparse_read_reply(
    cookie: u64,
    offset: u64,
    data: &IoBuf,
) -> Option<impl FnOnce(IoBuf) -> Reply + use<>> {
    let bytes = data.as_slice();
    if bytes.len() < ZERO_GRANULE {
        return None;
    }
    // Runs of (range in buffer, is_hole), split at aligned 4 KiB boundaries.
    let misalign = (offset % ZERO_GRANULE as u64) as usize;
    let mut at = if misalign == 0 {
        0
    } else {
        ZERO_GRANULE - misalign
    };
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    if at > 0 {
        runs.push((0..at.min(bytes.len()), false));
    }
    let mut any_hole = false;
    while at < bytes.len() {
        let end = (at + ZERO_GRANULE).min(bytes.len());
        let hole = end - at == ZERO_GRANULE && is_zero(&bytes[at..end]);
        any_hole |= hole;
        match runs.last_mut() {
            Some((range, kind)) if *kind == hole => range.end = end,
            _ => runs.push((at..end, hole)),
        }
        at = end;
    }
    if !any_hole {
        return None;
    }
    Some(move |data: IoBuf| {
        let mut heads = Vec::with_capacity(runs.len() * proto::HOLE_CHUNK_LEN);
        let mut parts = Vec::with_capacity(runs.len());
        let last = runs.len() - 1;
        for (i, (range, hole)) in runs.into_iter().enumerate() {
            let flags = if i == last {
                proto::NBD_REPLY_FLAG_DONE
            } else {
                0
            };
            let chunk_offset = offset + range.start as u64;
            let len = (range.end - range.start) as u32;
            let start = heads.len();
            if hole {
                heads.extend_from_slice(&proto::hole_chunk(flags, cookie, chunk_offset, len));
                parts.push(Part {
                    head: start..heads.len(),
                    data: 0..0,
                });
            } else {
                heads.extend_from_slice(&proto::data_chunk_header(
                    flags,
                    cookie,
                    chunk_offset,
                    len,
                ));
                parts.push(Part {
                    head: start..heads.len(),
                    data: range,
                });
            }
        }
        Reply::Sparse { heads, parts, data }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(reply: &Reply) -> Vec<u8> {
        reply.to_vec()
    }

    /// Parses structured chunks into (flags, type, offset, payload-after-offset).
    fn chunks(mut bytes: &[u8]) -> Vec<(u16, u16, u64, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(
                &bytes[..4],
                &proto::NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes()
            );
            let flags = u16::from_be_bytes([bytes[4], bytes[5]]);
            let kind = u16::from_be_bytes([bytes[6], bytes[7]]);
            let len = u32::from_be_bytes(bytes[16..20].try_into().expect("4")) as usize;
            let payload = &bytes[20..20 + len];
            let offset = u64::from_be_bytes(payload[..8].try_into().expect("8"));
            out.push((flags, kind, offset, payload[8..].to_vec()));
            bytes = &bytes[20 + len..];
        }
        out
    }

    #[test]
    fn reads_with_zero_blocks_become_hole_chunks() {
        // 1000 bytes of data before the first boundary, then zero, data, zero blocks.
        let offset = 4096 * 3 - 1000;
        let mut bytes = vec![0u8; 1000 + 3 * 4096 + 10];
        bytes[..1000].fill(1);
        bytes[1000 + 4096..1000 + 8192].fill(2);
        let reply = read_reply(true, 5, offset, IoBuf::from_slice(&bytes), false);
        let c = chunks(&wire(&reply));
        let summary: Vec<_> = c.iter().map(|(f, t, o, p)| (*f, *t, *o, p.len())).collect();
        assert_eq!(
            summary,
            vec![
                (0, proto::NBD_REPLY_TYPE_OFFSET_DATA, offset, 1000),
                (0, proto::NBD_REPLY_TYPE_OFFSET_HOLE, offset + 1000, 4),
                (
                    0,
                    proto::NBD_REPLY_TYPE_OFFSET_DATA,
                    offset + 1000 + 4096,
                    4096
                ),
                (
                    0,
                    proto::NBD_REPLY_TYPE_OFFSET_HOLE,
                    offset + 1000 + 8192,
                    4
                ),
                (
                    proto::NBD_REPLY_FLAG_DONE,
                    proto::NBD_REPLY_TYPE_OFFSET_DATA,
                    offset + 1000 + 3 * 4096,
                    10
                ),
            ]
        );
        assert_eq!(&c[1].3, &4096u32.to_be_bytes());
        assert!(c[2].3.iter().all(|&b| b == 2));
        assert!(c[0].3.iter().all(|&b| b == 1));
    }

    #[test]
    fn df_and_data_reads_use_one_chunk_and_simple_reads_raw_data() {
        let zeros = IoBuf::zeroed(8192);
        let c = chunks(&wire(&read_reply(true, 1, 0, zeros.clone(), true)));
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].0, c[0].1, c[0].3.len()),
            (
                proto::NBD_REPLY_FLAG_DONE,
                proto::NBD_REPLY_TYPE_OFFSET_DATA,
                8192
            )
        );
        let c = chunks(&wire(&read_reply(true, 1, 0, zeros.clone(), false)));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].1, proto::NBD_REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(c[0].0, proto::NBD_REPLY_FLAG_DONE);
        let simple = wire(&read_reply(false, 1, 0, zeros, false));
        assert_eq!(simple.len(), 16 + 8192);
        assert_eq!(&simple[..16], &proto::simple_reply(0, 1));
    }

    #[test]
    fn descriptors_clip_merge_and_honour_req_one() {
        let e = |length, hole, zero| AllocationExtent { length, hole, zero };
        let extents = [
            e(4096, false, false),
            e(4096, false, false),
            e(0, true, true),
            e(8192, true, true),
            e(1 << 40, false, true),
        ];
        assert_eq!(
            descriptors(&extents, 20000, false),
            vec![(8192, 0), (8192, 3), (3616, 2)]
        );
        assert_eq!(descriptors(&extents, 20000, true), vec![(8192, 0)]);
        assert_eq!(descriptors(&extents, 100, true), vec![(100, 0)]);
        assert_eq!(descriptors(&[], 77, false), vec![(77, 0)]);
        assert_eq!(
            descriptors(&[e(5, false, false), e(5, true, true)], 1, false),
            vec![(1, 0)]
        );
    }

    #[test]
    fn backend_errors_map_to_protocol_values() {
        assert_eq!(
            wire_errno(&BlockError::Io("x".into()), false),
            proto::NBD_EIO
        );
        assert_eq!(wire_errno(&BlockError::NoSpace, false), proto::NBD_ENOSPC);
        assert_eq!(
            wire_errno(&BlockError::NotSupported("x"), false),
            proto::NBD_EINVAL
        );
        assert_eq!(
            wire_errno(&BlockError::NotSupported("x"), true),
            proto::NBD_ENOTSUP
        );
        assert_eq!(
            wire_errno(&BlockError::Shutdown, false),
            proto::NBD_ESHUTDOWN
        );
    }
}

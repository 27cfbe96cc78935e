//! Replies on their way to the socket.
//!
//! Requests finish in any order and their [`Reply`]s queue up in an
//! [`OutQueue`]. Every time the connection gets to write, it hands all queued
//! replies to one vectored `write`, so replies that complete together share
//! one system call, and nothing waits for a timer (sockets run with
//! `TCP_NODELAY`). Read payloads go from the backend's [`IoBuf`] straight
//! into the `writev` — never copied in user space.
//!
//! A reply's share of the connection's in-flight budget is given back only
//! once the reply is fully written, so a client that stops reading replies
//! stops having its requests read too.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use basalt_core::IoBuf;
use tokio::io::AsyncWrite;

/// Most slices handed to one `writev` (well under `IOV_MAX`).
const MAX_SLICES: usize = 64;
/// Most bytes gathered for one `writev`; the kernel takes what fits anyway.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// Up to 32 encoded header bytes, stored inline so common replies need no heap.
#[derive(Clone, Copy)]
pub(crate) struct Head {
    bytes: [u8; 32],
    len: u8,
}

impl Head {
    /// Copies `bytes`; callers pass fixed-size headers of at most 32 bytes.
    pub(crate) fn new(bytes: &[u8]) -> Head {
        let len = bytes.len().min(32);
        let mut head = Head {
            bytes: [0; 32],
            len: len as u8,
        };
        head.bytes[..len].copy_from_slice(&bytes[..len]);
        head
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// One piece of a sparse read reply: chunk header bytes then a data range.
pub(crate) struct Part {
    pub(crate) head: Range<usize>,
    pub(crate) data: Range<usize>,
}

/// The encoded bytes of one reply (one simple reply, or every chunk of a
/// structured reply, so chunks of one reply are never interleaved).
pub(crate) enum Reply {
    /// A small header, then optionally a payload: simple replies, a single
    /// data chunk, a hole chunk.
    Head { head: Head, data: Option<IoBuf> },
    /// Fully encoded bytes: error chunks with messages, block status.
    Bytes(Vec<u8>),
    /// A read split into data and hole chunks over one buffer.
    Sparse {
        heads: Vec<u8>,
        parts: Vec<Part>,
        data: IoBuf,
    },
}

impl Reply {
    /// Calls `f` with each contiguous piece in wire order until it returns false.
    /// Returns false if `f` stopped early.
    fn pieces<'a>(&'a self, f: &mut impl FnMut(&'a [u8]) -> bool) -> bool {
        match self {
            Reply::Head { head, data } => {
                f(head.as_slice()) && data.as_ref().is_none_or(|d| f(d.as_slice()))
            }
            Reply::Bytes(bytes) => f(bytes),
            Reply::Sparse { heads, parts, data } => parts.iter().all(|part| {
                let head = heads.get(part.head.clone()).unwrap_or_default();
                let body = data.as_slice().get(part.data.clone()).unwrap_or_default();
                f(head) && f(body)
            }),
        }
    }

    /// The reply's bytes as one vector (tests only).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.pieces(&mut |p| {
            out.extend_from_slice(p);
            true
        });
        out
    }

    /// Total bytes on the wire.
    pub(crate) fn wire_len(&self) -> usize {
        let mut total = 0;
        self.pieces(&mut |p| {
            total += p.len();
            true
        });
        total
    }
}

/// A reply and the in-flight budget it holds until written.
pub(crate) struct Outgoing {
    pub(crate) reply: Reply,
    pub(crate) cost: u32,
}

/// Fills `slices` from the queued replies, skipping the first `skip` bytes
/// (already written). Returns how many slices were filled.
fn gather<'a>(
    queue: &'a VecDeque<Outgoing>,
    mut skip: usize,
    slices: &mut [IoSlice<'a>; MAX_SLICES],
) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    for item in queue {
        let more = item.reply.pieces(&mut |piece: &'a [u8]| {
            let piece = if skip >= piece.len() {
                skip -= piece.len();
                return true;
            } else {
                let rest = &piece[skip..];
                skip = 0;
                rest
            };
            slices[n] = IoSlice::new(piece);
            n += 1;
            bytes += piece.len();
            n < MAX_SLICES && bytes < MAX_BATCH_BYTES
        });
        if !more {
            break;
        }
    }
    n
}

/// Replies waiting for the socket, in completion order.
#[derive(Default)]
pub(crate) struct OutQueue {
    queue: VecDeque<Outgoing>,
    /// Bytes of the front reply already written.
    written_of_front: usize,
}

impl OutQueue {
    pub(crate) fn push(&mut self, item: Outgoing) {
        self.queue.push_back(item);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Hands as many queued bytes as possible to one vectored write.
    /// Returns the budget of the replies that are now completely written.
    pub(crate) fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<io::Result<u64>> {
        let written = {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let n = gather(&self.queue, self.written_of_front, &mut slices);
            if n == 0 {
                0
            } else {
                match Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..n]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(w)) => w,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
        };
        let mut left = written + self.written_of_front;
        let mut freed = 0u64;
        while let Some(front) = self.queue.front() {
            let len = front.reply.wire_len();
            if left < len {
                break;
            }
            left -= len;
            freed += u64::from(front.cost);
            self.queue.pop_front();
        }
        self.written_of_front = left;
        Poll::Ready(Ok(freed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `step` bytes per call, to exercise partial writes.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.step;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                left -= take;
                n += take;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn sample_replies() -> (Vec<Outgoing>, Vec<u8>) {
        let mut expected = Vec::new();
        let mut items = Vec::new();
        for i in 0..50u8 {
            let head = [i; 16];
            let data = IoBuf::from_slice(&vec![i.wrapping_mul(7); 1000 + usize::from(i)]);
            expected.extend_from_slice(&head);
            expected.extend_from_slice(data.as_slice());
            items.push(Outgoing {
                reply: Reply::Head {
                    head: Head::new(&head),
                    data: Some(data),
                },
                cost: 10,
            });
            let bytes = vec![i; usize::from(i) + 1];
            expected.extend_from_slice(&bytes);
            items.push(Outgoing {
                reply: Reply::Bytes(bytes),
                cost: 1,
            });
        }
        let data = IoBuf::from_slice(&(0..=255u8).collect::<Vec<_>>());
        let heads = b"AAAABB".to_vec();
        let parts = vec![
            Part {
                head: 0..4,
                data: 0..100,
            },
            Part {
                head: 4..6,
                data: 0..0,
            },
            Part {
                head: 6..6,
                data: 200..256,
            },
        ];
        expected.extend_from_slice(b"AAAA");
        expected.extend_from_slice(&data.as_slice()[..100]);
        expected.extend_from_slice(b"BB");
        expected.extend_from_slice(&data.as_slice()[200..]);
        items.push(Outgoing {
            reply: Reply::Sparse { heads, parts, data },
            cost: 5,
        });
        (items, expected)
    }

    #[tokio::test]
    async fn partial_writes_keep_every_byte_in_order_and_return_budget() {
        for step in [1, 7, 4096, 1 << 20] {
            let (items, expected) = sample_replies();
            let mut queue = OutQueue::default();
            for item in items {
                queue.push(item);
            }
            let mut sink = Trickle {
                out: Vec::new(),
                step,
            };
            let mut freed = 0;
            while !queue.is_empty() {
                freed += std::future::poll_fn(|cx| queue.poll_write(cx, &mut sink))
                    .await
                    .expect("write");
            }
            assert_eq!(sink.out.len(), expected.len(), "step {step}");
            assert!(sink.out == expected, "bytes differ with step {step}");
            assert_eq!(freed, 50 * 11 + 5);
        }
    }
}

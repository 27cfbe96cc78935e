//! The transport between real sockets on 127.0.0.1: requests and replies,
//! refusals (wrong cluster, wrong version, not a member), hostile traffic,
//! lost peers and reconnection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use basalt_net::{
    Frame, FrameKind, HANDSHAKE_BYTES, Handler, Hello, Identity, Incoming, NetError,
    PROTOCOL_VERSION, RemoteError, Reply, TrafficClass, Transport, TransportConfig, WelcomeStatus,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

const ECHO: u16 = 1;
const FAIL: u16 = 2;
const SLOW: u16 = 3;

/// Echoes body and data back, reversed body, so a test sees it was handled.
struct Echo {
    calls: AtomicUsize,
}

impl Handler for Echo {
    fn handle(&self, request: Incoming) -> BoxFuture<'static, Result<Reply, RemoteError>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            match request.service {
                ECHO => {
                    let mut body = request.body.to_vec();
                    body.reverse();
                    Ok(Reply {
                        body: body.into(),
                        data: request.data,
                    })
                }
                SLOW => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(Reply::default())
                }
                _ => Err(RemoteError::new(42, "refused on purpose")),
            }
        })
    }
}

struct Node {
    transport: Transport,
    addr: String,
    echo: Arc<Echo>,
    server: tokio::task::JoinHandle<()>,
}

async fn node(cluster_id: Uuid, node_id: u64, config: TransportConfig) -> Result<Node> {
    let transport = Transport::new(
        Identity {
            cluster_id,
            node_id,
        },
        config,
    );
    let echo = Arc::new(Echo {
        calls: AtomicUsize::new(0),
    });
    transport.register(ECHO, echo.clone(), true);
    transport.register(FAIL, echo.clone(), false);
    transport.register(SLOW, echo.clone(), false);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let server = transport.serve(listener);
    Ok(Node {
        transport,
        addr,
        echo,
        server,
    })
}

async fn echo_call(
    from: &Transport,
    to: &str,
    body: &[u8],
    data: Bytes,
) -> Result<Reply, NetError> {
    from.call_timeout(
        to,
        TrafficClass::Foreground,
        ECHO,
        Bytes::copy_from_slice(body),
        data,
        Duration::from_secs(10),
    )
    .await
}

#[tokio::test]
async fn requests_and_replies_match_under_concurrency() -> Result<()> {
    let cluster = Uuid::new_v4();
    let a = node(cluster, 1, TransportConfig::default()).await?;
    let b = node(cluster, 2, TransportConfig::default()).await?;
    let mut calls = Vec::new();
    for i in 0u32..200 {
        let from = a.transport.clone();
        let to = b.addr.clone();
        calls.push(tokio::spawn(async move {
            let data = Bytes::from(vec![(i % 251) as u8; (i as usize % 7) * 65536]);
            let body = i.to_le_bytes();
            let reply = echo_call(&from, &to, &body, data.clone()).await?;
            let mut expected = body.to_vec();
            expected.reverse();
            anyhow::ensure!(reply.body == expected, "body of call {i} mismatched");
            anyhow::ensure!(reply.data == data, "data of call {i} mismatched");
            Ok::<_, anyhow::Error>(())
        }));
    }
    for call in calls {
        call.await??;
    }
    assert_eq!(b.echo.calls.load(Ordering::Relaxed), 200);
    assert_eq!(a.transport.peer_node_id(&b.addr).await?, 2);
    assert!(a.transport.counters().sent(TrafficClass::Foreground) > 3 * 200 * 65536 / 2);
    assert_eq!(a.transport.counters().sent(TrafficClass::Background), 0);
    // The largest frame the protocol allows goes through intact.
    let big = Bytes::from(vec![7u8; basalt_net::MAX_DATA_BYTES as usize]);
    let reply = echo_call(&a.transport, &b.addr, b"big", big.clone()).await?;
    assert_eq!(reply.data, big);
    Ok(())
}

#[tokio::test]
async fn handler_errors_and_unknown_services_reach_the_caller() -> Result<()> {
    let cluster = Uuid::new_v4();
    let a = node(cluster, 1, TransportConfig::default()).await?;
    let b = node(cluster, 2, TransportConfig::default()).await?;
    let result = a
        .transport
        .call(
            &b.addr,
            TrafficClass::Control,
            FAIL,
            Bytes::new(),
            Bytes::new(),
        )
        .await;
    match result {
        Err(NetError::Remote(error)) => {
            assert_eq!(error.code, 42);
            assert_eq!(error.message, "refused on purpose");
        }
        other => return Err(anyhow!("expected a remote error, got {other:?}")),
    }
    let result = a
        .transport
        .call(
            &b.addr,
            TrafficClass::Control,
            999,
            Bytes::new(),
            Bytes::new(),
        )
        .await;
    assert!(
        matches!(&result, Err(NetError::Remote(e)) if e.code == RemoteError::TRANSPORT && e.message.contains("unknown service 999")),
        "{result:?}"
    );
    // The connection survived both errors.
    echo_call(&a.transport, &b.addr, b"ok", Bytes::new()).await?;
    Ok(())
}

#[tokio::test]
async fn a_node_of_another_cluster_is_refused_with_a_clear_reason() -> Result<()> {
    let ours = Uuid::new_v4();
    let theirs = Uuid::new_v4();
    let member = node(ours, 1, TransportConfig::default()).await?;
    let stranger = node(theirs, 7, TransportConfig::default()).await?;
    let result = echo_call(&stranger.transport, &member.addr, b"x", Bytes::new()).await;
    match result {
        Err(NetError::Refused { status, reason }) => {
            assert_eq!(status, WelcomeStatus::WrongCluster);
            assert!(
                reason.contains(&ours.to_string()) && reason.contains(&theirs.to_string()),
                "{reason}"
            );
        }
        other => return Err(anyhow!("expected a refusal, got {other:?}")),
    }
    assert_eq!(
        member.echo.calls.load(Ordering::Relaxed),
        0,
        "nothing was handled"
    );
    Ok(())
}

#[tokio::test]
async fn a_peer_speaking_another_protocol_version_is_refused() -> Result<()> {
    let cluster = Uuid::new_v4();
    let old = node(cluster, 1, TransportConfig::default()).await?;
    let newer = TransportConfig {
        min_version: PROTOCOL_VERSION + 1,
        max_version: PROTOCOL_VERSION + 2,
        ..TransportConfig::default()
    };
    let new = node(cluster, 2, newer).await?;
    for (from, to) in [(&new, &old), (&old, &new)] {
        let result = echo_call(&from.transport, &to.addr, b"x", Bytes::new()).await;
        match result {
            Err(NetError::Refused { status, reason }) => {
                assert_eq!(status, WelcomeStatus::UnsupportedVersion);
                assert!(reason.contains("protocol version"), "{reason}");
            }
            other => return Err(anyhow!("expected a refusal, got {other:?}")),
        }
    }
    Ok(())
}

#[tokio::test]
async fn joining_nodes_reach_only_open_services_and_unjoined_nodes_accept_nobody() -> Result<()> {
    let member = node(Uuid::new_v4(), 1, TransportConfig::default()).await?;
    let joiner = node(Uuid::nil(), 0, TransportConfig::default()).await?;
    echo_call(&joiner.transport, &member.addr, b"join me", Bytes::new()).await?;
    let result = joiner
        .transport
        .call(
            &member.addr,
            TrafficClass::Control,
            FAIL,
            Bytes::new(),
            Bytes::new(),
        )
        .await;
    assert!(
        matches!(&result, Err(NetError::Remote(e)) if e.message.contains("join the cluster first")),
        "{result:?}"
    );
    let result = echo_call(&member.transport, &joiner.addr, b"x", Bytes::new()).await;
    assert!(
        matches!(&result, Err(NetError::Refused { status: WelcomeStatus::Refused, reason }) if reason.contains("not a member")),
        "{result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn garbage_and_hostile_peers_are_cut_off_while_others_are_served() -> Result<()> {
    let cluster = Uuid::new_v4();
    let server = node(cluster, 1, TransportConfig::default()).await?;
    let client = node(cluster, 2, TransportConfig::default()).await?;
    echo_call(&client.transport, &server.addr, b"before", Bytes::new()).await?;

    // 1. Not our protocol at all (an HTTP request).
    let mut stream = TcpStream::connect(&server.addr).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n")
        .await?;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    assert_eq!(
        read, 0,
        "the server closes a connection that does not say hello"
    );

    // 2. A valid hello, then a frame with a corrupted payload checksum.
    let mut stream = TcpStream::connect(&server.addr).await?;
    let hello = Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        cluster_id: cluster,
        node_id: 9,
    };
    stream.write_all(&hello.encode()).await?;
    let mut welcome = [0u8; HANDSHAKE_BYTES];
    stream.read_exact(&mut welcome).await?;
    let frame = Frame {
        class: TrafficClass::Foreground,
        kind: FrameKind::Request,
        service: ECHO,
        request_id: 1,
        body: Bytes::from_static(b"payload"),
        data: Bytes::new(),
    };
    let mut wire = frame.encode()?.to_vec();
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    stream.write_all(&wire).await?;
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    assert_eq!(
        read, 0,
        "a corrupt frame closes the connection without a reply"
    );

    // 3. A header announcing a body past the limit.
    let mut stream = TcpStream::connect(&server.addr).await?;
    stream.write_all(&hello.encode()).await?;
    stream.read_exact(&mut welcome).await?;
    let mut header = frame.encode_header()?;
    header[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32c(&header[..28]);
    header[28..].copy_from_slice(&crc.to_le_bytes());
    stream.write_all(&header).await?;
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    assert_eq!(read, 0);

    // 4. A peer that vanishes in the middle of a frame.
    let mut stream = TcpStream::connect(&server.addr).await?;
    stream.write_all(&hello.encode()).await?;
    stream.read_exact(&mut welcome).await?;
    stream.write_all(&frame.encode()?[..20]).await?;
    drop(stream);

    assert_eq!(
        server.echo.calls.load(Ordering::Relaxed),
        1,
        "only the real call was handled"
    );
    echo_call(&client.transport, &server.addr, b"after", Bytes::new()).await?;
    Ok(())
}

fn crc32c(bytes: &[u8]) -> u32 {
    // Castagnoli CRC, bitwise: the test's own, independent of the crate's.
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn a_lost_peer_fails_pending_calls_and_a_restarted_one_is_reconnected() -> Result<()> {
    let cluster = Uuid::new_v4();
    let a = node(cluster, 1, TransportConfig::default()).await?;
    let b = node(cluster, 2, TransportConfig::default()).await?;
    echo_call(&a.transport, &b.addr, b"hi", Bytes::new()).await?;

    let pending = {
        let from = a.transport.clone();
        let to = b.addr.clone();
        tokio::spawn(async move {
            from.call(
                &to,
                TrafficClass::Foreground,
                SLOW,
                Bytes::new(),
                Bytes::new(),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Take b down: its listener and every connection it serves.
    b.transport.shutdown();
    let b_addr = b.addr.clone();
    b.server.await?;
    let result = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .context("a pending call must fail when its connection goes")??;
    assert!(matches!(result, Err(NetError::Disconnected)), "{result:?}");

    // A call with a deadline to a dead address fails cleanly.
    let result = a
        .transport
        .call_timeout(
            &b_addr,
            TrafficClass::Control,
            ECHO,
            Bytes::new(),
            Bytes::new(),
            Duration::from_secs(2),
        )
        .await;
    assert!(result.is_err());

    // A new node on the same address is reached by the next call.
    let listener = TcpListener::bind(&b_addr).await?;
    let again = Transport::new(
        Identity {
            cluster_id: cluster,
            node_id: 2,
        },
        TransportConfig::default(),
    );
    again.register(
        ECHO,
        Arc::new(Echo {
            calls: AtomicUsize::new(0),
        }),
        false,
    );
    let _server = again.serve(listener);
    let reply = echo_call(&a.transport, &b_addr, b"ab", Bytes::new()).await?;
    assert_eq!(&reply.body[..], b"ba");
    Ok(())
}

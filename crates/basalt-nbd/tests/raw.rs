//! Protocol tests with a raw client: exact bytes on the wire, hostile input,
//! and after every abuse a proof that other clients are still served.

mod common;

use std::time::Duration;

use basalt_nbd::NbdConfig;
use basalt_nbd::proto::*;
use common::*;
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;

async fn server() -> (
    TestServer,
    Vec<std::sync::Arc<basalt_nbd::testing::MemBackend>>,
) {
    TestServer::start(&[("disk", 4 * MIB), ("scratch", MIB)]).await
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_option_magic_closes_only_that_connection() {
    let (srv, _) = server().await;
    let mut bad = RawClient::handshake(srv.port).await;
    let mut survivor = RawClient::handshake(srv.port).await;
    bad.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await;
    assert!(bad.closed_by_server().await);
    // A client in the middle of negotiating is unaffected.
    survivor.option(NBD_OPT_LIST, &[]).await;
    assert_eq!(survivor.option_replies().await.len(), 3);
    assert_server_healthy(srv.port, "scratch").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_flags_close_the_connection() {
    let (srv, _) = server().await;
    let mut c = RawClient::connect(srv.port).await;
    c.send(&0x8000_0001u32.to_be_bytes()).await;
    assert!(c.closed_by_server().await);
    assert_server_healthy(srv.port, "scratch").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_options_are_refused_and_negotiation_continues() {
    let (srv, _) = server().await;
    let mut c = RawClient::handshake(srv.port).await;
    c.option(0x7777, b"whatever").await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_UNSUP);
    c.option(NBD_OPT_EXTENDED_HEADERS, &[]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_UNSUP);
    c.option(NBD_OPT_LIST, b"junk").await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
    c.option(NBD_OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_POLICY);
    // Name length pointing past the payload.
    c.option(NBD_OPT_GO, &[0, 0, 1, 0, b'd']).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
    // Unknown export: an error, not a hangup.
    let r = c.go("no-such-disk").await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, NBD_REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].2).contains("no-such-disk"));
    // Setting a context before structured replies is invalid.
    c.option(
        NBD_OPT_SET_META_CONTEXT,
        &meta_payload("disk", &["base:allocation"]),
    )
    .await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
    // After all that, GO still works.
    let r = c.go("disk").await;
    assert_eq!(r.last().map(|r| r.1), Some(NBD_REP_ACK));
    c.request(NBD_CMD_READ, 0, 5, 0, 512).await;
    assert_eq!(c.simple().await, (0, 5));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_info_and_abort() {
    let (srv, _) = server().await;
    let mut c = RawClient::handshake(srv.port).await;
    c.option(NBD_OPT_LIST, &[]).await;
    let r = c.option_replies().await;
    let servers: Vec<_> = r
        .iter()
        .filter(|r| r.1 == NBD_REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.2[..4].try_into().expect("4")) as usize;
            (
                String::from_utf8_lossy(&r.2[4..4 + n]).into_owned(),
                String::from_utf8_lossy(&r.2[4 + n..]).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        servers,
        vec![
            ("disk".to_string(), "test export disk".to_string()),
            ("scratch".to_string(), "test export scratch".to_string())
        ]
    );
    c.option(
        NBD_OPT_INFO,
        &info_payload(
            "disk",
            &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
        ),
    )
    .await;
    let r = c.option_replies().await;
    let export = r
        .iter()
        .find(|r| r.1 == NBD_REP_INFO && r.2[..2] == NBD_INFO_EXPORT.to_be_bytes())
        .expect("NBD_INFO_EXPORT");
    assert_eq!(&export.2[2..10], &(4 * MIB).to_be_bytes());
    let flags = u16::from_be_bytes([export.2[10], export.2[11]]);
    for f in [
        NBD_FLAG_HAS_FLAGS,
        NBD_FLAG_SEND_FLUSH,
        NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM,
        NBD_FLAG_SEND_WRITE_ZEROES,
        NBD_FLAG_CAN_MULTI_CONN,
        NBD_FLAG_SEND_CACHE,
        NBD_FLAG_SEND_FAST_ZERO,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & NBD_FLAG_SEND_DF, 0, "DF needs structured replies");
    assert_eq!(flags & NBD_FLAG_READ_ONLY, 0);
    let block = r
        .iter()
        .find(|r| r.1 == NBD_REP_INFO && r.2[..2] == NBD_INFO_BLOCK_SIZE.to_be_bytes())
        .expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(&block.2[2..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    assert_eq!(r.last().map(|r| r.1), Some(NBD_REP_ACK));
    c.option(NBD_OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ACK);
    assert!(c.closed_by_server().await);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_enters_transmission_or_closes() {
    let (srv, _) = server().await;
    // Without NO_ZEROES: size, flags, 124 zero bytes.
    let mut c = RawClient::connect(srv.port).await;
    c.send(&1u32.to_be_bytes()).await;
    c.option(NBD_OPT_EXPORT_NAME, b"disk").await;
    let mut reply = [0xffu8; 134];
    c.read_exact(&mut reply).await;
    assert_eq!(&reply[..8], &(4 * MIB).to_be_bytes());
    assert!(reply[10..].iter().all(|&b| b == 0));
    c.request(NBD_CMD_FLUSH, 0, 1, 0, 0).await;
    assert_eq!(c.simple().await, (0, 1));
    // With NO_ZEROES the request follows the 10 bytes directly.
    let mut c = RawClient::handshake(srv.port).await;
    c.option(NBD_OPT_EXPORT_NAME, b"disk").await;
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply).await;
    c.request(NBD_CMD_FLUSH, 0, 2, 0, 0).await;
    assert_eq!(c.simple().await, (0, 2));
    // Unknown export: EXPORT_NAME cannot report errors, so the server hangs up.
    let mut c = RawClient::handshake(srv.port).await;
    c.option(NBD_OPT_EXPORT_NAME, b"missing").await;
    assert!(c.closed_by_server().await);
    assert_server_healthy(srv.port, "scratch").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_option_closes_the_connection() {
    let (srv, _) = server().await;
    let mut c = RawClient::handshake(srv.port).await;
    let header = OptionHeader {
        option: NBD_OPT_GO,
        length: 1 << 30,
    };
    c.send(&header.encode()).await;
    assert!(c.closed_by_server().await);
    assert_server_healthy(srv.port, "scratch").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshake_times_out() {
    let config = NbdConfig {
        handshake_timeout: Duration::from_millis(300),
        ..NbdConfig::default()
    };
    let (srv, _) = TestServer::start_with(&[("scratch", MIB)], config).await;
    let mut c = RawClient::connect(srv.port).await;
    let started = std::time::Instant::now();
    assert!(c.closed_by_server().await);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_server_healthy(srv.port, "scratch").await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Transmission: hostile and malformed requests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_request_magic_closes_only_that_connection() {
    let (srv, _) = server().await;
    let mut bad = RawClient::open(srv.port, "disk", false, false).await;
    let mut other = RawClient::open(srv.port, "disk", true, false).await;
    let mut header = RequestHeader {
        flags: 0,
        command: NBD_CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    header[0] = 0x12;
    bad.send(&header).await;
    assert!(bad.closed_by_server().await);
    other.request(NBD_CMD_READ, 0, 9, 0, 4096).await;
    let read = other.structured_read(0, 4096).await.expect("read");
    assert_bytes(&read, &[0; 4096], "read on the other connection");
    assert_server_healthy(srv.port, "scratch").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_request_and_vanishing_client_do_not_hurt_the_server() {
    let (srv, backends) = server().await;
    backends[0].fill(0, &[0x5a; 8192]);
    // Half a header, then gone.
    let mut c = RawClient::open(srv.port, "disk", false, false).await;
    let header = RequestHeader {
        flags: 0,
        command: NBD_CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 8192,
    }
    .encode();
    c.send(&header[..13]).await;
    drop(c);
    // A full header and part of the payload, then gone: nothing may be written.
    let mut c = RawClient::open(srv.port, "disk", false, false).await;
    c.send(&header).await;
    c.send(&[0xa5; 5000]).await;
    c.stream.shutdown().await.expect("shutdown");
    assert!(c.closed_by_server().await);
    assert_bytes(
        &backends[0].contents(0, 8192),
        &[0x5a; 8192],
        "untouched by partial write",
    );
    assert_eq!(
        backends[0]
            .stats
            .writes
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_server_healthy(srv.port, "scratch").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_fail_without_touching_data() {
    let (srv, backends) = server().await;
    let size = 4 * MIB;
    let tail = pattern(4096, 1);
    backends[0].fill(size - 4096, &tail);

    // Simple replies: error value only, and the connection stays usable.
    let mut c = RawClient::open(srv.port, "disk", false, false).await;
    c.request(NBD_CMD_READ, 0, 1, size - 100, 200).await;
    assert_eq!(c.simple().await, (NBD_EINVAL, 1));
    c.write(0, 2, size - 100, &[0xff; 200]).await;
    assert_eq!(c.simple().await, (NBD_ENOSPC, 2));
    c.write(0, 3, u64::MAX - 10, &[0xff; 200]).await;
    assert_eq!(c.simple().await, (NBD_ENOSPC, 3));
    c.request(NBD_CMD_TRIM, 0, 4, size, 1).await;
    assert_eq!(c.simple().await, (NBD_EINVAL, 4));
    c.request(NBD_CMD_WRITE_ZEROES, 0, 5, size - 1, 2).await;
    assert_eq!(c.simple().await, (NBD_ENOSPC, 5));
    c.request(NBD_CMD_CACHE, 0, 6, size, 4096).await;
    assert_eq!(c.simple().await, (NBD_EINVAL, 6));
    // The refused write's payload was drained: the next request parses fine.
    c.request(NBD_CMD_READ, 0, 7, size - 4096, 4096).await;
    assert_eq!(c.simple().await, (0, 7));
    let mut back = vec![0u8; 4096];
    c.read_exact(&mut back).await;
    assert_eq!(back, tail);

    // Structured replies: an error chunk with a message.
    let mut c = RawClient::open(srv.port, "disk", true, true).await;
    c.request(NBD_CMD_READ, 0, 8, size - 100, 200).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    let (errno, message) = chunks[0].error().expect("error chunk");
    assert_eq!(errno, NBD_EINVAL);
    assert!(message.contains("end of the export"), "{message}");
    c.request(NBD_CMD_BLOCK_STATUS, 0, 9, size - 10, 20).await;
    assert_eq!(c.chunks().await[0].error().map(|e| e.0), Some(NBD_EINVAL));

    assert_bytes(
        &backends[0].contents(size - 4096, 4096),
        &tail,
        "tail after refused writes",
    );
    assert_eq!(
        backends[0]
            .stats
            .writes
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        backends[0]
            .stats
            .reads
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_lengths_are_refused_or_close() {
    let (srv, backends) = TestServer::start(&[("big", 64 * MIB), ("scratch", MIB)]).await;
    let too_long = basalt_core::MAX_REQUEST_BYTES + 1;
    let mut c = RawClient::open(srv.port, "big", false, false).await;
    c.request(NBD_CMD_READ, 0, 1, 0, too_long).await;
    assert_eq!(c.simple().await, (NBD_EINVAL, 1));
    let mut c = RawClient::open(srv.port, "big", true, false).await;
    c.request(NBD_CMD_READ, 0, 2, 0, too_long).await;
    assert_eq!(
        c.chunks().await[0].error().map(|e| e.0),
        Some(NBD_EOVERFLOW)
    );
    // Large trims and write-zeroes carry no payload and are fine.
    c.request(NBD_CMD_WRITE_ZEROES, 0, 3, 0, too_long).await;
    assert_eq!(c.simple().await, (0, 3));
    // A write longer than the maximum cannot be drained safely: hang up.
    c.request(NBD_CMD_WRITE, 0, 4, 0, too_long).await;
    assert!(c.closed_by_server().await);
    assert_eq!(
        backends[0]
            .stats
            .writes
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_server_healthy(srv.port, "scratch").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_and_flags_get_einval() {
    let (srv, backends) = server().await;
    let mut c = RawClient::open(srv.port, "disk", false, false).await;
    c.request(42, 0, 1, 0, 512).await;
    assert_eq!(c.simple().await, (NBD_EINVAL, 1));
    c.request(NBD_CMD_READ, NBD_CMD_FLAG_DF, 2, 0, 512).await;
    assert_eq!(
        c.simple().await,
        (NBD_EINVAL, 2),
        "DF without structured replies"
    );
    c.request(NBD_CMD_READ, 1 << 12, 3, 0, 512).await;
    assert_eq!(c.simple().await, (NBD_EINVAL, 3));
    // A write with a bad flag is refused and its payload skipped.
    c.write(NBD_CMD_FLAG_REQ_ONE, 4, 0, &[9; 1000]).await;
    assert_eq!(c.simple().await, (NBD_EINVAL, 4));
    c.request(NBD_CMD_BLOCK_STATUS, 0, 5, 0, 512).await;
    assert_eq!(c.simple().await, (NBD_EINVAL, 5), "no context negotiated");
    c.request(NBD_CMD_FLUSH, 0, 6, 0, 0).await;
    assert_eq!(c.simple().await, (0, 6));
    assert_bytes(&backends[0].contents(0, 1000), &[0; 1000], "contents");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_requests_succeed() {
    let (srv, _) = server().await;
    let mut c = RawClient::open(srv.port, "disk", true, false).await;
    c.request(NBD_CMD_READ, 0, 1, 100, 0).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, NBD_REPLY_TYPE_NONE);
    c.write(0, 2, 100, &[]).await;
    assert_eq!(c.simple().await, (0, 2));
    c.request(NBD_CMD_TRIM, 0, 3, 4 * MIB, 0).await;
    assert_eq!(c.simple().await, (0, 3));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_are_reported_as_eio() {
    let (srv, backends) = server().await;
    backends[0].set_failing(true);
    let mut simple = RawClient::open(srv.port, "disk", false, false).await;
    simple.request(NBD_CMD_READ, 0, 1, 0, 4096).await;
    assert_eq!(simple.simple().await, (NBD_EIO, 1));
    simple.write(NBD_CMD_FLAG_FUA, 2, 0, &[1; 4096]).await;
    assert_eq!(simple.simple().await, (NBD_EIO, 2));
    let mut structured = RawClient::open(srv.port, "disk", true, true).await;
    structured.request(NBD_CMD_READ, 0, 3, 0, 4096).await;
    let chunks = structured.chunks().await;
    let (errno, message) = chunks[0].error().expect("error chunk");
    assert_eq!(errno, NBD_EIO);
    assert!(message.contains("injected"), "{message}");
    structured.request(NBD_CMD_FLUSH, 0, 4, 0, 0).await;
    assert_eq!(
        structured.chunks().await[0].error().map(|e| e.0),
        Some(NBD_EIO)
    );
    backends[0].set_failing(false);
    simple.request(NBD_CMD_FLUSH, 0, 5, 0, 0).await;
    assert_eq!(simple.simple().await, (0, 5));
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Transmission: features
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_reads_send_holes_and_honour_df() {
    let (srv, backends) = server().await;
    let data = pattern(4096, 7);
    backends[0].fill(8192, &data);
    let mut c = RawClient::open(srv.port, "disk", true, false).await;
    // Zero block, data block, zero block.
    c.request(NBD_CMD_READ, 0, 1, 4096, 3 * 4096).await;
    let chunks = c.chunks().await;
    let kinds: Vec<_> = chunks.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        vec![
            NBD_REPLY_TYPE_OFFSET_HOLE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            NBD_REPLY_TYPE_OFFSET_HOLE
        ]
    );
    assert!(chunks[2].done() && !chunks[0].done() && !chunks[1].done());
    assert_eq!(&chunks[1].payload[8..], &data[..]);
    // With DF: exactly one content chunk, zeroes included.
    c.request(NBD_CMD_READ, NBD_CMD_FLAG_DF, 2, 4096, 3 * 4096)
        .await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, NBD_REPLY_TYPE_OFFSET_DATA);
    assert_eq!(chunks[0].payload.len(), 8 + 3 * 4096);
    // Reassembled, both match the backend.
    c.request(NBD_CMD_READ, 0, 3, 100, 20000).await;
    let read = c.structured_read(100, 20000).await.expect("read");
    assert_bytes(&read, &backends[0].contents(100, 20000), "reassembled read");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_describes_allocation() {
    let (srv, backends) = server().await;
    backends[0].fill(MIB, &pattern(8192, 3));
    let mut c = RawClient::open(srv.port, "disk", true, true).await;
    c.request(NBD_CMD_BLOCK_STATUS, 0, 1, 0, (2 * MIB) as u32)
        .await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    let chunk = &chunks[0];
    assert_eq!(chunk.kind, NBD_REPLY_TYPE_BLOCK_STATUS);
    assert!(chunk.done());
    assert_eq!(&chunk.payload[..4], &BASE_ALLOCATION_ID.to_be_bytes());
    let descriptors: Vec<(u32, u32)> = chunk.payload[4..]
        .chunks_exact(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().expect("4")),
                u32::from_be_bytes(d[4..].try_into().expect("4")),
            )
        })
        .collect();
    assert_eq!(
        descriptors,
        vec![
            (MIB as u32, NBD_STATE_HOLE | NBD_STATE_ZERO),
            (8192, 0),
            (MIB as u32 - 8192, NBD_STATE_HOLE | NBD_STATE_ZERO)
        ]
    );
    c.request(
        NBD_CMD_BLOCK_STATUS,
        NBD_CMD_FLAG_REQ_ONE,
        2,
        MIB - 4096,
        65536,
    )
    .await;
    let chunks = c.chunks().await;
    assert_eq!(&chunks[0].payload[4..], &[0, 0, 0x10, 0, 0, 0, 0, 3]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_trim_fua_and_flush_reach_the_backend() {
    let (srv, backends) = server().await;
    let b = &backends[0];
    b.fill(0, &[1; 65536]);
    let mut c = RawClient::open(srv.port, "disk", true, true).await;
    c.request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 1, 0, 8192)
        .await;
    assert_eq!(c.simple().await, (0, 1));
    assert!(b.is_allocated(0), "NO_HOLE keeps the range allocated");
    c.request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 2, 8192, 8192)
        .await;
    assert_eq!(c.simple().await, (0, 2));
    assert!(
        !b.is_allocated(8192),
        "without NO_HOLE the range may become a hole"
    );
    c.request(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 3, 16384, 4096)
        .await;
    assert_eq!(c.simple().await, (0, 3));
    assert!(!b.is_allocated(16384));
    assert_bytes(&b.contents(0, 20480), &[0; 20480], "contents");
    assert_bytes(&b.contents(20480, 10), &[1; 10], "contents");
    c.write(NBD_CMD_FLAG_FUA, 4, 100, &[7; 10]).await;
    assert_eq!(c.simple().await, (0, 4));
    c.request(NBD_CMD_FLUSH, 0, 5, 0, 0).await;
    assert_eq!(c.simple().await, (0, 5));
    c.request(NBD_CMD_CACHE, 0, 6, 0, 4096).await;
    assert_eq!(c.simple().await, (0, 6));
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(b.stats.fua_writes.load(SeqCst), 1);
    assert_eq!(b.stats.flushes.load(SeqCst), 1);
    assert_eq!(b.stats.trims.load(SeqCst), 1);
    assert_eq!(b.stats.write_zeroes.load(SeqCst), 2);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered() {
    let (srv, backends) = server().await;
    let mut c = RawClient::open(srv.port, "disk", true, false).await;
    // 300 requests in one burst: writes of distinct patterns, then reads of them.
    let mut burst = Vec::new();
    for i in 0..150u64 {
        let data = pattern(4096 + i as usize, i);
        burst.extend_from_slice(
            &RequestHeader {
                flags: 0,
                command: NBD_CMD_WRITE,
                cookie: i,
                offset: i * 8192,
                length: data.len() as u32,
            }
            .encode(),
        );
        burst.extend_from_slice(&data);
    }
    c.send(&burst).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..150 {
        let (errno, cookie) = c.simple().await;
        assert_eq!(errno, 0);
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    assert_eq!(seen.len(), 150);
    for i in 0..150u64 {
        assert_bytes(
            &backends[0].contents(i * 8192, 4096 + i as usize),
            &pattern(4096 + i as usize, i),
            "pipelined write",
        );
    }
    let mut burst = Vec::new();
    for i in 0..150u64 {
        burst.extend_from_slice(
            &RequestHeader {
                flags: 0,
                command: NBD_CMD_READ,
                cookie: 1000 + i,
                offset: i * 8192,
                length: 4096 + i as u32,
            }
            .encode(),
        );
    }
    c.send(&burst).await;
    let mut left: std::collections::BTreeSet<u64> = (1000..1150).collect();
    while !left.is_empty() {
        let chunks = c.chunks().await;
        let cookie = chunks[0].cookie;
        let i = cookie - 1000;
        assert!(left.remove(&cookie));
        let data: Vec<u8> = chunks
            .iter()
            .flat_map(|c| c.payload[8..].to_vec())
            .collect();
        assert_bytes(&data, &pattern(4096 + i as usize, i), "pipelined read");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_finishes_outstanding_requests_first() {
    let (srv, backends) = server().await;
    backends[0].set_delay(Duration::from_millis(300));
    let mut c = RawClient::open(srv.port, "disk", false, false).await;
    let mut burst = RequestHeader {
        flags: 0,
        command: NBD_CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 4096,
    }
    .encode()
    .to_vec();
    burst.extend_from_slice(&[3; 4096]);
    burst.extend_from_slice(
        &RequestHeader {
            flags: 0,
            command: NBD_CMD_DISC,
            cookie: 2,
            offset: 0,
            length: 0,
        }
        .encode(),
    );
    c.send(&burst).await;
    assert_eq!(c.simple().await, (0, 1));
    assert!(c.closed_by_server().await);
    assert_bytes(&backends[0].contents(0, 4096), &[3; 4096], "contents");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_inflight_requests_then_returns() {
    let (srv, backends) = server().await;
    let mut c = RawClient::open(srv.port, "disk", false, false).await;
    let mut waiting = RawClient::handshake(srv.port).await;
    backends[0].set_delay(Duration::from_millis(400));
    c.write(0, 1, 0, &[8; 512]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    srv.signal_stop();
    assert_eq!(c.simple().await, (0, 1), "in-flight request answered");
    assert!(c.closed_by_server().await);
    assert!(
        waiting.closed_by_server().await,
        "negotiating clients are let go"
    );
    srv.join().await.expect("serve returns cleanly");
    assert_bytes(&backends[0].contents(0, 512), &[8; 512], "contents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_a_unix_socket_and_any_stream() {
    use basalt_nbd::NbdServer;
    use basalt_nbd::testing::{MemBackend, MemRegistry};
    let registry = std::sync::Arc::new(MemRegistry::new());
    let backend = MemBackend::new(MIB);
    registry.insert("u", "", backend.clone());
    let server = NbdServer::new(registry);
    let (stop, shutdown) = tokio::sync::watch::channel(false);

    // In-process stream.
    let (client, server_end) = tokio::io::duplex(1 << 16);
    let s = server.clone();
    let rx = shutdown.clone();
    let duplex_task = tokio::spawn(async move { s.serve_stream(server_end, rx).await });
    let (mut r, mut w) = tokio::io::split(client);
    use tokio::io::AsyncReadExt;
    let mut greeting = [0u8; GREETING_LEN];
    r.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(greeting, basalt_nbd::proto::greeting());
    w.write_all(&3u32.to_be_bytes()).await.expect("flags");
    w.write_all(
        &OptionHeader {
            option: NBD_OPT_ABORT,
            length: 0,
        }
        .encode(),
    )
    .await
    .expect("abort");
    let mut ack = [0u8; 20];
    r.read_exact(&mut ack).await.expect("ack");
    assert_eq!(&ack[12..16], &NBD_REP_ACK.to_be_bytes());
    duplex_task.await.expect("join").expect("clean end");

    // Unix socket, driven by a real client.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let s = server.clone();
    let task = tokio::spawn(async move { s.serve_unix(listener, shutdown).await });
    let uri = format!("nbd+unix:///u?socket={}", path.display());
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 4096 4096", &uri],
    )
    .await;
    assert_bytes(&backend.contents(4096, 4096), &[0x42; 4096], "contents");
    let _ = stop.send(true);
    task.await.expect("join").expect("serve_unix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_replies_is_not_read_either() {
    use std::sync::atomic::Ordering::SeqCst;
    let (srv, backends) = TestServer::start(&[("big", 64 * MIB), ("scratch", MIB)]).await;
    let mut c = RawClient::open(srv.port, "big", false, false).await;
    let len = 32 * MIB as u32;
    let mut burst = Vec::new();
    for i in 0..10u64 {
        burst.extend_from_slice(
            &RequestHeader {
                flags: 0,
                command: NBD_CMD_READ,
                cookie: i,
                offset: 0,
                length: len,
            }
            .encode(),
        );
    }
    c.send(&burst).await;
    // The default budget (64 MiB) admits two 32 MiB reads; their replies
    // cannot drain while the client reads nothing, so the rest wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backends[0].stats.reads.load(SeqCst), 2);
    // Other clients are unaffected meanwhile.
    assert_server_healthy(srv.port, "scratch").await;
    // Once the client reads, everything is answered.
    let mut body = vec![0u8; len as usize];
    for _ in 0..10 {
        assert_eq!(c.simple().await.0, 0);
        c.read_exact(&mut body).await;
    }
    assert_eq!(backends[0].stats.reads.load(SeqCst), 10);
    srv.stop().await;
}

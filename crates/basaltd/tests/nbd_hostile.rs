//! Hostile and broken NBD clients against the daemon, over raw TCP: garbage
//! instead of the handshake, wrong magics, unknown options and commands,
//! out-of-range and oversized requests, truncated requests and connections
//! dropped in the middle of a write payload. After each one the daemon still
//! serves a normal client (ours and qemu-io) and the data is unchanged.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::nbd::{self, NbdClient, NbdError};
use common::{Daemon, run_tool};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

const SIZE: u64 = 16 << 20;
const TAGGED: u64 = 2 << 20;
const PATTERN_AT: u64 = 4 << 20;
const PATTERN_LEN: u64 = 1 << 20;
const CLOSE_WITHIN: Duration = Duration::from_secs(20);

/// A daemon with vdisk `h`: tagged blocks in [0, 2M), 0x5c in [4M, 5M),
/// zeros elsewhere; all flushed.
fn setup() -> Daemon {
    let daemon = Daemon::start();
    daemon.create_vdisk("h", "16M");
    let mut client = daemon.nbd("h");
    assert_eq!(client.size, SIZE);
    let mut data = Vec::new();
    for block in 0..TAGGED / 4096 {
        data.extend(common::tagged_block(block, 1));
    }
    client.write(0, &data, false).expect("write tagged blocks");
    client
        .write(PATTERN_AT, &vec![0x5c; PATTERN_LEN as usize], false)
        .expect("write pattern");
    client.flush().expect("flush");
    client.disconnect();
    daemon
}

/// The daemon runs, a fresh client negotiates, and the data is as set up.
fn assert_intact(daemon: &mut Daemon, after: &str) {
    // Anything wrongly applied would have been by now.
    std::thread::sleep(Duration::from_millis(100));
    assert!(daemon.is_running(), "basaltd died after {after}");
    let mut client = NbdClient::connect(daemon.nbd_port, "h")
        .unwrap_or_else(|e| panic!("no normal client after {after}: {e}"));
    assert_eq!(client.size, SIZE);
    let data = client.read_all(0, TAGGED).expect("read tagged blocks");
    for (block, got) in data.chunks(4096).enumerate() {
        assert_eq!(
            common::parse_block(got),
            common::BlockContent::Tagged {
                block: block as u64,
                seq: 1
            },
            "block {block} changed after {after}"
        );
    }
    let pattern = client
        .read(PATTERN_AT, PATTERN_LEN as u32)
        .expect("read pattern");
    assert!(
        pattern.iter().all(|&b| b == 0x5c),
        "pattern changed after {after}"
    );
    let tail = client
        .read_all(SIZE - (2 << 20), 2 << 20)
        .expect("read tail");
    assert!(tail.iter().all(|&b| b == 0), "tail changed after {after}");
    client.disconnect();
}

/// qemu-io still negotiates and verifies patterns.
fn assert_qemu_io_works(daemon: &Daemon) {
    let uri = daemon.nbd_uri("h");
    let out = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5c 4M 1M",
            "-c",
            "read -P 0 5M 11M",
            &uri,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io after the abuse: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn connect(daemon: &Daemon) -> TcpStream {
    nbd::connect(daemon.nbd_port).expect("TCP connect to the NBD port")
}

/// Connects, reads the greeting and sends valid client flags.
fn negotiating(daemon: &Daemon) -> TcpStream {
    let mut s = connect(daemon);
    let flags = nbd::greeting(&mut s).expect("greeting");
    assert_ne!(flags & nbd::FLAG_FIXED_NEWSTYLE, 0, "not fixed newstyle");
    nbd::send_client_flags(
        &mut s,
        u32::from(nbd::FLAG_FIXED_NEWSTYLE | nbd::FLAG_NO_ZEROES),
    )
    .expect("client flags");
    s
}

/// A client in transmission phase on `h`.
fn transmitting(daemon: &Daemon) -> NbdClient {
    daemon.nbd("h")
}

fn assert_closed(s: &mut TcpStream, what: &str) {
    assert!(
        nbd::closed_by_server(s, CLOSE_WITHIN),
        "the server kept the connection open after {what}"
    );
}

#[test]
fn hostile_handshakes_leave_the_server_serving() {
    let seed = common::test_seed("hostile_handshakes");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut daemon = setup();

    // Garbage instead of the client's flags and options.
    let mut s = connect(&daemon);
    nbd::greeting(&mut s).expect("greeting");
    let mut garbage = vec![0u8; 200];
    rng.fill_bytes(&mut garbage);
    garbage[0] = 0xff; // never valid client flags
    let _ = s.write_all(&garbage);
    assert_closed(&mut s, "garbage client flags");
    assert_intact(&mut daemon, "garbage client flags");

    // Garbage sent before even reading the greeting (an HTTP client).
    let mut s = connect(&daemon);
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: basalt\r\n\r\n");
    assert_closed(&mut s, "an HTTP request");
    assert_intact(&mut daemon, "an HTTP request");

    // Unknown client flags.
    let mut s = connect(&daemon);
    nbd::greeting(&mut s).expect("greeting");
    nbd::send_client_flags(&mut s, 0xffff_fff0 | 1).expect("flags");
    assert_closed(&mut s, "unknown client flags");

    // Wrong option magic.
    let mut s = negotiating(&daemon);
    let mut bad = Vec::new();
    bad.extend_from_slice(b"NOTMAGIC");
    bad.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
    bad.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&bad).expect("send");
    assert_closed(&mut s, "a wrong option magic");
    assert_intact(&mut daemon, "a wrong option magic");

    // Unknown options (with and without data) are refused, and the same
    // connection then negotiates normally.
    let mut s = negotiating(&daemon);
    nbd::send_option(&mut s, 99, &[]).expect("send");
    let reply = nbd::read_option_reply(&mut s).expect("reply to an unknown option");
    assert_eq!((reply.option, reply.kind), (99, nbd::REP_ERR_UNSUP));
    nbd::send_option(&mut s, 0x7fff, &[0xab; 300]).expect("send");
    let reply = nbd::read_option_reply(&mut s).expect("reply to an unknown option");
    assert_eq!((reply.option, reply.kind), (0x7fff, nbd::REP_ERR_UNSUP));
    // An unknown export, then a malformed GO, then the real one.
    nbd::send_option(&mut s, nbd::OPT_GO, &nbd::go_payload("nope")).expect("send");
    let reply = nbd::read_option_reply(&mut s).expect("reply to GO nope");
    assert_eq!(reply.kind, nbd::REP_ERR_UNKNOWN, "{reply:?}");
    let mut malformed = nbd::go_payload("h");
    malformed[3] = 200; // name length beyond the payload
    nbd::send_option(&mut s, nbd::OPT_GO, &malformed).expect("send");
    let reply = nbd::read_option_reply(&mut s).expect("reply to a malformed GO");
    assert_eq!(reply.kind, nbd::REP_ERR_INVALID, "{reply:?}");
    let (size, _) = nbd::go(&mut s, "h").expect("GO after refused options");
    assert_eq!(size, SIZE);
    let mut client = NbdClient::from_stream(s, size, 0);
    assert_eq!(
        common::parse_block(&client.read(4096, 4096).expect("read")),
        common::BlockContent::Tagged { block: 1, seq: 1 }
    );
    client.disconnect();

    // An option announcing a huge payload that never comes.
    let mut s = negotiating(&daemon);
    let mut huge = Vec::new();
    huge.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
    huge.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
    huge.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    s.write_all(&huge).expect("send");
    assert_closed(&mut s, "an oversized option");
    assert_intact(&mut daemon, "an oversized option");

    // EXPORT_NAME of an unknown export cannot be refused politely: closed.
    let mut s = negotiating(&daemon);
    nbd::send_option(&mut s, nbd::OPT_EXPORT_NAME, b"nope").expect("send");
    assert_closed(&mut s, "EXPORT_NAME of an unknown export");

    // ABORT is acknowledged, then the server closes.
    let mut s = negotiating(&daemon);
    nbd::send_option(&mut s, nbd::OPT_ABORT, &[]).expect("send");
    let reply = nbd::read_option_reply(&mut s).expect("reply to ABORT");
    assert_eq!(reply.kind, nbd::REP_ACK);
    assert_closed(&mut s, "ABORT");

    // A client that stalls in the middle of the handshake does not block
    // anyone else.
    let mut stalled = connect(&daemon);
    nbd::greeting(&mut stalled).expect("greeting");
    stalled.write_all(&[0, 0]).expect("half the flags");
    let mut stalled_option = negotiating(&daemon);
    stalled_option
        .write_all(&nbd::IHAVEOPT.to_be_bytes()[..5])
        .expect("part of an option");
    assert_intact(&mut daemon, "stalled handshakes");
    assert_qemu_io_works(&daemon);

    // Connections dropped at every step of the handshake.
    for step in 0..5 {
        let mut s = connect(&daemon);
        if step > 0 {
            nbd::greeting(&mut s).expect("greeting");
        }
        if step > 1 {
            nbd::send_client_flags(&mut s, 3).expect("flags");
        }
        if step > 2 {
            nbd::send_option(&mut s, nbd::OPT_GO, &nbd::go_payload("h")).expect("GO");
        }
        if step > 3 {
            let _ = nbd::read_option_reply(&mut s);
        }
        drop(s);
    }
    drop(stalled);
    drop(stalled_option);
    assert_intact(&mut daemon, "dropped handshakes");
    assert_qemu_io_works(&daemon);
}

/// Sends a request header (and payload) on a client's stream; returns the
/// errno of the simple reply (reading a read's data when it succeeds).
fn raw_request(
    client: &mut NbdClient,
    flags: u16,
    kind: u16,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> u32 {
    let s = client.stream();
    let mut buf = nbd::request(flags, kind, 0xdead_beef, offset, length).to_vec();
    buf.extend_from_slice(payload);
    s.write_all(&buf).expect("send request");
    let reply = nbd::read_simple_reply(s).expect("reply");
    assert_eq!(reply.handle, 0xdead_beef, "reply for another handle");
    if reply.error == 0 && kind == nbd::CMD_READ {
        let mut data = vec![0u8; length as usize];
        std::io::Read::read_exact(s, &mut data).expect("read data");
    }
    reply.error
}

#[test]
fn hostile_requests_are_refused_and_change_nothing() {
    let mut daemon = setup();
    let mut client = transmitting(&daemon);
    let still_works = |client: &mut NbdClient, what: &str| {
        let data = client
            .read(8192, 4096)
            .unwrap_or_else(|e| panic!("the connection broke after {what}: {e}"));
        assert_eq!(
            common::parse_block(&data),
            common::BlockContent::Tagged { block: 2, seq: 1 },
            "after {what}"
        );
    };

    // Reads outside the export: EINVAL, the connection carries on.
    for (offset, len) in [
        (SIZE, 4096u32),
        (SIZE - 4096, 8192),
        (SIZE + (1 << 30), 1),
        (u64::MAX - 100, 4096),
    ] {
        match client.read(offset, len) {
            Err(NbdError::Server(nbd::EINVAL)) => {}
            other => panic!(
                "read {offset}+{len}: expected EINVAL, got {:?}",
                other.map(|d| d.len())
            ),
        }
        still_works(&mut client, "an out-of-range read");
    }

    // Writes outside the export: ENOSPC, nothing written.
    for (offset, len) in [
        (SIZE, 4096usize),
        (SIZE - 2048, 4096),
        (u64::MAX - 100, 512),
    ] {
        match client.write(offset, &vec![0xee; len], false) {
            Err(NbdError::Server(nbd::ENOSPC)) => {}
            other => panic!("write {offset}+{len}: expected ENOSPC, got {other:?}"),
        }
        still_works(&mut client, "an out-of-range write");
    }

    // Oversized reads: refused, the connection carries on.
    for len in [64u32 << 20, u32::MAX] {
        let errno = raw_request(&mut client, 0, nbd::CMD_READ, 0, len, &[]);
        assert_eq!(errno, nbd::EINVAL, "read of {len} bytes");
        still_works(&mut client, "an oversized read");
    }

    // Unknown commands and flags: EINVAL.
    let errno = raw_request(&mut client, 0, 99, 0, 4096, &[]);
    assert_eq!(errno, nbd::EINVAL, "unknown command");
    still_works(&mut client, "an unknown command");
    let errno = raw_request(&mut client, 0x4000, nbd::CMD_READ, 0, 4096, &[]);
    assert_eq!(errno, nbd::EINVAL, "unknown flag on READ");
    still_works(&mut client, "an unknown flag");
    let errno = raw_request(&mut client, 0x4000, nbd::CMD_WRITE, 0, 4096, &[0xee; 4096]);
    assert_eq!(errno, nbd::EINVAL, "unknown flag on WRITE");
    still_works(&mut client, "a WRITE with an unknown flag");
    client.disconnect();
    assert_intact(&mut daemon, "refused requests");

    // A write longer than any payload the server accepts: it closes the
    // connection rather than reading 64 MiB.
    let mut client = transmitting(&daemon);
    let s = client.stream();
    s.write_all(&nbd::request(0, nbd::CMD_WRITE, 1, 0, 64 << 20))
        .expect("send");
    let _ = s.write_all(&[0xee; 65536]);
    assert_closed(s, "an oversized write");
    assert_intact(&mut daemon, "an oversized write");

    // A wrong request magic closes the connection.
    let mut client = transmitting(&daemon);
    let s = client.stream();
    let mut bad = nbd::request(0, nbd::CMD_READ, 1, 0, 4096);
    bad[0] = 0x11;
    s.write_all(&bad).expect("send");
    assert_closed(s, "a wrong request magic");
    assert_intact(&mut daemon, "a wrong request magic");

    // A client that pipelines many reads and never reads a reply, then
    // vanishes.
    let mut client = transmitting(&daemon);
    let s = client.stream();
    for handle in 0..256 {
        s.write_all(&nbd::request(0, nbd::CMD_READ, handle, 0, 1 << 20))
            .expect("send");
    }
    drop(client);
    assert_intact(&mut daemon, "a client that never read its replies");
    assert_qemu_io_works(&daemon);
}

#[test]
fn truncated_requests_and_dropped_writes_change_nothing() {
    let mut daemon = setup();

    // Half a request header, then gone.
    let mut client = transmitting(&daemon);
    let header = nbd::request(0, nbd::CMD_WRITE, 1, 0, 4096);
    client.stream().write_all(&header[..10]).expect("send");
    drop(client);
    assert_intact(&mut daemon, "a truncated request header");

    // A whole header and part of the payload, then gone: never applied.
    for (offset, len, sent) in [
        (0u64, 65536u32, 1000usize),
        (4096, 4096, 4095),
        (PATTERN_AT, 1 << 20, 512 << 10),
        (PATTERN_AT + 100, 8192, 0),
        (SIZE - 4096, 4096, 2048),
    ] {
        let mut client = transmitting(&daemon);
        let s = client.stream();
        s.write_all(&nbd::request(
            nbd::CMD_FLAG_FUA,
            nbd::CMD_WRITE,
            7,
            offset,
            len,
        ))
        .expect("send header");
        s.write_all(&vec![0xee; sent])
            .expect("send part of the payload");
        let _ = s.flush();
        drop(client);
        assert_intact(
            &mut daemon,
            &format!("a write of {len} at {offset} cut after {sent} bytes"),
        );
    }

    // The same with half-close (FIN after the partial payload) and a
    // following FLUSH that can never be parsed.
    let mut client = transmitting(&daemon);
    let s = client.stream();
    s.write_all(&nbd::request(0, nbd::CMD_WRITE, 8, 0, 8192))
        .expect("send header");
    s.write_all(&[0xee; 4096]).expect("half the payload");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    assert_closed(s, "a half-closed write");
    drop(client);
    assert_intact(&mut daemon, "a half-closed write");

    // A complete write followed by a cut one on the same connection: the
    // first is applied, the second is not.
    let mut client = transmitting(&daemon);
    let new_block = common::tagged_block(100, 2);
    client
        .write(8 << 20, &new_block, false)
        .expect("whole write");
    let s = client.stream();
    s.write_all(&nbd::request(0, nbd::CMD_WRITE, 9, 8 << 20, 4096))
        .expect("send header");
    s.write_all(&[0xee; 100]).expect("part of the payload");
    drop(client);
    assert_intact(&mut daemon, "a complete and a cut write");
    let mut client = transmitting(&daemon);
    assert!(
        client.read(8 << 20, 4096).expect("read") == new_block,
        "the complete write was lost or the cut one applied"
    );
    client
        .write(8 << 20, &[0u8; 4096], false)
        .expect("restore zeros");
    client.flush().expect("flush");
    client.disconnect();

    assert_intact(&mut daemon, "all of it");
    assert_qemu_io_works(&daemon);
    // The daemon still shuts down cleanly after all of it.
    daemon.stop();
}

//! kill -9 of the daemon under a pipelined write load, then a restart on the
//! same data dir, checked against the durability contract (DESIGN.md §3): a
//! write is durable once a FLUSH issued after it completed, or when it was
//! sent with FUA and completed.
//!
//! Our NBD client pipelines writes of self-describing 4 KiB blocks (block
//! number, sequence number, checksum; see `common::tagged_block`), never two
//! in flight on the same block, flushes every few writes and records which
//! writes became durable. After the restart:
//!
//! * every block whose last durable write had sequence `s` holds a block
//!   written there with sequence ≥ `s` (that write or a later one);
//! * every other block is zero or holds some write sent to it;
//! * no block holds anything else (torn, foreign or misplaced data).
//!
//! Rounds kill at different (seeded) moments; both disk engines are covered,
//! one and two connections (a flush on one covers writes completed on the
//! other: the server offers CAN_MULTI_CONN), and SIGTERM under load (a clean
//! shutdown keeps every acknowledged write).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use common::nbd::{self, NbdClient};
use common::{BlockContent, Daemon, DaemonOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Blocks the load writes to (16 MiB: 16 extents, many overwrites).
const WORKING_BLOCKS: u64 = 4096;
/// Writes in flight at most.
const QUEUE_DEPTH: usize = 32;
/// Rounds of load, kill, restart, verify.
const ROUNDS: usize = 3;

/// What may be in each block.
struct Model {
    /// Sequence number of the newest durable write (0: none).
    floor: Vec<u64>,
    /// The block may read as zeros (nothing durable written since it last
    /// read as zeros).
    zero_ok: Vec<bool>,
    /// Sequence numbers of writes sent to the block since it was last
    /// verified (and the value it held then).
    sent: Vec<Vec<u64>>,
}

impl Model {
    fn new(blocks: u64) -> Model {
        let n = usize::try_from(blocks).expect("fits");
        Model {
            floor: vec![0; n],
            zero_ok: vec![true; n],
            sent: vec![Vec::new(); n],
        }
    }

    fn durable(&mut self, w: &Write1) {
        for b in w.first..w.first + w.count {
            let b = b as usize;
            self.floor[b] = self.floor[b].max(w.seq);
            self.zero_ok[b] = false;
        }
    }

    /// Why `content` may not be in `block`, if it may not.
    fn check(&self, block: u64, content: BlockContent) -> Option<String> {
        let b = block as usize;
        match content {
            BlockContent::Zero if self.zero_ok[b] => None,
            BlockContent::Zero => Some(format!(
                "block {block} reads zeros, but write {} to it was durable",
                self.floor[b]
            )),
            BlockContent::Garbage => Some(format!(
                "block {block} holds garbage (torn or foreign data); durable floor {}, sent {:?}",
                self.floor[b],
                tail(&self.sent[b])
            )),
            BlockContent::Tagged { block: at, seq } if at != block => Some(format!(
                "block {block} holds the data of block {at} (sequence {seq})"
            )),
            BlockContent::Tagged { seq, .. } if !self.sent[b].contains(&seq) => Some(format!(
                "block {block} holds sequence {seq}, which was never written there (sent {:?})",
                tail(&self.sent[b])
            )),
            BlockContent::Tagged { seq, .. } if seq < self.floor[b] => Some(format!(
                "block {block} holds sequence {seq}, older than its durable write {}",
                self.floor[b]
            )),
            BlockContent::Tagged { .. } => None,
        }
    }

    /// After a verified restart (and a flush), what was read is the state.
    fn settle(&mut self, block: u64, content: BlockContent) {
        let b = block as usize;
        match content {
            BlockContent::Tagged { seq, .. } => {
                self.floor[b] = seq;
                self.zero_ok[b] = false;
                self.sent[b] = vec![seq];
            }
            _ => {
                self.floor[b] = 0;
                self.zero_ok[b] = true;
                self.sent[b].clear();
            }
        }
    }
}

fn tail(v: &[u64]) -> &[u64] {
    &v[v.len().saturating_sub(8)..]
}

/// A write of `count` blocks from `first`, all tagged with `seq`.
#[derive(Debug, Clone, Copy)]
struct Write1 {
    first: u64,
    count: u64,
    seq: u64,
    fua: bool,
}

enum Pending {
    Write(Write1),
    Flush(Vec<Write1>),
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    writes_sent: u64,
    writes_acked: u64,
    fua_acked: u64,
    flushes_sent: u64,
    flushes_done: u64,
    durable_writes: u64,
    errors: u64,
}

struct Shared {
    model: Model,
    /// Requests in flight by handle (unique across connections), with the
    /// connection that sent them.
    pending: HashMap<u64, (usize, Pending)>,
    /// Requests in flight per connection.
    inflight: Vec<usize>,
    busy: Vec<bool>,
    /// Completed writes (on any connection) not yet covered by a flush that
    /// was sent: the server offers CAN_MULTI_CONN, so a flush on one
    /// connection covers writes completed on all of them.
    acked: Vec<Write1>,
    /// Every completed write.
    acked_all: Vec<Write1>,
    next_handle: u64,
    next_seq: u64,
    counters: Counters,
    disconnected: bool,
}

struct Load {
    shared: Mutex<Shared>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Load {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("load state lock")
    }
}

/// Sends writes and flushes on connection `conn` until stopped or a
/// connection breaks.
fn writer(load: &Load, conn: usize, mut stream: TcpStream, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut until_flush = rng.gen_range(4..48);
    loop {
        let mut st = load.lock();
        while st.inflight[conn] >= QUEUE_DEPTH && !st.disconnected {
            if load.stop.load(Ordering::SeqCst) {
                return;
            }
            st = load
                .changed
                .wait_timeout(st, Duration::from_millis(50))
                .expect("condvar")
                .0;
        }
        if load.stop.load(Ordering::SeqCst) || st.disconnected {
            return;
        }
        let buf = if until_flush == 0 {
            until_flush = rng.gen_range(4..48);
            let covers = std::mem::take(&mut st.acked);
            st.next_handle += 1;
            let handle = st.next_handle;
            st.pending.insert(handle, (conn, Pending::Flush(covers)));
            st.inflight[conn] += 1;
            st.counters.flushes_sent += 1;
            nbd::request(0, nbd::CMD_FLUSH, handle, 0, 0).to_vec()
        } else {
            let (first, count) = match rng.gen_range(0..100) {
                0..=79 => (rng.gen_range(0..WORKING_BLOCKS), 1),
                80..=95 => {
                    let count = rng.gen_range(2..=16);
                    (rng.gen_range(0..WORKING_BLOCKS - count), count)
                }
                _ => (rng.gen_range(0..WORKING_BLOCKS / 256) * 256, 256),
            };
            if (first..first + count).any(|b| st.busy[b as usize]) {
                // Never two writes in flight on one block: their order
                // would be undefined.
                continue;
            }
            until_flush -= 1;
            st.next_seq += 1;
            st.next_handle += 1;
            let handle = st.next_handle;
            let w = Write1 {
                first,
                count,
                seq: st.next_seq,
                fua: rng.gen_ratio(1, 10),
            };
            for b in first..first + count {
                st.busy[b as usize] = true;
                // Sent means it may be on the disk, acknowledged or not.
                st.model.sent[b as usize].push(w.seq);
            }
            st.pending.insert(handle, (conn, Pending::Write(w)));
            st.inflight[conn] += 1;
            st.counters.writes_sent += 1;
            drop(st);
            let flags = if w.fua { nbd::CMD_FLAG_FUA } else { 0 };
            let len = u32::try_from(count * 4096).expect("fits");
            let mut buf = nbd::request(flags, nbd::CMD_WRITE, handle, first * 4096, len).to_vec();
            for b in first..first + count {
                buf.extend(common::tagged_block(b, w.seq));
            }
            buf
        };
        if stream.write_all(&buf).is_err() {
            return;
        }
    }
}

/// Reads the replies of connection `conn` and turns them into durability
/// facts.
fn reader(load: &Load, conn: usize, mut stream: TcpStream) {
    loop {
        let reply = nbd::read_simple_reply(&mut stream);
        let mut st = load.lock();
        let Ok(reply) = reply else {
            st.disconnected = true;
            load.changed.notify_all();
            return;
        };
        let request = match st.pending.remove(&reply.handle) {
            Some((sent_on, request)) if sent_on == conn => request,
            _ => {
                // A reply for a request this connection never sent.
                st.counters.errors += 1;
                st.disconnected = true;
                load.changed.notify_all();
                return;
            }
        };
        st.inflight[conn] -= 1;
        match request {
            Pending::Write(w) => {
                for b in w.first..w.first + w.count {
                    st.busy[b as usize] = false;
                }
                if reply.error != 0 {
                    st.counters.errors += 1;
                } else {
                    st.counters.writes_acked += 1;
                    st.acked_all.push(w);
                    if w.fua {
                        st.counters.fua_acked += 1;
                        st.counters.durable_writes += 1;
                        st.model.durable(&w);
                    } else {
                        st.acked.push(w);
                    }
                }
            }
            Pending::Flush(covers) => {
                if reply.error != 0 {
                    st.counters.errors += 1;
                } else {
                    st.counters.flushes_done += 1;
                    st.counters.durable_writes += covers.len() as u64;
                    for w in &covers {
                        st.model.durable(w);
                    }
                }
            }
        }
        load.changed.notify_all();
    }
}

/// Reads the working set back and checks it against the model; then makes
/// what was read the new durable state.
fn verify(daemon: &Daemon, model: &mut Model, round: usize) {
    let mut client = daemon.nbd("crash");
    let data = client
        .read_all(0, WORKING_BLOCKS * 4096)
        .unwrap_or_else(|e| panic!("round {round}: reading back after the restart: {e}"));
    let mut problems = Vec::new();
    let mut contents = Vec::new();
    for (block, bytes) in data.chunks(4096).enumerate() {
        let content = common::parse_block(bytes);
        if let Some(problem) = model.check(block as u64, content) {
            problems.push(problem);
        }
        contents.push(content);
    }
    assert!(
        problems.is_empty(),
        "round {round}: {} blocks break the durability contract after the restart; first ones:\n{}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n")
    );
    // Beyond the working set nothing was ever written.
    let rest = client
        .read_all(WORKING_BLOCKS * 4096, 4 << 20)
        .expect("read beyond the working set");
    assert!(
        rest.iter().all(|&b| b == 0),
        "round {round}: data appeared beyond the working set"
    );
    client.flush().expect("flush after verification");
    client.disconnect();
    for (block, content) in contents.into_iter().enumerate() {
        model.settle(block as u64, content);
    }
}

/// How the load ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// kill -9: only durable writes must survive.
    Kill,
    /// SIGTERM: a clean shutdown keeps every acknowledged write.
    Term,
}

fn crash_rounds(
    test: &str,
    options: DaemonOptions,
    expect_engine: &str,
    how: Stop,
    connections: usize,
) {
    let seed = common::test_seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut daemon = Daemon::start_with(options);
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_eq!(
        disks[0]["engine"],
        serde_json::json!(expect_engine),
        "{disks}"
    );
    daemon.create_vdisk("crash", "64M");
    let mut model = Model::new(WORKING_BLOCKS);
    let mut next_seq = 0u64;

    for round in 0..ROUNDS {
        let mut streams = Vec::new();
        for _ in 0..connections {
            let client = NbdClient::connect(daemon.nbd_port, "crash").expect("connect");
            assert_ne!(client.flags & nbd::TFLAG_SEND_FLUSH, 0, "no FLUSH");
            assert_ne!(client.flags & nbd::TFLAG_SEND_FUA, 0, "no FUA");
            let stream = client.into_stream();
            stream
                .set_read_timeout(None)
                .expect("no read timeout while loading");
            let read_half = stream.try_clone().expect("clone stream");
            streams.push((stream, read_half));
        }

        let load = Load {
            shared: Mutex::new(Shared {
                model: std::mem::replace(&mut model, Model::new(0)),
                pending: HashMap::new(),
                inflight: vec![0; connections],
                busy: vec![false; WORKING_BLOCKS as usize],
                acked: Vec::new(),
                acked_all: Vec::new(),
                next_handle: 0,
                next_seq,
                counters: Counters::default(),
                disconnected: false,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        };
        let kill_after = Duration::from_millis(rng.gen_range(300..2500));
        let (inflight_at_kill, counters) = std::thread::scope(|s| {
            let l = &load;
            let mut threads = Vec::new();
            for (conn, (stream, read_half)) in streams.into_iter().enumerate() {
                let writer_seed = rng.r#gen::<u64>();
                threads.push(s.spawn(move || writer(l, conn, stream, writer_seed)));
                threads.push(s.spawn(move || reader(l, conn, read_half)));
            }

            std::thread::sleep(kill_after);
            // Stop while many writes are in flight.
            let deadline = Instant::now() + Duration::from_secs(10);
            let inflight = loop {
                let st = l.lock();
                assert!(
                    !st.disconnected,
                    "round {round}: the server dropped the load"
                );
                let writes = st
                    .pending
                    .values()
                    .filter(|(_, p)| matches!(p, Pending::Write(_)))
                    .count();
                if writes >= QUEUE_DEPTH / 2 || Instant::now() > deadline {
                    break writes;
                }
                drop(st);
                std::thread::sleep(Duration::from_micros(200));
            };
            match how {
                Stop::Kill => daemon.kill9(),
                Stop::Term => {
                    let status = daemon.terminate();
                    assert!(
                        status.success(),
                        "round {round}: basaltd exited with {status} after SIGTERM under load:\n{}",
                        daemon.log_tail(40)
                    );
                }
            }
            l.stop.store(true, Ordering::SeqCst);
            l.changed.notify_all();
            for thread in threads {
                thread.join().expect("load thread");
            }
            (inflight, l.lock().counters)
        });
        let shared = load.shared.into_inner().expect("load state");
        next_seq = shared.next_seq;
        model = shared.model;
        if how == Stop::Term {
            for w in &shared.acked_all {
                model.durable(w);
            }
        }
        eprintln!(
            "round {round}: {how:?} after {kill_after:?} with {inflight_at_kill} writes in flight \
             on {connections} connection(s); {counters:?}"
        );
        assert_eq!(
            counters.errors, 0,
            "round {round}: write errors before the kill"
        );
        assert!(
            counters.durable_writes > 0 && counters.flushes_done > 0,
            "round {round}: the load made nothing durable before the kill: {counters:?}"
        );
        assert!(
            inflight_at_kill > 0,
            "round {round}: nothing in flight at the kill"
        );

        daemon.restart();
        let status = daemon.status();
        assert_eq!(status.health, "healthy", "round {round}: {status:?}");
        verify(&daemon, &mut model, round);
    }

    // A clean stop after all of it, and the data is still there.
    daemon.stop();
    daemon.restart();
    verify(&daemon, &mut model, ROUNDS);

    // No space leaked across the crashes: deleting the vdisk frees every
    // slot, and that survives one more kill -9.
    let free_slots = |daemon: &Daemon| {
        let disks = daemon.cli_json(&["disk", "list"]);
        (
            disks[0]["slots_free"].as_u64().expect("slots_free"),
            disks[0]["slots_total"].as_u64().expect("slots_total"),
        )
    };
    let (free, total) = free_slots(&daemon);
    let allocated = daemon.cli_json(&["vdisk", "show", "crash"])["allocated"]
        .as_u64()
        .expect("allocated");
    assert!(allocated <= WORKING_BLOCKS * 4096, "allocated {allocated}");
    assert_eq!(
        (total - free) << 20,
        allocated,
        "slots in use do not match the vdisk's allocation"
    );
    daemon.cli_ok(&["vdisk", "delete", "crash"]);
    let (free, total) = free_slots(&daemon);
    assert_eq!(free, total, "slots leaked after deleting the only vdisk");
    daemon.kill9();
    daemon.restart();
    let (free, total) = free_slots(&daemon);
    assert_eq!(free, total, "slots leaked after a delete and kill -9");
    assert_eq!(daemon.status().allocated, 0);
}

/// Two connections: a FLUSH on either covers writes completed on both, as
/// the server's CAN_MULTI_CONN promises.
#[test]
fn kill9_under_write_load_keeps_durable_writes_uring() {
    crash_rounds(
        "kill9_under_write_load_uring",
        DaemonOptions {
            engine: Some("uring"),
            ..DaemonOptions::default()
        },
        "io_uring+O_DIRECT",
        Stop::Kill,
        2,
    );
}

#[test]
fn kill9_under_write_load_keeps_durable_writes_sync_small_budget() {
    // A small memory budget makes writers wait for the drainer, so kills
    // land while data moves from the oplog to extents.
    crash_rounds(
        "kill9_under_write_load_sync",
        DaemonOptions {
            engine: Some("sync"),
            memory_budget: Some("8M"),
            ..DaemonOptions::default()
        },
        "pread/pwrite",
        Stop::Kill,
        1,
    );
}

#[test]
fn sigterm_under_write_load_keeps_every_acknowledged_write() {
    crash_rounds(
        "sigterm_under_write_load",
        DaemonOptions::default(),
        "io_uring+O_DIRECT",
        Stop::Term,
        2,
    );
}

#[test]
fn kill9_while_idle_restarts_cleanly() {
    let mut daemon = Daemon::start();
    daemon.create_vdisk("idle", "32M");
    daemon.create_vdisk("grown", "16M");
    daemon.create_vdisk("doomed", "16M");
    let mut client = daemon.nbd("idle");
    for block in 0..512 {
        client
            .write(block * 4096, &common::tagged_block(block, 1), false)
            .expect("write");
    }
    client.flush().expect("flush");
    client.disconnect();

    // Management changes are durable once acknowledged.
    daemon.cli_ok(&["vdisk", "resize", "grown", "--size", "48M"]);
    daemon.cli_ok(&["vdisk", "delete", "doomed"]);
    daemon.create_vdisk("late", "8M");
    // An export whose socket file kill -9 leaves behind.
    let socket = daemon.cli_json(&["vdisk", "export", "late", "--vhost"])["socket"].clone();
    let list = daemon.cli_json(&["vdisk", "list"]);

    daemon.kill9();
    daemon.restart();
    // The export made by hand comes back by itself, on a fresh socket in
    // place of the stale one.
    assert_eq!(
        serde_json::Value::from(daemon.wait_for_vhost_export("late")),
        socket
    );
    assert_eq!(
        daemon.cli_json(&["vdisk", "list"]),
        list,
        "vdisks changed across kill -9"
    );
    // Exporting again is a no-op.
    assert_eq!(
        daemon.cli_json(&["vdisk", "export", "late", "--vhost"])["socket"],
        socket
    );
    daemon.cli_ok(&["vdisk", "unexport", "late", "--vhost"]);
    let list = daemon.cli_json(&["vdisk", "list"]);
    let status = daemon.status();
    assert_eq!(status.health, "healthy");
    assert_eq!(status.vdisks, 3);

    // Killed again right after it came up, twice, with no I/O at all.
    for _ in 0..2 {
        daemon.kill9();
        daemon.restart();
    }
    let mut client = daemon.nbd("idle");
    let data = client.read_all(0, 4 << 20).expect("read");
    for (block, bytes) in data.chunks(4096).enumerate() {
        let expected = if block < 512 {
            BlockContent::Tagged {
                block: block as u64,
                seq: 1,
            }
        } else {
            BlockContent::Zero
        };
        assert_eq!(common::parse_block(bytes), expected, "block {block}");
    }
    client.disconnect();
    // Everything but the ownership epoch (each restart takes ownership
    // anew) is as before.
    let without_epochs = |mut list: serde_json::Value| {
        for vdisk in list.as_array_mut().into_iter().flatten() {
            if let Some(fields) = vdisk.as_object_mut() {
                fields.remove("epoch");
            }
        }
        list
    };
    assert_eq!(
        without_epochs(daemon.cli_json(&["vdisk", "list"])),
        without_epochs(list)
    );
    // The restarted node works normally and stops cleanly.
    daemon.create_vdisk("after", "8M");
    let mut client = daemon.nbd("after");
    client.write(0, &[0x42; 4096], true).expect("write");
    client.disconnect();
    daemon.stop();
    daemon.restart();
    let mut client = daemon.nbd("after");
    assert_eq!(client.read(0, 4096).expect("read"), vec![0x42; 4096]);
    client.disconnect();
}

#[test]
fn deleted_vdisk_data_does_not_come_back_after_kill9() {
    let mut daemon = Daemon::start();
    let first = daemon.create_vdisk("phoenix", "16M");
    let mut client = daemon.nbd("phoenix");
    // Small writes (oplog) and a whole extent (copy-on-write), not drained.
    for block in 0..64 {
        client
            .write(block * 4096, &common::tagged_block(block, 1), false)
            .expect("write");
    }
    let mut extent = Vec::new();
    for block in 512..768 {
        extent.extend(common::tagged_block(block, 1));
    }
    client.write(2 << 20, &extent, true).expect("write extent");
    client.flush().expect("flush");
    client.disconnect();
    daemon.cli_ok(&["vdisk", "delete", "phoenix"]);
    let second = daemon.create_vdisk("phoenix", "16M");
    eprintln!("ids: {} then {}", first["id"], second["id"]);
    let mut client = daemon.nbd("phoenix");
    client
        .write(8 << 20, &common::tagged_block(2048, 2), true)
        .expect("write");
    client.disconnect();

    daemon.kill9();
    daemon.restart();
    let mut client = daemon.nbd("phoenix");
    let data = client.read_all(0, 16 << 20).expect("read");
    for (block, bytes) in data.chunks(4096).enumerate() {
        let expected = if block == 2048 {
            BlockContent::Tagged {
                block: 2048,
                seq: 2,
            }
        } else {
            BlockContent::Zero
        };
        assert_eq!(
            common::parse_block(bytes),
            expected,
            "block {block} of the re-created vdisk"
        );
    }
    client.disconnect();
}

//! Real NBD clients against a real daemon: `qemu-img` (convert in and out,
//! compare), `nbdcopy`, `nbdinfo --map`, `qemu-io` patterns at aligned and
//! unaligned offsets, fio with crc32c verification, several clients at once
//! on different vdisks, and data surviving a restart (SIGTERM).
//!
//! The tools must be installed (Debian: qemu-utils libnbd-bin fio); a
//! missing one fails the test.

mod common;

use std::path::Path;

use common::{Daemon, DaemonOptions, EXTENT, assert_files_equal, run_tool, run_tool_ok};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A raw image of `mib` MiB: random data with whole zero MiBs (holes for
/// the copy tools to skip) and half-zero MiBs.
fn write_image(path: &Path, mib: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = common::random_bytes(usize::try_from(mib * MIB).expect("fits"), seed);
    for chunk in data.chunks_mut(EXTENT) {
        match rng.gen_range(0..8) {
            0 | 1 => chunk.fill(0),
            2 => chunk[..EXTENT / 2].fill(0),
            3 => chunk[EXTENT / 2 + 100..].fill(0),
            _ => {}
        }
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// `qemu-img compare` of a raw file and an NBD export (or another raw
/// file); fails unless equal.
fn qemu_img_compare(file: &Path, uri: &str) {
    let out = run_tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &path_str(file), uri],
    );
    assert!(
        out.contains("Images are identical"),
        "qemu-img compare: {out}"
    );
}

#[test]
fn qemu_img_and_nbdcopy_round_trip_and_survive_restart() {
    let seed = common::test_seed("qemu_img_and_nbdcopy_round_trip");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = common::test_dir("convert");
    let mut daemon = Daemon::start();

    // qemu-img convert in and out.
    let mib = rng.gen_range(64..=256u64);
    let src = dir.path().join("src.img");
    write_image(&src, mib, seed);
    daemon.create_vdisk("img", &format!("{mib}M"));
    let uri = daemon.nbd_uri("img");
    run_tool_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &path_str(&src),
            &uri,
        ],
    );
    let info: Value = serde_json::from_str(&run_tool_ok(
        "qemu-img",
        &["info", "--output=json", "-f", "raw", &uri],
    ))
    .expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], Value::from(mib * MIB), "{info}");
    qemu_img_compare(&src, &uri);
    let out = dir.path().join("out.img");
    run_tool_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &path_str(&out)],
    );
    qemu_img_compare(&src, &path_str(&out));
    assert_files_equal(&src, &out);

    // nbdcopy both ways, into a vdisk larger than the image.
    let src2 = dir.path().join("src2.img");
    write_image(&src2, 64, seed ^ 0xc0c0);
    daemon.create_vdisk("copied", "80M");
    let uri2 = daemon.nbd_uri("copied");
    run_tool_ok("nbdcopy", &[&path_str(&src2), &uri2]);
    let out2 = dir.path().join("out2.img");
    run_tool_ok("nbdcopy", &["--connections=4", &uri2, &path_str(&out2)]);
    let copied = std::fs::read(&out2).expect("read nbdcopy output");
    let expected = std::fs::read(&src2).expect("read source");
    assert_eq!(copied.len() as u64, 80 * MIB, "nbdcopy output size");
    assert!(
        copied[..expected.len()] == expected[..],
        "nbdcopy read back other data than it wrote"
    );
    assert!(
        copied[expected.len()..].iter().all(|&b| b == 0),
        "the unwritten tail of the vdisk is not zero"
    );
    // Export to export.
    daemon.create_vdisk("copy-of-img", &format!("{mib}M"));
    let uri3 = daemon.nbd_uri("copy-of-img");
    run_tool_ok("nbdcopy", &[&uri, &uri3]);
    qemu_img_compare(&src, &uri3);

    // A clean restart keeps everything.
    daemon.stop();
    assert!(daemon.log_text().contains("stopped cleanly"));
    daemon.restart();
    let (uri, uri2, uri3) = (
        daemon.nbd_uri("img"),
        daemon.nbd_uri("copied"),
        daemon.nbd_uri("copy-of-img"),
    );
    qemu_img_compare(&src, &uri);
    qemu_img_compare(&src, &uri3);
    let out3 = dir.path().join("out3.img");
    run_tool_ok("nbdcopy", &[&uri2, &path_str(&out3)]);
    let copied = std::fs::read(&out3).expect("read nbdcopy output");
    assert!(
        copied[..expected.len()] == expected[..],
        "after a restart, nbdcopy reads other data"
    );
}

/// `nbdinfo --map --json`: (offset, length, type) entries.
fn block_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run_tool_ok("nbdinfo", &["--map", "--json", uri]);
    let map: Value = serde_json::from_str(&out).expect("nbdinfo --map --json");
    map.as_array()
        .expect("map is an array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type"),
            )
        })
        .collect()
}

/// Every map entry overlapping [start, end) must satisfy `check(type)`.
fn assert_range(map: &[(u64, u64, u64)], start: u64, end: u64, what: &str, check: fn(u64) -> bool) {
    let overlapping: Vec<_> = map
        .iter()
        .filter(|(off, len, _)| *off < end && off + len > start)
        .collect();
    assert!(
        !overlapping.is_empty(),
        "no map entry covers {start}..{end}"
    );
    for entry in overlapping {
        assert!(
            check(entry.2),
            "{start}..{end} should be {what} but the map says {entry:?}\nmap: {map:?}"
        );
    }
}

fn is_hole(t: u64) -> bool {
    t & 1 == 1
}
fn is_data(t: u64) -> bool {
    t & 1 == 0
}
fn reads_zero(t: u64) -> bool {
    t & 2 == 2
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    let daemon = Daemon::start();
    daemon.create_vdisk("map", "64M");
    let uri = daemon.nbd_uri("map");

    let info: Value =
        serde_json::from_str(&run_tool_ok("nbdinfo", &["--json", &uri])).expect("nbdinfo --json");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], Value::from(64 * MIB), "{info}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], Value::Bool(true), "{flag}: {info}");
    }
    assert_eq!(export["is_read_only"], Value::Bool(false), "{info}");

    // A fresh vdisk is one hole.
    let map = block_map(&uri);
    assert_range(&map, 0, 64 * MIB, "a hole", is_hole);

    run_tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x01 8M 1M",
            "-c",
            "write -P 0x02 20492K 4K",
            "-c",
            "write -P 0x03 41943140 512",
            "-c",
            "flush",
            &uri,
        ],
    );
    let map = block_map(&uri);
    // Contiguous from 0 to the end.
    let mut at = 0;
    for &(off, len, _) in &map {
        assert_eq!(off, at, "map not contiguous: {map:?}");
        at += len;
    }
    assert_eq!(at, 64 * MIB, "map does not end at the export size: {map:?}");
    assert_range(&map, 8 * MIB, 9 * MIB, "data", is_data);
    assert_range(&map, 20492 << 10, 20496 << 10, "data", is_data);
    assert_range(&map, 41_943_140, 41_943_652, "data", is_data);
    for (start, end) in [
        (0, 8 * MIB),
        (9 * MIB, 20 * MIB),
        (21 * MIB, 40 * MIB),
        (41 * MIB, 64 * MIB),
    ] {
        assert_range(&map, start, end, "a hole", is_hole);
    }

    // Discard turns the written extent back into zeros; so does write-zeroes.
    run_tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "discard 8M 1M",
            "-c",
            "write -z 20492K 4K",
            "-c",
            "read -P 0 8M 1M",
            "-c",
            "read -P 0 20492K 4K",
            "-c",
            "read -P 0x03 41943140 512",
            &uri,
        ],
    );
    let map = block_map(&uri);
    assert_range(&map, 8 * MIB, 9 * MIB, "zero", reads_zero);
    assert_range(&map, 41_943_140, 41_943_652, "data", is_data);
}

/// One qemu-io write and how it changes the model of the vdisk.
struct PatternWrite {
    command: String,
    offset: usize,
    len: usize,
    byte: u8,
}

fn pw(command: &str, offset: usize, len: usize, byte: u8) -> PatternWrite {
    PatternWrite {
        command: command.to_string(),
        offset,
        len,
        byte,
    }
}

/// Maximal runs of equal bytes: (offset, length, byte).
fn runs(model: &[u8]) -> Vec<(usize, usize, u8)> {
    let mut out: Vec<(usize, usize, u8)> = Vec::new();
    for (i, &b) in model.iter().enumerate() {
        match out.last_mut() {
            Some((_, len, byte)) if *byte == b => *len += 1,
            _ => out.push((i, 1, b)),
        }
    }
    out
}

#[test]
fn qemu_io_patterns_at_aligned_and_unaligned_offsets() {
    const M: usize = 1 << 20;
    let dir = common::test_dir("patterns");
    let daemon = Daemon::start_with(DaemonOptions {
        engine: Some("sync"),
        ..DaemonOptions::default()
    });
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_eq!(disks[0]["engine"], Value::from("pread/pwrite"), "{disks}");
    daemon.create_vdisk("pat", "16M");
    let uri = daemon.nbd_uri("pat");

    let writes = [
        pw("write -P 0x11 0 4096", 0, 4096, 0x11),
        pw("write -P 0x22 512 512", 512, 512, 0x22),
        pw("write -P 0x33 4097 3000", 4097, 3000, 0x33),
        pw("write -P 0x44 1048569 14", M - 7, 14, 0x44),
        pw("write -P 0x55 5242881 1M", 5 * M + 1, M, 0x55),
        pw("write -P 0x66 8M 2M", 8 * M, 2 * M, 0x66),
        pw("write -P 0x77 8400996 1", 8 * M + 4096 * 3 + 100, 1, 0x77),
        pw("write -f -P 0x88 12582400 1024", 12 * M - 512, 1024, 0x88),
        pw(
            "aio_write -P 0x99 13631821 65536",
            13 * M + 333,
            65536,
            0x99,
        ),
        pw("aio_flush", 0, 0, 0),
        pw("write -P 0xaa 15M 4096", 15 * M, 4096, 0xaa),
        pw("write -z 15729664 2048", 15 * M + 1024, 2048, 0),
        pw("write -P 0xbb 14M 1M", 14 * M, M, 0xbb),
        pw("discard 14M 1M", 14 * M, M, 0),
        pw("write -P 0xcc 14684159 3", 14 * M + 4095, 3, 0xcc),
        pw("write -P 0xdd 16777215 1", 16 * M - 1, 1, 0xdd),
        pw("flush", 0, 0, 0),
    ];
    let mut model = vec![0u8; 16 * M];
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for w in &writes {
        model[w.offset..w.offset + w.len].fill(w.byte);
        args.extend(["-c".to_string(), w.command.clone()]);
    }
    args.push(uri.clone());
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool_ok("qemu-io", &arg_refs);
    assert!(!out.contains("failed"), "qemu-io writes: {out}");

    // Read every run of equal bytes back with -P verification, in one go.
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    let runs = runs(&model);
    assert!(runs.len() > 20, "the model has {} runs", runs.len());
    for (offset, len, byte) in &runs {
        args.extend([
            "-c".to_string(),
            format!("read -P {byte:#x} {offset} {len}"),
        ]);
    }
    // And some reads that straddle runs, verified against neighbours.
    args.extend(["-c".to_string(), "read -v 4090 16".to_string()]);
    args.push(uri.clone());
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool("qemu-io", &arg_refs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io pattern verification failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The whole vdisk equals the model byte for byte.
    let image = dir.path().join("pat.img");
    run_tool_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &path_str(&image)],
    );
    let got = std::fs::read(&image).expect("read image");
    assert_eq!(got.len(), model.len());
    if let Some(i) = (0..model.len()).find(|&i| got[i] != model[i]) {
        panic!(
            "vdisk differs from the model first at byte {i}: {:#x} instead of {:#x}",
            got[i], model[i]
        );
    }

    // A pattern check that must fail does fail (the check is real).
    let out = run_tool("qemu-io", &["-f", "raw", "-c", "read -P 0x12 0 4096", &uri]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern"
    );
}

/// fio's JSON output (fio prints a line before it).
fn fio_json(stdout: &str) -> Value {
    let start = stdout
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| stdout.starts_with('{').then_some(0))
        .unwrap_or_else(|| panic!("no JSON in fio output:\n{stdout}"));
    serde_json::from_str(&stdout[start..]).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{stdout}"))
}

/// Runs fio with crc32c verification on an NBD URI; returns the job's JSON.
fn fio(uri: &str, rw: &str, size: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "--name=basalt".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        "--bs=4k".to_string(),
        "--iodepth=16".to_string(),
        format!("--size={size}"),
        "--verify=crc32c".to_string(),
        "--do_verify=1".to_string(),
        "--randseed=4242".to_string(),
        "--output-format=json".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool("fio", &arg_refs);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "fio {rw} failed with {}:\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("verify:") && !stderr.contains("bad magic") && !stderr.contains("crc32c"),
        "fio {rw} reported verify errors:\n{stderr}"
    );
    let json = fio_json(&stdout);
    let job = json["jobs"][0].clone();
    assert_eq!(job["error"], Value::from(0), "fio {rw}: job error: {job}");
    job
}

fn io_bytes(job: &Value, dir: &str) -> u64 {
    job[dir]["io_bytes"].as_u64().expect("io_bytes")
}

#[test]
fn fio_verifies_crc32c_on_random_writes_and_mixed_io() {
    // The pread/pwrite engine here; the io_uring one in the concurrent test.
    let mut daemon = Daemon::start_with(DaemonOptions {
        engine: Some("sync"),
        ..DaemonOptions::default()
    });
    daemon.create_vdisk("fio", "128M");
    let uri = daemon.nbd_uri("fio");

    let job = fio(&uri, "randwrite", "64M", &[]);
    assert_eq!(io_bytes(&job, "write"), 64 * MIB, "{job}");
    assert_eq!(
        io_bytes(&job, "read"),
        64 * MIB,
        "fio did not read everything back to verify it: {job}"
    );

    let job = fio(&uri, "randrw", "64M", &["--offset=64M"]);
    let (written, read) = (io_bytes(&job, "write"), io_bytes(&job, "read"));
    assert!(written > 0 && read > 0, "{job}");
    assert!(
        job["read"]["total_ios"].as_u64() >= job["write"]["total_ios"].as_u64(),
        "fio did not verify every write: {job}"
    );

    // After a restart, fio's verify-only pass finds the first job's data.
    daemon.stop();
    daemon.restart();
    let uri = daemon.nbd_uri("fio");
    let job = fio(&uri, "randwrite", "64M", &["--verify_only"]);
    assert_eq!(io_bytes(&job, "read"), 64 * MIB, "{job}");
}

#[test]
fn several_clients_at_once_on_different_vdisks() {
    let seed = common::test_seed("several_clients_at_once");
    let dir = common::test_dir("concurrent");
    let mut daemon = Daemon::start_with(DaemonOptions {
        engine: Some("uring"),
        ..DaemonOptions::default()
    });
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_eq!(
        disks[0]["engine"],
        Value::from("io_uring+O_DIRECT"),
        "{disks}"
    );
    for (name, size) in [
        ("f", "64M"),
        ("q", "96M"),
        ("n", "48M"),
        ("i", "32M"),
        ("c", "16M"),
    ] {
        daemon.create_vdisk(name, size);
    }
    let src_q = dir.path().join("q.img");
    write_image(&src_q, 96, seed);
    let src_n = dir.path().join("n.img");
    write_image(&src_n, 48, seed ^ 1);
    let tagged_blocks = 16 * 256;

    std::thread::scope(|s| {
        let d = &daemon;
        let fio_run = s.spawn(move || fio(&d.nbd_uri("f"), "randwrite", "32M", &[]));
        let q = s.spawn(|| {
            run_tool_ok(
                "qemu-img",
                &[
                    "convert",
                    "-n",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &path_str(&src_q),
                    &d.nbd_uri("q"),
                ],
            )
        });
        let n = s.spawn(|| run_tool_ok("nbdcopy", &[&path_str(&src_n), &d.nbd_uri("n")]));
        let i = s.spawn(|| {
            run_tool_ok(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x5a 0 16M",
                    "-c",
                    "write -P 0xa5 16M 16M",
                    "-c",
                    "read -P 0x5a 0 16M",
                    "-c",
                    "read -P 0xa5 16M 16M",
                    &d.nbd_uri("i"),
                ],
            )
        });
        let c = s.spawn(|| {
            let mut nbd = d.nbd("c");
            for block in 0..tagged_blocks {
                let data = common::tagged_block(block, 7);
                nbd.write(block * 4096, &data, block % 64 == 0)
                    .expect("tagged write");
            }
            nbd.flush().expect("flush");
            nbd.disconnect();
        });
        let job = fio_run.join().expect("fio thread");
        assert_eq!(io_bytes(&job, "read"), 32 * MIB, "{job}");
        q.join().expect("qemu-img thread");
        n.join().expect("nbdcopy thread");
        let out = i.join().expect("qemu-io thread");
        assert!(!out.contains("failed"), "{out}");
        c.join().expect("client thread");
    });

    let check = |daemon: &Daemon| {
        qemu_img_compare(&src_q, &daemon.nbd_uri("q"));
        qemu_img_compare(&src_n, &daemon.nbd_uri("n"));
        let out = run_tool_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0x5a 0 16M",
                "-c",
                "read -P 0xa5 16M 16M",
                &daemon.nbd_uri("i"),
            ],
        );
        assert!(!out.contains("failed"), "{out}");
        let mut nbd = daemon.nbd("c");
        let all = nbd.read_all(0, tagged_blocks * 4096).expect("read c");
        for (block, data) in all.chunks(4096).enumerate() {
            assert_eq!(
                common::parse_block(data),
                common::BlockContent::Tagged {
                    block: block as u64,
                    seq: 7
                },
                "block {block} of c"
            );
        }
        nbd.disconnect();
    };
    check(&daemon);
    daemon.stop();
    daemon.restart();
    check(&daemon);
    let job = fio(&daemon.nbd_uri("f"), "randwrite", "32M", &["--verify_only"]);
    assert_eq!(io_bytes(&job, "read"), 32 * MIB, "{job}");
}

/// 512 bytes naming the sector, the connection and the round that wrote it.
fn sector_bytes(sector: u64, conn: u64, round: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0..8].copy_from_slice(b"SECTOR01");
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    b[16..24].copy_from_slice(&conn.to_le_bytes());
    b[24..32].copy_from_slice(&round.to_le_bytes());
    common::XorShift::new(sector ^ (conn << 40) ^ (round << 50)).fill(&mut b[32..]);
    b
}

/// Sends `writes` pipelined `depth` deep on one connection and waits for
/// all replies; fails on any error.
fn pipelined_writes(client: &mut common::nbd::NbdClient, writes: &[(u64, Vec<u8>)], depth: usize) {
    use std::io::Write;
    let mut sent = 0;
    let mut done = 0;
    let mut outstanding = std::collections::HashSet::new();
    while done < writes.len() {
        while sent < writes.len() && sent - done < depth {
            let (offset, data) = &writes[sent];
            let handle = sent as u64 + 1;
            let len = u32::try_from(data.len()).expect("fits");
            let mut buf =
                common::nbd::request(0, common::nbd::CMD_WRITE, handle, *offset, len).to_vec();
            buf.extend_from_slice(data);
            client.stream().write_all(&buf).expect("send write");
            outstanding.insert(handle);
            sent += 1;
        }
        let reply = common::nbd::read_simple_reply(client.stream()).expect("reply");
        assert_eq!(reply.error, 0, "write failed");
        assert!(outstanding.remove(&reply.handle), "unexpected handle");
        done += 1;
    }
}

/// Two connections write 512-byte sectors that share 4 KiB blocks (each
/// block is read-modify-written by the server), pipelined and at once: no
/// write may be lost to a read-modify-write race.
#[test]
fn concurrent_sub_block_writes_on_two_connections_are_all_kept() {
    const SECTORS: u64 = 512; // 256 KiB: 64 blocks, every one shared
    const ROUNDS: u64 = 4;
    let seed = common::test_seed("concurrent_sub_block_writes");
    let daemon = Daemon::start();
    daemon.create_vdisk("rmw", "4M");

    std::thread::scope(|s| {
        for conn in 0..2u64 {
            let daemon = &daemon;
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ conn);
                let mut client = daemon.nbd("rmw");
                // Connection 0 owns sectors 0-3 of each block, 1 owns 4-7.
                let mut mine: Vec<u64> = (0..SECTORS).filter(|s| (s % 8) / 4 == conn).collect();
                for round in 0..ROUNDS {
                    rand::seq::SliceRandom::shuffle(&mut mine[..], &mut rng);
                    let writes: Vec<(u64, Vec<u8>)> = mine
                        .iter()
                        .map(|&sector| (sector * 512, sector_bytes(sector, conn, round)))
                        .collect();
                    pipelined_writes(&mut client, &writes, 32);
                }
                client.flush().expect("flush");
                client.disconnect();
            });
        }
    });

    let mut client = daemon.nbd("rmw");
    let data = client
        .read(0, u32::try_from(SECTORS * 512).expect("fits"))
        .expect("read");
    let mut lost = Vec::new();
    for (sector, got) in data.chunks(512).enumerate() {
        let sector = sector as u64;
        let conn = (sector % 8) / 4;
        if got != sector_bytes(sector, conn, ROUNDS - 1).as_slice() {
            lost.push(sector);
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {SECTORS} sectors do not hold their last write (lost in read-modify-write?): {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    client.disconnect();
}

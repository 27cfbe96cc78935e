//! The server driven by the real NBD clients users run: qemu-img, qemu-io,
//! nbdinfo, nbdcopy and fio. A missing tool fails the test with a message
//! saying what to install.

mod common;

use std::sync::atomic::Ordering::SeqCst;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

/// A raw image of `len` bytes: patterned data with a zero stretch in the middle.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = pattern(len, seed);
    bytes[len / 4..len / 2].fill(0);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_reports_the_export() {
    let (srv, _) = TestServer::start(&[("disk", 64 * MIB)]).await;
    let out = run_ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={},export=disk", srv.port),
        ],
    )
    .await;
    let info = json(&out);
    assert_eq!(info["virtual-size"], 64 * MIB);
    let out = run_ok("qemu-img", &["info", "--output=json", &srv.uri("disk")]).await;
    assert_eq!(json(&out)["virtual-size"], 64 * MIB);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_in_and_out_and_compare() {
    let size = 8 * MIB;
    let (srv, backends) = TestServer::start(&[("disk", size)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    let out = dir.path().join("out.img");
    let data = image(size as usize, 11);
    std::fs::write(&src, &data).expect("write source");
    let src = src.to_str().expect("utf-8 path");
    let out = out.to_str().expect("utf-8 path");
    let uri = srv.uri("disk");

    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    )
    .await;
    assert_bytes(
        &backends[0].contents(0, size as usize),
        &data,
        "export after convert in",
    );

    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, out],
    )
    .await;
    assert_bytes(
        &std::fs::read(out).expect("read copy"),
        &data,
        "convert out",
    );

    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    )
    .await;
    // One changed byte must be noticed.
    backends[0].fill(5 * MIB + 3, &[data[(5 * MIB + 3) as usize] ^ 0xff]);
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    )
    .await;
    assert_eq!(
        cmp.status.code(),
        Some(1),
        "compare must report the difference"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_aligned_and_unaligned() {
    let (srv, backends) = TestServer::start(&[("disk", 16 * MIB)]).await;
    let b = &backends[0];
    let uri = srv.uri("disk");
    let commands = [
        "write -P 0xab 4096 65536",
        "read -P 0xab 4096 65536",
        "write -P 0x5a 1000 3333",
        "read -P 0x5a 1000 3333",
        "read -P 0xab 4333 65299",
        "read -P 0 0 1000",
        "write -f -P 0x11 1048577 12345",
        "read -P 0x11 1048577 12345",
        "aio_write -P 0x21 2097152 131072",
        "aio_write -P 0x22 2228224 131072",
        "aio_write -P 0x23 2359297 4095",
        "aio_flush",
        "read -P 0x21 2097152 131072",
        "read -P 0x22 2228224 131072",
        "read -P 0x23 2359297 4095",
        "write -z 4096 8192",
        "read -P 0 4096 8192",
        "discard 3145728 1048576",
        "read -P 0 3145728 1048576",
        "flush",
    ];
    // Writeback mode: otherwise qemu-io sets FUA on every write, and the
    // check below could not tell whether `write -f` really carried it.
    let mut args = vec!["-f", "raw", "-t", "writeback"];
    for c in &commands {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    let out = run("qemu-io", &args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io failed:\n{text}");
    for bad in ["Pattern verification failed", "failed", "error"] {
        assert!(!text.contains(bad), "qemu-io reported {bad:?}:\n{text}");
    }
    // The backend holds exactly what qemu-io wrote.
    assert_bytes(&b.contents(0, 1000), &[0; 1000], "never written");
    assert_bytes(&b.contents(1000, 3096), &[0x5a; 3096], "unaligned write");
    assert_bytes(&b.contents(4096, 8192), &[0; 8192], "write -z");
    let n = 4096 + 65536 - 12288;
    assert_bytes(&b.contents(12288, n), &vec![0xab; n], "aligned write");
    assert_bytes(&b.contents(1_048_577, 12345), &[0x11; 12345], "FUA write");
    assert_bytes(&b.contents(2_359_297, 4095), &[0x23; 4095], "aio write");
    assert_bytes(
        &b.contents(3_145_728, 1 << 20),
        &vec![0; 1 << 20],
        "discard",
    );
    assert_eq!(
        b.stats.fua_writes.load(SeqCst),
        1,
        "exactly the one `write -f` carries FUA"
    );
    assert!(
        b.stats.flushes.load(SeqCst) >= 2,
        "flushes must reach the backend"
    );
    assert!(b.stats.write_zeroes.load(SeqCst) >= 1);
    assert!(b.stats.trims.load(SeqCst) >= 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_reports_capabilities() {
    let (srv, _) = TestServer::start(&[("alpha", 8 * MIB), ("beta", 3 * MIB + 512)]).await;
    let out = run_ok("nbdinfo", &["--json", &srv.uri("beta")]).await;
    let info = json(&out);
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(info["TLS"], false);
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "beta");
    assert_eq!(export["description"], "test export beta");
    assert_eq!(export["export-size"], 3 * MIB + 512);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(export[flag], true, "{flag} in {export}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    let contexts: Vec<_> = export["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(contexts, vec!["base:allocation"]);

    let out = run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://127.0.0.1:{}", srv.port)],
    )
    .await;
    let list = json(&out);
    let names: Vec<_> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, vec!["alpha", "beta"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_block_status() {
    let (srv, backends) = TestServer::start(&[("disk", 4 * MIB)]).await;
    backends[0].fill(MIB, &pattern(64 * 1024, 5));
    backends[0].fill(3 * MIB, &vec![0; 4096]); // allocated but zero
    let out = run_ok("nbdinfo", &["--map", "--json", &srv.uri("disk")]).await;
    let map: Vec<(u64, u64, u64)> = json(&out)
        .as_array()
        .expect("map")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap_or(u64::MAX),
                e["length"].as_u64().unwrap_or(u64::MAX),
                e["type"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    assert_eq!(
        map,
        vec![
            (0, MIB, 3),
            (MIB, 65536, 0),
            (MIB + 65536, 2 * MIB - 65536, 3),
            (3 * MIB, 4096, 2),
            (3 * MIB + 4096, MIB - 4096, 3),
        ]
    );
    let out = run_ok("nbdinfo", &["--map", "--totals", &srv.uri("disk")]).await;
    assert!(out.contains("data"), "{out}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_in_out_and_between_exports() {
    let size = 16 * MIB;
    let (srv, backends) = TestServer::start(&[("a", size), ("b", size)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    let out = dir.path().join("out.img");
    let data = image(size as usize, 21);
    std::fs::write(&src, &data).expect("write source");
    let (src, out) = (src.to_str().expect("utf-8"), out.to_str().expect("utf-8"));
    // nbdcopy uses several connections (CAN_MULTI_CONN), block status and fast zero.
    run_ok("nbdcopy", &["--connections=4", src, &srv.uri("a")]).await;
    assert_bytes(&backends[0].contents(0, size as usize), &data, "export a");
    backends[1].fill(0, &vec![0xff; size as usize]);
    run_ok("nbdcopy", &[&srv.uri("a"), &srv.uri("b")]).await;
    assert_bytes(&backends[1].contents(0, size as usize), &data, "export b");
    run_ok("nbdcopy", &[&srv.uri("b"), out]).await;
    assert_bytes(
        &std::fs::read(out).expect("read copy"),
        &data,
        "nbdcopy out",
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verifies_random_and_sequential_io() {
    let (srv, backends) = TestServer::start(&[("disk", 64 * MIB)]).await;
    let uri = format!("--uri={}", srv.uri("disk"));
    for job in [
        &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M"][..],
        &["--rw=write", "--bs=1M", "--iodepth=8", "--size=64M"][..],
        &[
            "--rw=randrw",
            "--bsrange=512-64k",
            "--iodepth=16",
            "--size=16M",
        ][..],
    ] {
        let mut args = vec![
            "--name=basalt-nbd",
            "--ioengine=nbd",
            uri.as_str(),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_backlog=1024",
            "--randrepeat=0",
            "--verify_state_save=0",
        ];
        args.extend_from_slice(job);
        let out = run_ok("fio", &args).await;
        assert!(
            out.contains("err= 0"),
            "fio {job:?} reported errors:\n{out}"
        );
        for bad in ["bad magic", "verify failed", "crc32c: verify"] {
            assert!(!out.contains(bad), "fio {job:?} reported {bad:?}:\n{out}");
        }
    }
    assert!(backends[0].stats.writes.load(SeqCst) > 8000);
    assert!(backends[0].stats.reads.load(SeqCst) > 8000);
    srv.stop().await;
}

//! Disk images: `basalt image import` turns raw and qcow2 files into vdisks
//! (qemu-img writing over NBD), `basalt vdisk create --from` clones one; the
//! data is read back over NBD, byte for byte.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Daemon, random_bytes, run_command, tool};

const IMAGE_SIZE: usize = 8 << 20;

/// A sparse raw image with random data in three places; returns its bytes.
fn write_raw_image(path: &std::path::Path) -> Vec<u8> {
    let mut image = vec![0u8; IMAGE_SIZE];
    for (i, offset) in [0usize, 3 << 20, IMAGE_SIZE - 8192].into_iter().enumerate() {
        let data = random_bytes(8192.min(IMAGE_SIZE - offset), 40 + i as u64);
        image[offset..offset + data.len()].copy_from_slice(&data);
    }
    std::fs::write(path, &image).expect("write the raw image");
    image
}

fn read_vdisk(daemon: &Daemon, name: &str, len: u64) -> Vec<u8> {
    let mut client = daemon.nbd(name);
    let data = client.read_all(0, len).expect("NBD read");
    client.disconnect();
    data
}

#[test]
fn raw_and_qcow2_images_import_and_clone_byte_for_byte() {
    let daemon = Daemon::start();
    let raw = daemon.dir().join("disk.raw");
    let expected = write_raw_image(&raw);
    let qcow2 = daemon.dir().join("disk.qcow2");
    let mut convert = Command::new(tool("qemu-img"));
    convert
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2);
    let out = run_command(convert, "qemu-img convert", Duration::from_secs(60));
    assert!(out.status.success(), "{out:?}");

    let raw_path = raw.display().to_string();
    let qcow2_path = qcow2.display().to_string();
    let imported = daemon.cli_json(&["image", "import", "base-raw", &raw_path]);
    assert_eq!(imported["size"].as_u64(), Some(IMAGE_SIZE as u64));
    daemon.cli_ok(&["image", "import", "base-qcow2", &qcow2_path]);
    for name in ["base-raw", "base-qcow2"] {
        assert!(
            read_vdisk(&daemon, name, IMAGE_SIZE as u64) == expected,
            "{name} differs from the image"
        );
    }

    // Clones: same size by default, or larger (the tail reads as zeros).
    let clone = daemon.cli_json(&["vdisk", "create", "vm1-root", "--from", "base-qcow2"]);
    assert_eq!(clone["size"].as_u64(), Some(IMAGE_SIZE as u64));
    let big = daemon.cli_json(&[
        "vdisk", "create", "vm2-root", "--from", "base-raw", "--size", "16M",
    ]);
    assert_eq!(big["size"].as_u64(), Some(16 << 20));
    assert!(read_vdisk(&daemon, "vm1-root", IMAGE_SIZE as u64) == expected);
    let data = read_vdisk(&daemon, "vm2-root", 16 << 20);
    assert!(data[..IMAGE_SIZE] == expected[..]);
    assert!(data[IMAGE_SIZE..].iter().all(|b| *b == 0));
    // The clone is a copy: writing it leaves the image alone.
    let mut client = daemon.nbd("vm1-root");
    client
        .write(0, &[0xab; 4096], true)
        .expect("write the clone");
    client.disconnect();
    assert!(read_vdisk(&daemon, "base-qcow2", IMAGE_SIZE as u64) == expected);

    // Bad input: clear errors, nothing created.
    daemon
        .cli(&["image", "import", "x", "/no/such/image"])
        .assert_error(&["/no/such/image"]);
    daemon
        .cli(&["image", "import", "base-raw", &raw_path])
        .assert_error(&["exists"]);
    daemon
        .cli(&["vdisk", "create", "y", "--from", "nope"])
        .assert_error(&["nope"]);
    daemon
        .cli(&["vdisk", "create", "y", "--from", "base-raw", "--size", "4M"])
        .assert_error(&["at least 8388608 bytes"]);
    let list = daemon.cli_json(&["vdisk", "list"]);
    let mut names: Vec<&str> = list
        .as_array()
        .map(|l| l.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    names.sort_unstable();
    assert_eq!(names, ["base-qcow2", "base-raw", "vm1-root", "vm2-root"]);
}

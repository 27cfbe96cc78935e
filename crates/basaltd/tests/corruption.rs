//! Silent corruption on the disk: data blocks of a stopped daemon's disk file
//! are damaged behind its back. After a restart, every damaged block fails
//! to read with an I/O error (to our client and to qemu-io), every other
//! block reads back intact, and `basalt --json status` counts checksum
//! errors.
//!
//! The blocks are found through the on-disk format (`docs/on-disk-format.md`):
//! the label at byte 0 says where the slots are; each slot is two 4 KiB
//! metadata blocks (A, B) naming the vdisk, extent and allocation, then the
//! extent's 256 data blocks.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::nbd::NbdError;
use common::{BLOCK, BlockContent, Daemon, nbd, run_tool};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const META_BYTES: u64 = 2 * BLOCK as u64;
const EXTENT_BLOCKS: u64 = 256;
const SLOT_BYTES: u64 = META_BYTES + EXTENT_BLOCKS * BLOCK as u64;
const HAS_DATA: u64 = 1 << 63;

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// One slot's current metadata, as far as this test needs it.
#[derive(Debug, Clone)]
struct Slot {
    /// Byte offset of the slot on the disk.
    offset: u64,
    vdisk: u64,
    extent: u64,
    alloc: u64,
    seq: u64,
    has_data: Vec<bool>,
}

impl Slot {
    fn data_at(&self, block: u64) -> u64 {
        self.offset + META_BYTES + block * BLOCK as u64
    }
}

/// Maps (vdisk, extent) to the slot holding it: the newest allocation with
/// valid-looking metadata (the higher sequence number of copies A and B).
fn scan_disk(path: &Path) -> BTreeMap<(u64, u64), Slot> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut label = vec![0u8; BLOCK];
    file.read_exact_at(&mut label, 0).expect("read the label");
    assert_eq!(&label[..8], b"BASALTDK", "no Basalt label at byte 0");
    let slot_offset = le64(&label, 88);
    let slot_bytes = le64(&label, 96);
    let slot_count = le64(&label, 104);
    assert_eq!(slot_bytes, SLOT_BYTES, "slot size in the label");
    assert!(
        slot_count > 0 && slot_offset > 0,
        "label: {slot_offset} {slot_count}"
    );

    let mut map: BTreeMap<(u64, u64), Slot> = BTreeMap::new();
    let mut meta = vec![0u8; META_BYTES as usize];
    for slot in 0..slot_count {
        let offset = slot_offset + slot * SLOT_BYTES;
        file.read_exact_at(&mut meta, offset)
            .expect("read slot metadata");
        let mut best: Option<Slot> = None;
        for copy in meta.chunks(BLOCK) {
            if &copy[..8] != b"BSLTMETA" {
                continue;
            }
            let candidate = Slot {
                offset,
                vdisk: le64(copy, 16),
                extent: le64(copy, 24),
                alloc: le64(copy, 32),
                seq: le64(copy, 40),
                has_data: (0..EXTENT_BLOCKS as usize)
                    .map(|i| le64(copy, 64 + 12 * i) & HAS_DATA != 0)
                    .collect(),
            };
            if best
                .as_ref()
                .is_none_or(|b| (candidate.alloc, candidate.seq) > (b.alloc, b.seq))
            {
                best = Some(candidate);
            }
        }
        if let Some(found) = best {
            let key = (found.vdisk, found.extent);
            if map.get(&key).is_none_or(|old| found.alloc > old.alloc) {
                map.insert(key, found);
            }
        }
    }
    map
}

fn flip_bytes(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the disk for writing");
    let mut block = vec![0u8; BLOCK];
    file.read_exact_at(&mut block, offset).expect("read block");
    block[100] ^= 0xff;
    block[2000] ^= 0x01;
    block[BLOCK - 1] ^= 0x80;
    file.write_all_at(&block, offset).expect("write block");
    file.sync_all().expect("sync");
}

#[test]
fn corrupted_blocks_fail_with_eio_and_everything_else_reads_back() {
    let seed = common::test_seed("corrupted_blocks");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut daemon = Daemon::start();
    let vdisk = daemon.create_vdisk("c", "8M");
    let vdisk_id = vdisk["id"].as_u64().expect("vdisk id");
    let blocks = 8 * EXTENT_BLOCKS;

    // Block → sequence number of its content (absent: never written).
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    let mut client = daemon.nbd("c");
    // Extents 0-3 in one 4 MiB write (whole extents: copy-on-write path).
    let mut data = Vec::new();
    for block in 0..4 * EXTENT_BLOCKS {
        data.extend(common::tagged_block(block, 1));
        model.insert(block, 1);
    }
    client.write(0, &data, false).expect("4 MiB write");
    // Extents 4-7 block by block, leaving every fifth block unwritten (oplog
    // path, drained home on shutdown).
    for block in 4 * EXTENT_BLOCKS..blocks {
        if block % 5 == 0 {
            continue;
        }
        client
            .write(
                block * 4096,
                &common::tagged_block(block, 2),
                block % 7 == 0,
            )
            .expect("4 KiB write");
        model.insert(block, 2);
    }
    // Small overwrites inside a copy-on-write extent.
    for block in [EXTENT_BLOCKS + 3, EXTENT_BLOCKS + 4, EXTENT_BLOCKS + 200] {
        client
            .write(block * 4096, &common::tagged_block(block, 3), false)
            .expect("overwrite");
        model.insert(block, 3);
    }
    client.flush().expect("flush");
    client.disconnect();
    daemon.stop();

    // Find every written block on the disk.
    let slots = scan_disk(&daemon.disk);
    let file = File::open(&daemon.disk).expect("open disk");
    let mut buf = vec![0u8; BLOCK];
    for extent in 0..8 {
        let slot = slots.get(&(vdisk_id, extent)).unwrap_or_else(|| {
            panic!("no slot on the disk holds extent {extent} of vdisk {vdisk_id}")
        });
        for i in 0..EXTENT_BLOCKS {
            let block = extent * EXTENT_BLOCKS + i;
            match model.get(&block) {
                Some(&seq) => {
                    assert!(
                        slot.has_data[i as usize],
                        "block {block}: metadata says no data"
                    );
                    file.read_exact_at(&mut buf, slot.data_at(i)).expect("read");
                    assert!(
                        buf == common::tagged_block(block, seq),
                        "block {block} is not where the on-disk format says ({slot:?})"
                    );
                }
                None => assert!(!slot.has_data[i as usize], "block {block} has data"),
            }
        }
    }

    // Damage some written blocks, from every kind of write, and the slot
    // area of a block that holds no data.
    let mut victims = vec![
        rng.gen_range(0..EXTENT_BLOCKS),       // copy-on-write extent
        EXTENT_BLOCKS + 4,                     // overwritten in a copy-on-write extent
        3 * EXTENT_BLOCKS + EXTENT_BLOCKS - 1, // last block of an extent
        4 * EXTENT_BLOCKS + 2,                 // drained from the oplog
    ];
    let mut drained: Vec<u64> = (5 * EXTENT_BLOCKS..blocks)
        .filter(|b| model.contains_key(b))
        .collect();
    drained.shuffle(&mut rng);
    victims.extend(&drained[..3]);
    for block in &victims {
        assert!(
            model.contains_key(block),
            "victim {block} was never written"
        );
    }
    for &block in &victims {
        let slot = &slots[&(vdisk_id, block / EXTENT_BLOCKS)];
        flip_bytes(&daemon.disk, slot.data_at(block % EXTENT_BLOCKS));
    }
    let unwritten = 6 * EXTENT_BLOCKS + 4; // a multiple of five: never written
    assert!(!model.contains_key(&unwritten));
    let slot = &slots[&(vdisk_id, 6)];
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(&daemon.disk)
        .expect("open disk");
    raw.write_all_at(&[0xa5; BLOCK], slot.data_at(unwritten % EXTENT_BLOCKS))
        .expect("scribble on an unwritten block");
    raw.sync_all().expect("sync");
    drop(raw);
    victims.sort_unstable();
    eprintln!("corrupted blocks: {victims:?}");

    daemon.restart();
    let errors_before = daemon.status().io.checksum_errors;
    let mut client = daemon.nbd("c");
    for block in 0..blocks {
        let result = client.read(block * 4096, 4096);
        if victims.contains(&block) {
            match result {
                Err(NbdError::Server(nbd::EIO)) => {}
                Ok(data) => panic!(
                    "corrupted block {block} was served as {:?}",
                    common::parse_block(&data)
                ),
                Err(e) => panic!("corrupted block {block}: expected EIO, got {e}"),
            }
            continue;
        }
        let data = result.unwrap_or_else(|e| panic!("intact block {block} failed: {e}"));
        let expected = match model.get(&block) {
            Some(&seq) => BlockContent::Tagged { block, seq },
            None => BlockContent::Zero,
        };
        assert_eq!(common::parse_block(&data), expected, "block {block}");
    }
    // A large read that covers a damaged block fails as a whole.
    match client.read(0, 1 << 20) {
        Err(NbdError::Server(nbd::EIO)) => {}
        other => panic!(
            "1 MiB read over a damaged block: {:?}",
            other.map(|d| d.len())
        ),
    }
    client.disconnect();

    // qemu-io sees an I/O error too.
    let victim = victims[0];
    let out = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("read {} 4096", victim * 4096),
            &daemon.nbd_uri("c"),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error") && !out.status.success(),
        "qemu-io read of corrupted block {victim} did not fail with EIO ({}):\n{text}",
        out.status
    );

    // The node counts them.
    let status = daemon.cli_json(&["status"]);
    let errors = status["io"]["checksum_errors"]
        .as_u64()
        .expect("checksum_errors");
    assert!(
        errors >= errors_before + victims.len() as u64,
        "checksum_errors {errors} (was {errors_before}) for {} damaged blocks: {status}",
        victims.len()
    );

    // Rewriting a damaged block heals it.
    let mut client = daemon.nbd("c");
    for &block in &victims {
        client
            .write(block * 4096, &common::tagged_block(block, 9), false)
            .expect("rewrite damaged block");
    }
    client.flush().expect("flush");
    for &block in &victims {
        let data = client.read(block * 4096, 4096).expect("read healed block");
        assert_eq!(
            common::parse_block(&data),
            BlockContent::Tagged { block, seq: 9 }
        );
    }
    client.disconnect();
    assert!(daemon.is_running());
}

/// A daemon with vdisk `l` holding tagged blocks in its first 2 MiB,
/// stopped; and its disk's id.
fn stopped_daemon_with_data() -> (Daemon, serde_json::Value) {
    let mut daemon = Daemon::start_with(common::DaemonOptions {
        disk_size: "256M",
        ..common::DaemonOptions::default()
    });
    daemon.create_vdisk("l", "16M");
    let mut client = daemon.nbd("l");
    let mut data = Vec::new();
    for block in 0..512 {
        data.extend(common::tagged_block(block, 1));
    }
    client.write(0, &data, false).expect("write");
    client.flush().expect("flush");
    client.disconnect();
    let disk_id = daemon.cli_json(&["disk", "list"])[0]["id"].clone();
    daemon.stop();
    (daemon, disk_id)
}

fn zero_range(path: &Path, offset: u64, len: usize) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the disk for writing");
    file.write_all_at(&vec![0u8; len], offset).expect("zero");
    file.sync_all().expect("sync");
}

fn assert_data_intact(daemon: &Daemon) {
    let mut client = daemon.nbd("l");
    let data = client.read_all(0, 2 << 20).expect("read");
    for (block, bytes) in data.chunks(BLOCK).enumerate() {
        assert_eq!(
            common::parse_block(bytes),
            BlockContent::Tagged {
                block: block as u64,
                seq: 1
            },
            "block {block}"
        );
    }
    client.disconnect();
}

#[test]
fn a_damaged_label_a_is_survived_through_label_b() {
    let (mut daemon, disk_id) = stopped_daemon_with_data();
    zero_range(&daemon.disk, 0, BLOCK);
    daemon.restart();
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_eq!(disks.as_array().map(Vec::len), Some(1), "{disks}");
    assert_eq!(disks[0]["state"], serde_json::json!("online"), "{disks}");
    assert_eq!(disks[0]["id"], disk_id, "{disks}");
    assert_data_intact(&daemon);
}

/// Both labels of a disk the node knows are damaged (the first 8 KiB
/// zeroed, as `wipefs` or a stray partitioning tool would). The daemon must
/// not treat the disk as blank: it should refuse it (or recover the label
/// from its catalog). Instead it formats it as a new disk, without
/// `--force-claim`, and the vdisks on it become unavailable for good.
#[test]
fn a_known_disk_with_both_labels_damaged_is_not_reformatted() {
    let (mut daemon, before) = stopped_daemon_with_data();
    zero_range(&daemon.disk, 0, 2 * BLOCK);
    match daemon.try_restart() {
        Err(text) => {
            // Refusing is fine, if it says why; the disk must be untouched.
            assert!(text.contains("label"), "unclear refusal:\n{text}");
            let mut head = vec![0u8; 2 * BLOCK];
            File::open(&daemon.disk)
                .expect("open disk")
                .read_exact_at(&mut head, 0)
                .expect("read");
            assert!(
                head.iter().all(|&b| b == 0),
                "the refused disk was written to"
            );
        }
        Ok(()) => {
            // Starting is fine only if the data is still there.
            let disks = daemon.cli_json(&["disk", "list"]);
            assert_eq!(
                disks.as_array().map(Vec::len),
                Some(1),
                "the disk now appears twice: {disks}"
            );
            assert_eq!(
                disks[0]["id"], before,
                "the disk got a new identity: {disks}"
            );
            assert_data_intact(&daemon);
        }
    }
}

/// One of a node's two disks is gone at restart (a failed drive, a file
/// removed). The store has a `missing` disk state and the node a `degraded`
/// health for exactly this, but basaltd refuses to start at all: "cannot
/// open disk ...: no such file".
#[test]
fn a_missing_disk_leaves_the_node_degraded_not_down() {
    let mut daemon = Daemon::start_with(common::DaemonOptions {
        disk_size: "256M",
        ..common::DaemonOptions::default()
    });
    let second = daemon.dir().join("d1.img");
    daemon.stop();
    daemon.options_mut().extra = vec!["--disk".into(), format!("{}:256M", second.display())];
    // Both disks now (the first one is known; the second gets formatted).
    daemon.restart();
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_eq!(disks.as_array().map(Vec::len), Some(2), "{disks}");
    daemon.stop();

    std::fs::remove_file(&second).expect("remove the second disk");
    let options = daemon.options_mut();
    options.extra.clear();
    options.no_disk_flag = true;
    if let Err(text) = daemon.try_restart() {
        panic!("basaltd did not start with one of two disks missing:\n{text}");
    }
    let status = daemon.status();
    assert_eq!(status.health, "degraded", "{status:?}");
    let disks = daemon.cli_json(&["disk", "list"]);
    let states: Vec<&str> = disks
        .as_array()
        .expect("disks")
        .iter()
        .filter_map(|d| d["state"].as_str())
        .collect();
    assert!(
        states.contains(&"missing") && states.contains(&"online"),
        "{disks}"
    );
}

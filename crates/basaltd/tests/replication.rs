//! Replicated vdisks across real basaltd processes on 127.0.0.1: writes
//! through one node survive kill -9 of that node and are read back through
//! another; a client that moves to another node takes the vdisk over and
//! fences the old owner, whose writes then fail instead of diverging.

mod common;

use std::time::Duration;

use common::{BlockContent, Daemon, wait_for};
use serde_json::Value;

fn member(join: Option<u16>) -> Daemon {
    common::cluster_member(join, "512M", 3, &[])
}

/// Three members with three Raft voters (so one may die).
fn three_nodes() -> (Daemon, Daemon, Daemon) {
    let first = member(None);
    let second = member(Some(first.listen_port));
    let third = member(Some(first.listen_port));
    wait_for("three voters", Duration::from_secs(30), || {
        let status = first.cli_json(&["cluster", "status"]);
        status["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.len() == 3 && nodes.iter().all(|n| n["role"] == "voter"))
    });
    (first, second, third)
}

fn replica_nodes(vdisk: &Value) -> Vec<u64> {
    vdisk["replicas"]
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["node"].as_u64()).collect())
        .unwrap_or_default()
}

fn node_id(daemon: &Daemon) -> u64 {
    daemon.cli_json(&["cluster", "status"])["node_id"]
        .as_u64()
        .expect("node id")
}

fn check_blocks(
    daemon: &Daemon,
    client: &mut common::nbd::NbdClient,
    blocks: u64,
    seq_of: impl Fn(u64) -> u64,
) {
    let data = client
        .read_all(0, blocks * 4096)
        .unwrap_or_else(|e| panic!("read back: {e:?}\n{}", daemon.log_tail(30)));
    for (block, bytes) in data.chunks(4096).enumerate() {
        let block = block as u64;
        let expected = match seq_of(block) {
            0 => BlockContent::Zero,
            seq => BlockContent::Tagged { block, seq },
        };
        assert_eq!(common::parse_block(bytes), expected, "block {block}");
    }
}

#[test]
fn writes_through_a_killed_owner_are_read_back_through_another_node() {
    let (mut first, second, third) = three_nodes();
    let created = first.cli_json(&["vdisk", "create", "data", "--size", "64M", "--rf", "2"]);
    assert_eq!(created["rf"], 2);
    let replicas = replica_nodes(&created);
    assert_eq!(replicas.len(), 2);
    assert_eq!(
        replicas[0],
        node_id(&first),
        "the creating node holds the first replica"
    );
    assert_eq!(created["state"], "healthy");

    // 256 blocks written through the first node and flushed, plus some
    // large writes; every replica has them.
    let mut client = first.nbd("data");
    for block in 0..256u64 {
        client
            .write(block * 4096, &common::tagged_block(block, 1), false)
            .expect("write");
    }
    let mut big = Vec::new();
    for block in 1024..1280u64 {
        big.extend(common::tagged_block(block, 1));
    }
    client.write(1024 * 4096, &big, true).expect("big write");
    client.flush().expect("flush");
    let shown = second.cli_json(&["vdisk", "show", "data"]);
    assert_eq!(shown["owner"], node_id(&first));
    assert_eq!(shown["epoch"], 1);

    // The owner (a replica holder, possibly the Raft leader) dies.
    first.kill9();
    drop(client);

    // The other nodes serve the vdisk with everything that was flushed.
    let survivor = if replicas.contains(&node_id(&second)) {
        &second
    } else {
        &third
    };
    let mut client = survivor.nbd("data");
    let seq = |block: u64| u64::from((block < 256) || (1024..1280).contains(&block));
    check_blocks(survivor, &mut client, 1280, seq);
    // And keep taking writes: the dead replica is recorded stale.
    for block in 0..64u64 {
        client
            .write(block * 4096, &common::tagged_block(block, 2), true)
            .expect("write after the owner died");
    }
    let shown = survivor.cli_json(&["vdisk", "show", "data"]);
    assert_eq!(shown["owner"], node_id(survivor));
    assert_eq!(shown["epoch"], 2);
    // The dead node's replica is stale by now, or already replaced (the
    // takeover waited out the dead owner's read lease, longer than
    // --dead-after here).
    let dead_id = replicas[0];
    let dead_in_sync = shown["replicas"].as_array().is_some_and(|r| {
        r.iter()
            .any(|r| r["node"] == dead_id && r["state"] == "in_sync")
    });
    assert!(
        !dead_in_sync,
        "the dead node's replica is still in sync: {shown}"
    );
    // Once the dead node is declared down, its replica moves to the third
    // node and is resynced there: the vdisk is healthy again.
    wait_for(
        "the replication factor is restored",
        Duration::from_secs(60),
        || {
            let shown = survivor.cli_json(&["vdisk", "show", "data"]);
            shown["state"] == "healthy" && !replica_nodes(&shown).contains(&dead_id)
        },
    );
    client.disconnect();

    // A node holding no replica serves it too, from the remote replica.
    let other = if std::ptr::eq(survivor, &second) {
        &third
    } else {
        &second
    };
    let mut client = other.nbd("data");
    let seq = |block: u64| {
        if block < 64 {
            2
        } else {
            u64::from((block < 256) || (1024..1280).contains(&block))
        }
    };
    check_blocks(other, &mut client, 1280, seq);
    client.disconnect();

    // The killed node comes back; it holds no replica any more, so reads
    // through it come from the replicas and see the writes it missed.
    first.restart();
    let mut client = first.nbd("data");
    check_blocks(&first, &mut client, 1280, seq);
    client.disconnect();
}

#[test]
fn a_client_moving_to_another_node_fences_the_old_owner() {
    let (first, second, _third) = three_nodes();
    first.cli_ok(&["vdisk", "create", "moved", "--size", "16M", "--rf", "3"]);
    let mut old = first.nbd("moved");
    old.write(0, &common::tagged_block(0, 1), true)
        .expect("write");

    // A client on the second node takes the vdisk over.
    let mut new = second.nbd("moved");
    new.write(4096, &common::tagged_block(1, 1), true)
        .expect("write through the new owner");
    assert_eq!(
        second.cli_json(&["vdisk", "show", "moved"])["owner"],
        node_id(&second)
    );

    // The old owner's writes fail now (they would diverge), and change nothing.
    let result = old.write(0, &common::tagged_block(0, 9), true);
    assert!(result.is_err(), "a fenced owner completed a write");
    check_blocks(&second, &mut new, 4, |block| u64::from(block < 2));
    // Every replica is still in sync: fencing is not a failure.
    let shown = second.cli_json(&["vdisk", "show", "moved"]);
    assert_eq!(shown["state"], "healthy", "{shown}");
    new.disconnect();
}

/// A node restarts with an export made by hand of a vdisk that a client on
/// another node took over meanwhile: the export is not brought back (its
/// old QEMU, reconnecting, would take the vdisk back from that client).
#[test]
fn a_hand_made_export_is_not_restored_when_another_node_took_the_vdisk_over() {
    let (mut first, second, _third) = three_nodes();
    first.cli_ok(&["vdisk", "create", "handv", "--size", "16M", "--rf", "3"]);
    first.cli_ok(&["vdisk", "create", "stays", "--size", "16M", "--rf", "3"]);
    first.cli_ok(&["vdisk", "export", "handv", "--vhost"]);
    first.cli_ok(&["vdisk", "export", "stays", "--vhost"]);
    let mut client = first.nbd("handv");
    client
        .write(0, &common::tagged_block(0, 1), true)
        .expect("write through the first node");
    client.disconnect();
    first.stop();

    let mut taker = second.nbd("handv");
    taker
        .write(4096, &common::tagged_block(1, 1), true)
        .expect("write through the second node");
    assert_eq!(
        second.cli_json(&["vdisk", "show", "handv"])["owner"],
        node_id(&second)
    );
    first.restart();
    let record = first.data_dir.join("vhost-exports/handv.export");
    wait_for("the restore pass", Duration::from_secs(30), || {
        !record.exists() && !first.cli_json(&["vdisk", "show", "stays"])["vhost_socket"].is_null()
    });
    assert_eq!(
        first.cli_json(&["vdisk", "show", "handv"])["vhost_socket"],
        Value::Null,
        "{}",
        first.log_tail(20)
    );
    assert!(
        first
            .log_text()
            .contains("not exporting a vdisk by hand again: another node serves it now"),
        "{}",
        first.log_tail(20)
    );
    // The second node's client was not disturbed.
    check_blocks(&second, &mut taker, 2, |_| 1);
    taker.disconnect();
}

fn write_range(client: &mut common::nbd::NbdClient, blocks: std::ops::Range<u64>, seq: u64) {
    let mut at = blocks.start;
    while at < blocks.end {
        let n = (blocks.end - at).min(256);
        let mut data = Vec::with_capacity((n * 4096) as usize);
        for block in at..at + n {
            data.extend(common::tagged_block(block, seq));
        }
        client.write(at * 4096, &data, false).expect("write");
        at += n;
    }
    client.flush().expect("flush");
}

fn resync_copied(daemon: &Daemon) -> u64 {
    daemon.status().io.resync_copied_bytes
}

#[test]
fn a_node_back_from_a_short_outage_copies_only_what_changed() {
    let (mut first, _second, mut third) = three_nodes();
    first.cli_ok(&["vdisk", "create", "back", "--size", "64M", "--rf", "3"]);
    let mut client = first.nbd("back");
    write_range(&mut client, 0..8192, 1); // 32 MiB
    third.kill9();
    // 1 MiB changes while the third node is away.
    write_range(&mut client, 4096..4352, 2);
    let shown = first.cli_json(&["vdisk", "show", "back"]);
    assert!(
        shown["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["state"] == "stale")),
        "{shown}"
    );
    let status = first.cli_json(&["cluster", "status"]);
    assert_eq!(status["unhealthy_vdisks"][0]["name"], "back", "{status}");
    assert_ne!(status["unhealthy_vdisks"][0]["state"], "healthy");
    third.restart();
    // `--watch` follows the resync and returns once the vdisk is healthy.
    let watched = first.cli(&["vdisk", "show", "back", "--watch"]);
    assert!(watched.status.success(), "{watched:?}");
    assert!(watched.stdout.contains("back"), "{watched:?}");
    wait_for(
        "the returning replica is in sync",
        Duration::from_secs(60),
        || first.cli_json(&["vdisk", "show", "back"])["state"] == "healthy",
    );
    let copied = resync_copied(&third);
    assert!(
        (1 << 20..=2 << 20).contains(&copied),
        "copied {copied} bytes to catch up 1 MiB of changes in a 64 MiB vdisk"
    );
    // Writes keep reaching every replica; the returned copy is exact: the
    // owner dies and the third node serves from its own copy.
    write_range(&mut client, 0..16, 3);
    client.disconnect();
    first.kill9();
    let seq = |block: u64| match block {
        0..16 => 3,
        4096..4352 => 2,
        16..4096 | 4352..8192 => 1,
        _ => 0,
    };
    let mut client = third.nbd("back");
    check_blocks(&third, &mut client, 8192, seq);
    client.disconnect();
    let shown = third.cli_json(&["vdisk", "show", "back"]);
    assert_eq!(shown["owner"], node_id(&third));
}

#[test]
fn a_dead_nodes_replica_is_rebuilt_elsewhere_without_an_operator() {
    let (mut first, second, third) = three_nodes();
    let created = first.cli_json(&["vdisk", "create", "heal", "--size", "32M", "--rf", "2"]);
    let holders = replica_nodes(&created);
    let mut client = first.nbd("heal");
    write_range(&mut client, 0..2048, 1); // 8 MiB
    // The other replica holder dies.
    let (mut dead, spare) = if holders.contains(&node_id(&second)) {
        (second, third)
    } else {
        (third, second)
    };
    dead.kill9();
    write_range(&mut client, 0..64, 2);
    // After --dead-after (3 s) the cluster moves the replica to the spare
    // node and resyncs it there, with no operator involved.
    wait_for(
        "the replication factor is restored",
        Duration::from_secs(60),
        || {
            let shown = first.cli_json(&["vdisk", "show", "heal"]);
            shown["state"] == "healthy" && replica_nodes(&shown).contains(&node_id(&spare))
        },
    );
    assert!(
        resync_copied(&spare) >= 8 << 20,
        "the new replica got the data"
    );
    write_range(&mut client, 64..128, 3);
    client.disconnect();
    // The dead node returns (for the Raft quorum; it holds no replica any
    // more), then the original owner dies: the rebuilt copy has everything.
    dead.restart();
    first.kill9();
    let seq = |block: u64| match block {
        0..64 => 2,
        64..128 => 3,
        128..2048 => 1,
        _ => 0,
    };
    let mut client = spare.nbd("heal");
    check_blocks(&spare, &mut client, 2048, seq);
    client.disconnect();
}

fn partition(daemon: &Daemon, nodes: &[u64]) {
    let body = serde_json::json!({ "nodes": nodes }).to_string();
    let answer = daemon.http(
        "PUT",
        "/api/v1/debug/partition",
        Some(("application/json", body.as_str())),
    );
    assert_eq!(answer.status, 204, "{answer:?}");
}

fn faulty_member(join: Option<u16>) -> Daemon {
    common::cluster_member(join, "256M", 30, &["--fault-injection"])
}

#[test]
fn an_owner_behind_a_partition_cannot_complete_writes_and_nothing_diverges() {
    let first = faulty_member(None);
    let second = faulty_member(Some(first.listen_port));
    let third = faulty_member(Some(first.listen_port));
    wait_for("three voters", Duration::from_secs(30), || {
        let status = first.cli_json(&["cluster", "status"]);
        status["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.len() == 3 && nodes.iter().all(|n| n["role"] == "voter"))
    });
    first.cli_ok(&["vdisk", "create", "split", "--size", "16M", "--rf", "3"]);
    let mut old = first.nbd("split");
    write_range(&mut old, 0..64, 1);

    // The first node (owner, Raft leader) is cut off from the other two.
    let (a, b, c) = (node_id(&first), node_id(&second), node_id(&third));
    partition(&first, &[b, c]);
    partition(&second, &[a]);
    partition(&third, &[a]);

    // Its writes can reach no other replica and cannot be recorded through
    // Raft (no quorum on its side): they fail.
    let result = old.write(0, &common::tagged_block(0, 9), true);
    assert!(result.is_err(), "the partitioned owner completed a write");

    // The majority side takes over and writes.
    let mut new = second.nbd("split");
    write_range(&mut new, 0..32, 2);
    assert!(
        old.write(4096, &common::tagged_block(1, 9), true).is_err(),
        "the old owner completed a write after the takeover"
    );
    // Nor does it serve reads: cut off from the majority, its read lease
    // has run out, so it cannot return data older than the new owner's.
    if let Ok(data) = old.read_all(0, 4096) {
        panic!(
            "the partitioned old owner served a read: {:?}",
            common::parse_block(&data)
        );
    }

    // Heal. The old owner's copy is stale and resynced; every copy agrees.
    partition(&first, &[]);
    partition(&second, &[]);
    partition(&third, &[]);
    wait_for(
        "all replicas in sync after healing",
        Duration::from_secs(60),
        || second.cli_json(&["vdisk", "show", "split"])["state"] == "healthy",
    );
    write_range(&mut new, 32..40, 3);
    new.disconnect();
    let seq = |block: u64| match block {
        0..32 => 2,
        32..40 => 3,
        40..64 => 1,
        _ => 0,
    };
    // Each node serves from its own in-sync copy in turn.
    for daemon in [&first, &third, &second] {
        let mut client = daemon.nbd("split");
        check_blocks(daemon, &mut client, 64, seq);
        client.disconnect();
    }
}

#[test]
fn a_joining_node_takes_its_share_of_existing_replicas() {
    let first = member(None);
    let names: Vec<String> = (0..4).map(|i| format!("spread{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let created = first.cli_json(&["vdisk", "create", name, "--size", "16M"]);
        assert_eq!(created["rf"], 1, "one node: rf 1 by default");
        let mut client = first.nbd(name);
        for block in 0..512u64 {
            client
                .write(
                    block * 4096,
                    &common::tagged_block(block, i as u64 + 1),
                    false,
                )
                .expect("write");
        }
        client.flush().expect("flush");
        client.disconnect();
    }
    // The second node joins an unbalanced cluster (64 MiB against 0): the
    // leader moves replicas to it, one at a time, until moving another
    // would not make things better (32 MiB each).
    let second = member(Some(first.listen_port));
    let first_id = node_id(&first);
    let second_id = node_id(&second);
    let placement = || -> Vec<(String, Vec<u64>, Value)> {
        let list = first.cli_json(&["vdisk", "list"]);
        list.as_array()
            .map(|vdisks| {
                vdisks
                    .iter()
                    .map(|v| {
                        (
                            v["name"].as_str().unwrap_or_default().to_string(),
                            replica_nodes(v),
                            v.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for(
        "the replicas are rebalanced",
        Duration::from_secs(90),
        || {
            let now = placement();
            let on_second = now.iter().filter(|(_, r, _)| r == &vec![second_id]).count();
            let on_first = now.iter().filter(|(_, r, _)| r == &vec![first_id]).count();
            on_second == 2
                && on_first == 2
                && now
                    .iter()
                    .all(|(_, _, v)| v["state"] == "healthy" && v["moving_from"].is_null())
        },
    );
    // Nothing moves any more, and the moved data is all there, through
    // either node; the first node's copies of the moved vdisks are gone.
    std::thread::sleep(Duration::from_secs(3));
    let settled = placement();
    assert_eq!(
        settled
            .iter()
            .filter(|(_, r, _)| r == &vec![second_id])
            .count(),
        2,
        "rebalance went on: {settled:?}"
    );
    for (i, name) in names.iter().enumerate() {
        for daemon in [&first, &second] {
            let mut client = daemon.nbd(name);
            check_blocks(daemon, &mut client, 512, |_| i as u64 + 1);
            client.disconnect();
        }
        let (_, replicas, _) = settled.iter().find(|(n, _, _)| n == name).expect("listed");
        if replicas == &vec![second_id] {
            let on_first = first.cli_json(&["vdisk", "show", name]);
            assert_eq!(
                on_first["allocated"], 0,
                "the first node still holds a copy of {name}"
            );
        }
    }
}

#[test]
fn a_copy_on_a_missing_disk_is_reported_lost_and_rebuilt_on_another_node() {
    // A longer dead-after than the restart below takes, so the node itself
    // is never declared down: only its disk is.
    let slow = |join: Option<u16>, extra: &[&str]| common::cluster_member(join, "256M", 8, extra);
    let first = slow(None, &[]);
    let second = slow(Some(first.listen_port), &[]);
    let spare = common::test_dir("spare-disk");
    let spare_disk = spare.path().join("d1.img");
    let spare_flag = format!("{}:256M", spare_disk.display());
    let mut third = slow(Some(first.listen_port), &["--disk", &spare_flag]);
    wait_for("three voters", Duration::from_secs(30), || {
        let status = first.cli_json(&["cluster", "status"]);
        status["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.len() == 3 && nodes.iter().all(|n| n["role"] == "voter"))
    });
    let third_id = node_id(&third);
    // Created through the third node, which holds its first replica.
    third.cli_ok(&["vdisk", "create", "lostdisk", "--size", "32M", "--rf", "2"]);
    let mut client = third.nbd("lostdisk");
    let mut all = Vec::new();
    for block in 0..8192u64 {
        all.extend(common::tagged_block(block, 3));
    }
    for (i, chunk) in all.chunks(1 << 20).enumerate() {
        client
            .write(i as u64 * (1 << 20), chunk, false)
            .expect("write");
    }
    client.flush().expect("flush");
    client.disconnect();
    assert!(replica_nodes(&third.cli_json(&["vdisk", "show", "lostdisk"])).contains(&third_id));

    // The third node restarts without the disk holding (some of) the data.
    let disks = third.cli_json(&["disk", "list"]);
    let used = disks
        .as_array()
        .expect("disks")
        .iter()
        .find(|d| d["slots_total"].as_u64() != d["slots_free"].as_u64())
        .expect("a disk with data")
        .clone();
    third.stop();
    std::fs::remove_file(used["path"].as_str().expect("path")).expect("remove the disk");
    let options = third.options_mut();
    options.no_disk_flag = true;
    options
        .extra
        .retain(|flag| flag != "--disk" && flag != &spare_flag);
    third.restart();

    // After the dead-after time the node reports its copy lost; the leader
    // places a new one on the node that had none; it is resynced.
    let first_id = node_id(&first);
    let second_id = node_id(&second);
    wait_for(
        "the lost copy is rebuilt elsewhere",
        Duration::from_secs(90),
        || {
            let shown = first.cli_json(&["vdisk", "show", "lostdisk"]);
            let mut nodes = replica_nodes(&shown);
            nodes.sort_unstable();
            shown["state"] == "healthy" && nodes == vec![first_id, second_id]
        },
    );
    assert!(
        third.log_text().contains("reported lost"),
        "the copy was not reported lost by its node:\n{}",
        third.log_tail(30)
    );
    let status = first.cli_json(&["cluster", "status"]);
    let third_state = status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"] == third_id))
        .map(|n| n["state"].clone());
    assert_eq!(third_state, Some(Value::from("up")), "{status}");
    // Everything reads back, even through the node whose disk went.
    let mut client = third.nbd("lostdisk");
    check_blocks(&third, &mut client, 8192, |_| 3);
    client.disconnect();
}

#[test]
fn a_two_node_cluster_keeps_serving_when_its_learner_dies() {
    // Two members: one Raft voter (the first), one learner. The learner's
    // death takes no quorum away, so the voter keeps reading and writing.
    let first = member(None);
    let mut second = member(Some(first.listen_port));
    first.cli_ok(&["vdisk", "create", "pair", "--size", "16M", "--rf", "2"]);
    let mut client = first.nbd("pair");
    write_range(&mut client, 0..16, 1);
    second.kill9();
    std::thread::sleep(Duration::from_secs(6));
    write_range(&mut client, 0..8, 2);
    check_blocks(
        &first,
        &mut client,
        16,
        |block| if block < 8 { 2 } else { 1 },
    );
    client.disconnect();
}

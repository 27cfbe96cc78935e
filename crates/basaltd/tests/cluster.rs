//! Clusters of real basaltd processes on 127.0.0.1: bootstrap, join,
//! `basalt cluster status`, failure detection after kill -9, rejoin after a
//! restart, and the bad inputs of membership (join to nowhere, garbage on
//! the peer port).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Daemon, wait_for};
use serde_json::Value;

fn member(join: Option<u16>) -> Daemon {
    common::cluster_member(join, "256M", 3, &[])
}

fn status(daemon: &Daemon) -> Value {
    daemon.cli_json(&["cluster", "status"])
}

fn node_field(status: &Value, id: u64, field: &str) -> Value {
    status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"] == id))
        .map(|n| n[field].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn three_daemons_form_a_cluster_and_notice_a_dead_member() {
    let first = member(None);
    let one = status(&first);
    assert_eq!(one["node_id"], 1);
    assert_eq!(one["nodes"].as_array().map(Vec::len), Some(1));
    assert_eq!(node_field(&one, 1, "state"), "up");
    assert_eq!(node_field(&one, 1, "role"), "voter");
    assert_eq!(node_field(&one, 1, "leader"), true);
    assert_eq!(
        node_field(&one, 1, "address"),
        format!("127.0.0.1:{}", first.listen_port)
    );

    let second = member(Some(first.listen_port));
    // The third joins through the second, not the leader.
    let mut third = member(Some(second.listen_port));
    // A node that has just joined (and may still lag behind the leader)
    // answers its own create with the new vdisk, not "no such vdisk".
    let created = third.cli_json(&["vdisk", "create", "early", "--size", "16M"]);
    assert_eq!(created["name"], "early", "{created}");
    let cluster_id = one["cluster_id"].clone();
    for (daemon, id) in [(&second, 2), (&third, 3)] {
        let s = status(daemon);
        assert_eq!(s["cluster_id"], cluster_id);
        assert_eq!(s["node_id"], id);
    }
    wait_for(
        "three voters seen from every node",
        Duration::from_secs(30),
        || {
            [&first, &second, &third].iter().all(|d| {
                let s = status(d);
                (1..=3).all(|id| {
                    node_field(&s, id, "role") == "voter" && node_field(&s, id, "state") == "up"
                })
            })
        },
    );
    let text = first.cli_ok(&["cluster", "status"]);
    assert!(
        text.contains("leader") && text.contains(&format!("127.0.0.1:{}", third.listen_port)),
        "{text}"
    );

    // kill -9 the third: after --dead-after (3 s) the cluster declares it down.
    third.kill9();
    wait_for("node 3 declared down", Duration::from_secs(30), || {
        node_field(&status(&second), 3, "state") == "down"
    });
    assert_eq!(node_field(&status(&first), 3, "reachable"), false);
    assert_eq!(node_field(&status(&first), 2, "state"), "up");

    // It restarts (its --join is ignored: it is a member) and is up again.
    third.restart();
    let s = status(&third);
    assert_eq!(s["node_id"], 3);
    assert_eq!(s["cluster_id"], cluster_id);
    assert!(
        third.log_text().contains("--join is ignored"),
        "a restarted member should say it ignores --join"
    );
    wait_for("node 3 up again", Duration::from_secs(30), || {
        node_field(&status(&first), 3, "state") == "up"
    });
}

#[test]
fn joining_nowhere_fails_clearly_and_garbage_on_the_peer_port_is_ignored() {
    let first = member(None);

    // --join to an address nobody listens on: a clear error and exit.
    let dir = common::test_dir("lost");
    let dead = common::pick_port();
    let args = vec![
        "--data-dir".to_string(),
        dir.path().join("data").display().to_string(),
        "--disk".to_string(),
        format!("{}:256M", dir.path().join("d0.img").display()),
        "--api".to_string(),
        format!("127.0.0.1:{}", common::pick_port()),
        "--nbd".to_string(),
        format!("127.0.0.1:{}", common::pick_port()),
        "--listen".to_string(),
        format!("127.0.0.1:{}", common::pick_port()),
        "--join".to_string(),
        format!("127.0.0.1:{dead}"),
    ];
    let output = common::run_command(
        common::daemon_command(&args),
        "basaltd --join to nowhere",
        Duration::from_secs(60),
    );
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains(&format!("joining the cluster at 127.0.0.1:{dead}"))
            && text.contains("cannot reach"),
        "unclear error for a join to nowhere:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");

    // Garbage on the peer port: an HTTP request, random bytes, a half hello.
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
        b"BASALT\r\n\x01\x00".to_vec(),
    ] {
        let mut stream = TcpStream::connect(("127.0.0.1", first.listen_port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = stream.write_all(&junk);
        let mut buf = [0u8; 256];
        // The daemon closes the connection (possibly after the hello timeout).
        let read = stream.read(&mut buf).unwrap_or(0);
        assert_eq!(read, 0, "the daemon answered garbage");
    }
    let s = status(&first);
    assert_eq!(s["nodes"].as_array().map(Vec::len), Some(1));
    first.create_vdisk("still-serving", "16M");
}

#[test]
fn a_dead_voter_is_replaced_by_a_live_learner() {
    let first = member(None);
    let mut second = member(Some(first.listen_port));
    let mut third = member(Some(first.listen_port));
    let fourth = member(Some(first.listen_port));
    let role = |daemon: &Daemon, id: u64| node_field(&status(daemon), id, "role");
    wait_for(
        "three voters and a learner",
        Duration::from_secs(30),
        || {
            let s = status(&first);
            (1..=3).all(|id| node_field(&s, id, "role") == "voter")
                && node_field(&s, 4, "role") == "learner"
        },
    );
    // A voter dies: once it is declared down, the learner takes its place.
    second.kill9();
    wait_for(
        "the learner promoted in place of the dead voter",
        Duration::from_secs(30),
        || role(&first, 4) == "voter" && role(&first, 2) == "learner",
    );
    // Another of the original voters dies: two of the three voters remain,
    // so the cluster still makes decisions.
    third.kill9();
    let created = first.cli_json(&["vdisk", "create", "still", "--size", "16M", "--rf", "1"]);
    assert_eq!(created["name"], "still");
    assert_eq!(status(&fourth)["nodes"].as_array().map(Vec::len), Some(4));
}

#[test]
fn a_member_restarted_on_another_address_is_reached_there() {
    let first = member(None);
    let second = member(Some(first.listen_port));
    let mut third = member(Some(first.listen_port));
    wait_for("three voters", Duration::from_secs(30), || {
        let s = status(&first);
        (1..=3).all(|id| node_field(&s, id, "role") == "voter")
    });
    first.cli_ok(&[
        "vdisk",
        "create",
        "everywhere",
        "--size",
        "16M",
        "--rf",
        "3",
    ]);

    // The third node comes back with a new --listen port.
    third.stop();
    let old_port = third.listen_port;
    third.listen_port = common::pick_port();
    assert_ne!(third.listen_port, old_port);
    third.restart();
    let new_address = format!("127.0.0.1:{}", third.listen_port);
    wait_for(
        "every member knows the new address and sees the node up",
        Duration::from_secs(60),
        || {
            [&first, &second, &third].iter().all(|d| {
                let s = status(d);
                node_field(&s, 3, "address") == new_address.as_str()
                    && node_field(&s, 3, "state") == "up"
            })
        },
    );
    // Raft reaches it there: a change made through the leader reaches the
    // third node's state; replication reaches its replica there.
    first.cli_ok(&[
        "vdisk",
        "create",
        "after-move",
        "--size",
        "16M",
        "--rf",
        "3",
    ]);
    wait_for(
        "the third node applies a change made after the move",
        Duration::from_secs(30),
        || third.cli_json(&["vdisk", "list"]).as_array().map(Vec::len) == Some(2),
    );
    let mut client = first.nbd("everywhere");
    client
        .write(0, &common::tagged_block(0, 7), true)
        .expect("write to all three replicas");
    client.disconnect();
    let shown = first.cli_json(&["vdisk", "show", "everywhere"]);
    assert_eq!(shown["state"], "healthy", "{shown}");
    let in_sync = shown["replicas"]
        .as_array()
        .map(|r| r.iter().filter(|r| r["state"] == "in_sync").count());
    assert_eq!(in_sync, Some(3), "the moved node missed the write: {shown}");
}

//! The management surface under bad input: the CLI and raw HTTP. Every bad
//! request is refused with one clear error (and, from the CLI, a non-zero
//! exit) and changes nothing. Also: what `vdisk show --json` carries, and the
//! daemon refusing a second daemon on its data dir or disk, a disk labelled
//! by another node (unless `--force-claim`), and a taken port.

mod common;

use std::net::TcpListener;

use common::{Daemon, DaemonOptions, daemon_must_refuse, run_cli};
use serde_json::{Value, json};

/// Everything bad input could change: the vdisk list and the node's counts.
fn snapshot(daemon: &Daemon) -> (Value, u64, u64) {
    let list = daemon.cli_json(&["vdisk", "list"]);
    let status = daemon.status();
    (list, status.vdisks, status.allocated)
}

#[test]
fn bad_cli_input_is_refused_and_changes_nothing() {
    let daemon = Daemon::start();
    daemon.create_vdisk("keep", "1G");
    daemon.create_vdisk("other", "64M");
    let before = snapshot(&daemon);
    let unchanged = |what: &str| {
        let after = snapshot(&daemon);
        assert_eq!(before, after, "{what} changed the vdisks");
    };

    // Unknown names: 404, one line naming the vdisk.
    for args in [
        vec!["vdisk", "show", "ghost"],
        vec!["vdisk", "resize", "ghost", "--size", "1G"],
        vec!["vdisk", "delete", "ghost"],
        vec!["vdisk", "export", "ghost", "--vhost"],
        vec!["vdisk", "unexport", "ghost", "--vhost"],
    ] {
        daemon
            .cli(&args)
            .assert_error(&["no vdisk named \"ghost\"", "HTTP 404"]);
        unchanged(&format!("{args:?}"));
        // The same with --json: errors stay one line on stderr.
        let mut with_json = vec!["--json"];
        with_json.extend(&args);
        let out = daemon.cli(&with_json);
        out.assert_error(&["ghost", "HTTP 404"]);
        assert!(
            out.stdout.is_empty(),
            "--json error printed {:?}",
            out.stdout
        );
    }
    daemon
        .cli(&["vdisk", "unexport", "keep", "--vhost"])
        .assert_error(&["not exported", "HTTP 404"]);
    unchanged("unexport of a vdisk that is not exported");

    // Names that are taken or invalid.
    daemon
        .cli(&["vdisk", "create", "keep", "--size", "1G"])
        .assert_error(&["already exists", "HTTP 409"]);
    unchanged("a duplicate create");
    let long = "x".repeat(65);
    for name in [
        "bad name",
        "_under",
        "a/b",
        "ünïcode",
        ".hidden",
        long.as_str(),
    ] {
        daemon
            .cli(&["vdisk", "create", name, "--size", "1G"])
            .assert_error(&["invalid vdisk name", "HTTP 400"]);
        unchanged(&format!("create {name:?}"));
    }

    // Sizes.
    daemon
        .cli(&["vdisk", "create", "zero", "--size", "0"])
        .assert_error(&["size", "HTTP 400"]);
    daemon
        .cli(&["vdisk", "create", "odd", "--size", "4097"])
        .assert_error(&["multiple of 4 KiB", "HTTP 400"]);
    daemon
        .cli(&["vdisk", "create", "odd", "--size", "1000"])
        .assert_error(&["multiple of 4 KiB", "HTTP 400"]);
    daemon
        .cli(&["vdisk", "create", "huge", "--size", "100G"])
        .assert_error(&["capacity", "HTTP 400"]);
    daemon
        .cli(&["vdisk", "create", "huge", "--size", "16P"])
        .assert_error(&["capacity", "HTTP 400"]);
    unchanged("bad create sizes");
    daemon
        .cli(&["vdisk", "resize", "keep", "--size", "512M"])
        .assert_error(&["shrink", "HTTP 400"]);
    daemon
        .cli(&["vdisk", "resize", "keep", "--size", "0"])
        .assert_error(&["HTTP 400"]);
    daemon
        .cli(&["vdisk", "resize", "keep", "--size", "100G"])
        .assert_error(&["capacity", "HTTP 400"]);
    daemon
        .cli(&["vdisk", "resize", "keep", "--size", "1073745921"])
        .assert_error(&["multiple of 4 KiB", "HTTP 400"]);
    unchanged("bad resizes");

    // Sizes the CLI itself cannot parse never reach the daemon.
    let out = daemon.cli(&["vdisk", "create", "nope", "--size", "12XB"]);
    assert!(!out.status.success(), "--size 12XB accepted");
    assert!(out.stderr.contains("12XB"), "{}", out.stderr);
    unchanged("an unparsable size");

    // A vdisk exported over vhost-user cannot be deleted.
    daemon.cli_ok(&["vdisk", "export", "other", "--vhost"]);
    let exported = snapshot(&daemon);
    daemon
        .cli(&["vdisk", "delete", "other"])
        .assert_error(&["exported", "unexport", "HTTP 409"]);
    assert_eq!(
        snapshot(&daemon),
        exported,
        "a refused delete changed things"
    );
    daemon.cli_ok(&["vdisk", "unexport", "other", "--vhost"]);
    unchanged("export and unexport");
}

#[test]
fn cli_reports_an_unreachable_api_in_one_line() {
    // A port nothing listens on.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let api = format!("http://127.0.0.1:{port}");
    let out = run_cli(&["--api", &api, "status"]);
    out.assert_error(&["cannot reach the Basalt API", "is basaltd running"]);
}

/// `--api` takes a bare `HOST:PORT`, as `cluster status` shows a node's API.
#[test]
fn cli_takes_the_api_address_without_a_scheme() {
    let daemon = Daemon::start();
    let url = daemon.api_url();
    let bare = url.trim_start_matches("http://");
    assert_ne!(bare, url, "the daemon's API URL has a scheme");
    let out = run_cli(&["--json", "--api", bare, "vdisk", "list"]);
    assert!(out.status.success(), "{}", out.stderr);
    let list: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(list, json!([]));
}

/// Method, path, body (content type, text), expected status, words the
/// error must contain.
type HttpCase = (
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
    u16,
    Vec<&'static str>,
);

#[test]
fn bad_http_requests_are_refused_and_change_nothing() {
    let daemon = Daemon::start();
    daemon.create_vdisk("keep", "1G");
    let before = snapshot(&daemon);
    const JSON: &str = "application/json";

    let cases: Vec<HttpCase> = vec![
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, "{bad")),
            400,
            vec!["JSON"],
        ),
        ("POST", "/api/v1/vdisks", Some((JSON, "")), 400, vec![]),
        ("POST", "/api/v1/vdisks", Some((JSON, "[]")), 400, vec![]),
        ("POST", "/api/v1/vdisks", Some((JSON, "null")), 400, vec![]),
        (
            "POST",
            "/api/v1/vdisks",
            Some(("text/plain", r#"{"name":"t","size":4096}"#)),
            400,
            vec!["Content-Type"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t","size":4096,"colour":3}"#)),
            400,
            vec!["unknown field", "colour"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t","size":4096,"rf":3}"#)),
            400,
            vec!["replication factor 3 needs 3 nodes"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t","size":4096,"rf":0}"#)),
            400,
            vec!["replication factor must be 1 to 3"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t"}"#)),
            400,
            vec!["size"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t","size":-4096}"#)),
            400,
            vec!["size"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t","size":"1G"}"#)),
            400,
            vec!["size"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t","size":18446744073709551615}"#)),
            400,
            vec![],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t","size":18446744073709551616}"#)),
            400,
            vec![],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"keep","size":4096}"#)),
            409,
            vec!["already exists"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"","size":4096}"#)),
            400,
            vec!["name"],
        ),
        (
            "POST",
            "/api/v1/vdisks",
            Some((JSON, r#"{"name":"t","size":0}"#)),
            400,
            vec!["size"],
        ),
        (
            "POST",
            "/api/v1/vdisks/keep/resize",
            Some((JSON, r#"{"size":1073741824,"force":true}"#)),
            400,
            vec!["unknown field", "force"],
        ),
        (
            "POST",
            "/api/v1/vdisks/keep/resize",
            Some((JSON, "{}")),
            400,
            vec!["size"],
        ),
        (
            "POST",
            "/api/v1/vdisks/keep/resize",
            Some((JSON, r#"{"size":4096}"#)),
            400,
            vec!["shrink"],
        ),
        (
            "POST",
            "/api/v1/vdisks/ghost/resize",
            Some((JSON, r#"{"size":1073741824}"#)),
            404,
            vec!["ghost"],
        ),
        ("GET", "/api/v1/vdisks/ghost", None, 404, vec!["ghost"]),
        ("DELETE", "/api/v1/vdisks/ghost", None, 404, vec!["ghost"]),
        (
            "DELETE",
            "/api/v1/vdisks/keep/vhost",
            None,
            404,
            vec!["not exported"],
        ),
        ("GET", "/api/v1/nope", None, 404, vec!["no such API path"]),
        ("GET", "/api/v2/vdisks", None, 404, vec!["no such API path"]),
        ("GET", "/api/v1/vdisks/keep/extra/parts", None, 404, vec![]),
    ];
    for (method, path, body, expect, words) in cases {
        let answer = daemon.http(method, path, body);
        let what = format!("{method} {path} {body:?}");
        assert_eq!(answer.status, expect, "{what}: {answer:?}");
        assert_eq!(
            answer.content_type.as_deref(),
            Some("application/json"),
            "{what}: errors are JSON: {answer:?}"
        );
        let error = answer.json();
        let line = error["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no `error` string in {error}"));
        assert!(!line.is_empty() && !line.contains('\n'), "{what}: {line:?}");
        for word in words {
            assert!(line.contains(word), "{what}: error lacks {word:?}: {line}");
        }
        assert_eq!(snapshot(&daemon), before, "{what} changed the vdisks");
    }

    // Wrong methods: 405 with the allowed ones.
    for (method, path) in [
        ("PUT", "/api/v1/vdisks"),
        ("DELETE", "/api/v1/vdisks"),
        ("PATCH", "/api/v1/vdisks/keep"),
        ("PUT", "/api/v1/vdisks/keep"),
        ("GET", "/api/v1/vdisks/keep/resize"),
        ("POST", "/api/v1/status"),
        ("DELETE", "/api/v1/health"),
    ] {
        let answer = daemon.http(method, path, Some((JSON, "{}")));
        assert_eq!(answer.status, 405, "{method} {path}: {answer:?}");
        assert_eq!(
            snapshot(&daemon),
            before,
            "{method} {path} changed the vdisks"
        );
    }
    // The vdisk is intact and still usable.
    let v = daemon.cli_json(&["vdisk", "show", "keep"]);
    assert_eq!(v["size"], json!(1u64 << 30));
}

/// Every error is documented as a JSON body with one line, but axum's
/// method-not-allowed answer has an empty body.
#[test]
fn wrong_method_answers_with_a_json_error() {
    let daemon = Daemon::start();
    let answer = daemon.http("PUT", "/api/v1/vdisks", Some(("application/json", "{}")));
    assert_eq!(answer.status, 405);
    let error = answer.json();
    assert!(error["error"].is_string(), "{error}");
}

#[test]
fn vdisk_show_json_has_name_size_rf_and_state() {
    let daemon = Daemon::start();
    let created = daemon.create_vdisk("shown", "256M");
    let v = daemon.cli_json(&["vdisk", "show", "shown"]);
    assert_eq!(v["name"], json!("shown"), "{v}");
    assert_eq!(v["size"], json!(256u64 << 20), "size is in bytes: {v}");
    assert_eq!(v["rf"], json!(1), "{v}");
    assert_eq!(v["state"], json!("healthy"), "{v}");
    assert_eq!(
        v["nbd_uri"],
        json!(daemon.nbd_uri("shown")),
        "the NBD URI names the daemon's port: {v}"
    );
    assert_eq!(v["vhost_socket"], Value::Null, "{v}");
    assert_eq!(created, v, "create and show describe the vdisk the same");

    // The list agrees, and a resize shows.
    let list = daemon.cli_json(&["vdisk", "list"]);
    assert_eq!(list, json!([v.clone()]));
    let grown = daemon.cli_json(&["vdisk", "resize", "shown", "--size", "512M"]);
    assert_eq!(grown["size"], json!(512u64 << 20));
    assert_eq!(
        daemon.cli_json(&["vdisk", "show", "shown"])["size"],
        json!(512u64 << 20)
    );
    let mut nbd = daemon.nbd("shown");
    assert_eq!(nbd.size, 512 << 20, "NBD sees the new size");
    // The grown part is usable.
    nbd.write((512 << 20) - 4096, &[0x6b; 4096], true)
        .expect("write at the new end");
    assert_eq!(
        nbd.read((512 << 20) - 8192, 8192)
            .expect("read the new end"),
        [vec![0u8; 4096], vec![0x6b; 4096]].concat()
    );
    nbd.disconnect();

    // Status and disk list in JSON.
    let status = daemon.cli_json(&["status"]);
    assert_eq!(status["vdisks"], json!(1), "{status}");
    assert_eq!(status["health"], json!("healthy"), "{status}");
    assert!(status["io"]["checksum_errors"].is_u64(), "{status}");
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_eq!(disks.as_array().map(Vec::len), Some(1), "{disks}");
    assert_eq!(disks[0]["path"], json!(daemon.disk.display().to_string()));
    assert_eq!(disks[0]["state"], json!("online"));

    // Delete, then it is gone.
    let deleted = daemon.cli_json(&["vdisk", "delete", "shown"]);
    assert_eq!(deleted, json!({"deleted": "shown"}));
    daemon
        .cli(&["vdisk", "show", "shown"])
        .assert_error(&["no vdisk named \"shown\"", "HTTP 404"]);
    assert_eq!(daemon.cli_json(&["vdisk", "list"]), json!([]));
}

#[test]
fn second_daemon_on_the_same_data_dir_or_disk_is_refused() {
    let daemon = Daemon::start();
    daemon.create_vdisk("mine", "64M");
    let mut nbd = daemon.nbd("mine");
    nbd.write(0, &[0x5a; 4096], true).expect("write");

    // Same data dir and disk, other ports.
    let mut args = daemon.args();
    let api = args
        .iter()
        .position(|a| a == "--api")
        .expect("--api in args");
    args[api + 1] = format!("127.0.0.1:{}", common::pick_port());
    let nbd_at = args
        .iter()
        .position(|a| a == "--nbd")
        .expect("--nbd in args");
    args[nbd_at + 1] = format!("127.0.0.1:{}", common::pick_port());
    let listen_at = args
        .iter()
        .position(|a| a == "--listen")
        .expect("--listen in args");
    args[listen_at + 1] = format!("127.0.0.1:{}", common::pick_port());
    let text = daemon_must_refuse(&args);
    assert!(
        text.contains("already open") || text.contains("in use") || text.contains("lock"),
        "no clear reason for refusing a second daemon on the same data dir:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");

    // Another data dir, same disk.
    let other = common::test_dir("second");
    let data = args
        .iter()
        .position(|a| a == "--data-dir")
        .expect("--data-dir in args");
    args[data + 1] = other.path().join("data").display().to_string();
    let text = daemon_must_refuse(&args);
    assert!(
        text.contains("in use by another process"),
        "no clear reason for refusing a disk in use:\n{text}"
    );
    assert!(text.contains(&daemon.disk.display().to_string()), "{text}");

    // The first daemon did not notice.
    assert_eq!(nbd.read(0, 4096).expect("read"), vec![0x5a; 4096]);
    nbd.disconnect();
    assert_eq!(daemon.status().vdisks, 1);
}

#[test]
fn disk_of_another_node_needs_force_claim() {
    let mut first = Daemon::start_with(DaemonOptions {
        disk_size: "256M",
        ..DaemonOptions::default()
    });
    first.create_vdisk("theirs", "64M");
    let mut nbd = first.nbd("theirs");
    nbd.write(1 << 20, &[0x77; 8192], false).expect("write");
    nbd.flush().expect("flush");
    nbd.disconnect();
    let first_node = first.status().node_id;
    first.stop();

    // A copy of the disk, offered to a node with another data dir.
    let dir = common::test_dir("foreign");
    let copy = dir.path().join("copy.img");
    common::run_tool_ok(
        "cp",
        &[
            "--sparse=always",
            &first.disk.display().to_string(),
            &copy.display().to_string(),
        ],
    );
    let options = DaemonOptions {
        disk_path: Some(copy.clone()),
        ..DaemonOptions::default()
    };
    let data_dir = dir.path().join("data");
    let args = vec![
        "--data-dir".to_string(),
        data_dir.display().to_string(),
        "--disk".to_string(),
        copy.display().to_string(),
        "--api".to_string(),
        format!("127.0.0.1:{}", common::pick_port()),
        "--nbd".to_string(),
        format!("127.0.0.1:{}", common::pick_port()),
        "--listen".to_string(),
        format!("127.0.0.1:{}", common::pick_port()),
    ];
    let head = |path: &std::path::Path| {
        let mut head = vec![0u8; 2 << 20];
        let mut file = std::fs::File::open(path).expect("open the copy");
        std::io::Read::read_exact(&mut file, &mut head).expect("read the copy");
        head
    };
    let before = head(&copy);
    assert_eq!(&before[..8], b"BASALTDK", "the copy has no label");
    let text = daemon_must_refuse(&args);
    assert!(
        text.contains(&first_node) && text.contains("--force-claim"),
        "refusal does not name the owner and the way out:\n{text}"
    );
    assert!(head(&copy) == before, "the refused disk was modified");

    // With --force-claim a new node takes it over, empty.
    let mut claimed_options = options;
    claimed_options.extra = vec!["--force-claim".into()];
    let claimer = Daemon::start_with(claimed_options);
    assert_ne!(claimer.status().node_id, first_node);
    assert_eq!(claimer.cli_json(&["vdisk", "list"]), json!([]));
    let disks = claimer.cli_json(&["disk", "list"]);
    assert_eq!(disks[0]["path"], json!(copy.display().to_string()));
    assert_eq!(disks[0]["state"], json!("online"));
    drop(claimer);

    // The original node still owns its own disk and data.
    first.restart();
    let mut nbd = first.nbd("theirs");
    assert_eq!(nbd.read(1 << 20, 8192).expect("read"), vec![0x77; 8192]);
    nbd.disconnect();
}

#[test]
fn taken_ports_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = listener.local_addr().expect("addr").port();
    let dir = common::test_dir("ports");
    for (flag, what) in [
        ("--api", "the API"),
        ("--nbd", "NBD"),
        ("--listen", "peers"),
    ] {
        let mut args = vec![
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
        ];
        let at = args.iter().position(|a| a == flag).expect("flag in args");
        args[at + 1] = format!("127.0.0.1:{taken}");
        let text = daemon_must_refuse(&args);
        assert!(
            text.contains(&format!("cannot listen for {what} on 127.0.0.1:{taken}"))
                && text.contains("Address already in use"),
            "{flag} on a taken port: unclear refusal:\n{text}"
        );
    }
    drop(listener);
}

#[test]
fn deleting_a_vdisk_in_use_cuts_its_clients_off_from_a_new_one() {
    let daemon = Daemon::start();
    let slots_total = daemon.cli_json(&["disk", "list"])[0]["slots_total"].clone();
    daemon.create_vdisk("reused", "16M");
    let mut old = daemon.nbd("reused");
    old.write(0, &[0x31; 8192], true)
        .expect("write before delete");
    old.write(4 << 20, &[0x31; 1 << 20], true)
        .expect("write before delete");
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_ne!(
        disks[0]["slots_free"], slots_total,
        "writes allocated nothing"
    );

    daemon.cli_ok(&["vdisk", "delete", "reused"]);
    // The old connection's I/O now fails.
    assert!(
        old.write(4096 * 4, &[0x32; 4096], true).is_err(),
        "a write to a deleted vdisk succeeded"
    );
    assert!(
        old.read(0, 4096).is_err(),
        "a read of a deleted vdisk succeeded"
    );
    // Its space is free again.
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_eq!(
        disks[0]["slots_free"], slots_total,
        "space of a deleted vdisk: {disks}"
    );

    // A new vdisk of the same name starts empty, and the old connection
    // cannot reach it.
    daemon.create_vdisk("reused", "16M");
    let _ = old.write(8192 * 4, &[0x33; 4096], true);
    let _ = old.flush();
    let mut new = daemon.nbd("reused");
    let data = new.read_all(0, 16 << 20).expect("read the new vdisk");
    if let Some(i) = data.iter().position(|&b| b != 0) {
        panic!(
            "the new vdisk `reused` holds data at byte {i} ({:#x}) from the deleted one or its old client",
            data[i]
        );
    }
    new.disconnect();
    drop(old);
}

#[test]
fn concurrent_creates_of_one_name_make_one_vdisk() {
    let daemon = Daemon::start();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let daemon = &daemon;
                s.spawn(move || {
                    let body = format!(r#"{{"name":"race","size":{}}}"#, (i + 1) * 4096 * 256);
                    daemon
                        .http("POST", "/api/v1/vdisks", Some(("application/json", &body)))
                        .status
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 409).count(),
        7,
        "{statuses:?}"
    );
    let list = daemon.cli_json(&["vdisk", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // Different names at once all succeed, with distinct ids.
    let ids: Vec<u64> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let daemon = &daemon;
                s.spawn(move || {
                    let body = format!(r#"{{"name":"many{i}","size":1048576}}"#);
                    let answer =
                        daemon.http("POST", "/api/v1/vdisks", Some(("application/json", &body)));
                    assert_eq!(answer.status, 201, "{answer:?}");
                    answer.json()["id"].as_u64().expect("id")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 8, "ids {ids:?}");
    assert_eq!(daemon.status().vdisks, 9);
}

#[test]
fn without_disk_flags_the_node_uses_its_known_disks_or_a_default_one() {
    // Known disks: started with --disk, restarted without.
    let mut daemon = Daemon::start_with(DaemonOptions {
        disk_size: "256M",
        ..DaemonOptions::default()
    });
    daemon.create_vdisk("known", "8M");
    let mut client = daemon.nbd("known");
    client.write(0, &[0x4b; 4096], true).expect("write");
    client.disconnect();
    let disks = daemon.cli_json(&["disk", "list"]);
    daemon.stop();
    daemon.options_mut().no_disk_flag = true;
    daemon.restart();
    let again = daemon.cli_json(&["disk", "list"]);
    assert_eq!(again.as_array().map(Vec::len), Some(1), "{again}");
    for field in ["id", "path", "size", "state", "slots_total"] {
        assert_eq!(again[0][field], disks[0][field], "{field}: {again}");
    }
    let mut client = daemon.nbd("known");
    assert_eq!(client.read(0, 4096).expect("read"), vec![0x4b; 4096]);
    client.disconnect();
    drop(daemon);

    // A new node without --disk gets one default file disk in its data dir.
    let daemon = Daemon::start_with(DaemonOptions {
        no_disk_flag: true,
        ..DaemonOptions::default()
    });
    let disks = daemon.cli_json(&["disk", "list"]);
    assert_eq!(disks.as_array().map(Vec::len), Some(1), "{disks}");
    let path = disks[0]["path"].as_str().expect("path");
    assert!(
        path.starts_with(&daemon.data_dir.display().to_string()),
        "default disk {path} is not under the data dir"
    );
    assert_eq!(disks[0]["state"], json!("online"));
    assert_eq!(disks[0]["size"], json!(16u64 << 30), "{disks}");
}

/// `basalt vm create NAME` with 64 MiB of memory, booting from its one disk.
fn create_vm_booting_from(daemon: &Daemon, name: &str, vdisk: &str) {
    daemon.cli_ok(&[
        "vm",
        "create",
        name,
        "--memory",
        "64M",
        "--disk",
        vdisk,
        "--boot-disk",
        vdisk,
    ]);
}

#[test]
fn bad_vm_requests_are_refused_and_change_nothing() {
    let daemon = Daemon::start();
    daemon.create_vdisk("d", "16M");
    let post = |path: &str, body: &str| daemon.http("POST", path, Some(("application/json", body)));
    let cases = [
        ("/api/v1/vms", "{", 400, "bad request"),
        (
            "/api/v1/vms",
            r#"{"name":"v","vcpus":1,"memory":268435456,"disks":["d"]}"#,
            400,
            "boot source",
        ),
        (
            "/api/v1/vms",
            r#"{"name":"v","vcpus":1,"memory":268435456,"disks":["d"],"boot_disk":"d","kernel":{"vdisk":"d","length":1}}"#,
            400,
            "not both",
        ),
        (
            "/api/v1/vms",
            r#"{"name":"v","vcpus":1,"memory":1000,"disks":["d"],"boot_disk":"d"}"#,
            400,
            "multiple of 1 MiB",
        ),
        (
            "/api/v1/vms",
            r#"{"name":"v","vcpus":0,"memory":268435456,"disks":["d"],"boot_disk":"d"}"#,
            400,
            "vCPUs",
        ),
        (
            "/api/v1/vms",
            r#"{"name":"v","vcpus":1,"memory":268435456,"disks":["d"],"boot_disk":"e"}"#,
            400,
            "must be one of the VM's disks",
        ),
        ("/api/v1/vms/nope/start", "{}", 404, "no VM named nope"),
        ("/api/v1/vms/nope/stop", "{}", 404, "no VM named nope"),
        (
            "/api/v1/vms/nope/migrate",
            r#"{"to":1}"#,
            404,
            "no VM named nope",
        ),
    ];
    for (path, body, status, needle) in cases {
        let answer = post(path, body);
        assert_eq!(answer.status, status, "{path} {body}: {}", answer.body);
        let error = answer.json()["error"].as_str().unwrap_or("").to_string();
        assert!(error.contains(needle), "{path} {body}: {error}");
    }
    // Stop options must be JSON.
    create_vm_booting_from(&daemon, "v", "d");
    let answer = post("/api/v1/vms/v/stop", "force");
    assert_eq!(answer.status, 400, "{}", answer.body);
    // Uploads: unknown vdisk, empty, larger than the vdisk.
    let put =
        |path: &str, body: &str| daemon.http("PUT", path, Some(("application/octet-stream", body)));
    assert_eq!(put("/api/v1/vdisks/nope/content", "x").status, 404);
    assert_eq!(put("/api/v1/vdisks/d/content", "").status, 400);
    daemon.create_vdisk("small", "4K");
    let big = "y".repeat(8192);
    let answer = put("/api/v1/vdisks/small/content", &big);
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("do not fit"), "{}", answer.body);
    // Console of a VM that never ran: empty. Unknown VM: 404.
    let chunk = daemon
        .http("GET", "/api/v1/vms/v/console?offset=0", None)
        .json();
    assert_eq!(chunk["data"], json!(""), "{chunk}");
    assert_eq!(
        daemon.http("GET", "/api/v1/vms/nope/console", None).status,
        404
    );
    assert_eq!(
        daemon
            .http("GET", "/api/v1/vms/v/console?offset=x", None)
            .status,
        400
    );
    // Nothing changed but the one VM created on purpose; it is stopped.
    let vms = daemon.cli_json(&["vm", "list"]);
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "{vms}");
    assert_eq!(vms[0]["state"], json!("stopped"));
    // The web console lists VMs from the same API.
    let page = daemon.http("GET", "/", None);
    assert!(page.body.contains("<h2>VMs</h2>") && page.body.contains("\"vms\""));
    daemon.cli_ok(&["vm", "delete", "v"]);
    assert_eq!(daemon.cli_json(&["vm", "list"]), json!([]));
}

#[test]
fn a_qemu_that_exits_while_starting_fails_the_start_at_once_and_says_why() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    // Stands in for a QEMU that refuses its options or cannot open a file.
    let fake = dir.path().join("fake-qemu");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'fake-qemu: cannot open the guest memory backend' >&2\nexit 1\n",
    )
    .expect("write the fake QEMU");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let daemon = Daemon::start_with(DaemonOptions {
        extra: vec![
            "--vm-accel".into(),
            "tcg".into(),
            "--qemu".into(),
            fake.display().to_string(),
        ],
        ..DaemonOptions::default()
    });
    daemon.create_vdisk("d", "16M");
    create_vm_booting_from(&daemon, "v", "d");
    let started = std::time::Instant::now();
    let out = daemon.cli(&["vm", "start", "v"]);
    let took = started.elapsed();
    assert!(!out.status.success(), "the start must fail: {}", out.stdout);
    assert!(
        out.stderr.contains("cannot open the guest memory backend"),
        "the error says what QEMU said: {}",
        out.stderr
    );
    // Not the whole 20 s QMP timeout.
    assert!(
        took < std::time::Duration::from_secs(10),
        "the failure took {took:?}"
    );
    let shown = daemon.cli_json(&["vm", "show", "v"]);
    assert_eq!(shown["state"], json!("failed"), "{shown}");
    // The vdisk is free again: its export went with the failed start.
    let vdisks = daemon.cli_json(&["vdisk", "list"]);
    assert!(
        vdisks.as_array().is_some_and(|all| all
            .iter()
            .all(|v| v["vhost_socket"].is_null() || v["vhost_socket"] == json!("-"))),
        "{vdisks}"
    );
}

/// An export made by hand comes back after a restart, unless a VM of the
/// cluster uses its vdisk by then: the VM's node serves it, and a second
/// export could hand its data to another writer.
#[test]
fn a_hand_made_export_is_not_restored_for_a_vdisk_a_vm_now_uses() {
    let mut daemon = Daemon::start();
    daemon.create_vdisk("kept", "16M");
    daemon.create_vdisk("taken", "16M");
    daemon.cli_ok(&["vdisk", "export", "kept", "--vhost"]);
    daemon.cli_ok(&["vdisk", "export", "taken", "--vhost"]);
    create_vm_booting_from(&daemon, "user", "taken");
    daemon.stop();
    daemon.restart();
    daemon.wait_for_vhost_export("kept");
    let taken_record = daemon.data_dir.join("vhost-exports/taken.export");
    common::wait_for(
        "taken's record is dropped",
        std::time::Duration::from_secs(30),
        || !taken_record.exists(),
    );
    assert_eq!(
        daemon.cli_json(&["vdisk", "show", "taken"])["vhost_socket"],
        Value::Null,
        "a vdisk a VM uses is not exported by hand again"
    );
    assert!(
        daemon
            .log_text()
            .contains("not exporting a vdisk by hand again: a VM uses it now"),
        "{}",
        daemon.log_tail(30)
    );
    assert!(daemon.data_dir.join("vhost-exports/kept.export").exists());
}

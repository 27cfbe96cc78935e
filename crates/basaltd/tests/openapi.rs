//! The OpenAPI document: what the daemon serves at `/api/openapi.json` is
//! what `basalt_control::api::openapi_json()` generates and what is checked
//! in as `docs/openapi.json`.
//!
//! After changing the API, regenerate the checked-in copy with
//! `BASALT_UPDATE_OPENAPI=1 cargo test -p basaltd --test openapi`.

mod common;

use common::{Daemon, workspace_root};

const UPDATE: &str = "BASALT_UPDATE_OPENAPI=1 cargo test -p basaltd --test openapi";

fn first_difference(a: &str, b: &str) -> String {
    for (i, (la, lb)) in a.lines().zip(b.lines()).enumerate() {
        if la != lb {
            return format!("line {}:\n  checked in: {la}\n  generated:  {lb}", i + 1);
        }
    }
    format!(
        "one is a prefix of the other ({} vs {} lines)",
        a.lines().count(),
        b.lines().count()
    )
}

#[test]
fn checked_in_openapi_document_is_current() {
    let generated = basalt_control::api::openapi_json();
    let path = workspace_root().join("docs/openapi.json");
    if std::env::var("BASALT_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, format!("{}\n", generated.trim_end()))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{} cannot be read ({e}); create it with `{UPDATE}`",
            path.display()
        )
    });
    assert!(
        checked_in.trim_end() == generated.trim_end(),
        "docs/openapi.json is out of date with the API; regenerate it with `{UPDATE}` \
         and commit it. First difference at {}",
        first_difference(&checked_in, &generated)
    );
}

#[test]
fn served_openapi_document_equals_checked_in_one() {
    let path = workspace_root().join("docs/openapi.json");
    let checked_in = if std::env::var("BASALT_UPDATE_OPENAPI").as_deref() == Ok("1") {
        // The other test is rewriting the file right now.
        basalt_control::api::openapi_json()
    } else {
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{} cannot be read ({e}); create it with `{UPDATE}`",
                path.display()
            )
        })
    };
    let daemon = Daemon::start();
    let answer = daemon.http("GET", "/api/openapi.json", None);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
    assert!(
        answer.body.trim_end() == checked_in.trim_end(),
        "the daemon serves another OpenAPI document than docs/openapi.json; regenerate \
         it with `{UPDATE}`. First difference at {}",
        first_difference(&checked_in, &answer.body)
    );

    // It is a real OpenAPI document describing the routes the CLI uses.
    let doc = answer.json();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not OpenAPI 3: {}",
        doc["openapi"]
    );
    for route in [
        "/api/v1/health",
        "/api/v1/status",
        "/api/v1/disks",
        "/api/v1/vdisks",
        "/api/v1/vdisks/{name}",
        "/api/v1/vdisks/{name}/resize",
        "/api/v1/vdisks/{name}/vhost",
    ] {
        assert!(
            doc["paths"][route].is_object(),
            "route {route} missing from the OpenAPI document"
        );
    }
    for schema in [
        "Vdisk",
        "CreateVdisk",
        "ResizeVdisk",
        "NodeStatus",
        "ErrorBody",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} missing from the OpenAPI document"
        );
    }
}

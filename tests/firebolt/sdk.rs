//! Conformance with a client nobody here wrote: the official Python SDK (firebolt-sdk,
//! pinned in scripts/firebolt-sdk/requirements.txt) against the protocol test server.
//! Where the SDK and the server disagree, the server is wrong.
//!
//! `scripts/test` installs the SDK into a cached virtualenv (scripts/firebolt-sdk/venv.sh)
//! and exports CDC_WORKER_FIREBOLT_SDK_PYTHON; run alone, the test looks for that venv and
//! prints why it is skipped when there is none.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::server::{Host, ProtocolServer, Reply, default_reply};

fn sdk_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CDC_WORKER_FIREBOLT_SDK_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("CDC_WORKER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cdc-worker")))?;
    let python = cache.join("firebolt-sdk-venv/bin/python");
    python.exists().then_some(python)
}

async fn run_sdk(envs: &[(&str, String)]) -> Option<Value> {
    let Some(python) = sdk_python() else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: the Firebolt SDK venv is missing (scripts/firebolt-sdk/venv.sh installs it; scripts/test does)"
        );
        return None;
    };
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/firebolt-sdk/conformance.py"
    );
    let mut command = tokio::process::Command::new(&python);
    command.arg(script).kill_on_drop(true);
    for (k, v) in envs {
        command.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the SDK finishes")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK script failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Some(serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON report"))
}

#[tokio::test]
async fn the_python_sdk_in_core_mode_agrees_with_the_server() {
    let server = ProtocolServer::core().await;
    server.respond(|s| {
        if s.body.starts_with("SELECT id, name FROM sdk_t") {
            Reply::rows(
                &[("id", "long"), ("name", "text null")],
                vec![vec![json!(1), json!("one")], vec![json!(2), json!("two")]],
            )
        } else {
            default_reply(s)
        }
    });
    let Some(report) = run_sdk(&[
        ("FB_MODE", "core".into()),
        ("FB_URL", server.url.clone()),
        ("FB_DATABASE", "db".into()),
    ])
    .await
    else {
        return;
    };
    // What the SDK returned.
    assert_eq!(report["rows"], json!([[1, "one"], [2, "two"]]), "{report}");
    assert_eq!(report["columns"], json!(["id", "name"]));
    assert_eq!(report["python_types"], json!(["int", "str"]));
    assert_eq!(report["select_1"], json!(1));
    assert_eq!(report["in_transaction"], json!(true));
    assert_eq!(report["in_transaction_after_commit"], json!(false));
    assert_eq!(report["in_transaction_after_rollback"], json!(false));
    let failures = &report["failures"];
    for (name, text) in [
        ("missing_table", "does not exist"),
        (
            "nullable_primary_index",
            "cannot be used in a primary index",
        ),
        (
            "commit_outside_transaction",
            "no transaction is in progress",
        ),
    ] {
        let message = failures[name]["message"].as_str().unwrap_or_default();
        assert!(message.contains(text), "{name}: {}", failures[name]);
    }

    // What the server holds: the table the SDK created, its committed DDL only.
    let (columns, index) = server.table("public", "sdk_t").expect("created");
    assert_eq!(
        columns,
        [
            ("id".to_string(), "BIGINT".to_string(), false),
            ("name".to_string(), "TEXT".to_string(), true)
        ]
    );
    assert_eq!(index, ["id"]);
    assert!(
        server.table("public", "sdk_rolled_back").is_none(),
        "rolled back"
    );
    assert_eq!(server.open_transactions(), 0);

    // What the SDK sent: the database parameter, JSON_Compact, protocol 2.4, and inside its
    // transaction the id and the sequence id the server handed out.
    let statements = server.statements();
    for s in &statements {
        assert_eq!(s.param("database"), Some("db"), "{}", s.body);
        assert_eq!(s.param("output_format"), Some("JSON_Compact"));
        assert_eq!(
            s.header("firebolt-protocol-version").as_deref(),
            Some("2.4")
        );
    }
    let insert = statements
        .iter()
        .find(|s| s.body.contains("VALUES (3, 'three')"))
        .expect("the transaction's INSERT");
    assert!(
        insert.param("transaction_id").is_some(),
        "{:?}",
        insert.params
    );
    assert_eq!(insert.param("transaction_sequence_id"), Some("0"));
    let commit = statements
        .iter()
        .find(|s| s.body == "COMMIT")
        .expect("COMMIT");
    assert_eq!(
        commit.param("transaction_id"),
        insert.param("transaction_id")
    );
    assert_eq!(commit.param("transaction_sequence_id"), Some("1"));
}

/// Cloud mode: the SDK takes any API URL (scheme and port kept) and derives the token host
/// by replacing its first label, so the test hosts are names the script resolves to the
/// server. It follows engineUrl to the system engine and runs USE DATABASE / USE ENGINE
/// there; the user engine it then derives from Firebolt-Update-Endpoint is `https://<host>`
/// with the port dropped (base_cursor.py `_parse_update_endpoint`), which a plain-HTTP
/// test server on a random port cannot be: the SDK is followed up to that URL.
#[tokio::test]
async fn the_python_sdk_in_cloud_mode_agrees_with_the_server_up_to_the_user_engine() {
    let server = ProtocolServer::cloud().await;
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let Some(report) = run_sdk(&[
        ("FB_MODE", "cloud".into()),
        ("FB_URL", format!("http://api.fbtest:{port}")),
        ("FB_DATABASE", "db".into()),
        ("FB_CLIENT_ID", "svc-id".into()),
        ("FB_CLIENT_SECRET", crate::support::SECRET.into()),
        ("FB_ACCOUNT", "acme".into()),
        ("FB_ENGINE", "etl".into()),
    ])
    .await
    else {
        return;
    };
    assert!(report.get("connect_error").is_none(), "{report}");
    assert_eq!(
        report["engine_url"],
        json!("https://127.0.0.1"),
        "the SDK keeps the host of Firebolt-Update-Endpoint only: {report}"
    );
    assert_eq!(report["init_parameters"]["engine"], json!("etl"));
    assert_eq!(report["init_parameters"]["database"], json!("db"));
    let seen = server.seen();
    let token = seen
        .iter()
        .find(|s| s.path == "/oauth/token")
        .expect("a token request");
    assert!(
        token
            .body
            .contains("audience=https%3A%2F%2Fapi.firebolt.io"),
        "{}",
        token.body
    );
    assert_eq!(
        token.header("host").as_deref(),
        Some(format!("id.fbtest:{port}").as_str()),
        "the token host is the API host's first label replaced by id"
    );
    assert!(
        seen.iter()
            .any(|s| s.path == "/web/v3/account/acme/engineUrl"
                && s.header("authorization").as_deref() == Some("Bearer token-1")),
        "engineUrl with the token"
    );
    let system: Vec<_> = seen.iter().filter(|s| s.host == Host::System).collect();
    assert_eq!(
        system.iter().map(|s| s.body.as_str()).collect::<Vec<_>>(),
        ["USE DATABASE \"db\"", "USE ENGINE \"etl\""]
    );
    for s in &system {
        assert_eq!(
            s.param("account_id"),
            Some("acc-1"),
            "engineUrl's parameters"
        );
    }
}

//! The HTTP client against the protocol test server: what it sends, when it retries,
//! how it authenticates, and that it never lets a credential out.

use std::time::{Duration, Instant};

use cdc_worker::config::Secret;
use cdc_worker::warehouse::WarehouseError;
use cdc_worker::warehouse::firebolt::client::Statement;
use cdc_worker::warehouse::firebolt::error::FireboltError;

use crate::server::{Host, ProtocolServer, Reply};
use crate::support::{SECRET, client, cloud_config, core_config};

fn select(label: &str) -> Statement {
    Statement::new("select", label, "SELECT 1")
}

fn insert() -> Statement {
    Statement::new("ledger", "b1:01:ledger", "INSERT INTO t VALUES (1)")
}

#[tokio::test]
async fn cloud_authenticates_discovers_the_engine_and_applies_use_headers() {
    let server = ProtocolServer::cloud().await;
    let c = client(cloud_config(&server));
    c.execute(&select("b1:01:select")).await.unwrap();
    c.execute(&select("b1:02:select")).await.unwrap();

    let seen = server.seen();
    let route: Vec<(String, Host, String)> = seen
        .iter()
        .map(|s| (s.method.clone(), s.host, s.path.clone()))
        .collect();
    assert_eq!(
        route,
        vec![
            ("POST".into(), Host::Api, "/oauth/token".into()),
            (
                "GET".into(),
                Host::Api,
                "/web/v3/account/acme/engineUrl".into()
            ),
            ("POST".into(), Host::System, "/".into()),
            ("POST".into(), Host::System, "/".into()),
            ("POST".into(), Host::Engine, "/".into()),
            ("POST".into(), Host::Engine, "/".into()),
        ],
        "one token and one engine resolution for both statements, each on its host"
    );
    let token_form = &seen[0].body;
    assert!(
        token_form.contains("grant_type=client_credentials")
            && token_form.contains("client_id=svc-id"),
        "{token_form}"
    );
    assert!(
        token_form.contains("audience=https%3A%2F%2Fapi.firebolt.io"),
        "{token_form}"
    );
    assert_eq!(
        seen[1].header("authorization").as_deref(),
        Some("Bearer token-1")
    );
    assert_eq!(seen[2].body, "USE DATABASE \"db\"");
    assert_eq!(
        seen[2].param("account_id"),
        Some("acc-1"),
        "engineUrl's query string is sent on"
    );
    assert_eq!(seen[3].body, "USE ENGINE \"etl\"");
    assert_eq!(
        seen[3].param("database"),
        Some("db"),
        "Firebolt-Update-Parameters applied"
    );
    for statement in &seen[4..] {
        assert_eq!(statement.body, "SELECT 1");
        assert_eq!(statement.param("database"), Some("db"));
        assert_eq!(
            statement.param("engine"),
            Some("etl"),
            "Firebolt-Update-Endpoint's params"
        );
        assert_eq!(statement.param("account_id"), Some("acc-1"));
        assert_eq!(statement.param("output_format"), Some("JSON_Compact"));
        assert_eq!(
            statement.header("firebolt-protocol-version").as_deref(),
            Some("2.4")
        );
        assert_eq!(
            statement.header("authorization").as_deref(),
            Some("Bearer token-1"),
            "the token is reused"
        );
        assert!(
            statement
                .header("user-agent")
                .unwrap()
                .starts_with("cdc-worker/")
        );
    }
    assert_eq!(seen[4].param("query_label"), Some("b1:01:select"));
    assert_eq!(seen[5].param("query_label"), Some("b1:02:select"));
    assert_eq!(server.script(|s| s.tokens_issued), 1);
}

#[tokio::test]
async fn core_sends_the_database_parameter_and_no_credentials() {
    let server = ProtocolServer::core().await;
    let c = client(core_config(&server));
    let result = c.execute(&select("l")).await.unwrap();
    assert_eq!(result.u64_at(0, 0).unwrap(), 1);
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "no token, no discovery: {seen:?}");
    assert_eq!(seen[0].path, "/");
    assert_eq!(seen[0].param("database"), Some("db"));
    assert_eq!(seen[0].header("authorization"), None);
}

#[tokio::test]
async fn an_expired_token_is_replaced_once_and_the_statement_sent_again() {
    let server = ProtocolServer::cloud().await;
    server.execute("CREATE TABLE t (a INTEGER NULL)");
    let c = client(cloud_config(&server));
    c.execute(&select("a")).await.unwrap();
    server.expire_token();
    server.clear();
    // Not idempotent: a 401 means it was not run, so it is sent again after re-auth.
    c.execute(&insert()).await.unwrap();
    let seen = server.seen();
    let engine: Vec<_> = seen.iter().filter(|s| s.host == Host::Engine).collect();
    assert_eq!(engine.len(), 2);
    assert_eq!(
        engine[0].header("authorization").as_deref(),
        Some("Bearer token-1")
    );
    assert_eq!(
        engine[1].header("authorization").as_deref(),
        Some("Bearer token-2")
    );
    assert_eq!(seen.iter().filter(|s| s.path == "/oauth/token").count(), 1);

    // A token that is refused again is an authentication error after one retry.
    server.respond(|_| Reply::status(401, r#"{"kind":"unauthenticated"}"#));
    server.clear();
    let err = c.execute(&select("b")).await.unwrap_err();
    assert!(matches!(err, FireboltError::Auth { .. }), "{err}");
    assert_eq!(
        server.statements().len(),
        2,
        "one re-authentication, not a loop"
    );
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() {
    let server = ProtocolServer::cloud().await;
    server.script(|s| s.token_lifetime_s = 1);
    let c = client(cloud_config(&server));
    c.execute(&select("a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.execute(&select("b")).await.unwrap();
    let engine: Vec<_> = server
        .seen()
        .into_iter()
        .filter(|s| s.host == Host::Engine)
        .collect();
    assert_eq!(
        engine.len(),
        2,
        "no request was refused: the token was renewed first"
    );
    assert_eq!(
        engine[1].header("authorization").as_deref(),
        Some("Bearer token-2")
    );
}

#[tokio::test]
async fn errors_with_http_200_are_sql_errors_with_the_server_description() {
    let server = ProtocolServer::core().await;
    server.fault(Reply::error(200, "Column \"nope\" does not exist"));
    let c = client(core_config(&server));
    let err = c.execute(&select("x")).await.unwrap_err();
    assert_eq!(
        err.sql_description().as_deref(),
        Some("Column \"nope\" does not exist")
    );
    assert_eq!(err.step(), "select");
    assert!(matches!(WarehouseError::from(err), WarehouseError::Sql(_)));
    assert_eq!(server.statements().len(), 1, "SQL errors are not retried");
}

#[tokio::test]
async fn rate_limits_honour_retry_after() {
    let server = ProtocolServer::core().await;
    server.execute("CREATE TABLE t (a INTEGER NULL)");
    server.fault(Reply::status(429, "resources usage limit exceeded").header("Retry-After", "1"));
    let c = client(core_config(&server));
    let started = Instant::now();
    c.execute(&insert()).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        server.statements().len(),
        2,
        "a 429 was not run: even an INSERT is sent again"
    );

    // A Retry-After beyond what the client waits for goes up as RateLimited.
    server.fault(Reply::status(429, "slow down").header("Retry-After", "3600"));
    let err = c.execute(&select("y")).await.unwrap_err();
    assert!(
        matches!(err, FireboltError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(3600)),
        "{err}"
    );
    assert!(WarehouseError::from(err).is_retryable());
}

#[tokio::test]
async fn engine_not_running_503_is_retried_with_backoff_until_the_limit() {
    let server = ProtocolServer::core().await;
    server.execute("CREATE TABLE t (a INTEGER NULL)");
    server.fault(Reply::status(503, "engine is starting"));
    server.fault(Reply::status(503, "engine is starting"));
    let c = client(core_config(&server));
    c.execute(&insert()).await.unwrap();
    assert_eq!(server.statements().len(), 3);

    server.clear();
    server.respond(|_| Reply::status(503, "engine not running"));
    let err = c.execute(&select("z")).await.unwrap_err();
    assert!(
        matches!(err, FireboltError::EngineStopped { status: 503, .. }),
        "{err}"
    );
    assert_eq!(
        server.statements().len(),
        4,
        "max_retries = 3: four attempts"
    );
}

#[tokio::test]
async fn a_stopped_engine_is_reported_and_resolved_again_next_time() {
    let server = ProtocolServer::cloud().await;
    let c = client(cloud_config(&server));
    c.execute(&select("a")).await.unwrap();
    server.script(|s| s.engine_stopped = true);
    let err = c.execute(&select("b")).await.unwrap_err();
    assert!(
        matches!(err, FireboltError::EngineStopped { status: 404, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("is stopped"), "{err}");
    assert!(matches!(
        WarehouseError::from(err),
        WarehouseError::Unavailable(_)
    ));
    server.script(|s| s.engine_stopped = false);
    server.clear();
    c.execute(&select("c")).await.unwrap();
    let hosts: Vec<Host> = server.seen().iter().map(|s| s.host).collect();
    assert_eq!(
        hosts,
        vec![Host::Api, Host::System, Host::System, Host::Engine],
        "the engine is resolved again"
    );
}

#[tokio::test]
async fn slow_replies_time_out_and_only_idempotent_statements_are_sent_again() {
    let server = ProtocolServer::core().await;
    server.execute("CREATE TABLE t (a INTEGER NULL)");
    let mut config = core_config(&server);
    config.request_timeout = Duration::from_millis(300);
    let c = client(config);

    server
        .fault(Reply::rows(&[("x", "int")], vec![vec![1.into()]]).delayed(Duration::from_secs(2)));
    c.execute(&select("slow")).await.unwrap();
    assert_eq!(server.statements().len(), 2, "the SELECT was sent again");

    server.clear();
    server.fault(Reply::empty().delayed(Duration::from_secs(2)));
    let err = c.execute(&insert()).await.unwrap_err();
    assert!(matches!(err, FireboltError::Timeout { .. }), "{err}");
    assert_eq!(
        server.statements().len(),
        1,
        "an INSERT that may have run is never sent twice"
    );

    server.clear();
    server.fault(Reply::status(504, "gateway timeout"));
    assert!(c.execute(&insert()).await.is_err());
    assert_eq!(server.statements().len(), 1);
    server.clear();
    server.fault(Reply::status(502, "bad gateway"));
    c.execute(&Statement::new(
        "drop-stage",
        "l",
        "DROP TABLE IF EXISTS \"t\"",
    ))
    .await
    .unwrap();
    assert_eq!(server.statements().len(), 2, "DROP IF EXISTS is idempotent");
}

#[tokio::test]
async fn statements_in_flight_are_bounded_across_a_shared_client() {
    let server = ProtocolServer::core().await;
    server.respond(|s| crate::server::default_reply(s).delayed(Duration::from_millis(150)));
    let mut config = core_config(&server);
    config.max_concurrent_statements = 2;
    let c = client(config);
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.execute(&select(&format!("t{i}"))).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(server.statements().len(), 6);
    assert_eq!(
        server.max_in_flight(),
        2,
        "never more than max_concurrent_statements at once"
    );
}

#[tokio::test]
async fn credentials_never_appear_in_errors_or_debug_output() {
    let server = ProtocolServer::cloud().await;
    // The server refuses the secret and echoes the request body back in its error.
    server.script(|s| s.client_secret = "another".into());
    let c = client(cloud_config(&server));
    let err = c.execute(&select("x")).await.unwrap_err();
    assert!(
        matches!(
            err,
            FireboltError::Auth {
                step: "authentication",
                ..
            }
        ),
        "{err}"
    );
    for text in [
        err.to_string(),
        format!("{err:?}"),
        WarehouseError::from(err.clone()).to_string(),
        format!("{c:?}"),
    ] {
        assert!(!text.contains(SECRET), "secret leaked: {text}");
    }
    assert_eq!(server.statements().len(), 0, "no statement without a token");

    // With a valid token, neither the client's Debug nor errors show it.
    server.script(|s| s.client_secret = SECRET.into());
    c.execute(&select("y")).await.unwrap();
    server.fault(Reply::error(200, "boom"));
    let err = c.execute(&select("z")).await.unwrap_err();
    for text in [format!("{c:?}"), err.to_string(), format!("{err:?}")] {
        assert!(
            !text.contains("token-1") && !text.contains(SECRET),
            "credential leaked: {text}"
        );
    }

    // A long plain-text reply that echoes a COPY's key where the message is cut short:
    // no prefix of the key may survive.
    let key = "AKIAEXAMPLEKEYSECRETVALUE0123456789";
    let echo = format!("{}AWS_SECRET_ACCESS_KEY = '{key}'", "x".repeat(560));
    server.fault(Reply::status(400, &echo));
    let copy = Statement::new(
        "copy",
        "test:copy",
        format!("COPY t FROM 's3://b/' WITH CREDENTIALS = (AWS_SECRET_ACCESS_KEY = '{key}')"),
    )
    .with_secret(Secret::new(key));
    let err = c.execute(&copy).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("xxxx"),
        "the server's message is kept: {text}"
    );
    assert!(
        !text.contains(&key[..8]),
        "a prefix of the key leaked: {text}"
    );
}

#[tokio::test]
async fn the_token_endpoint_is_retried_on_429_and_5xx() {
    let server = ProtocolServer::cloud().await;
    server.script(|s| {
        s.token_faults
            .push_back(Reply::status(429, "").header("Retry-After", "0"));
        s.token_faults.push_back(Reply::status(500, "oops"));
    });
    let c = client(cloud_config(&server));
    c.execute(&select("x")).await.unwrap();
    assert_eq!(
        server
            .seen()
            .iter()
            .filter(|s| s.path == "/oauth/token")
            .count(),
        3
    );
}

#[tokio::test]
async fn connection_refused_is_a_connection_error_after_retries() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let server = ProtocolServer::core().await;
    let mut config = core_config(&server);
    config.target = cdc_worker::warehouse::firebolt::client::Target::Core { url };
    let err = client(config).execute(&insert()).await.unwrap_err();
    assert!(matches!(err, FireboltError::Connection { .. }), "{err}");
    assert!(WarehouseError::from(err).is_retryable());
}

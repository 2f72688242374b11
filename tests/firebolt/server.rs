//! A protocol test server: NOT Firebolt, but a local HTTP server that answers the way
//! Firebolt's documented protocol does, and refuses what Firebolt refuses:
//!
//! - the token endpoint, the account's `engineUrl` (the account matched as the SDKs send
//!   it, raw), `USE DATABASE` (of a database that exists) and `USE ENGINE` with their
//!   session headers; the API, the system engine and the user engine on separate hosts
//!   (ports), as in Cloud, where `engineUrl` and `Firebolt-Update-Endpoint` name hosts;
//! - every statement parsed with a real SQL parser and checked against the documented
//!   rules (`fbsql.rs`), a catalog of schemas and tables that DDL changes and that the
//!   worker's information_schema queries read, writes only to tables that exist;
//! - explicit transactions as a state machine: BEGIN inside a transaction and
//!   COMMIT/ROLLBACK outside one are errors ("explicit transactions" reference), the
//!   `transaction_id` and a `transaction_sequence_id` that advances with each statement
//!   travel as parameters and must be sent back, a statement after a failed one aborts,
//!   DDL and writes are private to the transaction until COMMIT, and a write/write conflict
//!   fails the COMMIT with Firebolt's text;
//! - errors as Firebolt sends them: JSON `errors` for SQL errors (HTTP 400), `text/plain`
//!   for a stopped engine (404) and an engine that does not run (503), 401 on an expired
//!   token, 429 with Retry-After, 500 wrapping an upstream 401, Update-Parameters in
//!   several header instances.
//!
//! It records every request so tests can assert what the client sent; a test can script
//! the reply of a statement (`respond`), and the statement is still checked first.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::fbsql::{self, ColumnSpec, Name, Parsed};

/// Which of the server's hosts a request reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Cloud API (token endpoint and engineUrl) or, in Core mode, Core itself.
    Api,
    /// The account's system engine (Cloud).
    System,
    /// The user engine (Cloud).
    Engine,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub host: Host,
    pub method: String,
    pub path: String,
    pub params: BTreeMap<String, String>,
    pub headers: HeaderMap,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// The statement kind from `query_label` (`<prefix>:<seq>:<kind>`).
    pub fn kind(&self) -> Option<&str> {
        self.param("query_label").and_then(|l| l.rsplit(':').next())
    }
}

/// A scripted reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
    /// Not a reply: the server answers as it would without a script.
    default: bool,
}

impl Reply {
    /// 200 with an empty body: what DDL and DML answer.
    pub fn empty() -> Self {
        Reply {
            status: 200,
            headers: vec![],
            body: String::new(),
            delay: Duration::ZERO,
            default: false,
        }
    }

    /// 200 with a JSON_Compact result.
    pub fn rows(meta: &[(&str, &str)], data: Vec<Vec<Value>>) -> Self {
        let body = json!({
            "query": {"query_id": "q-test"},
            "meta": meta.iter().map(|(n, t)| json!({"name": n, "type": t})).collect::<Vec<_>>(),
            "data": data,
            "rows": data.len(),
            "statistics": {"elapsed": 0.001, "rows_read": 0, "bytes_read": 0}
        });
        Reply {
            body: body.to_string(),
            ..Reply::empty()
        }
        .header("content-type", "application/json")
    }

    /// One row of counts, typed as Firebolt types bigints (sometimes as strings).
    pub fn counts(values: &[u64]) -> Self {
        let meta: Vec<(String, &str)> = (0..values.len())
            .map(|i| (format!("c{i}"), "long"))
            .collect();
        let meta: Vec<(&str, &str)> = meta.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        // Every other value as a string: the client must accept both.
        let row = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i % 2 == 0 {
                    json!(v)
                } else {
                    json!(v.to_string())
                }
            })
            .collect();
        Reply::rows(&meta, vec![row])
    }

    /// An `errors` array, with the given HTTP status (200 included).
    pub fn error(status: u16, description: &str) -> Self {
        Reply::sql_error(status, "42000", "QueryError", description)
    }

    pub fn sql_error(status: u16, code: &str, name: &str, description: &str) -> Self {
        let body = json!({
            "errors": [{"code": code, "name": name, "severity": "ERROR", "source": "User Error",
                        "description": description, "resolution": "", "helpLink": "",
                        "location": {"failingLine": 1, "startOffset": 0, "endOffset": 1}}],
            "query": {"query_id": "q-err"}
        });
        Reply {
            status,
            body: body.to_string(),
            ..Reply::empty()
        }
        .header("content-type", "application/json")
    }

    /// A non-2xx reply in plain text, as Firebolt sends some (the SDK reads `text/plain`
    /// errors as they are).
    pub fn status(status: u16, body: &str) -> Self {
        Reply {
            status,
            body: body.to_string(),
            ..Reply::empty()
        }
        .header("content-type", "text/plain; charset=utf-8")
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    fn is_success(&self) -> bool {
        (200..300).contains(&self.status) && !self.body.contains("\"errors\"")
    }
}

pub type Responder = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// What the server does; tests change it between calls.
pub struct Script {
    /// Firebolt Cloud (bearer tokens checked) or Core (no auth).
    pub cloud: bool,
    pub client_id: String,
    pub client_secret: String,
    pub account: String,
    pub engine: String,
    /// Databases that exist (`USE DATABASE` of another is an error).
    pub databases: BTreeSet<String>,
    /// What `SELECT version()` answers.
    pub version: String,
    pub token_lifetime_s: u64,
    /// The token the engine accepts (401 for any other).
    pub valid_token: Option<String>,
    pub tokens_issued: u32,
    /// Replies for the next token requests, before the normal answer.
    pub token_faults: VecDeque<Reply>,
    /// Replies for the next statements on the user engine (or Core), before anything.
    pub faults: VecDeque<Reply>,
    pub engine_stopped: bool,
    pub responder: Responder,
}

#[derive(Debug, Clone)]
struct Table {
    columns: Vec<ColumnSpec>,
    primary_index: Vec<String>,
    /// Bumped by every committed write: a transaction that wrote the table conflicts at
    /// COMMIT when another committed since it started.
    version: u64,
}

#[derive(Debug, Clone, Default)]
struct Catalog {
    schemas: BTreeSet<String>,
    tables: BTreeMap<Name, Table>,
}

struct Transaction {
    sequence: u64,
    aborted: bool,
    /// The catalog as this transaction sees it.
    working: Catalog,
    /// Tables it wrote or changed, with their version when it started.
    written: BTreeMap<Name, Option<u64>>,
    started: Catalog,
}

/// What the server answered, or is about to.
enum Outcome {
    Rows(Reply),
    Error(String),
}

struct State {
    urls: BTreeMap<&'static str, String>,
    seen: Mutex<Vec<Seen>>,
    script: Mutex<Script>,
    catalog: Mutex<Catalog>,
    transactions: Mutex<HashMap<String, Transaction>>,
    next_transaction: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Statements that were cancelled because the client dropped the connection.
    cancelled: Mutex<Vec<String>>,
    /// Statements that ran to completion after the client was gone.
    completed_after_drop: Mutex<Vec<String>>,
}

pub struct ProtocolServer {
    /// The API (Cloud) or Core URL.
    pub url: String,
    state: Arc<State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ProtocolServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// In a responder: "no script for this statement", the server answers as it would.
pub fn default_reply(_seen: &Seen) -> Reply {
    Reply {
        default: true,
        ..Reply::empty()
    }
}

/// Firebolt's write/write conflict at COMMIT (as a real loader logged it).
pub const CONFLICT_TEXT: &str =
    "Transaction failed: detected 1 conflicts with 1 transactions on transaction commit";

impl ProtocolServer {
    pub async fn cloud() -> Self {
        Self::start(true).await
    }

    pub async fn core() -> Self {
        Self::start(false).await
    }

    async fn start(cloud: bool) -> Self {
        let mut listeners = Vec::new();
        let mut urls = BTreeMap::new();
        for name in ["api", "system", "engine"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            urls.insert(
                name,
                format!("http://{}", listener.local_addr().expect("addr")),
            );
            listeners.push((name, listener));
        }
        let mut catalog = Catalog::default();
        catalog.schemas.insert("public".into());
        let state = Arc::new(State {
            urls: urls.clone(),
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(Script {
                cloud,
                client_id: "svc-id".into(),
                client_secret: "svc-secret-do-not-print".into(),
                account: "acme".into(),
                engine: "etl".into(),
                databases: ["db", "firebolt"].iter().map(|s| s.to_string()).collect(),
                version: "4.28.28-0.20251208095930.8ab5df819266".into(),
                token_lifetime_s: 86_400,
                valid_token: None,
                tokens_issued: 0,
                token_faults: VecDeque::new(),
                faults: VecDeque::new(),
                engine_stopped: false,
                responder: Arc::new(default_reply),
            }),
            catalog: Mutex::new(catalog),
            transactions: Mutex::new(HashMap::new()),
            next_transaction: AtomicUsize::new(1),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            cancelled: Mutex::new(Vec::new()),
            completed_after_drop: Mutex::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        for (name, listener) in listeners {
            let host = match name {
                "api" => Host::Api,
                "system" => Host::System,
                _ => Host::Engine,
            };
            let app_state = state.clone();
            let app = axum::Router::new().fallback(
                move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                    let state = app_state.clone();
                    async move { handle(state, host, method, uri, headers, body).await }
                },
            );
            tasks.push(tokio::spawn(async move {
                axum::serve(listener, app)
                    .await
                    .expect("protocol test server");
            }));
        }
        ProtocolServer {
            url: urls["api"].clone(),
            state,
            tasks,
        }
    }

    pub fn script<T>(&self, f: impl FnOnce(&mut Script) -> T) -> T {
        f(&mut self.state.script.lock().unwrap())
    }

    pub fn respond(&self, responder: impl Fn(&Seen) -> Reply + Send + Sync + 'static) {
        self.script(|s| s.responder = Arc::new(responder));
    }

    pub fn fault(&self, reply: Reply) {
        self.script(|s| s.faults.push_back(reply));
    }

    /// The engine forgets the current token: the next request with it gets 401.
    pub fn expire_token(&self) {
        self.script(|s| s.valid_token = None);
    }

    /// Runs a statement against the catalog outside any transaction, as if another client
    /// sent it (tables a test needs, or a concurrent writer).
    pub fn execute(&self, sql: &str) {
        let parsed = fbsql::parse(sql).unwrap_or_else(|e| panic!("{e}: {sql}"));
        let mut catalog = self.state.catalog.lock().unwrap();
        let script = self.state.script.lock().unwrap();
        let mut written = BTreeMap::new();
        if let Outcome::Error(e) = run_statement(&parsed, &mut catalog, &mut written, &script) {
            panic!("{e}: {sql}");
        }
        for name in written.keys() {
            if let Some(t) = catalog.tables.get_mut(name) {
                t.version += 1;
            }
        }
    }

    /// A table's columns as (name, type, nullable) and its primary index, if it exists.
    #[allow(clippy::type_complexity)]
    pub fn table(
        &self,
        schema: &str,
        table: &str,
    ) -> Option<(Vec<(String, String, bool)>, Vec<String>)> {
        let catalog = self.state.catalog.lock().unwrap();
        catalog
            .tables
            .get(&Name {
                schema: schema.into(),
                table: table.into(),
            })
            .map(|t| {
                (
                    t.columns
                        .iter()
                        .map(|c| (c.name.clone(), c.ty.clone(), c.nullable))
                        .collect(),
                    t.primary_index.clone(),
                )
            })
    }

    /// Transactions still open on the server.
    pub fn open_transactions(&self) -> usize {
        self.state.transactions.lock().unwrap().len()
    }

    pub fn cancelled(&self) -> Vec<String> {
        self.state.cancelled.lock().unwrap().clone()
    }

    pub fn completed_after_drop(&self) -> Vec<String> {
        self.state.completed_after_drop.lock().unwrap().clone()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Statements sent to the user engine (Cloud) or to Core.
    pub fn statements(&self) -> Vec<Seen> {
        let cloud = self.script(|s| s.cloud);
        self.seen()
            .into_iter()
            .filter(|s| {
                s.method == "POST"
                    && if cloud {
                        s.host == Host::Engine
                    } else {
                        s.host == Host::Api
                    }
            })
            .collect()
    }

    /// The statement kinds in order, from their query labels.
    pub fn kinds(&self) -> Vec<String> {
        self.statements()
            .iter()
            .map(|s| s.kind().unwrap_or("").to_string())
            .collect()
    }

    pub fn clear(&self) {
        self.state.seen.lock().unwrap().clear();
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

fn params_of(query: Option<&str>) -> BTreeMap<String, String> {
    let url = reqwest::Url::parse(&format!("http://x/?{}", query.unwrap_or(""))).unwrap();
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn into_response(reply: Reply) -> Response {
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    response.headers_mut().remove("content-type");
    for (k, v) in reply.headers {
        response.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(&v).unwrap(),
        );
    }
    response
}

fn json_reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        body: body.to_string(),
        ..Reply::empty()
    }
    .header("content-type", "application/json")
}

/// Marks a statement cancelled when the client hangs up before its answer, if it asked
/// for `cancel_query_on_connection_drop=ALL`; otherwise it runs to the end regardless
/// ("some SQL statements, including INSERT, continue to run by default", sync queries).
struct DropGuard {
    state: Arc<State>,
    sql: String,
    cancel: bool,
    done: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.done {
            if self.cancel {
                self.state.cancelled.lock().unwrap().push(self.sql.clone());
            } else {
                self.state
                    .completed_after_drop
                    .lock()
                    .unwrap()
                    .push(self.sql.clone());
            }
        }
    }
}

async fn handle(
    state: Arc<State>,
    host: Host,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        host,
        method: method.to_string(),
        path: uri.path().to_string(),
        params: params_of(uri.query()),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    state.seen.lock().unwrap().push(seen.clone());
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let mut guard = DropGuard {
        state: state.clone(),
        sql: seen.body.clone(),
        cancel: seen
            .param("cancel_query_on_connection_drop")
            .is_some_and(|v| v.eq_ignore_ascii_case("all")),
        done: false,
    };
    let reply = route(&state, &seen);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    guard.done = true;
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    into_response(reply)
}

fn route(state: &State, seen: &Seen) -> Reply {
    let mut script = state.script.lock().unwrap();
    let bearer = seen
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer ").map(str::to_string));
    let authorised = !script.cloud || (bearer.is_some() && bearer == script.valid_token);
    let unauthenticated = || {
        json_reply(
            401,
            json!({"kind": "unauthenticated", "message": "token expired or invalid"}),
        )
    };
    match (seen.host, seen.method.as_str(), seen.path.as_str()) {
        (Host::Api, "POST", "/oauth/token") if script.cloud => {
            if let Some(fault) = script.token_faults.pop_front() {
                return fault;
            }
            let form = params_of(Some(&seen.body));
            let ok = form.get("grant_type").map(String::as_str) == Some("client_credentials")
                && form.get("audience").map(String::as_str) == Some("https://api.firebolt.io")
                && form.get("client_id") == Some(&script.client_id)
                && form.get("client_secret") == Some(&script.client_secret);
            if !ok {
                // Echo what was sent, as a careless server might: the client must not repeat it.
                return json_reply(
                    401,
                    json!({"error": "invalid_client", "error_description": format!("bad credentials in {}", seen.body)}),
                );
            }
            script.tokens_issued += 1;
            let token = format!("token-{}", script.tokens_issued);
            script.valid_token = Some(token.clone());
            json_reply(
                200,
                json!({"access_token": token, "token_type": "Bearer", "expires_in": script.token_lifetime_s}),
            )
        }
        (Host::Api, "GET", path)
            if script.cloud
                && path.starts_with("/web/v3/account/")
                && path.ends_with("/engineUrl") =>
        {
            if !authorised {
                return unauthenticated();
            }
            // The account as the SDKs send it: the raw name in the path (utils/urls.py).
            let account = path
                .trim_start_matches("/web/v3/account/")
                .trim_end_matches("/engineUrl");
            if account != script.account {
                return json_reply(
                    404,
                    json!({"message": format!("account {account} not found")}),
                );
            }
            // A host and its parameters, no path (the API guide's example); the scheme is
            // kept because this server speaks plain HTTP.
            json_reply(
                200,
                json!({"engineUrl": format!("{}?account_id=acc-1", state.urls["system"])}),
            )
        }
        (Host::System, "POST", _) if script.cloud => {
            if !authorised {
                return unauthenticated();
            }
            match fbsql::parse(seen.body.trim()) {
                Ok(Parsed::UseDatabase(db)) => {
                    // "USE DATABASE validates that the database exists" (connecting over HTTP).
                    if !script.databases.contains(&db) {
                        return Reply::sql_error(
                            400,
                            "42P01",
                            "UndefinedDatabase",
                            &format!("Database '{db}' does not exist or not authorized."),
                        );
                    }
                    Reply::empty().header("Firebolt-Update-Parameters", &format!("database={db}"))
                }
                Ok(Parsed::UseEngine(engine)) => {
                    if engine != script.engine {
                        return Reply::sql_error(
                            400,
                            "42000",
                            "EngineNotFound",
                            &format!("Engine '{engine}' does not exist or not authorized"),
                        );
                    }
                    Reply::empty().header(
                        "Firebolt-Update-Endpoint",
                        &format!("{}?engine={engine}&account_id=acc-1", state.urls["engine"]),
                    )
                }
                _ => statement(state, &mut script, seen),
            }
        }
        (Host::Engine, "POST", "/") if script.cloud => {
            if !authorised {
                return unauthenticated();
            }
            engine_statement(state, &mut script, seen)
        }
        (Host::Api, "POST", "/") if !script.cloud => engine_statement(state, &mut script, seen),
        _ => Reply::status(404, "no such route"),
    }
}

fn engine_statement(state: &State, script: &mut Script, seen: &Seen) -> Reply {
    if script.engine_stopped {
        // No documented form; the Python SDK reads a 404 or a 503 as "engine not running"
        // (db/cursor.py `_raise_if_error`): plain text, as an HTTP layer answers.
        return Reply::status(404, &format!("Engine {} is stopped", script.engine));
    }
    if let Some(fault) = script.faults.pop_front() {
        return fault;
    }
    statement(state, script, seen)
}

fn sql_error(description: &str) -> Reply {
    Reply::sql_error(400, "42000", "QueryError", description)
}

/// One statement: parsed and checked, then run in its transaction (or alone). A scripted
/// reply's delay applies to the default answer too.
fn statement(state: &State, script: &mut Script, seen: &Seen) -> Reply {
    let scripted = (script.responder)(seen);
    let delay = scripted.delay;
    let scripted = (!scripted.default).then_some(scripted);
    statement_with(state, script, seen, scripted).delayed(delay)
}

fn statement_with(
    state: &State,
    script: &mut Script,
    seen: &Seen,
    scripted: Option<Reply>,
) -> Reply {
    let parsed = match fbsql::parse(&seen.body) {
        Ok(p) => p,
        Err(e) => {
            abort(state, seen);
            return sql_error(&e);
        }
    };
    let mut transactions = state.transactions.lock().unwrap();
    let tx_id = seen.param("transaction_id").map(str::to_string);
    match (&parsed, tx_id) {
        (Parsed::Begin, Some(id)) => {
            // A failed statement: the transaction is aborted.
            if let Some(tx) = transactions.get_mut(&id) {
                tx.aborted = true;
            }
            sql_error("cannot BEGIN: a transaction is already in progress on this connection")
        }
        (Parsed::Commit | Parsed::Rollback, None) => {
            let what = if matches!(parsed, Parsed::Commit) {
                "COMMIT"
            } else {
                "ROLLBACK"
            };
            sql_error(&format!(
                "cannot {what} transaction: no transaction is in progress"
            ))
        }
        (Parsed::Begin, None) => {
            if let Some(reply) = scripted.filter(|r| !r.is_success()) {
                return reply;
            }
            let id = format!(
                "{:040x}",
                state.next_transaction.fetch_add(1, Ordering::SeqCst)
            );
            let snapshot = state.catalog.lock().unwrap().clone();
            transactions.insert(
                id.clone(),
                Transaction {
                    sequence: 0,
                    aborted: false,
                    working: snapshot.clone(),
                    written: BTreeMap::new(),
                    started: snapshot,
                },
            );
            // Two header instances: a client must read every one (JDBC reads each as one
            // k=v; the Python SDK joins them).
            Reply::empty()
                .header(
                    "Firebolt-Update-Parameters",
                    &format!("transaction_id={id}"),
                )
                .header("Firebolt-Update-Parameters", "transaction_sequence_id=0")
        }
        (_, Some(id)) => {
            let Some(tx) = transactions.get_mut(&id) else {
                return sql_error(&format!("transaction {id} does not exist"));
            };
            let sequence = seen
                .param("transaction_sequence_id")
                .and_then(|s| s.parse::<u64>().ok());
            if sequence != Some(tx.sequence) {
                tx.aborted = true;
                return sql_error(&format!(
                    "transaction_sequence_id {sequence:?} does not match the transaction's {}",
                    tx.sequence
                ));
            }
            let remove = || {
                Reply::empty().header(
                    "Firebolt-Remove-Parameters",
                    "transaction_id,transaction_sequence_id",
                )
            };
            match parsed {
                Parsed::Rollback => {
                    transactions.remove(&id);
                    scripted.unwrap_or_else(remove)
                }
                Parsed::Commit => {
                    let tx = transactions.remove(&id).expect("present");
                    if tx.aborted {
                        return sql_error(
                            "the transaction was aborted by an earlier error and is rolled back",
                        );
                    }
                    if let Some(reply) = scripted.as_ref().filter(|r| !r.is_success()) {
                        return reply.clone();
                    }
                    if let Err(e) = commit(state, tx) {
                        return Reply::sql_error(400, "9", "TransactionConflict", &e).header(
                            "Firebolt-Remove-Parameters",
                            "transaction_id,transaction_sequence_id",
                        );
                    }
                    scripted.unwrap_or_else(remove)
                }
                _ => {
                    if tx.aborted {
                        return sql_error(
                            "current transaction is aborted, commands ignored until end of transaction block",
                        );
                    }
                    let outcome = match &scripted {
                        Some(r) if !r.is_success() => Outcome::Error(String::new()),
                        _ => run_statement(&parsed, &mut tx.working, &mut tx.written, script),
                    };
                    let reply = match (outcome, scripted) {
                        (Outcome::Error(e), None) => {
                            tx.aborted = true;
                            return sql_error(&e);
                        }
                        (Outcome::Error(_), Some(r)) if !r.is_success() => {
                            tx.aborted = true;
                            return r;
                        }
                        (_, Some(r)) => r,
                        (Outcome::Rows(r), None) => r,
                    };
                    tx.sequence += 1;
                    reply.header(
                        "Firebolt-Update-Parameters",
                        &format!("transaction_sequence_id={}", tx.sequence),
                    )
                }
            }
        }
        (_, None) => {
            // Alone: an implicit transaction of its own.
            let mut catalog = state.catalog.lock().unwrap();
            let mut written = BTreeMap::new();
            let mut working = catalog.clone();
            let outcome = match &scripted {
                Some(r) if !r.is_success() => return r.clone(),
                _ => run_statement(&parsed, &mut working, &mut written, script),
            };
            match outcome {
                Outcome::Error(e) => scripted.unwrap_or_else(|| sql_error(&e)),
                Outcome::Rows(rows) => {
                    for name in written.keys() {
                        if let Some(t) = working.tables.get_mut(name) {
                            t.version += 1;
                        }
                    }
                    *catalog = working;
                    scripted.unwrap_or(rows)
                }
            }
        }
    }
}

/// A failed statement aborts the transaction it was sent in.
fn abort(state: &State, seen: &Seen) {
    if let Some(id) = seen.param("transaction_id")
        && let Some(tx) = state.transactions.lock().unwrap().get_mut(id)
    {
        tx.aborted = true;
    }
}

/// Publishes a transaction's changes, unless a table it wrote was changed by a commit
/// since it began (snapshot isolation, write/write conflicts fail the later COMMIT).
fn commit(state: &State, tx: Transaction) -> Result<(), String> {
    let mut catalog = state.catalog.lock().unwrap();
    let conflicts = tx
        .written
        .keys()
        .filter(|name| {
            catalog.tables.get(*name).map(|t| t.version)
                != tx.started.tables.get(*name).map(|t| t.version)
        })
        .count();
    if conflicts > 0 {
        return Err(CONFLICT_TEXT.replace("1 conflicts", &format!("{conflicts} conflicts")));
    }
    catalog.schemas = tx.working.schemas.clone();
    for name in tx.written.keys() {
        match tx.working.tables.get(name) {
            Some(t) => {
                let mut t = t.clone();
                t.version = catalog.tables.get(name).map(|c| c.version).unwrap_or(0) + 1;
                catalog.tables.insert(name.clone(), t);
            }
            None => {
                catalog.tables.remove(name);
            }
        }
    }
    Ok(())
}

fn missing(name: &Name) -> String {
    format!(
        "relation \"{}\".\"{}\" does not exist",
        name.schema, name.table
    )
}

/// What one statement does to `catalog` (a transaction's working copy, or a copy that is
/// published when it succeeds), and its answer. One arm per statement kind.
fn run_statement(
    parsed: &Parsed,
    catalog: &mut Catalog,
    written: &mut BTreeMap<Name, Option<u64>>,
    script: &Script,
) -> Outcome {
    let mut touch = |catalog: &Catalog, name: &Name| {
        written
            .entry(name.clone())
            .or_insert_with(|| catalog.tables.get(name).map(|t| t.version));
    };
    match parsed {
        Parsed::Begin | Parsed::Commit | Parsed::Rollback => Outcome::Rows(Reply::empty()),
        Parsed::UseDatabase(db) => {
            // Core: no USE; the database comes as a parameter.
            Outcome::Rows(
                Reply::empty().header("Firebolt-Update-Parameters", &format!("database={db}")),
            )
        }
        Parsed::UseEngine(_) => Outcome::Error("USE ENGINE is a system engine statement".into()),
        Parsed::CreateSchema(schema) => {
            catalog.schemas.insert(schema.clone());
            Outcome::Rows(Reply::empty())
        }
        Parsed::CreateTable {
            name,
            if_not_exists,
            columns,
            primary_index,
            as_select,
        } => {
            if !catalog.schemas.contains(&name.schema) {
                return Outcome::Error(format!("schema \"{}\" does not exist", name.schema));
            }
            if catalog.tables.contains_key(name) {
                return if *if_not_exists {
                    Outcome::Rows(Reply::empty())
                } else {
                    Outcome::Error(format!(
                        "relation \"{}\".\"{}\" already exists",
                        name.schema, name.table
                    ))
                };
            }
            touch(catalog, name);
            catalog.tables.insert(
                name.clone(),
                Table {
                    columns: if *as_select {
                        Vec::new()
                    } else {
                        columns.clone()
                    },
                    primary_index: primary_index.clone(),
                    version: 0,
                },
            );
            Outcome::Rows(Reply::empty())
        }
        Parsed::DropTable { name, if_exists } => {
            if !catalog.tables.contains_key(name) {
                return if *if_exists {
                    Outcome::Rows(Reply::empty())
                } else {
                    Outcome::Error(missing(name))
                };
            }
            touch(catalog, name);
            catalog.tables.remove(name);
            Outcome::Rows(Reply::empty())
        }
        Parsed::AddColumn {
            table,
            column,
            if_not_exists,
        } => {
            touch(catalog, table);
            let Some(t) = catalog.tables.get_mut(table) else {
                return Outcome::Error(missing(table));
            };
            if t.columns.iter().any(|c| c.name == column.name) {
                return if *if_not_exists {
                    Outcome::Rows(Reply::empty())
                } else {
                    Outcome::Error(format!("column \"{}\" already exists", column.name))
                };
            }
            t.columns.push(column.clone());
            Outcome::Rows(Reply::empty())
        }
        Parsed::Rename { table, to } => {
            let new = Name {
                schema: table.schema.clone(),
                table: to.clone(),
            };
            if catalog.tables.contains_key(&new) {
                return Outcome::Error(format!("relation \"{to}\" already exists"));
            }
            touch(catalog, table);
            touch(catalog, &new);
            let Some(t) = catalog.tables.remove(table) else {
                return Outcome::Error(missing(table));
            };
            catalog.tables.insert(new, t);
            Outcome::Rows(Reply::empty())
        }
        Parsed::Write { table, columns } => {
            let Some(t) = catalog.tables.get(table) else {
                return Outcome::Error(missing(table));
            };
            if !t.columns.is_empty()
                && let Some(bad) = columns
                    .iter()
                    .find(|c| !t.columns.iter().any(|t| &t.name == *c))
            {
                return Outcome::Error(format!(
                    "column \"{bad}\" of relation \"{}\" does not exist",
                    table.table
                ));
            }
            touch(catalog, table);
            Outcome::Rows(Reply::empty())
        }
        Parsed::Select { reads, text } => {
            if let Some(name) = reads
                .iter()
                .find(|n| !catalog.tables.contains_key(*n) && !n.table.is_empty())
            {
                return Outcome::Error(missing(name));
            }
            Outcome::Rows(select(text, catalog, script))
        }
    }
}

/// The literals of `column = '..'` and `column IN ('..', ..)` in a catalog query.
fn literals_after(text: &str, column: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lower = text.to_ascii_lowercase();
    for pattern in [format!("{column} = "), format!("{column} in (")] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(&pattern) {
            let start = from + at + pattern.len();
            let rest = &text[start..];
            let end = if pattern.ends_with('(') {
                rest.find(')').unwrap_or(rest.len())
            } else {
                rest.find([' ', ')']).unwrap_or(rest.len())
            };
            for part in split_literals(&rest[..end]) {
                out.push(part);
            }
            from = start;
        }
    }
    out
}

fn split_literals(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            let mut value = String::new();
            while let Some(c) = chars.next() {
                if c == '\'' {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                        value.push('\'');
                    } else {
                        break;
                    }
                } else {
                    value.push(c);
                }
            }
            out.push(value);
        }
    }
    out
}

/// Answers the SELECTs whose answer the catalog knows; any other SELECT gets no rows
/// (tests script the ones that matter, such as the batch check).
fn select(text: &str, catalog: &Catalog, script: &Script) -> Reply {
    let lower = text.to_ascii_lowercase();
    if lower == "select 1" {
        return Reply::rows(&[("?column?", "int")], vec![vec![json!(1)]]);
    }
    if lower == "select version()" {
        return Reply::rows(&[("version", "text")], vec![vec![json!(script.version)]]);
    }
    if lower.contains("information_schema.engines") {
        return Reply::rows(&[("version", "text")], vec![vec![json!(script.version)]]);
    }
    let schema = literals_after(text, "table_schema")
        .into_iter()
        .next()
        .unwrap_or_else(|| "public".into());
    if lower.contains("information_schema.columns") {
        let names = literals_after(text, "table_name");
        let mut data = Vec::new();
        for (name, table) in &catalog.tables {
            if name.schema != schema || !names.contains(&name.table) {
                continue;
            }
            for c in &table.columns {
                let yes = |b: bool| if b { "YES" } else { "NO" };
                data.push(vec![
                    json!("column"),
                    json!(name.table),
                    json!(c.name),
                    json!(c.ty),
                    json!(yes(c.nullable)),
                    json!(yes(table.primary_index.contains(&c.name))),
                ]);
            }
            if lower.contains("primary_index") {
                data.push(vec![
                    json!("index"),
                    json!(name.table),
                    if table.primary_index.is_empty() {
                        Value::Null
                    } else {
                        json!(format!("{{{}}}", table.primary_index.join(",")))
                    },
                    json!(""),
                    json!(""),
                    json!(""),
                ]);
            }
        }
        let meta = [
            ("kind", "text"),
            ("table_name", "text"),
            ("name", "text null"),
            ("data_type", "text"),
            ("is_nullable", "text"),
            ("is_in_primary_index", "text"),
        ];
        return Reply::rows(&meta, data);
    }
    if lower.contains("information_schema.tables") {
        let prefix = lower
            .find("like '")
            .map(|at| {
                split_literals(&text[at + 5..])
                    .into_iter()
                    .next()
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let prefix = prefix.trim_end_matches('%').to_string();
        let data = catalog
            .tables
            .keys()
            .filter(|n| n.schema == schema && n.table.starts_with(&prefix))
            .map(|n| vec![json!(n.table)])
            .collect();
        return Reply::rows(&[("table_name", "text")], data);
    }
    Reply::rows(&[("x", "text null")], vec![])
}

//! A protocol test server: NOT Firebolt, but a local HTTP server that answers the way
//! Firebolt's documented protocol does (firebolt-protocol.md): the token endpoint, the
//! account's engineUrl, `USE DATABASE` / `USE ENGINE` with their session headers,
//! JSON_Compact results, errors with HTTP 200, 401 on an expired token, 429 with
//! Retry-After, 503, a stopped engine, slow replies. It records every request so tests
//! can assert what the client sent.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
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
}

impl Reply {
    /// 200 with an empty body: what DDL and DML answer.
    pub fn empty() -> Self {
        Reply {
            status: 200,
            headers: vec![],
            body: String::new(),
            delay: Duration::ZERO,
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
        let body = json!({
            "errors": [{"code": "42000", "name": "QueryError", "severity": "ERROR", "source": "User Error",
                        "description": description, "resolution": "", "helpLink": "",
                        "location": {"failingLine": 1, "startOffset": 0, "endOffset": 1}}],
            "query": {"query_id": "q-err"}
        });
        Reply {
            status,
            body: body.to_string(),
            ..Reply::empty()
        }
    }

    pub fn status(status: u16, body: &str) -> Self {
        Reply {
            status,
            body: body.to_string(),
            ..Reply::empty()
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
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
    pub token_lifetime_s: u64,
    /// The token the engine accepts (401 for any other).
    pub valid_token: Option<String>,
    pub tokens_issued: u32,
    /// Replies for the next token requests, before the normal answer.
    pub token_faults: VecDeque<Reply>,
    /// Replies for the next statements on the user engine (or Core), before `responder`.
    pub faults: VecDeque<Reply>,
    pub engine_stopped: bool,
    pub responder: Responder,
}

struct State {
    url: String,
    seen: Mutex<Vec<Seen>>,
    script: Mutex<Script>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

pub struct ProtocolServer {
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProtocolServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers statements as an engine with no data does: BEGIN/COMMIT with their session
/// headers, `SELECT 1`, empty results for other SELECTs, empty bodies for the rest.
pub fn default_reply(seen: &Seen) -> Reply {
    let sql = seen.body.trim_start().to_ascii_uppercase();
    if sql.starts_with("BEGIN") {
        Reply::empty().header(
            "Firebolt-Update-Parameters",
            "transaction_id=tx-1,transaction_sequence_id=1",
        )
    } else if sql.starts_with("COMMIT") || sql.starts_with("ROLLBACK") {
        Reply::empty().header(
            "Firebolt-Remove-Parameters",
            "transaction_id,transaction_sequence_id",
        )
    } else if sql == "SELECT 1" {
        Reply::rows(&[("?column?", "int")], vec![vec![json!(1)]])
    } else if sql.starts_with("SELECT") {
        Reply::rows(&[("x", "text null")], vec![])
    } else {
        Reply::empty()
    }
}

impl ProtocolServer {
    pub async fn cloud() -> Self {
        Self::start(true).await
    }

    pub async fn core() -> Self {
        Self::start(false).await
    }

    async fn start(cloud: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(State {
            url: url.clone(),
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(Script {
                cloud,
                client_id: "svc-id".into(),
                client_secret: "svc-secret-do-not-print".into(),
                account: "acme".into(),
                engine: "etl".into(),
                token_lifetime_s: 86_400,
                valid_token: None,
                tokens_issued: 0,
                token_faults: VecDeque::new(),
                faults: VecDeque::new(),
                engine_stopped: false,
                responder: Arc::new(default_reply),
            }),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app_state = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = app_state.clone();
                async move { handle(state, method, uri, headers, body).await }
            },
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("protocol test server");
        });
        ProtocolServer { url, state, task }
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

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Statements sent to the user engine (Cloud) or to Core.
    pub fn statements(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "POST" && (s.path == "/engine" || s.path == "/"))
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
    for (k, v) in reply.headers {
        response.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(&v).unwrap(),
        );
    }
    response
}

fn json_reply(status: u16, body: Value) -> Reply {
    Reply::status(status, &body.to_string()).header("content-type", "application/json")
}

async fn handle(
    state: Arc<State>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        params: params_of(uri.query()),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    state.seen.lock().unwrap().push(seen.clone());
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let reply = route(&state, &seen);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
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
    match (seen.method.as_str(), seen.path.as_str()) {
        ("POST", "/oauth/token") => {
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
        ("GET", path) if path.starts_with("/web/v3/account/") && path.ends_with("/engineUrl") => {
            if !authorised {
                return unauthenticated();
            }
            let account = path
                .trim_start_matches("/web/v3/account/")
                .trim_end_matches("/engineUrl");
            if account != script.account {
                return json_reply(
                    404,
                    json!({"message": format!("account {account} not found")}),
                );
            }
            json_reply(
                200,
                json!({"engineUrl": format!("{}/system?account_id=acc-1", state.url)}),
            )
        }
        ("POST", "/system") => {
            if !authorised {
                return unauthenticated();
            }
            let sql = seen.body.trim();
            if let Some(db) = sql.strip_prefix("USE DATABASE ") {
                Reply::empty().header(
                    "Firebolt-Update-Parameters",
                    &format!("database={}", db.trim_matches('"')),
                )
            } else if let Some(engine) = sql.strip_prefix("USE ENGINE ") {
                let engine = engine.trim_matches('"');
                if engine != script.engine {
                    return Reply::error(
                        200,
                        &format!("Engine '{engine}' does not exist or not authorized"),
                    );
                }
                Reply::empty().header(
                    "Firebolt-Update-Endpoint",
                    &format!("{}/engine?engine={engine}&account_id=acc-1", state.url),
                )
            } else {
                (script.responder)(seen)
            }
        }
        ("POST", "/engine") | ("POST", "/") => {
            if seen.path == "/engine" && !authorised {
                return unauthenticated();
            }
            if script.engine_stopped {
                return Reply::status(404, &format!("Engine {} is stopped", script.engine));
            }
            if let Some(fault) = script.faults.pop_front() {
                return fault;
            }
            (script.responder)(seen)
        }
        _ => Reply::status(404, "no such route"),
    }
}

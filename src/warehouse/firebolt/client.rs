//! A small Firebolt HTTP client on `reqwest`, shared by every worker (`&self`): one
//! statement per request, connection reuse, a bound on statements in flight, Cloud
//! authentication and engine discovery done once and cached, and retries with backoff
//! and jitter for failures that may pass, never for a statement that may have been
//! applied unless it is idempotent.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Mutex, Semaphore};

use crate::config::{FireboltConfig, Secret};
use crate::warehouse::sql::ident;

use super::auth::{AuthRetry, Bearer, Credentials, TokenCache};
use super::error::{FireboltError, truncate};
use super::protocol::{
    Body, HEADER_PROTOCOL_VERSION, PROTOCOL_VERSION, QueryResult, SessionState, SessionUpdates,
    error_message, parse_body, parse_retry_after,
};
use super::transport::RetryBudget;
pub use super::transport::{Backoff, transport_message};

/// Which Firebolt to talk to.
#[derive(Debug, Clone)]
pub enum Target {
    /// Firebolt Core: a base URL, no authentication.
    Core { url: String },
    /// Firebolt Cloud: token, system engine of the account, then the named engine.
    Cloud {
        /// `https://api.app.firebolt.io`
        api_url: String,
        account: String,
        engine: String,
        credentials: Credentials,
    },
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub target: Target,
    pub database: String,
    pub max_concurrent_statements: usize,
    pub request_timeout: Duration,
    pub max_retries: u32,
    pub backoff: Backoff,
    /// A `Retry-After` longer than this is not waited for here: the error goes up and the
    /// batch is retried later.
    pub max_retry_after: Duration,
}

/// `https://` unless the host already names a scheme (tests point it at `http://127.0.0.1`).
fn with_scheme(host: &str) -> String {
    let host = host.trim().trim_end_matches('/');
    if host.contains("://") {
        host.to_string()
    } else {
        format!("https://{host}")
    }
}

/// The token host: the API host with its first label replaced by `id` (the Python SDK's
/// `get_auth_endpoint`: `api.app.firebolt.io` -> `id.app.firebolt.io`, whatever the first
/// label is). An IP address or a single-label host is kept as it is (tests).
pub fn auth_url_for(api_url: &str) -> String {
    let Some((scheme, rest)) = api_url.split_once("://") else {
        return api_url.to_string();
    };
    let host = rest.split([':', '/']).next().unwrap_or(rest);
    if host.parse::<std::net::IpAddr>().is_ok() || !host.contains('.') {
        return api_url.to_string();
    }
    match rest.split_once('.') {
        Some((_, tail)) => format!("{scheme}://id.{tail}"),
        None => api_url.to_string(),
    }
}

/// What a path segment cannot hold (RFC 3986 `pchar` and the URL standard's path-segment
/// set): the account name is sent as the SDKs send it (raw: `my-account`), encoded only
/// where it must be.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// `GET /web/v3/account/{account}/engineUrl` of an API URL.
pub fn engine_url_path(api_url: &str, account: &str) -> String {
    format!(
        "{}/web/v3/account/{}/engineUrl",
        api_url.trim_end_matches('/'),
        percent_encoding::utf8_percent_encode(account, PATH_SEGMENT)
    )
}

/// The step named in errors of the engine-URL request.
const ENGINE_DISCOVERY: &str = "engine discovery";

/// The system engine's URL in the reply to [`engine_url_path`].
fn engine_url_of_reply(text: &str) -> Result<String, FireboltError> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|_| FireboltError::Protocol {
            step: ENGINE_DISCOVERY,
            message: format!("not JSON: {}", truncate(text)),
        })?;
    json.get("engineUrl")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| FireboltError::Protocol {
            step: ENGINE_DISCOVERY,
            message: format!("no engineUrl in {}", truncate(text)),
        })
}

/// The code a 500 wraps: Firebolt's gateway answers "Received error from remote server
/// ... HTTP status code: 401 Unauthorized, body: ..." for an expired token upstream (the
/// Python SDK's `get_internal_error_code`, which re-authenticates on it).
fn internal_error_code(body: &str) -> Option<u16> {
    let (_, after) = body.split_once("HTTP status code: ")?;
    after.split(' ').next()?.trim_end_matches(',').parse().ok()
}

impl ClientConfig {
    /// From `[warehouse.firebolt]` (validated beforehand by `Config::validate`).
    pub fn from_config(config: &FireboltConfig) -> Result<Self, FireboltError> {
        let target = match config.url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => Target::Core {
                url: url.to_string(),
            },
            None => {
                let missing = |key: &str| {
                    FireboltError::Config(format!(
                        "warehouse.firebolt.{key} must be set for Firebolt Cloud"
                    ))
                };
                let api_url = with_scheme(&config.api_host);
                Target::Cloud {
                    credentials: Credentials {
                        auth_url: auth_url_for(&api_url),
                        client_id: config
                            .client_id
                            .clone()
                            .ok_or_else(|| missing("client_id"))?,
                        client_secret: config
                            .client_secret
                            .clone()
                            .ok_or_else(|| missing("client_secret"))?,
                    },
                    api_url,
                    account: config.account.clone().ok_or_else(|| missing("account"))?,
                    engine: config.engine.clone().ok_or_else(|| missing("engine"))?,
                }
            }
        };
        Ok(Self {
            target,
            database: config.database.clone(),
            max_concurrent_statements: config.max_concurrent_statements.max(1),
            request_timeout: config.request_timeout,
            max_retries: config.max_retries,
            backoff: Backoff::default(),
            max_retry_after: Duration::from_secs(60),
        })
    }
}

/// One SQL statement and what the client needs to know about it.
#[derive(Clone)]
pub struct Statement {
    /// What it does ("copy", "merge", ...): log field and the step named in errors.
    pub kind: &'static str,
    /// `query_label`: ties the statement to its batch in Firebolt's query history.
    pub label: String,
    pub sql: String,
    /// Safe to send again after it may have run (SELECT, DROP IF EXISTS, ...).
    pub idempotent: bool,
    /// What logs show instead of `sql` when it carries a credential.
    pub redacted: Option<String>,
    /// Credentials inside `sql`, masked in any error the server sends back.
    pub secrets: Vec<Secret>,
    /// Sent with `cancel_query_on_connection_drop=ALL`, so that a statement the client gave
    /// up on (timeout) stops on the server instead of running on while the batch is
    /// retried: by default INSERT, COPY and MERGE go on after the connection is lost
    /// (sync queries reference; the setting: system settings reference).
    pub cancel_on_drop: bool,
}

/// The session setting of [`Statement::cancel_on_drop`], as a query parameter (settings
/// travel as query parameters, as the SDKs send `SET`).
pub const CANCEL_ON_DROP: (&str, &str) = ("cancel_query_on_connection_drop", "ALL");

impl std::fmt::Debug for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statement")
            .field("kind", &self.kind)
            .field("label", &self.label)
            .field("sql", &self.log_text())
            .field("idempotent", &self.idempotent)
            .finish()
    }
}

impl Statement {
    pub fn new(kind: &'static str, label: impl Into<String>, sql: impl Into<String>) -> Self {
        let sql = sql.into();
        Self {
            kind,
            label: label.into(),
            idempotent: is_idempotent(&sql),
            sql,
            redacted: None,
            secrets: Vec::new(),
            cancel_on_drop: false,
        }
    }

    /// The statement stops on the server if the connection drops.
    pub fn cancelled_on_drop(mut self) -> Self {
        self.cancel_on_drop = true;
        self
    }

    /// The statement carries a secret: logs show `redacted` instead.
    pub fn with_redacted(mut self, redacted: impl Into<String>) -> Self {
        self.redacted = Some(redacted.into());
        self
    }

    /// Masks `secret` in errors about this statement.
    pub fn with_secret(mut self, secret: Secret) -> Self {
        self.secrets.push(secret);
        self
    }

    /// A reply with every secret of this statement masked, before anything (truncation
    /// included) can cut a secret so that masking no longer finds it.
    fn mask(&self, mut text: String) -> String {
        for secret in &self.secrets {
            if !secret.expose().is_empty() {
                text = text.replace(secret.expose(), "****");
            }
        }
        text
    }

    fn scrub(&self, error: FireboltError) -> FireboltError {
        self.secrets
            .iter()
            .fold(error, |e, secret| e.scrubbed(secret.expose()))
    }

    pub fn log_text(&self) -> &str {
        self.redacted.as_deref().unwrap_or(&self.sql)
    }
}

/// The first words of a statement outside quotes, upper-cased; quoted parts become `?` so
/// a hostile name cannot look like a keyword.
fn leading_keywords(sql: &str, n: usize) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if words.len() >= n {
            break;
        }
        match c {
            '"' | '\'' => {
                // Skip to the closing quote; a doubled quote escapes one.
                loop {
                    match chars.next() {
                        Some(q) if q == c => {
                            if chars.peek() == Some(&c) {
                                chars.next();
                            } else {
                                break;
                            }
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
                words.push("?".into());
            }
            c if c.is_whitespace() || c == '(' || c == ')' || c == ',' || c == ';' || c == '.' => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c.to_ascii_uppercase()),
        }
    }
    if !current.is_empty() && words.len() < n {
        words.push(current);
    }
    words
}

/// Whether sending the statement twice leaves the same result as once.
pub fn is_idempotent(sql: &str) -> bool {
    let words = leading_keywords(sql, 10);
    let has = |seq: &[&str]| {
        words
            .windows(seq.len())
            .any(|w| w.iter().zip(seq).all(|(a, b)| a == b))
    };
    match words.first().map(String::as_str) {
        Some("SELECT" | "USE" | "SHOW") => true,
        Some("DROP") => has(&["IF", "EXISTS"]),
        Some("CREATE") => has(&["IF", "NOT", "EXISTS"]),
        Some("ALTER") => has(&["ADD", "COLUMN", "IF", "NOT", "EXISTS"]),
        _ => false,
    }
}

/// Whether a failed attempt may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Never,
    /// The server did not run it (429, 503, connection refused): retry anything,
    /// after the server's `Retry-After` when it gave one.
    Always(Option<Duration>),
    /// It may have run (timeout, 502/504, broken connection): retry idempotent ones only.
    IfIdempotent,
}

#[derive(Debug)]
enum Failure {
    /// 401: the token expired or was revoked.
    Unauthorized(String),
    Other {
        error: FireboltError,
        retry: Retry,
    },
}

impl Failure {
    /// A failure that sending again would not change.
    fn permanent(error: FireboltError) -> Self {
        Failure::Other {
            error,
            retry: Retry::Never,
        }
    }
}

/// What an HTTP status and body mean for a statement.
fn classify_status(
    step: &'static str,
    status: u16,
    body: &str,
    retry_after: Option<Duration>,
) -> Failure {
    let message = error_message(body);
    let other = |error, retry| Failure::Other { error, retry };
    match status {
        401 => Failure::Unauthorized(message),
        500 if internal_error_code(body) == Some(401) => Failure::Unauthorized(message),
        403 => other(FireboltError::Auth { step, message }, Retry::Never),
        404 if body.to_ascii_lowercase().contains("is stopped") => other(
            FireboltError::EngineStopped {
                step,
                status,
                message,
            },
            Retry::Never,
        ),
        429 => other(
            FireboltError::RateLimited {
                step,
                retry_after,
                message,
            },
            Retry::Always(retry_after),
        ),
        503 => other(
            FireboltError::EngineStopped {
                step,
                status,
                message,
            },
            Retry::Always(retry_after),
        ),
        408 | 502 | 504 => other(
            FireboltError::Http {
                step,
                status,
                message,
            },
            Retry::IfIdempotent,
        ),
        _ => match parse_body(body) {
            Ok(Body::Errors { errors, query_id }) => other(
                FireboltError::Sql {
                    step,
                    errors,
                    query_id,
                },
                Retry::Never,
            ),
            _ => other(
                FireboltError::Http {
                    step,
                    status,
                    message,
                },
                Retry::Never,
            ),
        },
    }
}

fn classify_transport(step: &'static str, e: reqwest::Error, timeout: Duration) -> Failure {
    if e.is_connect() {
        // The connection was never made: nothing was sent.
        Failure::Other {
            error: FireboltError::Connection {
                step,
                message: transport_message(e),
            },
            retry: Retry::Always(None),
        }
    } else if e.is_timeout() {
        Failure::Other {
            error: FireboltError::Timeout { step, timeout },
            retry: Retry::IfIdempotent,
        }
    } else {
        Failure::Other {
            error: FireboltError::Connection {
                step,
                message: transport_message(e),
            },
            retry: Retry::IfIdempotent,
        }
    }
}

/// The client. Cheap to share: wrap it in an `Arc`.
pub struct Client {
    config: ClientConfig,
    http: reqwest::Client,
    permits: Semaphore,
    auth: Option<TokenCache>,
    /// The resolved session (endpoint, database, engine): one resolution at a time.
    session: Mutex<Option<SessionState>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, FireboltError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("cdc-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| FireboltError::Config(format!("cannot build the HTTP client: {e}")))?;
        let auth = match &config.target {
            Target::Cloud { credentials, .. } => Some(TokenCache::new(credentials.clone())),
            Target::Core { .. } => None,
        };
        Ok(Self {
            permits: Semaphore::new(config.max_concurrent_statements.max(1)),
            config,
            http,
            auth,
            session: Mutex::new(None),
        })
    }

    pub fn is_cloud(&self) -> bool {
        self.auth.is_some()
    }

    /// The engine's name (Cloud).
    pub fn engine_name(&self) -> Option<&str> {
        match &self.config.target {
            Target::Cloud { engine, .. } => Some(engine),
            Target::Core { .. } => None,
        }
    }

    fn retry_budget(&self) -> RetryBudget {
        RetryBudget {
            max_retries: self.config.max_retries,
            backoff: self.config.backoff,
            max_retry_after: self.config.max_retry_after,
        }
    }

    fn auth_retry(&self) -> AuthRetry {
        AuthRetry {
            budget: self.retry_budget(),
            timeout: self.config.request_timeout.min(Duration::from_secs(30)),
        }
    }

    /// After a 401: the token cache and the generation of the refused token, when the token
    /// may be renewed (once per request, and only where there is one: Cloud).
    fn renewable_token(
        &self,
        bearer: Option<&Bearer>,
        renewed_already: bool,
    ) -> Option<(&TokenCache, u64)> {
        match (&self.auth, bearer, renewed_already) {
            (Some(auth), Some(b), false) => Some((auth, b.generation)),
            _ => None,
        }
    }

    async fn bearer(&self) -> Result<Option<Bearer>, FireboltError> {
        match &self.auth {
            Some(auth) => Ok(Some(auth.bearer(&self.http, &self.auth_retry()).await?)),
            None => Ok(None),
        }
    }

    /// Step 1 of a connection check: a token (Cloud; nothing to do for Core).
    pub async fn authenticate(&self) -> Result<(), FireboltError> {
        self.bearer().await.map(|_| ())
    }

    /// The resolved session: for Cloud, the system engine found, `USE DATABASE` and
    /// `USE ENGINE` done (once, then cached); for Core, the URL and database.
    pub async fn session(&self) -> Result<SessionState, FireboltError> {
        let mut cached = self.session.lock().await;
        if let Some(s) = cached.as_ref() {
            return Ok(s.clone());
        }
        let resolved = self.resolve().await?;
        *cached = Some(resolved.clone());
        Ok(resolved)
    }

    /// Forgets the resolved session (after "engine stopped": the next statement resolves
    /// the engine again).
    pub async fn forget_session(&self) {
        *self.session.lock().await = None;
    }

    async fn resolve(&self) -> Result<SessionState, FireboltError> {
        let bad_url =
            |step: &'static str| move |message: String| FireboltError::Protocol { step, message };
        match &self.config.target {
            Target::Core { url } => {
                let mut s = SessionState::from_url(url).map_err(FireboltError::Config)?;
                s.params
                    .insert("database".into(), self.config.database.clone());
                Ok(s)
            }
            Target::Cloud {
                api_url,
                account,
                engine,
                ..
            } => {
                let system = self.engine_url(api_url, account).await?;
                let mut s = SessionState::from_url(&system).map_err(bad_url(ENGINE_DISCOVERY))?;
                let use_db = Statement::new(
                    "USE DATABASE",
                    "cdc-worker:connect:use-database",
                    format!("USE DATABASE {}", ident(&self.config.database)),
                );
                self.execute_in(&mut s, &use_db).await?;
                // The server names the database in Firebolt-Update-Parameters; make sure.
                s.params
                    .entry("database".into())
                    .or_insert_with(|| self.config.database.clone());
                let system_endpoint = s.endpoint.clone();
                let use_engine = Statement::new(
                    "USE ENGINE",
                    "cdc-worker:connect:use-engine",
                    format!("USE ENGINE {}", ident(engine)),
                );
                self.execute_in(&mut s, &use_engine).await?;
                if s.endpoint == system_endpoint && !s.params.contains_key("engine") {
                    return Err(FireboltError::Protocol {
                        step: "USE ENGINE",
                        message: "the reply carried no Firebolt-Update-Endpoint header".into(),
                    });
                }
                tracing::info!(endpoint = %s.endpoint, database = %self.config.database, engine = %engine, "Firebolt engine resolved");
                Ok(s)
            }
        }
    }

    /// The account's system engine URL (`GET /web/v3/account/{account}/engineUrl`).
    async fn engine_url(&self, api_url: &str, account: &str) -> Result<String, FireboltError> {
        let url = engine_url_path(api_url, account);
        let mut attempt = 0;
        let mut reauthenticated = false;
        loop {
            let bearer = self.bearer().await?;
            let failure = match self
                .request_engine_url(&url, account, bearer.as_ref())
                .await
            {
                Ok(engine_url) => return Ok(engine_url),
                Err(failure) => failure,
            };
            match failure {
                Failure::Unauthorized(message) => {
                    let Some((auth, generation)) =
                        self.renewable_token(bearer.as_ref(), reauthenticated)
                    else {
                        return Err(FireboltError::Auth {
                            step: ENGINE_DISCOVERY,
                            message,
                        });
                    };
                    auth.invalidate(generation).await;
                    reauthenticated = true;
                }
                Failure::Other { error, retry } => {
                    // A GET changes nothing: it counts as idempotent, so every transient
                    // failure may be retried.
                    let Some(delay) = self.retry_delay(retry, true, attempt) else {
                        return Err(error);
                    };
                    tracing::warn!(step = ENGINE_DISCOVERY, attempt = attempt + 1, delay_ms = delay.as_millis() as u64, error = %error, "Firebolt request failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One `GET` of the engine URL at `url`.
    async fn request_engine_url(
        &self,
        url: &str,
        account: &str,
        bearer: Option<&Bearer>,
    ) -> Result<String, Failure> {
        let mut request = self.http.get(url).timeout(self.config.request_timeout);
        if let Some(b) = bearer {
            request = request.bearer_auth(b.token.expose());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                return Err(classify_transport(
                    ENGINE_DISCOVERY,
                    e,
                    self.config.request_timeout,
                ));
            }
        };
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        match status {
            200..=299 => engine_url_of_reply(&text).map_err(Failure::permanent),
            404 => Err(Failure::permanent(FireboltError::Auth {
                step: ENGINE_DISCOVERY,
                message: format!(
                    "account `{account}` does not exist or this service account has no access to it ({})",
                    error_message(&text)
                ),
            })),
            _ => Err(classify_status(
                ENGINE_DISCOVERY,
                status,
                &text,
                retry_after,
            )),
        }
    }

    /// How long to wait before the next attempt, or `None` to give up.
    fn retry_delay(&self, retry: Retry, idempotent: bool, attempt: u32) -> Option<Duration> {
        let budget = self.retry_budget();
        match retry {
            Retry::Never => None,
            Retry::IfIdempotent if !idempotent => None,
            Retry::IfIdempotent | Retry::Always(None) => budget.delay(attempt, None),
            // Honour the server's wait, with a little jitter so workers do not return together.
            Retry::Always(Some(after)) => budget
                .delay(attempt, Some(after))
                .map(|wait| wait + Duration::from_millis(fastrand::u64(0..=100))),
        }
    }

    /// Runs one statement on the resolved session.
    pub async fn execute(&self, statement: &Statement) -> Result<QueryResult, FireboltError> {
        let mut session = self.session().await?;
        self.execute_in(&mut session, statement).await
    }

    /// Runs one statement on `session`, applying the session headers of the reply to it
    /// (a transaction lives in such a session: `transaction_id` arrives that way).
    pub async fn execute_in(
        &self,
        session: &mut SessionState,
        statement: &Statement,
    ) -> Result<QueryResult, FireboltError> {
        let mut attempt = 0;
        let mut reauthenticated = false;
        tracing::debug!(query_label = %statement.label, kind = statement.kind, sql = %statement.log_text(), "Firebolt statement");
        loop {
            let bearer = self.bearer().await?;
            let started = Instant::now();
            let (outcome, updates) = self
                .send_within_limit(session, statement, bearer.as_ref())
                .await;
            apply_session_updates(session, statement, &updates)?;
            let failure = match outcome {
                Ok(result) => {
                    log_statement_done(statement, started, &result);
                    return Ok(result);
                }
                Err(f) => f,
            };
            match failure {
                Failure::Unauthorized(message) => {
                    let Some((auth, generation)) =
                        self.renewable_token(bearer.as_ref(), reauthenticated)
                    else {
                        return Err(statement.scrub(FireboltError::Auth {
                            step: statement.kind,
                            message: format!("HTTP 401: {message}"),
                        }));
                    };
                    tracing::info!(query_label = %statement.label, "Firebolt token refused; authenticating again");
                    auth.invalidate(generation).await;
                    reauthenticated = true;
                }
                Failure::Other { error, retry } => {
                    let error = statement.scrub(error);
                    if let FireboltError::EngineStopped { .. } = error {
                        self.forget_session().await;
                    }
                    let Some(delay) = self.retry_delay(retry, statement.idempotent, attempt) else {
                        tracing::warn!(query_label = %statement.label, kind = statement.kind, attempts = attempt + 1, error = %error, "Firebolt statement failed");
                        return Err(error);
                    };
                    tracing::warn!(query_label = %statement.label, kind = statement.kind, attempt = attempt + 1, delay_ms = delay.as_millis() as u64, error = %error, "Firebolt statement failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// [`Self::send_once`] within the bound on statements in flight.
    async fn send_within_limit(
        &self,
        session: &SessionState,
        statement: &Statement,
        bearer: Option<&Bearer>,
    ) -> (Result<QueryResult, Failure>, SessionUpdates) {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        self.send_once(session, statement, bearer).await
    }

    /// One attempt at `statement`: its outcome, and the session headers of the reply
    /// (applied by the caller even when the statement failed).
    async fn send_once(
        &self,
        session: &SessionState,
        statement: &Statement,
        bearer: Option<&Bearer>,
    ) -> (Result<QueryResult, Failure>, SessionUpdates) {
        let step = statement.kind;
        let url = match statement_url(session, statement) {
            Ok(url) => url,
            Err(message) => {
                return (
                    Err(Failure::permanent(FireboltError::Config(message))),
                    SessionUpdates::default(),
                );
            }
        };
        let response = match self.post_statement(url, statement, bearer).send().await {
            Ok(r) => r,
            Err(e) => {
                return (
                    Err(classify_transport(step, e, self.config.request_timeout)),
                    SessionUpdates::default(),
                );
            }
        };
        let status = response.status().as_u16();
        let updates = SessionUpdates::from_headers(response.headers());
        let retry_after = retry_after(response.headers());
        let outcome = match response.text().await {
            Ok(text) => statement_reply(step, status, &statement.mask(text), retry_after),
            Err(e) => Err(classify_transport(step, e, self.config.request_timeout)),
        };
        (outcome, updates)
    }

    /// The request that sends `statement` to `url`.
    fn post_statement(
        &self,
        url: reqwest::Url,
        statement: &Statement,
        bearer: Option<&Bearer>,
    ) -> reqwest::RequestBuilder {
        let request = self
            .http
            .post(url)
            .header(HEADER_PROTOCOL_VERSION, PROTOCOL_VERSION)
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .timeout(self.config.request_timeout)
            .body(statement.sql.clone());
        match bearer {
            Some(b) => request.bearer_auth(b.token.expose()),
            None => request,
        }
    }
}

/// The session's statement URL for `statement`, with its per-statement settings.
fn statement_url(session: &SessionState, statement: &Statement) -> Result<reqwest::Url, String> {
    let mut url = session.statement_url(&statement.label)?;
    if statement.cancel_on_drop {
        url.query_pairs_mut()
            .append_pair(CANCEL_ON_DROP.0, CANCEL_ON_DROP.1);
    }
    Ok(url)
}

/// What a statement's reply means: its rows, or the failure (secrets already masked in
/// `text`).
fn statement_reply(
    step: &'static str,
    status: u16,
    text: &str,
    retry_after: Option<Duration>,
) -> Result<QueryResult, Failure> {
    if !(200..300).contains(&status) {
        return Err(classify_status(step, status, text, retry_after));
    }
    // Errors come with HTTP 200 too.
    match parse_body(text) {
        Ok(Body::Rows(result)) => Ok(result),
        Ok(Body::Errors { errors, query_id }) => Err(Failure::permanent(FireboltError::Sql {
            step,
            errors,
            query_id,
        })),
        Err(text) => Err(Failure::permanent(FireboltError::Protocol {
            step,
            message: format!("HTTP {status} with a body that is not JSON: {text}"),
        })),
    }
}

/// Applies the session headers of a reply (`Firebolt-Update-Parameters`, ...) to `session`.
fn apply_session_updates(
    session: &mut SessionState,
    statement: &Statement,
    updates: &SessionUpdates,
) -> Result<(), FireboltError> {
    if updates.is_empty() {
        return Ok(());
    }
    tracing::debug!(query_label = %statement.label, ?updates, "Firebolt session updated");
    session
        .apply(updates)
        .map_err(|message| FireboltError::Protocol {
            step: statement.kind,
            message,
        })
}

fn log_statement_done(statement: &Statement, started: Instant, result: &QueryResult) {
    tracing::debug!(
        query_label = %statement.label,
        kind = statement.kind,
        elapsed_ms = started.elapsed().as_millis() as u64,
        rows = result.rows.len(),
        query_id = result.query_id.as_deref().unwrap_or(""),
        "Firebolt statement done"
    );
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_is_read_from_unquoted_keywords() {
        assert!(is_idempotent("SELECT 1"));
        assert!(is_idempotent("  select count(*) FROM t"));
        assert!(is_idempotent("DROP TABLE IF EXISTS \"s\".\"t\""));
        assert!(is_idempotent(
            "CREATE TABLE IF NOT EXISTS \"t\" (a INT NULL)"
        ));
        assert!(is_idempotent(
            "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"c\" TEXT NULL"
        ));
        assert!(!is_idempotent("DROP TABLE \"t\""));
        assert!(!is_idempotent("DROP TABLE \"IF EXISTS\""));
        assert!(!is_idempotent("CREATE TABLE \"IF NOT EXISTS\" (a INT)"));
        assert!(!is_idempotent("INSERT INTO t VALUES (1)"));
        assert!(!is_idempotent(
            "MERGE INTO t USING s ON a = b WHEN MATCHED THEN DELETE"
        ));
        assert!(!is_idempotent("COPY INTO t FROM 's3://b/k'"));
        assert!(!is_idempotent("COMMIT"));
    }

    #[test]
    fn statuses_say_what_may_be_retried() {
        let retry = |status, body: &str| match classify_status(
            "merge",
            status,
            body,
            Some(Duration::from_secs(2)),
        ) {
            Failure::Other { retry, error } => (retry, error),
            Failure::Unauthorized(m) => panic!("401: {m}"),
        };
        assert!(matches!(
            classify_status("x", 401, "{}", None),
            Failure::Unauthorized(_)
        ));
        assert_eq!(
            retry(429, "").0,
            Retry::Always(Some(Duration::from_secs(2)))
        );
        assert!(matches!(
            retry(429, "").1,
            FireboltError::RateLimited { .. }
        ));
        assert!(matches!(
            retry(503, "").1,
            FireboltError::EngineStopped { status: 503, .. }
        ));
        let (r, e) = retry(404, "Engine my_engine is stopped");
        assert_eq!(r, Retry::Never);
        assert!(matches!(
            e,
            FireboltError::EngineStopped { status: 404, .. }
        ));
        assert_eq!(retry(504, "").0, Retry::IfIdempotent);
        assert_eq!(retry(502, "").0, Retry::IfIdempotent);
        // A 500 that wraps an upstream 401 is an expired token (the Python SDK's reading).
        assert!(matches!(
            classify_status(
                "x",
                500,
                "Received error from remote server /core/v1/accounts/1/engines. HTTP status code: 401 Unauthorized, body: failed to verify JWT token",
                None
            ),
            Failure::Unauthorized(_)
        ));
        assert_eq!(retry(500, "HTTP status code: 503 oops").0, Retry::Never);
        let (r, e) = retry(400, r#"{"errors":[{"description":"syntax error"}]}"#);
        assert_eq!(r, Retry::Never);
        assert_eq!(e.sql_description().as_deref(), Some("syntax error"));
    }

    #[test]
    fn replies_say_rows_or_why_not() {
        let ok = statement_reply("select", 200, r#"{"meta":[],"data":[],"rows":0}"#, None);
        assert!(ok.is_ok(), "{ok:?}");
        let sql_error = r#"{"errors":[{"description":"syntax error"}]}"#;
        for status in [200, 400] {
            assert!(matches!(
                statement_reply("merge", status, sql_error, None),
                Err(Failure::Other {
                    error: FireboltError::Sql { .. },
                    retry: Retry::Never
                })
            ));
        }
        assert!(matches!(
            statement_reply("merge", 200, "<html>", None),
            Err(Failure::Other {
                error: FireboltError::Protocol { .. },
                retry: Retry::Never
            })
        ));
        assert!(matches!(
            statement_reply("merge", 503, "", Some(Duration::from_secs(1))),
            Err(Failure::Other {
                retry: Retry::Always(Some(_)),
                ..
            })
        ));
        assert_eq!(
            engine_url_of_reply(r#"{"engineUrl":"sys.example"}"#).unwrap(),
            "sys.example"
        );
        for reply in ["", r#"{"engineUrl":""}"#, r#"{"url":"x"}"#] {
            assert!(matches!(
                engine_url_of_reply(reply),
                Err(FireboltError::Protocol {
                    step: ENGINE_DISCOVERY,
                    ..
                })
            ));
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for attempt in 0..10 {
            let d = b.delay(attempt);
            let full = Duration::from_millis(100 * 2u64.pow(attempt)).min(Duration::from_secs(1));
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn cloud_urls_derive_from_the_api_host() {
        assert_eq!(
            auth_url_for("https://api.app.firebolt.io"),
            "https://id.app.firebolt.io"
        );
        assert_eq!(auth_url_for("http://127.0.0.1:9"), "http://127.0.0.1:9");
        assert_eq!(
            auth_url_for("https://api.staging.firebolt.io"),
            "https://id.staging.firebolt.io"
        );
        assert_eq!(
            auth_url_for("http://gateway.test:8080"),
            "http://id.test:8080",
            "the first label, whatever it is"
        );
        assert_eq!(
            engine_url_path("https://api.app.firebolt.io/", "my-account_1.x"),
            "https://api.app.firebolt.io/web/v3/account/my-account_1.x/engineUrl",
            "sent raw, as the SDKs send it"
        );
        assert_eq!(
            engine_url_path("https://a", "a b/c?"),
            "https://a/web/v3/account/a%20b%2Fc%3F/engineUrl"
        );
        let config = FireboltConfig {
            client_id: Some("id".into()),
            client_secret: Some(crate::config::Secret::new("hunter2")),
            account: Some("acme".into()),
            engine: Some("eng".into()),
            ..FireboltConfig::default()
        };
        let c = ClientConfig::from_config(&config).unwrap();
        let Target::Cloud {
            api_url,
            credentials,
            ..
        } = &c.target
        else {
            panic!()
        };
        assert_eq!(api_url, "https://api.app.firebolt.io");
        assert_eq!(credentials.auth_url, "https://id.app.firebolt.io");
        let client = Client::new(c).unwrap();
        assert!(!format!("{client:?}").contains("hunter2"));
        let statement = Statement::new("copy", "l", "COPY .. AWS_SECRET_ACCESS_KEY = 'hunter2'")
            .with_redacted("COPY .. '****'");
        assert!(!format!("{statement:?}").contains("hunter2"));
    }
}

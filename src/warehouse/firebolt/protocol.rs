//! Firebolt's HTTP protocol as plain data: the session a request is sent with (endpoint
//! and query parameters), the response headers that change it, and the JSON_Compact and
//! error bodies. No I/O here, so every rule is unit tested.
//! Source: /work/shared/reference/firebolt-protocol.md.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use reqwest::Url;
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::error::{ServerError, truncate};

pub const PROTOCOL_VERSION: &str = "2.4";
pub const HEADER_PROTOCOL_VERSION: &str = "Firebolt-Protocol-Version";
pub const HEADER_UPDATE_PARAMETERS: &str = "Firebolt-Update-Parameters";
pub const HEADER_REMOVE_PARAMETERS: &str = "Firebolt-Remove-Parameters";
pub const HEADER_RESET_SESSION: &str = "Firebolt-Reset-Session";
pub const HEADER_UPDATE_ENDPOINT: &str = "Firebolt-Update-Endpoint";
pub const OUTPUT_FORMAT: &str = "JSON_Compact";

/// Parameters a `Firebolt-Reset-Session` keeps (output_format is added per request): the
/// ones only `USE` sets, as both SDKs keep (Python `IMMUTABLE_PARAMETER_LIST`, Go
/// `GetUseParametersList`).
const KEPT_ON_RESET: [&str; 2] = ["database", "engine"];

/// Where statements go and with which parameters: what a Firebolt "connection" is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// `scheme://host[:port][/path]`, without query string.
    pub endpoint: String,
    pub params: BTreeMap<String, String>,
}

impl SessionState {
    /// From a URL as the server gives it (`engineUrl`, `Firebolt-Update-Endpoint`): no
    /// scheme means https; its query parameters become session parameters.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let mut state = SessionState {
            endpoint: String::new(),
            params: BTreeMap::new(),
        };
        state.set_endpoint(url)?;
        Ok(state)
    }

    fn set_endpoint(&mut self, url: &str) -> Result<(), String> {
        let url = url.trim();
        let with_scheme = if url.contains("://") {
            url.to_string()
        } else {
            format!("https://{url}")
        };
        let mut parsed = Url::parse(&with_scheme)
            .map_err(|e| format!("bad endpoint URL `{}`: {e}", truncate(url)))?;
        for (k, v) in parsed.query_pairs() {
            self.params.insert(k.into_owned(), v.into_owned());
        }
        parsed.set_query(None);
        parsed.set_fragment(None);
        self.endpoint = parsed.to_string();
        Ok(())
    }

    /// Applies the session headers of a response in the Python SDK's order
    /// (`_parse_response_headers`): new endpoint, reset, updated parameters, removed ones.
    pub fn apply(&mut self, updates: &SessionUpdates) -> Result<(), String> {
        if let Some(endpoint) = &updates.endpoint {
            self.set_endpoint(endpoint)?;
        }
        if updates.reset {
            self.params
                .retain(|k, _| KEPT_ON_RESET.contains(&k.as_str()));
        }
        for (k, v) in &updates.set {
            self.params.insert(k.clone(), v.clone());
        }
        for k in &updates.remove {
            self.params.remove(k);
        }
        Ok(())
    }

    /// The URL of one statement: session parameters, JSON_Compact, and the query label.
    pub fn statement_url(&self, query_label: &str) -> Result<Url, String> {
        let mut url = Url::parse(&self.endpoint)
            .map_err(|e| format!("bad endpoint `{}`: {e}", self.endpoint))?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in &self.params {
                if k != "output_format" && k != "query_label" {
                    q.append_pair(k, v);
                }
            }
            q.append_pair("output_format", OUTPUT_FORMAT);
            if !query_label.is_empty() {
                q.append_pair("query_label", query_label);
            }
        }
        Ok(url)
    }
}

/// The session headers of one response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionUpdates {
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
    pub reset: bool,
    pub endpoint: Option<String>,
}

impl SessionUpdates {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let texts = |name: &str| -> Vec<String> {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::to_string)
                .collect()
        };
        let mut updates = SessionUpdates::default();
        for value in texts(HEADER_UPDATE_PARAMETERS) {
            for pair in value.split(',') {
                if let Some((k, v)) = pair.split_once('=') {
                    let k = k.trim();
                    if !k.is_empty() {
                        updates.set.push((k.to_string(), v.trim().to_string()));
                    }
                }
            }
        }
        for value in texts(HEADER_REMOVE_PARAMETERS) {
            updates.remove.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_string),
            );
        }
        updates.reset = headers.contains_key(HEADER_RESET_SESSION);
        updates.endpoint = texts(HEADER_UPDATE_ENDPOINT)
            .into_iter()
            .next()
            .filter(|e| !e.trim().is_empty());
        updates
    }

    pub fn is_empty(&self) -> bool {
        self == &SessionUpdates::default()
    }
}

/// A column of a result as `meta` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMeta {
    pub name: String,
    pub type_name: String,
}

/// The rows of a JSON_Compact reply (empty for DDL/DML with an empty body).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<ColumnMeta>,
    pub rows: Vec<Vec<Value>>,
    pub query_id: Option<String>,
}

impl QueryResult {
    pub fn value(&self, row: usize, col: usize) -> Option<&Value> {
        self.rows.get(row).and_then(|r| r.get(col))
    }

    /// A non-negative integer (Firebolt may send bigints as strings); NULL is 0.
    pub fn u64_at(&self, row: usize, col: usize) -> Result<u64, String> {
        match self.value(row, col) {
            None | Some(Value::Null) => Ok(0),
            Some(v) => as_u64(v)
                .ok_or_else(|| format!("expected a count at row {row} column {col}, got {v}")),
        }
    }

    pub fn text_at(&self, row: usize, col: usize) -> Option<String> {
        self.value(row, col).and_then(as_text)
    }
}

/// What a body says.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Rows(QueryResult),
    Errors {
        errors: Vec<ServerError>,
        query_id: Option<String>,
    },
}

/// Parses a reply body: empty is an empty result, `errors` wins over everything (it comes
/// with HTTP 200 too), otherwise JSON_Compact. `Err` carries a non-JSON body.
pub fn parse_body(text: &str) -> Result<Body, String> {
    if text.trim().is_empty() {
        return Ok(Body::Rows(QueryResult::default()));
    }
    let json: Value = serde_json::from_str(text).map_err(|_| truncate(text))?;
    let query_id = json.pointer("/query/query_id").and_then(as_text);
    if let Some(errors) = json
        .get("errors")
        .and_then(Value::as_array)
        .filter(|e| !e.is_empty())
    {
        return Ok(Body::Errors {
            errors: errors.iter().map(server_error).collect(),
            query_id,
        });
    }
    let columns = json
        .get("meta")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .map(|c| ColumnMeta {
                    name: c.get("name").and_then(as_text).unwrap_or_default(),
                    type_name: c.get("type").and_then(as_text).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let rows = match json.get("data") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(rows)) => rows
            .iter()
            .map(|r| match r {
                Value::Array(values) => Ok(values.clone()),
                other => Err(format!(
                    "a JSON_Compact row is not an array: {}",
                    truncate(&other.to_string())
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(format!(
                "`data` is not an array: {}",
                truncate(&other.to_string())
            ));
        }
    };
    Ok(Body::Rows(QueryResult {
        columns,
        rows,
        query_id,
    }))
}

fn server_error(e: &Value) -> ServerError {
    let field = |k: &str| e.get(k).and_then(as_text).filter(|s| !s.is_empty());
    ServerError {
        code: field("code"),
        name: field("name"),
        description: field("description")
            .or_else(|| field("message"))
            .unwrap_or_else(|| truncate(&e.to_string())),
    }
}

/// The message of an error reply that is not an `errors` array: the token endpoint's
/// `{"error": .., "error_description": ..}` or `{"message": ..}`, else the text itself.
pub fn error_message(text: &str) -> String {
    if let Ok(json) = serde_json::from_str::<Value>(text) {
        if let Some(errors) = json
            .get("errors")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        {
            return errors
                .iter()
                .map(|e| server_error(e).to_string())
                .collect::<Vec<_>>()
                .join("; ");
        }
        let field = |k: &str| json.get(k).and_then(as_text).filter(|s| !s.is_empty());
        let parts: Vec<String> = ["error", "error_description", "message", "kind"]
            .iter()
            .filter_map(|k| field(k))
            .collect();
        if !parts.is_empty() {
            return truncate(&parts.join(": "));
        }
    }
    if text.trim().is_empty() {
        "(empty body)".into()
    } else {
        truncate(text)
    }
}

/// A count from JSON: a number, or a string holding one (bigints may come as strings).
pub fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at.timestamp().max(0) as u64);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn engine_urls_get_https_and_their_params_become_session_params() {
        let s = SessionState::from_url(
            "acme-sys.us-east-1.app.firebolt.io?account_id=42&engine=system",
        )
        .unwrap();
        assert_eq!(s.endpoint, "https://acme-sys.us-east-1.app.firebolt.io/");
        assert_eq!(s.params.get("account_id").map(String::as_str), Some("42"));
        let url = s.statement_url("b1:01:check").unwrap();
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert!(pairs.contains(&("output_format".into(), "JSON_Compact".into())));
        assert!(pairs.contains(&("query_label".into(), "b1:01:check".into())));
        let core = SessionState::from_url("http://localhost:3473").unwrap();
        assert_eq!(core.endpoint, "http://localhost:3473/");
    }

    #[test]
    fn session_headers_update_remove_reset_and_move() {
        let mut s = SessionState::from_url("https://sys.example?account_id=1").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            HEADER_UPDATE_PARAMETERS,
            HeaderValue::from_static("database=db, transaction_id=7"),
        );
        s.apply(&SessionUpdates::from_headers(&h)).unwrap();
        assert_eq!(s.params.get("database").map(String::as_str), Some("db"));
        assert_eq!(
            s.params.get("transaction_id").map(String::as_str),
            Some("7")
        );

        let mut h = HeaderMap::new();
        h.insert(
            HEADER_REMOVE_PARAMETERS,
            HeaderValue::from_static("transaction_id"),
        );
        s.apply(&SessionUpdates::from_headers(&h)).unwrap();
        assert!(!s.params.contains_key("transaction_id"));

        let mut h = HeaderMap::new();
        h.insert(
            HEADER_UPDATE_ENDPOINT,
            HeaderValue::from_static("user.example/path?engine=eng&account_id=1"),
        );
        s.apply(&SessionUpdates::from_headers(&h)).unwrap();
        assert_eq!(s.endpoint, "https://user.example/path");
        assert_eq!(s.params.get("engine").map(String::as_str), Some("eng"));

        s.params.insert("some_setting".into(), "x".into());
        let mut h = HeaderMap::new();
        h.insert(HEADER_RESET_SESSION, HeaderValue::from_static(""));
        s.apply(&SessionUpdates::from_headers(&h)).unwrap();
        assert!(!s.params.contains_key("some_setting"));
        assert_eq!(
            s.params.keys().collect::<Vec<_>>(),
            ["database", "engine"],
            "only what USE sets survives a reset, as in both SDKs"
        );

        // Several Update-Parameters instances are each applied (JDBC reads one k=v each).
        let mut h = HeaderMap::new();
        h.append(HEADER_UPDATE_PARAMETERS, HeaderValue::from_static("a=1"));
        h.append(
            HEADER_UPDATE_PARAMETERS,
            HeaderValue::from_static("b=2, c=3"),
        );
        s.apply(&SessionUpdates::from_headers(&h)).unwrap();
        assert_eq!(
            (s.params.get("a"), s.params.get("b"), s.params.get("c")),
            (Some(&"1".into()), Some(&"2".into()), Some(&"3".into()))
        );
    }

    #[test]
    fn bodies_parse_rows_errors_and_empty() {
        let body = r#"{"query":{"query_id":"q1"},"meta":[{"name":"n","type":"long"},{"name":"s","type":"text null"}],
                       "data":[["12345678901234", "a"],[3, null]],"rows":2,"statistics":{"elapsed":0.1}}"#;
        let Body::Rows(r) = parse_body(body).unwrap() else {
            panic!()
        };
        assert_eq!(r.u64_at(0, 0).unwrap(), 12_345_678_901_234);
        assert_eq!(r.u64_at(1, 0).unwrap(), 3);
        assert_eq!(r.text_at(1, 1), None);
        assert_eq!(r.columns[1].type_name, "text null");
        assert_eq!(r.query_id.as_deref(), Some("q1"));

        let err = r#"{"errors":[{"code":"42P01","name":"UndefinedTable","severity":"ERROR","description":"relation \"t\" does not exist","location":{"failingLine":1}}],"query":{"query_id":"q2"}}"#;
        match parse_body(err).unwrap() {
            Body::Errors { errors, query_id } => {
                assert_eq!(errors[0].description, "relation \"t\" does not exist");
                assert_eq!(errors[0].code.as_deref(), Some("42P01"));
                assert_eq!(query_id.as_deref(), Some("q2"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_body("").unwrap(), Body::Rows(QueryResult::default()));
        assert!(parse_body("Syntax error near x").is_err());
        assert_eq!(
            error_message(r#"{"error":"invalid_client","error_description":"bad secret"}"#),
            "invalid_client: bad secret"
        );
        assert_eq!(error_message("plain text"), "plain text");
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}

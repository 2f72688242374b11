//! What can go wrong talking to Firebolt, typed so that callers (the retry loop, the apply
//! engine, `check-connection`) can act on it. Messages carry the server's description but
//! never a credential: the client secret travels only in the token request's form body and
//! the bearer token only in a header marked sensitive, and neither is put into an error.

use std::time::Duration;

use crate::warehouse::WarehouseError;

/// One entry of the `errors` array Firebolt returns (with HTTP 200 too).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerError {
    pub code: Option<String>,
    pub name: Option<String>,
    pub description: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.name, &self.code) {
            (Some(name), Some(code)) => write!(f, "{name} ({code}): {}", self.description),
            (Some(name), None) => write!(f, "{name}: {}", self.description),
            (None, Some(code)) => write!(f, "({code}) {}", self.description),
            (None, None) => f.write_str(&self.description),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FireboltError {
    /// Credentials refused (token endpoint, or 401/403 after one re-authentication).
    #[error("{step}: authentication failed: {message}")]
    Auth { step: &'static str, message: String },
    /// The engine is stopped (404 "is stopped") or not running (503).
    #[error("{step}: engine not running (HTTP {status}): {message}")]
    EngineStopped {
        step: &'static str,
        status: u16,
        message: String,
    },
    /// 429: the server asked us to slow down.
    #[error("{step}: rate limited (HTTP 429{}): {message}", retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        step: &'static str,
        retry_after: Option<Duration>,
        message: String,
    },
    /// No answer within the request timeout: the statement may still be running.
    #[error("{step}: no answer within {}s", timeout.as_secs())]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    /// The connection could not be made or broke.
    #[error("{step}: connection failed: {message}")]
    Connection { step: &'static str, message: String },
    /// The statement was refused; the description is the server's.
    #[error("{step}: SQL error: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Sql {
        step: &'static str,
        errors: Vec<ServerError>,
        query_id: Option<String>,
    },
    /// Any other HTTP status (502, 504, 408, 5xx without an errors array, ...).
    #[error("{step}: HTTP {status}: {message}")]
    Http {
        step: &'static str,
        status: u16,
        message: String,
    },
    /// The reply did not follow the protocol (not JSON, missing fields).
    #[error("{step}: unexpected reply: {message}")]
    Protocol { step: &'static str, message: String },
    /// The configuration cannot work (bad URL).
    #[error("configuration: {0}")]
    Config(String),
}

impl FireboltError {
    /// Which step of talking to Firebolt failed: "authentication", "engine discovery",
    /// "USE DATABASE", "USE ENGINE", or the statement kind.
    pub fn step(&self) -> &'static str {
        match self {
            FireboltError::Auth { step, .. }
            | FireboltError::EngineStopped { step, .. }
            | FireboltError::RateLimited { step, .. }
            | FireboltError::Timeout { step, .. }
            | FireboltError::Connection { step, .. }
            | FireboltError::Sql { step, .. }
            | FireboltError::Http { step, .. }
            | FireboltError::Protocol { step, .. } => step,
            FireboltError::Config(_) => "configuration",
        }
    }

    /// The same error with every occurrence of `secret` masked: a server may echo the
    /// statement (and a COPY's credentials with it) in its message.
    pub fn scrubbed(self, secret: &str) -> Self {
        if secret.is_empty() {
            return self;
        }
        let mask = |text: String| text.replace(secret, "****");
        match self {
            FireboltError::Auth { step, message } => FireboltError::Auth {
                step,
                message: mask(message),
            },
            FireboltError::EngineStopped {
                step,
                status,
                message,
            } => FireboltError::EngineStopped {
                step,
                status,
                message: mask(message),
            },
            FireboltError::RateLimited {
                step,
                retry_after,
                message,
            } => FireboltError::RateLimited {
                step,
                retry_after,
                message: mask(message),
            },
            FireboltError::Connection { step, message } => FireboltError::Connection {
                step,
                message: mask(message),
            },
            FireboltError::Sql {
                step,
                errors,
                query_id,
            } => FireboltError::Sql {
                step,
                errors: errors
                    .into_iter()
                    .map(|e| ServerError {
                        code: e.code,
                        name: e.name,
                        description: mask(e.description),
                    })
                    .collect(),
                query_id,
            },
            FireboltError::Http {
                step,
                status,
                message,
            } => FireboltError::Http {
                step,
                status,
                message: mask(message),
            },
            FireboltError::Protocol { step, message } => FireboltError::Protocol {
                step,
                message: mask(message),
            },
            FireboltError::Config(message) => FireboltError::Config(mask(message)),
            e @ FireboltError::Timeout { .. } => e,
        }
    }

    /// The server's description of a SQL error, if this is one.
    pub fn sql_description(&self) -> Option<String> {
        match self {
            FireboltError::Sql { errors, .. } => Some(
                errors
                    .iter()
                    .map(|e| e.description.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            _ => None,
        }
    }
}

/// Longest server text kept in an error (bodies can be whole HTML pages).
pub const MAX_MESSAGE: usize = 600;

/// Shortens a server message to [`MAX_MESSAGE`] bytes on a character boundary.
pub fn truncate(text: &str) -> String {
    let text = text.trim();
    if text.len() <= MAX_MESSAGE {
        return text.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Whether a COPY error says the file's values are at fault: with MAX_ERRORS_PER_FILE = 0
/// a row that cannot be read or converted fails the COPY (COPY FROM reference), and
/// loading the same file again cannot succeed. The wording is UNCONFIRMED: only these
/// phrases count, anything else (access denied, a missing table) stays a SQL error.
fn is_data_error(description: &str) -> bool {
    [
        "cannot convert",
        "can not convert",
        "cannot parse",
        "could not parse",
        "failed to parse",
        "conversion",
        "out of range",
        "overflow",
        "invalid input syntax",
        "corrupt",
        "not a parquet file",
        "invalid parquet",
        "does not fit",
    ]
    .iter()
    .any(|p| description.contains(p))
}

impl From<FireboltError> for WarehouseError {
    fn from(e: FireboltError) -> Self {
        let text = e.to_string();
        match &e {
            FireboltError::Auth { .. } => WarehouseError::Auth(text),
            FireboltError::EngineStopped { .. }
            | FireboltError::RateLimited { .. }
            | FireboltError::Timeout { .. }
            | FireboltError::Connection { .. } => WarehouseError::Unavailable(text),
            FireboltError::Http { status, .. } if *status >= 500 || *status == 408 => {
                WarehouseError::Unavailable(text)
            }
            FireboltError::Sql { step, errors, .. } => {
                let lower = text.to_ascii_lowercase();
                let description = errors
                    .iter()
                    .map(|e| e.description.to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join("; ");
                if lower.contains("conflict") || lower.contains("serializ") {
                    // Firebolt reports concurrent writers as a conflict at COMMIT
                    // ("detected 2 conflicts with 1 transactions on transaction commit"); the
                    // lane retries those.
                    WarehouseError::Conflict(text)
                } else if step.starts_with("create") && description.contains("already exists") {
                    // Two workers creating one table at once under serializable DDL (data
                    // management overview): the loser's CREATE .. IF NOT EXISTS is safe to
                    // send again, and finds the table then.
                    WarehouseError::Conflict(text)
                } else if *step == "copy" && is_data_error(&description) {
                    WarehouseError::Data(text)
                } else {
                    WarehouseError::Sql(text)
                }
            }
            FireboltError::Http { .. }
            | FireboltError::Protocol { .. }
            | FireboltError::Config(_) => WarehouseError::Other(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_what_the_engine_retries() {
        let stopped = FireboltError::EngineStopped {
            step: "merge",
            status: 404,
            message: "Engine my_engine is stopped".into(),
        };
        assert!(WarehouseError::from(stopped).is_retryable());
        let sql = FireboltError::Sql {
            step: "merge",
            errors: vec![ServerError {
                code: Some("42703".into()),
                name: Some("UndefinedColumn".into()),
                description: "column \"x\" does not exist".into(),
            }],
            query_id: None,
        };
        let text = sql.to_string();
        assert!(
            text.contains("column \"x\" does not exist") && text.starts_with("merge: "),
            "{text}"
        );
        assert!(matches!(WarehouseError::from(sql), WarehouseError::Sql(_)));
        let conflict = FireboltError::Sql {
            step: "commit",
            errors: vec![ServerError {
                description: "Transaction conflict detected".into(),
                ..Default::default()
            }],
            query_id: None,
        };
        assert!(matches!(
            WarehouseError::from(conflict),
            WarehouseError::Conflict(_)
        ));
        assert!(matches!(
            WarehouseError::from(FireboltError::Auth {
                step: "authentication",
                message: "invalid_client".into()
            }),
            WarehouseError::Auth(_)
        ));
    }

    #[test]
    fn data_errors_of_copy_are_poison_and_create_races_are_conflicts() {
        let sql = |step, description: &str| FireboltError::Sql {
            step,
            errors: vec![ServerError {
                description: description.into(),
                ..Default::default()
            }],
            query_id: None,
        };
        assert!(matches!(
            WarehouseError::from(sql(
                "copy",
                "Cannot convert value 'abc' to INTEGER in column n"
            )),
            WarehouseError::Data(_)
        ));
        assert!(matches!(
            WarehouseError::from(sql(
                "copy",
                "Access Denied (Service: Amazon S3; Status Code: 403)"
            )),
            WarehouseError::Sql(_)
        ));
        assert!(
            matches!(
                WarehouseError::from(sql("merge", "value out of range")),
                WarehouseError::Sql(_)
            ),
            "only COPY reads the files' values"
        );
        assert!(matches!(
            WarehouseError::from(sql("create-table", "relation \"orders\" already exists")),
            WarehouseError::Conflict(_)
        ));
        assert!(matches!(
            WarehouseError::from(sql(
                "commit",
                "Transaction failed: detected 2 conflicts with 1 transactions on transaction commit"
            )),
            WarehouseError::Conflict(_)
        ));
    }

    #[test]
    fn long_bodies_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(1000);
        let t = truncate(&long);
        assert!(t.len() <= MAX_MESSAGE + "…".len());
        assert!(t.ends_with('…'));
    }
}

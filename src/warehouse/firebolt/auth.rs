//! Firebolt Cloud authentication: OAuth2 client credentials, the token cached for every
//! worker, refreshed before it expires, and dropped on a 401 so that the next request
//! fetches a new one. One fetch at a time: concurrent callers wait for it instead of
//! stampeding the token endpoint.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex;

use crate::config::Secret;

use super::error::FireboltError;
use super::protocol::{error_message, parse_retry_after};
use super::transport::{RetryBudget, transport_message};

const STEP: &str = "authentication";

/// The audience every Firebolt token is issued for.
pub const AUDIENCE: &str = "https://api.firebolt.io";

/// Service-account credentials and where to exchange them.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Base URL of the token host, e.g. `https://id.app.firebolt.io`.
    pub auth_url: String,
    pub client_id: String,
    pub client_secret: Secret,
}

/// A bearer token with the generation it was fetched in (to drop only the token that
/// failed, not a newer one another worker fetched meanwhile).
#[derive(Debug, Clone)]
pub struct Bearer {
    pub token: Secret,
    pub generation: u64,
}

#[derive(Debug)]
struct Cached {
    bearer: Bearer,
    refresh_at: Instant,
}

/// How the token endpoint is retried (it has no side effects, so every failure that may
/// pass is retried).
#[derive(Debug, Clone, Copy)]
pub struct AuthRetry {
    pub budget: RetryBudget,
    pub timeout: Duration,
}

/// A token request that brought no token.
#[derive(Debug)]
enum Refused {
    /// Sending it again would not help (credentials refused, an unexpected status, a reply
    /// without a token).
    Finally(FireboltError),
    /// It may pass: retried after the server's `Retry-After`, or the backoff without one.
    ForNow {
        error: FireboltError,
        retry_after: Option<Duration>,
    },
}

#[derive(Debug)]
pub struct TokenCache {
    credentials: Credentials,
    cached: Mutex<Option<Cached>>,
    generation: std::sync::atomic::AtomicU64,
}

/// When to fetch a new token: five minutes before expiry, or at half the lifetime for
/// short-lived tokens (as the Node SDK does).
pub fn refresh_after(expires_in: Duration) -> Duration {
    let margin = Duration::from_secs(300);
    expires_in.saturating_sub(margin).max(expires_in / 2)
}

impl TokenCache {
    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials,
            cached: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The cached token, or a new one when there is none or it is due for refresh.
    pub async fn bearer(
        &self,
        http: &reqwest::Client,
        retry: &AuthRetry,
    ) -> Result<Bearer, FireboltError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.bearer.clone());
        }

        let (token, expires_in) = self.fetch(http, retry).await?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let bearer = Bearer { token, generation };
        *cached = Some(Cached {
            bearer: bearer.clone(),
            refresh_at: Instant::now() + refresh_after(expires_in),
        });
        tracing::debug!(
            generation,
            expires_in_s = expires_in.as_secs(),
            "Firebolt token fetched"
        );
        Ok(bearer)
    }

    /// Drops the token of `generation` (a request with it got 401).
    pub async fn invalidate(&self, generation: u64) {
        let mut cached = self.cached.lock().await;
        if cached
            .as_ref()
            .is_some_and(|c| c.bearer.generation == generation)
        {
            *cached = None;
        }
    }

    /// A new token, retried within `retry`'s budget.
    async fn fetch(
        &self,
        http: &reqwest::Client,
        retry: &AuthRetry,
    ) -> Result<(Secret, Duration), FireboltError> {
        let url = format!(
            "{}/oauth/token",
            self.credentials.auth_url.trim_end_matches('/')
        );
        let mut attempt = 0;
        loop {
            let (error, retry_after) = match self.request_token(http, &url, retry.timeout).await {
                Ok(token) => return Ok(token),
                Err(Refused::Finally(error)) => return Err(error),
                Err(Refused::ForNow { error, retry_after }) => (error, retry_after),
            };
            let Some(delay) = retry.budget.delay(attempt, retry_after) else {
                return Err(error);
            };
            tracing::warn!(attempt = attempt + 1, delay_ms = delay.as_millis() as u64, error = %error, "Firebolt token request failed; retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// One exchange of the client credentials for a token.
    async fn request_token(
        &self,
        http: &reqwest::Client,
        url: &str,
        timeout: Duration,
    ) -> Result<(Secret, Duration), Refused> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.credentials.client_id.as_str()),
            ("client_secret", self.credentials.client_secret.expose()),
            ("audience", AUDIENCE),
        ];
        let response = match http.post(url).form(&form).timeout(timeout).send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Err(Refused::ForNow {
                    error: FireboltError::Timeout {
                        step: STEP,
                        timeout,
                    },
                    retry_after: None,
                });
            }
            Err(e) => {
                return Err(Refused::ForNow {
                    error: FireboltError::Connection {
                        step: STEP,
                        message: transport_message(e),
                    },
                    retry_after: None,
                });
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let text = response.text().await.unwrap_or_default();
        // Whatever the server echoes, the secret does not leave this function.
        let text = text.replace(self.credentials.client_secret.expose(), "****");
        token_reply(status, &text, retry_after)
    }
}

/// What the token endpoint's answer means: the token, or whether to try again.
fn token_reply(
    status: u16,
    text: &str,
    retry_after: Option<Duration>,
) -> Result<(Secret, Duration), Refused> {
    let http = |status| FireboltError::Http {
        step: STEP,
        status,
        message: error_message(text),
    };
    match status {
        200..=299 => parse_token(text).map_err(Refused::Finally),
        400 | 401 | 403 => Err(Refused::Finally(FireboltError::Auth {
            step: STEP,
            message: format!("HTTP {status}: {}", error_message(text)),
        })),
        429 => Err(Refused::ForNow {
            error: FireboltError::RateLimited {
                step: STEP,
                retry_after,
                message: error_message(text),
            },
            retry_after,
        }),
        500..=599 | 408 => Err(Refused::ForNow {
            error: http(status),
            retry_after: None,
        }),
        _ => Err(Refused::Finally(http(status))),
    }
}

fn parse_token(text: &str) -> Result<(Secret, Duration), FireboltError> {
    #[derive(serde::Deserialize)]
    struct TokenReply {
        access_token: String,
        #[serde(default)]
        expires_in: Option<serde_json::Value>,
    }
    let reply: TokenReply = serde_json::from_str(text).map_err(|_| FireboltError::Protocol {
        step: STEP,
        message: "the token reply has no access_token".into(),
    })?;
    if reply.access_token.is_empty() {
        return Err(FireboltError::Protocol {
            step: STEP,
            message: "the token reply has an empty access_token".into(),
        });
    }
    // Without an expiry, assume an hour: a 401 still triggers a refresh.
    let expires_in = reply
        .expires_in
        .as_ref()
        .and_then(super::protocol::as_u64)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(3600));
    Ok((Secret::new(reply.access_token), expires_in))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_before_they_expire() {
        assert_eq!(
            refresh_after(Duration::from_secs(86_400)),
            Duration::from_secs(86_100)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(refresh_after(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_token_endpoint_is_retried_only_where_it_may_pass() {
        let wait = Some(Duration::from_secs(3));
        let outcome = |status| match token_reply(status, r#"{"error":"x"}"#, wait) {
            Ok(_) => panic!("{status}: a token"),
            Err(Refused::Finally(e)) => (None, e),
            Err(Refused::ForNow { error, retry_after }) => (Some(retry_after), error),
        };
        for status in [400, 401, 403] {
            assert!(matches!(
                outcome(status),
                (None, FireboltError::Auth { .. })
            ));
        }
        assert!(matches!(
            outcome(429),
            (Some(w), FireboltError::RateLimited { retry_after, .. }) if w == wait && retry_after == wait
        ));
        for status in [408, 500, 503] {
            assert!(matches!(
                outcome(status),
                (Some(None), FireboltError::Http { .. })
            ));
        }
        assert!(matches!(
            outcome(404),
            (None, FireboltError::Http { status: 404, .. })
        ));
        assert!(token_reply(200, r#"{"access_token":"t"}"#, None).is_ok());
        assert!(matches!(
            token_reply(200, "{}", None),
            Err(Refused::Finally(FireboltError::Protocol { .. }))
        ));
    }

    #[test]
    fn token_replies_parse_and_never_print() {
        let (token, expires) =
            parse_token(r#"{"access_token":"tok-123","token_type":"Bearer","expires_in":"86400"}"#)
                .unwrap();
        assert_eq!(token.expose(), "tok-123");
        assert_eq!(expires, Duration::from_secs(86_400));
        let bearer = Bearer {
            token,
            generation: 1,
        };
        assert!(!format!("{bearer:?}").contains("tok-123"));
        assert!(parse_token(r#"{"message":"nope"}"#).is_err());
        let credentials = Credentials {
            auth_url: "https://id.example".into(),
            client_id: "id".into(),
            client_secret: Secret::new("hunter2"),
        };
        assert!(
            !format!("{credentials:?} {:?}", TokenCache::new(credentials.clone()))
                .contains("hunter2")
        );
    }
}

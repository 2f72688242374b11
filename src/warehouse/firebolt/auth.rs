//! Firebolt Cloud authentication: OAuth2 client credentials, the token cached for every
//! worker, refreshed before it expires, and dropped on a 401 so that the next request
//! fetches a new one. One fetch at a time: concurrent callers wait for it instead of
//! stampeding the token endpoint.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex;

use crate::config::Secret;

use super::error::FireboltError;
use super::protocol::{error_message, parse_retry_after};

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
    pub max_retries: u32,
    pub backoff: super::transport::Backoff,
    pub max_retry_after: Duration,
    pub timeout: Duration,
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

    async fn fetch(
        &self,
        http: &reqwest::Client,
        retry: &AuthRetry,
    ) -> Result<(Secret, Duration), FireboltError> {
        let url = format!(
            "{}/oauth/token",
            self.credentials.auth_url.trim_end_matches('/')
        );
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.credentials.client_id.as_str()),
            ("client_secret", self.credentials.client_secret.expose()),
            ("audience", AUDIENCE),
        ];
        let mut attempt = 0;
        loop {
            let outcome = http
                .post(&url)
                .form(&form)
                .timeout(retry.timeout)
                .send()
                .await;
            let (error, wait) = match outcome {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    let text = response.text().await.unwrap_or_default();
                    // Whatever the server echoes, the secret does not leave this function.
                    let text = text.replace(self.credentials.client_secret.expose(), "****");
                    match status {
                        200..=299 => return parse_token(&text),
                        400 | 401 | 403 => {
                            return Err(FireboltError::Auth {
                                step: STEP,
                                message: format!("HTTP {status}: {}", error_message(&text)),
                            });
                        }
                        429 => (
                            FireboltError::RateLimited {
                                step: STEP,
                                retry_after,
                                message: error_message(&text),
                            },
                            retry_after,
                        ),
                        500..=599 | 408 => (
                            FireboltError::Http {
                                step: STEP,
                                status,
                                message: error_message(&text),
                            },
                            None,
                        ),
                        _ => {
                            return Err(FireboltError::Http {
                                step: STEP,
                                status,
                                message: error_message(&text),
                            });
                        }
                    }
                }
                Err(e) if e.is_timeout() => (
                    FireboltError::Timeout {
                        step: STEP,
                        timeout: retry.timeout,
                    },
                    None,
                ),
                Err(e) => (
                    FireboltError::Connection {
                        step: STEP,
                        message: super::transport::transport_message(e),
                    },
                    None,
                ),
            };
            if attempt >= retry.max_retries || wait.is_some_and(|w| w > retry.max_retry_after) {
                return Err(error);
            }
            let delay = wait.unwrap_or_else(|| retry.backoff.delay(attempt));
            tracing::warn!(attempt = attempt + 1, delay_ms = delay.as_millis() as u64, error = %error, "Firebolt token request failed; retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
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

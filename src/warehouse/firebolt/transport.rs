//! What every HTTP exchange with Firebolt shares, below both the token client and the
//! statement client: the retry budget and its backoff, and the text of a transport error.

use std::time::Duration;

use super::error::truncate;

/// Exponential backoff with jitter: attempt n waits between half and all of
/// `base * 2^n`, capped at `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let full = self
            .base
            .saturating_mul(2u32.saturating_pow(attempt.min(16)))
            .min(self.max);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max: Duration::from_secs(20),
        }
    }
}

/// How often and how long a failed request is retried; the token, engine-URL and
/// statement requests each decide which failures may be retried at all, then ask this.
#[derive(Debug, Clone, Copy)]
pub struct RetryBudget {
    pub max_retries: u32,
    pub backoff: Backoff,
    /// A `Retry-After` longer than this is not waited for: the error goes up.
    pub max_retry_after: Duration,
}

impl RetryBudget {
    /// The wait before the retry that follows failed attempt `attempt` (from 0): the
    /// server's `retry_after` when it gave one, else the backoff's; `None` when the
    /// retries are used up or the server asks for longer than `max_retry_after`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.max_retries {
            return None;
        }
        match retry_after {
            Some(wait) if wait > self.max_retry_after => None,
            Some(wait) => Some(wait),
            None => Some(self.backoff.delay(attempt)),
        }
    }
}

/// A transport error with its causes ("connection refused" is in a source, not in the
/// top-level message), without the URL (the step names the request).
pub fn transport_message(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    truncate(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_honours_the_server_within_its_limits() {
        let budget = RetryBudget {
            max_retries: 2,
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(1),
            },
            max_retry_after: Duration::from_secs(5),
        };
        assert_eq!(
            budget.delay(0, Some(Duration::from_secs(5))),
            Some(Duration::from_secs(5)),
            "the server's wait, exactly"
        );
        assert_eq!(budget.delay(0, Some(Duration::from_secs(6))), None);
        let backoff = budget.delay(1, None).unwrap();
        assert!(backoff >= Duration::from_millis(100) && backoff <= Duration::from_millis(200));
        assert_eq!(budget.delay(2, None), None, "two retries, then the error");
        assert_eq!(budget.delay(2, Some(Duration::from_secs(1))), None);
    }
}

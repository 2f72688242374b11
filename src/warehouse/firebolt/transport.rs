//! What every HTTP exchange with Firebolt shares, below both the token client and the
//! statement client: the retry backoff and the text of a transport error.

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

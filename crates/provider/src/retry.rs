//! Retries with bounded exponential backoff and full jitter, honouring Retry-After. Shared by
//! every provider so that they all back off the same way (design principle 6).

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::stats::CallStats;

/// How a provider retries one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// No waiting, for tests against local servers.
    pub fn fast() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
        }
    }

    /// The wait before attempt `attempt + 1`, given the error of attempt `attempt` (0-based).
    /// Full jitter keeps replicas and targets from retrying in lockstep; Retry-After, when
    /// the cloud sends it, is a floor, capped at `max_delay`.
    pub fn delay(&self, attempt: u32, error: &Error) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt.min(16)));
        let cap = exp.min(self.max_delay);
        let jittered = cap.mul_f64(fastrand::f64());
        match error.retry_after {
            Some(after) => after.min(self.max_delay).max(jittered),
            None => jittered,
        }
    }

    /// Runs `call` until it succeeds, fails with an error that is not retryable, or runs out
    /// of attempts. `on_retry` sees each retried error (for metrics and logs).
    pub async fn run<T, F, Fut>(
        &self,
        mut call: F,
        mut on_retry: impl FnMut(&Error, Duration),
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt + 1 < self.max_attempts.max(1) => {
                    let wait = self.delay(attempt, &e);
                    on_retry(&e, wait);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs one cloud API call as every provider does: each attempt and each retry counted in
    /// `stats` under `op`, retried like [`RetryPolicy::run`] with a warning that names `api`,
    /// the SDK's error mapped to ours by `map`, and a final failure counted.
    pub async fn call<T, E, F, Fut>(
        &self,
        stats: &CallStats,
        api: &'static str,
        op: &str,
        mut f: F,
        map: impl Fn(&str, E) -> Error,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        let map = &map;
        let out = self
            .run(
                || {
                    stats.call(op);
                    debug!(api, operation = op, "cloud call");
                    let fut = f();
                    async move { fut.await.map_err(|e| map(op, e)) }
                },
                |e, wait| {
                    stats.retry(op);
                    warn!(api, operation = op, error = %e, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "retrying cloud call");
                },
            )
            .await;
        if out.is_err() {
            stats.error(op);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_errors_then_succeeds() {
        let calls = AtomicU32::new(0);
        let mut retried = Vec::new();
        let out = RetryPolicy::default()
            .run(
                || async {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    if n < 2 {
                        Err(Error::new(ErrorKind::Throttled, "slow down"))
                    } else {
                        Ok(n)
                    }
                },
                |e, _| retried.push(e.kind),
            )
            .await;
        assert_eq!(out, Ok(2));
        assert_eq!(retried, vec![ErrorKind::Throttled, ErrorKind::Throttled]);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_permanent_errors() {
        let calls = AtomicU32::new(0);
        let out: Result<()> = RetryPolicy::default()
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(Error::new(ErrorKind::PermissionDenied, "no"))
                },
                |_, _| {},
            )
            .await;
        assert_eq!(out.unwrap_err().kind, ErrorKind::PermissionDenied);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts() {
        let calls = AtomicU32::new(0);
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let out: Result<()> = policy
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(Error::new(ErrorKind::Transient, "503"))
                },
                |_, _| {},
            )
            .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn delay_is_bounded_and_honours_retry_after() {
        let p = RetryPolicy::default();
        let plain = Error::new(ErrorKind::Throttled, "x");
        for attempt in 0..40 {
            assert!(p.delay(attempt, &plain) <= p.max_delay);
        }
        let after = plain.clone().with_retry_after(Duration::from_secs(3));
        assert!(p.delay(0, &after) >= Duration::from_secs(3));
        let long = plain.with_retry_after(Duration::from_secs(3600));
        assert_eq!(p.delay(0, &long), p.max_delay);
    }

    #[test]
    fn settings_fill_in_the_providers_longest_wait() {
        let parse = |json: &str| -> RetrySettings { serde_json::from_str(json).unwrap() };
        let minute = Duration::from_secs(60);
        let cases = [
            ("{}", Duration::from_secs(20), minute),
            (r#"{"maxAttempts": 3}"#, Duration::from_secs(20), minute),
            (
                r#"{"maxDelayMillis": 5000}"#,
                Duration::from_secs(5),
                Duration::from_secs(5),
            ),
            // The longest wait is never shorter than the first.
            (
                r#"{"baseDelayMillis": 9000, "maxDelayMillis": 10}"#,
                Duration::from_secs(9),
                Duration::from_secs(9),
            ),
        ];
        for (json, plain, azure) in cases {
            let s = parse(json);
            assert_eq!(s.policy().max_delay, plain, "{json}");
            assert_eq!(s.policy_with_max_delay(minute).max_delay, azure, "{json}");
        }
        assert_eq!(parse(r#"{"maxAttempts": 0}"#).policy().max_attempts, 1);
        assert!(serde_json::from_str::<RetrySettings>(r#"{"maxDelay": 1}"#).is_err());
    }
}

/// The `retry:` section of a provider's config: retries of throttled and transient
/// failures (the SDKs' own retries are off). Turned into a [`RetryPolicy`] by [`Self::policy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay_millis: u64,
    /// The longest wait. Unset: the provider's own (20 s; Azure 60 s, as ARM asks for up to
    /// a minute when an NSG is busy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_delay_millis: Option<u64>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let p = RetryPolicy::default();
        RetrySettings {
            max_attempts: p.max_attempts,
            base_delay_millis: u64::try_from(p.base_delay.as_millis()).unwrap_or(200),
            max_delay_millis: None,
        }
    }
}

impl RetrySettings {
    /// The policy, with the default longest wait (20 s) when none is set.
    pub fn policy(&self) -> RetryPolicy {
        self.policy_with_max_delay(RetryPolicy::default().max_delay)
    }

    /// The policy, with `default_max_delay` as the longest wait when none is set.
    pub fn policy_with_max_delay(&self, default_max_delay: Duration) -> RetryPolicy {
        let max_delay = self
            .max_delay_millis
            .map_or(default_max_delay, Duration::from_millis);
        let base_delay = Duration::from_millis(self.base_delay_millis);
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            base_delay,
            max_delay: max_delay.max(base_delay),
        }
    }
}

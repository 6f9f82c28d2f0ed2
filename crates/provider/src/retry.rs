//! Retries with bounded exponential backoff and full jitter, honouring Retry-After. Shared by
//! every provider so that they all back off the same way (design principle 6). Every write
//! attempt, retries included, first asks the write fence ([`crate::fence`]).

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::fence;
use crate::stats::{CallStats, OpKind};

/// The longest wait a cloud's Retry-After is honoured for. A Retry-After longer than the
/// policy's `max_delay` is waited in full up to this ceiling (the cloud would refuse an
/// earlier retry anyway); beyond it, the wait is cut to the ceiling, so that one call never
/// stalls a reconcile for longer than this per retry.
pub const RETRY_AFTER_CEILING: Duration = Duration::from_secs(300);

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
    /// the cloud sends it, is a floor: honoured beyond `max_delay`, up to
    /// [`RETRY_AFTER_CEILING`].
    pub fn delay(&self, attempt: u32, error: &Error) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt.min(16)));
        let cap = exp.min(self.max_delay);
        let jittered = cap.mul_f64(fastrand::f64());
        match error.retry_after {
            Some(after) => after.min(RETRY_AFTER_CEILING).max(jittered),
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
    /// the SDK's error mapped to ours by `map`, and a final failure counted. When `stats`
    /// classifies `op` as a write, the write fence is asked right before every attempt: a
    /// refusal ([`fence::lease_lost`]) fails the call at once, is not retried, and sends
    /// nothing.
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
        let write = stats.kind(op) == OpKind::Write;
        let out = self
            .run(
                || {
                    // Asked here, after any backoff wait: the lease may have ended during it.
                    let started = match if write { fence::check_write() } else { Ok(()) } {
                        Ok(()) => {
                            stats.call(op);
                            debug!(api, operation = op, "cloud call");
                            Ok(f())
                        }
                        Err(refused) => {
                            warn!(api, operation = op, error = %refused, "write not sent");
                            Err(refused)
                        }
                    };
                    async move { started?.await.map_err(|e| map(op, e)) }
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
    use std::sync::Arc;
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
        // Retry-After is a floor, beyond max_delay (20 s) too, up to the hard ceiling.
        let cases = [
            (3, 3),
            (20, 20),
            (60, 60),
            (300, 300),
            (301, 300),
            (3600, 300),
            (u64::MAX, 300),
        ];
        for (after, want) in cases {
            let e = plain.clone().with_retry_after(Duration::from_secs(after));
            let got = p.delay(0, &e);
            assert_eq!(got, Duration::from_secs(want), "Retry-After {after}s");
        }
        // A short Retry-After does not shorten the backoff.
        let short = plain.with_retry_after(Duration::from_millis(1));
        let slow = RetryPolicy {
            base_delay: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        for attempt in 0..10 {
            assert!(slow.delay(attempt, &short) <= slow.max_delay);
            assert!(slow.delay(attempt, &short) >= Duration::from_millis(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_retry_after_is_waited_in_full() {
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let out = RetryPolicy::default()
            .run(
                || async {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(Error::new(ErrorKind::Throttled, "429")
                            .with_retry_after(Duration::from_secs(90)))
                    } else {
                        Ok(())
                    }
                },
                |_, _| {},
            )
            .await;
        assert_eq!(out, Ok(()));
        assert!(started.elapsed() >= Duration::from_secs(90));
    }

    /// A lease that ends at `until` (as the controller's fence: local time only).
    struct Until(tokio::time::Instant);

    impl fence::WriteFence for Until {
        fn may_write(&self) -> Result<()> {
            if tokio::time::Instant::now() < self.0 {
                Ok(())
            } else {
                Err(fence::lease_lost("lease ended"))
            }
        }
    }

    fn op_kind(op: &str) -> OpKind {
        match op {
            "Put" => OpKind::Write,
            "List" => OpKind::Read,
            _ => OpKind::Other,
        }
    }

    fn ok_call() -> std::future::Ready<std::result::Result<(), Error>> {
        std::future::ready(Ok(()))
    }

    #[tokio::test(start_paused = true)]
    async fn no_write_is_sent_after_the_lease_ends_mid_apply() {
        // An apply of ten sequential writes, 300 ms apart, under a lease that ends after
        // one second: the writes before its end go, none after, and the apply stops there.
        let stats = CallStats::new(op_kind);
        let start = tokio::time::Instant::now();
        let end = start + Duration::from_secs(1);
        let sent = std::sync::Mutex::new(Vec::new());
        let apply = async {
            for _ in 0..10 {
                RetryPolicy::fast()
                    .call(
                        &stats,
                        "Test",
                        "Put",
                        || {
                            sent.lock().unwrap().push(tokio::time::Instant::now());
                            ok_call()
                        },
                        |_, e: Error| e,
                    )
                    .await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok::<(), Error>(())
        };
        let e = fence::scoped(Arc::new(Until(end)), apply)
            .await
            .unwrap_err();
        assert!(fence::is_lease_lost(&e), "{e:?}");
        let sent = sent.into_inner().unwrap();
        assert_eq!(sent.len(), 4, "writes at 0, 0.3, 0.6 and 0.9 s");
        assert!(sent.iter().all(|t| *t < end));
        assert_eq!(stats.writes(), 4);
        assert_eq!(stats.snapshot()["Put"].errors, 1, "the refused write");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_the_lease_ended_is_refused_and_reads_go_on() {
        let stats = CallStats::new(op_kind);
        let end = tokio::time::Instant::now() + Duration::from_millis(500);
        let attempts = AtomicU32::new(0);
        let scope = async {
            // Throttled with a Retry-After that outlasts the lease: the retry is not sent.
            let write: Result<()> = RetryPolicy::default()
                .call(
                    &stats,
                    "Test",
                    "Put",
                    || {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        std::future::ready(Err(Error::new(ErrorKind::Throttled, "429")
                            .with_retry_after(Duration::from_secs(2))))
                    },
                    |_, e: Error| e,
                )
                .await;
            // Reads and polls are not fenced: a standby may read.
            let read = RetryPolicy::fast()
                .call(&stats, "Test", "List", ok_call, |_, e: Error| e)
                .await;
            let poll = RetryPolicy::fast()
                .call(&stats, "Test", "Poll", ok_call, |_, e: Error| e)
                .await;
            (write, read, poll)
        };
        let (write, read, poll) = fence::scoped(Arc::new(Until(end)), scope).await;
        let e = write.unwrap_err();
        assert!(fence::is_lease_lost(&e), "{e:?}");
        assert_eq!(e.kind, ErrorKind::Conflict);
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert_eq!(stats.snapshot()["Put"].calls, 1);
        assert_eq!((read, poll), (Ok(()), Ok(())));
    }

    #[tokio::test]
    async fn without_a_fence_writes_go() {
        let stats = CallStats::new(op_kind);
        let out = RetryPolicy::fast()
            .call(&stats, "Test", "Put", ok_call, |_, e: Error| e)
            .await;
        assert_eq!(out, Ok(()));
        assert_eq!(stats.writes(), 1);
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

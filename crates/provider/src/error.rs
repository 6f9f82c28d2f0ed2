//! The one provider-neutral error. Each provider maps its SDK's errors into it, so that no
//! SDK type leaves a provider crate (design principle 7).

use std::fmt;
use std::time::Duration;

/// What kind of failure, as far as the operator's reaction is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The credentials lack a permission. Not retried; the event names the permission.
    PermissionDenied,
    /// Throttled by the cloud. Retried with backoff, honouring Retry-After.
    Throttled,
    /// A 5xx, a timeout, a dropped connection. Retried with backoff.
    Transient,
    /// Someone else changed the target meanwhile (duplicate, priority taken, 409/412).
    /// The next reconcile re-observes and converges.
    Conflict,
    /// The cloud refused for a quota the plan did not foresee.
    QuotaExceeded,
    /// The target or a resource it needs does not exist.
    NotFound,
    /// The pool's target could not be determined from config or discovery.
    Discovery,
    /// The operator config for this provider is invalid.
    Config,
    /// The request was refused as invalid; a bug or an unexpected cloud state.
    Invalid,
    /// The provider is not available in this build.
    Unsupported,
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Transient => "transient",
            ErrorKind::Conflict => "conflict",
            ErrorKind::QuotaExceeded => "quota_exceeded",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Discovery => "discovery",
            ErrorKind::Config => "config",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    pub kind: ErrorKind,
    /// The cloud's own error code, e.g. `InvalidPermission.Duplicate`.
    pub code: Option<String>,
    pub message: String,
    /// How long the cloud asked us to wait, from a Retry-After header.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} ({code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A discovery failure caused by `self`, described by `message`. It stays a missing
    /// permission or a retryable error when it was one (so the event names the right fix and
    /// the reconcile is retried soon), else it is a discovery error; the cloud's code is kept.
    pub fn into_discovery(self, message: String) -> Self {
        let kind = if self.kind == ErrorKind::PermissionDenied || self.is_retryable() {
            self.kind
        } else {
            ErrorKind::Discovery
        };
        Error {
            kind,
            code: self.code,
            message,
            retry_after: self.retry_after,
        }
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Whether trying the same call again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Throttled | ErrorKind::Transient)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, joined with ": ", as SDK errors hide the cause in the chain.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_errors_keep_permission_and_retryable_kinds() {
        let cases = [
            (ErrorKind::PermissionDenied, ErrorKind::PermissionDenied),
            (ErrorKind::Throttled, ErrorKind::Throttled),
            (ErrorKind::Transient, ErrorKind::Transient),
            (ErrorKind::NotFound, ErrorKind::Discovery),
            (ErrorKind::Invalid, ErrorKind::Discovery),
            (ErrorKind::Other, ErrorKind::Discovery),
        ];
        for (cause, want) in cases {
            let e = Error::new(cause, "denied")
                .with_code("Code")
                .into_discovery("pool a: cannot read its instances: denied".into());
            assert_eq!(e.kind, want, "{cause}");
            assert_eq!(e.code.as_deref(), Some("Code"));
            assert_eq!(e.message, "pool a: cannot read its instances: denied");
        }
    }
}

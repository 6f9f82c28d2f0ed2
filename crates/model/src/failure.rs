//! The one provider-neutral failure. Each provider maps its SDK's errors into it, so that no
//! SDK type leaves a provider crate (design principle 8); it keeps its kind from the
//! provider to the plan, the CLI and the controller. `nodeport_firewall_provider::Error` is
//! this type. Pure data: it lives here so that the plan can carry it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What kind of failure, as far as the operator's reaction is concerned.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
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
    #[default]
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

/// A failure of a provider, with its kind, the cloud's code, and its source. The same
/// value travels from the provider through the engine and the plan to the CLI and the
/// controller, which decide by its kind, never by its text.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub kind: ErrorKind,
    /// The cloud's own error code, e.g. `InvalidPermission.Duplicate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub message: String,
    /// How long the cloud asked us to wait, from a Retry-After header.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
    /// What caused it (an SDK error), for logs and `Error::source`; not serialised.
    #[serde(skip)]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure")
            .field("kind", &self.kind)
            .field("code", &self.code)
            .field("message", &self.message)
            .field("retry_after", &self.retry_after)
            .field("source", &self.source.as_ref().map(|s| s.to_string()))
            .finish()
    }
}

/// Equal when kind, code, message and wait are: the source is not compared.
impl PartialEq for Failure {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, &self.code, &self.message, self.retry_after)
            == (other.kind, &other.code, &other.message, other.retry_after)
    }
}

impl Eq for Failure {}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} ({code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            code: None,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }

    /// Keeps `source` as the cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
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
        Failure {
            kind,
            code: self.code,
            message,
            retry_after: self.retry_after,
            source: self.source,
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
            let e = Failure::new(cause, "denied")
                .with_code("Code")
                .into_discovery("pool a: cannot read its instances: denied".into());
            assert_eq!(e.kind, want, "{cause}");
            assert_eq!(e.code.as_deref(), Some("Code"));
            assert_eq!(e.message, "pool a: cannot read its instances: denied");
        }
    }
}

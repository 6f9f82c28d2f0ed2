//! Maps ARM errors to the provider-neutral error. No SDK type leaves this crate.
//!
//! The SDK's pipeline turns an error response into an `HttpError` whose headers cannot be
//! read, so Retry-After would be lost. Our transport ([`crate::http::Transport`]) reads the
//! error response itself and returns an [`ArmError`] carrying status, code, message and
//! Retry-After; [`map`] finds it in the SDK error.

use std::time::Duration;

use nodeport_firewall_provider::{Error, ErrorKind};

/// An ARM error response, as our transport read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmError {
    pub status: u16,
    pub code: Option<String>,
    pub message: Option<String>,
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for ArmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTP {}: {}",
            self.status,
            self.message.as_deref().unwrap_or("no message")
        )
    }
}

impl std::error::Error for ArmError {}

impl ArmError {
    /// Reads `{"error": {"code", "message"}}` (or the same at the top level).
    pub fn from_body(status: u16, body: &[u8], retry_after: Option<Duration>) -> Self {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let e = v.get("error").unwrap_or(&v);
        let text = |k: &str| e.get(k).and_then(|s| s.as_str()).map(str::to_string);
        ArmError {
            status,
            code: text("code"),
            message: text("message"),
            retry_after,
        }
    }
}

/// The neutral kind of an ARM error code and status.
pub fn kind_of(status: u16, code: Option<&str>) -> ErrorKind {
    match code {
        Some(
            "RetryableErrorDueToAnotherOperation"
            | "RetryableError"
            | "TooManyRequests"
            | "Throttled",
        ) => {
            return ErrorKind::Throttled;
        }
        // The resource, or one it depends on (the NSG, a subnet, a NIC), is busy with
        // another operation, or ours was superseded by one: nothing was changed by the
        // answer and the same request succeeds once the other operation ends. Retried
        // with backoff, honouring Retry-After, never surfaced as a conflict: no one took
        // anything of ours.
        Some(
            "AnotherOperationInProgress"
            | "ReferencedResourceNotProvisioned"
            | "CanceledAndSupersededDueToAnotherOperation",
        ) => return ErrorKind::Transient,
        Some("SecurityRuleConflict" | "PreconditionFailed") => {
            return ErrorKind::Conflict;
        }
        Some(
            "SecurityRulesLimitExceeded"
            | "SecurityRuleSourceAddressPrefixesLimitExceeded"
            | "SecurityRuleDestinationAddressPrefixesLimitExceeded"
            | "QuotaExceeded",
        ) => return ErrorKind::QuotaExceeded,
        Some(
            "AuthorizationFailed" | "LinkedAuthorizationFailed" | "InvalidAuthenticationToken",
        ) => {
            return ErrorKind::PermissionDenied;
        }
        Some(
            "ResourceNotFound" | "NotFound" | "ResourceGroupNotFound" | "SubscriptionNotFound",
        ) => {
            return ErrorKind::NotFound;
        }
        _ => {}
    }
    match status {
        429 => ErrorKind::Throttled,
        401 | 403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        409 | 412 => ErrorKind::Conflict,
        400 => ErrorKind::Invalid,
        s if s >= 500 => ErrorKind::Transient,
        _ => ErrorKind::Other,
    }
}

/// The neutral error of an ARM error response.
pub fn from_arm(op: &str, e: &ArmError) -> Error {
    let kind = kind_of(e.status, e.code.as_deref());
    let mut out = Error::new(kind, format!("ARM {op}: {e}"));
    if let Some(c) = &e.code {
        out = out.with_code(c.clone());
    }
    if let Some(after) = e.retry_after {
        out = out.with_retry_after(after);
    }
    out
}

/// Maps one SDK error of operation `op`.
pub fn map(op: &str, err: &azure_core::Error) -> Error {
    if let Some(arm) = find_arm(err) {
        return from_arm(op, arm);
    }
    match err.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, error_code } => {
            let status = u16::from(*status);
            let e = Error::new(
                kind_of(status, error_code.as_deref()),
                format!("ARM {op}: HTTP {status}: {err}"),
            );
            match error_code {
                Some(c) => e.with_code(c.clone()),
                None => e,
            }
        }
        azure_core::error::ErrorKind::Io => {
            Error::new(ErrorKind::Transient, format!("ARM {op}: {}", chain(err)))
        }
        azure_core::error::ErrorKind::Credential => Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "ARM {op}: no token: {}. Fix: on AKS, give the operator's ServiceAccount Azure Workload Identity (docs/azure.md); elsewhere run `az login`, or choose one with azure.credential in the config",
                chain(err)
            ),
        ),
        azure_core::error::ErrorKind::DataConversion => Error::new(
            ErrorKind::Invalid,
            format!("ARM {op}: unexpected response: {}", chain(err)),
        ),
        _ => Error::new(ErrorKind::Other, format!("ARM {op}: {}", chain(err))),
    }
}

fn find_arm(err: &azure_core::Error) -> Option<&ArmError> {
    let mut cur: &(dyn std::error::Error + 'static) = err.get_ref()?;
    loop {
        if let Some(a) = cur.downcast_ref::<ArmError>() {
            return Some(a);
        }
        if let Some(inner) = cur.downcast_ref::<azure_core::Error>() {
            cur = inner.get_ref()?;
            continue;
        }
        cur = cur.source()?;
    }
}

pub use nodeport_firewall_provider::error::chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses_map_to_kinds() {
        for (status, code, kind) in [
            (
                429,
                Some("RetryableErrorDueToAnotherOperation"),
                ErrorKind::Throttled,
            ),
            (429, None, ErrorKind::Throttled),
            (400, Some("SecurityRuleConflict"), ErrorKind::Conflict),
            (
                409,
                Some("AnotherOperationInProgress"),
                ErrorKind::Transient,
            ),
            (429, Some("RetryableError"), ErrorKind::Throttled),
            (
                409,
                Some("ReferencedResourceNotProvisioned"),
                ErrorKind::Transient,
            ),
            (
                200,
                Some("CanceledAndSupersededDueToAnotherOperation"),
                ErrorKind::Transient,
            ),
            (409, None, ErrorKind::Conflict),
            (412, None, ErrorKind::Conflict),
            (
                400,
                Some("SecurityRulesLimitExceeded"),
                ErrorKind::QuotaExceeded,
            ),
            (
                403,
                Some("AuthorizationFailed"),
                ErrorKind::PermissionDenied,
            ),
            (401, None, ErrorKind::PermissionDenied),
            (404, Some("ResourceNotFound"), ErrorKind::NotFound),
            (
                400,
                Some("ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies"),
                ErrorKind::Invalid,
            ),
            (503, None, ErrorKind::Transient),
            (302, None, ErrorKind::Other),
        ] {
            assert_eq!(kind_of(status, code), kind, "{status} {code:?}");
        }
    }

    #[test]
    fn busy_answers_are_retryable_and_conflicts_are_not() {
        for (status, code, retryable) in [
            (409, "AnotherOperationInProgress", true),
            (429, "RetryableErrorDueToAnotherOperation", true),
            (409, "ReferencedResourceNotProvisioned", true),
            (400, "SecurityRuleConflict", false),
            (412, "PreconditionFailed", false),
        ] {
            let e = from_arm(
                "PutSecurityRule",
                &ArmError {
                    status,
                    code: Some(code.to_string()),
                    message: None,
                    retry_after: Some(Duration::from_secs(3)),
                },
            );
            assert_eq!(e.is_retryable(), retryable, "{status} {code}");
            assert_eq!(e.retry_after, Some(Duration::from_secs(3)), "{code}");
        }
    }

    #[test]
    fn arm_errors_are_found_inside_sdk_errors() {
        let arm = ArmError::from_body(
            429,
            br#"{"error":{"code":"RetryableErrorDueToAnotherOperation","message":"busy"}}"#,
            Some(Duration::from_secs(7)),
        );
        let sdk = azure_core::Error::new(
            azure_core::error::ErrorKind::HttpResponse {
                status: azure_core::StatusCode::TooManyRequests,
                error_code: arm.code.clone(),
            },
            arm,
        )
        .context("while doing it");
        let e = map("PutSecurityRule", &sdk);
        assert_eq!(e.kind, ErrorKind::Throttled);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(
            e.code.as_deref(),
            Some("RetryableErrorDueToAnotherOperation")
        );
    }
}

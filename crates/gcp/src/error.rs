//! Maps Compute API errors (HTTP errors and failed Operations) to the provider-neutral error.
//! No SDK type leaves this crate.

use std::time::Duration;

use google_cloud_gax::error::rpc::StatusDetails;
use nodeport_firewall_provider::{Error, ErrorKind};

/// The neutral kind of a Compute error reason (`errors[].reason` of an HTTP error, in any
/// case) or Operation error code (`QUOTA_EXCEEDED`).
pub fn kind_of_reason(reason: &str) -> ErrorKind {
    let r: String = reason
        .chars()
        .filter(|c| *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    match r.as_str() {
        "ratelimitexceeded" | "userratelimitexceeded" | "toomanyrequests" => ErrorKind::Throttled,
        "quotaexceeded" | "limitexceeded" => ErrorKind::QuotaExceeded,
        "alreadyexists" | "resourcealreadyexists" | "conditionnotmet" | "resourcenotready" => {
            ErrorKind::Conflict
        }
        "notfound" | "resourcenotfound" => ErrorKind::NotFound,
        "forbidden" | "permissionserror" | "accessnotconfigured" | "insufficientpermissions" => {
            ErrorKind::PermissionDenied
        }
        "backenderror" | "internalerror" | "serviceunavailable" => ErrorKind::Transient,
        r if r.starts_with("invalid") || r == "badrequest" || r == "required" => ErrorKind::Invalid,
        _ => ErrorKind::Other,
    }
}

fn kind_of_status(status: u16) -> ErrorKind {
    match status {
        429 => ErrorKind::Throttled,
        s if s >= 500 => ErrorKind::Transient,
        401 | 403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        409 | 412 => ErrorKind::Conflict,
        400 => ErrorKind::Invalid,
        _ => ErrorKind::Other,
    }
}

/// The kind of an error with this HTTP status and reason: the reason wins when it says more
/// (a 403 may be a quota or a rate limit, not a permission).
pub fn kind_of(status: Option<u16>, reason: Option<&str>) -> ErrorKind {
    let by_reason = reason.map(kind_of_reason).unwrap_or(ErrorKind::Other);
    match (by_reason, status) {
        (ErrorKind::Other, Some(s)) => kind_of_status(s),
        (k, _) => k,
    }
}

/// Maps one SDK error of operation `op`.
pub fn map_sdk_error(op: &str, err: &google_cloud_gax::error::Error) -> Error {
    if err.is_timeout() {
        return Error::new(ErrorKind::Transient, format!("Compute {op}: timed out"));
    }
    if err.is_connect() || err.is_io() || err.is_transport() {
        return Error::new(
            ErrorKind::Transient,
            format!(
                "Compute {op}: request not delivered: {}",
                nodeport_firewall_provider::error::chain(err)
            ),
        );
    }
    if err.is_authentication() {
        return Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "Compute {op}: cannot get credentials (Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default login, the metadata server): {}. Fix: on GKE, bind the operator's ServiceAccount with Workload Identity (docs/gcp.md); elsewhere run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
                nodeport_firewall_provider::error::chain(err)
            ),
        )
        .with_code("authentication");
    }
    let status = err.http_status_code();
    let reason = err.status().and_then(|s| {
        s.details.iter().find_map(|d| match d {
            StatusDetails::ErrorInfo(info) if !info.reason.is_empty() => Some(info.reason.clone()),
            _ => None,
        })
    });
    let message = err
        .status()
        .map(|s| s.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| nodeport_firewall_provider::error::chain(err));
    let kind = if status.is_none() && (err.is_deserialization() || err.is_serialization()) {
        ErrorKind::Invalid
    } else {
        kind_of(status, reason.as_deref())
    };
    let status_text = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
    let mut e = Error::new(kind, format!("Compute {op}: {message}{status_text}"));
    if let Some(r) = reason {
        e = e.with_code(r);
    }
    if let Some(after) = err
        .http_headers()
        .and_then(|h| h.get("retry-after"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        e = e.with_retry_after(Duration::from_secs(after));
    }
    e
}

/// Maps the `error` of a finished Operation.
pub fn map_operation_error(
    op: &str,
    http_status: Option<i32>,
    errors: &[(Option<String>, Option<String>)],
) -> Error {
    let code = errors.iter().find_map(|(c, _)| c.clone());
    let messages: Vec<&str> = errors.iter().filter_map(|(_, m)| m.as_deref()).collect();
    let status = http_status.and_then(|s| u16::try_from(s).ok());
    let kind = kind_of(status, code.as_deref());
    let mut e = Error::new(
        kind,
        format!(
            "Compute {op}: operation failed: {}",
            if messages.is_empty() {
                "no message".to_string()
            } else {
                messages.join("; ")
            }
        ),
    );
    if let Some(c) = code {
        e = e.with_code(c);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_statuses_map_to_kinds() {
        for (status, reason, kind) in [
            (Some(429), Some("rateLimitExceeded"), ErrorKind::Throttled),
            (Some(403), Some("rateLimitExceeded"), ErrorKind::Throttled),
            (Some(403), Some("quotaExceeded"), ErrorKind::QuotaExceeded),
            (None, Some("QUOTA_EXCEEDED"), ErrorKind::QuotaExceeded),
            (Some(403), Some("forbidden"), ErrorKind::PermissionDenied),
            (Some(403), None, ErrorKind::PermissionDenied),
            (Some(409), Some("alreadyExists"), ErrorKind::Conflict),
            (None, Some("RESOURCE_ALREADY_EXISTS"), ErrorKind::Conflict),
            (Some(404), Some("notFound"), ErrorKind::NotFound),
            (Some(400), Some("invalid"), ErrorKind::Invalid),
            (Some(400), Some("required"), ErrorKind::Invalid),
            (Some(503), None, ErrorKind::Transient),
            (Some(500), Some("backendError"), ErrorKind::Transient),
            (Some(418), Some("somethingNew"), ErrorKind::Other),
        ] {
            assert_eq!(kind_of(status, reason), kind, "{status:?} {reason:?}");
        }
    }

    #[test]
    fn operation_errors_keep_code_and_messages() {
        let e = map_operation_error(
            "insert",
            Some(403),
            &[(
                Some("QUOTA_EXCEEDED".into()),
                Some("Quota 'FIREWALLS' exceeded.".into()),
            )],
        );
        assert_eq!(e.kind, ErrorKind::QuotaExceeded);
        assert_eq!(e.code.as_deref(), Some("QUOTA_EXCEEDED"));
        assert!(e.message.contains("Quota 'FIREWALLS' exceeded."));
    }
}

//! Maps Compute API errors (HTTP errors and failed Operations) to the provider-neutral error.
//! No SDK type leaves this crate.

use std::time::Duration;

use google_cloud_gax::error::rpc::{Code, Status, StatusDetails};
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
        "forbidden"
        | "permissionserror"
        | "permissiondenied"
        | "iampermissiondenied"
        | "accessnotconfigured"
        | "insufficientpermissions" => ErrorKind::PermissionDenied,
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

/// What an error answer says about its cause, gathered from every place Compute puts it:
/// the legacy `errors[].reason`, `google.rpc.ErrorInfo.reason`, a `google.rpc.QuotaFailure`
/// detail, the canonical status and the message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cause {
    /// Reasons, in the order the answer gives them.
    pub reasons: Vec<String>,
    /// The answer carries a `QuotaFailure` detail (an Operation error: `quotaInfo`).
    pub quota_failure: bool,
    /// The canonical status is `RESOURCE_EXHAUSTED`.
    pub resource_exhausted: bool,
    pub message: String,
}

impl Cause {
    /// The cause of an answer read by the SDK. When the body has `details`, the SDK keeps
    /// only those and drops `errors[]`: a quota answer is then known by its ErrorInfo
    /// reason or its QuotaFailure, never by the 403 alone.
    fn of_status(status: &Status) -> Cause {
        let mut cause = Cause {
            resource_exhausted: status.code == Code::ResourceExhausted,
            message: status.message.clone(),
            ..Cause::default()
        };
        for d in &status.details {
            match d {
                StatusDetails::ErrorInfo(info) if !info.reason.is_empty() => {
                    cause.reasons.push(info.reason.clone());
                }
                StatusDetails::QuotaFailure(_) => cause.quota_failure = true,
                _ => {}
            }
        }
        cause
    }

    /// The cause of a body the SDK could not read as a Status (a detail of a shape it does
    /// not know spoils the whole body for it): read as plain JSON.
    pub(crate) fn of_payload(payload: &[u8]) -> Cause {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        let e = &v["error"];
        let mut cause = Cause {
            resource_exhausted: e["status"].as_str() == Some("RESOURCE_EXHAUSTED"),
            message: e["message"].as_str().unwrap_or_default().to_string(),
            ..Cause::default()
        };
        let items = |key: &str| e[key].as_array().cloned().unwrap_or_default();
        for item in items("details").iter().chain(items("errors").iter()) {
            if let Some(r) = item["reason"].as_str().filter(|r| !r.is_empty()) {
                cause.reasons.push(r.to_string());
            }
            if item["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("google.rpc.QuotaFailure"))
            {
                cause.quota_failure = true;
            }
        }
        cause
    }

    /// The reason that says most: the first whose kind is known, else the first.
    fn main_reason(&self) -> Option<&str> {
        self.reasons
            .iter()
            .find(|r| kind_of_reason(r) != ErrorKind::Other)
            .or(self.reasons.first())
            .map(String::as_str)
    }
}

/// The kind of an error with this HTTP status and cause. What the answer says wins over the
/// status: a 403 is a quota or a rate limit as often as a permission.
/// - a rate-limit reason: Throttled (rate limits may also carry a QuotaFailure);
/// - a quota reason or a QuotaFailure detail: QuotaExceeded;
/// - any other known reason: its kind;
/// - Compute's quota messages (`Quota 'FIREWALLS' exceeded.`, `Quota exceeded for quota
///   group ... per 100 seconds`), then `RESOURCE_EXHAUSTED`;
/// - the HTTP status last.
pub fn classify(status: Option<u16>, cause: &Cause) -> ErrorKind {
    let kinds: Vec<ErrorKind> = cause
        .reasons
        .iter()
        .map(|r| kind_of_reason(r))
        .filter(|k| *k != ErrorKind::Other)
        .collect();
    if kinds.contains(&ErrorKind::Throttled) {
        return ErrorKind::Throttled;
    }
    if kinds.contains(&ErrorKind::QuotaExceeded) || cause.quota_failure {
        return ErrorKind::QuotaExceeded;
    }
    if let Some(k) = kinds.first() {
        return *k;
    }
    // Only the start of the message counts: a resource name in a permission message may
    // hold any word.
    let m = cause.message.trim_start();
    if m.starts_with("Quota exceeded for quota") {
        return if m.contains(" per ") {
            ErrorKind::Throttled
        } else {
            ErrorKind::QuotaExceeded
        };
    }
    if m.starts_with("Quota '") && m.contains("' exceeded") {
        return ErrorKind::QuotaExceeded;
    }
    if cause.resource_exhausted {
        return ErrorKind::Throttled;
    }
    status.map_or(ErrorKind::Other, kind_of_status)
}

/// The kind of an error with this HTTP status and reason (see [`classify`]).
pub fn kind_of(status: Option<u16>, reason: Option<&str>) -> ErrorKind {
    classify(
        status,
        &Cause {
            reasons: reason.map(str::to_string).into_iter().collect(),
            ..Cause::default()
        },
    )
}

/// Maps one SDK error of operation `op`.
pub fn map_sdk_error(op: &str, err: &google_cloud_gax::error::Error) -> Error {
    if err.is_timeout() {
        return Error::new(ErrorKind::Transient, format!("Compute {op}: timed out"));
    }
    // An HTTP answer whose body the SDK could not read is also a "transport" error to the
    // SDK; it was delivered, and its status and body say what happened.
    if (err.is_connect() || err.is_io() || err.is_transport()) && err.http_status_code().is_none() {
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
    let cause = match (err.status(), err.http_payload()) {
        (Some(s), _) => Cause::of_status(s),
        (None, Some(payload)) => Cause::of_payload(payload),
        (None, None) => Cause::default(),
    };
    let message = Some(cause.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| nodeport_firewall_provider::error::chain(err));
    let kind = if status.is_none() && (err.is_deserialization() || err.is_serialization()) {
        ErrorKind::Invalid
    } else {
        classify(status, &cause)
    };
    let status_text = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
    let mut e = Error::new(kind, format!("Compute {op}: {message}{status_text}"));
    if let Some(r) = cause.main_reason() {
        e = e.with_code(r);
    } else if cause.quota_failure {
        e = e.with_code("QuotaFailure");
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

/// One entry of a finished Operation's `error.errors`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationError {
    pub code: Option<String>,
    pub message: Option<String>,
    /// `errorDetails[].errorInfo.reason`.
    pub reasons: Vec<String>,
    /// An `errorDetails[].quotaInfo` is present.
    pub quota_info: bool,
}

/// Maps the `error` of a finished Operation.
pub fn map_operation_error(op: &str, http_status: Option<i32>, errors: &[OperationError]) -> Error {
    let code = errors.iter().find_map(|e| e.code.clone());
    let messages: Vec<&str> = errors.iter().filter_map(|e| e.message.as_deref()).collect();
    let status = http_status.and_then(|s| u16::try_from(s).ok());
    let cause = Cause {
        reasons: errors
            .iter()
            .flat_map(|e| e.code.iter().chain(e.reasons.iter()).cloned())
            .collect(),
        quota_failure: errors.iter().any(|e| e.quota_info),
        resource_exhausted: false,
        message: messages.first().copied().unwrap_or_default().to_string(),
    };
    let kind = classify(status, &cause);
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
            &[OperationError {
                code: Some("QUOTA_EXCEEDED".into()),
                message: Some("Quota 'FIREWALLS' exceeded.".into()),
                ..OperationError::default()
            }],
        );
        assert_eq!(e.kind, ErrorKind::QuotaExceeded);
        assert_eq!(e.code.as_deref(), Some("QUOTA_EXCEEDED"));
        assert!(e.message.contains("Quota 'FIREWALLS' exceeded."));
    }

    /// An SDK error as the Compute client makes it from an HTTP answer: the body read as a
    /// Status when the SDK can, else kept as the raw payload.
    fn sdk_error(status: u16, body: &str) -> google_cloud_gax::error::Error {
        let bytes = bytes::Bytes::from(body.to_string());
        match Status::try_from(&bytes) {
            Ok(s) => {
                google_cloud_gax::error::Error::service_with_http_metadata(s, Some(status), None)
            }
            Err(_) => google_cloud_gax::error::Error::http(status, Default::default(), bytes),
        }
    }

    const QUOTA_MESSAGE: &str = "Quota 'FIREWALLS' exceeded.  Limit: 100.0 globally.";

    /// `errors[]` as Compute sends it, with `details` as given.
    fn compute_body(code: u16, message: &str, reason: &str, details: &str) -> String {
        format!(
            r#"{{"error": {{"code": {code}, "message": "{message}",
              "errors": [{{"message": "{message}", "domain": "usageLimits", "reason": "{reason}"}}]
              {details}}}}}"#
        )
    }

    #[test]
    fn answers_are_classified_by_reason_and_details_not_by_status() {
        let error_info = |reason: &str| {
            format!(
                r#"{{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "{reason}",
                    "domain": "compute.googleapis.com",
                    "metadatas": {{"containerType": "PROJECT", "containerId": "proj-a", "limit": "100.0", "limitName": "FIREWALLS"}}}}"#
            )
        };
        let help = r#"{"@type": "type.googleapis.com/google.rpc.Help",
            "links": [{"description": "Request a quota increase", "url": "https://cloud.google.com/docs/quotas/help/request_increase"}]}"#;
        let quota_failure = r#"{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"subject": "projects/proj-a", "description": "Quota 'FIREWALLS' exceeded.  Limit: 100.0 globally."}]}"#;
        let localized = r#"{"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": "Quota exceeded"}"#;
        let rate = "Quota exceeded for quota group 'ReadGroup' and limit 'Read requests per user per 100 seconds' of service 'compute.googleapis.com'";
        let perm = "Required 'compute.firewalls.create' permission for 'projects/p/global/firewalls/npf-quota-exceeded'";
        let cases: Vec<(&str, u16, String, ErrorKind, Option<&str>)> = vec![
            (
                "no details: errors[].reason",
                403,
                compute_body(403, QUOTA_MESSAGE, "quotaExceeded", ""),
                ErrorKind::QuotaExceeded,
                Some("quotaExceeded"),
            ),
            (
                "details with an ErrorInfo QUOTA_EXCEEDED and Help",
                403,
                compute_body(
                    403,
                    QUOTA_MESSAGE,
                    "quotaExceeded",
                    &format!(r#", "details": [{}, {help}]"#, error_info("QUOTA_EXCEEDED")),
                ),
                ErrorKind::QuotaExceeded,
                Some("QUOTA_EXCEEDED"),
            ),
            (
                "details with a QuotaFailure only (errors[] dropped by the SDK)",
                403,
                compute_body(
                    403,
                    QUOTA_MESSAGE,
                    "quotaExceeded",
                    &format!(r#", "details": [{quota_failure}, {help}]"#),
                ),
                ErrorKind::QuotaExceeded,
                Some("QuotaFailure"),
            ),
            (
                "details with Help only: the message says quota",
                403,
                compute_body(
                    403,
                    QUOTA_MESSAGE,
                    "quotaExceeded",
                    &format!(r#", "details": [{help}]"#),
                ),
                ErrorKind::QuotaExceeded,
                None,
            ),
            (
                "details with a LocalizedMessage only",
                403,
                compute_body(
                    403,
                    QUOTA_MESSAGE,
                    "quotaExceeded",
                    &format!(r#", "details": [{localized}]"#),
                ),
                ErrorKind::QuotaExceeded,
                None,
            ),
            (
                "a body the SDK cannot read as a Status: the raw body is read",
                403,
                compute_body(
                    403,
                    QUOTA_MESSAGE,
                    "quotaExceeded",
                    r#", "details": [42]"#,
                ),
                ErrorKind::QuotaExceeded,
                Some("quotaExceeded"),
            ),
            (
                "a rate limit reported as 403 with a QuotaFailure",
                403,
                compute_body(
                    403,
                    rate,
                    "rateLimitExceeded",
                    &format!(
                        r#", "details": [{}, {quota_failure}]"#,
                        error_info("RATE_LIMIT_EXCEEDED")
                    ),
                ),
                ErrorKind::Throttled,
                Some("RATE_LIMIT_EXCEEDED"),
            ),
            (
                "userRateLimitExceeded",
                403,
                compute_body(403, "User Rate Limit Exceeded", "userRateLimitExceeded", ""),
                ErrorKind::Throttled,
                Some("userRateLimitExceeded"),
            ),
            (
                "a rate limit known only by its message",
                403,
                compute_body(403, rate, "x", &format!(r#", "details": [{help}]"#)),
                ErrorKind::Throttled,
                None,
            ),
            (
                "RESOURCE_EXHAUSTED with nothing else",
                429,
                r#"{"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.Help", "links": []}]}}"#.to_string(),
                ErrorKind::Throttled,
                None,
            ),
            (
                "a real permission error stays one, whatever its resource name",
                403,
                compute_body(403, perm, "forbidden", ""),
                ErrorKind::PermissionDenied,
                Some("forbidden"),
            ),
            (
                "a permission error with an ErrorInfo IAM_PERMISSION_DENIED",
                403,
                compute_body(
                    403,
                    perm,
                    "forbidden",
                    &format!(r#", "details": [{}]"#, error_info("IAM_PERMISSION_DENIED")),
                ),
                ErrorKind::PermissionDenied,
                Some("IAM_PERMISSION_DENIED"),
            ),
            (
                "a bare 403",
                403,
                r#"{"error": {"code": 403, "message": "Forbidden"}}"#.to_string(),
                ErrorKind::PermissionDenied,
                None,
            ),
            (
                "not JSON at all",
                403,
                "<html>Forbidden</html>".to_string(),
                ErrorKind::PermissionDenied,
                None,
            ),
        ];
        for (what, status, body, kind, code) in cases {
            let e = map_sdk_error("firewalls.insert", &sdk_error(status, &body));
            assert_eq!(e.kind, kind, "{what}: {e:?}");
            assert_eq!(e.code.as_deref(), code, "{what}: {e:?}");
        }
    }

    #[test]
    fn operation_errors_read_their_details() {
        for (errors, kind) in [
            (
                vec![OperationError {
                    code: Some("SOMETHING_NEW".into()),
                    quota_info: true,
                    ..OperationError::default()
                }],
                ErrorKind::QuotaExceeded,
            ),
            (
                vec![OperationError {
                    code: Some("SOMETHING_NEW".into()),
                    reasons: vec!["RATE_LIMIT_EXCEEDED".into()],
                    ..OperationError::default()
                }],
                ErrorKind::Throttled,
            ),
            (
                vec![OperationError {
                    code: Some("SOMETHING_NEW".into()),
                    message: Some(QUOTA_MESSAGE.into()),
                    ..OperationError::default()
                }],
                ErrorKind::QuotaExceeded,
            ),
        ] {
            assert_eq!(
                map_operation_error("insert", Some(403), &errors).kind,
                kind,
                "{errors:?}"
            );
        }
    }
}

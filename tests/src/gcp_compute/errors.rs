//! Compute's error bodies: `{"error": {"code", "message", "errors": [{reason, domain,
//! message}], "details": [...]}}`. Quota and rate-limit answers carry `details`
//! (`google.rpc.ErrorInfo`, `QuotaFailure`, `Help`) besides the legacy `errors[]`; a client
//! that reads only the HTTP status takes them for permission errors.

use serde_json::{Value, json};

/// An error answer: its HTTP status and body.
pub(super) type Answer = (u16, Value);

/// The body of a Compute error, without details.
pub(super) fn error(status: u16, reason: &str, domain: &str, message: &str) -> Answer {
    (
        status,
        json!({"error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": domain, "reason": reason}],
        }}),
    )
}

fn with_details((status, mut body): Answer, details: Vec<Value>) -> Answer {
    body["error"]["details"] = json!(details);
    (status, body)
}

fn error_info(reason: &str, metadatas: Value) -> Value {
    // Compute spells ErrorInfo's map `metadatas`.
    json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
           "domain": "compute.googleapis.com", "metadatas": metadatas})
}

fn quota_help() -> Value {
    json!({"@type": "type.googleapis.com/google.rpc.Help", "links": [{
        "description": "Learn how to increase quota",
        "url": "https://cloud.google.com/compute/quotas#requesting_additional_quota"}]})
}

/// The project's firewall quota is used up: 403 `quotaExceeded`, with an ErrorInfo
/// `QUOTA_EXCEEDED` and a Help link in `details`, as Compute answers.
pub(super) fn quota_exceeded(project: &str, limit: usize) -> Answer {
    let message = format!("Quota 'FIREWALLS' exceeded.  Limit: {limit}.0 globally.");
    with_details(
        error(403, "quotaExceeded", "usageLimits", &message),
        vec![
            error_info(
                "QUOTA_EXCEEDED",
                json!({"containerType": "PROJECT", "containerId": project,
                       "limit": format!("{limit}.0"), "limitName": "FIREWALLS",
                       "service": "compute.googleapis.com"}),
            ),
            quota_help(),
        ],
    )
}

/// The answer to an injected `Fault::Status` with this status and cloud error code:
/// - `quotaExceeded`: the quota answer above;
/// - `QuotaFailure`: a quota answer whose details are a `google.rpc.QuotaFailure` and a
///   Help link, without an ErrorInfo (the SDK then drops `errors[]`: only the details say
///   it is a quota);
/// - `rateLimitExceeded` on a 403: Compute's per-100-seconds rate limit, with an ErrorInfo
///   `RATE_LIMIT_EXCEEDED` and a QuotaFailure;
/// - any other code: that `errors[].reason`;
/// - no code: what the status usually carries (429 `rateLimitExceeded`, 403 `forbidden`,
///   5xx `backendError`, else `invalid`).
pub(super) fn injected(status: u16, code: Option<&str>, project: &str) -> Answer {
    match (status, code) {
        (_, Some("quotaExceeded")) => {
            let (_, body) = quota_exceeded(project, 100);
            (status, with_code(body, status))
        }
        (_, Some("QuotaFailure")) => {
            let message = "Quota 'FIREWALLS' exceeded.  Limit: 100.0 globally.";
            with_details(
                error(status, "quotaExceeded", "usageLimits", message),
                vec![
                    json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                           "violations": [{"subject": format!("projects/{project}"),
                                           "description": message}]}),
                    quota_help(),
                ],
            )
        }
        (403, Some("rateLimitExceeded")) => {
            let message = "Quota exceeded for quota group 'ReadGroup' and limit 'Read requests per user per 100 seconds' of service 'compute.googleapis.com'";
            with_details(
                error(403, "rateLimitExceeded", "usageLimits", message),
                vec![
                    error_info(
                        "RATE_LIMIT_EXCEEDED",
                        json!({"service": "compute.googleapis.com", "quota_limit": "ReadGroup"}),
                    ),
                    json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                           "violations": [{"subject": format!("projects/{project}"),
                                           "description": message}]}),
                ],
            )
        }
        (s, Some(code)) => error(s, code, "global", &format!("Injected error {code}")),
        (429, None) => error(
            429,
            "rateLimitExceeded",
            "usageLimits",
            "Rate Limit Exceeded",
        ),
        (403, None) => error(403, "forbidden", "global", "Forbidden"),
        (s, None) if s >= 500 => error(
            s,
            "backendError",
            "global",
            "The service is currently unavailable.",
        ),
        (s, None) => error(s, "invalid", "global", "Injected error"),
    }
}

fn with_code(mut body: Value, status: u16) -> Value {
    body["error"]["code"] = json!(status);
    body
}

pub(super) fn bad(message: String) -> Answer {
    error(400, "invalid", "global", &message)
}

pub(super) fn not_found(project: &str, name: &str) -> Answer {
    error(
        404,
        "notFound",
        "global",
        &format!("The resource 'projects/{project}/global/firewalls/{name}' was not found"),
    )
}

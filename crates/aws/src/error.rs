//! Maps EC2 SDK errors to the provider-neutral error. No SDK type leaves this crate.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use nodeport_firewall_provider::{Error, ErrorKind};

/// The neutral kind of an EC2 error code.
pub fn kind_of_code(code: &str) -> ErrorKind {
    match code {
        "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "Throttling"
        | "ThrottlingException"
        | "RequestThrottled"
        | "SlowDown" => ErrorKind::Throttled,
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable"
        | "ServiceException" => ErrorKind::Transient,
        "UnauthorizedOperation"
        | "AuthFailure"
        | "AccessDenied"
        | "AccessDeniedException"
        | "Blocked"
        | "OptInRequired" => ErrorKind::PermissionDenied,
        "RulesPerSecurityGroupLimitExceeded" | "SecurityGroupLimitExceeded" => {
            ErrorKind::QuotaExceeded
        }
        "InvalidPermission.Duplicate" => ErrorKind::Conflict,
        "InvalidGroup.NotFound"
        | "InvalidSecurityGroupRuleId.NotFound"
        | "InvalidPermission.NotFound"
        | "InvalidInstanceID.NotFound"
        | "NoSuchResourceException" => ErrorKind::NotFound,
        c if c.starts_with("InvalidParameter")
            || c.starts_with("MissingParameter")
            || c.ends_with(".Malformed") =>
        {
            ErrorKind::Invalid
        }
        _ => ErrorKind::Other,
    }
}

/// Maps one SDK error of EC2 operation `op`.
pub fn map_sdk_error<E>(op: &str, err: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    map_sdk_error_of("EC2", op, err)
}

/// Maps one SDK error of operation `op` of `api` (`EC2`, `Service Quotas`: both SDKs share
/// the smithy error types).
pub fn map_sdk_error_of<E>(api: &str, op: &str, err: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_string);
    let message = err.message().map(str::to_string);
    if matches!(
        err,
        SdkError::ConstructionFailure(_) | SdkError::DispatchFailure(_)
    ) && is_missing_credentials(&nodeport_firewall_provider::error::chain(&err))
    {
        // One line that says what was tried and how to fix it, and no retries: waiting does
        // not make credentials appear.
        return Error::new(ErrorKind::PermissionDenied, no_credentials(api, op));
    }
    match &err {
        SdkError::TimeoutError(_) => {
            Error::new(ErrorKind::Transient, format!("{api} {op}: timed out"))
        }
        SdkError::DispatchFailure(d) => {
            // The connector error's Display chain, not its Debug dump: the latter spells out
            // whole HTTP responses (e.g. of the instance-metadata credential provider).
            let mut text = String::new();
            let mut cause: Option<&dyn std::error::Error> =
                d.as_connector_error().map(|c| c as &dyn std::error::Error);
            while let Some(e) = cause {
                let part = e.to_string();
                if !text.contains(&part) {
                    if !text.is_empty() {
                        text.push_str(": ");
                    }
                    text.push_str(&part);
                }
                cause = e.source();
            }
            if text.is_empty() {
                text.push_str("connection failed");
            }
            Error::new(
                ErrorKind::Transient,
                format!("{api} {op}: request not delivered: {text}"),
            )
        }
        SdkError::ConstructionFailure(_) => Error::new(
            ErrorKind::Invalid,
            format!(
                "{api} {op}: cannot build the request: {}",
                nodeport_firewall_provider::error::chain(&err)
            ),
        ),
        _ => {
            let kind = match (&code, status) {
                (Some(c), _) if kind_of_code(c) != ErrorKind::Other => kind_of_code(c),
                (_, Some(s)) if s >= 500 => ErrorKind::Transient,
                (_, Some(429)) => ErrorKind::Throttled,
                (_, Some(401 | 403)) => ErrorKind::PermissionDenied,
                _ => ErrorKind::Other,
            };
            let text = message.unwrap_or_else(|| nodeport_firewall_provider::error::chain(&err));
            let status = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
            let e = Error::new(kind, format!("{api} {op}: {text}{status}"));
            match code {
                Some(c) => e.with_code(c),
                None => e,
            }
        }
    }
}

/// Whether an SDK error chain says the credential chain found nothing.
pub fn is_missing_credentials(chain: &str) -> bool {
    let c = chain.to_ascii_lowercase();
    c.contains("credential")
        && (c.contains("no credentials")
            || c.contains("failed to load credentials")
            || c.contains("credentials provider")
            || c.contains("could not load credentials")
            || c.contains("provided credentials"))
}

/// The message for missing credentials: the chain the SDK tried, and the fixes.
pub fn no_credentials(api: &str, op: &str) -> String {
    format!(
        "{api} {op}: no AWS credentials: the default chain (environment variables, AWS_PROFILE and the shared config files, a web identity token (IRSA), EKS Pod Identity, the ECS container endpoint, the instance metadata service) found none. Fix: in a cluster, give the operator's ServiceAccount an IAM role with IRSA or EKS Pod Identity (docs/install.md); elsewhere set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_credentials_are_recognised() {
        for (chain, want) in [
            (
                "failed to construct request: no providers in chain provided credentials",
                true,
            ),
            (
                "an error occurred while loading credentials: the credential provider was not enabled: no credentials",
                true,
            ),
            ("connection refused", false),
            (
                "InvalidClientTokenId: the security token included in the request is invalid",
                false,
            ),
        ] {
            assert_eq!(is_missing_credentials(chain), want, "{chain}");
        }
        assert!(no_credentials("EC2", "DescribeSecurityGroups").contains("IRSA"));
    }

    #[test]
    fn codes_map_to_kinds() {
        for (code, kind) in [
            ("RequestLimitExceeded", ErrorKind::Throttled),
            ("Throttling", ErrorKind::Throttled),
            ("UnauthorizedOperation", ErrorKind::PermissionDenied),
            (
                "RulesPerSecurityGroupLimitExceeded",
                ErrorKind::QuotaExceeded,
            ),
            ("InvalidPermission.Duplicate", ErrorKind::Conflict),
            ("InvalidGroup.NotFound", ErrorKind::NotFound),
            ("InternalError", ErrorKind::Transient),
            ("InvalidParameterValue", ErrorKind::Invalid),
            ("InvalidGroupId.Malformed", ErrorKind::Invalid),
            ("AccessDeniedException", ErrorKind::PermissionDenied),
            ("NoSuchResourceException", ErrorKind::NotFound),
            ("TooManyRequestsException", ErrorKind::Throttled),
            ("ServiceException", ErrorKind::Transient),
            ("SomethingNew", ErrorKind::Other),
        ] {
            assert_eq!(kind_of_code(code), kind, "{code}");
        }
    }
}

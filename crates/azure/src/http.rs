//! The HTTP layer under the SDK: one attempt per call (our retries, not the SDK's), a timeout
//! per attempt, and error responses read here so that Retry-After survives.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::headers::{Headers, RETRY_AFTER, RETRY_AFTER_MS};
use azure_core::{Context, HttpClient, Policy, PolicyResult, Request, Response};

use crate::error::ArmError;

/// The last policy of the SDK pipeline: sends the request, turns error responses into
/// [`ArmError`].
#[derive(Debug)]
pub struct Transport {
    pub http: Arc<dyn HttpClient>,
    pub attempt_timeout: Duration,
}

/// The wait a response asks for: `retry-after-ms`, else `Retry-After` in seconds.
pub fn retry_after(headers: &Headers) -> Option<Duration> {
    if let Some(ms) = headers
        .get_optional_str(&RETRY_AFTER_MS)
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_millis(ms));
    }
    headers
        .get_optional_str(&RETRY_AFTER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Sends one request with a timeout; an error response becomes an [`ArmError`].
pub async fn send(
    http: &dyn HttpClient,
    request: &Request,
    timeout: Duration,
) -> azure_core::Result<Response> {
    let rsp = match tokio::time::timeout(timeout, http.execute_request(request)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(azure_core::Error::message(
                azure_core::error::ErrorKind::Io,
                format!("no response within {}s", timeout.as_secs()),
            ));
        }
    };
    if rsp.status().is_success() {
        return Ok(rsp);
    }
    let (status, headers, body) = rsp.deconstruct();
    let after = retry_after(&headers);
    let bytes = body.collect().await.unwrap_or_default();
    let arm = ArmError::from_body(u16::from(status), &bytes, after);
    Err(azure_core::Error::new(
        azure_core::error::ErrorKind::HttpResponse {
            status,
            error_code: arm.code.clone(),
        },
        arm,
    ))
}

#[async_trait]
impl Policy for Transport {
    async fn send(
        &self,
        _ctx: &Context,
        request: &mut Request,
        _next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        send(self.http.as_ref(), request, self.attempt_timeout).await
    }
}

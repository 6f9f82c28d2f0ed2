//! The rule quota of a security group, read from Service Quotas: "Inbound or outbound rules
//! per security group" (service `vpc`, quota `L-0EA8095F`), counted by EC2 per IP family.
//!
//! The applied value (`GetServiceQuota`) first: it is what an increase (or a decrease)
//! changed. Where Service Quotas has no applied value, the default
//! (`GetAWSDefaultServiceQuota`). When neither can be read (the permission is missing,
//! Service Quotas is unreachable), the configured `ruleQuota` (else EC2's default, 60) is
//! planned against, and the observation carries one warning saying so.
//!
//! The value read is cached for `ruleQuotaCacheSeconds`. This is a fact about the cloud, like
//! a pool's discovered security groups, not a memory of what was planned: a fresh process
//! reads the same value, and a quota changes only when AWS approves a request.

use std::time::{Duration, Instant};

use nodeport_firewall_provider::{Error, ErrorKind, Result};

use crate::config::EC2_DEFAULT_RULE_QUOTA;
use crate::{AwsProvider, error};

pub const SERVICE_CODE: &str = "vpc";
pub const QUOTA_CODE: &str = "L-0EA8095F";

/// Longest a failed read is reused, so that a permission added is seen soon.
const FAILURE_TTL: Duration = Duration::from_secs(300);

/// The outcome of reading the quota: the value, or why it could not be read.
pub(crate) type Read = std::result::Result<usize, String>;

/// The per-process cache of the last read. An async lock, held while reading, so that the
/// targets of one plan (observed concurrently) make one read between them.
#[derive(Debug, Default)]
pub(crate) struct QuotaCache(tokio::sync::Mutex<Option<(Instant, Read)>>);

/// The rule quota to plan against, and what the plan should say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleQuota {
    pub value: usize,
    /// Why the value is what it is, when it is not simply the quota read (shown with a rule
    /// quota error): the configured one is lower, or nothing could be read.
    pub reason: Option<String>,
    /// One message for the plan when Service Quotas could not be read.
    pub warning: Option<String>,
}

/// Decides the quota from the config and what Service Quotas said (`None`: not asked).
/// The lower of a configured and a read quota wins: a higher configured one would only make
/// `apply` fail with `RulesPerSecurityGroupLimitExceeded`, and a lower one is how a user
/// keeps room for rules other tools add.
pub fn decide(configured: Option<usize>, read: Option<&Read>) -> RuleQuota {
    let fallback = configured.unwrap_or(EC2_DEFAULT_RULE_QUOTA);
    let source = if configured.is_some() {
        "aws.ruleQuota"
    } else {
        "EC2's default rule quota"
    };
    match (configured, read) {
        (_, None) => RuleQuota {
            value: fallback,
            reason: None,
            warning: None,
        },
        (_, Some(Err(why))) => RuleQuota {
            value: fallback,
            reason: Some(format!(
                "{source}; the Service Quotas value could not be read"
            )),
            warning: Some(format!(
                "aws: could not read the rule quota from Service Quotas ({why}): planning against {source} {fallback}"
            )),
        },
        (Some(c), Some(Ok(read))) if c < *read => RuleQuota {
            value: c,
            reason: Some(format!(
                "aws.ruleQuota {c}, lower than the Service Quotas value {read}"
            )),
            warning: None,
        },
        (_, Some(Ok(read))) => RuleQuota {
            value: *read,
            reason: None,
            warning: None,
        },
    }
}

/// A quota value as Service Quotas sends it (a float), as a rule count; none for nonsense.
fn count(value: Option<f64>) -> Option<usize> {
    let v = value?;
    // The quota is a whole number of rules; anything else is not one we can plan with.
    ((1.0..=100_000.0).contains(&v) && v.fract() == 0.0).then_some(v as usize)
}

impl AwsProvider {
    /// Runs one Service Quotas operation: counted, retried, errors mapped (as [`Self::call`]).
    pub(crate) async fn quota_call<T, E, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<
                Output = std::result::Result<T, aws_sdk_servicequotas::error::SdkError<E>>,
            >,
        E: aws_sdk_servicequotas::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.retry
            .call(&self.stats, "Service Quotas", op, f, |op, e| {
                error::map_sdk_error_of("Service Quotas", op, e)
            })
            .await
    }

    /// The rule quota to plan against: from the cache, else read now.
    pub async fn rule_quota(&self) -> RuleQuota {
        if !self.config.read_rule_quota {
            return decide(self.config.rule_quota, None);
        }
        let mut cache = self.quota_cache.0.lock().await;
        let read = match fresh(cache.as_ref(), self.config.rule_quota_cache_seconds) {
            Some(read) => read,
            None => {
                let read = self.read_quota().await;
                *cache = Some((Instant::now(), read.clone()));
                read
            }
        };
        decide(self.config.rule_quota, Some(&read))
    }

    /// The applied value, else the default; the reason in words when neither is readable.
    async fn read_quota(&self) -> Read {
        let applied = self
            .quota_call("GetServiceQuota", || {
                self.quotas
                    .get_service_quota()
                    .service_code(SERVICE_CODE)
                    .quota_code(QUOTA_CODE)
                    .send()
            })
            .await
            .map(|out| count(out.quota().and_then(|q| q.value())));
        match applied {
            Ok(Some(v)) => return Ok(v),
            // No applied value (`NoSuchResourceException`), or nonsense in it: the default is
            // the quota. Any other failure is no answer: the default (60) may be lower or
            // higher than what applies to the account.
            Ok(None) => {}
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(reason(&e, "GetServiceQuota")),
        }
        let default = self
            .quota_call("GetAWSDefaultServiceQuota", || {
                self.quotas
                    .get_aws_default_service_quota()
                    .service_code(SERVICE_CODE)
                    .quota_code(QUOTA_CODE)
                    .send()
            })
            .await;
        match default.map(|out| count(out.quota().and_then(|q| q.value()))) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(format!(
                "{QUOTA_CODE} has no usable value in Service Quotas"
            )),
            Err(e) => Err(reason(&e, "GetAWSDefaultServiceQuota")),
        }
    }
}

/// The cached read while it is fresh: `ttl_seconds` for a value, at most [`FAILURE_TTL`] for
/// a failure.
fn fresh(cached: Option<&(Instant, Read)>, ttl_seconds: u64) -> Option<Read> {
    let (at, read) = cached?;
    let ttl = Duration::from_secs(ttl_seconds);
    let ttl = if read.is_ok() {
        ttl
    } else {
        ttl.min(FAILURE_TTL)
    };
    (at.elapsed() < ttl).then(|| read.clone())
}

/// A failed read in words: the permission by name when it is missing.
fn reason(e: &Error, op: &str) -> String {
    if e.kind == ErrorKind::PermissionDenied {
        format!("servicequotas:{op} is denied")
    } else {
        e.message.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lower_of_configured_and_read_wins_and_failures_warn_once() {
        let denied: Read = Err("servicequotas:GetServiceQuota is denied".into());
        for (configured, read, value, reason, warns) in [
            (None, None, 60, None, false),
            (Some(80), None, 80, None, false),
            (None, Some(Ok(200)), 200, None, false),
            (
                Some(80),
                Some(Ok(200)),
                80,
                Some("aws.ruleQuota 80, lower"),
                false,
            ),
            (Some(300), Some(Ok(200)), 200, None, false),
            (None, Some(denied.clone()), 60, Some("EC2's default"), true),
            (
                Some(70),
                Some(denied.clone()),
                70,
                Some("aws.ruleQuota"),
                true,
            ),
        ] {
            let q = decide(configured, read.as_ref());
            assert_eq!(q.value, value, "{configured:?} {read:?}");
            match reason {
                Some(r) => assert!(q.reason.as_deref().unwrap_or("").starts_with(r), "{q:?}"),
                None => assert_eq!(q.reason, None, "{q:?}"),
            }
            assert_eq!(q.warning.is_some(), warns, "{q:?}");
        }
        let w = decide(Some(60), Some(&denied)).warning.unwrap();
        assert_eq!(
            w,
            "aws: could not read the rule quota from Service Quotas (servicequotas:GetServiceQuota is denied): planning against aws.ruleQuota 60"
        );
    }

    #[test]
    fn failures_are_cached_for_at_most_five_minutes() {
        let now = Instant::now();
        let ok: Read = Ok(60);
        let failed: Read = Err("denied".into());
        assert_eq!(fresh(Some(&(now, ok.clone())), 3600), Some(ok.clone()));
        assert_eq!(
            fresh(Some(&(now, failed.clone())), 3600),
            Some(failed.clone())
        );
        assert_eq!(fresh(Some(&(now, ok.clone())), 0), None);
        assert_eq!(fresh(None, 3600), None);
        if let Some(old) = now.checked_sub(Duration::from_secs(301)) {
            assert_eq!(fresh(Some(&(old, failed)), 3600), None);
            assert_eq!(fresh(Some(&(old, ok.clone())), 3600), Some(ok));
        }
    }

    #[test]
    fn only_whole_positive_values_are_quotas() {
        for (v, want) in [
            (Some(60.0), Some(60)),
            (Some(1000.0), Some(1000)),
            (Some(0.0), None),
            (Some(-5.0), None),
            (Some(60.5), None),
            (Some(f64::NAN), None),
            (Some(f64::INFINITY), None),
            (Some(1e12), None),
            (None, None),
        ] {
            assert_eq!(count(v), want, "{v:?}");
        }
    }
}

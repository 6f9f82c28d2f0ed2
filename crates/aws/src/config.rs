//! The `aws:` section of the operator config and of a pool override.

use serde::{Deserialize, Serialize};

/// The `aws:` section of the operator config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AwsConfig {
    /// The region. Default: from the environment (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// An endpoint URL override, e.g. a VPC endpoint or a test server. `AWS_ENDPOINT_URL`
    /// and `AWS_ENDPOINT_URL_EC2` work too.
    pub endpoint_url: Option<String>,
    /// Inbound rules allowed per security group, per IP family (EC2 default: 60).
    pub rule_quota: usize,
    /// The tag key that marks the security group to manage among several on a node.
    /// Default: `kubernetes.io/cluster/<cluster>`.
    pub cluster_tag_key: Option<String>,
    /// Most rules per authorize / revoke / modify call; larger writes are chunked.
    pub max_rules_per_call: usize,
    /// How long a pool's discovered security groups are reused while its nodes stay the same.
    pub resolution_cache_seconds: u64,
    /// Timeout of one HTTP attempt.
    pub attempt_timeout_seconds: u64,
    pub retry: RetrySettings,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint_url: None,
            rule_quota: 60,
            cluster_tag_key: None,
            max_rules_per_call: 100,
            resolution_cache_seconds: 300,
            attempt_timeout_seconds: 30,
            retry: RetrySettings::default(),
        }
    }
}

pub use nodeport_firewall_provider::retry::RetrySettings;

/// The `aws:` section of `pools.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsPoolConfig {
    /// The security groups the pool's rules go to; skips discovery.
    #[serde(default)]
    pub security_group_ids: Vec<String>,
}

/// Whether `id` looks like a security group id (`sg-` and hex).
pub fn valid_sg_id(id: &str) -> bool {
    id.strip_prefix("sg-")
        .is_some_and(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_camel_case_and_rejects_unknown_fields() {
        let c: AwsConfig = serde_json::from_value(serde_json::json!({
            "region": "eu-west-1", "ruleQuota": 120, "maxRulesPerCall": 10,
            "retry": {"maxAttempts": 3}
        }))
        .unwrap();
        assert_eq!(c.rule_quota, 120);
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.resolution_cache_seconds, 300);
        assert!(serde_json::from_value::<AwsConfig>(serde_json::json!({"regoin": "x"})).is_err());
        assert!(
            serde_json::from_value::<AwsPoolConfig>(serde_json::json!({"securityGroupId": []}))
                .is_err()
        );
    }

    #[test]
    fn sg_ids() {
        assert!(valid_sg_id("sg-0123abcd"));
        assert!(!valid_sg_id("sg-"));
        assert!(!valid_sg_id("i-0123"));
        assert!(!valid_sg_id("sg-xyz"));
    }
}

//! The `aws:` section of the operator config and of a pool override.

use serde::{Deserialize, Serialize};

/// The `aws:` section of the operator config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AwsConfig {
    /// The region. Default: from the environment (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// An endpoint URL override, e.g. a VPC endpoint or a test server, for EC2 and (unless
    /// `serviceQuotasEndpointUrl` is set) Service Quotas. `AWS_ENDPOINT_URL` and
    /// `AWS_ENDPOINT_URL_EC2` work too.
    pub endpoint_url: Option<String>,
    /// The Service Quotas endpoint, when it is not `endpointUrl` (e.g. an EC2 VPC endpoint
    /// there, and Service Quotas' own here).
    pub service_quotas_endpoint_url: Option<String>,
    /// Inbound rules allowed per security group, per IP family. Unset: the quota read from
    /// Service Quotas (`L-0EA8095F`), else EC2's default, 60. Set: the lower of this and the
    /// quota read, so that a lower value keeps room for other tools.
    pub rule_quota: Option<usize>,
    /// Whether to read the rule quota from Service Quotas at all (`false`: `ruleQuota`, or 60,
    /// without a call and without a warning, e.g. where no Service Quotas endpoint is reachable).
    pub read_rule_quota: bool,
    /// How long a rule quota read from Service Quotas is reused (a failed read: at most 5
    /// minutes).
    pub rule_quota_cache_seconds: u64,
    /// The tag key on security groups that gives them to a pool: every group on a pool's nodes
    /// tagged `<key>=<pool>` is one of the pool's, and its rules are spread over them.
    pub pool_group_tag_key: String,
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
            service_quotas_endpoint_url: None,
            rule_quota: None,
            read_rule_quota: true,
            rule_quota_cache_seconds: 3600,
            pool_group_tag_key: DEFAULT_POOL_GROUP_TAG_KEY.to_string(),
            cluster_tag_key: None,
            max_rules_per_call: 100,
            resolution_cache_seconds: 300,
            attempt_timeout_seconds: 30,
            retry: RetrySettings::default(),
        }
    }
}

pub use nodeport_firewall_provider::retry::RetrySettings;

/// The default `poolGroupTagKey`.
pub const DEFAULT_POOL_GROUP_TAG_KEY: &str = "nodeport-firewall.io/pool";

/// EC2's default rule quota per security group and IP family, when none is configured or read.
pub const EC2_DEFAULT_RULE_QUOTA: usize = 60;

/// The `aws:` section of `pools.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsPoolConfig {
    /// The security groups the pool's rules go to; skips discovery. With several, the rules
    /// are spread over them (each rule on one group, filled in this order): every node of the
    /// pool must carry all of them.
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
        assert_eq!(c.rule_quota, Some(120));
        assert!(c.read_rule_quota);
        assert_eq!(c.pool_group_tag_key, "nodeport-firewall.io/pool");
        assert_eq!(AwsConfig::default().rule_quota, None);
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

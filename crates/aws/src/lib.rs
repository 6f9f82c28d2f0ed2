//! The AWS provider of nodeport-firewall: inbound rules of EC2 security groups, one target
//! per security group, resolved per node pool from the operator config or from the pool's
//! instances.
//!
//! Every EC2 call goes through [`AwsProvider::call`]: it is counted in [`CallStats`], retried
//! with the shared [`RetryPolicy`] (the SDK's own retries are off), and its error mapped to the
//! provider-neutral [`Error`]. No SDK type leaves this crate.
//!
//! The modules, one idea each: `client` makes the EC2 calls, `wire` maps EC2 rules to and
//! from the neutral model, `resolve` finds a pool's security groups, `quota` reads the rule
//! quota from Service Quotas, `render` gives long Service lists their digest, `apply`
//! carries out a plan, and `preflight` checks permissions with `DryRun`.

mod apply;
mod client;
pub mod config;
pub mod discovery;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod marker;
mod preflight;
pub mod quota;
pub mod render;
mod resolve;
pub mod stats;
mod wire;

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use nodeport_firewall_model::{
    Config, Limits, Observation, PoolTarget, Render, Target, TargetPlan,
};
use nodeport_firewall_provider::{
    ApplyFailure, ApplyReport, Error, ErrorKind, PoolView, Provider, Result, RetryPolicy,
};

pub use config::{AwsConfig, AwsPoolConfig, RetrySettings};
pub use stats::{CallStats, OpStats};

use resolve::CacheKey;

pub const NAME: &str = "aws";

/// Static credentials, for tests and local emulators. Production uses the default chain.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// The EC2 security-group provider.
pub struct AwsProvider {
    cluster: String,
    config: AwsConfig,
    tag_key: String,
    client: aws_sdk_ec2::Client,
    quotas: aws_sdk_servicequotas::Client,
    retry: RetryPolicy,
    renderer: render::AwsRenderer,
    resolutions: Mutex<HashMap<CacheKey, (Instant, Vec<String>)>>,
    quota_cache: quota::QuotaCache,
    stats: CallStats,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider")
            .field("cluster", &self.cluster)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Invalid, message)
}

impl AwsProvider {
    /// Reads the `aws:` section of the operator config and loads credentials and region
    /// from the default chain (env, web identity / IRSA, EKS Pod Identity, instance profile).
    pub async fn from_config(cluster: &str, section: Option<&serde_json::Value>) -> Result<Self> {
        Self::from_config_with(cluster, section, None).await
    }

    /// As [`AwsProvider::from_config`], with static credentials instead of the default chain.
    pub async fn from_config_with(
        cluster: &str,
        section: Option<&serde_json::Value>,
        credentials: Option<StaticCredentials>,
    ) -> Result<Self> {
        let config: AwsConfig = PoolView::section(section, NAME)?;
        if config.rule_quota == Some(0) || config.max_rules_per_call == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "aws: ruleQuota and maxRulesPerCall must be at least 1",
            ));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // Our retries, not the SDK's: counted, with the shared backoff.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(
                        config.attempt_timeout_seconds.max(1),
                    ))
                    .build(),
            );
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some(c) = credentials {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                None,
                None,
                "nodeport-firewall-static",
            ));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(Error::new(
                ErrorKind::Config,
                "aws: no region: set aws.region in the operator config, or AWS_REGION",
            ));
        }
        let client = aws_sdk_ec2::Client::new(&sdk);
        // Service Quotas at `endpointUrl` too unless it has its own: a test server answers
        // both, a VPC endpoint only its own service.
        let mut quotas = aws_sdk_servicequotas::config::Builder::from(&sdk);
        if let Some(url) = &config.service_quotas_endpoint_url {
            quotas = quotas.endpoint_url(url.clone());
        }
        let quotas = aws_sdk_servicequotas::Client::from_conf(quotas.build());
        let tag_key = config
            .cluster_tag_key
            .clone()
            .unwrap_or_else(|| format!("kubernetes.io/cluster/{cluster}"));
        Ok(AwsProvider {
            cluster: cluster.to_string(),
            retry: config.retry.policy(),
            config,
            tag_key,
            client,
            quotas,
            renderer: render::AwsRenderer::new(),
            resolutions: Mutex::new(HashMap::new()),
            quota_cache: quota::QuotaCache::default(),
            stats: CallStats::new(stats::kind),
        })
    }

    /// EC2 API calls made so far, by operation.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    /// The limits of every security group, with the rule quota from the config alone
    /// (`ruleQuota`, else EC2's default); [`AwsProvider::observe`] plans against the quota
    /// read from Service Quotas ([`AwsProvider::rule_quota`]).
    pub fn limits(&self) -> Limits {
        Limits {
            max_rules: Some(
                self.config
                    .rule_quota
                    .unwrap_or(config::EC2_DEFAULT_RULE_QUOTA),
            ),
            rules_counted_per_family: true,
            max_ports_per_rule: 1,
            max_sources_per_rule: 1,
            max_total_sources: None,
            max_total_destinations: None,
            max_rules_reason: None,
            updates_in_place: false,
            priorities: None,
            own_priority: None,
            deny_wins_ties: false,
        }
    }
}

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn call_stats(&self) -> Option<&CallStats> {
        Some(&self.stats)
    }

    fn renderer(&self) -> &dyn Render {
        &self.renderer
    }

    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        self.resolve_pool(pool).await
    }

    async fn observe(&self, target: &Target) -> Result<Observation> {
        let group = target.id.as_str();
        let rules = self
            .list_rules(group)
            .await?
            .iter()
            .filter(|r| r.is_egress() != Some(true))
            .filter(|r| r.group_id().is_none_or(|g| g == group))
            .map(|r| self.to_observed(r))
            .collect();
        let quota = self.rule_quota().await;
        let mut limits = self.limits();
        limits.max_rules = Some(quota.value);
        limits.max_rules_reason = quota.reason;
        let mut observation = Observation::new(rules, limits);
        observation.warnings.extend(quota.warning);
        Ok(observation)
    }

    /// The security groups holding rules of ours, from one `DescribeSecurityGroupRules`
    /// filtered by our cluster tag (paginated) in the region: each rule must be ours by tags
    /// and description, as in [`Provider::observe`]. The config is not needed: a pool that
    /// is gone from it, or whose `securityGroupIds` changed, is found just the same.
    async fn owned_targets(&self, _config: &Config) -> Result<Vec<Target>> {
        let groups: BTreeSet<String> = self
            .list_cluster_rules()
            .await?
            .iter()
            .filter(|r| r.is_egress() != Some(true))
            .filter(|r| self.to_observed(r).owned)
            .filter_map(|r| r.group_id().map(str::to_string))
            .collect();
        Ok(groups.iter().map(|g| Target::new(NAME, g)).collect())
    }

    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        Ok(self.check(target).await)
    }

    async fn apply(&self, plan: &TargetPlan) -> std::result::Result<ApplyReport, ApplyFailure> {
        self.apply_plan(plan).await
    }
}

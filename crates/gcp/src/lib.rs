//! The GCP provider of nodeport-firewall: VPC firewall rules, one target per (project,
//! network), each pool's rules scoped to the pool's network tag or service account, resolved
//! from the operator config or from the pool's instances.
//!
//! Every Compute call goes through [`GcpProvider::call`]: it is counted in [`CallStats`],
//! retried with the shared [`RetryPolicy`] (the SDK's own retries are off), and its error
//! mapped to the provider-neutral [`Error`]. Writes carry a `requestId`, so that a retried
//! write is applied once, and wait for their Operation to be DONE. No SDK type leaves this
//! crate.
//!
//! The modules, one idea each: `client` makes the Compute calls, `wire`
//! maps Compute rules to and from the neutral model, `resolve` finds a pool's target,
//! `apply` carries out a plan, `preflight` checks permissions, `network_admin` knows
//! when a network admin must make the writes (Shared VPC, 403) and what they run, `deny`
//! reads what a Deny rule may block, `orphans` finds the targets holding rules of ours,
//! and `quota` computes the room the project's `FIREWALLS` quota leaves a target.

mod apply;
mod client;
pub mod config;
mod deny;
pub mod discovery;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod marker;
mod network_admin;
mod orphans;
mod preflight;
mod project_quota;
mod quota;
pub mod render;
mod resolve;
pub mod stats;
mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use google_cloud_compute_v1::client::{Firewalls, Instances, Projects};
use nodeport_firewall_model::{
    Config, Limits, ManualSteps, Observation, PoolTarget, Render, Target, TargetPlan,
};
use nodeport_firewall_provider::{
    ApplyFailure, ApplyReport, Error, ErrorKind, PoolView, Provider, Result, RetryPolicy,
};

pub use config::{GcpConfig, GcpPoolConfig, RetrySettings};
pub use marker::Scope;
pub use stats::{CallStats, OpStats};

use resolve::{CacheKey, InstanceMap};

pub const NAME: &str = "gcp";

/// Where the provider's credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
    /// credentials, or the metadata server (GKE Workload Identity, the node's account).
    ApplicationDefault,
    /// No credentials, for emulators and test servers.
    Anonymous,
}

/// The GCP VPC firewall provider.
pub struct GcpProvider {
    cluster: String,
    config: GcpConfig,
    project: String,
    firewalls: Firewalls,
    instances: Instances,
    projects: Projects,
    retry: RetryPolicy,
    renderer: render::GcpRenderer,
    resolutions: Mutex<HashMap<CacheKey, (Instant, Scope)>>,
    /// Every instance of a project, read once for all pools resolved together.
    instance_cache: tokio::sync::Mutex<HashMap<String, (Instant, Arc<InstanceMap>)>>,
    /// Each project's `FIREWALLS` quota as last read (or why it could not be): a cloud
    /// fact shared by the targets of the project within one plan (`project_quota`).
    quota_cache: tokio::sync::Mutex<HashMap<String, (Instant, project_quota::QuotaRead)>>,
    /// The networks of each project that the config may write to, from the config of the
    /// current plan: they split the project's free quota (`quota`).
    config_networks: Mutex<BTreeMap<String, BTreeSet<String>>>,
    stats: CallStats,
}

impl std::fmt::Debug for GcpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpProvider")
            .field("cluster", &self.cluster)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Invalid, message)
}

fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message)
}

/// The credentials setting of the `gcp:` section: `applicationDefault` or `anonymous`.
fn credential_source(section: Option<&serde_json::Value>) -> Result<CredentialSource> {
    match section
        .and_then(|s| s.get("credentials"))
        .map(|v| v.as_str())
    {
        None | Some(Some("applicationDefault")) => Ok(CredentialSource::ApplicationDefault),
        Some(Some("anonymous")) => Ok(CredentialSource::Anonymous),
        Some(other) => Err(config_error(format!(
            "gcp.credentials: {other:?} is not applicationDefault or anonymous"
        ))),
    }
}

impl GcpProvider {
    /// Reads the `gcp:` section of the operator config. Credentials are Application Default
    /// Credentials unless the section says `credentials: anonymous` (emulators and tests).
    pub async fn from_config(cluster: &str, section: Option<&serde_json::Value>) -> Result<Self> {
        let source = credential_source(section)?;
        let section = section.map(|s| {
            let mut s = s.clone();
            if let Some(o) = s.as_object_mut() {
                o.remove("credentials");
            }
            s
        });
        Self::from_config_with(cluster, section.as_ref(), source).await
    }

    /// As [`GcpProvider::from_config`], with the credentials chosen by the caller.
    pub async fn from_config_with(
        cluster: &str,
        section: Option<&serde_json::Value>,
        credentials: CredentialSource,
    ) -> Result<Self> {
        let config: GcpConfig = PoolView::section(section, NAME)?;
        let project = config
            .project
            .clone()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                config_error(
                    "gcp.project is required: the project that holds the network's firewall rules (in a Shared VPC, the host project)",
                )
            })?;
        if config.rule_budget == 0
            || config.max_ports_per_rule == 0
            || config.max_source_ranges_per_rule == 0
            || config.write_concurrency == 0
        {
            return Err(config_error(
                "gcp: ruleBudget, maxPortsPerRule, maxSourceRangesPerRule and writeConcurrency must be at least 1",
            ));
        }
        if !(0..=65535).contains(&config.priority) {
            return Err(config_error("gcp.priority must be within 0-65535"));
        }
        if !config::valid_name(&config.network) {
            return Err(config_error(format!(
                "gcp.network: {:?} is not a network name",
                config.network
            )));
        }
        // The SDK's TLS needs a process-wide rustls provider; the operator uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let timeout = Duration::from_secs(config.attempt_timeout_seconds.max(1));
        let creds = match credentials {
            CredentialSource::Anonymous => {
                Some(google_cloud_auth::credentials::anonymous::Builder::new().build())
            }
            CredentialSource::ApplicationDefault => None,
        };
        let mut fw = Firewalls::builder()
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout(timeout);
        let mut inst = Instances::builder()
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout(timeout);
        let mut proj = Projects::builder()
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout(timeout);
        if let Some(endpoint) = &config.endpoint {
            fw = fw.with_endpoint(endpoint.clone());
            inst = inst.with_endpoint(endpoint.clone());
            proj = proj.with_endpoint(endpoint.clone());
        }
        if let Some(c) = creds {
            fw = fw.with_credentials(c.clone());
            inst = inst.with_credentials(c.clone());
            proj = proj.with_credentials(c);
        }
        let build_error = |e: google_cloud_gax::client_builder::Error| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "gcp: cannot build the Compute client (credentials: Application Default Credentials unless gcp.credentials says otherwise): {e}"
                ),
            )
        };
        let firewalls = fw.build().await.map_err(build_error)?;
        let instances = inst.build().await.map_err(build_error)?;
        let projects = proj.build().await.map_err(build_error)?;
        // Until a plan hands over the whole config, the default target is the one known.
        let config_networks = Mutex::new(BTreeMap::from([(
            project.clone(),
            BTreeSet::from([config.network.clone()]),
        )]));
        Ok(GcpProvider {
            cluster: cluster.to_string(),
            retry: config.retry.policy(),
            project,
            config,
            firewalls,
            instances,
            projects,
            renderer: render::GcpRenderer::new(),
            resolutions: Mutex::new(HashMap::new()),
            instance_cache: tokio::sync::Mutex::new(HashMap::new()),
            quota_cache: tokio::sync::Mutex::new(HashMap::new()),
            config_networks,
            stats: CallStats::new(stats::kind),
        })
    }

    /// Compute API calls made so far, by operation.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    pub fn config(&self) -> &GcpConfig {
        &self.config
    }

    /// The limits of every target, from the config alone (`observe` lowers `max_rules` to
    /// what the project's quota leaves).
    pub fn limits(&self) -> Limits {
        Limits {
            max_rules: Some(self.config.rule_budget),
            rules_counted_per_family: false,
            max_ports_per_rule: self.config.max_ports_per_rule,
            max_sources_per_rule: self.config.max_source_ranges_per_rule,
            max_total_sources: None,
            max_total_destinations: None,
            max_rules_reason: None,
            updates_in_place: true,
            priorities: None,
            // Every rule of ours is written at gcp.priority; the plan cannot move it.
            own_priority: Some(self.own_priority()),
            // Compute: "DENY rules take precedence over ALLOW rules if they have equal
            // priority" (Firewall.priority in the API reference).
            deny_wins_ties: true,
        }
    }
}

#[async_trait]
impl Provider for GcpProvider {
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

    /// One filtered list of the network, then the project's quota (`project_quota`).
    async fn observe(&self, target: &Target) -> Result<Observation> {
        Ok(self.observe_target(target).await?.0)
    }

    /// Targets holding rules of ours, by name prefix in the config's projects (`orphans`).
    /// Each plan starts here: the config's networks are noted (they split a project's
    /// quota) and the quotas read by the last plan are forgotten.
    async fn owned_targets(&self, config: &Config) -> Result<Vec<Target>> {
        self.start_plan(config).await;
        self.find_owned_targets(config).await
    }

    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        self.missing_permissions(target).await
    }

    fn manual_steps(&self, plan: &TargetPlan) -> Option<ManualSteps> {
        self.network_admin_steps(plan)
    }

    async fn apply(&self, plan: &TargetPlan) -> std::result::Result<ApplyReport, ApplyFailure> {
        let result = self.apply_plan(plan).await;
        // Our writes changed the project's usage: the next read of its quota is fresh.
        self.forget_quota(&plan.target).await;
        result
    }
}

//! The Azure provider of nodeport-firewall: inbound security rules of network security
//! groups, one target per NSG, each pool's rules scoped inside it by their destination (the
//! pool's subnet prefix, its application security group, or its node IPs).
//!
//! Only per-rule PUT and DELETE are used: a whole-NSG PUT would replace everyone else's
//! rules. Every ARM call goes through [`AzureProvider::call`]: counted in [`CallStats`],
//! retried with the shared [`RetryPolicy`] (the SDK's own retries are off) honouring
//! Retry-After, its error mapped to the provider-neutral [`Error`]. No SDK type leaves this
//! crate.
//!
//! The modules, one idea each: `client` makes the ARM calls, `wire` maps ARM rules to and
//! from the neutral model, `observe` reads an NSG and the limits left for us, `resolve`
//! finds a pool's NSG and destination, `orphans` finds the NSGs holding rules of ours,
//! and `apply` carries out a plan.

mod apply;
mod client;
pub mod config;
pub mod credential;
pub mod discovery;
pub mod error;
mod http;
pub mod marker;
mod observe;
pub mod orphans;
mod render;
mod resolve;
pub mod stats;
mod wire;
#[cfg(test)]
mod wire_props;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::auth::TokenCredential;
use azure_core::{HttpClient, RetryOptions, TransportOptions, Url};
use nodeport_firewall_model::{Config, Observation, PoolTarget, Render, Target, TargetPlan};
use nodeport_firewall_provider::{
    ApplyFailure, ApplyReport, Error, ErrorKind, PoolView, Provider, Result, RetryPolicy,
};

pub use config::{AzureConfig, AzurePoolConfig, CredentialKind, PriorityBand, RetrySettings};
pub use stats::{CallStats, OpStats};
pub use wire::NsgId;

use resolve::{Resolution, ResolutionKey};

pub const NAME: &str = "azure";

/// The public-cloud ARM endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://management.azure.com";

/// How the provider authenticates.
#[derive(Clone, Default)]
pub enum Credentials {
    /// `azure.credential` from the config (default: the chain).
    #[default]
    FromConfig,
    /// A fixed bearer token, for test servers.
    StaticToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::FromConfig => f.write_str("FromConfig"),
            Credentials::StaticToken(_) => f.write_str("StaticToken(..)"),
        }
    }
}

/// The NSG provider.
pub struct AzureProvider {
    cluster: String,
    config: AzureConfig,
    client: azure_mgmt_network::package_2024_03::Client,
    http: Arc<dyn HttpClient>,
    credential: Arc<dyn TokenCredential>,
    token_scope: String,
    retry: RetryPolicy,
    renderer: render::NsgRenderer,
    /// Discovered (NSG, destination) per pool and VMSS set.
    resolutions: Mutex<HashMap<ResolutionKey, Resolution>>,
    /// One writer per NSG, even when several pools (targets of one apply) share it.
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    stats: CallStats,
}

impl std::fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureProvider")
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

/// Timeout of one HTTP attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

impl AzureProvider {
    /// Reads the `azure:` section of the operator config; credentials from the chain.
    pub async fn from_config(cluster: &str, section: Option<&serde_json::Value>) -> Result<Self> {
        Self::from_config_with(cluster, section, Credentials::FromConfig).await
    }

    /// As [`AzureProvider::from_config`], with the given credentials.
    pub async fn from_config_with(
        cluster: &str,
        section: Option<&serde_json::Value>,
        credentials: Credentials,
    ) -> Result<Self> {
        let config: AzureConfig = PoolView::section(section, NAME)?;
        config.validate()?;
        let endpoint_text = config
            .endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let endpoint = Url::parse(&endpoint_text)
            .map_err(|e| config_error(format!("azure.endpoint {endpoint_text:?}: {e}")))?;
        let token_scope = match &config.token_scope {
            Some(s) => s.clone(),
            None => format!("{}/.default", endpoint_text.trim_end_matches('/')),
        };
        let http = azure_core::new_http_client();
        let credential: Arc<dyn TokenCredential> = match credentials {
            Credentials::StaticToken(t) => Arc::new(credential::StaticToken(t)),
            Credentials::FromConfig => credential::build(
                config.credential,
                &config.workload_identity,
                http.clone(),
                config.authority_host.as_deref(),
            )
            .map_err(|e| config_error(format!("azure credentials: {}", error::chain(&e))))?,
        };
        let transport = http::Transport {
            http: http.clone(),
            attempt_timeout: ATTEMPT_TIMEOUT,
        };
        let client = azure_mgmt_network::package_2024_03::ClientBuilder::new(credential.clone())
            .endpoint(endpoint)
            .scopes(&[token_scope.as_str()])
            // Our retries, not the SDK's: counted, with the shared backoff.
            .retry(RetryOptions::none())
            .transport(TransportOptions::new_custom_policy(Arc::new(transport)))
            .build()
            .map_err(|e| config_error(format!("azure client: {}", error::chain(&e))))?;
        Ok(AzureProvider {
            cluster: cluster.to_string(),
            retry: config
                .retry
                .policy_with_max_delay(config::DEFAULT_MAX_RETRY_DELAY),
            config,
            client,
            http,
            credential,
            token_scope,
            renderer: render::NsgRenderer::new(),
            resolutions: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            stats: CallStats::new(stats::kind),
        })
    }

    /// ARM calls made so far, by operation.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    pub fn config(&self) -> &AzureConfig {
        &self.config
    }
}

#[async_trait]
impl Provider for AzureProvider {
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

    /// The NSGs holding rules of ours in the resource groups of the NSGs the config names
    /// and in `azure.orphanScopes` ([`orphans`]): one paged list per scope.
    async fn owned_targets(&self, config: &Config) -> Result<Vec<Target>> {
        self.nsgs_with_rules_of_ours(config).await
    }

    async fn observe(&self, target: &Target) -> Result<Observation> {
        let nsg = NsgId::parse(&target.id).map_err(invalid)?;
        self.observe_nsg(&nsg).await
    }

    /// ARM has no dry run: only the read is checked. Missing write or delete permissions
    /// show at apply as `AuthorizationFailed`, naming the action.
    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        match self.observe(target).await {
            Ok(_) => Ok(Vec::new()),
            Err(e) if e.kind == ErrorKind::PermissionDenied => Ok(vec![format!(
                "Microsoft.Network/networkSecurityGroups/securityRules/read ({e})"
            )]),
            Err(e) => Err(e),
        }
    }

    async fn apply(&self, plan: &TargetPlan) -> std::result::Result<ApplyReport, ApplyFailure> {
        self.apply_plan(plan).await
    }
}

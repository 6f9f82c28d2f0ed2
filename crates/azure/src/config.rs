//! The `azure:` section of the operator config and of a pool override.

use std::time::Duration;

use nodeport_firewall_provider::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// The `azure:` section of the operator config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AzureConfig {
    /// The NSG every pool's rules go to unless the pool names its own: a full resource id
    /// (`/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Network/networkSecurityGroups/<name>`).
    pub network_security_group: Option<String>,
    /// The ARM endpoint. Default: the public cloud, `https://management.azure.com`.
    pub endpoint: Option<String>,
    /// The token scope asked for. Default: `<endpoint>/.default`. Set it when the endpoint
    /// is overridden (a test server, a sovereign cloud behind a proxy).
    pub token_scope: Option<String>,
    /// The Entra ID authority. Default: `AZURE_AUTHORITY_HOST`, else the public cloud.
    pub authority_host: Option<String>,
    /// Which credential to use: `chain` (default: workload identity, managed identity,
    /// environment client secret, Azure CLI, first that works), or one of
    /// `workloadIdentity`, `managedIdentity`, `clientSecret`, `azureCli`.
    pub credential: CredentialKind,
    /// Workload identity settings; each falls back to the variable the AKS webhook sets.
    pub workload_identity: WorkloadIdentityConfig,
    /// The priorities our inbound rules may take.
    pub priority_band: PriorityBand,
    /// Rules per NSG, both directions (Azure: 1000).
    pub rule_quota: usize,
    /// Source prefixes per NSG, summed over all rules (Azure: 4000).
    pub source_prefix_quota: usize,
    /// Destination prefixes per NSG, summed over all rules (Azure: 4000).
    pub destination_prefix_quota: usize,
    /// Destination port ranges one rule may hold.
    pub max_port_ranges_per_rule: usize,
    /// Source prefixes one rule may hold.
    pub max_sources_per_rule: usize,
    /// Longest wait for one long-running write (PUT or DELETE polling), in seconds.
    pub operation_timeout_seconds: u64,
    /// Poll interval of long-running operations when the server sends no Retry-After.
    pub poll_interval_millis: u64,
    /// Attempts at a rule PUT when another writer took the priority we chose.
    pub max_priority_conflicts: u32,
    /// Look for a pool's ASG or own subnet (VMSS NICs) when the config names no
    /// destination; otherwise the pool's node IPs are the destination.
    pub discover_destination: bool,
    /// How long a pool's discovered NSG and destination are reused while its VMSSs stay
    /// the same.
    pub resolution_cache_seconds: u64,
    /// Subscriptions (`/subscriptions/<sub>`) or resource groups
    /// (`/subscriptions/<sub>/resourceGroups/<rg>`) also searched for NSGs holding rules
    /// of ours that no managed pool maps to any more (orphans), besides the resource
    /// groups of the NSGs the config names.
    pub orphan_scopes: Vec<String>,
    pub retry: RetrySettings,
}

impl Default for AzureConfig {
    fn default() -> Self {
        AzureConfig {
            network_security_group: None,
            endpoint: None,
            token_scope: None,
            authority_host: None,
            credential: CredentialKind::Chain,
            workload_identity: WorkloadIdentityConfig::default(),
            priority_band: PriorityBand::default(),
            rule_quota: 1000,
            source_prefix_quota: 4000,
            destination_prefix_quota: 4000,
            max_port_ranges_per_rule: 100,
            max_sources_per_rule: 200,
            operation_timeout_seconds: 300,
            poll_interval_millis: 2000,
            max_priority_conflicts: 5,
            discover_destination: true,
            resolution_cache_seconds: 300,
            orphan_scopes: Vec::new(),
            retry: RetrySettings::default(),
        }
    }
}

impl AzureConfig {
    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(ErrorKind::Config, format!("azure: {m}")));
        let b = &self.priority_band;
        if !(100..=4096).contains(&b.from) || !(100..=4096).contains(&b.to) || b.from > b.to {
            return bad(format!(
                "priorityBand {}-{} must lie within 100-4096, from <= to",
                b.from, b.to
            ));
        }
        if self.rule_quota == 0
            || self.max_port_ranges_per_rule == 0
            || self.max_sources_per_rule == 0
            || self.source_prefix_quota == 0
            || self.destination_prefix_quota == 0
        {
            return bad("quotas and per-rule limits must be at least 1".to_string());
        }
        if !(1..=86_400).contains(&self.operation_timeout_seconds) {
            return bad("operationTimeoutSeconds must be 1-86400".to_string());
        }
        for scope in &self.orphan_scopes {
            crate::orphans::Scope::parse(scope)
                .map_err(|e| Error::new(ErrorKind::Config, format!("azure.orphanScopes: {e}")))?;
        }
        if let Some(nsg) = &self.network_security_group {
            crate::NsgId::parse(nsg).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("azure.networkSecurityGroup: {e}"),
                )
            })?;
        }
        Ok(())
    }

    pub fn operation_timeout(&self) -> Duration {
        Duration::from_secs(self.operation_timeout_seconds)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_millis)
    }
}

/// Where credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CredentialKind {
    #[default]
    Chain,
    WorkloadIdentity,
    ManagedIdentity,
    ClientSecret,
    AzureCli,
}

/// Workload identity: which app registration or managed identity, and the federated token.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WorkloadIdentityConfig {
    /// Default: `AZURE_TENANT_ID`.
    pub tenant_id: Option<String>,
    /// Default: `AZURE_CLIENT_ID`.
    pub client_id: Option<String>,
    /// Default: `AZURE_FEDERATED_TOKEN_FILE`. Read again for every new access token.
    pub token_file: Option<String>,
}

/// An inclusive range of NSG priorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriorityBand {
    pub from: i32,
    pub to: i32,
}

impl Default for PriorityBand {
    /// Far above the priorities the AKS cloud provider gives LoadBalancer rules (from 500
    /// upwards) and below 4096, where users put catch-all deny rules.
    fn default() -> Self {
        PriorityBand {
            from: 3000,
            to: 3999,
        }
    }
}

impl PriorityBand {
    pub fn contains(&self, p: i32) -> bool {
        self.from <= p && p <= self.to
    }

    pub fn size(&self) -> usize {
        usize::try_from(self.to - self.from + 1).unwrap_or(0)
    }
}

pub use nodeport_firewall_provider::retry::RetrySettings;

/// The longest wait between two attempts when `retry.maxDelayMillis` is unset: ARM asks for
/// up to a minute when an NSG is busy.
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The `azure:` section of `pools.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AzurePoolConfig {
    /// The NSG of this pool's rules (full resource id); overrides `azure.networkSecurityGroup`.
    #[serde(default)]
    pub network_security_group: Option<String>,
    /// The destination of this pool's rules: its subnet prefix(es). Excludes
    /// `applicationSecurityGroup`.
    #[serde(default)]
    pub destination_prefixes: Vec<String>,
    /// The destination of this pool's rules: the application security group (full resource
    /// id) its NICs carry.
    #[serde(default)]
    pub application_security_group: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_camel_case_and_rejects_unknown_fields() {
        let c: AzureConfig = serde_json::from_value(serde_json::json!({
            "priorityBand": {"from": 2000, "to": 2099}, "ruleQuota": 900,
            "credential": "workloadIdentity", "retry": {"maxAttempts": 3}
        }))
        .unwrap();
        assert_eq!(c.priority_band.size(), 100);
        assert_eq!(c.credential, CredentialKind::WorkloadIdentity);
        assert_eq!(c.retry.max_attempts, 3);
        c.validate().unwrap();
        assert!(
            serde_json::from_value::<AzureConfig>(serde_json::json!({"prioritBand": {}})).is_err()
        );
        assert!(
            serde_json::from_value::<AzurePoolConfig>(serde_json::json!({"nsg": "x"})).is_err()
        );
    }

    #[test]
    fn band_is_validated() {
        for (from, to, ok) in [
            (100, 4096, true),
            (99, 200, false),
            (300, 200, false),
            (4000, 4097, false),
            (3000, 3000, true),
        ] {
            let c = AzureConfig {
                priority_band: PriorityBand { from, to },
                ..AzureConfig::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{from}-{to}");
        }
    }
}

//! The `gcp:` section of the operator config and of a pool override.

use serde::{Deserialize, Serialize};

/// The `gcp:` section of the operator config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GcpConfig {
    /// The project that holds the firewall rules: the network's project (in a Shared VPC,
    /// the host project). Required.
    pub project: Option<String>,
    /// The VPC network the rules are written to.
    pub network: String,
    /// An endpoint override, e.g. `https://compute.googleapis.com` through a proxy, or a test
    /// server (`http://127.0.0.1:PORT`).
    pub endpoint: Option<String>,
    /// Firewall rules the network may hold, counting rules of others on it. The plan is
    /// refused before any call when it would pass this budget.
    pub rule_budget: usize,
    /// Ports or port ranges in one rule's `allowed` entry.
    pub max_ports_per_rule: usize,
    /// Source ranges in one rule.
    pub max_source_ranges_per_rule: usize,
    /// The priority of the rules written (0-65535, lower wins).
    pub priority: i32,
    /// Network tags that every node of the cluster carries and that must never be used as a
    /// pool target, besides GKE's own `gke-<cluster>-<hash>-node`.
    pub cluster_wide_tags: Vec<String>,
    /// How long a pool's discovered target is reused while its nodes stay the same.
    pub resolution_cache_seconds: u64,
    /// Timeout of one HTTP attempt.
    pub attempt_timeout_seconds: u64,
    /// The first wait between two polls of an Operation; later waits grow to 5 s.
    pub operation_poll_millis: u64,
    /// How long to wait for one Operation to be DONE.
    pub operation_timeout_seconds: u64,
    /// Writes in flight at once on one target.
    pub write_concurrency: usize,
    pub retry: RetrySettings,
}

impl Default for GcpConfig {
    fn default() -> Self {
        GcpConfig {
            project: None,
            network: "default".to_string(),
            endpoint: None,
            rule_budget: 100,
            max_ports_per_rule: 100,
            max_source_ranges_per_rule: 256,
            priority: 1000,
            cluster_wide_tags: Vec::new(),
            resolution_cache_seconds: 300,
            attempt_timeout_seconds: 30,
            operation_poll_millis: 500,
            operation_timeout_seconds: 300,
            write_concurrency: 4,
            retry: RetrySettings::default(),
        }
    }
}

pub use nodeport_firewall_provider::retry::RetrySettings;

/// The `gcp:` section of `pools.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GcpPoolConfig {
    /// Network tags that select exactly this pool's instances; skips discovery.
    #[serde(default)]
    pub target_tags: Vec<String>,
    /// A service account used by exactly this pool's instances; skips discovery.
    #[serde(default)]
    pub target_service_account: Option<String>,
    /// The project of this pool's rules, when not `gcp.project`.
    #[serde(default)]
    pub project: Option<String>,
    /// The network of this pool's rules, when not `gcp.network`.
    #[serde(default)]
    pub network: Option<String>,
}

/// Whether `s` is a valid Compute resource name or network tag: RFC 1035, 1-63 characters.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// Whether `s` looks like a service account email.
pub fn valid_service_account(s: &str) -> bool {
    s.split_once('@').is_some_and(|(user, domain)| {
        !user.is_empty() && domain.contains('.') && !s.chars().any(char::is_whitespace)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_camel_case_and_rejects_unknown_fields() {
        let c: GcpConfig = serde_json::from_value(serde_json::json!({
            "project": "p", "network": "vpc", "ruleBudget": 50, "maxPortsPerRule": 10,
            "retry": {"maxAttempts": 3}
        }))
        .unwrap();
        assert_eq!(c.project.as_deref(), Some("p"));
        assert_eq!(c.rule_budget, 50);
        assert_eq!(c.max_source_ranges_per_rule, 256);
        assert_eq!(c.retry.max_attempts, 3);
        assert!(serde_json::from_value::<GcpConfig>(serde_json::json!({"projet": "x"})).is_err());
        assert!(
            serde_json::from_value::<GcpPoolConfig>(serde_json::json!({"targetTag": "x"})).is_err()
        );
    }

    #[test]
    fn names_and_accounts() {
        for (s, ok) in [
            ("a", true),
            ("web-pool-1", true),
            ("", false),
            ("1abc", false),
            ("abc-", false),
            ("Abc", false),
            ("a_b", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ] {
            assert_eq!(valid_name(s), ok, "{s:?}");
        }
        assert!(valid_service_account("pool-a@proj.iam.gserviceaccount.com"));
        assert!(!valid_service_account("pool-a"));
        assert!(!valid_service_account("@x.com"));
    }
}

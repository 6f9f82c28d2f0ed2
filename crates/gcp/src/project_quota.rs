//! Observing a target with its project's quota: one filtered `firewalls.list` of the
//! network, then the project's `FIREWALLS` limit and usage (`projects.get`, shared by the
//! targets of the project within a plan), which lower the target's `max_rules` below
//! `gcp.ruleBudget` when tighter ([`quota::max_rules`]). A quota that cannot be read
//! leaves `ruleBudget` alone, with one warning, and the plan goes on.

use std::collections::BTreeSet;
use std::time::Instant;

use nodeport_firewall_model::{Config, Observation, ObservedRule, Target};
use nodeport_firewall_provider::{ErrorKind, Result};

use crate::quota::{self, FirewallQuota, QUOTA_CACHE_TTL};
use crate::{GcpPoolConfig, GcpProvider, NAME, config};

/// The quota of a project as read, or the warning that says why it could not be.
pub(crate) type QuotaRead = std::result::Result<FirewallQuota, QuotaUnread>;

/// Why a project's quota could not be read: the plan's warning, and whether the
/// permission `compute.projects.get` is what is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QuotaUnread {
    pub warning: String,
    pub denied: bool,
}

impl GcpProvider {
    /// The target's rules and limits; `true` besides when the quota could not be read for
    /// want of `compute.projects.get` (for the permission preflight).
    pub(crate) async fn observe_target(&self, target: &Target) -> Result<(Observation, bool)> {
        let (project, network) = Self::split_target(target)?;
        let filter = format!("network = \"{}\"", Self::network_url(project, network));
        // The list first, the quota after: a rule another tool adds between the two then
        // counts in the usage as outside this network, which can only make the room
        // smaller.
        let rules: Vec<ObservedRule> = self
            .list_firewalls(project, &filter)
            .await?
            .iter()
            .filter_map(|fw| self.to_observed(fw))
            .collect();
        let mut limits = self.limits();
        let mut warnings = Vec::new();
        let mut denied = false;
        match self.firewall_quota(project).await {
            Ok(q) => {
                let sharing = self.networks_sharing(project, network);
                let (max, reason) =
                    quota::max_rules(self.config.rule_budget, q, rules.len(), sharing);
                limits.max_rules = Some(max);
                limits.max_rules_reason = reason;
            }
            Err(unread) => {
                denied = unread.denied;
                warnings.push(unread.warning);
            }
        }
        let mut observation = Observation::new(rules, limits);
        observation.warnings = warnings;
        Ok((observation, denied))
    }

    /// The `FIREWALLS` quota of `project`: read once, then shared by the project's other
    /// targets for at most [`QUOTA_CACHE_TTL`] (a failed read too, so that an outage or a
    /// missing permission costs one call per project and plan, not one per target).
    async fn firewall_quota(&self, project: &str) -> QuotaRead {
        let mut cache = self.quota_cache.lock().await;
        if let Some((at, read)) = cache.get(project)
            && at.elapsed() < QUOTA_CACHE_TTL
        {
            return read.clone();
        }
        let answer = self
            .call("projects.get", || {
                self.projects.get().set_project(project).send()
            })
            .await;
        let budget = self.config.rule_budget;
        let read = match answer {
            Ok(p) => quota::firewalls_of(&p.quotas).ok_or_else(|| QuotaUnread {
                warning: format!(
                    "project {project} reports no usable FIREWALLS quota in projects.get: planning against gcp.ruleBudget {budget} alone"
                ),
                denied: false,
            }),
            Err(e) if e.kind == ErrorKind::PermissionDenied => Err(QuotaUnread {
                warning: format!(
                    "could not read the FIREWALLS quota of project {project} (permission compute.projects.get missing): planning against gcp.ruleBudget {budget} alone; grant the permission (deploy/iam/gcp-custom-role.yaml) so that the plan sees the real quota"
                ),
                denied: true,
            }),
            Err(e) => Err(QuotaUnread {
                warning: format!(
                    "could not read the FIREWALLS quota of project {project} ({e}): planning against gcp.ruleBudget {budget} alone"
                ),
                denied: false,
            }),
        };
        cache.insert(project.to_string(), (Instant::now(), read.clone()));
        read
    }

    /// The start of a plan (the engine searches for orphans first): notes the networks
    /// that `config` may write to in each project, and forgets the quotas read before, so
    /// that each plan reads each project's quota once.
    pub(crate) async fn start_plan(&self, config: &Config) {
        let mut networks = std::collections::BTreeMap::<String, BTreeSet<String>>::new();
        // Pools the config does not list go to gcp.project / gcp.network.
        networks
            .entry(self.project.clone())
            .or_default()
            .insert(self.config.network.clone());
        for pool in config.pools.values().filter(|p| p.managed != Some(false)) {
            // A section that does not parse fails where the pool is resolved; here it can
            // only add a network that shares a quota.
            let over: GcpPoolConfig = pool
                .provider(NAME)
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or_default();
            let project = over.project.unwrap_or_else(|| self.project.clone());
            let network = over.network.unwrap_or_else(|| self.config.network.clone());
            if config::valid_name(&network) {
                networks.entry(project).or_default().insert(network);
            }
        }
        if let Ok(mut known) = self.config_networks.lock() {
            *known = networks;
        }
        self.quota_cache.lock().await.clear();
    }

    /// How many networks of `project` share its free quota with `network`: those the
    /// config may write to, and `network` itself.
    fn networks_sharing(&self, project: &str, network: &str) -> usize {
        let Ok(known) = self.config_networks.lock() else {
            return 1;
        };
        let others = known
            .get(project)
            .map_or(0, |n| n.iter().filter(|n| n.as_str() != network).count());
        others + 1
    }

    /// Forgets the quota read of `target`'s project (after a write there).
    pub(crate) async fn forget_quota(&self, target: &Target) {
        if let Ok((project, _)) = Self::split_target(target) {
            self.quota_cache.lock().await.remove(project);
        }
    }
}

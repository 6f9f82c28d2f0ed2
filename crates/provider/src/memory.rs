//! The in-memory provider: a faithful, configurable stand-in for a cloud firewall. The
//! offline `plan` and the tests use it. Its state can be saved to and loaded from JSON.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nodeport_firewall_model::render::NameParts;
use nodeport_firewall_model::{
    Action, Config, Denial, Limits, Observation, ObservedRule, PoolTarget, Render, Rule,
    ShapeRenderer, Target, TargetPlan,
};
use serde::{Deserialize, Serialize};

use crate::{ApplyFailure, ApplyReport, Error, ErrorKind, PoolView, Provider, Result};

pub const NAME: &str = "memory";

/// The `memory:` section of the operator config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MemoryConfig {
    pub limits: Limits,
    /// Whether rules get names (GCP/Azure style) or are known by content (EC2 style).
    pub named_rules: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            limits: Limits {
                max_rules: Some(100),
                rules_counted_per_family: false,
                max_ports_per_rule: 50,
                max_sources_per_rule: 64,
                max_total_sources: None,
                max_total_destinations: None,
                max_rules_reason: None,
                updates_in_place: true,
                priorities: None,
                own_priority: None,
                deny_wins_ties: false,
            },
            named_rules: true,
        }
    }
}

/// The `memory:` section of a pool override.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MemoryPoolConfig {
    /// The target the pool's rules go to. Default: a target named after the pool.
    target: Option<String>,
    /// Several targets the pool's rules are spread over, each rule on one of them (as on
    /// AWS security groups that all the pool's nodes carry). Instead of `target`.
    #[serde(default)]
    targets: Vec<String>,
    /// Where inside the target the pool's rules apply.
    scope: Option<String>,
}

/// A rule stored in memory, with its owner's cluster name (`None`: no marker at all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRule {
    pub id: String,
    pub owner: Option<String>,
    #[serde(flatten)]
    pub rule: Rule,
    /// Its place in the evaluation order, where the target has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Set for a Deny rule (only ever seeded, as another tool would write it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Denial>,
}

/// Everything the in-memory provider holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryState {
    pub targets: BTreeMap<String, Vec<StoredRule>>,
    pub next_id: u64,
}

/// Counts of calls, to show the provider is called as little as the design says.
#[derive(Debug, Default)]
pub struct CallCounts {
    pub resolves: AtomicUsize,
    pub observes: AtomicUsize,
    pub applies: AtomicUsize,
}

/// An in-memory firewall that behaves like a cloud: quotas, duplicate detection, ownership.
pub struct MemoryProvider {
    cluster: String,
    config: MemoryConfig,
    renderer: ShapeRenderer,
    /// The "cloud": shared by every instance made with [`MemoryProvider::instance`].
    state: Arc<Mutex<MemoryState>>,
    pub calls: CallCounts,
}

impl std::fmt::Debug for MemoryProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryProvider")
            .field("cluster", &self.cluster)
            .field("config", &self.config)
            .finish()
    }
}

impl MemoryProvider {
    pub fn new(cluster: &str, config: MemoryConfig) -> Self {
        let renderer = if config.named_rules {
            let prefix = format!("npf-{}", sanitize(cluster));
            ShapeRenderer::named(move |parts: &NameParts<'_>| {
                format!("{prefix}-{}", parts.short_hash())
            })
        } else {
            ShapeRenderer::unnamed()
        };
        MemoryProvider {
            cluster: cluster.to_string(),
            config,
            renderer,
            state: Arc::new(Mutex::new(MemoryState::default())),
            calls: CallCounts::default(),
        }
    }

    /// A new instance on the same backend, as a second process talking to the same cloud
    /// would be: it shares the stored rules and nothing else.
    pub fn instance(&self) -> Self {
        MemoryProvider {
            state: Arc::clone(&self.state),
            ..Self::new(&self.cluster, self.config.clone())
        }
    }

    /// Reads the `memory:` section of the operator config.
    pub fn from_config(cluster: &str, section: Option<&serde_json::Value>) -> Result<Self> {
        let config: MemoryConfig = PoolView::section(section, NAME)?;
        Ok(Self::new(cluster, config))
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryState>> {
        self.state
            .lock()
            .map_err(|_| Error::new(ErrorKind::Other, "memory provider state poisoned"))
    }

    /// Replaces the whole state, e.g. from a saved file.
    pub fn load(&self, state: MemoryState) -> Result<()> {
        *self.lock()? = state;
        Ok(())
    }

    /// A copy of the whole state.
    pub fn snapshot(&self) -> Result<MemoryState> {
        Ok(self.lock()?.clone())
    }

    /// Writes a rule owned by `owner` (`None`: no marker) directly, as another tool would.
    pub fn seed(&self, target: &str, owner: Option<&str>, rule: Rule) -> Result<String> {
        self.seed_stored(target, owner, rule, None, None)
    }

    /// Writes a rule of others at `priority`, denying what `deny` says if set, directly.
    pub fn seed_at(
        &self,
        target: &str,
        rule: Rule,
        priority: u32,
        deny: Option<Denial>,
    ) -> Result<String> {
        self.seed_stored(target, None, rule, Some(priority), deny)
    }

    fn seed_stored(
        &self,
        target: &str,
        owner: Option<&str>,
        rule: Rule,
        priority: Option<u32>,
        deny: Option<Denial>,
    ) -> Result<String> {
        let mut state = self.lock()?;
        state.next_id += 1;
        let id = format!("r-{}", state.next_id);
        state
            .targets
            .entry(target.to_string())
            .or_default()
            .push(StoredRule {
                id: id.clone(),
                owner: owner.map(str::to_string),
                rule,
                priority,
                deny,
            });
        Ok(id)
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

#[async_trait]
impl Provider for MemoryProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn renderer(&self) -> &dyn Render {
        &self.renderer
    }

    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        self.calls.resolves.fetch_add(1, Ordering::Relaxed);
        let over: MemoryPoolConfig = pool.override_config(NAME)?;
        if !over.targets.is_empty() {
            if over.target.is_some() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "pools.{}.memory: give target or targets, not both",
                        pool.name
                    ),
                ));
            }
            return Ok(over
                .targets
                .iter()
                .map(|id| PoolTarget {
                    spread: Some(pool.name.to_string()),
                    ..PoolTarget::new(Target::new(NAME, id), over.scope.clone())
                })
                .collect());
        }
        let id = over.target.unwrap_or_else(|| pool.name.to_string());
        Ok(vec![PoolTarget::new(Target::new(NAME, &id), over.scope)])
    }

    async fn observe(&self, target: &Target) -> Result<Observation> {
        self.calls.observes.fetch_add(1, Ordering::Relaxed);
        let state = self.lock()?;
        let rules = state
            .targets
            .get(&target.id)
            .map(|rules| {
                rules
                    .iter()
                    .map(|r| {
                        let mut rule = r.rule.clone();
                        if r.deny.is_some() {
                            // A Deny never satisfies a wanted rule, and is never ours.
                            rule.content.sources.clear();
                        }
                        let mut o = ObservedRule::new(
                            Some(r.id.clone()),
                            rule,
                            r.deny.is_none() && r.owner.as_deref() == Some(self.cluster.as_str()),
                        );
                        o.priority = r.priority;
                        o.deny = r.deny.clone();
                        o
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Observation::new(rules, self.config.limits.clone()))
    }

    async fn apply(&self, plan: &TargetPlan) -> std::result::Result<ApplyReport, ApplyFailure> {
        self.calls.applies.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = &plan.error {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("refusing a plan with an error: {e}"),
            )
            .into());
        }
        let mut state = self.lock()?;
        let cluster = self.cluster.clone();
        let limits = self.config.limits.clone();
        // Work on a copy and commit at the end: a failed request changes nothing, like one
        // cloud API call that is refused as a whole.
        let mut next_id = state.next_id;
        let mut rules = state
            .targets
            .get(&plan.target.id)
            .cloned()
            .unwrap_or_default();
        let mut report = ApplyReport::default();

        let own = |rules: &[StoredRule], id: &Option<String>| -> Result<usize> {
            let id = id
                .as_deref()
                .ok_or_else(|| Error::new(ErrorKind::Invalid, "change without rule id"))?;
            let idx = rules.iter().position(|r| r.id == id).ok_or_else(|| {
                Error::new(ErrorKind::NotFound, format!("rule {id} not found"))
                    .with_code("NotFound")
            })?;
            if rules[idx].owner.as_deref() != Some(cluster.as_str()) {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("rule {id} is not owned by cluster {cluster}"),
                ));
            }
            Ok(idx)
        };
        // Each change is one write: the lease fence is asked before each, as a cloud
        // provider's calls ask it.
        let removes = |rules: &mut Vec<StoredRule>, report: &mut ApplyReport| -> Result<()> {
            for c in plan.of(Action::Remove) {
                crate::fence::check_write()?;
                let idx = own(rules, &c.id)?;
                rules.remove(idx);
                report.removed += 1;
            }
            Ok(())
        };
        if plan.remove_first {
            removes(&mut rules, &mut report)?;
        }
        // Where every rule needs its own priority (an NSG), one that is held is refused.
        let distinct = limits.priorities.is_some();
        let held = |rules: &[StoredRule], p: Option<u32>, except: Option<usize>| {
            distinct
                && p.is_some()
                && rules
                    .iter()
                    .enumerate()
                    .any(|(i, r)| Some(i) != except && r.priority == p)
        };
        for c in plan.of(Action::Update) {
            crate::fence::check_write()?;
            let idx = own(&rules, &c.id)?;
            let priority = c.priority.or(rules[idx].priority);
            if held(&rules, priority, Some(idx)) {
                return Err(Error::new(ErrorKind::Conflict, "priority already taken")
                    .with_code("SecurityRuleConflict")
                    .into());
            }
            rules[idx].rule = c.rule.clone();
            rules[idx].priority = priority;
            report.updated += 1;
        }
        for c in plan.of(Action::Add) {
            crate::fence::check_write()?;
            if let Some(problem) = limits.check_rule(&c.rule) {
                return Err(Error::new(ErrorKind::Invalid, problem).into());
            }
            // Rules known by their content (EC2) cannot be duplicated; named ones (GCP,
            // Azure) can, under another name.
            let duplicate = match &c.rule.name {
                Some(name) => rules.iter().any(|r| r.rule.name.as_ref() == Some(name)),
                None => rules.iter().any(|r| r.rule.content == c.rule.content),
            };
            if duplicate {
                return Err(Error::new(ErrorKind::Conflict, "rule already exists")
                    .with_code("Duplicate")
                    .into());
            }
            let priority = c.priority.or(limits.own_priority);
            if held(&rules, priority, None) {
                return Err(Error::new(ErrorKind::Conflict, "priority already taken")
                    .with_code("SecurityRuleConflict")
                    .into());
            }
            if let Some(max) = limits.max_rules {
                let fam = c.rule.content.family;
                let used = rules
                    .iter()
                    .filter(|r| !limits.rules_counted_per_family || r.rule.content.family == fam)
                    .count();
                if used >= max {
                    return Err(Error::new(
                        ErrorKind::QuotaExceeded,
                        format!("target holds {used} rules, limit {max}"),
                    )
                    .with_code("RulesLimitExceeded")
                    .into());
                }
            }
            next_id += 1;
            rules.push(StoredRule {
                id: format!("r-{next_id}"),
                owner: Some(cluster.clone()),
                rule: c.rule.clone(),
                priority,
                deny: None,
            });
            report.added += 1;
        }
        if !plan.remove_first {
            removes(&mut rules, &mut report)?;
        }
        state.next_id = next_id;
        state.targets.insert(plan.target.id.clone(), rules);
        Ok(report)
    }

    async fn owned_targets(&self, _config: &Config) -> Result<Vec<Target>> {
        let state = self.lock()?;
        Ok(state
            .targets
            .iter()
            .filter(|(_, rules)| {
                rules
                    .iter()
                    .any(|r| r.owner.as_deref() == Some(self.cluster.as_str()))
            })
            .map(|(id, _)| Target::new(NAME, id))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, Harness};
    use nodeport_firewall_model::{Config, NodeSpec, PoolName};

    struct MemoryHarness {
        provider: MemoryProvider,
        cluster: String,
    }

    #[async_trait]
    impl Harness for MemoryHarness {
        fn provider(&self) -> &dyn Provider {
            &self.provider
        }
        async fn new_instance(&self) -> Box<dyn Provider> {
            Box::new(self.provider.instance())
        }
        async fn fresh_pool(&self, tag: &str) -> conformance::PoolFixture {
            let pool = PoolName::new(format!("pool-{tag}"));
            let mut config = Config::new(&self.cluster);
            config.pools.insert(pool.clone(), Default::default());
            conformance::PoolFixture {
                nodes: vec![
                    NodeSpec::new(&format!("node-{tag}"))
                        .with_label("nodeport-firewall.io/pool", pool.as_str()),
                ],
                pool,
                config,
            }
        }
        async fn seed_foreign(
            &self,
            target: &Target,
            owner: Option<&str>,
            rule: &Rule,
        ) -> Result<()> {
            self.provider
                .seed(&target.id, owner, rule.clone())
                .map(|_| ())
        }

        async fn seed_shadowed_allow(
            &self,
            target: &Target,
            rule: &Rule,
        ) -> Result<Option<String>> {
            let limits = self.provider.limits();
            // The Allow last, the Deny before it, both after where ours go.
            let (deny_at, allow_at) = match (limits.priorities, limits.own_priority) {
                (Some(band), _) => (band.from + 50, band.to),
                (None, Some(own)) => (own + 100, own + 200),
                (None, None) => {
                    self.provider.seed(&target.id, None, rule.clone())?;
                    return Ok(None);
                }
            };
            let foreign = |name: &str| Rule {
                name: Some(name.to_string()),
                services: Default::default(),
                pools: Default::default(),
                ..rule.clone()
            };
            self.provider
                .seed_at(&target.id, foreign("their-allow"), allow_at, None)?;
            let denial = Denial {
                protocol: Some(rule.content.protocol),
                ports: rule.content.ports.clone(),
                sources: Vec::new(),
                scopes: Vec::new(),
            };
            self.provider
                .seed_at(&target.id, foreign("their-deny"), deny_at, Some(denial))?;
            Ok(Some("their-deny".to_string()))
        }
    }

    /// Named rules in a priority band, as on an Azure NSG.
    #[tokio::test]
    async fn memory_provider_passes_conformance_named() {
        let mut config = MemoryConfig::default();
        config.limits.priorities =
            Some(nodeport_firewall_model::PriorityRange { from: 100, to: 300 });
        let h = MemoryHarness {
            provider: MemoryProvider::new("conf", config),
            cluster: "conf".into(),
        };
        conformance::run_all(&h).await;
    }

    /// Named rules at one fixed priority, a Deny winning a tie, as on a GCP network.
    #[tokio::test]
    async fn memory_provider_passes_conformance_gcp_shaped() {
        let mut config = MemoryConfig::default();
        config.limits.own_priority = Some(1000);
        config.limits.deny_wins_ties = true;
        let h = MemoryHarness {
            provider: MemoryProvider::new("conf", config),
            cluster: "conf".into(),
        };
        conformance::run_all(&h).await;
    }

    #[tokio::test]
    async fn memory_provider_passes_conformance_ec2_shaped() {
        let config = MemoryConfig {
            limits: Limits {
                max_rules: Some(60),
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
            },
            named_rules: false,
        };
        let h = MemoryHarness {
            provider: MemoryProvider::new("conf", config),
            cluster: "conf".into(),
        };
        conformance::run_all(&h).await;
    }
}

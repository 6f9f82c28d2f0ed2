//! Reading an NSG: its inbound rules as neutral rules, and the limits left for ours. NSGs
//! cap rules and prefixes per NSG, counting outbound rules and others' rules the planner
//! never sees, and our rules must fit in the free priorities of our band. What a listing
//! saw is remembered per NSG, so that an apply knows each rule's priority and owner.

use std::collections::{BTreeSet, HashMap, HashSet};

use azure_mgmt_network::package_2024_03::models::SecurityRuleDirection;
use nodeport_firewall_model::{Limits, Observation};
use nodeport_firewall_provider::Result;
use tracing::debug;

use crate::wire::plural;
use crate::{AzureProvider, NsgId};

/// What the last observation of an NSG said about one of its inbound rules.
#[derive(Debug, Clone)]
pub(crate) struct SeenRule {
    pub(crate) priority: i32,
    pub(crate) owned: bool,
    /// The hash of a hashed marker, to tell a marker-only change that needs no write.
    pub(crate) marker_hash: Option<String>,
}

/// The last observation of an NSG.
#[derive(Debug, Clone, Default)]
pub(crate) struct SeenNsg {
    pub(crate) rules: HashMap<String, SeenRule>,
    /// Names of every rule, both directions: a PUT under one of them replaces that rule.
    pub(crate) names: HashSet<String>,
    /// Priorities of every inbound rule, ours and others'.
    pub(crate) priorities: BTreeSet<i32>,
}

impl AzureProvider {
    /// Lists an NSG, remembers what it saw, and returns the inbound rules with the limits
    /// that apply to us.
    pub(crate) async fn observe_nsg(&self, nsg: &NsgId) -> Result<(Observation, SeenNsg)> {
        let all = self.list_rules(nsg).await?;
        let band = self.config.priority_band;
        let mut rules = Vec::new();
        let mut seen = SeenNsg::default();
        let mut outbound = 0usize;
        // Source prefixes the planner does not see: outbound rules', and inbound foreign
        // rules' that are not plain prefixes (service tags, `*`).
        let mut hidden_sources = 0usize;
        // Destination prefixes of outbound rules, which the planner does not see.
        let mut hidden_destinations = 0usize;
        let (mut foreign_in_band, mut ours_outside_band) = (0usize, 0usize);
        for r in &all {
            if let Some(name) = &r.name {
                seen.names.insert(name.clone());
            }
            let Some(p) = r.properties.as_ref() else {
                continue;
            };
            let source_count = plural(&p.source_address_prefix, &p.source_address_prefixes).len();
            if p.direction != SecurityRuleDirection::Inbound {
                outbound += 1;
                hidden_sources += source_count;
                hidden_destinations += plural(
                    &p.destination_address_prefix,
                    &p.destination_address_prefixes,
                )
                .len();
                continue;
            }
            let Some((observed, s)) = self.to_observed(r) else {
                continue;
            };
            seen.priorities.insert(s.priority);
            if observed.owned {
                if !band.contains(s.priority) {
                    ours_outside_band += 1;
                }
            } else {
                hidden_sources += source_count.saturating_sub(observed.rule.content.sources.len());
                if band.contains(s.priority) {
                    foreign_in_band += 1;
                }
            }
            if let Some(id) = &observed.id {
                seen.rules.insert(id.clone(), s);
            }
            rules.push(observed);
        }
        let foreign_inbound = rules.iter().filter(|r| !r.owned).count();
        // Our rules may number at most the free slots of the band (plus ours that kept a
        // priority outside it): a full band is a rule quota error in the plan.
        let band_room = band.size().saturating_sub(foreign_in_band) + ours_outside_band;
        let by_quota = self.config.rule_quota.saturating_sub(outbound);
        let max_rules = by_quota.min(foreign_inbound + band_room);
        let max_rules_reason = (foreign_inbound + band_room < by_quota).then(|| {
            format!(
                "the priority band {}-{} has room for {band_room} rules of ours: {foreign_in_band} of its priorities are held by rules of others; widen azure.priorityBand",
                band.from, band.to
            )
        });
        debug!(nsg = %nsg.name, rules = all.len(), outbound, foreign_in_band, band_room, max_rules, "observed NSG");
        if let Ok(mut m) = self.seen.lock() {
            m.insert(nsg.id(), seen.clone());
        }
        let observation = Observation {
            rules,
            limits: Limits {
                max_rules: Some(max_rules),
                rules_counted_per_family: false,
                max_ports_per_rule: self.config.max_port_ranges_per_rule,
                max_sources_per_rule: self.config.max_sources_per_rule,
                max_total_sources: Some(
                    self.config
                        .source_prefix_quota
                        .saturating_sub(hidden_sources),
                ),
                max_total_destinations: Some(
                    self.config
                        .destination_prefix_quota
                        .saturating_sub(hidden_destinations),
                ),
                max_rules_reason,
                updates_in_place: true,
            },
        };
        Ok((observation, seen))
    }

    fn cached_seen(&self, nsg: &NsgId) -> Option<SeenNsg> {
        self.seen.lock().ok()?.get(&nsg.id()).cloned()
    }

    pub(crate) fn forget_seen(&self, nsg: &NsgId) {
        if let Ok(mut m) = self.seen.lock() {
            m.remove(&nsg.id());
        }
    }

    /// The last observation of `nsg`, re-read when it does not know all of `names`.
    pub(crate) async fn seen_rules(&self, nsg: &NsgId, names: &[&str]) -> Result<SeenNsg> {
        if let Some(seen) = self.cached_seen(nsg)
            && names.iter().all(|n| seen.rules.contains_key(*n))
        {
            return Ok(seen);
        }
        Ok(self.observe_nsg(nsg).await?.1)
    }
}

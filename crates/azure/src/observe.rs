//! Reading an NSG: its inbound rules as neutral rules, and the limits left for ours. NSGs
//! cap rules and prefixes per NSG, counting outbound rules and others' rules the planner
//! never sees, and our rules must fit in the free priorities of our band. Every fact an
//! apply needs (each rule's priority and owner, the names of outbound rules) is in the
//! observation; nothing is remembered here.

use std::collections::BTreeSet;

use azure_mgmt_network::package_2024_03::models::SecurityRuleDirection;
use nodeport_firewall_model::{Limits, Observation, PriorityRange};
use nodeport_firewall_provider::Result;
use tracing::debug;

use crate::wire::plural;
use crate::{AzureProvider, NsgId};

impl AzureProvider {
    /// Lists an NSG: its inbound rules with the limits that apply to us.
    pub(crate) async fn observe_nsg(&self, nsg: &NsgId) -> Result<Observation> {
        let all = self.list_rules(nsg).await?;
        let band = self.config.priority_band;
        let mut rules = Vec::new();
        // Names of outbound rules (an inbound rule cannot take one), and priorities of
        // inbound rules the planner does not see.
        let mut reserved_names = BTreeSet::new();
        let mut reserved_priorities = BTreeSet::new();
        let mut outbound = 0usize;
        // Source prefixes the planner does not see: outbound rules', and inbound foreign
        // rules' that are not plain prefixes (service tags, `*`).
        let mut hidden_sources = 0usize;
        // Destination prefixes of outbound rules, which the planner does not see.
        let mut hidden_destinations = 0usize;
        let (mut foreign_in_band, mut ours_outside_band) = (0usize, 0usize);
        for r in &all {
            let Some(p) = r.properties.as_ref() else {
                continue;
            };
            let source_count = plural(&p.source_address_prefix, &p.source_address_prefixes).len();
            if p.direction != SecurityRuleDirection::Inbound {
                reserved_names.extend(r.name.clone());
                outbound += 1;
                hidden_sources += source_count;
                hidden_destinations += plural(
                    &p.destination_address_prefix,
                    &p.destination_address_prefixes,
                )
                .len();
                continue;
            }
            let Some(observed) = self.to_observed(r) else {
                reserved_priorities.extend(u32::try_from(p.priority).ok());
                continue;
            };
            if observed.owned {
                if !band.contains(p.priority) {
                    ours_outside_band += 1;
                }
            } else {
                hidden_sources += source_count.saturating_sub(observed.rule.content.sources.len());
                if band.contains(p.priority) {
                    foreign_in_band += 1;
                }
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
        let observation = Observation {
            rules,
            reserved_names,
            reserved_priorities,
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
                priorities: Some(PriorityRange {
                    from: u32::try_from(band.from).unwrap_or(0),
                    to: u32::try_from(band.to).unwrap_or(0),
                }),
                own_priority: None,
                deny_wins_ties: false,
            },
        };
        Ok(observation)
    }
}

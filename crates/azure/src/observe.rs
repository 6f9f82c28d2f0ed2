//! Reading an NSG: its inbound rules as neutral rules, and the limits left for ours. NSGs
//! cap rules and prefixes per NSG, counting outbound rules and others' rules the planner
//! never sees, and our rules must fit in the free priorities of our band. Every fact an
//! apply needs (each rule's priority and owner, the names of outbound rules) is in the
//! observation; nothing is remembered here.

use std::collections::BTreeSet;

use azure_mgmt_network::package_2024_03::models::{SecurityRule, SecurityRuleDirection};
use nodeport_firewall_model::{Limits, Observation, PriorityRange};
use nodeport_firewall_provider::Result;
use tracing::debug;

use crate::wire::{OurWrites, observed_rule, plural};
use crate::{AzureConfig, AzureProvider, NsgId};

impl AzureProvider {
    /// Lists an NSG: its inbound rules with the limits that apply to us.
    pub(crate) async fn observe_nsg(&self, nsg: &NsgId) -> Result<Observation> {
        let all = self.list_rules(nsg).await?;
        // Taken after the read: a write of ours that ended before it cannot have left a
        // rule `Updating` (it waited for its operation), one running now may have.
        let writes = if self.writing(&nsg.id()) {
            OurWrites::InFlight
        } else {
            OurWrites::Idle
        };
        let observation = observation(&self.cluster, &self.config, &all, writes);
        debug!(nsg = %nsg.name, rules = all.len(), max_rules = ?observation.limits.max_rules, "observed NSG");
        Ok(observation)
    }
}

/// The observation of an NSG whose rules (both directions) are `all`.
pub(crate) fn observation(
    cluster: &str,
    config: &AzureConfig,
    all: &[SecurityRule],
    writes: OurWrites,
) -> Observation {
    let band = config.priority_band;
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
    for r in all {
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
        let Some(observed) = observed_rule(cluster, r, writes) else {
            // Not seen by the planner (no name): its priority and prefixes are taken.
            reserved_priorities.extend(u32::try_from(p.priority).ok());
            hidden_sources += source_count;
            hidden_destinations += plural(
                &p.destination_address_prefix,
                &p.destination_address_prefixes,
            )
            .len();
            continue;
        };
        if observed.owned {
            if !band.contains(p.priority) {
                ours_outside_band += 1;
            }
        } else {
            // A Deny (and any rule not mappable to ours) keeps no sources in the rule
            // the planner counts: all of its prefixes are hidden.
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
    let by_quota = config.rule_quota.saturating_sub(outbound);
    let max_rules = by_quota.min(foreign_inbound + band_room);
    let max_rules_reason = (foreign_inbound + band_room < by_quota).then(|| {
            format!(
                "the priority band {}-{} has room for {band_room} rules of ours: {foreign_in_band} of its priorities are held by rules of others; widen azure.priorityBand",
                band.from, band.to
            )
        });
    debug!(
        outbound,
        foreign_in_band, band_room, max_rules, "NSG limits"
    );
    Observation {
        rules,
        reserved_names,
        reserved_priorities,
        warnings: Vec::new(),
        limits: Limits {
            max_rules: Some(max_rules),
            rules_counted_per_family: false,
            max_ports_per_rule: config.max_port_ranges_per_rule,
            max_sources_per_rule: config.max_sources_per_rule,
            max_total_sources: Some(config.source_prefix_quota.saturating_sub(hidden_sources)),
            max_total_destinations: Some(
                config
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
            // Priorities are unique per direction: a Deny and an Allow never tie.
            deny_wins_ties: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PriorityBand;
    use serde_json::{Value, json};

    fn rule(name: Option<&str>, properties: Value) -> SecurityRule {
        let mut v = json!({"properties": properties});
        if let Some(n) = name {
            v["name"] = json!(n);
        }
        serde_json::from_value(v).unwrap()
    }

    fn allow(priority: i32, sources: &[&str], description: &str) -> Value {
        json!({"protocol": "Tcp", "sourcePortRange": "*", "sourceAddressPrefixes": sources,
               "destinationAddressPrefix": "10.240.0.4", "destinationPortRange": "30080",
               "access": "Allow", "priority": priority, "direction": "Inbound",
               "description": description})
    }

    #[test]
    fn denies_are_rules_and_limits_count_them_as_before() {
        let ours = crate::marker::description(
            "c1",
            &[nodeport_firewall_model::PoolName::new("np1")]
                .into_iter()
                .collect(),
            &Default::default(),
        );
        let mut deny = allow(
            3005,
            &["192.0.2.0/24", "VirtualNetwork", "198.51.100.1"],
            "",
        );
        deny["access"] = json!("Deny");
        let mut outbound = allow(3006, &["10.0.0.0/8", "10.1.0.0/16"], "");
        outbound["direction"] = json!("Outbound");
        outbound["destinationAddressPrefixes"] = json!(["203.0.113.1", "203.0.113.2"]);
        outbound
            .as_object_mut()
            .unwrap()
            .remove("destinationAddressPrefix");
        let all = vec![
            rule(Some("ours"), allow(3000, &["10.0.0.0/8"], &ours)),
            // Ours outside the band (an older band).
            rule(Some("ours-old"), allow(2000, &["10.2.0.0/16"], &ours)),
            rule(
                Some("theirs"),
                allow(3001, &["10.3.0.0/16", "Internet"], "ops"),
            ),
            rule(Some("deny-some"), deny),
            rule(Some("egress"), outbound),
            rule(None, allow(3007, &["10.9.0.0/16"], "")),
        ];
        let config = AzureConfig {
            priority_band: PriorityBand {
                from: 3000,
                to: 3009,
            },
            rule_quota: 100,
            source_prefix_quota: 50,
            destination_prefix_quota: 40,
            ..AzureConfig::default()
        };
        let o = observation("c1", &config, &all, OurWrites::Idle);
        let names: Vec<&str> = o
            .rules
            .iter()
            .filter_map(|r| r.rule.name.as_deref())
            .collect();
        assert_eq!(names, vec!["ours", "ours-old", "theirs", "deny-some"]);
        let deny = &o.rules[3];
        assert!(!deny.owned);
        assert_eq!(deny.priority, Some(3005));
        let denial = deny.deny.as_ref().expect("a Denial");
        assert!(denial.sources.is_empty(), "a service tag: every source");
        assert!(deny.rule.content.sources.is_empty());
        assert_eq!(o.reserved_names, BTreeSet::from(["egress".to_string()]));
        assert_eq!(o.reserved_priorities, BTreeSet::from([3007]));
        let l = &o.limits;
        // Band 3000-3009: 10 slots, 2 foreign (theirs, the Deny) in it, one of ours kept
        // outside: room for 9 of ours; plus the 2 foreign inbound rules = 11.
        assert_eq!(l.max_rules, Some(11));
        assert!(
            l.max_rules_reason
                .as_deref()
                .unwrap()
                .contains("room for 9")
        );
        // Hidden sources: both of theirs (a service tag makes it no plain rule), all 3 of
        // the Deny's, 2 outbound, 1 of the nameless rule.
        assert_eq!(l.max_total_sources, Some(50 - 8));
        // Hidden destinations: the outbound rule's 2, the nameless rule's 1.
        assert_eq!(l.max_total_destinations, Some(40 - 3));
        assert!(!l.deny_wins_ties);
        assert_eq!(
            l.priorities,
            Some(PriorityRange {
                from: 3000,
                to: 3009
            })
        );
    }
}

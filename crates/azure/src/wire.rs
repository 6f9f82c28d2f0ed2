//! Between ARM's security rules and the neutral model: the NSG resource id a target names,
//! reading an ARM rule back as an [`ObservedRule`] (with its ownership marker), and the ARM
//! body written for one of our [`Rule`]s. No calls are made here.

use azure_mgmt_network::package_2024_03::models::{
    self as arm, ApplicationSecurityGroup, ProvisioningState, SecurityRuleAccess,
    SecurityRuleDirection, SecurityRulePropertiesFormat,
    security_rule_properties_format::Protocol as ArmProtocol,
};
use ipnet::IpNet;
use nodeport_firewall_model::{
    Denial, IpFamily, MarkerDigest, ObservedRule, PortRange, Protocol, Rule, RuleContent,
};
use nodeport_firewall_provider::Result;

use crate::invalid;
use crate::marker::{self, Destination, Marker};

/// A network security group's resource id, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NsgId {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
}

impl NsgId {
    /// Parses `/subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Network/networkSecurityGroups/<n>`
    /// (segment names case-insensitive, as ARM treats them).
    pub fn parse(id: &str) -> std::result::Result<NsgId, String> {
        let parts: Vec<&str> = id.trim_matches('/').split('/').collect();
        let ok = parts.len() == 8
            && parts[0].eq_ignore_ascii_case("subscriptions")
            && parts[2].eq_ignore_ascii_case("resourceGroups")
            && parts[4].eq_ignore_ascii_case("providers")
            && parts[5].eq_ignore_ascii_case("Microsoft.Network")
            && parts[6].eq_ignore_ascii_case("networkSecurityGroups")
            && [1, 3, 7].iter().all(|i| !parts[*i].is_empty());
        if !ok {
            return Err(format!(
                "{id:?} is not an NSG resource id (/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Network/networkSecurityGroups/<name>)"
            ));
        }
        Ok(NsgId {
            subscription: parts[1].to_string(),
            resource_group: parts[3].to_string(),
            name: parts[7].to_string(),
        })
    }

    /// The canonical id: one spelling, so that pools naming the same NSG share a target.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkSecurityGroups/{}",
            self.subscription.to_ascii_lowercase(),
            self.resource_group.to_ascii_lowercase(),
            self.name.to_ascii_lowercase()
        )
    }
}

/// Whether a write of ours may be running on the rule being read: a rule of ours seen
/// `Updating` is then our own write in progress, not a stuck one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OurWrites {
    /// An apply of ours holds the NSG's writer now.
    InFlight,
    /// None: our writes wait for their operation to end (or time out, after
    /// `azure.operationTimeoutSeconds`), so an `Updating` rule of ours has outlived ours.
    Idle,
}

/// Maps one ARM rule to a neutral rule. A rule that cannot be expressed as ours (deny,
/// other protocols, service tags, port `*`) is never ours; it keeps no sources, so it
/// never stands in for one of ours. A Deny carries what it may match in
/// [`ObservedRule::deny`]. `None` only for a rule without a name or properties.
pub(crate) fn observed_rule(
    cluster: &str,
    r: &arm::SecurityRule,
    writes: OurWrites,
) -> Option<ObservedRule> {
    let name = r.name.clone()?;
    let p = r.properties.as_ref()?;
    let marker = marker::parse(cluster, p.description.as_deref());
    let protocol = match p.protocol {
        ArmProtocol::Tcp => Some(Protocol::Tcp),
        ArmProtocol::Udp => Some(Protocol::Udp),
        _ => None,
    };
    let sources_text = plural(&p.source_address_prefix, &p.source_address_prefixes);
    let sources: Option<Vec<IpNet>> = sources_text
        .iter()
        .map(|s| marker::parse_prefix(s))
        .collect();
    let ports_text = plural(&p.destination_port_range, &p.destination_port_ranges);
    let ports: Option<Vec<PortRange>> = ports_text.iter().map(|s| s.parse().ok()).collect();
    let dst_text = plural(
        &p.destination_address_prefix,
        &p.destination_address_prefixes,
    );
    let destination = match (
        dst_text.as_slice(),
        p.destination_application_security_groups.as_slice(),
    ) {
        ([], [asg]) => asg.resource.id.clone().map(Destination::Asg),
        (d, []) if !d.is_empty() => d
            .iter()
            .map(|s| marker::parse_prefix(s))
            .collect::<Option<Vec<_>>>()
            .map(Destination::Prefixes),
        _ => None,
    };
    let source_port_any = plural(&p.source_port_range, &p.source_port_ranges)
        .iter()
        .all(|s| s == "*");
    let family = sources
        .as_ref()
        .and_then(|s| s.first())
        .map_or(IpFamily::V4, IpFamily::of);
    let deny = denial(p, sources.as_deref(), ports.as_deref());
    // A foreign Allow whose last operation failed may not be in force as written: it
    // satisfies nothing (ours then opens the port). Ours in that state is rewritten.
    let failed = p.provisioning_state == Some(ProvisioningState::Failed);
    let mappable = p.access == SecurityRuleAccess::Allow
        && deny.is_none()
        && source_port_any
        && protocol.is_some()
        && p.source_application_security_groups.is_empty()
        && sources
            .as_ref()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|n| IpFamily::of(n) == family))
        && ports.as_ref().is_some_and(|p| !p.is_empty())
        && destination.is_some();
    // A hashed marker names no Services (and maybe no pools): the planner knows them
    // by the hash.
    let (owned, pools, services, digest) = match (&marker, mappable) {
        (Marker::Inline { pools, services }, true) => (true, pools.clone(), services.clone(), None),
        (Marker::Hashed { pools, hash }, true) => (
            true,
            pools.clone().unwrap_or_default(),
            Default::default(),
            Some(MarkerDigest {
                value: hash.clone(),
                pools_listed: pools.is_some(),
            }),
        ),
        _ => (false, Default::default(), Default::default(), None),
    };
    let mut ports = ports.unwrap_or_default();
    ports.sort();
    let mut sources = if mappable && (owned || !failed) {
        sources.unwrap_or_default()
    } else {
        Vec::new()
    };
    sources.sort();
    let needs_rewrite = if owned {
        rewrite_reason(p.provisioning_state.as_ref(), writes)
    } else {
        None
    };
    let rule = Rule {
        name: Some(name.clone()),
        content: RuleContent {
            scope: Some(match &destination {
                Some(d) => d.scope(),
                None => format!("other:{}", dst_text.join(",")),
            }),
            family,
            protocol: protocol.unwrap_or(Protocol::Tcp),
            ports,
            sources,
        },
        services,
        pools,
    };
    Some(ObservedRule {
        priority: u32::try_from(p.priority).ok(),
        digest,
        deny,
        needs_rewrite,
        ..ObservedRule::new(Some(name), rule, owned)
    })
}

/// Why a rule of ours must be written again although its content is as wanted: ARM says
/// its last operation failed (it may not be in force as written), or it is `Updating`
/// while no write of ours is running, so past our operation timeout. A PUT of the same
/// rule restores it.
fn rewrite_reason(state: Option<&ProvisioningState>, writes: OurWrites) -> Option<String> {
    match (state, writes) {
        (Some(ProvisioningState::Failed), _) => Some(
            "ARM reports provisioningState Failed: its last operation failed; it is written again"
                .to_string(),
        ),
        (Some(ProvisioningState::Updating), OurWrites::Idle) => Some(
            "ARM reports provisioningState Updating with no write of ours running (past azure.operationTimeoutSeconds); it is written again"
                .to_string(),
        ),
        _ => None,
    }
}

/// What a rule that is not a plain Allow may block, never narrower than the rule: `None`
/// for an Allow. Every access but `Allow` is taken as a Deny (an unknown value fails
/// closed).
///
/// - Protocol `*` or one unknown to this client: every protocol. ICMP, ESP and AH rules
///   match none of the protocols a rule of ours opens (TCP, UDP), so such a Deny is left
///   out: it cannot shadow anything, and calling it "every protocol" would make every
///   Allow behind it look shadowed.
/// - Ports: `*`, or any range that does not parse, is every port. Source ports are
///   ignored (a Deny limited to some source ports is taken as blocking all).
/// - Sources: every source when one is `*`, a service tag (`VirtualNetwork`, `Internet`,
///   `AzureLoadBalancer`, ...), anything else that is not a prefix, when there are none,
///   or when the rule names source application security groups.
/// - Scopes: always the whole NSG. A Denial scope matches a pool's scope only when the
///   strings are equal, but an ARM destination (prefixes, `*`, a service tag, an ASG) that
///   merely overlaps a pool's destination (one node IP of it, the VNet around a subnet, an
///   ASG some of its NICs carry) blocks part of that pool's traffic too, and the pools'
///   destinations are not known when an NSG is read. Only "whole NSG" is never narrower.
fn denial(
    p: &SecurityRulePropertiesFormat,
    sources: Option<&[IpNet]>,
    ports: Option<&[PortRange]>,
) -> Option<Denial> {
    if p.access == SecurityRuleAccess::Allow {
        return None;
    }
    let protocol = match &p.protocol {
        ArmProtocol::Tcp => Some(Protocol::Tcp),
        ArmProtocol::Udp => Some(Protocol::Udp),
        ArmProtocol::Icmp | ArmProtocol::Esp | ArmProtocol::Ah => return None,
        ArmProtocol::U2a | ArmProtocol::UnknownValue(_) => None,
    };
    let mut ports = ports.map(<[PortRange]>::to_vec).unwrap_or_default();
    ports.sort();
    let mut sources = match sources {
        Some(s) if p.source_application_security_groups.is_empty() => s.to_vec(),
        _ => Vec::new(),
    };
    sources.sort();
    Some(Denial {
        protocol,
        ports,
        sources,
        scopes: Vec::new(),
    })
}

/// The prefixes or port ranges of a rule: ARM returns one in the singular field, several
/// in the plural one.
pub(crate) fn plural(one: &Option<String>, many: &[String]) -> Vec<String> {
    if !many.is_empty() {
        return many.to_vec();
    }
    one.iter().filter(|s| !s.is_empty()).cloned().collect()
}

/// The ARM body of one of our rules.
pub(crate) fn security_rule(
    cluster: &str,
    rule: &Rule,
    priority: i32,
) -> Result<arm::SecurityRule> {
    let c = &rule.content;
    let protocol = match c.protocol {
        Protocol::Tcp => ArmProtocol::Tcp,
        Protocol::Udp => ArmProtocol::Udp,
        Protocol::Sctp => return Err(invalid("NSG rules cannot allow SCTP")),
    };
    if c.sources.is_empty() || c.ports.is_empty() {
        return Err(invalid("a rule without sources or ports"));
    }
    if c.sources.iter().any(|s| IpFamily::of(s) != c.family) {
        return Err(invalid("a rule mixing IPv4 and IPv6 sources"));
    }
    let destination = c
        .scope
        .as_deref()
        .and_then(Destination::parse)
        .ok_or_else(|| invalid(format!("rule without a destination: {:?}", c.scope)))?;
    let mut p = SecurityRulePropertiesFormat::new(
        protocol,
        SecurityRuleAccess::Allow,
        priority,
        SecurityRuleDirection::Inbound,
    );
    p.description = Some(marker::description(cluster, &rule.pools, &rule.services));
    p.source_port_range = Some("*".to_string());
    let ports: Vec<String> = c.ports.iter().map(|r| r.to_string()).collect();
    match ports.as_slice() {
        [one] => p.destination_port_range = Some(one.clone()),
        _ => p.destination_port_ranges = ports,
    }
    let sources: Vec<String> = c.sources.iter().map(|s| s.trunc().to_string()).collect();
    match sources.as_slice() {
        [one] => p.source_address_prefix = Some(one.clone()),
        _ => p.source_address_prefixes = sources,
    }
    match destination {
        Destination::Prefixes(d) => {
            if d.iter().any(|n| IpFamily::of(n) != c.family) {
                return Err(invalid("a rule whose destination is of another IP family"));
            }
            let d: Vec<String> = d.iter().map(ToString::to_string).collect();
            match d.as_slice() {
                [one] => p.destination_address_prefix = Some(one.clone()),
                _ => p.destination_address_prefixes = d,
            }
        }
        Destination::Asg(id) => {
            let mut asg = ApplicationSecurityGroup::new();
            asg.resource.id = Some(id);
            p.destination_application_security_groups = vec![asg];
        }
    }
    let mut r = arm::SecurityRule::new();
    r.properties = Some(p);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsg_ids() {
        let id = "/subscriptions/S1/resourceGroups/MC_rg/providers/Microsoft.Network/networkSecurityGroups/aks-agentpool-1-nsg";
        let n = NsgId::parse(id).unwrap();
        assert_eq!(n.resource_group, "MC_rg");
        assert_eq!(n.name, "aks-agentpool-1-nsg");
        assert_eq!(NsgId::parse(&n.id()).unwrap().id(), n.id());
        assert_eq!(NsgId::parse(&id.to_uppercase()).unwrap().id(), n.id());
        for bad in [
            "",
            "nsg",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v",
            "/subscriptions//resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/n",
        ] {
            assert!(NsgId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bodies_use_singular_fields_for_one_value() {
        let rule = Rule {
            name: Some("npf-c-p-1".into()),
            content: RuleContent {
                scope: Some("dst:10.0.0.4/32".into()),
                family: IpFamily::V4,
                protocol: Protocol::Tcp,
                ports: vec![
                    PortRange::single(30100),
                    PortRange {
                        from: 30200,
                        to: 30201,
                    },
                ],
                sources: vec!["10.0.0.0/8".parse().unwrap()],
            },
            services: Default::default(),
            pools: Default::default(),
        };
        let body = security_rule("c", &rule, 3000).unwrap();
        let p = body.properties.unwrap();
        assert_eq!(p.priority, 3000);
        assert_eq!(p.destination_port_ranges, vec!["30100", "30200-30201"]);
        assert_eq!(p.source_address_prefix.as_deref(), Some("10.0.0.0/8"));
        assert_eq!(p.destination_address_prefix.as_deref(), Some("10.0.0.4/32"));
        let mut v6 = rule.clone();
        v6.content.family = IpFamily::V6;
        v6.content.sources = vec!["2001:db8::/32".parse().unwrap()];
        assert!(
            security_rule("c", &v6, 3000).is_err(),
            "v6 sources with a v4 destination"
        );
    }
}

//! Between Compute's firewall rules and the neutral model: the target id `project/network`,
//! reading a Compute rule back as an [`ObservedRule`] (with its ownership marker), and the
//! [`Firewall`] body written for a neutral [`Rule`]. No calls are made here.

use google_cloud_compute_v1::model::{Firewall, firewall};
use ipnet::IpNet;
use nodeport_firewall_model::{
    IpFamily, MarkerDigest, ObservedRule, PortRange, Protocol, Rule, RuleContent, Target,
};
use nodeport_firewall_provider::Result;

use crate::{GcpProvider, Scope, deny, invalid, marker};

/// The URL prefix of Compute resources in self links, whatever endpoint the client uses.
const RESOURCE_URL: &str = "https://www.googleapis.com/compute/v1/";

impl GcpProvider {
    /// The project and network of a target id `project/network`.
    pub(crate) fn split_target(target: &Target) -> Result<(&str, &str)> {
        target
            .id
            .split_once('/')
            .filter(|(p, n)| !p.is_empty() && !n.is_empty())
            .ok_or_else(|| invalid(format!("{target} is not a GCP target (project/network)")))
    }

    pub(crate) fn network_url(project: &str, network: &str) -> String {
        format!("{RESOURCE_URL}projects/{project}/global/networks/{network}")
    }

    /// Maps one Compute firewall rule to a neutral rule ([`observe`]).
    pub(crate) fn to_observed(&self, fw: &Firewall) -> Option<ObservedRule> {
        observe(&self.cluster, self.own_priority(), fw)
    }

    /// The priority every rule of ours is written at: `gcp.priority`, checked to be
    /// within 0-65535 when the provider is built.
    pub(crate) fn own_priority(&self) -> u32 {
        u32::try_from(self.config.priority).unwrap_or(DEFAULT_PRIORITY)
    }

    /// The firewall body of one neutral rule; `with_network`: the fields only an insert
    /// sets (name, network, direction).
    pub(crate) fn body(
        &self,
        target: &Target,
        rule: &Rule,
        with_network: bool,
    ) -> Result<Firewall> {
        let (project, network) = Self::split_target(target)?;
        let name = rule
            .name
            .clone()
            .ok_or_else(|| invalid("a GCP rule needs a name"))?;
        let scope = rule
            .content
            .scope
            .as_deref()
            .and_then(Scope::decode)
            .ok_or_else(|| {
                // Never write a rule without targets: it would apply to every instance.
                invalid(format!(
                    "rule {name} has no target tags or service account; refusing to write it"
                ))
            })?;
        if rule.content.sources.is_empty() || rule.content.ports.is_empty() {
            return Err(invalid(format!("rule {name} has no sources or no ports")));
        }
        let mut fw = Firewall::new()
            .set_allowed([firewall::Allowed::new()
                .set_ip_protocol(rule.content.protocol.as_str())
                .set_ports(rule.content.ports.iter().map(ToString::to_string))])
            .set_source_ranges(rule.content.sources.iter().map(ToString::to_string))
            .set_description(self.description(rule));
        // The targets and priority go into patches too: a rule of ours whose tags were
        // edited by hand is put back, not patched forever without converging.
        fw = fw.set_priority(self.config.priority);
        fw = match scope {
            Scope::Tags(tags) => fw.set_target_tags(tags),
            Scope::ServiceAccount(sa) => fw.set_target_service_accounts([sa]),
        };
        if with_network {
            fw = fw
                .set_name(name)
                .set_network(Self::network_url(project, network))
                .set_direction(firewall::Direction::Ingress);
        }
        Ok(fw)
    }

    /// The marker of a rule. A Service list cut to fit carries its digest, which the
    /// planner recognises by rendering (`GcpRenderer::marker_digest`).
    pub(crate) fn description(&self, rule: &Rule) -> String {
        marker::description(&self.cluster, &rule.pools, &rule.services)
    }
}

/// The priority Compute gives a rule that sets none.
pub(crate) const DEFAULT_PRIORITY: u32 = 1000;

/// A rule's priority: its `priority`, 1000 when absent, within 0-65535.
fn priority_of(fw: &Firewall) -> u32 {
    fw.priority.map_or(DEFAULT_PRIORITY, |p| {
        u32::try_from(p.clamp(0, 65535)).unwrap_or(0)
    })
}

/// Maps one Compute firewall rule of a network to a neutral rule, for `cluster` whose
/// rules are written at `own_priority`. A rule that is not a single-protocol ingress allow
/// from source ranges to tags or a service account is never ours; it is kept, with no
/// sources, for the budget count, and an enforced ingress Deny carries what it may block
/// ([`deny::denial_of`]). Every rule carries its priority. No input panics.
pub(crate) fn observe(cluster: &str, own_priority: u32, fw: &Firewall) -> Option<ObservedRule> {
    let name = fw.name.clone()?;
    let priority = priority_of(fw);
    let denial = deny::denial_of(fw);
    let parsed = marker::parse(cluster, &name, fw.description.as_deref());
    let (protocol, ports) = match fw.allowed.as_slice() {
        [one] => (
            one.ip_protocol.as_deref().and_then(parse_protocol),
            parse_ports(&one.ports),
        ),
        _ => (None, None),
    };
    let mut sources: Vec<IpNet> = fw
        .source_ranges
        .iter()
        .filter_map(|s| s.parse::<IpNet>().ok().map(|n| n.trunc()))
        .collect();
    sources.sort();
    sources.dedup();
    let family = sources.first().map_or(IpFamily::V4, IpFamily::of);
    let scope = Scope::of(&fw.target_tags, &fw.target_service_accounts);
    let mappable = deny::enforced_on_ingress(fw)
        && fw.denied.is_empty()
        && protocol.is_some()
        && ports.is_some()
        && !sources.is_empty()
        && sources.len() == fw.source_ranges.len()
        && sources.iter().all(|s| IpFamily::of(s) == family)
        && fw.source_tags.is_empty()
        && fw.source_service_accounts.is_empty()
        && fw.destination_ranges.is_empty()
        && scope.is_some();
    let owned = parsed.owned && mappable;
    let rule = Rule {
        name: Some(name.clone()),
        content: RuleContent {
            scope: scope.map(|s| s.encode()),
            family,
            protocol: protocol.unwrap_or(Protocol::Tcp),
            ports: ports.unwrap_or_default(),
            // A Deny never holds sources here, so it never satisfies a wanted rule.
            sources: if mappable { sources } else { Vec::new() },
        },
        services: if owned {
            parsed.services
        } else {
            Default::default()
        },
        pools: if owned {
            parsed.pools
        } else {
            Default::default()
        },
    };
    // A cut Service list is known by its digest: the planner compares it with the
    // digest of the rule it wants.
    let digest = parsed
        .services_digest
        .filter(|_| owned)
        .map(|value| MarkerDigest {
            value,
            pools_listed: true,
        });
    // A rule of ours moved to another priority by hand (or written before gcp.priority
    // changed) may now sit behind a Deny: the plan patches it back to ours.
    let needs_rewrite = (owned && priority != own_priority)
        .then(|| format!("its priority is {priority}, not gcp.priority {own_priority}"));
    Some(ObservedRule {
        digest,
        priority: Some(priority),
        deny: denial,
        needs_rewrite,
        ..ObservedRule::new(Some(name), rule, owned)
    })
}

fn parse_protocol(p: &str) -> Option<Protocol> {
    match p.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Some(Protocol::Tcp),
        "udp" | "17" => Some(Protocol::Udp),
        "sctp" | "132" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// `["80", "30000-30010"]`, sorted; no ports means every port.
fn parse_ports(ports: &[String]) -> Option<Vec<PortRange>> {
    if ports.is_empty() {
        return Some(vec![PortRange {
            from: 0,
            to: u16::MAX,
        }]);
    }
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        out.push(p.parse().ok()?);
    }
    out.sort();
    out.dedup();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_and_sort() {
        let p = |v: &[&str]| parse_ports(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            p(&["30090-30091", "30080"]),
            Some(vec![
                PortRange::single(30080),
                PortRange {
                    from: 30090,
                    to: 30091
                }
            ])
        );
        assert_eq!(p(&[]), Some(vec![PortRange { from: 0, to: 65535 }]));
        assert_eq!(p(&["x"]), None);
        assert_eq!(p(&["20-10"]), None);
        assert_eq!(parse_protocol("TCP"), Some(Protocol::Tcp));
        assert_eq!(parse_protocol("17"), Some(Protocol::Udp));
        assert_eq!(parse_protocol("icmp"), None);
    }

    fn ours(name: &str) -> Firewall {
        let pools = [nodeport_firewall_model::PoolName::new("web")].into();
        Firewall::new()
            .set_name(name)
            .set_allowed([firewall::Allowed::new()
                .set_ip_protocol("tcp")
                .set_ports(["30080"])])
            .set_source_ranges(["10.0.0.0/8"])
            .set_target_tags(["web"])
            .set_description(marker::description("c1", &pools, &Default::default()))
    }

    #[test]
    fn every_rule_carries_its_priority_and_denies_are_never_ours() {
        let o = |fw: &Firewall| observe("c1", 1000, fw).unwrap();
        let mine = o(&ours("npf-c1-web-0123456789"));
        assert!(mine.owned);
        assert_eq!(mine.priority, Some(1000), "absent: Compute's default");
        assert_eq!(mine.deny, None);
        assert_eq!(mine.needs_rewrite, None);
        let moved = o(&ours("npf-c1-web-0123456789").set_priority(1200));
        assert!(moved.owned);
        assert_eq!(moved.priority, Some(1200));
        assert!(
            moved
                .needs_rewrite
                .as_deref()
                .is_some_and(|r| r.contains("1200")),
            "a rule of ours moved behind others is put back: {moved:?}"
        );
        let foreign = o(&ours("allow-web").set_priority(10));
        assert!(!foreign.owned);
        assert_eq!((foreign.priority, foreign.needs_rewrite), (Some(10), None));
        // Our marker on a Deny does not make it ours; it holds no sources.
        let deny = ours("npf-c1-web-0123456789")
            .set_allowed(Vec::<firewall::Allowed>::new())
            .set_denied([firewall::Denied::new()
                .set_ip_protocol("tcp")
                .set_ports(["30080"])])
            .set_priority(900);
        let d = o(&deny);
        assert!(!d.owned);
        assert!(d.rule.content.sources.is_empty());
        assert_eq!(d.priority, Some(900));
        assert_eq!(
            d.deny,
            Some(nodeport_firewall_model::Denial {
                protocol: Some(Protocol::Tcp),
                ports: vec![PortRange::single(30080)],
                sources: vec!["10.0.0.0/8".parse().unwrap()],
                scopes: vec![],
            })
        );
        assert_eq!(o(&deny.clone().set_disabled(true)).deny, None);
        // Out-of-range priorities from a broken answer are clamped, not a panic.
        assert_eq!(o(&ours("x").set_priority(-5)).priority, Some(0));
        assert_eq!(o(&ours("x").set_priority(i32::MAX)).priority, Some(65535));
        assert_eq!(observe("c1", 1000, &Firewall::new()), None, "no name");
    }
}

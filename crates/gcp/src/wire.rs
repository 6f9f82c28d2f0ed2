//! Between Compute's firewall rules and the neutral model: the target id `project/network`,
//! reading a Compute rule back as an [`ObservedRule`] (with its ownership marker), and the
//! [`Firewall`] body written for a neutral [`Rule`]. No calls are made here.

use google_cloud_compute_v1::model::{Firewall, firewall};
use ipnet::IpNet;
use nodeport_firewall_model::{
    IpFamily, MarkerDigest, ObservedRule, PortRange, Protocol, Rule, RuleContent, Target,
};
use nodeport_firewall_provider::Result;

use crate::{GcpProvider, Scope, invalid, marker};

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

    /// Maps one Compute firewall rule to a neutral rule. A rule that is not a single-protocol
    /// ingress allow from source ranges to tags or a service account is never ours; it is
    /// kept, with no sources, for the budget count.
    pub(crate) fn to_observed(&self, fw: &Firewall) -> Option<ObservedRule> {
        let name = fw.name.clone()?;
        let parsed = marker::parse(&self.cluster, &name, fw.description.as_deref());
        let ingress = fw
            .direction
            .as_ref()
            .is_none_or(|d| *d == firewall::Direction::Ingress);
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
        let mappable = ingress
            && fw.disabled != Some(true)
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
        Some(ObservedRule {
            digest,
            ..ObservedRule::new(Some(name), rule, owned)
        })
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
}

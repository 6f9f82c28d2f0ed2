//! Provider-neutral rules and the limits a target imposes on them.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::net::IpFamily;
use crate::set::{PoolSet, ServiceSet};

/// A transport protocol a Service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!(
                "unsupported protocol {s:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }
}

/// An inclusive range of ports. A single port has `from == to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub from: u16,
    pub to: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange {
            from: port,
            to: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.from <= port && port <= self.to
    }

    pub fn len(&self) -> u32 {
        u32::from(self.to) - u32::from(self.from) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// `30080` or `30080-30090`, as clouds write port ranges; `from <= to`.
impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (from, to) = s.split_once('-').unwrap_or((s, s));
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{s:?} is not a port or port range"))
        };
        let range = PortRange {
            from: port(from)?,
            to: port(to)?,
        };
        if range.from > range.to {
            return Err(format!("{s:?}: the range ends before it starts"));
        }
        Ok(range)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from == self.to {
            write!(f, "{}", self.from)
        } else {
            write!(f, "{}-{}", self.from, self.to)
        }
    }
}

/// What a rule lets through: the part that decides whether two rules are the same rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleContent {
    /// Where inside the target the rule applies (a GCP target tag, an Azure destination).
    /// `None` when the target itself is the scope (an AWS security group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub family: IpFamily,
    pub protocol: Protocol,
    pub ports: Vec<PortRange>,
    pub sources: Vec<IpNet>,
}

/// A provider-neutral firewall rule: content plus the ownership metadata written with it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// The native name, for providers whose rules have names (GCP, Azure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub content: RuleContent,
    /// The Services this rule serves, as recorded in its ownership marker.
    #[serde(default)]
    pub services: ServiceSet,
    /// The node pools this rule serves.
    #[serde(default)]
    pub pools: PoolSet,
}

impl Rule {
    /// Whether this rule covers `port` of `protocol` from `source`.
    pub fn covers(&self, protocol: Protocol, port: u16, source: &IpNet) -> bool {
        self.content.protocol == protocol
            && self.content.ports.iter().any(|r| r.contains(port))
            && self.content.sources.iter().any(|s| s.contains(source))
    }

    /// Human-readable ports, e.g. `30080,30090-30091`.
    pub fn ports_text(&self) -> String {
        join(&self.content.ports)
    }

    /// Human-readable sources.
    pub fn sources_text(&self) -> String {
        join(&self.content.sources)
    }

    /// Human-readable Services.
    pub fn services_text(&self) -> String {
        join(&self.services)
    }
}

pub(crate) fn join<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item.to_string());
    }
    out
}

/// The limits a target imposes. Providers fill these from the cloud's documented quotas and
/// the operator config; the planner refuses a plan that breaks one before any API call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Rules allowed on the target, counting rules of others already there. `None`: no quota.
    pub max_rules: Option<usize>,
    /// EC2 counts IPv4 and IPv6 rules against separate quotas of `max_rules` each.
    pub rules_counted_per_family: bool,
    /// Port ranges one rule may hold (EC2: 1).
    pub max_ports_per_rule: usize,
    /// Source ranges one rule may hold (EC2: 1).
    pub max_sources_per_rule: usize,
    /// Source prefixes summed over all rules of the target (Azure NSG: 4000). `None`: no limit.
    pub max_total_sources: Option<usize>,
    /// Destination prefixes summed over all rules of the target, as the renderer counts them
    /// ([`Render::destinations`]), less those of rules the planner does not see (Azure NSG:
    /// 4000). `None`: no limit.
    pub max_total_destinations: Option<usize>,
    /// Why `max_rules` is what it is, when it is not simply the cloud's quota (an Azure
    /// priority band with few free slots). Shown with a rule quota error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rules_reason: Option<String>,
    /// Whether a named rule can be changed in place (GCP patch, Azure PUT). Without it a
    /// change is an add of the new rule and a remove of the old one.
    pub updates_in_place: bool,
    /// The priorities our rules may take, where every rule of the target needs a distinct
    /// one (an Azure NSG's priority band). The planner gives each new rule the lowest one
    /// free. `None`: rules have no priority, or a fixed one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priorities: Option<PriorityRange>,
    /// The priority every rule of ours is written at, where the plan does not choose one
    /// (GCP: `gcp.priority`). Lower numbers are evaluated first, on every cloud.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own_priority: Option<u32>,
    /// Whether a Deny wins over an Allow of the same priority (GCP). Where priorities are
    /// unique (Azure) it never matters.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deny_wins_ties: bool,
}

/// An inclusive range of rule priorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorityRange {
    pub from: u32,
    pub to: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rules: None,
            rules_counted_per_family: false,
            max_ports_per_rule: 1,
            max_sources_per_rule: 1,
            max_total_sources: None,
            max_total_destinations: None,
            max_rules_reason: None,
            updates_in_place: false,
            priorities: None,
            own_priority: None,
            deny_wins_ties: false,
        }
    }
}

impl Limits {
    /// Checks one rule against the per-rule limits; returns what it breaks.
    pub fn check_rule(&self, rule: &Rule) -> Option<String> {
        let c = &rule.content;
        if c.ports.is_empty() || c.sources.is_empty() {
            return Some("rule has no ports or no sources".to_string());
        }
        if c.ports.len() > self.max_ports_per_rule.max(1) {
            return Some(format!(
                "rule has {} port ranges, limit is {}",
                c.ports.len(),
                self.max_ports_per_rule
            ));
        }
        if c.sources.len() > self.max_sources_per_rule.max(1) {
            return Some(format!(
                "rule has {} sources, limit is {}",
                c.sources.len(),
                self.max_sources_per_rule
            ));
        }
        if c.sources.iter().any(|s| IpFamily::of(s) != c.family) {
            return Some("rule mixes IPv4 and IPv6 sources".to_string());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_as_clouds_write_them() {
        let ok = [
            ("30080", (30080, 30080)),
            (" 30080-30090 ", (30080, 30090)),
            ("0-65535", (0, 65535)),
        ];
        for (text, (from, to)) in ok {
            assert_eq!(
                text.parse::<PortRange>(),
                Ok(PortRange { from, to }),
                "{text}"
            );
        }
        for bad in ["", "*", "30090-30080", "70000", "1-2-3", "a-b", "-1"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn protocol_parsing() {
        assert_eq!("tcp".parse::<Protocol>(), Ok(Protocol::Tcp));
        assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
        assert_eq!("SCTP".parse::<Protocol>(), Ok(Protocol::Sctp));
        assert!("ICMP".parse::<Protocol>().is_err());
    }
}

//! Provider-neutral rules, the limits a target imposes on them, and the generic renderer
//! that turns grants into rules under those limits.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::PortMerge;
use crate::desired::{Grant, PortGrant};
use crate::net::IpFamily;
use crate::plan::Target;
use crate::service::ServiceRef;
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

/// What a renderer knows about the place it renders for.
#[derive(Debug, Clone)]
pub struct RenderContext<'a> {
    pub cluster: &'a str,
    pub target: &'a Target,
    pub scope: Option<&'a str>,
    pub pools: &'a PoolSet,
    pub limits: &'a Limits,
    pub port_merge: PortMerge,
}

/// Turns provider-neutral grants into a provider's rules. Pure: renderers do no I/O.
pub trait Render: Send + Sync {
    fn render(&self, ctx: &RenderContext<'_>, grants: &[&Grant]) -> Vec<Rule>;

    /// The destination prefixes a rule (ours or observed) counts against
    /// [`Limits::max_total_destinations`]; 0 where the cloud has no such limit.
    fn destinations(&self, _rule: &Rule) -> usize {
        0
    }
}

/// The parts a rule name is built from, so that names are stable while ports change.
#[derive(Debug, Clone)]
pub struct NameParts<'a> {
    pub cluster: &'a str,
    pub scope: Option<&'a str>,
    pub pools: &'a PoolSet,
    pub protocol: Protocol,
    pub family: IpFamily,
    /// All sources of the group the rule was cut from (not only the rule's own), so that
    /// two groups never produce the same name.
    pub sources: &'a [IpNet],
    /// Index of this rule among the rules of the same protocol and sources, when limits
    /// split them.
    pub chunk: usize,
}

impl NameParts<'_> {
    /// A short, stable hash of everything but the ports: 10 hex characters. SHA-256, so
    /// that names stay the same across versions and machines.
    pub fn short_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.cluster.as_bytes());
        h.update([0]);
        h.update(self.scope.unwrap_or("").as_bytes());
        h.update([0]);
        for (i, pool) in self.pools.iter().enumerate() {
            if i > 0 {
                h.update(b",");
            }
            h.update(pool.as_str().as_bytes());
        }
        h.update([0]);
        h.update(self.protocol.as_str().as_bytes());
        h.update([match self.family {
            IpFamily::V4 => 4u8,
            IpFamily::V6 => 6u8,
        }]);
        for (i, net) in self.sources.iter().enumerate() {
            if i > 0 {
                h.update(b",");
            }
            match net {
                IpNet::V4(n) => h.update(n.addr().octets()),
                IpNet::V6(n) => h.update(n.addr().octets()),
            }
            h.update([b'/', net.prefix_len()]);
        }
        h.update(self.chunk.to_le_bytes());
        let digest = h.finalize();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(10);
        for b in digest.iter().take(5) {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }
}

type Namer = dyn Fn(&NameParts<'_>) -> String + Send + Sync;

/// The generic renderer: one rule per (scope, protocol, source set, IP family), split into
/// as many rules as the per-rule port and source limits require. Providers configure it with
/// a namer when their rules have names.
pub struct ShapeRenderer {
    namer: Option<Box<Namer>>,
}

impl fmt::Debug for ShapeRenderer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShapeRenderer")
            .field("named", &self.namer.is_some())
            .finish()
    }
}

impl ShapeRenderer {
    /// Rules without names, identified by their content (EC2 style).
    pub fn unnamed() -> Self {
        ShapeRenderer { namer: None }
    }

    /// Rules named by `namer`, which must be deterministic.
    pub fn named(namer: impl Fn(&NameParts<'_>) -> String + Send + Sync + 'static) -> Self {
        ShapeRenderer {
            namer: Some(Box::new(namer)),
        }
    }
}

/// Merges the port grants of one protocol and source set into ranges. Only exactly
/// contiguous ports are merged, so a range never covers a port nobody asked for. Returns
/// each range with the span of `entries` (sorted by port in place) it was made of.
pub fn merge_ports(
    entries: &mut [&PortGrant],
    policy: PortMerge,
) -> Vec<(PortRange, std::ops::Range<usize>)> {
    entries.sort_by_key(|e| e.port);
    let mut out: Vec<(PortRange, std::ops::Range<usize>)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if let Some((range, span)) = out.last_mut() {
            let same = range.to == entry.port;
            let next =
                policy == PortMerge::Contiguous && u32::from(range.to) + 1 == u32::from(entry.port);
            if same || next {
                range.to = entry.port;
                span.end = i + 1;
                continue;
            }
        }
        out.push((PortRange::single(entry.port), i..i + 1));
    }
    out
}

impl Render for ShapeRenderer {
    fn render(&self, ctx: &RenderContext<'_>, grants: &[&Grant]) -> Vec<Rule> {
        // Group by (protocol, family, sources of that family): two Services whose IPv4
        // allowlists are equal share IPv4 rules even when their IPv6 allowlists differ. Each
        // port still reaches exactly its own Service's sources.
        let mut groups: BTreeMap<(Protocol, IpFamily, Vec<IpNet>), Vec<&PortGrant>> =
            BTreeMap::new();
        for grant in grants {
            for family in [IpFamily::V4, IpFamily::V6] {
                let sources = grant.sources.family(family);
                if sources.is_empty() || grant.ports.is_empty() {
                    continue;
                }
                groups
                    .entry((grant.protocol, family, sources))
                    .or_default()
                    .extend(grant.ports.iter());
            }
        }
        let mut rules = Vec::new();
        let max_ports = ctx.limits.max_ports_per_rule.max(1);
        let max_sources = ctx.limits.max_sources_per_rule.max(1);
        let mut ranked: Vec<(u32, &ServiceRef)> = Vec::new();
        for ((protocol, family, sources), mut ports) in groups {
            let ranges = merge_ports(&mut ports, ctx.port_merge);
            let mut chunk = 0;
            for source_chunk in sources.chunks(max_sources) {
                for port_chunk in ranges.chunks(max_ports) {
                    // Ranks are the Services' order: sorting integers, not names.
                    ranked.clear();
                    ranked.extend(port_chunk.iter().flat_map(|(_, span)| {
                        ports[span.clone()].iter().map(|p| (p.rank, &p.service))
                    }));
                    ranked.sort_unstable_by_key(|(rank, _)| *rank);
                    ranked.dedup_by_key(|(rank, _)| *rank);
                    let services =
                        ServiceSet::from_sorted(ranked.iter().map(|(_, s)| (*s).clone()).collect());
                    let name = self.namer.as_ref().map(|namer| {
                        namer(&NameParts {
                            cluster: ctx.cluster,
                            scope: ctx.scope,
                            pools: ctx.pools,
                            protocol,
                            family,
                            sources: &sources,
                            chunk,
                        })
                    });
                    chunk += 1;
                    rules.push(Rule {
                        name,
                        content: RuleContent {
                            scope: ctx.scope.map(str::to_string),
                            family,
                            protocol,
                            ports: port_chunk.iter().map(|(r, _)| *r).collect(),
                            sources: source_chunk.to_vec(),
                        },
                        services,
                        pools: ctx.pools.clone(),
                    });
                }
            }
        }
        rules.sort_unstable_by(|a, b| a.content.cmp(&b.content));
        rules
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

    fn pg(port: u16, svc: &str) -> PortGrant {
        PortGrant {
            port,
            rank: 0,
            service: ServiceRef::new("default", svc),
        }
    }

    #[test]
    fn merge_table() {
        let cases: &[(&[u16], PortMerge, &[&str])] = &[
            (
                &[30001, 30002, 30003],
                PortMerge::Contiguous,
                &["30001-30003"],
            ),
            (&[30001, 30003], PortMerge::Contiguous, &["30001", "30003"]),
            (
                &[30003, 30001, 30002],
                PortMerge::Contiguous,
                &["30001-30003"],
            ),
            (&[30001, 30002], PortMerge::None, &["30001", "30002"]),
            (&[65534, 65535], PortMerge::Contiguous, &["65534-65535"]),
            (&[], PortMerge::Contiguous, &[]),
        ];
        for (ports, policy, want) in cases {
            let entries: Vec<PortGrant> = ports.iter().map(|p| pg(*p, "a")).collect();
            let mut refs: Vec<&PortGrant> = entries.iter().collect();
            let got: Vec<String> = merge_ports(&mut refs, *policy)
                .iter()
                .map(|(r, _)| r.to_string())
                .collect();
            assert_eq!(&got, want, "{ports:?} {policy:?}");
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

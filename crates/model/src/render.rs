//! Rendering: the [`Render`] trait a provider implements to turn grants into its rules, and
//! [`ShapeRenderer`], the generic renderer most providers configure: one rule per (scope,
//! protocol, source set, IP family), cut to the target's per-rule limits.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::config::PortMerge;
use crate::desired::{Grant, PortGrant};
use crate::net::IpFamily;
use crate::rule::{Limits, PortRange, Protocol, Rule, RuleContent};
use crate::service::ServiceRef;
use crate::set::{PoolSet, ServiceSet};
use crate::target::Target;

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

    /// The digest this provider's marker would carry for `rule` of `cluster`, when the
    /// marker cannot list everything the rule serves; `None` when it lists it all. The
    /// planner recognises an observed rule whose marker holds a digest by rendering the
    /// wanted rule and comparing, so that a fresh process decides as a long-running one.
    fn marker_digest(&self, _cluster: &str, _rule: &Rule) -> Option<String> {
        None
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
}

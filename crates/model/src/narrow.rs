//! What the policy takes away from a rule that is otherwise kept as it is.
//!
//! A rule is kept exactly as it is while a Service it serves has unreadable annotations or
//! one of its pools cannot be resolved (fail closed). Kept whole, it would also keep open
//! the ports of Services sharing it that the policy has since closed, and a tenant could
//! freeze its openings through any tightening by breaking an annotation on purpose. So the
//! ports of every Service the policy refuses, closed ones and invalid ones whose existing
//! rule the current policy would not admit, are taken out of the kept rule; what is left
//! stays kept.

use std::collections::BTreeSet;

use crate::annotations::ServiceIntent;
use crate::desired::{Desired, PoolSelector};
use crate::net::SourceSet;
use crate::policy::Verdict;
use crate::rule::{PortRange, Rule};
use crate::service::ServiceRef;

/// A kept rule less what the policy closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Narrowed {
    /// The rule that stays; no ports when nothing of it may stay.
    pub rule: Rule,
    /// Why: one `ns/name: reason` per Service whose ports were taken out.
    pub why: Vec<String>,
}

/// What of `rule` the policy closes, or None when all of it may stay.
pub fn narrow(rule: &Rule, desired: &Desired) -> Option<Narrowed> {
    let protocol = rule.content.protocol;
    let in_rule = |port: u16| rule.content.ports.iter().any(|r| r.contains(port));
    let mut closed_ports: BTreeSet<u16> = BTreeSet::new();
    let mut dropped: Vec<&ServiceRef> = Vec::new();
    let mut why = Vec::new();
    for s in rule.services.iter() {
        let ports: Vec<u16> = desired
            .held_ports
            .get(s)
            .into_iter()
            .flatten()
            .filter(|(p, n)| *p == protocol && in_rule(*n))
            .map(|(_, n)| *n)
            .collect();
        if let Some(reason) = desired.closed.get(s) {
            closed_ports.extend(&ports);
            dropped.push(s);
            why.push(format!("{s}: {reason}"));
        } else if desired.pinned.contains(s) && !ports.is_empty() {
            // An invalid Service: would the policy admit what its rule opens now?
            let hold = ServiceIntent {
                service: s.clone(),
                ports: ports.iter().map(|n| (protocol, *n)).collect(),
                sources: SourceSet::new(rule.content.sources.iter().copied()),
                pools: PoolSelector::Named(rule.pools.iter().cloned().collect()),
                warnings: Vec::new(),
            };
            if let Verdict::Closed { reasons, .. } = desired.tenancy.judge(&desired.floor, &hold) {
                closed_ports.extend(&ports);
                dropped.push(s);
                why.push(format!("{s}: {}", reasons.join("; ")));
            }
        }
    }
    if dropped.is_empty() {
        return None;
    }
    let mut narrowed = rule.clone();
    narrowed.content.ports = without(&rule.content.ports, &closed_ports);
    narrowed.services = rule
        .services
        .iter()
        .filter(|s| !dropped.contains(s))
        .cloned()
        .collect();
    if narrowed.services.is_empty() {
        narrowed.content.ports.clear();
    }
    Some(Narrowed {
        rule: narrowed,
        why,
    })
}

/// `ranges` without the ports in `drop`, as ranges again.
fn without(ranges: &[PortRange], drop: &BTreeSet<u16>) -> Vec<PortRange> {
    let mut out = Vec::new();
    for r in ranges {
        let mut start: Option<u16> = None;
        for port in r.from..=r.to {
            match (drop.contains(&port), start) {
                (false, None) => start = Some(port),
                (true, Some(from)) => {
                    out.push(PortRange { from, to: port - 1 });
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(from) = start {
            out.push(PortRange { from, to: r.to });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(text: &[(u16, u16)]) -> Vec<PortRange> {
        text.iter()
            .map(|(from, to)| PortRange {
                from: *from,
                to: *to,
            })
            .collect()
    }

    #[test]
    fn ports_are_taken_out_of_ranges() {
        // (ranges, ports to drop, ranges left)
        type Case<'a> = (&'a [(u16, u16)], &'a [u16], &'a [(u16, u16)]);
        let cases: &[Case] = &[
            (
                &[(30080, 30082)],
                &[30081],
                &[(30080, 30080), (30082, 30082)],
            ),
            (&[(30080, 30082)], &[30080], &[(30081, 30082)]),
            (&[(30080, 30082)], &[30082], &[(30080, 30081)]),
            (&[(30080, 30080)], &[30080], &[]),
            (
                &[(30080, 30080), (30090, 30091)],
                &[30091, 1],
                &[(30080, 30080), (30090, 30090)],
            ),
            (&[(0, 2)], &[0], &[(1, 2)]),
            (&[(65534, 65535)], &[65534], &[(65535, 65535)]),
        ];
        for (input, drop, want) in cases {
            let drop: BTreeSet<u16> = drop.iter().copied().collect();
            assert_eq!(
                without(&ranges(input), &drop),
                ranges(want),
                "{input:?} - {drop:?}"
            );
        }
    }
}

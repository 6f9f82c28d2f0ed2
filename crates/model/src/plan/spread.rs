//! Spreading: a pool whose rules outgrow one target is given several (AWS: security groups
//! that its nodes all carry), and each of its rules goes on exactly one of them.
//!
//! Placement is stable: a rule of ours stays on the target it is on for as long as it is
//! wanted, so adding or removing a Service moves no other rule. A new rule goes where rules
//! with the same sources already are, if there is room there, else to the first target
//! with room, in the targets' order; rules sharing a source set so stay together. When the
//! targets are full the group is refused as a whole, with what would fit it.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use super::{
    PlanError, ScopePools, TargetPlan, errored, matching, plan_target, render_want, shadow,
};
use crate::desired::Desired;
use crate::failure::{ErrorKind, Failure};
use crate::net::IpFamily;
use crate::node::PoolName;
use crate::render::Render;
use crate::rule::{Limits, Rule};
use crate::target::{Observation, ObservationResult, ObservedRule, PoolResolution, Target};

/// The spread groups: the targets of each pool's spread, in the pool's order, groups that
/// share a target merged (their rules then share all of them).
pub(super) fn groups(resolutions: &BTreeMap<PoolName, PoolResolution>) -> Vec<Vec<&Target>> {
    let mut groups: Vec<Vec<&Target>> = Vec::new();
    for targets in resolutions.values().flatten() {
        let mut by_key: BTreeMap<&str, Vec<&Target>> = BTreeMap::new();
        for pt in targets {
            if let Some(key) = pt.spread.as_deref() {
                let g = by_key.entry(key).or_default();
                if !g.contains(&&pt.target) {
                    g.push(&pt.target);
                }
            }
        }
        for mut group in by_key.into_values() {
            // Merge every group it shares a target with into it, keeping first-seen order.
            let mut i = 0;
            while i < groups.len() {
                if groups[i].iter().any(|t| group.contains(t)) {
                    let mut merged = groups.remove(i);
                    for t in group {
                        if !merged.contains(&t) {
                            merged.push(t);
                        }
                    }
                    group = merged;
                    i = 0;
                } else {
                    i += 1;
                }
            }
            groups.push(group);
        }
    }
    groups.sort();
    groups
}

/// Plans the targets of one spread group together: what its pools want is spread over
/// them ([`assign`]), then each is planned with its share. If a member cannot be read, or
/// the rules do not fit, no member is written.
pub(super) fn plan_group(
    desired: &Desired,
    members: &[&Target],
    layout: &BTreeMap<&Target, ScopePools<'_>>,
    observations: &BTreeMap<Target, ObservationResult>,
    renderer: &dyn Render,
    failed_pools: &BTreeSet<&PoolName>,
) -> Vec<TargetPlan> {
    let no_scopes = ScopePools::new();
    let scopes = |t: &Target| layout.get(t).unwrap_or(&no_scopes);
    let pools =
        |t: &Target| -> BTreeSet<PoolName> { scopes(t).values().flatten().cloned().collect() };
    let mut seen: Vec<&Observation> = Vec::new();
    for t in members {
        let failure = match observations.get(*t) {
            Some(Ok(o)) => {
                seen.push(o);
                continue;
            }
            Some(Err(f)) => f.clone(),
            None => Failure::new(ErrorKind::Other, "not observed"),
        };
        // Where a rule is (or may go) depends on every member: none is planned.
        return members
            .iter()
            .map(|m| {
                let error = if m == t {
                    PlanError::observe(&failure)
                } else {
                    PlanError::observe(&Failure::new(
                        failure.kind,
                        format!(
                            "{t}, which shares this pool's rules, could not be read: {failure}"
                        ),
                    ))
                };
                errored(m, pools(m), error)
            })
            .collect();
    }
    // Members with the same pools, scopes and limits want the same rules: render once for
    // each such kind of member (usually once for the group).
    let mut want: Vec<Rule> = Vec::new();
    let mut rendered: Vec<(&ScopePools<'_>, &Limits)> = Vec::new();
    for (t, o) in members.iter().zip(&seen) {
        let kind = (scopes(t), &o.limits);
        if !rendered.contains(&kind) {
            rendered.push(kind);
            want.extend(render_want(desired, t, scopes(t), o, renderer));
        }
    }
    want.sort_by(|a, b| a.content.cmp(&b.content));
    want.dedup_by(|a, b| a.content == b.content);
    let placing: Vec<Member<'_>> = seen
        .iter()
        .map(|o| {
            let inputs = matching::Inputs {
                observation: o,
                desired,
                failed_pools,
                renderer,
                denies: shadow::denies(o),
            };
            Member {
                observation: o,
                pinned: o
                    .rules
                    .iter()
                    .filter(|r| r.owned && inputs.pin_reason(r).is_some())
                    .collect(),
            }
        })
        .collect();
    match assign(&want, &placing) {
        Ok(placed) => members
            .iter()
            .zip(&seen)
            .zip(placed)
            .map(|((t, o), rules)| {
                plan_target(
                    t,
                    pools(t),
                    rules.into_iter().cloned().collect(),
                    o,
                    desired,
                    failed_pools,
                    renderer,
                )
            })
            .collect(),
        Err(e) => members
            .iter()
            .map(|t| errored(t, pools(t), e.clone()))
            .collect(),
    }
}

/// One target of a spread group, as the placement sees it.
pub(super) struct Member<'a> {
    pub observation: &'a Observation,
    /// Rules of ours on it that the plan keeps whatever is wanted (fail closed).
    pub pinned: Vec<&'a ObservedRule>,
}

/// The family a quota counts a rule in: its own where the target counts per family.
fn counted(limits: &Limits, family: IpFamily) -> Option<IpFamily> {
    limits.rules_counted_per_family.then_some(family)
}

/// Rules a member holds, or will, in one count of its quota.
struct Load<'a> {
    limits: &'a Limits,
    /// Per counted family (`None`: all families count together).
    used: Vec<(Option<IpFamily>, usize)>,
    /// Source sets of rules of ours that are or will be on it, with their family.
    sources: BTreeSet<(IpFamily, &'a [IpNet])>,
}

impl<'a> Load<'a> {
    fn of(member: &Member<'a>) -> Self {
        let limits = &member.observation.limits;
        let mut load = Load {
            limits,
            used: Vec::new(),
            sources: BTreeSet::new(),
        };
        for r in member.observation.rules.iter().filter(|r| !r.owned) {
            load.count(r.rule.content.family);
        }
        for r in &member.pinned {
            load.take(&r.rule);
        }
        load
    }

    fn count(&mut self, family: IpFamily) {
        let key = counted(self.limits, family);
        match self.used.iter_mut().find(|(f, _)| *f == key) {
            Some((_, n)) => *n += 1,
            None => self.used.push((key, 1)),
        }
    }

    fn take(&mut self, rule: &'a Rule) {
        self.count(rule.content.family);
        self.sources
            .insert((rule.content.family, rule.content.sources.as_slice()));
    }

    fn used(&self, family: IpFamily) -> usize {
        let key = counted(self.limits, family);
        self.used
            .iter()
            .find(|(f, _)| *f == key)
            .map_or(0, |(_, n)| *n)
    }

    fn room(&self, family: IpFamily) -> usize {
        self.limits
            .max_rules
            .map_or(usize::MAX, |max| max.saturating_sub(self.used(family)))
    }

    fn has_sources(&self, rule: &Rule) -> bool {
        self.sources
            .contains(&(rule.content.family, rule.content.sources.as_slice()))
    }
}

/// Gives each of `want` (the group's rules, one per content) to one member: the wanted
/// rules of each member, in member order. An error when they do not all fit.
pub(super) fn assign<'a>(
    want: &'a [Rule],
    members: &[Member<'a>],
) -> Result<Vec<Vec<&'a Rule>>, PlanError> {
    let mut loads: Vec<Load<'a>> = members.iter().map(Load::of).collect();
    let mut placed: Vec<Vec<&'a Rule>> = vec![Vec::new(); members.len()];
    let pinned_here = |i: usize, rule: &Rule| {
        members[i]
            .pinned
            .iter()
            .any(|p| p.rule.content == rule.content)
    };
    // Where a rule already is, it stays: by content, else by name.
    let mut new = Vec::new();
    for rule in want {
        let home = (0..members.len())
            .find(|&i| {
                members[i]
                    .observation
                    .rules
                    .iter()
                    .any(|r| r.owned && r.rule.content == rule.content)
            })
            .or_else(|| {
                let name = rule.name.as_deref()?;
                (0..members.len()).find(|&i| {
                    members[i]
                        .observation
                        .rules
                        .iter()
                        .any(|r| r.owned && r.rule.name.as_deref() == Some(name))
                })
            });
        match home {
            // A pinned rule of that content is kept there already, and counted.
            Some(i) if pinned_here(i, rule) => placed[i].push(rule),
            Some(i) => {
                loads[i].take(rule);
                placed[i].push(rule);
            }
            None => new.push(rule),
        }
    }
    // New rules, those with the same sources one after the other.
    new.sort_by(|a, b| {
        (&a.content.sources, a.content.family, &a.content).cmp(&(
            &b.content.sources,
            b.content.family,
            &b.content,
        ))
    });
    let mut unplaced: Vec<&Rule> = Vec::new();
    for rule in new {
        let family = rule.content.family;
        let with_room = |l: &Load<'_>| l.room(family) > 0;
        let choice = (0..members.len())
            .find(|&i| with_room(&loads[i]) && loads[i].has_sources(rule))
            .or_else(|| (0..members.len()).find(|&i| with_room(&loads[i])));
        match choice {
            Some(i) => {
                loads[i].take(rule);
                placed[i].push(rule);
            }
            None => unplaced.push(rule),
        }
    }
    if let Some(first) = unplaced.first() {
        let family = first.content.family;
        let limits = &members[0].observation.limits;
        let key = counted(limits, family);
        let short = unplaced
            .iter()
            .filter(|r| counted(limits, r.content.family) == key)
            .count();
        let wanted = want
            .iter()
            .filter(|r| counted(limits, r.content.family) == key)
            .count();
        let per_target = limits.max_rules.unwrap_or(0);
        return Err(PlanError::Capacity {
            family: key,
            wanted,
            short,
            targets: members.len(),
            per_target,
        });
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{PortRange, Protocol, RuleContent};

    fn rule(port: u16, source: &str) -> Rule {
        let sources: Vec<IpNet> = vec![source.parse().unwrap()];
        Rule {
            name: None,
            content: RuleContent {
                scope: None,
                family: IpFamily::of(&sources[0]),
                protocol: Protocol::Tcp,
                ports: vec![PortRange::single(port)],
                sources,
            },
            services: Default::default(),
            pools: Default::default(),
        }
    }

    fn observed(rules: &[Rule], owned: bool) -> Vec<ObservedRule> {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| ObservedRule::new(Some(format!("r{i}")), r.clone(), owned))
            .collect()
    }

    fn limits(max: usize) -> Limits {
        Limits {
            max_rules: Some(max),
            rules_counted_per_family: true,
            ..Limits::default()
        }
    }

    fn unpinned<'a>(observations: &[&'a Observation]) -> Vec<Member<'a>> {
        observations
            .iter()
            .map(|o| Member {
                observation: o,
                pinned: Vec::new(),
            })
            .collect()
    }

    fn ports(placed: &[Vec<&Rule>]) -> Vec<Vec<u16>> {
        placed
            .iter()
            .map(|m| m.iter().map(|r| r.content.ports[0].from).collect())
            .collect()
    }

    #[test]
    fn new_rules_fill_the_first_target_with_room_and_keep_sources_together() {
        let a = Observation::new(observed(&[rule(1, "192.0.2.0/24")], false), limits(2));
        let b = Observation::new(Vec::new(), limits(2));
        let members = unpinned(&[&a, &b]);
        let want = vec![
            rule(10, "10.0.0.1/32"),
            rule(11, "10.0.0.2/32"),
            rule(12, "10.0.0.2/32"),
        ];
        let placed = assign(&want, &members).unwrap();
        // a has room for one: the first new rule; the two from 10.0.0.2 go together to b.
        assert_eq!(ports(&placed), vec![vec![10], vec![11, 12]]);
    }

    #[test]
    fn a_rule_stays_where_it_is_and_the_families_count_apart() {
        let ours = [rule(11, "10.0.0.2/32")];
        let a = Observation::new(Vec::new(), limits(1));
        let b = Observation::new(observed(&ours, true), limits(1));
        let members = unpinned(&[&a, &b]);
        let want = vec![
            rule(10, "10.0.0.1/32"),
            rule(11, "10.0.0.2/32"),
            rule(12, "2001:db8::/64"),
        ];
        let placed = assign(&want, &members).unwrap();
        assert_eq!(ports(&placed), vec![vec![10, 12], vec![11]]);
    }

    #[test]
    fn a_full_group_is_one_error_that_says_what_would_fit() {
        let a = Observation::new(Vec::new(), limits(2));
        let b = Observation::new(observed(&[rule(1, "192.0.2.0/24")], false), limits(2));
        let members = unpinned(&[&a, &b]);
        let want: Vec<Rule> = (0..6)
            .map(|i| rule(10 + i, &format!("10.0.0.{i}/32")))
            .collect();
        let err = assign(&want, &members).unwrap_err();
        assert_eq!(
            err,
            PlanError::Capacity {
                family: Some(IpFamily::V4),
                wanted: 6,
                short: 3,
                targets: 2,
                per_target: 2,
            }
        );
        let text = err.to_string();
        assert!(text.contains("2 more targets"), "{text}");
        assert!(text.contains("a quota of 4"), "{text}");
    }
}

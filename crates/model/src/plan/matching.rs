//! Matching: which observed rule of ours each wanted rule is, which observed rules are kept
//! as they are (fail closed), and what is added or removed.
//!
//! Everything the matching knows about an observed rule comes from the observation, so a
//! fresh process matches exactly as a long-running one. A rule whose marker holds a digest
//! instead of its full Service list is recognised by rendering the wanted rule's digest
//! ([`Render::marker_digest`]), and is never narrowed or removed while a Service it might
//! serve is pinned or a pool it might serve is unresolved (docs/architecture.md).

use std::collections::BTreeSet;

use rustc_hash::FxHashMap as HashMap;

use super::{Action, Change, shadow};
use crate::desired::Desired;
use crate::node::PoolName;
use crate::render::Render;
use crate::rule::{Rule, RuleContent};
use crate::service::ServiceRef;
use crate::target::{Observation, ObservedRule};

/// A plan line for a wanted rule that does not exist yet.
pub(super) fn change(action: Action, rule: Rule, id: Option<String>) -> Change {
    Change {
        action,
        rule,
        id,
        previous: None,
        note: None,
        priority: None,
        payload: None,
    }
}

/// A plan line about an observed rule: its id and priority come with it.
fn about(action: Action, rule: Rule, observed: &ObservedRule) -> Change {
    let mut c = change(action, rule, observed.id.clone());
    c.priority = observed.priority;
    c.payload = observed.payload.clone();
    c
}

/// What the matching needs besides the rules.
pub(super) struct Inputs<'a> {
    pub observation: &'a Observation,
    pub desired: &'a Desired,
    pub failed_pools: &'a BTreeSet<&'a PoolName>,
    pub renderer: &'a dyn Render,
    /// The target's Deny rules ([`shadow::denies`]).
    pub denies: Vec<&'a ObservedRule>,
}

impl Inputs<'_> {
    /// Why an observed rule of ours must be kept as it is, if it must.
    pub(super) fn pin_reason(&self, r: &ObservedRule) -> Option<String> {
        let pinned = &self.desired.pinned;
        if let Some(s) = r.rule.services.iter().find(|s| pinned.contains(*s)) {
            return Some(format!("kept: {s} has invalid annotations"));
        }
        if let Some(p) = r.rule.pools.iter().find(|p| self.failed_pools.contains(p)) {
            return Some(format!("kept: pool {p} could not be resolved"));
        }
        let digest = r.digest.as_ref()?;
        // The marker does not say everything the rule serves: fail closed on what it
        // might serve.
        if !digest.pools_listed
            && let Some(p) = self.failed_pools.first()
        {
            return Some(format!(
                "kept: pool {p} could not be resolved, and this rule's marker does not list its pools"
            ));
        }
        pinned
            .iter()
            .find(|s| self.might_serve(r, s))
            .map(|s| {
                format!(
                    "kept: {s} has invalid annotations and a port this rule opens, and the rule's marker does not list all its Services"
                )
            })
    }

    /// Whether pinned Service `s` holds a node port the rule opens.
    fn might_serve(&self, r: &ObservedRule, s: &ServiceRef) -> bool {
        let content = &r.rule.content;
        match self.desired.held_ports.get(s) {
            Some(ports) => ports.iter().any(|(protocol, port)| {
                *protocol == content.protocol && content.ports.iter().any(|p| p.contains(*port))
            }),
            // Unknown ports: it might.
            None => true,
        }
    }

    /// Whether a wanted rule is the observed one exactly, marker included, and in force as
    /// written.
    fn same(&self, rule: &Rule, old: &ObservedRule) -> bool {
        if old.needs_rewrite.is_some() {
            return false;
        }
        let Some(digest) = &old.digest else {
            return *rule == old.rule;
        };
        rule.name == old.rule.name
            && rule.content == old.rule.content
            && (!digest.pools_listed || rule.pools == old.rule.pools)
            && self
                .renderer
                .marker_digest(&self.desired.cluster, rule)
                .is_some_and(|d| d == digest.value)
    }

    fn same_or_update(&self, rule: Rule, old: &ObservedRule) -> Change {
        let limits = &self.observation.limits;
        // A rule of ours behind a Deny that may match its traffic is not in force: where
        // the plan chooses priorities it moves the rule before the Deny (the priority is
        // left for [`super::ordering::place`] to choose).
        let moved = limits.priorities.and(shadow::shadowing(
            &self.denies,
            &rule.content,
            old.priority,
            limits,
        ));
        if moved.is_none() && self.same(&rule, old) {
            return about(Action::Unchanged, rule, old);
        }
        let mut c = about(Action::Update, rule, old);
        c.previous = Some(old.rule.clone());
        if let Some(d) = moved {
            c.priority = None;
            c.note = Some(format!(
                "moved before the Deny rule {} at priority {}",
                shadow::label(d),
                d.priority.unwrap_or(0)
            ));
        } else if let Some(why) = &old.needs_rewrite {
            c.note = Some(format!("written again: {why}"));
        }
        c
    }
}

/// Matches the wanted rules of a target (`want`, rendered) with what was observed there.
/// The changes come out unsorted.
pub(super) fn match_rules(mut want: Vec<Rule>, inputs: &Inputs<'_>) -> Vec<Change> {
    want.sort_unstable_by(|a, b| a.content.cmp(&b.content));
    want.dedup_by(|a, b| a.content == b.content);
    let observation = inputs.observation;
    let limits = &observation.limits;

    let (owned, foreign): (Vec<&ObservedRule>, Vec<&ObservedRule>) =
        observation.rules.iter().partition(|r| r.owned);

    let mut changes = Vec::new();
    let mut matched = vec![false; owned.len()];
    let mut pinned_content: BTreeSet<RuleContent> = BTreeSet::new();
    let mut pinned_names: BTreeSet<&str> = BTreeSet::new();
    for (i, r) in owned.iter().enumerate() {
        let Some(reason) = inputs.pin_reason(r) else {
            continue;
        };
        matched[i] = true;
        if let Some(n) = &r.rule.name {
            pinned_names.insert(n);
        }
        // A rule whose Services are not all known is kept whole: narrowing it would need
        // the Services it does not name.
        let narrowed = if r.fully_listed() {
            crate::narrow::narrow(&r.rule, inputs.desired)
        } else {
            None
        };
        match narrowed {
            None => {
                pinned_content.insert(r.rule.content.clone());
                let mut c = about(Action::Keep, r.rule.clone(), r);
                c.note = Some(reason);
                changes.push(c);
            }
            // What the policy closes goes even from a kept rule; the rest stays kept.
            Some(n) => {
                let closed = format!("closed: {}", n.why.join("; "));
                if n.rule.content.ports.is_empty() {
                    let mut c = about(Action::Remove, r.rule.clone(), r);
                    c.note = Some(closed);
                    changes.push(c);
                } else if r.rule.name.is_some() && limits.updates_in_place {
                    pinned_content.insert(n.rule.content.clone());
                    let mut c = about(Action::Update, n.rule, r);
                    c.previous = Some(r.rule.clone());
                    c.note = Some(format!("{closed}; the rest is {reason}"));
                    changes.push(c);
                } else {
                    pinned_content.insert(n.rule.content.clone());
                    let mut rest = n.rule;
                    if let Some(name) = &rest.name {
                        rest.name = Some(format!("{name}-n"));
                    }
                    let mut add = change(Action::Add, rest, None);
                    add.note = Some(format!(
                        "the part of {{{}}} that stays {reason}",
                        r.id.as_deref().unwrap_or("?")
                    ));
                    changes.push(add);
                    let mut c = about(Action::Remove, r.rule.clone(), r);
                    c.note = Some(closed);
                    changes.push(c);
                }
            }
        }
    }
    let mut by_name: HashMap<&str, usize> = HashMap::default();
    let mut by_content: HashMap<&RuleContent, Vec<usize>> = HashMap::default();
    for (i, r) in owned.iter().enumerate() {
        if matched[i] {
            continue;
        }
        if let Some(n) = &r.rule.name {
            by_name.insert(n, i);
        }
        by_content.entry(&r.rule.content).or_default().push(i);
    }
    let mut foreign_content: HashMap<&RuleContent, Vec<&ObservedRule>> = HashMap::default();
    for r in foreign.iter().filter(|r| r.deny.is_none()) {
        foreign_content.entry(&r.rule.content).or_default().push(r);
    }
    let foreign_names: BTreeSet<&str> = foreign
        .iter()
        .filter_map(|r| r.rule.name.as_deref())
        .collect();

    // A named rule is the same rule as the unmatched observed one of that name, when it
    // can become it.
    let by_own_name = |name: Option<&str>, rule: &Rule, matched: &[bool]| -> Option<usize> {
        let i = *by_name.get(name?)?;
        (!matched[i] && (owned[i].rule.content == rule.content || limits.updates_in_place))
            .then_some(i)
    };
    for mut rule in want {
        if let Some(i) = by_own_name(rule.name.as_deref(), &rule, &matched) {
            matched[i] = true;
            changes.push(inputs.same_or_update(rule, owned[i]));
            continue;
        }
        // Otherwise a rule with the same content is the same rule.
        if let Some(i) = by_content
            .get(&rule.content)
            .and_then(|c| c.iter().find(|&&i| !matched[i]))
            .copied()
        {
            matched[i] = true;
            let old = owned[i];
            // Keep the observed name: it is what the cloud knows the rule by.
            rule.name = old.rule.name.clone();
            changes.push(inputs.same_or_update(rule, old));
            continue;
        }
        if pinned_content
            .iter()
            .any(|kept| covers(kept, &rule.content))
        {
            continue; // served by a kept rule: the same sources, these ports and maybe more
        }
        // A rule of others with exactly this content satisfies it only if it is in force:
        // no Deny that may match the traffic is evaluated before it.
        let mut shadowed_by: Option<(&ObservedRule, &ObservedRule)> = None;
        if let Some(same) = foreign_content.get(&rule.content) {
            let in_force = same.iter().find(|f| {
                let d = shadow::shadowing(&inputs.denies, &rule.content, f.priority, limits);
                if shadowed_by.is_none() {
                    shadowed_by = d.map(|d| (**f, d));
                }
                d.is_none()
            });
            if let Some(f) = in_force {
                let mut c = about(Action::SatisfiedByForeign, rule, f);
                c.note = Some(
                    "already allowed by a rule nodeport-firewall does not own; left as is"
                        .to_string(),
                );
                changes.push(c);
                continue;
            }
        }
        let shadowed_note = shadowed_by.map(|(f, d)| {
            format!(
                "{} allows this, but the Deny rule {} at priority {} is evaluated before it",
                shadow::label(f),
                shadow::label(d),
                d.priority.unwrap_or(0)
            )
        });
        if let Some(name) = rule.name.clone()
            && (pinned_names.contains(name.as_str())
                || by_name.contains_key(name.as_str())
                || foreign_names.contains(name.as_str())
                || observation.reserved_names.contains(&name))
        {
            // The name is held by a kept rule, by one that cannot be updated in place, by
            // a rule of someone else's, or by a rule the planner does not see: the rule
            // goes under a derived name rather than touch it, and is the observed rule of
            // that name when there is one of ours.
            let taken = |n: &str| {
                pinned_names.contains(n)
                    || by_name.contains_key(n)
                    || foreign_names.contains(n)
                    || observation.reserved_names.contains(n)
            };
            let mut own = None;
            for candidate in derived_names(&name) {
                rule.name = Some(candidate);
                own = by_own_name(rule.name.as_deref(), &rule, &matched);
                if own.is_some() || !rule.name.as_deref().is_some_and(taken) {
                    break;
                }
            }
            if let Some(i) = own {
                matched[i] = true;
                changes.push(inputs.same_or_update(rule, owned[i]));
                continue;
            }
        }
        let mut add = change(Action::Add, rule, None);
        add.note = shadowed_note;
        changes.push(add);
    }
    for (i, r) in owned.iter().enumerate() {
        if !matched[i] {
            changes.push(about(Action::Remove, r.rule.clone(), r));
        }
    }
    changes
}

/// The names a rule takes, in turn, when its own is held: `-n`, then `-n2` to `-n9`. A
/// name still held after those is the guard's to refuse.
fn derived_names(name: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(format!("{name}-n")).chain((2..10).map(move |i| format!("{name}-n{i}")))
}

/// Whether a kept rule already allows everything `wanted` does, from exactly its sources:
/// adding `wanted` beside it would open nothing new.
fn covers(kept: &RuleContent, wanted: &RuleContent) -> bool {
    kept.scope == wanted.scope
        && kept.family == wanted.family
        && kept.protocol == wanted.protocol
        && kept.sources == wanted.sources
        && wanted
            .ports
            .iter()
            .all(|w| kept.ports.iter().any(|k| k.from <= w.from && w.to <= k.to))
}

//! Shadowing: whether an Allow is in force on a target whose rules are evaluated in
//! priority order, first match wins (Azure NSGs, GCP VPC firewalls).
//!
//! An Allow lets a packet through only if no Deny that matches the packet is evaluated
//! before it. The planner does not enumerate packets: a Deny that may match any part of
//! an Allow's ports × sources ([`Denial::overlaps`], never narrower than the cloud's rule)
//! is taken to shadow it. A foreign Allow so shadowed does not satisfy a Service, and a
//! rule of ours must come before every such Deny, or the plan says it cannot.

use super::{Action, Change, PlanError};
use crate::rule::{Limits, RuleContent};
use crate::target::{Observation, ObservedRule};

/// Whether a Deny at `deny` is evaluated before an Allow at `allow`. Unknown priorities
/// are taken the unsafe way round for the Allow: evaluated first when a Deny's priority is
/// unknown, last when the Allow's is.
fn evaluated_before(deny: Option<u32>, allow: Option<u32>, limits: &Limits) -> bool {
    match (deny, allow) {
        (Some(d), Some(a)) => d < a || (d == a && limits.deny_wins_ties),
        _ => true,
    }
}

/// The Denies of a target, each with what it may match.
pub(super) fn denies(observation: &Observation) -> Vec<&ObservedRule> {
    observation
        .rules
        .iter()
        .filter(|r| r.deny.is_some())
        .collect()
}

/// The first-evaluated Deny that keeps an Allow of `content` at `priority` from being in
/// force, if one does.
pub(super) fn shadowing<'a>(
    denies: &[&'a ObservedRule],
    content: &RuleContent,
    priority: Option<u32>,
    limits: &Limits,
) -> Option<&'a ObservedRule> {
    denies
        .iter()
        .filter(|d| d.deny.as_ref().is_some_and(|x| x.overlaps(content)))
        .filter(|d| evaluated_before(d.priority, priority, limits))
        .min_by_key(|d| d.priority)
        .copied()
}

/// The priority a rule of ours must come before to be in force: the earliest Deny that
/// may match its traffic, with that Deny. `None` when no Deny overlaps it.
pub(super) fn deadline<'a>(
    denies: &[&'a ObservedRule],
    content: &RuleContent,
) -> Option<(Option<u32>, &'a ObservedRule)> {
    denies
        .iter()
        .filter(|d| d.deny.as_ref().is_some_and(|x| x.overlaps(content)))
        .min_by_key(|d| d.priority)
        .map(|d| (d.priority, *d))
}

/// Whether priority `p` of ours comes before a Deny at `deny`.
pub(super) fn wins(p: u32, deny: Option<u32>, limits: &Limits) -> bool {
    !evaluated_before(deny, Some(p), limits)
}

/// How a plan names a rule in an error: its name, else its ports and sources.
pub(super) fn rule_label(c: &Change) -> String {
    c.rule.name.clone().unwrap_or_else(|| {
        format!(
            "{} {} from {}",
            c.rule.content.protocol,
            c.rule.ports_text(),
            c.rule.sources_text()
        )
    })
}

/// How a plan names an observed rule (a Deny, a rule of others): its name, else its id.
pub(super) fn label(d: &ObservedRule) -> String {
    d.rule
        .name
        .clone()
        .or_else(|| d.id.clone())
        .unwrap_or_else(|| "(unnamed)".to_string())
}

/// Where our rules all take one fixed priority (GCP): the first rule of ours that a Deny
/// evaluated before that priority would shadow, as a plan error.
pub(super) fn check_fixed(
    changes: &[Change],
    observation: &Observation,
    own: u32,
) -> Option<PlanError> {
    let denies = denies(observation);
    if denies.is_empty() {
        return None;
    }
    let limits = &observation.limits;
    changes
        .iter()
        .filter(|c| matches!(c.action, Action::Add | Action::Update | Action::Unchanged))
        .find_map(|c| {
            let d = shadowing(&denies, &c.rule.content, Some(own), limits)?;
            Some(PlanError::Shadowed {
                rule: rule_label(c),
                deny: label(d),
                priority: d.priority.unwrap_or(0),
                best: own,
            })
        })
}

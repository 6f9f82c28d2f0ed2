//! Quota: the target's limits, counted on the state after the plan (rules of others
//! included), and whether removes must come before adds to stay within them.

use super::{Action, Change, FamilyUsage, PlanError, Usage};
use crate::net::IpFamily;
use crate::render::Render;
use crate::rule::Rule;
use crate::target::{Observation, ObservedRule};

/// What the limits say about a target's changes.
pub(super) struct Verdict {
    pub error: Option<PlanError>,
    pub usage: Usage,
    /// Adding first would pass the rule quota: remove first.
    pub remove_first: bool,
}

pub(super) fn check(
    changes: &[Change],
    observation: &Observation,
    renderer: &dyn Render,
) -> Verdict {
    let limits = &observation.limits;
    let (owned, foreign): (Vec<&ObservedRule>, Vec<&ObservedRule>) =
        observation.rules.iter().partition(|r| r.owned);
    let mut error = changes
        .iter()
        .filter(|c| matches!(c.action, Action::Add | Action::Update))
        .find_map(|c| limits.check_rule(&c.rule))
        .map(|message| PlanError::RuleShape { message });
    let after: Vec<&Rule> = changes
        .iter()
        .filter(|c| {
            matches!(
                c.action,
                Action::Add | Action::Update | Action::Unchanged | Action::Keep
            )
        })
        .map(|c| &c.rule)
        .collect();
    let families: Vec<Option<IpFamily>> = if limits.rules_counted_per_family {
        vec![Some(IpFamily::V4), Some(IpFamily::V6)]
    } else {
        vec![None]
    };
    let in_family = |r: &Rule, f: Option<IpFamily>| f.is_none_or(|f| r.content.family == f);
    let mut remove_first = false;
    let mut headroom: Option<usize> = None;
    let mut by_family = Vec::new();
    if let Some(limit) = limits.max_rules {
        for fam in families {
            let ours = after.iter().filter(|r| in_family(r, fam)).count();
            let theirs = foreign.iter().filter(|r| in_family(&r.rule, fam)).count();
            let room = limit.saturating_sub(ours + theirs);
            headroom = Some(headroom.map_or(room, |h| h.min(room)));
            if let Some(family) = fam {
                by_family.push(FamilyUsage {
                    family,
                    ours,
                    foreign: theirs,
                    limit,
                    headroom: room,
                });
            }
            if ours + theirs > limit && error.is_none() {
                error = Some(PlanError::RuleQuota {
                    family: fam,
                    ours,
                    foreign: theirs,
                    limit,
                    reason: limits.max_rules_reason.clone(),
                });
            }
            let now = owned.iter().filter(|r| in_family(&r.rule, fam)).count();
            let adds = changes
                .iter()
                .filter(|c| c.action == Action::Add && in_family(&c.rule, fam))
                .count();
            let removes = changes
                .iter()
                .filter(|c| c.action == Action::Remove && in_family(&c.rule, fam))
                .count();
            if now + adds + theirs > limit && removes > 0 {
                remove_first = true;
            }
        }
    }
    if let Some(limit) = limits.max_total_sources {
        let ours: usize = after.iter().map(|r| r.content.sources.len()).sum();
        let theirs: usize = foreign.iter().map(|r| r.rule.content.sources.len()).sum();
        if ours + theirs > limit && error.is_none() {
            error = Some(PlanError::SourceQuota {
                ours,
                foreign: theirs,
                limit,
            });
        }
    }
    if let Some(limit) = limits.max_total_destinations {
        let ours: usize = after.iter().map(|r| renderer.destinations(r)).sum();
        let theirs: usize = foreign.iter().map(|r| renderer.destinations(&r.rule)).sum();
        if ours + theirs > limit && error.is_none() {
            error = Some(PlanError::DestinationQuota {
                ours,
                foreign: theirs,
                limit,
            });
        }
    }
    Verdict {
        error,
        usage: Usage {
            ours: after.len(),
            foreign: foreign.len(),
            limit: limits.max_rules,
            headroom,
            families: by_family,
        },
        remove_first,
    }
}

//! Ordering: what each change says about why it happens, the order the changes are listed
//! and carried out in, and the priorities new rules take where the cloud orders rules by
//! priority. Executors follow this order and these priorities; they choose nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Action, Change, PlanError, shadow};
use crate::desired::Desired;
use crate::node::PoolName;
use crate::rule::PriorityRange;
use crate::service::ServiceRef;
use crate::target::{Observation, ObservedRule};

/// A removal because the policy closed a Service says so: it is not a silent removal.
pub(super) fn note_closed(changes: &mut [Change], closed: &BTreeMap<ServiceRef, Arc<str>>) {
    if closed.is_empty() {
        return;
    }
    for c in changes
        .iter_mut()
        .filter(|c| matches!(c.action, Action::Remove | Action::Update))
    {
        let was = match c.action {
            Action::Remove => Some(&c.rule),
            _ => c.previous.as_ref(),
        };
        let why: Vec<String> = was
            .into_iter()
            .flat_map(|r| r.services.iter())
            .filter(|s| !(c.action == Action::Update && c.rule.services.contains(*s)))
            .filter_map(|s| closed.get(s).map(|why| format!("{s}: {why}")))
            .collect();
        if !why.is_empty() && c.note.is_none() {
            c.note = Some(format!("closed: {}", why.join("; ")));
        }
    }
}

/// A removal of a rule that serves none of the target's pools says why no pool wants it
/// here any more: the pool is unmanaged, gone, or maps to other targets now.
pub(super) fn note_orphans(
    changes: &mut [Change],
    pools: &BTreeSet<PoolName>,
    desired: &Desired,
    failed_pools: &BTreeSet<&PoolName>,
) {
    for c in changes
        .iter_mut()
        .filter(|c| c.action == Action::Remove && c.note.is_none())
        .filter(|c| !c.rule.pools.iter().any(|p| pools.contains(p)))
    {
        let why: Vec<String> = c
            .rule
            .pools
            .iter()
            .map(|p| match desired.pools.get(p) {
                None => format!("pool {p} is gone (no Nodes, not in the config)"),
                Some(s) if !s.managed => format!("pool {p} is unmanaged"),
                Some(_) if failed_pools.contains(p) => format!("pool {p} could not be resolved"),
                Some(_) => format!("pool {p} now maps to other targets"),
            })
            .collect();
        if !why.is_empty() {
            c.note = Some(format!("orphan: {}", why.join("; ")));
        } else if pools.is_empty() {
            c.note = Some("orphan: no managed pool maps to this target".to_string());
        }
    }
}

/// Removes, updates, adds, then the rest; each group by content. One sort: changes are
/// large to move.
pub(super) fn sort(changes: &mut [Change]) {
    let rank = |a: Action| match a {
        Action::Remove => 0u8,
        Action::Update => 1,
        Action::Add => 2,
        other => 3 + other as u8,
    };
    changes.sort_unstable_by(|a, b| {
        (rank(a.action), &a.rule.content, &a.rule.name, &a.id).cmp(&(
            rank(b.action),
            &b.rule.content,
            &b.rule.name,
            &b.id,
        ))
    });
}

/// The priority a rule must come before, and the Deny that sets it.
type Deadline<'a> = (Option<u32>, &'a ObservedRule);

/// Gives every rule that needs a priority (an add, or a rule of ours moved before a Deny:
/// an update with none) the lowest priorities of `range` that no rule holds when it is
/// written. Rules that must come before a Deny ([`shadow::deadline`]) take the lowest
/// first, earliest deadline first, so that every rule that can be in force is. Adds are
/// written before removes, so the priorities of removed rules are free only when the plan
/// removes first; when the rules do not fit otherwise, this makes the plan remove first.
/// An error when they do not fit even so, or when one can come before its Deny at no
/// priority of the range.
pub(super) fn place(
    changes: &mut [Change],
    observation: &Observation,
    range: PriorityRange,
    remove_first: &mut bool,
) -> Option<PlanError> {
    let needs_slot = |c: &Change| {
        c.action == Action::Add || (c.action == Action::Update && c.priority.is_none())
    };
    let adds = changes.iter().filter(|c| needs_slot(c)).count();
    if adds == 0 {
        return None;
    }
    let removed: BTreeSet<&str> = changes
        .iter()
        .filter(|c| c.action == Action::Remove)
        .filter_map(|c| c.id.as_deref())
        .collect();
    let held = |after_removes: bool| -> BTreeSet<u32> {
        observation
            .rules
            .iter()
            .filter(|r| {
                !(after_removes && r.owned && r.id.as_deref().is_some_and(|i| removed.contains(i)))
            })
            .filter_map(|r| r.priority)
            .chain(observation.reserved_priorities.iter().copied())
            .collect()
    };
    let free = |held: &BTreeSet<u32>| -> Vec<u32> {
        (range.from..=range.to)
            .filter(|p| !held.contains(p))
            .take(adds)
            .collect()
    };
    let mut slots = free(&held(*remove_first));
    if slots.len() < adds && !*remove_first && !removed.is_empty() {
        let after = free(&held(true));
        if after.len() > slots.len() {
            *remove_first = true;
            slots = after;
        }
    }
    if slots.len() < adds {
        return Some(PlanError::Priorities {
            adds,
            free: slots.len(),
            from: range.from,
            to: range.to,
        });
    }
    let denies = shadow::denies(observation);
    let limits = &observation.limits;
    // Earliest deadline first; the rest keep their listed order (the sort is stable).
    let mut order: Vec<(usize, Option<Deadline<'_>>)> = changes
        .iter()
        .enumerate()
        .filter(|(_, c)| needs_slot(c))
        .map(|(i, c)| (i, shadow::deadline(&denies, &c.rule.content)))
        .collect();
    order.sort_by_key(|(_, d)| match d {
        Some((p, _)) => (0u8, p.unwrap_or(0)),
        None => (1, 0),
    });
    let best = slots.first().copied().unwrap_or(range.from);
    for ((i, deadline), p) in order.into_iter().zip(slots) {
        if let Some((at, deny)) = deadline
            && !shadow::wins(p, at, limits)
        {
            return Some(PlanError::Shadowed {
                rule: shadow::rule_label(&changes[i]),
                deny: shadow::label(deny),
                priority: at.unwrap_or(0),
                best,
            });
        }
        let c = &mut changes[i];
        c.priority = Some(p);
        if let Some((at, deny)) = deadline
            && c.note.is_none()
        {
            c.note = Some(format!(
                "placed before the Deny rule {} at priority {}",
                shadow::label(deny),
                at.unwrap_or(0)
            ));
        }
    }
    None
}

//! Ordering: what each change says about why it happens, the order the changes are listed
//! and carried out in, and the priorities new rules take where the cloud orders rules by
//! priority. Executors follow this order and these priorities; they choose nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Action, Change, PlanError};
use crate::rule::PriorityRange;
use crate::service::ServiceRef;
use crate::target::Observation;

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

/// Gives every add the lowest priority of `range` that no rule holds when it is written,
/// in the order the adds are listed. Adds are written before removes, so the priorities of
/// removed rules are free only when the plan removes first; when the adds do not fit
/// otherwise, this makes the plan remove first. An error when they do not fit even so.
pub(super) fn place(
    changes: &mut [Change],
    observation: &Observation,
    range: PriorityRange,
    remove_first: &mut bool,
) -> Option<PlanError> {
    let adds = changes.iter().filter(|c| c.action == Action::Add).count();
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
    for (c, p) in changes
        .iter_mut()
        .filter(|c| c.action == Action::Add)
        .zip(slots)
    {
        c.priority = Some(p);
    }
    None
}

//! The ownership guard: checked once, here, before any provider writes a target's plan.
//!
//! A plan may come from a file (`apply FILE`) or be stale; the guard compares its writes with
//! the observation of the target it was planned from, which the engine holds. A remove or
//! update must name a rule that was observed and is ours; an add must not take the name of
//! any rule on the target. Nothing is written when one fails (design principle 4).

use std::collections::BTreeMap;

use nodeport_firewall_model::{Action, Observation, TargetPlan};

use crate::{Error, ErrorKind, Result};

/// Checks `plan`'s writes against `observation`, the read it was planned from.
pub fn check(plan: &TargetPlan, observation: &Observation) -> Result<()> {
    let by_id: BTreeMap<&str, bool> = observation
        .rules
        .iter()
        .filter_map(|r| r.id.as_deref().map(|id| (id, r.owned)))
        .collect();
    for c in plan
        .changes
        .iter()
        .filter(|c| matches!(c.action, Action::Remove | Action::Update))
    {
        let Some(id) = c.id.as_deref() else {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "a {:?} on {} without the id of the rule it changes",
                    c.action, plan.target
                ),
            ));
        };
        match by_id.get(id) {
            Some(true) => {}
            Some(false) => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!(
                        "rule {id} on {} does not carry this cluster's ownership marker; refusing to change it",
                        plan.target
                    ),
                ));
            }
            None => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "rule {id} on {} was not in the observation the plan was made from; plan again",
                        plan.target
                    ),
                ));
            }
        }
    }
    for name in plan.of(Action::Add).filter_map(|c| c.rule.name.as_deref()) {
        let taken = observation
            .rules
            .iter()
            .any(|r| r.rule.name.as_deref() == Some(name) || r.id.as_deref() == Some(name))
            || observation.reserved_names.contains(name);
        if taken {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "a rule named {name} already exists on {}; not overwriting it (the next plan decides)",
                    plan.target
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use nodeport_firewall_model::plan::Usage;
    use nodeport_firewall_model::{
        Change, IpFamily, ObservedRule, Protocol, Rule, RuleContent, Target,
    };

    use super::*;

    fn rule(name: Option<&str>) -> Rule {
        Rule {
            name: name.map(str::to_string),
            content: RuleContent {
                scope: None,
                family: IpFamily::V4,
                protocol: Protocol::Tcp,
                ports: vec![nodeport_firewall_model::PortRange::single(30080)],
                sources: vec!["10.0.0.0/8".parse().unwrap()],
            },
            services: Default::default(),
            pools: Default::default(),
        }
    }

    fn plan(action: Action, id: Option<&str>, name: Option<&str>) -> TargetPlan {
        TargetPlan {
            target: Target::new("memory", "t"),
            pools: Default::default(),
            changes: vec![Change {
                action,
                rule: rule(name),
                id: id.map(str::to_string),
                previous: None,
                note: None,
                priority: None,
                payload: None,
            }],
            error: None,
            remove_first: false,
            usage: Usage::default(),
            manual: None,
            resolved: Vec::new(),
            observed: None,
        }
    }

    #[test]
    fn only_observed_rules_of_ours_are_changed_and_no_name_is_taken() {
        let mut observation = Observation::new(
            vec![
                ObservedRule::new(Some("ours".into()), rule(Some("ours")), true),
                ObservedRule::new(Some("theirs".into()), rule(Some("theirs")), false),
            ],
            Default::default(),
        );
        observation.reserved_names.insert("outbound".into());
        let cases = [
            (Action::Remove, Some("ours"), None, None),
            (Action::Update, Some("ours"), None, None),
            (Action::Add, None, Some("new"), None),
            (
                Action::Remove,
                Some("theirs"),
                None,
                Some(ErrorKind::Invalid),
            ),
            (
                Action::Update,
                Some("theirs"),
                None,
                Some(ErrorKind::Invalid),
            ),
            (
                Action::Remove,
                Some("gone"),
                None,
                Some(ErrorKind::Conflict),
            ),
            (Action::Remove, None, None, Some(ErrorKind::Invalid)),
            (Action::Add, None, Some("theirs"), Some(ErrorKind::Conflict)),
            (
                Action::Add,
                None,
                Some("outbound"),
                Some(ErrorKind::Conflict),
            ),
        ];
        for (action, id, name, want) in cases {
            let got = check(&plan(action, id, name), &observation)
                .err()
                .map(|e| e.kind);
            assert_eq!(got, want, "{action:?} {id:?} {name:?}");
        }
    }
}

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A pool spread over several targets (AWS: several security groups on its nodes), on
//! random Services and quotas: each rule is on exactly one target, no target passes its
//! quota, an applied plan plans nothing more, and adding a Service moves no rule.

use std::collections::{BTreeMap, BTreeSet};

use nodeport_firewall_model::plan::PoolResolution;
use nodeport_firewall_model::{
    Action, Config, Limits, NodeSpec, Observation, ObservedRule, Plan, PlanError, PoolName,
    PoolTarget, RuleContent, ServiceSpec, ShapeRenderer, Target, desired, plan,
};
use proptest::prelude::*;

const SOURCES: [&str; 6] = [
    "10.0.0.1/32",
    "10.0.0.2/32",
    "10.0.0.3/32",
    "192.0.2.0/24",
    "2001:db8::1/128",
    "2001:db8::2/128",
];

#[derive(Debug, Clone)]
struct World {
    /// (node port, source index) per Service.
    services: Vec<(u16, usize)>,
    extra: (u16, usize),
    members: usize,
    quota: usize,
    /// Rules of others on each member.
    foreign: Vec<usize>,
}

fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec((30000u16..30040, 0..SOURCES.len()), 0..30),
        (30000u16..30040, 0..SOURCES.len()),
        1usize..5,
        2usize..12,
        prop::collection::vec(0usize..3, 5),
    )
        .prop_map(|(services, extra, members, quota, foreign)| World {
            services,
            extra,
            members,
            quota,
            foreign,
        })
}

fn services(list: &[(u16, usize)]) -> Vec<ServiceSpec> {
    list.iter()
        .enumerate()
        .map(|(i, (port, source))| {
            ServiceSpec::nodeport("shop", &format!("s{i:02}"))
                .with_port("", "TCP", 80, i32::from(*port))
                .enabled()
                .with_ranges(SOURCES[*source])
        })
        .collect()
}

fn limits(quota: usize) -> Limits {
    Limits {
        max_rules: Some(quota),
        rules_counted_per_family: true,
        max_ports_per_rule: 1,
        max_sources_per_rule: 1,
        ..Limits::default()
    }
}

fn member(i: usize) -> Target {
    Target::new("test", &format!("sg-{i}"))
}

fn foreign_rule(member: usize, n: usize) -> ObservedRule {
    ObservedRule::new(
        Some(format!("f{member}-{n}")),
        nodeport_firewall_model::Rule {
            name: None,
            content: RuleContent {
                scope: None,
                family: nodeport_firewall_model::IpFamily::V4,
                protocol: nodeport_firewall_model::Protocol::Udp,
                ports: vec![nodeport_firewall_model::PortRange::single(22)],
                sources: vec!["198.51.100.0/24".parse().unwrap()],
            },
            services: Default::default(),
            pools: Default::default(),
        },
        false,
    )
}

/// The cloud: each member's rules.
type Cloud = BTreeMap<Target, Vec<ObservedRule>>;

fn plan_on(w: &World, svcs: &[ServiceSpec], cloud: &Cloud) -> Plan {
    let nodes = [NodeSpec::new("n").with_label("nodeport-firewall.io/pool", "a")];
    let d = desired(&Config::new("c"), svcs, &nodes);
    let targets: Vec<PoolTarget> = (0..w.members)
        .map(|i| PoolTarget {
            spread: Some("a".into()),
            ..PoolTarget::new(member(i), None)
        })
        .collect();
    let resolutions: BTreeMap<PoolName, PoolResolution> =
        [(PoolName::new("a"), Ok(targets))].into();
    let observations = cloud
        .iter()
        .map(|(t, rules)| {
            (
                t.clone(),
                Ok(Observation::new(rules.clone(), limits(w.quota))),
            )
        })
        .collect();
    plan(
        &d,
        "test",
        &resolutions,
        &observations,
        &ShapeRenderer::unnamed(),
    )
}

/// Applies `plan` to the cloud, as a provider would.
fn apply(plan: &Plan, cloud: &mut Cloud, next: &mut usize) {
    for tp in plan.targets.iter().filter(|t| t.error.is_none()) {
        let rules = cloud.get_mut(&tp.target).unwrap();
        for c in &tp.changes {
            match c.action {
                Action::Remove => rules.retain(|r| r.id != c.id),
                Action::Update => {
                    let r = rules.iter_mut().find(|r| r.id == c.id).unwrap();
                    r.rule = c.rule.clone();
                }
                Action::Add => {
                    *next += 1;
                    rules.push(ObservedRule::new(
                        Some(format!("o{next}")),
                        c.rule.clone(),
                        true,
                    ));
                }
                _ => {}
            }
        }
    }
}

fn placement(cloud: &Cloud) -> BTreeMap<RuleContent, Vec<Target>> {
    let mut out: BTreeMap<RuleContent, Vec<Target>> = BTreeMap::new();
    for (t, rules) in cloud {
        for r in rules.iter().filter(|r| r.owned) {
            out.entry(r.rule.content.clone())
                .or_default()
                .push(t.clone());
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn rules_spread_without_moving(w in world()) {
        let mut cloud: Cloud = (0..w.members)
            .map(|i| (member(i), (0..w.foreign[i]).map(|n| foreign_rule(i, n)).collect()))
            .collect();
        let mut next = 0;
        let svcs = services(&w.services);
        let first = plan_on(&w, &svcs, &cloud);
        let capacity = |fam_v6: bool| -> usize {
            (0..w.members)
                .map(|i| w.quota.saturating_sub(if fam_v6 { 0 } else { w.foreign[i] }))
                .sum()
        };
        let errors: Vec<&PlanError> = first.targets.iter().filter_map(|t| t.error.as_ref()).collect();
        if let Some(e) = errors.first() {
            // Refused only when the rules really do not fit: the whole group, with the
            // capacity error.
            prop_assert!(matches!(e, PlanError::Capacity { .. }), "{e:?}");
            prop_assert_eq!(errors.len(), w.members);
            let wanted: BTreeSet<(u16, usize)> = w.services.iter().copied().collect();
            let v6 = wanted.iter().filter(|(_, s)| *s >= 4).count();
            let v4 = wanted.len() - v6;
            prop_assert!(v4 > capacity(false) || v6 > capacity(true), "{e}");
            return Ok(());
        }
        apply(&first, &mut cloud, &mut next);
        let where_ = placement(&cloud);
        prop_assert!(where_.values().all(|t| t.len() == 1), "a rule on two targets: {where_:#?}");
        for (t, rules) in &cloud {
            for v6 in [false, true] {
                let n = rules.iter().filter(|r| (r.rule.content.family == nodeport_firewall_model::IpFamily::V6) == v6).count();
                prop_assert!(n <= w.quota, "{t} holds {n} > {}", w.quota);
            }
        }
        let again = plan_on(&w, &svcs, &cloud);
        prop_assert!(!again.has_changes(), "{:#?}", again.targets);

        // One more Service: no rule that stays wanted changes target.
        let mut more = w.services.clone();
        more.push(w.extra);
        let next_plan = plan_on(&w, &services(&more), &cloud);
        if next_plan.targets.iter().any(|t| t.error.is_some()) {
            return Ok(());
        }
        apply(&next_plan, &mut cloud, &mut next);
        let after = placement(&cloud);
        for (content, targets) in &where_ {
            if let Some(now) = after.get(content) {
                prop_assert_eq!(now, targets, "{:?} moved", content);
            }
        }
    }
}

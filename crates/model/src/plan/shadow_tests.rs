//! The planner against rules evaluated in priority order: foreign Allows behind a Deny,
//! rules of ours that must come before one, rules to write again, and orphans.

use super::*;
use crate::config::Config;
use crate::desired::desired;
use crate::node::NodeSpec;
use crate::render::ShapeRenderer;
use crate::rule::{PortRange, PriorityRange, Protocol, RuleContent};
use crate::service::{ServiceRef, ServiceSpec};
use crate::target::Denial;
use crate::{IpFamily, Limits};

const POOL_LABEL: &str = "eks.amazonaws.com/nodegroup";

fn web() -> Vec<ServiceSpec> {
    vec![
        ServiceSpec::nodeport("shop", "web")
            .with_port("", "TCP", 80, 30080)
            .enabled()
            .with_ranges("10.0.0.0/8"),
    ]
}

/// The rule `web` wants.
fn web_content() -> RuleContent {
    RuleContent {
        scope: None,
        family: IpFamily::V4,
        protocol: Protocol::Tcp,
        ports: vec![PortRange::single(30080)],
        sources: vec!["10.0.0.0/8".parse().unwrap()],
    }
}

fn allow(id: &str, priority: u32, owned: bool) -> ObservedRule {
    let mut r = ObservedRule::new(
        Some(id.into()),
        Rule {
            name: Some(id.into()),
            content: web_content(),
            services: if owned {
                [ServiceRef::new("shop", "web")].into_iter().collect()
            } else {
                Default::default()
            },
            pools: if owned {
                [PoolName::new("a")].into_iter().collect()
            } else {
                Default::default()
            },
        },
        owned,
    );
    r.priority = Some(priority);
    r
}

fn deny(id: &str, priority: u32, denial: Denial) -> ObservedRule {
    let mut r = ObservedRule::new(
        Some(id.into()),
        Rule {
            name: Some(id.into()),
            content: RuleContent {
                sources: Vec::new(),
                ..web_content()
            },
            services: Default::default(),
            pools: Default::default(),
        },
        false,
    );
    r.priority = Some(priority);
    r.deny = Some(denial);
    r
}

/// Every packet.
fn everything() -> Denial {
    Denial::default()
}

/// An Azure-like target: our band is 100-199.
fn banded() -> Limits {
    Limits {
        priorities: Some(PriorityRange { from: 100, to: 199 }),
        updates_in_place: true,
        max_ports_per_rule: 100,
        max_sources_per_rule: 100,
        ..Limits::default()
    }
}

/// A GCP-like target: our rules all take priority 1000, and a Deny wins a tie.
fn fixed() -> Limits {
    Limits {
        own_priority: Some(1000),
        deny_wins_ties: true,
        updates_in_place: true,
        max_ports_per_rule: 100,
        max_sources_per_rule: 100,
        ..Limits::default()
    }
}

fn resolutions() -> BTreeMap<PoolName, PoolResolution> {
    [(
        PoolName::new("a"),
        Ok(vec![PoolTarget::new(Target::new("test", "t"), None)]),
    )]
    .into()
}

fn plan_on(config: &Config, nodes: &[NodeSpec], rules: Vec<ObservedRule>, limits: Limits) -> Plan {
    let d = desired(config, &web(), nodes);
    let observations = [(
        Target::new("test", "t"),
        Ok(Observation::new(rules, limits)),
    )]
    .into();
    let resolutions = if d.pools.get(&PoolName::new("a")).is_some_and(|p| p.managed) {
        resolutions()
    } else {
        BTreeMap::new()
    };
    plan(
        &d,
        "test",
        &resolutions,
        &observations,
        &ShapeRenderer::unnamed(),
    )
}

fn one(config: &Config, rules: Vec<ObservedRule>, limits: Limits) -> TargetPlan {
    let nodes = [NodeSpec::new("a1").with_label(POOL_LABEL, "a")];
    plan_on(config, &nodes, rules, limits)
        .targets
        .into_iter()
        .next()
        .unwrap()
}

#[test]
fn a_foreign_allow_satisfies_only_when_no_deny_comes_before_it() {
    let c = Config::new("c");
    // (rules, limits, satisfied?)
    let cases: Vec<(&str, Vec<ObservedRule>, Limits, bool)> = vec![
        ("alone", vec![allow("f", 150, false)], banded(), true),
        (
            "deny for everything before it",
            vec![allow("f", 150, false), deny("d", 120, everything())],
            banded(),
            false,
        ),
        (
            "deny after it",
            vec![allow("f", 150, false), deny("d", 180, everything())],
            banded(),
            true,
        ),
        (
            "deny for another port",
            vec![
                allow("f", 150, false),
                deny(
                    "d",
                    120,
                    Denial {
                        ports: vec![PortRange::single(22)],
                        ..everything()
                    },
                ),
            ],
            banded(),
            true,
        ),
        (
            "deny for another protocol",
            vec![
                allow("f", 150, false),
                deny(
                    "d",
                    120,
                    Denial {
                        protocol: Some(Protocol::Udp),
                        ..everything()
                    },
                ),
            ],
            banded(),
            true,
        ),
        (
            "deny for part of the sources",
            vec![
                allow("f", 150, false),
                deny(
                    "d",
                    120,
                    Denial {
                        sources: vec!["10.1.0.0/16".parse().unwrap()],
                        ..everything()
                    },
                ),
            ],
            banded(),
            false,
        ),
        (
            "deny for other sources",
            vec![
                allow("f", 150, false),
                deny(
                    "d",
                    120,
                    Denial {
                        sources: vec!["192.0.2.0/24".parse().unwrap()],
                        ..everything()
                    },
                ),
            ],
            banded(),
            true,
        ),
        (
            "deny at the same priority wins on GCP",
            vec![allow("f", 900, false), deny("d", 900, everything())],
            fixed(),
            false,
        ),
        (
            "one of two allows is in force",
            vec![
                allow("f1", 950, false),
                deny("d", 800, everything()),
                allow("f2", 700, false),
            ],
            fixed(),
            true,
        ),
    ];
    for (name, rules, limits, satisfied) in cases {
        let p = one(&c, rules, limits);
        assert_eq!(
            p.count(Action::SatisfiedByForeign) == 1,
            satisfied,
            "{name}: {:#?}",
            p.changes
        );
        if !satisfied {
            let add = p.of(Action::Add).next();
            assert!(
                add.is_some_and(|a| a.note.as_deref().is_some_and(|n| n.contains("Deny rule d"))),
                "{name}: the add says why: {:#?}",
                p.changes
            );
        }
    }
}

#[test]
fn a_rule_of_ours_is_placed_before_the_deny_that_would_shadow_it() {
    let c = Config::new("c");
    // The band's first priorities are taken; the Deny sits at 105.
    let mut rules: Vec<ObservedRule> = (100..103)
        .map(|p| {
            let mut r = deny(
                &format!("x{p}"),
                p,
                Denial {
                    ports: vec![PortRange::single(22)],
                    ..everything()
                },
            );
            r.deny = Some(Denial {
                ports: vec![PortRange::single(22)],
                ..everything()
            });
            r
        })
        .collect();
    rules.push(allow("f", 150, false));
    rules.push(deny("d", 105, everything()));
    let p = one(&c, rules, banded());
    assert_eq!(p.error, None, "{:#?}", p);
    let add: Vec<_> = p.of(Action::Add).collect();
    assert_eq!(add.len(), 1, "{:#?}", p.changes);
    assert_eq!(add[0].priority, Some(103));

    // No free priority before the Deny: an error naming it, before any write.
    let rules: Vec<ObservedRule> = (100..105)
        .map(|p| {
            deny(
                &format!("x{p}"),
                p,
                Denial {
                    ports: vec![PortRange::single(22)],
                    ..everything()
                },
            )
        })
        .chain([deny("catch-all", 105, everything())])
        .collect();
    let p = one(&c, rules, banded());
    match &p.error {
        Some(PlanError::Shadowed {
            deny,
            priority,
            best,
            ..
        }) => {
            assert_eq!((deny.as_str(), *priority, *best), ("catch-all", 105, 106));
        }
        other => panic!("expected Shadowed, got {other:?}"),
    }
    assert!(p.error.as_ref().unwrap().to_string().contains("catch-all"));
}

#[test]
fn a_rule_of_ours_behind_a_deny_moves_before_it() {
    let c = Config::new("c");
    let p = one(
        &c,
        vec![allow("ours", 150, true), deny("d", 120, everything())],
        banded(),
    );
    let moved: Vec<_> = p.of(Action::Update).collect();
    assert_eq!(moved.len(), 1, "{:#?}", p.changes);
    assert_eq!(moved[0].priority, Some(100));
    assert!(
        moved[0]
            .note
            .as_deref()
            .unwrap()
            .contains("moved before the Deny rule d")
    );

    // With one fixed priority (GCP) it cannot move: the plan says so.
    let p = one(
        &c,
        vec![allow("ours", 1000, true), deny("d", 900, everything())],
        fixed(),
    );
    assert!(
        matches!(&p.error, Some(PlanError::Shadowed { deny, best: 1000, .. }) if deny == "d"),
        "{:?}",
        p.error
    );
    // A Deny after our priority is harmless.
    let p = one(
        &c,
        vec![allow("ours", 1000, true), deny("d", 1001, everything())],
        fixed(),
    );
    assert_eq!((p.error.clone(), p.has_writes()), (None, false), "{p:#?}");
}

#[test]
fn a_rule_of_ours_not_in_force_as_written_is_written_again() {
    let c = Config::new("c");
    let mut broken = allow("ours", 150, true);
    broken.needs_rewrite = Some("provisioningState is Failed".into());
    let p = one(&c, vec![broken], banded());
    let updates: Vec<_> = p.of(Action::Update).collect();
    assert_eq!(updates.len(), 1, "{:#?}", p.changes);
    assert_eq!(updates[0].priority, Some(150), "it keeps its priority");
    assert!(updates[0].note.as_deref().unwrap().contains("Failed"));

    let p = one(&c, vec![allow("ours", 150, true)], banded());
    assert!(!p.has_writes(), "{:#?}", p.changes);
}

#[test]
fn rules_of_ours_that_no_pool_maps_to_any_more_are_orphans() {
    let nodes = [NodeSpec::new("a1").with_label(POOL_LABEL, "a")];
    let ours = vec![allow("ours", 150, true)];

    let mut unmanaged = Config::new("c");
    unmanaged.pools.insert(
        PoolName::new("a"),
        crate::config::PoolConfig {
            managed: Some(false),
            ..Default::default()
        },
    );
    // The pool is gone: no Nodes carry it, and the config does not list it.
    let plain = Config::new("c");
    let cases: Vec<(&str, &Config, &[NodeSpec], &str)> = vec![
        ("unmanaged", &unmanaged, &nodes, "pool a is unmanaged"),
        ("gone", &plain, &[], "pool a is gone"),
    ];
    for (name, config, nodes, why) in cases {
        let p = plan_on(config, nodes, ours.clone(), banded());
        let t = &p.targets[0];
        assert!(t.pools.is_empty(), "{name}");
        let removed: Vec<_> = t.of(Action::Remove).collect();
        assert_eq!(removed.len(), 1, "{name}: {:#?}", t.changes);
        assert!(
            removed[0].note.as_deref().is_some_and(|n| n.contains(why)),
            "{name}: {:?}",
            removed[0].note
        );
        assert!(p.has_changes(), "{name}");
    }

    // A foreign rule on an orphan target is never touched.
    let p = plan_on(
        &Config::new("c"),
        &[],
        vec![allow("f", 150, false)],
        banded(),
    );
    assert!(!p.has_changes(), "{:#?}", p.targets);
}

#[test]
fn a_listed_pool_without_nodes_keeps_its_rules() {
    let mut listed = Config::new("c");
    listed
        .pools
        .insert(PoolName::new("a"), crate::config::PoolConfig::default());
    let d = desired(&listed, &web(), &[]);
    // Without nodes its target cannot be discovered.
    let resolutions: BTreeMap<PoolName, PoolResolution> = [(
        PoolName::new("a"),
        Err(crate::Failure::new(crate::ErrorKind::Discovery, "no nodes")),
    )]
    .into();
    let observations = [(
        Target::new("test", "t"),
        Ok(Observation::new(vec![allow("ours", 150, true)], banded())),
    )]
    .into();
    let p = plan(
        &d,
        "test",
        &resolutions,
        &observations,
        &ShapeRenderer::unnamed(),
    );
    assert!(!p.has_changes(), "{:#?}", p.targets);
    assert_eq!(p.targets[0].count(Action::Keep), 1);
    assert_eq!(p.summary.errors, 0, "scaling to zero is not an error");
}

#[test]
fn two_pools_on_one_target_and_a_forgeable_pool_label_are_warnings() {
    let nodes = [
        NodeSpec::new("a1").with_label(POOL_LABEL, "a"),
        NodeSpec::new("b1").with_label(crate::config::RESTRICTED_POOL_LABEL, "b"),
    ];
    let d = desired(&Config::new("c"), &web(), &nodes);
    let t = || Ok(vec![PoolTarget::new(Target::new("test", "t"), None)]);
    let resolutions: BTreeMap<PoolName, PoolResolution> =
        [(PoolName::new("a"), t()), (PoolName::new("b"), t())].into();
    let observations = [(
        Target::new("test", "t"),
        Ok(Observation::new(vec![], banded())),
    )]
    .into();
    let p = plan(
        &d,
        "test",
        &resolutions,
        &observations,
        &ShapeRenderer::unnamed(),
    );
    let kinds: Vec<_> = p
        .warnings
        .iter()
        .map(|w| (w.kind, w.message.clone()))
        .collect();
    let shared = kinds
        .iter()
        .find(|(k, _)| *k == crate::WarningKind::SharedTarget)
        .unwrap_or_else(|| panic!("{kinds:#?}"));
    assert!(shared.1.contains("pools a, b"), "{}", shared.1);
    let forged = kinds
        .iter()
        .find(|(k, _)| *k == crate::WarningKind::KubeletSetPoolLabel)
        .unwrap_or_else(|| panic!("{kinds:#?}"));
    assert!(
        forged.1.contains("a (eks.amazonaws.com/nodegroup)"),
        "{}",
        forged.1
    );
    assert!(
        !forged.1.contains("b ("),
        "the restricted label is not forgeable: {}",
        forged.1
    );
}

#[test]
fn which_labels_a_kubelet_may_set() {
    let cases = [
        (
            "node-restriction.kubernetes.io/nodeport-firewall-pool",
            false,
        ),
        ("example.node-restriction.kubernetes.io/pool", false),
        ("kops.k8s.io/instancegroup", false),
        ("kubernetes.io/pool", false),
        ("node.kubernetes.io/pool", true),
        ("topology.kubernetes.io/zone", true),
        ("eks.amazonaws.com/nodegroup", true),
        ("nodeport-firewall.io/pool", true),
        ("kubernetes.azure.com/agentpool", true),
        ("agentpool", true),
    ];
    for (key, settable) in cases {
        assert_eq!(crate::node::kubelet_may_set(key), settable, "{key}");
    }
}

#[test]
fn what_providers_say_about_a_read_is_one_warning_per_message() {
    let d = desired(
        &Config::new("c"),
        &web(),
        &[NodeSpec::new("a1").with_label(POOL_LABEL, "a")],
    );
    let said = |id: &str| {
        let mut o = Observation::new(vec![], banded());
        o.warnings = vec!["quota unknown: using 60".into()];
        (Target::new("test", id), Ok(o))
    };
    let observations = [said("t"), said("u")].into();
    let p = plan(
        &d,
        "test",
        &resolutions(),
        &observations,
        &ShapeRenderer::unnamed(),
    );
    let provider: Vec<_> = p
        .warnings
        .iter()
        .filter(|w| w.kind == crate::WarningKind::Provider)
        .map(|w| w.message.as_str())
        .collect();
    assert_eq!(provider, ["quota unknown: using 60"]);
}

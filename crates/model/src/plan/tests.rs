//! The planner's decisions about markers that hold a digest, and about priorities.

use super::*;
use crate::config::Config;
use crate::desired::desired;
use crate::node::NodeSpec;
use crate::render::{RenderContext, ShapeRenderer};
use crate::rule::PriorityRange;
use crate::rule::RuleContent;
use crate::service::ServiceSpec;
use crate::target::MarkerDigest;
use crate::{Grant, Limits};

const POOL_LABEL: &str = "eks.amazonaws.com/nodegroup";

/// A provider whose marker holds only a digest of the Services once there are more than
/// `fits` of them, as Azure's 140-character description does.
struct Digesting {
    shape: ShapeRenderer,
    fits: usize,
}

impl Render for Digesting {
    fn render(&self, ctx: &RenderContext<'_>, grants: &[&Grant]) -> Vec<Rule> {
        self.shape.render(ctx, grants)
    }
    fn marker_digest(&self, cluster: &str, rule: &Rule) -> Option<String> {
        (rule.services.len() > self.fits).then(|| format!("{cluster}:{}", rule.services_text()))
    }
}

fn renderer() -> Digesting {
    Digesting {
        shape: ShapeRenderer::unnamed(),
        fits: 2,
    }
}

fn services(n: usize) -> Vec<ServiceSpec> {
    (0..n)
        .map(|i| {
            ServiceSpec::nodeport("shop", &format!("s{i:03}"))
                .with_port("", "TCP", 80, 30000 + 2 * i as i32)
                .enabled()
                .with_ranges("10.0.0.0/8")
        })
        .collect()
}

fn nodes() -> Vec<NodeSpec> {
    vec![NodeSpec::new("a1").with_label(POOL_LABEL, "a")]
}

fn target() -> Target {
    Target::new("test", "t")
}

fn resolutions() -> BTreeMap<PoolName, PoolResolution> {
    [(
        PoolName::new("a"),
        Ok(vec![PoolTarget {
            target: target(),
            scope: None,
            payload: None,
            spread: None,
        }]),
    )]
    .into()
}

fn plan_with(services: &[ServiceSpec], observation: Observation) -> TargetPlan {
    let d = desired(&Config::new("c"), services, &nodes());
    let observations = [(target(), Ok(observation))].into();
    let p = plan(&d, "test", &resolutions(), &observations, &renderer());
    p.targets.into_iter().next().unwrap()
}

/// What a fresh process reads back after `plan` was applied by a provider whose marker
/// holds only the digest: the rules, with no Services listed.
fn as_observed(plan: &TargetPlan, limits: &Limits) -> Observation {
    let rules = plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Remove)
        .enumerate()
        .map(|(i, c)| {
            let digest = renderer().marker_digest("c", &c.rule);
            let mut rule = c.rule.clone();
            if digest.is_some() {
                rule.services = Default::default();
            }
            ObservedRule {
                digest: digest.map(|value| MarkerDigest {
                    value,
                    pools_listed: true,
                }),
                priority: c.priority,
                ..ObservedRule::new(Some(format!("r{i}")), rule, true)
            }
        })
        .collect();
    Observation::new(rules, limits.clone())
}

fn limits() -> Limits {
    Limits {
        max_ports_per_rule: 1000,
        max_sources_per_rule: 1000,
        ..Limits::default()
    }
}

#[test]
fn a_rule_whose_marker_holds_a_digest_is_recognised_by_rendering() {
    let all = services(150);
    let first = plan_with(&all, Observation::new(Vec::new(), limits()));
    assert_eq!(first.count(Action::Add), 1, "{first:#?}");
    let observed = as_observed(&first, &limits());
    assert!(observed.rules[0].rule.services.is_empty());

    // A fresh process, knowing only what the cloud says, plans nothing.
    let again = plan_with(&all, observed.clone());
    assert!(!again.has_writes(), "{:#?}", again.changes);
    assert_eq!(again.count(Action::Unchanged), 1);
    // The plan still says which Services the rule serves.
    assert_eq!(again.changes[0].rule.services.len(), 150);

    // One Service fewer: the digest differs and the rule is updated.
    let fewer = plan_with(&all[1..], observed);
    assert!(fewer.has_writes(), "{:#?}", fewer.changes);
}

#[test]
fn a_digest_rule_is_kept_whole_while_a_service_it_might_serve_is_invalid() {
    let mut all = services(150);
    let observed = as_observed(
        &plan_with(&all, Observation::new(Vec::new(), limits())),
        &limits(),
    );
    // s007 breaks its annotation: the marker does not say the rule serves it, but the rule
    // opens its node port, so it stays exactly as it is.
    all[7] = all[7].clone().with_ranges("not-a-cidr");
    let p = plan_with(&all, observed.clone());
    let kept: Vec<&Change> = p.of(Action::Keep).collect();
    assert_eq!(kept.len(), 1, "{:#?}", p.changes);
    assert!(
        kept[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("shop/s007") && n.contains("does not list")),
        "{:?}",
        kept[0].note
    );
    assert_eq!(p.count(Action::Remove), 0, "{:#?}", p.changes);
    assert_eq!(p.count(Action::Update), 0, "{:#?}", p.changes);

    // An invalid Service on a port the rule does not open does not pin it.
    let mut other = services(150);
    other.push(
        ServiceSpec::nodeport("shop", "elsewhere")
            .with_port("", "UDP", 53, 31999)
            .enabled()
            .with_ranges("not-a-cidr"),
    );
    let p = plan_with(&other, observed);
    assert_eq!(p.count(Action::Keep), 0, "{:#?}", p.changes);
    assert!(!p.has_writes(), "{:#?}", p.changes);
}

#[test]
fn new_rules_take_the_lowest_free_priorities_and_removes_go_first_to_free_them() {
    let prioritised = Limits {
        priorities: Some(PriorityRange { from: 100, to: 103 }),
        ..Limits::default()
    };
    let foreign = |id: &str, priority: u32, port: u16| ObservedRule {
        priority: Some(priority),
        ..ObservedRule::new(
            Some(id.into()),
            Rule {
                name: None,
                content: RuleContent {
                    scope: None,
                    family: crate::IpFamily::V4,
                    protocol: crate::Protocol::Tcp,
                    ports: vec![crate::PortRange::single(port)],
                    sources: vec!["192.0.2.0/24".parse().unwrap()],
                },
                services: Default::default(),
                pools: Default::default(),
            },
            false,
        )
    };
    let observed = Observation::new(
        vec![foreign("f1", 100, 1), foreign("f2", 102, 2)],
        prioritised.clone(),
    );
    let p = plan_with(&services(2), observed);
    let adds: Vec<Option<u32>> = p.of(Action::Add).map(|c| c.priority).collect();
    assert_eq!(adds, vec![Some(101), Some(103)]);
    assert!(!p.remove_first);
    assert_eq!(p.error, None);

    // All four taken, two by rules of ours that go: they are removed first, and their
    // priorities reused.
    let ours = |id: &str, priority: u32, port: u16| ObservedRule {
        owned: true,
        ..foreign(id, priority, port)
    };
    let full = Observation::new(
        vec![
            foreign("f1", 100, 1),
            ours("o1", 101, 3),
            foreign("f2", 102, 2),
            ours("o2", 103, 4),
        ],
        prioritised.clone(),
    );
    let p = plan_with(&services(2), full);
    assert!(p.remove_first, "{:#?}", p.changes);
    let adds: Vec<Option<u32>> = p.of(Action::Add).map(|c| c.priority).collect();
    assert_eq!(adds, vec![Some(101), Some(103)]);

    // No room at all: an error before any write.
    let crowded = Observation::new(
        (0..4)
            .map(|i| foreign(&format!("f{i}"), 100 + i, i as u16))
            .collect(),
        prioritised,
    );
    let p = plan_with(&services(1), crowded);
    assert!(
        matches!(
            p.error,
            Some(PlanError::Priorities {
                adds: 1,
                free: 0,
                ..
            })
        ),
        "{:?}",
        p.error
    );
}

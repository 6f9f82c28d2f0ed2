#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)]
//! Properties of the planner, checked on random clusters, limits and cloud states.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use nodeport_firewall_model::plan::PoolResolution;
use nodeport_firewall_model::render::NameParts;
use nodeport_firewall_model::{
    Action, Config, Limits, NodeSpec, Observation, ObservedRule, Plan, PoolName, PoolTarget,
    PortMerge, Protocol, Rule, RuleContent, ServiceRef, ServiceSpec, ShapeRenderer, Target,
    desired, plan,
};
use proptest::prelude::*;

const POOLS: [&str; 3] = ["a", "b", "c"];
const RANGES: [&str; 7] = [
    "10.0.0.0/8",
    "10.0.0.0/9",
    "192.0.2.0/24",
    "192.0.3.0/24",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "198.51.100.7/32",
];

#[derive(Debug, Clone)]
struct Scenario {
    before: Vec<ServiceSpec>,
    after: Vec<ServiceSpec>,
    foreign: Vec<Rule>,
    garbage: Vec<Rule>,
    limits: Limits,
    named: bool,
    shared_target: bool,
    scoped: bool,
    merge: PortMerge,
}

fn service_strategy(i: usize) -> impl Strategy<Value = ServiceSpec> {
    (
        prop::collection::vec((prop::bool::ANY, 30000u16..30012), 1..4),
        prop::option::of(prop::sample::subsequence(RANGES.to_vec(), 0..4)),
        prop::option::of(prop::sample::subsequence(POOLS.to_vec(), 1..3)),
        prop::num::u8::ANY,
    )
        .prop_map(move |(ports, ranges, pools, flavour)| {
            let mut s = ServiceSpec::nodeport("ns", &format!("s{i}"));
            for (k, (udp, port)) in ports.iter().enumerate() {
                s = s.with_port(
                    &format!("p{k}"),
                    if *udp { "UDP" } else { "TCP" },
                    1000 + k as i32,
                    i32::from(*port),
                );
            }
            s = match flavour % 10 {
                0 => s, // not opted in
                1 => s.enabled().with_ranges("not-a-cidr"),
                _ => s.enabled(),
            };
            if let Some(r) = ranges
                && !r.is_empty()
            {
                s = s.with_ranges(&r.join(","));
            }
            if let Some(p) = pools {
                s = s.with_annotation("node-pools", &p.join(" "));
            }
            s
        })
}

fn services_strategy() -> impl Strategy<Value = Vec<ServiceSpec>> {
    (0usize..10).prop_flat_map(|n| (0..n).map(service_strategy).collect::<Vec<_>>())
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    (
        prop::bool::ANY,
        30000u16..30012,
        0u16..3,
        prop::sample::select(RANGES.to_vec()),
        prop::option::of(prop::sample::select(POOLS.to_vec())),
    )
        .prop_map(|(udp, from, len, src, scope)| {
            let net: IpNet = src.parse().unwrap();
            Rule {
                name: None,
                content: RuleContent {
                    scope: scope.map(str::to_string),
                    family: nodeport_firewall_model::IpFamily::of(&net),
                    protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                    ports: vec![nodeport_firewall_model::PortRange {
                        from,
                        to: from + len,
                    }],
                    sources: vec![net.trunc()],
                },
                services: [ServiceRef::new("ns", "s1")].into(),
                pools: [PoolName::new("a")].into(),
            }
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        services_strategy(),
        services_strategy(),
        prop::collection::vec(rule_strategy(), 0..4),
        prop::collection::vec(rule_strategy(), 0..3),
        (1usize..4, 1usize..4, prop::bool::ANY),
        (
            prop::bool::ANY,
            prop::bool::ANY,
            prop::bool::ANY,
            prop::bool::ANY,
        ),
    )
        .prop_map(
            |(
                before,
                after,
                foreign,
                garbage,
                (ports, sources, in_place),
                (named, shared, scoped, merge),
            )| {
                Scenario {
                    before,
                    after,
                    foreign,
                    garbage,
                    limits: Limits {
                        max_rules: None,
                        rules_counted_per_family: false,
                        max_ports_per_rule: ports,
                        max_sources_per_rule: sources,
                        max_total_sources: None,
                        max_total_destinations: None,
                        max_rules_reason: None,
                        updates_in_place: in_place && named,
                        priorities: None,
                        own_priority: None,
                        deny_wins_ties: false,
                    },
                    named,
                    shared_target: shared,
                    scoped,
                    merge: if merge {
                        PortMerge::Contiguous
                    } else {
                        PortMerge::None
                    },
                }
            },
        )
}

fn nodes() -> Vec<NodeSpec> {
    POOLS
        .iter()
        .map(|p| NodeSpec::new(&format!("n-{p}")).with_label("karpenter.sh/nodepool", p))
        .collect()
}

fn resolutions(s: &Scenario) -> BTreeMap<PoolName, PoolResolution> {
    POOLS
        .iter()
        .map(|p| {
            let id = if s.shared_target {
                "shared".to_string()
            } else {
                format!("t-{p}")
            };
            let scope = s.scoped.then(|| p.to_string());
            (
                PoolName::new(*p),
                Ok(vec![PoolTarget::new(Target::new("memory", &id), scope)]),
            )
        })
        .collect()
}

fn renderer(s: &Scenario) -> ShapeRenderer {
    if s.named {
        ShapeRenderer::named(|p: &NameParts<'_>| format!("npf-{}", p.short_hash()))
    } else {
        ShapeRenderer::unnamed()
    }
}

/// The cloud, as far as the planner can tell: rules with ids and an owner flag.
#[derive(Debug, Clone, Default)]
struct Cloud {
    targets: BTreeMap<Target, Vec<ObservedRule>>,
    next: usize,
}

impl Cloud {
    fn observe(
        &self,
        s: &Scenario,
    ) -> BTreeMap<Target, Result<Observation, nodeport_firewall_model::Failure>> {
        let mut out = BTreeMap::new();
        for res in resolutions(s).into_values().flatten() {
            for pt in res {
                let rules = self.targets.get(&pt.target).cloned().unwrap_or_default();
                out.insert(pt.target, Ok(Observation::new(rules, s.limits.clone())));
            }
        }
        out
    }

    fn seed(&mut self, target: &Target, rule: Rule, owned: bool) {
        self.next += 1;
        let id = format!("r{}", self.next);
        self.targets
            .entry(target.clone())
            .or_default()
            .push(ObservedRule::new(Some(id), rule, owned));
    }

    /// Applies a plan the way a provider must; fails on anything a cloud would refuse.
    fn apply(&mut self, plan: &Plan) -> Result<(), String> {
        for tp in &plan.targets {
            if tp.error.is_some() {
                continue;
            }
            let rules = self.targets.entry(tp.target.clone()).or_default();
            for c in &tp.changes {
                match c.action {
                    Action::Remove | Action::Update => {
                        let idx = rules
                            .iter()
                            .position(|r| r.id == c.id)
                            .ok_or_else(|| format!("{:?} of unknown rule {:?}", c.action, c.id))?;
                        if !rules[idx].owned {
                            return Err(format!("{:?} of a foreign rule {:?}", c.action, c.id));
                        }
                        if c.action == Action::Remove {
                            rules.remove(idx);
                        } else {
                            rules[idx].rule = c.rule.clone();
                        }
                    }
                    _ => {}
                }
            }
            for c in tp.of(Action::Add) {
                if rules.iter().any(|r| r.rule.content == c.rule.content) {
                    return Err(format!("duplicate rule added: {:?}", c.rule.content));
                }
                if c.rule.name.is_some() && rules.iter().any(|r| r.rule.name == c.rule.name) {
                    return Err(format!("duplicate rule name added: {:?}", c.rule.name));
                }
                self.next += 1;
                rules.push(ObservedRule::new(
                    Some(format!("r{}", self.next)),
                    c.rule.clone(),
                    true,
                ));
            }
        }
        Ok(())
    }
}

fn config(s: &Scenario) -> Config {
    let mut c = Config::new("props");
    c.policy.port_merge = s.merge;
    c
}

fn plan_with(s: &Scenario, services: &[ServiceSpec], cloud: &Cloud) -> Plan {
    let d = desired(&config(s), services, &nodes());
    plan(
        &d,
        "memory",
        &resolutions(s),
        &cloud.observe(s),
        &renderer(s),
    )
}

/// A cloud holding what `before` asked for, plus foreign and stray owned rules.
fn prepared_cloud(s: &Scenario) -> Cloud {
    let mut cloud = Cloud::default();
    let first = plan_with(s, &s.before, &cloud);
    cloud.apply(&first).unwrap();
    let targets: Vec<Target> = cloud.observe(s).into_keys().collect();
    for (i, r) in s.foreign.iter().enumerate() {
        cloud.seed(&targets[i % targets.len()], r.clone(), false);
    }
    for (i, r) in s.garbage.iter().enumerate() {
        let dup = cloud
            .targets
            .values()
            .flatten()
            .any(|o| o.rule.content == r.content);
        if !dup {
            cloud.seed(&targets[i % targets.len()], r.clone(), true);
        }
    }
    cloud
}

/// The requested (protocol, port) -> (service, its sources, its pools) of valid Services.
fn requests(
    s: &Scenario,
    services: &[ServiceSpec],
) -> BTreeMap<(Protocol, u16), Vec<(ServiceRef, Vec<IpNet>)>> {
    let d = desired(&config(s), services, &nodes());
    let mut out: BTreeMap<(Protocol, u16), Vec<(ServiceRef, Vec<IpNet>)>> = BTreeMap::new();
    for svc in services {
        if let nodeport_firewall_model::Admission::Managed(i) =
            nodeport_firewall_model::annotations::admit(svc, &config(s))
        {
            if d.pinned.contains(&i.service) {
                continue;
            }
            for key in &i.ports {
                out.entry(*key)
                    .or_default()
                    .push((i.service.clone(), i.sources.nets().to_vec()));
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Applying a plan and planning again gives an empty plan.
    #[test]
    fn apply_then_replan_is_empty(s in scenario()) {
        let mut cloud = prepared_cloud(&s);
        let p = plan_with(&s, &s.after, &cloud);
        cloud.apply(&p).map_err(TestCaseError::fail)?;
        let again = plan_with(&s, &s.after, &cloud);
        for t in &again.targets {
            let writes: Vec<_> = t.changes.iter().filter(|c| c.action.is_write()).collect();
            prop_assert!(writes.is_empty(), "second plan writes on {}: {:#?}", t.target, writes);
        }
    }

    /// No plan ever removes or changes a rule it does not own.
    #[test]
    fn foreign_rules_are_never_touched(s in scenario()) {
        let cloud = prepared_cloud(&s);
        let foreign: BTreeSet<Option<String>> =
            cloud.targets.values().flatten().filter(|r| !r.owned).map(|r| r.id.clone()).collect();
        for services in [&s.after, &s.before, &Vec::new()] {
            let p = plan_with(&s, services, &cloud);
            for c in p.targets.iter().flat_map(|t| &t.changes) {
                if matches!(c.action, Action::Remove | Action::Update) {
                    prop_assert!(!foreign.contains(&c.id), "plan touches foreign rule: {c:#?}");
                }
            }
        }
    }

    /// A rule the plan wants never covers a port nobody asked for, and never lets one
    /// Service's sources reach another Service's port.
    #[test]
    fn rules_open_only_what_was_asked_from_where_it_was_asked(s in scenario()) {
        let cloud = prepared_cloud(&s);
        let p = plan_with(&s, &s.after, &cloud);
        let asked = requests(&s, &s.after);
        for c in p.targets.iter().flat_map(|t| &t.changes) {
            if !matches!(c.action, Action::Add | Action::Update | Action::Unchanged) {
                continue;
            }
            let rule = &c.rule;
            for range in &rule.content.ports {
                for port in range.from..=range.to {
                    let owners = asked.get(&(rule.content.protocol, port));
                    prop_assert!(owners.is_some(), "port {port}/{} opened but never requested: {rule:#?}", rule.content.protocol);
                    for (svc, sources) in owners.into_iter().flatten() {
                        prop_assert!(rule.services.contains(svc), "rule for port {port} does not name {svc}");
                        for src in &rule.content.sources {
                            prop_assert!(
                                sources.iter().any(|mine| mine.contains(src)),
                                "{src} reaches port {port} of {svc}, whose sources are {sources:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Rules of an invalid Service are kept exactly as they are.
    #[test]
    fn invalid_services_keep_their_rules(s in scenario()) {
        let cloud = prepared_cloud(&s);
        let broken: Vec<ServiceSpec> = s.before.iter().cloned().map(|svc| svc.with_ranges("10.0.0.0/33")).collect();
        let p = plan_with(&s, &broken, &cloud);
        let d = desired(&config(&s), &broken, &nodes());
        for c in p.targets.iter().flat_map(|t| &t.changes) {
            if c.action == Action::Remove || c.action == Action::Update {
                prop_assert!(
                    c.rule.services.iter().all(|svc| !d.pinned.contains(svc)),
                    "a rule of an invalid Service is changed: {c:#?}"
                );
            }
        }
    }

    /// The planner is deterministic.
    #[test]
    fn planning_is_deterministic(s in scenario()) {
        let cloud = prepared_cloud(&s);
        prop_assert_eq!(plan_with(&s, &s.after, &cloud), plan_with(&s, &s.after, &cloud));
    }
}

#[test]
fn quota_is_checked_per_family_before_any_write() {
    let mut limits = Limits {
        max_rules: Some(2),
        rules_counted_per_family: true,
        ..Limits::default()
    };
    let s = Scenario {
        before: vec![],
        after: vec![],
        foreign: vec![],
        garbage: vec![],
        limits: limits.clone(),
        named: false,
        shared_target: true,
        scoped: false,
        merge: PortMerge::Contiguous,
    };
    let svc = |n: &str, port: i32, r: &str| {
        ServiceSpec::nodeport("ns", n)
            .with_port("", "TCP", 80, port)
            .enabled()
            .with_ranges(r)
    };
    // Two IPv4 and two IPv6 rules: within a per-family quota of 2.
    let fits = vec![
        svc("a", 30001, "10.0.0.0/8,2001:db8::/32"),
        svc("b", 30003, "10.0.0.0/8,2001:db8::/32"),
    ];
    let p = plan_with(&s, &fits, &Cloud::default());
    assert!(p.targets[0].error.is_none(), "{:?}", p.targets[0].error);
    // A third IPv4 rule passes it.
    let mut over = fits.clone();
    over.push(svc("c", 30005, "192.0.2.0/24"));
    let p = plan_with(&s, &over, &Cloud::default());
    assert!(
        matches!(
            p.targets[0].error,
            Some(nodeport_firewall_model::PlanError::RuleQuota {
                family: Some(nodeport_firewall_model::IpFamily::V4),
                ours: 3,
                foreign: 0,
                limit: 2,
                reason: None,
            })
        ),
        "{:?}",
        p.targets[0].error
    );
    // Foreign rules count against the quota too.
    limits.rules_counted_per_family = false;
    limits.max_rules = Some(5);
    let s = Scenario { limits, ..s };
    let mut cloud = Cloud::default();
    let target = Target::new("memory", "shared");
    for port in [22u16, 443] {
        let rule = Rule {
            name: None,
            content: RuleContent {
                scope: None,
                family: nodeport_firewall_model::IpFamily::V4,
                protocol: Protocol::Tcp,
                ports: vec![nodeport_firewall_model::PortRange::single(port)],
                sources: vec!["172.16.0.0/12".parse().unwrap()],
            },
            services: Default::default(),
            pools: Default::default(),
        };
        cloud.seed(&target, rule, false);
    }
    let p = plan_with(&s, &fits, &cloud);
    assert!(
        matches!(
            p.targets[0].error,
            Some(nodeport_firewall_model::PlanError::RuleQuota {
                ours: 4,
                foreign: 2,
                limit: 5,
                ..
            })
        ),
        "{:?}",
        p.targets[0].error
    );
}

#[test]
fn pool_that_fails_to_resolve_pins_its_rules_on_shared_targets() {
    let s = Scenario {
        before: vec![],
        after: vec![],
        foreign: vec![],
        garbage: vec![],
        limits: Limits::default(),
        named: false,
        shared_target: true,
        scoped: false,
        merge: PortMerge::Contiguous,
    };
    let svc = ServiceSpec::nodeport("ns", "only-a")
        .with_port("", "TCP", 80, 30001)
        .enabled()
        .with_ranges("10.0.0.0/8")
        .with_annotation("node-pools", "a");
    let mut cloud = Cloud::default();
    let first = plan_with(&s, std::slice::from_ref(&svc), &cloud);
    cloud.apply(&first).unwrap();
    // Now pool a cannot be resolved: b and c still plan the shared target.
    let d = desired(&config(&s), std::slice::from_ref(&svc), &nodes());
    let mut res = resolutions(&s);
    res.insert(
        PoolName::new("a"),
        Err(nodeport_firewall_model::Failure::new(
            nodeport_firewall_model::ErrorKind::Discovery,
            "discovery failed",
        )),
    );
    let p = plan(&d, "memory", &res, &cloud.observe(&s), &renderer(&s));
    let t = &p.targets[0];
    assert_eq!(t.count(Action::Remove), 0, "{:#?}", t.changes);
    assert_eq!(t.count(Action::Keep), 1);
    assert_eq!(p.summary.errors, 1, "the failed pool is reported");
}

#[test]
fn pool_without_nodes_that_cannot_resolve_keeps_its_rules_without_error() {
    let s = Scenario {
        before: vec![],
        after: vec![],
        foreign: vec![],
        garbage: vec![],
        limits: Limits::default(),
        named: false,
        shared_target: false,
        scoped: false,
        merge: PortMerge::Contiguous,
    };
    let svc = ServiceSpec::nodeport("ns", "s")
        .with_port("", "TCP", 80, 30001)
        .enabled()
        .with_ranges("10.0.0.0/8");
    let mut config = config(&s);
    config
        .pools
        .insert(PoolName::new("idle"), Default::default());
    let d = desired(&config, std::slice::from_ref(&svc), &nodes());
    assert_eq!(d.pools[&PoolName::new("idle")].nodes.len(), 0);
    let mut res = resolutions(&s);
    res.insert(
        PoolName::new("idle"),
        Err(nodeport_firewall_model::Failure::new(
            nodeport_firewall_model::ErrorKind::Discovery,
            "no nodes to discover a security group from",
        )),
    );
    let p = plan(
        &d,
        "memory",
        &res,
        &Cloud::default().observe(&s),
        &renderer(&s),
    );
    assert_eq!(p.summary.errors, 0, "an idle pool is not an error");
    let idle = p.pools.iter().find(|r| r.name.as_str() == "idle").unwrap();
    assert!(idle.error.is_some(), "but it is reported");
}

//! The conformance suite: one set of properties that every provider's tests run against a
//! real (or faithfully emulated) backend. A provider that passes it can be trusted by the
//! planner: what it applies is what it observes next, it never touches others' rules, and
//! limits are caught before any write.
//!
//! The suite is test support: a broken property fails the calling test with a message, so
//! it asserts and panics by design.
#![allow(clippy::panic)]

use std::collections::BTreeSet;

use async_trait::async_trait;
use ipnet::IpNet;
use nodeport_firewall_model::{
    Action, Config, NodeSpec, Plan, PlanError, PoolName, Rule, RuleContent, ServiceRef,
    ServiceSpec, Target, desired,
};

use crate::engine::{self, ApplyOutcome};
use crate::{Provider, Result, testkit};

/// A fresh pool, with its own fresh target, for one scenario.
#[derive(Debug, Clone)]
pub struct PoolFixture {
    pub pool: PoolName,
    pub nodes: Vec<NodeSpec>,
    /// The operator config to plan with; it names the pool and any provider overrides.
    pub config: Config,
}

/// What a provider's test gives the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    fn provider(&self) -> &dyn Provider;
    /// A new instance of the provider, with the same config, on the same backend: what a
    /// new process (the next `plan` run, a restart, a new leader) would build. It shares no
    /// memory with [`Harness::provider`].
    async fn new_instance(&self) -> Box<dyn Provider>;
    /// Creates a pool whose target holds no rules yet. `tag` is unique per call.
    async fn fresh_pool(&self, tag: &str) -> PoolFixture;
    /// Writes a rule directly on the target, as another tool would: with no ownership
    /// marker (`owner: None`) or with another cluster's marker.
    async fn seed_foreign(&self, target: &Target, owner: Option<&str>, rule: &Rule) -> Result<()>;
    /// Writes, as another tool would, a foreign Allow for exactly `rule`'s content and a
    /// foreign Deny evaluated before it that covers all of it, at a priority our rules can
    /// still come before (inside the provider's band, or after its fixed priority).
    /// Returns the Deny's name as observed (`ObservedRule.rule.name`, else its id), or
    /// `None` when the cloud has no Deny rules (an EC2 security group).
    async fn seed_shadowed_allow(&self, target: &Target, rule: &Rule) -> Result<Option<String>>;
}

/// Runs every scenario.
pub async fn run_all(h: &dyn Harness) {
    apply_then_observe_equals_desired(h).await;
    foreign_rules_are_untouched(h).await;
    removing_a_service_removes_exactly_its_rules(h).await;
    exceeded_limit_is_a_plan_error_before_any_write(h).await;
    a_fresh_instance_plans_as_a_long_lived_one(h).await;
    a_foreign_allow_behind_a_deny_does_not_satisfy(h).await;
    orphans_of_an_unmanaged_or_gone_pool_are_removed(h).await;
    a_pool_scaled_to_zero_keeps_its_rules_only_while_listed(h).await;
}

fn services() -> Vec<ServiceSpec> {
    vec![
        ServiceSpec::nodeport("conformance", "web")
            .with_port("http", "TCP", 80, 30100)
            .with_port("https", "TCP", 443, 30101)
            .enabled()
            .with_ranges("10.0.0.0/8, 2001:db8::/32"),
        ServiceSpec::nodeport("conformance", "dns")
            .with_port("dns", "UDP", 53, 30200)
            .enabled()
            .with_ranges("192.0.2.0/24"),
        ServiceSpec::nodeport("conformance", "api")
            .with_port("api", "TCP", 8080, 30300)
            .enabled()
            .with_ranges("10.0.0.0/8"),
    ]
}

async fn plan_for(h: &dyn Harness, f: &PoolFixture, services: &[ServiceSpec]) -> Plan {
    plan_with(h.provider(), f, services).await
}

/// The part of `plan` about the scenario's pool. Every scenario has a pool of its own,
/// listed alone in its config: to it the pools of earlier scenarios are gone, and their
/// rules orphans, which the engine finds and plans to remove. Those targets are the
/// business of the scenarios about orphans, not of this one.
fn scoped(mut plan: Plan, f: &PoolFixture) -> Plan {
    let ours = |t: &nodeport_firewall_model::TargetPlan| {
        t.pools.contains(&f.pool) || t.changes.iter().any(|c| c.rule.pools.contains(&f.pool))
    };
    plan.targets.retain(ours);
    let s = &mut plan.summary;
    (s.add, s.remove, s.update) = (0, 0, 0);
    for t in plan.targets.iter().filter(|t| t.error.is_none()) {
        s.add += t.count(Action::Add);
        s.remove += t.count(Action::Remove);
        s.update += t.count(Action::Update);
    }
    plan
}

fn target_of(plan: &Plan, f: &PoolFixture) -> Target {
    let pool = plan
        .pools
        .iter()
        .find(|p| p.name == f.pool)
        .unwrap_or_else(|| panic!("pool {} not in plan", f.pool));
    if let Some(e) = &pool.error {
        panic!("pool {} did not resolve: {e}", f.pool);
    }
    match pool.targets.as_slice() {
        [one] => one.target.clone(),
        other => panic!("expected one target for pool {}, got {other:?}", f.pool),
    }
}

async fn apply_ok(h: &dyn Harness, plan: &Plan) {
    for (target, outcome) in testkit::apply(h.provider(), plan).await {
        match outcome {
            ApplyOutcome::Applied { .. } | ApplyOutcome::NoChanges => {}
            other => panic!("apply on {target} failed: {other:?}"),
        }
    }
}

fn assert_no_writes(plan: &Plan, when: &str) {
    for t in &plan.targets {
        assert!(
            t.error.is_none(),
            "{when}: plan error on {}: {:?}",
            t.target,
            t.error
        );
        let writes: Vec<_> = t.changes.iter().filter(|c| c.action.is_write()).collect();
        assert!(
            writes.is_empty(),
            "{when}: expected an empty plan on {}, got {writes:#?}",
            t.target
        );
    }
}

async fn observed(h: &dyn Harness, target: &Target) -> (Vec<Rule>, Vec<(Option<String>, Rule)>) {
    let obs = match h.provider().observe(target).await {
        Ok(o) => o,
        Err(e) => panic!("observe {target}: {e}"),
    };
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for r in obs.rules {
        if r.owned {
            ours.push(r.rule)
        } else {
            theirs.push((r.id, r.rule))
        }
    }
    ours.sort();
    theirs.sort_by(|a, b| a.1.cmp(&b.1));
    (ours, theirs)
}

fn contents(rules: &[Rule]) -> BTreeSet<RuleContent> {
    rules.iter().map(|r| r.content.clone()).collect()
}

fn wanted(plan: &Plan, target: &Target) -> Vec<Rule> {
    let mut rules: Vec<Rule> = plan
        .targets
        .iter()
        .filter(|t| &t.target == target)
        .flat_map(|t| t.changes.iter())
        .filter(|c| matches!(c.action, Action::Add | Action::Update | Action::Unchanged))
        .map(|c| c.rule.clone())
        .collect();
    rules.sort();
    rules
}

/// Apply the desired state, then observe: the target holds exactly the desired rules,
/// with their Services recorded; a second plan is empty.
pub async fn apply_then_observe_equals_desired(h: &dyn Harness) {
    let f = h.fresh_pool("converge").await;
    let svcs = services();
    let first = plan_for(h, &f, &svcs).await;
    let target = target_of(&first, &f);
    assert!(
        first.summary.add > 0,
        "the first plan adds rules: {first:#?}"
    );
    assert_eq!(first.summary.remove, 0);
    let want = wanted(&first, &target);
    apply_ok(h, &first).await;

    let (ours, _) = observed(h, &target).await;
    assert_eq!(
        contents(&ours),
        contents(&want),
        "observed rules differ from the applied plan"
    );
    let observed_services: BTreeSet<&ServiceRef> =
        ours.iter().flat_map(|r| r.services.iter()).collect();
    let wanted_services: BTreeSet<&ServiceRef> =
        want.iter().flat_map(|r| r.services.iter()).collect();
    assert_eq!(
        observed_services, wanted_services,
        "ownership marker lost the Services served"
    );
    assert!(
        ours.iter()
            .any(|r| r.content.family == nodeport_firewall_model::IpFamily::V6),
        "IPv6 rule missing: {ours:#?}"
    );

    let second = plan_for(h, &f, &svcs).await;
    assert_no_writes(&second, "second plan");
    assert_eq!(second.summary.unchanged, want.len());
}

/// Rules without our marker, or with another cluster's, are never changed or removed, even
/// when identical to a rule we want; the plan says they already allow it.
pub async fn foreign_rules_are_untouched(h: &dyn Harness) {
    let f = h.fresh_pool("foreign").await;
    let svcs = services();
    let probe = plan_for(h, &f, &svcs).await;
    let target = target_of(&probe, &f);
    let want = wanted(&probe, &target);
    let Some(twin) = want
        .iter()
        .find(|r| r.content.protocol == nodeport_firewall_model::Protocol::Udp)
        .cloned()
    else {
        panic!("no UDP rule in {want:#?}")
    };
    let other_cluster = Rule {
        name: None,
        content: RuleContent {
            ports: vec![nodeport_firewall_model::PortRange::single(31999)],
            ..twin.content.clone()
        },
        services: Default::default(),
        pools: Default::default(),
    };
    let unrelated = Rule {
        name: None,
        content: RuleContent {
            scope: twin.content.scope.clone(),
            family: nodeport_firewall_model::IpFamily::V4,
            protocol: nodeport_firewall_model::Protocol::Tcp,
            ports: vec![nodeport_firewall_model::PortRange { from: 22, to: 22 }],
            sources: vec![ip("198.51.100.0/24")],
        },
        services: Default::default(),
        pools: Default::default(),
    };
    let untagged_twin = Rule {
        name: None,
        services: Default::default(),
        pools: Default::default(),
        ..twin.clone()
    };
    for (owner, rule) in [
        (None, &untagged_twin),
        (Some("another-cluster"), &other_cluster),
        (None, &unrelated),
    ] {
        if let Err(e) = h.seed_foreign(&target, owner, rule).await {
            panic!("seeding a foreign rule: {e}");
        }
    }
    let (_, before) = observed(h, &target).await;
    assert_eq!(
        before.len(),
        3,
        "seeded foreign rules are observed as not ours: {before:#?}"
    );

    let plan = plan_for(h, &f, &svcs).await;
    let tp = plan
        .targets
        .iter()
        .find(|t| t.target == target)
        .unwrap_or_else(|| panic!("target missing"));
    assert!(tp.error.is_none(), "{:?}", tp.error);
    let foreign_ids: BTreeSet<&str> = before.iter().filter_map(|(id, _)| id.as_deref()).collect();
    for c in &tp.changes {
        if matches!(c.action, Action::Remove | Action::Update) {
            assert!(
                !c.id.as_deref().is_some_and(|id| foreign_ids.contains(id)),
                "plan touches a foreign rule: {c:#?}"
            );
        }
    }
    assert_eq!(
        tp.count(Action::SatisfiedByForeign),
        1,
        "the identical untagged rule satisfies ours: {:#?}",
        tp.changes
    );
    assert!(
        !tp.of(Action::Add).any(|c| c.rule.content == twin.content),
        "a rule identical to a foreign one is not duplicated"
    );
    apply_ok(h, &plan).await;
    assert_eq!(
        observed(h, &target).await.1,
        before,
        "foreign rules changed by apply"
    );

    // Removing every Service removes our rules and only ours.
    let cleanup = plan_for(h, &f, &[]).await;
    apply_ok(h, &cleanup).await;
    let (ours, theirs) = observed(h, &target).await;
    assert!(ours.is_empty(), "our rules remain: {ours:#?}");
    assert_eq!(theirs, before, "foreign rules changed by cleanup");
    assert_no_writes(&plan_for(h, &f, &[]).await, "plan after cleanup");
}

/// Removing one Service removes exactly the rules that served only it; the others keep
/// their identity.
pub async fn removing_a_service_removes_exactly_its_rules(h: &dyn Harness) {
    let f = h.fresh_pool("remove").await;
    let svcs = services();
    let first = plan_for(h, &f, &svcs).await;
    let target = target_of(&first, &f);
    apply_ok(h, &first).await;
    let (before, _) = observed(h, &target).await;

    let dns = ServiceRef::new("conformance", "dns");
    let remaining: Vec<ServiceSpec> = svcs.into_iter().filter(|s| s.service != dns).collect();
    let plan = plan_for(h, &f, &remaining).await;
    let tp = plan
        .targets
        .iter()
        .find(|t| t.target == target)
        .unwrap_or_else(|| panic!("target missing"));
    let removed: BTreeSet<RuleContent> = tp
        .of(Action::Remove)
        .map(|c| c.rule.content.clone())
        .collect();
    let only_dns: BTreeSet<RuleContent> = before
        .iter()
        .filter(|r| r.services.iter().all(|s| *s == dns))
        .map(|r| r.content.clone())
        .collect();
    assert!(!only_dns.is_empty());
    assert_eq!(
        removed, only_dns,
        "exactly the rules of the removed Service are removed"
    );
    assert_eq!(
        tp.count(Action::Add),
        0,
        "nothing is added when a Service goes: {:#?}",
        tp.changes
    );
    apply_ok(h, &plan).await;
    let (after, _) = observed(h, &target).await;
    let expected: BTreeSet<RuleContent> =
        contents(&before).difference(&only_dns).cloned().collect();
    assert_eq!(contents(&after), expected);
    assert_no_writes(&plan_for(h, &f, &remaining).await, "plan after removal");
}

/// A plan that would pass the target's rule quota is an error before any write, and apply
/// refuses it.
pub async fn exceeded_limit_is_a_plan_error_before_any_write(h: &dyn Harness) {
    let f = h.fresh_pool("quota").await;
    let probe = plan_for(h, &f, &[]).await;
    let target = target_of(&probe, &f);
    let limits = match h.provider().observe(&target).await {
        Ok(o) => o.limits,
        Err(e) => panic!("observe: {e}"),
    };
    let Some(max) = limits.max_rules else {
        return; // no rule quota on this provider's targets
    };
    // One rule each: distinct sources never share a rule.
    let svcs: Vec<ServiceSpec> = (0..=max)
        .map(|i| {
            let port = 30000 + 2 * i as i32;
            ServiceSpec::nodeport("quota", &format!("s{i}"))
                .with_port("", "TCP", 80, port)
                .enabled()
                .with_ranges(&format!("10.{}.{}.0/24", i / 256, i % 256))
        })
        .collect();
    let plan = plan_for(h, &f, &svcs).await;
    let tp = plan
        .targets
        .iter()
        .find(|t| t.target == target)
        .unwrap_or_else(|| panic!("target missing"));
    match &tp.error {
        Some(PlanError::RuleQuota { ours, limit, .. }) => {
            assert_eq!(*limit, max);
            assert!(*ours > max);
        }
        other => panic!("expected a rule quota error, got {other:?}"),
    }
    for (_, outcome) in testkit::apply(h.provider(), &plan).await {
        assert!(
            matches!(outcome, ApplyOutcome::Refused { .. }),
            "apply must refuse: {outcome:?}"
        );
    }
    let (ours, _) = observed(h, &target).await;
    assert!(ours.is_empty(), "nothing may be written: {ours:#?}");
}

/// 150 Services on one allowlist, with contiguous node ports: one rule serves them all,
/// more than any cloud's description can list.
fn crowd() -> Vec<ServiceSpec> {
    (0..150)
        .map(|i| {
            ServiceSpec::nodeport("a-long-namespace-name", &format!("crowded-service-{i:03}"))
                .with_port("p", "TCP", 80, 31000 + i)
                .enabled()
                .with_ranges("10.0.0.0/8")
        })
        .collect()
}

/// Plans with `provider`, asserting nothing.
async fn plan_with(provider: &dyn Provider, f: &PoolFixture, services: &[ServiceSpec]) -> Plan {
    let d = desired(&f.config, services, &f.nodes);
    scoped(engine::plan(provider, &f.config, &d).await, f)
}

/// The plan is the only memory: a new provider instance between every step (plan, apply,
/// plan again) plans exactly what the long-lived one plans, with 150 Services sharing one
/// rule, with an invalid Service among them, and with a pool that fails to resolve.
pub async fn a_fresh_instance_plans_as_a_long_lived_one(h: &dyn Harness) {
    let f = h.fresh_pool("fresh").await;
    let mut crowd = crowd();
    let same = |long: &Plan, fresh: &Plan, when: &str| {
        if long != fresh {
            let text = |p: &Plan| serde_json::to_string_pretty(p).unwrap_or_default();
            let (l, f) = (text(long), text(fresh));
            let first = l
                .lines()
                .zip(f.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let around = |t: &str| {
                t.lines()
                    .skip(first.saturating_sub(5))
                    .take(12)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "{when}: a new instance planned differently from the long-lived one; long-lived:\n{}\nnew:\n{}",
                around(&l),
                around(&f)
            );
        }
    };

    let long = plan_with(h.provider(), &f, &crowd).await;
    let fresh = plan_with(h.new_instance().await.as_ref(), &f, &crowd).await;
    same(&long, &fresh, "first plan");
    assert!(long.summary.add > 0, "nothing to add: {long:#?}");
    apply_ok_with(h.new_instance().await.as_ref(), &fresh).await;

    let long = plan_with(h.provider(), &f, &crowd).await;
    let fresh = plan_with(h.new_instance().await.as_ref(), &f, &crowd).await;
    same(&long, &fresh, "plan after apply");
    assert_no_writes(&fresh, "plan after apply, in a new instance");

    // One of them breaks its annotation: its port stays open, in every instance.
    crowd[7] = crowd[7].clone().with_ranges("10.0.0.0/8, not-a-cidr");
    let long = plan_with(h.provider(), &f, &crowd).await;
    let fresh = plan_with(h.new_instance().await.as_ref(), &f, &crowd).await;
    same(&long, &fresh, "plan with an invalid Service");
    let target = target_of(&fresh, &f);
    let (before, _) = observed(h, &target).await;
    apply_ok_with(h.new_instance().await.as_ref(), &fresh).await;
    let (after, _) = observed(h, &target).await;
    let port = 31007;
    let open = |rules: &[Rule]| {
        rules
            .iter()
            .any(|r| r.content.ports.iter().any(|p| p.contains(port)))
    };
    assert!(
        open(&before) && open(&after),
        "the invalid Service's port closed: {after:#?}"
    );

    // Its pool stops resolving: nothing is planned on its target, and nothing removed.
    let mut broken = f.clone();
    let pool = broken.config.pools.entry(f.pool.clone()).or_default();
    pool.set_provider(h.provider().name(), serde_json::json!({"notAField": true}));
    let long = plan_with(h.provider(), &broken, &crowd).await;
    let fresh = plan_with(h.new_instance().await.as_ref(), &broken, &crowd).await;
    same(&long, &fresh, "plan with a pool that fails to resolve");
    assert!(
        fresh
            .pools
            .iter()
            .any(|p| p.name == f.pool && p.error.is_some()),
        "the pool resolved: {:#?}",
        fresh.pools
    );
    assert_eq!(fresh.summary.remove, 0, "{fresh:#?}");
}

/// One Service on one port, for the scenarios about a single rule.
fn single(name: &str, port: i32) -> Vec<ServiceSpec> {
    vec![
        ServiceSpec::nodeport("conformance", name)
            .with_port("p", "TCP", 80, port)
            .enabled()
            .with_ranges("10.0.0.0/8"),
    ]
}

/// A foreign Allow for exactly what a Service wants, behind a foreign Deny evaluated
/// before it, lets nothing through: the plan adds a rule of ours that comes before the
/// Deny, and the cloud holds all three. Where the cloud has no Deny rules, the Allow
/// satisfies the Service.
pub async fn a_foreign_allow_behind_a_deny_does_not_satisfy(h: &dyn Harness) {
    let f = h.fresh_pool("shadowed").await;
    let svcs = single("shadowed", 30400);
    let probe = plan_for(h, &f, &svcs).await;
    let target = target_of(&probe, &f);
    let wanted: Vec<Rule> = wanted(&probe, &target);
    let [rule] = wanted.as_slice() else {
        panic!("expected one wanted rule, got {wanted:#?}");
    };
    let deny = match h.seed_shadowed_allow(&target, rule).await {
        Ok(d) => d,
        Err(e) => panic!("seed: {e}"),
    };
    let plan = plan_for(h, &f, &svcs).await;
    let tp = plan
        .targets
        .iter()
        .find(|t| t.target == target)
        .unwrap_or_else(|| panic!("target missing: {plan:#?}"));
    assert_eq!(tp.error, None, "{tp:#?}");
    let Some(deny) = deny else {
        assert_eq!(
            (tp.count(Action::SatisfiedByForeign), tp.count(Action::Add)),
            (1, 0),
            "without Deny rules the foreign Allow is in force: {:#?}",
            tp.changes
        );
        return;
    };
    assert_eq!(
        tp.count(Action::SatisfiedByForeign),
        0,
        "a shadowed Allow satisfied the Service: {:#?}",
        tp.changes
    );
    let adds: Vec<_> = tp.of(Action::Add).collect();
    assert_eq!(adds.len(), 1, "{:#?}", tp.changes);
    assert!(
        adds[0].note.as_deref().is_some_and(|n| n.contains(&deny)),
        "the add names the Deny {deny}: {:?}",
        adds[0].note
    );
    let observation = match h.provider().observe(&target).await {
        Ok(o) => o,
        Err(e) => panic!("observe: {e}"),
    };
    let denied_at = observation
        .rules
        .iter()
        .find(|r| {
            r.deny.is_some()
                && (r.rule.name.as_deref() == Some(&deny) || r.id.as_deref() == Some(&deny))
        })
        .and_then(|r| r.priority)
        .unwrap_or_else(|| {
            panic!("the Deny {deny} is not observed with a priority: {observation:#?}")
        });
    let ours_at = adds[0].priority.or(observation.limits.own_priority);
    assert!(
        ours_at.is_some_and(|p| p < denied_at),
        "ours at {ours_at:?} must come before the Deny at {denied_at}"
    );
    apply_ok(h, &plan).await;
    let (ours, theirs) = observed(h, &target).await;
    assert_eq!(contents(&ours), contents(&wanted), "{ours:#?}");
    assert_eq!(
        theirs.len(),
        2,
        "the foreign Allow and Deny stay: {theirs:#?}"
    );
    assert_no_writes(&plan_for(h, &f, &svcs).await, "plan after apply");
}

/// The plan for `target` alone, from a plan of everything.
fn only(plan: &Plan, target: &Target) -> Plan {
    let mut p = plan.clone();
    p.targets.retain(|t| &t.target == target);
    p
}

/// Plans `services` on `nodes` under `config`, the whole plan: every target found.
async fn plan_all(
    h: &dyn Harness,
    config: &Config,
    services: &[ServiceSpec],
    nodes: &[NodeSpec],
) -> Plan {
    engine::plan(h.provider(), config, &desired(config, services, nodes)).await
}

/// Asserts that `plan` removes every rule of ours on `target`, each saying why.
fn removes_all_ours(plan: &Plan, target: &Target, ours: usize, why: &str) {
    let tp = plan
        .targets
        .iter()
        .find(|t| &t.target == target)
        .unwrap_or_else(|| {
            panic!("{why}: the target holding orphans is not in the plan: {plan:#?}")
        });
    assert_eq!(tp.error, None, "{why}: {tp:#?}");
    let removes: Vec<_> = tp.of(Action::Remove).collect();
    assert_eq!(removes.len(), ours, "{why}: {:#?}", tp.changes);
    for r in removes {
        assert!(
            r.note
                .as_deref()
                .is_some_and(|n| n.starts_with("orphan:") && n.contains(why)),
            "{why}: {:?}",
            r.note
        );
    }
    assert_eq!(tp.count(Action::Add), 0, "{why}: {:#?}", tp.changes);
}

/// Rules of ours whose pool is set `managed: false`, or is gone (no Nodes, not in the
/// config), are found on their target and removed, saying why; rules of others there
/// stay.
pub async fn orphans_of_an_unmanaged_or_gone_pool_are_removed(h: &dyn Harness) {
    let f = h.fresh_pool("orphan").await;
    let svcs = single("orphan", 30410);
    let first = plan_for(h, &f, &svcs).await;
    let target = target_of(&first, &f);
    apply_ok(h, &first).await;
    let foreign = Rule {
        name: Some("someone-elses".into()),
        content: RuleContent {
            ports: vec![nodeport_firewall_model::PortRange::single(30411)],
            ..wanted(&first, &target)[0].content.clone()
        },
        services: Default::default(),
        pools: Default::default(),
    };
    if let Err(e) = h.seed_foreign(&target, None, &foreign).await {
        panic!("seed: {e}");
    }
    let (ours, _) = observed(h, &target).await;
    assert!(!ours.is_empty());

    let mut unmanaged = f.config.clone();
    unmanaged.pools.entry(f.pool.clone()).or_default().managed = Some(false);
    let plan = plan_all(h, &unmanaged, &svcs, &f.nodes).await;
    removes_all_ours(
        &plan,
        &target,
        ours.len(),
        &format!("pool {} is unmanaged", f.pool),
    );

    let theirs = unlisting_removes_all_ours(h, &f, &svcs, &target, ours.len()).await;
    assert_eq!(theirs.len(), 1, "the rule of others stays: {theirs:#?}");
}

/// With `f`'s pool gone (out of the config, no Nodes), the plan removes each of the `ours`
/// rules of ours on `target` as an orphan, applying it leaves none, and nothing more is
/// planned there. Returns the rules of others left on the target.
async fn unlisting_removes_all_ours(
    h: &dyn Harness,
    f: &PoolFixture,
    svcs: &[ServiceSpec],
    target: &Target,
    ours: usize,
) -> Vec<(Option<String>, Rule)> {
    let mut gone = f.config.clone();
    gone.pools.remove(&f.pool);
    let plan = plan_all(h, &gone, svcs, &[]).await;
    removes_all_ours(&plan, target, ours, &format!("pool {} is gone", f.pool));
    apply_ok(h, &only(&plan, target)).await;
    let (left, theirs) = observed(h, target).await;
    assert!(left.is_empty(), "rules of a gone pool left: {left:#?}");
    let again = plan_all(h, &gone, svcs, &[]).await;
    assert_no_writes(&only(&again, target), "plan after the orphans went");
    theirs
}

/// A pool whose Nodes are all gone keeps its rules while the config lists it, on every
/// cloud, and loses them once it does not.
pub async fn a_pool_scaled_to_zero_keeps_its_rules_only_while_listed(h: &dyn Harness) {
    let f = h.fresh_pool("zero").await;
    let svcs = single("zero", 30420);
    let first = plan_for(h, &f, &svcs).await;
    let target = target_of(&first, &f);
    apply_ok(h, &first).await;
    let (ours, _) = observed(h, &target).await;
    assert!(!ours.is_empty());

    let mut listed = f.config.clone();
    listed.pools.entry(f.pool.clone()).or_default();
    let plan = plan_all(h, &listed, &svcs, &[]).await;
    assert_no_writes(&only(&plan, &target), "a listed pool scaled to zero");
    assert_eq!(
        plan.summary.errors, 0,
        "scaling to zero is not an error: {plan:#?}"
    );
    apply_ok(h, &only(&plan, &target)).await;
    let (still, _) = observed(h, &target).await;
    assert_eq!(still, ours, "a listed pool scaled to zero keeps its rules");

    // Unlisted, it is gone: it keeps nothing.
    unlisting_removes_all_ours(h, &f, &svcs, &target, ours.len()).await;
}

async fn apply_ok_with(provider: &dyn Provider, plan: &Plan) {
    for (target, outcome) in testkit::apply(provider, plan).await {
        match outcome {
            ApplyOutcome::Applied { .. } | ApplyOutcome::NoChanges => {}
            other => panic!("apply on {target} failed: {other:?}"),
        }
    }
}

fn ip(s: &str) -> IpNet {
    match s.parse() {
        Ok(n) => n,
        Err(e) => panic!("{s}: {e}"),
    }
}

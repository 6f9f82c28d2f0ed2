//! A full re-plan of a large cluster: 10,000 Services x 20 pools x 1,000 nodes, against a
//! cloud that already holds the desired rules (the steady-state resync).
//!
//! Run: `cargo bench -p nodeport-firewall-model --bench replan`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use nodeport_firewall_model::plan::PoolResolution;
use nodeport_firewall_model::render::NameParts;
use nodeport_firewall_model::{
    Action, Config, Limits, NodeSpec, Observation, ObservedRule, PoolName, PoolTarget, ServiceSpec,
    ShapeRenderer, Target, desired, plan,
};

const SERVICES: usize = 10_000;
const POOLS: usize = 20;
const NODES: usize = 1_000;
const ALLOWLISTS: usize = 50;
/// Targets per pool in the spread variant: a pool over this many security groups.
const GROUPS: usize = 5;

type Observations = BTreeMap<Target, Result<Observation, nodeport_firewall_model::Failure>>;

/// Each pool on `groups` targets (spread when more than one), and a cloud that already
/// holds exactly the desired rules.
fn steady(
    d: &nodeport_firewall_model::Desired,
    limits: &Limits,
    renderer: &ShapeRenderer,
    groups: usize,
) -> (BTreeMap<PoolName, PoolResolution>, Observations) {
    let resolutions: BTreeMap<PoolName, PoolResolution> = (0..POOLS)
        .map(|i| {
            let pool = PoolName::new(format!("pool-{i}"));
            let targets = (0..groups)
                .map(|g| PoolTarget {
                    spread: (groups > 1).then(|| pool.to_string()),
                    ..PoolTarget::new(Target::new("memory", &format!("sg-{i}-{g}")), None)
                })
                .collect();
            (pool, Ok(targets))
        })
        .collect();
    let empty: Observations = resolutions
        .values()
        .flatten()
        .flatten()
        .map(|pt| {
            (
                pt.target.clone(),
                Ok(Observation::new(vec![], limits.clone())),
            )
        })
        .collect();
    let first = plan(d, "memory", &resolutions, &empty, renderer);
    let observed: Observations = first
        .targets
        .iter()
        .map(|t| {
            let rules = t
                .of(Action::Add)
                .enumerate()
                .map(|(i, c)| ObservedRule::new(Some(format!("r-{i}")), c.rule.clone(), true))
                .collect();
            (
                t.target.clone(),
                Ok(Observation::new(rules, limits.clone())),
            )
        })
        .collect();
    let rules: usize = first.targets.iter().map(|t| t.count(Action::Add)).sum();
    let again = plan(d, "memory", &resolutions, &observed, renderer);
    assert!(
        !again.has_changes() && !again.has_errors(),
        "steady state must plan no changes"
    );
    eprintln!(
        "replan: {SERVICES} services, {POOLS} pools x {groups} target(s), {NODES} nodes, {rules} rules on {} targets",
        first.targets.len()
    );
    (resolutions, observed)
}

fn cluster() -> (Vec<ServiceSpec>, Vec<NodeSpec>) {
    let nodes = (0..NODES)
        .map(|i| {
            NodeSpec::new(&format!("node-{i}"))
                .with_label("karpenter.sh/nodepool", &format!("pool-{}", i % POOLS))
        })
        .collect();
    let services = (0..SERVICES)
        .map(|i| {
            let a = i % ALLOWLISTS;
            let mut s = ServiceSpec::nodeport(&format!("team-{}", i % 40), &format!("svc-{i}"))
                .with_port(
                    "http",
                    if i % 7 == 0 { "UDP" } else { "TCP" },
                    80,
                    20_000 + i as i32,
                )
                .enabled()
                .with_ranges(&format!(
                    "10.{a}.0.0/16, 192.168.{a}.0/24, 2001:db8:{a:x}::/48"
                ));
            if i % 5 == 0 {
                s = s.with_annotation(
                    "node-pools",
                    &format!("pool-{} pool-{}", i % POOLS, (i + 1) % POOLS),
                );
            }
            s
        })
        .collect();
    (services, nodes)
}

fn bench(c: &mut Criterion) {
    let config = Config::new("bench");
    let (services, nodes) = cluster();
    let limits = Limits {
        max_rules: Some(10_000),
        rules_counted_per_family: false,
        max_ports_per_rule: 50,
        max_sources_per_rule: 64,
        max_total_sources: None,
        max_total_destinations: None,
        max_rules_reason: None,
        updates_in_place: true,
        priorities: None,
        own_priority: None,
        deny_wins_ties: false,
    };
    let renderer =
        ShapeRenderer::named(|p: &NameParts<'_>| format!("npf-bench-{}", p.short_hash()));
    let d = desired(&config, &services, &nodes);
    let (resolutions, observed) = steady(&d, &limits, &renderer, 1);
    // Groups of 100 rules: a pool's ~410 rules fill five of them.
    let hundred = Limits {
        max_rules: Some(100),
        ..limits.clone()
    };
    let (spread_resolutions, spread_observed) = steady(&d, &hundred, &renderer, GROUPS);

    c.bench_function("full re-plan (desired + diff), steady state", |b| {
        b.iter(|| {
            let d = desired(black_box(&config), black_box(&services), black_box(&nodes));
            black_box(plan(&d, "memory", &resolutions, &observed, &renderer))
        })
    });
    c.bench_function("full re-plan, 5 security groups per pool (spread)", |b| {
        b.iter(|| {
            let d = desired(black_box(&config), black_box(&services), black_box(&nodes));
            black_box(plan(
                &d,
                "memory",
                &spread_resolutions,
                &spread_observed,
                &renderer,
            ))
        })
    });
    c.bench_function("desired state only", |b| {
        b.iter(|| {
            black_box(desired(
                black_box(&config),
                black_box(&services),
                black_box(&nodes),
            ))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);

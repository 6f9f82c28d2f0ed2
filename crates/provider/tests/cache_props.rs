#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Planning with the observation cache (`engine::plan_with_cache`, as `run` does) decides
//! exactly what planning from fresh reads decides, as long as nobody else writes: checked on
//! random sequences of cluster states against two identical in-memory clouds.

use nodeport_firewall_model::{Action, Config, NodeSpec, Plan, PoolName, ServiceSpec, desired};
use nodeport_firewall_provider::engine::{self, ApplyOutcome, Observed};
use nodeport_firewall_provider::memory::{MemoryConfig, MemoryProvider};
use proptest::prelude::*;

const POOLS: [&str; 3] = ["a", "b", "c"];
const RANGES: [&str; 4] = [
    "10.0.0.0/8",
    "192.0.2.0/24",
    "2001:db8::/32",
    "198.51.100.7/32",
];

/// One Service: its name, the pools it names (none: all), its allowlist and node port.
fn service() -> impl Strategy<Value = ServiceSpec> {
    (
        0..5usize,
        proptest::sample::subsequence(POOLS.to_vec(), 0..=3),
        proptest::sample::subsequence(RANGES.to_vec(), 1..=2),
        30000..30004i32,
    )
        .prop_map(|(n, pools, ranges, port)| {
            let mut s = ServiceSpec::nodeport("shop", &format!("s{n}"))
                .with_port("http", "TCP", 80, port)
                .with_annotation("nodeport-firewall.io/enabled", "true")
                .with_ranges(&ranges.join(","));
            if !pools.is_empty() {
                s = s.with_annotation("nodeport-firewall.io/node-pools", &pools.join(","));
            }
            s
        })
}

/// A cluster state: some Services, and whether pool c has a node (a pool without nodes
/// cannot be resolved: its rules are kept).
fn state() -> impl Strategy<Value = (Vec<ServiceSpec>, bool)> {
    (proptest::collection::vec(service(), 0..6), any::<bool>()).prop_map(|(mut services, c)| {
        // One spec per Service name, as a cluster has.
        services.sort_by(|a, b| a.service.cmp(&b.service));
        services.dedup_by(|a, b| a.service == b.service);
        (services, c)
    })
}

fn config() -> Config {
    let mut c = Config::new("demo");
    for p in POOLS {
        c.pools.insert(PoolName::new(p), Default::default());
    }
    c
}

fn nodes(with_c: bool) -> Vec<NodeSpec> {
    POOLS
        .iter()
        .filter(|p| with_c || **p != "c")
        .map(|p| NodeSpec::new(&format!("n-{p}")).with_label("nodeport-firewall.io/pool", p))
        .collect()
}

/// What a plan decides, without the cloud's rule ids.
fn decisions(plan: &Plan) -> Vec<(String, Action, String, bool)> {
    let mut out: Vec<_> = plan
        .targets
        .iter()
        .flat_map(|t| {
            t.changes.iter().map(move |c| {
                (
                    t.target.id.clone(),
                    c.action,
                    format!("{:?}", c.rule),
                    t.error.is_some(),
                )
            })
        })
        .collect();
    out.sort();
    out
}

/// What someone else does to the cloud between two reconciles: delete one of our rules
/// (by its index among all of ours), or add a foreign rule copying one of ours (which makes
/// ours redundant: the planner reports it as satisfied by the foreign one).
#[derive(Debug, Clone)]
enum Drift {
    None,
    DeleteOurs(usize),
    CopyAsForeign(usize),
}

fn drift() -> impl Strategy<Value = Drift> {
    prop_oneof![
        2 => Just(Drift::None),
        1 => (0..20usize).prop_map(Drift::DeleteOurs),
        1 => (0..20usize).prop_map(Drift::CopyAsForeign),
    ]
}

fn apply_drift(cloud: &MemoryProvider, drift: &Drift) {
    let mut state = cloud.snapshot().unwrap();
    let ours: Vec<(String, usize)> = state
        .targets
        .iter()
        .flat_map(|(t, rules)| {
            rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.owner.as_deref() == Some("demo"))
                .map(move |(i, _)| (t.clone(), i))
        })
        .collect();
    if ours.is_empty() {
        return;
    }
    match drift {
        Drift::None => {}
        Drift::DeleteOurs(n) => {
            let (t, i) = &ours[n % ours.len()];
            state.targets.get_mut(t).unwrap().remove(*i);
            cloud.load(state).unwrap();
        }
        Drift::CopyAsForeign(n) => {
            let (t, i) = &ours[n % ours.len()];
            let rule = state.targets[t][*i].rule.clone();
            cloud.seed(t, None, rule).unwrap();
        }
    }
}

/// One change to the cluster's Services between two reconciles.
#[derive(Debug, Clone)]
enum Edit {
    Nothing,
    /// Add the Service, or replace the one of the same name.
    Put(ServiceSpec),
    /// Delete the Service of this index in the name order, if there is one.
    Delete(usize),
}

impl Edit {
    fn apply(&self, services: &mut Vec<ServiceSpec>) {
        match self {
            Edit::Nothing => {}
            Edit::Put(s) => {
                services.retain(|x| x.service != s.service);
                services.push(s.clone());
                services.sort_by(|a, b| a.service.cmp(&b.service));
            }
            Edit::Delete(i) => {
                if !services.is_empty() {
                    services.remove(i % services.len());
                }
            }
        }
    }
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => Just(Edit::Nothing),
        2 => service().prop_map(Edit::Put),
        1 => (0..6usize).prop_map(Edit::Delete),
    ]
}

/// What a plan decides on `target`, without the cloud's rule ids.
fn on_target(plan: &Plan, target: &str) -> Vec<(Action, String, bool)> {
    decisions(plan)
        .into_iter()
        .filter(|d| d.0 == target)
        .map(|(_, a, r, e)| (a, r, e))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Without other writers, the cache decides exactly what fresh reads decide, on every
    /// target, and both clouds stay the same.
    #[test]
    fn the_cache_decides_what_fresh_reads_decide(steps in proptest::collection::vec(state(), 1..6)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let config = config();
            let cached_cloud = MemoryProvider::new("demo", MemoryConfig::default());
            let fresh_cloud = MemoryProvider::new("demo", MemoryConfig::default());
            let mut observed = Observed::default();
            for (services, with_c) in &steps {
                let d = desired(&config, services, &nodes(*with_c));
                let cached = engine::plan_with_cache(&cached_cloud, &config, &d, &mut observed).await;
                let fresh = engine::plan(&fresh_cloud, &config, &d).await;
                prop_assert_eq!(decisions(&cached), decisions(&fresh));
                prop_assert!(observed.last_reads <= fresh.targets.len());

                // Apply both, and forget the targets written to, as the controller does.
                let outcomes = engine::apply(&cached_cloud, &cached).await;
                for (target, outcome) in outcomes {
                    if matches!(outcome, ApplyOutcome::Applied { .. } | ApplyOutcome::Failed { .. }) {
                        observed.forget(&target);
                    }
                }
                engine::apply(&fresh_cloud, &fresh).await;
                prop_assert_eq!(
                    cached_cloud.snapshot().unwrap().targets,
                    fresh_cloud.snapshot().unwrap().targets
                );
            }
            // Nothing changes any more: the targets just written are read once, then the
            // cache reads nothing, and neither plan writes.
            if let Some((services, with_c)) = steps.last() {
                let d = desired(&config, services, &nodes(*with_c));
                let settled = engine::plan_with_cache(&cached_cloud, &config, &d, &mut observed).await;
                prop_assert!(!settled.has_changes());
                let again = engine::plan_with_cache(&cached_cloud, &config, &d, &mut observed).await;
                prop_assert!(!again.has_changes());
                prop_assert_eq!(observed.last_reads, 0);
            }
            Ok(())
        })?;
    }

    /// With someone else changing the cloud between reconciles, every target the cached
    /// plan writes to is planned exactly as from a fresh read of it, every apply succeeds,
    /// and a resync (cleared cache) repairs what the cache did not see.
    #[test]
    fn every_write_is_planned_from_a_fresh_read(
        start in state(),
        steps in proptest::collection::vec((edit(), drift()), 1..8),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let config = config();
            let cloud = MemoryProvider::new("demo", MemoryConfig::default());
            let mut observed = Observed::default();
            let (mut services, with_c) = start;
            // Converge on the start, so that later steps plan mostly from the cache.
            let d = desired(&config, &services, &nodes(with_c));
            engine::apply(&cloud, &engine::plan(&cloud, &config, &d).await).await;
            let mut states = Vec::new();
            for (edit, drift) in &steps {
                apply_drift(&cloud, drift);
                edit.apply(&mut services);
                states.push(services.clone());
                let d = desired(&config, &services, &nodes(with_c));
                let cached = engine::plan_with_cache(&cloud, &config, &d, &mut observed).await;
                let fresh = engine::plan(&cloud, &config, &d).await;
                for tp in cached.targets.iter().filter(|t| t.has_writes()) {
                    prop_assert_eq!(
                        on_target(&cached, &tp.target.id),
                        on_target(&fresh, &tp.target.id)
                    );
                }
                let outcomes = engine::apply(&cloud, &cached).await;
                for (target, outcome) in outcomes {
                    prop_assert!(
                        !matches!(outcome, ApplyOutcome::Failed { .. }),
                        "{:?}",
                        outcome
                    );
                    if matches!(outcome, ApplyOutcome::Applied { .. }) {
                        observed.forget(&target);
                    }
                }
            }
            if let Some(services) = states.last() {
                let d = desired(&config, services, &nodes(with_c));
                observed.clear();
                let resync = engine::plan_with_cache(&cloud, &config, &d, &mut observed).await;
                engine::apply(&cloud, &resync).await;
                let after = engine::plan(&cloud, &config, &d).await;
                prop_assert!(!after.has_changes(), "{:?}", decisions(&after));
            }
            Ok(())
        })?;
    }
}

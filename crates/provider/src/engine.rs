//! Drives a provider: resolve every pool, observe every target once (or only the targets
//! whose plan changed, with [`Observed`]), plan purely, apply.

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use nodeport_firewall_model::{
    Config, Desired, Observation, ObservationResult, Plan, PlanError, PoolName, PoolResolution,
    PoolState, Target, TargetPlan, Warning, WarningKind,
};
use serde::Serialize;
use tracing::{Instrument, debug, info, info_span, instrument, warn};

use crate::{ApplyReport, Error, PoolView, Provider};

/// How many targets are read or written at once.
const CONCURRENCY: usize = 8;

/// Resolves every managed pool, observes every target once, and plans.
pub async fn plan(provider: &dyn Provider, config: &Config, desired: &Desired) -> Plan {
    plan_with_cache(provider, config, desired, &mut Observed::default()).await
}

/// What was last observed on each target, for [`plan_with_cache`]. An entry is only
/// trusted while nobody has written to its target: forget it after an apply there, and
/// clear everything on a periodic resync so that drift is seen.
#[derive(Debug, Default)]
pub struct Observed {
    targets: BTreeMap<Target, Observation>,
    /// Reads made by the last plan, for logs and tests.
    pub last_reads: usize,
}

impl Observed {
    /// Forgets what was seen on `target`: the next plan reads it again.
    pub fn forget(&mut self, target: &Target) {
        self.targets.remove(target);
    }

    /// Forgets every target: the next plan reads them all (a resync).
    pub fn clear(&mut self) {
        self.targets.clear();
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// What was last seen on `target`.
    pub fn get(&self, target: &Target) -> Option<&Observation> {
        self.targets.get(target)
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Like [`plan`], but reads only the targets it must: targets never seen (or forgotten)
/// are observed; the others are first planned against what was seen last, and only those
/// whose plan would then write (their pools' Services or Nodes changed) or fail are read
/// again and replanned. A change to one pool therefore reads only that pool's targets, and
/// the plan still covers every target, so every Service's status is complete.
#[instrument(skip_all, fields(provider = provider.name()))]
pub async fn plan_with_cache(
    provider: &dyn Provider,
    config: &Config,
    desired: &Desired,
    observed: &mut Observed,
) -> Plan {
    let resolutions = resolve(provider, config, desired).await;
    let mut targets: Vec<Target> = resolutions
        .values()
        .flatten()
        .flatten()
        .map(|pt| pt.target.clone())
        .collect();
    // Targets holding rules of ours that no pool may map to any more: read and planned
    // like the others, so that their orphans go. A failed search removes nothing, and
    // says so.
    let orphan_search = provider
        .owned_targets(config)
        .instrument(info_span!("owned_targets"))
        .await;
    match &orphan_search {
        Ok(found) => targets.extend(found.iter().cloned()),
        // The plan carries it as a warning; a log line would say it twice.
        Err(e) => debug!(error = %e, "cannot search for targets holding rules of ours"),
    }
    targets.sort();
    targets.dedup();
    // Forget targets no pool maps to any more, so the cache cannot grow without bound.
    observed
        .targets
        .retain(|t, _| targets.binary_search(t).is_ok());

    let unseen: Vec<Target> = targets
        .iter()
        .filter(|t| !observed.targets.contains_key(*t))
        .cloned()
        .collect();
    let mut reads = unseen.len();
    let mut observations = observe(provider, unseen).await;
    let cached = std::mem::take(&mut observed.targets);
    let from_cache: BTreeSet<Target> = cached.keys().cloned().collect();
    observations.extend(cached.into_iter().map(|(t, o)| (t, Ok(o))));
    let mut plan = plan_pure(provider, desired, &resolutions, &observations);

    let stale: Vec<Target> = plan
        .targets
        .iter()
        .filter(|tp| from_cache.contains(&tp.target) && (tp.has_writes() || tp.error.is_some()))
        .map(|tp| tp.target.clone())
        .collect();
    if !stale.is_empty() {
        reads += stale.len();
        observations.extend(observe(provider, stale).await);
        plan = plan_pure(provider, desired, &resolutions, &observations);
    }
    if let Err(e) = orphan_search {
        plan.warnings.push(Warning::new(
            WarningKind::OrphanSearch,
            None,
            format!(
                "could not search for targets that hold rules of ours ({e}): rules of pools that are now unmanaged, gone or re-targeted are not removed this time"
            ),
        ));
    }
    observed.targets = observations
        .into_iter()
        .filter_map(|(t, o)| o.ok().map(|o| (t, o)))
        .collect();
    observed.last_reads = reads;
    plan
}

/// Resolves every managed pool, `CONCURRENCY` at a time.
///
/// The per-item futures are built by named `async fn`s over an iterator, not by closures
/// on the stream: a stream of references mapped by a closure makes the whole future
/// non-`Send` (rustc's "FnOnce is not general enough").
async fn resolve(
    provider: &dyn Provider,
    config: &Config,
    desired: &Desired,
) -> BTreeMap<PoolName, PoolResolution> {
    let resolving = desired
        .managed_pools()
        .map(|pool| resolve_one(provider, config, pool))
        .collect::<Vec<_>>();
    stream::iter(resolving)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

async fn resolve_one(
    provider: &dyn Provider,
    config: &Config,
    pool: &PoolState,
) -> (PoolName, PoolResolution) {
    let view = PoolView {
        name: &pool.name,
        nodes: &pool.nodes,
        config: config
            .pools
            .get(&pool.name)
            .and_then(|p| p.provider(provider.name())),
    };
    let res = provider
        .resolve(view)
        .instrument(info_span!("resolve", pool = %pool.name))
        .await;
    if let Err(e) = &res {
        warn!(pool = %pool.name, error = %e, "cannot resolve pool target");
    }
    (pool.name.clone(), res)
}

/// Observes `targets`, `CONCURRENCY` at a time: one read each.
async fn observe(
    provider: &dyn Provider,
    targets: Vec<Target>,
) -> BTreeMap<Target, ObservationResult> {
    stream::iter(targets)
        .map(|t| async move {
            let obs = provider
                .observe(&t)
                .instrument(info_span!("observe", target = %t))
                .await;
            (t, obs)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

/// The pure planner, then the provider's manual steps for targets with writes.
fn plan_pure(
    provider: &dyn Provider,
    desired: &Desired,
    resolutions: &BTreeMap<PoolName, PoolResolution>,
    observations: &BTreeMap<Target, ObservationResult>,
) -> Plan {
    let mut plan = nodeport_firewall_model::plan(
        desired,
        provider.name(),
        resolutions,
        observations,
        provider.renderer(),
    );
    for tp in &mut plan.targets {
        if tp.error.is_none() && tp.has_writes() {
            tp.manual = provider.manual_steps(tp);
        }
    }
    plan
}

/// What happened on one target when a plan was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum ApplyOutcome {
    /// Nothing to write.
    NoChanges,
    /// The plan for this target has an error; nothing was written.
    Refused {
        error: PlanError,
    },
    Applied {
        report: ApplyReport,
    },
    /// The apply failed; `report` is what it wrote before (often nothing).
    Failed {
        error: Error,
        report: ApplyReport,
    },
}

impl ApplyOutcome {
    /// What was written, whether or not the apply completed.
    pub fn written(&self) -> Option<&ApplyReport> {
        match self {
            ApplyOutcome::Applied { report } | ApplyOutcome::Failed { report, .. } => Some(report),
            _ => None,
        }
    }
}

/// Applies every target's plan, concurrently across targets, one writer per target. Targets
/// whose plan has an error are refused before any write; a failure on one target does not
/// stop the others.
///
/// Every write is checked by [`crate::guard`] against the observation its plan was made
/// from, which the plan carries (a plan read back from a file: a fresh read).
#[instrument(skip_all, fields(provider = provider.name(), targets = plan.targets.len()))]
pub async fn apply(provider: &dyn Provider, plan: &Plan) -> Vec<(Target, ApplyOutcome)> {
    let applying = plan
        .targets
        .iter()
        .map(|tp| apply_one(provider, tp))
        .collect::<Vec<_>>();
    let mut out: Vec<(Target, ApplyOutcome)> = stream::iter(applying)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[instrument(skip_all, fields(target = %tp.target))]
async fn apply_one(provider: &dyn Provider, tp: &TargetPlan) -> (Target, ApplyOutcome) {
    let outcome = if let Some(e) = &tp.error {
        ApplyOutcome::Refused { error: e.clone() }
    } else if !tp.has_writes() {
        ApplyOutcome::NoChanges
    } else {
        let guarded = match tp.observed.as_deref() {
            Some(o) => crate::guard::check(tp, o),
            None => match provider.observe(&tp.target).await {
                Ok(o) => crate::guard::check(tp, &o),
                Err(e) => Err(e),
            },
        };
        match guarded {
            Err(error) => {
                warn!(error = %error, "refused before any write");
                ApplyOutcome::Failed {
                    error,
                    report: ApplyReport::default(),
                }
            }
            Ok(()) => match provider.apply(tp).await {
                Ok(report) => {
                    info!(
                        added = report.added,
                        removed = report.removed,
                        updated = report.updated,
                        "applied plan"
                    );
                    ApplyOutcome::Applied { report }
                }
                Err(f) => {
                    warn!(error = %f.error, kind = %f.error.kind, added = f.written.added, removed = f.written.removed, updated = f.written.updated, "apply failed");
                    ApplyOutcome::Failed {
                        error: f.error,
                        report: f.written,
                    }
                }
            },
        }
    };
    (tp.target.clone(), outcome)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use nodeport_firewall_model::{Config, NodeSpec, PoolName, ServiceSpec, desired};

    use super::*;
    use crate::memory::{MemoryConfig, MemoryProvider};

    const POOL_LABEL: &str = "nodeport-firewall.io/pool";

    fn config() -> Config {
        let mut c = Config::new("demo");
        for p in ["a", "b"] {
            c.pools.insert(PoolName::new(p), Default::default());
        }
        c
    }

    fn nodes() -> Vec<NodeSpec> {
        vec![
            NodeSpec::new("n-a").with_label(POOL_LABEL, "a"),
            NodeSpec::new("n-b").with_label(POOL_LABEL, "b"),
        ]
    }

    fn web(pools: &str, ranges: &str) -> ServiceSpec {
        ServiceSpec::nodeport("shop", "web")
            .with_port("http", "TCP", 80, 30080)
            .with_annotation("nodeport-firewall.io/enabled", "true")
            .with_annotation("nodeport-firewall.io/node-pools", pools)
            .with_ranges(ranges)
    }

    /// Plans with the cache; returns the plan and the observe calls it made.
    async fn plan_counting(
        p: &MemoryProvider,
        services: &[ServiceSpec],
        observed: &mut Observed,
    ) -> (Plan, usize) {
        let config = config();
        let before = p.calls.observes.load(Ordering::SeqCst);
        let d = desired(&config, services, &nodes());
        let plan = plan_with_cache(p, &config, &d, observed).await;
        let reads = p.calls.observes.load(Ordering::SeqCst) - before;
        assert_eq!(reads, observed.last_reads, "last_reads counts the reads");
        (plan, reads)
    }

    #[tokio::test]
    async fn only_targets_whose_plan_changes_are_read_again() {
        let p = MemoryProvider::new("demo", MemoryConfig::default());
        let mut observed = Observed::default();
        let both = [web("a,b", "10.0.0.0/8")];

        // Nothing seen yet: every target is read once.
        let (plan, reads) = plan_counting(&p, &both, &mut observed).await;
        assert_eq!((reads, plan.summary.add), (2, 2));
        let outcomes = apply(&p, &plan).await;
        for (target, outcome) in outcomes {
            assert!(
                matches!(outcome, ApplyOutcome::Applied { .. }),
                "{outcome:?}"
            );
            observed.forget(&target);
        }

        // Both were written: both are read again, and the plan is empty.
        let (plan, reads) = plan_counting(&p, &both, &mut observed).await;
        assert_eq!((reads, plan.has_changes()), (2, false));

        // Nothing changed: nothing is read, and every target is still planned.
        let (plan, reads) = plan_counting(&p, &both, &mut observed).await;
        assert_eq!(
            (reads, plan.targets.len(), plan.has_changes()),
            (0, 2, false)
        );

        // The Service leaves pool a: only a's target is read, and it loses the rule.
        let b_only = [web("b", "10.0.0.0/8")];
        let (plan, reads) = plan_counting(&p, &b_only, &mut observed).await;
        assert_eq!(reads, 1);
        let writes: Vec<&Target> = plan
            .targets
            .iter()
            .filter(|t| t.has_writes())
            .map(|t| &t.target)
            .collect();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].id, "a");
        assert_eq!(plan.summary.remove, 1);
    }

    #[tokio::test]
    async fn drift_is_seen_only_once_the_cache_is_cleared() {
        let p = MemoryProvider::new("demo", MemoryConfig::default());
        let mut observed = Observed::default();
        let both = [web("a,b", "10.0.0.0/8")];
        let (plan, _) = plan_counting(&p, &both, &mut observed).await;
        apply(&p, &plan).await;
        observed.clear();
        let (plan, _) = plan_counting(&p, &both, &mut observed).await;
        assert!(!plan.has_changes());

        // Our rule on b deleted behind our back: the cached view does not know...
        let mut state = p.snapshot().unwrap();
        state.targets.get_mut("b").unwrap().clear();
        p.load(state).unwrap();
        let (plan, reads) = plan_counting(&p, &both, &mut observed).await;
        assert_eq!((reads, plan.has_changes()), (0, false));
        // ...a resync (cleared cache) reads every target and puts it back.
        observed.clear();
        let (plan, reads) = plan_counting(&p, &both, &mut observed).await;
        assert_eq!((reads, plan.summary.add), (2, 1));
    }

    #[tokio::test]
    async fn a_target_no_pool_maps_to_is_forgotten() {
        let p = MemoryProvider::new("demo", MemoryConfig::default());
        let mut observed = Observed::default();
        plan_counting(&p, &[web("a,b", "10.0.0.0/8")], &mut observed).await;
        assert_eq!(observed.len(), 2);
        let mut config = config();
        config.pools.get_mut(&PoolName::new("b")).unwrap().managed = Some(false);
        let d = desired(&config, &[web("a", "10.0.0.0/8")], &nodes());
        plan_with_cache(&p, &config, &d, &mut observed).await;
        assert_eq!(observed.len(), 1);
    }
}

/// Compile-time check: the engine's futures can be spawned on a multi-threaded runtime.
#[cfg(test)]
mod send_check {
    use super::*;
    fn assert_send<T: Send>(_: T) {}
    #[allow(dead_code)]
    fn futures_are_send(p: &dyn Provider, c: &Config, d: &Desired, o: &mut Observed, plan_: &Plan) {
        assert_send(resolve(p, c, d));
        assert_send(observe(p, Vec::new()));
        assert_send(plan_with_cache(p, c, d, o));
        assert_send(apply(p, plan_));
    }
}

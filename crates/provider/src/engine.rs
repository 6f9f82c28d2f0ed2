//! Drives a provider: resolve every pool, observe every target once (or only the targets
//! whose plan changed, with [`Observed`]), plan purely, apply.

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use nodeport_firewall_model::{
    Config, Desired, Observation, Plan, PoolName, PoolResolution, Target,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::{ApplyReport, PoolView, Provider, Result};

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

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Like [`plan`], but reads only the targets it must: targets never seen (or forgotten)
/// are observed; the others are first planned against what was seen last, and only those
/// whose plan would then write (their pools' Services or Nodes changed) or fail are read
/// again and replanned. A change to one pool therefore reads only that pool's targets, and
/// the plan still covers every target, so every Service's status is complete.
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
    targets.sort();
    targets.dedup();
    // Forget targets no pool maps to any more, so the cache cannot grow without bound.
    observed.targets.retain(|t, _| targets.binary_search(t).is_ok());

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
    observed.targets = observations
        .into_iter()
        .filter_map(|(t, o)| o.ok().map(|o| (t, o)))
        .collect();
    observed.last_reads = reads;
    plan
}

/// Resolves every managed pool, `CONCURRENCY` at a time.
async fn resolve(
    provider: &dyn Provider,
    config: &Config,
    desired: &Desired,
) -> BTreeMap<PoolName, PoolResolution> {
    let pools: Vec<_> = desired.managed_pools().collect();
    stream::iter(pools)
        .map(|pool| async move {
            let view = PoolView {
                name: &pool.name,
                nodes: &pool.nodes,
                config: config
                    .pools
                    .get(&pool.name)
                    .and_then(|p| p.provider(provider.name())),
            };
            let res = provider.resolve(view).await.map_err(|e| e.to_string());
            if let Err(e) = &res {
                warn!(pool = %pool.name, error = %e, "cannot resolve pool target");
            }
            (pool.name.clone(), res)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

/// Observes `targets`, `CONCURRENCY` at a time: one read each.
async fn observe(
    provider: &dyn Provider,
    targets: Vec<Target>,
) -> BTreeMap<Target, Result<Observation, String>> {
    stream::iter(targets)
        .map(|t| async move {
            let obs = provider.observe(&t).await.map_err(|e| e.to_string());
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
    observations: &BTreeMap<Target, Result<Observation, String>>,
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
        error: String,
    },
    Applied {
        report: ApplyReport,
    },
    Failed {
        error: String,
    },
}

/// Applies every target's plan, concurrently across targets, one writer per target. Targets
/// whose plan has an error are refused before any write; a failure on one target does not
/// stop the others.
pub async fn apply(provider: &dyn Provider, plan: &Plan) -> Vec<(Target, ApplyOutcome)> {
    let mut out: Vec<(Target, ApplyOutcome)> = stream::iter(&plan.targets)
        .map(|tp| async move {
            let outcome = if let Some(e) = &tp.error {
                ApplyOutcome::Refused { error: e.to_string() }
            } else if !tp.has_writes() {
                ApplyOutcome::NoChanges
            } else {
                match provider.apply(tp).await {
                    Ok(report) => {
                        info!(target = %tp.target, added = report.added, removed = report.removed, updated = report.updated, "applied plan");
                        ApplyOutcome::Applied { report }
                    }
                    Err(e) => {
                        warn!(target = %tp.target, error = %e, "apply failed");
                        ApplyOutcome::Failed { error: e.to_string() }
                    }
                }
            };
            (tp.target.clone(), outcome)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

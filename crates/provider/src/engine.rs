//! Drives a provider: resolve every pool, observe every target once, plan purely, apply.

use std::collections::BTreeMap;

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
    let pools: Vec<_> = desired.managed_pools().collect();
    let resolutions: BTreeMap<PoolName, PoolResolution> = stream::iter(pools)
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
        .await;

    let mut targets: Vec<Target> = resolutions
        .values()
        .flatten()
        .flatten()
        .map(|pt| pt.target.clone())
        .collect();
    targets.sort();
    targets.dedup();
    let observations: BTreeMap<Target, Result<Observation, String>> = stream::iter(targets)
        .map(|t| async move {
            let obs = provider.observe(&t).await.map_err(|e| e.to_string());
            (t, obs)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;

    nodeport_firewall_model::plan(
        desired,
        provider.name(),
        &resolutions,
        &observations,
        provider.renderer(),
    )
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

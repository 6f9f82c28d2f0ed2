//! Test support shared by every provider's tests: plan, apply and count writes the way the
//! CLI does. Panics on failure by design.
#![allow(clippy::panic)]

use nodeport_firewall_model::{Config, NodeSpec, Plan, ServiceSpec, Target, desired};

use crate::engine::{self, ApplyOutcome};
use crate::{ApplyReport, Provider};

/// Plans `services` on `nodes` with a fresh engine, as one `plan` run does.
pub async fn plan(
    provider: &dyn Provider,
    config: &Config,
    services: &[ServiceSpec],
    nodes: &[NodeSpec],
) -> Plan {
    engine::plan(provider, config, &desired(config, services, nodes)).await
}

/// Applies `plan`, as `apply` does.
pub async fn apply(provider: &dyn Provider, plan: &Plan) -> Vec<(Target, ApplyOutcome)> {
    engine::apply(provider, plan).await
}

/// Applies `plan` and panics unless every target applied; returns the apply notes.
pub async fn apply_ok(provider: &dyn Provider, plan: &Plan) -> Vec<String> {
    let mut notes = Vec::new();
    for (target, outcome) in apply(provider, plan).await {
        match outcome {
            ApplyOutcome::NoChanges => {}
            ApplyOutcome::Applied { report } => notes.extend(report.notes),
            other => panic!("apply on {target} failed: {other:?}"),
        }
    }
    notes
}

/// The writes a plan would make where it can: adds, removes and updates.
pub fn writes(plan: &Plan) -> usize {
    plan.summary.add + plan.summary.remove + plan.summary.update
}

/// The totals of what an apply wrote, failed targets included.
pub fn written(outcomes: &[(Target, ApplyOutcome)]) -> ApplyReport {
    let mut total = ApplyReport::default();
    for r in outcomes.iter().filter_map(|(_, o)| o.written()) {
        total.added += r.added;
        total.updated += r.updated;
        total.removed += r.removed;
    }
    total
}

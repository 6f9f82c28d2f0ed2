//! The CLI's [`Backend`] as a shared provider, and its cloud API call counts for metrics.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use nodeport_firewall_provider::model::Config;
use nodeport_firewall_provider::{
    ApplyFailure, ApplyReport, ManualSteps, Observation, PoolTarget, PoolView, Provider, Render,
    Result, Target, TargetPlan,
};
use tracing::warn;

use super::metrics::CallSnapshot;
use crate::providers::Backend;

/// A [`Backend`] behind an `Arc`, usable as `Arc<dyn Provider>`. With a state file, the
/// in-memory provider's state is saved after every apply, so that a killed `run` loses
/// nothing it wrote.
#[derive(Debug, Clone)]
pub struct Shared(pub Arc<Backend>, pub Option<PathBuf>);

#[async_trait]
impl Provider for Shared {
    fn name(&self) -> &'static str {
        self.0.provider().name()
    }
    fn renderer(&self) -> &dyn Render {
        self.0.provider().renderer()
    }
    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        self.0.provider().resolve(pool).await
    }
    async fn observe(&self, target: &Target) -> Result<Observation> {
        self.0.provider().observe(target).await
    }
    async fn apply(&self, plan: &TargetPlan) -> std::result::Result<ApplyReport, ApplyFailure> {
        let r = self.0.provider().apply(plan).await;
        if let Err(e) = self.0.save_state(self.1.as_deref()) {
            warn!(error = %e, "cannot save the memory provider's state");
        }
        r
    }
    async fn owned_targets(&self, config: &Config) -> Result<Vec<Target>> {
        self.0.provider().owned_targets(config).await
    }
    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        self.0.provider().preflight(target).await
    }
    fn manual_steps(&self, plan: &TargetPlan) -> Option<ManualSteps> {
        self.0.provider().manual_steps(plan)
    }
}

/// The cloud SDK's call counts (operation, calls, errors), where the provider keeps them.
pub fn cloud_calls(backend: &Backend) -> Option<CallSnapshot> {
    let stats = backend.provider().call_stats()?;
    Some(
        stats
            .snapshot()
            .into_iter()
            .map(|(op, s)| {
                (
                    op,
                    u64::try_from(s.calls).unwrap_or(u64::MAX),
                    u64::try_from(s.errors).unwrap_or(u64::MAX),
                )
            })
            .collect(),
    )
}

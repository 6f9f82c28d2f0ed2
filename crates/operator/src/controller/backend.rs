//! The CLI's [`Backend`] as a shared provider, and its cloud API call counts for metrics.

use std::sync::Arc;

use async_trait::async_trait;
use nodeport_firewall_provider::{
    ApplyReport, Observation, PoolTarget, PoolView, Provider, Render, Result, Target, TargetPlan,
};

use super::metrics::CallSnapshot;
use crate::providers::Backend;

/// A [`Backend`] behind an `Arc`, usable as `Arc<dyn Provider>`.
#[derive(Debug, Clone)]
pub struct Shared(pub Arc<Backend>);

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
    async fn apply(&self, plan: &TargetPlan) -> Result<ApplyReport> {
        self.0.provider().apply(plan).await
    }
    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        self.0.provider().preflight(target).await
    }
}

/// The cloud SDK's call counts (operation, calls, errors), where the provider keeps them.
pub fn cloud_calls(backend: &Backend) -> Option<CallSnapshot> {
    let stats = match backend {
        Backend::Aws(p) => p.stats(),
        Backend::Gcp(p) => p.stats(),
        Backend::Azure(p) => p.stats(),
        Backend::Memory(_) => return None,
    };
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

//! A provider wrapper: counts calls for metrics, and refuses writes unless this instance
//! may write (leader, not dry run). Every apply runs inside the write fence of the lease
//! ([`nodeport_firewall_provider::fence`]), so that each cloud write, not each target, is
//! checked against it: a target's remaining writes stop the moment the lease is lost or
//! about to be. Error kinds travel in the plan and the apply outcomes.

use std::sync::Arc;

use async_trait::async_trait;
use nodeport_firewall_provider::fence::{self, WriteFence};
use nodeport_firewall_provider::model::Config;
use nodeport_firewall_provider::{
    ApplyFailure, ApplyReport, Error, ErrorKind, ManualSteps, Observation, PoolTarget, PoolView,
    Provider, Render, Result, Target, TargetPlan,
};

use super::leader::Leadership;
use super::metrics::{CallLabels, Metrics};

pub struct Gated {
    inner: Arc<dyn Provider>,
    leadership: Leadership,
    dry_run: bool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Gated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gated")
            .field("provider", &self.inner.name())
            .field("dry_run", &self.dry_run)
            .finish()
    }
}

impl Gated {
    pub fn new(
        inner: Arc<dyn Provider>,
        leadership: Leadership,
        dry_run: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gated {
            inner,
            leadership,
            dry_run,
            metrics,
        }
    }

    fn count(&self, operation: &str, failure: Option<&Error>) {
        let result = failure.map_or("ok", |e| e.kind.as_str());
        self.metrics
            .provider_calls
            .get_or_create(&CallLabels {
                provider: self.inner.name().to_string(),
                operation: operation.to_string(),
                result: result.to_string(),
            })
            .inc();
    }
}

#[async_trait]
impl Provider for Gated {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn renderer(&self) -> &dyn Render {
        self.inner.renderer()
    }

    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        let r = self.inner.resolve(pool).await;
        self.count("resolve", r.as_ref().err());
        r
    }

    async fn observe(&self, target: &Target) -> Result<Observation> {
        let r = self.inner.observe(target).await;
        self.count("observe", r.as_ref().err());
        r
    }

    async fn apply(&self, plan: &TargetPlan) -> std::result::Result<ApplyReport, ApplyFailure> {
        if self.dry_run {
            return Err(Error::new(ErrorKind::Other, "dry run: write skipped").into());
        }
        // Checked once here (a target not started at all), then by the provider before each
        // of its writes, under the fence installed for this apply.
        self.leadership.may_write()?;
        let fence: Arc<dyn WriteFence> = Arc::new(self.leadership.clone());
        let r = fence::scoped(fence, self.inner.apply(plan)).await;
        self.count("apply", r.as_ref().err().map(|f| &f.error));
        r
    }

    async fn owned_targets(&self, config: &Config) -> Result<Vec<Target>> {
        let r = self.inner.owned_targets(config).await;
        self.count("owned_targets", r.as_ref().err());
        r
    }

    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        self.inner.preflight(target).await
    }

    fn manual_steps(&self, plan: &TargetPlan) -> Option<ManualSteps> {
        self.inner.manual_steps(plan)
    }
}

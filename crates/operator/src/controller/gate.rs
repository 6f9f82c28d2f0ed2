//! A provider wrapper: counts calls for metrics, remembers each target's last error kind,
//! and refuses writes unless this instance may write (leader, not dry run).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nodeport_firewall_provider::{
    ApplyReport, Error, ErrorKind, ManualSteps, Observation, PoolTarget, PoolView, Provider,
    Render, Result, Target, TargetPlan,
};

use super::leader::Leadership;
use super::metrics::{CallLabels, Metrics};

pub struct Gated {
    inner: Arc<dyn Provider>,
    leadership: Leadership,
    dry_run: bool,
    metrics: Arc<Metrics>,
    errors: Mutex<BTreeMap<Target, ErrorKind>>,
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
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// The kinds of the errors seen per target since the last call, and forgets them.
    pub fn take_errors(&self) -> BTreeMap<Target, ErrorKind> {
        self.errors
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    fn count<T>(&self, operation: &str, target: Option<&Target>, r: &Result<T>) {
        let result = match r {
            Ok(_) => "ok",
            Err(e) => e.kind.as_str(),
        };
        self.metrics
            .provider_calls
            .get_or_create(&CallLabels {
                provider: self.inner.name().to_string(),
                operation: operation.to_string(),
                result: result.to_string(),
            })
            .inc();
        if let (Some(t), Err(e)) = (target, r)
            && let Ok(mut m) = self.errors.lock()
        {
            m.insert(t.clone(), e.kind);
        }
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
        self.count("resolve", None, &r);
        r
    }

    async fn observe(&self, target: &Target) -> Result<Observation> {
        let r = self.inner.observe(target).await;
        self.count("observe", Some(target), &r);
        r
    }

    async fn apply(&self, plan: &TargetPlan) -> Result<ApplyReport> {
        if self.dry_run {
            return Err(Error::new(ErrorKind::Other, "dry run: write skipped"));
        }
        // Checked right before every target's write: a lost lease stops writes at once.
        if !self.leadership.is_leader() {
            return Err(Error::new(
                ErrorKind::Conflict,
                "not the leader (lease lost): write skipped",
            ));
        }
        let r = self.inner.apply(plan).await;
        self.count("apply", Some(&plan.target), &r);
        r
    }

    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        self.inner.preflight(target).await
    }

    fn manual_steps(&self, plan: &TargetPlan) -> Option<ManualSteps> {
        self.inner.manual_steps(plan)
    }
}

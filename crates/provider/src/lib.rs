//! The provider trait of nodeport-firewall, the engine that drives a provider through
//! plan and apply, the in-memory provider, and the conformance suite every provider runs.
//!
//! The provider-neutral target, rule and plan types live in `nodeport-firewall-model`, so
//! that the planner stays pure; they are re-exported here.

pub mod conformance;
pub mod engine;
pub mod error;
pub mod memory;
pub mod retry;
pub mod stats;

use async_trait::async_trait;
pub use nodeport_firewall_model as model;
pub use nodeport_firewall_model::{
    Action, Change, Limits, ManualSteps, Observation, ObservedRule, Plan, PlanError, PoolTarget,
    Render, Rule, RuleContent, Target, TargetPlan,
};
use nodeport_firewall_model::{NodeSpec, PoolName};
use serde::Serialize;

pub use engine::{ApplyOutcome, Observed, apply, plan, plan_with_cache};
pub use error::{Error, ErrorKind, Result};
pub use memory::MemoryProvider;
pub use retry::RetryPolicy;
pub use stats::{CallStats, OpKind, OpStats};

/// A pool as a provider sees it when resolving targets.
#[derive(Debug, Clone, Copy)]
pub struct PoolView<'a> {
    pub name: &'a PoolName,
    pub nodes: &'a [NodeSpec],
    /// This provider's section of the pool's config override, if any.
    pub config: Option<&'a serde_json::Value>,
}

impl PoolView<'_> {
    /// This provider's section of the pool's config override, parsed; the default when the
    /// pool has none. Providers give `T` `deny_unknown_fields`, so a typo is an error.
    pub fn override_config<T: serde::de::DeserializeOwned + Default>(
        &self,
        provider: &str,
    ) -> Result<T> {
        match self.config {
            None => Ok(T::default()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("pools.{}.{provider}: {e}", self.name),
                )
            }),
        }
    }

    /// Reads a provider's top-level config section, with the same rules.
    pub fn section<T: serde::de::DeserializeOwned + Default>(
        section: Option<&serde_json::Value>,
        provider: &str,
    ) -> Result<T> {
        match section {
            None => Ok(T::default()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::new(ErrorKind::Config, format!("{provider}: {e}"))),
        }
    }
}

/// What an apply did on one target.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReport {
    pub added: usize,
    pub removed: usize,
    pub updated: usize,
    /// Remarks, e.g. a rule that already existed and was adopted as converged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A cloud firewall backend. Providers read and write; only the planner decides.
///
/// Every implementation must pass [`conformance::run_all`].
#[async_trait]
pub trait Provider: Send + Sync {
    /// `memory`, `aws`, `gcp` or `azure`.
    fn name(&self) -> &'static str;

    /// Turns grants into this provider's rules under its limits. Pure.
    fn renderer(&self) -> &dyn Render;

    /// The target(s) of a pool: from config, else discovered from the pool's nodes.
    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>>;

    /// The rules on a target, ours and others', with the target's limits. One read per
    /// target per reconcile.
    async fn observe(&self, target: &Target) -> Result<Observation>;

    /// Carries out a target's plan: adds before removes unless the plan says otherwise,
    /// writes batched per target. Must never remove or change a rule it does not own.
    async fn apply(&self, plan: &TargetPlan) -> Result<ApplyReport>;

    /// Permission preflight: the cloud permissions the credentials lack on `target`, by
    /// name, found without changing anything. Empty when all checks pass or the provider
    /// has nothing to check.
    async fn preflight(&self, _target: &Target) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// The commands someone with more rights must run to carry out `plan`'s writes, when
    /// this provider knows (or has seen) that its credentials may not write to the target:
    /// a Shared VPC host project. `None` when the operator writes itself. Pure.
    fn manual_steps(&self, _plan: &TargetPlan) -> Option<ManualSteps> {
        None
    }
}

//! The provider trait of nodeport-firewall, the engine that drives a provider through
//! plan and apply, the in-memory provider, and the conformance suite every provider runs.
//!
//! The provider-neutral target, rule and plan types live in `nodeport-firewall-model`, so
//! that the planner stays pure; they are re-exported here.

pub mod conformance;
pub mod engine;
pub mod error;
pub mod fence;
pub mod guard;
pub mod memory;
pub mod retry;
pub mod stats;
pub mod testkit;

use async_trait::async_trait;
pub use nodeport_firewall_model as model;
pub use nodeport_firewall_model::{
    Action, Change, Limits, ManualSteps, Observation, ObservedRule, Plan, PlanError, PoolTarget,
    Render, Rule, RuleContent, Target, TargetPlan,
};
use nodeport_firewall_model::{Config, NodeSpec, PoolName};
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

/// An apply that stopped part-way: what it wrote before `error`, so that totals and metrics
/// count every write that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyFailure {
    pub written: ApplyReport,
    pub error: Error,
}

impl ApplyFailure {
    /// A failure after `written`.
    pub fn after(written: &ApplyReport, error: Error) -> Self {
        ApplyFailure {
            written: written.clone(),
            error,
        }
    }
}

/// A failure before anything was written.
impl From<Error> for ApplyFailure {
    fn from(error: Error) -> Self {
        ApplyFailure {
            written: ApplyReport::default(),
            error,
        }
    }
}

impl std::fmt::Display for ApplyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.written;
        write!(
            f,
            "{} (after {} added, {} changed, {} removed)",
            self.error, w.added, w.updated, w.removed
        )
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

/// A target plan's writes, as a provider carries them out.
#[derive(Debug)]
pub struct Writes<'a> {
    pub removes: Vec<&'a Change>,
    pub updates: Vec<&'a Change>,
    pub adds: Vec<&'a Change>,
    /// The ids (names) of the existing rules that the removes and updates touch: each must
    /// be checked against what the cloud says is ours before anything is written.
    pub existing: Vec<&'a str>,
}

impl<'a> Writes<'a> {
    /// The writes of `plan`. A plan with an error is refused, and so is a remove or update
    /// without the observed rule's id: nothing may be written for either.
    pub fn of(plan: &'a TargetPlan) -> Result<Self> {
        let invalid = |m: String| Error::new(ErrorKind::Invalid, m);
        if let Some(e) = &plan.error {
            return Err(invalid(format!("refusing a plan with an error: {e}")));
        }
        let removes: Vec<&Change> = plan.of(Action::Remove).collect();
        let updates: Vec<&Change> = plan.of(Action::Update).collect();
        let existing = removes
            .iter()
            .chain(updates.iter())
            .map(|c| {
                c.id.as_deref().ok_or_else(|| {
                    invalid(format!(
                        "{} without the id of the rule it changes",
                        c.rule.content.protocol
                    ))
                })
            })
            .collect::<Result<_>>()?;
        Ok(Writes {
            removes,
            updates,
            adds: plan.of(Action::Add).collect(),
            existing,
        })
    }
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

    /// Carries out a target's plan exactly: in the plan's order (adds before removes unless
    /// `remove_first`), at the plan's priorities, writes batched per target. Chooses
    /// nothing: a conflict (a rule gone or taken meanwhile) is reported, and the next plan
    /// decides. The engine has checked ownership against the observation the plan was made
    /// from ([`guard`]). A failure part-way says what was written before it.
    async fn apply(&self, plan: &TargetPlan) -> std::result::Result<ApplyReport, ApplyFailure>;

    /// Targets that hold rules of ours, found by our ownership marker rather than through
    /// the pools: where a pool's rules stay when the pool is set `managed: false`, is gone,
    /// or now maps elsewhere. The engine plans every such target that no managed pool maps
    /// to, and removes the orphans there. Found with few reads (AWS: one tag-filtered
    /// `DescribeSecurityGroupRules` per region; GCP: firewalls by name prefix; Azure: the
    /// NSGs named in config). `config` is the whole operator config, unmanaged pools too.
    /// Required, with no default: a wrapper that forgot to pass it on would silently leave
    /// orphans behind.
    async fn owned_targets(&self, config: &Config) -> Result<Vec<Target>>;

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

    /// The cloud API calls made so far, where the provider counts them (for metrics).
    fn call_stats(&self) -> Option<&CallStats> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeport_firewall_model::plan::Usage;
    use nodeport_firewall_model::{IpFamily, Protocol};

    fn change(action: Action, id: Option<&str>) -> Change {
        Change {
            action,
            rule: Rule {
                name: None,
                content: RuleContent {
                    scope: None,
                    family: IpFamily::V4,
                    protocol: Protocol::Tcp,
                    ports: Vec::new(),
                    sources: Vec::new(),
                },
                services: Default::default(),
                pools: Default::default(),
            },
            id: id.map(str::to_string),
            previous: None,
            note: None,
            priority: None,
            payload: None,
        }
    }

    fn plan(changes: Vec<Change>, error: Option<PlanError>) -> TargetPlan {
        TargetPlan {
            target: Target::new("memory", "t"),
            pools: Default::default(),
            changes,
            error,
            remove_first: false,
            usage: Usage::default(),
            manual: None,
            resolved: Vec::new(),
            observed: None,
        }
    }

    #[test]
    fn writes_split_a_plan_and_refuse_what_must_not_be_written() {
        let ok = plan(
            vec![
                change(Action::Remove, Some("r1")),
                change(Action::Update, Some("u1")),
                change(Action::Add, None),
                change(Action::Unchanged, Some("k1")),
            ],
            None,
        );
        let w = Writes::of(&ok).unwrap();
        assert_eq!((w.removes.len(), w.updates.len(), w.adds.len()), (1, 1, 1));
        assert_eq!(w.existing, vec!["r1", "u1"]);

        let errored = plan(
            vec![change(Action::Add, None)],
            Some(PlanError::Observe {
                message: "down".into(),
                error_kind: ErrorKind::Transient,
            }),
        );
        let e = Writes::of(&errored).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.message.contains("refusing a plan with an error"), "{e}");

        let anonymous = plan(vec![change(Action::Remove, None)], None);
        assert_eq!(Writes::of(&anonymous).unwrap_err().kind, ErrorKind::Invalid);
    }
}

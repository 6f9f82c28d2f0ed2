//! The planner: per target, compare the desired rules with the rules observed there and
//! decide what to add, remove, change or keep, in which order, under which limits.
//!
//! `plan_target` is three steps, one module each: [`matching`] (which observed rule each
//! wanted rule is, and what is kept, added or removed), [`quota`] (the target's limits
//! after the plan) and [`ordering`] (notes, order, priorities).

mod error;
mod matching;
mod ordering;
mod quota;
mod shadow;
mod spread;

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::desired::{Desired, Grant, ServiceReport};
use crate::failure::{ErrorKind, Failure};
use crate::net::IpFamily;
use crate::node::PoolName;
use crate::render::{Render, RenderContext};
use crate::rule::Rule;
use crate::set::PoolSet;
pub use crate::target::{
    Observation, ObservationResult, ObservedRule, PoolResolution, PoolTarget, Target,
};
pub use error::PlanError;

/// The version of the JSON plan schema (docs/plan-format.md).
pub const PLAN_FORMAT_VERSION: u32 = 1;

/// What the plan does with one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    Add,
    Remove,
    /// Changed in place: a named rule's ports or sources, or any rule's marker.
    Update,
    Unchanged,
    /// Kept exactly as it is, because a Service it serves is invalid or its pool could not
    /// be resolved (fail closed).
    Keep,
    /// Wanted, but a rule we do not own already allows exactly this; nothing is written.
    SatisfiedByForeign,
}

impl Action {
    pub fn is_write(self) -> bool {
        matches!(self, Action::Add | Action::Remove | Action::Update)
    }
}

/// One line of a target's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub action: Action,
    pub rule: Rule,
    /// The observed rule's id, for Remove, Update, Unchanged, Keep and SatisfiedByForeign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// For Update: the rule as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The rule's priority, where the target orders rules by one (Azure): observed for a
    /// rule that exists, chosen by the planner for an add. Executors write exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// The provider's own facts about the observed rule ([`ObservedRule::payload`]),
    /// carried to the executor unread by the planner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// Rule counts on a target once the plan is applied.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub ours: usize,
    pub foreign: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Rules that still fit under `limit` after the plan: in the fullest family where the
    /// quota counts each family apart. `None` without a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom: Option<usize>,
    /// Per family, where the quota counts each apart (EC2); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<FamilyUsage>,
}

/// Rule counts of one IP family on a target whose quota counts families apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyUsage {
    pub family: IpFamily,
    pub ours: usize,
    pub foreign: usize,
    pub limit: usize,
    pub headroom: usize,
}

/// The plan for one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetPlan {
    pub target: Target,
    pub pools: BTreeSet<PoolName>,
    /// Sorted: removes, updates, adds, then the rest.
    pub changes: Vec<Change>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<PlanError>,
    /// Remove before adding, because adding first would pass the quota.
    pub remove_first: bool,
    pub usage: Usage,
    /// What someone else must do for these writes to happen (a Shared VPC host project's
    /// network admin). Filled in by the provider after planning, never by the planner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<ManualSteps>,
    /// What the provider learned about this target while resolving its pools
    /// ([`PoolTarget::payload`]), sorted, each once; for the provider's `manual_steps`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<String>,
    /// The observation this plan was made from, for the ownership guard before a write.
    /// Not serialised: a plan read back from a file is guarded against a fresh read.
    #[serde(skip)]
    pub observed: Option<Arc<Observation>>,
}

/// Commands a person with more rights than the operator runs to carry out a target's writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManualSteps {
    /// Why, and who must run them.
    pub reason: String,
    /// One command per write, in the order they must run.
    pub commands: Vec<String>,
}

impl TargetPlan {
    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action == action).count()
    }

    pub fn has_writes(&self) -> bool {
        self.changes.iter().any(|c| c.action.is_write())
    }

    pub fn of(&self, action: Action) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(move |c| c.action == action)
    }
}

/// A pool in the plan, and how it resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolReport {
    pub name: PoolName,
    pub managed: bool,
    pub nodes: usize,
    pub targets: Vec<PoolTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The kind of `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
}

/// Totals over all targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub add: usize,
    pub remove: usize,
    pub update: usize,
    pub unchanged: usize,
    pub keep: usize,
    pub satisfied_by_foreign: usize,
    pub errors: usize,
}

/// The whole plan: what would change on every target, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub format_version: u32,
    pub cluster: String,
    pub provider: String,
    pub targets: Vec<TargetPlan>,
    pub pools: Vec<PoolReport>,
    pub services: Arc<Vec<ServiceReport>>,
    /// Every namespace policy and how it fared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<crate::policy::PolicyReport>,
    pub unpooled_nodes: Vec<String>,
    /// Every warning, with a stable kind (what `plan --strict` fails on).
    pub warnings: Vec<crate::warnings::Warning>,
    pub summary: Summary,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        self.targets
            .iter()
            .any(|t| t.error.is_none() && t.has_writes())
    }

    pub fn has_errors(&self) -> bool {
        self.summary.errors > 0
    }
}

/// Plans every target. Pure and deterministic: the same inputs give the same plan.
///
/// `resolutions` maps each managed pool to its targets; `observations` maps each target to
/// what was seen there. A pool that failed to resolve pins the rules that name it on every
/// target, so a broken discovery never turns into deletions.
pub fn plan(
    desired: &Desired,
    provider: &str,
    resolutions: &BTreeMap<PoolName, PoolResolution>,
    observations: &BTreeMap<Target, ObservationResult>,
    renderer: &dyn Render,
) -> Plan {
    let failed_pools: BTreeSet<&PoolName> = resolutions
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(p, _)| p)
        .collect();

    // target -> scope -> pools
    let mut layout: BTreeMap<&Target, BTreeMap<Option<&str>, BTreeSet<PoolName>>> = BTreeMap::new();
    for (pool, res) in resolutions {
        if let Ok(targets) = res {
            for pt in targets {
                layout
                    .entry(&pt.target)
                    .or_default()
                    .entry(pt.scope.as_deref())
                    .or_default()
                    .insert(pool.clone());
            }
        }
    }

    // Two pools on one target and scope cannot be told apart there: a Service asking for
    // one of them opens on both.
    let mut warnings = crate::warnings::of(desired);
    for (target, scopes) in &layout {
        for pools in scopes.values().filter(|p| p.len() > 1) {
            let names: Vec<&str> = pools.iter().map(PoolName::as_str).collect();
            warnings.push(crate::warnings::Warning::new(
                crate::warnings::WarningKind::SharedTarget,
                Some(target.to_string()),
                format!(
                    "pools {} resolve to the same target {target}: a Service meant for one of them opens on all of them; give each pool its own target in the config",
                    names.join(", ")
                ),
            ));
        }
    }

    // What providers said about what they read, each message once.
    let said: BTreeSet<&str> = observations
        .values()
        .filter_map(|o| o.as_ref().ok())
        .flat_map(|o| o.warnings.iter().map(String::as_str))
        .collect();
    for message in said {
        warnings.push(crate::warnings::Warning::new(
            crate::warnings::WarningKind::Provider,
            None,
            message.to_string(),
        ));
    }

    // A target that was read but that no managed pool maps to was found by our marker
    // (`Provider::owned_targets`): the rules of ours there are orphans, planned against
    // nothing wanted, so they go unless something pins them.
    for target in observations.keys() {
        layout.entry(target).or_default();
    }

    // Targets that share a pool's rules (spread) are planned together; the others are
    // independent: plan them on all cores. Still pure: no I/O, and the result does not
    // depend on the number of threads.
    let groups = spread::groups(resolutions);
    let grouped: BTreeSet<&Target> = groups.iter().flatten().copied().collect();
    type Jobs<'a> = Vec<(&'a Target, ScopePools<'a>)>;
    let (together, jobs): (Jobs<'_>, Jobs<'_>) =
        layout.into_iter().partition(|(t, _)| grouped.contains(t));
    let together: BTreeMap<&Target, ScopePools<'_>> = together.into_iter().collect();
    let one = |(target, scopes): &(&Target, ScopePools<'_>)| {
        plan_one(
            desired,
            target,
            scopes,
            observations.get(*target),
            renderer,
            &failed_pools,
        )
    };
    let mut targets: Vec<TargetPlan> = crate::parallel::par_map(&jobs, 1, one);
    for members in &groups {
        targets.extend(spread::plan_group(
            desired,
            members,
            &together,
            observations,
            renderer,
            &failed_pools,
        ));
    }
    targets.sort_by(|a, b| a.target.cmp(&b.target));
    // What resolving learned about each target goes with its plan, for the provider.
    for tp in &mut targets {
        let mut learned: Vec<String> = resolutions
            .values()
            .flatten()
            .flatten()
            .filter(|pt| pt.target == tp.target)
            .filter_map(|pt| pt.payload.clone())
            .collect();
        learned.sort();
        learned.dedup();
        tp.resolved = learned;
    }

    let pools = desired
        .pools
        .values()
        .map(|p| PoolReport {
            name: p.name.clone(),
            managed: p.managed,
            nodes: p.nodes.len(),
            targets: match resolutions.get(&p.name) {
                Some(Ok(t)) => t.clone(),
                _ => Vec::new(),
            },
            error: match resolutions.get(&p.name) {
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            },
            error_kind: match resolutions.get(&p.name) {
                Some(Err(e)) => Some(e.kind),
                _ => None,
            },
        })
        .collect::<Vec<_>>();

    let mut summary = Summary::default();
    for t in &targets {
        // Writes are counted only where they will happen: a target with a plan error is
        // refused as a whole.
        if t.error.is_none() {
            summary.add += t.count(Action::Add);
            summary.remove += t.count(Action::Remove);
            summary.update += t.count(Action::Update);
        }
        summary.unchanged += t.count(Action::Unchanged);
        summary.keep += t.count(Action::Keep);
        summary.satisfied_by_foreign += t.count(Action::SatisfiedByForeign);
        summary.errors += usize::from(t.error.is_some());
    }
    // A pool with no nodes (scaled to zero) may have no target to discover: its rules are
    // kept, and that is not an error.
    summary.errors += pools
        .iter()
        .filter(|p| p.error.is_some() && p.nodes > 0)
        .count();

    Plan {
        format_version: PLAN_FORMAT_VERSION,
        cluster: desired.cluster.clone(),
        provider: provider.to_string(),
        targets,
        pools,
        services: Arc::clone(&desired.services),
        policies: desired.policies.clone(),
        unpooled_nodes: desired.unpooled_nodes.clone(),
        warnings,
        summary,
    }
}

/// The pools of one target, by the scope their rules apply to inside it.
pub(super) type ScopePools<'a> = BTreeMap<Option<&'a str>, BTreeSet<PoolName>>;

/// Renders and diffs one target.
fn plan_one(
    desired: &Desired,
    target: &Target,
    scopes: &ScopePools<'_>,
    observation: Option<&ObservationResult>,
    renderer: &dyn Render,
    failed_pools: &BTreeSet<&PoolName>,
) -> TargetPlan {
    let pools: BTreeSet<PoolName> = scopes.values().flatten().cloned().collect();
    let observation = match observation {
        Some(Ok(o)) => o,
        Some(Err(failure)) => return errored(target, pools, PlanError::observe(failure)),
        None => {
            let failure = Failure::new(ErrorKind::Other, "not observed");
            return errored(target, pools, PlanError::observe(&failure));
        }
    };
    let want = render_want(desired, target, scopes, observation, renderer);
    plan_target(
        target,
        pools,
        want,
        observation,
        desired,
        failed_pools,
        renderer,
    )
}

/// The rules the pools of a target want there, rendered under its limits.
pub(super) fn render_want(
    desired: &Desired,
    target: &Target,
    scopes: &ScopePools<'_>,
    observation: &Observation,
    renderer: &dyn Render,
) -> Vec<Rule> {
    let mut want = Vec::new();
    for (scope, scope_pools) in scopes {
        let pool_set: PoolSet = scope_pools.iter().cloned().collect();
        // Pools that share a scope share their grant layers: each layer once.
        let mut layers: Vec<&Arc<Vec<Grant>>> = Vec::new();
        for pool in scope_pools
            .iter()
            .filter_map(|p| desired.pools.get(p))
            .filter(|p| p.managed)
        {
            for layer in &pool.grants {
                if !layers.iter().any(|l| Arc::ptr_eq(l, layer)) {
                    layers.push(layer);
                }
            }
        }
        let grants: Vec<&Grant> = layers.iter().flat_map(|l| l.iter()).collect();
        let ctx = RenderContext {
            cluster: &desired.cluster,
            target,
            scope: *scope,
            pools: &pool_set,
            limits: &observation.limits,
            port_merge: desired.port_merge,
        };
        want.extend(renderer.render(&ctx, &grants));
    }
    want
}

pub(super) fn errored(target: &Target, pools: BTreeSet<PoolName>, error: PlanError) -> TargetPlan {
    TargetPlan {
        target: target.clone(),
        pools,
        changes: Vec::new(),
        error: Some(error),
        remove_first: false,
        usage: Usage::default(),
        manual: None,
        resolved: Vec::new(),
        observed: None,
    }
}

/// Diffs one target. `want` is the rendered desired state of the whole target.
pub fn plan_target(
    target: &Target,
    pools: BTreeSet<PoolName>,
    want: Vec<Rule>,
    observation: &Observation,
    desired: &Desired,
    failed_pools: &BTreeSet<&PoolName>,
    renderer: &dyn Render,
) -> TargetPlan {
    let inputs = matching::Inputs {
        observation,
        desired,
        failed_pools,
        renderer,
        denies: shadow::denies(observation),
    };
    let mut changes = matching::match_rules(want, &inputs);
    ordering::note_closed(&mut changes, &desired.closed);
    ordering::note_orphans(&mut changes, &pools, desired, failed_pools);
    ordering::sort(&mut changes);
    let quota::Verdict {
        mut error,
        usage,
        mut remove_first,
    } = quota::check(&changes, observation, renderer);
    if let Some(range) = observation.limits.priorities {
        let placed = ordering::place(&mut changes, observation, range, &mut remove_first);
        error = error.or(placed);
    } else if let Some(own) = observation.limits.own_priority {
        error = error.or_else(|| shadow::check_fixed(&changes, observation, own));
    }
    TargetPlan {
        target: target.clone(),
        pools,
        changes,
        error,
        remove_first,
        usage,
        manual: None,
        resolved: Vec::new(),
        observed: Some(Arc::new(observation.clone())),
    }
}

#[cfg(test)]
mod shadow_tests;
#[cfg(test)]
mod tests;

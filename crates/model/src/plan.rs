//! The planner: per target, compare the desired rules with the rules observed there and
//! decide what to add, remove, change or keep.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap as HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::desired::{Desired, Grant, ServiceReport};
use crate::net::IpFamily;
use crate::node::PoolName;
use crate::render::{Render, RenderContext};
use crate::rule::{Rule, RuleContent};
use crate::set::PoolSet;
pub use crate::target::{Observation, ObservedRule, PoolResolution, PoolTarget, Target};

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
}

/// Why a target's plan cannot be applied. Reported before any write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum PlanError {
    /// More rules than the target allows.
    RuleQuota {
        #[serde(skip_serializing_if = "Option::is_none")]
        family: Option<IpFamily>,
        ours: usize,
        foreign: usize,
        limit: usize,
        /// Why the limit is what it is, when not simply the cloud's quota.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// More source prefixes than the target allows in total.
    SourceQuota {
        ours: usize,
        foreign: usize,
        limit: usize,
    },
    /// More destination prefixes than the target allows in total (Azure NSG).
    DestinationQuota {
        ours: usize,
        foreign: usize,
        limit: usize,
    },
    /// A rendered rule breaks a per-rule limit (a renderer bug, caught before the cloud does).
    RuleShape { message: String },
    /// The provider could not read the target.
    Observe { message: String },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::RuleQuota {
                family,
                ours,
                foreign,
                limit,
                reason,
            } => {
                let fam = family.map(|f| format!(" {f}")).unwrap_or_default();
                write!(
                    f,
                    "rule quota exceeded: {ours} rules of ours + {foreign} of others = {}{fam} rules, limit {limit}",
                    ours + foreign
                )?;
                match reason {
                    Some(r) => write!(f, " ({r})"),
                    None => Ok(()),
                }
            }
            PlanError::SourceQuota {
                ours,
                foreign,
                limit,
            } => write!(
                f,
                "source prefix quota exceeded: {ours} of ours + {foreign} of others = {}, limit {limit}",
                ours + foreign
            ),
            PlanError::DestinationQuota {
                ours,
                foreign,
                limit,
            } => write!(
                f,
                "destination prefix quota exceeded: {ours} of ours + {foreign} of others = {}, limit {limit}",
                ours + foreign
            ),
            PlanError::RuleShape { message } => write!(f, "invalid rule: {message}"),
            PlanError::Observe { message } => write!(f, "cannot read target: {message}"),
        }
    }
}

/// Rule counts on a target once the plan is applied.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub ours: usize,
    pub foreign: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
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
    observations: &BTreeMap<Target, Result<Observation, String>>,
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

    // Targets are independent: plan them on all cores. Still pure: no I/O, and the
    // result does not depend on the number of threads.
    let jobs: Vec<(&Target, ScopePools<'_>)> = layout.into_iter().collect();
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
    targets.sort_by(|a, b| a.target.cmp(&b.target));

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
                Some(Err(e)) => Some(e.clone()),
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
        warnings: crate::warnings::of(desired),
        summary,
    }
}

/// The pools of one target, by the scope their rules apply to inside it.
type ScopePools<'a> = BTreeMap<Option<&'a str>, BTreeSet<PoolName>>;

/// Renders and diffs one target.
fn plan_one(
    desired: &Desired,
    target: &Target,
    scopes: &ScopePools<'_>,
    observation: Option<&Result<Observation, String>>,
    renderer: &dyn Render,
    failed_pools: &BTreeSet<&PoolName>,
) -> TargetPlan {
    let pools: BTreeSet<PoolName> = scopes.values().flatten().cloned().collect();
    let observation = match observation {
        Some(Ok(o)) => o,
        Some(Err(message)) => {
            return errored(
                target,
                pools,
                PlanError::Observe {
                    message: message.clone(),
                },
            );
        }
        None => {
            let message = "not observed".to_string();
            return errored(target, pools, PlanError::Observe { message });
        }
    };
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

fn errored(target: &Target, pools: BTreeSet<PoolName>, error: PlanError) -> TargetPlan {
    TargetPlan {
        target: target.clone(),
        pools,
        changes: Vec::new(),
        error: Some(error),
        remove_first: false,
        usage: Usage::default(),
        manual: None,
    }
}

fn change(action: Action, rule: Rule, id: Option<String>) -> Change {
    Change {
        action,
        rule,
        id,
        previous: None,
        note: None,
    }
}

/// Diffs one target. `want` is the rendered desired state of the whole target.
pub fn plan_target(
    target: &Target,
    pools: BTreeSet<PoolName>,
    mut want: Vec<Rule>,
    observation: &Observation,
    desired: &Desired,
    failed_pools: &BTreeSet<&PoolName>,
    renderer: &dyn Render,
) -> TargetPlan {
    // Invalid Services' rules are kept; closed Services' rules go, and the plan says why.
    let pinned_services = &desired.pinned;
    let closed_services = &desired.closed;
    want.sort_unstable_by(|a, b| a.content.cmp(&b.content));
    want.dedup_by(|a, b| a.content == b.content);
    let limits = &observation.limits;

    let (owned, foreign): (Vec<&ObservedRule>, Vec<&ObservedRule>) =
        observation.rules.iter().partition(|r| r.owned);
    let pin_reason = |r: &ObservedRule| -> Option<String> {
        if let Some(s) = r
            .rule
            .services
            .iter()
            .find(|s| pinned_services.contains(*s))
        {
            return Some(format!("kept: {s} has invalid annotations"));
        }
        r.rule
            .pools
            .iter()
            .find(|p| failed_pools.contains(p))
            .map(|p| format!("kept: pool {p} could not be resolved"))
    };

    let mut changes = Vec::new();
    let mut matched = vec![false; owned.len()];
    let mut pinned_content: BTreeSet<RuleContent> = BTreeSet::new();
    let mut pinned_names: BTreeSet<&str> = BTreeSet::new();
    for (i, r) in owned.iter().enumerate() {
        let Some(reason) = pin_reason(r) else {
            continue;
        };
        matched[i] = true;
        if let Some(n) = &r.rule.name {
            pinned_names.insert(n);
        }
        match crate::narrow::narrow(&r.rule, desired) {
            None => {
                pinned_content.insert(r.rule.content.clone());
                let mut c = change(Action::Keep, r.rule.clone(), r.id.clone());
                c.note = Some(reason);
                changes.push(c);
            }
            // What the policy closes goes even from a kept rule; the rest stays kept.
            Some(n) => {
                let closed = format!("closed: {}", n.why.join("; "));
                if n.rule.content.ports.is_empty() {
                    let mut c = change(Action::Remove, r.rule.clone(), r.id.clone());
                    c.note = Some(closed);
                    changes.push(c);
                } else if r.rule.name.is_some() && limits.updates_in_place {
                    pinned_content.insert(n.rule.content.clone());
                    let mut c = change(Action::Update, n.rule, r.id.clone());
                    c.previous = Some(r.rule.clone());
                    c.note = Some(format!("{closed}; the rest is {reason}"));
                    changes.push(c);
                } else {
                    pinned_content.insert(n.rule.content.clone());
                    let mut rest = n.rule;
                    if let Some(name) = &rest.name {
                        rest.name = Some(format!("{name}-n"));
                    }
                    let mut add = change(Action::Add, rest, None);
                    add.note = Some(format!(
                        "the part of {{{}}} that stays {reason}",
                        r.id.as_deref().unwrap_or("?")
                    ));
                    changes.push(add);
                    let mut c = change(Action::Remove, r.rule.clone(), r.id.clone());
                    c.note = Some(closed);
                    changes.push(c);
                }
            }
        }
    }
    let mut by_name: HashMap<&str, usize> = HashMap::default();
    let mut by_content: HashMap<&RuleContent, Vec<usize>> = HashMap::default();
    for (i, r) in owned.iter().enumerate() {
        if matched[i] {
            continue;
        }
        if let Some(n) = &r.rule.name {
            by_name.insert(n, i);
        }
        by_content.entry(&r.rule.content).or_default().push(i);
    }
    let foreign_content: HashMap<&RuleContent, &ObservedRule> =
        foreign.iter().map(|r| (&r.rule.content, *r)).collect();

    for mut rule in want {
        // A named rule is the same rule as the observed one of that name.
        if let Some(i) = rule.name.as_deref().and_then(|n| by_name.get(n)).copied()
            && !matched[i]
            && (owned[i].rule.content == rule.content || limits.updates_in_place)
        {
            matched[i] = true;
            changes.push(same_or_update(rule, owned[i]));
            continue;
        }
        // Otherwise a rule with the same content is the same rule.
        if let Some(i) = by_content
            .get(&rule.content)
            .and_then(|c| c.iter().find(|&&i| !matched[i]))
            .copied()
        {
            matched[i] = true;
            let old = owned[i];
            // Keep the observed name: it is what the cloud knows the rule by.
            rule.name = old.rule.name.clone();
            changes.push(same_or_update(rule, old));
            continue;
        }
        if pinned_content.contains(&rule.content) {
            continue; // served by a kept rule with exactly this content
        }
        if let Some(f) = foreign_content.get(&rule.content) {
            let mut c = change(Action::SatisfiedByForeign, rule, f.id.clone());
            c.note = Some(
                "already allowed by a rule nodeport-firewall does not own; left as is".to_string(),
            );
            changes.push(c);
            continue;
        }
        if let Some(name) = rule.name.clone()
            && (pinned_names.contains(name.as_str()) || by_name.contains_key(name.as_str()))
        {
            // The name is held by a kept rule (or by one that cannot be updated in place):
            // add under a derived name rather than touch it.
            rule.name = Some(format!("{name}-n"));
        }
        changes.push(change(Action::Add, rule, None));
    }
    for (i, r) in owned.iter().enumerate() {
        if !matched[i] {
            changes.push(change(Action::Remove, r.rule.clone(), r.id.clone()));
        }
    }
    // A removal because the policy closed a Service says so: it is not a silent removal.
    if !closed_services.is_empty() {
        for c in changes
            .iter_mut()
            .filter(|c| matches!(c.action, Action::Remove | Action::Update))
        {
            let was = match c.action {
                Action::Remove => Some(&c.rule),
                _ => c.previous.as_ref(),
            };
            let why: Vec<String> = was
                .into_iter()
                .flat_map(|r| r.services.iter())
                .filter(|s| !(c.action == Action::Update && c.rule.services.contains(*s)))
                .filter_map(|s| closed_services.get(s).map(|why| format!("{s}: {why}")))
                .collect();
            if !why.is_empty() && c.note.is_none() {
                c.note = Some(format!("closed: {}", why.join("; ")));
            }
        }
    }
    // Removes, updates, adds, then the rest; each group by content. One sort: changes are
    // large to move.
    let rank = |a: Action| match a {
        Action::Remove => 0u8,
        Action::Update => 1,
        Action::Add => 2,
        other => 3 + other as u8,
    };
    changes.sort_unstable_by(|a, b| {
        (rank(a.action), &a.rule.content, &a.rule.name, &a.id).cmp(&(
            rank(b.action),
            &b.rule.content,
            &b.rule.name,
            &b.id,
        ))
    });

    // Limits, counted on the state after the plan.
    let mut error = changes
        .iter()
        .filter(|c| matches!(c.action, Action::Add | Action::Update))
        .find_map(|c| limits.check_rule(&c.rule))
        .map(|message| PlanError::RuleShape { message });
    let after: Vec<&Rule> = changes
        .iter()
        .filter(|c| {
            matches!(
                c.action,
                Action::Add | Action::Update | Action::Unchanged | Action::Keep
            )
        })
        .map(|c| &c.rule)
        .collect();
    let families: Vec<Option<IpFamily>> = if limits.rules_counted_per_family {
        vec![Some(IpFamily::V4), Some(IpFamily::V6)]
    } else {
        vec![None]
    };
    let in_family = |r: &Rule, f: Option<IpFamily>| f.is_none_or(|f| r.content.family == f);
    let mut remove_first = false;
    let mut usage = Usage {
        ours: after.len(),
        foreign: foreign.len(),
        limit: limits.max_rules,
    };
    if let Some(limit) = limits.max_rules {
        for fam in families {
            let ours = after.iter().filter(|r| in_family(r, fam)).count();
            let theirs = foreign.iter().filter(|r| in_family(&r.rule, fam)).count();
            if ours + theirs > limit && error.is_none() {
                error = Some(PlanError::RuleQuota {
                    family: fam,
                    ours,
                    foreign: theirs,
                    limit,
                    reason: limits.max_rules_reason.clone(),
                });
            }
            let now = owned.iter().filter(|r| in_family(&r.rule, fam)).count();
            let adds = changes
                .iter()
                .filter(|c| c.action == Action::Add && in_family(&c.rule, fam))
                .count();
            let removes = changes
                .iter()
                .filter(|c| c.action == Action::Remove && in_family(&c.rule, fam))
                .count();
            if now + adds + theirs > limit && removes > 0 {
                remove_first = true;
            }
        }
    }
    if let Some(limit) = limits.max_total_sources {
        let ours: usize = after.iter().map(|r| r.content.sources.len()).sum();
        let theirs: usize = foreign.iter().map(|r| r.rule.content.sources.len()).sum();
        if ours + theirs > limit && error.is_none() {
            error = Some(PlanError::SourceQuota {
                ours,
                foreign: theirs,
                limit,
            });
        }
    }
    if let Some(limit) = limits.max_total_destinations {
        let ours: usize = after.iter().map(|r| renderer.destinations(r)).sum();
        let theirs: usize = foreign.iter().map(|r| renderer.destinations(&r.rule)).sum();
        if ours + theirs > limit && error.is_none() {
            error = Some(PlanError::DestinationQuota {
                ours,
                foreign: theirs,
                limit,
            });
        }
    }
    usage.ours = after.len();
    TargetPlan {
        target: target.clone(),
        pools,
        changes,
        error,
        remove_first,
        usage,
        manual: None,
    }
}

fn same_or_update(rule: Rule, old: &ObservedRule) -> Change {
    if rule == old.rule {
        change(Action::Unchanged, rule, old.id.clone())
    } else {
        let mut c = change(Action::Update, rule, old.id.clone());
        c.previous = Some(old.rule.clone());
        c
    }
}

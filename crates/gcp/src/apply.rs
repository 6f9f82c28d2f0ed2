//! Carrying out a target's plan on GCP. Every rule a remove or update names is first checked
//! to be ours against what Compute says; then the writes run in phases (adds and updates
//! before removes unless the plan says otherwise), `writeConcurrency` at a time. A write
//! that finds the cloud moved on (409: the name exists, 404: the rule is gone) converges
//! instead of failing, and a refused write (403) says what a network admin must run.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;

use futures::stream::{self, StreamExt};
use nodeport_firewall_model::{Action, Change, Rule, Target, TargetPlan};
use nodeport_firewall_provider::{ApplyReport, Error, ErrorKind, Provider, Result, Writes};
use tracing::{info, warn};

use crate::network_admin::NetworkAdmin;
use crate::{GcpProvider, invalid};

impl GcpProvider {
    /// Carries out `plan`'s writes.
    pub(crate) async fn apply_plan(&self, plan: &TargetPlan) -> Result<ApplyReport> {
        let Writes {
            removes,
            updates,
            adds,
            existing: names,
        } = Writes::of(plan)?;
        let target = &plan.target;

        // Never change a rule that is not ours: check every name against what Compute said.
        let gone = if names.is_empty() {
            BTreeSet::new()
        } else {
            self.check_owned(target, &names).await?
        };
        let all: Vec<&Change> = removes
            .iter()
            .chain(updates.iter())
            .chain(adds.iter())
            .copied()
            .collect();
        let indexed: Vec<(usize, &Change)> = all.iter().copied().enumerate().collect();
        let (r, rest) = indexed.split_at(removes.len());
        let (u, a) = rest.split_at(updates.len());
        let phases: [&[(usize, &Change)]; 3] = if plan.remove_first {
            [r, u, a]
        } else {
            // Add before revoke: a Service never loses access while its rules move.
            [u, a, r]
        };
        let mut report = ApplyReport::default();
        let mut done = BTreeSet::new();
        let mut failure = None;
        for phase in phases {
            if phase.is_empty() {
                continue;
            }
            if let Some(e) = self
                .run_group(target, phase, &gone, &mut report, &mut done)
                .await
            {
                failure = Some(e);
                break;
            }
        }
        if let Ok(mut s) = self.seen.lock() {
            s.remove(&target.id);
        }
        match failure {
            None => {
                if let Ok(mut n) = self.network_admin.lock()
                    && n.get(&target.id) == Some(&NetworkAdmin::Forbidden)
                {
                    n.remove(&target.id);
                }
                info!(target = %target, added = report.added, updated = report.updated, removed = report.removed, "applied firewall changes");
                Ok(report)
            }
            Some(mut e) if e.kind == ErrorKind::PermissionDenied => {
                if let Ok(mut n) = self.network_admin.lock() {
                    n.insert(target.id.clone(), NetworkAdmin::Forbidden);
                }
                let pending: Vec<&Change> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !done.contains(i))
                    .map(|(_, c)| *c)
                    .collect();
                let (project, _) = Self::split_target(target)?;
                let commands = self.gcloud_commands(target, &pending);
                let reason = e.code.take().map(|c| format!(" ({c})")).unwrap_or_default();
                e.message = format!(
                    "{}{reason}. Writes to firewall rules of project {project} are forbidden for these credentials; in a Shared VPC the host project's network admin must make them. Firewall change required by network admin ({} command(s)):\n{}",
                    e.message,
                    commands.len(),
                    commands.join("\n")
                );
                Err(e)
            }
            Some(e) => Err(e),
        }
    }

    async fn insert(&self, target: &Target, rule: &Rule) -> Result<()> {
        let (project, _) = Self::split_target(target)?;
        let body = self.body(target, rule, true)?;
        self.insert_firewall(project, body).await
    }

    async fn patch(&self, target: &Target, name: &str, rule: &Rule) -> Result<()> {
        let (project, _) = Self::split_target(target)?;
        let body = self.body(target, rule, false)?;
        self.patch_firewall(project, name, body).await
    }

    async fn delete(&self, target: &Target, name: &str) -> Result<()> {
        let (project, _) = Self::split_target(target)?;
        self.delete_firewall(project, name).await
    }

    /// Inserts a rule. A 409 (the name exists) re-reads the rule: ours is converged to the
    /// wanted content, anyone else's is left alone and reported.
    async fn add(&self, target: &Target, rule: &Rule) -> Result<Outcome> {
        match self.insert(target, rule).await {
            Ok(()) => Ok(Outcome::Added),
            Err(e) if e.kind == ErrorKind::Conflict => {
                let (project, _) = Self::split_target(target)?;
                let name = rule.name.clone().unwrap_or_default();
                let existing = self.get_firewall(project, &name).await?;
                // Names are unique per project, not per network: ours on another network
                // (the config's network changed) is not this rule.
                let (_, network) = Self::split_target(target)?;
                let here = format!("projects/{project}/global/networks/{network}");
                if !existing
                    .network
                    .as_deref()
                    .is_some_and(|n| n.ends_with(&here))
                {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "a firewall rule named {name} already exists in project {project} on another network ({}); it is left alone. Delete it or use another clusterName",
                            existing.network.as_deref().unwrap_or("unknown")
                        ),
                    )
                    .with_code("alreadyExists"));
                }
                let observed = self.to_observed(&existing);
                match observed {
                    Some(o) if o.owned && o.rule == *rule => Ok(Outcome::Adopted(format!(
                        "rule {name} already existed as wanted (an earlier attempt or another replica); adopted"
                    ))),
                    Some(o) if o.owned => {
                        self.patch(target, &name, rule).await?;
                        Ok(Outcome::Converged(format!(
                            "rule {name} already existed with other content; updated to the plan"
                        )))
                    }
                    _ => Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "a firewall rule named {name} exists in project {project} and is not owned by cluster {}; it is left alone. Rename or delete it",
                            self.cluster
                        ),
                    )
                    .with_code("alreadyExists")),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Runs one change. `gone`: names absent from a fresh read (see `check_owned`).
    async fn run_change(
        &self,
        target: &Target,
        c: &Change,
        gone: &BTreeSet<String>,
    ) -> Result<Outcome> {
        let name = c.id.as_deref().unwrap_or_default();
        match c.action {
            Action::Add => self.add(target, &c.rule).await,
            // Absent from a fresh read: insert (whose 409 checks ownership), never patch.
            Action::Update if gone.contains(name) => {
                let mut rule = c.rule.clone();
                rule.name = Some(name.to_string());
                self.add(target, &rule).await.map(|_| {
                    Outcome::Converged(format!("rule {name} was gone when updated; created again"))
                })
            }
            Action::Remove if gone.contains(name) => Ok(Outcome::Gone(format!(
                "rule {name} no longer exists; nothing to do"
            ))),
            Action::Update => match self.patch(target, name, &c.rule).await {
                Ok(()) => Ok(Outcome::Updated),
                Err(e) if e.kind == ErrorKind::NotFound => {
                    let mut rule = c.rule.clone();
                    rule.name = Some(name.to_string());
                    self.add(target, &rule).await.map(|_| {
                        Outcome::Converged(format!(
                            "rule {name} was gone when updated; created again"
                        ))
                    })
                }
                Err(e) => Err(e),
            },
            Action::Remove => match self.delete(target, name).await {
                Ok(()) => Ok(Outcome::Removed),
                Err(e) if e.kind == ErrorKind::NotFound => Ok(Outcome::Gone(format!(
                    "rule {name} no longer exists; nothing to do"
                ))),
                Err(e) => Err(e),
            },
            _ => Ok(Outcome::Nothing),
        }
    }

    /// Runs a group of changes (indexed into the plan's writes), `write_concurrency` at a
    /// time; every change is attempted. Returns the first failure, a permission error first.
    async fn run_group(
        &self,
        target: &Target,
        changes: &[(usize, &Change)],
        gone: &BTreeSet<String>,
        report: &mut ApplyReport,
        done: &mut BTreeSet<usize>,
    ) -> Option<Error> {
        type Pending<'a> =
            std::pin::Pin<Box<dyn Future<Output = (usize, Result<Outcome>)> + Send + 'a>>;
        let futures: Vec<Pending<'_>> = changes
            .iter()
            .map(|&(i, c)| -> Pending<'_> {
                Box::pin(async move { (i, self.run_change(target, c, gone).await) })
            })
            .collect();
        let results: Vec<(usize, Result<Outcome>)> = stream::iter(futures)
            .buffer_unordered(self.config.write_concurrency)
            .collect()
            .await;
        let mut first: Option<Error> = None;
        for (i, r) in results {
            match r {
                Ok(outcome) => {
                    done.insert(i);
                    outcome.record(report);
                }
                Err(e) => {
                    warn!(target = %target, error = %e, "firewall write failed");
                    let better = first.as_ref().is_none_or(|f| {
                        f.kind != ErrorKind::PermissionDenied
                            && e.kind == ErrorKind::PermissionDenied
                    });
                    if better {
                        first = Some(e);
                    }
                }
            }
        }
        first
    }

    /// Refuses unless every rule named in `names` is ours per the last observation of
    /// `target`, re-reading it when that observation does not know them all. Returns the
    /// names absent even from a fresh read: they are not patched or deleted by name (a
    /// rule of that name could be someone else's by now) but re-created or skipped.
    async fn check_owned(&self, target: &Target, names: &[&str]) -> Result<BTreeSet<String>> {
        let seen_now = || -> Result<HashMap<String, bool>> {
            let seen = self
                .seen
                .lock()
                .map_err(|_| invalid("the observation of this target is unavailable"))?;
            Ok(seen.get(&target.id).cloned().unwrap_or_default())
        };
        let mut seen = seen_now()?;
        if !names.iter().all(|n| seen.contains_key(*n)) {
            self.observe(target).await?;
            seen = seen_now()?;
        }
        let mut gone = BTreeSet::new();
        for n in names {
            match seen.get(*n) {
                Some(true) => {}
                Some(false) => {
                    return Err(invalid(format!(
                        "rule {n} on {target} is not owned by cluster {}; refusing to change it",
                        self.cluster
                    )));
                }
                None => {
                    gone.insert((*n).to_string());
                }
            }
        }
        Ok(gone)
    }
}

/// What one change did.
#[derive(Debug)]
enum Outcome {
    Added,
    Updated,
    Removed,
    /// The rule existed as wanted already.
    Adopted(String),
    /// The rule existed (or was gone) and was brought to the plan another way.
    Converged(String),
    Gone(String),
    Nothing,
}

impl Outcome {
    fn record(self, report: &mut ApplyReport) {
        match self {
            Outcome::Added => report.added += 1,
            Outcome::Updated => report.updated += 1,
            Outcome::Removed => report.removed += 1,
            Outcome::Adopted(note) => {
                report.added += 1;
                report.notes.push(note);
            }
            Outcome::Converged(note) => {
                report.updated += 1;
                report.notes.push(note);
            }
            Outcome::Gone(note) => report.notes.push(note),
            Outcome::Nothing => {}
        }
    }
}

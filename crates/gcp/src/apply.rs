//! Carrying out a target's plan on GCP, exactly: the engine has checked every rule a remove
//! or update names against the observation the plan was made from; the writes run in the
//! plan's phases (adds and updates before removes unless the plan says otherwise),
//! `writeConcurrency` at a time. A write that finds the cloud moved on (409: the name
//! exists, 404: the rule is gone) is reported as a conflict and the next plan decides; a
//! refused write (403) says what a network admin must run. A failure part-way reports what
//! was written before it.

use std::collections::BTreeSet;
use std::future::Future;

use futures::stream::{self, StreamExt};
use nodeport_firewall_model::{Action, Change, Rule, Target, TargetPlan};
use nodeport_firewall_provider::{ApplyFailure, ApplyReport, Error, ErrorKind, Result, Writes};
use tracing::{info, warn};

use crate::GcpProvider;

impl GcpProvider {
    /// Carries out `plan`'s writes.
    pub(crate) async fn apply_plan(
        &self,
        plan: &TargetPlan,
    ) -> std::result::Result<ApplyReport, ApplyFailure> {
        let Writes {
            removes,
            updates,
            adds,
            ..
        } = Writes::of(plan)?;
        let target = &plan.target;
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
            if let Some(e) = self.run_group(target, phase, &mut report, &mut done).await {
                failure = Some(e);
                break;
            }
        }
        match failure {
            None => {
                info!(target = %target, added = report.added, updated = report.updated, removed = report.removed, "applied firewall changes");
                Ok(report)
            }
            Some(mut e) if e.kind == ErrorKind::PermissionDenied => {
                let pending: Vec<&Change> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !done.contains(i))
                    .map(|(_, c)| *c)
                    .collect();
                let (project, _) =
                    Self::split_target(target).map_err(|e| ApplyFailure::after(&report, e))?;
                let commands = self.gcloud_commands(target, &pending);
                let reason = e.code.take().map(|c| format!(" ({c})")).unwrap_or_default();
                e.message = format!(
                    "{}{reason}. Writes to firewall rules of project {project} are forbidden for these credentials; in a Shared VPC the host project's network admin must make them. Firewall change required by network admin ({} command(s)):\n{}",
                    e.message,
                    commands.len(),
                    commands.join("\n")
                );
                Err(ApplyFailure::after(&report, e))
            }
            Some(e) => Err(ApplyFailure::after(&report, e)),
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

    /// Runs one change, exactly as planned. When the cloud moved on since the observation
    /// (the name is taken, the rule is gone), it says so: the next plan, from a fresh read,
    /// decides what to do.
    async fn run_change(&self, target: &Target, c: &Change) -> Result<Outcome> {
        let name = c.id.as_deref().unwrap_or_default();
        let moved_on = |e: Error, what: String| {
            Error::new(
                ErrorKind::Conflict,
                format!("{what} since the plan was made; the next plan decides ({e})"),
            )
            .with_code(e.code.clone().unwrap_or_default())
        };
        match c.action {
            Action::Add => match self.insert(target, &c.rule).await {
                Ok(()) => Ok(Outcome::Added),
                Err(e) if e.kind == ErrorKind::Conflict => Err(moved_on(
                    e,
                    format!(
                        "a firewall rule named {} was created",
                        c.rule.name.as_deref().unwrap_or("?")
                    ),
                )),
                Err(e) => Err(e),
            },
            Action::Update => match self.patch(target, name, &c.rule).await {
                Ok(()) => Ok(Outcome::Updated),
                Err(e) if e.kind == ErrorKind::NotFound => {
                    Err(moved_on(e, format!("rule {name} was deleted")))
                }
                Err(e) => Err(e),
            },
            Action::Remove => match self.delete(target, name).await {
                Ok(()) => Ok(Outcome::Removed),
                // Already gone: what the plan wanted is so.
                Err(e) if e.kind == ErrorKind::NotFound => Ok(Outcome::Gone(format!(
                    "rule {name} no longer existed; nothing to do"
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
        report: &mut ApplyReport,
        done: &mut BTreeSet<usize>,
    ) -> Option<Error> {
        type Pending<'a> =
            std::pin::Pin<Box<dyn Future<Output = (usize, Result<Outcome>)> + Send + 'a>>;
        let futures: Vec<Pending<'_>> = changes
            .iter()
            .map(|&(i, c)| -> Pending<'_> {
                Box::pin(async move { (i, self.run_change(target, c).await) })
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
}

/// What one change did.
#[derive(Debug)]
enum Outcome {
    Added,
    Updated,
    Removed,
    /// A removed rule was gone already.
    Gone(String),
    Nothing,
}

impl Outcome {
    fn record(self, report: &mut ApplyReport) {
        match self {
            Outcome::Added => report.added += 1,
            Outcome::Updated => report.updated += 1,
            Outcome::Removed => report.removed += 1,
            Outcome::Gone(note) => report.notes.push(note),
            Outcome::Nothing => {}
        }
    }
}

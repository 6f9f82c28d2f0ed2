//! Carrying out a target's plan on an NSG, exactly, one writer per NSG. The engine has
//! checked every rule a remove or update names against the observation the plan was made
//! from, and that no add takes an existing rule's name (a PUT would replace it). Writes run
//! in the plan's order (adds first unless the plan removes first) at the plan's
//! priorities. A priority or name another writer took meanwhile is reported as a conflict:
//! the next plan, from a fresh read, decides. A failure part-way reports what was written.

use std::sync::Arc;

use nodeport_firewall_model::{Change, Rule, TargetPlan};
use nodeport_firewall_provider::{ApplyFailure, ApplyReport, Error, ErrorKind, Result, Writes};
use tracing::info;

use crate::wire::security_rule;
use crate::{AzureProvider, NsgId, invalid};

impl AzureProvider {
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
        let nsg = NsgId::parse(&plan.target.id).map_err(invalid)?;
        let writer = self.writer(&nsg.id());
        let _one_writer = writer.lock().await;
        let mut report = ApplyReport::default();
        let result = async {
            if plan.remove_first {
                self.remove_rules(&nsg, &removes, &mut report).await?;
            }
            for c in &updates {
                let name = c.id.as_deref().unwrap_or_default();
                let mut rule = c.rule.clone();
                rule.name = Some(name.to_string());
                // At the plan's priority, which may differ from the observed one (a rule of
                // ours moved before a Deny that shadows it): taken meanwhile is a conflict.
                self.put_rule(&nsg, &rule, planned_priority(c)?)
                    .await
                    .map_err(|e| moved_on(e, &nsg))?;
                report.updated += 1;
            }
            for c in &adds {
                self.put_rule(&nsg, &c.rule, planned_priority(c)?)
                    .await
                    .map_err(|e| moved_on(e, &nsg))?;
                report.added += 1;
            }
            if !plan.remove_first {
                self.remove_rules(&nsg, &removes, &mut report).await?;
            }
            Ok::<(), Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                info!(nsg = %nsg.name, added = report.added, updated = report.updated, removed = report.removed, "NSG rules written");
                Ok(report)
            }
            Err(e) => Err(ApplyFailure::after(&report, e)),
        }
    }

    fn writer(&self, nsg: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.writers.lock() {
            Ok(mut w) => w.entry(nsg.to_string()).or_default().clone(),
            // A poisoned map still serializes through a fresh lock per call: fail safe,
            // the NSG's own 429s then serialize us.
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Whether an apply of ours is writing to the NSG `nsg` now (it holds the writer).
    pub(crate) fn writing(&self, nsg: &str) -> bool {
        let writer = match self.writers.lock() {
            Ok(w) => w.get(nsg).cloned(),
            Err(_) => None,
        };
        writer.is_some_and(|w| w.try_lock().is_err())
    }

    /// PUTs one rule at `priority` and waits for it: the whole rule, so that a rule left
    /// `Failed` or stuck `Updating` is restored by the same PUT that changes one.
    async fn put_rule(&self, nsg: &NsgId, rule: &Rule, priority: i32) -> Result<()> {
        let name = rule
            .name
            .clone()
            .ok_or_else(|| invalid("an NSG rule needs a name"))?;
        let body = security_rule(&self.cluster, rule, priority)?;
        self.put_security_rule(nsg, &name, body).await
    }

    async fn remove_rules(
        &self,
        nsg: &NsgId,
        removes: &[&Change],
        report: &mut ApplyReport,
    ) -> Result<()> {
        for c in removes {
            let Some(name) = c.id.as_deref() else {
                continue;
            };
            if self.delete_rule(nsg, name).await? {
                report.removed += 1;
            } else {
                report
                    .notes
                    .push(format!("rule {name} no longer existed; nothing to do"));
            }
        }
        Ok(())
    }
}

/// The priority the plan gave a rule; a plan without one was not made for an NSG.
fn planned_priority(c: &Change) -> Result<i32> {
    c.priority
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| {
            invalid(format!(
                "rule {} has no priority in the plan; plan again",
                c.rule.name.as_deref().unwrap_or("?")
            ))
        })
}

/// A priority taken by another writer since the plan was made is a conflict for the next
/// plan to resolve, not something to pick around here.
fn moved_on(e: Error, nsg: &NsgId) -> Error {
    if e.code.as_deref() == Some("SecurityRuleConflict") {
        Error::new(
            ErrorKind::Conflict,
            format!(
                "a priority of NSG {} was taken since the plan was made; the next plan decides ({e})",
                nsg.name
            ),
        )
        .with_code("SecurityRuleConflict")
    } else {
        e
    }
}

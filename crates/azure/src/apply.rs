//! Carrying out a target's plan on an NSG, one writer per NSG. Every rule a remove or update
//! names is first checked to be ours against what ARM said, and no add may take an existing
//! rule's name (a PUT would replace it). Adds go first, at free priorities of our band,
//! unless the plan or a full band says removes must free room first. A priority another
//! writer took meanwhile is retried at another one.

use std::collections::BTreeSet;
use std::sync::Arc;

use nodeport_firewall_model::{Change, Rule, TargetPlan};
use nodeport_firewall_provider::{ApplyReport, Error, ErrorKind, Result, Writes};
use tracing::{debug, info, warn};

use crate::marker::MarkerBook;
use crate::observe::SeenNsg;
use crate::wire::security_rule;
use crate::{AzureProvider, NsgId, invalid};

impl AzureProvider {
    /// Carries out `plan`'s writes.
    pub(crate) async fn apply_plan(&self, plan: &TargetPlan) -> Result<ApplyReport> {
        let Writes {
            removes,
            updates,
            adds,
            existing: names,
        } = Writes::of(plan)?;
        let nsg = NsgId::parse(&plan.target.id).map_err(invalid)?;
        let writer = self.writer(&nsg.id());
        let _one_writer = writer.lock().await;

        let seen = self.seen_rules(&nsg, &names).await?;
        // Never change a rule that is not ours: check every name against what ARM said.
        for n in &names {
            if seen.rules.get(*n).is_some_and(|s| !s.owned) {
                return Err(invalid(format!(
                    "rule {n} on NSG {} is not owned by cluster {}; refusing to change it",
                    nsg.name, self.cluster
                )));
            }
        }
        // An added rule must not take the name of a rule that exists: a PUT would replace
        // it, and it may be someone else's.
        if let Some(n) = adds
            .iter()
            .filter_map(|c| c.rule.name.as_deref())
            .find(|n| seen.names.contains(*n))
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "a rule named {n} already exists on NSG {}; not overwriting it (the next reconcile re-reads the NSG)",
                    nsg.name
                ),
            ));
        }

        let mut report = ApplyReport::default();
        let mut free = self.free_priorities(&seen);
        let result = async {
            // Adds come first, unless the plan must free room first or the band has no
            // room for the adds until removes free priorities.
            let remove_first =
                plan.remove_first || (!removes.is_empty() && free.len() < adds.len());
            if remove_first {
                self.remove_rules(&nsg, &removes, &seen, &mut report)
                    .await?;
                let fresh = self.observe_nsg(&nsg).await?.1;
                free = self.free_priorities(&fresh);
            }
            for c in &updates {
                let Some(name) = c.id.as_deref() else {
                    continue;
                };
                let Some(s) = seen.rules.get(name) else {
                    report.notes.push(format!(
                        "rule {name} no longer exists; it is added back next reconcile"
                    ));
                    continue;
                };
                let marker_only = c
                    .previous
                    .as_ref()
                    .is_some_and(|p| p.content == c.rule.content);
                if marker_only
                    && s.marker_hash
                        .as_deref()
                        .is_some_and(|h| MarkerBook::matches(h, &c.rule.pools, &c.rule.services))
                {
                    // The rule already carries this marker; only this process had not
                    // seen the list behind its hash yet.
                    continue;
                }
                let mut rule = c.rule.clone();
                rule.name = Some(name.to_string());
                self.put_rule(&nsg, &rule, s.priority).await?;
                report.updated += 1;
            }
            for c in &adds {
                let p = self.add_rule(&nsg, &c.rule, &mut free).await?;
                debug!(nsg = %nsg.name, rule = ?c.rule.name, priority = p, "rule added");
                report.added += 1;
            }
            if !remove_first {
                self.remove_rules(&nsg, &removes, &seen, &mut report)
                    .await?;
            }
            Ok::<(), Error>(())
        }
        .await;
        self.forget_seen(&nsg);
        if result.is_ok() {
            info!(nsg = %nsg.name, added = report.added, updated = report.updated, removed = report.removed, "NSG rules written");
        }
        result.map(|()| report)
    }

    fn writer(&self, nsg: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.writers.lock() {
            Ok(mut w) => w.entry(nsg.to_string()).or_default().clone(),
            // A poisoned map still serializes through a fresh lock per call: fail safe,
            // the NSG's own 429s then serialize us.
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// PUTs one rule at `priority` and waits for it.
    async fn put_rule(&self, nsg: &NsgId, rule: &Rule, priority: i32) -> Result<()> {
        let name = rule
            .name
            .clone()
            .ok_or_else(|| invalid("an NSG rule needs a name"))?;
        let body = security_rule(&self.cluster, rule, priority)?;
        self.put_security_rule(nsg, &name, body).await
    }

    /// PUTs a new rule at a free priority of the band. When another writer takes that
    /// priority first (400 `SecurityRuleConflict`), re-reads the NSG and picks another.
    async fn add_rule(&self, nsg: &NsgId, rule: &Rule, free: &mut BTreeSet<i32>) -> Result<i32> {
        let mut conflicts = 0;
        loop {
            let Some(priority) = free.pop_first() else {
                return Err(Error::new(
                    ErrorKind::QuotaExceeded,
                    format!(
                        "no free priority in the band {}-{} of NSG {} (azure.priorityBand)",
                        self.config.priority_band.from, self.config.priority_band.to, nsg.name
                    ),
                ));
            };
            match self.put_rule(nsg, rule, priority).await {
                Ok(()) => return Ok(priority),
                Err(e)
                    if e.code.as_deref() == Some("SecurityRuleConflict")
                        && conflicts < self.config.max_priority_conflicts =>
                {
                    conflicts += 1;
                    warn!(nsg = %nsg.name, priority, error = %e, "priority taken meanwhile; re-reading the NSG");
                    let seen = self.observe_nsg(nsg).await?.1;
                    if let Some(name) = rule.name.as_deref().filter(|n| seen.names.contains(*n)) {
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            format!(
                                "a rule named {name} appeared on NSG {} meanwhile; not overwriting it (the next reconcile re-reads the NSG)",
                                nsg.name
                            ),
                        ));
                    }
                    free.retain(|p| !seen.priorities.contains(p));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn remove_rules(
        &self,
        nsg: &NsgId,
        removes: &[&Change],
        seen: &SeenNsg,
        report: &mut ApplyReport,
    ) -> Result<()> {
        for c in removes {
            let Some(name) = c.id.as_deref() else {
                continue;
            };
            let existed = seen.rules.contains_key(name) && self.delete_rule(nsg, name).await?;
            if existed {
                report.removed += 1;
            } else {
                report
                    .notes
                    .push(format!("rule {name} no longer exists; nothing to do"));
            }
        }
        Ok(())
    }

    fn free_priorities(&self, seen: &SeenNsg) -> BTreeSet<i32> {
        let band = self.config.priority_band;
        (band.from..=band.to)
            .filter(|p| !seen.priorities.contains(p))
            .collect()
    }
}

//! Carrying out a target's plan on a security group. Every rule a remove or update names is
//! first checked to be ours against what EC2 said; rules gone meanwhile are skipped. Adds
//! are authorized in one call per set of pools served (the only per-rule tags; Service lists
//! are in descriptions, which are per rule), removes revoked by rule id in one call, and
//! updates (EC2 rules cannot change ports or sources in place) only rewrite a rule's marker:
//! its description and tags. A duplicate or an already revoked rule is noted, not an error.

use std::collections::{BTreeMap, HashSet};

use aws_sdk_ec2::types::{IpPermission, SecurityGroupRuleUpdate, Tag};
use nodeport_firewall_model::{Change, Rule, TargetPlan};
use nodeport_firewall_provider::{ApplyFailure, ApplyReport, Error, ErrorKind, Result, Writes};
use tracing::debug;

use crate::client::TagOp;
use crate::wire::{Written, modify_request, permission, rule_text, tag_spec};
use crate::{AwsProvider, invalid, marker};

/// The tags of a rule, as (key, value).
type Tags = Vec<(String, String)>;

impl AwsProvider {
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
        let group = plan.target.id.as_str();

        // Ownership was checked against the observation the plan was made from (the
        // engine's guard); what an update needs to know of each rule is in the plan.
        let mut report = ApplyReport::default();
        let result = async {
            if plan.remove_first {
                self.revoke(group, &removes, &mut report).await?;
            }
            if !updates.is_empty() {
                self.update(group, &updates, &mut report).await?;
            }
            if !adds.is_empty() {
                self.authorize(group, &adds, &mut report).await?;
            }
            if !plan.remove_first {
                self.revoke(group, &removes, &mut report).await?;
            }
            Ok::<(), Error>(())
        }
        .await;
        result.map_err(|e| ApplyFailure::after(&report, e))?;
        Ok(report)
    }

    async fn authorize(
        &self,
        group: &str,
        adds: &[&Change],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let limits = self.limits();
        let mut contents = HashSet::new();
        // Rules whose tags are the same go in one call. Only a rule whose marker cannot even
        // hold a digest (an extremely long cluster name) carries its Services in tags of its
        // own, and goes alone.
        let mut batches: BTreeMap<Tags, Vec<(IpPermission, &Rule)>> = BTreeMap::new();
        let mut singles = Vec::new();
        for c in adds {
            if !contents.insert(&c.rule.content) {
                continue; // never the same permission twice in one request
            }
            if let Some(problem) = limits.check_rule(&c.rule) {
                return Err(invalid(format!(
                    "refusing to write {}: {problem}",
                    rule_text(&c.rule)
                )));
            }
            let m = marker::marker(&self.cluster, &c.rule.services);
            if m.service_tags.len() > marker::MAX_LIST_TAGS {
                return Err(invalid(format!(
                    "{} serves {} Services, too many to record in the rule's tags",
                    rule_text(&c.rule),
                    c.rule.services.len()
                )));
            }
            let perm = permission(&c.rule, &m.description)?;
            let mut tags = marker::common_tags(&self.cluster, &c.rule.pools);
            if m.service_tags.is_empty() {
                batches.entry(tags).or_default().push((perm, &c.rule));
            } else {
                tags.extend(m.service_tags);
                singles.push((tags, vec![(perm, &c.rule)]));
            }
        }
        let max = self.config.max_rules_per_call;
        for (tags, perms) in &batches {
            for chunk in perms.chunks(max) {
                self.authorize_call(group, tags, chunk, report).await?;
            }
        }
        for (tags, perms) in &singles {
            self.authorize_call(group, tags, perms, report).await?;
        }
        Ok(())
    }

    async fn authorize_call(
        &self,
        group: &str,
        tags: &[(String, String)],
        perms: &[(IpPermission, &Rule)],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let spec = tag_spec(tags);
        let all: Vec<IpPermission> = perms.iter().map(|(p, _)| p.clone()).collect();
        match self.authorize_ingress(group, all, &spec).await {
            Ok(()) => {
                report.added += perms.len();
                Ok(())
            }
            Err(e) if e.kind == ErrorKind::Conflict => {
                // One of them exists already (written meanwhile, or by a retried call whose
                // answer was lost). Add the others one by one; the existing ones are left as
                // they are and re-observed on the next reconcile: never an error loop.
                debug!(group, error = %e, "duplicate in batch, authorizing one by one");
                for (perm, rule) in perms {
                    match self
                        .authorize_ingress(group, vec![perm.clone()], &spec)
                        .await
                    {
                        Ok(()) => report.added += 1,
                        Err(e) if e.kind == ErrorKind::Conflict => report.notes.push(format!(
                            "{} already exists on {group} (InvalidPermission.Duplicate); left as is",
                            rule_text(rule)
                        )),
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn revoke(
        &self,
        group: &str,
        removes: &[&Change],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let mut ids: Vec<String> = removes.iter().filter_map(|c| c.id.clone()).collect();
        ids.sort();
        ids.dedup();
        for chunk in ids.chunks(self.config.max_rules_per_call) {
            match self.revoke_ingress(group, chunk.to_vec()).await {
                Ok(()) => report.removed += chunk.len(),
                Err(e) if rule_gone(&e) => {
                    for id in chunk {
                        match self.revoke_ingress(group, vec![id.clone()]).await {
                            Ok(()) => report.removed += 1,
                            Err(e) if rule_gone(&e) => report
                                .notes
                                .push(format!("rule {id} on {group} was already gone")),
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Rewrites the marker of rules whose content stays and whose Services or pools change.
    async fn update(
        &self,
        group: &str,
        updates: &[&Change],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let mut modify: Vec<SecurityGroupRuleUpdate> = Vec::new();
        let mut create: BTreeMap<Vec<(String, String)>, Vec<String>> = BTreeMap::new();
        let mut delete: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        for c in updates {
            let id =
                c.id.clone()
                    .ok_or_else(|| invalid("update without a rule id"))?;
            let previous = c.previous.as_ref();
            if previous.is_some_and(|p| p.content != c.rule.content) {
                return Err(invalid(format!(
                    "rule {id}: EC2 rules cannot change ports or sources in place"
                )));
            }
            let m = marker::marker(&self.cluster, &c.rule.services);
            if m.service_tags.len() > marker::MAX_LIST_TAGS {
                return Err(invalid(format!(
                    "{} serves {} Services, too many to record in the rule's tags",
                    rule_text(&c.rule),
                    c.rule.services.len()
                )));
            }
            let old = Written::of(c.payload.as_ref());
            let pools_changed = previous.is_none_or(|p| p.pools != c.rule.pools);
            let mut want = m.service_tags.clone();
            if pools_changed {
                want.extend(marker::chunk_tags(
                    marker::TAG_POOLS,
                    c.rule.pools.iter().map(|p| p.as_str().to_string()),
                ));
            }
            let keep: HashSet<&str> = want.iter().map(|(k, _)| k.as_str()).collect();
            let stale: Vec<String> = old
                .tag_keys
                .into_iter()
                .filter(|k| !keep.contains(k.as_str()))
                .filter(|k| pools_changed || !marker::is_list_tag(k, marker::TAG_POOLS))
                .collect();
            if old.description.as_deref() != Some(m.description.as_str()) {
                modify.push(modify_request(&id, &c.rule, &m.description)?);
            }
            if !want.is_empty() {
                create.entry(want).or_default().push(id.clone());
            }
            if !stale.is_empty() {
                delete.entry(stale).or_default().push(id);
            }
        }
        let max = self.config.max_rules_per_call;
        for (tags, ids) in &create {
            let tags: Vec<Tag> = tags
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect();
            self.retag(TagOp::Create, ids, &tags).await?;
        }
        for chunk in modify.chunks(max) {
            self.modify_rules(group, chunk).await?;
        }
        for (keys, ids) in &delete {
            let tags: Vec<Tag> = keys.iter().map(|k| Tag::builder().key(k).build()).collect();
            self.retag(TagOp::Delete, ids, &tags).await?;
        }
        report.updated += updates.len();
        Ok(())
    }
}

fn rule_gone(e: &Error) -> bool {
    matches!(
        e.code.as_deref(),
        Some("InvalidPermission.NotFound" | "InvalidSecurityGroupRuleId.NotFound")
    )
}

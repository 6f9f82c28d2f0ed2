//! The pure half of feedback: given a reconcile's plan and apply outcomes, and which
//! Services already carry our condition, what each Service is told (its
//! `NodePortFirewallSynced` condition and its Events). Also how that condition is read back
//! from a Service and reduced to a fingerprint for the cache. No kube client: everything
//! here is unit-testable on plain values; `publish.rs` sends the result.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use nodeport_firewall_model::desired::ServiceStatus;
use nodeport_firewall_model::{Action, Plan, PlanError, ServiceRef, Target};
use nodeport_firewall_provider::{ApplyOutcome, ErrorKind};

/// The condition this operator sets on Services.
pub const CONDITION_TYPE: &str = "NodePortFirewallSynced";
/// Longest condition message; longer ones are cut with a count of what was left out.
pub const MAX_MESSAGE: usize = 1000;

/// What a Service's condition says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConditionState {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl ConditionState {
    /// A digest of the condition. The Service cache and the publisher keep this instead of
    /// the message (up to 1 KB), which would otherwise be held twice per Service.
    pub fn fingerprint(&self) -> u64 {
        fingerprint(self)
    }
}

/// A digest, stable within this process.
pub(crate) fn fingerprint(value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// An event to report on a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Report {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// Everything to tell one Service after a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFeedback {
    pub service: ServiceRef,
    /// None: leave the Service's status alone (never managed).
    pub condition: Option<ConditionState>,
    pub events: Vec<Report>,
}

/// What the reconcile did, as feedback needs it.
#[derive(Debug)]
pub struct Outcome<'a> {
    pub plan: &'a Plan,
    /// None when nothing was applied (dry run).
    pub applied: Option<&'a [(Target, ApplyOutcome)]>,
    pub error_kinds: &'a BTreeMap<Target, ErrorKind>,
    pub dry_run: bool,
}

pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut cut = max.saturating_sub(20);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = s.len() - cut;
    s.truncate(cut);
    s.push_str(&format!("… ({dropped} more bytes)"));
    s
}

fn list<'a>(items: impl IntoIterator<Item = &'a str>, max_items: usize) -> String {
    let all: Vec<&str> = items.into_iter().collect();
    if all.len() <= max_items {
        return all.join(", ");
    }
    format!(
        "{} and {} more",
        all[..max_items].join(", "),
        all.len() - max_items
    )
}

fn error_reason(kind: Option<ErrorKind>, plan_error: Option<&PlanError>) -> (&'static str, String) {
    match (plan_error, kind) {
        (
            Some(
                PlanError::RuleQuota { .. }
                | PlanError::SourceQuota { .. }
                | PlanError::DestinationQuota { .. },
            ),
            _,
        )
        | (_, Some(ErrorKind::QuotaExceeded)) => (
            "QuotaExceeded",
            "raise the target's rule quota, or open fewer ports or source ranges (nodeport-firewall.io/ports, nodeport-firewall.io/allowed-source-ranges)".into(),
        ),
        (_, Some(ErrorKind::PermissionDenied)) => (
            "PermissionDenied",
            "grant the operator's cloud identity the permissions that `nodeport-firewall check` lists as missing".into(),
        ),
        _ => (
            "CloudError",
            "see the operator's logs; the next reconcile retries".into(),
        ),
    }
}

/// The kind of what went wrong on each target, from the plan (its error) and the apply
/// (its failure): the kinds travel with the errors, nothing is remembered on the side.
pub fn error_kinds(
    plan: &Plan,
    applied: Option<&[(Target, ApplyOutcome)]>,
) -> BTreeMap<Target, ErrorKind> {
    let mut kinds: BTreeMap<Target, ErrorKind> = plan
        .targets
        .iter()
        .filter_map(|tp| tp.error.as_ref().map(|e| (tp.target.clone(), e.kind())))
        .collect();
    for (target, outcome) in applied.into_iter().flatten() {
        if let ApplyOutcome::Failed { error, .. } = outcome {
            kinds.insert(target.clone(), error.kind);
        }
    }
    kinds
}

/// Decides, purely, what each Service is told. `had_condition` says which Services carry our
/// condition already (their status is updated even when they are no longer managed).
pub fn decide(out: &Outcome<'_>, had_condition: &BTreeSet<ServiceRef>) -> Vec<ServiceFeedback> {
    let plan = out.plan;
    let dry = if out.dry_run { "[dry run] " } else { "" };
    let outcomes: BTreeMap<&Target, &ApplyOutcome> = out
        .applied
        .map(|a| a.iter().map(|(t, o)| (t, o)).collect())
        .unwrap_or_default();
    let pool_errors: BTreeMap<&str, &str> = plan
        .pools
        .iter()
        .filter_map(|p| p.error.as_deref().map(|e| (p.name.as_str(), e)))
        .collect();
    let mut result = Vec::new();
    for report in plan.services.iter() {
        let svc = &report.service;
        match report.status {
            ServiceStatus::Unmanaged => {
                if had_condition.contains(svc) {
                    result.push(ServiceFeedback {
                        service: svc.clone(),
                        condition: Some(ConditionState {
                            status: false,
                            reason: "NotManaged".into(),
                            message: truncate(
                                format!(
                                    "{dry}not managed: {}",
                                    report.reason.as_deref().unwrap_or("no reason given")
                                ),
                                MAX_MESSAGE,
                            ),
                        }),
                        events: Vec::new(),
                    });
                }
            }
            ServiceStatus::Invalid => {
                let errors = report.errors.join("; ");
                result.push(ServiceFeedback {
                    service: svc.clone(),
                    condition: Some(ConditionState {
                        status: false,
                        reason: "InvalidAnnotation".into(),
                        message: truncate(
                            format!("{dry}{errors}; its existing firewall rules are kept unchanged until the nodeport-firewall.io/ annotations are fixed"),
                            MAX_MESSAGE,
                        ),
                    }),
                    events: vec![Report {
                        warning: true,
                        reason: "InvalidAnnotation".into(),
                        note: truncate(
                            format!("{dry}{errors}. Fix the nodeport-firewall.io/ annotations; the existing rules are kept until then."),
                            MAX_MESSAGE,
                        ),
                    }],
                });
            }
            ServiceStatus::Closed => {
                let by = report.policy.as_deref().unwrap_or("the policy");
                let why = report.reason.as_deref().unwrap_or("refused");
                result.push(ServiceFeedback {
                    service: svc.clone(),
                    condition: Some(ConditionState {
                        status: false,
                        reason: "PolicyViolation".into(),
                        message: truncate(
                            format!("{dry}closed by {by}: {why}; its firewall rules are removed"),
                            MAX_MESSAGE,
                        ),
                    }),
                    events: vec![Report {
                        warning: true,
                        reason: "PolicyViolation".into(),
                        note: truncate(
                            format!("{dry}closed by {by}: {why}. Its firewall rules are removed until it asks only for what the policy permits."),
                            MAX_MESSAGE,
                        ),
                    }],
                });
            }
            ServiceStatus::Managed => {
                result.push(managed(out, report, &outcomes, &pool_errors, dry));
            }
        }
    }
    result
}

fn managed(
    out: &Outcome<'_>,
    report: &nodeport_firewall_model::ServiceReport,
    outcomes: &BTreeMap<&Target, &ApplyOutcome>,
    pool_errors: &BTreeMap<&str, &str>,
    dry: &str,
) -> ServiceFeedback {
    let svc = &report.service;
    let mut events = Vec::new();
    let mut problems: Vec<(&'static str, String, String)> = Vec::new();
    let mut targets: BTreeSet<String> = BTreeSet::new();
    let mut sources: BTreeSet<String> = BTreeSet::new();
    let mut ports: BTreeSet<String> = BTreeSet::new();
    let mut pending = 0usize;
    let mut changed = 0usize;
    for pool in report.pools.iter() {
        if let Some(e) = pool_errors.get(pool.as_str()) {
            problems.push((
                "PoolUnresolved",
                format!("pool {pool}: {e}"),
                "check the pool's target in the operator config or the nodes' providerID".into(),
            ));
        }
    }
    for tp in &out.plan.targets {
        if !tp.pools.iter().any(|p| report.pools.contains(p)) {
            continue;
        }
        let mine: Vec<_> = tp
            .changes
            .iter()
            .filter(|c| {
                c.rule.services.contains(svc)
                    || c.previous
                        .as_ref()
                        .is_some_and(|p| p.services.contains(svc))
            })
            .collect();
        if mine.is_empty() && tp.error.is_none() {
            continue;
        }
        targets.insert(tp.target.to_string());
        for c in &mine {
            if c.action != Action::Remove {
                sources.extend(c.rule.content.sources.iter().map(|s| s.to_string()));
                ports.insert(format!(
                    "{} {}",
                    c.rule.content.protocol,
                    c.rule.ports_text()
                ));
            }
        }
        let writes = mine.iter().filter(|c| c.action.is_write()).count();
        let kind = out.error_kinds.get(&tp.target).copied();
        if let Some(e) = &tp.error {
            let (reason, fix) = error_reason(kind, Some(e));
            problems.push((reason, format!("{}: {e}", tp.target), fix));
            continue;
        }
        match outcomes.get(&tp.target) {
            Some(ApplyOutcome::Applied { .. }) => changed += writes,
            Some(ApplyOutcome::Failed { error, .. }) if writes > 0 => {
                let (reason, fix) = error_reason(kind, None);
                problems.push((reason, format!("{}: {error}", tp.target), fix));
            }
            Some(ApplyOutcome::Refused { error }) if writes > 0 => {
                let (reason, fix) = error_reason(kind, None);
                problems.push((reason, format!("{}: {error}", tp.target), fix));
            }
            None => pending += writes,
            _ => {}
        }
    }
    let pools = list(report.pools.iter().map(|p| p.as_str()), 20);
    let where_ = format!(
        "pools: {}; targets: {}; ports: {}; sources: {}",
        if pools.is_empty() { "none" } else { &pools },
        list(targets.iter().map(String::as_str), 10),
        list(ports.iter().map(String::as_str), 10),
        list(sources.iter().map(String::as_str), 20),
    );
    for w in &report.warnings {
        events.push(Report {
            warning: true,
            reason: "AnnotationWarning".into(),
            note: truncate(format!("{dry}{w}"), MAX_MESSAGE),
        });
    }
    let condition = if let Some((reason, _, _)) = problems.first() {
        let mut msg = String::from(dry);
        for (_, text, fix) in &problems {
            msg.push_str(&format!("{text} (fix: {fix}); "));
        }
        for (reason, text, fix) in &problems {
            events.push(Report {
                warning: true,
                reason: (*reason).to_string(),
                note: truncate(format!("{dry}{text}. Fix: {fix}."), MAX_MESSAGE),
            });
        }
        msg.push_str(&where_);
        ConditionState {
            status: false,
            reason: (*reason).to_string(),
            message: truncate(msg, MAX_MESSAGE),
        }
    } else if pending > 0 {
        events.push(Report {
            warning: false,
            reason: "DryRunChangesPending".into(),
            note: truncate(
                format!("{dry}{pending} rule change(s) would be written; {where_}"),
                MAX_MESSAGE,
            ),
        });
        ConditionState {
            status: false,
            reason: "DryRunChangesPending".into(),
            message: truncate(
                format!("{dry}{pending} rule change(s) pending; {where_}"),
                MAX_MESSAGE,
            ),
        }
    } else {
        if changed > 0 {
            events.push(Report {
                warning: false,
                reason: "RulesUpdated".into(),
                note: truncate(
                    format!("{changed} rule change(s) written; {where_}"),
                    MAX_MESSAGE,
                ),
            });
        }
        ConditionState {
            status: true,
            reason: "Synced".into(),
            message: truncate(format!("{dry}open on {where_}"), MAX_MESSAGE),
        }
    };
    ServiceFeedback {
        service: svc.clone(),
        condition: Some(condition),
        events,
    }
}

/// Our condition on a Service as the cache holds it: its fingerprint, its status, and
/// when that status last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentCondition {
    pub fingerprint: u64,
    pub status: bool,
    pub last_transition: Time,
}

/// Marks a condition's message as already replaced by its fingerprint.
const FINGERPRINT_PREFIX: &str = "fingerprint:";

/// Replaces the message of our condition on a cached Service with the condition's
/// fingerprint (see [`ConditionState::fingerprint`]). Idempotent.
pub fn fingerprint_condition(c: &mut Condition) {
    if c.type_ != CONDITION_TYPE || c.message.starts_with(FINGERPRINT_PREFIX) {
        return;
    }
    let state = ConditionState {
        status: c.status == "True",
        reason: c.reason.clone(),
        message: std::mem::take(&mut c.message),
    };
    c.message = format!("{FINGERPRINT_PREFIX}{:016x}", state.fingerprint());
}

/// Our condition on a cached Service, if any.
pub fn current_condition(svc: &Service) -> Option<CurrentCondition> {
    let c = svc
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)?;
    let fingerprint = match c.message.strip_prefix(FINGERPRINT_PREFIX) {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap_or_default(),
        None => ConditionState {
            status: c.status == "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
        }
        .fingerprint(),
    };
    Some(CurrentCondition {
        fingerprint,
        status: c.status == "True",
        last_transition: c.last_transition_time.clone(),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn condition(status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: CONDITION_TYPE.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }
    }

    fn service_with(c: Condition) -> Service {
        Service {
            status: Some(k8s_openapi::api::core::v1::ServiceStatus {
                conditions: Some(vec![c]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_cached_condition_keeps_only_its_fingerprint() {
        let want = ConditionState {
            status: true,
            reason: "Synced".into(),
            message: "open on aws:sg-1 from 10.0.0.0/8".into(),
        };
        let mut c = condition("True", "Synced", &want.message);
        fingerprint_condition(&mut c);
        assert!(c.message.starts_with(FINGERPRINT_PREFIX), "{}", c.message);
        let once = c.message.clone();
        fingerprint_condition(&mut c);
        assert_eq!(c.message, once, "idempotent");

        let cached = current_condition(&service_with(c)).unwrap();
        assert_eq!(cached.fingerprint, want.fingerprint());
        assert!(cached.status);
        // A condition as the API server returns it, not yet stripped, reads the same.
        let raw = current_condition(&service_with(condition("True", "Synced", &want.message)));
        assert_eq!(raw.unwrap().fingerprint, want.fingerprint());

        for (status, reason, message) in [
            ("False", "Synced", want.message.as_str()),
            ("True", "QuotaExceeded", want.message.as_str()),
            ("True", "Synced", "open on aws:sg-2 from 10.0.0.0/8"),
        ] {
            let mut other = condition(status, reason, message);
            fingerprint_condition(&mut other);
            let other = current_condition(&service_with(other)).unwrap();
            assert_ne!(
                other.fingerprint,
                want.fingerprint(),
                "{status} {reason} {message}"
            );
        }
    }

    #[test]
    fn other_conditions_are_not_touched() {
        let mut c = condition("True", "Ready", "a message of someone else's");
        c.type_ = "Other".into();
        fingerprint_condition(&mut c);
        assert_eq!(c.message, "a message of someone else's");
    }
}

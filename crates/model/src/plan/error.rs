//! Why a target's plan cannot be applied: the errors the planner reports before any write.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::failure::{ErrorKind, Failure};
use crate::net::IpFamily;

/// Why a target's plan cannot be applied. Reported before any write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "kind"
)]
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
    Observe {
        message: String,
        /// The failure's kind (`permission_denied`, `throttled`, ...).
        #[serde(default)]
        error_kind: ErrorKind,
    },
    /// Not enough free priorities in the range our rules may take (Azure's priority band).
    Priorities {
        adds: usize,
        free: usize,
        from: u32,
        to: u32,
    },
    /// The rules of a pool spread over several targets do not fit on them all.
    Capacity {
        /// The family counted, where the quota counts each apart.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        family: Option<IpFamily>,
        /// Rules of ours wanted on the group (in `family`).
        wanted: usize,
        /// How many of them have no room.
        short: usize,
        /// The targets of the group.
        targets: usize,
        /// The rule quota of each.
        per_target: usize,
    },
    /// A rule of ours would be evaluated after a Deny that covers part of its traffic, and
    /// no priority our rules may take comes before it: the rule would not let it through.
    Shadowed {
        /// The rule of ours, by its name or its ports and sources.
        rule: String,
        /// The Deny, by its name or id.
        deny: String,
        /// The Deny's priority.
        priority: u32,
        /// The best priority our rule could have.
        best: u32,
    },
}

impl PlanError {
    /// A target that could not be read, keeping the failure's kind.
    pub fn observe(failure: &Failure) -> Self {
        PlanError::Observe {
            message: failure.to_string(),
            error_kind: failure.kind,
        }
    }

    /// The kind of failure behind this error: a quota for the quota errors, the read's
    /// failure for `Observe`, invalid for a rule the renderer got wrong.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PlanError::RuleQuota { .. }
            | PlanError::SourceQuota { .. }
            | PlanError::DestinationQuota { .. }
            | PlanError::Priorities { .. } => ErrorKind::QuotaExceeded,
            PlanError::Shadowed { .. } => ErrorKind::Config,
            PlanError::Capacity { .. } => ErrorKind::QuotaExceeded,
            PlanError::RuleShape { .. } => ErrorKind::Invalid,
            PlanError::Observe { error_kind, .. } => *error_kind,
        }
    }
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
            PlanError::Observe { message, .. } => write!(f, "cannot read target: {message}"),
            PlanError::Priorities {
                adds,
                free,
                from,
                to,
            } => write!(
                f,
                "{adds} new rules need a priority, but only {free} of {from}-{to} are free"
            ),
            PlanError::Capacity {
                family,
                wanted,
                short,
                targets,
                per_target,
            } => {
                let family = family.map(|f| format!(" {f}")).unwrap_or_default();
                let per = (*per_target).max(1);
                let more = short.div_ceil(per);
                let quota = per_target + short.div_ceil((*targets).max(1));
                write!(
                    f,
                    "{wanted}{family} rules of ours do not fit on the {targets} targets the pool's rules are spread over ({per_target} rules each, others' included): {short} have no room; {more} more targets with the same quota, or a quota of {quota} per target, would fit them"
                )
            }
            PlanError::Shadowed {
                rule,
                deny,
                priority,
                best,
            } => write!(
                f,
                "rule {rule} would be shadowed by the Deny rule {deny} at priority {priority}: the best priority ours can take is {best}; move the Deny or give nodeport-firewall a priority before it"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_camel_case_as_documented() {
        let e = PlanError::observe(&Failure::new(ErrorKind::Throttled, "slow down"));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kind"], "observe");
        assert_eq!(json["errorKind"], "throttled", "{json}");
        let c = PlanError::Capacity {
            family: None,
            wanted: 3,
            short: 1,
            targets: 2,
            per_target: 1,
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            (json["kind"].as_str(), json["perTarget"].as_u64()),
            (Some("capacity"), Some(1))
        );
        assert_eq!(serde_json::from_value::<PlanError>(json).unwrap(), c);
    }
}

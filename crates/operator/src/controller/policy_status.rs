//! The status of each `NodePortFirewallPolicy`: whether it is valid, and how many Services
//! it admits and refuses. Written with server-side apply, like the Service condition.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use nodeport_firewall_model::PolicyReport;
use serde_json::json;
use tracing::{debug, warn};

use super::feedback::FIELD_MANAGER;
use crate::policy::{NodePortFirewallPolicy, NodePortFirewallPolicyStatus};

/// The condition type on policies.
pub const ACCEPTED: &str = "Accepted";

/// The status a policy should carry. `current` is what it carries now: the transition time
/// is kept while the condition's status stays the same.
pub fn desired_status(
    report: &PolicyReport,
    generation: Option<i64>,
    current: Option<&NodePortFirewallPolicyStatus>,
    now: Timestamp,
) -> NodePortFirewallPolicyStatus {
    let status = if report.accepted { "True" } else { "False" };
    let (reason, message) = if report.accepted {
        (
            "Valid".to_string(),
            format!(
                "admits {} Service(s); {} in the namespaces it selects are closed",
                report.admitted, report.refused
            ),
        )
    } else {
        (
            "Invalid".to_string(),
            super::feedback::truncate(
                format!(
                    "{}; this policy admits nothing until it is fixed",
                    report.message.as_deref().unwrap_or("invalid")
                ),
                super::feedback::MAX_MESSAGE,
            ),
        )
    };
    let last_transition_time = current
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    NodePortFirewallPolicyStatus {
        conditions: vec![Condition {
            type_: ACCEPTED.into(),
            status: status.into(),
            reason,
            message,
            last_transition_time,
            observed_generation: generation,
        }],
        admitted_services: i64::try_from(report.admitted).unwrap_or(i64::MAX),
        refused_services: i64::try_from(report.refused).unwrap_or(i64::MAX),
        observed_generation: generation,
    }
}

/// Writes each policy's status when it differs from what the cache holds. The cache is the
/// only memory: a policy deleted and made again, or a status someone else changed, is
/// written afresh; our own write comes back through the watch before the next compare.
pub struct PolicyStatusPublisher {
    client: kube::Client,
}

impl std::fmt::Debug for PolicyStatusPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStatusPublisher")
            .finish_non_exhaustive()
    }
}

impl PolicyStatusPublisher {
    pub fn new(client: kube::Client) -> Self {
        PolicyStatusPublisher { client }
    }

    /// Patches the status of every policy whose status changed. Returns the number of
    /// writes.
    pub async fn publish(
        &mut self,
        reports: &[PolicyReport],
        store: &Store<NodePortFirewallPolicy>,
        keep_going: &(dyn Fn() -> bool + Sync),
    ) -> usize {
        let api: Api<NodePortFirewallPolicy> = Api::all(self.client.clone());
        let mut writes = 0;
        for report in reports {
            let Some(obj) = store.get(&ObjectRef::new(&report.name)) else {
                continue;
            };
            let want = desired_status(
                report,
                obj.metadata.generation,
                obj.status.as_ref(),
                Timestamp::now(),
            );
            if obj.status.as_ref().is_some_and(|s| same(s, &want)) {
                continue;
            }
            if !keep_going() {
                break;
            }
            let patch = json!({
                "apiVersion": "nodeport-firewall.io/v1alpha1",
                "kind": "NodePortFirewallPolicy",
                "status": want,
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch_status(&obj.name_any(), &params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {
                    writes += 1;
                    debug!(policy = %report.name, "policy status updated");
                }
                Err(e) => warn!(policy = %report.name, error = %e, "cannot update policy status"),
            }
        }
        writes
    }
}

/// Whether two statuses say the same, whatever the transition time.
fn same(a: &NodePortFirewallPolicyStatus, b: &NodePortFirewallPolicyStatus) -> bool {
    let key = |s: &NodePortFirewallPolicyStatus| {
        (
            s.conditions
                .iter()
                .map(|c| {
                    (
                        c.type_.clone(),
                        c.status.clone(),
                        c.reason.clone(),
                        c.message.clone(),
                        c.observed_generation,
                    )
                })
                .collect::<Vec<_>>(),
            s.admitted_services,
            s.refused_services,
            s.observed_generation,
        )
    };
    key(a) == key(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn report(accepted: bool, admitted: usize) -> PolicyReport {
        PolicyReport {
            name: "team-a".into(),
            accepted,
            message: (!accepted).then(|| "allowedSourceRanges: \"x\" is not a CIDR".into()),
            admitted,
            refused: 1,
        }
    }

    #[test]
    fn status_says_valid_or_invalid_and_keeps_the_transition_time() {
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let t1 = Timestamp::from_second(2_000_000).unwrap();
        let first = desired_status(&report(true, 3), Some(2), None, t0);
        let c = &first.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Valid"));
        assert!(
            c.message
                .contains("admits 3 Service(s); 1 in the namespaces")
        );
        assert_eq!(first.admitted_services, 3);
        assert_eq!(first.observed_generation, Some(2));
        // Same status later: the transition time stays.
        let again = desired_status(&report(true, 4), Some(2), Some(&first), t1);
        assert_eq!(again.conditions[0].last_transition_time, Time(t0));
        assert!(!same(&first, &again), "the count changed");
        // Invalid: a new transition.
        let bad = desired_status(&report(false, 0), Some(3), Some(&again), t1);
        let c = &bad.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
        assert!(
            c.message
                .contains("is not a CIDR; this policy admits nothing")
        );
        assert_eq!(c.last_transition_time, Time(t1));
    }
}

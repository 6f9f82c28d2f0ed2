//! Everything a plan warns about, with a stable kind: what `plan --strict` fails on, what
//! the JSON plan lists, what the text plan prints under `Warnings:`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::desired::{Desired, ServiceStatus};

/// What a warning is about. The JSON names are stable (docs/plan-format.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WarningKind {
    /// A Service's annotations cannot be read; its rules are kept.
    InvalidAnnotation,
    /// The policy closed a Service; its rules are removed.
    ClosedByPolicy,
    /// A non-fatal remark on a Service (no allowlist, host bits cleared, unknown pool, a
    /// nodePort outside the node-port range, …).
    ServiceWarning,
    /// A NodePortFirewallPolicy is invalid and admits nothing.
    InvalidPolicy,
    /// A Node carries none of the pool labels.
    NodeWithoutPool,
    /// Services but no Nodes: nothing can be planned for them, and rules of ours may still
    /// be in the cloud.
    NoNodes,
    /// No Services and no Nodes at all (an empty file or directory): nothing was checked.
    EmptyInput,
    /// A document of the input that is not an object the plan reads (no `kind`).
    InputSkipped,
    /// A pool is named by a label its own kubelet may set: a node can move itself into
    /// another pool.
    KubeletSetPoolLabel,
    /// Two pools resolve to the same target and scope: a Service meant for one opens on
    /// both.
    SharedTarget,
    /// The search for targets holding orphaned rules of ours failed: orphans may remain.
    OrphanSearch,
    /// A provider's remark on what it read (AWS: the rule quota could not be read from
    /// Service Quotas, so the configured one is used).
    Provider,
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        f.write_str(&name)
    }
}

/// One warning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Warning {
    pub kind: WarningKind,
    /// What it is about: `namespace/name`, a Node, a policy, a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub message: String,
}

impl Warning {
    pub fn new(kind: WarningKind, subject: Option<String>, message: String) -> Self {
        Warning {
            kind,
            subject,
            message,
        }
    }
}

/// As the text plan prints it: a Service's warnings after its name; the others' messages
/// name what they are about.
impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.subject, self.kind) {
            (
                Some(s),
                WarningKind::InvalidAnnotation
                | WarningKind::ClosedByPolicy
                | WarningKind::ServiceWarning,
            ) => write!(f, "{s}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// The warnings of a desired state, in a stable order: Services (sorted), policies, Nodes,
/// then the input as a whole.
pub fn of(desired: &Desired) -> Vec<Warning> {
    let mut out = Vec::new();
    for s in desired.services.iter() {
        let subject = || Some(s.service.to_string());
        for e in &s.errors {
            out.push(Warning::new(
                WarningKind::InvalidAnnotation,
                subject(),
                format!("{e} (its existing rules are kept as they are)"),
            ));
        }
        if s.status == ServiceStatus::Closed {
            out.push(Warning::new(
                WarningKind::ClosedByPolicy,
                subject(),
                format!(
                    "closed by {}: {} (its rules are removed)",
                    s.policy.as_deref().unwrap_or("policy"),
                    s.reason.as_deref().unwrap_or("refused")
                ),
            ));
        }
        if s.status != ServiceStatus::Unmanaged {
            for w in &s.warnings {
                out.push(Warning::new(
                    WarningKind::ServiceWarning,
                    subject(),
                    w.clone(),
                ));
            }
        }
    }
    for p in desired.policies.iter().filter(|p| !p.accepted) {
        out.push(Warning::new(
            WarningKind::InvalidPolicy,
            Some(p.name.clone()),
            format!(
                "NodePortFirewallPolicy {} is invalid and admits nothing: {}",
                p.name,
                p.message.as_deref().unwrap_or("")
            ),
        ));
    }
    for n in &desired.unpooled_nodes {
        out.push(Warning::new(
            WarningKind::NodeWithoutPool,
            Some(n.clone()),
            format!(
                "node {n} has none of the pool labels (poolLabels in the config); it belongs to no pool"
            ),
        ));
    }
    let forgeable: Vec<String> = desired
        .pool_label_keys
        .iter()
        .filter(|(pool, _)| desired.pools.get(*pool).is_some_and(|p| p.managed))
        .flat_map(|(pool, keys)| {
            keys.iter()
                .filter(|k| crate::node::kubelet_may_set(k))
                .map(move |k| format!("{pool} ({k})"))
        })
        .collect();
    if !forgeable.is_empty() {
        out.push(Warning::new(
            WarningKind::KubeletSetPoolLabel,
            None,
            format!(
                "pools come from node labels a kubelet can set on its own Node, so a node can move itself into another pool: {}; label the nodes with {} (kubelets cannot set it) through the node group or node pool settings",
                forgeable.join(", "),
                crate::config::RESTRICTED_POOL_LABEL
            ),
        ));
    }
    if desired.nodes == 0 && desired.services.is_empty() {
        out.push(Warning::new(
            WarningKind::EmptyInput,
            None,
            "the input has no Services and no Nodes: nothing was checked".into(),
        ));
    }
    if desired.nodes == 0 && !desired.services.is_empty() {
        out.push(Warning::new(
            WarningKind::NoNodes,
            None,
            format!(
                "the input has {} Service(s) but no Nodes: no pool has nodes, so nothing is planned for them, while the cloud may still hold rules of ours (add the Nodes: kubectl get nodes -o yaml)",
                desired.services.len()
            ),
        ));
    }
    out
}

//! A lean view of a Kubernetes Node and the node-pool it belongs to.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The name of a node pool, taken from a Node label value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PoolName(pub String);

impl PoolName {
    pub fn new(name: impl Into<String>) -> Self {
        PoolName(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for PoolName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// What the operator reads of a Node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    pub name: String,
    /// Only the labels that name pools are kept.
    pub labels: BTreeMap<String, String>,
    /// `spec.providerID`, which providers map to a cloud instance.
    pub provider_id: Option<String>,
    /// `InternalIP` addresses from `status.addresses`.
    pub internal_ips: Vec<String>,
}

impl NodeSpec {
    pub fn new(name: &str) -> Self {
        NodeSpec {
            name: name.to_string(),
            labels: BTreeMap::new(),
            provider_id: None,
            internal_ips: Vec::new(),
        }
    }

    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn with_provider_id(mut self, id: &str) -> Self {
        self.provider_id = Some(id.to_string());
        self
    }

    pub fn with_internal_ip(mut self, ip: &str) -> Self {
        self.internal_ips.push(ip.to_string());
        self
    }

    /// The pool of this node: the value of the first of `pool_labels` it carries.
    pub fn pool(&self, pool_labels: &[String]) -> Option<PoolName> {
        self.pool_and_label(pool_labels).map(|(pool, _)| pool)
    }

    /// The pool of this node and the label that named it.
    pub fn pool_and_label<'a>(&self, pool_labels: &'a [String]) -> Option<(PoolName, &'a str)> {
        pool_labels
            .iter()
            .find_map(|key| self.labels.get(key).map(|v| (v, key)))
            .filter(|(v, _)| !v.is_empty())
            .map(|(v, key)| (PoolName(v.clone()), key.as_str()))
    }

    /// Reads a Kubernetes Node, keeping only the labels in `pool_labels`.
    pub fn from_k8s(node: &Node, pool_labels: &[String]) -> Result<Self> {
        let name = node
            .metadata
            .name
            .clone()
            .ok_or_else(|| Error::Object("Node without metadata.name".to_string()))?;
        let labels = node
            .metadata
            .labels
            .as_ref()
            .map(|l| {
                l.iter()
                    .filter(|(k, _)| pool_labels.iter().any(|p| p == *k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let provider_id = node.spec.as_ref().and_then(|s| s.provider_id.clone());
        let internal_ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|a| {
                a.iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .map(|a| a.address.clone())
                    .collect()
            })
            .unwrap_or_default();
        Ok(NodeSpec {
            name,
            labels,
            provider_id,
            internal_ips,
        })
    }
}

/// Whether a kubelet may set label `key` on its own Node. The NodeRestriction admission
/// plugin forbids keys under `node-restriction.kubernetes.io/`, and keys under
/// `kubernetes.io/` or `k8s.io/` (and their subdomains) except a fixed allowed set; any
/// other key a node can set on itself, and so move itself into another pool.
pub fn kubelet_may_set(key: &str) -> bool {
    let Some((domain, _)) = key.split_once('/') else {
        return true; // no prefix: anyone with update on the Node, the kubelet included
    };
    let under = |d: &str| domain == d || domain.ends_with(&format!(".{d}"));
    if under("node-restriction.kubernetes.io") {
        return false;
    }
    if !(under("kubernetes.io") || under("k8s.io")) {
        return true;
    }
    // The keys NodeRestriction still lets a kubelet set in those domains.
    const ALLOWED: &[&str] = &[
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "failure-domain.beta.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
    ];
    ALLOWED.contains(&key) || under("kubelet.kubernetes.io") || under("node.kubernetes.io")
}

/// Whether `s` is a valid Kubernetes label value (pool names are label values).
pub fn valid_pool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::type_complexity)] // a table of cases
    fn first_pool_label_wins() {
        let labels: Vec<String> = ["eks.amazonaws.com/nodegroup", "karpenter.sh/nodepool"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cases: &[(&[(&str, &str)], Option<&str>)] = &[
            (&[("eks.amazonaws.com/nodegroup", "ng-1")], Some("ng-1")),
            (&[("karpenter.sh/nodepool", "kp")], Some("kp")),
            (
                &[
                    ("karpenter.sh/nodepool", "kp"),
                    ("eks.amazonaws.com/nodegroup", "ng-1"),
                ],
                Some("ng-1"),
            ),
            (&[("other", "x")], None),
            (&[("eks.amazonaws.com/nodegroup", "")], None),
            (&[], None),
        ];
        for (node_labels, want) in cases {
            let mut node = NodeSpec::new("n");
            for (k, v) in *node_labels {
                node = node.with_label(k, v);
            }
            assert_eq!(
                node.pool(&labels).as_ref().map(PoolName::as_str),
                *want,
                "{node_labels:?}"
            );
        }
    }
}

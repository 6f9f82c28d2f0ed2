//! The `NodePortFirewallPolicy` custom resource: who may open which node ports, from where,
//! on which pools (docs/policy.md). The type here is the CRD's schema; the model judges its
//! content ([`nodeport_firewall_model::policy`]), so that a policy read from a manifest and
//! one read from the cluster decide alike.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use nodeport_firewall_model::PolicySource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of our resources.
pub const GROUP: &str = "nodeport-firewall.io";

/// Which namespaces may open which node ports, from where, on which pools. A Service is
/// admitted when one policy that selects its namespace permits every source, pool and port
/// it asks for; policies never combine. Cluster-scoped: only cluster admins write policies.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodeport-firewall.io",
    version = "v1alpha1",
    kind = "NodePortFirewallPolicy",
    plural = "nodeportfirewallpolicies",
    shortname = "npfpolicy",
    status = "NodePortFirewallPolicyStatus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Admitted","type":"integer","jsonPath":".status.admittedServices"}"#,
    printcolumn = r#"{"name":"Refused","type":"integer","jsonPath":".status.refusedServices"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodePortFirewallPolicySpec {
    /// The namespaces whose labels match (a standard label selector; `{}` selects all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Namespaces selected by name, in addition to the selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    /// IPv4 and IPv6 CIDRs. Every source a selected Service asks for must lie inside them.
    /// Empty: no sources are allowed.
    #[serde(default)]
    pub allowed_source_ranges: Vec<String>,
    /// The node pools the selected namespaces may open. Omitted: every managed pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_pools: Option<Vec<String>>,
    /// The node ports they may open, as `N` or `"N-M"`. Omitted: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ports: Option<Vec<IntOrString>>,
    /// Most source ranges one Service may ask for, after merging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ranges_per_service: Option<i64>,
    /// Most node ports one Service may open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ports_per_service: Option<i64>,
}

/// What the operator last decided about the policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePortFirewallPolicyStatus {
    /// `Accepted`: True, or False with the reason `Invalid` and what is wrong.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Services this policy admitted.
    #[serde(default)]
    pub admitted_services: i64,
    /// Services in namespaces it selects that no policy admitted (closed).
    #[serde(default)]
    pub refused_services: i64,
    /// The generation these figures were computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The model's view of a policy object.
pub fn source(policy: &NodePortFirewallPolicy) -> PolicySource {
    let spec = &policy.spec;
    PolicySource {
        name: policy.name_any(),
        namespace_selector: spec.namespace_selector.clone(),
        namespaces: spec.namespaces.clone(),
        allowed_source_ranges: spec.allowed_source_ranges.clone(),
        node_pools: spec.node_pools.clone(),
        node_ports: spec.node_ports.as_ref().map(|ports| {
            ports
                .iter()
                .map(|p| match p {
                    IntOrString::Int(n) => n.to_string(),
                    IntOrString::String(s) => s.clone(),
                })
                .collect()
        }),
        max_ranges_per_service: spec.max_ranges_per_service,
        max_ports_per_service: spec.max_ports_per_service,
    }
}

/// The CustomResourceDefinition, as YAML: what the Helm chart and kustomize base ship
/// (`nodeport-firewall crd` prints it; a test keeps the shipped copies equal to it).
pub fn crd_yaml() -> Result<String, String> {
    let crd = NodePortFirewallPolicy::crd();
    yaml_serde::to_string(&crd).map_err(|e| format!("cannot render the CRD: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_crd_is_cluster_scoped_with_a_status_subresource() {
        let crd = NodePortFirewallPolicy::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.plural, "nodeportfirewallpolicies");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
    }

    #[test]
    fn node_ports_read_as_numbers_or_ranges() {
        let p: NodePortFirewallPolicy = yaml_serde::from_str(
            "apiVersion: nodeport-firewall.io/v1alpha1\nkind: NodePortFirewallPolicy\n\
             metadata: {name: team-a}\n\
             spec: {namespaces: [team-a], allowedSourceRanges: [10.0.0.0/8], nodePorts: [30080, '30100-30199']}\n",
        )
        .unwrap();
        let s = source(&p);
        assert_eq!(s.name, "team-a");
        assert_eq!(
            s.node_ports,
            Some(vec!["30080".to_string(), "30100-30199".to_string()])
        );
    }
}

//! The `NodePortFirewallPolicy` custom resource: who may open which node ports, from where,
//! on which pools (docs/policy.md). The type here is the CRD's schema; the model judges its
//! content ([`nodeport_firewall_model::policy`]), so that a policy read from a manifest and
//! one read from the cluster decide alike.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
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
    #[schemars(extend("x-kubernetes-map-type" = "atomic"))]
    pub namespace_selector: Option<LabelSelector>,
    /// Namespaces selected by name, in addition to the selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "namespace_names")]
    pub namespaces: Option<Vec<String>>,
    /// IPv4 and IPv6 CIDRs. Every source a selected Service asks for must lie inside them.
    /// Empty: no sources are allowed.
    #[serde(default)]
    pub allowed_source_ranges: Vec<String>,
    /// The node pools the selected namespaces may open. Omitted: every managed pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_pools: Option<Vec<String>>,
    /// The node ports they may open, as `N` or `"N-M"`. Omitted: any.
    ///
    /// Read as any JSON value, and judged by the operator: a number the API server accepts
    /// but a typed field could not hold must make the policy invalid, never unreadable (an
    /// unreadable object would be dropped by the watch, leaving the old version in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_string_list")]
    pub node_ports: Option<Vec<serde_json::Value>>,
    /// Most source ranges one Service may ask for, after merging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_ranges_per_service: Option<i64>,
    /// Most node ports one Service may open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_ports_per_service: Option<i64>,
}

/// What the operator last decided about the policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePortFirewallPolicyStatus {
    /// `Accepted`: True, or False with the reason `Invalid` and what is wrong.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
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
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(), // refused by the model as not a port
                })
                .collect()
        }),
        max_ranges_per_service: spec.max_ranges_per_service,
        max_ports_per_service: spec.max_ports_per_service,
    }
}

/// `nodePorts` items: integers or strings, as `IntOrString` is in the Kubernetes API.
fn int_or_string_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "nullable": true,
        "items": {"x-kubernetes-int-or-string": true}
    })
}

/// `namespaces`: RFC 1123 labels, as Namespace names are.
fn namespace_names(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "nullable": true,
        "items": {
            "type": "string",
            "maxLength": 63,
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
        }
    })
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
    fn a_port_no_typed_field_could_hold_still_reads() {
        // The API server accepts any integer for an int-or-string; the policy must then be
        // invalid (judged by the model), not unreadable.
        let p: NodePortFirewallPolicy = yaml_serde::from_str(
            "apiVersion: nodeport-firewall.io/v1alpha1\nkind: NodePortFirewallPolicy\n\
             metadata: {name: big}\nspec: {namespaces: [a], nodePorts: [3000000000, true]}\n",
        )
        .unwrap();
        let s = source(&p);
        assert_eq!(
            s.node_ports,
            Some(vec!["3000000000".to_string(), "true".to_string()])
        );
        let t = nodeport_firewall_model::Tenancy::new(&[s], &[]);
        let report = &t.reports([])[0];
        assert!(!report.accepted);
        assert!(
            report
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("nodePorts")
        );
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

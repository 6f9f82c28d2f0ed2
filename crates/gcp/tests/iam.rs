//! The shipped GCP IAM files (`deploy/iam/gcp-*.yaml`): the two custom roles hold exactly the
//! permissions the provider uses, writes only in the role bound with the condition, and the
//! condition (evaluated here as CEL) admits the cluster's rule names and nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

fn read(path: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../");
    std::fs::read_to_string(format!("{root}{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `- permission` lines of a role file.
fn permissions(path: &str) -> BTreeSet<String> {
    read(path)
        .lines()
        .filter_map(|l| l.strip_prefix("- "))
        .map(|p| p.trim().to_string())
        .collect()
}

#[test]
fn the_roles_split_reads_from_conditioned_writes() {
    let reads = permissions("deploy/iam/gcp-custom-role.yaml");
    let writes = permissions("deploy/iam/gcp-custom-role-writer.yaml");
    let want_writes: BTreeSet<String> = [
        "compute.firewalls.create",
        "compute.firewalls.update",
        "compute.firewalls.delete",
    ]
    .map(String::from)
    .into();
    assert_eq!(writes, want_writes);
    let want_reads: BTreeSet<String> = [
        "compute.firewalls.list",
        "compute.firewalls.get",
        "compute.networks.updatePolicy",
        "compute.globalOperations.get",
        "compute.instances.list",
        "compute.projects.get",
    ]
    .map(String::from)
    .into();
    assert_eq!(reads, want_reads, "no write outside the conditioned role");
}

#[test]
fn the_condition_admits_only_the_clusters_rule_names() {
    let text = read("deploy/iam/gcp-writer-condition.yaml");
    let expression = text
        .lines()
        .find_map(|l| l.strip_prefix("expression:"))
        .expect("an expression")
        .trim()
        .replace("NET_PROJECT", "net-host-123")
        .replace("CLUSTER", "prod-eu");
    let env = Arc::new(cel::Env::stdlib());
    let program = env.compile(&expression).expect("the condition compiles");
    let admits = |name: &str| {
        let mut ctx = cel::Context::with_env(Arc::clone(&env));
        ctx.add_variable_from_value(
            "resource",
            cel::to_value(serde_json::json!({"name": name})).unwrap(),
        );
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => b,
            other => panic!("{name}: {other:?}"),
        }
    };
    // The names the provider writes (marker::rule_name) for cluster prod-eu.
    let ours = nodeport_firewall_gcp::marker::name_prefix("prod-eu");
    assert_eq!(ours, "npf-prod-eu-");
    assert!(admits(&format!(
        "projects/net-host-123/global/firewalls/{ours}web-3f2a9c1b7d"
    )));
    for name in [
        "projects/net-host-123/global/firewalls/allow-ssh",
        "projects/net-host-123/global/firewalls/npf-prod-eu2-web-3f2a9c1b7d",
        "projects/net-host-123/global/firewalls/npf-other-web-3f2a9c1b7d",
        "projects/other-proj/global/firewalls/npf-prod-eu-web-3f2a9c1b7d",
        "projects/net-host-123/global/networks/shared-vpc",
    ] {
        assert!(!admits(name), "{name} must not be writable");
    }
}

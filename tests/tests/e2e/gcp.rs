//! The real binary with `--provider gcp` against the Compute test server
//! (`nodeport_firewall_e2e::gcp_compute`): `plan`, `apply`, then `plan` again shows no
//! changes; a rule nodeport-firewall does not own is untouched; an ambiguous pool is an
//! error in the plan; a Shared VPC host project that refuses writes makes `apply` print the
//! `gcloud` commands a network admin must run; the project's `FIREWALLS` quota, tighter
//! than `ruleBudget`, is a plan error before any write, and without `compute.projects.get`
//! the budget applies with one warning.
//!
//! The nodes are GKE-style (`cloud.google.com/gke-nodepool`, `gce://` providerIDs); the
//! Services are the bundled demo's. The binary uses the `endpoint` override and
//! `credentials: anonymous`.

use std::path::{Path, PathBuf};

use nodeport_firewall_e2e::gcp_compute::ComputeServer;
use serde_json::json;

use crate::cli::{Cli, Scratch, examples};

const PROJECT: &str = "demo-proj";
const ZONE: &str = "europe-west1-b";
const GKE_TAG: &str = "gke-demo-0a1b2c3d-node";
const DEFAULT_SA: &str = "123-compute@developer.gserviceaccount.com";

/// GKE nodes: web (2, tag `web`), edge (1, tag `edge`), batch (1, its own service
/// account), gpu (1, unmanaged), each instance registered in the server.
fn gke_nodes(server: &ComputeServer, dir: &Scratch, edge_tag: &str) -> PathBuf {
    let nodes = [
        ("gke-demo-web-1", "web", vec![GKE_TAG, "web"], DEFAULT_SA),
        ("gke-demo-web-2", "web", vec![GKE_TAG, "web"], DEFAULT_SA),
        (
            "gke-demo-edge-1",
            "edge",
            vec![GKE_TAG, edge_tag],
            DEFAULT_SA,
        ),
        (
            "gke-demo-batch-1",
            "batch",
            vec![GKE_TAG],
            "batch-nodes@demo-proj.iam.gserviceaccount.com",
        ),
        ("gke-demo-gpu-1", "gpu", vec![GKE_TAG, "gpu"], DEFAULT_SA),
    ];
    let mut items = Vec::new();
    for (name, pool, tags, sa) in &nodes {
        server.add_instance(PROJECT, ZONE, name, tags, &[sa]);
        items.push(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"cloud.google.com/gke-nodepool": pool}},
            "spec": {"providerID": format!("gce://{PROJECT}/{ZONE}/{name}")},
        }));
    }
    dir.write(
        "nodes.json",
        &json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )
}

fn config(dir: &Scratch, server: &ComputeServer, project: &str) -> PathBuf {
    dir.write(
        "config.yaml",
        &format!(
            "clusterName: demo\npools:\n  gpu: {{managed: false}}\ngcp:\n  project: {project}\n  network: default\n  endpoint: {}\n  credentials: anonymous\n  operationPollMillis: 1\n  retry: {{maxAttempts: 4, baseDelayMillis: 1, maxDelayMillis: 10}}\n",
            server.url()
        ),
    )
}

fn args(nodes: &Path, config: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "-f".to_string(),
        nodes.display().to_string(),
        "-f".to_string(),
        examples()
            .join("cluster/services.yaml")
            .display()
            .to_string(),
        "--config".to_string(),
        config.display().to_string(),
        "--provider".to_string(),
        "gcp".to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn gcp_plan_apply_plan_against_the_compute_server_leaves_foreign_rules_alone() {
    let server = ComputeServer::start();
    let dir = Scratch::new();
    let nodes = gke_nodes(&server, &dir, "edge");
    let config = config(&dir, &server, PROJECT);
    server
        .seed_firewall(
            PROJECT,
            json!({"name": "allow-ssh", "network": "default",
                   "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
                   "sourceRanges": ["198.51.100.0/24"], "targetTags": ["web"]}),
        )
        .unwrap();
    let ssh = server.firewalls(PROJECT)["allow-ssh"].clone();
    let target = format!("gcp:{PROJECT}/default");

    let plan = Cli::new()
        .plan(&args(&nodes, &config, &[]))
        .expect_exit(2)
        .stdout_has(&[
            "nodeport-firewall plan: cluster demo, provider gcp",
            &format!("pool web (2 nodes) -> {target}"),
            &format!("pool edge (1 node) -> {target}"),
            &format!("pool batch (1 node) -> {target}"),
            "pool gpu (1 node): not managed",
        ]);
    let adds = plan.lines_starting("+ ").len();
    assert!(adds > 0, "{}", plan.stdout);
    let json_plan = Cli::new()
        .plan(&args(&nodes, &config, &["-o", "json"]))
        .expect_exit(2)
        .json();
    let scopes: Vec<String> = json_plan["pools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["targets"][0]["scope"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        scopes,
        [
            "sa:batch-nodes@demo-proj.iam.gserviceaccount.com",
            "tags:edge",
            "tags:web"
        ],
        "{json_plan:#}"
    );

    Cli::new()
        .apply(&args(&nodes, &config, &["--yes"]))
        .expect_exit(0)
        .stdout_has(&[&format!(
            "Apply complete: {adds} added, 0 changed, 0 removed."
        )]);
    let rules = server.firewalls(PROJECT);
    let ours: Vec<&String> = rules
        .keys()
        .filter(|n| n.starts_with("npf-demo-"))
        .collect();
    assert_eq!(ours.len(), adds, "{rules:#?}");
    // Nothing opened to the cluster-wide tag; every rule has a pool target.
    for (name, r) in &rules {
        assert_ne!(r["targetTags"], json!([GKE_TAG]), "{name}");
        assert!(
            r["targetTags"].is_array() || r["targetServiceAccounts"].is_array(),
            "{name}"
        );
    }
    Cli::new()
        .plan(&args(&nodes, &config, &[]))
        .expect_exit(0)
        .stdout_has(&[&format!("Plan: 0 to add, 0 to remove, {adds} unchanged.")]);
    assert_eq!(server.firewalls(PROJECT)["allow-ssh"], ssh);
}

#[test]
fn gcp_ambiguous_pool_is_a_plan_error_and_shared_vpc_403_prints_the_gcloud_commands() {
    let server = ComputeServer::start();
    let dir = Scratch::new();
    // edge's only tag is also on the (unmanaged) gpu node: no distinguishing target.
    let nodes = gke_nodes(&server, &dir, "gpu");
    let config = config(&dir, &server, "host-proj");
    server.forbid_writes("host-proj", true);

    let plan = Cli::new().plan(&args(&nodes, &config, &[])).expect_exit(1);
    let plan = plan.stdout_has(&[
        "pool edge (1 node): ERROR pool edge: no target that selects only this pool's instances",
    ]);
    assert!(
        plan.stdout.contains("targetTags: [<tag>]"),
        "{}",
        plan.stdout
    );
    // The nodes are in demo-proj and the network in host-proj: a Shared VPC, so the plan
    // already carries the commands a network admin would run.
    assert!(
        plan.stdout.contains(
            "Shared VPC: the network is in host project host-proj, the nodes in demo-proj."
        ),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .contains("    gcloud compute firewall-rules create npf-demo-web-"),
        "{}",
        plan.stdout
    );
    let json = Cli::new()
        .plan(&args(&nodes, &config, &["-o", "json"]))
        .expect_exit(1)
        .json();
    let web = json["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| {
            t["pools"]
                .as_array()
                .is_some_and(|p| p.contains(&json!("web")))
        })
        .cloned()
        .unwrap_or_default();
    let commands = web["manual"]["commands"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let adds = web["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["action"] == "add")
        .count();
    assert!(adds > 0 && commands.len() == adds, "{web:#}");

    let applied = Cli::new().apply(&args(&nodes, &config, &["--yes"]));
    let out = format!("{}{}", applied.stdout, applied.stderr);
    assert_ne!(applied.code, Some(0), "{out}");
    assert!(
        out.contains("Required 'compute.firewalls.create' permission"),
        "{out}"
    );
    assert!(
        out.contains("gcloud compute firewall-rules create npf-demo-web-"),
        "{out}"
    );
    assert!(
        out.contains("--project=host-proj --network=default --direction=INGRESS"),
        "{out}"
    );
    assert!(server.firewalls("host-proj").is_empty());
}

/// `-f` arguments for the web pool's nodes and `services` (YAML documents).
fn crowd_args(
    dir: &Scratch,
    nodes: &Path,
    config: &Path,
    services: &str,
    extra: &[&str],
) -> Vec<String> {
    let svcs = dir.write("crowd.yaml", services);
    let mut a = vec![
        "-f".to_string(),
        nodes.display().to_string(),
        "-f".to_string(),
        svcs.display().to_string(),
        "--config".to_string(),
        config.display().to_string(),
        "--provider".to_string(),
        "gcp".to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `n` Services on the web pool; `ranges(i)` is Service i's allowlist.
fn crowd(n: u16, ranges: impl Fn(u16) -> String) -> String {
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: a-rather-long-service-name-{i:03}\n  namespace: a-rather-long-namespace\n  annotations:\n    nodeport-firewall.io/enabled: \"true\"\n    nodeport-firewall.io/node-pools: web\n    nodeport-firewall.io/allowed-source-ranges: \"{}\"\nspec:\n  type: NodePort\n  ports:\n  - {{name: p, protocol: TCP, port: 80, nodePort: {}}}\n",
                ranges(i),
                31000 + i
            )
        })
        .collect()
}

/// 95 Services on one allowlist: one rule whose description lists only the first ones and
/// a digest. Every CLI run is a new process; `plan` after `apply` still plans nothing.
#[test]
fn gcp_a_long_service_list_plans_nothing_after_apply_in_a_new_process() {
    let server = ComputeServer::start();
    let dir = Scratch::new();
    let nodes = gke_nodes(&server, &dir, "edge");
    let config = config(&dir, &server, PROJECT);
    let services = crowd(95, |_| "10.0.0.0/8".to_string());
    Cli::new()
        .apply(&crowd_args(&dir, &nodes, &config, &services, &["--yes"]))
        .expect_exit(0)
        .stdout_has(&["Apply complete: 1 added, 0 changed, 0 removed."]);
    let rules = server.firewalls(PROJECT);
    let ours: Vec<&serde_json::Value> = rules
        .iter()
        .filter(|(n, _)| n.starts_with("npf-demo-"))
        .map(|(_, r)| r)
        .collect();
    assert_eq!(ours.len(), 1, "{rules:#?}");
    assert!(
        ours[0]["description"]
            .as_str()
            .is_some_and(|d| d.contains("servicesDigest")),
        "{:#}",
        ours[0]
    );
    Cli::new()
        .plan(&crowd_args(&dir, &nodes, &config, &services, &[]))
        .expect_exit(0)
        .stdout_has(&["Plan: 0 to add, 0 to remove, 1 unchanged."]);
}

/// Done-when of issue 17 (GCP): the project's `FIREWALLS` quota (2) is tighter than
/// `ruleBudget` (100): `plan` reports the quota error, naming the quota, and exits 1;
/// `apply` refuses the target before any write.
#[test]
fn gcp_a_project_quota_tighter_than_the_budget_is_a_plan_error_before_any_write() {
    let server = ComputeServer::start();
    let dir = Scratch::new();
    let nodes = gke_nodes(&server, &dir, "edge");
    let config = config(&dir, &server, PROJECT);
    // Three allowlists: three rules; the project holds two.
    let services = crowd(3, |i| format!("10.{i}.0.0/16"));
    server.set_quota(PROJECT, Some(2));
    let error = "rule quota exceeded: 3 rules of ours + 0 of others = 3 rules, limit 2 (the project's FIREWALLS quota: limit 2, 0 used, 0 of them outside this network)";
    Cli::new()
        .plan(&crowd_args(&dir, &nodes, &config, &services, &[]))
        .expect_exit(1)
        .stdout_has(&[error]);
    let applied = Cli::new().apply(&crowd_args(&dir, &nodes, &config, &services, &["--yes"]));
    let out = format!("{}{}", applied.stdout, applied.stderr);
    assert_eq!(applied.code, Some(1), "{out}");
    assert!(out.contains(error), "{out}");
    assert!(
        !out.contains("Quota 'FIREWALLS' exceeded"),
        "no write tried: {out}"
    );
    assert_eq!(server.calls().get("firewalls.insert"), None, "{out}");
    assert!(server.firewalls(PROJECT).is_empty());
}

/// Without `compute.projects.get` the plan uses `ruleBudget` alone and says so in one
/// warning line; the quota then stops the apply after two inserts: the output says what
/// was written and what failed, and the exit status is 1.
#[test]
fn gcp_without_the_quota_read_the_budget_applies_with_one_warning_and_the_quota_stops_the_apply() {
    let server = ComputeServer::start();
    let dir = Scratch::new();
    let nodes = gke_nodes(&server, &dir, "edge");
    let config = config(&dir, &server, PROJECT);
    let services = crowd(3, |i| format!("10.{i}.0.0/16"));
    server.set_quota(PROJECT, Some(2));
    server.forbid_project_get(PROJECT, true);
    let warning = format!(
        "could not read the FIREWALLS quota of project {PROJECT} (permission compute.projects.get missing): planning against gcp.ruleBudget 100 alone"
    );
    let plan = Cli::new()
        .plan(&crowd_args(&dir, &nodes, &config, &services, &[]))
        .expect_exit(2);
    let all = format!("{}{}", plan.stdout, plan.stderr);
    assert_eq!(all.matches(&warning).count(), 1, "one warning line: {all}");
    let out = Cli::new()
        .apply(&crowd_args(&dir, &nodes, &config, &services, &["--yes"]))
        .expect_exit(1)
        .stdout_has(&["Apply failed on 1 target(s): 2 added, 0 changed, 0 removed."]);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("having written 2 added"), "{all}");
    assert!(all.contains("Quota 'FIREWALLS' exceeded"), "{all}");
}

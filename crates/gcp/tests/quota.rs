//! The project's `FIREWALLS` quota against the Compute test server: read with
//! `projects.get` once per project and plan, planned against when tighter than
//! `ruleBudget` (a plan error before any write, that names the quota), split between the
//! networks of one project so that two targets cannot take the same room, and replaced by
//! `ruleBudget` with one warning when it cannot be read.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use nodeport_firewall_e2e::gcp_compute::ComputeServer;
use nodeport_firewall_gcp::{CredentialSource, GcpProvider};
use nodeport_firewall_provider::engine::{self, ApplyOutcome};
use nodeport_firewall_provider::model::{
    Config, NodeSpec, Plan, PoolConfig, PoolName, ServiceSpec, desired,
};
use nodeport_firewall_provider::testkit::{apply, apply_ok};
use nodeport_firewall_provider::{PlanError, Provider, Target};
use serde_json::{Value, json};

const CLUSTER: &str = "quota-test";
const PROJECT: &str = "proj-q";
const ZONE: &str = "europe-west1-b";

async fn provider(server: &ComputeServer, extra: Value) -> GcpProvider {
    let mut section = json!({
        "project": PROJECT,
        "network": "default",
        "endpoint": server.url(),
        "operationPollMillis": 1,
        "retry": {"maxAttempts": 3, "baseDelayMillis": 1, "maxDelayMillis": 5},
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        section[k.as_str()] = v;
    }
    GcpProvider::from_config_with(CLUSTER, Some(&section), CredentialSource::Anonymous)
        .await
        .unwrap()
}

/// One node per pool, each pool pinned to its tag `tag-<pool>` and, when given, to a
/// network of its own.
fn setup(server: &ComputeServer, pools: &[(&str, Option<&str>)]) -> (Config, Vec<NodeSpec>) {
    let mut config = Config::new(CLUSTER);
    let mut nodes = Vec::new();
    for (pool, network) in pools {
        let tag = format!("tag-{pool}");
        server.add_instance(PROJECT, ZONE, &format!("vm-{pool}"), &[&tag], &[]);
        nodes.push(
            NodeSpec::new(&format!("node-{pool}"))
                .with_label("cloud.google.com/gke-nodepool", pool)
                .with_provider_id(&format!("gce://{PROJECT}/{ZONE}/vm-{pool}")),
        );
        let mut gcp = json!({"targetTags": [tag]});
        if let Some(n) = network {
            gcp["network"] = json!(n);
        }
        config.pools.insert(
            PoolName::new(*pool),
            PoolConfig {
                providers: [("gcp".to_string(), gcp)].into(),
                ..Default::default()
            },
        );
    }
    (config, nodes)
}

/// `n` Services on `pool`, each with its own allowlist: `n` rules. NodePorts are unique
/// in a cluster: each pool's start from its own base.
fn services(pool: &str, n: u8) -> Vec<ServiceSpec> {
    let base = 30000 + 100 * i32::from(pool.bytes().next().unwrap_or(0) % 20);
    (0..n)
        .map(|i| {
            ServiceSpec::nodeport("apps", &format!("{pool}-{i}"))
                .with_port("p", "TCP", 80, base + i32::from(i))
                .enabled()
                .with_ranges(&format!("10.{i}.0.0/16"))
                .with_annotation("nodeport-firewall.io/node-pools", pool)
        })
        .collect()
}

async fn plan(p: &GcpProvider, config: &Config, svcs: &[ServiceSpec], nodes: &[NodeSpec]) -> Plan {
    engine::plan(p, config, &desired(config, svcs, nodes)).await
}

fn seed_foreign(server: &ComputeServer, name: &str, network: &str) {
    server
        .seed_firewall(
            PROJECT,
            json!({"name": name, "network": network,
                   "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
                   "sourceRanges": ["198.51.100.0/24"], "targetTags": ["bastion"]}),
        )
        .unwrap();
}

fn ours(server: &ComputeServer) -> usize {
    server
        .firewalls(PROJECT)
        .keys()
        .filter(|n| n.starts_with("npf-"))
        .count()
}

/// Done-when of issue 17 (GCP): the quota, tighter than `ruleBudget` because other
/// networks use it, is a `RuleQuota` plan error naming it, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_quota_tighter_than_the_budget_is_a_plan_error_before_any_write() {
    let server = ComputeServer::start();
    let (config, nodes) = setup(&server, &[("web", None)]);
    for i in 0..95 {
        seed_foreign(&server, &format!("other-{i}"), "legacy-vpc");
    }
    seed_foreign(&server, "allow-ssh", "default");
    server.set_quota(PROJECT, Some(100));
    // The budget alone (100) would admit 1 + 5 rules on this network.
    let p = provider(&server, json!({"ruleBudget": 100})).await;
    let svcs = services("web", 5);
    server.reset_calls();
    let refused = plan(&p, &config, &svcs, &nodes).await;
    let tp = &refused.targets[0];
    let reason =
        "the project's FIREWALLS quota: limit 100, 96 used, 95 of them outside this network";
    assert_eq!(
        tp.error,
        Some(PlanError::RuleQuota {
            family: None,
            ours: 5,
            foreign: 1,
            limit: 5,
            reason: Some(reason.to_string()),
        })
    );
    assert_eq!(
        tp.error.as_ref().unwrap().to_string(),
        format!("rule quota exceeded: 5 rules of ours + 1 of others = 6 rules, limit 5 ({reason})")
    );
    assert_eq!(tp.usage.limit, Some(5));
    assert_eq!(server.calls_on("projects.get", PROJECT), 1);
    for (_, outcome) in apply(&p, &refused).await {
        assert!(
            matches!(outcome, ApplyOutcome::Refused { .. }),
            "{outcome:?}"
        );
    }
    let writes: usize = ["firewalls.insert", "firewalls.patch", "firewalls.delete"]
        .iter()
        .map(|m| server.calls_on(m, PROJECT))
        .sum();
    assert_eq!(writes, 0, "nothing written");
    assert_eq!(ours(&server), 0);

    // Four fit exactly: planned and applied whole, headroom 0.
    let fits = plan(&p, &config, &services("web", 4), &nodes).await;
    assert!(
        fits.targets[0].error.is_none(),
        "{:?}",
        fits.targets[0].error
    );
    assert_eq!(fits.targets[0].usage.headroom, Some(0));
    apply_ok(&p, &fits).await;
    assert_eq!(ours(&server), 4);
}

/// Two targets of one project (pools on two networks) cannot each take the same free
/// rules: the free room is split between the config's networks of the project, so that
/// both plans together fit the quota, and applying both never meets QUOTA_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_of_one_project_split_its_free_quota() {
    let server = ComputeServer::start();
    let (config, nodes) = setup(&server, &[("web", None), ("edge", Some("edge-vpc"))]);
    for i in 0..4 {
        seed_foreign(&server, &format!("other-{i}"), "legacy-vpc");
    }
    // 10 rules: 4 taken, 6 free, 3 for each of the two networks.
    server.set_quota(PROJECT, Some(10));
    let p = provider(&server, json!({})).await;
    let mut svcs = services("web", 4);
    svcs.extend(services("edge", 4));
    server.reset_calls();
    let both = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(both.targets.len(), 2);
    for tp in &both.targets {
        let e = tp
            .error
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(
            e.starts_with("rule quota exceeded: 4 rules of ours + 0 of others = 4 rules, limit 3")
                && e.contains("its 6 free rules are shared by the 2 networks of the project that the config writes to, 3 each"),
            "{}: {e}: {:?}",
            tp.target,
            tp.usage
        );
    }
    // One read of the project's quota for its two targets.
    assert_eq!(server.calls_on("projects.get", PROJECT), 1);

    // Three each: both fit, and both applied together stay within the quota.
    let mut svcs = services("web", 3);
    svcs.extend(services("edge", 3));
    let fits = plan(&p, &config, &svcs, &nodes).await;
    assert!(fits.targets.iter().all(|t| t.error.is_none()), "{fits:?}");
    apply_ok(&p, &fits).await;
    assert_eq!(ours(&server), 6);
    assert_eq!(server.firewalls(PROJECT).len(), 10);
}

/// `projects.get` denied: the plan uses `ruleBudget` and carries one warning for the
/// project (the same message on each of its targets), the preflight names the
/// permission, and the next apply still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_quota_read_falls_back_to_the_budget_with_one_warning() {
    let server = ComputeServer::start();
    let (config, nodes) = setup(&server, &[("web", None), ("edge", Some("edge-vpc"))]);
    server.forbid_project_get(PROJECT, true);
    let p = provider(&server, json!({"ruleBudget": 7})).await;
    let mut svcs = services("web", 2);
    svcs.extend(services("edge", 2));
    server.reset_calls();
    let planned = plan(&p, &config, &svcs, &nodes).await;
    let want = format!(
        "could not read the FIREWALLS quota of project {PROJECT} (permission compute.projects.get missing): planning against gcp.ruleBudget 7 alone; grant the permission (deploy/iam/gcp-custom-role.yaml) so that the plan sees the real quota"
    );
    for tp in &planned.targets {
        assert!(tp.error.is_none(), "{:?}", tp.error);
        assert_eq!(tp.usage.limit, Some(7), "the budget applies");
        let observed = tp.observed.as_ref().expect("the observation");
        assert_eq!(
            observed.warnings,
            std::slice::from_ref(&want),
            "{}",
            tp.target
        );
    }
    // A failed read is not repeated for the project's second target.
    assert_eq!(server.calls_on("projects.get", PROJECT), 1);
    let target = Target::new("gcp", &format!("{PROJECT}/default"));
    assert_eq!(
        p.preflight(&target).await.unwrap(),
        ["compute.projects.get"]
    );
    apply_ok(&p, &planned).await;
    assert_eq!(ours(&server), 4);

    // Granted again: the next plan reads the quota, and no warning is left.
    server.forbid_project_get(PROJECT, false);
    let again = plan(&p, &config, &svcs, &nodes).await;
    for tp in &again.targets {
        let observed = tp.observed.as_ref().expect("the observation");
        assert!(observed.warnings.is_empty(), "{:?}", observed.warnings);
    }
    assert_eq!(p.preflight(&target).await.unwrap(), Vec::<String>::new());
}

/// A quota read that fails for another reason (an outage, after the retries) is also a
/// warning, and the plan goes on with the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_quota_read_is_a_warning_not_an_error() {
    let server = ComputeServer::start();
    let (config, nodes) = setup(&server, &[("web", None)]);
    let p = provider(&server, json!({"ruleBudget": 9})).await;
    server.fail_next("projects.get", 3, 503);
    let planned = plan(&p, &config, &services("web", 1), &nodes).await;
    let tp = &planned.targets[0];
    assert!(tp.error.is_none(), "{:?}", tp.error);
    assert_eq!(tp.usage.limit, Some(9));
    let warnings = &tp.observed.as_ref().unwrap().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "could not read the FIREWALLS quota of project {PROJECT} (Compute projects.get: "
        )) && warnings[0].ends_with("planning against gcp.ruleBudget 9 alone"),
        "{warnings:?}"
    );
}

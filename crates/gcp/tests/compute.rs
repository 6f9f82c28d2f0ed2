//! The GCP provider against the Compute test server (`nodeport_firewall_e2e::gcp_compute`),
//! through the real `google-cloud-compute-v1` client: the conformance suite, discovery,
//! consolidation, conflicts, throttling, Shared VPC, quota, requestId idempotency, Operation
//! polling, call counts, and the 200-Service measurement (run with `--nocapture` to see the
//! figures).
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use async_trait::async_trait;
use nodeport_firewall_e2e::gcp_compute::ComputeServer;
use nodeport_firewall_gcp::{CredentialSource, GcpProvider};
use nodeport_firewall_provider::conformance::{self, Harness, PoolFixture};
use nodeport_firewall_provider::engine::{self, ApplyOutcome};
use nodeport_firewall_provider::model::{
    Config, NodeSpec, Plan, PoolConfig, PoolName, ServiceSpec, desired,
};
use nodeport_firewall_provider::{Action, ErrorKind, Provider, Rule, Target};
use serde_json::{Value, json};

const CLUSTER: &str = "gke-test";
const PROJECT: &str = "proj-a";
const ZONE: &str = "europe-west1-b";
const POOL_LABEL: &str = "cloud.google.com/gke-nodepool";
/// GKE's tag on every node of the cluster.
const GKE_TAG: &str = "gke-gke-test-1a2b3c4d-node";

async fn provider_with(server: &ComputeServer, extra: Value) -> GcpProvider {
    let mut section = json!({
        "project": PROJECT,
        "network": "default",
        "endpoint": server.url(),
        "operationPollMillis": 1,
        "retry": {"maxAttempts": 6, "baseDelayMillis": 1, "maxDelayMillis": 20},
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        section[k.as_str()] = v;
    }
    GcpProvider::from_config_with(CLUSTER, Some(&section), CredentialSource::Anonymous)
        .await
        .unwrap()
}

fn node(name: &str, pool: &str, instance: &str) -> NodeSpec {
    NodeSpec::new(name)
        .with_label(POOL_LABEL, pool)
        .with_provider_id(&format!("gce://{PROJECT}/{ZONE}/{instance}"))
}

/// A pool of `n` instances carrying GKE's cluster tag and `tags`, using `sa`.
fn pool_nodes(
    server: &ComputeServer,
    pool: &str,
    n: usize,
    tags: &[&str],
    sa: &str,
) -> Vec<NodeSpec> {
    let mut all_tags = vec![GKE_TAG];
    all_tags.extend_from_slice(tags);
    (0..n)
        .map(|i| {
            let inst = format!("gke-{pool}-{i}");
            server.add_instance(PROJECT, ZONE, &inst, &all_tags, &[sa]);
            node(&format!("node-{pool}-{i}"), pool, &inst)
        })
        .collect()
}

fn config_for(pools: &[(&str, Option<Value>)]) -> Config {
    let mut config = Config::new(CLUSTER);
    for (p, gcp) in pools {
        config.pools.insert(
            PoolName::new(*p),
            PoolConfig {
                providers: gcp.iter().map(|v| ("gcp".to_string(), v.clone())).collect(),
                ..Default::default()
            },
        );
    }
    config
}

async fn plan(p: &GcpProvider, config: &Config, svcs: &[ServiceSpec], nodes: &[NodeSpec]) -> Plan {
    engine::plan(p, config, &desired(config, svcs, nodes)).await
}

use nodeport_firewall_provider::testkit::{apply, apply_ok, writes};

fn svc(name: &str, port: i32, ranges: &str) -> ServiceSpec {
    ServiceSpec::nodeport("apps", name)
        .with_port("p", "TCP", 80, port)
        .enabled()
        .with_ranges(ranges)
}

fn ours(server: &ComputeServer, project: &str) -> BTreeMap<String, Value> {
    server
        .firewalls(project)
        .into_iter()
        .filter(|(n, _)| n.starts_with("npf-"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Conformance

/// The target fields of a rule with this neutral scope (`tags:a,b` or `sa:<email>`).
fn scope_fields(scope: &str) -> Value {
    match scope.strip_prefix("tags:") {
        Some(tags) => json!({"targetTags": tags.split(',').collect::<Vec<_>>()}),
        None => json!({"targetServiceAccounts": [scope.strip_prefix("sa:").unwrap()]}),
    }
}

struct GcpHarness {
    server: ComputeServer,
    provider: GcpProvider,
}

#[async_trait]
impl Harness for GcpHarness {
    fn provider(&self) -> &dyn Provider {
        &self.provider
    }

    async fn new_instance(&self) -> Box<dyn Provider> {
        Box::new(provider_with(&self.server, json!({"ruleBudget": 12})).await)
    }

    /// A pool on a network of its own, targeted by a tag that discovery finds.
    async fn fresh_pool(&self, tag: &str) -> PoolFixture {
        let pool = format!("pool-{tag}");
        let nodes = pool_nodes(
            &self.server,
            &pool,
            2,
            &[&format!("tag-{tag}")],
            "default@proj-a.iam.gserviceaccount.com",
        );
        PoolFixture {
            config: config_for(&[(&pool, Some(json!({"network": format!("net-{tag}")})))]),
            pool: PoolName::new(&pool),
            nodes,
        }
    }

    async fn seed_foreign(
        &self,
        target: &Target,
        owner: Option<&str>,
        rule: &Rule,
    ) -> nodeport_firewall_provider::Result<()> {
        let (project, network) = target.id.split_once('/').unwrap();
        let c = &rule.content;
        let scope = c.scope.as_deref().unwrap();
        let tags: Vec<&str> = scope.strip_prefix("tags:").unwrap().split(',').collect();
        let n = self.server.firewalls(project).len();
        let description = match owner {
            Some(cluster) => {
                json!({"managedBy": "nodeport-firewall", "cluster": cluster}).to_string()
            }
            None => "opened by hand".to_string(),
        };
        self.server
            .seed_firewall(
                project,
                json!({
                    // Another cluster's rules carry our prefix too.
                    "name": if owner.is_some() { format!("npf-other-{n}") } else { format!("allow-by-hand-{n}") },
                    "network": format!("projects/{project}/global/networks/{network}"),
                    "allowed": [{"IPProtocol": c.protocol.as_str(), "ports": c.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>()}],
                    "sourceRanges": c.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    "targetTags": tags,
                    "description": description,
                }),
            )
            .unwrap();
        Ok(())
    }

    /// A foreign Allow for exactly the rule at our priority + 200, behind a foreign Deny
    /// covering it at our priority + 100: our own rule, at our priority, still wins.
    async fn seed_shadowed_allow(
        &self,
        target: &Target,
        rule: &Rule,
    ) -> nodeport_firewall_provider::Result<Option<String>> {
        let (project, network) = target.id.split_once('/').unwrap();
        let c = &rule.content;
        let own = self.provider.config().priority;
        let n = self.server.firewalls(project).len();
        let targets = scope_fields(c.scope.as_deref().unwrap());
        let entry = json!([{"IPProtocol": c.protocol.as_str(),
                            "ports": c.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>()}]);
        let sources: Vec<String> = c.sources.iter().map(|s| s.to_string()).collect();
        let deny = format!("deny-by-hand-{n}");
        for (name, action, priority) in [
            (format!("allow-behind-deny-{n}"), "allowed", own + 200),
            (deny.clone(), "denied", own + 100),
        ] {
            let mut body = json!({
                "name": name,
                "network": format!("projects/{project}/global/networks/{network}"),
                "priority": priority,
                "sourceRanges": sources,
                "description": "opened by hand",
            });
            body[action] = entry.clone();
            for (k, v) in targets.as_object().unwrap() {
                body[k.as_str()] = v.clone();
            }
            self.server.seed_firewall(project, body).unwrap();
        }
        Ok(Some(deny))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_the_compute_test_server() {
    let server = ComputeServer::start();
    let h = GcpHarness {
        provider: provider_with(&server, json!({"ruleBudget": 12})).await,
        server,
    };
    conformance::run_all(&h).await;
    // Every write carried a requestId and waited for its Operation.
    assert_eq!(h.server.writes_without_request_id(), 0);
    assert!(nodeport_firewall_gcp::stats::polls(h.provider.stats()) > 0);
}

// ---------------------------------------------------------------------------------------
// Discovery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_tags_service_account_ambiguous_and_the_gke_tag() {
    let server = ComputeServer::start();
    let p = provider_with(&server, json!({})).await;
    // web: its own tag. batch: no tag of its own, its own service account. edge and gpu:
    // share a tag and the default service account.
    let mut nodes = pool_nodes(
        &server,
        "web",
        2,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    nodes.extend(pool_nodes(
        &server,
        "batch",
        2,
        &[],
        "batch@proj-a.iam.gserviceaccount.com",
    ));
    nodes.extend(pool_nodes(
        &server,
        "edge",
        1,
        &["public"],
        "default@proj-a.iam.gserviceaccount.com",
    ));
    nodes.extend(pool_nodes(
        &server,
        "gpu",
        1,
        &["public"],
        "default@proj-a.iam.gserviceaccount.com",
    ));
    let config = config_for(&[
        ("web", None),
        ("batch", None),
        ("edge", None),
        ("gpu", None),
    ]);
    let svcs = [svc("s", 30080, "10.0.0.0/8")];
    let first = plan(&p, &config, &svcs, &nodes).await;
    let scope = |pool: &str| {
        let report = first
            .pools
            .iter()
            .find(|r| r.name.as_str() == pool)
            .unwrap();
        (
            report.targets.first().and_then(|t| t.scope.clone()),
            report.error.clone(),
        )
    };
    assert_eq!(scope("web").0.as_deref(), Some("tags:web"));
    assert_eq!(
        scope("batch").0.as_deref(),
        Some("sa:batch@proj-a.iam.gserviceaccount.com")
    );
    for pool in ["edge", "gpu"] {
        let (s, e) = scope(pool);
        assert_eq!(s, None);
        let e = e.unwrap();
        assert!(e.contains("public (also on"), "{e}");
        assert!(e.contains("targetTags: [<tag>]"), "{e}");
    }
    // The GKE tag is on every node and never became a target.
    assert!(!format!("{first:?}").contains(&format!("tags:{GKE_TAG}")));
    // Nothing is written for the ambiguous pools; the others apply.
    apply_ok(&p, &first).await;
    let rules = ours(&server, PROJECT);
    assert_eq!(rules.len(), 2, "{rules:#?}");
    let targets: Vec<Value> = rules
        .values()
        .map(|r| json!([r["targetTags"], r["targetServiceAccounts"]]))
        .collect();
    assert!(targets.contains(&json!([["web"], null])), "{targets:?}");
    assert!(
        targets.contains(&json!([null, ["batch@proj-a.iam.gserviceaccount.com"]])),
        "{targets:?}"
    );
    // One read of the project's instances served the four pools.
    assert_eq!(server.calls().get("instances.aggregatedList"), Some(&1));

    // Config wins over discovery: a pool's own tag resolves the ambiguous pool; a
    // cluster-wide tag in config is refused.
    let pinned = config_for(&[("edge", Some(json!({"targetTags": ["edge-only"]})))]);
    let pinned_plan = plan(&p, &pinned, &svcs, &nodes).await;
    assert_eq!(
        pinned_plan
            .pools
            .iter()
            .find(|r| r.name.as_str() == "edge")
            .unwrap()
            .targets[0]
            .scope
            .as_deref(),
        Some("tags:edge-only")
    );
    let wide = config_for(&[("edge", Some(json!({"targetTags": [GKE_TAG]})))]);
    let wide_plan = plan(&p, &wide, &svcs, &nodes).await;
    let e = wide_plan
        .pools
        .iter()
        .find(|r| r.name.as_str() == "edge")
        .unwrap()
        .error
        .clone()
        .unwrap();
    assert!(e.contains("would open every pool"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Consolidation, foreign rules

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_services_with_one_allowlist_take_a_handful_of_rules() {
    let server = ComputeServer::start();
    let p = provider_with(&server, json!({})).await;
    let nodes = pool_nodes(
        &server,
        "web",
        2,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    // 50 Services, ports spread with gaps so that they do not merge into ranges.
    let svcs: Vec<ServiceSpec> = (0..50)
        .map(|i| {
            svc(
                &format!("s{i}"),
                30000 + 3 * i,
                "10.0.0.0/8, 192.168.0.0/16, 2001:db8::/32",
            )
        })
        .collect();
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let rules = ours(&server, PROJECT);
    // One IPv4 and one IPv6 rule, 50 ports each, all 50 Services in each marker.
    assert_eq!(rules.len(), 2, "{:#?}", rules.keys());
    for r in rules.values() {
        assert_eq!(r["allowed"][0]["ports"].as_array().unwrap().len(), 50);
        let marker: Value = serde_json::from_str(r["description"].as_str().unwrap()).unwrap();
        assert_eq!(marker["services"].as_array().unwrap().len(), 50);
        assert_eq!(marker["cluster"], CLUSTER);
    }
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // A smaller per-rule port limit splits the rules, still far from one per Service.
    let p10 = provider_with(&server, json!({"maxPortsPerRule": 10})).await;
    let resplit = plan(&p10, &config, &svcs, &nodes).await;
    apply_ok(&p10, &resplit).await;
    assert_eq!(ours(&server, PROJECT).len(), 10);
    assert_eq!(writes(&plan(&p10, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_lists_too_long_for_a_description_still_converge() {
    let server = ComputeServer::start();
    let p = provider_with(&server, json!({})).await;
    let nodes = pool_nodes(
        &server,
        "web",
        1,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    let svcs: Vec<ServiceSpec> = (0..90)
        .map(|i| {
            ServiceSpec::nodeport(
                "a-rather-long-namespace",
                &format!("a-rather-long-service-{i}"),
            )
            .with_port("p", "TCP", 80, 30000 + 2 * i)
            .enabled()
            .with_ranges("10.0.0.0/8")
        })
        .collect();
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let rules = ours(&server, PROJECT);
    assert_eq!(rules.len(), 1);
    let description = rules.values().next().unwrap()["description"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(description.len() <= 2048 && description.contains("servicesDigest"));
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
    // A restarted operator knows the cut list by its digest: it plans nothing either.
    let restarted = provider_with(&server, json!({})).await;
    let first = plan(&restarted, &config, &svcs, &nodes).await;
    assert_eq!(writes(&first), 0, "{:#?}", first.targets);
    assert_eq!(first.summary.unchanged, 1);
    // One Service fewer changes the digest: the description is patched, once.
    let fewer = plan(&restarted, &config, &svcs[1..], &nodes).await;
    assert_eq!(fewer.summary.update, 1);
    apply_ok(&restarted, &fewer).await;
    let fresh = provider_with(&server, json!({})).await;
    assert_eq!(writes(&plan(&fresh, &config, &svcs[1..], &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_rules_are_never_changed_and_a_taken_name_is_avoided() {
    let server = ComputeServer::start();
    let p = provider_with(&server, json!({})).await;
    let nodes = pool_nodes(
        &server,
        "web",
        1,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    let hand = json!({
        "name": "allow-ssh", "network": "default",
        "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
        "sourceRanges": ["198.51.100.0/24"], "targetTags": ["web"],
    });
    server.seed_firewall(PROJECT, hand).unwrap();
    let before = server.firewalls(PROJECT)["allow-ssh"].clone();
    let svcs = [svc("a", 30080, "10.0.0.0/8")];
    let first = plan(&p, &config, &svcs, &nodes).await;
    let name = first.targets[0]
        .of(Action::Add)
        .next()
        .unwrap()
        .rule
        .name
        .clone()
        .unwrap();
    apply_ok(&p, &first).await;
    apply_ok(&p, &plan(&p, &config, &[], &nodes).await).await;
    assert_eq!(server.firewalls(PROJECT)["allow-ssh"], before);
    assert!(ours(&server, PROJECT).is_empty());

    // Someone else took our rule's name (no marker): the plan sees it and adds ours under a
    // derived name; theirs is untouched.
    let squatter = json!({
        "name": name, "network": "default",
        "allowed": [{"IPProtocol": "tcp", "ports": ["1"]}],
        "sourceRanges": ["203.0.113.0/24"], "targetTags": ["web"], "description": "mine",
    });
    server.seed_firewall(PROJECT, squatter).unwrap();
    let squatted = server.firewalls(PROJECT)[&name].clone();
    let again = plan(&p, &config, &svcs, &nodes).await;
    let add = again.targets[0].of(Action::Add).next().unwrap();
    assert_eq!(add.rule.name.as_deref(), Some(format!("{name}-n").as_str()));
    apply_ok(&p, &again).await;
    assert_eq!(server.firewalls(PROJECT)[&name], squatted);
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

// ---------------------------------------------------------------------------------------
// Writes: conflicts, throttling, Shared VPC, quota, requestId, Operations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_on_insert_is_reported_and_the_next_plan_converges() {
    let server = ComputeServer::start();
    let p = provider_with(&server, json!({})).await;
    let nodes = pool_nodes(
        &server,
        "web",
        1,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    let svcs = [svc("a", 30080, "10.0.0.0/8"), svc("b", 30090, "10.0.0.0/8")];
    let first = plan(&p, &config, &svcs, &nodes).await;
    // Another replica applies the same plan first: ours finds the name taken. The executor
    // does not adopt or patch it; it reports a conflict, and writes nothing.
    let replica = provider_with(&server, json!({})).await;
    apply_ok(&replica, &first).await;
    let before = ours(&server, PROJECT);
    let outcomes = apply(&p, &first).await;
    let ApplyOutcome::Failed { error, report } = &outcomes[0].1 else {
        panic!("expected a conflict: {outcomes:?}")
    };
    assert_eq!(error.kind, ErrorKind::Conflict, "{error}");
    assert!(error.message.contains("the next plan decides"), "{error}");
    assert_eq!(report.added, 0);
    assert_eq!(ours(&server, PROJECT), before);
    // The next plan, from a fresh read, sees the rule as wanted: nothing to do.
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // A replica with an older plan wrote other ports under the same name: the next plan
    // updates it.
    apply_ok(&p, &plan(&p, &config, &[], &nodes).await).await;
    apply_ok(&replica, &plan(&replica, &config, &svcs[..1], &nodes).await).await;
    let next = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(next.summary.update, 1, "{:#?}", next.targets);
    apply_ok(&p, &next).await;
    let rules = ours(&server, PROJECT);
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules.values().next().unwrap()["allowed"][0]["ports"],
        json!(["30080", "30090"])
    );
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_are_retried_and_request_ids_make_retries_idempotent() {
    let server = ComputeServer::start();
    let p = provider_with(&server, json!({})).await;
    let nodes = pool_nodes(
        &server,
        "web",
        1,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    let svcs = [svc("a", 30080, "10.0.0.0/8, 2001:db8::/32")];
    server.fail_next("firewalls.list", 2, 429);
    server.fail_next("firewalls.insert", 1, 429);
    server.fail_next("globalOperations.get", 1, 503);
    // The write is made but its response is lost: the retry carries the same requestId and
    // gets the first write's Operation instead of a 409.
    server.lose_next_responses("firewalls.insert", 1);
    let first = plan(&p, &config, &svcs, &nodes).await;
    assert!(
        first.targets[0].error.is_none(),
        "{:?}",
        first.targets[0].error
    );
    let notes = apply_ok(&p, &first).await;
    assert!(notes.is_empty(), "no 409 path was needed: {notes:?}");
    assert_eq!(server.replayed_request_ids(), 1);
    assert_eq!(ours(&server, PROJECT).len(), 2);
    let stats = p.stats().snapshot();
    assert_eq!(stats["firewalls.list"].retries, 2);
    assert_eq!(stats["firewalls.insert"].retries, 2);
    assert_eq!(stats["globalOperations.get"].retries, 1);
    assert_eq!(server.writes_without_request_id(), 0);
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // Throttling that outlasts the retries is a throttled failure, not a panic or a loop.
    server.fail_next("firewalls.list", 10, 429);
    let err = p
        .observe(&Target::new("gcp", &format!("{PROJECT}/default")))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Throttled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_polled_to_done_and_their_errors_checked() {
    let server = ComputeServer::start();
    server.set_polls_to_done(3);
    let p = provider_with(&server, json!({})).await;
    let nodes = pool_nodes(
        &server,
        "web",
        1,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    let svcs = [svc("a", 30080, "10.0.0.0/8")];
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let log = server.log();
    let statuses: Vec<&str> = log.iter().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(statuses, ["RUNNING", "RUNNING", "DONE"], "{log:?}");

    // An Operation that ends DONE with an error is a failure of that write.
    server.set_polls_to_done(1);
    server.fail_next_operation(
        "firewalls.patch",
        "QUOTA_EXCEEDED",
        "Quota 'FIREWALLS' exceeded.  Limit: 1.0 globally.",
    );
    let more = [svc("a", 30080, "10.0.0.0/8"), svc("b", 30081, "10.0.0.0/8")];
    let outcomes = apply(&p, &plan(&p, &config, &more, &nodes).await).await;
    match &outcomes[0].1 {
        ApplyOutcome::Failed { error, .. } => {
            assert!(
                error
                    .to_string()
                    .contains("operation failed: Quota 'FIREWALLS' exceeded"),
                "{error}"
            );
            assert!(error.to_string().contains("QUOTA_EXCEEDED"), "{error}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    apply_ok(&p, &plan(&p, &config, &more, &nodes).await).await;
    assert_eq!(writes(&plan(&p, &config, &more, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_vpc_403_is_a_per_target_error_with_the_gcloud_commands() {
    let server = ComputeServer::start();
    let p = provider_with(
        &server,
        json!({"project": "host-proj", "network": "shared"}),
    )
    .await;
    let nodes = pool_nodes(
        &server,
        "web",
        1,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    server.forbid_writes("host-proj", true);
    let svcs = [
        svc("a", 30080, "10.0.0.0/8"),
        svc("b", 30090, "10.0.0.0/8, 2001:db8::/32"),
    ];
    let first = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(first.targets[0].target.id, "host-proj/shared");
    let outcomes = apply(&p, &first).await;
    let ApplyOutcome::Failed { error, .. } = &outcomes[0].1 else {
        panic!("expected a failure: {outcomes:?}")
    };
    let error = error.to_string();
    assert!(
        error
            .to_string()
            .contains("Required 'compute.firewalls.create' permission"),
        "{error}"
    );
    assert!(error.to_string().contains("network admin"), "{error}");
    let commands: Vec<&str> = error
        .lines()
        .filter(|l| l.starts_with("gcloud compute firewall-rules create "))
        .collect();
    assert_eq!(commands.len(), 2, "{error}");
    for c in &commands {
        assert!(
            c.contains("--project=host-proj --network=shared --direction=INGRESS"),
            "{c}"
        );
        assert!(c.contains("--target-tags=web"), "{c}");
        assert!(
            c.contains(r#"--description='{"managedBy":"nodeport-firewall","cluster":"gke-test""#),
            "{c}"
        );
    }
    assert!(
        commands
            .iter()
            .any(|c| c.contains("--rules=tcp:30080,tcp:30090")),
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|c| c.contains("--rules=tcp:30090 --source-ranges=2001:db8::/32")),
        "{commands:?}"
    );
    assert!(commands.iter().all(|c| c.ends_with("}'")), "{commands:?}");
    assert!(server.firewalls("host-proj").is_empty());

    // The permission preflight says so too, once the network has a rule to test against.
    let target = Target::new("gcp", "host-proj/shared");
    assert_eq!(p.preflight(&target).await.unwrap(), Vec::<String>::new());
    server
        .seed_firewall(
            "host-proj",
            json!({"name": "allow-ssh", "network": "shared",
                   "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
                   "sourceRanges": ["198.51.100.0/24"], "targetTags": ["bastion"]}),
        )
        .unwrap();
    assert_eq!(
        p.preflight(&target).await.unwrap(),
        [
            "compute.firewalls.create",
            "compute.firewalls.update",
            "compute.firewalls.delete"
        ]
    );

    // The admin runs them (here: the same rules, as the commands say); the next plan is empty.
    server.forbid_writes("host-proj", false);
    assert_eq!(p.preflight(&target).await.unwrap(), Vec::<String>::new());
    apply_ok(&p, &first).await;
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_a_plan_error_and_the_project_quota_a_clear_failure() {
    let server = ComputeServer::start();
    let nodes = pool_nodes(
        &server,
        "web",
        1,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    // Three distinct allowlists: three rules.
    let svcs = [
        svc("a", 30080, "10.0.0.0/8"),
        svc("b", 30081, "10.1.0.0/16"),
        svc("c", 30082, "10.2.0.0/16"),
    ];
    // The budget counts rules of others on the network: 1 foreign + 3 > 3.
    server
        .seed_firewall(
            PROJECT,
            json!({"name": "allow-ssh", "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
                   "sourceRanges": ["198.51.100.0/24"], "targetTags": ["web"]}),
        )
        .unwrap();
    let small = provider_with(&server, json!({"ruleBudget": 3})).await;
    let refused = plan(&small, &config, &svcs, &nodes).await;
    let e = refused.targets[0].error.as_ref().unwrap().to_string();
    assert!(
        e.starts_with("rule quota exceeded: 3 rules of ours + 1 of others = 4 rules, limit 3"),
        "{e}"
    );
    server.reset_calls();
    for (_, o) in apply(&small, &refused).await {
        assert!(matches!(o, ApplyOutcome::Refused { .. }), "{o:?}");
    }
    assert_eq!(server.calls().get("firewalls.insert"), None, "no write");

    // The project quota is lower than the budget: a plan error before any write, that says
    // which limit applies (1 rule on the network, 1 on another: 3 of the quota's 5 left).
    server
        .seed_firewall(
            PROJECT,
            json!({"name": "allow-ssh-elsewhere", "network": "other-vpc",
                   "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
                   "sourceRanges": ["198.51.100.0/24"], "targetTags": ["bastion"]}),
        )
        .unwrap();
    server.set_quota(PROJECT, Some(4));
    let p = provider_with(&server, json!({})).await;
    server.reset_calls();
    let refused = plan(&p, &config, &svcs, &nodes).await;
    let error = refused.targets[0].error.as_ref().expect("a quota error");
    assert_eq!(
        error,
        &nodeport_firewall_provider::PlanError::RuleQuota {
            family: None,
            ours: 3,
            foreign: 1,
            limit: 3,
            reason: Some(
                "the project's FIREWALLS quota: limit 4, 2 used, 1 of them outside this network"
                    .to_string()
            ),
        }
    );
    let observed = refused.targets[0].observed.as_ref().unwrap();
    assert!(observed.warnings.is_empty(), "{:?}", observed.warnings);
    assert_eq!(server.calls_on("projects.get", PROJECT), 1);
    for (_, o) in apply(&p, &refused).await {
        assert!(matches!(o, ApplyOutcome::Refused { .. }), "{o:?}");
    }
    assert_eq!(server.calls().get("firewalls.insert"), None, "no write");

    // The quota is lowered (or another tool takes it) between plan and apply: two inserts
    // fit, the third's 403 QUOTA_EXCEEDED is a quota failure, and the outcome still counts
    // the two written.
    server.set_quota(PROJECT, Some(5));
    let planned = plan(&p, &config, &svcs, &nodes).await;
    assert!(
        planned.targets[0].error.is_none(),
        "{:?}",
        planned.targets[0].error
    );
    server.set_quota(PROJECT, Some(4));
    let outcomes = apply(&p, &planned).await;
    let ApplyOutcome::Failed { error, report } = &outcomes[0].1 else {
        panic!("expected a failure: {outcomes:?}")
    };
    assert_eq!(error.kind, ErrorKind::QuotaExceeded, "{error}");
    assert_eq!((report.added, report.removed, report.updated), (2, 0, 0));
    assert_eq!(ours(&server, PROJECT).len(), 2);
    // The next plan reads the quota again (our writes changed its usage): full, it refuses
    // the third rule before any write.
    let full = plan(&p, &config, &svcs, &nodes).await;
    assert!(
        full.targets[0]
            .error
            .as_ref()
            .is_some_and(|e| e.to_string().contains("limit 4, 4 used")),
        "{:?}",
        full.targets[0].error
    );
    let error = error.to_string();
    assert!(
        error.to_string().contains("Quota 'FIREWALLS' exceeded"),
        "{error}"
    );
    // Compute's quota answer carries details (an ErrorInfo QUOTA_EXCEEDED): its reason is
    // the code.
    assert!(error.to_string().contains("(QUOTA_EXCEEDED)"), "{error}");
}

/// A 403 whose details say quota (a QuotaFailure, with no ErrorInfo: the SDK then drops the
/// legacy `errors[]`) is a quota failure, not a permission error with network-admin
/// commands; a 403 rate limit is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_quota_answer_with_details_is_a_quota_failure_and_a_403_rate_limit_is_retried() {
    use nodeport_firewall_e2e::faults::Fault;
    let server = ComputeServer::start();
    let nodes = pool_nodes(
        &server,
        "web",
        1,
        &["web"],
        "default@proj-a.iam.gserviceaccount.com",
    );
    let config = config_for(&[("web", None)]);
    let svcs = [svc("a", 30080, "10.0.0.0/8")];
    let p = provider_with(&server, json!({})).await;
    let quota = |code: &str| Fault::Status {
        status: 403,
        code: Some(code.to_string()),
        retry_after: None,
    };
    for code in ["QuotaFailure", "quotaExceeded"] {
        server.inject("firewalls.insert", 1, quota(code));
        let outcomes = apply(&p, &plan(&p, &config, &svcs, &nodes).await).await;
        let ApplyOutcome::Failed { error, .. } = &outcomes[0].1 else {
            panic!("expected a failure: {outcomes:?}")
        };
        assert_eq!(error.kind, ErrorKind::QuotaExceeded, "{code}: {error}");
        let text = error.to_string();
        assert!(text.contains("Quota 'FIREWALLS' exceeded"), "{text}");
        assert!(
            !text.contains("network admin"),
            "not a permission error: {text}"
        );
        assert_eq!(
            server.calls_on("firewalls.insert", PROJECT),
            1,
            "not retried"
        );
        server.reset_calls();
    }
    server.inject("firewalls.insert", 2, quota("rateLimitExceeded"));
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    assert_eq!(
        server.calls_on("firewalls.insert", PROJECT),
        3,
        "retried twice"
    );
    assert_eq!(ours(&server, PROJECT).len(), 1);
}

// ---------------------------------------------------------------------------------------
// Orphans: targets holding rules of ours, found by name prefix in the config's projects

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_targets_are_found_by_name_prefix_in_the_projects_of_the_config() {
    let server = ComputeServer::start();
    let p = provider_with(&server, json!({})).await;
    let marker = |cluster: &str| {
        json!({"managedBy": "nodeport-firewall", "cluster": cluster, "pools": ["web"], "services": []})
            .to_string()
    };
    let rule = |name: &str, network: &str, description: String| {
        json!({"name": name, "network": network,
               "allowed": [{"IPProtocol": "tcp", "ports": ["30080"]}],
               "sourceRanges": ["10.0.0.0/8"], "targetTags": ["web"],
               "description": description})
    };
    for (project, body) in [
        // Ours, on two networks of gcp.project.
        (
            PROJECT,
            rule("npf-gke-test-web-1", "old-vpc", marker(CLUSTER)),
        ),
        (
            PROJECT,
            rule("npf-gke-test-web-2", "default", marker(CLUSTER)),
        ),
        // Ours, in the project a listed pool names.
        (
            "pool-proj",
            rule("npf-gke-test-web-3", "vpc-b", marker(CLUSTER)),
        ),
        // Not ours: another cluster's marker on our prefix, our marker on another name,
        // a rule by hand.
        (
            PROJECT,
            rule("npf-gke-test-web-4", "other-a", marker("other")),
        ),
        (PROJECT, rule("copied-marker", "other-b", marker(CLUSTER))),
        (
            PROJECT,
            rule("allow-by-hand", "other-c", "by hand".to_string()),
        ),
        // Ours, in a project no config names any more: not searched.
        (
            "gone-proj",
            rule("npf-gke-test-web-5", "vpc-c", marker(CLUSTER)),
        ),
    ] {
        server.seed_firewall(project, body).unwrap();
    }
    let mut config = config_for(&[("b", Some(json!({"project": "pool-proj"})))]);
    config.pools.get_mut(&PoolName::new("b")).unwrap().managed = Some(false);
    server.reset_calls();
    let found = p.owned_targets(&config).await.unwrap();
    let ids: Vec<&str> = found.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(
        ids,
        ["pool-proj/vpc-b", "proj-a/default", "proj-a/old-vpc"],
        "sorted, without duplicates"
    );
    assert!(found.iter().all(|t| t.provider == "gcp"));
    // One filtered list per project.
    assert_eq!(server.calls_on("firewalls.list", PROJECT), 1);
    assert_eq!(server.calls_on("firewalls.list", "pool-proj"), 1);
    assert_eq!(server.calls_on("firewalls.list", "gone-proj"), 0);

    // A failed search is an error (the engine warns and removes nothing), not a panic.
    server.fail_next("firewalls.list", 10, 403);
    assert_eq!(
        p.owned_targets(&config).await.unwrap_err().kind,
        ErrorKind::PermissionDenied
    );
}

// ---------------------------------------------------------------------------------------
// Call counts and the 200-Service measurement

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_service_change_is_one_list_and_one_write_per_affected_rule() {
    let server = ComputeServer::start();
    let p = provider_with(&server, json!({})).await;
    let mut nodes = Vec::new();
    let mut pools = Vec::new();
    for pool in ["a", "b", "c"] {
        nodes.extend(pool_nodes(
            &server,
            pool,
            2,
            &[&format!("pool-{pool}")],
            "default@proj-a.iam.gserviceaccount.com",
        ));
        pools.push((pool, None));
    }
    let config = config_for(&pools);
    let mut svcs: Vec<ServiceSpec> = (0..30)
        .map(|i| svc(&format!("s{i}"), 30000 + 2 * i, "10.0.0.0/8"))
        .collect();
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;

    server.reset_calls();
    p.stats().reset();
    let noop = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(writes(&noop), 0);
    // One list of the network (observe), one by our name prefix in the project (the
    // search for targets holding rules of ours, `owned_targets`), and the project's quota.
    assert_eq!(
        server.calls(),
        BTreeMap::from([
            ("firewalls.list".to_string(), 2),
            ("projects.get".to_string(), 1)
        ])
    );

    // One Service added: on each of the 3 pools' IPv4 rule, one patch.
    svcs.push(svc("added", 30100, "10.0.0.0/8"));
    server.reset_calls();
    p.stats().reset();
    let one = plan(&p, &config, &svcs, &nodes).await;
    apply_ok(&p, &one).await;
    let calls = server.calls();
    assert_eq!(calls["firewalls.list"], 2, "{calls:?}");
    assert_eq!(calls["projects.get"], 1, "{calls:?}");
    assert_eq!(calls["firewalls.patch"], 3, "{calls:?}");
    assert_eq!(p.stats().writes(), 3);
    println!(
        "one Service added, 3 pools: {} list, {} writes, {} Operation polls",
        calls["firewalls.list"],
        p.stats().writes(),
        nodeport_firewall_gcp::stats::polls(p.stats())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_200_services_across_3_pools() {
    let server = ComputeServer::start();
    server.set_polls_to_done(1);
    let p = provider_with(&server, json!({"ruleBudget": 500})).await;
    let allowlists = [
        "10.0.0.0/8",
        "192.168.0.0/16, 2001:db8::/32",
        "172.16.0.0/12, 203.0.113.0/24",
    ];
    let pool_names = ["bench-a", "bench-b", "bench-c"];
    let mut nodes = Vec::new();
    for pool in pool_names {
        nodes.extend(pool_nodes(
            &server,
            pool,
            3,
            &[pool],
            "default@proj-a.iam.gserviceaccount.com",
        ));
    }
    let config = config_for(&pool_names.iter().map(|p| (*p, None)).collect::<Vec<_>>());
    // Each Service on every pool, NodePorts with gaps (no merging), allowlists in turn.
    let svcs: Vec<ServiceSpec> = (0..200)
        .map(|i: i32| {
            ServiceSpec::nodeport("bench", &format!("svc-{i}"))
                .with_port("p", "TCP", 80, 30000 + 2 * i)
                .enabled()
                .with_ranges(allowlists[(i % 3) as usize])
        })
        .collect();
    server.reset_calls();
    let first = plan(&p, &config, &svcs, &nodes).await;
    assert!(
        first.targets[0].error.is_none(),
        "{:?}",
        first.targets[0].error
    );
    apply_ok(&p, &first).await;
    let rules = ours(&server, PROJECT).len();
    let families = 2;
    let distinct_allowlists = allowlists.len();
    let goal = 2 * pool_names.len() * families * distinct_allowlists;
    // One rule per Service per pool per IP family of its allowlist.
    let naive: usize = pool_names.len()
        * (0..200)
            .map(|i| if i % 3 == 1 { 2 } else { 1 })
            .sum::<usize>();
    let calls = server.calls();
    println!("\n== 200 Services, 3 pools, 3 allowlists (one with IPv6) ==");
    println!(
        "firewall rules: {rules} (goal <= {goal} = 2 x {} pools x {families} families x {distinct_allowlists} allowlists)",
        pool_names.len()
    );
    println!(
        "one rule per Service: {} (cluster-wide, as the GCE provider does); one per Service, pool and IP family: {naive}",
        svcs.len()
    );
    println!("first apply calls: {calls:?}");
    assert!(rules <= goal, "{rules} > {goal}");
    // docs/gcp.md quotes this figure: 3 pools x (2 IPv4 allowlists + 1 dual-stack = 4 rules).
    assert_eq!(rules, 12);
    server.reset_calls();
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
    println!("no-op resync calls: {:?}", server.calls());

    // One Service changes its allowlist: it leaves one rule per pool and joins another.
    let mut changed = svcs.clone();
    changed[0] = ServiceSpec::nodeport("bench", "svc-0")
        .with_port("p", "TCP", 80, 30000)
        .enabled()
        .with_ranges(allowlists[2]);
    server.reset_calls();
    apply_ok(&p, &plan(&p, &config, &changed, &nodes).await).await;
    let calls = server.calls();
    println!("one Service's allowlist changed: {calls:?}");
    assert_eq!(
        calls["firewalls.list"], 2,
        "the network's and the name-prefix search"
    );
    assert_eq!(
        calls.get("firewalls.patch").copied().unwrap_or(0),
        2 * pool_names.len()
    );
}

// ---------------------------------------------------------------------------------------
// The test server itself, through the SDK: it refuses what Compute refuses.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_server_refuses_what_compute_refuses() {
    use google_cloud_compute_v1::client::Firewalls;
    use google_cloud_compute_v1::model::{Firewall, firewall};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = ComputeServer::start();
    let client = Firewalls::builder()
        .with_endpoint(server.url())
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
        .build()
        .await
        .unwrap();
    let rule = |name: &str, sources: &[&str], tags: &[&str]| {
        Firewall::new()
            .set_name(name)
            .set_network("global/networks/default")
            .set_allowed([firewall::Allowed::new()
                .set_ip_protocol("tcp")
                .set_ports(["30080"])])
            .set_source_ranges(sources.iter().map(|s| s.to_string()))
            .set_target_tags(tags.iter().map(|s| s.to_string()))
    };
    let status = |r: Result<
        google_cloud_compute_v1::model::Operation,
        google_cloud_gax::error::Error,
    >| { r.err().and_then(|e| e.http_status_code()) };
    let insert = |fw: Firewall| {
        client
            .insert()
            .set_project(PROJECT)
            .set_request_id(format!("00000000-0000-4000-8000-{:012}", fastrand_id()))
            .set_body(fw)
            .send()
    };
    assert_eq!(
        status(insert(rule("ok-rule", &["10.0.0.0/8"], &["web"])).await),
        None
    );
    assert_eq!(
        status(insert(rule("ok-rule", &["10.0.0.0/8"], &["web"])).await),
        Some(409)
    );
    assert_eq!(
        status(insert(rule("mixed", &["10.0.0.0/8", "2001:db8::/32"], &["web"])).await),
        Some(400)
    );
    assert_eq!(
        status(insert(rule("Bad_Name", &["10.0.0.0/8"], &["web"])).await),
        Some(400)
    );
    assert_eq!(
        status(insert(rule("no-target", &["10.0.0.0/8"], &[])).await),
        Some(400)
    );
    server.set_quota(PROJECT, Some(1));
    let quota = insert(rule("over-quota", &["10.0.0.0/8"], &["web"]))
        .await
        .unwrap_err();
    assert_eq!(quota.http_status_code(), Some(403));
    assert!(
        quota.to_string().contains("Quota 'FIREWALLS' exceeded"),
        "{quota}"
    );
    server.fail_next("firewalls.list", 1, 429);
    let throttled = client.list().set_project(PROJECT).send().await.unwrap_err();
    assert_eq!(throttled.http_status_code(), Some(429));
    // The Operation parses, ids as decimal strings included, and goes PENDING -> DONE.
    server.set_quota(PROJECT, None);
    let op = insert(rule("second", &["2001:db8::/32"], &["web"]))
        .await
        .unwrap();
    assert!(op.id.is_some_and(|id| id > u64::from(u32::MAX)));
    assert_eq!(
        op.status,
        Some(google_cloud_compute_v1::model::operation::Status::Pending)
    );
    let names: Vec<String> = client
        .list()
        .set_project(PROJECT)
        .send()
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|f| f.name)
        .collect();
    assert_eq!(names, ["ok-rule", "second"]);
}

fn fastrand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

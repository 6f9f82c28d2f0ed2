//! The Azure provider against the ARM test server (`nodeport_firewall_e2e::azure_arm`),
//! through the real `azure_mgmt_network` client: the conformance suite, foreign and AKS
//! rules in and around the priority band, node-IP destinations following nodes,
//! consolidation, a full band as a plan error, priority conflicts, 429s, long-running
//! operations and their timeout, and the rotating workload identity token file.
//!
//! The issue-14 cases (Deny rules, busy and failed operations, node-reported addresses,
//! orphans) are in `arm/adversity.rs`.
//!
//! `measure_*` (ignored: it waits on injected latency) prints the figures of the note:
//! `cargo test -p nodeport-firewall-azure --test arm measure -- --ignored --nocapture`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nodeport_firewall_azure::marker::{self, Destination};
use nodeport_firewall_azure::{AzureProvider, Credentials, NsgId};
use nodeport_firewall_e2e::azure_arm::{ArmServer, aks_lb_rule};
use nodeport_firewall_provider::conformance::{self, Harness, PoolFixture};
use nodeport_firewall_provider::engine::{self, ApplyOutcome};
use nodeport_firewall_provider::model::{
    Config, NodeSpec, Plan, PlanError, PoolConfig, PoolName, ServiceSpec, desired,
};
use nodeport_firewall_provider::{Provider, Rule, Target};
use serde_json::{Value, json};

#[path = "arm/adversity.rs"]
mod adversity;

const CLUSTER: &str = "arm-test";
const POOL_LABEL: &str = "kubernetes.azure.com/agentpool";
const SUB: &str = "00000000-0000-0000-0000-000000000001";
const RG: &str = "MC_rg_aks_westeurope";

fn provider_json(server: &ArmServer, extra: Value) -> Value {
    let mut v = json!({
        "endpoint": server.url,
        "tokenScope": format!("{}/.default", server.url),
        "pollIntervalMillis": 10,
        "discoverDestination": false,
        "retry": {"baseDelayMillis": 1, "maxDelayMillis": 2000},
        // Every test NSG lives in RG: orphans are found there even when the config no
        // longer names their NSG.
        "orphanScopes": [format!("/subscriptions/{SUB}/resourceGroups/{RG}")],
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

async fn provider_with(server: &ArmServer, extra: Value) -> AzureProvider {
    AzureProvider::from_config_with(
        CLUSTER,
        Some(&provider_json(server, extra)),
        Credentials::StaticToken(ArmServer::STATIC_TOKEN.to_string()),
    )
    .await
    .unwrap()
}

fn node(name: &str, pool: &str, ips: &[&str]) -> NodeSpec {
    let mut n = NodeSpec::new(name).with_label(POOL_LABEL, pool).with_provider_id(&format!(
        "azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/aks-{pool}-vmss/virtualMachines/0"
    ));
    for ip in ips {
        n = n.with_internal_ip(ip);
    }
    n
}

fn config_for(nsg: &str, pools: &[(&str, Value)]) -> Config {
    let mut config = Config::new(CLUSTER);
    for (p, extra) in pools {
        let mut section = json!({"networkSecurityGroup": nsg});
        if let (Some(o), Some(e)) = (section.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        config.pools.insert(
            PoolName::new(*p),
            PoolConfig {
                providers: [("azure".to_string(), section)].into(),
                ..PoolConfig::default()
            },
        );
    }
    config
}

async fn plan(
    p: &AzureProvider,
    config: &Config,
    svcs: &[ServiceSpec],
    nodes: &[NodeSpec],
) -> Plan {
    engine::plan(p, config, &desired(config, svcs, nodes)).await
}

use nodeport_firewall_provider::testkit::{apply_ok, writes};

fn svc(name: &str, port: i32, ranges: &str) -> ServiceSpec {
    ServiceSpec::nodeport("apps", name)
        .with_port("p", "TCP", 80, port)
        .enabled()
        .with_ranges(ranges)
}

fn ours(server: &ArmServer, nsg: &str) -> Vec<Value> {
    server
        .rules(nsg)
        .into_iter()
        .filter(|r| {
            r["properties"]["description"]
                .as_str()
                .is_some_and(|d| d.starts_with(&format!("nodeport-firewall cluster={CLUSTER};")))
        })
        .collect()
}

fn prefixes(p: &Value, field: &str) -> Vec<String> {
    let mut out: Vec<String> = p[format!("{field}AddressPrefixes")]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    if let Some(s) = p[format!("{field}AddressPrefix")].as_str() {
        out.push(s.to_string());
    }
    out
}

fn port_ranges(p: &Value) -> Vec<String> {
    let mut out: Vec<String> = p["destinationPortRanges"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    if let Some(s) = p["destinationPortRange"].as_str() {
        out.push(s.to_string());
    }
    out
}

fn priority(r: &Value) -> i64 {
    r["properties"]["priority"].as_i64().unwrap()
}

// ---------------------------------------------------------------------------------------
// Conformance

struct ArmHarness {
    server: ArmServer,
    provider: AzureProvider,
}

#[async_trait]
impl Harness for ArmHarness {
    fn provider(&self) -> &dyn Provider {
        &self.provider
    }

    async fn new_instance(&self) -> Box<dyn Provider> {
        Box::new(provider_with(&self.server, json!({})).await)
    }

    async fn fresh_pool(&self, tag: &str) -> PoolFixture {
        let nsg = self.server.create_nsg(SUB, RG, &format!("nsg-{tag}"));
        let pool = format!("pool-{tag}");
        let nodes = vec![
            node(&format!("{pool}-0"), &pool, &["10.240.0.4", "fd00:10::4"]),
            node(&format!("{pool}-1"), &pool, &["10.240.0.5", "fd00:10::5"]),
        ];
        PoolFixture {
            config: config_for(&nsg, &[(&pool, json!({}))]),
            pool: PoolName::new(pool),
            nodes,
        }
    }

    async fn seed_foreign(
        &self,
        target: &Target,
        owner: Option<&str>,
        rule: &Rule,
    ) -> nodeport_firewall_provider::Result<()> {
        seed(&self.server, &target.id, owner, rule);
        Ok(())
    }

    async fn seed_shadowed_allow(
        &self,
        target: &Target,
        rule: &Rule,
    ) -> nodeport_firewall_provider::Result<Option<String>> {
        Ok(Some(seed_shadowed_allow(&self.server, &target.id, rule)))
    }
}

/// Inbound priorities in use on an NSG.
fn used_priorities(server: &ArmServer, nsg: &str) -> BTreeSet<i64> {
    server
        .rules(nsg)
        .iter()
        .filter(|r| r["properties"]["direction"] == "Inbound")
        .map(priority)
        .collect()
}

/// Writes, as another tool would, an Allow for exactly `rule` at the last free priority of
/// our default band (3000-3999) and, evaluated before it, a Deny of its protocol and ports
/// from everywhere to everything, at the first free priority from 3100: inside the band
/// but above its start, so that a rule of ours at the band's lowest free priority comes
/// before the Deny. Returns the Deny's name.
fn seed_shadowed_allow(server: &ArmServer, nsg: &str, rule: &Rule) -> String {
    let used = used_priorities(server, nsg);
    let allow_at = (3000..=3999).rev().find(|p| !used.contains(p)).unwrap();
    let deny_at = (3100..allow_at).find(|p| !used.contains(p)).unwrap();
    seed_at(
        server,
        nsg,
        None,
        rule,
        allow_at,
        &format!("foreign-allow-{allow_at}"),
    );
    let name = format!("foreign-deny-{deny_at}");
    server.seed_rule(
        nsg,
        &name,
        json!({
            "protocol": protocol_of(rule),
            "sourcePortRange": "*", "sourceAddressPrefix": "*", "destinationAddressPrefix": "*",
            "destinationPortRanges": rule.content.ports.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            "access": "Deny", "direction": "Inbound", "priority": deny_at,
            "description": "closed until the change window",
        }),
    );
    name
}

fn protocol_of(rule: &Rule) -> &'static str {
    match rule.content.protocol {
        nodeport_firewall_provider::model::Protocol::Udp => "Udp",
        _ => "Tcp",
    }
}

/// Writes `rule` as another tool would, at the lowest free priority of our default band,
/// so that it sits where we would put ours.
fn seed(server: &ArmServer, nsg: &str, owner: Option<&str>, rule: &Rule) {
    let used = used_priorities(server, nsg);
    let prio = (3000..=3999).find(|p| !used.contains(p)).unwrap();
    seed_at(server, nsg, owner, rule, prio, &format!("foreign-{prio}"));
}

/// Writes `rule` as another tool would, at `prio`, named `name`.
fn seed_at(server: &ArmServer, nsg: &str, owner: Option<&str>, rule: &Rule, prio: i64, name: &str) {
    let c = &rule.content;
    let mut p = json!({
        "protocol": protocol_of(rule),
        "sourcePortRange": "*",
        "sourceAddressPrefixes": c.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "destinationPortRanges": c.ports.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "access": "Allow", "direction": "Inbound", "priority": prio,
    });
    match c.scope.as_deref().and_then(Destination::parse) {
        Some(Destination::Prefixes(d)) => {
            p["destinationAddressPrefixes"] =
                json!(d.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        }
        Some(Destination::Asg(id)) => {
            p["destinationApplicationSecurityGroups"] = json!([{"id": id}])
        }
        None => p["destinationAddressPrefix"] = json!("*"),
    }
    if let Some(owner) = owner {
        p["description"] = json!(marker::description(owner, &rule.pools, &rule.services));
    }
    server.seed_rule(nsg, name, p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_the_arm_server() {
    let server = ArmServer::start();
    let h = ArmHarness {
        provider: provider_with(&server, json!({})).await,
        server,
    };
    conformance::run_all(&h).await;
}

// ---------------------------------------------------------------------------------------
// The cases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_aks_rules_in_and_around_the_band_are_untouched() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "aks-agentpool-1234-nsg");
    // AKS's LoadBalancer rules from 500 up, a manual rule at the first slot of our band,
    // a catch-all deny at the bottom, an outbound rule.
    server.seed_rule(&nsg, "k8s-azure-lb_allow_IPv4_abc", aks_lb_rule(500, 80));
    server.seed_rule(&nsg, "k8s-azure-lb_allow_IPv4_def", aks_lb_rule(501, 443));
    server.seed_rule(
        &nsg,
        "manual-ssh",
        json!({"protocol": "Tcp", "sourceAddressPrefix": "198.51.100.7", "destinationAddressPrefix": "*",
               "destinationPortRange": "22", "priority": 3000, "description": "ops bastion"}),
    );
    server.seed_rule(
        &nsg,
        "deny-all",
        json!({"protocol": "*", "sourceAddressPrefix": "*", "destinationAddressPrefix": "*",
               "destinationPortRange": "*", "access": "Deny", "priority": 4096}),
    );
    server.seed_rule(
        &nsg,
        "egress-proxy",
        json!({"protocol": "Tcp", "sourceAddressPrefix": "*", "destinationAddressPrefix": "203.0.113.9",
               "destinationPortRange": "3128", "priority": 3001, "direction": "Outbound"}),
    );
    let before = server.rules(&nsg);
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let nodes = vec![node("n0", "np1", &["10.240.0.4"])];
    let svcs = vec![svc("a", 30080, "10.0.0.0/8"), svc("b", 30081, "10.0.0.0/8")];
    let first = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(first.summary.add, 1, "{first:#?}");
    assert_eq!(
        first.targets[0].usage.foreign, 4,
        "inbound foreign rules are counted"
    );
    apply_ok(&p, &first).await;

    let after = server.rules(&nsg);
    for r in &before {
        assert!(after.contains(r), "foreign rule changed: {r:#}");
    }
    let mine = ours(&server, &nsg);
    assert_eq!(mine.len(), 1);
    // 3000 is the manual rule's; 3001 is held by an outbound rule, which does not clash.
    assert_eq!(priority(&mine[0]), 3001);
    assert_eq!(
        p.stats().calls("PutSecurityRule"),
        1,
        "a free priority is chosen from the observation, not by trial and error"
    );
    assert_eq!(port_ranges(&mine[0]["properties"]), vec!["30080-30081"]);
    assert_eq!(
        prefixes(&mine[0]["properties"], "destination"),
        vec!["10.240.0.4/32"]
    );
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // Removing everything removes only ours.
    apply_ok(&p, &plan(&p, &config, &[], &nodes).await).await;
    assert_eq!(server.rules(&nsg), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ip_destination_follows_nodes_with_one_update_per_rule() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({})), ("np2", json!({}))]);
    let mut nodes = vec![
        node("a0", "np1", &["10.240.0.4"]),
        node("a1", "np1", &["10.240.0.5"]),
        node("a2", "np1", &["10.240.0.6"]),
        node("b0", "np2", &["10.240.1.4"]),
    ];
    let svcs = vec![
        svc("web", 30080, "10.0.0.0/8"),
        svc("dns", 30053, "192.0.2.0/24"),
    ];
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let before = ours(&server, &nsg);
    assert_eq!(before.len(), 4, "2 allowlists x 2 pools: {before:#?}");

    // Node a1 leaves np1.
    nodes.retain(|n| n.name != "a1");
    let next = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(
        (next.summary.add, next.summary.remove, next.summary.update),
        (0, 0, 2),
        "{next:#?}"
    );
    server.clear_log();
    apply_ok(&p, &next).await;
    assert_eq!(
        server.count("PUT", "/securityRules/"),
        2,
        "one PUT per affected rule"
    );
    assert_eq!(server.count("DELETE", "/securityRules/"), 0);
    let after = ours(&server, &nsg);
    for r in &after {
        let dst = prefixes(&r["properties"], "destination");
        let was = before
            .iter()
            .find(|b| b["name"] == r["name"])
            .expect("same names");
        assert_eq!(
            priority(r),
            priority(was),
            "an updated rule keeps its priority"
        );
        if dst.iter().any(|d| d.starts_with("10.240.0.")) {
            assert_eq!(dst, vec!["10.240.0.4/32", "10.240.0.6/32"]);
        } else {
            assert_eq!(
                dst,
                vec!["10.240.1.4/32"],
                "the other pool's rules are untouched"
            );
            assert_eq!(r, was);
        }
    }
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_sharing_an_allowlist_share_a_rule() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let asg = format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/applicationSecurityGroups/np2-asg"
    );
    let p = provider_with(&server, json!({})).await;
    let config = config_for(
        &nsg,
        &[
            ("np1", json!({"destinationPrefixes": ["10.240.0.0/16"]})),
            ("np2", json!({"applicationSecurityGroup": asg})),
        ],
    );
    let nodes = vec![
        node("a0", "np1", &["10.240.0.4"]),
        node("b0", "np2", &["10.241.0.4"]),
    ];
    let mut svcs: Vec<ServiceSpec> = (0..40)
        .map(|i| svc(&format!("s{i}"), 30000 + 2 * i, "10.0.0.0/8, 172.16.0.0/12"))
        .collect();
    svcs.push(svc("other", 31000, "192.0.2.0/24"));
    svcs.push(svc("v6", 31001, "2001:db8::/32"));
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let mine = ours(&server, &nsg);
    // Per pool: one rule for the 40 Services, one for "other"; v6 has no IPv6 destination
    // on np1 (a v4 subnet) but the ASG holds both families.
    let np1: Vec<&Value> = mine
        .iter()
        .filter(|r| prefixes(&r["properties"], "destination") == vec!["10.240.0.0/16"])
        .collect();
    let np2: Vec<&Value> = mine
        .iter()
        .filter(|r| {
            r["properties"]["destinationApplicationSecurityGroups"][0]["id"].as_str()
                == Some(asg.to_ascii_lowercase().as_str())
        })
        .collect();
    assert_eq!(np1.len(), 2, "{mine:#?}");
    assert_eq!(np2.len(), 3, "{mine:#?}");
    assert_eq!(mine.len(), 5);
    let big = np1
        .iter()
        .find(|r| port_ranges(&r["properties"]).len() == 40)
        .expect("one rule with the 40 ports");
    assert_eq!(
        prefixes(&big["properties"], "source"),
        vec!["10.0.0.0/8", "172.16.0.0/12"]
    );
    // Long Service lists are hashed into the description and still converge.
    let description = big["properties"]["description"].as_str().unwrap();
    assert!(
        description.starts_with("nodeport-firewall cluster=arm-test; pools=np1; services#"),
        "{description}"
    );
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // One Service changes its port: one write, on the one rule that holds it.
    svcs[7] = svc("s7", 32007, "10.0.0.0/8, 172.16.0.0/12");
    let change = plan(&p, &config, &svcs, &nodes).await;
    server.clear_log();
    apply_ok(&p, &change).await;
    let write_calls =
        server.count("PUT", "/securityRules/") + server.count("DELETE", "/securityRules/");
    assert_eq!(
        write_calls,
        2,
        "one PUT per pool's rule holding s7: {:?}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_priority_band_is_a_plan_error_before_any_write() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    server.seed_rule(&nsg, "t1", aks_lb_rule(3000, 1));
    server.seed_rule(&nsg, "t2", aks_lb_rule(3002, 2));
    let p = provider_with(&server, json!({"priorityBand": {"from": 3000, "to": 3004}})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let nodes = vec![node("a0", "np1", &["10.240.0.4"])];
    let fits: Vec<ServiceSpec> = (0..3)
        .map(|i| svc(&format!("s{i}"), 30000 + i, &format!("10.{i}.0.0/16")))
        .collect();
    let ok = plan(&p, &config, &fits, &nodes).await;
    assert!(
        ok.targets[0].error.is_none(),
        "3 rules fit the 3 free slots: {:?}",
        ok.targets[0].error
    );

    let too_many: Vec<ServiceSpec> = (0..4)
        .map(|i| svc(&format!("s{i}"), 30000 + i, &format!("10.{i}.0.0/16")))
        .collect();
    server.clear_log();
    let full = plan(&p, &config, &too_many, &nodes).await;
    match &full.targets[0].error {
        Some(PlanError::RuleQuota {
            ours,
            foreign,
            limit,
            ..
        }) => {
            assert_eq!((*ours, *foreign, *limit), (4, 2, 5));
        }
        other => panic!("expected a quota error, got {other:?}"),
    }
    let message = full.targets[0]
        .error
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        message.contains(
            "the priority band 3000-3004 has room for 3 rules of ours: 2 of its priorities are held by rules of others; widen azure.priorityBand"
        ),
        "{message}"
    );
    for (_, outcome) in engine::apply(&p, &full).await {
        assert!(
            matches!(outcome, ApplyOutcome::Refused { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(server.count("PUT", "/"), 0);

    // The 3 that fit go in the free slots, never on the foreign rules' priorities.
    apply_ok(&p, &ok).await;
    let prios: BTreeSet<i64> = ours(&server, &nsg).iter().map(priority).collect();
    assert_eq!(prios, BTreeSet::from([3001, 3003, 3004]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_taken_meanwhile_is_a_conflict_the_next_plan_resolves() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let nodes = vec![node("a0", "np1", &["10.240.0.4"])];
    let svcs = vec![
        svc("a", 30080, "10.0.0.0/8"),
        svc("b", 30081, "192.0.2.0/24"),
    ];
    let first = plan(&p, &config, &svcs, &nodes).await;
    server.steal_next_priorities(2);
    // The executor does not pick around a taken priority: it reports the conflict, and
    // the next plan, from a fresh read, gives the rules free ones.
    let outcomes = nodeport_firewall_provider::testkit::apply(&p, &first).await;
    let ApplyOutcome::Failed { error, .. } = &outcomes[0].1 else {
        panic!("expected a conflict: {outcomes:?}")
    };
    assert_eq!(
        error.kind,
        nodeport_firewall_provider::ErrorKind::Conflict,
        "{error}"
    );
    let second = plan(&p, &config, &svcs, &nodes).await;
    let outcomes = nodeport_firewall_provider::testkit::apply(&p, &second).await;
    assert!(
        matches!(outcomes[0].1, ApplyOutcome::Failed { .. }),
        "{outcomes:?}"
    );
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let rules = server.rules(&nsg);
    let thieves: Vec<&Value> = rules
        .iter()
        .filter(|r| r["name"].as_str().unwrap().starts_with("someone-else-"))
        .collect();
    assert_eq!(thieves.len(), 2);
    let mine = ours(&server, &nsg);
    assert_eq!(mine.len(), 2);
    let all: BTreeSet<i64> = rules.iter().map(priority).collect();
    assert_eq!(all.len(), rules.len(), "priorities are unique");
    assert_eq!(
        p.stats().calls("PutSecurityRule"),
        4,
        "{:?}",
        p.stats().snapshot()
    );
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_honours_retry_after() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let nodes = vec![node("a0", "np1", &["10.240.0.4"])];
    let svcs = vec![svc("a", 30080, "10.0.0.0/8")];
    server.throttle_writes(1, Some("RetryableErrorDueToAnotherOperation"), 1);
    server.throttle_writes(1, None, 1);
    let started = Instant::now();
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "two Retry-After: 1 honoured, waited {waited:?}"
    );
    let put = p.stats().snapshot()["PutSecurityRule"];
    assert_eq!((put.calls, put.retries, put.errors), (3, 2, 0));
    assert_eq!(ours(&server, &nsg).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_running_operations_are_polled_and_time_out() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    server.set_polls_per_operation(3);
    server.set_page_size(1);
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let nodes = vec![node("a0", "np1", &["10.240.0.4"])];
    let svcs = vec![
        svc("a", 30080, "10.0.0.0/8"),
        svc("b", 30081, "192.0.2.0/24"),
    ];
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    // Each PUT: 3 polls in progress, one succeeded.
    assert_eq!(server.count("GET", "/operations/"), 8);
    assert_eq!(ours(&server, &nsg).len(), 2);
    // Paged listing (one rule per page) sees both.
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
    server.clear_log();
    apply_ok(&p, &plan(&p, &config, &svcs[..1], &nodes).await).await;
    assert_eq!(server.count("DELETE", "/securityRules/"), 1);
    assert_eq!(server.count("GET", "/operationResults/"), 4);
    assert_eq!(
        ours(&server, &nsg).len(),
        1,
        "deleted when its operation completed"
    );

    // An operation that never finishes fails the apply after the overall timeout.
    server.set_polls_per_operation(u32::MAX);
    let slow = provider_with(&server, json!({"operationTimeoutSeconds": 1})).await;
    let started = Instant::now();
    let outcomes = engine::apply(&slow, &plan(&slow, &config, &svcs, &nodes).await).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    match &outcomes[0].1 {
        ApplyOutcome::Failed { error, .. } => {
            assert!(
                error.to_string().contains("not finished within 1s"),
                "{error}"
            )
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_rereads_the_rotated_token_file() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, "assertion-A\n").unwrap();
    let wi = json!({
        "credential": "workloadIdentity",
        "authorityHost": server.url,
        "workloadIdentity": {"tenantId": "tenant-1", "clientId": "client-1", "tokenFile": file.to_str().unwrap()},
    });
    let target = Target::new("azure", &nsg);

    // Long-lived tokens are cached: one token request for two reads.
    server.set_token_lifetime(3600);
    let p = AzureProvider::from_config_with(
        CLUSTER,
        Some(&provider_json(&server, wi.clone())),
        Credentials::FromConfig,
    )
    .await
    .unwrap();
    p.observe(&target).await.unwrap();
    p.observe(&target).await.unwrap();
    assert_eq!(server.assertions(), vec!["assertion-A"]);

    // Tokens about to expire are renewed, with the file as it is now: AKS rotated it.
    server.set_token_lifetime(1);
    let p = AzureProvider::from_config_with(
        CLUSTER,
        Some(&provider_json(&server, wi)),
        Credentials::FromConfig,
    )
    .await
    .unwrap();
    p.observe(&target).await.unwrap();
    std::fs::write(&file, "assertion-B\n").unwrap();
    p.observe(&target).await.unwrap();
    assert_eq!(
        server.assertions(),
        vec!["assertion-A", "assertion-A", "assertion-B"]
    );

    // A token the server does not know is refused as a permission error.
    let bad = AzureProvider::from_config_with(
        CLUSTER,
        Some(&provider_json(&server, json!({}))),
        Credentials::StaticToken("forged".into()),
    )
    .await
    .unwrap();
    let e = bad.observe(&target).await.unwrap_err();
    assert_eq!(
        e.kind,
        nodeport_firewall_provider::ErrorKind::PermissionDenied,
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_map_to_clear_errors() {
    let server = ArmServer::start();
    let p = provider_with(&server, json!({})).await;
    let missing = ArmServer::nsg_id(SUB, RG, "no-such-nsg");
    let e = p
        .observe(&Target::new("azure", &missing))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind,
        nodeport_firewall_provider::ErrorKind::NotFound,
        "{e}"
    );
    assert_eq!(e.code.as_deref(), Some("ResourceNotFound"));

    // A pool without an NSG anywhere is a discovery error naming the setting.
    let config = Config::new(CLUSTER);
    let nodes = vec![node("a0", "np1", &["10.240.0.4"])];
    let plan = plan(&p, &config, &[svc("a", 30080, "10.0.0.0/8")], &nodes).await;
    let err = plan.pools[0].error.as_deref().unwrap();
    assert!(err.contains("azure.networkSecurityGroup"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Figures for the note

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "waits on 2 s of injected latency per write; run with --ignored --nocapture"]
async fn measure_nsg_usage_writes_and_convergence() {
    let allowlists = [
        "10.0.0.0/8",
        "192.168.0.0/16, 2001:db8::/32",
        "172.16.0.0/12, 203.0.113.0/24",
        "198.51.100.0/24",
        "100.64.0.0/10",
    ];
    let pools = ["np1", "np2", "np3"];
    let nodes: Vec<NodeSpec> = pools
        .iter()
        .enumerate()
        .flat_map(|(i, pool)| {
            (0..5).map(move |n| {
                node(
                    &format!("{pool}-{n}"),
                    pool,
                    &[
                        &format!("10.24{i}.0.{}", n + 4),
                        &format!("fd00:{i}::{}", n + 4),
                    ],
                )
            })
        })
        .collect();
    // Services on one pool or on all, allowlists by team, NodePorts in runs with gaps.
    let services = |n: i32| -> Vec<ServiceSpec> {
        (0..n)
            .map(|i| {
                let s = ServiceSpec::nodeport("bench", &format!("svc-{i}"))
                    .with_port("p", "TCP", 80, 30000 + i * 3)
                    .enabled()
                    .with_ranges(allowlists[(i / 10) as usize % allowlists.len()]);
                if i % 4 == 0 {
                    s
                } else {
                    s.with_annotation("node-pools", pools[(i % 3) as usize])
                }
            })
            .collect()
    };

    // 1. NSG usage of 200 Services across 3 pools.
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "aks-agentpool-nsg");
    let p = provider_with(&server, json!({})).await;
    let config = config_for(
        &nsg,
        &[("np1", json!({})), ("np2", json!({})), ("np3", json!({}))],
    );
    let svcs = services(200);
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let mine = ours(&server, &nsg);
    let src: usize = mine
        .iter()
        .map(|r| prefixes(&r["properties"], "source").len())
        .sum();
    let dst: usize = mine
        .iter()
        .map(|r| prefixes(&r["properties"], "destination").len())
        .sum();
    let naive_rules: usize = svcs
        .iter()
        .map(|s| {
            let pools_served = if s
                .annotations
                .contains_key("nodeport-firewall.io/node-pools")
            {
                1
            } else {
                3
            };
            let families =
                if s.annotations["nodeport-firewall.io/allowed-source-ranges"].contains(':') {
                    2
                } else {
                    1
                };
            pools_served * families
        })
        .sum();
    println!("\n== 200 Services, 3 pools (5 nodes each, dual-stack), one shared NSG ==");
    println!(
        "NSG rules used: {} of 1000 (one rule per Service, pool and family: {naive_rules}); source prefixes: {src} of 4000; destination prefixes: {dst} of 4000",
        mine.len()
    );

    // 2. Write calls for one Service change.
    let mut changed = svcs.clone();
    changed[1] = changed[1].clone().with_port("q", "TCP", 81, 32500);
    let change = plan(&p, &config, &changed, &nodes).await;
    let affected = writes(&change);
    server.clear_log();
    apply_ok(&p, &change).await;
    let calls = server.count("PUT", "/securityRules/") + server.count("DELETE", "/securityRules/");
    println!("one Service gains a port: {affected} affected rule(s), {calls} write call(s)");

    // 3. Convergence of 500 Services with 2 s latency per write.
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "aks-agentpool-nsg");
    server.set_write_latency(Duration::from_secs(2));
    let p = provider_with(&server, json!({})).await;
    let config = config_for(
        &nsg,
        &[("np1", json!({})), ("np2", json!({})), ("np3", json!({}))],
    );
    let svcs = services(500);
    let started = Instant::now();
    let first = plan(&p, &config, &svcs, &nodes).await;
    apply_ok(&p, &first).await;
    let elapsed = started.elapsed();
    let w = p.stats().writes();
    println!("\n== 500 Services, 3 pools, 2 s latency per write ==");
    println!(
        "converged in {:.1} s with {w} writes ({} rules); one write per Service, serially: 500 x 2 s = 1000 s",
        elapsed.as_secs_f64(),
        ours(&server, &nsg).len()
    );
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_rule_with_our_name_is_not_overwritten_and_ours_takes_another() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let nodes = vec![node("a0", "np1", &["10.240.0.4"])];
    let svcs = vec![svc("a", 30080, "10.0.0.0/8")];
    let probe = plan(&p, &config, &svcs, &nodes).await;
    let name = probe.targets[0].changes[0].rule.name.clone().unwrap();
    // Someone else's rule has the very name ours would get (names are deterministic).
    server.seed_rule(&nsg, &name, aks_lb_rule(3500, 22));
    let squatter = server.rules(&nsg);
    let second = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(second.summary.add, 1, "{second:#?}");
    // The plan knows the name is taken and gives ours a derived one; theirs is untouched.
    let add = second.targets[0]
        .of(nodeport_firewall_provider::Action::Add)
        .next()
        .unwrap();
    assert_eq!(add.rule.name.as_deref(), Some(format!("{name}-n").as_str()));
    apply_ok(&p, &second).await;
    let after = server.rules(&nsg);
    for theirs in &squatter {
        assert!(after.contains(theirs), "{after:#?}");
    }
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // The same with an outbound rule of that name: the planner does not see outbound
    // rules, but names are unique across both directions.
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let mut outbound = aks_lb_rule(3500, 22);
    outbound["direction"] = json!("Outbound");
    server.seed_rule(&nsg, &name, outbound);
    let squatter = server.rules(&nsg);
    let third = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(third.summary.add, 1, "{third:#?}");
    // The plan knows the name is taken and gives ours a derived one; theirs is untouched.
    let add = third.targets[0]
        .of(nodeport_firewall_provider::Action::Add)
        .next()
        .unwrap();
    assert_eq!(add.rule.name.as_deref(), Some(format!("{name}-n").as_str()));
    apply_ok(&p, &third).await;
    let after = server.rules(&nsg);
    for theirs in &squatter {
        assert!(after.contains(theirs), "{after:#?}");
    }
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_prefix_quota_is_a_plan_error_counting_others_prefixes() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    // One destination prefix on an AKS inbound rule (seen by the planner), two on an
    // outbound rule (not seen, taken off the limit by the provider).
    server.seed_rule(&nsg, "k8s-azure-lb_allow_IPv4_abc", aks_lb_rule(500, 80));
    server.seed_rule(
        &nsg,
        "allow-egress",
        json!({
            "protocol": "*", "sourceAddressPrefix": "*", "sourcePortRange": "*",
            "destinationAddressPrefixes": ["192.0.2.0/24", "198.51.100.0/24"],
            "destinationPortRange": "*", "access": "Allow", "priority": 100,
            "direction": "Outbound"
        }),
    );
    let p = provider_with(&server, json!({"destinationPrefixQuota": 5})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let two = vec![
        node("a0", "np1", &["10.240.0.4"]),
        node("a1", "np1", &["10.240.0.5"]),
    ];
    let mut three = two.clone();
    three.push(node("a2", "np1", &["10.240.0.6"]));
    let services = [svc("a", 30080, "10.0.0.0/8")];

    // 2 of ours + 1 inbound of others + 2 outbound = 5: fits.
    let ok = plan(&p, &config, &services, &two).await;
    assert!(ok.targets[0].error.is_none(), "{:?}", ok.targets[0].error);

    server.clear_log();
    let full = plan(&p, &config, &services, &three).await;
    match &full.targets[0].error {
        Some(
            e @ PlanError::DestinationQuota {
                ours,
                foreign,
                limit,
            },
        ) => {
            assert_eq!((*ours, *foreign, *limit), (3, 1, 3), "{e}");
            assert!(
                e.to_string().contains("destination prefix quota exceeded"),
                "{e}"
            );
        }
        other => panic!("expected a destination quota error, got {other:?}"),
    }
    for (_, outcome) in engine::apply(&p, &full).await {
        assert!(
            matches!(outcome, ApplyOutcome::Refused { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(server.count("PUT", "/"), 0);
    apply_ok(&p, &ok).await;
    assert_eq!(ours(&server, &nsg).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nsg_subnet_and_asg_are_discovered_from_the_vmss_nics() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "aks-agentpool-nsg");
    let own = ArmServer::subnet_id(SUB, RG, "aks-vnet", "np1-subnet");
    let shared = ArmServer::subnet_id(SUB, RG, "aks-vnet", "shared-subnet");
    let asg = format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/applicationSecurityGroups/np2-asg"
    );
    server.add_subnet(&own, "10.224.0.0/24", Some(&nsg));
    server.add_subnet(&shared, "10.224.1.0/24", Some(&nsg));
    server.add_vmss_nic(SUB, RG, "aks-np1-vmss", 0, "10.224.0.4", &own, None, &[]);
    server.add_vmss_nic(SUB, RG, "aks-np1-vmss", 1, "10.224.0.5", &own, None, &[]);
    server.add_vmss_nic(
        SUB,
        RG,
        "aks-np2-vmss",
        0,
        "10.224.1.4",
        &shared,
        None,
        &[&asg],
    );
    server.add_vmss_nic(SUB, RG, "aks-np3-vmss", 0, "10.224.1.5", &shared, None, &[]);
    let p = provider_with(&server, json!({"discoverDestination": true})).await;
    let mut config = Config::new(CLUSTER);
    config.pool_labels = vec![POOL_LABEL.to_string()];
    let vmss_node = |name: &str, pool: &str, i: u32, ip: &str| {
        NodeSpec::new(name)
            .with_label(POOL_LABEL, pool)
            .with_provider_id(&format!("azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/aks-{pool}-vmss/virtualMachines/{i}"))
            .with_internal_ip(ip)
    };
    let nodes = vec![
        vmss_node("np1-0", "np1", 0, "10.224.0.4"),
        vmss_node("np1-1", "np1", 1, "10.224.0.5"),
        vmss_node("np2-0", "np2", 0, "10.224.1.4"),
        vmss_node("np3-0", "np3", 0, "10.224.1.5"),
    ];
    let svcs = vec![svc("web", 30080, "10.0.0.0/8")];
    let first = plan(&p, &config, &svcs, &nodes).await;
    let scopes: Vec<(String, Option<String>)> = first
        .pools
        .iter()
        .map(|pr| {
            assert!(pr.error.is_none(), "{pr:?}");
            assert_eq!(pr.targets[0].target.id, NsgId::parse(&nsg).unwrap().id());
            (pr.name.to_string(), pr.targets[0].scope.clone())
        })
        .collect();
    assert_eq!(
        scopes,
        vec![
            ("np1".to_string(), Some("dst:10.224.0.0/24".to_string())),
            (
                "np2".to_string(),
                Some(format!("asg:{}", asg.to_ascii_lowercase()))
            ),
            ("np3".to_string(), Some("dst:10.224.1.5/32".to_string())),
        ],
        "own subnet, common ASG, else node IPs"
    );
    apply_ok(&p, &first).await;
    assert_eq!(ours(&server, &nsg).len(), 3);
    // Discovery is cached while the pools' VMSSs stay the same.
    let listed = p.stats().calls("ListVmssNetworkInterfaces");
    assert_eq!(listed, 3);
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
    assert_eq!(p.stats().calls("ListVmssNetworkInterfaces"), listed);

    // A pool whose nodes are not VMSS instances and has no NSG configured cannot resolve;
    // the error says what to set.
    let odd = vec![
        NodeSpec::new("vm")
            .with_label(POOL_LABEL, "np4")
            .with_internal_ip("10.9.9.9"),
    ];
    let plan4 = plan(&p, &config, &svcs, &odd).await;
    let err = plan4.pools[0].error.as_deref().unwrap();
    assert!(
        err.contains("pools.np4.azure.networkSecurityGroup"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_writer_per_nsg_even_for_concurrent_applies() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    server.set_write_latency(Duration::from_millis(100));
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({})), ("np2", json!({}))]);
    let nodes = vec![
        node("a0", "np1", &["10.240.0.4"]),
        node("b0", "np2", &["10.240.1.4"]),
    ];
    let svcs: Vec<ServiceSpec> = (0..3)
        .map(|i| svc(&format!("s{i}"), 30000 + i, &format!("10.{i}.0.0/16")))
        .collect();
    let whole = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(
        whole.targets.len(),
        1,
        "pools sharing an NSG share one target"
    );
    // Two reconciles racing on the same NSG (e.g. a resync and an event).
    let mut halves = whole.targets[0].clone();
    let mut other = whole.targets[0].clone();
    let n = halves.changes.len() / 2;
    other.changes = halves.changes.split_off(n);
    let (a, b) = tokio::join!(p.apply(&halves), p.apply(&other));
    a.unwrap();
    b.unwrap();
    assert_eq!(ours(&server, &nsg).len(), 6);
    assert_eq!(server.max_concurrent_writes(), 1);
}

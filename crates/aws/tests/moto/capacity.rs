//! Capacity (issue 17): the rule quota read from Service Quotas (and what happens when it
//! cannot be), pools spread over several security groups (pinned or tagged for the pool),
//! and the writes a change costs at the limit. Benchmarks that print figures are the
//! ignored tests at the end (`cargo test -p nodeport-firewall-aws --test moto capacity_bench
//! -- --ignored --nocapture`).
//!
//! Each test starts its own moto_server, so each one's rules (and orphan search) are its own.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use nodeport_firewall_aws::marker;
use nodeport_firewall_provider::model::{
    Config, NodeSpec, Plan, PlanError, PoolName, ServiceRef, ServiceSpec,
};
use nodeport_firewall_provider::{PoolView, Provider, Target};

use crate::harness::*;

const WARNING: &str = "aws: could not read the rule quota from Service Quotas";

/// Service `i` with a /32 of its own, on a NodePort of its own not next to another's.
fn own_source(i: usize) -> ServiceSpec {
    let i16 = u16::try_from(i).unwrap();
    svc(
        &format!("own-{i:04}"),
        30000 + 2 * i32::from(i16),
        &format!("10.{}.{}.{}/32", i / 65536, (i / 256) % 256, i % 256),
    )
}

/// A security group tagged `tags` (key, value).
async fn tagged_sg(env: &Env, name: &str, tags: &[(&str, &str)]) -> String {
    let mut req = env
        .ec2
        .create_security_group()
        .group_name(name)
        .description(name)
        .vpc_id(&env.vpc);
    if !tags.is_empty() {
        let mut spec = TagSpecification::builder().resource_type(ResourceType::SecurityGroup);
        for (k, v) in tags {
            spec = spec.tags(Tag::builder().key(*k).value(*v).build());
        }
        req = req.tag_specifications(spec.build());
    }
    req.send().await.unwrap().group_id().unwrap().to_string()
}

/// A pool with one node that carries `groups`, pinned in the config in that order.
fn pinned(pool: &PoolName, groups: &[&str]) -> Config {
    let mut config = config_for(&[pool]);
    config
        .pools
        .get_mut(pool)
        .unwrap()
        .set_provider("aws", serde_json::json!({ "securityGroupIds": groups }));
    config
}

/// (from port, cidr) of every ingress rule on `sg`, by rule id.
async fn rules_by_id(env: &Env, sg: &str) -> BTreeMap<String, (i32, String)> {
    env.raw_rules(sg)
        .await
        .into_iter()
        .map(|r| (r.0, (r.2, r.4)))
        .collect()
}

fn errors(plan: &Plan) -> Vec<String> {
    plan.targets
        .iter()
        .filter_map(|t| t.error.as_ref().map(|e| format!("{}: {e}", t.target)))
        .collect()
}

fn quota_warnings(plan: &Plan) -> Vec<&str> {
    plan.warnings
        .iter()
        .map(|w| w.message.as_str())
        .filter(|m| m.contains(WARNING))
        .collect()
}

/// Done-when of issue 17: a pool whose nodes carry 2 groups holds 100 Services that each
/// have their own /32, where one group holds 60; a re-plan is empty, and one Service more
/// moves no rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_spread_over_two_groups_holds_100_services_with_their_own_sources() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let a = env.sg("spread-a", false).await;
    let b = env.sg("spread-b", false).await;
    let inst = env.instance(&[&a, &b]).await;
    let pool = PoolName::new("spread");
    let nodes = vec![node("node-spread", "spread", &inst)];
    let mut svcs: Vec<ServiceSpec> = (0..100).map(own_source).collect();

    // One group: a plan error that names the quota, and nothing is written.
    let one = plan(&p, &pinned(&pool, &[&a]), &svcs, &nodes).await;
    let e = one.targets[0]
        .error
        .as_ref()
        .expect("one group cannot hold 100");
    assert!(
        matches!(
            e,
            PlanError::RuleQuota {
                ours: 100,
                limit: 60,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("limit 60"), "{e}");

    // Two groups: the rules are spread, each on one group, the first filled first.
    let config = pinned(&pool, &[&a, &b]);
    let resolved = p
        .resolve(PoolView {
            name: &pool,
            nodes: &nodes,
            config: config.pools[&pool].provider("aws"),
        })
        .await
        .unwrap();
    assert_eq!(
        resolved
            .iter()
            .map(|t| (t.target.id.as_str(), t.spread.as_deref()))
            .collect::<Vec<_>>(),
        vec![(a.as_str(), Some("spread")), (b.as_str(), Some("spread"))]
    );
    let first = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(errors(&first), Vec::<String>::new());
    assert_eq!(first.summary.add, 100, "each rule once, not once per group");
    apply_ok(&p, &first).await;
    let on_a = rules_by_id(&env, &a).await;
    let on_b = rules_by_id(&env, &b).await;
    assert_eq!(on_a.len() + on_b.len(), 100);
    assert!(
        on_a.len() <= 60 && on_b.len() <= 60,
        "{} {}",
        on_a.len(),
        on_b.len()
    );
    let contents: BTreeSet<&(i32, String)> = on_a.values().chain(on_b.values()).collect();
    assert_eq!(contents.len(), 100, "no rule on both groups");

    let again = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(writes(&again), 0, "{:#?}", again.summary);

    // One Service more: one add, no rule moves.
    svcs.push(own_source(100));
    let more = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(errors(&more), Vec::<String>::new());
    assert_eq!(
        (more.summary.add, more.summary.remove, more.summary.update),
        (1, 0, 0),
        "{:#?}",
        more.targets
    );
    apply_ok(&p, &more).await;
    let after_a = rules_by_id(&env, &a).await;
    let after_b = rules_by_id(&env, &b).await;
    assert!(
        on_a.iter().all(|(id, c)| after_a.get(id) == Some(c)),
        "a moved"
    );
    assert!(
        on_b.iter().all(|(id, c)| after_b.get(id) == Some(c)),
        "b moved"
    );
    assert_eq!(after_a.len() + after_b.len(), 101);
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // Past both groups: one capacity error that says what would fit.
    let too_many: Vec<ServiceSpec> = (0..125).map(own_source).collect();
    let full = plan(&p, &config, &too_many, &nodes).await;
    let e = full
        .targets
        .iter()
        .find_map(|t| t.error.as_ref())
        .expect("125 do not fit 2 x 60");
    assert!(matches!(e, PlanError::Capacity { .. }), "{e:?}");
    assert!(e.to_string().contains("1 more targets"), "{e}");
}

/// Done-when of issue 17: the 4-block shape (500 Services in 4 blocks of contiguous ports,
/// allowlists of one and two CIDRs) takes at most 2 writes per group, on the first apply
/// and on every change after it, and one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_4_block_shape_takes_at_most_2_writes_per_group() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("blocks").await;
    let config = config_for(&[&pool]);
    let mut svcs = four_blocks(500);
    let mut changes: Vec<(&str, Box<Edit>)> = vec![
        ("first apply", Box::new(|_| {})),
        (
            "one Service added at the end of a block",
            Box::new(|s| s.push(block_service(500, 0))),
        ),
        (
            "one Service removed from inside a block",
            Box::new(|s| s.retain(|x| x.service.name() != "svc-60")),
        ),
        (
            "one Service renamed on its port",
            Box::new(|s| {
                for x in s.iter_mut() {
                    if x.service.name() == "svc-200" {
                        *x = block_service(200, 0).renamed("svc-200-new");
                    }
                }
            }),
        ),
    ];
    for (what, change) in changes.iter_mut() {
        change(&mut svcs);
        env.proxy.reset();
        let planned = plan(&p, &config, &svcs, &nodes).await;
        assert_eq!(errors(&planned), Vec::<String>::new(), "{what}");
        apply_ok(&p, &planned).await;
        let (_, writes_done) = env.proxy.per_group(&sg);
        // The reads of the group's rules (discovery's once-per-pool reads aside).
        let reads = env
            .proxy
            .calls()
            .get(&("DescribeSecurityGroupRules".to_string(), sg.clone()))
            .copied()
            .unwrap_or(0);
        println!(
            "{what}: {} planned, {writes_done} writes, {reads} reads on {sg}: {:?}",
            writes(&planned),
            env.proxy.calls()
        );
        assert!(writes(&planned) > 0, "{what}: something to do");
        assert!(writes_done <= 2, "{what}: {:?}", env.proxy.calls());
        assert!(reads <= 1, "{what}: {:?}", env.proxy.calls());
        assert_eq!(
            writes(&plan(&p, &config, &svcs, &nodes).await),
            0,
            "{what}: converged"
        );
    }
    // The long lists are in descriptions (cut, with a digest), none in tags.
    let raw = env.raw_rules(&sg).await;
    assert!(
        raw.iter()
            .all(|r| !r.5.keys().any(|k| k.starts_with(marker::TAG_SERVICES))),
        "{raw:?}"
    );
    // A fresh process recognises them by their digest.
    let fresh = env.provider().await;
    assert_eq!(writes(&plan(&fresh, &config, &svcs, &nodes).await), 0);
}

/// A change to the Services.
type Edit = dyn Fn(&mut Vec<ServiceSpec>);

/// Service `i` of the 4-block shape: block `i / 125` of contiguous NodePorts, each block
/// with its allowlist (one CIDR, or an IPv4 and an IPv6 one).
fn block_service(i: i32, offset: i32) -> ServiceSpec {
    let allowlists = [
        "10.0.0.0/8",
        "192.168.0.0/16, 2001:db8::/32",
        "172.16.0.0/12, 2001:db8:1::/48",
    ];
    ServiceSpec::nodeport("bench", &format!("svc-{i}"))
        .with_port("p", "TCP", 80, 30000 + offset + i)
        .enabled()
        .with_ranges(allowlists[((i / 125).min(3) % 3) as usize])
}

fn four_blocks(n: i32) -> Vec<ServiceSpec> {
    (0..n).map(|i| block_service(i, 0)).collect()
}

trait Renamed {
    fn renamed(self, name: &str) -> Self;
}

impl Renamed for ServiceSpec {
    fn renamed(mut self, name: &str) -> Self {
        self.service = ServiceRef::new(self.service.namespace(), name);
        self
    }
}

/// Done-when of issue 17: without the Service Quotas permission, `plan` still plans, against
/// `ruleQuota`, with one warning line for all targets; the failed read is not repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_service_quotas_read_plans_with_one_warning() {
    let env = env_or_skip!();
    env.proxy
        .fail("GetServiceQuota", usize::MAX, Fault::QuotaAccessDenied);
    let p = env
        .provider_with(serde_json::json!({"ruleQuota": 60}))
        .await;
    let (a, sg_a, mut nodes) = env.pool("denied-a").await;
    let (b, _, more) = env.pool("denied-b").await;
    nodes.extend(more);
    let config = config_for(&[&a, &b]);
    let svcs = vec![svc("web", 30080, "10.0.0.0/8")];
    // The observation carries the warning and the fallback limit...
    let o = p.observe(&Target::new("aws", &sg_a)).await.unwrap();
    assert_eq!(o.limits.max_rules, Some(60));
    assert_eq!(
        o.limits.max_rules_reason.as_deref(),
        Some("aws.ruleQuota; the Service Quotas value could not be read")
    );
    assert_eq!(o.warnings.len(), 1, "{:?}", o.warnings);
    assert!(o.warnings[0].starts_with(WARNING), "{:?}", o.warnings);
    // ... and the plan (every target's observation says it) shows it once.
    let planned = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(errors(&planned), Vec::<String>::new());
    assert_eq!(planned.summary.add, 2);
    assert_eq!(
        quota_warnings(&planned),
        vec![
            "aws: could not read the rule quota from Service Quotas (servicequotas:GetServiceQuota is denied): planning against aws.ruleQuota 60"
        ],
        "{:#?}",
        planned.warnings
    );
    apply_ok(&p, &planned).await;
    let again = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(writes(&again), 0);
    assert_eq!(quota_warnings(&again).len(), 1);
    assert_eq!(
        p.stats().calls("GetServiceQuota"),
        1,
        "the failure is cached: {:?}",
        p.stats().snapshot()
    );
    assert_eq!(
        p.stats().calls("GetAWSDefaultServiceQuota"),
        0,
        "a denied applied value is not replaced by the default"
    );

    // Service Quotas unreachable (a closed port): the same fallback, no error.
    let closed = env
        .provider_with(serde_json::json!({
            "serviceQuotasEndpointUrl": format!("http://127.0.0.1:{}", free_port()),
            "retry": {"maxAttempts": 2, "baseDelayMillis": 1, "maxDelayMillis": 2},
        }))
        .await;
    let planned = plan(&closed, &config, &svcs, &nodes).await;
    assert_eq!(errors(&planned), Vec::<String>::new());
    let w = quota_warnings(&planned);
    assert_eq!(w.len(), 1, "{:#?}", planned.warnings);
    assert!(
        w[0].ends_with("planning against EC2's default rule quota 60"),
        "{w:?}"
    );
}

/// The quota is read from Service Quotas (through the same endpoint override as EC2): the
/// applied value, else the default; a lower `ruleQuota` wins, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rule_quota_is_read_from_service_quotas() {
    let env = env_or_skip!();
    let (pool, sg, nodes) = env.pool("quota-read").await;
    let target = Target::new("aws", &sg);
    // moto's value (the EC2 default, 60), read once for every target and plan.
    let p = env.provider().await;
    let o = p.observe(&target).await.unwrap();
    assert_eq!((o.limits.max_rules, o.warnings.len()), (Some(60), 0));
    p.observe(&target).await.unwrap();
    assert_eq!(p.stats().calls("GetServiceQuota"), 1);

    // An account whose quota was raised to 100: 100 Services with their own /32 fit one
    // group.
    env.proxy
        .fail("GetServiceQuota", usize::MAX, Fault::QuotaValue(100));
    let raised = env.provider().await;
    let config = config_for(&[&pool]);
    let svcs: Vec<ServiceSpec> = (0..100).map(own_source).collect();
    let planned = plan(&raised, &config, &svcs, &nodes).await;
    assert_eq!(errors(&planned), Vec::<String>::new());
    assert_eq!(quota_warnings(&planned).len(), 0, "{:#?}", planned.warnings);

    // A lower ruleQuota wins, and the error says why the limit is 50.
    let lower = env
        .provider_with(serde_json::json!({"ruleQuota": 50}))
        .await;
    let planned = plan(&lower, &config, &svcs, &nodes).await;
    let e = planned.targets[0].error.as_ref().expect("50 < 100");
    assert!(
        e.to_string()
            .contains("limit 50 (aws.ruleQuota 50, lower than the Service Quotas value 100)"),
        "{e}"
    );

    // No applied value: the default is read.
    env.proxy.reset_faults();
    env.proxy
        .fail("GetServiceQuota", usize::MAX, Fault::QuotaNoSuchResource);
    env.proxy.fail(
        "GetAWSDefaultServiceQuota",
        usize::MAX,
        Fault::QuotaValue(70),
    );
    let default = env.provider().await;
    let o = default.observe(&target).await.unwrap();
    assert_eq!((o.limits.max_rules, o.warnings.len()), (Some(70), 0));

    // Not read at all when told not to: no call, no warning.
    let off = env
        .provider_with(serde_json::json!({"readRuleQuota": false, "ruleQuota": 40}))
        .await;
    let o = off.observe(&target).await.unwrap();
    assert_eq!((o.limits.max_rules, o.warnings.len()), (Some(40), 0));
    assert_eq!(off.stats().calls("GetServiceQuota"), 0);
}

async fn resolve(
    p: &dyn Provider,
    pool: &str,
    nodes: &[NodeSpec],
) -> nodeport_firewall_provider::Result<Vec<(String, Option<String>)>> {
    let name = PoolName::new(pool);
    let targets = p
        .resolve(PoolView {
            name: &name,
            nodes,
            config: None,
        })
        .await?;
    Ok(targets
        .into_iter()
        .map(|t| (t.target.id, t.spread))
        .collect())
}

/// Every group on a pool's nodes tagged `nodeport-firewall.io/pool=<pool>` is one of the
/// pool's spread targets, sorted by id; nodes that do not all carry them, and a group that
/// interfaces outside the pool share, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_tagged_for_the_pool_are_discovered_and_spread() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let cluster_tag = format!("kubernetes.io/cluster/{CLUSTER}");
    let own = tagged_sg(&env, "node-sg", &[(&cluster_tag, "owned")]).await;
    let x = tagged_sg(&env, "extra-1", &[("nodeport-firewall.io/pool", "tagged")]).await;
    let y = tagged_sg(&env, "extra-2", &[("nodeport-firewall.io/pool", "tagged")]).await;
    let other = tagged_sg(&env, "extra-other", &[("nodeport-firewall.io/pool", "gpu")]).await;
    let i1 = env.instance(&[&own, &y, &x, &other]).await;
    let i2 = env.instance(&[&own, &x, &y]).await;
    let nodes = vec![node("t1", "tagged", &i1), node("t2", "tagged", &i2)];
    let mut sorted = [x.clone(), y.clone()];
    sorted.sort();
    assert_eq!(
        resolve(&p, "tagged", &nodes).await.unwrap(),
        sorted
            .iter()
            .map(|g| (g.clone(), Some("tagged".to_string())))
            .collect::<Vec<_>>()
    );

    // Another tag key in the config: those tags mean nothing, the cluster tag decides.
    let keyed = env
        .provider_with(serde_json::json!({"poolGroupTagKey": "example.com/pool"}))
        .await;
    assert_eq!(
        resolve(&keyed, "tagged", &nodes).await.unwrap(),
        vec![(own.clone(), None)]
    );

    // A node without one of them: refused, as nodes on different groups are.
    let i3 = env.instance(&[&own, &x]).await;
    let mut uneven = nodes.clone();
    uneven.push(node("t3", "tagged", &i3));
    p.clear_cache();
    let e = resolve(&p, "tagged", &uneven).await.unwrap_err();
    assert!(e.message.contains("outliers: t3"), "{e}");

    // A tagged group also on an instance outside the pool: refused, naming it.
    let outsider = env.instance(&[&own, &x, &y]).await;
    let _ = outsider;
    p.clear_cache();
    let e = resolve(&p, "tagged", &nodes).await.unwrap_err();
    assert!(e.message.contains("refusing security group"), "{e}");
    assert!(e.message.contains("not a node of pool tagged"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Benchmarks: figures, not assertions on time.

/// How many Services with a /32 of their own one pool holds with 1, 2 and 5 groups (at the
/// default quota of 60), and the calls a change of the 4-block shape costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn capacity_bench_services_per_pool_and_calls_per_change() {
    let env = env_or_skip!();
    println!("\n== Services with a /32 of their own, one pool, quota 60 per group ==");
    for groups in [1usize, 2, 5] {
        let p = env.provider().await;
        let mut ids = Vec::new();
        for g in 0..groups {
            ids.push(env.sg(&format!("bench-{groups}-{g}"), false).await);
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let inst = env.instance(&refs).await;
        let name = format!("bench{groups}");
        let pool = PoolName::new(&name);
        let nodes = vec![node(&format!("n-{name}"), &name, &inst)];
        let config = pinned(&pool, &refs);
        // The most that plan without an error: the groups' quotas, and one more.
        let mut fit = 0;
        for n in [groups * 60 - 1, groups * 60, groups * 60 + 1] {
            let svcs: Vec<ServiceSpec> = (0..n).map(own_source).collect();
            let planned = plan(&p, &config, &svcs, &nodes).await;
            match errors(&planned).first() {
                None => fit = n,
                Some(e) => println!("  {n} Services: {e}"),
            }
        }
        println!("{groups} group(s): {fit} Services fit");
    }

    println!("\n== 4-block shape (500 Services in 4 blocks of contiguous NodePorts) ==");
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("bench-blocks").await;
    let config = config_for(&[&pool]);
    let mut svcs = four_blocks(500);
    for what in ["first apply", "one Service added", "one Service removed"] {
        match what {
            "one Service added" => svcs.push(block_service(500, 0)),
            "one Service removed" => svcs.retain(|s| s.service.name() != "svc-60"),
            _ => {}
        }
        env.proxy.reset();
        let planned = plan(&p, &config, &svcs, &nodes).await;
        apply_ok(&p, &planned).await;
        let (reads, writes_done) = env.proxy.per_group(&sg);
        println!(
            "{what}: {} rule changes, {writes_done} writes and {reads} read on the group; calls: {:?}",
            writes(&planned),
            env.proxy.calls()
        );
    }
    println!("rules on the group: {}", env.raw_rules(&sg).await.len());
}

//! The AWS provider against moto_server: the conformance suite, discovery, quotas, IPv6,
//! marker updates, throttling and 5xx injected by a fault proxy; in `measure`, call counts
//! and the 500-Service measurement (run with `--nocapture` to see the figures); in
//! `ownership`, spoofed tags, orphan targets and shared security groups; in `capacity`, the
//! rule quota from Service Quotas, pools spread over several groups, writes at the limit and
//! the capacity benchmarks.
//!
//! Every test starts its own moto_server on a free loopback port and talks to it through a
//! small HTTP proxy that counts EC2 calls per action and security group and injects faults.
//! Without moto_server the tests fail, unless NPF_SKIP_MOTO=1.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

/// A moto environment, or (with NPF_SKIP_MOTO=1 and no moto_server) the end of the test.
macro_rules! env_or_skip {
    () => {
        match Env::start().await {
            Some(env) => env,
            None => return,
        }
    };
}

mod capacity;
mod harness;
mod markers;
mod measure;
mod ownership;
mod proxy;

use std::collections::BTreeSet;

use async_trait::async_trait;
use harness::*;
use nodeport_firewall_aws::{AwsProvider, marker};
use nodeport_firewall_provider::conformance::{self, Harness, PoolFixture};
use nodeport_firewall_provider::engine::{self, ApplyOutcome};
use nodeport_firewall_provider::model::{IpFamily, NodeSpec, PlanError, PoolName, ServiceSpec};
use nodeport_firewall_provider::{Action, ErrorKind, PoolView, Provider, Rule, Target};

// ---------------------------------------------------------------------------------------
// Conformance

struct AwsHarness<'a> {
    env: &'a Env,
    provider: AwsProvider,
}

#[async_trait]
impl Harness for AwsHarness<'_> {
    fn provider(&self) -> &dyn Provider {
        &self.provider
    }

    async fn new_instance(&self) -> Box<dyn Provider> {
        Box::new(self.env.provider().await)
    }

    async fn fresh_pool(&self, tag: &str) -> PoolFixture {
        let (pool, _, nodes) = self.env.pool(&format!("pool-{tag}")).await;
        PoolFixture {
            config: config_for(&[&pool]),
            pool,
            nodes,
        }
    }

    async fn seed_foreign(
        &self,
        target: &Target,
        owner: Option<&str>,
        rule: &Rule,
    ) -> nodeport_firewall_provider::Result<()> {
        self.env.seed(&target.id, owner, rule).await;
        Ok(())
    }

    /// Security groups only allow: a foreign Allow is in force, whatever else is there.
    async fn seed_shadowed_allow(
        &self,
        target: &Target,
        rule: &Rule,
    ) -> nodeport_firewall_provider::Result<Option<String>> {
        self.env.seed(&target.id, None, rule).await;
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_moto() {
    let env = env_or_skip!();
    let h = AwsHarness {
        provider: env.provider().await,
        env: &env,
    };
    conformance::run_all(&h).await;
}

// ---------------------------------------------------------------------------------------
// Discovery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_single_tagged_ambiguous_and_outliers() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let resolve = |pool: &'static str, nodes: Vec<NodeSpec>, config: Option<serde_json::Value>| {
        let p = &p;
        async move {
            let name = PoolName::new(pool);
            p.resolve(PoolView {
                name: &name,
                nodes: &nodes,
                config: config.as_ref(),
            })
            .await
        }
    };

    // One untagged security group: it is the one.
    let only = env.sg("only", false).await;
    let i1 = env.instance(&[&only]).await;
    let got = resolve("single", vec![node("n1", "single", &i1)], None)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].target, Target::new("aws", &only));
    assert_eq!(got[0].scope, None);

    // Several, one tagged with the cluster tag key: the tagged one.
    let plain = env.sg("plain", false).await;
    let tagged = env.sg("tagged", true).await;
    let i2 = env.instance(&[&plain, &tagged]).await;
    let i3 = env.instance(&[&plain, &tagged]).await;
    let got = resolve(
        "tagged",
        vec![node("n2", "tagged", &i2), node("n3", "tagged", &i3)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(got[0].target.id, tagged);

    // Several, none tagged: an error naming the candidates and the config that resolves it.
    let other = env.sg("other", false).await;
    let i4 = env.instance(&[&plain, &other]).await;
    let e = resolve("amb", vec![node("n4", "amb", &i4)], None)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Discovery);
    assert!(
        e.message.contains(&plain) && e.message.contains(&other),
        "{e}"
    );
    assert!(
        e.message
            .contains(&format!("kubernetes.io/cluster/{CLUSTER}")),
        "{e}"
    );
    assert!(
        e.message
            .contains("pools:\n  amb:\n    aws:\n      securityGroupIds: [sg-"),
        "{e}"
    );
    println!("ambiguous discovery error:\n{e}\n");

    // Nodes that disagree: the outliers are listed.
    // (Groups of their own: a group that other pools' nodes share is refused.)
    let majority = env.sg("majority", false).await;
    let outlier = env.sg("outlier", true).await;
    let i5 = env.instance(&[&majority]).await;
    let i6 = env.instance(&[&majority]).await;
    let i7 = env.instance(&[&outlier]).await;
    let e = resolve(
        "mixed",
        vec![
            node("n5", "mixed", &i5),
            node("n6", "mixed", &i6),
            node("n7", "mixed", &i7),
        ],
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Discovery);
    assert!(
        e.message
            .contains(&format!("outliers: n7 ({i7}) -> {outlier}")),
        "{e}"
    );
    println!("outlier discovery error:\n{e}\n");

    // Explicit ids win, with no API call; unknown fields are config errors.
    env.proxy.reset();
    let got = resolve(
        "amb",
        vec![node("n4", "amb", &i4)],
        Some(serde_json::json!({"securityGroupIds": [other.clone()]})),
    )
    .await
    .unwrap();
    assert_eq!(got[0].target.id, other);
    assert!(env.proxy.calls().is_empty());
    let e = resolve(
        "amb",
        vec![],
        Some(serde_json::json!({"securityGroups": []})),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Config);
    let e = resolve(
        "amb",
        vec![],
        Some(serde_json::json!({"securityGroupIds": ["i-123"]})),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Config);

    // Nodes without an EC2 providerID.
    let e = resolve("bare", vec![NodeSpec::new("bare")], None)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Discovery);
    assert!(e.message.contains("bare"), "{e}");

    // Cached while membership is unchanged; refreshed when it changes.
    env.proxy.reset();
    resolve("single", vec![node("n1", "single", &i1)], None)
        .await
        .unwrap();
    assert_eq!(
        env.proxy.calls().len(),
        0,
        "cached: {:?}",
        env.proxy.calls()
    );
    let i8 = env.instance(&[&only]).await;
    resolve(
        "single",
        vec![node("n1", "single", &i1), node("n8", "single", &i8)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        env.proxy
            .calls()
            .get(&("DescribeInstances".to_string(), "-".to_string())),
        Some(&1)
    );
}

// ---------------------------------------------------------------------------------------
// Quota, IPv6, removal, marker updates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_counts_foreign_rules_and_is_a_plan_error() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("quota").await;
    let config = config_for(&[&pool]);
    // 58 foreign IPv4 rules already there.
    for i in 0..58u16 {
        let rule = Rule {
            name: None,
            content: nodeport_firewall_provider::RuleContent {
                scope: None,
                family: IpFamily::V4,
                protocol: nodeport_firewall_provider::model::Protocol::Tcp,
                ports: vec![nodeport_firewall_provider::model::PortRange::single(
                    1000 + i,
                )],
                sources: vec!["192.0.2.0/24".parse().unwrap()],
            },
            services: Default::default(),
            pools: Default::default(),
        };
        env.seed(&sg, None, &rule).await;
    }
    let svcs = vec![
        svc("a", 30001, "10.0.0.0/8"),
        svc("b", 30003, "10.0.0.0/8"),
        svc("c", 30005, "10.0.0.0/8"),
    ];
    let qplan = plan(&p, &config, &svcs, &nodes).await;
    let tp = &qplan.targets[0];
    match &tp.error {
        Some(PlanError::RuleQuota {
            family,
            ours,
            foreign,
            limit,
            ..
        }) => {
            assert_eq!(
                (*family, *ours, *foreign, *limit),
                (Some(IpFamily::V4), 3, 58, 60)
            );
        }
        other => panic!("expected a quota error, got {other:?}"),
    }
    println!("quota plan error: {}", tp.error.as_ref().unwrap());
    env.proxy.reset();
    for (_, outcome) in engine::apply(&p, &qplan).await {
        assert!(
            matches!(outcome, ApplyOutcome::Refused { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(
        env.proxy.writes(),
        0,
        "no write when the plan has a quota error"
    );
    assert_eq!(env.raw_rules(&sg).await.len(), 58);
    // IPv6 rules are counted against their own quota: an IPv6-only Service still fits.
    let v6 = vec![svc("v6", 30007, "2001:db8::/32")];
    let plan6 = plan(&p, &config, &v6, &nodes).await;
    assert!(
        plan6.targets[0].error.is_none(),
        "{:?}",
        plan6.targets[0].error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_rules_and_service_removal() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("v6").await;
    let config = config_for(&[&pool]);
    let svcs = vec![
        svc("dual", 30010, "10.1.2.3/16, 2001:db8:1::5/48"),
        svc("v6only", 30020, "2001:db8:2::/48"),
        svc("v4", 30030, "192.168.0.0/24"),
    ];
    let first = plan(&p, &config, &svcs, &nodes).await;
    apply_ok(&p, &first).await;
    let raw = env.raw_rules(&sg).await;
    let cidrs: BTreeSet<String> = raw.iter().map(|r| r.4.clone()).collect();
    // Canonical CIDRs on the wire.
    assert!(cidrs.contains("10.1.0.0/16"), "{cidrs:?}");
    assert!(cidrs.contains("2001:db8:1::/48"), "{cidrs:?}");
    assert!(cidrs.contains("2001:db8:2::/48"), "{cidrs:?}");
    assert_eq!(raw.len(), 4);
    for r in &raw {
        assert_eq!(
            r.5.get(marker::TAG_CLUSTER).map(String::as_str),
            Some(CLUSTER)
        );
        assert_eq!(r.5.get(marker::TAG_POOLS).map(String::as_str), Some("v6"));
    }
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // Remove the dual-stack Service: exactly its two rules go.
    let dual_ids: BTreeSet<String> = raw
        .iter()
        .filter(|r| r.2 == 30010)
        .map(|r| r.0.clone())
        .collect();
    let rest: Vec<ServiceSpec> = svcs[1..].to_vec();
    let second = plan(&p, &config, &rest, &nodes).await;
    let removed: BTreeSet<String> = second.targets[0]
        .of(Action::Remove)
        .filter_map(|c| c.id.clone())
        .collect();
    assert_eq!(removed, dual_ids);
    assert_eq!(second.summary.add, 0);
    apply_ok(&p, &second).await;
    let after: BTreeSet<String> = env.raw_rules(&sg).await.into_iter().map(|r| r.0).collect();
    let before: BTreeSet<String> = raw.iter().map(|r| r.0.clone()).collect();
    assert_eq!(after, before.difference(&dual_ids).cloned().collect());
}

// ---------------------------------------------------------------------------------------
// Faults: throttling, 5xx, lost responses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_converge_without_duplicates() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("faults").await;
    let config = config_for(&[&pool]);
    let svcs: Vec<ServiceSpec> = (0..6)
        .map(|i| svc(&format!("s{i}"), 30300 + 2 * i, "10.0.0.0/8, 2001:db8::/32"))
        .collect();

    env.proxy.fail("DescribeInstances", 1, Fault::Unavailable);
    env.proxy
        .fail("DescribeSecurityGroupRules", 2, Fault::Throttle);
    // The first authorize is carried out but its answer is lost: the retry meets
    // InvalidPermission.Duplicate, which must converge, not loop.
    env.proxy
        .fail("AuthorizeSecurityGroupIngress", 1, Fault::LostResponse);
    env.proxy
        .fail("AuthorizeSecurityGroupIngress", 1, Fault::Throttle);
    let first = plan(&p, &config, &svcs, &nodes).await;
    assert!(
        first.targets[0].error.is_none(),
        "{:?}",
        first.targets[0].error
    );
    let notes = apply_ok(&p, &first).await;
    println!("notes after a lost authorize response: {notes:?}");

    let raw = env.raw_rules(&sg).await;
    let contents: BTreeSet<(String, i32, i32, String)> = raw
        .iter()
        .map(|r| (r.1.clone(), r.2, r.3, r.4.clone()))
        .collect();
    assert_eq!(contents.len(), raw.len(), "duplicate rules: {raw:?}");
    assert_eq!(raw.len(), 12);
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // Revoke throttled then 5xx, then succeeds.
    env.proxy
        .fail("RevokeSecurityGroupIngress", 1, Fault::Throttle);
    env.proxy
        .fail("RevokeSecurityGroupIngress", 1, Fault::Unavailable);
    let cleanup = plan(&p, &config, &[], &nodes).await;
    apply_ok(&p, &cleanup).await;
    assert!(env.raw_rules(&sg).await.is_empty());
    // 1 DescribeInstances, 2 DescribeSecurityGroupRules, 2 authorize, 2 revoke.
    assert_eq!(env.proxy.injected(), 7, "faults injected");
    let stats = p.stats().snapshot();
    println!("provider call stats with faults: {stats:#?}");
    assert!(stats["DescribeSecurityGroupRules"].retries >= 2);
    assert!(stats["RevokeSecurityGroupIngress"].retries >= 2);

    // A permission error is not retried and carries the AWS code.
    env.proxy
        .fail("AuthorizeSecurityGroupIngress", 1, Fault::Unauthorized);
    let again = plan(&p, &config, &svcs, &nodes).await;
    let before = p.stats().calls("AuthorizeSecurityGroupIngress");
    let out = engine::apply(&p, &again).await;
    match &out[0].1 {
        ApplyOutcome::Failed { error, .. } => {
            assert!(
                error.to_string().contains("UnauthorizedOperation"),
                "{error}"
            )
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(p.stats().calls("AuthorizeSecurityGroupIngress"), before + 1);
    // ... and the next reconcile converges.
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_preflight_uses_dry_run() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("check").await;
    let target = Target::new("aws", &sg);
    assert_eq!(p.check(&target).await, Vec::<String>::new());
    let config = config_for(&[&pool]);
    apply_ok(
        &p,
        &plan(&p, &config, &[svc("x", 30400, "10.0.0.0/8")], &nodes).await,
    )
    .await;
    let before = env.raw_rules(&sg).await;
    assert_eq!(p.check(&target).await, Vec::<String>::new());
    assert_eq!(
        env.raw_rules(&sg).await,
        before,
        "a dry run changes nothing"
    );
    env.proxy
        .fail("AuthorizeSecurityGroupIngress", 1, Fault::Unauthorized);
    env.proxy
        .fail("RevokeSecurityGroupIngress", 1, Fault::Unauthorized);
    assert_eq!(
        p.check(&target).await,
        vec![
            "ec2:AuthorizeSecurityGroupIngress".to_string(),
            "ec2:RevokeSecurityGroupIngress".to_string()
        ]
    );
}

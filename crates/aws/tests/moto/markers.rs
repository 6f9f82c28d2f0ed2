//! Markers on EC2: a Service list rewritten in place, a list too long for the description
//! (cut, with a digest), and rules an earlier version wrote with the list in tags.

use nodeport_firewall_aws::marker;
use nodeport_firewall_provider::model::{IpFamily, ServiceRef, ServiceSpec};
use nodeport_firewall_provider::{Provider, Rule, Target};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_updates_in_place_and_long_service_lists() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("marker").await;
    let config = config_for(&[&pool]);

    // A Service replaced by another on the same port and sources: same content, new marker.
    let first = plan(&p, &config, &[svc("old", 30100, "10.0.0.0/8")], &nodes).await;
    apply_ok(&p, &first).await;
    let id_before = env.raw_rules(&sg).await[0].0.clone();
    let swap = plan(&p, &config, &[svc("new", 30100, "10.0.0.0/8")], &nodes).await;
    assert_eq!(swap.summary.update, 1, "{:#?}", swap.targets[0].changes);
    env.proxy.reset();
    apply_ok(&p, &swap).await;
    assert_eq!(
        env.proxy.per_group(&sg).1,
        1,
        "one ModifySecurityGroupRules: {:?}",
        env.proxy.calls()
    );
    let obs = p.observe(&Target::new("aws", &sg)).await.unwrap();
    assert_eq!(obs.rules.len(), 1);
    assert_eq!(
        obs.rules[0].id.as_deref(),
        Some(id_before.as_str()),
        "same rule kept"
    );
    assert_eq!(
        obs.rules[0].rule.services,
        [ServiceRef::new("apps", "new")].into_iter().collect()
    );

    // 12 Services on contiguous ports with one allowlist: one rule whose Service list does
    // not fit the description, so the description is cut and carries a digest; no tags.
    // A fresh process recognises it.
    let many: Vec<ServiceSpec> = (0..12)
        .map(|i| {
            svc(
                &format!("a-fairly-long-service-name-{i:02}"),
                30200 + i,
                "10.0.0.0/8",
            )
        })
        .collect();
    let big = plan(&p, &config, &many, &nodes).await;
    apply_ok(&p, &big).await;
    let again = plan(&env.provider().await, &config, &many, &nodes).await;
    assert_eq!(writes(&again), 0, "{:#?}", again.targets[0].changes);
    let range_rule = |raw: Vec<RawRule>| raw.into_iter().find(|r| r.2 == 30200).unwrap();
    let cut = range_rule(env.raw_rules(&sg).await);
    assert!(
        !cut.5.keys().any(|k| k.starts_with(marker::TAG_SERVICES)),
        "{:?}",
        cut.5
    );
    assert_eq!(cut.3, 30211, "one rule for the contiguous range");
    let obs = p.observe(&Target::new("aws", &sg)).await.unwrap();
    let observed = obs
        .rules
        .iter()
        .find(|r| r.id.as_deref() == Some(&cut.0))
        .unwrap();
    assert!(observed.digest.is_some(), "{observed:?}");

    // Rename one of them (same port): the description rewritten in place, same rule id,
    // one ModifySecurityGroupRules.
    let mut renamed = many.clone();
    renamed[0] = svc("renamed-service", 30200, "10.0.0.0/8");
    let upd = plan(&p, &config, &renamed, &nodes).await;
    assert_eq!(upd.summary.update, 1, "{:#?}", upd.targets[0].changes);
    env.proxy.reset();
    apply_ok(&p, &upd).await;
    assert_eq!(env.proxy.per_group(&sg).1, 1, "{:?}", env.proxy.calls());
    assert_eq!(writes(&plan(&p, &config, &renamed, &nodes).await), 0);
    assert_eq!(range_rule(env.raw_rules(&sg).await).0, cut.0);

    // A rule an earlier version wrote, with its list in tags: read as ours and fully
    // listed (nothing to do), and its list tags deleted once its marker is rewritten.
    let legacy: Vec<ServiceSpec> = (0..12)
        .map(|i| {
            svc(
                &format!("a-fairly-long-legacy-name-{i:02}"),
                30300 + i,
                "10.0.0.0/8",
            )
        })
        .collect();
    let legacy_rule = Rule {
        name: None,
        content: nodeport_firewall_provider::RuleContent {
            scope: None,
            family: IpFamily::V4,
            protocol: nodeport_firewall_provider::model::Protocol::Tcp,
            ports: vec![nodeport_firewall_provider::model::PortRange {
                from: 30300,
                to: 30311,
            }],
            sources: vec!["10.0.0.0/8".parse().unwrap()],
        },
        services: Default::default(),
        pools: Default::default(),
    };
    env.seed_with(
        &sg,
        Some(CLUSTER),
        &legacy_rule,
        Some(&format!(
            "nodeport-firewall cluster={CLUSTER} services=[12 in tags]"
        )),
    )
    .await;
    let id = range_rule_at(env.raw_rules(&sg).await, 30300).0;
    let names: Vec<String> = (0..12)
        .map(|i| format!("apps/a-fairly-long-legacy-name-{i:02}"))
        .collect();
    let mut tag_req = env.ec2.create_tags().resources(&id).tags(
        aws_sdk_ec2::types::Tag::builder()
            .key(marker::TAG_POOLS)
            .value(pool.as_str())
            .build(),
    );
    for (k, v) in marker::chunk_tags(marker::TAG_SERVICES, names) {
        tag_req = tag_req.tags(aws_sdk_ec2::types::Tag::builder().key(k).value(v).build());
    }
    tag_req.send().await.unwrap();
    let mut both = renamed.clone();
    both.extend(legacy.iter().cloned());
    assert_eq!(
        writes(&plan(&env.provider().await, &config, &both, &nodes).await),
        0,
        "the earlier version's rule is recognised"
    );
    let mut legacy_renamed = both.clone();
    let last = legacy_renamed.len() - 1;
    legacy_renamed[last] = svc("legacy-renamed", 30311, "10.0.0.0/8");
    let upd = plan(&p, &config, &legacy_renamed, &nodes).await;
    assert_eq!(upd.summary.update, 1, "{:#?}", upd.targets[0].changes);
    apply_ok(&p, &upd).await;
    assert_eq!(writes(&plan(&p, &config, &legacy_renamed, &nodes).await), 0);
    let r = range_rule_at(env.raw_rules(&sg).await, 30300);
    assert_eq!(r.0, id);
    assert!(
        !r.5.keys().any(|k| k.starts_with(marker::TAG_SERVICES)),
        "stale service tags: {:?}",
        r.5
    );
}

fn range_rule_at(raw: Vec<RawRule>, from: i32) -> RawRule {
    raw.into_iter().find(|r| r.2 == from).unwrap()
}

//! Issue 14 on AWS: ownership that a tag alone cannot fake, the groups holding rules of ours
//! found by their marker (orphans), and discovered groups that other interfaces share.

use nodeport_firewall_aws::marker;
use nodeport_firewall_provider::model::{IpFamily, PortRange, Protocol, ServiceSpec};
use nodeport_firewall_provider::{
    Action, ErrorKind, PoolView, Provider, Rule, RuleContent, Target,
};

use crate::harness::*;

fn tcp(port: u16, source: &str) -> Rule {
    Rule {
        name: None,
        content: RuleContent {
            scope: None,
            family: IpFamily::V4,
            protocol: Protocol::Tcp,
            ports: vec![PortRange::single(port)],
            sources: vec![source.parse().unwrap()],
        },
        services: Default::default(),
        pools: Default::default(),
    }
}

/// A foreign rule someone tagged with our two tags is not ours without our description
/// marker: observed as foreign, never revoked or rewritten, and no orphan target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_tags_on_a_foreign_rule_do_not_make_it_ours() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("spoof").await;
    let config = config_for(&[&pool]);
    // A bastion's SSH rule, tagged as ours (any role with ec2:CreateTags can do it); and a
    // twin of what a Service wants, tagged as ours with no description at all.
    env.seed_with(
        &sg,
        Some(CLUSTER),
        &tcp(22, "198.51.100.7/32"),
        Some("SSH from the bastion"),
    )
    .await;
    env.seed(&sg, Some(CLUSTER), &tcp(30700, "10.0.0.0/8"))
        .await;
    let before = env.raw_rules(&sg).await;
    assert_eq!(before.len(), 2);
    assert!(
        before
            .iter()
            .all(|r| r.5.get(marker::TAG_CLUSTER).map(String::as_str) == Some(CLUSTER))
    );

    let obs = p.observe(&Target::new("aws", &sg)).await.unwrap();
    assert!(obs.rules.iter().all(|r| !r.owned), "{:#?}", obs.rules);
    assert_eq!(
        p.owned_targets(&config).await.unwrap(),
        Vec::<Target>::new(),
        "a group with spoofed rules only holds nothing of ours"
    );

    // With no Services, nothing to remove; with a Service wanting the twin, it is satisfied
    // by the foreign rule, not updated or replaced.
    let empty = plan(&p, &config, &[], &nodes).await;
    assert_eq!(writes(&empty), 0, "{:#?}", empty.targets);
    let twin = plan(&p, &config, &[svc("web", 30700, "10.0.0.0/8")], &nodes).await;
    let tp = &twin.targets[0];
    assert_eq!(tp.count(Action::SatisfiedByForeign), 1, "{:#?}", tp.changes);
    assert_eq!(writes(&twin), 0, "{:#?}", tp.changes);
    apply_ok(&p, &empty).await;
    apply_ok(&p, &twin).await;
    assert_eq!(
        env.raw_rules(&sg).await,
        before,
        "the spoofed rules are untouched"
    );

    // A rule we wrote is ours; the spoofed ones stay foreign beside it.
    let ours = plan(&p, &config, &[svc("api", 30701, "10.0.0.0/8")], &nodes).await;
    apply_ok(&p, &ours).await;
    let obs = p.observe(&Target::new("aws", &sg)).await.unwrap();
    let owned: Vec<u16> = obs
        .rules
        .iter()
        .filter(|r| r.owned)
        .map(|r| r.rule.content.ports[0].from)
        .collect();
    assert_eq!(owned, vec![30701]);
    let gone = plan(&p, &config, &[], &nodes).await;
    assert_eq!(gone.summary.remove, 1, "{:#?}", gone.targets[0].changes);
    apply_ok(&p, &gone).await;
    assert_eq!(env.raw_rules(&sg).await, before);
}

/// `owned_targets` finds every group holding rules of ours, by the marker, whatever the
/// config still says about its pool: one `DescribeSecurityGroupRules` for the region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_targets_are_found_by_marker_in_one_call() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (kept, kept_sg, kept_nodes) = env.pool("kept").await;
    let (gone, gone_sg, gone_nodes) = env.pool("gone").await;
    let both = config_for(&[&kept, &gone]);
    let nodes: Vec<_> = kept_nodes.iter().chain(&gone_nodes).cloned().collect();
    let svcs: Vec<ServiceSpec> = (0..3)
        .map(|i| svc(&format!("s{i}"), 30800 + 2 * i, "10.0.0.0/8, 2001:db8::/32"))
        .collect();
    apply_ok(&p, &plan(&p, &both, &svcs, &nodes).await).await;
    // A group with only a spoofed rule, and one with another cluster's rule: not ours.
    let spoofed = env.sg("spoofed", false).await;
    env.seed(&spoofed, Some(CLUSTER), &tcp(30800, "10.0.0.0/8"))
        .await;
    let other = env.sg("other-cluster", false).await;
    env.seed_with(
        &other,
        Some("another-cluster"),
        &tcp(30800, "10.0.0.0/8"),
        Some("nodeport-firewall cluster=another-cluster services=apps/s0"),
    )
    .await;

    // Found from the config that remains: the pool `gone` is no longer in it, nor its nodes.
    let only_kept = config_for(&[&kept]);
    p.stats().reset();
    let found = p.owned_targets(&only_kept).await.unwrap();
    let mut want = vec![Target::new("aws", &kept_sg), Target::new("aws", &gone_sg)];
    want.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(found, want);
    assert_eq!(p.stats().calls("DescribeSecurityGroupRules"), 1);
    assert_eq!(p.stats().snapshot().len(), 1, "{:?}", p.stats().snapshot());

    // Once the orphans on `gone` are removed, only `kept` holds rules of ours.
    apply_ok(&p, &plan(&p, &both, &[], &gone_nodes).await).await;
    assert_eq!(
        p.owned_targets(&only_kept).await.unwrap(),
        vec![Target::new("aws", &kept_sg)]
    );
}

async fn resolve(
    p: &dyn Provider,
    pool: &str,
    nodes: &[nodeport_firewall_provider::model::NodeSpec],
    config: Option<serde_json::Value>,
) -> nodeport_firewall_provider::Result<Vec<String>> {
    let name = nodeport_firewall_provider::model::PoolName::new(pool);
    let targets = p
        .resolve(PoolView {
            name: &name,
            nodes,
            config: config.as_ref(),
        })
        .await?;
    Ok(targets.into_iter().map(|t| t.target.id).collect())
}

/// A discovered group that network interfaces outside the pool share is refused, naming
/// the group and how to pin it; pinned, it is taken. A pool's own secondary interfaces do
/// not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_groups_are_refused_unless_pinned() {
    let env = env_or_skip!();
    let p = env.provider().await;

    // The EKS cluster security group: tagged with the cluster tag by EKS, on every node
    // beside its node group's own group, and on the control plane's interfaces.
    let cluster_sg = env.sg("eks-cluster-sg", true).await;
    let a_sg = env.sg("nodegroup-a", false).await;
    let b_sg = env.sg("nodegroup-b", false).await;
    let a = env.instance(&[&a_sg, &cluster_sg]).await;
    let b = env.instance(&[&b_sg, &cluster_sg]).await;
    let a_nodes = vec![node("node-a", "a", &a)];
    let e = resolve(&p, "a", &a_nodes, None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Discovery);
    for part in [
        format!("pool a: refusing security group {cluster_sg} (eks-cluster-sg)"),
        format!("(instance {b}, not a node of pool a)"),
        "pin securityGroupIds".to_string(),
        format!("pools:\n  a:\n    aws:\n      securityGroupIds: [{cluster_sg}]"),
    ] {
        assert!(e.message.contains(&part), "{part:?} in {e}");
    }
    println!("shared group refusal:\n{e}\n");

    // The node groups' own groups are the only ones: shared by nobody else, taken.
    let c_sg = env.sg("nodegroup-c", false).await;
    let c1 = env.instance(&[&c_sg]).await;
    let c2 = env.instance(&[&c_sg]).await;
    // A secondary interface of a pool node (the VPC CNI adds them) with the same group.
    let eni = env
        .ec2
        .create_network_interface()
        .subnet_id(&env.subnet)
        .groups(&c_sg)
        .send()
        .await
        .unwrap()
        .network_interface()
        .and_then(|n| n.network_interface_id())
        .unwrap()
        .to_string();
    env.ec2
        .attach_network_interface()
        .network_interface_id(&eni)
        .instance_id(&c1)
        .device_index(1)
        .send()
        .await
        .unwrap();
    let c_nodes = vec![node("node-c1", "c", &c1), node("node-c2", "c", &c2)];
    p.stats().reset();
    assert_eq!(
        resolve(&p, "c", &c_nodes, None).await.unwrap(),
        vec![c_sg.clone()]
    );
    assert_eq!(p.stats().calls("DescribeNetworkInterfaces"), 1);

    // The same group on an interface of no instance (the control plane's, a load
    // balancer's): refused, described.
    let d_sg = env.sg("only-group-of-d", false).await;
    let d = env.instance(&[&d_sg]).await;
    env.ec2
        .create_network_interface()
        .subnet_id(&env.subnet)
        .groups(&d_sg)
        .description("Amazon EKS moto-test")
        .send()
        .await
        .unwrap();
    let d_nodes = vec![node("node-d", "d", &d)];
    let e = resolve(&p, "d", &d_nodes, None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Discovery);
    assert!(e.message.contains("\"Amazon EKS moto-test\""), "{e}");

    // Pinned, the sharing is meant: taken with no call.
    env.proxy.reset();
    let pinned = serde_json::json!({"securityGroupIds": [cluster_sg.clone()]});
    assert_eq!(
        resolve(&p, "a", &a_nodes, Some(pinned)).await.unwrap(),
        vec![cluster_sg.clone()]
    );
    assert!(env.proxy.calls().is_empty(), "{:?}", env.proxy.calls());

    // One pool of every node that has the cluster group: nobody outside shares it, taken.
    let ab_nodes = vec![node("node-a", "ab", &a), node("node-b", "ab", &b)];
    let ab = resolve(&p, "ab", &ab_nodes, None).await.unwrap();
    assert_eq!(ab, vec![cluster_sg.clone()]);

    // Denied the read: the pool fails with the permission named, never silently takes it.
    env.proxy
        .fail("DescribeNetworkInterfaces", 1, Fault::Unauthorized);
    let e = resolve(&p, "d2", &[node("node-c1", "d2", &c1)], None)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
    assert!(e.message.contains("ec2:DescribeNetworkInterfaces"), "{e}");
}

/// A pool re-targeted by changing its pinned `securityGroupIds`: its rules move, and the
/// old group, found by the orphan search, loses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retargeted_pool_leaves_no_rules_on_its_old_group() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, old_sg, nodes) = env.pool("moved").await;
    let new_sg = env.sg("moved-new", false).await;
    let pinned = |sg: &str| {
        let mut config = config_for(&[&pool]);
        config
            .pools
            .entry(pool.clone())
            .or_default()
            .providers
            .insert("aws".into(), serde_json::json!({"securityGroupIds": [sg]}));
        config
    };
    let svcs = [svc("web", 30900, "10.0.0.0/8")];
    apply_ok(&p, &plan(&p, &pinned(&old_sg), &svcs, &nodes).await).await;
    assert_eq!(env.raw_rules(&old_sg).await.len(), 1);

    let moved = plan(&p, &pinned(&new_sg), &svcs, &nodes).await;
    let of = |sg: &str| {
        moved
            .targets
            .iter()
            .find(|t| t.target.id == sg)
            .unwrap_or_else(|| panic!("{sg} not planned: {moved:#?}"))
    };
    assert_eq!(
        of(&old_sg).count(Action::Remove),
        1,
        "{:#?}",
        of(&old_sg).changes
    );
    assert_eq!(
        of(&new_sg).count(Action::Add),
        1,
        "{:#?}",
        of(&new_sg).changes
    );
    apply_ok(&p, &moved).await;
    assert!(env.raw_rules(&old_sg).await.is_empty());
    assert_eq!(env.raw_rules(&new_sg).await.len(), 1);
    assert_eq!(writes(&plan(&p, &pinned(&new_sg), &svcs, &nodes).await), 0);
}

/// A pool whose group becomes shared (an instance that is no Node yet joins with it) fails
/// to resolve: loud, and its rules stay; the orphan search does not take them for orphans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_group_becomes_shared_keeps_its_rules() {
    let env = env_or_skip!();
    let p = env
        .provider_with(serde_json::json!({"resolutionCacheSeconds": 0}))
        .await;
    let (pool, sg, nodes) = env.pool("joined").await;
    let config = config_for(&[&pool]);
    let svcs = [svc("web", 30950, "10.0.0.0/8")];
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    let before = env.raw_rules(&sg).await;
    assert_eq!(before.len(), 1);

    let stranger = env.instance(&[&sg]).await;
    let refused = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(writes(&refused), 0, "{refused:#?}");
    assert!(
        format!("{refused:?}").contains(&stranger),
        "the refusal names the stranger: {refused:#?}"
    );
    apply_ok(&p, &refused).await;
    assert_eq!(env.raw_rules(&sg).await, before);
}

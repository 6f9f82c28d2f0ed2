//! Issue 14 on Azure, against the ARM test server: Deny rules read as what they block, a
//! foreign Allow behind a Deny, busy NSGs (409 `AnotherOperationInProgress`), rules left
//! `Failed` or `Updating`, node-reported addresses that are not single hosts, and the NSGs
//! holding rules of ours after their pool is gone.

use super::*;
use nodeport_firewall_provider::model::Action;
use nodeport_firewall_provider::{ErrorKind, Observation, ObservedRule};

/// One NSG, one pool `np1` with one node, and one Service opening 30080 to 10.0.0.0/8.
struct OnePool {
    server: ArmServer,
    nsg: String,
    config: Config,
    nodes: Vec<NodeSpec>,
    svcs: Vec<ServiceSpec>,
}

fn one_pool() -> OnePool {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let config = config_for(&nsg, &[("np1", json!({}))]);
    OnePool {
        server,
        nsg,
        config,
        nodes: vec![node("a0", "np1", &["10.240.0.4"])],
        svcs: vec![svc("a", 30080, "10.0.0.0/8")],
    }
}

fn nsg_target(nsg: &str) -> Target {
    Target::new("azure", &NsgId::parse(nsg).unwrap().id())
}

fn by_name<'a>(o: &'a Observation, name: &str) -> &'a ObservedRule {
    o.rules
        .iter()
        .find(|r| r.rule.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no rule {name}: {o:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rules_are_observed_as_what_they_block() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    server.seed_rule(
        &nsg,
        "deny-all",
        json!({"protocol": "*", "sourceAddressPrefix": "*", "destinationAddressPrefix": "*",
               "destinationPortRange": "*", "access": "Deny", "priority": 4096}),
    );
    server.seed_rule(
        &nsg,
        "deny-vnet-web",
        json!({"protocol": "Tcp", "sourceAddressPrefix": "VirtualNetwork",
               "destinationAddressPrefix": "10.240.0.4", "destinationPortRanges": ["30000-30100", "443"],
               "access": "Deny", "priority": 3100}),
    );
    server.seed_rule(
        &nsg,
        "deny-ping",
        json!({"protocol": "Icmp", "sourceAddressPrefix": "*", "destinationAddressPrefix": "*",
               "destinationPortRange": "*", "access": "Deny", "priority": 3101}),
    );
    let p = provider_with(&server, json!({})).await;
    let o = p.observe(&nsg_target(&nsg)).await.unwrap();
    assert!(!o.limits.deny_wins_ties, "priorities are unique on an NSG");
    let all = by_name(&o, "deny-all");
    assert_eq!((all.priority, all.owned), (Some(4096), false), "{all:#?}");
    assert_eq!(all.deny, Some(Default::default()), "everything");
    let web = by_name(&o, "deny-vnet-web");
    let denial = web.deny.as_ref().unwrap();
    assert_eq!(web.priority, Some(3100));
    assert_eq!(
        denial.protocol,
        Some(nodeport_firewall_provider::model::Protocol::Tcp)
    );
    assert_eq!(
        denial
            .ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["443", "30000-30100"]
    );
    assert!(denial.sources.is_empty(), "VirtualNetwork: every source");
    assert!(denial.scopes.is_empty(), "the whole NSG");
    for r in [all, web] {
        assert!(
            r.rule.content.sources.is_empty(),
            "a Deny satisfies nothing"
        );
    }
    // ICMP matches nothing a rule of ours opens.
    assert_eq!(by_name(&o, "deny-ping").deny, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_allow_behind_a_deny_does_not_satisfy_and_ours_goes_before_the_deny() {
    let OnePool {
        server,
        nsg,
        config,
        nodes,
        svcs,
    } = one_pool();
    let p = provider_with(&server, json!({})).await;
    let probe = plan(&p, &config, &svcs, &nodes).await;
    let wanted = probe.targets[0].changes[0].rule.clone();
    let deny = seed_shadowed_allow(&server, &nsg, &wanted);
    let deny_at = server
        .rules(&nsg)
        .iter()
        .find(|r| r["name"] == deny.as_str())
        .map(priority)
        .unwrap();
    assert!(deny_at > 3000, "the band's start comes before the Deny");

    let next = plan(&p, &config, &svcs, &nodes).await;
    let t = &next.targets[0];
    assert!(
        t.of(Action::SatisfiedByForeign).next().is_none(),
        "the Allow behind {deny} lets nothing through: {t:#?}"
    );
    let add = t.of(Action::Add).next().expect("our own rule");
    let at = add.priority.expect("a priority");
    assert!(
        i64::from(at) < deny_at,
        "ours at {at} must come before the Deny at {deny_at}"
    );
    apply_ok(&p, &next).await;
    let mine = ours(&server, &nsg);
    assert_eq!(mine.len(), 1);
    assert_eq!(
        priority(&mine[0]),
        i64::from(at),
        "written at the plan's priority"
    );
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_operation_in_progress_is_retried_honouring_retry_after() {
    let OnePool {
        server,
        nsg,
        config,
        nodes,
        svcs,
    } = one_pool();
    let p = provider_with(&server, json!({})).await;
    server.busy_writes(2, 1);
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

    // Busy for longer than the retries last: the apply fails with a retryable kind, and
    // nothing was written.
    server.busy_writes(usize::MAX, 0);
    let outcomes = nodeport_firewall_provider::testkit::apply(
        &p,
        &plan(&p, &config, &[svc("b", 30081, "192.0.2.0/24")], &nodes).await,
    )
    .await;
    let ApplyOutcome::Failed { error, .. } = &outcomes[0].1 else {
        panic!("expected a failure: {outcomes:?}")
    };
    assert_eq!(error.kind, ErrorKind::Transient, "{error}");
    assert_eq!(error.code.as_deref(), Some("AnotherOperationInProgress"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_left_failed_is_put_again_at_its_priority_by_the_next_apply() {
    let OnePool {
        server,
        nsg,
        config,
        nodes,
        svcs,
    } = one_pool();
    let p = provider_with(&server, json!({})).await;
    server.fail_next_put_operations(1, "InternalServerError");
    let outcomes =
        nodeport_firewall_provider::testkit::apply(&p, &plan(&p, &config, &svcs, &nodes).await)
            .await;
    assert!(
        matches!(outcomes[0].1, ApplyOutcome::Failed { .. }),
        "{outcomes:?}"
    );
    let mine = ours(&server, &nsg);
    assert_eq!(mine[0]["properties"]["provisioningState"], "Failed");
    let name = mine[0]["name"].as_str().unwrap().to_string();

    // A fresh process sees it as not in force, and plans it again.
    let fresh = provider_with(&server, json!({})).await;
    let o = fresh.observe(&nsg_target(&nsg)).await.unwrap();
    let seen = by_name(&o, &name);
    assert!(seen.owned);
    assert!(
        seen.needs_rewrite.as_deref().unwrap().contains("Failed"),
        "{seen:#?}"
    );
    let again = plan(&fresh, &config, &svcs, &nodes).await;
    assert_eq!(
        (
            again.summary.add,
            again.summary.update,
            again.summary.remove
        ),
        (0, 1, 0),
        "{again:#?}"
    );
    let update = again.targets[0].of(Action::Update).next().unwrap();
    assert_eq!(update.priority.map(i64::from), Some(priority(&mine[0])));
    server.clear_log();
    apply_ok(&fresh, &again).await;
    assert_eq!(server.count("PUT", "/securityRules/"), 1, "one full PUT");
    let mine = ours(&server, &nsg);
    assert_eq!(mine[0]["properties"]["provisioningState"], "Succeeded");
    assert_eq!(
        mine[0]["properties"]["description"],
        mine[0]["properties"]["description"]
    );
    assert_eq!(writes(&plan(&fresh, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_still_updating_after_our_timeout_is_put_again() {
    let OnePool {
        server,
        nsg,
        config,
        nodes,
        svcs,
    } = one_pool();
    server.set_polls_per_operation(u32::MAX);
    let slow = provider_with(&server, json!({"operationTimeoutSeconds": 1})).await;
    let outcomes = engine::apply(&slow, &plan(&slow, &config, &svcs, &nodes).await).await;
    assert!(
        matches!(outcomes[0].1, ApplyOutcome::Failed { .. }),
        "{outcomes:?}"
    );
    let mine = ours(&server, &nsg);
    assert_eq!(mine[0]["properties"]["provisioningState"], "Updating");

    // No write of ours is running any more: the rule has outlived our timeout.
    server.set_polls_per_operation(1);
    let o = slow.observe(&nsg_target(&nsg)).await.unwrap();
    let name = mine[0]["name"].as_str().unwrap();
    assert!(
        by_name(&o, name)
            .needs_rewrite
            .as_deref()
            .unwrap()
            .contains("Updating")
    );
    let again = plan(&slow, &config, &svcs, &nodes).await;
    assert_eq!(again.summary.update, 1, "{again:#?}");
    apply_ok(&slow, &again).await;
    assert_eq!(
        ours(&server, &nsg)[0]["properties"]["provisioningState"],
        "Succeeded"
    );
    assert_eq!(writes(&plan(&slow, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_addresses_that_are_not_single_hosts_refuse_the_pool() {
    let server = ArmServer::start();
    let nsg = server.create_nsg(SUB, RG, "nsg");
    let p = provider_with(&server, json!({})).await;
    let config = config_for(&nsg, &[("np1", json!({}))]);
    let svcs = vec![svc("a", 30080, "10.0.0.0/8")];
    let good = vec![node("a0", "np1", &["10.240.0.4"])];
    apply_ok(&p, &plan(&p, &config, &svcs, &good).await).await;
    let before = server.rules(&nsg);
    for address in [
        "10.240.0.0/16",
        "0.0.0.0/0",
        "::/0",
        "10.240.0.5/32",
        "node-1",
        "0.0.0.0",
    ] {
        let mut nodes = good.clone();
        nodes.push(node("a1", "np1", &[address]));
        let plan = plan(&p, &config, &svcs, &nodes).await;
        let err = plan.pools[0]
            .error
            .as_deref()
            .unwrap_or_else(|| panic!("{address}: the pool must not resolve: {plan:#?}"));
        assert!(
            err.contains("node a1") && err.contains(address),
            "{address}: {err}"
        );
        assert_eq!(
            writes(&plan),
            0,
            "{address}: its rules are kept as they are"
        );
        engine::apply(&p, &plan).await;
        assert_eq!(server.rules(&nsg), before, "{address}: nothing written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nsgs_holding_rules_of_ours_are_found_after_their_pool_is_gone() {
    let server = ArmServer::start();
    server.set_page_size(1);
    let a = server.create_nsg(SUB, RG, "np1-nsg");
    let b = server.create_nsg(SUB, RG, "np2-nsg");
    let foreign_only = server.create_nsg(SUB, RG, "foreign-nsg");
    let elsewhere = server.create_nsg(SUB, "other-rg", "np3-nsg");
    let p = provider_with(&server, json!({})).await;
    let mut config = config_for(&a, &[("np1", json!({}))]);
    config
        .pools
        .extend(config_for(&b, &[("np2", json!({}))]).pools);
    config
        .pools
        .extend(config_for(&elsewhere, &[("np3", json!({}))]).pools);
    let nodes = vec![
        node("a0", "np1", &["10.240.0.4"]),
        node("b0", "np2", &["10.240.1.4"]),
        node("c0", "np3", &["10.240.2.4"]),
    ];
    let svcs = vec![svc("a", 30080, "10.0.0.0/8")];
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    // Another cluster's rule and a plain one: not ours.
    server.seed_rule(
        &foreign_only,
        "k8s-azure-lb_allow_IPv4_abc",
        aks_lb_rule(500, 80),
    );
    let other = Rule {
        name: None,
        content: ours_content(&server, &a),
        services: Default::default(),
        pools: [PoolName::new("np1")].into_iter().collect(),
    };
    seed(&server, &foreign_only, Some("another-cluster"), &other);

    let ids =
        |targets: Vec<Target>| -> BTreeSet<String> { targets.into_iter().map(|t| t.id).collect() };
    let canonical = |nsg: &str| NsgId::parse(nsg).unwrap().id();
    // np1 and np3 removed from the config, their nodes gone: np1's NSG is still found
    // through its resource group (orphanScopes here); np3's other resource group is in no
    // scope any more.
    let mut remaining = config.clone();
    remaining.pools.retain(|name, _| name.as_str() == "np2");
    let lists = p.stats().calls("ListNetworkSecurityGroups");
    let found = ids(p.owned_targets(&remaining).await.unwrap());
    assert_eq!(found, BTreeSet::from([canonical(&a), canonical(&b)]));
    assert_eq!(
        p.stats().calls("ListNetworkSecurityGroups") - lists,
        1,
        "one paged list for the one resource group"
    );
    // An unmanaged pool's NSG names its resource group.
    let mut unmanaged = remaining.clone();
    let mut np3 = config.pools[&PoolName::new("np3")].clone();
    np3.managed = Some(false);
    unmanaged.pools.insert(PoolName::new("np3"), np3);
    let found = ids(p.owned_targets(&unmanaged).await.unwrap());
    assert_eq!(
        found,
        BTreeSet::from([canonical(&a), canonical(&b), canonical(&elsewhere)])
    );
    // Without orphanScopes, the resource group of any NSG still named finds the others.
    let plain = AzureProvider::from_config_with(
        CLUSTER,
        Some(&{
            let mut v = provider_json(&server, json!({}));
            v.as_object_mut().unwrap().remove("orphanScopes");
            v
        }),
        Credentials::StaticToken(ArmServer::STATIC_TOKEN.to_string()),
    )
    .await
    .unwrap();
    let found = ids(plain.owned_targets(&remaining).await.unwrap());
    assert_eq!(found, BTreeSet::from([canonical(&a), canonical(&b)]));
    let found = ids(plain.owned_targets(&Config::new(CLUSTER)).await.unwrap());
    assert!(found.is_empty(), "no NSG named, no scope: {found:?}");
}

/// The content of our one rule on `nsg`, as observed.
fn ours_content(server: &ArmServer, nsg: &str) -> nodeport_firewall_provider::RuleContent {
    let mine = ours(server, nsg);
    let p = &mine[0]["properties"];
    nodeport_firewall_provider::RuleContent {
        scope: Some(format!("dst:{}", prefixes(p, "destination").join(","))),
        family: nodeport_firewall_provider::model::IpFamily::V4,
        protocol: nodeport_firewall_provider::model::Protocol::Tcp,
        ports: port_ranges(p).iter().map(|r| r.parse().unwrap()).collect(),
        sources: prefixes(p, "source")
            .iter()
            .map(|s| s.parse().unwrap())
            .collect(),
    }
}

//! Call counts per target, and the 500-Service measurement (run with `--nocapture` to see
//! the figures).

use std::time::Instant;

use nodeport_firewall_provider::model::{NodeSpec, PoolName, ServiceSpec};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_counts_per_target() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let mut pools = Vec::new();
    let mut nodes = Vec::new();
    let mut sgs = Vec::new();
    for name in ["cc-a", "cc-b", "cc-c"] {
        let (pool, sg, n) = env.pool(name).await;
        pools.push(pool);
        sgs.push(sg);
        nodes.extend(n);
    }
    let config = config_for(&pools.iter().collect::<Vec<_>>());
    let mut svcs: Vec<ServiceSpec> = (0..10)
        .map(|i| svc(&format!("s{i}"), 30500 + 3 * i, "10.0.0.0/8, 2001:db8::/32"))
        .collect();
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;

    // A resync with nothing changed: one read per target, no writes.
    env.proxy.reset();
    p.stats().reset();
    let noop = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(writes(&noop), 0);
    apply_ok(&p, &noop).await;
    for sg in &sgs {
        assert_eq!(
            env.proxy.per_group(sg),
            (1, 0),
            "{sg}: {:?}",
            env.proxy.calls()
        );
    }
    // One per target, and the one search for targets holding rules of ours (orphans).
    assert_eq!(p.stats().calls("DescribeSecurityGroupRules"), 4);
    assert_eq!(p.stats().writes(), 0);
    assert_eq!(
        p.stats().calls("DescribeInstances"),
        0,
        "discovery is cached"
    );
    println!("no-op resync, 3 targets: {:?}", p.stats().snapshot());

    // One Service added: one read and one write per target.
    svcs.push(svc("added", 30600, "10.0.0.0/8, 2001:db8::/32"));
    env.proxy.reset();
    p.stats().reset();
    let one = plan(&p, &config, &svcs, &nodes).await;
    apply_ok(&p, &one).await;
    for sg in &sgs {
        assert_eq!(
            env.proxy.per_group(sg),
            (1, 1),
            "{sg}: {:?}",
            env.proxy.calls()
        );
    }
    assert_eq!(p.stats().writes(), 3);
    println!("one Service added, 3 targets: {:?}", p.stats().snapshot());
}

struct Scenario {
    name: &'static str,
    services: Vec<ServiceSpec>,
}

/// 500 Services at once across 3 pools: writes per target and rule slots used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_500_services_across_3_pools() {
    let env = env_or_skip!();
    let allowlists = [
        "10.0.0.0/8",
        "192.168.0.0/16, 2001:db8::/32",
        "172.16.0.0/12, 203.0.113.0/24",
    ];
    let pool_names = ["bench-a", "bench-b", "bench-c"];
    // A: each Service on one pool, NodePorts allocated in runs of 8 with gaps, the run's
    // Services sharing an allowlist (a team's block). B: 4 blocks of 125 contiguous ports.
    let a: Vec<ServiceSpec> = (0..500)
        .map(|i: i32| {
            let run = i / 8;
            ServiceSpec::nodeport("bench", &format!("svc-{i}"))
                .with_port("p", "TCP", 80, 30000 + run * 10 + i % 8)
                .enabled()
                .with_ranges(allowlists[(run % 3) as usize])
                .with_annotation("node-pools", pool_names[(run % 3) as usize])
        })
        .collect();
    let b: Vec<ServiceSpec> = (0..500)
        .map(|i: i32| {
            ServiceSpec::nodeport("bench", &format!("svc-{i}"))
                .with_port("p", "TCP", 80, 30000 + i)
                .enabled()
                .with_ranges(allowlists[(i / 125) as usize % 3])
        })
        .collect();
    for scenario in [
        Scenario {
            name: "A: one pool per Service, runs of 8 NodePorts",
            services: a,
        },
        Scenario {
            name: "B: every pool, 4 blocks of 125 contiguous NodePorts",
            services: b,
        },
    ] {
        let p = env.provider().await;
        let mut pools = Vec::new();
        let mut nodes = Vec::new();
        let mut sgs = Vec::new();
        for name in pool_names {
            let (pool, sg, n) = env.pool(&format!("{name}-{}", &scenario.name[..1])).await;
            let n: Vec<NodeSpec> = n
                .into_iter()
                .map(|n| n.with_label(POOL_LABEL, name))
                .collect();
            pools.push(PoolName::new(name));
            let _ = pool;
            sgs.push(sg);
            nodes.extend(n);
        }
        let config = config_for(&pools.iter().collect::<Vec<_>>());
        env.proxy.reset();
        let started = Instant::now();
        let first = plan(&p, &config, &scenario.services, &nodes).await;
        for t in &first.targets {
            assert!(t.error.is_none(), "{}: {:?}", t.target, t.error);
        }
        apply_ok(&p, &first).await;
        let elapsed = started.elapsed();
        println!("\n== {} ==", scenario.name);
        println!("plan + apply of 500 Services: {elapsed:?}");
        let mut total_rules = 0;
        let mut total_naive = 0;
        for (sg, pool) in sgs.iter().zip(&pools) {
            let (reads, writes) = env.proxy.per_group(sg);
            let rules = env.raw_rules(sg).await.len();
            // Naive: one rule per (NodePort, CIDR) of every Service on this pool.
            let naive: usize = scenario
                .services
                .iter()
                .filter(|s| {
                    s.annotations
                        .get("nodeport-firewall.io/node-pools")
                        .is_none_or(|v| v == pool.as_str())
                })
                .map(|s| {
                    s.annotations["nodeport-firewall.io/allowed-source-ranges"]
                        .split(',')
                        .count()
                })
                .sum();
            total_rules += rules;
            total_naive += naive;
            println!(
                "pool {pool} ({sg}): {reads} reads, {writes} writes; {rules} rule slots used (naive: {naive})"
            );
        }
        println!(
            "all calls: {:?}\nrule slots: {total_rules} used vs {total_naive} naive ({:.1}x fewer)",
            env.proxy.calls(),
            total_naive as f64 / total_rules.max(1) as f64
        );
        let again = plan(&p, &config, &scenario.services, &nodes).await;
        assert_eq!(writes(&again), 0);
    }
}

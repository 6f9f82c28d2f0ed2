//! Capacity, as a user meets it with the real binary on the offline memory cloud: a pool
//! whose rules outgrow one target spread over several (`pools.P.memory.targets`, as AWS
//! security groups are), with the headroom the plan shows.

use crate::cli::{Cli, Scratch};
use crate::manifests::{docs, node, svc};
use crate::s;

/// `n` Services, each with an allowlist of its own: one rule each.
fn services(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            svc("shop", &format!("s{i:02}"))
                .tcp(30100 + i as u32)
                .ranges(&format!("198.51.100.{i}/32"))
                .to_yaml()
        })
        .collect()
}

fn config(targets: &str) -> String {
    format!(
        "clusterName: e2e\ntrustNodePoolLabels: true\nmemory:\n  limits: {{maxRules: 4, maxPortsPerRule: 1, maxSourcesPerRule: 1}}\npools:\n  web:\n    memory: {{{targets}}}\n"
    )
}

#[test]
fn a_pool_spread_over_two_targets_holds_what_one_cannot_and_moves_nothing() {
    let dir = Scratch::new();
    let state = s(&dir.path("state.json"));
    let manifests = |n: usize| {
        let mut d = vec![node("n1", Some("web"))];
        d.extend(services(n));
        s(&dir.write("m.yaml", &docs(&d)))
    };
    // One target of 4 rules cannot hold 6: the quota error, and nothing written.
    let one = s(&dir.write("one.yaml", &config("target: web-a")));
    Cli::new()
        .plan(&["-f", &manifests(6), "--config", &one, "--state", &state])
        .expect_exit(1)
        .stdout_has(&["rule quota exceeded"]);

    // Two of them can: 4 on the first, 2 on the second.
    let two = s(&dir.write("two.yaml", &config("targets: [web-a, web-b]")));
    let args = |m: &str| -> Vec<String> {
        ["-f", m, "--config", &two, "--state", &state]
            .iter()
            .map(|a| a.to_string())
            .collect()
    };
    let m = manifests(6);
    let run = Cli::new().plan(&args(&m)).expect_exit(2);
    let a = run.section("memory:web-a");
    let b = run.section("memory:web-b");
    assert!(
        a[0].contains("rules after: 4 of ours + 0 others / limit 4, headroom 0"),
        "{a:?}"
    );
    assert!(
        b[0].contains("rules after: 2 of ours + 0 others / limit 4, headroom 2"),
        "{b:?}"
    );
    let mut apply = args(&m);
    apply.push("--yes".into());
    Cli::new().apply(&apply).expect_exit(0);
    Cli::new().plan(&args(&m)).expect_exit(0);

    // One more Service: one add, on the target with room, and nothing moves.
    let m = manifests(7);
    let json = Cli::new()
        .plan(&[args(&m), vec!["-o".into(), "json".into()]].concat())
        .expect_exit(2)
        .json();
    assert_eq!(
        (
            json["summary"]["add"].as_u64(),
            json["summary"]["remove"].as_u64()
        ),
        (Some(1), Some(0)),
        "{json:#}"
    );
    // Nine cannot fit in eight: one error for the group, naming what would fit.
    let m = manifests(9);
    Cli::new().plan(&args(&m)).expect_exit(1).stdout_has(&[
        "do not fit on the 2 targets",
        "1 more targets with the same quota",
    ]);
}

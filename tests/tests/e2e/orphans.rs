//! Rules of ours that no managed pool wants any more, as a user meets them with the real
//! binary and the offline memory cloud (`--state`): a pool set `managed: false`, and
//! manifests that hold Services but no Nodes.

use crate::cli::{Cli, Scratch, examples};
use crate::s;

/// The demo applied into a fresh state file; returns the scratch dir and the state path.
fn applied() -> (Scratch, String) {
    let dir = Scratch::new();
    let state = s(&dir.path("state.json"));
    Cli::new()
        .apply(&crate::demo(&["--yes", "--state", &state]))
        .expect_exit(0);
    (dir, state)
}

#[test]
fn a_pool_set_unmanaged_has_its_rules_removed_as_orphans() {
    let (dir, state) = applied();
    let config = std::fs::read_to_string(examples().join("config.yaml"))
        .unwrap()
        .replace(
            "pools:\n  gpu:\n    managed: false",
            "pools:\n  gpu:\n    managed: false\n  batch:\n    managed: false",
        );
    let config = s(&dir.write("config.yaml", &config));
    let cluster = s(&examples().join("cluster"));
    let args = ["-f", &cluster, "--config", &config, "--state", &state];
    let run = Cli::new().plan(&args).expect_exit(2);
    let batch = run.section("memory:batch");
    assert_eq!(
        batch
            .iter()
            .filter(|l| l.trim_start().starts_with("- "))
            .count(),
        2,
        "{batch:#?}"
    );
    assert!(
        batch
            .iter()
            .all(|l| !l.trim_start().starts_with("- ")
                || l.contains("orphan: pool batch is unmanaged")),
        "{batch:#?}"
    );
    // Applying removes them, and then nothing is left to do.
    let mut apply = args.to_vec();
    apply.push("--yes");
    Cli::new().apply(&apply).expect_exit(0);
    Cli::new().plan(&args).expect_exit(0);
}

#[test]
fn services_without_nodes_warn_and_remove_what_their_gone_pools_held() {
    let (_dir, state) = applied();
    let services = s(&examples().join("cluster/services.yaml"));
    let config = s(&examples().join("config.yaml"));
    Cli::new()
        .plan(&["-f", &services, "--config", &config, "--state", &state])
        .expect_exit(2)
        .stdout_has(&["but no Nodes", "orphan: pool web is gone"]);
    let json = Cli::new()
        .plan(&[
            "-f", &services, "--config", &config, "--state", &state, "-o", "json",
        ])
        .expect_exit(2)
        .json();
    assert_eq!(json["summary"]["add"], 0, "{json:#}");
    assert!(
        json["summary"]["remove"].as_u64().unwrap() >= 11,
        "{json:#}"
    );
    let kinds: Vec<&str> = json["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"noNodes"), "{kinds:?}");
}

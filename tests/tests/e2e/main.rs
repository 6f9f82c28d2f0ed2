//! End-to-end tests: the real `nodeport-firewall` binary (see `cli.rs` for how it is built
//! and found) on the bundled demo in `examples/` and on generated manifests and configs.
//!
//! Run with `cargo test -p nodeport-firewall-e2e` (or `cargo test --workspace`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod aws;
mod azure;
mod capacity;
mod ci;
mod cli;
mod crate_graph;
mod deploy;
mod failover;
mod gcp;
mod live;
mod manifests;
mod orphans;
mod plugin;
mod policy;
mod ports;
mod run;

use std::path::{Path, PathBuf};

use cli::{Cli, Run, Scratch, examples};
use manifests::{docs, example_services, node, svc, without_service};
use serde_json::Value;

const ESC: &str = "\x1b[";

pub(crate) fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `-f examples/cluster --config examples/config.yaml`, then `extra`.
pub(crate) fn demo(extra: &[&str]) -> Vec<String> {
    let ex = examples();
    let mut args = vec![
        "-f".to_string(),
        s(&ex.join("cluster")),
        "--config".to_string(),
        s(&ex.join("config.yaml")),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The demo's nodes and config with `services` (YAML text) instead of the demo's Services.
pub(crate) fn demo_with_services(services: &Path, extra: &[&str]) -> Vec<String> {
    let ex = examples();
    let mut args = vec![
        "-f".to_string(),
        s(&ex.join("cluster/nodes.yaml")),
        "-f".to_string(),
        s(services),
        "--config".to_string(),
        s(&ex.join("config.yaml")),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The changes of every target with `action`, as (target id, rule) pairs.
fn changes(plan: &Value, action: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for t in plan["targets"].as_array().expect("targets") {
        for c in t["changes"].as_array().expect("changes") {
            if c["action"] == action {
                out.push((
                    t["target"]["id"].as_str().expect("id").to_string(),
                    c["rule"].clone(),
                ));
            }
        }
    }
    out
}

fn services_of(rule: &Value) -> Vec<&str> {
    rule["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s.as_str().expect("service"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// plan on the bundled demo

#[test]
fn plan_on_the_demo_shows_pools_targets_rules_warnings_and_a_summary() {
    let run = Cli::new().plan(&demo(&[])).expect_exit(2).stdout_has(&[
        "nodeport-firewall plan: cluster demo, provider memory",
        "pool batch (1 node) -> memory:batch",
        "pool edge (1 node) -> memory:edge",
        "pool gpu (1 node): not managed",
        "pool web (2 nodes) -> memory:web",
        // The invalid Service, with the fail-closed promise.
        "! shop/legacy: nodeport-firewall.io/allowed-source-ranges: \"10.0.0.0/33\" is not an IPv4/IPv6 address or CIDR",
        "(its existing rules are kept as they are)",
        // Host bits cleared, with a warning.
        "! monitoring/metrics: nodeport-firewall.io/allowed-source-ranges: 10.20.30.40/24 has host bits set; using 10.20.30.0/24",
        "! node bastion has none of the pool labels",
        "1 Service not managed (-v lists it with the reason).",
    ]);
    assert!(
        run.stdout
            .trim_end()
            .ends_with("Plan: 11 to add, 0 to remove, 0 unchanged."),
        "closing line:\n{}",
        run.stdout
    );

    // (target, the `+` lines it must have, without the generated rule names)
    let want: &[(&str, &[&str])] = &[
        (
            "memory:batch",
            &[
                "+ tcp 31100 from 10.20.30.0/24  [monitoring/metrics]",
                "+ udp 31777-31778 from 2001:db8:200::/40  [games/game]",
            ],
        ),
        (
            "memory:edge",
            &[
                "+ tcp 30053 from 198.51.100.0/24  [infra/dns]",
                "+ tcp 31100 from 10.20.30.0/24  [monitoring/metrics]",
                "+ tcp 32443 from 192.0.2.0/24  [ingress/ingress]",
                "+ udp 30053 from 198.51.100.0/24  [infra/dns]",
                "+ udp 31777-31778 from 2001:db8:200::/40  [games/game]",
            ],
        ),
        (
            "memory:web",
            &[
                "+ tcp 30080-30081,30090 from 203.0.113.0/24  [shop/checkout,shop/web]",
                "+ tcp 31100 from 10.20.30.0/24  [monitoring/metrics]",
                "+ tcp 32443 from 192.0.2.0/24  [ingress/ingress]",
                "+ tcp 30080-30081,30090 from 2001:db8:100::/48  [shop/checkout,shop/web]",
            ],
        ),
    ];
    for (target, lines) in want {
        let section = run.section(target);
        assert!(
            section[0].contains(&format!(
                "rules after: {} of ours + 0 others / limit 20, headroom {}",
                lines.len(),
                20 - lines.len()
            )),
            "{section:?}"
        );
        let got: Vec<&String> = section.iter().filter(|l| l.starts_with('+')).collect();
        assert_eq!(got.len(), lines.len(), "{target}: {section:#?}");
        for (got, want) in got.iter().zip(lines.iter()) {
            assert!(
                got.starts_with(want),
                "{target}: {got:?} should start with {want:?}"
            );
            assert!(got.contains("(npf-demo-"), "named rules: {got:?}");
        }
    }
    // Nothing for the unmanaged gpu pool, the opted-out Service or the metrics admin port.
    assert!(!run.stdout.contains("memory:gpu ("), "{}", run.stdout);
    run.stdout_lacks(&["shop/debug", "31200", "30500", "30600", ESC]);
}

#[test]
fn plan_verbose_lists_unmanaged_services_with_the_reason() {
    Cli::new()
        .plan(&demo(&["-v"]))
        .expect_exit(2)
        .stdout_has(&[
            "Unmanaged Services:",
            "  shop/debug: opted out with nodeport-firewall.io/enabled=false",
        ])
        .stdout_lacks(&["-v lists", ESC]);
}

#[test]
fn no_colour_when_stdout_is_not_a_terminal() {
    // Also with a colourful log level: logs go to stderr, never into the plan.
    for extra in [&[][..], &["-v"], &["--no-color"], &["-o", "json"]] {
        let run = Cli::new().env("NPF_LOG", "info").plan(&demo(extra));
        let run = run.expect_exit(2);
        assert!(!run.stdout.contains(ESC), "{extra:?}: {}", run.stdout);
    }
}

// ---------------------------------------------------------------------------------------
// JSON

#[test]
fn plan_json_has_the_stable_schema() {
    let run = Cli::new().plan(&demo(&["-o", "json"])).expect_exit(2);
    let plan = run.json();
    assert_eq!(plan["formatVersion"], 1);
    assert_eq!(plan["cluster"], "demo");
    assert_eq!(plan["provider"], "memory");
    assert_eq!(plan["unpooledNodes"], serde_json::json!(["bastion"]));

    let targets = plan["targets"].as_array().unwrap();
    let ids: Vec<&str> = targets
        .iter()
        .map(|t| t["target"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["batch", "edge", "web"]);
    for t in targets {
        assert_eq!(t["target"]["provider"], "memory");
        assert!(t["pools"].is_array());
        assert_eq!(t["removeFirst"], false);
        assert_eq!(t["usage"]["foreign"], 0);
        assert_eq!(t["usage"]["limit"], 20);
        assert!(t.get("error").is_none(), "{t}");
        for c in t["changes"].as_array().unwrap() {
            assert_eq!(c["action"], "add");
            let r = &c["rule"];
            assert!(matches!(r["protocol"].as_str(), Some("tcp" | "udp")), "{r}");
            assert!(matches!(r["family"].as_str(), Some("ipv4" | "ipv6")), "{r}");
            assert!(r["name"].as_str().unwrap().starts_with("npf-demo-"), "{r}");
            for p in r["ports"].as_array().unwrap() {
                assert!(
                    p["from"].as_u64().unwrap() <= p["to"].as_u64().unwrap(),
                    "{r}"
                );
            }
            assert!(!r["sources"].as_array().unwrap().is_empty(), "{r}");
            assert!(!r["services"].as_array().unwrap().is_empty(), "{r}");
            assert_eq!(r["pools"], t["pools"], "{r}");
        }
    }

    // One rule, fully: shop/web and shop/checkout share their allowlist, so one rule per
    // family holds both Services' ports, merged where contiguous.
    let web = targets.iter().find(|t| t["target"]["id"] == "web").unwrap();
    let shared = web["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["rule"])
        .find(|r| r["sources"] == serde_json::json!(["203.0.113.0/24"]))
        .unwrap();
    assert_eq!(shared["protocol"], "tcp");
    assert_eq!(shared["family"], "ipv4");
    assert_eq!(
        shared["ports"],
        serde_json::json!([{"from": 30080, "to": 30081}, {"from": 30090, "to": 30090}])
    );
    assert_eq!(
        shared["services"],
        serde_json::json!(["shop/checkout", "shop/web"])
    );

    // Pools.
    let pools: Vec<(&str, bool, u64)> = plan["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["managed"].as_bool().unwrap(),
                p["nodes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pools,
        [
            ("batch", true, 1),
            ("edge", true, 1),
            ("gpu", false, 1),
            ("web", true, 2)
        ]
    );
    assert_eq!(
        plan["pools"][0]["targets"],
        serde_json::json!([{"target": {"provider": "memory", "id": "batch"}, "scope": null}])
    );

    // Services: every one, sorted, with its status.
    let statuses: Vec<(&str, &str)> = plan["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap(),
                s["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("games/game", "managed"),
            ("infra/dns", "managed"),
            ("ingress/ingress", "managed"),
            ("monitoring/metrics", "managed"),
            ("shop/checkout", "managed"),
            ("shop/debug", "unmanaged"),
            ("shop/legacy", "invalid"),
            ("shop/web", "managed"),
        ]
    );
    let by_name = |name: &str| {
        plan["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        by_name("shop/debug")["reason"],
        "opted out with nodeport-firewall.io/enabled=false"
    );
    assert!(
        by_name("shop/legacy")["errors"][0]
            .as_str()
            .unwrap()
            .contains("\"10.0.0.0/33\" is not an IPv4/IPv6 address or CIDR")
    );
    assert_eq!(
        by_name("games/game")["pools"],
        serde_json::json!(["batch", "edge"])
    );
    assert!(
        by_name("monitoring/metrics")["warnings"][0]
            .as_str()
            .unwrap()
            .contains("has host bits set")
    );

    assert_eq!(
        plan["summary"],
        serde_json::json!({
            "add": 11, "remove": 0, "update": 0, "unchanged": 0,
            "keep": 0, "satisfiedByForeign": 0, "errors": 0
        })
    );
}

// ---------------------------------------------------------------------------------------
// apply and re-plan, with a state file

#[test]
fn apply_then_plan_is_empty_and_removing_a_service_removes_exactly_its_rules() {
    let dir = Scratch::new();
    let state = dir.path("state.json");
    let st = s(&state);

    Cli::new()
        .apply(&demo(&["--yes", "--state", &st]))
        .expect_exit(0)
        .stdout_has(&[
            "memory:batch: 2 added, 0 changed, 0 removed",
            "memory:edge: 5 added, 0 changed, 0 removed",
            "memory:web: 4 added, 0 changed, 0 removed",
            "Apply complete: 11 added, 0 changed, 0 removed.",
        ]);
    Cli::new()
        .plan(&demo(&["--state", &st]))
        .expect_exit(0)
        .stdout_has(&["Plan: 0 to add, 0 to remove, 11 unchanged."])
        .stdout_lacks(&["\n  + ", "\n  - ", "\n  ~ "]);
    Cli::new()
        .apply(&demo(&["--yes", "--state", &st]))
        .expect_exit(0)
        .stdout_has(&["No changes to apply."]);

    // Without infra/dns: exactly its two rules go, nothing else moves.
    let services = dir.write(
        "services.yaml",
        &docs(&without_service(&example_services(), "dns")),
    );
    let args = demo_with_services(&services, &["--state", &st]);
    let run = Cli::new().plan(&args).expect_exit(2);
    assert_eq!(
        run.lines_starting("- ")
            .iter()
            .map(|l| l.split("  (").next().unwrap().to_string())
            .collect::<Vec<_>>(),
        [
            "- tcp 30053 from 198.51.100.0/24  [infra/dns]",
            "- udp 30053 from 198.51.100.0/24  [infra/dns]",
        ]
    );
    assert!(run.lines_starting("+ ").is_empty(), "{}", run.stdout);
    assert!(run.lines_starting("~ ").is_empty(), "{}", run.stdout);
    run.stdout_has(&["Plan: 0 to add, 2 to remove, 9 unchanged."]);
    let json = Cli::new()
        .plan(&[&args[..], &["-o".into(), "json".into()]].concat())
        .expect_exit(2)
        .json();
    let removed = changes(&json, "remove");
    assert_eq!(removed.len(), 2);
    for (target, rule) in &removed {
        assert_eq!(target, "edge");
        assert_eq!(services_of(rule), ["infra/dns"]);
    }

    Cli::new()
        .apply(&[&args[..], &["--yes".into()]].concat())
        .expect_exit(0)
        .stdout_has(&["memory:edge: 0 added, 0 changed, 2 removed"]);
    Cli::new()
        .plan(&args)
        .expect_exit(0)
        .stdout_has(&["Plan: 0 to add, 0 to remove, 9 unchanged."]);
}

#[test]
fn removing_a_service_that_shares_a_rule_narrows_the_rule() {
    let dir = Scratch::new();
    let st = s(&dir.path("state.json"));
    Cli::new()
        .apply(&demo(&["--yes", "--state", &st]))
        .expect_exit(0);
    let services = dir.write(
        "services.yaml",
        &docs(&without_service(&example_services(), "checkout")),
    );
    let args = demo_with_services(&services, &["--state", &st]);
    let run = Cli::new().plan(&args).expect_exit(2).stdout_has(&[
        "~ tcp 30080-30081 from 203.0.113.0/24  [shop/web]",
        "was: tcp 30080-30081,30090 from 203.0.113.0/24  [shop/checkout,shop/web]",
        "~ tcp 30080-30081 from 2001:db8:100::/48  [shop/web]",
        "Plan: 0 to add, 2 to change, 0 to remove, 9 unchanged.",
    ]);
    assert!(run.lines_starting("- ").is_empty(), "{}", run.stdout);
    Cli::new()
        .apply(&[&args[..], &["--yes".into()]].concat())
        .expect_exit(0)
        .stdout_has(&["memory:web: 0 added, 2 changed, 0 removed"]);
    Cli::new().plan(&args).expect_exit(0);
}

#[test]
fn an_invalid_annotation_keeps_the_services_existing_rules() {
    let dir = Scratch::new();
    let st = s(&dir.path("state.json"));
    Cli::new()
        .apply(&demo(&["--yes", "--state", &st]))
        .expect_exit(0);
    let before = dir.read("state.json").unwrap();

    // infra/dns now has a bad allowlist; its rules stay exactly as they are.
    let broken: Vec<String> = example_services()
        .into_iter()
        .map(|d| d.replace("\"198.51.100.0/24\"", "\"198.51.100.0/24, nope\""))
        .collect();
    let services = dir.write("services.yaml", &docs(&broken));
    let args = demo_with_services(&services, &["--state", &st]);
    let run = Cli::new().plan(&args).expect_exit(0);
    let kept = run.lines_starting("! tcp ");
    let kept_udp = run.lines_starting("! udp ");
    assert_eq!(kept.len() + kept_udp.len(), 2, "{}", run.stdout);
    for l in kept.iter().chain(&kept_udp) {
        assert!(l.contains("30053 from 198.51.100.0/24  [infra/dns]"), "{l}");
        assert!(
            l.ends_with("-- kept: infra/dns has invalid annotations"),
            "{l}"
        );
    }
    let run = run.stdout_has(&[
        "! infra/dns: nodeport-firewall.io/allowed-source-ranges: \"nope\" is not an IPv4/IPv6 address or CIDR",
        "(its existing rules are kept as they are)",
        "Plan: 0 to add, 0 to remove, 9 unchanged, 2 kept.",
    ]);
    assert!(run.lines_starting("- ").is_empty(), "{}", run.stdout);
    let json = Cli::new()
        .plan(&[&args[..], &["-o".into(), "json".into()]].concat())
        .expect_exit(0)
        .json();
    assert_eq!(json["summary"]["keep"], 2);
    assert_eq!(json["summary"]["remove"], 0);
    for (_, rule) in changes(&json, "keep") {
        assert_eq!(services_of(&rule), ["infra/dns"]);
    }

    // apply changes nothing.
    Cli::new()
        .apply(&[&args[..], &["--yes".into()]].concat())
        .expect_exit(0)
        .stdout_has(&["No changes to apply."]);
    assert_eq!(dir.read("state.json").unwrap(), before);
}

#[test]
fn apply_without_yes_and_without_a_terminal_refuses_and_writes_nothing() {
    let dir = Scratch::new();
    let st = s(&dir.path("state.json"));
    Cli::new()
        .apply(&demo(&["--state", &st]))
        .expect_exit(1)
        .stderr_has(&["apply needs confirmation: run it on a terminal, or pass --yes"]);
    assert_eq!(dir.read("state.json"), None, "no state written");

    // With an existing state file, it stays byte for byte.
    let services = dir.write(
        "services.yaml",
        &docs(&without_service(&example_services(), "game")),
    );
    Cli::new()
        .apply(&demo_with_services(&services, &["--yes", "--state", &st]))
        .expect_exit(0);
    let before = dir.read("state.json").unwrap();
    Cli::new()
        .apply(&demo(&["--state", &st]))
        .expect_exit(1)
        .stderr_has(&["pass --yes"]);
    assert_eq!(dir.read("state.json").unwrap(), before);
}

// ---------------------------------------------------------------------------------------
// errors

#[test]
fn bad_inputs_fail_with_a_message_that_names_the_problem() {
    let dir = Scratch::new();
    let good_config = s(&examples().join("config.yaml"));
    let good_cluster = s(&examples().join("cluster"));
    let unknown = s(&dir.write(
        "unknown.yaml",
        "clusterName: x\nfoo: 1\npolicy:\n  allowWorldOpn: true\npools:\n  web:\n    managd: false\n",
    ));
    let no_name = s(&dir.write("no-name.yaml", "manageAllNodePortServices: true\n"));
    let world = s(&dir.write(
        "world.yaml",
        "clusterName: x\ndefaultSourceRanges: [0.0.0.0/0]\n",
    ));
    let memory_typo = s(&dir.write(
        "memory-typo.yaml",
        "clusterName: x\nmemory:\n  limitz: {}\n",
    ));
    let not_yaml = s(&dir.write(
        "broken.yaml",
        "kind: Service\nmetadata: {name: a}\n---\nkind: [\n",
    ));
    let bad_state = s(&dir.write("state.json", "{\"not\": \"a state\"}"));
    let missing = s(&dir.path("missing.yaml"));

    // (what, args, every needle stderr must contain)
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "unknown config keys",
            vec![
                "-f".into(),
                good_cluster.clone(),
                "--config".into(),
                unknown.clone(),
            ],
            vec![
                format!("config {unknown}"),
                "unknown keys: foo, policy.allowWorldOpn (did you mean allowWorldOpen?), pools.web.managd (did you mean managed?)".into(),
            ],
        ),
        (
            "no clusterName",
            vec![
                "-f".into(),
                good_cluster.clone(),
                "--config".into(),
                no_name,
            ],
            vec!["clusterName is required".into()],
        ),
        (
            "world-open default",
            vec!["-f".into(), good_cluster.clone(), "--config".into(), world],
            vec![
                "defaultSourceRanges: 0.0.0.0/0 covers all public ipv4 space: it opens the port to the whole Internet, which the operator policy refuses (policy.allowWorldOpen)".into(),
            ],
        ),
        (
            "unknown key in the memory section",
            vec![
                "-f".into(),
                good_cluster.clone(),
                "--config".into(),
                memory_typo,
            ],
            vec!["provider memory".into(), "limitz".into()],
        ),
        (
            "a manifest that is not YAML",
            vec![
                "-f".into(),
                not_yaml.clone(),
                "--config".into(),
                good_config.clone(),
            ],
            vec![format!("{not_yaml} (document 2)")],
        ),
        (
            "a missing manifest",
            vec![
                "-f".into(),
                missing.clone(),
                "--config".into(),
                good_config.clone(),
            ],
            vec![format!("cannot read {missing}")],
        ),
        (
            "a missing config",
            vec![
                "-f".into(),
                good_cluster.clone(),
                "--config".into(),
                missing.clone(),
            ],
            vec![format!("cannot read config {missing}")],
        ),
        (
            "gcp",
            [demo(&[]), vec!["--provider".into(), "gcp".into()]].concat(),
            vec!["provider gcp: gcp.project is required".into()],
        ),
        (
            "a state file that is not a state",
            [demo(&[]), vec!["--state".into(), bad_state.clone()]].concat(),
            vec![format!("{bad_state}: not a memory provider state")],
        ),
    ];
    for (what, args, needles) in cases {
        for sub in ["plan", "apply"] {
            let run = Cli::new().run(sub, &args);
            assert_eq!(run.code, Some(1), "{what} ({sub}): {run:#?}");
            assert!(
                run.stderr.starts_with("error: "),
                "{what} ({sub}): {run:#?}"
            );
            for n in &needles {
                assert!(
                    run.stderr.contains(n.as_str()),
                    "{what} ({sub}): want {n:?} in {run:#?}"
                );
            }
            assert!(
                run.stdout.is_empty(),
                "{what} ({sub}): nothing planned: {run:#?}"
            );
        }
    }
}

#[test]
fn a_service_without_ports_is_fine() {
    let dir = Scratch::new();
    let manifests = dir.write(
        "m.yaml",
        &docs(&[
            node("n1", Some("web")),
            svc("default", "empty").ranges("10.0.0.0/8").to_yaml(),
        ]),
    );
    let config = dir.write("c.yaml", "clusterName: t\n");
    let run = Cli::new()
        .plan(&["-f", &s(&manifests), "--config", &s(&config)])
        .expect_exit(0)
        .stdout_has(&[
            "default/empty: no node ports to open",
            "Plan: 0 to add, 0 to remove, 0 unchanged.",
        ]);
    assert_eq!(
        run.section("memory:web"),
        [
            "memory:web (pools: web; rules after: 0 of ours + 0 others / limit 100, headroom 100)",
            "(no rules)"
        ]
    );
}

// ---------------------------------------------------------------------------------------
// quota

/// One pool, three Services with different allowlists: three rules.
fn three_rules(dir: &Scratch) -> PathBuf {
    dir.write(
        "m.yaml",
        &docs(&[
            node("n1", Some("web")),
            svc("a", "one").tcp(30001).ranges("10.1.0.0/16").to_yaml(),
            svc("a", "two").tcp(30002).ranges("10.2.0.0/16").to_yaml(),
            svc("a", "three").tcp(30003).ranges("10.3.0.0/16").to_yaml(),
        ]),
    )
}

#[test]
fn an_exceeded_rule_quota_is_a_plan_error_and_apply_writes_nothing() {
    let dir = Scratch::new();
    let m = s(&three_rules(&dir));
    let config = s(&dir.write(
        "c.yaml",
        "clusterName: q\nmemory:\n  limits: {maxRules: 2, maxPortsPerRule: 50, maxSourcesPerRule: 64}\n",
    ));
    let st = s(&dir.path("state.json"));
    let args = ["-f", &m, "--config", &config, "--state", &st];

    Cli::new().plan(&args).expect_exit(1).stdout_has(&[
        "ERROR: rule quota exceeded: 3 rules of ours + 0 of others = 3 rules, limit 2; nothing will be written to this target",
        "1 error(s): the targets concerned will not be changed.",
    ]);
    let json = Cli::new()
        .plan(&[&args[..], &["-o", "json"]].concat())
        .expect_exit(1)
        .json();
    assert_eq!(
        json["targets"][0]["error"],
        serde_json::json!({"kind": "ruleQuota", "ours": 3, "foreign": 0, "limit": 2})
    );
    assert_eq!(json["summary"]["errors"], 1);

    // apply shows the same error, says the target is not applied, and exits 1.
    Cli::new()
        .apply(&[&args[..], &["--yes"]].concat())
        .expect_exit(1)
        .stdout_has(&[
            "ERROR: rule quota exceeded: 3 rules of ours",
            "memory:web: not applied: rule quota exceeded",
        ])
        .stdout_lacks(&[
            "memory:web: 3 added",
            "Apply complete: 3 added",
            "No changes to apply.",
        ]);
    if let Some(state) = dir.read("state.json") {
        let state: Value = serde_json::from_str(&state).unwrap();
        let rules: usize = state["targets"]
            .as_object()
            .unwrap()
            .values()
            .map(|r| r.as_array().unwrap().len())
            .sum();
        assert_eq!(rules, 0, "no rule written: {state}");
    }
    // Within the quota, the same manifests apply.
    let roomy = s(&dir.write(
        "roomy.yaml",
        "clusterName: q\nmemory:\n  limits: {maxRules: 3, maxPortsPerRule: 50, maxSourcesPerRule: 64}\n",
    ));
    Cli::new()
        .apply(&["-f", &m, "--config", &roomy, "--state", &st, "--yes"])
        .expect_exit(0)
        .stdout_has(&["memory:web: 3 added"]);
}

#[test]
fn a_quota_error_on_one_target_leaves_the_others_planned() {
    // The demo with room for 4 rules: edge (5 rules) fails, batch and web go ahead.
    let dir = Scratch::new();
    let config = std::fs::read_to_string(examples().join("config.yaml"))
        .unwrap()
        .replace("maxRules: 20", "maxRules: 4");
    let config = s(&dir.write("c.yaml", &config));
    let st = s(&dir.path("state.json"));
    let args = [
        "-f".to_string(),
        s(&examples().join("cluster")),
        "--config".into(),
        config,
        "--state".into(),
        st,
    ];
    let run = Cli::new().plan(&args).expect_exit(1);
    assert!(run.section("memory:edge")[1].starts_with("ERROR: rule quota exceeded: 5 rules"));
    assert!(
        !run.section("memory:web")
            .iter()
            .any(|l| l.starts_with("ERROR"))
    );
    Cli::new()
        .apply(&[&args[..], &["--yes".to_string()]].concat())
        .expect_exit(1)
        .stdout_has(&[
            "memory:batch: 2 added",
            "memory:edge: not applied: rule quota exceeded",
            "memory:web: 4 added",
        ]);
    let state: Value = serde_json::from_str(&dir.read("state.json").unwrap()).unwrap();
    assert!(state["targets"].get("edge").is_none(), "{state}");
}

// ---------------------------------------------------------------------------------------
// input formats

#[test]
fn manifests_are_read_from_directories_lists_multi_documents_and_json() {
    let dir = Scratch::new();
    let config = s(&dir.write("config.yaml", "clusterName: formats\n"));
    let n1 = node("n1", Some("web"));
    let n2 = node("n2", Some("edge"));
    let a = svc("x", "a").tcp(30001).ranges("10.0.0.0/8");
    let b = svc("x", "b")
        .port("dns", "UDP", 53, 30053)
        .ranges("2001:db8::/32");
    let all = docs(&[n1.clone(), n2.clone(), a.to_yaml(), b.to_yaml()]);
    let reference = dir.write("ref/all.yaml", &all);

    let plan_of = |paths: &[&Path]| -> Run {
        let mut args: Vec<String> = Vec::new();
        for p in paths {
            args.push("-f".into());
            args.push(s(p));
        }
        args.extend([
            "--config".into(),
            config.clone(),
            "-o".into(),
            "json".into(),
        ]);
        Cli::new().plan(&args).expect_exit(2)
    };
    let want = plan_of(&[&reference]).json();
    assert_eq!(want["summary"]["add"], 4, "{want}");
    assert_eq!(want["services"].as_array().unwrap().len(), 2);

    // A directory, recursively, skipping files that are not .yaml/.yml/.json.
    dir.write("tree/nodes/n1.yaml", &n1);
    dir.write("tree/nodes/deeper/n2.yml", &n2);
    dir.write("tree/svc/a.yaml", &a.to_yaml());
    dir.write("tree/svc/b.yaml", &b.to_yaml());
    dir.write("tree/README.md", "not: [a manifest\n");
    // Several -f flags.
    let f1 = dir.write("flags/nodes.yaml", &docs(&[n1.clone(), n2.clone()]));
    let f2 = dir.write("flags/a.yaml", &a.to_yaml());
    let f3 = dir.write("flags/b.yaml", &b.to_yaml());
    // `kubectl get -o yaml` lists, nested, with objects of other kinds mixed in.
    let obj = |yaml: &str| -> Value { yaml_serde::from_str(yaml).unwrap() };
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            obj(&n1),
            obj(&n2),
            {"apiVersion": "v1", "kind": "ServiceList", "items": [obj(&a.to_yaml()), obj(&b.to_yaml())]},
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
        ],
    });
    let list_yaml = yaml_serde::to_string(&list).unwrap();
    assert!(list_yaml.contains("kind: List"), "{list_yaml}");
    let list = dir.write("list.yaml", &list_yaml);
    // JSON, as `kubectl get -o json` writes it.
    let json = dir.write(
        "all.json",
        &serde_json::to_string_pretty(&list_json(&[&n1, &n2, &a.to_yaml(), &b.to_yaml()])).unwrap(),
    );
    // Multi-document with empty documents and comments.
    let multi = dir.write(
        "multi.yaml",
        &format!(
            "# comment\n---\n{}---\n---\n{}",
            docs(&[n1.clone(), a.to_yaml()]),
            docs(&[n2.clone(), b.to_yaml()])
        ),
    );

    let cases: Vec<(&str, Vec<PathBuf>)> = vec![
        ("a directory, recursively", vec![dir.path("tree")]),
        ("several -f", vec![f1, f2, f3]),
        ("kind: List", vec![list]),
        ("a JSON file", vec![json]),
        ("multi-document", vec![multi]),
    ];
    for (what, paths) in cases {
        let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let got = plan_of(&paths).json();
        assert_eq!(got["services"], want["services"], "{what}");
        assert_eq!(got["pools"], want["pools"], "{what}");
        assert_eq!(got["targets"], want["targets"], "{what}");
        assert_eq!(got["summary"], want["summary"], "{what}");
    }
}

/// A `kind: List` of the objects given as YAML, as JSON.
fn list_json(objects: &[&str]) -> Value {
    let items: Vec<Value> = objects
        .iter()
        .map(|y| yaml_serde::from_str(y).unwrap())
        .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
}

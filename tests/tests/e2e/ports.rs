//! `nodeport-firewall ports`: the port register over the bundled example and the memory
//! provider's state, with a Service open by a foreign rule, one closed by the policy, one
//! invalid and one unmanaged; and the committed register (docs/examples/ports.md) is current.

use serde_json::{Value, json};

use crate::cli::{Cli, Scratch, examples};

fn config() -> String {
    examples().join("config.yaml").display().to_string()
}

fn cluster() -> String {
    examples().join("cluster").display().to_string()
}

#[test]
fn the_committed_register_of_the_example_is_current() {
    let out = Cli::new()
        .run(
            "ports",
            &["-f", &cluster(), "--config", &config(), "-o", "markdown"],
        )
        .expect_exit(0);
    let path = examples().join("../docs/examples/ports.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == out.stdout,
        "docs/examples/ports.md is not current; regenerate it:\n  nodeport-firewall ports -f examples/cluster --config examples/config.yaml -o markdown > docs/examples/ports.md\n--- now:\n{}",
        out.stdout
    );
}

fn row<'a>(register: &'a Value, service: &str, node_port: u64) -> &'a Value {
    register["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == service && r["nodePort"] == node_port)
        .unwrap_or_else(|| panic!("no row {service} {node_port}: {register:#}"))
}

#[test]
fn ports_say_where_each_node_port_is_open_and_what_is_wrong() {
    let dir = Scratch::new();
    let state = dir.path("state.json");
    let state_arg = state.display().to_string();
    // A Service the floor closes (world-open), beside the example.
    let open = dir.write(
        "open.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: open\n  namespace: shop\n  annotations:\n    nodeport-firewall.io/enabled: \"true\"\n    nodeport-firewall.io/allowed-source-ranges: 0.0.0.0/0\nspec:\n  type: NodePort\n  ports:\n  - {name: http, protocol: TCP, port: 80, nodePort: 30700}\n",
    );
    let files = format!("{},{}", cluster(), open.display());
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["-f", &files, "--config", &config(), "--state", &state_arg]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    Cli::new().apply(&args(&["--yes"])).expect_exit(0);
    // Someone opens shop/debug's node port by hand, and leaves a rule of ours behind.
    let mut st: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let web = st["targets"]["web"].as_array_mut().unwrap();
    web.push(
        json!({"id": "hand-1", "owner": null, "family": "ipv4", "protocol": "tcp",
        "ports": [{"from": 30600, "to": 30600}], "sources": ["192.0.2.0/24"],
        "services": [], "pools": []}),
    );
    web.push(
        json!({"id": "left-1", "owner": "demo", "family": "ipv4", "protocol": "udp",
        "ports": [{"from": 31999, "to": 31999}], "sources": ["192.0.2.0/24"],
        "services": ["gone/away"], "pools": ["web"]}),
    );
    std::fs::write(&state, st.to_string()).unwrap();

    let register = Cli::new()
        .run("ports", &args(&["-o", "json"]))
        .expect_exit(0)
        .json();
    assert_eq!(register["formatVersion"], 1);
    let web = row(&register, "shop/web", 30080);
    assert_eq!(web["status"], "managed");
    assert_eq!(web["open"][0]["ours"], true, "{web:#}");
    assert_eq!(web["open"][0]["target"], "memory:web");
    let debug = row(&register, "shop/debug", 30600);
    assert_eq!(debug["status"], "unmanaged");
    assert_eq!(
        debug["open"],
        json!([{"target": "memory:web", "rule": "hand-1", "ours": false}])
    );
    let legacy = row(&register, "shop/legacy", 30500);
    assert_eq!(legacy["status"], "invalid");
    assert!(
        legacy["reason"].as_str().unwrap().contains("10.0.0.0/33"),
        "{legacy:#}"
    );
    let closed = row(&register, "shop/open", 30700);
    assert_eq!(closed["status"], "closed", "{closed:#}");
    assert_eq!(closed["open"], json!([]));
    assert!(
        closed["problems"][0]
            .as_str()
            .unwrap()
            .contains("not open anywhere")
    );
    let scrape_only = row(&register, "monitoring/metrics", 31200);
    assert_eq!(scrape_only["status"], "unmanaged");
    assert_eq!(
        scrape_only["reason"],
        "not listed in nodeport-firewall.io/ports"
    );
    assert_eq!(
        register["orphans"],
        json!([{"target": "memory:web", "rule": "left-1", "protocol": "udp", "ports": "31999"}])
    );

    // The table says the same; --strict fails on the problems; --pool filters.
    let text = Cli::new().run("ports", &args(&[])).expect_exit(0);
    assert!(
        text.stdout.contains("foreign memory:web hand-1"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("rule left-1 on memory:web (udp 31999) is ours, but no Service claims it"),
        "{}",
        text.stdout
    );
    Cli::new().run("ports", &args(&["--strict"])).expect_exit(1);
    let edge = Cli::new()
        .run("ports", &args(&["--pool", "edge", "-o", "json"]))
        .expect_exit(0)
        .json();
    for r in edge["ports"].as_array().unwrap() {
        assert!(
            r["pools"].as_array().unwrap().iter().any(|p| p == "edge"),
            "{r:#}"
        );
    }
}

#[test]
fn explain_says_what_is_in_place_and_what_blocks_a_service() {
    let dir = Scratch::new();
    let state = dir.path("state.json").display().to_string();
    let open = dir.write(
        "open.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: open\n  namespace: shop\n  annotations:\n    nodeport-firewall.io/enabled: \"true\"\n    nodeport-firewall.io/allowed-source-ranges: 0.0.0.0/0\nspec:\n  type: NodePort\n  ports:\n  - {name: http, protocol: TCP, port: 80, nodePort: 30700}\n",
    );
    let files = format!("{},{}", cluster(), open.display());
    let config = config();
    let explain = |service: &str| {
        Cli::new().run(
            "explain",
            &[
                service, "-f", &files, "--config", &config, "--state", &state,
            ],
        )
    };
    // Before apply: asked for, not in place yet.
    explain("shop/web").expect_exit(2).stdout_has(&[
        "pool web -> memory:web",
        "not in place yet",
        "fix: run apply",
    ]);
    Cli::new()
        .apply(&[
            "-f", &files, "--config", &config, "--state", &state, "--yes",
        ])
        .expect_exit(0);
    explain("shop/web").expect_exit(0).stdout_has(&[
        "parsed: ports 30080/tcp, 30081/tcp",
        "30080/tcp: open by rule r-",
        "In place: every port is open as asked.",
    ]);
    explain("shop/legacy").expect_exit(2).stdout_has(&[
        "invalid annotation",
        "10.0.0.0/33",
        "fix: fix the annotation",
    ]);
    explain("shop/debug")
        .expect_exit(2)
        .stdout_has(&["not managed: opted out", "fix: annotate it"]);
    explain("shop/open")
        .expect_exit(2)
        .stdout_has(&["closed by the policy", "whole Internet"]);
    // Someone's rule allows exactly what ingress asks for on web: it is open, by them.
    let mut st: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    for r in st["targets"]["web"].as_array_mut().unwrap() {
        if r["services"] == json!(["ingress/ingress"]) {
            r["owner"] = Value::Null;
            r["id"] = json!("by-hand");
        }
    }
    std::fs::write(&state, st.to_string()).unwrap();
    explain("ingress/ingress").expect_exit(0).stdout_has(&[
        "32443/tcp: open by by-hand, a rule nodeport-firewall does not own",
        "In place",
    ]);
    let missing = explain("shop/nope").expect_exit(1);
    assert!(
        missing.stderr.contains("no Service shop/nope"),
        "{}",
        missing.stderr
    );
    explain("no-slash").expect_exit(1);
}

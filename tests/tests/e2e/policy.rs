//! The firewall policy end to end: the floor in the operator config, NodePortFirewallPolicy
//! objects read from manifests (`plan -f`) and watched by `run`, and violations that close.

use serde_json::{Value, json};

use crate::cli::{Cli, Scratch};
use crate::manifests::{docs, node, svc};
use crate::run::{Operator, eventually, state_rules};
use crate::{changes, s};
use nodeport_firewall_e2e::kube_api::{self, ApiServer};

const POLICY_TEAM_A: &str = "apiVersion: nodeport-firewall.io/v1alpha1
kind: NodePortFirewallPolicy
metadata:
  name: team-a
spec:
  namespaceSelector:
    matchLabels: {team: a}
  allowedSourceRanges: [10.0.0.0/8, 2001:db8::/32]
  nodePorts: [30000-30999]
";

const NAMESPACE_TEAM_A: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: team-a
  labels: {team: a}
";

fn args(dir: &Scratch, manifests: &[String], config: &str, extra: &[&str]) -> Vec<String> {
    let m = dir.write("manifests.yaml", &docs(manifests));
    let c = dir.write("config.yaml", config);
    let mut a = vec!["-f".into(), s(&m), "--config".into(), s(&c)];
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

#[test]
fn world_open_pieces_are_refused_by_default_with_a_message() {
    let dir = Scratch::new();
    let manifests = vec![
        node("n1", Some("web")),
        svc("shop", "v4")
            .tcp(30080)
            .ranges("0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3")
            .to_yaml(),
        svc("shop", "v6").tcp(30081).ranges("::/1").to_yaml(),
        svc("shop", "private")
            .tcp(30082)
            .ranges("10.0.0.0/8")
            .to_yaml(),
    ];
    let a = args(&dir, &manifests, "clusterName: e2e\n", &[]);
    let run = Cli::new().plan(&a).expect_exit(2).stdout_has(&[
        "! shop/v4: closed by the operator config (policy:): 0.0.0.0/1,128.0.0.0/2,192.0.0.0/3 covers all public ipv4 space: it opens the port to the whole Internet, which the operator policy refuses (policy.allowWorldOpen)",
        "! shop/v6: closed by the operator config (policy:): ::/1 covers all public ipv6 space",
        "(its rules are removed)",
        "Plan: 1 to add, 0 to remove, 0 unchanged.",
    ]);
    assert_eq!(run.lines_starting("+ ").len(), 1, "{}", run.stdout);
    assert!(run.lines_starting("+ ")[0].contains("10.0.0.0/8  [shop/private]"));
    let json = Cli::new()
        .plan(&[&a[..], &["-o".into(), "json".into()]].concat())
        .expect_exit(2)
        .json();
    let v4 = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "shop/v4")
        .unwrap();
    assert_eq!(v4["status"], "closed");
    assert_eq!(v4["policy"], "the operator config (policy:)");
}

#[test]
fn tightening_the_floor_removes_a_rule_it_allowed_before() {
    let dir = Scratch::new();
    let state = s(&dir.path("state.json"));
    let manifests = vec![
        node("n1", Some("web")),
        svc("shop", "open").tcp(30080).ranges("0.0.0.0/0").to_yaml(),
    ];
    let open = args(
        &dir,
        &manifests,
        "clusterName: e2e\npolicy:\n  allowWorldOpen: true\n",
        &["--state", &state],
    );
    Cli::new()
        .apply(&[&open[..], &["--yes".into()]].concat())
        .expect_exit(0);
    Cli::new().plan(&open).expect_exit(0);

    // allowWorldOpen goes back to false: the rule it allowed is closed, and the plan says why.
    let closed = args(&dir, &manifests, "clusterName: e2e\n", &["--state", &state]);
    let run = Cli::new().plan(&closed).expect_exit(2);
    let removes = run.lines_starting("- ");
    assert_eq!(removes.len(), 1, "{}", run.stdout);
    assert!(
        removes[0].contains("tcp 30080 from 0.0.0.0/0  [shop/open]")
            && removes[0].contains("-- closed: shop/open: 0.0.0.0/0 covers all public ipv4 space"),
        "{}",
        removes[0]
    );
    run.stdout_has(&["Plan: 0 to add, 1 to remove, 0 unchanged."]);
    let json = Cli::new()
        .plan(&[&closed[..], &["-o".into(), "json".into()]].concat())
        .expect_exit(2)
        .json();
    let removed = &json["targets"][0]["changes"][0];
    assert_eq!(removed["action"], "remove");
    assert!(
        removed["note"]
            .as_str()
            .unwrap()
            .starts_with("closed: shop/open:")
    );
    Cli::new()
        .apply(&[&closed[..], &["--yes".into()]].concat())
        .expect_exit(0);
    Cli::new().plan(&closed).expect_exit(0);
    let saved: Value = serde_json::from_str(&dir.read("state.json").unwrap()).unwrap();
    assert_eq!(saved["targets"]["web"], json!([]), "{saved}");
}

#[test]
fn offline_plan_decides_what_the_namespace_policies_would() {
    let dir = Scratch::new();
    let manifests = vec![
        node("n1", Some("web")),
        NAMESPACE_TEAM_A.to_string(),
        POLICY_TEAM_A.to_string(),
        svc("team-a", "inside")
            .tcp(30080)
            .ranges("10.1.0.0/16")
            .to_yaml(),
        svc("team-a", "outside")
            .tcp(30081)
            .ranges("192.168.0.0/16")
            .to_yaml(),
        svc("team-a", "high-port")
            .tcp(31000)
            .ranges("10.2.0.0/16")
            .to_yaml(),
        svc("team-b", "unselected")
            .tcp(30090)
            .ranges("10.3.0.0/16")
            .to_yaml(),
    ];
    let a = args(
        &dir,
        &manifests,
        "clusterName: e2e\npolicy:\n  requireNamespacePolicy: true\n",
        &["-v"],
    );
    let run = Cli::new().plan(&a).expect_exit(2).stdout_has(&[
        "! team-a/outside: closed by policy team-a: policy team-a: source 192.168.0.0/16 is outside allowedSourceRanges (10.0.0.0/8,2001:db8::/32) (its rules are removed)",
        "! team-a/high-port: closed by policy team-a: policy team-a: nodePort tcp/31000 is outside nodePorts (30000-30999)",
        "! team-b/unselected: closed by the operator config (policy.requireNamespacePolicy): no NodePortFirewallPolicy selects namespace team-b, and policy.requireNamespacePolicy is true",
        "Policies:",
        "  team-a: accepted, 1 Service(s) admitted, 2 refused",
        "Plan: 1 to add, 0 to remove, 0 unchanged.",
    ]);
    let adds = run.lines_starting("+ ");
    assert_eq!(adds.len(), 1, "{}", run.stdout);
    assert!(adds[0].contains("tcp 30080 from 10.1.0.0/16  [team-a/inside]"));
    let json = Cli::new()
        .plan(&[&a[..], &["-o".into(), "json".into()]].concat())
        .expect_exit(2)
        .json();
    assert_eq!(
        json["policies"],
        json!([{"name": "team-a", "accepted": true, "admitted": 1, "refused": 2}])
    );
    let inside = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "team-a/inside")
        .unwrap();
    assert_eq!(
        (&inside["status"], &inside["policy"]),
        (&json!("managed"), &json!("team-a"))
    );
    assert_eq!(changes(&json, "add").len(), 1);

    // Without the Namespace object its labels are unknown: the label selector cannot match
    // it. With requireNamespacePolicy that closes it, and says why; without, the plan does
    // not guess and keeps its rules as they are.
    let without_ns: Vec<String> = manifests
        .iter()
        .filter(|m| !m.contains("kind: Namespace"))
        .cloned()
        .collect();
    let strict = args(
        &dir,
        &without_ns,
        "clusterName: e2e\npolicy:\n  requireNamespacePolicy: true\n",
        &[],
    );
    Cli::new().plan(&strict).expect_exit(0).stdout_has(&[
        "! team-a/inside: closed by the operator config (policy.requireNamespacePolicy): no NodePortFirewallPolicy selects namespace team-a, and policy.requireNamespacePolicy is true (its Namespace object is not known, so only policies that select by name could)",
    ]);
    let lax = args(&dir, &without_ns, "clusterName: e2e\n", &[]);
    Cli::new().plan(&lax).expect_exit(0).stdout_has(&[
        "! team-a/inside: namespace team-a is not known (no Namespace object for it in the input), so the policies' namespaceSelectors cannot be matched",
    ]);
}

#[test]
fn an_invalid_policy_admits_nothing_and_is_named() {
    let dir = Scratch::new();
    let broken = POLICY_TEAM_A.replace("10.0.0.0/8", "10.0.0.0/33");
    let manifests = vec![
        node("n1", Some("web")),
        NAMESPACE_TEAM_A.to_string(),
        broken,
        svc("team-a", "inside")
            .tcp(30080)
            .ranges("10.1.0.0/16")
            .to_yaml(),
    ];
    let a = args(&dir, &manifests, "clusterName: e2e\n", &[]);
    Cli::new().plan(&a).expect_exit(0).stdout_has(&[
        "! team-a/inside: closed by policy team-a: policy team-a is invalid and admits nothing (allowedSourceRanges: \"10.0.0.0/33\" is not an IPv4/IPv6 address or CIDR",
        "! NodePortFirewallPolicy team-a is invalid and admits nothing: allowedSourceRanges:",
    ]);
}

/// `run`, the real binary, against the test API server: creating, tightening and deleting a
/// policy opens and closes exactly the Services it should, with events and status.
#[test]
fn run_follows_policies_as_they_are_created_tightened_and_deleted() {
    let api = ApiServer::spawn();
    api.put("Node", kube_api::node("n1", "a"), "ADDED");
    api.put(
        "Namespace",
        kube_api::namespace("team-a", json!({"team": "a"})),
        "ADDED",
    );
    let in_team_a = |name: &str, port: u16, ranges: &str| {
        let mut v = kube_api::service(name, port, ranges);
        v["metadata"]["namespace"] = json!("team-a");
        v
    };
    api.put("Service", in_team_a("web", 30080, "10.1.0.0/16"), "ADDED");
    api.put("Service", in_team_a("db", 30081, "10.9.0.0/16"), "ADDED");
    let dir = Scratch::new();
    let config = dir.write(
        "config.yaml",
        "clusterName: e2e\npoolLabels: [pool]\npolicy:\n  requireNamespacePolicy: true\n",
    );
    let state = dir.path("state.json");
    let op = Operator::start_memory(&api, &dir, "one", &config, &state);
    let rules = || state_rules(&state, "a");
    let violation = |name: &str, text: &str| {
        api.events().iter().any(|e| {
            e["regarding"]["name"] == name
                && e["reason"] == "PolicyViolation"
                && e["type"] == "Warning"
                && e["note"].as_str().unwrap_or_default().contains(text)
        })
    };
    eventually("both closed for want of a policy", 30, &op, || {
        violation("web", "no NodePortFirewallPolicy selects namespace team-a")
            && violation("db", "no NodePortFirewallPolicy selects namespace team-a")
    });
    assert!(rules().is_empty());

    let spec = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "allowedSourceRanges": ["10.0.0.0/8"]});
    api.put(
        "NodePortFirewallPolicy",
        kube_api::policy("team-a", spec),
        "ADDED",
    );
    eventually("both open", 30, &op, || rules().len() == 2);
    eventually("status: 2 admitted", 30, &op, || {
        api.get("NodePortFirewallPolicy", "team-a")
            .is_some_and(|p| p["status"]["admittedServices"] == 2)
    });

    // Tightened to web's range only: db's rule goes; web's stays.
    let spec = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "allowedSourceRanges": ["10.1.0.0/16"]});
    api.put(
        "NodePortFirewallPolicy",
        kube_api::policy("team-a", spec),
        "MODIFIED",
    );
    eventually("db closed", 30, &op, || rules().len() == 1);
    assert!(rules()[0].contains("10.1.0.0/16"), "{:?}", rules());
    eventually("db told why", 30, &op, || {
        violation(
            "db",
            "closed by policy team-a: policy team-a: source 10.9.0.0/16 is outside allowedSourceRanges (10.1.0.0/16)",
        )
    });
    eventually("status: 1 admitted, 1 refused", 30, &op, || {
        api.get("NodePortFirewallPolicy", "team-a")
            .is_some_and(|p| {
                p["status"]["admittedServices"] == 1 && p["status"]["refusedServices"] == 1
            })
    });
    assert!(
        api.status_patches().iter().any(|p| {
            let c = &p["status"]["conditions"][0];
            c["reason"] == "PolicyViolation" && c["status"] == "False"
        }),
        "a PolicyViolation condition was set"
    );

    api.put(
        "NodePortFirewallPolicy",
        kube_api::policy("team-a", json!({})),
        "DELETED",
    );
    eventually("both closed again", 30, &op, || rules().is_empty());
    assert!(op.stop().success());
}

/// The tightening scenario in `run`: a world-open Service opened under `allowWorldOpen: true`
/// is closed when the operator restarts with the default floor.
#[test]
fn run_closes_a_world_open_rule_when_the_floor_tightens() {
    let api = ApiServer::spawn();
    api.put("Node", kube_api::node("n1", "a"), "ADDED");
    api.put(
        "Service",
        kube_api::service("open", 30080, "0.0.0.0/0"),
        "ADDED",
    );
    let dir = Scratch::new();
    let state = dir.path("state.json");
    let rules = || state_rules(&state, "a").len();
    let start = |name: &str, config: &str| {
        let config = dir.write(&format!("{name}.yaml"), config);
        Operator::start_memory(&api, &dir, name, &config, &state)
    };
    let op = start(
        "open",
        "clusterName: e2e\npoolLabels: [pool]\npolicy:\n  allowWorldOpen: true\n",
    );
    eventually("the world-open rule", 30, &op, || rules() == 1);
    assert!(op.stop().success());
    let op = start("tight", "clusterName: e2e\npoolLabels: [pool]\n");
    eventually("the world-open rule removed", 30, &op, || rules() == 0);
    eventually("a PolicyViolation event", 30, &op, || {
        api.events().iter().any(|e| {
            e["reason"] == "PolicyViolation"
                && e["note"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("covers all public ipv4 space")
        })
    });
    assert!(op.stop().success());
}

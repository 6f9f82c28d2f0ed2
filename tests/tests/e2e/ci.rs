//! The CLI as CI uses it: exit codes, `--strict`, inputs read the way people write them, and
//! output a machine can rely on.

use serde_json::Value;

use crate::cli::{Cli, Scratch, examples};
use crate::manifests::{docs, node, svc};
use crate::{demo, s};

fn kinds(plan: &Value) -> Vec<String> {
    plan["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .map(|w| w["kind"].as_str().expect("kind").to_string())
        .collect()
}

#[test]
fn every_class_of_exit_code() {
    let ex = examples();
    let config = s(&ex.join("config.yaml"));
    let cluster = s(&ex.join("cluster"));
    let dir = Scratch::new();
    let state = s(&dir.path("state.json"));
    // (what, args, exit code)
    let cases: Vec<(&str, Vec<&str>, i32)> = vec![
        ("--help", vec!["--help"], 0),
        ("plan --help", vec!["plan", "--help"], 0),
        ("--version", vec!["--version"], 0),
        ("no subcommand", vec![], 1),
        ("a mistyped subcommand", vec!["plna"], 1),
        ("a missing --config", vec!["plan", "-f", &cluster], 1),
        (
            "an unknown output format",
            vec!["plan", "-f", &cluster, "--config", &config, "-o", "yaml"],
            1,
        ),
        (
            // What the shell makes of `-f manifests/*.yaml`.
            "an extra argument",
            vec!["plan", "-f", &cluster, "extra.yaml", "--config", &config],
            1,
        ),
        (
            "changes pending",
            vec!["plan", "-f", &cluster, "--config", &config],
            2,
        ),
        (
            "an error",
            vec!["plan", "-f", "/nonexistent", "--config", &config],
            1,
        ),
        (
            "check takes only its flags",
            vec!["check", "-f", &cluster, "--config", &config, "-v"],
            1,
        ),
    ];
    for (what, args, code) in cases {
        let (sub, rest) = match args.split_first() {
            Some((sub, rest)) => (*sub, rest.to_vec()),
            None => ("", Vec::new()),
        };
        let run = if sub.is_empty() {
            Cli::new().run("", &Vec::<&str>::new())
        } else {
            Cli::new().run(sub, &rest)
        };
        assert_eq!(run.code, Some(code), "{what}: {run:?}");
    }
    // No changes: 0.
    Cli::new()
        .apply(&demo(&["--yes", "--state", &state]))
        .expect_exit(0);
    Cli::new().plan(&demo(&["--state", &state])).expect_exit(0);
}

#[test]
fn strict_fails_on_any_warning_and_json_lists_them_by_kind() {
    // The bundled demo has an invalid annotation (on purpose) and a Node without a pool.
    Cli::new()
        .plan(&demo(&["--strict"]))
        .expect_exit(1)
        .stderr_has(&["error: --strict: the plan has"]);
    Cli::new()
        .env("NPF_STRICT", "true")
        .plan(&demo(&[]))
        .expect_exit(1);
    let json = Cli::new()
        .plan(&demo(&["-o", "json"]))
        .expect_exit(2)
        .json();
    let k = kinds(&json);
    assert!(k.contains(&"invalidAnnotation".to_string()), "{k:?}");
    assert!(k.contains(&"nodeWithoutPool".to_string()), "{k:?}");
    let w = &json["warnings"][0];
    assert!(w["subject"].is_string() && w["message"].is_string(), "{w}");

    // Without warnings, --strict changes nothing.
    let dir = Scratch::new();
    let m = dir.write(
        "m.yaml",
        &docs(&[
            node("n1", Some("web")),
            svc("shop", "web").tcp(30080).ranges("10.0.0.0/8").to_yaml(),
        ]),
    );
    let c = dir.write("c.yaml", "clusterName: e2e\n");
    // A pool label the kubelet can set is a warning, until the config says it is trusted.
    Cli::new()
        .plan(&["-f", &s(&m), "--config", &s(&c), "--strict"])
        .expect_exit(1)
        .stdout_has(&[
            "a kubelet can set",
            "node-restriction.kubernetes.io/nodeport-firewall-pool",
        ]);
    let c = dir.write("c.yaml", "clusterName: e2e\ntrustNodePoolLabels: true\n");
    Cli::new()
        .plan(&["-f", &s(&m), "--config", &s(&c), "--strict"])
        .expect_exit(2);
}

#[test]
fn services_without_nodes_warn_and_fail_under_strict() {
    let dir = Scratch::new();
    let m = dir.write(
        "m.yaml",
        &svc("shop", "web").tcp(30080).ranges("10.0.0.0/8").to_yaml(),
    );
    let c = dir.write("c.yaml", "clusterName: e2e\n");
    let args = ["-f", &s(&m), "--config", &s(&c)];
    Cli::new()
        .plan(&args)
        .expect_exit(0)
        .stdout_has(&["the input has 1 Service(s) but no Nodes"]);
    Cli::new()
        .plan(&[&args[..], &["--strict"]].concat())
        .expect_exit(1);
    let json = Cli::new()
        .plan(&[&args[..], &["-o", "json"]].concat())
        .expect_exit(0)
        .json();
    assert!(kinds(&json).contains(&"noNodes".to_string()), "{json}");
    // An empty directory: nothing was checked, and the plan says so.
    let empty = dir.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    Cli::new()
        .plan(&["-f", &s(&empty), "--config", &s(&c)])
        .expect_exit(0)
        .stdout_has(&["the input has no Services and no Nodes: nothing was checked"]);
    Cli::new()
        .plan(&["-f", &s(&empty), "--config", &s(&c), "--strict"])
        .expect_exit(1);
}

#[test]
fn inputs_are_read_the_way_kubectl_reads_them() {
    let dir = Scratch::new();
    let nodes = dir.write("nodes.yaml", &node("n1", Some("web")));
    let web = svc("shop", "web").tcp(30080).ranges("10.0.0.0/8").to_yaml();
    let services = dir.write("services.yaml", &web);
    let c = s(&dir.write("c.yaml", "clusterName: e2e\n"));

    // -f a,b and -f - (standard input).
    let list = format!("{},{}", s(&nodes), s(&services));
    Cli::new()
        .plan(&["-f", &list, "--config", &c])
        .expect_exit(2)
        .stdout_has(&["[shop/web]"]);
    Cli::new()
        .stdin(&web)
        .plan(&["-f", &s(&nodes), "-f", "-", "--config", &c])
        .expect_exit(2)
        .stdout_has(&["[shop/web]"]);

    // A directory with a dot-directory, a Helm values file and the same Service twice.
    let tree = dir.path("tree");
    std::fs::create_dir_all(tree.join(".git")).unwrap();
    std::fs::create_dir_all(tree.join("chart")).unwrap();
    std::fs::write(tree.join(".git/config.yaml"), "kind: [\n").unwrap();
    std::fs::write(tree.join("chart/values.yaml"), "replicaCount: 2\n").unwrap();
    std::fs::write(tree.join("a.yaml"), &web).unwrap();
    std::fs::write(tree.join("b.yaml"), &web).unwrap();
    let run = Cli::new()
        .plan(&["-f", &s(&nodes), "-f", &s(&tree), "--config", &c])
        .expect_exit(2)
        .stdout_has(&[
            "chart/values.yaml (document 1): skipped: no kind: not a Kubernetes object",
            "Plan: 1 to add",
        ]);
    assert!(
        !run.stdout.contains("also claimed"),
        "the same Service twice is one Service: {}",
        run.stdout
    );

    // The same object with different content: which one is meant?
    let other = svc("shop", "web")
        .tcp(30080)
        .ranges("192.168.0.0/16")
        .to_yaml();
    std::fs::write(tree.join("b.yaml"), other).unwrap();
    Cli::new()
        .plan(&["-f", &s(&nodes), "-f", &s(&tree), "--config", &c])
        .expect_exit(1)
        .stderr_has(&[
            "Service shop/web is given twice with different content",
            "a.yaml (document 1)",
        ]);
}

#[test]
fn typos_and_unquoted_booleans_are_named() {
    let dir = Scratch::new();
    let nodes = node("n1", Some("web"));
    let c = s(&dir.write("c.yaml", "clusterName: e2e\n"));
    // A typo on a Service that is not opted in: an error, with a did-you-mean.
    let typo = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  annotations:\n    nodeport-firewall.io/Enabled: \"true\"\nspec:\n  type: NodePort\n  ports: [{port: 80, nodePort: 30080}]\n";
    let m = dir.write("typo.yaml", &docs(&[nodes.clone(), typo.to_string()]));
    Cli::new()
        .plan(&["-f", &s(&m), "--config", &c])
        .expect_exit(0)
        .stdout_has(&[
            "shop/web: unknown annotation nodeport-firewall.io/Enabled; did you mean nodeport-firewall.io/enabled?",
        ]);
    // enabled: true without quotes.
    let unquoted = typo.replace(
        "nodeport-firewall.io/Enabled: \"true\"",
        "nodeport-firewall.io/enabled: true",
    );
    let m = dir.write("unquoted.yaml", &docs(&[nodes.clone(), unquoted]));
    Cli::new()
        .plan(&["-f", &s(&m), "--config", &c])
        .expect_exit(1)
        .stderr_has(&[
            "Service shop/web: annotation nodeport-firewall.io/enabled: true is not a string; quote it (nodeport-firewall.io/enabled: \"true\")",
        ]);
    // A pool name in the wrong case, and a nodePort outside the node-port range.
    let m = dir.write(
        "pools.yaml",
        &docs(&[
            nodes,
            svc("shop", "web")
                .tcp(8080)
                .ranges("10.0.0.0/8")
                .ann("node-pools", "Web")
                .to_yaml(),
        ]),
    );
    Cli::new()
        .plan(&["-f", &s(&m), "--config", &c])
        .expect_exit(0)
        .stdout_has(&[
            "pool Web has no nodes and is not in the config; did you mean web?",
            "nodePort 8080 is outside the cluster's node-port range 30000-32767",
        ]);
    // A config key in the wrong case, and every config problem at once.
    let bad = s(&dir.write(
        "bad.yaml",
        "clusterName: 'has space'\nmanageallNodePortServices: true\npoolLabels: []\n",
    ));
    Cli::new()
        .plan(&["-f", &s(&m), "--config", &bad])
        .expect_exit(1)
        .stderr_has(&[
            "unknown keys: manageallNodePortServices (did you mean manageAllNodePortServices?)",
            "clusterName \"has space\" must be",
            "poolLabels must name at least one label",
        ]);
}

#[test]
fn apply_and_check_print_one_json_document() {
    let dir = Scratch::new();
    let state = s(&dir.path("state.json"));
    let run = Cli::new()
        .apply(&demo(&["--yes", "--state", &state, "-o", "json"]))
        .expect_exit(0);
    let doc: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("one JSON document: {e}\n{}", run.stdout));
    assert_eq!(doc["plan"]["summary"]["add"], 11);
    let applied = doc["applied"].as_array().unwrap();
    assert_eq!(applied.len(), 3, "{doc}");
    let added: u64 = applied
        .iter()
        .map(|a| a["result"]["report"]["added"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(added, 11);
    // Nothing to apply: still one document.
    let run = Cli::new()
        .apply(&demo(&["--yes", "--state", &state, "-o", "json"]))
        .expect_exit(0);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["applied"], serde_json::json!([]));

    let ex = examples();
    let run = Cli::new()
        .run(
            "check",
            &[
                "-f",
                &s(&ex.join("cluster")),
                "--config",
                &s(&ex.join("config.yaml")),
                "-o",
                "json",
            ],
        )
        .expect_exit(0);
    let doc: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("check -o json: {e}\n{}", run.stdout));
    assert_eq!(doc["ok"], true);
    assert!(!doc["checks"].as_array().unwrap().is_empty());
}

#[test]
fn a_saved_plan_is_applied_exactly_and_refused_once_anything_changed() {
    let dir = Scratch::new();
    let state = s(&dir.path("state.json"));
    let saved = s(&dir.path("p.json"));
    let config = s(&examples().join("config.yaml"));
    Cli::new()
        .run("plan", &demo(&["--state", &state, "--out", &saved]))
        .expect_exit(2);
    let file: Value = serde_json::from_str(&dir.read("p.json").unwrap()).unwrap();
    assert_eq!(file["kind"], "NodePortFirewallSavedPlan");
    assert_eq!(file["version"], 1);
    assert!(file["config"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(file["observations"].as_object().unwrap().len(), 3);

    // apply FILE takes no -f, and applies exactly the saved plan.
    Cli::new()
        .apply(&[
            &saved, "--config", &config, "--state", &state, "--yes", "-f", "x.yaml",
        ])
        .expect_exit(1)
        .stderr_has(&["apply SAVED_PLAN takes no -f"]);
    Cli::new()
        .apply(&[&saved, "--config", &config, "--state", &state, "--yes"])
        .expect_exit(0)
        .stdout_has(&["Apply complete: 11 added, 0 changed, 0 removed."]);
    Cli::new().plan(&demo(&["--state", &state])).expect_exit(0);

    // A plan made, then one rule changed behind it: the saved plan is refused, nothing is
    // written.
    let shop = crate::manifests::example_services()
        .into_iter()
        .filter(|d| !d.contains("\n  name: web\n"))
        .collect::<Vec<_>>();
    let services = dir.write("services.yaml", &docs(&shop));
    let args = crate::demo_with_services(&services, &["--state", &state, "--out", &saved]);
    Cli::new().run("plan", &args).expect_exit(2);
    let before = std::fs::read_to_string(&state).unwrap();
    let mut cloud: Value = serde_json::from_str(&before).unwrap();
    cloud["targets"]["web"].as_array_mut().unwrap().pop();
    let changed = cloud.to_string();
    std::fs::write(&state, &changed).unwrap();
    Cli::new()
        .apply(&[&saved, "--config", &config, "--state", &state, "--yes"])
        .expect_exit(1)
        .stderr_has(&["memory:web changed since this plan was made; nothing was written"]);
    assert_eq!(std::fs::read_to_string(&state).unwrap(), changed);

    // A config changed since: refused too.
    std::fs::write(&state, &before).unwrap();
    let other = dir.write(
        "config.yaml",
        &(std::fs::read_to_string(&config).unwrap() + "\n# edited\n"),
    );
    Cli::new()
        .apply(&[&saved, "--config", &s(&other), "--state", &state, "--yes"])
        .expect_exit(1)
        .stderr_has(&["changed since this plan was made; nothing was written"]);
}

#[test]
fn missing_aws_credentials_are_one_line_that_says_how_to_fix_them() {
    let dir = Scratch::new();
    let home = dir.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let m = dir.write(
        "m.yaml",
        &docs(&[
            node("n1", Some("web")),
            svc("shop", "web").tcp(30080).ranges("10.0.0.0/8").to_yaml(),
        ]),
    );
    // The endpoint is a closed loopback port: nothing may leave this machine.
    let c = dir.write(
        "c.yaml",
        "clusterName: e2e\naws:\n  region: eu-west-1\n  endpointUrl: http://127.0.0.1:9\npools:\n  web:\n    aws: {securityGroupIds: [sg-0123456789abcdef0]}\n",
    );
    let run = Cli::new()
        .env("HOME", &home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", "")
        .env("AWS_SECRET_ACCESS_KEY", "")
        .env("AWS_PROFILE", "")
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", "")
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")
        .env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "")
        .plan(&["-f", &s(&m), "--config", &s(&c), "--provider", "aws"])
        .expect_exit(1)
        .stdout_has(&["no AWS credentials", "IRSA or EKS Pod Identity"]);
    assert!(
        !run.stderr.contains("WARN"),
        "no SDK warnings by default: {}",
        run.stderr
    );
}

#[test]
fn load_balancer_services_use_their_source_ranges_and_open_the_health_check_port() {
    let dir = Scratch::new();
    let lb = "apiVersion: v1\nkind: Service\nmetadata:\n  name: shop\n  namespace: web\n  annotations: {nodeport-firewall.io/enabled: \"true\"}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 31999\n  loadBalancerSourceRanges: [203.0.113.0/24]\n  ports: [{name: https, port: 443, nodePort: 30443}]\n";
    let m = dir.write("m.yaml", &docs(&[node("n1", Some("web")), lb.to_string()]));
    let plain = s(&dir.write("c.yaml", "clusterName: e2e\n"));
    let run = Cli::new()
        .plan(&["-f", &s(&m), "--config", &plain])
        .expect_exit(2)
        .stdout_has(&["+ tcp 30443 from 203.0.113.0/24  [web/shop]"]);
    assert!(!run.stdout.contains("31999"), "{}", run.stdout);
    let checks = s(&dir.write(
        "checks.yaml",
        "clusterName: e2e\nhealthCheckSourceRanges: [35.191.0.0/16, 130.211.0.0/22]\n",
    ));
    Cli::new()
        .plan(&["-f", &s(&m), "--config", &checks])
        .expect_exit(2)
        .stdout_has(&["+ tcp 31999 from 35.191.0.0/16,130.211.0.0/22  [web/shop]"]);
    let strict = s(&dir.write(
        "strict.yaml",
        "clusterName: e2e\nloadBalancerSourceRanges: requireMatch\n",
    ));
    let mismatched = lb.replace(
        "annotations: {nodeport-firewall.io/enabled: \"true\"}",
        "annotations: {nodeport-firewall.io/enabled: \"true\", nodeport-firewall.io/allowed-source-ranges: \"198.51.100.0/24\"}",
    );
    let m = dir.write("m2.yaml", &docs(&[node("n1", Some("web")), mismatched]));
    Cli::new()
        .plan(&["-f", &s(&m), "--config", &strict])
        .expect_exit(0)
        .stdout_has(&["differs from spec.loadBalancerSourceRanges 203.0.113.0/24"]);
}

//! `plan` without `-f` reads the cluster in the kubeconfig (here the test API server,
//! `nodeport_firewall_e2e::kube_api`): the same plan as `-f` over the same objects; `-f`
//! and the cluster never mix; a refused list names the missing permission in one line.

use std::path::PathBuf;

use nodeport_firewall_e2e::kube_api::ApiServer;
use serde_json::Value;

use crate::cli::{Cli, Scratch, examples};

/// The bundled example's objects, by kind.
fn example_objects(kind: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for file in ["nodes.yaml", "services.yaml"] {
        let text = std::fs::read_to_string(examples().join("cluster").join(file)).unwrap();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            let items = match value["kind"].as_str() {
                Some("List") => value["items"].as_array().cloned().unwrap_or_default(),
                Some(_) => vec![value],
                None => Vec::new(),
            };
            out.extend(items.into_iter().filter(|o| o["kind"] == kind));
        }
    }
    out
}

/// A test API server holding the bundled example, and a kubeconfig for it.
fn cluster(dir: &Scratch) -> (ApiServer, PathBuf) {
    let api = ApiServer::spawn();
    api.load("Node", example_objects("Node"));
    api.load("Service", example_objects("Service"));
    let kubeconfig = dir.path("kubeconfig");
    api.kubeconfig(&kubeconfig);
    (api, kubeconfig)
}

fn config() -> String {
    examples().join("config.yaml").display().to_string()
}

#[test]
fn plan_from_the_cluster_is_the_plan_from_manifests_of_the_same_objects() {
    let dir = Scratch::new();
    let (_api, kubeconfig) = cluster(&dir);
    assert!(!example_objects("Service").is_empty());
    let files = examples().join("cluster").display().to_string();
    for extra in [&[][..], &["-o", "json"][..]] {
        let mut from_files = vec!["-f", &files, "--config"];
        let config = config();
        from_files.push(&config);
        from_files.extend(extra);
        let offline = Cli::new().plan(&from_files).expect_exit(2);
        let kc = kubeconfig.display().to_string();
        let mut live = vec!["--kubeconfig", &kc, "--config", &config];
        live.extend(extra);
        let online = Cli::new().plan(&live).expect_exit(2);
        assert_eq!(online.stdout, offline.stdout);
    }
    // The KUBECONFIG environment variable and --context work as kubectl's do.
    let config = config();
    let by_env = Cli::new()
        .env("KUBECONFIG", &kubeconfig)
        .plan(&["--context", "test", "--config", &config])
        .expect_exit(2);
    assert!(by_env.stdout.contains("Plan: "), "{}", by_env.stdout);
}

#[test]
fn the_cluster_and_manifests_never_mix_and_a_refused_list_names_the_permission() {
    let dir = Scratch::new();
    let (api, kubeconfig) = cluster(&dir);
    let kc = kubeconfig.display().to_string();
    let files = examples().join("cluster").display().to_string();
    let config = config();
    let mixed = Cli::new()
        .plan(&["-f", &files, "--kubeconfig", &kc, "--config", &config])
        .expect_exit(1);
    assert!(mixed.stderr.contains("not both"), "{}", mixed.stderr);

    api.forbid("nodes");
    let refused = Cli::new()
        .plan(&["--kubeconfig", &kc, "--config", &config])
        .expect_exit(1);
    let lines: Vec<&str> = refused
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{}", refused.stderr);
    assert!(
        lines[0].contains("cannot list nodes: forbidden")
            && lines[0].contains("permission to list nodes"),
        "{}",
        lines[0]
    );

    // An unreachable cluster is one line too.
    let gone = dir.write(
        "gone.kubeconfig",
        "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster: {server: 'http://127.0.0.1:9'}\nusers:\n- name: x\n  user: {}\ncontexts:\n- name: x\n  context: {cluster: x, user: x}\ncurrent-context: x\n",
    );
    let unreachable = Cli::new()
        .plan(&[
            "--kubeconfig",
            &gone.display().to_string(),
            "--config",
            &config,
        ])
        .expect_exit(1);
    assert!(
        unreachable
            .stderr
            .contains("cannot list services from the cluster"),
        "{}",
        unreachable.stderr
    );
}

#[test]
fn ports_from_the_cluster_are_the_ports_from_manifests() {
    let dir = Scratch::new();
    let (_api, kubeconfig) = cluster(&dir);
    let files = examples().join("cluster").display().to_string();
    let config = config();
    let kc = kubeconfig.display().to_string();
    let offline = Cli::new()
        .run("ports", &["-f", &files, "--config", &config, "-o", "json"])
        .expect_exit(0);
    let online = Cli::new()
        .run(
            "ports",
            &["--kubeconfig", &kc, "--config", &config, "-o", "json"],
        )
        .expect_exit(0);
    assert_eq!(online.stdout, offline.stdout);
}

#[test]
fn explain_reads_the_cluster_too() {
    let dir = Scratch::new();
    let (_api, kubeconfig) = cluster(&dir);
    let kc = kubeconfig.display().to_string();
    let config = config();
    Cli::new()
        .run(
            "explain",
            &["shop/legacy", "--kubeconfig", &kc, "--config", &config],
        )
        .expect_exit(2)
        .stdout_has(&["invalid annotation", "10.0.0.0/33"]);
    Cli::new()
        .run(
            "explain",
            &["shop/web", "--kubeconfig", &kc, "--config", &config],
        )
        .expect_exit(2)
        .stdout_has(&["pool web -> memory:web", "not in place yet"]);
}

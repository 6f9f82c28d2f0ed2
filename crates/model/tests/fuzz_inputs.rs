#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! No input may panic: arbitrary annotation values, Service and Node objects, and config
//! text go through admission, the desired state and the planner. Run as part of the
//! tests, with a bounded number of cases (`PROPTEST_CASES` raises it for a longer run).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use nodeport_firewall_model::plan::PoolResolution;
use nodeport_firewall_model::{
    Config, Limits, NodeSpec, Observation, PoolName, PoolTarget, ServiceSpec, ShapeRenderer,
    Target, desired, plan,
};
use proptest::prelude::*;

const KEYS: [&str; 5] = [
    "nodeport-firewall.io/enabled",
    "nodeport-firewall.io/allowed-source-ranges",
    "nodeport-firewall.io/node-pools",
    "nodeport-firewall.io/ports",
    "nodeport-firewall.io/unknown",
];

/// Text that is mostly the syntax the parsers expect, and sometimes anything at all.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-F:./, -]{0,60}",
        "(true|false|TRUE|yes|1|)",
        "([a-z0-9-]{0,12}(/[0-9a-z-]{0,8})?[, ]{0,2}){0,5}",
        "((tcp|udp|TCP|sctp|x)?[:/]?[0-9]{0,6}(-[0-9]{0,6})?[, ]{0,2}){0,6}",
        "(([0-9]{1,3}\\.){0,4}[0-9]{0,3}(/[0-9]{0,3})?[, ]{0,2}){0,4}",
    ]
}

fn service() -> impl Strategy<Value = ServiceSpec> {
    (
        prop::collection::vec((0..KEYS.len(), texty()), 0..6),
        prop::collection::vec(
            (
                "(TCP|UDP|SCTP|tcp|ICMP|)",
                any::<i32>(),
                prop_oneof![any::<i32>(), 29990i32..32800],
            ),
            0..4,
        ),
        "[a-z0-9-]{0,10}",
    )
        .prop_map(|(annotations, ports, name)| {
            let mut svc = ServiceSpec::nodeport("fuzz", &name);
            for (i, (protocol, port, node_port)) in ports.into_iter().enumerate() {
                svc = svc.with_port(&format!("p{i}"), &protocol, port, node_port);
            }
            for (k, v) in annotations {
                svc = svc.with_annotation(KEYS[k], &v);
            }
            svc
        })
}

fn nodes() -> Vec<NodeSpec> {
    vec![
        NodeSpec::new("n1").with_label("nodeport-firewall.io/pool", "a"),
        NodeSpec::new("n2").with_label("karpenter.sh/nodepool", "b"),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_annotations_plan_without_panic(services in prop::collection::vec(service(), 0..6)) {
        let config = Config::new("fuzz");
        let d = desired(&config, &services, &nodes());
        let resolutions: BTreeMap<PoolName, PoolResolution> = ["a", "b"]
            .into_iter()
            .map(|p| (PoolName::new(p), Ok(vec![PoolTarget::new(Target::new("t", p), None)])))
            .collect();
        let observations = ["a", "b"]
            .into_iter()
            .map(|p| (Target::new("t", p), Ok(Observation::new(Vec::new(), Limits::default()))))
            .collect();
        let _ = plan(&d, "t", &resolutions, &observations, &ShapeRenderer::unnamed());
    }

    #[test]
    fn any_config_text_is_read_without_panic(text in prop_oneof![
        any::<String>(),
        "clusterName: [a-z]{1,8}\n(poolLabels: \\[[a-z./]{0,20}\\]\n)?(policy:\n  (maxRangesPerService|allowWorldOpen|portMerge|minPrefixLength): [a-z0-9{}\\[\\]]{0,8}\n)?(pools:\n  [a-z]{1,4}:\n    managed: [a-z0-9]{0,5}\n)?",
    ]) {
        let _ = Config::from_yaml(&text, &["memory", "aws", "gcp", "azure"]);
    }

    #[test]
    fn any_service_or_node_object_is_read_without_panic(json in json_object()) {
        if let Ok(svc) = serde_json::from_value::<Service>(json.clone()) {
            let _ = ServiceSpec::from_k8s(&svc);
        }
        if let Ok(node) = serde_json::from_value::<Node>(json) {
            let _ = NodeSpec::from_k8s(&node, &["nodeport-firewall.io/pool".to_string()]);
        }
    }
}

/// Kubernetes-shaped JSON with arbitrary leaves.
fn json_object() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        texty().prop_map(serde_json::Value::from),
    ];
    (
        prop::option::of("[a-z0-9-]{0,10}"),
        prop::collection::btree_map("[a-z./-]{1,30}", texty(), 0..4),
        prop::collection::vec(
            (prop::option::of(texty()), leaf.clone(), leaf.clone(), leaf),
            0..3,
        ),
        prop::option::of("(NodePort|ClusterIP|LoadBalancer|x)"),
    )
        .prop_map(|(name, labels, ports, type_)| {
            let ports: Vec<serde_json::Value> = ports
                .into_iter()
                .map(|(protocol, port, node_port, name)| {
                    serde_json::json!({"protocol": protocol, "port": port, "nodePort": node_port, "name": name})
                })
                .collect();
            serde_json::json!({
                "metadata": {"name": name, "namespace": "fuzz", "labels": labels, "annotations": labels},
                "spec": {"type": type_, "ports": ports, "providerID": name},
                "status": {"addresses": [{"type": "InternalIP", "address": name}]},
            })
        })
}

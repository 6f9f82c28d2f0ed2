#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! No input may panic: the manifest loader reads arbitrary text, YAML of any shape, and
//! Kubernetes objects with arbitrary fields, and the objects it accepts go on to the
//! model. Bounded case counts keep it to seconds in CI (`PROPTEST_CASES` raises them).

use nodeport_firewall::manifests::{Manifests, parse_into};
use nodeport_firewall_model::{NodeSpec, ServiceSpec};
use proptest::prelude::*;

/// A value of any YAML shape, leaves mostly near what manifests hold.
fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| format!("{s:?}")),
        "[a-zA-Z0-9./:_-]{0,20}",
        "(-?[0-9]{1,12}|true|false|null|~|\\[\\]|\\{\\}|'')",
    ]
}

fn kind() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Service".to_string()),
        Just("Node".to_string()),
        Just("Namespace".to_string()),
        Just("List".to_string()),
        Just("NodePortFirewallPolicy".to_string()),
        "[A-Za-z]{0,12}",
    ]
}

/// A document that looks like a Kubernetes object, with arbitrary values where the loader
/// and the model look.
fn object() -> impl Strategy<Value = String> {
    (
        kind(),
        prop::collection::vec(leaf(), 12),
        prop::bool::ANY,
    )
        .prop_map(|(kind, v, nested)| {
            let body = format!(
                "apiVersion: {}\nkind: {kind}\nmetadata:\n  name: {}\n  namespace: {}\n  labels: {{nodeport-firewall.io/pool: {}}}\n  annotations:\n    nodeport-firewall.io/enabled: {}\n    nodeport-firewall.io/allowed-source-ranges: {}\n    nodeport-firewall.io/ports: {}\nspec:\n  type: {}\n  ports:\n  - {{protocol: {}, port: {}, nodePort: {}}}\n  providerID: {}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
                if kind == "NodePortFirewallPolicy" { "nodeport-firewall.io/v1alpha1" } else { "v1" },
                v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11]
            );
            if nested {
                let indented: String = body.lines().map(|l| format!("  {l}\n")).collect();
                format!("apiVersion: v1\nkind: List\nitems:\n-\n{indented}")
            } else {
                body
            }
        })
}

fn load(text: &str) {
    let mut out = Manifests::default();
    if parse_into("fuzz.yaml", text, &mut out).is_ok() {
        for s in &out.services {
            let _ = ServiceSpec::from_k8s(s);
        }
        for n in &out.nodes {
            let _ = NodeSpec::from_k8s(n, &["nodeport-firewall.io/pool".to_string()]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_text_loads_or_fails_without_panic(text in any::<String>()) {
        load(&text);
    }

    #[test]
    fn any_object_loads_or_fails_without_panic(
        docs in prop::collection::vec(object(), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let text = docs.join("---\n");
        load(&text);
        // And cut anywhere, as a truncated file is.
        let mut at = cut.index(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        load(&text[..at]);
    }
}

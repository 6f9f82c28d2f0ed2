//! Property tests over arbitrary input from the cloud: the wire-to-rule mapper, the Deny
//! reader, the marker parser and the error-body reader never panic, whatever names,
//! descriptions, ports, ranges, marker JSON or whole bodies Compute (or someone editing
//! rules by hand) sends. Bounded case counts keep them fast enough for every CI run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use google_cloud_compute_v1::model::{Firewall, firewall};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::{deny, error, marker, wire};

const CLUSTER: &str = "c1";

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings that look like what the fields hold, and strings that do not.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9-]{0,70}",
        "npf-c1-[a-z0-9-]{0,50}",
        "[0-9]{1,6}(-[0-9]{1,6})?",
        "[0-9a-f:./]{0,45}",
        Just(String::new()),
    ]
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..5)
}

/// A description: free text, or a marker (of ours, or of another owner) with odd contents.
fn description() -> impl Strategy<Value = Option<String>> {
    let marker = (
        prop_oneof![Just("nodeport-firewall".to_string()), text()],
        prop_oneof![Just(CLUSTER.to_string()), text()],
        texts(),
        texts(),
        prop::option::of(text()),
    )
        .prop_map(|(managed_by, cluster, pools, services, digest)| {
            let mut m = json!({"managedBy": managed_by, "cluster": cluster,
                               "pools": pools, "services": services});
            if let Some(d) = digest {
                m["servicesDigest"] = json!(d);
            }
            m.to_string()
        });
    prop::option::of(prop_oneof![marker, text()])
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just("tcp".to_string()),
        Just("udp".to_string()),
        Just("all".to_string()),
        Just("icmp".to_string()),
        Just("17".to_string()),
        text(),
    ])
}

fn firewall_rule() -> impl Strategy<Value = Firewall> {
    let entries = || prop::collection::vec((protocol(), texts()), 0..3);
    (
        (
            prop::option::of(text()),
            description(),
            entries(),
            entries(),
        ),
        (texts(), texts(), texts(), texts(), texts()),
        (
            prop::option::of(any::<i32>()),
            prop::option::of(any::<bool>()),
            any::<bool>(),
            texts(),
        ),
    )
        .prop_map(
            |(
                (name, description, allowed, denied),
                (sources, source_tags, source_sas, target_tags, target_sas),
                (priority, disabled, egress, destinations),
            )| {
                let mut fw = Firewall::new()
                    .set_allowed(allowed.into_iter().map(|(p, ports)| {
                        firewall::Allowed::new()
                            .set_or_clear_ip_protocol(p)
                            .set_ports(ports)
                    }))
                    .set_denied(denied.into_iter().map(|(p, ports)| {
                        firewall::Denied::new()
                            .set_or_clear_ip_protocol(p)
                            .set_ports(ports)
                    }))
                    .set_source_ranges(sources)
                    .set_source_tags(source_tags)
                    .set_source_service_accounts(source_sas)
                    .set_target_tags(target_tags)
                    .set_target_service_accounts(target_sas)
                    .set_destination_ranges(destinations)
                    .set_or_clear_name(name)
                    .set_or_clear_description(description)
                    .set_or_clear_priority(priority)
                    .set_or_clear_disabled(disabled);
                if egress {
                    fw = fw.set_direction(firewall::Direction::Egress);
                }
                fw
            },
        )
}

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("reason".to_string()),
                    Just("@type".to_string()),
                    Just("IPProtocol".to_string()),
                    Just("ports".to_string()),
                    text()
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What must hold for every observed rule, besides not panicking.
fn check(fw: &Firewall) {
    let Some(o) = wire::observe(CLUSTER, 1000, fw) else {
        assert!(fw.name.is_none());
        return;
    };
    let priority = o.priority.expect("every rule carries a priority");
    assert!(priority <= 65535);
    if o.deny.is_some() {
        assert!(!o.owned, "a Deny is never ours");
        assert!(
            o.rule.content.sources.is_empty(),
            "a Deny satisfies nothing"
        );
        assert!(o.deny.as_ref().is_some_and(|d| d.scopes.is_empty()));
    }
    if o.owned {
        assert!(fw.name.as_deref().is_some_and(|n| n.starts_with("npf-c1-")));
        assert!(!o.rule.content.sources.is_empty());
        assert!(fw.denied.is_empty() && fw.disabled != Some(true));
    }
    if fw.disabled == Some(true) {
        assert_eq!(o.deny, None, "a disabled rule blocks nothing");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_mapper_never_panics_on_arbitrary_rules(fw in firewall_rule()) {
        check(&fw);
        let _ = deny::denial_of(&fw);
    }

    #[test]
    fn the_mapper_never_panics_on_arbitrary_json_bodies(
        body in prop::collection::btree_map(
            prop_oneof![
                Just("name"), Just("description"), Just("allowed"), Just("denied"),
                Just("sourceRanges"), Just("sourceTags"), Just("targetTags"),
                Just("targetServiceAccounts"), Just("priority"), Just("disabled"),
                Just("direction"), Just("network"),
            ],
            json_value(),
            0..8,
        )
    ) {
        let v = Value::Object(body.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        if let Ok(fw) = serde_json::from_value::<Firewall>(v) {
            check(&fw);
        }
    }

    #[test]
    fn the_marker_parser_never_panics(name in text(), description in description()) {
        let p = marker::parse(CLUSTER, &name, description.as_deref());
        if p.owned {
            prop_assert!(name.starts_with("npf-c1-"));
        }
    }

    #[test]
    fn error_bodies_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        body in json_value(),
        status in prop::option::of(100u16..600),
    ) {
        let _ = error::classify(status, &error::Cause::of_payload(&bytes));
        let wrapped = json!({"error": body}).to_string();
        let _ = error::classify(status, &error::Cause::of_payload(wrapped.as_bytes()));
    }
}

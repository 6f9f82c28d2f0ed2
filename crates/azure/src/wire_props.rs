//! The ARM-to-rule mapper on ARM's own JSON: Deny rules as [`Denial`]s never narrower
//! than the rule, rules of ours to rewrite, and arbitrary JSON and strings in every field
//! (names, descriptions and markers, prefixes, port strings), which must never panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use azure_mgmt_network::package_2024_03::models::SecurityRule;
use nodeport_firewall_model::{
    Denial, PoolName, PoolSet, PortRange, Protocol, RuleContent, ServiceRef, ServiceSet,
};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::marker;
use crate::wire::{OurWrites, observed_rule};

const CLUSTER: &str = "c1";

fn our_marker() -> String {
    let pools: PoolSet = [PoolName::new("np1")].into_iter().collect();
    let services: ServiceSet = [ServiceRef::new("apps", "web")].into_iter().collect();
    marker::description(CLUSTER, &pools, &services)
}

/// An ARM rule from its `properties`, as ARM returns it.
fn rule(name: &str, properties: Value) -> SecurityRule {
    serde_json::from_value(json!({
        "id": format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/n/securityRules/{name}"),
        "name": name,
        "type": "Microsoft.Network/networkSecurityGroups/securityRules",
        "properties": properties,
    }))
    .unwrap()
}

/// Inbound TCP 30080 from 10.0.0.0/8 to one node, with `over` laid on top.
fn props(over: Value) -> Value {
    let mut p = json!({
        "protocol": "Tcp", "sourcePortRange": "*", "sourceAddressPrefix": "10.0.0.0/8",
        "destinationAddressPrefix": "10.240.0.4", "destinationPortRange": "30080",
        "access": "Allow", "priority": 3000, "direction": "Inbound",
        "provisioningState": "Succeeded",
    });
    for (k, v) in over.as_object().unwrap() {
        if v.is_null() {
            p.as_object_mut().unwrap().remove(k);
        } else {
            p[k] = v.clone();
        }
    }
    p
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

#[test]
fn deny_rules_are_denials_never_narrower_than_the_rule() {
    let every = Denial::default();
    let cases: Vec<(&str, Value, Option<Denial>)> = vec![
        ("an Allow", json!({}), None),
        (
            "exact",
            json!({"access": "Deny"}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                ports: vec![PortRange::single(30080)],
                sources: vec![net("10.0.0.0/8")],
                scopes: vec![],
            }),
        ),
        (
            "catch-all",
            json!({"access": "Deny", "protocol": "*", "sourceAddressPrefix": "*",
                   "destinationAddressPrefix": "*", "destinationPortRange": "*", "priority": 4096}),
            Some(every.clone()),
        ),
        (
            "udp, ranges, several sources",
            json!({"access": "Deny", "protocol": "Udp", "sourceAddressPrefix": null,
                   "sourceAddressPrefixes": ["192.0.2.0/24", "10.1.2.3"],
                   "destinationPortRange": null, "destinationPortRanges": ["30000-30100", "31000"]}),
            Some(Denial {
                protocol: Some(Protocol::Udp),
                ports: vec![
                    PortRange {
                        from: 30000,
                        to: 30100,
                    },
                    PortRange::single(31000),
                ],
                sources: vec![net("10.1.2.3/32"), net("192.0.2.0/24")],
                scopes: vec![],
            }),
        ),
        (
            "a service tag among the sources is every source",
            json!({"access": "Deny", "sourceAddressPrefix": null,
                   "sourceAddressPrefixes": ["192.0.2.0/24", "VirtualNetwork"]}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                ports: vec![PortRange::single(30080)],
                ..Denial::default()
            }),
        ),
        (
            "Internet",
            json!({"access": "Deny", "sourceAddressPrefix": "Internet"}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                ports: vec![PortRange::single(30080)],
                ..Denial::default()
            }),
        ),
        (
            "AzureLoadBalancer, port *",
            json!({"access": "Deny", "sourceAddressPrefix": "AzureLoadBalancer", "destinationPortRange": "*"}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                ..Denial::default()
            }),
        ),
        (
            "a source ASG is every source",
            json!({"access": "Deny", "sourceAddressPrefix": null,
                   "sourceApplicationSecurityGroups": [{"id": "/x/asg"}]}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                ports: vec![PortRange::single(30080)],
                ..Denial::default()
            }),
        ),
        (
            "a port that does not parse is every port",
            json!({"access": "Deny", "destinationPortRange": null,
                   "destinationPortRanges": ["30080", "banana"]}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                sources: vec![net("10.0.0.0/8")],
                ..Denial::default()
            }),
        ),
        (
            "source ports are ignored: the Deny is taken as covering all",
            json!({"access": "Deny", "sourcePortRange": "1024-2048"}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                ports: vec![PortRange::single(30080)],
                sources: vec![net("10.0.0.0/8")],
                scopes: vec![],
            }),
        ),
        (
            "an ASG destination is the whole NSG",
            json!({"access": "Deny", "destinationAddressPrefix": null,
                   "destinationApplicationSecurityGroups": [{"id": "/x/asg"}]}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                ports: vec![PortRange::single(30080)],
                sources: vec![net("10.0.0.0/8")],
                scopes: vec![],
            }),
        ),
        (
            "an unknown protocol is every protocol",
            json!({"access": "Deny", "protocol": "Gre"}),
            Some(Denial {
                protocol: None,
                ports: vec![PortRange::single(30080)],
                sources: vec![net("10.0.0.0/8")],
                scopes: vec![],
            }),
        ),
        (
            "an unknown access fails closed: a Deny",
            json!({"access": "Block"}),
            Some(Denial {
                protocol: Some(Protocol::Tcp),
                ports: vec![PortRange::single(30080)],
                sources: vec![net("10.0.0.0/8")],
                scopes: vec![],
            }),
        ),
        (
            "ICMP matches none of our protocols",
            json!({"access": "Deny", "protocol": "Icmp"}),
            None,
        ),
        (
            "nor does ESP",
            json!({"access": "Deny", "protocol": "Esp"}),
            None,
        ),
        ("nor AH", json!({"access": "Deny", "protocol": "Ah"}), None),
    ];
    for (what, over, want) in cases {
        // Our marker on a Deny makes it no rule of ours.
        let mut over = over;
        over["description"] = json!(our_marker());
        let r = rule("r", props(over));
        let o = observed_rule(CLUSTER, &r, OurWrites::Idle).unwrap();
        assert_eq!(o.deny, want, "{what}");
        let is_allow = what == "an Allow";
        assert_eq!(o.owned, is_allow, "{what}: a Deny is never ours");
        let written = r.properties.as_ref().map(|p| p.priority);
        assert_eq!(o.priority.map(i64::from), written.map(i64::from), "{what}");
        assert!(o.priority.is_some(), "{what}: every rule has its priority");
        if !is_allow {
            assert!(
                o.rule.content.sources.is_empty(),
                "{what}: a Deny satisfies nothing"
            );
        }
    }
}

#[test]
fn a_denial_covers_the_allow_it_was_read_from() {
    // The shadowing check relies on this: a Deny read from the same fields as an Allow
    // covers all of that Allow's traffic.
    for over in [
        json!({}),
        json!({"sourceAddressPrefix": null, "sourceAddressPrefixes": ["10.0.0.0/8", "192.0.2.7"]}),
        json!({"destinationPortRange": null, "destinationPortRanges": ["30080", "30090-30095"]}),
        json!({"protocol": "Udp"}),
    ] {
        let allow =
            observed_rule(CLUSTER, &rule("a", props(over.clone())), OurWrites::Idle).unwrap();
        let mut deny = over;
        deny["access"] = json!("Deny");
        let d = observed_rule(CLUSTER, &rule("d", props(deny)), OurWrites::Idle)
            .unwrap()
            .deny
            .unwrap();
        assert!(
            d.overlaps(&allow.rule.content),
            "{d:?} vs {:?}",
            allow.rule.content
        );
        let elsewhere = RuleContent {
            ports: vec![PortRange::single(31999)],
            ..allow.rule.content.clone()
        };
        assert!(!d.overlaps(&elsewhere), "another port is not denied");
    }
}

#[test]
fn rules_of_ours_not_in_force_are_to_be_rewritten() {
    for (state, writes, rewrite) in [
        (Some("Succeeded"), OurWrites::Idle, false),
        (None, OurWrites::Idle, false),
        (Some("Failed"), OurWrites::Idle, true),
        (Some("Failed"), OurWrites::InFlight, true),
        (Some("Updating"), OurWrites::Idle, true),
        // Our own write in progress: it is waited for, not raced.
        (Some("Updating"), OurWrites::InFlight, false),
        (Some("Deleting"), OurWrites::Idle, false),
    ] {
        let mut p = props(json!({"description": our_marker()}));
        match state {
            Some(s) => p["provisioningState"] = json!(s),
            None => {
                p.as_object_mut().unwrap().remove("provisioningState");
            }
        }
        let o = observed_rule(CLUSTER, &rule("ours", p.clone()), writes).unwrap();
        assert!(o.owned, "{state:?}");
        assert_eq!(o.needs_rewrite.is_some(), rewrite, "{state:?} {writes:?}");
        assert_eq!(o.rule.content.sources, vec![net("10.0.0.0/8")], "{state:?}");
        // Someone else's rule is never rewritten; a failed foreign Allow satisfies nothing.
        p["description"] = json!("ops");
        let f = observed_rule(CLUSTER, &rule("theirs", p), writes).unwrap();
        assert!(!f.owned && f.needs_rewrite.is_none(), "{state:?}");
        assert_eq!(
            f.rule.content.sources.is_empty(),
            state == Some("Failed"),
            "{state:?}"
        );
    }
}

/// Strings as a cloud, a person or an attacker may put them in a rule.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,200}",
        Just(our_marker()),
        our_marker_with_tail(),
        Just("*".to_string()),
        Just("Internet".to_string()),
        "[0-9]{1,5}(-[0-9]{1,6})?",
        "[0-9a-f:./]{0,45}",
        Just(String::new()),
    ]
}

fn our_marker_with_tail() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|tail| format!("nodeport-firewall cluster={CLUSTER}; {tail}"))
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Properties with every field drawn from arbitrary strings, lists and JSON.
fn wild_properties() -> impl Strategy<Value = Value> {
    let field = |choices: Vec<&'static str>| prop::sample::select(choices).prop_map(str::to_string);
    (
        prop::collection::vec(
            (
                field(vec![
                    "description",
                    "protocol",
                    "sourcePortRange",
                    "destinationPortRange",
                    "sourceAddressPrefix",
                    "destinationAddressPrefix",
                    "access",
                    "direction",
                    "provisioningState",
                ]),
                text(),
            ),
            0..9,
        ),
        prop::collection::vec(
            (
                field(vec![
                    "sourceAddressPrefixes",
                    "destinationAddressPrefixes",
                    "sourcePortRanges",
                    "destinationPortRanges",
                ]),
                prop::collection::vec(text(), 0..5),
            ),
            0..4,
        ),
        any::<i32>(),
        prop::option::of(json_value()),
        prop::sample::select(vec!["Tcp", "Udp", "*", "Icmp", "Esp", "Ah"]),
        prop::sample::select(vec!["Allow", "Deny"]),
    )
        .prop_map(|(strings, lists, priority, extra, protocol, access)| {
            let mut p =
                props(json!({"protocol": protocol, "access": access, "priority": priority}));
            for (k, v) in strings {
                p[k] = json!(v);
            }
            for (k, v) in lists {
                p[k] = json!(v);
            }
            if let Some(extra) = extra {
                p["destinationApplicationSecurityGroups"] = json!([{"id": extra}]);
                p["sourceApplicationSecurityGroups"] = json!([extra]);
            }
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// No rule ARM (or anyone writing to it) can return makes the mapper panic, and what
    /// it reads keeps the invariants the planner relies on.
    #[test]
    fn the_mapper_never_panics_on_wild_rules(name in text(), properties in wild_properties()) {
        let Ok(r) = serde_json::from_value::<SecurityRule>(json!({"name": name, "properties": properties}))
        else {
            return Ok(());
        };
        for writes in [OurWrites::Idle, OurWrites::InFlight] {
            if let Some(o) = observed_rule(CLUSTER, &r, writes) {
                prop_assert!(o.deny.is_none() || !o.owned, "a Deny is never ours");
                prop_assert!(o.deny.is_none() || o.rule.content.sources.is_empty());
                prop_assert!(o.owned || o.needs_rewrite.is_none());
                if o.owned {
                    prop_assert!(!o.rule.content.sources.is_empty());
                    prop_assert!(!o.rule.content.ports.is_empty());
                }
            }
        }
    }

    /// Arbitrary JSON where a rule is expected: either it does not deserialize, or it maps
    /// without a panic.
    #[test]
    fn the_mapper_never_panics_on_arbitrary_json(v in json_value(), properties in json_value()) {
        for candidate in [v.clone(), json!({"name": "r", "properties": properties}), json!({"name": v, "properties": {}})] {
            if let Ok(r) = serde_json::from_value::<SecurityRule>(candidate) {
                let _ = observed_rule(CLUSTER, &r, OurWrites::Idle);
            }
        }
    }

    /// Arbitrary descriptions never make a rule ours unless they are our marker.
    #[test]
    fn only_our_marker_makes_a_rule_ours(description in text()) {
        let r = rule("r", props(json!({"description": description.clone()})));
        let o = observed_rule(CLUSTER, &r, OurWrites::Idle).unwrap();
        let marked = description.starts_with(&format!("nodeport-firewall cluster={CLUSTER};"));
        prop_assert!(!o.owned || marked, "{description:?}");
    }
}

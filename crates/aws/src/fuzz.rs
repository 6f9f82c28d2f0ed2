//! Fuzzing the mapping from what EC2 sends to the neutral model: arbitrary descriptions,
//! tag keys and values, CIDRs, ports and protocols (from arbitrary bytes, and near misses of
//! the real shapes) never panic, and never make a rule ours that is not ours by both its
//! tags and its description. A bounded number of cases, so CI runs it in seconds.

use aws_sdk_ec2::types::{SecurityGroupRule, Tag};
use nodeport_firewall_model::{PoolSet, ServiceRef, ServiceSet};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::marker::{self, MANAGED_BY, TAG_CLUSTER, TAG_MANAGED_BY, TAG_POOLS, TAG_SERVICES};
use crate::wire::observed;

const CLUSTER: &str = "fuzz";

/// Arbitrary bytes read as EC2's JSON/XML decoder would hand them over: lossy UTF-8.
fn bytes_text() -> impl Strategy<Value = String> {
    vec(any::<u8>(), 0..300).prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Text the cloud may send: arbitrary, or shaped like ours with arbitrary parts.
fn text(shapes: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        bytes_text(),
        any::<String>(),
        (proptest::sample::select(shapes), any::<String>()).prop_map(|(a, b)| format!("{a}{b}")),
        (
            proptest::sample::select(shapes),
            "[a-z0-9/,._=\\[\\] -]{0,80}"
        )
            .prop_map(|(a, b)| format!("{a}{b}")),
    ]
}

fn description() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(text(&[
        "nodeport-firewall cluster=fuzz services=",
        "nodeport-firewall cluster=fuzz",
        "nodeport-firewall cluster=other services=",
        "nodeport-firewall cluster=",
        "",
    ]))
}

fn tag() -> impl Strategy<Value = (Option<String>, Option<String>)> {
    (
        proptest::option::weighted(
            0.95,
            text(&[
                TAG_MANAGED_BY,
                TAG_CLUSTER,
                TAG_POOLS,
                "nodeport-firewall.io/pools.",
                TAG_SERVICES,
                "nodeport-firewall.io/services.",
            ]),
        ),
        proptest::option::weighted(0.9, text(&[MANAGED_BY, CLUSTER, "apps/", "a,b", ","])),
    )
}

/// Our two ownership tags, present or not, then arbitrary ones.
fn tags() -> impl Strategy<Value = Vec<(Option<String>, Option<String>)>> {
    (any::<bool>(), any::<bool>(), vec(tag(), 0..8)).prop_map(|(by, cluster, rest)| {
        let mut out = Vec::new();
        if by {
            out.push((Some(TAG_MANAGED_BY.into()), Some(MANAGED_BY.into())));
        }
        if cluster {
            out.push((Some(TAG_CLUSTER.into()), Some(CLUSTER.into())));
        }
        out.extend(rest);
        out
    })
}

fn cidr() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        text(&["10.0.0.0/", "0.0.0.0/0", "::/", "2001:db8::/", "10.1.2.3/"]),
        (any::<[u8; 4]>(), 0u8..40)
            .prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
        (any::<u128>(), 0u8..140).prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a))),
    ])
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        proptest::sample::select(vec![
            "tcp", "udp", "sctp", "6", "17", "132", "-1", "icmp", "1", "58", "TCP", "",
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ])
}

fn port() -> impl Strategy<Value = Option<i32>> {
    proptest::option::of(prop_oneof![
        any::<i32>(),
        -1i32..=65536,
        Just(i32::MIN),
        Just(i32::MAX)
    ])
}

type Parts = (
    Option<String>,
    Option<String>,
    Option<String>,
    (Option<i32>, Option<i32>),
    Option<String>,
    Vec<(Option<String>, Option<String>)>,
    (Option<bool>, Option<String>),
);

fn rule() -> impl Strategy<Value = Parts> {
    (
        protocol(),
        cidr(),
        cidr(),
        (port(), port()),
        description(),
        tags(),
        (
            proptest::option::of(any::<bool>()),
            proptest::option::of(text(&["sgr-", "sg-"])),
        ),
    )
}

fn build(parts: &Parts) -> SecurityGroupRule {
    let (protocol, v4, v6, (from, to), description, tags, (egress, id)) = parts.clone();
    SecurityGroupRule::builder()
        .set_ip_protocol(protocol)
        .set_cidr_ipv4(v4)
        .set_cidr_ipv6(v6)
        .set_from_port(from)
        .set_to_port(to)
        .set_description(description)
        .set_is_egress(egress)
        .set_security_group_rule_id(id.clone())
        .set_group_id(id)
        .set_tags(Some(
            tags.into_iter()
                .map(|(k, v)| Tag::builder().set_key(k).set_value(v).build())
                .collect(),
        ))
        .build()
}

fn has_tag(parts: &Parts, key: &str, value: &str) -> bool {
    // The first tag with the key counts, as in `marker::parse`.
    parts
        .5
        .iter()
        .find(|(k, _)| k.as_deref() == Some(key))
        .is_some_and(|(_, v)| v.as_deref().unwrap_or_default() == value)
}

// Case counts keep each test within a few seconds of an unoptimized build on 2 cores.
proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Any rule EC2 might send maps without a panic; it is ours only with both our tags
    /// and our description marker and a shape we write (one CIDR, TCP/UDP/SCTP, ports in
    /// order); a rule not ours carries no Services, pools or payload.
    #[test]
    fn any_ec2_rule_maps_without_panic_and_ownership_needs_tags_and_description(
        parts in rule()
    ) {
        let r = build(&parts);
        let o = observed(CLUSTER, &r);
        let described = parts
            .4
            .as_deref()
            .is_some_and(|d| d.starts_with("nodeport-firewall cluster=fuzz services="));
        let tagged = has_tag(&parts, TAG_MANAGED_BY, MANAGED_BY)
            && has_tag(&parts, TAG_CLUSTER, CLUSTER);
        if o.owned {
            prop_assert!(described && tagged, "owned without the full marker: {parts:?}");
            prop_assert_eq!(o.rule.content.sources.len(), 1);
            prop_assert_eq!(o.rule.content.ports.len(), 1);
            prop_assert!(o.rule.content.ports[0].from <= o.rule.content.ports[0].to);
            prop_assert!(o.payload.is_some());
        } else {
            prop_assert!(o.rule.services.is_empty());
            prop_assert!(o.rule.pools.is_empty());
            prop_assert!(o.payload.is_none());
        }
        prop_assert!(o.deny.is_none(), "security groups only allow");
        prop_assert!(o.rule.content.sources.len() <= 1);
        // Tags alone never make a rule ours.
        let mut stripped = parts.clone();
        stripped.4 = None;
        prop_assert!(!observed(CLUSTER, &build(&stripped)).owned);
    }

    /// The marker parser takes any tags and description.
    #[test]
    fn marker_parse_never_panics(
        cluster in text(&[CLUSTER, ""]),
        tags in vec((text(&[TAG_SERVICES, TAG_POOLS, TAG_CLUSTER]), bytes_text()), 0..10),
        description in description(),
    ) {
        let pairs: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let p = marker::parse(&cluster, pairs.iter().copied(), description.as_deref());
        if !p.owned {
            prop_assert_eq!(p, marker::Parsed::default());
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever the cluster name and the Services, what we write reads back as ours and
    /// serving exactly those Services (or their digest).
    #[test]
    fn the_marker_round_trips_for_any_cluster_name(
        cluster in any::<String>(),
        names in vec(("[a-z0-9-]{1,63}", "[a-z0-9-]{1,63}"), 0..30),
    ) {
        let services: ServiceSet = names.iter().map(|(ns, n)| ServiceRef::new(ns, n)).collect();
        let m = marker::marker(&cluster, &services);
        let mut tags = marker::common_tags(&cluster, &PoolSet::default());
        tags.extend(m.service_tags.clone());
        prop_assert!(m.description.chars().count() <= marker::MAX_DESCRIPTION);
        let pairs: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let p = marker::parse(&cluster, pairs.iter().copied(), Some(&m.description));
        prop_assert!(p.owned);
        // A list the description cannot hold reads back as its digest and the Services it
        // names, which are among those written.
        match &m.digest {
            None => prop_assert_eq!(p.services, services),
            Some(d) => {
                prop_assert_eq!(p.digest.as_ref(), Some(d));
                prop_assert!(p.services.iter().all(|s| services.contains(s)));
            }
        }
    }
}

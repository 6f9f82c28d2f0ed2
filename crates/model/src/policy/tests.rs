use super::*;
use crate::annotations::{Admission, admit};
use crate::config::Config;
use crate::service::ServiceSpec;

fn intent(svc: &ServiceSpec) -> ServiceIntent {
    match admit(svc, &Config::new("c")) {
        Admission::Managed(i) => i,
        other => panic!("expected managed, got {other:?}"),
    }
}

fn svc(ns: &str, ranges: &str) -> ServiceSpec {
    ServiceSpec::nodeport(ns, "web")
        .with_port("http", "TCP", 80, 30080)
        .enabled()
        .with_ranges(ranges)
}

fn policy(name: &str, namespaces: &[&str], ranges: &[&str]) -> PolicySource {
    PolicySource {
        name: name.into(),
        namespaces: Some(namespaces.iter().map(|s| s.to_string()).collect()),
        allowed_source_ranges: ranges.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A policy that selects namespaces whose label `key` is `value`, allowing `range`.
fn selecting(name: &str, key: &str, value: &str, range: &str) -> PolicySource {
    PolicySource {
        name: name.into(),
        namespace_selector: Some(LabelSelector {
            match_labels: Some([(key.to_string(), value.to_string())].into()),
            ..Default::default()
        }),
        allowed_source_ranges: vec![range.into()],
        ..Default::default()
    }
}

fn closed(v: Verdict) -> String {
    match v {
        Verdict::Closed { by, reasons } => format!("{by}: {}", reasons.join("; ")),
        other => panic!("expected closed, got {other:?}"),
    }
}

#[test]
fn the_floor_refuses_world_open_by_coverage_and_wide_prefixes() {
    let floor = Policy::default();
    let t = Tenancy::default();
    // (ranges, refused?, what the refusal says)
    let cases: &[(&str, Option<&str>)] = &[
        (
            "0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3",
            Some("covers all public ipv4 space"),
        ),
        ("::/1", Some("covers all public ipv6 space")),
        ("0.0.0.0/0", Some("whole Internet")),
        ("0.0.0.0/1", Some("wider than /8")),
        ("2000::/4", Some("policy.minPrefixLength.ipv6")),
        // Two adjacent /8s merge into a /7: as wide as a /7 written out.
        (
            "10.0.0.0/8, 11.0.0.0/8",
            Some("10.0.0.0/7 is wider than /8"),
        ),
        ("10.0.0.0/8", None),
        ("172.16.0.0/12, 192.168.0.0/16", None),
        ("fd00::/8", None),
        ("203.0.113.7", None),
    ];
    for (ranges, want) in cases {
        let v = t.judge(&floor, &intent(&svc("default", ranges)));
        match want {
            Some(w) => {
                let text = closed(v);
                assert!(text.contains(w), "{ranges}: {text}");
                assert!(text.starts_with("the operator config"), "{text}");
            }
            None => assert_eq!(v, Verdict::Admitted { policy: None }, "{ranges}"),
        }
    }
}

#[test]
fn allow_world_open_admits_world_open_sets_whatever_the_prefix() {
    let floor = Policy {
        allow_world_open: true,
        ..Policy::default()
    };
    let t = Tenancy::default();
    for ranges in ["0.0.0.0/0", "::/0", "0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3"] {
        let v = t.judge(&floor, &intent(&svc("default", ranges)));
        assert_eq!(v, Verdict::Admitted { policy: None }, "{ranges}");
    }
    // Half the Internet is not the whole of it: still held to the minimum prefix.
    let v = t.judge(&floor, &intent(&svc("default", "0.0.0.0/1")));
    assert!(closed(v).contains("minPrefixLength"));
}

#[test]
fn too_many_ranges_counts_after_merging() {
    let floor = Policy {
        max_ranges_per_service: 2,
        ..Policy::default()
    };
    let t = Tenancy::default();
    let v = t.judge(
        &floor,
        &intent(&svc("d", "10.0.0.0/16 12.0.0.0/16 14.0.0.0/16")),
    );
    assert!(closed(v).contains("policy.maxRangesPerService"));
    // 10.0/16 and 10.1/16 merge into 10.0/15: two ranges, within the limit.
    let v = t.judge(
        &floor,
        &intent(&svc("d", "10.0.0.0/16 10.1.0.0/16 13.0.0.0/16")),
    );
    assert_eq!(v, Verdict::Admitted { policy: None });
}

#[test]
fn a_namespace_policy_admits_only_what_it_permits() {
    let mut p = policy("team-a", &["team-a"], &["10.0.0.0/8", "2001:db8::/32"]);
    p.node_pools = Some(vec!["web".into()]);
    p.node_ports = Some(vec!["30000-30099".into(), "30443".into()]);
    p.max_ranges_per_service = Some(2);
    let t = Tenancy::new(&[p], &[]);
    let floor = Policy::default();
    let base = || {
        ServiceSpec::nodeport("team-a", "web")
            .with_port("http", "TCP", 80, 30080)
            .enabled()
            .with_annotation("node-pools", "web")
    };
    // (service, refusal or None for admitted)
    let cases: Vec<(ServiceSpec, Option<&str>)> = vec![
        (base().with_ranges("10.1.0.0/16"), None),
        (base().with_ranges("10.1.0.0/16, 2001:db8:1::/48"), None),
        (
            base().with_ranges("192.168.0.0/16"),
            Some("source 192.168.0.0/16 is outside allowedSourceRanges (10.0.0.0/8,2001:db8::/32)"),
        ),
        (
            base().with_ranges("10.1.0.0/16, 10.3.0.0/16, 10.5.0.0/16"),
            Some("more than maxRangesPerService (2)"),
        ),
        (
            base()
                .with_ranges("10.1.0.0/16")
                .with_annotation("node-pools", "web, batch"),
            Some("pool batch is not in nodePools (web)"),
        ),
        (
            ServiceSpec::nodeport("team-a", "web")
                .with_port("http", "TCP", 80, 30080)
                .enabled()
                .with_ranges("10.1.0.0/16"),
            Some("asks for every managed pool"),
        ),
        (
            base()
                .with_ranges("10.1.0.0/16")
                .with_port("admin", "TCP", 81, 31000),
            Some("nodePort tcp/31000 is outside nodePorts (30000-30099, 30443)"),
        ),
    ];
    for (s, want) in cases {
        let v = t.judge(&floor, &intent(&s));
        match want {
            None => assert_eq!(
                v,
                Verdict::Admitted {
                    policy: Some("team-a".into())
                },
                "{:?}",
                s.annotations
            ),
            Some(w) => {
                let text = closed(v);
                assert!(text.contains(w), "{:?}: {text}", s.annotations);
                assert!(text.starts_with("policy team-a"), "{text}");
            }
        }
    }
}

#[test]
fn policies_do_not_combine_one_must_permit_everything() {
    // One policy permits the sources, the other the pool: neither permits both.
    let mut sources_only = policy("a-sources", &["team-a"], &["10.0.0.0/8"]);
    sources_only.node_pools = Some(vec!["web".into()]);
    let mut pool_only = policy("b-pools", &["team-a"], &["192.168.0.0/16"]);
    pool_only.node_pools = Some(vec!["batch".into()]);
    let t = Tenancy::new(&[pool_only, sources_only], &[]);
    let s = svc("team-a", "10.0.0.0/16").with_annotation("node-pools", "batch");
    let text = closed(t.judge(&Policy::default(), &intent(&s)));
    assert!(
        text.starts_with("policy a-sources, policy b-pools"),
        "{text}"
    );
    assert!(
        text.contains("pool batch is not in nodePools (web)"),
        "{text}"
    );
    assert!(
        text.contains("outside allowedSourceRanges (192.168.0.0/16)"),
        "{text}"
    );
    // The first policy by name that permits everything admits.
    let s = svc("team-a", "10.0.0.0/16").with_annotation("node-pools", "web");
    assert_eq!(
        t.judge(&Policy::default(), &intent(&s)),
        Verdict::Admitted {
            policy: Some("a-sources".into())
        }
    );
}

#[test]
fn require_namespace_policy_closes_unselected_namespaces() {
    let t = Tenancy::new(&[policy("team-a", &["team-a"], &["10.0.0.0/8"])], &[]);
    let strict = Policy {
        require_namespace_policy: true,
        ..Policy::default()
    };
    let lax = Policy::default();
    let other = intent(&svc("team-b", "192.168.0.0/16"));
    assert!(
        closed(t.judge(&strict, &other))
            .contains("no NodePortFirewallPolicy selects namespace team-b")
    );
    assert_eq!(t.judge(&lax, &other), Verdict::Admitted { policy: None });
    // A selected namespace must be admitted by its policy even when the floor alone would.
    let outside = intent(&svc("team-a", "192.168.0.0/16"));
    assert!(closed(t.judge(&lax, &outside)).contains("outside allowedSourceRanges"));
}

#[test]
fn selectors_match_namespace_labels_and_names() {
    let p = selecting("prod", "env", "prod", "10.0.0.0/8");
    let by_name = selecting("by-name", NAMESPACE_NAME_LABEL, "tools", "192.168.0.0/16");
    let namespaces = [
        NamespaceSpec::new("shop").with_label("env", "prod"),
        NamespaceSpec::new("lab"),
        NamespaceSpec::new("tools"),
    ];
    let t = Tenancy::new(&[p, by_name], &namespaces);
    let floor = Policy {
        require_namespace_policy: true,
        ..Policy::default()
    };
    let admitted = |ns: &str, ranges: &str| {
        matches!(
            t.judge(&floor, &intent(&svc(ns, ranges))),
            Verdict::Admitted { .. }
        )
    };
    assert!(admitted("shop", "10.1.0.0/16"));
    assert!(!admitted("lab", "10.1.0.0/16"), "lab has no env=prod");
    // Every Namespace carries its name as a label.
    assert!(admitted("tools", "192.168.1.0/24"));
    assert!(!admitted("tools", "10.1.0.0/16"));
}

#[test]
fn invalid_policies_admit_nothing_and_never_widen() {
    let floor = Policy::default();
    // (policy, what its status says)
    let bad_cidr = policy("bad-cidr", &["team-a"], &["10.0.0.0/33"]);
    let mut bad_ports = policy("bad-ports", &["team-a"], &["10.0.0.0/8"]);
    bad_ports.node_ports = Some(vec!["30100-30000".into(), "x".into(), "0".into()]);
    let mut bad_pool = policy("bad-pool", &["team-a"], &["10.0.0.0/8"]);
    bad_pool.node_pools = Some(vec!["no way".into()]);
    let mut bad_limit = policy("bad-limit", &["team-a"], &["10.0.0.0/8"]);
    bad_limit.max_ranges_per_service = Some(0);
    let bad_ns = policy("bad-ns", &["Team_A"], &["10.0.0.0/8"]);
    let nothing = PolicySource {
        name: "nothing".into(),
        allowed_source_ranges: vec!["10.0.0.0/8".into()],
        ..Default::default()
    };
    let cases = [
        (bad_cidr, "allowedSourceRanges"),
        (bad_ports, "the range ends before it starts"),
        (bad_pool, "nodePools"),
        (bad_limit, "maxRangesPerService: 0 must be at least 1"),
        (bad_ns, "not a namespace name"),
        (nothing, "selects no namespace"),
    ];
    for (p, want) in cases {
        let name = p.name.clone();
        let t = Tenancy::new(&[p], &[]);
        let reports = t.reports([]);
        assert!(!reports[0].accepted, "{name}");
        let msg = reports[0].message.clone().unwrap_or_default();
        assert!(msg.contains(want), "{name}: {msg}");
        let v = t.judge(&floor, &intent(&svc("team-a", "10.1.0.0/16")));
        if name == "nothing" {
            // It selects no namespace: team-a is bound by the floor alone. (A bad name in
            // `namespaces` selects every namespace, like a bad selector.)
            assert_eq!(v, Verdict::Admitted { policy: None }, "{name}");
        } else {
            let text = closed(v);
            assert!(
                text.contains(&format!("policy {name} is invalid and admits nothing")),
                "{text}"
            );
        }
    }
}

#[test]
fn an_invalid_selector_selects_every_namespace() {
    let p = PolicySource {
        name: "typo".into(),
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                    key: "team".into(),
                    operator: "in".into(),
                    values: Some(vec!["a".into()]),
                },
            ]),
            ..Default::default()
        }),
        allowed_source_ranges: vec!["10.0.0.0/8".into()],
        ..Default::default()
    };
    let good = policy("team-b", &["team-b"], &["10.0.0.0/8"]);
    let t = Tenancy::new(&[p, good], &[]);
    let floor = Policy::default();
    let text = closed(t.judge(&floor, &intent(&svc("anywhere", "10.1.0.0/16"))));
    assert!(text.contains("policy typo is invalid"), "{text}");
    // A valid policy that selects the namespace still admits.
    assert!(matches!(
        t.judge(&floor, &intent(&svc("team-b", "10.1.0.0/16"))),
        Verdict::Admitted { policy: Some(_) }
    ));
}

#[test]
fn reports_count_admitted_and_refused() {
    let t = Tenancy::new(
        &[
            policy("a", &["team-a"], &["10.0.0.0/8"]),
            policy("b", &["team-a", "team-b"], &["192.168.0.0/16"]),
        ],
        &[],
    );
    let floor = Policy::default();
    let services = [
        svc("team-a", "10.1.0.0/16"),
        svc("team-a", "192.168.1.0/24"),
        svc("team-a", "172.16.0.0/12"),
        svc("team-b", "10.1.0.0/16"),
        svc("other", "10.1.0.0/16"),
    ];
    let verdicts: Vec<(String, Verdict)> = services
        .iter()
        .map(|s| {
            (
                s.service.namespace().to_string(),
                t.judge(&floor, &intent(s)),
            )
        })
        .collect();
    let r = t.reports(verdicts.iter().map(|(n, v)| (n.as_str(), v)));
    assert_eq!(
        (r[0].name.as_str(), r[0].admitted, r[0].refused),
        ("a", 1, 1)
    );
    assert_eq!(
        (r[1].name.as_str(), r[1].admitted, r[1].refused),
        ("b", 1, 2)
    );
    assert!(r.iter().all(|r| r.accepted));
}

#[test]
fn a_namespace_that_is_not_known_is_not_guessed_when_policies_select_by_label() {
    let by_label = selecting("prod", "env", "prod", "10.0.0.0/8");
    let floor = Policy::default();
    let s = intent(&svc("shop", "10.1.0.0/16"));
    let t = Tenancy::new(
        std::slice::from_ref(&by_label),
        &[NamespaceSpec::new("other")],
    );
    match t.judge(&floor, &s) {
        Verdict::Unknown { reason } => {
            assert!(reason.contains("namespace shop is not known"), "{reason}")
        }
        other => panic!("expected unknown, got {other:?}"),
    }
    // With the Namespace known, it is judged.
    let t = Tenancy::new(
        &[by_label],
        &[NamespaceSpec::new("shop").with_label("env", "prod")],
    );
    assert!(matches!(t.judge(&floor, &s), Verdict::Admitted { .. }));
    // Policies that only name namespaces, or select by the name label, need no labels.
    let t = Tenancy::new(&[policy("p", &["shop"], &["10.0.0.0/8"])], &[]);
    assert!(matches!(t.judge(&floor, &s), Verdict::Admitted { .. }));
    let by_name_label = selecting("by-name", NAMESPACE_NAME_LABEL, "shop", "10.0.0.0/8");
    let t = Tenancy::new(std::slice::from_ref(&by_name_label), &[]);
    assert!(matches!(t.judge(&floor, &s), Verdict::Admitted { .. }));
    // With requireNamespacePolicy, an unknown namespace is simply not selected by labels:
    // closed, not guessed open.
    let strict = Policy {
        require_namespace_policy: true,
        ..Policy::default()
    };
    let by_label = selecting("prod", "env", "prod", "10.0.0.0/8");
    let t = Tenancy::new(&[by_label], &[]);
    let text = closed(t.judge(&strict, &s));
    assert!(text.contains("its Namespace object is not known"), "{text}");
}

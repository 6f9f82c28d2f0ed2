#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Properties of the policy: whatever Services and policies say, no rule opens a source,
//! pool or port that the policy admitting its Service does not permit, and a policy change
//! leaves no rule that the new policy forbids.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use nodeport_firewall_model::NamespaceSpec;
use nodeport_firewall_model::desired::ServiceStatus;
use nodeport_firewall_model::plan::PoolResolution;
use nodeport_firewall_model::{
    Action, Config, Limits, NodeSpec, Observation, ObservedRule, Plan, PolicySource, PoolName,
    PoolTarget, Protocol, ServiceSpec, ShapeRenderer, Target, Tenancy, desired_with, plan,
};
use proptest::prelude::*;

const POOLS: [&str; 3] = ["a", "b", "c"];
const NAMESPACES: [&str; 3] = ["team-a", "team-b", "free"];
/// Narrow and wide, private and public, and pieces that add up to the whole Internet.
const RANGES: [&str; 12] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "192.168.0.0/16",
    "203.0.113.0/24",
    "198.51.100.7/32",
    "2001:db8::/32",
    "fd00::/8",
    "0.0.0.0/1",
    "128.0.0.0/2",
    "192.0.0.0/3",
    "::/1",
    "0.0.0.0/0",
];
const PORT_RANGES: [&str; 4] = ["30000-30007", "30008", "30009-30031", "30000-30031"];

#[derive(Debug, Clone)]
struct World {
    services: Vec<ServiceSpec>,
    policies: Vec<PolicySource>,
    require: bool,
    allow_world_open: bool,
}

fn service(i: usize) -> impl Strategy<Value = ServiceSpec> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        prop::collection::btree_set(0i32..4, 1..3),
        prop::sample::subsequence(RANGES.to_vec(), 1..4),
        prop::option::of(prop::sample::subsequence(POOLS.to_vec(), 1..3)),
        0u8..10,
    )
        .prop_map(move |(ns, ports, ranges, pools, flavour)| {
            let mut s = ServiceSpec::nodeport(ns, &format!("s{i}")).enabled();
            for (k, offset) in ports.iter().enumerate() {
                // Node ports are unique in a cluster (the API server allocates them): Service
                // i gets some of 30000+4i..30000+4i+3.
                let port = 30000 + i as i32 * 4 + offset;
                s = s.with_port(&format!("p{k}"), "TCP", 1000 + k as i32, port);
            }
            s = s.with_ranges(&ranges.join(","));
            if let Some(p) = pools {
                s = s.with_annotation("node-pools", &p.join(","));
            }
            if flavour == 0 {
                s = s.with_annotation("enabled", "maybe"); // invalid: pinned
            }
            s
        })
}

fn policy(i: usize) -> impl Strategy<Value = PolicySource> {
    (
        prop::sample::subsequence(NAMESPACES[..2].to_vec(), 1..3),
        prop::sample::subsequence(RANGES.to_vec(), 0..4),
        prop::option::of(prop::sample::subsequence(POOLS.to_vec(), 0..3)),
        prop::option::of(prop::sample::subsequence(PORT_RANGES.to_vec(), 0..3)),
        prop::option::of(1i64..4),
        prop::bool::weighted(0.1),
        prop::bool::ANY,
    )
        .prop_map(
            move |(namespaces, ranges, pools, ports, max, broken, by_label)| {
                let mut ranges: Vec<String> = ranges.into_iter().map(String::from).collect();
                if broken {
                    ranges.push("10.0.0.0/33".into());
                }
                let (namespaces, namespace_selector) = if by_label {
                    // team-a carries team=a, team-b team=b: select the same namespaces by label.
                    let teams: Vec<String> = namespaces
                        .iter()
                        .map(|n| n.trim_start_matches("team-").to_string())
                        .collect();
                    let selector = LabelSelector {
                        match_expressions: Some(vec![LabelSelectorRequirement {
                            key: "team".into(),
                            operator: "In".into(),
                            values: Some(teams),
                        }]),
                        ..Default::default()
                    };
                    (None, Some(selector))
                } else {
                    (
                        Some(namespaces.into_iter().map(String::from).collect()),
                        None,
                    )
                };
                PolicySource {
                    name: format!("p{i}"),
                    namespaces,
                    namespace_selector,
                    allowed_source_ranges: ranges,
                    node_pools: pools.map(|p| p.into_iter().map(String::from).collect()),
                    node_ports: ports.map(|p| p.into_iter().map(String::from).collect()),
                    max_ranges_per_service: max,
                    ..Default::default()
                }
            },
        )
}

fn policies() -> impl Strategy<Value = Vec<PolicySource>> {
    (0usize..4).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
}

/// Policies, `requireNamespacePolicy` and `allowWorldOpen`: one generation of the rules.
type Rules = (Vec<PolicySource>, bool, bool);

/// Services, the rules of two generations, and which Services break an annotation in the
/// second (their rules are then kept, less what the new policy forbids).
fn world() -> impl Strategy<Value = (Vec<ServiceSpec>, [Rules; 2], Vec<bool>)> {
    let services = (0usize..8).prop_flat_map(|n| (0..n).map(service).collect::<Vec<_>>());
    let rules = || (policies(), prop::bool::ANY, prop::bool::ANY);
    (
        services,
        rules(),
        rules(),
        prop::collection::vec(prop::bool::weighted(0.3), 8),
    )
        .prop_map(|(s, a, b, broken)| (s, [a, b], broken))
}

fn namespaces() -> Vec<NamespaceSpec> {
    vec![
        NamespaceSpec::new("team-a").with_label("team", "a"),
        NamespaceSpec::new("team-b").with_label("team", "b"),
        NamespaceSpec::new("free"),
    ]
}

/// Whether `p` selects namespace `ns` (as the model must decide it).
fn selects(p: &PolicySource, ns: &str) -> bool {
    let by_name = p.namespaces.iter().flatten().any(|n| n == ns);
    let by_label = p.namespace_selector.as_ref().is_some_and(|s| {
        s.match_expressions
            .iter()
            .flatten()
            .any(|e| e.values.iter().flatten().any(|t| format!("team-{t}") == ns))
    });
    by_name || by_label
}

/// Whether the valid policy `p` permits opening `port` on `pool` from `net`.
fn permits(p: &PolicySource, net: &IpNet, pool: &str, port: u16) -> bool {
    if p.allowed_source_ranges
        .iter()
        .any(|r| r.parse::<IpNet>().is_err())
    {
        return false; // invalid: admits nothing
    }
    let allowed = nodeport_firewall_model::SourceSet::new(nets(&p.allowed_source_ranges));
    allowed.contains_net(net)
        && p.node_pools
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|x| x == pool))
        && p.node_ports.as_ref().is_none_or(|ps| {
            ps.iter().any(|t| {
                t.parse::<nodeport_firewall_model::PortRange>()
                    .is_ok_and(|r| r.contains(port))
            })
        })
}

fn make(services: &[ServiceSpec], rules: &Rules) -> World {
    World {
        services: services.to_vec(),
        policies: rules.0.clone(),
        require: rules.1,
        allow_world_open: rules.2,
    }
}

fn config(w: &World) -> Config {
    let mut c = Config::new("props");
    c.policy.require_namespace_policy = w.require;
    c.policy.allow_world_open = w.allow_world_open;
    c
}

fn nodes() -> Vec<NodeSpec> {
    POOLS
        .iter()
        .map(|p| NodeSpec::new(&format!("n-{p}")).with_label("karpenter.sh/nodepool", p))
        .collect()
}

fn resolutions() -> BTreeMap<PoolName, PoolResolution> {
    POOLS
        .iter()
        .map(|p| {
            let target = Target::new("memory", &format!("t-{p}"));
            (PoolName::new(*p), Ok(vec![PoolTarget::new(target, None)]))
        })
        .collect()
}

/// One target per pool; what the planner sees of it.
type Cloud = BTreeMap<Target, Vec<ObservedRule>>;

fn plan_on(w: &World, cloud: &Cloud) -> Plan {
    let d = desired_with(
        &config(w),
        &w.services,
        &nodes(),
        &Tenancy::new(&w.policies, &namespaces()),
    );
    let observations = resolutions()
        .into_values()
        .flatten()
        .flatten()
        .map(|pt| {
            let rules = cloud.get(&pt.target).cloned().unwrap_or_default();
            (pt.target, Ok(Observation::new(rules, Limits::default())))
        })
        .collect();
    plan(
        &d,
        "memory",
        &resolutions(),
        &observations,
        &ShapeRenderer::unnamed(),
    )
}

fn apply(cloud: &mut Cloud, plan: &Plan) {
    for tp in plan.targets.iter().filter(|t| t.error.is_none()) {
        let rules = cloud.entry(tp.target.clone()).or_default();
        for c in &tp.changes {
            match c.action {
                Action::Remove => rules.retain(|r| r.id != c.id),
                Action::Update => {
                    if let Some(r) = rules.iter_mut().find(|r| r.id == c.id) {
                        r.rule = c.rule.clone();
                    }
                }
                Action::Add => {
                    let id = format!("r{}-{}", rules.len(), c.rule.content.ports[0].from);
                    rules.push(ObservedRule::new(Some(id), c.rule.clone(), true));
                }
                _ => {}
            }
        }
    }
}

fn nets(texts: &[String]) -> Vec<IpNet> {
    texts.iter().filter_map(|t| t.parse().ok()).collect()
}

/// Every rule in `cloud` is permitted: each port it opens belongs to a Service it serves
/// that `w` admits, and the admitting policy (or, for unselected namespaces, the floor)
/// permits the rule's sources, its pool and that port.
fn check_permitted(w: &World, cloud: &Cloud, plan: &Plan) -> Result<(), TestCaseError> {
    let reports: BTreeMap<_, _> = plan
        .services
        .iter()
        .map(|r| (r.service.clone(), r))
        .collect();
    let by_name: BTreeMap<&str, &PolicySource> =
        w.policies.iter().map(|p| (p.name.as_str(), p)).collect();
    for (target, rules) in cloud {
        let pool = target.id.trim_start_matches("t-");
        for r in rules {
            for net in &r.rule.content.sources {
                prop_assert!(
                    w.allow_world_open || net.prefix_len() >= 8,
                    "{net} is wider than the floor allows: {:?}",
                    r.rule
                );
            }
            for range in &r.rule.content.ports {
                for port in range.from..=range.to {
                    let owner = r.rule.services.iter().find(|s| {
                        w.services.iter().any(|spec| {
                            spec.service == **s
                                && spec
                                    .ports
                                    .iter()
                                    .any(|p| p.node_port == Some(i32::from(port)))
                        })
                    });
                    let Some(owner) = owner else {
                        return Err(TestCaseError::fail(format!(
                            "port {port} of {:?} belongs to none of its Services",
                            r.rule
                        )));
                    };
                    let report = reports[owner];
                    let ns = owner.namespace();
                    let selecting: Vec<&PolicySource> =
                        w.policies.iter().filter(|p| selects(p, ns)).collect();
                    match (report.status, report.policy.as_deref()) {
                        (ServiceStatus::Managed, Some(name)) => {
                            let p = by_name[name];
                            for net in &r.rule.content.sources {
                                prop_assert!(
                                    permits(p, net, pool, port),
                                    "{net} to {pool}:{port} opened for {owner} outside policy {name}"
                                );
                            }
                        }
                        (ServiceStatus::Managed | ServiceStatus::Invalid, _) => {
                            // Unselected (floor only), or an invalid Service's kept rule: some
                            // policy that selects it must permit it all, or none selects it.
                            if selecting.is_empty() {
                                prop_assert!(!w.require, "{owner} opened with no policy");
                            } else {
                                let ok = selecting.iter().any(|p| {
                                    r.rule
                                        .content
                                        .sources
                                        .iter()
                                        .all(|net| permits(p, net, pool, port))
                                });
                                prop_assert!(
                                    ok,
                                    "{owner} ({:?}) holds {pool}:{port} from {:?}, which no policy of {ns} permits",
                                    report.status,
                                    r.rule.content.sources
                                );
                            }
                        }
                        (status, _) => {
                            return Err(TestCaseError::fail(format!(
                                "port {port} of {:?} is open for {owner}, which is {status:?}",
                                r.rule
                            )));
                        }
                    }
                    prop_assert_eq!(r.rule.content.protocol, Protocol::Tcp);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// No rule opens a source, pool or port that the admitting policy does not permit.
    #[test]
    fn rules_stay_inside_the_admitting_policy((services, rules, _) in world()) {
        let w = make(&services, &rules[0]);
        let mut cloud = Cloud::new();
        let p = plan_on(&w, &cloud);
        apply(&mut cloud, &p);
        check_permitted(&w, &cloud, &p)?;
    }

    /// Changing the policies (tightening, loosening, breaking them) and re-planning leaves
    /// no rule that the new policies forbid, and every removal because of a closed Service
    /// says so in the plan.
    #[test]
    fn a_policy_change_leaves_no_forbidden_rule((services, rules, broken) in world()) {
        let before = make(&services, &rules[0]);
        let mut after = make(&services, &rules[1]);
        // Some Services break an annotation as the policy changes: their rules are kept,
        // but not what the new policy forbids.
        for (s, broken) in after.services.iter_mut().zip(&broken) {
            if *broken {
                *s = s.clone().with_annotation("ports", "no-such-port");
            }
        }
        let mut cloud = Cloud::new();
        let p = plan_on(&before, &cloud);
        apply(&mut cloud, &p);
        let p = plan_on(&after, &cloud);
        let closed: Vec<_> = p
            .services
            .iter()
            .filter(|r| r.status == ServiceStatus::Closed)
            .map(|r| r.service.clone())
            .collect();
        for tp in &p.targets {
            for c in tp.of(Action::Remove) {
                if c.rule.services.iter().any(|s| closed.contains(s)) {
                    let note = c.note.as_deref().unwrap_or_default();
                    prop_assert!(note.starts_with("closed: "), "{note:?}");
                }
            }
            for c in tp.of(Action::Keep) {
                prop_assert!(
                    !c.rule.services.iter().any(|s| closed.contains(s)),
                    "a kept rule serves a closed Service: {:?}",
                    c.rule
                );
            }
        }
        apply(&mut cloud, &p);
        check_permitted(&after, &cloud, &p)?;
        // And the next plan is empty: the removal happened at this reconcile.
        let again = plan_on(&after, &cloud);
        prop_assert!(!again.has_changes(), "{:?}", again.summary);
    }
}

/// Any text at all, weighted towards the shapes the parsers look for.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9./:a-f, -]{0,40}",
        "[A-Za-z0-9./_-]{0,70}",
        prop::sample::select(vec![
            "",
            "-",
            "0",
            "65536",
            "30000-",
            "-30000",
            "1-0",
            "::/129",
            "0.0.0.0/0",
            "a/b/c",
            "In",
            "Exists",
            "999999999999999999999",
        ])
        .prop_map(String::from),
    ]
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No policy, namespace label or annotation makes the planner panic: a bad policy is
    /// reported on its status, never a crash.
    #[test]
    fn no_input_panics(
        names in texts(),
        ranges in texts(),
        pools in prop::option::of(texts()),
        ports in prop::option::of(texts()),
        limits in (prop::option::of(any::<i64>()), prop::option::of(any::<i64>())),
        selector in prop::collection::vec((text(), text(), texts()), 0..3),
        labels in prop::collection::btree_map(text(), text(), 0..3),
        annotations in (text(), text(), text()),
    ) {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
        let policy = PolicySource {
            name: "fuzz".into(),
            namespace_selector: Some(LabelSelector {
                match_labels: Some(labels.clone()),
                match_expressions: Some(
                    selector
                        .into_iter()
                        .map(|(key, operator, values)| LabelSelectorRequirement {
                            key,
                            operator,
                            values: Some(values),
                        })
                        .collect(),
                ),
            }),
            namespaces: Some(names),
            allowed_source_ranges: ranges,
            node_pools: pools,
            node_ports: ports,
            max_ranges_per_service: limits.0,
            max_ports_per_service: limits.1,
        };
        let mut ns = nodeport_firewall_model::NamespaceSpec::new("team-a");
        ns.labels.extend(labels);
        let svc = ServiceSpec::nodeport("team-a", "s")
            .with_port("p", "TCP", 80, 30080)
            .enabled()
            .with_ranges(&annotations.0)
            .with_annotation("node-pools", &annotations.1)
            .with_annotation("ports", &annotations.2);
        let tenancy = Tenancy::new(&[policy], &[ns]);
        for require in [false, true] {
            let mut c = Config::new("fuzz");
            c.policy.require_namespace_policy = require;
            let d = desired_with(&c, std::slice::from_ref(&svc), &nodes(), &tenancy);
            prop_assert_eq!(d.policies.len(), 1);
            prop_assert_eq!(d.services.len(), 1);
        }
    }
}

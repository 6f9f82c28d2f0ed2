#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Rules evaluated in priority order, first match wins: on random sets of foreign Allows
//! and Denies, whatever the plan counts as allowed is allowed once it is applied.
//!
//! A packet is checked by evaluating every rule of the target (the observed ones, and
//! ours as the plan leaves them) in the cloud's order: by priority, a Deny before an
//! Allow of the same priority where the cloud says so (GCP).

use std::net::IpAddr;

use ipnet::IpNet;
use nodeport_firewall_model::plan::PoolResolution;
use nodeport_firewall_model::{
    Action, Config, Denial, IpFamily, Limits, NodeSpec, Observation, ObservedRule, PoolName,
    PoolTarget, PortRange, PriorityRange, Protocol, Rule, RuleContent, ServiceSpec, ShapeRenderer,
    Target, desired, plan,
};
use proptest::prelude::*;

const SOURCES: [&str; 4] = ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "0.0.0.0/0"];

/// One packet: protocol, port, source address.
type Packet = (Protocol, u16, IpAddr);

#[derive(Debug, Clone)]
enum Seen {
    Allow {
        port: u16,
        source: usize,
        priority: u32,
    },
    Deny {
        protocol: Option<Protocol>,
        ports: Option<(u16, u16)>,
        source: Option<usize>,
        priority: u32,
    },
}

fn seen() -> impl Strategy<Value = Seen> {
    prop_oneof![
        (30080u16..30083, 0..3usize, 90u32..130).prop_map(|(port, source, priority)| {
            Seen::Allow {
                port,
                source,
                priority,
            }
        }),
        (
            prop::option::of(prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]),
            prop::option::of((30078u16..30084, 0u16..3)),
            prop::option::of(0..SOURCES.len()),
            90u32..130,
        )
            .prop_map(|(protocol, ports, source, priority)| Seen::Deny {
                protocol,
                ports: ports.map(|(from, len)| (from, from + len)),
                source,
                priority,
            }),
    ]
}

fn net(i: usize) -> IpNet {
    SOURCES[i].parse().unwrap()
}

fn observed(i: usize, s: &Seen) -> ObservedRule {
    let (content, deny, priority) = match s {
        Seen::Allow {
            port,
            source,
            priority,
        } => (
            RuleContent {
                scope: None,
                family: IpFamily::V4,
                protocol: Protocol::Tcp,
                ports: vec![PortRange::single(*port)],
                sources: vec![net(*source)],
            },
            None,
            *priority,
        ),
        Seen::Deny {
            protocol,
            ports,
            source,
            priority,
        } => (
            RuleContent {
                scope: None,
                family: IpFamily::V4,
                protocol: protocol.unwrap_or(Protocol::Tcp),
                ports: Vec::new(),
                sources: Vec::new(),
            },
            Some(Denial {
                protocol: *protocol,
                ports: ports
                    .map(|(from, to)| vec![PortRange { from, to }])
                    .unwrap_or_default(),
                sources: source.map(|s| vec![net(s)]).unwrap_or_default(),
                scopes: Vec::new(),
            }),
            *priority,
        ),
    };
    let mut r = ObservedRule::new(
        Some(format!("r{i}")),
        Rule {
            name: Some(format!("r{i}")),
            content,
            services: Default::default(),
            pools: Default::default(),
        },
        false,
    );
    r.priority = Some(priority);
    r.deny = deny;
    r
}

/// A rule as the evaluation sees it: what it matches, whether it allows, its priority.
struct Evaluated {
    matches: Box<dyn Fn(&Packet) -> bool>,
    allows: bool,
    priority: u32,
}

fn evaluated(r: &ObservedRule) -> Evaluated {
    let priority = r.priority.unwrap();
    match r.deny.clone() {
        Some(d) => Evaluated {
            matches: Box::new(move |(proto, port, ip)| {
                d.protocol.is_none_or(|p| p == *proto)
                    && (d.ports.is_empty() || d.ports.iter().any(|r| r.contains(*port)))
                    && (d.sources.is_empty() || d.sources.iter().any(|s| s.contains(ip)))
            }),
            allows: false,
            priority,
        },
        None => {
            let c = r.rule.content.clone();
            Evaluated {
                matches: Box::new(move |(proto, port, ip)| {
                    c.protocol == *proto
                        && c.ports.iter().any(|r| r.contains(*port))
                        && c.sources.iter().any(|s| s.contains(ip))
                }),
                allows: true,
                priority,
            }
        }
    }
}

/// Whether the first rule that matches `packet` allows it.
fn allowed(rules: &[Evaluated], packet: &Packet, deny_wins_ties: bool) -> bool {
    let mut order: Vec<&Evaluated> = rules.iter().collect();
    order.sort_by_key(|r| (r.priority, deny_wins_ties == r.allows));
    order
        .into_iter()
        .find(|r| (r.matches)(packet))
        .is_some_and(|r| r.allows)
}

/// Packets at the edges of what `content` allows.
fn packets(content: &RuleContent) -> Vec<Packet> {
    let mut out = Vec::new();
    for range in &content.ports {
        for port in [range.from, range.to] {
            for s in &content.sources {
                for ip in [s.network(), s.broadcast()] {
                    out.push((content.protocol, port, ip));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn what_the_plan_counts_as_allowed_is_allowed(
        rules in prop::collection::vec(seen(), 0..8),
        ports in prop::collection::btree_set(30080u16..30083, 1..3),
        source in 0..3usize,
        gcp in any::<bool>(),
    ) {
        let limits = if gcp {
            Limits { own_priority: Some(110), deny_wins_ties: true, ..Limits::default() }
        } else {
            Limits {
                priorities: Some(PriorityRange { from: 100, to: 120 }),
                ..Limits::default()
            }
        };
        // Azure priorities are unique: two rules of others never share one there.
        let mut taken = std::collections::BTreeSet::new();
        let observed: Vec<ObservedRule> = rules
            .iter()
            .enumerate()
            .map(|(i, s)| observed(i, s))
            .filter(|r| gcp || taken.insert(r.priority))
            .collect();
        let mut svc = ServiceSpec::nodeport("shop", "web").enabled().with_ranges(SOURCES[source]);
        for p in &ports {
            svc = svc.with_port(&format!("p{p}"), "TCP", 80, i32::from(*p));
        }
        let nodes = [NodeSpec::new("n").with_label("nodeport-firewall.io/pool", "a")];
        let d = desired(&Config::new("c"), &[svc], &nodes);
        let target = Target::new("test", "t");
        let resolutions: std::collections::BTreeMap<PoolName, PoolResolution> =
            [(PoolName::new("a"), Ok(vec![PoolTarget::new(target.clone(), None)]))].into();
        let observations =
            [(target, Ok(Observation::new(observed.clone(), limits.clone())))].into();
        let p = plan(&d, "test", &resolutions, &observations, &ShapeRenderer::unnamed());
        let tp = &p.targets[0];
        if tp.error.is_some() {
            // Refused before any write: nothing is claimed.
            return Ok(());
        }
        // The target as the plan leaves it: the rules of others, and ours at their
        // priorities.
        let mut after: Vec<Evaluated> = observed.iter().map(evaluated).collect();
        for c in tp.changes.iter().filter(|c| matches!(c.action, Action::Add | Action::Update | Action::Unchanged)) {
            let mut ours = ObservedRule::new(None, c.rule.clone(), true);
            ours.priority = c.priority.or(limits.own_priority);
            after.push(evaluated(&ours));
        }
        for c in &tp.changes {
            if matches!(c.action, Action::SatisfiedByForeign | Action::Add | Action::Update | Action::Unchanged) {
                for packet in packets(&c.rule.content) {
                    prop_assert!(
                        allowed(&after, &packet, limits.deny_wins_ties),
                        "{:?} {:?} is not allowed: {packet:?}\nrules: {observed:#?}\nplan: {:#?}",
                        c.action, c.rule.content, tp.changes
                    );
                }
            }
        }
    }
}

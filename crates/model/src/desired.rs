//! The desired state: for every node pool, the grants its Services ask for.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::annotations::{Admission, RangeCache, ServiceIntent, admit_cached};
use crate::config::{Config, PortMerge};
use crate::net::SourceSet;
use crate::node::{NodeSpec, PoolName};
use crate::policy::{PolicyReport, Tenancy, Verdict};
use crate::rule::Protocol;
use crate::service::{ServiceRef, ServiceSpec};

pub use crate::annotations::PoolSelector;

/// One node port of one protocol, and the Service that asked for it from a source set. A
/// port belongs to one Service: two claimants are a conflict and neither is planned.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortGrant {
    pub port: u16,
    /// The Service's rank in the sorted order of all Services, so that renderers sort
    /// integers rather than names.
    pub rank: u32,
    pub service: ServiceRef,
}

/// A protocol, a set of node ports, a set of sources, and the Services served. Grants are
/// keyed by (protocol, sources): a port is only ever granted to its own Service's sources.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub protocol: Protocol,
    pub sources: SourceSet,
    /// Sorted by port, one entry per port.
    pub ports: Vec<PortGrant>,
}

/// A node pool as the cluster shows it.
#[derive(Debug, Clone)]
pub struct PoolState {
    pub name: PoolName,
    pub managed: bool,
    pub nodes: Vec<NodeSpec>,
    /// Layers of grants: the layer of Services that ask for every pool is shared by all
    /// pools (one allocation, not one per pool); a pool named by Services gets one more.
    pub grants: Vec<Arc<Vec<Grant>>>,
}

/// What happened to one Service, for the plan output, Events and conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReport {
    pub service: ServiceRef,
    /// `managed`, `unmanaged`, `invalid` or `closed`.
    pub status: ServiceStatus,
    /// Why it is unmanaged or closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The namespace policy that admitted it (managed), or what refused it (closed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The managed pools this Service's ports are opened on (shared: most Services ask for
    /// all pools).
    #[serde(default, skip_serializing_if = "<[PoolName]>::is_empty")]
    pub pools: Arc<[PoolName]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceStatus {
    Managed,
    Unmanaged,
    /// Its annotations cannot be read: its rules are kept exactly as they are.
    Invalid,
    /// Refused by the policy: its rules are removed.
    Closed,
}

/// The desired state of the whole cluster.
#[derive(Debug, Clone)]
pub struct Desired {
    pub cluster: String,
    pub port_merge: PortMerge,
    pub pools: BTreeMap<PoolName, PoolState>,
    /// One report per Service given, sorted. Shared with the plans made from it.
    pub services: Arc<Vec<ServiceReport>>,
    /// Nodes that carry none of the pool labels.
    pub unpooled_nodes: Vec<String>,
    /// How many Nodes were given.
    pub nodes: usize,
    /// The labels that named each pool's Nodes (what a node could forge, if a kubelet may
    /// set the label: see [`crate::node::kubelet_may_set`]). Empty when the config trusts
    /// them (`trustNodePoolLabels`).
    pub pool_label_keys: BTreeMap<PoolName, BTreeSet<String>>,
    /// Invalid Services: their existing rules are kept exactly as they are.
    pub pinned: BTreeSet<ServiceRef>,
    /// Services the policy refused, with why: their rules are removed, and the plan says so.
    pub closed: BTreeMap<ServiceRef, Arc<str>>,
    /// The node ports of closed and invalid Services: what a rule kept for another reason
    /// gives up when the policy closes them (see `crate::narrow`).
    pub held_ports: BTreeMap<ServiceRef, Vec<(Protocol, u16)>>,
    /// The policy, to judge what a kept rule still opens for an invalid Service.
    pub tenancy: Arc<Tenancy>,
    pub floor: crate::config::Policy,
    /// The status of every namespace policy, by name.
    pub policies: Vec<PolicyReport>,
}

impl Desired {
    pub fn managed_pools(&self) -> impl Iterator<Item = &PoolState> {
        self.pools.values().filter(|p| p.managed)
    }
}

type GrantMap = FxHashMap<(Protocol, SourceSet), Vec<PortGrant>>;

fn add_intent(map: &mut GrantMap, intent: &ServiceIntent, rank: usize) {
    let rank = u32::try_from(rank).unwrap_or(u32::MAX);
    if intent.sources.is_empty() {
        return;
    }
    for (protocol, port) in &intent.ports {
        map.entry((*protocol, intent.sources.clone()))
            .or_default()
            .push(PortGrant {
                port: *port,
                rank,
                service: intent.service.clone(),
            });
    }
}

fn into_grants(map: GrantMap) -> Vec<Grant> {
    let mut grants: Vec<Grant> = map
        .into_iter()
        .map(|((protocol, sources), ports)| Grant {
            protocol,
            sources,
            ports: {
                let mut ports = ports;
                ports.sort_unstable_by_key(|p| (p.port, p.rank));
                ports
            },
        })
        .collect();
    grants.sort_by(|a, b| (a.protocol, &a.sources).cmp(&(b.protocol, &b.sources)));
    grants
}

/// Computes the desired state with no namespace policies: only the operator config's floor
/// judges the Services.
pub fn desired(config: &Config, services: &[ServiceSpec], nodes: &[NodeSpec]) -> Desired {
    desired_with(config, services, nodes, &Tenancy::default())
}

/// Computes the desired state. Pure and total: no input makes it fail or panic; every
/// problem is reported on the Service, Node or policy it concerns.
pub fn desired_with(
    config: &Config,
    services: &[ServiceSpec],
    nodes: &[NodeSpec],
    tenancy: &Tenancy,
) -> Desired {
    // Pools: every pool named by a Node label, plus every pool listed in the config.
    let mut pools: BTreeMap<PoolName, PoolState> = BTreeMap::new();
    let mut unpooled_nodes = Vec::new();
    for name in config.pools.keys() {
        pools.insert(name.clone(), new_pool(config, name));
    }
    let mut pool_label_keys: BTreeMap<PoolName, BTreeSet<String>> = BTreeMap::new();
    for node in nodes {
        match node.pool_and_label(&config.pool_labels) {
            Some((pool, key)) => {
                if !config.trust_node_pool_labels
                    && !pool_label_keys.get(&pool).is_some_and(|k| k.contains(key))
                {
                    pool_label_keys
                        .entry(pool.clone())
                        .or_default()
                        .insert(key.to_string());
                }
                pools
                    .entry(pool.clone())
                    .or_insert_with(|| new_pool(config, &pool))
                    .nodes
                    .push(node.clone())
            }
            None => unpooled_nodes.push(node.name.clone()),
        }
    }
    unpooled_nodes.sort();

    // Admission, per Service, in Service order: a Service's rank is its index here, and
    // the reports come out sorted.
    let mut services: Vec<&ServiceSpec> = services.iter().collect();
    services.sort_by(|a, b| a.service.cmp(&b.service));
    let mut reports = Vec::with_capacity(services.len());
    let mut intents: Vec<(ServiceIntent, usize)> = Vec::new();
    let mut pinned = BTreeSet::new();
    let mut closed = BTreeMap::new();
    let mut held_ports: BTreeMap<ServiceRef, Vec<(Protocol, u16)>> = BTreeMap::new();
    let mut verdicts: Vec<(ServiceRef, Verdict)> = Vec::new();
    let mut range_cache = RangeCache::default();
    let no_pools: Arc<[PoolName]> = Arc::from(Vec::new());
    for svc in services {
        let mut report = ServiceReport {
            service: svc.service.clone(),
            status: ServiceStatus::Managed,
            reason: None,
            policy: None,
            errors: Vec::new(),
            warnings: Vec::new(),
            pools: Arc::clone(&no_pools),
        };
        match admit_cached(svc, config, &mut range_cache) {
            Admission::Managed(intent) => {
                report.warnings = intent.warnings.clone();
                let verdict = tenancy.judge(&config.policy, &intent);
                match &verdict {
                    Verdict::Admitted { policy } => {
                        report.policy = policy.clone();
                        // The load balancer's health checks probe healthCheckNodePort
                        // (externalTrafficPolicy: Local): open it to where they come from.
                        if let Some(hc) = svc
                            .health_check_node_port
                            .and_then(|p| u16::try_from(p).ok())
                            && hc > 0
                            && !config.health_check_sources.is_empty()
                        {
                            let probe = ServiceIntent {
                                service: intent.service.clone(),
                                ports: vec![(Protocol::Tcp, hc)],
                                sources: config.health_check_sources.clone(),
                                pools: intent.pools.clone(),
                                warnings: Vec::new(),
                            };
                            intents.push((probe, reports.len()));
                        }
                        intents.push((intent, reports.len()));
                    }
                    Verdict::Unknown { reason } => {
                        report.status = ServiceStatus::Invalid;
                        report.errors = vec![reason.clone()];
                        pinned.insert(svc.service.clone());
                        held_ports.insert(svc.service.clone(), intent.ports.clone());
                    }
                    Verdict::Closed { by, reasons } => {
                        let why = reasons.join("; ");
                        report.status = ServiceStatus::Closed;
                        report.policy = Some(by.clone());
                        closed.insert(svc.service.clone(), Arc::from(why.as_str()));
                        held_ports.insert(svc.service.clone(), intent.ports.clone());
                        report.reason = Some(why);
                    }
                }
                verdicts.push((svc.service.clone(), verdict));
            }
            Admission::Unmanaged { reason } => {
                report.status = ServiceStatus::Unmanaged;
                report.reason = Some(reason);
            }
            Admission::Invalid { errors, warnings } => {
                report.status = ServiceStatus::Invalid;
                report.errors = errors;
                report.warnings = warnings;
                pinned.insert(svc.service.clone());
                held_ports.insert(svc.service.clone(), node_ports(svc));
            }
        }
        reports.push(report);
    }

    // Two Services claiming the same node port would let one's sources reach the other's
    // port: neither is planned until the conflict is gone.
    let mut claims: Vec<((Protocol, u16), usize)> = intents
        .iter()
        .enumerate()
        .flat_map(|(i, (intent, _))| intent.ports.iter().map(move |k| (*k, i)))
        .collect();
    claims.sort_unstable();
    let mut conflicted: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for group in claims.chunk_by(|a, b| a.0 == b.0) {
        if let [((protocol, port), _), _, ..] = group {
            for (_, i) in group {
                let others: Vec<String> = group
                    .iter()
                    .filter(|(_, j)| j != i)
                    .map(|(_, j)| intents[*j].0.service.to_string())
                    .collect();
                conflicted.entry(*i).or_default().push(format!(
                    "nodePort {protocol}/{port} is also claimed by {}",
                    others.join(", ")
                ));
            }
        }
    }
    let mut valid = Vec::with_capacity(intents.len());
    for (i, (intent, report_idx)) in intents.into_iter().enumerate() {
        if let Some(mut errors) = conflicted.remove(&i) {
            errors.sort();
            let report = &mut reports[report_idx];
            report.status = ServiceStatus::Invalid;
            report.errors = errors;
            held_ports.insert(intent.service.clone(), intent.ports.clone());
            pinned.insert(intent.service.clone());
        } else {
            valid.push((intent, report_idx));
        }
    }

    // Grants: Services that ask for all pools are grouped once and shared.
    let mut all_map: GrantMap = FxHashMap::default();
    let mut named: Vec<(&ServiceIntent, usize)> = Vec::new();
    let managed: Arc<[PoolName]> = pools
        .values()
        .filter(|p| p.managed)
        .map(|p| p.name.clone())
        .collect();
    for (intent, report_idx) in &valid {
        let report = &mut reports[*report_idx];
        match &intent.pools {
            PoolSelector::All => {
                add_intent(&mut all_map, intent, *report_idx);
                report.pools = Arc::clone(&managed);
            }
            PoolSelector::Named(names) => {
                let mut on = Vec::new();
                for name in names {
                    match pools.get(name) {
                        None => {
                            // Pool names are label values: `Web` is not `web`, but it is
                            // most likely what was meant.
                            let hint = pools
                                .keys()
                                .find(|p| {
                                    p.as_str().eq_ignore_ascii_case(name.as_str())
                                        || crate::annotations::similar(p.as_str(), name.as_str())
                                })
                                .map(|p| format!("; did you mean {p}?"))
                                .unwrap_or_default();
                            report.warnings.push(format!(
                                "pool {name} has no nodes and is not in the config{hint}"
                            ))
                        }
                        Some(p) if !p.managed => {
                            report.warnings.push(format!("pool {name} is not managed"))
                        }
                        Some(_) => on.push(name.clone()),
                    }
                }
                report.pools = on.into();
                named.push((intent, *report_idx));
            }
        }
        if report.pools.is_empty() && !intent.ports.is_empty() {
            report
                .warnings
                .push("no managed pool to open its ports on".to_string());
        }
    }
    let all_grants = Arc::new(into_grants(all_map));
    for pool in pools.values_mut().filter(|p| p.managed) {
        let extra: Vec<&(&ServiceIntent, usize)> = named
            .iter()
            .filter(|(i, _)| matches!(&i.pools, PoolSelector::Named(n) if n.contains(&pool.name)))
            .collect();
        pool.grants = vec![Arc::clone(&all_grants)];
        if !extra.is_empty() {
            let mut map: GrantMap = FxHashMap::default();
            for (intent, rank) in extra {
                add_intent(&mut map, intent, *rank);
            }
            pool.grants.push(Arc::new(into_grants(map)));
        }
    }

    let policies = tenancy.reports(verdicts.iter().map(|(s, v)| (s.namespace(), v)));
    Desired {
        cluster: config.cluster_name.clone(),
        port_merge: config.policy.port_merge,
        pools,
        services: Arc::new(reports),
        unpooled_nodes,
        nodes: nodes.len(),
        pool_label_keys,
        pinned,
        closed,
        held_ports,
        tenancy: Arc::new(tenancy.clone()),
        floor: config.policy.clone(),
        policies,
    }
}

/// The node ports a Service's spec declares, whatever its annotations say: what rules of an
/// invalid Service may hold.
fn node_ports(svc: &ServiceSpec) -> Vec<(Protocol, u16)> {
    let mut ports: Vec<(Protocol, u16)> = svc
        .ports
        .iter()
        .filter_map(|p| {
            let protocol = p.protocol.parse::<Protocol>().ok()?;
            let port = u16::try_from(p.node_port?).ok()?;
            Some((protocol, port))
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn new_pool(config: &Config, name: &PoolName) -> PoolState {
    PoolState {
        name: name.clone(),
        managed: config.pool_managed(name),
        nodes: Vec::new(),
        grants: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL_LABEL: &str = "eks.amazonaws.com/nodegroup";

    fn nodes() -> Vec<NodeSpec> {
        vec![
            NodeSpec::new("a1").with_label(POOL_LABEL, "a"),
            NodeSpec::new("b1").with_label(POOL_LABEL, "b"),
            NodeSpec::new("loose"),
        ]
    }

    fn svc(name: &str, port: i32, ranges: &str) -> ServiceSpec {
        ServiceSpec::nodeport("default", name)
            .with_port("", "TCP", 80, port)
            .enabled()
            .with_ranges(ranges)
    }

    fn ports_of(pool: &PoolState) -> Vec<(u16, String)> {
        let mut out: Vec<(u16, String)> = pool
            .grants
            .iter()
            .flat_map(|layer| layer.iter())
            .flat_map(|g| g.ports.iter().map(move |p| (p.port, g.sources.to_string())))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn services_are_placed_on_their_pools() {
        let services = vec![
            svc("everywhere", 30001, "10.0.0.0/8"),
            svc("only-b", 30002, "10.0.0.0/8").with_annotation("node-pools", "b"),
        ];
        let d = desired(&Config::new("c"), &services, &nodes());
        assert_eq!(d.unpooled_nodes, vec!["loose"]);
        assert_eq!(
            ports_of(&d.pools[&PoolName::new("a")]),
            vec![(30001, "10.0.0.0/8".into())]
        );
        assert_eq!(
            ports_of(&d.pools[&PoolName::new("b")]),
            vec![(30001, "10.0.0.0/8".into()), (30002, "10.0.0.0/8".into())]
        );
    }

    #[test]
    fn conflicting_node_ports_pin_both_services() {
        let services = vec![
            svc("one", 30001, "10.0.0.0/8"),
            svc("two", 30001, "192.168.0.0/16"),
        ];
        let d = desired(&Config::new("c"), &services, &nodes());
        assert_eq!(d.pinned.len(), 2);
        assert!(
            d.services
                .iter()
                .all(|r| r.status == ServiceStatus::Invalid)
        );
        assert!(d.services[0].errors[0].contains("also claimed by default/two"));
        assert!(
            d.pools
                .values()
                .all(|p| p.grants.iter().all(|l| l.is_empty()))
        );
    }

    #[test]
    fn unmanaged_pools_get_nothing_and_named_unknown_pools_warn() {
        let mut config = Config::new("c");
        config.pools.insert(
            PoolName::new("b"),
            crate::config::PoolConfig {
                managed: Some(false),
                ..Default::default()
            },
        );
        let services =
            vec![svc("s", 30001, "10.0.0.0/8").with_annotation("node-pools", "b, ghost")];
        let d = desired(&config, &services, &nodes());
        assert!(
            d.pools[&PoolName::new("b")].grants.is_empty(),
            "unmanaged pools get no grants"
        );
        let w = &d.services[0].warnings;
        assert!(
            w.iter().any(|w| w.contains("pool b is not managed")),
            "{w:?}"
        );
        let typo = vec![svc("t", 30002, "10.0.0.0/8").with_annotation("node-pools", "A")];
        let d = desired(&config, &typo, &nodes());
        assert!(
            d.services[0].warnings[0].ends_with("did you mean a?"),
            "{:?}",
            d.services[0].warnings
        );
        assert!(
            w.iter().any(|w| w.contains("pool ghost has no nodes")),
            "{w:?}"
        );
        assert!(w.iter().any(|w| w.contains("no managed pool")), "{w:?}");
    }

    #[test]
    fn the_health_check_node_port_opens_to_the_configured_sources() {
        let mut lb =
            svc("lb", 30080, "10.0.0.0/8").with_type(crate::service::ServiceType::LoadBalancer);
        lb.health_check_node_port = Some(31999);
        let mut config = Config::new("c");
        let d = desired(&config, std::slice::from_ref(&lb), &nodes());
        assert_eq!(
            ports_of(&d.pools[&PoolName::new("a")]),
            vec![(30080, "10.0.0.0/8".into())]
        );
        config.health_check_sources = crate::net::parse_ranges("35.191.0.0/16 130.211.0.0/22")
            .unwrap()
            .set;
        let d = desired(&config, &[lb], &nodes());
        assert_eq!(
            ports_of(&d.pools[&PoolName::new("a")]),
            vec![
                (30080, "10.0.0.0/8".into()),
                (31999, "35.191.0.0/16,130.211.0.0/22".into())
            ]
        );
    }

    #[test]
    fn services_with_identical_sources_share_a_grant() {
        let services = vec![
            svc("x", 30001, "10.0.0.0/8"),
            svc("y", 30005, "10.0.0.0/8"),
            svc("z", 30003, "10.0.0.0/16"),
        ];
        let d = desired(&Config::new("c"), &services, &nodes());
        let a = &d.pools[&PoolName::new("a")];
        assert_eq!(a.grants.len(), 1, "one shared layer");
        assert_eq!(a.grants[0].len(), 2, "two source sets, two grants");
        assert!(Arc::ptr_eq(
            &a.grants[0],
            &d.pools[&PoolName::new("b")].grants[0]
        ));
    }
}

//! The desired state: for every node pool, the grants its Services ask for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;

use crate::annotations::{Admission, ServiceIntent, admit};
use crate::config::{Config, PortMerge};
use crate::net::SourceSet;
use crate::node::{NodeSpec, PoolName};
use crate::rule::Protocol;
use crate::service::{ServiceRef, ServiceSpec};

/// The pools a Service asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolSelector {
    /// Every managed pool (the default).
    All,
    Named(BTreeSet<PoolName>),
}

/// One node port of one protocol, and the Services that asked for it from a source set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortGrant {
    pub port: u16,
    pub services: Vec<ServiceRef>,
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
    /// Shared between pools that receive exactly the same Services.
    pub grants: Arc<Vec<Grant>>,
}

/// What happened to one Service, for the plan output, Events and conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReport {
    pub service: ServiceRef,
    /// `managed`, `unmanaged` or `invalid`.
    pub status: ServiceStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The managed pools this Service's ports are opened on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceStatus {
    Managed,
    Unmanaged,
    Invalid,
}

/// The desired state of the whole cluster.
#[derive(Debug, Clone)]
pub struct Desired {
    pub cluster: String,
    pub port_merge: PortMerge,
    pub pools: BTreeMap<PoolName, PoolState>,
    /// One report per Service given, sorted.
    pub services: Vec<ServiceReport>,
    /// Nodes that carry none of the pool labels.
    pub unpooled_nodes: Vec<String>,
    /// Invalid Services: their existing rules are kept exactly as they are.
    pub pinned: BTreeSet<ServiceRef>,
}

impl Desired {
    pub fn managed_pools(&self) -> impl Iterator<Item = &PoolState> {
        self.pools.values().filter(|p| p.managed)
    }
}

type GrantMap = HashMap<(Protocol, SourceSet), BTreeMap<u16, Vec<ServiceRef>>>;

fn add_intent(map: &mut GrantMap, intent: &ServiceIntent) {
    if intent.sources.is_empty() {
        return;
    }
    for (protocol, port) in &intent.ports {
        map.entry((*protocol, intent.sources.clone()))
            .or_default()
            .entry(*port)
            .or_default()
            .push(intent.service.clone());
    }
}

fn into_grants(map: GrantMap) -> Vec<Grant> {
    let mut grants: Vec<Grant> = map
        .into_iter()
        .map(|((protocol, sources), ports)| Grant {
            protocol,
            sources,
            ports: ports
                .into_iter()
                .map(|(port, mut services)| {
                    services.sort();
                    services.dedup();
                    PortGrant { port, services }
                })
                .collect(),
        })
        .collect();
    grants.sort_by(|a, b| (a.protocol, &a.sources).cmp(&(b.protocol, &b.sources)));
    grants
}

/// Unions grants, e.g. of several pools that share one scope on one target.
pub fn merge_grants<'a>(sets: impl IntoIterator<Item = &'a [Grant]>) -> Vec<Grant> {
    let mut map: GrantMap = HashMap::new();
    for grants in sets {
        for g in grants {
            let entry = map.entry((g.protocol, g.sources.clone())).or_default();
            for p in &g.ports {
                entry
                    .entry(p.port)
                    .or_default()
                    .extend(p.services.iter().cloned());
            }
        }
    }
    into_grants(map)
}

/// Computes the desired state. Pure and total: no input makes it fail or panic; every
/// problem is reported on the Service or Node it concerns.
pub fn desired(config: &Config, services: &[ServiceSpec], nodes: &[NodeSpec]) -> Desired {
    // Pools: every pool named by a Node label, plus every pool listed in the config.
    let mut pools: BTreeMap<PoolName, PoolState> = BTreeMap::new();
    let mut unpooled_nodes = Vec::new();
    for name in config.pools.keys() {
        pools.insert(name.clone(), new_pool(config, name));
    }
    for node in nodes {
        match node.pool(&config.pool_labels) {
            Some(pool) => pools
                .entry(pool.clone())
                .or_insert_with(|| new_pool(config, &pool))
                .nodes
                .push(node.clone()),
            None => unpooled_nodes.push(node.name.clone()),
        }
    }
    unpooled_nodes.sort();

    // Admission, per Service.
    let mut reports = Vec::with_capacity(services.len());
    let mut intents: Vec<(ServiceIntent, usize)> = Vec::new();
    let mut pinned = BTreeSet::new();
    for svc in services {
        let mut report = ServiceReport {
            service: svc.service.clone(),
            status: ServiceStatus::Managed,
            reason: None,
            errors: Vec::new(),
            warnings: Vec::new(),
            pools: Vec::new(),
        };
        match admit(svc, config) {
            Admission::Managed(intent) => {
                report.warnings = intent.warnings.clone();
                intents.push((intent, reports.len()));
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
            }
        }
        reports.push(report);
    }

    // Two Services claiming the same node port would let one's sources reach the other's
    // port: neither is planned until the conflict is gone.
    let mut claims: HashMap<(Protocol, u16), Vec<usize>> = HashMap::new();
    for (i, (intent, _)) in intents.iter().enumerate() {
        for key in &intent.ports {
            claims.entry(*key).or_default().push(i);
        }
    }
    let mut conflicted: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for ((protocol, port), claimants) in &claims {
        if claimants.len() > 1 {
            for &i in claimants {
                let others: Vec<String> = claimants
                    .iter()
                    .filter(|&&j| j != i)
                    .map(|&j| intents[j].0.service.to_string())
                    .collect();
                conflicted.entry(i).or_default().push(format!(
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
            pinned.insert(intent.service.clone());
        } else {
            valid.push((intent, report_idx));
        }
    }

    // Grants: Services that ask for all pools are grouped once and shared.
    let mut all_map: GrantMap = HashMap::new();
    let mut named: Vec<&ServiceIntent> = Vec::new();
    let managed: Vec<PoolName> = pools
        .values()
        .filter(|p| p.managed)
        .map(|p| p.name.clone())
        .collect();
    for (intent, report_idx) in &valid {
        let report = &mut reports[*report_idx];
        match &intent.pools {
            PoolSelector::All => {
                add_intent(&mut all_map, intent);
                report.pools = managed.clone();
            }
            PoolSelector::Named(names) => {
                for name in names {
                    match pools.get(name) {
                        None => report
                            .warnings
                            .push(format!("pool {name} has no nodes and is not in the config")),
                        Some(p) if !p.managed => {
                            report.warnings.push(format!("pool {name} is not managed"))
                        }
                        Some(_) => report.pools.push(name.clone()),
                    }
                }
                named.push(intent);
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
        let extra: Vec<&&ServiceIntent> = named
            .iter()
            .filter(|i| matches!(&i.pools, PoolSelector::Named(n) if n.contains(&pool.name)))
            .collect();
        pool.grants = if extra.is_empty() {
            Arc::clone(&all_grants)
        } else {
            let mut map: GrantMap = HashMap::new();
            for intent in extra {
                add_intent(&mut map, intent);
            }
            let named_grants = into_grants(map);
            Arc::new(merge_grants([
                all_grants.as_slice(),
                named_grants.as_slice(),
            ]))
        };
    }

    reports.sort_by(|a, b| a.service.cmp(&b.service));
    Desired {
        cluster: config.cluster_name.clone(),
        port_merge: config.policy.port_merge,
        pools,
        services: reports,
        unpooled_nodes,
        pinned,
    }
}

fn new_pool(config: &Config, name: &PoolName) -> PoolState {
    PoolState {
        name: name.clone(),
        managed: config.pool_managed(name),
        nodes: Vec::new(),
        grants: Arc::new(Vec::new()),
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
        pool.grants
            .iter()
            .flat_map(|g| g.ports.iter().map(move |p| (p.port, g.sources.to_string())))
            .collect()
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
        assert!(d.pools.values().all(|p| p.grants.is_empty()));
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
        assert!(d.pools[&PoolName::new("b")].grants.is_empty());
        let w = &d.services[0].warnings;
        assert!(
            w.iter().any(|w| w.contains("pool b is not managed")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|w| w.contains("pool ghost has no nodes")),
            "{w:?}"
        );
        assert!(w.iter().any(|w| w.contains("no managed pool")), "{w:?}");
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
        assert_eq!(a.grants.len(), 2);
        assert!(Arc::ptr_eq(&a.grants, &d.pools[&PoolName::new("b")].grants));
    }
}

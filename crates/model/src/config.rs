//! The operator config: a YAML file (the Helm chart renders it into a ConfigMap).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::net::{SourceSet, parse_ranges};
use crate::node::PoolName;
use ipnet::IpNet;

use crate::net::IpFamily;
use crate::rule::{PortRange, join};

/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: PortRange = PortRange {
    from: 30000,
    to: 32767,
};
use crate::{Error, Result};

/// The pool label a kubelet cannot set (the NodeRestriction admission plugin refuses
/// `node-restriction.kubernetes.io/` keys from kubelets): set it with the cloud's node
/// group or node pool settings, or by an admin.
pub const RESTRICTED_POOL_LABEL: &str = "node-restriction.kubernetes.io/nodeport-firewall-pool";

/// The node labels that name a node's pool, in priority order, when the config gives none.
/// The first is the one to use: a kubelet cannot set it on its own Node (NodeRestriction),
/// so a node cannot move itself into another pool.
pub const DEFAULT_POOL_LABELS: &[&str] = &[
    RESTRICTED_POOL_LABEL,
    "nodeport-firewall.io/pool",
    "eks.amazonaws.com/nodegroup",
    "alpha.eksctl.io/nodegroup-name",
    "karpenter.sh/nodepool",
    "cloud.google.com/gke-nodepool",
    "kubernetes.azure.com/agentpool",
    "agentpool",
    "kops.k8s.io/instancegroup",
];

/// How ports of one protocol and source set are combined into ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortMerge {
    /// Merge exactly contiguous ports (30001 and 30002 become 30001-30002). Never opens a
    /// port nobody asked for.
    #[default]
    Contiguous,
    /// One entry per port.
    None,
}

/// The cluster-wide floor: binds every Service, whatever a namespace policy says
/// (docs/policy.md). A Service that breaks it is closed: its rules are removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Policy {
    /// Allow allowlists that cover a family's whole public unicast space (`0.0.0.0/0`,
    /// `::/0`, or the same split into pieces). Off by default.
    pub allow_world_open: bool,
    /// Most source ranges one Service may ask for, after merging.
    pub max_ranges_per_service: usize,
    /// The shortest prefix a source range may have, per family.
    pub min_prefix_length: MinPrefixLength,
    /// A Service that no `NodePortFirewallPolicy` admits opens nothing. Off: a namespace no
    /// policy selects is bound by this floor alone.
    pub require_namespace_policy: bool,
    pub port_merge: PortMerge,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_world_open: false,
            max_ranges_per_service: 32,
            min_prefix_length: MinPrefixLength::default(),
            require_namespace_policy: false,
            port_merge: PortMerge::Contiguous,
        }
    }
}

/// `policy.minPrefixLength`. The defaults refuse `0.0.0.0/1` and `::/1` (half of each
/// Internet) but accept the widest private ranges in real use: `10.0.0.0/8` and the
/// unique-local `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MinPrefixLength {
    pub ipv4: u8,
    pub ipv6: u8,
}

impl Default for MinPrefixLength {
    fn default() -> Self {
        MinPrefixLength { ipv4: 8, ipv6: 8 }
    }
}

impl MinPrefixLength {
    pub fn of(&self, family: crate::net::IpFamily) -> u8 {
        match family {
            crate::net::IpFamily::V4 => self.ipv4,
            crate::net::IpFamily::V6 => self.ipv6,
        }
    }
}

/// What `spec.loadBalancerSourceRanges` of a managed LoadBalancer Service means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancerSourceRanges {
    /// Its allowlist when it has no `allowed-source-ranges` annotation (before
    /// `defaultSourceRanges`): the node port opens to whom the load balancer admits.
    #[default]
    Default,
    /// As `default`, and an annotation that lists other ranges is an error: the two must
    /// say the same.
    RequireMatch,
    /// Not read.
    Ignore,
}

/// Per-pool overrides. Provider sections are opaque here and validated by that provider;
/// which providers may have one is the caller's list ([`Config::from_yaml`]): this crate
/// names no cloud.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PoolConfig {
    /// Whether the operator manages this pool. Default: `manageUnlistedPools` for pools not
    /// listed, `true` for listed ones.
    pub managed: Option<bool>,
    /// Each provider's section, by provider name.
    #[serde(flatten)]
    pub providers: BTreeMap<String, serde_json::Value>,
}

impl PoolConfig {
    /// The override section for one provider.
    pub fn provider(&self, provider: &str) -> Option<&serde_json::Value> {
        self.providers.get(provider)
    }

    /// Sets the override section for one provider.
    pub fn set_provider(&mut self, provider: &str, section: serde_json::Value) {
        self.providers.insert(provider.to_string(), section);
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    cluster_name: Option<String>,
    #[serde(default)]
    manage_all_node_port_services: bool,
    pool_labels: Option<Vec<String>>,
    #[serde(default)]
    default_source_ranges: Vec<String>,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    pools: BTreeMap<String, PoolConfig>,
    manage_unlisted_pools: Option<bool>,
    #[serde(default)]
    trust_node_pool_labels: bool,
    node_port_range: Option<String>,
    #[serde(default)]
    load_balancer_source_ranges: LoadBalancerSourceRanges,
    #[serde(default)]
    health_check_source_ranges: Vec<String>,
    /// Every other top-level key: a provider's section, or unknown.
    #[serde(flatten)]
    sections: BTreeMap<String, serde_json::Value>,
}

/// The validated operator config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Goes into every ownership marker. Rules marked with another cluster are never touched.
    pub cluster_name: String,
    /// Manage every NodePort Service unless it opts out, instead of only those that opt in.
    pub manage_all_node_port_services: bool,
    pub pool_labels: Vec<String>,
    /// Used for a managed Service that has no `allowed-source-ranges`. Empty by default: such
    /// a Service opens nothing and gets a warning.
    pub default_sources: SourceSet,
    pub policy: Policy,
    pub pools: BTreeMap<PoolName, PoolConfig>,
    /// Whether pools found on Nodes but not listed under `pools` are managed.
    pub manage_unlisted_pools: bool,
    /// Accept pool labels that a node's own kubelet can set, without a warning: the
    /// platform team has decided that a node moving itself into another pool is no threat.
    pub trust_node_pool_labels: bool,
    /// The cluster's node-port range (the API server's `--service-node-port-range`): a
    /// nodePort outside it gets a warning.
    pub node_port_range: PortRange,
    pub load_balancer_source_ranges: LoadBalancerSourceRanges,
    /// Where the cloud load balancer's health checks come from. Set: the `healthCheckNodePort`
    /// of every managed LoadBalancer Service with `externalTrafficPolicy: Local` is opened
    /// to these. Empty (default): it is not opened.
    pub health_check_sources: SourceSet,
    /// Provider sections, opaque here: each provider validates its own.
    pub providers: BTreeMap<String, serde_json::Value>,
}

impl Config {
    /// A minimal config for tests and examples.
    pub fn new(cluster_name: &str) -> Self {
        Config {
            cluster_name: cluster_name.to_string(),
            manage_all_node_port_services: false,
            pool_labels: DEFAULT_POOL_LABELS.iter().map(|s| s.to_string()).collect(),
            default_sources: SourceSet::default(),
            policy: Policy::default(),
            pools: BTreeMap::new(),
            manage_unlisted_pools: true,
            trust_node_pool_labels: false,
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            load_balancer_source_ranges: LoadBalancerSourceRanges::Default,
            health_check_sources: SourceSet::default(),
            providers: BTreeMap::new(),
        }
    }

    /// Parses and validates a YAML config. Every unknown key is reported by its path.
    /// `providers` names the providers that may have a section (at the top level and
    /// under each pool): the operator's registry.
    pub fn from_yaml(text: &str, providers: &[&str]) -> Result<Self> {
        let de = yaml_serde::Deserializer::from_str(text);
        let mut unknown = BTreeSet::new();
        let mut raw: RawConfig = serde_ignored::deserialize(de, |path| {
            unknown.insert(path.to_string());
        })
        .map_err(|e| Error::Config(e.to_string()))?;
        let known = |k: &String| providers.contains(&k.as_str());
        unknown.extend(raw.sections.keys().filter(|k| !known(k)).cloned());
        raw.sections.retain(|k, _| known(k));
        for (name, pool) in &mut raw.pools {
            unknown.extend(
                pool.providers
                    .keys()
                    .filter(|k| !known(k))
                    .map(|k| format!("pools.{name}.{k}")),
            );
            pool.providers.retain(|k, _| known(k));
        }
        // Every problem at once: the unknown keys, then what the known ones say.
        let mut problems = Vec::new();
        if !unknown.is_empty() {
            let keys: Vec<String> = unknown.iter().map(|k| with_hint(k, providers)).collect();
            problems.push(format!("unknown keys: {}", keys.join(", ")));
        }
        Self::validate(raw, problems)
    }

    fn validate(raw: RawConfig, mut problems: Vec<String>) -> Result<Self> {
        let cluster_name = raw.cluster_name.unwrap_or_default();
        if cluster_name.is_empty() {
            problems.push("clusterName is required".to_string());
        } else if !valid_cluster_name(&cluster_name) {
            problems.push(format!(
                "clusterName {cluster_name:?} must be 1-63 characters of letters, digits, '-', '_' or '.', starting with a letter or digit"
            ));
        }
        let pool_labels = raw
            .pool_labels
            .unwrap_or_else(|| DEFAULT_POOL_LABELS.iter().map(|s| s.to_string()).collect());
        if pool_labels.is_empty() {
            problems.push("poolLabels must name at least one label".to_string());
        }
        let mut default_sources = SourceSet::default();
        if raw.policy.min_prefix_length.ipv4 > 32 {
            problems.push(format!(
                "policy.minPrefixLength.ipv4: {} is longer than 32",
                raw.policy.min_prefix_length.ipv4
            ));
        }
        if raw.policy.min_prefix_length.ipv6 > 128 {
            problems.push(format!(
                "policy.minPrefixLength.ipv6: {} is longer than 128",
                raw.policy.min_prefix_length.ipv6
            ));
        }
        match parse_ranges(&raw.default_source_ranges.join(",")) {
            Ok(parsed) => {
                // The default allowlist is held to the floor like any Service's: a default
                // the floor refuses would close every Service that uses it.
                for v in floor_violations(&raw.policy, &parsed.set) {
                    problems.push(format!("defaultSourceRanges: {v}"));
                }
                default_sources = parsed.set;
            }
            Err(errors) => problems.push(format!("defaultSourceRanges: {}", errors.join("; "))),
        }
        let node_port_range = match raw.node_port_range.as_deref().map(str::parse::<PortRange>) {
            None => DEFAULT_NODE_PORT_RANGE,
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                problems.push(format!("nodePortRange: {e} (N-M, e.g. 30000-32767)"));
                DEFAULT_NODE_PORT_RANGE
            }
        };
        let mut health_check_sources = SourceSet::default();
        match parse_ranges(&raw.health_check_source_ranges.join(",")) {
            Ok(parsed) => {
                if !parsed.set.world_open().is_empty() {
                    problems.push(
                        "healthCheckSourceRanges: covers the whole Internet; list the load balancer's health-check ranges (docs/configuration.md)"
                            .to_string(),
                    );
                }
                health_check_sources = parsed.set;
            }
            Err(errors) => problems.push(format!("healthCheckSourceRanges: {}", errors.join("; "))),
        }
        if raw.policy.max_ranges_per_service == 0 {
            problems.push("policy.maxRangesPerService must be at least 1".to_string());
        }
        for name in raw.pools.keys() {
            if !crate::node::valid_pool_name(name) {
                problems.push(format!("pools: {name:?} is not a valid label value"));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems.join("; ")));
        }
        let providers = raw.sections;
        Ok(Config {
            cluster_name,
            manage_all_node_port_services: raw.manage_all_node_port_services,
            pool_labels,
            default_sources,
            policy: raw.policy,
            pools: raw
                .pools
                .into_iter()
                .map(|(k, v)| (PoolName(k), v))
                .collect(),
            manage_unlisted_pools: raw.manage_unlisted_pools.unwrap_or(true),
            trust_node_pool_labels: raw.trust_node_pool_labels,
            node_port_range,
            load_balancer_source_ranges: raw.load_balancer_source_ranges,
            health_check_sources,
            providers,
        })
    }

    /// Whether the operator manages `pool`.
    pub fn pool_managed(&self, pool: &PoolName) -> bool {
        match self.pools.get(pool) {
            Some(p) => p.managed.unwrap_or(true),
            None => self.manage_unlisted_pools,
        }
    }

    /// A provider's section of the config, if any.
    pub fn provider_section(&self, provider: &str) -> Option<&serde_json::Value> {
        self.providers.get(provider)
    }
}

/// The keys of each section, for a did-you-mean on an unknown one.
fn known_keys(section: &[&str]) -> &'static [&'static str] {
    match section {
        [] => &[
            "clusterName",
            "manageAllNodePortServices",
            "poolLabels",
            "defaultSourceRanges",
            "policy",
            "pools",
            "manageUnlistedPools",
            "trustNodePoolLabels",
            "nodePortRange",
            "loadBalancerSourceRanges",
            "healthCheckSourceRanges",
        ],
        ["policy"] => &[
            "allowWorldOpen",
            "maxRangesPerService",
            "minPrefixLength",
            "requireNamespacePolicy",
            "portMerge",
        ],
        ["policy", "minPrefixLength"] => &["ipv4", "ipv6"],
        ["pools", _] => &["managed"],
        _ => &[],
    }
}

/// `path` with `(did you mean …?)` when a known key of its section, or a provider's name
/// where a provider section may be, is close to it.
fn with_hint(path: &str, providers: &[&str]) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    let Some((last, section)) = parts.split_last() else {
        return path.to_string();
    };
    let sections: &[&str] = match section {
        [] | ["pools", _] => providers,
        _ => &[],
    };
    match known_keys(section)
        .iter()
        .chain(sections)
        .find(|k| crate::suggest::similar(k, last))
    {
        Some(k) => format!("{path} (did you mean {k}?)"),
        None => path.to_string(),
    }
}

fn valid_cluster_name(s: &str) -> bool {
    s.len() <= 63
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// What the floor refuses in a Service's sources. Empty: nothing.
pub fn floor_violations(floor: &Policy, sources: &SourceSet) -> Vec<String> {
    let mut out = Vec::new();
    let world = sources.world_open();
    if !world.is_empty() && !floor.allow_world_open {
        for family in &world {
            out.push(format!(
                "{} covers all public {family} space: it opens the port to the whole Internet, which the operator policy refuses (policy.allowWorldOpen)",
                join(sources.family(*family))
            ));
        }
    }
    // World-open families, where allowed, are not held to the minimum prefix: anything
    // narrower than the whole Internet is less open.
    let wide: Vec<IpNet> = sources
        .wider_than(floor.min_prefix_length.ipv4, floor.min_prefix_length.ipv6)
        .into_iter()
        .filter(|n| !world.contains(&IpFamily::of(n)))
        .collect();
    for family in [IpFamily::V4, IpFamily::V6] {
        let these: Vec<IpNet> = wide
            .iter()
            .filter(|n| IpFamily::of(n) == family)
            .copied()
            .collect();
        if !these.is_empty() {
            let min = floor.min_prefix_length.of(family);
            out.push(format!(
                "{} is wider than /{min}, the shortest {family} prefix the operator policy allows (policy.minPrefixLength.{family})",
                join(&these)
            ));
        }
    }
    if sources.len() > floor.max_ranges_per_service {
        out.push(format!(
            "{} source ranges after merging, more than the operator policy allows ({}; policy.maxRangesPerService)",
            sources.len(),
            floor.max_ranges_per_service
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The providers the tests' configs may have sections for (the operator passes its
    /// registry).
    const TEST_PROVIDERS: &[&str] = &["memory", "cloudy"];

    #[test]
    fn provider_sections_are_the_callers_list() {
        let c = Config::from_yaml(
            "clusterName: a\ncloudy: {region: x}\npools:\n  web:\n    cloudy: {zone: z}\n",
            TEST_PROVIDERS,
        )
        .unwrap();
        assert_eq!(
            c.provider_section("cloudy"),
            Some(&serde_json::json!({"region": "x"}))
        );
        let web = &c.pools[&PoolName::new("web")];
        assert_eq!(
            web.provider("cloudy"),
            Some(&serde_json::json!({"zone": "z"}))
        );
        assert_eq!(web.provider("memory"), None);
        let cases = [
            (
                "clusterName: a\ncloudi: {}\n",
                "unknown keys: cloudi (did you mean cloudy?)",
            ),
            ("clusterName: a\nrainy: {}\n", "unknown keys: rainy"),
            (
                "clusterName: a\npools:\n  web:\n    memroy: {}\n",
                "unknown keys: pools.web.memroy (did you mean memory?)",
            ),
        ];
        for (yaml, want) in cases {
            let err = Config::from_yaml(yaml, TEST_PROVIDERS)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{yaml:?}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_yaml("clusterName: prod\n", TEST_PROVIDERS).unwrap();
        assert_eq!(c.cluster_name, "prod");
        assert_eq!(c.pool_labels.len(), DEFAULT_POOL_LABELS.len());
        assert!(c.default_sources.is_empty());
        assert!(!c.policy.allow_world_open);
        assert!(c.manage_unlisted_pools);
    }

    #[test]
    fn config_errors_table() {
        let cases: &[(&str, &str)] = &[
            ("{}", "clusterName is required"),
            ("clusterName: ''", "clusterName is required"),
            ("clusterName: 'has space'", "must be 1-63 characters"),
            ("clusterName: a\nfoo: 1\nbar: 2", "unknown keys: bar, foo"),
            (
                "clusterName: a\npolicy:\n  allowWorldOpn: true",
                "unknown keys: policy.allowWorldOpn (did you mean allowWorldOpen?)",
            ),
            (
                "clusterName: a\npools:\n  web:\n    managd: false",
                "unknown keys: pools.web.managd (did you mean managed?)",
            ),
            (
                "clusterName: a\nclustername: b",
                "unknown keys: clustername (did you mean clusterName?)",
            ),
            // Every problem at once.
            (
                "clusterName: 'has space'\nfoo: 1\npoolLabels: []",
                "unknown keys: foo; clusterName \"has space\" must be 1-63 characters",
            ),
            (
                "clusterName: a\nnodePortRange: 40000-30000",
                "nodePortRange:",
            ),
            (
                "clusterName: a\ndefaultSourceRanges: [0.0.0.0/0]",
                "whole Internet, which the operator policy refuses (policy.allowWorldOpen)",
            ),
            (
                "clusterName: a\ndefaultSourceRanges: [0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3]",
                "policy.allowWorldOpen",
            ),
            (
                "clusterName: a\ndefaultSourceRanges: [0.0.0.0/1]",
                "policy.minPrefixLength.ipv4",
            ),
            (
                "clusterName: a\npolicy:\n  minPrefixLength: {ipv4: 33}",
                "longer than 32",
            ),
            (
                "clusterName: a\npolicy:\n  minPrefixLength: {ipv6: 129}",
                "longer than 128",
            ),
            (
                "clusterName: a\npolicy:\n  minPrefixLength: {ipv4: -1}",
                "policy.minPrefixLength.ipv4: invalid type",
            ),
            (
                "clusterName: a\npolicy:\n  requireNamespacePolicy: maybe",
                "invalid type",
            ),
            (
                "clusterName: a\ndefaultSourceRanges: [nope]",
                "defaultSourceRanges",
            ),
            (
                "clusterName: a\npolicy:\n  maxRangesPerService: 0",
                "at least 1",
            ),
            ("clusterName: a\npoolLabels: []", "at least one label"),
            (
                "clusterName: a\npolicy:\n  portMerge: wide",
                "unknown variant",
            ),
            ("clusterName: [a]", "invalid type"),
        ];
        for (yaml, want) in cases {
            let err = Config::from_yaml(yaml, TEST_PROVIDERS)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{yaml:?}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn pool_management() {
        let c = Config::from_yaml(
            "clusterName: a\nmanageUnlistedPools: false\npools:\n  web: {}\n  batch:\n    managed: false\n",
TEST_PROVIDERS)
        .unwrap();
        assert!(c.pool_managed(&PoolName::new("web")));
        assert!(!c.pool_managed(&PoolName::new("batch")));
        assert!(!c.pool_managed(&PoolName::new("other")));
    }

    #[test]
    fn world_open_default_allowed_by_policy() {
        let c = Config::from_yaml(
            "clusterName: a\ndefaultSourceRanges: ['0.0.0.0/0']\npolicy:\n  allowWorldOpen: true\n",
            TEST_PROVIDERS,
        )
        .unwrap();
        assert_eq!(c.default_sources.len(), 1);
    }
}

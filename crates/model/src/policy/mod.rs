//! Who may open which node ports, from where, on which pools.
//!
//! Two layers decide whether a valid, managed Service is **admitted**:
//! 1. the cluster-wide **floor** of the operator config (`policy:`), which binds every
//!    Service: no world-open allowlist unless allowed, no range wider than
//!    `minPrefixLength`, at most `maxRangesPerService` ranges;
//! 2. the **namespace policies** (`NodePortFirewallPolicy` objects). A namespace that some
//!    policy selects must be admitted by one of them: a single policy that permits every
//!    source, pool and port the Service asks for. Policies never combine (sources from one
//!    and pools from another): the simplest rule that cannot widen anything.
//!
//! A Service that is not admitted is **closed**: its rules are removed. Only a Service whose
//! annotations cannot be read keeps its rules (see [`crate::annotations`]).

mod selector;

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Serialize};

pub use self::selector::{Selector, valid_dns_label, valid_label_key, valid_label_value};
use crate::annotations::PoolSelector;
use crate::annotations::{NODE_POOLS, ServiceIntent, valid_pool_name};
use crate::config::Policy;
pub use crate::config::floor_violations;
use crate::net::{SourceSet, parse_ranges};
use crate::node::PoolName;
use crate::rule::PortRange;

/// The label the API server sets on every Namespace to its name. Manifests read offline may
/// lack the Namespace object: its name is still known.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What a policy reads of a Namespace: its name and labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NamespaceSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl NamespaceSpec {
    pub fn new(name: &str) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        NamespaceSpec {
            name: name.to_string(),
            labels,
        }
    }

    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Reads a Namespace; None without a name.
    pub fn from_k8s(ns: &Namespace) -> Option<Self> {
        let name = ns.metadata.name.as_deref()?;
        let mut spec = NamespaceSpec::new(name);
        for (k, v) in ns.metadata.labels.iter().flatten() {
            spec.labels.insert(k.clone(), v.clone());
        }
        // The API server keeps this label equal to the name; a copy in a manifest cannot
        // make a namespace look like another.
        spec.labels
            .insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        Some(spec)
    }
}

/// A `NodePortFirewallPolicy` as written: its name and spec, before validation. The
/// operator's CRD type converts into this; every field is checked here, so that a policy
/// read from a file and one read from the cluster are judged alike.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySource {
    pub name: String,
    pub namespace_selector: Option<LabelSelector>,
    pub namespaces: Option<Vec<String>>,
    pub allowed_source_ranges: Vec<String>,
    pub node_pools: Option<Vec<String>>,
    /// `N` or `N-M`.
    pub node_ports: Option<Vec<String>>,
    pub max_ranges_per_service: Option<i64>,
    pub max_ports_per_service: Option<i64>,
}

/// Which namespaces a policy selects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selection {
    /// In `namespaces`, or matched by `namespaceSelector`.
    Known {
        names: BTreeSet<String>,
        selector: Option<Selector>,
    },
    /// The selector is invalid: which namespaces it meant is unknown, so it is taken to
    /// select every namespace. An invalid policy admits nothing; taking it to select fewer
    /// namespaces would let them fall back to the floor alone, which widens.
    Unknown,
}

impl Selection {
    fn selects(&self, ns: &NamespaceSpec) -> bool {
        match self {
            Selection::Known { names, selector } => {
                names.contains(&ns.name) || selector.as_ref().is_some_and(|s| s.matches(&ns.labels))
            }
            Selection::Unknown => true,
        }
    }
}

/// A validated namespace policy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grants {
    sources: SourceSet,
    pools: Option<BTreeSet<PoolName>>,
    ports: Option<Vec<PortRange>>,
    max_ranges: Option<usize>,
    max_ports: Option<usize>,
}

/// One policy, valid or not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Judged {
    name: String,
    selection: Selection,
    /// Err: why the policy is invalid; it admits nothing.
    grants: Result<Grants, String>,
}

impl Judged {
    /// Whether which namespaces it selects depends on their labels. (One whose selection is
    /// unknown selects every namespace, labels or not.)
    fn has_selector(&self) -> bool {
        match &self.selection {
            Selection::Known { selector, .. } => {
                selector.as_ref().is_some_and(|s| !s.by_name_only())
            }
            Selection::Unknown => false,
        }
    }
}

/// How one policy fared, for its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    pub name: String,
    /// False when the policy is invalid; it then admits nothing.
    pub accepted: bool,
    /// Why it is invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Services it admitted (each Service counts for the first policy, by name, that
    /// admits it).
    pub admitted: usize,
    /// Services in namespaces it selects that no policy admitted.
    pub refused: usize,
}

/// The namespace policies and the namespaces they select, validated once per plan.
#[derive(Debug, Clone, Default)]
pub struct Tenancy {
    policies: Vec<Judged>,
    namespaces: BTreeMap<String, NamespaceSpec>,
}

/// The decision for one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Opened as asked; `policy` names the namespace policy that admitted it, if any did.
    Admitted { policy: Option<String> },
    /// Closed: its rules are removed. `by` names what refused it (policies, or the operator
    /// config).
    Closed { by: String, reasons: Vec<String> },
    /// Cannot be judged: its Namespace is not known, so label selectors cannot be matched.
    /// Its rules are kept as they are, like an invalid Service's, until it is known.
    Unknown { reason: String },
}

impl Tenancy {
    /// Validates `policies`; `namespaces` gives the labels the selectors match (a namespace
    /// that is not given is known by its name only).
    pub fn new(policies: &[PolicySource], namespaces: &[NamespaceSpec]) -> Self {
        let mut policies: Vec<Judged> = policies.iter().map(judge).collect();
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Tenancy {
            policies,
            namespaces: namespaces
                .iter()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The namespace's labels; one absent from the input is known by its name only.
    fn namespace(&self, name: &str) -> std::borrow::Cow<'_, NamespaceSpec> {
        match self.namespaces.get(name) {
            Some(ns) => std::borrow::Cow::Borrowed(ns),
            None => std::borrow::Cow::Owned(NamespaceSpec::new(name)),
        }
    }

    /// Decides whether a valid Service is admitted, under the floor and the policies.
    pub fn judge(&self, floor: &Policy, intent: &ServiceIntent) -> Verdict {
        let violations = floor_violations(floor, &intent.sources);
        if !violations.is_empty() {
            return Verdict::Closed {
                by: "the operator config (policy:)".into(),
                reasons: violations,
            };
        }
        if self.policies.is_empty() && !floor.require_namespace_policy {
            return Verdict::Admitted { policy: None };
        }
        let ns = self.namespace(intent.service.namespace());
        // A namespace that is not known has one label for sure, its name. A selector on
        // other labels cannot be matched: with requireNamespacePolicy the Service is then
        // simply not admitted by that policy (closed unless another admits it); without it,
        // taking it as unselected could open what the policy forbids, so it is not judged.
        let unknown = !self.namespaces.contains_key(&ns.name);
        if unknown
            && !floor.require_namespace_policy
            && self.policies.iter().any(Judged::has_selector)
        {
            // Selecting it or not would both be a guess: one could open what a policy
            // forbids. In `run` this lasts until the Namespace reaches the cache.
            return Verdict::Unknown {
                reason: format!(
                    "namespace {} is not known (no Namespace object for it{}), so the policies' namespaceSelectors cannot be matched; its rules are kept as they are until it is",
                    ns.name,
                    if self.namespaces.is_empty() {
                        " in the input"
                    } else {
                        ""
                    }
                ),
            };
        }
        let selecting: Vec<&Judged> = self
            .policies
            .iter()
            .filter(|p| !(unknown && p.has_selector()))
            .filter(|p| p.selection.selects(&ns))
            .collect();
        if selecting.is_empty() {
            if floor.require_namespace_policy {
                return Verdict::Closed {
                    by: "the operator config (policy.requireNamespacePolicy)".into(),
                    reasons: vec![format!(
                        "no NodePortFirewallPolicy selects namespace {}, and policy.requireNamespacePolicy is true{}",
                        ns.name,
                        if unknown && self.policies.iter().any(Judged::has_selector) {
                            " (its Namespace object is not known, so only policies that select by name could)"
                        } else {
                            ""
                        }
                    )],
                };
            }
            return Verdict::Admitted { policy: None };
        }
        let mut reasons = Vec::new();
        for p in &selecting {
            match &p.grants {
                Ok(g) => {
                    let refusals = refusals(g, intent);
                    if refusals.is_empty() {
                        return Verdict::Admitted {
                            policy: Some(p.name.clone()),
                        };
                    }
                    reasons.push(format!("policy {}: {}", p.name, refusals.join("; ")));
                }
                Err(why) => reasons.push(format!(
                    "policy {} is invalid and admits nothing ({why})",
                    p.name
                )),
            }
        }
        Verdict::Closed {
            by: selecting
                .iter()
                .map(|p| format!("policy {}", p.name))
                .collect::<Vec<_>>()
                .join(", "),
            reasons,
        }
    }

    /// Every policy's status, given the verdicts on the Services that were judged (in any
    /// order: (namespace, verdict)).
    pub fn reports<'a>(
        &self,
        verdicts: impl IntoIterator<Item = (&'a str, &'a Verdict)>,
    ) -> Vec<PolicyReport> {
        let mut reports: Vec<PolicyReport> = self
            .policies
            .iter()
            .map(|p| PolicyReport {
                name: p.name.clone(),
                accepted: p.grants.is_ok(),
                message: p.grants.as_ref().err().cloned(),
                admitted: 0,
                refused: 0,
            })
            .collect();
        let mut seen: BTreeMap<&str, std::borrow::Cow<'_, NamespaceSpec>> = BTreeMap::new();
        for (namespace, verdict) in verdicts {
            match verdict {
                Verdict::Admitted { policy: Some(name) } => {
                    if let Some(r) = reports.iter_mut().find(|r| &r.name == name) {
                        r.admitted += 1;
                    }
                }
                Verdict::Admitted { policy: None } | Verdict::Unknown { .. } => {}
                Verdict::Closed { .. } => {
                    let ns = seen
                        .entry(namespace)
                        .or_insert_with(|| self.namespace(namespace));
                    for (p, r) in self.policies.iter().zip(reports.iter_mut()) {
                        if p.selection.selects(ns) {
                            r.refused += 1;
                        }
                    }
                }
            }
        }
        reports
    }
}

/// What a valid policy refuses of a Service's request. Empty: it admits the Service.
fn refusals(g: &Grants, intent: &ServiceIntent) -> Vec<String> {
    let mut out = Vec::new();
    let outside: Vec<IpNet> = intent
        .sources
        .nets()
        .iter()
        .filter(|n| !g.sources.contains_net(n))
        .copied()
        .collect();
    if !outside.is_empty() {
        let allowed = if g.sources.is_empty() {
            "none".to_string()
        } else {
            g.sources.to_string()
        };
        out.push(format!(
            "source {} is outside allowedSourceRanges ({allowed})",
            list(outside.iter().map(ToString::to_string))
        ));
    }
    if let Some(max) = g.max_ranges
        && intent.sources.len() > max
    {
        out.push(format!(
            "{} source ranges after merging, more than maxRangesPerService ({max})",
            intent.sources.len()
        ));
    }
    if let Some(allowed) = &g.pools {
        let allowed_text = list(allowed.iter().map(ToString::to_string));
        match &intent.pools {
            PoolSelector::All => out.push(format!(
                "asks for every managed pool (no {NODE_POOLS}) but nodePools permits only {allowed_text}; name the pools"
            )),
            PoolSelector::Named(names) => {
                let refused: Vec<String> = names
                    .iter()
                    .filter(|n| !allowed.contains(*n))
                    .map(ToString::to_string)
                    .collect();
                if !refused.is_empty() {
                    out.push(format!(
                        "pool {} is not in nodePools ({allowed_text})",
                        list(refused.into_iter())
                    ));
                }
            }
        }
    }
    if let Some(ranges) = &g.ports {
        let refused: Vec<String> = intent
            .ports
            .iter()
            .filter(|(_, port)| !ranges.iter().any(|r| r.contains(*port)))
            .map(|(proto, port)| format!("{proto}/{port}"))
            .collect();
        if !refused.is_empty() {
            out.push(format!(
                "nodePort {} is outside nodePorts ({})",
                list(refused.into_iter()),
                list(ranges.iter().map(ToString::to_string))
            ));
        }
    }
    if let Some(max) = g.max_ports
        && intent.ports.len() > max
    {
        out.push(format!(
            "{} node ports, more than maxPortsPerService ({max})",
            intent.ports.len()
        ));
    }
    out
}

fn list(items: impl Iterator<Item = String>) -> String {
    let all: Vec<String> = items.collect();
    if all.len() <= 10 {
        return all.join(", ");
    }
    format!("{} and {} more", all[..10].join(", "), all.len() - 10)
}

/// Validates one policy. Every problem is reported; any one makes the policy invalid.
fn judge(p: &PolicySource) -> Judged {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    let mut bad_name = false;
    for n in p.namespaces.iter().flatten() {
        if valid_dns_label(n) {
            names.insert(n.clone());
        } else {
            bad_name = true;
            problems.push(format!("namespaces: {n:?} is not a namespace name"));
        }
    }
    let selection = match p.namespace_selector.as_ref().map(Selector::new) {
        Some(Err(errors)) => {
            problems.extend(
                errors
                    .into_iter()
                    .map(|e| format!("namespaceSelector: {e}")),
            );
            Selection::Unknown
        }
        // Which namespace a bad name meant is unknown, as with a bad selector.
        _ if bad_name => Selection::Unknown,
        Some(Ok(s)) => Selection::Known {
            names,
            selector: Some(s),
        },
        None => {
            if names.is_empty() {
                problems.push(
                    "selects no namespace: set namespaceSelector ({} selects all) or namespaces"
                        .into(),
                );
            }
            Selection::Known {
                names,
                selector: None,
            }
        }
    };
    let sources = match parse_ranges(&p.allowed_source_ranges.join(",")) {
        Ok(parsed) => parsed.set,
        Err(errors) => {
            problems.extend(
                errors
                    .into_iter()
                    .map(|e| format!("allowedSourceRanges: {e}")),
            );
            SourceSet::default()
        }
    };
    let pools = p.node_pools.as_ref().map(|pools| {
        let mut set = BTreeSet::new();
        for name in pools {
            if valid_pool_name(name) {
                set.insert(PoolName::new(name));
            } else {
                problems.push(format!("nodePools: {name:?} is not a valid pool name"));
            }
        }
        set
    });
    let ports = p.node_ports.as_ref().map(|ports| {
        let mut ranges = Vec::new();
        for text in ports {
            match text.parse::<PortRange>() {
                Ok(r) if r.from > 0 => ranges.push(r),
                Ok(_) => problems.push(format!("nodePorts: {text:?}: port 0 is not a port")),
                Err(e) => problems.push(format!("nodePorts: {e} (N or N-M)")),
            }
        }
        ranges
    });
    let mut limit = |field: &str, v: Option<i64>| -> Option<usize> {
        let v = v?;
        match usize::try_from(v) {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                problems.push(format!("{field}: {v} must be at least 1"));
                None
            }
        }
    };
    let max_ranges = limit("maxRangesPerService", p.max_ranges_per_service);
    let max_ports = limit("maxPortsPerService", p.max_ports_per_service);
    let grants = if problems.is_empty() {
        Ok(Grants {
            sources,
            pools,
            ports,
            max_ranges,
            max_ports,
        })
    } else {
        Err(problems.join("; "))
    };
    Judged {
        name: p.name.clone(),
        selection,
        grants,
    }
}

#[cfg(test)]
mod tests;

//! Targets, the places rules are written to, and what a provider observes on them.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use ipnet::IpNet;

use crate::failure::Failure;
use crate::rule::{Limits, PortRange, Protocol, Rule, RuleContent};

/// A place rules are written to: an AWS security group, a GCP network, an Azure NSG.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Target {
    pub provider: String,
    pub id: String,
}

impl Target {
    pub fn new(provider: &str, id: &str) -> Self {
        Target {
            provider: provider.to_string(),
            id: id.to_string(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.provider, self.id)
    }
}

/// A target of a pool, and where inside it the pool's rules apply.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolTarget {
    pub target: Target,
    /// A GCP target tag, an Azure destination; `None` when the target is the scope.
    pub scope: Option<String>,
    /// What the provider learned about the target while resolving the pool (GCP: the
    /// network is a Shared VPC host's), in the provider's own text. Opaque to the planner,
    /// which hands it to the provider in the target's plan ([`crate::TargetPlan::resolved`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Set when the pool's rules are spread over several targets instead of written to
    /// each (AWS: a pool whose nodes carry several security groups that the operator
    /// fills): the targets with the same `spread` share the rules, each rule on exactly one
    /// of them, in the order the targets are listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
}

impl PoolTarget {
    /// `target`, scoped by `scope`, with nothing learned.
    pub fn new(target: Target, scope: Option<String>) -> Self {
        PoolTarget {
            target,
            scope,
            payload: None,
            spread: None,
        }
    }
}

/// How a provider resolved a pool: its targets, or why it could not.
pub type PoolResolution = Result<Vec<PoolTarget>, Failure>;

/// What a provider read on a target, or why it could not.
pub type ObservationResult = Result<Observation, Failure>;

/// A rule seen on a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedRule {
    /// The native id (an EC2 `sgr-` id), used to remove exactly this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(flatten)]
    pub rule: Rule,
    /// Carries our ownership marker with this cluster's name. Rules that do not are never
    /// changed or removed.
    pub owned: bool,
    /// The rule's place in the target's evaluation order, where the cloud has one (an Azure
    /// NSG priority). Ours and others', so that the planner can place new rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Set when our marker could not hold the full lists of what the rule serves (a cloud
    /// description has a length limit): the digest it carries instead. `rule.services`
    /// then holds only the Services the marker names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<MarkerDigest>,
    /// Facts the provider needs to write this rule later (EC2: the tag keys and the
    /// description it carries). Opaque to the planner, which copies it into the plan's
    /// change; so the facts live in the observation and the plan, not in the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Set when the rule denies traffic: what it may match. Such a rule is never ours, and
    /// `rule.content` then holds no sources, so it never satisfies a wanted rule; the
    /// planner uses it to tell whether an Allow behind it is in force
    /// ([`crate::plan`]'s shadowing check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Denial>,
    /// Set, with the reason, when a rule of ours is not in force as written (an Azure rule
    /// in `provisioningState: Failed`, or `Updating` past the timeout): the plan writes it
    /// again as an update, even though its content is what is wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_rewrite: Option<String>,
}

/// What a rule that denies traffic may match. A provider fills it never narrower than
/// the cloud's rule: what it cannot say exactly (a service tag, `*`) is "every".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Denial {
    /// `None`: every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    /// Empty: every source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<IpNet>,
    /// The scopes it applies to, encoded as [`crate::RuleContent::scope`] is. Empty: the
    /// whole target, every scope in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}

impl Denial {
    /// Whether this denial may match any part of what `content` allows.
    pub fn overlaps(&self, content: &RuleContent) -> bool {
        let scope = self.scopes.is_empty()
            || content
                .scope
                .as_ref()
                .is_none_or(|s| self.scopes.iter().any(|d| d == s));
        let protocol = self.protocol.is_none_or(|p| p == content.protocol);
        let ports = self.ports.is_empty()
            || self.ports.iter().any(|d| {
                content
                    .ports
                    .iter()
                    .any(|w| d.from <= w.to && w.from <= d.to)
            });
        let sources = self.sources.is_empty()
            || self.sources.iter().any(|d| {
                content
                    .sources
                    .iter()
                    .any(|w| d.contains(&w.network()) || w.contains(&d.network()))
            });
        scope && protocol && ports && sources
    }
}

impl ObservedRule {
    /// A rule whose marker names everything it serves, with no priority.
    pub fn new(id: Option<String>, rule: Rule, owned: bool) -> Self {
        ObservedRule {
            id,
            rule,
            owned,
            priority: None,
            digest: None,
            payload: None,
            deny: None,
            needs_rewrite: None,
        }
    }

    /// Whether the marker lists every Service (and pool) the rule serves. A fresh process
    /// knows the rest only by re-rendering the wanted rules and comparing their digest
    /// ([`crate::Render::marker_digest`]).
    pub fn fully_listed(&self) -> bool {
        self.digest.is_none()
    }
}

/// What a marker too long for its cloud carries instead of the full lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarkerDigest {
    /// The provider's digest of what the rule serves; the planner compares it with
    /// [`crate::Render::marker_digest`] of a wanted rule and never interprets it.
    pub value: String,
    /// Whether `rule.pools` is the full pool list (else it is empty or partial).
    pub pools_listed: bool,
}

impl Observation {
    /// What was seen: these rules, under these limits, with nothing reserved.
    pub fn new(rules: Vec<ObservedRule>, limits: Limits) -> Self {
        Observation {
            rules,
            limits,
            ..Observation::default()
        }
    }
}

/// What a provider observed on one target.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Observation {
    pub rules: Vec<ObservedRule>,
    pub limits: Limits,
    /// Names held on the target by rules the planner does not see (Azure: outbound rules,
    /// whose names an inbound rule cannot take). A new rule never takes one of them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub reserved_names: BTreeSet<String>,
    /// Priorities held by rules the planner does not see. A new rule never takes one.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub reserved_priorities: BTreeSet<u32>,
    /// What the provider wants the plan to say about the target while still planning it
    /// (AWS: the rule quota could not be read, so the configured one is used). Each
    /// distinct message becomes one plan warning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

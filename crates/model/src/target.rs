//! Targets, the places rules are written to, and what a provider observes on them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rule::{Limits, Rule};

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
}

/// How a provider resolved a pool: its targets, or why it could not.
pub type PoolResolution = Result<Vec<PoolTarget>, String>;

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
}

/// What a provider observed on one target.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Observation {
    pub rules: Vec<ObservedRule>,
    pub limits: Limits,
}

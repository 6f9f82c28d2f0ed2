//! The pure domain of nodeport-firewall.
//!
//! This crate turns Services, Nodes, the operator config and the rules observed on each cloud
//! target into a [`Plan`]. It performs no I/O: no kube client, no async runtime, no cloud SDK.
//! Providers read and write; only this crate decides (design principle 1).
//!
//! The flow is:
//! 1. [`Config::from_yaml`] validates the operator config.
//! 2. [`ServiceSpec`] and [`NodeSpec`] are lean views of Kubernetes objects.
//! 3. [`desired`] computes, for every node pool, the [`Grant`]s its Services ask for.
//! 4. Providers resolve each pool to targets and observe the rules on them.
//! 5. [`plan`] renders grants into [`Rule`]s under the target's [`Limits`] and diffs them
//!    against what was observed, per target.

pub mod annotations;
pub mod config;
pub mod desired;
pub mod failure;
mod narrow;
pub mod net;
pub mod node;
mod parallel;
pub mod plan;
pub mod policy;
pub mod render;
pub mod rule;
pub mod service;
pub mod set;
mod suggest;
pub mod target;
pub mod warnings;

pub use annotations::{ANNOTATION_PREFIX, Admission, ServiceIntent};
pub use config::{
    Config, LoadBalancerSourceRanges, MinPrefixLength, Policy, PoolConfig, PortMerge,
};
pub use desired::{
    Desired, Grant, PoolSelector, PoolState, PortGrant, ServiceReport, desired, desired_with,
};
pub use failure::{ErrorKind, Failure};
pub use net::{IpFamily, SourceSet};
pub use node::{NodeSpec, PoolName};
pub use plan::{
    Action, Change, ManualSteps, Observation, ObservationResult, ObservedRule, Plan, PlanError,
    PoolResolution, PoolTarget, Summary, Target, TargetPlan, plan,
};
pub use policy::{NamespaceSpec, PolicyReport, PolicySource, Tenancy, Verdict};
pub use render::{Render, ShapeRenderer};
pub use rule::{Limits, PortRange, PriorityRange, Protocol, Rule, RuleContent};
pub use service::{ServicePort, ServiceRef, ServiceSpec, ServiceType};
pub use set::{PoolSet, ServiceSet, SharedSet};
pub use target::{Denial, MarkerDigest};
pub use warnings::{Warning, WarningKind};

/// Errors of the pure model: invalid configuration or unreadable input objects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("invalid object: {0}")]
    Object(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! A lean view of a Kubernetes Service: only what the planner needs.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What every annotation of ours starts with.
pub const ANNOTATION_PREFIX: &str = "nodeport-firewall.io/";

/// `namespace/name` of a Service.
///
/// One shared string: a reference is cloned into every grant and rule that serves the
/// Service, and compared whenever rules are compared, so cloning is one atomic increment
/// and equality of clones is a pointer comparison.
#[derive(Clone)]
pub struct ServiceRef {
    full: Arc<str>,
    /// Byte index of the `/` in `full`.
    split: usize,
}

impl ServiceRef {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        let namespace = namespace.as_ref();
        ServiceRef {
            full: Arc::from(format!("{namespace}/{}", name.as_ref())),
            split: namespace.len(),
        }
    }

    pub fn namespace(&self) -> &str {
        self.full.get(..self.split).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.full.get(self.split + 1..).unwrap_or_default()
    }

    /// `namespace/name`.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl PartialEq for ServiceRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.full, &other.full) || self.full == other.full
    }
}

impl Eq for ServiceRef {}

impl std::hash::Hash for ServiceRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.full.hash(state);
    }
}

/// Ordered by the bytes of `namespace/name`: one comparison instead of two.
impl Ord for ServiceRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.full, &other.full) {
            return std::cmp::Ordering::Equal;
        }
        self.full.as_bytes().cmp(other.full.as_bytes())
    }
}

impl PartialOrd for ServiceRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceRef({})", self.full)
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl std::str::FromStr for ServiceRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceRef::new(ns, name))
            }
            _ => Err(format!("{s:?} is not namespace/name")),
        }
    }
}

impl Serialize for ServiceRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ServiceRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The `spec.type` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceType {
    NodePort,
    LoadBalancer,
    /// ClusterIP, ExternalName or anything else: no node ports.
    Other(String),
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceType::NodePort => f.write_str("NodePort"),
            ServiceType::LoadBalancer => f.write_str("LoadBalancer"),
            ServiceType::Other(t) => f.write_str(t),
        }
    }
}

/// One entry of `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: i32,
    /// As written; validated by the planner so that a bad value fails only its Service.
    pub protocol: String,
    pub node_port: Option<i32>,
}

/// What the planner reads of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub service: ServiceRef,
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    /// Only the annotations under [`ANNOTATION_PREFIX`]; others are dropped to save memory.
    pub annotations: BTreeMap<String, String>,
    /// `spec.loadBalancerSourceRanges`, as written (LoadBalancer Services).
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<String>,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with `externalTrafficPolicy:
    /// Local`: the node port the cloud load balancer's health checks probe.
    #[serde(default)]
    pub health_check_node_port: Option<i32>,
}

impl ServiceSpec {
    /// A NodePort Service with no ports yet; see the `with_*` builders.
    pub fn nodeport(namespace: &str, name: &str) -> Self {
        ServiceSpec {
            service: ServiceRef::new(namespace, name),
            service_type: ServiceType::NodePort,
            ports: Vec::new(),
            annotations: BTreeMap::new(),
            load_balancer_source_ranges: Vec::new(),
            health_check_node_port: None,
        }
    }

    pub fn with_type(mut self, t: ServiceType) -> Self {
        self.service_type = t;
        self
    }

    pub fn with_port(mut self, name: &str, protocol: &str, port: i32, node_port: i32) -> Self {
        self.ports.push(ServicePort {
            name: (!name.is_empty()).then(|| name.to_string()),
            port,
            protocol: protocol.to_string(),
            node_port: Some(node_port),
        });
        self
    }

    pub fn with_annotation(mut self, key: &str, value: &str) -> Self {
        let key = if key.contains('/') {
            key.to_string()
        } else {
            format!("{ANNOTATION_PREFIX}{key}")
        };
        self.annotations.insert(key, value.to_string());
        self
    }

    pub fn with_ranges(self, ranges: &str) -> Self {
        self.with_annotation("allowed-source-ranges", ranges)
    }

    pub fn enabled(self) -> Self {
        self.with_annotation("enabled", "true")
    }

    /// Reads a Kubernetes Service. Fails only when the object has no name; every other
    /// problem is judged later, per Service.
    pub fn from_k8s(svc: &Service) -> Result<Self> {
        let name = svc
            .metadata
            .name
            .clone()
            .ok_or_else(|| Error::Object("Service without metadata.name".to_string()))?;
        let namespace = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let spec = svc.spec.as_ref();
        let service_type = match spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP") {
            "NodePort" => ServiceType::NodePort,
            "LoadBalancer" => ServiceType::LoadBalancer,
            other => ServiceType::Other(other.to_string()),
        };
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                        node_port: p.node_port,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let annotations = svc
            .metadata
            .annotations
            .as_ref()
            .map(|a| {
                a.iter()
                    .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let load_balancer_source_ranges = spec
            .and_then(|s| s.load_balancer_source_ranges.clone())
            .unwrap_or_default();
        let local = spec
            .and_then(|s| s.external_traffic_policy.as_deref())
            .is_some_and(|p| p == "Local");
        let health_check_node_port = match service_type {
            ServiceType::LoadBalancer if local => spec.and_then(|s| s.health_check_node_port),
            _ => None,
        };
        Ok(ServiceSpec {
            service: ServiceRef::new(namespace, name),
            service_type,
            ports,
            annotations,
            load_balancer_source_ranges,
            health_check_node_port,
        })
    }
}

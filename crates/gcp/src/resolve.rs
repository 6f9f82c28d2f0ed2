//! Resolving a pool to its target on GCP: the (project, network) from the operator config
//! or the pool's override, and the rules' scope (network tags or a service account) from
//! the override, else discovered from the instances Compute lists. The discovery itself is
//! the pure [`discovery::choose`]; this module reads its inputs and caches its answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodeport_firewall_model::{PoolTarget, Target};
use nodeport_firewall_provider::{PoolView, Result};
use tracing::debug;

use crate::network_admin::shared_vpc;
use crate::{GcpPoolConfig, GcpProvider, NAME, Scope, config, config_error, discovery};

/// A resolution's cache key: the pool at its target, and the instances of its nodes.
pub(crate) type CacheKey = (String, Vec<String>);

/// Every instance of a project, by `project/zone/name`.
pub(crate) type InstanceMap = BTreeMap<discovery::InstanceKey, discovery::InstanceInfo>;

/// How long one read of a project's instances serves pools resolved after it.
const INSTANCE_CACHE_TTL: Duration = Duration::from_secs(10);

impl GcpProvider {
    /// The target of `pool` and the scope of its rules there.
    pub(crate) async fn resolve_pool(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        let over: GcpPoolConfig = pool.override_config(NAME)?;
        let project = over.project.clone().unwrap_or_else(|| self.project.clone());
        let network = over
            .network
            .clone()
            .unwrap_or_else(|| self.config.network.clone());
        if !config::valid_name(&network) {
            return Err(config_error(format!(
                "pools.{}.gcp.network: {network:?} is not a network name",
                pool.name
            )));
        }
        let target = Target::new(NAME, &format!("{project}/{network}"));
        // A Shared VPC is found here, where the nodes are known, and travels in the plan.
        let shared_vpc = shared_vpc(&project, pool.nodes);
        let to_targets = |scope: &Scope| {
            vec![PoolTarget {
                target: target.clone(),
                scope: Some(scope.encode()),
                payload: shared_vpc.clone(),
                spread: None,
            }]
        };
        match (&over.target_tags[..], &over.target_service_account) {
            ([_, ..], Some(_)) => {
                return Err(config_error(format!(
                    "pools.{}.gcp: give targetTags or targetServiceAccount, not both (a rule has one kind of target)",
                    pool.name
                )));
            }
            ([_, ..], None) => {
                if let Some(bad) = over.target_tags.iter().find(|t| !config::valid_name(t)) {
                    return Err(config_error(format!(
                        "pools.{}.gcp.targetTags: {bad:?} is not a network tag (RFC 1035, 1-63 characters)",
                        pool.name
                    )));
                }
                if let Some(wide) = over.target_tags.iter().find(|t| self.is_cluster_wide(t)) {
                    return Err(config_error(format!(
                        "pools.{}.gcp.targetTags: {wide} is on every node of the cluster and would open every pool; give the pool a tag of its own",
                        pool.name
                    )));
                }
                let mut tags = over.target_tags.clone();
                tags.sort();
                tags.dedup();
                return Ok(to_targets(&Scope::Tags(tags)));
            }
            ([], Some(sa)) => {
                if !config::valid_service_account(sa) {
                    return Err(config_error(format!(
                        "pools.{}.gcp.targetServiceAccount: {sa:?} is not a service account email",
                        pool.name
                    )));
                }
                return Ok(to_targets(&Scope::ServiceAccount(sa.clone())));
            }
            ([], None) => {}
        }
        let nodes = discovery::instances(pool.name, pool.nodes)?;
        let keys: Vec<String> = nodes.iter().map(|(_, k)| k.clone()).collect();
        let key = (format!("{}@{}", pool.name, target.id), keys);
        if let Some(scope) = self.cached_resolution(&key) {
            return Ok(to_targets(&scope));
        }
        // The instances of the network's project count as others too (a Shared VPC host
        // project): a tag chosen for the pool must not open its VMs.
        let projects: BTreeSet<&str> = nodes
            .iter()
            .filter_map(|(_, k)| k.split('/').next())
            .chain([project.as_str()])
            .collect();
        let mut all = BTreeMap::new();
        for p in projects {
            let needed: Vec<&str> = key
                .1
                .iter()
                .map(String::as_str)
                .filter(|k| k.split('/').next() == Some(p))
                .collect();
            let found = self.instances_of(p, &needed).await.map_err(|e| {
                let message = format!(
                    "pool {}: cannot read the instances of project {p}: {}",
                    pool.name, e.message
                );
                e.into_discovery(message)
            })?;
            all.extend(found.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let scope = discovery::choose(pool.name, &|t| self.is_cluster_wide(t), &nodes, &all)?;
        debug!(pool = %pool.name, scope = %scope.encode(), "discovered pool target");
        if let Ok(mut cache) = self.resolutions.lock() {
            cache.retain(|(p, _), _| p != &key.0);
            cache.insert(key, (Instant::now(), scope.clone()));
        }
        Ok(to_targets(&scope))
    }

    fn cached_resolution(&self, key: &CacheKey) -> Option<Scope> {
        let ttl = Duration::from_secs(self.config.resolution_cache_seconds);
        let cache = self.resolutions.lock().ok()?;
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, s)| s.clone())
    }

    /// Every instance of `project`, read at most once per [`INSTANCE_CACHE_TTL`]: pools
    /// resolved in the same reconcile share one read.
    /// A read that lacks one of `needed` is not reused: a node that just joined is found.
    async fn instances_of(&self, project: &str, needed: &[&str]) -> Result<Arc<InstanceMap>> {
        let mut cache = self.instance_cache.lock().await;
        if let Some((at, map)) = cache.get(project)
            && at.elapsed() < INSTANCE_CACHE_TTL
            && needed.iter().all(|k| map.contains_key(*k))
        {
            return Ok(map.clone());
        }
        let map = Arc::new(self.project_instances(project).await?);
        cache.insert(project.to_string(), (Instant::now(), map.clone()));
        Ok(map)
    }

    fn is_cluster_wide(&self, tag: &str) -> bool {
        discovery::is_gke_cluster_tag(tag) || self.config.cluster_wide_tags.iter().any(|t| t == tag)
    }
}

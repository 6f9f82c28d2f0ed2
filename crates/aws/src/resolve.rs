//! Resolving a pool to its targets on AWS: the security groups from the pool's override,
//! else discovered from the pool's instances (the groups of their primary interfaces, with
//! names and cluster tags when there is a choice to make). The choice itself is the pure
//! [`discovery::choose`]; this module reads its inputs and caches its answers. A discovered
//! group that network interfaces outside the pool share is refused
//! ([`discovery::shared_group`]); a pinned one is taken as it is. A pool with several groups
//! (pinned, or tagged `<poolGroupTagKey>=<pool>`) has its rules spread over them
//! (`PoolTarget::spread`): each rule on one group, not on every one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nodeport_firewall_model::{PoolTarget, Target};
use nodeport_firewall_provider::{Error, ErrorKind, PoolView, Result};

use crate::{AwsPoolConfig, AwsProvider, NAME, config, discovery};

/// A resolution's cache key: the pool, and the instances of its nodes.
pub(crate) type CacheKey = (String, Vec<String>);

impl AwsProvider {
    /// Forgets cached pool resolutions, e.g. after the config changed.
    pub fn clear_cache(&self) {
        if let Ok(mut c) = self.resolutions.lock() {
            c.clear();
        }
    }

    /// The security groups of `pool`.
    pub(crate) async fn resolve_pool(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        let over: AwsPoolConfig = pool.override_config(NAME)?;
        // Several groups share the pool's rules, each rule on one of them, filled in this
        // order: every node carries them all, so a rule on any is in force on each node.
        let spread = |groups: &[String]| (groups.len() > 1).then(|| pool.name.to_string());
        let to_targets = |groups: &[String]| {
            groups
                .iter()
                .map(|g| PoolTarget {
                    target: Target::new(NAME, g),
                    scope: None,
                    payload: None,
                    spread: spread(groups),
                })
                .collect::<Vec<_>>()
        };
        if !over.security_group_ids.is_empty() {
            let mut ids = over.security_group_ids.clone();
            if let Some(bad) = ids.iter().find(|g| !config::valid_sg_id(g)) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "pools.{}.aws.securityGroupIds: {bad:?} is not a security group id (sg-...)",
                        pool.name
                    ),
                ));
            }
            // The config's order is the order they fill in; a repeated id counts once.
            let mut seen = BTreeSet::new();
            ids.retain(|g| seen.insert(g.clone()));
            return Ok(to_targets(&ids));
        }
        let nodes = discovery::instances(pool.name, pool.nodes)?;
        let mut ids: Vec<String> = nodes.iter().map(|(_, i)| i.clone()).collect();
        ids.dedup();
        let key = (pool.name.to_string(), ids.clone());
        if let Some(groups) = self.cached_resolution(&key) {
            return Ok(to_targets(&groups));
        }
        let region = self.client.config().region().map(|r| r.to_string());
        let hint = discovery::region_hint(pool.nodes, region.as_deref()).unwrap_or_default();
        let by_instance = self.instance_groups(&ids).await.map_err(|e| {
            let message = format!(
                "pool {}: cannot read its instances: {}{hint}",
                pool.name, e.message
            );
            e.into_discovery(message)
        })?;
        let missing: Vec<&String> = ids
            .iter()
            .filter(|i| !by_instance.contains_key(*i))
            .collect();
        if !missing.is_empty() {
            return Err(Error::new(
                ErrorKind::Discovery,
                format!(
                    "pool {}: instances not found in region: {}{hint}",
                    pool.name,
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let node_groups: Vec<discovery::NodeGroups> = nodes
            .iter()
            .map(|(node, inst)| discovery::NodeGroups {
                node: node.clone(),
                instance: inst.clone(),
                groups: by_instance.get(inst).cloned().unwrap_or_default(),
            })
            .collect();
        let all: BTreeSet<String> = node_groups
            .iter()
            .flat_map(|n| n.groups.iter().cloned())
            .collect();
        // Names and tags only matter when there is a choice to make or to explain.
        let info = if all.len() > 1 {
            self.group_info(&all).await?
        } else {
            BTreeMap::new()
        };
        let groups = discovery::choose(pool.name, &self.tag_key, &node_groups, &info)?;
        let pool_instances: BTreeSet<String> = ids.iter().cloned().collect();
        for group in &groups {
            let outside = self
                .interfaces_outside(group, |i| discovery::outside_pool(&pool_instances, i))
                .await
                .map_err(|e| {
                    let message = format!(
                        "pool {}: cannot read which network interfaces share {group}: {} (ec2:DescribeNetworkInterfaces is needed, docs/aws.md)",
                        pool.name, e.message
                    );
                    e.into_discovery(message)
                })?;
            if !outside.is_empty() {
                return Err(discovery::shared_group(
                    pool.name,
                    group,
                    &self.tag_key,
                    &info,
                    &outside,
                ));
            }
        }
        if let Ok(mut cache) = self.resolutions.lock() {
            cache.retain(|(p, _), _| p != pool.name.as_str());
            cache.insert(key, (Instant::now(), groups.clone()));
        }
        Ok(to_targets(&groups))
    }

    fn cached_resolution(&self, key: &CacheKey) -> Option<Vec<String>> {
        let ttl = Duration::from_secs(self.config.resolution_cache_seconds);
        let cache = self.resolutions.lock().ok()?;
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, g)| g.clone())
    }
}

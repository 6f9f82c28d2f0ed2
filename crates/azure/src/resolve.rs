//! Resolving a pool to its target on Azure: the NSG from the operator config or the pool's
//! override, else discovered; the destination its rules are scoped to (a subnet's prefixes,
//! an application security group, or the node IPs) likewise. Discovery reads the pool's
//! VMSS network interfaces and their subnets; the choices are the pure functions of
//! [`discovery`], and their answers are cached per pool and VMSS set.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nodeport_firewall_model::{PoolTarget, Target};
use nodeport_firewall_provider::{Error, ErrorKind, PoolView, Result};
use tracing::info;

use crate::marker::{self, Destination};
use crate::{AzurePoolConfig, AzureProvider, NAME, NsgId, config_error, discovery};

/// A pool and its VMSSs.
pub(crate) type ResolutionKey = (String, Vec<discovery::Vmss>);
/// When discovered, the NSG (when it was looked for) and the destination.
pub(crate) type Resolution = (Instant, Option<String>, discovery::Found);

impl AzureProvider {
    /// The target of `pool` (its NSG) and the destination of its rules there.
    pub(crate) async fn resolve_pool(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        let over: AzurePoolConfig = pool.override_config(NAME)?;
        let configured_nsg = over
            .network_security_group
            .as_ref()
            .or(self.config.network_security_group.as_ref());
        let configured_destination = match (
            &over.application_security_group,
            over.destination_prefixes.as_slice(),
        ) {
            (Some(_), [_, ..]) => {
                return Err(config_error(format!(
                    "pools.{}.azure: destinationPrefixes and applicationSecurityGroup exclude each other",
                    pool.name
                )));
            }
            (Some(asg), []) => Some(Destination::Asg(asg.clone())),
            (None, [_, ..]) => {
                let nets: std::result::Result<Vec<IpNet>, String> = over
                    .destination_prefixes
                    .iter()
                    .map(|s| {
                        marker::parse_prefix(s).ok_or_else(|| {
                            format!(
                                "pools.{}.azure.destinationPrefixes: {s:?} is not a prefix",
                                pool.name
                            )
                        })
                    })
                    .collect();
                Some(Destination::Prefixes(nets.map_err(config_error)?))
            }
            (None, []) => None,
        };
        // Discovery only when something is missing, and for the destination only when the
        // nodes are VMSS instances (otherwise their IPs are the destination).
        let all_vmss = !pool.nodes.is_empty()
            && pool.nodes.iter().all(|n| {
                n.provider_id
                    .as_deref()
                    .and_then(discovery::vmss_of)
                    .is_some()
            });
        let want_nsg = configured_nsg.is_none();
        let want_destination =
            configured_destination.is_none() && self.config.discover_destination && all_vmss;
        let (found_nsg, found) = if want_nsg || want_destination {
            self.discover(&pool, want_nsg).await?
        } else {
            (None, discovery::Found::NodeIps)
        };
        let nsg_text = configured_nsg.cloned().or(found_nsg).ok_or_else(|| {
            Error::new(
                ErrorKind::Discovery,
                format!(
                    "pool {}: no NSG: set azure.networkSecurityGroup, or pools.{}.azure.networkSecurityGroup",
                    pool.name, pool.name
                ),
            )
        })?;
        let nsg = NsgId::parse(&nsg_text).map_err(|e| {
            config_error(format!(
                "pools.{}.azure.networkSecurityGroup: {e}",
                pool.name
            ))
        })?;
        let destination = match (configured_destination, found) {
            (Some(d), _) => d,
            (None, discovery::Found::Asg(id)) => Destination::Asg(id),
            (None, discovery::Found::Subnet(prefixes)) => Destination::Prefixes(
                prefixes
                    .iter()
                    .filter_map(|p| marker::parse_prefix(p))
                    .collect(),
            ),
            (None, discovery::Found::NodeIps) => {
                // The pool's node IPs: refreshed on every reconcile as nodes come and go.
                // Nodes report them themselves: anything but a single address refuses the
                // pool (its rules are then kept as they are), it never widens a rule.
                let mut ips = Vec::new();
                for node in pool.nodes {
                    for ip in &node.internal_ips {
                        let host = discovery::node_destination(ip).map_err(|why| {
                            Error::new(
                                ErrorKind::Discovery,
                                format!(
                                    "pool {}: node {}: its InternalIP {why}; node addresses become /32 and /128 destinations, so they must be single addresses. Fix the node's status.addresses, or set pools.{}.azure.destinationPrefixes or applicationSecurityGroup",
                                    pool.name, node.name, pool.name
                                ),
                            )
                        })?;
                        ips.push(host);
                    }
                }
                if ips.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Discovery,
                        format!(
                            "pool {}: no node with an InternalIP to use as destination; set pools.{}.azure.destinationPrefixes or applicationSecurityGroup",
                            pool.name, pool.name
                        ),
                    ));
                }
                Destination::Prefixes(ips)
            }
        };
        if destination.prefix_count() == 0 && matches!(destination, Destination::Prefixes(_)) {
            return Err(Error::new(
                ErrorKind::Discovery,
                format!("pool {}: its subnet has no address prefix", pool.name),
            ));
        }
        Ok(vec![PoolTarget {
            target: Target::new(NAME, &nsg.id()),
            scope: Some(destination.scope()),
            payload: None,
            spread: None,
        }])
    }

    /// Discovers a pool's NSG (when `want_nsg`) and destination from its VMSS NICs.
    async fn discover(
        &self,
        pool: &PoolView<'_>,
        want_nsg: bool,
    ) -> Result<(Option<String>, discovery::Found)> {
        let vmss = discovery::pool_vmss(pool.name, pool.nodes)?;
        let key = (
            pool.name.to_string(),
            vmss.iter().cloned().collect::<Vec<_>>(),
        );
        let ttl = Duration::from_secs(self.config.resolution_cache_seconds);
        if let Some((at, nsg, found)) = self
            .resolutions
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
            && at.elapsed() < ttl
            && (nsg.is_some() || !want_nsg)
        {
            return Ok((nsg, found));
        }
        let as_discovery = |e: Error| {
            let message = format!(
                "pool {}: cannot read its VMSS network interfaces: {}; or set pools.{}.azure.networkSecurityGroup and a destination",
                pool.name, e.message, pool.name
            );
            e.into_discovery(message)
        };
        let mut nics = Vec::new();
        for v in &vmss {
            nics.extend(self.vmss_nics(v).await.map_err(as_discovery)?);
        }
        if nics.is_empty() {
            return Err(Error::new(
                ErrorKind::Discovery,
                format!("pool {}: its VMSS have no network interfaces", pool.name),
            ));
        }
        let mut subnets = BTreeMap::new();
        let ids: BTreeSet<String> = nics.iter().filter_map(|n| n.subnet.clone()).collect();
        for id in ids {
            let info = self.subnet(&id).await.map_err(as_discovery)?;
            subnets.insert(id.to_ascii_lowercase(), info);
        }
        let nsg = if want_nsg {
            Some(discovery::choose_nsg(pool.name, &nics, &subnets)?)
        } else {
            None
        };
        let found = discovery::choose_destination(&vmss, &nics, &subnets);
        if let Ok(mut c) = self.resolutions.lock() {
            c.retain(|(p, _), _| p != pool.name.as_str());
            c.insert(key, (Instant::now(), nsg.clone(), found.clone()));
        }
        info!(pool = %pool.name, nsg = ?nsg, destination = ?found, "discovered pool target");
        Ok((nsg, found))
    }
}

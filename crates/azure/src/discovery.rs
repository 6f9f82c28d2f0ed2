//! Discovery of a pool's NSG and destination from its nodes' VMSS network interfaces.
//!
//! `providerID` names the VMSS; its NICs name their subnet, their application security
//! groups and their own NSG; the subnet names its NSG and every IP configuration in it. The
//! choices themselves are pure functions, tested on their own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use nodeport_firewall_model::{NodeSpec, PoolName};
use nodeport_firewall_provider::{Error, ErrorKind, Result};

/// A VMSS: (subscription, resource group, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vmss {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
}

/// The VMSS of a node, from `azure:///subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachineScaleSets/<vmss>/virtualMachines/<n>`.
pub fn vmss_of(provider_id: &str) -> Option<Vmss> {
    let rest = provider_id.strip_prefix("azure://")?;
    let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let ok = parts.len() == 10
        && parts[0].eq_ignore_ascii_case("subscriptions")
        && parts[2].eq_ignore_ascii_case("resourceGroups")
        && parts[4].eq_ignore_ascii_case("providers")
        && parts[5].eq_ignore_ascii_case("Microsoft.Compute")
        && parts[6].eq_ignore_ascii_case("virtualMachineScaleSets")
        && parts[8].eq_ignore_ascii_case("virtualMachines")
        && [1, 3, 7].iter().all(|i| !parts[*i].is_empty());
    ok.then(|| Vmss {
        subscription: parts[1].to_string(),
        resource_group: parts[3].to_string(),
        name: parts[7].to_string(),
    })
}

/// The VMSSs of a pool's nodes; an error naming the nodes that are not VMSS instances.
pub fn pool_vmss(pool: &PoolName, nodes: &[NodeSpec]) -> Result<BTreeSet<Vmss>> {
    let mut out = BTreeSet::new();
    let mut bad = Vec::new();
    for n in nodes {
        match n.provider_id.as_deref().and_then(vmss_of) {
            Some(v) => {
                out.insert(v);
            }
            None => bad.push(n.name.as_str()),
        }
    }
    if !bad.is_empty() {
        return Err(Error::new(
            ErrorKind::Discovery,
            format!(
                "pool {pool}: nodes without a VMSS providerID: {}; set pools.{pool}.azure.networkSecurityGroup",
                bad.join(", ")
            ),
        ));
    }
    if out.is_empty() {
        return Err(Error::new(
            ErrorKind::Discovery,
            format!("pool {pool}: no nodes to discover its NSG from"),
        ));
    }
    Ok(out)
}

/// What discovery needs of one NIC (its primary IP configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nic {
    pub nsg: Option<String>,
    pub subnet: Option<String>,
    pub asgs: BTreeSet<String>,
}

/// What discovery needs of one subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetInfo {
    pub nsg: Option<String>,
    pub prefixes: Vec<String>,
    /// Ids of the IP configurations in the subnet (NICs of VMs, VMSSs, load balancers...).
    pub ip_configurations: Vec<String>,
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// The NSG of a pool: the one on all its NICs, else the one on all its subnets.
pub fn choose_nsg(
    pool: &PoolName,
    nics: &[Nic],
    subnets: &BTreeMap<String, SubnetInfo>,
) -> Result<String> {
    let nic_nsgs: BTreeSet<String> = nics
        .iter()
        .filter_map(|n| n.nsg.as_deref())
        .map(lower)
        .collect();
    let all_nics_have_one = nics.iter().all(|n| n.nsg.is_some());
    if nic_nsgs.len() == 1 && all_nics_have_one {
        return nic_nsgs
            .into_iter()
            .next()
            .ok_or_else(|| unreachable_nsg(pool));
    }
    let subnet_nsgs: BTreeSet<Option<String>> = nics
        .iter()
        .map(|n| {
            n.subnet
                .as_deref()
                .and_then(|s| subnets.get(&lower(s)))
                .and_then(|s| s.nsg.as_deref().map(lower))
        })
        .collect();
    match (
        nic_nsgs.is_empty(),
        subnet_nsgs.len(),
        subnet_nsgs.iter().next(),
    ) {
        (true, 1, Some(Some(nsg))) => Ok(nsg.clone()),
        (true, _, _) if subnet_nsgs.iter().all(Option::is_none) => Err(Error::new(
            ErrorKind::Discovery,
            format!(
                "pool {pool}: neither its NICs nor their subnets have an NSG; set pools.{pool}.azure.networkSecurityGroup"
            ),
        )),
        _ => {
            let mut all: Vec<String> = nic_nsgs.into_iter().collect();
            all.extend(subnet_nsgs.into_iter().flatten());
            all.sort();
            all.dedup();
            Err(Error::new(
                ErrorKind::Discovery,
                format!(
                    "pool {pool}: its NICs and subnets have different NSGs: {}; set pools.{pool}.azure.networkSecurityGroup",
                    all.join(", ")
                ),
            ))
        }
    }
}

fn unreachable_nsg(pool: &PoolName) -> Error {
    Error::new(ErrorKind::Discovery, format!("pool {pool}: no NSG"))
}

/// How a pool's destination was discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Asg(String),
    Subnet(Vec<String>),
    /// Neither: the pool's node IPs are used.
    NodeIps,
}

/// The destination of a pool: an ASG all its NICs carry (when exactly one), else its subnet
/// when no other VMSS or VM has an IP configuration in it, else its node IPs.
pub fn choose_destination(
    vmss: &BTreeSet<Vmss>,
    nics: &[Nic],
    subnets: &BTreeMap<String, SubnetInfo>,
) -> Found {
    let mut common: Option<BTreeSet<String>> = None;
    for n in nics {
        let asgs: BTreeSet<String> = n.asgs.iter().map(|a| lower(a)).collect();
        common = Some(match common {
            None => asgs,
            Some(c) => c.intersection(&asgs).cloned().collect(),
        });
    }
    if let Some(c) = &common
        && c.len() == 1
        && let Some(asg) = c.iter().next()
    {
        return Found::Asg(asg.clone());
    }
    let used: BTreeSet<String> = nics
        .iter()
        .filter_map(|n| n.subnet.as_deref())
        .map(lower)
        .collect();
    if used.len() == 1
        && let Some(info) = used.iter().next().and_then(|s| subnets.get(s))
        && !info.prefixes.is_empty()
    {
        let ours: Vec<String> = vmss
            .iter()
            .map(|v| format!("/virtualmachinescalesets/{}/", lower(&v.name)))
            .collect();
        let own = info
            .ip_configurations
            .iter()
            .all(|ip| ours.iter().any(|o| lower(ip).contains(o.as_str())));
        if own {
            return Found::Subnet(info.prefixes.clone());
        }
    }
    Found::NodeIps
}

/// A node's address as a destination prefix: a single host (`/32`, `/128`), or why not.
///
/// `status.addresses` is written by the kubelet (and the cloud controller), so a node can
/// claim anything there. Only a bare IPv4 or IPv6 address is taken: a CIDR (`10.0.0.0/8`,
/// even `10.0.0.4/32`), a name, the unspecified address or text with spaces would widen or
/// garble the rule of every node of the pool. The caller refuses the whole pool (fail
/// closed and loud) rather than skip the node quietly: see docs/azure.md.
pub fn node_destination(address: &str) -> std::result::Result<IpNet, String> {
    let ip: IpAddr = address.parse().map_err(|_| {
        if address.contains('/') {
            format!("{address:?} is a CIDR, not a single address")
        } else {
            format!("{address:?} is not an IP address")
        }
    })?;
    if ip.is_unspecified() {
        return Err(format!("{address:?} is the unspecified address"));
    }
    Ok(IpNet::from(ip))
}

/// Splits a subnet id into (subscription, resource group, vnet, subnet).
pub fn subnet_parts(id: &str) -> Option<(String, String, String, String)> {
    let parts: Vec<&str> = id.trim_matches('/').split('/').collect();
    let ok = parts.len() == 10
        && parts[0].eq_ignore_ascii_case("subscriptions")
        && parts[2].eq_ignore_ascii_case("resourceGroups")
        && parts[6].eq_ignore_ascii_case("virtualNetworks")
        && parts[8].eq_ignore_ascii_case("subnets");
    ok.then(|| {
        (
            parts[1].to_string(),
            parts[3].to_string(),
            parts[7].to_string(),
            parts[9].to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/";
    const NSG: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/";

    fn nic(nsg: Option<&str>, subnet: &str, asgs: &[&str]) -> Nic {
        Nic {
            nsg: nsg.map(|n| format!("{NSG}{n}")),
            subnet: Some(format!("{SUB}{subnet}")),
            asgs: asgs.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn subnet(nsg: Option<&str>, prefix: &str, configs: &[&str]) -> (String, SubnetInfo) {
        (
            String::new(),
            SubnetInfo {
                nsg: nsg.map(|n| format!("{NSG}{n}")),
                prefixes: vec![prefix.to_string()],
                ip_configurations: configs.iter().map(|c| c.to_string()).collect(),
            },
        )
    }

    fn subnets(list: &[(&str, (String, SubnetInfo))]) -> BTreeMap<String, SubnetInfo> {
        list.iter()
            .map(|(name, (_, info))| (lower(&format!("{SUB}{name}")), info.clone()))
            .collect()
    }

    #[test]
    fn provider_ids() {
        let v = vmss_of("azure:///subscriptions/s1/resourceGroups/MC_rg/providers/Microsoft.Compute/virtualMachineScaleSets/aks-np1-123-vmss/virtualMachines/3").unwrap();
        assert_eq!(
            (
                v.subscription.as_str(),
                v.resource_group.as_str(),
                v.name.as_str()
            ),
            ("s1", "MC_rg", "aks-np1-123-vmss")
        );
        assert_eq!(
            vmss_of(
                "azure:///subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"
            ),
            None
        );
        assert_eq!(vmss_of("aws:///eu-west-1a/i-1"), None);
        let nodes = vec![NodeSpec::new("n1").with_provider_id("aws:///x/i-1")];
        let e = pool_vmss(&PoolName::new("p"), &nodes).unwrap_err();
        assert!(e.message.contains("n1"), "{e}");
    }

    #[test]
    fn nsg_from_nics_then_subnets() {
        let p = PoolName::new("p");
        let sn = subnets(&[
            ("a", subnet(Some("subnet-nsg"), "10.0.0.0/16", &[])),
            ("b", subnet(Some("other-nsg"), "10.1.0.0/16", &[])),
        ]);
        let cases: Vec<(Vec<Nic>, std::result::Result<&str, &str>)> = vec![
            (
                vec![
                    nic(Some("nic-nsg"), "a", &[]),
                    nic(Some("nic-nsg"), "a", &[]),
                ],
                Ok("nic-nsg"),
            ),
            (
                vec![nic(None, "a", &[]), nic(None, "a", &[])],
                Ok("subnet-nsg"),
            ),
            (
                vec![nic(None, "a", &[]), nic(None, "b", &[])],
                Err("different NSGs"),
            ),
            (
                vec![nic(Some("x"), "a", &[]), nic(Some("y"), "a", &[])],
                Err("different NSGs"),
            ),
        ];
        for (nics, want) in cases {
            let got = choose_nsg(&p, &nics, &sn);
            match want {
                Ok(name) => assert_eq!(got.unwrap(), lower(&format!("{NSG}{name}"))),
                Err(text) => assert!(got.unwrap_err().message.contains(text)),
            }
        }
        let bare = subnets(&[("a", subnet(None, "10.0.0.0/16", &[]))]);
        assert!(
            choose_nsg(&p, &[nic(None, "a", &[])], &bare)
                .unwrap_err()
                .message
                .contains("neither")
        );
    }

    #[test]
    fn destination_asg_then_own_subnet_then_node_ips() {
        let vmss: BTreeSet<Vmss> = [Vmss {
            subscription: "s".into(),
            resource_group: "rg".into(),
            name: "aks-np1-vmss".into(),
        }]
        .into();
        let own_cfg = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/aks-np1-vmss/virtualMachines/0/networkInterfaces/nic/ipConfigurations/ipconfig1";
        let other_cfg = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/aks-np2-vmss/virtualMachines/0/networkInterfaces/nic/ipConfigurations/ipconfig1";
        let own = subnets(&[("a", subnet(None, "10.0.0.0/24", &[own_cfg]))]);
        let shared = subnets(&[("a", subnet(None, "10.0.0.0/24", &[own_cfg, other_cfg]))]);
        assert_eq!(
            choose_destination(
                &vmss,
                &[
                    nic(None, "a", &["/x/ASG1"]),
                    nic(None, "a", &["/x/asg1", "/x/asg2"])
                ],
                &shared
            ),
            Found::Asg("/x/asg1".into())
        );
        assert_eq!(
            choose_destination(&vmss, &[nic(None, "a", &["/x/a1", "/x/a2"])], &own),
            Found::Subnet(vec!["10.0.0.0/24".into()])
        );
        assert_eq!(
            choose_destination(&vmss, &[nic(None, "a", &[])], &shared),
            Found::NodeIps
        );
    }

    #[test]
    fn node_addresses_must_be_single_hosts() {
        for (address, want) in [
            ("10.240.0.4", Ok("10.240.0.4/32")),
            ("fd00:10::4", Ok("fd00:10::4/128")),
            ("::ffff:10.0.0.1", Ok("::ffff:10.0.0.1/128")),
            ("10.0.0.0/8", Err("is a CIDR")),
            ("10.240.0.4/32", Err("is a CIDR")),
            ("0.0.0.0/0", Err("is a CIDR")),
            ("fd00::/8", Err("is a CIDR")),
            ("0.0.0.0", Err("unspecified")),
            ("::", Err("unspecified")),
            ("", Err("not an IP address")),
            (" 10.240.0.4", Err("not an IP address")),
            ("node-1.internal", Err("not an IP address")),
            ("Internet", Err("not an IP address")),
            ("10.240.0.4,10.0.0.0", Err("not an IP address")),
        ] {
            match (node_destination(address), want) {
                (Ok(net), Ok(text)) => assert_eq!(net.to_string(), text, "{address:?}"),
                (Err(e), Err(part)) => assert!(e.contains(part), "{address:?}: {e}"),
                (got, want) => panic!("{address:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn subnet_ids() {
        assert_eq!(
            subnet_parts(&format!("{SUB}aks-subnet")),
            Some(("s".into(), "rg".into(), "vnet".into(), "aks-subnet".into()))
        );
        assert_eq!(subnet_parts("/subscriptions/s"), None);
    }
}

//! Choosing a pool's security groups from what EC2 says about its nodes. Pure.

use std::collections::{BTreeMap, BTreeSet};

use nodeport_firewall_model::{NodeSpec, PoolName};
use nodeport_firewall_provider::{Error, ErrorKind};

/// The instance id in a Node's `providerID`, `aws:///<zone>/<instance-id>`.
pub fn instance_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    (id.starts_with("i-") && id.len() > 2 && id[2..].chars().all(|c| c.is_ascii_hexdigit()))
        .then_some(id)
}

/// The availability zone in a Node's `providerID`, `aws:///<zone>/<instance-id>`.
pub fn zone(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws:///")?;
    let (zone, _) = rest.split_once('/')?;
    (!zone.is_empty()).then_some(zone)
}

/// The region of an availability zone: `eu-west-1a` -> `eu-west-1`, and local or
/// wavelength zones like `us-west-2-lax-1a` -> `us-west-2`.
pub fn region_of_zone(zone: &str) -> Option<String> {
    let parts: Vec<&str> = zone.split('-').collect();
    // <area>-<direction>-<number><letter>...: the region ends with the first numbered part.
    let i = parts
        .iter()
        .position(|p| p.starts_with(|c: char| c.is_ascii_digit()))?;
    let number: String = parts[i].chars().take_while(char::is_ascii_digit).collect();
    let mut region: Vec<&str> = parts[..i].to_vec();
    region.push(&number);
    (region.len() >= 3).then(|| region.join("-"))
}

/// When the pool's nodes are in another region than the one the operator uses, what to set.
pub fn region_hint(nodes: &[NodeSpec], region: Option<&str>) -> Option<String> {
    let regions: BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| n.provider_id.as_deref().and_then(zone))
        .filter_map(region_of_zone)
        .collect();
    let other: Vec<&String> = regions
        .iter()
        .filter(|r| Some(r.as_str()) != region)
        .collect();
    let first = other.first()?;
    Some(format!(
        "; the nodes' providerIDs are in region {}, but the operator uses {}: set aws.region: {first} in the operator config (or AWS_REGION)",
        other
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        region.unwrap_or("no region")
    ))
}

/// What EC2 says about one node's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeGroups {
    pub node: String,
    pub instance: String,
    /// Security groups of the primary network interface (device index 0).
    pub groups: Vec<String>,
}

/// What EC2 says about one security group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupInfo {
    pub name: String,
    /// Carries the cluster tag key (`clusterTagKey`).
    pub tagged: bool,
    /// The value of its `poolGroupTagKey` tag: the pool it is given to.
    pub pool: Option<String>,
}

fn discovery(message: String) -> Error {
    Error::new(ErrorKind::Discovery, message)
}

/// The config lines that pin a pool to `groups`.
pub fn config_lines(pool: &PoolName, groups: &[&str]) -> String {
    format!(
        "pools:\n  {pool}:\n    aws:\n      securityGroupIds: [{}]",
        groups.join(", ")
    )
}

fn describe(id: &str, info: &BTreeMap<String, GroupInfo>) -> String {
    match info.get(id) {
        Some(g) if !g.name.is_empty() => format!("{id} ({})", g.name),
        _ => id.to_string(),
    }
}

/// Chooses the pool's security groups: per node, every group given to the pool by its
/// `poolGroupTagKey` tag (the pool's rules are then spread over them), else the one tagged
/// `tag_key`, else the only one; then every node must agree, so that a rule on any of the
/// groups is in force on every node of the pool.
pub fn choose(
    pool: &PoolName,
    tag_key: &str,
    nodes: &[NodeGroups],
    info: &BTreeMap<String, GroupInfo>,
) -> Result<Vec<String>, Error> {
    if nodes.is_empty() {
        return Err(discovery(format!(
            "pool {pool}: no nodes to discover a security group from"
        )));
    }
    let mut choices: BTreeMap<Vec<String>, Vec<&NodeGroups>> = BTreeMap::new();
    let mut ambiguous: Vec<(&NodeGroups, Vec<&String>)> = Vec::new();
    for n in nodes {
        let mut given: Vec<String> = n
            .groups
            .iter()
            .filter(|g| {
                info.get(*g)
                    .is_some_and(|i| i.pool.as_deref() == Some(pool.as_str()))
            })
            .cloned()
            .collect();
        if !given.is_empty() {
            // Sorted by id: the order the rules fill them in, the same on every node.
            given.sort();
            given.dedup();
            choices.entry(given).or_default().push(n);
            continue;
        }
        let tagged: Vec<&String> = n
            .groups
            .iter()
            .filter(|g| info.get(*g).is_some_and(|i| i.tagged))
            .collect();
        let choice = match (tagged.as_slice(), n.groups.as_slice()) {
            ([one], _) => (*one).clone(),
            ([], [only]) => only.clone(),
            ([], []) => {
                return Err(discovery(format!(
                    "pool {pool}: node {} (instance {}) has no security group on its primary network interface",
                    n.node, n.instance
                )));
            }
            ([], all) => {
                ambiguous.push((n, all.iter().collect()));
                continue;
            }
            (several, _) => {
                ambiguous.push((n, several.to_vec()));
                continue;
            }
        };
        choices.entry(vec![choice]).or_default().push(n);
    }
    if let Some((first, _)) = ambiguous.first() {
        let candidates: BTreeSet<&String> = ambiguous.iter().flat_map(|(_, c)| c.clone()).collect();
        // Suggest a group every ambiguous node has, if there is one.
        let common = candidates
            .iter()
            .find(|c| ambiguous.iter().all(|(_, cs)| cs.contains(c)))
            .or(candidates.iter().next())
            .map(|s| s.as_str())
            .unwrap_or("sg-...");
        let listed: Vec<String> = candidates.iter().map(|c| describe(c, info)).collect();
        let nodes: Vec<String> = ambiguous
            .iter()
            .map(|(n, _)| format!("{} ({})", n.node, n.instance))
            .collect();
        let tagged_many = ambiguous.iter().any(|(n, c)| {
            c.len() < n.groups.len() || c.iter().all(|g| info.get(*g).is_some_and(|i| i.tagged))
        });
        let why = if tagged_many {
            format!("more than one of them is tagged {tag_key}")
        } else {
            format!("none of them is tagged {tag_key}")
        };
        let _ = first;
        return Err(discovery(format!(
            "pool {pool}: cannot choose a security group: the primary network interface of node(s) {} has several security groups and {why}. Candidates: {}. Tag exactly one of them with {tag_key}, or name the group(s) in the operator config (pick from the candidates):\n{}",
            nodes.join(", "),
            listed.join(", "),
            config_lines(pool, &[common]),
        )));
    }
    let mut by_size: Vec<(&Vec<String>, &Vec<&NodeGroups>)> = choices.iter().collect();
    by_size.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    match by_size.as_slice() {
        [(groups, _)] => Ok((*groups).clone()),
        [(majority, _), rest @ ..] => {
            let outliers: Vec<String> = rest
                .iter()
                .flat_map(|(g, ns)| {
                    ns.iter().map(move |n| {
                        format!(
                            "{} ({}) -> {}",
                            n.node,
                            n.instance,
                            g.iter()
                                .map(|x| describe(x, info))
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                    })
                })
                .collect();
            let majority_text: Vec<String> = majority.iter().map(|x| describe(x, info)).collect();
            Err(discovery(format!(
                "pool {pool}: its nodes resolve to different security groups; most use {}, outliers: {}. Give the pool's nodes the same security group, split the pool, or name the groups in the operator config:\n{}",
                majority_text.join(","),
                outliers.join("; "),
                config_lines(
                    pool,
                    &majority.iter().map(String::as_str).collect::<Vec<_>>()
                ),
            )))
        }
        [] => Err(discovery(format!("pool {pool}: no security group found"))),
    }
}

/// A network interface a security group is attached to, as DescribeNetworkInterfaces says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub id: String,
    /// The instance it is attached to; none for interfaces of AWS services (the EKS
    /// control plane, load balancers, VPC endpoints) and for detached ones.
    pub instance: Option<String>,
    pub description: String,
}

/// Whether `interface` is outside the pool whose instances are `pool_instances`: anything
/// not attached to one of them (another pool's nodes, an instance that is no Node, the
/// EKS control plane, a load balancer). A pool's secondary interfaces are inside.
pub fn outside_pool(pool_instances: &BTreeSet<String>, interface: &Interface) -> bool {
    interface
        .instance
        .as_ref()
        .is_none_or(|i| !pool_instances.contains(i))
}

/// Most interfaces named in a refusal; the rest are counted.
const LISTED_INTERFACES: usize = 3;

/// The refusal of a discovered group that `outside` (interfaces not of the pool) share:
/// a rule written for this pool would open the port on all of them too, e.g. on every node
/// of the cluster through the EKS cluster security group. Pinning the group in the config
/// says the sharing is meant.
pub fn shared_group(
    pool: &PoolName,
    group: &str,
    tag_key: &str,
    info: &BTreeMap<String, GroupInfo>,
    outside: &[Interface],
) -> Error {
    let mut listed: Vec<String> = outside
        .iter()
        .take(LISTED_INTERFACES)
        .map(|i| match (&i.instance, i.description.is_empty()) {
            (Some(inst), _) => format!("{} (instance {inst}, not a node of pool {pool})", i.id),
            (None, false) => format!("{} ({:?})", i.id, i.description),
            (None, true) => format!("{} (no instance)", i.id),
        })
        .collect();
    if outside.len() > LISTED_INTERFACES {
        listed.push(format!("and {} more", outside.len() - LISTED_INTERFACES));
    }
    discovery(format!(
        "pool {pool}: refusing security group {}: network interfaces outside the pool share it: {}. A rule written for pool {pool} would open the port on them too (the EKS cluster security group, for one, is on every node and on the control plane). Give the pool's nodes a security group of their own, tagged {tag_key}, or pin securityGroupIds in the operator config if the sharing is meant:\n{}",
        describe(group, info),
        listed.join(", "),
        config_lines(pool, &[group]),
    ))
}

/// The instance ids of a pool's nodes, sorted; or an error naming the nodes without one.
pub fn instances(pool: &PoolName, nodes: &[NodeSpec]) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for n in nodes {
        match n.provider_id.as_deref().and_then(instance_id) {
            Some(id) => out.push((n.name.clone(), id.to_string())),
            None => bad.push(format!(
                "{} (providerID {:?})",
                n.name,
                n.provider_id.as_deref().unwrap_or("")
            )),
        }
    }
    if !bad.is_empty() {
        return Err(discovery(format!(
            "pool {pool}: nodes without an EC2 providerID (aws:///<zone>/<instance-id>): {}. Name the pool's security groups in the operator config:\n{}",
            bad.join(", "),
            config_lines(pool, &["sg-..."]),
        )));
    }
    if out.is_empty() {
        return Err(discovery(format!(
            "pool {pool}: no nodes to discover a security group from"
        )));
    }
    out.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ng(node: &str, groups: &[&str]) -> NodeGroups {
        NodeGroups {
            node: node.into(),
            instance: format!("i-{node}"),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn info(tagged: &[&str], all: &[&str]) -> BTreeMap<String, GroupInfo> {
        all.iter()
            .map(|g| {
                (
                    g.to_string(),
                    GroupInfo {
                        name: format!("name-{g}"),
                        tagged: tagged.contains(g),
                        pool: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn zones_and_regions() {
        for (zone, region) in [
            ("eu-west-1a", Some("eu-west-1")),
            ("us-east-1f", Some("us-east-1")),
            ("us-west-2-lax-1a", Some("us-west-2")),
            ("ap-southeast-2b", Some("ap-southeast-2")),
            ("weird", None),
        ] {
            assert_eq!(region_of_zone(zone).as_deref(), region, "{zone}");
        }
        assert_eq!(zone("aws:///eu-west-1a/i-0abc"), Some("eu-west-1a"));
        let mut n = NodeSpec::new("n");
        n.provider_id = Some("aws:///eu-west-1a/i-0abc".into());
        let hint = region_hint(std::slice::from_ref(&n), Some("us-east-1")).unwrap();
        assert!(hint.contains("set aws.region: eu-west-1"), "{hint}");
        assert_eq!(region_hint(&[n], Some("eu-west-1")), None);
    }

    #[test]
    fn provider_ids() {
        assert_eq!(
            instance_id("aws:///us-east-1a/i-0abc123"),
            Some("i-0abc123")
        );
        assert_eq!(instance_id("aws:///i-0abc123"), Some("i-0abc123"));
        assert_eq!(instance_id("gce://p/z/i-0abc"), None);
        assert_eq!(instance_id("aws:///us-east-1a/fargate-ip-10"), None);
    }

    #[test]
    fn single_tagged_ambiguous_and_outliers() {
        let pool = PoolName::new("web");
        let all = ["sg-1", "sg-2", "sg-3"];
        assert_eq!(
            choose(&pool, "k", &[ng("a", &["sg-1"])], &info(&[], &all)).unwrap(),
            vec!["sg-1"]
        );
        assert_eq!(
            choose(
                &pool,
                "k",
                &[ng("a", &["sg-1", "sg-2"])],
                &info(&["sg-2"], &all)
            )
            .unwrap(),
            vec!["sg-2"]
        );
        let e = choose(&pool, "k", &[ng("a", &["sg-1", "sg-2"])], &info(&[], &all)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Discovery);
        assert!(
            e.message.contains("sg-1 (name-sg-1), sg-2 (name-sg-2)"),
            "{e}"
        );
        assert!(
            e.message
                .contains("pools:\n  web:\n    aws:\n      securityGroupIds: [sg-1]"),
            "{e}"
        );
        let e = choose(
            &pool,
            "k",
            &[ng("a", &["sg-1"]), ng("b", &["sg-1"]), ng("c", &["sg-3"])],
            &info(&[], &all),
        )
        .unwrap_err();
        assert!(e.message.contains("outliers: c (i-c) -> sg-3"), "{e}");
    }

    /// Groups tagged `<poolGroupTagKey>=<pool>` are all the pool's, sorted by id, and win
    /// over the cluster tag; nodes that do not all carry the same ones are refused.
    #[test]
    fn groups_given_to_the_pool_by_tag_are_all_chosen() {
        let pool = PoolName::new("web");
        let mut inf = info(&["sg-1"], &["sg-1", "sg-2", "sg-3", "sg-4"]);
        for (g, p) in [("sg-3", "web"), ("sg-2", "web"), ("sg-4", "batch")] {
            inf.get_mut(g).unwrap().pool = Some(p.into());
        }
        let all = ["sg-4", "sg-3", "sg-1", "sg-2"];
        assert_eq!(
            choose(&pool, "k", &[ng("a", &all), ng("b", &all)], &inf).unwrap(),
            vec!["sg-2", "sg-3"]
        );
        // Another pool's group alone: the cluster tag decides as before.
        assert_eq!(
            choose(
                &PoolName::new("gpu"),
                "k",
                &[ng("a", &["sg-1", "sg-4"])],
                &inf
            )
            .unwrap(),
            vec!["sg-1"]
        );
        let e = choose(
            &pool,
            "k",
            &[ng("a", &all), ng("b", &all), ng("c", &["sg-1", "sg-2"])],
            &inf,
        )
        .unwrap_err();
        assert!(
            e.message
                .contains("most use sg-2 (name-sg-2),sg-3 (name-sg-3), outliers: c (i-c) -> sg-2"),
            "{e}"
        );
    }

    #[test]
    fn interfaces_outside_the_pool_and_the_refusal() {
        let pool = PoolName::new("web");
        let own: BTreeSet<String> = ["i-1".to_string(), "i-2".to_string()].into();
        let iface = |id: &str, instance: Option<&str>, description: &str| Interface {
            id: id.into(),
            instance: instance.map(str::to_string),
            description: description.into(),
        };
        for (i, outside) in [
            (iface("eni-a", Some("i-1"), ""), false),
            (iface("eni-b", Some("i-2"), "aws-K8S-i-2"), false),
            (iface("eni-c", Some("i-9"), ""), true),
            (iface("eni-d", None, "Amazon EKS prod"), true),
            (iface("eni-e", None, ""), true),
        ] {
            assert_eq!(outside_pool(&own, &i), outside, "{i:?}");
        }
        let sharers = [
            iface("eni-c", Some("i-9"), ""),
            iface("eni-d", None, "Amazon EKS prod"),
            iface("eni-e", None, ""),
            iface("eni-f", None, ""),
            iface("eni-g", None, ""),
        ];
        let e = shared_group(&pool, "sg-1", "k", &info(&[], &["sg-1"]), &sharers);
        assert_eq!(e.kind, ErrorKind::Discovery);
        for part in [
            "pool web: refusing security group sg-1 (name-sg-1)",
            "eni-c (instance i-9, not a node of pool web)",
            "eni-d (\"Amazon EKS prod\")",
            "eni-e (no instance), and 2 more",
            "pin securityGroupIds",
            "pools:\n  web:\n    aws:\n      securityGroupIds: [sg-1]",
        ] {
            assert!(e.message.contains(part), "{part:?} in {e}");
        }
        assert!(!e.message.contains("eni-f"), "{e}");
    }
}

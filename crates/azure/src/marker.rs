//! Rule names, the ownership marker in a rule's description, and destination scopes.
//!
//! An NSG security rule has no tags: its description (140 characters at most) is the only
//! place for the marker. It names the cluster and, when they fit, the pools and Services the
//! rule serves. When they do not fit, it carries a hash of them instead, which the planner
//! recognises by rendering the rule it wants ([`digest`]).

use ipnet::IpNet;
use nodeport_firewall_model::{IpFamily, PoolName, PoolSet, ServiceRef, ServiceSet};
use sha2::{Digest, Sha256};

/// Longest rule name Azure accepts.
pub const MAX_NAME: usize = 80;
/// Longest description Azure accepts.
pub const MAX_DESCRIPTION: usize = 140;

const PREFIX: &str = "nodeport-firewall cluster=";
const POOLS: &str = "; pools=";
const SERVICES: &str = "; services=";
const HASHED: &str = "; set#";
const SERVICES_HASHED: &str = "; services#";

/// Keeps the characters Azure allows in a rule name.
fn name_part(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(max)
        .collect()
}

/// `npf-<cluster>-<pools>-<hash>`: deterministic, at most 80 characters, starting with a
/// letter and ending with a hex digit, as Azure requires.
pub fn rule_name(cluster: &str, pools: &PoolSet, hash: &str) -> String {
    let pools: Vec<&str> = pools.iter().map(PoolName::as_str).collect();
    let name = format!(
        "npf-{}-{}-{}",
        name_part(cluster, 24),
        name_part(&pools.join("."), 36),
        name_part(hash, 12)
    );
    name.chars().take(MAX_NAME).collect()
}

fn hash_of(pools: &PoolSet, services: &ServiceSet) -> String {
    let mut h = Sha256::new();
    for p in pools.iter() {
        h.update(p.as_str().as_bytes());
        h.update([0]);
    }
    h.update([1]);
    for s in services.iter() {
        h.update(s.to_string().as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The description of a rule serving `services` of `pools`.
pub fn description(cluster: &str, pools: &PoolSet, services: &ServiceSet) -> String {
    let inline = format!(
        "{PREFIX}{cluster}{POOLS}{}{SERVICES}{}",
        join(pools.iter()),
        join(services.iter())
    );
    if inline.chars().count() <= MAX_DESCRIPTION {
        return inline;
    }
    // The pools, when they fit, stay readable: a rule of a pool that cannot be resolved is
    // then kept even by a process that has not seen the Services behind the hash.
    let hash = hash_of(pools, services);
    let with_pools = format!(
        "{PREFIX}{cluster}{POOLS}{}{SERVICES_HASHED}{hash}",
        join(pools.iter())
    );
    if with_pools.chars().count() <= MAX_DESCRIPTION {
        return with_pools;
    }
    format!("{PREFIX}{cluster}{HASHED}{hash}")
        .chars()
        .take(MAX_DESCRIPTION)
        .collect()
}

/// What a description says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// Not ours: no marker, or another cluster's.
    Foreign,
    /// Ours, with the pools and Services it serves.
    Inline {
        pools: PoolSet,
        services: ServiceSet,
    },
    /// Ours, with a hash of the pools and Services, and the pools when they fitted.
    Hashed {
        pools: Option<PoolSet>,
        hash: String,
    },
}

/// Reads a description.
pub fn parse(cluster: &str, description: Option<&str>) -> Marker {
    let Some(rest) = description.and_then(|d| d.strip_prefix(PREFIX)) else {
        return Marker::Foreign;
    };
    if let Some(hash) = rest
        .strip_prefix(cluster)
        .and_then(|r| r.strip_prefix(HASHED))
    {
        return Marker::Hashed {
            pools: None,
            hash: hash.to_string(),
        };
    }
    let Some(lists) = rest
        .strip_prefix(cluster)
        .and_then(|r| r.strip_prefix(POOLS))
    else {
        return Marker::Foreign;
    };
    let parse_pools = |pools: &str| -> PoolSet {
        pools
            .split(',')
            .filter(|s| !s.is_empty())
            .map(PoolName::new)
            .collect()
    };
    if let Some((pools, hash)) = lists.split_once(SERVICES_HASHED) {
        return Marker::Hashed {
            pools: Some(parse_pools(pools)),
            hash: hash.to_string(),
        };
    }
    let Some((pools, services)) = lists.split_once(SERVICES) else {
        return Marker::Foreign;
    };
    let pools = parse_pools(pools);
    let services = services
        .split(',')
        .filter_map(|s| s.parse::<ServiceRef>().ok())
        .collect();
    Marker::Inline { pools, services }
}

/// The hash our marker carries for a rule serving `services` of `pools` when the lists do
/// not fit a description; `None` when they do. The planner compares it with an observed
/// rule's hash, so a process that never wrote the rule still knows what it serves.
pub fn digest(cluster: &str, pools: &PoolSet, services: &ServiceSet) -> Option<String> {
    match parse(cluster, Some(&description(cluster, pools, services))) {
        Marker::Hashed { hash, .. } => Some(hash),
        _ => None,
    }
}

/// Where inside a shared NSG a pool's rules apply.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Destination {
    /// Address prefixes: the pool's subnet, or its node IPs as /32 and /128.
    Prefixes(Vec<IpNet>),
    /// The application security group the pool's NICs carry (its resource id).
    Asg(String),
}

const DST: &str = "dst:";
const ASG: &str = "asg:";

impl Destination {
    /// The scope string: part of the rule's content, so a change of destination is a
    /// change of the rule.
    pub fn scope(&self) -> String {
        match self {
            Destination::Prefixes(p) => {
                let mut p: Vec<IpNet> = p.iter().map(IpNet::trunc).collect();
                p.sort();
                p.dedup();
                format!("{DST}{}", join(p))
            }
            Destination::Asg(id) => format!("{ASG}{}", id.to_ascii_lowercase()),
        }
    }

    pub fn parse(scope: &str) -> Option<Destination> {
        if let Some(list) = scope.strip_prefix(DST) {
            let nets: Option<Vec<IpNet>> = list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().ok())
                .collect();
            return nets.map(Destination::Prefixes);
        }
        scope
            .strip_prefix(ASG)
            .map(|id| Destination::Asg(id.to_string()))
    }

    /// The part of the scope a rule's name is built from: stable while node IPs change, so
    /// that a rule whose destination changes is updated in place, not replaced.
    pub fn identity(scope: &str) -> &'static str {
        if scope.starts_with(ASG) { "asg" } else { "dst" }
    }

    /// The destination restricted to one IP family; `None` when it has nothing of that family.
    pub fn of_family(&self, family: IpFamily) -> Option<Destination> {
        match self {
            Destination::Prefixes(p) => {
                let p: Vec<IpNet> = p
                    .iter()
                    .filter(|n| IpFamily::of(n) == family)
                    .copied()
                    .collect();
                (!p.is_empty()).then_some(Destination::Prefixes(p))
            }
            Destination::Asg(_) => Some(self.clone()),
        }
    }

    /// Prefixes counted against the NSG's destination quota.
    pub fn prefix_count(&self) -> usize {
        match self {
            Destination::Prefixes(p) => p.len(),
            Destination::Asg(_) => 0,
        }
    }
}

/// Parses an address prefix as Azure returns it: a CIDR or a bare address.
pub fn parse_prefix(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(names: &[&str]) -> PoolSet {
        names.iter().map(|n| PoolName::new(*n)).collect()
    }

    fn svcs(n: usize) -> ServiceSet {
        (0..n)
            .map(|i| ServiceRef::new("default", format!("svc-{i}")))
            .collect()
    }

    #[test]
    fn names_are_short_valid_and_stable() {
        let long = "c".repeat(100);
        let p = pools(&["pool:a", &"p".repeat(60)]);
        let n = rule_name(&long, &p, "0123456789");
        assert!(n.len() <= MAX_NAME, "{n}");
        assert!(n.starts_with("npf-"));
        assert!(n.ends_with("0123456789"));
        assert!(
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        );
        assert_eq!(n, rule_name(&long, &p, "0123456789"));
    }

    #[test]
    fn short_markers_are_inline_and_round_trip() {
        let p = pools(&["a", "b"]);
        let s = svcs(2);
        let d = description("c1", &p, &s);
        assert!(d.len() <= MAX_DESCRIPTION);
        assert_eq!(
            parse("c1", Some(&d)),
            Marker::Inline {
                pools: p,
                services: s
            }
        );
    }

    #[test]
    fn long_markers_are_hashed_and_resolved_by_the_book() {
        let p = pools(&["a"]);
        let s = svcs(40);
        let d = description("c1", &p, &s);
        assert!(d.len() <= MAX_DESCRIPTION);
        let Marker::Hashed {
            pools: Some(seen_pools),
            hash: h,
        } = parse("c1", Some(&d))
        else {
            panic!("expected a hashed marker with its pools: {d}")
        };
        assert_eq!(seen_pools, p);
        let many_pools: PoolSet = (0..30)
            .map(|i| PoolName::new(format!("pool-{i}")))
            .collect();
        let d2 = description("c1", &many_pools, &s);
        assert!(d2.len() <= MAX_DESCRIPTION);
        assert!(
            matches!(parse("c1", Some(&d2)), Marker::Hashed { pools: None, .. }),
            "{d2}"
        );
        // The planner recognises the hash by rendering: same lists, same digest.
        assert_eq!(digest("c1", &p, &s), Some(h.clone()));
        assert_ne!(digest("c1", &p, &svcs(39)), Some(h));
        assert_eq!(digest("c1", &pools(&["a"]), &svcs(1)), None);
    }

    #[test]
    fn other_clusters_and_plain_descriptions_are_foreign() {
        let d = description("c1", &pools(&["a"]), &svcs(1));
        for (cluster, desc) in [
            ("c2", Some(d.as_str())),
            ("c", Some(d.as_str())),
            ("c1", Some("Allow web")),
            ("c1", None),
            ("c1", Some("nodeport-firewall cluster=c1")),
        ] {
            assert_eq!(parse(cluster, desc), Marker::Foreign, "{cluster} {desc:?}");
        }
    }

    #[test]
    fn scopes_round_trip_and_split_by_family() {
        let d = Destination::Prefixes(vec![
            "10.0.0.5/32".parse().unwrap(),
            "fd00::5/128".parse().unwrap(),
            "10.0.0.4/32".parse().unwrap(),
        ]);
        let s = d.scope();
        assert_eq!(s, "dst:10.0.0.4/32,10.0.0.5/32,fd00::5/128");
        assert_eq!(Destination::parse(&s).map(|d| d.scope()), Some(s.clone()));
        assert_eq!(
            d.of_family(IpFamily::V6).map(|d| d.scope()),
            Some("dst:fd00::5/128".to_string())
        );
        let v4only = Destination::Prefixes(vec!["10.0.0.0/24".parse().unwrap()]);
        assert_eq!(v4only.of_family(IpFamily::V6), None);
        assert_eq!(Destination::identity(&s), "dst");
        assert_eq!(Destination::identity("asg:/x"), "asg");
        assert_eq!(parse_prefix("10.1.2.3"), "10.1.2.3/32".parse().ok());
        assert_eq!(parse_prefix("10.1.2.3/16"), "10.1.0.0/16".parse().ok());
        assert_eq!(parse_prefix("Internet"), None);
    }
}

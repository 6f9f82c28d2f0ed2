//! Rule names, scopes and the ownership marker a rule carries in its description.
//!
//! A rule is ours when its name starts with [`NAME_PREFIX`] and its description is our JSON
//! marker naming this cluster. Both are needed: a person may copy a description, and another
//! cluster uses the same prefix.

use nodeport_firewall_model::render::NameParts;
use nodeport_firewall_model::{PoolName, PoolSet, ServiceRef, ServiceSet};
use serde::{Deserialize, Serialize};

/// Every rule name we write starts with this.
pub const NAME_PREFIX: &str = "npf-";
pub const MANAGED_BY: &str = "nodeport-firewall";
/// Longest description Compute accepts.
pub const MAX_DESCRIPTION: usize = 2048;

const SCOPE_TAGS: &str = "tags:";
const SCOPE_SA: &str = "sa:";

/// What a rule's targets are: network tags or a service account, never both, never none.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Tags(Vec<String>),
    ServiceAccount(String),
}

impl Scope {
    /// The neutral scope string: `tags:a,b` or `sa:<email>`.
    pub fn encode(&self) -> String {
        match self {
            Scope::Tags(tags) => format!("{SCOPE_TAGS}{}", tags.join(",")),
            Scope::ServiceAccount(sa) => format!("{SCOPE_SA}{sa}"),
        }
    }

    pub fn decode(s: &str) -> Option<Scope> {
        if let Some(tags) = s.strip_prefix(SCOPE_TAGS) {
            let tags: Vec<String> = tags
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect();
            return (!tags.is_empty()).then_some(Scope::Tags(tags));
        }
        s.strip_prefix(SCOPE_SA)
            .filter(|sa| !sa.is_empty())
            .map(|sa| Scope::ServiceAccount(sa.to_string()))
    }

    /// The scope of a rule with these targets; `None` when it has none or both kinds.
    pub fn of(tags: &[String], service_accounts: &[String]) -> Option<Scope> {
        match (tags.is_empty(), service_accounts) {
            (false, []) => {
                let mut t = tags.to_vec();
                t.sort();
                t.dedup();
                Some(Scope::Tags(t))
            }
            (true, [one]) => Some(Scope::ServiceAccount(one.clone())),
            _ => None,
        }
    }

    /// The `gcloud` flag that sets these targets.
    pub fn gcloud_flag(&self) -> String {
        match self {
            Scope::Tags(t) => format!("--target-tags={}", t.join(",")),
            Scope::ServiceAccount(sa) => format!("--target-service-accounts={sa}"),
        }
    }
}

/// Lower-case letters, digits and single dashes, at most `max` characters, no dash at the
/// ends: a piece of an RFC 1035 name.
pub fn slug(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
        if out.len() >= max {
            break;
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// What every rule name of `cluster` starts with: `npf-<cluster>-`. A rule is ours only
/// with this prefix and our marker in its description, because a person may copy a
/// description (onto their own rule, or another cluster's).
pub fn name_prefix(cluster: &str) -> String {
    let cluster = slug(cluster, 16);
    if cluster.is_empty() {
        NAME_PREFIX.to_string()
    } else {
        format!("{NAME_PREFIX}{cluster}-")
    }
}

/// A deterministic rule name: `npf-<cluster>-<pool>-<hash>`, at most 52 characters (the
/// planner may append `-n` on a name collision, which stays within 63). The hash covers
/// everything but the ports, so a rule keeps its name while its ports change.
pub fn rule_name(parts: &NameParts<'_>) -> String {
    let pools: Vec<&str> = parts.pools.iter().map(PoolName::as_str).collect();
    let pool = slug(&pools.join("-"), 20);
    let mut name = name_prefix(parts.cluster);
    if !pool.is_empty() {
        name.push_str(&pool);
        name.push('-');
    }
    name.push_str(&parts.short_hash());
    name
}

/// The JSON marker in a rule's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    pub managed_by: String,
    pub cluster: String,
    #[serde(default)]
    pub pools: Vec<String>,
    #[serde(default)]
    pub services: Vec<String>,
    /// When the Services do not fit the description: a digest of the full list, which only
    /// lists the first ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_digest: Option<String>,
}

/// A short SHA-256 digest of a Service list.
pub fn services_digest(services: &ServiceSet) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for s in services {
        h.update(s.to_string().as_bytes());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The description of a rule of `cluster` serving `services` on `pools`, and the digest of
/// the Service list when it had to be cut to fit [`MAX_DESCRIPTION`].
pub fn description_and_digest(
    cluster: &str,
    pools: &PoolSet,
    services: &ServiceSet,
) -> (String, Option<String>) {
    let mut m = Marker {
        managed_by: MANAGED_BY.to_string(),
        cluster: cluster.to_string(),
        pools: pools.iter().map(|p| p.as_str().to_string()).collect(),
        services: services.iter().map(ToString::to_string).collect(),
        services_digest: None,
    };
    let full = serde_json::to_string(&m).unwrap_or_default();
    if full.len() <= MAX_DESCRIPTION {
        return (full, None);
    }
    let digest = services_digest(services);
    m.services_digest = Some(digest.clone());
    // Keep as many whole names as fit: the largest prefix whose marker fits.
    let all = std::mem::take(&mut m.services);
    let text_with = |m: &mut Marker, keep: usize| {
        m.services = all[..keep].to_vec();
        serde_json::to_string(m).unwrap_or_default()
    };
    let (mut lo, mut hi) = (0, all.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if text_with(&mut m, mid).len() <= MAX_DESCRIPTION {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    (text_with(&mut m, lo), Some(digest))
}

/// The description of a rule of `cluster` serving `services` on `pools`.
pub fn description(cluster: &str, pools: &PoolSet, services: &ServiceSet) -> String {
    description_and_digest(cluster, pools, services).0
}

/// What a rule's name and description say about its owner.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub owned: bool,
    pub services: ServiceSet,
    pub pools: PoolSet,
    /// Set when the description lists only the first Services: the full list's digest.
    pub services_digest: Option<String>,
}

/// Reads the name and description of an observed rule.
pub fn parse(cluster: &str, name: &str, description: Option<&str>) -> Parsed {
    if !name.starts_with(&name_prefix(cluster)) {
        return Parsed::default();
    }
    let Some(m) = description.and_then(|d| serde_json::from_str::<Marker>(d).ok()) else {
        return Parsed::default();
    };
    if m.managed_by != MANAGED_BY || m.cluster != cluster {
        return Parsed::default();
    }
    Parsed {
        owned: true,
        services: m
            .services
            .iter()
            .filter_map(|s| s.parse::<ServiceRef>().ok())
            .collect(),
        pools: m.pools.into_iter().map(PoolName::new).collect(),
        services_digest: m.services_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeport_firewall_model::{IpFamily, Protocol};

    #[test]
    fn markers_round_trip_and_other_owners_are_not_ours() {
        let pools: PoolSet = [PoolName::new("web")].into();
        let services: ServiceSet = [ServiceRef::new("shop", "web"), ServiceRef::new("a", "b")]
            .into_iter()
            .collect();
        let d = description("c1", &pools, &services);
        assert!(d.starts_with('{'));
        let p = parse("c1", "npf-c1-web-0123456789", Some(&d));
        assert!(p.owned);
        assert_eq!(p.services, services);
        assert_eq!(p.pools, pools);
        assert!(!parse("c2", "npf-c1-web-0123456789", Some(&d)).owned);
        assert!(!parse("c1", "allow-web", Some(&d)).owned, "prefix required");
        // Our marker copied onto another cluster's rule does not make it ours.
        assert!(
            !parse("c1", "npf-c2-web-0123456789", Some(&d)).owned,
            "the cluster's own prefix required"
        );
        assert!(!parse("c1", "npf-c1-web-x", Some("opened by hand")).owned);
        assert!(!parse("c1", "npf-c1-web-x", None).owned);
        let other = d.replace(MANAGED_BY, "terraform");
        assert!(!parse("c1", "npf-c1-web-x", Some(&other)).owned);
    }

    #[test]
    fn long_service_lists_are_cut_with_a_digest() {
        let pools: PoolSet = [PoolName::new("web")].into();
        let services: ServiceSet = (0..300)
            .map(|i| ServiceRef::new("a-long-namespace-name", format!("service-number-{i}")))
            .collect();
        let (d, digest) = description_and_digest("c1", &pools, &services);
        assert!(d.len() <= MAX_DESCRIPTION, "{}", d.len());
        assert!(d.len() > MAX_DESCRIPTION - 100, "{}", d.len());
        let p = parse("c1", "npf-c1-web-0123456789", Some(&d));
        assert!(p.owned);
        assert_eq!(p.services_digest, digest);
        assert_eq!(digest, Some(services_digest(&services)));
        assert!(p.services.len() < 300 && !p.services.is_empty());
        let (short, none) = description_and_digest("c1", &pools, &ServiceSet::default());
        assert_eq!(none, None);
        assert!(!short.contains("servicesDigest"));
    }

    #[test]
    fn names_are_valid_deterministic_and_bounded() {
        let long_pools: PoolSet =
            [PoolName::new("A_Very.Long/Pool-Name-That-Goes-On-And-On")].into();
        for (cluster, pools) in [
            ("demo", PoolSet::from([PoolName::new("web")])),
            ("Prod_Cluster.With.A.Really.Long.Name", long_pools.clone()),
            ("---", PoolSet::default()),
        ] {
            let sources = ["10.0.0.0/8".parse().unwrap()];
            let parts = NameParts {
                cluster,
                scope: Some("tags:web"),
                pools: &pools,
                protocol: Protocol::Tcp,
                family: IpFamily::V4,
                sources: &sources,
                chunk: 0,
            };
            let n = rule_name(&parts);
            assert!(crate::config::valid_name(&n), "{n}");
            assert!(n.len() <= 52, "{n}");
            assert!(crate::config::valid_name(&format!("{n}-n")));
            assert_eq!(n, rule_name(&parts));
            let other = NameParts {
                protocol: Protocol::Udp,
                ..parts.clone()
            };
            assert_ne!(n, rule_name(&other));
        }
    }

    #[test]
    fn scopes_round_trip() {
        let tags = Scope::of(&["b".into(), "a".into()], &[]).unwrap();
        assert_eq!(tags.encode(), "tags:a,b");
        assert_eq!(Scope::decode("tags:a,b"), Some(tags));
        let sa = Scope::of(&[], &["x@p.iam.gserviceaccount.com".into()]).unwrap();
        assert_eq!(Scope::decode(&sa.encode()), Some(sa));
        assert_eq!(Scope::of(&[], &[]), None);
        assert_eq!(Scope::of(&["a".into()], &["x@y.z".into()]), None);
        assert_eq!(Scope::decode("tags:"), None);
        assert_eq!(Scope::decode("other"), None);
    }
}

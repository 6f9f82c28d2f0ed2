//! The ownership marker of a rule: tags for ownership and pools, the description for the
//! Services served.
//!
//! Tags written through `TagSpecifications` are the same for every rule created by one
//! authorize call, and `CreateTags` writes one tag set on all the rules it names, while an
//! `IpRange` description is per rule. So everything that differs between rules goes into
//! the description, and one authorize call creates all the new rules of a security group
//! (that serve the same pools), whatever their Services. A list too long for 255 characters
//! is cut: the description then holds the count, a digest of the whole list and the first
//! Services that fit, `services=[125 digest=0123456789abcdef] apps/a,apps/b,...`. The
//! planner recognises such a rule by rendering the digest of the rule it wants
//! ([`crate::render::AwsRenderer`]).
//!
//! Earlier versions put a long list in `nodeport-firewall.io/services` (`.1`, `.2` ...)
//! tags, with the description `services=[N in tags]`; such rules are still read (fully
//! listed), and their list tags are deleted when the rule's marker is next rewritten.

use nodeport_firewall_model::{PoolName, PoolSet, ServiceRef, ServiceSet};

pub const TAG_MANAGED_BY: &str = "nodeport-firewall.io/managed-by";
pub const MANAGED_BY: &str = "nodeport-firewall";
pub const TAG_CLUSTER: &str = "nodeport-firewall.io/cluster";
pub const TAG_POOLS: &str = "nodeport-firewall.io/pools";
pub const TAG_SERVICES: &str = "nodeport-firewall.io/services";

/// Longest description EC2 accepts.
pub const MAX_DESCRIPTION: usize = 255;
/// Longest tag value written (EC2 allows 256).
pub const MAX_TAG_VALUE: usize = 255;
/// Tags one resource may carry (EC2: 50), minus the fixed ones and some slack for others.
pub const MAX_LIST_TAGS: usize = 40;

const DESCRIPTION_PREFIX: &str = "nodeport-firewall cluster=";
const SERVICES_PART: &str = " services=";

/// Whether a character may appear in an EC2 rule description.
fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || ". _-:/()#,@[]+=&;{}!$*".contains(c)
}

/// Keeps only the characters EC2 allows in a description, within its length.
pub fn sanitize_description(s: &str) -> String {
    s.chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .take(MAX_DESCRIPTION)
        .collect()
}

/// The metadata written with one rule, besides the common tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub description: String,
    /// The digest of the Service list, when the description could not hold it all.
    pub digest: Option<String>,
    /// The Service list in tags, only when not even the digest fits the description (a
    /// cluster name of some 200 characters): such a rule needs an authorize call of its own.
    pub service_tags: Vec<(String, String)>,
}

/// Hex characters of a list digest (64 bits of SHA-256).
const DIGEST_HEX: usize = 16;

/// The digest of a Service list, as a cut marker carries it.
pub fn services_digest(list: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (i, s) in list.iter().enumerate() {
        if i > 0 {
            h.update(b",");
        }
        h.update(s.as_bytes());
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    h.finalize()
        .iter()
        .take(DIGEST_HEX / 2)
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]])
        .map(char::from)
        .collect()
}

/// The tags every rule of this cluster carries.
pub fn common_tags(cluster: &str, pools: &PoolSet) -> Vec<(String, String)> {
    let mut tags = vec![
        (TAG_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (TAG_CLUSTER.to_string(), cluster.to_string()),
    ];
    tags.extend(chunk_tags(
        TAG_POOLS,
        pools.iter().map(|p| p.as_str().to_string()),
    ));
    tags
}

/// Splits a list over tags `key`, `key.1`, `key.2`, ..., each value a comma-separated run of
/// whole items within [`MAX_TAG_VALUE`].
pub fn chunk_tags(key: &str, items: impl IntoIterator<Item = String>) -> Vec<(String, String)> {
    let mut values: Vec<String> = Vec::new();
    for item in items {
        match values.last_mut() {
            Some(v) if v.len() + 1 + item.len() <= MAX_TAG_VALUE => {
                v.push(',');
                v.push_str(&item);
            }
            _ => values.push(item),
        }
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let k = if i == 0 {
                key.to_string()
            } else {
                format!("{key}.{i}")
            };
            (k, v)
        })
        .collect()
}

/// Whether `tag` is `key` or one of its continuation tags.
pub fn is_list_tag(tag: &str, key: &str) -> bool {
    tag == key
        || tag
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

fn list_from_tags<'a>(
    tags: impl IntoIterator<Item = (&'a str, &'a str)>,
    key: &str,
) -> Vec<String> {
    tags.into_iter()
        .filter(|(k, _)| is_list_tag(k, key))
        .flat_map(|(_, v)| v.split(','))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// How the description of every rule of `cluster` begins, as [`marker`] writes it (the
/// cluster name sanitized the same way).
fn description_head(cluster: &str) -> String {
    sanitize_description(&format!("{DESCRIPTION_PREFIX}{cluster}{SERVICES_PART}"))
}

/// The marker of a rule serving `services`.
pub fn marker(cluster: &str, services: &ServiceSet) -> Marker {
    let list: Vec<String> = services.iter().map(ToString::to_string).collect();
    let inline = format!(
        "{DESCRIPTION_PREFIX}{cluster}{SERVICES_PART}{}",
        list.join(",")
    );
    if inline.len() <= MAX_DESCRIPTION && inline.chars().all(allowed) {
        return Marker {
            description: inline,
            digest: None,
            service_tags: Vec::new(),
        };
    }
    let digest = services_digest(&list);
    let mut description = sanitize_description(&format!(
        "{DESCRIPTION_PREFIX}{cluster}{SERVICES_PART}[{} digest={digest}]",
        list.len()
    ));
    let head = description_head(cluster);
    let holds_digest = description
        .strip_prefix(head.as_str())
        .and_then(cut_list)
        .is_some_and(|(d, _)| d == digest);
    if !holds_digest {
        return Marker {
            description: sanitize_description(&format!(
                "{DESCRIPTION_PREFIX}{cluster}{SERVICES_PART}[{} in tags]",
                list.len()
            )),
            digest: None,
            service_tags: chunk_tags(TAG_SERVICES, list),
        };
    }
    // The first Services that fit, whole, for people reading the rule in the console; the
    // digest is what the planner goes by.
    let mut sep = ' ';
    for s in &list {
        if description.len() + 1 + s.len() > MAX_DESCRIPTION || !s.chars().all(allowed) {
            break;
        }
        description.push(sep);
        description.push_str(s);
        sep = ',';
    }
    Marker {
        description,
        digest: Some(digest),
        service_tags: Vec::new(),
    }
}

/// The digest in a cut list, `[<count> digest=<hex>] ...`, and the Services listed after it.
fn cut_list(listed: &str) -> Option<(String, &str)> {
    let inner = listed.strip_prefix('[')?;
    let (head, rest) = inner.split_once(']')?;
    let (count, digest) = head.split_once(" digest=")?;
    let valid = !count.is_empty()
        && count.chars().all(|c| c.is_ascii_digit())
        && digest.len() == DIGEST_HEX
        && digest.chars().all(|c| c.is_ascii_hexdigit());
    valid.then(|| (digest.to_string(), rest.strip_prefix(' ').unwrap_or(rest)))
}

/// What a rule's tags and description say about its owner and what it serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// Carries our marker with this cluster's name.
    pub owned: bool,
    pub services: ServiceSet,
    pub pools: PoolSet,
    /// The Services/pools list tags present, so that stale ones can be deleted.
    pub list_tag_keys: Vec<String>,
    /// The digest of the full Service list, when the description holds only its start
    /// (`services` then holds only the Services listed).
    pub digest: Option<String>,
}

/// Reads the marker of an observed rule.
pub fn parse<'a>(
    cluster: &str,
    tags: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    description: Option<&str>,
) -> Parsed {
    let get = |key: &str| {
        tags.clone()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    };
    // Both the tags and the description. Many roles may `ec2:CreateTags` on any rule, so
    // tags alone can be copied onto a foreign rule (say a bastion's SSH rule) to have us
    // revoke it. The description is changed only with `ModifySecurityGroupRules` or
    // `UpdateSecurityGroupRuleDescriptionsIngress` on the rule's group, and whoever holds
    // those can change the rule itself anyway: they gain nothing by making us remove it.
    let tagged = get(TAG_MANAGED_BY) == Some(MANAGED_BY) && get(TAG_CLUSTER) == Some(cluster);
    let head = description_head(cluster);
    let Some(listed) = description.and_then(|d| d.strip_prefix(head.as_str())) else {
        return Parsed::default();
    };
    if !tagged {
        return Parsed::default();
    }
    let from_tags = list_from_tags(tags.clone(), TAG_SERVICES);
    let split = |l: &str| -> Vec<String> {
        l.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut digest = None;
    let service_names: Vec<String> = if tags
        .clone()
        .into_iter()
        .any(|(k, _)| is_list_tag(k, TAG_SERVICES))
    {
        // An earlier version's list in tags: the whole list.
        from_tags
    } else if let Some((d, names)) = cut_list(listed) {
        digest = Some(d);
        split(names)
    } else {
        split(listed)
    };
    let services = service_names
        .iter()
        .filter_map(|s| s.parse::<ServiceRef>().ok())
        .collect();
    let pools = list_from_tags(tags.clone(), TAG_POOLS)
        .into_iter()
        .map(PoolName::new)
        .collect();
    let list_tag_keys = tags
        .into_iter()
        .filter(|(k, _)| is_list_tag(k, TAG_SERVICES) || is_list_tag(k, TAG_POOLS))
        .map(|(k, _)| k.to_string())
        .collect();
    Parsed {
        owned: true,
        services,
        pools,
        list_tag_keys,
        digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svcs(n: usize, ns: &str) -> ServiceSet {
        (0..n)
            .map(|i| ServiceRef::new(ns, format!("service-{i}")))
            .collect()
    }

    fn as_pairs(tags: &[(String, String)]) -> Vec<(&str, &str)> {
        tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn short_lists_go_in_the_description_and_round_trip() {
        let pools: PoolSet = [PoolName::new("a"), PoolName::new("b")].into();
        let services = svcs(3, "default");
        let m = marker("c1", &services);
        assert_eq!(m.digest, None);
        assert!(m.description.len() <= MAX_DESCRIPTION);
        let tags = common_tags("c1", &pools);
        let p = parse("c1", as_pairs(&tags), Some(&m.description));
        assert!(p.owned);
        assert_eq!(p.services, services);
        assert_eq!(p.pools, pools);
    }

    #[test]
    fn long_lists_are_cut_with_a_digest_and_no_tags() {
        let pools: PoolSet = [PoolName::new("a")].into();
        let services = svcs(300, "a-rather-long-namespace");
        let m = marker("c1", &services);
        assert!(m.service_tags.is_empty());
        let digest = m.digest.clone().unwrap();
        assert_eq!(digest.len(), DIGEST_HEX);
        assert!(m.description.len() <= MAX_DESCRIPTION, "{}", m.description);
        assert!(m.description.chars().all(allowed));
        assert!(
            m.description
                .starts_with(&format!("nodeport-firewall cluster=c1 services=[300 digest={digest}] a-rather-long-namespace/service-0,")),
            "{}",
            m.description
        );
        let tags = common_tags("c1", &pools);
        let p = parse("c1", as_pairs(&tags), Some(&m.description));
        assert!(p.owned);
        assert_eq!(p.digest.as_deref(), Some(digest.as_str()));
        assert!(!p.services.is_empty() && p.services.len() < 300);
        assert!(p.services.iter().all(|s| services.contains(s)));
        // One Service more or less, or another name: another digest.
        let other: ServiceSet = services
            .iter()
            .cloned()
            .chain([ServiceRef::new("x", "y")])
            .collect();
        assert_ne!(marker("c1", &other).digest, m.digest);
        assert_eq!(marker("c1", &services).digest, m.digest, "deterministic");
    }

    /// A cluster name so long that not even the digest fits: the list goes to tags.
    #[test]
    fn a_cluster_name_too_long_for_the_digest_puts_the_list_in_tags() {
        let cluster = "c".repeat(230);
        let services = svcs(2, "default");
        let m = marker(&cluster, &services);
        assert_eq!(m.digest, None);
        assert!(!m.service_tags.is_empty());
        let mut tags = common_tags(&cluster, &PoolSet::default());
        tags.extend(m.service_tags.clone());
        let p = parse(&cluster, as_pairs(&tags), Some(&m.description));
        assert!(p.owned);
        assert_eq!(p.services, services);
    }

    /// Rules written by earlier versions, with the list in tags, read as fully listed.
    #[test]
    fn lists_in_tags_of_earlier_versions_still_read() {
        let services = svcs(300, "a-rather-long-namespace");
        let mut tags = common_tags("c1", &[PoolName::new("a")].into());
        tags.extend(chunk_tags(
            TAG_SERVICES,
            services.iter().map(ToString::to_string),
        ));
        let p = parse(
            "c1",
            as_pairs(&tags),
            Some("nodeport-firewall cluster=c1 services=[300 in tags]"),
        );
        assert!(p.owned);
        assert_eq!(p.services, services);
        assert_eq!(p.digest, None);
        assert!(p.list_tag_keys.len() > 2);
    }

    #[test]
    fn only_well_formed_cut_lists_carry_a_digest() {
        for (listed, digest) in [
            ("[3 digest=0123456789abcdef] a/b", Some("0123456789abcdef")),
            ("[3 digest=0123456789abcdef]", Some("0123456789abcdef")),
            ("[3 digest=0123456789abcde] a/b", None),
            ("[3 digest=0123456789abcdeg] a/b", None),
            ("[x digest=0123456789abcdef] a/b", None),
            ("[3 in tags]", None),
            ("a/b,c/d", None),
            ("[", None),
        ] {
            assert_eq!(
                cut_list(listed).map(|(d, _)| d).as_deref(),
                digest,
                "{listed}"
            );
        }
    }

    #[test]
    fn other_clusters_and_untagged_rules_are_not_ours() {
        let pools = PoolSet::default();
        let tags = common_tags("other", &pools);
        assert!(!parse("c1", as_pairs(&tags), None).owned);
        assert!(
            !parse(
                "c1",
                Vec::<(&str, &str)>::new(),
                Some("nodeport-firewall cluster=c1 services=a/b")
            )
            .owned
        );
    }

    /// Our tags copied onto a foreign rule do not make it ours: the description must carry
    /// our marker for this cluster too.
    #[test]
    fn tags_alone_do_not_make_a_rule_ours() {
        let tags = common_tags("c1", &[PoolName::new("a")].into());
        for (description, owned) in [
            (Some("nodeport-firewall cluster=c1 services=apps/web"), true),
            (
                Some("nodeport-firewall cluster=c1 services=[12 in tags]"),
                true,
            ),
            (Some("nodeport-firewall cluster=c1 services="), true),
            (None, false),
            (Some(""), false),
            (Some("SSH from the bastion"), false),
            (
                Some("nodeport-firewall cluster=c2 services=apps/web"),
                false,
            ),
            (
                Some("nodeport-firewall cluster=c10 services=apps/web"),
                false,
            ),
            (Some("nodeport-firewall cluster=c1"), false),
            (
                Some(" nodeport-firewall cluster=c1 services=apps/web"),
                false,
            ),
            (
                Some("bastion nodeport-firewall cluster=c1 services=apps/web"),
                false,
            ),
        ] {
            let p = parse("c1", as_pairs(&tags), description);
            assert_eq!(p.owned, owned, "{description:?}");
            if !owned {
                assert_eq!(p, Parsed::default(), "{description:?}");
            }
        }
    }

    /// Cluster names that the description cannot hold as they are (characters EC2 refuses,
    /// more than 255 characters) still round-trip: the description is compared as written.
    #[test]
    fn awkward_cluster_names_round_trip() {
        let services = svcs(2, "default");
        for cluster in ["prod eu", "café", &"c".repeat(300), "a\"b"] {
            let tags = common_tags(cluster, &PoolSet::default());
            let m = marker(cluster, &services);
            assert!(m.description.chars().all(allowed), "{cluster}");
            let mut all = tags.clone();
            all.extend(m.service_tags.clone());
            let p = parse(cluster, as_pairs(&all), Some(&m.description));
            assert!(p.owned, "{cluster}: {}", m.description);
            // What the description cannot list, the digest stands for.
            match &m.digest {
                None => assert_eq!(p.services, services, "{cluster}"),
                Some(d) => assert_eq!(p.digest.as_ref(), Some(d), "{cluster}"),
            }
        }
    }

    #[test]
    fn list_tags() {
        assert!(is_list_tag("nodeport-firewall.io/services", TAG_SERVICES));
        assert!(is_list_tag(
            "nodeport-firewall.io/services.12",
            TAG_SERVICES
        ));
        assert!(!is_list_tag(
            "nodeport-firewall.io/services.x",
            TAG_SERVICES
        ));
        assert!(!is_list_tag("nodeport-firewall.io/servicesx", TAG_SERVICES));
    }

    #[test]
    fn descriptions_are_sanitized() {
        assert_eq!(sanitize_description("a\"b<c>é"), "a_b_c__");
        assert_eq!(
            sanitize_description(&"x".repeat(400)).len(),
            MAX_DESCRIPTION
        );
    }
}

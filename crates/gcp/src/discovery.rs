//! Choosing a pool's target (network tag or service account) from what Compute says about
//! the pool's instances and every other instance of the project. Pure.
//!
//! A firewall rule's target selects instances network-wide, so a tag (or service account)
//! is a pool's target only when every instance of the pool has it and no other instance
//! does: not another pool's node, not a VM outside the cluster. GKE's cluster-wide node tag
//! `gke-<cluster>-<hash>-node` never counts, even on a one-pool cluster.

use std::collections::{BTreeMap, BTreeSet};

use nodeport_firewall_model::{NodeSpec, PoolName};
use nodeport_firewall_provider::{Error, ErrorKind};

use crate::marker::Scope;

/// An instance, by `project/zone/name`.
pub type InstanceKey = String;

/// What Compute says about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceInfo {
    pub tags: Vec<String>,
    pub service_accounts: Vec<String>,
}

/// `(project, zone, instance)` of a Node's `providerID`, `gce://<project>/<zone>/<name>`.
pub fn parse_provider_id(provider_id: &str) -> Option<(&str, &str, &str)> {
    let rest = provider_id.strip_prefix("gce://")?;
    let mut parts = rest.split('/');
    let (project, zone, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [project, zone, name].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some((project, zone, name))
}

/// GKE's tag on every node of a cluster: `gke-<cluster>-<8 hex>-node`.
pub fn is_gke_cluster_tag(tag: &str) -> bool {
    let Some(body) = tag
        .strip_prefix("gke-")
        .and_then(|t| t.strip_suffix("-node"))
    else {
        return false;
    };
    match body.rsplit_once('-') {
        Some((cluster, hash)) => {
            !cluster.is_empty()
                && hash.len() == 8
                && hash
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        }
        None => false,
    }
}

fn discovery(message: String) -> Error {
    Error::new(ErrorKind::Discovery, message)
}

/// The config lines that pin a pool to `tag`.
pub fn config_lines(pool: &PoolName, tag: &str) -> String {
    format!("pools:\n  {pool}:\n    gcp:\n      targetTags: [{tag}]")
}

/// The instances of a pool's nodes, sorted; or an error naming the nodes without a GCE
/// providerID.
pub fn instances(pool: &PoolName, nodes: &[NodeSpec]) -> Result<Vec<(String, InstanceKey)>, Error> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for n in nodes {
        match n.provider_id.as_deref().and_then(parse_provider_id) {
            Some((p, z, i)) => out.push((n.name.clone(), format!("{p}/{z}/{i}"))),
            None => bad.push(format!(
                "{} (providerID {:?})",
                n.name,
                n.provider_id.as_deref().unwrap_or("")
            )),
        }
    }
    if !bad.is_empty() {
        return Err(discovery(format!(
            "pool {pool}: nodes without a GCE providerID (gce://<project>/<zone>/<instance>): {}. Name the pool's target in the operator config:\n{}",
            bad.join(", "),
            config_lines(pool, "<network-tag>"),
        )));
    }
    if out.is_empty() {
        return Err(discovery(format!(
            "pool {pool}: no nodes to discover a target from"
        )));
    }
    out.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    Ok(out)
}

fn few(items: &[&str]) -> String {
    let mut out: Vec<String> = items.iter().take(3).map(|s| s.to_string()).collect();
    if items.len() > 3 {
        out.push(format!("and {} more", items.len() - 3));
    }
    out.join(", ")
}

/// Chooses the pool's target: a tag every pool instance has and no other instance has
/// (the first by name when several do), else the pool's one service account when no other
/// instance uses it.
pub fn choose(
    pool: &PoolName,
    cluster_wide: &dyn Fn(&str) -> bool,
    pool_instances: &[(String, InstanceKey)],
    all: &BTreeMap<InstanceKey, InstanceInfo>,
) -> Result<Scope, Error> {
    let missing: Vec<&str> = pool_instances
        .iter()
        .filter(|(_, k)| !all.contains_key(k))
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(discovery(format!(
            "pool {pool}: instances of node(s) {} not found in their project",
            few(&missing)
        )));
    }
    let members: BTreeSet<&str> = pool_instances.iter().map(|(_, k)| k.as_str()).collect();
    let infos: Vec<&InstanceInfo> = members.iter().filter_map(|k| all.get(*k)).collect();
    let Some(first) = infos.first() else {
        return Err(discovery(format!(
            "pool {pool}: no nodes to discover a target from"
        )));
    };
    let outsiders = |has: &dyn Fn(&InstanceInfo) -> bool| -> Vec<&str> {
        all.iter()
            .filter(|(k, i)| !members.contains(k.as_str()) && has(i))
            .map(|(k, _)| k.as_str())
            .collect()
    };

    let mut common: BTreeSet<&str> = first.tags.iter().map(String::as_str).collect();
    for i in &infos[1..] {
        let tags: BTreeSet<&str> = i.tags.iter().map(String::as_str).collect();
        common.retain(|t| tags.contains(t));
    }
    let ignored: Vec<&str> = common.iter().copied().filter(|t| cluster_wide(t)).collect();
    common.retain(|t| !cluster_wide(t));
    let mut shared: Vec<String> = Vec::new();
    for tag in &common {
        let others = outsiders(&|i: &InstanceInfo| i.tags.iter().any(|t| t == tag));
        if others.is_empty() {
            return Ok(Scope::Tags(vec![(*tag).to_string()]));
        }
        shared.push(format!("{tag} (also on {})", few(&others)));
    }

    let accounts: BTreeSet<&[String]> = infos
        .iter()
        .map(|i| i.service_accounts.as_slice())
        .collect();
    let sa_text = match accounts.iter().next() {
        Some([sa]) if accounts.len() == 1 => {
            let others = outsiders(&|i: &InstanceInfo| i.service_accounts.iter().any(|s| s == sa));
            if others.is_empty() {
                return Ok(Scope::ServiceAccount(sa.clone()));
            }
            format!("its service account {sa} is also used by {}", few(&others))
        }
        _ if accounts.len() > 1 => "its instances use different service accounts".to_string(),
        _ => "its instances have no single service account".to_string(),
    };
    let tags_text = match (shared.is_empty(), ignored.is_empty()) {
        (true, true) => "its instances have no network tag in common".to_string(),
        (true, false) => format!(
            "its instances share only the cluster-wide tag(s) {}, which select every node",
            ignored.join(", ")
        ),
        (false, _) => format!(
            "no network tag is on its instances only: {}",
            shared.join("; ")
        ),
    };
    Err(discovery(format!(
        "pool {pool}: no target that selects only this pool's instances: {tags_text}, and {sa_text}. \
         Give the pool a network tag of its own (GKE: `gcloud container node-pools update {pool} --cluster=<cluster> --tags=<tag>`) \
         or a service account of its own, or name the target in the operator config:\n{}",
        config_lines(pool, "<tag>")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(tags: &[&str], sa: &[&str]) -> InstanceInfo {
        InstanceInfo {
            tags: tags.iter().map(|s| s.to_string()).collect(),
            service_accounts: sa.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn pool_of(keys: &[&str]) -> Vec<(String, InstanceKey)> {
        keys.iter()
            .map(|k| (format!("node-{k}"), k.to_string()))
            .collect()
    }

    const GKE: &str = "gke-prod-1a2b3c4d-node";

    #[test]
    fn provider_ids() {
        assert_eq!(
            parse_provider_id("gce://proj/us-central1-a/gke-node-1"),
            Some(("proj", "us-central1-a", "gke-node-1"))
        );
        assert_eq!(parse_provider_id("gce://proj/zone"), None);
        assert_eq!(parse_provider_id("gce://proj//x"), None);
        assert_eq!(parse_provider_id("aws:///us-east-1a/i-0abc"), None);
        assert_eq!(parse_provider_id("gce://p/z/n/extra"), None);
    }

    #[test]
    fn gke_cluster_tags() {
        assert!(is_gke_cluster_tag(GKE));
        assert!(is_gke_cluster_tag("gke-my-cluster-0123abcd-node"));
        assert!(!is_gke_cluster_tag("gke-prod-pool-a"));
        assert!(!is_gke_cluster_tag("gke-prod-1A2B3C4D-node"));
        assert!(!is_gke_cluster_tag("gke--1a2b3c4d-node"));
        assert!(!is_gke_cluster_tag("web"));
    }

    #[test]
    fn distinguishing_tag_service_account_and_ambiguous() {
        let pool = PoolName::new("web");
        let cw = |t: &str| is_gke_cluster_tag(t);
        let all: BTreeMap<InstanceKey, InstanceInfo> = [
            (
                "p/z/w1",
                inst(&[GKE, "web", "shared"], &["web@p.iam.gserviceaccount.com"]),
            ),
            (
                "p/z/w2",
                inst(
                    &[GKE, "web", "shared", "extra"],
                    &["web@p.iam.gserviceaccount.com"],
                ),
            ),
            (
                "p/z/b1",
                inst(&[GKE, "shared"], &["default@p.iam.gserviceaccount.com"]),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // The tag on both web instances and nowhere else.
        assert_eq!(
            choose(&pool, &cw, &pool_of(&["p/z/w1", "p/z/w2"]), &all).unwrap(),
            Scope::Tags(vec!["web".into()])
        );

        // No distinguishing tag: the service account unique to the pool.
        let mut sa_only = all.clone();
        for k in ["p/z/w1", "p/z/w2"] {
            sa_only.get_mut(k).unwrap().tags = vec![GKE.into(), "shared".into()];
        }
        assert_eq!(
            choose(&pool, &cw, &pool_of(&["p/z/w1", "p/z/w2"]), &sa_only).unwrap(),
            Scope::ServiceAccount("web@p.iam.gserviceaccount.com".into())
        );

        // Ambiguous: the shared tag and the account are also on another pool's node.
        let mut ambiguous = sa_only.clone();
        ambiguous.get_mut("p/z/b1").unwrap().service_accounts =
            vec!["web@p.iam.gserviceaccount.com".into()];
        let e = choose(&pool, &cw, &pool_of(&["p/z/w1", "p/z/w2"]), &ambiguous).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Discovery);
        assert!(e.message.contains("shared (also on p/z/b1)"), "{e}");
        assert!(e.message.contains("also used by p/z/b1"), "{e}");
        assert!(e.message.contains("targetTags: [<tag>]"), "{e}");
    }

    #[test]
    fn the_cluster_wide_gke_tag_never_counts() {
        let pool = PoolName::new("only");
        let cw = |t: &str| is_gke_cluster_tag(t) || t == "all-nodes";
        // One pool: the GKE tag (and a configured cluster-wide tag) is on its instances
        // only, and still is not a target; the default service account is shared.
        let all: BTreeMap<InstanceKey, InstanceInfo> = [
            (
                "p/z/a",
                inst(&[GKE, "all-nodes"], &["a@p.iam.gserviceaccount.com"]),
            ),
            (
                "p/z/b",
                inst(&[GKE, "all-nodes"], &["b@p.iam.gserviceaccount.com"]),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let e = choose(&pool, &cw, &pool_of(&["p/z/a", "p/z/b"]), &all).unwrap_err();
        assert!(
            e.message
                .contains("cluster-wide tag(s) all-nodes, gke-prod"),
            "{e}"
        );
        assert!(e.message.contains("different service accounts"), "{e}");
    }

    #[test]
    fn missing_instances_and_bad_provider_ids() {
        let pool = PoolName::new("web");
        let e = choose(
            &pool,
            &|_: &str| false,
            &pool_of(&["p/z/gone"]),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(e.message.contains("not found"), "{e}");
        let nodes = vec![NodeSpec::new("n1").with_provider_id("aws:///z/i-1")];
        let e = instances(&pool, &nodes).unwrap_err();
        assert!(
            e.message.contains("n1 (providerID \"aws:///z/i-1\")"),
            "{e}"
        );
        assert!(instances(&pool, &[]).is_err());
    }
}

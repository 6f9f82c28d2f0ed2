//! Where rules of ours are, found by name rather than through the pools: the targets that
//! still hold them after a pool is set `managed: false`, is removed from the config, or
//! moves to another network or project. The engine plans those targets too, so that the
//! orphans there are removed.
//!
//! One `firewalls.list` per project, filtered by our name prefix
//! (`name eq "npf-<cluster>-.*"`, Compute's RE2 filter, which must match the whole name),
//! over every page. A rule counts only when it is ours by name **and** marker, exactly as
//! when a target is observed.
//!
//! The projects searched come from the config that remains, never from a pool that is
//! gone: `gcp.project` (required, where every pool's rules go unless it says otherwise)
//! and the `gcp.project` of every pool still listed, managed or not. Rules of a pool that
//! had its own `project` and was then removed from the config entirely are not found; keep
//! the pool listed with `managed: false` until its rules are gone (docs/gcp.md).

use std::collections::BTreeSet;

use google_cloud_compute_v1::model::Firewall;
use nodeport_firewall_model::{Config, Target};
use nodeport_firewall_provider::Result;

use crate::{GcpProvider, NAME, config, marker, wire};

/// The `firewalls.list` filter of every rule whose name starts with `prefix`.
pub(crate) fn prefix_filter(prefix: &str) -> String {
    let mut re = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if ".+*?()|[]{}^$\\\"'".contains(c) {
            re.push('\\');
        }
        re.push(c);
    }
    format!("name eq \"{re}.*\"")
}

/// The network name of a firewall rule's `network` URL
/// (`https://www.googleapis.com/compute/v1/projects/P/global/networks/N`, or the same
/// without the host).
fn network_name(fw: &Firewall) -> Option<&str> {
    let url = fw.network.as_deref()?;
    let (_, name) = url.rsplit_once("/global/networks/")?;
    config::valid_name(name).then_some(name)
}

impl GcpProvider {
    /// The projects to search: `gcp.project` and every listed pool's own `gcp.project`.
    fn projects_to_search(&self, config: &Config) -> BTreeSet<String> {
        let mut out = BTreeSet::from([self.project.clone()]);
        let listed = config
            .providers
            .get(NAME)
            .into_iter()
            .chain(config.pools.values().filter_map(|p| p.provider(NAME)));
        for section in listed {
            // A section that does not parse fails where the pool is resolved; here it can
            // only add a project to search.
            if let Some(p) = section.get("project").and_then(|p| p.as_str())
                && !p.is_empty()
            {
                out.insert(p.to_string());
            }
        }
        out
    }

    /// The targets (`project/network`) that hold rules of ours, in the projects of the
    /// config.
    pub(crate) async fn find_owned_targets(&self, config: &Config) -> Result<Vec<Target>> {
        let filter = prefix_filter(&marker::name_prefix(&self.cluster));
        let own_priority = self.own_priority();
        let mut out = BTreeSet::new();
        for project in self.projects_to_search(config) {
            for fw in self.list_firewalls(&project, &filter).await? {
                let ours = wire::observe(&self.cluster, own_priority, &fw).is_some_and(|o| o.owned);
                if let (true, Some(network)) = (ours, network_name(&fw)) {
                    out.insert(Target::new(NAME, &format!("{project}/{network}")));
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_filter_is_a_whole_name_regex() {
        assert_eq!(prefix_filter("npf-c1-"), r#"name eq "npf-c1-.*""#);
        assert_eq!(prefix_filter("a.b"), r#"name eq "a\.b.*""#);
    }

    #[test]
    fn network_names_come_from_the_network_url() {
        let fw = |n: &str| Firewall::new().set_network(n);
        for (url, want) in [
            (
                "https://www.googleapis.com/compute/v1/projects/p/global/networks/vpc-1",
                Some("vpc-1"),
            ),
            ("projects/p/global/networks/default", Some("default")),
            ("https://x/projects/p/global/networks/Bad_Name", None),
            ("vpc-1", None),
        ] {
            assert_eq!(network_name(&fw(url)), want, "{url}");
        }
        assert_eq!(network_name(&Firewall::new()), None);
    }
}

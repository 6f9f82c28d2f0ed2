//! Finding the NSGs that hold rules of ours, by our marker rather than through the pools:
//! where a pool's rules stay when the pool is set `managed: false`, is removed from the
//! config, or now maps to another NSG. The engine plans each such NSG that no managed pool
//! maps to, and removes the orphans there.
//!
//! ARM cannot search rule descriptions, so NSGs are listed, each with its rules, once per
//! scope: the resource groups of every NSG the config names (the `azure:` section and
//! every pool's, unmanaged pools' too) and the subscriptions or resource groups of
//! `azure.orphanScopes`. The config that remains is all there is: an NSG named only in
//! the section of a pool that was removed is found only through a scope that holds it
//! (the same resource group as another named NSG, or `orphanScopes`). Nothing discovered
//! earlier is remembered, so a fresh process finds exactly what a long-running one does.

use std::collections::BTreeSet;

use nodeport_firewall_model::{Config, Target};
use nodeport_firewall_provider::{Error, ErrorKind, Result};
use tracing::debug;

use crate::wire::{OurWrites, observed_rule};
use crate::{AzureConfig, AzureProvider, NAME, NsgId};

/// Where NSGs are listed: a subscription, or one resource group of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Subscription(String),
    ResourceGroup { subscription: String, name: String },
}

impl Scope {
    /// Parses `/subscriptions/<s>` or `/subscriptions/<s>/resourceGroups/<rg>` (segment
    /// names case-insensitive, as ARM treats them; ids lower-cased, so one scope has one
    /// spelling).
    pub fn parse(text: &str) -> std::result::Result<Scope, String> {
        let parts: Vec<&str> = text.trim_matches('/').split('/').collect();
        let named = |i: usize| parts.get(i).is_some_and(|s| !s.is_empty());
        let subscriptions = parts
            .first()
            .is_some_and(|s| s.eq_ignore_ascii_case("subscriptions"));
        match parts.len() {
            2 if subscriptions && named(1) => {
                Ok(Scope::Subscription(parts[1].to_ascii_lowercase()))
            }
            4 if subscriptions
                && named(1)
                && parts[2].eq_ignore_ascii_case("resourceGroups")
                && named(3) =>
            {
                Ok(Scope::ResourceGroup {
                    subscription: parts[1].to_ascii_lowercase(),
                    name: parts[3].to_ascii_lowercase(),
                })
            }
            _ => Err(format!(
                "{text:?} is neither /subscriptions/<sub> nor /subscriptions/<sub>/resourceGroups/<rg>"
            )),
        }
    }

    fn subscription(&self) -> &str {
        match self {
            Scope::Subscription(s)
            | Scope::ResourceGroup {
                subscription: s, ..
            } => s,
        }
    }
}

/// The scopes to list: `orphanScopes`, and the resource group of every NSG named in the
/// config, less resource groups of a subscription that is listed whole. NSG ids that do
/// not parse are left out here: resolving their pool reports them.
pub fn scopes(config: &Config, azure: &AzureConfig) -> Result<BTreeSet<Scope>> {
    let mut out = BTreeSet::new();
    for s in &azure.orphan_scopes {
        out.insert(
            Scope::parse(s)
                .map_err(|e| Error::new(ErrorKind::Config, format!("azure.orphanScopes: {e}")))?,
        );
    }
    let named = |section: Option<&serde_json::Value>| -> Option<NsgId> {
        section?
            .get("networkSecurityGroup")?
            .as_str()
            .and_then(|id| NsgId::parse(id).ok())
    };
    let nsgs = azure
        .network_security_group
        .as_deref()
        .and_then(|id| NsgId::parse(id).ok())
        .into_iter()
        .chain(named(config.providers.get(NAME)))
        .chain(
            config
                .pools
                .values()
                .filter_map(|p| named(p.providers.get(NAME))),
        );
    for nsg in nsgs {
        out.insert(Scope::ResourceGroup {
            subscription: nsg.subscription.to_ascii_lowercase(),
            name: nsg.resource_group.to_ascii_lowercase(),
        });
    }
    let whole: BTreeSet<String> = out
        .iter()
        .filter_map(|s| match s {
            Scope::Subscription(s) => Some(s.clone()),
            Scope::ResourceGroup { .. } => None,
        })
        .collect();
    out.retain(|s| matches!(s, Scope::Subscription(_)) || !whole.contains(s.subscription()));
    Ok(out)
}

impl AzureProvider {
    /// NSGs of the scopes of `config` that hold an inbound rule of ours.
    pub(crate) async fn nsgs_with_rules_of_ours(&self, config: &Config) -> Result<Vec<Target>> {
        let mut found = BTreeSet::new();
        for scope in scopes(config, &self.config)? {
            let nsgs = self.list_nsgs(&scope).await?;
            debug!(?scope, nsgs = nsgs.len(), "listed NSGs for rules of ours");
            for nsg in nsgs {
                let Some(id) = nsg
                    .resource
                    .id
                    .as_deref()
                    .and_then(|i| NsgId::parse(i).ok())
                else {
                    continue;
                };
                let rules = nsg.properties.map(|p| p.security_rules).unwrap_or_default();
                let ours = rules.iter().any(|r| {
                    observed_rule(&self.cluster, r, OurWrites::Idle).is_some_and(|o| {
                        o.owned
                            && r.properties.as_ref().is_some_and(|p| {
                                p.direction
                                    == azure_mgmt_network::package_2024_03::models::SecurityRuleDirection::Inbound
                            })
                    })
                });
                if ours {
                    found.insert(id.id());
                }
            }
        }
        Ok(found.iter().map(|id| Target::new(NAME, id)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeport_firewall_model::{PoolConfig, PoolName};

    fn nsg(sub: &str, rg: &str, name: &str) -> String {
        format!(
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/networkSecurityGroups/{name}"
        )
    }

    fn rg(sub: &str, name: &str) -> Scope {
        Scope::ResourceGroup {
            subscription: sub.into(),
            name: name.into(),
        }
    }

    #[test]
    fn scopes_come_from_every_named_nsg_and_orphan_scopes() {
        let mut config = Config::new("c");
        config.providers.insert(
            NAME.into(),
            serde_json::json!({"networkSecurityGroup": nsg("S1", "RG-A", "n")}),
        );
        for (pool, section) in [
            (
                "web",
                serde_json::json!({"networkSecurityGroup": nsg("s1", "rg-b", "n")}),
            ),
            // Unmanaged pools count: their rules are the orphans to find.
            (
                "old",
                serde_json::json!({"networkSecurityGroup": nsg("s2", "rg-c", "n")}),
            ),
            (
                "bad",
                serde_json::json!({"networkSecurityGroup": "not-an-id"}),
            ),
            ("none", serde_json::json!({})),
        ] {
            config.pools.insert(
                PoolName::new(pool),
                PoolConfig {
                    providers: [(NAME.to_string(), section)].into(),
                    ..PoolConfig::default()
                },
            );
        }
        let mut azure = AzureConfig::default();
        assert_eq!(
            scopes(&config, &azure).unwrap(),
            BTreeSet::from([rg("s1", "rg-a"), rg("s1", "rg-b"), rg("s2", "rg-c")])
        );
        // A whole subscription covers its resource groups.
        azure.orphan_scopes = vec![
            "/subscriptions/S1".into(),
            "/subscriptions/s3/resourceGroups/x".into(),
        ];
        assert_eq!(
            scopes(&config, &azure).unwrap(),
            BTreeSet::from([
                Scope::Subscription("s1".into()),
                rg("s2", "rg-c"),
                rg("s3", "x")
            ])
        );
        azure.orphan_scopes = vec!["/subscriptions/s1/resourceGroups".into()];
        let e = scopes(&config, &azure).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(e.message.contains("azure.orphanScopes"), "{e}");
    }

    #[test]
    fn scope_texts() {
        for (text, ok) in [
            ("/subscriptions/s", true),
            ("subscriptions/s/", true),
            ("/subscriptions/s/resourceGroups/rg", true),
            ("/SUBSCRIPTIONS/s/RESOURCEGROUPS/rg", true),
            ("/subscriptions/", false),
            ("/subscriptions/s/resourceGroups/", false),
            ("/subscriptions/s/providers/Microsoft.Network", false),
            ("", false),
            (&nsg("s", "rg", "n"), false),
        ] {
            assert_eq!(Scope::parse(text).is_ok(), ok, "{text:?}");
        }
    }
}

//! The EC2 calls this provider makes outside the permission preflight: each goes through
//! [`AwsProvider::call`] (counted, retried with the shared policy, errors mapped), lists are
//! read to their last page and requests of many ids are cut into chunks EC2 accepts.
//! Requests are built from and answered with SDK types; turning them into neutral rules is
//! `wire`'s job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, IpPermission, SecurityGroupRule, SecurityGroupRuleUpdate, Tag, TagSpecification,
};
use nodeport_firewall_provider::Result;

use crate::{AwsProvider, discovery, error, marker};

/// Whether [`AwsProvider::retag`] adds tags or removes them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TagOp {
    Create,
    Delete,
}

impl AwsProvider {
    /// Runs one EC2 operation: counted, retried when throttled or transient, errors mapped.
    pub(crate) async fn call<T, E, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.retry
            .call(&self.stats, "EC2", op, f, error::map_sdk_error)
            .await
    }

    /// DescribeInstances for `ids`: instance id -> security groups of its primary interface.
    pub(crate) async fn instance_groups(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<String>>> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(100) {
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .call("DescribeInstances", || {
                        self.client
                            .describe_instances()
                            .set_instance_ids(Some(chunk.to_vec()))
                            .set_next_token(token.clone())
                            .send()
                    })
                    .await?;
                for inst in page.reservations().iter().flat_map(|r| r.instances()) {
                    let Some(id) = inst.instance_id() else {
                        continue;
                    };
                    let primary = inst
                        .network_interfaces()
                        .iter()
                        .find(|ni| ni.attachment().and_then(|a| a.device_index()) == Some(0));
                    let groups: Vec<String> = match primary {
                        Some(ni) => ni
                            .groups()
                            .iter()
                            .filter_map(|g| g.group_id().map(str::to_string))
                            .collect(),
                        None => inst
                            .security_groups()
                            .iter()
                            .filter_map(|g| g.group_id().map(str::to_string))
                            .collect(),
                    };
                    out.insert(id.to_string(), groups);
                }
                token = page
                    .next_token()
                    .filter(|t| !t.is_empty())
                    .map(str::to_string);
                if token.is_none() {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// DescribeSecurityGroups for `ids`: names, whether each carries the cluster tag key, and
    /// the pool its pool tag gives it to.
    pub(crate) async fn group_info(
        &self,
        ids: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, discovery::GroupInfo>> {
        let ids: Vec<String> = ids.iter().cloned().collect();
        let mut out = BTreeMap::new();
        for chunk in ids.chunks(100) {
            let page = self
                .call("DescribeSecurityGroups", || {
                    self.client
                        .describe_security_groups()
                        .set_group_ids(Some(chunk.to_vec()))
                        .send()
                })
                .await?;
            for g in page.security_groups() {
                if let Some(id) = g.group_id() {
                    out.insert(
                        id.to_string(),
                        discovery::GroupInfo {
                            name: g.group_name().unwrap_or_default().to_string(),
                            tagged: g.tags().iter().any(|t| t.key() == Some(&self.tag_key)),
                            pool: g
                                .tags()
                                .iter()
                                .find(|t| t.key() == Some(&self.config.pool_group_tag_key))
                                .and_then(|t| t.value())
                                .map(str::to_string),
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// DescribeSecurityGroupRules of `group`, every page.
    pub(crate) async fn list_rules(&self, group: &str) -> Result<Vec<SecurityGroupRule>> {
        self.rules_matching(Filter::builder().name("group-id").values(group).build())
            .await
    }

    /// DescribeSecurityGroupRules in the region tagged with this cluster's name, every page:
    /// where our rules are, whatever pool they were written for.
    pub(crate) async fn list_cluster_rules(&self) -> Result<Vec<SecurityGroupRule>> {
        self.rules_matching(
            Filter::builder()
                .name(format!("tag:{}", marker::TAG_CLUSTER))
                .values(&self.cluster)
                .build(),
        )
        .await
    }

    /// DescribeNetworkInterfaces of the interfaces `group` is attached to, page by page,
    /// until a page holds one that `outside` says is not the pool's, or the last page: all
    /// that is needed to refuse a shared group, and one call for a group of its own with
    /// fewer than 1000 interfaces.
    pub(crate) async fn interfaces_outside(
        &self,
        group: &str,
        outside: impl Fn(&discovery::Interface) -> bool,
    ) -> Result<Vec<discovery::Interface>> {
        let filter = Filter::builder().name("group-id").values(group).build();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call("DescribeNetworkInterfaces", || {
                    self.client
                        .describe_network_interfaces()
                        .filters(filter.clone())
                        .max_results(1000)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            let found: Vec<discovery::Interface> = page
                .network_interfaces()
                .iter()
                .map(|ni| discovery::Interface {
                    id: ni.network_interface_id().unwrap_or_default().to_string(),
                    instance: ni
                        .attachment()
                        .and_then(|a| a.instance_id())
                        .map(str::to_string),
                    description: ni.description().unwrap_or_default().to_string(),
                })
                .filter(|i| outside(i))
                .collect();
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if !found.is_empty() || token.is_none() {
                return Ok(found);
            }
        }
    }

    async fn rules_matching(&self, filter: Filter) -> Result<Vec<SecurityGroupRule>> {
        let mut token: Option<String> = None;
        let mut out = Vec::new();
        loop {
            let page = self
                .call("DescribeSecurityGroupRules", || {
                    self.client
                        .describe_security_group_rules()
                        .filters(filter.clone())
                        .max_results(1000)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            out.extend(page.security_group_rules().iter().cloned());
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// AuthorizeSecurityGroupIngress of `perms` on `group`, the new rules tagged with `spec`.
    pub(crate) async fn authorize_ingress(
        &self,
        group: &str,
        perms: Vec<IpPermission>,
        spec: &TagSpecification,
    ) -> Result<()> {
        self.call("AuthorizeSecurityGroupIngress", || {
            self.client
                .authorize_security_group_ingress()
                .group_id(group)
                .set_ip_permissions(Some(perms.clone()))
                .tag_specifications(spec.clone())
                .send()
        })
        .await
        .map(drop)
    }

    /// RevokeSecurityGroupIngress of the rules `ids` of `group`.
    pub(crate) async fn revoke_ingress(&self, group: &str, ids: Vec<String>) -> Result<()> {
        self.call("RevokeSecurityGroupIngress", || {
            self.client
                .revoke_security_group_ingress()
                .group_id(group)
                .set_security_group_rule_ids(Some(ids.clone()))
                .send()
        })
        .await
        .map(drop)
    }

    /// ModifySecurityGroupRules of `group`: one request, as many rules as given.
    pub(crate) async fn modify_rules(
        &self,
        group: &str,
        updates: &[SecurityGroupRuleUpdate],
    ) -> Result<()> {
        self.call("ModifySecurityGroupRules", || {
            self.client
                .modify_security_group_rules()
                .group_id(group)
                .set_security_group_rules(Some(updates.to_vec()))
                .send()
        })
        .await
        .map(drop)
    }

    /// CreateTags or DeleteTags of `tags` on rules `ids`, chunked.
    pub(crate) async fn retag(&self, op: TagOp, ids: &[String], tags: &[Tag]) -> Result<()> {
        for chunk in ids.chunks(self.config.max_rules_per_call) {
            match op {
                TagOp::Create => {
                    self.call("CreateTags", || {
                        self.client
                            .create_tags()
                            .set_resources(Some(chunk.to_vec()))
                            .set_tags(Some(tags.to_vec()))
                            .send()
                    })
                    .await
                    .map(drop)?;
                }
                TagOp::Delete => {
                    self.call("DeleteTags", || {
                        self.client
                            .delete_tags()
                            .set_resources(Some(chunk.to_vec()))
                            .set_tags(Some(tags.to_vec()))
                            .send()
                    })
                    .await
                    .map(drop)?;
                }
            }
        }
        Ok(())
    }
}

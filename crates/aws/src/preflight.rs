//! The permission preflight on AWS: every EC2 call this provider makes, sent with `DryRun`,
//! so that EC2 says which the credentials may not make without changing anything. The calls
//! on existing rules are made on one of our own rules when there is one: with resource-tag
//! conditions in the IAM policy, that is what decides.

use aws_sdk_ec2::types::{Filter, Tag};
use ipnet::IpNet;
use nodeport_firewall_model::{IpFamily, PortRange, Protocol, Rule, RuleContent, Target};
use nodeport_firewall_provider::{ErrorKind, Provider, Result};

use crate::wire::{modify_request, permission, tag_spec};
use crate::{AwsProvider, marker};

impl AwsProvider {
    /// Permission preflight: the IAM permissions this provider needs on `target` that the
    /// credentials lack, by name, found with EC2 `DryRun` (nothing is changed). Empty when
    /// every check passed.
    pub async fn check(&self, target: &Target) -> Vec<String> {
        let group = target.id.as_str();
        let mut missing = Vec::new();
        let probe = permission(
            &Rule {
                name: None,
                content: RuleContent {
                    scope: None,
                    family: IpFamily::V4,
                    protocol: Protocol::Tcp,
                    ports: vec![PortRange::single(1)],
                    sources: vec![IpNet::V4(ipnet::Ipv4Net::new_assert(
                        std::net::Ipv4Addr::new(192, 0, 2, 1),
                        32,
                    ))],
                },
                services: Default::default(),
                pools: Default::default(),
            },
            "nodeport-firewall permission check",
        );
        let spec = tag_spec(&marker::common_tags(&self.cluster, &Default::default()));
        let filter = Filter::builder().name("group-id").values(group).build();

        let verdict = |name: &str, r: Result<()>, missing: &mut Vec<String>| match r {
            Ok(()) => {}
            Err(e) if e.code.as_deref() == Some("DryRunOperation") => {}
            Err(e) if e.kind == ErrorKind::PermissionDenied => {
                missing.push(format!("ec2:{name}"));
            }
            Err(e) => missing.push(format!("ec2:{name} (could not check: {e})")),
        };
        let r = self
            .call("DryRun:DescribeSecurityGroupRules", || {
                self.client
                    .describe_security_group_rules()
                    .filters(filter.clone())
                    .dry_run(true)
                    .send()
            })
            .await
            .map(drop);
        verdict("DescribeSecurityGroupRules", r, &mut missing);
        let r = self
            .call("DryRun:DescribeInstances", || {
                self.client.describe_instances().dry_run(true).send()
            })
            .await
            .map(drop);
        verdict("DescribeInstances", r, &mut missing);
        let r = self
            .call("DryRun:DescribeNetworkInterfaces", || {
                self.client
                    .describe_network_interfaces()
                    .filters(filter.clone())
                    .dry_run(true)
                    .send()
            })
            .await
            .map(drop);
        verdict("DescribeNetworkInterfaces", r, &mut missing);
        let r = self
            .call("DryRun:DescribeSecurityGroups", || {
                self.client
                    .describe_security_groups()
                    .group_ids(group)
                    .dry_run(true)
                    .send()
            })
            .await
            .map(drop);
        verdict("DescribeSecurityGroups", r, &mut missing);
        match &probe {
            Ok(perm) => {
                let r = self
                    .call("DryRun:AuthorizeSecurityGroupIngress", || {
                        self.client
                            .authorize_security_group_ingress()
                            .group_id(group)
                            .ip_permissions(perm.clone())
                            .tag_specifications(spec.clone())
                            .dry_run(true)
                            .send()
                    })
                    .await
                    .map(drop);
                verdict(
                    "AuthorizeSecurityGroupIngress",
                    r.map_err(|mut e| {
                        if e.kind == ErrorKind::PermissionDenied {
                            e.message.push_str(" (ec2:CreateTags is needed too)");
                        }
                        e
                    }),
                    &mut missing,
                );
            }
            Err(e) => missing.push(format!(
                "ec2:AuthorizeSecurityGroupIngress (could not check: {e})"
            )),
        }
        // Revoke, modify and tag on one of our own rules when there is one: with
        // resource-tag conditions in the policy, that is what decides.
        let own = self
            .observe(target)
            .await
            .ok()
            .and_then(|o| o.rules.into_iter().find(|r| r.owned));
        let own_id = own.as_ref().and_then(|r| r.id.clone());
        let r = match (&own_id, &probe) {
            (Some(id), _) => self
                .call("DryRun:RevokeSecurityGroupIngress", || {
                    self.client
                        .revoke_security_group_ingress()
                        .group_id(group)
                        .security_group_rule_ids(id)
                        .dry_run(true)
                        .send()
                })
                .await
                .map(drop),
            (None, Ok(perm)) => self
                .call("DryRun:RevokeSecurityGroupIngress", || {
                    self.client
                        .revoke_security_group_ingress()
                        .group_id(group)
                        .ip_permissions(perm.clone())
                        .dry_run(true)
                        .send()
                })
                .await
                .map(drop),
            (None, Err(e)) => Err(e.clone()),
        };
        verdict("RevokeSecurityGroupIngress", r, &mut missing);
        if let (Some(id), Some(rule)) = (&own_id, &own) {
            let description = crate::wire::Written::of(rule.payload.as_ref())
                .description
                .unwrap_or_default();
            if let Ok(update) = modify_request(id, &rule.rule, &description) {
                let r = self
                    .call("DryRun:ModifySecurityGroupRules", || {
                        self.client
                            .modify_security_group_rules()
                            .group_id(group)
                            .security_group_rules(update.clone())
                            .dry_run(true)
                            .send()
                    })
                    .await
                    .map(drop);
                verdict("ModifySecurityGroupRules", r, &mut missing);
            }
            let key = "nodeport-firewall.io/permission-check";
            let r = self
                .call("DryRun:CreateTags", || {
                    self.client
                        .create_tags()
                        .resources(id)
                        .tags(
                            Tag::builder()
                                .key(marker::TAG_MANAGED_BY)
                                .value(marker::MANAGED_BY)
                                .build(),
                        )
                        .dry_run(true)
                        .send()
                })
                .await
                .map(drop);
            verdict("CreateTags", r, &mut missing);
            let r = self
                .call("DryRun:DeleteTags", || {
                    self.client
                        .delete_tags()
                        .resources(id)
                        .tags(Tag::builder().key(key).build())
                        .dry_run(true)
                        .send()
                })
                .await
                .map(drop);
            verdict("DeleteTags", r, &mut missing);
        }
        missing
    }
}

//! Between EC2's security group rules and the neutral model: reading an EC2 rule back as an
//! [`ObservedRule`] (with its ownership marker), and the EC2 requests (an [`IpPermission`],
//! a rule update, tag specifications) written for a neutral [`Rule`]. EC2 rules have one
//! port range and one source each. No calls are made here.

use aws_sdk_ec2::types::{
    IpPermission, IpRange, Ipv6Range, ResourceType, SecurityGroupRule, SecurityGroupRuleRequest,
    SecurityGroupRuleUpdate, Tag, TagSpecification,
};
use ipnet::IpNet;
use nodeport_firewall_model::{
    IpFamily, MarkerDigest, ObservedRule, PortRange, Protocol, Rule, RuleContent,
};
use nodeport_firewall_provider::Result;

use crate::{AwsProvider, invalid, marker};

/// What an update of one of our rules needs to know about it as observed: the list tags it
/// carries (stale ones are deleted) and its description (rewritten only when it changes).
/// It travels in the observation and the plan as the rule's payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Written {
    pub(crate) tag_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
}

impl Written {
    /// The payload of a plan's change; empty when it has none (nothing is known).
    pub(crate) fn of(payload: Option<&serde_json::Value>) -> Self {
        payload
            .and_then(|p| serde_json::from_value(p.clone()).ok())
            .unwrap_or_default()
    }
}

impl AwsProvider {
    /// Maps one EC2 rule to a neutral rule: [`observed`] for this provider's cluster.
    pub(crate) fn to_observed(&self, r: &SecurityGroupRule) -> ObservedRule {
        observed(&self.cluster, r)
    }
}

/// Maps one EC2 rule to a neutral rule, ours when its marker names `cluster`. Rules that are
/// not a single CIDR with TCP, UDP or SCTP are never ours; they are kept, with no sources,
/// for the quota count. Whatever the cloud sends, this never panics (see `fuzz`).
pub(crate) fn observed(cluster: &str, r: &SecurityGroupRule) -> ObservedRule {
    let protocol = match r.ip_protocol().unwrap_or_default() {
        "tcp" | "6" => Some(Protocol::Tcp),
        "udp" | "17" => Some(Protocol::Udp),
        "sctp" | "132" => Some(Protocol::Sctp),
        _ => None,
    };
    let cidr = r
        .cidr_ipv4()
        .or(r.cidr_ipv6())
        .and_then(|c| c.parse::<IpNet>().ok())
        .map(|n| n.trunc());
    let port = |p: Option<i32>, default: u16| {
        p.filter(|p| *p >= 0)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(default)
    };
    let ports = PortRange {
        from: port(r.from_port(), 0),
        to: port(r.to_port(), u16::MAX),
    };
    let tags: Vec<(&str, &str)> = r
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value().unwrap_or_default())))
        .collect();
    let parsed = marker::parse(cluster, tags.iter().copied(), r.description());
    let mappable = protocol.is_some() && cidr.is_some() && ports.from <= ports.to;
    let owned = parsed.owned && mappable;
    let rule = Rule {
        name: None,
        content: RuleContent {
            scope: None,
            family: cidr.as_ref().map_or(IpFamily::V4, IpFamily::of),
            protocol: protocol.unwrap_or(Protocol::Tcp),
            ports: vec![ports],
            sources: if mappable {
                cidr.into_iter().collect()
            } else {
                Vec::new()
            },
        },
        services: if owned {
            parsed.services
        } else {
            Default::default()
        },
        pools: if owned {
            parsed.pools
        } else {
            Default::default()
        },
    };
    // A cut Service list is known by its digest; the pools are always listed in full.
    let digest = parsed
        .digest
        .clone()
        .filter(|_| owned)
        .map(|value| MarkerDigest {
            value,
            pools_listed: true,
        });
    let payload = owned
        .then(|| {
            serde_json::to_value(Written {
                tag_keys: parsed.list_tag_keys,
                description: r.description().map(str::to_string),
            })
            .ok()
        })
        .flatten();
    ObservedRule {
        payload,
        digest,
        ..ObservedRule::new(r.security_group_rule_id().map(str::to_string), rule, owned)
    }
}

pub(crate) fn rule_text(rule: &Rule) -> String {
    format!(
        "{} {} from {}",
        rule.content.protocol,
        rule.ports_text(),
        rule.sources_text()
    )
}

pub(crate) fn tag_spec(tags: &[(String, String)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(ResourceType::SecurityGroupRule)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .build()
}

fn protocol_text(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        // EC2 takes SCTP by its protocol number.
        Protocol::Sctp => "132",
    }
}

fn single(rule: &Rule) -> Result<(PortRange, IpNet)> {
    match (
        rule.content.ports.as_slice(),
        rule.content.sources.as_slice(),
    ) {
        ([ports], [source]) => Ok((*ports, source.trunc())),
        _ => Err(invalid(format!(
            "an EC2 rule has exactly one port range and one source: {}",
            rule_text(rule)
        ))),
    }
}

/// One EC2 permission for one neutral rule, with its canonical CIDR.
pub(crate) fn permission(rule: &Rule, description: &str) -> Result<IpPermission> {
    let (ports, source) = single(rule)?;
    let b = IpPermission::builder()
        .ip_protocol(protocol_text(rule.content.protocol))
        .from_port(i32::from(ports.from))
        .to_port(i32::from(ports.to));
    Ok(match source {
        IpNet::V4(_) => b.ip_ranges(
            IpRange::builder()
                .cidr_ip(source.to_string())
                .description(description)
                .build(),
        ),
        IpNet::V6(_) => b.ipv6_ranges(
            Ipv6Range::builder()
                .cidr_ipv6(source.to_string())
                .description(description)
                .build(),
        ),
    }
    .build())
}

pub(crate) fn modify_request(
    id: &str,
    rule: &Rule,
    description: &str,
) -> Result<SecurityGroupRuleUpdate> {
    let (ports, source) = single(rule)?;
    let b = SecurityGroupRuleRequest::builder()
        .ip_protocol(protocol_text(rule.content.protocol))
        .from_port(i32::from(ports.from))
        .to_port(i32::from(ports.to))
        .description(description);
    let b = match source {
        IpNet::V4(_) => b.cidr_ipv4(source.to_string()),
        IpNet::V6(_) => b.cidr_ipv6(source.to_string()),
    };
    Ok(SecurityGroupRuleUpdate::builder()
        .security_group_rule_id(id)
        .security_group_rule(b.build())
        .build())
}

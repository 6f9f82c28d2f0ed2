//! The AWS provider of nodeport-firewall: inbound rules of EC2 security groups, one target
//! per security group, resolved per node pool from the operator config or from the pool's
//! instances.
//!
//! Every EC2 call goes through [`AwsProvider::call`]: it is counted in [`CallStats`], retried
//! with the shared [`RetryPolicy`] (the SDK's own retries are off), and its error mapped to the
//! provider-neutral [`Error`]. No SDK type leaves this crate.

pub mod config;
pub mod discovery;
pub mod error;
pub mod marker;
pub mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, IpPermission, IpRange, Ipv6Range, ResourceType, SecurityGroupRule,
    SecurityGroupRuleRequest, SecurityGroupRuleUpdate, Tag, TagSpecification,
};
use ipnet::IpNet;
use nodeport_firewall_model::{
    Change, IpFamily, Limits, Observation, ObservedRule, PoolTarget, PortRange, Protocol, Render,
    Rule, RuleContent, ShapeRenderer, Target, TargetPlan,
};
use nodeport_firewall_provider::{
    ApplyReport, Error, ErrorKind, PoolView, Provider, Result, RetryPolicy, Writes,
};
use tracing::debug;

pub use config::{AwsConfig, AwsPoolConfig, RetrySettings};
pub use stats::{CallStats, OpStats};

pub const NAME: &str = "aws";

/// Static credentials, for tests and local emulators. Production uses the default chain.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// What the last observation of a target said about one rule.
#[derive(Debug, Clone)]
struct Seen {
    owned: bool,
    list_tag_keys: Vec<String>,
    description: Option<String>,
}

type CacheKey = (String, Vec<String>);
type Tags = Vec<(String, String)>;

#[derive(Debug, Clone, Copy)]
enum TagOp {
    Create,
    Delete,
}

/// The EC2 security-group provider.
pub struct AwsProvider {
    cluster: String,
    config: AwsConfig,
    tag_key: String,
    client: aws_sdk_ec2::Client,
    retry: RetryPolicy,
    renderer: ShapeRenderer,
    resolutions: Mutex<HashMap<CacheKey, (Instant, Vec<String>)>>,
    seen: Mutex<HashMap<String, HashMap<String, Seen>>>,
    stats: CallStats,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider")
            .field("cluster", &self.cluster)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Invalid, message)
}

impl AwsProvider {
    /// Reads the `aws:` section of the operator config and loads credentials and region
    /// from the default chain (env, web identity / IRSA, EKS Pod Identity, instance profile).
    pub async fn from_config(cluster: &str, section: Option<&serde_json::Value>) -> Result<Self> {
        Self::from_config_with(cluster, section, None).await
    }

    /// As [`AwsProvider::from_config`], with static credentials instead of the default chain.
    pub async fn from_config_with(
        cluster: &str,
        section: Option<&serde_json::Value>,
        credentials: Option<StaticCredentials>,
    ) -> Result<Self> {
        let config: AwsConfig = PoolView::section(section, NAME)?;
        if config.rule_quota == 0 || config.max_rules_per_call == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "aws: ruleQuota and maxRulesPerCall must be at least 1",
            ));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // Our retries, not the SDK's: counted, with the shared backoff.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(
                        config.attempt_timeout_seconds.max(1),
                    ))
                    .build(),
            );
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some(c) = credentials {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                None,
                None,
                "nodeport-firewall-static",
            ));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(Error::new(
                ErrorKind::Config,
                "aws: no region: set aws.region in the operator config, or AWS_REGION",
            ));
        }
        let client = aws_sdk_ec2::Client::new(&sdk);
        let tag_key = config
            .cluster_tag_key
            .clone()
            .unwrap_or_else(|| format!("kubernetes.io/cluster/{cluster}"));
        Ok(AwsProvider {
            cluster: cluster.to_string(),
            retry: config.retry.policy(),
            config,
            tag_key,
            client,
            renderer: ShapeRenderer::unnamed(),
            resolutions: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            stats: CallStats::new(stats::kind),
        })
    }

    /// EC2 API calls made so far, by operation.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    /// The limits of every security group, from the config.
    pub fn limits(&self) -> Limits {
        Limits {
            max_rules: Some(self.config.rule_quota),
            rules_counted_per_family: true,
            max_ports_per_rule: 1,
            max_sources_per_rule: 1,
            max_total_sources: None,
            max_total_destinations: None,
            max_rules_reason: None,
            updates_in_place: false,
        }
    }

    /// Forgets cached pool resolutions, e.g. after the config changed.
    pub fn clear_cache(&self) {
        if let Ok(mut c) = self.resolutions.lock() {
            c.clear();
        }
    }

    /// Runs one EC2 operation: counted, retried when throttled or transient, errors mapped.
    async fn call<T, E, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.retry
            .call(&self.stats, "EC2", op, f, error::map_sdk_error)
            .await
    }

    fn cached_resolution(&self, key: &CacheKey) -> Option<Vec<String>> {
        let ttl = Duration::from_secs(self.config.resolution_cache_seconds);
        let cache = self.resolutions.lock().ok()?;
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, g)| g.clone())
    }

    /// DescribeInstances for `ids`: instance id -> security groups of its primary interface.
    async fn instance_groups(&self, ids: &[String]) -> Result<HashMap<String, Vec<String>>> {
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

    /// DescribeSecurityGroups for `ids`: names and whether each carries the cluster tag key.
    async fn group_info(
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
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// Maps one EC2 rule to a neutral rule. Rules that are not a single CIDR with TCP, UDP
    /// or SCTP are never ours; they are kept, with no sources, for the quota count.
    fn to_observed(&self, r: &SecurityGroupRule) -> (ObservedRule, Seen) {
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
        let parsed = marker::parse(&self.cluster, tags.iter().copied(), r.description());
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
        (
            ObservedRule {
                id: r.security_group_rule_id().map(str::to_string),
                rule,
                owned,
            },
            Seen {
                owned,
                list_tag_keys: parsed.list_tag_keys,
                description: r.description().map(str::to_string),
            },
        )
    }

    /// The last observation of `group`'s rules, re-read when it does not know all of `ids`.
    async fn seen_rules(&self, target: &Target, ids: &[&str]) -> Result<HashMap<String, Seen>> {
        let cached = self
            .seen
            .lock()
            .ok()
            .and_then(|s| s.get(&target.id).cloned());
        if let Some(seen) = cached
            && ids.iter().all(|id| seen.contains_key(*id))
        {
            return Ok(seen);
        }
        self.observe(target).await?;
        Ok(self
            .seen
            .lock()
            .ok()
            .and_then(|s| s.get(&target.id).cloned())
            .unwrap_or_default())
    }

    /// CreateTags or DeleteTags of `tags` on rules `ids`, chunked.
    async fn retag(&self, op: TagOp, ids: &[String], tags: &[Tag]) -> Result<()> {
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

    fn forget_seen(&self, group: &str) {
        if let Ok(mut s) = self.seen.lock() {
            s.remove(group);
        }
    }

    async fn authorize(
        &self,
        group: &str,
        adds: &[&Change],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let limits = self.limits();
        let mut contents = HashSet::new();
        // Rules whose tags are the same go in one call; a rule whose Services do not fit its
        // description carries them in tags of its own, so it goes alone.
        let mut batches: BTreeMap<Tags, Vec<(IpPermission, &Rule)>> = BTreeMap::new();
        let mut singles = Vec::new();
        for c in adds {
            if !contents.insert(&c.rule.content) {
                continue; // never the same permission twice in one request
            }
            if let Some(problem) = limits.check_rule(&c.rule) {
                return Err(invalid(format!(
                    "refusing to write {}: {problem}",
                    rule_text(&c.rule)
                )));
            }
            let m = marker::marker(&self.cluster, &c.rule.services);
            if m.service_tags.len() > marker::MAX_LIST_TAGS {
                return Err(invalid(format!(
                    "{} serves {} Services, too many to record in the rule's tags",
                    rule_text(&c.rule),
                    c.rule.services.len()
                )));
            }
            let perm = permission(&c.rule, &m.description)?;
            let mut tags = marker::common_tags(&self.cluster, &c.rule.pools);
            if m.service_tags.is_empty() {
                batches.entry(tags).or_default().push((perm, &c.rule));
            } else {
                tags.extend(m.service_tags);
                singles.push((tags, vec![(perm, &c.rule)]));
            }
        }
        let max = self.config.max_rules_per_call;
        for (tags, perms) in &batches {
            for chunk in perms.chunks(max) {
                self.authorize_call(group, tags, chunk, report).await?;
            }
        }
        for (tags, perms) in &singles {
            self.authorize_call(group, tags, perms, report).await?;
        }
        Ok(())
    }

    async fn authorize_call(
        &self,
        group: &str,
        tags: &[(String, String)],
        perms: &[(IpPermission, &Rule)],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let spec = tag_spec(tags);
        let send = |perms: Vec<IpPermission>| {
            self.client
                .authorize_security_group_ingress()
                .group_id(group)
                .set_ip_permissions(Some(perms))
                .tag_specifications(spec.clone())
                .send()
        };
        let all: Vec<IpPermission> = perms.iter().map(|(p, _)| p.clone()).collect();
        match self
            .call("AuthorizeSecurityGroupIngress", || send(all.clone()))
            .await
        {
            Ok(_) => {
                report.added += perms.len();
                Ok(())
            }
            Err(e) if e.kind == ErrorKind::Conflict => {
                // One of them exists already (written meanwhile, or by a retried call whose
                // answer was lost). Add the others one by one; the existing ones are left as
                // they are and re-observed on the next reconcile: never an error loop.
                debug!(group, error = %e, "duplicate in batch, authorizing one by one");
                for (perm, rule) in perms {
                    match self
                        .call("AuthorizeSecurityGroupIngress", || send(vec![perm.clone()]))
                        .await
                    {
                        Ok(_) => report.added += 1,
                        Err(e) if e.kind == ErrorKind::Conflict => report.notes.push(format!(
                            "{} already exists on {group} (InvalidPermission.Duplicate); left as is",
                            rule_text(rule)
                        )),
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn revoke(
        &self,
        group: &str,
        removes: &[&Change],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let mut ids: Vec<String> = removes.iter().filter_map(|c| c.id.clone()).collect();
        ids.sort();
        ids.dedup();
        let send = |ids: Vec<String>| {
            self.client
                .revoke_security_group_ingress()
                .group_id(group)
                .set_security_group_rule_ids(Some(ids))
                .send()
        };
        for chunk in ids.chunks(self.config.max_rules_per_call) {
            match self
                .call("RevokeSecurityGroupIngress", || send(chunk.to_vec()))
                .await
            {
                Ok(_) => report.removed += chunk.len(),
                Err(e) if rule_gone(&e) => {
                    for id in chunk {
                        match self
                            .call("RevokeSecurityGroupIngress", || send(vec![id.clone()]))
                            .await
                        {
                            Ok(_) => report.removed += 1,
                            Err(e) if rule_gone(&e) => report
                                .notes
                                .push(format!("rule {id} on {group} was already gone")),
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Rewrites the marker of rules whose content stays and whose Services or pools change.
    async fn update(
        &self,
        group: &str,
        updates: &[&Change],
        seen: &HashMap<String, Seen>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let mut modify: Vec<SecurityGroupRuleUpdate> = Vec::new();
        let mut create: BTreeMap<Vec<(String, String)>, Vec<String>> = BTreeMap::new();
        let mut delete: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        for c in updates {
            let id =
                c.id.clone()
                    .ok_or_else(|| invalid("update without a rule id"))?;
            let previous = c.previous.as_ref();
            if previous.is_some_and(|p| p.content != c.rule.content) {
                return Err(invalid(format!(
                    "rule {id}: EC2 rules cannot change ports or sources in place"
                )));
            }
            let m = marker::marker(&self.cluster, &c.rule.services);
            if m.service_tags.len() > marker::MAX_LIST_TAGS {
                return Err(invalid(format!(
                    "{} serves {} Services, too many to record in the rule's tags",
                    rule_text(&c.rule),
                    c.rule.services.len()
                )));
            }
            let old = seen.get(&id);
            let pools_changed = previous.is_none_or(|p| p.pools != c.rule.pools);
            let mut want = m.service_tags.clone();
            if pools_changed {
                want.extend(marker::chunk_tags(
                    marker::TAG_POOLS,
                    c.rule.pools.iter().map(|p| p.as_str().to_string()),
                ));
            }
            let keep: HashSet<&str> = want.iter().map(|(k, _)| k.as_str()).collect();
            let stale: Vec<String> = old
                .map(|s| s.list_tag_keys.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|k| !keep.contains(k.as_str()))
                .filter(|k| pools_changed || !marker::is_list_tag(k, marker::TAG_POOLS))
                .collect();
            if old.and_then(|s| s.description.as_deref()) != Some(m.description.as_str()) {
                modify.push(modify_request(&id, &c.rule, &m.description)?);
            }
            if !want.is_empty() {
                create.entry(want).or_default().push(id.clone());
            }
            if !stale.is_empty() {
                delete.entry(stale).or_default().push(id);
            }
        }
        let max = self.config.max_rules_per_call;
        for (tags, ids) in &create {
            let tags: Vec<Tag> = tags
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect();
            self.retag(TagOp::Create, ids, &tags).await?;
        }
        for chunk in modify.chunks(max) {
            self.call("ModifySecurityGroupRules", || {
                self.client
                    .modify_security_group_rules()
                    .group_id(group)
                    .set_security_group_rules(Some(chunk.to_vec()))
                    .send()
            })
            .await?;
        }
        for (keys, ids) in &delete {
            let tags: Vec<Tag> = keys.iter().map(|k| Tag::builder().key(k).build()).collect();
            self.retag(TagOp::Delete, ids, &tags).await?;
        }
        report.updated += updates.len();
        Ok(())
    }

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
            let seen = self
                .seen
                .lock()
                .ok()
                .and_then(|s| s.get(group).and_then(|m| m.get(id).cloned()));
            let description = seen.and_then(|s| s.description).unwrap_or_default();
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

fn rule_gone(e: &Error) -> bool {
    matches!(
        e.code.as_deref(),
        Some("InvalidPermission.NotFound" | "InvalidSecurityGroupRuleId.NotFound")
    )
}

fn rule_text(rule: &Rule) -> String {
    format!(
        "{} {} from {}",
        rule.content.protocol,
        rule.ports_text(),
        rule.sources_text()
    )
}

fn tag_spec(tags: &[(String, String)]) -> TagSpecification {
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
fn permission(rule: &Rule, description: &str) -> Result<IpPermission> {
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

fn modify_request(id: &str, rule: &Rule, description: &str) -> Result<SecurityGroupRuleUpdate> {
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

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn renderer(&self) -> &dyn Render {
        &self.renderer
    }

    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        let over: AwsPoolConfig = pool.override_config(NAME)?;
        let to_targets = |groups: &[String]| {
            groups
                .iter()
                .map(|g| PoolTarget {
                    target: Target::new(NAME, g),
                    scope: None,
                })
                .collect::<Vec<_>>()
        };
        if !over.security_group_ids.is_empty() {
            let mut ids = over.security_group_ids.clone();
            if let Some(bad) = ids.iter().find(|g| !config::valid_sg_id(g)) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "pools.{}.aws.securityGroupIds: {bad:?} is not a security group id (sg-...)",
                        pool.name
                    ),
                ));
            }
            ids.sort();
            ids.dedup();
            return Ok(to_targets(&ids));
        }
        let nodes = discovery::instances(pool.name, pool.nodes)?;
        let mut ids: Vec<String> = nodes.iter().map(|(_, i)| i.clone()).collect();
        ids.dedup();
        let key = (pool.name.to_string(), ids.clone());
        if let Some(groups) = self.cached_resolution(&key) {
            return Ok(to_targets(&groups));
        }
        let region = self.client.config().region().map(|r| r.to_string());
        let hint = discovery::region_hint(pool.nodes, region.as_deref()).unwrap_or_default();
        let by_instance = self.instance_groups(&ids).await.map_err(|e| {
            let message = format!(
                "pool {}: cannot read its instances: {}{hint}",
                pool.name, e.message
            );
            e.into_discovery(message)
        })?;
        let missing: Vec<&String> = ids
            .iter()
            .filter(|i| !by_instance.contains_key(*i))
            .collect();
        if !missing.is_empty() {
            return Err(Error::new(
                ErrorKind::Discovery,
                format!(
                    "pool {}: instances not found in region: {}{hint}",
                    pool.name,
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let node_groups: Vec<discovery::NodeGroups> = nodes
            .iter()
            .map(|(node, inst)| discovery::NodeGroups {
                node: node.clone(),
                instance: inst.clone(),
                groups: by_instance.get(inst).cloned().unwrap_or_default(),
            })
            .collect();
        let all: BTreeSet<String> = node_groups
            .iter()
            .flat_map(|n| n.groups.iter().cloned())
            .collect();
        // Names and tags only matter when there is a choice to make or to explain.
        let info = if all.len() > 1 {
            self.group_info(&all).await?
        } else {
            BTreeMap::new()
        };
        let groups = discovery::choose(pool.name, &self.tag_key, &node_groups, &info)?;
        if let Ok(mut cache) = self.resolutions.lock() {
            cache.retain(|(p, _), _| p != pool.name.as_str());
            cache.insert(key, (Instant::now(), groups.clone()));
        }
        Ok(to_targets(&groups))
    }

    async fn observe(&self, target: &Target) -> Result<Observation> {
        let group = target.id.as_str();
        let filter = Filter::builder().name("group-id").values(group).build();
        let mut token: Option<String> = None;
        let mut rules = Vec::new();
        let mut seen = HashMap::new();
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
            for r in page.security_group_rules() {
                if r.is_egress() == Some(true) {
                    continue;
                }
                if r.group_id().is_some_and(|g| g != group) {
                    continue;
                }
                let (observed, s) = self.to_observed(r);
                if let Some(id) = &observed.id {
                    seen.insert(id.clone(), s);
                }
                rules.push(observed);
            }
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        if let Ok(mut s) = self.seen.lock() {
            s.insert(group.to_string(), seen);
        }
        Ok(Observation {
            rules,
            limits: self.limits(),
        })
    }

    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        Ok(self.check(target).await)
    }

    async fn apply(&self, plan: &TargetPlan) -> Result<ApplyReport> {
        let Writes {
            removes,
            updates,
            adds,
            existing: ids,
        } = Writes::of(plan)?;
        let group = plan.target.id.as_str();

        // Never change a rule that is not ours: check every id against what EC2 said.
        let seen = if ids.is_empty() {
            HashMap::new()
        } else {
            self.seen_rules(&plan.target, &ids).await?
        };
        for id in &ids {
            if seen.get(*id).is_some_and(|s| !s.owned) {
                return Err(invalid(format!(
                    "rule {id} on {group} is not owned by cluster {}; refusing to change it",
                    self.cluster
                )));
            }
        }
        let gone: HashSet<&str> = ids
            .iter()
            .copied()
            .filter(|id| !seen.contains_key(*id))
            .collect();
        let removes: Vec<&Change> = removes
            .into_iter()
            .filter(|c| !c.id.as_deref().is_some_and(|id| gone.contains(id)))
            .collect();
        let updates: Vec<&Change> = updates
            .into_iter()
            .filter(|c| !c.id.as_deref().is_some_and(|id| gone.contains(id)))
            .collect();

        let mut report = ApplyReport::default();
        for id in &gone {
            report.notes.push(format!(
                "rule {id} on {group} no longer exists; nothing to do"
            ));
        }
        let result = async {
            if plan.remove_first {
                self.revoke(group, &removes, &mut report).await?;
            }
            if !updates.is_empty() {
                self.update(group, &updates, &seen, &mut report).await?;
            }
            if !adds.is_empty() {
                self.authorize(group, &adds, &mut report).await?;
            }
            if !plan.remove_first {
                self.revoke(group, &removes, &mut report).await?;
            }
            Ok::<(), Error>(())
        }
        .await;
        self.forget_seen(group);
        result.map(|()| report)
    }
}

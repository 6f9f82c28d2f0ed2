//! The Azure provider of nodeport-firewall: inbound security rules of network security
//! groups, one target per NSG, each pool's rules scoped inside it by their destination (the
//! pool's subnet prefix, its application security group, or its node IPs).
//!
//! Only per-rule PUT and DELETE are used: a whole-NSG PUT would replace everyone else's
//! rules. Every ARM call goes through [`AzureProvider::call`]: counted in [`CallStats`],
//! retried with the shared [`RetryPolicy`] (the SDK's own retries are off) honouring
//! Retry-After, its error mapped to the provider-neutral [`Error`]. No SDK type leaves this
//! crate.

pub mod config;
pub mod credential;
pub mod discovery;
pub mod error;
mod http;
pub mod marker;
mod render;
pub mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_core::auth::TokenCredential;
use azure_core::headers::{AUTHORIZATION, AZURE_ASYNCOPERATION, LOCATION};
use azure_core::{HttpClient, Method, Request, RetryOptions, TransportOptions, Url};
use azure_mgmt_network::package_2024_03::models::{
    self as arm, ApplicationSecurityGroup, SecurityRuleAccess, SecurityRuleDirection,
    SecurityRulePropertiesFormat, security_rule_properties_format::Protocol as ArmProtocol,
};
use futures::StreamExt;
use ipnet::IpNet;
use nodeport_firewall_model::{
    Change, IpFamily, Limits, Observation, ObservedRule, PoolTarget, PortRange, Protocol, Render,
    Rule, RuleContent, Target, TargetPlan,
};
use nodeport_firewall_provider::{
    ApplyReport, Error, ErrorKind, PoolView, Provider, Result, RetryPolicy, Writes,
};
use tracing::{debug, info, warn};

pub use config::{AzureConfig, AzurePoolConfig, CredentialKind, PriorityBand, RetrySettings};
use marker::{Destination, Marker, MarkerBook};
pub use stats::{CallStats, OpStats};

pub const NAME: &str = "azure";

/// The public-cloud ARM endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://management.azure.com";

/// How the provider authenticates.
#[derive(Clone, Default)]
pub enum Credentials {
    /// `azure.credential` from the config (default: the chain).
    #[default]
    FromConfig,
    /// A fixed bearer token, for test servers.
    StaticToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::FromConfig => f.write_str("FromConfig"),
            Credentials::StaticToken(_) => f.write_str("StaticToken(..)"),
        }
    }
}

/// A network security group's resource id, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NsgId {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
}

impl NsgId {
    /// Parses `/subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Network/networkSecurityGroups/<n>`
    /// (segment names case-insensitive, as ARM treats them).
    pub fn parse(id: &str) -> std::result::Result<NsgId, String> {
        let parts: Vec<&str> = id.trim_matches('/').split('/').collect();
        let ok = parts.len() == 8
            && parts[0].eq_ignore_ascii_case("subscriptions")
            && parts[2].eq_ignore_ascii_case("resourceGroups")
            && parts[4].eq_ignore_ascii_case("providers")
            && parts[5].eq_ignore_ascii_case("Microsoft.Network")
            && parts[6].eq_ignore_ascii_case("networkSecurityGroups")
            && [1, 3, 7].iter().all(|i| !parts[*i].is_empty());
        if !ok {
            return Err(format!(
                "{id:?} is not an NSG resource id (/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Network/networkSecurityGroups/<name>)"
            ));
        }
        Ok(NsgId {
            subscription: parts[1].to_string(),
            resource_group: parts[3].to_string(),
            name: parts[7].to_string(),
        })
    }

    /// The canonical id: one spelling, so that pools naming the same NSG share a target.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkSecurityGroups/{}",
            self.subscription.to_ascii_lowercase(),
            self.resource_group.to_ascii_lowercase(),
            self.name.to_ascii_lowercase()
        )
    }
}

/// What the last observation of an NSG said about one of its inbound rules.
#[derive(Debug, Clone)]
struct SeenRule {
    priority: i32,
    owned: bool,
    /// The hash of a hashed marker, to tell a marker-only change that needs no write.
    marker_hash: Option<String>,
}

/// The last observation of an NSG.
#[derive(Debug, Clone, Default)]
struct SeenNsg {
    rules: HashMap<String, SeenRule>,
    /// Names of every rule, both directions: a PUT under one of them replaces that rule.
    names: HashSet<String>,
    /// Priorities of every inbound rule, ours and others'.
    priorities: BTreeSet<i32>,
}

/// A pool and its VMSSs.
type ResolutionKey = (String, Vec<discovery::Vmss>);
/// When discovered, the NSG (when it was looked for) and the destination.
type Resolution = (Instant, Option<String>, discovery::Found);

/// The NSG provider.
pub struct AzureProvider {
    cluster: String,
    config: AzureConfig,
    client: azure_mgmt_network::package_2024_03::Client,
    http: Arc<dyn HttpClient>,
    credential: Arc<dyn TokenCredential>,
    token_scope: String,
    retry: RetryPolicy,
    renderer: render::NsgRenderer,
    book: MarkerBook,
    seen: Mutex<HashMap<String, SeenNsg>>,
    /// Discovered (NSG, destination) per pool and VMSS set.
    resolutions: Mutex<HashMap<ResolutionKey, Resolution>>,
    /// One writer per NSG, even when several pools (targets of one apply) share it.
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    stats: CallStats,
}

impl std::fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureProvider")
            .field("cluster", &self.cluster)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Invalid, message)
}

fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message)
}

/// Timeout of one HTTP attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

impl AzureProvider {
    /// Reads the `azure:` section of the operator config; credentials from the chain.
    pub async fn from_config(cluster: &str, section: Option<&serde_json::Value>) -> Result<Self> {
        Self::from_config_with(cluster, section, Credentials::FromConfig).await
    }

    /// As [`AzureProvider::from_config`], with the given credentials.
    pub async fn from_config_with(
        cluster: &str,
        section: Option<&serde_json::Value>,
        credentials: Credentials,
    ) -> Result<Self> {
        let config: AzureConfig = PoolView::section(section, NAME)?;
        config.validate()?;
        let endpoint_text = config
            .endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let endpoint = Url::parse(&endpoint_text)
            .map_err(|e| config_error(format!("azure.endpoint {endpoint_text:?}: {e}")))?;
        let token_scope = match &config.token_scope {
            Some(s) => s.clone(),
            None => format!("{}/.default", endpoint_text.trim_end_matches('/')),
        };
        let http = azure_core::new_http_client();
        let credential: Arc<dyn TokenCredential> = match credentials {
            Credentials::StaticToken(t) => Arc::new(credential::StaticToken(t)),
            Credentials::FromConfig => credential::build(
                config.credential,
                &config.workload_identity,
                http.clone(),
                config.authority_host.as_deref(),
            )
            .map_err(|e| config_error(format!("azure credentials: {}", error::chain(&e))))?,
        };
        let transport = http::Transport {
            http: http.clone(),
            attempt_timeout: ATTEMPT_TIMEOUT,
        };
        let client = azure_mgmt_network::package_2024_03::ClientBuilder::new(credential.clone())
            .endpoint(endpoint)
            .scopes(&[token_scope.as_str()])
            // Our retries, not the SDK's: counted, with the shared backoff.
            .retry(RetryOptions::none())
            .transport(TransportOptions::new_custom_policy(Arc::new(transport)))
            .build()
            .map_err(|e| config_error(format!("azure client: {}", error::chain(&e))))?;
        let book = MarkerBook::default();
        Ok(AzureProvider {
            cluster: cluster.to_string(),
            retry: config
                .retry
                .policy_with_max_delay(config::DEFAULT_MAX_RETRY_DELAY),
            config,
            client,
            http,
            credential,
            token_scope,
            renderer: render::NsgRenderer::new(book.clone()),
            book,
            seen: Mutex::new(HashMap::new()),
            resolutions: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            stats: CallStats::new(stats::kind),
        })
    }

    /// ARM calls made so far, by operation.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    pub fn config(&self) -> &AzureConfig {
        &self.config
    }

    /// Runs one ARM operation: counted, retried when throttled or transient, errors mapped.
    async fn call<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = azure_core::Result<T>>,
    {
        self.retry
            .call(&self.stats, "ARM", op, f, |op, e| error::map(op, &e))
            .await
    }

    fn writer(&self, nsg: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.writers.lock() {
            Ok(mut w) => w.entry(nsg.to_string()).or_default().clone(),
            // A poisoned map still serializes through a fresh lock per call: fail safe,
            // the NSG's own 429s then serialize us.
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The primary IP configurations of a VMSS's NICs.
    async fn vmss_nics(&self, vmss: &discovery::Vmss) -> Result<Vec<discovery::Nic>> {
        let all = self
            .call("ListVmssNetworkInterfaces", || {
                let stream = self
                    .client
                    .network_interfaces_client()
                    .list_virtual_machine_scale_set_network_interfaces(
                        &vmss.resource_group,
                        &vmss.name,
                        &vmss.subscription,
                    )
                    .into_stream();
                async move {
                    let mut stream = stream;
                    let mut all = Vec::new();
                    while let Some(page) = stream.next().await {
                        all.extend(page?.value);
                    }
                    Ok(all)
                }
            })
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|nic| nic.properties)
            .map(|p| {
                let ip = p
                    .ip_configurations
                    .iter()
                    .find(|c| c.properties.as_ref().and_then(|p| p.primary) == Some(true))
                    .or(p.ip_configurations.first())
                    .and_then(|c| c.properties.as_ref());
                discovery::Nic {
                    nsg: p.network_security_group.and_then(|n| n.resource.id),
                    subnet: ip
                        .and_then(|c| c.subnet.as_ref())
                        .and_then(|s| s.sub_resource.id.clone()),
                    asgs: ip
                        .map(|c| {
                            c.application_security_groups
                                .iter()
                                .filter_map(|a| a.resource.id.clone())
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect())
    }

    async fn subnet(&self, id: &str) -> Result<discovery::SubnetInfo> {
        let (sub, rg, vnet, name) = discovery::subnet_parts(id)
            .ok_or_else(|| invalid(format!("{id:?} is not a subnet id")))?;
        let s = self
            .call("GetSubnet", || {
                let fut = self
                    .client
                    .subnets_client()
                    .get(&rg, &vnet, &name, &sub)
                    .send();
                async move { fut.await?.into_body().await }
            })
            .await?;
        let p = s.properties.unwrap_or_default();
        Ok(discovery::SubnetInfo {
            nsg: p.network_security_group.and_then(|n| n.resource.id),
            prefixes: plural(&p.address_prefix, &p.address_prefixes),
            ip_configurations: p
                .ip_configurations
                .iter()
                .filter_map(|c| c.sub_resource.id.clone())
                .collect(),
        })
    }

    /// Discovers a pool's NSG (when `want_nsg`) and destination from its VMSS NICs.
    async fn discover(
        &self,
        pool: &PoolView<'_>,
        want_nsg: bool,
    ) -> Result<(Option<String>, discovery::Found)> {
        let vmss = discovery::pool_vmss(pool.name, pool.nodes)?;
        let key = (
            pool.name.to_string(),
            vmss.iter().cloned().collect::<Vec<_>>(),
        );
        let ttl = Duration::from_secs(self.config.resolution_cache_seconds);
        if let Some((at, nsg, found)) = self
            .resolutions
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
            && at.elapsed() < ttl
            && (nsg.is_some() || !want_nsg)
        {
            return Ok((nsg, found));
        }
        let as_discovery = |e: Error| {
            let message = format!(
                "pool {}: cannot read its VMSS network interfaces: {}; or set pools.{}.azure.networkSecurityGroup and a destination",
                pool.name, e.message, pool.name
            );
            e.into_discovery(message)
        };
        let mut nics = Vec::new();
        for v in &vmss {
            nics.extend(self.vmss_nics(v).await.map_err(as_discovery)?);
        }
        if nics.is_empty() {
            return Err(Error::new(
                ErrorKind::Discovery,
                format!("pool {}: its VMSS have no network interfaces", pool.name),
            ));
        }
        let mut subnets = BTreeMap::new();
        let ids: BTreeSet<String> = nics.iter().filter_map(|n| n.subnet.clone()).collect();
        for id in ids {
            let info = self.subnet(&id).await.map_err(as_discovery)?;
            subnets.insert(id.to_ascii_lowercase(), info);
        }
        let nsg = if want_nsg {
            Some(discovery::choose_nsg(pool.name, &nics, &subnets)?)
        } else {
            None
        };
        let found = discovery::choose_destination(&vmss, &nics, &subnets);
        if let Ok(mut c) = self.resolutions.lock() {
            c.retain(|(p, _), _| p != pool.name.as_str());
            c.insert(key, (Instant::now(), nsg.clone(), found.clone()));
        }
        info!(pool = %pool.name, nsg = ?nsg, destination = ?found, "discovered pool target");
        Ok((nsg, found))
    }

    /// Lists every security rule of an NSG, all pages.
    async fn list_rules(&self, nsg: &NsgId) -> Result<Vec<arm::SecurityRule>> {
        self.call("ListSecurityRules", || {
            let stream = self
                .client
                .security_rules_client()
                .list(&nsg.resource_group, &nsg.name, &nsg.subscription)
                .into_stream();
            async move {
                let mut stream = stream;
                let mut all = Vec::new();
                while let Some(page) = stream.next().await {
                    all.extend(page?.value);
                }
                Ok(all)
            }
        })
        .await
    }

    /// Maps one ARM rule to a neutral rule. A rule that cannot be expressed as ours (deny,
    /// other protocols, service tags, port `*`) is never ours; it keeps no sources, so it
    /// never stands in for one of ours.
    fn to_observed(&self, r: &arm::SecurityRule) -> Option<(ObservedRule, SeenRule)> {
        let name = r.name.clone()?;
        let p = r.properties.as_ref()?;
        let marker = marker::parse(&self.cluster, p.description.as_deref());
        let protocol = match p.protocol {
            ArmProtocol::Tcp => Some(Protocol::Tcp),
            ArmProtocol::Udp => Some(Protocol::Udp),
            _ => None,
        };
        let sources_text = plural(&p.source_address_prefix, &p.source_address_prefixes);
        let sources: Option<Vec<IpNet>> = sources_text
            .iter()
            .map(|s| marker::parse_prefix(s))
            .collect();
        let ports_text = plural(&p.destination_port_range, &p.destination_port_ranges);
        let ports: Option<Vec<PortRange>> = ports_text.iter().map(|s| s.parse().ok()).collect();
        let dst_text = plural(
            &p.destination_address_prefix,
            &p.destination_address_prefixes,
        );
        let destination = match (
            dst_text.as_slice(),
            p.destination_application_security_groups.as_slice(),
        ) {
            ([], [asg]) => asg.resource.id.clone().map(Destination::Asg),
            (d, []) if !d.is_empty() => d
                .iter()
                .map(|s| marker::parse_prefix(s))
                .collect::<Option<Vec<_>>>()
                .map(Destination::Prefixes),
            _ => None,
        };
        let source_port_any = plural(&p.source_port_range, &p.source_port_ranges)
            .iter()
            .all(|s| s == "*");
        let family = sources
            .as_ref()
            .and_then(|s| s.first())
            .map_or(IpFamily::V4, IpFamily::of);
        let mappable = p.access == SecurityRuleAccess::Allow
            && source_port_any
            && protocol.is_some()
            && p.source_application_security_groups.is_empty()
            && sources
                .as_ref()
                .is_some_and(|s| !s.is_empty() && s.iter().all(|n| IpFamily::of(n) == family))
            && ports.as_ref().is_some_and(|p| !p.is_empty())
            && destination.is_some();
        let (owned, pools, services, hash) = match (&marker, mappable) {
            (Marker::Inline { pools, services }, true) => {
                (true, pools.clone(), services.clone(), None)
            }
            (Marker::Hashed { pools, hash }, true) => {
                let (known_pools, services) = self.book.resolve(hash).unwrap_or_default();
                let pools = pools.clone().unwrap_or(known_pools);
                (true, pools, services, Some(hash.clone()))
            }
            _ => (false, Default::default(), Default::default(), None),
        };
        let mut ports = ports.unwrap_or_default();
        ports.sort();
        let mut sources = if mappable {
            sources.unwrap_or_default()
        } else {
            Vec::new()
        };
        sources.sort();
        let rule = Rule {
            name: Some(name.clone()),
            content: RuleContent {
                scope: Some(match &destination {
                    Some(d) => d.scope(),
                    None => format!("other:{}", dst_text.join(",")),
                }),
                family,
                protocol: protocol.unwrap_or(Protocol::Tcp),
                ports,
                sources,
            },
            services,
            pools,
        };
        let seen = SeenRule {
            priority: p.priority,
            owned,
            marker_hash: hash,
        };
        Some((
            ObservedRule {
                id: Some(name),
                rule,
                owned,
            },
            seen,
        ))
    }

    /// Lists an NSG, remembers what it saw, and returns the inbound rules with the limits
    /// that apply to us.
    async fn observe_nsg(&self, nsg: &NsgId) -> Result<(Observation, SeenNsg)> {
        let all = self.list_rules(nsg).await?;
        let band = self.config.priority_band;
        let mut rules = Vec::new();
        let mut seen = SeenNsg::default();
        let mut outbound = 0usize;
        // Source prefixes the planner does not see: outbound rules', and inbound foreign
        // rules' that are not plain prefixes (service tags, `*`).
        let mut hidden_sources = 0usize;
        // Destination prefixes of outbound rules, which the planner does not see.
        let mut hidden_destinations = 0usize;
        let (mut foreign_in_band, mut ours_outside_band) = (0usize, 0usize);
        for r in &all {
            if let Some(name) = &r.name {
                seen.names.insert(name.clone());
            }
            let Some(p) = r.properties.as_ref() else {
                continue;
            };
            let source_count = plural(&p.source_address_prefix, &p.source_address_prefixes).len();
            if p.direction != SecurityRuleDirection::Inbound {
                outbound += 1;
                hidden_sources += source_count;
                hidden_destinations += plural(
                    &p.destination_address_prefix,
                    &p.destination_address_prefixes,
                )
                .len();
                continue;
            }
            let Some((observed, s)) = self.to_observed(r) else {
                continue;
            };
            seen.priorities.insert(s.priority);
            if observed.owned {
                if !band.contains(s.priority) {
                    ours_outside_band += 1;
                }
            } else {
                hidden_sources += source_count.saturating_sub(observed.rule.content.sources.len());
                if band.contains(s.priority) {
                    foreign_in_band += 1;
                }
            }
            if let Some(id) = &observed.id {
                seen.rules.insert(id.clone(), s);
            }
            rules.push(observed);
        }
        let foreign_inbound = rules.iter().filter(|r| !r.owned).count();
        // Our rules may number at most the free slots of the band (plus ours that kept a
        // priority outside it): a full band is a rule quota error in the plan.
        let band_room = band.size().saturating_sub(foreign_in_band) + ours_outside_band;
        let by_quota = self.config.rule_quota.saturating_sub(outbound);
        let max_rules = by_quota.min(foreign_inbound + band_room);
        let max_rules_reason = (foreign_inbound + band_room < by_quota).then(|| {
            format!(
                "the priority band {}-{} has room for {band_room} rules of ours: {foreign_in_band} of its priorities are held by rules of others; widen azure.priorityBand",
                band.from, band.to
            )
        });
        debug!(nsg = %nsg.name, rules = all.len(), outbound, foreign_in_band, band_room, max_rules, "observed NSG");
        if let Ok(mut m) = self.seen.lock() {
            m.insert(nsg.id(), seen.clone());
        }
        let observation = Observation {
            rules,
            limits: Limits {
                max_rules: Some(max_rules),
                rules_counted_per_family: false,
                max_ports_per_rule: self.config.max_port_ranges_per_rule,
                max_sources_per_rule: self.config.max_sources_per_rule,
                max_total_sources: Some(
                    self.config
                        .source_prefix_quota
                        .saturating_sub(hidden_sources),
                ),
                max_total_destinations: Some(
                    self.config
                        .destination_prefix_quota
                        .saturating_sub(hidden_destinations),
                ),
                max_rules_reason,
                updates_in_place: true,
            },
        };
        Ok((observation, seen))
    }

    fn cached_seen(&self, nsg: &NsgId) -> Option<SeenNsg> {
        self.seen.lock().ok()?.get(&nsg.id()).cloned()
    }

    fn forget_seen(&self, nsg: &NsgId) {
        if let Ok(mut m) = self.seen.lock() {
            m.remove(&nsg.id());
        }
    }

    /// The last observation of `nsg`, re-read when it does not know all of `names`.
    async fn seen_rules(&self, nsg: &NsgId, names: &[&str]) -> Result<SeenNsg> {
        if let Some(seen) = self.cached_seen(nsg)
            && names.iter().all(|n| seen.rules.contains_key(*n))
        {
            return Ok(seen);
        }
        Ok(self.observe_nsg(nsg).await?.1)
    }

    async fn bearer(&self) -> Result<String> {
        self.credential
            .get_token(&[self.token_scope.as_str()])
            .await
            .map(|t| format!("Bearer {}", t.token.secret()))
            .map_err(|e| error::map("GetToken", &e))
    }

    /// Polls a long-running operation at `url` until it is done or `deadline` passes.
    /// `async_op`: an `Azure-AsyncOperation` URL, whose body says `status`; otherwise a
    /// `Location` URL, which answers 202 while running and 200/204 when done.
    async fn poll(
        &self,
        what: &str,
        url: &str,
        async_op: bool,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        let url = Url::parse(url)
            .map_err(|e| invalid(format!("{what}: bad polling URL {url:?}: {e}")))?;
        let too_late = || {
            Error::new(
                ErrorKind::Transient,
                format!(
                    "{what}: not finished within {}s (azure.operationTimeoutSeconds); the next reconcile re-reads the NSG",
                    self.config.operation_timeout_seconds
                ),
            )
        };
        let mut wait = Duration::ZERO;
        loop {
            // Compared, not added: a Retry-After from ARM can be any size.
            if deadline.saturating_duration_since(tokio::time::Instant::now()) < wait {
                return Err(too_late());
            }
            tokio::time::sleep(wait).await;
            let auth = self.bearer().await?;
            // The poll's own retries count against the same deadline.
            let polled = tokio::time::timeout_at(
                deadline,
                self.call("PollOperation", || {
                    let mut req = Request::new(url.clone(), Method::Get);
                    req.insert_header(AUTHORIZATION, auth.clone());
                    let http = self.http.clone();
                    async move {
                        let rsp = http::send(http.as_ref(), &req, ATTEMPT_TIMEOUT).await?;
                        let status = u16::from(rsp.status());
                        let after = http::retry_after(rsp.headers());
                        let body = rsp.into_body().collect().await?;
                        Ok((status, after, body))
                    }
                }),
            )
            .await;
            let (status, after, body) = polled.map_err(|_| too_late())??;
            wait = after
                .unwrap_or_else(|| self.config.poll_interval())
                .max(Duration::from_millis(10));
            if async_op {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                match v.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                    "Succeeded" => return Ok(()),
                    "Failed" | "Canceled" => {
                        let e = v.get("error").cloned().unwrap_or_default();
                        let code = e.get("code").and_then(|c| c.as_str()).map(str::to_string);
                        let message = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
                        let arm = error::ArmError {
                            status: 200,
                            code,
                            message: Some(format!("operation failed: {message}")),
                            retry_after: None,
                        };
                        return Err(error::from_arm(what, &arm));
                    }
                    _ => continue,
                }
            } else if status != 202 {
                return Ok(());
            }
        }
    }

    /// PUTs one rule at `priority` and waits for it.
    async fn put_rule(&self, nsg: &NsgId, rule: &Rule, priority: i32) -> Result<()> {
        let name = rule
            .name
            .clone()
            .ok_or_else(|| invalid("an NSG rule needs a name"))?;
        let body = security_rule(&self.cluster, rule, priority)?;
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout();
        let op_url = self
            .call("PutSecurityRule", || {
                let fut = self
                    .client
                    .security_rules_client()
                    .create_or_update(
                        &nsg.resource_group,
                        &nsg.name,
                        &name,
                        body.clone(),
                        &nsg.subscription,
                    )
                    .send();
                async move {
                    let rsp = fut.await?;
                    Ok(rsp
                        .as_raw_response()
                        .headers()
                        .get_optional_string(&AZURE_ASYNCOPERATION))
                }
            })
            .await?;
        if let Some(url) = op_url {
            self.poll(&format!("PUT rule {name}"), &url, true, deadline)
                .await?;
        }
        Ok(())
    }

    /// DELETEs one rule and waits for it. A rule already gone is not an error.
    async fn delete_rule(&self, nsg: &NsgId, name: &str) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout();
        let r = self
            .call("DeleteSecurityRule", || {
                let fut = self
                    .client
                    .security_rules_client()
                    .delete(&nsg.resource_group, &nsg.name, name, &nsg.subscription)
                    .send();
                async move {
                    let rsp = fut.await?;
                    let raw = rsp.as_raw_response();
                    Ok((
                        u16::from(raw.status()),
                        raw.headers().get_optional_string(&LOCATION),
                    ))
                }
            })
            .await;
        match r {
            Ok((204, _)) => Ok(false),
            Ok((_, Some(url))) => {
                self.poll(&format!("DELETE rule {name}"), &url, false, deadline)
                    .await?;
                Ok(true)
            }
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// PUTs a new rule at a free priority of the band. When another writer takes that
    /// priority first (400 `SecurityRuleConflict`), re-reads the NSG and picks another.
    async fn add_rule(&self, nsg: &NsgId, rule: &Rule, free: &mut BTreeSet<i32>) -> Result<i32> {
        let mut conflicts = 0;
        loop {
            let Some(priority) = free.pop_first() else {
                return Err(Error::new(
                    ErrorKind::QuotaExceeded,
                    format!(
                        "no free priority in the band {}-{} of NSG {} (azure.priorityBand)",
                        self.config.priority_band.from, self.config.priority_band.to, nsg.name
                    ),
                ));
            };
            match self.put_rule(nsg, rule, priority).await {
                Ok(()) => return Ok(priority),
                Err(e)
                    if e.code.as_deref() == Some("SecurityRuleConflict")
                        && conflicts < self.config.max_priority_conflicts =>
                {
                    conflicts += 1;
                    warn!(nsg = %nsg.name, priority, error = %e, "priority taken meanwhile; re-reading the NSG");
                    let seen = self.observe_nsg(nsg).await?.1;
                    if let Some(name) = rule.name.as_deref().filter(|n| seen.names.contains(*n)) {
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            format!(
                                "a rule named {name} appeared on NSG {} meanwhile; not overwriting it (the next reconcile re-reads the NSG)",
                                nsg.name
                            ),
                        ));
                    }
                    free.retain(|p| !seen.priorities.contains(p));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn remove_rules(
        &self,
        nsg: &NsgId,
        removes: &[&Change],
        seen: &SeenNsg,
        report: &mut ApplyReport,
    ) -> Result<()> {
        for c in removes {
            let Some(name) = c.id.as_deref() else {
                continue;
            };
            let existed = seen.rules.contains_key(name) && self.delete_rule(nsg, name).await?;
            if existed {
                report.removed += 1;
            } else {
                report
                    .notes
                    .push(format!("rule {name} no longer exists; nothing to do"));
            }
        }
        Ok(())
    }

    fn free_priorities(&self, seen: &SeenNsg) -> BTreeSet<i32> {
        let band = self.config.priority_band;
        (band.from..=band.to)
            .filter(|p| !seen.priorities.contains(p))
            .collect()
    }
}

/// The prefixes or port ranges of a rule: ARM returns one in the singular field, several
/// in the plural one.
fn plural(one: &Option<String>, many: &[String]) -> Vec<String> {
    if !many.is_empty() {
        return many.to_vec();
    }
    one.iter().filter(|s| !s.is_empty()).cloned().collect()
}

/// The ARM body of one of our rules.
fn security_rule(cluster: &str, rule: &Rule, priority: i32) -> Result<arm::SecurityRule> {
    let c = &rule.content;
    let protocol = match c.protocol {
        Protocol::Tcp => ArmProtocol::Tcp,
        Protocol::Udp => ArmProtocol::Udp,
        Protocol::Sctp => return Err(invalid("NSG rules cannot allow SCTP")),
    };
    if c.sources.is_empty() || c.ports.is_empty() {
        return Err(invalid("a rule without sources or ports"));
    }
    if c.sources.iter().any(|s| IpFamily::of(s) != c.family) {
        return Err(invalid("a rule mixing IPv4 and IPv6 sources"));
    }
    let destination = c
        .scope
        .as_deref()
        .and_then(Destination::parse)
        .ok_or_else(|| invalid(format!("rule without a destination: {:?}", c.scope)))?;
    let mut p = SecurityRulePropertiesFormat::new(
        protocol,
        SecurityRuleAccess::Allow,
        priority,
        SecurityRuleDirection::Inbound,
    );
    p.description = Some(marker::description(cluster, &rule.pools, &rule.services));
    p.source_port_range = Some("*".to_string());
    let ports: Vec<String> = c.ports.iter().map(|r| r.to_string()).collect();
    match ports.as_slice() {
        [one] => p.destination_port_range = Some(one.clone()),
        _ => p.destination_port_ranges = ports,
    }
    let sources: Vec<String> = c.sources.iter().map(|s| s.trunc().to_string()).collect();
    match sources.as_slice() {
        [one] => p.source_address_prefix = Some(one.clone()),
        _ => p.source_address_prefixes = sources,
    }
    match destination {
        Destination::Prefixes(d) => {
            if d.iter().any(|n| IpFamily::of(n) != c.family) {
                return Err(invalid("a rule whose destination is of another IP family"));
            }
            let d: Vec<String> = d.iter().map(ToString::to_string).collect();
            match d.as_slice() {
                [one] => p.destination_address_prefix = Some(one.clone()),
                _ => p.destination_address_prefixes = d,
            }
        }
        Destination::Asg(id) => {
            let mut asg = ApplicationSecurityGroup::new();
            asg.resource.id = Some(id);
            p.destination_application_security_groups = vec![asg];
        }
    }
    let mut r = arm::SecurityRule::new();
    r.properties = Some(p);
    Ok(r)
}

#[async_trait]
impl Provider for AzureProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn renderer(&self) -> &dyn Render {
        &self.renderer
    }

    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        let over: AzurePoolConfig = pool.override_config(NAME)?;
        let configured_nsg = over
            .network_security_group
            .as_ref()
            .or(self.config.network_security_group.as_ref());
        let configured_destination = match (
            &over.application_security_group,
            over.destination_prefixes.as_slice(),
        ) {
            (Some(_), [_, ..]) => {
                return Err(config_error(format!(
                    "pools.{}.azure: destinationPrefixes and applicationSecurityGroup exclude each other",
                    pool.name
                )));
            }
            (Some(asg), []) => Some(Destination::Asg(asg.clone())),
            (None, [_, ..]) => {
                let nets: std::result::Result<Vec<IpNet>, String> = over
                    .destination_prefixes
                    .iter()
                    .map(|s| {
                        marker::parse_prefix(s).ok_or_else(|| {
                            format!(
                                "pools.{}.azure.destinationPrefixes: {s:?} is not a prefix",
                                pool.name
                            )
                        })
                    })
                    .collect();
                Some(Destination::Prefixes(nets.map_err(config_error)?))
            }
            (None, []) => None,
        };
        // Discovery only when something is missing, and for the destination only when the
        // nodes are VMSS instances (otherwise their IPs are the destination).
        let all_vmss = !pool.nodes.is_empty()
            && pool.nodes.iter().all(|n| {
                n.provider_id
                    .as_deref()
                    .and_then(discovery::vmss_of)
                    .is_some()
            });
        let want_nsg = configured_nsg.is_none();
        let want_destination =
            configured_destination.is_none() && self.config.discover_destination && all_vmss;
        let (found_nsg, found) = if want_nsg || want_destination {
            self.discover(&pool, want_nsg).await?
        } else {
            (None, discovery::Found::NodeIps)
        };
        let nsg_text = configured_nsg.cloned().or(found_nsg).ok_or_else(|| {
            Error::new(
                ErrorKind::Discovery,
                format!(
                    "pool {}: no NSG: set azure.networkSecurityGroup, or pools.{}.azure.networkSecurityGroup",
                    pool.name, pool.name
                ),
            )
        })?;
        let nsg = NsgId::parse(&nsg_text).map_err(|e| {
            config_error(format!(
                "pools.{}.azure.networkSecurityGroup: {e}",
                pool.name
            ))
        })?;
        let destination = match (configured_destination, found) {
            (Some(d), _) => d,
            (None, discovery::Found::Asg(id)) => Destination::Asg(id),
            (None, discovery::Found::Subnet(prefixes)) => Destination::Prefixes(
                prefixes
                    .iter()
                    .filter_map(|p| marker::parse_prefix(p))
                    .collect(),
            ),
            (None, discovery::Found::NodeIps) => {
                // The pool's node IPs: refreshed on every reconcile as nodes come and go.
                let mut ips = Vec::new();
                for node in pool.nodes {
                    for ip in &node.internal_ips {
                        match marker::parse_prefix(ip) {
                            Some(n) => ips.push(n),
                            None => {
                                warn!(node = %node.name, ip, "ignoring an InternalIP that is not an address")
                            }
                        }
                    }
                }
                if ips.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Discovery,
                        format!(
                            "pool {}: no node with an InternalIP to use as destination; set pools.{}.azure.destinationPrefixes or applicationSecurityGroup",
                            pool.name, pool.name
                        ),
                    ));
                }
                Destination::Prefixes(ips)
            }
        };
        if destination.prefix_count() == 0 && matches!(destination, Destination::Prefixes(_)) {
            return Err(Error::new(
                ErrorKind::Discovery,
                format!("pool {}: its subnet has no address prefix", pool.name),
            ));
        }
        Ok(vec![PoolTarget {
            target: Target::new(NAME, &nsg.id()),
            scope: Some(destination.scope()),
        }])
    }

    async fn observe(&self, target: &Target) -> Result<Observation> {
        let nsg = NsgId::parse(&target.id).map_err(invalid)?;
        self.observe_nsg(&nsg).await.map(|(o, _)| o)
    }

    /// ARM has no dry run: only the read is checked. Missing write or delete permissions
    /// show at apply as `AuthorizationFailed`, naming the action.
    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        match self.observe(target).await {
            Ok(_) => Ok(Vec::new()),
            Err(e) if e.kind == ErrorKind::PermissionDenied => Ok(vec![format!(
                "Microsoft.Network/networkSecurityGroups/securityRules/read ({e})"
            )]),
            Err(e) => Err(e),
        }
    }

    async fn apply(&self, plan: &TargetPlan) -> Result<ApplyReport> {
        let Writes {
            removes,
            updates,
            adds,
            existing: names,
        } = Writes::of(plan)?;
        let nsg = NsgId::parse(&plan.target.id).map_err(invalid)?;
        let writer = self.writer(&nsg.id());
        let _one_writer = writer.lock().await;

        let seen = self.seen_rules(&nsg, &names).await?;
        // Never change a rule that is not ours: check every name against what ARM said.
        for n in &names {
            if seen.rules.get(*n).is_some_and(|s| !s.owned) {
                return Err(invalid(format!(
                    "rule {n} on NSG {} is not owned by cluster {}; refusing to change it",
                    nsg.name, self.cluster
                )));
            }
        }
        // An added rule must not take the name of a rule that exists: a PUT would replace
        // it, and it may be someone else's.
        if let Some(n) = adds
            .iter()
            .filter_map(|c| c.rule.name.as_deref())
            .find(|n| seen.names.contains(*n))
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "a rule named {n} already exists on NSG {}; not overwriting it (the next reconcile re-reads the NSG)",
                    nsg.name
                ),
            ));
        }

        let mut report = ApplyReport::default();
        let mut free = self.free_priorities(&seen);
        let result = async {
            // Adds come first, unless the plan must free room first or the band has no
            // room for the adds until removes free priorities.
            let remove_first =
                plan.remove_first || (!removes.is_empty() && free.len() < adds.len());
            if remove_first {
                self.remove_rules(&nsg, &removes, &seen, &mut report)
                    .await?;
                let fresh = self.observe_nsg(&nsg).await?.1;
                free = self.free_priorities(&fresh);
            }
            for c in &updates {
                let Some(name) = c.id.as_deref() else {
                    continue;
                };
                let Some(s) = seen.rules.get(name) else {
                    report.notes.push(format!(
                        "rule {name} no longer exists; it is added back next reconcile"
                    ));
                    continue;
                };
                let marker_only = c
                    .previous
                    .as_ref()
                    .is_some_and(|p| p.content == c.rule.content);
                if marker_only
                    && s.marker_hash
                        .as_deref()
                        .is_some_and(|h| MarkerBook::matches(h, &c.rule.pools, &c.rule.services))
                {
                    // The rule already carries this marker; only this process had not
                    // seen the list behind its hash yet.
                    continue;
                }
                let mut rule = c.rule.clone();
                rule.name = Some(name.to_string());
                self.put_rule(&nsg, &rule, s.priority).await?;
                report.updated += 1;
            }
            for c in &adds {
                let p = self.add_rule(&nsg, &c.rule, &mut free).await?;
                debug!(nsg = %nsg.name, rule = ?c.rule.name, priority = p, "rule added");
                report.added += 1;
            }
            if !remove_first {
                self.remove_rules(&nsg, &removes, &seen, &mut report)
                    .await?;
            }
            Ok::<(), Error>(())
        }
        .await;
        self.forget_seen(&nsg);
        if result.is_ok() {
            info!(nsg = %nsg.name, added = report.added, updated = report.updated, removed = report.removed, "NSG rules written");
        }
        result.map(|()| report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsg_ids() {
        let id = "/subscriptions/S1/resourceGroups/MC_rg/providers/Microsoft.Network/networkSecurityGroups/aks-agentpool-1-nsg";
        let n = NsgId::parse(id).unwrap();
        assert_eq!(n.resource_group, "MC_rg");
        assert_eq!(n.name, "aks-agentpool-1-nsg");
        assert_eq!(NsgId::parse(&n.id()).unwrap().id(), n.id());
        assert_eq!(NsgId::parse(&id.to_uppercase()).unwrap().id(), n.id());
        for bad in [
            "",
            "nsg",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v",
            "/subscriptions//resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/n",
        ] {
            assert!(NsgId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bodies_use_singular_fields_for_one_value() {
        let rule = Rule {
            name: Some("npf-c-p-1".into()),
            content: RuleContent {
                scope: Some("dst:10.0.0.4/32".into()),
                family: IpFamily::V4,
                protocol: Protocol::Tcp,
                ports: vec![
                    PortRange::single(30100),
                    PortRange {
                        from: 30200,
                        to: 30201,
                    },
                ],
                sources: vec!["10.0.0.0/8".parse().unwrap()],
            },
            services: Default::default(),
            pools: Default::default(),
        };
        let body = security_rule("c", &rule, 3000).unwrap();
        let p = body.properties.unwrap();
        assert_eq!(p.priority, 3000);
        assert_eq!(p.destination_port_ranges, vec!["30100", "30200-30201"]);
        assert_eq!(p.source_address_prefix.as_deref(), Some("10.0.0.0/8"));
        assert_eq!(p.destination_address_prefix.as_deref(), Some("10.0.0.4/32"));
        let mut v6 = rule.clone();
        v6.content.family = IpFamily::V6;
        v6.content.sources = vec!["2001:db8::/32".parse().unwrap()];
        assert!(
            security_rule("c", &v6, 3000).is_err(),
            "v6 sources with a v4 destination"
        );
    }
}

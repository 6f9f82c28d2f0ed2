//! The GCP provider of nodeport-firewall: VPC firewall rules, one target per (project,
//! network), each pool's rules scoped to the pool's network tag or service account, resolved
//! from the operator config or from the pool's instances.
//!
//! Every Compute call goes through [`GcpProvider::call`]: it is counted in [`CallStats`],
//! retried with the shared [`RetryPolicy`] (the SDK's own retries are off), and its error
//! mapped to the provider-neutral [`Error`]. Writes carry a `requestId`, so that a retried
//! write is applied once, and wait for their Operation to be DONE. No SDK type leaves this
//! crate.

pub mod config;
pub mod discovery;
pub mod error;
pub mod marker;
pub mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use google_cloud_compute_v1::client::{Firewalls, Instances};
use google_cloud_compute_v1::model::{Firewall, Operation, firewall, operation};
use ipnet::IpNet;
use nodeport_firewall_model::{
    Action, Change, IpFamily, Limits, ManualSteps, NodeSpec, Observation, ObservedRule, PoolTarget,
    PortRange, Protocol, Render, Rule, RuleContent, ServiceSet, ShapeRenderer, Target, TargetPlan,
};
use nodeport_firewall_provider::{
    ApplyReport, Error, ErrorKind, PoolView, Provider, Result, RetryPolicy, Writes,
};
use tracing::{debug, info, warn};

pub use config::{GcpConfig, GcpPoolConfig, RetrySettings};
pub use marker::Scope;
pub use stats::{CallStats, OpStats};

pub const NAME: &str = "gcp";

/// The URL prefix of Compute resources in self links, whatever endpoint the client uses.
const RESOURCE_URL: &str = "https://www.googleapis.com/compute/v1/";

/// Where the provider's credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
    /// credentials, or the metadata server (GKE Workload Identity, the node's account).
    ApplicationDefault,
    /// No credentials, for emulators and test servers.
    Anonymous,
}

type CacheKey = (String, Vec<String>);

/// The GCP VPC firewall provider.
pub struct GcpProvider {
    cluster: String,
    config: GcpConfig,
    project: String,
    firewalls: Firewalls,
    instances: Instances,
    retry: RetryPolicy,
    renderer: ShapeRenderer,
    resolutions: Mutex<HashMap<CacheKey, (Instant, Scope)>>,
    /// Per target: rule name -> whether it is ours, from the last observation.
    seen: Mutex<HashMap<String, HashMap<String, bool>>>,
    /// Service lists too long for a description, by digest, as written by this process.
    digests: Mutex<HashMap<String, ServiceSet>>,
    /// Every instance of a project, read once for all pools resolved together.
    instance_cache: tokio::sync::Mutex<HashMap<String, (Instant, Arc<InstanceMap>)>>,
    /// Targets whose writes a network admin may have to make, by target id.
    network_admin: Mutex<HashMap<String, NetworkAdmin>>,
    stats: CallStats,
}

/// Why a target's writes may need a network admin.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NetworkAdmin {
    /// The network is in another project than the pool's instances (Shared VPC).
    SharedVpc { service_projects: BTreeSet<String> },
    /// A write was refused with 403 since the last successful apply.
    Forbidden,
}

type InstanceMap = BTreeMap<discovery::InstanceKey, discovery::InstanceInfo>;

/// How long one read of a project's instances serves pools resolved after it.
const INSTANCE_CACHE_TTL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for GcpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpProvider")
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

/// The credentials setting of the `gcp:` section: `applicationDefault` or `anonymous`.
fn credential_source(section: Option<&serde_json::Value>) -> Result<CredentialSource> {
    match section
        .and_then(|s| s.get("credentials"))
        .map(|v| v.as_str())
    {
        None | Some(Some("applicationDefault")) => Ok(CredentialSource::ApplicationDefault),
        Some(Some("anonymous")) => Ok(CredentialSource::Anonymous),
        Some(other) => Err(config_error(format!(
            "gcp.credentials: {other:?} is not applicationDefault or anonymous"
        ))),
    }
}

impl GcpProvider {
    /// Reads the `gcp:` section of the operator config. Credentials are Application Default
    /// Credentials unless the section says `credentials: anonymous` (emulators and tests).
    pub async fn from_config(cluster: &str, section: Option<&serde_json::Value>) -> Result<Self> {
        let source = credential_source(section)?;
        let section = section.map(|s| {
            let mut s = s.clone();
            if let Some(o) = s.as_object_mut() {
                o.remove("credentials");
            }
            s
        });
        Self::from_config_with(cluster, section.as_ref(), source).await
    }

    /// As [`GcpProvider::from_config`], with the credentials chosen by the caller.
    pub async fn from_config_with(
        cluster: &str,
        section: Option<&serde_json::Value>,
        credentials: CredentialSource,
    ) -> Result<Self> {
        let config: GcpConfig = PoolView::section(section, NAME)?;
        let project = config
            .project
            .clone()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                config_error(
                    "gcp.project is required: the project that holds the network's firewall rules (in a Shared VPC, the host project)",
                )
            })?;
        if config.rule_budget == 0
            || config.max_ports_per_rule == 0
            || config.max_source_ranges_per_rule == 0
            || config.write_concurrency == 0
        {
            return Err(config_error(
                "gcp: ruleBudget, maxPortsPerRule, maxSourceRangesPerRule and writeConcurrency must be at least 1",
            ));
        }
        if !(0..=65535).contains(&config.priority) {
            return Err(config_error("gcp.priority must be within 0-65535"));
        }
        if !config::valid_name(&config.network) {
            return Err(config_error(format!(
                "gcp.network: {:?} is not a network name",
                config.network
            )));
        }
        // The SDK's TLS needs a process-wide rustls provider; the operator uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let timeout = Duration::from_secs(config.attempt_timeout_seconds.max(1));
        let creds = match credentials {
            CredentialSource::Anonymous => {
                Some(google_cloud_auth::credentials::anonymous::Builder::new().build())
            }
            CredentialSource::ApplicationDefault => None,
        };
        let mut fw = Firewalls::builder()
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout(timeout);
        let mut inst = Instances::builder()
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout(timeout);
        if let Some(endpoint) = &config.endpoint {
            fw = fw.with_endpoint(endpoint.clone());
            inst = inst.with_endpoint(endpoint.clone());
        }
        if let Some(c) = creds {
            fw = fw.with_credentials(c.clone());
            inst = inst.with_credentials(c);
        }
        let build_error = |e: google_cloud_gax::client_builder::Error| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "gcp: cannot build the Compute client (credentials: Application Default Credentials unless gcp.credentials says otherwise): {e}"
                ),
            )
        };
        let firewalls = fw.build().await.map_err(build_error)?;
        let instances = inst.build().await.map_err(build_error)?;
        Ok(GcpProvider {
            cluster: cluster.to_string(),
            retry: config.retry.policy(),
            project,
            config,
            firewalls,
            instances,
            renderer: ShapeRenderer::named(marker::rule_name),
            resolutions: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            network_admin: Mutex::new(HashMap::new()),
            digests: Mutex::new(HashMap::new()),
            instance_cache: tokio::sync::Mutex::new(HashMap::new()),
            stats: CallStats::new(stats::kind),
        })
    }

    /// Compute API calls made so far, by operation.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    pub fn config(&self) -> &GcpConfig {
        &self.config
    }

    /// The limits of every target, from the config.
    pub fn limits(&self) -> Limits {
        Limits {
            max_rules: Some(self.config.rule_budget),
            rules_counted_per_family: false,
            max_ports_per_rule: self.config.max_ports_per_rule,
            max_sources_per_rule: self.config.max_source_ranges_per_rule,
            max_total_sources: None,
            max_total_destinations: None,
            max_rules_reason: None,
            updates_in_place: true,
        }
    }

    /// Runs one Compute call: counted, retried when throttled or transient, errors mapped.
    async fn call<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, google_cloud_gax::error::Error>>,
    {
        self.retry
            .call(&self.stats, "Compute", op, f, |op, e| {
                error::map_sdk_error(op, &e)
            })
            .await
    }

    fn cached_resolution(&self, key: &CacheKey) -> Option<Scope> {
        let ttl = Duration::from_secs(self.config.resolution_cache_seconds);
        let cache = self.resolutions.lock().ok()?;
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, s)| s.clone())
    }

    /// Every instance of `project`, read at most once per [`INSTANCE_CACHE_TTL`]: pools
    /// resolved in the same reconcile share one read.
    /// A read that lacks one of `needed` is not reused: a node that just joined is found.
    async fn instances_of(&self, project: &str, needed: &[&str]) -> Result<Arc<InstanceMap>> {
        let mut cache = self.instance_cache.lock().await;
        if let Some((at, map)) = cache.get(project)
            && at.elapsed() < INSTANCE_CACHE_TTL
            && needed.iter().all(|k| map.contains_key(*k))
        {
            return Ok(map.clone());
        }
        let map = Arc::new(self.project_instances(project).await?);
        cache.insert(project.to_string(), (Instant::now(), map.clone()));
        Ok(map)
    }

    /// Every instance of `project` (one paginated aggregated list), by `project/zone/name`.
    async fn project_instances(
        &self,
        project: &str,
    ) -> Result<BTreeMap<discovery::InstanceKey, discovery::InstanceInfo>> {
        let mut out = BTreeMap::new();
        let mut token = String::new();
        loop {
            let page = self
                .call("instances.aggregatedList", || {
                    self.instances
                        .aggregated_list()
                        .set_project(project)
                        .set_max_results(500u32)
                        .set_page_token(token.clone())
                        .send()
                })
                .await?;
            for (scope, list) in &page.items {
                let zone = scope.strip_prefix("zones/").unwrap_or(scope);
                for i in &list.instances {
                    let Some(name) = i.name.as_deref() else {
                        continue;
                    };
                    let zone = i
                        .zone
                        .as_deref()
                        .and_then(|z| z.rsplit('/').next())
                        .unwrap_or(zone);
                    out.insert(
                        format!("{project}/{zone}/{name}"),
                        discovery::InstanceInfo {
                            tags: i.tags.as_ref().map(|t| t.items.clone()).unwrap_or_default(),
                            service_accounts: i
                                .service_accounts
                                .iter()
                                .filter_map(|s| s.email.clone())
                                .collect(),
                        },
                    );
                }
            }
            token = page.next_page_token.clone().unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        Ok(out)
    }

    /// The project and network of a target id `project/network`.
    fn split_target(target: &Target) -> Result<(&str, &str)> {
        target
            .id
            .split_once('/')
            .filter(|(p, n)| !p.is_empty() && !n.is_empty())
            .ok_or_else(|| invalid(format!("{target} is not a GCP target (project/network)")))
    }

    fn network_url(project: &str, network: &str) -> String {
        format!("{RESOURCE_URL}projects/{project}/global/networks/{network}")
    }

    /// Maps one Compute firewall rule to a neutral rule. A rule that is not a single-protocol
    /// ingress allow from source ranges to tags or a service account is never ours; it is
    /// kept, with no sources, for the budget count.
    fn to_observed(&self, fw: &Firewall) -> Option<ObservedRule> {
        let name = fw.name.clone()?;
        let parsed = marker::parse(&self.cluster, &name, fw.description.as_deref());
        let ingress = fw
            .direction
            .as_ref()
            .is_none_or(|d| *d == firewall::Direction::Ingress);
        let (protocol, ports) = match fw.allowed.as_slice() {
            [one] => (
                one.ip_protocol.as_deref().and_then(parse_protocol),
                parse_ports(&one.ports),
            ),
            _ => (None, None),
        };
        let mut sources: Vec<IpNet> = fw
            .source_ranges
            .iter()
            .filter_map(|s| s.parse::<IpNet>().ok().map(|n| n.trunc()))
            .collect();
        sources.sort();
        sources.dedup();
        let family = sources.first().map_or(IpFamily::V4, IpFamily::of);
        let scope = Scope::of(&fw.target_tags, &fw.target_service_accounts);
        let mappable = ingress
            && fw.disabled != Some(true)
            && fw.denied.is_empty()
            && protocol.is_some()
            && ports.is_some()
            && !sources.is_empty()
            && sources.len() == fw.source_ranges.len()
            && sources.iter().all(|s| IpFamily::of(s) == family)
            && fw.source_tags.is_empty()
            && fw.source_service_accounts.is_empty()
            && fw.destination_ranges.is_empty()
            && scope.is_some();
        let owned = parsed.owned && mappable;
        let mut parsed = parsed;
        if let Some(digest) = &parsed.services_digest
            && let Some(full) = self
                .digests
                .lock()
                .ok()
                .and_then(|d| d.get(digest).cloned())
        {
            parsed.services = full;
        }
        let rule = Rule {
            name: Some(name.clone()),
            content: RuleContent {
                scope: scope.map(|s| s.encode()),
                family,
                protocol: protocol.unwrap_or(Protocol::Tcp),
                ports: ports.unwrap_or_default(),
                sources: if mappable { sources } else { Vec::new() },
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
        Some(ObservedRule {
            id: Some(name),
            rule,
            owned,
        })
    }

    /// The firewall body of one neutral rule; `with_network`: the fields only an insert
    /// sets (name, network, direction).
    fn body(&self, target: &Target, rule: &Rule, with_network: bool) -> Result<Firewall> {
        let (project, network) = Self::split_target(target)?;
        let name = rule
            .name
            .clone()
            .ok_or_else(|| invalid("a GCP rule needs a name"))?;
        let scope = rule
            .content
            .scope
            .as_deref()
            .and_then(Scope::decode)
            .ok_or_else(|| {
                // Never write a rule without targets: it would apply to every instance.
                invalid(format!(
                    "rule {name} has no target tags or service account; refusing to write it"
                ))
            })?;
        if rule.content.sources.is_empty() || rule.content.ports.is_empty() {
            return Err(invalid(format!("rule {name} has no sources or no ports")));
        }
        let mut fw = Firewall::new()
            .set_allowed([firewall::Allowed::new()
                .set_ip_protocol(rule.content.protocol.as_str())
                .set_ports(rule.content.ports.iter().map(ToString::to_string))])
            .set_source_ranges(rule.content.sources.iter().map(ToString::to_string))
            .set_description(self.description(rule));
        // The targets and priority go into patches too: a rule of ours whose tags were
        // edited by hand is put back, not patched forever without converging.
        fw = fw.set_priority(self.config.priority);
        fw = match scope {
            Scope::Tags(tags) => fw.set_target_tags(tags),
            Scope::ServiceAccount(sa) => fw.set_target_service_accounts([sa]),
        };
        if with_network {
            fw = fw
                .set_name(name)
                .set_network(Self::network_url(project, network))
                .set_direction(firewall::Direction::Ingress);
        }
        Ok(fw)
    }

    /// Waits for a write's Operation to be DONE and checks its error.
    async fn wait(&self, project: &str, what: &str, mut op: Operation) -> Result<()> {
        let timeout = Duration::from_secs(self.config.operation_timeout_seconds);
        let deadline = Instant::now().checked_add(timeout);
        let mut pause = Duration::from_millis(self.config.operation_poll_millis.max(1));
        loop {
            if op.status == Some(operation::Status::Done) {
                return match &op.error {
                    Some(e) if !e.errors.is_empty() => {
                        let errors: Vec<(Option<String>, Option<String>)> = e
                            .errors
                            .iter()
                            .map(|x| (x.code.clone(), x.message.clone()))
                            .collect();
                        Err(error::map_operation_error(
                            what,
                            op.http_error_status_code,
                            &errors,
                        ))
                    }
                    _ => Ok(()),
                };
            }
            let name =
                op.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
                    invalid(format!("Compute {what}: an Operation without a name"))
                })?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::new(
                    ErrorKind::Transient,
                    format!(
                        "Compute {what}: operation {name} not DONE after {}s",
                        self.config.operation_timeout_seconds
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause.mul_f64(1.5)).min(Duration::from_secs(5));
            op = self
                .call(stats::OPERATION_GET, || {
                    self.firewalls
                        .get_operation()
                        .set_project(project)
                        .set_operation(name.clone())
                        .send()
                })
                .await?;
        }
    }

    async fn insert(&self, target: &Target, rule: &Rule) -> Result<()> {
        let (project, _) = Self::split_target(target)?;
        let body = self.body(target, rule, true)?;
        let request_id = request_id();
        let op = self
            .call("firewalls.insert", || {
                self.firewalls
                    .insert()
                    .set_project(project)
                    .set_request_id(request_id.clone())
                    .set_body(body.clone())
                    .send()
            })
            .await?;
        self.wait(project, "firewalls.insert", op).await
    }

    async fn patch(&self, target: &Target, name: &str, rule: &Rule) -> Result<()> {
        let (project, _) = Self::split_target(target)?;
        let body = self.body(target, rule, false)?;
        let request_id = request_id();
        let op = self
            .call("firewalls.patch", || {
                self.firewalls
                    .patch()
                    .set_project(project)
                    .set_firewall(name)
                    .set_request_id(request_id.clone())
                    .set_body(body.clone())
                    .send()
            })
            .await?;
        self.wait(project, "firewalls.patch", op).await
    }

    async fn delete(&self, target: &Target, name: &str) -> Result<()> {
        let (project, _) = Self::split_target(target)?;
        let request_id = request_id();
        let op = self
            .call("firewalls.delete", || {
                self.firewalls
                    .delete()
                    .set_project(project)
                    .set_firewall(name)
                    .set_request_id(request_id.clone())
                    .send()
            })
            .await?;
        self.wait(project, "firewalls.delete", op).await
    }

    /// Inserts a rule. A 409 (the name exists) re-reads the rule: ours is converged to the
    /// wanted content, anyone else's is left alone and reported.
    async fn add(&self, target: &Target, rule: &Rule) -> Result<Outcome> {
        match self.insert(target, rule).await {
            Ok(()) => Ok(Outcome::Added),
            Err(e) if e.kind == ErrorKind::Conflict => {
                let (project, _) = Self::split_target(target)?;
                let name = rule.name.clone().unwrap_or_default();
                let existing = self
                    .call("firewalls.get", || {
                        self.firewalls
                            .get()
                            .set_project(project)
                            .set_firewall(name.clone())
                            .send()
                    })
                    .await?;
                // Names are unique per project, not per network: ours on another network
                // (the config's network changed) is not this rule.
                let (_, network) = Self::split_target(target)?;
                let here = format!("projects/{project}/global/networks/{network}");
                if !existing
                    .network
                    .as_deref()
                    .is_some_and(|n| n.ends_with(&here))
                {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "a firewall rule named {name} already exists in project {project} on another network ({}); it is left alone. Delete it or use another clusterName",
                            existing.network.as_deref().unwrap_or("unknown")
                        ),
                    )
                    .with_code("alreadyExists"));
                }
                let observed = self.to_observed(&existing);
                match observed {
                    Some(o) if o.owned && o.rule == *rule => Ok(Outcome::Adopted(format!(
                        "rule {name} already existed as wanted (an earlier attempt or another replica); adopted"
                    ))),
                    Some(o) if o.owned => {
                        self.patch(target, &name, rule).await?;
                        Ok(Outcome::Converged(format!(
                            "rule {name} already existed with other content; updated to the plan"
                        )))
                    }
                    _ => Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "a firewall rule named {name} exists in project {project} and is not owned by cluster {}; it is left alone. Rename or delete it",
                            self.cluster
                        ),
                    )
                    .with_code("alreadyExists")),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Runs one change. `gone`: names absent from a fresh read (see `check_owned`).
    async fn run_change(
        &self,
        target: &Target,
        c: &Change,
        gone: &BTreeSet<String>,
    ) -> Result<Outcome> {
        let name = c.id.as_deref().unwrap_or_default();
        match c.action {
            Action::Add => self.add(target, &c.rule).await,
            // Absent from a fresh read: insert (whose 409 checks ownership), never patch.
            Action::Update if gone.contains(name) => {
                let mut rule = c.rule.clone();
                rule.name = Some(name.to_string());
                self.add(target, &rule).await.map(|_| {
                    Outcome::Converged(format!("rule {name} was gone when updated; created again"))
                })
            }
            Action::Remove if gone.contains(name) => Ok(Outcome::Gone(format!(
                "rule {name} no longer exists; nothing to do"
            ))),
            Action::Update => match self.patch(target, name, &c.rule).await {
                Ok(()) => Ok(Outcome::Updated),
                Err(e) if e.kind == ErrorKind::NotFound => {
                    let mut rule = c.rule.clone();
                    rule.name = Some(name.to_string());
                    self.add(target, &rule).await.map(|_| {
                        Outcome::Converged(format!(
                            "rule {name} was gone when updated; created again"
                        ))
                    })
                }
                Err(e) => Err(e),
            },
            Action::Remove => match self.delete(target, name).await {
                Ok(()) => Ok(Outcome::Removed),
                Err(e) if e.kind == ErrorKind::NotFound => Ok(Outcome::Gone(format!(
                    "rule {name} no longer exists; nothing to do"
                ))),
                Err(e) => Err(e),
            },
            _ => Ok(Outcome::Nothing),
        }
    }

    /// Runs a group of changes (indexed into the plan's writes), `write_concurrency` at a
    /// time; every change is attempted. Returns the first failure, a permission error first.
    async fn run_group(
        &self,
        target: &Target,
        changes: &[(usize, &Change)],
        gone: &BTreeSet<String>,
        report: &mut ApplyReport,
        done: &mut BTreeSet<usize>,
    ) -> Option<Error> {
        type Pending<'a> =
            std::pin::Pin<Box<dyn Future<Output = (usize, Result<Outcome>)> + Send + 'a>>;
        let futures: Vec<Pending<'_>> = changes
            .iter()
            .map(|&(i, c)| -> Pending<'_> {
                Box::pin(async move { (i, self.run_change(target, c, gone).await) })
            })
            .collect();
        let results: Vec<(usize, Result<Outcome>)> = stream::iter(futures)
            .buffer_unordered(self.config.write_concurrency)
            .collect()
            .await;
        let mut first: Option<Error> = None;
        for (i, r) in results {
            match r {
                Ok(outcome) => {
                    done.insert(i);
                    outcome.record(report);
                }
                Err(e) => {
                    warn!(target = %target, error = %e, "firewall write failed");
                    let better = first.as_ref().is_none_or(|f| {
                        f.kind != ErrorKind::PermissionDenied
                            && e.kind == ErrorKind::PermissionDenied
                    });
                    if better {
                        first = Some(e);
                    }
                }
            }
        }
        first
    }

    /// Refuses unless every rule named in `names` is ours per the last observation of
    /// `target`, re-reading it when that observation does not know them all. Returns the
    /// names absent even from a fresh read: they are not patched or deleted by name (a
    /// rule of that name could be someone else's by now) but re-created or skipped.
    async fn check_owned(&self, target: &Target, names: &[&str]) -> Result<BTreeSet<String>> {
        let seen_now = || -> Result<HashMap<String, bool>> {
            let seen = self
                .seen
                .lock()
                .map_err(|_| invalid("the observation of this target is unavailable"))?;
            Ok(seen.get(&target.id).cloned().unwrap_or_default())
        };
        let mut seen = seen_now()?;
        if !names.iter().all(|n| seen.contains_key(*n)) {
            self.observe(target).await?;
            seen = seen_now()?;
        }
        let mut gone = BTreeSet::new();
        for n in names {
            match seen.get(*n) {
                Some(true) => {}
                Some(false) => {
                    return Err(invalid(format!(
                        "rule {n} on {target} is not owned by cluster {}; refusing to change it",
                        self.cluster
                    )));
                }
                None => {
                    gone.insert((*n).to_string());
                }
            }
        }
        Ok(gone)
    }

    /// The `gcloud` commands that carry out `changes` on `target`, for a network admin.
    pub fn gcloud_commands(&self, target: &Target, changes: &[&Change]) -> Vec<String> {
        let Ok((project, network)) = Self::split_target(target) else {
            return Vec::new();
        };
        changes
            .iter()
            .filter_map(|c| {
                let rule = &c.rule;
                let rules = rule
                    .content
                    .ports
                    .iter()
                    .map(|p| format!("{}:{p}", rule.content.protocol))
                    .collect::<Vec<_>>()
                    .join(",");
                let sources = rule.sources_text();
                let description = shell_quote(&self.description(rule));
                let name = c.id.clone().or_else(|| rule.name.clone())?;
                match c.action {
                    Action::Add => {
                        let scope = rule.content.scope.as_deref().and_then(Scope::decode)?;
                        Some(format!(
                            "gcloud compute firewall-rules create {name} --project={project} --network={network} --direction=INGRESS --priority={} --action=ALLOW --rules={rules} --source-ranges={sources} {} --description={description}",
                            self.config.priority,
                            scope.gcloud_flag()
                        ))
                    }
                    Action::Update => Some(format!(
                        "gcloud compute firewall-rules update {name} --project={project} --rules={rules} --source-ranges={sources} --description={description}"
                    )),
                    Action::Remove => Some(format!(
                        "gcloud compute firewall-rules delete {name} --project={project} --quiet"
                    )),
                    _ => None,
                }
            })
            .collect()
    }
}

impl GcpProvider {
    /// Remembers a target whose network is in another project than the pool's instances:
    /// a Shared VPC, where writes usually need the host project's network admin.
    fn note_shared_vpc(&self, target: &Target, project: &str, nodes: &[NodeSpec]) {
        let service_projects: BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| {
                n.provider_id
                    .as_deref()
                    .and_then(discovery::parse_provider_id)
            })
            .map(|(p, _, _)| p.to_string())
            .filter(|p| p != project)
            .collect();
        if service_projects.is_empty() {
            return;
        }
        if let Ok(mut n) = self.network_admin.lock() {
            match n.get_mut(&target.id) {
                Some(NetworkAdmin::Forbidden) => {}
                Some(NetworkAdmin::SharedVpc {
                    service_projects: known,
                }) => known.extend(service_projects),
                None => {
                    n.insert(
                        target.id.clone(),
                        NetworkAdmin::SharedVpc { service_projects },
                    );
                }
            }
        }
    }
}

/// What one change did.
#[derive(Debug)]
enum Outcome {
    Added,
    Updated,
    Removed,
    /// The rule existed as wanted already.
    Adopted(String),
    /// The rule existed (or was gone) and was brought to the plan another way.
    Converged(String),
    Gone(String),
    Nothing,
}

impl Outcome {
    fn record(self, report: &mut ApplyReport) {
        match self {
            Outcome::Added => report.added += 1,
            Outcome::Updated => report.updated += 1,
            Outcome::Removed => report.removed += 1,
            Outcome::Adopted(note) => {
                report.added += 1;
                report.notes.push(note);
            }
            Outcome::Converged(note) => {
                report.updated += 1;
                report.notes.push(note);
            }
            Outcome::Gone(note) => report.notes.push(note),
            Outcome::Nothing => {}
        }
    }
}

/// A random UUID (version 4) for a write's `requestId`: the same on every retry of that
/// write, so that Compute applies it once.
fn request_id() -> String {
    let mut b = [0u8; 16];
    for x in &mut b {
        *x = fastrand::u8(..);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Single-quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn parse_protocol(p: &str) -> Option<Protocol> {
    match p.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Some(Protocol::Tcp),
        "udp" | "17" => Some(Protocol::Udp),
        "sctp" | "132" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// `["80", "30000-30010"]`, sorted; no ports means every port.
fn parse_ports(ports: &[String]) -> Option<Vec<PortRange>> {
    if ports.is_empty() {
        return Some(vec![PortRange {
            from: 0,
            to: u16::MAX,
        }]);
    }
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        out.push(p.parse().ok()?);
    }
    out.sort();
    out.dedup();
    Some(out)
}

#[async_trait]
impl Provider for GcpProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn renderer(&self) -> &dyn Render {
        &self.renderer
    }

    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        let over: GcpPoolConfig = pool.override_config(NAME)?;
        let project = over.project.clone().unwrap_or_else(|| self.project.clone());
        let network = over
            .network
            .clone()
            .unwrap_or_else(|| self.config.network.clone());
        if !config::valid_name(&network) {
            return Err(config_error(format!(
                "pools.{}.gcp.network: {network:?} is not a network name",
                pool.name
            )));
        }
        let target = Target::new(NAME, &format!("{project}/{network}"));
        self.note_shared_vpc(&target, &project, pool.nodes);
        let to_targets = |scope: &Scope| {
            vec![PoolTarget {
                target: target.clone(),
                scope: Some(scope.encode()),
            }]
        };
        match (&over.target_tags[..], &over.target_service_account) {
            ([_, ..], Some(_)) => {
                return Err(config_error(format!(
                    "pools.{}.gcp: give targetTags or targetServiceAccount, not both (a rule has one kind of target)",
                    pool.name
                )));
            }
            ([_, ..], None) => {
                if let Some(bad) = over.target_tags.iter().find(|t| !config::valid_name(t)) {
                    return Err(config_error(format!(
                        "pools.{}.gcp.targetTags: {bad:?} is not a network tag (RFC 1035, 1-63 characters)",
                        pool.name
                    )));
                }
                if let Some(wide) = over.target_tags.iter().find(|t| self.is_cluster_wide(t)) {
                    return Err(config_error(format!(
                        "pools.{}.gcp.targetTags: {wide} is on every node of the cluster and would open every pool; give the pool a tag of its own",
                        pool.name
                    )));
                }
                let mut tags = over.target_tags.clone();
                tags.sort();
                tags.dedup();
                return Ok(to_targets(&Scope::Tags(tags)));
            }
            ([], Some(sa)) => {
                if !config::valid_service_account(sa) {
                    return Err(config_error(format!(
                        "pools.{}.gcp.targetServiceAccount: {sa:?} is not a service account email",
                        pool.name
                    )));
                }
                return Ok(to_targets(&Scope::ServiceAccount(sa.clone())));
            }
            ([], None) => {}
        }
        let nodes = discovery::instances(pool.name, pool.nodes)?;
        let keys: Vec<String> = nodes.iter().map(|(_, k)| k.clone()).collect();
        let key = (format!("{}@{}", pool.name, target.id), keys);
        if let Some(scope) = self.cached_resolution(&key) {
            return Ok(to_targets(&scope));
        }
        // The instances of the network's project count as others too (a Shared VPC host
        // project): a tag chosen for the pool must not open its VMs.
        let projects: BTreeSet<&str> = nodes
            .iter()
            .filter_map(|(_, k)| k.split('/').next())
            .chain([project.as_str()])
            .collect();
        let mut all = BTreeMap::new();
        for p in projects {
            let needed: Vec<&str> = key
                .1
                .iter()
                .map(String::as_str)
                .filter(|k| k.split('/').next() == Some(p))
                .collect();
            let found = self.instances_of(p, &needed).await.map_err(|e| {
                let message = format!(
                    "pool {}: cannot read the instances of project {p}: {}",
                    pool.name, e.message
                );
                e.into_discovery(message)
            })?;
            all.extend(found.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let scope = discovery::choose(pool.name, &|t| self.is_cluster_wide(t), &nodes, &all)?;
        debug!(pool = %pool.name, scope = %scope.encode(), "discovered pool target");
        if let Ok(mut cache) = self.resolutions.lock() {
            cache.retain(|(p, _), _| p != &key.0);
            cache.insert(key, (Instant::now(), scope.clone()));
        }
        Ok(to_targets(&scope))
    }

    async fn observe(&self, target: &Target) -> Result<Observation> {
        let (project, network) = Self::split_target(target)?;
        let filter = format!("network = \"{}\"", Self::network_url(project, network));
        let mut token = String::new();
        let mut rules = Vec::new();
        let mut seen = HashMap::new();
        loop {
            let page = self
                .call("firewalls.list", || {
                    self.firewalls
                        .list()
                        .set_project(project)
                        .set_filter(filter.clone())
                        .set_max_results(500u32)
                        .set_page_token(token.clone())
                        .send()
                })
                .await?;
            for fw in &page.items {
                if let Some(o) = self.to_observed(fw) {
                    if let Some(id) = &o.id {
                        seen.insert(id.clone(), o.owned);
                    }
                    rules.push(o);
                }
            }
            token = page.next_page_token.clone().unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        if let Ok(mut s) = self.seen.lock() {
            s.insert(target.id.clone(), seen);
        }
        Ok(Observation {
            rules,
            limits: self.limits(),
        })
    }

    /// `compute.firewalls.list` by listing; the write permissions by
    /// `firewalls.testIamPermissions` on a rule of the network (any rule: they inherit the
    /// project's policy). A network without rules cannot be checked for writes.
    async fn preflight(&self, target: &Target) -> Result<Vec<String>> {
        let obs = match self.observe(target).await {
            Ok(o) => o,
            Err(e) if e.kind == ErrorKind::PermissionDenied => {
                return Ok(vec!["compute.firewalls.list".to_string()]);
            }
            Err(e) => return Err(e),
        };
        let Some(probe) = obs.rules.iter().find_map(|r| r.id.clone()) else {
            return Ok(Vec::new());
        };
        let (project, _) = Self::split_target(target)?;
        let wanted: Vec<String> = [
            "compute.firewalls.get",
            "compute.firewalls.create",
            "compute.firewalls.update",
            "compute.firewalls.delete",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let granted = self
            .call("firewalls.testIamPermissions", || {
                self.firewalls
                    .test_iam_permissions()
                    .set_project(project)
                    .set_resource(probe.clone())
                    .set_body(
                        google_cloud_compute_v1::model::TestPermissionsRequest::new()
                            .set_permissions(wanted.clone()),
                    )
                    .send()
            })
            .await?;
        Ok(wanted
            .into_iter()
            .filter(|w| !granted.permissions.contains(w))
            .collect())
    }

    /// In a Shared VPC, or after a write was refused with 403, the `gcloud` commands the
    /// host project's network admin runs, as the GCE cloud provider prints them.
    fn manual_steps(&self, plan: &TargetPlan) -> Option<ManualSteps> {
        let why = self
            .network_admin
            .lock()
            .ok()?
            .get(&plan.target.id)
            .cloned()?;
        let (project, _) = Self::split_target(&plan.target).ok()?;
        let writes: Vec<&Change> = plan
            .changes
            .iter()
            .filter(|c| c.action.is_write())
            .collect();
        let commands = self.gcloud_commands(&plan.target, &writes);
        if commands.is_empty() {
            return None;
        }
        let reason = match why {
            NetworkAdmin::SharedVpc { service_projects } => format!(
                "Shared VPC: the network is in host project {project}, the nodes in {}. If these credentials may not write firewall rules in {project}, its network admin must run",
                service_projects.into_iter().collect::<Vec<_>>().join(", ")
            ),
            NetworkAdmin::Forbidden => format!(
                "writes to firewall rules of project {project} were refused (403) for these credentials; a network admin of {project} must run"
            ),
        };
        Some(ManualSteps { reason, commands })
    }

    async fn apply(&self, plan: &TargetPlan) -> Result<ApplyReport> {
        let Writes {
            removes,
            updates,
            adds,
            existing: names,
        } = Writes::of(plan)?;
        let target = &plan.target;

        // Never change a rule that is not ours: check every name against what Compute said.
        let gone = if names.is_empty() {
            BTreeSet::new()
        } else {
            self.check_owned(target, &names).await?
        };
        let all: Vec<&Change> = removes
            .iter()
            .chain(updates.iter())
            .chain(adds.iter())
            .copied()
            .collect();
        let indexed: Vec<(usize, &Change)> = all.iter().copied().enumerate().collect();
        let (r, rest) = indexed.split_at(removes.len());
        let (u, a) = rest.split_at(updates.len());
        let phases: [&[(usize, &Change)]; 3] = if plan.remove_first {
            [r, u, a]
        } else {
            // Add before revoke: a Service never loses access while its rules move.
            [u, a, r]
        };
        let mut report = ApplyReport::default();
        let mut done = BTreeSet::new();
        let mut failure = None;
        for phase in phases {
            if phase.is_empty() {
                continue;
            }
            if let Some(e) = self
                .run_group(target, phase, &gone, &mut report, &mut done)
                .await
            {
                failure = Some(e);
                break;
            }
        }
        if let Ok(mut s) = self.seen.lock() {
            s.remove(&target.id);
        }
        match failure {
            None => {
                if let Ok(mut n) = self.network_admin.lock()
                    && n.get(&target.id) == Some(&NetworkAdmin::Forbidden)
                {
                    n.remove(&target.id);
                }
                info!(target = %target, added = report.added, updated = report.updated, removed = report.removed, "applied firewall changes");
                Ok(report)
            }
            Some(mut e) if e.kind == ErrorKind::PermissionDenied => {
                if let Ok(mut n) = self.network_admin.lock() {
                    n.insert(target.id.clone(), NetworkAdmin::Forbidden);
                }
                let pending: Vec<&Change> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !done.contains(i))
                    .map(|(_, c)| *c)
                    .collect();
                let (project, _) = Self::split_target(target)?;
                let commands = self.gcloud_commands(target, &pending);
                let reason = e.code.take().map(|c| format!(" ({c})")).unwrap_or_default();
                e.message = format!(
                    "{}{reason}. Writes to firewall rules of project {project} are forbidden for these credentials; in a Shared VPC the host project's network admin must make them. Firewall change required by network admin ({} command(s)):\n{}",
                    e.message,
                    commands.len(),
                    commands.join("\n")
                );
                Err(e)
            }
            Some(e) => Err(e),
        }
    }
}

impl GcpProvider {
    /// The marker of a rule; a Service list cut to fit is remembered by its digest, so that
    /// the rule reads back as written.
    fn description(&self, rule: &Rule) -> String {
        let (text, digest) =
            marker::description_and_digest(&self.cluster, &rule.pools, &rule.services);
        if let Some(d) = digest
            && let Ok(mut m) = self.digests.lock()
        {
            m.insert(d, rule.services.clone());
        }
        text
    }

    fn is_cluster_wide(&self, tag: &str) -> bool {
        discovery::is_gke_cluster_tag(tag) || self.config.cluster_wide_tags.iter().any(|t| t == tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuids() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
    }

    #[test]
    fn ports_parse_and_sort() {
        let p = |v: &[&str]| parse_ports(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            p(&["30090-30091", "30080"]),
            Some(vec![
                PortRange::single(30080),
                PortRange {
                    from: 30090,
                    to: 30091
                }
            ])
        );
        assert_eq!(p(&[]), Some(vec![PortRange { from: 0, to: 65535 }]));
        assert_eq!(p(&["x"]), None);
        assert_eq!(p(&["20-10"]), None);
        assert_eq!(parse_protocol("TCP"), Some(Protocol::Tcp));
        assert_eq!(parse_protocol("17"), Some(Protocol::Udp));
        assert_eq!(parse_protocol("icmp"), None);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote(r#"{"a":"b"}"#), r#"'{"a":"b"}'"#);
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}

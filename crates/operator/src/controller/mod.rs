//! The in-cluster controller behind `nodeport-firewall run`.
//!
//! Reflectors keep stripped Services and Nodes in memory. Nothing is planned before every
//! cache has synced. One reconcile loop replans all pools from the full state whenever a
//! relevant change arrives (debounced and coalesced) and on every resync. Work is keyed by
//! target: a change re-reads and writes only the targets whose plan it changes (the others
//! are planned against what was last read there), a resync re-reads every target, and the
//! engine applies each target's plan with exactly one writer per target and bounded
//! concurrency. Only the leader reconciles; the provider is wrapped ([`gate`]) so that every
//! apply runs inside the lease's write fence, and each cloud write is refused the moment the
//! lease is lost or about to be.

pub mod backend;
pub mod cache;
pub mod feedback;
pub mod gate;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod policy_status;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodeport_firewall_model::{
    Action, Config, NamespaceSpec, NodeSpec, Plan, PolicySource, ServiceRef, ServiceSpec, Tenancy,
    desired_with,
};
use nodeport_firewall_provider::engine::{self, ApplyOutcome, Observed};
use nodeport_firewall_provider::{Provider, Target};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use self::cache::Caches;
use self::feedback::Publisher;
use self::gate::Gated;
use self::http::Health;
use self::leader::{Elector, Leadership, LeaseConfig};
use self::metrics::{Metrics, PoolLabels, TargetLabels};
use self::policy_status::PolicyStatusPublisher;

/// Selects rustls' `ring` crypto provider for the Kubernetes client. Both `ring` (kube) and
/// `aws-lc-rs` (the AWS SDK) are linked, so rustls cannot pick one by itself. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runtime settings of the controller.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Quiet time after a change before reconciling; further changes restart it, up to
    /// ten times this long.
    pub debounce: Duration,
    /// Reconcile this often even without changes: re-observe the clouds, repair drift.
    pub resync: Duration,
    /// Retry this soon after a reconcile that left an error (capped by `resync`).
    pub retry: Duration,
    /// Plan and report, never write to a cloud.
    pub dry_run: bool,
    /// This instance's name, in events and the Lease.
    pub identity: String,
    /// Leader election; None: this instance always writes.
    pub lease: Option<LeaseConfig>,
    /// Where to serve /healthz, /readyz and /metrics; None: not served.
    pub http_addr: Option<SocketAddr>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            debounce: Duration::from_millis(1500),
            resync: Duration::from_secs(300),
            retry: Duration::from_secs(30),
            dry_run: false,
            identity: "nodeport-firewall".into(),
            lease: None,
            http_addr: None,
        }
    }
}

/// What the controller works with.
pub struct Context {
    pub client: kube::Client,
    pub provider: Arc<dyn Provider>,
    pub config: Arc<Config>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("provider", &self.provider.name())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: kube::Client,
        provider: Arc<dyn Provider>,
        config: Config,
        settings: Settings,
    ) -> Self {
        Context {
            client,
            provider,
            config: Arc::new(config),
            settings,
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
        }
    }
}

/// The inputs of a plan.
struct Inputs {
    services: Vec<ServiceSpec>,
    nodes: Vec<NodeSpec>,
    namespaces: Vec<NamespaceSpec>,
    policies: Vec<PolicySource>,
    /// Each policy's uid and generation: not an input of the plan, but of its status
    /// (`observedGeneration`), so an edit that reads the same still reconciles.
    policy_versions: Vec<(Option<String>, Option<i64>)>,
}

/// A digest of a plan's inputs, to skip replanning when a change did not touch them
/// without keeping a second copy of every Service.
fn fingerprint(inputs: &Inputs) -> u64 {
    // Policies hold label selectors, which are not `Hash`: their JSON is.
    let policies = serde_json::to_string(&inputs.policies).unwrap_or_default();
    feedback::fingerprint(&(
        &inputs.services,
        &inputs.nodes,
        &inputs.namespaces,
        policies,
        &inputs.policy_versions,
    ))
}

fn inputs(caches: &Caches, config: &Config) -> Inputs {
    let mut services: Vec<ServiceSpec> = caches
        .services
        .state()
        .iter()
        .filter_map(|s| ServiceSpec::from_k8s(s).ok())
        .collect();
    services.sort_by(|a, b| a.service.cmp(&b.service));
    let mut nodes: Vec<NodeSpec> = caches
        .nodes
        .state()
        .iter()
        .filter_map(|n| NodeSpec::from_k8s(n, &config.pool_labels).ok())
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut namespaces: Vec<NamespaceSpec> = caches
        .namespaces
        .state()
        .iter()
        .filter_map(|n| NamespaceSpec::from_k8s(n))
        .collect();
    namespaces.sort_by(|a, b| a.name.cmp(&b.name));
    let mut policies: Vec<PolicySource> = caches
        .policies
        .state()
        .iter()
        .map(|p| crate::policy::source(p))
        .collect();
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    let mut policy_versions: Vec<(Option<String>, Option<i64>)> = caches
        .policies
        .state()
        .iter()
        .map(|p| (p.metadata.uid.clone(), p.metadata.generation))
        .collect();
    policy_versions.sort();
    Inputs {
        services,
        nodes,
        namespaces,
        policies,
        policy_versions,
    }
}

/// Runs the controller until `shutdown` completes. In-flight applies finish first; then the
/// Lease is released.
pub async fn run(
    ctx: Context,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    // Shutdown as a flag that every part can look at, and wait on, any number of times.
    let (stopping_tx, stopping) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    });
    ctx.metrics
        .resync_interval
        .set(ctx.settings.resync.as_secs_f64());
    let changed = Arc::new(Notify::new());
    let (caches, reflectors) = cache::start(
        ctx.client.clone(),
        ctx.config.pool_labels.clone(),
        changed.clone(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut background = Vec::new();
    let mut elector = None;
    let leadership = match &ctx.settings.lease {
        Some(lc) => {
            let e = Elector::new(ctx.client.clone(), lc.clone());
            let l = e.leadership();
            elector = Some(e);
            l
        }
        None => Leadership::always(),
    };
    if let Some(addr) = ctx.settings.http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        info!(addr = %addr, "serving /healthz, /readyz and /metrics");
        background.push(tokio::spawn(http::serve(
            listener,
            ctx.health.clone(),
            leadership.clone(),
            ctx.metrics.clone(),
            stop_rx.clone(),
        )));
    }
    let gated = Arc::new(Gated::new(
        ctx.provider.clone(),
        leadership.clone(),
        ctx.settings.dry_run,
        ctx.metrics.clone(),
    ));
    let mut lp = Loop {
        ctx: &ctx,
        caches: &caches,
        gated,
        leadership: leadership.clone(),
        publisher: Publisher::new(ctx.client.clone(), ctx.settings.identity.clone()),
        policy_status: PolicyStatusPublisher::new(ctx.client.clone()),
        last_inputs: None,
        observed: Observed::default(),
        stopping: stopping.clone(),
    };

    let mut elector_task = None;
    let result = async {
        let mut stop = stopping.clone();
        tokio::select! {
            r = caches.wait_until_ready() => r?,
            _ = stopped(&mut stop) => return Ok(()),
        }
        ctx.health.synced.store(true, Ordering::SeqCst);
        // Campaign only once every cache has synced: a replica that cannot see the cluster
        // (the CRD missing, RBAC) must not hold the Lease and so stop the others.
        if let Some(e) = elector.take() {
            elector_task = Some(tokio::spawn(e.run(stop_rx.clone())));
        }
        info!(
            services = caches.services.len(),
            nodes = caches.nodes.len(),
            namespaces = caches.namespaces.len(),
            policies = caches.policies.len(),
            "caches synced"
        );
        lp.event_loop(&changed).await;
        Ok(())
    }
    .await;

    // Stop: the loop is left only between reconciles, so no apply is cut off.
    let _ = stop_tx.send(true);
    for task in background.into_iter().chain(elector_task) {
        let _ = task.await;
    }
    for task in reflectors {
        task.abort();
    }
    info!("controller stopped");
    result
}

/// `from + d`, or about a year on when that overflows the clock: a huge interval (the flags
/// bound them, tests may not) means "not soon", never a panic.
fn later(from: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    from.checked_add(d)
        .or_else(|| from.checked_add(YEAR))
        .unwrap_or(from)
}

/// Completes once shutdown has begun. The guard `wait_for` returns is dropped here, so that
/// the controller's future stays `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

struct Loop<'a> {
    ctx: &'a Context,
    caches: &'a Caches,
    gated: Arc<Gated>,
    leadership: Leadership,
    publisher: Publisher,
    policy_status: PolicyStatusPublisher,
    last_inputs: Option<u64>,
    /// What each target held when last read and not written since: a change to one pool
    /// re-reads only that pool's targets. Cleared on every resync and leadership change.
    observed: Observed,
    /// True once shutdown has begun.
    stopping: watch::Receiver<bool>,
}

impl Loop<'_> {
    async fn event_loop(&mut self, changed: &Notify) {
        let mut stop = self.stopping.clone();
        let s = &self.ctx.settings;
        let mut leader_rx = self.leadership.subscribe();
        let mut dirty = true;
        let mut force = true;
        let mut first_change = Instant::now();
        let mut deadline = Instant::now();
        let mut next_resync = later(Instant::now(), s.resync);
        loop {
            let leader = self.leadership.is_leader();
            self.ctx.metrics.leader.set(i64::from(leader));
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => break,
                r = leader_rx.changed() => {
                    if r.is_err() { continue; }
                    if *leader_rx.borrow_and_update() {
                        info!(identity = %s.identity, "leading: full reconcile");
                        dirty = true;
                        force = true;
                        deadline = Instant::now();
                    } else {
                        // The next leader reports afresh; so will we, if we lead again.
                        self.ctx.metrics.clear_targets();
                        self.publisher.reset();
                        self.last_inputs = None;
                        self.observed.clear();
                    }
                }
                _ = changed.notified() => {
                    let now = Instant::now();
                    if !dirty {
                        dirty = true;
                        first_change = now;
                    }
                    deadline = later(now, s.debounce)
                        .min(later(first_change, s.debounce.saturating_mul(10)));
                }
                _ = tokio::time::sleep_until(deadline), if dirty => {
                    dirty = false;
                    if self.leadership.is_leader()
                        && let Some(retry) = self.reconcile(std::mem::take(&mut force)).await
                    {
                        next_resync = next_resync.min(later(Instant::now(), retry));
                    }
                }
                _ = tokio::time::sleep_until(next_resync) => {
                    next_resync = later(Instant::now(), s.resync);
                    if self.leadership.is_leader() {
                        info!("periodic resync");
                        dirty = false;
                        force = false;
                        if let Some(retry) = self.reconcile(true).await {
                            next_resync = next_resync.min(later(Instant::now(), retry));
                        }
                    }
                }
            }
        }
    }

    /// One reconcile of every pool from the full state. Returns Some(delay) when it should be
    /// retried sooner than the next resync.
    async fn reconcile(&mut self, force: bool) -> Option<Duration> {
        let ctx = self.ctx;
        let s = &ctx.settings;
        let inputs = inputs(self.caches, &ctx.config);
        let inputs_print = fingerprint(&inputs);
        if !force && self.last_inputs == Some(inputs_print) {
            return None;
        }
        let started = std::time::Instant::now();
        if force {
            self.observed.clear();
        }
        let tenancy = Tenancy::new(&inputs.policies, &inputs.namespaces);
        let d = desired_with(&ctx.config, &inputs.services, &inputs.nodes, &tenancy);
        drop(inputs);
        let plan =
            engine::plan_with_cache(self.gated.as_ref(), &ctx.config, &d, &mut self.observed).await;
        let applied = if s.dry_run {
            if plan.has_changes() {
                info!(
                    dry_run = true,
                    add = plan.summary.add,
                    remove = plan.summary.remove,
                    update = plan.summary.update,
                    "plan (dry run, not applied):\n{}",
                    crate::output::text(&plan, false, crate::output::Style { color: false })
                );
            }
            None
        } else if plan.has_changes() || plan.has_errors() {
            Some(engine::apply(self.gated.as_ref(), &plan).await)
        } else {
            Some(Vec::new())
        };
        // A target written to (or half written to) must be read again before its next plan.
        for (target, outcome) in applied.iter().flatten() {
            if matches!(
                outcome,
                ApplyOutcome::Applied { .. } | ApplyOutcome::Failed { .. }
            ) {
                self.observed.forget(target);
            }
        }
        let kinds = feedback::error_kinds(&plan, applied.as_deref());
        let elapsed = started.elapsed().as_secs_f64();
        let failed = self.record(&plan, applied.as_deref(), elapsed);
        ctx.health.reconciled.store(true, Ordering::SeqCst);

        if self.leadership.is_leader() {
            let had: BTreeSet<ServiceRef> = self
                .caches
                .services
                .state()
                .iter()
                .filter(|s| feedback::current_condition(s).is_some())
                .filter_map(|s| {
                    let m = &s.metadata;
                    let namespace = m.namespace.as_deref().unwrap_or("default");
                    m.name
                        .as_deref()
                        .map(|name| ServiceRef::new(namespace, name))
                })
                .collect();
            let out = feedback::Outcome {
                plan: &plan,
                applied: applied.as_deref(),
                error_kinds: &kinds,
                dry_run: s.dry_run,
            };
            let fb = feedback::decide(&out, &had);
            let leadership = &self.leadership;
            let stopping = &self.stopping;
            let keep_going = move || leadership.is_leader() && !*stopping.borrow();
            self.publisher
                .publish(fb, &self.caches.services, &keep_going)
                .await;
            self.policy_status
                .publish(&plan.policies, &self.caches.policies, &keep_going)
                .await;
        }
        self.last_inputs = Some(inputs_print);
        if failed {
            self.last_inputs = None;
            Some(s.retry.min(s.resync))
        } else {
            None
        }
    }

    /// Metrics and logs of one reconcile. True when something failed.
    fn record(
        &self,
        plan: &Plan,
        applied: Option<&[(Target, ApplyOutcome)]>,
        elapsed: f64,
    ) -> bool {
        let m = &self.ctx.metrics;
        let provider = plan.provider.clone();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let mut failed_targets: BTreeSet<&Target> = BTreeSet::new();
        let mut present: BTreeSet<TargetLabels> = BTreeSet::new();
        for tp in &plan.targets {
            let outcome =
                applied.and_then(|a| a.iter().find(|(t, _)| *t == tp.target).map(|(_, o)| o));
            let failed = tp.error.is_some()
                || matches!(
                    outcome,
                    Some(ApplyOutcome::Failed { .. } | ApplyOutcome::Refused { .. })
                );
            let labels = TargetLabels {
                provider: provider.clone(),
                target: tp.target.id.clone(),
            };
            let writes = tp.changes.iter().filter(|c| c.action.is_write()).count();
            // What was written counts, on a target that failed part-way too.
            let written = outcome
                .and_then(|o| o.written())
                .cloned()
                .unwrap_or_default();
            let count = |a: Action| tp.count(a);
            let owned_after = if applied.is_some() && !failed {
                count(Action::Add)
                    + count(Action::Update)
                    + count(Action::Unchanged)
                    + count(Action::Keep)
            } else {
                count(Action::Update)
                    + count(Action::Unchanged)
                    + count(Action::Keep)
                    + written.added
                    + count(Action::Remove).saturating_sub(written.removed)
            };
            m.rules_managed
                .get_or_create(&labels)
                .set(i64::try_from(owned_after).unwrap_or(i64::MAX));
            let pending = if applied.is_none() || failed {
                writes.saturating_sub(written.added + written.updated + written.removed)
            } else {
                0
            };
            m.pending_changes
                .get_or_create(&labels)
                .set(i64::try_from(pending).unwrap_or(i64::MAX));
            m.set_usage(&labels, &tp.usage);
            present.insert(labels.clone());
            if failed {
                failed_targets.insert(&tp.target);
                warn!(target = %tp.target, error = ?tp.error.as_ref().map(ToString::to_string), outcome = ?outcome, "target not in sync");
            } else if pending == 0 {
                m.last_sync.get_or_create(&labels).set(now);
            }
        }
        // A pool that could not be resolved has no targets in the plan: its targets keep
        // their last series, so that their sync age keeps growing and alerts.
        if plan.pools.iter().all(|p| p.error.is_none()) {
            m.retain_targets(&present);
        }
        let mut any_failed = !failed_targets.is_empty();
        for pool in &plan.pools {
            if !pool.managed {
                continue;
            }
            let labels = PoolLabels {
                pool: pool.name.as_str().to_string(),
                provider: provider.clone(),
            };
            m.reconciles.get_or_create(&labels).inc();
            m.reconcile_duration.get_or_create(&labels).observe(elapsed);
            let err = pool.error.is_some()
                || pool
                    .targets
                    .iter()
                    .any(|t| failed_targets.contains(&t.target));
            if err {
                any_failed = true;
                m.reconcile_errors.get_or_create(&labels).inc();
            }
        }
        info!(
            provider = %provider,
            pools = plan.pools.len(),
            targets = plan.targets.len(),
            reads = self.observed.last_reads,
            add = plan.summary.add,
            remove = plan.summary.remove,
            update = plan.summary.update,
            errors = plan.summary.errors,
            dry_run = self.ctx.settings.dry_run,
            seconds = elapsed,
            "reconciled"
        );
        any_failed
    }
}

//! Prometheus metrics of the controller.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub provider: String,
    pub operation: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub provider: String,
    pub target: String,
}

/// A snapshot of a provider's own per-operation call counts: (operation, calls, errors).
pub type CallSnapshot = Vec<(String, u64, u64)>;

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<PoolLabels, Counter>,
    pub reconcile_errors: Family<PoolLabels, Counter>,
    pub reconcile_duration: Family<PoolLabels, Histogram>,
    pub provider_calls: Family<CallLabels, Counter>,
    pub cloud_api_calls: Family<CallLabels, Counter>,
    pub rules_managed: Family<TargetLabels, Gauge>,
    pub pending_changes: Family<TargetLabels, Gauge>,
    pub last_sync: Family<TargetLabels, Gauge<f64, AtomicU64>>,
    pub leader: Gauge,
    /// Called at scrape time: the provider's SDK-level counts (AWS).
    cloud_source: Mutex<Option<CloudSource>>,
    cloud_seen: Mutex<BTreeMap<String, (u64, u64)>>,
}

type CloudSource = (String, Box<dyn Fn() -> CallSnapshot + Send + Sync>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nodeport_firewall");
        let reconciles = Family::<PoolLabels, Counter>::default();
        let reconcile_errors = Family::<PoolLabels, Counter>::default();
        let reconcile_duration = Family::<PoolLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
        });
        let provider_calls = Family::<CallLabels, Counter>::default();
        let cloud_api_calls = Family::<CallLabels, Counter>::default();
        let rules_managed = Family::<TargetLabels, Gauge>::default();
        let pending_changes = Family::<TargetLabels, Gauge>::default();
        let last_sync = Family::<TargetLabels, Gauge<f64, AtomicU64>>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles of a node pool, by pool and provider",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles of a node pool that left an error (plan error, failed apply), by pool and provider",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles (plan and apply), by pool and provider",
            reconcile_duration.clone(),
        );
        registry.register(
            "provider_calls",
            "Provider operations (resolve, observe, apply) by result (ok or an error kind)",
            provider_calls.clone(),
        );
        registry.register(
            "cloud_api_calls",
            "Cloud API calls as counted by the provider's SDK layer, by operation and result (ok, error), retries included",
            cloud_api_calls.clone(),
        );
        registry.register(
            "rules_managed",
            "Rules carrying this cluster's ownership marker on a target after the last reconcile",
            rules_managed.clone(),
        );
        registry.register(
            "pending_changes",
            "Writes (adds, removes, updates) the last plan holds for a target and that were not applied (dry run)",
            pending_changes.clone(),
        );
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last reconcile that left a target in sync",
            last_sync.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader Lease (or runs without leader election)",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            provider_calls,
            cloud_api_calls,
            rules_managed,
            pending_changes,
            last_sync,
            leader,
            cloud_source: Mutex::new(None),
            cloud_seen: Mutex::new(BTreeMap::new()),
        }
    }

    /// Reads cloud API call counts from `f` at every scrape.
    pub fn set_cloud_source(&self, provider: &str, f: Box<dyn Fn() -> CallSnapshot + Send + Sync>) {
        if let Ok(mut s) = self.cloud_source.lock() {
            *s = Some((provider.to_string(), f));
        }
    }

    fn refresh_cloud(&self) {
        let Ok(source) = self.cloud_source.lock() else {
            return;
        };
        let Some((provider, f)) = source.as_ref() else {
            return;
        };
        let Ok(mut seen) = self.cloud_seen.lock() else {
            return;
        };
        for (op, calls, errors) in f() {
            let prev = seen.entry(op.clone()).or_default();
            let ok_now = calls.saturating_sub(errors);
            let ok_prev = prev.0.saturating_sub(prev.1);
            let label = |result: &str| CallLabels {
                provider: provider.clone(),
                operation: op.clone(),
                result: result.to_string(),
            };
            self.cloud_api_calls
                .get_or_create(&label("ok"))
                .inc_by(ok_now.saturating_sub(ok_prev));
            self.cloud_api_calls
                .get_or_create(&label("error"))
                .inc_by(errors.saturating_sub(prev.1));
            *prev = (calls, errors);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.refresh_cloud();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

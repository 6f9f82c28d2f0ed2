//! Prometheus metrics of the controller.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use nodeport_firewall_model::plan::Usage;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct TargetLabels {
    pub provider: String,
    pub target: String,
}

/// A target's rule quota: `family` is `ipv4` or `ipv6` where the quota counts each family
/// apart (EC2), `all` where it counts them together.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct QuotaLabels {
    pub provider: String,
    pub target: String,
    pub family: String,
}

/// One quota series of a target: its labels, the headroom and the limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaFigures {
    pub labels: QuotaLabels,
    pub headroom: usize,
    pub limit: usize,
}

/// The quota series a target's plan calls for: one per family where the quota counts
/// families apart, one `all` where it counts them together, none without a limit.
pub fn quota_series(target: &TargetLabels, usage: &Usage) -> Vec<QuotaFigures> {
    let labels = |family: String| QuotaLabels {
        provider: target.provider.clone(),
        target: target.target.clone(),
        family,
    };
    if !usage.families.is_empty() {
        return usage
            .families
            .iter()
            .map(|f| QuotaFigures {
                labels: labels(f.family.to_string()),
                headroom: f.headroom,
                limit: f.limit,
            })
            .collect();
    }
    match (usage.limit, usage.headroom) {
        (Some(limit), Some(headroom)) => vec![QuotaFigures {
            labels: labels("all".into()),
            headroom,
            limit,
        }],
        _ => Vec::new(),
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Every sample name the controller exports, as a scrape shows it: counters end in
/// `_total`, histograms in `_bucket`, `_sum` and `_count`. The chart's alerts and dashboard
/// may name only these: the deploy tests (tests/tests/e2e/deploy/monitoring.rs) read this
/// list, and a test below keeps it equal to what `encode` prints.
pub const EXPORTED: &[&str] = &[
    "nodeport_firewall_reconciles_total",
    "nodeport_firewall_reconcile_errors_total",
    "nodeport_firewall_reconcile_duration_seconds_bucket",
    "nodeport_firewall_reconcile_duration_seconds_sum",
    "nodeport_firewall_reconcile_duration_seconds_count",
    "nodeport_firewall_provider_calls_total",
    "nodeport_firewall_cloud_api_calls_total",
    "nodeport_firewall_rules_managed",
    "nodeport_firewall_pending_changes",
    "nodeport_firewall_last_successful_sync_timestamp_seconds",
    "nodeport_firewall_rule_headroom",
    "nodeport_firewall_rule_limit",
    "nodeport_firewall_resync_interval_seconds",
    "nodeport_firewall_leader",
];

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
    pub rule_headroom: Family<QuotaLabels, Gauge>,
    pub rule_limit: Family<QuotaLabels, Gauge>,
    pub leader: Gauge,
    pub resync_interval: Gauge<f64, AtomicU64>,
    /// Every target with per-target series, and its quota series: what to remove when a
    /// target leaves the plan.
    targets: Mutex<BTreeMap<TargetLabels, BTreeSet<QuotaLabels>>>,
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
        let rule_headroom = Family::<QuotaLabels, Gauge>::default();
        let rule_limit = Family::<QuotaLabels, Gauge>::default();
        let leader = Gauge::default();
        let resync_interval = Gauge::<f64, AtomicU64>::default();
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
            "rule_headroom",
            "Rules that still fit under the target's rule quota after the last plan (ours and others' counted), by family (ipv4, ipv6, or all where the quota counts families together)",
            rule_headroom.clone(),
        );
        registry.register(
            "rule_limit",
            "The target's rule quota the last plan was made against, by family as for rule_headroom",
            rule_limit.clone(),
        );
        registry.register(
            "resync_interval_seconds",
            "The configured --resync-interval: every target is read and planned at least this often",
            resync_interval.clone(),
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
            rule_headroom,
            rule_limit,
            leader,
            resync_interval,
            targets: Mutex::new(BTreeMap::new()),
            cloud_source: Mutex::new(None),
            cloud_seen: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets a target's quota series from its plan's usage, and removes those its plan no
    /// longer calls for (the limit became unknown, or the quota now counts families apart).
    pub fn set_usage(&self, target: &TargetLabels, usage: &Usage) {
        let series = quota_series(target, usage);
        for s in &series {
            self.rule_headroom
                .get_or_create(&s.labels)
                .set(gauge_value(s.headroom));
            self.rule_limit
                .get_or_create(&s.labels)
                .set(gauge_value(s.limit));
        }
        let now: BTreeSet<QuotaLabels> = series.into_iter().map(|s| s.labels).collect();
        let Ok(mut targets) = self.targets.lock() else {
            return;
        };
        let before = targets
            .insert(target.clone(), now.clone())
            .unwrap_or_default();
        for gone in before.difference(&now) {
            self.rule_headroom.remove(gone);
            self.rule_limit.remove(gone);
        }
    }

    /// Removes every per-target series of the targets not in `keep`: a target that left the
    /// plan (its pool removed, its orphaned rules cleaned up) must not report a sync age
    /// that grows forever, nor a stale quota.
    pub fn retain_targets(&self, keep: &BTreeSet<TargetLabels>) {
        let Ok(mut targets) = self.targets.lock() else {
            return;
        };
        let gone: Vec<TargetLabels> = targets
            .keys()
            .filter(|t| !keep.contains(*t))
            .cloned()
            .collect();
        for target in gone {
            if let Some(quota) = targets.remove(&target) {
                self.remove_target(&target, &quota);
            }
        }
    }

    /// Removes every per-target series: an instance that lost the Lease no longer plans, and
    /// its last figures would otherwise sit next to the new leader's.
    pub fn clear_targets(&self) {
        let Ok(mut targets) = self.targets.lock() else {
            return;
        };
        for (target, quota) in std::mem::take(&mut *targets) {
            self.remove_target(&target, &quota);
        }
    }

    fn remove_target(&self, target: &TargetLabels, quota: &BTreeSet<QuotaLabels>) {
        self.rules_managed.remove(target);
        self.pending_changes.remove(target);
        self.last_sync.remove(target);
        for q in quota {
            self.rule_headroom.remove(q);
            self.rule_limit.remove(q);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use nodeport_firewall_model::IpFamily;
    use nodeport_firewall_model::plan::FamilyUsage;

    use super::*;

    fn target(id: &str) -> TargetLabels {
        TargetLabels {
            provider: "aws".into(),
            target: id.into(),
        }
    }

    fn usage(
        limit: Option<usize>,
        headroom: Option<usize>,
        families: &[(IpFamily, usize)],
    ) -> Usage {
        Usage {
            ours: 0,
            foreign: 0,
            limit,
            headroom,
            families: families
                .iter()
                .map(|&(family, headroom)| FamilyUsage {
                    family,
                    ours: 0,
                    foreign: 0,
                    limit: limit.unwrap_or_default(),
                    headroom,
                })
                .collect(),
        }
    }

    /// The sample lines of one metric: `{labels} value`, sorted.
    fn samples(m: &Metrics, name: &str) -> Vec<String> {
        let mut out: Vec<String> = m
            .encode()
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
            .map(str::to_string)
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_exported_list_is_what_a_scrape_shows() {
        let m = Metrics::new();
        let pool = PoolLabels {
            pool: "a".into(),
            provider: "aws".into(),
        };
        let call = CallLabels {
            provider: "aws".into(),
            operation: "observe".into(),
            result: "ok".into(),
        };
        m.reconciles.get_or_create(&pool).inc();
        m.reconcile_errors.get_or_create(&pool).inc();
        m.reconcile_duration.get_or_create(&pool).observe(0.1);
        m.provider_calls.get_or_create(&call).inc();
        m.set_cloud_source(
            "aws",
            Box::new(|| vec![("DescribeSecurityGroupRules".to_string(), 2, 1)]),
        );
        m.rules_managed.get_or_create(&target("sg-a")).set(1);
        m.pending_changes.get_or_create(&target("sg-a")).set(0);
        m.last_sync.get_or_create(&target("sg-a")).set(1.0);
        m.set_usage(&target("sg-a"), &usage(Some(60), Some(59), &[]));
        let page = m.encode();
        let got: BTreeSet<&str> = page
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        assert_eq!(got, EXPORTED.iter().copied().collect(), "{page}");
    }

    #[test]
    fn quota_series_follow_how_the_quota_counts_families() {
        // (usage, want: (family, headroom, limit))
        type Want = Vec<(&'static str, usize, usize)>;
        let cases: Vec<(Usage, Want)> = vec![
            (usage(None, None, &[]), vec![]),
            (usage(Some(100), Some(98), &[]), vec![("all", 98, 100)]),
            (
                usage(
                    Some(60),
                    Some(13),
                    &[(IpFamily::V4, 13), (IpFamily::V6, 60)],
                ),
                vec![("ipv4", 13, 60), ("ipv6", 60, 60)],
            ),
            // Over the quota: the planner saturates at 0, and so does the gauge.
            (usage(Some(60), Some(0), &[]), vec![("all", 0, 60)]),
        ];
        for (u, want) in cases {
            let got: Vec<(String, usize, usize)> = quota_series(&target("sg-1"), &u)
                .into_iter()
                .map(|s| (s.labels.family, s.headroom, s.limit))
                .collect();
            let want: Vec<(String, usize, usize)> = want
                .into_iter()
                .map(|(f, h, l)| (f.to_string(), h, l))
                .collect();
            assert_eq!(got, want, "{u:?}");
        }
    }

    #[test]
    fn quota_gauges_are_exported_and_replaced_per_target() {
        let m = Metrics::new();
        let a = target("sg-a");
        m.set_usage(
            &a,
            &usage(
                Some(60),
                Some(13),
                &[(IpFamily::V4, 13), (IpFamily::V6, 60)],
            ),
        );
        m.set_usage(&target("sg-b"), &usage(Some(100), Some(98), &[]));
        assert_eq!(
            samples(&m, "nodeport_firewall_rule_headroom"),
            vec![
                r#"{provider="aws",target="sg-a",family="ipv4"} 13"#,
                r#"{provider="aws",target="sg-a",family="ipv6"} 60"#,
                r#"{provider="aws",target="sg-b",family="all"} 98"#,
            ]
        );
        assert_eq!(
            samples(&m, "nodeport_firewall_rule_limit"),
            vec![
                r#"{provider="aws",target="sg-a",family="ipv4"} 60"#,
                r#"{provider="aws",target="sg-a",family="ipv6"} 60"#,
                r#"{provider="aws",target="sg-b",family="all"} 100"#,
            ]
        );
        // The limit became unknown (the target could not be read): no stale quota.
        m.set_usage(&a, &usage(None, None, &[]));
        assert_eq!(
            samples(&m, "nodeport_firewall_rule_headroom"),
            vec![r#"{provider="aws",target="sg-b",family="all"} 98"#]
        );
    }

    #[test]
    fn targets_that_left_the_plan_lose_every_series() {
        let m = Metrics::new();
        for id in ["sg-a", "sg-b"] {
            let t = target(id);
            m.rules_managed.get_or_create(&t).set(2);
            m.pending_changes.get_or_create(&t).set(0);
            m.last_sync.get_or_create(&t).set(1.0e9);
            m.set_usage(&t, &usage(Some(100), Some(98), &[]));
        }
        m.retain_targets(&BTreeSet::from([target("sg-b")]));
        for name in [
            "nodeport_firewall_rules_managed",
            "nodeport_firewall_pending_changes",
            "nodeport_firewall_last_successful_sync_timestamp_seconds",
            "nodeport_firewall_rule_headroom",
            "nodeport_firewall_rule_limit",
        ] {
            let s = samples(&m, name);
            assert_eq!(s.len(), 1, "{name}: {s:?}");
            assert!(s[0].contains(r#"target="sg-b""#), "{name}: {s:?}");
        }
        m.clear_targets();
        for name in [
            "nodeport_firewall_rules_managed",
            "nodeport_firewall_last_successful_sync_timestamp_seconds",
            "nodeport_firewall_rule_headroom",
        ] {
            assert_eq!(samples(&m, name), Vec::<String>::new(), "{name}");
        }
    }
}

//! The chart's optional monitoring: the PrometheusRule alerts and the Grafana dashboard
//! ConfigMap (`prometheusRule.enabled`, `grafanaDashboard.enabled`), rendered by `helm
//! template`. Every metric an alert or a dashboard query names must be one the binary
//! exports: the `EXPORTED` list of the controller's metrics.rs (kept equal to what it encodes
//! by a unit test there), checked against a scrape of `nodeport-firewall run` (memory
//! provider, the test API server) after its first reconcile. Labels an alert groups by must
//! be on a scraped series.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nodeport_firewall_e2e::kube_api::{ApiServer, node, service};
use serde::Serialize;
use serde_json::{Value, json};

use super::{chart, check_objects, deploy, helm, kinds, one_of_kind, render_chart};
use crate::cli::{Scratch, binary};

/// The prometheus-operator PrometheusRule, as far as the chart uses it.
#[derive(Debug, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PrometheusRule {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: PrometheusRuleSpec,
}

#[derive(Debug, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PrometheusRuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<AlertRule>,
}

#[derive(Debug, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AlertRule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// The binary running `run`, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get_metrics(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_string())
}

/// Metric names as they appear in samples, from a scrape's `# TYPE` lines: a counter `x`
/// is sampled as `x_total`, a histogram as `x_bucket`, `x_sum` and `x_count`.
fn sample_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// `EXPORTED` of crates/operator/src/controller/metrics.rs: every sample name the controller
/// can export, those of series a short run does not create too (errors, cloud API calls).
fn exported_list() -> BTreeSet<String> {
    let path = super::workspace().join("crates/operator/src/controller/metrics.rs");
    let source = std::fs::read_to_string(&path).expect("metrics.rs");
    let start = source
        .find("pub const EXPORTED: &[&str] = &[")
        .expect("metrics.rs lists EXPORTED");
    let end = start + source[start..].find("];").expect("the end of EXPORTED");
    let re = regex::Regex::new(r#""(nodeport_firewall_[a-z0-9_]+)""#).expect("regex");
    re.captures_iter(&source[start..end])
        .map(|c| c[1].to_string())
        .collect()
}

/// What the binary exports: every sample name, and every label name seen on a sample.
struct Exported {
    names: BTreeSet<String>,
    labels: BTreeSet<String>,
}

/// Scrapes `nodeport-firewall run` once its first reconcile is recorded (once per test run).
fn exported() -> &'static Exported {
    static EXPORTED: OnceLock<Exported> = OnceLock::new();
    EXPORTED.get_or_init(|| {
        let api = ApiServer::spawn();
        api.put("Node", node("n1", "a"), "ADDED");
        api.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
        let dir = Scratch::new();
        let kubeconfig = dir.path("kubeconfig");
        api.kubeconfig(&kubeconfig);
        let config = dir.write("config.yaml", "clusterName: e2e\npoolLabels: [pool]\n");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.path("run.log");
        let _run = Running(
            Command::new(binary())
                .args(["run", "--provider", "memory", "--metrics-addr", &addr])
                .arg("--config")
                .arg(&config)
                .env("KUBECONFIG", &kubeconfig)
                .env("POD_NAME", "monitoring")
                .env_remove("NPF_CONFIG")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("start nodeport-firewall run"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let page = loop {
            if let Some(page) = get_metrics(&addr)
                && page.contains("nodeport_firewall_rule_headroom{")
            {
                break page;
            }
            assert!(
                Instant::now() < deadline,
                "no reconcile recorded on /metrics; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let label = regex::Regex::new(r#"([a-z_]+)=""#).expect("regex");
        let labels = page
            .lines()
            .filter(|l| l.starts_with("nodeport_firewall_"))
            .flat_map(|l| label.captures_iter(l).map(|c| c[1].to_string()))
            .collect();
        let scraped = sample_names(&page);
        let listed = exported_list();
        assert!(
            scraped.is_subset(&listed) && scraped.len() > 5,
            "metrics.rs EXPORTED {listed:?} misses some of what the binary exports: {scraped:?}"
        );
        Exported {
            names: listed,
            labels,
        }
    })
}

/// Every `nodeport_firewall_*` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"nodeport_firewall_[a-z0-9_]+").expect("regex");
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

/// The expression names only exported metrics, groups only by exported labels, and its
/// brackets and quotes balance (no PromQL parser is at hand; `promtool` would do more).
fn check_expr(expr: &str, what: &str) {
    let exported = exported();
    let names = metric_names(expr);
    assert!(!names.is_empty(), "{what}: names no metric: {expr}");
    for name in &names {
        assert!(
            exported.names.contains(name),
            "{what}: {name} is not exported by the binary (exported: {:?})",
            exported.names
        );
    }
    let by = regex::Regex::new(r"\bby \(([^)]*)\)").expect("regex");
    for c in by.captures_iter(expr) {
        for label in c[1].split(',').map(str::trim).filter(|l| !l.is_empty()) {
            assert!(
                label == "le" || exported.labels.contains(label),
                "{what}: groups by {label}, which no series carries: {expr}"
            );
        }
    }
    let mut stack = Vec::new();
    let mut quoted = false;
    for ch in expr.chars() {
        match ch {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '(' | '{' | '[' => stack.push(ch),
            ')' | '}' | ']' => {
                let open = stack.pop();
                let want = match ch {
                    ')' => '(',
                    '}' => '{',
                    _ => '[',
                };
                assert_eq!(open, Some(want), "{what}: unbalanced {ch}: {expr}");
            }
            _ => {}
        }
    }
    assert!(
        stack.is_empty() && !quoted,
        "{what}: unclosed brackets or quotes: {expr}"
    );
}

/// Every label matcher set `{...}` in the expression.
fn selectors(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"nodeport_firewall_[a-z0-9_]+\{([^}]*)\}").expect("regex");
    re.captures_iter(expr).map(|c| c[1].to_string()).collect()
}

fn alerts(rule: &Value) -> BTreeMap<String, AlertRule> {
    let typed: PrometheusRule = serde_json::from_value(rule.clone()).expect("a PrometheusRule");
    typed
        .spec
        .groups
        .into_iter()
        .flat_map(|g| g.rules)
        .map(|r| (r.alert.clone(), r))
        .collect()
}

const ALERTS: &[&str] = &[
    "NodePortFirewallNoLeader",
    "NodePortFirewallReconcileErrors",
    "NodePortFirewallRuleHeadroomLow",
    "NodePortFirewallTargetNotSynced",
];

fn dashboard_file() -> Value {
    let text = std::fs::read_to_string(deploy().join("grafana/nodeport-firewall.json"))
        .expect("deploy/grafana/nodeport-firewall.json");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every PromQL expression of a dashboard: panel targets and template variable queries.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("a panel title").to_string();
        let targets = panel["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expr");
            out.push((title.clone(), expr.to_string()));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if var["type"] == "query" {
            let q = var["query"]["query"].as_str().expect("a variable query");
            out.push((format!("variable {}", var["name"]), q.to_string()));
        }
    }
    out
}

#[test]
fn helm_chart_renders_no_alerts_and_no_dashboard_by_default() {
    let Some(helm) = helm() else { return };
    let objects = check_objects(&render_chart(&helm, "npf", "npf", &[]), "defaults");
    assert!(!kinds(&objects).contains("PrometheusRule"), "{objects:?}");
    let dashboards: Vec<&String> = objects
        .iter()
        .filter(|(_, o)| !o["metadata"]["labels"]["grafana_dashboard"].is_null())
        .map(|(k, _)| k)
        .collect();
    assert!(dashboards.is_empty(), "{dashboards:?}");
}

#[test]
fn helm_chart_renders_the_alerts_on_exported_metrics() {
    let Some(helm) = helm() else { return };
    let source = "chart with prometheusRule";
    let objects = check_objects(
        &render_chart(
            &helm,
            "npf",
            "edge",
            &["--set", "prometheusRule.enabled=true"],
        ),
        source,
    );
    let rule = one_of_kind(&objects, "PrometheusRule", source);
    assert_eq!(rule["metadata"]["namespace"], "edge");
    let alerts = alerts(rule);
    assert_eq!(
        alerts.keys().map(String::as_str).collect::<Vec<_>>(),
        ALERTS,
        "the four alerts of docs/operations.md"
    );
    for (name, a) in &alerts {
        check_expr(&a.expr, name);
        // The chart's ServiceMonitor labels the series with the metrics Service's name.
        for sel in selectors(&a.expr) {
            assert_eq!(
                sel, r#"job="npf-nodeport-firewall-metrics",namespace="edge""#,
                "{name}"
            );
        }
        assert!(
            ["warning", "critical"].contains(&a.labels["severity"].as_str()),
            "{name}"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                a.annotations.get(key).is_some_and(|v| !v.is_empty()),
                "{name}: {key}"
            );
        }
        assert!(
            a.annotations["runbook_url"].ends_with("docs/operations.md#alerts-and-dashboard"),
            "{name}"
        );
    }
    let fors: Vec<&str> = ALERTS.iter().map(|n| alerts[*n].for_.as_str()).collect();
    assert_eq!(fors, ["5m", "15m", "15m", "5m"]);
    let headroom = &alerts["NodePortFirewallRuleHeadroomLow"].expr;
    assert!(headroom.trim_end().ends_with("< 10"), "{headroom}");
    let synced = &alerts["NodePortFirewallTargetNotSynced"].expr;
    assert!(
        synced.contains("> 3 * scalar(max(nodeport_firewall_resync_interval_seconds{"),
        "{synced}"
    );
    // Alert templates reach Prometheus unexpanded by helm.
    assert!(
        alerts["NodePortFirewallRuleHeadroomLow"].annotations["summary"]
            .contains("{{ $labels.target }}")
    );
}

#[test]
fn helm_chart_alert_values_are_applied() {
    let Some(helm) = helm() else { return };
    let source = "chart full values";
    let objects = check_objects(
        &render_chart(&helm, "x", "ops", &["-f", &super::full_values()]),
        source,
    );
    let rule = one_of_kind(&objects, "PrometheusRule", source);
    assert_eq!(rule["metadata"]["namespace"], "monitoring");
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let alerts = alerts(rule);
    for (name, a) in &alerts {
        assert_eq!(a.labels["team"], "platform", "{name}: alertLabels");
        for sel in selectors(&a.expr) {
            assert_eq!(
                sel, r#"job="edge-firewall-metrics",cluster="prod-eu""#,
                "{name}"
            );
        }
    }
    let fors: Vec<&str> = ALERTS.iter().map(|n| alerts[*n].for_.as_str()).collect();
    assert_eq!(fors, ["2m", "10m", "30m", "1m"]);
    assert!(
        alerts["NodePortFirewallRuleHeadroomLow"]
            .expr
            .trim_end()
            .ends_with("< 15")
    );
    assert!(
        alerts["NodePortFirewallTargetNotSynced"]
            .expr
            .contains("> 4 * scalar(")
    );
    let cm = &objects["ConfigMap/edge-firewall-dashboard"];
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["labels"]["team"], "platform");
    assert_eq!(
        cm["metadata"]["annotations"]["grafana_folder"],
        "Networking"
    );
}

#[test]
fn helm_chart_ships_the_dashboard_file_on_exported_metrics() {
    let Some(helm) = helm() else { return };
    let source = "chart with grafanaDashboard";
    let objects = check_objects(
        &render_chart(
            &helm,
            "npf",
            "npf",
            &["--set", "grafanaDashboard.enabled=true"],
        ),
        source,
    );
    let cm = &objects["ConfigMap/npf-nodeport-firewall-dashboard"];
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let data = cm["data"].as_object().expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["nodeport-firewall.json"]);
    let shipped: Value =
        serde_json::from_str(data["nodeport-firewall.json"].as_str().expect("a string"))
            .expect("the ConfigMap's dashboard is JSON");
    let file = dashboard_file();
    assert_eq!(
        shipped, file,
        "the chart ships deploy/grafana/nodeport-firewall.json"
    );
    assert_eq!(
        std::fs::read_to_string(chart().join("dashboards/nodeport-firewall.json")).ok(),
        std::fs::read_to_string(deploy().join("grafana/nodeport-firewall.json")).ok(),
        "the chart's copy is the same file, byte for byte"
    );

    assert_eq!(file["uid"], "nodeport-firewall");
    let titles: BTreeSet<&str> = file["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Rules per target against the quota",
        "Cloud API calls by result",
        "Reconcile latency",
    ] {
        assert!(titles.contains(want), "panel {want}: {titles:?}");
    }
    // Every panel queries through the dashboard's data source variable.
    let vars: BTreeSet<&str> = file["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(vars.contains("datasource"), "{vars:?}");
    let ids: Vec<u64> = file["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["id"].as_u64().expect("a panel id"))
        .collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "panel ids are unique"
    );
    for p in file["panels"].as_array().expect("panels") {
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"],
                json!({"type": "prometheus", "uid": "${datasource}"}),
                "{}",
                p["title"]
            );
        }
    }
    for (panel, expr) in dashboard_exprs(&file) {
        check_expr(&expr, &format!("dashboard panel {panel}"));
    }
}

/// The checks can fail: a name the binary does not export is caught.
#[test]
fn a_metric_the_binary_does_not_export_is_caught() {
    let exported = exported();
    for want in [
        "nodeport_firewall_rule_headroom",
        "nodeport_firewall_rule_limit",
        "nodeport_firewall_resync_interval_seconds",
        "nodeport_firewall_leader",
        "nodeport_firewall_reconcile_errors_total",
        "nodeport_firewall_reconcile_duration_seconds_bucket",
        "nodeport_firewall_last_successful_sync_timestamp_seconds",
    ] {
        assert!(
            exported.names.contains(want),
            "{want}: {:?}",
            exported.names
        );
    }
    for label in ["provider", "target", "family", "pool"] {
        assert!(exported.labels.contains(label), "{label}");
    }
    let bad = std::panic::catch_unwind(|| {
        check_expr("rate(nodeport_firewall_reconcile_errors[5m]) > 0", "bad")
    });
    assert!(bad.is_err(), "a counter without _total is not exported");
    let bad = std::panic::catch_unwind(|| {
        check_expr("sum by (region) (nodeport_firewall_leader)", "bad")
    });
    assert!(bad.is_err(), "no series carries a region label");
}

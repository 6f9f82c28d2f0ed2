//! The controller against an in-process test API server, through kube's real HTTP client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nodeport_firewall::controller::{self, Context, Settings};
use nodeport_firewall_e2e::kube_api::{ApiServer, node, service};
use nodeport_firewall_model::Config;
use nodeport_firewall_provider::MemoryProvider;

fn client(server: &ApiServer) -> kube::Client {
    controller::install_crypto_provider();
    let config = kube::Config::new(server.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn config() -> Config {
    Config::from_yaml(
        "clusterName: test\npoolLabels: [pool]\n",
        &nodeport_firewall::providers::names(),
    )
    .unwrap()
}

fn settings() -> Settings {
    Settings {
        debounce: Duration::from_millis(100),
        resync: Duration::from_secs(3600),
        ..Settings::default()
    }
}

/// Rules on every target: target -> sorted (ports, sources) texts of rules we own.
fn rules(p: &MemoryProvider) -> BTreeMap<String, Vec<String>> {
    p.snapshot()
        .unwrap()
        .targets
        .into_iter()
        .map(|(t, rules)| {
            let mut r: Vec<String> = rules
                .iter()
                .filter(|r| r.owner.as_deref() == Some("test"))
                .map(|r| format!("{} {}", r.rule.ports_text(), r.rule.sources_text()))
                .collect();
            r.sort();
            (t, r)
        })
        .collect()
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

fn spawn(server: &ApiServer, provider: Arc<MemoryProvider>, settings: Settings) -> Running {
    spawn_with(server, provider, settings, config())
}

fn spawn_with(
    server: &ApiServer,
    provider: Arc<MemoryProvider>,
    settings: Settings,
    config: Config,
) -> Running {
    let ctx = Context::new(client(server), provider, config, settings);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx, async move {
        let _ = rx.await;
    }));
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn memory() -> Arc<MemoryProvider> {
    Arc::new(MemoryProvider::from_config("test", None).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_then_removes_a_deleted_services_rules() {
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    server.put("Service", service("api", 30090, "10.2.0.0/16"), "ADDED");
    let p = memory();
    let run = spawn(&server, p.clone(), settings());
    eventually("two rules", || {
        rules(&p).get("a").is_some_and(|r| r.len() == 2)
    })
    .await;
    assert_eq!(
        rules(&p)["a"],
        vec![
            "30080 10.1.0.0/16".to_string(),
            "30090 10.2.0.0/16".to_string()
        ]
    );
    server.put("Service", service("api", 30090, "10.2.0.0/16"), "DELETED");
    eventually("one rule", || rules(&p)["a"].len() == 1).await;
    assert_eq!(rules(&p)["a"], vec!["30080 10.1.0.0/16".to_string()]);
    // Feedback: a Normal event and a True condition.
    let events = server.events();
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "RulesUpdated" && e["type"] == "Normal")
    );
    let patches = server.status_patches();
    assert!(patches.iter().any(|p| p["status"]["conditions"][0]["type"]
        == "NodePortFirewallSynced"
        && p["status"]["conditions"][0]["status"] == "True"));
    run.stop().await;
}

/// A pool whose last Node goes, and that the config does not list, is gone: `run` finds
/// its rules by marker and removes them, as `plan` and `apply` do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_of_a_pool_that_is_gone_are_removed_as_orphans() {
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Node", node("n2", "b"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let p = memory();
    let run = spawn(&server, p.clone(), settings());
    eventually("a rule on each pool", || {
        let r = rules(&p);
        r.get("a").is_some_and(|r| r.len() == 1) && r.get("b").is_some_and(|r| r.len() == 1)
    })
    .await;
    server.put("Node", node("n2", "b"), "DELETED");
    eventually("pool b's rule removed", || {
        rules(&p).get("b").is_some_and(|r| r.is_empty())
    })
    .await;
    assert_eq!(rules(&p)["a"], vec!["30080 10.1.0.0/16".to_string()]);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_planned_before_the_caches_sync() {
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    server.set_list_delay(Duration::from_millis(1500));
    let p = memory();
    // Pool a is in the config, so a plan from the empty view before the slow list ends
    // would resolve it (and, with no Services, plan its rules away).
    let config = Config::from_yaml(
        "clusterName: test\npoolLabels: [pool]\npools:\n  a: {}\n",
        &nodeport_firewall::providers::names(),
    )
    .unwrap();
    let run = spawn_with(&server, p.clone(), settings(), config);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        p.calls.resolves.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(p.calls.applies.load(std::sync::atomic::Ordering::SeqCst), 0);
    eventually("the rule", || {
        rules(&p).get("a").is_some_and(|r| r.len() == 1)
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_annotation_warns_and_keeps_rules() {
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let p = memory();
    let run = spawn(&server, p.clone(), settings());
    eventually("the rule", || {
        rules(&p).get("a").is_some_and(|r| r.len() == 1)
    })
    .await;
    server.put("Service", service("web", 30080, "not-a-cidr"), "MODIFIED");
    eventually("a warning", || {
        server
            .events()
            .iter()
            .any(|e| e["type"] == "Warning" && e["reason"] == "InvalidAnnotation")
    })
    .await;
    // The event and the condition are sent concurrently: wait for the condition too.
    eventually("the condition", || {
        server
            .status_patches()
            .last()
            .is_some_and(|last| last["status"]["conditions"][0]["status"] == "False")
    })
    .await;
    let patches = server.status_patches();
    let last = patches.last().unwrap();
    assert_eq!(
        last["status"]["conditions"][0]["reason"],
        "InvalidAnnotation"
    );
    assert_eq!(rules(&p)["a"], vec!["30080 10.1.0.0/16".to_string()]);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_writes_nothing() {
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let p = memory();
    let run = spawn(
        &server,
        p.clone(),
        Settings {
            dry_run: true,
            ..settings()
        },
    );
    eventually("a dry-run event", || {
        server
            .events()
            .iter()
            .any(|e| e["reason"] == "DryRunChangesPending")
    })
    .await;
    assert_eq!(p.calls.applies.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(rules(&p).is_empty(), "{:?}", rules(&p));
    // The event and the condition are sent concurrently: wait for the condition too.
    eventually("the condition", || !server.status_patches().is_empty()).await;
    let patches = server.status_patches();
    assert!(
        patches[0]["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("[dry run]")
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_without_changes_is_silent() {
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let p = memory();
    let run = spawn(
        &server,
        p.clone(),
        Settings {
            resync: Duration::from_millis(300),
            ..settings()
        },
    );
    eventually("the rule", || {
        rules(&p).get("a").is_some_and(|r| r.len() == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = server.events().len();
    let patches = server.status_patches().len();
    let applies = p.calls.applies.load(std::sync::atomic::Ordering::SeqCst);
    let observes = p.calls.observes.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        p.calls.observes.load(std::sync::atomic::Ordering::SeqCst) > observes,
        "resyncs re-observe"
    );
    assert_eq!(server.events().len(), events);
    assert_eq!(server.status_patches().len(), patches);
    assert_eq!(
        p.calls.applies.load(std::sync::atomic::Ordering::SeqCst),
        applies
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes() {
    use nodeport_firewall::controller::leader::LeaseConfig;
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let lease = |id: &str| LeaseConfig {
        namespace: "ops".into(),
        name: "npf".into(),
        identity: id.into(),
        lease_duration: Duration::from_secs(3),
        renew_period: Duration::from_millis(500),
    };
    let p1 = memory();
    let r1 = spawn(
        &server,
        p1.clone(),
        Settings {
            lease: Some(lease("one")),
            ..settings()
        },
    );
    eventually("leader writes", || {
        rules(&p1).get("a").is_some_and(|r| r.len() == 1)
    })
    .await;
    let p2 = memory();
    let r2 = spawn(
        &server,
        p2.clone(),
        Settings {
            lease: Some(lease("two")),
            ..settings()
        },
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        p2.calls.applies.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        p2.calls.observes.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // The first releases the lease on shutdown; the second takes over and writes.
    r1.stop().await;
    eventually("the follower takes over", || {
        rules(&p2).get("a").is_some_and(|r| r.len() == 1)
    })
    .await;
    r2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_answered_410_gone_relists_and_keeps_the_rules() {
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let p = memory();
    let run = spawn(&server, p.clone(), settings());
    eventually("the rule", || {
        rules(&p).get("a").is_some_and(|r| r.len() == 1)
    })
    .await;
    let lists = server.lists("services");
    let removes_before = p.calls.applies.load(std::sync::atomic::Ordering::SeqCst);
    // Move the server's history past what the reflectors have seen, then cut their
    // watches: they resume from a version the server has forgotten.
    server.put(
        "ConfigMap",
        serde_json::json!({"metadata":{"name":"unrelated","namespace":"default"}}),
        "ADDED",
    );
    server.compact();
    server.drop_watches();
    eventually("410 Gone and a re-list", || {
        server.gone() >= 1 && server.lists("services") > lists
    })
    .await;
    // The re-listed view still has the Service: its rule stays, nothing is written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rules(&p)["a"], vec!["30080 10.1.0.0/16".to_string()]);
    assert_eq!(
        p.calls.applies.load(std::sync::atomic::Ordering::SeqCst),
        removes_before
    );
    // And changes after the re-list are seen.
    server.put("Service", service("api", 30090, "10.2.0.0/16"), "ADDED");
    eventually("the new Service's rule", || rules(&p)["a"].len() == 2).await;
    run.stop().await;
}

/// `service()` in another namespace.
fn service_in(namespace: &str, name: &str, node_port: u16, ranges: &str) -> serde_json::Value {
    let mut s = service(name, node_port, ranges);
    s["metadata"]["namespace"] = serde_json::json!(namespace);
    s
}

fn warnings_for(server: &ApiServer, name: &str, reason: &str) -> Vec<String> {
    server
        .events()
        .iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn last_policy_status(server: &ApiServer, name: &str) -> Option<serde_json::Value> {
    server
        .get("NodePortFirewallPolicy", name)
        .map(|p| p["status"].clone())
        .filter(|s| !s.is_null())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_opens_and_closes_exactly_its_services_with_events_and_status() {
    use nodeport_firewall_e2e::kube_api::{namespace, policy};
    use serde_json::json;
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put(
        "Namespace",
        namespace("team-a", json!({"team": "a"})),
        "ADDED",
    );
    server.put("Namespace", namespace("default", json!({})), "ADDED");
    server.put(
        "Service",
        service_in("team-a", "web", 30080, "10.1.0.0/16"),
        "ADDED",
    );
    server.put(
        "Service",
        service_in("team-a", "wide", 30081, "192.168.0.0/16"),
        "ADDED",
    );
    server.put("Service", service("other", 30090, "10.3.0.0/16"), "ADDED");
    let p = memory();
    let config = Config::from_yaml(
        "clusterName: test\npoolLabels: [pool]\npolicy:\n  requireNamespacePolicy: true\n",
        &nodeport_firewall::providers::names(),
    )
    .unwrap();
    let run = spawn_with(&server, p.clone(), settings(), config);

    // No policy yet: every Service is closed, loudly.
    eventually("PolicyViolation on other", || {
        !warnings_for(&server, "other", "PolicyViolation").is_empty()
    })
    .await;
    assert!(rules(&p).values().all(|r| r.is_empty()), "{:?}", rules(&p));
    let note = &warnings_for(&server, "web", "PolicyViolation")[0];
    assert!(
        note.contains("no NodePortFirewallPolicy selects namespace team-a"),
        "{note}"
    );

    // A policy for team-a's namespace by label: only what lies inside its ranges opens.
    let spec = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "allowedSourceRanges": ["10.0.0.0/8"]});
    server.put("NodePortFirewallPolicy", policy("team-a", spec), "ADDED");
    eventually("web open", || {
        rules(&p).get("a").is_some_and(|r| r.len() == 1)
    })
    .await;
    assert_eq!(rules(&p)["a"], vec!["30080 10.1.0.0/16".to_string()]);
    eventually("policy status", || {
        last_policy_status(&server, "team-a").is_some_and(|s| s["admittedServices"] == 1)
    })
    .await;
    let status = last_policy_status(&server, "team-a").unwrap();
    assert_eq!(status["conditions"][0]["type"], "Accepted");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["refusedServices"], 1, "wide is refused: {status}");
    assert_eq!(status["observedGeneration"], 1);
    eventually("wide refused by team-a", || {
        warnings_for(&server, "wide", "PolicyViolation")
            .iter()
            .any(|n| n.contains("policy team-a: source 192.168.0.0/16 is outside allowedSourceRanges (10.0.0.0/8)"))
    })
    .await;

    // Tightening closes web: its rule, legal a moment ago, goes.
    let spec = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "allowedSourceRanges": ["10.2.0.0/16"]});
    server.put("NodePortFirewallPolicy", policy("team-a", spec), "MODIFIED");
    eventually("web closed", || rules(&p)["a"].is_empty()).await;
    eventually("web told why", || {
        warnings_for(&server, "web", "PolicyViolation")
            .iter()
            .any(|n| n.contains("closed by policy team-a") && n.contains("10.1.0.0/16 is outside"))
    })
    .await;
    let patches = server.status_patches();
    assert!(patches.iter().any(|p| {
        let c = &p["status"]["conditions"][0];
        c["reason"] == "PolicyViolation"
            && c["status"] == "False"
            && c["message"]
                .as_str()
                .unwrap_or_default()
                .contains("policy team-a")
    }));

    // Open again, then an invalid policy: it admits nothing (web closes) and says why.
    let spec = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "allowedSourceRanges": ["10.0.0.0/8"]});
    server.put("NodePortFirewallPolicy", policy("team-a", spec), "MODIFIED");
    eventually("web open before the invalid edit", || {
        rules(&p)["a"].len() == 1
    })
    .await;
    let spec = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "allowedSourceRanges": ["10.0.0.0/8", "nope"]});
    server.put("NodePortFirewallPolicy", policy("team-a", spec), "MODIFIED");
    eventually("invalid status", || {
        last_policy_status(&server, "team-a")
            .is_some_and(|s| s["conditions"][0]["reason"] == "Invalid")
    })
    .await;
    let status = last_policy_status(&server, "team-a").unwrap();
    assert_eq!(status["conditions"][0]["status"], "False");
    assert_eq!(status["observedGeneration"], 4);
    eventually("web closed by the invalid policy", || {
        rules(&p)["a"].is_empty()
    })
    .await;
    assert!(
        warnings_for(&server, "web", "PolicyViolation")
            .iter()
            .any(|n| n.contains("policy team-a is invalid and admits nothing")),
        "web is told the policy is invalid"
    );

    // Deleted and made again with the same content: its status is written afresh.
    let spec = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "allowedSourceRanges": ["10.0.0.0/8", "nope"]});
    server.put(
        "NodePortFirewallPolicy",
        policy("team-a", spec.clone()),
        "DELETED",
    );
    server.put("NodePortFirewallPolicy", policy("team-a", spec), "ADDED");
    eventually("status of the new policy", || {
        last_policy_status(&server, "team-a")
            .is_some_and(|s| s["conditions"][0]["reason"] == "Invalid")
    })
    .await;

    // Fixed again, then deleted: web opens, then closes for want of any policy.
    let spec = json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "allowedSourceRanges": ["10.0.0.0/8"]});
    server.put(
        "NodePortFirewallPolicy",
        policy("team-a", spec.clone()),
        "MODIFIED",
    );
    eventually("web open again", || rules(&p)["a"].len() == 1).await;
    server.put("NodePortFirewallPolicy", policy("team-a", spec), "DELETED");
    eventually("web closed again", || rules(&p)["a"].is_empty()).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_planned_while_the_policies_cannot_be_listed() {
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    // As without the CRD, or without RBAC on it: the policy list is refused.
    server.forbid("nodeportfirewallpolicies");
    let p = memory();
    let run = spawn(&server, p.clone(), settings());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rules(&p).values().all(|r| r.is_empty()),
        "planned without the policies: {:?}",
        rules(&p)
    );
    assert!(server.events().is_empty(), "no feedback before sync");
    run.stop().await;
}

/// GET /metrics on `addr`, waiting for it to listen: the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
                .await
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            if let Some((head, body)) = text.split_once("\r\n\r\n")
                && head.split_whitespace().nth(1) == Some("200")
            {
                return body.to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/metrics on {addr} did not answer");
}

/// The value of the sample `name{labels}` (labels as printed), if exported.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The quota gauges follow each plan (per family where the quota counts families apart), and
/// every per-target series goes once the target leaves the plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_headroom_per_target_and_family_and_drop_targets_that_left() {
    use nodeport_firewall_provider::memory::MemoryConfig;
    let server = ApiServer::start().await;
    server.put("Node", node("n1", "a"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    server.put("Service", service("api", 30090, "10.2.0.0/16"), "ADDED");
    // EC2-shaped: 60 rules per IP family.
    let mut memory = MemoryConfig::default();
    memory.limits.max_rules = Some(60);
    memory.limits.rules_counted_per_family = true;
    let p = Arc::new(MemoryProvider::new("test", memory));
    let addr = free_addr();
    let run = spawn(
        &server,
        p.clone(),
        Settings {
            http_addr: Some(addr),
            ..settings()
        },
    );
    eventually("two rules", || {
        rules(&p).get("a").is_some_and(|r| r.len() == 2)
    })
    .await;
    let a = |name: &str, family: &str| {
        format!(r#"nodeport_firewall_{name}{{provider="memory",target="a",family="{family}"}}"#)
    };
    let mut page = String::new();
    for _ in 0..100 {
        page = scrape(addr).await;
        if sample(&page, &a("rule_headroom", "ipv4")) == Some(58.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sample(&page, &a("rule_headroom", "ipv4")),
        Some(58.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, &a("rule_headroom", "ipv6")),
        Some(60.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, &a("rule_limit", "ipv4")),
        Some(60.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, &a("rule_limit", "ipv6")),
        Some(60.0),
        "{page}"
    );
    assert_eq!(sample(&page, &a("rule_headroom", "all")), None, "{page}");
    assert_eq!(
        sample(&page, "nodeport_firewall_resync_interval_seconds"),
        Some(3600.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "nodeport_firewall_leader"),
        Some(1.0),
        "{page}"
    );
    let synced =
        r#"nodeport_firewall_last_successful_sync_timestamp_seconds{provider="memory",target="a"}"#;
    assert!(sample(&page, synced).is_some_and(|t| t > 1.0e9), "{page}");

    // The Services go (their rules with them), then pool a's only node: target a leaves
    // the plan, and a new pool b comes.
    server.put("Node", node("n2", "b"), "ADDED");
    server.put("Service", service("web", 30080, "10.1.0.0/16"), "DELETED");
    server.put("Service", service("api", 30090, "10.2.0.0/16"), "DELETED");
    eventually("no rules left", || rules(&p).values().all(Vec::is_empty)).await;
    server.put("Node", node("n1", "a"), "DELETED");
    let b = r#"nodeport_firewall_rule_headroom{provider="memory",target="b",family="ipv4"}"#;
    for _ in 0..100 {
        page = scrape(addr).await;
        if sample(&page, b).is_some() && !page.contains(r#"target="a""#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sample(&page, b), Some(60.0), "{page}");
    assert!(
        !page.contains(r#"target="a""#),
        "no series of a target that left the plan:\n{page}"
    );
    run.stop().await;
}

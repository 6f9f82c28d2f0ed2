//! `nodeport-firewall run`, the real binary, against the test API server
//! (`nodeport_firewall_e2e::kube_api`, through kube's real HTTP client) and EC2 as emulated
//! by moto: Services created, edited and deleted over HTTP become rules in moto; a rule
//! deleted by hand comes back on the next resync; dry run writes nothing and shows the plan;
//! only the Lease holder writes.
//!
//! The figures of the issue (memory with 10,000 Services, change-to-rule latency) are
//! printed by the `measure_*` tests, which are ignored by default:
//! `cargo test -p nodeport-firewall-e2e --test e2e measure_ -- --ignored --nocapture`.
//! Memory is measured on whatever binary runs: set `NPF_BIN` to a release build
//! (`cargo build --release -p nodeport-firewall`) for the figure that ships.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nodeport_firewall_e2e::kube_api::{ApiServer, node, service};
use serde_json::{Value, json};

use crate::aws::Moto;
use crate::cli::{Scratch, binary};

/// The binary running `run`, killed on drop.
pub(crate) struct Operator {
    child: Option<Child>,
    addr: String,
    log: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Operator {
    /// Starts `nodeport-firewall run --config <config> <args>` against `api`, with a
    /// kubeconfig in `dir`; `name` is its identity (events, Lease).
    pub(crate) fn start(
        api: &ApiServer,
        dir: &Scratch,
        name: &str,
        config: &Path,
        args: &[&str],
    ) -> Self {
        let kubeconfig = dir.path(&format!("kubeconfig-{name}"));
        api.kubeconfig(&kubeconfig);
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.path(&format!("{name}.log"));
        let child = Command::new(binary())
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--metrics-addr", &addr])
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", "ops")
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "x")
            .env("NPF_LOG", "info")
            .env_remove("NPF_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Operator {
            child: Some(child),
            addr,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// GET `path` on the metrics address: (status code, body); None while not listening.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    }

    fn ready(&self) -> bool {
        self.get("/readyz").is_some_and(|(code, _)| code == 200)
    }

    /// /metrics, waiting up to 10 s for it: an unreadable page must not read as zeros.
    fn metrics_page(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.get("/metrics") {
                Some((200, body)) => return body,
                other => assert!(
                    Instant::now() < deadline,
                    "GET /metrics: {other:?}; operator log:\n{}",
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The sum of a metric's samples whose labels contain every one of `labels`.
    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics_page()
            .lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Every cloud call that is not a read (`Describe*`) or a permission probe (`DryRun*`):
    /// rule writes, tag writes, rule modifications.
    fn cloud_writes(&self) -> f64 {
        self.metrics_page()
            .lines()
            .filter(|l| l.starts_with("nodeport_firewall_cloud_api_calls_total{"))
            .filter(|l| {
                // Reads (Describe*, and Service Quotas' Get*) and permission checks.
                !l.contains("operation=\"Describe")
                    && !l.contains("operation=\"Get")
                    && !l.contains("operation=\"DryRun")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    fn cloud_calls(&self, operation: &str) -> f64 {
        self.metric(
            "nodeport_firewall_cloud_api_calls_total",
            &[&format!("operation=\"{operation}\"")],
        )
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (at most 30 s) for a graceful exit.
    pub(crate) fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the operator did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn eventually(what: &str, seconds: u64, op: &Operator, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; operator log:\n{}",
            op.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `(reads, add)` of every `reconciled` log line after the first `from` lines.
fn reconciled_since(op: &Operator, from: usize) -> Vec<(usize, usize)> {
    let field = |line: &str, name: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    op.log()
        .lines()
        .skip(from)
        .filter(|l| l.contains(" reconciled "))
        .map(|l| (field(l, "reads"), field(l, "add")))
        .collect()
}

/// A VPC with one security group per pool (`a`, `b`) and a foreign SSH rule on `a`.
fn moto_pools(moto: &Moto) -> (String, String) {
    let ids = moto.python(
        "vpc = ec2.create_vpc(CidrBlock='10.0.0.0/16')['Vpc']['VpcId']\n\
         ids = [ec2.create_security_group(GroupName=n, Description='nodes', VpcId=vpc)['GroupId'] for n in ('a', 'b')]\n\
         ec2.authorize_security_group_ingress(GroupId=ids[0], IpPermissions=[{'IpProtocol': 'tcp', 'FromPort': 22, 'ToPort': 22, 'IpRanges': [{'CidrIp': '198.51.100.0/24'}]}])\n\
         print(' '.join(ids))",
    );
    let ids: Vec<&str> = ids.split_whitespace().collect();
    (ids[0].to_string(), ids[1].to_string())
}

fn aws_config(dir: &Scratch, moto: &Moto, a: &str, b: &str) -> PathBuf {
    dir.write(
        "config.yaml",
        &format!(
            "clusterName: e2e\npoolLabels: [pool]\npools:\n  a: {{aws: {{securityGroupIds: [{a}]}}}}\n  b: {{aws: {{securityGroupIds: [{b}]}}}}\naws:\n  region: us-east-1\n  endpointUrl: {}\n",
            moto.url
        ),
    )
}

/// Ingress rules of a group as "from-to cidr" texts, ours (tagged) and foreign apart.
fn ingress(moto: &Moto, group: &str) -> (Vec<String>, Vec<String>) {
    let out = moto.python(&format!(
        "rules = ec2.describe_security_group_rules(Filters=[{{'Name': 'group-id', 'Values': ['{group}']}}])['SecurityGroupRules']\n\
         print(json.dumps([[r['FromPort'], r['ToPort'], r.get('CidrIpv4', r.get('CidrIpv6')), bool(r.get('Tags'))] for r in rules if not r['IsEgress']]))"
    ));
    let rules: Vec<(u16, u16, String, bool)> = serde_json::from_str(out.trim()).unwrap();
    let text = |r: &(u16, u16, String, bool)| format!("{}-{} {}", r.0, r.1, r.2);
    let mut ours: Vec<String> = rules.iter().filter(|r| r.3).map(text).collect();
    let mut foreign: Vec<String> = rules.iter().filter(|r| !r.3).map(text).collect();
    ours.sort();
    foreign.sort();
    (ours, foreign)
}

fn with_annotation(mut svc: Value, key: &str, value: &str) -> Value {
    svc["metadata"]["annotations"][key] = json!(value);
    svc
}

#[test]
fn run_against_moto_follows_services_and_repairs_drift() {
    let Some(moto) = Moto::start() else { return };
    let (a, b) = moto_pools(&moto);
    let dir = Scratch::new();
    let config = aws_config(&dir, &moto, &a, &b);
    let api = ApiServer::spawn();
    api.put("Node", node("n1", "a"), "ADDED");
    api.put("Node", node("n2", "b"), "ADDED");
    api.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let op = Operator::start(
        &api,
        &dir,
        "one",
        &config,
        &[
            "--provider",
            "aws",
            "--debounce",
            "200ms",
            "--resync-interval",
            "3s",
        ],
    );

    // Created over HTTP: the rule appears on both pools' groups.
    let want = vec!["30080-30080 10.1.0.0/16".to_string()];
    eventually("the rule on both pools", 60, &op, || {
        ingress(&moto, &a).0 == want && ingress(&moto, &b).0 == want
    });
    eventually("readiness", 10, &op, || op.ready());
    assert!(
        api.events()
            .iter()
            .any(|e| e["reason"] == "RulesUpdated" && e["regarding"]["name"] == "web")
    );

    // The allowlist is edited: the rule follows.
    api.put(
        "Service",
        with_annotation(
            service("web", 30080, "10.1.0.0/16"),
            "nodeport-firewall.io/allowed-source-ranges",
            "10.2.0.0/16",
        ),
        "MODIFIED",
    );
    let want = vec!["30080-30080 10.2.0.0/16".to_string()];
    eventually("the new allowlist", 30, &op, || {
        ingress(&moto, &a).0 == want && ingress(&moto, &b).0 == want
    });

    // Pool scoping: the Service moves to pool b only; a loses its rule.
    api.put(
        "Service",
        with_annotation(
            with_annotation(
                service("web", 30080, "10.1.0.0/16"),
                "nodeport-firewall.io/allowed-source-ranges",
                "10.2.0.0/16",
            ),
            "nodeport-firewall.io/node-pools",
            "b",
        ),
        "MODIFIED",
    );
    eventually("the rule on b only", 30, &op, || {
        ingress(&moto, &a).0.is_empty() && ingress(&moto, &b).0 == want
    });

    // Drift: our rule deleted by hand in the cloud comes back on the next resync.
    let revoked = moto.python(&format!(
        "rules = ec2.describe_security_group_rules(Filters=[{{'Name': 'group-id', 'Values': ['{b}']}}])['SecurityGroupRules']\n\
         ids = [r['SecurityGroupRuleId'] for r in rules if not r['IsEgress'] and r.get('Tags')]\n\
         ec2.revoke_security_group_ingress(GroupId='{b}', SecurityGroupRuleIds=ids)\n\
         print(len(ids))"
    ));
    assert_eq!(revoked.trim(), "1", "our rule was revoked by hand");
    eventually("the deleted rule to come back", 30, &op, || {
        ingress(&moto, &b).0 == want
    });

    // A resync with nothing to change reads each target once (and searches once for
    // orphans) and writes nothing.
    let reconciles =
        |op: &Operator| op.metric("nodeport_firewall_reconciles_total", &["pool=\"a\""]);
    let writes = |op: &Operator| op.cloud_writes();
    let (r0, d0, w0) = (
        reconciles(&op),
        op.cloud_calls("DescribeSecurityGroupRules"),
        writes(&op),
    );
    eventually("two more resyncs", 30, &op, || reconciles(&op) >= r0 + 2.0);
    let (r1, d1, w1) = (
        reconciles(&op),
        op.cloud_calls("DescribeSecurityGroupRules"),
        writes(&op),
    );
    // One read per target (2), and the region's one search for groups holding rules of
    // ours that no pool maps to (orphans).
    assert_eq!(
        d1 - d0,
        3.0 * (r1 - r0),
        "one read per target (2) and one orphan search per resync"
    );
    assert_eq!(w1, w0, "no writes when nothing changed");

    // Work is keyed by target: a change that only concerns pool b reads b's group alone
    // (a is planned against what was read there at the resync). Start right after a
    // resync, so the next one (3 s) is far off.
    let r2 = reconciles(&op);
    eventually("a resync", 30, &op, || reconciles(&op) > r2);
    let from = op.log().lines().count();
    let d2 = op.cloud_calls("DescribeSecurityGroupRules");
    api.put(
        "Service",
        with_annotation(
            service("api", 30081, "10.3.0.0/16"),
            "nodeport-firewall.io/node-pools",
            "b",
        ),
        "ADDED",
    );
    let with_api = vec![
        "30080-30080 10.2.0.0/16".to_string(),
        "30081-30081 10.3.0.0/16".to_string(),
    ];
    eventually("api's rule on b", 30, &op, || {
        ingress(&moto, &b).0 == with_api
    });
    // Every reconcile logs its reads of targets, and makes one search for orphans (one
    // tag-filtered DescribeSecurityGroupRules for the region); once the log accounts for
    // every call made since the change (a resync may have come meanwhile), the reconcile
    // that added the rule must have read one group.
    eventually("the logged reads to match the calls", 30, &op, || {
        let lines = reconciled_since(&op, from);
        let logged: usize = lines.iter().map(|r| r.0).sum::<usize>() + lines.len();
        logged as f64 == op.cloud_calls("DescribeSecurityGroupRules") - d2
    });
    let lines = reconciled_since(&op, from);
    assert_eq!(
        lines
            .iter()
            .find(|(_, add)| *add > 0)
            .map(|(reads, _)| *reads),
        Some(1),
        "one read, of pool b's group only: {lines:?}\n{}",
        op.log()
    );
    api.put("Service", service("api", 30081, "10.3.0.0/16"), "DELETED");
    eventually("api's rule gone", 30, &op, || ingress(&moto, &b).0 == want);

    // Deleted over HTTP: the rule goes. The foreign SSH rule stays exactly as it was.
    api.put("Service", service("web", 30080, "10.2.0.0/16"), "DELETED");
    eventually("no rules of ours", 30, &op, || {
        ingress(&moto, &a).0.is_empty() && ingress(&moto, &b).0.is_empty()
    });
    assert_eq!(
        ingress(&moto, &a).1,
        vec!["22-22 198.51.100.0/24".to_string()]
    );

    let status = op.stop();
    assert!(status.success(), "exit on SIGTERM: {status:?}");
}

#[test]
fn run_dry_run_against_moto_writes_nothing_and_shows_the_plan() {
    let Some(moto) = Moto::start() else { return };
    let (a, b) = moto_pools(&moto);
    let dir = Scratch::new();
    let config = aws_config(&dir, &moto, &a, &b);
    let api = ApiServer::spawn();
    api.put("Node", node("n1", "a"), "ADDED");
    api.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let op = Operator::start(
        &api,
        &dir,
        "dry",
        &config,
        &["--provider", "aws", "--debounce", "200ms", "--dry-run"],
    );
    eventually("a dry-run event", 60, &op, || {
        api.events()
            .iter()
            .any(|e| e["reason"] == "DryRunChangesPending" && e["type"] == "Normal")
    });
    eventually("readiness", 10, &op, || op.ready());
    // The plan is visible: in the log, in the condition and in the pending-changes gauge.
    assert!(
        op.log().contains("+ tcp 30080 from 10.1.0.0/16"),
        "{}",
        op.log()
    );
    eventually("the condition", 30, &op, || {
        !api.status_patches().is_empty()
    });
    let condition = &api.status_patches()[0]["status"]["conditions"][0];
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .starts_with("[dry run]"),
        "{condition}"
    );
    assert_eq!(
        op.metric(
            "nodeport_firewall_pending_changes",
            &[&format!("target=\"{a}\"")]
        ),
        1.0
    );
    // Zero writes.
    assert_eq!(op.cloud_writes(), 0.0, "no cloud writes in dry run");
    assert!(ingress(&moto, &a).0.is_empty());
    assert!(op.stop().success());
}

#[test]
fn run_with_two_replicas_only_the_lease_holder_writes() {
    let Some(moto) = Moto::start() else { return };
    let (a, b) = moto_pools(&moto);
    let dir = Scratch::new();
    let config = aws_config(&dir, &moto, &a, &b);
    let api = ApiServer::spawn();
    api.put("Node", node("n1", "a"), "ADDED");
    api.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let args = [
        "--provider",
        "aws",
        "--debounce",
        "200ms",
        "--leader-election",
        "--lease-duration",
        "3s",
    ];
    let one = Operator::start(&api, &dir, "one", &config, &args);
    eventually("the leader's rule", 60, &one, || {
        ingress(&moto, &a).0 == vec!["30080-30080 10.1.0.0/16".to_string()]
    });
    let two = Operator::start(&api, &dir, "two", &config, &args);
    eventually("the follower up", 30, &two, || {
        two.get("/healthz").is_some()
    });
    // A change while both run: only the holder writes it.
    api.put("Service", service("api", 30090, "10.3.0.0/16"), "ADDED");
    eventually("the leader applies the change", 30, &one, || {
        ingress(&moto, &a).0.len() == 2
    });
    assert_eq!(two.metric("nodeport_firewall_leader", &[]), 0.0);
    assert_eq!(two.cloud_calls("DescribeSecurityGroupRules"), 0.0);
    assert_eq!(two.cloud_writes(), 0.0);
    assert!(
        api.events().iter().all(|e| e["reportingInstance"] != "two"),
        "the follower wrote events"
    );
    // The leader leaves (and releases the Lease): the other takes over and writes.
    assert!(one.stop().success());
    eventually("the new leader", 30, &two, || {
        two.metric("nodeport_firewall_leader", &[]) == 1.0
    });
    api.put("Service", service("api", 30090, "10.3.0.0/16"), "DELETED");
    eventually("the new leader applies the change", 30, &two, || {
        ingress(&moto, &a).0 == vec!["30080-30080 10.1.0.0/16".to_string()]
    });
    assert!(two.stop().success());
}

impl Operator {
    /// `run --provider memory --state <state> --debounce 100ms`.
    pub(crate) fn start_memory(
        api: &ApiServer,
        dir: &Scratch,
        name: &str,
        config: &Path,
        state: &Path,
    ) -> Self {
        let state = state.display().to_string();
        let args = [
            "--provider",
            "memory",
            "--state",
            &state,
            "--debounce",
            "100ms",
        ];
        Operator::start(api, dir, name, config, &args)
    }
}

/// The rules of the memory provider's `target` in its state file, as "ports sources",
/// sorted (none while the file is not written yet).
pub(crate) fn state_rules(state: &Path, target: &str) -> Vec<String> {
    let text = std::fs::read_to_string(state).unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or_default();
    let mut rules: Vec<String> = v["targets"][target]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{} {}", r["ports"], r["sources"]))
        .collect();
    rules.sort();
    rules
}

#[test]
fn run_with_the_memory_provider_saves_its_state_after_every_apply() {
    let api = ApiServer::spawn();
    api.put("Node", node("n1", "a"), "ADDED");
    api.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let dir = Scratch::new();
    let config = dir.write("config.yaml", "clusterName: e2e\npoolLabels: [pool]\n");
    let state = dir.path("state.json");
    let op = Operator::start_memory(&api, &dir, "one", &config, &state);
    let rules = || state_rules(&state, "a");
    // Saved while the operator runs, not only when it stops.
    eventually("the rule in the state file", 30, &op, || rules().len() == 1);
    api.put("Service", service("web", 30080, "10.1.0.0/16"), "DELETED");
    eventually("the rule gone from the state file", 30, &op, || {
        rules().is_empty()
    });
    assert!(op.stop().success());
}

// ---------------------------------------------------------------------------------------
// Figures (ignored by default; see the module docs for the command).

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn measure_operator_memory_with_10k_services_and_1k_nodes() {
    let api = ApiServer::spawn();
    api.load(
        "Node",
        (0..1000).map(|i| {
            let mut n = node(&format!("node-{i:04}"), &format!("pool-{:02}", i % 20));
            // Real Nodes carry far more than the operator needs; the reflector strips it.
            n["metadata"]["annotations"] = json!({"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"});
            n["status"]["images"] = json!((0..30).map(|j| json!({"names": [format!("registry.example.com/team/image-{j}:v1.2.3")], "sizeBytes": 123456789})).collect::<Vec<_>>());
            n
        }),
    );
    api.load(
        "Service",
        (0..10_000).map(|i| {
            let mut s = service(
                &format!("svc-{i:05}"),
                30000 + (i % 2700) as u16,
                &format!("10.{}.0.0/16", i % 200),
            );
            s["metadata"]["namespace"] = json!(format!("ns-{}", i / 100));
            s["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
                json!("x".repeat(600));
            s["metadata"]["managedFields"] = json!([{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {"f:ports": {}}}}]);
            s
        }),
    );
    let dir = Scratch::new();
    let config = dir.write("config.yaml", "clusterName: bench\npoolLabels: [pool]\nmemory:\n  limits:\n    maxRules: 100000\n    maxPortsPerRule: 50\n    maxSourcesPerRule: 64\n");
    let started = Instant::now();
    let op = Operator::start(&api, &dir, "bench", &config, &["--provider", "memory"]);
    eventually("the first reconcile", 300, &op, || op.ready());
    let ready = started.elapsed();
    // Every Service gets its condition: measure once that backlog is through.
    eventually("10,000 conditions", 600, &op, || {
        api.status_patch_count() >= 10_000
    });
    let settled = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(op.pid(), "VmRSS:");
    let (anon, file) = (rss_kib(op.pid(), "RssAnon:"), rss_kib(op.pid(), "RssFile:"));
    let peak = rss_kib(op.pid(), "VmHWM:");
    println!(
        "10,000 Services and 1,000 Nodes cached; first reconcile {:.1} s and 10,000 conditions set {:.1} s after start; then RSS {:.1} MiB (heap and stacks {:.1} MiB, mapped binary {:.1} MiB), peak {:.1} MiB (MALLOC_ARENA_MAX={})",
        ready.as_secs_f64(),
        settled.as_secs_f64(),
        rss as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0,
        peak as f64 / 1024.0,
        std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "unset".into())
    );
    assert!(op.stop().success());
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn measure_service_change_to_rule_in_moto() {
    let Some(moto) = Moto::start() else { return };
    let (a, b) = moto_pools(&moto);
    let dir = Scratch::new();
    let config = aws_config(&dir, &moto, &a, &b);
    let api = ApiServer::spawn();
    api.put("Node", node("n1", "a"), "ADDED");
    api.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
    let debounce = "1500ms";
    let op = Operator::start(
        &api,
        &dir,
        "latency",
        &config,
        &["--provider", "aws", "--debounce", debounce],
    );
    eventually("the first rule", 60, &op, || {
        !ingress(&moto, &a).0.is_empty()
    });
    let mut samples = Vec::new();
    for i in 0..15u16 {
        let port = 30200 + i;
        // A poller that starts its clock when told, then polls moto every 20 ms.
        let script = format!(
            "import boto3, sys, time\nec2 = boto3.client('ec2', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='x')\n\
             ec2.describe_security_group_rules(Filters=[{{'Name': 'group-id', 'Values': ['{a}']}}])\n\
             print('ready', flush=True)\nsys.stdin.readline()\nt0 = time.monotonic()\n\
             while not any(r.get('FromPort', 0) <= {port} <= r.get('ToPort', -1) for r in ec2.describe_security_group_rules(Filters=[{{'Name': 'group-id', 'Values': ['{a}']}}])['SecurityGroupRules']):\n    time.sleep(0.02)\n\
             print(time.monotonic() - t0, flush=True)\n",
            moto.url
        );
        let mut poller = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(poller.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        api.put(
            "Service",
            service(&format!("s{i}"), port, "10.9.0.0/16"),
            "ADDED",
        );
        writeln!(poller.stdin.as_mut().unwrap()).unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        let _ = poller.wait();
        samples.push(line.trim().parse::<f64>().unwrap());
        // Let the debounce window close so that samples do not coalesce.
        std::thread::sleep(Duration::from_millis(500));
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "Service change -> rule in moto, {} samples, debounce {debounce}: p50 {:.2} s, p90 {:.2} s, max {:.2} s",
        samples.len(),
        pct(0.5),
        pct(0.9),
        pct(1.0)
    );
    assert!(op.stop().success());
}

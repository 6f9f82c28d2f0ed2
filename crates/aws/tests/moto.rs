//! The AWS provider against moto_server: the conformance suite, discovery, quotas, IPv6,
//! marker updates, throttling and 5xx injected by a fault proxy, call counts, and the
//! 500-Service measurement (run with `--nocapture` to see the figures).
//!
//! Every test starts its own moto_server on a free loopback port and talks to it through a
//! small HTTP proxy that counts EC2 calls per action and security group and injects faults.
//! Without moto_server the tests fail, unless NPF_SKIP_MOTO=1.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ec2::types::{IpPermission, IpRange, Ipv6Range, ResourceType, Tag, TagSpecification};
use nodeport_firewall_aws::{AwsProvider, StaticCredentials, marker};
use nodeport_firewall_provider::conformance::{self, Harness, PoolFixture};
use nodeport_firewall_provider::engine::{self, ApplyOutcome};
use nodeport_firewall_provider::model::{
    Config, IpFamily, NodeSpec, Plan, PlanError, PoolName, ServiceRef, ServiceSpec, desired,
};
use nodeport_firewall_provider::{Action, ErrorKind, PoolView, Provider, Rule, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLUSTER: &str = "moto-test";

/// An ingress rule as EC2 holds it: (id, protocol, from, to, cidr, tags).
type RawRule = (String, String, i32, i32, String, BTreeMap<String, String>);
const REGION: &str = "us-east-1";
const POOL_LABEL: &str = "nodeport-firewall.io/pool";

// ---------------------------------------------------------------------------------------
// moto_server

struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn not_installed(why: &str) -> Option<Moto> {
    if std::env::var("NPF_SKIP_MOTO").as_deref() == Ok("1") {
        eprintln!("SKIPPED: moto_server is not available ({why}); NPF_SKIP_MOTO=1");
        return None;
    }
    panic!(
        "moto_server is not available ({why}). Install it with `pip install 'moto[server]'`, \
         or set NPF_SKIP_MOTO=1 to skip the AWS tests."
    );
}

async fn start_moto() -> Option<Moto> {
    let port = free_port();
    let child = match Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return not_installed(&e.to_string()),
    };
    let mut moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = moto.child.try_wait() {
            return not_installed(&format!("moto_server exited with {status}"));
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            let req = "GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() && buf.starts_with(b"HTTP/1") {
                    return Some(moto);
                }
            }
        }
        if Instant::now() > deadline {
            moto.child.kill().ok();
            panic!("moto_server did not answer on port {port} within 60s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The fault-injecting, call-counting proxy

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// 503 with an EC2 `RequestLimitExceeded` error.
    Throttle,
    /// 503 with a non-EC2 body, as a load balancer would send.
    Unavailable,
    /// The request reaches moto, but the client gets a 500 `InternalError`.
    LostResponse,
    /// 403 `UnauthorizedOperation`.
    Unauthorized,
}

#[derive(Debug, Default)]
struct ProxyState {
    /// (action, times left, fault)
    faults: Vec<(String, usize, Fault)>,
    /// (action, security group or "-") -> requests
    calls: BTreeMap<(String, String), usize>,
    injected: usize,
}

#[derive(Clone)]
struct Proxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = handle(conn, upstream, st).await;
                });
            }
        });
        Proxy { port, state }
    }

    fn fail(&self, action: &str, times: usize, fault: Fault) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((action.to_string(), times, fault));
    }

    fn reset(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    fn calls(&self) -> BTreeMap<(String, String), usize> {
        self.state.lock().unwrap().calls.clone()
    }

    fn injected(&self) -> usize {
        self.state.lock().unwrap().injected
    }

    /// Requests to `group`, reads (Describe*) and writes.
    fn per_group(&self, group: &str) -> (usize, usize) {
        let mut reads = 0;
        let mut writes = 0;
        for ((action, g), n) in self.calls() {
            if g != group {
                continue;
            }
            if action.starts_with("Describe") {
                reads += n;
            } else {
                writes += n;
            }
        }
        (reads, writes)
    }

    fn writes(&self) -> usize {
        self.calls()
            .iter()
            .filter(|((a, _), _)| !a.starts_with("Describe"))
            .map(|(_, n)| n)
            .sum()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn form_value(body: &str, key: &str) -> Option<String> {
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%2F", "/").replace("%3A", ":"))
    })
}

/// Drops `Connection` headers and asks for the connection to be closed.
fn close_connection(head: &str) -> String {
    let mut out: Vec<&str> = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    out.retain(|l| !l.is_empty());
    format!("{}\r\nConnection: close\r\n\r\n", out.join("\r\n"))
}

async fn handle(
    mut client: TcpStream,
    upstream: u16,
    state: Arc<Mutex<ProxyState>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .split("\r\n")
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buf.len() < head_end + 4 + len {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end + 4..].to_vec();
    let text = String::from_utf8_lossy(&body).to_string();
    let action = form_value(&text, "Action").unwrap_or_default();
    let group = form_value(&text, "GroupId")
        .or_else(|| form_value(&text, "Filter.1.Value.1"))
        .unwrap_or_else(|| "-".to_string());
    let fault = {
        let mut st = state.lock().unwrap();
        *st.calls.entry((action.clone(), group)).or_default() += 1;
        let f = st
            .faults
            .iter_mut()
            .find(|(a, left, _)| *a == action && *left > 0)
            .map(|(_, left, f)| {
                *left -= 1;
                *f
            });
        if f.is_some() {
            st.injected += 1;
        }
        f
    };
    let error = |status: &str, code: &str, message: &str| {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault-1</RequestID></Response>"
        );
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/xml;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        )
    };
    let forward = || async {
        let mut up = TcpStream::connect(("127.0.0.1", upstream)).await?;
        up.write_all(close_connection(&head).as_bytes()).await?;
        up.write_all(&body).await?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp).await?;
        Ok::<Vec<u8>, std::io::Error>(resp)
    };
    let out: Vec<u8> = match fault {
        Some(Fault::Throttle) => error(
            "503 Service Unavailable",
            "RequestLimitExceeded",
            "Request limit exceeded.",
        )
        .into_bytes(),
        Some(Fault::Unavailable) => {
            let b = "<html>Service Unavailable</html>";
            format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            )
            .into_bytes()
        }
        Some(Fault::Unauthorized) => error(
            "403 Forbidden",
            "UnauthorizedOperation",
            "You are not authorized to perform this operation.",
        )
        .into_bytes(),
        Some(Fault::LostResponse) => {
            forward().await?;
            error(
                "500 Internal Server Error",
                "InternalError",
                "An internal error has occurred.",
            )
            .into_bytes()
        }
        None => {
            let resp = forward().await?;
            match find(&resp, b"\r\n\r\n") {
                Some(i) => {
                    let mut out =
                        close_connection(&String::from_utf8_lossy(&resp[..i])).into_bytes();
                    out.extend_from_slice(&resp[i + 4..]);
                    out
                }
                None => resp,
            }
        }
    };
    client.write_all(&out).await?;
    client.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A test environment: moto, the proxy, a VPC, a raw EC2 client for fixtures

struct Env {
    _moto: Moto,
    proxy: Proxy,
    ec2: aws_sdk_ec2::Client,
    vpc: String,
    subnet: String,
}

impl Env {
    async fn start() -> Option<Env> {
        let moto = start_moto().await?;
        let proxy = Proxy::start(moto.port).await;
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(REGION))
            .endpoint_url(format!("http://127.0.0.1:{}", moto.port))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .build();
        let ec2 = aws_sdk_ec2::Client::from_conf(conf);
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.10.0.0/16")
            .send()
            .await
            .unwrap()
            .vpc()
            .and_then(|v| v.vpc_id())
            .unwrap()
            .to_string();
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block("10.10.1.0/24")
            .send()
            .await
            .unwrap()
            .subnet()
            .and_then(|s| s.subnet_id())
            .unwrap()
            .to_string();
        Some(Env {
            _moto: moto,
            proxy,
            ec2,
            vpc,
            subnet,
        })
    }

    async fn provider_with(&self, extra: serde_json::Value) -> AwsProvider {
        let mut section = serde_json::json!({
            "region": REGION,
            "endpointUrl": format!("http://127.0.0.1:{}", self.proxy.port),
            "retry": {"maxAttempts": 6, "baseDelayMillis": 1, "maxDelayMillis": 20},
        });
        if let (Some(s), Some(e)) = (section.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        AwsProvider::from_config_with(
            CLUSTER,
            Some(&section),
            Some(StaticCredentials {
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
            }),
        )
        .await
        .unwrap()
    }

    async fn provider(&self) -> AwsProvider {
        self.provider_with(serde_json::json!({})).await
    }

    async fn sg(&self, name: &str, cluster_tag: bool) -> String {
        let mut req = self
            .ec2
            .create_security_group()
            .group_name(name)
            .description(name)
            .vpc_id(&self.vpc);
        if cluster_tag {
            req = req.tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroup)
                    .tags(
                        Tag::builder()
                            .key(format!("kubernetes.io/cluster/{CLUSTER}"))
                            .value("owned")
                            .build(),
                    )
                    .build(),
            );
        }
        req.send().await.unwrap().group_id().unwrap().to_string()
    }

    async fn instance(&self, sgs: &[&str]) -> String {
        self.ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .min_count(1)
            .max_count(1)
            .subnet_id(&self.subnet)
            .set_security_group_ids(Some(sgs.iter().map(|s| s.to_string()).collect()))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("Name").value("node").build())
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .instances()[0]
            .instance_id()
            .unwrap()
            .to_string()
    }

    /// A pool with one node whose only security group is new and tagged.
    async fn pool(&self, name: &str) -> (PoolName, String, Vec<NodeSpec>) {
        let sg = self.sg(&format!("sg-{name}"), true).await;
        let inst = self.instance(&[&sg]).await;
        (
            PoolName::new(name),
            sg,
            vec![node(&format!("node-{name}"), name, &inst)],
        )
    }

    /// Ingress rules on `sg` as EC2 holds them: (id, protocol, from, to, cidr, tags).
    async fn raw_rules(&self, sg: &str) -> Vec<RawRule> {
        let out = self
            .ec2
            .describe_security_group_rules()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("group-id")
                    .values(sg)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.security_group_rules()
            .iter()
            .filter(|r| r.is_egress() == Some(false))
            .map(|r| {
                (
                    r.security_group_rule_id().unwrap_or_default().to_string(),
                    r.ip_protocol().unwrap_or_default().to_string(),
                    r.from_port().unwrap_or(-1),
                    r.to_port().unwrap_or(-1),
                    r.cidr_ipv4()
                        .or(r.cidr_ipv6())
                        .unwrap_or_default()
                        .to_string(),
                    r.tags()
                        .iter()
                        .map(|t| {
                            (
                                t.key().unwrap_or_default().to_string(),
                                t.value().unwrap_or_default().to_string(),
                            )
                        })
                        .collect(),
                )
            })
            .collect()
    }

    /// Writes a rule directly, as another tool would.
    async fn seed(&self, sg: &str, owner: Option<&str>, rule: &Rule) {
        let c = &rule.content;
        let proto = match c.protocol {
            nodeport_firewall_provider::model::Protocol::Tcp => "tcp",
            nodeport_firewall_provider::model::Protocol::Udp => "udp",
            nodeport_firewall_provider::model::Protocol::Sctp => "132",
        };
        let mut perm = IpPermission::builder()
            .ip_protocol(proto)
            .from_port(i32::from(c.ports[0].from))
            .to_port(i32::from(c.ports[0].to));
        for s in &c.sources {
            perm = match s {
                ipnet::IpNet::V4(_) => {
                    perm.ip_ranges(IpRange::builder().cidr_ip(s.to_string()).build())
                }
                ipnet::IpNet::V6(_) => {
                    perm.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(s.to_string()).build())
                }
            };
        }
        let mut req = self
            .ec2
            .authorize_security_group_ingress()
            .group_id(sg)
            .ip_permissions(perm.build());
        if let Some(owner) = owner {
            req = req.tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroupRule)
                    .tags(
                        Tag::builder()
                            .key(marker::TAG_MANAGED_BY)
                            .value(marker::MANAGED_BY)
                            .build(),
                    )
                    .tags(Tag::builder().key(marker::TAG_CLUSTER).value(owner).build())
                    .build(),
            );
        }
        req.send().await.unwrap();
    }
}

fn node(name: &str, pool: &str, instance: &str) -> NodeSpec {
    NodeSpec::new(name)
        .with_label(POOL_LABEL, pool)
        .with_provider_id(&format!("aws:///{REGION}a/{instance}"))
}

fn config_for(pools: &[&PoolName]) -> Config {
    let mut config = Config::new(CLUSTER);
    for p in pools {
        config.pools.insert((*p).clone(), Default::default());
    }
    config
}

async fn plan(p: &AwsProvider, config: &Config, svcs: &[ServiceSpec], nodes: &[NodeSpec]) -> Plan {
    engine::plan(p, config, &desired(config, svcs, nodes)).await
}

async fn apply_ok(p: &AwsProvider, plan: &Plan) -> Vec<String> {
    let mut notes = Vec::new();
    for (target, outcome) in engine::apply(p, plan).await {
        match outcome {
            ApplyOutcome::NoChanges => {}
            ApplyOutcome::Applied { report } => notes.extend(report.notes),
            other => panic!("apply on {target} failed: {other:?}"),
        }
    }
    notes
}

fn writes(plan: &Plan) -> usize {
    plan.summary.add + plan.summary.remove + plan.summary.update
}

fn svc(name: &str, port: i32, ranges: &str) -> ServiceSpec {
    ServiceSpec::nodeport("apps", name)
        .with_port("p", "TCP", 80, port)
        .enabled()
        .with_ranges(ranges)
}

macro_rules! env_or_skip {
    () => {
        match Env::start().await {
            Some(env) => env,
            None => return,
        }
    };
}

// ---------------------------------------------------------------------------------------
// Conformance

struct AwsHarness<'a> {
    env: &'a Env,
    provider: AwsProvider,
}

#[async_trait]
impl Harness for AwsHarness<'_> {
    fn provider(&self) -> &dyn Provider {
        &self.provider
    }

    async fn new_instance(&self) -> Box<dyn Provider> {
        Box::new(self.env.provider().await)
    }

    async fn fresh_pool(&self, tag: &str) -> PoolFixture {
        let (pool, _, nodes) = self.env.pool(&format!("pool-{tag}")).await;
        PoolFixture {
            config: config_for(&[&pool]),
            pool,
            nodes,
        }
    }

    async fn seed_foreign(
        &self,
        target: &Target,
        owner: Option<&str>,
        rule: &Rule,
    ) -> nodeport_firewall_provider::Result<()> {
        self.env.seed(&target.id, owner, rule).await;
        Ok(())
    }

    /// Security groups only allow: a foreign Allow is in force, whatever else is there.
    async fn seed_shadowed_allow(
        &self,
        target: &Target,
        rule: &Rule,
    ) -> nodeport_firewall_provider::Result<Option<String>> {
        self.env.seed(&target.id, None, rule).await;
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_moto() {
    let env = env_or_skip!();
    let h = AwsHarness {
        provider: env.provider().await,
        env: &env,
    };
    conformance::run_all(&h).await;
}

// ---------------------------------------------------------------------------------------
// Discovery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_single_tagged_ambiguous_and_outliers() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let resolve = |pool: &'static str, nodes: Vec<NodeSpec>, config: Option<serde_json::Value>| {
        let p = &p;
        async move {
            let name = PoolName::new(pool);
            p.resolve(PoolView {
                name: &name,
                nodes: &nodes,
                config: config.as_ref(),
            })
            .await
        }
    };

    // One untagged security group: it is the one.
    let only = env.sg("only", false).await;
    let i1 = env.instance(&[&only]).await;
    let got = resolve("single", vec![node("n1", "single", &i1)], None)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].target, Target::new("aws", &only));
    assert_eq!(got[0].scope, None);

    // Several, one tagged with the cluster tag key: the tagged one.
    let plain = env.sg("plain", false).await;
    let tagged = env.sg("tagged", true).await;
    let i2 = env.instance(&[&plain, &tagged]).await;
    let i3 = env.instance(&[&plain, &tagged]).await;
    let got = resolve(
        "tagged",
        vec![node("n2", "tagged", &i2), node("n3", "tagged", &i3)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(got[0].target.id, tagged);

    // Several, none tagged: an error naming the candidates and the config that resolves it.
    let other = env.sg("other", false).await;
    let i4 = env.instance(&[&plain, &other]).await;
    let e = resolve("amb", vec![node("n4", "amb", &i4)], None)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Discovery);
    assert!(
        e.message.contains(&plain) && e.message.contains(&other),
        "{e}"
    );
    assert!(
        e.message
            .contains(&format!("kubernetes.io/cluster/{CLUSTER}")),
        "{e}"
    );
    assert!(
        e.message
            .contains("pools:\n  amb:\n    aws:\n      securityGroupIds: [sg-"),
        "{e}"
    );
    println!("ambiguous discovery error:\n{e}\n");

    // Nodes that disagree: the outliers are listed.
    let i5 = env.instance(&[&only]).await;
    let i6 = env.instance(&[&only]).await;
    let i7 = env.instance(&[&tagged]).await;
    let e = resolve(
        "mixed",
        vec![
            node("n5", "mixed", &i5),
            node("n6", "mixed", &i6),
            node("n7", "mixed", &i7),
        ],
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Discovery);
    assert!(
        e.message
            .contains(&format!("outliers: n7 ({i7}) -> {tagged}")),
        "{e}"
    );
    println!("outlier discovery error:\n{e}\n");

    // Explicit ids win, with no API call; unknown fields are config errors.
    env.proxy.reset();
    let got = resolve(
        "amb",
        vec![node("n4", "amb", &i4)],
        Some(serde_json::json!({"securityGroupIds": [other.clone()]})),
    )
    .await
    .unwrap();
    assert_eq!(got[0].target.id, other);
    assert!(env.proxy.calls().is_empty());
    let e = resolve(
        "amb",
        vec![],
        Some(serde_json::json!({"securityGroups": []})),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Config);
    let e = resolve(
        "amb",
        vec![],
        Some(serde_json::json!({"securityGroupIds": ["i-123"]})),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Config);

    // Nodes without an EC2 providerID.
    let e = resolve("bare", vec![NodeSpec::new("bare")], None)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Discovery);
    assert!(e.message.contains("bare"), "{e}");

    // Cached while membership is unchanged; refreshed when it changes.
    env.proxy.reset();
    resolve("single", vec![node("n1", "single", &i1)], None)
        .await
        .unwrap();
    assert_eq!(
        env.proxy.calls().len(),
        0,
        "cached: {:?}",
        env.proxy.calls()
    );
    let i8 = env.instance(&[&only]).await;
    resolve(
        "single",
        vec![node("n1", "single", &i1), node("n8", "single", &i8)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        env.proxy
            .calls()
            .get(&("DescribeInstances".to_string(), "-".to_string())),
        Some(&1)
    );
}

// ---------------------------------------------------------------------------------------
// Quota, IPv6, removal, marker updates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_counts_foreign_rules_and_is_a_plan_error() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("quota").await;
    let config = config_for(&[&pool]);
    // 58 foreign IPv4 rules already there.
    for i in 0..58u16 {
        let rule = Rule {
            name: None,
            content: nodeport_firewall_provider::RuleContent {
                scope: None,
                family: IpFamily::V4,
                protocol: nodeport_firewall_provider::model::Protocol::Tcp,
                ports: vec![nodeport_firewall_provider::model::PortRange::single(
                    1000 + i,
                )],
                sources: vec!["192.0.2.0/24".parse().unwrap()],
            },
            services: Default::default(),
            pools: Default::default(),
        };
        env.seed(&sg, None, &rule).await;
    }
    let svcs = vec![
        svc("a", 30001, "10.0.0.0/8"),
        svc("b", 30003, "10.0.0.0/8"),
        svc("c", 30005, "10.0.0.0/8"),
    ];
    let qplan = plan(&p, &config, &svcs, &nodes).await;
    let tp = &qplan.targets[0];
    match &tp.error {
        Some(PlanError::RuleQuota {
            family,
            ours,
            foreign,
            limit,
            ..
        }) => {
            assert_eq!(
                (*family, *ours, *foreign, *limit),
                (Some(IpFamily::V4), 3, 58, 60)
            );
        }
        other => panic!("expected a quota error, got {other:?}"),
    }
    println!("quota plan error: {}", tp.error.as_ref().unwrap());
    env.proxy.reset();
    for (_, outcome) in engine::apply(&p, &qplan).await {
        assert!(
            matches!(outcome, ApplyOutcome::Refused { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(
        env.proxy.writes(),
        0,
        "no write when the plan has a quota error"
    );
    assert_eq!(env.raw_rules(&sg).await.len(), 58);
    // IPv6 rules are counted against their own quota: an IPv6-only Service still fits.
    let v6 = vec![svc("v6", 30007, "2001:db8::/32")];
    let plan6 = plan(&p, &config, &v6, &nodes).await;
    assert!(
        plan6.targets[0].error.is_none(),
        "{:?}",
        plan6.targets[0].error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_rules_and_service_removal() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("v6").await;
    let config = config_for(&[&pool]);
    let svcs = vec![
        svc("dual", 30010, "10.1.2.3/16, 2001:db8:1::5/48"),
        svc("v6only", 30020, "2001:db8:2::/48"),
        svc("v4", 30030, "192.168.0.0/24"),
    ];
    let first = plan(&p, &config, &svcs, &nodes).await;
    apply_ok(&p, &first).await;
    let raw = env.raw_rules(&sg).await;
    let cidrs: BTreeSet<String> = raw.iter().map(|r| r.4.clone()).collect();
    // Canonical CIDRs on the wire.
    assert!(cidrs.contains("10.1.0.0/16"), "{cidrs:?}");
    assert!(cidrs.contains("2001:db8:1::/48"), "{cidrs:?}");
    assert!(cidrs.contains("2001:db8:2::/48"), "{cidrs:?}");
    assert_eq!(raw.len(), 4);
    for r in &raw {
        assert_eq!(
            r.5.get(marker::TAG_CLUSTER).map(String::as_str),
            Some(CLUSTER)
        );
        assert_eq!(r.5.get(marker::TAG_POOLS).map(String::as_str), Some("v6"));
    }
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // Remove the dual-stack Service: exactly its two rules go.
    let dual_ids: BTreeSet<String> = raw
        .iter()
        .filter(|r| r.2 == 30010)
        .map(|r| r.0.clone())
        .collect();
    let rest: Vec<ServiceSpec> = svcs[1..].to_vec();
    let second = plan(&p, &config, &rest, &nodes).await;
    let removed: BTreeSet<String> = second.targets[0]
        .of(Action::Remove)
        .filter_map(|c| c.id.clone())
        .collect();
    assert_eq!(removed, dual_ids);
    assert_eq!(second.summary.add, 0);
    apply_ok(&p, &second).await;
    let after: BTreeSet<String> = env.raw_rules(&sg).await.into_iter().map(|r| r.0).collect();
    let before: BTreeSet<String> = raw.iter().map(|r| r.0.clone()).collect();
    assert_eq!(after, before.difference(&dual_ids).cloned().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_updates_in_place_and_long_service_lists() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("marker").await;
    let config = config_for(&[&pool]);

    // A Service replaced by another on the same port and sources: same content, new marker.
    let first = plan(&p, &config, &[svc("old", 30100, "10.0.0.0/8")], &nodes).await;
    apply_ok(&p, &first).await;
    let id_before = env.raw_rules(&sg).await[0].0.clone();
    let swap = plan(&p, &config, &[svc("new", 30100, "10.0.0.0/8")], &nodes).await;
    assert_eq!(swap.summary.update, 1, "{:#?}", swap.targets[0].changes);
    env.proxy.reset();
    apply_ok(&p, &swap).await;
    assert_eq!(
        env.proxy.per_group(&sg).1,
        1,
        "one ModifySecurityGroupRules: {:?}",
        env.proxy.calls()
    );
    let obs = p.observe(&Target::new("aws", &sg)).await.unwrap();
    assert_eq!(obs.rules.len(), 1);
    assert_eq!(
        obs.rules[0].id.as_deref(),
        Some(id_before.as_str()),
        "same rule kept"
    );
    assert_eq!(
        obs.rules[0].rule.services,
        [ServiceRef::new("apps", "new")].into_iter().collect()
    );

    // 12 Services on contiguous ports with one allowlist: one rule whose Service list does
    // not fit the description, so it goes to tags; it round-trips.
    let many: Vec<ServiceSpec> = (0..12)
        .map(|i| {
            svc(
                &format!("a-fairly-long-service-name-{i:02}"),
                30200 + i,
                "10.0.0.0/8",
            )
        })
        .collect();
    let big = plan(&p, &config, &many, &nodes).await;
    apply_ok(&p, &big).await;
    let again = plan(&p, &config, &many, &nodes).await;
    assert_eq!(writes(&again), 0, "{:#?}", again.targets[0].changes);
    let range_rule = |raw: Vec<RawRule>| raw.into_iter().find(|r| r.2 == 30200).unwrap();
    let tagged = range_rule(env.raw_rules(&sg).await);
    assert!(
        tagged.5.contains_key(marker::TAG_SERVICES),
        "{:?}",
        tagged.5
    );
    assert_eq!(tagged.3, 30211, "one rule for the contiguous range");

    // Rename one of them (same port): tags rewritten in place, same rule id.
    let mut renamed = many.clone();
    renamed[0] = svc("renamed-service", 30200, "10.0.0.0/8");
    let upd = plan(&p, &config, &renamed, &nodes).await;
    assert_eq!(upd.summary.update, 1, "{:#?}", upd.targets[0].changes);
    apply_ok(&p, &upd).await;
    assert_eq!(writes(&plan(&p, &config, &renamed, &nodes).await), 0);
    assert_eq!(range_rule(env.raw_rules(&sg).await).0, tagged.0);

    // Short names on the same ports: the list fits the description again and the stale
    // service tags are deleted.
    let short: Vec<ServiceSpec> = (0..12)
        .map(|i| svc(&format!("s{i:02}"), 30200 + i, "10.0.0.0/8"))
        .collect();
    let shrink = plan(&p, &config, &short, &nodes).await;
    assert_eq!(shrink.summary.update, 1, "{:#?}", shrink.targets[0].changes);
    apply_ok(&p, &shrink).await;
    assert_eq!(writes(&plan(&p, &config, &short, &nodes).await), 0);
    let r = range_rule(env.raw_rules(&sg).await);
    assert_eq!(r.0, tagged.0);
    assert!(
        !r.5.keys().any(|k| k.starts_with(marker::TAG_SERVICES)),
        "stale service tags: {:?}",
        r.5
    );
}

// ---------------------------------------------------------------------------------------
// Faults: throttling, 5xx, lost responses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_converge_without_duplicates() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("faults").await;
    let config = config_for(&[&pool]);
    let svcs: Vec<ServiceSpec> = (0..6)
        .map(|i| svc(&format!("s{i}"), 30300 + 2 * i, "10.0.0.0/8, 2001:db8::/32"))
        .collect();

    env.proxy.fail("DescribeInstances", 1, Fault::Unavailable);
    env.proxy
        .fail("DescribeSecurityGroupRules", 2, Fault::Throttle);
    // The first authorize is carried out but its answer is lost: the retry meets
    // InvalidPermission.Duplicate, which must converge, not loop.
    env.proxy
        .fail("AuthorizeSecurityGroupIngress", 1, Fault::LostResponse);
    env.proxy
        .fail("AuthorizeSecurityGroupIngress", 1, Fault::Throttle);
    let first = plan(&p, &config, &svcs, &nodes).await;
    assert!(
        first.targets[0].error.is_none(),
        "{:?}",
        first.targets[0].error
    );
    let notes = apply_ok(&p, &first).await;
    println!("notes after a lost authorize response: {notes:?}");

    let raw = env.raw_rules(&sg).await;
    let contents: BTreeSet<(String, i32, i32, String)> = raw
        .iter()
        .map(|r| (r.1.clone(), r.2, r.3, r.4.clone()))
        .collect();
    assert_eq!(contents.len(), raw.len(), "duplicate rules: {raw:?}");
    assert_eq!(raw.len(), 12);
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);

    // Revoke throttled then 5xx, then succeeds.
    env.proxy
        .fail("RevokeSecurityGroupIngress", 1, Fault::Throttle);
    env.proxy
        .fail("RevokeSecurityGroupIngress", 1, Fault::Unavailable);
    let cleanup = plan(&p, &config, &[], &nodes).await;
    apply_ok(&p, &cleanup).await;
    assert!(env.raw_rules(&sg).await.is_empty());
    // 1 DescribeInstances, 2 DescribeSecurityGroupRules, 2 authorize, 2 revoke.
    assert_eq!(env.proxy.injected(), 7, "faults injected");
    let stats = p.stats().snapshot();
    println!("provider call stats with faults: {stats:#?}");
    assert!(stats["DescribeSecurityGroupRules"].retries >= 2);
    assert!(stats["RevokeSecurityGroupIngress"].retries >= 2);

    // A permission error is not retried and carries the AWS code.
    env.proxy
        .fail("AuthorizeSecurityGroupIngress", 1, Fault::Unauthorized);
    let again = plan(&p, &config, &svcs, &nodes).await;
    let before = p.stats().calls("AuthorizeSecurityGroupIngress");
    let out = engine::apply(&p, &again).await;
    match &out[0].1 {
        ApplyOutcome::Failed { error, .. } => {
            assert!(
                error.to_string().contains("UnauthorizedOperation"),
                "{error}"
            )
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(p.stats().calls("AuthorizeSecurityGroupIngress"), before + 1);
    // ... and the next reconcile converges.
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;
    assert_eq!(writes(&plan(&p, &config, &svcs, &nodes).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_preflight_uses_dry_run() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let (pool, sg, nodes) = env.pool("check").await;
    let target = Target::new("aws", &sg);
    assert_eq!(p.check(&target).await, Vec::<String>::new());
    let config = config_for(&[&pool]);
    apply_ok(
        &p,
        &plan(&p, &config, &[svc("x", 30400, "10.0.0.0/8")], &nodes).await,
    )
    .await;
    let before = env.raw_rules(&sg).await;
    assert_eq!(p.check(&target).await, Vec::<String>::new());
    assert_eq!(
        env.raw_rules(&sg).await,
        before,
        "a dry run changes nothing"
    );
    env.proxy
        .fail("AuthorizeSecurityGroupIngress", 1, Fault::Unauthorized);
    env.proxy
        .fail("RevokeSecurityGroupIngress", 1, Fault::Unauthorized);
    assert_eq!(
        p.check(&target).await,
        vec![
            "ec2:AuthorizeSecurityGroupIngress".to_string(),
            "ec2:RevokeSecurityGroupIngress".to_string()
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Call counts and the 500-Service measurement

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_counts_per_target() {
    let env = env_or_skip!();
    let p = env.provider().await;
    let mut pools = Vec::new();
    let mut nodes = Vec::new();
    let mut sgs = Vec::new();
    for name in ["cc-a", "cc-b", "cc-c"] {
        let (pool, sg, n) = env.pool(name).await;
        pools.push(pool);
        sgs.push(sg);
        nodes.extend(n);
    }
    let config = config_for(&pools.iter().collect::<Vec<_>>());
    let mut svcs: Vec<ServiceSpec> = (0..10)
        .map(|i| svc(&format!("s{i}"), 30500 + 3 * i, "10.0.0.0/8, 2001:db8::/32"))
        .collect();
    apply_ok(&p, &plan(&p, &config, &svcs, &nodes).await).await;

    // A resync with nothing changed: one read per target, no writes.
    env.proxy.reset();
    p.stats().reset();
    let noop = plan(&p, &config, &svcs, &nodes).await;
    assert_eq!(writes(&noop), 0);
    apply_ok(&p, &noop).await;
    for sg in &sgs {
        assert_eq!(
            env.proxy.per_group(sg),
            (1, 0),
            "{sg}: {:?}",
            env.proxy.calls()
        );
    }
    assert_eq!(p.stats().calls("DescribeSecurityGroupRules"), 3);
    assert_eq!(p.stats().writes(), 0);
    assert_eq!(
        p.stats().calls("DescribeInstances"),
        0,
        "discovery is cached"
    );
    println!("no-op resync, 3 targets: {:?}", p.stats().snapshot());

    // One Service added: one read and one write per target.
    svcs.push(svc("added", 30600, "10.0.0.0/8, 2001:db8::/32"));
    env.proxy.reset();
    p.stats().reset();
    let one = plan(&p, &config, &svcs, &nodes).await;
    apply_ok(&p, &one).await;
    for sg in &sgs {
        assert_eq!(
            env.proxy.per_group(sg),
            (1, 1),
            "{sg}: {:?}",
            env.proxy.calls()
        );
    }
    assert_eq!(p.stats().writes(), 3);
    println!("one Service added, 3 targets: {:?}", p.stats().snapshot());
}

struct Scenario {
    name: &'static str,
    services: Vec<ServiceSpec>,
}

/// 500 Services at once across 3 pools: writes per target and rule slots used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_500_services_across_3_pools() {
    let env = env_or_skip!();
    let allowlists = [
        "10.0.0.0/8",
        "192.168.0.0/16, 2001:db8::/32",
        "172.16.0.0/12, 203.0.113.0/24",
    ];
    let pool_names = ["bench-a", "bench-b", "bench-c"];
    // A: each Service on one pool, NodePorts allocated in runs of 8 with gaps, the run's
    // Services sharing an allowlist (a team's block). B: 4 blocks of 125 contiguous ports.
    let a: Vec<ServiceSpec> = (0..500)
        .map(|i: i32| {
            let run = i / 8;
            ServiceSpec::nodeport("bench", &format!("svc-{i}"))
                .with_port("p", "TCP", 80, 30000 + run * 10 + i % 8)
                .enabled()
                .with_ranges(allowlists[(run % 3) as usize])
                .with_annotation("node-pools", pool_names[(run % 3) as usize])
        })
        .collect();
    let b: Vec<ServiceSpec> = (0..500)
        .map(|i: i32| {
            ServiceSpec::nodeport("bench", &format!("svc-{i}"))
                .with_port("p", "TCP", 80, 30000 + i)
                .enabled()
                .with_ranges(allowlists[(i / 125) as usize % 3])
        })
        .collect();
    for scenario in [
        Scenario {
            name: "A: one pool per Service, runs of 8 NodePorts",
            services: a,
        },
        Scenario {
            name: "B: every pool, 4 blocks of 125 contiguous NodePorts",
            services: b,
        },
    ] {
        let p = env.provider().await;
        let mut pools = Vec::new();
        let mut nodes = Vec::new();
        let mut sgs = Vec::new();
        for name in pool_names {
            let (pool, sg, n) = env.pool(&format!("{name}-{}", &scenario.name[..1])).await;
            let n: Vec<NodeSpec> = n
                .into_iter()
                .map(|n| n.with_label(POOL_LABEL, name))
                .collect();
            pools.push(PoolName::new(name));
            let _ = pool;
            sgs.push(sg);
            nodes.extend(n);
        }
        let config = config_for(&pools.iter().collect::<Vec<_>>());
        env.proxy.reset();
        let started = Instant::now();
        let first = plan(&p, &config, &scenario.services, &nodes).await;
        for t in &first.targets {
            assert!(t.error.is_none(), "{}: {:?}", t.target, t.error);
        }
        apply_ok(&p, &first).await;
        let elapsed = started.elapsed();
        println!("\n== {} ==", scenario.name);
        println!("plan + apply of 500 Services: {elapsed:?}");
        let mut total_rules = 0;
        let mut total_naive = 0;
        for (sg, pool) in sgs.iter().zip(&pools) {
            let (reads, writes) = env.proxy.per_group(sg);
            let rules = env.raw_rules(sg).await.len();
            // Naive: one rule per (NodePort, CIDR) of every Service on this pool.
            let naive: usize = scenario
                .services
                .iter()
                .filter(|s| {
                    s.annotations
                        .get("nodeport-firewall.io/node-pools")
                        .is_none_or(|v| v == pool.as_str())
                })
                .map(|s| {
                    s.annotations["nodeport-firewall.io/allowed-source-ranges"]
                        .split(',')
                        .count()
                })
                .sum();
            total_rules += rules;
            total_naive += naive;
            println!(
                "pool {pool} ({sg}): {reads} reads, {writes} writes; {rules} rule slots used (naive: {naive})"
            );
        }
        println!(
            "all calls: {:?}\nrule slots: {total_rules} used vs {total_naive} naive ({:.1}x fewer)",
            env.proxy.calls(),
            total_naive as f64 / total_rules.max(1) as f64
        );
        let again = plan(&p, &config, &scenario.services, &nodes).await;
        assert_eq!(writes(&again), 0);
    }
}
